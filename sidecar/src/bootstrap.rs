//! The configured bootstrap addresses: what `Mesh.Status` reports for each (its last dial's
//! outcome) and the redial backoff of the addresses without a peer id (e.g. DNS names). A plain
//! state machine with no I/O: the event loop feeds it the swarm's connection events and dials
//! what [`Bootstrap::due`] hands out. (Addresses that name their peer are redialled by the
//! peer book, like any known peer.)

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fold_proto::v1::{BootstrapStatus, bootstrap_status::State};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use crate::peer_book::{DIAL_GUARD, backoff, peer_of, with_jitter};

/// Longest dial error kept per bootstrap address.
const MAX_BOOTSTRAP_ERROR: usize = 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn clip(e: &str) -> String {
    e.chars().take(MAX_BOOTSTRAP_ERROR).collect()
}

/// A bootstrap address without a peer id (e.g. a DNS name): redialled on its own backoff until
/// the peer it reaches is known to the peer book.
struct Anonymous {
    addr: Multiaddr,
    /// The peer it reached last.
    peer: Option<PeerId>,
    failures: u32,
    next_dial: Option<Instant>,
}

/// The bootstrap addresses' state (see the module doc).
pub struct Bootstrap {
    local: PeerId,
    addrs: Vec<Multiaddr>,
    /// The outcome of each address's last dial (same order as `addrs`).
    status: Vec<BootstrapStatus>,
    /// Dials of addresses without a peer id under way: connection → index in `addrs` (at most
    /// one per address).
    dials: HashMap<ConnectionId, usize>,
    anonymous: Vec<Anonymous>,
    /// Connection → index in `anonymous`.
    anon_dials: HashMap<ConnectionId, usize>,
}

impl Bootstrap {
    /// The configured addresses; one that names this node itself is reported as such.
    pub fn new(addrs: Vec<Multiaddr>, local: PeerId) -> Bootstrap {
        let mut b = Bootstrap {
            local,
            status: addrs
                .iter()
                .map(|a| BootstrapStatus {
                    address: a.to_string(),
                    state: State::Dialing as i32,
                    ..Default::default()
                })
                .collect(),
            addrs,
            dials: HashMap::new(),
            anonymous: Vec::new(),
            anon_dials: HashMap::new(),
        };
        for (i, addr) in b.addrs.clone().into_iter().enumerate() {
            match peer_of(&addr) {
                Some(peer) if peer == local => b.self_address(i),
                Some(_) => {}
                None => b.anonymous.push(Anonymous {
                    addr,
                    peer: None,
                    failures: 0,
                    next_dial: None,
                }),
            }
        }
        b
    }

    /// The addresses that name another peer (`/p2p/<id>`): for the peer book (redialled, never
    /// forgotten) and the DHT.
    pub fn named(&self) -> Vec<(PeerId, Multiaddr)> {
        self.addrs
            .iter()
            .filter_map(|a| peer_of(a).map(|p| (p, a.clone())))
            .filter(|(p, _)| *p != self.local)
            .collect()
    }

    /// What `Mesh.Status` reports for each address.
    pub fn status(&self) -> Vec<BootstrapStatus> {
        self.status.clone()
    }

    /// Whether `peer` is one a bootstrap address names or reached.
    pub fn is_bootstrap(&self, peer: &PeerId) -> bool {
        !self.indexes(peer).is_empty() || self.anonymous.iter().any(|b| b.peer == Some(*peer))
    }

    /// The addresses that name `peer` (`/p2p/<id>`), or that reached it (an address without an
    /// id, e.g. a DNS name).
    fn indexes(&self, peer: &PeerId) -> Vec<usize> {
        let mut found: Vec<usize> = self
            .addrs
            .iter()
            .enumerate()
            .filter(|(_, a)| peer_of(a).as_ref() == Some(peer))
            .map(|(i, _)| i)
            .collect();
        for b in self.anonymous.iter().filter(|b| b.peer == Some(*peer)) {
            if let Some(j) = self.addrs.iter().position(|a| *a == b.addr)
                && !found.contains(&j)
            {
                found.push(j);
            }
        }
        found
    }

    /// An address that names this node itself.
    fn self_address(&mut self, i: usize) {
        if let Some(st) = self.status.get_mut(i) {
            st.state = State::SelfAddress as i32;
            st.node_id = self.local.to_string();
            st.last_attempt_unix_ms = now_ms();
        }
    }

    /// Record how an address's dial ended.
    fn outcome(&mut self, i: usize, outcome: Result<PeerId, &str>) {
        let Some(st) = self.status.get_mut(i) else {
            return;
        };
        st.last_attempt_unix_ms = now_ms();
        match outcome {
            Ok(peer) => {
                st.state = State::Connected as i32;
                st.node_id = peer.to_string();
            }
            Err(e) => {
                if st.state != State::Failed as i32 {
                    tracing::warn!(addr = %st.address, error = %e, "bootstrap dial failed");
                }
                st.state = State::Failed as i32;
                st.last_error = clip(e);
            }
        }
    }

    /// The addresses without a peer id to dial now: those whose backoff has passed and whose
    /// peer is not `covered` (connected, or known to the peer book with addresses that have not
    /// failed). Each is marked as being dialled ([`DIAL_GUARD`]); report the dial with
    /// [`Bootstrap::dialing`] or [`Bootstrap::not_started`].
    pub fn due(
        &mut self,
        now: Instant,
        covered: impl Fn(&PeerId) -> bool,
    ) -> Vec<(usize, Multiaddr)> {
        let mut due = Vec::new();
        for (i, b) in self.anonymous.iter_mut().enumerate() {
            if b.peer.is_some_and(|p| covered(&p)) || b.next_dial.is_some_and(|t| t > now) {
                continue;
            }
            b.next_dial = Some(now + DIAL_GUARD);
            due.push((i, b.addr.clone()));
        }
        due
    }

    /// The dial of [`Bootstrap::due`]'s address `i` started on connection `id`.
    pub fn dialing(&mut self, i: usize, id: ConnectionId) {
        let Some(addr) = self.anonymous.get(i).map(|b| b.addr.clone()) else {
            return;
        };
        self.anon_dials.insert(id, i);
        if let Some(j) = self.addrs.iter().position(|a| *a == addr) {
            self.dials.insert(id, j);
        }
    }

    /// The dial of [`Bootstrap::due`]'s address `i` could not start.
    pub fn not_started(&mut self, i: usize, error: &str) {
        let Some(addr) = self.anonymous.get(i).map(|b| b.addr.clone()) else {
            return;
        };
        tracing::debug!(%addr, %error, "bootstrap dial not started");
        if let Some(j) = self.addrs.iter().position(|a| *a == addr) {
            self.outcome(j, Err(error));
        }
    }

    /// A connection to `peer` came up (on connection `id`).
    pub fn connected(&mut self, id: ConnectionId, peer: PeerId) {
        if let Some(i) = self.anon_dials.remove(&id)
            && let Some(b) = self.anonymous.get_mut(i)
        {
            b.peer = Some(peer);
            b.failures = 0;
            b.next_dial = None;
        }
        if let Some(i) = self.dials.remove(&id) {
            self.outcome(i, Ok(peer));
        }
        for j in self.indexes(&peer) {
            self.outcome(j, Ok(peer));
        }
    }

    /// An outgoing connection failed: `self_dial` when the address turned out to be this
    /// node's own; `peer_connected` when the peer is connected anyway (its addresses keep
    /// their state). `unit` in [0, 1) spreads the backoff.
    pub fn dial_failed(&mut self, failure: DialFailure<'_>, now: Instant, unit: f64) {
        let DialFailure {
            id,
            peer,
            peer_connected,
            self_dial,
            error,
        } = failure;
        if let Some(i) = self.dials.remove(&id) {
            if self_dial {
                self.self_address(i);
            } else {
                self.outcome(i, Err(error));
            }
        }
        if let Some(p) = peer
            && !peer_connected
        {
            for j in self.indexes(&p) {
                self.outcome(j, Err(error));
            }
        }
        if let Some(i) = self.anon_dials.remove(&id)
            && let Some(b) = self.anonymous.get_mut(i)
        {
            b.failures = b.failures.saturating_add(1);
            b.next_dial = Some(now + with_jitter(backoff(b.failures), unit));
        }
    }

    /// The last connection to `peer` closed: its addresses no longer say connected (the
    /// redial's outcome updates them again).
    pub fn lost(&mut self, peer: &PeerId, why: &str) {
        for j in self.indexes(peer) {
            if let Some(st) = self.status.get_mut(j)
                && st.state == State::Connected as i32
            {
                st.state = State::Failed as i32;
                st.last_attempt_unix_ms = now_ms();
                st.last_error = clip(&format!("connection lost ({why}); redialling"));
            }
        }
    }
}

/// An outgoing connection that failed, as [`Bootstrap::dial_failed`] needs it.
pub struct DialFailure<'a> {
    pub id: ConnectionId,
    pub peer: Option<PeerId>,
    pub peer_connected: bool,
    /// The address reached this node itself.
    pub self_dial: bool,
    pub error: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn named(peer: PeerId) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/4001/p2p/{peer}")
            .parse()
            .expect("addr")
    }

    fn dns() -> Multiaddr {
        "/dns4/seed.example/tcp/4001".parse().expect("addr")
    }

    fn state(b: &Bootstrap, i: usize) -> i32 {
        b.status()[i].state
    }

    fn failure(id: ConnectionId, peer: Option<PeerId>) -> DialFailure<'static> {
        DialFailure {
            id,
            peer,
            peer_connected: false,
            self_dial: false,
            error: "refused",
        }
    }

    #[test]
    fn addresses_are_sorted_into_self_named_and_anonymous() {
        let local = PeerId::random();
        let other = PeerId::random();
        let b = Bootstrap::new(vec![named(local), named(other), dns()], local);
        assert_eq!(state(&b, 0), State::SelfAddress as i32);
        assert_eq!(state(&b, 1), State::Dialing as i32);
        assert_eq!(b.named(), vec![(other, named(other))]);
        assert!(b.is_bootstrap(&other));
        assert!(!b.is_bootstrap(&PeerId::random()));
    }

    #[test]
    fn a_named_peer_connecting_and_leaving_is_reported() {
        let other = PeerId::random();
        let mut b = Bootstrap::new(vec![named(other)], PeerId::random());
        b.connected(ConnectionId::new_unchecked(1), other);
        assert_eq!(state(&b, 0), State::Connected as i32);
        assert_eq!(b.status()[0].node_id, other.to_string());
        b.lost(&other, "closed");
        assert_eq!(state(&b, 0), State::Failed as i32);
        assert_eq!(
            b.status()[0].last_error,
            "connection lost (closed); redialling"
        );
    }

    #[test]
    fn an_anonymous_address_backs_off_after_a_failure() {
        let mut b = Bootstrap::new(vec![dns()], PeerId::random());
        let now = Instant::now();
        let due = b.due(now, |_| false);
        assert_eq!(due, vec![(0, dns())]);
        // Being dialled: not handed out again meanwhile.
        assert!(b.due(now, |_| false).is_empty());
        let id = ConnectionId::new_unchecked(7);
        b.dialing(0, id);
        b.dial_failed(failure(id, None), now, 0.5);
        assert_eq!(state(&b, 0), State::Failed as i32);
        assert_eq!(b.status()[0].last_error, "refused");
        assert!(b.due(now, |_| false).is_empty());
        assert_eq!(b.due(now + Duration::from_secs(2), |_| false).len(), 1);
    }

    #[test]
    fn an_anonymous_address_learns_its_peer_and_is_skipped_while_covered() {
        let mut b = Bootstrap::new(vec![dns()], PeerId::random());
        let now = Instant::now();
        assert_eq!(b.due(now, |_| false).len(), 1);
        let id = ConnectionId::new_unchecked(3);
        b.dialing(0, id);
        let peer = PeerId::random();
        b.connected(id, peer);
        assert_eq!(state(&b, 0), State::Connected as i32);
        assert!(b.is_bootstrap(&peer));
        assert!(b.due(now, |p| *p == peer).is_empty());
        assert_eq!(b.due(now, |_| false).len(), 1);
    }

    #[test]
    fn a_dial_that_reaches_this_node_is_a_self_address() {
        let mut b = Bootstrap::new(vec![dns()], PeerId::random());
        let now = Instant::now();
        b.due(now, |_| false);
        let id = ConnectionId::new_unchecked(4);
        b.dialing(0, id);
        b.dial_failed(
            DialFailure {
                self_dial: true,
                ..failure(id, None)
            },
            now,
            0.5,
        );
        assert_eq!(state(&b, 0), State::SelfAddress as i32);
    }

    #[test]
    fn a_dial_that_could_not_start_is_a_failure() {
        let mut b = Bootstrap::new(vec![dns()], PeerId::random());
        b.due(Instant::now(), |_| false);
        b.not_started(0, "no transport");
        assert_eq!(state(&b, 0), State::Failed as i32);
        assert_eq!(b.status()[0].last_error, "no transport");
    }

    #[test]
    fn long_errors_are_clipped() {
        let mut b = Bootstrap::new(vec![dns()], PeerId::random());
        b.due(Instant::now(), |_| false);
        b.not_started(0, &"x".repeat(5000));
        assert_eq!(b.status()[0].last_error.len(), MAX_BOOTSTRAP_ERROR);
    }
}
