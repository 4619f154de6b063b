//! foldctl end to end: the real `foldctl` binary against real fold-nodes and p2p-sidecars on
//! loopback. Every command runs in `-o table` and `-o json` with assertions on the output; exit
//! codes; `check` against seeded problems (no sidecar, unapproved schema, wrong metrics port, TLS
//! misconfiguration); mutual TLS.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use foldmesh_e2e::foldctl::{ctl, ok};
use foldmesh_e2e::process::{NodeProc, Proc, bin_path, parse_kv};
use foldmesh_e2e::tools::repo;
use serde_json::{Value as Json, json};

/// A table with each run of spaces squashed to one, for assertions on rows.
fn squash(t: &str) -> String {
    t.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Both output modes of one command: (table text, JSON).
fn both(addr: &str, args: &[&str]) -> (String, Json) {
    let table = ok(addr, args).out;
    let mut j: Vec<&str> = args.to_vec();
    j.extend(["-o", "json"]);
    (table, ok(addr, &j).json())
}

/// A fold-node with its p2p-sidecar on loopback.
struct Pair {
    node: NodeProc,
    _sidecar: Proc,
    node_id: String,
    p2p: String,
    sidecar_admin: String,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn start() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Command::new(bin_path("p2p-sidecar"));
        sidecar.arg("--data-dir").arg(dir.path()).args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        let (sidecar, ready) =
            Proc::spawn(sidecar, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
        let node_id = parse_kv(&ready, "node_id").unwrap();
        let listen = parse_kv(&ready, "listen").unwrap();
        let sidecar_admin = parse_kv(&ready, "admin").unwrap();
        let node = NodeProc::start(dir.path(), &[]).unwrap();
        let p = Pair {
            p2p: format!("{}/p2p/{node_id}", listen.split(',').next().unwrap()),
            node,
            _sidecar: sidecar,
            node_id,
            sidecar_admin,
            _dir: dir,
        };
        // The node has found its sidecar when Network.Status answers.
        wait_for(
            || ctl(&p.node.grpc, &["status"]).code == 0,
            "the sidecar link",
        );
        p
    }
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SENSORS: &str = "examples/schemas/sensor_readings.json";

#[test]
fn every_command_in_both_output_modes() {
    let a = Pair::start();
    let b = Pair::start();
    let addr = a.node.grpc.as_str();

    // schema load / list / get / approve / block / unload
    let r = ok(addr, &["schema", "load", SENSORS]);
    assert!(
        r.out
            .contains("schema SensorReadings loaded: state available"),
        "{}",
        r.out
    );
    let j = ok(
        addr,
        &["schema", "load", SENSORS, "--approve", "-o", "json"],
    )
    .json();
    assert_eq!(j["name"], "SensorReadings");
    assert_eq!(j["created"], false, "identical content is a no-op: {j}");
    let (t, j) = both(addr, &["schema", "list"]);
    assert!(
        t.starts_with("NAME") && squash(&t).contains("SensorReadings approved Range sensor_id"),
        "{t}"
    );
    assert_eq!(j[0]["name"], "SensorReadings");
    assert_eq!(j[0]["range_key"], "sensor_id");
    assert_eq!(j[0]["fields"], json!(["celsius", "location", "sensor_id"]));
    let (t, j) = both(addr, &["schema", "get", "SensorReadings"]);
    assert!(
        t.contains("\"schema_type\"") || t.contains("\"fields\""),
        "{t}"
    );
    assert_eq!(j["definition"]["name"], "SensorReadings");
    assert_eq!(j["state"], "approved");
    let r = ok(addr, &["schema", "block", "SensorReadings"]);
    assert_eq!(r.out.trim(), "schema SensorReadings: approved -> blocked");
    let j = ok(addr, &["schema", "unload", "SensorReadings", "-o", "json"]).json();
    assert_eq!(
        j,
        json!({"name": "SensorReadings", "state": "available", "previous_state": "blocked"})
    );
    let (_, j) = both(addr, &["schema", "list", "--state", "available"]);
    assert_eq!(j.as_array().unwrap().len(), 1);
    ok(addr, &["schema", "approve", "SensorReadings"]);
    let (t, j) = both(addr, &["schema", "list", "--state", "blocked"]);
    assert_eq!(j, json!([]));
    assert!(t.starts_with("NAME"));

    // mutate: create, update (inline and @file), delete
    let r = ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            r#"{"sensor_id": "greenhouse-1", "celsius": 21.5, "location": "north wall"}"#,
        ],
    );
    assert!(
        r.out.contains("created key greenhouse-1 on node") && r.out.contains("celsius"),
        "{}",
        r.out
    );
    let j = ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            r#"{"sensor_id": "greenhouse-2", "celsius": 19}"#,
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(j["key"], "greenhouse-2");
    assert_eq!(j["node_id"], a.node_id.as_str());
    assert_eq!(
        j["fields"].as_array().unwrap().len(),
        j["version_ids"].as_array().unwrap().len()
    );
    let data = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        data.path(),
        r#"{"sensor_id": "greenhouse-1", "celsius": 22.25}"#,
    )
    .unwrap();
    let at = format!("@{}", data.path().display());
    let j = ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "update",
            "--data",
            &at,
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(j["fields"], json!(["celsius"]));
    ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            r#"{"sensor_id": "shed-1", "celsius": 5}"#,
        ],
    );
    let r = ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "delete",
            "--data",
            r#"{"sensor_id": "shed-1"}"#,
        ],
    );
    assert!(r.out.starts_with("deleted key shed-1"), "{}", r.out);

    // --idempotency-key: a retry is applied once and says so.
    let retry = [
        "mutate",
        "SensorReadings",
        "create",
        "--data",
        r#"{"sensor_id": "retry-1", "celsius": 9007199254740993}"#,
        "--idempotency-key",
        "retry-1-create",
    ];
    let first = ok(addr, &retry);
    assert!(!first.out.contains("replayed"), "{}", first.out);
    let again = ok(addr, &retry);
    assert!(again.out.contains("replayed"), "{}", again.out);
    let mut json_retry = retry.to_vec();
    json_retry.extend(["-o", "json"]);
    assert_eq!(ok(addr, &json_retry).json()["replayed"], true);
    // Values are sent and read exactly (JSON text, not doubles).
    let j = ok(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--key",
            "retry-1",
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(
        j["records"][0]["fields"]["celsius"].to_string(),
        "9007199254740993"
    );

    // mutate --batch: one mutation per JSONL line; a failure names its line.
    let batch = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = (0..120)
        .map(|i| format!(r#"{{"sensor_id": "zbatch-{i:03}", "celsius": {i}}}"#))
        .collect();
    std::fs::write(batch.path(), lines.join("\n") + "\n\n").unwrap();
    let bp = batch.path().display().to_string();
    let r = ok(
        addr,
        &["mutate", "SensorReadings", "create", "--batch", &bp],
    );
    assert_eq!(r.out.trim(), "120 mutation(s) applied");
    let j = ok(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--prefix",
            "zbatch-",
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(j["records"].as_array().unwrap().len(), 120);
    assert_eq!(j["records"][119]["fields"]["celsius"], 119);
    // A batch (one BatchMutate, all or nothing) where line 3 repeats an existing key: refused
    // whole, the line named, nothing written.
    let mixed = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        mixed.path(),
        "{\"sensor_id\": \"zmixed-1\", \"celsius\": 1}\n{\"sensor_id\": \"zmixed-2\", \"celsius\": 2}\n{\"sensor_id\": \"zbatch-000\", \"celsius\": 3}\n",
    )
    .unwrap();
    let mp = mixed.path().display().to_string();
    let r = ctl(
        addr,
        &["mutate", "SensorReadings", "create", "--batch", &mp],
    );
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(r.err.contains("at line 3"), "{}", r.err);
    let j = ok(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--prefix",
            "zmixed-",
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(j["records"].as_array().unwrap().len(), 0, "all or nothing");
    // Creating them again: the first line is refused (ALREADY_EXISTS), nothing after it runs.
    let r = ctl(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--batch",
            &bp,
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(
        r.err.contains("at line 1; 0 of 120") && r.err.contains("ALREADY_EXISTS"),
        "{}",
        r.err
    );
    let r = ctl(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            "{}",
            "--batch",
            &bp,
        ],
    );
    assert_eq!(r.code, 1, "--data and --batch exclude each other");

    // query: every filter, both modes, fields named or all
    let (t, j) = both(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "location",
            "--prefix",
            "greenhouse-",
        ],
    );
    assert!(
        t.contains("KEY") && squash(&t).contains("greenhouse-1 22.25 north wall"),
        "{t}"
    );
    assert!(t.contains("2 record(s) from node"), "{t}");
    assert_eq!(
        j["records"][0],
        json!({"key": "greenhouse-1", "fields": {"celsius": 22.25, "location": "north wall"}})
    );
    assert_eq!(j["records"][1]["fields"]["location"], Json::Null);
    let keys = |j: &Json| -> Vec<String> {
        j["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, j) = both(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--key",
            "greenhouse-2",
        ],
    );
    assert_eq!(keys(&j), ["greenhouse-2"]);
    let (_, j) = both(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--range",
            "greenhouse-1",
            "greenhouse-2",
        ],
    );
    assert_eq!(keys(&j), ["greenhouse-1"]);
    let (_, j) = both(
        addr,
        &[
            "query",
            "SensorReadings",
            "celsius",
            "--keys",
            "greenhouse-2,nope",
        ],
    );
    assert_eq!(keys(&j), ["greenhouse-2"]);
    let (_, j) = both(
        addr,
        &["query", "SensorReadings", "celsius", "--pattern", "g*-?"],
    );
    assert_eq!(keys(&j), ["greenhouse-1", "greenhouse-2"]);
    let (t, j) = both(addr, &["query", "SensorReadings"]);
    let header: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["KEY", "celsius", "location", "sensor_id"], "{t}");
    assert_eq!(j["records"][0]["fields"]["sensor_id"], "greenhouse-1");

    // history
    let (t, j) = both(
        addr,
        &["history", "SensorReadings", "celsius", "greenhouse-1"],
    );
    assert!(t.starts_with("WRITTEN_AT"), "{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[1].contains("update") && lines[1].contains("22.25") && lines[2].contains("create"),
        "{t}"
    );
    assert_eq!(j.as_array().unwrap().len(), 2);
    assert_eq!(j[0]["value"], 22.25);
    assert_eq!(j[0]["mutation"], "update");
    assert_eq!(j[0]["writer"], "client:local");
    assert_eq!(j[0]["previous_version_id"], j[1]["version_id"]);
    assert!(j[0]["written_at"].as_str().unwrap().ends_with('Z'));
    let (_, j) = both(
        addr,
        &[
            "history",
            "SensorReadings",
            "celsius",
            "greenhouse-1",
            "--limit",
            "1",
        ],
    );
    assert_eq!(j.as_array().unwrap().len(), 1);
    let (t, j) = both(addr, &["history", "SensorReadings", "celsius", "shed-1"]);
    assert!(t.contains("(deleted)"), "{t}");
    assert_eq!(j[0]["deleted"], true);

    // status
    let (t, j) = both(addr, &["status"]);
    assert!(
        t.contains(&format!("node id           {}", a.node_id)),
        "{t}"
    );
    assert_eq!(j["node_id"], a.node_id.as_str());
    assert!(
        j["listen_addrs"][0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/127.0.0.1/tcp/")
    );

    // dial, peers, trust, check-schemas, providers, topology
    let (t, j) = both(addr, &["dial", &b.p2p]);
    assert!(t.starts_with(&format!("connected to {}", b.node_id)), "{t}");
    assert_eq!(j["node_id"], b.node_id.as_str());
    wait_for(
        || {
            ok(addr, &["peers", "-o", "json"])
                .json()
                .as_array()
                .is_some_and(|p| {
                    p.iter()
                        .any(|p| p["node_id"] == b.node_id.as_str() && p["rtt_micros"].is_u64())
                })
        },
        "a measured RTT to b",
    );
    let (t, j) = both(addr, &["peers"]);
    assert!(t.starts_with("NODE_ID") && t.contains("RTT"), "{t}");
    let row = t
        .lines()
        .find(|l| l.starts_with(&b.node_id))
        .expect("b in the table");
    assert!(
        row.contains("yes")
            && row.contains(" ms")
            && row.contains("deny")
            && row.contains("p2p-sidecar/"),
        "{row}"
    );
    let peer = &j
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == b.node_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(peer["connected"], true);
    assert_eq!(peer["connection"], "direct");
    assert_eq!(peer["transport"], "tcp");
    assert_eq!(peer["denied"], true);
    assert_eq!(peer["trust_distance"], Json::Null);
    let (t, j) = both(addr, &["peers", "--all"]);
    assert!(t.contains(&b.node_id));
    assert!(!j.as_array().unwrap().is_empty());

    let (t, j) = both(addr, &["trust", "set", &b.node_id, "2"]);
    assert_eq!(t.trim(), format!("{}: trust 2", b.node_id));
    assert_eq!(
        j,
        json!({"node_id": b.node_id, "distance": 2, "denied": false})
    );
    let (t, j) = both(addr, &["trust", "get"]);
    assert!(
        squash(&t).contains(&format!("{} 2", b.node_id)) && squash(&t).contains("(default) deny"),
        "{t}"
    );
    assert_eq!(j["default"]["denied"], true);
    assert_eq!(j["entries"][0]["distance"], 2);
    let (_, j) = both(addr, &["trust", "get", &b.node_id]);
    assert_eq!(j["entries"][0]["node_id"], b.node_id.as_str());
    let (_, j) = both(addr, &["trust", "set", &b.node_id, "deny"]);
    assert_eq!(j["denied"], true);
    let (t, _) = both(addr, &["trust", "remove", &b.node_id]);
    assert!(t.contains("entry removed"), "{t}");
    let j = ok(addr, &["trust", "get", "-o", "json"]).json();
    assert_eq!(j["entries"], json!([]));

    // b approves the schema and trusts a (denied peers learn nothing); a asks b which are
    // approved, and finds b as a provider.
    ok(&b.node.grpc, &["schema", "load", SENSORS, "--approve"]);
    ok(&b.node.grpc, &["trust", "set", &a.node_id, "1"]);
    let (t, j) = both(
        addr,
        &["check-schemas", &b.node_id, "SensorReadings", "Missing"],
    );
    assert!(
        squash(&t).contains("SensorReadings yes") && squash(&t).contains("Missing no"),
        "{t}"
    );
    assert_eq!(
        j,
        json!({"node_id": b.node_id, "approved": ["SensorReadings"]})
    );
    wait_for(
        || {
            ok(addr, &["providers", "SensorReadings", "-o", "json"]).json()["node_ids"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n == b.node_id.as_str()))
        },
        "b as a provider of SensorReadings",
    );
    let (t, j) = both(addr, &["providers", "SensorReadings"]);
    assert!(t.starts_with("NODE_ID") && t.contains(&b.node_id), "{t}");
    assert_eq!(j["schema"], "SensorReadings");
    ok(&b.node.grpc, &["trust", "remove", &a.node_id]);

    // Forwarded query and mutation (--node): b must trust a first.
    // Seeded: b denies a (unknown peers are denied by default). a's forwarded query is refused,
    // and each side's `check` names it: a sees the remote deny it, b a denied connected peer.
    let r = ctl(
        addr,
        &["query", "SensorReadings", "celsius", "--node", &b.node_id],
    );
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(r.err.contains("PERMISSION_DENIED"), "{}", r.err);
    let r = ctl(
        addr,
        &[
            "check",
            "--metrics-addr",
            &a.node.admin,
            "--sidecar-metrics-addr",
            &a.sidecar_admin,
        ],
    );
    assert_eq!(r.code, 4, "{}", r.out);
    assert!(
        r.out.contains(
            "[WARNING] remote-denies: 1 forwarded request(s) were refused PERMISSION_DENIED"
        ),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("[OK] clock-skew") && r.out.contains("[OK] sidecar-metrics"),
        "{}",
        r.out
    );
    let j = ctl(
        &b.node.grpc,
        &[
            "check",
            "--metrics-addr",
            &b.node.admin,
            "--sidecar-metrics-addr",
            &b.sidecar_admin,
            "-o",
            "json",
        ],
    )
    .json();
    let denied = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "peer-denied")
        .cloned();
    let denied = denied.unwrap_or_else(|| panic!("b's check names the denied peer: {j}"));
    assert!(
        denied["what"].as_str().unwrap().contains(&a.node_id),
        "{denied}"
    );
    assert_eq!(
        denied["fix"],
        format!("if it should be allowed: foldctl trust set {} 1", a.node_id)
    );
    ok(&b.node.grpc, &["trust", "set", &a.node_id, "0"]);
    let j = ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            r#"{"sensor_id": "remote-1", "celsius": 7}"#,
            "--node",
            &b.node_id,
            "-o",
            "json",
        ],
    )
    .json();
    assert_eq!(j["node_id"], b.node_id.as_str());
    let (t, j) = both(
        addr,
        &["query", "SensorReadings", "celsius", "--node", &b.node_id],
    );
    assert!(
        t.contains("remote-1") && t.contains(&format!("from node {}", b.node_id)),
        "{t}"
    );
    assert_eq!(keys(&j), ["remote-1"]);
    // By schema instead of by node: --all asks every node serving SensorReadings (a and b),
    // each row tagged with its node; --any asks one of them.
    let (t, j) = both(addr, &["query", "SensorReadings", "celsius", "--all"]);
    assert!(t.lines().next().unwrap().starts_with("NODE"), "{t}");
    assert!(t.contains("2 of 2 node(s) serving the schema"), "{t}");
    let row = t
        .lines()
        .find(|l| l.contains("remote-1"))
        .expect("b's record in --all");
    assert!(row.starts_with(&b.node_id), "{t}");
    let answers = j.as_array().expect("one answer per node");
    let mut nodes: Vec<&str> = answers
        .iter()
        .map(|a| a["node_id"].as_str().unwrap())
        .collect();
    nodes.sort();
    let mut both_ids = vec![a.node_id.as_str(), b.node_id.as_str()];
    both_ids.sort();
    assert_eq!(nodes, both_ids, "{j}");
    assert!(answers.iter().all(|a| a["error"].is_null()), "{j}");
    let j = ok(
        addr,
        &["query", "SensorReadings", "celsius", "--any", "-o", "json"],
    )
    .json();
    assert!(both_ids.contains(&j["node_id"].as_str().unwrap()), "{j}");
    let r = ctl(
        addr,
        &["query", "SensorReadings", "--any", "--node", &b.node_id],
    );
    assert_eq!(r.code, 1, "--any and --node together: {}", r.err);
    // History on b by name, and on every node.
    let (t, _) = both(
        addr,
        &[
            "history",
            "SensorReadings",
            "celsius",
            "remote-1",
            "--node",
            &b.node_id,
        ],
    );
    assert!(
        t.contains("peer:"),
        "b wrote remote-1 for a forwarded request: {t}"
    );
    let (t, j) = both(
        addr,
        &["history", "SensorReadings", "celsius", "remote-1", "--all"],
    );
    assert!(t.contains("2 of 2 node(s)"), "{t}");
    let with_versions: Vec<&Json> = j
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["versions"].as_array().is_some_and(|v| !v.is_empty()))
        .collect();
    assert_eq!(with_versions.len(), 1, "{j}");
    assert_eq!(with_versions[0]["node_id"], b.node_id.as_str());
    // After forwarding to b, the node keeps a circuit breaker for it: closed.
    let (t, j) = both(addr, &["peers", "--metrics-addr", &a.node.admin]);
    let row = t
        .lines()
        .find(|l| l.starts_with(&b.node_id))
        .expect("b in the table");
    assert!(
        t.lines().next().unwrap().contains("BREAKER") && squash(row).contains(" closed "),
        "{t}"
    );
    let peer = j
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == b.node_id.as_str())
        .unwrap();
    assert_eq!(peer["breaker"], "closed", "{peer}");
    let r = ctl(addr, &["peers", "--metrics-addr", "127.0.0.1:1"]);
    assert_eq!(r.code, 2, "{}", r.err);

    // topology: tree, JSON, DOT, SVG
    let (t, j) = both(addr, &["topology"]);
    assert!(
        t.starts_with(&format!("{} (this node)\n└── {}", a.node_id, b.node_id)),
        "{t}"
    );
    assert_eq!(j["node_id"], a.node_id.as_str());
    assert_eq!(j["peers"][0]["node_id"], b.node_id.as_str());
    let dot = ok(addr, &["topology", "--format", "dot"]).out;
    assert!(dot.starts_with("digraph mesh {"), "{dot}");
    assert!(
        dot.contains(&format!("\"{}\" -> \"{}\"", a.node_id, b.node_id)),
        "{dot}"
    );
    let svg = ok(addr, &["topology", "--format", "svg"]).out;
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert!(svg.contains(&a.node_id) && svg.contains(&b.node_id));
    let j = ok(addr, &["topology", "--format", "json"]).json();
    assert_eq!(j["peers"][0]["connected"], true);

    // Errors: the node's code and message on stderr, documented exit codes.
    let r = ctl(addr, &["query", "Nope", "x"]);
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(
        r.err.contains("NOT_FOUND") && r.err.contains("Nope"),
        "{}",
        r.err
    );
    assert!(r.out.is_empty());
    let r = ctl(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "update",
            "--data",
            r#"{"sensor_id": "absent", "celsius": 1}"#,
            "-o",
            "json",
        ],
    );
    assert_eq!(r.code, 3);
    assert!(r.err.contains("NOT_FOUND"), "{}", r.err);
    let r = ctl(
        addr,
        &["mutate", "SensorReadings", "create", "--data", "{not json"],
    );
    assert_eq!(r.code, 1);
    assert!(r.err.contains("not valid JSON"), "{}", r.err);
    let r = ctl(addr, &["query"]);
    assert_eq!(r.code, 1, "usage error: {}", r.err);
    let r = ctl(addr, &["query", "S", "f", "--key", "a", "--prefix", "b"]);
    assert_eq!(r.code, 1, "filters are exclusive: {}", r.err);
    let r = ctl("127.0.0.1:1", &["status"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(
        r.err.contains("UNAVAILABLE") && r.err.contains("127.0.0.1:1"),
        "{}",
        r.err
    );

    // FOLD_ADDR and FOLD_OUTPUT are the flags' twins; host:port and http:// both work.
    let out = Command::new(bin_path("foldctl"))
        .args(["schema", "list"])
        .env("FOLD_ADDR", format!("http://{addr}"))
        .env("FOLD_OUTPUT", "json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["name"], "SensorReadings");
}

#[test]
fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef foldctl"),
        ("fish", "complete -c foldctl"),
    ] {
        let r = ok("127.0.0.1:1", &["completions", shell]);
        assert!(
            r.out.contains(marker),
            "{shell}: {}",
            &r.out[..r.out.len().min(300)]
        );
        assert!(
            r.out.contains("topology") && r.out.contains("check-schemas"),
            "{shell}"
        );
    }
    let r = ok("127.0.0.1:1", &["--help"]);
    assert!(r.out.contains("Exit codes"), "{}", r.out);
}

#[test]
fn check_names_seeded_problems() {
    // A node without its sidecar, a schema loaded but not approved, and a wrong metrics port.
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let addr = node.grpc.as_str();
    ok(addr, &["schema", "load", SENSORS]);
    let r = ctl(
        addr,
        &[
            "check",
            "--metrics-addr",
            "127.0.0.1:1",
            "--sidecar-metrics-addr",
            "127.0.0.1:1",
        ],
    );
    assert_eq!(r.code, 4, "problems found: {}\n{}", r.out, r.err);
    assert!(
        r.out.contains("[ERROR] sidecar-link") && r.out.contains("p2p-sidecar"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("NOT_SERVING") && r.out.contains("fix: start p2p-sidecar"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains(
            "[WARNING] schema-approval: schema SensorReadings is loaded but not approved"
        ),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("foldctl schema approve SensorReadings"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("[WARNING] metrics") && r.out.contains("127.0.0.1:1"),
        "{}",
        r.out
    );
    let r = ctl(
        addr,
        &["check", "--metrics-addr", "127.0.0.1:1", "-o", "json"],
    );
    assert_eq!(r.code, 4);
    let j = r.json();
    assert_eq!(j["ok"], false);
    let sev = |check: &str| -> Vec<String> {
        j["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["check"] == check)
            .map(|f| f["severity"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(sev("sidecar-link"), ["error"]);
    assert_eq!(sev("schema-approval"), ["warning"]);
    assert_eq!(sev("metrics"), ["warning"]);
    assert!(
        j["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["what"].is_string() && f["fix"].is_string())
    );

    // Fix two of them: the metrics port is the node's admin port, the schema approved.
    ok(addr, &["schema", "approve", "SensorReadings"]);
    let r = ctl(
        addr,
        &["check", "--metrics-addr", &node.admin, "-o", "json"],
    );
    assert_eq!(r.code, 4, "the sidecar is still missing");
    let j = r.json();
    let find = |check: &str| {
        j["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("metrics")["severity"], "ok");
    assert_eq!(find("schema-approval")["severity"], "ok");
    assert_eq!(find("sidecar-link")["severity"], "error");

    // A healthy lone node: the only finding left is that it has no peers.
    let p = Pair::start();
    let r = ctl(
        &p.node.grpc,
        &[
            "check",
            "--metrics-addr",
            &p.node.admin,
            "--sidecar-metrics-addr",
            &p.sidecar_admin,
        ],
    );
    assert_eq!(r.code, 4, "{}", r.out);
    assert!(
        r.out.contains("[OK] sidecar-link")
            && r.out.contains("[WARNING] peers: no connected peers"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("[OK] metrics") && r.out.contains("[OK] rate-limit"),
        "{}",
        r.out
    );
    assert!(
        r.out.contains("[OK] sidecar-metrics") && r.out.contains("[OK] clock-skew"),
        "{}",
        r.out
    );
    let problems = r
        .out
        .lines()
        .filter(|l| l.starts_with("[WARNING]") || l.starts_with("[ERROR]"))
        .count();
    assert_eq!(problems, 1, "{}", r.out);

    // A node that cannot be reached at all.
    let r = ctl("127.0.0.1:1", &["check", "--metrics-addr", "127.0.0.1:1"]);
    assert_eq!(r.code, 4);
    assert!(
        r.out
            .contains("[ERROR] reachable: cannot connect to http://127.0.0.1:1"),
        "{}",
        r.out
    );
}

/// (CA PEM, server cert PEM, server key PEM, client cert PEM, client key PEM)
fn tls_material() -> (String, String, String, String, String) {
    let (ca, (cert, key), mut clients) = foldmesh_e2e::tls::material(&["ops"]);
    let (_, ccert, ckey) = clients.remove(0);
    (ca, cert, key, ccert, ckey)
}

#[test]
fn tls_and_mutual_tls_and_their_misconfigurations() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key, ccert, ckey) = tls_material();
    let (other_ca, _, _, stranger_cert, stranger_key) = tls_material();
    let p = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca, cert, key, ccert, ckey, other_ca) = (
        p("ca.pem", &ca),
        p("server.pem", &cert),
        p("server.key", &key),
        p("client.pem", &ccert),
        p("client.key", &ckey),
        p("other-ca.pem", &other_ca),
    );
    let (stranger_cert, stranger_key) = (
        p("stranger.pem", &stranger_cert),
        p("stranger.key", &stranger_key),
    );
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let node = NodeProc::start(
        &data,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            // The client certificate "ops" is the node's owner (and so may manage it).
            "--trust",
            "ops=0",
        ],
    )
    .unwrap();
    let port = node.grpc.rsplit(':').next().unwrap().to_string();
    let https = format!("https://localhost:{port}");

    // Mutual TLS: the CA, a client certificate, both output modes.
    let mtls = ["--tls-ca", &ca, "--tls-cert", &ccert, "--tls-key", &ckey];
    let mut args: Vec<&str> = mtls.to_vec();
    args.extend(["schema", "load", SENSORS, "--approve", "-o", "json"]);
    let j = ok(&https, &args).json();
    assert_eq!(j["state"], "approved");
    let mut args: Vec<&str> = mtls.to_vec();
    args.extend(["schema", "list"]);
    assert!(squash(&ok(&https, &args).out).contains("SensorReadings approved"));
    // host:port plus TLS flags means https; --tls-server-name names the certificate.
    let mut args: Vec<&str> = mtls.to_vec();
    args.extend([
        "--tls-server-name",
        "localhost",
        "schema",
        "list",
        "-o",
        "json",
    ]);
    assert_eq!(ok(&node.grpc, &args).json()[0]["name"], "SensorReadings");

    // The wrong CA: a TLS failure, exit 2, and `check` explains it.
    let r = ctl(&https, &["--tls-ca", &other_ca, "schema", "list"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(
        r.err.contains("UNAVAILABLE") && r.err.to_lowercase().contains("certificate"),
        "{}",
        r.err
    );
    let r = ctl(
        &https,
        &[
            "--tls-ca",
            &other_ca,
            "check",
            "--metrics-addr",
            &node.admin,
        ],
    );
    assert_eq!(r.code, 4);
    assert!(
        r.out.contains("[ERROR] tls: TLS handshake with") && r.out.contains("--tls-ca"),
        "{}",
        r.out
    );

    // Plaintext against the TLS port.
    let r = ctl(
        &node.grpc,
        &["check", "--metrics-addr", &node.admin, "-o", "json"],
    );
    assert_eq!(r.code, 4);
    let j = r.json();
    let tls = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "tls")
        .cloned();
    assert!(
        tls.is_some(),
        "plaintext to a TLS port is named a TLS problem: {j}"
    );
    assert!(tls.unwrap()["fix"].as_str().unwrap().contains("https://"));

    // A name the certificate does not list.
    let r = ctl(
        &https,
        &[
            "--tls-ca",
            &ca,
            "--tls-server-name",
            "wrong.example",
            "check",
            "--metrics-addr",
            &node.admin,
        ],
    );
    assert_eq!(r.code, 4);
    assert!(
        r.out.contains("[ERROR] tls") && r.out.contains("--tls-server-name"),
        "{}",
        r.out
    );

    // A client certificate from a CA the node does not know: refused, and named a TLS problem.
    let r = ctl(
        &https,
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &stranger_cert,
            "--tls-key",
            &stranger_key,
            "schema",
            "list",
        ],
    );
    assert!(r.code == 2 || r.code == 3, "refused: {} {}", r.code, r.err);
    let r = ctl(
        &https,
        &[
            "--tls-ca",
            &ca,
            "--tls-cert",
            &stranger_cert,
            "--tls-key",
            &stranger_key,
            "check",
            "--metrics-addr",
            &node.admin,
        ],
    );
    assert_eq!(r.code, 4);
    assert!(
        r.out.contains("[ERROR] tls") && r.out.contains("--tls-cert"),
        "{}",
        r.out
    );

    // TLS to a plaintext port.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = NodeProc::start(plain_dir.path(), &[]).unwrap();
    let plain_port = plain.grpc.rsplit(':').next().unwrap();
    let r = ctl(
        &format!("https://localhost:{plain_port}"),
        &["--tls-ca", &ca, "check", "--metrics-addr", &plain.admin],
    );
    assert_eq!(r.code, 4);
    assert!(
        r.out.contains("[ERROR] tls") && r.out.contains("does not speak TLS"),
        "{}",
        r.out
    );
}

#[test]
fn top_shows_per_method_traffic_from_node_and_sidecar() {
    let p = Pair::start();
    let addr = p.node.grpc.clone();
    ok(&addr, &["schema", "load", SENSORS, "--approve"]);
    let top = |output: &str| {
        let child = Command::new(bin_path("foldctl"))
            .args([
                "--addr",
                &addr,
                "-o",
                output,
                "top",
                "--interval",
                "6s",
                "--iterations",
                "1",
            ])
            .args([
                "--metrics-addr",
                &p.node.admin,
                "--metrics-addr",
                &p.sidecar_admin,
            ])
            .env("COLUMNS", "200")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Traffic inside the sample window: 10 queries, 1 refused.
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..9 {
            ok(&addr, &["query", "SensorReadings", "celsius"]);
        }
        assert_eq!(ctl(&addr, &["query", "Nope", "x"]).code, 3);
        ok(&addr, &["status"]);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = top("table");
    assert!(t.contains("SOURCE") && t.contains("P99"), "{t}");
    let row = t
        .lines()
        .find(|l| l.contains("fold.v1.FoldNode/Query"))
        .expect("Query row");
    assert!(
        squash(row).contains(&format!("{} server fold.v1.FoldNode/Query", p.node.admin)),
        "{row}"
    );
    assert!(row.contains("90.0%") && row.contains(" ms"), "{row}");
    assert!(
        t.contains(&p.sidecar_admin),
        "the sidecar's metrics are read too: {t}"
    );

    let j: Json = serde_json::from_str(&top("json")).unwrap();
    let q = j
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "Query" && r["side"] == "server")
        .unwrap();
    assert_eq!(q["success_rate"], 0.9);
    assert!(q["rps"].as_f64().unwrap() > 1.0, "{q}");
    assert!(q["p99_ms"].as_f64().unwrap() >= q["p50_ms"].as_f64().unwrap());
    assert!(q["total"].as_u64().unwrap() >= 20);

    let r = ctl(
        &addr,
        &[
            "top",
            "--metrics-addr",
            "127.0.0.1:1",
            "--interval",
            "100ms",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("127.0.0.1:1/metrics"), "{}", r.err);
}

/// The SVG parses as XML, and the text of its elements holds `ids`.
fn assert_svg_well_formed(svg: &str, ids: &[&str]) {
    let mut text = String::new();
    let mut root = None;
    for ev in xml::reader::EventReader::from_str(svg) {
        match ev.unwrap_or_else(|e| panic!("the SVG is not well-formed XML: {e}\n{svg}")) {
            xml::reader::XmlEvent::StartElement { name, .. } if root.is_none() => {
                root = Some(name.local_name)
            }
            xml::reader::XmlEvent::Characters(t) => text.push_str(&t),
            _ => {}
        }
    }
    assert_eq!(root.as_deref(), Some("svg"));
    for id in ids {
        assert!(text.contains(id), "{id} is not shown in the SVG");
    }
}

#[test]
fn topology_of_a_five_node_mesh() {
    let nodes: Vec<Pair> = (0..5).map(|_| Pair::start()).collect();
    let hub = &nodes[0];
    let addr = hub.node.grpc.as_str();
    for other in &nodes[1..] {
        ok(addr, &["dial", &other.p2p]);
    }
    let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    wait_for(
        || {
            let j = ok(addr, &["topology", "-o", "json"]).json();
            ids[1..].iter().all(|id| {
                j["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["node_id"] == *id && p["connected"] == true)
            })
        },
        "four connected peers",
    );
    let tree = ok(addr, &["topology"]).out;
    assert!(
        tree.starts_with(&format!("{} (this node)", ids[0])),
        "{tree}"
    );
    for id in &ids[1..] {
        assert!(
            tree.lines()
                .any(|l| (l.starts_with("├── ") || l.starts_with("└── ")) && l.contains(id)),
            "{tree}"
        );
    }
    // Zero hops: the hub's own view, a star.
    let dot = ok(addr, &["topology", "--hops", "0", "--format", "dot"]).out;
    for id in &ids[1..] {
        assert!(
            dot.contains(&format!("\"{}\" -> \"{id}\"", ids[0])),
            "edge to {id}: {dot}"
        );
    }
    assert_eq!(dot.matches(" -> ").count(), 4, "{dot}");
    let svg = ok(addr, &["topology", "--format", "svg"]).out;
    assert_svg_well_formed(&svg, &ids);
    screenshot_shows_a_picture(&svg);
    // A picture is printed as is, whatever -o says.
    let dot_json = ok(addr, &["topology", "--format", "dot", "-o", "json"]).out;
    assert!(dot_json.starts_with("digraph mesh {"), "{dot_json}");

    // Two more links among the others, then one picture from every node's view.
    ok(&nodes[1].node.grpc, &["dial", &nodes[2].p2p]);
    ok(&nodes[3].node.grpc, &["dial", &nodes[4].p2p]);
    let mut also: Vec<String> = Vec::new();
    for n in &nodes[1..] {
        also.extend(["--also".to_string(), n.node.grpc.clone()]);
    }
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["topology"];
        args.extend(also.iter().map(String::as_str));
        args.extend(extra);
        ok(addr, &args)
    };
    // Each node's own peer list (the nodes also find each other through the DHT, so the mesh
    // may hold more than the dialed links): the merged view must have every such link once.
    let pair = |a: &str, b: &str| {
        if a < b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    };
    let expected = || {
        let mut want = std::collections::BTreeSet::new();
        for n in &nodes {
            for p in ok(&n.node.grpc, &["peers", "-o", "json"])
                .json()
                .as_array()
                .unwrap()
            {
                want.insert(pair(&n.node_id, p["node_id"].as_str().unwrap()));
            }
        }
        want
    };
    let merged = |j: &Json| -> Vec<(String, String)> {
        j["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| pair(l["from"].as_str().unwrap(), l["to"].as_str().unwrap()))
            .collect()
    };
    let mut j = Json::Null;
    let mut want = std::collections::BTreeSet::new();
    wait_for(
        || {
            want = expected();
            j = run(&["-o", "json"]).json();
            let got = merged(&j);
            let unique: std::collections::BTreeSet<_> = got.iter().cloned().collect();
            got.len() == unique.len() && unique == want && want.len() >= 6
        },
        "the merged view to hold every node's links exactly once",
    );
    for (x, y) in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (3, 4)] {
        assert!(
            want.contains(&pair(ids[x], ids[y])),
            "dialed link {x}-{y} is in the mesh"
        );
    }
    let mesh_nodes: Vec<&str> = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(mesh_nodes.len(), 5);
    for id in &ids {
        assert!(mesh_nodes.contains(id), "{id} in {j}");
    }
    assert!(
        j["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["asked"] == true)
    );
    assert_eq!(j["views"].as_array().unwrap().len(), 5);
    let links = want.len();
    let dot = run(&["--format", "dot"]).out;
    assert_eq!(dot.matches(" -> ").count(), links, "{dot}");
    for (a, b) in &want {
        assert!(
            dot.contains(&format!("\"{a}\" -> \"{b}\""))
                || dot.contains(&format!("\"{b}\" -> \"{a}\"")),
            "edge {a}-{b}: {dot}"
        );
    }
    let text = run(&[]).out;
    assert!(
        text.contains(&format!("5 node(s), {links} link(s), 5 node(s) asked")),
        "{text}"
    );
    let svg = run(&["--format", "svg"]).out;
    assert_svg_well_formed(&svg, &ids);
    screenshot_shows_a_picture(&svg);
}

/// Chromium from PATH (Debian's `chromium`; scripts/install-test-tools.sh installs it).
fn chromium() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
}

/// Open the SVG in headless Chromium, screenshot it, and check the screenshot is a picture: a
/// PNG of the window's size with a real share of dark (drawn) pixels on the white page.
fn screenshot_shows_a_picture(svg: &str) {
    let Some(chrome) = chromium() else {
        eprintln!(
            "SKIPPED the screenshot: chromium is not installed; run scripts/install-test-tools.sh"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.svg");
    std::fs::write(&file, svg).unwrap();
    let png_path = dir.path().join("mesh.png");
    let out = Command::new(&chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", png_path.display()))
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    assert!(
        png_path.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1400, 900));
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let dark = pixels
        .chunks(channels)
        .filter(|p| p.iter().take(3).all(|c| *c < 128))
        .count();
    let total = (info.width * info.height) as usize;
    // Five labelled boxes and four edges: clearly more than nothing, far less than everything.
    assert!(
        dark > 2_000 && dark < total / 2,
        "{dark} dark pixels of {total}"
    );
}

/// `foldctl subscribe`: the changes so far, then live ones, one line each (JSON lines with
/// `-o json`), stopping after `--limit`; `--from` resumes after a sequence.
#[test]
fn subscribe_prints_changes_so_far_then_live_ones() {
    let p = Pair::start();
    let addr = p.node.grpc.as_str();
    ok(addr, &["schema", "load", SENSORS, "--approve"]);
    for (k, c) in [("s-1", 20), ("s-2", 21)] {
        ok(
            addr,
            &[
                "mutate",
                "SensorReadings",
                "create",
                "--data",
                &format!(r#"{{"sensor_id": "{k}", "celsius": {c}}}"#),
            ],
        );
    }
    let child = Command::new(bin_path("foldctl"))
        .args([
            "--addr",
            addr,
            "subscribe",
            "SensorReadings",
            "sensor_id",
            "celsius",
            "--limit",
            "3",
            "-o",
            "json",
        ])
        .current_dir(repo())
        .env_remove("FOLD_ADDR")
        .env_remove("FOLD_OUTPUT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run foldctl subscribe");
    // A live change, after the subscription has caught up with the first two.
    std::thread::sleep(Duration::from_millis(500));
    ok(
        addr,
        &[
            "mutate",
            "SensorReadings",
            "create",
            "--data",
            r#"{"sensor_id": "s-3", "celsius": 9007199254740993}"#,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "foldctl subscribe did not stop after --limit 3"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Json> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changes: Vec<&Json> = lines.iter().filter(|l| l["event"] == "change").collect();
    assert_eq!(changes.len(), 3, "{lines:?}");
    let seqs: Vec<u64> = changes
        .iter()
        .map(|c| c["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(changes[2]["key"], "s-3");
    // Exact values: an integer beyond 2^53 arrives as written.
    assert_eq!(
        changes[2]["fields"]["celsius"].to_string(),
        "9007199254740993"
    );
    // Resume after sequence 2: only the third, as a line of text.
    let r = ok(
        addr,
        &[
            "subscribe",
            "SensorReadings",
            "celsius",
            "--from",
            "2",
            "--limit",
            "1",
        ],
    );
    let line = r.out.lines().next().unwrap_or_default().to_string();
    assert!(
        line.starts_with("3 s-3 create celsius=9007199254740993"),
        "{line}"
    );
    // A sequence beyond the head is OUT_OF_RANGE, exit 3 (refused).
    let r = ctl(addr, &["subscribe", "SensorReadings", "--from", "99"]);
    assert_eq!(r.code, 3, "{} {}", r.out, r.err);
    assert!(r.err.contains("OUT_OF_RANGE"), "{}", r.err);
}
