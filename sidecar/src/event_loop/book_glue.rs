//! The swarm task's peer book glue: the peers file read at start (the peer book behaviour writes
//! it), the bootstrap peers put in the book and the DHT, addresses the book
//! dropped taken out of the DHT, and what identify and mDNS teach about peers, fed to the peer
//! book behaviour ([`crate::book_keeper`], which redials and counts failed dials itself).

use fold_proto::sidecar::peer_event::Kind;
use libp2p::{Multiaddr, PeerId, identify};

use super::EventLoop;
use crate::behaviour::KAD_PROTOCOL;
use crate::book_keeper::BookEvent;
use crate::peer_book::strip_p2p;
use crate::reach::HOP_PROTOCOL;

impl EventLoop {
    /// Read the peers file into the book (and the DHT's routing table). A bad file is a
    /// warning (in [`crate::peer_book::load_file`]) and an empty book.
    pub(super) fn load_peers(&mut self) {
        let Some(path) = self.peers_path.clone() else {
            return;
        };
        let saved = crate::peer_book::load_file(&path);
        let local = self.local();
        let n = self.peers_mut().restore(&saved, &local);
        if n > 0 {
            tracing::info!(peers = n, path = %path.display(), "peer book loaded; redialling known peers");
        }
        for sp in &saved.peers {
            if let Ok(peer) = sp.id.parse::<PeerId>()
                && let Some(addrs) = self.peers().get(&peer).map(|e| e.addrs.clone())
            {
                for a in addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a);
                }
            }
        }
    }

    /// Put the configured bootstrap peers in the book (redialled, never forgotten) and the DHT.
    pub(super) fn add_bootstrap(&mut self) {
        for (peer, addr) in self.swarm.behaviour().book.bootstrap().named() {
            self.peers_mut().add_bootstrap(peer, addr.clone());
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, strip_p2p(addr));
        }
    }

    /// What the peer book behaviour asks: addresses it dropped leave the DHT too.
    pub(super) fn on_book_event(&mut self, ev: BookEvent) {
        match ev {
            BookEvent::AddressesDropped(peer, addrs) => {
                for a in &addrs {
                    self.swarm.behaviour_mut().kad.remove_address(&peer, a);
                }
            }
        }
    }

    /// A peer's identify info: its protocols, agent and (learnable) listen addresses go to the
    /// peer book, the addresses to the DHT if it speaks it; a relay is a reservation candidate.
    pub(super) fn on_identified(&mut self, peer_id: PeerId, mut info: identify::Info) {
        let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
        self.keep_learnable(peer_id, &mut info.listen_addrs);
        if info.protocols.contains(&HOP_PROTOCOL) {
            self.relay_candidate(peer_id, &info.listen_addrs);
        }
        let e = self.entry(peer_id, "inbound");
        e.protocols = info.protocols.iter().map(|p| p.to_string()).collect();
        e.agent = info.agent_version.clone();
        for a in &info.listen_addrs {
            e.add_addr(a.clone());
        }
        if speaks_kad {
            for a in info.listen_addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, strip_p2p(a));
            }
        }
    }

    pub(super) fn on_mdns_discovered(&mut self, peer: PeerId, addr: Multiaddr) {
        if peer == self.local() || !self.learnable_from(&peer, &addr) {
            return;
        }
        let is_new = !self.peers().contains_key(&peer);
        self.entry(peer, "mdns").add_addr(addr.clone());
        self.swarm
            .behaviour_mut()
            .kad
            .add_address(&peer, addr.clone());
        if is_new {
            tracing::info!(%peer, %addr, "discovered by mDNS");
        }
        self.emit(Kind::Discovered, peer, vec![addr.to_string()]);
        if !self.swarm.is_connected(&peer) {
            let _ = self.dial_if_disconnected(peer, vec![addr]);
        }
    }

    /// Keep only the addresses `peer` reported that this node may store and dial: no loopback or
    /// link-local ones unless this node reached the peer over loopback itself.
    pub(super) fn keep_learnable(&self, peer: PeerId, addrs: &mut Vec<Multiaddr>) {
        let before = addrs.len();
        addrs.retain(|a| self.learnable_from(&peer, a));
        if addrs.len() < before {
            tracing::debug!(%peer, dropped = before - addrs.len(), "host-local addresses a remote peer reported are not learned");
        }
    }

    pub(super) fn learnable_from(&self, peer: &PeerId, a: &Multiaddr) -> bool {
        crate::peer_book::learnable(a, self.conns.over_loopback(peer))
    }

    /// mDNS no longer sees `peer` at `addr`.
    pub(super) fn on_mdns_expired(&mut self, peer: PeerId, addr: Multiaddr) {
        if let Some(e) = self.peers_mut().get_mut(&peer) {
            e.addrs.retain(|a| a != &addr);
        }
        self.emit(Kind::Expired, peer, vec![addr.to_string()]);
    }
}
