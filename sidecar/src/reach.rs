//! Reachability across NATs: what AutoNAT (v2) found about this node, the circuit relay (v2)
//! reservations it holds, and the relay service it runs for others (--relay-server).
//!
//! - AutoNAT: every tested address's last outcome is kept (bounded); the verdict is reachable
//!   when a peer dialled this node back on some address, not reachable when every tested address
//!   failed, unknown before any test finished.
//! - Relays come from --relay (always reserved), from bootstrap peers and from any connected peer
//!   that advertises the relay hop protocol through identify. The latter two are reserved on only
//!   while AutoNAT says not reachable, up to --relay-reservations of them.
//! - A reservation is a listener on `<relay>/p2p-circuit`; when it closes (the relay refused,
//!   or the connection to it ended) it is asked again after a per-relay backoff with jitter.

use std::collections::BTreeMap;
use std::time::Instant;

use fold_proto::v1::{Reachability, RelayReservation, RelayServerStatus, relay_reservation};
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, StreamProtocol};

use crate::config::Config;
use crate::peer_book::{backoff, random_unit, strip_p2p, with_jitter};

/// The protocol a relay server advertises (circuit relay v2, hop side).
pub const HOP_PROTOCOL: StreamProtocol = StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop");

/// Most relays remembered (configured ones always fit: they come first).
const MAX_RELAYS: usize = 64;
/// Most tested addresses whose AutoNAT outcome is kept.
const MAX_TESTED: usize = 64;
/// Longest relay error kept.
const MAX_ERROR: usize = 1024;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// True when the address goes through a circuit relay.
pub fn is_circuit(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// AutoNAT's findings: each tested address and whether the dial-back reached this node.
#[derive(Default)]
pub struct AutoNat {
    tested: BTreeMap<Multiaddr, bool>,
}

impl AutoNat {
    /// Record a test's outcome. Relayed addresses do not count: identify reports the relayed
    /// address a peer reached this node on as "observed", and a dial-back through the relay
    /// succeeds, which says nothing about reaching the node directly (counted, it would make a
    /// NATed node "reachable" and drop the very reservation it is reached through).
    pub fn tested(&mut self, addr: Multiaddr, reachable: bool) {
        if is_circuit(&addr) {
            return;
        }
        if !self.tested.contains_key(&addr) && self.tested.len() >= MAX_TESTED {
            // Forget a failed address first: a confirmed one is worth more.
            let drop = self
                .tested
                .iter()
                .find(|(_, ok)| !**ok)
                .or_else(|| self.tested.iter().next())
                .map(|(a, _)| a.clone());
            if let Some(a) = drop {
                self.tested.remove(&a);
            }
        }
        self.tested.insert(addr, reachable);
    }

    pub fn verdict(&self) -> Reachability {
        if self.tested.values().any(|ok| *ok) {
            Reachability::Reachable
        } else if self.tested.is_empty() {
            Reachability::Unknown
        } else {
            Reachability::NotReachable
        }
    }

    pub fn reachable_addrs(&self) -> Vec<String> {
        self.tested
            .iter()
            .filter(|(_, ok)| **ok)
            .map(|(a, _)| a.to_string())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Bootstrap,
    Identify,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Bootstrap => "bootstrap",
            Source::Identify => "identify",
        }
    }
}

struct Relay {
    peer: PeerId,
    /// The relay's own address (no /p2p).
    addr: Multiaddr,
    source: Source,
    /// The `/p2p-circuit` listener while a reservation is asked for or held.
    listener: Option<ListenerId>,
    /// Whether a reservation is wanted on it (configured relays always).
    wanted: bool,
    state: relay_reservation::State,
    circuit: Option<Multiaddr>,
    last_error: String,
    reserved_ms: u64,
    failures: u32,
    next_try: Option<Instant>,
}

impl Relay {
    fn circuit_listen_addr(&self) -> Multiaddr {
        self.addr
            .clone()
            .with(Protocol::P2p(self.peer))
            .with(Protocol::P2pCircuit)
    }
}

/// The relays this node knows and its reservations on them.
pub struct Relays {
    list: Vec<Relay>,
    /// Reservations held on non-configured relays while not reachable (--relay-reservations).
    want: usize,
}

/// What the reach behaviour ([`crate::reach_keeper`]) asks of the swarm.
pub enum RelayAction {
    Listen(Multiaddr),
    StopListening(ListenerId),
}

impl Relays {
    /// The configured relays (--relay); each must name its relay's id.
    pub fn new(config: &Config) -> anyhow::Result<Relays> {
        let mut list = Vec::new();
        for a in config.relays.iter().take(MAX_RELAYS) {
            let Some(peer) = crate::peer_book::peer_of(a) else {
                anyhow::bail!(
                    "--relay {a}: the address must end in /p2p/<the relay's node id> (a relay is reserved on by id)"
                );
            };
            if is_circuit(a) {
                anyhow::bail!("--relay {a}: give the relay's own address, without /p2p-circuit");
            }
            list.push(Relay::new(peer, strip_p2p(a.clone()), Source::Config, true));
        }
        Ok(Relays {
            list,
            want: config.relay_reservations,
        })
    }

    /// A peer that speaks the relay hop protocol, reachable on `addr`.
    pub fn candidate(&mut self, peer: PeerId, addr: Multiaddr, source: Source) {
        if is_circuit(&addr) {
            return;
        }
        if let Some(r) = self.list.iter_mut().find(|r| r.peer == peer) {
            if r.source == Source::Identify && source == Source::Bootstrap {
                r.source = source;
            }
            if r.listener.is_none() && r.source != Source::Config {
                r.addr = strip_p2p(addr);
            }
            return;
        }
        if self.list.len() >= MAX_RELAYS {
            // Make room by forgetting an unused identify-learned relay.
            let Some(i) = self
                .list
                .iter()
                .position(|r| r.source == Source::Identify && !r.wanted)
            else {
                return;
            };
            self.list.remove(i);
        }
        self.list
            .push(Relay::new(peer, strip_p2p(addr), source, false));
    }

    pub fn is_relay(&self, peer: &PeerId) -> bool {
        self.list.iter().any(|r| r.peer == *peer)
    }

    /// Choose the relays to hold reservations on (configured ones, plus up to `want` others while
    /// this node is not reachable) and say which listeners to open or close.
    pub fn plan(&mut self, not_reachable: bool, now: Instant) -> Vec<RelayAction> {
        let mut actions = Vec::new();
        let mut others = 0;
        // Bootstrap relays first, then those learned through identify; the ones already wanted
        // keep their place.
        let mut order: Vec<usize> = (0..self.list.len()).collect();
        order.sort_by_key(|&i| {
            let r = &self.list[i];
            (
                r.source != Source::Config,
                r.state == relay_reservation::State::Failed,
                !r.wanted,
                r.source != Source::Bootstrap,
            )
        });
        for i in order {
            let r = &mut self.list[i];
            let keep = match r.source {
                Source::Config => true,
                _ if not_reachable && others < self.want => {
                    others += 1;
                    true
                }
                _ => false,
            };
            if !keep {
                r.wanted = false;
                if let Some(l) = r.listener.take() {
                    actions.push(RelayAction::StopListening(l));
                }
                r.state = relay_reservation::State::Unspecified;
                r.circuit = None;
                continue;
            }
            r.wanted = true;
            if r.listener.is_none() && r.next_try.is_none_or(|t| t <= now) {
                actions.push(RelayAction::Listen(r.circuit_listen_addr()));
            }
        }
        actions
    }

    /// The listener for `addr` was opened (Ok) or could not be (Err).
    pub fn listening(
        &mut self,
        addr: &Multiaddr,
        result: Result<ListenerId, String>,
        now: Instant,
    ) {
        let Some(r) = self
            .list
            .iter_mut()
            .find(|r| r.circuit_listen_addr() == *addr)
        else {
            return;
        };
        match result {
            Ok(id) => {
                r.listener = Some(id);
                r.state = relay_reservation::State::Pending;
                r.next_try = None;
            }
            Err(e) => r.failed(e, now),
        }
    }

    /// The relay accepted the reservation.
    pub fn reserved(&mut self, relay: &PeerId) {
        for r in self.list.iter_mut().filter(|r| r.peer == *relay) {
            if r.listener.is_some() {
                r.state = relay_reservation::State::Reserved;
                r.reserved_ms = now_ms();
                r.failures = 0;
            }
        }
    }

    /// A listener reported an address: the relayed address of a reservation.
    pub fn new_listen_addr(&mut self, listener: ListenerId, addr: &Multiaddr) {
        if let Some(r) = self.list.iter_mut().find(|r| r.listener == Some(listener)) {
            r.circuit = Some(addr.clone());
        }
    }

    /// A listener closed: its reservation ended (an error says why). True if it was a relay's.
    pub fn listener_closed(
        &mut self,
        listener: ListenerId,
        error: Option<String>,
        now: Instant,
    ) -> bool {
        let Some(r) = self.list.iter_mut().find(|r| r.listener == Some(listener)) else {
            return false;
        };
        r.listener = None;
        r.circuit = None;
        let e = error
            .unwrap_or_else(|| "the reservation ended (connection to the relay closed)".into());
        r.failed(e, now);
        true
    }

    /// Routes through the relays this node holds a reservation on
    /// (`<relay addr>/p2p/<relay>/p2p-circuit`): a node that shares a relay with this one can be
    /// reached through it even before the DHT knows its relayed address.
    pub fn circuit_routes(&self) -> Vec<Multiaddr> {
        self.list
            .iter()
            .filter(|r| r.state == relay_reservation::State::Reserved)
            .map(Relay::circuit_listen_addr)
            .collect()
    }

    pub fn status(&self) -> Vec<RelayReservation> {
        self.list
            .iter()
            .filter(|r| r.wanted)
            .map(|r| RelayReservation {
                relay_node_id: r.peer.to_string(),
                relay_addr: r.addr.to_string(),
                source: r.source.as_str().to_string(),
                state: r.state as i32,
                circuit_addr: r
                    .circuit
                    .as_ref()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                last_error: r.last_error.clone(),
                reserved_unix_ms: if r.state == relay_reservation::State::Reserved {
                    r.reserved_ms
                } else {
                    0
                },
            })
            .collect()
    }
}

impl Relay {
    fn new(peer: PeerId, addr: Multiaddr, source: Source, wanted: bool) -> Relay {
        Relay {
            peer,
            addr,
            source,
            listener: None,
            wanted,
            state: relay_reservation::State::Unspecified,
            circuit: None,
            last_error: String::new(),
            reserved_ms: 0,
            failures: 0,
            next_try: None,
        }
    }

    fn failed(&mut self, e: String, now: Instant) {
        tracing::info!(relay = %self.peer, error = %e, "relay reservation failed; retrying after a backoff");
        self.state = relay_reservation::State::Failed;
        self.last_error = e.chars().take(MAX_ERROR).collect();
        self.failures = self.failures.saturating_add(1);
        self.next_try = Some(now + with_jitter(backoff(self.failures), random_unit()));
    }
}

/// The relay service's view (--relay-server): the nodes holding a reservation and the circuits
/// open now.
#[derive(Default)]
pub struct RelayServer {
    /// Nodes whose reservation was accepted and has neither timed out nor lost its connection
    /// (libp2p's own `ReservationClosed` also fires for connections that never held one, so it
    /// is not counted on). At most --relay-max-reservations.
    reserved: std::collections::HashSet<PeerId>,
    pub circuits: u32,
}

impl RelayServer {
    pub fn on_event(&mut self, ev: &libp2p::relay::Event, max_reservations: usize) {
        use libp2p::relay::Event;
        match ev {
            Event::ReservationReqAccepted { src_peer_id, .. }
                if self.reserved.len() < max_reservations =>
            {
                self.reserved.insert(*src_peer_id);
            }
            Event::ReservationTimedOut { src_peer_id } => {
                self.reserved.remove(src_peer_id);
            }
            Event::CircuitReqAccepted { .. } => {
                self.circuits = self.circuits.saturating_add(1);
            }
            Event::CircuitClosed { .. } => {
                self.circuits = self.circuits.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// The last connection to `peer` closed: its reservation is gone with it.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.reserved.remove(peer);
    }

    pub fn reservations(&self) -> u32 {
        u32::try_from(self.reserved.len()).unwrap_or(u32::MAX)
    }

    pub fn status(&self, config: &Config) -> RelayServerStatus {
        let l = &config.relay_limits;
        let u32_of = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        RelayServerStatus {
            enabled: config.relay_server,
            reservations: if config.relay_server {
                self.reservations()
            } else {
                0
            },
            circuits: if config.relay_server {
                self.circuits
            } else {
                0
            },
            max_reservations: u32_of(l.max_reservations),
            max_circuits: u32_of(l.max_circuits),
            max_circuits_per_peer: u32_of(l.max_circuits_per_peer),
            max_circuit_duration_secs: l.max_circuit_duration_secs,
            max_circuit_bytes: l.max_circuit_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        let mut v = vec!["p2p-sidecar", "--mdns", "off"];
        v.extend_from_slice(args);
        crate::config::Cli::parse_from(v).config
    }

    #[test]
    fn the_verdict_follows_the_tests() {
        let mut a = AutoNat::default();
        assert_eq!(a.verdict(), Reachability::Unknown);
        let x: Multiaddr = "/ip4/198.18.0.1/tcp/4001".parse().unwrap();
        let y: Multiaddr = "/ip4/198.18.0.1/tcp/4002".parse().unwrap();
        a.tested(x.clone(), false);
        assert_eq!(a.verdict(), Reachability::NotReachable);
        let relayed: Multiaddr = format!(
            "/ip4/198.18.0.1/tcp/4001/p2p/{}/p2p-circuit/p2p/{}",
            PeerId::random(),
            PeerId::random()
        )
        .parse()
        .unwrap();
        a.tested(relayed, true);
        assert_eq!(
            a.verdict(),
            Reachability::NotReachable,
            "a relayed address does not count"
        );
        a.tested(y.clone(), true);
        assert_eq!(a.verdict(), Reachability::Reachable);
        assert_eq!(a.reachable_addrs(), vec![y.to_string()]);
        for port in 0..200u16 {
            a.tested(
                format!("/ip4/198.18.0.2/tcp/{port}").parse().unwrap(),
                false,
            );
        }
        assert!(a.tested.len() <= MAX_TESTED);
        assert_eq!(
            a.verdict(),
            Reachability::Reachable,
            "a confirmed address is kept"
        );
    }

    #[test]
    fn configured_relays_need_an_id_and_are_always_reserved() {
        let e = Relays::new(&config(&["--relay", "/ip4/198.18.0.1/tcp/4001"]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/p2p/"), "{e}");
        let id = PeerId::random();
        let mut r = Relays::new(&config(&[
            "--relay",
            &format!("/ip4/198.18.0.1/tcp/4001/p2p/{id}"),
        ]))
        .unwrap();
        let now = Instant::now();
        let acts = r.plan(false, now);
        assert!(
            matches!(&acts[..], [RelayAction::Listen(a)] if a.to_string().ends_with(&format!("{id}/p2p-circuit")))
        );
    }

    #[test]
    fn learned_relays_are_used_only_when_not_reachable() {
        let mut r = Relays::new(&config(&["--relay-reservations", "1"])).unwrap();
        let (a, b) = (PeerId::random(), PeerId::random());
        r.candidate(
            a,
            "/ip4/198.18.0.1/tcp/4001".parse().unwrap(),
            Source::Identify,
        );
        r.candidate(
            b,
            "/ip4/198.18.0.2/tcp/4001".parse().unwrap(),
            Source::Bootstrap,
        );
        let now = Instant::now();
        assert!(r.plan(false, now).is_empty());
        let acts = r.plan(true, now);
        // One reservation, on the bootstrap relay first.
        assert!(
            matches!(&acts[..], [RelayAction::Listen(x)] if x.to_string().contains(&b.to_string()))
        );
        let addr = match &acts[0] {
            RelayAction::Listen(x) => x.clone(),
            RelayAction::StopListening(_) => unreachable!(),
        };
        r.listening(&addr, Err("refused".into()), now);
        assert_eq!(r.status()[0].state, relay_reservation::State::Failed as i32);
        assert_eq!(r.status()[0].last_error, "refused");
        // The other relay is tried instead; the failed one is asked again after its backoff.
        let acts = r.plan(true, now);
        assert!(
            matches!(&acts[..], [RelayAction::Listen(x)] if x.to_string().contains(&a.to_string()))
        );
    }
}
