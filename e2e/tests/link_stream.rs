//! The node ⇄ sidecar forward stream (`Mesh.ForwardStream`): many forwards share one long-lived
//! stream; when the sidecar restarts, the stream's requests fail as link failures and the next
//! forward opens a new stream; `--link-forward unary` uses one `Mesh.Forward` call each.

use std::time::Duration;

use fold_proto::v1::MutationType;
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::{Node, start};
use foldmesh_e2e::mesh::eventually;
use serde_json::json;

fn notes() -> serde_json::Value {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
}

/// How many `Mesh.<method>` calls node `n` started toward its sidecar.
fn started(n: &Node, method: &str) -> f64 {
    let (_, text) = foldmesh_e2e::http::get(&n.node.admin, "/metrics").unwrap();
    foldmesh_e2e::http::sample(
        &text,
        "grpc_client_started_total",
        &[
            ("grpc_service", "fold.sidecar.v1.Mesh"),
            ("grpc_method", method),
        ],
    )
    .unwrap_or(0.0)
}

async fn serving_pair(a_flags: &[&str]) -> (Node, Node) {
    let a = start(a_flags);
    let b = start(&["--unknown-peer-distance", "1"]);
    b.node
        .owner_fold()
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    b.node
        .owner_fold()
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "hello"}),
        ))
        .await
        .unwrap();
    a.dial(&b).await;
    (a, b)
}

fn forwarded(b: &Node) -> fold_proto::v1::QueryRequest {
    let mut q = query_req("Notes", &["id", "body"], None);
    q.target_node_id = b.id.clone();
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_share_one_stream_that_is_reopened_after_a_sidecar_restart() {
    let (mut a, b) = serving_pair(&[]).await;
    let mut c = fold(&a.node.grpc);
    for _ in 0..50 {
        let r = c.query(forwarded(&b)).await.unwrap().into_inner();
        assert_eq!(r.node_id, b.id);
        assert_eq!(r.records.len(), 1);
    }
    assert_eq!(
        started(&a, "ForwardStream"),
        1.0,
        "one stream for 50 forwards"
    );
    assert_eq!(started(&a, "Forward"), 0.0, "no unary forwards");

    // The sidecar restarts: the old stream ends; the next forwards open a new one.
    let p2p = a.p2p.clone();
    let listen = p2p.split("/p2p/").next().unwrap().to_string();
    a.restart_sidecar(&["--listen", &listen]);
    a.dial(&b).await;
    eventually(
        "forwards to work again after the sidecar restart",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let q = forwarded(&b);
            async move { c.query(q).await.ok() }
        },
    )
    .await
    .unwrap();
    for _ in 0..20 {
        c.query(forwarded(&b)).await.unwrap();
    }
    assert_eq!(
        started(&a, "ForwardStream"),
        2.0,
        "a new stream after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_link_forwards_are_one_call_each() {
    let (a, b) = serving_pair(&["--link-forward", "unary"]).await;
    let mut c = fold(&a.node.grpc);
    for _ in 0..10 {
        c.query(forwarded(&b)).await.unwrap();
    }
    assert_eq!(started(&a, "ForwardStream"), 0.0);
    assert_eq!(started(&a, "Forward"), 10.0);
}
