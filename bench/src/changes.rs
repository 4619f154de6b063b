//! The data-that-moves phase (issue 15; docs/BENCHMARKS.md): how soon a committed change reaches
//! a subscriber on the same node and a subscriber of a replica on another node (`--follow`,
//! over the mesh), how fast a subscriber and a replica catch up on a backlog, and how far a
//! replica trails under a steady write load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::network_client::NetworkClient;
use fold_proto::v1::{
    BatchMutateRequest, BatchMutation, DialRequest, MutateRequest, MutationType,
    NetworkStatusRequest, SetTrustRequest, SubscribeRequest, SubscribeResponse, TrustEntry,
    subscribe_response::Event,
};
use tonic::Streaming;

use crate::{Lat, Node, channel, lat, prepare, start_node, start_node_with};

/// Records in the catch-up backlog.
const BACKLOG: u64 = 100_000;
/// Records per BatchMutate call writing the backlog.
const BATCH: u64 = 1000;
/// Steady write load for the lag measure, in mutations per second.
const STEADY_RATE: u64 = 1000;
/// Upper bound of any wait.
const MAX_WAIT: Duration = Duration::from_secs(120);

#[derive(serde::Serialize, Default, Debug)]
pub struct ChangeResults {
    /// Mutate, sent → acknowledged (durable), for reference.
    pub write_ack: Option<Lat>,
    /// Mutate sent → the change received by a live subscriber of the same node.
    pub propagation_local: Option<Lat>,
    /// Mutate sent to the owner → the change received by a live subscriber of a replica on
    /// another node (loopback, through both sidecars).
    pub propagation_replica: Option<Lat>,
    /// A subscriber's catch-up from sequence 0 over the backlog, changes/s.
    pub subscribe_catch_up_per_s: f64,
    /// A new replica's catch-up over the backlog, changes/s (until its head is the owner's).
    pub replica_catch_up_per_s: f64,
    /// Under a steady write load: each change's time from sent to the owner to received by a
    /// subscriber of the replica.
    pub replica_under_load: Option<Lat>,
    /// Under that load, the replica's lag in changes as Network.Status reports it, sampled every
    /// 100 ms: (p50, p99, max).
    pub replica_lag_changes: (u64, u64, u64),
    pub steady_rate_per_s: u64,
}

fn sub_req(from: u64) -> SubscribeRequest {
    SubscribeRequest {
        route: 0,
        schema: "Bench".into(),
        from_sequence: from,
        fields: vec!["payload".into()],
        filter: None,
        json_values: true,
        target_node_id: String::new(),
        definition_hash: Default::default(),
    }
}

fn update(key: &str, n: u64) -> MutateRequest {
    MutateRequest {
        data_json: serde_json::json!({"k": key, "payload": n.to_string()}).to_string(),
        idempotency_key: String::new(),
        schema: "Bench".into(),
        mutation_type: MutationType::Update as i32,
        data: None,
        target_node_id: String::new(),
    }
}

/// The next change's sequence on `s` (progress skipped), within `MAX_WAIT`.
async fn next_change(s: &mut Streaming<SubscribeResponse>) -> anyhow::Result<u64> {
    loop {
        let m = tokio::time::timeout(MAX_WAIT, s.message())
            .await
            .map_err(|_| anyhow!("no change within {MAX_WAIT:?}"))??
            .ok_or_else(|| anyhow!("the subscription ended"))?;
        if let Some(Event::Change(c)) = m.event {
            return Ok(c.sequence);
        }
    }
}

/// Sequential writes to `writer`, each timed from send to its arrival on `s`.
async fn propagation(
    writer: &mut FoldNodeClient<tonic::transport::Channel>,
    s: &mut Streaming<SubscribeResponse>,
    n: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut acks, mut arrivals) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + n / 10 {
        let t = Instant::now();
        let seq = writer
            .mutate(update("r1", i as u64))
            .await?
            .into_inner()
            .sequence;
        let ack = t.elapsed();
        loop {
            if next_change(s).await? >= seq {
                break;
            }
        }
        // The first tenth warms up.
        if i >= n / 10 {
            acks.push(ack);
            arrivals.push(t.elapsed());
        }
    }
    Ok((acks, arrivals))
}

pub(crate) async fn replica_head(n: &Node) -> anyhow::Result<(u64, u64)> {
    let s = NetworkClient::new(channel(&n.grpc))
        .status(NetworkStatusRequest {})
        .await?
        .into_inner();
    let r = s
        .replicas
        .first()
        .ok_or_else(|| anyhow!("the replica reports no followed schema"))?;
    Ok((r.applied_sequence, r.lag))
}

async fn follower(owner: &Node) -> anyhow::Result<Node> {
    follower_with(owner, &[]).await
}

/// A new node following `owner`'s `Bench`, its fold-node started with `extra` flags too.
pub(crate) async fn follower_with(owner: &Node, extra: &[&str]) -> anyhow::Result<Node> {
    let follow = format!("Bench@{}", owner.node_id);
    let mut args = vec!["--follow", follow.as_str()];
    args.extend_from_slice(extra);
    let b = start_node_with(&args)?;
    // The same schema, with no data of its own (a replica starts empty).
    FoldNodeClient::new(channel(&b.grpc))
        .load_schema(fold_proto::v1::LoadSchemaRequest {
            schema_json: crate::schema().to_string(),
            approve: true,
        })
        .await?;
    let end = Instant::now() + Duration::from_secs(10);
    while NetworkClient::new(channel(&b.grpc))
        .status(NetworkStatusRequest {})
        .await
        .is_err()
    {
        if Instant::now() > end {
            return Err(anyhow!("the replica never reached its sidecar"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    NetworkClient::new(channel(&owner.grpc))
        .set_trust(SetTrustRequest {
            entry: Some(TrustEntry {
                node_id: b.node_id.clone(),
                distance: 0,
                denied: false,
            }),
            remove: false,
        })
        .await?;
    let addr = format!(
        "{}/p2p/{}",
        owner.listen.split(',').next().unwrap_or_default(),
        owner.node_id
    );
    NetworkClient::new(channel(&b.grpc))
        .dial(DialRequest { address: addr })
        .await?;
    Ok(b)
}

async fn wait_replica(b: &Node, head: u64) -> anyhow::Result<()> {
    let end = Instant::now() + MAX_WAIT;
    while replica_head(b).await.map(|h| h.0).unwrap_or(0) < head {
        if Instant::now() > end {
            return Err(anyhow!("the replica did not reach {head} in {MAX_WAIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn percentile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub async fn measure(secs: u64, n: usize) -> anyhow::Result<ChangeResults> {
    let mut r = ChangeResults {
        steady_rate_per_s: STEADY_RATE,
        ..ChangeResults::default()
    };
    let a = start_node()?;
    prepare(&a).await?;
    let b = follower(&a).await?;
    let mut wa = FoldNodeClient::new(channel(&a.grpc));
    let n = n.clamp(10, 10_000);

    eprintln!("== propagation of one change, sequential writes (n={n})");
    let mut local = FoldNodeClient::new(channel(&a.grpc))
        .subscribe(sub_req(0))
        .await?
        .into_inner();
    let (acks, arrivals) = propagation(&mut wa, &mut local, n).await?;
    r.write_ack = Some(lat("Mutate acknowledged (durable)", acks));
    r.propagation_local = Some(lat("Mutate sent → local subscriber", arrivals));
    drop(local);
    let head = wa.mutate(update("r1", 0)).await?.into_inner().sequence;
    wait_replica(&b, head).await?;
    let mut remote = FoldNodeClient::new(channel(&b.grpc))
        .subscribe(sub_req(head))
        .await?
        .into_inner();
    let (_, arrivals) = propagation(&mut wa, &mut remote, n).await?;
    r.propagation_replica = Some(lat("Mutate sent → subscriber of the replica", arrivals));
    drop(remote);

    eprintln!("== catch-up over {BACKLOG} changes");
    let base = wa.mutate(update("r1", 0)).await?.into_inner().sequence;
    for b0 in 0..BACKLOG / BATCH {
        let mutations = (0..BATCH)
            .map(|i| BatchMutation {
                mutation_type: MutationType::Create as i32,
                data: None,
                data_json: serde_json::json!({"k": format!("c{:07}", b0 * BATCH + i), "payload": "x".repeat(100)})
                    .to_string(),
            })
            .collect();
        wa.batch_mutate(BatchMutateRequest {
            schema: "Bench".into(),
            mutations,
            target_node_id: String::new(),
            idempotency_key: String::new(),
        })
        .await?;
    }
    let head = base + BACKLOG;
    let t = Instant::now();
    let mut s = FoldNodeClient::new(channel(&a.grpc))
        .subscribe(sub_req(base))
        .await?
        .into_inner();
    while next_change(&mut s).await? < head {}
    r.subscribe_catch_up_per_s = BACKLOG as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "  subscriber catch-up: {:.0} changes/s",
        r.subscribe_catch_up_per_s
    );
    drop(s);
    // A second replica, new, catches up on everything.
    let t = Instant::now();
    let c = follower(&a).await?;
    wait_replica(&c, head).await?;
    r.replica_catch_up_per_s = head as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "  new replica catch-up: {:.0} changes/s ({head} changes)",
        r.replica_catch_up_per_s
    );
    drop(c);
    wait_replica(&b, head).await?;

    eprintln!("== replica under a steady load of {STEADY_RATE} writes/s for {secs} s");
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut remote = FoldNodeClient::new(channel(&b.grpc))
        .subscribe(sub_req(head))
        .await?
        .into_inner();
    let writer = {
        let sent = sent.clone();
        let wa = wa.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / STEADY_RATE));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut tasks = tokio::task::JoinSet::new();
            let mut i = 0u64;
            while Instant::now() < end && i < STEADY_RATE * secs {
                tick.tick().await;
                let (mut wa, sent) = (wa.clone(), sent.clone());
                let key = format!("c{:07}", i % BACKLOG);
                tasks.spawn(async move {
                    let t = Instant::now();
                    if let Ok(resp) = wa.mutate(update(&key, i)).await {
                        sent.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(resp.into_inner().sequence, t);
                    }
                });
                // Bounded in flight.
                while tasks.len() > 256 {
                    tasks.join_next().await;
                }
                i += 1;
            }
            while tasks.join_next().await.is_some() {}
            i
        })
    };
    let sampler = {
        let grpc = b.grpc.clone();
        tokio::spawn(async move {
            let mut lags = Vec::new();
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                if let Ok(s) = NetworkClient::new(channel(&grpc))
                    .status(NetworkStatusRequest {})
                    .await
                    && let Some(r) = s.into_inner().replicas.first()
                {
                    lags.push(r.lag);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            lags
        })
    };
    let mut received: Vec<(u64, Instant)> = Vec::new();
    let stop = Instant::now() + Duration::from_secs(secs) + Duration::from_secs(10);
    while Instant::now() < stop && received.len() < (STEADY_RATE * secs) as usize {
        match tokio::time::timeout(Duration::from_secs(5), next_change(&mut remote)).await {
            Ok(Ok(seq)) => received.push((seq, Instant::now())),
            _ => break,
        }
    }
    let wrote = writer.await?;
    let mut lags = sampler.await?;
    let sent = sent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let times: Vec<Duration> = received
        .iter()
        .filter_map(|(seq, at)| sent.get(seq).map(|t| at.saturating_duration_since(*t)))
        .collect();
    eprintln!(
        "  wrote {wrote}, received {} on the replica",
        received.len()
    );
    r.replica_under_load = Some(lat("under load: sent → subscriber of the replica", times));
    let max = lags.iter().copied().max().unwrap_or(0);
    r.replica_lag_changes = (percentile(&mut lags, 0.5), percentile(&mut lags, 0.99), max);
    eprintln!(
        "  replica lag (Network.Status, every 100 ms): p50 {} p99 {} max {} changes",
        r.replica_lag_changes.0, r.replica_lag_changes.1, r.replica_lag_changes.2
    );
    drop(b);
    drop(a);
    Ok(r)
}
