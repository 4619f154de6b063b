//! A foldmesh node (fold-node + p2p-sidecar) inside one host of a [`TestNet`], and small waiting
//! helpers for mesh tests.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use crate::netns::TestNet;
use crate::process::{Proc, bin_path, parse_kv};

pub const GRPC_PORT: u16 = 50051;
pub const P2P_PORT: u16 = 4001;

/// One node of a test mesh.
pub struct Host {
    pub index: usize,
    pub addr: Ipv4Addr,
    pub ns: String,
    pub data_dir: PathBuf,
    pub node: Option<Proc>,
    pub sidecar: Option<Proc>,
    pub node_id: String,
    _dir: tempfile::TempDir,
}

impl Host {
    /// `ip:port` of the node's gRPC API, reachable from the test (host namespace).
    pub fn grpc(&self) -> String {
        format!("{}:{GRPC_PORT}", self.addr)
    }

    /// The sidecar's TCP multiaddr with its node id.
    pub fn p2p_addr(&self) -> String {
        format!("/ip4/{}/tcp/{P2P_PORT}/p2p/{}", self.addr, self.node_id)
    }

    /// Start (or restart) the sidecar with extra flags; returns its ready line.
    pub fn start_sidecar(&mut self, net: &TestNet, extra: &[String]) -> anyhow::Result<String> {
        let mut cmd = net.command(self.index, bin_path("p2p-sidecar"));
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("/ip4/{}/tcp/{P2P_PORT}", self.addr))
            .arg("--listen")
            .arg(format!("/ip4/{}/udp/{P2P_PORT}/quic-v1", self.addr))
            .args(["--admin-listen", "127.0.0.1:9465"])
            .args(extra)
            .env("RUST_LOG", "info,libp2p_mdns=warn");
        let (proc, line) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20))
            .with_context(|| format!("sidecar of host {}", self.index))?;
        self.node_id = parse_kv(&line, "node_id").ok_or_else(|| anyhow!("no node_id in {line}"))?;
        self.sidecar = Some(proc);
        Ok(line)
    }

    pub fn start_node(&mut self, net: &TestNet, extra: &[String]) -> anyhow::Result<()> {
        let mut cmd = net.command(self.index, bin_path("fold-node"));
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.grpc())
            .args(["--admin-listen", "127.0.0.1:9464"])
            .args(extra)
            .env("RUST_LOG", "info");
        let (proc, _) = Proc::spawn(cmd, "fold-node ready", Duration::from_secs(20))
            .with_context(|| format!("fold-node of host {}", self.index))?;
        self.node = Some(proc);
        Ok(())
    }
}

/// Make host `i` of `net` (not started).
pub fn host(net: &TestNet, i: usize) -> anyhow::Result<Host> {
    let dir = tempfile::tempdir()?;
    Ok(Host {
        index: i,
        addr: net.host_addr(i),
        ns: net.ns_name(i),
        data_dir: dir.path().to_path_buf(),
        node: None,
        sidecar: None,
        node_id: String::new(),
        _dir: dir,
    })
}

/// Start a node with its sidecar on host `i`.
pub fn start_host(
    net: &TestNet,
    i: usize,
    sidecar_flags: &[String],
    node_flags: &[String],
) -> anyhow::Result<Host> {
    let mut h = host(net, i)?;
    h.start_sidecar(net, sidecar_flags)?;
    h.start_node(net, node_flags)?;
    Ok(h)
}

/// Retry `f` until it returns `Some`, at most `timeout`; the error says what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn flags(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
