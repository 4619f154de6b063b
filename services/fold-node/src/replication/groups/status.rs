//! What a group looks like from outside: its `fold.v1.GroupStatus` (Network.Status, ListGroups,
//! `foldctl status`/`check`) and its metrics — elections, leader changes, proposal latency, and
//! per-group term / leader / quorum gauges — kept current by one watcher task per group that
//! follows openraft's metrics channel.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use fold_group::NodeId;
use fold_middleware::metrics::latency_histogram;
use fold_proto::v1;
use openraft::ServerState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Directory, Member};
use crate::metrics::SchemaLabels;

type Histograms = Family<SchemaLabels, Histogram, fn() -> Histogram>;

/// The groups' metrics (one set per process).
pub struct GroupMetrics {
    elections: Family<SchemaLabels, Counter>,
    leader_changes: Family<SchemaLabels, Counter>,
    proposal_seconds: Histograms,
    commit_seconds: Histograms,
    term: Family<SchemaLabels, Gauge>,
    is_leader: Family<SchemaLabels, Gauge>,
    has_leader: Family<SchemaLabels, Gauge>,
    applied: Family<SchemaLabels, Gauge>,
}

static METRICS: OnceLock<GroupMetrics> = OnceLock::new();

/// Register the groups' metrics in `reg` (once per process; later calls do nothing).
pub fn register(reg: &mut Registry) {
    let m = GroupMetrics {
        elections: Family::default(),
        leader_changes: Family::default(),
        proposal_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        commit_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        term: Family::default(),
        is_leader: Family::default(),
        has_leader: Family::default(),
        applied: Family::default(),
    };
    reg.register(
        "fold_group_elections",
        "Elections this member saw start (its term went up), per schema group",
        m.elections.clone(),
    );
    reg.register(
        "fold_group_leader_changes",
        "Times the leader this member knows of changed, per schema group",
        m.leader_changes.clone(),
    );
    reg.register(
        "fold_group_proposal_seconds",
        "Writes proposed by this member as leader: from proposal until committed by a majority and applied here",
        m.proposal_seconds.clone(),
    );
    reg.register(
        "fold_group_commit_seconds",
        "Log entries from the leader's proposal until this member starts applying them (committed by a majority); on followers it includes the clocks' difference; millisecond resolution",
        m.commit_seconds.clone(),
    );
    reg.register("fold_group_term", "Current Raft term", m.term.clone());
    reg.register(
        "fold_group_is_leader",
        "1 while this member leads the group",
        m.is_leader.clone(),
    );
    reg.register(
        "fold_group_has_leader",
        "1 while this member knows a leader of the group",
        m.has_leader.clone(),
    );
    reg.register(
        "fold_group_applied_index",
        "Index of the last log entry applied on this member",
        m.applied.clone(),
    );
    let _ = METRICS.set(m);
}

fn labels(schema: &str) -> SchemaLabels {
    SchemaLabels {
        schema: schema.to_string(),
    }
}

/// A write proposed at `started` was acknowledged.
pub fn observe_proposal(schema: &str, started: Instant) {
    if let Some(m) = METRICS.get() {
        m.proposal_seconds
            .get_or_create(&labels(schema))
            .observe(started.elapsed().as_secs_f64());
    }
}

/// An entry proposed at `proposed_ms` (the leader's clock) is being applied: it is committed.
pub fn observe_commit(schema: &str, proposed_ms: u64) {
    if let Some(m) = METRICS.get() {
        let ms = crate::storage::store::now_ms().saturating_sub(proposed_ms);
        m.commit_seconds
            .get_or_create(&labels(schema))
            .observe(ms as f64 / 1000.0);
    }
}

/// Follow `member`'s metrics until it shuts down: count elections and leader changes, keep the
/// gauges current, and learn the node ids of new members.
pub fn watch(schema: &str, member: Arc<Member>, directory: Directory) {
    let schema = schema.to_string();
    let mut rx = member.raft().metrics();
    drop(member);
    tokio::spawn(async move {
        let (mut term, mut leader) = (None, None);
        loop {
            let m = rx.borrow_and_update().clone();
            for (_, node) in m.membership_config.membership().nodes() {
                directory.learn(&node.addr);
            }
            if let Some(g) = METRICS.get() {
                let l = labels(&schema);
                if term.is_some_and(|t| m.current_term > t) {
                    g.elections.get_or_create(&l).inc();
                }
                if leader.is_some() && m.current_leader != leader.flatten() {
                    g.leader_changes.get_or_create(&l).inc();
                }
                g.term
                    .get_or_create(&l)
                    .set(i64::try_from(m.current_term).unwrap_or(i64::MAX));
                g.is_leader
                    .get_or_create(&l)
                    .set(i64::from(m.state == ServerState::Leader));
                g.has_leader
                    .get_or_create(&l)
                    .set(i64::from(m.current_leader.is_some()));
                g.applied.get_or_create(&l).set(
                    m.last_applied
                        .map_or(0, |a| i64::try_from(a.index).unwrap_or(i64::MAX)),
                );
            }
            term = Some(m.current_term);
            leader = Some(m.current_leader);
            if m.state == ServerState::Shutdown || rx.changed().await.is_err() {
                break;
            }
        }
    });
}

/// The index a majority of the voters has in its log, as the leader measures it.
fn commit_index(voters: &[NodeId], me: NodeId, last: u64, matched: &dyn Fn(NodeId) -> u64) -> u64 {
    let mut idx: Vec<u64> = voters
        .iter()
        .map(|v| if *v == me { last } else { matched(*v) })
        .collect();
    idx.sort_unstable_by(|a, b| b.cmp(a));
    idx.get(voters.len() / 2).copied().unwrap_or(0)
}

/// `member`'s view of its group as `fold.v1.GroupStatus`; `head` is the schema's head sequence
/// here.
pub fn to_proto(
    schema: &str,
    member: &Member,
    directory: &Directory,
    head: u64,
) -> v1::GroupStatus {
    let s = member.status();
    let m = member.metrics();
    let name = |id: NodeId| {
        directory
            .node_of(id)
            .unwrap_or_else(|| format!("member-{id}"))
    };
    let last = s.last_log_index.unwrap_or(0);
    let applied = s.applied_index.unwrap_or(0);
    let matched = |id: NodeId| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(&id).copied().flatten())
            .map_or(0, |l| l.index)
    };
    let commit = if m.state == ServerState::Leader {
        commit_index(&s.voters, s.node_id, last, &matched).max(applied)
    } else {
        applied
    };
    let lag_of = |id: NodeId| -> i64 {
        s.lag
            .as_ref()
            .and_then(|l| l.get(&id))
            .map_or(-1, |v| i64::try_from(*v).unwrap_or(i64::MAX))
    };
    let mut members: Vec<v1::GroupMember> = s
        .voters
        .iter()
        .map(|id| (*id, true))
        .chain(s.learners.iter().map(|id| (*id, false)))
        .map(|(id, voter)| v1::GroupMember {
            node_id: name(id),
            voter,
            leader: s.leader == Some(id),
            lag: if id == s.node_id && m.state == ServerState::Leader {
                0
            } else {
                lag_of(id)
            },
        })
        .collect();
    members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    v1::GroupStatus {
        schema: schema.to_string(),
        role: role(m.state).to_string(),
        leader_node_id: s.leader.map(name).unwrap_or_default(),
        term: s.term,
        last_log_index: last,
        commit_index: commit,
        applied_index: applied,
        snapshot_index: s.snapshot_index.unwrap_or(0),
        purged_index: s.purged_index.unwrap_or(0),
        members,
        has_quorum: s.has_quorum,
        refused_messages: s.refused_messages,
        head_sequence: head,
    }
}

fn role(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[cfg(test)]
mod tests {
    use super::commit_index;

    #[test]
    fn the_commit_index_is_what_a_majority_holds() {
        let matched = |id: u64| [0, 7, 5, 9, 2][id as usize];
        // Leader 0 at 10; others 7, 5, 9, 2 → sorted 10, 9, 7, 5, 2 → majority (3rd) is 7.
        assert_eq!(commit_index(&[0, 1, 2, 3, 4], 0, 10, &matched), 7);
        assert_eq!(commit_index(&[0, 1, 2], 0, 10, &matched), 7);
        assert_eq!(commit_index(&[0], 0, 10, &matched), 10);
    }
}
