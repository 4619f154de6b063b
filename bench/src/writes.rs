//! The write phase: durable Mutate writes/s at 1, 32 and 128 in flight against a plain
//! O_DSYNC 4 KiB write loop on the same disk (measured in the same run), BatchMutate of 1,000
//! records per call, and point-read latency idle vs. during the 128-in-flight write load
//! (issue 18's targets; docs/BENCHMARKS.md).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{BatchMutateRequest, BatchMutation, MutateRequest, MutationType};
use serde_json::json;
use tonic::transport::Channel;

use crate::{Lat, channel, lat, prepare, query, start_node};

/// Bytes of the value each write carries.
const VALUE: usize = 128;
/// Records per BatchMutate call.
const BATCH: usize = 1000;
/// Connections the concurrent writers share (as in the read throughput phase).
const CONNECTIONS: usize = 8;
/// Upper bound of any one loop, whatever the time.
const MAX_OPS: u64 = 10_000_000;

#[derive(serde::Serialize, Default, Debug)]
pub struct WriteResults {
    /// 4 KiB writes/s to a file opened with O_DSYNC in the node's data directory.
    pub fsync_4k_writes_per_s: f64,
    /// (requests in flight, acknowledged durable Mutate UPDATEs/s, mean requests per commit).
    pub mutate_per_s: Vec<(usize, f64, f64)>,
    /// Records/s of BatchMutate calls of 1,000 CREATEs, one call in flight.
    pub batch_records_per_s: f64,
    pub read_idle: Option<Lat>,
    pub read_under_writes: Option<Lat>,
    /// Upper bound (µs) of the node's storage-time histogram bucket holding the p99 of the
    /// point reads' storage operation (the redb read), idle and under the write load: shows
    /// whether reads wait for a write group inside storage.
    pub read_storage_p99_bound_us_idle: Option<f64>,
    pub read_storage_p99_bound_us_under_writes: Option<f64>,
}

/// The node's storage-time histogram of point reads (`op="query"`): (bucket bound in seconds,
/// cumulative count).
fn read_buckets(admin: &str) -> Vec<(f64, f64)> {
    let text = foldmesh_e2e::http::get(admin, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("fold_storage_operation_seconds_bucket{") && l.contains("op=\"query\"")
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The bound (µs) of the bucket holding the 99th percentile of what was observed between two
/// snapshots of [`read_buckets`].
fn p99_bound_us(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let was = before.iter().find(|(l, _)| l == le).map_or(0.0, |x| x.1);
            (*le, c - was)
        })
        .collect();
    let total = delta.iter().map(|x| x.1).fold(0.0, f64::max);
    if total == 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= 0.99 * total)
        .map(|(le, _)| le * 1e6)
}

fn mutate(kind: MutationType, key: &str, value: &str) -> MutateRequest {
    let data = json!({"k": key, "payload": value});
    MutateRequest {
        idempotency_key: String::new(),
        schema: "Bench".into(),
        mutation_type: kind as i32,
        data: data.as_object().map(map_to_struct),
        target_node_id: String::new(),
    }
}

/// O_DSYNC 4 KiB appends for `secs` (what `dd bs=4k oflag=dsync` does): the disk's durable
/// write rate without any batching.
fn fsync_reference(dir: &Path, secs: f64) -> anyhow::Result<f64> {
    let path = dir.join("fsync-reference.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(&path)?;
    let block = [0u8; 4096];
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end && n < MAX_OPS {
        f.write_all(&block)?;
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The node's group-size histogram so far: (sum, count) of requests per commit.
fn group_stats(admin: &str) -> (f64, f64) {
    let text = foldmesh_e2e::http::get(admin, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let v = |n: &str| foldmesh_e2e::http::sample(&text, n, &[]).unwrap_or(0.0);
    (
        v("fold_commit_group_requests_sum"),
        v("fold_commit_group_requests_count"),
    )
}

/// Sequential point reads until `end` or `max` reads, as another client: its own connection and
/// its own runtime on its own thread, so its requests do not queue behind the writers' tasks
/// inside this process. Each read's latency.
fn read_probe(
    addr: &str,
    end: Instant,
    max: usize,
) -> std::thread::JoinHandle<anyhow::Result<Vec<Duration>>> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c = FoldNodeClient::new(channel(&addr));
            // Warm up the connection first.
            for _ in 0..10 {
                c.query(query("")).await?;
            }
            let mut v = Vec::new();
            while Instant::now() < end && v.len() < max {
                let t = Instant::now();
                c.query(query("")).await?;
                v.push(t.elapsed());
            }
            Ok(v)
        })
    })
}

async fn join_probe(
    probe: std::thread::JoinHandle<anyhow::Result<Vec<Duration>>>,
) -> anyhow::Result<Vec<Duration>> {
    tokio::task::spawn_blocking(move || probe.join())
        .await?
        .map_err(|_| anyhow!("the read probe thread panicked"))?
}

/// `concurrency` writers, each UPDATEing its own record (keys `<tag>-<i>`) in a loop for `secs`;
/// acknowledged writes/s. With `probe`, one more task reads one record sequentially meanwhile.
async fn write_load(
    addr: &str,
    tag: &str,
    concurrency: usize,
    secs: u64,
    probe: bool,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let chans: Vec<Channel> = (0..CONNECTIONS).map(|_| channel(addr)).collect();
    let value = "v".repeat(VALUE);
    // Each writer's record exists before the clock starts.
    let mut creates = Vec::new();
    for i in 0..concurrency {
        let mut c = FoldNodeClient::new(chans[i % CONNECTIONS].clone());
        let req = mutate(MutationType::Create, &format!("{tag}-{i}"), &value);
        creates.push(tokio::spawn(async move { c.mutate(req).await }));
    }
    for t in creates {
        t.await??;
    }
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut c = FoldNodeClient::new(chans[i % CONNECTIONS].clone());
        let req = mutate(MutationType::Update, &format!("{tag}-{i}"), &value);
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end && done.load(Ordering::Relaxed) < MAX_OPS {
                c.mutate(req.clone()).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let reader = probe.then(|| read_probe(addr, end, MAX_OPS as usize));
    for t in tasks {
        t.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let reads = match reader {
        Some(r) => join_probe(r).await?,
        None => Vec::new(),
    };
    Ok((rate, reads))
}

/// BatchMutate calls of 1,000 new records each, one at a time, for `secs`; records/s.
async fn batch_load(addr: &str, secs: u64) -> anyhow::Result<f64> {
    let mut c = FoldNodeClient::new(channel(addr));
    let value = "v".repeat(VALUE);
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut records = 0u64;
    let mut j = 0u64;
    while Instant::now() < end && records < MAX_OPS {
        let mutations = (0..BATCH)
            .map(|r| {
                let data = json!({"k": format!("b{j}-{r}"), "payload": value});
                BatchMutation {
                    mutation_type: MutationType::Create as i32,
                    data: data.as_object().map(map_to_struct),
                }
            })
            .collect();
        let resp = c
            .batch_mutate(BatchMutateRequest {
                idempotency_key: String::new(),
                schema: "Bench".into(),
                mutations,
                target_node_id: String::new(),
            })
            .await?
            .into_inner();
        if resp.results.len() != BATCH {
            return Err(anyhow!(
                "a batch of {BATCH} answered {} results",
                resp.results.len()
            ));
        }
        records += BATCH as u64;
        j += 1;
    }
    Ok(records as f64 / started.elapsed().as_secs_f64())
}

/// The whole write phase on a fresh node (node + sidecar) of its own.
pub async fn measure(secs: u64, n: usize) -> anyhow::Result<WriteResults> {
    let node = start_node()?;
    prepare(&node).await?;
    let mut r = WriteResults::default();

    let dir = node.data.clone();
    let fsync = tokio::task::spawn_blocking(move || fsync_reference(&dir, 2.0)).await??;
    eprintln!("  plain O_DSYNC 4 KiB writes (fsync reference): {fsync:>8.0} writes/s");
    r.fsync_4k_writes_per_s = fsync;

    for concurrency in [1, 32, 128] {
        let before = group_stats(&node.node_admin);
        let (rate, _) = write_load(
            &node.grpc,
            &format!("c{concurrency}"),
            concurrency,
            secs,
            false,
        )
        .await?;
        let after = group_stats(&node.node_admin);
        let per_group = (after.0 - before.0) / (after.1 - before.1).max(1.0);
        eprintln!(
            "  Mutate UPDATE, {concurrency:>3} in flight: {rate:>8.0} durable writes/s ({per_group:.1} requests per commit; {:.2}× 1 in flight, {:.2}× fsync)",
            rate / r.mutate_per_s.first().map_or(rate, |x| x.1),
            rate / fsync
        );
        r.mutate_per_s.push((concurrency, rate, per_group));
    }

    let batch = batch_load(&node.grpc, secs).await?;
    eprintln!("  BatchMutate, {BATCH} records per call: {batch:>8.0} records/s");
    r.batch_records_per_s = batch;

    let before = read_buckets(&node.node_admin);
    let idle = join_probe(read_probe(
        &node.grpc,
        Instant::now() + Duration::from_secs(secs),
        n,
    ))
    .await?;
    r.read_idle = Some(lat("point read (Query one key), idle", idle));
    let mid = read_buckets(&node.node_admin);
    let (rate, reads) = write_load(&node.grpc, "probe", 128, secs, true).await?;
    r.read_under_writes = Some(lat(
        &format!("point read during 128-in-flight writes ({rate:.0} writes/s)"),
        reads,
    ));
    let after = read_buckets(&node.node_admin);
    r.read_storage_p99_bound_us_idle = p99_bound_us(&before, &mid);
    r.read_storage_p99_bound_us_under_writes = p99_bound_us(&mid, &after);
    eprintln!(
        "  point reads' storage time in the node (redb read), p99 within the bucket ≤ {:.0} µs idle, ≤ {:.0} µs under the write load",
        r.read_storage_p99_bound_us_idle.unwrap_or(f64::NAN),
        r.read_storage_p99_bound_us_under_writes.unwrap_or(f64::NAN)
    );
    Ok(r)
}
