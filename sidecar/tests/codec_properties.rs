//! Property tests of the wire codec and the signature check (stable Rust's stand-in for a
//! fuzzer): arbitrary bytes never panic the reader, and whatever is written reads back equal.

use fold_proto::v1::QueryRequest;
use fold_proto::wire::{CheckSchemasRequest, ForwardRequest, forward_request::Operation};
use futures::io::Cursor;
use p2p_sidecar::codec::{read_message, write_message};
use proptest::prelude::*;

fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes on a stream are refused with an error (or read as some message) — never
    /// a panic, never an allocation beyond the limit.
    #[test]
    fn reader_is_total(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let r = block(read_message::<ForwardRequest, _>(&mut Cursor::new(bytes.clone()), 256));
        if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
        let _ = block(read_message::<CheckSchemasRequest, _>(&mut Cursor::new(bytes), 256));
    }

    /// What is written reads back equal, and any strict prefix of it is refused as truncated.
    #[test]
    fn roundtrip_and_truncation(id in ".{0,40}", schema in "[A-Za-z]{0,20}",
                                fields in prop::collection::vec("[a-z]{1,8}", 0..6),
                                ts in any::<u64>(), sig in prop::collection::vec(any::<u8>(), 0..64),
                                cut in any::<prop::sample::Index>()) {
        let msg = ForwardRequest {
            request_id: id,
            origin_node_id: "o".into(),
            target_node_id: "t".into(),
            timestamp_unix_ms: ts,
            trace_context: Default::default(),
            operation: Some(Operation::Query(QueryRequest { schema, fields, filter: None, target_node_id: "t".into() })),
            signature: sig,
        };
        let mut out = Cursor::new(Vec::new());
        block(write_message(&mut out, &msg, 1 << 16)).unwrap();
        let bytes = out.into_inner();
        let back: ForwardRequest = block(read_message(&mut Cursor::new(bytes.clone()), 1 << 16)).unwrap();
        prop_assert_eq!(&back, &msg);
        let n = cut.index(bytes.len());
        let r = block(read_message::<ForwardRequest, _>(&mut Cursor::new(bytes[..n].to_vec()), 1 << 16));
        prop_assert!(r.is_err(), "a {}-byte prefix of {} read as a message", n, bytes.len());
    }

    /// A signature covers every byte that matters: flipping any bit of a signed request's
    /// signed bytes breaks verification.
    #[test]
    fn any_change_breaks_the_signature(field in "[a-z]{1,10}", flip in any::<prop::sample::Index>()) {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mut msg = ForwardRequest {
            request_id: "r".into(),
            origin_node_id: key.public().to_peer_id().to_string(),
            target_node_id: "t".into(),
            timestamp_unix_ms: 5,
            trace_context: Default::default(),
            operation: Some(Operation::Query(QueryRequest { schema: "S".into(), fields: vec![field], filter: None, target_node_id: "t".into() })),
            signature: vec![],
        };
        p2p_sidecar::signing::sign(&key, &mut msg).unwrap();
        let mut bytes = p2p_sidecar::signing::signed_bytes(&msg);
        prop_assert!(key.public().verify(&bytes, &msg.signature));
        let i = flip.index(bytes.len());
        bytes[i] ^= 0x01;
        prop_assert!(!key.public().verify(&bytes, &msg.signature));
    }
}
