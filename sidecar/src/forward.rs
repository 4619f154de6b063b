//! `/fold/forward/2.0.0` on long-lived streams: one stream per peer carries many requests, each
//! tagged with a frame id, instead of a new Yamux substream, protocol negotiation and close per
//! request. All of it runs off the swarm task:
//!
//! - [`Outbound`]: per peer, a writer task (it coalesces every queued request into one write, so
//!   one Noise frame carries many) and a reader task that completes the pending requests as their
//!   answers arrive, in any order. The wait queue and the requests in flight per peer are bounded;
//!   beyond them a request fails at once with `UNAVAILABLE`.
//! - [`serve`]: accepts inbound streams (at most 4 per peer); each frame passes the
//!   [`InboundGate`] and is handed to the node on its own task; answers are written back,
//!   coalesced, on the same stream. The request's slot is released as soon as the node has
//!   answered. Each stream's answer queue is bounded in bytes (twice the frame limit, at least
//!   8 MiB) and its writes in time ([`WRITE_STALL`]): a peer that does not read its answers loses
//!   its stream, never the node's capacity.
//!
//! A request or answer over the frame limit fails alone with RESOURCE_EXHAUSTED (measured before
//! it is written); every other request on the stream goes on.
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
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tonic::Code;
use tracing::Instrument;

use crate::codec::{FORWARD_PROTOCOL, encode_frame, read_frame};
use crate::command::MeshError;
use crate::gate::{Denial, InboundGate};
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
        encode_batch(
            job,
            &mut rx,
            &mut next_id,
            &pending,
            &mut buf,
            peer,
            max_bytes,
        );
        if !buf.is_empty() {
            let written = tokio::time::timeout(WRITE_STALL, async {
                writer.write_all(&buf).await?;
                writer.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break format!("writing to node {peer} failed: {e}"),
                Err(_) => {
                    break format!(
                        "node {peer} did not take our requests within {} s",
                        WRITE_STALL.as_secs()
                    );
                }
            }
        }
        tokio::select! {
            next = rx.recv() => match next {
                Some(j) => job = j,
                None => break drain(&pending, &mut reading, peer).await,
            },
            done = &mut reading => break reader_ended(done, peer),
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

/// Encode `job` and the jobs already queued behind it (up to [`MAX_WRITE_BATCH`] bytes) into
/// `buf`, each under a new id in `pending`. A request too large for a frame, or one over
/// [`MAX_IN_FLIGHT_PER_PEER`], fails alone.
fn encode_batch(
    job: Job,
    rx: &mut mpsc::Receiver<Job>,
    next_id: &mut u64,
    pending: &Pending,
    buf: &mut Vec<u8>,
    peer: PeerId,
    max_bytes: usize,
) {
    let mut batch = Some(job);
    while let Some(j) = batch.take() {
        *next_id += 1;
        let frame = ForwardFrame {
            id: *next_id,
            body: Some(forward_frame::Body::Request(j.envelope)),
        };
        if let Err(e) = encode_frame(&frame, max_bytes, buf) {
            // Too large for the frame limit: this request fails alone, the stream goes on.
            let _ = j.reply.send(Err(MeshError::ResourceExhausted(format!(
                "the request cannot be sent to node {peer}: {e} (--max-forward-bytes); send less in one request (fewer or smaller values, a smaller batch)"
            ))));
        } else {
            let mut p = lock(pending);
            if p.len() >= MAX_IN_FLIGHT_PER_PEER {
                // Forget the requests whose callers gave up before refusing a new one.
                p.retain(|_, r| !r.is_closed());
            }
            if p.len() >= MAX_IN_FLIGHT_PER_PEER {
                let _ = j.reply.send(Err(MeshError::Unavailable(format!(
                    "{MAX_IN_FLIGHT_PER_PEER} requests to node {peer} are unanswered; retry"
                ))));
            } else {
                p.insert(*next_id, j.reply);
            }
        }
        if buf.len() < MAX_WRITE_BATCH {
            batch = rx.try_recv().ok();
        }
    }
}

/// A retired stream (e.g. its connection is being replaced by a direct one): the requests
/// already written get their answers first, for a bounded time. Returns why the stream ends.
async fn drain(
    pending: &Pending,
    reading: &mut tokio::task::JoinHandle<String>,
    peer: PeerId,
) -> String {
    let deadline = tokio::time::Instant::now() + DRAIN;
    while !lock(pending).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            done = &mut *reading => return reader_ended(done, peer),
            _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
        }
    }
    "the stream is no longer needed".to_string()
}

/// Why the stream ended, from its reader task's outcome.
fn reader_ended(done: Result<String, tokio::task::JoinError>, peer: PeerId) -> String {
    match done {
        Ok(reason) => reason,
        Err(e) => format!("the reader of node {peer}'s stream failed: {e}"),
    }
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

/// Inbound forward streams one peer may hold open at once (a peer uses one, plus one being
/// retired); a further one is closed at once.
const MAX_STREAMS_PER_PEER: usize = 4;
/// Frames answered without the node (refusals) a stream may have waiting beyond its slots.
const REFUSALS_AHEAD: usize = 64;
/// Smallest answer queue of one inbound stream, in bytes (it is at least twice the frame limit).
const MIN_ANSWER_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// How long a peer may leave its answers unread: a write to it that does not complete, or an
/// answer that finds its stream's answer queue full, for this long ends that stream (never the
/// node's capacity).
pub const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(10);
/// Gate checks one inbound stream has under way at once. Their signatures are verified by the
/// gate's [`crate::signing::Batcher`], which bounds the cores verification takes; this bounds
/// what one stream puts in its queue (one full batch).
const CHECKS_PER_STREAM: usize = crate::signing::MAX_BATCH;
/// How long the node may take to say whether it denies a peer before the stream goes on without.
const DENIAL_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of answers one inbound stream may have queued and not yet written.
fn answer_queue_bytes(max_bytes: usize) -> usize {
    max_bytes
        .saturating_mul(2)
        .saturating_add(64)
        .max(MIN_ANSWER_QUEUE_BYTES)
}

/// Counts each peer's open inbound streams; one is released when dropped.
struct StreamTicket {
    peer: PeerId,
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl StreamTicket {
    fn take(open: &Arc<Mutex<HashMap<PeerId, usize>>>, peer: PeerId) -> Option<StreamTicket> {
        let mut m = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(peer).or_insert(0);
        if *n >= MAX_STREAMS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(StreamTicket {
            peer,
            open: open.clone(),
        })
    }
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        let mut m = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
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
    let open = Arc::new(Mutex::new(HashMap::new()));
    while let Some((peer, mut stream)) = incoming.next().await {
        metrics.forward_stream("inbound");
        let Some(ticket) = StreamTicket::take(&open, peer) else {
            metrics.inbound("forward", "too_many_streams");
            tracing::debug!(%peer, "an inbound forward stream over the per-peer limit was closed");
            tokio::spawn(async move {
                let _ = stream.close().await;
            });
            continue;
        };
        let inbound = Inbound {
            peer,
            gate: gate.clone(),
            node: node.clone(),
            max_bytes,
            metrics: metrics.clone(),
            checking: Arc::new(Semaphore::new(CHECKS_PER_STREAM)),
        };
        tokio::spawn(async move {
            inbound.serve_stream(stream).await;
            drop(ticket);
        });
    }
}

/// One answer waiting to be written, with the room it takes in its stream's answer queue.
struct Queued {
    frame: ForwardFrame,
    room: OwnedSemaphorePermit,
}

/// Where a stream's answers go: the writer's queue, bounded in bytes, and the stream's stop
/// signal (set when the peer does not read in time).
struct Answers {
    peer: PeerId,
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
    stop: Arc<watch::Sender<bool>>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
    /// How long an answer may wait for room ([`WRITE_STALL`]).
    stall: std::time::Duration,
}

impl Answers {
    /// Queue the answer to frame `id` (refused alone when over the frame limit). When the
    /// queue has no room for [`WRITE_STALL`], the peer is not reading: its stream ends.
    async fn send(&self, id: u64, answer: ForwardResponse) -> bool {
        let frame = fit(response(id, answer), self.max_bytes);
        let len = frame.encoded_len().saturating_add(10);
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let mut stop = self.stop.subscribe();
        let room = tokio::select! {
            r = tokio::time::timeout(self.stall, self.room.clone().acquire_many_owned(len)) => r,
            _ = stop.wait_for(|s| *s) => return false,
        };
        match room {
            Ok(Ok(room)) => self.tx.send(Queued { frame, room }).is_ok(),
            Ok(Err(_)) => false,
            Err(_) => {
                self.metrics.inbound("forward", "unread");
                tracing::info!(peer = %self.peer, "a peer left its answers unread; its stream is closed");
                self.stop.send_replace(true);
                false
            }
        }
    }
}

/// The frame, or (when its encoding is over `max` bytes) an answer saying so: one oversized
/// answer fails alone, the stream goes on.
fn fit(frame: ForwardFrame, max: usize) -> ForwardFrame {
    let len = frame.encoded_len();
    if len <= max {
        return frame;
    }
    let request_id = match &frame.body {
        Some(forward_frame::Body::Response(r)) => r.request_id.clone(),
        _ => String::new(),
    };
    response(
        frame.id,
        ForwardResponse {
            request_id,
            result: Some(forward_response::Result::Error(wire_error(
                Code::ResourceExhausted,
                format!(
                    "the answer is {len} bytes, over the {max}-byte frame limit of the forward protocol (--max-forward-bytes); ask for less in one request, e.g. a smaller page_size"
                ),
            ))),
        },
    )
}

/// Ask the node whether it denies `peer` and remember the answer (a node that is away or slow
/// counts as "not denied": it refuses the request itself).
async fn check_denial(gate: &InboundGate, node: &dyn NodeHandler, peer: PeerId) {
    let asked = tokio::time::timeout(
        DENIAL_CHECK,
        node.served_schemas(peer.to_string(), Vec::new()),
    )
    .await;
    let denied = matches!(asked, Ok(Err(ref s)) if s.code() == Code::PermissionDenied);
    gate.set_denial(&peer, Some(denied));
}

/// One inbound stream's peer and what serves it.
#[derive(Clone)]
struct Inbound {
    peer: PeerId,
    gate: Arc<InboundGate>,
    node: Arc<dyn NodeHandler>,
    max_bytes: usize,
    metrics: Arc<SidecarMetrics>,
    /// Gate checks (signature verification) of this stream under way at once, so one peer's
    /// burst of frames cannot fill the verification queue.
    checking: Arc<Semaphore>,
}

impl Inbound {
    /// Read request frames, let each through the gate and to the node on its own task, and
    /// write the answers back (coalesced) as they complete. The reader stops taking frames while
    /// the stream has as many unanswered ones as its peer may have slots; a peer that does not
    /// read its answers within [`WRITE_STALL`] loses the stream.
    async fn serve_stream(self, stream: libp2p::Stream) {
        let peer = self.peer;
        let (mut reader, writer) = stream.split();
        let (tx, rx) = mpsc::unbounded_channel::<Queued>();
        let (stop, mut stopped) = watch::channel(false);
        let stop = Arc::new(stop);
        let mut writing = tokio::spawn(write_answers(
            writer,
            rx,
            self.max_bytes,
            stop.clone(),
            peer,
            self.metrics.clone(),
        ));
        let answers = Arc::new(Answers {
            peer,
            tx,
            room: Arc::new(Semaphore::new(answer_queue_bytes(self.max_bytes))),
            stop: stop.clone(),
            max_bytes: self.max_bytes,
            metrics: self.metrics.clone(),
            stall: WRITE_STALL,
        });
        let budget = self.gate.budget();
        let outstanding = Arc::new(Semaphore::new(
            budget.per_peer_slots() + budget.long_polls_per_peer + REFUSALS_AHEAD,
        ));
        loop {
            let ticket = tokio::select! {
                t = outstanding.clone().acquire_owned() => match t {
                    Ok(t) => t,
                    Err(_) => break,
                },
                _ = stopped.wait_for(|s| *s) => break,
            };
            let frame = tokio::select! {
                f = read_frame::<ForwardFrame, _>(&mut reader, self.max_bytes) => f,
                _ = stopped.wait_for(|s| *s) => break,
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.metrics.inbound("forward", "failed");
                    tracing::debug!(%peer, error = %e, "inbound forward stream failed");
                    break;
                }
            };
            let id = frame.id;
            let Some(forward_frame::Body::Request(envelope)) = frame.body else {
                self.metrics.inbound("forward", "failed");
                tracing::debug!(%peer, "a frame without a request on an inbound stream");
                break;
            };
            self.denial_known().await;
            // The gate (signature check included) and the node, on the request's own task.
            let this = self.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                this.handle(id, envelope, &answers).await;
                drop(ticket);
            });
        }
        drop(answers);
        // The writer ends once every request of this stream has been answered, or at once when
        // the peer stopped reading.
        tokio::select! {
            _ = &mut writing => {}
            _ = stopped.wait_for(|s| *s) => writing.abort(),
        }
    }

    /// Make sure the gate knows whether the node denies this peer: asked before the stream's
    /// first request and before the next request of a denied peer once that answer is stale,
    /// else again in the background when the answer is stale.
    async fn denial_known(&self) {
        match self.gate.denial(&self.peer) {
            Denial::Unknown
            | Denial::Known {
                denied: true,
                stale: true,
            } => check_denial(&self.gate, self.node.as_ref(), self.peer).await,
            Denial::Known { stale: true, .. } => {
                self.gate.set_denial(&self.peer, None);
                let this = self.clone();
                tokio::spawn(async move {
                    check_denial(&this.gate, this.node.as_ref(), this.peer).await;
                });
            }
            Denial::Known { .. } => {}
        }
    }

    /// One request: through the gate, then to the node; its slot is released as soon as the
    /// node has answered, and the answer (or the refusal) queued for the writer.
    async fn handle(&self, id: u64, envelope: SignedEnvelope, answers: &Answers) {
        let peer = self.peer;
        let checked = match self.checking.acquire().await {
            Ok(_turn) => self.gate.admit(&peer, &envelope).await,
            Err(_) => return,
        };
        let admitted = match checked {
            Ok(a) => a,
            Err((request_id, e)) => {
                let answer = ForwardResponse {
                    request_id,
                    result: Some(forward_response::Result::Error(e)),
                };
                answers.send(id, answer).await;
                return;
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
        async move {
            // The peer's id and key from the identity cache: nothing formatted or decoded per
            // request.
            let (origin_node_id, origin_public_key) = match crate::signing::identity_of(&peer) {
                Some(i) => (
                    i.id.to_string(),
                    i.key
                        .try_into_ed25519()
                        .map(|k| k.to_bytes().to_vec())
                        .unwrap_or_default(),
                ),
                None => (peer.to_string(), Vec::new()),
            };
            let answer = self
                .node
                .handle_forward(
                    InboundForward {
                        origin_node_id,
                        envelope: envelope.payload,
                        origin_public_key,
                    },
                    admitted.remaining,
                )
                .await;
            // The node has answered: the slot is free for the next request, whatever the
            // answer's way back to the peer takes.
            drop(admitted.permit);
            let answer = ForwardResponse {
                request_id: admitted.header.request_id,
                ..answer
            };
            answers.send(id, answer).await;
        }
        .instrument(span)
        .await;
    }
}

fn response(id: u64, answer: ForwardResponse) -> ForwardFrame {
    ForwardFrame {
        id,
        body: Some(forward_frame::Body::Response(answer)),
    }
}

/// Write the queued answers, coalesced, each write bounded by [`WRITE_STALL`]; a peer that does
/// not take them in time loses the stream (`stop`).
async fn write_answers<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    max_bytes: usize,
    stop: Arc<watch::Sender<bool>>,
    peer: PeerId,
    metrics: Arc<SidecarMetrics>,
) {
    let mut buf = Vec::new();
    let mut rooms = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(q) = next.take() {
            // Answers were fitted to the limit when queued.
            if let Err(e) = encode_frame(&q.frame, max_bytes, &mut buf) {
                tracing::warn!(%peer, error = %e, "an answer could not be encoded");
            }
            rooms.push(q.room);
            if buf.len() < MAX_WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let written = tokio::time::timeout(WRITE_STALL, async {
            writer.write_all(&buf).await?;
            writer.flush().await
        })
        .await;
        rooms.clear();
        let why = match written {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("writing to node {peer} failed: {e}"),
            Err(_) => {
                metrics.inbound("forward", "unread");
                format!(
                    "node {peer} did not read its answers within {} s",
                    WRITE_STALL.as_secs()
                )
            }
        };
        tracing::info!(%peer, reason = %why, "inbound forward stream closed");
        stop.send_replace(true);
        return;
    }
    let _ = writer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_proto::v1::QueryResponse;

    fn answer_of(bytes: usize) -> ForwardResponse {
        ForwardResponse {
            request_id: "r1".into(),
            result: Some(forward_response::Result::Query(QueryResponse {
                node_id: "x".repeat(bytes),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn an_oversized_answer_becomes_resource_exhausted_for_its_id() {
        let small = response(7, answer_of(100));
        assert_eq!(fit(small.clone(), 1024), small);
        let big = fit(response(8, answer_of(4096)), 1024);
        assert_eq!(big.id, 8);
        let Some(forward_frame::Body::Response(r)) = big.body else {
            panic!("no answer");
        };
        assert_eq!(r.request_id, "r1");
        let Some(forward_response::Result::Error(e)) = r.result else {
            panic!("not refused");
        };
        assert_eq!(e.code, Code::ResourceExhausted as i32);
        assert!(e.message.contains("page_size"), "{}", e.message);
        assert!(answer_queue_bytes(4 << 20) > 2 * (4 << 20));
        assert_eq!(answer_queue_bytes(1024), MIN_ANSWER_QUEUE_BYTES);
    }

    /// An answer that finds its stream's queue full for WRITE_STALL ends the stream; the queue
    /// itself never holds more than its bytes.
    #[tokio::test]
    async fn answers_nobody_reads_end_the_stream() {
        let metrics =
            SidecarMetrics::register(&mut prometheus_client::registry::Registry::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let (stop, mut stopped) = watch::channel(false);
        let answers = Answers {
            peer: PeerId::random(),
            tx,
            room: Arc::new(Semaphore::new(3000)),
            stop: Arc::new(stop),
            max_bytes: 3000,
            metrics,
            stall: std::time::Duration::from_millis(100),
        };
        assert!(answers.send(1, answer_of(2000)).await);
        // No room for a second: the writer is not taking them.
        assert!(!answers.send(2, answer_of(2000)).await);
        assert!(*stopped.borrow_and_update());
    }
}
