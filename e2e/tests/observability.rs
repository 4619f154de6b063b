//! Observability and overload, with real tools: a real Prometheus server scrapes both processes
//! of a node, `promtool check metrics` lints both endpoints, an OTLP receiver written here gets
//! the spans of one forwarded query across four processes (with RUST_LOG=warn; each process's
//! resource naming its node and role), and a bounded overload is refused
//! cleanly while the node stays healthy.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fold_proto::v1::{DialRequest, MutationType, SetTrustRequest, TrustEntry};
use foldmesh_e2e::client::*;
use foldmesh_e2e::http;
use foldmesh_e2e::process::{NodeProc, Proc, bin_path, parse_kv};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use tonic::Code;

struct Sidecar {
    _proc: Proc,
    node_id: String,
    listen: String,
    admin: String,
}

fn start_sidecar(dir: &Path, env: &[(&str, String)]) -> Sidecar {
    let mut cmd = Command::new(bin_path("p2p-sidecar"));
    cmd.arg("--data-dir").arg(dir).args([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (proc, line) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
    Sidecar {
        _proc: proc,
        node_id: parse_kv(&line, "node_id").unwrap(),
        listen: parse_kv(&line, "listen").unwrap(),
        admin: parse_kv(&line, "admin").unwrap(),
    }
}

fn start_node(dir: &Path, extra: &[&str], env: &[(&str, String)]) -> NodeProc {
    // NodeProc::start does not take an environment; set it around the spawn.
    let mut cmd = Command::new(bin_path("fold-node"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (proc, line) = Proc::spawn(cmd, "fold-node ready", Duration::from_secs(20)).unwrap();
    NodeProc {
        proc,
        grpc: parse_kv(&line, "grpc").unwrap(),
        admin: parse_kv(&line, "admin").unwrap(),
        owner: parse_kv(&line, "owner"),
        data_dir: dir.to_path_buf(),
    }
}

fn tool(name: &str) -> String {
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/bin")
        .join(name);
    if local.exists() {
        return local.display().to_string();
    }
    for d in std::env::split_paths(&std::env::var("PATH").unwrap_or_default()) {
        if d.join(name).exists() {
            return d.join(name).display().to_string();
        }
    }
    panic!("`{name}` is not installed; run scripts/test.sh (it installs Prometheus and promtool)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn promtool_check(metrics: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && all.trim().is_empty(),
        "promtool: {all}"
    );
}

async fn link_two_nodes(
    env_a: &[(&str, String)],
    env_b: &[(&str, String)],
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    Sidecar,
    NodeProc,
    Sidecar,
    NodeProc,
) {
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let sa = start_sidecar(da.path(), env_a);
    let na = start_node(da.path(), &[], env_a);
    let sb = start_sidecar(db.path(), env_b);
    let nb = start_node(db.path(), &[], env_b);
    // Wait until each node has found its sidecar, then connect A to B and let B trust A.
    for n in [&na, &nb] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while network(&n.grpc)
            .status(fold_proto::v1::NetworkStatusRequest {})
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "node never saw its sidecar");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    network(&na.grpc)
        .dial(DialRequest {
            address: format!("{}/p2p/{}", sb.listen, sb.node_id),
        })
        .await
        .unwrap();
    network(&nb.grpc)
        .set_trust(SetTrustRequest {
            entry: Some(TrustEntry {
                node_id: sa.node_id.clone(),
                distance: 0,
                denied: false,
            }),
            remove: false,
        })
        .await
        .unwrap();
    let s = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!({"Distance": 0})),
               "body": field(json!({"Distance": 0}), json!({"Distance": 0}))}),
    );
    fold(&nb.grpc)
        .load_schema(load_req(&s, true))
        .await
        .unwrap();
    fold(&nb.grpc)
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": "k", "body": "v"}),
        ))
        .await
        .unwrap();
    (da, db, sa, na, sb, nb)
}

fn remote_query(target: &str) -> fold_proto::v1::QueryRequest {
    let mut q = query_req("Notes", &["body"], None);
    q.target_node_id = target.to_string();
    q
}

/// 1,000 concurrent forwards to one peer share one connection and one long-lived stream
/// (asserted from the sidecar's libp2p and stream metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_forwards_share_one_connection_and_one_stream() {
    let generous = [
        ("FOLD_SIDECAR_PEER_RATE_LIMIT", "0".to_string()),
        ("FOLD_SIDECAR_INBOUND_QUEUE", "2048".to_string()),
        // One peer sends all 1,000: let it hold every slot.
        ("FOLD_SIDECAR_INBOUND_PEER_SHARE", "100".to_string()),
    ];
    let (_da, _db, sa, na, sb, _nb) = link_two_nodes(&[], &generous).await;
    fold(&na.grpc)
        .query(remote_query(&sb.node_id))
        .await
        .unwrap();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            fold_proto::v1::fold_node_client::FoldNodeClient::new(
                tonic::transport::Endpoint::from_shared(format!("http://{}", na.grpc))
                    .unwrap()
                    .connect_lazy(),
            )
        })
        .collect();
    let calls = (0..1000).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        let target = sb.node_id.clone();
        tokio::spawn(async move {
            let mut r = tonic::Request::new(remote_query(&target));
            r.set_timeout(Duration::from_secs(30));
            c.query(r).await.map(|_| ())
        })
    });
    let results = futures::future::join_all(calls).await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(s)) => Some(format!("{:?}: {}", s.code(), s.message())),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let (_, m) = http::get(&sa.admin, "/metrics").unwrap();
    // A dialled B once and every forward went over that connection. (B's AutoNAT server may
    // also dial A back on its observed address to test its reachability: a short-lived
    // connection A accepts, role="Listener", which carries no forwards.)
    let established: u64 = m
        .lines()
        .filter(|l| {
            l.starts_with("libp2p_swarm_connections_established_total")
                && l.contains("role=\"Dialer\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(established, 1, "one connection for all forwards:\n{m}");
    let streams = http::sample(
        &m,
        "fold_sidecar_forward_streams_opened_total",
        &[("direction", "outbound")],
    )
    .unwrap_or(0.0);
    assert!(
        (1.0..=2.0).contains(&streams),
        "1,001 forwards opened {streams} streams"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_node_and_sidecar() {
    let (_da, _db, sa, na, _sb, _nb) = link_two_nodes(&[], &[]).await;
    // Some traffic, including forwards, so every family has series. Twenty forwards to the same
    // node share one pooled connection.
    for _ in 0..20 {
        fold(&na.grpc)
            .query(remote_query(&_sb.node_id))
            .await
            .unwrap();
    }
    let (_, sidecar_metrics) = http::get(&sa.admin, "/metrics").unwrap();
    // (Dialled by A; an AutoNAT dial-back from B, role="Listener", carries no forwards.)
    let established: u64 = sidecar_metrics
        .lines()
        .filter(|l| {
            l.starts_with("libp2p_swarm_connections_established_total")
                && l.contains("role=\"Dialer\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        established, 1,
        "one connection for all forwards:\n{sidecar_metrics}"
    );
    let _ = fold(&na.grpc)
        .query(query_req("Missing", &["x"], None))
        .await;

    for admin in [&na.admin, &sa.admin] {
        let (status, body) = http::get(admin, "/metrics").unwrap();
        assert_eq!(status, 200);
        promtool_check(&body);
        let (status, _) = http::get(admin, "/livez").unwrap();
        assert_eq!(status, 200);
    }
    let (_, node_metrics) = http::get(&na.admin, "/metrics").unwrap();
    assert!(node_metrics.contains("grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"fold.v1.FoldNode\",grpc_method=\"Query\",grpc_code=\"NotFound\"}"), "{node_metrics}");
    // The forwards share one long-lived stream to the sidecar (Mesh.ForwardStream); the sidecar
    // counts each of them.
    assert!(node_metrics.contains("grpc_client_started_total{grpc_type=\"bidi_stream\",grpc_service=\"fold.sidecar.v1.Mesh\",grpc_method=\"ForwardStream\"} 1"), "{node_metrics}");
    let (_, sidecar_metrics) = http::get(&sa.admin, "/metrics").unwrap();
    assert!(
        sidecar_metrics.contains("fold_sidecar_outbound_forwards_total{outcome=\"OK\"} 20"),
        "{sidecar_metrics}"
    );
    assert!(node_metrics.contains("fold_forwards_total{op=\"query\",outcome=\"OK\"} 20"));
    // Sidecar B verified every forward's signature, counted by verification round (a round
    // verifies one signature or a batch).
    let (_, b_metrics) = http::get(&_sb.admin, "/metrics").unwrap();
    let verified = http::sample(&b_metrics, "fold_sidecar_signature_batch_size_sum", &[]);
    let rounds = http::sample(&b_metrics, "fold_sidecar_signature_batch_size_count", &[]);
    assert!(
        matches!((verified, rounds), (Some(v), Some(r)) if v >= 20.0 && r >= 1.0 && r <= v),
        "{b_metrics}"
    );
    let (status, ready) = http::get(&na.admin, "/readyz").unwrap();
    assert_eq!(status, 200, "{ready}");

    // A real Prometheus scrapes both processes.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fold-node\n    static_configs:\n      - targets: [\"{}\"]\n  - job_name: p2p-sidecar\n    static_configs:\n      - targets: [\"{}\"]\n",
        na.admin, sa.admin
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let mut cmd = Command::new(tool("prometheus"));
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    // Prometheus logs "Server is ready to receive web requests." on stderr; poll the API instead.
    let mut prom = ProcGuard(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("127.0.0.1:{port}");
    let query = |q: &str| {
        http::get(&api, &format!("/api/v1/query?query={}", http::encode(q)))
            .ok()
            .map(|(_, b)| b)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = HashMap::new();
    for q in [
        "grpc_server_handled_total{job=\"fold-node\",grpc_method=\"Query\"}",
        "grpc_client_started_total{job=\"fold-node\"}",
        "fold_forwards_total{job=\"fold-node\",outcome=\"OK\"}",
        "fold_sidecar_outbound_forwards_total{job=\"p2p-sidecar\",outcome=\"OK\"}",
        "libp2p_swarm_new_listen_addr_total{job=\"p2p-sidecar\"}",
        "libp2p_identify_received_total{job=\"p2p-sidecar\"}",
        "up{job=\"p2p-sidecar\"} == 1",
        "up{job=\"fold-node\"} == 1",
    ] {
        loop {
            if let Some(body) = query(q)
                && body.contains("\"status\":\"success\"")
                && body.contains("\"metric\"")
            {
                seen.insert(q, body);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never returned a series for {q}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_eq!(seen.len(), 8);
    let _ = prom.0.kill();
}

struct ProcGuard(std::process::Child);
impl Drop for ProcGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (service name, trace id, span id, parent span id, span name)
type SpanRow = (String, String, String, String, String);

#[derive(Default, Clone)]
struct Collected {
    spans: Arc<Mutex<Vec<SpanRow>>>,
    /// Each exporting process's resource: service.name -> (service.instance.id, fold.role).
    resources: Arc<Mutex<HashMap<String, (String, String)>>>,
}

/// A string attribute of a resource.
fn resource_attr(
    r: Option<&opentelemetry_proto::tonic::resource::v1::Resource>,
    key: &str,
) -> String {
    r.and_then(|r| r.attributes.iter().find(|a| a.key == key))
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                Some(s.clone())
            }
            _ => None,
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let instance = resource_attr(rs.resource.as_ref(), "service.instance.id");
            if !instance.is_empty() {
                self.resources.lock().unwrap().insert(
                    resource_attr(rs.resource.as_ref(), "service.name"),
                    (instance, resource_attr(rs.resource.as_ref(), "fold.role")),
                );
            }
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push((
                        service.clone(),
                        hex(&s.trace_id),
                        hex(&s.span_id),
                        hex(&s.parent_span_id),
                        s.name,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_forwarded_query_through_four_processes() {
    let collected = Collected::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collected.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{addr}");
    // RUST_LOG=warn, a common production setting: logs say little, traces are still exported
    // in full (the log level governs logs only).
    let env = |name: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", name.to_string()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
            ("RUST_LOG", "warn".to_string()),
        ]
    };
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let sa = start_sidecar(da.path(), &env("sidecar-a"));
    let na = start_node(da.path(), &[], &env("node-a"));
    let sb = start_sidecar(db.path(), &env("sidecar-b"));
    let nb = start_node(db.path(), &["--unknown-peer-distance", "0"], &env("node-b"));
    for n in [&na, &nb] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while network(&n.grpc)
            .status(fold_proto::v1::NetworkStatusRequest {})
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    network(&na.grpc)
        .dial(DialRequest {
            address: format!("{}/p2p/{}", sb.listen, sb.node_id),
        })
        .await
        .unwrap();
    let s = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement")),
               "body": field(json!("NoRequirement"), json!("NoRequirement"))}),
    );
    fold(&nb.grpc)
        .load_schema(load_req(&s, true))
        .await
        .unwrap();

    // The client starts the trace: a W3C traceparent of our own.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(remote_query(&sb.node_id));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let r = fold(&na.grpc).query(req).await.unwrap().into_inner();
    assert_eq!(r.node_id, sb.node_id);

    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<_> = collected
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.1 == trace_id)
            .cloned()
            .collect();
        let services: HashSet<&str> = spans.iter().map(|s| s.0.as_str()).collect();
        if ["node-a", "sidecar-a", "sidecar-b", "node-b"]
            .iter()
            .all(|s| services.contains(s))
            && spans.iter().any(|s| s.4 == "fold.peer_request")
        {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} from all four processes never arrived: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Parent links are intact: every parent is a span of this trace, or the client's span.
    let ids: HashSet<&str> = spans.iter().map(|s| s.2.as_str()).collect();
    for s in &spans {
        assert!(
            s.3 == client_span || ids.contains(s.3.as_str()),
            "span {} of {} has a dangling parent {}: {spans:?}",
            s.4,
            s.0,
            s.3
        );
    }
    // The chain runs node A → sidecar A → sidecar B → node B.
    let by_name = |svc: &str, name: &str| spans.iter().find(|s| s.0 == svc && s.4 == name).cloned();
    let query_a = by_name("node-a", "fold.query").expect("node A's query span");
    let fwd_a = by_name("sidecar-a", "sidecar.forward").expect("sidecar A's forward span");
    let in_b = by_name("sidecar-b", "sidecar.inbound_forward").expect("sidecar B's inbound span");
    let peer_b = by_name("node-b", "fold.peer_request").expect("node B's peer request span");
    let ancestors = |mut id: String| {
        let mut chain = Vec::new();
        while let Some(s) = spans.iter().find(|s| s.2 == id) {
            chain.push(s.2.clone());
            id = s.3.clone();
        }
        chain
    };
    assert!(ancestors(peer_b.2.clone()).contains(&in_b.2));
    assert!(ancestors(in_b.2.clone()).contains(&fwd_a.2));
    assert!(ancestors(fwd_a.2.clone()).contains(&query_a.2));
    // Each process's resource names its node and its role.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = collected.resources.lock().unwrap().clone();
        let want = [
            ("node-a", &sa.node_id, "node"),
            ("sidecar-a", &sa.node_id, "sidecar"),
            ("node-b", &sb.node_id, "node"),
            ("sidecar-b", &sb.node_id, "sidecar"),
        ];
        if want
            .iter()
            .all(|(svc, id, role)| r.get(*svc) == Some(&(id.to_string(), role.to_string())))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resources without service.instance.id = node id and fold.role: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((sa, na, sb, nb));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_and_the_node_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(
        dir.path(),
        &["--rate-limit-per-client", "20", "--rate-limit-burst", "20"],
    )
    .unwrap();
    let s = schema(
        "Notes",
        Some("id"),
        json!({"id": field(json!("NoRequirement"), json!("NoRequirement"))}),
    );
    fold(&node.grpc)
        .load_schema(load_req(&s, true))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a full budget again

    // 300 requests at once, bounded in count and time.
    let client = fold(&node.grpc);
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = tonic::Request::new(query_req("Notes", &["id"], None));
            r.set_timeout(Duration::from_secs(10));
            c.query(r).await.map(|_| ()).map_err(|e| e.code())
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(Code::ResourceExhausted) => limited += 1,
            Err(other) => panic!("unexpected status {other:?}"),
        }
    }
    assert!(ok >= 20, "the admitted requests succeed ({ok})");
    assert!(limited > 0, "requests beyond the rate are refused");
    assert_eq!(ok + limited, 300);
    let (_, metrics) = http::get(&node.admin, "/metrics").unwrap();
    let counted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("fold_rate_limited_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(counted, limited as u64, "every refusal is counted");

    // Healthy and serving normally afterwards.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let h = tonic_health::pb::health_client::HealthClient::new(channel(&node.grpc))
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    fold(&node.grpc)
        .query(query_req("Notes", &["id"], None))
        .await
        .unwrap();
}
