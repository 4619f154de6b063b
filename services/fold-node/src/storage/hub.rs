//! The [`ChangeHub`]: where the group-commit writer (and a replica's applier) announce each
//! durable group's new head per schema to live subscribers (subscribe.rs). A small
//! `tokio::sync::broadcast` ring of sequence numbers per schema, and the latest head; no change
//! content. Announcing never waits for listeners.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

/// Announcements a listener may miss before it is told it lagged (harmless: it reads the log).
const ANNOUNCEMENTS: usize = 64;

/// One schema's announcements: a ring of new heads, and the latest head.
struct Channel {
    ring: broadcast::Sender<u64>,
    head: Arc<AtomicU64>,
}

/// Where commits are announced to live subscribers: per schema with listeners (schemas are few
/// and loaded by admins; the map is bounded by them).
#[derive(Clone)]
pub struct ChangeHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// How far behind the head a live subscriber may fall (--subscription-buffer).
    buffer: usize,
    channels: Mutex<HashMap<String, Channel>>,
    /// Set when the node stops: open subscriptions end, saying where to resume.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// A registration with the hub for one schema.
pub struct Listener {
    pub rx: broadcast::Receiver<u64>,
    /// The latest head announced (0 before the first announcement since registering).
    pub head: Arc<AtomicU64>,
}

impl ChangeHub {
    /// A hub whose live subscribers may fall `buffer` changes behind the head.
    pub fn new(buffer: usize) -> ChangeHub {
        ChangeHub {
            inner: Arc::new(HubInner {
                buffer: buffer.max(1),
                channels: Mutex::new(HashMap::new()),
                stopping: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// The node is stopping: end every open subscription (UNAVAILABLE, naming the sequence to
    /// resume from), so a graceful shutdown does not wait for streams that never end.
    pub fn stop(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Told when the node stops ([`ChangeHub::stop`]).
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.stopping.subscribe()
    }

    pub fn buffer(&self) -> usize {
        self.inner.buffer
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Be told of every commit to `schema` from now on.
    pub fn listen(&self, schema: &str) -> Listener {
        let mut channels = self.channels();
        let c = channels
            .entry(schema.to_string())
            .or_insert_with(|| Channel {
                ring: broadcast::channel(ANNOUNCEMENTS).0,
                head: Arc::new(AtomicU64::new(0)),
            });
        Listener {
            rx: c.ring.subscribe(),
            head: c.head.clone(),
        }
    }

    /// Announce committed changes ((schema, sequence), in commit order). Never waits.
    pub fn publish(&self, committed: Vec<(String, u64)>) {
        if committed.is_empty() {
            return;
        }
        // The last sequence per schema is enough: listeners read the log up to it.
        let mut heads: HashMap<String, u64> = HashMap::new();
        for (schema, seq) in committed {
            let h = heads.entry(schema).or_insert(0);
            *h = (*h).max(seq);
        }
        let channels = self.channels();
        for (schema, head) in heads {
            if let Some(c) = channels.get(&schema) {
                c.head.fetch_max(head, Ordering::AcqRel);
                if c.ring.receiver_count() > 0 {
                    let _ = c.ring.send(head);
                }
            }
        }
    }
}
