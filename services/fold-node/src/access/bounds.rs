//! The one place where every string and list a request carries from outside is checked against
//! its limit, before anything else sees it: no cache, DHT lookup, scan or log line receives an
//! unchecked name, pattern, token or key. Both entries call it: the public API (`api.rs`) and
//! requests forwarded by other nodes (`peer_requests.rs`). The limits are documented in
//! docs/SECURITY.md ("Limits").

use fold_proto::v1::{
    BatchMutateRequest, HistoryRequest, MutateRequest, QueryRequest, RangeFilter, SubscribeRequest,
    range_filter,
};
use fold_proto::wire::ChangesRequest;

use crate::error::NodeError;

/// Longest schema or field name (as `schema.rs` accepts when loading).
pub const MAX_NAME_BYTES: usize = 128;
/// Longest node id (a PeerId is 52 characters).
pub const MAX_NODE_ID_BYTES: usize = 64;
/// Longest range key, key prefix or range bound.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest key pattern (glob): matching costs up to pattern × key characters per key.
pub const MAX_PATTERN_BYTES: usize = 256;
/// Longest page token (ours are about 100 bytes).
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Longest definition hash (SHA-256 hex is 64).
pub const MAX_HASH_BYTES: usize = 128;
/// Most fields one request may name (as a schema may declare).
pub const MAX_FIELDS: usize = 1024;

fn too_long(what: &str, len: usize, max: usize) -> NodeError {
    NodeError::invalid_argument(format!("'{what}' is {len} bytes; at most {max}"))
}

fn string(what: &str, s: &str, max: usize) -> Result<(), NodeError> {
    if s.len() > max {
        return Err(too_long(what, s.len(), max));
    }
    Ok(())
}

fn fields(names: &[String]) -> Result<(), NodeError> {
    if names.len() > MAX_FIELDS {
        return Err(NodeError::invalid_argument(format!(
            "'fields' names {} fields; at most {MAX_FIELDS}",
            names.len()
        )));
    }
    names
        .iter()
        .try_for_each(|f| string("fields", f, MAX_NAME_BYTES))
}

/// A range filter's keys, bounds and pattern.
pub fn filter(f: Option<&RangeFilter>) -> Result<(), NodeError> {
    let Some(filter) = f.and_then(|f| f.filter.as_ref()) else {
        return Ok(());
    };
    match filter {
        range_filter::Filter::Key(k) => string("filter.key", k, MAX_KEY_BYTES),
        range_filter::Filter::KeyPrefix(p) => string("filter.key_prefix", p, MAX_KEY_BYTES),
        range_filter::Filter::KeyRange(r) => {
            string("filter.key_range.start", &r.start, MAX_KEY_BYTES)?;
            string("filter.key_range.end", &r.end, MAX_KEY_BYTES)
        }
        range_filter::Filter::Keys(list) => {
            if list.keys.len() > crate::model::filter::MAX_FILTER_KEYS {
                return Err(NodeError::invalid_argument(format!(
                    "keys filter lists {} keys; at most {}",
                    list.keys.len(),
                    crate::model::filter::MAX_FILTER_KEYS
                )));
            }
            list.keys
                .iter()
                .try_for_each(|k| string("filter.keys", k, MAX_KEY_BYTES))
        }
        range_filter::Filter::KeyPattern(p) => string("filter.key_pattern", p, MAX_PATTERN_BYTES),
    }
}

/// What every read and write names: a schema, maybe a node and a pinned definition.
fn common(schema: &str, target: &str, hash: &str) -> Result<(), NodeError> {
    string("schema", schema, MAX_NAME_BYTES)?;
    string("target_node_id", target, MAX_NODE_ID_BYTES)?;
    string("definition_hash", hash, MAX_HASH_BYTES)
}

/// A request whose strings are checked at the edge.
pub trait Bounded {
    fn check_bounds(&self) -> Result<(), NodeError>;
}

impl Bounded for QueryRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, &self.target_node_id, &self.definition_hash)?;
        fields(&self.fields)?;
        filter(self.filter.as_ref())?;
        string("page_token", &self.page_token, MAX_TOKEN_BYTES)
    }
}

impl Bounded for HistoryRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, &self.target_node_id, &self.definition_hash)?;
        string("field", &self.field, MAX_NAME_BYTES)?;
        string("range_key", &self.range_key, MAX_KEY_BYTES)?;
        string("page_token", &self.page_token, MAX_TOKEN_BYTES)
    }
}

impl Bounded for SubscribeRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, &self.target_node_id, &self.definition_hash)?;
        fields(&self.fields)?;
        filter(self.filter.as_ref())
    }
}

impl Bounded for MutateRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, &self.target_node_id, "")
    }
}

impl Bounded for BatchMutateRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, &self.target_node_id, "")
    }
}

impl Bounded for ChangesRequest {
    fn check_bounds(&self) -> Result<(), NodeError> {
        common(&self.schema, "", &self.definition_hash)?;
        string("schema_hash", &self.schema_hash, MAX_HASH_BYTES)?;
        fields(&self.fields)?;
        filter(self.filter.as_ref())
    }
}

/// A schema name on its own (GetSchema, SetSchemaState, FindProviders, CheckSchemas).
pub fn schema_name(name: &str) -> Result<(), NodeError> {
    string("schema", name, MAX_NAME_BYTES)
}

/// A node id on its own (trust entries, Dial, Disconnect, CheckSchemas).
pub fn node_id(id: &str) -> Result<(), NodeError> {
    string("node_id", id, MAX_NODE_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_patterns_and_tokens_are_refused_naming_the_field() {
        let big = "x".repeat(1 << 20);
        let q = QueryRequest {
            schema: big.clone(),
            ..Default::default()
        };
        let e = q.check_bounds().unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("'schema'"), "{}", e.message());
        let q = QueryRequest {
            schema: "S".into(),
            filter: Some(RangeFilter {
                filter: Some(range_filter::Filter::KeyPattern(big.clone())),
            }),
            ..Default::default()
        };
        assert!(
            q.check_bounds()
                .unwrap_err()
                .message()
                .contains("key_pattern")
        );
        let h = HistoryRequest {
            schema: "S".into(),
            page_token: big,
            ..Default::default()
        };
        assert!(
            h.check_bounds()
                .unwrap_err()
                .message()
                .contains("page_token")
        );
        let ok = QueryRequest {
            schema: "S".into(),
            fields: vec!["a".into()],
            ..Default::default()
        };
        assert!(ok.check_bounds().is_ok());
    }
}
