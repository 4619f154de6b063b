//! Starting the real binaries as processes: wait for their readiness line on stdout, keep their
//! stderr in a log file (shown when a test fails), stop them with SIGTERM or SIGKILL, and kill
//! them when the handle is dropped so no test leaves a process behind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// Path of a workspace binary next to the running test (target/<profile>/<name>).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>; a binary of the workspace
    // (fold-bench) lives in target/<profile> itself.
    let parent = exe.parent().expect("executable in a directory");
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent
            .parent()
            .expect("test executable lives in target/<profile>/deps")
    } else {
        parent
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The value of `key=` in a readiness line such as `fold-node ready grpc=127.0.0.1:5 admin=...`.
pub fn parse_kv(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// A running child process.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    _logdir: Option<tempfile::TempDir>,
    /// Further stdout lines after the readiness line.
    pub stdout: mpsc::Receiver<String>,
}

impl Proc {
    /// Spawn `cmd` and wait (at most `timeout`) for a stdout line starting with `ready_prefix`.
    /// On failure the error carries the tail of the process's stderr.
    pub fn spawn(
        mut cmd: Command,
        ready_prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Proc, String)> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let logdir = tempfile::tempdir()?;
        let log = logdir.path().join("stderr.log");
        let err_file = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(err_file))
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            name,
            child: Some(child),
            log,
            _logdir: Some(logdir),
            stdout: rx,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{} printed no `{ready_prefix}` line within {timeout:?}; stderr:\n{}",
                    p.name,
                    p.stderr_tail(40)
                );
            }
            match p.stdout.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) if line.starts_with(ready_prefix) => return Ok((p, line)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = p.try_status() {
                        bail!(
                            "{} exited ({status}) before it was ready; stderr:\n{}",
                            p.name,
                            p.stderr_tail(40)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = p.wait_exit(Duration::from_secs(2));
                    bail!(
                        "{} closed stdout before it was ready ({status:?}); stderr:\n{}",
                        p.name,
                        p.stderr_tail(40)
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `n` lines of the process's stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let mut lines: VecDeque<&str> = VecDeque::new();
        for l in text.lines() {
            lines.push_back(l);
            if lines.len() > n {
                lines.pop_front();
            }
        }
        lines.into_iter().collect::<Vec<_>>().join("\n")
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // A plain syscall on a child we own; no memory is involved.
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGSTOP: the process hangs (its sockets stay open) until [`Proc::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(5));
    }

    /// Wait for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if std::thread::panicking() {
                eprintln!(
                    "---- {} stderr (last lines) ----\n{}",
                    self.name,
                    self.stderr_tail(60)
                );
            }
        }
    }
}

/// A fold-node on loopback with free ports, for tests.
pub struct NodeProc {
    pub proc: Proc,
    /// `127.0.0.1:PORT` of the gRPC API.
    pub grpc: String,
    /// `127.0.0.1:PORT` of the admin HTTP port.
    pub admin: String,
    /// The owner listener (`owner=` of the ready line; a Unix socket by default).
    pub owner: Option<String>,
    pub data_dir: PathBuf,
}

impl NodeProc {
    /// Start fold-node on `data_dir` with free loopback ports and `extra` flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<NodeProc> {
        let mut cmd = Command::new(bin_path("fold-node"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info");
        let (proc, line) = Proc::spawn(cmd, "fold-node ready", Duration::from_secs(20))?;
        let grpc = parse_kv(&line, "grpc").ok_or_else(|| anyhow!("no grpc= in {line}"))?;
        let admin = parse_kv(&line, "admin").unwrap_or_default();
        let owner = parse_kv(&line, "owner");
        Ok(NodeProc {
            proc,
            grpc,
            admin,
            owner,
            data_dir: data_dir.to_path_buf(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A FoldNode client on the owner listener: every call there is the node's owner.
    pub fn owner_fold(
        &self,
    ) -> fold_proto::v1::fold_node_client::FoldNodeClient<tonic::transport::Channel> {
        fold_proto::v1::fold_node_client::FoldNodeClient::new(self.owner_channel())
    }

    /// A Network client on the owner listener.
    pub fn owner_network(
        &self,
    ) -> fold_proto::v1::network_client::NetworkClient<tonic::transport::Channel> {
        fold_proto::v1::network_client::NetworkClient::new(self.owner_channel())
    }

    fn owner_channel(&self) -> tonic::transport::Channel {
        let addr = self
            .owner
            .as_deref()
            .expect("this node has no owner listener (--owner-listen off)");
        let addr: local_link::LinkAddr = addr.parse().expect("a link address");
        local_link::channel(&addr, Duration::from_secs(3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_lines() {
        let l = "fold-node ready grpc=127.0.0.1:5 peer_requests=unix:/x admin=127.0.0.1:6";
        assert_eq!(parse_kv(l, "grpc").as_deref(), Some("127.0.0.1:5"));
        assert_eq!(parse_kv(l, "admin").as_deref(), Some("127.0.0.1:6"));
        assert_eq!(parse_kv(l, "nope"), None);
    }
}
