//! Trust distances on both sides of a permission check: the [`Requester`] (who asks, at what
//! distance, with which keys; resolved by [`crate::access::identity`]) and the [`FieldPolicy`] a schema's
//! field requires (evaluated by [`crate::access::permissions`]). Imports nothing of the crate, so
//! identity, schema, permissions and store can all use it without importing each other.

use std::collections::BTreeMap;

/// The requester as permission checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// For messages and history, e.g. "client:local" or "peer:12D3Koo…/client:alice".
    pub label: String,
    /// Trust distance; `None` when this node denies the requester altogether.
    pub distance: Option<u32>,
    /// Public keys the requester proved it holds (for explicit key policies).
    pub public_keys: Vec<String>,
    /// A key the requester proved to this node, to pass on when its request is forwarded
    /// ("sha256:<hex>" of a client certificate's public key).
    pub proven_key: Option<String>,
}

impl Requester {
    /// What this node tells another node about the requester when it forwards a request.
    pub fn to_wire(&self) -> Option<fold_proto::wire::Requester> {
        Some(fold_proto::wire::Requester {
            distance: self.distance?,
            identity: self.label.clone(),
            proven_key: self.proven_key.clone().unwrap_or_default(),
        })
    }
}

/// The trust distance a field policy requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustDistance {
    NoRequirement,
    Distance(u32),
}

/// A field's read and write policies.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldPolicy {
    pub read: TrustDistance,
    pub write: TrustDistance,
    /// Public keys admitted to read when the distance check fails (fold_db `counts_by_pub_key`;
    /// the counts are not consumed).
    pub explicit_read: Option<BTreeMap<String, u8>>,
    pub explicit_write: Option<BTreeMap<String, u8>>,
}
