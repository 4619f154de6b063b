//! `fold.sidecar.v1.PeerRequests`: requests from other nodes, handed over by this node's sidecar
//! after it authenticated the sending peer. Served only on the local link (a Unix socket under
//! the data dir by default), never on the public port.
//!
//! Each request runs as [`Principal::Peer`] with the PeerId the sidecar authenticated, so its
//! trust distance comes from this node's trust table — never from anything the sender claims.
//! Failures are answered as a typed `WireError` for the sender to relay.

use fold_middleware::metrics::code_name;
use fold_proto::sidecar::peer_requests_server::PeerRequests;
use fold_proto::sidecar::{InboundForward, ServedSchemasRequest, ServedSchemasResponse};
use fold_proto::wire::{ForwardResponse, WireError, forward_request, forward_response};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::data::Data;
use crate::identity::Principal;
use crate::mesh::MeshLink;

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

fn wire_error(s: Status) -> forward_response::Result {
    forward_response::Result::Error(WireError {
        code: s.code() as i32,
        message: s.message().to_string(),
    })
}

#[tonic::async_trait]
impl PeerRequests for PeerRequestsApi {
    async fn handle_forward(
        &self,
        request: Request<InboundForward>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let inbound = request.into_inner();
        if inbound.origin_node_id.is_empty() {
            return Err(Status::invalid_argument("'origin_node_id' is required"));
        }
        let Some(req) = inbound.request else {
            return Err(Status::invalid_argument("'request' is required"));
        };
        let who = if inbound.origin_public_key.is_empty() {
            Principal::Peer(inbound.origin_node_id.clone())
        } else {
            Principal::PeerWithKey(
                inbound.origin_node_id.clone(),
                inbound.origin_public_key.clone(),
            )
        };
        let me = self.mesh.node_id_or_empty();
        let (op, schema) = match &req.operation {
            Some(forward_request::Operation::Query(q)) => ("query", q.schema.clone()),
            Some(forward_request::Operation::Mutate(m)) => ("mutate", m.schema.clone()),
            None => ("none", String::new()),
        };
        let span = tracing::info_span!(
            "fold.peer_request",
            otel.kind = "server",
            op,
            schema = %schema,
            peer = %inbound.origin_node_id,
            request_id = %req.request_id,
            outcome = tracing::field::Empty,
        );
        fold_telemetry::otel::set_parent(
            &span,
            fold_telemetry::otel::extract_map(&req.trace_context),
        );
        let result = async {
            self.execute(&who, &me, req.target_node_id.clone(), req.operation.clone())
                .await
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
            tracing::info!(peer = %inbound.origin_node_id, request_id = %req.request_id, code = e.code, error = %e.message, "inbound request refused");
        } else {
            tracing::debug!(peer = %inbound.origin_node_id, request_id = %req.request_id, "inbound request served");
        }
        Ok(Response::new(ForwardResponse {
            request_id: req.request_id,
            result: Some(result),
        }))
    }

    async fn served_schemas(
        &self,
        request: Request<ServedSchemasRequest>,
    ) -> Result<Response<ServedSchemasResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(ServedSchemasResponse {
            names: self.data.served(&req.names),
        }))
    }
}

impl PeerRequestsApi {
    async fn execute(
        &self,
        who: &Principal,
        me: &str,
        target: String,
        operation: Option<forward_request::Operation>,
    ) -> forward_response::Result {
        let me = me.to_string();
        let req_target_node_id = target;
        if !req_target_node_id.is_empty() && !me.is_empty() && req_target_node_id != me {
            wire_error(Status::not_found(format!(
                "request is for node {}, this is node {me}",
                req_target_node_id
            )))
        } else {
            match operation {
                Some(forward_request::Operation::Query(q)) => match self.data.query(who, q).await {
                    Ok(mut r) => {
                        r.node_id = me.clone();
                        forward_response::Result::Query(r)
                    }
                    Err(s) => wire_error(s),
                },
                Some(forward_request::Operation::Mutate(m)) => {
                    match self.data.mutate(who, m).await {
                        Ok(mut r) => {
                            r.node_id = me.clone();
                            forward_response::Result::Mutate(r)
                        }
                        Err(s) => wire_error(s),
                    }
                }
                None => wire_error(Status::invalid_argument(
                    "forwarded request carries no query or mutation",
                )),
            }
        }
    }
}
