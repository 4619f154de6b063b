//! `Network.Topology` with `max_hops` > 0: the mesh around this node, gathered by asking nodes
//! for their peers over the mesh (the `peers` operation of `fold.wire.v1.Operation`).
//!
//! Breadth-first from this node: hop 1 asks this node's connected peers, hop 2 the peers they
//! report, and so on up to `max_hops`. A node *n* hops away is asked through the path it was
//! found on (the request is relayed by the nodes in between, each to one of its connected peers),
//! so gathering opens no new connections and each node judges the request by the path distance.
//! Each node is asked at most once, at most [`CONCURRENCY`] at a time, at most [`MAX_NODES`] in
//! all, within one time budget. A node that could not be asked (unreachable, refused, too slow,
//! over the budget) is reported with its error: a partial result is never silent.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use fold_proto::v1::{ListPeersResponse, PeerInfo, TopologyError, TopologyNode};
use fold_proto::wire::{PeersRequest, Requester, operation};
use futures::StreamExt;

use crate::error::NodeError;

use crate::link::mesh::{MeshLink, valid_node_id};

/// Largest `max_hops`.
pub const MAX_HOPS: u32 = 4;
/// Most nodes in one gathering (this node included).
pub const MAX_NODES: usize = 256;
/// Most nodes asked at the same time.
pub const CONCURRENCY: usize = 8;
/// The time budget when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest time budget.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// What a gathering found: the nodes asked (this node first) and how many found nodes were not
/// asked because of the node limit.
pub struct Gathered {
    pub nodes: Vec<TopologyNode>,
    pub not_asked: u32,
}

fn error_of(s: &NodeError) -> TopologyError {
    TopologyError {
        code: s.code() as i32,
        message: s.message().chars().take(1024).collect(),
    }
}

/// A node's route from here and what it answered.
type Answer = (Vec<String>, Result<Vec<PeerInfo>, NodeError>);

/// Ask the last node of `route` for its peers, relayed along the route, before `deadline`.
async fn ask_route(
    mesh: &MeshLink,
    route: Vec<String>,
    requester: Requester,
    deadline: Instant,
    budget_ms: u128,
) -> Answer {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        let s = NodeError::deadline_exceeded(format!(
            "not asked: the topology's time budget of {budget_ms} ms ran out first"
        ));
        return (route, Err(s));
    }
    // The first node of the route relays along the rest.
    let Some((first, via)) = route.split_first() else {
        return (route, Err(NodeError::internal("empty route")));
    };
    let op = operation::Kind::Peers(PeersRequest { via: via.to_vec() });
    let ask = async {
        crate::link::ask::<ListPeersResponse>(mesh, first, op, requester, Some(left))
            .await
            .map(|p| p.peers)
    };
    let r = tokio::time::timeout(left, ask).await.unwrap_or_else(|_| {
        Err(NodeError::deadline_exceeded(format!(
            "did not answer within the topology's time budget of {budget_ms} ms"
        )))
    });
    (route, r)
}

/// Gather the topology: `own_peers` are this node's (hop 0) connected peers.
pub async fn gather(
    mesh: &MeshLink,
    me: String,
    own_peers: Vec<PeerInfo>,
    requester: Requester,
    max_hops: u32,
    budget: Duration,
) -> Gathered {
    let deadline = Instant::now() + budget;
    let mut seen: HashSet<String> = HashSet::from([me.clone()]);
    let mut not_asked: u32 = 0;
    // Each node to ask, as its route from here: the nodes in between, then the node itself.
    let mut frontier: Vec<Vec<String>> = Vec::new();
    let mut nodes = Vec::new();
    // `seen` holds exactly this node and the nodes asked or queued: the node limit bounds it.
    let mut enqueue = |route: &[String],
                       peers: &[PeerInfo],
                       frontier: &mut Vec<Vec<String>>,
                       seen: &mut HashSet<String>| {
        for p in peers {
            if !p.connected || !valid_node_id(&p.node_id) || seen.contains(&p.node_id) {
                continue;
            }
            if seen.len() >= MAX_NODES {
                not_asked = not_asked.saturating_add(1);
                continue;
            }
            seen.insert(p.node_id.clone());
            let mut next = route.to_vec();
            next.push(p.node_id.clone());
            frontier.push(next);
        }
    };
    if max_hops > 0 {
        enqueue(&[], &own_peers, &mut frontier, &mut seen);
    }
    nodes.push(TopologyNode {
        node_id: me,
        hops: 0,
        peers: own_peers,
        error: None,
    });
    let budget_ms = budget.as_millis();
    for hop in 1..=max_hops.min(MAX_HOPS) {
        if frontier.is_empty() {
            break;
        }
        let asking = std::mem::take(&mut frontier);
        let mut answers: Vec<Answer> = futures::stream::iter(asking)
            .map(|route| ask_route(mesh, route, requester.clone(), deadline, budget_ms))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        answers.sort_by(|a, b| a.0.last().cmp(&b.0.last()));
        for (route, r) in answers {
            let id = route.last().cloned().unwrap_or_default();
            match r {
                Ok(mut peers) => {
                    peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
                    if hop < max_hops {
                        enqueue(&route, &peers, &mut frontier, &mut seen);
                    }
                    nodes.push(TopologyNode {
                        node_id: id,
                        hops: hop,
                        peers,
                        error: None,
                    });
                }
                Err(s) => nodes.push(TopologyNode {
                    node_id: id,
                    hops: hop,
                    peers: Vec::new(),
                    error: Some(error_of(&s)),
                }),
            }
        }
    }
    Gathered { nodes, not_asked }
}
