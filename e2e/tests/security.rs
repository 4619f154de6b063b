//! Security on the wire, with real processes: a hostile libp2p peer written here, denied and
//! key-less peers, mutual TLS identities mapped to trust distances, packet captures of encrypted
//! traffic (tshark), and the token on a TCP local link.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_proto::json::map_to_struct;
use fold_proto::v1::{HistoryRequest, MutateRequest, MutationType, QueryRequest};
use fold_proto::wire::{
    ForwardEnvelope, ForwardFrame, ForwardResponse, Operation, Requester, SignedEnvelope,
    forward_frame, forward_response, operation,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::http;
use foldmesh_e2e::process::{NodeProc, Proc, bin_path, parse_kv};
use futures::AsyncWriteExt;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm, noise, tcp, yamux};
use p2p_sidecar::codec::FORWARD_PROTOCOL;
use serde_json::json;
use tonic::Code;

struct Sidecar {
    _proc: Proc,
    node_id: String,
    listen: String,
    admin: String,
}

fn sidecar(dir: &Path, extra: &[&str]) -> Sidecar {
    let mut cmd = Command::new(bin_path("p2p-sidecar"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra);
    let (proc, line) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
    Sidecar {
        _proc: proc,
        node_id: parse_kv(&line, "node_id").unwrap(),
        listen: parse_kv(&line, "listen").unwrap(),
        admin: parse_kv(&line, "admin").unwrap(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn notes() -> serde_json::Value {
    schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "body": field(json!("NoRequirement"), json!("NoRequirement"))}),
    )
}

/// A plain libp2p peer that speaks /fold/forward/2.0.0 — and can lie. It keeps one long-lived
/// stream, as a real peer does, and sends one request at a time on it.
struct Hostile {
    swarm: Option<Swarm<libp2p_stream::Behaviour>>,
    control: libp2p_stream::Control,
    stream: Option<libp2p::Stream>,
    next_id: u64,
    driver: Option<tokio::task::JoinHandle<()>>,
}

impl Hostile {
    fn dial(&mut self, addr: Multiaddr) -> Result<(), libp2p::swarm::DialError> {
        self.swarm
            .as_mut()
            .expect("dial before the first ask")
            .dial(addr)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

fn hostile_swarm(key: Keypair) -> Hostile {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let control = swarm.behaviour().new_control();
    Hostile {
        swarm: Some(swarm),
        control,
        stream: None,
        next_id: 0,
        driver: None,
    }
}

/// Send one request on the hostile peer's stream and wait for its answer (or the failure),
/// bounded.
async fn ask(
    h: &mut Hostile,
    peer: PeerId,
    req: SignedEnvelope,
) -> Result<ForwardResponse, String> {
    if let Some(mut swarm) = h.swarm.take() {
        h.driver = Some(tokio::spawn(async move {
            loop {
                let _ = swarm.select_next_some().await;
            }
        }));
    }
    let work = async {
        if h.stream.is_none() {
            let s = h
                .control
                .open_stream(peer, FORWARD_PROTOCOL)
                .await
                .map_err(|e| e.to_string())?;
            h.stream = Some(s);
        }
        let stream = h.stream.as_mut().ok_or("no stream")?;
        h.next_id += 1;
        let id = h.next_id;
        let frame = ForwardFrame {
            id,
            body: Some(forward_frame::Body::Request(req)),
        };
        let mut buf = Vec::new();
        p2p_sidecar::codec::encode_frame(&frame, 8 << 20, &mut buf).map_err(|e| e.to_string())?;
        stream.write_all(&buf).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let answer: Option<ForwardFrame> = p2p_sidecar::codec::read_frame(stream, 8 << 20)
            .await
            .map_err(|e| e.to_string())?;
        match answer {
            Some(ForwardFrame {
                id: got,
                body: Some(forward_frame::Body::Response(r)),
            }) if got == id => Ok(r),
            other => Err(format!("unexpected answer {other:?}")),
        }
    };
    let r = match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(r) => r,
        Err(_) => Err("timed out".to_string()),
    };
    if r.is_err() {
        h.stream = None;
    }
    r
}

fn mutate_op(id: &str, body: &str, target: &str) -> Operation {
    Operation {
        kind: Some(operation::Kind::Mutate(MutateRequest {
            data_json: String::new(),
            idempotency_key: String::new(),
            schema: "Notes".into(),
            mutation_type: MutationType::Create as i32,
            data: Some(map_to_struct(
                json!({"id": id, "body": body}).as_object().unwrap(),
            )),
            target_node_id: target.into(),
        })),
    }
}

fn envelope(key: &Keypair, target: &str, op: Operation, ts: u64) -> ForwardEnvelope {
    ForwardEnvelope {
        request_id: uuid::Uuid::new_v4().to_string(),
        origin_node_id: key.public().to_peer_id().to_string(),
        target_node_id: target.into(),
        timestamp_unix_ms: ts,
        deadline_unix_ms: 0,
        requester: Some(Requester {
            distance: 0,
            identity: "client:hostile".into(),
            proven_key: String::new(),
        }),
        operation: Some(op),
    }
}

fn seal(key: &Keypair, env: &ForwardEnvelope) -> SignedEnvelope {
    p2p_sidecar::signing::seal(key, env, Default::default()).unwrap()
}

fn signed(key: &Keypair, target: &str, op: Operation, ts: u64) -> SignedEnvelope {
    seal(key, &envelope(key, target, op, ts))
}

/// Sign `payload` bytes as they are (for envelopes built by hand).
fn sign_bytes(key: &Keypair, payload: Vec<u8>) -> SignedEnvelope {
    let mut msg = b"fold-forward-v2\0".to_vec();
    msg.extend_from_slice(&payload);
    SignedEnvelope {
        signature: key.sign(&msg).unwrap(),
        payload,
        trace_context: Default::default(),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn error_code(r: &ForwardResponse) -> Option<i32> {
    match &r.result {
        Some(forward_response::Result::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// A forward-protocol inbound counter of the sidecar, by outcome (0 when never counted).
fn inbound(text: &str, outcome: &str) -> u64 {
    http::sample(
        text,
        "fold_sidecar_inbound_requests_total",
        &[("protocol", "forward"), ("outcome", outcome)],
    )
    .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_is_refused_counted_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(dir.path(), &[]);
    let node = NodeProc::start(dir.path(), &["--unknown-peer-distance", "0"]).unwrap();
    fold(&node.grpc)
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    let target: PeerId = sc.node_id.parse().unwrap();
    let addr: Multiaddr = sc.listen.parse().unwrap();

    let key = Keypair::generate_ed25519();
    let mut swarm = hostile_swarm(key.clone());
    swarm
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(target)))
        .unwrap();
    let t = &sc.node_id;

    // Wait for the node to have found its sidecar, then one honest request.
    let mut first = None;
    for _ in 0..50 {
        // A first request racing the connection on a loaded machine is simply retried.
        let Ok(r) = ask(
            &mut swarm,
            target,
            signed(&key, t, mutate_op("m1", "once", t), now_ms()),
        )
        .await
        else {
            continue;
        };
        if error_code(&r) != Some(Code::Unavailable as i32) {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("the node behind the sidecar answered");
    assert!(
        matches!(first.result, Some(forward_response::Result::Mutate(_))),
        "{first:?}"
    );

    // Replay of an accepted request.
    let fresh = signed(&key, t, mutate_op("m2", "replayed", t), now_ms());
    let ok = ask(&mut swarm, target, fresh.clone()).await.unwrap();
    assert!(error_code(&ok).is_none(), "{ok:?}");
    let replay = ask(&mut swarm, target, fresh).await.unwrap();
    assert_eq!(
        error_code(&replay),
        Some(Code::Unauthenticated as i32),
        "{replay:?}"
    );

    // Tampered bytes: the payload changed after signing (here: the requester made the owner).
    let mut env = envelope(&key, t, mutate_op("m3", "innocent", t), now_ms());
    let mut tampered = seal(&key, &env);
    env.operation = Some(mutate_op("m3", "EVIL", t));
    tampered.payload = prost::Message::encode_to_vec(&env);
    let r = ask(&mut swarm, target, tampered).await.unwrap();
    assert_eq!(error_code(&r), Some(Code::Unauthenticated as i32));

    // Truncated envelope: the signed payload cut short.
    let mut truncated = signed(&key, t, mutate_op("m7", "cut", t), now_ms());
    let n = truncated.payload.len();
    truncated.payload.truncate(n - 5);
    let r = ask(&mut swarm, target, truncated).await.unwrap();
    assert!(
        matches!(
            error_code(&r),
            Some(c) if c == Code::InvalidArgument as i32 || c == Code::Unauthenticated as i32
        ),
        "{r:?}"
    );

    // Stale.
    let stale = signed(
        &key,
        t,
        mutate_op("m4", "old", t),
        now_ms() - 10 * 60 * 1000,
    );
    let r = ask(&mut swarm, target, stale).await.unwrap();
    assert_eq!(error_code(&r), Some(Code::Unauthenticated as i32));

    // Claims to come from another node.
    let someone = Keypair::generate_ed25519();
    let forged = signed(&someone, t, mutate_op("m5", "forged", t), now_ms());
    let r = ask(&mut swarm, target, forged).await.unwrap();
    assert_eq!(error_code(&r), Some(Code::Unauthenticated as i32));

    // Unsigned.
    let mut unsigned = signed(&key, t, mutate_op("m6", "unsigned", t), now_ms());
    unsigned.signature.clear();
    let r = ask(&mut swarm, target, unsigned).await.unwrap();
    assert_eq!(error_code(&r), Some(Code::Unauthenticated as i32));

    // Past its deadline on arrival: refused, nothing done.
    let mut late = envelope(&key, t, mutate_op("m9", "too late", t), now_ms());
    late.deadline_unix_ms = now_ms() - 1;
    let r = ask(&mut swarm, target, seal(&key, &late)).await.unwrap();
    assert_eq!(error_code(&r), Some(Code::DeadlineExceeded as i32), "{r:?}");

    // An unknown field from a newer sender is signed like the rest and breaks nothing.
    let mut payload = prost::Message::encode_to_vec(&envelope(
        &key,
        t,
        mutate_op("m8", "from the future", t),
        now_ms(),
    ));
    prost::encoding::string::encode(
        99,
        &"a field this node does not know".to_string(),
        &mut payload,
    );
    let r = ask(&mut swarm, target, sign_bytes(&key, payload))
        .await
        .unwrap();
    assert!(
        matches!(r.result, Some(forward_response::Result::Mutate(_))),
        "{r:?}"
    );

    // Nothing of the refused requests reached the data; the accepted ones did, once.
    let rows = fold(&node.grpc)
        .query(QueryRequest {
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            fields: vec!["body".into()],
            filter: None,
            target_node_id: String::new(),
            definition_hash: Default::default(),
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&rows), vec!["m1", "m2", "m8"]);
    let h = fold(&node.grpc)
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            field: "body".into(),
            range_key: "m2".into(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h.len(), 1, "the replay wrote nothing");
    assert_eq!(
        h[0].writer,
        format!("peer:{}/client:hostile", key.public().to_peer_id())
    );

    // Every refusal is counted by reason.
    let (_, m) = http::get(&sc.admin, "/metrics").unwrap();
    let c = |outcome: &str| inbound(&m, outcome);
    assert_eq!(c("replayed"), 1, "{m}");
    assert_eq!(c("bad_signature") + c("malformed"), 3);
    assert_eq!(c("stale"), 1);
    assert_eq!(c("wrong_origin"), 1);
    assert_eq!(c("deadline_exceeded"), 1);
}

/// Oversized ids are refused before anything keeps them: a flood of requests with 32 KiB
/// request ids is refused, counted, and the sidecar's memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_ids_are_refused_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(dir.path(), &["--peer-rate-limit", "0"]);
    let _node = NodeProc::start(dir.path(), &["--unknown-peer-distance", "0"]).unwrap();
    let target: PeerId = sc.node_id.parse().unwrap();
    let addr: Multiaddr = sc.listen.parse().unwrap();
    let key = Keypair::generate_ed25519();
    let mut swarm = hostile_swarm(key.clone());
    swarm
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(target)))
        .unwrap();
    let t = &sc.node_id;
    let flood = |i: usize| {
        let mut env = envelope(&key, t, mutate_op("x", "y", t), now_ms());
        env.request_id = format!("{i:08}{}", "x".repeat(32 * 1024));
        seal(&key, &env)
    };
    // Warm up (connection, buffers), then measure across the flood. The first request may
    // race the connection on a loaded machine: retry it (bounded).
    let mut first = Err(String::new());
    for _ in 0..5 {
        first = ask(&mut swarm, target, flood(0)).await;
        if first.is_ok() {
            break;
        }
    }
    let r = first.unwrap();
    assert_eq!(error_code(&r), Some(Code::InvalidArgument as i32), "{r:?}");
    for i in 1..20 {
        let r = ask(&mut swarm, target, flood(i)).await.unwrap();
        assert_eq!(error_code(&r), Some(Code::InvalidArgument as i32), "{r:?}");
    }
    let pid = sc._proc.pid().unwrap();
    let before = rss_kib(pid);
    const N: usize = 1000;
    for i in 20..N {
        let r = ask(&mut swarm, target, flood(i)).await.unwrap();
        assert_eq!(error_code(&r), Some(Code::InvalidArgument as i32), "{r:?}");
    }
    let after = rss_kib(pid);
    // Kept, the ids alone would be ~32 MiB.
    assert!(
        after < before + 12 * 1024,
        "sidecar RSS grew from {before} KiB to {after} KiB over {N} oversized requests"
    );
    let (_, m) = http::get(&sc.admin, "/metrics").unwrap();
    assert!(inbound(&m, "oversized_field") >= N as u64, "{m}");
    let held = http::sample(&m, "fold_sidecar_replay_cache_bytes", &[]).unwrap_or(0.0);
    assert!(held < 1024.0 * 1024.0, "replay cache holds {held} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_and_peers_without_the_network_key_cannot_connect() {
    let outsider = Keypair::generate_ed25519();
    let friend = Keypair::generate_ed25519();
    let dir = tempfile::tempdir().unwrap();
    let denied_id = outsider.public().to_peer_id().to_string();
    let sc = sidecar(dir.path(), &["--deny-peer", &denied_id]);
    let target: PeerId = sc.node_id.parse().unwrap();
    let addr: Multiaddr = sc
        .listen
        .parse::<Multiaddr>()
        .unwrap()
        .with(libp2p::multiaddr::Protocol::P2p(target));

    // The denied peer cannot hold a connection: its request never gets an answer.
    let mut swarm = hostile_swarm(outsider.clone());
    swarm.dial(addr.clone()).unwrap();
    let r = ask(
        &mut swarm,
        target,
        signed(
            &outsider,
            &sc.node_id,
            mutate_op("x", "y", &sc.node_id),
            now_ms(),
        ),
    )
    .await;
    assert!(r.is_err(), "a denied peer got an answer: {r:?}");
    // Another peer can (so the check above can fail).
    let mut ok = hostile_swarm(friend.clone());
    ok.dial(addr).unwrap();
    let r = ask(
        &mut ok,
        target,
        signed(
            &friend,
            &sc.node_id,
            mutate_op("x", "y", &sc.node_id),
            now_ms(),
        ),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");

    // Private network: without the key, no connection at all.
    let keyfile = dir.path().join("swarm.key");
    std::fs::write(
        &keyfile,
        "/key/swarm/psk/1.0.0/\n/base16/\n6fd0bcd4a6c2ac6bdc44dd1cb3b8e0ba4c4ea87e1e0e3b4e8cc4dfcd6f0f1a2b\n",
    )
    .unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let private = sidecar(
        pdir.path(),
        &["--private-network-key", keyfile.to_str().unwrap()],
    );
    let ptarget: PeerId = private.node_id.parse().unwrap();
    let paddr: Multiaddr = private
        .listen
        .parse::<Multiaddr>()
        .unwrap()
        .with(libp2p::multiaddr::Protocol::P2p(ptarget));
    let mut keyless = hostile_swarm(friend.clone());
    keyless.dial(paddr.clone()).unwrap();
    let r = ask(
        &mut keyless,
        ptarget,
        signed(
            &friend,
            &private.node_id,
            mutate_op("x", "y", &private.node_id),
            now_ms(),
        ),
    )
    .await;
    assert!(
        r.is_err(),
        "a peer without the network key got through: {r:?}"
    );
    // A sidecar holding the key connects (its node dials through the Mesh API).
    let qdir = tempfile::tempdir().unwrap();
    let member = sidecar(
        qdir.path(),
        &["--private-network-key", keyfile.to_str().unwrap()],
    );
    let node = NodeProc::start(qdir.path(), &[]).unwrap();
    let dialed = foldmesh_e2e::mesh::eventually(
        "a member of the private network to connect",
        Duration::from_secs(10),
        || async {
            network(&node.grpc)
                .dial(fold_proto::v1::DialRequest {
                    address: paddr.to_string(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().node_id)
        },
    )
    .await
    .unwrap();
    assert_eq!(dialed, private.node_id);
    drop(member);
}

fn tls_material() -> foldmesh_e2e::tls::TlsMaterial {
    foldmesh_e2e::tls::material(&["trusted-client", "far-client", "listed-client"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identities_map_to_trust_distances() {
    let (ca, (cert, key), clients) = tls_material();
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca_p, cert_p, key_p) = (
        w("ca.pem", &ca),
        w("server.pem", &cert),
        w("server.key", &key),
    );
    let data = dir.path().join("data");
    let node = NodeProc::start(
        &data,
        &[
            "--tls-cert",
            &cert_p,
            "--tls-key",
            &key_p,
            "--tls-client-ca",
            &ca_p,
            "--tls-client-auth",
            "optional",
            "--client-trust-distance",
            "5",
            "--admin-identity",
            "trusted-client",
            "--trust",
            "trusted-client=1",
            "--trust",
            "far-client=3",
        ],
    )
    .unwrap();
    let mut near_field = field(json!({"Distance": 1}), json!({"Distance": 1}));
    near_field["permission_policy"]["explicit_read_policy"] =
        json!({"counts_by_pub_key": {"listed-client": 1}});
    let s = schema("Private", None, json!({"secret": near_field}));
    let (tcert, tkey) = (&clients[0].1, &clients[0].2);
    let mut trusted = foldmesh_e2e::tls::fold_client(&node.grpc, &ca, Some((tcert, tkey))).await;
    trusted.load_schema(load_req(&s, true)).await.unwrap();
    trusted
        .mutate(mutate_req(
            "Private",
            MutationType::Create,
            json!({"secret": "s3cr3t"}),
        ))
        .await
        .unwrap();
    let q = || query_req("Private", &["secret"], None);
    let r = trusted.query(q()).await.unwrap().into_inner();
    assert_eq!(records(&r)[0].1, json!({"secret": "s3cr3t"}));

    let mut far =
        foldmesh_e2e::tls::fold_client(&node.grpc, &ca, Some((&clients[1].1, &clients[1].2))).await;
    // Only the listed admin identity may manage the node; distance 3 may not.
    let e = far.load_schema(load_req(&s, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin right"), "{e:?}");
    let e = far.query(q()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("client:far-client is at 3"), "{e:?}");

    let mut anonymous = foldmesh_e2e::tls::fold_client(&node.grpc, &ca, None).await;
    let e = anonymous.query(q()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("client:local is at 5"), "{e:?}");

    let mut listed =
        foldmesh_e2e::tls::fold_client(&node.grpc, &ca, Some((&clients[2].1, &clients[2].2))).await;
    let r = listed.query(q()).await.unwrap().into_inner();
    assert_eq!(
        records(&r)[0].1,
        json!({"secret": "s3cr3t"}),
        "the explicit key policy admits it"
    );

    // History records who wrote.
    let h = trusted
        .history(HistoryRequest {
            target_node_id: String::new(),
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Private".into(),
            field: "secret".into(),
            range_key: String::new(),
            limit: 0,
            definition_hash: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(h[0].writer, "client:trusted-client");
    drop(node);

    // Client authentication required (the default with a client CA): a client without a
    // certificate is refused at the handshake, and an unlisted certificate is denied, never
    // the owner by accident.
    let data = dir.path().join("data-required");
    let node = NodeProc::start(
        &data,
        &[
            "--tls-cert",
            &cert_p,
            "--tls-key",
            &key_p,
            "--tls-client-ca",
            &ca_p,
        ],
    )
    .unwrap();
    let refused = match tonic::transport::Endpoint::from_shared(format!("https://{}", node.grpc))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
    {
        // TLS 1.3: the server may refuse only after the client's half of the handshake.
        Ok(ch) => fold_proto::v1::fold_node_client::FoldNodeClient::new(ch)
            .list_schemas(fold_proto::v1::ListSchemasRequest { state: 0 })
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
    let mut unlisted =
        foldmesh_e2e::tls::fold_client(&node.grpc, &ca, Some((&clients[1].1, &clients[1].2))).await;
    let e = unlisted.load_schema(load_req(&s, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = unlisted.query(q()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An optional client CA with no distance for certificate-less clients is a start-up error.
    let e = NodeProc::start(
        &dir.path().join("data-optional"),
        &[
            "--tls-cert",
            &cert_p,
            "--tls-key",
            &key_p,
            "--tls-client-ca",
            &ca_p,
            "--tls-client-auth",
            "optional",
        ],
    )
    .err()
    .expect("refused to start");
    assert!(e.to_string().contains("--client-trust-distance"), "{e}");
}

fn tshark() -> String {
    for d in std::env::split_paths(&std::env::var("PATH").unwrap_or_default()) {
        if d.join("tshark").exists() {
            return d.join("tshark").display().to_string();
        }
    }
    panic!("tshark is not installed; run scripts/test.sh (it installs it)");
}

struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

fn capture(file: &Path, filter: &str) -> Capture {
    let mut child = Command::new(tshark())
        .args(["-i", "lo", "-f", filter, "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tshark says "Capturing on 'Loopback: lo'" once it really captures.
    let mut err = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("Capturing on") {
        assert!(Instant::now() < deadline, "tshark did not start: {seen}");
        let n = err.read(&mut buf).unwrap_or(0);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = err.read_to_end(&mut rest);
    });
    // dumpcap announces the interface a moment before its filter is live.
    std::thread::sleep(Duration::from_millis(2000));
    Capture {
        child,
        file: file.to_path_buf(),
    }
}

impl Capture {
    fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn port_of(addr: &str) -> String {
    addr.rsplit(['/', ':']).next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_show_no_plaintext_over_tls_and_noise() {
    let (ca, (cert, key), _) = tls_material();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.path().join("s.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("s.key"), &key).unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let sa = sidecar(&da, &[]);
    let na = NodeProc::start(
        &da,
        &[
            "--tls-cert",
            dir.path().join("s.pem").to_str().unwrap(),
            "--tls-key",
            dir.path().join("s.key").to_str().unwrap(),
        ],
    )
    .unwrap();
    let sb = sidecar(&db, &[]);
    let nb = NodeProc::start(&db, &["--unknown-peer-distance", "0"]).unwrap();
    fold(&nb.grpc)
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    let mut a = foldmesh_e2e::tls::fold_client(&na.grpc, &ca, None).await;
    foldmesh_e2e::mesh::eventually(
        "node A to see its sidecar",
        Duration::from_secs(10),
        || async {
            let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", na.grpc))
                .ok()?
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                        .domain_name("localhost"),
                )
                .ok()?
                .connect()
                .await
                .ok()?;
            fold_proto::v1::network_client::NetworkClient::new(ch)
                .dial(fold_proto::v1::DialRequest {
                    address: format!("{}/p2p/{}", sb.listen, sb.node_id),
                })
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
    .unwrap();

    // 1. A TLS client session and node-to-node (Noise) traffic, during a forwarded mutation.
    let marker = format!("MARKER-{}", uuid::Uuid::new_v4().simple());
    let filter = format!(
        "tcp port {} or tcp port {} or tcp port {}",
        port_of(&na.grpc),
        port_of(&sa.listen),
        port_of(&sb.listen)
    );
    let cap = capture(&dir.path().join("enc.pcap"), &filter);
    let mut m = mutate_req(
        "Notes",
        MutationType::Create,
        json!({"id": "k1", "body": marker}),
    );
    m.target_node_id = sb.node_id.clone();
    let w = a.mutate(m).await.unwrap().into_inner();
    assert_eq!(w.node_id, sb.node_id);
    let bytes = cap.stop();
    assert!(
        bytes.len() > 1000,
        "the capture saw the traffic ({} bytes)",
        bytes.len()
    );
    assert!(
        !contains(&bytes, &marker),
        "the marker crossed the wire in plaintext"
    );
    // The value really arrived on B.
    let r = fold(&nb.grpc)
        .query(query_req("Notes", &["body"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r)[0].1, json!({"body": marker}));

    // 2. Control: the same kind of write on B's plaintext client port is visible.
    let marker2 = format!("MARKER-{}", uuid::Uuid::new_v4().simple());
    let cap = capture(
        &dir.path().join("plain.pcap"),
        &format!("tcp port {}", port_of(&nb.grpc)),
    );
    fold(&nb.grpc)
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "k2", "body": marker2}),
        ))
        .await
        .unwrap();
    let bytes = cap.stop();
    assert!(
        contains(&bytes, &marker2),
        "without TLS the marker is on the wire (so the check can fail); capture of {} bytes",
        bytes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_local_link_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("link.token");
    std::fs::write(&token, "0123456789abcdef-test-token\n").unwrap();
    let (p1, p2) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    };
    let mesh = format!("127.0.0.1:{p1}");
    let peer = format!("127.0.0.1:{p2}");
    // Without a token file both refuse to start on TCP.
    let out = Command::new(bin_path("fold-node"))
        .arg("--data-dir")
        .arg(dir.path().join("x"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--sidecar-addr",
            &mesh,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--link-token-file"));

    let t = token.to_str().unwrap();
    let _sc = sidecar(
        dir.path(),
        &[
            "--mesh-listen",
            &mesh,
            "--node-addr",
            &peer,
            "--link-token-file",
            t,
        ],
    );
    let node = NodeProc::start(
        dir.path(),
        &[
            "--sidecar-addr",
            &mesh,
            "--peer-requests-listen",
            &peer,
            "--link-token-file",
            t,
        ],
    )
    .unwrap();
    // With the token the two work together.
    foldmesh_e2e::mesh::eventually(
        "the node to reach its sidecar over TCP",
        Duration::from_secs(10),
        || async {
            network(&node.grpc)
                .status(fold_proto::v1::NetworkStatusRequest {})
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await
    .unwrap();
    // Another local process without the token gets nothing from either side.
    let e = fold_proto::sidecar::mesh_client::MeshClient::new(channel(&mesh))
        .status(fold_proto::sidecar::MeshStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = fold_proto::sidecar::peer_requests_client::PeerRequestsClient::new(channel(&peer))
        .served_schemas(fold_proto::sidecar::ServedSchemasRequest {
            origin_node_id: "x".into(),
            names: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_throttled_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(
        dir.path(),
        &["--peer-rate-limit", "5", "--peer-rate-burst", "5"],
    );
    let node = NodeProc::start(dir.path(), &["--unknown-peer-distance", "0"]).unwrap();
    fold(&node.grpc)
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    let target: PeerId = sc.node_id.parse().unwrap();
    let addr: Multiaddr = sc
        .listen
        .parse::<Multiaddr>()
        .unwrap()
        .with(libp2p::multiaddr::Protocol::P2p(target));
    let t = &sc.node_id;
    let query_op = || Operation {
        kind: Some(operation::Kind::Query(QueryRequest {
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            fields: vec!["id".into()],
            filter: None,
            target_node_id: t.clone(),
            definition_hash: Default::default(),
            consistency: 0,
        })),
    };

    let flood_key = Keypair::generate_ed25519();
    let mut flood = hostile_swarm(flood_key.clone());
    flood.dial(addr.clone()).unwrap();
    let mut throttled = 0;
    let mut answered = 0;
    for _ in 0..30 {
        let r = ask(
            &mut flood,
            target,
            signed(&flood_key, t, query_op(), now_ms()),
        )
        .await
        .unwrap();
        match error_code(&r) {
            Some(c) if c == Code::ResourceExhausted as i32 => throttled += 1,
            _ => answered += 1,
        }
    }
    assert!(
        throttled >= 20,
        "the flood was throttled ({throttled} of 30)"
    );
    assert!(answered >= 5, "its budget was served ({answered})");

    // A different peer still gets through at once.
    let calm_key = Keypair::generate_ed25519();
    let mut calm = hostile_swarm(calm_key.clone());
    calm.dial(addr).unwrap();
    let r = ask(
        &mut calm,
        target,
        signed(&calm_key, t, query_op(), now_ms()),
    )
    .await
    .unwrap();
    assert!(error_code(&r).is_none(), "{r:?}");
    let (_, m) = http::get(&sc.admin, "/metrics").unwrap();
    assert_eq!(inbound(&m, "rate_limited"), throttled);
}

/// A peer that sends requests and never reads the answers holds no shared capacity: a second
/// peer's forwards all get through, and the silent peer loses its own stream (issue 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_answers_does_not_stop_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    // 16 slots: before issue 22, ~280 unread answers held every one of them.
    let sc = sidecar(
        dir.path(),
        &["--peer-rate-limit", "0", "--inbound-queue", "16"],
    );
    let node = NodeProc::start(dir.path(), &["--unknown-peer-distance", "0"]).unwrap();
    fold(&node.grpc)
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    // Answers of ~80 KB each: a few fill the silent peer's receive window.
    let body = "b".repeat(4096);
    for i in 0..20 {
        fold(&node.grpc)
            .mutate(mutate_req(
                "Notes",
                MutationType::Create,
                json!({"id": format!("n{i}"), "body": body}),
            ))
            .await
            .unwrap();
    }
    let target: PeerId = sc.node_id.parse().unwrap();
    let addr: Multiaddr = sc
        .listen
        .parse::<Multiaddr>()
        .unwrap()
        .with(libp2p::multiaddr::Protocol::P2p(target));
    let t = sc.node_id.clone();
    let query_op = |fields: &[&str]| Operation {
        kind: Some(operation::Kind::Query(QueryRequest {
            route: 0,
            page_size: 0,
            page_token: String::new(),
            json_values: false,
            schema: "Notes".into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            filter: None,
            target_node_id: t.clone(),
            definition_hash: String::new(),
            consistency: 0,
        })),
    };

    // The silent peer: 300 requests on one stream, written from a task that never reads.
    let silent_key = Keypair::generate_ed25519();
    let mut silent = hostile_swarm(silent_key.clone());
    silent.dial(addr.clone()).unwrap();
    let mut control = silent.control.clone();
    let swarm = silent.swarm.take().unwrap();
    let driver = tokio::spawn(async move {
        let mut swarm = swarm;
        loop {
            let _ = swarm.select_next_some().await;
        }
    });
    let mut frames = Vec::new();
    for id in 1..=300u64 {
        let frame = ForwardFrame {
            id,
            body: Some(forward_frame::Body::Request(signed(
                &silent_key,
                &t,
                query_op(&["id", "body"]),
                now_ms(),
            ))),
        };
        p2p_sidecar::codec::encode_frame(&frame, 8 << 20, &mut frames).unwrap();
    }
    let writer = tokio::spawn(async move {
        let mut stream = control.open_stream(target, FORWARD_PROTOCOL).await.unwrap();
        // Blocks once the sidecar stops reading; never reads an answer.
        let _ = stream.write_all(&frames).await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(stream);
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A second peer's forwards all get through while the silent one sits on its answers.
    let calm_key = Keypair::generate_ed25519();
    let mut calm = hostile_swarm(calm_key.clone());
    calm.dial(addr).unwrap();
    for i in 0..30 {
        let r = ask(
            &mut calm,
            target,
            signed(&calm_key, &t, query_op(&["id"]), now_ms()),
        )
        .await
        .unwrap_or_else(|e| panic!("forward {i} of the second peer failed: {e}"));
        assert!(error_code(&r).is_none(), "forward {i}: {r:?}");
    }
    // The silent peer loses its stream within the write bound (10 s), fail-fast at 40 s.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, m) = http::get(&sc.admin, "/metrics").unwrap();
        if inbound(&m, "unread") >= 1 {
            assert_eq!(inbound(&m, "queue_full"), 0, "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent peer kept its stream:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And the second peer is still served.
    let r = ask(
        &mut calm,
        target,
        signed(&calm_key, &t, query_op(&["id"]), now_ms()),
    )
    .await
    .unwrap();
    assert!(error_code(&r).is_none(), "{r:?}");
    writer.abort();
    driver.abort();
}
