//! Execution of one operation: here (on [`Data`]) or forwarded through the [`Link`] to the node
//! it names. Below routing ([`crate::routing::route`]), above the link; both the public API (through
//! [`crate::routing::pipeline`]) and routing run operations through it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fold_proto::wire::{forward_response, operation};

use crate::access::identity::Principal;
use crate::error::NodeError;
use crate::link::Link;
use crate::ops::data::Data;
use crate::replication::groups::{NOTHING_WRITTEN, WriteTarget};

/// The node an operation is addressed to (empty: this node, or no node named).
pub fn target_of(op: &operation::Kind) -> &str {
    match op {
        operation::Kind::Query(q) => &q.target_node_id,
        operation::Kind::History(h) => &h.target_node_id,
        operation::Kind::Mutate(m) => &m.target_node_id,
        operation::Kind::BatchMutate(b) => &b.target_node_id,
        operation::Kind::Changes(_) | operation::Kind::Peers(_) | operation::Kind::Raft(_) => "",
    }
}

/// The schema of a write (Mutate, BatchMutate).
fn group_write_schema(op: &operation::Kind) -> Option<String> {
    match op {
        operation::Kind::Mutate(m) => Some(m.schema.clone()),
        operation::Kind::BatchMutate(b) => Some(b.schema.clone()),
        _ => None,
    }
}

/// `op` addressed to node `target`.
fn with_target(mut op: operation::Kind, target: &str) -> operation::Kind {
    match &mut op {
        operation::Kind::Mutate(m) => m.target_node_id = target.to_string(),
        operation::Kind::BatchMutate(b) => b.target_node_id = target.to_string(),
        _ => {}
    }
    op
}

/// Runs operations here or on the node they name.
#[derive(Clone)]
pub struct Executor {
    data: Data,
    link: Arc<dyn Link>,
}

impl Executor {
    pub fn new(data: Data, link: Arc<dyn Link>) -> Self {
        Executor { data, link }
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    pub fn link(&self) -> &dyn Link {
        self.link.as_ref()
    }

    /// Run `op` on the node it names: here, or forwarded for `who` within `deadline`.
    pub async fn execute(
        &self,
        who: &Principal,
        op: operation::Kind,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        let target = target_of(&op);
        if self.link.is_local(target) {
            if let Some(schema) = group_write_schema(&op)
                && self.data.groups().get(&schema).is_some()
            {
                return self.group_write(who, &schema, op, deadline).await;
            }
            return self.local(who, op, None).await;
        }
        self.forward(who, target.to_string(), op, deadline).await
    }

    /// A client's write of a schema group this node is a member of: proposed here when this
    /// node leads, else forwarded to the leader (a signed forward carrying the requester, whose
    /// permissions the leader checks at path distance). While the group has no leader, or the
    /// leader moved, and the answer says nothing was written, it is tried again until the
    /// deadline.
    async fn group_write(
        &self,
        who: &Principal,
        schema: &str,
        op: operation::Kind,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        let budget = deadline.unwrap_or(self.link.forward_timeout());
        // Stop trying a margin before the caller gives up, so it hears why.
        let margin = (budget / 10).min(Duration::from_millis(300));
        let until = Instant::now() + budget.saturating_sub(margin);
        let mut pause = Duration::from_millis(50);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let attempt = match self.data.groups().write_target(schema) {
                Ok(WriteTarget::Here) => self.local(who, op.clone(), None).await,
                Ok(WriteTarget::Leader(leader)) => {
                    let op = with_target(op.clone(), &leader);
                    self.forward(who, leader, op, Some(left)).await
                }
                Err(e) => Err(e),
            };
            match attempt {
                Err(e)
                    if e.code() == tonic::Code::Unavailable
                        && e.message().contains(NOTHING_WRITTEN)
                        && left > pause =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(400));
                }
                r => return r,
            }
        }
    }

    /// Forward `op` to `target` for `who` (refused here when this node denies `who`).
    pub async fn forward(
        &self,
        who: &Principal,
        target: String,
        op: operation::Kind,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        let requester = self.data.forwardable_requester(who)?;
        self.link.forward(target, op, requester, deadline).await
    }

    /// Run another node's `op` here; a write of a schema group this node does not lead is
    /// passed on to the leader once (unless the leader is the node that sent it), with the
    /// requester at its path distance here.
    pub async fn local_or_leader(
        &self,
        who: &Principal,
        op: operation::Kind,
        deadline: Option<SystemTime>,
    ) -> Result<forward_response::Result, NodeError> {
        if let Some(schema) = group_write_schema(&op)
            && let Ok(WriteTarget::Leader(leader)) = self.data.groups().write_target(&schema)
            && !matches!(who, Principal::Forwarded(f) if f.node == leader)
        {
            let left = deadline.map(|d| {
                d.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            let op = with_target(op, &leader);
            return self.forward(who, leader, op, left).await;
        }
        self.local(who, op, deadline).await
    }

    /// Run `op` on this node; a mutation is refused once `deadline` (the origin's, for a request
    /// from another node) has passed. The answer names this node.
    pub async fn local(
        &self,
        who: &Principal,
        op: operation::Kind,
        deadline: Option<SystemTime>,
    ) -> Result<forward_response::Result, NodeError> {
        use forward_response::Result as R;
        let me = self.link.node_id_or_empty();
        let data = &self.data;
        Ok(match op {
            operation::Kind::Query(q) => R::Query(data.query(who, q).await.map(|mut r| {
                r.node_id = me;
                r
            })?),
            operation::Kind::History(h) => {
                R::History(data.history(who, h).await.map(|mut r| {
                    r.node_id = me;
                    r
                })?)
            }
            operation::Kind::Mutate(m) => {
                R::Mutate(data.mutate(who, m, deadline).await.map(|mut r| {
                    r.node_id = me;
                    r
                })?)
            }
            operation::Kind::BatchMutate(b) => {
                R::BatchMutate(data.batch_mutate(who, b).await.map(|mut r| {
                    r.node_id = me;
                    r
                })?)
            }
            operation::Kind::Changes(c) => R::Changes(data.changes(who, c, deadline).await?),
            operation::Kind::Peers(_) | operation::Kind::Raft(_) => {
                return Err(NodeError::internal(
                    "a peers or raft request is answered by the peer request service",
                ));
            }
        })
    }
}
