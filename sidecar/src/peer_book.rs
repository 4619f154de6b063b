//! The peer book: what this sidecar knows about other nodes (addresses, connections, round-trip
//! time, what identify reported, how it was found). Bounded: at most [`MAX_PEERS`] peers (the
//! longest-unseen disconnected one is forgotten first) and [`MAX_ADDRS_PER_PEER`] addresses each.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fold_proto::v1::PeerInfo;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Addresses remembered per peer.
pub const MAX_ADDRS_PER_PEER: usize = 16;
/// Peers remembered (connected ones are never forgotten).
pub const MAX_PEERS: usize = 4096;

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

impl PeerEntry {
    pub fn add_addr(&mut self, a: Multiaddr) {
        let a = strip_p2p(a);
        if !self.addrs.contains(&a) {
            if self.addrs.len() >= MAX_ADDRS_PER_PEER {
                self.addrs.remove(0);
            }
            self.addrs.push(a);
        }
    }
}

pub fn strip_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

pub fn peer_of(a: &Multiaddr) -> Option<PeerId> {
    a.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Every peer this sidecar knows of.
#[derive(Default)]
pub struct PeerBook {
    peers: HashMap<PeerId, PeerEntry>,
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

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peers as the node's API shows them, sorted by id.
    pub fn infos(&self, include_disconnected: bool, local: &PeerId) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .peers
            .iter()
            .filter(|(p, e)| (include_disconnected || e.connections > 0) && *p != local)
            .map(|(p, e)| PeerInfo {
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
}
