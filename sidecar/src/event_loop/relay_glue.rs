//! The swarm task's reachability glue: AutoNAT outcomes, relay candidates and accepted
//! reservations, this node's relay service events and finished dial-backs, fed to the reach
//! behaviour ([`crate::reach_keeper`]), whose relay routes go to the connect behaviour; hole
//! punching, and the relayed → direct hand-over ([`crate::upgrade`]).

use libp2p::{Multiaddr, PeerId, autonat, dcutr, relay};

use super::EventLoop;
use crate::command::Command;
use crate::reach::Source;
use crate::reach_keeper::ReachEvent;
use crate::upgrade::UPGRADE_GRACE;

impl EventLoop {
    /// What the reach behaviour tells: the routes through the relays reserved on, for the
    /// connect behaviour.
    pub(super) fn on_reach_event(&mut self, ev: ReachEvent) {
        match ev {
            ReachEvent::RelayRoutes(routes) => {
                self.swarm.behaviour_mut().connect.set_relay_routes(routes);
            }
        }
    }

    /// A peer advertised the relay hop protocol: a relay this node may reserve on.
    pub(super) fn relay_candidate(&mut self, peer: PeerId, listen_addrs: &[Multiaddr]) {
        // A direct address the peer book holds for it, else the first it reported.
        let addr = self
            .peers()
            .get(&peer)
            .and_then(|e| {
                e.addrs
                    .iter()
                    .find(|a| !crate::reach::is_circuit(a))
                    .cloned()
            })
            .or_else(|| {
                listen_addrs
                    .iter()
                    .find(|a| !crate::reach::is_circuit(a))
                    .cloned()
            });
        let Some(addr) = addr else {
            return;
        };
        let source = if self.swarm.behaviour().book.bootstrap().is_bootstrap(&peer) {
            Source::Bootstrap
        } else {
            Source::Identify
        };
        self.swarm
            .behaviour_mut()
            .reach
            .candidate(peer, addr, source);
    }

    /// A direct connection to `peer` is up: its relayed connections (hole punching succeeded,
    /// or the peer dialled directly) are closed, so traffic leaves the relay.
    pub(super) fn close_relayed(&mut self, peer: PeerId) {
        let relayed = self.conns.relayed(&peer);
        if relayed.is_empty() {
            return;
        }
        tracing::info!(%peer, "direct connection up; closing the relayed one");
        // The stream on the relayed connection is retired: it answers what is in flight, and
        // requests made meanwhile wait for the relayed connection to close, then go direct.
        self.forward.disconnected(&peer);
        if self.upgrading.start(peer, relayed) {
            let tx = self.self_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(UPGRADE_GRACE).await;
                let _ = tx.send(Command::UpgradeDue { peer }).await;
            });
        }
    }

    pub(super) fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                self.swarm.behaviour_mut().reach.reserved(&relay_peer_id);
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                tracing::debug!(relay = %relay_peer_id, "outbound circuit established");
            }
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                tracing::debug!(peer = %src_peer_id, "inbound circuit established");
            }
        }
    }

    /// An AutoNAT test of one of this node's addresses: a changed verdict replans the relay
    /// reservations.
    pub(super) fn on_autonat(&mut self, ev: autonat::v2::client::Event) {
        let autonat::v2::client::Event {
            tested_addr,
            server,
            result,
            ..
        } = ev;
        match &result {
            Ok(()) => {
                tracing::info!(addr = %tested_addr, %server, "AutoNAT: reachable on this address")
            }
            Err(e) => {
                tracing::info!(addr = %tested_addr, %server, error = %e, "AutoNAT: not reachable on this address")
            }
        }
        self.swarm
            .behaviour_mut()
            .reach
            .tested(tested_addr, result.is_ok());
    }

    /// This node dialled a peer back for its AutoNAT test.
    pub(super) fn on_autonat_server(&mut self, ev: autonat::v2::server::Event) {
        tracing::debug!(client = %ev.client, addr = %ev.tested_addr, ok = ev.result.is_ok(), "AutoNAT dial-back for a peer");
        self.swarm.behaviour_mut().reach.dial_back_done(&ev.client);
    }

    pub(super) fn on_new_listen_addr(&mut self, address: Multiaddr) {
        tracing::info!(%address, "listening");
        if !self.listen_addrs.contains(&address) {
            self.listen_addrs.push(address);
        }
    }

    /// A listener closed (a relay's is followed by the reach behaviour).
    pub(super) fn on_listener_closed(&mut self, addresses: &[Multiaddr]) {
        for a in addresses {
            self.listen_addrs.retain(|l| l != a);
        }
    }

    /// An event of this node's relay service: its reservation and circuit counters.
    pub(super) fn on_relay_server(&mut self, ev: relay::Event) {
        tracing::debug!(?ev, "relay service");
        self.swarm.behaviour_mut().reach.server_event(&ev);
    }

    /// [`Command::UpgradeDue`]: the grace for a peer's relayed connections is over; close them.
    pub(super) fn upgrade_due(&mut self, peer: PeerId) {
        for id in self.upgrading.due(&peer) {
            self.swarm.close_connection(id);
        }
    }
}

/// Hole punching's outcome (logged; the direct connection it opens is handled as any other).
pub(super) fn on_dcutr(ev: dcutr::Event) {
    let dcutr::Event {
        remote_peer_id,
        result,
    } = ev;
    match result {
        Ok(_) => {
            tracing::info!(peer = %remote_peer_id, "hole punching succeeded: direct connection")
        }
        Err(e) => {
            tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
        }
    }
}
