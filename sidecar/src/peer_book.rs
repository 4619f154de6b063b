//! The peer book: what this sidecar knows about other nodes (addresses, connections, round-trip
//! time, what identify reported, how it was found), when to redial them, and its file.
//!
//! Bounded: at most [`MAX_PEERS`] peers (the longest-unseen disconnected one is forgotten first)
//! and [`MAX_ADDRS_PER_PEER`] addresses each. Peers this node has been connected to ("known"
//! peers) and bootstrap peers are redialled while disconnected, each on its own exponential
//! backoff with jitter ([`backoff`], [`with_jitter`]); an address that fails
//! [`MAX_ADDR_FAILURES`] dials in a row is dropped, and a peer left with no address is forgotten
//! unless it is a bootstrap peer. Known peers are saved to `<data-dir>/peers.json`
//! ([`save_file`], [`load_file`]) and redialled after a restart. The saved file is bounded as it
//! is written ([`MAX_SAVED_ADDRS_PER_PEER`], [`MAX_SAVED_ADDR_BYTES`], [`MAX_SAVED_BYTES`]), with
//! trusted (configured) and long-known peers ahead of newcomers, so it is never a file the next
//! start would refuse to load.
//!
//! Loopback and link-local addresses a peer reports are not learned ([`learnable`]) unless this
//! node reached that peer over loopback itself (all nodes on one host): from another host they
//! name the dialler's own machine (go-libp2p's `manet.IsIPLoopback`/`IsIP6LinkLocal` filters,
//! rust-libp2p's `Multiaddr` global-address checks).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fold_proto::v1::PeerInfo;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Addresses remembered per peer.
pub const MAX_ADDRS_PER_PEER: usize = 16;
/// Peers remembered (connected ones are never forgotten).
pub const MAX_PEERS: usize = 4096;
/// Known peers written to the peers file (the most recently seen first).
pub const MAX_SAVED_PEERS: usize = 1024;
/// Largest peers file read at start; a larger one is ignored (with a warning).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Consecutive failed dials after which an address is dropped.
pub const MAX_ADDR_FAILURES: u32 = 10;
/// The first redial delay after a failure; it doubles with each further failure...
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// ...up to this cap.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Each delay is spread by up to this fraction either way, so peers do not redial in step.
pub const JITTER: f64 = 0.2;
/// A redial in flight is not repeated for this long (its outcome reschedules it sooner).
pub const DIAL_GUARD: Duration = Duration::from_secs(30);
/// Redials started per call of [`PeerBook::due_redials`] (the event loop calls it every second).
pub const MAX_REDIALS_PER_TICK: usize = 16;
/// A connection that stayed up this long resets its peer's backoff; one that closed sooner
/// counts as a failed dial (a peer that accepts and then drops us is not redialled every second).
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Addresses saved per peer (the most recently learned; in memory a peer has up to
/// [`MAX_ADDRS_PER_PEER`]).
pub const MAX_SAVED_ADDRS_PER_PEER: usize = 8;
/// Longest address saved, in bytes of its text form; longer ones are kept in memory only.
pub const MAX_SAVED_ADDR_BYTES: usize = 512;
/// Budget of the whole peers file as written: a quarter of what [`load_file`] accepts, so a file
/// this sidecar writes is always one it loads.
pub const MAX_SAVED_BYTES: usize = (MAX_FILE_BYTES / 4) as usize;
/// The file's format version.
const FILE_VERSION: u32 = 1;

/// Whether `a` only makes sense on the host that reported it: loopback (127.0.0.0/8, ::1,
/// `localhost`), link-local (169.254.0.0/16, fe80::/10) or unspecified (0.0.0.0, ::).
pub fn is_host_local(a: &Multiaddr) -> bool {
    match a.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback() || ip.is_link_local() || ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_unicast_link_local()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_link_local())
        }
        Some(Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) | Protocol::Dnsaddr(h)) => {
            let h = h.trim_end_matches('.').to_ascii_lowercase();
            h == "localhost" || h.ends_with(".localhost")
        }
        _ => false,
    }
}

/// Whether an address a peer reported may be stored and dialled: anything but a host-local one
/// ([`is_host_local`]), which only when this node reached that peer over loopback itself.
pub fn learnable(a: &Multiaddr, reached_over_loopback: bool) -> bool {
    reached_over_loopback || !is_host_local(a)
}

/// Whether a connection's remote address is a loopback one (the peer runs on this host).
pub fn is_loopback_remote(remote: &Multiaddr) -> bool {
    match remote.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        _ => false,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The redial delay after `failures` consecutive failures (none: no delay): 1 s, 2 s, 4 s, …
/// capped at [`BACKOFF_CAP`].
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let shift = (failures - 1).min(20);
    BACKOFF_BASE
        .checked_mul(1u32 << shift)
        .unwrap_or(BACKOFF_CAP)
        .min(BACKOFF_CAP)
}

/// `d` spread by ±[`JITTER`]: `unit` in [0, 1) picks the point (0.5 is `d` itself).
pub fn with_jitter(d: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    d.mul_f64(1.0 + JITTER * (2.0 * unit - 1.0))
}

/// A random number in [0, 1) for jitter (std's randomly keyed hasher over a counter: no
/// dependency, and plenty for spreading timers).
pub fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Default)]
pub struct PeerEntry {
    pub addrs: Vec<Multiaddr>,
    pub connections: u32,
    pub rtt: Option<Duration>,
    pub protocols: Vec<String>,
    pub agent: String,
    pub source: &'static str,
    pub last_seen: Option<Instant>,
    /// "direct" or "relayed", and the transport, of the latest connection.
    pub connection: &'static str,
    pub transport: &'static str,
    /// Connected to at some time (or read from the peers file): redialled, and saved.
    pub known: bool,
    /// Configured with --bootstrap: redialled, never forgotten.
    pub bootstrap: bool,
    /// Consecutive failed dials of this peer (0 after a connection).
    pub dial_failures: u32,
    /// No redial before this time.
    pub next_dial: Option<Instant>,
    /// Consecutive failed dials per address (only addresses in `addrs`).
    pub addr_failures: HashMap<Multiaddr, u32>,
    /// When the latest connection came up.
    pub connected_at: Option<Instant>,
    /// When this node first connected to the peer (Unix ms; kept in the peers file): long-known
    /// peers keep their places in the saved file ahead of newcomers.
    pub known_since_ms: Option<u64>,
}

/// How a connection to `remote` runs: ("direct" | "relayed", "tcp" | "quic" | "memory" | "").
pub fn connection_kind(remote: &Multiaddr) -> (&'static str, &'static str) {
    let relayed = remote.iter().any(|p| matches!(p, Protocol::P2pCircuit));
    // The transport of a relayed connection is the one to the relay (the first hop).
    let transport = remote
        .iter()
        .find_map(|p| match p {
            Protocol::QuicV1 | Protocol::Quic => Some("quic"),
            Protocol::Tcp(_) => Some("tcp"),
            Protocol::Memory(_) => Some("memory"),
            _ => None,
        })
        .unwrap_or("");
    (if relayed { "relayed" } else { "direct" }, transport)
}

/// How a connection runs, from its endpoint. An inbound relayed connection's remote address is
/// only `/p2p/<peer>`; its local address is the reservation's `<relay>/p2p-circuit`.
pub fn endpoint_kind(endpoint: &libp2p::core::ConnectedPoint) -> (&'static str, &'static str) {
    match endpoint {
        libp2p::core::ConnectedPoint::Dialer { address, .. } => connection_kind(address),
        libp2p::core::ConnectedPoint::Listener {
            local_addr,
            send_back_addr,
        } => {
            let (remote, transport) = connection_kind(send_back_addr);
            let (local, local_transport) = connection_kind(local_addr);
            let relayed = remote == "relayed" || local == "relayed";
            let transport = if transport.is_empty() {
                local_transport
            } else {
                transport
            };
            (if relayed { "relayed" } else { "direct" }, transport)
        }
    }
}

impl PeerEntry {
    pub fn add_addr(&mut self, a: Multiaddr) {
        let a = strip_p2p(a);
        if !self.addrs.contains(&a) {
            if self.addrs.len() >= MAX_ADDRS_PER_PEER {
                let old = self.addrs.remove(0);
                self.addr_failures.remove(&old);
            }
            self.addrs.push(a);
        }
    }

    pub fn remove_addr(&mut self, a: &Multiaddr) {
        self.addrs.retain(|x| x != a);
        self.addr_failures.remove(a);
    }

    /// Whether the event loop keeps this peer connected.
    pub fn redialled(&self) -> bool {
        self.known || self.bootstrap
    }
}

/// What [`PeerBook::dial_failed`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DialFailure {
    /// Addresses dropped after too many failures.
    pub dropped: Vec<Multiaddr>,
    /// The peer was forgotten (no address left, not a bootstrap peer).
    pub forgotten: bool,
}

pub fn strip_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// The peer an address reaches: its last `/p2p/<id>` (in a relayed address
/// `<relay>/p2p/<relay id>/p2p-circuit/p2p/<id>` the first one is the relay's).
pub fn peer_of(a: &Multiaddr) -> Option<PeerId> {
    a.iter()
        .filter_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
}

/// Every peer this sidecar knows of.
#[derive(Default)]
pub struct PeerBook {
    peers: HashMap<PeerId, PeerEntry>,
    /// Configured bootstrap addresses (stripped): never dropped.
    pinned: HashSet<Multiaddr>,
    /// Peers trusted by configuration (--allow-peer): saved ahead of every other peer.
    trusted: HashSet<PeerId>,
}

impl PeerBook {
    /// The peer's entry, created (and the book kept within [`MAX_PEERS`]) if new; marks it seen.
    pub fn entry(&mut self, peer: PeerId, source: &'static str) -> &mut PeerEntry {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            // Forget the longest-unseen disconnected peer.
            if let Some(old) = self
                .peers
                .iter()
                .filter(|(_, e)| e.connections == 0)
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(p, _)| *p)
            {
                self.peers.remove(&old);
            }
        }
        let e = self.peers.entry(peer).or_insert_with(|| PeerEntry {
            source,
            ..Default::default()
        });
        e.last_seen = Some(Instant::now());
        e
    }

    pub fn get(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.peers.get(peer)
    }

    pub fn get_mut(&mut self, peer: &PeerId) -> Option<&mut PeerEntry> {
        self.peers.get_mut(peer)
    }

    pub fn contains_key(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Peers with at least one open connection.
    pub fn connected_count(&self) -> usize {
        self.peers.values().filter(|e| e.connections > 0).count()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Remember a configured bootstrap peer: redialled, its address never dropped.
    pub fn add_bootstrap(&mut self, peer: PeerId, addr: Multiaddr) {
        let addr = strip_p2p(addr);
        self.pinned.insert(addr.clone());
        let e = self.entry(peer, "bootstrap");
        e.bootstrap = true;
        e.add_addr(addr);
    }

    /// A connection to `peer` is up: it becomes a known peer and a dialled address proved good.
    /// Its backoff is reset when the connection ends after [`STABLE_AFTER`] ([`Self::disconnected`]).
    pub fn connected(&mut self, peer: &PeerId, dialled: Option<&Multiaddr>, now: Instant) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.known = true;
            e.known_since_ms.get_or_insert_with(unix_ms);
            e.next_dial = None;
            e.connected_at = Some(now);
            if let Some(a) = dialled {
                e.addr_failures.remove(&strip_p2p(a.clone()));
            }
        }
    }

    /// The last connection to `peer` closed: a stable one resets the backoff (redial after about
    /// [`BACKOFF_BASE`]), a short-lived one counts as a failure and backs off further.
    pub fn disconnected(&mut self, peer: &PeerId, now: Instant, unit: f64) {
        if let Some(e) = self.peers.get_mut(peer) {
            let stable = e
                .connected_at
                .is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER);
            e.dial_failures = if stable {
                0
            } else {
                e.dial_failures.saturating_add(1)
            };
            let next = now + with_jitter(backoff(e.dial_failures.max(1)), unit);
            // A hold-off (Network.Disconnect) stays in force.
            e.next_dial = Some(e.next_dial.map_or(next, |t| t.max(next)));
        }
    }

    /// A dial of `peer` failed (on `addrs`, those the transport tried): the peer backs off
    /// (`unit` picks the jitter, see [`with_jitter`]), each failed address counts one more failure
    /// and is dropped at [`MAX_ADDR_FAILURES`] (configured bootstrap addresses never are), and a
    /// disconnected peer left with no address is forgotten unless it is a bootstrap peer.
    pub fn dial_failed(
        &mut self,
        peer: &PeerId,
        addrs: &[Multiaddr],
        now: Instant,
        unit: f64,
    ) -> DialFailure {
        let mut out = DialFailure::default();
        let Some(e) = self.peers.get_mut(peer) else {
            return out;
        };
        if e.connections > 0 {
            return out;
        }
        e.dial_failures = e.dial_failures.saturating_add(1);
        e.next_dial = Some(now + with_jitter(backoff(e.dial_failures), unit));
        for a in addrs {
            let a = strip_p2p(a.clone());
            if !e.addrs.contains(&a) {
                continue;
            }
            let n = e.addr_failures.entry(a.clone()).or_insert(0);
            *n = n.saturating_add(1);
            if *n >= MAX_ADDR_FAILURES && !self.pinned.contains(&a) {
                e.remove_addr(&a);
                out.dropped.push(a);
            }
        }
        if e.addrs.is_empty() && !e.bootstrap {
            self.peers.remove(peer);
            out.forgotten = true;
        }
        out
    }

    /// Disconnected known and bootstrap peers whose backoff has passed (at most `limit`), with
    /// their addresses; each is marked as being dialled ([`DIAL_GUARD`]).
    pub fn due_redials(
        &mut self,
        now: Instant,
        local: &PeerId,
        limit: usize,
    ) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut due: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
        for (p, e) in self.peers.iter_mut() {
            if due.len() >= limit {
                break;
            }
            if p == local
                || !e.redialled()
                || e.connections > 0
                || e.addrs.is_empty()
                || e.next_dial.is_some_and(|t| t > now)
            {
                continue;
            }
            e.next_dial = Some(now + DIAL_GUARD);
            due.push((*p, e.addrs.clone()));
        }
        due
    }

    /// Do not redial `peer` for a while (the owner disconnected it on purpose).
    pub fn hold_off(&mut self, peer: &PeerId, now: Instant) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.next_dial = Some(now + BACKOFF_CAP);
        }
    }

    /// The known peers to save, sorted by id, within the file's bounds: at most
    /// [`MAX_SAVED_PEERS`], each with at most [`MAX_SAVED_ADDRS_PER_PEER`] addresses of at most
    /// [`MAX_SAVED_ADDR_BYTES`], and [`MAX_SAVED_BYTES`] in all. Places go first to trusted and
    /// bootstrap peers, then to the longest known, then to the most recently seen, so newcomers
    /// cannot push established peers out.
    pub fn saved(&self, local: &PeerId) -> SavedBook {
        let mut known: Vec<(&PeerId, &PeerEntry)> = self
            .peers
            .iter()
            .filter(|(p, e)| e.known && *p != local && !e.addrs.is_empty())
            .collect();
        known.sort_by(|a, b| {
            let rank = |p: &PeerId, e: &PeerEntry| {
                (
                    std::cmp::Reverse(self.trusted.contains(p) || e.bootstrap),
                    e.known_since_ms.unwrap_or(u64::MAX),
                    std::cmp::Reverse(e.last_seen),
                )
            };
            rank(a.0, a.1)
                .cmp(&rank(b.0, b.1))
                .then_with(|| a.0.cmp(b.0))
        });
        let mut budget = MAX_SAVED_BYTES.saturating_sub(FILE_OVERHEAD);
        let mut peers: Vec<SavedPeer> = Vec::new();
        for (p, e) in known {
            if peers.len() >= MAX_SAVED_PEERS {
                break;
            }
            let addrs: Vec<String> = e
                .addrs
                .iter()
                .rev()
                .map(|a| a.to_string())
                .filter(|a| a.len() <= MAX_SAVED_ADDR_BYTES)
                .take(MAX_SAVED_ADDRS_PER_PEER)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if addrs.is_empty() {
                continue;
            }
            let sp = SavedPeer {
                id: p.to_string(),
                addrs,
                known_since_ms: e.known_since_ms,
            };
            let cost = saved_peer_bytes(&sp);
            if cost > budget {
                break;
            }
            budget -= cost;
            peers.push(sp);
        }
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        SavedBook {
            version: FILE_VERSION,
            peers,
        }
    }

    /// Mark `peer` as trusted by configuration (--allow-peer): first in the saved file.
    pub fn set_trusted(&mut self, peer: PeerId) {
        if self.trusted.len() < MAX_PEERS {
            self.trusted.insert(peer);
        }
    }

    /// Add the peers of a saved book as known peers (due for a redial now). Entries that do not
    /// parse are skipped; returns how many peers were added.
    pub fn restore(&mut self, saved: &SavedBook, local: &PeerId) -> usize {
        let mut n = 0;
        for sp in saved.peers.iter().take(MAX_SAVED_PEERS) {
            let Ok(peer) = sp.id.parse::<PeerId>() else {
                tracing::warn!(id = %sp.id, "peers file: not a peer id; skipped");
                continue;
            };
            if &peer == local {
                continue;
            }
            let addrs: Vec<Multiaddr> = sp
                .addrs
                .iter()
                .take(MAX_ADDRS_PER_PEER)
                .filter_map(|a| a.parse::<Multiaddr>().ok())
                .filter(|a| peer_of(a).is_none_or(|p| p == peer))
                .collect();
            if addrs.is_empty() {
                continue;
            }
            let e = self.entry(peer, "book");
            e.known = true;
            e.known_since_ms = e.known_since_ms.or(sp.known_since_ms);
            for a in addrs {
                e.add_addr(a);
            }
            n += 1;
        }
        n
    }

    /// The peers as the node's API shows them, sorted by id.
    pub fn infos(&self, include_disconnected: bool, local: &PeerId) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .peers
            .iter()
            .filter(|(p, e)| (include_disconnected || e.connections > 0) && *p != local)
            .map(|(p, e)| PeerInfo {
                route_latency_micros: 0,
                route_in_flight: 0,
                route_requests: 0,
                route_failures: 0,
                breaker: String::new(),
                node_id: p.to_string(),
                addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
                connected: e.connections > 0,
                rtt_micros: e
                    .rtt
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
                protocols: e.protocols.clone(),
                agent_version: e.agent.clone(),
                source: e.source.to_string(),
                trust_distance: 0,
                connection: if e.connections > 0 { e.connection } else { "" }.to_string(),
                transport: if e.connections > 0 { e.transport } else { "" }.to_string(),
            })
            .collect();
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        peers
    }
}

/// The peers file: known peers and their addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedBook {
    pub version: u32,
    pub peers: Vec<SavedPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPeer {
    pub id: String,
    pub addrs: Vec<String>,
    /// When this node first connected to the peer (Unix ms); absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_since_ms: Option<u64>,
}

/// Bytes of the file around its peers (version, brackets, indentation).
const FILE_OVERHEAD: usize = 64;

/// An upper bound of the bytes one peer takes in the pretty-printed file: its compact JSON, plus
/// a line of indentation for each address and field.
fn saved_peer_bytes(sp: &SavedPeer) -> usize {
    let compact = serde_json::to_vec(sp).map_or(usize::MAX / 2, |v| v.len());
    compact + 16 * (sp.addrs.len() + 6)
}

/// Read the peers file. A missing file is an empty book; an unreadable, oversized or corrupt one
/// is an empty book and a warning (the sidecar then starts from its bootstrap peers).
pub fn load_file(path: &Path) -> SavedBook {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SavedBook::default(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the peers file; starting with an empty peer book");
            return SavedBook::default();
        }
    };
    let mut text = String::new();
    if let Err(e) = file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot read the peers file; starting with an empty peer book");
        return SavedBook::default();
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        tracing::warn!(path = %path.display(), max_bytes = MAX_FILE_BYTES, "the peers file is too large; starting with an empty peer book");
        return SavedBook::default();
    }
    match serde_json::from_str::<SavedBook>(&text) {
        Ok(b) if b.version == FILE_VERSION => b,
        Ok(b) => {
            tracing::warn!(path = %path.display(), version = b.version, "the peers file has an unknown version; starting with an empty peer book");
            SavedBook::default()
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the peers file is corrupt; starting with an empty peer book");
            SavedBook::default()
        }
    }
}

/// Write the peers file atomically: a temporary file (mode 0600) beside it, synced, then renamed
/// over it.
pub fn save_file(path: &Path, book: &SavedBook) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec_pretty(book).map_err(std::io::Error::other)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // Never write what the next start would refuse to load (and so lose the whole book).
        return Err(std::io::Error::other(format!(
            "the peers file would be {} bytes, above the {MAX_FILE_BYTES} a start reads; not written",
            bytes.len()
        )));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // An older temporary file may have other permissions: set them explicitly.
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn addresses_are_bounded_deduplicated_and_stripped() {
        let mut book = PeerBook::default();
        let p = peer();
        let with_id: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{p}").parse().unwrap();
        book.entry(p, "dial").add_addr(with_id);
        book.entry(p, "dial")
            .add_addr("/ip4/127.0.0.1/tcp/1".parse().unwrap());
        assert_eq!(
            book.get(&p).unwrap().addrs.len(),
            1,
            "stripped and deduplicated"
        );
        for port in 2..40 {
            book.entry(p, "dial")
                .add_addr(format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap());
        }
        assert_eq!(book.get(&p).unwrap().addrs.len(), MAX_ADDRS_PER_PEER);
        assert_eq!(book.get(&p).unwrap().source, "dial");
    }

    #[test]
    fn connections_are_direct_or_relayed() {
        let direct: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        assert_eq!(connection_kind(&direct), ("direct", "tcp"));
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(connection_kind(&quic), ("direct", "quic"));
        let relay = peer();
        let relayed: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit")
            .parse()
            .unwrap();
        assert_eq!(connection_kind(&relayed), ("relayed", "tcp"));
        let inbound_relayed = libp2p::core::ConnectedPoint::Listener {
            local_addr: "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit".parse().unwrap(),
            send_back_addr: "/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".parse().unwrap(),
        };
        assert_eq!(endpoint_kind(&inbound_relayed), ("relayed", "tcp"));
        let (relay, target) = (PeerId::random(), PeerId::random());
        let circuit: Multiaddr =
            format!("/ip4/198.18.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}")
                .parse()
                .unwrap();
        assert_eq!(
            peer_of(&circuit),
            Some(target),
            "a relayed address reaches its last id"
        );
    }

    #[test]
    fn the_book_is_bounded_and_keeps_connected_peers() {
        let mut book = PeerBook::default();
        let connected = peer();
        book.entry(connected, "inbound").connections = 1;
        for _ in 0..MAX_PEERS + 10 {
            book.entry(peer(), "mdns");
        }
        assert_eq!(book.len(), MAX_PEERS);
        assert!(book.contains_key(&connected));
        let local = peer();
        assert_eq!(book.infos(false, &local).len(), 1);
        assert_eq!(book.infos(true, &local).len(), MAX_PEERS);
    }

    #[test]
    fn backoff_doubles_from_one_second_to_the_cap() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
        let mut last = Duration::ZERO;
        for f in 0..100 {
            assert!(backoff(f) >= last, "never shrinks");
            last = backoff(f);
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Duration::from_secs(10);
        assert_eq!(with_jitter(d, 0.5), d);
        assert_eq!(with_jitter(d, 0.0), Duration::from_secs(8));
        assert_eq!(with_jitter(d, 1.0), Duration::from_secs(12));
        assert_eq!(with_jitter(d, f64::NAN), d);
        assert_eq!(with_jitter(d, 7.0), Duration::from_secs(12));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
            let j = with_jitter(d, u);
            assert!(j >= Duration::from_secs(8) && j <= Duration::from_secs(12));
            seen.insert(j.as_millis() / 100);
        }
        assert!(seen.len() > 10, "spread, not one value: {seen:?}");
    }

    #[test]
    fn failing_addresses_are_dropped_and_an_addressless_peer_forgotten() {
        let mut book = PeerBook::default();
        let p = peer();
        let good: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let bad: Multiaddr = "/ip4/127.0.0.1/tcp/2".parse().unwrap();
        let e = book.entry(p, "dial");
        e.add_addr(good.clone());
        e.add_addr(bad.clone());
        let now = Instant::now();
        for i in 1..MAX_ADDR_FAILURES {
            let r = book.dial_failed(&p, std::slice::from_ref(&bad), now, 0.5);
            assert_eq!(r, DialFailure::default());
            let e = book.get(&p).unwrap();
            assert_eq!(e.dial_failures, i);
            assert_eq!(e.next_dial, Some(now + backoff(i)));
        }
        // A stable connection resets the peer's backoff but not the other address's count.
        book.get_mut(&p).unwrap().connections = 1;
        book.connected(&p, Some(&good), now);
        assert_eq!(book.get(&p).unwrap().next_dial, None);
        book.get_mut(&p).unwrap().connections = 0;
        let later = now + STABLE_AFTER;
        book.disconnected(&p, later, 0.5);
        assert_eq!(book.get(&p).unwrap().dial_failures, 0);
        assert_eq!(book.get(&p).unwrap().next_dial, Some(later + BACKOFF_BASE));
        let r = book.dial_failed(&p, std::slice::from_ref(&bad), now, 0.5);
        assert_eq!(r.dropped, vec![bad.clone()]);
        assert!(!r.forgotten);
        assert_eq!(book.get(&p).unwrap().addrs, vec![good.clone()]);
        // The last address goes too: the peer is forgotten.
        let mut last = DialFailure::default();
        for _ in 0..MAX_ADDR_FAILURES {
            last = book.dial_failed(&p, std::slice::from_ref(&good), now, 0.5);
        }
        assert!(last.forgotten);
        assert!(!book.contains_key(&p));
    }

    #[test]
    fn bootstrap_peers_keep_their_address_and_connected_peers_do_not_back_off() {
        let mut book = PeerBook::default();
        let b = peer();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/9/p2p/{b}").parse().unwrap();
        book.add_bootstrap(b, addr);
        for _ in 0..3 * MAX_ADDR_FAILURES {
            let r = book.dial_failed(
                &b,
                &["/ip4/127.0.0.1/tcp/9".parse().unwrap()],
                Instant::now(),
                0.5,
            );
            assert!(r.dropped.is_empty() && !r.forgotten);
        }
        assert_eq!(
            book.get(&b).unwrap().next_dial.map(|t| t > Instant::now()),
            Some(true)
        );
        let c = peer();
        book.entry(c, "dial").connections = 1;
        book.dial_failed(&c, &[], Instant::now(), 0.5);
        assert_eq!(book.get(&c).unwrap().dial_failures, 0);
    }

    #[test]
    fn redials_are_due_after_the_backoff_and_bounded() {
        let mut book = PeerBook::default();
        let local = peer();
        let now = Instant::now();
        let mut ids = Vec::new();
        for i in 0..40 {
            let p = peer();
            let e = book.entry(p, "book");
            e.known = true;
            e.add_addr(format!("/ip4/127.0.0.1/tcp/{}", i + 1).parse().unwrap());
            ids.push(p);
        }
        // Not redialled: unknown, connected, or without an address.
        book.entry(peer(), "dht")
            .add_addr("/ip4/127.0.0.1/tcp/99".parse().unwrap());
        let connected = peer();
        let e = book.entry(connected, "dial");
        e.known = true;
        e.connections = 1;
        e.add_addr("/ip4/127.0.0.1/tcp/98".parse().unwrap());
        book.entry(peer(), "book").known = true;

        let first = book.due_redials(now, &local, MAX_REDIALS_PER_TICK);
        assert_eq!(first.len(), MAX_REDIALS_PER_TICK);
        let mut all: HashSet<PeerId> = first.iter().map(|(p, _)| *p).collect();
        for _ in 0..10 {
            all.extend(
                book.due_redials(now, &local, MAX_REDIALS_PER_TICK)
                    .iter()
                    .map(|(p, _)| *p),
            );
        }
        assert_eq!(
            all,
            ids.iter().copied().collect(),
            "each known peer once, in flight"
        );
        assert!(book.due_redials(now, &local, 100).is_empty());
        // A failure reschedules after the backoff, not the guard.
        book.dial_failed(&ids[0], &[], now, 0.0);
        assert!(book.due_redials(now, &local, 100).is_empty());
        let later = now + Duration::from_millis(800);
        assert_eq!(book.due_redials(later, &local, 100).len(), 1);
    }

    #[test]
    fn the_book_file_round_trips_and_bad_files_are_empty_books() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        let local = peer();
        let mut book = PeerBook::default();
        let known = peer();
        let e = book.entry(known, "dial");
        e.add_addr("/ip4/127.0.0.1/tcp/7".parse().unwrap());
        e.add_addr("/ip4/127.0.0.1/udp/7/quic-v1".parse().unwrap());
        book.connected(&known, None, Instant::now());
        book.entry(peer(), "dht")
            .add_addr("/ip4/127.0.0.1/tcp/8".parse().unwrap());
        let saved = book.saved(&local);
        assert_eq!(saved.peers.len(), 1, "only known peers are saved");
        save_file(&path, &saved).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("peers.json.tmp").exists());
        let loaded = load_file(&path);
        assert_eq!(loaded, saved);
        let mut fresh = PeerBook::default();
        assert_eq!(fresh.restore(&loaded, &local), 1);
        let e = fresh.get(&known).unwrap();
        assert!(e.known && e.addrs.len() == 2 && e.next_dial.is_none());
        assert_eq!(fresh.saved(&local), saved);

        // Missing, corrupt, wrong version, oversized: empty, never a panic.
        assert_eq!(
            load_file(&dir.path().join("nope.json")),
            SavedBook::default()
        );
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(load_file(&path), SavedBook::default());
        std::fs::write(&path, br#"{"version":99,"peers":[]}"#).unwrap();
        assert_eq!(load_file(&path), SavedBook::default());
        std::fs::write(&path, vec![b' '; MAX_FILE_BYTES as usize + 10]).unwrap();
        assert_eq!(load_file(&path), SavedBook::default());
        // Bad entries are skipped, good ones kept.
        let text = format!(
            r#"{{"version":1,"peers":[{{"id":"nope","addrs":["/ip4/1.2.3.4/tcp/1"]}},{{"id":"{known}","addrs":["garbage","/ip4/127.0.0.1/tcp/7"]}},{{"id":"{local}","addrs":["/ip4/127.0.0.1/tcp/1"]}}]}}"#
        );
        std::fs::write(&path, text).unwrap();
        let mut b = PeerBook::default();
        assert_eq!(b.restore(&load_file(&path), &local), 1);
        assert_eq!(b.get(&known).unwrap().addrs.len(), 1);
        assert!(!b.contains_key(&local));
    }

    #[test]
    fn the_saved_book_is_bounded() {
        let mut book = PeerBook::default();
        let local = peer();
        for _ in 0..MAX_SAVED_PEERS + 50 {
            let p = peer();
            book.entry(p, "dial")
                .add_addr("/ip4/127.0.0.1/tcp/1".parse().unwrap());
            book.connected(&p, None, Instant::now());
        }
        assert_eq!(book.saved(&local).peers.len(), MAX_SAVED_PEERS);
    }

    #[test]
    fn a_connection_dropped_at_once_backs_off_like_a_failure() {
        let mut book = PeerBook::default();
        let p = peer();
        book.entry(p, "dial")
            .add_addr("/ip4/127.0.0.1/tcp/1".parse().unwrap());
        let mut now = Instant::now();
        for i in 1..=12u32 {
            book.connected(&p, None, now);
            now += Duration::from_millis(50);
            book.disconnected(&p, now, 0.5);
            let e = book.get(&p).unwrap();
            assert_eq!(e.dial_failures, i);
            assert_eq!(e.next_dial, Some(now + backoff(i)));
        }
        assert_eq!(book.get(&p).unwrap().next_dial, Some(now + BACKOFF_CAP));
        // The address stays: it connects, the peer just does not keep us.
        assert_eq!(book.get(&p).unwrap().addrs.len(), 1);
    }

    #[test]
    fn host_local_addresses_are_learned_only_over_loopback() {
        for a in [
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/127.8.9.1/udp/4001/quic-v1",
            "/ip4/169.254.3.4/tcp/1",
            "/ip4/0.0.0.0/tcp/4001",
            "/ip6/::1/tcp/4001",
            "/ip6/fe80::1/tcp/4001",
            "/ip6/::/tcp/1",
            "/ip6/::ffff:127.0.0.1/tcp/1",
            "/dns4/localhost/tcp/4001",
            "/dns/api.localhost./tcp/4001",
        ] {
            let a: Multiaddr = a.parse().unwrap();
            assert!(is_host_local(&a), "{a}");
            assert!(!learnable(&a, false), "{a}");
            assert!(learnable(&a, true), "{a}");
        }
        for a in [
            "/ip4/198.18.0.2/tcp/4001",
            "/ip4/10.0.0.1/tcp/4001",
            "/ip6/2001:db8::1/tcp/4001",
            "/dns4/node-a/tcp/4001",
            "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        ] {
            let a: Multiaddr = a.parse().unwrap();
            assert!(!is_host_local(&a) && learnable(&a, false), "{a}");
        }
        assert!(is_loopback_remote(&"/ip4/127.0.0.1/tcp/5".parse().unwrap()));
        assert!(!is_loopback_remote(
            &"/ip4/198.18.0.1/tcp/5".parse().unwrap()
        ));
        assert!(!is_loopback_remote(
            &"/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
                .parse()
                .unwrap()
        ));
    }

    /// A long address: a DNS name of about `len` bytes.
    fn long_addr(i: usize, len: usize) -> Multiaddr {
        let label = "x".repeat(60);
        let mut name = format!("n{i}");
        while name.len() + 61 < len.min(250) {
            name = format!("{name}.{label}");
        }
        format!("/dns4/{name}/tcp/{}", 1000 + i % 60000)
            .parse()
            .unwrap()
    }

    #[test]
    fn the_saved_file_is_bounded_in_addresses_and_bytes_and_always_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        let mut book = PeerBook::default();
        let local = peer();
        // Far more than the budget: 600 peers, each with 16 addresses of ~250 bytes.
        for i in 0..600 {
            let p = peer();
            let e = book.entry(p, "dial");
            for j in 0..MAX_ADDRS_PER_PEER {
                e.add_addr(long_addr(i * 100 + j, 250));
            }
            book.connected(&p, None, Instant::now());
        }
        let saved = book.saved(&local);
        assert!(!saved.peers.is_empty());
        assert!(saved.peers.len() < 600, "the byte budget bites");
        for sp in &saved.peers {
            assert!(sp.addrs.len() <= MAX_SAVED_ADDRS_PER_PEER);
            assert!(sp.addrs.iter().all(|a| a.len() <= MAX_SAVED_ADDR_BYTES));
        }
        save_file(&path, &saved).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= MAX_SAVED_BYTES as u64, "{size} bytes written");
        assert_eq!(load_file(&path), saved, "what is written is what loads");
        // An address too long to save stays in memory only.
        let p = peer();
        let huge: Multiaddr = format!("/dns4/{}/tcp/1", vec!["y".repeat(60); 9].join("."))
            .parse()
            .unwrap();
        let mut small = PeerBook::default();
        let e = small.entry(p, "dial");
        e.add_addr(huge.clone());
        e.add_addr("/ip4/198.18.0.9/tcp/1".parse().unwrap());
        small.connected(&p, None, Instant::now());
        let mut one = small.saved(&local);
        assert_eq!(
            one.peers[0].addrs,
            vec!["/ip4/198.18.0.9/tcp/1".to_string()]
        );
        // A book that would not load is refused rather than written.
        one.peers[0].addrs = vec!["z".repeat(MAX_FILE_BYTES as usize + 1)];
        let before = std::fs::read(&path).unwrap();
        assert!(save_file(&path, &one).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before, "the old file stays");
    }

    #[test]
    fn trusted_and_long_known_peers_keep_their_places_ahead_of_newcomers() {
        let mut book = PeerBook::default();
        let local = peer();
        let mut old = Vec::new();
        for i in 0..20 {
            let p = peer();
            let e = book.entry(p, "dial");
            e.add_addr(long_addr(i, 250));
            e.known = true;
            e.known_since_ms = Some(1_000 + i as u64);
            old.push(p);
        }
        let trusted = peer();
        book.set_trusted(trusted);
        let e = book.entry(trusted, "dial");
        e.add_addr(long_addr(7777, 250));
        e.known = true;
        e.known_since_ms = Some(u64::MAX - 1);
        // A flood of newcomers, connected now, with as many long addresses as they can have.
        for i in 0..3000 {
            let p = peer();
            let e = book.entry(p, "inbound");
            for j in 0..MAX_ADDRS_PER_PEER {
                e.add_addr(long_addr(10_000 + i * 20 + j, 250));
            }
            e.connections = 1;
            book.connected(&p, None, Instant::now());
        }
        let saved = book.saved(&local);
        let ids: HashSet<String> = saved.peers.iter().map(|p| p.id.clone()).collect();
        assert!(ids.contains(&trusted.to_string()), "the trusted peer stays");
        for p in &old {
            assert!(
                ids.contains(&p.to_string()),
                "a long-known peer was pushed out"
            );
        }
        // Restored, the ages survive, so the order holds across restarts too.
        let mut fresh = PeerBook::default();
        fresh.restore(&saved, &local);
        assert_eq!(fresh.get(&old[0]).unwrap().known_since_ms, Some(1_000));
    }
}
