//! Managing groups from the API (`Network.CreateGroup`, `ChangeGroupMembers`, `ListGroups`): the
//! checks before a group is founded or changed — the member list, and every member having the
//! schema approved with this node's definition hash (asked over the mesh) — then the change.
//! The API edge checks the admin right first.

use std::time::Duration;

use fold_proto::v1;

use super::{Groups, MAX_MEMBERS, status};
use crate::error::NodeError;
use crate::link::Link;
use crate::store::{SchemaState, Store};

/// How long a member's definition check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long CreateGroup waits for the new group's first leader.
const ELECTION_WAIT: Duration = Duration::from_secs(10);

/// The definition hash of `schema` here, if it is approved.
fn own_definition(store: &Store, schema: &str) -> Result<String, NodeError> {
    match store.schema(schema) {
        Some((s, SchemaState::Approved)) => Ok(s.definition_hash.clone()),
        Some(_) => Err(NodeError::failed_precondition(format!(
            "schema '{schema}' is not approved on this node; approve it first"
        ))),
        None => Err(NodeError::not_found(format!(
            "schema '{schema}' is not loaded on this node"
        ))),
    }
}

/// Every node in `members` other than `me` has `schema` approved with definition `hash`.
async fn check_members(
    link: &dyn Link,
    me: &str,
    schema: &str,
    hash: &str,
    members: &[String],
) -> Result<(), NodeError> {
    for m in members.iter().filter(|m| m.as_str() != me) {
        let answer = link
            .check_schemas(m, vec![schema.to_string()], CHECK_TIMEOUT)
            .await
            .map_err(|e| {
                NodeError::unavailable(format!(
                    "member {m} could not be asked about schema '{schema}': {}",
                    e.message()
                ))
            })?;
        match answer.definition_hashes.get(schema) {
            Some(h) if h == hash => {}
            Some(h) => {
                return Err(NodeError::failed_precondition(format!(
                    "member {m} has schema '{schema}' with definition hash {h}, this node has {hash}: every member needs the same definition (policies included)"
                )));
            }
            None => {
                return Err(NodeError::failed_precondition(format!(
                    "member {m} does not have schema '{schema}' approved; load and approve it there first"
                )));
            }
        }
    }
    Ok(())
}

/// This node trusts every other member enough to write the schema (else it would refuse their
/// Raft traffic once they lead).
fn trusts_members(
    groups: &Groups,
    ids: &crate::identity::Identities,
    me: &str,
    schema: &str,
    members: &[String],
) -> Result<(), NodeError> {
    for m in members.iter().filter(|m| m.as_str() != me) {
        let (distance, _) = ids.peer_distance(m).map_err(NodeError::from)?;
        let Some(d) = distance else {
            return Err(NodeError::failed_precondition(format!(
                "this node denies member {m}; a group's members must trust each other"
            )));
        };
        groups.trusted_to_write(schema, m, d)?;
    }
    Ok(())
}

/// The member list of a request: node ids, unique, `me` included, 1 to [`MAX_MEMBERS`].
fn member_list(me: &str, ids: &[String]) -> Result<Vec<String>, NodeError> {
    let mut members: Vec<String> = Vec::new();
    for id in ids {
        crate::bounds::node_id(id)?;
        if !members.contains(id) {
            members.push(id.clone());
        }
    }
    if !members.iter().any(|m| m == me) {
        members.push(me.to_string());
    }
    if members.len() > MAX_MEMBERS {
        return Err(NodeError::invalid_argument(format!(
            "a group has at most {MAX_MEMBERS} members; {} given",
            members.len()
        )));
    }
    Ok(members)
}

fn me(link: &dyn Link) -> Result<String, NodeError> {
    link.node_id().ok_or_else(|| {
        NodeError::unavailable(
            "this node does not know its node id yet (its p2p-sidecar is not connected)",
        )
    })
}

/// `Network.CreateGroup`.
pub async fn create(
    groups: &Groups,
    store: &Store,
    ids: &crate::identity::Identities,
    link: &dyn Link,
    req: v1::CreateGroupRequest,
) -> Result<v1::GroupStatus, NodeError> {
    let me = me(link)?;
    let hash = own_definition(store, &req.schema)?;
    let members = member_list(&me, &req.members)?;
    trusts_members(groups, ids, &me, &req.schema, &members)?;
    check_members(link, &me, &req.schema, &hash, &members).await?;
    let member = groups.create(&me, &req.schema, &members).await?;
    // Answer once a leader is known, so the group can take writes when this returns.
    let mut rx = member.raft().metrics();
    let _ = tokio::time::timeout(ELECTION_WAIT, async {
        while rx.borrow_and_update().current_leader.is_none() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    tracing::info!(schema = %req.schema, members = ?members, "schema group founded");
    Ok(one(groups, store, &req.schema))
}

/// `Network.ChangeGroupMembers`.
pub async fn change(
    groups: &Groups,
    store: &Store,
    ids: &crate::identity::Identities,
    link: &dyn Link,
    req: v1::ChangeGroupMembersRequest,
) -> Result<v1::GroupStatus, NodeError> {
    let me = me(link)?;
    if req.add.is_empty() && req.remove.is_empty() {
        return Err(NodeError::invalid_argument(
            "nothing to change: name members to 'add' or 'remove'",
        ));
    }
    if req.add.len() + req.remove.len() > 2 * MAX_MEMBERS {
        return Err(NodeError::invalid_argument("too many members named"));
    }
    for id in req.add.iter().chain(&req.remove) {
        crate::bounds::node_id(id)?;
    }
    let hash = own_definition(store, &req.schema)?;
    trusts_members(groups, ids, &me, &req.schema, &req.add)?;
    check_members(link, &me, &req.schema, &hash, &req.add).await?;
    groups
        .change_members(&req.schema, &req.add, &req.remove)
        .await?;
    tracing::info!(schema = %req.schema, add = ?req.add, remove = ?req.remove, "schema group membership changed");
    Ok(one(groups, store, &req.schema))
}

/// The status of `schema`'s group here (empty when this node is not a member).
fn one(groups: &Groups, store: &Store, schema: &str) -> v1::GroupStatus {
    list(groups, store)
        .into_iter()
        .find(|g| g.schema == schema)
        .unwrap_or_default()
}

/// Every group of this node, as this member sees it.
pub fn list(groups: &Groups, store: &Store) -> Vec<v1::GroupStatus> {
    groups
        .all()
        .into_iter()
        .map(|(schema, member)| {
            let head = store.log_bounds(&schema).map(|b| b.head).unwrap_or(0);
            status::to_proto(&schema, &member, groups.transport().directory(), head)
        })
        .collect()
}
