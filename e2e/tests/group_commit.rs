//! Group commit and BatchMutate end to end, on the real fold-node binary: acknowledged writes
//! survive `kill -9` under concurrent load and batches are all or nothing; a refused mutation
//! fails alone inside a group; a refused batch writes nothing and names the record.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, MutationType, RangeFilter, range_filter::Filter,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::{Value as Json, json};
use tonic::Code;
use tonic::transport::Channel;

/// Writers: many requests from one address must not meet the per-client rate limit.
const NO_RATE_LIMIT: &[&str] = &["--rate-limit-per-client", "0"];

fn log_schema() -> Json {
    schema(
        "Log",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!("NoRequirement")),
            "n": field(json!("NoRequirement"), json!("NoRequirement")),
        }),
    )
}

fn bm(kind: MutationType, data: Json) -> BatchMutation {
    BatchMutation {
        mutation_type: kind as i32,
        data: data.as_object().map(map_to_struct),
    }
}

fn batch(mutations: Vec<BatchMutation>) -> BatchMutateRequest {
    BatchMutateRequest {
        idempotency_key: String::new(),
        schema: "Log".into(),
        mutations,
        target_node_id: String::new(),
    }
}

fn prefix(p: &str) -> Option<RangeFilter> {
    Some(RangeFilter {
        filter: Some(Filter::KeyPrefix(p.into())),
    })
}

/// `id → n` of every record whose key starts with `p`.
async fn values(c: &mut FoldNodeClient<Channel>, p: &str) -> HashMap<String, Json> {
    let r = c
        .query(query_req("Log", &["n"], prefix(p)))
        .await
        .unwrap()
        .into_inner();
    records(&r)
        .into_iter()
        .map(|(k, v)| (k, v["n"].clone()))
        .collect()
}

/// Groups the node's writer has taken so far (`fold_commit_group_requests` observations).
async fn group_commits(admin: &str) -> f64 {
    let admin = admin.to_string();
    let (_, text) =
        tokio::task::spawn_blocking(move || foldmesh_e2e::http::get(&admin, "/metrics"))
            .await
            .unwrap()
            .unwrap();
    foldmesh_e2e::http::sample(&text, "fold_commit_group_requests_count", &[]).unwrap_or(0.0)
}

async fn start_with_schema(dir: &std::path::Path, extra: &[&str]) -> NodeProc {
    let node = NodeProc::start(dir, extra).expect("fold-node starts");
    fold(&node.grpc)
        .load_schema(load_req(&log_schema(), true))
        .await
        .unwrap();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_and_batches_are_all_or_nothing() {
    const WRITERS: usize = 32;
    const PER_WRITER: usize = 2000;
    const BATCHES: usize = 400;
    const BATCH: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_with_schema(dir.path(), NO_RATE_LIMIT).await;
    let chans: Vec<Channel> = (0..4).map(|_| channel(&node.grpc)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let batches_acked = Arc::new(AtomicUsize::new(0));

    // 32 writers: each CREATEs its own keys w<t>-<i> (n = i) and after each UPDATEs w<t>-0 to
    // n = i. They record what was acknowledged and stop at the first error (the kill).
    let mut writers = Vec::new();
    for t in 0..WRITERS {
        let mut c = FoldNodeClient::new(chans[t % chans.len()].clone());
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut created = Vec::new();
            let mut last_update = None;
            for i in 0..PER_WRITER {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("w{t}-{i}");
                let r = c
                    .mutate(mutate_req(
                        "Log",
                        MutationType::Create,
                        json!({"id": key, "n": i}),
                    ))
                    .await;
                if r.is_err() {
                    break;
                }
                created.push(i);
                if i > 0 {
                    let r = c
                        .mutate(mutate_req(
                            "Log",
                            MutationType::Update,
                            json!({"id": format!("w{t}-0"), "n": i}),
                        ))
                        .await;
                    if r.is_err() {
                        break;
                    }
                    last_update = Some(i);
                }
            }
            (t, created, last_update)
        }));
    }
    // One batch writer: batches b<j>-<r> of 50 records each.
    let batcher = {
        let mut c = FoldNodeClient::new(chans[0].clone());
        let stop = stop.clone();
        let batches_acked = batches_acked.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for j in 0..BATCHES {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let muts = (0..BATCH)
                    .map(|r| {
                        bm(
                            MutationType::Create,
                            json!({"id": format!("b{j:03}-{r}"), "n": r}),
                        )
                    })
                    .collect();
                match c.batch_mutate(batch(muts)).await {
                    Ok(resp) => {
                        assert_eq!(resp.into_inner().results.len(), BATCH);
                        acked.push(j);
                        batches_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            acked
        })
    };

    // Let the load run (a few hundred group commits, a few batches), then kill -9 while it is
    // in flight.
    let started = Instant::now();
    let admin = node.admin.clone();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, metrics) = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || foldmesh_e2e::http::get(&admin, "/metrics").unwrap()
        })
        .await
        .unwrap();
        let groups = foldmesh_e2e::http::sample(&metrics, "fold_commit_group_requests_count", &[])
            .unwrap_or(0.0);
        let enough = groups >= 200.0 && batches_acked.load(Ordering::Relaxed) >= 3;
        if enough || started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    node.proc.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut acked_writers = Vec::new();
    for w in writers {
        acked_writers.push(w.await.unwrap());
    }
    let acked_batches = batcher.await.unwrap();
    drop(node);
    assert!(
        acked_writers.iter().any(|(_, c, _)| c.len() < PER_WRITER) && acked_batches.len() < BATCHES,
        "the kill came after the load had finished"
    );

    let node = NodeProc::start(dir.path(), NO_RATE_LIMIT).unwrap();
    let mut c = fold(&node.grpc);
    let mut total = 0;
    for (t, created, last_update) in acked_writers {
        let got = values(&mut c, &format!("w{t}-")).await;
        for i in &created {
            let v = got
                .get(&format!("w{t}-{i}"))
                .unwrap_or_else(|| panic!("acknowledged CREATE w{t}-{i} is missing"));
            if *i > 0 {
                assert_eq!(v, &json!(i), "w{t}-{i}");
            }
        }
        total += created.len();
        // w<t>-0 holds the last acknowledged UPDATE or the one in flight at the kill.
        if let Some(u) = last_update {
            let n = got[&format!("w{t}-0")].as_u64().unwrap() as usize;
            assert!(
                n == u || n == u + 1,
                "w{t}-0 is {n}, last acknowledged update {u}"
            );
        }
    }
    for j in 0..BATCHES {
        let n = values(&mut c, &format!("b{j:03}-")).await.len();
        assert!(
            n == 0 || n == BATCH,
            "batch {j} is half-applied: {n} records"
        );
        if acked_batches.contains(&j) {
            assert_eq!(n, BATCH, "acknowledged batch {j} is missing");
        }
    }
    assert!(total > 0, "the writers wrote nothing before the kill");
    eprintln!(
        "{total} acknowledged creates and {} acknowledged batches survived kill -9",
        acked_batches.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_an_invalid_mutation_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_with_schema(dir.path(), NO_RATE_LIMIT).await;
    let mut c = fold(&node.grpc);
    for k in ["taken-0", "taken-1"] {
        c.mutate(mutate_req(
            "Log",
            MutationType::Create,
            json!({"id": k, "n": 0}),
        ))
        .await
        .unwrap();
    }
    let groups_before = group_commits(&node.admin).await;
    let chans: Vec<Channel> = (0..4).map(|_| channel(&node.grpc)).collect();
    // 96 at once: every third is invalid, alternately a CREATE of an existing record
    // (ALREADY_EXISTS) and an UPDATE of a missing one (NOT_FOUND).
    let mut tasks = Vec::new();
    for i in 0..96usize {
        let mut c = FoldNodeClient::new(chans[i % chans.len()].clone());
        tasks.push(tokio::spawn(async move {
            let (want, req) = match (i % 3, i % 2) {
                (2, 0) => (
                    Some(Code::AlreadyExists),
                    mutate_req(
                        "Log",
                        MutationType::Create,
                        json!({"id": "taken-0", "n": i}),
                    ),
                ),
                (2, _) => (
                    Some(Code::NotFound),
                    mutate_req(
                        "Log",
                        MutationType::Update,
                        json!({"id": format!("missing-{i}"), "n": i}),
                    ),
                ),
                _ => (
                    None,
                    mutate_req(
                        "Log",
                        MutationType::Create,
                        json!({"id": format!("ok-{i:02}"), "n": i}),
                    ),
                ),
            };
            (i, want, c.mutate(req).await)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (i, want, r) = t.await.unwrap();
        match want {
            None => {
                let r = r.unwrap_or_else(|e| panic!("valid mutation {i} failed: {e:?}"));
                assert_eq!(r.into_inner().range_key, format!("ok-{i:02}"));
                ok += 1;
            }
            Some(code) => {
                let e = r.expect_err("invalid mutation succeeded");
                assert_eq!(e.code(), code, "mutation {i}: {e:?}");
            }
        }
    }
    assert_eq!(ok, 64);
    // They went through shared groups (one transaction holding several of them), not one by
    // one: fewer groups than requests.
    let groups = group_commits(&node.admin).await - groups_before;
    assert!(groups < 96.0, "{groups} groups for 96 concurrent mutations");

    // (Same node, default message size.) More than 10,000 mutations in one batch is refused
    // before anything is tried, even when the request is small enough.
    let many: Vec<BatchMutation> = (0..10_001)
        .map(|r| bm(MutationType::Create, json!({"id": format!("m{r}"), "n": 1})))
        .collect();
    let e = c.batch_mutate(batch(many)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("at most 10000"), "{}", e.message());
    assert!(values(&mut c, "m").await.is_empty());
    let got = values(&mut c, "ok-").await;
    assert_eq!(got.len(), 64);
    for (k, v) in &got {
        let i: u64 = k.trim_start_matches("ok-").parse().unwrap();
        assert_eq!(v, &json!(i));
    }
    assert!(values(&mut c, "missing-").await.is_empty());
    assert_eq!(values(&mut c, "taken-0").await["taken-0"], json!(0));
}

#[tokio::test]
async fn a_batch_with_one_invalid_record_is_refused_whole_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_with_schema(dir.path(), &["--max-message-bytes", "65536"]).await;
    let mut c = fold(&node.grpc);
    c.mutate(mutate_req(
        "Log",
        MutationType::Create,
        json!({"id": "exists", "n": 0}),
    ))
    .await
    .unwrap();

    // Record 17 collides with a record that exists: refused by the data.
    let mut muts: Vec<BatchMutation> = (0..20)
        .map(|r| {
            bm(
                MutationType::Create,
                json!({"id": format!("x{r:02}"), "n": r}),
            )
        })
        .collect();
    muts[17] = bm(MutationType::Create, json!({"id": "exists", "n": 17}));
    let e = c.batch_mutate(batch(muts)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().starts_with("record 17: "), "{}", e.message());
    assert_eq!(
        e.metadata()
            .get("fold-failed-record")
            .and_then(|v| v.to_str().ok()),
        Some("17")
    );
    assert!(values(&mut c, "x").await.is_empty(), "nothing was written");
    assert_eq!(values(&mut c, "exists").await["exists"], json!(0));

    // Record 5 names a field the schema does not have: refused before anything is tried.
    let mut muts: Vec<BatchMutation> = (0..10)
        .map(|r| bm(MutationType::Create, json!({"id": format!("y{r}"), "n": r})))
        .collect();
    muts[5] = bm(MutationType::Create, json!({"id": "y5", "nope": 1}));
    let e = c.batch_mutate(batch(muts)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().starts_with("record 5: field 'nope'"),
        "{}",
        e.message()
    );
    assert!(values(&mut c, "y").await.is_empty());

    // A record that depends on an earlier one of the same batch fails when that one is absent
    // from the batch: UPDATE of z1 before its CREATE.
    let e = c
        .batch_mutate(batch(vec![
            bm(MutationType::Create, json!({"id": "z0", "n": 0})),
            bm(MutationType::Update, json!({"id": "z1", "n": 1})),
            bm(MutationType::Create, json!({"id": "z1", "n": 1})),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().starts_with("record 1: "), "{}", e.message());
    assert!(values(&mut c, "z").await.is_empty());

    // In the right order the same records are one atomic batch; each result is its record's.
    let r = c
        .batch_mutate(batch(vec![
            bm(MutationType::Create, json!({"id": "z0", "n": 0})),
            bm(MutationType::Create, json!({"id": "z1", "n": 1})),
            bm(MutationType::Update, json!({"id": "z1", "n": 2})),
            bm(MutationType::Delete, json!({"id": "z0"})),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 4);
    assert_eq!(
        r.results
            .iter()
            .map(|x| x.range_key.as_str())
            .collect::<Vec<_>>(),
        vec!["z0", "z1", "z1", "z0"]
    );
    assert_eq!(r.results[2].fields, vec!["n"]);
    assert_eq!(r.results[2].version_ids.len(), 1);
    let got = values(&mut c, "z").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got["z1"], json!(2));

    // Limits: empty, over the message size, another node.
    let e = c.batch_mutate(batch(vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let big: Vec<BatchMutation> = (0..100)
        .map(|r| {
            bm(
                MutationType::Create,
                json!({"id": format!("big{r}"), "n": "x".repeat(1000)}),
            )
        })
        .collect();
    let e = c.batch_mutate(batch(big)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(values(&mut c, "big").await.is_empty());
    let mut remote = batch(vec![bm(MutationType::Create, json!({"id": "r", "n": 1}))]);
    remote.target_node_id = "12D3KooWSomeOtherNode".into();
    let e = c.batch_mutate(remote).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "not a node id: {e:?}");
}
