//! Slots for long-lived work a client opens (subscriptions, scans): a total for the node and a
//! share per client identity (`Principal::identity_key`), so one client cannot take them all.
//! A slot is released when its holder is dropped. The per-client map holds only identities
//! with a slot open, so it is bounded by the total.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::NodeError;

/// A pool of slots: `total` at once, at most `per_client` of them for one identity.
#[derive(Clone)]
pub struct ClientSlots {
    total: Arc<Semaphore>,
    per_client: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
    /// What the slots are for and the flags that size them, for refusals.
    what: &'static str,
    flags: &'static str,
}

/// One slot, held until dropped.
pub struct ClientSlot {
    _permit: OwnedSemaphorePermit,
    client: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

impl ClientSlots {
    pub fn new(total: usize, per_client: usize, what: &'static str, flags: &'static str) -> Self {
        ClientSlots {
            total: Arc::new(Semaphore::new(total)),
            per_client: per_client.max(1),
            held: Arc::new(Mutex::new(HashMap::new())),
            what,
            flags,
        }
    }

    /// A slot for `client`, or RESOURCE_EXHAUSTED saying which limit was reached.
    pub fn acquire(&self, client: &str) -> Result<ClientSlot, NodeError> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = held.get(client).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(NodeError::resource_exhausted(format!(
                "this client already has {mine} {} open on this node, its share ({}); close one first",
                self.what, self.flags
            )));
        }
        let permit = self.total.clone().try_acquire_owned().map_err(|_| {
            NodeError::resource_exhausted(format!(
                "this node has as many {} open as it allows ({}); close one or try again later",
                self.what, self.flags
            ))
        })?;
        held.insert(client.to_string(), mine + 1);
        Ok(ClientSlot {
            _permit: permit,
            client: client.to_string(),
            held: self.held.clone(),
        })
    }

    /// Slots in use (for tests and status).
    pub fn in_use(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_gets_its_share_and_the_rest_stay_for_others() {
        let slots = ClientSlots::new(4, 2, "subscriptions", "--max-subscriptions");
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let e = slots.acquire("a").err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("share"), "{}", e.message());
        let _b1 = slots.acquire("b").unwrap();
        let _c1 = slots.acquire("c").unwrap();
        let e = slots.acquire("d").err().unwrap();
        assert!(e.message().contains("as many"), "{}", e.message());
        drop(a1);
        assert_eq!(slots.in_use(), 3);
        let _a3 = slots.acquire("a").unwrap();
        assert_eq!(slots.in_use(), 4);
    }
}
