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

/// protobuf `Struct` -> JSON object map, refusing numbers JSON cannot hold (NaN, ±Infinity)
/// instead of turning them into null. The error names the field path.
pub fn struct_to_map_checked(s: &Struct) -> Result<Map<String, Json>, String> {
    fn check(v: &Value, path: &str) -> Result<(), String> {
        match &v.kind {
            Some(Kind::NumberValue(n)) if !n.is_finite() => Err(format!(
                "'{path}' is {n}, which is not a JSON number; NaN and Infinity cannot be stored"
            )),
            Some(Kind::ListValue(l)) => l
                .values
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| check(v, &format!("{path}[{i}]"))),
            Some(Kind::StructValue(s)) => s
                .fields
                .iter()
                .try_for_each(|(k, v)| check(v, &format!("{path}.{k}"))),
            _ => Ok(()),
        }
    }
    for (k, v) in &s.fields {
        check(v, k)?;
    }
    Ok(struct_to_map(s))
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
    fn non_finite_numbers_are_refused_with_their_path() {
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        let inner = Struct {
            fields: [("x".to_string(), nan.clone())].into_iter().collect(),
        };
        let s = Struct {
            fields: [(
                "a".to_string(),
                Value {
                    kind: Some(Kind::StructValue(inner)),
                },
            )]
            .into_iter()
            .collect(),
        };
        let e = struct_to_map_checked(&s).unwrap_err();
        assert!(e.contains("'a.x'") && e.contains("NaN"), "{e}");
        let inf = Struct {
            fields: [(
                "b".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::INFINITY)),
                },
            )]
            .into_iter()
            .collect(),
        };
        assert!(struct_to_map_checked(&inf).is_err());
        let Json::Object(m) = json!({"ok": [1, 2.5, {"c": null}]}) else {
            panic!()
        };
        assert!(struct_to_map_checked(&map_to_struct(&m)).is_ok());
    }

    #[test]
    fn round_trip_keeps_integers_and_nesting() {
        let j = json!({"a": 5, "b": 1.5, "c": [true, null, "x"], "d": {"e": -7}});
        let Json::Object(m) = &j else { panic!() };
        let back = struct_to_json(&map_to_struct(m));
        assert_eq!(back, j);
    }
}
