//! Shared streams hold against one careless client (issue 22), with real binaries on loopback:
//! an answer or a request over the link's message limit fails alone with RESOURCE_EXHAUSTED
//! while 40 forwards on the same streams succeed, and 260 remote subscriptions (long polls) from
//! one client of node A do not stop a third node's queries to B: long polls have their own
//! budget and never take the slots requests need.

use std::time::Duration;

use fold_proto::v1::{MutationType, SubscribeRequest};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::{Node, start, start_with};
use futures::StreamExt;
use prost::Message;
use serde_json::json;
use tonic::Code;

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

/// A (no schema) dialled to B (Notes, trusting unknown peers at distance 1; `b_sidecar` are
/// its sidecar's flags).
async fn pair(a_flags: &[&str], b_sidecar: &[&str]) -> (Node, Node) {
    let a = start(a_flags);
    let b = start_with(b_sidecar, &["--unknown-peer-distance", "1"]);
    b.node
        .owner_fold()
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    a.dial(&b).await;
    (a, b)
}

fn remote_query(b: &Node, fields: &[&str]) -> fold_proto::v1::QueryRequest {
    let mut q = query_req("Notes", fields, None);
    q.target_node_id = b.id.clone();
    q
}

/// How many `Mesh.ForwardStream` calls node `n` opened toward its sidecar.
fn forward_streams_opened(n: &Node) -> f64 {
    let (_, text) = foldmesh_e2e::http::get(&n.node.admin, "/metrics").unwrap();
    foldmesh_e2e::http::sample(
        &text,
        "grpc_client_started_total",
        &[
            ("grpc_service", "fold.sidecar.v1.Mesh"),
            ("grpc_method", "ForwardStream"),
        ],
    )
    .unwrap_or(0.0)
}

/// 40 small forwarded queries at once: every one must succeed.
async fn forty_small_forwards(a: &Node, b: &Node) -> Vec<tokio::task::JoinHandle<()>> {
    (0..40)
        .map(|_| {
            let mut c = fold(&a.node.grpc);
            let q = remote_query(b, &["id"]);
            tokio::spawn(async move {
                let mut r = tonic::Request::new(q);
                r.set_timeout(Duration::from_secs(30));
                let resp = c.query(r).await.expect("a small forward failed");
                assert_eq!(resp.into_inner().records.len(), 6);
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_or_request_fails_alone_while_forty_forwards_succeed() {
    let (a, b) = pair(&[], &[]).await;
    // Six records of 800 KB: all of them in one answer is over the 4 MiB limit.
    let big = "x".repeat(800 * 1024);
    for i in 0..6 {
        b.node
            .owner_fold()
            .mutate(mutate_req(
                "Notes",
                MutationType::Create,
                json!({"id": format!("n{i}"), "body": big}),
            ))
            .await
            .unwrap();
    }
    // Warm the streams up.
    fold(&a.node.grpc)
        .query(remote_query(&b, &["id"]))
        .await
        .unwrap();
    assert_eq!(forward_streams_opened(&a), 1.0);

    let small = forty_small_forwards(&a, &b).await;
    let large: Vec<_> = (0..3)
        .map(|_| {
            let mut c = fold(&a.node.grpc);
            let mut q = remote_query(&b, &["id", "body"]);
            q.page_size = 10_000;
            tokio::spawn(async move { c.query(q).await })
        })
        .collect();
    for t in small {
        t.await.unwrap();
    }
    for t in large {
        let e = t.await.unwrap().expect_err("an answer over 4 MiB was sent");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("limit") && e.message().contains("page_size"),
            "the message names the limit and what to do: {}",
            e.message()
        );
    }

    // A forwarded mutation just under the client's limit: its forward is over the link's.
    let mut m = mutate_req(
        "Notes",
        MutationType::Create,
        json!({"id": "huge", "body": ""}),
    );
    m.target_node_id = b.id.clone();
    let room = 4 * 1024 * 1024 - 64 - m.encoded_len();
    m = mutate_req(
        "Notes",
        MutationType::Create,
        json!({"id": "huge", "body": "y".repeat(room)}),
    );
    m.target_node_id = b.id.clone();
    assert!(m.encoded_len() <= 4 * 1024 * 1024);
    let small = forty_small_forwards(&a, &b).await;
    let e = fold(&a.node.grpc)
        .mutate(m)
        .await
        .expect_err("a forward over the limit was sent");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limit"), "{}", e.message());
    for t in small {
        t.await.unwrap();
    }
    // Nothing above reset a stream: every forward went over the first one.
    assert_eq!(forward_streams_opened(&a), 1.0, "the stream was reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_subscriptions_of_one_client_do_not_lock_out_a_third_node() {
    // B's request slots are few (32), so long polls parked in them would lock C out at once.
    // A lets its one client hold all 260 (its own per-client cap is not what is tested here).
    let (a, b) = pair(
        &[
            "--max-subscriptions",
            "300",
            "--max-subscriptions-per-client",
            "300",
        ],
        &["--inbound-queue", "32"],
    )
    .await;
    b.node
        .owner_fold()
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "hello"}),
        ))
        .await
        .unwrap();
    let c = start(&[]);
    c.dial(&b).await;
    let mut cq = fold(&c.node.grpc);
    cq.query(remote_query(&b, &["id"])).await.unwrap();

    // One client of A opens 260 subscriptions to B's quiet schema: each is a long poll on B.
    let client = fold(&a.node.grpc);
    let opened: Vec<_> = futures::stream::iter(0..260)
        .map(|_| {
            let mut client = client.clone();
            let target = b.id.clone();
            async move {
                client
                    .subscribe(SubscribeRequest {
                        route: 0,
                        schema: "Notes".into(),
                        from_sequence: 0,
                        fields: vec!["id".into()],
                        filter: None,
                        json_values: true,
                        target_node_id: target,
                        definition_hash: String::new(),
                    })
                    .await
                    .map(|s| s.into_inner())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut streams = Vec::new();
    let mut refused = Vec::new();
    for t in opened {
        match t {
            Ok(s) => streams.push(s),
            Err(e) => refused.push(format!("{:?}: {}", e.code(), e.message())),
        }
    }
    // (A debug build verifies only ~100 signatures a second on this 2-core machine, so some
    // openings time out behind the long polls of the others; far more than 32 must open.)
    assert!(
        streams.len() >= 100,
        "only {} remote subscriptions opened; e.g. {:?}",
        streams.len(),
        refused.first()
    );
    // Let their long polls park on B.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // C's queries to B get through, every one, while they are parked.
    for i in 0..50 {
        let mut r = tonic::Request::new(remote_query(&b, &["id"]));
        r.set_timeout(Duration::from_secs(10));
        let resp = cq
            .query(r)
            .await
            .unwrap_or_else(|e| panic!("C's query {i} to B failed: {e:?}"));
        assert_eq!(resp.into_inner().records.len(), 1);
    }
    drop(streams);
}
