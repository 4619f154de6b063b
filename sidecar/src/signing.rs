//! Signed forward envelopes (`/fold/forward/2.0.0`). The origin encodes its `ForwardEnvelope`
//! once and signs those bytes with its identity key, as libp2p's `signed_envelope` does; the
//! receiver verifies the bytes it received, then decodes them. Nothing is re-encoded for the
//! signature, so a field the receiver does not know can never break verification.
//!
//! The receiver checks, in this order: the header decodes and every id is within its length
//! limit, the claimed origin is the PeerId that Noise authenticated on the connection, the
//! signature verifies against that PeerId's key, the timestamp is within the allowed clock skew,
//! the deadline has not passed, and the request id (the nonce) was not seen before. A request
//! that fails any check changes nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use fold_proto::wire::{ForwardEnvelope, ForwardEnvelopeHeader, SignedEnvelope};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use prost::Message;
use tonic::Code;

const DOMAIN: &[u8] = b"fold-forward-v2\0";
pub use fold_proto::limits::{MAX_ID_BYTES, MAX_REQUESTER_BYTES};

/// Encode `envelope` once and sign the bytes with `key`.
pub fn seal(
    key: &Keypair,
    envelope: &ForwardEnvelope,
    trace_context: std::collections::HashMap<String, String>,
) -> Result<SignedEnvelope, String> {
    let mut buf = Vec::with_capacity(DOMAIN.len() + envelope.encoded_len());
    buf.extend_from_slice(DOMAIN);
    envelope
        .encode(&mut buf)
        .map_err(|e| format!("cannot encode the envelope: {e}"))?;
    let signature = key.sign(&buf).map_err(|e| format!("cannot sign: {e}"))?;
    buf.drain(..DOMAIN.len());
    Ok(SignedEnvelope {
        payload: buf,
        signature,
        trace_context,
    })
}

/// Does `signature` by `key` cover exactly `payload`?
pub fn verify_bytes(key: &PublicKey, payload: &[u8], signature: &[u8]) -> bool {
    if signature.is_empty() {
        return false;
    }
    key.verify(&signed_bytes(payload), signature)
}

/// What the origin signed: the domain tag, then the payload.
fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + payload.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(payload);
    msg
}

/// The public key inside an Ed25519 (identity-multihash) PeerId. Decoding it decompresses the
/// curve point (a field square root and inversion), so the result is cached per peer: see
/// [`identity_of`].
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    identity_of(peer).map(|i| i.key)
}

/// Decode the key inside `peer` without the cache.
fn decode_public_key(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

/// A peer's identity as the hot path needs it: its public key, already decoded (the Ed25519
/// point decompressed), and its id in base58, formatted once.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub key: PublicKey,
    pub id: Arc<str>,
    /// The same key as ed25519-dalek's `VerifyingKey` (what [`Batcher`] verifies with).
    verifying: Option<ed25519_dalek::VerifyingKey>,
}

/// Peers whose identity is kept decoded. The key is a pure function of the PeerId (an identity
/// multihash of the encoded key), so a cached entry can never be stale or wrong for its id.
pub const MAX_CACHED_IDENTITIES: usize = 4096;

/// Decoded identities, bounded: when full it is cleared and refills from the peers that are
/// still talking (a peer costs one decode more then, nothing else).
struct IdentityCache {
    max: usize,
    map: HashMap<PeerId, PeerIdentity>,
}

impl IdentityCache {
    fn new(max: usize) -> IdentityCache {
        IdentityCache {
            max: max.max(1),
            map: HashMap::new(),
        }
    }

    fn get(&mut self, peer: &PeerId) -> Option<PeerIdentity> {
        if let Some(i) = self.map.get(peer) {
            return Some(i.clone());
        }
        let key = decode_public_key(peer)?;
        let verifying = key
            .clone()
            .try_into_ed25519()
            .ok()
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k.to_bytes()).ok());
        let identity = PeerIdentity {
            key,
            id: peer.to_string().into(),
            verifying,
        };
        if self.map.len() >= self.max {
            self.map.clear();
        }
        self.map.insert(*peer, identity.clone());
        Some(identity)
    }
}

static IDENTITIES: LazyLock<Mutex<IdentityCache>> =
    LazyLock::new(|| Mutex::new(IdentityCache::new(MAX_CACHED_IDENTITIES)));

/// `peer`'s decoded key and base58 id (None when its id does not embed an Ed25519 key), from a
/// bounded process-wide cache.
pub fn identity_of(peer: &PeerId) -> Option<PeerIdentity> {
    IDENTITIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(peer)
}

/// `peer` in base58: from the identity cache, formatted only for a peer that has no cached
/// identity (an id that does not embed an Ed25519 key).
pub fn id_of(peer: &PeerId) -> Arc<str> {
    identity_of(peer).map_or_else(|| peer.to_string().into(), |i| i.id)
}

/// Signatures one batch verifies at most.
pub const MAX_BATCH: usize = 64;
/// Largest envelope payload verified in a batch; a larger one is verified alone (so the queue
/// holds at most `MAX_BATCH` × this much per stream's checks).
pub const MAX_BATCHED_PAYLOAD: usize = 16 * 1024;

/// Ed25519 verification in batches when requests queue up for it (issue 26: verification is the
/// largest CPU item of a forwarded request). Like group commit: a request that finds no
/// verification running leads a round; it first yields once, so the requests that are ready to
/// run (a burst of frames read from one stream) queue behind it, then verifies all of them with
/// one multiscalar multiplication (`ed25519_dalek::verify_batch`: about half the CPU per
/// signature at 16, see docs/BENCHMARKS.md). A lone request verifies alone, one trip through
/// the scheduler later; requests that arrive during a round queue for the next one, verified on
/// its own task. A batch that fails is verified again one signature at a time, so each request
/// gets exactly its own answer and a bad signature never fails a good one.
///
/// What a batch accepts: verify_batch checks the same equation as single verification for a
/// random linear combination of the signatures (coefficients derived from every input). It can
/// accept a signature that single verification refuses only when that signature's R carries a
/// small-order component, and producing such a signature takes the signing key: so an accepted
/// request was still signed by its origin's key, over exactly the bytes received (the request
/// id, the replay check's nonce, is inside those bytes). Written here because libp2p's
/// `PublicKey::verify` verifies one signature at a time.
///
/// At most `leaders` rounds run at once (half the cores, at least one), so verification never
/// takes every core. The queue is bounded by its callers: each inbound stream has at most
/// `MAX_BATCH` checks under way, and only envelopes up to [`MAX_BATCHED_PAYLOAD`] are batched.
pub struct Batcher {
    state: Mutex<BatchState>,
    leaders: usize,
    /// Told the size of each round's batch (a metric).
    observe: Option<BatchObserver>,
}

/// What is told the size of each verification round.
pub type BatchObserver = Box<dyn Fn(usize) + Send + Sync>;

struct BatchState {
    running: usize,
    queue: Vec<BatchJob>,
}

struct BatchJob {
    key: ed25519_dalek::VerifyingKey,
    message: Vec<u8>,
    signature: ed25519_dalek::Signature,
    done: tokio::sync::oneshot::Sender<bool>,
}

impl Batcher {
    /// A batcher running at most `leaders` verification rounds at once.
    pub fn new(leaders: usize) -> Arc<Batcher> {
        Batcher::observed(leaders, None)
    }

    /// A batcher that tells `observe` the size of each round.
    pub fn observed(leaders: usize, observe: Option<BatchObserver>) -> Arc<Batcher> {
        Arc::new(Batcher {
            state: Mutex::new(BatchState {
                running: 0,
                queue: Vec::new(),
            }),
            leaders: leaders.max(1),
            observe,
        })
    }

    /// Half this machine's cores, at least one.
    pub fn leaders_for_this_machine() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        (cores / 2).max(1)
    }

    /// A batcher with [`Batcher::leaders_for_this_machine`] rounds at once.
    pub fn for_this_machine() -> Arc<Batcher> {
        Batcher::new(Batcher::leaders_for_this_machine())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Does `signature` by `key` cover exactly `message`?
    pub async fn verify(
        self: &Arc<Self>,
        key: ed25519_dalek::VerifyingKey,
        message: Vec<u8>,
        signature: ed25519_dalek::Signature,
    ) -> bool {
        let (done, rx) = tokio::sync::oneshot::channel();
        let leads = {
            let mut st = self.state();
            st.queue.push(BatchJob {
                key,
                message,
                signature,
                done,
            });
            let leads = st.running < self.leaders;
            if leads {
                st.running += 1;
            }
            leads
        };
        if leads {
            let mut round = Leading(Some(self.clone()));
            // Let the requests that are ready to run queue behind this one first (a burst of
            // frames read from one stream is spawned before any of them runs): one batch then
            // verifies them all. Alone, this costs one pass through the scheduler.
            tokio::task::yield_now().await;
            round.batch();
            if !round.let_go_if_idle() {
                // What queued meanwhile is verified on its own task, so this answer (and the
                // others of the first batch) do not wait for it.
                tokio::spawn(async move {
                    while round.batch() {
                        tokio::task::yield_now().await;
                    }
                });
            }
        }
        // Answered by the round that takes the job (a dropped sender: refused).
        rx.await.unwrap_or(false)
    }

    /// Up to [`MAX_BATCH`] queued jobs; `None` (and the leader's place given up, under the same
    /// lock, so no job is ever queued without a round to take it) when none is queued.
    fn take_batch(&self) -> Option<Vec<BatchJob>> {
        let mut st = self.state();
        if st.queue.is_empty() {
            st.running = st.running.saturating_sub(1);
            return None;
        }
        let n = st.queue.len().min(MAX_BATCH);
        Some(st.queue.drain(..n).collect())
    }
}

/// A verification round that leads. Dropped while it still leads (its task cancelled at a
/// yield), it verifies whatever is queued at once and lets go, so no job is left unanswered.
struct Leading(Option<Arc<Batcher>>);

impl Leading {
    /// Verify the next batch; false once the queue was empty (the round has let go).
    fn batch(&mut self) -> bool {
        let Some(b) = &self.0 else {
            return false;
        };
        match b.take_batch() {
            Some(jobs) => {
                if let Some(observe) = &b.observe {
                    observe(jobs.len());
                }
                verify_jobs(jobs);
                true
            }
            None => {
                self.0 = None;
                false
            }
        }
    }

    /// Let go when nothing is queued (checked under the lock); true when it did.
    fn let_go_if_idle(&mut self) -> bool {
        let Some(b) = &self.0 else {
            return true;
        };
        let mut st = b.state();
        if !st.queue.is_empty() {
            return false;
        }
        st.running = st.running.saturating_sub(1);
        drop(st);
        self.0 = None;
        true
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        while self.batch() {}
    }
}

/// Verify `batch` together; when the batch fails, each alone.
fn verify_jobs(batch: Vec<BatchJob>) {
    let together = batch.len() > 1 && {
        let messages: Vec<&[u8]> = batch.iter().map(|j| j.message.as_slice()).collect();
        let signatures: Vec<_> = batch.iter().map(|j| j.signature).collect();
        let keys: Vec<_> = batch.iter().map(|j| j.key).collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    };
    for j in batch {
        let ok =
            together || ed25519_dalek::Verifier::verify(&j.key, &j.message, &j.signature).is_ok();
        let _ = j.done.send(ok);
    }
}

fn bad_signature() -> (Rejection, String) {
    (
        Rejection::BadSignature,
        "the envelope's signature does not verify against its origin's key".into(),
    )
}

/// Why an inbound envelope was refused; each has a metric label and a gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    Oversized,
    WrongOrigin,
    BadSignature,
    Stale,
    Expired,
    Replayed,
    ReplayCacheFull,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Oversized => "oversized_field",
            Rejection::WrongOrigin => "wrong_origin",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale",
            Rejection::Expired => "deadline_exceeded",
            Rejection::Replayed => "replayed",
            Rejection::ReplayCacheFull => "replay_cache_full",
        }
    }

    pub fn code(self) -> Code {
        match self {
            Rejection::Malformed | Rejection::Oversized => Code::InvalidArgument,
            Rejection::WrongOrigin
            | Rejection::BadSignature
            | Rejection::Stale
            | Rejection::Replayed => Code::Unauthenticated,
            Rejection::Expired => Code::DeadlineExceeded,
            Rejection::ReplayCacheFull => Code::ResourceExhausted,
        }
    }
}

/// Check the length limits of an envelope header (`fold_proto::limits`, shared with the node).
pub fn check_bounds(h: &ForwardEnvelopeHeader) -> Result<(), String> {
    fold_proto::limits::check_envelope(
        &h.request_id,
        &h.origin_node_id,
        &h.target_node_id,
        h.requester.as_ref(),
    )
}

/// Remembered request ids, bounded in bytes. An id is kept while a replay of it could still pass
/// the clock-skew check; when the cache is full, new requests are refused rather than evicting an
/// id that is still inside its window (which would reopen that replay).
struct ReplayCache {
    window_ms: u64,
    max_bytes: usize,
    bytes: usize,
    seen: HashSet<(PeerId, Box<str>)>,
    order: VecDeque<(u64, PeerId, Box<str>)>,
}

impl ReplayCache {
    /// Memory one entry holds: the id twice (set and queue) and both containers' slots.
    fn cost(id: &str) -> usize {
        2 * id.len()
            + std::mem::size_of::<(PeerId, Box<str>)>()
            + std::mem::size_of::<(u64, PeerId, Box<str>)>()
            + 16
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((t, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*t) <= self.window_ms {
                break;
            }
            if let Some((_, p, id)) = self.order.pop_front() {
                self.bytes = self.bytes.saturating_sub(Self::cost(&id));
                self.seen.remove(&(p, id));
            }
        }
    }

    fn insert(&mut self, peer: PeerId, id: &str, now_ms: u64) -> Result<(), Rejection> {
        self.expire(now_ms);
        let key = (peer, Box::<str>::from(id));
        if self.seen.contains(&key) {
            return Err(Rejection::Replayed);
        }
        let cost = Self::cost(id);
        if self.bytes + cost > self.max_bytes {
            return Err(Rejection::ReplayCacheFull);
        }
        self.bytes += cost;
        self.order.push_back((now_ms, peer, key.1.clone()));
        self.seen.insert(key);
        Ok(())
    }
}

/// Checks inbound envelopes and remembers their nonces. Shared by every inbound stream's task:
/// the checks (decoding, the signature) run without a lock, in parallel; only the nonce's insert
/// into the replay cache takes one.
pub struct Verifier {
    max_skew_ms: u64,
    cache: Mutex<ReplayCache>,
    /// The replay cache's bytes after the last insert, readable without its lock.
    cache_bytes: std::sync::atomic::AtomicUsize,
}

impl Verifier {
    /// `max_replay_bytes` bounds the memory of remembered request ids.
    pub fn new(max_skew: Duration, max_replay_bytes: usize) -> Verifier {
        let max_skew_ms = u64::try_from(max_skew.as_millis()).unwrap_or(u64::MAX);
        Verifier {
            max_skew_ms,
            cache: Mutex::new(ReplayCache {
                // A replay passes the skew check until its timestamp is `skew` old; an id seen
                // at `now` may carry a timestamp up to `skew` ahead: keep it twice that long.
                window_ms: max_skew_ms.saturating_mul(2),
                max_bytes: max_replay_bytes,
                bytes: 0,
                seen: HashSet::new(),
                order: VecDeque::new(),
            }),
            cache_bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Bytes the replay cache held after its last insert.
    pub fn replay_cache_bytes(&self) -> usize {
        self.cache_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Check an envelope from the authenticated `peer` at time `now_ms`; on success its nonce is
    /// remembered and its header returned.
    pub fn check(
        &self,
        peer: &PeerId,
        env: &SignedEnvelope,
        now_ms: u64,
    ) -> Result<ForwardEnvelopeHeader, (Rejection, String)> {
        let (header, identity) = self.before_signature(peer, env)?;
        if !verify_bytes(&identity.key, &env.payload, &env.signature) {
            return Err(bad_signature());
        }
        self.after_signature(peer, header, now_ms)
    }

    /// [`Verifier::check`], with the signature verified by `batcher` (in a batch when requests
    /// queue up for verification). `now_ms` is read once the signature is verified.
    pub async fn check_batched(
        &self,
        peer: &PeerId,
        env: &SignedEnvelope,
        batcher: &Arc<Batcher>,
        now_ms: impl FnOnce() -> u64,
    ) -> Result<ForwardEnvelopeHeader, (Rejection, String)> {
        let (header, identity) = self.before_signature(peer, env)?;
        let verified = match (
            env.payload.len() <= MAX_BATCHED_PAYLOAD,
            identity.verifying,
            ed25519_dalek::Signature::from_slice(&env.signature),
        ) {
            (true, Some(key), Ok(signature)) => {
                batcher
                    .verify(key, signed_bytes(&env.payload), signature)
                    .await
            }
            // A large payload (hashing it costs more than the curve arithmetic a batch saves,
            // and its copy would wait in the queue), or a key or signature the batcher cannot
            // take: verified alone, exactly as `check` does.
            _ => verify_bytes(&identity.key, &env.payload, &env.signature),
        };
        if !verified {
            return Err(bad_signature());
        }
        self.after_signature(peer, header, now_ms())
    }

    /// The checks before the signature: the header decodes, its ids are within their limits, the
    /// claimed origin is `peer`, and `peer` has a key to verify against.
    fn before_signature(
        &self,
        peer: &PeerId,
        env: &SignedEnvelope,
    ) -> Result<(ForwardEnvelopeHeader, PeerIdentity), (Rejection, String)> {
        let header = ForwardEnvelopeHeader::decode(env.payload.as_slice()).map_err(|e| {
            (
                Rejection::Malformed,
                format!("the envelope's payload is not a ForwardEnvelope: {e}"),
            )
        })?;
        check_bounds(&header).map_err(|m| (Rejection::Oversized, m))?;
        // The peer's id as a string and its decoded key come from the cache: no base58
        // formatting and no point decompression per request.
        let identity = identity_of(peer);
        let same_origin = match &identity {
            Some(i) => header.origin_node_id == *i.id,
            None => header.origin_node_id == peer.to_string(),
        };
        if !same_origin {
            return Err((
                Rejection::WrongOrigin,
                format!(
                    "origin {} does not match the authenticated peer {peer}",
                    header.origin_node_id
                ),
            ));
        }
        let Some(identity) = identity else {
            return Err((
                Rejection::BadSignature,
                format!("peer {peer} has no Ed25519 identity to verify against"),
            ));
        };
        Ok((header, identity))
    }

    /// The checks after the signature: freshness, the deadline, and the nonce (remembered when
    /// everything passed).
    fn after_signature(
        &self,
        peer: &PeerId,
        header: ForwardEnvelopeHeader,
        now_ms: u64,
    ) -> Result<ForwardEnvelopeHeader, (Rejection, String)> {
        let ts = header.timestamp_unix_ms;
        if ts.abs_diff(now_ms) > self.max_skew_ms {
            return Err((
                Rejection::Stale,
                format!(
                    "request timestamp {ts} is {} ms away from this node's clock (allowed: {} ms)",
                    ts.abs_diff(now_ms),
                    self.max_skew_ms
                ),
            ));
        }
        if header.deadline_unix_ms != 0 && header.deadline_unix_ms <= now_ms {
            return Err((
                Rejection::Expired,
                format!(
                    "the request arrived {} ms after its deadline; nothing was done",
                    now_ms - header.deadline_unix_ms
                ),
            ));
        }
        if header.request_id.is_empty() {
            return Err((
                Rejection::Replayed,
                "the request id (nonce) is empty".into(),
            ));
        }
        let inserted = {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = cache.insert(*peer, &header.request_id, now_ms);
            self.cache_bytes
                .store(cache.bytes, std::sync::atomic::Ordering::Relaxed);
            r
        };
        inserted.map_err(|why| {
            let msg = match why {
                Rejection::Replayed => {
                    format!("request id '{}' was already used", header.request_id)
                }
                _ => "this node's replay cache is full; retry shortly".to_string(),
            };
            (why, msg)
        })?;
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_proto::v1::QueryRequest;
    use fold_proto::wire::{Operation, Requester, operation};

    const MB: usize = 1 << 20;

    fn envelope(key: &Keypair, id: &str, ts: u64) -> ForwardEnvelope {
        ForwardEnvelope {
            request_id: id.into(),
            origin_node_id: key.public().to_peer_id().to_string(),
            target_node_id: "target".into(),
            timestamp_unix_ms: ts,
            deadline_unix_ms: 0,
            requester: Some(Requester {
                distance: 3,
                identity: "client:local".into(),
                proven_key: String::new(),
            }),
            operation: Some(Operation {
                kind: Some(operation::Kind::Query(QueryRequest {
                    route: 0,
                    page_size: 0,
                    page_token: String::new(),
                    json_values: false,
                    schema: "Notes".into(),
                    fields: vec!["body".into()],
                    filter: None,
                    target_node_id: "target".into(),
                    definition_hash: Default::default(),
                    consistency: 0,
                })),
            }),
        }
    }

    fn signed(key: &Keypair, id: &str, ts: u64) -> SignedEnvelope {
        seal(key, &envelope(key, id, ts), Default::default()).unwrap()
    }

    #[test]
    fn accepts_good_and_refuses_each_attack() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let now = 1_700_000_000_000;
        let v = Verifier::new(Duration::from_secs(30), MB);

        let mut ok = signed(&key, "r1", now);
        ok.trace_context.insert("traceparent".into(), "x".into());
        let h = v
            .check(&peer, &ok, now)
            .expect("trace context is not signed");
        assert_eq!(h.requester.unwrap().distance, 3);
        assert_eq!(v.check(&peer, &ok, now).unwrap_err().0, Rejection::Replayed);

        // Any change to the payload breaks the signature (here: the requester's distance).
        let mut env = envelope(&key, "r2", now);
        let mut tampered = seal(&key, &env, Default::default()).unwrap();
        env.requester.as_mut().unwrap().distance = 0;
        tampered.payload = env.encode_to_vec();
        assert_eq!(
            v.check(&peer, &tampered, now).unwrap_err().0,
            Rejection::BadSignature
        );

        let stale = signed(&key, "r4", now - 60_000);
        assert_eq!(v.check(&peer, &stale, now).unwrap_err().0, Rejection::Stale);
        let future = signed(&key, "r5", now + 60_000);
        assert_eq!(
            v.check(&peer, &future, now).unwrap_err().0,
            Rejection::Stale
        );

        let forged = signed(&key, "r6", now);
        assert_eq!(
            v.check(&other, &forged, now).unwrap_err().0,
            Rejection::WrongOrigin
        );

        let mut unsigned = signed(&key, "r7", now);
        unsigned.signature.clear();
        assert_eq!(
            v.check(&peer, &unsigned, now).unwrap_err().0,
            Rejection::BadSignature
        );

        let mut late = envelope(&key, "r8", now - 10);
        late.deadline_unix_ms = now - 1;
        let late = seal(&key, &late, Default::default()).unwrap();
        assert_eq!(
            v.check(&peer, &late, now).unwrap_err().0,
            Rejection::Expired
        );

        let mut long = envelope(&key, &"x".repeat(MAX_ID_BYTES + 1), now);
        let r = v.check(&peer, &seal(&key, &long, Default::default()).unwrap(), now);
        assert_eq!(r.unwrap_err().0, Rejection::Oversized);
        long.request_id = "r9".into();
        long.requester.as_mut().unwrap().identity = "y".repeat(MAX_REQUESTER_BYTES + 1);
        let r = v.check(&peer, &seal(&key, &long, Default::default()).unwrap(), now);
        assert_eq!(r.unwrap_err().0, Rejection::Oversized);

        let garbage = SignedEnvelope {
            payload: vec![0xff, 0xff, 0xff],
            signature: vec![1],
            trace_context: Default::default(),
        };
        assert_eq!(
            v.check(&peer, &garbage, now).unwrap_err().0,
            Rejection::Malformed
        );

        // A refused request does not burn its nonce; a fresh good one passes.
        assert!(v.check(&peer, &signed(&key, "r2", now), now).is_ok());
    }

    #[test]
    fn an_unknown_field_does_not_break_verification() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let now = 1_700_000_000_000;
        // A newer sender's envelope: the known fields plus field 99 (a string).
        let mut payload = envelope(&key, "n1", now).encode_to_vec();
        prost::encoding::string::encode(99, &"from the future".to_string(), &mut payload);
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&payload);
        let env = SignedEnvelope {
            signature: key.sign(&msg).unwrap(),
            payload,
            trace_context: Default::default(),
        };
        let v = Verifier::new(Duration::from_secs(30), MB);
        assert!(v.check(&peer, &env, now).is_ok());
        assert!(ForwardEnvelope::decode(env.payload.as_slice()).is_ok());
    }

    #[test]
    fn the_identity_cache_is_bounded_and_matches_the_peer() {
        let mut c = IdentityCache::new(3);
        let peers: Vec<PeerId> = (0..10)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        for p in &peers {
            let i = c.get(p).expect("an Ed25519 peer has a key");
            assert_eq!(i.key.to_peer_id(), *p);
            assert_eq!(&*i.id, p.to_string().as_str());
            assert!(c.map.len() <= 3);
        }
        // Served from the cache: the same answer as a fresh decode.
        let again = c.get(&peers[9]).expect("cached");
        assert_eq!(again.key.to_peer_id(), peers[9]);
        // A PeerId that does not embed a key (a sha256 multihash) has none, and is not cached.
        let hashed = PeerId::random();
        assert!(c.get(&hashed).is_none());
        assert!(c.map.len() <= 3 && !c.map.contains_key(&hashed));
    }

    #[test]
    fn a_cached_key_still_refuses_a_wrong_signature() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let intruder = Keypair::generate_ed25519();
        let now = 1_700_000_000_000;
        let v = Verifier::new(Duration::from_secs(30), MB);
        // The first request puts the peer's key into the cache.
        assert!(v.check(&peer, &signed(&key, "c1", now), now).is_ok());
        assert!(identity_of(&peer).is_some());
        // The same header signed by another key: refused against the cached key.
        let mut forged = seal(&intruder, &envelope(&key, "c2", now), Default::default()).unwrap();
        assert_eq!(
            v.check(&peer, &forged, now).unwrap_err().0,
            Rejection::BadSignature
        );
        forged.signature[0] ^= 1;
        assert_eq!(
            v.check(&peer, &forged, now).unwrap_err().0,
            Rejection::BadSignature
        );
        // And claiming another origin is still caught before the signature.
        let other = intruder.public().to_peer_id();
        let theirs = signed(&intruder, "c3", now);
        assert_eq!(
            v.check(&peer, &theirs, now).unwrap_err().0,
            Rejection::WrongOrigin
        );
        assert!(v.check(&other, &theirs, now).is_ok());
        // The refused nonce was not burnt.
        assert!(v.check(&peer, &signed(&key, "c2", now), now).is_ok());
    }

    #[test]
    fn the_replay_cache_is_bounded_in_bytes_and_never_evicts_a_live_nonce() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let now = 1_700_000_000_000;
        let room = 10 * ReplayCache::cost("r00");
        let v = Verifier::new(Duration::from_secs(30), room);
        for i in 0..10 {
            assert!(
                v.check(&peer, &signed(&key, &format!("r{i:02}"), now), now)
                    .is_ok()
            );
        }
        assert!(v.replay_cache_bytes() <= room);
        // Full: the new request is refused, and the old nonces still are replays.
        let e = v.check(&peer, &signed(&key, "r10", now), now).unwrap_err();
        assert_eq!(e.0, Rejection::ReplayCacheFull);
        assert_eq!(
            v.check(&peer, &signed(&key, "r00", now), now)
                .unwrap_err()
                .0,
            Rejection::Replayed
        );
        // Once the window has passed, the old ids are forgotten and there is room again.
        let later = now + 61_000;
        assert!(v.check(&peer, &signed(&key, "r10", later), later).is_ok());
        assert!(v.replay_cache_bytes() < room);
    }

    fn job(
        key: &Keypair,
        message: &[u8],
        signed: &[u8],
    ) -> (BatchJob, tokio::sync::oneshot::Receiver<bool>) {
        let (done, rx) = tokio::sync::oneshot::channel();
        let pk = key.public().try_into_ed25519().unwrap();
        let signature = key.sign(signed).unwrap();
        let job = BatchJob {
            key: ed25519_dalek::VerifyingKey::from_bytes(&pk.to_bytes()).unwrap(),
            message: message.to_vec(),
            signature: ed25519_dalek::Signature::from_slice(&signature).unwrap(),
            done,
        };
        (job, rx)
    }

    /// One bad signature in a batch fails only itself.
    #[test]
    fn a_bad_signature_fails_alone_in_its_batch() {
        let keys: Vec<_> = (0..8).map(|_| Keypair::generate_ed25519()).collect();
        let mut jobs = Vec::new();
        let mut answers = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let msg = format!("request {i}");
            // Request 5 is signed over other bytes than it carries.
            let signed = if i == 5 {
                "forged".to_string()
            } else {
                msg.clone()
            };
            let (j, rx) = job(k, msg.as_bytes(), signed.as_bytes());
            jobs.push(j);
            answers.push(rx);
        }
        verify_jobs(jobs);
        for (i, mut rx) in answers.into_iter().enumerate() {
            assert_eq!(rx.try_recv().unwrap(), i != 5, "request {i}");
        }
        // A whole good batch passes together.
        let (jobs, answers): (Vec<_>, Vec<_>) = keys
            .iter()
            .map(|k| job(k, b"same bytes", b"same bytes"))
            .unzip();
        verify_jobs(jobs);
        for mut rx in answers {
            assert!(rx.try_recv().unwrap());
        }
    }

    /// Under concurrency every request gets its own answer, and the envelope checks around the
    /// signature are the same as unbatched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_checks_answer_every_request_exactly() {
        let batcher = Batcher::new(1);
        let v = Arc::new(Verifier::new(Duration::from_secs(30), MB));
        let now = 1_700_000_000_000;
        let mut tasks = Vec::new();
        for i in 0..120 {
            let key = Keypair::generate_ed25519();
            let peer = key.public().to_peer_id();
            let mut env = signed(&key, &format!("b{i}"), now);
            let good = i % 7 != 3;
            if !good {
                // Tampered after signing.
                let mut e = envelope(&key, &format!("b{i}"), now);
                e.requester.as_mut().unwrap().distance = 0;
                env.payload = e.encode_to_vec();
            }
            let (batcher, v) = (batcher.clone(), v.clone());
            tasks.push(tokio::spawn(async move {
                let r = v.check_batched(&peer, &env, &batcher, || now).await;
                (good, r.map_err(|e| e.0))
            }));
        }
        for t in tasks {
            let (good, r) = t.await.unwrap();
            if good {
                assert!(r.is_ok(), "{r:?}");
            } else {
                assert_eq!(r.unwrap_err(), Rejection::BadSignature);
            }
        }
        // Every round ends (the last one just after its last answer): a new request leads.
        for _ in 0..200 {
            if batcher.state().running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(batcher.state().running, 0);
        assert!(batcher.state().queue.is_empty());
        // A large envelope is verified alone (never queued), with the same answers.
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = rounds.clone();
        let observed = Batcher::observed(
            1,
            Some(Box::new(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })),
        );
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut big = envelope(&key, "big", now);
        if let Some(Operation {
            kind: Some(operation::Kind::Query(q)),
        }) = big.operation.as_mut()
        {
            q.fields = vec!["f".repeat(MAX_BATCHED_PAYLOAD)];
        }
        let sealed = seal(&key, &big, Default::default()).unwrap();
        assert!(sealed.payload.len() > MAX_BATCHED_PAYLOAD);
        assert!(
            v.check_batched(&peer, &sealed, &observed, || now)
                .await
                .is_ok()
        );
        let mut tampered = sealed.clone();
        big.request_id = "big2".into();
        tampered.payload = big.encode_to_vec();
        let refused = v.check_batched(&peer, &tampered, &observed, || now).await;
        assert_eq!(refused.unwrap_err().0, Rejection::BadSignature);
        assert_eq!(rounds.load(std::sync::atomic::Ordering::Relaxed), 0);
        // A small one goes through a round.
        let small = signed(&key, "small", now);
        assert!(
            v.check_batched(&peer, &small, &observed, || now)
                .await
                .is_ok()
        );
        assert_eq!(rounds.load(std::sync::atomic::Ordering::Relaxed), 1);
        // A replay is still refused after a batched check.
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let env = signed(&key, "again", now);
        assert!(v.check_batched(&peer, &env, &batcher, || now).await.is_ok());
        let again = v.check_batched(&peer, &env, &batcher, || now).await;
        assert_eq!(again.unwrap_err().0, Rejection::Replayed);
    }
}
