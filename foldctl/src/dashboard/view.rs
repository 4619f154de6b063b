//! What the dashboard shows, and how one refresh gathers it: the same read-only calls as
//! `topology` (Network.Topology), `peers` (ListPeers), `status` (Network.Status), `check` (its
//! whole diagnosis) and `top` (two scrapes of each process's /metrics), plus FindProviders for
//! the schemas of nodes that were not asked themselves. Never a management call.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fold_client::{MeshTopology, NetworkStatus, NodeError, Peer};
use serde::Serialize;

use crate::check::{AdminFlags, Finding, Severity, diagnose};
use crate::cli::Global;
use crate::replica_check::{Cause, cause};
use crate::top::{Counts, Key, Summary, scrape_one, summary};
use crate::topology::{Mesh, merge};
use crate::{builder_at, short_id};

/// Most schemas whose providers are looked up per refresh.
const MAX_PROVIDER_LOOKUPS: usize = 16;
/// Longest agent string kept (a peer chooses it).
const MAX_AGENT_CHARS: usize = 256;
/// Most problems shown (the worst first).
const MAX_PROBLEMS: usize = 200;

/// The whole page's data, as the browser receives it (`/api/view`).
#[derive(Debug, Serialize, Clone, Default)]
pub struct View {
    /// When this view was gathered (Unix ms).
    pub generated_unix_ms: u64,
    /// How long gathering took.
    pub gather_ms: u64,
    /// Time between refreshes.
    pub refresh_ms: u64,
    /// The node --addr points at, and its id.
    pub addr: String,
    pub self_id: String,
    pub nodes: Vec<NodeView>,
    pub links: Vec<LinkView>,
    /// What `check` finds on each node asked (no OK findings), the worst first.
    pub problems: Vec<Problem>,
    /// What could not be gathered this time.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct NodeView {
    pub id: String,
    pub short: String,
    /// The node --addr points at.
    pub this: bool,
    /// Its own status was read (--addr or --also).
    pub asked: bool,
    pub hops: Option<u32>,
    /// "ok", "denied" (this node's trust table denies it, or it refused to be asked),
    /// "unreachable" (could not be asked, or known but not connected).
    pub state: String,
    /// Why, in words (empty when ok).
    pub state_detail: String,
    pub agent: String,
    pub addrs: Vec<String>,
    pub schemas: Vec<String>,
    pub replicas: Vec<ReplicaView>,
    pub traffic: Option<Summary>,
    pub admin: Vec<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ReplicaView {
    pub schema: String,
    pub source: String,
    pub applied: u64,
    pub head: u64,
    pub lag: u64,
    pub error: Option<String>,
    /// "not trusted by the source", "diverged", … (`null` when it is in step).
    pub cause: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct LinkView {
    pub from: String,
    pub to: String,
    pub connected: bool,
    pub rtt_micros: Option<u64>,
    /// Through a circuit relay.
    pub relayed: bool,
    /// One side's trust table denies the other.
    pub denied: bool,
    pub transport: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Problem {
    /// The node it was found on.
    pub node: String,
    #[serde(flatten)]
    pub finding: Finding,
}

/// The state kept between refreshes: the last scrape of each admin port and the last status of
/// each node asked (for rates and lag trends).
#[derive(Default)]
pub struct Gatherer {
    scrapes: BTreeMap<String, (Instant, BTreeMap<Key, Counts>)>,
    statuses: BTreeMap<String, NetworkStatus>,
}

/// One asked node's part of a view.
struct Asked {
    status: Option<NetworkStatus>,
    peers: Vec<Peer>,
    findings: Vec<Finding>,
    traffic: Option<Summary>,
    admin: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Gatherer {
    /// One refresh: every asked node (--addr first, then --also), the mesh around them, and
    /// the schemas of the others.
    pub async fn gather(
        &mut self,
        g: &Global,
        also: &[String],
        hops: u32,
        refresh: Duration,
    ) -> View {
        let started = Instant::now();
        let mut view = View {
            refresh_ms: u64::try_from(refresh.as_millis()).unwrap_or(u64::MAX),
            addr: g.addr.clone(),
            ..View::default()
        };
        let addrs: Vec<String> = std::iter::once(g.addr.clone())
            .chain(also.iter().cloned())
            .collect();
        let mut asked: Vec<(String, Asked)> = Vec::new();
        let mut topologies = Vec::new();
        for addr in &addrs {
            let ga = Global {
                addr: addr.clone(),
                ..g.clone()
            };
            let a = self.ask(&ga).await;
            match self.topology(&ga, hops).await {
                Ok(t) => topologies.push(t),
                Err(e) => view.errors.push(format!("topology from {addr}: {e}")),
            }
            asked.push((addr.clone(), a));
        }
        // States are this node's view: a node that refuses it is marked even when another
        // node asked with --also could ask it.
        let refusals: BTreeMap<String, NodeError> = topologies
            .first()
            .map(|t| {
                t.nodes
                    .iter()
                    .filter_map(|n| Some((n.node_id.clone(), n.error.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let mesh = merge(topologies);
        view.self_id = asked
            .first()
            .and_then(|(_, a)| a.status.as_ref().map(|s| s.node_id.clone()))
            .unwrap_or_else(|| mesh.node_id.clone());
        view.nodes = nodes(&view.self_id, &mesh, &asked, &refusals);
        view.links = links(&mesh);
        self.provider_schemas(g, &mut view).await;
        view.problems = problems(&asked, &view.self_id);
        for (addr, a) in &asked {
            if a.status.is_none() {
                view.errors.push(format!(
                    "{addr}: Network.Status did not answer (see the problems)"
                ));
            }
        }
        view.generated_unix_ms = now_ms();
        view.gather_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        view
    }

    /// `check`'s diagnosis of one node (which reads its status, peers and admin ports), and its
    /// traffic since the last refresh.
    async fn ask(&mut self, g: &Global) -> Asked {
        let before = self.statuses.get(&g.addr).cloned();
        let d = diagnose(g, AdminFlags::default(), before.as_ref(), false).await;
        if let Some(s) = &d.status {
            self.statuses.insert(g.addr.clone(), s.clone());
        }
        let (node_admin, sidecar_admin) = &d.admin;
        let mut traffic = None;
        if let Ok(now) = scrape_one(&node_admin.addr).await {
            let at = Instant::now();
            if let Some((then, before)) = self.scrapes.get(&node_admin.addr) {
                traffic = Some(summary(
                    before,
                    &now,
                    at.duration_since(*then).as_secs_f64(),
                ));
            }
            self.scrapes.insert(node_admin.addr.clone(), (at, now));
        }
        Asked {
            status: d.status,
            peers: d.peers,
            findings: d.findings,
            traffic,
            admin: vec![node_admin.addr.clone(), sidecar_admin.addr.clone()],
        }
    }

    async fn topology(&self, g: &Global, hops: u32) -> Result<MeshTopology, String> {
        let c = builder_at(g, &g.addr)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let budget = g
            .timeout
            .saturating_sub((g.timeout / 5).min(Duration::from_secs(1)));
        let mut t = c
            .mesh_topology(hops, budget)
            .await
            .map_err(|e| e.to_string())?;
        // Known but disconnected peers of the asked node too (as `topology --all`).
        if let (Some(own), Ok(all)) = (t.nodes.first_mut(), c.peers(true).await) {
            for p in all {
                if !own.peers.iter().any(|q| q.node_id == p.node_id) {
                    own.peers.push(p);
                }
            }
        }
        Ok(t)
    }

    /// The schemas of nodes not asked themselves: who provides each schema the asked nodes
    /// know (FindProviders, a read-only DHT lookup), bounded in count and time.
    async fn provider_schemas(&self, g: &Global, view: &mut View) {
        let names: BTreeSet<String> = view
            .nodes
            .iter()
            .filter(|n| n.asked)
            .flat_map(|n| n.schemas.iter().cloned())
            .take(MAX_PROVIDER_LOOKUPS)
            .collect();
        if names.is_empty() || view.nodes.iter().all(|n| n.asked) {
            return;
        }
        let Ok(c) = builder_at(g, &g.addr).connect().await else {
            return;
        };
        let mut set = tokio::task::JoinSet::new();
        for name in names {
            let c = c.clone();
            let limit = g.timeout.min(Duration::from_secs(3));
            set.spawn(async move {
                let ids = tokio::time::timeout(limit, c.providers(&name)).await;
                (name, ids)
            });
        }
        while let Some(Ok((name, ids))) = set.join_next().await {
            let Ok(Ok(ids)) = ids else { continue };
            for n in view
                .nodes
                .iter_mut()
                .filter(|n| !n.asked && ids.contains(&n.id))
            {
                if !n.schemas.contains(&name) {
                    n.schemas.push(name.clone());
                }
            }
        }
        for n in &mut view.nodes {
            n.schemas.sort();
        }
    }
}

/// Every node of the mesh with its state, and for the asked ones their status and traffic.
fn nodes(
    self_id: &str,
    mesh: &Mesh,
    asked: &[(String, Asked)],
    refusals: &BTreeMap<String, NodeError>,
) -> Vec<NodeView> {
    let peer_of = |id: &str| -> Option<&Peer> {
        mesh.views
            .iter()
            .flat_map(|v| v.peers.iter())
            .find(|p| p.node_id == id)
    };
    let own_peers: Vec<&Peer> = asked
        .first()
        .map(|(_, a)| a.peers.iter().collect())
        .unwrap_or_default();
    let mut out: Vec<NodeView> = mesh
        .nodes
        .iter()
        .map(|n| {
            let mut v = NodeView {
                id: n.node_id.clone(),
                short: short_id(&n.node_id),
                this: n.node_id == self_id,
                hops: n.hops,
                state: "ok".into(),
                ..NodeView::default()
            };
            if let Some(p) = peer_of(&n.node_id) {
                v.agent = p.agent.chars().take(MAX_AGENT_CHARS).collect();
                v.addrs = p.addrs.clone();
            }
            let own = own_peers.iter().find(|p| p.node_id == n.node_id);
            let error = refusals.get(&n.node_id).or(n.error.as_ref());
            (v.state, v.state_detail) = state(error, own.copied());
            v
        })
        .collect();
    if out.is_empty() && !self_id.is_empty() {
        out.push(NodeView {
            id: self_id.to_string(),
            short: short_id(self_id),
            this: true,
            state: "ok".into(),
            ..NodeView::default()
        });
    }
    for (_, a) in asked {
        let Some(s) = &a.status else { continue };
        if let Some(v) = out.iter_mut().find(|v| v.id == s.node_id) {
            v.asked = true;
            v.schemas = s.provided_schemas.clone();
            v.replicas = s.replicas.iter().map(replica_view).collect();
            v.traffic = a.traffic.clone();
            v.admin = a.admin.clone();
            if v.this {
                (v.state, v.state_detail) = ("ok".into(), String::new());
            }
        }
    }
    out
}

/// A node's state: refused to be asked (denied), could not be asked (unreachable), denied by
/// this node's trust table, known but not connected, or ok.
fn state(error: Option<&NodeError>, own: Option<&Peer>) -> (String, String) {
    if let Some(e) = error {
        let denied = e.code == "PERMISSION_DENIED";
        return (
            if denied { "denied" } else { "unreachable" }.into(),
            format!("{}: {}", e.code, e.message),
        );
    }
    match own {
        Some(p) if p.denied => (
            "denied".into(),
            "this node's trust table denies it: its requests are refused".into(),
        ),
        Some(p) if !p.connected => ("unreachable".into(), "known, not connected".into()),
        _ => ("ok".into(), String::new()),
    }
}

fn replica_view(r: &fold_client::Replica) -> ReplicaView {
    ReplicaView {
        schema: r.schema.clone(),
        source: r.source_node_id.clone(),
        applied: r.applied_sequence,
        head: r.source_head_sequence,
        lag: r.lag,
        cause: r.last_error.as_deref().map(|e| {
            match cause(e) {
                Cause::NotTrusted => "not trusted by the source",
                Cause::Diverged => "diverged from the source",
                Cause::BehindRetention => "behind the source's retention",
                Cause::Unreachable => "source unreachable",
                Cause::SchemaMissing => "schema not approved here",
                Cause::Other => "failing",
            }
            .to_string()
        }),
        error: r.last_error.clone(),
    }
}

/// The merged links, each with how it runs (relayed, transport) and whether a side denies the
/// other, as the views that report it say.
pub fn links(mesh: &Mesh) -> Vec<LinkView> {
    let report = |a: &str, b: &str| -> Vec<&Peer> {
        mesh.views
            .iter()
            .filter(|v| v.node_id == a)
            .flat_map(|v| v.peers.iter().filter(move |p| p.node_id == b))
            .collect()
    };
    mesh.links
        .iter()
        .map(|l| {
            let mut seen = report(&l.from, &l.to);
            seen.extend(report(&l.to, &l.from));
            LinkView {
                from: l.from.clone(),
                to: l.to.clone(),
                connected: l.connected,
                rtt_micros: l.rtt_micros,
                relayed: seen
                    .iter()
                    .any(|p| p.connection.as_deref() == Some("relayed")),
                denied: seen.iter().any(|p| p.denied),
                transport: seen.iter().find_map(|p| p.transport.clone()),
            }
        })
        .collect()
}

/// Every finding worth attention (not OK), errors first, named by node.
fn problems(asked: &[(String, Asked)], self_id: &str) -> Vec<Problem> {
    let mut out: Vec<Problem> = asked
        .iter()
        .flat_map(|(addr, a)| {
            let node = a
                .status
                .as_ref()
                .map_or_else(|| addr.clone(), |s| s.node_id.clone());
            a.findings
                .iter()
                .filter(|f| f.severity > Severity::Ok)
                .map(move |f| Problem {
                    node: node.clone(),
                    finding: f.clone(),
                })
        })
        .collect();
    out.sort_by(|a, b| {
        b.finding
            .severity
            .cmp(&a.finding.severity)
            .then_with(|| (a.node != self_id).cmp(&(b.node != self_id)))
    });
    out.truncate(MAX_PROBLEMS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_client::MeshNodeView;

    fn peer(id: &str, connection: &str, denied: bool) -> Peer {
        Peer {
            node_id: id.into(),
            addrs: vec![],
            connected: true,
            rtt_micros: Some(900),
            agent: "<script>alert(1)</script>".into(),
            protocols: vec![],
            source: "dial".into(),
            trust_distance: (!denied).then_some(1),
            denied,
            connection: Some(connection.into()),
            transport: Some("tcp".into()),
            breaker: None,
            route_latency_micros: None,
            route_in_flight: 0,
            route_requests: 0,
            route_failures: 0,
        }
    }

    #[test]
    fn links_say_relayed_and_denied_and_nodes_their_state() {
        let t = MeshTopology {
            node_id: "A".into(),
            nodes: vec![
                MeshNodeView {
                    node_id: "A".into(),
                    hops: 0,
                    peers: vec![peer("B", "relayed", false), peer("C", "direct", true)],
                    error: None,
                },
                MeshNodeView {
                    node_id: "B".into(),
                    hops: 1,
                    peers: vec![],
                    error: Some(NodeError {
                        code: "PERMISSION_DENIED".into(),
                        message: "not trusted".into(),
                    }),
                },
            ],
            nodes_not_asked: 0,
        };
        let mesh = merge(vec![t]);
        let l = links(&mesh);
        let ab = l.iter().find(|l| l.to == "B").unwrap();
        assert!(ab.relayed && !ab.denied);
        let ac = l.iter().find(|l| l.to == "C").unwrap();
        assert!(!ac.relayed && ac.denied);
        let own = vec![peer("B", "relayed", false), peer("C", "direct", true)];
        let asked = vec![(
            "a".to_string(),
            Asked {
                status: None,
                peers: own,
                findings: vec![],
                traffic: None,
                admin: vec![],
            },
        )];
        let n = nodes("A", &mesh, &asked, &BTreeMap::new());
        let st = |id: &str| n.iter().find(|v| v.id == id).unwrap().state.clone();
        assert_eq!(st("A"), "ok");
        assert_eq!(st("B"), "denied");
        assert_eq!(st("C"), "denied");
        assert!(n.iter().find(|v| v.id == "A").unwrap().this);
        // Agent strings pass through as data; the page renders them as text.
        assert_eq!(
            n.iter().find(|v| v.id == "B").unwrap().agent,
            "<script>alert(1)</script>"
        );
    }
}
