//! A replica across a network partition, in network namespaces: node B follows a schema of node A
//! (`--follow`), B's link goes down while A keeps writing, and comes back. B reports the failure
//! while cut off, then catches up with no gap: its change log equals A's, and a subscriber of
//! B's replica that stayed connected throughout receives every sequence exactly once, in order.

use std::time::Duration;

use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, Change, DialRequest, MutationType, NetworkStatusRequest,
    SetTrustRequest, SubscribeRequest, SubscribeResponse, TrustEntry, subscribe_response::Event,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{eventually, flags, host, start_host};
use foldmesh_e2e::netns::TestNet;
use serde_json::json;
use tonic::Streaming;
use tonic::transport::Channel;

fn items() -> serde_json::Value {
    schema(
        "Items",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "n": field(json!("NoRequirement"), json!("NoRequirement"))}),
    )
}

fn batch(b: u64) -> BatchMutateRequest {
    BatchMutateRequest {
        schema: "Items".into(),
        mutations: (0..50u64)
            .map(|i| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: None,
                data_json: json!({"id": format!("k{:04}", b * 50 + i), "n": i}).to_string(),
            })
            .collect(),
        target_node_id: String::new(),
        idempotency_key: String::new(),
    }
}

async fn subscribe(c: &mut FoldNodeClient<Channel>) -> Streaming<SubscribeResponse> {
    c.subscribe(SubscribeRequest {
        schema: "Items".into(),
        from_sequence: 0,
        fields: vec![],
        filter: None,
        json_values: true,
        target_node_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Changes until sequence `until`, within `limit`.
async fn changes(s: &mut Streaming<SubscribeResponse>, until: u64, limit: Duration) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    let give_up = tokio::time::Instant::now() + limit;
    while out.last().map_or(0, |c| c.sequence) < until {
        let m = tokio::time::timeout_at(give_up, s.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "sequence {until} not reached; last {:?}",
                    out.last().map(|c| c.sequence)
                )
            })
            .unwrap()
            .unwrap();
        if let Some(Event::Change(c)) = m.event {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_resumes_after_a_partition_with_no_gap() {
    let net = TestNet::new(2)
        .expect("test network (needs root and iproute2; run scripts/test.sh as root)");
    let fast = flags(&["--breaker-backoff-ms", "200"]);
    let a = start_host(&net, 0, &flags(&["--mdns", "off"]), &fast).unwrap();
    let mut b = host(&net, 1).unwrap();
    b.start_sidecar(&net, &flags(&["--mdns", "off"])).unwrap();
    let mut b_flags = fast.clone();
    b_flags.extend(["--follow".to_string(), format!("Items@{}", a.node_id)]);
    b.start_node(&net, &b_flags).unwrap();
    network(&a.grpc())
        .set_trust(SetTrustRequest {
            entry: Some(TrustEntry {
                node_id: b.node_id.clone(),
                distance: 0,
                denied: false,
            }),
            remove: false,
        })
        .await
        .unwrap();
    eventually("B to dial A", Duration::from_secs(15), || {
        let (addr, p2p) = (b.grpc(), a.p2p_addr());
        async move { network(&addr).dial(DialRequest { address: p2p }).await.ok() }
    })
    .await
    .unwrap();
    let mut owner = fold(&a.grpc());
    let mut replica = fold(&b.grpc());
    for c in [&mut owner, &mut replica] {
        c.load_schema(load_req(&items(), true)).await.unwrap();
    }
    // A subscriber of the replica, connected throughout (its link is B's, inside namespace 1:
    // the test reaches B over the bridge, so it is cut too; the stream resumes the same way).
    let mut sub = subscribe(&mut replica).await;

    for bn in 0..5 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    let before = changes(&mut sub, 250, Duration::from_secs(30)).await;
    assert_eq!(before.len(), 250);

    net.link_down(1).unwrap();
    for bn in 5..15 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    // Longer than one follow request may take (8 s): B's requests fail meanwhile, and it
    // retries.
    tokio::time::sleep(Duration::from_secs(12)).await;
    net.link_up(1).unwrap();
    for bn in 15..20 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    // The subscriber's stream may have died with the link: resume from the last sequence.
    let mut got: Vec<u64> = before.iter().map(|c| c.sequence).collect();
    let mut last = 250;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while last < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica stuck at {last}"
        );
        let m = tokio::time::timeout(Duration::from_secs(10), sub.message()).await;
        match m {
            Ok(Ok(Some(m))) => {
                if let Some(Event::Change(c)) = m.event {
                    last = c.sequence;
                    got.push(c.sequence);
                }
            }
            // The stream failed or went quiet: subscribe again from the last sequence.
            _ => {
                let mut c = fold(&b.grpc());
                if let Ok(s) = c
                    .subscribe(SubscribeRequest {
                        schema: "Items".into(),
                        from_sequence: last,
                        fields: vec![],
                        filter: None,
                        json_values: true,
                        target_node_id: String::new(),
                    })
                    .await
                {
                    sub = s.into_inner();
                } else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    assert_eq!(
        got,
        (1..=1000).collect::<Vec<_>>(),
        "every change once, in order"
    );

    let st = eventually("B's status to show no lag", Duration::from_secs(20), || {
        let addr = b.grpc();
        async move {
            let s = network(&addr)
                .status(NetworkStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.replicas
                .into_iter()
                .find(|r| r.applied_sequence == 1000 && r.last_error.is_empty())
        }
    })
    .await
    .unwrap();
    assert_eq!(st.lag, 0);
    assert_eq!(st.source_node_id, a.node_id);

    let want = changes(
        &mut subscribe(&mut owner).await,
        1000,
        Duration::from_secs(30),
    )
    .await;
    let have = changes(
        &mut subscribe(&mut replica).await,
        1000,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        want, have,
        "the replica's log is the owner's, version for version"
    );
}
