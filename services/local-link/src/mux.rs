//! Many requests on one long-lived bidirectional gRPC stream of the local link, instead of a
//! unary call each (the node ⇄ sidecar forwards, both directions; issue 13). Each request is
//! tagged with an id; a reader task hands each answer to the caller waiting for that id. The
//! stream is opened on first use and again after it ends; requests still open when it ends fail
//! as link failures. A peer without the streaming method (UNIMPLEMENTED when opening) is reported
//! once as [`MuxError::Unsupported`] so the caller can fall back to its unary call.
//!
//! A message over the link's size limit fails alone, never the stream: the sending side measures
//! each request ([`StreamMux::call`]) and each answer ([`serve_stream`]) before it goes out, and
//! one over the limit becomes that request's RESOURCE_EXHAUSTED (naming the limit and what to
//! do) while every other request on the stream goes on. (gRPC resets a whole stream on one
//! message over its encoding limit.)
//!
//! Written here rather than taken from a crate: what it needs is small (an id → oneshot map per
//! stream, one reader task) and tied to tonic's `Streaming`; the general-purpose multiplexers
//! (e.g. tower's `Buffer`, `tokio-tower`'s pipeline/multiplex) are built around a `Transport` of
//! their own rather than a tonic stream, and would still need this glue.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// What a failed call says.
#[derive(Debug)]
pub enum MuxError<Req> {
    /// The other side has no such streaming method: use the unary call (found once; later
    /// calls say it again without trying). The request comes back unsent.
    Unsupported(Req),
    Status(Status),
}

/// A failure of the link itself, as opposed to an answer: UNAVAILABLE with a source (circuit
/// breakers on the link count those).
pub fn link_failure(message: impl Into<String>) -> Status {
    let message = message.into();
    let mut s = Status::unavailable(message.clone());
    s.set_source(Arc::new(std::io::Error::other(message)));
    s
}

type Pending<A> = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<A, Status>>>>>;

fn lock<A>(
    p: &Pending<A>,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<A, Status>>>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One open stream: its sender, the requests waiting on it (each stream has its own, so a
/// stream that ends fails only its own), and whether its reader has ended.
struct Live<Req, A> {
    tx: mpsc::Sender<Req>,
    pending: Pending<A>,
    dead: Arc<AtomicBool>,
}

impl<Req, A> Clone for Live<Req, A> {
    fn clone(&self) -> Self {
        Live {
            tx: self.tx.clone(),
            pending: self.pending.clone(),
            dead: self.dead.clone(),
        }
    }
}

/// Removes a request's entry when its caller stops waiting (answered, timed out, cancelled).
struct PendingGuard<'a, A> {
    pending: &'a Pending<A>,
    id: u64,
}

impl<A> Drop for PendingGuard<'_, A> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

/// How the multiplexer reads and writes the messages' request ids, and turns an answer into
/// the caller's result.
pub struct Codec<Req, Resp, A> {
    pub set_id: fn(&mut Req, u64),
    pub id_of: fn(&Resp) -> u64,
    pub answer: fn(Resp) -> Result<A, Status>,
}

impl<Req, Resp, A> Clone for Codec<Req, Resp, A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Req, Resp, A> Copy for Codec<Req, Resp, A> {}

/// The multiplexer: `Req` goes out, `Resp` comes back and becomes the caller's `A` (or a
/// status).
pub struct StreamMux<Req, Resp, A> {
    /// Who is at the other end, for messages ("the p2p-sidecar", "the node").
    peer: &'static str,
    live: tokio::sync::Mutex<Option<Live<Req, A>>>,
    unsupported: AtomicBool,
    next_id: AtomicU64,
    max_pending: usize,
    /// Largest request sent on the stream (the link's gRPC encoding limit).
    max_message_bytes: usize,
    codec: Codec<Req, Resp, A>,
}

/// Requests queued for the stream's writer.
const SEND_BUFFER: usize = 1024;

/// What to say of a request too large for the link: RESOURCE_EXHAUSTED naming both sizes.
pub fn request_too_large(len: usize, limit: usize, peer: &str) -> Status {
    Status::resource_exhausted(format!(
        "the request is {len} bytes, over the {limit}-byte message limit of the local link to {peer} (--max-message-bytes / --max-forward-bytes); send less in one request (fewer or smaller values, a smaller batch)"
    ))
}

/// What to say of an answer too large for the link: RESOURCE_EXHAUSTED naming both sizes.
pub fn answer_too_large(len: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the answer is {len} bytes, over the {limit}-byte message limit of the local link (--max-message-bytes / --max-forward-bytes); ask for less in one request, e.g. a smaller page_size"
    ))
}

impl<Req, Resp, A> StreamMux<Req, Resp, A>
where
    Req: prost::Message + Send + 'static,
    Resp: Send + 'static,
    A: Send + 'static,
{
    /// At most `max_pending` requests wait for answers at once (beyond: RESOURCE_EXHAUSTED).
    pub fn new(peer: &'static str, max_pending: usize, codec: Codec<Req, Resp, A>) -> Self {
        StreamMux {
            peer,
            live: tokio::sync::Mutex::new(None),
            unsupported: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            max_pending: max_pending.max(1),
            max_message_bytes: usize::MAX,
            codec,
        }
    }

    /// Refuse (RESOURCE_EXHAUSTED, that request alone) a request whose encoding is over `n`
    /// bytes, instead of letting gRPC reset the stream and every request on it.
    pub fn with_max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Send `req` on the stream (opened with `open` if none is) and wait at most `timeout` for
    /// its answer.
    pub async fn call<F, Fut>(
        &self,
        mut req: Req,
        timeout: Duration,
        open: F,
    ) -> Result<A, MuxError<Req>>
    where
        F: FnOnce(ReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Streaming<Resp>, Status>>,
    {
        if self.unsupported.load(Ordering::Relaxed) {
            return Err(MuxError::Unsupported(req));
        }
        // Measured with the id it will carry (a varint: at most 10 bytes more).
        let len = req.encoded_len() + 11;
        if len > self.max_message_bytes {
            return Err(MuxError::Status(request_too_large(
                len,
                self.max_message_bytes,
                self.peer,
            )));
        }
        let live = match self.live(open).await {
            Ok(l) => l,
            Err(None) => return Err(MuxError::Unsupported(req)),
            Err(Some(s)) => return Err(MuxError::Status(s)),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (self.codec.set_id)(&mut req, id);
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut p = lock(&live.pending);
            if p.len() >= self.max_pending {
                return Err(MuxError::Status(Status::resource_exhausted(format!(
                    "{} requests are already waiting for {}",
                    self.max_pending, self.peer
                ))));
            }
            p.insert(id, answer_tx);
        }
        let _guard = PendingGuard {
            pending: &live.pending,
            id,
        };
        // The stream may have ended between taking it and registering: its reader has then
        // failed everything it had, but not this one.
        if live.dead.load(Ordering::Acquire) {
            return Err(MuxError::Status(link_failure(format!(
                "the stream to {} ended; the next request opens a new one",
                self.peer
            ))));
        }
        if live.tx.send(req).await.is_err() {
            return Err(MuxError::Status(link_failure(format!(
                "the stream to {} closed before the request was sent",
                self.peer
            ))));
        }
        match tokio::time::timeout(timeout, answer_rx).await {
            Ok(Ok(answer)) => answer.map_err(MuxError::Status),
            Ok(Err(_)) => Err(MuxError::Status(link_failure(format!(
                "the stream to {} ended before the answer",
                self.peer
            )))),
            Err(_) => Err(MuxError::Status(Status::deadline_exceeded(format!(
                "{} did not answer within {} ms",
                self.peer,
                timeout.as_millis()
            )))),
        }
    }

    /// The open stream, opening one if needed. `Err(None)`: the other side has no streaming
    /// method.
    async fn live<F, Fut>(&self, open: F) -> Result<Live<Req, A>, Option<Status>>
    where
        F: FnOnce(ReceiverStream<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Streaming<Resp>, Status>>,
    {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && !l.dead.load(Ordering::Acquire)
            && !l.tx.is_closed()
        {
            return Ok(l.clone());
        }
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        let inbound = match open(ReceiverStream::new(rx)).await {
            Ok(s) => s,
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::info!(
                    peer = self.peer,
                    "no streaming method on the other side; using unary calls"
                );
                self.unsupported.store(true, Ordering::Relaxed);
                return Err(None);
            }
            Err(s) if std::error::Error::source(&s).is_some() => return Err(Some(s)),
            Err(s) => {
                return Err(Some(link_failure(format!(
                    "could not open the stream to {}: {}",
                    self.peer,
                    s.message()
                ))));
            }
        };
        let l = Live {
            tx,
            pending: Arc::new(Mutex::new(HashMap::new())),
            dead: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(read_answers(
            inbound,
            l.pending.clone(),
            l.dead.clone(),
            self.codec,
            self.peer,
        ));
        *live = Some(l.clone());
        Ok(l)
    }
}

/// Hand each answer to its caller; when the stream ends, fail every request still open on it.
async fn read_answers<Req, Resp, A>(
    mut inbound: tonic::Streaming<Resp>,
    pending: Pending<A>,
    dead: Arc<AtomicBool>,
    codec: Codec<Req, Resp, A>,
    peer: &'static str,
) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(msg)) => {
                // None: its caller stopped waiting (timed out or cancelled).
                let waiting = lock(&pending).remove(&(codec.id_of)(&msg));
                if let Some(waiting) = waiting {
                    let _ = waiting.send((codec.answer)(msg));
                }
            }
            Ok(None) => break format!("{peer} closed the stream"),
            Err(s) => break format!("the stream to {peer} broke: {}", s.message()),
        }
    };
    dead.store(true, Ordering::Release);
    tracing::debug!(reason = %why, "local link stream ended");
    let open: Vec<_> = lock(&pending).drain().collect();
    for (_, waiting) in open {
        let _ = waiting.send(Err(link_failure(why.clone())));
    }
}

/// `answer`, or (when its encoding is over `max` bytes) the refusal that says so.
fn fit_answer<Resp: prost::Message>(
    answer: Resp,
    id: u64,
    max: usize,
    refuse: fn(u64, Status) -> Resp,
) -> Resp {
    let len = answer.encoded_len();
    if len <= max {
        return answer;
    }
    tracing::info!(
        len,
        limit = max,
        "an answer over the local link's limit was refused"
    );
    refuse(id, answer_too_large(len, max))
}

/// Answers buffered per served stream before the server waits for the client to read.
const ANSWER_BUFFER: usize = 1024;

/// The serving side of a multiplexed stream: each request of `inbound` is handled on its own
/// task by `handle` (at most `max_in_flight` at once; beyond that a request is answered at once
/// with `refuse(id, RESOURCE_EXHAUSTED)`), and the answers go back in the order they finish.
/// An answer over `max_answer_bytes` (the server's encoding limit) is replaced by
/// `refuse(id, RESOURCE_EXHAUSTED)` saying so: it fails alone, the stream goes on.
/// A client that stops reading stops this stream's requests from being taken, never the server.
pub fn serve_stream<Req, Resp, F, Fut>(
    mut inbound: tonic::Streaming<Req>,
    max_in_flight: usize,
    max_answer_bytes: usize,
    id_of: fn(&Req) -> u64,
    refuse: fn(u64, Status) -> Resp,
    handle: F,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Resp, Status>>(ANSWER_BUFFER);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    tokio::spawn(async move {
        // Ends when the client closes its side or the stream breaks.
        while let Ok(Some(req)) = inbound.message().await {
            let id = id_of(&req);
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let refused = refuse(
                    id,
                    Status::resource_exhausted(
                        "too many requests in flight on this stream; retry when some are answered",
                    ),
                );
                if tx.send(Ok(refused)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            let work = handle(req);
            tokio::spawn(async move {
                let _permit = permit;
                let answer = fit_answer(work.await, id, max_answer_bytes, refuse);
                // The client went away: its answer has nowhere to go.
                let _ = tx.send(Ok(answer)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Msg {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(bytes = "vec", tag = "2")]
        body: Vec<u8>,
    }

    const CODEC: Codec<Msg, Msg, Msg> = Codec {
        set_id: |m, id| m.id = id,
        id_of: |m| m.id,
        answer: Ok,
    };

    /// A request over the limit is refused alone, before any stream is opened or touched.
    #[tokio::test]
    async fn a_request_over_the_limit_fails_alone_before_it_is_sent() {
        let mux = StreamMux::new("the test", 8, CODEC).with_max_message_bytes(1024);
        let big = Msg {
            id: 0,
            body: vec![7; 2000],
        };
        let r = mux
            .call(big, Duration::from_secs(1), |_| async {
                Err::<tonic::Streaming<Msg>, _>(Status::internal("must not be opened"))
            })
            .await;
        let Err(MuxError::Status(s)) = r else {
            panic!("an oversized request was sent");
        };
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("1024-byte"), "{}", s.message());
        // A small one does reach the stream (here: its opening, which fails).
        let r = mux
            .call(Msg::default(), Duration::from_secs(1), |_| async {
                Err::<tonic::Streaming<Msg>, _>(Status::internal("opened"))
            })
            .await;
        let Err(MuxError::Status(s)) = r else {
            panic!("no error from a failed opening");
        };
        assert!(s.message().contains("opened"), "{}", s.message());
    }

    /// An answer over the limit becomes the refusal for its id; others pass unchanged.
    #[test]
    fn an_answer_over_the_limit_becomes_its_own_refusal() {
        let refuse = |id, s: Status| Msg {
            id,
            body: s.message().as_bytes().to_vec(),
        };
        let ok = Msg {
            id: 3,
            body: vec![1; 10],
        };
        assert_eq!(fit_answer(ok.clone(), 3, 100, refuse), ok);
        let big = Msg {
            id: 4,
            body: vec![1; 200],
        };
        let fitted = fit_answer(big, 4, 100, refuse);
        assert_eq!(fitted.id, 4);
        let text = String::from_utf8(fitted.body).unwrap();
        assert!(
            text.contains("page_size") && text.contains("100-byte"),
            "{text}"
        );
    }
}
