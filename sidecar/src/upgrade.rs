//! Relayed connections replaced by a direct one ([`Upgrades`]): once a direct connection to a
//! peer is up, its relayed connections get [`UPGRADE_GRACE`] to answer what is in flight and are
//! closed; requests made meanwhile are held, then sent on the direct connection. A plain state
//! machine with no I/O.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

use crate::command::MeshError;

/// How long relayed connections stay open after a direct one came up, for the answers to the
/// requests already in flight on them.
pub const UPGRADE_GRACE: Duration = Duration::from_millis(500);
/// Most requests held for one peer during an upgrade; beyond it, UNAVAILABLE.
pub const MAX_HELD: usize = 1024;

/// A peer whose relayed connections are being replaced by a direct one.
struct Upgrade<T> {
    relayed: Vec<ConnectionId>,
    /// Requests held until the relayed connections are closed (so their streams open on the
    /// direct one; libp2p-stream picks any of a peer's connections).
    held: Vec<T>,
}

/// What became of a request for a peer ([`Upgrades::hold`]).
pub enum Hold<T> {
    /// The peer is not being upgraded: send the request as usual.
    NotUpgrading(T),
    /// Held until the upgrade is done.
    Held,
    /// Too many held already: fail it.
    Full(T, MeshError),
}

/// The peers being upgraded.
pub struct Upgrades<T> {
    map: HashMap<PeerId, Upgrade<T>>,
}

impl<T> Default for Upgrades<T> {
    fn default() -> Self {
        Upgrades {
            map: HashMap::new(),
        }
    }
}

impl<T> Upgrades<T> {
    /// A request for `peer`: held while the peer is being upgraded.
    pub fn hold(&mut self, peer: PeerId, request: T) -> Hold<T> {
        let Some(u) = self.map.get_mut(&peer) else {
            return Hold::NotUpgrading(request);
        };
        if u.held.len() >= MAX_HELD {
            return Hold::Full(
                request,
                MeshError::Unavailable(format!(
                    "{MAX_HELD} requests are already waiting for the connection to node {peer} to move off its relay; retry"
                )),
            );
        }
        u.held.push(request);
        Hold::Held
    }

    /// A direct connection to `peer` is up while these `relayed` ones are open. True when the
    /// upgrade is new: the loop closes the relayed connections after [`UPGRADE_GRACE`] (see
    /// [`Upgrades::due`]).
    pub fn start(&mut self, peer: PeerId, relayed: Vec<ConnectionId>) -> bool {
        let fresh = !self.map.contains_key(&peer);
        let u = self.map.entry(peer).or_insert_with(|| Upgrade {
            relayed: Vec::new(),
            held: Vec::new(),
        });
        for id in relayed {
            if !u.relayed.contains(&id) {
                u.relayed.push(id);
            }
        }
        fresh
    }

    /// The grace is over: the relayed connections of `peer` to close.
    pub fn due(&self, peer: &PeerId) -> Vec<ConnectionId> {
        self.map
            .get(peer)
            .map(|u| u.relayed.clone())
            .unwrap_or_default()
    }

    /// Connection `id` of `peer` closed, leaving `remaining` open. When that ends the upgrade
    /// (no relayed connection left, or none at all), the requests held, to send now.
    pub fn closed(&mut self, peer: &PeerId, id: ConnectionId, remaining: u32) -> Vec<T> {
        let done = self.map.get_mut(peer).is_some_and(|u| {
            u.relayed.retain(|c| *c != id);
            u.relayed.is_empty() || remaining == 0
        });
        if !done {
            return Vec::new();
        }
        self.map.remove(peer).map(|u| u.held).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    #[test]
    fn requests_are_held_until_the_relayed_connections_close() {
        let mut u = Upgrades::default();
        let peer = PeerId::random();
        assert!(matches!(u.hold(peer, 1), Hold::NotUpgrading(1)));
        assert!(u.start(peer, vec![id(1), id(2)]));
        assert!(!u.start(peer, vec![id(2)]), "one grace timer per upgrade");
        assert!(matches!(u.hold(peer, 2), Hold::Held));
        assert_eq!(u.due(&peer), vec![id(1), id(2)]);
        assert!(u.closed(&peer, id(1), 2).is_empty());
        assert_eq!(u.closed(&peer, id(2), 1), vec![2]);
        assert!(u.due(&peer).is_empty());
        assert!(matches!(u.hold(peer, 3), Hold::NotUpgrading(3)));
    }

    #[test]
    fn losing_every_connection_ends_the_upgrade() {
        let mut u = Upgrades::default();
        let peer = PeerId::random();
        u.start(peer, vec![id(1), id(2)]);
        assert!(matches!(u.hold(peer, 7), Hold::Held));
        assert_eq!(u.closed(&peer, id(3), 0), vec![7]);
    }

    #[test]
    fn too_many_held_requests_fail() {
        let mut u = Upgrades::default();
        let peer = PeerId::random();
        u.start(peer, vec![id(1)]);
        for i in 0..MAX_HELD {
            assert!(matches!(u.hold(peer, i), Hold::Held));
        }
        assert!(matches!(
            u.hold(peer, 0),
            Hold::Full(0, MeshError::Unavailable(_))
        ));
    }
}
