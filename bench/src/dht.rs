//! DHT provider lookups across many in-process nodes on libp2p's memory transport: how lookup
//! time and the number of requests grow with the size of the network.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, Transport, noise, yamux};
use tokio::sync::{mpsc, oneshot};

#[derive(serde::Serialize, Clone, Debug)]
pub struct DhtResult {
    pub nodes: usize,
    pub lookups: usize,
    pub found: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub mean_requests: f64,
    /// Nodes whose bootstrap finished within its 60 s bound.
    pub bootstrapped: usize,
    /// Whether the provider record was stored on the key's closest nodes (within 30 s).
    pub provided: bool,
}

enum Cmd {
    AddPeer(PeerId, Multiaddr),
    Bootstrap(oneshot::Sender<()>),
    Provide(kad::RecordKey, oneshot::Sender<bool>),
    Find(
        kad::RecordKey,
        PeerId,
        oneshot::Sender<(Duration, u32, bool)>,
    ),
}

fn swarm(base: u64, i: usize) -> anyhow::Result<(Swarm<kad::Behaviour<MemoryStore>>, Multiaddr)> {
    let mut s = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_behaviour(|key| {
            let id = key.public().to_peer_id();
            let mut cfg = kad::Config::new(StreamProtocol::new("/fold/kad/1.0.0"));
            cfg.set_query_timeout(Duration::from_secs(10));
            let mut b = kad::Behaviour::with_config(id, MemoryStore::new(id), cfg);
            b.set_mode(Some(kad::Mode::Server));
            b
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    let addr: Multiaddr = Protocol::Memory(base + i as u64).into();
    s.listen_on(addr.clone())?;
    Ok((s, addr))
}

type PendingFind = (
    kad::QueryId,
    PeerId,
    Instant,
    oneshot::Sender<(Duration, u32, bool)>,
);

async fn run_node(mut s: Swarm<kad::Behaviour<MemoryStore>>, mut rx: mpsc::Receiver<Cmd>) {
    let mut boots: Vec<(kad::QueryId, oneshot::Sender<()>)> = Vec::new();
    let mut provides: Vec<(kad::QueryId, oneshot::Sender<bool>)> = Vec::new();
    let mut finds: Vec<PendingFind> = Vec::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::AddPeer(p, a)) => { s.behaviour_mut().add_address(&p, a); }
                Some(Cmd::Bootstrap(tx)) => match s.behaviour_mut().bootstrap() {
                    Ok(q) => boots.push((q, tx)),
                    Err(_) => { let _ = tx.send(()); }
                },
                Some(Cmd::Provide(k, tx)) => match s.behaviour_mut().start_providing(k) {
                    Ok(q) => provides.push((q, tx)),
                    Err(_) => { let _ = tx.send(false); }
                },
                Some(Cmd::Find(k, want, tx)) => {
                    let q = s.behaviour_mut().get_providers(k);
                    finds.push((q, want, Instant::now(), tx));
                }
            },
            ev = s.select_next_some() => {
                if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed { id, result, step, stats, .. }) = ev {
                    match result {
                        kad::QueryResult::Bootstrap(_) if step.last => {
                            if let Some(i) = boots.iter().position(|b| b.0 == id) {
                                let _ = boots.swap_remove(i).1.send(());
                            }
                        }
                        kad::QueryResult::StartProviding(r) => {
                            if let Some(i) = provides.iter().position(|b| b.0 == id) {
                                let _ = provides.swap_remove(i).1.send(r.is_ok());
                            }
                        }
                        kad::QueryResult::GetProviders(r) => {
                            if let Some(i) = finds.iter().position(|f| f.0 == id) {
                                let hit = matches!(&r, Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) if providers.contains(&finds[i].1));
                                if hit || step.last {
                                    let (_, _, t, tx) = finds.swap_remove(i);
                                    let _ = tx.send((t.elapsed(), stats.num_requests(), hit));
                                    if hit
                                        && !step.last
                                        && let Some(mut q) = s.behaviour_mut().query_mut(&id)
                                    {
                                        q.finish();
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Build `nodes` nodes, each knowing a few earlier ones, bootstrap, let the last provide a key,
/// and time `lookups` provider lookups from the other nodes.
pub async fn measure(nodes: usize, lookups: usize) -> anyhow::Result<DhtResult> {
    let base = 1_000_000 + (nodes as u64) * 10_000;
    let mut handles = Vec::new();
    let mut info = Vec::new();
    for i in 0..nodes {
        let (s, addr) = swarm(base, i)?;
        let id = *s.local_peer_id();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run_node(s, rx));
        handles.push(tx);
        info.push((id, addr));
    }
    // Each node knows four others spread over the ring (identify is not running, so nodes only
    // learn dialable addresses from the DHT itself).
    for (i, h) in handles.iter().enumerate() {
        for k in [i + 1, i + nodes - 1, i * 7 + 3, i * 13 + 5] {
            let k = k % nodes;
            if k != i {
                let (p, a) = info[k].clone();
                h.send(Cmd::AddPeer(p, a)).await?;
            }
        }
    }
    // Bootstrap everyone at once, bounded.
    let mut waits = Vec::new();
    for h in &handles {
        let (tx, rx) = oneshot::channel();
        h.send(Cmd::Bootstrap(tx)).await?;
        waits.push(rx);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut bootstrapped = 0;
    for w in waits {
        if tokio::time::timeout_at(deadline, w).await.is_ok() {
            bootstrapped += 1;
        }
    }
    let key = kad::RecordKey::new(&"fold-schema:Bench");
    let provider = info[nodes - 1].0;
    let (tx, rx) = oneshot::channel();
    handles[nodes - 1]
        .send(Cmd::Provide(key.clone(), tx))
        .await?;
    let provided = matches!(
        tokio::time::timeout(Duration::from_secs(30), rx).await,
        Ok(Ok(true))
    );
    let mut times = Vec::new();
    let mut requests = 0u64;
    let mut found = 0;
    for j in 0..lookups {
        let from = (j * 37) % (nodes - 1);
        let (tx, rx) = oneshot::channel();
        handles[from]
            .send(Cmd::Find(key.clone(), provider, tx))
            .await?;
        if let Ok(Ok((t, reqs, hit))) = tokio::time::timeout(Duration::from_secs(15), rx).await {
            times.push(t);
            requests += u64::from(reqs);
            if hit {
                found += 1;
            }
        }
    }
    drop(handles);
    times.sort();
    let pick = |q: f64| {
        times
            .get(((times.len().max(1) as f64 - 1.0) * q).round() as usize)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Ok(DhtResult {
        nodes,
        lookups,
        found,
        p50_ms: pick(0.5),
        p90_ms: pick(0.9),
        mean_requests: requests as f64 / times.len().max(1) as f64,
        bootstrapped,
        provided,
    })
}
