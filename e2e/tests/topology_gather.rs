//! `foldctl topology` gathers the mesh by asking peers for their peers (Network.Topology with
//! max_hops, the `peers` operation over /fold/forward/2.0.0, relayed along the chain): a chain of
//! five loopback nodes — each admits connections from its neighbours only (`--allow-peer`) and
//! trusts only them — seen whole from one end with `--hops 4`, only the first two levels with
//! `--hops 1`; a node that denies the asker shows as a per-node error. And `foldctl check` names a bootstrap address whose name
//! does not resolve (`.invalid` never does; nothing leaves loopback).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use foldmesh_e2e::foldctl;
use foldmesh_e2e::loopback::{self, Node};
use foldmesh_e2e::process::bin_path;
use serde_json::Value as Json;

/// Run foldctl against `addr`; (exit code, stdout, stderr).
fn ctl(addr: &str, args: &[&str]) -> (i32, String, String) {
    let r = foldctl::ctl(addr, args);
    (r.code, r.out, r.err)
}

fn json(addr: &str, args: &[&str]) -> Json {
    let (code, out, err) = ctl(addr, args);
    assert_eq!(code, 0, "foldctl {args:?} failed\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"))
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a < b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn links(j: &Json) -> BTreeSet<(String, String)> {
    j["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| pair(l["from"].as_str().unwrap(), l["to"].as_str().unwrap()))
        .collect()
}

/// The nodes of the JSON that were asked (answered), with their hops.
fn asked(j: &Json) -> Vec<(String, u64)> {
    j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["asked"] == true)
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_string(),
                n["hops"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `n` identity keys made by `p2p-sidecar identity generate`: (key file, node id).
fn identities(dir: &Path, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let key = dir.join(format!("node-{i}.key"));
            let out = Command::new(bin_path("p2p-sidecar"))
                .args(["identity", "generate", "--out"])
                .arg(&key)
                .output()
                .expect("run p2p-sidecar identity generate");
            assert!(out.status.success(), "{out:?}");
            let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (key.to_string_lossy().into_owned(), id)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_five_is_gathered_whole_within_the_hops() {
    // A real chain 0 - 1 - 2 - 3 - 4: each sidecar admits only its neighbours (so the DHT cannot
    // connect the others), and each node trusts only its neighbours (unknown peers are denied).
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = identities(keys_dir.path(), 5);
    let nodes: Vec<Node> = (0..5)
        .map(|i: usize| {
            let neighbours: Vec<&str> = [i.checked_sub(1), Some(i + 1)]
                .into_iter()
                .flatten()
                .filter(|j| *j < 5)
                .map(|j| keys[j].1.as_str())
                .collect();
            let mut sidecar: Vec<String> = vec!["--identity-key".into(), keys[i].0.clone()];
            let mut node: Vec<String> = Vec::new();
            for n in &neighbours {
                sidecar.extend(["--allow-peer".into(), n.to_string()]);
                node.extend(["--trust".into(), format!("{n}=1")]);
            }
            let sidecar: Vec<&str> = sidecar.iter().map(String::as_str).collect();
            let node: Vec<&str> = node.iter().map(String::as_str).collect();
            loopback::start_with(&sidecar, &node)
        })
        .collect();
    for (n, k) in nodes.iter().zip(&keys) {
        assert_eq!(n.id, k.1);
    }
    // Each node dials only the next one.
    for w in nodes.windows(2) {
        w[0].dial(&w[1]).await;
    }
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let chain: Vec<(String, String)> = ids.windows(2).map(|w| pair(w[0], w[1])).collect();
    let addr = nodes[0].node.grpc.as_str();

    // From one end, four hops reach every node and every link of the chain (the DHT may add
    // more links: each node's own peers are in the picture too).
    let mut j = Json::Null;
    wait_for(
        || {
            j = json(
                addr,
                &["topology", "--hops", "4", "--timeout", "20s", "-o", "json"],
            );
            let got = links(&j);
            asked(&j).len() == 5 && chain.iter().all(|l| got.contains(l))
        },
        "four hops to gather the whole chain",
        60,
    );
    // Breadth-first along the chain: node i is i hops away, and the links are the chain's.
    let want: Vec<(String, u64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.to_string(), i as u64))
        .collect();
    assert_eq!(asked(&j), want, "{j}");
    assert_eq!(
        links(&j),
        chain.iter().cloned().collect::<BTreeSet<_>>(),
        "{j}"
    );
    assert!(
        j["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["error"].is_null()),
        "no node failed: {j}"
    );
    assert_eq!(j["node_id"], ids[0]);
    assert_eq!(j["views"].as_array().unwrap().len(), 5);
    // Each asked node's view is its own answer: every link the views report is in `links`.
    for v in j["views"].as_array().unwrap() {
        let from = v["node_id"].as_str().unwrap();
        for p in v["peers"].as_array().unwrap() {
            assert!(links(&j).contains(&pair(from, p["node_id"].as_str().unwrap())));
        }
    }

    // Tree, DOT and SVG show the gathered nodes and links.
    let (code, tree, err) = ctl(addr, &["topology", "--hops", "4", "--timeout", "20s"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        tree.starts_with(&format!("{} (this node)", ids[0])),
        "{tree}"
    );
    for id in &ids[1..] {
        assert!(
            tree.lines().any(|l| l.starts_with(&format!("{id} ("))),
            "{id} has its own tree: {tree}"
        );
    }
    assert!(tree.contains("5 node(s)"), "{tree}");
    let (_, dot, _) = ctl(
        addr,
        &[
            "topology",
            "--hops",
            "4",
            "--timeout",
            "20s",
            "--format",
            "dot",
        ],
    );
    for (a, b) in &chain {
        assert!(
            dot.contains(&format!("\"{a}\" -> \"{b}\""))
                || dot.contains(&format!("\"{b}\" -> \"{a}\"")),
            "edge {a}-{b}: {dot}"
        );
    }
    let (_, svg, _) = ctl(
        addr,
        &[
            "topology",
            "--hops",
            "4",
            "--timeout",
            "20s",
            "--format",
            "svg",
        ],
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    for id in &ids {
        assert!(svg.contains(id), "{id} in the SVG");
    }

    // One hop: the first two levels are asked (0 and 1); 2 is only seen as 1's peer; 3 and 4
    // are nowhere.
    let j = json(
        addr,
        &["topology", "--hops", "1", "--timeout", "20s", "-o", "json"],
    );
    let one = asked(&j);
    assert_eq!(
        one,
        vec![(ids[0].to_string(), 0), (ids[1].to_string(), 1)],
        "{j}"
    );
    let seen: Vec<&str> = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, ids[..3].to_vec(), "{j}");
    assert_eq!(
        links(&j),
        chain[..2].iter().cloned().collect::<BTreeSet<_>>(),
        "{j}"
    );
    // Zero hops: just this node's view, as before.
    let j = json(addr, &["topology", "--hops", "0", "-o", "json"]);
    assert_eq!(asked(&j), vec![(ids[0].to_string(), 0)]);
    // More than four hops is refused by foldctl (usage error).
    let (code, _, _) = ctl(addr, &["topology", "--hops", "5"]);
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_denies_the_asker_is_a_per_node_error() {
    // A trusts unknown peers; B denies them (the default), so B refuses A's peers request.
    let a = loopback::start(&["--unknown-peer-distance", "1"]);
    let b = loopback::start(&[]);
    a.dial(&b).await;
    let addr = a.node.grpc.as_str();
    let mut j = Json::Null;
    wait_for(
        || {
            j = json(
                addr,
                &["topology", "--hops", "2", "--timeout", "10s", "-o", "json"],
            );
            j["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["node_id"] == b.id.as_str() && !n["error"].is_null())
        },
        "B to show as refused",
        30,
    );
    let node_b = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == b.id.as_str())
        .unwrap();
    assert_eq!(node_b["asked"], false, "{j}");
    assert_eq!(node_b["hops"], 1, "{j}");
    assert_eq!(node_b["error"]["code"], "PERMISSION_DENIED", "{j}");
    assert!(
        node_b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not trusted"),
        "{j}"
    );
    // The link A-B is still shown (from A's own view).
    assert!(links(&j).contains(&pair(&a.id, &b.id)), "{j}");
    let (code, tree, err) = ctl(addr, &["topology", "--hops", "2", "--timeout", "10s"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        tree.contains(&format!("✗ {}  PERMISSION_DENIED", b.id)),
        "{tree}"
    );
    assert!(tree.contains("1 could not be asked"), "{tree}");
    let (_, dot, _) = ctl(
        addr,
        &[
            "topology",
            "--hops",
            "2",
            "--timeout",
            "10s",
            "--format",
            "dot",
        ],
    );
    assert!(dot.contains("✗ PERMISSION_DENIED"), "{dot}");

    // Once B trusts A, B answers.
    b.trust(&a.id, 1).await;
    let j = json(
        addr,
        &["topology", "--hops", "2", "--timeout", "10s", "-o", "json"],
    );
    assert!(
        asked(&j).iter().any(|(id, h)| id == &b.id && *h == 1),
        "{j}"
    );
}

#[test]
fn check_names_a_bootstrap_name_that_does_not_resolve() {
    const BAD: &str = "/dns4/does-not-exist.invalid/tcp/4001";
    // A shared bootstrap list names this node too: that address is not a problem (and is never
    // dialed).
    let keys_dir = tempfile::tempdir().unwrap();
    let (key, id) = identities(keys_dir.path(), 1).remove(0);
    let own = format!("/ip4/127.0.0.1/tcp/1/p2p/{id}");
    let n = loopback::start_with(
        &[
            "--identity-key",
            &key,
            "--bootstrap",
            BAD,
            "--bootstrap",
            &own,
        ],
        &[],
    );
    let addr = n.node.grpc.as_str();
    let args = [
        "check",
        "--metrics-addr",
        n.node.admin.as_str(),
        "--sidecar-metrics-addr",
        n.sidecar_admin.as_str(),
        "-o",
        "json",
    ];
    let mut last = Json::Null;
    wait_for(
        || {
            let (_, out, _) = ctl(addr, &args);
            last = serde_json::from_str(&out).unwrap_or(Json::Null);
            last["findings"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f["check"] == "bootstrap" && f["severity"] == "error")
            })
        },
        "check to report the bootstrap address",
        60,
    );
    let f = last["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "bootstrap")
        .unwrap();
    let what = f["what"].as_str().unwrap();
    assert!(what.contains(BAD), "{f}");
    assert!(what.contains("does not resolve"), "{f}");
    assert!(f["fix"].as_str().unwrap().contains("--bootstrap"), "{f}");
    assert_eq!(last["ok"], false);
    let mine = last["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "bootstrap" && f["what"].as_str().unwrap().contains(&own))
        .unwrap();
    assert_eq!(mine["severity"], "ok", "{mine}");
    assert!(mine["what"].as_str().unwrap().contains("this node itself"));
    // The table names it too, and the exit code says a problem was found.
    let (code, out, _) = ctl(
        addr,
        &[
            "check",
            "--metrics-addr",
            n.node.admin.as_str(),
            "--sidecar-metrics-addr",
            n.sidecar_admin.as_str(),
        ],
    );
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(BAD) && out.contains("does not resolve"),
        "{out}"
    );
    // Network.Status carries it for any client.
    let j = json(addr, &["status", "-o", "json"]);
    let b = &j["bootstrap"][0];
    assert_eq!(b["address"], BAD, "{j}");
    assert_eq!(b["state"], "failed", "{j}");
    assert_eq!(j["bootstrap"][1]["address"], own.as_str(), "{j}");
    assert_eq!(j["bootstrap"][1]["state"], "self", "{j}");
    let (code, table, err) = ctl(addr, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bootstrap") && l.contains(&format!("{BAD} failed: "))),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_answer_is_marked_not_left_out() {
    // A - B - C, everyone trusting unknown peers; C's fold-node is stopped (its sidecar stays),
    // so nobody can answer for C.
    let open = ["--unknown-peer-distance", "1"];
    let a = loopback::start(&open);
    let b = loopback::start(&open);
    let mut c = loopback::start(&open);
    a.dial(&b).await;
    b.dial(&c).await;
    c.node.proc.kill9();
    let addr = a.node.grpc.as_str();
    let mut j = Json::Null;
    wait_for(
        || {
            j = json(
                addr,
                &["topology", "--hops", "2", "--timeout", "10s", "-o", "json"],
            );
            j["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["node_id"] == c.id.as_str() && !n["error"].is_null())
        },
        "C to show as not answering",
        30,
    );
    let node_c = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == c.id.as_str())
        .unwrap();
    assert_eq!(node_c["asked"], false, "{j}");
    let code = node_c["error"]["code"].as_str().unwrap();
    assert!(
        code == "UNAVAILABLE" || code == "DEADLINE_EXCEEDED",
        "{code}: {j}"
    );
    // B answered, and the link B-C is shown from B's view.
    assert!(asked(&j).iter().any(|(id, _)| id == &b.id), "{j}");
    assert!(links(&j).contains(&pair(&b.id, &c.id)), "{j}");
    let (code, tree, err) = ctl(addr, &["topology", "--hops", "2", "--timeout", "10s"]);
    assert_eq!(code, 0, "{err}");
    assert!(tree.contains(&format!("✗ {}", c.id)), "{tree}");
}
