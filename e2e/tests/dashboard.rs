//! What an operator sees, end to end with the real binaries on loopback: `foldctl dashboard`
//! against a five-node mesh with a denied link and a failing replica, rendered by headless
//! Chromium (the page's DOM asserted, a screenshot saved); a peer that advertises markup as its
//! agent version rendered as text; `check` naming the failing replica's real cause and finding
//! the admin ports the node reports; piped tables whole; the dashboard calling no management RPC.

use foldmesh_e2e::tools::repo;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use foldmesh_e2e::foldctl::{self, Run};
use foldmesh_e2e::http;
use foldmesh_e2e::loopback::{Node, start};
use foldmesh_e2e::process::{Proc, bin_path};
use serde_json::Value as Json;

const SENSORS: &str = "examples/schemas/sensor_readings.json";

/// foldctl against `addr`, stdout piped (not a terminal), COLUMNS narrow.
fn ctl(addr: &str, args: &[&str]) -> Run {
    foldctl::ctl_in(addr, args, "40")
}

fn ok(addr: &str, args: &[&str]) -> Run {
    foldctl::ok_in(addr, args, "40")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn linked(n: &Node) {
    wait_for("the sidecar link", || {
        ctl(&n.node.grpc, &["status"]).code == 0
    });
}

/// `foldctl dashboard` on free loopback port: the process and its `host:port`.
fn dashboard(addr: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin_path("foldctl"));
    cmd.args([
        "--addr",
        addr,
        "dashboard",
        "--listen",
        "127.0.0.1:0",
        "--interval",
        "1s",
    ])
    .args(extra)
    .current_dir(repo());
    let (p, line) = Proc::spawn(cmd, "foldctl dashboard:", Duration::from_secs(20)).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no URL in {line}"));
    let hostport = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    (p, hostport)
}

fn view(hostport: &str) -> Json {
    let (code, body) = http::get(hostport, "/api/view").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

/// Headless Chromium on `url` with every background service off, a dead proxy for anything but
/// loopback and no name resolution, so it talks to the dashboard and nothing else. `mode`:
/// `--dump-dom` or `--screenshot=PATH`.
fn chrome(url: &str, mode: &str) -> String {
    let chrome = chromium().expect("chromium is installed (scripts/install-test-tools.sh)");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--no-pings",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--window-size=1500,1000",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", dir.path().display()))
        .arg(mode)
        .arg(url)
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The head of `GET /` with this Host header, lower-cased.
fn raw_get(hostport: &str, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Requests the node answered for its management RPCs (must not move while the dashboard runs).
fn management_calls(admin: &str) -> f64 {
    let (_, text) = http::get(admin, "/metrics").unwrap();
    [
        "Dial",
        "Disconnect",
        "SetTrust",
        "LoadSchema",
        "SetSchemaState",
    ]
    .iter()
    .map(|m| {
        text.lines()
            .filter(|l| l.starts_with("grpc_server_handled_total{"))
            .filter(|l| l.contains(&format!("grpc_method=\"{m}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    })
    .sum()
}

#[test]
fn dashboard_check_and_tables_on_a_five_node_mesh() {
    // B owns SensorReadings and denies A; A follows it (a failing replica) and denies E.
    let b = start(&[]);
    let c = start(&[]);
    let d = start(&[]);
    let e = start(&[]);
    let follow = format!("SensorReadings@{}", b.id);
    let a = start(&["--follow", &follow]);
    for n in [&a, &b, &c, &d, &e] {
        linked(n);
    }
    let (aa, ba) = (a.node.grpc.as_str(), b.node.grpc.as_str());
    ok(ba, &["schema", "load", SENSORS, "--approve"]);
    ok(aa, &["schema", "load", SENSORS, "--approve"]);
    // Every node trusts every other (a node denies unknown peers by default), except two
    // refusals: B denies A, and A denies E.
    let all = [&a, &b, &c, &d, &e];
    for x in all {
        for y in all.iter().filter(|y| y.id != x.id) {
            let trust = if (x.id == b.id && y.id == a.id) || (x.id == a.id && y.id == e.id) {
                "deny"
            } else {
                "1"
            };
            ok(&x.node.grpc, &["trust", "set", &y.id, trust]);
        }
    }
    for n in [&b, &c, &d, &e] {
        ok(aa, &["dial", &n.p2p]);
    }
    ok(ba, &["dial", &c.p2p]);

    // check names the replica and its real cause (the source does not trust this node), once.
    let mut report = Json::Null;
    wait_for("check to report the failing replica", || {
        let r = ctl(aa, &["check", "-o", "json"]);
        report = serde_json::from_str(&r.out).unwrap_or(Json::Null);
        r.code == 4
            && report["findings"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["check"] == "replica-untrusted"))
    });
    let finding = |check: &str| -> Json {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .cloned()
            .unwrap_or_else(|| panic!("no {check} finding in {report}"))
    };
    let rep = finding("replica-untrusted");
    let what = rep["what"].as_str().unwrap();
    assert!(
        what.contains("SensorReadings") && what.contains(&b.id) && what.contains("does not trust"),
        "{what}"
    );
    assert!(
        !what.contains(&format!("node {0}: node {0}:", b.id)),
        "the chain names the source once: {what}"
    );
    assert!(
        rep["fix"]
            .as_str()
            .unwrap()
            .starts_with(&format!("on node {}: foldctl trust set {}", b.id, a.id)),
        "{rep}"
    );
    // The admin ports come from the node (both on random ports here), not from defaults.
    let m = finding("metrics");
    assert_eq!(m["severity"], "ok", "{m}");
    assert!(m["what"].as_str().unwrap().contains(&a.node.admin), "{m}");
    let sm = finding("sidecar-metrics");
    assert_eq!(sm["severity"], "ok", "{sm}");
    assert!(
        sm["what"].as_str().unwrap().contains(&a.sidecar_admin),
        "{sm}"
    );
    // top finds the same ports: one sample of the node's and the sidecar's traffic.
    let top = ok(aa, &["top", "--interval", "200ms", "-o", "json"]);
    let sources: Vec<String> = serde_json::from_str::<Json>(&top.out)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["source"].as_str().unwrap().to_string())
        .collect();
    assert!(sources.contains(&a.node.admin), "{sources:?}");
    let text = ctl(aa, &["check"]).out;
    assert!(text.contains("[ERROR] replica-untrusted"), "{text}");

    // Piped tables are whole however narrow COLUMNS is; -o wide adds every column.
    let peers = ok(aa, &["peers"]).out;
    assert!(!peers.contains('…'), "{peers}");
    assert!(
        peers.lines().next().unwrap().contains("ROUTE_EWMA"),
        "{peers}"
    );
    for n in [&b, &c, &d, &e] {
        assert!(peers.contains(&n.id), "{peers}");
    }
    let wide = ok(aa, &["peers", "-o", "wide"]).out;
    assert!(
        wide.lines().next().unwrap().contains("PROTOCOLS") && wide.contains("/fold/"),
        "{wide}"
    );

    // The dashboard: the gathered view first, then the page as Chromium renders it.
    let before = management_calls(&a.node.admin);
    let (_dash, hostport) = dashboard(aa, &["--also", &d.node.grpc]);
    let ids: Vec<&str> = [&a, &b, &c, &d, &e].iter().map(|n| n.id.as_str()).collect();
    let mut v = Json::Null;
    wait_for("the dashboard to see the whole mesh", || {
        v = view(&hostport);
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        ids.iter().all(|id| nodes.iter().any(|n| n["id"] == *id))
            && v["problems"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["check"] == "replica-untrusted"))
            && nodes
                .iter()
                .any(|n| n["asked"] == true && n["traffic"].is_object())
            // B, not asked itself, serves the schema: found through FindProviders.
            && nodes.iter().any(|n| {
                n["id"] == b.id.as_str()
                    && n["schemas"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s == "SensorReadings"))
            })
    });
    assert_eq!(v["self_id"], a.id.as_str());
    let node = |id: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(node(&a.id)["this"], true);
    // --also: D's own status is read too.
    assert_eq!(node(&d.id)["asked"], true, "{v}");
    assert_eq!(node(&c.id)["asked"], false, "{v}");
    assert_eq!(node(&e.id)["state"], "denied", "{v}");
    assert_eq!(node(&c.id)["state"], "ok", "{v}");
    // B refuses to show its peers to A (it denies A): marked too, with the reason.
    assert_eq!(node(&b.id)["state"], "denied", "{v}");
    assert!(
        node(&b.id)["state_detail"]
            .as_str()
            .unwrap()
            .starts_with("PERMISSION_DENIED"),
        "{v}"
    );
    assert!(
        v["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["denied"] == true
                && [&l["from"], &l["to"]].contains(&&Json::from(e.id.as_str()))),
        "the A–E link is denied: {v}"
    );
    let replica = &node(&a.id)["replicas"][0];
    assert_eq!(replica["cause"], "not trusted by the source", "{replica}");

    // Served with a CSP that allows only the page's own script; a foreign Host is refused.
    assert!(
        raw_get(&hostport, "127.0.0.1")
            .contains("content-security-policy: default-src 'none'; script-src 'self'")
    );
    assert!(raw_get(&hostport, "rebind.example").starts_with("http/1.1 403"));

    let url = format!("http://{hostport}/");
    let dom = chrome(&url, "--dump-dom");
    assert!(dom.contains("data-ready=\"1\""), "the page rendered: {dom}");
    for id in &ids {
        assert!(
            dom.contains(&format!("data-node-id=\"{id}\"")),
            "{id} drawn: {dom}"
        );
    }
    assert!(dom.contains(">this node<"), "this node marked");
    assert!(
        dom.contains("class=\"link denied\""),
        "the denied link drawn"
    );
    assert!(dom.contains("class=\"node denied\""), "a denied node drawn");
    assert!(
        dom.contains("data-check=\"replica-untrusted\"")
            && dom.contains("not trusted by the source"),
        "the problem list names the replica"
    );
    assert!(dom.contains(" ms<"), "edges labelled with RTT");
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chrome(&url, &format!("--screenshot={}", png.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png).expect("chromium saved a screenshot"),
    ));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (1500, 1000));
    eprintln!("dashboard screenshot: {}", png.display());

    // Read-only: not one management call while the dashboard ran.
    assert_eq!(management_calls(&a.node.admin), before);
}

/// A peer that says it is `<script>…` in its agent version.
const PAYLOAD: &str =
    "<script>document.title='XSS'</script><img src=x onerror=\"document.title='XSS'\">";

#[derive(libp2p::swarm::NetworkBehaviour)]
struct Liar {
    identify: libp2p::identify::Behaviour,
    ping: libp2p::ping::Behaviour,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_advertising_markup_is_shown_as_text() {
    use futures::StreamExt;
    let a = start(&[]);
    linked(&a);
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| Liar {
            identify: libp2p::identify::Behaviour::new(
                libp2p::identify::Config::new("/fold/id/1.0.0".into(), key.public())
                    .with_agent_version(PAYLOAD.into()),
            ),
            ping: libp2p::ping::Behaviour::default(),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm
        .dial(a.p2p.parse::<libp2p::Multiaddr>().unwrap())
        .unwrap();
    let driver = tokio::spawn(async move {
        loop {
            let _ = swarm.select_next_some().await;
        }
    });
    let aa = a.node.grpc.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the node to know the liar's agent", || {
            ctl(&aa, &["peers", "-o", "json"])
                .out
                .contains("document.title")
        });
        let (_dash, hostport) = dashboard(&aa, &["--hops", "0"]);
        wait_for("the dashboard to show the liar", || {
            view(&hostport)["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["agent"] == PAYLOAD))
        });
        let dom = chrome(&format!("http://{hostport}/"), "--dump-dom");
        assert!(dom.contains("data-ready=\"1\""), "the page rendered: {dom}");
        // The agent is text in the page, and none of it ran.
        assert!(
            dom.contains("&lt;script&gt;document.title='XSS'&lt;/script&gt;&lt;img src=x"),
            "the agent shown as text: {dom}"
        );
        assert!(dom.contains("<title>foldmesh dashboard</title>"), "{dom}");
        assert!(!dom.contains("<img"), "no image element from the agent");
        assert_eq!(
            dom.matches("<script").count(),
            1,
            "only the page's own script"
        );
    })
    .await
    .unwrap();
    driver.abort();
}
