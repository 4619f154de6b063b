//! The DHT at size, in network namespaces: 20 hosts on one bridge (no uplink), joined only as a
//! chain of bootstrap peers (host i knows host i-1, nothing else; no mDNS). The provider sits
//! at one end of the chain, the requester at the other, 19 bootstrap hops away. The requester
//! finds the provider through the DHT and forwards a query to it.
//!
//! What a product host runs is a fold-node with its p2p-sidecar; the 18 hosts in between run
//! only their sidecar (the DHT lives there), which keeps 20 hosts within a small machine. Every
//! wait is bounded (fail-fast bounds, not timing thresholds).

use std::time::Duration;

use fold_proto::v1::{ListPeersRequest, MutationType};
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{Host, eventually, flags, host, start_host};
use foldmesh_e2e::netns::TestNet;
use serde_json::json;

const HOSTS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_nineteen_bootstrap_hops_away_is_found_and_reached() {
    let net = TestNet::new(HOSTS)
        .expect("test network (needs root and iproute2; run scripts/test.sh as root)");
    // Host 0: the provider (node + sidecar), start of the chain.
    let provider = start_host(
        &net,
        0,
        &flags(&["--mdns", "off"]),
        &flags(&["--unknown-peer-distance", "0"]),
    )
    .unwrap();
    let mut prev = provider.p2p_addr();
    let mut middle: Vec<Host> = Vec::new();
    for i in 1..HOSTS - 1 {
        let mut h = host(&net, i).unwrap();
        h.start_sidecar(&net, &flags(&["--mdns", "off", "--bootstrap", &prev]))
            .unwrap();
        prev = h.p2p_addr();
        middle.push(h);
    }
    // Host 19: the requester, bootstrapped to host 18 only.
    let requester = start_host(
        &net,
        HOSTS - 1,
        &flags(&["--mdns", "off", "--bootstrap", &prev]),
        &[],
    )
    .unwrap();
    assert_eq!(middle.len(), HOSTS - 2);

    let notes = schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    );
    fold(&provider.grpc())
        .load_schema(load_req(&notes, true))
        .await
        .unwrap();
    fold(&provider.grpc())
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "far", "body": "nineteen hops away"}),
        ))
        .await
        .unwrap();

    // The requester never had the provider's address: only the DHT can tell it.
    // (Asked once the node's link to its sidecar is up.)
    let before = eventually(
        "the requester's peer list",
        Duration::from_secs(20),
        || async {
            network(&requester.grpc())
                .list_peers(ListPeersRequest {
                    include_disconnected: true,
                })
                .await
                .ok()
                .map(|r| r.into_inner().peers)
        },
    )
    .await
    .unwrap();
    eprintln!(
        "requester knows {} peers before the lookup; provider among them: {}",
        before.len(),
        before.iter().any(|p| p.node_id == provider.node_id)
    );

    let found = eventually(
        "the requester to find the provider of Notes through the DHT",
        Duration::from_secs(90),
        || async {
            let found = providers_of(&requester.grpc(), "Notes").await?;
            found.contains(&provider.node_id).then_some(found)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        found,
        vec![provider.node_id.clone()],
        "only the provider serves Notes"
    );

    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = provider.node_id.clone();
    let mut req = tonic::Request::new(q);
    req.set_timeout(Duration::from_secs(30));
    let r = fold(&requester.grpc())
        .query(req)
        .await
        .expect("query forwarded to the provider")
        .into_inner();
    assert_eq!(r.node_id, provider.node_id);
    assert_eq!(
        records(&r),
        vec![("far".to_string(), json!({"body": "nineteen hops away"}))]
    );
}
