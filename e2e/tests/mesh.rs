//! The mesh across several hosts: each test builds its own network of Linux namespaces joined by
//! a bridge with no uplink (see `foldmesh_e2e::netns`), runs one fold-node + p2p-sidecar per
//! host, and drives the nodes from the host namespace over the bridge. mDNS only ever runs inside
//! these namespaces. Every wait is bounded.

use std::time::{Duration, Instant};

use fold_proto::v1::{
    CheckSchemasRequest, DialRequest, HistoryRequest, ListPeersRequest, MutationType,
    NetworkStatusRequest, SetTrustRequest, TrustEntry,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{Host, eventually, flags, start_host};
use foldmesh_e2e::netns::TestNet;
use serde_json::{Value as Json, json};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn net(hosts: usize) -> TestNet {
    TestNet::new(hosts)
        .expect("test network (needs root and iproute2; run scripts/test.sh as root)")
}

fn notes() -> Json {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
}

async fn approve(h: &Host, s: &Json) {
    fold(&h.grpc())
        .load_schema(load_req(s, true))
        .await
        .expect("load schema");
}

async fn trust(on: &Host, peer: &Host, distance: u32) {
    network(&on.grpc())
        .set_trust(SetTrustRequest {
            entry: Some(TrustEntry {
                node_id: peer.node_id.clone(),
                distance,
                denied: false,
            }),
            remove: false,
        })
        .await
        .expect("set trust");
}

async fn connected_peers(h: &Host) -> Vec<String> {
    match network(&h.grpc())
        .list_peers(ListPeersRequest {
            include_disconnected: false,
        })
        .await
    {
        Ok(r) => r
            .into_inner()
            .peers
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.node_id)
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn dial(from: &Host, to: &Host) {
    let r = network(&from.grpc())
        .dial(DialRequest {
            address: to.p2p_addr(),
        })
        .await
        .expect("dial")
        .into_inner();
    assert_eq!(r.node_id, to.node_id);
}

fn remote_query(target: &Host, fields: &[&str]) -> fold_proto::v1::QueryRequest {
    let mut q = query_req("Notes", fields, None);
    q.target_node_id = target.node_id.clone();
    q
}

fn with_deadline<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}

const MDNS: &[&str] = &["--mdns", "on"];
const NO_MDNS: &[&str] = &["--mdns", "off"];
const OPEN: &[&str] = &["--unknown-peer-distance", "0"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_find_each_other_by_mdns_alone() {
    let net = net(3);
    let hosts: Vec<Host> = (0..3)
        .map(|i| start_host(&net, i, &flags(MDNS), &[]).expect("host"))
        .collect();
    for h in &hosts {
        let others: Vec<String> = hosts
            .iter()
            .filter(|o| o.index != h.index)
            .map(|o| o.node_id.clone())
            .collect();
        eventually(
            "mDNS discovery and connection",
            Duration::from_secs(30),
            || async {
                let peers = connected_peers(h).await;
                others.iter().all(|o| peers.contains(o)).then_some(())
            },
        )
        .await
        .unwrap();
        let st = network(&h.grpc())
            .status(NetworkStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(st.mdns_enabled);
        assert_eq!(st.node_id, h.node_id);
        let peers = network(&h.grpc())
            .list_peers(ListPeersRequest {
                include_disconnected: false,
            })
            .await
            .unwrap()
            .into_inner()
            .peers;
        assert!(
            peers
                .iter()
                .all(|p| p.source == "mdns" || p.source == "inbound" || p.source == "dial")
        );
        assert!(
            peers.iter().all(|p| p.trust_distance == -1),
            "unknown peers are denied by default"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_mutation_forwarded_to_another_host() {
    let net = net(2);
    let a = start_host(&net, 0, &flags(NO_MDNS), &[]).unwrap();
    let b = start_host(&net, 1, &flags(NO_MDNS), &[]).unwrap();
    dial(&a, &b).await;
    approve(&b, &notes()).await;
    fold(&b.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "written on B"}),
        ))
        .await
        .unwrap();

    // B does not know A yet: denied, and the answer is B's real refusal.
    let e = fold(&a.grpc())
        .query(remote_query(&b, &["body"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(&b.node_id));

    trust(&b, &a, 1).await;
    let r = fold(&a.grpc())
        .query(remote_query(&b, &["body"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_id, b.node_id, "answered by B");
    assert_eq!(
        records(&r),
        vec![("n1".to_string(), json!({"body": "written on B"}))]
    );

    // A mutation forwarded from A changes B's data.
    let mut m = mutate_req(
        "Notes",
        MutationType::Create,
        json!({"id": "n2", "body": "sent from A"}),
    );
    m.target_node_id = b.node_id.clone();
    let w = fold(&a.grpc()).mutate(m).await.unwrap().into_inner();
    assert_eq!(w.node_id, b.node_id);
    let direct = fold(&b.grpc())
        .query(query_req("Notes", &["body"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        records(&direct),
        vec![
            ("n1".to_string(), json!({"body": "written on B"})),
            ("n2".to_string(), json!({"body": "sent from A"})),
        ]
    );
    // And B's history names A as the writer.
    let h = fold(&b.grpc())
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "body".into(),
            range_key: "n2".into(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    // The writer is the whole chain: node A, and A's client.
    assert_eq!(h[0].writer, format!("peer:{}/client:local", a.node_id));
    // Nothing of it landed on A.
    let e = fold(&a.grpc())
        .query(query_req("Notes", &["body"], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Honest failures: an unknown node, a malformed id.
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = "12D3KooWGzBvyAUkCvDhrwC8hC3q9RkJvBn9o2vH8SgxAiL2e7Fs".into();
    let e = fold(&a.grpc())
        .query(with_deadline(q, Duration::from_secs(15)))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::NotFound | Code::Unavailable),
        "{e:?}"
    );
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = "not-a-node".into();
    let e = fold(&a.grpc()).query(q).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_check_reports_only_approved_schemas() {
    let net = net(2);
    let a = start_host(&net, 0, &flags(NO_MDNS), &[]).unwrap();
    let b = start_host(&net, 1, &flags(NO_MDNS), &[]).unwrap();
    dial(&a, &b).await;
    approve(&b, &notes()).await;
    // A peer B denies (unknown peers are denied by default) learns nothing.
    let e = network(&a.grpc())
        .check_schemas(CheckSchemasRequest {
            node_id: b.node_id.clone(),
            names: vec!["Notes".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    trust(&b, &a, 3).await;
    let mut draft = notes();
    draft["name"] = json!("Draft");
    fold(&b.grpc())
        .load_schema(load_req(&draft, false))
        .await
        .unwrap();
    let r = network(&a.grpc())
        .check_schemas(CheckSchemasRequest {
            node_id: b.node_id.clone(),
            names: vec!["Notes".into(), "Draft".into(), "Missing".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_id, b.node_id);
    assert_eq!(r.approved, vec!["Notes".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_finds_a_provider_two_hops_away_and_forwards_to_it() {
    let net = net(3);
    // Chain: A → B → C by bootstrap only, no mDNS. A never hears of C directly.
    let c = start_host(&net, 2, &flags(NO_MDNS), &flags(OPEN)).unwrap();
    let mut b_flags = flags(NO_MDNS);
    b_flags.extend(["--bootstrap".to_string(), c.p2p_addr()]);
    let b = start_host(&net, 1, &b_flags, &flags(OPEN)).unwrap();
    let mut a_flags = flags(NO_MDNS);
    a_flags.extend(["--bootstrap".to_string(), b.p2p_addr()]);
    let a = start_host(&net, 0, &a_flags, &[]).unwrap();

    approve(&c, &notes()).await;
    fold(&c.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "c1", "body": "lives on C"}),
        ))
        .await
        .unwrap();
    let providers = eventually(
        "A to find C as a provider of Notes",
        Duration::from_secs(30),
        || async {
            let found = providers_of(&a.grpc(), "Notes").await?;
            found.contains(&c.node_id).then_some(found)
        },
    )
    .await
    .unwrap();
    assert!(!providers.contains(&a.node_id));
    assert!(!connected_peers(&a).await.contains(&c.node_id) || providers.contains(&c.node_id));
    let r = fold(&a.grpc())
        .query(with_deadline(
            remote_query(&c, &["body"]),
            Duration::from_secs(20),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_id, c.node_id);
    assert_eq!(
        records(&r),
        vec![("c1".to_string(), json!({"body": "lives on C"}))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_distance_is_the_receivers_decision() {
    let net = net(3);
    let a = start_host(&net, 0, &flags(NO_MDNS), &[]).unwrap();
    let b = start_host(&net, 1, &flags(NO_MDNS), &[]).unwrap();
    let c = start_host(&net, 2, &flags(NO_MDNS), &[]).unwrap();
    dial(&a, &b).await;
    dial(&c, &b).await;
    approve(&b, &notes()).await;
    fold(&b.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "s", "body": "for distance 1"}),
        ))
        .await
        .unwrap();
    trust(&b, &a, 1).await;
    trust(&b, &c, 2).await;
    let ok = fold(&a.grpc())
        .query(remote_query(&b, &["body"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&ok)[0].1, json!({"body": "for distance 1"}));
    let e = fold(&c.grpc())
        .query(remote_query(&b, &["body"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("'body'"), "{e:?}");
    // The NoRequirement field is open to C.
    let r = fold(&c.grpc())
        .query(remote_query(&b, &["id"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&r), vec!["s"]);
    // B's ListPeers reports the distances it assigns.
    let peers = network(&b.grpc())
        .list_peers(ListPeersRequest {
            include_disconnected: false,
        })
        .await
        .unwrap()
        .into_inner()
        .peers;
    let d = |id: &str| {
        peers
            .iter()
            .find(|p| p.node_id == id)
            .map(|p| p.trust_distance)
    };
    assert_eq!(d(&a.node_id), Some(1));
    assert_eq!(d(&c.node_id), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_fails_within_the_deadline_and_heals() {
    let net = net(2);
    let a = start_host(&net, 0, &flags(MDNS), &[]).unwrap();
    let b = start_host(&net, 1, &flags(MDNS), &flags(OPEN)).unwrap();
    approve(&b, &notes()).await;
    eventually("A connected to B", Duration::from_secs(30), || async {
        connected_peers(&a).await.contains(&b.node_id).then_some(())
    })
    .await
    .unwrap();
    fold(&a.grpc())
        .query(remote_query(&b, &["id"]))
        .await
        .unwrap();

    net.link_down(1).unwrap();
    let started = Instant::now();
    let e = fold(&a.grpc())
        .query(with_deadline(
            remote_query(&b, &["id"]),
            Duration::from_secs(3),
        ))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(took < Duration::from_secs(5), "failed after {took:?}");

    // More failures open A's circuit breaker for B: then A fails fast, with no network wait.
    for _ in 0..5 {
        let _ = fold(&a.grpc())
            .query(with_deadline(
                remote_query(&b, &["id"]),
                Duration::from_millis(400),
            ))
            .await;
    }
    let started = Instant::now();
    let e = fold(&a.grpc())
        .query(with_deadline(
            remote_query(&b, &["id"]),
            Duration::from_secs(3),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("circuit open"), "{e:?}");
    assert!(started.elapsed() < Duration::from_millis(300));

    net.link_up(1).unwrap();
    eventually(
        "forwarding to work again after the link is back",
        Duration::from_secs(40),
        || async {
            fold(&a.grpc())
                .query(with_deadline(
                    remote_query(&b, &["id"]),
                    Duration::from_secs(3),
                ))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sidecar_keeps_local_service_and_recovers() {
    let net = net(2);
    let a = start_host(&net, 0, &flags(MDNS), &flags(OPEN)).unwrap();
    let mut b = start_host(&net, 1, &flags(MDNS), &[]).unwrap();
    approve(&a, &notes()).await;
    approve(&b, &notes()).await;
    eventually("B connected to A", Duration::from_secs(30), || async {
        connected_peers(&b).await.contains(&a.node_id).then_some(())
    })
    .await
    .unwrap();
    fold(&b.grpc())
        .query(remote_query(&a, &["id"]))
        .await
        .unwrap();

    b.sidecar.as_mut().unwrap().kill9();
    let health = |h: &Host| {
        let addr = h.grpc();
        async move {
            HealthClient::new(channel(&addr))
                .check(HealthCheckRequest {
                    service: "fold.v1.Network".into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .ok()
        }
    };
    eventually(
        "Network health NOT_SERVING",
        Duration::from_secs(5),
        || async { (health(&b).await == Some(ServingStatus::NotServing as i32)).then_some(()) },
    )
    .await
    .unwrap();
    // Local requests keep working.
    fold(&b.grpc())
        .query(query_req("Notes", &["id"], None))
        .await
        .unwrap();
    // Remote ones fail fast and honestly.
    let started = Instant::now();
    let e = fold(&b.grpc())
        .query(remote_query(&a, &["id"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The node's overall health stays SERVING.
    let overall = HealthClient::new(channel(&b.grpc()))
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);

    let old_id = b.node_id.clone();
    b.start_sidecar(&net, &flags(MDNS)).unwrap();
    assert_eq!(b.node_id, old_id);
    eventually(
        "Network health SERVING again",
        Duration::from_secs(10),
        || async { (health(&b).await == Some(ServingStatus::Serving as i32)).then_some(()) },
    )
    .await
    .unwrap();
    eventually(
        "forwarding from B to work again",
        Duration::from_secs(30),
        || async {
            fold(&b.grpc())
                .query(with_deadline(
                    remote_query(&a, &["id"]),
                    Duration::from_secs(3),
                ))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_survives_restarts() {
    let net = net(1);
    let mut h = start_host(&net, 0, &flags(NO_MDNS), &[]).unwrap();
    let first = h.node_id.clone();
    h.sidecar.as_ref().unwrap().sigterm();
    assert!(
        h.sidecar
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(10))
            .is_some()
    );
    h.start_sidecar(&net, &flags(NO_MDNS)).unwrap();
    assert_eq!(h.node_id, first);
    let key = h.data_dir.join("identity.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let st = eventually(
        "the node to learn its id",
        Duration::from_secs(10),
        || async {
            let st = network(&h.grpc())
                .status(NetworkStatusRequest {})
                .await
                .ok()?
                .into_inner();
            Some(st)
        },
    )
    .await
    .unwrap();
    assert_eq!(st.node_id, first);
}
