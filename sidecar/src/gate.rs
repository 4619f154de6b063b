//! The inbound gate of `/fold/forward/2.0.0` and `/fold/schema/1.0.0`: what a request from a peer
//! must pass before this sidecar hands it to its node — the per-peer rate limit, the signed
//! envelope's checks ([`Verifier`]: bounded ids, origin = authenticated peer, signature over the
//! bytes received, freshness, deadline, nonce), the target being this node, the node not denying
//! the peer, and only then a free slot. Every refusal is counted by reason and answered with a
//! typed error; nothing refused reaches the node, and nothing refused holds a slot.
//!
//! Slots are shared capacity, so they are rationed:
//! - requests take one of `--inbound-queue` slots, and no peer holds more than its fair share
//!   (`--inbound-peer-share` percent of them);
//! - parked long polls (`changes` with a wait: replicas, remote subscriptions) never take those
//!   slots: they have their own budget, in total (`--inbound-long-polls`) and per peer
//!   (`--inbound-long-polls-per-peer`);
//! - a slot is released as soon as the node has answered (the answer's way back to the peer is
//!   the peer's own stream's business, bounded there).
//!
//! Whether the node denies a peer is asked of the node (its schema check refuses a denied origin
//! with PERMISSION_DENIED) and remembered for [`DENIAL_TTL`] ([`DENIED_TTL`] when denied).
//!
//! The gate is shared by every inbound stream's task, off the swarm task. Signatures are
//! verified under no lock, in batches when requests queue up for verification
//! ([`signing::Batcher`]); the locks are the replay cache's (one hash-set insert per
//! request) and two small per-peer maps. Peer ids are compared and keyed in their cached base58
//! form ([`signing::identity_of`]), never formatted per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_middleware::rate_limit::KeyedLimiter;
use fold_proto::status::wire_error;
use fold_proto::wire::{ForwardEnvelopeHeader, SignedEnvelope, WireError};
use libp2p::PeerId;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;

use crate::metrics::SidecarMetrics;
use crate::signing::{self, Batcher, Verifier};

/// How long the node's word that it does not deny a peer is trusted before it is asked again (in
/// the background; the node still checks every request itself).
pub const DENIAL_TTL: Duration = Duration::from_secs(2);
/// How long the node's word that it denies a peer is trusted: not at all. The next request from
/// a denied peer asks the node again first (one local call, made by the stream's reader, so one
/// at a time per stream and without a slot), so trust granted again counts at once.
pub const DENIED_TTL: Duration = Duration::ZERO;
/// Peers whose denial state is remembered at once.
const MAX_DENIAL_ENTRIES: usize = 4096;

/// Default of --inbound-peer-share (percent of --inbound-queue one peer may hold).
pub const DEFAULT_PEER_SHARE_PERCENT: u8 = 25;
/// Default of --inbound-long-polls.
pub const DEFAULT_LONG_POLLS: usize = 1024;
/// Default of --inbound-long-polls-per-peer (= fold-node's default --max-subscriptions, so one
/// default node's remote subscriptions all fit).
pub const DEFAULT_LONG_POLLS_PER_PEER: usize = 256;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How much of the inbound capacity a peer may hold.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Requests handed to the node at once (--inbound-queue).
    pub slots: usize,
    /// Percent of `slots` one peer may hold (--inbound-peer-share).
    pub peer_share_percent: u8,
    /// Parked long polls at once (--inbound-long-polls).
    pub long_polls: usize,
    /// Parked long polls of one peer (--inbound-long-polls-per-peer).
    pub long_polls_per_peer: usize,
}

impl Budget {
    /// The defaults, with `slots` request slots.
    pub fn with_slots(slots: usize) -> Budget {
        Budget {
            slots,
            peer_share_percent: DEFAULT_PEER_SHARE_PERCENT,
            long_polls: DEFAULT_LONG_POLLS,
            long_polls_per_peer: DEFAULT_LONG_POLLS_PER_PEER,
        }
    }

    /// The most request slots one peer may hold (at least one).
    pub fn per_peer_slots(&self) -> usize {
        let share = usize::from(self.peer_share_percent.clamp(1, 100));
        (self.slots.max(1) * share).div_ceil(100).max(1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Request,
    LongPoll,
}

/// One slot held by a peer: released (and the peer's count lowered) when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    peer: PeerId,
    kind: Kind,
    held: Arc<Mutex<HashMap<PeerId, [usize; 2]>>>,
}

impl Slot {
    /// True for a parked long poll's slot.
    pub fn is_long_poll(&self) -> bool {
        self.kind == Kind::LongPoll
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = held.get_mut(&self.peer) {
            let i = self.kind as usize;
            c[i] = c[i].saturating_sub(1);
            if c == &[0, 0] {
                held.remove(&self.peer);
            }
        }
    }
}

/// A request that passed the gate: its verified header and its slot.
pub struct Admitted {
    pub header: ForwardEnvelopeHeader,
    /// What is left of the origin's deadline (`None`: it set none).
    pub remaining: Option<Duration>,
    pub permit: Slot,
}

/// What the node last said of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Never asked, or asked too long ago to go by.
    Unknown,
    /// Asked recently; `stale` once [`DENIAL_TTL`] (denied: [`DENIED_TTL`]) has passed.
    Known { denied: bool, stale: bool },
}

pub struct InboundGate {
    /// This node's id in base58, formatted once (the wrong-target check compares it per request).
    local_id: String,
    limiter: Option<KeyedLimiter>,
    verifier: Verifier,
    /// Verifies the signatures, in batches when requests queue up for it.
    batcher: Arc<Batcher>,
    budget: Budget,
    slots: Arc<Semaphore>,
    long_polls: Arc<Semaphore>,
    /// Per peer: request slots and long-poll slots held.
    held: Arc<Mutex<HashMap<PeerId, [usize; 2]>>>,
    denied: Mutex<HashMap<PeerId, (bool, Instant)>>,
    metrics: Arc<SidecarMetrics>,
}

/// The parts of a ForwardEnvelope that say whether it is a long poll: `operation.changes.wait_ms`
/// (same field numbers; everything else is skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct EnvelopeProbe {
    #[prost(message, optional, tag = "10")]
    operation: Option<OperationProbe>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OperationProbe {
    #[prost(message, optional, tag = "20")]
    changes: Option<ChangesProbe>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChangesProbe {
    #[prost(uint32, tag = "4")]
    wait_ms: u32,
}

/// True when `payload` (an encoded ForwardEnvelope) is a `changes` request that may wait.
pub fn is_long_poll(payload: &[u8]) -> bool {
    EnvelopeProbe::decode(payload)
        .ok()
        .and_then(|e| e.operation?.changes)
        .is_some_and(|c| c.wait_ms > 0)
}

impl InboundGate {
    pub fn new(
        local: PeerId,
        limiter: Option<KeyedLimiter>,
        verifier: Verifier,
        budget: Budget,
        metrics: Arc<SidecarMetrics>,
    ) -> InboundGate {
        InboundGate {
            local_id: local.to_string(),
            limiter,
            verifier,
            batcher: {
                let m = metrics.clone();
                Batcher::observed(
                    Batcher::leaders_for_this_machine(),
                    Some(Box::new(move |n| m.signature_batch(n))),
                )
            },
            slots: Arc::new(Semaphore::new(budget.slots.max(1))),
            long_polls: Arc::new(Semaphore::new(budget.long_polls.max(1))),
            budget,
            held: Arc::new(Mutex::new(HashMap::new())),
            denied: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Check one forwarded request from the authenticated `peer`. On refusal: the request id
    /// (when the header could be read) and the error to answer.
    pub async fn admit(
        &self,
        peer: &PeerId,
        env: &SignedEnvelope,
    ) -> Result<Admitted, (String, WireError)> {
        self.rate_limit(peer, "forward")
            .map_err(|e| (String::new(), e))?;
        let mut now = 0;
        let checked = self
            .verifier
            .check_batched(peer, env, &self.batcher, || {
                now = now_ms();
                now
            })
            .await;
        self.metrics
            .replay_cache_bytes(self.verifier.replay_cache_bytes());
        let header = match checked {
            Ok(h) => h,
            Err((why, message)) => {
                self.metrics.inbound("forward", why.label());
                tracing::warn!(%peer, reason = why.label(), %message, "forward request refused");
                return Err((String::new(), wire_error(why.code(), message)));
            }
        };
        if header.target_node_id != self.local_id {
            self.metrics.inbound("forward", "wrong_target");
            let msg = format!(
                "request is for node {}, this is node {}",
                header.target_node_id, self.local_id
            );
            return Err((header.request_id, wire_error(Code::NotFound, msg)));
        }
        let kind = if is_long_poll(&env.payload) {
            Kind::LongPoll
        } else {
            Kind::Request
        };
        let permit = match self
            .not_denied(peer, "forward")
            .and_then(|()| self.take(peer, kind, "forward"))
        {
            Ok(p) => p,
            Err(e) => return Err((header.request_id, e)),
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

    /// Check one schema check from `peer`: the same rate limit and slots as forwards. (The
    /// node's answer to a schema check *is* its word on denying the peer: the check goes to the
    /// node, which refuses a denied peer at once, and its answer refreshes the gate's.)
    pub fn admit_schema(&self, peer: &PeerId) -> Result<Slot, WireError> {
        self.rate_limit(peer, "schema")?;
        let slot = self.take(peer, Kind::Request, "schema")?;
        self.metrics.inbound("schema", "accepted");
        Ok(slot)
    }

    fn rate_limit(&self, peer: &PeerId, protocol: &'static str) -> Result<(), WireError> {
        if let Some(l) = &self.limiter
            && let Err(e) = l.check(&signing::id_of(peer))
        {
            self.metrics.inbound(protocol, "rate_limited");
            return Err(wire_error(Code::ResourceExhausted, e.to_string()));
        }
        Ok(())
    }

    fn not_denied(&self, peer: &PeerId, protocol: &'static str) -> Result<(), WireError> {
        if let Denial::Known { denied: true, .. } = self.denial(peer) {
            self.metrics.inbound(protocol, "denied");
            return Err(wire_error(
                Code::PermissionDenied,
                format!("node {peer} is not trusted by this node; its requests are refused"),
            ));
        }
        Ok(())
    }

    /// A slot of `kind` for `peer`, within its share and the total.
    fn take(&self, peer: &PeerId, kind: Kind, protocol: &'static str) -> Result<Slot, WireError> {
        let (pool, per_peer) = match kind {
            Kind::Request => (&self.slots, self.budget.per_peer_slots()),
            Kind::LongPoll => (&self.long_polls, self.budget.long_polls_per_peer.max(1)),
        };
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = held.get(peer).map_or(0, |c| c[kind as usize]);
        if mine >= per_peer {
            self.metrics.inbound(protocol, "peer_share");
            return Err(match kind {
                Kind::Request => wire_error(
                    Code::Unavailable,
                    format!(
                        "node is busy: node {peer} already has {mine} requests in progress here, its share of the inbound slots (--inbound-peer-share); retry when some are answered"
                    ),
                ),
                Kind::LongPoll => wire_error(
                    Code::ResourceExhausted,
                    format!(
                        "node {peer} already has {mine} waiting changes requests (long polls) here (--inbound-long-polls-per-peer); retry later or follow fewer schemas of this node"
                    ),
                ),
            });
        }
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            self.metrics.inbound(protocol, "queue_full");
            return Err(match kind {
                Kind::Request => {
                    wire_error(Code::Unavailable, "node is busy: inbound queue full; retry")
                }
                Kind::LongPoll => wire_error(
                    Code::ResourceExhausted,
                    "node is busy: every long-poll slot is taken (--inbound-long-polls); retry later",
                ),
            });
        };
        held.entry(*peer).or_insert([0, 0])[kind as usize] += 1;
        Ok(Slot {
            _permit: permit,
            peer: *peer,
            kind,
            held: self.held.clone(),
        })
    }

    /// What the node last said about denying `peer`.
    pub fn denial(&self, peer: &PeerId) -> Denial {
        let denied = self
            .denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match denied.get(peer) {
            None => Denial::Unknown,
            Some((d, at)) => Denial::Known {
                denied: *d,
                stale: at.elapsed() >= if *d { DENIED_TTL } else { DENIAL_TTL },
            },
        }
    }

    /// Remember what the node said of `peer` (or, with `None`, that it is being asked again now,
    /// so only one refresh runs at a time).
    pub fn set_denial(&self, peer: &PeerId, denied: Option<bool>) {
        let mut map = self
            .denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_DENIAL_ENTRIES && !map.contains_key(peer) {
            map.retain(|_, (_, at)| at.elapsed() < DENIAL_TTL);
            if map.len() >= MAX_DENIAL_ENTRIES {
                map.clear();
            }
        }
        let now = Instant::now();
        match denied {
            Some(d) => {
                map.insert(*peer, (d, now));
            }
            None => {
                if let Some(e) = map.get_mut(peer) {
                    e.1 = now;
                }
            }
        }
    }

    /// The slots and shares this gate hands out.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Request slots `peer` holds now (for tests and metrics).
    pub fn held_by(&self, peer: &PeerId) -> (usize, usize) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.get(peer).map_or((0, 0), |c| (c[0], c[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_proto::v1::QueryRequest;
    use fold_proto::wire::{ChangesRequest, ForwardEnvelope, Operation, operation};
    use libp2p::identity::Keypair;

    fn gate(local: PeerId, budget: Budget) -> InboundGate {
        let metrics =
            SidecarMetrics::register(&mut prometheus_client::registry::Registry::default());
        InboundGate::new(
            local,
            None,
            Verifier::new(Duration::from_secs(30), 1 << 20),
            budget,
            metrics,
        )
    }

    fn request(key: &Keypair, target: PeerId, kind: operation::Kind) -> SignedEnvelope {
        let env = ForwardEnvelope {
            request_id: uuid::Uuid::new_v4().to_string(),
            origin_node_id: key.public().to_peer_id().to_string(),
            target_node_id: target.to_string(),
            timestamp_unix_ms: now_ms(),
            deadline_unix_ms: 0,
            requester: None,
            operation: Some(Operation { kind: Some(kind) }),
        };
        crate::signing::seal(key, &env, Default::default()).unwrap()
    }

    fn query() -> operation::Kind {
        operation::Kind::Query(QueryRequest {
            schema: "Notes".into(),
            ..Default::default()
        })
    }

    fn poll(wait_ms: u32) -> operation::Kind {
        operation::Kind::Changes(ChangesRequest {
            schema: "Notes".into(),
            wait_ms,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn one_peer_holds_at_most_its_share_and_others_still_get_in() {
        let local = PeerId::random();
        let g = gate(
            local,
            Budget {
                slots: 8,
                peer_share_percent: 25,
                long_polls: 4,
                long_polls_per_peer: 2,
            },
        );
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(
                g.admit(&pa, &request(&a, local, query()))
                    .await
                    .ok()
                    .unwrap(),
            );
        }
        let Err((_, e)) = g.admit(&pa, &request(&a, local, query())).await else {
            panic!("a third slot for one peer");
        };
        assert_eq!(e.code, Code::Unavailable as i32);
        assert!(e.message.contains("--inbound-peer-share"), "{}", e.message);
        // Another peer is not affected.
        let other = g
            .admit(&pb, &request(&b, local, query()))
            .await
            .ok()
            .unwrap();
        assert_eq!(g.held_by(&pa), (2, 0));
        // Released when dropped (the node answered).
        drop(held);
        assert_eq!(g.held_by(&pa), (0, 0));
        assert!(g.admit(&pa, &request(&a, local, query())).await.is_ok());
        drop(other);
    }

    #[tokio::test]
    async fn long_polls_never_take_request_slots() {
        let local = PeerId::random();
        let g = gate(
            local,
            Budget {
                slots: 2,
                peer_share_percent: 100,
                long_polls: 3,
                long_polls_per_peer: 2,
            },
        );
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (pa, pb) = (a.public().to_peer_id(), b.public().to_peer_id());
        let mut polls = Vec::new();
        for _ in 0..2 {
            let s = g
                .admit(&pa, &request(&a, local, poll(1000)))
                .await
                .ok()
                .unwrap();
            assert!(s.permit.is_long_poll());
            polls.push(s);
        }
        // Over its own long-poll share: refused, RESOURCE_EXHAUSTED (the asker retries).
        let Err((_, e)) = g.admit(&pa, &request(&a, local, poll(1000))).await else {
            panic!("a third long poll for one peer");
        };
        assert_eq!(e.code, Code::ResourceExhausted as i32);
        // A changes request that does not wait is a request; requests still get both slots.
        let now = g
            .admit(&pa, &request(&a, local, poll(0)))
            .await
            .ok()
            .unwrap();
        assert!(!now.permit.is_long_poll());
        let q = g
            .admit(&pb, &request(&b, local, query()))
            .await
            .ok()
            .unwrap();
        // The total long-poll budget: one left, for b.
        let lp = g
            .admit(&pb, &request(&b, local, poll(5)))
            .await
            .ok()
            .unwrap();
        assert!(g.admit(&pb, &request(&b, local, poll(5))).await.is_err());
        assert_eq!(g.held_by(&pa), (1, 2));
        drop((polls, now, q, lp));
        assert_eq!(g.held_by(&pa), (0, 0));
        assert_eq!(g.held_by(&pb), (0, 0));
    }

    #[tokio::test]
    async fn a_denied_peer_is_refused_before_it_takes_a_slot() {
        let local = PeerId::random();
        let g = gate(local, Budget::with_slots(4));
        let a = Keypair::generate_ed25519();
        let pa = a.public().to_peer_id();
        assert_eq!(g.denial(&pa), Denial::Unknown);
        g.set_denial(&pa, Some(true));
        let Err((_, e)) = g.admit(&pa, &request(&a, local, query())).await else {
            panic!("a denied peer was admitted");
        };
        assert_eq!(e.code, Code::PermissionDenied as i32);
        assert_eq!(g.held_by(&pa), (0, 0));
        g.set_denial(&pa, Some(false));
        assert!(g.admit(&pa, &request(&a, local, query())).await.is_ok());
    }

    #[test]
    fn the_share_is_at_least_one_slot() {
        assert_eq!(Budget::with_slots(256).per_peer_slots(), 64);
        assert_eq!(Budget::with_slots(1).per_peer_slots(), 1);
        let b = Budget {
            peer_share_percent: 100,
            ..Budget::with_slots(10)
        };
        assert_eq!(b.per_peer_slots(), 10);
    }
}
