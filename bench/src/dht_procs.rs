//! Provider lookups on real p2p-sidecar processes (loopback TCP, no mDNS), at several mesh sizes.
//! Each new sidecar bootstraps to one earlier sidecar picked pseudo-randomly (a sparse tree, no
//! full mesh); `lookups` schemas are each announced by one sidecar (Mesh.Provide) and looked up
//! (Mesh.FindProviders) from another. Reported per size: lookup time (p50/p90), how many found
//! their provider, and the DHT requests each lookup made (nodes asked, from libp2p Kademlia's
//! query statistics, as FindProvidersResponse.peers_asked reports them; libp2p does not expose
//! hop counts, and the nodes asked bound them from above).

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use fold_proto::sidecar::ProvideRequest;
use fold_proto::sidecar::mesh_client::MeshClient;
use fold_proto::v1::FindProvidersRequest;
use foldmesh_e2e::process::{Proc, parse_kv};

#[derive(serde::Serialize, Clone, Debug)]
pub struct DhtProcsResult {
    pub processes: usize,
    pub lookups: usize,
    pub found: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
    pub mean_peers_asked: f64,
    pub max_peers_asked: u32,
    /// Seconds to start every sidecar (sequentially, each after the one it bootstraps to).
    pub start_secs: f64,
    /// Resident memory of all sidecars together after the lookups, MiB.
    pub rss_mib: f64,
}

struct Sidecar {
    proc: Proc,
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    id: String,
    addr: String,
}

fn start(bootstrap: Option<&str>) -> anyhow::Result<Sidecar> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_path_buf();
    let mut c = std::process::Command::new(crate::bin("p2p-sidecar"));
    c.arg("--data-dir")
        .arg(&data)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-listen",
            "127.0.0.1:0",
            "--mdns",
            "off",
        ])
        .env("RUST_LOG", "warn");
    if let Some(b) = bootstrap {
        c.args(["--bootstrap", b]);
    }
    let (proc, line) = Proc::spawn(c, "p2p-sidecar ready", Duration::from_secs(20))?;
    let id = parse_kv(&line, "node_id").ok_or_else(|| anyhow!("no node id in {line}"))?;
    let listen = parse_kv(&line, "listen").ok_or_else(|| anyhow!("no listen in {line}"))?;
    let first = listen.split(',').next().unwrap_or_default();
    Ok(Sidecar {
        proc,
        _dir: dir,
        data,
        addr: format!("{first}/p2p/{id}"),
        id,
    })
}

fn mesh(s: &Sidecar) -> MeshClient<tonic::transport::Channel> {
    MeshClient::new(local_link::channel(
        &local_link::LinkAddr::Unix(s.data.join("sidecar.sock")),
        Duration::from_secs(2),
    ))
}

/// A small deterministic generator (the layout and the pairs are the same on every run).
fn pick(seed: &mut u64, below: usize) -> usize {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as usize) % below.max(1)
}

pub async fn measure(processes: usize, lookups: usize) -> anyhow::Result<DhtProcsResult> {
    eprintln!("== DHT on {processes} sidecar processes (sparse bootstrap tree), {lookups} lookups");
    let mut seed = 0x5eed_u64 ^ processes as u64;
    let t = Instant::now();
    let mut all: Vec<Sidecar> = Vec::with_capacity(processes);
    for i in 0..processes {
        let boot = (i > 0).then(|| all[pick(&mut seed, i)].addr.clone());
        all.push(start(boot.as_deref()).with_context(|| format!("sidecar {i}"))?);
    }
    let start_secs = t.elapsed().as_secs_f64();
    // Let the bootstrap queries settle (each sidecar bootstraps its DHT after its first
    // connection).
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut pairs = Vec::new();
    for k in 0..lookups {
        let provider = pick(&mut seed, processes);
        let mut asker = pick(&mut seed, processes);
        if asker == provider {
            asker = (asker + 1) % processes;
        }
        let name = format!("BenchSchema{k}");
        mesh(&all[provider])
            .provide(ProvideRequest {
                schemas: vec![name.clone()],
            })
            .await?;
        pairs.push((name, provider, asker));
    }
    // The provider records go out to the closest nodes of each key.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut times = Vec::new();
    let mut asked = Vec::new();
    let mut found = 0;
    for (name, provider, asker) in &pairs {
        let t = Instant::now();
        let r = mesh(&all[*asker])
            .find_providers(FindProvidersRequest {
                schema: name.clone(),
            })
            .await;
        let d = t.elapsed();
        match r {
            Ok(r) => {
                let r = r.into_inner();
                if r.node_ids.contains(&all[*provider].id) {
                    found += 1;
                }
                asked.push(r.peers_asked);
            }
            Err(e) => eprintln!("  lookup of {name} failed: {e}"),
        }
        times.push(d);
    }
    times.sort();
    let q = |p: f64| {
        if times.is_empty() {
            return 0.0;
        }
        let i = ((times.len() as f64 - 1.0) * p).round() as usize;
        times[i].as_secs_f64() * 1e3
    };
    let rss_kib: u64 = all.iter().map(|s| crate::rss_kib(s.proc.pid())).sum();
    let r = DhtProcsResult {
        processes,
        lookups,
        found,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        max_ms: q(1.0),
        mean_peers_asked: if asked.is_empty() {
            0.0
        } else {
            asked.iter().map(|&a| f64::from(a)).sum::<f64>() / asked.len() as f64
        },
        max_peers_asked: asked.iter().copied().max().unwrap_or(0),
        start_secs,
        rss_mib: rss_kib as f64 / 1024.0,
    };
    eprintln!("  {r:?}");
    Ok(r)
}
