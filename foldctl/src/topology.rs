//! `foldctl topology`: the mesh around a node as a text tree, JSON, Graphviz DOT, or an SVG
//! picture laid out by layout-rs. The node gathers it (`Network.Topology` with `max_hops`): it asks
//! its peers for their peers over the mesh, breadth-first up to `--hops`, within `--timeout`;
//! nodes that could not be asked are shown with their error. `--all` adds the asked node's known
//! but disconnected peers; `--also` merges the gatherings of several nodes the client can reach.

use std::collections::BTreeSet;
use std::time::Duration;

use fold_client::{Client, MeshTopology, NodeError, Peer, Topology};
use layout::backends::svg::SVGWriter;
use layout::gv::{DotParser, GraphBuilder};
use serde::Serialize;

use crate::cli::{Global, TopologyFormat};
use crate::table::{peer_trust, rtt_text};
use crate::{Failure, Out, builder_at};

/// The merged picture of one or several gatherings.
#[derive(Debug, Serialize)]
pub struct Mesh {
    /// The node `--addr` points at.
    pub node_id: String,
    /// Its peers (as `foldctl peers` shows them).
    pub peers: Vec<Peer>,
    /// Every node seen: `asked` is true for the nodes whose view is included; `error` says why
    /// a node could not be asked.
    pub nodes: Vec<MeshNode>,
    /// One link per connected (or, with --all, known) pair, reported by the first node asked
    /// that sees it.
    pub links: Vec<Link>,
    /// Each asked node's own view: its id and peers.
    pub views: Vec<Topology>,
    /// Nodes found within the hops but not asked because of the node's limit (256 nodes).
    pub nodes_not_asked: u32,
}

#[derive(Debug, Serialize, Clone)]
pub struct MeshNode {
    pub node_id: String,
    pub asked: bool,
    /// Hops from the node that asked it (`null` for a node only seen as a peer).
    pub hops: Option<u32>,
    /// Why it could not be asked (`null` when it answered or was not asked).
    pub error: Option<NodeError>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Link {
    pub from: String,
    pub to: String,
    pub connected: bool,
    pub rtt_micros: Option<u64>,
}

/// One node's gathering, with `--all`'s disconnected peers added to the node's own view.
async fn gather(
    c: &Client,
    all: bool,
    hops: u32,
    budget: Duration,
) -> Result<MeshTopology, Failure> {
    let mut topo = c.mesh_topology(hops, budget).await?;
    if all && let Some(own) = topo.nodes.first_mut() {
        for p in c.peers(true).await? {
            if !own.peers.iter().any(|q| q.node_id == p.node_id) {
                own.peers.push(p);
            }
        }
    }
    for n in &mut topo.nodes {
        n.peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    }
    Ok(topo)
}

/// Merge gatherings: nodes in order of appearance (each view once), links deduplicated as
/// unordered pairs; a node that answered one gathering is not an error of another.
pub fn merge(gatherings: Vec<MeshTopology>) -> Mesh {
    let mut nodes: Vec<MeshNode> = Vec::new();
    let mut views: Vec<Topology> = Vec::new();
    let mut links = Vec::new();
    let mut seen = BTreeSet::new();
    let mut not_asked = 0u32;
    let mut head: Option<(String, Vec<Peer>)> = None;
    fn add<'a>(nodes: &'a mut Vec<MeshNode>, id: &str) -> &'a mut MeshNode {
        let i = match nodes.iter().position(|n| n.node_id == id) {
            Some(i) => i,
            None => {
                nodes.push(MeshNode {
                    node_id: id.to_string(),
                    asked: false,
                    hops: None,
                    error: None,
                });
                nodes.len() - 1
            }
        };
        &mut nodes[i]
    }
    for g in gatherings {
        not_asked = not_asked.saturating_add(g.nodes_not_asked);
        for v in g.nodes {
            if head.is_none() {
                head = Some((v.node_id.clone(), v.peers.clone()));
            }
            let n = add(&mut nodes, &v.node_id);
            n.hops = Some(n.hops.map_or(v.hops, |h| h.min(v.hops)));
            if let Some(e) = v.error {
                if !n.asked {
                    n.error = Some(e);
                }
                continue;
            }
            if n.asked {
                continue;
            }
            n.asked = true;
            n.error = None;
            for p in &v.peers {
                add(&mut nodes, &p.node_id);
                let pair = if v.node_id < p.node_id {
                    (v.node_id.clone(), p.node_id.clone())
                } else {
                    (p.node_id.clone(), v.node_id.clone())
                };
                if seen.insert(pair) {
                    links.push(Link {
                        from: v.node_id.clone(),
                        to: p.node_id.clone(),
                        connected: p.connected,
                        rtt_micros: p.rtt_micros,
                    });
                }
            }
            views.push(Topology {
                node_id: v.node_id,
                peers: v.peers,
            });
        }
    }
    let (node_id, peers) = head.unwrap_or_default();
    Mesh {
        node_id,
        peers,
        nodes,
        links,
        views,
        nodes_not_asked: not_asked,
    }
}

fn json_of<T: Serialize>(v: &T) -> Result<serde_json::Value, Failure> {
    serde_json::to_value(v).map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))
}

pub async fn run(
    c: &Client,
    g: &Global,
    format: Option<TopologyFormat>,
    all: bool,
    also: &[String],
    hops: u32,
) -> Result<Out, Failure> {
    // The node may gather for --timeout, less a margin for the answer to come back.
    let budget = g
        .timeout
        .saturating_sub((g.timeout / 5).min(Duration::from_secs(1)));
    let progress = hops > 0 && std::io::IsTerminal::is_terminal(&std::io::stderr());
    if progress {
        eprintln!(
            "gathering the topology: up to {hops} hop(s) from {}, for at most {:.1} s…",
            g.addr,
            budget.as_secs_f64()
        );
    }
    let mut gatherings = vec![gather(c, all, hops, budget).await?];
    for addr in also {
        if progress {
            eprintln!("gathering from {addr}…");
        }
        let client = builder_at(g, addr).connect().await?;
        gatherings.push(gather(&client, all, hops, budget).await?);
    }
    let mesh = merge(gatherings);
    if progress {
        let failed = mesh.nodes.iter().filter(|n| n.error.is_some()).count();
        eprintln!(
            "asked {} node(s); {failed} could not be asked",
            mesh.views.len() + failed
        );
    }
    let json = json_of(&mesh)?;
    let text = match format {
        None | Some(TopologyFormat::Text) => text(&mesh),
        Some(TopologyFormat::Json) => pretty(&json)?,
        Some(TopologyFormat::Dot) => dot(&mesh),
        Some(TopologyFormat::Svg) => svg(&dot(&mesh))?,
    };
    Ok(picture(format, json, text))
}

/// The text picture: one tree per asked node (the first is the node asked), the nodes that
/// could not be asked with their errors, and a summary line.
pub fn text(m: &Mesh) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (i, v) in m.views.iter().enumerate() {
        let label = if i == 0 {
            "this node".to_string()
        } else {
            match m
                .nodes
                .iter()
                .find(|n| n.node_id == v.node_id)
                .and_then(|n| n.hops)
            {
                Some(h) => format!("{h} hop(s) away"),
                None => "asked".to_string(),
            }
        };
        parts.push(tree(v, &label));
    }
    let failed: Vec<&MeshNode> = m.nodes.iter().filter(|n| n.error.is_some()).collect();
    if !failed.is_empty() {
        let mut t = String::from("could not be asked:\n");
        for n in &failed {
            if let Some(e) = &n.error {
                t.push_str(&format!("✗ {}  {}: {}\n", n.node_id, e.code, e.message));
            }
        }
        parts.push(t);
    }
    if m.views.len() > 1 || !failed.is_empty() || m.nodes_not_asked > 0 {
        let mut summary = format!(
            "{} node(s), {} link(s), {} node(s) asked",
            m.nodes.len(),
            m.links.len(),
            m.views.len()
        );
        if !failed.is_empty() {
            summary.push_str(&format!(", {} could not be asked", failed.len()));
        }
        if m.nodes_not_asked > 0 {
            summary.push_str(&format!(
                ", {} not asked (node limit reached)",
                m.nodes_not_asked
            ));
        }
        summary.push('\n');
        parts.push(summary);
    }
    parts.join("\n")
}

fn pretty(json: &serde_json::Value) -> Result<String, Failure> {
    serde_json::to_string_pretty(json)
        .map(|s| format!("{s}\n"))
        .map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))
}

/// An explicit --format is a picture: printed as is whatever -o says.
fn picture(format: Option<TopologyFormat>, json: serde_json::Value, text: String) -> Out {
    if format.is_some() {
        Out::text_only(text)
    } else {
        Out { json, text }
    }
}

fn peer_line(p: &Peer) -> String {
    let state = if p.connected {
        "connected"
    } else {
        "disconnected"
    };
    let mut s = format!(
        "{}  {state}  rtt {}  trust {}",
        p.node_id,
        rtt_text(p),
        peer_trust(p)
    );
    if !p.agent.is_empty() {
        s.push_str(&format!("  agent {}", p.agent));
    }
    if let Some(a) = p.addrs.first() {
        s.push_str(&format!("  {a}"));
    }
    s
}

/// A text tree: the node, then one branch per peer.
pub fn tree(t: &Topology, label: &str) -> String {
    let mut out = format!("{} ({label})\n", t.node_id);
    let n = t.peers.len();
    for (i, p) in t.peers.iter().enumerate() {
        let branch = if i + 1 == n {
            "└── "
        } else {
            "├── "
        };
        out.push_str(branch);
        out.push_str(&peer_line(p));
        out.push('\n');
    }
    if n == 0 {
        out.push_str("└── (no peers)\n");
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Graphviz DOT: one box per node id (nodes whose view was asked drawn bold, nodes that could
/// not be asked dashed in red and labelled with the error code), one edge per link (dashed when
/// not connected), labelled with the RTT.
pub fn dot(m: &Mesh) -> String {
    // One node's view is a star: left to right, its peers stacked on the right (node ids are
    // long). A merged mesh is laid out top to bottom, which keeps it about as wide as an id.
    let mut out = String::from("digraph mesh {\n");
    if m.views.len() <= 1 {
        out.push_str("  rankdir=LR;\n");
    }
    for n in &m.nodes {
        let (label, extra) = match &n.error {
            Some(e) => (
                format!("{} ✗ {}", n.node_id, e.code),
                ", style=dashed, color=red",
            ),
            None if n.asked => (n.node_id.clone(), ", style=bold"),
            None => (n.node_id.clone(), ""),
        };
        out.push_str(&format!(
            "  {} [shape=box, label={}{extra}];\n",
            quote(&n.node_id),
            quote(&label)
        ));
    }
    for l in &m.links {
        let style = if l.connected { "solid" } else { "dashed" };
        let rtt = l
            .rtt_micros
            .map(|us| format!("{:.2} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  {} -> {} [label={}, style={style}];\n",
            quote(&l.from),
            quote(&l.to),
            quote(&rtt)
        ));
    }
    out.push_str("}\n");
    out
}

/// Lay out a DOT graph with layout-rs and render it as SVG.
pub fn svg(dot: &str) -> Result<String, Failure> {
    let mut parser = DotParser::new(dot);
    let graph = parser
        .process()
        .map_err(|e| Failure::Local(format!("cannot lay out the topology: {e}")))?;
    let mut builder = GraphBuilder::new();
    builder.visit_graph(&graph);
    let mut vg = builder.get();
    let mut writer = SVGWriter::new();
    vg.do_it(false, false, false, &mut writer);
    Ok(fit_to_window(&writer.finalize()))
}

/// Let the picture scale to the browser window: drop the root's fixed `width`/`height` (the
/// `viewBox` keeps the proportions) and say `width="100%"`.
fn fit_to_window(svg: &str) -> String {
    let Some(start) = svg.find("<svg ") else {
        return svg.to_string();
    };
    let Some(len) = svg[start..].find("viewBox=") else {
        return svg.to_string();
    };
    let head = &svg[start..start + len];
    if !head.contains("width=") {
        return svg.to_string();
    }
    format!(
        "{}<svg width=\"100%\" {}",
        &svg[..start],
        &svg[start + len..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_client::MeshNodeView;

    fn peer(id: &str, connected: bool) -> Peer {
        Peer {
            node_id: id.into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            connected,
            rtt_micros: Some(420),
            agent: "p2p-sidecar/0.1.0".into(),
            protocols: vec![],
            source: "dial".into(),
            trust_distance: Some(1),
            denied: false,
            connection: connected.then(|| "direct".to_string()),
            transport: connected.then(|| "tcp".to_string()),
            breaker: None,
            route_latency_micros: None,
            route_in_flight: 0,
            route_requests: 0,
            route_failures: 0,
        }
    }

    fn view(id: &str, hops: u32, peers: Vec<Peer>) -> MeshNodeView {
        MeshNodeView {
            node_id: id.into(),
            hops,
            peers,
            error: None,
        }
    }

    fn gathering(nodes: Vec<MeshNodeView>) -> MeshTopology {
        MeshTopology {
            node_id: nodes[0].node_id.clone(),
            nodes,
            nodes_not_asked: 0,
        }
    }

    fn star() -> MeshTopology {
        gathering(vec![view(
            "12D3KooWSelf",
            0,
            vec![peer("12D3KooWA", true), peer("12D3KooWB", false)],
        )])
    }

    #[test]
    fn merges_views_without_duplicate_links() {
        let g = gathering(vec![
            view(
                "12D3KooWSelf",
                0,
                vec![peer("12D3KooWA", true), peer("12D3KooWB", false)],
            ),
            view("12D3KooWA", 1, vec![peer("12D3KooWSelf", true)]),
        ]);
        let m = merge(vec![g]);
        let ids: Vec<_> = m
            .nodes
            .iter()
            .map(|n| (n.node_id.as_str(), n.asked))
            .collect();
        assert_eq!(
            ids,
            [
                ("12D3KooWSelf", true),
                ("12D3KooWA", true),
                ("12D3KooWB", false)
            ]
        );
        assert_eq!(m.links.len(), 2, "A-Self is one link: {:?}", m.links);
        assert_eq!(m.node_id, "12D3KooWSelf");
        assert_eq!(m.peers.len(), 2);
    }

    #[test]
    fn nodes_that_could_not_be_asked_are_shown() {
        let mut denied = view("12D3KooWC", 1, vec![]);
        denied.error = Some(NodeError {
            code: "PERMISSION_DENIED".into(),
            message: "not trusted".into(),
        });
        let g = gathering(vec![
            view("12D3KooWSelf", 0, vec![peer("12D3KooWC", true)]),
            denied,
        ]);
        let m = merge(vec![g]);
        let c = m.nodes.iter().find(|n| n.node_id == "12D3KooWC").unwrap();
        assert!(!c.asked);
        assert_eq!(c.error.as_ref().unwrap().code, "PERMISSION_DENIED");
        let t = text(&m);
        assert!(
            t.contains("✗ 12D3KooWC  PERMISSION_DENIED: not trusted"),
            "{t}"
        );
        assert!(t.contains("1 could not be asked"), "{t}");
        let d = dot(&m);
        assert!(d.contains("12D3KooWC ✗ PERMISSION_DENIED"), "{d}");
        assert!(svg(&d).unwrap().contains("12D3KooWC"));
        // Answered in another gathering: not an error any more.
        let again = gathering(vec![view("12D3KooWC", 0, vec![])]);
        let g = gathering(vec![
            view("12D3KooWSelf", 0, vec![peer("12D3KooWC", true)]),
            MeshNodeView {
                error: Some(NodeError {
                    code: "UNAVAILABLE".into(),
                    message: "x".into(),
                }),
                ..view("12D3KooWC", 1, vec![])
            },
        ]);
        let m = merge(vec![g, again]);
        let c = m.nodes.iter().find(|n| n.node_id == "12D3KooWC").unwrap();
        assert!(c.asked && c.error.is_none());
    }

    #[test]
    fn a_lone_node_is_a_picture_too() {
        let lone = merge(vec![gathering(vec![view("12D3KooWLone", 0, vec![])])]);
        assert!(text(&lone).contains("└── (no peers)"));
        let s = svg(&dot(&lone)).unwrap();
        assert!(s.contains("12D3KooWLone"));
    }

    #[test]
    fn renders_every_node() {
        let m = merge(vec![star()]);
        let tree = text(&m);
        assert!(tree.contains("12D3KooWSelf (this node)") && tree.contains("└── 12D3KooWB"));
        let d = dot(&m);
        assert!(d.contains("\"12D3KooWSelf\" -> \"12D3KooWA\""), "{d}");
        let s = svg(&d).unwrap();
        assert!(s.contains("<svg width=\"100%\" viewBox="), "{s}");
        for id in ["12D3KooWSelf", "12D3KooWA", "12D3KooWB"] {
            assert!(s.contains(id), "{id} missing from the SVG");
        }
    }
}
