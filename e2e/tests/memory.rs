//! Memory that stays inside its limit while the database grows (issue 28), on the real fold-node
//! binary: started with a small page cache (`--cache-size 8MiB`), it is written a database many
//! times that size (BatchMutate, with point reads of the records written so far in between), and
//! its resident memory (without the program's own code pages; see `rss_mib`), read from
//! `/proc/<pid>/status`, stays under a fixed bound the whole time.
//! The same load on a node with a cache as large as the database (what redb's 1 GiB default
//! amounts to) goes over that bound, so the bound measures the setting and not the load.

use std::time::Instant;

use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, MutationType, RangeFilter, range_filter::Filter,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::json;
use tonic::transport::Channel;

/// The page cache of the node under test.
const CACHE_MIB: u64 = 8;
/// The resident set it must stay under: the cache plus the overhead fold-node is documented to
/// need beyond it (docs/DEPLOY.md#memory: 48 MiB).
const BOUND_MIB: u64 = CACHE_MIB + 48;
/// The database is written until its file is this large: 12× the cache, and well past the bound
/// (a node caching all of it could not stay under it).
const TARGET_DB_MIB: u64 = 96;
/// Records per BatchMutate call, and an upper bound on calls (the loop is bounded in count).
const BATCH: usize = 1000;
const MAX_BATCHES: usize = 1000;
/// Payload of each record, bytes.
const PAYLOAD: usize = 2000;

/// Memory of `pid` in MiB that follows what the node does: its resident set without the pages
/// mapped from files (VmRSS − RssFile = RssAnon + RssShmem). The file-backed part is the program
/// itself (redb reads and writes its file, it does not map it): about 27 MiB of code for a debug
/// binary, which grows with every dependency and is not what the cache setting bounds. The
/// release image's whole container memory, code included, is checked against the chart's limit
/// by `deploy_memory.rs`.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc status"))
    };
    (field("RssAnon:") + field("RssShmem:")) / 1024.0
}

fn db_mib(node: &NodeProc) -> f64 {
    std::fs::metadata(node.data_dir.join("fold.redb")).map_or(0.0, |m| m.len() as f64 / 1048576.0)
}

fn batch(from: usize) -> BatchMutateRequest {
    let pad = "x".repeat(PAYLOAD);
    BatchMutateRequest {
        idempotency_key: String::new(),
        schema: "Log".into(),
        mutations: (from..from + BATCH)
            .map(|i| BatchMutation {
                data: None,
                mutation_type: MutationType::Create as i32,
                data_json: json!({"id": format!("k{i:08}"), "n": pad}).to_string(),
            })
            .collect(),
        target_node_id: String::new(),
    }
}

/// Reads 20 records spread over the `written` so far; each must be there.
async fn read_back(c: &mut FoldNodeClient<Channel>, written: usize, round: usize) {
    for j in 0..20 {
        let i = (round * 7919 + j * 104_729) % written;
        let filter = Some(RangeFilter {
            filter: Some(Filter::Key(format!("k{i:08}"))),
        });
        let r = c
            .query(query_req("Log", &["n"], filter))
            .await
            .expect("point read")
            .into_inner();
        assert_eq!(records(&r).len(), 1, "record k{i:08} is missing");
    }
}

/// Writes until the database is TARGET_DB_MIB; returns the largest RSS seen once the database
/// had passed the cache, and the database size reached.
async fn grow(extra: &[&str]) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--rate-limit-per-client", "0"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(dir.path(), &args).expect("fold-node starts");
    let pid = node.proc.pid().expect("pid");
    let schema = schema(
        "Log",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!("NoRequirement")),
            "n": field(json!("NoRequirement"), json!("NoRequirement")),
        }),
    );
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&schema, true)).await.unwrap();
    let (mut max_rss, mut written) = (0.0f64, 0usize);
    let started = Instant::now();
    for round in 0..MAX_BATCHES {
        c.batch_mutate(batch(written)).await.expect("batch written");
        written += BATCH;
        read_back(&mut c, written, round).await;
        let db = db_mib(&node);
        if db > CACHE_MIB as f64 {
            max_rss = max_rss.max(rss_mib(pid));
        }
        if db >= TARGET_DB_MIB as f64 {
            break;
        }
    }
    let db = db_mib(&node);
    eprintln!(
        "{extra:?}: {written} records, database {db:.0} MiB in {:.0} s; largest RSS once past the cache {max_rss:.1} MiB",
        started.elapsed().as_secs_f64()
    );
    (max_rss, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_under_the_cache_plus_overhead_while_the_database_grows_past_it() {
    let cache = format!("{CACHE_MIB}MiB");
    let (rss, db) = grow(&["--cache-size", &cache]).await;
    assert!(
        db >= TARGET_DB_MIB as f64,
        "the database reached only {db:.0} MiB in {MAX_BATCHES} batches"
    );
    assert!(
        rss <= BOUND_MIB as f64,
        "fold-node --cache-size {cache} reached {rss:.1} MiB resident with a {db:.0} MiB database; the bound is {BOUND_MIB} MiB"
    );
}

/// The control: with a cache large enough for the whole database the same load goes over the
/// bound, so the test above fails if the setting is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_larger_than_the_database_goes_over_that_bound() {
    let (rss, _) = grow(&["--cache-size", "1GiB"]).await;
    assert!(
        rss > BOUND_MIB as f64,
        "with a 1 GiB cache the node stayed at {rss:.1} MiB: the bound no longer tells the cache setting apart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cache_size_is_refused_at_start_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(foldmesh_e2e::process::bin_path("fold-node"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--cache-size", "64XB"])
        .output()
        .expect("run fold-node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cache-size") && err.contains("unknown unit"),
        "{err}"
    );
}
