//! `fold.sidecar.v1.Mesh`: what the sidecar offers its node. Every call goes through the
//! [`Client`] to the swarm's event loop. Mesh-level failures (unknown node, unreachable, timeout)
//! are the call's gRPC status; failures the remote node reported travel back inside the response.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_proto::sidecar::mesh_server::Mesh;
use fold_proto::sidecar::{
    ForwardRequest, ForwardStreamRequest, ForwardStreamResponse, MeshStatusRequest, PeerEvent,
    PeerEventsRequest, ProvideRequest, ProvideResponse, forward_stream_response,
};
use fold_proto::v1::{
    CheckSchemasRequest, CheckSchemasResponse, DialRequest, DialResponse, DisconnectRequest,
    DisconnectResponse, FindProvidersRequest, FindProvidersResponse, ListPeersRequest,
    ListPeersResponse, NetworkStatusResponse,
};
use fold_proto::wire::{self, check_schemas_response};
use futures::Stream;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::client::Client;

/// Default of --max-stream-forwards.
pub const DEFAULT_MAX_STREAM_FORWARDS: usize = 4096;

pub struct MeshApi {
    client: Client,
    default_timeout: Duration,
    forwarder: Forwarder,
    max_stream_forwards: usize,
    /// The link's message limit (--max-forward-bytes): a ForwardStream answer over it fails
    /// alone with RESOURCE_EXHAUSTED.
    max_message_bytes: usize,
    /// The sidecar's admin HTTP address, once bound (Status reports it).
    admin_addr: Arc<std::sync::OnceLock<String>>,
}

/// One forward: seal the envelope and send it through the swarm (shared by the unary call and
/// the stream).
#[derive(Clone)]
struct Forwarder {
    client: Client,
    default_timeout: Duration,
    key: Arc<Keypair>,
    metrics: Option<Arc<crate::metrics::SidecarMetrics>>,
}

impl MeshApi {
    pub fn new(client: Client, default_timeout: Duration, key: Arc<Keypair>) -> Self {
        MeshApi {
            forwarder: Forwarder {
                client: client.clone(),
                default_timeout,
                key,
                metrics: None,
            },
            client,
            default_timeout,
            max_stream_forwards: DEFAULT_MAX_STREAM_FORWARDS,
            max_message_bytes: 4 * 1024 * 1024,
            admin_addr: Arc::default(),
        }
    }

    /// The link's message limit (what the gRPC server encodes at most).
    pub fn with_max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Report this admin address (set once the admin port is bound) in Status.
    pub fn with_admin_addr(mut self, addr: Arc<std::sync::OnceLock<String>>) -> Self {
        self.admin_addr = addr;
        self
    }

    /// Count each forward (outcome, latency) in these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::SidecarMetrics>) -> Self {
        self.forwarder.metrics = Some(metrics);
        self
    }

    /// At most this many forwards in flight per ForwardStream (further ones are refused).
    pub fn with_max_stream_forwards(mut self, n: usize) -> Self {
        self.max_stream_forwards = n.max(1);
        self
    }
}

impl Forwarder {
    async fn forward(
        &self,
        req: ForwardRequest,
        deadline: Option<Duration>,
        parent: opentelemetry::Context,
    ) -> Result<wire::ForwardResponse, Status> {
        let started = std::time::Instant::now();
        let r = self.forward_inner(req, deadline, parent).await;
        if let Some(m) = &self.metrics {
            let outcome = match &r {
                Ok(_) => "OK",
                Err(s) => fold_middleware::metrics::code_name(s.code()),
            };
            m.outbound(outcome, started.elapsed().as_secs_f64());
        }
        r
    }

    async fn forward_inner(
        &self,
        req: ForwardRequest,
        deadline: Option<Duration>,
        parent: opentelemetry::Context,
    ) -> Result<wire::ForwardResponse, Status> {
        let peer = parse_peer(&req.target_node_id)?;
        if peer == self.client.local_peer_id() {
            return Err(Status::invalid_argument(
                "the target is this node itself; the node runs such requests locally",
            ));
        }
        if req
            .operation
            .as_ref()
            .and_then(|o| o.kind.as_ref())
            .is_none()
        {
            return Err(Status::invalid_argument(
                "no operation (query, mutation or peers request) to forward",
            ));
        }
        // Answer before the node's own deadline fires: keep a small margin for the way back.
        let timeout = deadline.map_or(self.default_timeout, |d| {
            d.saturating_sub((d / 20).min(Duration::from_millis(50)))
                .min(self.default_timeout)
        });
        let span = tracing::info_span!(
            "sidecar.forward",
            otel.kind = "client",
            target_node = %req.target_node_id,
        );
        fold_telemetry::otel::set_parent(&span, parent);
        let client = self.client.clone();
        let key = self.key.clone();
        async move {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            let envelope = wire::ForwardEnvelope {
                request_id: uuid::Uuid::new_v4().to_string(),
                // Both ids from the identity cache: no base58 formatting per request.
                origin_node_id: crate::signing::id_of(&client.local_peer_id()).to_string(),
                target_node_id: crate::signing::id_of(&peer).to_string(),
                timestamp_unix_ms: now,
                deadline_unix_ms: now
                    .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                requester: req.requester,
                operation: req.operation,
            };
            let sealed =
                crate::signing::seal(&key, &envelope, fold_telemetry::otel::inject_current())
                    .map_err(Status::internal)?;
            match tokio::time::timeout(timeout, client.forward(peer, sealed)).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(e)) => Err(Status::from(e)),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "node {peer} did not answer within {} ms",
                    timeout.as_millis()
                ))),
            }
        }
        .instrument(span)
        .await
    }
}

fn parse_peer(s: &str) -> Result<PeerId, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument("'node_id' is required"));
    }
    s.parse::<PeerId>().map_err(|e| {
        Status::invalid_argument(format!("'{s}' is not a node id (libp2p PeerId): {e}"))
    })
}

#[tonic::async_trait]
impl Mesh for MeshApi {
    async fn status(
        &self,
        _request: Request<MeshStatusRequest>,
    ) -> Result<Response<NetworkStatusResponse>, Status> {
        let mut status = self.client.status().await?.into_response();
        status.sidecar_admin_addr = self.admin_addr.get().cloned().unwrap_or_default();
        Ok(Response::new(status))
    }

    async fn list_peers(
        &self,
        request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let peers = self
            .client
            .list_peers(request.into_inner().include_disconnected)
            .await?;
        Ok(Response::new(ListPeersResponse { peers }))
    }

    async fn dial(&self, request: Request<DialRequest>) -> Result<Response<DialResponse>, Status> {
        let address = request.into_inner().address;
        let addr: Multiaddr = address.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "'{address}' is not a multiaddr (e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo...): {e}"
            ))
        })?;
        let peer = tokio::time::timeout(self.default_timeout, self.client.dial(addr))
            .await
            .map_err(|_| Status::deadline_exceeded(format!("dialing {address} timed out")))??;
        Ok(Response::new(DialResponse {
            node_id: peer.to_string(),
            address,
        }))
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        let peer = parse_peer(&request.into_inner().node_id)?;
        let was_connected = self.client.disconnect(peer).await?;
        Ok(Response::new(DisconnectResponse { was_connected }))
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<wire::ForwardResponse>, Status> {
        // Trace context and deadline arrive once, as gRPC metadata.
        let parent = fold_telemetry::otel::extract_metadata(request.metadata());
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(fold_middleware::deadline::parse_grpc_timeout);
        self.forwarder
            .forward(request.into_inner(), deadline, parent)
            .await
            .map(Response::new)
    }

    type ForwardStreamStream =
        Pin<Box<dyn Stream<Item = Result<ForwardStreamResponse, Status>> + Send>>;

    async fn forward_stream(
        &self,
        request: Request<tonic::Streaming<ForwardStreamRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let forwarder = self.forwarder.clone();
        let answers = local_link::mux::serve_stream(
            request.into_inner(),
            self.max_stream_forwards,
            self.max_message_bytes,
            |r: &ForwardStreamRequest| r.id,
            |id, s| ForwardStreamResponse {
                id,
                result: Some(forward_stream_response::Result::Error(
                    fold_proto::status::to_wire(&s),
                )),
            },
            move |msg: ForwardStreamRequest| {
                let forwarder = forwarder.clone();
                async move {
                    let parent = fold_telemetry::otel::extract_map(&msg.trace_context);
                    let deadline =
                        (msg.timeout_ms > 0).then(|| Duration::from_millis(msg.timeout_ms.into()));
                    let result = match msg.request {
                        Some(req) => forwarder.forward(req, deadline, parent).await,
                        None => Err(Status::invalid_argument(
                            "a stream request without 'request'",
                        )),
                    };
                    ForwardStreamResponse {
                        id: msg.id,
                        result: Some(match result {
                            Ok(r) => forward_stream_response::Result::Response(r),
                            Err(s) => forward_stream_response::Result::Error(
                                fold_proto::status::to_wire(&s),
                            ),
                        }),
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(answers)))
    }

    async fn check_schemas(
        &self,
        request: Request<CheckSchemasRequest>,
    ) -> Result<Response<CheckSchemasResponse>, Status> {
        let req = request.into_inner();
        let peer = parse_peer(&req.node_id)?;
        let resp = tokio::time::timeout(
            self.default_timeout,
            self.client.check_schemas(peer, req.names),
        )
        .await
        .map_err(|_| Status::deadline_exceeded(format!("node {peer} did not answer in time")))??;
        match resp.result {
            Some(check_schemas_response::Result::Approved(names)) => {
                Ok(Response::new(CheckSchemasResponse {
                    node_id: peer.to_string(),
                    approved: names.names,
                    definition_hashes: names.definition_hashes,
                }))
            }
            Some(check_schemas_response::Result::Error(e)) => {
                Err(fold_proto::status::from_wire(&peer.to_string(), e))
            }
            None => Err(Status::internal(format!(
                "node {peer} sent an empty answer"
            ))),
        }
    }

    async fn provide(
        &self,
        request: Request<ProvideRequest>,
    ) -> Result<Response<ProvideResponse>, Status> {
        let schemas = self.client.provide(request.into_inner().schemas).await?;
        Ok(Response::new(ProvideResponse { schemas }))
    }

    async fn find_providers(
        &self,
        request: Request<FindProvidersRequest>,
    ) -> Result<Response<FindProvidersResponse>, Status> {
        let schema = request.into_inner().schema;
        if schema.is_empty() {
            return Err(Status::invalid_argument("'schema' is required"));
        }
        let found = tokio::time::timeout(
            self.default_timeout + Duration::from_secs(2),
            self.client.find_providers(schema),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("provider lookup timed out"))??;
        let (found, peers_asked) = found;
        Ok(Response::new(FindProvidersResponse {
            node_ids: found.into_iter().map(|p| p.to_string()).collect(),
            peers_asked,
        }))
    }

    type PeerEventsStream = Pin<Box<dyn Stream<Item = Result<PeerEvent, Status>> + Send>>;

    async fn peer_events(
        &self,
        _request: Request<PeerEventsRequest>,
    ) -> Result<Response<Self::PeerEventsStream>, Status> {
        // A subscriber that falls behind skips what it missed rather than stalling the loop.
        let stream = BroadcastStream::new(self.client.subscribe()).filter_map(|r| r.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}
