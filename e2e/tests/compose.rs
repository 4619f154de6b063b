//! The container mesh run for real: the image built with no registry (scripts/docker-image.sh, on
//! a locally imported Debian base, with the binaries of this build), the repository's own
//! docker-compose.yml brought up on a Docker engine (Prometheus built from Debian's package by
//! deploy/compose.no-registry.yml), and the walk-through of docs/DEPLOY.md driven from the host:
//! health, the owner path, forwarding, routed reads, Prometheus targets, a killed, a frozen and
//! restarted containers healing by themselves, and `down -v` leaving nothing behind.
//!
//! Network safety: an engine this test starts uses only 198.19.244.0/24 (its bridge) and
//! 198.19.246.0/24 (its address pool), the compose network is 198.19.245.0/24, all inside
//! 198.18.0.0/15 and leased from the namespace tests' slot locks (/run/foldmesh-netns), and the
//! engine runs without iptables, NAT or IP forwarding: containers reach nothing beyond their
//! network, and the host reaches them only through ports published on 127.0.0.1.
//!
//! The image carries this build's debug binaries (target/debug, which scripts/test.sh builds
//! anyway), stripped of debug information: a release build would add about 7 minutes of CI for
//! the same code paths. The image for users (`scripts/docker-image.sh` without `--bin-dir`) is
//! built from release binaries; the Dockerfile stage is the same.

use foldmesh_e2e::tools::{repo, tool};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fold_proto::v1::{MutationType, Route};
use foldmesh_e2e::client::{fold, mutate_req, network, query_req, records};
use serde_json::{Value as Json, json};

const PROJECT: &str = "foldmesh-e2e";
const A: &str = "127.0.0.1:50051";
const B: &str = "127.0.0.1:50061";
const C: &str = "127.0.0.1:50071";
const SCHEMA: &str = "SensorReadings";
/// Namespace-test slots (e2e/src/netns.rs: slot s is 198.{18 + s/256}.{s%256}.0/24) this test
/// uses: the engine's bridge, the compose network, the engine's address pool.
const SLOTS: [u32; 3] = [500, 501, 502];
const LOCK_DIR: &str = "/run/foldmesh-netns";
/// Images this test makes (and removes).
const IMAGES: [&str; 4] = [
    "foldmesh:latest",
    "foldmesh:0.1.0",
    "foldmesh-prometheus:local",
    "foldmesh-base:bookworm",
];

struct Out {
    ok: bool,
    text: String,
}

fn sh(cmd: &mut Command) -> Out {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        ok: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn must(cmd: &mut Command) -> String {
    let o = sh(cmd);
    assert!(o.ok, "{cmd:?} failed:\n{}", o.text);
    o.text
}

/// Leases of namespace-test slots (lock files holding our pid), released on drop.
struct Leases(Vec<PathBuf>);

impl Leases {
    fn take() -> Leases {
        std::fs::create_dir_all(LOCK_DIR).expect("create the slot lock directory (root needed)");
        let mut held = Leases(Vec::new());
        for slot in SLOTS {
            let path = PathBuf::from(format!("{LOCK_DIR}/{slot}.lock"));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path);
                if let Ok(mut f) = f {
                    use std::io::Write;
                    writeln!(f, "{}", std::process::id()).expect("write the lock");
                    held.0.push(path);
                    break;
                }
                let owner = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                if owner.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                assert!(
                    Instant::now() < deadline,
                    "test network slot {slot} stays held by pid {owner:?}"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        held
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The Docker engine: the running one, or one this test starts (and stops).
struct Engine {
    started: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Engine {
    fn ensure() -> Engine {
        if sh(Command::new("docker").arg("info")).ok {
            return Engine {
                started: None,
                _dir: None,
            };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("dockerd log");
        let child = Command::new("dockerd")
            .args([
                "--bip",
                "198.19.244.1/24",
                "--default-address-pool",
                "base=198.19.246.0/24,size=24",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--pidfile",
            ])
            .arg(dir.path().join("dockerd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (scripts/install-test-tools.sh installs docker.io)");
        let engine = Engine {
            started: Some(child),
            _dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sh(Command::new("docker").arg("info")).ok {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        engine
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(child) = &mut self.started {
            // SIGTERM: dockerd stops its containers and cleans up its network.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The compose project: `docker-compose -p foldmesh-e2e -f docker-compose.yml -f
/// deploy/compose.no-registry.yml -f <this test's override>`. Dropped: `down -v`, images removed.
struct Compose {
    files: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Compose {
    fn new() -> Compose {
        let dir = tempfile::tempdir().expect("tempdir");
        // The only change for the test: pings every 2 s, so a frozen sidecar is found dead in
        // seconds rather than the default 45 s (3 × 15 s).
        let mut text = String::from("version: \"3.8\"\nservices:\n");
        for s in ["sidecar-a", "sidecar-b", "sidecar-c"] {
            text.push_str(&format!(
                "  {s}:\n    environment:\n      FOLD_SIDECAR_PING_INTERVAL_SECS: \"2\"\n      FOLD_SIDECAR_PING_MAX_FAILURES: \"3\"\n"
            ));
        }
        let test_file = dir.path().join("compose.e2e.yml");
        std::fs::write(&test_file, text).expect("write the override");
        Compose {
            files: vec![
                repo().join("docker-compose.yml"),
                repo().join("deploy/compose.no-registry.yml"),
                test_file,
            ],
            _dir: dir,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(tool("docker-compose"));
        c.current_dir(repo()).args(["-p", PROJECT]);
        for f in &self.files {
            c.arg("-f").arg(f);
        }
        c
    }

    fn run(&self, args: &[&str]) -> String {
        must(self.cmd().args(args))
    }

    /// `docker-compose exec -T <service> <args>` with `stdin` fed in.
    fn exec(&self, service: &str, args: &[&str], stdin: Option<&Path>) -> Out {
        let mut c = self.cmd();
        c.args(["exec", "-T", service]).args(args);
        if let Some(p) = stdin {
            c.stdin(std::fs::File::open(p).expect("stdin file"));
        } else {
            c.stdin(Stdio::null());
        }
        let out = c.output().expect("docker-compose exec");
        Out {
            ok: out.status.success(),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    fn containers(&self) -> Vec<String> {
        self.run(&["ps", "-q"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Every container running and healthy, within `limit`.
    fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ids = self.containers();
            let mut c = Command::new("docker");
            c.args([
                "inspect",
                "-f",
                "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
            ])
            .args(&ids);
            let states = must(&mut c);
            let all = ids.len() == 7 && states.lines().all(|l| l.ends_with(" running healthy"));
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containers not all healthy within {limit:?}:\n{states}\n{}",
                self.run(&["logs", "--tail", "30"])
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = sh(self
            .cmd()
            .args(["down", "-v", "--remove-orphans", "-t", "5"]));
        let _ = sh(Command::new("docker").arg("rmi").args(IMAGES));
    }
}

/// Poll `f` until it returns Some, at most `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn node_id(addr: &str) -> String {
    network(addr)
        .status(fold_proto::v1::NetworkStatusRequest {})
        .await
        .expect("Network.Status")
        .into_inner()
        .node_id
}

/// A query from `from` forwarded to node `to`: the records, or the gRPC status.
async fn forwarded(from: &str, to: &str) -> Result<Vec<(String, Json)>, tonic::Status> {
    let mut q = query_req(SCHEMA, &["sensor_id", "celsius"], None);
    q.target_node_id = to.to_string();
    let mut req = tonic::Request::new(q);
    req.set_timeout(Duration::from_secs(8));
    fold(from).query(req).await.map(|r| records(r.get_ref()))
}

/// Forwarding from A to B answers B's record again, within 30 s.
async fn forwarding_heals(b: &str, after: &str) {
    eventually(
        &format!("forwarding A → B after {after}"),
        Duration::from_secs(30),
        || async {
            match forwarded(A, b).await {
                Ok(r) if r.iter().any(|(k, _)| k == "b-1") => Ok(()),
                Ok(r) => Err(format!("answered without B's record: {r:?}")),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            }
        },
    )
    .await;
}

/// Every peer `addr`'s node knows, or why the list could not be had (a failed call is never an
/// empty list: "no peer connected" must come from the node).
async fn peers(addr: &str) -> Result<Vec<fold_proto::v1::PeerInfo>, String> {
    let mut req = tonic::Request::new(fold_proto::v1::ListPeersRequest {
        include_disconnected: true,
    });
    req.set_timeout(Duration::from_secs(10));
    network(addr)
        .list_peers(req)
        .await
        .map(|r| r.into_inner().peers)
        .map_err(|s| format!("ListPeers on {addr}: {:?}: {}", s.code(), s.message()))
}

/// No peer shown connected while it is not: every peer `addr` shows connected answers a
/// forwarded query (a connection just made may take a moment, so each gets a few seconds).
async fn connected_peers_answer(addr: &str, after: &str) {
    // A node whose sidecar (or itself) just restarted may take a moment to see its sidecar again
    // (its link reconnects with a short backoff): until then ListPeers is an honest UNAVAILABLE.
    let list = eventually(
        &format!("ListPeers on {addr} after {after}"),
        Duration::from_secs(15),
        || peers(addr),
    )
    .await;
    for p in list.into_iter().filter(|p| p.connected) {
        eventually(
            &format!("{addr} shows {} connected after {after}", p.node_id),
            Duration::from_secs(10),
            || async {
                // Any answer of the peer's own (its data, or its refusal: C serves no such
                // schema) shows the connection works; UNAVAILABLE or a timeout does not.
                match forwarded(addr, &p.node_id).await {
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ) =>
                    {
                        Err(format!("{:?}: {}", s.code(), s.message()))
                    }
                    _ => Ok(()),
                }
            },
        )
        .await;
    }
}

fn prometheus_targets() -> Result<Vec<(String, String)>, String> {
    let (code, body) =
        foldmesh_e2e::http::get("127.0.0.1:9090", "/api/v1/targets").map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}"));
    }
    let v: Json = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(v["data"]["activeTargets"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["labels"]["instance"].as_str().unwrap_or("").to_string(),
                        t["health"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The value of a Prometheus instant query with one result.
fn prometheus_value(query: &str) -> Result<f64, String> {
    let path = format!("/api/v1/query?query={}", foldmesh_e2e::http::encode(query));
    let (code, body) =
        foldmesh_e2e::http::get("127.0.0.1:9090", &path).map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}: {body}"));
    }
    let v: Json = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|x| x.parse::<f64>().ok())
        .ok_or_else(|| format!("no sample: {body}"))
}

/// The image the chart names is the one built here: its containers' commands run in it, every
/// `FOLD_*` variable the chart sets is one the command reads (its `--help` lists the env twin),
/// every port the chart declares is one the image exposes, and the chart's user is the image's.
fn chart_runs_this_image() {
    let text = must(
        Command::new(tool("helm"))
            .args(["template", "mesh"])
            .arg(repo().join("helm/fold-node")),
    );
    let sts = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .find(|d: &serde_yaml::Value| d["kind"] == "StatefulSet")
        .expect("the chart renders a StatefulSet");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(10001));
    let containers: Vec<&serde_yaml::Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| pod[*k].as_sequence())
        .flatten()
        .collect();
    assert_eq!(containers.len(), 2, "fold-node and its sidecar");
    for c in containers {
        let image = c["image"].as_str().expect("an image");
        let cfg: Json = serde_json::from_str(&must(Command::new("docker").args([
            "image",
            "inspect",
            "-f",
            "{{json .Config}}",
            image,
        ])))
        .expect("image config");
        assert_eq!(cfg["User"], "10001:10001", "{image} runs as non-root");
        assert_eq!(cfg["Cmd"], json!(["fold-node"]));
        for port in c["ports"].as_sequence().into_iter().flatten() {
            let key = format!(
                "{}/{}",
                port["containerPort"].as_u64().expect("a port"),
                port["protocol"]
                    .as_str()
                    .unwrap_or("TCP")
                    .to_ascii_lowercase()
            );
            assert!(
                cfg["ExposedPorts"].get(&key).is_some(),
                "{image} exposes {key}"
            );
        }
        let cmd = c["command"][0].as_str().expect("a command");
        let help = must(Command::new("docker").args([
            "run",
            "--rm",
            "--network",
            "none",
            image,
            cmd,
            "--help",
        ]));
        for env in c["env"].as_sequence().into_iter().flatten() {
            let name = env["name"].as_str().unwrap_or_default();
            if name.starts_with("FOLD_") {
                assert!(
                    help.contains(&format!("[env: {name}=")),
                    "the chart sets {name} for {cmd}, which does not read it"
                );
            }
        }
    }
}

#[test]
fn the_compose_mesh_runs_heals_and_leaves_nothing_behind() {
    let started = Instant::now();
    let _leases = Leases::take();
    let _engine = Engine::ensure();
    let bins = foldmesh_e2e::process::bin_path("fold-node");
    let bin_dir = bins.parent().expect("target/<profile>");
    foldmesh_e2e::process::bin_path("p2p-sidecar");
    foldmesh_e2e::process::bin_path("foldctl");
    let compose = Compose::new();
    must(
        Command::new(repo().join("scripts/docker-image.sh"))
            .arg("--bin-dir")
            .arg(bin_dir),
    );
    chart_runs_this_image();
    compose.run(&["build", "prometheus"]);
    compose.run(&["up", "-d"]);
    compose.wait_healthy(Duration::from_secs(120));
    eprintln!("mesh healthy after {:?}", started.elapsed());

    // The host reaches node A on its published port with grpcurl.
    let status =
        must(Command::new(tool("grpcurl")).args(["-plaintext", A, "fold.v1.Network/Status"]));
    assert!(status.contains("nodeId"), "{status}");

    // The owner path: load and approve the schema on A and B inside their containers; C loads
    // it without approving (it serves nothing, but routed reads from C have the definition to
    // check providers against).
    let schema_file = repo().join("examples/schemas/sensor_readings.json");
    for (svc, approve) in [("node-a", true), ("node-b", true), ("node-c", false)] {
        let mut args = vec![
            "foldctl",
            "--addr",
            "unix:/data/owner.sock",
            "schema",
            "load",
            "/dev/stdin",
        ];
        if approve {
            args.push("--approve");
        }
        let o = compose.exec(svc, &args, Some(&schema_file));
        assert!(o.ok, "schema load on {svc}: {}", o.text);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(walk_through(&compose));
    eprintln!("walk-through done after {:?}", started.elapsed());

    // down -v leaves nothing behind.
    compose.run(&["down", "-v", "-t", "5"]);
    let label = format!("label=com.docker.compose.project={PROJECT}");
    for what in [
        vec!["ps", "-aq", "--filter", &label],
        vec!["network", "ls", "-q", "--filter", &label],
        vec!["volume", "ls", "-q", "--filter", &label],
    ] {
        let left = must(Command::new("docker").args(&what));
        assert!(
            left.trim().is_empty(),
            "docker {what:?} after down -v: {left}"
        );
    }
    eprintln!("total {:?}", started.elapsed());
}

async fn walk_through(compose: &Compose) {
    let (a, b, c) = (node_id(A).await, node_id(B).await, node_id(C).await);

    // B's data, written by a data client of B's published port (distance 1 may write these
    // two fields; `location` needs the owner).
    let m = mutate_req(
        SCHEMA,
        MutationType::Create,
        json!({"sensor_id": "b-1", "celsius": 21.5}),
    );
    fold(B).mutate(m).await.expect("mutate on B");

    // A query from A forwarded to B returns B's record.
    forwarding_heals(&b, "start").await;

    // A routed read from C, which holds the definition but serves no data, finds a provider.
    eventually(
        "a ROUTE_ANY read from C",
        Duration::from_secs(30),
        || async {
            let mut q = query_req(SCHEMA, &["sensor_id"], None);
            q.route = Route::Any as i32;
            fold(C)
                .query(q)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        },
    )
    .await;

    // Prometheus: every node and sidecar target up.
    eventually("Prometheus targets up", Duration::from_secs(30), || async {
        let t = prometheus_targets()?;
        let up = t.iter().filter(|(_, h)| h == "up").count();
        if t.len() == 6 && up == 6 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;

    // No node keeps another host's loopback or link-local addresses (identify reports them).
    for addr in [A, B, C] {
        for p in peers(addr).await.unwrap_or_else(|e| panic!("{e}")) {
            assert!(
                p.addrs.iter().all(|a| !a.starts_with("/ip4/127.")
                    && !a.starts_with("/ip6/::1/")
                    && !a.starts_with("/ip4/169.254.")),
                "{addr} keeps a host-local address of {}: {:?}",
                p.node_id,
                p.addrs
            );
        }
    }

    // Killed sidecar: an honest UNAVAILABLE, then recovery after start.
    compose.run(&["kill", "sidecar-b"]);
    eventually(
        "UNAVAILABLE from A with B's sidecar killed",
        Duration::from_secs(30),
        || async {
            match forwarded(A, &b).await {
                Err(s) if s.code() == tonic::Code::Unavailable => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    compose.run(&["start", "sidecar-b"]);
    forwarding_heals(&b, "docker-compose start sidecar-b").await;

    // A frozen sidecar answers no pings: A shows it disconnected within a few ping intervals.
    compose.run(&["pause", "sidecar-b"]);
    eventually(
        "A shows frozen B disconnected",
        Duration::from_secs(20),
        || async {
            match peers(A).await?.iter().find(|p| p.node_id == b) {
                Some(p) if !p.connected => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // The metrics say so too (Prometheus scrapes every 5 s).
    eventually(
        "sidecar-a's metrics count the dead connection",
        Duration::from_secs(30),
        || async {
            let v = prometheus_value(
                "fold_sidecar_dead_connections_closed_total{instance=\"sidecar-a:9465\"}",
            )?;
            if v >= 1.0 {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;
    compose.run(&["unpause", "sidecar-b"]);
    forwarding_heals(&b, "docker-compose unpause sidecar-b").await;

    // A sidecar that lost every connection is named by `foldctl check` inside its node.
    compose.run(&["pause", "sidecar-a", "sidecar-c"]);
    eventually("B holds no connection", Duration::from_secs(20), || async {
        let n = peers(B).await?.iter().filter(|p| p.connected).count();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} connected"))
        }
    })
    .await;
    let check = compose.exec(
        "node-b",
        &["foldctl", "--addr", "unix:/data/owner.sock", "check"],
        None,
    );
    assert!(!check.ok, "check passed with no connection: {}", check.text);
    assert!(
        check.text.contains("[ERROR] peers: no connected peers") && check.text.contains(&b),
        "{}",
        check.text
    );
    compose.run(&["unpause", "sidecar-a", "sidecar-c"]);
    forwarding_heals(&b, "unpausing A and C").await;

    // Restarts of B's containers heal by themselves, with no peer shown connected falsely.
    for svc in ["node-b", "sidecar-b"] {
        compose.run(&["restart", "-t", "5", svc]);
        forwarding_heals(&b, &format!("docker-compose restart {svc}")).await;
        connected_peers_answer(A, &format!("restart {svc}")).await;
        connected_peers_answer(B, &format!("restart {svc}")).await;
    }
    let _ = (a, c);
}
