//! What the rest of the sidecar asks of the swarm's event loop ([`Command`], sent by
//! [`crate::client::Client`]) and the mesh-level error type its answers carry ([`MeshError`],
//! reported to the node as a gRPC status).

use fold_proto::v1::PeerInfo;
use fold_proto::wire::{
    CheckSchemasRequest, CheckSchemasResponse, ForwardResponse, SignedEnvelope,
};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;
use tonic::Code;

/// A mesh-level failure, reported to the node as a gRPC status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
}

impl MeshError {
    pub fn code(&self) -> Code {
        match self {
            MeshError::NotFound(_) => Code::NotFound,
            MeshError::Unavailable(_) => Code::Unavailable,
            MeshError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            MeshError::InvalidArgument(_) => Code::InvalidArgument,
            MeshError::ResourceExhausted(_) => Code::ResourceExhausted,
        }
    }
}

impl From<MeshError> for tonic::Status {
    fn from(e: MeshError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

pub enum Command {
    Status {
        reply: oneshot::Sender<crate::status::NetworkSnapshot>,
    },
    ListPeers {
        include_disconnected: bool,
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, MeshError>>,
    },
    Disconnect {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Forward {
        peer: PeerId,
        request: Box<SignedEnvelope>,
        reply: oneshot::Sender<Result<ForwardResponse, MeshError>>,
    },
    CheckSchemas {
        peer: PeerId,
        names: Vec<String>,
        reply: oneshot::Sender<Result<CheckSchemasResponse, MeshError>>,
    },
    Provide {
        schemas: Vec<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
    FindProviders {
        schema: String,
        /// The providers found (possibly none) and the DHT requests the lookup made, or why
        /// the lookup failed.
        reply: oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
    },
    /// Write the peer book file now (at shutdown); answers whether it was written.
    SavePeers { reply: oneshot::Sender<bool> },
    /// A peer's relayed connections, replaced by a direct one, are due to close (their grace
    /// for requests in flight is over).
    UpgradeDue { peer: PeerId },
    /// The node's answer to an inbound schema check.
    RespondSchema {
        channel: ResponseChannel<CheckSchemasResponse>,
        response: Box<CheckSchemasResponse>,
    },
}

/// A request waiting for a connection to its peer.
pub enum Outbound {
    Forward(
        Box<SignedEnvelope>,
        oneshot::Sender<Result<ForwardResponse, MeshError>>,
    ),
    Schema(
        CheckSchemasRequest,
        oneshot::Sender<Result<CheckSchemasResponse, MeshError>>,
    ),
}

impl Outbound {
    pub fn fail(self, e: MeshError) {
        match self {
            Outbound::Forward(_, r) => {
                let _ = r.send(Err(e));
            }
            Outbound::Schema(_, r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}
