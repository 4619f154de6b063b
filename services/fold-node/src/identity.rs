//! Who is asking, and how far they are trusted: the one place where an authenticated identity
//! turns into a trust distance.
//!
//! A [`Principal`] is what the transport authenticated (today: the local gRPC client, or a remote
//! node whose PeerId the sidecar's Noise handshake proved). [`Identities::resolve`] turns it into
//! a [`Requester`] — distance and public keys — from configuration and the persisted trust table.
//! Nothing in a request can change the answer.

use std::fmt;
use std::str::FromStr;

use crate::store::{Store, StoreError, TrustRecord};

/// An authenticated party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A client of this node's public gRPC port (no client authentication yet).
    LocalClient,
    /// A remote node, by the PeerId its sidecar authenticated.
    Peer(String),
}

impl Principal {
    /// How history records the writer.
    pub fn writer_label(&self) -> String {
        match self {
            Principal::LocalClient => "client:local".into(),
            Principal::Peer(id) => format!("peer:{id}"),
        }
    }
}

/// The requester as permission checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// For messages and history, e.g. "client:local" or "peer:12D3Koo…".
    pub label: String,
    /// Trust distance; `None` when this node denies the requester altogether.
    pub distance: Option<u32>,
    /// Public keys the requester proved it holds (for explicit key policies).
    pub public_keys: Vec<String>,
}

/// Distance given to peers that are not in the trust table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownPeerPolicy {
    Deny,
    Distance(u32),
}

impl FromStr for UnknownPeerPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("deny") {
            return Ok(UnknownPeerPolicy::Deny);
        }
        s.parse::<u32>()
            .map(UnknownPeerPolicy::Distance)
            .map_err(|_| format!("expected a trust distance (0, 1, 2, ...) or \"deny\", got '{s}'"))
    }
}

impl fmt::Display for UnknownPeerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownPeerPolicy::Deny => f.write_str("deny"),
            UnknownPeerPolicy::Distance(d) => write!(f, "{d}"),
        }
    }
}

/// A `--trust PEER=DISTANCE|deny` entry from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSeed {
    pub node_id: String,
    pub record: TrustRecord,
}

impl FromStr for TrustSeed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((id, d)) = s.split_once('=') else {
            return Err(format!(
                "expected NODE_ID=DISTANCE or NODE_ID=deny, got '{s}'"
            ));
        };
        let id = id.trim();
        if id.is_empty() {
            return Err(format!("missing node id in '{s}'"));
        }
        let record = match d.trim().parse::<UnknownPeerPolicy>()? {
            UnknownPeerPolicy::Deny => TrustRecord {
                distance: 0,
                denied: true,
            },
            UnknownPeerPolicy::Distance(distance) => TrustRecord {
                distance,
                denied: false,
            },
        };
        Ok(TrustSeed {
            node_id: id.to_string(),
            record,
        })
    }
}

/// Resolves principals to requesters.
#[derive(Clone)]
pub struct Identities {
    client_distance: u32,
    unknown_peer: UnknownPeerPolicy,
    store: Store,
}

impl Identities {
    pub fn new(client_distance: u32, unknown_peer: UnknownPeerPolicy, store: Store) -> Self {
        Identities {
            client_distance,
            unknown_peer,
            store,
        }
    }

    pub fn unknown_peer_policy(&self) -> UnknownPeerPolicy {
        self.unknown_peer
    }

    /// The distance this node assigns to a peer (`None` = denied), and whether it came from an
    /// explicit trust table entry.
    pub fn peer_distance(&self, node_id: &str) -> Result<(Option<u32>, bool), StoreError> {
        Ok(match self.store.trust_get(node_id)? {
            Some(r) if r.denied => (None, true),
            Some(r) => (Some(r.distance), true),
            None => match self.unknown_peer {
                UnknownPeerPolicy::Deny => (None, false),
                UnknownPeerPolicy::Distance(d) => (Some(d), false),
            },
        })
    }

    pub fn resolve(&self, who: &Principal) -> Result<Requester, StoreError> {
        Ok(match who {
            Principal::LocalClient => Requester {
                label: who.writer_label(),
                distance: Some(self.client_distance),
                public_keys: Vec::new(),
            },
            Principal::Peer(id) => Requester {
                label: who.writer_label(),
                distance: self.peer_distance(id)?.0,
                public_keys: vec![id.clone()],
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies_and_seeds() {
        assert_eq!("deny".parse(), Ok(UnknownPeerPolicy::Deny));
        assert_eq!("3".parse(), Ok(UnknownPeerPolicy::Distance(3)));
        assert!("-1".parse::<UnknownPeerPolicy>().is_err());
        let s: TrustSeed = "12D3Koo=2".parse().unwrap();
        assert_eq!(s.node_id, "12D3Koo");
        assert_eq!(
            s.record,
            TrustRecord {
                distance: 2,
                denied: false
            }
        );
        let s: TrustSeed = "x=deny".parse().unwrap();
        assert!(s.record.denied);
        assert!("x".parse::<TrustSeed>().is_err());
        assert!("=1".parse::<TrustSeed>().is_err());
    }

    #[test]
    fn peers_resolve_through_the_trust_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .trust_set(
                "p1",
                Some(TrustRecord {
                    distance: 1,
                    denied: false,
                }),
            )
            .unwrap();
        store
            .trust_set(
                "bad",
                Some(TrustRecord {
                    distance: 0,
                    denied: true,
                }),
            )
            .unwrap();
        let ids = Identities::new(0, UnknownPeerPolicy::Deny, store.clone());
        assert_eq!(
            ids.resolve(&Principal::Peer("p1".into())).unwrap().distance,
            Some(1)
        );
        assert_eq!(
            ids.resolve(&Principal::Peer("bad".into()))
                .unwrap()
                .distance,
            None
        );
        assert_eq!(
            ids.resolve(&Principal::Peer("stranger".into()))
                .unwrap()
                .distance,
            None
        );
        assert_eq!(
            ids.resolve(&Principal::LocalClient).unwrap().distance,
            Some(0)
        );
        let ids = Identities::new(4, UnknownPeerPolicy::Distance(7), store);
        assert_eq!(
            ids.resolve(&Principal::Peer("stranger".into()))
                .unwrap()
                .distance,
            Some(7)
        );
        assert_eq!(
            ids.resolve(&Principal::LocalClient).unwrap().distance,
            Some(4)
        );
    }
}
