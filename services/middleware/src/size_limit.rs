//! Two statuses tonic gives for bad input, mapped to the foldmesh error model: a request over the
//! decoding limit is `OUT_OF_RANGE` in tonic and `RESOURCE_EXHAUSTED` here (as in grpc-go and
//! grpc-java); a body that is not the method's protobuf is `INTERNAL` in tonic and
//! `INVALID_ARGUMENT` here. This layer rewrites exactly those — in the response headers
//! (trailers-only responses) and in the trailers — and nothing else.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

fn is_too_large(h: &http::HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.windows(20).any(|w| w == b"message%20length%20t")
                || m.windows(18).any(|w| w == b"message length too")
        })
}

/// tonic reports a request body that is not the method's protobuf as INTERNAL; it is the
/// caller's malformed input.
fn is_undecodable(h: &http::HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v == "13")
        && h.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.starts_with(b"failed%20to%20decode%20Protobuf%20message")
                || m.starts_with(b"failed to decode Protobuf message")
        })
}

fn fix(h: &mut http::HeaderMap) {
    if is_too_large(h) {
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
    } else if is_undecodable(h) {
        h.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TooLargeLayer;

impl<S> Layer<S> for TooLargeLayer {
    type Service = TooLarge<S>;
    fn layer(&self, inner: S) -> TooLarge<S> {
        TooLarge { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TooLarge<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for TooLarge<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<TooLargeBody<B>>;
    type Error = S::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (mut parts, body) = resp.into_parts();
            fix(&mut parts.headers);
            Ok(http::Response::from_parts(
                parts,
                TooLargeBody { inner: body },
            ))
        })
    }
}

pub struct TooLargeBody<B> {
    inner: B,
}

impl<B: Default> Default for TooLargeBody<B> {
    fn default() -> Self {
        TooLargeBody {
            inner: B::default(),
        }
    }
}

impl<B: Body + Unpin> Body for TooLargeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut t) => {
                        fix(&mut t);
                        Frame::trailers(t)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_size_status() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", "11".parse().unwrap());
        h.insert(
            "grpc-message",
            "Error,%20decoded%20message%20length%20too%20large"
                .parse()
                .unwrap(),
        );
        fix(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let mut other = http::HeaderMap::new();
        other.insert("grpc-status", "11".parse().unwrap());
        other.insert("grpc-message", "page%20out%20of%20range".parse().unwrap());
        fix(&mut other);
        assert_eq!(other["grpc-status"], "11");
    }
}
