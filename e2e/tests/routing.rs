//! Schema-addressed reads across a mesh in network namespaces: a client node with no data asks
//! "any node serving Notes" or "all of them". Three providers serve the schema, none named by
//! the client. One is slowed (a cgroup CPU quota; this kernel has no netem), one is killed and
//! restarted, one refuses 10% of requests (fault injection); the client keeps getting answers.
//! Every load loop is bounded in count and time; shares, not timings, are asserted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fold_proto::v1::{HistoryRequest, ListPeersRequest, MutationType, QueryRequest, Route};
use foldmesh_e2e::cgroup::CpuLimit;
use foldmesh_e2e::client::*;
use foldmesh_e2e::mesh::{Host, eventually, flags, start_host};
use foldmesh_e2e::netns::TestNet;
use serde_json::{Value as Json, json};
use tonic::Code;

fn notes() -> Json {
    schema(
        "Notes",
        Some("id"),
        json!({
            "id": field(json!("NoRequirement"), json!({"Distance": 1})),
            "body": field(json!({"Distance": 1}), json!({"Distance": 1})),
        }),
    )
}

const SIDECAR: &[&str] = &["--mdns", "on"];
/// Providers trust the client (an unknown peer to them) at distance 1; the route tests use
/// short provider TTLs so a restarted provider is confirmed again quickly.
const PROVIDER: &[&str] = &["--unknown-peer-distance", "1"];
const CLIENT: &[&str] = &["--provider-ttl-secs", "4"];

fn any_query() -> QueryRequest {
    let mut q = query_req("Notes", &["id", "body"], None);
    q.route = Route::Any as i32;
    q
}

/// One routed query's outcome: the node that answered and how many nodes were asked, or the
/// failure code.
type Outcome = Result<(String, u32), Code>;

/// `workers` concurrent loops of route-any queries from `client`, until `n` requests or `max`
/// time, whichever first. Returns (when it ended, outcome) per request.
async fn load(client: &str, workers: usize, n: usize, max: Duration) -> Vec<(Instant, Outcome)> {
    let started = Instant::now();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut c = fold(client);
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n
                && started.elapsed() < max
            {
                let mut req = tonic::Request::new(any_query());
                req.set_timeout(Duration::from_secs(5));
                let r = match c.query(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Ok((r.node_id, r.attempts))
                    }
                    Err(s) => Err(s.code()),
                };
                out.push((Instant::now(), r));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all.sort_by_key(|(t, _)| *t);
    eprintln!(
        "load: {} requests in {:?}, {} failed, shares {:?}",
        all.len(),
        started.elapsed(),
        failures(&all).len(),
        shares(&all)
    );
    all
}

fn shares(outcomes: &[(Instant, Outcome)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, o) in outcomes {
        if let Ok((n, _)) = o {
            *m.entry(n.clone()).or_insert(0) += 1;
        }
    }
    m
}

fn failures(outcomes: &[(Instant, Outcome)]) -> Vec<Code> {
    outcomes
        .iter()
        .filter_map(|(_, o)| o.as_ref().err().copied())
        .collect()
}

async fn setup(net: &TestNet, provider_extra: &[&[&str]; 3]) -> (Host, Vec<Host>) {
    let client = start_host(net, 0, &flags(SIDECAR), &flags(CLIENT)).expect("client host");
    // The client node holds the definition without approving it (it serves nothing): routed
    // reads use only providers with the same definition, policies included (docs/ROUTING.md).
    fold(&client.grpc())
        .load_schema(load_req(&notes(), false))
        .await
        .expect("load the definition on the client");
    let mut providers = Vec::new();
    for (i, extra) in provider_extra.iter().enumerate() {
        let mut f = flags(PROVIDER);
        f.extend(flags(extra));
        let h = start_host(net, i + 1, &flags(SIDECAR), &f).expect("provider host");
        fold(&h.grpc())
            .load_schema(load_req(&notes(), true))
            .await
            .expect("load schema");
        fold(&h.grpc())
            .mutate(mutate_req(
                "Notes",
                MutationType::Create,
                json!({"id": format!("from-{}", i + 1), "body": "hello"}),
            ))
            .await
            .expect("write a record");
        providers.push(h);
    }
    // The client finds all three through the DHT (mDNS connects them first).
    let ids: Vec<String> = providers.iter().map(|p| p.node_id.clone()).collect();
    eventually(
        "the client to find the three providers",
        Duration::from_secs(60),
        || async {
            let found = providers_of(&client.grpc(), "Notes").await?;
            ids.iter().all(|i| found.contains(i)).then_some(())
        },
    )
    .await
    .unwrap();
    (client, providers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_spreads_shifts_off_slow_fails_over_and_all_reports_each_node() {
    let net = TestNet::new(4).expect("test network (needs root; run scripts/test.sh as root)");
    let (client, mut providers) = setup(&net, &[&[], &[], &[]]).await;
    let c = client.grpc();
    let ids: Vec<String> = providers.iter().map(|p| p.node_id.clone()).collect();

    // A client that does not serve the schema asks "any": every answer comes from a provider, and the
    // load spreads over all three.
    let warm = load(&c, 2, 300, Duration::from_secs(60)).await;
    assert_eq!(failures(&warm), vec![], "route-any queries failed");
    let s = shares(&warm);
    for id in &ids {
        assert!(
            s.get(id).copied().unwrap_or(0) >= 3,
            "provider {id} got almost none of 300 routed queries: {s:?}"
        );
    }
    assert!(s.keys().all(|k| ids.contains(k)), "{s:?}");
    // Each answer carries that provider's record.
    let r = fold(&c).query(any_query()).await.unwrap().into_inner();
    assert_eq!(r.records.len(), 1);
    assert_eq!(r.attempts, 1);

    // The balancer's view is visible per peer.
    let peers = network(&c)
        .list_peers(ListPeersRequest {
            include_disconnected: false,
        })
        .await
        .unwrap()
        .into_inner()
        .peers;
    for id in &ids {
        let p = peers
            .iter()
            .find(|p| &p.node_id == id)
            .expect("provider listed");
        assert!(p.route_requests > 0, "{p:?}");
        assert!(p.route_latency_micros > 0, "{p:?}");
        assert_eq!(p.breaker, "closed", "{p:?}");
    }

    // "All": one answer per provider, tagged by node, each with its own record.
    let mut all = any_query();
    all.route = Route::All as i32;
    let r = fold(&c).query(all.clone()).await.unwrap().into_inner();
    assert!(r.records.is_empty());
    assert_eq!(r.node_id, client.node_id);
    let mut answered: Vec<(String, String)> = r
        .answers
        .iter()
        .map(|a| {
            assert_eq!(a.code, 0, "{a:?}");
            assert_eq!(a.records.len(), 1, "{a:?}");
            (a.node_id.clone(), a.records[0].range_key.clone())
        })
        .collect();
    answered.sort();
    let mut expected: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("from-{}", i + 1)))
        .collect();
    expected.sort();
    assert_eq!(answered, expected);

    // History by route too: any provider's versions of its record, and "all" per node.
    let mut h = HistoryRequest {
        schema: "Notes".into(),
        field: "body".into(),
        range_key: "from-1".into(),
        route: Route::All as i32,
        ..Default::default()
    };
    let hr = fold(&c).history(h.clone()).await.unwrap().into_inner();
    assert_eq!(hr.answers.len(), 3);
    let with_versions: Vec<_> = hr
        .answers
        .iter()
        .filter(|a| !a.versions.is_empty())
        .collect();
    assert_eq!(
        with_versions.len(),
        1,
        "only provider 1 has record from-1: {hr:?}"
    );
    assert_eq!(with_versions[0].node_id, ids[0]);
    h.route = 0;
    h.target_node_id = ids[0].clone();
    let named = fold(&c).history(h).await.unwrap().into_inner();
    assert_eq!(named.node_id, ids[0]);
    assert_eq!(named.versions.len(), 1);

    // Provider 3 is slowed: its processes share 2 ms of CPU per 100 ms. Traffic moves off it.
    let slow = CpuLimit::new("slow-provider", 2_000, 100_000).expect("cgroup");
    for p in [&providers[2].node, &providers[2].sidecar] {
        slow.add(p.as_ref().and_then(|p| p.pid()).expect("pid"))
            .expect("into the cgroup");
    }
    let slowed = load(&c, 2, 2_000, Duration::from_secs(12)).await;
    assert_eq!(
        failures(&slowed),
        vec![],
        "queries failed while a provider was slow"
    );
    let from = slowed[0].0 + Duration::from_secs(5);
    let late: Vec<_> = slowed.iter().filter(|(t, _)| *t >= from).cloned().collect();
    let s = shares(&late);
    let on_slow = s.get(&ids[2]).copied().unwrap_or(0);
    assert!(
        late.len() >= 20 && on_slow * 10 < late.len(),
        "5 s after slowing, the slow provider still got {on_slow} of {}: {s:?}",
        late.len()
    );
    drop(slow);

    // Provider 2 is killed under load: after a second, no client request fails.
    let loader = {
        let c = c.clone();
        tokio::spawn(async move { load(&c, 2, 5_000, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    providers[1].node.as_mut().expect("node").kill9();
    providers[1].sidecar.as_mut().expect("sidecar").kill9();
    let during = loader.await.unwrap();
    let after: Vec<_> = during
        .iter()
        .filter(|(t, _)| *t >= killed_at + Duration::from_secs(1))
        .cloned()
        .collect();
    let failed = failures(&after);
    assert!(
        after.len() >= 20 && failed.len() * 1000 < after.len(),
        "after the kill, {} of {} requests failed: {failed:?}",
        failed.len(),
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|(_, o)| o.as_ref().map_or(true, |(n, _)| n != &ids[1])),
        "a dead provider answered"
    );

    // "All" still lists the dead provider, with its failure: partial results are never silent.
    let r = fold(&c).query(all.clone()).await.unwrap().into_inner();
    assert_eq!(r.answers.len(), 3, "{r:?}");
    for a in &r.answers {
        if a.node_id == ids[1] {
            assert!(
                a.code == Code::Unavailable as i32 || a.code == Code::DeadlineExceeded as i32,
                "the dead provider's answer: {a:?}"
            );
            assert!(a.records.is_empty());
        } else {
            assert_eq!(a.code, 0, "{a:?}");
            assert_eq!(a.records.len(), 1, "{a:?}");
        }
    }

    // It comes back (same identity, same data): it gets traffic again.
    let p = &mut providers[1];
    p.start_sidecar(&net, &flags(SIDECAR))
        .expect("restart sidecar");
    p.start_node(&net, &flags(PROVIDER)).expect("restart node");
    let back = ids[1].clone();
    eventually(
        "the restarted provider to get routed traffic again",
        Duration::from_secs(90),
        || {
            let c = c.clone();
            let back = back.clone();
            async move {
                let o = load(&c, 1, 20, Duration::from_secs(5)).await;
                shares(&o).contains_key(&back).then_some(())
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_on_one_provider_are_absorbed_by_failover() {
    let net = TestNet::new(4).expect("test network (needs root; run scripts/test.sh as root)");
    // Provider 1 refuses 10% of requests from peers with UNAVAILABLE.
    let (client, providers) = setup(&net, &[&["--fault-percent", "10"], &[], &[]]).await;
    let c = client.grpc();
    let outcomes = load(&c, 2, 1_000, Duration::from_secs(60)).await;
    let failed = failures(&outcomes);
    let sent: u32 = outcomes
        .iter()
        .map(|(_, o)| o.as_ref().map_or(1, |(_, a)| *a))
        .sum();
    assert!(
        outcomes.len() >= 500,
        "only {} requests ran",
        outcomes.len()
    );
    // Fewer than 0.5% client-visible errors, at most 1.2 nodes asked per client request.
    assert!(
        failed.len() * 200 < outcomes.len(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    assert!(
        f64::from(sent) <= 1.2 * outcomes.len() as f64,
        "{sent} attempts for {} requests",
        outcomes.len()
    );
    // The faults happened, and the failovers show in the client's metrics.
    let peers = network(&c)
        .list_peers(ListPeersRequest {
            include_disconnected: false,
        })
        .await
        .unwrap()
        .into_inner()
        .peers;
    let faulty = peers
        .iter()
        .find(|p| p.node_id == providers[0].node_id)
        .expect("faulty provider listed");
    assert!(faulty.route_failures > 0, "{faulty:?}");

    // A refusal is not retried: a field the schema does not have fails once, as it is.
    let mut q = any_query();
    q.fields = vec!["nonexistent".into()];
    let e = fold(&c).query(q).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Route and target together, or a page token with a route, are refused.
    let mut q = any_query();
    q.target_node_id = providers[0].node_id.clone();
    assert_eq!(
        fold(&c).query(q).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A schema nobody serves: NOT_FOUND, not an empty answer.
    let mut q = any_query();
    q.schema = "Nobody".into();
    let e = fold(&c).query(q).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

/// Hedging (`--hedge-after-ms`): with one provider hung (SIGSTOP: its connection stays open, so
/// nothing tells the client node it is gone), a route-any read still unanswered after 50 ms is
/// also sent to the other provider, and that answer wins. Counted, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedged_reads_answer_around_a_hung_provider() {
    use foldmesh_e2e::loopback::start;
    let client = start(&["--hedge-after-ms", "50", "--provider-ttl-secs", "60"]);
    client
        .node
        .owner_fold()
        .load_schema(load_req(&notes(), false))
        .await
        .unwrap();
    let mut providers = Vec::new();
    for i in 0..2 {
        let p = start(&["--unknown-peer-distance", "1"]);
        p.node
            .owner_fold()
            .load_schema(load_req(&notes(), true))
            .await
            .unwrap();
        p.node
            .owner_fold()
            .mutate(mutate_req(
                "Notes",
                MutationType::Create,
                json!({"id": format!("from-{i}"), "body": "x"}),
            ))
            .await
            .unwrap();
        client.dial(&p).await;
        providers.push(p);
    }
    let c = client.node.grpc.clone();
    // Both providers are known (the set is cached for 60 s from here on).
    let both: Vec<String> = providers.iter().map(|p| p.id.clone()).collect();
    eventually(
        "route-any reads to reach both providers",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let both = both.clone();
            async move {
                let o = load(&c, 1, 20, Duration::from_secs(5)).await;
                let s = shares(&o);
                both.iter().all(|b| s.contains_key(b)).then_some(())
            }
        },
    )
    .await
    .unwrap();

    providers[0].node.proc.pause();
    let outcomes = load(&c, 2, 400, Duration::from_secs(3)).await;
    providers[0].node.proc.resume();
    assert_eq!(
        failures(&outcomes),
        vec![],
        "reads failed with a hung provider"
    );
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| o.as_ref().is_ok_and(|(n, _)| n == &providers[1].id)),
        "every answer came from the provider that was not hung"
    );
    let (_, metrics) = foldmesh_e2e::http::get(&client.node.admin, "/metrics").unwrap();
    let hedged: f64 = metrics
        .lines()
        .find(|l| l.starts_with("fold_route_retries_total{") && l.contains("outcome=\"hedged\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(hedged >= 1.0, "no hedged read was counted:\n{metrics}");
}

/// A subscription by schema (`route: ROUTE_ANY`) starts on a node serving it, and names that
/// node in its progress messages, so the subscriber can resume there; ROUTE_ALL is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_by_schema_names_the_node_it_runs_on() {
    use fold_proto::v1::{SubscribeRequest, subscribe_response};
    use foldmesh_e2e::loopback::start;
    let client = start(&[]);
    client
        .node
        .owner_fold()
        .load_schema(load_req(&notes(), false))
        .await
        .unwrap();
    let p = start(&["--unknown-peer-distance", "1"]);
    p.node
        .owner_fold()
        .load_schema(load_req(&notes(), true))
        .await
        .unwrap();
    for i in 0..3 {
        p.node
            .owner_fold()
            .mutate(mutate_req(
                "Notes",
                MutationType::Create,
                json!({"id": format!("n{i}"), "body": "x"}),
            ))
            .await
            .unwrap();
    }
    client.dial(&p).await;
    let req = SubscribeRequest {
        schema: "Notes".into(),
        fields: vec!["id".into(), "body".into()],
        route: Route::Any as i32,
        ..Default::default()
    };
    let c = client.node.grpc.clone();
    let mut stream = eventually(
        "a subscription by schema to start",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let req = req.clone();
            async move { fold(&c).subscribe(req).await.ok() }
        },
    )
    .await
    .unwrap()
    .into_inner();
    let mut changes = Vec::new();
    let mut named = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (changes.len() < 3 || named.is_none()) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(m))) => match m.event {
                Some(subscribe_response::Event::Change(ch)) => changes.push(ch.sequence),
                Some(subscribe_response::Event::Progress(pr)) => named = Some(pr.node_id),
                None => {}
            },
            other => panic!("the subscription ended: {other:?}"),
        }
    }
    assert_eq!(changes, vec![1, 2, 3]);
    assert_eq!(named.as_deref(), Some(p.id.as_str()));

    let mut all = req.clone();
    all.route = Route::All as i32;
    let e = fold(&c).subscribe(all).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}
