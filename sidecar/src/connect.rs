//! Requests held until their peer connects: the peer's known addresses are dialled first, then
//! (once they fail) the DHT is asked for fresh ones, then the peer is tried through this node's
//! relays; when all of that fails, the held requests fail. A plain state machine with no I/O:
//! the connect behaviour ([`crate::connector`]) tells it what happened and carries out the
//! [`Next`] step it answers.

use std::collections::{HashMap, HashSet};

use libp2p::{Multiaddr, PeerId, kad};

use crate::command::MeshError;

/// What the connect behaviour does next for a peer with requests held.
#[derive(Debug)]
pub enum Next<T> {
    /// Look the peer up in the DHT (and report the query with [`Connecting::looking_up`]).
    LookUp,
    /// Dial the peer on these addresses.
    Dial(Vec<Multiaddr>),
    /// The peer is connected: send these requests.
    Send(Vec<T>),
    /// Fail these requests with this error.
    Fail(Vec<T>, MeshError),
}

/// The requests held per peer, and how far each peer's connecting got.
pub struct Connecting<T> {
    waiting: HashMap<PeerId, Vec<T>>,
    /// DHT lookups under way for peers with requests held.
    lookups: HashMap<kad::QueryId, PeerId>,
    /// Peers whose known addresses failed and that were looked up in the DHT again (at most
    /// once per wait; a subset of `waiting`'s keys).
    relookup: HashSet<PeerId>,
    /// Peers dialled through this node's relays (at most once per wait; a subset of
    /// `waiting`'s keys).
    relay_tried: HashSet<PeerId>,
}

impl<T> Default for Connecting<T> {
    fn default() -> Self {
        Connecting {
            waiting: HashMap::new(),
            lookups: HashMap::new(),
            relookup: HashSet::new(),
            relay_tried: HashSet::new(),
        }
    }
}

impl<T> Connecting<T> {
    /// Hold `request` for `peer` (not connected), whose `known` addresses are those the peer
    /// book holds. The first step to connect, if this is the peer's first request held.
    pub fn hold(&mut self, peer: PeerId, request: T, known: Vec<Multiaddr>) -> Option<Next<T>> {
        if let Some(list) = self.waiting.get_mut(&peer) {
            list.push(request);
            return None;
        }
        self.waiting.insert(peer, vec![request]);
        Some(if known.is_empty() {
            Next::LookUp
        } else {
            Next::Dial(known)
        })
    }

    /// A DHT lookup for `peer` started as query `q`.
    pub fn looking_up(&mut self, q: kad::QueryId, peer: PeerId) {
        self.lookups.insert(q, peer);
    }

    /// The peer a finished lookup was for, if it was one of these.
    pub fn lookup_finished(&mut self, q: &kad::QueryId) -> Option<PeerId> {
        self.lookups.remove(q)
    }

    /// A connection to `peer` came up: its held requests, to send.
    pub fn connected(&mut self, peer: &PeerId) -> Vec<T> {
        self.give_up(peer)
    }

    /// Drop `peer`'s wait: its held requests (to fail, or send).
    pub fn give_up(&mut self, peer: &PeerId) -> Vec<T> {
        self.relookup.remove(peer);
        self.relay_tried.remove(peer);
        self.waiting.remove(peer).unwrap_or_default()
    }

    /// Dialling `peer` (still not connected) failed with `error`; `relays` are the routes
    /// through this node's relays.
    pub fn dial_failed(&mut self, peer: PeerId, relays: Vec<Multiaddr>, error: &str) -> Next<T> {
        if self.waiting.contains_key(&peer) && self.relookup.insert(peer) {
            // The addresses known here failed: ask the DHT once for fresh ones (e.g. the
            // relayed address of a node that just reserved a slot on a relay).
            tracing::debug!(%peer, "known addresses failed; looking the node up in the DHT");
            return Next::LookUp;
        }
        if self.waiting.contains_key(&peer) && !relays.is_empty() && self.relay_tried.insert(peer) {
            // Neither the known nor the DHT's addresses worked: try through the relays this
            // node reserved on, which the peer may share.
            tracing::debug!(%peer, relays = relays.len(), "addresses failed; trying through this node's relays");
            return Next::Dial(relays);
        }
        Next::Fail(
            self.give_up(&peer),
            MeshError::Unavailable(format!("cannot reach node {peer}: {error}")),
        )
    }

    /// The DHT lookup for `peer` finished: `connected` says whether the peer is connected now,
    /// `known` holds the addresses the peer book has for it since, `relays` the routes through
    /// this node's relays.
    pub fn after_lookup(
        &mut self,
        peer: PeerId,
        connected: bool,
        known: Vec<Multiaddr>,
        relays: Vec<Multiaddr>,
    ) -> Next<T> {
        if connected {
            return Next::Send(self.connected(&peer));
        }
        if !known.is_empty() {
            return Next::Dial(known);
        }
        if self.waiting.contains_key(&peer) && !relays.is_empty() && self.relay_tried.insert(peer) {
            // Unknown to the DHT (yet): try the relays this node reserved on, which the node
            // may share.
            tracing::debug!(%peer, relays = relays.len(), "no address in the DHT; trying through this node's relays");
            return Next::Dial(relays);
        }
        Next::Fail(
            self.give_up(&peer),
            MeshError::NotFound(format!(
                "node {peer} is unknown: no address for it here or in the DHT (dial it or add a bootstrap peer)"
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")
    }

    fn relay() -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/9/p2p/{}/p2p-circuit", PeerId::random())
            .parse()
            .expect("addr")
    }

    #[test]
    fn a_known_peer_is_dialled_and_gets_its_requests_on_connect() {
        let mut c = Connecting::default();
        let peer = PeerId::random();
        assert!(
            matches!(c.hold(peer, 1, vec![addr(1)]), Some(Next::Dial(a)) if a == vec![addr(1)])
        );
        assert!(
            c.hold(peer, 2, vec![addr(1)]).is_none(),
            "one connect per peer"
        );
        assert_eq!(c.connected(&peer), vec![1, 2]);
        assert!(c.connected(&peer).is_empty());
    }

    #[test]
    fn an_unknown_peer_is_looked_up() {
        let mut c = Connecting::default();
        assert!(matches!(
            c.hold(PeerId::random(), 1, vec![]),
            Some(Next::LookUp)
        ));
    }

    #[test]
    fn failed_addresses_go_to_the_dht_then_the_relays_then_fail() {
        let mut c = Connecting::default();
        let peer = PeerId::random();
        c.hold(peer, 1, vec![addr(1)]);
        assert!(matches!(
            c.dial_failed(peer, vec![relay()], "refused"),
            Next::LookUp
        ));
        assert!(matches!(
            c.dial_failed(peer, vec![relay()], "refused"),
            Next::Dial(_)
        ));
        match c.dial_failed(peer, vec![relay()], "refused") {
            Next::Fail(list, e) => {
                assert_eq!(list, vec![1]);
                assert!(matches!(e, MeshError::Unavailable(_)));
                assert!(e.to_string().contains("refused"));
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // A new wait starts over: the DHT is asked again.
        c.hold(peer, 2, vec![addr(1)]);
        assert!(matches!(
            c.dial_failed(peer, vec![], "refused"),
            Next::LookUp
        ));
    }

    #[test]
    fn without_relays_a_failure_after_the_lookup_fails_the_requests() {
        let mut c = Connecting::default();
        let peer = PeerId::random();
        c.hold(peer, 1, vec![addr(1)]);
        assert!(matches!(c.dial_failed(peer, vec![], "x"), Next::LookUp));
        assert!(matches!(c.dial_failed(peer, vec![], "x"), Next::Fail(l, _) if l == vec![1]));
    }

    #[test]
    fn a_dial_failure_for_a_peer_without_requests_fails_nothing() {
        let mut c: Connecting<u32> = Connecting::default();
        assert!(
            matches!(c.dial_failed(PeerId::random(), vec![relay()], "x"), Next::Fail(l, _) if l.is_empty())
        );
    }

    #[test]
    fn a_lookup_is_matched_by_its_query() {
        let mut c: Connecting<u32> = Connecting::default();
        let peer = PeerId::random();
        let q = kad_query_id();
        c.looking_up(q, peer);
        assert_eq!(c.lookup_finished(&q), Some(peer));
        assert_eq!(c.lookup_finished(&q), None);
    }

    #[test]
    fn after_a_lookup_the_peer_is_dialled_sent_to_relayed_or_failed() {
        let mut c = Connecting::default();
        let peer = PeerId::random();
        c.hold(peer, 1, vec![]);
        assert!(
            matches!(c.after_lookup(peer, false, vec![addr(2)], vec![]), Next::Dial(a) if a == vec![addr(2)])
        );
        assert!(matches!(
            c.after_lookup(peer, false, vec![], vec![relay()]),
            Next::Dial(_)
        ));
        match c.after_lookup(peer, false, vec![], vec![relay()]) {
            Next::Fail(list, e) => {
                assert_eq!(list, vec![1]);
                assert!(matches!(e, MeshError::NotFound(_)));
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        c.hold(peer, 2, vec![]);
        assert!(
            matches!(c.after_lookup(peer, true, vec![], vec![]), Next::Send(l) if l == vec![2])
        );
    }

    /// A query id (only the DHT behaviour makes them).
    fn kad_query_id() -> kad::QueryId {
        let local = libp2p::identity::Keypair::generate_ed25519();
        let id = local.public().to_peer_id();
        let mut k = kad::Behaviour::new(id, kad::store::MemoryStore::new(id));
        k.get_closest_peers(PeerId::random())
    }
}
