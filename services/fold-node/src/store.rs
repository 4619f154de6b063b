//! Durable storage on redb: schemas and their states, immutable field versions, the pointers to
//! each field's latest and live version, the trust table, and node metadata.
//!
//! Every write is a redb transaction committed with immediate durability (fsync) before the
//! call returns, so an acknowledged mutation survives `kill -9`. Mutations are written in groups
//! ([`WriteGroup`]: many mutations, one transaction, one fsync; driven by `commit.rs`). Calls are
//! blocking; async callers run them on the blocking pool or the group-commit writer thread.
//!
//! Tables:
//! - `schemas`:  name → {definition, state}
//! - `versions`: version id → one immutable [`VersionRecord`] (value, writer, time, previous id)
//! - `heads`:    (schema, field, range key) → newest version id (including deletions)
//! - `live`:     (schema, field, range key) → current version id (absent when deleted)
//! - `trust`:    node id → {distance, denied}
//! - `meta`:     key → value (e.g. the node id learned from the sidecar)
//! - `sequences`: schema → the last sequence number assigned (dense per schema, from 1)
//! - `changes`:  (schema, sequence) → the change log entry: range key and the versions written
//! - `changes_oldest`: schema → the oldest sequence still in `changes` (absent: 1)
//!
//! Every mutation (one record of a Mutate or BatchMutate) gets the next sequence number of its
//! schema in [`WriteGroup::apply`], in the same transaction as its versions, and only once all
//! checks of its set have passed: a refused mutation consumes no number, a failed group commits
//! none, so the numbers are dense, never repeat, and survive `kill -9` with the data. The
//! change log is what `FoldNode.Subscribe` reads for catch-up; it keeps everything unless
//! `--change-log-retention` bounds it, and then the oldest entries are removed a few at a time
//! with the writes that add new ones.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::filter::KeyFilter;
use crate::schema::{self, Schema};

type Cell<'a> = (&'a str, &'a str, &'a str);

const SCHEMAS: TableDefinition<&str, &str> = TableDefinition::new("schemas");
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
const HEADS: TableDefinition<Cell<'static>, &str> = TableDefinition::new("heads");
const LIVE: TableDefinition<Cell<'static>, &str> = TableDefinition::new("live");
const TRUST: TableDefinition<&str, &str> = TableDefinition::new("trust");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Applied idempotency keys: "<identity>\0<schema>\0<key>" → [`IdemRecord`] (JSON).
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// The same keys by time, for pruning: (applied at ms, key).
const IDEM_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("idempotency_by_time");
/// Expired idempotency keys removed per group (pruning keeps pace without long transactions).
const IDEM_PRUNE_PER_GROUP: usize = 256;
/// schema → the last sequence number assigned.
const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");
/// (schema, sequence) → [`LogEntry`] (JSON).
const CHANGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("changes");
/// schema → the oldest sequence kept in `changes` (absent: 1).
const CHANGES_OLDEST: TableDefinition<&str, u64> = TableDefinition::new("changes_oldest");
/// Change log entries removed per applied set beyond the retention (pruning keeps pace with
/// writing without long transactions).
const CHANGES_PRUNE_PER_SET: u64 = 1024;

/// What a set of mutations wrote: per plan, the written fields and their new version ids, and
/// the plan's sequence number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub written: Vec<Vec<(String, String)>>,
    pub sequences: Vec<u64>,
}

/// One change log entry as stored: the record's key and the versions written (the values are
/// in the versions).
#[derive(Serialize, Deserialize)]
struct LogEntry {
    k: String,
    f: Vec<(String, String)>,
}

/// One committed mutation of a schema, with the versions it wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub schema: String,
    pub sequence: u64,
    /// "" for Single schemas.
    pub range_key: String,
    /// Field → the version written, in the order written.
    pub versions: Vec<(String, VersionRecord)>,
}

impl ChangeEvent {
    /// The mutation's kind (all versions of one mutation share it).
    pub fn kind(&self) -> MutationKind {
        self.versions
            .first()
            .map_or(MutationKind::Update, |(_, v)| v.mutation)
    }
}

/// The sequence bounds of one schema's change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// The last sequence assigned (0: nothing written yet).
    pub head: u64,
    /// The oldest sequence still kept (1 while everything is kept; head + 1 when all was
    /// pruned).
    pub oldest: u64,
}

/// A page of a snapshot (see [`Store::snapshot_page`]).
#[derive(Debug, Default)]
pub struct SnapshotPage {
    /// (field, range key, head version) in (field, key) order.
    pub cells: Vec<(String, String, VersionRecord)>,
    /// Whether cells follow the last one.
    pub more: bool,
    /// The schema's head when the page was read.
    pub head: u64,
}

/// An idempotency key of a mutation request, scoped to its client's identity and schema.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Idempotency {
    /// The client's key (bounded by the API).
    pub key: String,
    /// Whose key it is (`Principal::identity_key`): two identities never share a key.
    pub scope: String,
    /// What the request asked for (a hash): the same key with a different request is refused.
    pub fingerprint: String,
    /// How long an applied key is remembered.
    pub window_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct IdemRecord {
    at_ms: u64,
    fingerprint: String,
    written: Vec<Vec<(String, String)>>,
    #[serde(default)]
    sequences: Vec<u64>,
}

/// Most records one query may return; more is an error asking for a narrower filter.
pub const MAX_QUERY_RECORDS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Db(#[from] redb::Error),
    #[error("corrupt record in storage: {0}")]
    Corrupt(String),
    /// Input that storage refuses to apply (e.g. a replicated change that does not fit).
    #[error("{0}")]
    Refused(String),
    /// A scan stopped because its caller went away or its deadline passed.
    #[error("the scan was cancelled (the caller went away or its deadline passed)")]
    Cancelled,
}

/// How many keys a scan examines between checks of its cancellation.
pub const CANCEL_CHECK_EVERY: usize = 1024;

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaState {
    Available,
    Approved,
    Blocked,
}

impl SchemaState {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaState::Available => "available",
            SchemaState::Approved => "approved",
            SchemaState::Blocked => "blocked",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSchema {
    definition: Json,
    state: SchemaState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRecord {
    pub distance: u32,
    pub denied: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MutationKind {
    Create,
    Update,
    Delete,
}

/// One immutable version of one field value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub id: String,
    pub value: Json,
    pub deleted: bool,
    pub written_at_ms: u64,
    pub writer: String,
    pub prev: Option<String>,
    pub mutation: MutationKind,
    /// The schema sequence number of the mutation that wrote it (0: written before sequences
    /// existed).
    #[serde(default)]
    pub seq: u64,
}

/// Result of loading a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOutcome {
    pub state: SchemaState,
    pub created: bool,
    pub hash: String,
    pub definition_hash: String,
}

/// A mutation, already validated against the schema and the permissions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MutationPlan {
    pub kind: MutationKind,
    /// "" for Single schemas.
    pub range_key: String,
    /// Field → new value (ignored for deletions), in field order.
    pub writes: Vec<(String, Json)>,
    pub writer: String,
}

/// Why a mutation was refused by the data it met.
#[derive(Debug, thiserror::Error)]
pub enum MutationError {
    #[error("field '{field}' already has a value{at}; use UPDATE to change it")]
    AlreadyExists { field: String, at: String },
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("idempotency key '{0}' was already used for a different mutation; use a new key")]
    KeyReused(String),
}

/// Data and schema errors of loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "schema '{name}' is already loaded with different content (hash {existing}); schemas are immutable, load the new version under a new name"
    )]
    Conflict { name: String, existing: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    /// Parsed schemas and states, mirrored from the `schemas` table.
    schemas: RwLock<HashMap<String, (Arc<Schema>, SchemaState)>>,
    /// Serializes schema writes so the cache and the table change together.
    schema_write: Mutex<()>,
    /// Change log entries kept per schema (0: all).
    retention: std::sync::atomic::AtomicU64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// redb's page cache when none is given: the default of `--cache-size` (docs/DEPLOY.md#memory).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// The smallest page cache accepted: a few hundred 4 KiB pages, so a B-tree path and a write
/// transaction's dirty pages fit.
pub const MIN_CACHE_BYTES: u64 = 1024 * 1024;

impl Store {
    /// Open (or create) the database file with the default page cache ([`DEFAULT_CACHE_BYTES`])
    /// and load the schema cache.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the database file with a page cache of at most `cache_bytes` (redb keeps
    /// up to that much of the file's pages in memory, read cache and write buffer together; its
    /// own default would be 1 GiB) and load the schema cache.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let cache = usize::try_from(cache_bytes.max(MIN_CACHE_BYTES)).unwrap_or(usize::MAX);
        let db = Database::builder().set_cache_size(cache).create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SCHEMAS)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(HEADS)?;
            txn.open_table(LIVE)?;
            txn.open_table(TRUST)?;
            txn.open_table(META)?;
            txn.open_table(IDEMPOTENCY)?;
            txn.open_table(IDEM_BY_TIME)?;
            txn.open_table(SEQUENCES)?;
            txn.open_table(CHANGES)?;
            txn.open_table(CHANGES_OLDEST)?;
        }
        txn.commit()?;
        let mut cache = HashMap::new();
        {
            let r = db.begin_read()?;
            let t = r.open_table(SCHEMAS)?;
            for row in t.iter()? {
                let (name, body) = row?;
                let stored: StoredSchema = serde_json::from_str(body.value())
                    .map_err(|e| corrupt(format!("schema '{}': {e}", name.value())))?;
                let parsed = schema::from_json(stored.definition)
                    .map_err(|e| corrupt(format!("schema '{}': {e}", name.value())))?;
                cache.insert(name.value().to_string(), (Arc::new(parsed), stored.state));
            }
        }
        Ok(Store {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                schemas: RwLock::new(cache),
                schema_write: Mutex::new(()),
                retention: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Keep at most `n` change log entries per schema (0: keep everything). Older entries are
    /// removed as new ones are written; Subscribe from before the oldest kept is OUT_OF_RANGE.
    pub fn set_change_log_retention(&self, n: u64) {
        self.inner
            .retention
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The head and oldest kept sequence of `schema`'s change log.
    pub fn log_bounds(&self, schema: &str) -> Result<LogBounds, StoreError> {
        let r = self.inner.db.begin_read()?;
        let head = r
            .open_table(SEQUENCES)?
            .get(schema)?
            .map_or(0, |g| g.value());
        let oldest = r
            .open_table(CHANGES_OLDEST)?
            .get(schema)?
            .map_or(1, |g| g.value());
        Ok(LogBounds { head, oldest })
    }

    /// At most `limit` changes of `schema` with a sequence greater than `after`, in sequence
    /// order (fewer when the head is reached). Changes before the oldest kept are gone: check
    /// [`log_bounds`](Store::log_bounds) first.
    pub fn changes_after(
        &self,
        schema: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let changes = r.open_table(CHANGES)?;
        let versions = r.open_table(VERSIONS)?;
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1) else {
            return Ok(out);
        };
        for row in changes.range((schema, start)..=(schema, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (key, body) = row?;
            let seq = key.value().1;
            let entry: LogEntry = serde_json::from_slice(body.value())
                .map_err(|e| corrupt(format!("change {schema}#{seq}: {e}")))?;
            let mut vs = Vec::with_capacity(entry.f.len());
            for (field, id) in entry.f {
                vs.push((field, read_version(&versions, &id)?));
            }
            out.push(ChangeEvent {
                schema: schema.to_string(),
                sequence: seq,
                range_key: entry.k,
                versions: vs,
            });
        }
        Ok(out)
    }

    fn cache(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, (Arc<Schema>, SchemaState)>> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.inner
            .schemas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- schemas -----------------------------------------------------------------------------

    pub fn schema(&self, name: &str) -> Option<(Arc<Schema>, SchemaState)> {
        self.cache().get(name).cloned()
    }

    /// All schemas, by name.
    pub fn schemas(&self) -> Vec<(Arc<Schema>, SchemaState)> {
        let mut v: Vec<_> = self.cache().values().cloned().collect();
        v.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        v
    }

    pub fn approved_schema_names(&self) -> Vec<String> {
        self.schemas()
            .into_iter()
            .filter(|(_, st)| *st == SchemaState::Approved)
            .map(|(s, _)| s.name.clone())
            .collect()
    }

    /// Load a validated schema. Identical content is a no-op (optionally approving it);
    /// different content under the same name is a conflict.
    pub fn load_schema(&self, schema: Schema, approve: bool) -> Result<LoadOutcome, LoadError> {
        let _guard = self
            .inner
            .schema_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((existing, state)) = self.schema(&schema.name) {
            if schema::canonical(&existing.definition) != schema::canonical(&schema.definition) {
                return Err(LoadError::Conflict {
                    name: schema.name.clone(),
                    existing: existing.hash.clone(),
                });
            }
            let state = if approve && state == SchemaState::Available {
                self.write_schema(&existing, SchemaState::Approved)?;
                SchemaState::Approved
            } else {
                state
            };
            return Ok(LoadOutcome {
                state,
                created: false,
                hash: existing.hash.clone(),
                definition_hash: existing.definition_hash.clone(),
            });
        }
        let state = if approve {
            SchemaState::Approved
        } else {
            SchemaState::Available
        };
        let schema = Arc::new(schema);
        self.write_schema(&schema, state)?;
        Ok(LoadOutcome {
            state,
            created: true,
            hash: schema.hash.clone(),
            definition_hash: schema.definition_hash.clone(),
        })
    }

    /// Change a schema's state; returns the previous state, or `None` if there is no such schema.
    pub fn set_state(
        &self,
        name: &str,
        state: SchemaState,
    ) -> Result<Option<SchemaState>, StoreError> {
        let _guard = self
            .inner
            .schema_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((schema, prev)) = self.schema(name) else {
            return Ok(None);
        };
        if prev != state {
            self.write_schema(&schema, state)?;
        }
        Ok(Some(prev))
    }

    fn write_schema(&self, schema: &Arc<Schema>, state: SchemaState) -> Result<(), StoreError> {
        let body = serde_json::to_string(&StoredSchema {
            definition: schema.definition.clone(),
            state,
        })
        .map_err(corrupt)?;
        let txn = self.inner.db.begin_write()?;
        txn.open_table(SCHEMAS)?
            .insert(schema.name.as_str(), body.as_str())?;
        txn.commit()?;
        self.inner
            .schemas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(schema.name.clone(), (schema.clone(), state));
        Ok(())
    }

    // ---- data --------------------------------------------------------------------------------

    /// The range keys of a Range schema's rows matching `filter`, in key order. A row exists
    /// while its range-key field has a live value.
    pub fn range_rows(
        &self,
        schema: &str,
        range_field: &str,
        filter: &KeyFilter,
    ) -> Result<Vec<String>, RowsError> {
        self.range_rows_cancellable(schema, range_field, filter, &|| false)
    }

    /// As [`range_rows`](Self::range_rows), stopping with [`StoreError::Cancelled`] once
    /// `cancelled()` says so (checked every [`CANCEL_CHECK_EVERY`] keys examined).
    pub fn range_rows_cancellable(
        &self,
        schema: &str,
        range_field: &str,
        filter: &KeyFilter,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<String>, RowsError> {
        let (keys, more) = self.range_rows_page_cancellable(
            schema,
            range_field,
            filter,
            None,
            MAX_QUERY_RECORDS,
            cancelled,
        )?;
        if more {
            return Err(RowsError::TooMany);
        }
        Ok(keys)
    }

    /// At most `limit` live range keys matching `filter`, in key order, strictly after `after`;
    /// and whether more follow.
    pub fn range_rows_page(
        &self,
        schema: &str,
        range_field: &str,
        filter: &KeyFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), StoreError> {
        self.range_rows_page_cancellable(schema, range_field, filter, after, limit, &|| false)
    }

    /// As [`range_rows_page`](Self::range_rows_page), stopping with [`StoreError::Cancelled`]
    /// once `cancelled()` says so: a scan whose caller went away, or whose deadline passed,
    /// does not read on through a table of non-matching keys.
    pub fn range_rows_page_cancellable(
        &self,
        schema: &str,
        range_field: &str,
        filter: &KeyFilter,
        after: Option<&str>,
        limit: usize,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<String>, bool), StoreError> {
        let r = self.inner.db.begin_read()?;
        let live = r.open_table(LIVE)?;
        let mut out = Vec::new();
        let beyond = |k: &str| after.is_none_or(|a| k > a);
        match filter {
            KeyFilter::Keys(keys) => {
                let mut keys: Vec<&String> = keys.iter().collect();
                keys.sort();
                keys.dedup();
                for k in keys.into_iter().filter(|k| beyond(k)) {
                    if live.get((schema, range_field, k.as_str()))?.is_some() {
                        if out.len() == limit {
                            return Ok((out, true));
                        }
                        out.push(k.clone());
                    }
                }
            }
            _ => {
                let mut start = filter.scan_start();
                if let Some(a) = after
                    && a > start.as_str()
                {
                    start = a.to_string();
                }
                let iter = live.range((schema, range_field, start.as_str())..)?;
                for (i, row) in iter.enumerate() {
                    if i % CANCEL_CHECK_EVERY == CANCEL_CHECK_EVERY - 1 && cancelled() {
                        return Err(StoreError::Cancelled);
                    }
                    let (key, _) = row?;
                    let (s, f, k) = key.value();
                    if s != schema || f != range_field || filter.past_end(k) {
                        break;
                    }
                    if beyond(k) && filter.matches(k) {
                        if out.len() == limit {
                            return Ok((out, true));
                        }
                        out.push(k.to_string());
                    }
                }
            }
        }
        Ok((out, false))
    }

    /// Live values of `fields` at `range_key` ("" for Single schemas); `None` where a field has
    /// no live value.
    pub fn read_values(
        &self,
        schema: &str,
        range_key: &str,
        fields: &[String],
    ) -> Result<Vec<Option<Json>>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let live = r.open_table(LIVE)?;
        let versions = r.open_table(VERSIONS)?;
        let mut out = Vec::with_capacity(fields.len());
        for f in fields {
            let value = match live.get((schema, f.as_str(), range_key))? {
                Some(id) => Some(read_version(&versions, id.value())?.value),
                None => None,
            };
            out.push(value);
        }
        Ok(out)
    }

    /// Versions of one field at one key, newest first (at most `limit`, 0 = all).
    pub fn history(
        &self,
        schema: &str,
        field: &str,
        range_key: &str,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let heads = r.open_table(HEADS)?;
        let versions = r.open_table(VERSIONS)?;
        let mut out = Vec::new();
        let mut next = heads
            .get((schema, field, range_key))?
            .map(|g| g.value().to_string());
        while let Some(id) = next {
            if limit != 0 && out.len() >= limit {
                break;
            }
            let Some(v) = chain_version(&versions, &id, out.is_empty())? else {
                break;
            };
            next = v.prev.clone();
            out.push(v);
        }
        Ok(out)
    }

    /// At most `limit` versions, newest first, starting after version `after` (the last one a
    /// previous page returned) or at the head; and whether more follow. Versions written since
    /// paging began are before the cursor, so each version is returned exactly once.
    pub fn history_page(
        &self,
        schema: &str,
        field: &str,
        range_key: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, bool), StoreError> {
        let r = self.inner.db.begin_read()?;
        let heads = r.open_table(HEADS)?;
        let versions = r.open_table(VERSIONS)?;
        let mut next = match after {
            Some(id) => read_version(&versions, id)?.prev,
            None => heads
                .get((schema, field, range_key))?
                .map(|g| g.value().to_string()),
        };
        let mut out = Vec::new();
        while let Some(id) = next {
            if out.len() == limit {
                return Ok((out, true));
            }
            let Some(v) = chain_version(&versions, &id, after.is_none() && out.is_empty())? else {
                break;
            };
            next = v.prev.clone();
            out.push(v);
        }
        Ok((out, false))
    }

    /// Apply a mutation atomically: existence checks and all new versions in one transaction.
    /// Returns the written fields and their new version ids.
    pub fn mutate(
        &self,
        schema: &Schema,
        plan: &MutationPlan,
    ) -> Result<Vec<(String, String)>, MutationError> {
        let mut group = self.begin_group()?;
        let mut applied = group
            .apply(schema, std::slice::from_ref(plan))
            .map_err(|e| match e {
                ApplyError::Refused { error, .. } => error,
                ApplyError::Store(e) => MutationError::Store(e),
            })?;
        group.commit()?;
        Ok(applied.written.pop().unwrap_or_default())
    }

    /// Open the write transaction of a group of mutations (group commit, `commit.rs`): any
    /// number of [`WriteGroup::apply`] calls, then one durable [`WriteGroup::commit`]. redb
    /// allows one write transaction at a time; other writers wait in `begin_write`.
    pub fn begin_group(&self) -> Result<WriteGroup<'static>, StoreError> {
        Ok(WriteGroup {
            txn: Txn::Owned(Box::new(self.inner.db.begin_write()?)),
            retention: self.retention(),
            committed: Vec::new(),
            stamp: Stamp::Clock,
            minted: std::cell::Cell::new(0),
        })
    }

    /// Change log entries kept per schema (0: all).
    pub fn retention(&self) -> u64 {
        self.inner
            .retention
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The database file, shared with the schema groups' Raft stores (their log, vote and
    /// applied state live in the same file).
    pub fn database(&self) -> &Arc<Database> {
        &self.inner.db
    }

    // ---- trust ---------------------------------------------------------------------------------

    pub fn trust_get(&self, node_id: &str) -> Result<Option<TrustRecord>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(TRUST)?;
        match t.get(node_id)? {
            Some(v) => Ok(Some(serde_json::from_str(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    pub fn trust_all(&self) -> Result<BTreeMap<String, TrustRecord>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(TRUST)?;
        let mut out = BTreeMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(
                k.value().to_string(),
                serde_json::from_str(v.value()).map_err(corrupt)?,
            );
        }
        Ok(out)
    }

    /// Set (`Some`) or remove (`None`) a trust entry.
    pub fn trust_set(&self, node_id: &str, rec: Option<TrustRecord>) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_write()?;
        {
            let mut t = txn.open_table(TRUST)?;
            match rec {
                Some(rec) => {
                    let body = serde_json::to_string(&rec).map_err(corrupt)?;
                    t.insert(node_id, body.as_str())?;
                }
                None => {
                    t.remove(node_id)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    // ---- re-seeding a replica (follow.rs) -----------------------------------------------------

    /// A page of `schema`'s current cells for a snapshot: each (field, range key) with its head
    /// version (deleted ones too: the next change continues their chains), in (field, key)
    /// order strictly after `after`, until `max_cells` or about `max_bytes` of values; the
    /// cursor of the last one when more follow; and the schema's head when read.
    pub fn snapshot_page(
        &self,
        schema: &str,
        after: Option<(&str, &str)>,
        max_cells: usize,
        max_bytes: usize,
    ) -> Result<SnapshotPage, StoreError> {
        let r = self.inner.db.begin_read()?;
        let head = r
            .open_table(SEQUENCES)?
            .get(schema)?
            .map_or(0, |g| g.value());
        let heads = r.open_table(HEADS)?;
        let versions = r.open_table(VERSIONS)?;
        let (f0, k0) = after.unwrap_or(("", ""));
        let mut page = SnapshotPage {
            head,
            ..SnapshotPage::default()
        };
        let mut bytes = 0;
        for row in heads.range((schema, f0, k0)..)? {
            let (key, id) = row?;
            let (s, f, k) = key.value();
            if s != schema {
                break;
            }
            if after.is_some() && (f, k) == (f0, k0) {
                continue;
            }
            if page.cells.len() >= max_cells || (bytes >= max_bytes && !page.cells.is_empty()) {
                page.more = true;
                break;
            }
            let v = read_version(&versions, id.value())?;
            bytes += v.value.to_string().len() + 64;
            page.cells.push((f.to_string(), k.to_string(), v));
        }
        Ok(page)
    }

    /// Start re-seeding the replica of `schema` from a snapshot taken at the source's sequence
    /// `base`: forget its current cells and change log, and make `base` its head. The versions
    /// themselves stay (ids never repeat; a snapshot cell may bring the same one back).
    pub fn reseed_begin(&self, schema: &str, base: u64) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_write()?;
        reset_schema(&txn, schema, base)?;
        txn.commit()?;
        Ok(())
    }

    /// Write snapshot cells into a replica being re-seeded: each version (again, if it is
    /// there), and the cell's head unless the cell already holds a newer version.
    pub fn reseed_cells(
        &self,
        schema: &str,
        cells: &[(String, String, VersionRecord)],
    ) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_write()?;
        {
            let mut heads = txn.open_table(HEADS)?;
            let mut live = txn.open_table(LIVE)?;
            let mut versions = txn.open_table(VERSIONS)?;
            for (f, k, rec) in cells {
                put_if_newer(&mut heads, &mut live, &mut versions, (schema, f, k), rec)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    // ---- meta ----------------------------------------------------------------------------------

    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(META)?;
        Ok(t.get(key)?.map(|v| v.value().to_string()))
    }

    pub fn meta_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let txn = self.inner.db.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }
}

/// Forget `schema`'s current cells and change log inside `txn`, and make `base` its head (the
/// versions themselves stay: ids never repeat).
fn reset_schema(txn: &redb::WriteTransaction, schema: &str, base: u64) -> Result<(), StoreError> {
    let mut heads = txn.open_table(HEADS)?;
    let mut live = txn.open_table(LIVE)?;
    let mut changes = txn.open_table(CHANGES)?;
    let cells: Vec<(String, String)> = heads
        .range((schema, "", "")..)?
        .map(|row| {
            row.map(|(k, _)| {
                let (s, f, key) = k.value();
                (s.to_string(), f.to_string(), key.to_string())
            })
        })
        .take_while(|r| r.as_ref().map_or(true, |(s, _, _)| s == schema))
        .map(|r| r.map(|(_, f, k)| (f, k)))
        .collect::<Result<_, _>>()?;
    for (f, k) in &cells {
        heads.remove((schema, f.as_str(), k.as_str()))?;
        live.remove((schema, f.as_str(), k.as_str()))?;
    }
    let seqs: Vec<u64> = changes
        .range((schema, 0)..=(schema, u64::MAX))?
        .map(|row| row.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    for s in seqs {
        changes.remove((schema, s))?;
    }
    txn.open_table(SEQUENCES)?.insert(schema, base)?;
    txn.open_table(CHANGES_OLDEST)?
        .insert(schema, base.saturating_add(1))?;
    Ok(())
}

/// A schema's whole current state as a schema group's snapshot carries it: every cell's head
/// version (deleted ones too, so the next change continues their chains) and the head sequence.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SchemaSnapshot {
    pub head: u64,
    pub cells: Vec<(String, String, VersionRecord)>,
}

/// `schema`'s state as `txn` sees it (one consistent view).
pub fn schema_snapshot(
    txn: &redb::ReadTransaction,
    schema: &str,
) -> Result<SchemaSnapshot, StoreError> {
    let head = txn
        .open_table(SEQUENCES)?
        .get(schema)?
        .map_or(0, |g| g.value());
    let heads = txn.open_table(HEADS)?;
    let versions = txn.open_table(VERSIONS)?;
    let mut cells = Vec::new();
    for row in heads.range((schema, "", "")..)? {
        let (key, id) = row?;
        let (s, f, k) = key.value();
        if s != schema {
            break;
        }
        cells.push((
            f.to_string(),
            k.to_string(),
            read_version(&versions, id.value())?,
        ));
    }
    Ok(SchemaSnapshot { head, cells })
}

/// Replace `schema`'s state inside `txn` by a snapshot: its cells and head exactly; the change
/// log starts after the snapshot's head (Subscribe from before it is OUT_OF_RANGE here).
pub fn install_schema_snapshot(
    txn: &redb::WriteTransaction,
    schema: &str,
    snap: &SchemaSnapshot,
) -> Result<(), StoreError> {
    reset_schema(txn, schema, snap.head)?;
    let mut heads = txn.open_table(HEADS)?;
    let mut live = txn.open_table(LIVE)?;
    let mut versions = txn.open_table(VERSIONS)?;
    for (f, k, rec) in &snap.cells {
        let bytes = serde_json::to_vec(rec).map_err(corrupt)?;
        versions.insert(rec.id.as_str(), bytes.as_slice())?;
        heads.insert((schema, f.as_str(), k.as_str()), rec.id.as_str())?;
        if rec.deleted {
            live.remove((schema, f.as_str(), k.as_str()))?;
        } else {
            live.insert((schema, f.as_str(), k.as_str()), rec.id.as_str())?;
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    #[error("the query matches more than {MAX_QUERY_RECORDS} records; narrow the filter")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::TransactionError> for RowsError {
    fn from(e: redb::TransactionError) -> Self {
        RowsError::Store(e.into())
    }
}

/// Why a set of mutations applied to a [`WriteGroup`] was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The data refused mutation `index` of the set; the group is unchanged by the whole set.
    #[error("mutation {index}: {error}")]
    Refused { index: usize, error: MutationError },
    /// Storage failed; the group's transaction must be abandoned (nothing of it is committed).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One redb write transaction holding a group of mutations, committed once.
///
/// Each [`apply`](WriteGroup::apply) is all-or-nothing by check-then-write: every existence
/// check of the set runs first (seeing the effects of the earlier mutations of the same set
/// and of earlier sets in this group, as if they had been applied one after another), and only
/// when all pass are the versions written. A refused set therefore leaves the transaction as it
/// was, so the other sets of the group are not affected. (redb's ephemeral savepoints cannot do
/// this: they can only be taken before a transaction has written anything.)
///
/// Sets are applied in call order, which is commit order; a per-schema sequence number assigned
/// here would be dense and ordered like the commits.
pub struct WriteGroup<'t> {
    txn: Txn<'t>,
    /// Change log entries kept per schema (0: all).
    retention: u64,
    /// (schema, sequence) of the changes applied so far, in order: announced to subscribers
    /// once the group is committed.
    committed: Vec<(String, u64)>,
    /// Where version ids and write times come from.
    stamp: Stamp,
    /// Version ids minted so far under a [`Stamp::Log`].
    minted: std::cell::Cell<u32>,
}

/// The write transaction of a [`WriteGroup`]: its own (group commit, replicas), or one a schema
/// group's Raft store opened (the data then commits with the group's applied log id).
enum Txn<'t> {
    Owned(Box<redb::WriteTransaction>),
    Borrowed(&'t redb::WriteTransaction),
}

impl std::ops::Deref for Txn<'_> {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        match self {
            Txn::Owned(t) => t,
            Txn::Borrowed(t) => t,
        }
    }
}

/// Where a write's version ids and times come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// This node's clock, and random (time-ordered) ids: a node writing on its own.
    Clock,
    /// A schema group's log entry: the leader's time at proposal and ids derived from the
    /// group, the entry's index and the version's place in it, so every member applying the
    /// entry writes exactly the same versions.
    Log { ms: u64, index: u64 },
}

impl<'t> WriteGroup<'t> {
    /// A group of writes inside `txn`, a transaction its caller commits (a schema group's Raft
    /// store: data and applied log id in one commit). Nothing is committed by this group.
    pub fn within(txn: &'t redb::WriteTransaction, retention: u64, stamp: Stamp) -> Self {
        WriteGroup {
            txn: Txn::Borrowed(txn),
            retention,
            committed: Vec::new(),
            stamp,
            minted: std::cell::Cell::new(0),
        }
    }

    /// The (schema, sequence) of the changes applied so far, in order (for a group made
    /// [`within`](WriteGroup::within) a transaction its caller commits).
    pub fn into_committed(self) -> Vec<(String, u64)> {
        self.committed
    }

    /// The time of a write made now.
    fn now(&self) -> u64 {
        match self.stamp {
            Stamp::Clock => now_ms(),
            Stamp::Log { ms, .. } => ms,
        }
    }

    /// A new version id: time-ordered (UUIDv7). Under [`Stamp::Log`] its 74 "random" bits are
    /// a hash of (schema, log index, n-th version of the entry): the same on every member, and
    /// unique, as (schema, index) names one entry of one group.
    fn version_id(&self, schema: &str) -> String {
        match self.stamp {
            Stamp::Clock => uuid::Uuid::now_v7().to_string(),
            Stamp::Log { ms, index } => {
                use sha2::{Digest, Sha256};
                self.minted.set(self.minted.get() + 1);
                let mut h = Sha256::new();
                h.update(schema.as_bytes());
                h.update([0]);
                h.update(index.to_be_bytes());
                h.update(self.minted.get().to_be_bytes());
                let d = h.finalize();
                let mut bits = [0u8; 10];
                bits.copy_from_slice(&d[..10]);
                uuid::Builder::from_unix_timestamp_millis(ms, &bits)
                    .into_uuid()
                    .to_string()
            }
        }
    }

    /// Apply `plans` (mutations of one schema) atomically within this group. Returns, per plan,
    /// the written fields and their new version ids, and the plan's sequence number (assigned
    /// only once every check of the set has passed, so a refused set consumes none).
    pub fn apply(
        &mut self,
        schema: &Schema,
        plans: &[MutationPlan],
    ) -> Result<Applied, ApplyError> {
        let mut heads = self.txn.open_table(HEADS).map_err(StoreError::from)?;
        let mut live = self.txn.open_table(LIVE).map_err(StoreError::from)?;
        let mut versions = self.txn.open_table(VERSIONS).map_err(StoreError::from)?;
        let name = schema.name.as_str();

        // Check every plan first.
        let stored = |f: &str, rk: &str| -> Result<bool, StoreError> {
            Ok(live.get((name, f, rk))?.is_some())
        };
        let all_targets = check_plans(schema, plans, &stored)?;

        // All passed: write the versions, each plan under the next sequence number.
        let mut sequences = self.txn.open_table(SEQUENCES).map_err(StoreError::from)?;
        let mut changes = self.txn.open_table(CHANGES).map_err(StoreError::from)?;
        let mut seq = sequences.get(name)?.map_or(0, |g| g.value());
        let mut out = Applied::default();
        for (plan, targets) in plans.iter().zip(all_targets) {
            let rk = plan.range_key.as_str();
            let ts = self.now();
            seq += 1;
            let mut written = Vec::with_capacity(targets.len());

            for (f, value) in targets {
                let prev = heads
                    .get((name, f.as_str(), rk))?
                    .map(|g| g.value().to_string());
                // Time-ordered (UUIDv7): the versions written together land side by side in
                // the `versions` B-tree, so a group commit rewrites a few leaf pages instead of
                // one random page per version (random v4 ids made the commit write and fsync
                // ~4 KiB per version; measured in docs/BENCHMARKS.md).
                let id = self.version_id(name);
                let deleted = plan.kind == MutationKind::Delete;
                let rec = VersionRecord {
                    id: id.clone(),
                    value,
                    deleted,
                    written_at_ms: ts,
                    writer: plan.writer.clone(),
                    prev,
                    mutation: plan.kind,
                    seq,
                };
                let bytes = serde_json::to_vec(&rec).map_err(corrupt)?;
                versions.insert(id.as_str(), bytes.as_slice())?;
                heads.insert((name, f.as_str(), rk), id.as_str())?;
                if deleted {
                    live.remove((name, f.as_str(), rk))?;
                } else {
                    live.insert((name, f.as_str(), rk), id.as_str())?;
                }
                written.push((f, id));
            }
            let entry = serde_json::to_vec(&LogEntry {
                k: rk.to_string(),
                f: written.clone(),
            })
            .map_err(corrupt)?;
            changes.insert((name, seq), entry.as_slice())?;
            self.committed.push((name.to_string(), seq));
            out.written.push(written);
            out.sequences.push(seq);
        }
        sequences.insert(name, seq)?;
        self.prune_changes(&mut changes, name, seq)?;
        Ok(out)
    }

    /// With a retention, remove (a bounded number of) the oldest change log entries of `name`
    /// beyond it, now that its head is `head`.
    fn prune_changes(
        &self,
        changes: &mut redb::Table<(&'static str, u64), &'static [u8]>,
        name: &str,
        head: u64,
    ) -> Result<(), StoreError> {
        if self.retention == 0 {
            return Ok(());
        }
        let mut oldest_t = self.txn.open_table(CHANGES_OLDEST)?;
        let oldest = oldest_t.get(name)?.map_or(1, |g| g.value());
        let keep_from = head.saturating_sub(self.retention - 1).max(1);
        let until = keep_from.min(oldest.saturating_add(CHANGES_PRUNE_PER_SET));
        if until > oldest {
            for s in oldest..until {
                changes.remove((name, s))?;
            }
            oldest_t.insert(name, until)?;
        }
        Ok(())
    }

    /// Record a change of a followed schema exactly as its owner wrote it: the owner's sequence
    /// number (which must be this log's head + 1) and its versions. Used by replicas. A change
    /// at or below `reseeded_through` is replayed over a snapshot that may already hold it or
    /// newer versions of its cells: its versions are stored, and a cell's head moves only
    /// forward; every other change must add new versions that continue their cells' chains.
    pub fn apply_replicated(
        &mut self,
        change: &ChangeEvent,
        reseeded_through: u64,
    ) -> Result<(), StoreError> {
        let name = change.schema.as_str();
        let rk = change.range_key.as_str();
        let mut sequences = self.txn.open_table(SEQUENCES)?;
        let head = sequences.get(name)?.map_or(0, |g| g.value());
        if change.sequence != head + 1 {
            return Err(corrupt(format!(
                "replicated change {name}#{} does not follow the head {head}",
                change.sequence
            )));
        }
        let mut heads = self.txn.open_table(HEADS)?;
        let mut live = self.txn.open_table(LIVE)?;
        let mut versions = self.txn.open_table(VERSIONS)?;
        let mut changes = self.txn.open_table(CHANGES)?;
        let mut written = Vec::with_capacity(change.versions.len());
        for (f, rec) in &change.versions {
            if change.sequence <= reseeded_through {
                put_if_newer(
                    &mut heads,
                    &mut live,
                    &mut versions,
                    (name, f.as_str(), rk),
                    rec,
                )?;
                written.push((f.clone(), rec.id.clone()));
                continue;
            }
            // Every version belongs to the followed schema: a new id (never one of another
            // schema's versions, which share this table), continuing this very cell's chain.
            if versions.get(rec.id.as_str())?.is_some() {
                return Err(StoreError::Refused(format!(
                    "replicated change {name}#{} writes version {} of field '{f}', an id this node already holds: refused (a source may only add new versions of the schema it owns)",
                    change.sequence, rec.id
                )));
            }
            let current = heads
                .get((name, f.as_str(), rk))?
                .map(|g| g.value().to_string());
            if current != rec.prev {
                return Err(StoreError::Refused(format!(
                    "replicated change {name}#{} gives version {} of field '{f}' the previous version {:?}, but this replica's current one is {:?}: refused (the histories differ)",
                    change.sequence, rec.id, rec.prev, current
                )));
            }
            let bytes = serde_json::to_vec(rec).map_err(corrupt)?;
            versions.insert(rec.id.as_str(), bytes.as_slice())?;
            heads.insert((name, f.as_str(), rk), rec.id.as_str())?;
            if rec.deleted {
                live.remove((name, f.as_str(), rk))?;
            } else {
                live.insert((name, f.as_str(), rk), rec.id.as_str())?;
            }
            written.push((f.clone(), rec.id.clone()));
        }
        let entry = serde_json::to_vec(&LogEntry {
            k: rk.to_string(),
            f: written,
        })
        .map_err(corrupt)?;
        changes.insert((name, change.sequence), entry.as_slice())?;
        sequences.insert(name, change.sequence)?;
        self.prune_changes(&mut changes, name, change.sequence)?;
        self.committed.push((name.to_string(), change.sequence));
        Ok(())
    }

    /// Like [`apply`](WriteGroup::apply), at most once per idempotency key: a key applied within
    /// its window returns the first application's result (`true` = replayed) and writes
    /// nothing; the same key with a different request is refused. The key is recorded in the
    /// same transaction as the writes, so it is applied exactly when they are.
    pub fn apply_idempotent(
        &mut self,
        schema: &Schema,
        plans: &[MutationPlan],
        idem: Option<&Idempotency>,
    ) -> Result<(Applied, bool), ApplyError> {
        let Some(idem) = idem else {
            return self.apply(schema, plans).map(|a| (a, false));
        };
        let key = format!("{}\0{}\0{}", idem.scope, schema.name, idem.key);
        let now = self.now();
        {
            let t = self.txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
            let found = t
                .get(key.as_str())
                .map_err(StoreError::from)?
                .map(|g| serde_json::from_slice::<IdemRecord>(g.value()));
            if let Some(rec) = found {
                let rec = rec.map_err(corrupt)?;
                if now.saturating_sub(rec.at_ms) <= idem.window_ms {
                    if rec.fingerprint != idem.fingerprint {
                        return Err(ApplyError::Refused {
                            index: 0,
                            error: MutationError::KeyReused(idem.key.clone()),
                        });
                    }
                    return Ok((
                        Applied {
                            written: rec.written,
                            sequences: rec.sequences,
                        },
                        true,
                    ));
                }
            }
        }
        let written = self.apply(schema, plans)?;
        let rec = IdemRecord {
            at_ms: now,
            fingerprint: idem.fingerprint.clone(),
            written: written.written.clone(),
            sequences: written.sequences.clone(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(corrupt)?;
        let mut t = self.txn.open_table(IDEMPOTENCY).map_err(StoreError::from)?;
        t.insert(key.as_str(), bytes.as_slice())
            .map_err(StoreError::from)?;
        let mut by_time = self
            .txn
            .open_table(IDEM_BY_TIME)
            .map_err(StoreError::from)?;
        by_time
            .insert((now, key.as_str()), ())
            .map_err(StoreError::from)?;
        Ok((written, false))
    }

    /// Forget idempotency keys applied longer than `window_ms` ago (a bounded number per call).
    pub fn prune_idempotency(&mut self, window_ms: u64) -> Result<usize, StoreError> {
        let cutoff = self.now().saturating_sub(window_ms);
        let mut by_time = self.txn.open_table(IDEM_BY_TIME)?;
        let mut keys = self.txn.open_table(IDEMPOTENCY)?;
        let expired: Vec<(u64, String)> = by_time
            .range::<(u64, &str)>(..(cutoff, ""))?
            .take(IDEM_PRUNE_PER_GROUP)
            .map(|r| r.map(|(k, _)| (k.value().0, k.value().1.to_string())))
            .collect::<Result<_, _>>()?;
        for (at, key) in &expired {
            by_time.remove((*at, key.as_str()))?;
            // A key re-applied since has a newer record: keep that one.
            let newer = keys
                .get(key.as_str())?
                .and_then(|g| serde_json::from_slice::<IdemRecord>(g.value()).ok())
                .is_some_and(|r| r.at_ms > *at);
            if !newer {
                keys.remove(key.as_str())?;
            }
        }
        Ok(expired.len())
    }

    /// Commit the group with immediate durability (fsync): when this returns `Ok`, every
    /// applied mutation survives `kill -9`. Returns (schema, sequence) of the committed changes
    /// in commit order, for live subscribers.
    pub fn commit(self) -> Result<Vec<(String, u64)>, StoreError> {
        if let Txn::Owned(txn) = self.txn {
            txn.commit()?;
        }
        Ok(self.committed)
    }

    /// The head sequence of `schema` as this transaction sees it.
    pub fn head(&self, schema: &str) -> Result<u64, StoreError> {
        let t = self.txn.open_table(SEQUENCES)?;
        Ok(t.get(schema)?.map_or(0, |g| g.value()))
    }
}

impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> Self {
        ApplyError::Store(e.into())
    }
}

/// Which cells a mutation writes (field → new value; ignored for deletions), or why the data
/// refuses it. `is_live` tells whether a field of the plan's record has a current value.
/// Check every plan of a set against the stored liveness (`stored(field, range key)`) and the
/// changes the earlier plans of the set will make: the fields and values each plan writes, or
/// the first refusal with its plan's index.
fn check_plans(
    schema: &Schema,
    plans: &[MutationPlan],
    stored: &dyn Fn(&str, &str) -> Result<bool, StoreError>,
) -> Result<Vec<Vec<(String, Json)>>, ApplyError> {
    // The liveness changes the earlier plans of this set will make, keyed by (field, range key).
    let mut overlay: HashMap<(String, String), bool> = HashMap::new();
    let mut all_targets = Vec::with_capacity(plans.len());
    for (index, plan) in plans.iter().enumerate() {
        let rk = plan.range_key.as_str();
        let mut is_live = |f: &str| -> Result<bool, StoreError> {
            if let Some(v) = overlay.get(&(f.to_string(), rk.to_string())) {
                return Ok(*v);
            }
            stored(f, rk)
        };
        let targets = plan_targets(schema, plan, &mut is_live).map_err(|error| match error {
            MutationError::Store(e) => ApplyError::Store(e),
            error => ApplyError::Refused { index, error },
        })?;
        let now_live = plan.kind != MutationKind::Delete;
        for (f, _) in &targets {
            overlay.insert((f.clone(), rk.to_string()), now_live);
        }
        all_targets.push(targets);
    }
    Ok(all_targets)
}

fn plan_targets(
    schema: &Schema,
    plan: &MutationPlan,
    is_live: &mut dyn FnMut(&str) -> Result<bool, StoreError>,
) -> Result<Vec<(String, Json)>, MutationError> {
    let name = schema.name.as_str();
    let rk = plan.range_key.as_str();
    let at = if rk.is_empty() {
        String::new()
    } else {
        format!(" at key '{rk}'")
    };
    let mut targets: Vec<(String, Json)> = Vec::new();
    match plan.kind {
        MutationKind::Create => {
            for (f, v) in &plan.writes {
                let is_range_key = Some(f.as_str()) == schema.range_key();
                if is_live(f)? {
                    if is_range_key {
                        continue; // the row exists; adding other fields to it is fine
                    }
                    return Err(MutationError::AlreadyExists {
                        field: f.clone(),
                        at: at.clone(),
                    });
                }
                targets.push((f.clone(), v.clone()));
            }
        }
        MutationKind::Update => {
            let exists = match schema.range_key() {
                Some(k) => is_live(k)?,
                None => {
                    let mut any = false;
                    for f in schema.fields.keys() {
                        if is_live(f)? {
                            any = true;
                            break;
                        }
                    }
                    any
                }
            };
            if !exists {
                return Err(MutationError::Missing(if rk.is_empty() {
                    format!("schema '{name}' has no values yet; use CREATE first")
                } else {
                    format!("no record{at} in schema '{name}'; use CREATE first")
                }));
            }
            for (f, v) in &plan.writes {
                if Some(f.as_str()) == schema.range_key() {
                    continue; // the key locates the row; rewriting it changes nothing
                }
                targets.push((f.clone(), v.clone()));
            }
        }
        MutationKind::Delete => {
            for (f, _) in &plan.writes {
                if is_live(f)? {
                    targets.push((f.clone(), Json::Null));
                }
            }
            if targets.is_empty() {
                return Err(MutationError::Missing(format!(
                    "nothing to delete{at}: none of the named fields has a value"
                )));
            }
        }
    }
    if targets.is_empty() {
        return Err(MutationError::Missing(format!(
            "nothing to write{at}: name at least one field besides the range key"
        )));
    }
    Ok(targets)
}

/// Store `rec` (a version as its owner wrote it) and make it the cell's head, unless the
/// cell's head is already this version or a newer one (a higher sequence).
fn put_if_newer(
    heads: &mut redb::Table<Cell<'static>, &'static str>,
    live: &mut redb::Table<Cell<'static>, &'static str>,
    versions: &mut redb::Table<&'static str, &'static [u8]>,
    cell: Cell<'_>,
    rec: &VersionRecord,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(rec).map_err(corrupt)?;
    versions.insert(rec.id.as_str(), bytes.as_slice())?;
    let current = heads.get(cell)?.map(|g| g.value().to_string());
    if let Some(id) = current {
        let newer = id == rec.id || read_version(versions, &id).is_ok_and(|v| v.seq >= rec.seq);
        if newer {
            return Ok(());
        }
    }
    heads.insert(cell, rec.id.as_str())?;
    if rec.deleted {
        live.remove(cell)?;
    } else {
        live.insert(cell, rec.id.as_str())?;
    }
    Ok(())
}

/// A version of a history chain: the head must be there; an older one may be missing where a
/// replica was re-seeded from a snapshot (its history starts there), which ends the chain.
fn chain_version(
    versions: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    head: bool,
) -> Result<Option<VersionRecord>, StoreError> {
    if !head && versions.get(id)?.is_none() {
        return Ok(None);
    }
    read_version(versions, id).map(Some)
}

fn read_version(
    versions: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<VersionRecord, StoreError> {
    let Some(bytes) = versions.get(id)? else {
        return Err(corrupt(format!("version {id} is referenced but missing")));
    };
    serde_json::from_slice(bytes.value()).map_err(|e| corrupt(format!("version {id}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn range_schema() -> Schema {
        let f = json!({
            "permission_policy": {"read_policy": {"Distance": 0}, "write_policy": {"Distance": 0}},
            "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
            "field_type": "Range", "field_mappers": {}
        });
        schema::from_json(json!({
            "name": "R", "schema_type": {"Range": {"range_key": "k"}},
            "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
            "fields": {"k": f.clone(), "v": f}
        }))
        .unwrap()
    }

    fn plan(kind: MutationKind, key: &str, v: Option<i64>) -> MutationPlan {
        let mut writes = vec![("k".to_string(), json!(key))];
        if let Some(v) = v {
            writes.push(("v".to_string(), json!(v)));
        }
        MutationPlan {
            kind,
            range_key: key.into(),
            writes,
            writer: "client:local".into(),
        }
    }

    #[test]
    fn a_write_group_applies_sets_all_or_nothing_on_a_single_schema() {
        let f = json!({
            "permission_policy": {"read_policy": {"Distance": 0}, "write_policy": {"Distance": 0}},
            "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
            "field_type": "Single", "field_mappers": {}
        });
        let s = schema::from_json(json!({
            "name": "S", "schema_type": "Single",
            "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
            "fields": {"a": f.clone(), "b": f}
        }))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(&dir.path().join("fold.redb")).unwrap();
        st.load_schema(s.clone(), true).unwrap();
        let p = |kind, field: &str, v: Json| MutationPlan {
            kind,
            range_key: String::new(),
            writes: vec![(field.to_string(), v)],
            writer: "client:local".into(),
        };
        let mut g = st.begin_group().unwrap();
        // UPDATE needs a value somewhere in the record: the CREATE before it in the set counts.
        let w = g
            .apply(
                &s,
                &[
                    p(MutationKind::Create, "a", json!(1)),
                    p(MutationKind::Update, "b", json!(2)),
                ],
            )
            .unwrap();
        assert_eq!(w.written.len(), 2);
        assert_eq!(w.sequences, vec![1, 2]);
        // Refused at its second mutation: the first (a new value of `a`) is not written either.
        let e = g
            .apply(
                &s,
                &[
                    p(MutationKind::Update, "a", json!(3)),
                    p(MutationKind::Create, "b", json!(4)),
                ],
            )
            .unwrap_err();
        assert!(matches!(
            e,
            ApplyError::Refused {
                index: 1,
                error: MutationError::AlreadyExists { .. }
            }
        ));
        g.commit().unwrap();
        let vals = st.read_values("S", "", &["a".into(), "b".into()]).unwrap();
        assert_eq!(vals, vec![Some(json!(1)), Some(json!(2))]);
        assert_eq!(st.history("S", "a", "", 0).unwrap().len(), 1);
    }

    #[test]
    fn sequences_are_dense_refusals_consume_none_and_retention_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fold.redb");
        let s = range_schema();
        {
            let st = Store::open(&path).unwrap();
            st.load_schema(s.clone(), true).unwrap();
            let mut g = st.begin_group().unwrap();
            let a = g
                .apply(&s, &[plan(MutationKind::Create, "a", Some(1))])
                .unwrap();
            assert_eq!(a.sequences, vec![1]);
            // Refused (at its second plan): no number consumed.
            assert!(
                g.apply(
                    &s,
                    &[
                        plan(MutationKind::Create, "b", Some(1)),
                        plan(MutationKind::Create, "a", Some(2)),
                    ],
                )
                .is_err()
            );
            let b = g
                .apply(
                    &s,
                    &[
                        plan(MutationKind::Create, "b", Some(2)),
                        plan(MutationKind::Update, "b", Some(3)),
                    ],
                )
                .unwrap();
            assert_eq!(b.sequences, vec![2, 3]);
            let events = g.commit().unwrap();
            assert_eq!(
                events.iter().map(|e| e.1).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            // A group that is never committed assigns nothing.
            let mut g = st.begin_group().unwrap();
            g.apply(&s, &[plan(MutationKind::Create, "c", Some(9))])
                .unwrap();
            drop(g);
        }
        let st = Store::open(&path).unwrap();
        assert_eq!(
            st.log_bounds("R").unwrap(),
            LogBounds { head: 3, oldest: 1 }
        );
        let changes = st.changes_after("R", 1, 10).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].sequence, 3);
        assert_eq!(changes[1].range_key, "b");
        assert_eq!(changes[1].kind(), MutationKind::Update);
        assert_eq!(changes[1].versions[0].1.value, serde_json::json!(3));
        assert_eq!(changes[1].versions[0].1.seq, 3);
        st.set_change_log_retention(2);
        let w = st
            .mutate(&s, &plan(MutationKind::Create, "d", Some(4)))
            .unwrap();
        assert_eq!(w.len(), 2);
        // Keeps the newest 2 (3 and 4).
        assert_eq!(
            st.log_bounds("R").unwrap(),
            LogBounds { head: 4, oldest: 3 }
        );
        assert_eq!(st.changes_after("R", 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn versions_rows_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fold.redb");
        let s = range_schema();
        {
            let st = Store::open(&path).unwrap();
            assert!(st.load_schema(s.clone(), true).unwrap().created);
            assert!(!st.load_schema(s.clone(), false).unwrap().created);
            st.mutate(&s, &plan(MutationKind::Create, "a", Some(1)))
                .unwrap();
            st.mutate(&s, &plan(MutationKind::Create, "b", Some(2)))
                .unwrap();
            assert!(matches!(
                st.mutate(&s, &plan(MutationKind::Create, "a", Some(3))),
                Err(MutationError::AlreadyExists { .. })
            ));
            st.mutate(&s, &plan(MutationKind::Update, "a", Some(4)))
                .unwrap();
            assert!(matches!(
                st.mutate(&s, &plan(MutationKind::Update, "zz", Some(4))),
                Err(MutationError::Missing(_))
            ));
            let mut del = plan(MutationKind::Delete, "b", Some(0));
            del.writes[1].1 = Json::Null;
            st.mutate(&s, &del).unwrap();
        }
        let st = Store::open(&path).unwrap();
        assert_eq!(st.schema("R").unwrap().1, SchemaState::Approved);
        let rows = st.range_rows("R", "k", &KeyFilter::All).unwrap();
        assert_eq!(rows, vec!["a"]);
        let vals = st.read_values("R", "a", &["v".into()]).unwrap();
        assert_eq!(vals, vec![Some(json!(4))]);
        let h = st.history("R", "v", "a", 0).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].value, json!(4));
        assert_eq!(h[0].prev.as_deref(), Some(h[1].id.as_str()));
        let h = st.history("R", "v", "b", 0).unwrap();
        assert!(h[0].deleted);
        assert_eq!(h[1].value, json!(2));
        assert_eq!(st.read_values("R", "b", &["v".into()]).unwrap(), vec![None]);
    }
}
