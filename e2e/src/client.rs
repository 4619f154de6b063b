//! Small helpers for talking to a fold-node with the generated tonic clients.

use std::time::Duration;

use fold_proto::json::{map_to_struct, struct_to_json};
use fold_proto::v1::fold_node_client::FoldNodeClient;
use fold_proto::v1::network_client::NetworkClient;
use fold_proto::v1::{
    LoadSchemaRequest, MutateRequest, MutateResponse, MutationType, QueryRequest, QueryResponse,
    RangeFilter,
};
use serde_json::{Value as Json, json};
use tonic::transport::Channel;

/// A channel to `http://addr` (connects lazily; each call has its own deadline).
pub fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid address")
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy()
}

pub fn fold(addr: &str) -> FoldNodeClient<Channel> {
    FoldNodeClient::new(channel(addr))
}

pub fn network(addr: &str) -> NetworkClient<Channel> {
    NetworkClient::new(channel(addr))
}

/// A field definition in the fold_db JSON format.
pub fn field(read: Json, write: Json) -> Json {
    json!({
        "permission_policy": {"read_policy": read, "write_policy": write},
        "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
        "field_type": "Single",
        "field_mappers": {}
    })
}

/// A schema in the fold_db JSON format; `range_key` makes it a Range schema.
pub fn schema(name: &str, range_key: Option<&str>, fields: Json) -> Json {
    let schema_type = match range_key {
        Some(k) => json!({"Range": {"range_key": k}}),
        None => json!("Single"),
    };
    json!({
        "name": name,
        "schema_type": schema_type,
        "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
        "fields": fields
    })
}

pub fn load_req(schema: &Json, approve: bool) -> LoadSchemaRequest {
    LoadSchemaRequest {
        schema_json: schema.to_string(),
        approve,
    }
}

pub fn mutate_req(schema: &str, kind: MutationType, data: Json) -> MutateRequest {
    MutateRequest {
        idempotency_key: String::new(),
        data_json: String::new(),
        schema: schema.into(),
        mutation_type: kind as i32,
        data: Some(map_to_struct(data.as_object().expect("data is an object"))),
        target_node_id: String::new(),
    }
}

pub fn query_req(schema: &str, fields: &[&str], filter: Option<RangeFilter>) -> QueryRequest {
    QueryRequest {
        route: 0,
        page_size: 0,
        page_token: String::new(),
        json_values: false,
        schema: schema.into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
        filter,
        target_node_id: String::new(),
        definition_hash: Default::default(),
        consistency: 0,
    }
}

/// Records as `(range_key, fields as JSON)`.
pub fn records(resp: &QueryResponse) -> Vec<(String, Json)> {
    resp.records
        .iter()
        .map(|r| {
            (
                r.range_key.clone(),
                r.fields.as_ref().map(struct_to_json).unwrap_or(Json::Null),
            )
        })
        .collect()
}

pub fn keys(resp: &QueryResponse) -> Vec<String> {
    resp.records.iter().map(|r| r.range_key.clone()).collect()
}

pub fn written(resp: &MutateResponse) -> Vec<String> {
    resp.fields.clone()
}

/// The node ids `addr`'s node finds as providers of `schema` (`Network.FindProviders`), or
/// `None` when the lookup failed (for waiting loops).
pub async fn providers_of(addr: &str, schema: &str) -> Option<Vec<String>> {
    network(addr)
        .find_providers(fold_proto::v1::FindProvidersRequest {
            schema: schema.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().node_ids)
}
