//! `foldctl topology`: this node and its peers (Network.Topology, plus disconnected peers from
//! ListPeers with --all) as a text tree, JSON, Graphviz DOT, or an SVG picture laid out by
//! layout-rs; `--also` merges the views of several nodes the client can reach. Asking the peers
//! for their peers needs an API the node does not offer yet (docs/FOLDCTL.md).

use std::collections::BTreeSet;

use fold_client::{Client, Peer, Topology};
use layout::backends::svg::SVGWriter;
use layout::gv::{DotParser, GraphBuilder};
use serde::Serialize;

use crate::cli::{Global, TopologyFormat};
use crate::commands::{peer_trust, rtt_text};
use crate::{Failure, Out, builder_at};

/// The merged picture of several nodes' views (`--also`).
#[derive(Debug, Serialize)]
pub struct Mesh {
    /// Every node seen; `asked` is true for the nodes whose view is included.
    pub nodes: Vec<MeshNode>,
    /// One link per connected (or, with --all, known) pair, reported by the first node asked
    /// that sees it.
    pub links: Vec<Link>,
    /// Each asked node's own view, as `foldctl topology -o json` prints it.
    pub views: Vec<Topology>,
}

#[derive(Debug, Serialize, Clone)]
pub struct MeshNode {
    pub node_id: String,
    pub asked: bool,
}

#[derive(Debug, Serialize, Clone)]
pub struct Link {
    pub from: String,
    pub to: String,
    pub connected: bool,
    pub rtt_micros: Option<u64>,
}

async fn view(c: &Client, all: bool) -> Result<Topology, Failure> {
    let mut topo = c.topology().await?;
    if all {
        for p in c.peers(true).await? {
            if !topo.peers.iter().any(|q| q.node_id == p.node_id) {
                topo.peers.push(p);
            }
        }
    }
    topo.peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(topo)
}

/// Merge views: nodes in order of appearance, links deduplicated as unordered pairs.
pub fn merge(views: Vec<Topology>) -> Mesh {
    let mut nodes: Vec<MeshNode> = Vec::new();
    let add = |id: &str, asked: bool, nodes: &mut Vec<MeshNode>| match nodes
        .iter_mut()
        .find(|n| n.node_id == id)
    {
        Some(n) => n.asked |= asked,
        None => nodes.push(MeshNode {
            node_id: id.to_string(),
            asked,
        }),
    };
    let mut links = Vec::new();
    let mut seen = BTreeSet::new();
    for v in &views {
        add(&v.node_id, true, &mut nodes);
        for p in &v.peers {
            add(&p.node_id, false, &mut nodes);
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
    }
    Mesh {
        nodes,
        links,
        views,
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
) -> Result<Out, Failure> {
    let first = view(c, all).await?;
    if also.is_empty() {
        let json = json_of(&first)?;
        let text = match format {
            None | Some(TopologyFormat::Text) => tree(&first),
            Some(TopologyFormat::Json) => pretty(&json)?,
            Some(TopologyFormat::Dot) => dot(&merge(vec![first])),
            Some(TopologyFormat::Svg) => svg(&dot(&merge(vec![first])))?,
        };
        return Ok(picture(format, json, text));
    }
    let mut views = vec![first];
    for addr in also {
        let client = builder_at(g, addr).connect().await?;
        views.push(view(&client, all).await?);
    }
    let mesh = merge(views);
    let json = json_of(&mesh)?;
    let text = match format {
        None | Some(TopologyFormat::Text) => {
            let mut t: Vec<String> = mesh.views.iter().map(tree).collect();
            t.push(format!(
                "{} node(s), {} link(s), {} node(s) asked\n",
                mesh.nodes.len(),
                mesh.links.len(),
                mesh.views.len()
            ));
            t.join("\n")
        }
        Some(TopologyFormat::Json) => pretty(&json)?,
        Some(TopologyFormat::Dot) => dot(&mesh),
        Some(TopologyFormat::Svg) => svg(&dot(&mesh))?,
    };
    Ok(picture(format, json, text))
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
pub fn tree(t: &Topology) -> String {
    let mut out = format!("{} (this node)\n", t.node_id);
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

/// Graphviz DOT: one box per node id (nodes whose view was asked drawn bold), one edge per
/// link (dashed when not connected), labelled with the RTT.
pub fn dot(m: &Mesh) -> String {
    // One node's view is a star: left to right, its peers stacked on the right (node ids are
    // long). A merged mesh is laid out top to bottom, which keeps it about as wide as an id.
    let mut out = String::from("digraph mesh {\n");
    if m.views.len() <= 1 {
        out.push_str("  rankdir=LR;\n");
    }
    for n in &m.nodes {
        let extra = if n.asked { ", style=bold" } else { "" };
        out.push_str(&format!(
            "  {} [shape=box, label={}{extra}];\n",
            quote(&n.node_id),
            quote(&n.node_id)
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

    fn topo() -> Topology {
        let peer = |id: &str, connected| Peer {
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
        };
        Topology {
            node_id: "12D3KooWSelf".into(),
            peers: vec![peer("12D3KooWA", true), peer("12D3KooWB", false)],
        }
    }

    #[test]
    fn merges_views_without_duplicate_links() {
        let a = topo();
        let b = Topology {
            node_id: "12D3KooWA".into(),
            peers: vec![Peer {
                node_id: "12D3KooWSelf".into(),
                ..a.peers[0].clone()
            }],
        };
        let m = merge(vec![a, b]);
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
    }

    #[test]
    fn a_lone_node_is_a_picture_too() {
        let lone = Topology {
            node_id: "12D3KooWLone".into(),
            peers: vec![],
        };
        assert!(tree(&lone).contains("└── (no peers)"));
        let s = svg(&dot(&merge(vec![lone]))).unwrap();
        assert!(s.contains("12D3KooWLone"));
    }

    #[test]
    fn renders_every_node() {
        let t = topo();
        let tree = tree(&t);
        assert!(tree.contains("12D3KooWSelf (this node)") && tree.contains("└── 12D3KooWB"));
        let d = dot(&merge(vec![t.clone()]));
        assert!(d.contains("\"12D3KooWSelf\" -> \"12D3KooWA\""), "{d}");
        let s = svg(&d).unwrap();
        assert!(s.contains("<svg width=\"100%\" viewBox="), "{s}");
        for id in ["12D3KooWSelf", "12D3KooWA", "12D3KooWB"] {
            assert!(s.contains(id), "{id} missing from the SVG");
        }
    }
}
