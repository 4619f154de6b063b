//! The floor of a forwarded query (issue 26), measured in the same run as the queries: what each
//! extra boundary of the forwarded path costs when it does nothing but carry one message each way
//! on something already open, and the signature work every forwarded request must do.
//!
//! - a request and its answer on an open tonic bidi stream over a Unix domain socket (the
//!   node ⇄ sidecar link: `PeerRequests.HandleForwardStream` served by an in-process echo);
//! - a request frame and its answer frame on an open libp2p stream (TCP on 127.0.0.1, Noise,
//!   Yamux) between two in-process swarms, framed with the sidecar's own codec;
//! - one Ed25519 signature and one verification, with the sidecar's own `signing` functions
//!   (so its key cache shows up).
//!
//! The messages are the forwarded path's: a sealed `ForwardEnvelope` for a Query one way, a
//! `ForwardResponse` holding a 1 KiB record the other.

use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use fold_proto::sidecar::peer_requests_client::PeerRequestsClient;
use fold_proto::sidecar::peer_requests_server::{PeerRequests, PeerRequestsServer};
use fold_proto::sidecar::{
    InboundForward, InboundStreamRequest, InboundStreamResponse, ServedSchemasRequest,
    ServedSchemasResponse, inbound_stream_response,
};
use fold_proto::v1::{QueryResponse, Record};
use fold_proto::wire::{
    ForwardEnvelope, ForwardFrame, ForwardResponse, Operation, Requester, SignedEnvelope,
    forward_frame, forward_response, operation,
};
use futures::{AsyncWriteExt, Stream, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
use p2p_sidecar::codec;
use p2p_sidecar::signing;
use tonic::{Request, Response, Status, Streaming};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/fold-bench/floor/1.0.0");
const MAX_FRAME: usize = 1 << 20;

/// Each floor item's round trips (or operations), in the order reported.
pub struct Floors {
    pub items: Vec<(&'static str, Vec<Duration>)>,
    /// Signatures verified per second by 32 concurrent tasks through the gate's check, one at
    /// a time each and batched (`signing::Batcher`).
    pub under_load: UnderLoad,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UnderLoad {
    pub tasks: usize,
    pub signatures: usize,
    pub one_at_a_time_per_second: f64,
    pub batched_per_second: f64,
    /// CPU (user + system) of this process per signature, each way.
    pub one_at_a_time_cpu_us: f64,
    pub batched_cpu_us: f64,
}

/// A forwarded Query's envelope, as the origin sidecar builds it.
fn envelope(key: &Keypair, request_id: String) -> ForwardEnvelope {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    ForwardEnvelope {
        request_id,
        origin_node_id: key.public().to_peer_id().to_string(),
        target_node_id: "12D3KooWTargetTargetTargetTargetTargetTargetTargetTa".into(),
        timestamp_unix_ms: now,
        deadline_unix_ms: now + 30_000,
        requester: Some(Requester {
            distance: 0,
            identity: "client:local".into(),
            proven_key: String::new(),
        }),
        operation: Some(Operation {
            kind: Some(operation::Kind::Query(super::query(
                "12D3KooWTargetTargetTargetTargetTargetTargetTargetTa",
            ))),
        }),
    }
}

/// The answer: one record with a 1 KiB payload, as the bench's Query returns.
fn answer() -> ForwardResponse {
    let fields = serde_json::json!({"k": "r1", "payload": "x".repeat(super::PAYLOAD)});
    ForwardResponse {
        request_id: uuid::Uuid::new_v4().to_string(),
        result: Some(forward_response::Result::Query(QueryResponse {
            answers: Vec::new(),
            attempts: 0,
            next_page_token: String::new(),
            records: vec![Record {
                fields_json: String::new(),
                range_key: "r1".into(),
                fields: fields.as_object().map(fold_proto::json::map_to_struct),
            }],
            node_id: String::new(),
            replica: None,
            group: None,
        })),
    }
}

pub async fn measure(n: usize) -> anyhow::Result<Floors> {
    let key = Keypair::generate_ed25519();
    let sealed = signing::seal(&key, &envelope(&key, "floor".into()), Default::default())
        .map_err(|e| anyhow!(e))?;
    let dir = tempfile::tempdir()?;
    let uds = tonic_uds(n, &dir.path().join("floor.sock"), &sealed)
        .await
        .context("tonic stream over the UDS")?;
    let p2p = libp2p_stream(n, &sealed).await.context("libp2p stream")?;
    let (sign, verify) = signatures(n, &key)?;
    let batched = batch_verify(n, 16)?;
    let under_load = verification_under_load(32, (4 * n).max(1024)).await?;
    Ok(Floors {
        under_load,
        items: vec![
            ("tonic bidi stream over a UDS, one message each way", uds),
            ("libp2p stream (TCP+Noise+Yamux), one frame each way", p2p),
            ("Ed25519 sign (signing::seal)", sign),
            ("Ed25519 verify (signing::Verifier::check)", verify),
            (BATCHED, batched),
        ],
    })
}

/// Shown beside the floors, not part of their sum: what one verification costs when requests
/// queue up and the sidecar verifies them together.
const BATCHED: &str = "(not summed) Ed25519 verify in batches of 16, per signature";

/// The forwarded path has two UDS link round trips (node A → sidecar A, sidecar B → node B), one
/// libp2p round trip, one signature and one verification.
pub fn times_on_path(item: &str) -> f64 {
    if item == BATCHED {
        0.0
    } else if item.starts_with("tonic") {
        2.0
    } else {
        1.0
    }
}

/// `tasks` concurrent tasks on this (multi-thread) runtime check `total` sealed envelopes from
/// `tasks` peers through `signing::Verifier`: one at a time each (`check`), then with the
/// gate's batcher (`check_batched`). Signatures per second of each.
async fn verification_under_load(tasks: usize, total: usize) -> anyhow::Result<UnderLoad> {
    let keys: Vec<Keypair> = (0..tasks).map(|_| Keypair::generate_ed25519()).collect();
    let per = total.div_ceil(tasks);
    let sealed = |round: &str| -> anyhow::Result<Vec<Vec<fold_proto::wire::SignedEnvelope>>> {
        keys.iter()
            .map(|k| {
                (0..per)
                    .map(|i| {
                        signing::seal(
                            k,
                            &envelope(k, format!("{round}-{i:08}")),
                            Default::default(),
                        )
                        .map_err(|e| anyhow!(e))
                    })
                    .collect()
            })
            .collect()
    };
    let mut rates = [0.0f64; 2];
    let mut cpu = [0.0f64; 2];
    let me = Some(std::process::id());
    for (which, rate) in rates.iter_mut().enumerate() {
        let work = sealed(if which == 0 { "single" } else { "batched" })?;
        let verifier =
            std::sync::Arc::new(signing::Verifier::new(Duration::from_secs(30), 64 << 20));
        let batcher = signing::Batcher::for_this_machine();
        let start = Instant::now();
        let cpu_before = crate::cpu_secs(me).unwrap_or(0.0);
        let mut handles = Vec::new();
        for (k, envs) in keys.iter().zip(work) {
            let peer = k.public().to_peer_id();
            let (verifier, batcher) = (verifier.clone(), batcher.clone());
            handles.push(tokio::spawn(async move {
                for env in envs {
                    let now = p2p_sidecar::gate::now_ms();
                    let r = if which == 0 {
                        let r = verifier.check(&peer, &env, now);
                        // Let the other tasks in, as the gate's tasks do between requests.
                        tokio::task::yield_now().await;
                        r
                    } else {
                        verifier.check_batched(&peer, &env, &batcher, || now).await
                    };
                    r.map_err(|(why, msg)| anyhow!("{}: {msg}", why.label()))?;
                }
                anyhow::Ok(())
            }));
        }
        for h in handles {
            h.await??;
        }
        *rate = (per * tasks) as f64 / start.elapsed().as_secs_f64();
        cpu[which] = (crate::cpu_secs(me).unwrap_or(0.0) - cpu_before) * 1e6 / (per * tasks) as f64;
    }
    Ok(UnderLoad {
        tasks,
        signatures: per * tasks,
        one_at_a_time_per_second: rates[0],
        batched_per_second: rates[1],
        one_at_a_time_cpu_us: cpu[0],
        batched_cpu_us: cpu[1],
    })
}

/// `ed25519_dalek::verify_batch` (what `signing::Batcher` calls) over batches of `size`
/// envelope-sized messages from as many keys: the time of each batch divided by its size.
fn batch_verify(n: usize, size: usize) -> anyhow::Result<Vec<Duration>> {
    let keys: Vec<ed25519_dalek::SigningKey> = (0..size)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[0] = u8::try_from(i % 256).unwrap_or(0);
            ed25519_dalek::SigningKey::from_bytes(&seed)
        })
        .collect();
    let verifying: Vec<_> = keys.iter().map(|k| k.verifying_key()).collect();
    let mut v = Vec::with_capacity(n);
    let rounds = n.div_ceil(size).max(1) + 10;
    for round in 0..rounds {
        let messages: Vec<Vec<u8>> = (0..size)
            .map(|i| format!("fold-forward-v2 {round:08} {i:04} {}", "x".repeat(200)).into_bytes())
            .collect();
        let signatures: Vec<_> = keys
            .iter()
            .zip(&messages)
            .map(|(k, m)| ed25519_dalek::Signer::sign(k, m))
            .collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let t = Instant::now();
        ed25519_dalek::verify_batch(&refs, &signatures, &verifying)
            .map_err(|e| anyhow!("batch verification failed: {e}"))?;
        let each = t.elapsed() / u32::try_from(size).unwrap_or(1);
        if round >= 10 {
            v.extend(std::iter::repeat_n(each, size));
        }
    }
    v.truncate(n);
    Ok(v)
}

// ---- tonic over the UDS ----------------------------------------------------------------------

struct EchoLink {
    answer: ForwardResponse,
}

type InboundStream = Pin<Box<dyn Stream<Item = Result<InboundStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PeerRequests for EchoLink {
    async fn handle_forward(
        &self,
        _: Request<InboundForward>,
    ) -> Result<Response<ForwardResponse>, Status> {
        Err(Status::unimplemented("floor echo"))
    }

    type HandleForwardStreamStream = InboundStream;

    async fn handle_forward_stream(
        &self,
        req: Request<Streaming<InboundStreamRequest>>,
    ) -> Result<Response<InboundStream>, Status> {
        let answer = self.answer.clone();
        let out = req.into_inner().map(move |r| {
            r.map(|r| InboundStreamResponse {
                id: r.id,
                result: Some(inbound_stream_response::Result::Response(answer.clone())),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn served_schemas(
        &self,
        _: Request<ServedSchemasRequest>,
    ) -> Result<Response<ServedSchemasResponse>, Status> {
        Err(Status::unimplemented("floor echo"))
    }
}

async fn tonic_uds(
    n: usize,
    path: &Path,
    sealed: &SignedEnvelope,
) -> anyhow::Result<Vec<Duration>> {
    let addr = local_link::LinkAddr::Unix(path.to_path_buf());
    let listener = local_link::LinkListener::bind(&addr).await?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerRequestsServer::new(EchoLink { answer: answer() }))
            .serve_with_incoming(listener.into_incoming()),
    );
    let mut client = PeerRequestsClient::new(local_link::channel(&addr, Duration::from_secs(1)));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = client
        .handle_forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let forward = InboundForward {
        origin_node_id: "12D3KooWOriginOriginOriginOriginOriginOriginOriginOr".into(),
        envelope: sealed.payload.clone(),
        origin_public_key: vec![7; 32],
    };
    let warm = (n / 10).max(10);
    let mut v = Vec::with_capacity(n);
    for i in 0..(warm + n) as u64 {
        let req = InboundStreamRequest {
            id: i,
            forward: Some(forward.clone()),
            timeout_ms: 30_000,
            trace_context: Default::default(),
        };
        let t = Instant::now();
        tx.send(req).await.map_err(|_| anyhow!("stream closed"))?;
        let a = answers
            .message()
            .await?
            .ok_or_else(|| anyhow!("stream ended"))?;
        if a.id != i {
            return Err(anyhow!("answer {} for request {i}", a.id));
        }
        if i >= warm as u64 {
            v.push(t.elapsed());
        }
    }
    server.abort();
    Ok(v)
}

// ---- libp2p stream -----------------------------------------------------------------------------

fn swarm() -> anyhow::Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build())
}

async fn libp2p_stream(n: usize, sealed: &SignedEnvelope) -> anyhow::Result<Vec<Duration>> {
    let mut a = swarm()?;
    let mut b = swarm()?;
    let a_id = *a.local_peer_id();
    let mut a_control = a.behaviour().new_control();
    let mut b_control = b.behaviour().new_control();
    let mut incoming = a_control
        .accept(PROTOCOL)
        .map_err(|e| anyhow!("accept: {e}"))?;
    a.listen_on("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?)?;
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = a.select_next_some().await {
                return address;
            }
        }
    })
    .await
    .context("no listen address")?;
    let drive_a = tokio::spawn(async move {
        loop {
            a.select_next_some().await;
        }
    });
    b.dial(addr.with_p2p(a_id).map_err(|_| anyhow!("address"))?)?;
    let drive_b = tokio::spawn(async move {
        loop {
            b.select_next_some().await;
        }
    });
    // The answering side: read a request frame, write the answer frame, as sidecar B does.
    let answer = answer();
    let echo = tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(Some(f)) =
                    codec::read_frame::<ForwardFrame, _>(&mut s, MAX_FRAME).await
                {
                    buf.clear();
                    let reply = ForwardFrame {
                        id: f.id,
                        body: Some(forward_frame::Body::Response(answer.clone())),
                    };
                    if codec::encode_frame(&reply, MAX_FRAME, &mut buf).is_err()
                        || s.write_all(&buf).await.is_err()
                        || s.flush().await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let mut stream = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match b_control.open_stream(a_id, PROTOCOL).await {
                Ok(s) => return Ok(s),
                Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(p)) => {
                    return Err(anyhow!("protocol {p} not supported"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .context("cannot open the stream")??;
    let warm = (n / 10).max(10);
    let mut v = Vec::with_capacity(n);
    let mut buf = Vec::new();
    for i in 0..(warm + n) as u64 {
        let frame = ForwardFrame {
            id: i,
            body: Some(forward_frame::Body::Request(sealed.clone())),
        };
        let t = Instant::now();
        buf.clear();
        codec::encode_frame(&frame, MAX_FRAME, &mut buf)?;
        stream.write_all(&buf).await?;
        stream.flush().await?;
        let a = codec::read_frame::<ForwardFrame, _>(&mut stream, MAX_FRAME)
            .await?
            .ok_or_else(|| anyhow!("stream ended"))?;
        if a.id != i {
            return Err(anyhow!("answer {} for request {i}", a.id));
        }
        if i >= warm as u64 {
            v.push(t.elapsed());
        }
    }
    echo.abort();
    drive_a.abort();
    drive_b.abort();
    Ok(v)
}

// ---- signatures --------------------------------------------------------------------------------

fn signatures(n: usize, key: &Keypair) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let peer = key.public().to_peer_id();
    let warm = (n / 10).max(10);
    let envelopes: Vec<ForwardEnvelope> = (0..warm + n)
        .map(|i| envelope(key, format!("floor-{i:08}")))
        .collect();
    let mut sealed = Vec::with_capacity(envelopes.len());
    let mut sign = Vec::with_capacity(n);
    for (i, e) in envelopes.iter().enumerate() {
        let t = Instant::now();
        let s = signing::seal(key, e, Default::default()).map_err(|e| anyhow!(e))?;
        if i >= warm {
            sign.push(t.elapsed());
        }
        sealed.push(s);
    }
    let verifier = signing::Verifier::new(Duration::from_secs(30), 64 << 20);
    let now = envelopes
        .first()
        .map(|e| e.timestamp_unix_ms)
        .unwrap_or_default();
    let mut verify = Vec::with_capacity(n);
    for (i, s) in sealed.iter().enumerate() {
        let t = Instant::now();
        verifier
            .check(&peer, s, now)
            .map_err(|(why, msg)| anyhow!("{}: {msg}", why.label()))?;
        if i >= warm {
            verify.push(t.elapsed());
        }
    }
    Ok((sign, verify))
}
