//! Who is asking, and how far they are trusted: the one place where an authenticated identity
//! turns into a trust distance.
//!
//! A [`Principal`] is what the transport authenticated (today: the local gRPC client, or a remote
//! node whose PeerId the sidecar's Noise handshake proved). [`Identities::resolve`] turns it into
//! a [`Requester`] — distance and public keys — from configuration and the persisted trust table.
//! Nothing in a request can change the answer.

use std::fmt;
use std::str::FromStr;

use crate::model::distance::Requester;
use crate::storage::store::{Store, StoreError, TrustRecord};

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
    /// A client of the owner listener (`--owner-listen`, a 0600 Unix socket by default): the
    /// node's owner, at distance 0 with the admin right.
    Owner,
    /// A request another node forwarded, on behalf of the requester it names.
    Forwarded(Forwarded),
}

/// A forwarded request's sender: the node the sidecar authenticated, and whom that node says it
/// asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The origin node's id (its PeerId, authenticated by Noise).
    pub node: String,
    /// The origin's raw Ed25519 public key (empty when the sidecar could not give it).
    pub node_key: Vec<u8>,
    /// The requester as the origin authenticated it; `None` = the origin node itself.
    pub requester: Option<fold_proto::wire::Requester>,
}

impl Principal {
    /// How history records the writer.
    /// Who this is, as far as this node can prove it: what per-client state (idempotency keys,
    /// subscription and scan slots) is scoped by. A certificate client is its key, not its
    /// name; a forwarded requester is the origin node plus the key the origin proved, else the
    /// identity the origin names. Every anonymous client of the public port is one identity.
    pub fn identity_key(&self) -> String {
        match self {
            Principal::LocalClient => "anonymous".into(),
            Principal::Owner => "owner".into(),
            Principal::CertClient(c) => format!("cert:sha256:{}", c.key_sha256),
            Principal::Forwarded(f) => match &f.requester {
                None => format!("peer:{}", f.node),
                Some(r) if !r.proven_key.is_empty() => format!("peer:{}/{}", f.node, r.proven_key),
                Some(r) => format!("peer:{}/{}", f.node, r.identity),
            },
        }
    }

    pub fn writer_label(&self) -> String {
        match self {
            Principal::LocalClient => "client:local".into(),
            Principal::CertClient(c) => format!("client:{}", c.name),
            Principal::Owner => "client:owner".into(),
            Principal::Forwarded(f) => match &f.requester {
                None => format!("peer:{}", f.node),
                Some(r) if r.identity.is_empty() => format!("peer:{}/client:unknown", f.node),
                Some(r) => format!("peer:{}/{}", f.node, r.identity),
            },
        }
    }
}

/// Distance given to peers that are not in the trust table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownPeerPolicy {
    Deny,
    Distance(u32),
}

impl UnknownPeerPolicy {
    pub fn distance(self) -> Option<u32> {
        match self {
            UnknownPeerPolicy::Deny => None,
            UnknownPeerPolicy::Distance(d) => Some(d),
        }
    }
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

/// `--admin-distance`: the largest trust distance that carries the admin right, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminDistance(pub Option<u32>);

impl FromStr for AdminDistance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(AdminDistance(None));
        }
        s.parse::<u32>()
            .map(|d| AdminDistance(Some(d)))
            .map_err(|_| format!("expected a trust distance (0, 1, ...) or \"none\", got '{s}'"))
    }
}

impl fmt::Display for AdminDistance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(d) => write!(f, "{d}"),
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

/// Who gets which distance and who holds the admin right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Clients without a certificate, and certificate clients not in the trust table
    /// (`None` = denied).
    pub client_distance: Option<u32>,
    pub unknown_peer: UnknownPeerPolicy,
    /// Requesters at this distance or closer hold the admin right (`None`: only the owner
    /// listener and `admin_identities`).
    pub admin_distance: Option<u32>,
    /// Certificate identities with the admin right: a subject name or "sha256:<hex>".
    pub admin_identities: Vec<String>,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy {
            client_distance: Some(0),
            unknown_peer: UnknownPeerPolicy::Deny,
            admin_distance: Some(0),
            admin_identities: Vec::new(),
        }
    }
}

/// Resolves principals to requesters and rights.
#[derive(Clone)]
pub struct Identities {
    policy: std::sync::Arc<TrustPolicy>,
    store: Store,
}

impl Identities {
    pub fn new(policy: TrustPolicy, store: Store) -> Self {
        Identities {
            policy: std::sync::Arc::new(policy),
            store,
        }
    }

    pub fn unknown_peer_policy(&self) -> UnknownPeerPolicy {
        self.policy.unknown_peer
    }

    /// The distance this node assigns to a peer (`None` = denied), and whether it came from an
    /// explicit trust table entry.
    pub fn peer_distance(&self, node_id: &str) -> Result<(Option<u32>, bool), StoreError> {
        Ok(match self.store.trust_get(node_id)? {
            Some(r) if r.denied => (None, true),
            Some(r) => (Some(r.distance), true),
            None => (self.policy.unknown_peer.distance(), false),
        })
    }

    pub fn resolve(&self, who: &Principal) -> Result<Requester, StoreError> {
        Ok(match who {
            Principal::LocalClient => Requester {
                label: who.writer_label(),
                distance: self.policy.client_distance,
                public_keys: Vec::new(),
                proven_key: None,
            },
            Principal::Owner => Requester {
                label: who.writer_label(),
                distance: Some(0),
                public_keys: Vec::new(),
                proven_key: None,
            },
            // A certificate client is looked up in the same trust table as peers, by its
            // certificate name; one that is not listed gets the client distance.
            Principal::CertClient(c) => Requester {
                label: who.writer_label(),
                distance: match self.store.trust_get(&c.name)? {
                    Some(r) if r.denied => None,
                    Some(r) => Some(r.distance),
                    None => self.policy.client_distance,
                },
                public_keys: vec![c.name.clone(), format!("sha256:{}", c.key_sha256)],
                proven_key: Some(format!("sha256:{}", c.key_sha256)),
            },
            // Distances add along the path: this node's trust in the origin node plus the
            // requester's distance at the origin. Never more than the weakest link allows.
            Principal::Forwarded(f) => {
                let node = self.peer_distance(&f.node)?.0;
                let at_origin = f.requester.as_ref().map_or(0, |r| r.distance);
                let mut public_keys = vec![f.node.clone()];
                if !f.node_key.is_empty() {
                    public_keys.push(format!("ed25519:{}", hex::encode(&f.node_key)));
                }
                if let Some(r) = &f.requester
                    && !r.proven_key.is_empty()
                {
                    public_keys.push(r.proven_key.clone());
                }
                Requester {
                    label: who.writer_label(),
                    distance: node.map(|d| d.saturating_add(at_origin)),
                    public_keys,
                    proven_key: None,
                }
            }
        })
    }

    /// Does `who` (resolved as `r`) hold the admin right: load and change schemas, read and
    /// change the trust table, dial and disconnect peers? The owner listener always does; a
    /// certificate listed in `--admin-identity` does; otherwise a requester at
    /// `--admin-distance` or closer. Forwarded requests never do.
    pub fn is_admin(&self, who: &Principal, r: &Requester) -> bool {
        match who {
            Principal::Owner => true,
            Principal::Forwarded(_) => false,
            Principal::CertClient(c)
                if self.policy.admin_identities.iter().any(|a| {
                    *a == c.name || a.strip_prefix("sha256:") == Some(c.key_sha256.as_str())
                }) =>
            {
                true
            }
            Principal::LocalClient | Principal::CertClient(_) => {
                matches!((r.distance, self.policy.admin_distance), (Some(d), Some(max)) if d <= max)
            }
        }
    }

    /// How the admin right is granted here, for refusal messages.
    pub fn admin_rule(&self) -> String {
        let mut ways = vec!["the owner socket (--owner-listen)".to_string()];
        if let Some(d) = self.policy.admin_distance {
            ways.push(format!(
                "a client at trust distance {d} or closer (--admin-distance)"
            ));
        }
        if !self.policy.admin_identities.is_empty() {
            ways.push("a client certificate listed in --admin-identity".to_string());
        }
        ways.join(", or ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(client: Option<u32>, unknown_peer: UnknownPeerPolicy) -> TrustPolicy {
        TrustPolicy {
            client_distance: client,
            unknown_peer,
            ..TrustPolicy::default()
        }
    }

    fn peer(id: String) -> Principal {
        Principal::Forwarded(Forwarded {
            node: id,
            node_key: Vec::new(),
            requester: None,
        })
    }

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
        let ids = Identities::new(policy(Some(3), UnknownPeerPolicy::Deny), store.clone());
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
        let ids = Identities::new(policy(Some(0), UnknownPeerPolicy::Deny), store.clone());
        assert_eq!(ids.resolve(&peer("p1".into())).unwrap().distance, Some(1));
        assert_eq!(ids.resolve(&peer("bad".into())).unwrap().distance, None);
        assert_eq!(
            ids.resolve(&peer("stranger".into())).unwrap().distance,
            None
        );
        assert_eq!(
            ids.resolve(&Principal::LocalClient).unwrap().distance,
            Some(0)
        );
        let ids = Identities::new(policy(Some(4), UnknownPeerPolicy::Distance(7)), store);
        assert_eq!(
            ids.resolve(&peer("stranger".into())).unwrap().distance,
            Some(7)
        );
        assert_eq!(
            ids.resolve(&Principal::LocalClient).unwrap().distance,
            Some(4)
        );
    }

    #[test]
    fn forwarded_requests_get_the_path_distance() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .trust_set(
                "A",
                Some(TrustRecord {
                    distance: 1,
                    denied: false,
                }),
            )
            .unwrap();
        let ids = Identities::new(TrustPolicy::default(), store);
        let via_a = |distance: u32, key: &str| {
            Principal::Forwarded(Forwarded {
                node: "A".into(),
                node_key: vec![7; 32],
                requester: Some(fold_proto::wire::Requester {
                    distance,
                    identity: "client:alice".into(),
                    proven_key: key.into(),
                }),
            })
        };
        // B trusts A at 1; A places the client at 3: the path distance is 4.
        let r = ids.resolve(&via_a(3, "")).unwrap();
        assert_eq!(r.distance, Some(4));
        assert_eq!(r.label, "peer:A/client:alice");
        assert!(
            r.public_keys
                .contains(&format!("ed25519:{}", hex::encode([7u8; 32])))
        );
        // The owner of A asking: exactly B's trust in A.
        assert_eq!(ids.resolve(&via_a(0, "")).unwrap().distance, Some(1));
        // No overflow on hostile distances.
        assert_eq!(
            ids.resolve(&via_a(u32::MAX, "")).unwrap().distance,
            Some(u32::MAX)
        );
        // The requester's proven key reaches explicit key policies.
        let r = ids.resolve(&via_a(3, "sha256:ab")).unwrap();
        assert!(r.public_keys.contains(&"sha256:ab".to_string()));
        // A denied (here: unknown) origin denies every requester behind it.
        let stranger = Principal::Forwarded(Forwarded {
            node: "Z".into(),
            node_key: vec![],
            requester: None,
        });
        assert_eq!(ids.resolve(&stranger).unwrap().distance, None);
        // Forwarded requests never carry the admin right, even at distance 0.
        let r = ids.resolve(&via_a(0, "")).unwrap();
        assert!(!ids.is_admin(&via_a(0, ""), &r));
    }

    #[test]
    fn the_admin_right_follows_identity_not_requests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["ops.example".to_string()]).unwrap();
        let cert = CertIdentity::from_der(ck.cert.der()).unwrap();
        let check = |p: TrustPolicy, who: &Principal| {
            let ids = Identities::new(p, store.clone());
            let r = ids.resolve(who).unwrap();
            ids.is_admin(who, &r)
        };
        let default = TrustPolicy::default();
        assert!(check(default.clone(), &Principal::LocalClient));
        assert!(check(default.clone(), &Principal::Owner));
        let distant = policy(Some(3), UnknownPeerPolicy::Deny);
        assert!(!check(distant.clone(), &Principal::LocalClient));
        assert!(check(distant.clone(), &Principal::Owner));
        // A certificate client not in the trust table gets the client distance (3): no right.
        let who = Principal::CertClient(cert.clone());
        assert!(!check(distant.clone(), &who));
        // Listed by name or by key hash: the right.
        let by_name = TrustPolicy {
            admin_identities: vec![cert.name.clone()],
            ..distant.clone()
        };
        assert!(check(by_name, &who));
        let by_key = TrustPolicy {
            admin_identities: vec![format!("sha256:{}", cert.key_sha256)],
            admin_distance: None,
            ..distant.clone()
        };
        assert!(check(by_key, &who));
        // Or placed at distance 0 in the trust table.
        store
            .trust_set(
                &cert.name,
                Some(TrustRecord {
                    distance: 0,
                    denied: false,
                }),
            )
            .unwrap();
        assert!(check(distant.clone(), &who));
        // --admin-distance none: only the owner socket and listed identities.
        let none = TrustPolicy {
            admin_distance: None,
            ..TrustPolicy::default()
        };
        assert!(!check(none.clone(), &Principal::LocalClient));
        assert!(!check(none, &who));
        // Denied clients never hold it.
        let denied = TrustPolicy {
            client_distance: None,
            admin_distance: Some(u32::MAX),
            ..TrustPolicy::default()
        };
        assert!(!check(denied, &Principal::LocalClient));
        assert_eq!("none".parse(), Ok(AdminDistance(None)));
        assert_eq!("2".parse(), Ok(AdminDistance(Some(2))));
        assert!("x".parse::<AdminDistance>().is_err());
    }
}
