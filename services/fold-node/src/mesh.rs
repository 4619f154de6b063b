//! The node's link to its p2p-sidecar (`fold.sidecar.v1.Mesh`), and forwarding through it.
//!
//! The link is a lazily (re)connecting gRPC channel over a Unix socket (or loopback TCP). A
//! monitor task keeps track of whether the sidecar is there: it asks for the sidecar's status,
//! learns the node id (the sidecar's PeerId, persisted so it is known even while the sidecar is
//! away), announces the approved schemas, then holds a `PeerEvents` stream open. When the stream
//! breaks the link is down: `fold.v1.Network` health goes NOT_SERVING and remote requests fail
//! fast with `UNAVAILABLE` until the sidecar is back. Either process may start first.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fold_middleware::breaker::{
    Breaker, BreakerConfig, BreakerError, BreakerLayer, BreakerState, Breakers, Observer,
    Transition, Verdict,
};
use fold_middleware::metrics::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService, code_name};

use fold_proto::sidecar as sc;
use fold_proto::sidecar::mesh_client::MeshClient;
use fold_proto::v1::{CheckSchemasRequest, CheckSchemasResponse, FindProvidersRequest};
use fold_proto::wire::forward_response;
use fold_proto::wire::{Operation, Requester, operation};
use local_link::LinkAddr;
use local_link::token::{TokenLayer, WithToken};
use tokio::sync::Notify;
use tonic::Status;
use tonic::transport::Channel;

use crate::error::{NodeError, is_callee_failure, timed_out};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::forward_stream::{LinkForward, StreamLink};
use crate::link::{Link, LinkFuture};
use crate::metrics::NodeMetrics;
use crate::store::Store;

type MeshSvc = GrpcMetricsService<WithToken<Channel>>;

/// The Network service's name, for health.
pub const NETWORK_SERVICE: &str = "fold.v1.Network";
const NODE_ID_KEY: &str = "node_id";
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between tries to reach the sidecar: a local socket is cheap to try, and a node
/// that sees its restarted sidecar late answers UNAVAILABLE for no reason.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Longest node id accepted anywhere (a PeerId is 52 characters).
pub const MAX_NODE_ID_BYTES: usize = fold_proto::limits::MAX_ID_BYTES;
/// Most per-peer breakers kept; closed ones are pruned first.
const MAX_BREAKERS: usize = 1024;

/// Is `s` shaped like a node id (a base58btc PeerId)? Checked before a target is used as a key
/// anywhere, so a client cannot fill maps with arbitrary strings.
pub fn valid_node_id(s: &str) -> bool {
    const B58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    (32..=MAX_NODE_ID_BYTES).contains(&s.len()) && s.chars().all(|c| B58.contains(c))
}

#[derive(Clone)]
pub struct MeshLink {
    inner: Arc<Inner>,
}

struct Inner {
    addr: LinkAddr,
    client: MeshClient<MeshSvc>,
    metrics: Arc<NodeMetrics>,
    up: AtomicBool,
    node_id: RwLock<Option<String>>,
    store: Store,
    health: HealthReporter,
    schemas_changed: Notify,
    forward_timeout: Duration,
    /// Forwards through the sidecar, behind two breaker layers: one breaker per target node,
    /// and one for the link to the sidecar.
    forward_svc: ForwardSvc,
    /// The forward stream to the sidecar (also used, without breakers, by relayed requests).
    stream_link: Arc<StreamLink<MeshSvc>>,
    /// The per-target breakers of `forward_svc`, read by routing to leave open ones out.
    peer_breakers: Arc<Breakers<String>>,
    /// Peers the sidecar reported disconnected (and not connected since): routing leaves them
    /// out until they are back. At most MAX_BREAKERS entries.
    disconnected: Mutex<HashSet<String>>,
    /// Called with a peer's id when it connects again after a disconnection (routing forgets
    /// what it learnt of the peer's latency before: a returning provider starts afresh).
    on_reconnect: std::sync::OnceLock<ReconnectHook>,
}

type ReconnectHook = Box<dyn Fn(&str) + Send + Sync>;

/// A forward as a tower service: (target node, request) → the sidecar's answer.
type ForwardSvc = tower::util::BoxCloneSyncService<
    (String, tonic::Request<sc::ForwardRequest>),
    tonic::Response<fold_proto::wire::ForwardResponse>,
    NodeError,
>;

/// The innermost service: one forward to the sidecar, on the long-lived forward stream (or a
/// unary `Mesh.Forward` call; `--link-forward`).
#[derive(Clone)]
struct ForwardCall(Arc<StreamLink<MeshSvc>>);

impl tower::Service<(String, tonic::Request<sc::ForwardRequest>)> for ForwardCall {
    type Response = tonic::Response<fold_proto::wire::ForwardResponse>;
    type Error = Status;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Status>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, (_, req): (String, tonic::Request<sc::ForwardRequest>)) -> Self::Future {
        let link = self.0.clone();
        Box::pin(async move {
            // The deadline and trace context ride in the request's metadata (as for a unary
            // call); on the stream they travel in the message.
            let timeout = grpc_timeout(req.metadata()).unwrap_or(Duration::from_secs(10));
            let trace: std::collections::HashMap<String, String> = ["traceparent", "tracestate"]
                .into_iter()
                .filter_map(|k| {
                    let v = req.metadata().get(k)?.to_str().ok()?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect();
            link.forward(req.into_inner(), timeout, trace)
                .await
                .map(tonic::Response::new)
        })
    }
}

/// Produced on this side (connection refused, reset): the link to the sidecar failed.
fn link_failed(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
}

/// The forward stack: the per-target breaker (mesh failures count: unreachable, too slow, link
/// down; a remote refusal such as PERMISSION_DENIED does not), then the sidecar-link breaker.
fn forward_stack(
    link: Arc<StreamLink<MeshSvc>>,
    config: BreakerConfig,
    peer_breakers: Arc<Breakers<String>>,
    metrics: Arc<NodeMetrics>,
) -> ForwardSvc {
    let observer = |metrics: Arc<NodeMetrics>| -> Observer<String> {
        Arc::new(move |target: &String, b: &Breaker, t: Transition| {
            if let Some((from, to)) = t {
                tracing::warn!(
                    target_node = %target,
                    from = from.as_str(),
                    to = to.as_str(),
                    "circuit breaker changed state"
                );
            }
            metrics.breaker(target, b.state(), t.is_some());
        })
    };
    let peers = BreakerLayer::new(
        peer_breakers,
        "node",
        |r: &(String, tonic::Request<sc::ForwardRequest>)| r.0.clone(),
        |r: &Result<tonic::Response<fold_proto::wire::ForwardResponse>, BreakerError<Status>>| {
            match r {
                Ok(_) => Verdict::Success,
                // Refused by the link's breaker: no verdict on the peer.
                Err(BreakerError::Open(_)) => Verdict::Ignore,
                // Exactly the callee failures (unreachable, too slow, dropped) count.
                Err(BreakerError::Inner(s)) if link_failed(s) || is_callee_failure(s.code()) => {
                    Verdict::Failure
                }
                Err(BreakerError::Inner(_)) => Verdict::Success,
            }
        },
    )
    .observe(observer(metrics.clone()));
    let link_breaker = BreakerLayer::new(
        Arc::new(Breakers::bounded(config, 1)),
        "the p2p-sidecar link:",
        |_: &(String, tonic::Request<sc::ForwardRequest>)| "sidecar-link".to_string(),
        |r: &Result<tonic::Response<fold_proto::wire::ForwardResponse>, Status>| match r {
            Err(s) if link_failed(s) => Verdict::Failure,
            _ => Verdict::Success,
        },
    )
    .observe(observer(metrics));
    let svc = tower::ServiceBuilder::new()
        .map_err(|e: BreakerError<BreakerError<Status>>| match e {
            BreakerError::Open(o) | BreakerError::Inner(BreakerError::Open(o)) => {
                NodeError::unavailable(o.to_string())
            }
            BreakerError::Inner(BreakerError::Inner(s)) => NodeError::from(s),
        })
        .layer(peers)
        .layer(link_breaker)
        .service(ForwardCall(link));
    tower::util::BoxCloneSyncService::new(svc)
}

/// Tuning of the mesh link.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub forward_timeout: Duration,
    pub max_message_bytes: usize,
    pub breaker: BreakerConfig,
    /// Shared secret sent on every call to the sidecar (TCP links).
    pub token: Option<local_link::token::LinkToken>,
    /// Forwards on one long-lived stream, or a unary call each.
    pub link_forward: LinkForward,
}

impl MeshLink {
    pub fn new(
        addr: LinkAddr,
        store: Store,
        health: HealthReporter,
        opts: MeshOptions,
        metrics: Arc<NodeMetrics>,
        client_metrics: Arc<GrpcMetrics>,
    ) -> MeshLink {
        let channel = local_link::channel(&addr, Duration::from_secs(1));
        let channel = tower::ServiceBuilder::new()
            .layer(GrpcMetricsLayer::new(client_metrics))
            .layer(TokenLayer(opts.token.clone()))
            .service(channel);
        let client = MeshClient::new(channel)
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        let node_id = store.meta_get(NODE_ID_KEY).ok().flatten();
        let peer_breakers = Arc::new(Breakers::bounded(opts.breaker, MAX_BREAKERS));
        let stream_link = Arc::new(
            StreamLink::new(client.clone(), opts.link_forward)
                .with_max_message_bytes(opts.max_message_bytes),
        );
        let forward_svc = forward_stack(
            stream_link.clone(),
            opts.breaker,
            peer_breakers.clone(),
            metrics.clone(),
        );
        MeshLink {
            inner: Arc::new(Inner {
                addr,
                client,
                metrics,
                up: AtomicBool::new(false),
                node_id: RwLock::new(node_id),
                store,
                health,
                schemas_changed: Notify::new(),
                forward_timeout: opts.forward_timeout,
                forward_svc,
                stream_link,
                peer_breakers,
                disconnected: Mutex::new(HashSet::new()),
                on_reconnect: std::sync::OnceLock::new(),
            }),
        }
    }

    /// This node's id (its sidecar's PeerId), once the sidecar has told us.
    pub fn node_id(&self) -> Option<String> {
        self.inner
            .node_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn node_id_or_empty(&self) -> String {
        self.node_id().unwrap_or_default()
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// True when `target` names this node (empty always does).
    pub fn is_local(&self, target: &str) -> bool {
        target.is_empty() || self.node_id().is_some_and(|id| id == target)
    }

    /// A client for a Mesh call, or `UNAVAILABLE` at once when the sidecar is away.
    pub fn client(&self) -> Result<MeshClient<MeshSvc>, NodeError> {
        if !self.is_up() {
            return Err(NodeError::unavailable(format!(
                "the p2p-sidecar is not reachable at {} (is it running?); local requests still work",
                self.inner.addr
            )));
        }
        Ok(self.inner.client.clone())
    }

    /// The longest a forward may take when the caller set no deadline (--forward-timeout-ms).
    pub fn forward_timeout(&self) -> Duration {
        self.inner.forward_timeout
    }

    /// May routing send to `node` now? Not while the sidecar reports it disconnected, nor while
    /// its breaker is open (it is again once the breaker's backoff is over: the next request is
    /// the probe).
    pub fn routable(&self, node: &str) -> bool {
        if self.disconnected().contains(node) {
            return false;
        }
        self.inner
            .peer_breakers
            .peek(&node.to_string())
            .is_none_or(|b| b.available(Instant::now()))
    }

    /// The state of this node's breaker toward `node`, if a request was forwarded to it.
    pub fn breaker_state(&self, node: &str) -> Option<BreakerState> {
        self.inner
            .peer_breakers
            .peek(&node.to_string())
            .map(|b| b.state())
    }

    fn disconnected(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner
            .disconnected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn peer_event(&self, ev: &sc::PeerEvent) {
        use sc::peer_event::Kind;
        match Kind::try_from(ev.kind) {
            Ok(Kind::Connected) => {
                let was_gone = self.disconnected().remove(&ev.node_id);
                if was_gone && let Some(f) = self.inner.on_reconnect.get() {
                    f(&ev.node_id);
                }
            }
            Ok(Kind::Disconnected) if valid_node_id(&ev.node_id) => {
                let mut d = self.disconnected();
                if d.len() < MAX_BREAKERS {
                    d.insert(ev.node_id.clone());
                }
            }
            _ => {}
        }
    }

    /// Ask the monitor to re-announce the approved schemas.
    pub fn schemas_changed(&self) {
        self.inner.schemas_changed.notify_one();
    }

    /// Run `op` on node `target` through the sidecar: the one way out of this node for an
    /// operation (measured per kind and outcome).
    pub async fn forward(
        &self,
        target: String,
        op: operation::Kind,
        requester: Requester,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        let started = Instant::now();
        let kind = match op {
            operation::Kind::Query(_) => "query",
            operation::Kind::Mutate(_) => "mutate",
            operation::Kind::Peers(_) => "peers",
            operation::Kind::BatchMutate(_) => "batch_mutate",
            operation::Kind::History(_) => "history",
            operation::Kind::Changes(_) => "changes",
            operation::Kind::Raft(_) => "raft",
        };
        let result = self.forward_inner(target, op, requester, deadline).await;
        let outcome = match &result {
            Ok(_) => "OK",
            Err(s) => code_name(s.code()),
        };
        self.inner.metrics.forward(kind, outcome, started);
        result
    }

    async fn forward_inner(
        &self,
        target: String,
        op: operation::Kind,
        requester: Requester,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        if !valid_node_id(&target) {
            return Err(NodeError::invalid_argument(format!(
                "'target_node_id' is not a node id (a base58 PeerId such as 12D3KooW…, at most {MAX_NODE_ID_BYTES} characters): '{}'",
                target.chars().take(80).collect::<String>()
            )));
        }
        // Fail fast while the sidecar is away.
        self.client()?;
        // A relayed peers request fails when a node behind the target does, and Raft traffic
        // has its own retries and timeouts (a breaker opened by a partition would delay the
        // group's recovery after it heals): neither goes through the per-peer breaker.
        let relayed = matches!(&op, operation::Kind::Peers(p) if !p.via.is_empty())
            || matches!(&op, operation::Kind::Raft(_));
        // Answer before the client gives up: keep a margin of its deadline for the way back,
        // so the client hears DEADLINE_EXCEEDED from us rather than timing out blind.
        let timeout = deadline
            .map(|d| {
                let margin = (d / 10).min(Duration::from_millis(200));
                d.saturating_sub(margin).min(self.inner.forward_timeout)
            })
            .unwrap_or(self.inner.forward_timeout);
        let mut request = tonic::Request::new(sc::ForwardRequest {
            target_node_id: target.clone(),
            requester: Some(requester),
            operation: Some(Operation { kind: Some(op) }),
        });
        // Trace context and deadline travel once, as gRPC metadata (traceparent, grpc-timeout).
        // The sidecar keeps a margin of the deadline for its answer; tonic enforces it here too.
        fold_telemetry::otel::inject_metadata(
            &fold_telemetry::otel::inject_current(),
            request.metadata_mut(),
        );
        request.set_timeout(timeout);
        let result = self.send(&target, request, relayed).await;
        let resp = result.map_err(|s| {
            if timed_out(s.code()) {
                NodeError::deadline_exceeded(format!(
                    "forward to node {target} did not complete within {} ms",
                    timeout.as_millis()
                ))
            } else {
                s
            }
        })?;
        match resp.into_inner().result {
            Some(forward_response::Result::Error(e)) => {
                Err(fold_proto::status::from_wire(&target, e).into())
            }
            Some(r) => Ok(r),
            None => Err(NodeError::internal(format!(
                "node {target} sent an empty forward response"
            ))),
        }
    }

    /// Send a forward to the sidecar. Circuit breakers (a tower layer keyed by target, then the
    /// sidecar link's): fail fast, with no network wait, toward a peer (or through a link) that
    /// kept failing; after a backoff one probe decides. A call dropped before it completes
    /// releases its probe.
    async fn send(
        &self,
        target: &str,
        request: tonic::Request<sc::ForwardRequest>,
        relayed: bool,
    ) -> Result<tonic::Response<fold_proto::wire::ForwardResponse>, NodeError> {
        use tower::ServiceExt;
        if !relayed {
            return self
                .inner
                .forward_svc
                .clone()
                .oneshot((target.to_string(), request))
                .await;
        }
        // A relayed peers request fails when a node *behind* the target does: that says
        // nothing about the target, so it bypasses (and never trips) its breaker.
        ForwardCall(self.inner.stream_link.clone())
            .oneshot((target.to_string(), request))
            .await
            .map_err(|s| {
                if link_failed(&s) {
                    NodeError::unavailable(format!("the p2p-sidecar link failed: {}", s.message()))
                } else {
                    NodeError::from(s)
                }
            })
    }

    /// Keep watching the sidecar link until the process ends.
    pub fn spawn_monitor(&self) {
        let link = self.clone();
        tokio::spawn(async move { link.monitor().await });
    }

    async fn set_up(&self, up: bool) {
        let was = self.inner.up.swap(up, Ordering::AcqRel);
        self.inner.metrics.sidecar_link(up);
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.inner
            .health
            .set_service_status(NETWORK_SERVICE, status)
            .await;
        if was != up {
            if up {
                tracing::info!(sidecar = %self.inner.addr, node_id = %self.node_id_or_empty(), "sidecar link up");
            } else {
                tracing::warn!(sidecar = %self.inner.addr, "sidecar link down; remote requests fail with UNAVAILABLE until it is back");
            }
        }
    }

    fn learn_node_id(&self, id: &str) {
        fold_telemetry::otel::set_instance_id(id);
        if id.is_empty() || self.node_id().as_deref() == Some(id) {
            return;
        }
        if let Err(e) = self.inner.store.meta_set(NODE_ID_KEY, id) {
            tracing::error!(error = %e, "could not persist the node id");
        }
        *self
            .inner
            .node_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id.to_string());
    }

    async fn provide(&self, client: &mut MeshClient<MeshSvc>) {
        let schemas = self.inner.store.approved_schema_names();
        let mut req = tonic::Request::new(sc::ProvideRequest {
            schemas: schemas.clone(),
        });
        req.set_timeout(STATUS_TIMEOUT);
        match client.provide(req).await {
            Ok(_) => tracing::debug!(?schemas, "announced approved schemas"),
            Err(e) => tracing::warn!(error = %e, "could not announce schemas to the sidecar"),
        }
    }

    async fn monitor(self) {
        let mut backoff = Duration::from_millis(50);
        let mut logged_waiting = false;
        self.set_up(false).await;
        loop {
            let mut client = self.inner.client.clone();
            let mut req = tonic::Request::new(sc::MeshStatusRequest {});
            req.set_timeout(STATUS_TIMEOUT);
            let status = match client.status(req).await {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    if !logged_waiting {
                        tracing::info!(sidecar = %self.inner.addr, error = %e.message(), "waiting for the p2p-sidecar");
                        logged_waiting = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            logged_waiting = false;
            backoff = Duration::from_millis(50);
            self.learn_node_id(&status.node_id);
            let events = match client.peer_events(sc::PeerEventsRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    tracing::warn!(error = %e, "sidecar refused the peer event stream");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            self.provide(&mut client).await;
            // Disconnections missed while the link was down are not replayed: start afresh.
            self.disconnected().clear();
            self.set_up(true).await;
            let mut events = events;
            loop {
                tokio::select! {
                    msg = events.message() => match msg {
                        Ok(Some(ev)) => {
                            tracing::debug!(kind = ev.kind, peer = %ev.node_id, "peer event");
                            self.peer_event(&ev);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "peer event stream ended");
                            break;
                        }
                    },
                    _ = self.inner.schemas_changed.notified() => self.provide(&mut client).await,
                }
            }
            self.set_up(false).await;
        }
    }
}

impl Link for MeshLink {
    fn node_id(&self) -> Option<String> {
        MeshLink::node_id(self)
    }

    fn ready(&self) -> Result<(), NodeError> {
        self.client().map(|_| ())
    }

    fn forward_timeout(&self) -> Duration {
        self.inner.forward_timeout
    }

    fn routable(&self, node: &str) -> bool {
        MeshLink::routable(self, node)
    }

    fn forward(
        &self,
        target: String,
        op: operation::Kind,
        requester: Requester,
        deadline: Option<Duration>,
    ) -> LinkFuture<forward_response::Result> {
        let link = self.clone();
        Box::pin(async move { MeshLink::forward(&link, target, op, requester, deadline).await })
    }

    fn providers(&self, schema: &str, timeout: Duration) -> LinkFuture<Vec<String>> {
        let client = self.client();
        let schema = schema.to_string();
        Box::pin(async move {
            let mut req = tonic::Request::new(FindProvidersRequest {
                schema: schema.clone(),
            });
            req.set_timeout(timeout);
            match client?.find_providers(req).await {
                Ok(r) => Ok(r.into_inner().node_ids),
                Err(e) => Err(NodeError::new(
                    e.code(),
                    format!(
                        "looking up the providers of schema '{schema}' failed: {}",
                        e.message()
                    ),
                )),
            }
        })
    }

    fn check_schemas(
        &self,
        node: &str,
        names: Vec<String>,
        timeout: Duration,
    ) -> LinkFuture<CheckSchemasResponse> {
        let client = self.client();
        let node_id = node.to_string();
        Box::pin(async move {
            let mut req = tonic::Request::new(CheckSchemasRequest { node_id, names });
            req.set_timeout(timeout);
            Ok(client?.check_schemas(req).await?.into_inner())
        })
    }

    fn on_reconnect(&self, f: Box<dyn Fn(&str) + Send + Sync>) {
        let _ = self.inner.on_reconnect.set(f);
    }
}

/// The deadline a client set with `grpc-timeout`, if any.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }

    #[test]
    fn node_ids_are_checked_before_use() {
        assert!(valid_node_id(
            "12D3KooWGzBjzYtuhmFRXbBqsCP5Xv6TUgaWbeoGTHYEdRW6HNm3"
        ));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("B"));
        assert!(!valid_node_id(&"1".repeat(65)));
        assert!(!valid_node_id(
            "12D3KooWGzBjzYtuhmFRXbBqsCP5Xv6TUgaWbeoGTHYEdRW6HN0O"
        ));
    }
}
