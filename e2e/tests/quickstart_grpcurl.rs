//! The README's quick start, run exactly as written (only the port differs) with the real
//! `grpcurl` over server reflection, against a fresh node with its sidecar. The commands are
//! read from the README's ```sh quickstart block, so the README and this test cannot drift.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use foldmesh_e2e::process::{NodeProc, Proc, bin_path};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_path_buf()
}

fn quickstart_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let start = readme
        .find("```sh quickstart")
        .expect("README has a ```sh quickstart block");
    let body = &readme[start..];
    let body = &body[body.find('\n').expect("block body") + 1..];
    let end = body.find("```").expect("block end");
    body[..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn grpcurl_dir() -> PathBuf {
    let dir = repo().join(".tools/bin");
    if dir.join("grpcurl").exists() {
        return dir;
    }
    let on_path = std::env::var("PATH")
        .ok()
        .and_then(|p| std::env::split_paths(&p).find(|d| d.join("grpcurl").exists()));
    on_path
        .expect("grpcurl is not installed; run scripts/test.sh, which installs it into .tools/bin")
}

#[test]
fn readme_quickstart_works_as_written() {
    let commands = quickstart_commands();
    assert!(
        commands.len() >= 7,
        "quick start has its commands: {commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    // The node and its sidecar, as scripts/run.sh starts them, but on free ports.
    let mut sidecar = Command::new(bin_path("p2p-sidecar"));
    sidecar.arg("--data-dir").arg(dir.path()).args([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let (_sidecar, ready) =
        Proc::spawn(sidecar, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
    let node_id = foldmesh_e2e::process::parse_kv(&ready, "node_id").unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();

    let path = format!(
        "{}:{}",
        grpcurl_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for cmd in &commands {
        let cmd = cmd.replace("127.0.0.1:50051", &node.grpc);
        // The Network service is SERVING once the node has found its sidecar.
        let mut tries = 0;
        let out = loop {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!("set -o pipefail; {cmd}"))
                .current_dir(repo())
                .env("PATH", &path)
                .output()
                .expect("run bash");
            tries += 1;
            if out.status.success() || tries >= 30 || !cmd.contains("fold.v1.Network") {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "quick start command failed: {cmd}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    let all = outputs.join("\n");
    assert!(
        all.contains("\"state\": \"SCHEMA_STATE_APPROVED\""),
        "{all}"
    );
    // The query saw the update, and the filter matched both records.
    let query = outputs
        .iter()
        .find(|o| o.contains("\"records\""))
        .expect("a query output");
    assert!(
        query.contains("22.25") && query.contains("greenhouse-2"),
        "{query}"
    );
    assert!(query.contains("north wall"));
    // History lists both versions, newest first, written by the local client.
    let history = outputs
        .iter()
        .find(|o| o.contains("\"versions\""))
        .expect("a history output");
    assert_eq!(history.matches("\"versionId\"").count(), 2, "{history}");
    assert!(history.find("22.25") < history.find("21.5"), "{history}");
    assert!(history.contains("client:local"));
    assert!(all.contains("\"status\": \"SERVING\""));
    assert!(
        all.contains(&node_id),
        "Network/Status shows the sidecar's node id"
    );
}
