//! Across NATs, in a lab of network namespaces (`foldmesh_e2e::natlab`): two private networks
//! each behind a masquerading NAT (nftables), a public segment with a relay (--relay-server) and
//! one more public node. Node A sits behind NAT 1, node B behind NAT 2; both know only the relay
//! (--bootstrap). Nothing else is configured: AutoNAT finds A and B not reachable, they reserve
//! slots on the relay (learned from the bootstrap set through identify), A finds B through the
//! DHT and reaches it through the relay; DCUtR then punches a hole where the NATs allow it.
//! Every wait is bounded (fail-fast bounds, not timing thresholds).

use std::time::Duration;

use fold_proto::v1::{
    CheckSchemasRequest, DialRequest, MutationType, NetworkStatusResponse, Reachability,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{Host, eventually};
use foldmesh_e2e::natlab::{Lab, NatKind, NatLab, peer, status};
use serde_json::{Value as Json, json};

const SETUP: &str = "NAT lab (needs root, iproute2 and nftables; run scripts/test.sh as root)";

/// The labs' timing-sensitive steps (AutoNAT verdicts, reservations, hole punching) ran
/// reliably one lab at a time on 2 cores; the tests of this file take turns.
static ONE_LAB_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Wait until `h`'s AutoNAT verdict is `want`.
async fn reachability(h: &Host, want: Reachability, what: &str) -> NetworkStatusResponse {
    eventually(what, Duration::from_secs(60), || async {
        status(h).await.filter(|s| s.reachability == want as i32)
    })
    .await
    .unwrap()
}

/// Wait until `h` holds a reservation on the relay it bootstrapped with.
async fn reserved(h: &Host, relay: &Host) -> anyhow::Result<String> {
    foldmesh_e2e::natlab::reserved(h, relay, "bootstrap").await
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

/// B holds Notes with one record.
async fn b_has_notes(b: &Host) {
    fold(&b.grpc())
        .load_schema(load_req(&notes(), true))
        .await
        .expect("load schema");
    fold(&b.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "behind NAT 2"}),
        ))
        .await
        .unwrap();
}

async fn a_queries_b(a: &Host, b: &Host) {
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = b.node_id.clone();
    let mut req = tonic::Request::new(q);
    req.set_timeout(Duration::from_secs(30));
    let r = fold(&a.grpc())
        .query(req)
        .await
        .expect("query forwarded from A to B")
        .into_inner();
    assert_eq!(r.node_id, b.node_id, "answered by B");
    assert_eq!(
        records(&r),
        vec![("n1".to_string(), json!({"body": "behind NAT 2"}))]
    );
}

/// Tests 1, 3 and 4 on a NAT that maps every flow to a random port (hole punching impossible):
/// AutoNAT finds A and B not reachable and the relay and the public node reachable; A finds B
/// through the DHT, forwards a query and a schema check to it through the relay, and the peer
/// lists say relayed, over TCP or QUIC, also after the hole-punching attempts are over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_forwarding_through_nats_without_hole_punching() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let Lab {
        lab: _lab,
        relay,
        public,
        a,
        b,
    } = Lab::start(NatKind::PerDestination).await.expect(SETUP);

    // (4) AutoNAT: the NATed nodes are not reachable, the public ones are.
    for h in [&a, &b] {
        let st = reachability(h, Reachability::NotReachable, "NATed node: not reachable").await;
        assert!(st.reachable_addrs.is_empty(), "{st:?}");
    }
    for h in [&relay, &public] {
        let st = reachability(h, Reachability::Reachable, "public node: reachable").await;
        let ip = NatLab::lab_addr(h.index).to_string();
        assert!(st.reachable_addrs.iter().any(|x| x.contains(&ip)), "{st:?}");
    }
    let st = status(&relay).await.unwrap();
    let rs = st.relay_server.unwrap();
    assert!(rs.enabled);
    assert!(
        st.relays.is_empty(),
        "a reachable node reserves nothing: {st:?}"
    );

    // Not reachable, so each reserves a slot on the relay it bootstrapped with.
    reserved(&a, &relay).await.unwrap();
    reserved(&b, &relay).await.unwrap();
    let rs = status(&relay).await.unwrap().relay_server.unwrap();
    assert!(rs.reservations >= 2, "{rs:?}");

    // (1) A forwards a query to B by node id: found through the DHT, reached through the relay.
    b_has_notes(&b).await;
    a_queries_b(&a, &b).await;
    let p = peer(&a, &b.node_id).await.expect("A is connected to B");
    assert_eq!(p.connection, "relayed", "{p:?}");
    assert!(p.transport == "tcp" || p.transport == "quic", "{p:?}");
    let p = peer(&b, &a.node_id).await.expect("B is connected to A");
    assert_eq!(p.connection, "relayed", "{p:?}");

    // Schema checks run over the relayed connection too.
    let r = network(&a.grpc())
        .check_schemas(CheckSchemasRequest {
            node_id: b.node_id.clone(),
            names: vec!["Notes".into(), "Missing".into()],
        })
        .await
        .expect("schema check through the relay")
        .into_inner();
    assert_eq!(r.approved, vec!["Notes".to_string()]);

    // (3) Hole punching cannot work through these NATs: after DCUtR has had its attempts
    // (it makes them right after the relayed connection is up), the connection is still
    // relayed and forwarding still works.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let p = peer(&a, &b.node_id)
        .await
        .expect("A is still connected to B");
    assert_eq!(p.connection, "relayed", "{p:?}");
    for _ in 0..5 {
        a_queries_b(&a, &b).await;
    }
    let rs = status(&relay).await.unwrap().relay_server.unwrap();
    assert!(rs.circuits >= 1, "the relay carries the circuit: {rs:?}");

    // Network.Dial takes B's relayed address and answers with B (not the relay).
    let circuit = reserved(&b, &relay).await.unwrap();
    let r = network(&a.grpc())
        .dial(DialRequest { address: circuit })
        .await
        .expect("dial B's relayed address")
        .into_inner();
    assert_eq!(r.node_id, b.node_id);
}

/// Test 2 (and 4) on NATs that keep a flow's port whatever the destination (Linux `masquerade`)
/// and silently drop unsolicited packets: A's first query reaches B through the relay and is
/// answered although DCUtR replaces the relayed connection meanwhile; the connection becomes
/// direct in both peer lists, and forwarding works over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_punching_upgrades_a_relayed_connection_to_direct() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let Lab {
        lab: _lab,
        relay,
        public: _public,
        a,
        b,
    } = Lab::start(NatKind::EndpointIndependent).await.expect(SETUP);
    for h in [&a, &b] {
        reachability(h, Reachability::NotReachable, "NATed node: not reachable").await;
    }
    reserved(&a, &relay).await.unwrap();
    reserved(&b, &relay).await.unwrap();
    b_has_notes(&b).await;

    // A's first query to B (by node id) is its first contact: B is found through the DHT and
    // reached through the relay, and DCUtR upgrades the connection at once, while the query may
    // still be in flight on the relayed one; it must be answered all the same.
    a_queries_b(&a, &b).await;
    let p = eventually(
        "the connection from A to B to become direct (DCUtR)",
        Duration::from_secs(60),
        || async {
            peer(&a, &b.node_id)
                .await
                .filter(|p| p.connection == "direct")
        },
    )
    .await
    .unwrap();
    assert!(p.transport == "tcp" || p.transport == "quic", "{p:?}");
    eventually(
        "B to see the direct connection",
        Duration::from_secs(30),
        || async {
            peer(&b, &a.node_id)
                .await
                .filter(|p| p.connection == "direct")
        },
    )
    .await
    .unwrap();
    for _ in 0..5 {
        a_queries_b(&a, &b).await;
    }
    let p = peer(&a, &b.node_id).await.expect("still connected");
    assert_eq!(p.connection, "direct", "{p:?}");
}

/// A sidecar on loopback (no namespaces needed); returns it with its data dir.
fn loopback_sidecar(
    args: &[&str],
) -> anyhow::Result<(foldmesh_e2e::process::Proc, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut c = std::process::Command::new(foldmesh_e2e::process::bin_path("p2p-sidecar"));
    c.arg("--data-dir")
        .arg(dir.path())
        .args(["--admin-listen", "127.0.0.1:0", "--mdns", "off"])
        .args(args)
        .env("RUST_LOG", "info");
    let (p, line) =
        foldmesh_e2e::process::Proc::spawn(c, "p2p-sidecar ready", Duration::from_secs(20))?;
    let id = foldmesh_e2e::process::parse_kv(&line, "node_id").unwrap();
    Ok((p, id, dir))
}

/// Relays named with --relay are reserved on at once, whatever AutoNAT says (source "config");
/// a bad --relay or relay limit stops the sidecar with a message naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_relays_are_reserved_on_and_bad_relay_flags_are_refused() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay_addr = format!("/ip4/127.0.0.1/tcp/{port}");
    // The relay service starts with a confirmed external address (given here, on loopback).
    let (_relay, relay_id, _d1) = loopback_sidecar(&[
        "--listen",
        &relay_addr,
        "--external-address",
        &relay_addr,
        "--relay-server",
    ])
    .unwrap();
    let (_client, _client_id, d2) = loopback_sidecar(&[
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--relay",
        &format!("{relay_addr}/p2p/{relay_id}"),
    ])
    .unwrap();
    let mesh = fold_proto::sidecar::mesh_client::MeshClient::new(local_link::channel(
        &local_link::LinkAddr::Unix(d2.path().join("sidecar.sock")),
        Duration::from_secs(2),
    ));
    let st = eventually(
        "a reservation on the configured relay",
        Duration::from_secs(30),
        || {
            let mut mesh = mesh.clone();
            async move {
                let st = mesh
                    .status(fold_proto::sidecar::MeshStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                st.relays
                    .iter()
                    .any(|r| r.state == fold_proto::v1::relay_reservation::State::Reserved as i32)
                    .then_some(st)
            }
        },
    )
    .await
    .unwrap();
    let r = &st.relays[0];
    assert_eq!(r.relay_node_id, relay_id);
    assert_eq!(r.source, "config");
    assert_eq!(r.relay_addr, relay_addr);
    assert!(
        r.circuit_addr
            .starts_with(&format!("{relay_addr}/p2p/{relay_id}/p2p-circuit")),
        "{r:?}"
    );
    assert!(r.reserved_unix_ms > 0);
    assert!(!st.relay_server.unwrap().enabled);

    for (args, says) in [
        (vec!["--relay", "/ip4/127.0.0.1/tcp/1"], "/p2p/"),
        (
            vec!["--relay-server", "--relay-max-circuits", "0"],
            "--relay-max-circuits",
        ),
        (
            vec!["--connection-timeout-secs", "0"],
            "--connection-timeout-secs",
        ),
    ] {
        let mut all = vec!["--listen", "/ip4/127.0.0.1/tcp/0"];
        all.extend(args);
        let e = loopback_sidecar(&all).err().expect("refused at start");
        assert!(format!("{e:#}").contains(says), "{e:#}");
    }
}
