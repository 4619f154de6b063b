//! Schemas in the fold_db JSON format: parsing, validation (errors name the field and the
//! reason) and the canonical content hash.
//!
//! The accepted format is fold_db's (see docs/SCHEMAS.md): a `name`, a `schema_type` of
//! `"Single"` or `{"Range": {"range_key": "<field>"}}`, a schema-level `payment_config`, and
//! `fields`, each with a `permission_policy`, a `payment_config`, an optional `field_type`,
//! `field_mappers`, `writable` and `ref_atom_uuid`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};

use crate::model::distance::{FieldPolicy, TrustDistance};

/// Longest schema or field name accepted.
const MAX_NAME_LEN: usize = 128;
/// Most fields one schema may declare.
const MAX_FIELDS: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum SchemaType {
    Single,
    Range { range_key: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub policy: FieldPolicy,
    pub writable: bool,
    /// "Single" or "Range" (informational: storage is keyed by the schema type).
    pub field_type: String,
}

/// A validated schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub name: String,
    pub schema_type: SchemaType,
    /// Fields in name order.
    pub fields: BTreeMap<String, FieldDef>,
    /// The definition as loaded (with `hash` filled in), returned by GetSchema.
    pub definition: Json,
    /// fold_db's content hash (see [`content_hash`]).
    pub hash: String,
    /// The content hash with every field's permission policy and writability included (see
    /// [`definition_hash`]): two nodes that hold the same `definition_hash` enforce the same
    /// rules. Replicas and routed reads compare this one, not `hash`, which leaves policies out.
    pub definition_hash: String,
}

impl Schema {
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.fields.get(name)
    }

    pub fn range_key(&self) -> Option<&str> {
        match &self.schema_type {
            SchemaType::Single => None,
            SchemaType::Range { range_key } => Some(range_key),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.schema_type {
            SchemaType::Single => "Single",
            SchemaType::Range { .. } => "Range",
        }
    }
}

/// A schema definition that failed validation: what is wrong and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError(msg.into()))
}

/// Parse and validate schema JSON text.
pub fn parse(text: &str) -> Result<Schema, SchemaError> {
    let json: Json = serde_json::from_str(text)
        .map_err(|e| SchemaError(format!("schema is not valid JSON: {e}")))?;
    from_json(json)
}

/// Validate an already-parsed JSON schema definition.
pub fn from_json(mut json: Json) -> Result<Schema, SchemaError> {
    let Some(obj) = json.as_object_mut() else {
        return err("schema must be a JSON object");
    };
    obj.remove("hash");
    const KNOWN: [&str; 5] = ["name", "schema_type", "fields", "payment_config", "hash"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return err(format!(
            "unknown top-level key '{k}' (expected name, schema_type, fields, payment_config)"
        ));
    }
    let name = match obj.get("name") {
        Some(Json::String(s)) => s.clone(),
        Some(_) => return err("'name' must be a string"),
        None => return err("'name' is required"),
    };
    check_name("schema name", &name)?;

    let schema_type = schema_type(obj)?;

    match obj.get("payment_config") {
        Some(pc) => validate_schema_payment(pc)?,
        None => {
            return err(
                "'payment_config' is required, e.g. {\"base_multiplier\": 1.0, \"min_payment_threshold\": 0}",
            );
        }
    }

    let fields = parse_fields(obj)?;
    if let SchemaType::Range { range_key } = &schema_type
        && !fields.contains_key(range_key)
    {
        return err(format!(
            "range_key '{range_key}' is not one of the schema's fields"
        ));
    }

    let hash = content_hash(&json);
    if let Some(obj) = json.as_object_mut() {
        obj.insert("hash".into(), Json::String(hash.clone()));
    }
    let definition_hash = definition_hash(&hash, &fields);
    Ok(Schema {
        name,
        schema_type,
        fields,
        definition: json,
        hash,
        definition_hash,
    })
}

/// The `schema_type`: Single (the default) or Range with its range key.
fn schema_type(obj: &serde_json::Map<String, Json>) -> Result<SchemaType, SchemaError> {
    Ok(match obj.get("schema_type") {
        None | Some(Json::Null) => SchemaType::Single,
        Some(Json::String(s)) if s == "Single" => SchemaType::Single,
        Some(Json::String(s)) if s == "Range" => {
            return err(
                "'schema_type' Range needs its range key: {\"Range\": {\"range_key\": \"<field>\"}}",
            );
        }
        Some(v) => match v.get("Range").and_then(|r| r.get("range_key")) {
            Some(Json::String(k)) if !k.is_empty() => SchemaType::Range {
                range_key: k.clone(),
            },
            _ => {
                return err(format!(
                    "'schema_type' must be \"Single\" or {{\"Range\": {{\"range_key\": \"<field>\"}}}}, got {v}"
                ));
            }
        },
    })
}

/// The `fields`: at least one, at most MAX_FIELDS, each name and definition checked.
fn parse_fields(
    obj: &serde_json::Map<String, Json>,
) -> Result<BTreeMap<String, FieldDef>, SchemaError> {
    let fields_json = match obj.get("fields") {
        Some(Json::Object(m)) => m,
        Some(_) => return err("'fields' must be an object mapping field names to definitions"),
        None => return err("'fields' is required"),
    };
    if fields_json.is_empty() {
        return err("'fields' must declare at least one field");
    }
    if fields_json.len() > MAX_FIELDS {
        return err(format!(
            "too many fields: {} (at most {MAX_FIELDS})",
            fields_json.len()
        ));
    }
    let mut fields = BTreeMap::new();
    for (fname, fdef) in fields_json {
        check_name("field name", fname)?;
        let def =
            parse_field(fname, fdef).map_err(|e| SchemaError(format!("field '{fname}': {e}")))?;
        fields.insert(fname.clone(), def);
    }
    Ok(fields)
}

fn check_name(what: &str, name: &str) -> Result<(), SchemaError> {
    if name.is_empty() {
        return err(format!("{what} must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return err(format!(
            "{what} '{name}' is longer than {MAX_NAME_LEN} bytes"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return err(format!(
            "{what} '{name}' contains '{c}'; use letters, digits, '_', '-' or '.'"
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    permission_policy: Option<RawPolicy>,
    payment_config: Option<RawFieldPayment>,
    #[serde(default)]
    field_type: Option<String>,
    #[serde(default)]
    field_mappers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ref_atom_uuid: Option<String>,
    #[serde(default)]
    transform: Option<Json>,
    #[serde(default = "default_true")]
    writable: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    read_policy: Option<Json>,
    write_policy: Option<Json>,
    #[serde(default)]
    explicit_read_policy: Option<RawExplicit>,
    #[serde(default)]
    explicit_write_policy: Option<RawExplicit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExplicit {
    counts_by_pub_key: BTreeMap<String, u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFieldPayment {
    base_multiplier: f64,
    trust_distance_scaling: Json,
    #[serde(default)]
    min_payment: Option<u64>,
}

fn parse_field(name: &str, def: &Json) -> Result<FieldDef, String> {
    if !def.is_object() {
        return Err("definition must be an object".into());
    }
    let raw: RawField = serde_json::from_value(def.clone()).map_err(|e| e.to_string())?;
    let Some(policy) = raw.permission_policy else {
        return Err(
            "'permission_policy' is required, e.g. {\"read_policy\": {\"Distance\": 0}, \"write_policy\": {\"Distance\": 0}}"
                .into(),
        );
    };
    let read = parse_distance(policy.read_policy.as_ref(), "read_policy")?;
    let write = parse_distance(policy.write_policy.as_ref(), "write_policy")?;
    let Some(payment) = raw.payment_config else {
        return Err("'payment_config' is required, e.g. {\"base_multiplier\": 1.0, \"trust_distance_scaling\": \"None\", \"min_payment\": null}".into());
    };
    validate_field_payment(&payment)?;
    let field_type = match raw.field_type.as_deref() {
        None | Some("Single") => "Single".to_string(),
        Some("Range") => "Range".to_string(),
        Some("Collection") => {
            return Err(
                "field_type 'Collection' was removed from fold_db; use Single or Range".into(),
            );
        }
        Some(other) => return Err(format!("field_type '{other}' is not Single or Range")),
    };
    if raw.transform.is_some() {
        // Transforms are fold_db's derived fields; this node never runs them, so a field that
        // depends on one would silently never get a value. Refuse it instead.
        return Err("transforms are not supported by this node; remove 'transform'".into());
    }
    let _ = (raw.field_mappers, raw.ref_atom_uuid);
    Ok(FieldDef {
        name: name.to_string(),
        policy: FieldPolicy {
            read,
            write,
            explicit_read: policy.explicit_read_policy.map(|e| e.counts_by_pub_key),
            explicit_write: policy.explicit_write_policy.map(|e| e.counts_by_pub_key),
        },
        writable: raw.writable,
        field_type,
    })
}

fn parse_distance(v: Option<&Json>, what: &str) -> Result<TrustDistance, String> {
    let bad = || {
        format!(
            "'{what}' must be {{\"Distance\": <n>}} or \"NoRequirement\", got {}",
            v.map(|j| j.to_string()).unwrap_or_else(|| "nothing".into())
        )
    };
    match v {
        None => Err(format!("'{what}' is required")),
        Some(Json::String(s)) if s == "NoRequirement" => Ok(TrustDistance::NoRequirement),
        Some(Json::Object(m)) if m.len() == 1 => {
            if let Some(n) = m.get("Distance") {
                let n = n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)?;
                Ok(TrustDistance::Distance(n))
            } else if let Some(Json::Null) = m.get("NoRequirement") {
                Ok(TrustDistance::NoRequirement)
            } else {
                Err(bad())
            }
        }
        Some(_) => Err(bad()),
    }
}

fn validate_field_payment(p: &RawFieldPayment) -> Result<(), String> {
    if !(p.base_multiplier > 0.0 && p.base_multiplier.is_finite()) {
        return Err("payment_config.base_multiplier must be a number > 0".into());
    }
    if p.min_payment == Some(0) {
        return Err("payment_config.min_payment may not be 0 (use null for none)".into());
    }
    let s = &p.trust_distance_scaling;
    let ok = match s {
        Json::String(v) if v == "None" => true,
        Json::Object(m) if m.len() == 1 => {
            if let Some(Json::Null) = m.get("None") {
                true
            } else if let Some(lin) = m.get("Linear") {
                check_scaling(lin, &["slope", "intercept", "min_factor"])?;
                true
            } else if let Some(exp) = m.get("Exponential") {
                check_scaling(exp, &["base", "scale", "min_factor"])?;
                true
            } else {
                false
            }
        }
        _ => false,
    };
    if !ok {
        return Err(format!(
            "payment_config.trust_distance_scaling must be \"None\", {{\"Linear\": {{slope, intercept, min_factor}}}} or {{\"Exponential\": {{base, scale, min_factor}}}}, got {s}"
        ));
    }
    Ok(())
}

fn check_scaling(v: &Json, keys: &[&str]) -> Result<(), String> {
    let Some(m) = v.as_object() else {
        return Err("trust_distance_scaling parameters must be an object".into());
    };
    for k in keys {
        let Some(x) = m.get(*k).and_then(Json::as_f64) else {
            return Err(format!("trust_distance_scaling needs a number '{k}'"));
        };
        if *k == "min_factor" && x < 1.0 {
            return Err("trust_distance_scaling.min_factor must be >= 1.0".into());
        }
    }
    if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!("trust_distance_scaling has unknown key '{k}'"));
    }
    Ok(())
}

fn validate_schema_payment(pc: &Json) -> Result<(), SchemaError> {
    let Some(m) = pc.as_object() else {
        return err("'payment_config' must be an object");
    };
    match m.get("base_multiplier").and_then(Json::as_f64) {
        Some(x) if x > 0.0 && x.is_finite() => {}
        _ => return err("payment_config.base_multiplier must be a number > 0"),
    }
    match m.get("min_payment_threshold") {
        Some(v) if v.is_u64() => {}
        None => {}
        Some(v) => {
            return err(format!(
                "payment_config.min_payment_threshold must be a non-negative integer, got {v}"
            ));
        }
    }
    if let Some(k) = m
        .keys()
        .find(|k| !["base_multiplier", "min_payment_threshold"].contains(&k.as_str()))
    {
        return err(format!("payment_config has unknown key '{k}'"));
    }
    Ok(())
}

/// fold_db's schema hash: SHA-256 hex of the canonical JSON (keys sorted recursively) with
/// every `hash`, `payment_config`, `permission_policy` and `name` key removed at any depth.
pub fn content_hash(json: &Json) -> String {
    let stripped = strip(json);
    let text = canonical(&stripped);
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The content hash extended with what it leaves out and a reader of the data depends on: each
/// field's read and write policy, its explicit key lists and whether it is writable, taken from
/// the parsed definition (so two spellings of one policy hash alike). SHA-256 hex.
pub fn definition_hash(content_hash: &str, fields: &BTreeMap<String, FieldDef>) -> String {
    fn distance(d: TrustDistance) -> String {
        match d {
            TrustDistance::NoRequirement => "none".into(),
            TrustDistance::Distance(n) => format!("d{n}"),
        }
    }
    fn keys(k: Option<&BTreeMap<String, u8>>) -> String {
        match k {
            None => "-".into(),
            Some(m) => m
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
    let mut h = Sha256::new();
    h.update(b"fold-definition-v1\n");
    h.update(content_hash.as_bytes());
    for (name, f) in fields {
        let line = format!(
            "\n{}\0{}\0{}\0{}\0{}\0{}",
            name,
            distance(f.policy.read),
            distance(f.policy.write),
            keys(f.policy.explicit_read.as_ref()),
            keys(f.policy.explicit_write.as_ref()),
            f.writable
        );
        h.update(line.as_bytes());
    }
    hex::encode(h.finalize())
}

fn strip(v: &Json) -> Json {
    const DROP: [&str; 4] = ["hash", "payment_config", "permission_policy", "name"];
    match v {
        Json::Object(m) => Json::Object(
            m.iter()
                .filter(|(k, _)| !DROP.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect::<Map<_, _>>(),
        ),
        Json::Array(a) => Json::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

/// JSON text with object keys sorted at every level (serde_json's map is sorted by default,
/// but do it explicitly so the hash does not depend on a feature flag).
pub fn canonical(v: &Json) -> String {
    fn write(v: &Json, out: &mut String) {
        match v {
            Json::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Json::String((*k).clone()).to_string());
                    out.push(':');
                    if let Some(x) = m.get(*k) {
                        write(x, out);
                    }
                }
                out.push('}');
            }
            Json::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    write(v, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(read: Json) -> Json {
        json!({
            "permission_policy": {"read_policy": read, "write_policy": {"Distance": 0}},
            "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
            "field_type": "Single",
            "field_mappers": {}
        })
    }

    fn schema(fields: Json) -> Json {
        json!({
            "name": "S",
            "schema_type": "Single",
            "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
            "fields": fields
        })
    }

    #[test]
    fn parses_single_and_range() {
        let s = from_json(schema(json!({"a": field(json!({"Distance": 2}))}))).unwrap();
        assert_eq!(s.schema_type, SchemaType::Single);
        assert_eq!(s.fields["a"].policy.read, TrustDistance::Distance(2));
        let mut r = schema(
            json!({"k": field(json!("NoRequirement")), "v": field(json!({"NoRequirement": null}))}),
        );
        r["schema_type"] = json!({"Range": {"range_key": "k"}});
        let r = from_json(r).unwrap();
        assert_eq!(r.range_key(), Some("k"));
        assert_eq!(r.fields["v"].policy.read, TrustDistance::NoRequirement);
    }

    #[test]
    fn errors_name_the_field_and_reason() {
        let mut f = field(json!({"Distance": 0}));
        f.as_object_mut().unwrap().remove("permission_policy");
        let e = from_json(schema(json!({"age": f}))).unwrap_err().0;
        assert!(
            e.contains("field 'age'") && e.contains("permission_policy"),
            "{e}"
        );

        let e = from_json(schema(json!({"age": field(json!({"Distance": -1}))})))
            .unwrap_err()
            .0;
        assert!(
            e.contains("field 'age'") && e.contains("read_policy"),
            "{e}"
        );

        let mut f = field(json!({"Distance": 0}));
        f["field_type"] = json!("Collection");
        let e = from_json(schema(json!({"tags": f}))).unwrap_err().0;
        assert!(e.contains("tags") && e.contains("Collection"), "{e}");

        let mut r = schema(json!({"a": field(json!({"Distance": 0}))}));
        r["schema_type"] = json!({"Range": {"range_key": "missing"}});
        let e = from_json(r).unwrap_err().0;
        assert!(e.contains("range_key 'missing'"), "{e}");

        assert!(parse("{not json").unwrap_err().0.contains("not valid JSON"));
        assert!(parse("[]").unwrap_err().0.contains("object"));
    }

    #[test]
    fn definition_hash_includes_policies() {
        let a = parse(&schema(json!({"a": field(json!({"Distance": 0}))})).to_string()).unwrap();
        let b = parse(&schema(json!({"a": field(json!({"Distance": 5}))})).to_string()).unwrap();
        let c = parse(&schema(json!({"a": field(json!({"Distance": 0}))})).to_string()).unwrap();
        assert_eq!(a.hash, b.hash, "the fold_db hash leaves policies out");
        assert_ne!(a.definition_hash, b.definition_hash);
        assert_eq!(a.definition_hash, c.definition_hash);
    }

    #[test]
    fn hash_ignores_names_policies_and_key_order() {
        let a = schema(json!({"a": field(json!({"Distance": 0}))}));
        let mut b = schema(json!({"a": field(json!({"Distance": 5}))}));
        b["name"] = json!("Other");
        assert_eq!(content_hash(&a), content_hash(&b));
        let mut c = a.clone();
        c["fields"]["a"]["writable"] = json!(false);
        assert_ne!(content_hash(&a), content_hash(&c));
        assert_eq!(
            canonical(&json!({"b":1,"a":[{"d":1,"c":2}]})),
            r#"{"a":[{"c":2,"d":1}],"b":1}"#
        );
    }
}
