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
    metric(
        &n.node.admin,
        "grpc_client_started_total",
        "fold.sidecar.v1.Mesh",
        method,
    )
}

/// How many `PeerRequests.<method>` calls node `n`'s sidecar started toward it.
fn inbound_started(n: &Node, method: &str) -> f64 {
    metric(
        &n.node.admin,
        "grpc_server_started_total",
        "fold.sidecar.v1.PeerRequests",
        method,
    )
}

fn metric(admin: &str, name: &str, service: &str, method: &str) -> f64 {
    let (_, text) = foldmesh_e2e::http::get(admin, "/metrics").unwrap();
    foldmesh_e2e::http::sample(
        &text,
        name,
        &[("grpc_service", service), ("grpc_method", method)],
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

/// B's fold-node restarts: B's sidecar's inbound stream ends, and the next forward opens a new
/// one to the new node process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_stream_is_reopened_after_the_node_restarts() {
    let (a, mut b) = serving_pair(&[]).await;
    let mut c = fold(&a.node.grpc);
    for _ in 0..5 {
        c.query(forwarded(&b)).await.unwrap();
    }
    b.node.proc.kill9();
    let dir = b.data_dir().to_path_buf();
    b.node =
        foldmesh_e2e::process::NodeProc::start(&dir, &["--unknown-peer-distance", "1"]).unwrap();
    eventually(
        "forwards to B to work again after its node restarted",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let q = forwarded(&b);
            async move { c.query(q).await.ok() }
        },
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let r = c.query(forwarded(&b)).await.unwrap().into_inner();
        assert_eq!(r.records.len(), 1, "B's data survived");
    }
    // The new node process saw exactly one stream from its sidecar.
    assert_eq!(inbound_started(&b, "HandleForwardStream"), 1.0);
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
