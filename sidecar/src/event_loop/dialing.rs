//! The swarm task's connect glue: [`Command::Dial`](crate::command::Command::Dial), and requests
//! (forwards, schema checks) sent at once or held in the connect behaviour ([`crate::connector`])
//! until their peer connects; what it emits (send, fail, look up in the DHT) is carried out here.

use libp2p::swarm::ConnectionId;
use libp2p::swarm::DialError;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::command::{MeshError, Outbound};
use crate::connector::ConnectEvent;
use crate::peer_book::{peer_of, strip_p2p};
use crate::upgrade::Hold;

impl EventLoop {
    /// [`Command::Dial`]: answered once the connection is up (or at once when one this node
    /// dialled is up already).
    pub(super) fn dial(
        &mut self,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, MeshError>>,
    ) {
        if let Some(peer) = peer_of(&addr) {
            if peer == self.local() {
                let _ = reply.send(Err(MeshError::InvalidArgument(
                    "that address is this node's own".into(),
                )));
                return;
            }
            self.entry(peer, "dial").add_addr(addr.clone());
            // Connected already on a connection this node dialled: nothing to do. (A peer that
            // only dialled us gets an outbound connection too: AutoNAT asks peers for
            // dial-backs over outbound connections only.)
            if self.conns.dialled_direct(&peer)
                || (self.swarm.is_connected(&peer) && crate::reach::is_circuit(&addr))
            {
                let _ = reply.send(Ok(peer));
                return;
            }
        }
        let opts = match peer_of(&addr) {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![strip_p2p(addr.clone())])
                .condition(PeerCondition::Always)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dial.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(MeshError::Unavailable(format!(
                    "cannot dial {addr}: {e}"
                ))));
            }
        }
    }

    pub(super) fn send_now(&mut self, peer: PeerId, o: Outbound) {
        match o {
            Outbound::Forward(req, reply) => self.forward.send(peer, *req, reply),
            Outbound::Schema(req, reply) => {
                let id = self.swarm.behaviour_mut().schema.send_request(&peer, req);
                self.pending_schema.insert(id, (peer, reply));
            }
        }
    }

    /// Send on the existing connection, or hold the request in the connect behaviour
    /// ([`crate::connector`]) until the peer connects: known addresses, then the DHT, then relays.
    pub(super) fn send_or_connect(&mut self, peer: PeerId, o: Outbound) {
        if peer == self.local() {
            o.fail(MeshError::InvalidArgument(
                "that is this node's own id; run the request locally".into(),
            ));
            return;
        }
        let o = match self.upgrading.hold(peer, o) {
            Hold::NotUpgrading(o) => o,
            Hold::Held => return,
            Hold::Full(o, e) => return o.fail(e),
        };
        if self.swarm.is_connected(&peer) {
            self.send_now(peer, o);
            return;
        }
        let known = self.known_addrs(&peer);
        self.swarm.behaviour_mut().connect.hold(peer, o, known);
    }

    pub(super) fn known_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers()
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// What the connect behaviour asks: send or fail held requests, or look a peer up.
    pub(super) fn on_connect_event(&mut self, ev: ConnectEvent<Outbound>) {
        match ev {
            ConnectEvent::Ready(peer, list) => {
                for o in list {
                    self.send_now(peer, o);
                }
            }
            ConnectEvent::Failed(_, list, e) => {
                for o in list {
                    o.fail(e.clone());
                }
            }
            ConnectEvent::NeedDht(peer) => {
                let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.swarm.behaviour_mut().connect.looking_up(q, peer);
            }
        }
    }

    /// Dial `peer` on `addrs` unless it is connected or being dialled already.
    pub(super) fn dial_if_disconnected(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<(), DialError> {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        self.swarm.dial(opts)
    }

    pub(super) fn on_outgoing_error(
        &mut self,
        connection_id: ConnectionId,
        peer_id: Option<PeerId>,
        error: &DialError,
    ) {
        tracing::debug!(?peer_id, error = %error, "outgoing connection failed");
        if let Some(reply) = self.pending_dial.remove(&connection_id) {
            let _ = reply.send(Err(MeshError::Unavailable(format!("dial failed: {error}"))));
        }
    }
}
