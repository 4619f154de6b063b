//! Conversions between protobuf's JSON-like well-known types and `serde_json::Value`.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// protobuf `Value` -> JSON. Numbers that are whole and fit in i64 become JSON integers, so a
/// value written as `5` reads back as `5`, not `5.0`.
pub fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Json::Object(struct_to_map(s)),
    }
}

fn number_to_json(n: f64) -> Json {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: integers beyond it are not exact in f64
    if n.is_finite() && n.fract() == 0.0 && n.abs() <= EXACT {
        Json::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map(Json::Number).unwrap_or(Json::Null)
    }
}

/// protobuf `Struct` -> JSON object map.
pub fn struct_to_map(s: &Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// protobuf `Struct` -> JSON object.
pub fn struct_to_json(s: &Struct) -> Json {
    Json::Object(struct_to_map(s))
}

/// JSON -> protobuf `Value`.
pub fn json_to_value(j: &Json) -> Value {
    let kind = match j {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(map_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// JSON object map -> protobuf `Struct`.
pub fn map_to_struct(m: &Map<String, Json>) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_keeps_integers_and_nesting() {
        let j = json!({"a": 5, "b": 1.5, "c": [true, null, "x"], "d": {"e": -7}});
        let Json::Object(m) = &j else { panic!() };
        let back = struct_to_json(&map_to_struct(m));
        assert_eq!(back, j);
    }
}
