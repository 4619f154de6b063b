//! Keyed rate limiting (GCRA, via governor): each key — a client identity or address, a remote
//! peer — gets its own budget, so one noisy caller is throttled and the others are not.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tower::{Layer, Service};

use crate::boxed::BoxError;

/// Refusal: the key spent its budget.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate limit exceeded for {key}; retry in {retry_after:?}")]
pub struct RateLimited {
    pub key: String,
    pub retry_after: Duration,
}

/// A keyed limiter: `per_second` sustained, `burst` at once.
#[derive(Clone)]
pub struct KeyedLimiter {
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    checks: Arc<AtomicU64>,
}

impl KeyedLimiter {
    /// `None` when `per_second` is 0 (meaning: no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<KeyedLimiter> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(KeyedLimiter {
            limiter: Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            )),
            clock: DefaultClock::default(),
            checks: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Spend one unit of `key`'s budget.
    pub fn check(&self, key: &str) -> Result<(), RateLimited> {
        // Keep the per-key state bounded: forget keys whose budget is full again.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| RateLimited {
                key: key.to_string(),
                retry_after: not_until.wait_time_from(self.clock.now()),
            })
    }
}

/// A tower layer applying a [`KeyedLimiter`], with the key taken from each request by `key_fn`.
#[derive(Clone)]
pub struct KeyedRateLimitLayer<F> {
    limiter: KeyedLimiter,
    key_fn: F,
}

impl<F> KeyedRateLimitLayer<F> {
    pub fn new(limiter: KeyedLimiter, key_fn: F) -> Self {
        KeyedRateLimitLayer { limiter, key_fn }
    }
}

impl<S, F: Clone> Layer<S> for KeyedRateLimitLayer<F> {
    type Service = KeyedRateLimit<S, F>;
    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit {
            inner,
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

#[derive(Clone)]
pub struct KeyedRateLimit<S, F> {
    inner: S,
    limiter: KeyedLimiter,
    key_fn: F,
}

impl<S, F, Req> Service<Req> for KeyedRateLimit<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    F: Fn(&Req) -> String,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key_fn)(&req);
        match self.limiter.check(&key) {
            Ok(()) => {
                let fut = self.inner.call(req);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Err(e) => Box::pin(std::future::ready(Err(BoxError::from(e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn keys_have_separate_budgets() {
        let l = KeyedLimiter::new(1, 3).unwrap();
        for _ in 0..3 {
            assert!(l.check("noisy").is_ok());
        }
        let e = l.check("noisy").unwrap_err();
        assert!(e.retry_after > Duration::ZERO);
        assert!(l.check("quiet").is_ok());
        assert!(KeyedLimiter::new(0, 10).is_none());
    }

    #[tokio::test]
    async fn layer_refuses_over_budget() {
        let limiter = KeyedLimiter::new(1, 2).unwrap();
        let svc = tower::service_fn(|r: &'static str| async move { Ok::<_, BoxError>(r) });
        let svc = KeyedRateLimitLayer::new(limiter, |r: &&'static str| r.to_string()).layer(svc);
        assert_eq!(svc.clone().oneshot("a").await.unwrap(), "a");
        assert_eq!(svc.clone().oneshot("a").await.unwrap(), "a");
        let err = svc.clone().oneshot("a").await.unwrap_err();
        assert!(err.downcast_ref::<RateLimited>().is_some());
        assert_eq!(svc.clone().oneshot("b").await.unwrap(), "b");
    }
}
