//! The README's foldctl quick start, run exactly as written with the real `foldctl` (found on
//! PATH, as the README says) against a fresh node with its sidecar; FOLD_ADDR points it at the
//! test's port. The commands are read from the README's ```sh foldctl-quickstart block.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use foldmesh_e2e::process::{NodeProc, Proc, bin_path, parse_kv};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_path_buf()
}

fn quickstart_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let start = readme
        .find("```sh foldctl-quickstart")
        .expect("README has a ```sh foldctl-quickstart block");
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

#[test]
fn readme_foldctl_quickstart_works_as_written() {
    let commands = quickstart_commands();
    assert!(commands.len() >= 8, "{commands:?}");
    assert!(
        commands.iter().all(|c| c.starts_with("foldctl ")),
        "{commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Command::new(bin_path("p2p-sidecar"));
    sidecar.arg("--data-dir").arg(dir.path()).args([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let (_sidecar, ready) =
        Proc::spawn(sidecar, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
    let node_id = parse_kv(&ready, "node_id").unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();

    let bin_dir = bin_path("foldctl").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for cmd in &commands {
        // Network calls answer once the node has found its sidecar.
        let mut tries = 0;
        let out = loop {
            let out = Command::new("bash")
                .arg("-c")
                .arg(cmd)
                .current_dir(repo())
                .env("PATH", &path)
                .env("FOLD_ADDR", &node.grpc)
                .env("COLUMNS", "200")
                .env_remove("FOLD_OUTPUT")
                .output()
                .expect("run bash");
            tries += 1;
            if out.status.success() || tries >= 30 || out.status.code() != Some(2) {
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
        all.contains("schema SensorReadings loaded: state approved"),
        "{all}"
    );
    let query = outputs
        .iter()
        .find(|o| o.starts_with("KEY"))
        .expect("a query table");
    assert!(
        query.contains("22.25") && query.contains("north wall"),
        "{query}"
    );
    assert!(query.contains("greenhouse-2"), "{query}");
    let history = outputs
        .iter()
        .find(|o| o.starts_with("WRITTEN_AT"))
        .expect("a history table");
    assert!(history.find("22.25") < history.find("21.5"), "{history}");
    assert!(history.contains("client:local"));
    assert!(all.contains(&node_id), "status shows the node id");
    let json: serde_json::Value =
        serde_json::from_str(outputs.last().unwrap()).expect("the last command prints JSON");
    // Values read back exactly as written: the README writes 19.0.
    assert_eq!(json["records"][0]["fields"]["celsius"].to_string(), "19.0");
}
