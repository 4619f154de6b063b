//! A value written is the value read back: through `data_json` and `json_values`, integers of any
//! size and decimals as written round-trip exactly (the `Struct` fields hold doubles), locally,
//! in history, and forwarded through the mesh.

use fold_proto::v1::{HistoryRequest, MutationType};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::start;
use serde_json::{Value as Json, json};
use tonic::Code;

const VALUES: &str = r#"{
    "id": "v1",
    "big": 9007199254740993,
    "min": -9223372036854775808,
    "max": 18446744073709551615,
    "huge": 123456789012345678901234567890,
    "dec": 0.1000000000000000055511151231257827,
    "as_written": 1.50,
    "nested": {"list": [1, 2.25, "three", true, null, {"deep": 9007199254740995}]},
    "s": "text",
    "b": false,
    "n": null
}"#;

fn bag() -> Json {
    let f = || field(json!("NoRequirement"), json!("NoRequirement"));
    schema(
        "Bag",
        Some("id"),
        json!({"id": f(), "big": f(), "min": f(), "max": f(), "huge": f(), "dec": f(),
               "as_written": f(), "nested": f(), "s": f(), "b": f(), "n": f()}),
    )
}

const FIELDS: [&str; 10] = [
    "big",
    "min",
    "max",
    "huge",
    "dec",
    "as_written",
    "nested",
    "s",
    "b",
    "n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_exactly() {
    let a = start(&[]);
    let b = start(&[]);
    b.trust(&a.id, 0).await;
    a.dial(&b).await;
    for (node, target) in [(&a, String::new()), (&a, b.id.clone())] {
        let mut c = fold(&node.node.grpc);
        let _ = c.load_schema(load_req(&bag(), true)).await;
        let _ = b
            .node
            .owner_fold()
            .load_schema(load_req(&bag(), true))
            .await;
        let mut m = mutate_req("Bag", MutationType::Create, json!({}));
        m.data = None;
        m.data_json = VALUES.into();
        m.target_node_id = target.clone();
        c.mutate(m).await.unwrap();
        let mut q = query_req("Bag", &FIELDS, None);
        q.json_values = true;
        q.target_node_id = target.clone();
        let r = c.query(q).await.unwrap().into_inner();
        assert_eq!(r.records.len(), 1);
        assert!(
            r.records[0].fields.is_none(),
            "exact JSON instead of the Struct"
        );
        let text = &r.records[0].fields_json;
        for needle in [
            "9007199254740993",
            "-9223372036854775808",
            "18446744073709551615",
            "123456789012345678901234567890",
            "0.1000000000000000055511151231257827",
            "1.50",
            "9007199254740995",
        ] {
            assert!(
                text.contains(needle),
                "{needle} not exact in {text} ({target})"
            );
        }
        let back: Json = serde_json::from_str(text).unwrap();
        let mut want: Json = serde_json::from_str(VALUES).unwrap();
        want.as_object_mut().unwrap().remove("id");
        assert_eq!(back, want, "every value as written ({target})");
        // The Struct view is still there for clients that want it (numbers as doubles).
        let mut q = query_req("Bag", &["s", "b"], None);
        q.target_node_id = target.clone();
        let r = c.query(q).await.unwrap().into_inner();
        assert_eq!(records(&r)[0].1, json!({"s": "text", "b": false}));
    }
    // History, exact too.
    let h = fold(&a.node.grpc)
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            schema: "Bag".into(),
            field: "big".into(),
            range_key: "v1".into(),
            limit: 0,
            json_values: true,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h[0].value_json, "9007199254740993");
    assert!(h[0].value.is_none());
    // Bad input: both forms, not an object, not JSON, NaN in text.
    let mut c = fold(&a.node.grpc);
    let mut both = mutate_req("Bag", MutationType::Create, json!({"id": "x", "s": "y"}));
    both.data_json = r#"{"id": "x"}"#.into();
    assert_eq!(
        c.mutate(both).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for bad in ["[1, 2]", "{not json", r#"{"id": "z", "big": NaN}"#] {
        let mut m = mutate_req("Bag", MutationType::Create, json!({}));
        m.data = None;
        m.data_json = bad.into();
        let e = c.mutate(m).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
    }
}
