//! The connect behaviour: a `NetworkBehaviour` that holds requests until their peer connects,
//! dials it (`ToSwarm::Dial`) on its known addresses, asks the event loop for a DHT lookup
//! ([`ConnectEvent::NeedDht`]) when they fail, then tries this node's relays, and fails the waiting
//! requests when all of that fails ([`ConnectEvent::Failed`]); a connection releases them
//! ([`ConnectEvent::Ready`]). The steps are decided by the plain state machine in
//! [`crate::connect`]; tested below with real swarms on the memory transport.

use std::collections::HashSet;
use std::fmt;
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm,
    NetworkBehaviour, THandlerInEvent, ToSwarm,
};
use libp2p::{PeerId, kad};

use crate::command::MeshError;
use crate::connect::{Connecting, Next};
use crate::policy_kit::{Actions, Connected, no_protocol};

/// What the event loop does for the connect behaviour.
pub enum ConnectEvent<T> {
    /// `peer` is connected: send its held requests.
    Ready(PeerId, Vec<T>),
    /// Connecting to `peer` failed: fail its held requests with this error.
    Failed(PeerId, Vec<T>, MeshError),
    /// Look `peer` up in the DHT and report the query with [`Connector::looking_up`].
    NeedDht(PeerId),
}

impl<T> fmt::Debug for ConnectEvent<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectEvent::Ready(p, l) => write!(f, "Ready({p}, {} requests)", l.len()),
            ConnectEvent::Failed(p, l, e) => write!(f, "Failed({p}, {} requests, {e})", l.len()),
            ConnectEvent::NeedDht(p) => write!(f, "NeedDht({p})"),
        }
    }
}

/// The connect behaviour (see the module doc). `T` is a held request.
pub struct Connector<T> {
    state: Connecting<T>,
    connected: Connected,
    /// The routes through this node's relays (`<relay>/p2p-circuit`), set by the event loop.
    relays: Vec<Multiaddr>,
    /// Dials this behaviour asked for that have not ended (bounded by the peers waiting).
    own_dials: HashSet<ConnectionId>,
    /// Dials that passed the behaviours that deny connections (those are composed ahead of this
    /// one) and are under way (bounded by the swarm's pending-connection limit).
    started: HashSet<ConnectionId>,
    actions: Actions<ConnectEvent<T>>,
}

impl<T> Default for Connector<T> {
    fn default() -> Self {
        Connector {
            state: Connecting::default(),
            connected: Connected::default(),
            relays: Vec::new(),
            own_dials: HashSet::new(),
            started: HashSet::new(),
            actions: Actions::default(),
        }
    }
}

impl<T> Connector<T> {
    /// Hold `request` for `peer` (not connected) whose `known` addresses are the peer book's; the
    /// first request held for a peer starts connecting to it.
    pub fn hold(&mut self, peer: PeerId, request: T, known: Vec<Multiaddr>) {
        if let Some(next) = self.state.hold(peer, request, known) {
            self.step(peer, next);
        }
    }

    /// The routes through the relays this node holds a reservation on.
    pub fn set_relay_routes(&mut self, routes: Vec<Multiaddr>) {
        self.relays = routes;
    }

    /// The DHT lookup [`ConnectEvent::NeedDht`] asked for started as query `q`.
    pub fn looking_up(&mut self, q: kad::QueryId, peer: PeerId) {
        self.state.looking_up(q, peer);
    }

    /// Query `q` finished; if it was a lookup for a peer with requests held, its connecting
    /// moves on with the addresses the peer book holds for it now (`known`, asked of the caller
    /// only then).
    pub fn lookup_finished(
        &mut self,
        q: &kad::QueryId,
        known: impl FnOnce(&PeerId) -> Vec<Multiaddr>,
    ) {
        if let Some(peer) = self.state.lookup_finished(q) {
            let connected = self.is_connected(&peer);
            let next = self
                .state
                .after_lookup(peer, connected, known(&peer), self.relays.clone());
            self.step(peer, next);
        }
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains(peer)
    }

    /// Queue what the state machine decided.
    fn step(&mut self, peer: PeerId, next: Next<T>) {
        let action = match next {
            Next::LookUp => ToSwarm::GenerateEvent(ConnectEvent::NeedDht(peer)),
            Next::Dial(addrs) => {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                self.own_dials.insert(opts.connection_id());
                ToSwarm::Dial { opts }
            }
            Next::Send(list) if list.is_empty() => return,
            Next::Send(list) => ToSwarm::GenerateEvent(ConnectEvent::Ready(peer, list)),
            Next::Fail(list, _) if list.is_empty() => return,
            Next::Fail(list, e) => ToSwarm::GenerateEvent(ConnectEvent::Failed(peer, list, e)),
        };
        self.actions.push(action);
    }

    /// A failed dial of `peer`: one that was under way moves the wait on (whoever dialled); one of
    /// this behaviour's that could not start fails the held requests, unless the peer is being
    /// dialled already (that dial's outcome moves the wait on).
    fn on_dial_failure(&mut self, f: DialFailure) {
        let DialFailure {
            connection_id: id,
            peer_id: peer,
            error,
        } = f;
        let own = self.own_dials.remove(&id);
        let started = self.started.remove(&id) && !matches!(error, DialError::NoAddresses);
        let Some(peer) = peer else {
            return;
        };
        if self.is_connected(&peer) {
            return;
        }
        let next = if started {
            self.state
                .dial_failed(peer, self.relays.clone(), &error.to_string())
        } else if own && !matches!(error, DialError::DialPeerConditionFalse(_)) {
            tracing::debug!(%peer, %error, "dial not started");
            Next::Fail(
                self.state.give_up(&peer),
                MeshError::Unavailable(format!("cannot reach node {peer}: {error}")),
            )
        } else {
            return;
        };
        self.step(peer, next);
    }
}

impl<T: Send + 'static> NetworkBehaviour for Connector<T> {
    type ToSwarm = ConnectEvent<T>;

    no_protocol!();

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        _: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.started.insert(id);
        Ok(Vec::new())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            }) => {
                self.own_dials.remove(&connection_id);
                self.started.remove(&connection_id);
                self.connected.established(peer_id);
                let held = self.state.connected(&peer_id);
                self.step(peer_id, Next::Send(held));
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                remaining_established,
                ..
            }) => self.connected.closed(peer_id, remaining_established),
            FromSwarm::DialFailure(f) => self.on_dial_failure(f),
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.actions.pop() {
            Some(action) => Poll::Ready(action),
            None => self.actions.pending(cx),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::swarm::{Swarm, SwarmEvent, dummy};
    use libp2p::{Transport, identity, noise, yamux};

    use super::*;

    /// A swarm on the memory transport (noise, yamux) with `behaviour`.
    pub(crate) fn memory_swarm<B: NetworkBehaviour>(behaviour: B) -> Swarm<B> {
        let key = identity::Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let transport = MemoryTransport::default()
            .upgrade(Version::V1)
            .authenticate(noise::Config::new(&key).expect("noise"))
            .multiplex(yamux::Config::default())
            .boxed();
        Swarm::new(
            transport,
            behaviour,
            peer,
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(Duration::from_secs(60)),
        )
    }

    /// Listen on a fresh memory address; returns it once the swarm reports it.
    pub(crate) async fn listen<B: NetworkBehaviour>(swarm: &mut Swarm<B>) -> Multiaddr {
        swarm
            .listen_on("/memory/0".parse().expect("addr"))
            .expect("listen");
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return address;
            }
        }
    }

    /// Drive `swarm` until its behaviour emits an event; drive `other` alongside.
    pub(crate) async fn next_event<A: NetworkBehaviour, B: NetworkBehaviour>(
        swarm: &mut Swarm<A>,
        other: &mut Swarm<B>,
    ) -> A::ToSwarm {
        let wait = async {
            loop {
                tokio::select! {
                    e = swarm.select_next_some() => if let SwarmEvent::Behaviour(e) = e {
                        return e;
                    },
                    _ = other.select_next_some() => {}
                }
            }
        };
        // A fail-fast bound, not a timing assertion.
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the behaviour emitted no event")
    }

    /// Drive both swarms until `a` reports a swarm event `pick` accepts (it also sees `a`'s
    /// behaviour); a fail-fast bound only.
    pub(crate) async fn until<A: NetworkBehaviour, B: NetworkBehaviour, T>(
        a: &mut Swarm<A>,
        b: &mut Swarm<B>,
        mut pick: impl FnMut(&SwarmEvent<A::ToSwarm>, &A) -> Option<T>,
    ) -> T {
        let wait = async {
            loop {
                tokio::select! {
                    e = a.select_next_some() => if let Some(t) = pick(&e, a.behaviour()) {
                        return t;
                    },
                    _ = b.select_next_some() => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the awaited event did not come")
    }

    /// Drive both swarms until `pick` accepts `a`'s behaviour's state (looked at after every
    /// event of either swarm, and every 10 ms for changes no event reports); a fail-fast bound
    /// only.
    pub(crate) async fn until_state<A: NetworkBehaviour, B: NetworkBehaviour, T>(
        a: &mut Swarm<A>,
        b: &mut Swarm<B>,
        mut pick: impl FnMut(&A) -> Option<T>,
    ) -> T {
        let mut look = tokio::time::interval(Duration::from_millis(10));
        let wait = async {
            loop {
                if let Some(t) = pick(a.behaviour()) {
                    return t;
                }
                tokio::select! {
                    _ = a.select_next_some() => {}
                    _ = b.select_next_some() => {}
                    _ = look.tick() => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the awaited state did not come")
    }

    #[tokio::test]
    async fn a_request_to_a_peer_known_by_address_dials_it_and_is_released_on_connect() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        a.behaviour_mut().hold(peer_b, 1, vec![addr.clone()]);
        a.behaviour_mut().hold(peer_b, 2, vec![addr]);
        match next_event(&mut a, &mut b).await {
            ConnectEvent::Ready(p, list) => {
                assert_eq!(p, peer_b);
                assert_eq!(list, vec![1, 2], "one dial, both requests released");
            }
            other => panic!("expected Ready, got {other:?}"),
        }
        assert!(a.is_connected(&peer_b));
    }

    #[tokio::test]
    async fn a_dial_that_cannot_start_fails_the_held_requests_at_once() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        // Its only address is one this swarm listens on itself: nothing is dialled.
        let own = listen(&mut a).await;
        let peer = PeerId::random();
        a.behaviour_mut().hold(peer, 4, vec![own]);
        match next_event(&mut a, &mut b).await {
            ConnectEvent::Failed(p, list, MeshError::Unavailable(e)) => {
                assert_eq!((p, list), (peer, vec![4]));
                assert!(e.contains("cannot reach node"), "{e}");
            }
            other => panic!("expected Failed at once, not a DHT lookup: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_peer_without_addresses_is_looked_up_in_the_dht() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        let peer = PeerId::random();
        a.behaviour_mut().hold(peer, 1, vec![]);
        assert!(matches!(
            next_event(&mut a, &mut b).await,
            ConnectEvent::NeedDht(p) if p == peer
        ));
    }

    #[tokio::test]
    async fn dial_failures_go_to_the_dht_then_fail_the_held_requests() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        // Nobody listens there: the dial fails.
        let gone: Multiaddr = "/memory/4242424242".parse().expect("addr");
        let peer = PeerId::random();
        a.behaviour_mut().hold(peer, 7, vec![gone.clone()]);
        assert!(matches!(
            next_event(&mut a, &mut b).await,
            ConnectEvent::NeedDht(p) if p == peer
        ));
        // The lookup found nothing new but the same address: dialled again, failed again, and
        // with no relay to try the request fails.
        let mut k = kad::Behaviour::new(peer, kad::store::MemoryStore::new(peer));
        let q = k.get_closest_peers(PeerId::random());
        a.behaviour_mut().looking_up(q, peer);
        a.behaviour_mut().lookup_finished(&q, |_| vec![gone]);
        match next_event(&mut a, &mut b).await {
            ConnectEvent::Failed(p, list, e) => {
                assert_eq!((p, list), (peer, vec![7]));
                assert!(matches!(e, MeshError::Unavailable(_)), "{e}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unknown_peer_the_dht_cannot_find_fails_as_not_found() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        let peer = PeerId::random();
        a.behaviour_mut().hold(peer, 3, vec![]);
        next_event(&mut a, &mut b).await;
        let mut k = kad::Behaviour::new(peer, kad::store::MemoryStore::new(peer));
        let q = k.get_closest_peers(PeerId::random());
        a.behaviour_mut().looking_up(q, peer);
        a.behaviour_mut().lookup_finished(&q, |_| vec![]);
        assert!(matches!(
            next_event(&mut a, &mut b).await,
            ConnectEvent::Failed(_, l, MeshError::NotFound(_)) if l == vec![3]
        ));
    }

    #[tokio::test]
    async fn a_peer_found_by_the_dht_is_dialled_and_released() {
        let mut a = memory_swarm(Connector::<u32>::default());
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        a.behaviour_mut().hold(peer_b, 5, vec![]);
        next_event(&mut a, &mut b).await;
        let mut k = kad::Behaviour::new(peer_b, kad::store::MemoryStore::new(peer_b));
        let q = k.get_closest_peers(PeerId::random());
        a.behaviour_mut().looking_up(q, peer_b);
        a.behaviour_mut().lookup_finished(&q, |_| vec![addr]);
        assert!(matches!(
            next_event(&mut a, &mut b).await,
            ConnectEvent::Ready(p, l) if p == peer_b && l == vec![5]
        ));
    }
}
