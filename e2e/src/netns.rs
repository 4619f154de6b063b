//! Several hosts on one machine: Linux network namespaces joined by a bridge with no uplink.
//!
//! Safety rules (DESIGN.md §7): every test network gets its own bridge and /24 out of
//! 198.18.0.0/15; the bridge lives in the host namespace with an address of its own in that /24
//! (so a test driver reaches the hosts on-link), and before anything starts the harness checks
//! that `ip route get <host addr>` goes through that bridge. Namespaces get no default route, only
//! `lo`, their `eth0` on the bridge, and a multicast route so mDNS stays on the bridge. Everything
//! is removed when the [`TestNet`] is dropped, also when a test panics; a later run reclaims what
//! a killed run left behind.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Test networks possible at once: 198.18.0.0/15 holds 512 /24s.
const SLOTS: u32 = 512;
const LOCK_DIR: &str = "/run/foldmesh-netns";

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2); scripts/test.sh installs it")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ...` where failure is fine (cleanup of things that may not exist).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn names(slot: u32) -> (String, String) {
    (format!("fmb{slot}"), format!("fm{slot}h"))
}

fn subnet(slot: u32) -> (u8, u8) {
    (if slot < 256 { 18 } else { 19 }, (slot % 256) as u8)
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove every trace of a slot (bridge, veths, namespaces) — for stale leftovers and for Drop.
fn scrub(slot: u32, hosts: usize) {
    let (bridge, prefix) = names(slot);
    for i in 0..hosts.max(16) {
        ip_quiet(&["link", "del", &format!("{prefix}{i}v")]);
        ip_quiet(&["netns", "del", &format!("{prefix}{i}")]);
    }
    ip_quiet(&["link", "del", &bridge]);
}

/// Claim a free slot with an O_EXCL lock file holding our pid; reclaim slots of dead pids.
fn claim_slot() -> anyhow::Result<(u32, PathBuf)> {
    fs::create_dir_all(LOCK_DIR)
        .with_context(|| format!("cannot create {LOCK_DIR} (root needed)"))?;
    let start = std::process::id() % SLOTS;
    for k in 0..SLOTS {
        let slot = (start + k * 7) % SLOTS;
        let path = PathBuf::from(format!("{LOCK_DIR}/{slot}.lock"));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                writeln!(f, "{}", std::process::id())?;
                // Whatever a crashed earlier owner left in this slot goes first.
                scrub(slot, 16);
                return Ok((slot, path));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                if let Some(pid) = owner
                    && !pid_alive(pid)
                {
                    scrub(slot, 16);
                    let _ = fs::remove_file(&path);
                }
            }
            Err(e) => return Err(e).context("cannot create a slot lock file"),
        }
    }
    bail!("no free test network slot in 198.18.0.0/15")
}

/// A bridged network of `n` namespaced hosts.
pub struct TestNet {
    slot: u32,
    lock: PathBuf,
    hosts: usize,
}

impl TestNet {
    pub fn new(hosts: usize) -> anyhow::Result<TestNet> {
        if hosts == 0 || hosts > 200 {
            bail!("a test network has 1..=200 hosts");
        }
        let (slot, lock) = claim_slot()?;
        let net = TestNet { slot, lock, hosts };
        net.build().inspect_err(|_| {
            scrub(slot, hosts);
        })?;
        Ok(net)
    }

    fn build(&self) -> anyhow::Result<()> {
        let (bridge, _) = names(self.slot);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.bridge_addr()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..self.hosts {
            let ns = self.ns_name(i);
            let veth = self.veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.host_addr(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            let routes = ip(&["-n", &ns, "route", "show"])?;
            if routes.contains("default") {
                bail!("namespace {ns} has a default route; refusing to continue");
            }
        }
        // Traffic from the host namespace to the hosts must go out through our bridge only.
        for i in 0..self.hosts {
            let route = ip(&["route", "get", &self.host_addr(i).to_string()])?;
            if !route.contains(&format!("dev {bridge}")) {
                bail!(
                    "route to {} does not use bridge {bridge}: {route}",
                    self.host_addr(i)
                );
            }
        }
        Ok(())
    }

    fn veth(&self, i: usize) -> String {
        format!("{}{i}v", names(self.slot).1)
    }

    pub fn hosts(&self) -> usize {
        self.hosts
    }

    pub fn ns_name(&self, i: usize) -> String {
        format!("{}{i}", names(self.slot).1)
    }

    pub fn bridge_name(&self) -> String {
        names(self.slot).0
    }

    pub fn bridge_addr(&self) -> Ipv4Addr {
        let (b, c) = subnet(self.slot);
        Ipv4Addr::new(198, b, c, 1)
    }

    pub fn host_addr(&self, i: usize) -> Ipv4Addr {
        let (b, c) = subnet(self.slot);
        Ipv4Addr::new(198, b, c, 10 + i as u8)
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns_name(i)).arg(program);
        c
    }

    /// Partition host `i` from the others (its bridge port goes down).
    pub fn link_down(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.veth(i), "down"]).map(drop)
    }

    pub fn link_up(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.veth(i), "up"]).map(drop)
    }

    /// Give host `i` a hosts-file entry (`/etc/netns/<ns>/hosts`, which `ip netns exec`
    /// bind-mounts over /etc/hosts), so names resolve inside the namespace.
    pub fn set_hosts_file(&self, i: usize, entries: &[(String, Ipv4Addr)]) -> anyhow::Result<()> {
        let dir = PathBuf::from(format!("/etc/netns/{}", self.ns_name(i)));
        fs::create_dir_all(&dir)?;
        let mut text = String::from("127.0.0.1 localhost\n");
        for (name, addr) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        fs::write(dir.join("hosts"), text)?;
        // Names resolve from the hosts file only: no resolver outside the namespace is asked.
        fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        Ok(())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        scrub(self.slot, self.hosts);
        for i in 0..self.hosts {
            let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.ns_name(i)));
        }
        let _ = fs::remove_file(&self.lock);
    }
}
