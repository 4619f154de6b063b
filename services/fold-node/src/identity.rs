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

/// A client certificate verified by TLS against the client CA (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The certificate's subject common name (or, without one, its first DNS name).
    pub name: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex.
    pub key_sha256: String,
}

impl CertIdentity {
    /// Read the identity of a DER certificate (already verified by the TLS handshake).
    pub fn from_der(der: &[u8]) -> Option<CertIdentity> {
        use sha2::{Digest, Sha256};
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let dns = || {
            cert.subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|g| match g {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                })
        };
        let name = cn.or_else(dns)?;
        Some(CertIdentity {
            name,
            key_sha256: hex::encode(Sha256::digest(cert.public_key().raw)),
        })
    }
}

/// An authenticated party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An anonymous client of this node's public gRPC port (no client certificate).
    LocalClient,
    /// A client of the public port that presented a certificate signed by the client CA.
    CertClient(CertIdentity),
    /// A remote node, by the PeerId its sidecar authenticated (and that id's raw Ed25519
    /// public key, when the sidecar gave it).
    Peer(String),
    PeerWithKey(String, Vec<u8>),
}

impl Principal {
    /// How history records the writer.
    pub fn writer_label(&self) -> String {
        match self {
            Principal::LocalClient => "client:local".into(),
            Principal::CertClient(c) => format!("client:{}", c.name),
            Principal::Peer(id) | Principal::PeerWithKey(id, _) => format!("peer:{id}"),
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
            // A certificate client is looked up in the same trust table as peers, by its
            // certificate name; one that is not listed gets the anonymous client distance.
            Principal::CertClient(c) => Requester {
                label: who.writer_label(),
                distance: match self.store.trust_get(&c.name)? {
                    Some(r) if r.denied => None,
                    Some(r) => Some(r.distance),
                    None => Some(self.client_distance),
                },
                public_keys: vec![c.name.clone(), format!("sha256:{}", c.key_sha256)],
            },
            Principal::Peer(id) => Requester {
                label: who.writer_label(),
                distance: self.peer_distance(id)?.0,
                public_keys: vec![id.clone()],
            },
            Principal::PeerWithKey(id, key) => Requester {
                label: who.writer_label(),
                distance: self.peer_distance(id)?.0,
                public_keys: vec![id.clone(), format!("ed25519:{}", hex::encode(key))],
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
    fn certificate_identity_and_its_trust() {
        let ck = rcgen::generate_simple_self_signed(vec!["alice.example".to_string()]).unwrap();
        let id = CertIdentity::from_der(ck.cert.der()).unwrap();
        assert_eq!(id.name, "rcgen self signed cert");
        assert_eq!(id.key_sha256.len(), 64);
        assert!(CertIdentity::from_der(b"not a certificate").is_none());

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let ids = Identities::new(3, UnknownPeerPolicy::Deny, store.clone());
        let who = Principal::CertClient(id.clone());
        // Not in the trust table: the anonymous client distance.
        assert_eq!(ids.resolve(&who).unwrap().distance, Some(3));
        store
            .trust_set(
                &id.name,
                Some(TrustRecord {
                    distance: 1,
                    denied: false,
                }),
            )
            .unwrap();
        let r = ids.resolve(&who).unwrap();
        assert_eq!(r.distance, Some(1));
        assert_eq!(r.label, "client:rcgen self signed cert");
        assert!(r.public_keys.contains(&format!("sha256:{}", id.key_sha256)));
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
