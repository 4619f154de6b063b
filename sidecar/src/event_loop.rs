//! The one task that owns the `Swarm`. Commands arrive from [`crate::client::Client`]s over a
//! channel; answers go back on oneshots keyed by request or query id. Forwarded requests travel on
//! long-lived streams handled off this task ([`crate::forward`]); this loop only makes sure a
//! connection exists before it hands a request to its peer's stream. Inbound schema checks are
//! checked here (rate limit, queue room) and handed to the node on a separate task.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_middleware::rate_limit::KeyedLimiter;
use fold_proto::sidecar::{PeerEvent, peer_event::Kind};
use fold_proto::v1::{BootstrapStatus, NetworkStatusResponse, bootstrap_status};
use fold_proto::wire::{
    CheckSchemasRequest, CheckSchemasResponse, ForwardResponse, SchemaNames, SignedEnvelope,
    WireError, check_schemas_response,
};
use futures::StreamExt;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, ping, relay};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tonic::Code;

use crate::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use crate::command::{Command, MeshError};
use crate::forward::Outbound as ForwardStreams;
use crate::metrics::SidecarMetrics;
use crate::node_link::NodeHandler;
use crate::peer_book::{
    DIAL_GUARD, MAX_REDIALS_PER_TICK, PeerBook, SavedBook, backoff, peer_of, random_unit,
    strip_p2p, with_jitter,
};
use crate::reach::{AutoNat, HOP_PROTOCOL, RelayAction, RelayServer, Relays, Source};
use fold_proto::status::wire_error;

/// A request waiting for a connection to its peer.
enum Outbound {
    Forward(
        Box<SignedEnvelope>,
        oneshot::Sender<Result<ForwardResponse, MeshError>>,
    ),
    Schema(
        CheckSchemasRequest,
        oneshot::Sender<Result<CheckSchemasResponse, MeshError>>,
    ),
}

impl Outbound {
    fn fail(self, e: MeshError) {
        match self {
            Outbound::Forward(_, r) => {
                let _ = r.send(Err(e));
            }
            Outbound::Schema(_, r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn schema_key(name: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("fold-schema:{name}"))
}

fn outbound_error(peer: &PeerId, e: &OutboundFailure) -> MeshError {
    match e {
        OutboundFailure::DialFailure => {
            MeshError::Unavailable(format!("cannot reach node {peer}: dial failed"))
        }
        OutboundFailure::Timeout => {
            MeshError::DeadlineExceeded(format!("node {peer} did not answer in time"))
        }
        OutboundFailure::ConnectionClosed => MeshError::Unavailable(format!(
            "the connection to node {peer} closed before it answered"
        )),
        OutboundFailure::UnsupportedProtocols => MeshError::Unavailable(format!(
            "peer {peer} does not speak the fold protocols (not a fold node?)"
        )),
        OutboundFailure::Io(e) => {
            MeshError::Unavailable(format!("talking to node {peer} failed: {e}"))
        }
    }
}

pub struct EventLoopParts {
    pub swarm: Swarm<Behaviour>,
    pub commands: mpsc::Receiver<Command>,
    pub self_tx: mpsc::Sender<Command>,
    pub events: broadcast::Sender<PeerEvent>,
    pub node: Arc<dyn NodeHandler>,
    pub mdns_enabled: bool,
    pub bootstrap: Vec<Multiaddr>,
    pub limiter: Option<KeyedLimiter>,
    pub inbound_queue: usize,
    pub libp2p_metrics: Metrics,
    pub metrics: Arc<SidecarMetrics>,
    /// The per-peer forward streams.
    pub forward: Arc<ForwardStreams>,
    /// The peer book file (read at start, written when the book changes and at shutdown).
    pub peers_path: Option<PathBuf>,
    /// Relays to reserve on (crate::reach).
    pub relays: Relays,
    /// This node's relay service: its limits (counters are filled in by the loop).
    pub relay_server: fold_proto::v1::RelayServerStatus,
}

/// A peer whose relayed connections are being replaced by a direct one.
struct Upgrade {
    relayed: Vec<ConnectionId>,
    /// Requests held until the relayed connections are closed (so their streams open on the
    /// direct one; libp2p-stream picks any of a peer's connections).
    held: Vec<Outbound>,
}

/// How long relayed connections stay open after a direct one came up, for the answers to the
/// requests already in flight on them.
const UPGRADE_GRACE: Duration = Duration::from_millis(500);
/// Most requests held for one peer during an upgrade; beyond it, UNAVAILABLE.
const MAX_HELD: usize = 1024;

/// One open connection: its peer, and whether it runs through a relay.
struct Conn {
    peer: PeerId,
    relayed: bool,
    /// This node dialled it (AutoNAT asks for dial-backs only over such connections).
    dialer: bool,
    /// Dialled from a new port: an AutoNAT dial-back this node made for a peer (ordinary dials
    /// reuse the listen port).
    new_port: bool,
    transport: &'static str,
}

/// The peers file is written at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// A bootstrap address without a peer id (e.g. a DNS name): redialled on its own backoff until
/// the peer it reaches is known to the peer book.
struct AnonBootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    failures: u32,
    next_dial: Option<Instant>,
}

type ProviderQuery = (
    String,
    HashSet<PeerId>,
    oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
);
type PendingSchema = (
    PeerId,
    oneshot::Sender<Result<CheckSchemasResponse, MeshError>>,
);

pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    self_tx: mpsc::Sender<Command>,
    events: broadcast::Sender<PeerEvent>,
    node: Arc<dyn NodeHandler>,
    mdns_enabled: bool,
    bootstrap: Vec<Multiaddr>,
    limiter: Option<KeyedLimiter>,
    schema_slots: Arc<Semaphore>,
    forward: Arc<ForwardStreams>,
    libp2p_metrics: Metrics,
    metrics: Arc<SidecarMetrics>,

    peers: PeerBook,
    listen_addrs: Vec<Multiaddr>,
    pending_dial: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, MeshError>>>,
    waiting_connect: HashMap<PeerId, Vec<Outbound>>,
    pending_lookup: HashMap<kad::QueryId, PeerId>,
    pending_schema: HashMap<OutboundRequestId, PendingSchema>,
    pending_providers: HashMap<kad::QueryId, ProviderQuery>,
    provided: BTreeSet<String>,
    reprovide_due: bool,
    kad_bootstrapped: bool,
    /// The outcome of each bootstrap address's last dial (same order as `bootstrap`).
    bootstrap_status: Vec<BootstrapStatus>,
    /// Bootstrap dials under way: connection → index in `bootstrap` (at most one per address).
    bootstrap_dials: HashMap<ConnectionId, usize>,
    peers_path: Option<PathBuf>,
    /// What the peers file holds (as last written or read).
    saved: Option<SavedBook>,
    last_save: Option<Instant>,
    anon_bootstrap: Vec<AnonBootstrap>,
    anon_dials: HashMap<ConnectionId, usize>,
    autonat: AutoNat,
    relays: Relays,
    relay_server: fold_proto::v1::RelayServerStatus,
    relay_counts: RelayServer,
    /// Every open connection (bounded by the connection limits).
    conns: HashMap<ConnectionId, Conn>,
    /// Peers with requests waiting whose known addresses failed and that were looked up in the
    /// DHT again (at most once per wait; a subset of `waiting_connect`'s keys).
    relookup: HashSet<PeerId>,
    /// Peers with requests waiting that were dialled through this node's relays (at most once
    /// per wait; a subset of `waiting_connect`'s keys).
    relay_tried: HashSet<PeerId>,
    /// Peers whose relayed connections are being replaced by a direct one.
    upgrading: HashMap<PeerId, Upgrade>,
}

/// Longest dial error kept per bootstrap address.
const MAX_BOOTSTRAP_ERROR: usize = 1024;

impl EventLoop {
    pub fn new(p: EventLoopParts) -> EventLoop {
        let mut el = EventLoop {
            swarm: p.swarm,
            commands: p.commands,
            self_tx: p.self_tx,
            events: p.events,
            node: p.node,
            mdns_enabled: p.mdns_enabled,
            limiter: p.limiter,
            forward: p.forward,
            schema_slots: Arc::new(Semaphore::new(p.inbound_queue.max(1))),
            libp2p_metrics: p.libp2p_metrics,
            metrics: p.metrics,
            peers: PeerBook::default(),
            listen_addrs: Vec::new(),
            pending_dial: HashMap::new(),
            waiting_connect: HashMap::new(),
            pending_lookup: HashMap::new(),
            pending_schema: HashMap::new(),
            pending_providers: HashMap::new(),
            provided: BTreeSet::new(),
            reprovide_due: false,
            kad_bootstrapped: false,
            bootstrap_status: p
                .bootstrap
                .iter()
                .map(|a| BootstrapStatus {
                    address: a.to_string(),
                    state: bootstrap_status::State::Dialing as i32,
                    ..Default::default()
                })
                .collect(),
            bootstrap_dials: HashMap::new(),
            bootstrap: p.bootstrap,
            peers_path: p.peers_path,
            saved: None,
            last_save: None,
            anon_bootstrap: Vec::new(),
            anon_dials: HashMap::new(),
            autonat: AutoNat::default(),
            relays: p.relays,
            relay_server: p.relay_server,
            relay_counts: RelayServer::default(),
            conns: HashMap::new(),
            relookup: HashSet::new(),
            relay_tried: HashSet::new(),
            upgrading: HashMap::new(),
        };
        el.load_peers();
        el.add_bootstrap();
        el
    }

    /// Read the peers file into the book (and the DHT's routing table). A bad file is a
    /// warning (in [`crate::peer_book::load_file`]) and an empty book.
    fn load_peers(&mut self) {
        let Some(path) = self.peers_path.clone() else {
            return;
        };
        let saved = crate::peer_book::load_file(&path);
        let local = self.local();
        let n = self.peers.restore(&saved, &local);
        if n > 0 {
            tracing::info!(peers = n, path = %path.display(), "peer book loaded; redialling known peers");
        }
        for sp in &saved.peers {
            if let Ok(peer) = sp.id.parse::<PeerId>()
                && let Some(e) = self.peers.get(&peer)
            {
                for a in e.addrs.clone() {
                    self.swarm.behaviour_mut().kad.add_address(&peer, a);
                }
            }
        }
        self.saved = Some(self.peers.saved(&local));
    }

    /// Write the peers file if the known peers changed since it was last written. Returns
    /// false only when a write failed.
    fn save_peers(&mut self) -> bool {
        let Some(path) = self.peers_path.clone() else {
            return true;
        };
        let now = self.peers.saved(&self.local());
        if self.saved.as_ref() == Some(&now) {
            return true;
        }
        self.last_save = Some(Instant::now());
        match crate::peer_book::save_file(&path, &now) {
            Ok(()) => {
                tracing::debug!(peers = now.peers.len(), "peer book written");
                self.saved = Some(now);
                true
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the peer book");
                false
            }
        }
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
        self.peers.entry(peer, source)
    }

    /// The bootstrap addresses that name `peer` (`/p2p/<id>`).
    fn bootstrap_indexes(&self, peer: &PeerId) -> Vec<usize> {
        self.bootstrap
            .iter()
            .enumerate()
            .filter(|(_, a)| peer_of(a).as_ref() == Some(peer))
            .map(|(i, _)| i)
            .collect()
    }

    /// A bootstrap address that names this node itself.
    fn bootstrap_self(&mut self, i: usize) {
        if let Some(st) = self.bootstrap_status.get_mut(i) {
            st.state = bootstrap_status::State::SelfAddress as i32;
            st.node_id = self.swarm.local_peer_id().to_string();
            st.last_attempt_unix_ms = now_ms();
        }
    }

    /// Record how a bootstrap address's dial ended.
    fn bootstrap_outcome(&mut self, i: usize, outcome: Result<PeerId, String>) {
        let Some(st) = self.bootstrap_status.get_mut(i) else {
            return;
        };
        st.last_attempt_unix_ms = now_ms();
        match outcome {
            Ok(peer) => {
                st.state = bootstrap_status::State::Connected as i32;
                st.node_id = peer.to_string();
            }
            Err(e) => {
                if st.state != bootstrap_status::State::Failed as i32 {
                    tracing::warn!(addr = %st.address, error = %e, "bootstrap dial failed");
                }
                st.state = bootstrap_status::State::Failed as i32;
                st.last_error = e.chars().take(MAX_BOOTSTRAP_ERROR).collect();
            }
        }
    }

    /// Put the configured bootstrap peers in the book (redialled, never forgotten) and the DHT.
    fn add_bootstrap(&mut self) {
        for (i, addr) in self.bootstrap.clone().into_iter().enumerate() {
            match peer_of(&addr) {
                Some(peer) if peer == self.local() => self.bootstrap_self(i),
                Some(peer) => {
                    self.peers.add_bootstrap(peer, addr.clone());
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, strip_p2p(addr));
                }
                None => self.anon_bootstrap.push(AnonBootstrap {
                    addr,
                    peer: None,
                    failures: 0,
                    next_dial: None,
                }),
            }
        }
    }

    /// Dial the known and bootstrap peers that are not connected and whose backoff has passed.
    fn redial(&mut self) {
        let now = Instant::now();
        let local = self.local();
        for (peer, addrs) in self.peers.due_redials(now, &local, MAX_REDIALS_PER_TICK) {
            if self.swarm.is_connected(&peer) {
                continue;
            }
            tracing::debug!(%peer, addrs = addrs.len(), "redialling");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "redial not started");
            }
        }
        for i in 0..self.anon_bootstrap.len() {
            let b = &self.anon_bootstrap[i];
            let covered = b.peer.is_some_and(|p| {
                self.swarm.is_connected(&p)
                    || self.peers.get(&p).is_some_and(|e| !e.addrs.is_empty())
            });
            if covered || b.next_dial.is_some_and(|t| t > now) {
                continue;
            }
            let opts = DialOpts::unknown_peer_id().address(b.addr.clone()).build();
            let id = opts.connection_id();
            let addr = b.addr.clone();
            self.anon_bootstrap[i].next_dial = Some(now + DIAL_GUARD);
            // Its outcome is also what Network.Status reports for this bootstrap address.
            let j = self.bootstrap.iter().position(|a| *a == addr);
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.anon_dials.insert(id, i);
                    if let Some(j) = j {
                        self.bootstrap_dials.insert(id, j);
                    }
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "bootstrap dial not started");
                    if let Some(j) = j {
                        self.bootstrap_outcome(j, Err(e.to_string()));
                    }
                }
            }
        }
    }

    /// A failed outgoing connection: the peer backs off, its failing addresses count.
    fn dial_failed(
        &mut self,
        connection_id: ConnectionId,
        peer: Option<PeerId>,
        error: &DialError,
    ) {
        let now = Instant::now();
        if let Some(i) = self.anon_dials.remove(&connection_id)
            && let Some(b) = self.anon_bootstrap.get_mut(i)
        {
            b.failures = b.failures.saturating_add(1);
            b.next_dial = Some(now + with_jitter(backoff(b.failures), random_unit()));
        }
        let Some(peer) = peer else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            return;
        }
        let failed: Vec<Multiaddr> = match error {
            DialError::Transport(list) => list.iter().map(|(a, _)| a.clone()).collect(),
            DialError::WrongPeerId { address, .. } => vec![address.clone()],
            _ => Vec::new(),
        };
        let out = self.peers.dial_failed(&peer, &failed, now, random_unit());
        for a in &out.dropped {
            tracing::info!(%peer, addr = %a, "address dropped after repeated failed dials");
            self.swarm.behaviour_mut().kad.remove_address(&peer, a);
        }
        if out.forgotten {
            tracing::info!(%peer, "peer forgotten: no address left");
        }
    }

    pub async fn run(mut self) {
        self.redial();
        self.plan_relays();
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
                    if self.reprovide_due {
                        self.reprovide_due = false;
                        self.reprovide();
                    }
                    // Known and bootstrap peers, each on its own backoff.
                    self.redial();
                    self.plan_relays();
                    if self.last_save.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
                        self.save_peers();
                    }
                    if ticks.is_multiple_of(300) {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
            }
        }
        self.save_peers();
        tracing::info!("swarm event loop stopped");
    }

    // ---- commands ----------------------------------------------------------------------------

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Status { reply } => {
                let mut listen: Vec<String> =
                    self.listen_addrs.iter().map(|a| a.to_string()).collect();
                listen.sort();
                let _ = reply.send(NetworkStatusResponse {
                    node_id: self.local().to_string(),
                    listen_addrs: listen,
                    external_addrs: self
                        .swarm
                        .external_addresses()
                        .map(|a| a.to_string())
                        .collect(),
                    connected_peers: self.swarm.connected_peers().count() as u32,
                    known_peers: self.peers.len() as u32,
                    mdns_enabled: self.mdns_enabled,
                    provided_schemas: self.provided.iter().cloned().collect(),
                    bootstrap: self.bootstrap_status.clone(),
                    // Filled in by the fold-node, which follows schemas.
                    replicas: Vec::new(),
                    reachability: self.autonat.verdict() as i32,
                    reachable_addrs: self.autonat.reachable_addrs(),
                    relays: self.relays.status(),
                    relay_server: Some(fold_proto::v1::RelayServerStatus {
                        reservations: if self.relay_server.enabled {
                            self.relay_counts.reservations()
                        } else {
                            0
                        },
                        circuits: if self.relay_server.enabled {
                            self.relay_counts.circuits
                        } else {
                            0
                        },
                        ..self.relay_server
                    }),
                });
            }
            Command::ListPeers {
                include_disconnected,
                reply,
            } => {
                let peers = self.peers.infos(include_disconnected, &self.local());
                let _ = reply.send(peers);
            }
            Command::Dial { addr, reply } => {
                if let Some(peer) = peer_of(&addr) {
                    if peer == self.local() {
                        let _ = reply.send(Err(MeshError::InvalidArgument(
                            "that address is this node's own".into(),
                        )));
                        return;
                    }
                    self.entry(peer, "dial").add_addr(addr.clone());
                    // Connected already on a connection this node dialled: nothing to do. (A
                    // peer that only dialled us gets an outbound connection too: AutoNAT asks
                    // peers for dial-backs over outbound connections only.)
                    if self
                        .conns
                        .values()
                        .any(|c| c.peer == peer && c.dialer && !c.relayed)
                        || (self.swarm.is_connected(&peer) && crate::reach::is_circuit(&addr))
                    {
                        let _ = reply.send(Ok(peer));
                        return;
                    }
                }
                let opts = match peer_of(&addr) {
                    Some(peer) => DialOpts::peer_id(peer)
                        .addresses(vec![strip_p2p(addr.clone())])
                        .condition(PeerCondition::Always)
                        .build(),
                    None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dial.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(MeshError::Unavailable(format!(
                            "cannot dial {addr}: {e}"
                        ))));
                    }
                }
            }
            Command::Disconnect { peer, reply } => {
                // Disconnected on purpose: no redial for a while.
                self.peers.hold_off(&peer, Instant::now());
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
            Command::Provide { schemas, reply } => {
                let want: BTreeSet<String> = schemas.into_iter().collect();
                for gone in self.provided.difference(&want) {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .stop_providing(&schema_key(gone));
                }
                self.provided = want;
                self.reprovide();
                let _ = reply.send(self.provided.iter().cloned().collect());
            }
            Command::FindProviders { schema, reply } => {
                let mut found = HashSet::new();
                if self.provided.contains(&schema) {
                    found.insert(self.local());
                }
                // With no other node to ask, "none found" would be a guess: say so instead.
                let known: usize = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .map(|b| b.num_entries())
                    .sum();
                if known == 0 {
                    let _ = reply.send(if found.is_empty() {
                        Err(MeshError::Unavailable(format!(
                            "cannot look up providers of '{schema}': this node knows no other node to ask (dial one or add a bootstrap peer)"
                        )))
                    } else {
                        Ok((found.into_iter().collect(), 0))
                    });
                    return;
                }
                let q = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(schema_key(&schema));
                self.pending_providers.insert(q, (schema, found, reply));
            }
            Command::SavePeers { reply } => {
                let _ = reply.send(self.save_peers());
            }
            Command::UpgradeDue { peer } => {
                if let Some(u) = self.upgrading.get(&peer) {
                    for id in u.relayed.clone() {
                        self.swarm.close_connection(id);
                    }
                }
            }
            Command::RespondSchema { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .schema
                    .send_response(channel, *response)
                    .is_err()
                {
                    tracing::debug!("peer went away before the schema answer was sent");
                }
            }
        }
    }

    fn reprovide(&mut self) {
        for name in self.provided.clone() {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(schema_key(&name))
            {
                tracing::warn!(schema = %name, error = %e, "cannot announce schema");
            }
        }
    }

    fn send_now(&mut self, peer: PeerId, o: Outbound) {
        match o {
            Outbound::Forward(req, reply) => self.forward.send(peer, *req, reply),
            Outbound::Schema(req, reply) => {
                let id = self.swarm.behaviour_mut().schema.send_request(&peer, req);
                self.pending_schema.insert(id, (peer, reply));
            }
        }
    }

    /// Send on the existing connection, or connect first: known addresses, then the DHT.
    fn send_or_connect(&mut self, peer: PeerId, o: Outbound) {
        if peer == self.local() {
            o.fail(MeshError::InvalidArgument(
                "that is this node's own id; run the request locally".into(),
            ));
            return;
        }
        if let Some(u) = self.upgrading.get_mut(&peer) {
            if u.held.len() >= MAX_HELD {
                o.fail(MeshError::Unavailable(format!(
                    "{MAX_HELD} requests are already waiting for the connection to node {peer} to move off its relay; retry"
                )));
            } else {
                u.held.push(o);
            }
            return;
        }
        if self.swarm.is_connected(&peer) {
            self.send_now(peer, o);
            return;
        }
        if let Some(waiting) = self.waiting_connect.get_mut(&peer) {
            waiting.push(o);
            return;
        }
        let addrs = self
            .peers
            .get(&peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default();
        self.waiting_connect.insert(peer, vec![o]);
        if addrs.is_empty() {
            let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
            self.pending_lookup.insert(q, peer);
        } else {
            self.dial_known(peer, addrs);
        }
    }

    fn dial_known(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial not started");
            if !matches!(e, libp2p::swarm::DialError::DialPeerConditionFalse(_)) {
                self.fail_waiting(
                    peer,
                    MeshError::Unavailable(format!("cannot reach node {peer}: {e}")),
                );
            }
        }
    }

    fn fail_waiting(&mut self, peer: PeerId, e: MeshError) {
        self.relookup.remove(&peer);
        self.relay_tried.remove(&peer);
        if let Some(list) = self.waiting_connect.remove(&peer) {
            for o in list {
                o.fail(e.clone());
            }
        }
    }

    // ---- reachability --------------------------------------------------------------------------

    /// Open or close relay reservations (listeners on `<relay>/p2p-circuit`) as the AutoNAT
    /// verdict and the known relays call for.
    fn plan_relays(&mut self) {
        let not_reachable = self.autonat.verdict() == fold_proto::v1::Reachability::NotReachable;
        let now = Instant::now();
        for action in self.relays.plan(not_reachable, now) {
            match action {
                RelayAction::Listen(addr) => {
                    tracing::info!(%addr, "asking the relay for a reservation");
                    let r = self
                        .swarm
                        .listen_on(addr.clone())
                        .map_err(|e| e.to_string());
                    self.relays.listening(&addr, r, now);
                }
                RelayAction::StopListening(id) => {
                    self.swarm.remove_listener(id);
                }
            }
        }
    }

    /// A peer advertised the relay hop protocol: a relay this node may reserve on.
    fn relay_candidate(&mut self, peer: PeerId, listen_addrs: &[Multiaddr]) {
        // A direct address the peer book holds for it, else the first it reported.
        let addr = self
            .peers
            .get(&peer)
            .and_then(|e| {
                e.addrs
                    .iter()
                    .find(|a| !crate::reach::is_circuit(a))
                    .cloned()
            })
            .or_else(|| {
                listen_addrs
                    .iter()
                    .find(|a| !crate::reach::is_circuit(a))
                    .cloned()
            });
        let Some(addr) = addr else {
            return;
        };
        let source = if self.bootstrap_indexes(&peer).is_empty()
            && !self.anon_bootstrap.iter().any(|b| b.peer == Some(peer))
        {
            Source::Identify
        } else {
            Source::Bootstrap
        };
        self.relays.candidate(peer, addr, source);
        self.plan_relays();
    }

    /// The peer book's per-peer connection kind: direct when any direct connection is open.
    fn update_connection_kind(&mut self, peer: PeerId) {
        let mut relayed = None;
        let mut direct = None;
        for c in self.conns.values().filter(|c| c.peer == peer) {
            if c.relayed {
                relayed = Some(c.transport);
            } else {
                direct = Some(c.transport);
            }
        }
        if let Some(e) = self.peers.get_mut(&peer) {
            match (direct, relayed) {
                (Some(t), _) => {
                    e.connection = "direct";
                    e.transport = t;
                }
                (None, Some(t)) => {
                    e.connection = "relayed";
                    e.transport = t;
                }
                (None, None) => {}
            }
        }
    }

    /// A direct connection to `peer` is up: its relayed connections (hole punching succeeded,
    /// or the peer dialled directly) are closed, so traffic leaves the relay.
    fn close_relayed(&mut self, peer: PeerId) {
        let relayed: Vec<ConnectionId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer == peer && c.relayed)
            .map(|(id, _)| *id)
            .collect();
        if relayed.is_empty() {
            return;
        }
        tracing::info!(%peer, "direct connection up; closing the relayed one");
        // The stream on the relayed connection is retired: it answers what is in flight, and
        // requests made meanwhile wait for the relayed connection to close, then go direct.
        self.forward.disconnected(&peer);
        let fresh = !self.upgrading.contains_key(&peer);
        let u = self.upgrading.entry(peer).or_insert_with(|| Upgrade {
            relayed: Vec::new(),
            held: Vec::new(),
        });
        for id in relayed {
            if !u.relayed.contains(&id) {
                u.relayed.push(id);
            }
        }
        if fresh {
            let tx = self.self_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(UPGRADE_GRACE).await;
                let _ = tx.send(Command::UpgradeDue { peer }).await;
            });
        }
    }

    // ---- swarm events ------------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr {
                address,
                listener_id,
            } => {
                tracing::info!(%address, "listening");
                self.relays.new_listen_addr(listener_id, &address);
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                for a in &addresses {
                    self.listen_addrs.retain(|l| l != a);
                }
                let error = reason.err().map(|e| e.to_string());
                if !self
                    .relays
                    .listener_closed(listener_id, error.clone(), Instant::now())
                    && let Some(e) = error
                {
                    tracing::warn!(error = %e, "a listener closed");
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let dialed = endpoint.is_dialer();
                let remote = endpoint.get_remote_address().clone();
                let source = if dialed { "dial" } else { "inbound" };
                let (connection, transport) = crate::peer_book::endpoint_kind(&endpoint);
                let relayed = connection == "relayed";
                self.conns.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        relayed,
                        dialer: dialed,
                        new_port: matches!(
                            endpoint,
                            libp2p::core::ConnectedPoint::Dialer {
                                port_use: libp2p::core::transport::PortUse::New,
                                ..
                            }
                        ),
                        transport,
                    },
                );
                let e = self.entry(peer_id, source);
                e.connections = num_established.get();
                if !relayed {
                    tracing::debug!(peer = %peer_id, %transport, "direct connection");
                }
                if dialed {
                    e.add_addr(remote.clone());
                }
                self.update_connection_kind(peer_id);
                if !relayed {
                    self.close_relayed(peer_id);
                }
                self.peers
                    .connected(&peer_id, dialed.then_some(&remote), Instant::now());
                if let Some(i) = self.anon_dials.remove(&connection_id)
                    && let Some(b) = self.anon_bootstrap.get_mut(i)
                {
                    b.peer = Some(peer_id);
                    b.failures = 0;
                    b.next_dial = None;
                }
                if let Some(reply) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                if let Some(i) = self.bootstrap_dials.remove(&connection_id) {
                    self.bootstrap_outcome(i, Ok(peer_id));
                }
                for j in self.bootstrap_indexes(&peer_id) {
                    self.bootstrap_outcome(j, Ok(peer_id));
                }
                if dialed {
                    // A dialed address is a listen address of the peer: good for the DHT.
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, strip_p2p(remote.clone()));
                }
                self.relookup.remove(&peer_id);
                self.relay_tried.remove(&peer_id);
                if let Some(list) = self.waiting_connect.remove(&peer_id) {
                    for o in list {
                        self.send_now(peer_id, o);
                    }
                }
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, addr = %remote, "connected");
                    self.emit(Kind::Connected, peer_id, vec![remote.to_string()]);
                }
                if !self.kad_bootstrapped {
                    self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                let was_relayed = self.conns.remove(&connection_id).is_some_and(|c| c.relayed);
                if let Some(e) = self.peers.get_mut(&peer_id) {
                    e.connections = num_established;
                }
                self.update_connection_kind(peer_id);
                if was_relayed && num_established > 0 {
                    // The forward stream may have run on the relayed connection: the next
                    // request opens one on the connection that is left.
                    self.forward.disconnected(&peer_id);
                }
                let upgraded = self.upgrading.get_mut(&peer_id).is_some_and(|u| {
                    u.relayed.retain(|c| *c != connection_id);
                    u.relayed.is_empty() || num_established == 0
                });
                if upgraded && let Some(u) = self.upgrading.remove(&peer_id) {
                    for o in u.held {
                        self.send_or_connect(peer_id, o);
                    }
                }
                if num_established == 0 {
                    self.relay_counts.disconnected(&peer_id);
                    self.peers
                        .disconnected(&peer_id, Instant::now(), random_unit());
                    self.forward.disconnected(&peer_id);
                    tracing::info!(peer = %peer_id, "disconnected");
                    self.emit(Kind::Disconnected, peer_id, vec![]);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(?peer_id, error = %error, "outgoing connection failed");
                if let Some(i) = self.bootstrap_dials.remove(&connection_id) {
                    if matches!(error, DialError::LocalPeerId { .. }) {
                        self.bootstrap_self(i);
                    } else {
                        self.bootstrap_outcome(i, Err(error.to_string()));
                    }
                }
                if let Some(p) = peer_id
                    && !self.swarm.is_connected(&p)
                {
                    for j in self.bootstrap_indexes(&p) {
                        self.bootstrap_outcome(j, Err(error.to_string()));
                    }
                }
                self.dial_failed(connection_id, peer_id, &error);
                if let Some(reply) = self.pending_dial.remove(&connection_id) {
                    let _ =
                        reply.send(Err(MeshError::Unavailable(format!("dial failed: {error}"))));
                }
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                    && self.waiting_connect.contains_key(&peer)
                    && self.relookup.insert(peer)
                {
                    // The addresses known here failed: ask the DHT once for fresh ones (e.g. the
                    // relayed address of a node that just reserved a slot on a relay).
                    tracing::debug!(%peer, "known addresses failed; looking the node up in the DHT");
                    let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.pending_lookup.insert(q, peer);
                } else if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                    && self.waiting_connect.contains_key(&peer)
                    && !self.relays.circuit_routes().is_empty()
                    && self.relay_tried.insert(peer)
                {
                    // Neither the known nor the DHT's addresses worked: try through the relays
                    // this node reserved on, which the peer may share.
                    let routes = self.relays.circuit_routes();
                    tracing::debug!(%peer, relays = routes.len(), "addresses failed; trying through this node's relays");
                    self.dial_known(peer, routes);
                } else if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.fail_waiting(
                        peer,
                        MeshError::Unavailable(format!("cannot reach node {peer}: {error}")),
                    );
                }
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour_event(b),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(ev) => {
                self.libp2p_metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
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
            }
            BehaviourEvent::Ping(ev) => {
                self.libp2p_metrics.record(&ev);
                if let ping::Event {
                    peer,
                    result: Ok(rtt),
                    ..
                } = ev
                    && let Some(e) = self.peers.get_mut(&peer)
                {
                    e.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    if peer == self.local() {
                        continue;
                    }
                    let is_new = !self.peers.contains_key(&peer);
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
                        let opts = DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, addr) in list {
                    if let Some(e) = self.peers.get_mut(&peer) {
                        e.addrs.retain(|a| a != &addr);
                    }
                    self.emit(Kind::Expired, peer, vec![addr.to_string()]);
                }
            }
            BehaviourEvent::Kad(ev) => {
                self.libp2p_metrics.record(&ev);
                self.on_kad_event(ev);
            }
            BehaviourEvent::Stream(()) => {}
            BehaviourEvent::RelayClient(ev) => match ev {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                } => {
                    if !renewal {
                        tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                    }
                    self.relays.reserved(&relay_peer_id);
                }
                relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                    tracing::debug!(relay = %relay_peer_id, "outbound circuit established");
                }
                relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                    tracing::debug!(peer = %src_peer_id, "inbound circuit established");
                }
            },
            BehaviourEvent::RelayServer(ev) => {
                self.libp2p_metrics.record(&ev);
                tracing::debug!(?ev, "relay service");
                let max = usize::try_from(self.relay_server.max_reservations).unwrap_or(usize::MAX);
                self.relay_counts.on_event(&ev, max);
            }
            BehaviourEvent::Dcutr(ev) => {
                self.libp2p_metrics.record(&ev);
                let dcutr::Event {
                    remote_peer_id,
                    result,
                } = ev;
                match result {
                    Ok(_) => {
                        tracing::info!(peer = %remote_peer_id, "hole punching succeeded: direct connection")
                    }
                    Err(e) => {
                        tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                    }
                }
            }
            BehaviourEvent::Autonat(ev) => {
                let autonat::v2::client::Event {
                    tested_addr,
                    server,
                    result,
                    ..
                } = ev;
                let before = self.autonat.verdict();
                match &result {
                    Ok(()) => {
                        tracing::info!(addr = %tested_addr, %server, "AutoNAT: reachable on this address")
                    }
                    Err(e) => {
                        tracing::info!(addr = %tested_addr, %server, error = %e, "AutoNAT: not reachable on this address")
                    }
                }
                self.autonat.tested(tested_addr, result.is_ok());
                if self.autonat.verdict() != before {
                    tracing::info!(reachability = ?self.autonat.verdict(), "AutoNAT verdict changed");
                    self.plan_relays();
                }
            }
            BehaviourEvent::AutonatServer(ev) => {
                tracing::debug!(client = %ev.client, addr = %ev.tested_addr, ok = ev.result.is_ok(), "AutoNAT dial-back for a peer");
                // The dial-back connection has done its job: close it rather than keep it until
                // the idle timeout (it counts against the per-peer connection limit).
                let done: Vec<ConnectionId> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.peer == ev.client && c.new_port)
                    .map(|(id, _)| *id)
                    .collect();
                for id in done {
                    self.swarm.close_connection(id);
                }
            }
            BehaviourEvent::Schema(ev) => self.on_schema_event(ev),
            BehaviourEvent::Limits(_)
            | BehaviourEvent::Memory(_)
            | BehaviourEvent::Deny(_)
            | BehaviourEvent::Allow(_) => {}
        }
    }

    fn on_kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } => {
                let e = self.entry(peer, "dht");
                for a in addresses.iter() {
                    e.add_addr(a.clone());
                }
                if !self.provided.is_empty() {
                    self.reprovide_due = true;
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                kad::QueryResult::GetProviders(r) => {
                    let (done, failure) = match r {
                        Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                            if let Some((_, found, _)) = self.pending_providers.get_mut(&id) {
                                found.extend(providers);
                            }
                            (step.last, None)
                        }
                        Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {
                            (true, None)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "provider lookup ended");
                            (true, Some(e))
                        }
                    };
                    if done && let Some((schema, found, reply)) = self.pending_providers.remove(&id)
                    {
                        let mut v: Vec<PeerId> = found.into_iter().collect();
                        v.sort();
                        tracing::debug!(%schema, providers = v.len(), "provider lookup finished");
                        // A lookup that failed before finding anyone is an error, not "none".
                        let answer = match failure {
                            Some(e) if v.is_empty() => Err(MeshError::DeadlineExceeded(format!(
                                "the provider lookup for '{schema}' failed: {e}"
                            ))),
                            _ => Ok((v, stats.num_requests())),
                        };
                        let _ = reply.send(answer);
                    }
                }
                kad::QueryResult::GetClosestPeers(r) => {
                    let peers = match r {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    for p in peers {
                        if p.peer_id == self.local() {
                            continue;
                        }
                        let e = self.entry(p.peer_id, "dht");
                        for a in p.addrs {
                            e.add_addr(a);
                        }
                    }
                    if step.last
                        && let Some(target) = self.pending_lookup.remove(&id)
                    {
                        let addrs = self
                            .peers
                            .get(&target)
                            .map(|e| e.addrs.clone())
                            .unwrap_or_default();
                        if self.swarm.is_connected(&target) {
                            if let Some(list) = self.waiting_connect.remove(&target) {
                                for o in list {
                                    self.send_now(target, o);
                                }
                            }
                        } else if addrs.is_empty()
                            && self.waiting_connect.contains_key(&target)
                            && !self.relays.circuit_routes().is_empty()
                            && self.relay_tried.insert(target)
                        {
                            // Unknown to the DHT (yet): try the relays this node reserved on,
                            // which the node may share.
                            let routes = self.relays.circuit_routes();
                            tracing::debug!(peer = %target, relays = routes.len(), "no address in the DHT; trying through this node's relays");
                            self.dial_known(target, routes);
                        } else if addrs.is_empty() {
                            self.fail_waiting(
                                target,
                                MeshError::NotFound(format!(
                                    "node {target} is unknown: no address for it here or in the DHT (dial it or add a bootstrap peer)"
                                )),
                            );
                        } else {
                            self.dial_known(target, addrs);
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_schema_event(
        &mut self,
        ev: request_response::Event<CheckSchemasRequest, CheckSchemasResponse>,
    ) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.inbound_schema(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((_, reply)) = self.pending_schema.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.pending_schema.remove(&request_id) {
                    let _ = reply.send(Err(outbound_error(&peer, &error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound schema check failed");
                self.metrics.inbound("schema", "failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    // ---- inbound requests --------------------------------------------------------------------

    fn inbound_schema(
        &mut self,
        peer: PeerId,
        request: CheckSchemasRequest,
        channel: ResponseChannel<CheckSchemasResponse>,
    ) {
        let refuse = |e: WireError| CheckSchemasResponse {
            result: Some(check_schemas_response::Result::Error(e)),
        };
        if let Some(l) = &self.limiter
            && let Err(e) = l.check(&peer.to_string())
        {
            self.metrics.inbound("schema", "rate_limited");
            let _ = self.swarm.behaviour_mut().schema.send_response(
                channel,
                refuse(wire_error(Code::ResourceExhausted, e.to_string())),
            );
            return;
        }
        let Ok(permit) = self.schema_slots.clone().try_acquire_owned() else {
            self.metrics.inbound("schema", "queue_full");
            let _ = self.swarm.behaviour_mut().schema.send_response(
                channel,
                refuse(wire_error(
                    Code::Unavailable,
                    "node is busy: inbound queue full; retry",
                )),
            );
            return;
        };
        self.metrics.inbound("schema", "accepted");
        let node = self.node.clone();
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            let response = match node.served_schemas(peer.to_string(), request.names).await {
                Ok(names) => CheckSchemasResponse {
                    result: Some(check_schemas_response::Result::Approved(SchemaNames {
                        names,
                    })),
                },
                Err(s) => refuse(fold_proto::status::to_wire(&s)),
            };
            let _ = tx
                .send(Command::RespondSchema {
                    channel,
                    response: Box::new(response),
                })
                .await;
            drop(permit);
        });
    }
}
