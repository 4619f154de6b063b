//! One member of one group: open from the store, write, linearizable read, serve Raft RPCs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::storage::Adaptor;
use openraft::{LogId, RaftMetrics, ServerState};
use redb::{Database, ReadTransaction, ReadableDatabase as _};

use crate::network::{self, Contacts, GroupNetwork, RaftRpc, RaftRpcReply};
use crate::store::GroupStore;
use crate::{
    Command, GroupConfig, GroupId, GroupStateMachine, GroupTransport, Node, NodeId, Raft, SmError,
    TransportError,
};

/// Opening or managing a group failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid group id")]
    InvalidGroupId,
    /// The configuration is inconsistent.
    #[error("invalid group config: {0}")]
    Config(String),
    /// openraft refused or failed.
    #[error("raft: {0}")]
    Raft(String),
}

/// A write was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This member is not the leader; nothing was proposed. Send the write to `leader`.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader this member last knew.
        leader: Option<NodeId>,
    },
    /// This member leads but has not heard from a quorum lately (it is on a minority side);
    /// nothing was proposed.
    #[error("no quorum; last known leader {leader:?}")]
    NoQuorum {
        /// The leader this member last knew (itself).
        leader: Option<NodeId>,
    },
    /// Proposed but not known to be committed in time: it may or may not take effect.
    #[error("not acknowledged in time; leader {leader:?}")]
    Timeout {
        /// The leader this member last knew.
        leader: Option<NodeId>,
    },
    /// The member is stopping or failed; the write may or may not take effect.
    #[error("member unavailable: {0}")]
    Unavailable(String),
    /// Refused before proposing: a command over the size limit, or a membership change the
    /// leader rejects (no members left, promoting a non-learner).
    #[error("refused: {0}")]
    Refused(String),
}

impl WriteError {
    /// Whether the write may still take effect (the caller cannot tell without reading).
    pub fn is_indeterminate(&self) -> bool {
        matches!(
            self,
            WriteError::Timeout { .. } | WriteError::Unavailable(_)
        )
    }

    /// The leader this member last knew, if it named one.
    pub fn leader(&self) -> Option<NodeId> {
        match self {
            WriteError::NotLeader { leader }
            | WriteError::NoQuorum { leader }
            | WriteError::Timeout { leader } => *leader,
            WriteError::Unavailable(_) | WriteError::Refused(_) => None,
        }
    }
}

/// A linearizable read could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No leader could confirm its leadership with a quorum in time.
    #[error("no quorum; last known leader {leader:?}")]
    NoQuorum {
        /// The leader this member last knew.
        leader: Option<NodeId>,
    },
    /// The member is stopping or failed, or the state could not be read.
    #[error("member unavailable: {0}")]
    Unavailable(String),
}

/// A member's view of its group, for status pages and checks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This member.
    pub node_id: NodeId,
    /// `Leader`, `Follower`, `Candidate`, `Learner` or `Shutdown`.
    pub state: String,
    /// The leader this member knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Index of the last entry in this member's log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied to the state machine.
    pub applied_index: Option<u64>,
    /// Index covered by this member's current snapshot.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was compacted away.
    pub purged_index: Option<u64>,
    /// Voting members (both halves during a joint change).
    pub voters: Vec<NodeId>,
    /// Non-voting members catching up.
    pub learners: Vec<NodeId>,
    /// On the leader: each member's replication lag in entries (absent for a member that has
    /// not answered within two election timeouts).
    pub lag: Option<BTreeMap<NodeId, u64>>,
    /// Whether this member can currently reach a quorum (a leader heard from a majority lately,
    /// a follower knows a leader).
    pub has_quorum: bool,
    /// Raft messages refused (from non-members, malformed, over limits).
    pub refused_messages: u64,
}

/// One member of one group.
pub struct Group<S, T> {
    id: GroupId,
    node_id: NodeId,
    config: GroupConfig,
    raft: Raft,
    store: GroupStore<S>,
    transport: Arc<T>,
    contacts: Contacts,
    refused: AtomicU64,
}

impl<S: GroupStateMachine, T: GroupTransport> Group<S, T> {
    /// Opens member `node_id` of group `id` from `db` (creating nothing until Raft writes).
    /// Reopening after a crash finds the vote, log and applied state again.
    pub async fn open(
        db: Arc<Database>,
        id: GroupId,
        node_id: NodeId,
        config: GroupConfig,
        sm: Arc<S>,
        transport: Arc<T>,
    ) -> Result<Self, GroupError> {
        let raft_config = config.to_raft_config(id.as_str())?;
        let store = GroupStore::new(db, &id, sm);
        let (log_store, state_machine) = Adaptor::new(store.clone());
        let contacts = Contacts::default();
        let network = GroupNetwork::new(transport.clone(), id.clone(), node_id, contacts.clone());
        let raft = Raft::new(node_id, raft_config, network, log_store, state_machine)
            .await
            .map_err(|e| GroupError::Raft(e.to_string()))?;
        Ok(Self {
            id,
            node_id,
            config,
            raft,
            store,
            transport,
            contacts,
            refused: AtomicU64::new(0),
        })
    }

    /// Makes this member found the group with `members` as its voters (once, on one member).
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), GroupError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| GroupError::Raft(e.to_string()))
    }

    /// The group's id.
    pub fn id(&self) -> &GroupId {
        &self.id
    }

    /// This member's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The openraft handle (membership changes, metrics, triggers).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The storage (database, state machine).
    pub fn store(&self) -> &GroupStore<S> {
        &self.store
    }

    /// The latest Raft metrics (leader, term, log, applied, membership, replication lag).
    pub fn metrics(&self) -> RaftMetrics<NodeId, Node> {
        self.raft.metrics().borrow().clone()
    }

    /// What `Network.Status` and `foldctl check` will show for this group, as seen by this member.
    pub fn status(&self) -> GroupStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let last_log_index = m.last_log_index;
        // Lag is known on the leader only: how far each member's matched log is behind ours. A
        // member that has not answered within two election timeouts has no known lag (it may be
        // down): its last one would make it look well.
        let window = self.config.election_timeout_max * 2;
        let lag = m.replication.as_ref().map(|r| {
            r.iter()
                .filter(|(id, _)| {
                    **id == self.node_id || self.contacts.answered_within(**id, window)
                })
                .map(|(id, matched)| {
                    let matched = matched.map(|l| l.index);
                    let lag = last_log_index
                        .unwrap_or(0)
                        .saturating_sub(matched.unwrap_or(0));
                    (*id, lag)
                })
                .collect()
        });
        let has_quorum = match m.state {
            ServerState::Leader => self.contacts.has_recent_quorum(
                self.node_id,
                &m,
                self.config.election_timeout_max * 2,
            ),
            _ => m.current_leader.is_some(),
        };
        GroupStatus {
            group: self.id.clone(),
            node_id: self.node_id,
            state: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters,
            learners,
            lag,
            has_quorum,
            refused_messages: self.refused_count(),
        }
    }

    /// Messages refused because the sender is not a member of the group (or was malformed).
    pub fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Proposes `command`; returns the state machine's reply once a majority has made it durable
    /// and it has been applied here. Only the leader proposes; other members answer
    /// [`WriteError::NotLeader`], a leader cut off from its quorum answers
    /// [`WriteError::NoQuorum`] without proposing.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, WriteError> {
        if command.len() > self.config.max_command_bytes {
            return Err(WriteError::Refused(format!(
                "command of {} bytes over the {} byte limit",
                command.len(),
                self.config.max_command_bytes
            )));
        }
        let m = self.metrics();
        if m.state != ServerState::Leader {
            return Err(WriteError::NotLeader {
                leader: m.current_leader,
            });
        }
        // A leader that has not heard from a majority for a while is most likely on a minority
        // side: refuse rather than propose what it cannot commit.
        if !self
            .contacts
            .has_recent_quorum(self.node_id, &m, self.config.election_timeout_max * 2)
        {
            return Err(WriteError::NoQuorum {
                leader: m.current_leader,
            });
        }
        match tokio::time::timeout(
            self.config.write_timeout,
            self.raft.client_write(Command(command)),
        )
        .await
        {
            Err(_) => Err(WriteError::Timeout {
                leader: self.metrics().current_leader,
            }),
            Ok(Ok(resp)) => Ok(resp.data.0),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(WriteError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(e)) => Err(WriteError::Unavailable(e.to_string())),
        }
    }

    /// Adds member `id` at `node` as a learner and waits until it has caught up with the log
    /// (run on the leader; then [`Group::set_voters`] can promote it).
    pub async fn add_learner(&self, id: NodeId, node: Node) -> Result<(), WriteError> {
        self.change_membership(|raft| {
            let node = node.clone();
            async move { raft.add_learner(id, node, true).await }
        })
        .await
    }

    /// Makes `voters` the group's voters through joint consensus (run on the leader); members
    /// left out are removed altogether. New voters must have been added as learners first.
    pub async fn set_voters(
        &self,
        voters: std::collections::BTreeSet<NodeId>,
    ) -> Result<(), WriteError> {
        self.change_membership(|raft| {
            let voters = voters.clone();
            async move { raft.change_membership(voters, false).await }
        })
        .await
    }

    /// Runs one membership change, retried while an earlier one (or the leader's first commit
    /// of its term) is still in progress, bounded by the write timeout.
    async fn change_membership<F, Fut>(&self, change: F) -> Result<(), WriteError>
    where
        F: Fn(Raft) -> Fut,
        Fut: std::future::Future<
                Output = Result<
                    openraft::raft::ClientWriteResponse<crate::TypeConfig>,
                    RaftError<NodeId, ClientWriteError<NodeId, Node>>,
                >,
            >,
    {
        let start = tokio::time::Instant::now();
        loop {
            let left = self.config.write_timeout.saturating_sub(start.elapsed());
            let result = tokio::time::timeout(left, change(self.raft.clone())).await;
            match result {
                Err(_) => {
                    return Err(WriteError::Timeout {
                        leader: self.metrics().current_leader,
                    });
                }
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    return Err(WriteError::NotLeader {
                        leader: f.leader_id,
                    });
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                )))) if start.elapsed() < self.config.write_timeout => {
                    tokio::time::sleep(self.config.heartbeat_interval).await;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                    return Err(WriteError::Refused(e.to_string()));
                }
                Ok(Err(e)) => return Err(WriteError::Unavailable(e.to_string())),
            }
        }
    }

    /// A linearizable read on any member: the leader confirms its leadership with a quorum and
    /// names a read index (asked over the transport when this member is not the leader), this
    /// member waits until it has applied that index, then `read` runs on its local state.
    pub async fn read<R, F>(&self, read: F) -> Result<R, ReadError>
    where
        R: Send + 'static,
        F: FnOnce(&S, &ReadTransaction) -> Result<R, SmError> + Send + 'static,
    {
        self.linearize().await?;
        self.read_local(read).await
    }

    /// Waits until this member has applied every write acknowledged before the call began (the
    /// leader confirms its leadership with a quorum and names a read index; this member waits
    /// until it applied it): a read of the local state after it is linearizable.
    pub async fn linearize(&self) -> Result<(), ReadError> {
        let deadline = self.config.read_timeout;
        let index = tokio::time::timeout(deadline, self.read_index())
            .await
            .map_err(|_| ReadError::NoQuorum {
                leader: self.metrics().current_leader,
            })??;
        self.raft
            .wait(Some(deadline))
            .applied_index_at_least(index.map(|l| l.index), "linearizable read")
            .await
            .map_err(|e| ReadError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Reads this member's applied state as it is, without asking the leader (may be stale).
    pub async fn read_local<R, F>(&self, read: F) -> Result<R, ReadError>
    where
        R: Send + 'static,
        F: FnOnce(&S, &ReadTransaction) -> Result<R, SmError> + Send + 'static,
    {
        let db = self.store.database().clone();
        let sm = self.store.state_machine().clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            read(&sm, &txn).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| ReadError::Unavailable(e.to_string()))?
        .map_err(ReadError::Unavailable)
    }

    async fn read_index(&self) -> Result<Option<LogId<NodeId>>, ReadError> {
        let leader = self.metrics().current_leader;
        let no_quorum = ReadError::NoQuorum { leader };
        let result = match leader {
            None => return Err(no_quorum),
            Some(l) if l == self.node_id => self
                .raft
                .get_read_log_id()
                .await
                .map(|(read, _applied)| read),
            Some(l) => {
                match network::call(
                    &*self.transport,
                    &self.id,
                    self.node_id,
                    l,
                    &RaftRpc::ReadIndex,
                    self.config.read_timeout,
                )
                .await
                {
                    Ok(RaftRpcReply::ReadIndex(r)) => r,
                    Ok(_) | Err(TransportError::Unreachable(..) | TransportError::Timeout(_)) => {
                        return Err(no_quorum);
                    }
                }
            }
        };
        result.map_err(|e| match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => ReadError::NoQuorum {
                leader: f.leader_id,
            },
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => no_quorum,
            RaftError::Fatal(f) => ReadError::Unavailable(f.to_string()),
        })
    }

    /// Serves one Raft request from member `from` (as authenticated by the transport) and
    /// returns the encoded reply. Requests from outside the group's membership are refused and
    /// counted (a member that has not joined any membership yet accepts its first leader).
    pub async fn handle_rpc(&self, from: NodeId, request: &[u8]) -> Vec<u8> {
        let reply = self.serve(from, request).await;
        if matches!(reply, RaftRpcReply::Refused(_)) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        network::encode(&reply).unwrap_or_else(|| {
            network::encode(&RaftRpcReply::Refused("reply over the size limit".into()))
                .unwrap_or_default()
        })
    }

    async fn serve(&self, from: NodeId, request: &[u8]) -> RaftRpcReply {
        let known = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            membership.nodes().next().is_none() || membership.get_node(&from).is_some()
        };
        if !known {
            tracing::warn!(group = %self.id, from, "refused a raft message from a non-member");
            return RaftRpcReply::Refused(format!("{from} is not a member of group {}", self.id));
        }
        let rpc = match network::decode::<RaftRpc>(request) {
            Ok(rpc) => rpc,
            Err(e) => return RaftRpcReply::Refused(e),
        };
        match rpc {
            RaftRpc::AppendEntries(req) => {
                RaftRpcReply::AppendEntries(self.raft.append_entries(req).await)
            }
            RaftRpc::Vote(req) => RaftRpcReply::Vote(self.raft.vote(req).await),
            RaftRpc::InstallSnapshot(req) => {
                let end = req
                    .offset
                    .saturating_add(u64::try_from(req.data.len()).unwrap_or(u64::MAX));
                if end > self.config.max_snapshot_bytes {
                    return RaftRpcReply::Refused(format!(
                        "snapshot over the {} byte limit",
                        self.config.max_snapshot_bytes
                    ));
                }
                RaftRpcReply::InstallSnapshot(self.raft.install_snapshot(req).await)
            }
            RaftRpc::ReadIndex => RaftRpcReply::ReadIndex(
                self.raft
                    .get_read_log_id()
                    .await
                    .map(|(read, _applied)| read),
            ),
        }
    }

    /// Stops this member's Raft tasks (the store stays as it is on disk).
    pub async fn shutdown(&self) -> Result<(), GroupError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| GroupError::Raft(e.to_string()))
    }

    /// Time allowed for one RPC (from the config).
    pub fn rpc_timeout(&self) -> Duration {
        self.config.rpc_timeout
    }
}
