//! The Python example client (examples/python) against a real fold-node: generates the stubs
//! from proto/ with grpcio-tools (examples/python/gen_stubs.sh), runs example.py, checks each
//! step's output, and reads the data back with foldctl. grpcio comes from
//! scripts/install-test-tools.sh (.tools/grpc); without it the test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use foldmesh_e2e::process::{NodeProc, bin_path};
use serde_json::{Value as Json, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e sits in the repository")
        .to_path_buf()
}

/// A Python with grpcio and grpcio-tools: .tools/grpc first, then python3 on PATH.
fn python() -> Option<PathBuf> {
    let venv = repo().join(".tools/grpc/bin/python");
    let candidates = [venv, PathBuf::from("python3")];
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import grpc, grpc_tools"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn python_example_runs_against_a_real_node() {
    let Some(py) = python() else {
        eprintln!(
            "SKIPPED: python3 with grpcio + grpcio-tools is not installed; run scripts/install-test-tools.sh"
        );
        return;
    };
    let gen_stubs = Command::new(repo().join("examples/python/gen_stubs.sh"))
        .env("PYTHON", &py)
        .output()
        .unwrap();
    assert!(
        gen_stubs.status.success(),
        "gen_stubs.sh: {}",
        String::from_utf8_lossy(&gen_stubs.stderr)
    );
    assert!(
        repo()
            .join("examples/python/gen/fold/v1/fold_node_pb2_grpc.py")
            .exists()
    );

    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]).unwrap();
    let out = Command::new(&py)
        .arg(repo().join("examples/python/example.py"))
        .args(["--addr", &node.grpc])
        .env_remove("FOLD_TLS_CA")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example.py failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<Json> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON line per step"))
        .collect();
    let step = |name: &str| -> Vec<Json> {
        steps
            .iter()
            .filter(|s| s["step"] == name)
            .map(|s| s["result"].clone())
            .collect()
    };
    assert_eq!(step("load_schema")[0]["state"], "SCHEMA_STATE_APPROVED");
    assert_eq!(step("create").len(), 2);
    assert_eq!(step("update")[0]["fields"], json!(["celsius"]));
    assert_eq!(
        step("query")[0],
        json!([
            {"key": "py-1", "fields": {"celsius": 21, "location": "attic"}},
            {"key": "py-2", "fields": {"celsius": 18, "location": null}}
        ])
    );
    let history = &step("history")[0];
    assert_eq!(history.as_array().unwrap().len(), 2);
    assert_eq!(history[0]["value"], 21);
    assert_eq!(history[1]["value"], 20.5);
    assert_eq!(history[0]["writer"], "client:local");
    assert_eq!(step("error")[0]["code"], "NOT_FOUND");
    // Paged: 7 records, two a page, each once and in order.
    let pages = &step("pages")[0];
    assert_eq!(pages["pages"], 4, "{pages}");
    assert_eq!(
        pages["keys"],
        json!(["py-1", "py-2", "py-3", "py-4", "py-5", "py-6", "py-7"])
    );

    // What Python wrote, foldctl reads.
    let out = Command::new(bin_path("foldctl"))
        .args([
            "--addr",
            &node.grpc,
            "-o",
            "json",
            "query",
            "SensorReadings",
            "celsius",
            "--key",
            "py-2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["records"][0]["fields"]["celsius"], 18);
}
