//! Forwards to the sidecar on one long-lived `Mesh.ForwardStream` instead of a unary call per
//! request (issue 13: "the same idea on the node ⇄ sidecar link"). Each request gets an id; a
//! reader task hands each answer to its waiting caller. The stream is opened on first use and
//! again after it ends; requests open when it ends fail as link failures (UNAVAILABLE, counted by
//! the sidecar-link breaker). A sidecar without ForwardStream (UNIMPLEMENTED) is used with unary
//! calls from then on. `--link-forward unary` keeps the unary call (docs/BENCHMARKS.md compares
//! the two).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fold_proto::sidecar::mesh_client::MeshClient;
use fold_proto::sidecar::{
    ForwardRequest, ForwardStreamRequest, ForwardStreamResponse, forward_stream_response,
};
use fold_proto::wire::ForwardResponse;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

/// Requests waiting for an answer on the stream at once; beyond it, RESOURCE_EXHAUSTED.
const MAX_PENDING: usize = 65_536;
/// Requests queued for the stream's writer.
const SEND_BUFFER: usize = 1024;

type Answer = Result<ForwardResponse, Status>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// How forwards travel to the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkForward {
    /// One long-lived bidirectional stream (the default).
    Stream,
    /// One unary `Mesh.Forward` call per request.
    Unary,
}

impl std::str::FromStr for LinkForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stream" => Ok(LinkForward::Stream),
            "unary" => Ok(LinkForward::Unary),
            other => Err(format!("'{other}' is not stream or unary")),
        }
    }
}

/// One open stream: its sender and the requests waiting on it (each stream has its own, so a
/// stream that ends fails only its own requests).
struct Live {
    tx: mpsc::Sender<ForwardStreamRequest>,
    pending: Pending,
    dead: Arc<AtomicBool>,
}

pub struct StreamLink<S> {
    client: MeshClient<S>,
    mode: LinkForward,
    unsupported: AtomicBool,
    live: tokio::sync::Mutex<Option<Live>>,
    next_id: AtomicU64,
}

/// A failure of the link itself (the sidecar-link breaker counts those: they carry a source).
pub fn link_failure(message: impl Into<String>) -> Status {
    let message = message.into();
    let mut s = Status::unavailable(message.clone());
    s.set_source(Arc::new(std::io::Error::other(message)));
    s
}

/// Removes a request's entry when its caller stops waiting (answered, timed out, cancelled).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S> StreamLink<S>
where
    S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    pub fn new(client: MeshClient<S>, mode: LinkForward) -> Self {
        StreamLink {
            client,
            mode,
            unsupported: AtomicBool::new(false),
            live: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// One forward, on the stream (or the unary call). `timeout` is how long the caller waits;
    /// `trace` its trace context.
    pub async fn forward(
        &self,
        req: ForwardRequest,
        timeout: Duration,
        trace: HashMap<String, String>,
    ) -> Result<ForwardResponse, Status> {
        if self.mode == LinkForward::Unary || self.unsupported.load(Ordering::Relaxed) {
            return self.unary(req, timeout, &trace).await;
        }
        let (tx, pending, dead) = match self.sender().await {
            Ok(x) => x,
            Err(None) => return self.unary(req, timeout, &trace).await,
            Err(Some(s)) => return Err(s),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut p = lock(&pending);
            if p.len() >= MAX_PENDING {
                return Err(Status::resource_exhausted(format!(
                    "{MAX_PENDING} forwards are already waiting for the sidecar"
                )));
            }
            p.insert(id, answer_tx);
        }
        // The stream may have ended between taking its sender and registering: its reader has
        // then failed everything it had, but not this one.
        if dead.load(Ordering::Acquire) {
            lock(&pending).remove(&id);
            return Err(link_failure(
                "the forward stream to the p2p-sidecar ended; the next request opens a new one",
            ));
        }
        let _guard = PendingGuard {
            pending: &pending,
            id,
        };
        let msg = ForwardStreamRequest {
            id,
            request: Some(req),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            trace_context: trace,
        };
        if tx.send(msg).await.is_err() {
            return Err(link_failure(
                "the forward stream to the p2p-sidecar closed before the request was sent",
            ));
        }
        match tokio::time::timeout(timeout, answer_rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(link_failure(
                "the forward stream to the p2p-sidecar ended before the answer",
            )),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the sidecar did not answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    async fn unary(
        &self,
        req: ForwardRequest,
        timeout: Duration,
        trace: &HashMap<String, String>,
    ) -> Result<ForwardResponse, Status> {
        let mut request = tonic::Request::new(req);
        fold_telemetry::otel::inject_metadata(trace, request.metadata_mut());
        request.set_timeout(timeout);
        self.client
            .clone()
            .forward(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// The open stream's sender, opening one if there is none. `Err(None)`: the sidecar has no
    /// ForwardStream (use unary calls).
    #[allow(clippy::type_complexity)]
    async fn sender(
        &self,
    ) -> Result<(mpsc::Sender<ForwardStreamRequest>, Pending, Arc<AtomicBool>), Option<Status>>
    {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && !l.dead.load(Ordering::Acquire)
            && !l.tx.is_closed()
        {
            return Ok((l.tx.clone(), l.pending.clone(), l.dead.clone()));
        }
        let (tx, rx) = mpsc::channel(SEND_BUFFER);
        let opened = self
            .client
            .clone()
            .forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::info!("the p2p-sidecar has no ForwardStream; forwarding with unary calls");
                self.unsupported.store(true, Ordering::Relaxed);
                return Err(None);
            }
            Err(s) => {
                let failed = std::error::Error::source(&s).is_some();
                return Err(Some(if failed {
                    s
                } else {
                    link_failure(format!(
                        "could not open the forward stream to the p2p-sidecar: {}",
                        s.message()
                    ))
                }));
            }
        };
        let dead = Arc::new(AtomicBool::new(false));
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(read_answers(inbound, pending.clone(), dead.clone()));
        *live = Some(Live {
            tx: tx.clone(),
            pending: pending.clone(),
            dead: dead.clone(),
        });
        Ok((tx, pending, dead))
    }
}

/// Hand each answer to its caller; when the stream ends, fail every request still open on it.
async fn read_answers(
    mut inbound: tonic::Streaming<ForwardStreamResponse>,
    pending: Pending,
    dead: Arc<AtomicBool>,
) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(msg)) => {
                let Some(waiting) = lock(&pending).remove(&msg.id) else {
                    // Its caller stopped waiting (timed out or cancelled).
                    continue;
                };
                let answer = match msg.result {
                    Some(forward_stream_response::Result::Response(r)) => Ok(r),
                    Some(forward_stream_response::Result::Error(e)) => {
                        Err(fold_proto::status::from_wire_local(e))
                    }
                    None => Err(Status::internal("the sidecar sent an empty stream answer")),
                };
                let _ = waiting.send(answer);
            }
            Ok(None) => break "the p2p-sidecar closed the forward stream".to_string(),
            Err(s) => {
                break format!(
                    "the forward stream to the p2p-sidecar broke: {}",
                    s.message()
                );
            }
        }
    };
    dead.store(true, Ordering::Release);
    tracing::debug!(reason = %why, "forward stream ended");
    let open: Vec<_> = lock(&pending).drain().collect();
    for (_, waiting) in open {
        let _ = waiting.send(Err(link_failure(why.clone())));
    }
}
