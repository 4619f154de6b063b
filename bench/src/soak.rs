//! The soak phase (issue 28; docs/BENCHMARKS.md "Memory while the database grows"): three nodes
//! — A (a client node with no data), B (the owner of `Bench`) and R (a replica of B's `Bench`,
//! `--follow`) — each a fold-node with its p2p-sidecar, every fold-node started with the same
//! `--cache-size`. Under a mixed load (BatchMutate writes of new records to B until the database
//! is many times the cache, forwarded reads A → B, local reads on B, remote subscriptions on A to
//! B's schema, local subscriptions on R), the resident set of every process is sampled from
//! `/proc` over time; the result is each process's largest RSS once B's database has passed the
//! cache, its slope (MiB per 100,000 writes) after warm-up, and read and write times while the
//! data fits the cache against once it is many times larger.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, MutationType, QueryRequest, RangeFilter, SubscribeRequest,
    range_filter, subscribe_response::Event,
};
use tonic::transport::Channel;

use crate::changes::follower_with;
use crate::{Lat, Node, channel, lat, prepare, rss_kib, start_node_with};

/// Records per BatchMutate call.
const BATCH: u64 = 1000;
/// Bytes of each record's payload.
const PAYLOAD: usize = 100;
/// Interval of the local and of the forwarded reads (each sequential: at most 200/s each).
const READ_EVERY: Duration = Duration::from_millis(5);
/// Remote subscriptions on A to B's schema, and local ones on the replica R; the first
/// `UNFILTERED` of each take every change, the others a key prefix matching 1% of the keys.
const SUBSCRIPTIONS: usize = 8;
const UNFILTERED: usize = 2;
/// RSS allowed above the cache (the target).
const OVERHEAD_MIB: f64 = 48.0;
/// A slope below this many MiB per 100,000 writes counts as flat (the target).
const FLAT_MIB_PER_100K: f64 = 1.0;
/// Warm-up ends when a node's database is this many times the cache.
const WARM_FACTOR: u64 = 2;
/// "The data no longer fits": reads and writes once B's database is this many times the cache.
const PAST_FACTOR: u64 = 4;

#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The `--cache-size` given to every fold-node, as text and in bytes.
    pub cache: String,
    pub cache_bytes: u64,
    /// New records written to B.
    pub records: u64,
    pub sample_every: Duration,
    /// Upper bound of the whole write phase.
    pub max_time: Duration,
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub written: u64,
    pub db_b_bytes: u64,
    pub db_r_bytes: u64,
    /// Process → resident set, KiB.
    pub rss_kib: BTreeMap<String, u64>,
}

#[derive(serde::Serialize, Debug, Clone)]
pub struct ProcVerdict {
    pub process: String,
    pub max_rss_mib_after_cache: f64,
    pub bound_mib: f64,
    pub slope_mib_per_100k_writes: f64,
    pub within: bool,
    pub flat: bool,
}

#[derive(serde::Serialize, Debug, Default)]
pub struct SoakResults {
    pub cache_bytes: u64,
    pub records: u64,
    pub write_secs: f64,
    pub db_b_bytes: u64,
    pub db_r_bytes: u64,
    pub samples: Vec<Sample>,
    pub verdicts: Vec<ProcVerdict>,
    pub local_read_fits: Option<Lat>,
    pub local_read_past: Option<Lat>,
    pub forwarded_read_fits: Option<Lat>,
    pub forwarded_read_past: Option<Lat>,
    /// 1,000-record BatchMutate calls while the data fits the cache, and once it is
    /// PAST_FACTOR× the cache (call time).
    pub batch_fits: Option<Lat>,
    pub batch_past: Option<Lat>,
    pub read_errors: u64,
    pub reads_not_found: u64,
    /// Changes received by all subscribers together; gaps seen by the unfiltered ones.
    pub subscription_changes: u64,
    pub subscription_gaps: u64,
    pub subscription_ends: u64,
    /// Seconds after the last write until the replica had applied everything.
    pub replica_catch_up_secs: Option<f64>,
}

/// What the load tasks share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    written: AtomicU64,
    /// The sequence of the last record written.
    head: AtomicU64,
    /// B's database file size, refreshed every 200 ms.
    db_b: AtomicU64,
    /// (B's database size when the operation started, its time).
    local_reads: Mutex<Vec<(u64, Duration)>>,
    forwarded_reads: Mutex<Vec<(u64, Duration)>>,
    batches: Mutex<Vec<(u64, Duration)>>,
    read_errors: AtomicU64,
    not_found: AtomicU64,
    sub_changes: AtomicU64,
    sub_gaps: AtomicU64,
    sub_ends: AtomicU64,
}

fn push(v: &Mutex<Vec<(u64, Duration)>>, at: u64, d: Duration) {
    v.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((at, d));
}

fn db_size(n: &Node) -> u64 {
    std::fs::metadata(n.data.join("fold.redb")).map_or(0, |m| m.len())
}

fn key(i: u64) -> String {
    format!("s{i:08}")
}

fn point_query(k: &str, target: &str) -> QueryRequest {
    QueryRequest {
        route: 0,
        page_size: 0,
        page_token: String::new(),
        json_values: false,
        schema: "Bench".into(),
        fields: vec!["payload".into()],
        filter: Some(RangeFilter {
            filter: Some(range_filter::Filter::Key(k.to_string())),
        }),
        target_node_id: target.into(),
        definition_hash: String::new(),
        consistency: 0,
    }
}

/// Sequential BatchMutate calls of new records to B until `records` are written (or time is up).
async fn writer(b: Channel, sh: Arc<Shared>, records: u64, until: Instant) -> anyhow::Result<()> {
    let mut c = FoldNodeClient::new(b);
    let pad = "x".repeat(PAYLOAD);
    let mut next = 0u64;
    while next < records && Instant::now() < until {
        let n = BATCH.min(records - next);
        let mutations = (next..next + n)
            .map(|i| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: None,
                data_json: serde_json::json!({"k": key(i), "payload": pad}).to_string(),
            })
            .collect();
        let at = sh.db_b.load(Ordering::Relaxed);
        let t = Instant::now();
        let resp = c
            .batch_mutate(BatchMutateRequest {
                schema: "Bench".into(),
                mutations,
                target_node_id: String::new(),
                idempotency_key: String::new(),
            })
            .await?;
        push(&sh.batches, at, t.elapsed());
        let last = resp.into_inner().results.last().map_or(0, |m| m.sequence);
        sh.head.fetch_max(last, Ordering::Relaxed);
        next += n;
        sh.written.store(next, Ordering::Relaxed);
    }
    Ok(())
}

/// Point reads of written records, one at a time every READ_EVERY, on `via` (for `target`).
async fn reader(via: Channel, target: String, sh: Arc<Shared>, forwarded: bool) {
    let mut c = FoldNodeClient::new(via);
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // xorshift: a spread of keys without a dependency.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while !sh.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let written = sh.written.load(Ordering::Relaxed);
        if written == 0 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = key(x % written);
        let at = sh.db_b.load(Ordering::Relaxed);
        let t = Instant::now();
        match c.query(point_query(&k, &target)).await {
            Ok(r) => {
                let d = t.elapsed();
                if r.into_inner().records.len() != 1 {
                    sh.not_found.fetch_add(1, Ordering::Relaxed);
                }
                let list = if forwarded {
                    &sh.forwarded_reads
                } else {
                    &sh.local_reads
                };
                push(list, at, d);
            }
            Err(_) => {
                sh.read_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn sub_request(i: usize, target: &str, from: u64) -> SubscribeRequest {
    let filter = (i >= UNFILTERED).then(|| RangeFilter {
        // s0000xxxx … s0009xxxx: one key in a hundred of the first million.
        filter: Some(range_filter::Filter::KeyPrefix(format!("s000{}", i % 10))),
    });
    SubscribeRequest {
        route: 0,
        schema: "Bench".into(),
        from_sequence: from,
        fields: vec!["payload".into()],
        filter,
        json_values: true,
        target_node_id: target.into(),
        definition_hash: String::new(),
    }
}

/// One subscriber: counts changes (and gaps, when unfiltered), resubscribes from the last
/// sequence received if its stream ends, until told to stop.
async fn subscriber(via: Channel, target: String, i: usize, sh: Arc<Shared>) {
    let mut last = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let mut c = FoldNodeClient::new(via.clone());
        let mut s = match c.subscribe(sub_request(i, &target, last)).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                sh.sub_ends.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let m = tokio::select! {
                m = s.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if sh.stop.load(Ordering::Relaxed) { return; }
                    continue;
                }
            };
            match m {
                Ok(Some(m)) => {
                    if let Some(Event::Change(ch)) = m.event {
                        if i < UNFILTERED && ch.sequence != last + 1 {
                            sh.sub_gaps.fetch_add(1, Ordering::Relaxed);
                        }
                        last = ch.sequence;
                        sh.sub_changes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    sh.sub_ends.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

fn sample(t0: Instant, sh: &Shared, nodes: &[(&str, &Node)]) -> Sample {
    let mut rss = BTreeMap::new();
    for (name, n) in nodes {
        rss.insert(format!("fold-node {name}"), rss_kib(n.node.pid()));
        rss.insert(format!("sidecar {name}"), rss_kib(n.sidecar.pid()));
    }
    rss.insert("fold-bench".into(), rss_kib(Some(std::process::id())));
    Sample {
        t_s: t0.elapsed().as_secs_f64(),
        written: sh.written.load(Ordering::Relaxed),
        db_b_bytes: db_size(nodes[1].1),
        db_r_bytes: db_size(nodes[2].1),
        rss_kib: rss,
    }
}

fn print_sample(s: &Sample) {
    let procs: Vec<String> = s
        .rss_kib
        .iter()
        .map(|(k, v)| format!("{k}={:.1}", *v as f64 / 1024.0))
        .collect();
    eprintln!(
        "  t={:>5.0}s written={:>8} db B={:>5.0} MiB R={:>5.0} MiB | RSS MiB: {}",
        s.t_s,
        s.written,
        s.db_b_bytes as f64 / 1048576.0,
        s.db_r_bytes as f64 / 1048576.0,
        procs.join(" ")
    );
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

/// Each process's largest RSS once B's database passed the cache, and its slope over writes
/// once its node's database (B's for A, B and the sidecars; R's for R) is WARM_FACTOR× the cache.
fn verdicts(samples: &[Sample], cache: u64) -> Vec<ProcVerdict> {
    let bound = cache as f64 / 1048576.0 + OVERHEAD_MIB;
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    first
        .rss_kib
        .keys()
        .filter(|p| p.as_str() != "fold-bench")
        .map(|p| {
            let db = |s: &Sample| {
                if p.ends_with(" R") {
                    s.db_r_bytes
                } else {
                    s.db_b_bytes
                }
            };
            let mib = |s: &Sample| s.rss_kib.get(p).copied().unwrap_or(0) as f64 / 1024.0;
            let max = samples
                .iter()
                .filter(|s| s.db_b_bytes > cache)
                .map(mib)
                .fold(0.0, f64::max);
            let warm: Vec<(f64, f64)> = samples
                .iter()
                .filter(|s| db(s) > WARM_FACTOR * cache)
                .map(|s| (s.written as f64 / 100_000.0, mib(s)))
                .collect();
            let k = slope(&warm);
            ProcVerdict {
                process: p.clone(),
                max_rss_mib_after_cache: max,
                bound_mib: bound,
                slope_mib_per_100k_writes: k,
                within: max <= bound,
                flat: k < FLAT_MIB_PER_100K,
            }
        })
        .collect()
}

/// The operations timed while B's database was smaller than the cache, and once it was
/// PAST_FACTOR× the cache.
fn split(name: &str, v: &Mutex<Vec<(u64, Duration)>>, cache: u64) -> (Option<Lat>, Option<Lat>) {
    let v = v.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let fits: Vec<Duration> = v
        .iter()
        .filter(|(at, _)| *at < cache)
        .map(|p| p.1)
        .collect();
    let past: Vec<Duration> = v
        .iter()
        .filter(|(at, _)| *at > PAST_FACTOR * cache)
        .map(|p| p.1)
        .collect();
    let f = (!fits.is_empty()).then(|| lat(&format!("{name}, data fits the cache"), fits));
    let p =
        (!past.is_empty()).then(|| lat(&format!("{name}, data ≥ {PAST_FACTOR}× the cache"), past));
    (f, p)
}

async fn start_mesh(o: &SoakOptions) -> anyhow::Result<(Node, Node, Node)> {
    let cache = ["--cache-size", o.cache.as_str()];
    let a = start_node_with(&cache)?;
    let b = start_node_with(&cache)?;
    prepare(&a).await?;
    prepare(&b).await?;
    fold_proto::v1::network_client::NetworkClient::new(channel(&a.grpc))
        .dial(fold_proto::v1::DialRequest {
            address: format!(
                "{}/p2p/{}",
                b.listen.split(',').next().unwrap_or_default(),
                b.node_id
            ),
        })
        .await?;
    let r = follower_with(&b, &cache).await?;
    // Warm the paths (connections, the forward stream) before anything is timed.
    let mut ca = FoldNodeClient::new(channel(&a.grpc));
    for _ in 0..100 {
        ca.query(crate::query(&b.node_id)).await?;
    }
    Ok((a, b, r))
}

fn spawn_load(a: &Node, b: &Node, r: &Node, sh: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(reader(channel(&b.grpc), String::new(), sh.clone(), false)),
        tokio::spawn(reader(
            channel(&a.grpc),
            b.node_id.clone(),
            sh.clone(),
            true,
        )),
    ];
    let (on_a, on_r) = (channel(&a.grpc), channel(&r.grpc));
    for i in 0..SUBSCRIPTIONS {
        tasks.push(tokio::spawn(subscriber(
            on_a.clone(),
            b.node_id.clone(),
            i,
            sh.clone(),
        )));
        tasks.push(tokio::spawn(subscriber(
            on_r.clone(),
            String::new(),
            i,
            sh.clone(),
        )));
    }
    tasks
}

pub async fn measure(o: SoakOptions) -> anyhow::Result<SoakResults> {
    eprintln!(
        "== soak: --cache-size {} on every fold-node; {} new records to B in batches of {BATCH}",
        o.cache, o.records
    );
    let (a, b, r) = start_mesh(&o).await?;
    let sh = Arc::new(Shared::default());
    let nodes = [("A", &a), ("B", &b), ("R", &r)];
    let tasks = spawn_load(&a, &b, &r, &sh);
    let t0 = Instant::now();
    let mut write = tokio::spawn(writer(
        channel(&b.grpc),
        sh.clone(),
        o.records,
        t0 + o.max_time,
    ));
    let mut samples = vec![sample(t0, &sh, &nodes)];
    print_sample(&samples[0]);
    let mut next = Instant::now() + o.sample_every;
    let mut write_secs = None;
    let caught;
    // Sample through the writes and then the replica's catch-up (the load goes on), until the
    // replica has everything or 300 s after the last write.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sh.db_b.store(db_size(&b), Ordering::Relaxed);
        if write_secs.is_none() && write.is_finished() {
            (&mut write).await??;
            write_secs = Some(t0.elapsed().as_secs_f64());
        }
        if let Some(w) = write_secs {
            let head = sh.head.load(Ordering::Relaxed);
            let applied = crate::changes::replica_head(&r).await.map_or(0, |h| h.0);
            let after = t0.elapsed().as_secs_f64() - w;
            if applied >= head || after > 300.0 {
                caught = (applied >= head).then_some(after);
                break;
            }
        }
        if Instant::now() >= next {
            next += o.sample_every;
            samples.push(sample(t0, &sh, &nodes));
            print_sample(samples.last().ok_or_else(|| anyhow!("no sample"))?);
        }
    }
    samples.push(sample(t0, &sh, &nodes));
    print_sample(samples.last().ok_or_else(|| anyhow!("no sample"))?);
    sh.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let res = results(&o, &sh, samples, write_secs.unwrap_or_default(), caught);
    print_verdicts(&res);
    Ok(res)
}

fn results(
    o: &SoakOptions,
    sh: &Shared,
    samples: Vec<Sample>,
    write_secs: f64,
    caught: Option<f64>,
) -> SoakResults {
    let c = o.cache_bytes;
    let (lf, lp) = split("local read on B", &sh.local_reads, c);
    let (ff, fp) = split("forwarded read A → B", &sh.forwarded_reads, c);
    let (bf, bp) = split("BatchMutate of 1,000 records on B", &sh.batches, c);
    let last = samples.last().cloned();
    SoakResults {
        cache_bytes: c,
        records: sh.written.load(Ordering::Relaxed),
        write_secs,
        db_b_bytes: last.as_ref().map_or(0, |s| s.db_b_bytes),
        db_r_bytes: last.as_ref().map_or(0, |s| s.db_r_bytes),
        verdicts: verdicts(&samples, c),
        samples,
        local_read_fits: lf,
        local_read_past: lp,
        forwarded_read_fits: ff,
        forwarded_read_past: fp,
        batch_fits: bf,
        batch_past: bp,
        read_errors: sh.read_errors.load(Ordering::Relaxed),
        reads_not_found: sh.not_found.load(Ordering::Relaxed),
        subscription_changes: sh.sub_changes.load(Ordering::Relaxed),
        subscription_gaps: sh.sub_gaps.load(Ordering::Relaxed),
        subscription_ends: sh.sub_ends.load(Ordering::Relaxed),
        replica_catch_up_secs: caught,
    }
}

fn print_verdicts(r: &SoakResults) {
    eprintln!(
        "  wrote {} records in {:.0} s ({:.0}/s); database B {:.0} MiB, R {:.0} MiB; cache {:.0} MiB",
        r.records,
        r.write_secs,
        r.records as f64 / r.write_secs.max(1e-9),
        r.db_b_bytes as f64 / 1048576.0,
        r.db_r_bytes as f64 / 1048576.0,
        r.cache_bytes as f64 / 1048576.0
    );
    eprintln!(
        "  reads: {} errors, {} not found; subscriptions: {} changes, {} gaps, {} ends; replica caught up {} after the last write",
        r.read_errors,
        r.reads_not_found,
        r.subscription_changes,
        r.subscription_gaps,
        r.subscription_ends,
        r.replica_catch_up_secs
            .map_or("NOT (within 300 s)".to_string(), |s| format!("{s:.1} s"))
    );
    for v in &r.verdicts {
        eprintln!(
            "  {:<16} max RSS after the cache {:>6.1} MiB (bound {:.0}: {}), slope {:>+6.2} MiB/100k writes ({})",
            v.process,
            v.max_rss_mib_after_cache,
            v.bound_mib,
            if v.within { "within" } else { "OVER" },
            v.slope_mib_per_100k_writes,
            if v.flat { "flat" } else { "GROWING" }
        );
    }
}
