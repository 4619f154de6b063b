//! Signed forward requests. The origin signs every `/fold/forward/1.0.0` request with its
//! identity key; the receiver checks, in this order: the claimed origin is the PeerId that Noise
//! authenticated on the connection, the signature verifies against that PeerId's public key, the
//! timestamp is within the allowed clock skew, and the request id (the nonce) was not seen
//! before. A request that fails any check changes nothing and is answered `UNAUTHENTICATED`.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use fold_proto::wire::ForwardRequest;
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use prost::Message;

const DOMAIN: &[u8] = b"fold-forward-v1\0";
/// Most remembered request ids; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 200_000;

/// The bytes a signature covers: everything but the signature and the trace context.
pub fn signed_bytes(req: &ForwardRequest) -> Vec<u8> {
    let mut unsigned = req.clone();
    unsigned.signature.clear();
    unsigned.trace_context.clear();
    let mut out = Vec::with_capacity(DOMAIN.len() + unsigned.encoded_len());
    out.extend_from_slice(DOMAIN);
    unsigned.encode(&mut out).ok();
    out
}

/// Sign `req` in place with `key`.
pub fn sign(key: &Keypair, req: &mut ForwardRequest) -> Result<(), String> {
    req.signature = key
        .sign(&signed_bytes(req))
        .map_err(|e| format!("cannot sign: {e}"))?;
    Ok(())
}

/// The public key inside an Ed25519 (identity-multihash) PeerId.
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    WrongOrigin,
    BadSignature,
    Stale,
    Replayed,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::WrongOrigin => "wrong_origin",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale => "stale",
            Rejection::Replayed => "replayed",
        }
    }
}

/// Checks inbound requests and remembers their nonces.
pub struct Verifier {
    max_skew_ms: u64,
    seen: HashSet<(PeerId, String)>,
    order: VecDeque<(u64, PeerId, String)>,
}

impl Verifier {
    pub fn new(max_skew: Duration) -> Verifier {
        Verifier {
            max_skew_ms: max_skew.as_millis() as u64,
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Check a request from the authenticated `peer` at time `now_ms`; on success its nonce is
    /// remembered.
    pub fn check(
        &mut self,
        peer: &PeerId,
        req: &ForwardRequest,
        now_ms: u64,
    ) -> Result<(), (Rejection, String)> {
        if req.origin_node_id != peer.to_string() {
            return Err((
                Rejection::WrongOrigin,
                format!(
                    "origin {} does not match the authenticated peer {peer}",
                    req.origin_node_id
                ),
            ));
        }
        let Some(key) = public_key_of(peer) else {
            return Err((
                Rejection::BadSignature,
                format!("peer {peer} has no Ed25519 identity to verify against"),
            ));
        };
        if req.signature.is_empty() || !key.verify(&signed_bytes(req), &req.signature) {
            return Err((
                Rejection::BadSignature,
                "the request's signature does not verify against its origin's key".into(),
            ));
        }
        let ts = req.timestamp_unix_ms;
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
        // Forget nonces that can no longer be replayed (their timestamps are now stale).
        while let Some((t, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*t) > 2 * self.max_skew_ms
                || self.order.len() >= MAX_REMEMBERED
            {
                if let Some((_, p, id)) = self.order.pop_front() {
                    self.seen.remove(&(p, id));
                }
            } else {
                break;
            }
        }
        let key = (*peer, req.request_id.clone());
        if req.request_id.is_empty() || self.seen.contains(&key) {
            return Err((
                Rejection::Replayed,
                format!("request id '{}' was already used", req.request_id),
            ));
        }
        self.seen.insert(key);
        self.order
            .push_back((now_ms, *peer, req.request_id.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_proto::v1::QueryRequest;
    use fold_proto::wire::forward_request::Operation;

    fn request(key: &Keypair, id: &str, ts: u64) -> ForwardRequest {
        let mut r = ForwardRequest {
            request_id: id.into(),
            origin_node_id: key.public().to_peer_id().to_string(),
            target_node_id: "target".into(),
            timestamp_unix_ms: ts,
            trace_context: Default::default(),
            operation: Some(Operation::Query(QueryRequest {
                schema: "Notes".into(),
                fields: vec!["body".into()],
                filter: None,
                target_node_id: "target".into(),
            })),
            signature: vec![],
        };
        sign(key, &mut r).unwrap();
        r
    }

    #[test]
    fn accepts_good_and_refuses_each_attack() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let other = Keypair::generate_ed25519().public().to_peer_id();
        let now = 1_700_000_000_000;
        let mut v = Verifier::new(Duration::from_secs(30));

        let mut ok = request(&key, "r1", now);
        ok.trace_context.insert("traceparent".into(), "x".into());
        assert!(
            v.check(&peer, &ok, now).is_ok(),
            "trace context is not signed"
        );
        assert_eq!(v.check(&peer, &ok, now).unwrap_err().0, Rejection::Replayed);

        let mut tampered = request(&key, "r2", now);
        if let Some(Operation::Query(q)) = &mut tampered.operation {
            q.fields.push("secret".into());
        }
        assert_eq!(
            v.check(&peer, &tampered, now).unwrap_err().0,
            Rejection::BadSignature
        );

        let mut retarget = request(&key, "r3", now);
        retarget.target_node_id = "elsewhere".into();
        assert_eq!(
            v.check(&peer, &retarget, now).unwrap_err().0,
            Rejection::BadSignature
        );

        let stale = request(&key, "r4", now - 60_000);
        assert_eq!(v.check(&peer, &stale, now).unwrap_err().0, Rejection::Stale);
        let future = request(&key, "r5", now + 60_000);
        assert_eq!(
            v.check(&peer, &future, now).unwrap_err().0,
            Rejection::Stale
        );

        let forged = request(&key, "r6", now);
        assert_eq!(
            v.check(&other, &forged, now).unwrap_err().0,
            Rejection::WrongOrigin
        );

        let mut unsigned = request(&key, "r7", now);
        unsigned.signature.clear();
        assert_eq!(
            v.check(&peer, &unsigned, now).unwrap_err().0,
            Rejection::BadSignature
        );

        // A refused request does not burn its nonce; a fresh good one passes.
        assert!(v.check(&peer, &request(&key, "r2", now), now).is_ok());
    }
}
