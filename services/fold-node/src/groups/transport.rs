//! Raft traffic of schema groups over the mesh: each message is a `raft` operation forwarded to
//! the member's node through the sidecars' signed, long-lived streams (the sidecar signs it with
//! this node's key; the receiver's sidecar verifies it and hands it to its node, which knows the
//! sender from the verified envelope). Member ids are derived from node ids ([`member_id`]); the
//! way back from an id to a node id is learned from the groups' memberships ([`Directory`]).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use fold_group::{GroupId, GroupTransport, NodeId, TransportError};
use fold_proto::wire::{RaftMessage, Requester, forward_response, operation};

use crate::error::NodeError;
use crate::link::Link;

/// A node's member id in every group: the first 8 bytes of SHA-256 of its node id (a PeerId),
/// so every member computes the same id for a node without asking it.
pub fn member_id(node_id: &str) -> NodeId {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(node_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Most node ids the directory keeps (members of all groups of this node; bounded because
/// inbound Raft traffic names senders).
const MAX_NODES: usize = 4096;

/// Member id → node id, for the members of this node's groups.
#[derive(Default, Clone)]
pub struct Directory(Arc<RwLock<HashMap<NodeId, String>>>);

impl Directory {
    /// Remember `node_id` (a member of one of this node's groups); returns its member id.
    pub fn learn(&self, node_id: &str) -> NodeId {
        let id = member_id(node_id);
        if let Ok(mut m) = self.0.write()
            && (m.len() < MAX_NODES || m.contains_key(&id))
        {
            m.insert(id, node_id.to_string());
        }
        id
    }

    /// The node id of member `id`, if known.
    pub fn node_of(&self, id: NodeId) -> Option<String> {
        self.0.read().ok().and_then(|m| m.get(&id).cloned())
    }
}

/// [`GroupTransport`] over the node's link to its sidecar.
pub struct MeshTransport {
    link: OnceLock<Arc<dyn Link>>,
    directory: Directory,
    timeout: Duration,
}

impl MeshTransport {
    pub fn new(directory: Directory, timeout: Duration) -> Self {
        MeshTransport {
            link: OnceLock::new(),
            directory,
            timeout,
        }
    }

    /// Connect the transport to the mesh (once, when the link exists).
    pub fn set_link(&self, link: Arc<dyn Link>) {
        let _ = self.link.set(link);
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    async fn call(
        &self,
        to: NodeId,
        group: &GroupId,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, NodeError> {
        let link = self
            .link
            .get()
            .ok_or_else(|| NodeError::unavailable("the mesh link is not up yet"))?;
        let node = self.directory.node_of(to).ok_or_else(|| {
            NodeError::unavailable(format!(
                "member {to} of group '{group}' has no known node id"
            ))
        })?;
        let op = operation::Kind::Raft(RaftMessage {
            group: group.as_str().to_string(),
            payload,
        });
        // Raft traffic is the node's own, not a client's.
        let requester = Requester {
            distance: 0,
            identity: "node".into(),
            proven_key: String::new(),
        };
        match link
            .forward(node.clone(), op, requester, Some(self.timeout))
            .await?
        {
            forward_response::Result::Raft(m) => Ok(m.payload),
            _ => Err(NodeError::internal(format!(
                "node {node} answered a raft message with a different kind of response"
            ))),
        }
    }
}

impl GroupTransport for MeshTransport {
    async fn send(
        &self,
        _from: NodeId,
        to: NodeId,
        group: &GroupId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        self.call(to, group, request)
            .await
            .map_err(|e| match e.code() {
                tonic::Code::DeadlineExceeded => TransportError::Timeout(to),
                _ => TransportError::Unreachable(to, e.message().to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_stable_and_the_directory_maps_them_back() {
        let a = "12D3KooWA";
        assert_eq!(member_id(a), member_id(a));
        assert_ne!(member_id(a), member_id("12D3KooWB"));
        let d = Directory::default();
        let id = d.learn(a);
        assert_eq!(d.node_of(id).as_deref(), Some(a));
        assert_eq!(d.node_of(id ^ 1), None);
    }
}
