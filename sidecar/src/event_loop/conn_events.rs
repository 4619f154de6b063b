//! The swarm task's connection glue: connections opened and closed (the table in
//! [`crate::conns`], each peer's connection kind in the peer book, the relayed → direct hand-over,
//! peer events), and pings that keep a connection alive or close it.

use std::time::Instant;

use fold_proto::sidecar::peer_event::Kind;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::{PeerId, ping};

use super::EventLoop;
use crate::conns::{AfterPing, Conn, Ping};
use crate::peer_book::strip_p2p;

impl EventLoop {
    pub(super) fn on_connection_established(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) {
        let dialed = endpoint.is_dialer();
        let remote = endpoint.get_remote_address().clone();
        let relayed = self.record_connection(peer_id, connection_id, endpoint);
        if !relayed {
            self.close_relayed(peer_id);
        }
        if let Some(reply) = self.pending_dial.remove(&connection_id) {
            let _ = reply.send(Ok(peer_id));
        }
        if dialed {
            // A dialed address is a listen address of the peer: good for the DHT.
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer_id, strip_p2p(remote.clone()));
        }
        if num_established == 1 {
            self.metrics.connected_peers(self.peers().connected_count());
            tracing::info!(peer = %peer_id, addr = %remote, "connected");
            self.emit(Kind::Connected, peer_id, vec![remote.to_string()]);
        }
        if !self.kad_bootstrapped {
            self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
        }
    }

    /// Add a new connection to the table (the peer book behaviour has put it in the book);
    /// returns whether it is relayed.
    pub(super) fn record_connection(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) -> bool {
        let dialed = endpoint.is_dialer();
        let remote = endpoint.get_remote_address().clone();
        let (connection, transport) = crate::peer_book::endpoint_kind(endpoint);
        let relayed = connection == "relayed";
        self.conns.insert(
            connection_id,
            Conn {
                loopback: crate::peer_book::is_loopback_remote(&remote),
                ..Conn::new(peer_id, relayed, dialed, transport)
            },
        );
        if !relayed {
            tracing::debug!(peer = %peer_id, %transport, "direct connection");
        }
        self.update_connection_kind(peer_id);
        relayed
    }

    pub(super) fn on_connection_closed(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        num_established: u32,
        cause: Option<String>,
    ) {
        let closed = self.conns.remove(&connection_id);
        let was_relayed = closed.as_ref().is_some_and(|c| c.relayed);
        self.update_connection_kind(peer_id);
        if was_relayed && num_established > 0 {
            // The forward stream may have run on the relayed connection: the next
            // request opens one on the connection that is left.
            self.forward.disconnected(&peer_id);
        }
        for o in self
            .upgrading
            .closed(&peer_id, connection_id, num_established)
        {
            self.send_or_connect(peer_id, o);
        }
        if num_established == 0 {
            let why = match (&closed, cause) {
                (Some(c), _) if c.closing => {
                    format!("no ping answered for {} s", c.alive.elapsed().as_secs())
                }
                (_, Some(e)) => e,
                (_, None) => "closed".to_string(),
            };
            self.on_peer_disconnected(peer_id, &why);
        }
    }

    /// The last connection to `peer_id` closed.
    pub(super) fn on_peer_disconnected(&mut self, peer_id: PeerId, why: &str) {
        self.forward.disconnected(&peer_id);
        self.metrics.connected_peers(self.peers().connected_count());
        self.swarm
            .behaviour_mut()
            .book
            .bootstrap_mut()
            .lost(&peer_id, why);
        tracing::info!(peer = %peer_id, reason = %why, "disconnected");
        self.emit(Kind::Disconnected, peer_id, vec![]);
    }

    /// The peer book's per-peer connection kind: direct when any direct connection is open.
    pub(super) fn update_connection_kind(&mut self, peer: PeerId) {
        if let Some((connection, transport)) = self.conns.kind(&peer)
            && let Some(e) = self.peers_mut().get_mut(&peer)
        {
            e.connection = connection;
            e.transport = transport;
        }
    }

    /// A ping's outcome on one connection: an answer keeps it alive (and is the peer's RTT);
    /// failures in a row close it ([`PingPolicy`]).
    pub(super) fn on_ping(&mut self, ev: ping::Event) {
        let ping::Event {
            peer,
            connection,
            result,
        } = ev;
        let ping = match result {
            Ok(rtt) => Ping::Answered(rtt),
            Err(ping::Failure::Unsupported) => Ping::Unsupported,
            Err(e) => Ping::Failed(e.to_string()),
        };
        match self.conns.on_ping(connection, &peer, ping) {
            AfterPing::Nothing => {}
            AfterPing::Rtt(rtt) => {
                if let Some(e) = self.peers_mut().get_mut(&peer) {
                    e.rtt = Some(rtt);
                }
            }
            AfterPing::Close => self.close_dead(connection, "pings failed"),
        }
    }

    /// Close the connections that answered no ping for [`PingPolicy::silence_limit`].
    pub(super) fn close_silent_connections(&mut self, now: Instant) {
        for id in self.conns.silent(now) {
            self.close_dead(id, "no ping answered");
        }
    }

    /// Close a connection its peer stopped answering on: the swarm's close event then shows the
    /// peer disconnected (and redials it, if known).
    pub(super) fn close_dead(&mut self, id: ConnectionId, why: &'static str) {
        let Some((peer, silent)) = self.conns.closing(id) else {
            return;
        };
        tracing::warn!(%peer, silent_secs = silent.as_secs(), reason = why, "closing a connection that does not answer pings");
        self.metrics.dead_connection();
        self.swarm.close_connection(id);
    }
}
