//! Circuit breakers ("failure accrual", as in linkerd2-proxy): after `failure_threshold`
//! consecutive failures a breaker opens and callers fail fast with no network wait; after a
//! backoff one probe is let through, and its outcome closes the breaker or opens it again with a
//! longer backoff. What counts as a failure is the caller's decision (e.g. a gRPC outcome of
//! UNAVAILABLE or DEADLINE_EXCEEDED, not an application error like PERMISSION_DENIED).
//!
//! An admitted call holds a [`Permit`] and reports through it. A probe whose caller goes away
//! before it reports (its future dropped: the client cancelled) releases the breaker on drop, so
//! the next caller becomes the probe; without that the breaker would stay half-open for good.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tower::{Layer, Service};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// First open period; doubles after each failed probe, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The externally visible state, e.g. for metrics (0 closed, 1 open, 2 half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_i64(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Refusal while the breaker is open.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit open for {target}: {failures} consecutive failures; next probe in {retry_in:?}")]
pub struct BreakerOpen {
    pub target: String,
    pub failures: u32,
    pub retry_in: Duration,
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        backoff: Duration,
        failures: u32,
    },
    HalfOpen {
        backoff: Duration,
        failures: u32,
    },
}

/// One breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// A state change, reported to the caller so it can count transitions.
pub type Transition = Option<(BreakerState, BreakerState)>;

fn state_of(i: &Inner) -> BreakerState {
    match i {
        Inner::Closed { .. } => BreakerState::Closed,
        Inner::Open { .. } => BreakerState::Open,
        Inner::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn state(&self) -> BreakerState {
        state_of(&self.lock())
    }

    /// Would a call be let through now (closed, or open with its backoff over so the call
    /// would be the probe)? A balancer asks this to leave open targets out of its choice
    /// without taking the probe itself.
    pub fn available(&self, now: Instant) -> bool {
        match *self.lock() {
            Inner::Closed { .. } => true,
            Inner::Open { until, .. } => now >= until,
            Inner::HalfOpen { .. } => false,
        }
    }

    /// May a call go ahead now? While open, no; once the backoff has passed exactly one caller
    /// gets through as the probe (the breaker is half-open until it reports or is dropped).
    pub fn admit(
        &self,
        target: &str,
        now: Instant,
    ) -> (Result<Permit<'_>, BreakerOpen>, Transition) {
        let mut g = self.lock();
        match *g {
            Inner::Closed { .. } => (Ok(self.permit(false)), None),
            Inner::Open {
                until,
                backoff,
                failures,
            } => {
                if now >= until {
                    *g = Inner::HalfOpen { backoff, failures };
                    (
                        Ok(self.permit(true)),
                        Some((BreakerState::Open, BreakerState::HalfOpen)),
                    )
                } else {
                    (
                        Err(BreakerOpen {
                            target: target.to_string(),
                            failures,
                            retry_in: until - now,
                        }),
                        None,
                    )
                }
            }
            Inner::HalfOpen { failures, .. } => (
                Err(BreakerOpen {
                    target: target.to_string(),
                    failures,
                    retry_in: Duration::ZERO,
                }),
                None,
            ),
        }
    }

    fn permit(&self, probe: bool) -> Permit<'_> {
        Permit {
            breaker: self,
            probe,
            reported: false,
        }
    }

    /// A probe went away without an outcome: open again with the probe due at once, so the
    /// next caller probes.
    fn release_probe(&self) {
        let mut g = self.lock();
        if let Inner::HalfOpen { backoff, failures } = *g {
            *g = Inner::Open {
                until: Instant::now(),
                backoff,
                failures,
            };
        }
    }

    /// Report the outcome of an admitted call.
    pub fn record(&self, success: bool, now: Instant) -> Transition {
        let mut g = self.lock();
        let before = state_of(&g);
        let next = match (&*g, success) {
            (_, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    Inner::Open {
                        until: now + self.config.backoff,
                        backoff: self.config.backoff,
                        failures,
                    }
                } else {
                    Inner::Closed { failures }
                }
            }
            (Inner::HalfOpen { backoff, failures }, false) => {
                let backoff = (*backoff * 2).min(self.config.max_backoff);
                Inner::Open {
                    until: now + backoff,
                    backoff,
                    failures: failures + 1,
                }
            }
            // A late report from a call admitted before the breaker opened.
            (
                Inner::Open {
                    until,
                    backoff,
                    failures,
                },
                false,
            ) => Inner::Open {
                until: *until,
                backoff: *backoff,
                failures: failures + 1,
            },
        };
        *g = next;
        let after = state_of(&g);
        (before != after).then_some((before, after))
    }
}

/// An admitted call. Report its outcome with [`Permit::record`]; dropped unreported, a probe
/// releases the breaker and any other call is simply not counted.
#[derive(Debug)]
#[must_use = "report the call's outcome with Permit::record"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Permit<'_> {
    /// Report the outcome of the admitted call.
    pub fn record(mut self, success: bool, now: Instant) -> Transition {
        self.reported = true;
        self.breaker.record(success, now)
    }

    /// Is this call the half-open breaker's probe?
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            self.breaker.release_probe();
        }
    }
}

/// Breakers by key (e.g. one per remote peer), created on first use.
#[derive(Debug)]
pub struct Breakers<K> {
    config: BreakerConfig,
    max: usize,
    map: Mutex<HashMap<K, Arc<Breaker>>>,
}

impl<K: Eq + Hash + Clone> Breakers<K> {
    /// At most 4,096 breakers.
    pub fn new(config: BreakerConfig) -> Self {
        Self::bounded(config, 4096)
    }

    /// At most `max` breakers: when full, closed ones are forgotten first; if all are open, a
    /// new key gets a breaker that is not kept (its failures are not accrued) until room frees.
    pub fn bounded(config: BreakerConfig, max: usize) -> Self {
        Breakers {
            config,
            max: max.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &K) -> Arc<Breaker> {
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = m.get(key) {
            return b.clone();
        }
        if m.len() >= self.max {
            m.retain(|_, b| b.state() != BreakerState::Closed);
        }
        let b = Arc::new(Breaker::new(self.config));
        if m.len() < self.max {
            m.insert(key.clone(), b.clone());
        }
        b
    }

    /// The breaker for `key` if one is kept (never creates one).
    pub fn peek(&self, key: &K) -> Option<Arc<Breaker>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// How many breakers are kept.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget breakers that are closed (bounded memory for many short-lived peers).
    pub fn prune_closed(&self) {
        let mut m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, b| b.state() != BreakerState::Closed);
    }

    pub fn states(&self) -> Vec<(K, BreakerState)> {
        let m = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter().map(|(k, b)| (k.clone(), b.state())).collect()
    }
}

/// What a call's outcome means to its breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It worked, or failed for a reason that says nothing about the target's health.
    Success,
    /// The target (or the way to it) failed: counts toward opening.
    Failure,
    /// No verdict on this target (e.g. refused before reaching it): not counted; a probe lets
    /// its slot go.
    Ignore,
}

/// Told of every breaker state change, with the key it belongs to (for logs and metrics).
pub type Observer<K> = Arc<dyn Fn(&K, &Breaker, Transition) + Send + Sync>;

/// A tower layer with one breaker per key: `key` picks the breaker from the request (e.g. the
/// target node), `classify` judges each outcome. While a key's breaker is open, calls fail at
/// once with [`BreakerError::Open`]; a call whose future is dropped before it completes (the
/// caller went away) reports nothing, and if it was the probe it releases the breaker.
pub struct BreakerLayer<K, F, C> {
    breakers: Arc<Breakers<K>>,
    key: F,
    classify: C,
    observer: Option<Observer<K>>,
    /// How the target is named in refusals, e.g. "node".
    noun: &'static str,
}

impl<K, F: Clone, C: Clone> Clone for BreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        BreakerLayer {
            breakers: self.breakers.clone(),
            key: self.key.clone(),
            classify: self.classify.clone(),
            observer: self.observer.clone(),
            noun: self.noun,
        }
    }
}

impl<K, F, C> BreakerLayer<K, F, C> {
    pub fn new(breakers: Arc<Breakers<K>>, noun: &'static str, key: F, classify: C) -> Self {
        BreakerLayer {
            breakers,
            key,
            classify,
            observer: None,
            noun,
        }
    }

    pub fn observe(mut self, observer: Observer<K>) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl<S, K, F: Clone, C: Clone> Layer<S> for BreakerLayer<K, F, C> {
    type Service = BreakerService<S, K, F, C>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

/// A failure of a call through a [`BreakerService`].
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// Refused at once: the target's breaker is open (or half-open with its probe in flight).
    #[error(transparent)]
    Open(BreakerOpen),
    /// The call itself failed.
    #[error(transparent)]
    Inner(E),
}

pub struct BreakerService<S, K, F, C> {
    inner: S,
    layer: BreakerLayer<K, F, C>,
}

impl<S: Clone, K, F: Clone, C: Clone> Clone for BreakerService<S, K, F, C> {
    fn clone(&self) -> Self {
        BreakerService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, K, F, C, Req> Service<Req> for BreakerService<S, K, F, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    K: Eq + Hash + Clone + std::fmt::Display + Send + Sync + 'static,
    F: Fn(&Req) -> K,
    C: Fn(&Result<S::Response, S::Error>) -> Verdict + Clone + Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.layer.key)(&req);
        let breaker = self.layer.breakers.get(&key);
        let classify = self.layer.classify.clone();
        let observer = self.layer.observer.clone();
        let noun = self.layer.noun;
        // The ready service goes into the future; a fresh clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let notify = |t: Transition| {
                if let Some(o) = &observer {
                    o(&key, &breaker, t);
                }
            };
            let (admitted, t) = breaker.admit(&format!("{noun} {key}"), Instant::now());
            notify(t);
            let permit = admitted.map_err(BreakerError::Open)?;
            let result = inner.call(req).await;
            match classify(&result) {
                Verdict::Success => notify(permit.record(true, Instant::now())),
                Verdict::Failure => notify(permit.record(false, Instant::now())),
                Verdict::Ignore => drop(permit),
            }
            result.map_err(BreakerError::Inner)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        assert!(b.admit("p", t0).0.is_ok());
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(true, t0), None); // success resets the count
        b.record(false, t0);
        b.record(false, t0);
        assert_eq!(
            b.record(false, t0),
            Some((BreakerState::Closed, BreakerState::Open))
        );
        let (r, _) = b.admit("p", t0 + Duration::from_millis(50));
        let e = r.unwrap_err();
        assert!(e.to_string().contains("circuit open for p"));
        // After the backoff exactly one probe goes through.
        let t1 = t0 + Duration::from_millis(100);
        let (r, tr) = b.admit("p", t1);
        let probe = r.unwrap();
        assert_eq!(tr, Some((BreakerState::Open, BreakerState::HalfOpen)));
        assert!(b.admit("p", t1).0.is_err());
        // A failed probe doubles the backoff.
        assert_eq!(
            probe.record(false, t1),
            Some((BreakerState::HalfOpen, BreakerState::Open))
        );
        assert!(b.admit("p", t1 + Duration::from_millis(150)).0.is_err());
        let probe = b.admit("p", t1 + Duration::from_millis(200)).0.unwrap();
        assert_eq!(
            probe.record(true, t1),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        assert!(b.admit("p", t1).0.is_ok());
    }

    #[test]
    fn keyed_breakers_are_independent() {
        let bs: Breakers<String> = Breakers::new(cfg());
        let now = Instant::now();
        for _ in 0..3 {
            bs.get(&"a".to_string()).record(false, now);
        }
        assert_eq!(bs.get(&"a".to_string()).state(), BreakerState::Open);
        assert_eq!(bs.get(&"b".to_string()).state(), BreakerState::Closed);
        bs.prune_closed();
        assert_eq!(bs.states().len(), 1);
    }

    #[test]
    fn a_dropped_probe_releases_the_breaker() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_millis(100);
        {
            let (probe, _) = b.admit("p", t1);
            let probe = probe.unwrap();
            assert!(probe.is_probe());
            assert!(b.admit("p", t1).0.is_err(), "one probe at a time");
            // The caller goes away: the permit is dropped without an outcome.
        }
        assert_eq!(b.state(), BreakerState::Open);
        let (next, _) = b.admit("p", Instant::now());
        let next = next.expect("the next caller becomes the probe");
        assert!(next.is_probe());
        assert_eq!(
            next.record(true, Instant::now()),
            Some((BreakerState::HalfOpen, BreakerState::Closed))
        );
        // A call admitted while closed and dropped later changes nothing.
        let (p, _) = b.admit("p", Instant::now());
        drop(p);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn the_map_is_bounded_and_prunes_closed_breakers() {
        let bs: Breakers<u32> = Breakers::bounded(cfg(), 4);
        let now = Instant::now();
        for k in 0..3 {
            for _ in 0..3 {
                bs.get(&k).record(false, now);
            }
        }
        for k in 3..100 {
            let _ = bs.get(&k);
            assert!(bs.len() <= 4);
        }
        // The open ones are kept.
        assert_eq!(bs.get(&0).state(), BreakerState::Open);
        // All full of open breakers: a new key still gets a (fresh, untracked) breaker.
        for _ in 0..3 {
            bs.get(&3).record(false, now);
        }
        assert_eq!(bs.get(&1000).state(), BreakerState::Closed);
        assert!(bs.len() <= 4);
    }

    #[tokio::test]
    async fn the_layer_keys_breakers_by_request_and_releases_dropped_probes() {
        use tower::ServiceExt;
        let breakers = Arc::new(Breakers::new(cfg()));
        // The request is (target, succeed?); a "hang" target never answers.
        let svc = tower::service_fn(|(target, ok): (String, bool)| async move {
            if target == "hang" {
                std::future::pending::<()>().await;
            }
            if ok {
                Ok::<_, String>(())
            } else {
                Err("down".to_string())
            }
        });
        let layer = BreakerLayer::new(
            breakers.clone(),
            "node",
            |r: &(String, bool)| r.0.clone(),
            |r: &Result<(), String>| {
                if r.is_ok() {
                    Verdict::Success
                } else {
                    Verdict::Failure
                }
            },
        );
        let svc = layer.layer(svc);
        for _ in 0..3 {
            let r = svc.clone().oneshot(("a".into(), false)).await;
            assert!(matches!(r, Err(BreakerError::Inner(_))));
        }
        let r = svc.clone().oneshot(("a".into(), true)).await;
        assert!(
            matches!(r, Err(BreakerError::Open(_))),
            "open after 3 failures"
        );
        assert!(
            svc.clone().oneshot(("b".into(), true)).await.is_ok(),
            "b is independent"
        );
        // A probe toward a hung target, abandoned by its caller, releases the breaker.
        let hang = breakers.get(&"hang".to_string());
        for _ in 0..3 {
            hang.record(false, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(110)).await;
        let probe = svc.clone().oneshot(("hang".into(), true));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), probe)
                .await
                .is_err()
        );
        assert_eq!(hang.state(), BreakerState::Open, "the dropped probe let go");
        // The next caller is the probe at once (no second backoff).
        let (next, _) = hang.admit("hang", Instant::now());
        assert!(next.expect("probe due at once").is_probe());
    }
}
