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
use tonic::Status;

use crate::commit::{Committer, JobError, Limits};
use crate::filter::KeyFilter;
use crate::identity::{Identities, Principal, Requester};
use crate::metrics::NodeMetrics;
use crate::permissions::{self, Access, Denied};
use crate::schema::{self, Schema};
use crate::store::{
    Idempotency, LoadError, LoadOutcome, MutationError, MutationKind, MutationPlan, RowsError,
    SchemaState, Store, StoreError, VersionRecord,
};

/// Most mutations one BatchMutate call may carry.
pub const MAX_BATCH_MUTATIONS: usize = 10_000;

/// Trailer of a refused BatchMutate naming the failing record's index.
pub const FAILED_RECORD_TRAILER: &str = "fold-failed-record";

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
    hub: crate::subscribe::ChangeHub,
    /// One permit per open subscription (--max-subscriptions).
    subscriptions: Arc<tokio::sync::Semaphore>,
    /// The schemas this node follows (read-only replicas of another node's).
    replicas: crate::follow::Replicas,
}

pub fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::internal(e.to_string())
}

fn denied_status(e: Denied) -> Status {
    match e {
        Denied::NotWritable { .. } => Status::failed_precondition(e.to_string()),
        Denied::Distance { .. } => Status::permission_denied(e.to_string()),
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
) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    let started = std::time::Instant::now();
    let r = match runs {
        Runs::Inline => f(),
        Runs::InPlace => tokio::task::block_in_place(f),
        Runs::Pool => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Status::internal(format!("storage task failed: {e}")))?,
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
    }
}

impl Data {
    /// Starts the group-commit writer thread (the error is the OS refusing a thread).
    pub fn new(
        store: Store,
        identities: Identities,
        metrics: Arc<NodeMetrics>,
        subscribe: crate::subscribe::SubscribeLimits,
    ) -> std::io::Result<Self> {
        let hub = crate::subscribe::ChangeHub::new(subscribe.buffer);
        let commits = Committer::start(
            store.clone(),
            metrics.clone(),
            Limits::default(),
            hub.clone(),
        )?;
        let pager = crate::paging::Pager::load(&store).map_err(std::io::Error::other)?;
        Ok(Data {
            replicas: crate::follow::Replicas::default(),
            hub,
            subscriptions: Arc::new(tokio::sync::Semaphore::new(subscribe.max_subscriptions)),
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

    /// The idempotency of a request with `key` and these plans, if it has a key.
    fn idempotency(
        &self,
        key: &str,
        plans: &[MutationPlan],
    ) -> Result<Option<Idempotency>, Status> {
        if key.is_empty() {
            return Ok(None);
        }
        if key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(Status::invalid_argument(format!(
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

    pub fn hub(&self) -> &crate::subscribe::ChangeHub {
        &self.hub
    }

    /// Refuse writes to a schema this node follows.
    fn writable(&self, schema: &str) -> Result<(), Status> {
        match self.replicas.source_of(schema) {
            Some(source) => Err(crate::follow::read_only(schema, &source)),
            None => Ok(()),
        }
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    fn requester(&self, who: &Principal) -> Result<Requester, Status> {
        let r = self.identities.resolve(who).map_err(store_status)?;
        if r.distance.is_none() {
            return Err(Status::permission_denied(format!(
                "{} is not trusted by this node (trust table entry 'deny', or unknown peers are denied); set its trust with Network.SetTrust",
                r.label
            )));
        }
        Ok(r)
    }

    /// The requester to name in a request this node forwards for `who`: its distance here and
    /// its proven key. A requester this node denies is refused here, before anything is sent.
    pub fn forwardable_requester(
        &self,
        who: &Principal,
    ) -> Result<fold_proto::wire::Requester, Status> {
        let r = self.requester(who)?;
        r.to_wire().ok_or_else(|| {
            Status::permission_denied(format!("{} is not trusted by this node", r.label))
        })
    }

    /// The schema if it exists and is approved.
    fn usable_schema(&self, name: &str) -> Result<Arc<Schema>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("'schema' is required"));
        }
        match self.store.schema(name) {
            None => Err(Status::not_found(format!("schema '{name}' not found"))),
            Some((s, SchemaState::Approved)) => Ok(s),
            Some((_, state)) => Err(Status::failed_precondition(format!(
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
    ) -> Result<(String, LoadOutcome), Status> {
        let schema = schema::parse(json)
            .map_err(|e| Status::invalid_argument(format!("invalid schema: {e}")))?;
        let name = schema.name.clone();
        let store = self.store.clone();
        let outcome = storage(&self.metrics, "load_schema", Runs::Pool, move || {
            store.load_schema(schema, approve).map_err(|e| match e {
                LoadError::Conflict { .. } => Status::already_exists(e.to_string()),
                LoadError::Store(e) => store_status(e),
            })
        })
        .await?;
        Ok((name, outcome))
    }

    pub async fn set_state(&self, name: &str, state: i32) -> Result<SchemaState, Status> {
        let Some(state) = state_from_proto(state) else {
            return Err(Status::invalid_argument(
                "'state' must be SCHEMA_STATE_APPROVED, SCHEMA_STATE_BLOCKED or SCHEMA_STATE_AVAILABLE",
            ));
        };
        let store = self.store.clone();
        let n = name.to_string();
        let prev = storage(&self.metrics, "set_schema_state", Runs::Pool, move || {
            store.set_state(&n, state).map_err(store_status)
        })
        .await?;
        prev.ok_or_else(|| Status::not_found(format!("schema '{name}' not found")))
    }

    // ---- queries -----------------------------------------------------------------------------

    pub async fn query(&self, who: &Principal, req: QueryRequest) -> Result<QueryResponse, Status> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        if req.fields.is_empty() {
            return Err(Status::invalid_argument(format!(
                "'fields' is empty; name the fields to read (schema '{}' has: {})",
                schema.name,
                schema.fields.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        for f in &req.fields {
            let Some(def) = schema.field(f) else {
                return Err(Status::not_found(format!(
                    "field '{f}' not found in schema '{}'",
                    schema.name
                )));
            };
            permissions::check(def, Access::Read, &requester).map_err(denied_status)?;
        }
        let filter = match (schema.range_key(), req.filter.as_ref()) {
            (None, Some(f)) if f.filter.is_some() => {
                return Err(Status::invalid_argument(format!(
                    "schema '{}' is a Single schema; range filters apply only to Range schemas",
                    schema.name
                )));
            }
            (_, f) => KeyFilter::from_proto(f).map_err(Status::invalid_argument)?,
        };
        // Paging: keyset, after the key a token names (see paging.rs).
        let paged = req.page_size > 0 || !req.page_token.is_empty();
        let scope = format!("{}|{}|{:?}", schema.name, schema.hash, filter);
        let after = match (paged, schema.range_key()) {
            (false, _) => None,
            (true, None) if !req.page_token.is_empty() => {
                return Err(Status::invalid_argument(format!(
                    "schema '{}' is a Single schema: its one record needs no paging",
                    schema.name
                )));
            }
            (true, None) => None,
            (true, Some(_)) if req.page_token.is_empty() => None,
            (true, Some(_)) => Some(
                self.pager
                    .open(&scope, &req.page_token)
                    .map_err(Status::invalid_argument)?,
            ),
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let pager = self.pager.clone();
        let store = self.store.clone();
        let fields = req.fields.clone();
        let json_values = req.json_values;
        // A replica says so, and as of which sequence: every change up to the head read here is
        // in what the query reads next.
        let replica = match self.replicas.source_of(&schema.name) {
            None => None,
            Some(source_node_id) => Some(v1::ReplicaInfo {
                source_node_id,
                as_of_sequence: self
                    .store
                    .log_bounds(&schema.name)
                    .map_err(store_status)?
                    .head,
            }),
        };
        // A Single schema or one key reads one record; anything else scans.
        let runs = match (schema.range_key(), &filter) {
            (None, _) | (Some(_), KeyFilter::Key(_)) => Runs::Inline,
            _ => Runs::InPlace,
        };
        let (records, next_page_token) = storage(&self.metrics, "query", runs, move || {
            let mut next = String::new();
            let keys = match schema.range_key() {
                None => vec![String::new()],
                Some(rk) if paged => {
                    let (keys, more) = store
                        .range_rows_page(&schema.name, rk, &filter, after.as_deref(), page_size)
                        .map_err(store_status)?;
                    if more && let Some(last) = keys.last() {
                        next = pager.token(&scope, last);
                    }
                    keys
                }
                Some(rk) => store
                    .range_rows(&schema.name, rk, &filter)
                    .map_err(|e| match e {
                        RowsError::TooMany => Status::resource_exhausted(format!(
                            "{e}; or page through them with 'page_size'"
                        )),
                        RowsError::Store(e) => store_status(e),
                    })?,
            };
            let mut records = Vec::with_capacity(keys.len());
            for key in keys {
                let values = store
                    .read_values(&schema.name, &key, &fields)
                    .map_err(store_status)?;
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
        })
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
    ) -> Result<MutateResponse, Status> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        self.writable(&schema.name)?;
        let data = request_data(req.data.as_ref(), &req.data_json)?;
        let plan = mutation_plan(&schema, &requester, req.mutation_type, data)?;
        let range_key = plan.range_key.clone();
        let bytes = req.data.as_ref().map_or(0, Message::encoded_len);
        let plans = vec![plan];
        let idem = self.idempotency(&req.idempotency_key, &plans)?;
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
                        return Err(Status::deadline_exceeded(
                            "the request's deadline passed before the write was committed",
                        ));
                    }
                }
            }
        }
        .map_err(commit_status)?;
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
    ) -> Result<BatchMutateResponse, Status> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        self.writable(&schema.name)?;
        if req.mutations.is_empty() {
            return Err(Status::invalid_argument(
                "'mutations' is empty: nothing to write",
            ));
        }
        if req.mutations.len() > MAX_BATCH_MUTATIONS {
            return Err(Status::resource_exhausted(format!(
                "the batch has {} mutations; at most {MAX_BATCH_MUTATIONS} per call",
                req.mutations.len()
            )));
        }
        let mut plans = Vec::with_capacity(req.mutations.len());
        let mut bytes = 0;
        for (i, m) in req.mutations.iter().enumerate() {
            let plan = request_data(m.data.as_ref(), &m.data_json)
                .and_then(|data| mutation_plan(&schema, &requester, m.mutation_type, data))
                .map_err(|s| record_status(i, &s))?;
            bytes += m.data.as_ref().map_or(0, Message::encoded_len);
            plans.push(plan);
        }
        let keys: Vec<String> = plans.iter().map(|p| p.range_key.clone()).collect();
        let idem = self.idempotency(&req.idempotency_key, &plans)?;
        let committed = self
            .commit("batch_mutate", schema, plans, bytes, idem)
            .await
            .map_err(|e| match e {
                JobError::Refused { index, error } => record_status(index, &refusal_status(error)),
                e => commit_status(e),
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
        let r = self
            .commits
            .submit_once(schema, plans, bytes, idempotency)
            .await;
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
    ) -> Result<HistoryResponse, Status> {
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let Some(def) = schema.field(&req.field) else {
            return Err(Status::not_found(format!(
                "field '{}' not found in schema '{}'",
                req.field, schema.name
            )));
        };
        permissions::check(def, Access::Read, &requester).map_err(denied_status)?;
        if schema.range_key().is_some() && req.range_key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "schema '{}' is a Range schema: 'range_key' names whose history to read",
                schema.name
            )));
        }
        if schema.range_key().is_none() && !req.range_key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "schema '{}' is a Single schema: leave 'range_key' empty",
                schema.name
            )));
        }
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
                    .map_err(Status::invalid_argument)?,
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
                    let v = store
                        .history(&schema.name, &req.field, &req.range_key, req.limit as usize)
                        .map_err(store_status)?;
                    return Ok((v, String::new()));
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
                        StoreError::Corrupt(_) if after.is_some() => Status::invalid_argument(
                            "'page_token' names a version this history does not have",
                        ),
                        e => store_status(e),
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

    /// A slot for one more open subscription (--max-subscriptions).
    pub fn subscription_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.subscriptions.clone().try_acquire_owned().map_err(|_| {
            self.metrics.subscription_end("full");
            Status::resource_exhausted(
                "this node serves as many subscriptions as it allows (--max-subscriptions); close one or try again later",
            )
        })
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
    ) -> Result<crate::subscribe::SubscriptionStream, Status> {
        use crate::subscribe::{self, Selection};
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        let fields = readable_fields(&schema, &requester, &req.fields)?;
        let filter = match (schema.range_key(), req.filter.as_ref()) {
            (None, Some(f)) if f.filter.is_some() => {
                return Err(Status::invalid_argument(format!(
                    "schema '{}' is a Single schema; range filters apply only to Range schemas",
                    schema.name
                )));
            }
            (_, f) => KeyFilter::from_proto(f).map_err(Status::invalid_argument)?,
        };
        let permit = self.subscription_permit()?;
        // Registered before the log is read: nothing committed from here on can be missed.
        let listener = self.hub.listen(&schema.name);
        let store = self.store.clone();
        let name = schema.name.clone();
        let bounds = storage(&self.metrics, "subscribe", Runs::Inline, move || {
            store.log_bounds(&name).map_err(store_status)
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
            return Err(Status::out_of_range(format!(
                "from_sequence {} is beyond the head of schema '{}' on this node ({}): this node never assigned it; subscribe from at most the head",
                req.from_sequence, schema.name, bounds.head
            )));
        }
        let recheck = {
            let identities = self.identities.clone();
            let who = who.clone();
            let schema = schema.clone();
            let fields = fields.clone();
            let store = self.store.clone();
            Box::new(move || -> Result<(), Status> {
                if !matches!(store.schema(&schema.name), Some((_, SchemaState::Approved))) {
                    return Err(Status::failed_precondition(format!(
                        "schema '{}' is no longer approved on this node; the subscription ended",
                        schema.name
                    )));
                }
                let r = identities.resolve(&who).map_err(store_status)?;
                for f in &fields {
                    if let Some(def) = schema.field(f) {
                        permissions::check(def, Access::Read, &r).map_err(denied_status)?;
                    }
                }
                Ok(())
            })
        };
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

    /// The changes of a schema after a sequence, for a node that follows it (the `changes`
    /// operation). Every field must be readable by the requester: a replica copies whole
    /// records. With nothing new, waits up to `wait_ms` (at most 5 s, within `deadline`) for
    /// the next change.
    pub async fn changes(
        &self,
        who: &Principal,
        req: fold_proto::wire::ChangesRequest,
        deadline: Option<std::time::SystemTime>,
    ) -> Result<fold_proto::wire::ChangesResponse, Status> {
        const MAX_CHANGES: usize = 1000;
        const MAX_WAIT_MS: u32 = 5000;
        const MAX_BYTES: usize = 1024 * 1024;
        let requester = self.requester(who)?;
        let schema = self.usable_schema(&req.schema)?;
        if !req.schema_hash.is_empty() && req.schema_hash != schema.hash {
            return Err(Status::failed_precondition(format!(
                "schema '{}' here has hash {}, the follower's has {}: a replica needs the same definition",
                schema.name, schema.hash, req.schema_hash
            )));
        }
        let fields = if !req.fields.is_empty() || req.readable_only {
            readable_fields(&schema, &requester, &req.fields)?
        } else {
            let all: Vec<String> = schema.fields.keys().cloned().collect();
            readable_fields(&schema, &requester, &all)?
        };
        let filter = match (schema.range_key(), req.filter.as_ref()) {
            (None, Some(f)) if f.filter.is_some() => {
                return Err(Status::invalid_argument(format!(
                    "schema '{}' is a Single schema; range filters apply only to Range schemas",
                    schema.name
                )));
            }
            (_, f) => KeyFilter::from_proto(f).map_err(Status::invalid_argument)?,
        };
        let limit = match req.limit {
            0 => 500,
            n => (n as usize).min(MAX_CHANGES),
        };
        // Registered before the head is read: a change committed from here on wakes the wait.
        let mut rx = self.hub.listen(&schema.name).rx;
        let store = self.store.clone();
        let name = schema.name.clone();
        let mut bounds =
            tokio::task::block_in_place(|| store.log_bounds(&name)).map_err(store_status)?;
        if req.after_sequence.saturating_add(1) < bounds.oldest {
            return Err(crate::subscribe::out_of_range(
                &schema.name,
                req.after_sequence,
                bounds.oldest,
            ));
        }
        if req.after_sequence > bounds.head {
            return Err(Status::out_of_range(format!(
                "after_sequence {} is beyond the head of schema '{}' on this node ({}): this node never assigned it",
                req.after_sequence, schema.name, bounds.head
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
                tokio::task::block_in_place(|| store.log_bounds(&name)).map_err(store_status)?;
        }
        drop(rx);
        let after = req.after_sequence;
        let page = storage(&self.metrics, "changes", Runs::InPlace, move || {
            store
                .changes_after(&name, after, limit)
                .map_err(store_status)
        })
        .await?;
        let sel = crate::subscribe::Selection {
            schema: schema.clone(),
            fields,
            filter,
            json_values: true,
        };
        let mut changes = Vec::with_capacity(page.len());
        let mut bytes = 0;
        let mut through = after;
        for e in &page {
            if let Some(c) = sel.view(e) {
                bytes += c.encoded_len();
                changes.push(c);
            }
            through = e.sequence;
            if bytes >= MAX_BYTES {
                break;
            }
        }
        Ok(fold_proto::wire::ChangesResponse {
            changes,
            head_sequence: bounds.head.max(through),
            oldest_sequence: bounds.oldest,
            through_sequence: through,
        })
    }

    /// Which of `names` are approved schemas here.
    pub fn served(&self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .filter(|n| matches!(self.store.schema(n), Some((_, SchemaState::Approved))))
            .cloned()
            .collect()
    }
}

/// The fields a subscription sends: each named one (must exist and be readable, as for Query),
/// or, when none is named, every field `requester` may read. In schema order.
fn readable_fields(
    schema: &Schema,
    requester: &Requester,
    named: &[String],
) -> Result<Vec<String>, Status> {
    if named.is_empty() {
        let fields: Vec<String> = schema
            .fields
            .iter()
            .filter(|(_, def)| permissions::check(def, Access::Read, requester).is_ok())
            .map(|(f, _)| f.clone())
            .collect();
        if fields.is_empty() {
            return Err(Status::permission_denied(format!(
                "{} may read no field of schema '{}'",
                requester.label, schema.name
            )));
        }
        return Ok(fields);
    }
    for f in named {
        let Some(def) = schema.field(f) else {
            return Err(Status::not_found(format!(
                "field '{f}' not found in schema '{}'",
                schema.name
            )));
        };
        permissions::check(def, Access::Read, requester).map_err(denied_status)?;
    }
    Ok(schema
        .fields
        .keys()
        .filter(|f| named.contains(f))
        .cloned()
        .collect())
}

fn range_key_value(schema: &str, rk: &str, v: Option<&Json>) -> Result<String, Status> {
    let key = match v {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        Some(Json::Null) | None => {
            return Err(Status::invalid_argument(format!(
                "schema '{schema}' is a Range schema: 'data' must include the range key '{rk}'"
            )));
        }
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "range key '{rk}' must be a string or a number, got {other}"
            )));
        }
    };
    if key.is_empty() {
        return Err(Status::invalid_argument(format!(
            "range key '{rk}' must not be empty"
        )));
    }
    if key.len() > MAX_RANGE_KEY_LEN {
        return Err(Status::invalid_argument(format!(
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
) -> Result<Map<String, Json>, Status> {
    match (data, data_json.is_empty()) {
        (Some(d), true) => struct_to_map_checked(d).map_err(Status::invalid_argument),
        (None, true) => Ok(Map::new()),
        (None, false) => match serde_json::from_str::<Json>(data_json) {
            Ok(Json::Object(m)) => Ok(m),
            Ok(_) => Err(Status::invalid_argument(
                "'data_json' must be a JSON object of field -> value",
            )),
            Err(e) => Err(Status::invalid_argument(format!(
                "'data_json' is not valid JSON: {e}"
            ))),
        },
        (Some(d), false) if d.fields.is_empty() => request_data(None, data_json),
        (Some(_), false) => Err(Status::invalid_argument(
            "give the values either as 'data' or as 'data_json', not both",
        )),
    }
}

fn mutation_plan(
    schema: &Schema,
    requester: &Requester,
    mutation_type: i32,
    data: Map<String, Json>,
) -> Result<MutationPlan, Status> {
    let kind = match MutationType::try_from(mutation_type) {
        Ok(MutationType::Create) => MutationKind::Create,
        Ok(MutationType::Update) => MutationKind::Update,
        Ok(MutationType::Delete) => MutationKind::Delete,
        _ => {
            return Err(Status::invalid_argument(
                "'mutation_type' must be MUTATION_TYPE_CREATE, MUTATION_TYPE_UPDATE or MUTATION_TYPE_DELETE",
            ));
        }
    };
    if data.is_empty() {
        return Err(Status::invalid_argument(
            "'data' is empty: no fields to write",
        ));
    }
    for f in data.keys() {
        if schema.field(f).is_none() {
            return Err(Status::not_found(format!(
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
            permissions::check(def, Access::Write, requester).map_err(denied_status)?;
        }
    }
    Ok(MutationPlan {
        kind,
        range_key,
        writes,
        writer: requester.label.clone(),
    })
}

/// The status of a mutation the data refused.
fn refusal_status(e: MutationError) -> Status {
    match e {
        MutationError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        MutationError::Missing(_) => Status::not_found(e.to_string()),
        MutationError::Store(e) => store_status(e),
        MutationError::KeyReused(_) => Status::failed_precondition(e.to_string()),
    }
}

/// The status of a write the group-commit writer could not commit.
fn commit_status(e: JobError) -> Status {
    match e {
        JobError::Refused { error, .. } => refusal_status(error),
        JobError::Storage(msg) => {
            tracing::error!(error = %msg, "storage failure");
            Status::internal(msg)
        }
        JobError::Stopped => Status::unavailable(e.to_string()),
    }
}

/// `status` as the refusal of a whole batch at record `index`: same code, the message prefixed
/// `record N: ` and the index in the [`FAILED_RECORD_TRAILER`] trailer.
fn record_status(index: usize, status: &Status) -> Status {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert(
        FAILED_RECORD_TRAILER,
        tonic::metadata::MetadataValue::from(index as u64),
    );
    Status::with_metadata(
        status.code(),
        format!(
            "record {index}: {}; nothing of the batch was written",
            status.message()
        ),
        meta,
    )
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
