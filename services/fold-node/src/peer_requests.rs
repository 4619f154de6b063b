//! `fold.sidecar.v1.PeerRequests`: requests from other nodes, handed over by this node's sidecar
//! after it authenticated the sending peer and verified the envelope's signature. Served only on
//! the local link (a Unix socket under the data dir by default), never on the public port.
//!
//! Each request runs as [`Principal::Forwarded`]: the origin node the sidecar authenticated, and
//! the requester that node names. Permissions use the *path distance* — this node's trust in the
//! origin plus the requester's distance at the origin — never anything more. A request whose
//! deadline has passed does no work. Failures are answered as a typed `WireError` for the sender
//! to relay.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_middleware::metrics::code_name;
use fold_proto::sidecar::peer_requests_server::PeerRequests;
use fold_proto::sidecar::{InboundForward, ServedSchemasRequest, ServedSchemasResponse};
use fold_proto::status::to_wire;
use fold_proto::wire::{ForwardEnvelope, ForwardResponse, forward_response, operation};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::data::Data;
use crate::identity::{Forwarded, Principal};
use crate::mesh::{MAX_NODE_ID_BYTES, MeshLink};

/// Longest requester identity or proven key accepted (the sidecar enforces the same).
const MAX_REQUESTER_BYTES: usize = 128;
/// Most schema names one schema check may ask about.
const MAX_CHECKED_NAMES: usize = 1024;

#[derive(Clone)]
pub struct PeerRequestsApi {
    data: Data,
    mesh: MeshLink,
}

impl PeerRequestsApi {
    pub fn new(data: Data, mesh: MeshLink) -> Self {
        PeerRequestsApi { data, mesh }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Length limits of the envelope's strings (defence in depth: the sidecar checks them first).
fn check_bounds(env: &ForwardEnvelope) -> Result<(), Status> {
    for (name, v) in [
        ("request_id", &env.request_id),
        ("origin_node_id", &env.origin_node_id),
        ("target_node_id", &env.target_node_id),
    ] {
        if v.len() > MAX_NODE_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "'{name}' is longer than {MAX_NODE_ID_BYTES} bytes"
            )));
        }
    }
    if let Some(r) = &env.requester
        && (r.identity.len() > MAX_REQUESTER_BYTES || r.proven_key.len() > MAX_REQUESTER_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "the requester's identity and key are limited to {MAX_REQUESTER_BYTES} bytes"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl PeerRequests for PeerRequestsApi {
    async fn handle_forward(
        &self,
        request: Request<InboundForward>,
    ) -> Result<Response<ForwardResponse>, Status> {
        // The trace context arrives once, as gRPC metadata from the sidecar's span.
        let parent = fold_telemetry::otel::extract_metadata(request.metadata());
        let inbound = request.into_inner();
        if inbound.origin_node_id.is_empty() || inbound.origin_node_id.len() > MAX_NODE_ID_BYTES {
            return Err(Status::invalid_argument(
                "'origin_node_id' is required (a node id of at most 64 bytes)",
            ));
        }
        let env = ForwardEnvelope::decode(inbound.envelope.as_slice()).map_err(|e| {
            Status::invalid_argument(format!("'envelope' is not a ForwardEnvelope: {e}"))
        })?;
        check_bounds(&env)?;
        if env.origin_node_id != inbound.origin_node_id {
            return Err(Status::invalid_argument(format!(
                "the envelope's origin {} is not the authenticated peer {}",
                env.origin_node_id, inbound.origin_node_id
            )));
        }
        let who = Principal::Forwarded(Forwarded {
            node: inbound.origin_node_id.clone(),
            node_key: inbound.origin_public_key,
            requester: env.requester.clone(),
        });
        let op = env.operation.and_then(|o| o.kind);
        let (op_name, schema) = match &op {
            Some(operation::Kind::Query(q)) => ("query", q.schema.clone()),
            Some(operation::Kind::Mutate(m)) => ("mutate", m.schema.clone()),
            Some(operation::Kind::BatchMutate(b)) => ("batch_mutate", b.schema.clone()),
            None => ("none", String::new()),
        };
        let span = tracing::info_span!(
            "fold.peer_request",
            otel.kind = "server",
            op = op_name,
            schema = %schema,
            peer = %inbound.origin_node_id,
            requester = %who.writer_label(),
            request_id = %env.request_id,
            outcome = tracing::field::Empty,
        );
        fold_telemetry::otel::set_parent(&span, parent);
        let deadline = match env.deadline_unix_ms {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        };
        let result = async {
            let work = self.execute(&who, &env.target_node_id, op, deadline);
            // The origin's deadline travelled in the signed envelope: past it, the work is
            // refused, and when it passes during the work, the work is cancelled.
            match deadline {
                None => work.await,
                Some(d) => {
                    let left = d
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    if left.is_zero() {
                        return forward_response::Result::Error(to_wire(
                            &Status::deadline_exceeded(format!(
                                "the request arrived {} ms after its deadline; nothing was done",
                                unix_ms(SystemTime::now()).saturating_sub(env.deadline_unix_ms)
                            )),
                        ));
                    }
                    match tokio::time::timeout(left, work).await {
                        Ok(r) => r,
                        Err(_) => {
                            forward_response::Result::Error(to_wire(&Status::deadline_exceeded(
                                "the request's deadline passed while this node worked on it",
                            )))
                        }
                    }
                }
            }
        }
        .instrument(span.clone())
        .await;
        span.record(
            "outcome",
            match &result {
                forward_response::Result::Error(e) => code_name(tonic::Code::from_i32(e.code)),
                _ => "OK",
            },
        );
        if let forward_response::Result::Error(e) = &result {
            tracing::info!(peer = %inbound.origin_node_id, request_id = %env.request_id, code = e.code, error = %e.message, "inbound request refused");
        } else {
            tracing::debug!(peer = %inbound.origin_node_id, request_id = %env.request_id, "inbound request served");
        }
        Ok(Response::new(ForwardResponse {
            request_id: env.request_id,
            result: Some(result),
        }))
    }

    async fn served_schemas(
        &self,
        request: Request<ServedSchemasRequest>,
    ) -> Result<Response<ServedSchemasResponse>, Status> {
        let req = request.into_inner();
        // A peer this node denies learns nothing, not even which schemas are approved here.
        let (distance, _) = self
            .data
            .identities()
            .peer_distance(&req.origin_node_id)
            .map_err(crate::data::store_status)?;
        if distance.is_none() {
            return Err(Status::permission_denied(format!(
                "node {} is not trusted by this node; schema checks are refused",
                req.origin_node_id
            )));
        }
        if req.names.len() > MAX_CHECKED_NAMES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_CHECKED_NAMES} schema names per check"
            )));
        }
        Ok(Response::new(ServedSchemasResponse {
            names: self.data.served(&req.names),
        }))
    }
}

impl PeerRequestsApi {
    async fn execute(
        &self,
        who: &Principal,
        target: &str,
        op: Option<operation::Kind>,
        deadline: Option<SystemTime>,
    ) -> forward_response::Result {
        let me = self.mesh.node_id_or_empty();
        if !target.is_empty() && !me.is_empty() && target != me {
            return forward_response::Result::Error(to_wire(&Status::not_found(format!(
                "request is for node {target}, this is node {me}"
            ))));
        }
        let result = match op {
            Some(operation::Kind::Query(q)) => self.data.query(who, q).await.map(|mut r| {
                r.node_id = me.clone();
                forward_response::Result::Query(r)
            }),
            Some(operation::Kind::Mutate(m)) => {
                self.data.mutate(who, m, deadline).await.map(|mut r| {
                    r.node_id = me.clone();
                    forward_response::Result::Mutate(r)
                })
            }
            Some(operation::Kind::BatchMutate(b)) => {
                self.data.batch_mutate(who, b).await.map(|mut r| {
                    r.node_id = me.clone();
                    forward_response::Result::BatchMutate(r)
                })
            }
            None => Err(Status::invalid_argument(
                "forwarded request carries no query or mutation",
            )),
        };
        result.unwrap_or_else(|s| forward_response::Result::Error(to_wire(&s)))
    }
}
