//! The peer book file's writer: a task that writes the snapshots of the book the event loop
//! hands it ([`BookWriter`]), on a blocking thread, so file I/O never stalls the swarm task. It
//! writes only when the book differs from what the file holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::peer_book::{SavedBook, save_file};

/// Snapshots waiting for the writer; when full, a periodic save is skipped (the next one
/// carries the newer book anyway).
const QUEUE: usize = 2;

struct Job {
    book: SavedBook,
    /// Told whether the book is on disk now.
    done: Option<oneshot::Sender<bool>>,
}

/// The handle to the writer task.
pub struct BookWriter {
    tx: mpsc::Sender<Job>,
    /// Set by the writer when a write failed, so the loop offers the book again.
    failed: Arc<AtomicBool>,
}

impl BookWriter {
    /// Start the writer for `path`, which holds `written` now. Needs a Tokio runtime.
    pub fn spawn(path: PathBuf, written: SavedBook) -> BookWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let failed = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(path, written, rx, failed.clone()));
        BookWriter { tx, failed }
    }

    /// Write `book` when the writer gets to it. False when the writer is busy (the book was
    /// not taken: offer it again later).
    pub fn offer(&self, book: SavedBook) -> bool {
        if self.tx.try_send(Job { book, done: None }).is_err() {
            tracing::debug!("the peer book writer is busy; the book is written later");
            return false;
        }
        true
    }

    /// Write `book`; `done` is told whether it is on disk.
    pub fn save(&self, book: SavedBook, done: oneshot::Sender<bool>) {
        let job = Job {
            book,
            done: Some(done),
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if let Err(mpsc::error::SendError(job)) = tx.send(job).await
                        && let Some(done) = job.done
                    {
                        let _ = done.send(false);
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(job)) => {
                if let Some(done) = job.done {
                    let _ = done.send(false);
                }
            }
        }
    }

    /// Write `book` and wait until it is on disk (at shutdown); false when the write failed.
    pub async fn flush(&self, book: SavedBook) -> bool {
        let (done, rx) = oneshot::channel();
        self.save(book, done);
        rx.await.unwrap_or(false)
    }

    /// Whether a write failed since the last call.
    pub fn take_failed(&self) -> bool {
        self.failed.swap(false, Ordering::Relaxed)
    }
}

async fn run(
    path: PathBuf,
    mut written: SavedBook,
    mut rx: mpsc::Receiver<Job>,
    failed: Arc<AtomicBool>,
) {
    while let Some(job) = rx.recv().await {
        let ok = job.book == written
            || {
                let (p, book) = (path.clone(), job.book.clone());
                match tokio::task::spawn_blocking(move || save_file(&p, &book)).await {
                    Ok(Ok(())) => {
                        tracing::debug!(peers = job.book.peers.len(), "peer book written");
                        written = job.book;
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the peer book");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "the peer book write did not finish");
                        false
                    }
                }
            };
        if !ok {
            failed.store(true, Ordering::Relaxed);
        }
        if let Some(done) = job.done {
            let _ = done.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_book::{SavedPeer, load_file};

    fn book(n: usize) -> SavedBook {
        SavedBook {
            version: 1,
            peers: (0..n)
                .map(|i| SavedPeer {
                    id: format!("peer{i}"),
                    addrs: vec![format!("/ip4/127.0.0.1/tcp/{i}")],
                    known_since_ms: None,
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn the_book_is_written_and_an_unchanged_one_is_not_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("peers.json");
        let w = BookWriter::spawn(path.clone(), SavedBook::default());
        assert!(w.flush(SavedBook::default()).await);
        assert!(!path.exists(), "an unchanged book is not written");
        assert!(w.flush(book(2)).await);
        assert_eq!(load_file(&path).peers.len(), 2);
        assert!(!w.take_failed());
    }

    #[tokio::test]
    async fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("peers.json");
        let w = BookWriter::spawn(path, SavedBook::default());
        assert!(!w.flush(book(1)).await);
        assert!(w.take_failed());
        assert!(!w.take_failed());
    }
}
