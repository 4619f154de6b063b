//! The reach behaviour: a `NetworkBehaviour` that owns what AutoNAT found and the relay
//! reservations ([`crate::reach`]). On its own 1 s timer (and when the verdict or the relays
//! change) it plans the reservations and opens or closes their `<relay>/p2p-circuit` listeners
//! (`ToSwarm::ListenOn`, `ToSwarm::RemoveListener`), follows those listeners through
//! `on_swarm_event`, tells the event loop the routes through the relays it holds
//! ([`ReachEvent::RelayRoutes`], for the connect behaviour), counts this node's relay service, and
//! closes the connections it dialled back for a peer's AutoNAT test once that test is done
//! (`ToSwarm::CloseConnection`). AutoNAT, relay and identify events are fed to it by the event
//! loop. Tested below with real swarms on the memory transport.

use std::collections::HashMap;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fold_proto::v1::Reachability;
use libp2p::PeerId;
use libp2p::core::transport::{ListenerId, PortUse};
use libp2p::core::{ConnectedPoint, Multiaddr};
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::{
    CloseConnection, ConnectionClosed, ConnectionId, FromSwarm, ListenOpts, ListenerClosed,
    ListenerError, NetworkBehaviour, NewListenAddr, THandlerInEvent, ToSwarm,
};

use crate::policy_kit::{Actions, Every, no_protocol};
use crate::reach::{AutoNat, RelayAction, RelayServer, Relays, Source};

/// How often the reservations are planned again (failed ones retry on their backoff).
const PLAN_EVERY: Duration = Duration::from_secs(1);

/// What the event loop does for the reach behaviour.
#[derive(Debug)]
pub enum ReachEvent {
    /// The routes through the relays this node holds a reservation on changed.
    RelayRoutes(Vec<Multiaddr>),
}

/// The reach behaviour (see the module doc).
pub struct ReachKeeper {
    autonat: AutoNat,
    relays: Relays,
    server: RelayServer,
    /// --relay-max-reservations (the service's own counter stays within it).
    max_reservations: usize,
    /// Open connections this node dialled on a new port (AutoNAT dial-backs), by connection
    /// (bounded by the swarm's connection limits).
    dial_backs: HashMap<ConnectionId, PeerId>,
    /// The relay routes last reported.
    routes: Vec<Multiaddr>,
    /// The relays changed since the routes were last compared.
    dirty: bool,
    /// The listener asked for in the last poll: an error reported for it before the next poll
    /// is the listen failing to start.
    opening: Option<ListenerId>,
    actions: Actions<ReachEvent>,
    /// The reservations are planned again on this timer.
    every: Every,
}

impl ReachKeeper {
    /// `relays` are the configured ones (crate::reach::Relays::new); `max_reservations` the relay
    /// service's limit.
    pub fn new(relays: Relays, max_reservations: usize) -> ReachKeeper {
        ReachKeeper {
            autonat: AutoNat::default(),
            relays,
            server: RelayServer::default(),
            max_reservations,
            dial_backs: HashMap::new(),
            routes: Vec::new(),
            dirty: false,
            opening: None,
            actions: Actions::default(),
            every: Every::new(PLAN_EVERY),
        }
    }

    pub fn autonat(&self) -> &AutoNat {
        &self.autonat
    }

    pub fn relays(&self) -> &Relays {
        &self.relays
    }

    pub fn server(&self) -> &RelayServer {
        &self.server
    }

    /// An AutoNAT test of `addr` finished; a changed verdict replans the reservations.
    pub fn tested(&mut self, addr: Multiaddr, reachable: bool) {
        let before = self.autonat.verdict();
        self.autonat.tested(addr, reachable);
        if self.autonat.verdict() != before {
            tracing::info!(reachability = ?self.autonat.verdict(), "AutoNAT verdict changed");
            self.plan(Instant::now());
        }
    }

    /// A peer advertised the relay hop protocol, reachable on `addr`.
    pub fn candidate(&mut self, peer: PeerId, addr: Multiaddr, source: Source) {
        self.relays.candidate(peer, addr, source);
        self.plan(Instant::now());
    }

    /// The relay accepted this node's reservation.
    pub fn reserved(&mut self, relay: &PeerId) {
        self.relays.reserved(relay);
        self.dirty = true;
        self.actions.wake();
    }

    /// An event of this node's relay service.
    pub fn server_event(&mut self, ev: &libp2p::relay::Event) {
        self.server.on_event(ev, self.max_reservations);
    }

    /// This node dialled `client` back for its AutoNAT test: that connection has done its job
    /// (it would count against the per-peer limit until the idle timeout).
    pub fn dial_back_done(&mut self, client: &PeerId) {
        let ids: Vec<ConnectionId> = self
            .dial_backs
            .iter()
            .filter(|(_, p)| *p == client)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.actions.push(ToSwarm::CloseConnection {
                peer_id: *client,
                connection: CloseConnection::One(id),
            });
        }
    }

    /// Open or close relay reservations as the verdict and the known relays call for.
    fn plan(&mut self, now: Instant) {
        let not_reachable = self.autonat.verdict() == Reachability::NotReachable;
        for action in self.relays.plan(not_reachable, now) {
            match action {
                RelayAction::Listen(addr) => {
                    tracing::info!(%addr, "asking the relay for a reservation");
                    let opts = ListenOpts::new(addr.clone());
                    self.relays.listening(&addr, Ok(opts.listener_id()), now);
                    self.actions.push(ToSwarm::ListenOn { opts });
                }
                RelayAction::StopListening(id) => {
                    self.actions.push(ToSwarm::RemoveListener { id });
                }
            }
        }
        self.dirty = true;
        self.actions.wake();
    }

    fn on_established(&mut self, c: ConnectionEstablished) {
        if let ConnectedPoint::Dialer {
            port_use: PortUse::New,
            ..
        } = c.endpoint
        {
            self.dial_backs.insert(c.connection_id, c.peer_id);
        }
    }

    fn on_closed(&mut self, c: ConnectionClosed) {
        self.dial_backs.remove(&c.connection_id);
        if c.remaining_established == 0 {
            self.server.disconnected(&c.peer_id);
        }
    }

    fn on_listener_closed(&mut self, id: ListenerId, error: Option<String>) {
        if self
            .relays
            .listener_closed(id, error.clone(), Instant::now())
        {
            self.dirty = true;
        } else if let Some(e) = error {
            tracing::warn!(error = %e, "a listener closed");
        }
    }
}

impl NetworkBehaviour for ReachKeeper {
    type ToSwarm = ReachEvent;

    no_protocol!();

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => self.on_established(c),
            FromSwarm::ConnectionClosed(c) => self.on_closed(c),
            FromSwarm::NewListenAddr(NewListenAddr { listener_id, addr }) => {
                self.relays.new_listen_addr(listener_id, addr);
            }
            FromSwarm::ListenerClosed(ListenerClosed {
                listener_id,
                reason,
            }) => self.on_listener_closed(listener_id, reason.err().map(|e| e.to_string())),
            // A listen that could not start (a running listener's errors are not fatal).
            FromSwarm::ListenerError(ListenerError { listener_id, err })
                if self.opening == Some(listener_id) =>
            {
                self.on_listener_closed(listener_id, Some(err.to_string()));
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.opening = None;
        // Asked until it says no, so the timer wakes this behaviour for its next tick.
        while self.every.ticked(cx) {
            self.plan(Instant::now());
        }
        if let Some(action) = self.actions.pop() {
            if let ToSwarm::ListenOn { opts } = &action {
                self.opening = Some(opts.listener_id());
            }
            return Poll::Ready(action);
        }
        if std::mem::take(&mut self.dirty) {
            let routes = self.relays.circuit_routes();
            if routes != self.routes {
                self.routes = routes.clone();
                return Poll::Ready(ToSwarm::GenerateEvent(ReachEvent::RelayRoutes(routes)));
            }
        }
        self.actions.pending(cx)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use fold_proto::v1::relay_reservation::State;
    use libp2p::swarm::dial_opts::DialOpts;
    use libp2p::swarm::{SwarmEvent, dummy};

    use super::*;
    use crate::connector::tests::{listen, memory_swarm, until, until_state};

    fn keeper(args: &[&str]) -> ReachKeeper {
        let mut v = vec!["p2p-sidecar", "--mdns", "off"];
        v.extend_from_slice(args);
        let config = crate::config::Cli::parse_from(v).config;
        ReachKeeper::new(Relays::new(&config).expect("relays"), 16)
    }

    fn relay_state(k: &ReachKeeper) -> Option<(i32, String)> {
        k.relays()
            .status()
            .first()
            .map(|r| (r.state, r.last_error.clone()))
    }

    #[tokio::test]
    async fn only_the_dial_back_connection_is_closed_when_the_test_is_done() {
        let mut a = memory_swarm(keeper(&[]));
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        let opts = |new_port: bool| {
            let o = DialOpts::peer_id(peer_b)
                .addresses(vec![addr.clone()])
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always);
            if new_port {
                o.allocate_new_port().build()
            } else {
                o.build()
            }
        };
        let dial_back = opts(true);
        let dial_back_id = dial_back.connection_id();
        a.dial(opts(false)).expect("dial");
        a.dial(dial_back).expect("dial back");
        let mut up = 0;
        until(&mut a, &mut b, |e, _| {
            up += usize::from(matches!(e, SwarmEvent::ConnectionEstablished { .. }));
            (up == 2).then_some(())
        })
        .await;
        a.behaviour_mut().dial_back_done(&peer_b);
        let closed = until(&mut a, &mut b, |e, _| match e {
            SwarmEvent::ConnectionClosed { connection_id, .. } => Some(*connection_id),
            _ => None,
        })
        .await;
        assert_eq!(closed, dial_back_id);
        assert!(a.is_connected(&peer_b), "the other connection stays");
    }

    #[tokio::test]
    async fn a_configured_relay_is_reserved_on_and_a_failed_listen_is_reported() {
        // Not a memory address: the listener on its circuit cannot start here.
        let relay = format!("/ip4/10.0.0.1/tcp/4001/p2p/{}", PeerId::random());
        let mut a = memory_swarm(keeper(&["--relay", &relay]));
        let mut b = memory_swarm(dummy::Behaviour);
        // The memory transport has no relay (nor TCP): the reservation's listener cannot start.
        let (state, error) = until_state(&mut a, &mut b, |k| {
            relay_state(k).filter(|(s, _)| *s == State::Failed as i32)
        })
        .await;
        assert_eq!(state, State::Failed as i32);
        assert!(!error.is_empty());
    }

    #[tokio::test]
    async fn a_learned_relay_is_reserved_on_only_while_not_reachable() {
        let mut a = memory_swarm(keeper(&[]));
        let mut b = memory_swarm(dummy::Behaviour);
        let relay = PeerId::random();
        a.behaviour_mut().candidate(
            relay,
            "/ip4/10.0.0.2/tcp/4001".parse().expect("addr"),
            Source::Identify,
        );
        assert!(a.behaviour().relays().status().is_empty(), "not wanted yet");
        a.behaviour_mut()
            .tested("/memory/97".parse().expect("addr"), false);
        assert_eq!(
            a.behaviour().autonat().verdict(),
            Reachability::NotReachable
        );
        let (state, _) = until_state(&mut a, &mut b, |k| {
            relay_state(k).filter(|(s, _)| *s == State::Failed as i32)
        })
        .await;
        assert_eq!(state, State::Failed as i32, "asked for, and failed here");
        a.behaviour_mut()
            .tested("/memory/96".parse().expect("addr"), true);
        assert!(
            a.behaviour().relays().status().is_empty(),
            "reachable: dropped"
        );
    }
}
