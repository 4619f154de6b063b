//! fold-node's memory in the deployment artifacts (issue 28), checked with the real tools
//! (installed by scripts/test.sh into .tools/): the Helm chart sets fold-node's page cache
//! (`FOLD_CACHE_SIZE`) and its container's memory request and limit from one value, so the
//! limit is always the cache plus the overhead, for the defaults and for other values; setting
//! the memory by hand is refused; the rendered cache size is one fold-node accepts; and the
//! compose file's limit matches its cache.

use foldmesh_e2e::tools::{repo, tool};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn output(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm_template(args: &[&str]) -> Command {
    let mut cmd = Command::new(tool("helm"));
    cmd.arg("template")
        .arg("mesh")
        .arg(repo().join("helm/fold-node"))
        .args(["--namespace", "fold"])
        .args(args);
    cmd
}

/// The fold-node container of the rendered StatefulSet.
fn node_container(args: &[&str]) -> Value {
    let text = run(&mut helm_template(args));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("helm renders valid YAML"))
        .filter(|d| d["kind"] == "StatefulSet")
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .find(|c| c["name"] == "fold-node")
        .expect("a fold-node container")
}

fn env_of(container: &Value, name: &str) -> String {
    container["env"]
        .as_sequence()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no {name} in {container:?}"))
        .to_string()
}

/// MiB of a size in the forms the chart and compose write: 64MiB, 112Mi, 112M (Docker: ×2^20).
fn mib(s: &str) -> u64 {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let unit = &s[digits.len()..];
    assert!(
        ["MiB", "Mi", "M", "m"].contains(&unit),
        "unexpected unit in '{s}'"
    );
    digits.parse().expect("a number")
}

fn default_values() -> Value {
    let text = std::fs::read_to_string(repo().join("helm/fold-node/values.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("values.yaml is YAML")
}

/// The cache, request and limit of the rendered container, in MiB.
fn memory_of(c: &Value) -> (u64, u64, u64) {
    (
        mib(&env_of(c, "FOLD_CACHE_SIZE")),
        mib(c["resources"]["requests"]["memory"]
            .as_str()
            .expect("a memory request")),
        mib(c["resources"]["limits"]["memory"]
            .as_str()
            .expect("a memory limit")),
    )
}

#[test]
fn the_chart_derives_the_memory_request_and_limit_from_the_cache() {
    let values = default_values();
    let cache = values["node"]["cacheSizeMiB"]
        .as_u64()
        .expect("node.cacheSizeMiB");
    let overhead = values["node"]["memoryOverheadMiB"]
        .as_u64()
        .expect("node.memoryOverheadMiB");
    assert!(overhead >= 48, "the measured overhead is 48 MiB");
    let c = node_container(&[]);
    assert_eq!(memory_of(&c), (cache, cache + overhead, cache + overhead));

    let c = node_container(&["--set", "node.cacheSizeMiB=300"]);
    assert_eq!(memory_of(&c), (300, 300 + overhead, 300 + overhead));

    let c = node_container(&[
        "--set",
        "node.cacheSizeMiB=16",
        "--set",
        "node.memoryOverheadMiB=64",
        "--set",
        "node.resources.limits.cpu=2",
    ]);
    assert_eq!(memory_of(&c), (16, 80, 80));
    assert_eq!(c["resources"]["limits"]["cpu"].as_u64(), Some(2));
    assert_eq!(c["resources"]["requests"]["cpu"].as_str(), Some("100m"));
}

#[test]
fn setting_the_memory_by_hand_is_refused_with_what_to_change() {
    for key in [
        "node.resources.limits.memory=1Gi",
        "node.resources.requests.memory=1Gi",
    ] {
        let out = output(&mut helm_template(&["--set", key]));
        assert!(!out.status.success(), "{key} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("node.cacheSizeMiB"), "{key}: {err}");
    }
    let out = output(&mut helm_template(&["--set", "node.cacheSizeMiB=0"]));
    assert!(!out.status.success(), "a cache of 0 MiB was accepted");
}

/// The cache size as the chart writes it is one fold-node accepts: the node starts with it.
#[test]
fn fold_node_accepts_the_rendered_cache_size() {
    let c = node_container(&["--set", "node.cacheSizeMiB=24"]);
    let size = env_of(&c, "FOLD_CACHE_SIZE");
    let dir = tempfile::tempdir().unwrap();
    let node = foldmesh_e2e::process::NodeProc::start(dir.path(), &["--cache-size", &size]);
    assert!(
        node.is_ok(),
        "fold-node --cache-size {size}: {:?}",
        node.err()
    );
}

#[test]
fn the_compose_memory_limit_is_the_cache_plus_the_overhead() {
    let text = run(Command::new(tool("docker-compose"))
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .arg("config"));
    let doc: Value = serde_yaml::from_str(&text).expect("compose config is YAML");
    let overhead = default_values()["node"]["memoryOverheadMiB"]
        .as_u64()
        .expect("node.memoryOverheadMiB");
    let mut nodes = 0;
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        if svc["command"][0] != "fold-node" {
            continue;
        }
        nodes += 1;
        let cache = svc["environment"]["FOLD_CACHE_SIZE"]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?} sets no FOLD_CACHE_SIZE"));
        let limit = svc["deploy"]["resources"]["limits"]["memory"]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?} has no memory limit"));
        assert_eq!(mib(limit), mib(cache) + overhead, "{name:?}");
    }
    assert_eq!(nodes, 3, "{text}");
}
