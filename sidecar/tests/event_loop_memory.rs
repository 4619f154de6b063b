//! The event loop, the forward streams and the inbound gate, run on libp2p's in-memory transport
//! with the node link behind a trait: two sidecars in one process, a fake node answering for
//! the receiver. No sockets, no child processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use fold_proto::sidecar::InboundForward;
use fold_proto::v1::{QueryRequest, QueryResponse};
use fold_proto::wire::{
    ForwardEnvelope, ForwardResponse, Operation, Requester, forward_response, operation,
};
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Transport, noise, yamux};
use p2p_sidecar::behaviour::Behaviour;
use p2p_sidecar::client::Client;
use p2p_sidecar::config::Config;
use p2p_sidecar::metrics::SidecarMetrics;
use p2p_sidecar::node_link::NodeHandler;
use prost::Message;
use tonic::{Code, Status};

/// A node that answers every query with its own name and counts what it was asked.
struct FakeNode {
    name: String,
    calls: AtomicUsize,
}

#[tonic::async_trait]
impl NodeHandler for FakeNode {
    async fn handle_forward(&self, req: InboundForward, _: Option<Duration>) -> ForwardResponse {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let env = ForwardEnvelope::decode(req.envelope.as_slice()).expect("a verified envelope");
        ForwardResponse {
            request_id: env.request_id,
            result: Some(forward_response::Result::Query(QueryResponse {
                answers: Vec::new(),
                attempts: 0,
                next_page_token: String::new(),
                records: vec![],
                node_id: self.name.clone(),
                replica: None,
                group: None,
            })),
        }
    }

    async fn served_schemas(
        &self,
        _: String,
        names: Vec<String>,
    ) -> Result<fold_proto::wire::SchemaNames, Status> {
        Ok(fold_proto::wire::SchemaNames {
            names: names.into_iter().filter(|n| n == "Notes").collect(),
            definition_hashes: Default::default(),
        })
    }
}

struct Sidecar {
    key: Keypair,
    client: Client,
    node: Arc<FakeNode>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn sidecar(listen: Option<u64>) -> Sidecar {
    let key = Keypair::generate_ed25519();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse_from([
        "p2p-sidecar",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--mdns",
        "off",
    ]);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_other_transport(|k| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(k)?)
                .multiplex(yamux::Config::default())
                .boxed())
        })
        .unwrap()
        .with_behaviour(|k| Behaviour::new(k, &config, None).map_err(Into::into))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    if let Some(port) = listen {
        swarm
            .listen_on(format!("/memory/{port}").parse().unwrap())
            .unwrap();
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
    let metrics = SidecarMetrics::register(&mut registry);
    let node = Arc::new(FakeNode {
        name: key.public().to_peer_id().to_string(),
        calls: AtomicUsize::new(0),
    });
    let (client, tasks) =
        p2p_sidecar::server::assemble(swarm, &config, node.clone(), libp2p_metrics, metrics)
            .unwrap();
    Sidecar {
        key,
        client,
        node,
        _tasks: tasks,
    }
}

fn envelope(from: &Keypair, target: &PeerId, id: &str) -> fold_proto::wire::SignedEnvelope {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let env = ForwardEnvelope {
        request_id: id.into(),
        origin_node_id: from.public().to_peer_id().to_string(),
        target_node_id: target.to_string(),
        timestamp_unix_ms: now,
        deadline_unix_ms: now + 10_000,
        requester: Some(Requester {
            distance: 1,
            identity: "client:test".into(),
            proven_key: String::new(),
        }),
        operation: Some(Operation {
            kind: Some(operation::Kind::Query(QueryRequest {
                route: 0,
                page_size: 0,
                page_token: String::new(),
                json_values: false,
                schema: "Notes".into(),
                fields: vec!["body".into()],
                filter: None,
                target_node_id: target.to_string(),
                definition_hash: Default::default(),
                consistency: 0,
            })),
        }),
    };
    p2p_sidecar::signing::seal(from, &env, Default::default()).unwrap()
}

#[tokio::test]
async fn forwards_and_schema_checks_cross_the_memory_transport() {
    let port = rand_port();
    let b = sidecar(Some(port));
    let a = sidecar(None);
    let b_id = b.key.public().to_peer_id();
    let addr: Multiaddr = format!("/memory/{port}/p2p/{b_id}").parse().unwrap();
    assert_eq!(a.client.dial(addr).await.unwrap(), b_id);

    // Many requests, concurrently, on the one stream; every answer reaches its caller.
    let calls = (0..50).map(|i| {
        let client = a.client.clone();
        let env = envelope(&a.key, &b_id, &format!("r{i}"));
        async move { client.forward(b_id, env).await }
    });
    for r in futures::future::join_all(calls).await {
        let r = r.unwrap();
        match r.result {
            Some(forward_response::Result::Query(q)) => assert_eq!(q.node_id, b_id.to_string()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(b.node.calls.load(Ordering::SeqCst), 50);

    // The gate: a replay and a request for another node never reach the node.
    let replay = a
        .client
        .forward(b_id, envelope(&a.key, &b_id, "r0"))
        .await
        .unwrap();
    assert!(matches!(
        replay.result,
        Some(forward_response::Result::Error(ref e)) if e.code == Code::Unauthenticated as i32
    ));
    let elsewhere = Keypair::generate_ed25519().public().to_peer_id();
    let wrong = a
        .client
        .forward(b_id, envelope(&a.key, &elsewhere, "w1"))
        .await
        .unwrap();
    assert!(matches!(
        wrong.result,
        Some(forward_response::Result::Error(ref e)) if e.code == Code::NotFound as i32
    ));
    assert_eq!(b.node.calls.load(Ordering::SeqCst), 50);

    // Schema checks go through the request-response protocol to the node's answer.
    let r = a
        .client
        .check_schemas(b_id, vec!["Notes".into(), "Other".into()])
        .await
        .unwrap();
    match r.result {
        Some(fold_proto::wire::check_schemas_response::Result::Approved(n)) => {
            assert_eq!(n.names, vec!["Notes".to_string()])
        }
        other => panic!("{other:?}"),
    }

    // The peer book knows B, connected.
    let peers = a.client.list_peers(false).await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node_id, b_id.to_string());
    assert!(peers[0].connected);
}

#[tokio::test]
async fn an_unknown_node_is_not_found_and_fails_fast() {
    let a = sidecar(None);
    let nobody = Keypair::generate_ed25519().public().to_peer_id();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        a.client.forward(nobody, envelope(&a.key, &nobody, "x")),
    )
    .await
    .expect("answered in time");
    let e = r.unwrap_err();
    assert_eq!(tonic::Status::from(e).code(), Code::NotFound);
}

fn rand_port() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) % 1_000_000_000 + 1
}
