//! A shared secret for the local link when it runs over loopback TCP (where any local user could
//! connect, unlike a 0600 Unix socket). Both processes read the same token file; every call
//! carries the token in the `x-fold-link-token` header and the receiving side checks it in
//! constant time before anything else runs.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

pub const HEADER: &str = "x-fold-link-token";
/// Shortest token accepted.
pub const MIN_LEN: usize = 16;

#[derive(Clone)]
pub struct LinkToken(Arc<str>);

impl std::fmt::Debug for LinkToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkToken(<redacted>)")
    }
}

impl LinkToken {
    /// Read a token file (surrounding whitespace is ignored).
    pub fn load(path: &Path) -> Result<LinkToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the link token file {}: {e}", path.display()))?;
        LinkToken::new(text.trim()).map_err(|e| format!("link token file {}: {e}", path.display()))
    }

    pub fn new(token: &str) -> Result<LinkToken, String> {
        if token.len() < MIN_LEN {
            return Err(format!("the token must be at least {MIN_LEN} characters"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(LinkToken(Arc::from(token)))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        // Constant time in the token's content (the length is not secret).
        mine.len() == presented.len()
            && mine
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// A tonic interceptor for servers: refuse calls without the right token.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(HEADER) {
            Some(v) if self.matches(v.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong local link token")),
            None => Err(Status::unauthenticated(
                "this local link requires a token (x-fold-link-token); start both processes with the same --link-token-file",
            )),
        }
    }

    /// Add the token to an outgoing HTTP request (for a client channel's request mapper).
    pub fn apply<B>(&self, mut req: http::Request<B>) -> http::Request<B> {
        if let Ok(v) = http::HeaderValue::from_str(&self.0) {
            req.headers_mut().insert(HEADER, v);
        }
        req
    }
}

/// A client-side tower layer that adds the token (if any) to every request.
#[derive(Clone, Debug, Default)]
pub struct TokenLayer(pub Option<LinkToken>);

impl<S> tower::Layer<S> for TokenLayer {
    type Service = WithToken<S>;
    fn layer(&self, inner: S) -> WithToken<S> {
        WithToken {
            inner,
            token: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WithToken<S> {
    inner: S,
    token: Option<LinkToken>,
}

impl<S, B> tower::Service<http::Request<B>> for WithToken<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> S::Future {
        let req = match &self.token {
            Some(t) => t.apply(req),
            None => req,
        };
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_tokens() {
        assert!(LinkToken::new("short").is_err());
        assert!(LinkToken::new("has a space in it!!").is_err());
        let t = LinkToken::new("0123456789abcdef-secret").unwrap();
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(HEADER, "0123456789abcdef-secret".parse().unwrap());
        assert!(t.check(ok).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert(HEADER, "0123456789abcdef-secreT".parse().unwrap());
        assert_eq!(
            t.check(bad).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let r = t.apply(http::Request::new(()));
        assert_eq!(r.headers()[HEADER], "0123456789abcdef-secret");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
