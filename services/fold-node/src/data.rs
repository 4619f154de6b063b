//! Executing schema operations, queries, mutations and history for an authenticated principal.
//!
//! This is where a request is checked (schema state, fields, permissions) and handed to the
//! store. Both entry points use it: the public `FoldNode` API (local clients) and the
//! `PeerRequests` callback (requests from other nodes, forwarded by the sidecar).

use std::sync::Arc;

use fold_proto::json::{json_to_value, map_to_struct, struct_to_map_checked};
use fold_proto::v1::{
    self, BatchMutateRequest, BatchMutateResponse, BatchMutationResult, FieldVersion,
    HistoryRequest, HistoryResponse, MutateRequest, MutateResponse, MutationType, QueryRequest,
    QueryResponse, Record,
};
use prost::Message;
use serde_json::{Map, Value as Json};

use crate::commit::{Committer, JobError, Limits};
use crate::distance::Requester;
use crate::error::NodeError;
use crate::filter::KeyFilter;
use crate::identity::{Identities, Principal};
use crate::metrics::NodeMetrics;
use crate::permissions::{self, Access};
use crate::schema::{self, Schema};
use crate::store::{
    Idempotency, LoadError, LoadOutcome, MutationKind, MutationPlan, RowsError, SchemaState, Store,
    StoreError, VersionRecord,
};

/// Most mutations one BatchMutate call may carry.
pub const MAX_BATCH_MUTATIONS: usize = 10_000;

/// Trailer of a refused BatchMutate naming the failing record's index.
pub use crate::error::FAILED_RECORD_TRAILER;

/// Records per page when a paged query names no size.
const DEFAULT_PAGE_SIZE: usize = 1000;
/// Most records per page.
const MAX_PAGE_SIZE: usize = 10_000;

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 128;
/// How long applied idempotency keys are remembered unless configured.
pub const DEFAULT_IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// Longest range key accepted.
const MAX_RANGE_KEY_LEN: usize = 1024;

#[derive(Clone)]
pub struct Data {
    store: Store,
    identities: Identities,
    metrics: Arc<NodeMetrics>,
    /// The group-commit writer every mutation goes through.
    commits: Committer,
    idempotency_window_ms: u64,
    pager: crate::paging::Pager,
    /// Live changes for subscribers, published by the group-commit writer.
    hub: crate::hub::ChangeHub,
    /// One slot per open subscription (--max-subscriptions, and per client).
    subscriptions: crate::slots::ClientSlots,
    /// One slot per running Scan (--max-scans, and per client).
    scans: crate::slots::ClientSlots,
    /// The schemas this node follows (read-only replicas of another node's).
    replicas: crate::follow::Replicas,
    /// The schema groups this node is a member of: their writes go through Raft.
    groups: crate::groups::Groups,
}

/// Set when the request that started a blocking scan is dropped (the client went away, or a
/// timeout layer gave up on it): the scan on the blocking pool then stops at its next check.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a storage operation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runs {
    /// On the calling task: point reads (one record from redb's cache) take microseconds, less
    /// than any hand-off to another thread would cost.
    Inline,
    /// On this worker thread, after handing the worker's other tasks to another thread
    /// (`block_in_place`): reads whose cost grows with the data (scans, history).
    InPlace,
    /// On the blocking pool: writes, which wait for fsync.
    Pool,
}

/// Run a storage operation where its expected cost says it should (see [`Runs`]), measured as
/// `op`.
///
/// Measured with `fold-bench forward-loop --local --concurrency 32` on 2 cores: point reads
/// inline serve ~30k queries/s against ~22k with `block_in_place` (docs/BENCHMARKS.md).
async fn storage<T, F>(
    metrics: &NodeMetrics,
    op: &'static str,
    runs: Runs,
    f: F,
) -> Result<T, NodeError>
where
    F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    T: Send + 'static,
{
    let started = std::time::Instant::now();
    let r = match runs {
        Runs::Inline => f(),
        Runs::InPlace => tokio::task::block_in_place(f),
        Runs::Pool => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| NodeError::internal(format!("storage task failed: {e}")))?,
    };
    // Refusals by the data (ALREADY_EXISTS, NOT_FOUND) are answers, not storage failures.
    let ok = r
        .as_ref()
        .map_or_else(|s| s.code() != tonic::Code::Internal, |_| true);
    metrics.storage(op, ok, started);
    r
}

pub fn state_to_proto(s: SchemaState) -> v1::SchemaState {
    match s {
        SchemaState::Available => v1::SchemaState::Available,
        SchemaState::Approved => v1::SchemaState::Approved,
        SchemaState::Blocked => v1::SchemaState::Blocked,
    }
}

pub fn state_from_proto(s: i32) -> Option<SchemaState> {
    match v1::SchemaState::try_from(s).ok()? {
        v1::SchemaState::Available => Some(SchemaState::Available),
        v1::SchemaState::Approved => Some(SchemaState::Approved),
        v1::SchemaState::Blocked => Some(SchemaState::Blocked),
        v1::SchemaState::Unspecified => None,
    }
}

pub fn summary(schema: &Schema, state: SchemaState) -> v1::SchemaSummary {
    v1::SchemaSummary {
        name: schema.name.clone(),
        state: state_to_proto(state) as i32,
        schema_type: schema.type_name().into(),
        range_key: schema.range_key().unwrap_or_default().into(),
        fields: schema.fields.keys().cloned().collect(),
        hash: schema.hash.clone(),
        definition_hash: schema.definition_hash.clone(),
    }
}

/// The fields a query reads: named, in the schema, and readable by `requester`.
fn query_fields(
    schema: &Schema,
    fields: &[String],
    requester: &Requester,
) -> Result<(), NodeError> {
    if fields.is_empty() {
        return Err(NodeError::invalid_argument(format!(
            "'fields' is empty; name the fields to read (schema '{}' has: {})",
            schema.name,
            schema.fields.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    readable_fields(schema, requester, fields).map(|_| ())
}

/// The field and record a history request reads: in the schema, readable by `requester`, with a
/// range key exactly when the schema has one.
fn history_target(
    schema: &Schema,
    req: &HistoryRequest,
    requester: &Requester,
) -> Result<(), NodeError> {
    let Some(def) = schema.field(&req.field) else {
        return Err(NodeError::not_found(format!(
            "field '{}' not found in schema '{}'",
            req.field, schema.name
        )));
    };
    permissions::check(def, Access::Read, requester).map_err(NodeError::from)?;
    if schema.range_key().is_some() && req.range_key.is_empty() {
        return Err(NodeError::invalid_argument(format!(
            "schema '{}' is a Range schema: 'range_key' names whose history to read",
            schema.name
        )));
    }
    if schema.range_key().is_none() && !req.range_key.is_empty() {
        return Err(NodeError::invalid_argument(format!(
            "schema '{}' is a Single schema: leave 'range_key' empty",
            schema.name
        )));
    }
    Ok(())
}

/// An unpaged history read. It stops at MAX_PAGE_SIZE versions, as an unpaged Query does: one
/// more is read to tell "exactly that many" from "more".
fn unpaged_history(
    store: &Store,
    schema: &str,
    req: &HistoryRequest,
) -> Result<Vec<VersionRecord>, NodeError> {
    let want = match req.limit as usize {
        0 => MAX_PAGE_SIZE + 1,
        n => n.min(MAX_PAGE_SIZE + 1),
    };
    let v = store
        .history(schema, &req.field, &req.range_key, want)
        .map_err(NodeError::from)?;
    if v.len() > MAX_PAGE_SIZE {
        return Err(NodeError::resource_exhausted(format!(
            "field '{}' has more than {MAX_PAGE_SIZE} versions here; read them in pages with 'page_size' (and 'page_token'), or set 'limit' to at most {MAX_PAGE_SIZE}",
            req.field
        )));
    }
    Ok(v)
}

/// A query's key filter; range filters apply only to Range schemas.
fn query_filter(schema: &Schema, filter: Option<&v1::RangeFilter>) -> Result<KeyFilter, NodeError> {
    match (schema.range_key(), filter) {
        (None, Some(f)) if f.filter.is_some() => Err(NodeError::invalid_argument(format!(
            "schema '{}' is a Single schema; range filters apply only to Range schemas",
            schema.name
        ))),
        (_, f) => KeyFilter::from_proto(f).map_err(NodeError::invalid_argument),
    }
}

/// The records at `keys` with the values of `fields` (as JSON text, or as a Struct).
fn read_records(
    store: &Store,
    schema: &str,
    keys: Vec<String>,
    fields: &[String],
    json_values: bool,
) -> Result<Vec<Record>, NodeError> {
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let values = store
            .read_values(schema, &key, fields)
            .map_err(NodeError::from)?;
        let mut m = Map::new();
        for (f, v) in fields.iter().zip(values) {
            m.insert(f.clone(), v.unwrap_or(Json::Null));
        }
        records.push(if json_values {
            Record {
                range_key: key,
                fields: None,
                fields_json: Json::Object(m).to_string(),
            }
        } else {
            Record {
                range_key: key,
                fields: Some(map_to_struct(&m)),
                fields_json: String::new(),
            }
        });
    }
    Ok(records)
}

impl Data {
    /// Starts the group-commit writer thread (the error is the OS refusing a thread).
    pub fn new(
        store: Store,
        identities: Identities,
        metrics: Arc<NodeMetrics>,
        subscribe: crate::subscribe::SubscribeLimits,
    ) -> std::io::Result<Self> {
        let hub = crate::hub::ChangeHub::new(subscribe.buffer);
        let commits = Committer::start(
            store.clone(),
            metrics.clone(),
            Limits::default(),
            hub.clone(),
        )?;
        let pager = crate::paging::Pager::load(&store).map_err(std::io::Error::other)?;
        let groups = crate::groups::Groups::new(
            store.clone(),
            hub.clone(),
            crate::groups::GroupSettings::default(),
        );
        Ok(Data {
            groups,
            replicas: crate::follow::Replicas::default(),
            hub,
            subscriptions: crate::slots::ClientSlots::new(
                subscribe.max_subscriptions,
                subscribe.per_client,
                "subscriptions",
                "--max-subscriptions, --max-subscriptions-per-client",
            ),
            scans: crate::slots::ClientSlots::new(
                subscribe.max_scans,
                subscribe.scans_per_client,
                "scans",
                "--max-scans, --max-scans-per-client",
            ),
            pager,
            store,
            identities,
            metrics,
            commits,
            idempotency_window_ms: DEFAULT_IDEMPOTENCY_WINDOW_MS,
        })
    }

    /// How long applied idempotency keys are remembered.
    pub fn with_idempotency_window(mut self, window: std::time::Duration) -> Self {
        self.idempotency_window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Settings of the schema groups (before any is opened).
    pub fn with_group_settings(mut self, mut settings: crate::groups::GroupSettings) -> Self {
        settings.idempotency_window_ms = self.idempotency_window_ms;
        self.groups = crate::groups::Groups::new(self.store.clone(), self.hub.clone(), settings);
        self
    }

    pub fn groups(&self) -> &crate::groups::Groups {
        &self.groups
    }

    /// For a schema group on this node: linearize a read unless it asks for the local copy, and
    /// say how it was read. `None` for other schemas.
    async fn group_read(
        &self,
        schema: &str,
        consistency: i32,
    ) -> Result<Option<fold_proto::v1::GroupReadInfo>, NodeError> {
        let Some(member) = self.groups.get(schema) else {
            return Ok(None);
        };
        let linearizable = consistency != fold_proto::v1::Consistency::Local as i32;
        if linearizable {
            self.groups.linearize(&member, schema).await?;
        }
        let head = self.store.log_bounds(schema).map_err(NodeError::from)?.head;
        Ok(Some(fold_proto::v1::GroupReadInfo {
            linearizable,
            as_of_sequence: head,
        }))
    }

    /// The idempotency of a request with `key` and these plans, if it has a key.
    fn idempotency(
        &self,
        who: &Principal,
        key: &str,
        plans: &[MutationPlan],
    ) -> Result<Option<Idempotency>, NodeError> {
        if key.is_empty() {
            return Ok(None);
        }
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(NodeError::invalid_argument(format!(
                "'idempotency_key' is {} bytes; at most {MAX_IDEMPOTENCY_KEY}",
                key.len()
            )));
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in plans {
            h.update(format!("{:?}\0{}\0", p.kind, p.range_key));
            h.update(serde_json::to_vec(&p.writes).unwrap_or_default());
            h.update([0xff]);
        }
        Ok(Some(Idempotency {
            key: key.to_string(),
            scope: who.identity_key(),
            fingerprint: hex::encode(h.finalize()),
            window_ms: self.idempotency_window_ms,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn replicas(&self) -> &crate::follow::Replicas {
        &self.replicas
    }

    pub fn hub(&self) -> &crate::hub::ChangeHub {
        &self.hub
    }

    /// Refuse writes to a schema this node follows.
    fn writable(&self, schema: &str) -> Result<(), NodeError> {
        match self.replicas.source_of(schema) {
            Some(source) => Err(crate::follow::read_only(schema, &source)),
            None => Ok(()),
        }
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    fn requester(&self, who: &Principal) -> Result<Requester, NodeError> {
        let r = self.identities.resolve(who).map_err(NodeError::from)?;
        if r.distance.is_none() {
            return Err(NodeError::permission_denied(format!(
                "{} is not trusted by this node (trust table entry 'deny', or unknown peers are denied); set its trust with Network.SetTrust",
                r.label
            )));
        }
        Ok(r)
    }

    /// The requester of a read of `schema`: as [`requester`](Self::requester), and on a replica
    /// at its path distance through the source: the distance the source grants this node plus
    /// the requester's distance here, exactly as the source would check a request forwarded
    /// through this node (docs/SECURITY.md, "Replicas").
    fn requester_for(&self, who: &Principal, schema: &str) -> Result<Requester, NodeError> {
        self.through_source(self.requester(who)?, schema)
    }

    /// As [`requester_for`](Self::requester_for) for a requester resolved already; on a
    /// replica whose source has not answered yet, waits a little for its first answer.
    async fn read_requester(&self, r: Requester, schema: &str) -> Result<Requester, NodeError> {
        /// How long a read of a new replica waits for its source's first answer.
        const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        if self.replicas.grant(schema) == Some(None) {
            self.replicas.wait_grant(schema, FIRST_ANSWER_WAIT).await;
        }
        self.through_source(r, schema)
    }

    /// `r` at its distance through the source, when `schema` is a replica's copy.
    fn through_source(&self, mut r: Requester, schema: &str) -> Result<Requester, NodeError> {
        if self.replicas.reseeding(schema) {
            return Err(NodeError::unavailable(format!(
                "schema '{schema}' here is a replica being re-seeded from a snapshot of its source: its copy is incomplete until that ends; try again shortly, or read from the source"
            )));
        }
        if let Some(grant) = self.replicas.grant(schema) {
            let Some(grant) = grant else {
                return Err(NodeError::unavailable(format!(
                    "schema '{schema}' here is a replica whose source has not answered yet, so the distance the source grants this node is not known and its data cannot be checked; try again shortly, or read from the source"
                )));
            };
            r.distance = r.distance.map(|d| d.saturating_add(grant));
        }
        Ok(r)
    }

    /// The requester to name in a request this node forwards for `who`: its distance here and
    /// its proven key. A requester this node denies is refused here, before anything is sent.
    pub fn forwardable_requester(
        &self,
        who: &Principal,
    ) -> Result<fold_proto::wire::Requester, NodeError> {
        let r = self.requester(who)?;
        r.to_wire().ok_or_else(|| {
            NodeError::permission_denied(format!("{} is not trusted by this node", r.label))
        })
    }

    /// The schema if it exists and is approved.
    fn usable_schema(&self, name: &str) -> Result<Arc<Schema>, NodeError> {
        if name.is_empty() {
            return Err(NodeError::invalid_argument("'schema' is required"));
        }
        match self.store.schema(name) {
            None => Err(NodeError::not_found(format!("schema '{name}' not found"))),
            Some((s, SchemaState::Approved)) => Ok(s),
            Some((_, state)) => Err(NodeError::failed_precondition(format!(
                "schema '{name}' is {} and must be approved first (FoldNode.SetSchemaState with state SCHEMA_STATE_APPROVED)",
                state.as_str()
            ))),
        }
    }

    // ---- schemas -----------------------------------------------------------------------------

    pub async fn load_schema(
        &self,
        json: &str,
        approve: bool,
    ) -> Result<(String, LoadOutcome), NodeError> {
        let schema = schema::parse(json)
            .map_err(|e| NodeError::invalid_argument(format!("invalid schema: {e}")))?;
        let name = schema.name.clone();
        let store = self.store.clone();
        let outcome = storage(&self.metrics, "load_schema", Runs::Pool, move || {
            store.load_schema(schema, approve).map_err(|e| match e {
                LoadError::Conflict { .. } => NodeError::already_exists(e.to_string()),
                LoadError::Store(e) => NodeError::from(e),
            })
        })
        .await?;
        Ok((name, outcome))
    }

    pub async fn set_state(&self, name: &str, state: i32) -> Result<SchemaState, NodeError> {
        let Some(state) = state_from_proto(state) else {
            return Err(NodeError::invalid_argument(
                "'state' must be SCHEMA_STATE_APPROVED, SCHEMA_STATE_BLOCKED or SCHEMA_STATE_AVAILABLE",
            ));
        };
        let store = self.store.clone();
        let n = name.to_string();
        let prev = storage(&self.metrics, "set_schema_state", Runs::Pool, move || {
            store.set_state(&n, state).map_err(NodeError::from)
        })
        .await?;
        prev.ok_or_else(|| NodeError::not_found(format!("schema '{name}' not found")))
    }

    // ---- queries -----------------------------------------------------------------------------

    pub async fn query(
        &self,
        who: &Principal,
        req: QueryRequest,
    ) -> Result<QueryResponse, NodeError> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let requester = self.read_requester(requester, &schema.name).await?;
        query_fields(&schema, &req.fields, &requester)?;
        let filter = query_filter(&schema, req.filter.as_ref())?;
        let group = self.group_read(&schema.name, req.consistency).await?;
        // Paging: keyset, after the key a token names (see paging.rs).
        let paged = req.page_size > 0 || !req.page_token.is_empty();
        let scope = format!("{}|{}|{:?}", schema.name, schema.hash, filter);
        let after = self.page_after(paged, &schema, &scope, &req.page_token)?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let pager = self.pager.clone();
        let store = self.store.clone();
        let fields = req.fields.clone();
        let json_values = req.json_values;
        let replica = self.replica_info(&schema.name)?;
        // A Single schema or one key reads one record; anything else scans, on the blocking
        // pool, so that a client going away (this future dropped) stops the scan.
        let runs = match (schema.range_key(), &filter) {
            (None, _) | (Some(_), KeyFilter::Key(_)) => Runs::Inline,
            _ => Runs::Pool,
        };
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let (records, next_page_token) = storage(&self.metrics, "query", runs, move || {
            let mut next = String::new();
            let keys = match schema.range_key() {
                None => vec![String::new()],
                Some(rk) if paged => {
                    let (keys, more) = store
                        .range_rows_page_cancellable(
                            &schema.name,
                            rk,
                            &filter,
                            after.as_deref(),
                            page_size,
                            &|| cancel.load(std::sync::atomic::Ordering::Relaxed),
                        )
                        .map_err(NodeError::from)?;
                    if more && let Some(last) = keys.last() {
                        next = pager.token(&scope, last);
                    }
                    keys
                }
                Some(rk) => store
                    .range_rows_cancellable(&schema.name, rk, &filter, &|| {
                        cancel.load(std::sync::atomic::Ordering::Relaxed)
                    })
                    .map_err(|e| match e {
                        RowsError::TooMany => NodeError::resource_exhausted(format!(
                            "{e}; or page through them with 'page_size'"
                        )),
                        RowsError::Store(e) => NodeError::from(e),
                    })?,
            };
            let records = read_records(&store, &schema.name, keys, &fields, json_values)?;
            Ok((records, next))
        })
        .await?;
        Ok(QueryResponse {
            answers: Vec::new(),
            attempts: 0,
            records,
            node_id: String::new(),
            next_page_token,
            replica,
            group,
        })
    }

    /// Where a page of a query starts: after the key its token names (none for the first page,
    /// or when the query is not paged).
    fn page_after(
        &self,
        paged: bool,
        schema: &Schema,
        scope: &str,
        token: &str,
    ) -> Result<Option<String>, NodeError> {
        Ok(match (paged, schema.range_key()) {
            (false, _) => None,
            (true, None) if !token.is_empty() => {
                return Err(NodeError::invalid_argument(format!(
                    "schema '{}' is a Single schema: its one record needs no paging",
                    schema.name
                )));
            }
            (true, None) => None,
            (true, Some(_)) if token.is_empty() => None,
            (true, Some(_)) => Some(
                self.pager
                    .open(scope, token)
                    .map_err(NodeError::invalid_argument)?,
            ),
        })
    }

    /// A replica says so, and as of which sequence: every change up to the head read here is in
    /// what the query reads next.
    fn replica_info(&self, schema: &str) -> Result<Option<v1::ReplicaInfo>, NodeError> {
        let Some(source_node_id) = self.replicas.source_of(schema) else {
            return Ok(None);
        };
        Ok(Some(v1::ReplicaInfo {
            source_node_id,
            as_of_sequence: self.store.log_bounds(schema).map_err(NodeError::from)?.head,
        }))
    }

    // ---- mutations ---------------------------------------------------------------------------

    /// Apply a mutation for `who`. With a `deadline` (a forwarded request's), the write is
    /// refused with DEADLINE_EXCEEDED, and nothing is written, when the deadline has passed by
    /// the time the write would start.
    pub async fn mutate(
        &self,
        who: &Principal,
        req: MutateRequest,
        deadline: Option<std::time::SystemTime>,
    ) -> Result<MutateResponse, NodeError> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        self.writable(&schema.name)?;
        let data = request_data(req.data.as_ref(), &req.data_json)?;
        let plan = mutation_plan(&schema, &requester, req.mutation_type, data)?;
        let range_key = plan.range_key.clone();
        let bytes = req.data.as_ref().map_or(0, Message::encoded_len);
        let plans = vec![plan];
        let idem = self.idempotency(who, &req.idempotency_key, &plans)?;
        let commit = self.commit("mutate", schema, plans, bytes, idem);
        let committed = match deadline {
            None => commit.await,
            // A forwarded request's deadline: past it, the write is not started (a job whose
            // caller has gone is skipped by the writer), and nothing is written.
            Some(d) => {
                let left = d
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                match tokio::time::timeout(left, commit).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(NodeError::deadline_exceeded(
                            "the request's deadline passed before the write was committed",
                        ));
                    }
                }
            }
        }
        .map_err(NodeError::from)?;
        let sequence = committed.sequences.first().copied().unwrap_or(0);
        let (fields, version_ids) = committed.written.into_iter().flatten().unzip();
        Ok(MutateResponse {
            fields,
            range_key,
            node_id: String::new(),
            version_ids,
            replayed: committed.replayed,
            sequence,
        })
    }

    /// Many mutations of one schema, all or none in one transaction. A refusal names the first
    /// failing record: message `record N: ...` and trailer [`FAILED_RECORD_TRAILER`].
    pub async fn batch_mutate(
        &self,
        who: &Principal,
        req: BatchMutateRequest,
    ) -> Result<BatchMutateResponse, NodeError> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        self.writable(&schema.name)?;
        if req.mutations.is_empty() {
            return Err(NodeError::invalid_argument(
                "'mutations' is empty: nothing to write",
            ));
        }
        if req.mutations.len() > MAX_BATCH_MUTATIONS {
            return Err(NodeError::resource_exhausted(format!(
                "the batch has {} mutations; at most {MAX_BATCH_MUTATIONS} per call",
                req.mutations.len()
            )));
        }
        let mut plans = Vec::with_capacity(req.mutations.len());
        let mut bytes = 0;
        for (i, m) in req.mutations.iter().enumerate() {
            let plan = request_data(m.data.as_ref(), &m.data_json)
                .and_then(|data| mutation_plan(&schema, &requester, m.mutation_type, data))
                .map_err(|e| NodeError::Record {
                    index: i,
                    error: Box::new(e),
                })?;
            bytes += m.data.as_ref().map_or(0, Message::encoded_len);
            plans.push(plan);
        }
        let keys: Vec<String> = plans.iter().map(|p| p.range_key.clone()).collect();
        let idem = self.idempotency(who, &req.idempotency_key, &plans)?;
        let committed = self
            .commit("batch_mutate", schema, plans, bytes, idem)
            .await
            .map_err(|e| match e {
                JobError::Refused { index, error } => NodeError::Record {
                    index,
                    error: Box::new(error.into()),
                },
                e => e.into(),
            })?;
        let mut sequences = committed.sequences.into_iter();
        let results = committed
            .written
            .into_iter()
            .zip(keys)
            .map(|(w, range_key)| {
                let (fields, version_ids) = w.into_iter().unzip();
                BatchMutationResult {
                    fields,
                    range_key,
                    version_ids,
                    sequence: sequences.next().unwrap_or(0),
                }
            })
            .collect();
        Ok(BatchMutateResponse {
            results,
            node_id: String::new(),
            replayed: committed.replayed,
        })
    }

    /// Hand validated mutations to the group-commit writer, measured as storage operation `op`.
    async fn commit(
        &self,
        op: &'static str,
        schema: Arc<Schema>,
        plans: Vec<MutationPlan>,
        bytes: usize,
        idempotency: Option<Idempotency>,
    ) -> Result<crate::commit::Committed, JobError> {
        let started = std::time::Instant::now();
        let r = match self.groups.get(&schema.name) {
            // A schema group's write is proposed to the group (this node leads it; else the
            // group refuses it, naming the leader, and nothing is written).
            Some(member) => {
                self.groups
                    .propose(&member, &schema.name, plans, idempotency)
                    .await
            }
            None => {
                self.commits
                    .submit_once(schema, plans, bytes, idempotency)
                    .await
            }
        };
        // Refusals by the data (ALREADY_EXISTS, NOT_FOUND) are answers, not storage failures.
        let ok = !matches!(r, Err(JobError::Storage(_) | JobError::Stopped));
        self.metrics.storage(op, ok, started);
        r
    }

    // ---- history -----------------------------------------------------------------------------

    pub async fn history(
        &self,
        who: &Principal,
        req: HistoryRequest,
    ) -> Result<HistoryResponse, NodeError> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let requester = self.read_requester(requester, &schema.name).await?;
        history_target(&schema, &req, &requester)?;
        let store = self.store.clone();
        let json_values = req.json_values;
        // Paging: after the last version a token names (see paging.rs).
        let paged = req.page_size > 0 || !req.page_token.is_empty();
        let scope = format!(
            "history|{}|{}|{}|{}",
            schema.name, schema.hash, req.field, req.range_key
        );
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                self.pager
                    .open(&scope, &req.page_token)
                    .map_err(NodeError::invalid_argument)?,
            )
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let pager = self.pager.clone();
        let (versions, next_page_token) =
            storage(&self.metrics, "history", Runs::InPlace, move || {
                if !paged {
                    return unpaged_history(&store, &schema.name, &req).map(|v| (v, String::new()));
                }
                let (v, more) = store
                    .history_page(
                        &schema.name,
                        &req.field,
                        &req.range_key,
                        after.as_deref(),
                        page_size,
                    )
                    .map_err(|e| match e {
                        StoreError::Corrupt(_) if after.is_some() => NodeError::invalid_argument(
                            "'page_token' names a version this history does not have",
                        ),
                        e => NodeError::from(e),
                    })?;
                let next = match v.last() {
                    Some(last) if more => pager.token(&scope, &last.id),
                    _ => String::new(),
                };
                Ok((v, next))
            })
            .await?;
        Ok(HistoryResponse {
            node_id: String::new(),
            answers: Vec::new(),
            attempts: 0,
            versions: versions
                .into_iter()
                .map(|v| version_to_proto(v, json_values))
                .collect(),
            next_page_token,
        })
    }

    // ---- subscriptions ------------------------------------------------------------------------

    /// A slot for one more open subscription of `who` (--max-subscriptions, per client).
    pub fn subscription_permit(
        &self,
        who: &Principal,
    ) -> Result<crate::slots::ClientSlot, NodeError> {
        self.subscriptions
            .acquire(&who.identity_key())
            .inspect_err(|_| self.metrics.subscription_end("full"))
    }

    /// A slot for one more running Scan of `who` (--max-scans, per client).
    pub fn scan_slot(&self, who: &Principal) -> Result<crate::slots::ClientSlot, NodeError> {
        self.scans.acquire(&who.identity_key())
    }

    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Open a subscription to the changes of a schema of this node (FoldNode.Subscribe).
    pub async fn subscribe(
        &self,
        who: &Principal,
        req: v1::SubscribeRequest,
        node_id: String,
    ) -> Result<crate::subscribe::SubscriptionStream, NodeError> {
        use crate::subscribe::{self, Selection};
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let requester = self.read_requester(requester, &schema.name).await?;
        let fields = readable_fields(&schema, &requester, &req.fields)?;
        let filter = query_filter(&schema, req.filter.as_ref())?;
        let permit = self.subscription_permit(who)?;
        // Registered before the log is read: nothing committed from here on can be missed.
        let listener = self.hub.listen(&schema.name);
        let store = self.store.clone();
        let name = schema.name.clone();
        let bounds = storage(&self.metrics, "subscribe", Runs::Inline, move || {
            store.log_bounds(&name).map_err(NodeError::from)
        })
        .await?;
        if req.from_sequence.saturating_add(1) < bounds.oldest {
            self.metrics.subscription_end("out_of_range");
            return Err(subscribe::out_of_range(
                &schema.name,
                req.from_sequence,
                bounds.oldest,
            ));
        }
        if req.from_sequence > bounds.head {
            return Err(NodeError::out_of_range(format!(
                "from_sequence {} is beyond the head of schema '{}' on this node ({}): this node never assigned it; subscribe from at most the head",
                req.from_sequence, schema.name, bounds.head
            )));
        }
        let recheck = self.recheck(who, &schema, &fields);
        Ok(subscribe::start(
            self.store.clone(),
            self.metrics.clone(),
            self.hub.clone(),
            Selection {
                schema,
                fields,
                filter,
                json_values: req.json_values,
            },
            req.from_sequence,
            listener,
            permit,
            recheck,
            node_id,
        ))
    }

    /// What each progress message of a subscription checks again: the requester is re-resolved
    /// (trust may have changed since the start: `deny`, or a distance the fields no longer
    /// allow, ends the stream), and the schema must still be approved.
    fn recheck(
        &self,
        who: &Principal,
        schema: &Arc<Schema>,
        fields: &[String],
    ) -> Box<dyn Fn() -> Result<(), NodeError> + Send + Sync> {
        let data = self.clone();
        let who = who.clone();
        let schema = schema.clone();
        let fields = fields.to_vec();
        Box::new(move || -> Result<(), NodeError> {
            if !matches!(
                data.store.schema(&schema.name),
                Some((_, SchemaState::Approved))
            ) {
                return Err(NodeError::failed_precondition(format!(
                    "schema '{}' is no longer approved on this node; the subscription ended",
                    schema.name
                )));
            }
            let r = data.requester_for(&who, &schema.name)?;
            for f in &fields {
                if let Some(def) = schema.field(f) {
                    permissions::check(def, Access::Read, &r).map_err(NodeError::from)?;
                }
            }
            Ok(())
        })
    }

    /// The changes of a schema after a sequence, for a node that follows it or subscribes to
    /// it remotely (the `changes` operation). A replica (no `fields`, `readable_only` unset)
    /// needs every field readable and the same definition, policies included. With nothing
    /// new, waits up to `wait_ms` (at most 5 s, within `deadline`) for the next change. The
    /// answer never exceeds [`CHANGES_BUDGET`]: a single change over it travels in parts
    /// (`ChangesResponse.chunk`).
    pub async fn changes(
        &self,
        who: &Principal,
        req: fold_proto::wire::ChangesRequest,
        deadline: Option<std::time::SystemTime>,
    ) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
        const MAX_CHANGES: usize = 1000;
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let requester = self.read_requester(requester, &schema.name).await?;
        same_definition(&schema, &req)?;
        let sel = self.changes_selection(&schema, &requester, &req)?;
        if req.snapshot {
            return self.snapshot(sel, &requester, &req).await;
        }
        let limit = match req.limit {
            0 => 500,
            n => (n as usize).min(MAX_CHANGES),
        };
        // Registered before the head is read: a change committed from here on wakes the wait.
        let rx = self.hub.listen(&schema.name).rx;
        let bounds = self
            .changes_bounds(&schema.name, &req, rx, deadline)
            .await?;
        let store = self.store.clone();
        let name = schema.name.clone();
        let after = req.after_sequence;
        let digest = !req.definition_hash.is_empty() && after > 0 && after >= bounds.oldest;
        let (page, after_digest) = storage(&self.metrics, "changes", Runs::InPlace, move || {
            let from = if digest { after - 1 } else { after };
            let mut page = store
                .changes_after(&name, from, limit + usize::from(digest))
                .map_err(NodeError::from)?;
            let mut after_digest = String::new();
            if digest && page.first().is_some_and(|e| e.sequence == after) {
                after_digest = crate::follow::change_digest(&page.remove(0));
            }
            Ok((page, after_digest))
        })
        .await?;
        let mut resp = changes_page(&sel, &page, after, req.chunk_offset)?;
        resp.head_sequence = bounds.head.max(resp.through_sequence);
        resp.oldest_sequence = bounds.oldest;
        resp.requester_distance = requester.distance.unwrap_or(0);
        resp.after_digest = after_digest;
        Ok(resp)
    }

    /// A page of the schema's current state, for a replica re-seeding (`changes` with
    /// `snapshot`): a replica's request only (every field, the same definition).
    async fn snapshot(
        &self,
        sel: crate::subscribe::Selection,
        requester: &Requester,
        req: &fold_proto::wire::ChangesRequest,
    ) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
        const SNAPSHOT_CELLS: usize = 1000;
        if req.definition_hash.is_empty() || !req.fields.is_empty() || req.readable_only {
            return Err(NodeError::invalid_argument(
                "a snapshot is for replicas: every field, with 'definition_hash'",
            ));
        }
        let store = self.store.clone();
        let name = sel.schema.name.clone();
        let (f, k) = (
            req.snapshot_after_field.clone(),
            req.snapshot_after_key.clone(),
        );
        let page = storage(&self.metrics, "snapshot", Runs::InPlace, move || {
            let after = (!f.is_empty() || !k.is_empty()).then_some((f.as_str(), k.as_str()));
            store
                .snapshot_page(&name, after, SNAPSHOT_CELLS, CHANGES_BUDGET)
                .map_err(NodeError::from)
        })
        .await?;
        let cells = page
            .cells
            .into_iter()
            .filter_map(|(field, key, v)| {
                sel.view(&crate::store::ChangeEvent {
                    schema: sel.schema.name.clone(),
                    sequence: v.seq,
                    range_key: key,
                    versions: vec![(field, v)],
                })
            })
            .collect();
        Ok(fold_proto::wire::ChangesResponse {
            requester_distance: requester.distance.unwrap_or(0),
            head_sequence: page.head,
            snapshot: Some(fold_proto::wire::SnapshotPage {
                cells,
                more: page.more,
                as_of_sequence: page.head,
            }),
            ..Default::default()
        })
    }

    /// What a `changes` request reads: its fields (every field, each readable, for a replica)
    /// and its key filter.
    fn changes_selection(
        &self,
        schema: &Arc<Schema>,
        requester: &Requester,
        req: &fold_proto::wire::ChangesRequest,
    ) -> Result<crate::subscribe::Selection, NodeError> {
        let fields = if !req.fields.is_empty() || req.readable_only {
            readable_fields(schema, requester, &req.fields)?
        } else {
            let all: Vec<String> = schema.fields.keys().cloned().collect();
            readable_fields(schema, requester, &all)?
        };
        let filter = match (schema.range_key(), req.filter.as_ref()) {
            (None, Some(f)) if f.filter.is_some() => {
                return Err(NodeError::invalid_argument(format!(
                    "schema '{}' is a Single schema; range filters apply only to Range schemas",
                    schema.name
                )));
            }
            (_, f) => KeyFilter::from_proto(f).map_err(NodeError::invalid_argument)?,
        };
        Ok(crate::subscribe::Selection {
            schema: schema.clone(),
            fields,
            filter,
            json_values: true,
        })
    }

    /// The log's bounds for a `changes` request, after its long poll: refused when the changes
    /// after `after_sequence` are gone or it was never assigned; with nothing new, waits.
    async fn changes_bounds(
        &self,
        name: &str,
        req: &fold_proto::wire::ChangesRequest,
        mut rx: tokio::sync::broadcast::Receiver<u64>,
        deadline: Option<std::time::SystemTime>,
    ) -> Result<crate::store::LogBounds, NodeError> {
        const MAX_WAIT_MS: u32 = 5000;
        let store = self.store.clone();
        let mut bounds =
            tokio::task::block_in_place(|| store.log_bounds(name)).map_err(NodeError::from)?;
        if req.after_sequence.saturating_add(1) < bounds.oldest {
            return Err(crate::subscribe::out_of_range(
                name,
                req.after_sequence,
                bounds.oldest,
            ));
        }
        if req.after_sequence > bounds.head {
            return Err(NodeError::out_of_range(format!(
                "after_sequence {} is beyond the head of schema '{name}' on this node ({}): this node never assigned it",
                req.after_sequence, bounds.head
            )));
        }
        if req.after_sequence == bounds.head && req.wait_ms > 0 {
            let mut wait =
                std::time::Duration::from_millis(u64::from(req.wait_ms.min(MAX_WAIT_MS)));
            if let Some(d) = deadline {
                // Answer (with nothing) before the requester gives up.
                let left = d
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                wait = wait.min(left.saturating_sub(left / 4));
            }
            // Any outcome (a change, a lag, the wait over) is followed by reading the log.
            let _ = tokio::time::timeout(wait, rx.recv()).await;
            bounds =
                tokio::task::block_in_place(|| store.log_bounds(name)).map_err(NodeError::from)?;
        }
        Ok(bounds)
    }

    /// Which of `names` are approved schemas here.
    pub fn served(&self, names: &[String]) -> Vec<Arc<Schema>> {
        names
            .iter()
            .filter_map(|n| match self.store.schema(n) {
                Some((s, SchemaState::Approved)) => Some(s),
                _ => None,
            })
            .collect()
    }
}

/// Most bytes of changes in one `changes` answer (well under the link's 4 MiB message limit,
/// with room for the envelope). A single change over it is sent in parts of this size.
pub const CHANGES_BUDGET: usize = 1024 * 1024;

/// A replica's definition must be the source's, policies included (it enforces them).
fn same_definition(
    schema: &Schema,
    req: &fold_proto::wire::ChangesRequest,
) -> Result<(), NodeError> {
    if !req.schema_hash.is_empty() && req.schema_hash != schema.hash {
        return Err(NodeError::failed_precondition(format!(
            "schema '{}' here has hash {}, the follower's has {}: a replica needs the same definition",
            schema.name, schema.hash, req.schema_hash
        )));
    }
    if !req.definition_hash.is_empty() && req.definition_hash != schema.definition_hash {
        return Err(NodeError::failed_precondition(format!(
            "schema '{}' here has definition_hash {}, the follower's has {}: the same fields with other permission policies; a replica enforces the source's policies, so load exactly the source's definition (GetSchema on the source)",
            schema.name, schema.definition_hash, req.definition_hash
        )));
    }
    Ok(())
}

/// The changes of `page` the selection takes, up to [`CHANGES_BUDGET`] bytes, never more: a
/// change that would pass it waits for the next answer, and one that alone is over it is sent
/// in parts from `chunk_offset`.
fn changes_page(
    sel: &crate::subscribe::Selection,
    page: &[crate::store::ChangeEvent],
    after: u64,
    chunk_offset: u64,
) -> Result<fold_proto::wire::ChangesResponse, NodeError> {
    let mut resp = fold_proto::wire::ChangesResponse {
        through_sequence: after,
        ..Default::default()
    };
    let mut bytes = 0;
    for e in page {
        let Some(c) = sel.view(e) else {
            if chunk_offset == 0 {
                resp.through_sequence = e.sequence;
            }
            continue;
        };
        let len = c.encoded_len();
        if chunk_offset > 0 || (resp.changes.is_empty() && len > CHANGES_BUDGET) {
            resp.chunk = Some(change_chunk(&c, chunk_offset)?);
            return Ok(resp);
        }
        if bytes + len > CHANGES_BUDGET {
            break;
        }
        bytes += len;
        resp.through_sequence = e.sequence;
        resp.changes.push(c);
    }
    if chunk_offset > 0 {
        return Err(NodeError::aborted(format!(
            "change {} is no longer the one being sent in parts; ask again from chunk_offset 0",
            after + 1
        )));
    }
    Ok(resp)
}

/// The part of `c`'s encoding from `offset`, at most [`CHANGES_BUDGET`] bytes.
fn change_chunk(c: &v1::Change, offset: u64) -> Result<fold_proto::wire::ChangeChunk, NodeError> {
    let bytes = c.encode_to_vec();
    let total = bytes.len() as u64;
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    if total <= CHANGES_BUDGET as u64 || start >= bytes.len() {
        return Err(NodeError::aborted(format!(
            "change {} is {total} bytes; chunk_offset {offset} does not fall inside a change sent in parts; ask again from chunk_offset 0",
            c.sequence
        )));
    }
    let end = (start + CHANGES_BUDGET).min(bytes.len());
    Ok(fold_proto::wire::ChangeChunk {
        sequence: c.sequence,
        offset,
        total,
        data: bytes[start..end].to_vec(),
    })
}

/// The fields a subscription sends: each named one (must exist and be readable, as for Query),
/// or, when none is named, every field `requester` may read. In schema order.
fn readable_fields(
    schema: &Schema,
    requester: &Requester,
    named: &[String],
) -> Result<Vec<String>, NodeError> {
    if named.is_empty() {
        let fields: Vec<String> = schema
            .fields
            .iter()
            .filter(|(_, def)| permissions::check(def, Access::Read, requester).is_ok())
            .map(|(f, _)| f.clone())
            .collect();
        if fields.is_empty() {
            return Err(NodeError::permission_denied(format!(
                "{} may read no field of schema '{}'",
                requester.label, schema.name
            )));
        }
        return Ok(fields);
    }
    for f in named {
        let Some(def) = schema.field(f) else {
            return Err(NodeError::not_found(format!(
                "field '{f}' not found in schema '{}'",
                schema.name
            )));
        };
        permissions::check(def, Access::Read, requester).map_err(NodeError::from)?;
    }
    Ok(schema
        .fields
        .keys()
        .filter(|f| named.contains(f))
        .cloned()
        .collect())
}

fn range_key_value(schema: &str, rk: &str, v: Option<&Json>) -> Result<String, NodeError> {
    let key = match v {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        Some(Json::Null) | None => {
            return Err(NodeError::invalid_argument(format!(
                "schema '{schema}' is a Range schema: 'data' must include the range key '{rk}'"
            )));
        }
        Some(other) => {
            return Err(NodeError::invalid_argument(format!(
                "range key '{rk}' must be a string or a number, got {other}"
            )));
        }
    };
    if key.is_empty() {
        return Err(NodeError::invalid_argument(format!(
            "range key '{rk}' must not be empty"
        )));
    }
    if key.len() > MAX_RANGE_KEY_LEN {
        return Err(NodeError::invalid_argument(format!(
            "range key '{rk}' is longer than {MAX_RANGE_KEY_LEN} bytes"
        )));
    }
    Ok(key)
}

/// Check one mutation against the schema and the requester's permissions and say which fields
/// it touches.
/// A mutation's data, from the `data` Struct (numbers are doubles; NaN and ±Infinity refused)
/// or from `data_json` text (exact: integers of any size, decimals as written).
fn request_data(
    data: Option<&prost_types::Struct>,
    data_json: &str,
) -> Result<Map<String, Json>, NodeError> {
    match (data, data_json.is_empty()) {
        (Some(d), true) => struct_to_map_checked(d).map_err(NodeError::invalid_argument),
        (None, true) => Ok(Map::new()),
        (None, false) => match serde_json::from_str::<Json>(data_json) {
            Ok(Json::Object(m)) => Ok(m),
            Ok(_) => Err(NodeError::invalid_argument(
                "'data_json' must be a JSON object of field -> value",
            )),
            Err(e) => Err(NodeError::invalid_argument(format!(
                "'data_json' is not valid JSON: {e}"
            ))),
        },
        (Some(d), false) if d.fields.is_empty() => request_data(None, data_json),
        (Some(_), false) => Err(NodeError::invalid_argument(
            "give the values either as 'data' or as 'data_json', not both",
        )),
    }
}

fn mutation_plan(
    schema: &Schema,
    requester: &Requester,
    mutation_type: i32,
    data: Map<String, Json>,
) -> Result<MutationPlan, NodeError> {
    let kind = match MutationType::try_from(mutation_type) {
        Ok(MutationType::Create) => MutationKind::Create,
        Ok(MutationType::Update) => MutationKind::Update,
        Ok(MutationType::Delete) => MutationKind::Delete,
        _ => {
            return Err(NodeError::invalid_argument(
                "'mutation_type' must be MUTATION_TYPE_CREATE, MUTATION_TYPE_UPDATE or MUTATION_TYPE_DELETE",
            ));
        }
    };
    if data.is_empty() {
        return Err(NodeError::invalid_argument(
            "'data' is empty: no fields to write",
        ));
    }
    for f in data.keys() {
        if schema.field(f).is_none() {
            return Err(NodeError::not_found(format!(
                "field '{f}' not found in schema '{}'",
                schema.name
            )));
        }
    }
    let range_key = match schema.range_key() {
        None => String::new(),
        Some(rk) => range_key_value(&schema.name, rk, data.get(rk))?,
    };
    // Which fields this mutation touches.
    let mut writes: Vec<(String, Json)> = data.into_iter().collect();
    if kind == MutationKind::Delete
        && let Some(rk) = schema.range_key()
    {
        if writes.len() == 1 {
            // Only the key: delete the whole record.
            writes = schema
                .fields
                .keys()
                .map(|f| (f.clone(), Json::Null))
                .collect();
        } else {
            writes.retain(|(f, _)| f != rk);
        }
    }
    for (f, _) in &writes {
        if let Some(def) = schema.field(f) {
            permissions::check(def, Access::Write, requester).map_err(NodeError::from)?;
        }
    }
    Ok(MutationPlan {
        kind,
        range_key,
        writes,
        writer: requester.label.clone(),
    })
}

fn version_to_proto(v: VersionRecord, json_values: bool) -> FieldVersion {
    let secs = (v.written_at_ms / 1000) as i64;
    let nanos = ((v.written_at_ms % 1000) * 1_000_000) as i32;
    let (value, value_json) = if json_values {
        (None, v.value.to_string())
    } else {
        (Some(json_to_value(&v.value)), String::new())
    };
    FieldVersion {
        version_id: v.id,
        value,
        value_json,
        deleted: v.deleted,
        written_at: Some(prost_types::Timestamp {
            seconds: secs,
            nanos,
        }),
        writer: v.writer,
        previous_version_id: v.prev.unwrap_or_default(),
        sequence: v.seq,
        mutation_type: match v.mutation {
            MutationKind::Create => MutationType::Create,
            MutationKind::Update => MutationType::Update,
            MutationKind::Delete => MutationType::Delete,
        } as i32,
    }
}
