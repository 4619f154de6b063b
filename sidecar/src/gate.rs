//! The inbound gate of `/fold/forward/2.0.0`: what a forwarded request must pass before this
//! sidecar hands it to its node — the per-peer rate limit, the signed envelope's checks
//! ([`Verifier`]: bounded ids, origin = authenticated peer, signature over the bytes received,
//! freshness, deadline, nonce), the target being this node, and a free inbound slot. Every
//! refusal is counted by reason and answered with a typed error; nothing refused reaches the node.
//!
//! The gate is shared by every inbound stream's task, off the swarm task: the only lock is the
//! verifier's (one hash-set insert per request).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_middleware::rate_limit::KeyedLimiter;
use fold_proto::status::wire_error;
use fold_proto::wire::{ForwardEnvelopeHeader, SignedEnvelope, WireError};
use libp2p::PeerId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;

use crate::metrics::SidecarMetrics;
use crate::signing::Verifier;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A request that passed the gate: its verified header and its inbound slot.
pub struct Admitted {
    pub header: ForwardEnvelopeHeader,
    /// What is left of the origin's deadline (`None`: it set none).
    pub remaining: Option<Duration>,
    pub permit: OwnedSemaphorePermit,
}

pub struct InboundGate {
    local: PeerId,
    limiter: Option<KeyedLimiter>,
    verifier: Mutex<Verifier>,
    slots: Arc<Semaphore>,
    metrics: Arc<SidecarMetrics>,
}

impl InboundGate {
    pub fn new(
        local: PeerId,
        limiter: Option<KeyedLimiter>,
        verifier: Verifier,
        slots: usize,
        metrics: Arc<SidecarMetrics>,
    ) -> InboundGate {
        InboundGate {
            local,
            limiter,
            verifier: Mutex::new(verifier),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            metrics,
        }
    }

    /// Check one request from the authenticated `peer`. On refusal: the request id (when the
    /// header could be read) and the error to answer.
    pub fn admit(
        &self,
        peer: &PeerId,
        env: &SignedEnvelope,
    ) -> Result<Admitted, (String, WireError)> {
        if let Some(l) = &self.limiter
            && let Err(e) = l.check(&peer.to_string())
        {
            self.metrics.inbound("forward", "rate_limited");
            return Err((
                String::new(),
                wire_error(Code::ResourceExhausted, e.to_string()),
            ));
        }
        let now = now_ms();
        let checked = {
            let mut v = self
                .verifier
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = v.check(peer, env, now);
            self.metrics.replay_cache_bytes(v.replay_cache_bytes());
            r
        };
        let header = match checked {
            Ok(h) => h,
            Err((why, message)) => {
                self.metrics.inbound("forward", why.label());
                tracing::warn!(%peer, reason = why.label(), %message, "forward request refused");
                return Err((String::new(), wire_error(why.code(), message)));
            }
        };
        let me = self.local.to_string();
        if header.target_node_id != me {
            self.metrics.inbound("forward", "wrong_target");
            let msg = format!(
                "request is for node {}, this is node {me}",
                header.target_node_id
            );
            return Err((header.request_id, wire_error(Code::NotFound, msg)));
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.inbound("forward", "queue_full");
            return Err((
                header.request_id,
                wire_error(Code::Unavailable, "node is busy: inbound queue full; retry"),
            ));
        };
        self.metrics.inbound("forward", "accepted");
        let remaining = match header.deadline_unix_ms {
            0 => None,
            d => Some(Duration::from_millis(d.saturating_sub(now))),
        };
        Ok(Admitted {
            header,
            remaining,
            permit,
        })
    }
}
