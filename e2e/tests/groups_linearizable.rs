//! Linearizability of a 5-member schema group with real processes in network namespaces: client
//! tasks write (Mutate UPDATE) and read (Query, default consistency: linearizable) a few
//! registers through different members, recording each call's invocation and completion, while a
//! nemesis SIGKILLs and restarts the leader's fold-node and cuts the network into 2 | 3
//! partitions and heals it, at random. The history is checked per key with stateright's
//! `LinearizabilityTester` (linearizability is local: each key on its own checks the whole).
//! Calls refused before anything was proposed are left out; calls that may have taken effect
//! (deadlines, a connection lost mid-call) stay open. After healing, every acknowledged write
//! (audit CREATEs of keys of their own) is on every member, and all members hold the same data.
//!
//! The seed is printed; `FOLD_GROUP_SEED=<seed>` replays the fault schedule and the clients'
//! choices (process and network timings still vary).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fold_group::linearizability::{History, RegisterOp, RegisterRet, key_name};
use fold_proto::v1::{Consistency, HistoryRequest, MutationType};
use foldmesh_e2e::client::fold;
use foldmesh_e2e::groups::{
    Failure, GroupNet, PARTITION_TIMINGS, SCHEMA, classify_write_error, describe, read_from,
    with_deadline, write_to, write_until_ok,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const MEMBERS: [usize; 5] = [0, 1, 2, 3, 4];
const CLIENTS: u64 = 4;
const KEYS: usize = 6;
/// How long the clients and the nemesis run.
const RUN_TIME: Duration = Duration::from_secs(30);
/// Deadline of one call.
const CALL: Duration = Duration::from_secs(3);
/// Fail-fast bound of the convergence after healing.
const CONVERGE: Duration = Duration::from_secs(45);
const INITIAL: &str = "init";
/// Fail-fast bound of the linearizability check (open calls make its search grow fast; more
/// keys keep fewer open calls on each).
const CHECK_BOUND: Duration = Duration::from_secs(90);

#[derive(Default)]
struct ClientReport {
    audited: Vec<String>,
    ok: usize,
    refused: usize,
    open: usize,
    errors: BTreeMap<String, usize>,
}

impl ClientReport {
    fn note(&mut self, e: &tonic::Status) {
        let mut m = format!("{:?}: {}", e.code(), e.message());
        m.truncate(100);
        *self.errors.entry(m).or_default() += 1;
    }
}

/// One client: calls through random members until the run time is up.
async fn client(addrs: Vec<String>, history: Arc<History>, id: u64, seed: u64) -> ClientReport {
    let mut rng = StdRng::seed_from_u64(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut generation = 0u64;
    let mut report = ClientReport::default();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_TIME {
        n += 1;
        let Some(via) = addrs.choose(&mut rng) else {
            break;
        };
        let thread = id * 1_000 + generation;
        let roll: f64 = rng.r#gen();
        if roll < 0.15 {
            // An audit write to a key of its own: if acknowledged, it must be everywhere later.
            let key = format!("audit-{id}-{n}");
            match write_to(via, MutationType::Create, &key, "x", CALL).await {
                Ok(_) => report.audited.push(key),
                Err(e) => report.note(&e),
            }
        } else if roll < 0.55 {
            let key = rng.gen_range(0..KEYS);
            let value = format!("c{id}-{n}");
            let op = history.invoke(thread, key, RegisterOp::Write(Some(value.clone())));
            match write_to(via, MutationType::Update, &key_name(key), &value, CALL).await {
                Ok(_) => {
                    report.ok += 1;
                    history.complete(op, RegisterRet::WriteOk);
                }
                Err(e) => {
                    report.note(&e);
                    if classify_write_error(&e) == Failure::Refused {
                        report.refused += 1;
                        history.drop_call(op);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    } else {
                        // May still take effect: the call stays open for ever, and the client
                        // goes on as a new thread.
                        report.open += 1;
                        generation += 1;
                    }
                }
            }
        } else {
            let key = rng.gen_range(0..KEYS);
            let op = history.invoke(thread, key, RegisterOp::Read);
            match read_from(via, &key_name(key), Consistency::Default, CALL).await {
                Ok(v) => {
                    report.ok += 1;
                    history.complete(op, RegisterRet::ReadOk(v));
                }
                Err(e) => {
                    // A failed read has no effect.
                    report.note(&e);
                    report.refused += 1;
                    history.drop_call(op);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    report
}

/// A running member that says it leads (with a quorum or not), polled for at most 3 s.
async fn current_leader(g: &GroupNet) -> Option<usize> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        for i in MEMBERS {
            if !g.node_running(i) {
                continue;
            }
            if let Some(s) = g.status(i).await
                && s.role == "leader"
            {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn sleep_ms(rng: &mut StdRng, lo: u64, hi: u64) {
    tokio::time::sleep(Duration::from_millis(rng.gen_range(lo..hi))).await;
}

/// Faults at random until the run time is up; returns what it did.
async fn nemesis(g: &mut GroupNet, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    let start = Instant::now();
    // Let the clients start on a healthy group.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while start.elapsed() + Duration::from_secs(3) < RUN_TIME {
        let t = start.elapsed().as_secs_f64();
        match rng.gen_range(0..3) {
            0 => match current_leader(g).await {
                Some(leader) => {
                    log.push(format!("{t:.1}s kill -9 leader host {leader}"));
                    g.kill_node(leader);
                    sleep_ms(&mut rng, 300, 2000).await;
                    g.restart_node(leader)
                        .unwrap_or_else(|e| panic!("restart host {leader}: {e:#}"));
                }
                None => log.push(format!("{t:.1}s (no leader to kill)")),
            },
            1 => {
                let mut ids = MEMBERS.to_vec();
                ids.shuffle(&mut rng);
                let (a, b) = ids.split_at(2);
                log.push(format!("{t:.1}s partition {a:?} | {b:?}"));
                g.partition(a, b).expect("partition");
                sleep_ms(&mut rng, 500, 3000).await;
                g.heal().expect("heal");
            }
            _ => {
                // A partition that isolates the current leader with one other member.
                match current_leader(g).await {
                    Some(leader) => {
                        let mut rest: Vec<usize> =
                            MEMBERS.iter().copied().filter(|&i| i != leader).collect();
                        rest.shuffle(&mut rng);
                        let a = [leader, rest[0]];
                        let b = &rest[1..];
                        log.push(format!("{t:.1}s partition leader side {a:?} | {b:?}"));
                        g.partition(&a, b).expect("partition");
                        sleep_ms(&mut rng, 500, 3000).await;
                        g.heal().expect("heal");
                    }
                    None => log.push(format!("{t:.1}s (no leader to isolate)")),
                }
            }
        }
        sleep_ms(&mut rng, 300, 1500).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_stay_linearizable_under_leader_kills_and_partitions() {
    let seed = std::env::var("FOLD_GROUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u64>());
    println!("FOLD_GROUP_SEED={seed}");
    let started = Instant::now();
    let mut g = GroupNet::start(5, PARTITION_TIMINGS)
        .await
        .expect("five hosts");
    let leader = g.form(&MEMBERS).await.expect("a 5-member group");
    println!(
        "group formed in {:?}; leader host {leader}",
        started.elapsed()
    );
    for key in 0..KEYS {
        write_until_ok(
            &g,
            leader,
            MutationType::Create,
            &key_name(key),
            INITIAL,
            Duration::from_secs(10),
        )
        .await
        .expect("initial registers");
    }

    let history = Arc::new(History::new(KEYS, Some(INITIAL.to_string())));
    let addrs: Vec<String> = MEMBERS.iter().map(|&i| g.grpc(i)).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(addrs.clone(), history.clone(), id, seed)))
        .collect();
    let faults = nemesis(&mut g, seed).await;
    let mut reports = Vec::new();
    for c in clients {
        reports.push(
            tokio::time::timeout(RUN_TIME + Duration::from_secs(30), c)
                .await
                .expect("clients stop after the run time")
                .expect("client task"),
        );
    }
    println!("faults ({}): {faults:#?}", faults.len());

    // Heal, bring every member back, and wait until they all applied the same log.
    g.heal().expect("heal");
    for i in MEMBERS {
        if !g.node_running(i) {
            g.restart_node(i).expect("restart");
        }
    }
    let data = match g.converged(&MEMBERS, CONVERGE).await {
        Ok(d) => d,
        Err(e) => panic!("FOLD_GROUP_SEED={seed}: {e:#}"),
    };

    // Final reads of every key through every member join the history.
    for (n, &i) in MEMBERS.iter().enumerate() {
        for key in 0..KEYS {
            let thread = 1_000_000 + (n * KEYS + key) as u64;
            let op = history.invoke(thread, key, RegisterOp::Read);
            // A member may still be confirming its leader right after healing: retried, bounded.
            let read_started = Instant::now();
            let v = loop {
                match read_from(&g.grpc(i), &key_name(key), Consistency::Default, CALL).await {
                    Ok(v) => break v,
                    Err(e) => assert!(
                        read_started.elapsed() < Duration::from_secs(20),
                        "FOLD_GROUP_SEED={seed}: final read of {key} through host {i}: {e:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            history.complete(op, RegisterRet::ReadOk(v));
        }
    }

    // Every acknowledged write is on every member (their copies are equal, checked above).
    let audited: Vec<&String> = reports.iter().flat_map(|r| &r.audited).collect();
    for key in &audited {
        assert!(
            data.get(*key).is_some_and(|v| v == "x"),
            "FOLD_GROUP_SEED={seed}: acknowledged write {key} lost after healing"
        );
    }
    // The registers' version histories are the same on every member (version ids included).
    for key in 0..KEYS {
        let mut first: Option<Vec<String>> = None;
        // (version id, previous version id, sequence) of each version, newest first.
        for i in MEMBERS {
            let h = fold(&g.grpc(i))
                .history(with_deadline(
                    HistoryRequest {
                        schema: SCHEMA.into(),
                        field: "v".into(),
                        range_key: key_name(key),
                        ..Default::default()
                    },
                    Duration::from_secs(10),
                ))
                .await
                .unwrap_or_else(|e| panic!("history of {key} on host {i}: {e:?}"))
                .into_inner();
            let ids: Vec<String> = h
                .versions
                .iter()
                .map(|v| {
                    format!(
                        "{}<-{} #{}",
                        v.version_id, v.previous_version_id, v.sequence
                    )
                })
                .collect();
            match &first {
                None => first = Some(ids),
                Some(want) => assert_eq!(
                    want,
                    &ids,
                    "FOLD_GROUP_SEED={seed}: history of {} differs on host {i}",
                    key_name(key)
                ),
            }
        }
    }

    // Counted before the check, which holds the history's locks while it runs.
    let events = history.events();
    let left_out = history.dropped();
    let check_started = Instant::now();
    let verdict = history.check_within(CHECK_BOUND).unwrap_or_else(|| {
        panic!(
            "FOLD_GROUP_SEED={seed}: linearizability check not done in {CHECK_BOUND:?} \
             ({events} events recorded, {left_out} calls left out)"
        )
    });
    let (completed, open) = verdict.unwrap_or_else(|e| panic!("FOLD_GROUP_SEED={seed}: {e}"));
    let refused = history.dropped();
    let mut errors: BTreeMap<&String, usize> = BTreeMap::new();
    for r in &reports {
        for (e, n) in &r.errors {
            *errors.entry(e).or_default() += n;
        }
    }
    println!("errors seen by clients: {errors:#?}");
    let st = g.statuses(&MEMBERS).await;
    println!("final statuses:\n{}", describe(&st));
    println!(
        "FOLD_GROUP_SEED={seed} linearizable: {completed} completed calls, {open} open (indeterminate), \
         {refused} refused/failed, {} acknowledged audit writes, {} faults; {} records; \
         run {:?}, check {:?}",
        audited.len(),
        faults.len(),
        data.len(),
        started.elapsed(),
        check_started.elapsed()
    );
    assert!(
        completed > 10,
        "FOLD_GROUP_SEED={seed}: only {completed} calls completed: the group hardly served"
    );
}
