//! fold-bench: the foldmesh paths measured side by side in one run, against their floor and the
//! earlier design. See docs/BENCHMARKS.md; run with `scripts/bench.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use fold_proto::json::map_to_struct;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::{
    LoadSchemaRequest, MutateRequest, MutationType, QueryRequest, QueryResponse, RangeFilter,
    range_filter,
};
use foldmesh_e2e::process::{Proc, parse_kv};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

mod changes;
mod dht;
mod dht_procs;
mod echo;
mod floors;
mod nat;
mod route;
mod soak;
mod writes;

#[derive(Parser)]
#[command(
    name = "fold-bench",
    about = "Measure foldmesh's paths side by side in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Sequential round trips per latency measurement.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Seconds of the fixed-rate and throughput phases.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Where to write results.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Skip the phases that need root (network namespaces for mDNS).
    #[arg(long)]
    no_netns: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// A bare tonic unary server answering Query with a fixed 1 KiB record (the throughput
    /// reference); prints "echo ready addr=<addr>".
    EchoServer,
    /// Only the DHT scaling phase.
    Dht,
    /// Only the routing phase: route-any reads over three providers on loopback — spread,
    /// shift time off a provider slowed by a CPU quota (root), errors after a provider is
    /// killed, and failover under 10% injected failures.
    Route,
    /// Across NATs, in a lab of network namespaces (needs root): time to relay reservation, to
    /// the first relayed request and to the direct upgrade (DCUtR), and forwarded Query latency
    /// relayed vs. direct (`--n` sequential queries each). Writes <out>/nat.json.
    Nat {
        /// Labs of each kind (each gives one sample of the times).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Provider lookups on real p2p-sidecar processes (loopback), at 20, 50 and 100 processes:
    /// time per lookup and peers asked. Writes <out>/dht_procs.json.
    DhtProcs {
        /// Mesh sizes.
        #[arg(long, value_delimiter = ',', default_value = "20,50,100")]
        sizes: Vec<usize>,
        /// Lookups per size.
        #[arg(long, default_value_t = 20)]
        lookups: usize,
    },
    /// Only the write phase: durable Mutate writes/s at 1, 32 and 128 in flight against a plain
    /// fsync reference, BatchMutate records/s, point reads idle vs. under write load.
    Writes,
    /// Only the data-that-moves phase: live propagation latency of a change to a subscriber,
    /// locally and to a replica across the mesh (`--follow`), catch-up rates, and replica lag
    /// under a steady write load.
    Changes,
    /// Memory while the database grows past the page cache (issue 28): three nodes (A with no
    /// data, owner B, replica R of B's schema), every fold-node at `--cache-mib`; BatchMutate
    /// writes of `--records` new records to B under forwarded reads A → B, local reads on B, 8
    /// remote subscriptions on A to B and 8 local ones on R. Prints each process's RSS over time,
    /// its largest RSS once B's database passed the cache and its slope after warm-up, and read
    /// and write times while the data fits the cache against once it is 4× larger. Writes
    /// <out>/soak.json.
    Soak {
        /// Page cache of every fold-node (--cache-size), MiB.
        #[arg(long, default_value_t = 64)]
        cache_mib: u64,
        /// New records written to B (in BatchMutate calls of 1,000).
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Seconds between RSS samples.
        #[arg(long, default_value_t = 5)]
        sample_secs: u64,
        /// Longest the write phase may take, in seconds.
        #[arg(long, default_value_t = 1200)]
        max_secs: u64,
    },
    /// The floor of a forwarded query (issue 26), in one run: a message each way on an open tonic
    /// stream over a UDS and on an open libp2p stream, one Ed25519 sign and verify (the
    /// sidecar's own functions), their sum on the forwarded path, and beside them verification in
    /// batches and under load (one at a time vs. the sidecar's batcher); then direct and
    /// forwarded Query latency (`--n` sequential), for each concurrency `--secs` s of direct and
    /// of forwarded queries (rate and CPU per query in each process), and `--secs` s of each at a
    /// fixed `--rate`. Writes <out>/floors.json.
    Floors {
        /// Concurrencies of the load loops.
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        concurrency: Vec<usize>,
        /// Queries per second of the fixed-rate phase (`--secs` s of direct, then of forwarded
        /// queries, each sent on schedule on its own task whatever the answers take; latency
        /// counted from each query's send; the schedule keeps to tokio's 1 ms timer ticks). 0
        /// skips it.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// Two nodes and forwarded queries for `--secs` seconds, printing the process ids first (for
    /// profiling the forwarded path, e.g. `perf record -p`), then the rate and each hop's mean
    /// time from the processes' own metrics.
    ForwardLoop {
        /// Queries in flight at once (each on its own task; one connection).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Query node A itself instead (the direct path), for comparison.
        #[arg(long)]
        local: bool,
    },
}

const PAYLOAD: usize = 1024;

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("exe dir").join(name)
}

#[derive(serde::Serialize, Clone, Debug)]
struct Lat {
    name: String,
    n: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
}

fn lat(name: &str, mut v: Vec<Duration>) -> Lat {
    v.sort();
    let pick = |q: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1e6
    };
    let l = Lat {
        name: name.to_string(),
        n: v.len(),
        p50_us: pick(0.5),
        p90_us: pick(0.9),
        p99_us: pick(0.99),
    };
    eprintln!(
        "  {:<58} n={:<6} p50={:>9.1}µs p90={:>9.1}µs p99={:>9.1}µs",
        l.name, l.n, l.p50_us, l.p90_us, l.p99_us
    );
    l
}

async fn sequential<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..(n / 10).max(10) {
        f().await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        v.push(t.elapsed());
    }
    Ok(v)
}

// ---- processes -------------------------------------------------------------------------------

struct Node {
    _dir: tempfile::TempDir,
    data: PathBuf,
    sidecar: Proc,
    node: Proc,
    node_id: String,
    listen: String,
    grpc: String,
    node_admin: String,
    sidecar_admin: String,
}

fn start_node() -> anyhow::Result<Node> {
    start_node_with(&[])
}

/// A node whose fold-node also gets `extra` flags.
fn start_node_with(extra: &[&str]) -> anyhow::Result<Node> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let mut sc = Command::new(bin("p2p-sidecar"));
    sc.arg("--data-dir")
        .arg(&data)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--peer-rate-limit", "0"])
        .env("RUST_LOG", "warn");
    let (sidecar, line) = Proc::spawn(sc, "p2p-sidecar ready", Duration::from_secs(20))?;
    let node_id = parse_kv(&line, "node_id").ok_or_else(|| anyhow!("no node id"))?;
    let listen = parse_kv(&line, "listen").ok_or_else(|| anyhow!("no listen"))?;
    let sidecar_admin = parse_kv(&line, "admin").ok_or_else(|| anyhow!("no sidecar admin"))?;
    let mut nd = Command::new(bin("fold-node"));
    nd.arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args([
            "--rate-limit-per-client",
            "0",
            "--unknown-peer-distance",
            "0",
        ])
        .args(extra)
        .env("RUST_LOG", "warn");
    let (node, line) = Proc::spawn(nd, "fold-node ready", Duration::from_secs(20))?;
    let grpc = parse_kv(&line, "grpc").ok_or_else(|| anyhow!("no grpc"))?;
    let node_admin = parse_kv(&line, "admin").ok_or_else(|| anyhow!("no node admin"))?;
    Ok(Node {
        node_admin,
        sidecar_admin,
        _dir: dir,
        data,
        sidecar,
        node,
        node_id,
        listen,
        grpc,
    })
}

fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .tcp_nodelay(true)
        .connect_lazy()
}

fn schema() -> Json {
    let f = json!({
        "permission_policy": {"read_policy": "NoRequirement", "write_policy": "NoRequirement"},
        "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
        "field_type": "Range", "field_mappers": {}
    });
    json!({"name": "Bench", "schema_type": {"Range": {"range_key": "k"}},
           "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
           "fields": {"k": f.clone(), "payload": f}})
}

pub fn query(target: &str) -> QueryRequest {
    QueryRequest {
        route: 0,
        page_size: 0,
        page_token: String::new(),
        json_values: false,
        schema: "Bench".into(),
        fields: vec!["payload".into()],
        filter: Some(RangeFilter {
            filter: Some(range_filter::Filter::Key("r1".into())),
        }),
        target_node_id: target.into(),
        definition_hash: Default::default(),
        consistency: 0,
    }
}

async fn prepare(node: &Node) -> anyhow::Result<()> {
    let mut c = FoldNodeClient::new(channel(&node.grpc));
    c.load_schema(LoadSchemaRequest {
        schema_json: schema().to_string(),
        approve: true,
    })
    .await?;
    let data = json!({"k": "r1", "payload": "x".repeat(PAYLOAD)});
    c.mutate(MutateRequest {
        data_json: String::new(),
        idempotency_key: String::new(),
        schema: "Bench".into(),
        mutation_type: MutationType::Create as i32,
        data: data.as_object().map(map_to_struct),
        target_node_id: String::new(),
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fold_proto::v1::network_client::NetworkClient::new(channel(&node.grpc))
        .status(fold_proto::v1::NetworkStatusRequest {})
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err(anyhow!("node never reached its sidecar"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---- the floor and the earlier design ----------------------------------------------------------

async fn tcp_floor(n: usize) -> anyhow::Result<Vec<Duration>> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; PAYLOAD];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let s = Arc::new(tokio::sync::Mutex::new(s));
    let out = vec![7u8; PAYLOAD];
    sequential(n, || {
        let s = s.clone();
        let out = out.clone();
        async move {
            let mut s = s.lock().await;
            s.write_all(&out).await?;
            let mut back = vec![0u8; PAYLOAD];
            s.read_exact(&mut back).await?;
            Ok(())
        }
    })
    .await
}

fn json_reply() -> Vec<u8> {
    serde_json::to_vec(&json!({"results": [{"payload": "x".repeat(PAYLOAD)}], "errors": []}))
        .unwrap_or_default()
}

async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    let mut buf = vec![0u8; len.min(10_000_000)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> std::io::Result<()> {
    s.write_u32(b.len() as u32).await?;
    s.write_all(b).await?;
    s.flush().await
}

fn json_request() -> Vec<u8> {
    serde_json::to_vec(&json!({"operation": "query", "params": {"schema": "Bench", "fields": ["payload"]}, "target_node_id": "peer"}))
        .unwrap_or_default()
}

/// The earlier design: a fresh plaintext TCP connection per forwarded request, one
/// length-prefixed JSON frame each way.
async fn fresh_tcp_json(n: usize) -> anyhow::Result<Vec<Duration>> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if let Ok(req) = read_frame(&mut s).await {
                    let _: Result<Json, _> = serde_json::from_slice(&req);
                    let _ = write_frame(&mut s, &json_reply()).await;
                }
            });
        }
    });
    sequential(n, || async move {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        write_frame(&mut s, &json_request()).await?;
        let r = read_frame(&mut s).await?;
        let _: Json = serde_json::from_slice(&r)?;
        Ok(())
    })
    .await
}

/// The same with a fresh TLS 1.3 handshake per request (a naive secure version).
async fn fresh_tls_json(n: usize) -> anyhow::Result<Vec<Duration>> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der())
        .map_err(|e| anyhow!("{e}"))?;
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(s).await
                    && read_frame(&mut s).await.is_ok()
                {
                    let _ = write_frame(&mut s, &json_reply()).await;
                }
            });
        }
    });
    let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
    sequential(n, || {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            // Without TCP_NODELAY the handshake's small writes sometimes wait ~44 ms (Nagle +
            // delayed ACK), which would measure the kernel, not the design.
            s.set_nodelay(true)?;
            let mut s = connector.connect(name, s).await?;
            write_frame(&mut s, &json_request()).await?;
            let r = read_frame(&mut s).await?;
            let _: Json = serde_json::from_slice(&r)?;
            Ok(())
        }
    })
    .await
}

// ---- fixed rate and throughput ------------------------------------------------------------------

/// `conns` connections together sending `rate` requests/s for `secs`; each request's latency.
async fn fixed_rate(addr: &str, target: &str, conns: usize, rate: u32, secs: u64) -> Vec<Duration> {
    let all = Arc::new(Mutex::new(Vec::new()));
    let per = Duration::from_secs_f64(conns as f64 / f64::from(rate));
    let mut tasks = Vec::new();
    for i in 0..conns {
        let mut c = FoldNodeClient::new(channel(addr));
        let q = query(target);
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            // Stagger the connections across one interval.
            tokio::time::sleep(per.mul_f64(i as f64 / conns as f64)).await;
            let mut tick = tokio::time::interval(per);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + Duration::from_secs(secs);
            let mut mine = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                let t = Instant::now();
                if c.query(q.clone()).await.is_ok() {
                    mine.push(t.elapsed());
                }
            }
            if let Ok(mut a) = all.lock() {
                a.extend(mine);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    all.lock().map(|v| v.clone()).unwrap_or_default()
}

/// Requests/s at `concurrency` for `secs` against `addr`, and the node-process RSS peak.
async fn throughput(
    addr: &str,
    concurrency: usize,
    secs: u64,
    watch: &[Option<u32>],
) -> (f64, Vec<u64>) {
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let chans: Vec<Channel> = (0..8).map(|_| channel(addr)).collect();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut c = FoldNodeClient::new(chans[i % chans.len()].clone());
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let q = query("");
            while Instant::now() < end {
                if c.query(q.clone()).await.is_ok() {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let watch = watch.to_vec();
    let sampler = tokio::spawn(async move {
        let mut peak = vec![0u64; watch.len()];
        while Instant::now() < end {
            for (i, p) in watch.iter().enumerate() {
                peak[i] = peak[i].max(rss_kib(*p));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let rate =
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, sampler.await.unwrap_or_default())
}

fn h2load(addr: &str, requests: u32) -> Option<(f64, String)> {
    let h2 = ["/usr/bin/h2load", "/usr/local/bin/h2load"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    use prost::Message;
    let msg = query("").encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let dir = tempfile::tempdir().ok()?;
    let file = dir.path().join("query.bin");
    std::fs::write(&file, &body).ok()?;
    let out = Command::new(h2)
        .args(["-n", &requests.to_string(), "-c", "16", "-m", "8"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&file)
        .arg(format!("http://{addr}/fold.v1.FoldNode/Query"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("req/s"))?.to_string();
    let rate = line
        .split(',')
        .find(|p| p.contains("req/s"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("")
        .to_string();
    Some((rate, status))
}

// ---- mDNS convergence ---------------------------------------------------------------------------

async fn mdns_convergence(hosts: usize) -> anyhow::Result<(f64, f64)> {
    let net = foldmesh_e2e::netns::TestNet::new(hosts)?;
    let mut procs = Vec::new();
    let mut socks = Vec::new();
    let mut dirs = Vec::new();
    let t0 = Instant::now();
    for i in 0..hosts {
        let dir = tempfile::tempdir()?;
        let mut c = net.command(i, bin("p2p-sidecar"));
        c.arg("--data-dir")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("/ip4/{}/tcp/4001", net.host_addr(i)))
            .args(["--mdns", "on", "--mdns-query-interval-secs", "5"])
            .args(["--admin-listen", "127.0.0.1:9465"])
            .env("RUST_LOG", "warn");
        let (p, _) = Proc::spawn(c, "p2p-sidecar ready", Duration::from_secs(30))?;
        procs.push(p);
        socks.push(dir.path().join("sidecar.sock"));
        dirs.push(dir);
    }
    let t_ready = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut all = true;
        for s in &socks {
            let ch = local_link::channel(
                &local_link::LinkAddr::Unix(s.clone()),
                Duration::from_secs(1),
            );
            let st = fold_proto::sidecar::mesh_client::MeshClient::new(ch)
                .status(fold_proto::sidecar::MeshStatusRequest {})
                .await;
            if st
                .map(|r| r.into_inner().connected_peers as usize)
                .unwrap_or(0)
                < hosts - 1
            {
                all = false;
                break;
            }
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            return Err(anyhow!("{hosts} hosts did not converge in 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let from_ready = t_ready.elapsed().as_secs_f64();
    let from_start = t0.elapsed().as_secs_f64();
    drop(procs);
    drop(net);
    Ok((from_ready, from_start))
}

// ---- main ---------------------------------------------------------------------------------------

#[derive(serde::Serialize, Default)]
struct Results {
    machine: String,
    latency: Vec<Lat>,
    dapr_terms: HashMap<String, f64>,
    throughput: HashMap<String, f64>,
    h2load: Option<String>,
    memory_kib: HashMap<String, u64>,
    mdns_convergence_s: Vec<(usize, f64, f64)>,
    dht_lookup: Vec<dht::DhtResult>,
    writes: Option<writes::WriteResults>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut r = Results {
        machine: machine(),
        ..Default::default()
    };
    eprintln!("fold-bench on {}", r.machine);
    let n = cli.n;

    eprintln!("== starting two nodes (node + sidecar each) on loopback");
    let (a, b) = two_connected_nodes().await?;
    let idle_node = rss_kib(a.node.pid());
    let idle_sidecar = rss_kib(a.sidecar.pid());

    eprintln!("== latency, sequential round trips with a 1 KiB payload");
    r.latency.push(lat(
        "raw loopback TCP round trip (floor)",
        tcp_floor(n).await?,
    ));
    let direct = {
        let c = FoldNodeClient::new(channel(&a.grpc));
        sequential(n, || {
            let mut c = c.clone();
            async move {
                c.query(query("")).await?;
                Ok(())
            }
        })
        .await?
    };
    let direct = lat("direct Query (client → fold-node)", direct);
    r.latency.push(direct.clone());
    let mesh = local_link::LinkAddr::Unix(a.data.join("sidecar.sock"));
    let hop = {
        let c = fold_proto::sidecar::mesh_client::MeshClient::new(local_link::channel(
            &mesh,
            Duration::from_secs(1),
        ));
        sequential(n, || {
            let mut c = c.clone();
            async move {
                c.status(fold_proto::sidecar::MeshStatusRequest {}).await?;
                Ok(())
            }
        })
        .await?
    };
    r.latency.push(lat(
        "sidecar hop (node → its sidecar over the UDS, Mesh.Status)",
        hop,
    ));
    let peer_sock = local_link::LinkAddr::Unix(a.data.join("node.sock"));
    let hop_back = {
        let c = fold_proto::sidecar::peer_requests_client::PeerRequestsClient::new(
            local_link::channel(&peer_sock, Duration::from_secs(1)),
        );
        sequential(n, || {
            let mut c = c.clone();
            async move {
                c.served_schemas(fold_proto::sidecar::ServedSchemasRequest {
                    origin_node_id: "bench".into(),
                    names: vec!["Bench".into()],
                })
                .await?;
                Ok(())
            }
        })
        .await?
    };
    r.latency.push(lat(
        "sidecar hop back (sidecar → its node over the UDS, ServedSchemas)",
        hop_back,
    ));
    let fwd = {
        let c = FoldNodeClient::new(channel(&a.grpc));
        let target = b.node_id.clone();
        sequential(n, || {
            let mut c = c.clone();
            let q = query(&target);
            async move {
                let r: QueryResponse = c.query(q).await?.into_inner();
                if r.records.is_empty() {
                    return Err(anyhow!("forwarded query returned nothing"));
                }
                Ok(())
            }
        })
        .await?
    };
    let fwd = lat(
        "forwarded Query (A → sidecar A → libp2p → sidecar B → B)",
        fwd,
    );
    r.latency.push(fwd.clone());
    r.latency.push(lat(
        "earlier design: fresh TCP + JSON frame per request",
        fresh_tcp_json(n).await?,
    ));
    r.latency.push(lat(
        "earlier design, secured: fresh TCP + TLS handshake + JSON per request",
        fresh_tls_json((n / 4).max(100)).await?,
    ));
    r.dapr_terms
        .insert("sequential_added_p50_us".into(), fwd.p50_us - direct.p50_us);
    eprintln!("== the forwarded path's floor (issue 26)");
    let (floor, _) = print_floors(n).await?;
    eprintln!(
        "  forwarded − direct p50 {:.1} µs = {:.2}× the sum of the floors",
        fwd.p50_us - direct.p50_us,
        (fwd.p50_us - direct.p50_us) / floor.p50_us
    );
    r.latency.push(floor);

    eprintln!(
        "== fixed rate: 1 KiB, 16 connections, 1000 requests/s, {} s each (Dapr's terms)",
        cli.secs
    );
    let d = lat(
        "fixed rate: direct Query",
        fixed_rate(&a.grpc, "", 16, 1000, cli.secs).await,
    );
    let f = lat(
        "fixed rate: forwarded Query",
        fixed_rate(&a.grpc, &b.node_id, 16, 1000, cli.secs).await,
    );
    r.dapr_terms
        .insert("fixed_rate_added_p50_us".into(), f.p50_us - d.p50_us);
    r.dapr_terms
        .insert("fixed_rate_added_p90_us".into(), f.p90_us - d.p90_us);
    r.dapr_terms
        .insert("dapr_published_added_p50_us".into(), 1680.0);
    r.latency.push(d);
    r.latency.push(f);

    eprintln!("== throughput at concurrency 32, {} s each", cli.secs);
    let (node_rps, peaks) =
        throughput(&a.grpc, 32, cli.secs, &[a.node.pid(), a.sidecar.pid()]).await;
    let mut echo_cmd = Command::new(bin("fold-bench"));
    echo_cmd.arg("echo-server");
    let (echo, line) = Proc::spawn(echo_cmd, "echo ready", Duration::from_secs(10))?;
    let echo_addr = parse_kv(&line, "addr").ok_or_else(|| anyhow!("no echo addr"))?;
    let (echo_rps, _) = throughput(&echo_addr, 32, cli.secs, &[]).await;
    eprintln!(
        "  fold-node local Query: {node_rps:.0} req/s; bare tonic unary echo: {echo_rps:.0} req/s; ratio {:.2}",
        node_rps / echo_rps
    );
    r.throughput.insert("fold_node_query_rps".into(), node_rps);
    r.throughput.insert("tonic_echo_rps".into(), echo_rps);
    r.throughput.insert("ratio".into(), node_rps / echo_rps);
    drop(echo);
    if let Some((rate, status)) = h2load(&a.grpc, 20_000) {
        eprintln!("  h2load (16 connections × 8 streams): {rate:.0} req/s; {status}");
        r.throughput.insert("h2load_rps".into(), rate);
        r.h2load = Some(status);
    } else {
        eprintln!("  h2load not installed (apt-get install nghttp2-client); skipped");
    }

    eprintln!("== memory (resident set)");
    r.memory_kib.insert("node_idle".into(), idle_node);
    r.memory_kib.insert("sidecar_idle".into(), idle_sidecar);
    r.memory_kib.insert(
        "node_under_load".into(),
        peaks.first().copied().unwrap_or(0),
    );
    r.memory_kib.insert(
        "sidecar_under_load".into(),
        peaks.get(1).copied().unwrap_or(0),
    );
    let peers = 16;
    let mut extra = Vec::new();
    for _ in 0..peers {
        let dir = tempfile::tempdir()?;
        let mut c = Command::new(bin("p2p-sidecar"));
        c.arg("--data-dir")
            .arg(dir.path())
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--bootstrap")
            .arg(format!("{}/p2p/{}", a.listen, a.node_id))
            .env("RUST_LOG", "warn");
        let (p, _) = Proc::spawn(c, "p2p-sidecar ready", Duration::from_secs(20))?;
        extra.push((p, dir));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = fold_proto::sidecar::mesh_client::MeshClient::new(local_link::channel(
            &mesh,
            Duration::from_secs(1),
        ))
        .status(fold_proto::sidecar::MeshStatusRequest {})
        .await?
        .into_inner();
        if st.connected_peers as usize > peers || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.memory_kib.insert(
        format!("sidecar_with_{}_peers", peers + 1),
        rss_kib(a.sidecar.pid()),
    );
    drop(extra);
    for (k, v) in &r.memory_kib {
        eprintln!("  {k:<28} {:>7.1} MiB", *v as f64 / 1024.0);
    }

    if !cli.no_netns {
        eprintln!("== mDNS discovery convergence in network namespaces");
        for hosts in [5, 10, 20] {
            let (ready, start) = mdns_convergence(hosts).await?;
            eprintln!(
                "  {hosts:>2} hosts: all connected {:.0} ms after the last was ready ({:.2} s from the first start)",
                ready * 1000.0,
                start
            );
            r.mdns_convergence_s.push((hosts, ready, start));
        }
    }

    eprintln!("== DHT provider lookups, in-process nodes on libp2p's memory transport");
    for nodes in [50, 100, 200] {
        let d = dht::measure(nodes, 20).await?;
        eprintln!(
            "  {nodes:>3} nodes: lookup p50 {:.1} ms, p90 {:.1} ms, {:.1} requests on average, found {}/{} ({}/{nodes} bootstrapped, provider record {})",
            d.p50_ms,
            d.p90_ms,
            d.mean_requests,
            d.found,
            d.lookups,
            d.bootstrapped,
            if d.provided { "stored" } else { "NOT stored" }
        );
        r.dht_lookup.push(d);
    }

    eprintln!(
        "== writes: durable Mutate at 1/32/128 in flight, BatchMutate, reads under write load ({} s each)",
        cli.secs
    );
    r.writes = Some(writes::measure(cli.secs, n).await?);

    std::fs::create_dir_all(&cli.out)?;
    let file = cli.out.join("results.json");
    std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
    eprintln!("== wrote {}", file.display());
    drop((a, b));
    Ok(())
}

/// Two nodes (node + sidecar each) on loopback, schema loaded on both, A connected to B.
async fn two_connected_nodes() -> anyhow::Result<(Node, Node)> {
    let a = start_node()?;
    let b = start_node()?;
    prepare(&a).await?;
    prepare(&b).await?;
    fold_proto::v1::network_client::NetworkClient::new(channel(&a.grpc))
        .dial(fold_proto::v1::DialRequest {
            address: format!("{}/p2p/{}", b.listen, b.node_id),
        })
        .await?;
    Ok((a, b))
}

/// What a load loop measured: queries answered, their rate, and CPU per query in each process.
#[derive(serde::Serialize, Clone, Debug)]
struct LoopResult {
    concurrency: usize,
    queries: u64,
    per_second: f64,
    /// (process, CPU µs per query); processes whose CPU could not be read are left out.
    cpu_us: Vec<(&'static str, f64)>,
}

impl LoopResult {
    /// CPU per query summed over the four mesh processes (both nodes, both sidecars).
    fn mesh_cpu_us(&self) -> f64 {
        self.cpu_us
            .iter()
            .filter(|(p, _)| *p != CLIENT)
            .map(|(_, us)| us)
            .sum()
    }
}

const CLIENT: &str = "fold-bench (client)";

/// `concurrency` tasks querying node A for `target` (empty: A itself) for `secs` seconds on one
/// connection, after a warm-up; CPU is counted only over the measured loop.
async fn load_loop(
    a: &Node,
    b: &Node,
    target: &str,
    secs: u64,
    concurrency: usize,
) -> anyhow::Result<LoopResult> {
    let c = FoldNodeClient::new(channel(&a.grpc));
    for _ in 0..200 {
        c.clone().query(query(target)).await?;
    }
    let procs = [
        (CLIENT, Some(std::process::id())),
        ("node A", a.node.pid()),
        ("sidecar A", a.sidecar.pid()),
        ("sidecar B", b.sidecar.pid()),
        ("node B", b.node.pid()),
    ];
    let cpu_before: Vec<Option<f64>> = procs.iter().map(|(_, p)| cpu_secs(*p)).collect();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut c = c.clone();
        let target = target.to_string();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                c.query(query(&target)).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await??;
    }
    let mut cpu_us = Vec::new();
    for ((what, pid), before) in procs.iter().zip(cpu_before) {
        if let (Some(before), Some(after)) = (before, cpu_secs(*pid)) {
            cpu_us.push((*what, (after - before) * 1e6 / n.max(1) as f64));
        }
    }
    Ok(LoopResult {
        concurrency,
        queries: n,
        per_second: n as f64 / secs.max(1) as f64,
        cpu_us,
    })
}

/// Queries to `target` (empty: node A itself) sent on a fixed schedule, `rate` per second for
/// `secs` seconds, each on its own task whether or not the earlier ones were answered (an open
/// loop: a slow answer never delays the next query). Each latency counts from the moment its
/// query was sent. The schedule is kept to tokio's timer (1 ms ticks): at each tick every query
/// that is due is sent, and how late the last one left is printed. At most `rate × secs`
/// queries; the phase ends when the last is answered.
async fn at_fixed_rate(
    c: &FoldNodeClient<tonic::transport::Channel>,
    target: &str,
    rate: u32,
    secs: u64,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..200 {
        c.clone().query(query(target)).await?;
    }
    let period = Duration::from_secs(1) / rate.max(1);
    let total = u64::from(rate.max(1)).saturating_mul(secs.max(1));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut latest = Duration::ZERO;
    for i in 0..total {
        let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due).await;
        latest = latest.max(due.elapsed());
        let mut c = c.clone();
        let q = query(target);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r: QueryResponse = c.query(q).await?.into_inner();
            if r.records.is_empty() {
                return Err(anyhow!("query returned nothing"));
            }
            anyhow::Ok(sent.elapsed())
        }));
    }
    let mut v = Vec::with_capacity(tasks.len());
    for t in tasks {
        v.push(t.await??);
    }
    eprintln!(
        "  {} queries in {:.2} s; the latest left {:.1} ms after its scheduled time",
        v.len(),
        start.elapsed().as_secs_f64(),
        latest.as_secs_f64() * 1e3
    );
    Ok(v)
}

async fn forward_loop(secs: u64, concurrency: usize, local: bool) -> anyhow::Result<()> {
    let (a, b) = two_connected_nodes().await?;
    let pid = |p: &Proc| p.pid().map(|p| p.to_string()).unwrap_or_default();
    println!(
        "pids node_a={} sidecar_a={} sidecar_b={} node_b={}",
        pid(&a.node),
        pid(&a.sidecar),
        pid(&b.sidecar),
        pid(&b.node)
    );
    let target = if local {
        String::new()
    } else {
        b.node_id.clone()
    };
    let what = if local { "direct" } else { "forwarded" };
    let r = load_loop(&a, &b, &target, secs, concurrency).await?;
    let n = r.queries;
    println!(
        "{n} {what} queries in {secs} s at concurrency {concurrency}: {:.0}/s, {:.0} µs each",
        n as f64 / secs as f64,
        secs as f64 * 1e6 * concurrency as f64 / n as f64
    );
    println!("CPU time per {what} query (user + system, from /proc/<pid>/stat):");
    for (what, us) in &r.cpu_us {
        println!("  {what:<36} {us:>6.0} µs");
    }
    println!(
        "Mean time per hop (each process's own gRPC metrics; each line includes the ones below it):"
    );
    let hops = [
        (
            &a.node_admin,
            "server",
            "fold.v1.FoldNode",
            "Query",
            "node A serves Query",
        ),
        (
            &a.node_admin,
            "client",
            "fold.sidecar.v1.Mesh",
            "Forward",
            "node A waits for its sidecar",
        ),
        (
            &a.sidecar_admin,
            "server",
            "fold.sidecar.v1.Mesh",
            "Forward",
            "sidecar A serves Forward",
        ),
        (
            &b.sidecar_admin,
            "client",
            "fold.sidecar.v1.PeerRequests",
            "HandleForward",
            "sidecar B waits for node B",
        ),
        (
            &b.node_admin,
            "server",
            "fold.sidecar.v1.PeerRequests",
            "HandleForward",
            "node B serves the inbound forward",
        ),
    ];
    // The direct path has only the first hop.
    let hops = if local { &hops[..1] } else { &hops[..] };
    let mut scraped: HashMap<&str, String> = HashMap::new();
    for &(admin, side, service, method, what) in hops {
        let text = scraped.entry(admin.as_str()).or_insert_with(|| {
            foldmesh_e2e::http::get(admin, "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default()
        });
        let labels = [("grpc_service", service), ("grpc_method", method)];
        let value = |suffix: &str| {
            let name = format!("grpc_{side}_handling_seconds_{suffix}");
            foldmesh_e2e::http::sample(text, &name, &labels)
        };
        // On the node ⇄ sidecar streams (--link-forward stream, the default) there is no
        // per-request gRPC call: each process's own per-request histogram stands in.
        let fallback = match (side, method) {
            ("client", "Forward") => Some(("fold_forward_seconds", Some(("op", "query")))),
            ("server", "Forward") => Some(("fold_sidecar_outbound_forward_seconds", None)),
            ("server", "HandleForward") => {
                Some(("fold_peer_request_seconds", Some(("op", "query"))))
            }
            _ => None,
        };
        let own = |name: &str, label: Option<(&str, &str)>| {
            let l: Vec<(&str, &str)> = label.into_iter().collect();
            Some((
                foldmesh_e2e::http::sample(text, &format!("{name}_sum"), &l)?,
                foldmesh_e2e::http::sample(text, &format!("{name}_count"), &l)?,
            ))
        };
        match (value("sum"), value("count")) {
            (Some(sum), Some(count)) if count > 0.0 => {
                println!("  {what:<36} mean {:>6.0} µs", sum / count * 1e6)
            }
            _ => match fallback.and_then(|(name, l)| Some((name, own(name, l)?))) {
                Some((name, (sum, count))) if count > 0.0 => println!(
                    "  {what:<36} mean {:>6.0} µs ({name}: on the stream)",
                    sum / count * 1e6
                ),
                _ => println!("  {what:<36} (on the stream: no per-request metric)"),
            },
        }
    }
    Ok(())
}

/// Measure the floor items and print each, then their sum on the forwarded path (a `Lat` whose
/// p50 and p99 are the sums of the items' p50s and p99s, each times its count on the path).
async fn print_floors(n: usize) -> anyhow::Result<(Lat, floors::UnderLoad)> {
    let f = floors::measure(n).await?;
    let mut sum = Lat {
        name: "sum of the floors on the forwarded path".into(),
        n,
        p50_us: 0.0,
        p90_us: 0.0,
        p99_us: 0.0,
    };
    for (item, v) in f.items {
        let times = floors::times_on_path(item);
        let l = lat(&format!("floor: {item}"), v);
        sum.p50_us += times * l.p50_us;
        sum.p90_us += times * l.p90_us;
        sum.p99_us += times * l.p99_us;
    }
    eprintln!(
        "  {:<58} (2× UDS stream, 1× libp2p stream, 1 sign, 1 verify) p50={:.1}µs p99={:.1}µs",
        sum.name, sum.p50_us, sum.p99_us
    );
    let u = f.under_load;
    eprintln!(
        "  verification under load ({} tasks, {} envelopes): one at a time {:.0}/s, {:.1} µs CPU each; batched (signing::Batcher) {:.0}/s, {:.1} µs CPU each ({:.2}× the CPU)",
        u.tasks,
        u.signatures,
        u.one_at_a_time_per_second,
        u.one_at_a_time_cpu_us,
        u.batched_per_second,
        u.batched_cpu_us,
        u.batched_cpu_us / u.one_at_a_time_cpu_us.max(f64::MIN_POSITIVE)
    );
    Ok((sum, u))
}

#[derive(serde::Serialize)]
struct FloorsReport {
    machine: String,
    floors_sum: Lat,
    direct: Lat,
    forwarded: Lat,
    loops: Vec<(LoopResult, LoopResult)>,
    /// Direct and forwarded latency at a fixed rate (queries per second).
    fixed_rate: Option<(u32, Lat, Lat)>,
    /// Signature verification by concurrent tasks, one at a time and batched.
    verification_under_load: floors::UnderLoad,
}

/// `fold-bench floors`: the floors, direct and forwarded latency, then load loops with CPU per
/// query, and the targets against them — all in one run.
async fn floors_report(
    n: usize,
    secs: u64,
    concurrency: &[usize],
    rate: u32,
    out: &Path,
) -> anyhow::Result<()> {
    let machine = machine();
    eprintln!("fold-bench floors on {machine}");
    eprintln!("== floors: one message each way on something already open; signatures");
    let (floor, under_load) = print_floors(n).await?;
    eprintln!("== two nodes on loopback; sequential Query round trips, 1 KiB record");
    let (a, b) = two_connected_nodes().await?;
    let c = FoldNodeClient::new(channel(&a.grpc));
    let seq = |target: String| {
        let c = c.clone();
        sequential(n, move || {
            let mut c = c.clone();
            let q = query(&target);
            async move {
                let r: QueryResponse = c.query(q).await?.into_inner();
                if r.records.is_empty() {
                    return Err(anyhow!("query returned nothing"));
                }
                Ok(())
            }
        })
    };
    let direct = lat("direct Query", seq(String::new()).await?);
    let forwarded = lat("forwarded Query", seq(b.node_id.clone()).await?);
    let added = forwarded.p50_us - direct.p50_us;
    eprintln!(
        "  forwarded − direct: p50 {added:.1} µs, p99 {:.1} µs; the floors' sum: p50 {:.1} µs, p99 {:.1} µs",
        forwarded.p99_us - direct.p99_us,
        floor.p50_us,
        floor.p99_us
    );
    let mut loops = Vec::new();
    for &conc in concurrency {
        eprintln!(
            "== {secs} s of direct, then {secs} s of forwarded queries at concurrency {conc}"
        );
        let d = load_loop(&a, &b, "", secs, conc).await?;
        let f = load_loop(&a, &b, &b.node_id, secs, conc).await?;
        eprintln!(
            "  rate: direct {:.0}/s, forwarded {:.0}/s ({:.2} of direct)",
            d.per_second,
            f.per_second,
            f.per_second / d.per_second.max(f64::MIN_POSITIVE)
        );
        eprintln!("  CPU per query (user + system, /proc/<pid>/stat):   direct  forwarded");
        for ((what, du), (_, fu)) in d.cpu_us.iter().zip(&f.cpu_us) {
            eprintln!("    {what:<44} {du:>6.1} µs {fu:>6.1} µs");
        }
        eprintln!(
            "    {:<44} {:>6.1} µs {:>6.1} µs ({:.2}×)",
            "all four mesh processes",
            d.mesh_cpu_us(),
            f.mesh_cpu_us(),
            f.mesh_cpu_us() / d.mesh_cpu_us().max(f64::MIN_POSITIVE)
        );
        loops.push((d, f));
    }
    let fixed_rate = if rate > 0 {
        eprintln!(
            "== {secs} s of direct, then {secs} s of forwarded queries at a fixed {rate}/s (an open loop)"
        );
        let d = lat(
            &format!("direct Query at {rate}/s"),
            at_fixed_rate(&c, "", rate, secs).await?,
        );
        let f = lat(
            &format!("forwarded Query at {rate}/s"),
            at_fixed_rate(&c, &b.node_id, rate, secs).await?,
        );
        Some((rate, d, f))
    } else {
        None
    };
    eprintln!("== issue 26 targets");
    let check = |ok: bool| if ok { "met" } else { "MISSED" };
    let r1 = forwarded.p50_us / direct.p50_us;
    eprintln!(
        "  forwarded p50 / direct p50 = {r1:.2} (target ≤ 5): {}",
        check(r1 <= 5.0)
    );
    let r2 = added / floor.p50_us;
    eprintln!(
        "  (forwarded − direct) / sum of floors, p50 = {r2:.2} (target ≤ 1.5): {}",
        check(r2 <= 1.5)
    );
    for (d, f) in &loops {
        let r3 = f.mesh_cpu_us() / d.mesh_cpu_us().max(f64::MIN_POSITIVE);
        eprintln!(
            "  CPU per query, four processes, forwarded / direct at concurrency {} = {r3:.2} (target ≤ 4): {}",
            d.concurrency,
            check(r3 <= 4.0)
        );
        if d.concurrency == 32 {
            let r4 = f.per_second / d.per_second.max(f64::MIN_POSITIVE);
            eprintln!(
                "  throughput at concurrency 32, forwarded / direct = {r4:.2} (target ≥ 0.30): {}",
                check(r4 >= 0.30)
            );
        }
    }
    if let Some((rate, d, f)) = &fixed_rate {
        let r5 = f.p99_us / d.p99_us.max(f64::MIN_POSITIVE);
        eprintln!(
            "  at a fixed {rate}/s, forwarded p99 / direct p99 = {r5:.2} (target ≤ 2): {}",
            check(r5 <= 2.0)
        );
    }
    let report = FloorsReport {
        machine,
        floors_sum: floor,
        direct,
        forwarded,
        loops,
        fixed_rate,
        verification_under_load: under_load,
    };
    std::fs::create_dir_all(out)?;
    let file = out.join("floors.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    eprintln!("== wrote {}", file.display());
    drop((a, b));
    Ok(())
}

/// User + system CPU seconds a process has used so far (Linux `/proc/<pid>/stat`).
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fold-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Cmd::EchoServer) => rt.block_on(echo::serve()),
        Some(Cmd::Floors { concurrency, rate }) => {
            rt.block_on(floors_report(cli.n, cli.secs, &concurrency, rate, &cli.out))
        }
        Some(Cmd::ForwardLoop { concurrency, local }) => {
            rt.block_on(forward_loop(cli.secs, concurrency, local))
        }
        Some(Cmd::Writes) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let w = writes::measure(cli.secs, cli.n).await?;
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("writes.json");
            std::fs::write(&file, serde_json::to_string_pretty(&w)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::Soak {
            cache_mib,
            records,
            sample_secs,
            max_secs,
        }) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let r = soak::measure(soak::SoakOptions {
                cache: format!("{}MiB", cache_mib.max(1)),
                cache_bytes: cache_mib.max(1) << 20,
                records,
                sample_every: Duration::from_secs(sample_secs.max(1)),
                max_time: Duration::from_secs(max_secs),
            })
            .await?;
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("soak.json");
            std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::Route) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let r = route::measure(cli.secs).await?;
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("route.json");
            std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::Nat { rounds }) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let r = nat::measure(rounds.max(1), cli.n).await?;
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("nat.json");
            std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::Changes) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let r = changes::measure(cli.secs, cli.n).await?;
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("changes.json");
            std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::DhtProcs { sizes, lookups }) => rt.block_on(async {
            eprintln!("fold-bench on {}", machine());
            let mut all = Vec::new();
            for size in sizes {
                all.push(dht_procs::measure(size, lookups.max(1)).await?);
            }
            std::fs::create_dir_all(&cli.out)?;
            let file = cli.out.join("dht_procs.json");
            std::fs::write(&file, serde_json::to_string_pretty(&all)?)?;
            eprintln!("== wrote {}", file.display());
            Ok(())
        }),
        Some(Cmd::Dht) => rt.block_on(async {
            for nodes in [50, 100, 200] {
                let d = dht::measure(nodes, 20).await?;
                eprintln!("{d:?}");
            }
            Ok(())
        }),
        None => rt.block_on(run(cli)).context("benchmark failed"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fold-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
