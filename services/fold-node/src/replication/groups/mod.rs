//! Schema groups: one schema replicated on 3 or 5 member nodes with Raft (the `fold-group` crate,
//! openraft), so it stays writable while a majority of its members is up (docs/GROUPS.md).
//!
//! - [`Groups`] is this node's registry: the groups it is a member of, opened again at start
//!   (their log, vote and data live in the node's one redb file), founded by `CreateGroup`, or
//!   joined when the founding leader first sends Raft traffic for a schema this node approved.
//! - Writes ([`Groups::propose`]) are proposed on the leader; the data layer calls it instead of
//!   the group-commit writer for a group's schema. Which node proposes is decided by the
//!   executor ([`Groups::write_target`]): a member that is not the leader forwards the write.
//! - Reads are linearized ([`Groups::linearize`]) unless they ask for the local copy.
//! - [`machine`] applies the log to the schema's data; [`transport`] carries Raft over the mesh.

pub mod admin;
pub mod machine;
pub mod status;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fold_group::{Group, GroupConfig, GroupId, Node, NodeId, ReadError, WriteError};
use fold_proto::wire::RaftMessage;
use tracing::Instrument;

use crate::error::NodeError;
use crate::storage::commit::{Committed, JobError};
use crate::storage::hub::ChangeHub;
use crate::storage::store::{Idempotency, MutationPlan, Store};

pub use machine::SchemaMachine;
pub use transport::{Directory, MeshTransport, member_id};

/// One member of one group on this node.
pub type Member = Group<SchemaMachine, MeshTransport>;

/// Meta key listing the schemas this node is a group member of (JSON array).
const SAVED_KEY: &str = "groups";
/// Most groups one node is a member of.
pub const MAX_GROUPS: usize = 64;
/// Voters a group may have.
pub const MAX_MEMBERS: usize = 7;
/// Part of every refusal that proposed nothing: the origin of a forwarded write may try again.
pub const NOTHING_WRITTEN: &str = "nothing was written";

/// Settings of every group on this node (fold-node flags).
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub config: GroupConfig,
    /// How long applied idempotency keys are remembered (as for single-node writes).
    pub idempotency_window_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        let config = GroupConfig {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(400),
            election_timeout_max: Duration::from_millis(800),
            rpc_timeout: Duration::from_millis(1000),
            ..GroupConfig::default()
        };
        GroupSettings {
            config,
            idempotency_window_ms: 24 * 3600 * 1000,
        }
    }
}

/// Where a write of a schema is proposed.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteTarget {
    /// Not a group here, or this node leads it: write here.
    Here,
    /// Another member leads: forward the write to it.
    Leader(String),
}

/// The groups this node is a member of.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    hub: ChangeHub,
    settings: GroupSettings,
    transport: Arc<MeshTransport>,
    members: RwLock<HashMap<String, Arc<Member>>>,
    /// Serializes opening, founding and joining.
    lifecycle: tokio::sync::Mutex<()>,
}

fn group_id(schema: &str) -> Result<GroupId, NodeError> {
    GroupId::new(schema).map_err(|_| {
        NodeError::invalid_argument(format!(
            "'{schema}' cannot name a group (1-128 characters of A-Z a-z 0-9 . _ -)"
        ))
    })
}

impl Groups {
    pub fn new(store: Store, hub: ChangeHub, settings: GroupSettings) -> Self {
        let transport = Arc::new(MeshTransport::new(
            Directory::default(),
            settings.config.rpc_timeout,
        ));
        Groups {
            inner: Arc::new(Inner {
                store,
                hub,
                settings,
                transport,
                members: RwLock::new(HashMap::new()),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn transport(&self) -> &Arc<MeshTransport> {
        &self.inner.transport
    }

    pub fn settings(&self) -> &GroupSettings {
        &self.inner.settings
    }

    /// The member of `schema`'s group on this node, if it is one.
    pub fn get(&self, schema: &str) -> Option<Arc<Member>> {
        self.inner
            .members
            .read()
            .ok()
            .and_then(|m| m.get(schema).cloned())
    }

    /// Every group member on this node, by schema.
    pub fn all(&self) -> Vec<(String, Arc<Member>)> {
        let mut v: Vec<_> = self
            .inner
            .members
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn saved(&self) -> Result<BTreeSet<String>, NodeError> {
        let raw = self
            .inner
            .store
            .meta_get(SAVED_KEY)
            .map_err(NodeError::from)?;
        Ok(raw
            .and_then(|s| serde_json::from_str::<BTreeSet<String>>(&s).ok())
            .unwrap_or_default())
    }

    fn save(&self, schema: &str) -> Result<(), NodeError> {
        let mut saved = self.saved()?;
        if saved.insert(schema.to_string()) {
            let s =
                serde_json::to_string(&saved).map_err(|e| NodeError::internal(e.to_string()))?;
            self.inner
                .store
                .meta_set(SAVED_KEY, &s)
                .map_err(NodeError::from)?;
        }
        Ok(())
    }

    /// Open the member of `schema` (its state comes back from the database). Caller holds the
    /// lifecycle lock.
    async fn open(&self, me: &str, schema: &str) -> Result<Arc<Member>, NodeError> {
        if let Some(m) = self.get(schema) {
            return Ok(m);
        }
        if self.inner.members.read().map(|m| m.len()).unwrap_or(0) >= MAX_GROUPS {
            return Err(NodeError::resource_exhausted(format!(
                "this node is a member of {MAX_GROUPS} groups already"
            )));
        }
        let id = group_id(schema)?;
        let machine = Arc::new(SchemaMachine::new(
            schema,
            self.inner.store.clone(),
            self.inner.hub.clone(),
            self.inner.settings.idempotency_window_ms,
        ));
        let node_id = self.inner.transport.directory().learn(me);
        // The member's tasks live on after the request that opened it: their own root span.
        let span = tracing::info_span!(parent: None, "fold.group", schema);
        let member = Group::open(
            self.inner.store.database().clone(),
            id,
            node_id,
            self.inner.settings.config.clone(),
            machine,
            self.inner.transport.clone(),
        )
        .instrument(span)
        .await
        .map_err(|e| NodeError::internal(format!("opening group '{schema}': {e}")))?;
        let member = Arc::new(member);
        self.learn_members(&member);
        if let Ok(mut m) = self.inner.members.write() {
            m.insert(schema.to_string(), member.clone());
        }
        status::watch(
            schema,
            member.clone(),
            self.inner.transport.directory().clone(),
        );
        Ok(member)
    }

    /// Remember the node ids of `member`'s membership, so Raft traffic can reach them.
    fn learn_members(&self, member: &Member) {
        let m = member.metrics();
        for (_, node) in m.membership_config.membership().nodes() {
            self.inner.transport.directory().learn(&node.addr);
        }
    }

    /// Open every group this node was a member of (at start, once its node id is known).
    pub async fn open_saved(&self, me: &str) -> Result<usize, NodeError> {
        let _l = self.inner.lifecycle.lock().await;
        let saved = self.saved()?;
        for schema in &saved {
            self.open(me, schema).await?;
        }
        Ok(saved.len())
    }

    /// Found `schema`'s group with `members` (node ids, `me` among them) as its voters. The
    /// caller checked the admin right and every member's definition.
    pub async fn create(
        &self,
        me: &str,
        schema: &str,
        members: &[String],
    ) -> Result<Arc<Member>, NodeError> {
        let _l = self.inner.lifecycle.lock().await;
        if self.get(schema).is_some() || self.saved()?.contains(schema) {
            return Err(NodeError::already_exists(format!(
                "this node is already a member of a group for schema '{schema}'"
            )));
        }
        let member = self.open(me, schema).await?;
        self.save(schema)?;
        let voters: BTreeMap<NodeId, Node> = members
            .iter()
            .map(|n| {
                let id = self.inner.transport.directory().learn(n);
                (id, Node::new(n.clone()))
            })
            .collect();
        member.initialize(voters).await.map_err(|e| {
            NodeError::failed_precondition(format!("founding group '{schema}': {e}"))
        })?;
        Ok(member)
    }

    /// Serve a Raft message for `msg.group` from node `from` (authenticated by the sidecars).
    /// A group this node is not (yet) a member of is joined when its schema is approved here:
    /// approval is this node's owner's consent to serve it; the group's members decide the rest.
    ///
    /// Any member may lead and propose writes that every member applies, so each member
    /// accepts Raft traffic only from nodes it trusts to write the schema itself: `distance`
    /// (this node's trust in `from`) must pass every writable field's write policy.
    pub async fn handle_raft(
        &self,
        me: &str,
        from: &str,
        distance: u32,
        msg: RaftMessage,
    ) -> Result<RaftMessage, NodeError> {
        self.trusted_to_write(&msg.group, from, distance)?;
        let member = match self.get(&msg.group) {
            Some(m) => m,
            None => self.join(me, &msg.group).await?,
        };
        let from_id = self.inner.transport.directory().learn(from);
        let payload = member.handle_rpc(from_id, &msg.payload).await;
        Ok(RaftMessage {
            group: msg.group,
            payload,
        })
    }

    pub fn trusted_to_write(
        &self,
        schema: &str,
        from: &str,
        distance: u32,
    ) -> Result<(), NodeError> {
        let Some((s, _)) = self.inner.store.schema(schema) else {
            return Err(NodeError::failed_precondition(format!(
                "schema '{schema}' is not loaded on this node: it cannot be a member of its group"
            )));
        };
        let who = crate::model::distance::Requester {
            label: format!("peer:{from}"),
            distance: Some(distance),
            public_keys: Vec::new(),
            proven_key: None,
        };
        for field in s.fields.values().filter(|f| f.writable) {
            if let Err(e) = crate::access::permissions::check(
                field,
                crate::access::permissions::Access::Write,
                &who,
            ) {
                return Err(NodeError::permission_denied(format!(
                    "raft messages of group '{schema}' from node {from} refused: every member must be trusted here to write the schema ({e}); raise its trust with Network.SetTrust"
                )));
            }
        }
        Ok(())
    }

    async fn join(&self, me: &str, schema: &str) -> Result<Arc<Member>, NodeError> {
        let approved = self
            .inner
            .store
            .schema(schema)
            .is_some_and(|(_, st)| st == crate::storage::store::SchemaState::Approved);
        if !approved {
            return Err(NodeError::failed_precondition(format!(
                "schema '{schema}' is not approved on this node: it cannot be a member of its group"
            )));
        }
        let _l = self.inner.lifecycle.lock().await;
        let member = self.open(me, schema).await?;
        self.save(schema)?;
        tracing::info!(schema, "joined schema group");
        Ok(member)
    }

    /// Where a write of `schema` is proposed, seen from this node.
    pub fn write_target(&self, schema: &str) -> Result<WriteTarget, NodeError> {
        let Some(member) = self.get(schema) else {
            return Ok(WriteTarget::Here);
        };
        let m = member.metrics();
        match m.current_leader {
            Some(l) if l == member.node_id() => Ok(WriteTarget::Here),
            Some(l) => match self.inner.transport.directory().node_of(l) {
                Some(node) => Ok(WriteTarget::Leader(node)),
                None => Err(no_leader(schema, None)),
            },
            None => Err(no_leader(schema, None)),
        }
    }

    /// Propose validated mutations of `schema` (this node leads its group); answered once a
    /// majority made them durable and they were applied here.
    pub async fn propose(
        &self,
        member: &Member,
        schema: &str,
        plans: Vec<MutationPlan>,
        idempotency: Option<Idempotency>,
    ) -> Result<Committed, JobError> {
        let cmd = machine::WriteCommand {
            ms: crate::storage::store::now_ms(),
            plans,
            idempotency,
        };
        let bytes = serde_json::to_vec(&cmd).map_err(|e| JobError::Storage(e.to_string()))?;
        let started = Instant::now();
        let reply = member.write(bytes).await.map_err(|e| {
            let error = self.write_error(schema, e);
            JobError::Group {
                code: error.code(),
                message: error.message(),
            }
        })?;
        status::observe_proposal(schema, started);
        let outcome: machine::WriteOutcome =
            serde_json::from_slice(&reply).map_err(|e| JobError::Storage(e.to_string()))?;
        outcome.into_result()
    }

    fn node_name(&self, id: Option<NodeId>) -> Option<String> {
        id.and_then(|i| self.inner.transport.directory().node_of(i))
    }

    fn write_error(&self, schema: &str, e: WriteError) -> NodeError {
        let leader = self.node_name(e.leader());
        match e {
            WriteError::NotLeader { leader: Some(_) } => not_leader(schema, leader),
            WriteError::NotLeader { .. } | WriteError::NoQuorum { .. } => no_leader(schema, leader),
            WriteError::Refused(m) => NodeError::resource_exhausted(format!(
                "schema group '{schema}' refused the write: {m}; {NOTHING_WRITTEN}"
            )),
            WriteError::Timeout { .. } => NodeError::unavailable(format!(
                "schema group '{schema}': the write was proposed but not acknowledged in time (leader {}); it may or may not take effect",
                leader.as_deref().unwrap_or("unknown")
            )),
            WriteError::Unavailable(m) => NodeError::unavailable(format!(
                "schema group '{schema}': the member failed ({m}); the write may or may not take effect"
            )),
        }
    }

    /// Wait until this member has applied every write acknowledged before now (a linearizable
    /// read may then read the local copy).
    ///
    /// A leader confirms its leadership with one round of heartbeats, each allowed one
    /// heartbeat interval; on a loaded machine one round can miss, so a read asks again (for
    /// up to the read timeout) before it answers that there is no quorum.
    pub async fn linearize(&self, member: &Member, schema: &str) -> Result<(), NodeError> {
        let until = Instant::now() + self.inner.settings.config.read_timeout;
        let mut r = member.linearize().await;
        while matches!(r, Err(ReadError::NoQuorum { .. })) && Instant::now() < until {
            tokio::time::sleep(self.inner.settings.config.heartbeat_interval).await;
            r = member.linearize().await;
        }
        r.map_err(|e| match e {
            ReadError::NoQuorum { leader } => NodeError::unavailable(format!(
                "schema group '{schema}' has no quorum here for a linearizable read (last known leader: {}); read with consistency LOCAL for this member's copy",
                self.node_name(leader).as_deref().unwrap_or("none")
            )),
            ReadError::Unavailable(m) => {
                NodeError::unavailable(format!("schema group '{schema}': {m}"))
            }
        })
    }

    /// Add and remove voters of `schema`'s group (run on its leader): each added node first
    /// catches up as a learner, then the voters change in one joint-consensus step.
    pub async fn change_members(
        &self,
        schema: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Arc<Member>, NodeError> {
        let member = self.get(schema).ok_or_else(|| {
            NodeError::not_found(format!(
                "this node is not a member of a group for '{schema}'"
            ))
        })?;
        if let WriteTarget::Leader(l) = self.write_target(schema)? {
            return Err(NodeError::failed_precondition(format!(
                "this node is not the leader of group '{schema}': run the change on the leader {l}"
            )));
        }
        let dir = self.inner.transport.directory();
        for n in add {
            let id = dir.learn(n);
            member
                .add_learner(id, Node::new(n.clone()))
                .await
                .map_err(|e| self.write_error(schema, e))?;
        }
        let m = member.metrics();
        let mut voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        voters.extend(add.iter().map(|n| member_id(n)));
        for n in remove {
            voters.remove(&member_id(n));
        }
        if voters.is_empty() || voters.len() > MAX_MEMBERS {
            return Err(NodeError::invalid_argument(format!(
                "a group keeps 1 to {MAX_MEMBERS} voters; this change leaves {}",
                voters.len()
            )));
        }
        member
            .set_voters(voters)
            .await
            .map_err(|e| self.write_error(schema, e))?;
        Ok(member)
    }
}

/// The refusal of a member that knows another leader (a write that arrived here after the
/// leader moved).
fn not_leader(schema: &str, leader: Option<String>) -> NodeError {
    NodeError::unavailable(format!(
        "this member is not the leader of schema group '{schema}' (leader: {}); {NOTHING_WRITTEN}",
        leader.as_deref().unwrap_or("unknown")
    ))
}

/// The refusal of a member that cannot propose (no leader known, or a leader without quorum).
fn no_leader(schema: &str, leader: Option<String>) -> NodeError {
    NodeError::unavailable(format!(
        "schema group '{schema}' cannot take writes here now: no quorum reachable (last known leader: {}); {NOTHING_WRITTEN}",
        leader.as_deref().unwrap_or("none")
    ))
}
