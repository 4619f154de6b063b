//! Property-based tests (stable Rust's stand-in for a fuzzer) of the parsers that take untrusted
//! input: schema JSON, range filters and glob patterns. Each property runs hundreds of generated
//! cases; failures shrink to a minimal input.

use fold_node::model::filter::{KeyFilter, glob_match};
use fold_node::storage::schema;
use proptest::prelude::*;
use serde_json::{Value as Json, json};

/// Reference glob matcher: plain recursion, obviously correct, exponential (inputs stay small).
fn naive_glob(p: &[char], t: &[char]) -> bool {
    match (p.first(), t.first()) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some('*'), _) => naive_glob(&p[1..], t) || (!t.is_empty() && naive_glob(p, &t[1..])),
        (Some('?'), Some(_)) => naive_glob(&p[1..], &t[1..]),
        (Some(c), Some(d)) if c == d => naive_glob(&p[1..], &t[1..]),
        _ => false,
    }
}

fn arb_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-zA-Z_\\-\\. {}\":,]{0,12}".prop_map(Json::String),
        Just(json!("NoRequirement")),
        Just(json!({"Distance": 1})),
        Just(json!("None")),
        Just(json!("Single")),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()),
                    Just("fields".to_string()),
                    Just("schema_type".to_string()),
                    Just("payment_config".to_string()),
                    Just("permission_policy".to_string()),
                    Just("read_policy".to_string()),
                    Just("write_policy".to_string()),
                    Just("Range".to_string()),
                    Just("range_key".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn valid_field() -> Json {
    json!({
        "permission_policy": {"read_policy": {"Distance": 0}, "write_policy": "NoRequirement"},
        "payment_config": {"base_multiplier": 1.0, "trust_distance_scaling": "None", "min_payment": null},
        "field_type": "Single", "field_mappers": {}
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary text never panics the schema parser; it is accepted or refused with a message.
    #[test]
    fn schema_parser_total_on_text(text in ".{0,200}") {
        if let Err(e) = schema::parse(&text) {
            prop_assert!(!e.0.is_empty());
        }
    }

    /// Arbitrary JSON shaped like schemas never panics; anything accepted is self-consistent.
    #[test]
    fn schema_parser_total_on_json(j in arb_json()) {
        match schema::from_json(j) {
            Ok(s) => {
                prop_assert!(!s.fields.is_empty());
                if let Some(rk) = s.range_key() {
                    prop_assert!(s.fields.contains_key(rk));
                }
                // What was accepted reloads to the same schema (what the store does at start).
                let again = schema::from_json(s.definition.clone()).unwrap();
                prop_assert_eq!(again.hash, s.hash);
            }
            Err(e) => prop_assert!(!e.0.is_empty()),
        }
    }

    /// Mutating one valid schema at a random key path is refused cleanly or accepted.
    #[test]
    fn schema_mutations(name in "[A-Za-z][A-Za-z0-9_]{0,10}", field in "[a-z]{1,8}", junk in arb_json()) {
        let mut s = json!({
            "name": name, "schema_type": "Single",
            "payment_config": {"base_multiplier": 1.0, "min_payment_threshold": 0},
            "fields": {field.clone(): valid_field()}
        });
        prop_assert!(schema::from_json(s.clone()).is_ok());
        s["fields"][field.as_str()]["permission_policy"] = junk;
        let _ = schema::from_json(s);
    }

    /// The linear glob matcher agrees with the reference on every pattern and text.
    #[test]
    fn glob_agrees_with_reference(p in "[ab*?]{0,8}", t in "[ab]{0,10}") {
        let pc: Vec<char> = p.chars().collect();
        let tc: Vec<char> = t.chars().collect();
        prop_assert_eq!(glob_match(&p, &t), naive_glob(&pc, &tc));
    }

    /// Ordered scans never stop before a matching key (`past_end` is sound) and `scan_start`
    /// never skips one.
    #[test]
    fn filters_scan_soundly(keys in prop::collection::btree_set("[a-d]{0,4}", 0..30),
                            which in 0..4u8, a in "[a-d]{0,3}", b in "[a-d]{0,3}") {
        let filter = match which {
            0 => KeyFilter::Key(a.clone()),
            1 => KeyFilter::Prefix(a.clone()),
            2 => KeyFilter::Range { start: a.clone().min(b.clone()), end: a.clone().max(b.clone()) },
            _ => KeyFilter::Pattern(fold_node::model::filter::Glob::new(&format!("{a}*{b}"))),
        };
        let start = filter.scan_start();
        let mut scanned = Vec::new();
        for k in keys.iter().filter(|k| k.as_str() >= start.as_str()) {
            if filter.past_end(k) { break; }
            if filter.matches(k) { scanned.push(k.clone()); }
        }
        let all: Vec<String> = keys.iter().filter(|k| filter.matches(k)).cloned().collect();
        prop_assert_eq!(scanned, all);
    }
}
