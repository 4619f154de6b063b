//! The deployment artifacts, checked by the real tools (installed by scripts/test.sh into
//! .tools/): `helm lint` and `helm template` of the chart for the default values and for a
//! TLS + ServiceMonitor + 5-replica set, each rendering validated by `kubernetes-validate
//! --strict`, the rendering's semantics asserted here, `docker-compose config -q` (with and without
//! the no-registry override), and what the Dockerfile must hold for both of its builds. The image
//! itself is built and the compose mesh run on a real engine by e2e/tests/compose.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_path_buf()
}

/// A tool from .tools (where scripts/test.sh installs it) or PATH; a clear failure otherwise.
fn tool(name: &str) -> PathBuf {
    for dir in ["bin", "kv/bin"] {
        let p = repo().join(".tools").join(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("`{name}` is not installed; run scripts/test.sh, which installs it into .tools/");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chart() -> PathBuf {
    repo().join("helm/fold-node")
}

fn render(args: &[&str]) -> (String, Vec<Value>) {
    let mut cmd = Command::new(tool("helm"));
    cmd.arg("template")
        .arg("mesh")
        .arg(chart())
        .arg("--namespace")
        .arg("fold")
        .args(args);
    let text = run(&mut cmd);
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect();
    (text, docs)
}

use serde::Deserialize;

fn validate(text: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, text).expect("write rendering");
    let out = run(Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .arg(&file));
    assert!(!out.contains("ERROR"), "kubernetes-validate: {out}");
    assert!(out.contains("passed for resource statefulset/"), "{out}");
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| s(&e["value"]))
}

/// The semantics the chart promises, whatever the values.
fn check_semantics(docs: &[Value], replicas: usize) {
    let sts = kind(docs, "StatefulSet");
    assert_eq!(sts.len(), 1);
    let sts = sts[0];
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(replicas as u64));
    let pod = &sts["spec"]["template"]["spec"];
    let headless_name = s(&sts["spec"]["serviceName"]);

    // The headless Service is the StatefulSet's governing service.
    let headless = kind(docs, "Service")
        .into_iter()
        .find(|svc| s(&svc["metadata"]["name"]) == headless_name)
        .expect("the StatefulSet's serviceName is a rendered Service");
    assert_eq!(s(&headless["spec"]["clusterIP"]), "None");

    // Both containers: fold-node, and the p2p-sidecar as a native sidecar.
    let node = &pod["containers"][0];
    assert_eq!(s(&node["name"]), "fold-node");
    let sidecar = pod["initContainers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "p2p-sidecar"))
        .expect("p2p-sidecar init container");
    assert_eq!(s(&sidecar["restartPolicy"]), "Always");

    // They share a socket volume, and agree on the socket paths.
    let mounts = |c: &Value| -> Vec<(String, String)> {
        c["volumeMounts"]
            .as_sequence()
            .map(|m| {
                m.iter()
                    .map(|m| (s(&m["name"]).to_string(), s(&m["mountPath"]).to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let shared: Vec<_> = mounts(node)
        .into_iter()
        .filter(|m| mounts(sidecar).contains(m))
        .collect();
    assert!(
        shared.iter().any(|(n, _)| n == "sockets"),
        "no shared socket volume: {shared:?}"
    );
    assert_eq!(
        env_of(node, "FOLD_SIDECAR_ADDR"),
        env_of(sidecar, "FOLD_SIDECAR_MESH_LISTEN")
    );
    assert_eq!(
        env_of(node, "FOLD_PEER_REQUESTS_LISTEN"),
        env_of(sidecar, "FOLD_SIDECAR_NODE_ADDR")
    );

    // gRPC probes hit the plaintext health port the node really listens on.
    let health_port = env_of(node, "FOLD_HEALTH_LISTEN")
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u64>().ok())
        .expect("FOLD_HEALTH_LISTEN set");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            node[probe]["grpc"]["port"].as_u64(),
            Some(health_port),
            "{probe} must use the gRPC health port"
        );
    }

    // Bootstrap addresses are the per-pod names under the headless Service.
    let full = s(&sts["metadata"]["name"]);
    let bootstrap = env_of(sidecar, "FOLD_SIDECAR_BOOTSTRAP").expect("bootstrap set");
    let addrs: Vec<&str> = bootstrap.split(',').collect();
    assert_eq!(addrs.len(), replicas);
    for (i, a) in addrs.iter().enumerate() {
        assert_eq!(
            *a,
            format!("/dns4/{full}-{i}.{headless_name}.fold.svc.cluster.local/tcp/4001")
        );
    }

    // Restrictive security context on both containers.
    for c in [node, sidecar] {
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert!(c["resources"]["requests"].is_mapping());
    }
    assert_eq!(kind(docs, "PodDisruptionBudget").len(), 1);

    // Reaching the public port does not make a client the node's owner: anonymous clients sit
    // above the admin distance, and the owner listener is on the pod's loopback only.
    not_every_client_is_owner(
        env_of(node, "FOLD_CLIENT_TRUST_DISTANCE"),
        env_of(node, "FOLD_ADMIN_DISTANCE"),
        env_of(node, "FOLD_OWNER_LISTEN"),
    );
}

fn not_every_client_is_owner(client: Option<&str>, admin: Option<&str>, owner: Option<&str>) {
    let client: u32 = client
        .expect("the client distance is set explicitly")
        .parse()
        .expect("a distance");
    match admin.unwrap_or("0") {
        "none" => {}
        a => assert!(
            a.parse::<u32>().expect("a distance") < client,
            "anonymous clients (distance {client}) would hold the admin right (admin distance {a})"
        ),
    }
    let owner = owner.unwrap_or("owner.sock");
    assert!(
        owner == "off" || owner.starts_with("127.0.0.1:") || !owner.contains(':'),
        "the owner listener must be loopback or a socket: {owner}"
    );
}

#[test]
fn helm_lint_passes() {
    let out = run(Command::new(tool("helm")).arg("lint").arg(chart()));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_rendering_is_valid_and_coherent() {
    let (text, docs) = render(&[]);
    validate(&text);
    check_semantics(&docs, 3);
    assert!(kind(&docs, "ServiceMonitor").is_empty());
}

#[test]
fn tls_servicemonitor_five_replicas() {
    let (text, docs) = render(&[
        "--set",
        "replicaCount=5",
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.secretName=fold-tls",
        "--set",
        "tls.clientCA=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ]);
    validate(&text);
    check_semantics(&docs, 5);
    assert_eq!(kind(&docs, "ServiceMonitor").len(), 1);
    let sts = kind(&docs, "StatefulSet")[0];
    let node = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_of(node, "FOLD_TLS_CERT"), Some("/tls/tls.crt"));
    assert_eq!(env_of(node, "FOLD_TLS_CLIENT_CA"), Some("/tls/ca.crt"));
    assert_eq!(env_of(node, "FOLD_TLS_CLIENT_AUTH"), Some("required"));
}

#[test]
fn admin_identities_reach_the_node() {
    let (text, docs) = render(&[
        "--set",
        "tls.enabled=true",
        "--set",
        "tls.secretName=fold-tls",
        "--set",
        "tls.clientCA=true",
        "--set",
        "tls.adminIdentities={ops,sha256:ab12}",
    ]);
    validate(&text);
    let sts = kind(&docs, "StatefulSet")[0];
    let node = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_of(node, "FOLD_ADMIN_IDENTITY"), Some("ops,sha256:ab12"));
    // An owner listener off the pod's loopback is refused by the schema.
    let out = Command::new(tool("helm"))
        .args(["template", "mesh"])
        .arg(chart())
        .args(["--set", "node.ownerListen=0.0.0.0:50053"])
        .output()
        .expect("run helm");
    assert!(!out.status.success(), "a public owner listener rendered");
}

#[test]
fn bad_values_fail_early() {
    let out = Command::new(tool("helm"))
        .args(["template", "mesh"])
        .arg(chart())
        .args(["--set", "node.unknownPeerDistance=maybe"])
        .output()
        .expect("run helm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknownPeerDistance"));
}

#[test]
fn compose_config_is_valid() {
    run(Command::new(tool("docker-compose"))
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .args(["config", "-q"]));
}

#[test]
fn compose_does_not_make_every_client_the_owner() {
    let text = run(Command::new(tool("docker-compose"))
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .arg("config"));
    let doc: Value = serde_yaml::from_str(&text).expect("compose config is YAML");
    let services = doc["services"].as_mapping().expect("services");
    let mut nodes = 0;
    for (_, svc) in services {
        let cmd = svc["command"]
            .as_sequence()
            .and_then(|c| c.first())
            .map(s)
            .unwrap_or_default();
        if cmd != "fold-node" {
            continue;
        }
        nodes += 1;
        let env = &svc["environment"];
        not_every_client_is_owner(
            env["FOLD_CLIENT_TRUST_DISTANCE"].as_str(),
            env["FOLD_ADMIN_DISTANCE"].as_str(),
            env["FOLD_OWNER_LISTEN"].as_str(),
        );
    }
    assert_eq!(nodes, 3, "{text}");
}

/// The from-source build needs the `rust` image from a registry, so it is not run here (the
/// no-registry build is, by e2e/tests/compose.rs), but its most likely breakage can be checked:
/// cargo refuses to build a workspace whose member (or patched dependency) directory is missing,
/// so the build stage must copy every directory the root Cargo.toml names.
#[test]
fn dockerfile_copies_every_workspace_directory() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members = [...] line");
    let mut dirs: Vec<String> = members_line
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    // Path dependencies and patches: `path = "..."`.
    for l in manifest.lines() {
        if let Some(rest) = l.split("path = \"").nth(1)
            && let Some(p) = rest.split('"').next()
        {
            dirs.push(p.to_string());
        }
    }
    assert!(
        dirs.len() >= 8,
        "parsed too few directories from Cargo.toml: {dirs:?}"
    );
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for d in &dirs {
        let top = d.split('/').next().unwrap_or(d);
        assert!(
            copied.contains(&top),
            "the Dockerfile's build stage does not COPY `{top}` (needed for `{d}` in Cargo.toml); copied: {copied:?}"
        );
    }
}

/// Both builds from one Dockerfile, with no frontend from a registry: no `# syntax=` line, no
/// BuildKit-only `RUN --mount`, and the `prebuilt` stage ahead of the `rust` stage (the classic
/// builder builds every stage before its target).
#[test]
fn dockerfile_builds_without_a_registry_frontend() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    assert!(
        !dockerfile
            .lines()
            .any(|l| l.trim_start().to_ascii_lowercase().starts_with("# syntax=")),
        "a `# syntax=` line pulls the Dockerfile frontend from a registry"
    );
    assert!(
        !dockerfile.contains("--mount="),
        "RUN --mount needs BuildKit"
    );
    let stage = |name: &str| {
        dockerfile
            .lines()
            .position(|l| l.starts_with("FROM ") && l.ends_with(&format!(" AS {name}")))
            .unwrap_or_else(|| panic!("no stage {name}"))
    };
    assert!(stage("runtime-base") < stage("prebuilt"));
    assert!(stage("prebuilt") < stage("build"));
    assert!(stage("build") < stage("runtime"));
    let last_from = dockerfile
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .unwrap_or_default();
    assert!(
        last_from.ends_with(" AS runtime"),
        "`docker build .` builds from source"
    );
}

/// The compose mesh: every container on the network under its own name (none in another's
/// namespace: restarts heal), the network inside 198.18.0.0/15, and the no-registry override valid.
#[test]
fn compose_network_is_in_the_test_range_and_shares_no_namespace() {
    let text = run(Command::new(tool("docker-compose"))
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .arg("-f")
        .arg(repo().join("deploy/compose.no-registry.yml"))
        .arg("config"));
    let doc: Value = serde_yaml::from_str(&text).expect("compose config is YAML");
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        assert!(
            svc["network_mode"].is_null(),
            "{name:?} lives in another container's network namespace"
        );
    }
    let subnets: Vec<&str> = doc["networks"]["default"]["ipam"]["config"]
        .as_sequence()
        .expect("the default network has an ipam config")
        .iter()
        .map(|c| s(&c["subnet"]))
        .collect();
    assert!(!subnets.is_empty());
    for net in subnets {
        let (ip, len) = net.split_once('/').expect("a CIDR");
        let ip: std::net::Ipv4Addr = ip.parse().expect("an IPv4 subnet");
        let len: u8 = len.parse().expect("a prefix length");
        let o = ip.octets();
        assert!(
            o[0] == 198 && (o[1] & 0xfe) == 18 && len >= 15,
            "{net} is outside 198.18.0.0/15"
        );
    }
    assert_eq!(
        s(&doc["services"]["prometheus"]["image"]),
        "foldmesh-prometheus:local"
    );
}
