//! The one task that owns the `Swarm`: it selects on swarm events, commands from
//! [`crate::client::Client`]s and a 1 s tick, and dispatches each to a short handler. Policy
//! lives in plain state machines the handlers call ([`crate::bootstrap`], [`crate::connect`],
//! [`crate::conns`], [`crate::upgrade`], [`crate::reach`], [`crate::peer_book`]); answers go back
//! on oneshots keyed by request or query id. Forwarded requests travel on long-lived streams
//! handled off this task ([`crate::forward`]); this loop only makes sure a connection exists
//! before it hands a request to its peer's stream. Inbound schema checks pass the gate here and
//! are answered by the node off this task ([`crate::schema_check`]); the peer book file is
//! written off it too ([`crate::book_file`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_proto::sidecar::{PeerEvent, peer_event::Kind};
use fold_proto::wire::{
    CheckSchemasRequest, CheckSchemasResponse, ForwardResponse, SignedEnvelope,
};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::{Metrics, Recorder};
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, ping, relay};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use crate::book_file::BookWriter;
use crate::bootstrap::{Bootstrap, DialFailure as BootstrapDialFailure};
use crate::command::{Command, MeshError};
use crate::connect::{Connecting, Next};
use crate::conns::{AfterPing, Conn, Conns, Ping, PingPolicy};
use crate::forward::Outbound as ForwardStreams;
use crate::metrics::SidecarMetrics;
use crate::node_link::NodeHandler;
use crate::peer_book::{
    MAX_REDIALS_PER_TICK, PeerBook, SavedBook, peer_of, random_unit, strip_p2p,
};
use crate::reach::{AutoNat, HOP_PROTOCOL, RelayAction, RelayServer, Relays, Source};
use crate::schema_check::{answer as answer_schema_check, outbound_error, refusal};
use crate::status::NetworkSnapshot;
use crate::upgrade::{Hold, UPGRADE_GRACE, Upgrades};

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

pub struct EventLoopParts {
    pub swarm: Swarm<Behaviour>,
    pub commands: mpsc::Receiver<Command>,
    pub self_tx: mpsc::Sender<Command>,
    pub events: broadcast::Sender<PeerEvent>,
    pub node: Arc<dyn NodeHandler>,
    pub mdns_enabled: bool,
    pub bootstrap: Vec<Multiaddr>,
    /// The inbound gate schema checks pass, as forwards do (rate limit, denial, slots).
    pub gate: Arc<crate::gate::InboundGate>,
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
    /// When a connection whose pings fail is closed.
    pub ping: PingPolicy,
}

/// The peers file is written at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_secs(5);

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
    /// The configured bootstrap addresses (crate::bootstrap).
    bootstrap: Bootstrap,
    gate: Arc<crate::gate::InboundGate>,
    forward: Arc<ForwardStreams>,
    libp2p_metrics: Metrics,
    metrics: Arc<SidecarMetrics>,

    peers: PeerBook,
    listen_addrs: Vec<Multiaddr>,
    pending_dial: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, MeshError>>>,
    /// Requests held until their peer connects (crate::connect).
    connecting: Connecting<Outbound>,
    pending_schema: HashMap<OutboundRequestId, PendingSchema>,
    pending_providers: HashMap<kad::QueryId, ProviderQuery>,
    provided: BTreeSet<String>,
    reprovide_due: bool,
    kad_bootstrapped: bool,
    /// The peer book file, until [`EventLoop::run`] starts its writer.
    peers_path: Option<PathBuf>,
    /// Writes the peer book file off this task (crate::book_file).
    writer: Option<BookWriter>,
    /// The book as last handed to the writer (or read from the file).
    saved: Option<SavedBook>,
    last_save: Option<Instant>,
    autonat: AutoNat,
    relays: Relays,
    relay_server: fold_proto::v1::RelayServerStatus,
    relay_counts: RelayServer,
    /// Every open connection (crate::conns).
    conns: Conns,
    /// Peers whose relayed connections are being replaced by a direct one (crate::upgrade).
    upgrading: Upgrades<Outbound>,
}

impl EventLoop {
    pub fn new(p: EventLoopParts) -> EventLoop {
        let local = *p.swarm.local_peer_id();
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
            peers: PeerBook::default(),
            listen_addrs: Vec::new(),
            pending_dial: HashMap::new(),
            connecting: Connecting::default(),
            pending_schema: HashMap::new(),
            pending_providers: HashMap::new(),
            provided: BTreeSet::new(),
            reprovide_due: false,
            kad_bootstrapped: false,
            bootstrap: Bootstrap::new(p.bootstrap, local),
            peers_path: p.peers_path,
            writer: None,
            saved: None,
            last_save: None,
            autonat: AutoNat::default(),
            relays: p.relays,
            relay_server: p.relay_server,
            relay_counts: RelayServer::default(),
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
            el.peers.set_trusted(peer);
        }
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

    /// Hand the book to the file's writer if the known peers changed since it was last handed
    /// over (or a write failed).
    fn save_peers(&mut self) {
        let Some(writer) = &self.writer else {
            return;
        };
        if writer.take_failed() {
            self.saved = None;
        }
        let now = self.peers.saved(&self.local());
        if self.saved.as_ref() == Some(&now) {
            return;
        }
        self.last_save = Some(Instant::now());
        if writer.offer(now.clone()) {
            self.saved = Some(now);
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

    /// Put the configured bootstrap peers in the book (redialled, never forgotten) and the DHT.
    fn add_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.named() {
            self.peers.add_bootstrap(peer, addr.clone());
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, strip_p2p(addr));
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
        // Once a redial of the peer's known addresses failed, the bootstrap address is dialled
        // again too: behind a name, the peer may have come back at a new address.
        let due = self.bootstrap.due(now, |p| {
            self.swarm.is_connected(p)
                || self
                    .peers
                    .get(p)
                    .is_some_and(|e| !e.addrs.is_empty() && e.dial_failures == 0)
        });
        for (i, addr) in due {
            // Its outcome is also what Network.Status reports for this bootstrap address.
            let opts = DialOpts::unknown_peer_id().address(addr).build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => self.bootstrap.dialing(i, id),
                Err(e) => self.bootstrap.not_started(i, &e.to_string()),
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
        self.bootstrap.dial_failed(
            BootstrapDialFailure {
                id: connection_id,
                peer,
                peer_connected: peer.is_some_and(|p| self.swarm.is_connected(&p)),
                self_dial: matches!(error, DialError::LocalPeerId { .. }),
                error: &error.to_string(),
            },
            now,
            random_unit(),
        );
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
        if let Some(path) = self.peers_path.take() {
            let written = self.saved.clone().unwrap_or_default();
            self.writer = Some(BookWriter::spawn(path, written));
        }
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
                    self.close_silent_connections(Instant::now());
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
        if let Some(writer) = &self.writer {
            writer.flush(self.peers.saved(&self.local())).await;
        }
        tracing::info!("swarm event loop stopped");
    }

    // ---- commands ----------------------------------------------------------------------------

    /// The swarm's state for `Mesh.Status` (the reply is built from it in the gRPC layer).
    fn snapshot(&self) -> NetworkSnapshot {
        NetworkSnapshot {
            node_id: self.local(),
            listen_addrs: self.listen_addrs.clone(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            connected_peers: self.swarm.connected_peers().count(),
            known_peers: self.peers.len(),
            mdns_enabled: self.mdns_enabled,
            provided_schemas: self.provided.iter().cloned().collect(),
            bootstrap: self.bootstrap.status(),
            reachability: self.autonat.verdict(),
            reachable_addrs: self.autonat.reachable_addrs(),
            relays: self.relays.status(),
            relay_server: self.relay_server,
            relay_reservations: self.relay_counts.reservations(),
            relay_circuits: self.relay_counts.circuits,
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
                let peers = self.peers.infos(include_disconnected, &self.local());
                let _ = reply.send(peers);
            }
            Command::Dial { addr, reply } => self.dial(addr, reply),
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
            Command::Provide { schemas, reply } => self.provide(schemas, reply),
            Command::FindProviders { schema, reply } => self.find_providers(schema, reply),
            Command::SavePeers { reply } => self.save_peers_now(reply),
            Command::UpgradeDue { peer } => {
                for id in self.upgrading.due(&peer) {
                    self.swarm.close_connection(id);
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

    /// [`Command::Dial`]: answered once the connection is up (or at once when one this node
    /// dialled is up already).
    fn dial(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, MeshError>>) {
        if let Some(peer) = peer_of(&addr) {
            if peer == self.local() {
                let _ = reply.send(Err(MeshError::InvalidArgument(
                    "that address is this node's own".into(),
                )));
                return;
            }
            self.entry(peer, "dial").add_addr(addr.clone());
            // Connected already on a connection this node dialled: nothing to do. (A peer that
            // only dialled us gets an outbound connection too: AutoNAT asks peers for
            // dial-backs over outbound connections only.)
            if self.conns.dialled_direct(&peer)
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

    /// [`Command::Provide`]: announce exactly these schemas in the DHT.
    fn provide(&mut self, schemas: Vec<String>, reply: oneshot::Sender<Vec<String>>) {
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

    /// [`Command::FindProviders`]: a DHT provider lookup, answered in
    /// [`EventLoop::on_providers_found`].
    fn find_providers(
        &mut self,
        schema: String,
        reply: oneshot::Sender<Result<(Vec<PeerId>, u32), MeshError>>,
    ) {
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

    /// [`Command::SavePeers`]: write the peer book file now; `reply` is told whether it is on
    /// disk.
    fn save_peers_now(&mut self, reply: oneshot::Sender<bool>) {
        match &self.writer {
            Some(writer) => {
                let book = self.peers.saved(&self.local());
                self.saved = Some(book.clone());
                writer.save(book, reply);
            }
            None => {
                let _ = reply.send(true);
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
        let o = match self.upgrading.hold(peer, o) {
            Hold::NotUpgrading(o) => o,
            Hold::Held => return,
            Hold::Full(o, e) => return o.fail(e),
        };
        if self.swarm.is_connected(&peer) {
            self.send_now(peer, o);
            return;
        }
        let known = self.known_addrs(&peer);
        if let Some(next) = self.connecting.hold(peer, o, known) {
            self.connect_step(peer, next);
        }
    }

    fn known_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.peers
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }

    /// Carry out the next step of connecting to a peer with requests held.
    fn connect_step(&mut self, peer: PeerId, next: Next<Outbound>) {
        match next {
            Next::LookUp => {
                let q = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.connecting.looking_up(q, peer);
            }
            Next::Dial(addrs) => self.dial_known(peer, addrs),
            Next::Send(list) => {
                for o in list {
                    self.send_now(peer, o);
                }
            }
            Next::Fail(list, e) => {
                for o in list {
                    o.fail(e.clone());
                }
            }
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
                let e = MeshError::Unavailable(format!("cannot reach node {peer}: {e}"));
                for o in self.connecting.give_up(&peer) {
                    o.fail(e.clone());
                }
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
        let source = if self.bootstrap.is_bootstrap(&peer) {
            Source::Bootstrap
        } else {
            Source::Identify
        };
        self.relays.candidate(peer, addr, source);
        self.plan_relays();
    }

    /// The peer book's per-peer connection kind: direct when any direct connection is open.
    fn update_connection_kind(&mut self, peer: PeerId) {
        if let Some((connection, transport)) = self.conns.kind(&peer)
            && let Some(e) = self.peers.get_mut(&peer)
        {
            e.connection = connection;
            e.transport = transport;
        }
    }

    /// A direct connection to `peer` is up: its relayed connections (hole punching succeeded,
    /// or the peer dialled directly) are closed, so traffic leaves the relay.
    fn close_relayed(&mut self, peer: PeerId) {
        let relayed = self.conns.relayed(&peer);
        if relayed.is_empty() {
            return;
        }
        tracing::info!(%peer, "direct connection up; closing the relayed one");
        // The stream on the relayed connection is retired: it answers what is in flight, and
        // requests made meanwhile wait for the relayed connection to close, then go direct.
        self.forward.disconnected(&peer);
        if self.upgrading.start(peer, relayed) {
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
            } => self.on_new_listen_addr(listener_id, address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => self.on_listener_closed(listener_id, &addresses, reason.err()),
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

    fn on_new_listen_addr(&mut self, listener_id: ListenerId, address: Multiaddr) {
        tracing::info!(%address, "listening");
        self.relays.new_listen_addr(listener_id, &address);
        if !self.listen_addrs.contains(&address) {
            self.listen_addrs.push(address);
        }
    }

    fn on_listener_closed(
        &mut self,
        listener_id: ListenerId,
        addresses: &[Multiaddr],
        error: Option<std::io::Error>,
    ) {
        for a in addresses {
            self.listen_addrs.retain(|l| l != a);
        }
        let error = error.map(|e| e.to_string());
        if !self
            .relays
            .listener_closed(listener_id, error.clone(), Instant::now())
            && let Some(e) = error
        {
            tracing::warn!(error = %e, "a listener closed");
        }
    }

    fn on_connection_established(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) {
        let dialed = endpoint.is_dialer();
        let remote = endpoint.get_remote_address().clone();
        let relayed = self.record_connection(peer_id, connection_id, endpoint, num_established);
        if !relayed {
            self.close_relayed(peer_id);
        }
        self.peers
            .connected(&peer_id, dialed.then_some(&remote), Instant::now());
        self.bootstrap.connected(connection_id, peer_id);
        if let Some(reply) = self.pending_dial.remove(&connection_id) {
            let _ = reply.send(Ok(peer_id));
        }
        if dialed {
            // A dialed address is a listen address of the peer: good for the DHT.
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer_id, strip_p2p(remote.clone()));
        }
        for o in self.connecting.connected(&peer_id) {
            self.send_now(peer_id, o);
        }
        if num_established == 1 {
            self.metrics.connected_peers(self.peers.connected_count());
            tracing::info!(peer = %peer_id, addr = %remote, "connected");
            self.emit(Kind::Connected, peer_id, vec![remote.to_string()]);
        }
        if !self.kad_bootstrapped {
            self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
        }
    }

    /// Add a new connection to the table and the peer book; returns whether it is relayed.
    fn record_connection(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) -> bool {
        let dialed = endpoint.is_dialer();
        let remote = endpoint.get_remote_address().clone();
        let source = if dialed { "dial" } else { "inbound" };
        let (connection, transport) = crate::peer_book::endpoint_kind(endpoint);
        let relayed = connection == "relayed";
        self.conns.insert(
            connection_id,
            Conn {
                new_port: matches!(
                    endpoint,
                    ConnectedPoint::Dialer {
                        port_use: libp2p::core::transport::PortUse::New,
                        ..
                    }
                ),
                loopback: crate::peer_book::is_loopback_remote(&remote),
                ..Conn::new(peer_id, relayed, dialed, transport)
            },
        );
        let e = self.entry(peer_id, source);
        e.connections = num_established;
        if !relayed {
            tracing::debug!(peer = %peer_id, %transport, "direct connection");
        }
        if dialed {
            e.add_addr(remote);
        }
        self.update_connection_kind(peer_id);
        relayed
    }

    fn on_connection_closed(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        num_established: u32,
        cause: Option<String>,
    ) {
        let closed = self.conns.remove(&connection_id);
        let was_relayed = closed.as_ref().is_some_and(|c| c.relayed);
        if let Some(e) = self.peers.get_mut(&peer_id) {
            e.connections = num_established;
        }
        self.update_connection_kind(peer_id);
        if was_relayed && num_established > 0 {
            // The forward stream may have run on the relayed connection: the next
            // request opens one on the connection that is left.
            self.forward.disconnected(&peer_id);
        }
        for o in self
            .upgrading
            .closed(&peer_id, connection_id, num_established)
        {
            self.send_or_connect(peer_id, o);
        }
        if num_established == 0 {
            let why = match (&closed, cause) {
                (Some(c), _) if c.closing => {
                    format!("no ping answered for {} s", c.alive.elapsed().as_secs())
                }
                (_, Some(e)) => e,
                (_, None) => "closed".to_string(),
            };
            self.on_peer_disconnected(peer_id, &why);
        }
    }

    /// The last connection to `peer_id` closed.
    fn on_peer_disconnected(&mut self, peer_id: PeerId, why: &str) {
        self.relay_counts.disconnected(&peer_id);
        self.peers
            .disconnected(&peer_id, Instant::now(), random_unit());
        self.forward.disconnected(&peer_id);
        self.metrics.connected_peers(self.peers.connected_count());
        self.bootstrap.lost(&peer_id, why);
        tracing::info!(peer = %peer_id, reason = %why, "disconnected");
        self.emit(Kind::Disconnected, peer_id, vec![]);
    }

    fn on_outgoing_error(
        &mut self,
        connection_id: ConnectionId,
        peer_id: Option<PeerId>,
        error: &DialError,
    ) {
        tracing::debug!(?peer_id, error = %error, "outgoing connection failed");
        self.dial_failed(connection_id, peer_id, error);
        if let Some(reply) = self.pending_dial.remove(&connection_id) {
            let _ = reply.send(Err(MeshError::Unavailable(format!("dial failed: {error}"))));
        }
        if let Some(peer) = peer_id
            && !self.swarm.is_connected(&peer)
        {
            let relays = self.relays.circuit_routes();
            let next = self
                .connecting
                .dial_failed(peer, relays, &error.to_string());
            self.connect_step(peer, next);
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
            BehaviourEvent::RelayClient(ev) => self.on_relay_client(ev),
            BehaviourEvent::RelayServer(ev) => {
                self.libp2p_metrics.record(&ev);
                tracing::debug!(?ev, "relay service");
                let max = usize::try_from(self.relay_server.max_reservations).unwrap_or(usize::MAX);
                self.relay_counts.on_event(&ev, max);
            }
            BehaviourEvent::Dcutr(ev) => {
                self.libp2p_metrics.record(&ev);
                on_dcutr(ev);
            }
            BehaviourEvent::Autonat(ev) => self.on_autonat(ev),
            BehaviourEvent::AutonatServer(ev) => self.on_autonat_server(ev),
            BehaviourEvent::Schema(ev) => self.on_schema_event(ev),
            BehaviourEvent::Limits(_)
            | BehaviourEvent::Memory(_)
            | BehaviourEvent::Deny(_)
            | BehaviourEvent::Allow(_) => {}
        }
    }

    /// A peer's identify info: its protocols, agent and (learnable) listen addresses go to the
    /// peer book, the addresses to the DHT if it speaks it; a relay is a reservation candidate.
    fn on_identified(&mut self, peer_id: PeerId, mut info: identify::Info) {
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

    fn on_mdns_discovered(&mut self, peer: PeerId, addr: Multiaddr) {
        if peer == self.local() || !self.learnable_from(&peer, &addr) {
            return;
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

    fn on_relay_client(&mut self, ev: relay::client::Event) {
        match ev {
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
        }
    }

    /// An AutoNAT test of one of this node's addresses: a changed verdict replans the relay
    /// reservations.
    fn on_autonat(&mut self, ev: autonat::v2::client::Event) {
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

    /// This node dialled a peer back for its AutoNAT test.
    fn on_autonat_server(&mut self, ev: autonat::v2::server::Event) {
        tracing::debug!(client = %ev.client, addr = %ev.tested_addr, ok = ev.result.is_ok(), "AutoNAT dial-back for a peer");
        // The dial-back connection has done its job: close it rather than keep it until
        // the idle timeout (it counts against the per-peer connection limit).
        for id in self.conns.dial_backs(&ev.client) {
            self.swarm.close_connection(id);
        }
    }

    /// Keep only the addresses `peer` reported that this node may store and dial: no loopback or
    /// link-local ones unless this node reached the peer over loopback itself.
    fn keep_learnable(&self, peer: PeerId, addrs: &mut Vec<Multiaddr>) {
        let before = addrs.len();
        addrs.retain(|a| self.learnable_from(&peer, a));
        if addrs.len() < before {
            tracing::debug!(%peer, dropped = before - addrs.len(), "host-local addresses a remote peer reported are not learned");
        }
    }

    fn learnable_from(&self, peer: &PeerId, a: &Multiaddr) -> bool {
        crate::peer_book::learnable(a, self.conns.over_loopback(peer))
    }

    /// A ping's outcome on one connection: an answer keeps it alive (and is the peer's RTT);
    /// failures in a row close it ([`PingPolicy`]).
    fn on_ping(&mut self, ev: ping::Event) {
        let ping::Event {
            peer,
            connection,
            result,
        } = ev;
        let ping = match result {
            Ok(rtt) => Ping::Answered(rtt),
            Err(ping::Failure::Unsupported) => Ping::Unsupported,
            Err(e) => Ping::Failed(e.to_string()),
        };
        match self.conns.on_ping(connection, &peer, ping) {
            AfterPing::Nothing => {}
            AfterPing::Rtt(rtt) => {
                if let Some(e) = self.peers.get_mut(&peer) {
                    e.rtt = Some(rtt);
                }
            }
            AfterPing::Close => self.close_dead(connection, "pings failed"),
        }
    }

    /// Close the connections that answered no ping for [`PingPolicy::silence_limit`].
    fn close_silent_connections(&mut self, now: Instant) {
        for id in self.conns.silent(now) {
            self.close_dead(id, "no ping answered");
        }
    }

    /// Close a connection its peer stopped answering on: the swarm's close event then shows the
    /// peer disconnected (and redials it, if known).
    fn close_dead(&mut self, id: ConnectionId, why: &'static str) {
        let Some((peer, silent)) = self.conns.closing(id) else {
            return;
        };
        tracing::warn!(%peer, silent_secs = silent.as_secs(), reason = why, "closing a connection that does not answer pings");
        self.metrics.dead_connection();
        self.swarm.close_connection(id);
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
                result: kad::QueryResult::GetProviders(r),
                step,
                stats,
            } => self.on_providers_found(id, r, step.last, stats.num_requests()),
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(r),
                step,
                ..
            } => self.on_closest_peers(id, r, step.last),
            _ => {}
        }
    }

    /// A step of a provider lookup ([`Command::FindProviders`]): answered once it is done.
    fn on_providers_found(
        &mut self,
        id: kad::QueryId,
        r: kad::GetProvidersResult,
        last: bool,
        requests: u32,
    ) {
        let (done, failure) = match r {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                if let Some((_, found, _)) = self.pending_providers.get_mut(&id) {
                    found.extend(providers);
                }
                (last, None)
            }
            Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => (true, None),
            Err(e) => {
                tracing::debug!(error = %e, "provider lookup ended");
                (true, Some(e))
            }
        };
        if done && let Some((schema, found, reply)) = self.pending_providers.remove(&id) {
            let mut v: Vec<PeerId> = found.into_iter().collect();
            v.sort();
            tracing::debug!(%schema, providers = v.len(), "provider lookup finished");
            // A lookup that failed before finding anyone is an error, not "none".
            let answer = match failure {
                Some(e) if v.is_empty() => Err(MeshError::DeadlineExceeded(format!(
                    "the provider lookup for '{schema}' failed: {e}"
                ))),
                _ => Ok((v, requests)),
            };
            let _ = reply.send(answer);
        }
    }

    /// A step of a closest-peers lookup: the peers found go to the peer book; a finished lookup
    /// for a peer with requests held moves its connecting on (crate::connect).
    fn on_closest_peers(&mut self, id: kad::QueryId, r: kad::GetClosestPeersResult, last: bool) {
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
        if last && let Some(target) = self.connecting.lookup_finished(&id) {
            let connected = self.swarm.is_connected(&target);
            let known = self.known_addrs(&target);
            let relays = self.relays.circuit_routes();
            let next = self
                .connecting
                .after_lookup(target, connected, known, relays);
            self.connect_step(target, next);
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
        let slot = match self.gate.admit_schema(&peer) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .schema
                    .send_response(channel, refusal(e));
                return;
            }
        };
        let (node, gate, tx) = (self.node.clone(), self.gate.clone(), self.self_tx.clone());
        answer_schema_check(node, gate, tx, peer, request.names, channel, slot);
    }
}

/// Hole punching's outcome (logged; the direct connection it opens is handled as any other).
fn on_dcutr(ev: dcutr::Event) {
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
