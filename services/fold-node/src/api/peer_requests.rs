//! `fold.sidecar.v1.PeerRequests`: requests from other nodes, handed over by this node's sidecar
//! after it authenticated the sending peer and verified the envelope's signature. Served only on
//! the local link (a Unix socket under the data dir by default), never on the public port.
//!
//! Each request runs as [`Principal::Forwarded`]: the origin node the sidecar authenticated, and
//! the requester that node names. Permissions use the *path distance* — this node's trust in the
//! origin plus the requester's distance at the origin — never anything more. A request whose
//! deadline has passed does no work. Failures are answered as a typed `WireError` for the sender
//! to relay.
//!
//! Besides queries and mutations, a peer may ask for this node's connected peers (the `peers`
//! operation, read-only, for any origin not denied), or have it relay that question to one of its
//! connected peers (`via`): how `Network.Topology` reaches nodes further away.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_middleware::metrics::code_name;
use fold_proto::sidecar::peer_requests_server::PeerRequests;
use fold_proto::sidecar::{
    InboundForward, InboundStreamRequest, InboundStreamResponse, ServedSchemasRequest,
    ServedSchemasResponse, inbound_stream_response,
};
use fold_proto::status::to_wire;
use fold_proto::v1::{ListPeersRequest, ListPeersResponse};
use fold_proto::wire::{ForwardEnvelope, ForwardResponse, forward_response, operation};
use fold_proto::wire::{PeersRequest, Requester};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::access::identity::{Forwarded, Principal};
use crate::error::NodeError;
use crate::link::mesh::{MAX_NODE_ID_BYTES, MeshLink, valid_node_id};
use crate::metrics::NodeMetrics;
use crate::ops::data::Data;
use crate::ops::execute::Executor;
use std::sync::Arc;

/// Most schema names one schema check may ask about.
const MAX_CHECKED_NAMES: usize = 1024;
/// Most relays one peers request may ask for (`via`): a topology reaches 4 hops.
const MAX_RELAY_HOPS: usize = 3;
/// Inbound forwards in flight at once on one sidecar stream (beyond: RESOURCE_EXHAUSTED; the
/// sidecar's own --inbound-queue is far smaller).
const MAX_STREAM_IN_FLIGHT: usize = 4096;
/// Most peers one peers request is answered with.
const MAX_PEERS_SHOWN: usize = 512;

#[derive(Clone)]
pub struct PeerRequestsApi {
    data: Data,
    mesh: MeshLink,
    /// Runs the operations of other nodes here.
    exec: Executor,
    /// Fault injection (--fault-percent): this share of requests from peers is refused with
    /// UNAVAILABLE before any work, for resilience drills.
    faults: Option<(f64, Arc<NodeMetrics>)>,
    metrics: Option<Arc<NodeMetrics>>,
    /// The link's message limit (--max-message-bytes): a stream answer over it fails alone with
    /// RESOURCE_EXHAUSTED instead of resetting the stream.
    max_message_bytes: usize,
}

impl PeerRequestsApi {
    pub fn new(data: Data, mesh: MeshLink) -> Self {
        PeerRequestsApi {
            exec: Executor::new(data.clone(), Arc::new(mesh.clone())),
            data,
            mesh,
            faults: None,
            metrics: None,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }

    /// The link's message limit (what the gRPC server encodes at most).
    pub fn with_max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Count each request from a peer (operation, outcome, time) in these metrics.
    pub fn with_metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Refuse `percent` % of requests from peers with UNAVAILABLE (0 = none).
    pub fn with_faults(mut self, percent: f64, metrics: Arc<NodeMetrics>) -> Self {
        if percent > 0.0 {
            tracing::warn!(
                percent,
                "fault injection is on: this share of requests from other nodes is refused with UNAVAILABLE (--fault-percent)"
            );
            self.faults = Some((percent, metrics));
        }
        self
    }

    fn inject_fault(&self) -> Option<NodeError> {
        let (percent, metrics) = self.faults.as_ref()?;
        if fastrand::f64() * 100.0 >= *percent {
            return None;
        }
        metrics.injected_fault();
        Some(NodeError::unavailable(
            "injected fault: this node refuses a share of requests from peers (--fault-percent)",
        ))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Length limits of the envelope's strings (defence in depth: the sidecar checks them first).
fn check_bounds(env: &ForwardEnvelope) -> Result<(), NodeError> {
    fold_proto::limits::check_envelope(
        &env.request_id,
        &env.origin_node_id,
        &env.target_node_id,
        env.requester.as_ref(),
    )
    .map_err(NodeError::invalid_argument)
}

#[tonic::async_trait]
impl PeerRequests for PeerRequestsApi {
    async fn handle_forward(
        &self,
        request: Request<InboundForward>,
    ) -> Result<Response<ForwardResponse>, Status> {
        // The trace context arrives once, as gRPC metadata from the sidecar's span.
        let parent = fold_telemetry::otel::extract_metadata(request.metadata());
        self.serve(request.into_inner(), parent)
            .await
            .map(Response::new)
    }

    type HandleForwardStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<InboundStreamResponse, Status>> + Send>,
    >;

    async fn handle_forward_stream(
        &self,
        request: Request<tonic::Streaming<InboundStreamRequest>>,
    ) -> Result<Response<Self::HandleForwardStreamStream>, Status> {
        let api = self.clone();
        let answers = local_link::mux::serve_stream(
            request.into_inner(),
            MAX_STREAM_IN_FLIGHT,
            self.max_message_bytes,
            |r: &InboundStreamRequest| r.id,
            |id, s| InboundStreamResponse {
                id,
                result: Some(inbound_stream_response::Result::Error(to_wire(&s))),
            },
            move |msg: InboundStreamRequest| {
                let api = api.clone();
                async move {
                    let parent = fold_telemetry::otel::extract_map(&msg.trace_context);
                    let result = match msg.forward {
                        Some(f) => {
                            let work = api.serve(f, parent);
                            match msg.timeout_ms {
                                0 => work.await,
                                ms => tokio::time::timeout(Duration::from_millis(ms.into()), work)
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(NodeError::deadline_exceeded(
                                            "the request's deadline passed while this node worked on it",
                                        ).into())
                                    }),
                            }
                        }
                        None => Err(NodeError::invalid_argument(
                            "a stream request without 'forward'",
                        )
                        .into()),
                    };
                    InboundStreamResponse {
                        id: msg.id,
                        result: Some(match result {
                            Ok(r) => inbound_stream_response::Result::Response(r),
                            Err(s) => inbound_stream_response::Result::Error(to_wire(&s)),
                        }),
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(answers)))
    }

    async fn served_schemas(
        &self,
        request: Request<ServedSchemasRequest>,
    ) -> Result<Response<ServedSchemasResponse>, Status> {
        self.served_schemas_impl(request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }
}

impl PeerRequestsApi {
    /// One inbound forward (unary or on the stream): decode the envelope once, resolve the
    /// requester by path distance, run the operation within the origin's deadline.
    async fn serve(
        &self,
        inbound: InboundForward,
        parent: opentelemetry::Context,
    ) -> Result<ForwardResponse, Status> {
        let (env, who) = admit(inbound)?;
        let op = env.operation.clone().and_then(|o| o.kind);
        let (op_name, schema) = op_label(op.as_ref());
        let span = tracing::info_span!(
            "fold.peer_request",
            otel.kind = "server",
            op = op_name,
            schema = %schema,
            peer = %env.origin_node_id,
            requester = %who.writer_label(),
            request_id = %env.request_id,
            outcome = tracing::field::Empty,
        );
        fold_telemetry::otel::set_parent(&span, parent);
        let started = std::time::Instant::now();
        let result = match self
            .within_deadline(&who, &env, op)
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => forward_response::Result::Error(to_wire(&Status::from(e))),
        };
        let outcome = match &result {
            forward_response::Result::Error(e) => code_name(tonic::Code::from_i32(e.code)),
            _ => "OK",
        };
        span.record("outcome", outcome);
        if let Some(m) = &self.metrics {
            m.peer_request(op_name, outcome, started);
        }
        if let forward_response::Result::Error(e) = &result {
            tracing::info!(peer = %env.origin_node_id, request_id = %env.request_id, code = e.code, error = %e.message, "inbound request refused");
        } else {
            tracing::debug!(peer = %env.origin_node_id, request_id = %env.request_id, "inbound request served");
        }
        Ok(ForwardResponse {
            request_id: env.request_id,
            result: Some(result),
        })
    }

    /// Run `op` of `env` for `who`. The origin's deadline travelled in the signed envelope:
    /// past it, the work is refused, and when it passes during the work, the work is cancelled.
    async fn within_deadline(
        &self,
        who: &Principal,
        env: &ForwardEnvelope,
        op: Option<operation::Kind>,
    ) -> Result<forward_response::Result, NodeError> {
        let deadline = match env.deadline_unix_ms {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        };
        let work = self.run(who, &env.target_node_id, op, deadline);
        let Some(d) = deadline else {
            return work.await;
        };
        let left = d
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return Err(NodeError::deadline_exceeded(format!(
                "the request arrived {} ms after its deadline; nothing was done",
                unix_ms(SystemTime::now()).saturating_sub(env.deadline_unix_ms)
            )));
        }
        tokio::time::timeout(left, work).await.unwrap_or_else(|_| {
            Err(NodeError::deadline_exceeded(
                "the request's deadline passed while this node worked on it",
            ))
        })
    }

    /// Which of the asked schemas this node serves, for a peer's schema check.
    fn served_schemas_impl(
        &self,
        req: ServedSchemasRequest,
    ) -> Result<ServedSchemasResponse, NodeError> {
        // A peer this node denies learns nothing, not even which schemas are approved here.
        let (distance, _) = self
            .data
            .identities()
            .peer_distance(&req.origin_node_id)
            .map_err(NodeError::from)?;
        if distance.is_none() {
            return Err(NodeError::permission_denied(format!(
                "node {} is not trusted by this node; schema checks are refused",
                req.origin_node_id
            )));
        }
        if req.names.len() > MAX_CHECKED_NAMES {
            return Err(NodeError::invalid_argument(format!(
                "at most {MAX_CHECKED_NAMES} schema names per check"
            )));
        }
        req.names
            .iter()
            .try_for_each(|n| crate::access::bounds::schema_name(n))?;
        let served = self.data.served(&req.names);
        Ok(ServedSchemasResponse {
            names: served.iter().map(|s| s.name.clone()).collect(),
            definition_hashes: served
                .iter()
                .map(|s| (s.name.clone(), s.definition_hash.clone()))
                .collect(),
        })
    }
}

/// An inbound forward admitted: its envelope decoded and checked (bounds, origin), and who
/// sent it (the origin node, for its requester).
fn admit(inbound: InboundForward) -> Result<(ForwardEnvelope, Principal), NodeError> {
    if inbound.origin_node_id.is_empty() || inbound.origin_node_id.len() > MAX_NODE_ID_BYTES {
        return Err(NodeError::invalid_argument(
            "'origin_node_id' is required (a node id of at most 64 bytes)",
        ));
    }
    let env = ForwardEnvelope::decode(inbound.envelope.as_slice()).map_err(|e| {
        NodeError::invalid_argument(format!("'envelope' is not a ForwardEnvelope: {e}"))
    })?;
    check_bounds(&env)?;
    if env.origin_node_id != inbound.origin_node_id {
        return Err(NodeError::invalid_argument(format!(
            "the envelope's origin {} is not the authenticated peer {}",
            env.origin_node_id, inbound.origin_node_id
        )));
    }
    let who = Principal::Forwarded(Forwarded {
        node: inbound.origin_node_id,
        node_key: inbound.origin_public_key,
        requester: env.requester.clone(),
    });
    Ok((env, who))
}

/// The operation's name (for metrics and the span) and its schema.
fn op_label(op: Option<&operation::Kind>) -> (&'static str, String) {
    match op {
        Some(operation::Kind::Query(q)) => ("query", q.schema.clone()),
        Some(operation::Kind::Mutate(m)) => ("mutate", m.schema.clone()),
        Some(operation::Kind::Peers(_)) => ("peers", String::new()),
        Some(operation::Kind::BatchMutate(b)) => ("batch_mutate", b.schema.clone()),
        Some(operation::Kind::History(h)) => ("history", h.schema.clone()),
        Some(operation::Kind::Changes(c)) => ("changes", c.schema.clone()),
        Some(operation::Kind::Raft(r)) => ("raft", r.group.clone()),
        None => ("none", String::new()),
    }
}

/// The strings of a forwarded operation, checked before anything uses them (bounds.rs).
fn op_bounds(op: Option<&operation::Kind>) -> Result<(), NodeError> {
    use crate::access::bounds::Bounded;
    match op {
        Some(operation::Kind::Query(q)) => q.check_bounds(),
        Some(operation::Kind::History(h)) => h.check_bounds(),
        Some(operation::Kind::Mutate(m)) => m.check_bounds(),
        Some(operation::Kind::BatchMutate(b)) => b.check_bounds(),
        Some(operation::Kind::Changes(c)) => c.check_bounds(),
        Some(operation::Kind::Raft(m)) if m.group.len() > 128 => Err(NodeError::invalid_argument(
            "'raft.group' is at most 128 bytes",
        )),
        Some(operation::Kind::Peers(_) | operation::Kind::Raft(_)) | None => Ok(()),
    }
}

fn not_routable() -> NodeError {
    NodeError::invalid_argument(
        "a forwarded request runs on the node it was sent to: its route must be ROUTE_DEFAULT",
    )
}

impl PeerRequestsApi {
    async fn run(
        &self,
        who: &Principal,
        target: &str,
        op: Option<operation::Kind>,
        deadline: Option<SystemTime>,
    ) -> Result<forward_response::Result, NodeError> {
        let me = self.mesh.node_id_or_empty();
        if !target.is_empty() && !me.is_empty() && target != me {
            return Err(NodeError::not_found(format!(
                "request is for node {target}, this is node {me}"
            )));
        }
        if let Some(fault) = self.inject_fault() {
            return Err(fault);
        }
        op_bounds(op.as_ref())?;
        match op {
            // A forwarded read runs here: routing ("any", "all") is the origin's to do, once.
            Some(operation::Kind::Query(q)) if q.route != 0 => Err(not_routable()),
            Some(operation::Kind::History(h)) if h.route != 0 => Err(not_routable()),
            Some(operation::Kind::Peers(p)) => self.peers(who, p, deadline).await,
            Some(operation::Kind::Raft(m)) => self.raft(who, m).await,
            Some(op) => self.exec.local_or_leader(who, op, deadline).await,
            None => Err(NodeError::invalid_argument(
                "forwarded request carries no operation (query, history, mutation, batch, peers or changes request)",
            )),
        }
    }
    /// Raft traffic of a schema group from another node: only from a node this node does not
    /// deny (the group itself accepts it only from its members).
    async fn raft(
        &self,
        who: &Principal,
        msg: fold_proto::wire::RaftMessage,
    ) -> Result<forward_response::Result, NodeError> {
        let Principal::Forwarded(f) = who else {
            return Err(NodeError::invalid_argument(
                "raft messages come from other nodes only",
            ));
        };
        let (distance, _) = self
            .data
            .identities()
            .peer_distance(&f.node)
            .map_err(NodeError::from)?;
        if distance.is_none() {
            return Err(NodeError::permission_denied(format!(
                "node {} is denied by this node: its raft messages are refused",
                f.node
            )));
        }
        let me = self.mesh.node_id_or_empty();
        if me.is_empty() {
            return Err(NodeError::unavailable(
                "this node does not know its own node id yet",
            ));
        }
        let answer = self
            .data
            .groups()
            .handle_raft(&me, &f.node, distance.unwrap_or(u32::MAX), msg)
            .await?;
        Ok(forward_response::Result::Raft(answer))
    }

    /// A peers request: this node's connected peers, from its own sidecar — a read-only view of
    /// the mesh for any origin this node does not deny (a denied one learns nothing); each peer
    /// carries this node's trust in it, as `Network.ListPeers` shows it to this node's clients.
    /// With `via`, the request is relayed to `via[0]` (a connected peer of this node), for the
    /// same requester at its path distance here.
    async fn peers(
        &self,
        who: &Principal,
        req: PeersRequest,
        deadline: Option<SystemTime>,
    ) -> Result<forward_response::Result, NodeError> {
        let r = self
            .data
            .identities()
            .resolve(who)
            .map_err(NodeError::from)?;
        let Some(distance) = r.distance else {
            return Err(NodeError::permission_denied(format!(
                "{} is not trusted by this node; its peers are not shown",
                r.label
            )));
        };
        check_via(&req.via)?;
        let mut peers = self
            .mesh
            .client()?
            .list_peers(ListPeersRequest {
                include_disconnected: false,
            })
            .await?
            .into_inner()
            .peers;
        let Some((next, rest)) = req.via.split_first() else {
            peers.truncate(MAX_PEERS_SHOWN);
            for p in &mut peers {
                let (d, _) = self
                    .data
                    .identities()
                    .peer_distance(&p.node_id)
                    .map_err(NodeError::from)?;
                p.trust_distance = d
                    .map(|d| i32::try_from(d).unwrap_or(i32::MAX))
                    .unwrap_or(-1);
            }
            return Ok(forward_response::Result::Peers(ListPeersResponse { peers }));
        };
        // Relayed only to a node this one is connected to: a peer cannot make it dial anyone.
        if !peers.iter().any(|p| p.connected && &p.node_id == next) {
            return Err(NodeError::not_found(format!(
                "node {next} is not connected to this node; peers requests are relayed only to connected peers"
            )));
        }
        let requester = relayed_requester(who, &r.label, distance);
        let left = deadline.map(|d| {
            d.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        self.mesh
            .forward(
                next.clone(),
                operation::Kind::Peers(PeersRequest { via: rest.to_vec() }),
                requester,
                left,
            )
            .await
            .and_then(|r| crate::link::expect::<ListPeersResponse>(next, r))
            .map(forward_response::Result::Peers)
    }
}

/// The relay path of a peers request: at most MAX_RELAY_HOPS node ids.
fn check_via(via: &[String]) -> Result<(), NodeError> {
    if via.len() > MAX_RELAY_HOPS {
        return Err(NodeError::invalid_argument(format!(
            "a peers request is relayed at most {MAX_RELAY_HOPS} times; 'via' names {}",
            via.len()
        )));
    }
    if let Some(bad) = via.iter().find(|v| !valid_node_id(v)) {
        return Err(NodeError::invalid_argument(format!(
            "'via' holds '{}', which is not a node id",
            bad.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// The requester of a relayed peers request: `who` at its path distance here, with the key it
/// proved to the origin.
fn relayed_requester(who: &Principal, label: &str, distance: u32) -> Requester {
    let proven_key = match who {
        Principal::Forwarded(f) => f
            .requester
            .as_ref()
            .map(|q| q.proven_key.clone())
            .unwrap_or_default(),
        _ => String::new(),
    };
    Requester {
        distance,
        identity: truncate_bytes(label, fold_proto::limits::MAX_REQUESTER_BYTES),
        proven_key,
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_bytes(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
