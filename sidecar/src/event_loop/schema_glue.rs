//! The swarm task's schema-check glue: inbound checks admitted by the one
//! [`crate::gate::InboundGate`] and answered off this task ([`crate::schema_check`]), and the
//! answers to this node's own checks.

use fold_proto::wire::{CheckSchemasRequest, CheckSchemasResponse};
use libp2p::PeerId;
use libp2p::request_response::{self, ResponseChannel};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::command::MeshError;
use crate::schema_check::{answer as answer_schema_check, outbound_error, refusal};

impl EventLoop {
    pub(super) fn on_schema_event(
        &mut self,
        ev: request_response::Event<CheckSchemasRequest, CheckSchemasResponse>,
    ) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.inbound_schema(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((_, reply)) = self.pending_schema.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.pending_schema.remove(&request_id) {
                    let _ = reply.send(Err(outbound_error(&peer, &error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound schema check failed");
                self.metrics.inbound("schema", "failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn inbound_schema(
        &mut self,
        peer: PeerId,
        request: CheckSchemasRequest,
        channel: ResponseChannel<CheckSchemasResponse>,
    ) {
        let slot = match self.gate.admit_schema(&peer) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .schema
                    .send_response(channel, refusal(e));
                return;
            }
        };
        let (node, gate, tx) = (self.node.clone(), self.gate.clone(), self.self_tx.clone());
        answer_schema_check(node, gate, tx, peer, request.names, channel, slot);
    }

    /// [`Command::RespondSchema`](crate::command::Command::RespondSchema): the node's answer
    /// to an inbound schema check.
    pub(super) fn respond_schema(
        &mut self,
        channel: ResponseChannel<CheckSchemasResponse>,
        response: CheckSchemasResponse,
    ) {
        if self
            .swarm
            .behaviour_mut()
            .schema
            .send_response(channel, response)
            .is_err()
        {
            tracing::debug!("peer went away before the schema answer was sent");
        }
    }
}

/// A schema check this node sent: the peer asked, and who asked.
pub(super) type PendingSchema = (
    PeerId,
    oneshot::Sender<Result<CheckSchemasResponse, MeshError>>,
);
