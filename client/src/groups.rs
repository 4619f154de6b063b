//! Schema groups (docs/GROUPS.md): one schema replicated with Raft on 3 or 5 member nodes, so it
//! stays writable while a majority of its members is up. Creating a group, changing its
//! members, and the status of each group as one member sees it; how a query reads a group
//! ([`Consistency`], [`GroupRead`]).

use std::str::FromStr;

use fold_proto::v1::{self as pb};
use serde::Serialize;

use crate::Client;
use crate::error::{Error, Result};

/// How a query of a group schema reads ([`Query::consistency`](crate::Query::consistency)).
/// Ignored for schemas that are not groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The node's default for groups: linearizable.
    #[default]
    Default,
    /// The member confirms with the leader (read index) that it has applied every write
    /// acknowledged before the read began: never stale; UNAVAILABLE without a quorum.
    Linearizable,
    /// This member's copy as it is, without asking anyone: may miss the latest writes, answered
    /// even without a quorum ([`GroupRead::as_of_sequence`] says how recent it is).
    Local,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Default => "default",
            Consistency::Linearizable => "linearizable",
            Consistency::Local => "local",
        }
    }

    pub(crate) fn to_proto(self) -> pb::Consistency {
        match self {
            Consistency::Default => pb::Consistency::Default,
            Consistency::Linearizable => pb::Consistency::Linearizable,
            Consistency::Local => pb::Consistency::Local,
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Consistency {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(Consistency::Default),
            "linearizable" => Ok(Consistency::Linearizable),
            "local" => Ok(Consistency::Local),
            _ => Err(Error::Input(format!(
                "unknown consistency `{s}` (default, linearizable, local)"
            ))),
        }
    }
}

/// How a query of a group schema was read (`QueryResponse.group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GroupRead {
    /// True when the read was confirmed with the leader (not [`Consistency::Local`]).
    pub linearizable: bool,
    /// The schema's last sequence applied on the answering member when it read: the answer
    /// reflects every change up to it.
    pub as_of_sequence: u64,
}

impl From<pb::GroupReadInfo> for GroupRead {
    fn from(g: pb::GroupReadInfo) -> Self {
        GroupRead {
            linearizable: g.linearizable,
            as_of_sequence: g.as_of_sequence,
        }
    }
}

/// One group as one of its members sees it (`GroupStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupStatus {
    /// The replicated schema (the group's name).
    pub schema: String,
    /// This member's Raft role: "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    /// The leader this member knows of (`null`: none known, e.g. during an election or
    /// without a quorum).
    pub leader_node_id: Option<String>,
    pub term: u64,
    /// Index of the last entry in this member's log.
    pub last_log_index: u64,
    /// Index of the last entry known durable on a majority.
    pub commit_index: u64,
    /// Index of the last entry applied to the schema's data here.
    pub applied_index: u64,
    /// Index covered by this member's latest snapshot.
    pub snapshot_index: u64,
    /// Index up to which this member's log was compacted.
    pub purged_index: u64,
    /// Voters and learners.
    pub members: Vec<GroupMember>,
    /// False when this member cannot reach a quorum: writes here fail with UNAVAILABLE.
    pub has_quorum: bool,
    /// Raft messages refused (from non-members, malformed, over the limits).
    pub refused_messages: u64,
    /// The schema's last sequence on this member.
    pub head_sequence: u64,
}

impl GroupStatus {
    /// The voters' node ids.
    pub fn voters(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.node_id.as_str())
    }

    /// Whether this member is the leader.
    pub fn is_leader(&self) -> bool {
        self.role == "leader"
    }
}

impl From<pb::GroupStatus> for GroupStatus {
    fn from(g: pb::GroupStatus) -> Self {
        GroupStatus {
            schema: g.schema,
            role: g.role,
            leader_node_id: (!g.leader_node_id.is_empty()).then_some(g.leader_node_id),
            term: g.term,
            last_log_index: g.last_log_index,
            commit_index: g.commit_index,
            applied_index: g.applied_index,
            snapshot_index: g.snapshot_index,
            purged_index: g.purged_index,
            members: g.members.into_iter().map(GroupMember::from).collect(),
            has_quorum: g.has_quorum,
            refused_messages: g.refused_messages,
            head_sequence: g.head_sequence,
        }
    }
}

/// One member of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    pub node_id: String,
    /// False: a learner catching up before it becomes a voter.
    pub voter: bool,
    pub leader: bool,
    /// Entries this member is behind the leader's log, as the leader measures it; `null` when
    /// unknown (the answering node is not the leader, or the member has not answered yet).
    pub lag: Option<u64>,
}

impl From<pb::GroupMember> for GroupMember {
    fn from(m: pb::GroupMember) -> Self {
        GroupMember {
            node_id: m.node_id,
            voter: m.voter,
            leader: m.leader,
            lag: u64::try_from(m.lag).ok(),
        }
    }
}

/// The leader a refusal names ("… leader <node id> …"), if any: the node to run a membership
/// change on, or the one a member without a quorum last knew.
pub fn named_leader(message: &str) -> Option<String> {
    let word = |w: &str| {
        w.trim_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_string()
    };
    let words: Vec<String> = message.split_whitespace().map(word).collect();
    words.windows(2).find_map(|w| {
        let id = &w[1];
        // Node ids are base58 multihashes; "leader is" / "leader: none" are not ids.
        (w[0].eq_ignore_ascii_case("leader")
            && id.len() >= 20
            && id.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| id.clone())
    })
}

/// Most members a group may have (the node accepts 1 to 7 voters).
pub const MAX_GROUP_MEMBERS: usize = 7;

impl Client {
    /// Make `schema` a group of `members` (node ids; this node is added when missing). Needs
    /// the admin right here, and `schema` loaded and approved with the same definition hash on
    /// every member (FAILED_PRECONDITION or UNAVAILABLE naming the member that fails the check;
    /// ALREADY_EXISTS when it is a group here already). Answers once a leader is elected.
    pub async fn create_group(&self, schema: &str, members: &[String]) -> Result<GroupStatus> {
        check_ids(members)?;
        let r = self
            .network()
            .create_group(self.req(pb::CreateGroupRequest {
                schema: schema.into(),
                members: members.to_vec(),
            }))
            .await?
            .into_inner();
        group_of(r.group, schema)
    }

    /// Add and remove members of a group while it serves (both at once: a replacement). Run it
    /// on the group's leader: another member answers FAILED_PRECONDITION naming the leader
    /// ([`named_leader`]). Each added member first catches up as a learner.
    pub async fn change_group_members(
        &self,
        schema: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<GroupStatus> {
        if add.is_empty() && remove.is_empty() {
            return Err(Error::Input(
                "name at least one member to add or remove".into(),
            ));
        }
        check_ids(add)?;
        check_ids(remove)?;
        let r = self
            .network()
            .change_group_members(self.req(pb::ChangeGroupMembersRequest {
                schema: schema.into(),
                add: add.to_vec(),
                remove: remove.to_vec(),
            }))
            .await?
            .into_inner();
        group_of(r.group, schema)
    }

    /// Add members to a group (on its leader).
    pub async fn add_group_members(&self, schema: &str, ids: &[String]) -> Result<GroupStatus> {
        self.change_group_members(schema, ids, &[]).await
    }

    /// Remove members from a group (on its leader; a dead member can be removed while the
    /// rest are still a majority of the old voters).
    pub async fn remove_group_members(&self, schema: &str, ids: &[String]) -> Result<GroupStatus> {
        self.change_group_members(schema, &[], ids).await
    }

    /// The groups this node is a member of, as it sees them.
    pub async fn list_groups(&self) -> Result<Vec<GroupStatus>> {
        let r = self
            .network()
            .list_groups(self.req(pb::ListGroupsRequest {}))
            .await?
            .into_inner();
        Ok(r.groups.into_iter().map(GroupStatus::from).collect())
    }

    /// One group as this node sees it (NOT_FOUND when this node is not one of its members).
    pub async fn group(&self, schema: &str) -> Result<GroupStatus> {
        self.list_groups()
            .await?
            .into_iter()
            .find(|g| g.schema == schema)
            .ok_or_else(|| Error::Status {
                code: tonic::Code::NotFound,
                message: format!("this node is not a member of a group for schema '{schema}'"),
            })
    }
}

/// Node ids as the node takes them: at most [`MAX_GROUP_MEMBERS`], none empty, no repeats.
fn check_ids(ids: &[String]) -> Result<()> {
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(Error::Input(format!(
            "{} node ids given; a group has at most {MAX_GROUP_MEMBERS} members",
            ids.len()
        )));
    }
    for (i, id) in ids.iter().enumerate() {
        if id.trim().is_empty() {
            return Err(Error::Input("an empty node id was given".into()));
        }
        if ids[..i].contains(id) {
            return Err(Error::Input(format!("node id {id} is given twice")));
        }
    }
    Ok(())
}

fn group_of(g: Option<pb::GroupStatus>, schema: &str) -> Result<GroupStatus> {
    g.map(GroupStatus::from).ok_or_else(|| Error::Status {
        code: tonic::Code::Internal,
        message: format!("the node answered without the status of group '{schema}'"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "12D3KooWLbQbS7xG9tq9Q5Q9uEx6PpGJm7aTjHnq8y4hPQ3wZ6mR";

    #[test]
    fn consistency_parses_and_maps() {
        assert_eq!("LOCAL".parse::<Consistency>().unwrap(), Consistency::Local);
        assert_eq!(
            "linearizable".parse::<Consistency>().unwrap().to_proto(),
            pb::Consistency::Linearizable
        );
        assert_eq!(Consistency::default().to_proto(), pb::Consistency::Default);
        assert!("eventual".parse::<Consistency>().is_err());
    }

    #[test]
    fn status_maps_unknown_lag_and_no_leader() {
        let g = GroupStatus::from(pb::GroupStatus {
            schema: "S".into(),
            role: "follower".into(),
            members: vec![
                pb::GroupMember {
                    node_id: "a".into(),
                    voter: true,
                    leader: false,
                    lag: -1,
                },
                pb::GroupMember {
                    node_id: "b".into(),
                    voter: false,
                    leader: false,
                    lag: 7,
                },
            ],
            ..Default::default()
        });
        assert_eq!(g.leader_node_id, None);
        assert_eq!(g.members[0].lag, None);
        assert_eq!(g.members[1].lag, Some(7));
        assert_eq!(g.voters().collect::<Vec<_>>(), ["a"]);
        assert!(!g.is_leader());
    }

    #[test]
    fn the_leader_named_in_a_refusal_is_found() {
        assert_eq!(
            named_leader(&format!("not the leader of group S: run it on leader {ID}")),
            Some(ID.to_string())
        );
        assert_eq!(
            named_leader(&format!("no quorum for group S (last known leader {ID}.)")),
            Some(ID.to_string())
        );
        assert_eq!(
            named_leader(&format!(
                "schema group 'S' cannot take writes here now: no quorum reachable (last known leader: {ID}); nothing was written"
            )),
            Some(ID.to_string())
        );
        assert_eq!(
            named_leader(&format!(
                "this node is not the leader of group 'S': run the change on the leader {ID}"
            )),
            Some(ID.to_string())
        );
        assert_eq!(named_leader("no quorum (last known leader: none)"), None);
        assert_eq!(named_leader("no quorum: no leader known"), None);
        assert_eq!(named_leader("the leader is unknown"), None);
    }

    #[test]
    fn member_lists_are_checked_before_sending() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_ids(&ids(&["a", "b", "c"])).is_ok());
        assert!(check_ids(&ids(&["a", "a"])).is_err());
        assert!(check_ids(&ids(&["a", ""])).is_err());
        assert!(check_ids(&ids(&["1", "2", "3", "4", "5", "6", "7", "8"])).is_err());
    }
}
