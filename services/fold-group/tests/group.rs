//! Integration tests of one group: real openraft, real redb files, in-process links.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, node, wait_for};
use fold_group::kv::{KvCommand, KvReply};
use fold_group::{GroupConfig, WriteError};
use openraft::ServerState;
use openraft::storage::RaftStorage;

const BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_commit_apply_and_agree() {
    let c = Cluster::start(&[1, 2, 3], GroupConfig::default()).await;
    let leader = c.leader(BOUND).await;
    for i in 0..20 {
        let reply = c
            .put_via(leader, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write on the leader");
        assert_eq!(reply, KvReply::Applied { previous: None });
        // Acknowledged means committed and applied: the leader's own state has it already.
        let got = c
            .get(leader)
            .read_local(move |sm, txn| sm.get(txn, &format!("k{i}")))
            .await
            .expect("read");
        assert_eq!(got.as_deref(), Some(format!("v{i}").as_str()));
    }
    // A follower refuses to propose and names the leader.
    let follower = c
        .live()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let err = c
        .get(follower)
        .write(KvCommand::Delete { key: "k0".into() }.encode())
        .await
        .expect_err("not leader");
    assert_eq!(
        err,
        WriteError::NotLeader {
            leader: Some(leader)
        }
    );
    // Linearizable reads through a follower (read index from the leader).
    let got = c
        .get(follower)
        .read(|sm, txn| sm.get(txn, "k19"))
        .await
        .expect("follower read");
    assert_eq!(got.as_deref(), Some("v19"));

    let states = c.converged(BOUND).await;
    let status = c.get(leader).status();
    println!("leader status: {status:?}");
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.has_quorum);
    assert_eq!(status.lag.as_ref().map(|l| l.len()), Some(3));
    let first = states.values().next().cloned().unwrap_or_default();
    assert_eq!(first.len(), 20);
    assert!(
        states.values().all(|s| *s == first),
        "members differ: {states:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_write_after_leader_killed_within_3s() {
    let c = Cluster::start(&[1, 2, 3], GroupConfig::default()).await;
    c.put("before", "1", BOUND).await;
    let old = c.leader(BOUND).await;
    c.down(old).await;
    let start = Instant::now();
    c.put("after", "2", Duration::from_secs(3)).await;
    let elapsed = start.elapsed();
    println!("failover: leader {old} killed -> first acknowledged write after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "failover took {elapsed:?}"
    );
    let new = c.leader(BOUND).await;
    assert_ne!(new, old);
    c.up(old).await;
    let states = c.converged(BOUND).await;
    assert!(
        states
            .values()
            .all(|s| s.get("before").is_some() && s.get("after").is_some()),
        "{states:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_side_never_acknowledges() {
    let c = Cluster::start(&[1, 2, 3, 4, 5], GroupConfig::default()).await;
    c.put("base", "0", BOUND).await;
    let leader = c.leader(BOUND).await;
    // The old leader and one follower on the minority side.
    let other = c
        .live()
        .into_iter()
        .find(|id| *id != leader)
        .expect("another member");
    let minority = [leader, other];
    let majority: Vec<u64> = c
        .live()
        .into_iter()
        .filter(|id| !minority.contains(id))
        .collect();
    c.partition(&minority, &majority);

    // Majority side elects its own leader and takes writes.
    let new_leader = c.leader_among(&majority, BOUND).await;
    // Meanwhile every write offered on the minority side is refused (naming a leader) or times
    // out; none is acknowledged.
    let mut refusals = Vec::new();
    for i in 0..6 {
        let via = minority[i % 2];
        let key = format!("minority-{i}");
        match c
            .get(via)
            .write(
                KvCommand::Put {
                    key: key.clone(),
                    value: "x".into(),
                }
                .encode(),
            )
            .await
        {
            Ok(_) => panic!("minority member {via} acknowledged {key}"),
            Err(e) => refusals.push(e),
        }
    }
    println!("minority refusals: {refusals:?}");
    // The old leader knows it has lost its majority (what `foldctl check` will report).
    assert!(!c.get(leader).status().has_quorum);
    assert!(refusals.iter().any(|e| matches!(
        e,
        WriteError::NotLeader { .. } | WriteError::NoQuorum { .. }
    )));
    let start = Instant::now();
    while let Err(e) = c.put_via(new_leader, "majority", "1").await {
        assert!(start.elapsed() < BOUND, "majority side write refused: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    c.heal();
    let states = c.converged(BOUND).await;
    for (id, s) in &states {
        assert_eq!(
            s.get("majority").map(String::as_str),
            Some("1"),
            "member {id}"
        );
        assert!(
            s.keys().all(|k| !k.starts_with("minority-")),
            "member {id} has a minority write: {s:?}"
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_redb_keeps_log_vote_and_data() {
    let c = Cluster::start(&[1, 2, 3], GroupConfig::default()).await;
    for i in 0..30 {
        c.put(&format!("k{i}"), &format!("v{i}"), BOUND).await;
    }
    let before: BTreeMap<u64, _> = c
        .live()
        .into_iter()
        .map(|id| (id, c.get(id).metrics()))
        .collect();
    let data_before = c.converged(BOUND).await;

    // Crash every member, then bring them back from their files.
    c.stop().await;
    for id in [1, 2, 3] {
        let m = c.up(id).await;
        // Read what the store hands openraft on restart.
        let mut store = m.store().clone();
        let vote = RaftStorage::read_vote(&mut store).await.expect("read vote");
        let log = RaftStorage::get_log_state(&mut store)
            .await
            .expect("log state");
        let (applied, _membership) = RaftStorage::last_applied_state(&mut store)
            .await
            .expect("applied state");
        let b = &before[&id];
        assert!(
            vote.as_ref() >= Some(&b.vote),
            "member {id} vote went back: {:?} -> {vote:?}",
            b.vote
        );
        assert!(
            log.last_log_id.map(|l| l.index) >= b.last_log_index,
            "member {id} lost log entries"
        );
        assert!(
            applied >= b.last_applied,
            "member {id} applied id went back"
        );
        // The applied state is there before any new leader exists.
        let data = c.dump(id).await;
        assert_eq!(data, data_before[&id], "member {id} lost applied data");
        assert_eq!(data.len(), 30);
        drop((m, store));
    }
    c.put("after-restart", "1", BOUND).await;
    let states = c.converged(BOUND).await;
    assert!(states.values().all(|s| s.len() == 31), "{states:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_down_past_compaction_catches_up_by_snapshot() {
    let config = GroupConfig {
        snapshot_every: 40,
        keep_after_snapshot: 5,
        snapshot_chunk_bytes: 512,
        ..GroupConfig::default()
    };
    let c = Cluster::start(&[1, 2, 3], config).await;
    c.put("first", "1", BOUND).await;
    let leader = c.leader(BOUND).await;
    let lagging = c
        .live()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let lag_index = c.get(lagging).metrics().last_log_index.unwrap_or(0);
    c.down(lagging).await;
    for i in 0..150 {
        c.put(&format!("k{i:03}"), &format!("value-{i}"), BOUND)
            .await;
    }
    let leader = c.leader(BOUND).await;
    let l = c.get(leader);
    wait_for("the leader to compact its log", BOUND, || {
        l.metrics().purged.is_some_and(|p| p.index > lag_index + 1)
    })
    .await;
    let purged = l.metrics().purged;
    println!(
        "leader purged its log up to {purged:?}; lagging member {lagging} stopped at {lag_index}"
    );

    let started = Instant::now();
    let m = c.up(lagging).await;
    let states = c.converged(BOUND).await;
    let took = started.elapsed();
    let snap = m.metrics().snapshot;
    println!("member {lagging} caught up in {took:?}; its snapshot is at {snap:?}");
    assert!(
        snap.is_some_and(|s| Some(s.index) >= purged.map(|p| p.index)),
        "no snapshot installed: {snap:?}"
    );
    assert_eq!(states[&lagging], states[&leader]);
    assert_eq!(states[&lagging].len(), 151);
    drop((l, m));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_write_load_lose_nothing() {
    let c = Arc::new(Cluster::start(&[1, 2, 3], GroupConfig::default()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load-{i}");
                let leader = c.leader(BOUND).await;
                if c.put_via(leader, &key, "x").await.is_ok() {
                    acked.push(key);
                }
                i += 1;
            }
            acked
        })
    };
    // Add member 4 as a learner, then promote it (joint consensus to {1,2,3,4}).
    c.up(4).await;
    let leader = c.leader(BOUND).await;
    c.get(leader)
        .add_learner(4, node(4))
        .await
        .expect("add learner");
    let leader = c.leader(BOUND).await;
    c.get(leader)
        .set_voters(BTreeSet::from([1, 2, 3, 4]))
        .await
        .expect("promote 4");

    // Remove a voter that is not the leader.
    let leader = c.leader(BOUND).await;
    let removed = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower to remove");
    let keep: BTreeSet<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != removed)
        .collect();
    c.get(leader)
        .set_voters(keep.clone())
        .await
        .expect("remove member");
    c.down(removed).await;

    // Replace a dead member: kill one more (not the leader), add 5 in its place.
    let leader = c.leader(BOUND).await;
    let dead = keep
        .iter()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    c.down(dead).await;
    c.up(5).await;
    let leader = c.leader(BOUND).await;
    c.get(leader)
        .add_learner(5, node(5))
        .await
        .expect("add learner 5");
    let replaced: BTreeSet<u64> = keep
        .iter()
        .copied()
        .filter(|id| *id != dead)
        .chain([5])
        .collect();
    let leader = c.leader(BOUND).await;
    c.get(leader)
        .set_voters(replaced.clone())
        .await
        .expect("replace dead member");

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    println!(
        "{} writes acknowledged during the membership changes",
        acked.len()
    );
    assert!(!acked.is_empty());

    let states = c.converged(BOUND).await;
    let leader = c.leader(BOUND).await;
    let voters: BTreeSet<u64> = c
        .get(leader)
        .metrics()
        .membership_config
        .voter_ids()
        .collect();
    assert_eq!(voters, replaced);
    for id in &replaced {
        let s = &states[id];
        let missing: Vec<&String> = acked.iter().filter(|k| !s.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "member {id} lost acknowledged writes: {missing:?}"
        );
    }
    assert_eq!(c.get(leader).metrics().state, ServerState::Leader);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_are_refused_and_counted() {
    let c = Cluster::start(&[1, 2, 3], GroupConfig::default()).await;
    let leader = c.leader(BOUND).await;
    let m = c.get(leader);
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(1_000, 99), None);
    let req =
        fold_group::network::encode(&fold_group::network::RaftRpc::Vote(vote)).expect("encode");
    let reply = m.handle_rpc(99, &req).await;
    let reply: fold_group::network::RaftRpcReply =
        fold_group::network::decode(&reply).expect("decode");
    assert!(
        matches!(reply, fold_group::network::RaftRpcReply::Refused(_)),
        "{reply:?}"
    );
    assert_eq!(m.refused_count(), 1);
    // The outsider's higher term did not disturb the leader.
    assert_eq!(c.leader(BOUND).await, leader);
    drop(m);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_one_redb_file() {
    use fold_group::kv::KvStateMachine;
    use fold_group::{Group, GroupId};

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.redb");
    let ids = [
        GroupId::new("people").expect("id"),
        GroupId::new("places").expect("id"),
    ];
    for round in 0..2 {
        let db = common::open_db(&path).await;
        let mut groups = Vec::new();
        for gid in &ids {
            let sm = Arc::new(KvStateMachine::new(gid));
            let router = Arc::new(common::Router::default());
            let g = Group::open(
                db.clone(),
                gid.clone(),
                1,
                GroupConfig::default(),
                sm,
                router,
            )
            .await
            .expect("open");
            if round == 0 {
                g.initialize(BTreeMap::from([(1, node(1))]))
                    .await
                    .expect("initialize");
            }
            g.raft()
                .wait(Some(BOUND))
                .state(ServerState::Leader, "single member leads")
                .await
                .expect("leader");
            groups.push(g);
        }
        for (i, g) in groups.iter().enumerate() {
            let key = format!("round-{round}");
            g.write(
                KvCommand::Put {
                    key,
                    value: ids[i].to_string(),
                }
                .encode(),
            )
            .await
            .expect("write");
        }
        for (i, g) in groups.iter().enumerate() {
            let all = g.read(|sm, txn| sm.all(txn)).await.expect("read");
            // Each group sees only its own data, and the first round survived the reopen.
            assert_eq!(all.len(), round + 1, "{all:?}");
            assert!(all.values().all(|v| *v == ids[i].to_string()), "{all:?}");
        }
        for g in &groups {
            g.shutdown().await.expect("shutdown");
        }
        drop(groups);
        drop(db);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_commands_replicate_in_split_appends() {
    // An append must complete within one heartbeat interval (openraft 0.9): give megabyte
    // batches of this unoptimized build time enough.
    let config = GroupConfig {
        heartbeat_interval: Duration::from_millis(500),
        election_timeout_min: Duration::from_millis(1500),
        election_timeout_max: Duration::from_millis(3000),
        ..GroupConfig::default()
    };
    let c = Cluster::start(&[1, 2, 3], config).await;
    let leader = c.leader(BOUND).await;
    let lagging = c
        .live()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    c.down(lagging).await;
    // 12 commands of 150 KiB (300 KiB as hex): the lagging member's catch-up batch is several
    // messages.
    let big = "v".repeat(150 * 1024);
    for i in 0..12 {
        let cmd = KvCommand::Put {
            key: format!("big-{i}"),
            value: big.clone(),
        }
        .encode();
        let reply = c.get(leader).write(cmd).await.expect("big write");
        // The kv machine refuses values over 64 KiB, but the entry is in the log all the same.
        assert!(matches!(
            KvReply::decode(&reply),
            Some(KvReply::Refused { .. })
        ));
    }
    c.put("small", "1", BOUND).await;
    let over = vec![b'x'; GroupConfig::default().max_command_bytes + 1];
    assert!(matches!(
        c.get(leader).write(over).await,
        Err(WriteError::Refused(_))
    ));
    c.up(lagging).await;
    let states = c.converged(BOUND).await;
    assert_eq!(states[&lagging].get("small").map(String::as_str), Some("1"));
    c.stop().await;
}
