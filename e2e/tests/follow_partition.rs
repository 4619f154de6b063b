//! Data across a network partition, in network namespaces: node B follows a schema of node A
//! (`--follow`), and a client of B subscribes to the same schema on A through B
//! (`SubscribeRequest.target_node_id`). A's link goes down for longer than a request may take
//! while A's owner keeps writing (over A's owner socket, which needs no network), and comes back.
//! Both streams, open on B throughout, then continue with no gap: every sequence exactly once,
//! in order; the replica's change log equals A's.

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

async fn subscribe(c: &mut FoldNodeClient<Channel>, target: &str) -> Streaming<SubscribeResponse> {
    c.subscribe(SubscribeRequest {
        route: 0,
        schema: "Items".into(),
        from_sequence: 0,
        fields: vec![],
        filter: None,
        json_values: true,
        target_node_id: target.into(),
        definition_hash: Default::default(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Changes until sequence `until`, within `limit`; the stream must not fail.
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
            .expect("the stream continues")
            .expect("the stream continues");
        if let Some(Event::Change(c)) = m.event {
            out.push(c);
        }
    }
    out
}

fn seqs(v: &[Change]) -> Vec<u64> {
    v.iter().map(|c| c.sequence).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_and_a_remote_subscription_resume_after_a_partition_with_no_gap() {
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
    // A's owner socket: reachable from here whatever A's network does.
    let owner_sock: local_link::LinkAddr = a
        .data_dir
        .join("owner.sock")
        .display()
        .to_string()
        .parse()
        .unwrap();
    let mut owner = FoldNodeClient::new(local_link::channel(&owner_sock, Duration::from_secs(3)));
    let mut replica = fold(&b.grpc());
    for c in [&mut owner, &mut replica] {
        c.load_schema(load_req(&items(), true)).await.unwrap();
    }
    // On B: its replica, and A's schema through B and the mesh.
    let mut local = subscribe(&mut replica, "").await;
    let mut remote = subscribe(&mut replica, &a.node_id).await;

    for bn in 0..5 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    let mut got_local = changes(&mut local, 250, Duration::from_secs(30)).await;
    let mut got_remote = changes(&mut remote, 250, Duration::from_secs(30)).await;

    net.link_down(0).unwrap();
    for bn in 5..15 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    // Longer than one request may take (5 to 8 s): B's requests fail meanwhile, and it retries.
    tokio::time::sleep(Duration::from_secs(12)).await;
    net.link_up(0).unwrap();
    for bn in 15..20 {
        owner.batch_mutate(batch(bn)).await.unwrap();
    }
    got_local.extend(changes(&mut local, 1000, Duration::from_secs(90)).await);
    got_remote.extend(changes(&mut remote, 1000, Duration::from_secs(90)).await);
    let all: Vec<u64> = (1..=1000).collect();
    assert_eq!(
        seqs(&got_local),
        all,
        "replica subscriber: every change once, in order"
    );
    assert_eq!(
        seqs(&got_remote),
        all,
        "remote subscriber: every change once, in order"
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
        &mut subscribe(&mut owner, "").await,
        1000,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        want, got_local,
        "the replica's log is the owner's, version for version"
    );
    assert_eq!(
        want, got_remote,
        "the remote subscription streams the owner's changes"
    );
}
