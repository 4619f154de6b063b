//! Command-line flags, each with an environment-variable twin.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use local_link::LinkAddr;

#[derive(Debug, Parser)]
#[command(
    name = "p2p-sidecar",
    version,
    about = "The p2p-sidecar of a foldmesh node: its libp2p mesh (identity, discovery, DHT, encrypted multiplexed connections, request forwarding)",
    long_about = "The p2p-sidecar of a foldmesh node. It owns the node's network identity (a persistent \
Ed25519 key; the node id is its libp2p PeerId) and one libp2p swarm (TCP + Noise + Yamux, QUIC, \
identify, ping, mDNS, Kademlia, and the /fold/schema/1.0.0 and /fold/forward/1.0.0 protocols). It \
serves fold.sidecar.v1.Mesh to its fold-node and hands requests from other nodes to the node's \
fold.sidecar.v1.PeerRequests service. Start it with the same --data-dir as the node; either may start \
first.\n\nWhen ready it prints one line to stdout:\n  \
p2p-sidecar ready node_id=<PeerId> mesh=<addr> listen=<multiaddrs> admin=<addr>\nLogs go to stderr; \
the level comes from RUST_LOG (default: info, with libp2p_kad::behaviour at error). Traces are exported \
over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, whatever RUST_LOG says (the OTEL_* variables \
govern them)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the node identity key.
    Identity {
        #[command(subcommand)]
        action: IdentityAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityAction {
    /// Print the node id (PeerId) of the identity key (--identity-key, or the one in --data-dir).
    Show,
    /// Write a new identity key (mode 0600) to a file that does not exist yet, and print its id.
    Generate {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MdnsMode {
    /// On when some --listen address is not loopback.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Parser)]
pub struct Config {
    /// Directory for the identity key and the local sockets; shared with the node.
    #[arg(long, env = "FOLD_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// The identity key file (a protobuf-encoded libp2p keypair, e.g. a mounted secret). Default:
    /// <data-dir>/identity.key, created on first start with mode 0600.
    #[arg(long, env = "FOLD_SIDECAR_IDENTITY_KEY", global = true)]
    pub identity_key: Option<PathBuf>,

    /// libp2p listen addresses (repeatable; the env variable takes a comma-separated list).
    #[arg(
        long = "listen",
        env = "FOLD_SIDECAR_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/127.0.0.1/tcp/4001,/ip4/127.0.0.1/udp/4001/quic-v1"
    )]
    pub listen: Vec<Multiaddr>,

    /// Addresses to announce to peers besides the listen addresses (e.g. a public address).
    #[arg(
        long = "external-address",
        env = "FOLD_SIDECAR_EXTERNAL_ADDRESS",
        value_delimiter = ','
    )]
    pub external_address: Vec<Multiaddr>,

    /// Bootstrap peers (repeatable, comma-separated in the env variable), e.g.
    /// /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo... or /dns4/node-b/tcp/4001 (the id is then learned).
    #[arg(
        long = "bootstrap",
        env = "FOLD_SIDECAR_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<Multiaddr>,

    /// mDNS discovery on the local network.
    #[arg(long, env = "FOLD_SIDECAR_MDNS", value_enum, default_value = "auto")]
    pub mdns: MdnsMode,

    /// How often mDNS asks the network, in seconds.
    #[arg(
        long,
        env = "FOLD_SIDECAR_MDNS_QUERY_INTERVAL_SECS",
        default_value_t = 5
    )]
    pub mdns_query_interval_secs: u64,

    /// Where to serve fold.sidecar.v1.Mesh to the node: a socket path (relative paths are under
    /// --data-dir), unix:/abs/path, or 127.0.0.1:PORT (then --link-token-file is required).
    #[arg(long, env = "FOLD_SIDECAR_MESH_LISTEN", default_value = "sidecar.sock")]
    pub mesh_listen: LinkAddr,

    /// Where the node serves fold.sidecar.v1.PeerRequests (same forms as --mesh-listen).
    #[arg(long, env = "FOLD_SIDECAR_NODE_ADDR", default_value = "node.sock")]
    pub node_addr: LinkAddr,

    /// File holding the shared secret of the local link (the node must use the same file).
    #[arg(long, env = "FOLD_LINK_TOKEN_FILE")]
    pub link_token_file: Option<PathBuf>,

    /// Admin HTTP port: /metrics (libp2p and gRPC metrics), /livez, /readyz.
    #[arg(
        long,
        env = "FOLD_SIDECAR_ADMIN_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub admin_listen: SocketAddr,

    /// Timeout of one request to another node (request-response), in milliseconds.
    #[arg(
        long,
        env = "FOLD_SIDECAR_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub request_timeout_ms: u64,

    /// Close a connection after this many idle seconds (connections are pooled and reused).
    #[arg(
        long,
        env = "FOLD_SIDECAR_IDLE_CONNECTION_TIMEOUT_SECS",
        default_value_t = 300
    )]
    pub idle_connection_timeout_secs: u64,

    /// Most seconds setting up a new connection may take (connect, security and multiplexer
    /// handshakes). AutoNAT dial-backs give up after 10 s, so keep this below 10 for a dial-back
    /// to an unreachable address (e.g. behind a NAT that drops unsolicited packets) to count as
    /// "not reachable" rather than as no answer.
    #[arg(
        long,
        env = "FOLD_SIDECAR_CONNECTION_TIMEOUT_SECS",
        default_value_t = 5
    )]
    pub connection_timeout_secs: u64,

    /// Seconds between pings on each connection; a ping unanswered this long has failed.
    #[arg(long, env = "FOLD_SIDECAR_PING_INTERVAL_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_interval_secs: u64,

    /// A connection with this many pings failed in a row, or unanswered for this many ping
    /// intervals, is closed and its peer shown disconnected (and redialled if known): a peer
    /// that vanished without closing its connections is not shown as connected.
    #[arg(long, env = "FOLD_SIDECAR_PING_MAX_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub ping_max_failures: u32,

    /// Most established connections in total.
    #[arg(long, env = "FOLD_SIDECAR_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: u32,

    /// Most established connections to one peer. Across NATs two nodes can briefly hold several:
    /// one each dialled, a relayed one, the direct one hole punching makes, and AutoNAT
    /// dial-backs (one per tested address, both ways; closed once the test is done).
    #[arg(
        long,
        env = "FOLD_SIDECAR_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 8
    )]
    pub max_connections_per_peer: u32,

    /// Most connections being set up at once that other nodes dialled (before the handshake
    /// completes); beyond it, new inbound connections are refused.
    #[arg(long, env = "FOLD_SIDECAR_MAX_PENDING_INCOMING", default_value_t = 64)]
    pub max_pending_incoming: u32,

    /// Most connections this node is dialling at once; beyond it, new dials fail at once.
    #[arg(long, env = "FOLD_SIDECAR_MAX_PENDING_OUTGOING", default_value_t = 64)]
    pub max_pending_outgoing: u32,

    /// Refuse new connections while this process uses more than this many bytes of physical
    /// memory (libp2p memory-connection-limits; 0 = no limit). Takes precedence over
    /// --max-memory-percent.
    #[arg(long, env = "FOLD_SIDECAR_MAX_MEMORY_BYTES", default_value_t = 0)]
    pub max_memory_bytes: u64,

    /// Refuse new connections while this process uses more than this percentage of the
    /// machine's total memory (0 = no limit; at most 100).
    #[arg(long, env = "FOLD_SIDECAR_MAX_MEMORY_PERCENT", default_value_t = 0.0)]
    pub max_memory_percent: f64,

    /// Largest /fold/forward/1.0.0 message, in bytes.
    #[arg(long, env = "FOLD_SIDECAR_MAX_FORWARD_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_forward_bytes: usize,

    /// Largest /fold/schema/1.0.0 message, in bytes.
    #[arg(long, env = "FOLD_SIDECAR_MAX_SCHEMA_BYTES", default_value_t = 64 * 1024)]
    pub max_schema_bytes: usize,

    /// Most concurrent inbound/outbound streams per request-response protocol.
    #[arg(
        long,
        env = "FOLD_SIDECAR_MAX_CONCURRENT_STREAMS",
        default_value_t = 100
    )]
    pub max_concurrent_streams: usize,

    /// How inbound forwards travel to the node: "stream" (one long-lived bidirectional gRPC
    /// stream, PeerRequests.HandleForwardStream) or "unary" (one HandleForward call each; what
    /// older nodes get anyway).
    #[arg(long, env = "FOLD_SIDECAR_LINK_FORWARD", default_value = "stream", value_parser = ["stream", "unary"])]
    pub link_forward: String,

    /// Forwards in flight at once on one node ⇄ sidecar forward stream (Mesh.ForwardStream);
    /// further ones are answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_SIDECAR_MAX_STREAM_FORWARDS", default_value_t = crate::mesh_api::DEFAULT_MAX_STREAM_FORWARDS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_stream_forwards: usize,

    /// Requests per second one peer may send us (0 = no limit); beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_SIDECAR_PEER_RATE_LIMIT", default_value_t = 200)]
    pub peer_rate_limit: u32,

    /// Burst of the per-peer rate limit.
    #[arg(long, env = "FOLD_SIDECAR_PEER_RATE_BURST", default_value_t = 400)]
    pub peer_rate_burst: u32,

    /// Inbound requests (forwards and schema checks) being handed to the node at once; beyond it,
    /// UNAVAILABLE. A slot is released as soon as the node has answered.
    #[arg(long, env = "FOLD_SIDECAR_INBOUND_QUEUE", default_value_t = 256)]
    pub inbound_queue: usize,

    /// The most of --inbound-queue one peer may hold at once, in percent (1-100); beyond it, that
    /// peer's requests are refused with UNAVAILABLE while others still get through.
    #[arg(long, env = "FOLD_SIDECAR_INBOUND_PEER_SHARE", default_value_t = crate::gate::DEFAULT_PEER_SHARE_PERCENT, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub inbound_peer_share: u8,

    /// Forwarded `changes` requests that may wait for a change (long polls of replicas and
    /// remote subscriptions) parked at once, from all peers. They never use --inbound-queue;
    /// beyond it, RESOURCE_EXHAUSTED (the asker retries).
    #[arg(long, env = "FOLD_SIDECAR_INBOUND_LONG_POLLS", default_value_t = crate::gate::DEFAULT_LONG_POLLS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub inbound_long_polls: usize,

    /// Parked long polls of one peer at once; beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_SIDECAR_INBOUND_LONG_POLLS_PER_PEER", default_value_t = crate::gate::DEFAULT_LONG_POLLS_PER_PEER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub inbound_long_polls_per_peer: usize,

    /// Peers that may never hold a connection to this node (repeatable; comma-separated in the
    /// env variable).
    #[arg(
        long = "deny-peer",
        env = "FOLD_SIDECAR_DENY_PEERS",
        value_delimiter = ','
    )]
    pub deny_peers: Vec<libp2p::PeerId>,

    /// When given, only these peers may connect (repeatable; comma-separated in the env variable).
    #[arg(
        long = "allow-peer",
        env = "FOLD_SIDECAR_ALLOW_PEERS",
        value_delimiter = ','
    )]
    pub allow_peers: Vec<libp2p::PeerId>,

    /// Private network: a pre-shared key file (IPFS swarm.key format:
    /// "/key/swarm/psk/1.0.0/", "/base16/", 64 hex digits). Only peers holding the same key can
    /// connect at all. TCP only (QUIC listen addresses are refused in this mode).
    #[arg(long, env = "FOLD_SIDECAR_PRIVATE_NETWORK_KEY")]
    pub private_network_key: Option<PathBuf>,

    /// Largest difference between a signed request's timestamp and this node's clock, in
    /// seconds; older or newer requests are refused (UNAUTHENTICATED).
    #[arg(long, env = "FOLD_SIDECAR_MAX_CLOCK_SKEW_SECS", default_value_t = 30)]
    pub max_clock_skew_secs: u64,

    /// Memory bound, in bytes, of the replay cache: the request ids (nonces) remembered while a
    /// replay of them could still pass the clock-skew check. When it is full, new forwarded
    /// requests are refused with RESOURCE_EXHAUSTED (counted as `replay_cache_full`) rather
    /// than forgetting an id that could still be replayed.
    #[arg(long, env = "FOLD_SIDECAR_REPLAY_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub replay_cache_bytes: usize,

    /// Circuit relays (v2) to reserve a slot on, e.g. /ip4/203.0.113.7/tcp/4001/p2p/12D3Koo...
    /// (repeatable; comma-separated in the env variable; the /p2p/ id is required). A node that
    /// cannot be dialled directly is reached through them. Reservations are made at start; more
    /// relays (bootstrap peers and connected peers that advertise the relay protocol) are used
    /// when AutoNAT finds this node not reachable.
    #[arg(long = "relay", env = "FOLD_SIDECAR_RELAYS", value_delimiter = ',')]
    pub relays: Vec<Multiaddr>,

    /// How many relay reservations to hold when AutoNAT finds this node not reachable (besides
    /// those on --relay relays, which are always held). 0 = only --relay relays.
    #[arg(long, env = "FOLD_SIDECAR_RELAY_RESERVATIONS", default_value_t = 2)]
    pub relay_reservations: usize,

    /// Serve as a circuit relay (v2) for other nodes, within the --relay-max-* limits. Off by
    /// default: a relay carries other nodes' traffic.
    #[arg(long, env = "FOLD_SIDECAR_RELAY_SERVER")]
    pub relay_server: bool,

    #[command(flatten)]
    pub relay_limits: RelayLimits,

    /// Threads of the async runtime. 1 (the default, as in linkerd2-proxy) runs everything on
    /// one thread: no cross-thread wake-ups on the request path, ~0.1 ms less per forwarded
    /// request measured on 2 cores (docs/BENCHMARKS.md). 0 means one thread per CPU core, for
    /// large machines where one sidecar must forward more than one core can carry.
    #[arg(long, env = "FOLD_SIDECAR_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Log format on stderr: "text" or "json".
    #[arg(long, env = "FOLD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The limits of the relay service (--relay-server).
#[derive(Debug, Clone, Parser)]
pub struct RelayLimits {
    /// Most reservations (nodes reachable through this relay) at once.
    #[arg(
        long = "relay-max-reservations",
        env = "FOLD_SIDECAR_RELAY_MAX_RESERVATIONS",
        default_value_t = 128
    )]
    pub max_reservations: usize,
    /// Most reservations one node may hold on this relay.
    #[arg(
        long = "relay-max-reservations-per-peer",
        env = "FOLD_SIDECAR_RELAY_MAX_RESERVATIONS_PER_PEER",
        default_value_t = 4
    )]
    pub max_reservations_per_peer: usize,
    /// Most relayed connections (circuits) at once.
    #[arg(
        long = "relay-max-circuits",
        env = "FOLD_SIDECAR_RELAY_MAX_CIRCUITS",
        default_value_t = 64
    )]
    pub max_circuits: usize,
    /// Most circuits to or from one node at once.
    #[arg(
        long = "relay-max-circuits-per-peer",
        env = "FOLD_SIDECAR_RELAY_MAX_CIRCUITS_PER_PEER",
        default_value_t = 4
    )]
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this many seconds (the nodes then reconnect, directly if hole
    /// punching succeeded, or through a relay again).
    #[arg(
        long = "relay-max-circuit-duration-secs",
        env = "FOLD_SIDECAR_RELAY_MAX_CIRCUIT_DURATION_SECS",
        default_value_t = 600
    )]
    pub max_circuit_duration_secs: u64,
    /// A circuit is closed after carrying this many bytes (each direction).
    #[arg(long = "relay-max-circuit-bytes",
        env = "FOLD_SIDECAR_RELAY_MAX_CIRCUIT_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub max_circuit_bytes: u64,
}

impl Config {
    /// The peer book file: known peers and their addresses, redialled after a restart.
    pub fn peers_path(&self) -> PathBuf {
        self.data_dir.join("peers.json")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.identity_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("identity.key"))
    }

    /// Whether mDNS runs, after resolving `auto`.
    pub fn mdns_enabled(&self) -> bool {
        match self.mdns {
            MdnsMode::On => true,
            MdnsMode::Off => false,
            MdnsMode::Auto => self.listen.iter().any(|a| !is_loopback(a)),
        }
    }
}

/// True when a multiaddr's IP part is a loopback address.
pub fn is_loopback(a: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdns_auto_follows_the_listen_addresses() {
        let mut c = Cli::parse_from(["p2p-sidecar"]).config;
        assert!(!c.mdns_enabled(), "loopback default: no mDNS");
        c.listen = vec!["/ip4/198.18.0.10/tcp/4001".parse().unwrap()];
        assert!(c.mdns_enabled());
        c.mdns = MdnsMode::Off;
        assert!(!c.mdns_enabled());
        let c = Cli::parse_from(["p2p-sidecar", "--mdns", "on"]).config;
        assert!(c.mdns_enabled());
    }
}
