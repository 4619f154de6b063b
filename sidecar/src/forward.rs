//! `/fold/forward/2.0.0` on long-lived streams: one stream per peer carries many requests, each
//! tagged with a frame id, instead of a new Yamux substream, protocol negotiation and close per
//! request. All of it runs off the swarm task:
//!
//! - [`Outbound`]: per peer, a writer task (it coalesces every queued request into one write, so
//!   one Noise frame carries many) and a reader task that completes the pending requests as their
//!   answers arrive, in any order. The wait queue and the requests in flight per peer are bounded;
//!   beyond them a request fails at once with `UNAVAILABLE`.
//! - [`serve`]: accepts inbound streams; each frame passes the [`InboundGate`] and is handed to
//!   the node on its own task; answers are written back, coalesced, on the same stream.
//!
//! Written on `libp2p-stream` (the generic stream behaviour of rust-libp2p). Its open deadlock
//! report (rust-libp2p #5410) concerns yamux 0.13; this tree runs yamux 0.14.1 through
//! libp2p-yamux 0.48, and the e2e suite drives 1,000 concurrent forwards over one stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fold_proto::sidecar::InboundForward;
use fold_proto::status::wire_error;
use fold_proto::wire::{
    ForwardFrame, ForwardResponse, SignedEnvelope, forward_frame, forward_response,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};
use tonic::Code;
use tracing::Instrument;

use crate::codec::{FORWARD_PROTOCOL, encode_frame, read_frame};
use crate::command::MeshError;
use crate::gate::InboundGate;
use crate::metrics::SidecarMetrics;
use crate::node_link::NodeHandler;

/// Requests waiting to be written to one peer's stream.
const MAX_QUEUED_PER_PEER: usize = 1024;
/// Requests written to one peer and not answered yet.
const MAX_IN_FLIGHT_PER_PEER: usize = 4096;
/// Most bytes gathered into one write.
const MAX_WRITE_BATCH: usize = 256 * 1024;
/// How long a retired stream waits for the answers to the requests already written on it.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

type Reply = oneshot::Sender<Result<ForwardResponse, MeshError>>;

struct Job {
    envelope: SignedEnvelope,
    reply: Reply,
}

/// The requester side: one long-lived stream (and its two tasks) per peer.
pub struct Outbound {
    control: Mutex<libp2p_stream::Control>,
    peers: Mutex<HashMap<PeerId, mpsc::Sender<Job>>>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
}

impl Outbound {
    pub fn new(
        control: libp2p_stream::Control,
        max_bytes: usize,
        metrics: Arc<SidecarMetrics>,
    ) -> Arc<Outbound> {
        Arc::new(Outbound {
            control: Mutex::new(control),
            peers: Mutex::new(HashMap::new()),
            max_bytes,
            metrics,
        })
    }

    /// Queue `envelope` for `peer` (connected already); the answer, or the failure, arrives on
    /// `reply`. Never waits.
    pub fn send(&self, peer: PeerId, envelope: SignedEnvelope, reply: Reply) {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut job = Job { envelope, reply };
        // At most twice: a stream whose tasks have ended is replaced once.
        for _ in 0..2 {
            let tx = peers
                .entry(peer)
                .or_insert_with(|| self.spawn_peer(peer))
                .clone();
            match tx.try_send(job) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(j)) => {
                    let _ = j.reply.send(Err(MeshError::Unavailable(format!(
                        "{MAX_QUEUED_PER_PEER} requests are already waiting for node {peer}; retry"
                    ))));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(j)) => {
                    peers.remove(&peer);
                    job = j;
                }
            }
        }
        let _ = job.reply.send(Err(MeshError::Unavailable(format!(
            "no stream to node {peer}"
        ))));
    }

    /// Queue `envelope` on `peer`'s stream if one is open; otherwise hand it back (the caller
    /// goes through the event loop, which connects first).
    pub fn try_send(
        &self,
        peer: PeerId,
        envelope: SignedEnvelope,
    ) -> Result<oneshot::Receiver<Result<ForwardResponse, MeshError>>, SignedEnvelope> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(tx) = peers.get(&peer).filter(|tx| !tx.is_closed()) else {
            return Err(envelope);
        };
        let (reply, rx) = oneshot::channel();
        match tx.try_send(Job { envelope, reply }) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(j)) => {
                let _ = j.reply.send(Err(MeshError::Unavailable(format!(
                    "{MAX_QUEUED_PER_PEER} requests are already waiting for node {peer}; retry"
                ))));
                Ok(rx)
            }
            Err(mpsc::error::TrySendError::Closed(j)) => Err(j.envelope),
        }
    }

    /// Forget the stream to a peer that disconnected (its tasks end with the connection).
    pub fn disconnected(&self, peer: &PeerId) {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(peer);
    }

    fn spawn_peer(&self, peer: PeerId) -> mpsc::Sender<Job> {
        let (tx, rx) = mpsc::channel(MAX_QUEUED_PER_PEER);
        let control = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        tokio::spawn(peer_stream(
            control,
            peer,
            rx,
            self.max_bytes,
            self.metrics.clone(),
        ));
        tx
    }
}

type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fail_all(pending: &Pending, rx: &mut mpsc::Receiver<Job>, e: &MeshError) {
    for (_, reply) in lock(pending).drain() {
        let _ = reply.send(Err(e.clone()));
    }
    rx.close();
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(e.clone()));
    }
}

/// One peer's stream: opened on the first request, then written by this task and read by a
/// second one, until either side closes it or fails.
async fn peer_stream(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    mut rx: mpsc::Receiver<Job>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
) {
    let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
    let Some(first) = rx.recv().await else {
        return;
    };
    let stream = match control.open_stream(peer, FORWARD_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => {
            let e =
                MeshError::Unavailable(format!("cannot open a forward stream to node {peer}: {e}"));
            let _ = first.reply.send(Err(e.clone()));
            fail_all(&pending, &mut rx, &e);
            return;
        }
    };
    metrics.forward_stream("outbound");
    tracing::debug!(%peer, "forward stream open");
    let (reader, mut writer) = stream.split();
    let mut reading = tokio::spawn(read_answers(reader, peer, pending.clone(), max_bytes));
    let mut next_id: u64 = 0;
    let mut buf = Vec::new();
    let mut job = first;
    let why = loop {
        buf.clear();
        let mut batch = Some(job);
        while let Some(j) = batch.take() {
            next_id += 1;
            let frame = ForwardFrame {
                id: next_id,
                body: Some(forward_frame::Body::Request(j.envelope)),
            };
            if let Err(e) = encode_frame(&frame, max_bytes, &mut buf) {
                let _ = j.reply.send(Err(MeshError::InvalidArgument(e.to_string())));
            } else {
                let mut p = lock(&pending);
                if p.len() >= MAX_IN_FLIGHT_PER_PEER {
                    // Forget the requests whose callers gave up before refusing a new one.
                    p.retain(|_, r| !r.is_closed());
                }
                if p.len() >= MAX_IN_FLIGHT_PER_PEER {
                    let _ = j.reply.send(Err(MeshError::Unavailable(format!(
                        "{MAX_IN_FLIGHT_PER_PEER} requests to node {peer} are unanswered; retry"
                    ))));
                } else {
                    p.insert(next_id, j.reply);
                }
            }
            if buf.len() < MAX_WRITE_BATCH {
                batch = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            if let Err(e) = writer.write_all(&buf).await {
                break format!("writing to node {peer} failed: {e}");
            }
            if let Err(e) = writer.flush().await {
                break format!("writing to node {peer} failed: {e}");
            }
        }
        tokio::select! {
            next = rx.recv() => match next {
                Some(j) => job = j,
                None => {
                    // Retired (e.g. its connection is being replaced by a direct one): the
                    // requests already written get their answers first, for a bounded time.
                    let deadline = tokio::time::Instant::now() + DRAIN;
                    let mut ended = None;
                    while !lock(&pending).is_empty() && tokio::time::Instant::now() < deadline {
                        tokio::select! {
                            done = &mut reading => {
                                ended = Some(match done {
                                    Ok(reason) => reason,
                                    Err(e) => format!("the reader of node {peer}'s stream failed: {e}"),
                                });
                                break;
                            }
                            _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
                        }
                    }
                    break ended.unwrap_or_else(|| "the stream is no longer needed".to_string());
                }
            },
            done = &mut reading => {
                break match done {
                    Ok(reason) => reason,
                    Err(e) => format!("the reader of node {peer}'s stream failed: {e}"),
                };
            }
        }
    };
    tracing::debug!(%peer, reason = %why, "forward stream closed");
    reading.abort();
    let _ = writer.close().await;
    fail_all(
        &pending,
        &mut rx,
        &MeshError::Unavailable(format!("the stream to node {peer} ended: {why}")),
    );
}

/// Complete pending requests as their answers arrive; returns why the stream ended.
async fn read_answers<R: AsyncRead + Unpin>(
    mut reader: R,
    peer: PeerId,
    pending: Pending,
    max_bytes: usize,
) -> String {
    loop {
        match read_frame::<ForwardFrame, _>(&mut reader, max_bytes).await {
            Ok(Some(frame)) => {
                let Some(forward_frame::Body::Response(resp)) = frame.body else {
                    return format!("node {peer} sent a request frame on our stream");
                };
                if let Some(reply) = lock(&pending).remove(&frame.id) {
                    let _ = reply.send(Ok(resp));
                }
            }
            Ok(None) => return format!("node {peer} closed the stream"),
            Err(e) => return format!("reading from node {peer} failed: {e}"),
        }
    }
}

/// Accept inbound forward streams until the sidecar stops.
pub async fn serve(
    mut incoming: libp2p_stream::IncomingStreams,
    gate: Arc<InboundGate>,
    node: Arc<dyn NodeHandler>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        metrics.forward_stream("inbound");
        tokio::spawn(serve_stream(
            peer,
            stream,
            gate.clone(),
            node.clone(),
            max_bytes,
            metrics.clone(),
        ));
    }
}

/// One peer's stream: read request frames, let each through the gate and to the node on its own
/// task, and write the answers back (coalesced) as they complete.
async fn serve_stream(
    peer: PeerId,
    stream: libp2p::Stream,
    gate: Arc<InboundGate>,
    node: Arc<dyn NodeHandler>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
) {
    let (mut reader, writer) = stream.split();
    let (tx, rx) = mpsc::channel::<ForwardFrame>(256);
    let writing = tokio::spawn(write_answers(writer, rx, max_bytes));
    loop {
        let frame = match read_frame::<ForwardFrame, _>(&mut reader, max_bytes).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                metrics.inbound("forward", "failed");
                tracing::debug!(%peer, error = %e, "inbound forward stream failed");
                break;
            }
        };
        let id = frame.id;
        let Some(forward_frame::Body::Request(envelope)) = frame.body else {
            metrics.inbound("forward", "failed");
            tracing::debug!(%peer, "a frame without a request on an inbound stream");
            break;
        };
        let admitted = match gate.admit(&peer, &envelope) {
            Ok(a) => a,
            Err((request_id, e)) => {
                let answer = ForwardResponse {
                    request_id,
                    result: Some(forward_response::Result::Error(e)),
                };
                if tx.send(response(id, answer)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let span = tracing::info_span!(
            "sidecar.inbound_forward",
            otel.kind = "server",
            peer = %peer,
            request_id = %admitted.header.request_id,
        );
        fold_telemetry::otel::set_parent(
            &span,
            fold_telemetry::otel::extract_map(&envelope.trace_context),
        );
        let node = node.clone();
        let tx = tx.clone();
        tokio::spawn(
            async move {
                let origin_public_key = crate::signing::public_key_of(&peer)
                    .and_then(|k| k.try_into_ed25519().ok())
                    .map(|k| k.to_bytes().to_vec())
                    .unwrap_or_default();
                let answer = node
                    .handle_forward(
                        InboundForward {
                            origin_node_id: peer.to_string(),
                            envelope: envelope.payload,
                            origin_public_key,
                        },
                        admitted.remaining,
                    )
                    .await;
                let answer = ForwardResponse {
                    request_id: admitted.header.request_id,
                    ..answer
                };
                let _ = tx.send(response(id, answer)).await;
                drop(admitted.permit);
            }
            .instrument(span),
        );
    }
    drop(tx);
    // The writer ends once every request of this stream has been answered.
    let _ = writing.await;
}

fn response(id: u64, answer: ForwardResponse) -> ForwardFrame {
    ForwardFrame {
        id,
        body: Some(forward_frame::Body::Response(answer)),
    }
}

async fn write_answers<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<ForwardFrame>,
    max_bytes: usize,
) {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if let Err(e) = encode_frame(&frame, max_bytes, &mut buf) {
                // Too large to send: answer with the reason instead.
                let refusal = response(
                    frame.id,
                    ForwardResponse {
                        request_id: String::new(),
                        result: Some(forward_response::Result::Error(wire_error(
                            Code::ResourceExhausted,
                            format!("the answer is too large to send: {e}"),
                        ))),
                    },
                );
                let _ = encode_frame(&refusal, max_bytes, &mut buf);
            }
            if buf.len() < MAX_WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if writer.write_all(&buf).await.is_err() || writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.close().await;
}
