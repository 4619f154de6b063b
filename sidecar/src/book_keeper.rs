//! The peer book behaviour: a `NetworkBehaviour` that owns the peer book ([`crate::peer_book`])
//! and the bootstrap addresses ([`crate::bootstrap`]). It learns connections, closes and failed
//! dials from the swarm (`on_swarm_event`), answers `handle_pending_outbound_connection` with a
//! peer's known addresses, and on its own 1 s timer dials (`ToSwarm::Dial`) the known and
//! bootstrap peers whose backoff has passed, and the bootstrap addresses without a peer id. What
//! identify, the DHT and mDNS teach is fed to it by the event loop. It hands the book to its
//! file's writer when the known peers changed (at most every 5 s, and at shutdown), which writes
//! it off the swarm task ([`crate::book_file`]). Tested below with real swarms on the memory
//! transport.

use std::collections::{HashMap, HashSet};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour,
    THandlerInEvent, ToSwarm,
};

use crate::book_file::BookWriter;
use crate::bootstrap::{Bootstrap, DialFailure as BootstrapDialFailure};
use crate::peer_book::{MAX_REDIALS_PER_TICK, PeerBook, SavedBook, random_unit};
use crate::policy_kit::{Actions, Connected, Every, no_protocol};

/// How often the book looks for peers to redial (and whether its file is due).
const REDIAL_EVERY: Duration = Duration::from_secs(1);
/// The peers file is written at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// What the event loop does for the peer book behaviour.
#[derive(Debug)]
pub enum BookEvent {
    /// These addresses of the peer failed too often and left the book: forget them in the DHT.
    AddressesDropped(PeerId, Vec<Multiaddr>),
}

/// The peer book behaviour (see the module doc).
pub struct BookKeeper {
    local: PeerId,
    book: PeerBook,
    bootstrap: Bootstrap,
    connected: Connected,
    /// Dials that passed every behaviour's checks and are under way (bounded by the swarm's
    /// pending-connection limit): only their failures count against a peer.
    pending: HashSet<ConnectionId>,
    /// Dials of bootstrap addresses without a peer id this behaviour asked for: connection →
    /// index in [`Bootstrap::due`]'s numbering.
    bootstrap_dials: HashMap<ConnectionId, usize>,
    actions: Actions<BookEvent>,
    /// Redials are looked for on this timer.
    every: Every,
    /// The peers file, once [`BookKeeper::start_file`] started its writer.
    file: Option<BookFile>,
}

/// The peers file's writer ([`crate::book_file`], off the swarm task) and what it was handed.
struct BookFile {
    writer: BookWriter,
    /// The book as last handed to the writer (or read from the file); none after a failed
    /// write.
    saved: Option<SavedBook>,
    last_save: Option<Instant>,
}

impl BookKeeper {
    /// An empty book for node `local` with the configured `bootstrap` addresses.
    pub fn new(local: PeerId, bootstrap: Vec<Multiaddr>) -> BookKeeper {
        BookKeeper {
            local,
            book: PeerBook::default(),
            bootstrap: Bootstrap::new(bootstrap, local),
            connected: Connected::default(),
            pending: HashSet::new(),
            bootstrap_dials: HashMap::new(),
            actions: Actions::default(),
            every: Every::new(REDIAL_EVERY),
            file: None,
        }
    }

    pub fn book(&self) -> &PeerBook {
        &self.book
    }

    pub fn book_mut(&mut self) -> &mut PeerBook {
        &mut self.book
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    pub fn bootstrap_mut(&mut self) -> &mut Bootstrap {
        &mut self.bootstrap
    }

    /// Write the book to `path` from now on (the file holds the book as it is now). Needs a
    /// Tokio runtime.
    pub fn start_file(&mut self, path: std::path::PathBuf) {
        let written = self.book.saved(&self.local);
        self.file = Some(BookFile {
            writer: BookWriter::spawn(path, written.clone()),
            saved: Some(written),
            last_save: None,
        });
    }

    /// Hand the book to the file's writer if the known peers changed since it was last handed
    /// over (or a write failed), at most every [`SAVE_EVERY`].
    fn save_if_due(&mut self, now: Instant) {
        let Some(f) = &mut self.file else {
            return;
        };
        if f.last_save
            .is_some_and(|t| now.saturating_duration_since(t) < SAVE_EVERY)
        {
            return;
        }
        if f.writer.take_failed() {
            f.saved = None;
        }
        let book = self.book.saved(&self.local);
        if f.saved.as_ref() == Some(&book) {
            return;
        }
        f.last_save = Some(now);
        if f.writer.offer(book.clone()) {
            f.saved = Some(book);
        }
    }

    /// Write the book now; `reply` is told whether it is on disk (true with no file).
    pub fn save_now(&mut self, reply: tokio::sync::oneshot::Sender<bool>) {
        match &mut self.file {
            Some(f) => {
                let book = self.book.saved(&self.local);
                f.saved = Some(book.clone());
                f.writer.save(book, reply);
            }
            None => {
                let _ = reply.send(true);
            }
        }
    }

    /// At shutdown: write the book and wait until it is on disk.
    pub async fn flush(&self) {
        if let Some(f) = &self.file {
            f.writer.flush(self.book.saved(&self.local)).await;
        }
    }

    fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected.contains(peer)
    }

    /// Dial the known and bootstrap peers that are not connected and whose backoff has passed.
    fn redial(&mut self, now: Instant) {
        let local = self.local;
        for (peer, addrs) in self.book.due_redials(now, &local, MAX_REDIALS_PER_TICK) {
            if self.is_connected(&peer) {
                continue;
            }
            tracing::debug!(%peer, addrs = addrs.len(), "redialling");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            self.actions.push(ToSwarm::Dial { opts });
        }
        // Once a redial of the peer's known addresses failed, the bootstrap address is dialled
        // again too: behind a name, the peer may have come back at a new address.
        let (connected, book) = (&self.connected, &self.book);
        let due = self.bootstrap.due(now, |p| {
            connected.contains(p)
                || book
                    .get(p)
                    .is_some_and(|e| !e.addrs.is_empty() && e.dial_failures == 0)
        });
        for (i, addr) in due {
            // Its outcome is also what Network.Status reports for this bootstrap address.
            let opts = DialOpts::unknown_peer_id().address(addr).build();
            self.bootstrap_dials.insert(opts.connection_id(), i);
            self.actions.push(ToSwarm::Dial { opts });
        }
    }

    fn on_established(&mut self, c: ConnectionEstablished) {
        let ConnectionEstablished {
            peer_id,
            connection_id,
            endpoint,
            other_established,
            ..
        } = c;
        self.pending.remove(&connection_id);
        self.bootstrap_dials.remove(&connection_id);
        self.connected.established(peer_id);
        let dialed = endpoint.is_dialer();
        let remote = endpoint.get_remote_address().clone();
        let e = self
            .book
            .entry(peer_id, if dialed { "dial" } else { "inbound" });
        e.connections = u32::try_from(other_established.saturating_add(1)).unwrap_or(u32::MAX);
        if dialed {
            e.add_addr(remote.clone());
        }
        self.book
            .connected(&peer_id, dialed.then_some(&remote), Instant::now());
        self.bootstrap.connected(connection_id, peer_id);
    }

    fn on_closed(&mut self, peer: PeerId, remaining: usize) {
        if let Some(e) = self.book.get_mut(&peer) {
            e.connections = u32::try_from(remaining).unwrap_or(u32::MAX);
        }
        self.connected.closed(peer, remaining);
        if remaining == 0 {
            self.book.disconnected(&peer, Instant::now(), random_unit());
        }
    }

    /// A failed dial: a bootstrap address's outcome, and for a dial that was under way the peer
    /// backs off and its failing addresses count (dials that could not start do not).
    fn on_dial_failure(&mut self, f: DialFailure) {
        let DialFailure {
            connection_id: id,
            peer_id: peer,
            error,
        } = f;
        let bootstrap_dial = self.bootstrap_dials.remove(&id);
        if !self.pending.remove(&id) {
            if let Some(i) = bootstrap_dial {
                self.bootstrap.not_started(i, &error.to_string());
            }
            return;
        }
        let now = Instant::now();
        self.bootstrap.dial_failed(
            BootstrapDialFailure {
                id,
                peer,
                peer_connected: peer.is_some_and(|p| self.is_connected(&p)),
                self_dial: matches!(error, DialError::LocalPeerId { .. }),
                error: &error.to_string(),
            },
            now,
            random_unit(),
        );
        let Some(peer) = peer else {
            return;
        };
        if self.is_connected(&peer) || matches!(error, DialError::NoAddresses) {
            return;
        }
        let failed: Vec<Multiaddr> = match error {
            DialError::Transport(list) => list.iter().map(|(a, _)| a.clone()).collect(),
            DialError::WrongPeerId { address, .. } => vec![address.clone()],
            _ => Vec::new(),
        };
        let out = self.book.dial_failed(&peer, &failed, now, random_unit());
        for a in &out.dropped {
            tracing::info!(%peer, addr = %a, "address dropped after repeated failed dials");
        }
        if out.forgotten {
            tracing::info!(%peer, "peer forgotten: no address left");
        }
        if !out.dropped.is_empty() {
            self.actions
                .push(ToSwarm::GenerateEvent(BookEvent::AddressesDropped(
                    peer,
                    out.dropped,
                )));
        }
    }
}

impl NetworkBehaviour for BookKeeper {
    type ToSwarm = BookEvent;

    no_protocol!();

    /// The peer's known addresses (used when the dial lets behaviours add addresses). Placed
    /// after the behaviours that deny connections, it sees only dials that passed them.
    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.pending.insert(id);
        if let Some(&i) = self.bootstrap_dials.get(&id) {
            self.bootstrap.dialing(i, id);
        }
        Ok(peer
            .and_then(|p| self.book.get(&p))
            .map(|e| e.addrs.clone())
            .unwrap_or_default())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => self.on_established(c),
            FromSwarm::ConnectionClosed(c) => self.on_closed(c.peer_id, c.remaining_established),
            FromSwarm::DialFailure(f) => self.on_dial_failure(f),
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        // Asked until it says no, so the timer wakes this behaviour for its next tick.
        while self.every.ticked(cx) {
            let now = Instant::now();
            self.redial(now);
            self.save_if_due(now);
        }
        match self.actions.pop() {
            Some(action) => Poll::Ready(action),
            None => self.actions.pending(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use fold_proto::v1::bootstrap_status::State;
    use libp2p::swarm::{SwarmEvent, dummy};

    use super::*;
    use crate::connector::tests::{listen, memory_swarm, until, until_state};

    fn keeper(bootstrap: Vec<Multiaddr>) -> BookKeeper {
        BookKeeper::new(PeerId::random(), bootstrap)
    }

    fn established(e: &SwarmEvent<BookEvent>) -> Option<PeerId> {
        match e {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => Some(*peer_id),
            _ => None,
        }
    }

    #[tokio::test]
    async fn pending_outbound_connections_are_answered_with_the_books_addresses() {
        let mut a = memory_swarm(keeper(vec![]));
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        a.behaviour_mut()
            .book_mut()
            .entry(peer_b, "test")
            .add_addr(addr);
        // A dial by peer id alone: only the book knows where the peer is.
        a.dial(DialOpts::peer_id(peer_b).build()).expect("dial");
        let p = until(&mut a, &mut b, |e, _| established(e)).await;
        assert_eq!(p, peer_b);
        let e = a.behaviour().book().get(&peer_b).expect("in the book");
        assert!(e.known, "a peer connected to becomes known");
        assert_eq!(e.connections, 1);
    }

    #[tokio::test]
    async fn a_known_peer_that_disconnects_is_redialled_when_its_backoff_expires() {
        let mut a = memory_swarm(keeper(vec![]));
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        a.dial(addr).expect("dial");
        until(&mut a, &mut b, |e, _| established(e)).await;
        // Closed under it (not through Network.Disconnect, which holds redials off).
        a.disconnect_peer_id(peer_b).expect("connected");
        until(&mut a, &mut b, |e, k| {
            matches!(e, SwarmEvent::ConnectionClosed { .. })
                .then(|| assert_eq!(k.book().get(&peer_b).map(|e| e.connections), Some(0)))
        })
        .await;
        // Nobody dials but the book's timer.
        let p = until(&mut a, &mut b, |e, _| established(e)).await;
        assert_eq!(p, peer_b);
    }

    #[tokio::test]
    async fn a_peer_connected_to_is_written_to_the_file_off_the_swarm_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("peers.json");
        let mut a = memory_swarm(keeper(vec![]));
        let mut b = memory_swarm(dummy::Behaviour);
        a.behaviour_mut().start_file(path.clone());
        let addr = listen(&mut b).await;
        let peer_b = b.local_peer_id().to_string();
        a.dial(addr).expect("dial");
        // Nobody asks for a save: the book's timer hands the changed book to the writer.
        until_state(&mut a, &mut b, |_| {
            let saved = crate::peer_book::load_file(&path);
            saved.peers.iter().any(|p| p.id == peer_b).then_some(())
        })
        .await;
        // An explicit save answers once the book is on disk.
        let (reply, written) = tokio::sync::oneshot::channel();
        a.behaviour_mut().save_now(reply);
        assert!(written.await.expect("answered"));
    }

    #[tokio::test]
    async fn a_bootstrap_address_without_a_peer_id_is_dialled_and_reported() {
        let mut b = memory_swarm(dummy::Behaviour);
        let addr = listen(&mut b).await;
        let peer_b = *b.local_peer_id();
        let mut a = memory_swarm(keeper(vec![addr]));
        until(&mut a, &mut b, |e, _| established(e)).await;
        let st = &a.behaviour().bootstrap().status()[0];
        assert_eq!(st.state, State::Connected as i32);
        assert_eq!(st.node_id, peer_b.to_string());
    }

    #[tokio::test]
    async fn a_failed_dial_is_a_bootstrap_failure_and_a_known_peers_backoff() {
        let gone: Multiaddr = "/memory/4242424243".parse().expect("addr");
        let mut b = memory_swarm(dummy::Behaviour);
        let mut a = memory_swarm(keeper(vec![gone.clone()]));
        let peer = PeerId::random();
        {
            let e = a.behaviour_mut().book_mut().entry(peer, "test");
            e.add_addr(gone.clone());
            e.known = true;
        }
        // Both the bootstrap address and the known peer are dialled on the first tick; both
        // fail.
        until(&mut a, &mut b, |_, k| {
            let failed = k.bootstrap().status()[0].state == State::Failed as i32;
            let backed_off = k.book().get(&peer).is_some_and(|e| e.dial_failures == 1);
            (failed && backed_off).then_some(())
        })
        .await;
        let e = a
            .behaviour()
            .book()
            .get(&peer)
            .expect("kept: it has its address");
        assert_eq!(e.addr_failures.get(&gone), Some(&1));
    }
}
