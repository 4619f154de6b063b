//! Linearizability of a 5-member group under leader kills, restarts and 2 | 3 partitions,
//! checked with stateright's `LinearizabilityTester` (one register per key: linearizability is
//! local, so checking each key's history on its own checks the whole).
//!
//! Replay a run with `FOLD_GROUP_SEED=<seed printed by the run>` (the fault schedule and each
//! client's choices follow the seed; thread interleavings still vary).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Cluster;
use fold_group::linearizability::{History, RegisterOp, RegisterRet, key_name};
use fold_group::{GroupConfig, NodeId};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const MEMBERS: [NodeId; 5] = [1, 2, 3, 4, 5];
const CLIENTS: u64 = 4;
/// Each client stops after this many calls or when the run time is up, whichever comes first.
const OPS_PER_CLIENT: usize = 400;
const RUN_TIME: Duration = Duration::from_secs(10);
const KEYS: usize = 3;
const RUN_BOUND: Duration = Duration::from_secs(90);
const BOUND: Duration = Duration::from_secs(20);

async fn client(c: Arc<Cluster>, history: Arc<History>, id: u64, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ (id.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut generation = 0u64;
    let mut audited = Vec::new();
    let start = Instant::now();
    for n in 0..OPS_PER_CLIENT {
        if start.elapsed() > RUN_TIME {
            break;
        }
        let live = c.live();
        let Some(&via) = live.choose(&mut rng) else {
            continue;
        };
        let thread = id * 1_000 + generation;
        let roll: f64 = rng.r#gen();
        if roll < 0.15 {
            // An audit write to a key of its own: must be present everywhere after healing.
            let key = format!("audit-{id}-{n}");
            if c.put_via(via, &key, "x").await.is_ok() {
                audited.push(key);
            }
        } else if roll < 0.55 {
            let key = rng.gen_range(0..KEYS);
            let value = format!("c{id}-{n}");
            let op = history.invoke(thread, key, RegisterOp::Write(Some(value.clone())));
            match c.put_via(via, &key_name(key), &value).await {
                Ok(_) => history.complete(op, RegisterRet::WriteOk),
                Err(e) if !e.is_indeterminate() => {
                    history.drop_call(op);
                    // Refused (no leader yet, or no quorum): back off a little before the next call.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // May or may not take effect: the call stays open forever, the client goes on
                // as a new thread.
                Err(_) => generation += 1,
            }
        } else {
            let key = rng.gen_range(0..KEYS);
            let op = history.invoke(thread, key, RegisterOp::Read);
            let read = match c.try_get(via) {
                Some(m) => {
                    let name = key_name(key);
                    m.read(move |sm, txn| sm.get(txn, &name)).await.ok()
                }
                None => None,
            };
            match read {
                Some(v) => history.complete(op, RegisterRet::ReadOk(v)),
                None => {
                    history.drop_call(op);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    audited
}

async fn nemesis(c: Arc<Cluster>, stop: Arc<AtomicBool>, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..600))).await;
        match rng.gen_range(0..3) {
            0 => {
                let leader = c.live().into_iter().find(|id| {
                    c.try_get(*id)
                        .is_some_and(|m| m.metrics().state == openraft::ServerState::Leader)
                });
                if let Some(leader) = leader {
                    log.push(format!("kill leader {leader}"));
                    c.down(leader).await;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
                    c.up(leader).await;
                }
            }
            1 => {
                let mut ids = MEMBERS.to_vec();
                ids.shuffle(&mut rng);
                let (a, b) = ids.split_at(2);
                log.push(format!("partition {a:?} | {b:?}"));
                c.partition(a, b);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1000))).await;
                c.heal();
            }
            _ => {
                let id = *MEMBERS.choose(&mut rng).unwrap_or(&1);
                log.push(format!("restart {id}"));
                c.restart(id).await;
            }
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_linearizable_under_kills_and_partitions() {
    let seed = std::env::var("FOLD_GROUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u64>());
    println!("FOLD_GROUP_SEED={seed}");
    let config = GroupConfig {
        write_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(1),
        snapshot_every: 100,
        keep_after_snapshot: 20,
        ..GroupConfig::default()
    };
    let started = Instant::now();
    let c = Arc::new(Cluster::start(&MEMBERS, config).await);
    let history = Arc::new(History::new(KEYS, None));
    let stop = Arc::new(AtomicBool::new(false));
    let faults = tokio::spawn(nemesis(c.clone(), stop.clone(), seed));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(c.clone(), history.clone(), id, seed)))
        .collect();
    let mut audited = Vec::new();
    for client in clients {
        audited.extend(
            tokio::time::timeout(RUN_BOUND, client)
                .await
                .expect("clients bounded")
                .expect("client"),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let faults = faults.await.expect("nemesis");
    println!("faults: {faults:?}");

    // Heal, bring everyone back, then read every key through every member.
    c.heal();
    for id in MEMBERS {
        if c.try_get(id).is_none() {
            c.up(id).await;
        }
    }
    let states = c.converged(BOUND).await;
    for (i, id) in MEMBERS.iter().enumerate() {
        for key in 0..KEYS {
            let thread = 1_000_000 + (i * KEYS + key) as u64;
            let op = history.invoke(thread, key, RegisterOp::Read);
            let read_started = Instant::now();
            let v = loop {
                let name = key_name(key);
                match c.get(*id).read(move |sm, txn| sm.get(txn, &name)).await {
                    Ok(v) => break v,
                    // A member just back may not know the leader yet.
                    Err(e) => assert!(
                        read_started.elapsed() < BOUND,
                        "final read through {id}: {e}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            history.complete(op, RegisterRet::ReadOk(v));
        }
    }
    let first = &states[&MEMBERS[0]];
    assert!(
        states.values().all(|s| s == first),
        "members differ after healing"
    );
    for key in &audited {
        assert!(
            states.values().all(|s| s.contains_key(key)),
            "acknowledged write {key} lost"
        );
    }

    let check_started = Instant::now();
    let verdict = history
        .check_within(Duration::from_secs(60))
        .expect("linearizability check bounded");
    let (completed, pending) = verdict.unwrap_or_else(|e| panic!("FOLD_GROUP_SEED={seed}: {e}"));
    println!(
        "linearizable: {completed} completed calls, {pending} indeterminate, {} refused, {} audited writes, \
         {} faults; run {:?}, check {:?}",
        history.dropped(),
        audited.len(),
        faults.len(),
        started.elapsed(),
        check_started.elapsed()
    );
    c.stop().await;
}
