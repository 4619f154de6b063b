//! Idempotency keys: a mutation retried with the same key is applied once and reported as a
//! replay, locally and forwarded through the mesh; the same key with a different mutation is
//! refused; the key is durable (it survives a restart).

use fold_proto::v1::{BatchMutateRequest, BatchMutation, HistoryRequest, MutationType};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::start;
use foldmesh_e2e::process::NodeProc;
use serde_json::json;
use tonic::Code;

fn counter() -> serde_json::Value {
    schema(
        "Counter",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "n": field(json!("NoRequirement"), json!("NoRequirement"))}),
    )
}

async fn versions(
    c: &mut fold_proto::v1::fold_node_client::FoldNodeClient<tonic::transport::Channel>,
    key: &str,
) -> usize {
    c.history(HistoryRequest {
        target_node_id: String::new(),
        route: 0,
        page_size: 0,
        page_token: String::new(),
        json_values: false,
        schema: "Counter".into(),
        field: "n".into(),
        range_key: key.into(),
        limit: 0,
        definition_hash: Default::default(),
    })
    .await
    .unwrap()
    .into_inner()
    .versions
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_mutation_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&counter(), true)).await.unwrap();
    c.mutate(mutate_req(
        "Counter",
        MutationType::Create,
        json!({"id": "a", "n": 0}),
    ))
    .await
    .unwrap();
    let update = |n: i64, key: &str| {
        let mut m = mutate_req("Counter", MutationType::Update, json!({"id": "a", "n": n}));
        m.idempotency_key = key.into();
        m
    };
    let first = c.mutate(update(1, "k-1")).await.unwrap().into_inner();
    assert!(!first.replayed);
    let again = c.mutate(update(1, "k-1")).await.unwrap().into_inner();
    assert!(again.replayed, "the retry is reported as a replay");
    assert_eq!(
        again.version_ids, first.version_ids,
        "with the first result"
    );
    assert_eq!(versions(&mut c, "a").await, 2, "create + one update");
    // The same key for a different mutation is refused.
    let e = c.mutate(update(2, "k-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Too long a key.
    let e = c.mutate(update(3, &"x".repeat(129))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // Batches too.
    let batch = || BatchMutateRequest {
        schema: "Counter".into(),
        mutations: vec![BatchMutation {
            data_json: String::new(),
            mutation_type: MutationType::Create as i32,
            data: Some(fold_proto::json::map_to_struct(
                json!({"id": "b", "n": 1}).as_object().unwrap(),
            )),
        }],
        target_node_id: String::new(),
        idempotency_key: "batch-1".into(),
    };
    assert!(!c.batch_mutate(batch()).await.unwrap().into_inner().replayed);
    // Without the key this CREATE would be ALREADY_EXISTS; with it, a replay.
    assert!(c.batch_mutate(batch()).await.unwrap().into_inner().replayed);
    // Durable: after a kill -9 and a restart, the key is still known.
    drop(c);
    let mut node = node;
    node.proc.kill9();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    let r = c.mutate(update(1, "k-1")).await.unwrap().into_inner();
    assert!(r.replayed);
    assert_eq!(versions(&mut c, "a").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_retry_is_applied_once_on_the_receiver() {
    let a = start(&[]);
    let b = start(&[]);
    b.trust(&a.id, 0).await;
    a.dial(&b).await;
    let mut owner_b = b.node.owner_fold();
    owner_b
        .load_schema(load_req(&counter(), true))
        .await
        .unwrap();
    let mut c = fold(&a.node.grpc);
    let create = || {
        let mut m = mutate_req("Counter", MutationType::Create, json!({"id": "r", "n": 7}));
        m.target_node_id = b.id.clone();
        m.idempotency_key = "retry-me".into();
        m
    };
    assert!(!c.mutate(create()).await.unwrap().into_inner().replayed);
    let r = c.mutate(create()).await.unwrap().into_inner();
    assert!(r.replayed, "applied once on B");
    assert_eq!(r.node_id, b.id);
    assert_eq!(versions(&mut owner_b, "r").await, 1);
}
