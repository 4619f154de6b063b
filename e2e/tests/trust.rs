//! Trust that holds end to end, with the real binaries on loopback: management is an owner's
//! right; a forwarded request is checked with the path distance (the receiver's trust in the
//! origin node plus the requester's distance there), with anonymous and mTLS clients; deadlines
//! travel on the wire; a cancelled breaker probe does not wedge the breaker; non-finite numbers
//! are refused; data files are private; denied peers learn nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fold_proto::sidecar::InboundForward;
use fold_proto::sidecar::peer_requests_client::PeerRequestsClient;
use fold_proto::v1::{
    CheckSchemasRequest, DialRequest, DisconnectRequest, GetTrustRequest, HistoryRequest,
    MutationType, SchemaState, SetSchemaStateRequest, SetTrustRequest, TrustEntry,
};
use fold_proto::wire::{ForwardEnvelope, Operation, Requester, forward_response, operation};
use foldmesh_e2e::client::*;
use foldmesh_e2e::http;
use foldmesh_e2e::loopback::{Node, start};
use foldmesh_e2e::mesh::eventually;
use foldmesh_e2e::process::NodeProc;
use prost::Message;
use serde_json::{Value as Json, json};
use tonic::Code;

/// B's schema: one field readable at distance 2, one at distance 5, both writable at 5.
fn ledger() -> Json {
    schema(
        "Ledger",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 5})),
            "secret": field(json!({"Distance": 2}), json!({"Distance": 5})),
            "open": field(json!({"Distance": 5}), json!({"Distance": 5})),
        }),
    )
}

fn remote(mut q: fold_proto::v1::QueryRequest, target: &str) -> fold_proto::v1::QueryRequest {
    q.target_node_id = target.into();
    q
}

/// Who wrote the newest version of B's `Ledger.open` at `key`, as B's history records it.
async fn newest_writer(b: &Node, key: &str) -> String {
    let h = b
        .node
        .owner_fold()
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Ledger".into(),
            field: "open".into(),
            range_key: key.into(),
            limit: 1,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    h[0].writer.clone()
}

async fn seed_b(b: &Node) {
    let mut owner = b.node.owner_fold();
    owner.load_schema(load_req(&ledger(), true)).await.unwrap();
    owner
        .mutate(mutate_req(
            "Ledger",
            MutationType::Create,
            json!({"id": "k1", "secret": "s3cr3t", "open": "hello"}),
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_needs_the_admin_right() {
    // Clients of the public port are at distance 3; the owner socket is the owner.
    let n = start(&["--client-trust-distance", "3"]);
    let mut c = fold(&n.node.grpc);
    let mut net = network(&n.node.grpc);
    let expect_denied = |r: Result<_, tonic::Status>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what} was allowed"));
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("admin right"), "{what}: {e:?}");
        assert!(e.message().contains("distance 3"), "{what}: {e:?}");
    };
    expect_denied(
        c.load_schema(load_req(&ledger(), true)).await.map(|_| ()),
        "LoadSchema",
    );
    // The owner loads it; the distant client still cannot change its state.
    let mut owner = n.node.owner_fold();
    owner.load_schema(load_req(&ledger(), false)).await.unwrap();
    let approve = || SetSchemaStateRequest {
        name: "Ledger".into(),
        state: SchemaState::Approved as i32,
    };
    expect_denied(
        c.set_schema_state(approve()).await.map(|_| ()),
        "SetSchemaState",
    );
    owner.set_schema_state(approve()).await.unwrap();
    let me = TrustEntry {
        node_id: "client:local".into(),
        distance: 0,
        denied: false,
    };
    expect_denied(
        net.set_trust(SetTrustRequest {
            entry: Some(me.clone()),
            remove: false,
        })
        .await
        .map(|_| ()),
        "SetTrust",
    );
    expect_denied(
        net.get_trust(GetTrustRequest {
            node_id: String::new(),
        })
        .await
        .map(|_| ()),
        "GetTrust",
    );
    expect_denied(
        net.dial(DialRequest {
            address: "/dns4/localhost/tcp/1".into(),
        })
        .await
        .map(|_| ()),
        "Dial",
    );
    expect_denied(
        net.disconnect(DisconnectRequest {
            node_id: n.id.clone(),
        })
        .await
        .map(|_| ()),
        "Disconnect",
    );
    // Read-only views stay open to data clients.
    net.status(fold_proto::v1::NetworkStatusRequest {})
        .await
        .unwrap();
    c.list_schemas(fold_proto::v1::ListSchemasRequest { state: 0 })
        .await
        .unwrap();
    // The owner may do all of it.
    let mut onet = n.node.owner_network();
    onet.get_trust(GetTrustRequest {
        node_id: String::new(),
    })
    .await
    .unwrap();
    onet.disconnect(DisconnectRequest {
        node_id: n.id.clone(),
    })
    .await
    .unwrap();

    // A node started with no flags keeps its owner on loopback (the quick start), and
    // --admin-distance none takes the right from every public-port client.
    let plain = start(&[]);
    fold(&plain.node.grpc)
        .load_schema(load_req(&ledger(), true))
        .await
        .unwrap();
    let strict = start(&["--admin-distance", "none"]);
    let e = fold(&strict.node.grpc)
        .load_schema(load_req(&ledger(), true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    strict
        .node
        .owner_fold()
        .load_schema(load_req(&ledger(), true))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_checked_with_the_path_distance() {
    // A places its clients at 3; B trusts A at 1: the path distance of A's clients at B is 4.
    let a = start(&["--client-trust-distance", "3"]);
    let b = start(&[]);
    b.trust(&a.id, 1).await;
    a.trust(&b.id, 1).await;
    seed_b(&b).await;
    a.dial(&b).await;
    let mut client = fold(&a.node.grpc);

    // The confused deputy: A may read B's Distance(2) field, A's client may not.
    let e = client
        .query(remote(query_req("Ledger", &["secret"], None), &b.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("'secret'"), "{e:?}");
    assert!(e.message().contains(&format!("node {}", b.id)), "{e:?}");
    // A Distance(5) field stays readable through A.
    let r = client
        .query(remote(query_req("Ledger", &["open"], None), &b.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        records(&r),
        vec![("k1".to_string(), json!({"open": "hello"}))]
    );
    assert_eq!(r.node_id, b.id);
    // A's owner (distance 0 at A) is at 1 on B: the secret is readable.
    let r = a
        .node
        .owner_fold()
        .query(remote(query_req("Ledger", &["secret"], None), &b.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r)[0].1, json!({"secret": "s3cr3t"}));

    // Writes through A: allowed at 4 ≤ 5, and history names the whole chain.
    let mut m = mutate_req(
        "Ledger",
        MutationType::Update,
        json!({"id": "k1", "open": "via A"}),
    );
    m.target_node_id = b.id.clone();
    client.mutate(m).await.unwrap();
    assert_eq!(
        newest_writer(&b, "k1").await,
        format!("peer:{}/client:local", a.id)
    );

    // A requester that A denies is refused at A, before anything is sent.
    let deny_all = start(&["--client-trust-distance", "deny"]);
    let e = fold(&deny_all.node.grpc)
        .query(remote(query_req("Ledger", &["open"], None), &b.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_distance_applies_to_mtls_identities() {
    let (ca, (cert, key), clients) = foldmesh_e2e::tls::material(&["ops", "partner"]);
    let files = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca_p, cert_p, key_p) = (
        w("ca.pem", &ca),
        w("server.pem", &cert),
        w("server.key", &key),
    );
    // On A, "ops" is at 0 (and may manage A), "partner" at 3.
    let a = start(&[
        "--tls-cert",
        &cert_p,
        "--tls-key",
        &key_p,
        "--tls-client-ca",
        &ca_p,
        "--trust",
        "ops=0",
        "--trust",
        "partner=3",
    ]);
    let b = start(&[]);
    b.trust(&a.id, 1).await;
    a.trust(&b.id, 1).await;
    seed_b(&b).await;
    a.dial(&b).await;
    let mut ops =
        foldmesh_e2e::tls::fold_client(&a.node.grpc, &ca, Some((&clients[0].1, &clients[0].2)))
            .await;
    let mut partner =
        foldmesh_e2e::tls::fold_client(&a.node.grpc, &ca, Some((&clients[1].1, &clients[1].2)))
            .await;
    // ops: 1 + 0 = 1 ≤ 2; partner: 1 + 3 = 4 > 2.
    let r = ops
        .query(remote(query_req("Ledger", &["secret"], None), &b.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r)[0].1, json!({"secret": "s3cr3t"}));
    let e = partner
        .query(remote(query_req("Ledger", &["secret"], None), &b.id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    partner
        .query(remote(query_req("Ledger", &["open"], None), &b.id))
        .await
        .unwrap();
    // The admin identity (distance 0 at A) manages A; the partner does not.
    ops.load_schema(load_req(&ledger(), true)).await.unwrap();
    let e = partner
        .load_schema(load_req(&ledger(), true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // History on B names A and the certificate client.
    let mut m = mutate_req(
        "Ledger",
        MutationType::Update,
        json!({"id": "k1", "open": "by partner"}),
    );
    m.target_node_id = b.id.clone();
    partner.mutate(m).await.unwrap();
    assert_eq!(
        newest_writer(&b, "k1").await,
        format!("peer:{}/client:partner", a.id)
    );
}

fn sample(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, m) = http::get(admin, "/metrics").unwrap();
    http::sample(&m, name, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_recovers_after_a_hung_peer_and_cancelled_probes() {
    let a = start(&[
        "--breaker-failures",
        "2",
        "--breaker-backoff-ms",
        "300",
        "--forward-timeout-ms",
        "3000",
    ]);
    let b = start(&[]);
    b.trust(&a.id, 0).await;
    seed_b(&b).await;
    a.dial(&b).await;
    let q = || remote(query_req("Ledger", &["open"], None), &b.id);
    fold(&a.node.grpc).query(q()).await.unwrap();

    // 1. Hang B's sidecar: forwards time out and open A's breaker toward B.
    b.sidecar.pause();
    for _ in 0..2 {
        let mut r = tonic::Request::new(q());
        r.set_timeout(Duration::from_millis(400));
        let e = fold(&a.node.grpc).query(r).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable),
            "{e:?}"
        );
    }
    let e = fold(&a.node.grpc).query(q()).await.unwrap_err();
    assert!(e.message().contains("circuit open"), "{e:?}");
    // 2. After the backoff, probes are let through; their clients (no deadline) give up while
    //    the probe is in flight, so the handler is dropped before it can report.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut client = fold(&a.node.grpc);
        let call = tokio::time::timeout(Duration::from_millis(250), client.query(q()));
        assert!(call.await.is_err(), "the probe should still be in flight");
    }
    // 3. B resumes.
    b.sidecar.resume();
    // 4. Forwarding recovers: a later probe succeeds and the breaker closes.
    eventually(
        "forwarding to recover after the peer resumed",
        Duration::from_secs(15),
        || async {
            let mut r = tonic::Request::new(q());
            r.set_timeout(Duration::from_secs(2));
            fold(&a.node.grpc).query(r).await.ok()
        },
    )
    .await
    .unwrap();
    for _ in 0..5 {
        fold(&a.node.grpc).query(q()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_does_no_work() {
    let a = start(&[]);
    let b = start(&[]);
    b.trust(&a.id, 0).await;
    seed_b(&b).await;
    a.dial(&b).await;
    let write = |key: &str| {
        let mut m = mutate_req(
            "Ledger",
            MutationType::Create,
            json!({"id": key, "open": "late"}),
        );
        m.target_node_id = b.id.clone();
        m
    };
    fold(&a.node.grpc).mutate(write("warm")).await.unwrap();

    // B's sidecar is hung while the request is on its way; it reads it after the deadline.
    b.sidecar.pause();
    let mut r = tonic::Request::new(write("late-1"));
    r.set_timeout(Duration::from_millis(500));
    let e = fold(&a.node.grpc).mutate(r).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    b.sidecar.resume();
    eventually(
        "B's sidecar to refuse the late request",
        Duration::from_secs(10),
        || async {
            (sample(
                &b.sidecar_admin,
                "fold_sidecar_inbound_requests_total",
                &[("protocol", "forward"), ("outcome", "deadline_exceeded")],
            ) >= 1.0)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let rows = b
        .node
        .owner_fold()
        .query(query_req("Ledger", &["open"], None))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !keys(&rows).contains(&"late-1".to_string()),
        "the late mutation was applied: {:?}",
        keys(&rows)
    );

    // The node checks the deadline too: an envelope handed to it after its deadline is refused
    // and writes nothing (B's node, called on its PeerRequests socket as its sidecar would).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let envelope = ForwardEnvelope {
        request_id: "late-2".into(),
        origin_node_id: a.id.clone(),
        target_node_id: b.id.clone(),
        timestamp_unix_ms: now - 2000,
        deadline_unix_ms: now - 1000,
        requester: Some(Requester {
            distance: 0,
            identity: "client:local".into(),
            proven_key: String::new(),
        }),
        operation: Some(Operation {
            kind: Some(operation::Kind::Mutate(write("late-2"))),
        }),
    };
    let sock: local_link::LinkAddr =
        format!("unix:{}", b.node.data_dir.join("node.sock").display())
            .parse()
            .unwrap();
    let mut peer_requests =
        PeerRequestsClient::new(local_link::channel(&sock, Duration::from_secs(3)));
    let resp = peer_requests
        .handle_forward(InboundForward {
            origin_node_id: a.id.clone(),
            envelope: envelope.encode_to_vec(),
            origin_public_key: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    match resp.result {
        Some(forward_response::Result::Error(e)) => {
            assert_eq!(e.code, Code::DeadlineExceeded as i32, "{e:?}")
        }
        other => panic!("a late envelope was executed: {other:?}"),
    }
    let rows = b
        .node
        .owner_fold()
        .query(query_req("Ledger", &["open"], None))
        .await
        .unwrap()
        .into_inner();
    assert!(!keys(&rows).contains(&"late-2".to_string()));
    // The same envelope with time left is executed (so the refusal above is the deadline's).
    let mut fresh = envelope.clone();
    fresh.request_id = "late-3".into();
    fresh.deadline_unix_ms = now + 10_000;
    let resp = peer_requests
        .handle_forward(InboundForward {
            origin_node_id: a.id.clone(),
            envelope: fresh.encode_to_vec(),
            origin_public_key: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(resp.result, Some(forward_response::Result::Mutate(_))),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_numbers_are_refused_and_nothing_is_written() {
    let n = start(&[]);
    let mut c = fold(&n.node.grpc);
    c.load_schema(load_req(&ledger(), true)).await.unwrap();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut m = mutate_req("Ledger", MutationType::Create, json!({"id": "n1"}));
        let mut data = m.data.take().unwrap();
        data.fields.insert(
            "open".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(bad)),
            },
        );
        m.data = Some(data);
        let e = c.mutate(m).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains("'open'"), "{e:?}");
    }
    let rows = c
        .query(query_req("Ledger", &["open"], None))
        .await
        .unwrap()
        .into_inner();
    assert!(rows.records.is_empty(), "{:?}", keys(&rows));
    // The same field with a finite number is fine.
    let m = mutate_req(
        "Ledger",
        MutationType::Create,
        json!({"id": "n1", "open": 1.5}),
    );
    c.mutate(m).await.unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_are_private() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("fresh");
    let n = NodeProc::start(&data, &[]).unwrap();
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&data.join("fold.redb")), 0o600, "database");
    drop(n);
    // An existing, too-open directory and database are tightened at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("fold.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let _n = NodeProc::start(&data, &[]).unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("fold.redb")), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_cannot_probe_approved_schemas() {
    let a = start(&[]);
    let b = start(&[]);
    seed_b(&b).await;
    a.dial(&b).await;
    let check = || CheckSchemasRequest {
        node_id: b.id.clone(),
        names: vec!["Ledger".into()],
    };
    // B does not know A: unknown peers are denied by default.
    let e = network(&a.node.grpc)
        .check_schemas(check())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    b.trust(&a.id, 2).await;
    let r = network(&a.node.grpc)
        .check_schemas(check())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.approved, vec!["Ledger".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_forwarded_atomically_with_the_path_distance() {
    use fold_proto::v1::{BatchMutateRequest, BatchMutation};
    let a = start(&["--client-trust-distance", "3"]);
    let b = start(&[]);
    b.trust(&a.id, 1).await;
    seed_b(&b).await;
    a.dial(&b).await;
    let m = |data: Json| BatchMutation {
        data_json: String::new(),
        mutation_type: MutationType::Create as i32,
        data: Some(fold_proto::json::map_to_struct(data.as_object().unwrap())),
    };
    let batch = |mutations: Vec<BatchMutation>| BatchMutateRequest {
        idempotency_key: String::new(),
        schema: "Ledger".into(),
        mutations,
        target_node_id: b.id.clone(),
    };
    let mut client = fold(&a.node.grpc);
    // Path distance 4: the Distance(5) fields are writable.
    let r = client
        .batch_mutate(batch(vec![
            m(json!({"id": "b1", "open": "one"})),
            m(json!({"id": "b2", "open": "two"})),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_id, b.id);
    assert_eq!(r.results.len(), 2);
    // One bad record refuses the whole batch on B, and the message names it.
    let e = client
        .batch_mutate(batch(vec![
            m(json!({"id": "b3", "open": "three"})),
            m(json!({"id": "b4", "nope": 1})),
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("record 1"), "{e:?}");
    let rows = b
        .node
        .owner_fold()
        .query(query_req("Ledger", &["open"], None))
        .await
        .unwrap()
        .into_inner();
    let ks = keys(&rows);
    assert!(ks.contains(&"b1".to_string()) && ks.contains(&"b2".to_string()));
    assert!(
        !ks.contains(&"b3".to_string()),
        "a refused batch wrote nothing"
    );
    assert_eq!(
        newest_writer(&b, "b1").await,
        format!("peer:{}/client:local", a.id)
    );
}
