//! Bytes that are not the protobuf a method expects: the node answers with a clear gRPC error,
//! changes nothing, and keeps serving.

use bytes::{Buf, BufMut};
use fold_proto::v1::MutationType;
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::json;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// A codec that sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

async fn raw_call(addr: &str, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr));
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(method),
        Raw,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn malformed_protobuf_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let s = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "body": field(json!("NoRequirement"), json!("NoRequirement"))}),
    );
    fold(&node.grpc)
        .load_schema(load_req(&s, true))
        .await
        .unwrap();

    for garbage in [
        vec![0xff, 0xff, 0xff, 0xff], // an invalid varint
        vec![0x0a, 0x40, b'N'],       // a string field longer than the message
        vec![0x12, 0x05, 0x01],       // truncated nested message
        b"definitely not protobuf {}".to_vec(),
    ] {
        let e = raw_call(&node.grpc, "/fold.v1.FoldNode/Mutate", garbage.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{garbage:?}: {e:?}");
        assert!(e.message().to_lowercase().contains("decode"), "{e:?}");
    }
    // A method that does not exist.
    let e = raw_call(&node.grpc, "/fold.v1.FoldNode/Drop", vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);

    // Nothing changed, and the node serves normally.
    let r = fold(&node.grpc)
        .query(query_req("Notes", &["body"], None))
        .await
        .unwrap()
        .into_inner();
    assert!(r.records.is_empty());
    fold(&node.grpc)
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "ok", "body": "fine"}),
        ))
        .await
        .unwrap();
}
