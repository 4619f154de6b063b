//! A NAT lab in network namespaces: two private networks, each behind a NAT namespace that
//! masquerades (nftables), and a "public" segment with a relay node and one more public node.
//!
//! ```text
//!                  public segment 203.0.113.0/24 (a bridge inside the relay's namespace)
//!     relay .10 ──┬── public .11 ──┬── nat1 .21 (wan) ──┬── nat2 .22 (wan)
//!                                   nat1 10.1.0.1 (lan)     nat2 10.2.0.1 (lan)
//!                                   a    10.1.0.2           b    10.2.0.2
//! ```
//!
//! Built on a [`TestNet`] (one namespace per box, each with a management address on the test
//! bridge, through which the test drives the fold-nodes' gRPC APIs). The lab's own links are veth
//! pairs created directly inside the namespaces, so they never touch the host namespace; the
//! NATed hosts' default route points at their NAT namespace, the NAT and public namespaces have no
//! default route at all, and the NAT namespaces refuse to forward anything to or from the
//! management interface. Sidecars listen only on lab addresses and run without mDNS. Dropping the
//! lab deletes the namespaces, and with them every link and nftables rule in them.
//!
//! NAT behaviour ([`NatKind`]):
//! - [`NatKind::EndpointIndependent`]: `masquerade` (Linux keeps the source port when it is free,
//!   so one internal port maps to the same public port whatever the destination), and — like a
//!   home router — unsolicited inbound packets on the wan side are dropped silently. Hole
//!   punching (simultaneous open) can get through.
//! - [`NatKind::PerDestination`]: `masquerade fully-random`: every new flow gets a random public
//!   port, so the port a peer observed through the relay is useless for anyone else, and hole
//!   punching cannot succeed.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use fold_proto::v1::{
    DialRequest, ListPeersRequest, NetworkStatusRequest, NetworkStatusResponse, PeerInfo,
    relay_reservation,
};

use crate::client::network;
use crate::mesh::{Host, P2P_PORT, eventually, flags, host};
use crate::netns::TestNet;
use crate::process::{Proc, bin_path, parse_kv};

pub const RELAY: usize = 0;
pub const PUBLIC: usize = 1;
pub const NAT1: usize = 2;
pub const NAT2: usize = 3;
pub const A: usize = 4;
pub const B: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    EndpointIndependent,
    PerDestination,
}

pub struct NatLab {
    pub net: TestNet,
    pub kind: NatKind,
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NatLab {
    pub fn new(kind: NatKind) -> anyhow::Result<NatLab> {
        let net = TestNet::new(6)?;
        let lab = NatLab { net, kind };
        lab.build()?;
        Ok(lab)
    }

    fn ipn(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip")
            .arg("-n")
            .arg(self.net.ns_name(i))
            .args(args))
    }

    fn nft(&self, i: usize, rules: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = self
            .net
            .command(i, "nft")
            .arg("-f")
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run nft (apt-get install nftables; scripts/test.sh installs it)")?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin for nft"))?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {} failed: {}\n{rules}",
                self.net.ns_name(i),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn sysctl(&self, i: usize, key: &str, value: &str) -> anyhow::Result<()> {
        run(self
            .net
            .command(i, "sysctl")
            .arg("-qw")
            .arg(format!("{key}={value}")))
        .map(drop)
    }

    /// A veth pair from namespace `i` (named `a`) to namespace `j` (named `b`), both up.
    fn link(&self, i: usize, a: &str, j: usize, b: &str) -> anyhow::Result<()> {
        let nj = self.net.ns_name(j);
        self.ipn(
            i,
            &[
                "link", "add", a, "type", "veth", "peer", "name", b, "netns", &nj,
            ],
        )?;
        self.ipn(i, &["link", "set", a, "up"])?;
        self.ipn(j, &["link", "set", b, "up"])?;
        Ok(())
    }

    fn build(&self) -> anyhow::Result<()> {
        // The public segment: a bridge inside the relay's namespace.
        self.ipn(RELAY, &["link", "add", "pub", "type", "bridge"])?;
        self.ipn(RELAY, &["link", "set", "pub", "up"])?;
        self.ipn(RELAY, &["addr", "add", "203.0.113.10/24", "dev", "pub"])?;
        for (i, port, addr) in [
            (PUBLIC, "port1", "203.0.113.11/24"),
            (NAT1, "port2", "203.0.113.21/24"),
            (NAT2, "port3", "203.0.113.22/24"),
        ] {
            self.link(RELAY, port, i, "wan")?;
            self.ipn(RELAY, &["link", "set", port, "master", "pub"])?;
            self.ipn(i, &["addr", "add", addr, "dev", "wan"])?;
        }
        // The private networks behind the NATs.
        for (nat, inner, net) in [(NAT1, A, 1), (NAT2, B, 2)] {
            self.link(nat, "lan", inner, "lan")?;
            self.ipn(
                nat,
                &["addr", "add", &format!("10.{net}.0.1/24"), "dev", "lan"],
            )?;
            self.ipn(
                inner,
                &["addr", "add", &format!("10.{net}.0.2/24"), "dev", "lan"],
            )?;
            self.ipn(
                inner,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.{net}.0.1"),
                    "dev",
                    "lan",
                ],
            )?;
            self.sysctl(nat, "net.ipv4.ip_forward", "1")?;
            let masquerade = match self.kind {
                NatKind::EndpointIndependent => "masquerade",
                NatKind::PerDestination => "masquerade fully-random",
            };
            self.nft(
                nat,
                &format!(
                    "table ip foldnat {{
  chain postnat {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" ip saddr 10.{net}.0.0/24 {masquerade}
  }}
  chain forwarding {{ type filter hook forward priority filter; policy drop;
    iifname \"lan\" oifname \"wan\" accept
    iifname \"wan\" oifname \"lan\" ct state established,related accept
  }}
  chain inbound {{ type filter hook input priority filter; policy accept;
    iifname \"wan\" ct state established,related accept
    iifname \"wan\" drop
  }}
}}
"
                ),
            )?;
        }
        // Nothing in the lab reaches beyond it: no default route outside the NATed hosts, and
        // theirs points into the lab.
        for i in [RELAY, PUBLIC, NAT1, NAT2] {
            let routes = self.ipn(i, &["route", "show"])?;
            if routes.contains("default") {
                bail!("lab namespace {} has a default route", self.net.ns_name(i));
            }
        }
        for i in [A, B] {
            let r = self.ipn(i, &["route", "get", "203.0.113.10"])?;
            if !r.contains("dev lan") {
                bail!(
                    "{}: the public segment is not reached through its NAT: {r}",
                    self.net.ns_name(i)
                );
            }
        }
        Ok(())
    }

    /// The lab (p2p) address of box `i`.
    pub fn lab_addr(i: usize) -> Ipv4Addr {
        match i {
            RELAY => Ipv4Addr::new(203, 0, 113, 10),
            PUBLIC => Ipv4Addr::new(203, 0, 113, 11),
            NAT1 => Ipv4Addr::new(203, 0, 113, 21),
            NAT2 => Ipv4Addr::new(203, 0, 113, 22),
            A => Ipv4Addr::new(10, 1, 0, 2),
            _ => Ipv4Addr::new(10, 2, 0, 2),
        }
    }

    /// Make host `i` (not started): a fold-node driven over the management bridge.
    pub fn host(&self, i: usize) -> anyhow::Result<Host> {
        host(&self.net, i)
    }

    /// Start the sidecar of `h` listening (TCP and QUIC) on its lab address only, without mDNS.
    pub fn start_sidecar(&self, h: &mut Host, extra: &[String]) -> anyhow::Result<String> {
        let ip = Self::lab_addr(h.index);
        let mut cmd = self.net.command(h.index, bin_path("p2p-sidecar"));
        cmd.arg("--data-dir")
            .arg(&h.data_dir)
            .arg("--listen")
            .arg(format!("/ip4/{ip}/tcp/{P2P_PORT}"))
            .arg("--listen")
            .arg(format!("/ip4/{ip}/udp/{P2P_PORT}/quic-v1"))
            .args(["--mdns", "off", "--admin-listen", "127.0.0.1:9465"])
            .args(extra)
            .env(
                "RUST_LOG",
                "info,libp2p_mdns=warn,libp2p_dcutr=debug,libp2p_relay=debug,libp2p_autonat=debug",
            );
        let (proc, line) = Proc::spawn(cmd, "p2p-sidecar ready", Duration::from_secs(20))
            .with_context(|| format!("sidecar of lab box {}", h.index))?;
        h.node_id = parse_kv(&line, "node_id").ok_or_else(|| anyhow!("no node_id in {line}"))?;
        h.sidecar = Some(proc);
        Ok(line)
    }

    /// The sidecar's lab multiaddr (TCP) with its node id.
    pub fn p2p_addr(h: &Host) -> String {
        format!(
            "/ip4/{}/tcp/{P2P_PORT}/p2p/{}",
            Self::lab_addr(h.index),
            h.node_id
        )
    }
}

/// The lab with its four nodes (fold-node + p2p-sidecar each) started.
pub struct Lab {
    pub lab: NatLab,
    pub relay: Host,
    pub public: Host,
    pub a: Host,
    pub b: Host,
}

const OPEN: &[&str] = &["--unknown-peer-distance", "0"];

impl Lab {
    /// Build the lab and start its nodes: the public node, the relay (--relay-server,
    /// bootstrapping to the public node, which then dials it too, so each has an outbound
    /// connection to ask for AutoNAT dial-backs over), and A and B behind their NATs with the
    /// relay as their only bootstrap peer. Every node accepts unknown peers (distance 0).
    pub async fn start(kind: NatKind) -> anyhow::Result<Lab> {
        let lab = NatLab::new(kind)?;
        let mut public = lab.host(PUBLIC)?;
        lab.start_sidecar(&mut public, &[])?;
        public.start_node(&lab.net, &flags(OPEN))?;

        // The relay serves once AutoNAT confirmed it reachable (libp2p's relay service
        // advertises itself only with a confirmed external address).
        let mut relay = lab.host(RELAY)?;
        lab.start_sidecar(
            &mut relay,
            &flags(&["--relay-server", "--bootstrap", &NatLab::p2p_addr(&public)]),
        )?;
        relay.start_node(&lab.net, &flags(OPEN))?;
        // (Retried until the public node's link to its sidecar is up.)
        let relay_addr = NatLab::p2p_addr(&relay);
        let r = eventually(
            "the public node to dial the relay",
            Duration::from_secs(20),
            || async {
                network(&public.grpc())
                    .dial(DialRequest {
                        address: relay_addr.clone(),
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            },
        )
        .await?;
        if r.node_id != relay.node_id {
            bail!("the public node reached {} instead of the relay", r.node_id);
        }

        let boot = flags(&["--bootstrap", &NatLab::p2p_addr(&relay)]);
        let mut a = lab.host(A)?;
        lab.start_sidecar(&mut a, &boot)?;
        a.start_node(&lab.net, &flags(OPEN))?;
        let mut b = lab.host(B)?;
        lab.start_sidecar(&mut b, &boot)?;
        b.start_node(&lab.net, &flags(OPEN))?;
        Ok(Lab {
            lab,
            relay,
            public,
            a,
            b,
        })
    }
}

/// The node's Network status (None while it does not answer).
pub async fn status(h: &Host) -> Option<NetworkStatusResponse> {
    network(&h.grpc())
        .status(NetworkStatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `id` in `h`'s peer list, if connected.
pub async fn peer(h: &Host, id: &str) -> Option<PeerInfo> {
    network(&h.grpc())
        .list_peers(ListPeersRequest {
            include_disconnected: false,
        })
        .await
        .ok()?
        .into_inner()
        .peers
        .into_iter()
        .find(|p| p.node_id == id && p.connected)
}

/// Wait (at most 60 s) until `h` holds a reservation on `relay`, learned from `source`;
/// returns its relayed address (`.../p2p-circuit/p2p/<h>`).
pub async fn reserved(h: &Host, relay: &Host, source: &str) -> anyhow::Result<String> {
    let st = eventually("a relay reservation", Duration::from_secs(60), || async {
        status(h).await.filter(|s| {
            s.relays.iter().any(|r| {
                r.relay_node_id == relay.node_id
                    && r.state == relay_reservation::State::Reserved as i32
                    && !r.circuit_addr.is_empty()
            })
        })
    })
    .await?;
    let r = st
        .relays
        .iter()
        .find(|r| r.relay_node_id == relay.node_id)
        .ok_or_else(|| anyhow!("no reservation on the relay"))?;
    if r.source != source {
        bail!(
            "the relay came from {} instead of {source}: {r:?}",
            r.source
        );
    }
    if !(r.circuit_addr.contains("/p2p-circuit/p2p/") && r.circuit_addr.ends_with(&h.node_id)) {
        bail!("not a relayed address of {}: {r:?}", h.node_id);
    }
    Ok(r.circuit_addr.clone())
}
