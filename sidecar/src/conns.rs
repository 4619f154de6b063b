//! The open connections as the event loop tracks them ([`Conns`]): each one's peer, kind
//! (relayed or direct, dialled or not, over loopback), and liveness by ping ([`PingPolicy`]). A
//! plain table with no I/O: the loop closes what it says is dead. (AutoNAT dial-backs are tracked
//! by [`crate::reach_keeper`].)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

/// When a connection whose pings fail is closed (--ping-interval-secs, --ping-max-failures):
/// after `max_failures` failed pings in a row, or `max_failures` intervals without an answer.
#[derive(Debug, Clone, Copy)]
pub struct PingPolicy {
    pub interval: Duration,
    pub max_failures: u32,
}

impl PingPolicy {
    pub fn from_config(config: &crate::config::Config) -> PingPolicy {
        PingPolicy {
            interval: Duration::from_secs(config.ping_interval_secs.max(1)),
            max_failures: config.ping_max_failures.max(1),
        }
    }

    /// How long a connection may go without a ping answered before it is closed.
    pub fn silence_limit(&self) -> Duration {
        self.interval.saturating_mul(self.max_failures)
    }
}

/// One open connection: its peer, and whether it runs through a relay.
pub struct Conn {
    pub peer: PeerId,
    pub relayed: bool,
    /// This node dialled it (AutoNAT asks for dial-backs only over such connections).
    pub dialer: bool,
    pub transport: &'static str,
    /// The peer's end is a loopback address: the peer runs on this host, so the loopback
    /// addresses it reports are good here (crate::peer_book::learnable).
    pub loopback: bool,
    /// When the connection came up or last answered a ping.
    pub alive: Instant,
    /// Pings failed in a row (as libp2p reports them: it keeps the first failure to itself).
    pub ping_failures: u32,
    /// The peer does not speak ping: its silence says nothing.
    pub ping_unsupported: bool,
    /// Closed by the loop for failed pings (once; the swarm reports the close later).
    pub closing: bool,
}

impl Conn {
    /// A connection that just came up.
    pub fn new(peer: PeerId, relayed: bool, dialer: bool, transport: &'static str) -> Conn {
        Conn {
            peer,
            relayed,
            dialer,
            transport,
            loopback: false,
            alive: Instant::now(),
            ping_failures: 0,
            ping_unsupported: false,
            closing: false,
        }
    }
}

/// A ping's outcome on one connection.
pub enum Ping {
    Answered(Duration),
    Unsupported,
    Failed(String),
}

/// What the loop does after a ping.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterPing {
    Nothing,
    /// The connection is alive: this is the peer's round-trip time.
    Rtt(Duration),
    /// Close the connection: its pings keep failing.
    Close,
}

/// Every open connection (bounded by the connection limits).
pub struct Conns {
    map: HashMap<ConnectionId, Conn>,
    ping: PingPolicy,
}

impl Conns {
    pub fn new(ping: PingPolicy) -> Conns {
        Conns {
            map: HashMap::new(),
            ping,
        }
    }

    pub fn insert(&mut self, id: ConnectionId, c: Conn) {
        self.map.insert(id, c);
    }

    pub fn remove(&mut self, id: &ConnectionId) -> Option<Conn> {
        self.map.remove(id)
    }

    /// `peer`'s connection kind and transport for the peer book: direct when any direct
    /// connection is open.
    pub fn kind(&self, peer: &PeerId) -> Option<(&'static str, &'static str)> {
        let mut relayed = None;
        let mut direct = None;
        for c in self.map.values().filter(|c| c.peer == *peer) {
            if c.relayed {
                relayed = Some(c.transport);
            } else {
                direct = Some(c.transport);
            }
        }
        match (direct, relayed) {
            (Some(t), _) => Some(("direct", t)),
            (None, Some(t)) => Some(("relayed", t)),
            (None, None) => None,
        }
    }

    /// `peer`'s relayed connections.
    pub fn relayed(&self, peer: &PeerId) -> Vec<ConnectionId> {
        self.of(peer, |c| c.relayed)
    }

    fn of(&self, peer: &PeerId, what: impl Fn(&Conn) -> bool) -> Vec<ConnectionId> {
        self.map
            .iter()
            .filter(|(_, c)| c.peer == *peer && what(c))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether this node dialled a direct connection to `peer` that is open.
    pub fn dialled_direct(&self, peer: &PeerId) -> bool {
        self.map
            .values()
            .any(|c| c.peer == *peer && c.dialer && !c.relayed)
    }

    /// Whether a connection to `peer` runs over loopback.
    pub fn over_loopback(&self, peer: &PeerId) -> bool {
        self.map.values().any(|c| c.peer == *peer && c.loopback)
    }

    /// A ping's outcome on connection `id` of `peer`: an answer keeps it alive, failures in a
    /// row close it ([`PingPolicy`]).
    pub fn on_ping(&mut self, id: ConnectionId, peer: &PeerId, ping: Ping) -> AfterPing {
        let Some(c) = self.map.get_mut(&id) else {
            return AfterPing::Nothing;
        };
        match ping {
            Ping::Answered(rtt) => {
                c.alive = Instant::now();
                c.ping_failures = 0;
                return AfterPing::Rtt(rtt);
            }
            Ping::Unsupported => c.ping_unsupported = true,
            Ping::Failed(e) => {
                // libp2p keeps the first failure in a row to itself: this is one more.
                c.ping_failures = c.ping_failures.saturating_add(1);
                tracing::debug!(%peer, failures = c.ping_failures + 1, error = %e, "ping failed");
                if c.ping_failures.saturating_add(1) >= self.ping.max_failures {
                    return AfterPing::Close;
                }
            }
        }
        AfterPing::Nothing
    }

    /// The connections that answered no ping for [`PingPolicy::silence_limit`].
    pub fn silent(&self, now: Instant) -> Vec<ConnectionId> {
        let limit = self.ping.silence_limit();
        self.map
            .iter()
            .filter(|(_, c)| {
                !c.closing && !c.ping_unsupported && now.saturating_duration_since(c.alive) >= limit
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Mark connection `id` as being closed for not answering; its peer and how long it was
    /// silent, unless it is unknown or being closed already.
    pub fn closing(&mut self, id: ConnectionId) -> Option<(PeerId, Duration)> {
        let c = self.map.get_mut(&id)?;
        if c.closing {
            return None;
        }
        c.closing = true;
        Some((c.peer, c.alive.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_failures: u32) -> PingPolicy {
        PingPolicy {
            interval: Duration::from_secs(10),
            max_failures,
        }
    }

    fn id(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    #[test]
    fn a_peer_with_a_direct_connection_is_direct() {
        let mut t = Conns::new(policy(3));
        let peer = PeerId::random();
        assert_eq!(t.kind(&peer), None);
        t.insert(id(1), Conn::new(peer, true, true, "tcp"));
        assert_eq!(t.kind(&peer), Some(("relayed", "tcp")));
        assert!(!t.dialled_direct(&peer));
        t.insert(id(2), Conn::new(peer, false, true, "quic"));
        assert_eq!(t.kind(&peer), Some(("direct", "quic")));
        assert!(t.dialled_direct(&peer));
        assert_eq!(t.relayed(&peer), vec![id(1)]);
        assert!(t.remove(&id(2)).is_some());
        assert_eq!(t.kind(&peer), Some(("relayed", "tcp")));
    }

    #[test]
    fn failed_pings_in_a_row_close_and_an_answer_resets_them() {
        let mut t = Conns::new(policy(3));
        let peer = PeerId::random();
        t.insert(id(1), Conn::new(peer, false, false, "tcp"));
        let fail = || Ping::Failed("timeout".into());
        assert_eq!(t.on_ping(id(1), &peer, fail()), AfterPing::Nothing);
        assert_eq!(
            t.on_ping(id(1), &peer, Ping::Answered(Duration::from_millis(1))),
            AfterPing::Rtt(Duration::from_millis(1))
        );
        assert_eq!(t.on_ping(id(1), &peer, fail()), AfterPing::Nothing);
        assert_eq!(t.on_ping(id(1), &peer, fail()), AfterPing::Close);
        assert_eq!(t.on_ping(id(9), &peer, fail()), AfterPing::Nothing);
    }

    #[test]
    fn silent_connections_are_found_once_and_ping_less_peers_never() {
        let mut t = Conns::new(policy(2));
        let peer = PeerId::random();
        t.insert(id(1), Conn::new(peer, false, false, "tcp"));
        t.insert(id(2), Conn::new(peer, false, false, "tcp"));
        t.on_ping(id(2), &peer, Ping::Unsupported);
        let later = Instant::now() + Duration::from_secs(21);
        assert!(t.silent(Instant::now()).is_empty());
        assert_eq!(t.silent(later), vec![id(1)]);
        assert_eq!(t.closing(id(1)).map(|(p, _)| p), Some(peer));
        assert!(t.closing(id(1)).is_none(), "closed once");
        assert!(t.silent(later).is_empty());
    }

    #[test]
    fn loopback_is_per_peer() {
        let mut t = Conns::new(policy(2));
        let (a, b) = (PeerId::random(), PeerId::random());
        t.insert(
            id(1),
            Conn {
                loopback: true,
                ..Conn::new(a, false, true, "tcp")
            },
        );
        t.insert(id(2), Conn::new(b, false, true, "tcp"));
        assert!(t.over_loopback(&a) && !t.over_loopback(&b));
    }
}
