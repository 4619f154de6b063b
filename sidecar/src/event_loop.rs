//! The one task that owns the `Swarm`: it selects on swarm events, commands from
//! [`crate::client::Client`]s and a 1 s tick, and only dispatches each to a handler. Policy lives
//! in the sidecar's own behaviours, composed into [`crate::behaviour::Behaviour`]: the peer book
//! with bootstrap and redial ([`crate::book_keeper`]), requests held until their peer connects
//! ([`crate::connector`]), AutoNAT, relay reservations and dial-back cleanup
//! ([`crate::reach_keeper`]). The handlers live in child modules by concern and feed those
//! behaviours or carry out their events: reading the peer book's file, what identify and mDNS
//! teach ([`book_glue`]); dials and held requests ([`dialing`]); DHT provide and lookup ([`kad_glue`]);
//! relays, AutoNAT and the relayed → direct hand-over ([`relay_glue`]); the connection table and
//! pings ([`conn_events`]); schema checks through the one [`crate::gate::InboundGate`]
//! ([`schema_glue`]). Answers go back on oneshots keyed by request or query id. Forwarded requests
//! travel on long-lived streams handled off this task ([`crate::forward`]); the peer book file is
//! written off it too ([`crate::book_file`]).

mod book_glue;
mod conn_events;
mod dialing;
mod kad_glue;
mod relay_glue;
mod schema_glue;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_proto::sidecar::{PeerEvent, peer_event::Kind};
use fold_proto::wire::CheckSchemasRequest;
use futures::StreamExt;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::command::{Command, MeshError, Outbound};
use crate::conns::{Conns, PingPolicy};
use crate::forward::Outbound as ForwardStreams;
use crate::metrics::SidecarMetrics;
use crate::node_link::NodeHandler;
use crate::peer_book::PeerBook;
use crate::status::NetworkSnapshot;
use crate::upgrade::Upgrades;

use kad_glue::Providing;
use schema_glue::PendingSchema;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct EventLoopParts {
    pub swarm: Swarm<Behaviour>,
    pub commands: mpsc::Receiver<Command>,
    pub self_tx: mpsc::Sender<Command>,
    pub events: broadcast::Sender<PeerEvent>,
    pub node: Arc<dyn NodeHandler>,
    pub mdns_enabled: bool,
    /// The inbound gate schema checks pass, as forwards do (rate limit, denial, slots).
    pub gate: Arc<crate::gate::InboundGate>,
    pub libp2p_metrics: Metrics,
    pub metrics: Arc<SidecarMetrics>,
    /// The per-peer forward streams.
    pub forward: Arc<ForwardStreams>,
    /// The peer book file (read at start, written when the book changes and at shutdown).
    pub peers_path: Option<PathBuf>,
    /// This node's relay service: its limits (counters are filled in by the loop).
    pub relay_server: fold_proto::v1::RelayServerStatus,
    /// When a connection whose pings fail is closed.
    pub ping: PingPolicy,
}

pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    self_tx: mpsc::Sender<Command>,
    events: broadcast::Sender<PeerEvent>,
    node: Arc<dyn NodeHandler>,
    mdns_enabled: bool,
    gate: Arc<crate::gate::InboundGate>,
    forward: Arc<ForwardStreams>,
    libp2p_metrics: Metrics,
    metrics: Arc<SidecarMetrics>,

    listen_addrs: Vec<Multiaddr>,
    pending_dial: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, MeshError>>>,
    pending_schema: HashMap<OutboundRequestId, PendingSchema>,
    /// The schemas this node provides and its provider lookups (crate::event_loop::kad_glue).
    providing: Providing,
    kad_bootstrapped: bool,
    /// The peer book file, until [`EventLoop::run`] has the peer book behaviour write it.
    peers_path: Option<PathBuf>,
    relay_server: fold_proto::v1::RelayServerStatus,
    /// Every open connection (crate::conns).
    conns: Conns,
    /// Peers whose relayed connections are being replaced by a direct one (crate::upgrade).
    upgrading: Upgrades<Outbound>,
}

impl EventLoop {
    pub fn new(p: EventLoopParts) -> EventLoop {
        let mut el = EventLoop {
            swarm: p.swarm,
            commands: p.commands,
            self_tx: p.self_tx,
            events: p.events,
            node: p.node,
            mdns_enabled: p.mdns_enabled,
            gate: p.gate,
            forward: p.forward,
            libp2p_metrics: p.libp2p_metrics,
            metrics: p.metrics,
            listen_addrs: Vec::new(),
            pending_dial: HashMap::new(),
            pending_schema: HashMap::new(),
            providing: Providing::default(),
            kad_bootstrapped: false,
            peers_path: p.peers_path,
            relay_server: p.relay_server,
            conns: Conns::new(p.ping),
            upgrading: Upgrades::default(),
        };
        let allowed: Vec<PeerId> = el
            .swarm
            .behaviour()
            .allow
            .as_ref()
            .map(|a| a.allowed_peers().iter().copied().collect())
            .unwrap_or_default();
        for peer in allowed {
            el.peers_mut().set_trusted(peer);
        }
        el.load_peers();
        el.add_bootstrap();
        el
    }

    fn local(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn emit(&self, kind: Kind, peer: PeerId, addrs: Vec<String>) {
        let _ = self.events.send(PeerEvent {
            kind: kind as i32,
            node_id: peer.to_string(),
            addrs,
            unix_ms: now_ms(),
        });
    }

    fn entry(&mut self, peer: PeerId, source: &'static str) -> &mut crate::peer_book::PeerEntry {
        self.peers_mut().entry(peer, source)
    }

    /// The peer book, owned by its behaviour (crate::book_keeper).
    fn peers(&self) -> &PeerBook {
        self.swarm.behaviour().book.book()
    }

    fn peers_mut(&mut self) -> &mut PeerBook {
        self.swarm.behaviour_mut().book.book_mut()
    }

    pub async fn run(mut self) {
        if let Some(path) = self.peers_path.take() {
            self.swarm.behaviour_mut().book.start_file(path);
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    if self.providing.take_reprovide_due() {
                        self.reprovide();
                    }
                    self.close_silent_connections(Instant::now());
                    if ticks.is_multiple_of(300) {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
        }
        self.swarm.behaviour().book.flush().await;
        tracing::info!("swarm event loop stopped");
    }

    // ---- commands ----------------------------------------------------------------------------

    /// The swarm's state for `Mesh.Status` (the reply is built from it in the gRPC layer).
    fn snapshot(&self) -> NetworkSnapshot {
        let reach = &self.swarm.behaviour().reach;
        NetworkSnapshot {
            node_id: self.local(),
            listen_addrs: self.listen_addrs.clone(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            connected_peers: self.swarm.connected_peers().count(),
            known_peers: self.peers().len(),
            mdns_enabled: self.mdns_enabled,
            provided_schemas: self.providing.provided(),
            bootstrap: self.swarm.behaviour().book.bootstrap().status(),
            reachability: reach.autonat().verdict(),
            reachable_addrs: reach.autonat().reachable_addrs(),
            relays: reach.relays().status(),
            relay_server: self.relay_server,
            relay_reservations: reach.server().reservations(),
            relay_circuits: reach.server().circuits,
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::ListPeers {
                include_disconnected,
                reply,
            } => {
                let peers = self.peers().infos(include_disconnected, &self.local());
                let _ = reply.send(peers);
            }
            Command::Dial { addr, reply } => self.dial(addr, reply),
            Command::Disconnect { peer, reply } => {
                // Disconnected on purpose: no redial for a while.
                self.peers_mut().hold_off(&peer, Instant::now());
                let _ = reply.send(self.swarm.disconnect_peer_id(peer).is_ok());
            }
            Command::Forward {
                peer,
                request,
                reply,
            } => self.send_or_connect(peer, Outbound::Forward(request, reply)),
            Command::CheckSchemas { peer, names, reply } => {
                self.send_or_connect(peer, Outbound::Schema(CheckSchemasRequest { names }, reply))
            }
            Command::Provide { schemas, reply } => self.provide(schemas, reply),
            Command::FindProviders { schema, reply } => self.find_providers(schema, reply),
            Command::SavePeers { reply } => self.swarm.behaviour_mut().book.save_now(reply),
            Command::UpgradeDue { peer } => self.upgrade_due(peer),
            Command::RespondSchema { channel, response } => self.respond_schema(channel, *response),
        }
    }

    // ---- reachability --------------------------------------------------------------------------

    // ---- swarm events ------------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed { addresses, .. } => self.on_listener_closed(&addresses),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_connection_established(
                peer_id,
                connection_id,
                &endpoint,
                num_established.get(),
            ),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => self.on_connection_closed(
                peer_id,
                connection_id,
                num_established,
                cause.map(|e| e.to_string()),
            ),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => self.on_outgoing_error(connection_id, peer_id, &error),
            SwarmEvent::Behaviour(b) => self.on_behaviour_event(b),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(ev) => {
                self.libp2p_metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    self.on_identified(peer_id, info);
                }
            }
            BehaviourEvent::Ping(ev) => {
                self.libp2p_metrics.record(&ev);
                self.on_ping(ev);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    self.on_mdns_discovered(peer, addr);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, addr) in list {
                    self.on_mdns_expired(peer, addr);
                }
            }
            BehaviourEvent::Kad(ev) => {
                self.libp2p_metrics.record(&ev);
                self.on_kad_event(ev);
            }
            BehaviourEvent::Stream(()) => {}
            BehaviourEvent::RelayClient(ev) => self.on_relay_client(ev),
            BehaviourEvent::RelayServer(ev) => {
                self.libp2p_metrics.record(&ev);
                self.on_relay_server(ev);
            }
            BehaviourEvent::Dcutr(ev) => {
                self.libp2p_metrics.record(&ev);
                relay_glue::on_dcutr(ev);
            }
            BehaviourEvent::Autonat(ev) => self.on_autonat(ev),
            BehaviourEvent::AutonatServer(ev) => self.on_autonat_server(ev),
            BehaviourEvent::Schema(ev) => self.on_schema_event(ev),
            BehaviourEvent::Connect(ev) => self.on_connect_event(ev),
            BehaviourEvent::Book(ev) => self.on_book_event(ev),
            BehaviourEvent::Reach(ev) => self.on_reach_event(ev),
            BehaviourEvent::Limits(_)
            | BehaviourEvent::Memory(_)
            | BehaviourEvent::Deny(_)
            | BehaviourEvent::Allow(_) => {}
        }
    }

    // ---- inbound requests --------------------------------------------------------------------
}
