//! Per-request deadlines for gRPC servers: the shorter of the client's `grpc-timeout` and the
//! server's own limit. Expiry is tower's `Elapsed`, which [`crate::errors::status_for`] maps to
//! `DEADLINE_EXCEEDED`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::boxed::BoxError;

/// Parse a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline a request asks for, if any.
pub fn request_timeout<B>(req: &http::Request<B>) -> Option<Duration> {
    req.headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

#[derive(Debug, Clone, Copy)]
pub struct GrpcDeadlineLayer {
    max: Duration,
}

impl GrpcDeadlineLayer {
    pub fn new(max: Duration) -> Self {
        GrpcDeadlineLayer { max }
    }
}

impl<S> Layer<S> for GrpcDeadlineLayer {
    type Service = GrpcDeadline<S>;
    fn layer(&self, inner: S) -> GrpcDeadline<S> {
        GrpcDeadline {
            inner,
            max: self.max,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcDeadline<S> {
    inner: S,
    max: Duration,
}

impl<S, B> Service<http::Request<B>> for GrpcDeadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let limit = request_timeout(&req)
            .map(|d| d.min(self.max))
            .unwrap_or(self.max);
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(BoxError::from(tower::timeout::error::Elapsed::new())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
