//! `check`'s findings about schema groups (docs/GROUPS.md): a group without a quorum on this
//! node (writes fail), a member the leader has not heard from, a member far behind the leader,
//! and Raft messages refused. Pure: the caller brings the node's status.

use fold_client::GroupStatus;

use crate::finding::{Finding, Severity, finding};

/// Entries behind the leader past which a member's lag is reported: the default
/// `--group-keep-logs`, past which the member catches up by snapshot rather than by log.
pub const LARGE_LAG: u64 = 1000;

/// Every group's findings (`NetworkStatus.groups`), in the order the node lists them.
pub fn group_findings(groups: &[GroupStatus]) -> Vec<Finding> {
    groups.iter().flat_map(one_group).collect()
}

fn one_group(g: &GroupStatus) -> Vec<Finding> {
    let s = &g.schema;
    let mut out = Vec::new();
    if !g.has_quorum {
        let leader = g.leader_node_id.as_deref().map_or_else(
            || "no leader known".into(),
            |l| format!("last known leader {l}"),
        );
        out.push(finding(
            Severity::Error,
            "group-quorum",
            format!(
                "group {s} has no quorum on this node (role {}, term {}, {leader}): writes to {s} \
                 fail with UNAVAILABLE and default reads too",
                g.role, g.term
            ),
            format!(
                "a majority of the group's {} voter(s) must be up and connected: start the \
                 members that are down, or restore this node's links to them (`foldctl peers`); \
                 `foldctl group status {s}` on each member shows what it sees; reads with \
                 `--consistency local` still answer here",
                g.voters().count()
            ),
        ));
    }
    if g.is_leader() {
        for m in g.members.iter().filter(|m| !m.leader) {
            match m.lag {
                None if m.voter => out.push(finding(
                    Severity::Warning,
                    "group-member",
                    format!(
                        "member {} of group {s} has not answered the leader (this node)",
                        m.node_id
                    ),
                    format!(
                        "check that node {} runs and is connected (`foldctl peers`); if it is \
                         gone for good, replace it: `foldctl group replace {s} {} <new node id>`",
                        m.node_id, m.node_id
                    ),
                )),
                Some(lag) if lag > LARGE_LAG => out.push(finding(
                    Severity::Warning,
                    "group-lag",
                    format!(
                        "member {} of group {s} is {lag} entries behind the leader",
                        m.node_id
                    ),
                    format!(
                        "it catches up on its own while connected (by snapshot when it is past \
                         --group-keep-logs); check its link (`foldctl peers`) and load; remove it \
                         with `foldctl group remove {s} {}` if it cannot keep up",
                        m.node_id
                    ),
                )),
                _ => {}
            }
        }
    }
    if g.refused_messages > 0 {
        out.push(finding(
            Severity::Info,
            "group-refused",
            format!(
                "group {s}: {} Raft message(s) refused (from non-members, malformed or over the \
                 limits)",
                g.refused_messages
            ),
            "a node that is not a member sends Raft traffic for this group: if it was removed, \
             stop it or drop its copy; fold_group metrics and the node's log name the sender",
        ));
    }
    if out.iter().all(|f| f.severity < Severity::Warning) {
        out.insert(0, healthy(g));
    }
    out
}

fn healthy(g: &GroupStatus) -> Finding {
    finding(
        Severity::Ok,
        "group-quorum",
        format!(
            "group {}: {} (term {}, {} voter(s), commit {}, applied {})",
            g.schema,
            match (g.is_leader(), g.leader_node_id.as_deref()) {
                (true, _) => "this node leads".to_string(),
                (false, Some(l)) => format!("this node is a {} of leader {l}", g.role),
                (false, None) => format!("this node is a {}, no leader known", g.role),
            },
            g.term,
            g.voters().count(),
            g.commit_index,
            g.applied_index
        ),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fold_client::GroupMember;

    fn group(role: &str, quorum: bool, lags: &[Option<u64>]) -> GroupStatus {
        let members = lags
            .iter()
            .enumerate()
            .map(|(i, lag)| GroupMember {
                node_id: format!("node{i}"),
                voter: true,
                leader: i == 0 && role == "leader",
                lag: *lag,
            })
            .collect();
        GroupStatus {
            schema: "Notes".into(),
            role: role.into(),
            leader_node_id: quorum.then(|| "node0".to_string()),
            term: 2,
            last_log_index: 5,
            commit_index: 5,
            applied_index: 5,
            snapshot_index: 0,
            purged_index: 0,
            members,
            has_quorum: quorum,
            refused_messages: 0,
            head_sequence: 4,
        }
    }

    fn checks(f: &[Finding]) -> Vec<(&'static str, Severity)> {
        f.iter().map(|f| (f.check, f.severity)).collect()
    }

    #[test]
    fn a_healthy_group_is_ok() {
        let f = group_findings(&[group("leader", true, &[Some(0), Some(1)])]);
        assert_eq!(checks(&f), [("group-quorum", Severity::Ok)]);
    }

    #[test]
    fn a_group_without_quorum_is_an_error_naming_it() {
        let f = group_findings(&[group("candidate", false, &[None, None])]);
        assert_eq!(checks(&f), [("group-quorum", Severity::Error)]);
        assert!(
            f[0].what.contains("group Notes has no quorum"),
            "{}",
            f[0].what
        );
        assert!(f[0].what.contains("no leader known"), "{}", f[0].what);
    }

    #[test]
    fn the_leader_names_silent_and_lagging_members() {
        let f = group_findings(&[group("leader", true, &[Some(0), None, Some(LARGE_LAG + 1)])]);
        assert_eq!(
            checks(&f),
            [
                ("group-member", Severity::Warning),
                ("group-lag", Severity::Warning)
            ]
        );
        assert!(f[0].what.contains("node1"));
        assert!(f[1].what.contains("node2"));
    }

    #[test]
    fn followers_do_not_judge_unknown_lags() {
        let f = group_findings(&[group("follower", true, &[None, None, None])]);
        assert_eq!(checks(&f), [("group-quorum", Severity::Ok)]);
    }
}
