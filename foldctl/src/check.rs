//! `foldctl check`: diagnose a node and say what to fix. Each check asks the node (or its admin
//! port) one real question; every finding has a severity, what is wrong, and how to fix it.
//! Exit code 4 when any finding is a warning or an error.

use std::time::Duration;

use fold_client::{
    BootstrapState, Client, Error, Health, NETWORK_SERVICE, NetworkStatus, Peer, SchemaState,
    Target,
};
use serde::Serialize;

use crate::cli::{Global, Output};
use crate::group_check::group_findings;
use crate::metrics::{Sample, get_metrics, parse};
use crate::replica_check::replica_findings;
use crate::{Failure, Out, builder};

pub use crate::finding::{Finding, Severity, finding};

/// Admin (metrics) addresses given on the command line; `None`: the ones the node reports.
#[derive(Clone, Copy, Default)]
pub struct AdminFlags<'a> {
    pub node: Option<&'a str>,
    pub sidecar: Option<&'a str>,
}

/// What one diagnosis found, and the node's status and peers it was based on (when it
/// answered).
pub struct Diagnosis {
    pub findings: Vec<Finding>,
    pub status: Option<NetworkStatus>,
    pub peers: Vec<Peer>,
    /// The admin addresses read (node, sidecar).
    pub admin: (AdminTarget, AdminTarget),
}

/// Longest wait for a second sample of the replicas' lag.
const LAG_SAMPLE: Duration = Duration::from_secs(2);

pub async fn run(g: &Global, flags: AdminFlags<'_>) -> Result<Out, Failure> {
    let findings = diagnose(g, flags, None, true).await.findings;
    let problems = findings.iter().any(|f| f.severity >= Severity::Warning);
    let json = serde_json::json!({"ok": !problems, "findings": findings});
    let mut text = String::new();
    for f in &findings {
        let sev = format!("{:?}", f.severity).to_uppercase();
        text.push_str(&format!("[{sev}] {}: {}\n", f.check, f.what));
        if !f.fix.is_empty() {
            text.push_str(&format!("        fix: {}\n", f.fix));
        }
    }
    text.push_str(if problems {
        "problems found\n"
    } else {
        "no problems found\n"
    });
    if problems {
        // The report is the output; print it here since the exit is non-zero.
        match g.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json)
                    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
            ),
            Output::Table | Output::Wide => print!("{text}"),
        }
        return Err(Failure::Problems);
    }
    Ok(Out { json, text })
}

/// Every check, in order: the node, its sidecar link and peers, its schemas, its replicas, and
/// its admin ports (at the addresses the node reports unless `flags` name others). `before`:
/// an earlier status, to tell whether replicas fall behind; without one and with
/// `sample_lag`, a replica that lags is sampled again after a short wait.
pub async fn diagnose(
    g: &Global,
    flags: AdminFlags<'_>,
    before: Option<&NetworkStatus>,
    sample_lag: bool,
) -> Diagnosis {
    let mut findings = Vec::new();
    let mut status = None;
    let mut peers = Vec::new();
    match builder(g).connect().await {
        Ok(client) => {
            (status, peers) = node_checks(&client, g.tls_cert.is_some(), &mut findings).await;
            if let Some(now) = status.take() {
                let (now, earlier) = lag_samples(&client, g, now, before, sample_lag).await;
                findings.extend(replica_findings(&now, earlier.as_ref(), &peers));
                findings.extend(group_findings(&now.groups));
                status = Some(now);
            }
        }
        Err(e) => findings.push(connect_finding(g, &e)),
    }
    let reported =
        |f: fn(&NetworkStatus) -> &Option<String>| status.as_ref().and_then(|s| f(s).as_deref());
    let node = admin_target(
        g,
        flags.node,
        reported(|s| &s.node_admin_addr),
        NODE_ADMIN_DEFAULT,
    );
    let sidecar = admin_target(
        g,
        flags.sidecar,
        reported(|s| &s.sidecar_admin_addr),
        SIDECAR_ADMIN_DEFAULT,
    );
    admin_checks(&node, &sidecar, &mut findings).await;
    Diagnosis {
        findings,
        status,
        peers,
        admin: (node, sidecar),
    }
}

/// The status to judge replicas by, and an earlier one to compare lags with: `before` if
/// given; else, when a replica lags and `sample_lag`, `now` becomes the earlier sample and a
/// second one is taken after [`LAG_SAMPLE`] (at most the call timeout).
async fn lag_samples(
    c: &Client,
    g: &Global,
    now: NetworkStatus,
    before: Option<&NetworkStatus>,
    sample_lag: bool,
) -> (NetworkStatus, Option<NetworkStatus>) {
    if let Some(b) = before {
        return (now, Some(b.clone()));
    }
    let lagging = now
        .replicas
        .iter()
        .any(|r| r.lag > 0 && r.last_error.is_none());
    if !(sample_lag && lagging) {
        return (now, None);
    }
    tokio::time::sleep(LAG_SAMPLE.min(g.timeout)).await;
    match c.status().await {
        Ok(later) => (later, Some(now)),
        Err(_) => (now, None),
    }
}

/// The node's and its sidecar's admin addresses as the node reports them (the defaults when it
/// cannot be asked or does not say).
pub async fn reported_admin_addrs(g: &Global) -> Vec<String> {
    let status = match builder(g).connect().await {
        Ok(c) => c.status().await.ok(),
        Err(_) => None,
    };
    let node = status.as_ref().and_then(|s| s.node_admin_addr.as_deref());
    let sidecar = status
        .as_ref()
        .and_then(|s| s.sidecar_admin_addr.as_deref());
    vec![
        admin_target(g, None, node, NODE_ADMIN_DEFAULT).addr,
        admin_target(g, None, sidecar, SIDECAR_ADMIN_DEFAULT).addr,
    ]
}

pub const NODE_ADMIN_DEFAULT: &str = "127.0.0.1:9464";
pub const SIDECAR_ADMIN_DEFAULT: &str = "127.0.0.1:9465";

/// Where an admin address came from, for the fix of an unreachable port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrSource {
    /// --metrics-addr / --sidecar-metrics-addr.
    Flag,
    /// Network.Status (the process said where it listens).
    Node,
    /// Neither: the default port, a guess.
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminTarget {
    pub addr: String,
    pub source: AddrSource,
}

/// The admin address to read: the flag, else the one the node reports (an unspecified host,
/// 0.0.0.0 or ::, replaced by the host of --addr), else the default.
pub fn admin_target(
    g: &Global,
    flag: Option<&str>,
    reported: Option<&str>,
    default: &str,
) -> AdminTarget {
    if let Some(f) = flag {
        return AdminTarget {
            addr: f.to_string(),
            source: AddrSource::Flag,
        };
    }
    match reported {
        Some(r) => AdminTarget {
            addr: reachable(r, &node_host(g)),
            source: AddrSource::Node,
        },
        None => AdminTarget {
            addr: default.to_string(),
            source: AddrSource::Default,
        },
    }
}

/// The host of --addr (127.0.0.1 for a Unix socket).
fn node_host(g: &Global) -> String {
    match builder(g).target() {
        Ok(Target::Tcp { uri, .. }) => {
            let rest = uri.split_once("://").map_or(uri.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or(rest);
            match authority.rsplit_once(':') {
                Some((h, _)) if !h.is_empty() => h.to_string(),
                _ => authority.to_string(),
            }
        }
        _ => "127.0.0.1".to_string(),
    }
}

/// `addr` with an unspecified host (0.0.0.0, [::]) replaced by `host`.
pub fn reachable(addr: &str, host: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) if sa.ip().is_unspecified() => {
            if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{}", sa.port())
            } else {
                format!("{host}:{}", sa.port())
            }
        }
        _ => addr.to_string(),
    }
}

fn connect_finding(g: &Global, e: &Error) -> Finding {
    let target = builder(g)
        .target()
        .map(|t| t.to_string())
        .unwrap_or_else(|_| g.addr.clone());
    let plaintext = matches!(builder(g).target(), Ok(Target::Tcp { tls: false, .. }));
    match e {
        Error::Config(m) => finding(
            Severity::Error,
            "config",
            m.clone(),
            "fix the flag named above (foldctl --help)",
        ),
        Error::Connect { detail, .. } if e.is_tls() => {
            let d = detail.to_ascii_lowercase();
            let fix = if d.contains("unknownissuer")
                || d.contains("unknown issuer")
                || d.contains("invalid peer certificate") && d.contains("issuer")
            {
                "the node's certificate is not signed by the CA given with --tls-ca: pass the CA that signed the node's --tls-cert"
            } else if d.contains("notvalidforname") || d.contains("not valid for name") {
                "the certificate does not name the host in --addr: pass --tls-server-name with a name the certificate lists (e.g. localhost)"
            } else if d.contains("corrupt message")
                || d.contains("invalidcontenttype")
                || d.contains("invalid content type")
            {
                "the node does not speak TLS on this port: use http:// (no --tls-ca), or start fold-node with --tls-cert and --tls-key"
            } else if d.contains("certificate required") || d.contains("certificaterequired") {
                "the node requires a client certificate (mutual TLS): pass --tls-cert and --tls-key signed by the node's --tls-client-ca"
            } else {
                "check --tls-ca (the CA that signed the node's certificate), --tls-server-name, and --tls-cert/--tls-key for mutual TLS"
            };
            finding(
                Severity::Error,
                "tls",
                format!("TLS handshake with {target} failed: {detail}"),
                fix,
            )
        }
        Error::Connect { detail, .. } => {
            let d = detail.to_ascii_lowercase();
            if plaintext
                && !d.contains("refused")
                && !d.contains("no such")
                && !d.contains("timed out")
            {
                finding(
                    Severity::Error,
                    "tls",
                    format!(
                        "{target} accepted the connection but did not speak plaintext gRPC: {detail}"
                    ),
                    "the node probably serves TLS: use https://HOST:PORT with --tls-ca (and --tls-cert/--tls-key for mutual TLS)",
                )
            } else {
                finding(
                    Severity::Error,
                    "reachable",
                    format!("cannot connect to {target}: {detail}"),
                    "start fold-node (scripts/run.sh), or point --addr / FOLD_ADDR at its gRPC port",
                )
            }
        }
        other => finding(
            Severity::Error,
            "reachable",
            other.to_string(),
            "see the message above",
        ),
    }
}

/// The node's own health: false (with the finding) when it does not answer as a fold-node.
async fn node_health(c: &Client, mutual: bool, out: &mut Vec<Finding>) -> bool {
    // The node itself.
    match c.health("").await {
        Ok(Health::Serving) => out.push(finding(
            Severity::Ok,
            "reachable",
            format!("{} answers and is SERVING", c.target()),
            "",
        )),
        Ok(h) => out.push(finding(
            Severity::Error,
            "reachable",
            format!("{} reports {h:?}", c.target()),
            "see the fold-node log",
        )),
        Err(e) => {
            let plaintext = matches!(c.target(), Target::Tcp { tls: false, .. });
            let msg = e.to_string().to_ascii_lowercase();
            let spoke_else = [
                "connection error",
                "broken pipe",
                "connection reset",
                "frame",
                "h2 protocol",
            ]
            .iter()
            .any(|w| msg.contains(w));
            if plaintext && spoke_else {
                out.push(finding(
                    Severity::Error,
                    "tls",
                    format!("{} accepted the connection but did not speak plaintext gRPC: {e}", c.target()),
                    "the node probably serves TLS: use https://HOST:PORT with --tls-ca (and --tls-cert/--tls-key for mutual TLS)",
                ));
                return false;
            }
            // TLS 1.3: the client's half of the handshake completes before the node checks the
            // client certificate, so a refused certificate shows up as the connection closing
            // under the first call (closed, cancelled, reset, or a broken pipe when a client
            // certificate was sent).
            let tls_target = matches!(c.target(), Target::Tcp { tls: true, .. });
            let closed = [
                "connection closed",
                "canceled",
                "cancelled",
                "connection reset",
            ]
            .iter()
            .any(|w| msg.contains(w));
            let tls = e.is_tls() || (tls_target && closed) || (mutual && spoke_else);
            out.push(finding(
                Severity::Error,
                if tls { "tls" } else { "reachable" },
                format!("health check failed: {e}"),
                if tls {
                    "the node refused this client's TLS identity: pass --tls-cert/--tls-key signed by the node's --tls-client-ca"
                } else {
                    "check that --addr is a fold-node gRPC port"
                },
            ));
            return false;
        }
    }
    true
}

/// `mutual`: this client presents a certificate (mutual TLS). Returns the node's status and
/// peers (every known one) when it answered.
async fn node_checks(
    c: &Client,
    mutual: bool,
    out: &mut Vec<Finding>,
) -> (Option<NetworkStatus>, Vec<Peer>) {
    if !node_health(c, mutual, out).await {
        return (None, Vec::new());
    }
    // The link to the sidecar: health first, then the Network API itself.
    let health = c.health(NETWORK_SERVICE).await;
    let status = c.status().await;
    let link_down = matches!(health, Ok(Health::NotServing))
        || matches!(&status, Err(e) if e.code() == Some(tonic::Code::Unavailable));
    match (&status, link_down) {
        (Ok(s), false) => {
            out.push(finding(
                Severity::Ok,
                "sidecar-link",
                format!("linked to its p2p-sidecar; node id {}", s.node_id),
                "",
            ));
            out.push(peers_finding(&s.node_id, s.connected_peers, s.known_peers));
            out.extend(bootstrap_findings(&s.bootstrap));
        }
        _ => {
            let why = match (&health, &status) {
                (Ok(Health::NotServing), _) => {
                    "grpc.health.v1 reports fold.v1.Network NOT_SERVING".to_string()
                }
                (_, Err(e)) => format!("Network.Status: {e}"),
                _ => "unknown".to_string(),
            };
            out.push(finding(
                Severity::Error,
                "sidecar-link",
                format!("the node's link to its p2p-sidecar is down ({why}); mesh calls fail with UNAVAILABLE"),
                "start p2p-sidecar with the same --data-dir as fold-node (scripts/run.sh starts both), or fix --sidecar-addr / FOLD_SIDECAR_ADDR",
            ));
        }
    }
    if let Err(e) = &status
        && e.code() != Some(tonic::Code::Unavailable)
    {
        out.push(finding(
            Severity::Warning,
            "network-api",
            format!("Network.Status refused: {e}"),
            "this client may lack the rights to see the mesh",
        ));
    }
    // Peers this node denies while connected to them.
    let mut peers = Vec::new();
    if status.is_ok()
        && let Ok(list) = c.peers(true).await
    {
        peers = list;
        for p in peers.iter().filter(|p| p.connected && p.denied) {
            out.push(finding(
                Severity::Warning,
                "peer-denied",
                format!("connected peer {} is denied by this node's trust table: its requests are refused", p.node_id),
                format!("if it should be allowed: foldctl trust set {} 1", p.node_id),
            ));
        }
    }
    schema_checks(c, out).await;
    (status.ok(), peers)
}

/// Schemas loaded but not approved, and blocked ones.
async fn schema_checks(c: &Client, out: &mut Vec<Finding>) {
    match c.list_schemas(None).await {
        Ok(list) => {
            let pending: Vec<_> = list
                .iter()
                .filter(|s| s.state == SchemaState::Available)
                .collect();
            for s in &pending {
                out.push(finding(
                    Severity::Warning,
                    "schema-approval",
                    format!("schema {} is loaded but not approved: queries and mutations are refused (FAILED_PRECONDITION)", s.name),
                    format!("foldctl schema approve {}", s.name),
                ));
            }
            for s in list.iter().filter(|s| s.state == SchemaState::Blocked) {
                out.push(finding(
                    Severity::Info,
                    "schema-approval",
                    format!("schema {} is blocked: requests for it are refused", s.name),
                    format!("if that is not intended: foldctl schema approve {}", s.name),
                ));
            }
            if pending.is_empty() {
                out.push(finding(
                    Severity::Ok,
                    "schema-approval",
                    format!("{} schema(s), none waiting for approval", list.len()),
                    "",
                ));
            }
        }
        Err(e) => out.push(finding(
            Severity::Warning,
            "schema-approval",
            format!("cannot list schemas: {e}"),
            "",
        )),
    }
}

/// The admin ports: reachable, and what their counters say about the mesh.
async fn admin_checks(node: &AdminTarget, sidecar: &AdminTarget, out: &mut Vec<Finding>) {
    if let Some(samples) = admin_check(Process::Node, node, out).await {
        out.extend(node_metric_findings(&samples));
    }
    if let Some(samples) = admin_check(Process::Sidecar, sidecar, out).await {
        out.extend(sidecar_metric_findings(&samples));
    }
}

#[derive(Clone, Copy)]
enum Process {
    Node,
    Sidecar,
}

/// Read one admin port's /metrics: its samples, or a finding saying why not and what to fix
/// (which depends on where the address came from).
async fn admin_check(p: Process, t: &AdminTarget, out: &mut Vec<Finding>) -> Option<Vec<Sample>> {
    let (check, who, bin, flag, env, default) = match p {
        Process::Node => (
            "metrics",
            "node",
            "fold-node",
            "--metrics-addr",
            "FOLD_ADMIN_LISTEN",
            NODE_ADMIN_DEFAULT,
        ),
        Process::Sidecar => (
            "sidecar-metrics",
            "sidecar",
            "p2p-sidecar",
            "--sidecar-metrics-addr",
            "FOLD_SIDECAR_ADMIN_LISTEN",
            SIDECAR_ADMIN_DEFAULT,
        ),
    };
    let addr = &t.addr;
    let origin = match t.source {
        AddrSource::Flag => format!("given with {flag}"),
        AddrSource::Node => format!("where the {who} says it listens"),
        AddrSource::Default => "the default; the node did not say where it listens".to_string(),
    };
    let fix = match t.source {
        AddrSource::Flag => format!(
            "pass the {who}'s admin port ({bin} --admin-listen / {env}) as {flag}, or leave {flag} out to use the address the node reports"
        ),
        AddrSource::Node => format!(
            "the {who} reports its admin port at {addr} but it cannot be read from here: check that nothing blocks it (a firewall, another network namespace), or pass an address that reaches it as {flag}"
        ),
        AddrSource::Default => format!(
            "pass the {who}'s admin port ({bin} --admin-listen / {env}, default {default}) as {flag}"
        ),
    };
    match get_metrics(addr).await {
        Ok((200, body)) if body.contains("# TYPE") => {
            out.push(finding(
                Severity::Ok,
                check,
                format!("http://{addr}/metrics answers ({origin})"),
                "",
            ));
            return Some(parse(&body));
        }
        Ok((code, _)) => out.push(finding(
            Severity::Warning,
            check,
            format!(
                "http://{addr}/metrics ({origin}) answered HTTP {code}, not Prometheus metrics"
            ),
            fix,
        )),
        Err(e) => out.push(finding(
            Severity::Warning,
            check,
            format!("{who} metrics port http://{addr}/metrics ({origin}) cannot be reached: {e}"),
            fix,
        )),
    }
    None
}

fn sum(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|x| x == v)))
        .map(|s| s.value)
        .sum()
}

/// What the node's counters say: rate-limited clients, open circuit breakers, forwards the
/// remote refused.
/// One finding per configured bootstrap address that failed its last dial, naming the address,
/// the error, and what to fix (a name that does not resolve is called out as such).
/// How many peers the sidecar is connected to. A sidecar that knows peers but holds no
/// connection is named: it lost them (its peers stopped answering pings, or its network is gone).
pub fn peers_finding(node_id: &str, connected: u32, known: u32) -> Finding {
    match (connected, known) {
        (0, 0) => finding(
            Severity::Warning,
            "peers",
            "no connected peers (0 known)",
            "dial one (foldctl dial /ip4/HOST/tcp/PORT/p2p/NODE_ID), start the sidecar with --bootstrap, or listen on a LAN address so mDNS finds peers",
        ),
        (0, known) => finding(
            Severity::Error,
            "peers",
            format!(
                "no connected peers: p2p-sidecar {node_id} holds no connection to any of the {known} peer(s) it knows"
            ),
            "it lost them, or never reached them: check this container's or host's network (a container left with only `lo` needs a restart), that the peers run (foldctl peers --all lists their last addresses), and the sidecar's log for dial errors",
        ),
        (n, _) => finding(Severity::Ok, "peers", format!("{n} connected peer(s)"), ""),
    }
}

pub fn bootstrap_findings(bootstrap: &[BootstrapState]) -> Vec<Finding> {
    let mut out = Vec::new();
    for b in bootstrap {
        match b.state.as_str() {
            "failed" => {
                let error = b.last_error.as_deref().unwrap_or("no error text");
                let lower = error.to_ascii_lowercase();
                let (what, fix) = if lower.contains("resolve")
                    || lower.contains("dns")
                    || lower.contains("no record")
                    || lower.contains("nxdomain")
                {
                    (
                        format!("bootstrap address {} does not resolve: {error}", b.address),
                        "fix the name in the sidecar's --bootstrap (FOLD_SIDECAR_BOOTSTRAP): check its spelling and that this host's DNS (or /etc/hosts) knows it, or use an /ip4/… address",
                    )
                } else {
                    (
                        format!("bootstrap address {} cannot be dialed: {error}", b.address),
                        "check that the bootstrap node is running and listening on that address and port, that the /p2p/ id matches it, and that nothing blocks the connection; or fix the sidecar's --bootstrap",
                    )
                };
                out.push(finding(Severity::Error, "bootstrap", what, fix));
            }
            "connected" => out.push(finding(
                Severity::Ok,
                "bootstrap",
                format!(
                    "bootstrap address {} connected{}",
                    b.address,
                    b.node_id
                        .as_deref()
                        .map(|id| format!(" to {id}"))
                        .unwrap_or_default()
                ),
                "",
            )),
            "self" => out.push(finding(
                Severity::Ok,
                "bootstrap",
                format!("bootstrap address {} is this node itself", b.address),
                "",
            )),
            _ => out.push(finding(
                Severity::Info,
                "bootstrap",
                format!(
                    "bootstrap address {}: first dial not finished yet",
                    b.address
                ),
                "",
            )),
        }
    }
    out
}

pub fn node_metric_findings(samples: &[Sample]) -> Vec<Finding> {
    let mut out = Vec::new();
    let limited: f64 = samples
        .iter()
        .filter(|s| s.name.ends_with("_rate_limited_total"))
        .map(|s| s.value)
        .sum();
    out.push(if limited > 0.0 {
        finding(
            Severity::Warning,
            "rate-limit",
            format!("{limited} request(s) were refused by the per-client rate limit (RESOURCE_EXHAUSTED)"),
            "slow the client down, or raise fold-node --rate-limit-per-client / --rate-limit-burst",
        )
    } else {
        finding(Severity::Ok, "rate-limit", "no request refused by the rate limit", "")
    });
    for s in samples
        .iter()
        .filter(|s| s.name == "fold_circuit_breaker_state" && s.value == 1.0)
    {
        let target = s.labels.get("target").cloned().unwrap_or_default();
        out.push(finding(
            Severity::Warning,
            "breaker-open",
            format!("the circuit breaker to {target} is open: requests to it fail fast with UNAVAILABLE"),
            "check that it is running and reachable (foldctl peers --all; foldctl dial ADDR); the breaker retries on its own",
        ));
    }
    let denied = sum(
        samples,
        "fold_forwards_total",
        Some(("outcome", "PermissionDenied")),
    );
    if denied > 0.0 {
        out.push(finding(
            Severity::Warning,
            "remote-denies",
            format!("{denied} forwarded request(s) were refused PERMISSION_DENIED by the remote node: it denies this node (or the fields)"),
            "on the remote node: foldctl trust set THIS_NODE_ID DIST (foldctl status shows this node's id)",
        ));
    }
    let unauth = sum(
        samples,
        "fold_forwards_total",
        Some(("outcome", "Unauthenticated")),
    );
    if unauth > 0.0 {
        out.push(finding(
            Severity::Warning,
            "remote-unauthenticated",
            format!("{unauth} forwarded request(s) were refused UNAUTHENTICATED by the remote sidecar (signature, clock skew or replay)"),
            "check both hosts' clocks (NTP); the remote's `foldctl check` names the reason",
        ));
    }
    out
}

/// What the sidecar's counters say about requests from peers.
pub fn sidecar_metric_findings(samples: &[Sample]) -> Vec<Finding> {
    let name = "fold_sidecar_inbound_requests_total";
    let mut out = Vec::new();
    let stale = sum(samples, name, Some(("outcome", "stale")));
    out.push(if stale > 0.0 {
        finding(
            Severity::Warning,
            "clock-skew",
            format!("{stale} request(s) from peers were refused: their timestamps were outside the signature window (clock skew)"),
            "synchronise the clocks of this host and its peers (NTP), or widen p2p-sidecar's allowed clock skew",
        )
    } else {
        finding(Severity::Ok, "clock-skew", "no peer request refused for clock skew", "")
    });
    let limited = sum(samples, name, Some(("outcome", "rate_limited")));
    if limited > 0.0 {
        out.push(finding(
            Severity::Warning,
            "peer-rate-limit",
            format!("{limited} request(s) from peers were refused by the per-peer rate limit"),
            "a peer sends too much: find it in the sidecar log, or raise the sidecar's per-peer limit",
        ));
    }
    let forged: f64 = ["wrong_origin", "bad_signature", "replayed"]
        .iter()
        .map(|o| sum(samples, name, Some(("outcome", o))))
        .sum();
    if forged > 0.0 {
        out.push(finding(
            Severity::Warning,
            "peer-auth",
            format!("{forged} request(s) from peers failed authentication (wrong origin, bad signature or replay)"),
            "a peer misbehaves or is misconfigured: the sidecar log names it; deny it with foldctl trust set ID deny",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(f: &[Finding]) -> Vec<(&'static str, Severity)> {
        f.iter().map(|f| (f.check, f.severity)).collect()
    }

    #[test]
    fn a_sidecar_without_connections_to_known_peers_is_named() {
        let f = peers_finding("12D3KooWB", 0, 2);
        assert_eq!(f.severity, Severity::Error);
        assert!(
            f.what.contains("12D3KooWB") && f.what.contains("2 peer(s)"),
            "{}",
            f.what
        );
        assert_eq!(peers_finding("x", 0, 0).severity, Severity::Warning);
        assert_eq!(peers_finding("x", 3, 5).severity, Severity::Ok);
    }

    #[test]
    fn failed_bootstrap_addresses_are_errors_naming_them() {
        let b = |address: &str, state: &str, err: Option<&str>| BootstrapState {
            address: address.into(),
            state: state.into(),
            last_error: err.map(String::from),
            node_id: None,
        };
        let f = bootstrap_findings(&[
            b(
                "/dns4/nope.invalid/tcp/4001",
                "failed",
                Some(
                    "Failed to negotiate transport protocol(s): [(/dns4/nope.invalid/tcp/4001: : Failed to resolve DNS address)]",
                ),
            ),
            b("/ip4/127.0.0.1/tcp/9", "failed", Some("Connection refused")),
            b("/ip4/127.0.0.1/tcp/4001", "connected", None),
            b("/dns4/me/tcp/4001", "self", None),
        ]);
        assert_eq!(
            checks(&f),
            [
                ("bootstrap", Severity::Error),
                ("bootstrap", Severity::Error),
                ("bootstrap", Severity::Ok),
                ("bootstrap", Severity::Ok)
            ]
        );
        assert!(
            f[0].what
                .contains("/dns4/nope.invalid/tcp/4001 does not resolve")
        );
        assert!(f[0].fix.contains("--bootstrap"));
        assert!(f[1].what.contains("cannot be dialed: Connection refused"));
    }

    #[test]
    fn node_counters_become_findings() {
        let body = "grpc_server_rate_limited_total 3\n\
                    fold_circuit_breaker_state{target=\"12D3KooWX\"} 1\n\
                    fold_circuit_breaker_state{target=\"12D3KooWY\"} 0\n\
                    fold_forwards_total{op=\"query\",outcome=\"PermissionDenied\"} 2\n\
                    fold_forwards_total{op=\"query\",outcome=\"OK\"} 5\n";
        let f = node_metric_findings(&parse(body));
        assert_eq!(
            checks(&f),
            [
                ("rate-limit", Severity::Warning),
                ("breaker-open", Severity::Warning),
                ("remote-denies", Severity::Warning)
            ]
        );
        assert!(f[1].what.contains("12D3KooWX"));
        let quiet = node_metric_findings(&parse(
            "fold_forwards_total{op=\"query\",outcome=\"OK\"} 5\n",
        ));
        assert_eq!(checks(&quiet), [("rate-limit", Severity::Ok)]);
    }

    #[test]
    fn sidecar_counters_become_findings() {
        let body = "fold_sidecar_inbound_requests_total{protocol=\"forward\",outcome=\"stale\"} 4\n\
                    fold_sidecar_inbound_requests_total{protocol=\"forward\",outcome=\"accepted\"} 9\n\
                    fold_sidecar_inbound_requests_total{protocol=\"schema\",outcome=\"rate_limited\"} 1\n";
        let f = sidecar_metric_findings(&parse(body));
        assert_eq!(
            checks(&f),
            [
                ("clock-skew", Severity::Warning),
                ("peer-rate-limit", Severity::Warning)
            ]
        );
        assert!(f[0].what.starts_with("4 request(s)"));
    }
}
