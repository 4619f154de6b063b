//! Plain Rust views of the node's answers, with stable serde field names: records and values
//! are plain JSON (`serde_json::Value`), never protobuf `Struct`s; timestamps are RFC 3339 text.
//! These are also foldctl's `-o json` output (docs/FOLDCTL.md lists the fields).

use std::str::FromStr;

use fold_proto::json::{struct_to_map, value_to_json};
use fold_proto::v1;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::error::Error;
use crate::groups::{Consistency, GroupRead, GroupStatus};

/// A schema's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaState {
    Unspecified,
    Available,
    Approved,
    Blocked,
}

impl SchemaState {
    pub(crate) fn from_i32(v: i32) -> Self {
        match v11_state(v) {
            v1::SchemaState::Available => SchemaState::Available,
            v1::SchemaState::Approved => SchemaState::Approved,
            v1::SchemaState::Blocked => SchemaState::Blocked,
            v1::SchemaState::Unspecified => SchemaState::Unspecified,
        }
    }

    pub(crate) fn to_proto(self) -> v1::SchemaState {
        match self {
            SchemaState::Unspecified => v1::SchemaState::Unspecified,
            SchemaState::Available => v1::SchemaState::Available,
            SchemaState::Approved => v1::SchemaState::Approved,
            SchemaState::Blocked => v1::SchemaState::Blocked,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SchemaState::Unspecified => "unspecified",
            SchemaState::Available => "available",
            SchemaState::Approved => "approved",
            SchemaState::Blocked => "blocked",
        }
    }
}

fn v11_state(v: i32) -> v1::SchemaState {
    v1::SchemaState::try_from(v).unwrap_or(v1::SchemaState::Unspecified)
}

impl FromStr for SchemaState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "available" => Ok(SchemaState::Available),
            "approved" => Ok(SchemaState::Approved),
            "blocked" => Ok(SchemaState::Blocked),
            other => Err(Error::Input(format!(
                "unknown schema state `{other}` (available, approved, blocked)"
            ))),
        }
    }
}

impl std::fmt::Display for SchemaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of loading a schema.
#[derive(Clone, Debug, Serialize)]
pub struct LoadedSchema {
    pub name: String,
    pub state: SchemaState,
    /// False when an identical schema was already loaded.
    pub created: bool,
    pub hash: String,
}

/// One schema in a listing.
#[derive(Clone, Debug, Serialize)]
pub struct SchemaInfo {
    pub name: String,
    pub state: SchemaState,
    /// `Single` or `Range`.
    pub schema_type: String,
    /// The range key field of a Range schema, `null` otherwise.
    pub range_key: Option<String>,
    pub fields: Vec<String>,
    pub hash: String,
}

impl From<v1::SchemaSummary> for SchemaInfo {
    fn from(s: v1::SchemaSummary) -> Self {
        SchemaInfo {
            name: s.name,
            state: SchemaState::from_i32(s.state),
            schema_type: s.schema_type,
            range_key: non_empty(s.range_key),
            fields: s.fields,
            hash: s.hash,
        }
    }
}

/// One schema with its full definition.
#[derive(Clone, Debug, Serialize)]
pub struct SchemaDetail {
    #[serde(flatten)]
    pub info: SchemaInfo,
    /// The schema definition as JSON.
    pub definition: Json,
}

/// A state change.
#[derive(Clone, Debug, Serialize)]
pub struct StateChange {
    pub name: String,
    pub state: SchemaState,
    pub previous_state: SchemaState,
}

/// A range-key filter for queries on Range schemas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Exactly this key.
    Key(String),
    /// Keys starting with this prefix.
    Prefix(String),
    /// `start <= key < end` (an empty end is unbounded).
    Range { start: String, end: String },
    /// Any of these keys.
    Keys(Vec<String>),
    /// Glob: `*` any run of characters, `?` exactly one.
    Pattern(String),
}

impl Filter {
    pub(crate) fn to_proto(&self) -> v1::RangeFilter {
        use v1::range_filter::Filter as F;
        let f = match self {
            Filter::Key(k) => F::Key(k.clone()),
            Filter::Prefix(p) => F::KeyPrefix(p.clone()),
            Filter::Range { start, end } => F::KeyRange(v1::KeyRange {
                start: start.clone(),
                end: end.clone(),
            }),
            Filter::Keys(k) => F::Keys(v1::KeyList { keys: k.clone() }),
            Filter::Pattern(p) => F::KeyPattern(p.clone()),
        };
        v1::RangeFilter { filter: Some(f) }
    }
}

/// A query: schema, fields, optional filter and target node.
///
/// ```
/// use fold_client::{Filter, Query};
/// let q = Query::new("SensorReadings", ["celsius", "location"])
///     .filter(Filter::Prefix("greenhouse-".into()));
/// assert_eq!(q.fields.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct Query {
    pub schema: String,
    pub fields: Vec<String>,
    pub filter: Option<Filter>,
    /// Node to run on (None: the connected node).
    pub node: Option<String>,
    /// Run on any node serving the schema (balanced, failing over), instead of `node`.
    pub any: bool,
    /// How a group schema is read (docs/GROUPS.md); ignored for other schemas.
    pub consistency: Consistency,
}

impl Query {
    pub fn new<I, S>(schema: impl Into<String>, fields: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Query {
            schema: schema.into(),
            fields: fields.into_iter().map(Into::into).collect(),
            filter: None,
            node: None,
            any: false,
            consistency: Consistency::Default,
        }
    }

    pub fn filter(mut self, f: Filter) -> Self {
        self.filter = Some(f);
        self
    }

    /// Run on another node of the mesh (forwarded by the connected node).
    pub fn node(mut self, id: impl Into<String>) -> Self {
        self.node = Some(id.into());
        self
    }

    /// Run on any node serving the schema: the connected node picks one (power-of-two-choices
    /// over latency) and fails over to another when it cannot answer.
    pub fn any(mut self) -> Self {
        self.any = true;
        self
    }

    /// How to read a group schema: linearizable (the default) or this member's local copy.
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.consistency = c;
        self
    }
}

/// Where a history read runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum At {
    /// The connected node.
    #[default]
    Here,
    /// This node of the mesh (forwarded).
    Node(String),
    /// Any node serving the schema (balanced, failing over).
    Any,
}

/// One node's part of an "all nodes serving the schema" read.
#[derive(Clone, Debug, Serialize)]
pub struct NodeAnswer {
    pub node_id: String,
    /// Why this node gave nothing (its gRPC code name and message); `null` when it answered.
    pub error: Option<NodeError>,
    /// Query: its records.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Record>,
    /// History: its versions, newest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<Version>,
    /// How long the node took, microseconds.
    pub latency_micros: u64,
}

impl From<v1::NodeAnswer> for NodeAnswer {
    fn from(a: v1::NodeAnswer) -> Self {
        let error = (a.code != 0).then(|| NodeError {
            code: crate::error::code_name(tonic::Code::from(a.code)).to_string(),
            message: a.message,
        });
        let records = QueryResult::from(v1::QueryResponse {
            records: a.records,
            ..Default::default()
        })
        .records;
        NodeAnswer {
            node_id: a.node_id,
            error,
            records,
            versions: a.versions.into_iter().map(Version::from).collect(),
            latency_micros: a.latency_micros,
        }
    }
}

/// One record of a query result.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Record {
    /// The range key (Range schemas), `null` for Single schemas.
    pub key: Option<String>,
    /// Field -> current value (`null` when never written or deleted).
    pub fields: Map<String, Json>,
}

/// A query's answer.
#[derive(Clone, Debug, Serialize)]
pub struct QueryResult {
    /// The node that answered.
    pub node_id: String,
    pub records: Vec<Record>,
    /// Set when the schema is a group on the answering node: how the answer was read (absent
    /// from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupRead>,
}

impl From<v1::QueryResponse> for QueryResult {
    fn from(r: v1::QueryResponse) -> Self {
        QueryResult {
            group: r.group.map(GroupRead::from),
            node_id: r.node_id,
            records: r
                .records
                .into_iter()
                .map(|rec| Record {
                    key: non_empty(rec.range_key),
                    // Exact JSON text when asked for (`json_values`), else the Struct.
                    fields: match serde_json::from_str::<Json>(&rec.fields_json) {
                        Ok(Json::Object(m)) if !rec.fields_json.is_empty() => m,
                        _ => rec.fields.as_ref().map(struct_to_map).unwrap_or_default(),
                    },
                })
                .collect(),
        }
    }
}

/// Kind of mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MutationKind {
    Create,
    Update,
    Delete,
}

impl MutationKind {
    pub(crate) fn to_proto(self) -> v1::MutationType {
        match self {
            MutationKind::Create => v1::MutationType::Create,
            MutationKind::Update => v1::MutationType::Update,
            MutationKind::Delete => v1::MutationType::Delete,
        }
    }

    fn from_i32(v: i32) -> Option<Self> {
        match v1::MutationType::try_from(v).ok()? {
            v1::MutationType::Create => Some(MutationKind::Create),
            v1::MutationType::Update => Some(MutationKind::Update),
            v1::MutationType::Delete => Some(MutationKind::Delete),
            v1::MutationType::Unspecified => None,
        }
    }
}

impl FromStr for MutationKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "create" => Ok(MutationKind::Create),
            "update" => Ok(MutationKind::Update),
            "delete" => Ok(MutationKind::Delete),
            other => Err(Error::Input(format!(
                "unknown mutation `{other}` (create, update, delete)"
            ))),
        }
    }
}

/// A mutation: schema, kind, data (a JSON object) and optional target node.
///
/// ```
/// use fold_client::{Mutation, MutationKind};
/// let m = Mutation::new(
///     "SensorReadings",
///     MutationKind::Create,
///     serde_json::json!({"sensor_id": "greenhouse-1", "celsius": 21.5}),
/// )
/// .unwrap();
/// assert_eq!(m.data.len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct Mutation {
    pub schema: String,
    pub kind: MutationKind,
    pub data: Map<String, Json>,
    pub node: Option<String>,
    /// Applied at most once by the node for this key (a retry returns the first result, with
    /// `replayed` set).
    pub idempotency_key: Option<String>,
}

impl Mutation {
    /// `data` must be a JSON object (field -> value).
    pub fn new(schema: impl Into<String>, kind: MutationKind, data: Json) -> Result<Self, Error> {
        let Json::Object(data) = data else {
            return Err(Error::Input(
                "mutation data must be a JSON object of field -> value".into(),
            ));
        };
        Ok(Mutation {
            schema: schema.into(),
            kind,
            data,
            node: None,
            idempotency_key: None,
        })
    }

    pub fn node(mut self, id: impl Into<String>) -> Self {
        self.node = Some(id.into());
        self
    }

    /// Make the mutation safe to retry: the node applies it once for this key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// A mutation's answer.
#[derive(Clone, Debug, Serialize)]
pub struct MutateResult {
    pub node_id: String,
    /// The range key written (Range schemas), `null` otherwise.
    pub key: Option<String>,
    pub fields: Vec<String>,
    /// New version id of each field, same order as `fields`.
    pub version_ids: Vec<String>,
    /// The node had applied this idempotency key before: nothing new was written.
    pub replayed: bool,
    /// The schema's sequence number of this write (dense per schema; see FoldNode.Subscribe).
    pub sequence: u64,
}

impl From<v1::MutateResponse> for MutateResult {
    fn from(r: v1::MutateResponse) -> Self {
        MutateResult {
            node_id: r.node_id,
            key: non_empty(r.range_key),
            fields: r.fields,
            version_ids: r.version_ids,
            replayed: r.replayed,
            sequence: r.sequence,
        }
    }
}

/// One version of a field.
#[derive(Clone, Debug, Serialize)]
pub struct Version {
    pub version_id: String,
    pub value: Json,
    pub deleted: bool,
    /// RFC 3339 time, `null` if the node sent none.
    pub written_at: Option<String>,
    pub writer: String,
    pub previous_version_id: Option<String>,
    pub mutation: Option<MutationKind>,
}

impl From<v1::FieldVersion> for Version {
    fn from(v: v1::FieldVersion) -> Self {
        Version {
            version_id: v.version_id,
            value: v.value.as_ref().map(value_to_json).unwrap_or(Json::Null),
            deleted: v.deleted,
            written_at: v.written_at.map(|t| t.to_string()),
            writer: v.writer,
            previous_version_id: non_empty(v.previous_version_id),
            mutation: MutationKind::from_i32(v.mutation_type),
        }
    }
}

/// The node's place in the mesh.
#[derive(Clone, Debug, Serialize)]
pub struct NetworkStatus {
    pub node_id: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: u32,
    pub known_peers: u32,
    pub mdns_enabled: bool,
    pub provided_schemas: Vec<String>,
    /// Each configured bootstrap address and its last dial's outcome.
    pub bootstrap: Vec<BootstrapState>,
    /// AutoNAT's verdict: "reachable", "not reachable" or "unknown".
    pub reachability: String,
    /// Addresses other nodes dialled this node back on.
    pub reachable_addrs: Vec<String>,
    /// Relay reservations this node holds or asks for.
    pub relays: Vec<RelayReservation>,
    /// This node's relay service (`null` when the sidecar reports none).
    pub relay_server: Option<RelayServer>,
    /// Schemas this node follows (read-only replicas) and how far behind each is.
    pub replicas: Vec<Replica>,
    /// The fold-node's admin HTTP address (/metrics), host:port as bound (`null` if unknown).
    pub node_admin_addr: Option<String>,
    /// The p2p-sidecar's admin HTTP address (/metrics), host:port as bound (`null` if unknown).
    pub sidecar_admin_addr: Option<String>,
    /// The schema groups this node is a member of, as it sees them.
    pub groups: Vec<GroupStatus>,
}

/// One relay reservation (`NetworkStatus.relays`).
#[derive(Clone, Debug, Serialize)]
pub struct RelayReservation {
    pub relay_node_id: String,
    pub relay_addr: String,
    /// "config", "bootstrap" or "identify".
    pub source: String,
    /// "pending", "reserved" or "failed".
    pub state: String,
    /// The relayed address other nodes dial (`null` until reserved).
    pub circuit_addr: Option<String>,
    pub last_error: Option<String>,
}

/// This node's relay service (`--relay-server`).
#[derive(Clone, Debug, Serialize)]
pub struct RelayServer {
    pub enabled: bool,
    pub reservations: u32,
    pub circuits: u32,
}

/// One followed schema (`NetworkStatus.replicas`).
#[derive(Clone, Debug, Serialize)]
pub struct Replica {
    pub schema: String,
    pub source_node_id: String,
    pub applied_sequence: u64,
    pub source_head_sequence: u64,
    /// Changes behind the source, as of its last answer.
    pub lag: u64,
    /// When the source last answered (Unix ms; `null` = not yet).
    pub last_contact_unix_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl From<v1::NetworkStatusResponse> for NetworkStatus {
    fn from(s: v1::NetworkStatusResponse) -> Self {
        let reachability = match v1::Reachability::try_from(s.reachability) {
            Ok(v1::Reachability::Reachable) => "reachable",
            Ok(v1::Reachability::NotReachable) => "not reachable",
            _ => "unknown",
        }
        .to_string();
        let relays = s
            .relays
            .into_iter()
            .map(|r| RelayReservation {
                state: match v1::relay_reservation::State::try_from(r.state) {
                    Ok(v1::relay_reservation::State::Pending) => "pending",
                    Ok(v1::relay_reservation::State::Reserved) => "reserved",
                    Ok(v1::relay_reservation::State::Failed) => "failed",
                    _ => "unknown",
                }
                .to_string(),
                relay_node_id: r.relay_node_id,
                relay_addr: r.relay_addr,
                source: r.source,
                circuit_addr: (!r.circuit_addr.is_empty()).then_some(r.circuit_addr),
                last_error: (!r.last_error.is_empty()).then_some(r.last_error),
            })
            .collect();
        let relay_server = s.relay_server.map(|r| RelayServer {
            enabled: r.enabled,
            reservations: r.reservations,
            circuits: r.circuits,
        });
        let replicas = s
            .replicas
            .into_iter()
            .map(|r| Replica {
                schema: r.schema,
                source_node_id: r.source_node_id,
                applied_sequence: r.applied_sequence,
                source_head_sequence: r.source_head_sequence,
                lag: r.lag,
                last_contact_unix_ms: (r.last_contact_unix_ms > 0)
                    .then_some(r.last_contact_unix_ms),
                last_error: (!r.last_error.is_empty()).then_some(r.last_error),
            })
            .collect();
        NetworkStatus {
            node_admin_addr: (!s.node_admin_addr.is_empty()).then_some(s.node_admin_addr),
            sidecar_admin_addr: (!s.sidecar_admin_addr.is_empty()).then_some(s.sidecar_admin_addr),
            reachability,
            reachable_addrs: s.reachable_addrs,
            relays,
            relay_server,
            replicas,
            groups: s.groups.into_iter().map(GroupStatus::from).collect(),
            node_id: s.node_id,
            listen_addrs: s.listen_addrs,
            external_addrs: s.external_addrs,
            connected_peers: s.connected_peers,
            known_peers: s.known_peers,
            mdns_enabled: s.mdns_enabled,
            provided_schemas: s.provided_schemas,
            bootstrap: s.bootstrap.into_iter().map(BootstrapState::from).collect(),
        }
    }
}

/// A peer as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Peer {
    pub node_id: String,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// Last ping round trip in microseconds, `null` when not measured yet.
    pub rtt_micros: Option<u64>,
    pub agent: String,
    pub protocols: Vec<String>,
    /// How the peer was found: mdns, kad, dial, inbound, bootstrap.
    pub source: String,
    /// The trust distance this node gives the peer, `null` when denied.
    pub trust_distance: Option<u32>,
    pub denied: bool,
    /// "direct" or "relayed" while connected, `null` otherwise.
    pub connection: Option<String>,
    /// "tcp", "quic" or "memory" while connected, `null` otherwise.
    pub transport: Option<String>,
    /// This node's circuit breaker toward the peer ("closed", "open", "half-open"); `null`
    /// before anything was forwarded to it.
    pub breaker: Option<String>,
    /// Routing (`--any` reads): the peak-EWMA latency estimate in microseconds (`null` before
    /// the first routed request), requests in flight, sent, and failed.
    pub route_latency_micros: Option<u64>,
    pub route_in_flight: u32,
    pub route_requests: u64,
    pub route_failures: u64,
}

impl From<v1::PeerInfo> for Peer {
    fn from(p: v1::PeerInfo) -> Self {
        Peer {
            node_id: p.node_id,
            addrs: p.addrs,
            connected: p.connected,
            rtt_micros: (p.rtt_micros > 0).then_some(p.rtt_micros),
            agent: p.agent_version,
            protocols: p.protocols,
            source: p.source,
            trust_distance: u32::try_from(p.trust_distance).ok(),
            denied: p.trust_distance < 0,
            connection: (!p.connection.is_empty()).then_some(p.connection),
            transport: (!p.transport.is_empty()).then_some(p.transport),
            breaker: (!p.breaker.is_empty()).then_some(p.breaker),
            route_latency_micros: (p.route_requests > 0).then_some(p.route_latency_micros),
            route_in_flight: p.route_in_flight,
            route_requests: p.route_requests,
            route_failures: p.route_failures,
        }
    }
}

/// A trust table entry.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TrustEntry {
    pub node_id: String,
    pub distance: u32,
    pub denied: bool,
}

impl From<v1::TrustEntry> for TrustEntry {
    fn from(e: v1::TrustEntry) -> Self {
        TrustEntry {
            node_id: e.node_id,
            distance: e.distance,
            denied: e.denied,
        }
    }
}

/// The trust table.
#[derive(Clone, Debug, Serialize)]
pub struct TrustTable {
    pub entries: Vec<TrustEntry>,
    /// What an unknown peer gets.
    pub default: Option<TrustEntry>,
}

/// A trust setting: a distance, or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    Distance(u32),
    Deny,
}

impl FromStr for Trust {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("deny") {
            return Ok(Trust::Deny);
        }
        s.parse::<u32>().map(Trust::Distance).map_err(|_| {
            Error::Input(format!(
                "trust must be a distance (0, 1, …) or `deny`, not `{s}`"
            ))
        })
    }
}

/// Result of a dial.
#[derive(Clone, Debug, Serialize)]
pub struct Dialed {
    pub node_id: String,
    pub address: String,
}

/// Which of the asked schemas a peer has approved.
#[derive(Clone, Debug, Serialize)]
pub struct SchemaCheck {
    pub node_id: String,
    pub approved: Vec<String>,
}

/// This node and its peers.
#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    pub node_id: String,
    pub peers: Vec<Peer>,
}

/// The mesh around a node, gathered by asking nodes for their peers
/// ([`Client::mesh_topology`](crate::Client::mesh_topology)).
#[derive(Clone, Debug, Serialize)]
pub struct MeshTopology {
    /// The node that gathered.
    pub node_id: String,
    /// Every node asked, the gathering node first (hops 0).
    pub nodes: Vec<MeshNodeView>,
    /// Nodes found within the hops but not asked because of the node limit.
    pub nodes_not_asked: u32,
}

/// One node asked while gathering a topology.
#[derive(Clone, Debug, Serialize)]
pub struct MeshNodeView {
    pub node_id: String,
    /// Hops from the gathering node.
    pub hops: u32,
    /// Its connected peers as it reports them (`trust_distance` is its trust in each).
    pub peers: Vec<Peer>,
    /// Why it could not be asked (`null` when it answered).
    pub error: Option<NodeError>,
}

/// A node's failure to answer: the gRPC code name and message.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NodeError {
    pub code: String,
    pub message: String,
}

impl From<v1::TopologyResponse> for MeshTopology {
    fn from(r: v1::TopologyResponse) -> Self {
        let mut nodes: Vec<MeshNodeView> = r
            .nodes
            .into_iter()
            .map(|n| MeshNodeView {
                node_id: n.node_id,
                hops: n.hops,
                peers: n.peers.into_iter().map(Peer::from).collect(),
                error: n.error.map(|e| NodeError {
                    code: crate::code_name(tonic::Code::from_i32(e.code)).to_string(),
                    message: e.message,
                }),
            })
            .collect();
        // A node that gathered nothing (max_hops 0) is still one node with its peers.
        if nodes.is_empty() {
            nodes.push(MeshNodeView {
                node_id: r.node_id.clone(),
                hops: 0,
                peers: r.peers.into_iter().map(Peer::from).collect(),
                error: None,
            });
        }
        MeshTopology {
            node_id: r.node_id,
            nodes,
            nodes_not_asked: r.nodes_not_asked,
        }
    }
}

/// The last outcome of a bootstrap address's dial.
#[derive(Clone, Debug, Serialize)]
pub struct BootstrapState {
    pub address: String,
    /// `dialing`, `connected`, `failed`, or `self` (this node's own address).
    pub state: String,
    /// The last dial error (`null` when none failed yet).
    pub last_error: Option<String>,
    /// The node that answered the last successful dial.
    pub node_id: Option<String>,
}

impl From<v1::BootstrapStatus> for BootstrapState {
    fn from(b: v1::BootstrapStatus) -> Self {
        use v1::bootstrap_status::State;
        let state = match State::try_from(b.state) {
            Ok(State::Connected) => "connected",
            Ok(State::Failed) => "failed",
            Ok(State::Dialing) => "dialing",
            Ok(State::SelfAddress) => "self",
            _ => "unknown",
        };
        BootstrapState {
            address: b.address,
            state: state.to_string(),
            last_error: non_empty(b.last_error),
            node_id: non_empty(b.node_id),
        }
    }
}

/// grpc.health.v1 serving status of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Serving,
    NotServing,
    Unknown,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inputs() {
        assert_eq!("deny".parse::<Trust>().unwrap(), Trust::Deny);
        assert_eq!("3".parse::<Trust>().unwrap(), Trust::Distance(3));
        assert!("-1".parse::<Trust>().is_err());
        assert_eq!(
            "Approved".parse::<SchemaState>().unwrap(),
            SchemaState::Approved
        );
        assert!(Mutation::new("S", MutationKind::Create, serde_json::json!([1])).is_err());
    }

    #[test]
    fn peers_map_denied_trust() {
        let p = Peer::from(v1::PeerInfo {
            trust_distance: -1,
            ..Default::default()
        });
        assert!(p.denied);
        assert_eq!(p.trust_distance, None);
        assert_eq!(p.rtt_micros, None);
    }
}

/// A subscription to a schema's changes ([`Client::subscribe`](crate::Client::subscribe)).
#[derive(Clone, Debug, Default)]
pub struct Subscription {
    pub schema: String,
    /// Fields to receive (empty: every field the caller may read).
    pub fields: Vec<String>,
    pub filter: Option<Filter>,
    /// Changes after this sequence (0: from the first kept one). To resume, the last sequence
    /// received.
    pub from_sequence: u64,
    /// Another node's changes (through the mesh).
    pub node: Option<String>,
    /// The changes of one node serving the schema, chosen by the connected node (the stream's
    /// progress events name it).
    pub any: bool,
}

impl Subscription {
    pub fn new(schema: impl Into<String>) -> Self {
        Subscription {
            schema: schema.into(),
            ..Default::default()
        }
    }
}

/// One event of a subscription.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SubscriptionEvent {
    /// One committed mutation, with the subscribed fields it wrote (exact values).
    Change {
        sequence: u64,
        /// The range key (Range schemas), `null` for Single schemas.
        key: Option<String>,
        mutation: Option<MutationKind>,
        writer: String,
        written_at: Option<String>,
        /// Field -> value written (`null` for a deletion).
        fields: Map<String, Json>,
    },
    /// Everything up to `sequence` was sent or skipped; `head` is the schema's newest sequence
    /// on `node_id`.
    Progress {
        sequence: u64,
        head: u64,
        oldest: u64,
        node_id: String,
    },
}

impl SubscriptionEvent {
    pub(crate) fn from_proto(r: v1::SubscribeResponse) -> Option<Self> {
        match r.event? {
            v1::subscribe_response::Event::Change(c) => {
                let mut fields = Map::new();
                for f in c.fields {
                    let value = if f.deleted {
                        Json::Null
                    } else if !f.value_json.is_empty() {
                        serde_json::from_str(&f.value_json).unwrap_or(Json::Null)
                    } else {
                        f.value.as_ref().map(value_to_json).unwrap_or(Json::Null)
                    };
                    fields.insert(f.field, value);
                }
                Some(SubscriptionEvent::Change {
                    sequence: c.sequence,
                    key: (!c.range_key.is_empty()).then_some(c.range_key),
                    mutation: MutationKind::from_i32(c.mutation_type),
                    writer: c.writer,
                    written_at: c.written_at.map(|t| t.to_string()),
                    fields,
                })
            }
            v1::subscribe_response::Event::Progress(p) => Some(SubscriptionEvent::Progress {
                sequence: p.sequence,
                head: p.head_sequence,
                oldest: p.oldest_sequence,
                node_id: p.node_id,
            }),
        }
    }
}
