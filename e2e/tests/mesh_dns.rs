//! Bootstrap by DNS name, as the Helm chart configures it: every sidecar gets the same list of
//! `/dns4/<name>/tcp/4001` addresses (its own included), names resolve through per-namespace
//! hosts files, and mDNS is off. The nodes must find each other and forward a query.

use std::time::Duration;

use fold_proto::v1::MutationType;
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{eventually, flags, host};
use foldmesh_e2e::netns::TestNet;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_bootstrap_from_dns_names_only() {
    let net = TestNet::new(3).expect("test network (needs root; run scripts/test.sh)");
    let names: Vec<(String, std::net::Ipv4Addr)> = (0..3)
        .map(|i| {
            (
                format!("fold-node-{i}.fold-node-headless"),
                net.host_addr(i),
            )
        })
        .collect();
    let bootstrap: Vec<String> = names
        .iter()
        .map(|(n, _)| format!("/dns4/{n}/tcp/4001"))
        .collect();
    let mut sidecar_flags = flags(&["--mdns", "off", "--bootstrap"]);
    sidecar_flags.push(bootstrap.join(","));
    let mut hosts = Vec::new();
    for i in 0..3 {
        net.set_hosts_file(i, &names).unwrap();
        let mut h = host(&net, i).unwrap();
        h.start_sidecar(&net, &sidecar_flags).unwrap();
        h.start_node(&net, &flags(&["--unknown-peer-distance", "0"]))
            .unwrap();
        hosts.push(h);
    }
    for h in &hosts {
        let others: Vec<String> = hosts
            .iter()
            .filter(|o| o.index != h.index)
            .map(|o| o.node_id.clone())
            .collect();
        eventually(
            "bootstrap by DNS name to connect every node",
            Duration::from_secs(40),
            || async {
                let peers = network(&h.grpc())
                    .list_peers(fold_proto::v1::ListPeersRequest {
                        include_disconnected: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .peers;
                others
                    .iter()
                    .all(|o| peers.iter().any(|p| &p.node_id == o && p.connected))
                    .then_some(())
            },
        )
        .await
        .unwrap();
    }
    let s = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!({"Distance": 0})),
               "body": field(json!({"Distance": 0}), json!({"Distance": 0}))}),
    );
    fold(&hosts[2].grpc())
        .load_schema(load_req(&s, true))
        .await
        .unwrap();
    fold(&hosts[2].grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "x", "body": "from node 2"}),
        ))
        .await
        .unwrap();
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = hosts[2].node_id.clone();
    let r = fold(&hosts[0].grpc()).query(q).await.unwrap().into_inner();
    assert_eq!(r.node_id, hosts[2].node_id);
    assert_eq!(
        records(&r),
        vec![("x".to_string(), json!({"body": "from node 2"}))]
    );
}
