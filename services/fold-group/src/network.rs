//! Raft RPCs as bytes over a pluggable transport (later: the sidecars' signed streams).
//!
//! The sending side is an openraft `RaftNetworkFactory` over any [`GroupTransport`]: each RPC
//! (vote, append entries, one snapshot chunk, read index) becomes one request and one reply of at
//! most [`MAX_RPC_BYTES`]. The receiving side is [`crate::Group::handle_rpc`], which checks the
//! sender is a member and hands the request to openraft.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    CheckIsLeaderError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, RaftMetrics};
use serde::{Deserialize, Serialize};

use crate::{GroupId, Node, NodeId, TypeConfig};

/// Largest request or reply accepted on the wire (bytes). Appends are bounded by
/// `GroupConfig::max_entries_per_append`, snapshot chunks by `GroupConfig::snapshot_chunk_bytes`.
pub const MAX_RPC_BYTES: usize = 8 * 1024 * 1024;

/// Why a message did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The target cannot be reached now (down, partitioned, no route).
    #[error("member {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// No answer in time.
    #[error("member {0} did not answer in time")]
    Timeout(NodeId),
}

/// Carries one request to one member of a group and brings back its reply, as bytes.
///
/// The transport authenticates the sender: the receiving side passes the sender's member id to
/// [`crate::Group::handle_rpc`] from what the link proved, not from the message.
pub trait GroupTransport: Send + Sync + 'static {
    /// Sends `request` from `from` to `to` for `group` and waits for the reply.
    fn send(
        &self,
        from: NodeId,
        to: NodeId,
        group: &GroupId,
        request: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;
}

/// A Raft request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Append entries / heartbeat from the leader.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// A candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot from the leader.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A member asks the leader for a read index (linearizable read on a follower).
    ReadIndex,
}

/// The leader's answer to a read-index request.
pub type ReadIndexResult =
    Result<Option<LogId<NodeId>>, RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>>;

/// A Raft reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpcReply {
    /// Reply to [`RaftRpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Reply to [`RaftRpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Reply to [`RaftRpc::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// Reply to [`RaftRpc::ReadIndex`]: the log id the reader must have applied.
    ReadIndex(ReadIndexResult),
    /// The receiver refused the message (not from a member, malformed, too large).
    Refused(String),
}

/// Entries put in one append-entries message, in encoded bytes (a single larger entry goes
/// alone). Small parts keep each message quick, and every part resets the follower's election
/// timer, so a long catch-up does not look like a dead leader.
pub const APPEND_PART_BYTES: usize = 1024 * 1024;

/// Splits an append-entries request whose entries would not fit one message into consecutive
/// requests (same vote and commit index, each starting after the previous part's last entry).
/// Every entry fits a message on its own: commands are bounded by
/// `GroupConfig::max_command_bytes`.
pub fn split_append(
    rpc: AppendEntriesRequest<TypeConfig>,
) -> Vec<AppendEntriesRequest<TypeConfig>> {
    let budget = APPEND_PART_BYTES;
    let sizes: Vec<usize> = rpc
        .entries
        .iter()
        .map(|e| serde_json::to_vec(e).map(|b| b.len()).unwrap_or(budget))
        .collect();
    if sizes.iter().sum::<usize>() <= budget {
        return vec![rpc];
    }
    let AppendEntriesRequest {
        vote,
        mut prev_log_id,
        leader_commit,
        entries,
    } = rpc;
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut used = 0usize;
    for (entry, size) in entries.into_iter().zip(sizes) {
        if !part.is_empty() && used + size > budget {
            let next_prev = part.last().map(|e: &openraft::Entry<TypeConfig>| e.log_id);
            parts.push(AppendEntriesRequest {
                vote,
                prev_log_id,
                leader_commit,
                entries: std::mem::take(&mut part),
            });
            prev_log_id = next_prev;
            used = 0;
        }
        used += size;
        part.push(entry);
    }
    parts.push(AppendEntriesRequest {
        vote,
        prev_log_id,
        leader_commit,
        entries: part,
    });
    parts
}

/// Encodes a wire message; `None` when it would exceed [`MAX_RPC_BYTES`].
pub fn encode<T: Serialize>(msg: &T) -> Option<Vec<u8>> {
    serde_json::to_vec(msg)
        .ok()
        .filter(|b| b.len() <= MAX_RPC_BYTES)
}

/// Decodes a wire message of at most [`MAX_RPC_BYTES`].
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_RPC_BYTES {
        return Err(format!(
            "message of {} bytes over the {MAX_RPC_BYTES} byte limit",
            bytes.len()
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("malformed message: {e}"))
}

/// When each member last answered this one (any decoded reply counts): lets a leader tell it
/// has lost its majority without waiting on a proposal. Bounded by the membership (one entry per
/// member this member ever sent to).
#[derive(Clone, Default)]
pub struct Contacts(Arc<Mutex<HashMap<NodeId, Instant>>>);

impl Contacts {
    fn record(&self, member: NodeId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member, Instant::now());
    }

    /// Whether `member` answered within `window`.
    pub fn answered_within(&self, member: NodeId, window: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&member)
            .is_some_and(|t| t.elapsed() <= window)
    }

    /// Whether `me` plus the members that answered within `window` form a majority of every
    /// configuration in `metrics`' membership (both halves of a joint one).
    pub fn has_recent_quorum(
        &self,
        me: NodeId,
        metrics: &RaftMetrics<NodeId, Node>,
        window: Duration,
    ) -> bool {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |id: &NodeId| *id == me || seen.get(id).is_some_and(|t| t.elapsed() <= window);
        metrics
            .membership_config
            .membership()
            .get_joint_config()
            .iter()
            .all(|voters| voters.iter().filter(|id| fresh(id)).count() * 2 > voters.len())
    }
}

/// openraft's network factory for one member of one group over a [`GroupTransport`].
pub struct GroupNetwork<T> {
    transport: Arc<T>,
    group: GroupId,
    from: NodeId,
    contacts: Contacts,
}

impl<T> GroupNetwork<T> {
    /// The network of member `from` of `group`, noting in `contacts` who answers.
    pub fn new(transport: Arc<T>, group: GroupId, from: NodeId, contacts: Contacts) -> Self {
        Self {
            transport,
            group,
            from,
            contacts,
        }
    }
}

impl<T: GroupTransport> RaftNetworkFactory<TypeConfig> for GroupNetwork<T> {
    type Network = GroupConnection<T>;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> Self::Network {
        GroupConnection {
            transport: self.transport.clone(),
            group: self.group.clone(),
            from: self.from,
            target,
            contacts: self.contacts.clone(),
        }
    }
}

/// openraft's connection from one member to another.
pub struct GroupConnection<T> {
    transport: Arc<T>,
    group: GroupId,
    from: NodeId,
    target: NodeId,
    contacts: Contacts,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

/// Sends one request to `target` over `transport` and decodes the reply (shared by openraft's
/// connection and [`crate::Group`]'s read-index request).
pub(crate) async fn call<T: GroupTransport>(
    transport: &T,
    group: &GroupId,
    from: NodeId,
    target: NodeId,
    rpc: &RaftRpc,
    ttl: std::time::Duration,
) -> Result<RaftRpcReply, TransportError> {
    let bytes = encode(rpc)
        .ok_or_else(|| TransportError::Unreachable(target, "request over the size limit".into()))?;
    let reply = tokio::time::timeout(ttl, transport.send(from, target, group, bytes))
        .await
        .map_err(|_| TransportError::Timeout(target))??;
    match decode::<RaftRpcReply>(&reply) {
        Ok(RaftRpcReply::Refused(why)) => Err(TransportError::Unreachable(
            target,
            format!("refused: {why}"),
        )),
        Ok(reply) => Ok(reply),
        Err(e) => Err(TransportError::Unreachable(target, e)),
    }
}

impl<T: GroupTransport> GroupConnection<T> {
    async fn request<E: std::error::Error>(
        &self,
        rpc: RaftRpc,
        option: &RPCOption,
    ) -> Result<RaftRpcReply, RPCError<NodeId, Node, E>> {
        let reply = call(
            &*self.transport,
            &self.group,
            self.from,
            self.target,
            &rpc,
            option.hard_ttl(),
        )
        .await;
        if reply.is_ok() {
            self.contacts.record(self.target);
        }
        reply.map_err(|e| match e {
            TransportError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
            TransportError::Timeout(..) => RPCError::Network(NetworkError::new(&e)),
        })
    }

    fn unexpected<E: std::error::Error>(&self, reply: &RaftRpcReply) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::new(&WireError(format!(
            "unexpected reply from {}: {reply:?}",
            self.target
        ))))
    }
}

impl<T: GroupTransport> RaftNetwork<TypeConfig> for GroupConnection<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        // A batch too large for one message: send its first part only and answer
        // `PartialSuccess` up to that part's last entry; openraft sends the rest next (each call
        // must finish within one heartbeat interval, so a long catch-up goes in short calls).
        let mut parts = split_append(rpc);
        let more = parts.len() > 1;
        parts.truncate(1);
        let Some(first) = parts.pop() else {
            return Err(self.unexpected(&RaftRpcReply::Refused("empty append".into())));
        };
        let sent_up_to = first.entries.last().map(|e| e.log_id);
        let response = match self.request(RaftRpc::AppendEntries(first), &option).await? {
            RaftRpcReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?
            }
            other => return Err(self.unexpected(&other)),
        };
        Ok(match response {
            AppendEntriesResponse::Success if more => {
                AppendEntriesResponse::PartialSuccess(sent_up_to)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.request(RaftRpc::InstallSnapshot(rpc), &option).await? {
            RaftRpcReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.request(RaftRpc::Vote(rpc), &option).await? {
            RaftRpcReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;
    use crate::Command;

    fn entry(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command(vec![7; bytes])),
        }
    }

    #[test]
    fn large_appends_are_split_into_consecutive_parts() {
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
        let commit = Some(LogId::new(CommittedLeaderId::new(1, 1), 12));
        let rpc = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev,
            leader_commit: commit,
            entries: (10..22).map(|i| entry(i, 1 << 20)).collect(),
        };
        let parts = split_append(rpc);
        assert!(parts.len() > 1, "12 MiB of commands fit no single message");
        let mut expect_prev = prev;
        let mut next_index = 10;
        for part in &parts {
            assert_eq!(part.prev_log_id, expect_prev);
            assert_eq!(part.leader_commit, commit);
            assert!(
                encode(&RaftRpc::AppendEntries(part.clone())).is_some(),
                "a part over the limit"
            );
            for e in &part.entries {
                assert_eq!(e.log_id.index, next_index);
                next_index += 1;
            }
            expect_prev = part.entries.last().map(|e| e.log_id);
        }
        assert_eq!(next_index, 22);

        let small = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev,
            leader_commit: commit,
            entries: vec![entry(10, 100)],
        };
        assert_eq!(split_append(small).len(), 1);
    }
}
