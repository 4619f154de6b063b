//! Sequence numbers and FoldNode.Subscribe, against real fold-node processes: dense per-schema
//! sequences that survive `kill -9`, catch-up then live with no gap in the hand-over, field
//! permissions on every streamed change, a slow subscriber cut off with RESOURCE_EXHAUSTED that
//! resumes from its last sequence, and OUT_OF_RANGE once the change log no longer keeps what is
//! asked for.

use std::collections::BTreeMap;
use std::time::Duration;

use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, Change, MutationType, SubscribeRequest, SubscribeResponse,
    subscribe_response::Event,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

fn items() -> Json {
    schema(
        "Items",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "n": field(json!("NoRequirement"), json!("NoRequirement")),
               "secret": field(json!({"Distance": 0}), json!("NoRequirement"))}),
    )
}

fn sub(from: u64, fields: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        route: 0,
        schema: "Items".into(),
        from_sequence: from,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        filter: None,
        json_values: true,
        target_node_id: String::new(),
        definition_hash: Default::default(),
    }
}

fn batch(records: Vec<Json>) -> BatchMutateRequest {
    BatchMutateRequest {
        schema: "Items".into(),
        mutations: records
            .into_iter()
            .map(|r| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: None,
                data_json: r.to_string(),
            })
            .collect(),
        target_node_id: String::new(),
        idempotency_key: String::new(),
    }
}

/// The next message, failing the test after 20 s.
async fn next(s: &mut Streaming<SubscribeResponse>) -> Result<Option<Event>, tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(20), s.message()).await {
        Ok(r) => r.map(|m| m.and_then(|m| m.event)),
        Err(_) => panic!("no subscription message within 20 s"),
    }
}

/// Changes until the stream has considered `until` (by change or progress).
async fn changes_until(s: &mut Streaming<SubscribeResponse>, until: u64) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    loop {
        match next(s).await.expect("the stream fails") {
            Some(Event::Change(c)) => {
                let seq = c.sequence;
                out.push(c);
                if seq >= until {
                    return out;
                }
            }
            Some(Event::Progress(p)) if p.sequence >= until => return out,
            Some(Event::Progress(_)) => {}
            None => panic!(
                "the stream ended early at {:?}",
                out.last().map(|c| c.sequence)
            ),
        }
    }
}

fn value(c: &Change, field: &str) -> Option<Json> {
    c.fields
        .iter()
        .find(|f| f.field == field)
        .map(|f| serde_json::from_str(&f.value_json).unwrap())
}

async fn setup(flags: &[&str]) -> (tempfile::TempDir, NodeProc, FoldNodeClient<Channel>) {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), flags).unwrap();
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&items(), true)).await.unwrap();
    (dir, node, c)
}

/// Acknowledged sequences are unique, a refused mutation consumes none, and after `kill -9`
/// and a restart the numbers continue from the durable head: the whole log is 1..=head with
/// no gap, and every acknowledged write is in it under its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_are_dense_and_survive_kill_9() {
    let (dir, mut node, _) = setup(&[]).await;
    let mut acked: BTreeMap<u64, (String, Vec<String>)> = BTreeMap::new();
    for round in 0..3 {
        // The restarted node listens on a new port.
        let c = fold(&node.grpc);
        // Concurrent writers (they share group commits); every fifth write is refused.
        let mut tasks = Vec::new();
        for w in 0..4 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..60 {
                    let key = if i % 5 == 4 {
                        format!("r{round}-w{w}-{}", i - 1) // exists: ALREADY_EXISTS
                    } else {
                        format!("r{round}-w{w}-{i}")
                    };
                    let m = mutate_req("Items", MutationType::Create, json!({"id": key, "n": i}));
                    match c.mutate(m).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            got.push((r.sequence, key, r.version_ids));
                        }
                        Err(e) if e.code() == Code::AlreadyExists => {}
                        // Killed meanwhile: the write may or may not have been committed.
                        Err(_) => break,
                    }
                }
                got
            }));
        }
        // A batch refused at its last record consumes nothing either.
        let mut cb = c.clone();
        let e = cb
            .batch_mutate(batch(vec![
                json!({"id": format!("b{round}-x"), "n": 1}),
                json!({"id": format!("b{round}-x"), "n": 2}),
            ]))
            .await;
        assert_eq!(
            e.unwrap_err().code(),
            Code::AlreadyExists,
            "a batch creating the same record twice is refused"
        );
        if round < 2 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            node.proc.kill9();
        }
        let mut written = 0;
        for t in tasks {
            for (seq, key, versions) in t.await.unwrap() {
                written += 1;
                assert!(seq > 0, "every write carries its sequence");
                let prev = acked.insert(seq, (key.clone(), versions));
                assert!(prev.is_none(), "sequence {seq} was given twice ({key})");
            }
        }
        assert!(written > 0, "round {round} wrote nothing");
        if round < 2 {
            node = NodeProc::start(dir.path(), &[]).unwrap();
        }
    }
    let mut c = fold(&node.grpc);
    // A batch's records get consecutive numbers after everything before.
    let max_acked = *acked.keys().last().unwrap();
    let b = c
        .batch_mutate(batch(vec![
            json!({"id": "last-1", "n": 1}),
            json!({"id": "last-2", "n": 2}),
        ]))
        .await
        .unwrap()
        .into_inner();
    let s1 = b.results[0].sequence;
    assert!(s1 > max_acked, "{s1} after {max_acked}");
    assert_eq!(b.results[1].sequence, s1 + 1);

    let mut s = c.subscribe(sub(0, &[])).await.unwrap().into_inner();
    let all = changes_until(&mut s, s1 + 1).await;
    let seqs: Vec<u64> = all.iter().map(|c| c.sequence).collect();
    assert_eq!(
        seqs,
        (1..=s1 + 1).collect::<Vec<_>>(),
        "dense, in order, from 1"
    );
    for ch in &all {
        if let Some((key, versions)) = acked.get(&ch.sequence) {
            assert_eq!(&ch.range_key, key, "sequence {}", ch.sequence);
            let got: Vec<String> = ch.fields.iter().map(|f| f.version_id.clone()).collect();
            let mut want = versions.clone();
            want.sort();
            let mut got_sorted = got.clone();
            got_sorted.sort();
            assert_eq!(got_sorted, want, "sequence {}", ch.sequence);
        }
    }
    // History names each version's sequence.
    let h = c
        .history(fold_proto::v1::HistoryRequest {
            schema: "Items".into(),
            field: "n".into(),
            range_key: "last-2".into(),
            limit: 0,
            json_values: false,
            page_size: 0,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.versions[0].sequence, s1 + 1);
}

/// Catch-up from the log, then live, while a writer keeps writing through the hand-over: every
/// change exactly once, in order, with its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_then_live_with_no_gap() {
    let (_dir, _node, mut c) = setup(&[]).await;
    for b in 0..5 {
        let recs = (0..100)
            .map(|i| json!({"id": format!("k{:05}", b * 100 + i), "n": b * 100 + i}))
            .collect();
        c.batch_mutate(batch(recs)).await.unwrap();
    }
    let mut writer = c.clone();
    let writing = tokio::spawn(async move {
        let mut last = 0;
        for i in 500..1500u64 {
            let m = mutate_req(
                "Items",
                MutationType::Create,
                json!({"id": format!("k{i:05}"), "n": i}),
            );
            last = writer.mutate(m).await.unwrap().into_inner().sequence;
        }
        last
    });
    let mut s = c
        .subscribe(sub(0, &["id", "n"]))
        .await
        .unwrap()
        .into_inner();
    let last = writing.await.unwrap();
    assert_eq!(last, 1500);
    let all = changes_until(&mut s, last).await;
    assert_eq!(all.len(), 1500);
    for (i, ch) in all.iter().enumerate() {
        assert_eq!(ch.sequence, i as u64 + 1);
        assert_eq!(ch.range_key, format!("k{i:05}"));
        assert_eq!(value(ch, "n"), Some(json!(i)));
        assert_eq!(ch.writer, "client:local");
        assert_eq!(ch.mutation_type, MutationType::Create as i32);
    }
    // Live: one more write arrives on the open stream.
    let r = c
        .mutate(mutate_req(
            "Items",
            MutationType::Update,
            json!({"id": "k00007", "n": -1}),
        ))
        .await
        .unwrap()
        .into_inner();
    let more = changes_until(&mut s, r.sequence).await;
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].sequence, 1501);
    assert_eq!(more[0].mutation_type, MutationType::Update as i32);
    assert_eq!(more[0].fields[0].version_id, r.version_ids[0]);
    assert!(!more[0].fields[0].previous_version_id.is_empty());
    assert_eq!(value(&more[0], "n"), Some(json!(-1)));
    // Resuming from the middle sends exactly the rest.
    let mut s = c.subscribe(sub(1400, &["n"])).await.unwrap().into_inner();
    let rest = changes_until(&mut s, 1501).await;
    let seqs: Vec<u64> = rest.iter().map(|c| c.sequence).collect();
    assert_eq!(seqs, (1401..=1501).collect::<Vec<_>>());
    // Beyond the head: refused, not waited for.
    let e = c.subscribe(sub(99_999, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
}

/// Clients of the public port at distance 1: a field readable only at distance 0 is never
/// streamed to them; naming it is PERMISSION_DENIED, as for Query; the owner gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_the_subscriber_may_not_read_is_not_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--client-trust-distance", "1"]).unwrap();
    let mut owner = node.owner_fold();
    owner.load_schema(load_req(&items(), true)).await.unwrap();
    let mut c = fold(&node.grpc);
    let e = c.subscribe(sub(0, &["n", "secret"])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("secret"), "{e:?}");

    let mut s = c.subscribe(sub(0, &[])).await.unwrap().into_inner();
    let mut o = owner.subscribe(sub(0, &[])).await.unwrap().into_inner();
    c.mutate(mutate_req(
        "Items",
        MutationType::Create,
        json!({"id": "a", "n": 1, "secret": "s1"}),
    ))
    .await
    .unwrap();
    // Only the secret: nothing the public subscriber may see.
    c.mutate(mutate_req(
        "Items",
        MutationType::Update,
        json!({"id": "a", "secret": "s2"}),
    ))
    .await
    .unwrap();
    let last = c
        .mutate(mutate_req(
            "Items",
            MutationType::Update,
            json!({"id": "a", "n": 2}),
        ))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert_eq!(last, 3);
    let public = changes_until(&mut s, last).await;
    assert_eq!(
        public.iter().map(|c| c.sequence).collect::<Vec<_>>(),
        vec![1, 3],
        "the change of only the secret is skipped"
    );
    for ch in &public {
        assert!(ch.fields.iter().all(|f| f.field != "secret"), "{ch:?}");
    }
    assert_eq!(value(&public[0], "n"), Some(json!(1)));
    let all = changes_until(&mut o, last).await;
    assert_eq!(all.len(), 3);
    assert_eq!(value(&all[1], "secret"), Some(json!("s2")));
}

/// A subscriber that stops reading falls behind its buffer and is cut off with
/// RESOURCE_EXHAUSTED naming where to resume; resuming from the last sequence it received gives
/// every change exactly once overall. The node keeps writing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_cut_off_and_resumes() {
    let (_dir, node, mut c) = setup(&["--subscription-buffer", "16"]).await;
    let mut s = c.subscribe(sub(0, &[])).await.unwrap().into_inner();
    // Live once the first progress arrives.
    match next(&mut s).await.unwrap() {
        Some(Event::Progress(p)) => assert_eq!(p.sequence, 0),
        other => panic!("expected progress, got {other:?}"),
    }
    let pad = "x".repeat(2000);
    let total = 3000u64;
    for b in 0..(total / 100) {
        let recs = (0..100)
            .map(|i| json!({"id": format!("k{:05}", b * 100 + i), "n": pad}))
            .collect();
        c.batch_mutate(batch(recs)).await.unwrap();
    }
    // Writes were not slowed by the stalled subscriber; now read what reached it.
    let mut got = Vec::new();
    let status = loop {
        match next(&mut s).await {
            Ok(Some(Event::Change(ch))) => got.push(ch.sequence),
            Ok(Some(Event::Progress(_))) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(st) => break st,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("from_sequence"), "{status:?}");
    assert!((got.len() as u64) < total, "cut off before the end");
    let last = got.last().copied().unwrap_or(0);
    let mut s = c.subscribe(sub(last, &["id"])).await.unwrap().into_inner();
    let rest = changes_until(&mut s, total).await;
    got.extend(rest.iter().map(|c| c.sequence));
    assert_eq!(
        got,
        (1..=total).collect::<Vec<_>>(),
        "each change once, in order"
    );
    let (_, metrics) = foldmesh_e2e::http::get(&node.admin, "/metrics").unwrap();
    let cut = foldmesh_e2e::http::sample(
        &metrics,
        "fold_subscription_ends_total",
        &[("reason", "overflow")],
    );
    assert_eq!(cut, Some(1.0), "{metrics}");
}

/// With --change-log-retention, a subscription from before the oldest kept change is
/// OUT_OF_RANGE naming it, never a silent jump; from there on it works. Also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_when_the_change_log_no_longer_keeps_it() {
    let (dir, mut node, mut c) = setup(&["--change-log-retention", "10"]).await;
    let recs = (0..50)
        .map(|i| json!({"id": format!("k{i:03}"), "n": i}))
        .collect();
    c.batch_mutate(batch(recs)).await.unwrap();
    for from in [0, 39] {
        let e = c.subscribe(sub(from, &[])).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("oldest kept is 41"), "{e:?}");
    }
    // An open subscription does not hold up a graceful stop: it ends saying where to resume.
    let mut open = c.subscribe(sub(45, &[])).await.unwrap().into_inner();
    changes_until(&mut open, 50).await;
    node.proc.sigterm();
    let ended = loop {
        match next(&mut open).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("from_sequence = 50"), "{ended:?}");
    assert!(
        node.proc.wait_exit(Duration::from_secs(5)).is_some(),
        "the node stops without waiting out its grace period"
    );
    node = NodeProc::start(dir.path(), &["--change-log-retention", "10"]).unwrap();
    let mut c = fold(&node.grpc);
    let e = c.subscribe(sub(0, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let mut s = c.subscribe(sub(40, &[])).await.unwrap().into_inner();
    let got = changes_until(&mut s, 50).await;
    assert_eq!(
        got.iter().map(|c| c.sequence).collect::<Vec<_>>(),
        (41..=50).collect::<Vec<_>>()
    );
    match next(&mut s).await.unwrap() {
        Some(Event::Progress(p)) => {
            assert_eq!(
                (p.sequence, p.head_sequence, p.oldest_sequence),
                (50, 50, 41)
            )
        }
        other => panic!("expected progress, got {other:?}"),
    }
}
