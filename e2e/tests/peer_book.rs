//! The peer book and QUIC, on loopback with the real binaries: a sidecar restarted with no
//! bootstrap flag reconnects to the peers it knew (from `<data-dir>/peers.json`, mode 0600); a
//! corrupt peers file is a warning, not a crash; two nodes that listen and dial over QUIC only
//! forward a query and show the connection as QUIC; a private network refuses QUIC listeners.

use std::process::Command;
use std::time::Duration;

use fold_proto::v1::{ListPeersRequest, MutationType, PeerInfo};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::{Node, start_with};
use foldmesh_e2e::mesh::eventually;
use foldmesh_e2e::process::{Proc, bin_path};
use serde_json::json;

const TCP: &[&str] = &["--listen", "/ip4/127.0.0.1/tcp/0"];
const QUIC: &[&str] = &["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"];

/// `peer` as `on` lists it, once it is connected.
async fn connected_peer(on: &Node, peer: &str, what: &str) -> PeerInfo {
    eventually(what, Duration::from_secs(30), || async {
        let peers = on
            .node
            .owner_network()
            .list_peers(ListPeersRequest {
                include_disconnected: false,
            })
            .await
            .ok()?
            .into_inner()
            .peers;
        peers.into_iter().find(|p| p.node_id == peer && p.connected)
    })
    .await
    .unwrap()
}

fn notes() -> serde_json::Value {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!("NoRequirement")),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_only_nodes_forward_a_query_and_show_the_transport() {
    let a = start_with(QUIC, &[]);
    let b = start_with(QUIC, &[]);
    assert!(
        b.p2p.contains("/udp/") && b.p2p.contains("/quic-v1/"),
        "{}",
        b.p2p
    );
    b.trust(&a.id, 1).await;
    let mut owner = b.node.owner_fold();
    owner.load_schema(load_req(&notes(), true)).await.unwrap();
    owner
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "n1", "body": "over quic"}),
        ))
        .await
        .unwrap();
    a.dial(&b).await;

    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = b.id.clone();
    let r = a.node.owner_fold().query(q).await.unwrap().into_inner();
    assert_eq!(r.node_id, b.id);
    assert_eq!(
        records(&r),
        vec![("n1".to_string(), json!({"body": "over quic"}))]
    );

    let seen = connected_peer(&a, &b.id, "B in A's peer list").await;
    assert_eq!(seen.transport, "quic", "{seen:?}");
    assert_eq!(seen.connection, "direct", "{seen:?}");
    let seen = connected_peer(&b, &a.id, "A in B's peer list").await;
    assert_eq!(seen.transport, "quic", "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_redials_the_peers_it_knew() {
    let mut a = start_with(TCP, &[]);
    let b = start_with(TCP, &[]);
    a.dial(&b).await;

    // A writes its book within a few seconds of the change: B, with B's address, mode 0600.
    let path = a.data_dir().join("peers.json");
    let text = eventually("A's peers file to name B", Duration::from_secs(15), || {
        let path = path.clone();
        let id = b.id.clone();
        async move {
            let text = std::fs::read_to_string(&path).ok()?;
            text.contains(&id).then_some(text)
        }
    })
    .await
    .unwrap();
    let book: serde_json::Value = serde_json::from_str(&text).unwrap();
    let b_listen = b.p2p.split("/p2p/").next().unwrap().to_string();
    assert!(
        book["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == json!(b.id)
                && p["addrs"].as_array().unwrap().contains(&json!(b_listen))),
        "{text}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // Restart A's sidecar with no bootstrap flag, on a new port: B cannot know where A is now,
    // so a connection means A dialled B from its book.
    a.restart_sidecar(TCP);
    let seen = connected_peer(&a, &b.id, "A to reconnect to B after its restart").await;
    assert_eq!(seen.source, "book", "{seen:?}");
    // And the link works: B answers through it.
    let seen = connected_peer(&b, &a.id, "B to see A again").await;
    assert!(seen.connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peers_file_is_a_warning_and_an_empty_book() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("peers.json"),
        b"{\"version\":1,\"peers\":[{",
    )
    .unwrap();
    let mut cmd = Command::new(bin_path("p2p-sidecar"));
    cmd.arg("--data-dir")
        .arg(dir.path())
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(TCP);
    let (sidecar, _) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20))
        .expect("a corrupt peers file must not stop the sidecar");
    let log = eventually("the warning", Duration::from_secs(5), || async {
        let log = sidecar.stderr_tail(200);
        log.contains("peers file is corrupt").then_some(log)
    })
    .await
    .unwrap();
    assert!(log.contains("empty peer book"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_refuses_quic_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    std::fs::write(
        &key,
        "/key/swarm/psk/1.0.0/\n/base16/\n6fd0bcd4a6c2ac6bdc44dd1cb3b8e0ba4c4ea87e1e0e3b4e8cc4dfcd6f0f1a2b\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin_path("p2p-sidecar"));
    cmd.arg("--data-dir")
        .arg(dir.path())
        .args(["--admin-listen", "127.0.0.1:0", "--private-network-key"])
        .arg(&key)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1",
        ]);
    match Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20)) {
        Ok(_) => panic!("a private network started with a QUIC listener"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("QUIC cannot carry a private network (--private-network-key); listen on TCP only"),
                "{e}"
            );
        }
    }
}
