//! `fold-client`: a Rust client for a fold-node's public gRPC API (`fold.v1.FoldNode`,
//! `fold.v1.Network`, `grpc.health.v1`), with a connection builder and typed helpers whose
//! answers are plain Rust/JSON values.
//!
//! ```no_run
//! # async fn demo() -> fold_client::Result<()> {
//! use fold_client::{ClientBuilder, Filter, Mutation, MutationKind, Query};
//! use serde_json::json;
//!
//! let client = ClientBuilder::new("127.0.0.1:50051").connect().await?;
//! let schema = std::fs::read_to_string("examples/schemas/sensor_readings.json").unwrap();
//! client.load_schema(&schema, true).await?;
//! client
//!     .mutate(Mutation::new(
//!         "SensorReadings",
//!         MutationKind::Create,
//!         json!({"sensor_id": "greenhouse-1", "celsius": 21.5}),
//!     )?)
//!     .await?;
//! let result = client
//!     .query(Query::new("SensorReadings", ["celsius"]).filter(Filter::Prefix("greenhouse-".into())))
//!     .await?;
//! for r in &result.records {
//!     println!("{:?} {}", r.key, serde_json::Value::Object(r.fields.clone()));
//! }
//! let versions = client.history("SensorReadings", "celsius", Some("greenhouse-1"), 0).await?;
//! println!("{} versions", versions.len());
//! # Ok(()) }
//! ```
//!
//! Schema groups (docs/GROUPS.md): make a schema a Raft group of three nodes, write on any
//! member, read linearizably or from the member's own copy:
//!
//! ```no_run
//! # async fn demo(client: fold_client::Client, b: String, c: String) -> fold_client::Result<()> {
//! use fold_client::{Consistency, Query, named_leader};
//!
//! let group = client.create_group("SensorReadings", &[b, c]).await?;
//! println!("leader {:?}, term {}", group.leader_node_id, group.term);
//! let local = client
//!     .query(Query::new("SensorReadings", ["celsius"]).consistency(Consistency::Local))
//!     .await?;
//! println!("as of sequence {:?}", local.group.map(|g| g.as_of_sequence));
//! // Membership changes run on the leader; elsewhere the refusal names it.
//! if let Err(e) = client.remove_group_members("SensorReadings", &["12D3KooW…".into()]).await {
//!     if let Some(leader) = e.message().and_then(named_leader) {
//!         println!("run it on {leader}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Errors keep the node's gRPC code and message:
//!
//! ```no_run
//! # async fn demo(client: fold_client::Client) {
//! match client.get_schema("Nope").await {
//!     Err(e) if e.code() == Some(tonic::Code::NotFound) => eprintln!("no such schema: {e}"),
//!     other => println!("{other:?}"),
//! }
//! # }
//! ```

mod connect;
mod error;
mod groups;
mod types;

use std::time::Duration;

use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::network_client::NetworkClient;
use fold_proto::v1::{self as pb};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use connect::{ClientBuilder, Target};

/// Records per page when a query is read page by page.
const PAGE_SIZE: u32 = 1000;
pub use error::{CodeName, Error, Result, code_name, error_chain};
pub use groups::{
    Consistency, GroupMember, GroupRead, GroupStatus, MAX_GROUP_MEMBERS, named_leader,
};
pub use types::*;

/// The `grpc.health.v1` service name of the mesh API (NOT_SERVING while the sidecar link is down).
pub const NETWORK_SERVICE: &str = "fold.v1.Network";
/// The `grpc.health.v1` service name of the data API.
pub const FOLD_NODE_SERVICE: &str = "fold.v1.FoldNode";

/// A connection to one fold-node. Cheap to clone (clones share the connection).
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    timeout: Option<Duration>,
    target: Target,
}

impl Client {
    /// Shorthand for `ClientBuilder::new(addr).connect()`.
    pub async fn connect(addr: &str) -> Result<Client> {
        ClientBuilder::new(addr).connect().await
    }

    /// Wrap an existing channel.
    pub fn from_channel(channel: Channel, timeout: Option<Duration>, target: Target) -> Client {
        Client {
            channel,
            timeout,
            target,
        }
    }

    /// Where this client connects.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The generated `FoldNode` client, for calls the helpers do not cover.
    pub fn fold(&self) -> FoldNodeClient<Channel> {
        FoldNodeClient::new(self.channel.clone())
    }

    /// The generated `Network` client.
    pub fn network(&self) -> NetworkClient<Channel> {
        NetworkClient::new(self.channel.clone())
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }

    // ---- schemas ----

    /// Load a schema given as fold_db JSON text; `approve` approves it in the same call.
    pub async fn load_schema(&self, schema_json: &str, approve: bool) -> Result<LoadedSchema> {
        let r = self
            .fold()
            .load_schema(self.req(pb::LoadSchemaRequest {
                schema_json: schema_json.to_string(),
                approve,
            }))
            .await?
            .into_inner();
        Ok(LoadedSchema {
            name: r.name,
            state: SchemaState::from_i32(r.state),
            created: r.created,
            hash: r.hash,
        })
    }

    /// List schemas, optionally only those in one state.
    pub async fn list_schemas(&self, state: Option<SchemaState>) -> Result<Vec<SchemaInfo>> {
        let state = state
            .map(SchemaState::to_proto)
            .unwrap_or(pb::SchemaState::Unspecified);
        let r = self
            .fold()
            .list_schemas(self.req(pb::ListSchemasRequest {
                state: state as i32,
            }))
            .await?
            .into_inner();
        Ok(r.schemas.into_iter().map(SchemaInfo::from).collect())
    }

    /// One schema with its definition.
    pub async fn get_schema(&self, name: &str) -> Result<SchemaDetail> {
        let r = self
            .fold()
            .get_schema(self.req(pb::GetSchemaRequest { name: name.into() }))
            .await?
            .into_inner();
        let summary = r.summary.unwrap_or_default();
        Ok(SchemaDetail {
            info: summary.into(),
            definition: r
                .schema
                .as_ref()
                .map(fold_proto::json::struct_to_json)
                .unwrap_or(serde_json::Value::Null),
        })
    }

    /// Approve, block, or unload (state `Available`) a schema.
    pub async fn set_schema_state(&self, name: &str, state: SchemaState) -> Result<StateChange> {
        let r = self
            .fold()
            .set_schema_state(self.req(pb::SetSchemaStateRequest {
                name: name.into(),
                state: state.to_proto() as i32,
            }))
            .await?
            .into_inner();
        Ok(StateChange {
            name: r.name,
            state: SchemaState::from_i32(r.state),
            previous_state: SchemaState::from_i32(r.previous_state),
        })
    }

    // ---- data ----

    /// Read fields, locally or on another node.
    pub async fn query(&self, q: Query) -> Result<QueryResult> {
        self.query_with_progress(q, |_| {}).await
    }

    /// [`query`](Client::query), calling `progress` with the number of records received after
    /// each page. Large results are read page by page (1,000 records each, exact values), so no
    /// query is refused for its size.
    pub async fn query_with_progress(
        &self,
        q: Query,
        mut progress: impl FnMut(usize),
    ) -> Result<QueryResult> {
        let mut all = QueryResult {
            node_id: String::new(),
            records: Vec::new(),
            group: None,
        };
        let mut token = String::new();
        // With `any`, the first page picks the node; the rest come from the same node (a page
        // token belongs to the node that gave it).
        let mut route = if q.any {
            pb::Route::Any
        } else {
            pb::Route::Default
        };
        let mut target = q.node.clone().unwrap_or_default();
        // Bounded: a token never repeats, and the node refuses forged ones; this only guards a
        // misbehaving server.
        for _ in 0..1_000_000 {
            let r = self
                .query_page(&q, route, target.clone(), std::mem::take(&mut token))
                .await?;
            token = r.next_page_token.clone();
            if route == pb::Route::Any {
                route = pb::Route::Default;
                target = r.node_id.clone();
            }
            let page: QueryResult = r.into();
            all.node_id = page.node_id;
            // The first page's read: later pages continue the same snapshot.
            all.group = all.group.or(page.group);
            all.records.extend(page.records);
            progress(all.records.len());
            if token.is_empty() {
                break;
            }
        }
        Ok(all)
    }

    /// Ask every node serving the schema (`q.node` and `q.any` are ignored): one answer per
    /// node, with its records (every page of them) or its failure. Nothing is dropped silently.
    pub async fn query_all(&self, q: Query) -> Result<Vec<NodeAnswer>> {
        let r = self
            .query_page(&q, pb::Route::All, String::new(), String::new())
            .await?;
        let mut out = Vec::with_capacity(r.answers.len());
        for a in r.answers {
            let token = a.next_page_token.clone();
            let node = a.node_id.clone();
            let mut answer = NodeAnswer::from(a);
            if !token.is_empty() {
                // The rest of that node's records, from that node.
                let mut rest = Query::new(q.schema.clone(), q.fields.clone()).node(node);
                rest.filter = q.filter.clone();
                rest.consistency = q.consistency;
                let more = self.query_pages_from(rest, token).await?;
                answer.records.extend(more);
            }
            out.push(answer);
        }
        Ok(out)
    }

    /// One page of `q` (exact values), routed as given.
    async fn query_page(
        &self,
        q: &Query,
        route: pb::Route,
        target_node_id: String,
        page_token: String,
    ) -> Result<pb::QueryResponse> {
        Ok(self
            .fold()
            .query(self.req(pb::QueryRequest {
                route: route as i32,
                page_size: PAGE_SIZE,
                page_token,
                json_values: true,
                schema: q.schema.clone(),
                fields: q.fields.clone(),
                filter: q.filter.as_ref().map(Filter::to_proto),
                target_node_id,
                definition_hash: Default::default(),
                consistency: q.consistency.to_proto() as i32,
            }))
            .await?
            .into_inner())
    }

    async fn query_pages_from(&self, q: Query, mut token: String) -> Result<Vec<Record>> {
        let mut records = Vec::new();
        for _ in 0..1_000_000 {
            if token.is_empty() {
                break;
            }
            let r = self
                .query_page(
                    &q,
                    pb::Route::Default,
                    q.node.clone().unwrap_or_default(),
                    std::mem::take(&mut token),
                )
                .await?;
            token = r.next_page_token.clone();
            records.extend(QueryResult::from(r).records);
        }
        Ok(records)
    }

    /// Subscribe to a schema's changes: everything after `s.from_sequence`, then live changes
    /// as they commit, with progress events (about every second) between them. Read it with
    /// [`SubscriptionStream::next`]; it ends with an error (e.g. RESOURCE_EXHAUSTED when the
    /// reader fell too far behind: resume from the last sequence received).
    pub async fn subscribe(&self, s: Subscription) -> Result<SubscriptionStream> {
        // A stream has no deadline of its own: the client's timeout bounds only its start.
        let req = pb::SubscribeRequest {
            schema: s.schema,
            from_sequence: s.from_sequence,
            fields: s.fields,
            filter: s.filter.as_ref().map(Filter::to_proto),
            json_values: true,
            target_node_id: s.node.unwrap_or_default(),
            route: if s.any {
                pb::Route::Any as i32
            } else {
                pb::Route::Default as i32
            },
            definition_hash: Default::default(),
        };
        let inner = self.fold().subscribe(req).await?.into_inner();
        Ok(SubscriptionStream { inner })
    }

    /// Create, update or delete field values, locally or on another node.
    pub async fn mutate(&self, m: Mutation) -> Result<MutateResult> {
        let r = self
            .fold()
            .mutate(self.req(pb::MutateRequest {
                idempotency_key: m.idempotency_key.unwrap_or_default(),
                // As JSON text: exact for every value (the Struct's numbers are doubles).
                data_json: serde_json::Value::Object(m.data).to_string(),
                schema: m.schema,
                mutation_type: m.kind.to_proto() as i32,
                data: None,
                target_node_id: m.node.unwrap_or_default(),
            }))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// Many mutations of one schema, applied atomically (all or none) in one transaction, in
    /// order, on this node or (with `node`) forwarded to another. Returns one result per mutation.
    /// A refusal's message names the record (`record N: …`); see [`failed_record`].
    pub async fn batch_mutate(
        &self,
        schema: &str,
        mutations: Vec<(MutationKind, serde_json::Map<String, serde_json::Value>)>,
        node: Option<&str>,
    ) -> Result<Vec<MutateResult>> {
        let r = self
            .fold()
            .batch_mutate(
                self.req(pb::BatchMutateRequest {
                    idempotency_key: String::new(),
                    schema: schema.into(),
                    mutations: mutations
                        .into_iter()
                        .map(|(kind, data)| pb::BatchMutation {
                            // Exact JSON text (the Struct's numbers are doubles).
                            data_json: serde_json::Value::Object(data).to_string(),
                            mutation_type: kind.to_proto() as i32,
                            data: None,
                        })
                        .collect(),
                    target_node_id: node.unwrap_or_default().into(),
                }),
            )
            .await?
            .into_inner();
        let node_id = r.node_id;
        let replayed = r.replayed;
        Ok(r.results
            .into_iter()
            .map(|x| MutateResult {
                node_id: node_id.clone(),
                key: (!x.range_key.is_empty()).then_some(x.range_key),
                fields: x.fields,
                version_ids: x.version_ids,
                replayed,
                sequence: x.sequence,
            })
            .collect())
    }

    /// Versions of a field, newest first (`key` for Range schemas; `limit` 0 = all).
    pub async fn history(
        &self,
        schema: &str,
        field: &str,
        key: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Version>> {
        Ok(self
            .history_at(schema, field, key, limit, At::Here)
            .await?
            .1)
    }

    /// [`history`](Client::history) on another node or any node serving the schema; returns
    /// the node that answered and its versions.
    pub async fn history_at(
        &self,
        schema: &str,
        field: &str,
        key: Option<&str>,
        limit: u32,
        at: At,
    ) -> Result<(String, Vec<Version>)> {
        let (route, target) = match at {
            At::Here => (pb::Route::Default, String::new()),
            At::Node(n) => (pb::Route::Default, n),
            At::Any => (pb::Route::Any, String::new()),
        };
        let r = self
            .history_call(schema, field, key, limit, route, target)
            .await?;
        Ok((
            r.node_id,
            r.versions.into_iter().map(Version::from).collect(),
        ))
    }

    async fn history_call(
        &self,
        schema: &str,
        field: &str,
        key: Option<&str>,
        limit: u32,
        route: pb::Route,
        target_node_id: String,
    ) -> Result<pb::HistoryResponse> {
        Ok(self
            .fold()
            .history(self.req(pb::HistoryRequest {
                target_node_id,
                route: route as i32,
                page_size: 0,
                page_token: String::new(),
                json_values: false,
                schema: schema.into(),
                field: field.into(),
                range_key: key.unwrap_or_default().into(),
                limit,
                definition_hash: Default::default(),
            }))
            .await?
            .into_inner())
    }

    /// A field's history on every node serving the schema: one answer per node (at most
    /// `limit` versions each, 0 = all), with its versions or its failure.
    pub async fn history_all(
        &self,
        schema: &str,
        field: &str,
        key: Option<&str>,
        limit: u32,
    ) -> Result<Vec<NodeAnswer>> {
        let r = self
            .history_call(schema, field, key, limit, pb::Route::All, String::new())
            .await?;
        Ok(r.answers.into_iter().map(NodeAnswer::from).collect())
    }

    // ---- network ----

    /// This node in the mesh (UNAVAILABLE while its sidecar is unreachable).
    pub async fn status(&self) -> Result<NetworkStatus> {
        let r = self
            .network()
            .status(self.req(pb::NetworkStatusRequest {}))
            .await?
            .into_inner();
        Ok(r.into())
    }

    /// Peers; `all` includes known but disconnected ones.
    pub async fn peers(&self, all: bool) -> Result<Vec<Peer>> {
        let r = self
            .network()
            .list_peers(self.req(pb::ListPeersRequest {
                include_disconnected: all,
            }))
            .await?
            .into_inner();
        Ok(r.peers.into_iter().map(Peer::from).collect())
    }

    /// Nodes announcing that they serve a schema.
    pub async fn providers(&self, schema: &str) -> Result<Vec<String>> {
        let r = self
            .network()
            .find_providers(self.req(pb::FindProvidersRequest {
                schema: schema.into(),
            }))
            .await?
            .into_inner();
        Ok(r.node_ids)
    }

    /// The trust table, or one node's entry (`Some(id)`).
    pub async fn get_trust(&self, node_id: Option<&str>) -> Result<TrustTable> {
        let r = self
            .network()
            .get_trust(self.req(pb::GetTrustRequest {
                node_id: node_id.unwrap_or_default().into(),
            }))
            .await?
            .into_inner();
        Ok(TrustTable {
            entries: r.entries.into_iter().map(TrustEntry::from).collect(),
            default: r.default_entry.map(TrustEntry::from),
        })
    }

    /// Give a node a trust distance, or deny it.
    pub async fn set_trust(&self, node_id: &str, trust: Trust) -> Result<TrustEntry> {
        let entry = match trust {
            Trust::Distance(d) => pb::TrustEntry {
                node_id: node_id.into(),
                distance: d,
                denied: false,
            },
            Trust::Deny => pb::TrustEntry {
                node_id: node_id.into(),
                distance: 0,
                denied: true,
            },
        };
        self.set_trust_raw(entry, false).await
    }

    /// Remove a node's entry (it falls back to the default).
    pub async fn remove_trust(&self, node_id: &str) -> Result<TrustEntry> {
        let entry = pb::TrustEntry {
            node_id: node_id.into(),
            ..Default::default()
        };
        self.set_trust_raw(entry, true).await
    }

    async fn set_trust_raw(&self, entry: pb::TrustEntry, remove: bool) -> Result<TrustEntry> {
        let r = self
            .network()
            .set_trust(self.req(pb::SetTrustRequest {
                entry: Some(entry),
                remove,
            }))
            .await?
            .into_inner();
        Ok(r.entry.map(TrustEntry::from).unwrap_or(TrustEntry {
            node_id: String::new(),
            distance: 0,
            denied: false,
        }))
    }

    /// Dial a multiaddr or a node id.
    pub async fn dial(&self, address: &str) -> Result<Dialed> {
        let r = self
            .network()
            .dial(self.req(pb::DialRequest {
                address: address.into(),
            }))
            .await?
            .into_inner();
        Ok(Dialed {
            node_id: r.node_id,
            address: r.address,
        })
    }

    /// Ask a peer which of these schemas it has approved.
    pub async fn check_schemas(&self, node_id: &str, names: &[String]) -> Result<SchemaCheck> {
        let r = self
            .network()
            .check_schemas(self.req(pb::CheckSchemasRequest {
                node_id: node_id.into(),
                names: names.to_vec(),
            }))
            .await?
            .into_inner();
        Ok(SchemaCheck {
            node_id: r.node_id,
            approved: r.approved,
        })
    }

    /// This node and its peers with what each reports about itself.
    pub async fn topology(&self) -> Result<Topology> {
        let r = self
            .network()
            .topology(self.req(pb::TopologyRequest {
                max_hops: 0,
                timeout_ms: 0,
            }))
            .await?
            .into_inner();
        Ok(Topology {
            node_id: r.node_id,
            peers: r.peers.into_iter().map(Peer::from).collect(),
        })
    }

    /// The mesh around this node: the node asks every node up to `max_hops` hops away (at most
    /// 4) for its peers, over the mesh, within `budget` (at most 60 s). Nodes that could not be
    /// asked carry their error. The call's deadline is at least `budget` plus a second.
    pub async fn mesh_topology(&self, max_hops: u32, budget: Duration) -> Result<MeshTopology> {
        let timeout_ms = u32::try_from(budget.as_millis()).unwrap_or(u32::MAX).max(1);
        let mut req = self.req(pb::TopologyRequest {
            max_hops,
            timeout_ms,
        });
        let wait = budget.saturating_add(Duration::from_secs(1));
        req.set_timeout(self.timeout.map_or(wait, |t| t.max(wait)));
        let r = self.network().topology(req).await?.into_inner();
        Ok(MeshTopology::from(r))
    }

    /// `grpc.health.v1` status of a service (`""` is the whole server).
    pub async fn health(&self, service: &str) -> Result<Health> {
        let r = HealthClient::new(self.channel.clone())
            .check(self.req(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            }))
            .await?
            .into_inner();
        Ok(match ServingStatus::try_from(r.status) {
            Ok(ServingStatus::Serving) => Health::Serving,
            Ok(ServingStatus::NotServing) => Health::NotServing,
            _ => Health::Unknown,
        })
    }
}

/// The index of the record a refused batch names in its message (`record N: …`), if any.
pub fn failed_record(message: &str) -> Option<usize> {
    let rest = message.split("record ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The events of a [`Client::subscribe`] call, in sequence order.
pub struct SubscriptionStream {
    inner: tonic::Streaming<pb::SubscribeResponse>,
}

impl SubscriptionStream {
    /// The next event; `None` when the node ended the stream cleanly, `Some(Err)` when it ended
    /// it with a status (resume from the last sequence received).
    pub async fn next(&mut self) -> Option<Result<SubscriptionEvent>> {
        loop {
            match self.inner.message().await {
                Ok(Some(m)) => {
                    if let Some(e) = SubscriptionEvent::from_proto(m) {
                        return Some(Ok(e));
                    }
                }
                Ok(None) => return None,
                Err(s) => return Some(Err(s.into())),
            }
        }
    }
}
