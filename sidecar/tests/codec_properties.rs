//! Property tests of the wire codec and the signed envelope (stable Rust's stand-in for a
//! fuzzer): arbitrary bytes never panic the reader or the envelope check, whatever is written
//! reads back equal, and any change to signed bytes breaks verification.

use std::time::Duration;

use fold_proto::v1::QueryRequest;
use fold_proto::wire::{
    CheckSchemasRequest, ForwardEnvelope, Operation, Requester, SignedEnvelope, operation,
};
use futures::io::Cursor;
use p2p_sidecar::codec::{read_message, write_message};
use p2p_sidecar::signing::{Verifier, seal, verify_bytes};
use proptest::prelude::*;

fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

fn envelope(origin: String, id: String, fields: Vec<String>, ts: u64) -> ForwardEnvelope {
    ForwardEnvelope {
        request_id: id,
        origin_node_id: origin,
        target_node_id: "t".into(),
        timestamp_unix_ms: ts,
        deadline_unix_ms: 0,
        requester: Some(Requester {
            distance: 2,
            identity: "client:local".into(),
            proven_key: String::new(),
        }),
        operation: Some(Operation {
            kind: Some(operation::Kind::Query(QueryRequest {
                route: 0,
                page_size: 0,
                page_token: String::new(),
                json_values: false,
                schema: "S".into(),
                fields,
                filter: None,
                target_node_id: "t".into(),
                definition_hash: Default::default(),
                consistency: 0,
            })),
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes on a stream are refused with an error (or read as some message) — never
    /// a panic, never an allocation beyond the limit.
    #[test]
    fn reader_is_total(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let r = block(read_message::<SignedEnvelope, _>(&mut Cursor::new(bytes.clone()), 256));
        if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
        let _ = block(read_message::<CheckSchemasRequest, _>(&mut Cursor::new(bytes), 256));
    }

    /// The envelope check is total on arbitrary payload and signature bytes: it refuses them
    /// (they are not signed by the peer) and never panics.
    #[test]
    fn envelope_check_is_total(payload in prop::collection::vec(any::<u8>(), 0..512),
                               signature in prop::collection::vec(any::<u8>(), 0..80)) {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let v = Verifier::new(Duration::from_secs(30), 1 << 20);
        let env = SignedEnvelope { payload, signature, trace_context: Default::default() };
        prop_assert!(v.check(&peer, &env, 1_700_000_000_000).is_err());
    }

    /// What is written reads back equal, and any strict prefix of it is refused as truncated.
    #[test]
    fn roundtrip_and_truncation(id in ".{0,40}",
                                fields in prop::collection::vec("[a-z]{1,8}", 0..6),
                                ts in any::<u64>(), cut in any::<prop::sample::Index>()) {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let origin = key.public().to_peer_id().to_string();
        let msg = seal(&key, &envelope(origin, id, fields, ts), Default::default()).unwrap();
        let mut out = Cursor::new(Vec::new());
        block(write_message(&mut out, &msg, 1 << 16)).unwrap();
        let bytes = out.into_inner();
        let back: SignedEnvelope = block(read_message(&mut Cursor::new(bytes.clone()), 1 << 16)).unwrap();
        prop_assert_eq!(&back, &msg);
        let n = cut.index(bytes.len());
        let r = block(read_message::<SignedEnvelope, _>(&mut Cursor::new(bytes[..n].to_vec()), 1 << 16));
        prop_assert!(r.is_err(), "a {}-byte prefix of {} read as a message", n, bytes.len());
    }

    /// The signature covers every payload byte: flipping any bit breaks verification.
    #[test]
    fn any_change_breaks_the_signature(field in "[a-z]{1,10}", flip in any::<prop::sample::Index>(),
                                       bit in 0u8..8) {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let origin = key.public().to_peer_id().to_string();
        let mut msg = seal(&key, &envelope(origin, "r".into(), vec![field], 5), Default::default()).unwrap();
        prop_assert!(verify_bytes(&key.public(), &msg.payload, &msg.signature));
        let i = flip.index(msg.payload.len());
        msg.payload[i] ^= 1 << bit;
        prop_assert!(!verify_bytes(&key.public(), &msg.payload, &msg.signature));
    }
}
