//! Replicas: this node follows a schema of another node (`--follow SCHEMA@NODE_ID`) and keeps a
//! local, read-only copy of its data, version for version.
//!
//! Transport: the forward protocol is request/response, so following is a loop of forwarded
//! `changes` operations (wire.proto `ChangesRequest`): "the changes of SCHEMA after sequence N",
//! answered with up to 500 changes, or, when there is nothing new, after a bounded wait for the
//! next change on the source (a long poll, woken by the source's live change hub). Live changes
//! therefore arrive about as soon as they are committed, without a streaming protocol.
//!
//! Applying: each answer is applied in one redb write transaction ([`WriteGroup::
//! apply_replicated`]): the versions exactly as the source wrote them (same ids, values, times,
//! writers) under the source's sequence numbers. The replica's cursor is its own change log head
//! for the schema, so it is persisted in the same transaction as the changes it covers. A change
//! at or below the head was applied already and is skipped (idempotent); one beyond head + 1
//! (a gap) stops the batch, so the cursor only moves across contiguous sequences and never past
//! a change that failed to apply. After a restart of either side, the loop asks again from the
//! durable head.
//!
//! Writes to a followed schema on the replica are refused (FAILED_PRECONDITION naming the
//! owner), never forwarded: the client chooses to write to the owner (`target_node_id`).
//!
//! The source applies its trust in this node (path distance, as for any forwarded request, this
//! node asking for itself at distance 0): every field must be readable to it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_proto::v1::{Change, MutationType, ReplicaStatus};
use fold_proto::wire::ChangesRequest;
use serde_json::Value as Json;
use tonic::Status;

use crate::mesh::{MeshLink, valid_node_id};
use crate::schema::Schema;
use crate::store::{ChangeEvent, MutationKind, SchemaState, Store, StoreError, VersionRecord};
use crate::subscribe::ChangeHub;

/// Most schemas one node may follow.
pub const MAX_FOLLOWED: usize = 64;
/// Changes asked for per request.
const PAGE: u32 = 1000;
/// How long the source may wait for a new change before answering with none.
const WAIT_MS: u32 = 2000;
/// The deadline of one request (above the wait, below the forward timeout's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest pause between attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest error message kept for the status.
const MAX_ERROR_BYTES: usize = 1024;
/// Longest id accepted from the source (version ids are UUIDs).
const MAX_ID_BYTES: usize = 64;

/// `SCHEMA@NODE_ID`, the value of `--follow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowSpec {
    pub schema: String,
    pub source: String,
}

impl std::str::FromStr for FollowSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((schema, source)) = s.rsplit_once('@') else {
            return Err(format!("'{s}' is not SCHEMA@NODE_ID"));
        };
        if schema.is_empty() || schema.len() > 256 {
            return Err(format!("'{s}': the schema name must be 1 to 256 bytes"));
        }
        if !valid_node_id(source) {
            return Err(format!(
                "'{s}': '{source}' is not a node id (a base58 PeerId such as 12D3KooW…)"
            ));
        }
        Ok(FollowSpec {
            schema: schema.to_string(),
            source: source.to_string(),
        })
    }
}

#[derive(Debug, Clone, Default)]
struct State {
    source: String,
    applied: u64,
    source_head: u64,
    last_contact_ms: u64,
    last_error: String,
}

/// The schemas this node follows and how far each has come. Cheap to clone.
#[derive(Clone, Default)]
pub struct Replicas {
    inner: Arc<RwLock<BTreeMap<String, State>>>,
}

impl Replicas {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, State>> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, State>> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The node whose schema `schema` is a replica of, if this node follows it.
    pub fn source_of(&self, schema: &str) -> Option<String> {
        self.read().get(schema).map(|s| s.source.clone())
    }

    /// Each followed schema's progress, for Network.Status.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.read()
            .iter()
            .map(|(schema, s)| ReplicaStatus {
                schema: schema.clone(),
                source_node_id: s.source.clone(),
                applied_sequence: s.applied,
                source_head_sequence: s.source_head,
                lag: s.source_head.saturating_sub(s.applied),
                last_contact_unix_ms: s.last_contact_ms,
                last_error: s.last_error.clone(),
            })
            .collect()
    }

    fn update(&self, schema: &str, f: impl FnOnce(&mut State)) {
        if let Some(s) = self.write().get_mut(schema) {
            f(s);
        }
    }

    fn fail(&self, schema: &str, error: String) {
        let mut e = error;
        if e.len() > MAX_ERROR_BYTES {
            let mut end = MAX_ERROR_BYTES;
            while !e.is_char_boundary(end) {
                end -= 1;
            }
            e.truncate(end);
        }
        self.update(schema, |s| s.last_error = e);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Register the followed schemas (refusing writes to them from now on) and start one follower
/// task for each.
pub fn start(
    specs: &[FollowSpec],
    replicas: &Replicas,
    store: Store,
    hub: ChangeHub,
    mesh: MeshLink,
    metrics: Arc<crate::metrics::NodeMetrics>,
) -> Result<(), String> {
    if specs.len() > MAX_FOLLOWED {
        return Err(format!(
            "--follow names {} schemas; at most {MAX_FOLLOWED}",
            specs.len()
        ));
    }
    {
        let mut map = replicas.write();
        for s in specs {
            if map.contains_key(&s.schema) {
                return Err(format!("--follow names schema '{}' twice", s.schema));
            }
            let applied = store.log_bounds(&s.schema).map_err(|e| e.to_string())?.head;
            map.insert(
                s.schema.clone(),
                State {
                    source: s.source.clone(),
                    applied,
                    ..State::default()
                },
            );
        }
    }
    for s in specs {
        let f = Follower {
            schema: s.schema.clone(),
            source: s.source.clone(),
            replicas: replicas.clone(),
            store: store.clone(),
            hub: hub.clone(),
            mesh: mesh.clone(),
            metrics: metrics.clone(),
            verified: false,
        };
        tokio::spawn(async move { f.run().await });
    }
    Ok(())
}

struct Follower {
    schema: String,
    source: String,
    replicas: Replicas,
    store: Store,
    hub: ChangeHub,
    mesh: MeshLink,
    metrics: Arc<crate::metrics::NodeMetrics>,
    /// Whether the local head was checked against the source since this process started.
    verified: bool,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.step().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(schema = %self.schema, source = %self.source, error = %e, "following failed; retrying");
                    self.replicas.fail(&self.schema, e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One request to the source and the application of its answer.
    async fn step(&mut self) -> Result<(), String> {
        if !self.mesh.is_up() {
            return Err("the p2p-sidecar link is down".into());
        }
        let schema = match self.store.schema(&self.schema) {
            Some((s, SchemaState::Approved)) => s,
            _ => {
                return Err(format!(
                    "schema '{}' is not loaded and approved on this node; load the same definition as on node {} (LoadSchema with approve)",
                    self.schema, self.source
                ));
            }
        };
        let store = self.store.clone();
        let name = self.schema.clone();
        let source = self.source.clone();
        let head = tokio::task::spawn_blocking(move || claim(&store, &name, &source))
            .await
            .map_err(|e| e.to_string())??;
        let requester = fold_proto::wire::Requester {
            distance: 0,
            identity: "replica".into(),
            proven_key: String::new(),
        };
        if !self.verified && head > 0 {
            self.verify(&schema, head, requester.clone()).await?;
        }
        self.verified = true;
        let resp = self
            .mesh
            .forward_changes(
                self.source.clone(),
                ChangesRequest {
                    schema: self.schema.clone(),
                    after_sequence: head,
                    limit: PAGE,
                    wait_ms: WAIT_MS,
                    schema_hash: schema.hash.clone(),
                    fields: Vec::new(),
                    filter: None,
                    readable_only: false,
                },
                requester,
                Some(REQUEST_TIMEOUT),
            )
            .await
            .map_err(|s| format!("node {}: {}", self.source, s.message()))?;
        let events = resp
            .changes
            .iter()
            .map(|c| to_event(&schema, c))
            .collect::<Result<Vec<_>, String>>()?;
        let store = self.store.clone();
        let hub = self.hub.clone();
        let applied = tokio::task::spawn_blocking(move || apply(&store, &hub, events))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let applied = applied.unwrap_or(head);
        let source_head = resp.head_sequence.max(applied);
        self.replicas.update(&self.schema, |s| {
            s.applied = applied;
            s.source_head = source_head;
            s.last_contact_ms = now_ms();
            s.last_error.clear();
        });
        self.metrics
            .replica(&self.schema, applied, source_head - applied);
        if applied < resp.head_sequence && resp.changes.is_empty() {
            return Err(format!(
                "node {} has changes up to {} but sent none after {applied}",
                self.source, resp.head_sequence
            ));
        }
        Ok(())
    }
}

impl Follower {
    /// Check, once per process, that the replica's newest change is the source's change of the
    /// same sequence (same versions): a replica whose schema was written to locally (while not
    /// following) or a source restored from an older backup would otherwise mix two histories.
    async fn verify(
        &self,
        schema: &Schema,
        head: u64,
        requester: fold_proto::wire::Requester,
    ) -> Result<(), String> {
        let theirs = self
            .mesh
            .forward_changes(
                self.source.clone(),
                ChangesRequest {
                    schema: self.schema.clone(),
                    after_sequence: head - 1,
                    limit: 1,
                    wait_ms: 0,
                    schema_hash: schema.hash.clone(),
                    fields: Vec::new(),
                    filter: None,
                    readable_only: false,
                },
                requester,
                Some(REQUEST_TIMEOUT),
            )
            .await
            .map_err(|s| format!("node {}: {}", self.source, s.message()))?;
        let store = self.store.clone();
        let name = self.schema.clone();
        let ours = tokio::task::spawn_blocking(move || store.changes_after(&name, head - 1, 1))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let ids = |v: Vec<String>| {
            let mut v = v;
            v.sort();
            v
        };
        let theirs = theirs
            .changes
            .first()
            .filter(|c| c.sequence == head)
            .map(|c| ids(c.fields.iter().map(|f| f.version_id.clone()).collect()));
        let ours = ours
            .first()
            .map(|c| ids(c.versions.iter().map(|(_, v)| v.id.clone()).collect()));
        if theirs.is_none() || theirs != ours {
            return Err(format!(
                "this replica of schema '{}' has diverged from node {}: its change {head} is not the source's (written here while not following, or the source's data was replaced); follow it into a node where the schema is empty",
                self.schema, self.source
            ));
        }
        Ok(())
    }
}

/// The replica's head, once `schema` here is known to hold only `source`'s changes: a schema
/// that has data of its own, or was a replica of another node, cannot become a replica (its
/// sequence numbers would mean something else).
fn claim(store: &Store, schema: &str, source: &str) -> Result<u64, String> {
    let key = format!("replica_of:{schema}");
    let head = store.log_bounds(schema).map_err(|e| e.to_string())?.head;
    match store.meta_get(&key).map_err(|e| e.to_string())? {
        Some(s) if s == source => Ok(head),
        Some(other) => Err(format!(
            "schema '{schema}' here is a replica of node {other}, not {source}; follow it from {other}, or load the schema into an empty node"
        )),
        None if head > 0 => Err(format!(
            "schema '{schema}' here already has {head} changes of its own; a replica starts empty (follow it on a node where the schema has no data)"
        )),
        None => {
            store.meta_set(&key, source).map_err(|e| e.to_string())?;
            Ok(head)
        }
    }
}

/// Apply the contiguous run of `events` that follows the local head, in one transaction (the
/// head, i.e. the cursor, moves with it). Returns the new head, or `None` when nothing was new.
fn apply(
    store: &Store,
    hub: &ChangeHub,
    events: Vec<ChangeEvent>,
) -> Result<Option<u64>, StoreError> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    let mut group = store.begin_group()?;
    let mut head = group.head(&first.schema)?;
    let mut any = false;
    for e in &events {
        if e.sequence <= head {
            continue; // applied before (a repeated answer)
        }
        if e.sequence != head + 1 {
            break; // a gap: never move past it
        }
        group.apply_replicated(e)?;
        head = e.sequence;
        any = true;
    }
    if !any {
        return Ok(Some(head));
    }
    let committed = group.commit()?;
    hub.publish(committed);
    Ok(Some(head))
}

/// A change as the source sent it, checked against the local schema.
fn to_event(schema: &Schema, c: &Change) -> Result<ChangeEvent, String> {
    let bad = |what: String| format!("change {} from the source: {what}", c.sequence);
    if schema.range_key().is_some() == c.range_key.is_empty() {
        return Err(bad(format!(
            "range key '{}' does not fit the schema's type",
            c.range_key
        )));
    }
    let mutation = match MutationType::try_from(c.mutation_type) {
        Ok(MutationType::Create) => MutationKind::Create,
        Ok(MutationType::Update) => MutationKind::Update,
        Ok(MutationType::Delete) => MutationKind::Delete,
        _ => return Err(bad("no mutation type".into())),
    };
    let ms = c.written_at.as_ref().map_or(0, |t| {
        u64::try_from(t.seconds).unwrap_or(0) * 1000
            + u64::try_from(t.nanos).unwrap_or(0) / 1_000_000
    });
    if c.fields.is_empty() {
        return Err(bad("no fields".into()));
    }
    let mut versions = Vec::with_capacity(c.fields.len());
    for f in &c.fields {
        if schema.field(&f.field).is_none() {
            return Err(bad(format!(
                "field '{}' is not in the local schema",
                f.field
            )));
        }
        if f.version_id.is_empty()
            || f.version_id.len() > MAX_ID_BYTES
            || f.previous_version_id.len() > MAX_ID_BYTES
        {
            return Err(bad(format!("bad version id of field '{}'", f.field)));
        }
        let value: Json = if f.deleted {
            Json::Null
        } else {
            serde_json::from_str(&f.value_json)
                .map_err(|e| bad(format!("value of field '{}' is not JSON: {e}", f.field)))?
        };
        versions.push((
            f.field.clone(),
            VersionRecord {
                id: f.version_id.clone(),
                value,
                deleted: f.deleted,
                written_at_ms: ms,
                writer: c.writer.clone(),
                prev: (!f.previous_version_id.is_empty()).then(|| f.previous_version_id.clone()),
                mutation,
                seq: c.sequence,
            },
        ));
    }
    Ok(ChangeEvent {
        schema: schema.name.clone(),
        sequence: c.sequence,
        range_key: c.range_key.clone(),
        versions,
    })
}

/// The refusal of a write to a followed schema.
pub fn read_only(schema: &str, source: &str) -> Status {
    Status::failed_precondition(format!(
        "schema '{schema}' on this node is a read-only replica of node {source} (--follow); write to the owner: set target_node_id to {source}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_follow_specs() {
        let id = "12D3KooWLiqzSLM8EsHWr7ifcpHhAhxoE4cwc4PJy9Rj7Yrp9cjC";
        let s: FollowSpec = format!("Items@{id}").parse().unwrap();
        assert_eq!(s.schema, "Items");
        assert_eq!(s.source, id);
        assert!("Items".parse::<FollowSpec>().is_err());
        assert!("Items@nope".parse::<FollowSpec>().is_err());
        assert!(format!("@{id}").parse::<FollowSpec>().is_err());
    }
}
