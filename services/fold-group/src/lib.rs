//! fold-group: schema groups replicated with Raft (openraft 0.9.25), stored in redb.
//!
//! A *group* is one Raft cluster of 3 or 5 member nodes that replicates one schema. This crate is
//! the foundation the node wires in later:
//! - [`store::GroupStore`]: the Raft log, vote, committed/purged ids, applied state and the
//!   current snapshot in a caller-owned [`redb::Database`], namespaced by [`GroupId`], so many
//!   groups share the node's one data file. Votes and appends are fsynced before they return.
//! - [`GroupStateMachine`]: the small trait the node implements (apply a batch of opaque commands
//!   inside the store's redb transaction, build a snapshot as bytes, install one).
//!   [`kv::KvStateMachine`] is a real redb-backed key-value implementation used by the tests.
//! - [`network`]: Raft RPCs encoded as bytes over any [`GroupTransport`] (later: the sidecars'
//!   signed streams); [`Group::handle_rpc`] is the receiving side. Snapshots travel in chunks.
//! - [`Group`]: one member of one group: open/initialize, `write` (acknowledged after commit and
//!   apply), linearizable `read` on any member (read index from the leader), membership changes.

pub mod config;
pub mod group;
pub mod kv;
#[cfg(feature = "test-support")]
pub mod linearizability;
pub mod network;
pub mod state_machine;
pub mod store;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use config::GroupConfig;
pub use group::{Group, GroupError, GroupStatus, ReadError, WriteError};
pub use network::{GroupTransport, TransportError};
pub use state_machine::{GroupStateMachine, SmError};

/// A member's id inside a group (the node maps its peer identity to one).
pub type NodeId = u64;

/// A member's address as carried in the membership config (later: the sidecar peer id).
pub type Node = openraft::BasicNode;

/// One opaque command proposed to a group; the state machine gives it meaning.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Command(pub Vec<u8>);

/// The state machine's answer to one applied command (empty for blank and membership entries).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Reply(pub Vec<u8>);

macro_rules! hex_bytes_serde {
    ($t:ident) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex_encode(&self.0))
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                hex_decode(&s)
                    .map($t)
                    .ok_or_else(|| serde::de::Error::custom("invalid hex bytes"))
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({} bytes)", stringify!($t), self.0.len())
            }
        }
    };
}
hex_bytes_serde!(Command);
hex_bytes_serde!(Reply);

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

openraft::declare_raft_types!(
    /// The openraft type configuration of every group: opaque commands and replies, u64 member
    /// ids, snapshots as in-memory byte buffers (sent in chunks by openraft).
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of one group member.
pub type Raft = openraft::Raft<TypeConfig>;

/// Longest group id accepted (it is part of redb table names and wire messages).
pub const MAX_GROUP_ID_LEN: usize = 128;

/// A group's id: 1..=128 characters of `[A-Za-z0-9._-]` (e.g. a schema name or hash).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId(String);

impl GroupId {
    /// Checks and wraps a group id.
    pub fn new(id: impl Into<String>) -> Result<Self, GroupError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= MAX_GROUP_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(id))
        } else {
            Err(GroupError::InvalidGroupId)
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn group_ids_are_checked() {
        assert!(GroupId::new("schema.people-v1_2").is_ok());
        assert!(GroupId::new("").is_err());
        assert!(GroupId::new("a/b").is_err());
        assert!(GroupId::new("x".repeat(MAX_GROUP_ID_LEN + 1)).is_err());
    }
}
