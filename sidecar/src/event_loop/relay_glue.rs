//! The swarm task's reachability glue: AutoNAT verdicts, relay reservations planned by
//! [`crate::reach`], this node's relay service counters, hole punching, the relayed → direct
//! hand-over ([`crate::upgrade`]) and closing AutoNAT dial-back connections.

use std::time::Instant;

use libp2p::core::transport::ListenerId;
use libp2p::{Multiaddr, PeerId, autonat, dcutr, relay};

use super::EventLoop;
use crate::command::Command;
use crate::reach::{RelayAction, Source};
use crate::upgrade::UPGRADE_GRACE;

impl EventLoop {
    /// Open or close relay reservations (listeners on `<relay>/p2p-circuit`) as the AutoNAT
    /// verdict and the known relays call for.
    pub(super) fn plan_relays(&mut self) {
        let not_reachable = self.autonat.verdict() == fold_proto::v1::Reachability::NotReachable;
        let now = Instant::now();
        for action in self.relays.plan(not_reachable, now) {
            match action {
                RelayAction::Listen(addr) => {
                    tracing::info!(%addr, "asking the relay for a reservation");
                    let r = self
                        .swarm
                        .listen_on(addr.clone())
                        .map_err(|e| e.to_string());
                    self.relays.listening(&addr, r, now);
                }
                RelayAction::StopListening(id) => {
                    self.swarm.remove_listener(id);
                }
            }
        }
        self.relay_routes_changed();
    }

    /// Hand the routes through the relays reserved on to the connect behaviour.
    pub(super) fn relay_routes_changed(&mut self) {
        let routes = self.relays.circuit_routes();
        self.swarm.behaviour_mut().connect.set_relay_routes(routes);
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
        self.relays.candidate(peer, addr, source);
        self.plan_relays();
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
                self.relays.reserved(&relay_peer_id);
                self.relay_routes_changed();
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
        let before = self.autonat.verdict();
        match &result {
            Ok(()) => {
                tracing::info!(addr = %tested_addr, %server, "AutoNAT: reachable on this address")
            }
            Err(e) => {
                tracing::info!(addr = %tested_addr, %server, error = %e, "AutoNAT: not reachable on this address")
            }
        }
        self.autonat.tested(tested_addr, result.is_ok());
        if self.autonat.verdict() != before {
            tracing::info!(reachability = ?self.autonat.verdict(), "AutoNAT verdict changed");
            self.plan_relays();
        }
    }

    /// This node dialled a peer back for its AutoNAT test.
    pub(super) fn on_autonat_server(&mut self, ev: autonat::v2::server::Event) {
        tracing::debug!(client = %ev.client, addr = %ev.tested_addr, ok = ev.result.is_ok(), "AutoNAT dial-back for a peer");
        // The dial-back connection has done its job: close it rather than keep it until
        // the idle timeout (it counts against the per-peer connection limit).
        for id in self.conns.dial_backs(&ev.client) {
            self.swarm.close_connection(id);
        }
    }

    pub(super) fn on_new_listen_addr(&mut self, listener_id: ListenerId, address: Multiaddr) {
        tracing::info!(%address, "listening");
        self.relays.new_listen_addr(listener_id, &address);
        if !self.listen_addrs.contains(&address) {
            self.listen_addrs.push(address);
        }
    }

    pub(super) fn on_listener_closed(
        &mut self,
        listener_id: ListenerId,
        addresses: &[Multiaddr],
        error: Option<std::io::Error>,
    ) {
        for a in addresses {
            self.listen_addrs.retain(|l| l != a);
        }
        let error = error.map(|e| e.to_string());
        if self
            .relays
            .listener_closed(listener_id, error.clone(), Instant::now())
        {
            self.relay_routes_changed();
        } else if let Some(e) = error {
            tracing::warn!(error = %e, "a listener closed");
        }
    }

    /// An event of this node's relay service: its reservation and circuit counters.
    pub(super) fn on_relay_server(&mut self, ev: relay::Event) {
        tracing::debug!(?ev, "relay service");
        let max = usize::try_from(self.relay_server.max_reservations).unwrap_or(usize::MAX);
        self.relay_counts.on_event(&ev, max);
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
