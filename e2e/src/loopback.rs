//! A whole node (p2p-sidecar + fold-node sharing a data directory) on loopback, for tests that
//! need several nodes but no network namespaces.

use std::process::Command;
use std::time::Duration;

use fold_proto::v1::{DialRequest, SetTrustRequest, TrustEntry};

use crate::mesh::eventually;
use crate::process::{NodeProc, Proc, bin_path, parse_kv};

/// One node: its sidecar and fold-node sharing a data directory, on loopback.
pub struct Node {
    pub sidecar: Proc,
    pub node: NodeProc,
    pub id: String,
    pub p2p: String,
    pub sidecar_admin: String,
    _dir: tempfile::TempDir,
}

/// Start a node with `node_flags` for its fold-node (panics when it cannot: test support).
pub fn start(node_flags: &[&str]) -> Node {
    start_with(&[], node_flags)
}

/// Start a node with `sidecar_flags` for its sidecar (listening on loopback TCP unless they
/// include `--listen`) and `node_flags` for its fold-node.
pub fn start_with(sidecar_flags: &[&str], node_flags: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut flags: Vec<&str> = sidecar_flags.to_vec();
    if !flags.contains(&"--listen") {
        flags.extend(["--listen", "/ip4/127.0.0.1/tcp/0"]);
    }
    let (sidecar, id, p2p, sidecar_admin) = spawn_sidecar(dir.path(), &flags);
    let node = NodeProc::start(dir.path(), node_flags).unwrap();
    Node {
        sidecar,
        node,
        id,
        p2p,
        sidecar_admin,
        _dir: dir,
    }
}

/// (process, node id, first listen address with /p2p, admin address)
fn spawn_sidecar(dir: &std::path::Path, flags: &[&str]) -> (Proc, String, String, String) {
    let mut cmd = Command::new(bin_path("p2p-sidecar"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(flags);
    let (sidecar, line) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20)).unwrap();
    let id = parse_kv(&line, "node_id").unwrap();
    let first = parse_kv(&line, "listen")
        .unwrap()
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string();
    let p2p = format!("{first}/p2p/{id}");
    let sidecar_admin = parse_kv(&line, "admin").unwrap();
    (sidecar, id, p2p, sidecar_admin)
}

impl Node {
    /// The data directory the sidecar and the node share.
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Stop the sidecar (SIGTERM, waiting for it to exit), then start it again on the same data
    /// directory with `sidecar_flags` (which must include `--listen`). The fold-node keeps
    /// running and reconnects to it.
    pub fn restart_sidecar(&mut self, sidecar_flags: &[&str]) {
        self.sidecar.sigterm();
        assert!(
            self.sidecar.wait_exit(Duration::from_secs(10)).is_some(),
            "the sidecar did not stop on SIGTERM"
        );
        let (sidecar, id, p2p, admin) = spawn_sidecar(self._dir.path(), sidecar_flags);
        assert_eq!(id, self.id, "the identity survives a restart");
        self.sidecar = sidecar;
        self.p2p = p2p;
        self.sidecar_admin = admin;
    }

    pub async fn trust(&self, peer: &str, distance: u32) {
        self.node
            .owner_network()
            .set_trust(SetTrustRequest {
                entry: Some(TrustEntry {
                    node_id: peer.into(),
                    distance,
                    denied: false,
                }),
                remove: false,
            })
            .await
            .unwrap();
    }

    /// Dial `other` from this node (as its owner) and wait until the link is up.
    pub async fn dial(&self, other: &Node) {
        let p2p = other.p2p.clone();
        let r = eventually("the dial to succeed", Duration::from_secs(15), || {
            let p2p = p2p.clone();
            async move {
                self.node
                    .owner_network()
                    .dial(DialRequest { address: p2p })
                    .await
                    .ok()
            }
        })
        .await
        .unwrap();
        assert_eq!(r.into_inner().node_id, other.id);
    }
}
