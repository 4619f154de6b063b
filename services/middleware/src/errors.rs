//! The one place where middleware errors become gRPC statuses, and the outermost layer that
//! turns them into gRPC responses (so a client sees a proper status, never a broken stream).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tower::{Layer, Service};

use crate::breaker::BreakerOpen;
use crate::rate_limit::RateLimited;

pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

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

/// Outermost server layer: an `Err` from the layers inside becomes a gRPC response carrying
/// [`status_for`] of it.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcErrorsLayer;

impl<S> Layer<S> for GrpcErrorsLayer {
    type Service = GrpcErrors<S>;
    fn layer(&self, inner: S) -> GrpcErrors<S> {
        GrpcErrors { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcErrors<S> {
    inner: S,
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
        Box::pin(async move {
            match fut.await {
                Ok(r) => Ok(r),
                Err(e) => {
                    let e: BoxError = e.into();
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
