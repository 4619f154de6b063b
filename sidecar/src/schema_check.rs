//! Schema checks between peers (`CheckSchemasRequest`/`CheckSchemasResponse` on the schema
//! request-response protocol): an inbound check, once the inbound gate admitted it, is answered
//! by the node on a task of its own ([`answer`]), never on the swarm task; an outbound check's
//! failure becomes a [`MeshError`] ([`outbound_error`]).

use std::sync::Arc;

use fold_proto::wire::{CheckSchemasResponse, WireError, check_schemas_response};
use libp2p::PeerId;
use libp2p::request_response::{OutboundFailure, ResponseChannel};
use tokio::sync::mpsc;
use tonic::Code;

use crate::command::{Command, MeshError};
use crate::gate::{InboundGate, Slot};
use crate::node_link::NodeHandler;

/// The answer refusing a check.
pub fn refusal(e: WireError) -> CheckSchemasResponse {
    CheckSchemasResponse {
        result: Some(check_schemas_response::Result::Error(e)),
    }
}

/// Ask the node which of `names` it serves `peer`, off the swarm task; its answer goes back to
/// the event loop as [`Command::RespondSchema`] on `tx`. The gate's `slot` is held until the
/// node answered.
pub fn answer(
    node: Arc<dyn NodeHandler>,
    gate: Arc<InboundGate>,
    tx: mpsc::Sender<Command>,
    peer: PeerId,
    names: Vec<String>,
    channel: ResponseChannel<CheckSchemasResponse>,
    slot: Slot,
) {
    tokio::spawn(async move {
        let answer = node.served_schemas(peer.to_string(), names).await;
        // The node's word on whether it denies the peer, for the gate.
        match &answer {
            Ok(_) => gate.set_denial(&peer, Some(false)),
            Err(s) if s.code() == Code::PermissionDenied => gate.set_denial(&peer, Some(true)),
            Err(_) => {}
        }
        drop(slot);
        let response = match answer {
            Ok(names) => CheckSchemasResponse {
                result: Some(check_schemas_response::Result::Approved(names)),
            },
            Err(s) => refusal(fold_proto::status::to_wire(&s)),
        };
        let _ = tx
            .send(Command::RespondSchema {
                channel,
                response: Box::new(response),
            })
            .await;
    });
}

/// An outbound request's failure, as the node is told it.
pub fn outbound_error(peer: &PeerId, e: &OutboundFailure) -> MeshError {
    match e {
        OutboundFailure::DialFailure => {
            MeshError::Unavailable(format!("cannot reach node {peer}: dial failed"))
        }
        OutboundFailure::Timeout => {
            MeshError::DeadlineExceeded(format!("node {peer} did not answer in time"))
        }
        OutboundFailure::ConnectionClosed => MeshError::Unavailable(format!(
            "the connection to node {peer} closed before it answered"
        )),
        OutboundFailure::UnsupportedProtocols => MeshError::Unavailable(format!(
            "peer {peer} does not speak the fold protocols (not a fold node?)"
        )),
        OutboundFailure::Io(e) => {
            MeshError::Unavailable(format!("talking to node {peer} failed: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_failures_map_to_codes() {
        let peer = PeerId::random();
        assert_eq!(
            outbound_error(&peer, &OutboundFailure::Timeout).code(),
            Code::DeadlineExceeded
        );
        assert_eq!(
            outbound_error(&peer, &OutboundFailure::DialFailure).code(),
            Code::Unavailable
        );
        assert_eq!(
            outbound_error(&peer, &OutboundFailure::UnsupportedProtocols).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn a_refusal_carries_the_error() {
        let e = WireError::default();
        assert!(matches!(
            refusal(e.clone()).result,
            Some(check_schemas_response::Result::Error(x)) if x == e
        ));
    }
}
