//! The cloneable handle to the swarm's event loop: each method sends a [`Command`] over a
//! channel and awaits the answer on a oneshot (the rust-libp2p file-sharing pattern). Nothing but
//! the event loop ever touches the `Swarm`.

use fold_proto::sidecar::PeerEvent;
use fold_proto::v1::PeerInfo;
use fold_proto::wire::{CheckSchemasResponse, ForwardResponse, SignedEnvelope};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::command::{Command, MeshError};
use crate::status::NetworkSnapshot;

#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    events: broadcast::Sender<PeerEvent>,
    /// The per-peer forward streams: a request to a peer whose stream is open goes straight to
    /// it, without a hop through the event loop.
    streams: Option<std::sync::Arc<crate::forward::Outbound>>,
}

fn gone() -> MeshError {
    MeshError::Unavailable("the sidecar's swarm has stopped".into())
}

impl Client {
    pub fn new(
        tx: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        events: broadcast::Sender<PeerEvent>,
    ) -> Client {
        Client {
            tx,
            local_peer_id,
            events,
            streams: None,
        }
    }

    /// Send forwards to peers with an open stream directly on it.
    pub fn with_streams(mut self, streams: std::sync::Arc<crate::forward::Outbound>) -> Client {
        self.streams = Some(streams);
        self
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// A stream of peer events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// The swarm's state ([`NetworkSnapshot::into_response`] makes the `Mesh.Status` reply).
    pub async fn status(&self) -> Result<NetworkSnapshot, MeshError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    pub async fn list_peers(&self, include_disconnected: bool) -> Result<Vec<PeerInfo>, MeshError> {
        self.ask(|reply| Command::ListPeers {
            include_disconnected,
            reply,
        })
        .await
    }

    /// Dial an address and wait for the connection; returns the peer's id.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, MeshError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    pub async fn disconnect(&self, peer: PeerId) -> Result<bool, MeshError> {
        self.ask(|reply| Command::Disconnect { peer, reply }).await
    }

    /// Send a forward request to `peer` and wait for its answer.
    pub async fn forward(
        &self,
        peer: PeerId,
        request: SignedEnvelope,
    ) -> Result<ForwardResponse, MeshError> {
        // Fast path: the peer's stream is open, so its connection is up.
        let request = match &self.streams {
            Some(s) => match s.try_send(peer, request) {
                Ok(answer) => return answer.await.map_err(|_| gone())?,
                Err(request) => request,
            },
            None => request,
        };
        self.ask(|reply| Command::Forward {
            peer,
            request: Box::new(request),
            reply,
        })
        .await?
    }

    pub async fn check_schemas(
        &self,
        peer: PeerId,
        names: Vec<String>,
    ) -> Result<CheckSchemasResponse, MeshError> {
        self.ask(|reply| Command::CheckSchemas { peer, names, reply })
            .await?
    }

    /// Write the peer book file now (the event loop also writes it when it changes).
    pub async fn save_peers(&self) -> Result<bool, MeshError> {
        self.ask(|reply| Command::SavePeers { reply }).await
    }

    /// Replace the set of schemas announced as provider records; returns the new set.
    pub async fn provide(&self, schemas: Vec<String>) -> Result<Vec<String>, MeshError> {
        self.ask(|reply| Command::Provide { schemas, reply }).await
    }

    /// The providers of `schema` and how many DHT requests the lookup made.
    pub async fn find_providers(&self, schema: String) -> Result<(Vec<PeerId>, u32), MeshError> {
        self.ask(|reply| Command::FindProviders { schema, reply })
            .await?
    }
}
