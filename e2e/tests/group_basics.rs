//! Schema groups on three loopback nodes (real sidecars, real fold-nodes): founding a group,
//! writes through any member (forwarded to the leader), linearizable and LOCAL reads, identical
//! sequences and version ids on every member, and the group taking writes again after its
//! leader's fold-node is killed with SIGKILL and coming back in step after the restart. The
//! partition, linearizability and membership tests run in network namespaces
//! (groups_*.rs).

use std::time::{Duration, Instant};

use fold_proto::v1::{
    Consistency, CreateGroupRequest, GroupStatus, ListGroupsRequest, MutationType, QueryRequest,
};
use foldmesh_e2e::client::*;
use foldmesh_e2e::loopback::{Node, start};
use foldmesh_e2e::mesh::eventually;
use foldmesh_e2e::process::NodeProc;
use serde_json::{Value as Json, json};

fn notes() -> Json {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!({"Distance": 1}), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
}

const NODE: &[&str] = &["--unknown-peer-distance", "1"];

async fn group_of(n: &NodeProc) -> Option<GroupStatus> {
    n.owner_network()
        .list_groups(ListGroupsRequest {})
        .await
        .ok()?
        .into_inner()
        .groups
        .into_iter()
        .find(|g| g.schema == "Notes")
}

async fn write(n: &NodeProc, id: &str, body: &str) -> Result<u64, tonic::Status> {
    let r = n
        .owner_fold()
        .mutate(mutate_req(
            "Notes",
            MutationType::Create,
            json!({"id": id, "body": body}),
        ))
        .await?;
    Ok(r.into_inner().sequence)
}

fn read_req(consistency: Consistency) -> QueryRequest {
    let mut q = query_req("Notes", &["id", "body"], None);
    q.consistency = consistency as i32;
    q
}

async fn three() -> Vec<Node> {
    let nodes: Vec<Node> = (0..3).map(|_| start(NODE)).collect();
    nodes[0].dial(&nodes[1]).await;
    nodes[0].dial(&nodes[2]).await;
    nodes[1].dial(&nodes[2]).await;
    for n in &nodes {
        n.node
            .owner_fold()
            .load_schema(load_req(&notes(), true))
            .await
            .unwrap();
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_takes_writes_on_any_member_and_survives_its_leader() {
    let mut nodes = three().await;
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let created = nodes[0]
        .node
        .owner_network()
        .create_group(CreateGroupRequest {
            schema: "Notes".into(),
            members: ids[1..].to_vec(),
        })
        .await
        .expect("CreateGroup")
        .into_inner()
        .group
        .unwrap();
    assert_eq!(created.members.len(), 3, "{created:?}");
    assert!(
        !created.leader_node_id.is_empty(),
        "a leader once created: {created:?}"
    );

    // Every member joins and knows the leader.
    for n in &nodes {
        eventually(
            "every member to know the leader",
            Duration::from_secs(15),
            || async {
                group_of(&n.node)
                    .await
                    .filter(|g| !g.leader_node_id.is_empty())
            },
        )
        .await
        .unwrap();
    }

    // A write through each member; sequences are dense and shared.
    let mut seqs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        seqs.push(
            write(&n.node, &format!("n{i}"), "hello")
                .await
                .expect("write"),
        );
    }
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3]);

    // A linearizable read on every member sees all three, marked as of sequence ≥ 3.
    for n in &nodes {
        let r = n
            .node
            .owner_fold()
            .query(read_req(Consistency::Default))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(keys(&r), vec!["n0", "n1", "n2"]);
        let g = r.group.expect("group read info");
        assert!(g.linearizable && g.as_of_sequence >= 3, "{g:?}");
    }

    // The group's metrics on every member: entries committed, term, a known leader.
    for n in &nodes {
        let (code, text) = foldmesh_e2e::http::get(&n.node.admin, "/metrics").unwrap();
        assert_eq!(code, 200);
        let labels = [("schema", "Notes")];
        let committed =
            foldmesh_e2e::http::sample(&text, "fold_group_commit_seconds_count", &labels);
        assert!(committed.is_some_and(|c| c >= 3.0), "{committed:?}");
        let term = foldmesh_e2e::http::sample(&text, "fold_group_term", &labels);
        assert!(term.is_some_and(|t| t >= 1.0), "{term:?}");
        let has = foldmesh_e2e::http::sample(&text, "fold_group_has_leader", &labels);
        assert_eq!(has, Some(1.0));
    }

    // The same version ids everywhere (history of one field).
    let mut histories = Vec::new();
    for n in &nodes {
        let h = n
            .node
            .owner_fold()
            .history(fold_proto::v1::HistoryRequest {
                schema: "Notes".into(),
                field: "body".into(),
                range_key: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        histories.push(
            h.versions
                .iter()
                .map(|v| v.version_id.clone())
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        histories
            .iter()
            .all(|h| h == &histories[0] && !h.is_empty()),
        "{histories:?}"
    );

    // Kill the leader's fold-node; the first write through another member succeeds soon.
    let leader = group_of(&nodes[0].node).await.unwrap().leader_node_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let other = (li + 1) % 3;
    nodes[li].node.proc.kill9();
    let started = Instant::now();
    let mut n = 0;
    let seq = loop {
        n += 1;
        match write(&nodes[other].node, &format!("after-{n}"), "x").await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "no write within 15 s: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let took = started.elapsed();
    eprintln!("first write after killing the leader took {took:?} (sequence {seq})");
    assert!(took < Duration::from_secs(3), "failover took {took:?}");

    // Restart it on the same data: it comes back in step (LOCAL read, same head).
    let dir = nodes[li].node.data_dir.clone();
    nodes[li].node = NodeProc::start(&dir, NODE).unwrap();
    let want = group_of(&nodes[other].node).await.unwrap().head_sequence;
    eventually(
        "the restarted member to catch up",
        Duration::from_secs(20),
        || async {
            group_of(&nodes[li].node)
                .await
                .filter(|g| g.head_sequence >= want)
        },
    )
    .await
    .unwrap();
    let r = nodes[li]
        .node
        .owner_fold()
        .query(read_req(Consistency::Local))
        .await
        .unwrap()
        .into_inner();
    assert!(keys(&r).contains(&format!("after-{n}")), "{:?}", keys(&r));
    assert!(!r.group.unwrap().linearizable);
}
