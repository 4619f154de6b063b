//! `foldctl group …`: schema groups (docs/GROUPS.md). Create a group, add, remove or replace
//! members (on the leader: elsewhere the refusal names it, and foldctl prints the command to
//! run there), and each group's state as this member sees it. Also the group table `status`
//! shows.

use fold_client::{Client, Error, GroupMember, GroupStatus, named_leader};
use serde_json::Value as Json;

use crate::cli::GroupCmd;
use crate::table::{Table, kv, wide};
use crate::{Failure, Out, short_id};

fn to_json<T: serde::Serialize>(v: &T) -> Result<Json, Failure> {
    serde_json::to_value(v).map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))
}

pub async fn run(c: &Client, cmd: GroupCmd) -> Result<Out, Failure> {
    match cmd {
        GroupCmd::Create { schema, members } => create(c, &schema, &members).await,
        GroupCmd::Add { schema, ids } => change(c, &schema, &ids, &[], "add").await,
        GroupCmd::Remove { schema, ids } => change(c, &schema, &[], &ids, "remove").await,
        GroupCmd::Replace { schema, old, new } => {
            change(c, &schema, &[new], &[old], "replace").await
        }
        GroupCmd::Status {
            schema: Some(schema),
        } => one(c, &schema).await,
        GroupCmd::Status { schema: None } | GroupCmd::List => list(c).await,
    }
}

/// `group create`: the group as it stands once its leader is elected. This node's id is put
/// first when the list leaves it out (the node would add it too), so the request says exactly
/// which members are meant.
async fn create(c: &Client, schema: &str, members: &[String]) -> Result<Out, Failure> {
    let mut members = members.to_vec();
    if let Ok(s) = c.status().await
        && !s.node_id.is_empty()
        && !members.contains(&s.node_id)
    {
        members.insert(0, s.node_id);
    }
    let g = match c.create_group(schema, &members).await {
        Ok(g) => g,
        Err(e) => return Err(hinted(e, |e| create_hint(schema, e))),
    };
    let text = format!(
        "group {schema} created: {} voter(s), leader {}\n{}",
        g.voters().count(),
        g.leader_node_id.as_deref().unwrap_or("(none yet)"),
        detail_text(&g)
    );
    Ok(Out {
        json: to_json(&g)?,
        text,
    })
}

/// `e` with the hint `hint` finds for it, if any.
fn hinted(e: Error, hint: impl FnOnce(&Error) -> Option<String>) -> Failure {
    match hint(&e) {
        Some(h) => Failure::Hinted(e, h),
        None => Failure::Client(e),
    }
}

/// What to do about a refused `group create` (or the checks of an added member).
fn create_hint(schema: &str, e: &Error) -> Option<String> {
    use tonic::Code;
    let says = |w: &str| e.message().is_some_and(|m| m.contains(w));
    let hint = match e.code()? {
        Code::FailedPrecondition | Code::NotFound if says("on this node") => format!(
            "this node needs schema {schema} loaded and approved first: `foldctl schema load \
             <file> --approve` (or `foldctl schema approve {schema}`), and the same on every member"
        ),
        Code::FailedPrecondition if says("denies") => "this node denies the member named above; \
             a group's members must trust each other: `foldctl trust set <its id> <distance>`"
            .to_string(),
        Code::FailedPrecondition => format!(
            "every member needs schema {schema} loaded and approved with this node's definition \
             (same hash, policies included): on the member named above run \
             `foldctl schema load <the same file> --approve`, then `foldctl schema list` on both \
             to compare the HASH column"
        ),
        Code::PermissionDenied if says("trusted") => format!(
            "any member may lead and then writes {schema} on all the others, so each must be \
             trusted to write it: `foldctl trust set <member id> 0` (or a distance every write \
             policy of {schema} allows) here, and the same on every member for the others"
        ),
        Code::PermissionDenied => "creating or changing a group needs the admin right on this \
             node: use its owner socket (`foldctl --addr unix:data/owner.sock …`) or a client at \
             distance 0 (docs/SECURITY.md)"
            .to_string(),
        Code::Unavailable => "the member named above could not be asked: check that it runs, \
             that this node is connected to it (`foldctl peers`, `foldctl dial <its multiaddr>`) \
             and that it trusts this node (`foldctl trust set <this node id> <distance>` there)"
            .to_string(),
        Code::AlreadyExists => format!("see it with `foldctl group status {schema}`"),
        _ => return None,
    };
    Some(hint)
}

/// `group add/remove/replace`: one membership change, run on the leader.
async fn change(
    c: &Client,
    schema: &str,
    add: &[String],
    remove: &[String],
    verb: &str,
) -> Result<Out, Failure> {
    let g = match c.change_group_members(schema, add, remove).await {
        Ok(g) => g,
        Err(e) => return Err(hinted(e, |e| change_hint(schema, add, remove, verb, e))),
    };
    let done = match verb {
        "add" => format!("added {}", add.join(", ")),
        "remove" => format!("removed {}", remove.join(", ")),
        _ => format!("replaced {} by {}", remove.join(", "), add.join(", ")),
    };
    Ok(Out {
        json: to_json(&g)?,
        text: format!("group {schema}: {done}\n{}", detail_text(&g)),
    })
}

/// On a member that is not the leader: which node leads, and the command to run there.
fn change_hint(
    schema: &str,
    add: &[String],
    remove: &[String],
    verb: &str,
    e: &Error,
) -> Option<String> {
    let leader = e.message().and_then(named_leader);
    match (e.code(), leader) {
        (Some(tonic::Code::FailedPrecondition), Some(leader)) => {
            let args = match verb {
                "replace" => format!("{} {}", remove.join(" "), add.join(" ")),
                "add" => add.join(" "),
                _ => remove.join(" "),
            };
            Some(format!(
                "membership changes run on the group's leader, node {leader}; run it there:\n    \
                 foldctl --addr <address of node {leader}> group {verb} {schema} {args}"
            ))
        }
        (Some(tonic::Code::Unavailable), _)
            if !add.is_empty()
                && e.message()
                    .is_some_and(|m| m.contains("could not be asked")) =>
        {
            create_hint(schema, e)
        }
        (Some(tonic::Code::Unavailable), _) => Some(format!(
            "the group needs a quorum (a majority of its voters up and connected) to change its \
             members; `foldctl group status {schema}` shows what this node sees"
        )),
        _ => create_hint(schema, e),
    }
}

/// `group list` / `group status`: every group this node is a member of.
async fn list(c: &Client) -> Result<Out, Failure> {
    let groups = c.list_groups().await?;
    let text = if groups.is_empty() {
        "this node is a member of no group (create one with `foldctl group create`)\n".into()
    } else {
        groups_table(&groups)
    };
    Ok(Out {
        json: to_json(&groups)?,
        text,
    })
}

/// `group status SCHEMA`: one group in detail.
async fn one(c: &Client, schema: &str) -> Result<Out, Failure> {
    let g = c.group(schema).await?;
    Ok(Out {
        json: to_json(&g)?,
        text: detail_text(&g),
    })
}

/// A node id in a table: whole with `-o wide`, else its tail.
fn id_cell(id: &str) -> String {
    if wide() { id.to_string() } else { short_id(id) }
}

/// A member's lag: its number, or `?` when unknown (known on the leader only).
fn lag_text(m: &GroupMember) -> String {
    m.lag.map_or_else(|| "?".into(), |l| l.to_string())
}

/// Each member as `ID (leader|learner) lag N`, comma separated.
pub fn members_text(g: &GroupStatus) -> String {
    let list: Vec<String> = g
        .members
        .iter()
        .map(|m| {
            let what = match (m.leader, m.voter) {
                (true, _) => " leader",
                (false, false) => " learner",
                _ => "",
            };
            format!("{}{what} lag {}", id_cell(&m.node_id), lag_text(m))
        })
        .collect();
    list.join(", ")
}

/// The group table: one row per group (`-o wide`: every index and full ids).
pub fn groups_table(groups: &[GroupStatus]) -> String {
    let mut headers = vec![
        "SCHEMA", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "QUORUM", "MEMBERS",
    ];
    if wide() {
        headers.extend(["LAST_LOG", "SNAPSHOT", "PURGED", "HEAD_SEQ", "REFUSED"]);
    }
    let mut t = Table::new(headers).keep(0);
    for g in groups {
        let mut row = vec![
            g.schema.clone(),
            g.role.clone(),
            g.leader_node_id.clone().unwrap_or_else(|| "-".into()),
            g.term.to_string(),
            g.commit_index.to_string(),
            g.applied_index.to_string(),
            if g.has_quorum { "yes" } else { "NO" }.into(),
            members_text(g),
        ];
        if wide() {
            row.extend([
                g.last_log_index.to_string(),
                g.snapshot_index.to_string(),
                g.purged_index.to_string(),
                g.head_sequence.to_string(),
                g.refused_messages.to_string(),
            ]);
        }
        t.row(row);
    }
    t.render()
}

/// One group: its state as key/value lines, then its members.
pub fn detail_text(g: &GroupStatus) -> String {
    let mut text = kv(&[
        ("group", g.schema.clone()),
        ("role here", g.role.clone()),
        (
            "leader",
            g.leader_node_id
                .clone()
                .unwrap_or_else(|| "none known".into()),
        ),
        ("term", g.term.to_string()),
        (
            "quorum",
            if g.has_quorum {
                "yes".into()
            } else {
                "NO: writes here fail with UNAVAILABLE".into()
            },
        ),
        (
            "log",
            format!(
                "last {}, commit {}, applied {}, snapshot {}, purged {}",
                g.last_log_index, g.commit_index, g.applied_index, g.snapshot_index, g.purged_index
            ),
        ),
        ("head sequence", g.head_sequence.to_string()),
        ("refused raft msgs", g.refused_messages.to_string()),
    ]);
    let mut t = Table::new(["NODE_ID", "VOTER", "LEADER", "LAG"]).keep(0);
    for m in &g.members {
        t.row([
            m.node_id.clone(),
            if m.voter { "yes" } else { "learner" }.into(),
            if m.leader { "yes" } else { "no" }.into(),
            lag_text(m),
        ]);
    }
    text.push('\n');
    text.push_str(&t.render());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupStatus {
        let member = |id: &str, voter, leader, lag| GroupMember {
            node_id: id.into(),
            voter,
            leader,
            lag,
        };
        GroupStatus {
            schema: "Notes".into(),
            role: "leader".into(),
            leader_node_id: Some("12D3KooWAAAAAAAAAAAAAAAAleader01".into()),
            term: 3,
            last_log_index: 12,
            commit_index: 12,
            applied_index: 11,
            snapshot_index: 0,
            purged_index: 0,
            members: vec![
                member("12D3KooWAAAAAAAAAAAAAAAAleader01", true, true, Some(0)),
                member("12D3KooWBBBBBBBBBBBBBBBBfollow02", true, false, None),
                member("12D3KooWCCCCCCCCCCCCCCCClearner3", false, false, Some(40)),
            ],
            has_quorum: true,
            refused_messages: 0,
            head_sequence: 9,
        }
    }

    #[test]
    fn members_show_role_and_lag() {
        assert_eq!(
            members_text(&group()),
            "…leader01 leader lag 0, …follow02 lag ?, …learner3 learner lag 40"
        );
    }

    #[test]
    fn the_table_has_one_row_per_group_with_its_indexes() {
        let t = groups_table(&[group()]);
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            &row[..7],
            [
                "Notes",
                "leader",
                "12D3KooWAAAAAAAAAAAAAAAAleader01",
                "3",
                "12",
                "11",
                "yes"
            ]
        );
    }

    #[test]
    fn detail_names_a_missing_quorum() {
        let mut g = group();
        g.has_quorum = false;
        g.leader_node_id = None;
        let text = detail_text(&g);
        assert!(text.contains("none known"), "{text}");
        assert!(
            text.contains("NO: writes here fail with UNAVAILABLE"),
            "{text}"
        );
    }
}
