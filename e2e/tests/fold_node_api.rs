//! The fold-node data service end to end: the real binary on a free loopback port, driven with
//! the generated tonic client.

use std::time::Duration;

use fold_proto::v1::{
    GetSchemaRequest, HistoryRequest, KeyList, KeyRange, ListSchemasRequest, MutationType,
    RangeFilter, SchemaState, SetSchemaStateRequest, range_filter::Filter,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::process::NodeProc;
use serde_json::{Value as Json, json};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn start(extra: &[&str]) -> (tempfile::TempDir, NodeProc) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProc::start(dir.path(), extra).expect("fold-node starts");
    (dir, node)
}

fn notes_schema() -> Json {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 0})),
            "title": field(json!("NoRequirement"), json!({"Distance": 0})),
            "body": field(json!({"Distance": 0}), json!({"Distance": 0})),
        }),
    )
}

fn filter(f: Filter) -> Option<RangeFilter> {
    Some(RangeFilter { filter: Some(f) })
}

#[tokio::test]
async fn schema_life_cycle() {
    let (_d, node) = start(&[]);
    let mut c = fold(&node.grpc);
    let s = notes_schema();

    let r = c
        .load_schema(load_req(&s, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.name, "Notes");
    assert!(r.created);
    assert_eq!(r.state, SchemaState::Available as i32);
    assert_eq!(r.hash.len(), 64);

    // Identical content again: idempotent.
    let again = c
        .load_schema(load_req(&s, false))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.hash, r.hash);

    // Same name, different content: ALREADY_EXISTS.
    let mut changed = s.clone();
    changed["fields"]["title"]["writable"] = json!(false);
    let e = c.load_schema(load_req(&changed, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Available schemas cannot be used.
    let e = c
        .query(query_req("Notes", &["title"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("approved"));

    // List by state, approve, block, unload.
    let list = |state: SchemaState| ListSchemasRequest {
        state: state as i32,
    };
    let avail = c
        .list_schemas(list(SchemaState::Available))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(avail.schemas.len(), 1);
    assert_eq!(avail.schemas[0].range_key, "id");
    assert_eq!(avail.schemas[0].fields, vec!["body", "id", "title"]);
    let set = |state: SchemaState| SetSchemaStateRequest {
        name: "Notes".into(),
        state: state as i32,
    };
    let r = c
        .set_schema_state(set(SchemaState::Approved))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.previous_state, SchemaState::Available as i32);
    assert!(
        c.list_schemas(list(SchemaState::Available))
            .await
            .unwrap()
            .into_inner()
            .schemas
            .is_empty()
    );
    assert_eq!(
        c.list_schemas(list(SchemaState::Approved))
            .await
            .unwrap()
            .into_inner()
            .schemas
            .len(),
        1
    );
    c.query(query_req("Notes", &["title"], None)).await.unwrap();

    c.set_schema_state(set(SchemaState::Blocked)).await.unwrap();
    let e = c
        .query(query_req("Notes", &["title"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("blocked"), "{e:?}");
    c.set_schema_state(set(SchemaState::Available))
        .await
        .unwrap();
    assert_eq!(
        c.list_schemas(list(SchemaState::Unspecified))
            .await
            .unwrap()
            .into_inner()
            .schemas[0]
            .state,
        SchemaState::Available as i32
    );

    // Get returns the definition as JSON.
    let g = c
        .get_schema(GetSchemaRequest {
            name: "Notes".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let def = fold_proto::json::struct_to_json(&g.schema.unwrap());
    assert_eq!(def["schema_type"]["Range"]["range_key"], "id");
    assert_eq!(def["hash"], json!(g.summary.unwrap().hash));

    // Unknown schemas.
    let e = c
        .get_schema(GetSchemaRequest {
            name: "Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .set_schema_state(SetSchemaStateRequest {
            name: "Nope".into(),
            state: SchemaState::Approved as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c.query(query_req("Nope", &["x"], None)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn malformed_schemas_are_refused_with_the_reason() {
    let (_d, node) = start(&[]);
    let mut c = fold(&node.grpc);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not valid JSON"),
        ("[1,2]".into(), "object"),
        (
            {
                let mut s = notes_schema();
                s["fields"]["title"]
                    .as_object_mut()
                    .unwrap()
                    .remove("permission_policy");
                s.to_string()
            },
            "field 'title'",
        ),
        (
            {
                let mut s = notes_schema();
                s["schema_type"] = json!({"Range": {"range_key": "missing"}});
                s.to_string()
            },
            "range_key 'missing'",
        ),
        (
            {
                let mut s = notes_schema();
                s["fields"]["body"]["permission_policy"]["read_policy"] =
                    json!({"Distance": "far"});
                s.to_string()
            },
            "read_policy",
        ),
        (
            {
                let mut s = notes_schema();
                s["fields"]["body"]["field_type"] = json!("Collection");
                s.to_string()
            },
            "Collection",
        ),
    ];
    for (text, needle) in cases {
        let e = c
            .load_schema(fold_proto::v1::LoadSchemaRequest {
                schema_json: text.clone(),
                approve: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{text}: {e:?}");
        assert!(e.message().contains(needle), "{text}: {}", e.message());
    }
    // Nothing was loaded by any of them.
    let all = c
        .list_schemas(ListSchemasRequest { state: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(all.schemas.is_empty());
}

#[tokio::test]
async fn mutations_queries_filters_and_history() {
    let (_d, node) = start(&[]);
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&notes_schema(), true))
        .await
        .unwrap();
    use MutationType::*;

    for (id, title) in [
        ("a1", "first"),
        ("a2", "second"),
        ("b1", "third"),
        ("b22", "fourth"),
        ("c", "fifth"),
    ] {
        let r = c
            .mutate(mutate_req(
                "Notes",
                Create,
                json!({"id": id, "title": title, "body": format!("body of {id}")}),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.range_key, id);
        assert_eq!(r.fields.len(), 3);
        assert_eq!(r.version_ids.len(), 3);
    }
    // CREATE over an existing value.
    let e = c
        .mutate(mutate_req(
            "Notes",
            Create,
            json!({"id": "a1", "title": "again"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // UPDATE of a missing record.
    let e = c
        .mutate(mutate_req(
            "Notes",
            Update,
            json!({"id": "zz", "title": "x"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Range schemas need the key.
    let e = c
        .mutate(mutate_req("Notes", Create, json!({"title": "no key"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("range key"), "{e:?}");
    // Unknown field.
    let e = c
        .mutate(mutate_req(
            "Notes",
            Create,
            json!({"id": "q", "color": "red"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("color"));
    // Unspecified type.
    let e = c
        .mutate(mutate_req("Notes", Unspecified, json!({"id": "q"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    c.mutate(mutate_req(
        "Notes",
        Update,
        json!({"id": "a1", "title": "first, edited"}),
    ))
    .await
    .unwrap();

    // Every filter.
    let q = |f: Option<RangeFilter>| query_req("Notes", &["title"], f);
    let all = c.query(q(None)).await.unwrap().into_inner();
    assert_eq!(keys(&all), vec!["a1", "a2", "b1", "b22", "c"]);
    assert_eq!(records(&all)[0].1, json!({"title": "first, edited"}));
    let k = c
        .query(q(filter(Filter::Key("b1".into()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&k), vec!["b1"]);
    let k = c
        .query(q(filter(Filter::Key("nope".into()))))
        .await
        .unwrap()
        .into_inner();
    assert!(k.records.is_empty());
    let p = c
        .query(q(filter(Filter::KeyPrefix("b".into()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&p), vec!["b1", "b22"]);
    let r = c
        .query(q(filter(Filter::KeyRange(KeyRange {
            start: "a2".into(),
            end: "b22".into(),
        }))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&r), vec!["a2", "b1"], "start inclusive, end exclusive");
    let ks = c
        .query(q(filter(Filter::Keys(KeyList {
            keys: vec!["c".into(), "a2".into(), "missing".into()],
        }))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&ks), vec!["a2", "c"]);
    let pat = c
        .query(q(filter(Filter::KeyPattern("?1".into()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&pat), vec!["a1", "b1"]);
    let pat = c
        .query(q(filter(Filter::KeyPattern("b*".into()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&pat), vec!["b1", "b22"]);
    let pat = c
        .query(q(filter(Filter::KeyPattern("*2".into()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&pat), vec!["a2", "b22"]);
    let e = c
        .query(q(filter(Filter::KeyRange(KeyRange {
            start: "z".into(),
            end: "a".into(),
        }))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // DELETE of one field keeps the record; the value is gone, the history is not.
    c.mutate(mutate_req(
        "Notes",
        Delete,
        json!({"id": "a2", "body": null}),
    ))
    .await
    .unwrap();
    let r = c
        .query(query_req(
            "Notes",
            &["title", "body"],
            filter(Filter::Key("a2".into())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r)[0].1, json!({"title": "second", "body": null}));
    // DELETE with only the key removes the record.
    c.mutate(mutate_req("Notes", Delete, json!({"id": "c"})))
        .await
        .unwrap();
    let all = c.query(q(None)).await.unwrap().into_inner();
    assert_eq!(keys(&all), vec!["a1", "a2", "b1", "b22"]);
    let e = c
        .mutate(mutate_req("Notes", Delete, json!({"id": "c"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "nothing left to delete");

    // History: newest first, linked, with writer and time.
    let h = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "title".into(),
            range_key: "a1".into(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h.len(), 2);
    assert_eq!(
        fold_proto::json::value_to_json(h[0].value.as_ref().unwrap()),
        json!("first, edited")
    );
    assert_eq!(
        fold_proto::json::value_to_json(h[1].value.as_ref().unwrap()),
        json!("first")
    );
    assert_eq!(h[0].previous_version_id, h[1].version_id);
    assert!(h[1].previous_version_id.is_empty());
    assert_eq!(h[0].writer, "client:local");
    assert_eq!(h[0].mutation_type, Update as i32);
    assert!(h[0].written_at.as_ref().unwrap().seconds > 1_700_000_000);
    let h = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "title".into(),
            range_key: "c".into(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h.len(), 2);
    assert!(h[0].deleted);
    assert_eq!(h[0].mutation_type, Delete as i32);
    assert_eq!(
        fold_proto::json::value_to_json(h[1].value.as_ref().unwrap()),
        json!("fifth")
    );
    let e = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "title".into(),
            range_key: String::new(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn single_schema_and_writable() {
    let (_d, node) = start(&[]);
    let mut c = fold(&node.grpc);
    let mut locked = field(json!("NoRequirement"), json!("NoRequirement"));
    locked["writable"] = json!(false);
    let s = schema(
        "Profile",
        None,
        json!({"name": field(json!("NoRequirement"), json!({"Distance": 0})), "created": locked}),
    );
    c.load_schema(load_req(&s, true)).await.unwrap();
    use MutationType::*;
    let e = c
        .mutate(mutate_req("Profile", Update, json!({"name": "x"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "UPDATE before any value");
    c.mutate(mutate_req("Profile", Create, json!({"name": "Ada"})))
        .await
        .unwrap();
    c.mutate(mutate_req("Profile", Update, json!({"name": "Ada L."})))
        .await
        .unwrap();
    let e = c
        .mutate(mutate_req("Profile", Create, json!({"created": "today"})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("created"));
    let r = c
        .query(query_req("Profile", &["name", "created"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        records(&r),
        vec![(String::new(), json!({"name": "Ada L.", "created": null}))]
    );
    // Filters make no sense on a Single schema.
    let e = c
        .query(query_req(
            "Profile",
            &["name"],
            filter(Filter::Key("k".into())),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .query(query_req("Profile", &["nope"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"));
}

#[tokio::test]
async fn permissions_by_distance_and_explicit_policy() {
    // Clients of this node are at distance 2; the owner loads the schema on its socket.
    let (_d, node) = start(&["--client-trust-distance", "2"]);
    let mut c = fold(&node.grpc);
    let mut explicit = field(json!({"Distance": 0}), json!({"Distance": 0}));
    explicit["permission_policy"]["explicit_read_policy"] =
        json!({"counts_by_pub_key": {"trusted_service_key": 1}});
    let s = schema(
        "Mixed",
        None,
        json!({
            "public": field(json!("NoRequirement"), json!({"Distance": 2})),
            "near": field(json!({"Distance": 3}), json!({"Distance": 2})),
            "owner": field(json!({"Distance": 1}), json!({"Distance": 1})),
            "listed": explicit,
        }),
    );
    node.owner_fold()
        .load_schema(load_req(&s, true))
        .await
        .unwrap();
    use MutationType::*;
    c.mutate(mutate_req("Mixed", Create, json!({"public": 1, "near": 2})))
        .await
        .unwrap();
    let e = c
        .mutate(mutate_req("Mixed", Create, json!({"owner": 3})))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("'owner'"), "{e:?}");

    let r = c
        .query(query_req("Mixed", &["public", "near"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r)[0].1, json!({"public": 1, "near": 2}));
    let e = c
        .query(query_req("Mixed", &["public", "owner"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("'owner'"));
    // The explicit key list does not admit an anonymous client.
    let e = c
        .query(query_req("Mixed", &["listed"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("'listed'"));
    // History is a read too.
    let e = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Mixed".into(),
            field: "owner".into(),
            range_key: String::new(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_node_keeps_serving() {
    let (_d, node) = start(&["--max-message-bytes", "65536"]);
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&notes_schema(), true))
        .await
        .unwrap();
    let big = "x".repeat(200_000);
    let e = c
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "big", "body": big}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Nothing was written, and the node still answers.
    let r = c
        .query(query_req("Notes", &["body"], None))
        .await
        .unwrap()
        .into_inner();
    assert!(r.records.is_empty());
    c.mutate(mutate_req(
        "Notes",
        MutationType::Create,
        json!({"id": "small", "body": "ok"}),
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_graceful_shutdown() {
    let (_d, mut node) = start(&[]);
    let mut h = HealthClient::new(channel(&node.grpc));
    for (svc, want) in [
        ("", ServingStatus::Serving),
        ("fold.v1.FoldNode", ServingStatus::Serving),
        // No sidecar: the mesh half is not serving, the data half is.
        ("fold.v1.Network", ServingStatus::NotServing),
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, want as i32, "health of '{svc}'");
    }
    let e = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A remote target without a sidecar fails fast and honestly.
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&notes_schema(), true))
        .await
        .unwrap();
    let mut q = query_req("Notes", &["title"], None);
    q.target_node_id = "12D3KooWGzBjzYtuhmFRXbBqsCP5Xv6TUgaWbeoGTHYEdRW6HNm3".into();
    let started = std::time::Instant::now();
    let e = c.query(q).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    drop((c, h));
    node.proc.sigterm();
    let status = node
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("fold-node exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    c.load_schema(load_req(&notes_schema(), true))
        .await
        .unwrap();
    use MutationType::*;
    for i in 0..20 {
        c.mutate(mutate_req(
            "Notes",
            Create,
            json!({"id": format!("k{i:02}"), "title": format!("t{i}")}),
        ))
        .await
        .unwrap();
    }
    c.mutate(mutate_req(
        "Notes",
        Update,
        json!({"id": "k00", "title": "changed"}),
    ))
    .await
    .unwrap();
    c.mutate(mutate_req("Notes", Delete, json!({"id": "k01"})))
        .await
        .unwrap();
    node.proc.kill9();
    drop(node);

    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let mut c = fold(&node.grpc);
    let r = c
        .query(query_req("Notes", &["title"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.records.len(), 19);
    assert_eq!(
        records(&r)[0],
        ("k00".to_string(), json!({"title": "changed"}))
    );
    assert!(!keys(&r).contains(&"k01".to_string()));
    let h = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "title".into(),
            range_key: "k00".into(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].previous_version_id, h[1].version_id);
    let h = c
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "title".into(),
            range_key: "k01".into(),
            limit: 1,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h.len(), 1);
    assert!(h[0].deleted);
}
