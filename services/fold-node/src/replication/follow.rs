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
use fold_proto::wire::{ChangesRequest, ChangesResponse, operation};
use serde_json::Value as Json;

use crate::error::NodeError;

use crate::link::Link;
use crate::link::mesh::{MeshLink, valid_node_id};
use crate::storage::hub::ChangeHub;
use crate::storage::schema::Schema;
use crate::storage::store::{
    ChangeEvent, MutationKind, SchemaState, Store, StoreError, VersionRecord,
};

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
    source_oldest: u64,
    last_contact_ms: u64,
    last_error: String,
    /// The distance the source grants this node (told in each answer, kept in `meta` so a
    /// restarted replica checks reads before the source answers again); `None`: never told.
    grant: Option<u32>,
    /// The source no longer keeps the changes after `applied`.
    behind_retention: bool,
    /// A re-seed from a snapshot is running: the copy is incomplete.
    reseeding: bool,
}

/// The schemas this node follows and how far each has come. Cheap to clone.
#[derive(Clone, Default)]
pub struct Replicas {
    inner: Arc<RwLock<BTreeMap<String, State>>>,
    /// Woken when a source's grant becomes known.
    granted: Arc<tokio::sync::Notify>,
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

    /// For a followed schema, the distance its source grants this node (`Some(None)`: not known
    /// yet); `None` when this node does not follow `schema`.
    pub fn grant(&self, schema: &str) -> Option<Option<u32>> {
        self.read().get(schema).map(|s| s.grant)
    }

    /// Wait up to `wait` for the source of `schema` to tell its grant.
    pub async fn wait_grant(&self, schema: &str, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a grant told in between still wakes it.
            let woken = self.granted.notified();
            let mut woken = std::pin::pin!(woken);
            woken.as_mut().enable();
            if self.grant(schema) != Some(None) {
                return;
            }
            if tokio::time::timeout_at(until, woken).await.is_err() {
                return;
            }
        }
    }

    /// Whether the copy of `schema` is being re-seeded (incomplete until it is done).
    pub fn reseeding(&self, schema: &str) -> bool {
        self.read().get(schema).is_some_and(|s| s.reseeding)
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
                granted_distance: s.grant,
                behind_retention: s.behind_retention,
                source_oldest_sequence: s.source_oldest,
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
            let grant = store
                .meta_get(&grant_key(&s.schema))
                .map_err(|e| e.to_string())?
                .and_then(|g| g.parse().ok());
            map.insert(
                s.schema.clone(),
                State {
                    source: s.source.clone(),
                    applied,
                    grant,
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
}

/// How a replica names itself to its source: itself, at distance 0.
fn replica_requester() -> fold_proto::wire::Requester {
    fold_proto::wire::Requester {
        distance: 0,
        identity: "replica".into(),
        proven_key: String::new(),
    }
}

/// The `meta` key of a re-seed of `schema`: [`RESEED_PENDING`] while one runs, then the last
/// sequence of its snapshot (changes up to it are replayed over the snapshot).
fn reseed_key(schema: &str) -> String {
    format!("replica_reseed:{schema}")
}

const RESEED_PENDING: &str = "pending";

/// The `meta` key of the distance the source of `schema` grants this node.
fn grant_key(schema: &str) -> String {
    format!("replica_grant:{schema}")
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
        let (head, reseed) = tokio::task::spawn_blocking(move || {
            let head = claim(&store, &name, &source)?;
            let reseed = store
                .meta_get(&reseed_key(&name))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((head, reseed))
        })
        .await
        .map_err(|e| e.to_string())??;
        // A re-seed that did not finish (the node stopped meanwhile) starts again.
        if reseed.as_deref() == Some(RESEED_PENDING) {
            return self.reseed(&schema).await;
        }
        let through = reseed.and_then(|r| r.parse().ok()).unwrap_or(0);
        let resp = match self.fetch(&schema, head).await {
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                self.replicas
                    .update(&self.schema, |st| st.behind_retention = true);
                tracing::warn!(schema = %self.schema, source = %self.source, error = %s.message(), "the replica fell behind what its source keeps; re-seeding it from a snapshot");
                return self.reseed(&schema).await;
            }
            r => r.map_err(|s| from_source(&self.source, &s))?,
        };
        self.learn_grant(resp.requester_distance).await?;
        self.check_same_history(head, &resp).await?;
        self.apply_answer(&schema, head, through, resp).await
    }

    /// Re-seed the copy from a snapshot of the source (docs/SCHEMAS.md, "Re-seeding a
    /// replica"): the source's current cells, page by page, as of its head `base` when the
    /// first page was read; then changes follow from `base`, and those up to the head when the
    /// last page was read are replayed over the snapshot (it may hold them already). Reads of
    /// the copy are refused meanwhile; an interrupted re-seed starts again.
    async fn reseed(&self, schema: &Schema) -> Result<(), String> {
        self.replicas.update(&self.schema, |s| s.reseeding = true);
        let r = self.reseed_pages(schema).await;
        self.replicas.update(&self.schema, |s| s.reseeding = false);
        let (base, through) = r?;
        self.replicas.update(&self.schema, |s| {
            s.applied = base;
            s.source_head = through;
            s.last_contact_ms = now_ms();
            s.behind_retention = false;
            s.last_error.clear();
        });
        tracing::info!(schema = %self.schema, source = %self.source, base, through, "replica re-seeded from a snapshot");
        Ok(())
    }

    /// The pages of a re-seed; the snapshot's first and last sequences.
    async fn reseed_pages(&self, schema: &Schema) -> Result<(u64, u64), String> {
        let mut cursor: Option<(String, String)> = None;
        let mut base = None;
        loop {
            let resp = self
                .fetch_snapshot(schema, cursor.as_ref())
                .await
                .map_err(|s| {
                    format!(
                        "re-seeding from a snapshot: {}",
                        from_source(&self.source, &s)
                    )
                })?;
            self.learn_grant(resp.requester_distance).await?;
            let page = resp.snapshot.unwrap_or_default();
            let mut cells = Vec::with_capacity(page.cells.len());
            for c in &page.cells {
                let e = to_event(schema, c)?;
                for (f, v) in e.versions {
                    cursor = Some((f.clone(), e.range_key.clone()));
                    cells.push((f, e.range_key.clone(), v));
                }
            }
            let store = self.store.clone();
            let name = self.schema.clone();
            let first = base.is_none();
            let as_of = page.as_of_sequence;
            let b = *base.get_or_insert(as_of);
            tokio::task::spawn_blocking(move || {
                if first {
                    store.meta_set(&reseed_key(&name), RESEED_PENDING)?;
                    store.reseed_begin(&name, b)?;
                }
                store.reseed_cells(&name, &cells)?;
                if !page.more {
                    store.meta_set(&reseed_key(&name), &as_of.max(b).to_string())?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            if !page.more || cursor.is_none() {
                return Ok((b, as_of.max(b)));
            }
        }
    }

    /// One page of the source's snapshot after `cursor`.
    async fn fetch_snapshot(
        &self,
        schema: &Schema,
        cursor: Option<&(String, String)>,
    ) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
        let (f, k) = cursor.cloned().unwrap_or_default();
        self.ask(ChangesRequest {
            snapshot: true,
            snapshot_after_field: f,
            snapshot_after_key: k,
            ..self.request(schema)
        })
        .await
    }

    /// Ask the source for the changes after `head`.
    async fn fetch(
        &self,
        schema: &Schema,
        head: u64,
    ) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
        self.ask(ChangesRequest {
            after_sequence: head,
            limit: PAGE,
            wait_ms: WAIT_MS,
            ..self.request(schema)
        })
        .await
    }

    /// A `changes` request for the followed schema, naming the definition it must match.
    fn request(&self, schema: &Schema) -> ChangesRequest {
        ChangesRequest {
            schema: self.schema.clone(),
            schema_hash: schema.hash.clone(),
            definition_hash: schema.definition_hash.clone(),
            ..Default::default()
        }
    }

    /// Send `req` to the source as this replica.
    async fn ask(
        &self,
        req: ChangesRequest,
    ) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
        fetch_changes(
            &self.mesh,
            &self.source,
            req,
            replica_requester(),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// Keep the distance the source grants this node: reads of the copy are checked with it.
    async fn learn_grant(&self, grant: u32) -> Result<(), String> {
        if self.replicas.grant(&self.schema) == Some(Some(grant)) {
            return Ok(());
        }
        let store = self.store.clone();
        let key = grant_key(&self.schema);
        tokio::task::spawn_blocking(move || store.meta_set(&key, &grant.to_string()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.replicas
            .update(&self.schema, |s| s.grant = Some(grant));
        self.replicas.granted.notify_waiters();
        Ok(())
    }

    /// On every answer: the source's change `head` must be this replica's change `head` (same
    /// versions). A replica whose schema was written to locally, or a source restored from an
    /// older backup, would otherwise mix two histories.
    async fn check_same_history(
        &self,
        head: u64,
        resp: &fold_proto::wire::ChangesResponse,
    ) -> Result<(), String> {
        if head == 0 || head < resp.oldest_sequence {
            return Ok(()); // nothing here yet, or the source no longer keeps that change
        }
        let store = self.store.clone();
        let name = self.schema.clone();
        let ours = tokio::task::spawn_blocking(move || store.changes_after(&name, head - 1, 1))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(ours) = ours
            .first()
            .filter(|c| c.sequence == head)
            .map(change_digest)
        else {
            // This replica no longer keeps its change `head` (its own retention, or a re-seed
            // started there): nothing to compare.
            return Ok(());
        };
        if ours != resp.after_digest {
            self.metrics.replica_refused(&self.schema, "diverged");
            return Err(format!(
                "this replica of schema '{}' has diverged from node {}: its change {head} is not the source's (written here while not following, or the source's data was replaced); follow it into a node where the schema is empty",
                self.schema, self.source
            ));
        }
        Ok(())
    }

    /// Apply an answer's changes and record the progress.
    async fn apply_answer(
        &self,
        schema: &Schema,
        head: u64,
        reseeded_through: u64,
        resp: fold_proto::wire::ChangesResponse,
    ) -> Result<(), String> {
        let events = resp
            .changes
            .iter()
            .map(|c| to_event(schema, c))
            .collect::<Result<Vec<_>, String>>()?;
        let store = self.store.clone();
        let hub = self.hub.clone();
        let applied =
            tokio::task::spawn_blocking(move || apply(&store, &hub, events, reseeded_through))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| {
                    self.metrics.replica_refused(&self.schema, "refused_change");
                    e.to_string()
                })?;
        let applied = applied.unwrap_or(head);
        let source_head = resp.head_sequence.max(applied);
        self.replicas.update(&self.schema, |s| {
            s.applied = applied;
            s.source_head = source_head;
            s.source_oldest = resp.oldest_sequence;
            s.last_contact_ms = now_ms();
            s.last_error.clear();
            s.behind_retention = false;
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

/// Most bytes of one change assembled from parts (`ChangesResponse.chunk`): far above what one
/// Mutate can write (--max-message-bytes, 4 MiB by default), so only a hostile source meets it.
pub const MAX_CHANGE_BYTES: u64 = 64 * 1024 * 1024;

/// A forwarded `changes` request, with a change too large for one answer assembled from its
/// parts: the answer then carries that one change. Used by replicas and remote subscriptions.
pub async fn fetch_changes(
    link: &dyn Link,
    source: &str,
    mut req: ChangesRequest,
    requester: fold_proto::wire::Requester,
    timeout: Duration,
) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
    let ask = |req: ChangesRequest| {
        let op = operation::Kind::Changes(req);
        crate::link::ask::<ChangesResponse>(link, source, op, requester.clone(), Some(timeout))
    };
    let mut resp = ask(req.clone()).await?;
    let Some(first) = resp.chunk.take() else {
        return Ok(resp);
    };
    let bad = |what: String| {
        NodeError::internal(format!(
            "node {source} sent change {} in parts that do not fit together: {what}",
            first.sequence
        ))
    };
    if first.total > MAX_CHANGE_BYTES || first.offset != 0 || first.data.is_empty() {
        return Err(bad(format!(
            "{} bytes from offset {} (at most {MAX_CHANGE_BYTES} bytes, from 0)",
            first.total, first.offset
        )));
    }
    let mut buf = first.data.clone();
    while (buf.len() as u64) < first.total {
        req.chunk_offset = buf.len() as u64;
        let mut next = ask(req.clone()).await?;
        let Some(c) = next.chunk.take() else {
            return Err(bad("a part is missing".into()));
        };
        if c.sequence != first.sequence
            || c.total != first.total
            || c.offset != buf.len() as u64
            || c.data.is_empty()
            || buf.len() as u64 + c.data.len() as u64 > first.total
        {
            return Err(bad(format!("part at offset {} of {}", c.offset, c.total)));
        }
        buf.extend_from_slice(&c.data);
        resp = next;
    }
    let change = <Change as prost::Message>::decode(buf.as_slice())
        .map_err(|e| bad(format!("not a change: {e}")))?;
    if change.sequence != first.sequence {
        return Err(bad(format!("the whole is change {}", change.sequence)));
    }
    resp.through_sequence = resp.through_sequence.max(change.sequence);
    resp.changes = vec![change];
    Ok(resp)
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
    reseeded_through: u64,
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
        group.apply_replicated(e, reseeded_through)?;
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

/// A failed request to the source, named once: the mesh's errors already name the node they
/// came from (`node X: …`, "cannot reach node X"), so the prefix is added only when missing.
fn from_source(source: &str, s: &NodeError) -> String {
    if s.message().contains(source) {
        s.message().to_string()
    } else {
        format!("node {source}: {}", s.message())
    }
}

/// SHA-256 hex of a change's version ids, sorted and joined by newlines: what a replica and its
/// source compare to know they hold the same change under one sequence number.
pub fn change_digest(e: &crate::storage::store::ChangeEvent) -> String {
    use sha2::{Digest, Sha256};
    let mut ids: Vec<&str> = e.versions.iter().map(|(_, v)| v.id.as_str()).collect();
    ids.sort_unstable();
    hex::encode(Sha256::digest(ids.join("\n").as_bytes()))
}

/// The refusal of a write to a followed schema.
pub fn read_only(schema: &str, source: &str) -> NodeError {
    NodeError::failed_precondition(format!(
        "schema '{schema}' on this node is a read-only replica of node {source} (--follow); write to the owner: set target_node_id to {source}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_source_once() {
        let remote = fold_proto::status::from_wire(
            "B",
            fold_proto::status::wire_error(
                tonic::Code::PermissionDenied,
                "peer:A/replica is not trusted by this node",
            ),
        );
        assert_eq!(
            from_source("B", &remote.into()),
            "node B: peer:A/replica is not trusted by this node"
        );
        assert_eq!(
            from_source("B", &NodeError::unavailable("no connection")),
            "node B: no connection"
        );
    }

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
