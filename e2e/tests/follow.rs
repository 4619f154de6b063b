//! Replicas (`fold-node --follow SCHEMA@NODE_ID`), with real processes on loopback: 10,000
//! mutations on the owner while a replica follows, the owner's and the replica's fold-node each
//! killed with -9 five times meanwhile; afterwards the replica equals the owner record for
//! record and version for version (the whole change log compared), no change applied twice.
//! Also: writes to the replica are refused naming the owner, a query of the replica says what it
//! is a copy of and as of which sequence, and Network.Status shows the lag.

use std::time::Duration;

use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, Change, MutationType, NetworkStatusRequest,
    SubscribeRequest, subscribe_response::Event,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::{Node, start};
use foldmesh_e2e::mesh::eventually;
use foldmesh_e2e::process::NodeProc;
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

fn items() -> serde_json::Value {
    schema(
        "Items",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "n": field(json!("NoRequirement"), json!("NoRequirement")),
               "secret": field(json!({"Distance": 0}), json!("NoRequirement"))}),
    )
}

/// Batch `b` of 100 mutations: new records, then updates and deletes of earlier ones.
fn batch(b: u64) -> BatchMutateRequest {
    let mutations = (0..100u64)
        .map(|i| {
            let (kind, data) = match b % 4 {
                // Batches 0, 1, 2 (mod 4) create 100 records each...
                0..=2 => (
                    MutationType::Create,
                    json!({"id": format!("k{:05}", b * 100 + i), "n": i, "secret": b}),
                ),
                // ... and the fourth updates the first batch of its round's records, deleting
                // every tenth.
                _ if i % 10 == 0 => (
                    MutationType::Delete,
                    json!({"id": format!("k{:05}", (b - 3) * 100 + i)}),
                ),
                _ => (
                    MutationType::Update,
                    json!({"id": format!("k{:05}", (b - 3) * 100 + i), "n": 9_007_199_254_740_993u64}),
                ),
            };
            BatchMutation {
                mutation_type: kind as i32,
                data: None,
                data_json: data.to_string(),
            }
        })
        .collect();
    BatchMutateRequest {
        schema: "Items".into(),
        mutations,
        target_node_id: String::new(),
        idempotency_key: format!("batch-{b}"),
    }
}

/// Every change of `Items` on a node, from the first, as comparable values.
async fn log(c: &mut FoldNodeClient<Channel>, head: u64) -> Vec<Change> {
    let mut s = c
        .subscribe(SubscribeRequest {
            route: 0,
            schema: "Items".into(),
            from_sequence: 0,
            fields: vec![],
            filter: None,
            json_values: true,
            target_node_id: String::new(),
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < head as usize {
        let m = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("changes arrive")
            .unwrap()
            .unwrap();
        if let Some(Event::Change(ch)) = m.event {
            out.push(ch);
        }
    }
    out
}

async fn head(c: &mut FoldNodeClient<Channel>) -> u64 {
    let mut s = c
        .subscribe(SubscribeRequest {
            route: 0,
            schema: "Items".into(),
            from_sequence: 0,
            fields: vec!["id".into()],
            filter: Some(fold_proto::v1::RangeFilter {
                filter: Some(fold_proto::v1::range_filter::Filter::Key("none".into())),
            }),
            json_values: true,
            target_node_id: String::new(),
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        if let Some(Event::Progress(p)) = s.message().await.unwrap().unwrap().event {
            return p.head_sequence;
        }
    }
}

fn restart(n: &mut Node, flags: &[&str]) {
    n.node.proc.kill9();
    n.node = NodeProc::start(n.data_dir(), flags).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_equals_its_owner_through_kill_9_of_both() {
    let a = start(&["--breaker-backoff-ms", "200"]);
    let follow = format!("Items@{}", a.id);
    let b_flags = ["--follow", follow.as_str(), "--breaker-backoff-ms", "200"];
    let mut b = start(&b_flags);
    let mut a = a;
    a.trust(&b.id, 0).await;
    b.dial(&a).await;
    for n in [&a, &b] {
        n.node
            .owner_fold()
            .load_schema(load_req(&items(), true))
            .await
            .unwrap();
    }
    let a_flags = ["--breaker-backoff-ms", "200"];
    // 100 batches of 100 = 10,000 mutations; kill -9 the replica before batches 5, 25, 45,
    // 65, 85 and the owner during batches 15, 35, 55, 75, 95 (the batch then retried with its
    // idempotency key, so it is applied once whether or not it committed before the kill).
    let mut replica_kills = 0;
    let mut owner_kills = 0;
    for bn in 0..100u64 {
        if bn % 20 == 5 {
            restart(&mut b, &b_flags);
            replica_kills += 1;
        }
        if bn % 20 == 15 {
            let mut c = fold(&a.node.grpc);
            let req = batch(bn);
            let inflight = tokio::spawn(async move { c.batch_mutate(req).await });
            tokio::time::sleep(Duration::from_millis(3 + bn % 7 * 4)).await;
            restart(&mut a, &a_flags);
            let _ = inflight.await;
            owner_kills += 1;
        }
        let mut c = fold(&a.node.grpc);
        let r = eventually("the batch to be written", Duration::from_secs(20), || {
            let mut c = c.clone();
            async move { c.batch_mutate(batch(bn)).await.ok() }
        })
        .await
        .unwrap();
        assert_eq!(r.into_inner().results.len(), 100);
        c.query(query_req("Items", &["n"], None)).await.unwrap();
    }
    assert_eq!((replica_kills, owner_kills), (5, 5));

    let mut owner = a.node.owner_fold();
    let mut replica = b.node.owner_fold();
    let owner_head = head(&mut owner).await;
    assert_eq!(owner_head, 10_000, "each batch applied once");
    eventually("the replica to catch up", Duration::from_secs(60), || {
        let mut r = replica.clone();
        async move { (head(&mut r).await == owner_head).then_some(()) }
    })
    .await
    .unwrap();

    // Version for version: the whole change log, sequence by sequence.
    let want = log(&mut owner, owner_head).await;
    let got = log(&mut replica, owner_head).await;
    assert_eq!(want.len(), 10_000);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.sequence, i as u64 + 1);
        assert_eq!(w, g, "change {}", i + 1);
    }
    // Record for record, with the replica saying what it is.
    let q = |c: &mut FoldNodeClient<Channel>| {
        let mut c = c.clone();
        async move {
            let mut req = query_req("Items", &["id", "n", "secret"], None);
            req.json_values = true;
            c.query(req).await.unwrap().into_inner()
        }
    };
    let (qa, qb) = (q(&mut owner).await, q(&mut replica).await);
    assert_eq!(qa.records, qb.records);
    assert_eq!(
        qa.records.len(),
        7_250,
        "3 of 4 batches create 100 records, the 4th deletes 10"
    );
    assert!(qa.replica.is_none());
    let info = qb.replica.expect("the replica says so");
    assert_eq!(info.source_node_id, a.id);
    assert_eq!(info.as_of_sequence, owner_head);

    // Read-only, naming the owner.
    let e = replica
        .mutate(mutate_req(
            "Items",
            MutationType::Update,
            json!({"id": "k00001", "n": 1}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&a.id), "{e:?}");

    // Live: a new write reaches the replica, and the status shows no lag.
    let r = owner
        .mutate(mutate_req(
            "Items",
            MutationType::Update,
            json!({"id": "k00001", "n": 42}),
        ))
        .await
        .unwrap()
        .into_inner();
    let st = eventually(
        "the replica to apply the live change",
        Duration::from_secs(20),
        || {
            let mut n = b.node.owner_network();
            async move {
                let s = n.status(NetworkStatusRequest {}).await.ok()?.into_inner();
                s.replicas
                    .into_iter()
                    .find(|r| r.schema == "Items" && r.applied_sequence == 10_001)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(r.sequence, 10_001);
    assert_eq!(st.source_node_id, a.id);
    assert_eq!(st.lag, 0);
    assert!(st.last_error.is_empty(), "{st:?}");
    let (_, metrics) = foldmesh_e2e::http::get(&b.node.admin, "/metrics").unwrap();
    let sample = |name: &str| foldmesh_e2e::http::sample(&metrics, name, &[("schema", "Items")]);
    assert_eq!(
        sample("fold_replica_applied_sequence"),
        Some(10_001.0),
        "{metrics}"
    );
    assert_eq!(sample("fold_replica_lag"), Some(0.0), "{metrics}");
}

/// A subscription to another node's schema through the mesh: that node applies its trust in
/// the subscriber (path distance: its trust in this node + the client's distance here), so a
/// field it reserves for distance 0 is refused by name, and left out when no field is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_subscription_gets_what_the_other_node_lets_it_read() {
    let a = start(&[]);
    let mut b = start(&["--breaker-backoff-ms", "200"]);
    a.trust(&b.id, 1).await;
    b.dial(&a).await;
    let mut owner = a.node.owner_fold();
    owner.load_schema(load_req(&items(), true)).await.unwrap();
    owner
        .mutate(mutate_req(
            "Items",
            MutationType::Create,
            json!({"id": "a", "n": 1, "secret": "s"}),
        ))
        .await
        .unwrap();
    let req = |fields: &[&str]| SubscribeRequest {
        route: 0,
        schema: "Items".into(),
        from_sequence: 0,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        filter: None,
        json_values: false,
        target_node_id: a.id.clone(),
        definition_hash: Default::default(),
    };
    let mut c = fold(&b.node.grpc);
    let e = c.subscribe(req(&["n", "secret"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("secret"), "{e:?}");
    let mut s = c.subscribe(req(&[])).await.unwrap().into_inner();
    let first = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("a change arrives")
            .unwrap()
            .unwrap();
        if let Some(Event::Change(ch)) = m.event {
            break ch;
        }
    };
    assert_eq!(first.sequence, 1);
    let names: Vec<&str> = first.fields.iter().map(|f| f.field.as_str()).collect();
    assert!(
        names.contains(&"n") && !names.contains(&"secret"),
        "{names:?}"
    );
    // Values as Struct values when json_values is off, as for a local subscription.
    let n = first.fields.iter().find(|f| f.field == "n").unwrap();
    assert!(n.value.is_some() && n.value_json.is_empty(), "{n:?}");
    // Live: new writes on A arrive, also across a restart of B's sidecar (the stream's way to
    // A), with no gap.
    let mut want = Vec::new();
    for round in 0..2 {
        for i in 0..20 {
            want.push(
                owner
                    .mutate(mutate_req(
                        "Items",
                        MutationType::Update,
                        json!({"id": "a", "n": round * 100 + i}),
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .sequence,
            );
        }
        if round == 0 {
            b.restart_sidecar(&["--listen", "/ip4/127.0.0.1/tcp/0"]);
        }
    }
    let mut got = Vec::new();
    while got.len() < want.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("the live changes arrive")
            .expect("the stream continues")
            .expect("the stream continues");
        if let Some(Event::Change(ch)) = m.event {
            got.push(ch.sequence);
        }
    }
    assert_eq!(
        got, want,
        "every change once, in order, across the sidecar restart"
    );
    assert_eq!(want, (2..=41).collect::<Vec<_>>());
}

/// A replica whose copy was written to while it did not follow (restarted without `--follow`)
/// refuses to mix the two histories once it follows again: Network.Status says it diverged,
/// and nothing more is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_diverged_says_so_and_applies_nothing() {
    let a = start(&[]);
    let follow = format!("Items@{}", a.id);
    let b_flags = ["--follow", follow.as_str()];
    let mut b = start(&b_flags);
    a.trust(&b.id, 0).await;
    b.dial(&a).await;
    let mut owner = a.node.owner_fold();
    for n in [&a, &b] {
        n.node
            .owner_fold()
            .load_schema(load_req(&items(), true))
            .await
            .unwrap();
    }
    let create = |id: &str| mutate_req("Items", MutationType::Create, json!({"id": id, "n": 1}));
    owner.mutate(create("a1")).await.unwrap();
    let replica_at = |n: &Node, seq: u64| {
        let addr = n.node.grpc.clone();
        async move {
            let s = network(&addr)
                .status(NetworkStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.replicas.into_iter().find(|r| r.applied_sequence == seq)
        }
    };
    eventually("the replica at 1", Duration::from_secs(20), || {
        replica_at(&b, 1)
    })
    .await
    .unwrap();
    // Without --follow, the copy is writable: a change of its own becomes its sequence 2.
    restart(&mut b, &[]);
    b.node.owner_fold().mutate(create("b-local")).await.unwrap();
    // The owner's sequence 2 is another change.
    owner.mutate(create("a2")).await.unwrap();
    restart(&mut b, &b_flags);
    let st = eventually(
        "the replica to report the divergence",
        Duration::from_secs(20),
        || {
            let addr = b.node.grpc.clone();
            async move {
                let s = network(&addr)
                    .status(NetworkStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                s.replicas
                    .into_iter()
                    .find(|r| r.last_error.contains("diverged"))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(st.applied_sequence, 2, "{st:?}");
    owner.mutate(create("a3")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let keys = keys(
        &b.node
            .owner_fold()
            .query(query_req("Items", &["n"], None))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        keys,
        vec!["a1", "b-local"],
        "nothing of the owner's applied on top"
    );
}
