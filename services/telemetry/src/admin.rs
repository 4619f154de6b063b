//! The admin HTTP port: `GET /metrics` (Prometheus text exposition of a registry), `GET /livez`
//! (the process is up) and `GET /readyz` (every readiness check passes; 503 with the failing
//! checks otherwise). Bind it to loopback or a pod-internal address: it has no authentication.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// One readiness check: `Ok` or the reason it is not ready.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct AdminState {
    registry: Arc<Mutex<Registry>>,
    checks: Vec<(&'static str, ReadinessCheck)>,
}

impl AdminState {
    pub fn new(registry: Arc<Mutex<Registry>>) -> Self {
        AdminState {
            registry,
            checks: Vec::new(),
        }
    }

    pub fn readiness_check(mut self, name: &'static str, check: ReadinessCheck) -> Self {
        self.checks.push((name, check));
        self
    }

    fn metrics_text(&self) -> String {
        let reg = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fold_middleware::metrics::render_prometheus(&reg)
    }

    fn readiness(&self) -> (bool, String) {
        let mut ok = true;
        let mut body = String::new();
        for (name, check) in &self.checks {
            match check() {
                Ok(()) => body.push_str(&format!("{name}: ok\n")),
                Err(why) => {
                    ok = false;
                    body.push_str(&format!("{name}: not ready: {why}\n"));
                }
            }
        }
        (ok, body)
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "use GET\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics_text(),
        ),
        "/livez" | "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let (ok, body) = state.readiness();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics, /livez or /readyz\n".into(),
        ),
    })
}

/// Bind the admin port. Returns the bound address and the serving future.
pub async fn bind(
    addr: SocketAddr,
    state: AdminState,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = Arc::new(state);
    let serve = async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin port accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, state.clone()));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    };
    Ok((local, serve))
}
