//! Choosing one provider of a schema: power-of-two-choices over a peak-EWMA latency estimate,
//! with a penalty for failures (Finagle's and Linkerd's balancer, docs/ROUTING.md).
//!
//! Why not `tower::balance::p2c` over `tower::load::PeakEwma`: those balance over a set of
//! *services*, one per endpoint, each driven through `poll_ready`. Here every endpoint is reached
//! through the same sidecar channel (the target node is part of the request), a failed read must
//! be retried on a *different* provider than the one that failed (tower's `Balance` cannot
//! exclude an endpoint for one request), and the estimates must be readable for
//! `Network.ListPeers` and metrics. The arithmetic is tower's `PeakEwma` (peak-sensitive, decaying
//! toward zero while idle, cost = estimate × (in-flight + 1)); this module adds the failure
//! penalty, exclusion and a bounded map, and is unit-tested below with injected time and
//! randomness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tuning of the balancer.
#[derive(Debug, Clone, Copy)]
pub struct BalanceConfig {
    /// How fast an estimate forgets: the weight of an old sample after `decay` is 1/e. An idle
    /// endpoint's estimate decays toward zero, so a slow or failed one is tried again after a
    /// while (about decay × ln(penalty / healthy latency)).
    pub decay: Duration,
    /// The latency a failure counts as, so a provider that fails fast does not look fast.
    pub failure_penalty: Duration,
    /// Most endpoints remembered; idle ones least recently used are forgotten first.
    pub max_endpoints: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            decay: Duration::from_secs(5),
            failure_penalty: Duration::from_millis(250),
            max_endpoints: 1024,
        }
    }
}

#[derive(Debug, Clone)]
struct Endpoint {
    /// Peak-EWMA latency, nanoseconds; `None` until the first outcome (cost 0 then: a new
    /// provider is tried at once, as Finagle does).
    rtt_ns: Option<f64>,
    updated: Instant,
    in_flight: u32,
    requests: u64,
    failures: u64,
    last_used: Instant,
}

/// What the balancer knows of one endpoint, for ListPeers and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointStats {
    /// The estimate decayed to now (zero before the first outcome).
    pub latency: Duration,
    pub in_flight: u32,
    pub requests: u64,
    pub failures: u64,
}

#[derive(Debug)]
pub struct Balancer {
    config: BalanceConfig,
    map: Mutex<HashMap<String, Endpoint>>,
}

impl Endpoint {
    fn new(now: Instant) -> Self {
        Endpoint {
            rtt_ns: None,
            updated: now,
            in_flight: 0,
            requests: 0,
            failures: 0,
            last_used: now,
        }
    }

    fn decayed(&self, now: Instant, decay: Duration) -> f64 {
        let Some(rtt) = self.rtt_ns else { return 0.0 };
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        rtt * (-elapsed / decay.as_nanos().max(1) as f64).exp()
    }

    fn cost(&self, now: Instant, decay: Duration) -> f64 {
        self.decayed(now, decay) * f64::from(self.in_flight.saturating_add(1))
    }

    /// Peak-sensitive update: a slower sample replaces the estimate at once; a faster one is
    /// blended in by how long ago the last update was.
    fn observe(&mut self, sample_ns: f64, now: Instant, decay: Duration) {
        let next = match self.rtt_ns {
            None => sample_ns,
            Some(_) => {
                let current = self.decayed(now, decay);
                if sample_ns > current {
                    sample_ns
                } else {
                    // `current` is the old estimate × w, w = e^(-elapsed/decay): the
                    // time-weighted EWMA of tower's PeakEwma.
                    let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
                    let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
                    current + sample_ns * (1.0 - w)
                }
            }
        };
        self.rtt_ns = Some(next);
        self.updated = now;
    }
}

impl Balancer {
    pub fn new(config: BalanceConfig) -> Arc<Self> {
        Arc::new(Balancer {
            config,
            map: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Endpoint>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Choose among `candidates` (distinct ids): two at random (`rand(n)` gives an index below
    /// n), the one with the lower cost wins. `None` when there are none.
    pub fn pick(
        &self,
        candidates: &[String],
        now: Instant,
        mut rand: impl FnMut(usize) -> usize,
    ) -> Option<String> {
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let a = rand(n) % n;
                let b = (a + 1 + rand(n - 1) % (n - 1)) % n;
                let map = self.lock();
                let cost =
                    |id: &String| map.get(id).map_or(0.0, |e| e.cost(now, self.config.decay));
                let (ca, cb) = (cost(&candidates[a]), cost(&candidates[b]));
                Some(if cb < ca {
                    candidates[b].clone()
                } else {
                    candidates[a].clone()
                })
            }
        }
    }

    /// A request to `node` starts: counted in flight until its guard finishes or is dropped.
    pub fn start(self: &Arc<Self>, node: &str, now: Instant) -> InFlight {
        let mut map = self.lock();
        if !map.contains_key(node) && map.len() >= self.config.max_endpoints {
            // Forget the least recently used idle endpoint; if all are busy, this one is
            // balanced without memory (the map stays bounded).
            if let Some(oldest) = map
                .iter()
                .filter(|(_, e)| e.in_flight == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let tracked = if map.len() < self.config.max_endpoints || map.contains_key(node) {
            let e = map
                .entry(node.to_string())
                .or_insert_with(|| Endpoint::new(now));
            e.in_flight = e.in_flight.saturating_add(1);
            e.requests = e.requests.saturating_add(1);
            e.last_used = now;
            true
        } else {
            false
        };
        InFlight {
            balancer: self.clone(),
            node: node.to_string(),
            started: now,
            tracked,
            finished: false,
        }
    }

    /// Forget what was learnt of `node`'s latency (it came back after a disconnection): it is
    /// tried again at once, like a new endpoint. Its counters stay.
    pub fn reset_estimate(&self, node: &str) {
        if let Some(e) = self.lock().get_mut(node) {
            e.rtt_ns = None;
        }
    }

    pub fn stats(&self, node: &str, now: Instant) -> Option<EndpointStats> {
        self.lock().get(node).map(|e| EndpointStats {
            latency: Duration::from_nanos(e.decayed(now, self.config.decay) as u64),
            in_flight: e.in_flight,
            requests: e.requests,
            failures: e.failures,
        })
    }

    fn finish(&self, node: &str, started: Instant, now: Instant, outcome: Option<bool>) {
        let mut map = self.lock();
        let Some(e) = map.get_mut(node) else { return };
        e.in_flight = e.in_flight.saturating_sub(1);
        match outcome {
            Some(true) => {
                let sample = now.saturating_duration_since(started).as_nanos() as f64;
                e.observe(sample, now, self.config.decay);
            }
            Some(false) => {
                e.failures = e.failures.saturating_add(1);
                let took = now.saturating_duration_since(started);
                let sample = took.max(self.config.failure_penalty).as_nanos() as f64;
                e.observe(sample, now, self.config.decay);
            }
            // Cancelled (the caller went away or a hedge won): it took at least this long, so
            // the estimate rises to it if it was lower (peak only; never lowered).
            None => {
                let lower_bound = now.saturating_duration_since(started).as_nanos() as f64;
                if lower_bound > e.decayed(now, self.config.decay) {
                    e.observe(lower_bound, now, self.config.decay);
                }
            }
        }
    }
}

/// One request in flight to an endpoint. `finish` records its outcome; dropping it unfinished
/// (cancelled) ends the in-flight count and raises the estimate to the time it had taken, if
/// that is more (a hung endpoint whose requests keep losing to hedges must not look fast).
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    node: String,
    started: Instant,
    tracked: bool,
    finished: bool,
}

impl InFlight {
    pub fn finish(mut self, success: bool, now: Instant) {
        self.finished = true;
        if self.tracked {
            self.balancer
                .finish(&self.node, self.started, now, Some(success));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished && self.tracked {
            self.balancer
                .finish(&self.node, self.started, Instant::now(), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    /// A deterministic "random" source cycling through every pair.
    fn cycling() -> impl FnMut(usize) -> usize {
        let mut i = 0usize;
        move |n| {
            i = i.wrapping_add(7);
            i % n
        }
    }

    fn serve(b: &Arc<Balancer>, node: &str, t: Instant, took: Duration, ok: bool) {
        b.start(node, t).finish(ok, t + took);
    }

    #[test]
    fn new_endpoints_are_tried_first() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        let nodes = ids(2);
        serve(&b, "node-0", t, Duration::from_millis(1), true);
        // node-1 has no estimate (cost 0): it wins against node-0.
        for _ in 0..10 {
            assert_eq!(b.pick(&nodes, t, cycling()).as_deref(), Some("node-1"));
        }
    }

    #[test]
    fn a_slow_endpoint_loses_almost_every_choice_then_is_probed_again() {
        let cfg = BalanceConfig::default();
        let b = Balancer::new(cfg);
        let nodes = ids(3);
        let mut t = Instant::now();
        let mut rng = cycling();
        let mut counts = HashMap::new();
        for i in 0..3000 {
            let n = b.pick(&nodes, t, &mut rng).unwrap();
            let took = if n == "node-2" {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(1)
            };
            serve(&b, &n, t, took, true);
            t += took;
            if i >= 100 {
                *counts.entry(n).or_insert(0u32) += 1;
            }
        }
        let slow = counts.get("node-2").copied().unwrap_or(0);
        assert!(
            slow < 30,
            "the slow endpoint got {slow} of 2900: {counts:?}"
        );
        // Idle long enough, the slow one's estimate decays below the others': it is probed.
        t += cfg.decay * 12;
        let stats = b.stats("node-2", t).unwrap();
        assert!(stats.latency < Duration::from_millis(1), "{stats:?}");
    }

    #[test]
    fn equal_endpoints_share_the_load() {
        let b = Balancer::new(BalanceConfig::default());
        let nodes = ids(3);
        let mut t = Instant::now();
        let mut counts = HashMap::new();
        let mut seed = 12345u64;
        let mut rng = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for i in 0..3000u64 {
            let n = b.pick(&nodes, t, &mut rng).unwrap();
            // 1 ms ± a little noise.
            let took = Duration::from_micros(900 + (i * 37 % 200));
            serve(&b, &n, t, took, true);
            t += took;
            *counts.entry(n).or_insert(0u32) += 1;
        }
        for n in &nodes {
            let c = counts.get(n).copied().unwrap_or(0);
            assert!(c > 300, "{n} got {c} of 3000: {counts:?}");
        }
    }

    #[test]
    fn failures_are_penalised_even_when_fast() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        serve(&b, "node-0", t, Duration::from_millis(1), true);
        serve(&b, "node-1", t, Duration::from_micros(10), false);
        let s = b.stats("node-1", t + Duration::from_micros(10)).unwrap();
        assert!(s.latency >= Duration::from_millis(200), "{s:?}");
        assert_eq!((s.requests, s.failures), (1, 1));
        assert_eq!(b.pick(&ids(2), t, cycling()).as_deref(), Some("node-0"));
    }

    #[test]
    fn in_flight_requests_raise_the_cost_and_cancellation_releases_them() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        let nodes = ids(2);
        serve(&b, "node-0", t, Duration::from_millis(1), true);
        serve(&b, "node-1", t, Duration::from_millis(2), true);
        // Three requests pending on node-0: cost 1 ms × 4 > 2 ms × 1.
        let t = Instant::now();
        let pending: Vec<_> = (0..3).map(|_| b.start("node-0", t)).collect();
        assert_eq!(b.stats("node-0", t).unwrap().in_flight, 3);
        assert_eq!(b.pick(&nodes, t, cycling()).as_deref(), Some("node-1"));
        drop(pending);
        let now = Instant::now();
        assert_eq!(b.stats("node-0", now).unwrap().in_flight, 0);
        assert_eq!(b.pick(&nodes, now, cycling()).as_deref(), Some("node-0"));
    }

    #[test]
    fn a_returning_endpoint_starts_afresh() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        serve(&b, "node-0", t, Duration::from_millis(1), true);
        serve(&b, "node-1", t, Duration::from_millis(1), false);
        assert_eq!(b.pick(&ids(2), t, cycling()).as_deref(), Some("node-0"));
        b.reset_estimate("node-1");
        assert_eq!(b.pick(&ids(2), t, cycling()).as_deref(), Some("node-1"));
        assert_eq!(b.stats("node-1", t).unwrap().failures, 1);
    }

    #[test]
    fn a_cancelled_request_raises_the_estimate_to_its_age() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        serve(&b, "node-0", t, Duration::from_millis(1), true);
        let hung = b.start("node-0", t);
        std::thread::sleep(Duration::from_millis(30));
        drop(hung);
        let s = b.stats("node-0", Instant::now()).unwrap();
        assert!(s.latency >= Duration::from_millis(25), "{s:?}");
        assert_eq!((s.in_flight, s.failures), (0, 0));
    }

    #[test]
    fn the_map_is_bounded() {
        let b = Balancer::new(BalanceConfig {
            max_endpoints: 4,
            ..BalanceConfig::default()
        });
        let t = Instant::now();
        let busy = b.start("busy", t);
        for i in 0..100 {
            serve(&b, &format!("n{i}"), t, Duration::from_millis(1), true);
        }
        assert!(b.lock().len() <= 4);
        // The busy one was never evicted.
        assert_eq!(b.stats("busy", t).unwrap().in_flight, 1);
        drop(busy);
    }

    #[test]
    fn picks_never_repeat_an_index_for_two_candidates() {
        let b = Balancer::new(BalanceConfig::default());
        let t = Instant::now();
        let nodes = ids(2);
        serve(&b, "node-0", t, Duration::from_millis(5), true);
        serve(&b, "node-1", t, Duration::from_millis(1), true);
        // Whatever the random draws, both are compared, so the faster always wins.
        for r in 0..10 {
            assert_eq!(b.pick(&nodes, t, |n| r % n).as_deref(), Some("node-1"));
        }
    }
}
