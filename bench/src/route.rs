//! The routing phase (issue 14): schema-addressed reads (`route: ROUTE_ANY`) from a client node
//! with no data to three providers on loopback, measured from one run:
//! - the spread over equal providers and the cost of routing against naming the node;
//! - the **shift time** after one provider is slowed (a cgroup CPU quota, root only): from the
//!   slowdown until the slow provider's share of a sliding 500 ms window stays under 10%;
//! - the error rate after one provider is killed under load (before and after 1 s);
//! - with 10% injected failures on one provider (`--fault-percent 10`): client-visible errors
//!   and nodes asked per client request.
//!
//! Every loop is bounded in count and time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{LoadSchemaRequest, MutateRequest, MutationType, QueryRequest, Route};
use foldmesh_e2e::loopback::{self, Node};
use serde_json::json;

use crate::{Lat, channel, lat};

/// Upper bound of requests in any one loop, whatever the time.
const MAX_OPS: usize = 200_000;
const WORKERS: usize = 4;
const WINDOW: Duration = Duration::from_millis(500);

#[derive(serde::Serialize, Default, Debug)]
pub struct RouteResults {
    /// Share of route-any queries each provider answered (equal providers).
    pub spread: Vec<f64>,
    pub any_latency: Option<Lat>,
    pub named_latency: Option<Lat>,
    /// Seconds from slowing one provider until its share stays under 10% (None: no cgroup).
    pub shift_secs: Option<f64>,
    /// Its share of the traffic from 5 s after the slowdown on.
    pub slow_share_after_5s: Option<f64>,
    /// Its share in [0, 0.5 s), [0.5 s, 1 s), [1 s, 5 s) after the slowdown.
    pub slow_share_windows: Vec<f64>,
    /// Requests it answered after the slowdown, and their p50 latency (µs).
    pub slow_requests: usize,
    pub slow_p50_us: Option<f64>,
    /// The slowed provider asked by name (sequential, while slowed): how slow it was.
    pub slow_named: Option<Lat>,
    /// (requests, failed) in the first second after the kill, and after it.
    pub kill_first_second: (usize, usize),
    pub kill_after: (usize, usize),
    /// With 10% injected failures on one provider: requests, client-visible failures, nodes
    /// asked per client request.
    pub faults_requests: usize,
    pub faults_failed: usize,
    pub faults_attempts_per_request: f64,
}

fn notes() -> String {
    use foldmesh_e2e::client::{field, schema};
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
    .to_string()
}

fn any_query(route: Route, target: &str) -> QueryRequest {
    QueryRequest {
        schema: "Notes".into(),
        fields: vec!["id".into(), "body".into()],
        route: route as i32,
        target_node_id: target.into(),
        ..Default::default()
    }
}

struct Mesh {
    client: Node,
    providers: Vec<Node>,
}

async fn mesh(provider_flags: [&[&str]; 3]) -> anyhow::Result<Mesh> {
    // The client node's per-client rate limit (1,000/s) is raised: this measures routing.
    let client = loopback::start(&[
        "--provider-ttl-secs",
        "4",
        "--rate-limit-per-client",
        "1000000",
        "--rate-limit-burst",
        "1000000",
    ]);
    let mut providers = Vec::new();
    for (i, extra) in provider_flags.iter().enumerate() {
        let mut flags = vec!["--unknown-peer-distance", "1"];
        flags.extend_from_slice(extra);
        // The sidecar's per-peer inbound rate limit (200/s by default) would refuse the bench's
        // load; raised here, this measures routing.
        let p = loopback::start_with(
            &["--peer-rate-limit", "100000", "--peer-rate-burst", "100000"],
            &flags,
        );
        let mut owner = p.node.owner_fold();
        owner
            .load_schema(LoadSchemaRequest {
                schema_json: notes(),
                approve: true,
            })
            .await?;
        let data = json!({"id": format!("from-{i}"), "body": "x".repeat(512)});
        owner
            .mutate(MutateRequest {
                schema: "Notes".into(),
                mutation_type: MutationType::Create as i32,
                data: data.as_object().map(map_to_struct),
                ..Default::default()
            })
            .await?;
        client.dial(&p).await;
        providers.push(p);
    }
    // Wait until a routed query works (the providers' records reach the DHT).
    let mut c = FoldNodeClient::new(channel(&client.node.grpc));
    let started = Instant::now();
    loop {
        if c.query(any_query(Route::Any, "")).await.is_ok() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("route-any queries never succeeded within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Mesh { client, providers })
}

/// (when it ended, answering node or None on failure, nodes asked, latency)
type Sample = (Instant, Option<String>, u32, Duration);

fn failure_codes(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| s.1.is_none()).count()
}

async fn load(
    addr: &str,
    dur: Duration,
    route: Route,
    target: &str,
) -> anyhow::Result<Vec<Sample>> {
    let started = Instant::now();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let mut c = FoldNodeClient::new(channel(addr));
        let count = count.clone();
        let target = target.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<Sample> = Vec::new();
            while started.elapsed() < dur
                && count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < MAX_OPS
            {
                let t = Instant::now();
                let mut req = tonic::Request::new(any_query(route, &target));
                req.set_timeout(Duration::from_secs(5));
                match c.query(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        out.push((
                            Instant::now(),
                            Some(r.node_id),
                            r.attempts.max(1),
                            t.elapsed(),
                        ))
                    }
                    Err(e) => {
                        if out.iter().all(|s: &Sample| s.1.is_some()) {
                            eprintln!(
                                "  (first failure of a client: {:?} {})",
                                e.code(),
                                e.message()
                            );
                        }
                        out.push((Instant::now(), None, 1, t.elapsed()))
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_by_key(|s| s.0);
    Ok(all)
}

fn share(samples: &[Sample], node: &str) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples
        .iter()
        .filter(|s| s.1.as_deref() == Some(node))
        .count() as f64
        / samples.len() as f64
}

/// When the slow node's share of a sliding window last rose to 10% or more, after `from`:
/// the shift is complete from the end of that window.
fn shift_time(samples: &[Sample], from: Instant, slow: &str) -> Option<f64> {
    let mut last_bad = from;
    let mut t = from;
    let end = samples.last()?.0;
    while t + WINDOW <= end {
        let w: Vec<Sample> = samples
            .iter()
            .filter(|s| s.0 >= t && s.0 < t + WINDOW)
            .cloned()
            .collect();
        if w.len() >= 5 && share(&w, slow) >= 0.1 {
            last_bad = t + WINDOW;
        }
        t += WINDOW / 5;
    }
    Some(last_bad.saturating_duration_since(from).as_secs_f64())
}

pub async fn measure(secs: u64) -> anyhow::Result<RouteResults> {
    let secs = secs.max(5);
    let mut r = RouteResults::default();
    eprintln!("== routing: three providers on loopback, {WORKERS} clients in flight");
    let m = mesh([&[], &[], &[]]).await?;
    let addr = m.client.node.grpc.clone();
    let ids: Vec<String> = m.providers.iter().map(|p| p.id.clone()).collect();

    let warm = load(&addr, Duration::from_secs(secs), Route::Any, "").await?;
    r.spread = ids.iter().map(|id| share(&warm, id)).collect();
    eprintln!(
        "  spread over equal providers: {:?} ({} requests, {} failed)",
        r.spread,
        warm.len(),
        failure_codes(&warm)
    );
    r.any_latency = Some(lat(
        "route any (3 providers)",
        warm.iter().filter(|s| s.1.is_some()).map(|s| s.3).collect(),
    ));
    let named = load(&addr, Duration::from_secs(secs), Route::Default, &ids[0]).await?;
    r.named_latency = Some(lat(
        "named node (forwarded)",
        named
            .iter()
            .filter(|s| s.1.is_some())
            .map(|s| s.3)
            .collect(),
    ));

    // Slow provider 2 with a CPU quota (root only).
    let slow_pids: Vec<u32> = [m.providers[2].node.proc.pid(), m.providers[2].sidecar.pid()]
        .into_iter()
        .flatten()
        .collect();
    match foldmesh_e2e::cgroup::CpuLimit::new("bench-slow", 1_000, 100_000) {
        Ok(limit) => {
            for pid in &slow_pids {
                limit.add(*pid)?;
            }
            let from = Instant::now();
            let slowed = load(&addr, Duration::from_secs(secs.max(10)), Route::Any, "").await?;
            r.shift_secs = shift_time(&slowed, from, &ids[2]);
            let late: Vec<Sample> = slowed
                .iter()
                .filter(|s| s.0 >= from + Duration::from_secs(5))
                .cloned()
                .collect();
            r.slow_share_after_5s = Some(share(&late, &ids[2]));
            let window = |a: u64, b: u64| -> Vec<Sample> {
                slowed
                    .iter()
                    .filter(|s| {
                        s.0 >= from + Duration::from_millis(a)
                            && s.0 < from + Duration::from_millis(b)
                    })
                    .cloned()
                    .collect()
            };
            r.slow_share_windows = [(0, 500), (500, 1000), (1000, 5000)]
                .iter()
                .map(|(a, b)| share(&window(*a, *b), &ids[2]))
                .collect();
            let mut on_slow: Vec<Duration> = slowed
                .iter()
                .filter(|s| s.1.as_deref() == Some(ids[2].as_str()))
                .map(|s| s.3)
                .collect();
            on_slow.sort();
            r.slow_requests = on_slow.len();
            r.slow_p50_us = on_slow
                .get(on_slow.len() / 2)
                .map(|d| d.as_secs_f64() * 1e6);
            eprintln!(
                "  slow provider: {} requests after the slowdown (p50 {:.1} ms); share in [0,0.5 s) {:.3}, [0.5,1 s) {:.3}, [1,5 s) {:.3}",
                r.slow_requests,
                r.slow_p50_us.unwrap_or(0.0) / 1000.0,
                r.slow_share_windows[0],
                r.slow_share_windows[1],
                r.slow_share_windows[2]
            );
            eprintln!(
                "  slowed one provider: shift complete after {:.2} s; its share from 5 s on {:.3}; errors {}",
                r.shift_secs.unwrap_or(f64::NAN),
                r.slow_share_after_5s.unwrap_or(f64::NAN),
                slowed.iter().filter(|s| s.1.is_none()).count()
            );
            let mut c = FoldNodeClient::new(channel(&addr));
            let mut v = Vec::new();
            let probe_started = Instant::now();
            while v.len() < 100 && probe_started.elapsed() < Duration::from_secs(20) {
                let t = Instant::now();
                if c.query(any_query(Route::Default, &ids[2])).await.is_ok() {
                    v.push(t.elapsed());
                }
            }
            r.slow_named = Some(lat("slowed provider by name (sequential)", v));
            drop(limit);
        }
        Err(e) => eprintln!("  (no slow-provider measurement: {e:#})"),
    }

    // Kill provider 1 under load.
    let mut m = m;
    let loader = {
        let addr = addr.clone();
        tokio::spawn(async move { load(&addr, Duration::from_secs(secs), Route::Any, "").await })
    };
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
    let killed = Instant::now();
    m.providers[1].node.proc.kill9();
    m.providers[1].sidecar.kill9();
    let during = loader.await??;
    let count = |from: Instant, to: Instant| {
        let w: Vec<&Sample> = during.iter().filter(|s| s.0 >= from && s.0 < to).collect();
        (w.len(), w.iter().filter(|s| s.1.is_none()).count())
    };
    let far = killed + Duration::from_secs(3600);
    r.kill_first_second = count(killed, killed + Duration::from_secs(1));
    r.kill_after = count(killed + Duration::from_secs(1), far);
    eprintln!(
        "  killed one provider: first second {} requests, {} failed; after {} requests, {} failed",
        r.kill_first_second.0, r.kill_first_second.1, r.kill_after.0, r.kill_after.1
    );
    drop(m);

    // 10% injected failures on one provider.
    let m = mesh([&["--fault-percent", "10"], &[], &[]]).await?;
    let addr = m.client.node.grpc.clone();
    let f = load(&addr, Duration::from_secs(secs), Route::Any, "").await?;
    r.faults_requests = f.len();
    r.faults_failed = f.iter().filter(|s| s.1.is_none()).count();
    let attempts: u64 = f.iter().map(|s| u64::from(s.2)).sum();
    r.faults_attempts_per_request = attempts as f64 / f.len().max(1) as f64;
    eprintln!(
        "  10% faults on one provider: {} requests, {} failed ({:.3}%), {:.3} nodes asked per request; shares {:?}",
        r.faults_requests,
        r.faults_failed,
        100.0 * r.faults_failed as f64 / r.faults_requests.max(1) as f64,
        r.faults_attempts_per_request,
        {
            let mut s: HashMap<String, usize> = HashMap::new();
            for x in &f {
                if let Some(n) = &x.1 {
                    *s.entry(n.chars().take(16).collect()).or_default() += 1;
                }
            }
            s
        }
    );
    Ok(r)
}
