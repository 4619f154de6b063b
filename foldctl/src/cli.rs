//! foldctl's command line (clap derive): the global connection flags with their environment
//! twins, the output mode, and every command.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "foldctl",
    version,
    about = "Drive a fold-node and see its mesh: schemas, queries, mutations, history, peers, trust, diagnostics",
    after_help = "Exit codes: 0 ok; 1 usage or local error; 2 the node could not be reached \
                  (connection failure, TLS failure, UNAVAILABLE); 3 the node refused \
                  (any other gRPC code); 4 `check` found problems. See docs/FOLDCTL.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Connection and output (every command)")]
pub struct Global {
    /// The node: host:port, http://host:port, https://host:port (TLS), unix:/path or a socket path.
    #[arg(
        long,
        global = true,
        env = "FOLD_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
    /// PEM CA certificate that signed the node's TLS certificate (turns TLS on).
    #[arg(long, global = true, env = "FOLDCTL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, global = true, env = "FOLDCTL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "FOLDCTL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the node's certificate against (default: the host of --addr).
    #[arg(long, global = true, env = "FOLDCTL_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Deadline of each call: `500ms`, `5s`, `2m` or plain seconds.
    #[arg(long, global = true, env = "FOLD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Output: a table for people (columns shortened to fit a terminal; never when piped),
    /// `wide` (every column, nothing shortened), or stable JSON for scripts.
    #[arg(short = 'o', long = "output", global = true, env = "FOLD_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load, list, inspect and change the state of schemas.
    #[command(subcommand)]
    Schema(SchemaCmd),
    /// Read fields of an approved schema (here or on another node).
    Query(QueryArgs),
    /// Create, update or delete field values.
    Mutate(MutateArgs),
    /// Versions of one field, newest first.
    History(HistoryArgs),
    /// Follow a schema's changes: everything after --from, then live, until --limit changes or
    /// Ctrl-C. One line per change (with -o json: one JSON object per line, progress too).
    Subscribe(SubscribeArgs),
    /// This node in the mesh: id, addresses, peer counts, provided schemas, reachability across
    /// NATs, relays, and the replicas it keeps.
    Status,
    /// Peers: id, addresses, connected, RTT, agent, trust (and circuit breaker state).
    Peers {
        /// Also peers known from discovery but not connected.
        #[arg(long)]
        all: bool,
        /// Also show each peer's circuit breaker state, read from the node's admin port
        /// (host:port, e.g. 127.0.0.1:9464).
        #[arg(long, value_name = "HOST:PORT")]
        metrics_addr: Option<String>,
    },
    /// Nodes that announce they serve a schema.
    Providers { schema: String },
    /// Read or change the trust table.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Schema groups: one schema replicated with Raft on 3 or 5 nodes, writable while a
    /// majority of them is up (docs/GROUPS.md). Create one, change its members, see its state.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Connect to a peer by multiaddr (or a node id known to discovery).
    Dial { address: String },
    /// Ask a peer which of these schemas it has approved.
    CheckSchemas {
        node: String,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Diagnose the node and print what to fix.
    Check {
        /// The node's admin (metrics) address, host:port (default: where the node says it
        /// listens, from Network.Status; 127.0.0.1:9464 if it cannot say).
        #[arg(long, env = "FOLD_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// The sidecar's admin (metrics) address, host:port (default: where the sidecar says it
        /// listens, through the node; 127.0.0.1:9465 if it cannot say).
        #[arg(long, env = "FOLD_SIDECAR_METRICS_ADDR")]
        sidecar_metrics_addr: Option<String>,
    },
    /// A live view of the mesh in the browser: the graph of nodes and links (RTT, relayed,
    /// denied, unreachable), each node's schemas, replicas and traffic, and what `check` finds.
    /// Serves a local web page (read-only: it never changes the node) and prints its URL.
    Dashboard(DashboardArgs),
    /// The mesh around this node, gathered by asking peers for their peers (up to --hops, within
    /// --timeout), as a tree, JSON, Graphviz DOT or an SVG picture.
    Topology {
        /// How many hops away to ask (0 = this node and its peers only; at most 4).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=4))]
        hops: u32,
        /// Picture format (overrides -o): text tree, dot, or svg.
        #[arg(long, value_enum)]
        format: Option<TopologyFormat>,
        /// Also peers known but not connected.
        #[arg(long)]
        all: bool,
        /// Also ask these nodes (same flags as --addr; repeat) and merge their views into one
        /// picture of the mesh.
        #[arg(long, value_name = "ADDR")]
        also: Vec<String>,
    },
    /// Per-method request rate, success rate and p50/p99 latency from the node's and its
    /// sidecar's /metrics, refreshed live in a terminal (one sample otherwise).
    Top {
        /// Admin (metrics) addresses to read, host:port; repeat for several processes (default:
        /// the node's and its sidecar's, as the node reports them in Network.Status;
        /// 127.0.0.1:9464 and 127.0.0.1:9465 if it cannot say).
        #[arg(long = "metrics-addr")]
        metrics_addrs: Vec<String>,
        /// Time between samples.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many samples (default: until Ctrl-C in a terminal, else 1).
        #[arg(long)]
        iterations: Option<u32>,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Where to serve the page, host:port (port 0 picks a free one). Keep it on loopback: the
    /// page shows the mesh to whoever can open it.
    #[arg(
        long,
        env = "FOLDCTL_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:9470"
    )]
    pub listen: std::net::SocketAddr,
    /// Time between refreshes of the view.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// How many hops of the mesh to gather (as `topology --hops`; at most 4).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub hops: u32,
    /// Also ask these nodes (same flags as --addr; repeat): their schemas, replicas, traffic
    /// and problems are shown too.
    #[arg(long, value_name = "ADDR")]
    pub also: Vec<String>,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyFormat {
    Text,
    Json,
    Dot,
    Svg,
}

#[derive(Subcommand, Debug)]
pub enum SchemaCmd {
    /// Load a schema from a fold_db JSON file (`-` reads stdin).
    Load {
        file: PathBuf,
        /// Approve it right away.
        #[arg(long)]
        approve: bool,
    },
    /// List schemas.
    List {
        /// Only schemas in this state.
        #[arg(long, value_parser = ["available", "approved", "blocked"])]
        state: Option<String>,
    },
    /// One schema with its definition.
    Get { name: String },
    /// Approve a schema (queries and mutations allowed; announced to the mesh).
    Approve { name: String },
    /// Block a schema (refused).
    Block { name: String },
    /// Unload a schema (back to `available`).
    Unload { name: String },
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("filter").args(["key", "prefix", "range", "keys", "pattern"])))]
pub struct QueryArgs {
    /// Schema name.
    pub schema: String,
    /// Fields to read (default: every field of the schema).
    pub fields: Vec<String>,
    /// Exactly this range key.
    #[arg(long)]
    pub key: Option<String>,
    /// Range keys starting with this prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Range keys in [START, END) (an empty END is unbounded).
    #[arg(long, num_args = 2, value_names = ["START", "END"])]
    pub range: Option<Vec<String>>,
    /// Any of these range keys (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub keys: Option<Vec<String>>,
    /// Glob over range keys: `*` any run, `?` one character.
    #[arg(long)]
    pub pattern: Option<String>,
    /// Run on this node of the mesh (forwarded).
    #[arg(long, group = "where")]
    pub node: Option<String>,
    /// Run on any node serving the schema: the connected node picks one (balanced by latency)
    /// and fails over to another if it cannot answer.
    #[arg(long, group = "where")]
    pub any: bool,
    /// Ask every node serving the schema: records are shown per node (a NODE column), and a
    /// node that failed is reported on stderr (exit 0 when at least one answered).
    #[arg(long, group = "where")]
    pub all: bool,
    /// For a group schema: `linearizable` (the default: confirmed with the leader, never
    /// stale; UNAVAILABLE without a quorum) or `local` (this member's copy as it is, answered
    /// even without a quorum, marked with the sequence it is as of). Ignored for other schemas.
    #[arg(long, value_enum)]
    pub consistency: Option<ConsistencyArg>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsistencyArg {
    Linearizable,
    Local,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").args(["data", "batch"]).required(true)))]
pub struct MutateArgs {
    /// Schema name.
    pub schema: String,
    /// What to do with the fields in the data.
    #[arg(value_parser = ["create", "update", "delete"])]
    pub kind: String,
    /// Field values as a JSON object, `@file` to read it from a file, `@-` from stdin.
    #[arg(long)]
    pub data: Option<String>,
    /// A JSONL file (`-` = stdin): one JSON object per line, one mutation each, in order;
    /// progress on stderr; stops at the first refusal.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// Apply on this node of the mesh (forwarded).
    #[arg(long)]
    pub node: Option<String>,
    /// Make the mutation safe to retry: the node applies it once for this key (a retry prints
    /// "replayed" and writes nothing). At most 128 bytes.
    #[arg(long, conflicts_with = "batch")]
    pub idempotency_key: Option<String>,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Schema name.
    pub schema: String,
    /// Field name.
    pub field: String,
    /// The range key (Range schemas).
    pub key: Option<String>,
    /// At most this many versions (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// Read it on this node of the mesh (forwarded).
    #[arg(long, group = "where")]
    pub node: Option<String>,
    /// Read it on any node serving the schema (balanced, failing over).
    #[arg(long, group = "where")]
    pub any: bool,
    /// Read it on every node serving the schema (a NODE column; failures on stderr).
    #[arg(long, group = "where")]
    pub all: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("sub_filter").args(["key", "prefix"])))]
pub struct SubscribeArgs {
    /// Schema name.
    pub schema: String,
    /// Fields to receive (default: every field you may read).
    pub fields: Vec<String>,
    /// Changes after this sequence number (0 = from the first kept one). To resume, give the
    /// last sequence you saw.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Only changes of this range key.
    #[arg(long)]
    pub key: Option<String>,
    /// Only changes of range keys starting with this prefix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Another node's changes (through the mesh).
    #[arg(long, group = "where")]
    pub node: Option<String>,
    /// The changes of one node serving the schema (the first progress line names it).
    #[arg(long, group = "where")]
    pub any: bool,
    /// Stop after this many changes (0 = run until Ctrl-C or the stream ends).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// Also print progress lines (sequence, head, node) in the table output.
    #[arg(long)]
    pub progress: bool,
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Make a schema a group of these members (3 or 5; 1 to 7 are accepted). Every member must
    /// have the schema loaded and approved with the same definition (policies included). Needs
    /// the admin right here; this node is a member (added when not named). Answers once a
    /// leader is elected.
    #[command(
        after_help = "Example: foldctl group create SensorReadings --member 12D3KooW…B --member 12D3KooW…C"
    )]
    Create {
        /// Schema name (it names the group).
        schema: String,
        /// A member's node id (repeat, or comma separated; `foldctl status` shows a node's id).
        #[arg(
            short = 'm',
            long = "member",
            value_name = "NODE_ID",
            required = true,
            value_delimiter = ','
        )]
        members: Vec<String>,
    },
    /// Add members (each catches up as a learner, then becomes a voter). Run it on the leader.
    /// Each must have the schema loaded and approved with the group's definition.
    Add {
        /// The group's schema.
        schema: String,
        /// Node ids to add.
        #[arg(value_name = "NODE_ID", required = true)]
        ids: Vec<String>,
    },
    /// Remove members (a dead one too, while the rest are a majority of the voters). Run it on
    /// the leader.
    Remove {
        /// The group's schema.
        schema: String,
        /// Node ids to remove.
        #[arg(value_name = "NODE_ID", required = true)]
        ids: Vec<String>,
    },
    /// Replace member OLD by NEW in one membership change (e.g. a dead machine by a new one).
    /// Run it on the leader.
    Replace {
        /// The group's schema.
        schema: String,
        /// The member to remove.
        #[arg(value_name = "OLD_NODE_ID")]
        old: String,
        /// The node to add (schema loaded and approved there).
        #[arg(value_name = "NEW_NODE_ID")]
        new: String,
    },
    /// The groups this node is a member of (as `list`), or one group in detail: role, leader,
    /// term, log indexes, quorum, and each member with its lag (known on the leader).
    Status {
        /// One group's schema (default: every group, as a table).
        schema: Option<String>,
    },
    /// The groups this node is a member of: schema, role, leader, term, commit, applied,
    /// quorum, and the members with their lag (`-o wide`: every index, full ids).
    List,
}

#[derive(Subcommand, Debug)]
pub enum TrustCmd {
    /// The whole table, or one node's entry.
    Get { node: Option<String> },
    /// Give a node a distance (0 = owner, larger = less trusted) or `deny`.
    Set { node: String, trust: String },
    /// Remove a node's entry (it gets the default again).
    Remove { node: String },
}

/// `500ms`, `5s`, `2m`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 5s, 2m)"))?;
    if !v.is_finite() || v <= 0.0 || v * mult_ms > 86_400_000.0 {
        return Err(format!("`{s}` is not a duration between 1ms and 24h"));
    }
    Ok(std::time::Duration::from_secs_f64(v * mult_ms / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
