//! `foldctl topology`: this node and its peers (Network.Topology, plus disconnected peers from
//! ListPeers with --all) as a text tree, JSON, Graphviz DOT, or an SVG picture laid out by
//! layout-rs. A client sees only the node it talks to and that node's peers: asking the peers for
//! their peers needs an API the node does not offer yet (docs/FOLDCTL.md).

use fold_client::{Client, Peer, Topology};
use layout::backends::svg::SVGWriter;
use layout::gv::{DotParser, GraphBuilder};

use crate::cli::{Global, Output, TopologyFormat};
use crate::commands::{peer_trust, rtt_text};
use crate::{Failure, Out};

pub async fn run(
    c: &Client,
    g: &Global,
    format: Option<TopologyFormat>,
    all: bool,
) -> Result<Out, Failure> {
    let mut topo = c.topology().await?;
    if all {
        for p in c.peers(true).await? {
            if !topo.peers.iter().any(|q| q.node_id == p.node_id) {
                topo.peers.push(p);
            }
        }
    }
    topo.peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let json = serde_json::to_value(&topo)
        .map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))?;
    let text = match format {
        None | Some(TopologyFormat::Text) => tree(&topo),
        Some(TopologyFormat::Json) => {
            let s = serde_json::to_string_pretty(&json)
                .map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))?;
            format!("{s}\n")
        }
        Some(TopologyFormat::Dot) => dot(&topo),
        Some(TopologyFormat::Svg) => svg(&dot(&topo))?,
    };
    // An explicit --format is a picture: print it whatever -o says.
    if format.is_some() && g.output == Output::Json {
        return Ok(Out {
            json: serde_json::Value::String(text.clone()),
            text,
        });
    }
    Ok(Out { json, text })
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

/// Graphviz DOT: one node per node id, one edge from this node to each peer (dashed when not
/// connected), labelled with the RTT.
pub fn dot(t: &Topology) -> String {
    // Left to right: the node on the left, its peers stacked on the right (node ids are long).
    let mut out = String::from("digraph mesh {\n  rankdir=LR;\n");
    out.push_str(&format!(
        "  {} [shape=box, label={}];\n",
        quote(&t.node_id),
        quote(&t.node_id)
    ));
    for p in &t.peers {
        out.push_str(&format!(
            "  {} [shape=box, label={}];\n",
            quote(&p.node_id),
            quote(&p.node_id)
        ));
    }
    for p in &t.peers {
        let style = if p.connected { "solid" } else { "dashed" };
        out.push_str(&format!(
            "  {} -> {} [label={}, style={style}];\n",
            quote(&t.node_id),
            quote(&p.node_id),
            quote(&rtt_text(p))
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
        };
        Topology {
            node_id: "12D3KooWSelf".into(),
            peers: vec![peer("12D3KooWA", true), peer("12D3KooWB", false)],
        }
    }

    #[test]
    fn renders_every_node() {
        let t = topo();
        let tree = tree(&t);
        assert!(tree.contains("12D3KooWSelf (this node)") && tree.contains("└── 12D3KooWB"));
        let d = dot(&t);
        assert!(d.contains("\"12D3KooWSelf\" -> \"12D3KooWA\""), "{d}");
        let s = svg(&d).unwrap();
        assert!(s.contains("<svg width=\"100%\" viewBox="), "{s}");
        for id in ["12D3KooWSelf", "12D3KooWA", "12D3KooWB"] {
            assert!(s.contains(id), "{id} missing from the SVG");
        }
    }
}
