//! The one place where middleware errors become gRPC statuses, and the outermost layer that
//! turns them into gRPC responses (so a client sees a proper status, never a broken stream).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tonic::Status;
use tower::{Layer, Service};

use crate::breaker::BreakerOpen;
use crate::rate_limit::RateLimited;

pub use crate::boxed::BoxError;

/// Map an error from any foldmesh layer (or from tower's) to its gRPC status.
pub fn status_for(err: &(dyn Error + 'static)) -> Status {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(s) = e.downcast_ref::<Status>() {
            return s.clone();
        }
        if let Some(r) = e.downcast_ref::<RateLimited>() {
            return Status::resource_exhausted(r.to_string());
        }
        if e.downcast_ref::<tower::load_shed::error::Overloaded>()
            .is_some()
        {
            return Status::unavailable(
                "server overloaded: too many requests in flight and the queue is full; retry with backoff",
            );
        }
        if e.downcast_ref::<tower::timeout::error::Elapsed>().is_some() {
            return Status::deadline_exceeded("request timed out on the server");
        }
        if let Some(b) = e.downcast_ref::<BreakerOpen>() {
            return Status::unavailable(b.to_string());
        }
        cur = e.source();
    }
    Status::internal(format!("internal error: {err}"))
}

/// Counts of requests refused by the middleware, by reason.
#[derive(Debug, Clone, Default)]
pub struct RefusalMetrics {
    pub rate_limited: Counter,
    pub load_shed: Counter,
    pub timed_out: Counter,
}

impl RefusalMetrics {
    /// Register `<prefix>_rate_limited_total`, `<prefix>_load_shed_total` and
    /// `<prefix>_deadline_exceeded_total`.
    pub fn register(registry: &mut Registry, prefix: &str) -> RefusalMetrics {
        let m = RefusalMetrics::default();
        registry.register(
            format!("{prefix}_rate_limited"),
            "Requests refused by the per-client rate limit (RESOURCE_EXHAUSTED)",
            m.rate_limited.clone(),
        );
        registry.register(
            format!("{prefix}_load_shed"),
            "Requests shed because the concurrency limit and its queue were full (UNAVAILABLE)",
            m.load_shed.clone(),
        );
        registry.register(
            format!("{prefix}_deadline_exceeded"),
            "Requests that ran out of time on the server (DEADLINE_EXCEEDED)",
            m.timed_out.clone(),
        );
        m
    }

    fn count(&self, err: &(dyn Error + 'static)) {
        let mut cur: Option<&(dyn Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if e.downcast_ref::<RateLimited>().is_some() {
                self.rate_limited.inc();
                return;
            }
            if e.downcast_ref::<tower::load_shed::error::Overloaded>()
                .is_some()
            {
                self.load_shed.inc();
                return;
            }
            if e.downcast_ref::<tower::timeout::error::Elapsed>().is_some() {
                self.timed_out.inc();
                return;
            }
            cur = e.source();
        }
    }
}

/// Outermost server layer: an `Err` from the layers inside becomes a gRPC response carrying
/// [`status_for`] of it (and is counted, when given [`RefusalMetrics`]).
#[derive(Debug, Clone, Default)]
pub struct GrpcErrorsLayer {
    metrics: Option<RefusalMetrics>,
}

impl GrpcErrorsLayer {
    pub fn new(metrics: Option<RefusalMetrics>) -> Self {
        GrpcErrorsLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcErrorsLayer {
    type Service = GrpcErrors<S>;
    fn layer(&self, inner: S) -> GrpcErrors<S> {
        GrpcErrors {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcErrors<S> {
    inner: S,
    metrics: Option<RefusalMetrics>,
}

impl<S, Req, B> Service<Req> for GrpcErrors<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match fut.await {
                Ok(r) => Ok(r),
                Err(e) => {
                    let e: BoxError = e.into();
                    if let Some(m) = &metrics {
                        m.count(&*e);
                    }
                    let status = status_for(&*e);
                    tracing::debug!(code = ?status.code(), error = %e, "request refused by middleware");
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    #[test]
    fn maps_each_error() {
        let rl = RateLimited {
            key: "client 127.0.0.1".into(),
            retry_after: Duration::from_millis(20),
        };
        assert_eq!(status_for(&rl).code(), Code::ResourceExhausted);
        assert_eq!(
            status_for(&tower::load_shed::error::Overloaded::new()).code(),
            Code::Unavailable
        );
        let open = BreakerOpen {
            target: "peer x".into(),
            failures: 5,
            retry_in: Duration::from_secs(1),
        };
        assert_eq!(status_for(&open).code(), Code::Unavailable);
        assert_eq!(
            status_for(&Status::permission_denied("no")).code(),
            Code::PermissionDenied
        );
        let other = std::io::Error::other("boom");
        assert_eq!(status_for(&other).code(), Code::Internal);
    }
}
