//! Command-line flags, each with an environment-variable twin.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use local_link::LinkAddr;

use crate::identity::{AdminDistance, TrustPolicy, TrustSeed, UnknownPeerPolicy};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "fold-node",
    version,
    about = "The fold-node gRPC service: schemas, queries, mutations and history over embedded storage",
    long_about = "The fold-node gRPC service: schemas, queries, mutations and history over embedded \
storage (redb), with field-level permissions. Requests for other nodes go through the node's \
p2p-sidecar, reached over a local socket; start the sidecar with the same --data-dir and the two \
find each other with no further flags. Either may start first.\n\n\
Serves fold.v1.FoldNode, fold.v1.Network, grpc.health.v1.Health and server reflection (v1 and \
v1alpha) on --listen, and the same on the owner socket (--owner-listen, default data/owner.sock), \
where every caller is the node's owner.\n\n\
Managing the node (LoadSchema, SetSchemaState, GetTrust/SetTrust, Dial/Disconnect) needs the admin \
right: the owner socket, a client at --admin-distance or closer (default 0; anonymous clients are \
at distance 0 unless --client-trust-distance says otherwise), or an --admin-identity certificate. \
A refusal is PERMISSION_DENIED and names the right.\n\n\
When ready it prints one line to stdout:\n  \
fold-node ready grpc=<addr> peer_requests=<addr> admin=<addr> [health=<addr>] [owner=<addr>]\nLogs go to stderr; the level comes from RUST_LOG \
(default info). Traces are exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, whatever \
RUST_LOG says (the OTEL_* variables govern them)."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the public gRPC port (port 0 picks a free one).
    #[arg(long, env = "FOLD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// PEM certificate (chain) for TLS on the public port; with --tls-key, the port speaks only
    /// TLS.
    #[arg(long, env = "FOLD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "FOLD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s) for client certificates (mutual TLS). A client presenting a
    /// certificate from this CA is identified by its subject CN in the trust table.
    #[arg(long, env = "FOLD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: "required" refuses every client without a certificate from the CA
    /// at the TLS handshake; "optional" admits them at --client-trust-distance (which must then
    /// be given).
    #[arg(long, env = "FOLD_TLS_CLIENT_AUTH", default_value = "required", value_parser = ["required", "optional"])]
    pub tls_client_auth: String,

    /// Optional plaintext port serving only grpc.health.v1 (for Kubernetes gRPC probes, which
    /// cannot speak TLS).
    #[arg(long, env = "FOLD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Address of the admin HTTP port: /metrics (Prometheus), /livez, /readyz (storage and the
    /// sidecar link). It has no authentication: keep it on loopback or a pod-internal address.
    #[arg(long, env = "FOLD_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    pub admin_listen: SocketAddr,

    /// Directory for the database (fold.redb) and the local sockets; created if missing.
    #[arg(long, env = "FOLD_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Memory for the database's page cache (redb): the most of the database file's pages kept
    /// in this process, read cache and write buffer together. Bytes, or a number with a unit:
    /// KiB/Ki, MiB/Mi, GiB/Gi (×1024), KB/K, MB/M, GB/G (×1000); e.g. 64MiB. At least 1MiB.
    /// Pages beyond it are read from the file (the kernel's page cache, not this process). The
    /// node's resident memory stays within this plus a measured overhead of about 48 MiB
    /// (docs/DEPLOY.md#memory), whatever the size of the database.
    #[arg(long, env = "FOLD_CACHE_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// Trust distance of clients of the public port without a client certificate, and of
    /// certificate clients not listed in the trust table: a number (0 = owner: passes every
    /// Distance policy) or "deny". Default: 0 without --tls-client-ca (a loopback node for
    /// its owner), "deny" with it (a certificate-less or unlisted client is never the owner by
    /// accident). Raise it to expose the node to less trusted clients.
    #[arg(long, env = "FOLD_CLIENT_TRUST_DISTANCE")]
    pub client_trust_distance: Option<UnknownPeerPolicy>,

    /// Clients at this trust distance or closer hold the admin right: LoadSchema,
    /// SetSchemaState, GetTrust/SetTrust, Dial/Disconnect. "none": only the owner socket
    /// (--owner-listen) and --admin-identity certificates. Requests forwarded by other nodes
    /// never hold it.
    #[arg(long, env = "FOLD_ADMIN_DISTANCE", default_value = "0")]
    pub admin_distance: AdminDistance,

    /// A client certificate that holds the admin right whatever its distance: its subject CN,
    /// or sha256:<hex of its SubjectPublicKeyInfo> (repeatable; the env variable takes a
    /// comma-separated list).
    #[arg(
        long = "admin-identity",
        env = "FOLD_ADMIN_IDENTITY",
        value_delimiter = ','
    )]
    pub admin_identity: Vec<String>,

    /// The owner listener: serves the same API as --listen, and every caller there is the
    /// node's owner (distance 0, admin right). A Unix socket path (relative paths are under
    /// --data-dir; created mode 0600, so only this user can connect), or a loopback
    /// 127.0.0.1:PORT (e.g. for `kubectl port-forward`); "off" disables it.
    #[arg(long, env = "FOLD_OWNER_LISTEN", default_value = "owner.sock")]
    pub owner_listen: String,

    /// Trust distance for peers not in the trust table: a number, or "deny" to refuse their
    /// queries and mutations.
    #[arg(long, env = "FOLD_UNKNOWN_PEER_DISTANCE", default_value = "deny")]
    pub unknown_peer_distance: UnknownPeerPolicy,

    /// Trust table entries set at start, NODE_ID=DISTANCE or NODE_ID=deny (repeatable; the env
    /// variable takes a comma-separated list). Network.SetTrust changes the table at run time.
    #[arg(long = "trust", env = "FOLD_TRUST", value_delimiter = ',')]
    pub trust: Vec<TrustSeed>,

    /// Largest gRPC message accepted or sent, in bytes; larger requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Where the p2p-sidecar serves fold.sidecar.v1.Mesh: a socket path (relative paths are
    /// under --data-dir), unix:/abs/path, or 127.0.0.1:PORT.
    #[arg(long, env = "FOLD_SIDECAR_ADDR", default_value = "sidecar.sock")]
    pub sidecar_addr: LinkAddr,

    /// Where this node serves fold.sidecar.v1.PeerRequests to its sidecar (same forms as
    /// --sidecar-addr). Never the public port.
    #[arg(long, env = "FOLD_PEER_REQUESTS_LISTEN", default_value = "node.sock")]
    pub peer_requests_listen: LinkAddr,

    /// Requests per second each client (by remote address) may make; 0 turns the limit off.
    /// Over the limit: RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_RATE_LIMIT_PER_CLIENT", default_value_t = 1000)]
    pub rate_limit_per_client: u32,

    /// Burst allowance of the per-client rate limit (requests at once).
    #[arg(long, env = "FOLD_RATE_LIMIT_BURST", default_value_t = 2000)]
    pub rate_limit_burst: u32,

    /// Requests handled at once across all clients; more wait in the queue.
    #[arg(long, env = "FOLD_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Requests that may wait for a slot (0: none); beyond it requests are shed with UNAVAILABLE.
    #[arg(long, env = "FOLD_QUEUE_DEPTH", default_value_t = 4096)]
    pub queue_depth: usize,

    /// Longest any request may take, in milliseconds (a shorter client grpc-timeout wins);
    /// expiry is DEADLINE_EXCEEDED.
    #[arg(long, env = "FOLD_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Consecutive mesh failures toward one peer (or of the sidecar link) that open its circuit
    /// breaker; while open, requests fail fast with UNAVAILABLE.
    #[arg(long, env = "FOLD_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// How long an open breaker waits before letting one probe through, in milliseconds
    /// (doubling after each failed probe, up to 30 s).
    #[arg(long, env = "FOLD_BREAKER_BACKOFF_MS", default_value_t = 1000)]
    pub breaker_backoff_ms: u64,

    /// File holding the shared secret of the local link (at least 16 printable characters). Both
    /// processes must use the same file. Required when either link address is TCP; optional for
    /// Unix sockets, which are already limited to this user (mode 0600).
    #[arg(long, env = "FOLD_LINK_TOKEN_FILE")]
    pub link_token_file: Option<PathBuf>,

    /// How forwards travel to the sidecar: "stream" (one long-lived bidirectional gRPC stream
    /// carrying every forward, each tagged with an id) or "unary" (one Mesh.Forward call each;
    /// what sidecars without ForwardStream get anyway).
    #[arg(long, env = "FOLD_LINK_FORWARD", default_value = "stream", value_parser = ["stream", "unary"])]
    pub link_forward: String,

    /// Longest a forwarded request may take, in milliseconds (a shorter client deadline wins).
    #[arg(long, env = "FOLD_FORWARD_TIMEOUT_MS", default_value_t = 10_000)]
    pub forward_timeout_ms: u64,

    /// How long an applied idempotency key (MutateRequest.idempotency_key) is remembered, in
    /// seconds: a retry with the same key within it is answered with the first result and
    /// writes nothing.
    #[arg(long, env = "FOLD_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,

    /// Change log entries kept per schema (0: all). The change log is what FoldNode.Subscribe
    /// catches up from; a subscription from before the oldest kept entry is OUT_OF_RANGE.
    #[arg(long, env = "FOLD_CHANGE_LOG_RETENTION", default_value_t = 0)]
    pub change_log_retention: u64,

    /// Schema groups (docs/GROUPS.md): how often a group's leader sends heartbeats, in
    /// milliseconds. Every member of a group should use the same group timings.
    #[arg(long, env = "FOLD_GROUP_HEARTBEAT_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub group_heartbeat_ms: u64,

    /// Schema groups: a member that hears no leader for a random time between this and twice
    /// this (milliseconds) starts an election. A leader that dies is replaced after about this
    /// long; it must be well above --group-heartbeat-ms (at least 3×).
    #[arg(long, env = "FOLD_GROUP_ELECTION_TIMEOUT_MS", default_value_t = 400, value_parser = clap::value_parser!(u64).range(30..=60_000))]
    pub group_election_timeout_ms: u64,

    /// Schema groups: build a snapshot of a group's data and compact its log after this many
    /// log entries. A member that was away longer catches up from the snapshot.
    #[arg(long, env = "FOLD_GROUP_SNAPSHOT_EVERY", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(2..))]
    pub group_snapshot_every: u64,

    /// Schema groups: log entries kept behind a snapshot, so a member that was away briefly
    /// catches up from the log.
    #[arg(long, env = "FOLD_GROUP_KEEP_LOGS", default_value_t = 1_000)]
    pub group_keep_logs: u64,

    /// Follow a schema of another node and keep a read-only replica of it here: SCHEMA@NODE_ID
    /// (repeatable; the env variable takes a comma-separated list; at most 64). The schema must
    /// be loaded and approved here with the same definition, and the source node must let this
    /// node read every field. Writes to it here are refused with FAILED_PRECONDITION naming the
    /// owner; Network.Status shows each replica's lag.
    #[arg(long = "follow", env = "FOLD_FOLLOW", value_delimiter = ',')]
    pub follow: Vec<crate::follow::FollowSpec>,

    /// How many changes a live subscriber (FoldNode.Subscribe) that does not keep up may fall
    /// behind the schema's head before its stream is ended with RESOURCE_EXHAUSTED (it then
    /// resumes from the last sequence it received). Costs no memory: changes are read from the
    /// change log.
    #[arg(long, env = "FOLD_SUBSCRIPTION_BUFFER", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub subscription_buffer: u64,

    /// Subscriptions (FoldNode.Subscribe streams) open at once; more are RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_MAX_SUBSCRIPTIONS", default_value_t = 256)]
    pub max_subscriptions: usize,
    /// Subscriptions one client identity may hold open at once (local and remote ones; every
    /// anonymous client of the public port counts as one identity, a certificate client by its
    /// key, a forwarded requester by its node and key). Beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_MAX_SUBSCRIPTIONS_PER_CLIENT", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_subscriptions_per_client: u64,
    /// Scans (FoldNode.Scan streams) running at once; more are RESOURCE_EXHAUSTED.
    #[arg(long, env = "FOLD_MAX_SCANS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_scans: u64,
    /// Scans one client identity may run at once (identities as for
    /// --max-subscriptions-per-client).
    #[arg(long, env = "FOLD_MAX_SCANS_PER_CLIENT", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_scans_per_client: u64,
    /// Schema-addressed reads (route any/all): how long a schema's provider set (DHT provider
    /// records confirmed by a schema check) is used before it is looked up again, in seconds.
    /// After half of it, the set is refreshed in the background.
    #[arg(long, env = "FOLD_PROVIDER_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub provider_ttl_secs: u64,

    /// Retry budget of schema-addressed reads: failovers allowed as a percentage of recent
    /// routed reads (on top of --retry-min-per-sec). 0 allows only the per-second floor.
    #[arg(long, env = "FOLD_RETRY_BUDGET_PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub retry_budget_percent: u32,

    /// Retry budget of schema-addressed reads: failovers allowed per second whatever the traffic.
    #[arg(long, env = "FOLD_RETRY_MIN_PER_SEC", default_value_t = 5)]
    pub retry_min_per_sec: u32,

    /// Hedge route-any reads: one still unanswered after this many milliseconds is also sent to
    /// a second provider (from the retry budget); the first answer wins. 0 = no hedging.
    #[arg(long, env = "FOLD_HEDGE_AFTER_MS", default_value_t = 0)]
    pub hedge_after_ms: u64,

    /// Fault injection, for resilience drills (like Envoy's fault filter): this percentage of
    /// requests arriving from other nodes is refused with UNAVAILABLE ("injected fault") before
    /// any work. Counted in fold_injected_faults_total. 0 (the default) injects nothing; never
    /// set it in production.
    #[arg(long, env = "FOLD_FAULT_PERCENT", default_value_t = 0.0, value_parser = parse_percent)]
    pub fault_percent: f64,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before exit.
    #[arg(long, env = "FOLD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Threads of the async runtime; 0 means one per CPU core. Fewer threads mean fewer
    /// cross-thread wake-ups per request (lower latency on small machines), more threads more
    /// parallelism under load.
    #[arg(long, env = "FOLD_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Log format on stderr: "text" or "json".
    #[arg(long, env = "FOLD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// A size in bytes: digits, optionally followed by a unit (KiB/Ki/MiB/Mi/GiB/Gi are powers of
/// 1024; KB/K/MB/M/GB/G powers of 1000; B or nothing is bytes), with or without a space; at least
/// 1 MiB (the smallest page cache redb works well with).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("'{s}' is not a size: give bytes or a number with a unit, e.g. 64MiB")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "ki" => 1 << 10,
        "mib" | "mi" => 1 << 20,
        "gib" | "gi" => 1 << 30,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        other => {
            return Err(format!(
                "'{s}': unknown unit '{other}' (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < crate::store::MIN_CACHE_BYTES {
        return Err(format!(
            "'{s}' is {bytes} bytes; the cache needs at least 1MiB"
        ));
    }
    Ok(bytes)
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number (a percentage from 0 to 100)"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{v} is not a percentage from 0 to 100"));
    }
    Ok(v)
}

impl Config {
    /// Who gets which distance and who may manage the node, from the flags; an error says
    /// which flag to fix.
    pub fn trust_policy(&self) -> Result<TrustPolicy, String> {
        let mtls = self.tls_client_ca.is_some();
        if mtls && self.tls_client_auth == "optional" && self.client_trust_distance.is_none() {
            return Err("--tls-client-auth optional admits clients without a certificate: say at which distance with --client-trust-distance (a number, or deny)".into());
        }
        let client_distance = match self.client_trust_distance {
            Some(p) => p.distance(),
            None if mtls => None,
            None => Some(0),
        };
        Ok(TrustPolicy {
            client_distance,
            unknown_peer: self.unknown_peer_distance,
            admin_distance: self.admin_distance.0,
            admin_identities: self.admin_identity.clone(),
        })
    }

    /// The owner listener's address, if any (loopback only for TCP).
    pub fn owner_addr(&self) -> Result<Option<LinkAddr>, String> {
        if self.owner_listen.eq_ignore_ascii_case("off") || self.owner_listen.is_empty() {
            return Ok(None);
        }
        let addr: LinkAddr = self
            .owner_listen
            .parse()
            .map_err(|e| format!("--owner-listen: {e}"))?;
        if let LinkAddr::Tcp(a) = &addr
            && !a.ip().is_loopback()
        {
            return Err(format!(
                "--owner-listen {a}: every client of the owner listener is the node's owner, so it must be a Unix socket or a loopback address (127.0.0.1:PORT)"
            ));
        }
        Ok(Some(addr.relative_to(&self.data_dir)))
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Check a gRPC health endpoint and exit 0 when it reports SERVING, 1 otherwise (for
    /// container healthchecks; works against this node, its plaintext health port, or the
    /// sidecar's socket).
    Probe {
        /// Where to ask: 127.0.0.1:PORT, HOST:PORT (a name, e.g. node-a:50051, resolved when the
        /// probe runs), a socket path, or unix:/path.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: ProbeAddr,
        /// Service to ask about ("" = the whole server), e.g. fold.v1.Network.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

/// Where `fold-node probe` asks: a local link address, or a host name and port resolved when the
/// probe runs (so a healthcheck or an operator inside a mesh can probe a neighbour by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAddr {
    Link(LinkAddr),
    Host(String, u16),
}

impl std::fmt::Display for ProbeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeAddr::Link(a) => write!(f, "{a}"),
            ProbeAddr::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl std::str::FromStr for ProbeAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let hostport = t.strip_prefix("tcp://").unwrap_or(t);
        if !t.starts_with("unix:")
            && hostport.parse::<SocketAddr>().is_err()
            && let Some((host, port)) = hostport.rsplit_once(':')
            && let Ok(port) = port.parse::<u16>()
            && !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Ok(ProbeAddr::Host(host.to_string(), port));
        }
        t.parse::<LinkAddr>()
            .map(ProbeAddr::Link)
            .map_err(|e| format!("{e}, nor HOST:PORT (node-a:50051)"))
    }
}

#[cfg(test)]
mod probe_addr_tests {
    use super::*;

    #[test]
    fn probe_takes_addresses_sockets_and_host_names() {
        let p = |s: &str| s.parse::<ProbeAddr>();
        assert_eq!(
            p("127.0.0.1:50051"),
            Ok(ProbeAddr::Link(LinkAddr::Tcp(
                "127.0.0.1:50051".parse().unwrap()
            )))
        );
        assert_eq!(
            p("unix:/data/sidecar.sock"),
            Ok(ProbeAddr::Link(LinkAddr::Unix("/data/sidecar.sock".into())))
        );
        assert_eq!(
            p("node-a:50051"),
            Ok(ProbeAddr::Host("node-a".into(), 50051))
        );
        assert_eq!(
            p("tcp://fold-0.fold.svc:50052"),
            Ok(ProbeAddr::Host("fold-0.fold.svc".into(), 50052))
        );
        for bad in [
            "node-a",
            "node-a:",
            ":50051",
            "node a:1",
            "node-a:99999",
            "",
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
        assert_eq!(parse_size("2048KiB"), Ok(2 << 20));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("8mib"), Ok(8 << 20));
    }

    #[test]
    fn bad_sizes_say_what_to_fix() {
        assert!(parse_size("").unwrap_err().contains("not a size"));
        assert!(parse_size("MiB").unwrap_err().contains("not a size"));
        assert!(parse_size("64XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1.5GiB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("512KiB").unwrap_err().contains("at least 1MiB"));
        assert!(
            parse_size("99999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
