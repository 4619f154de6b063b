//! `foldctl dashboard`: a live view of the mesh in the browser. A background task gathers a
//! [`view::View`] every `--interval` over the same read-only calls as `topology`, `peers`,
//! `status`, `check` and `top`; an axum server on `--listen` (loopback by default) serves the
//! page (HTML, JS and CSS embedded in the binary: no CDN, no other network) and the latest view
//! as JSON, which the page polls.
//!
//! The page builds its DOM from the JSON with `textContent` and attributes only, never markup,
//! so node ids, agent strings, schema names and addresses from the mesh are text. The server
//! adds a Content-Security-Policy that allows only its own script and style (no inline code),
//! answers GET only, and refuses requests whose Host is neither a loopback name nor the address
//! it serves (a DNS-rebinding page cannot read the mesh).

mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::cli::{DashboardArgs, Global};
use crate::{Failure, Out};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Only our own script and style; no inline code, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct AppState {
    views: watch::Receiver<Option<Arc<String>>>,
    /// The address served (its host is accepted in the Host header, as are loopback names).
    local: SocketAddr,
}

pub async fn run(g: &Global, args: DashboardArgs) -> Result<Out, Failure> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure::Local(format!("cannot listen on {} (--listen): {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Failure::Local(format!("cannot read the listening address: {e}")))?;
    let (tx, rx) = watch::channel(None);
    let state = AppState { views: rx, local };
    let app = router(state);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "foldctl dashboard: http://{local}/ (the mesh of {}; Ctrl-C to stop)",
            g.addr
        );
        let _ = out.flush();
    }
    let gather = gather_loop(g.clone(), args, tx);
    let serve = axum::serve(listener, app);
    tokio::select! {
        r = serve => r.map_err(|e| Failure::Local(format!("the dashboard server failed: {e}")))?,
        () = gather => {}
        r = tokio::signal::ctrl_c() => {
            r.map_err(|e| Failure::Local(format!("cannot wait for Ctrl-C: {e}")))?;
        }
    }
    Ok(Out::text_only(String::new()))
}

/// Gather a view every interval (each gathering bounded by the call timeouts) and publish it,
/// until --iterations (if given) are done.
async fn gather_loop(g: Global, args: DashboardArgs, tx: watch::Sender<Option<Arc<String>>>) {
    let mut gatherer = view::Gatherer::default();
    let mut n = 0u64;
    loop {
        let v = gatherer
            .gather(&g, &args.also, args.hops, args.interval)
            .await;
        match serde_json::to_string(&v) {
            Ok(json) => {
                let _ = tx.send(Some(Arc::new(json)));
            }
            Err(e) => eprintln!("foldctl dashboard: cannot render the view: {e}"),
        }
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            // Keep serving the last view briefly so a reader can fetch it, then stop.
            tokio::time::sleep(args.interval).await;
            return;
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// Whether a Host header names this server: a loopback name (any port, so an `ssh -L` tunnel
/// works) or the address it listens on. A DNS-rebinding page carries its own domain: refused.
fn host_allowed(host: &str, local: SocketAddr) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == local.ip())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/view", get(latest))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The latest view; the first request waits for the first gathering (bounded).
async fn latest(State(s): State<AppState>) -> Response {
    let mut rx = s.views.clone();
    let wait = rx.wait_for(Option::is_some);
    let view = match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Ok(v)) => v.clone(),
        _ => None,
    };
    match view {
        Some(json) => (
            [(header::CONTENT_TYPE, "application/json")],
            json.as_str().to_owned(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no view gathered yet; see foldctl's stderr",
        )
            .into_response(),
    }
}

/// Refuse foreign Host headers (DNS rebinding), and put the security headers on every answer.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host_ok = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| host_allowed(h, s.local));
    let mut resp = if host_ok {
        next.run(req).await
    } else {
        (
            StatusCode::FORBIDDEN,
            "foldctl dashboard: open it at the address it printed",
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_hold_no_markup_sinks_and_no_remote_urls() {
        // The page builds its DOM from data with textContent/attributes only.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            // The SVG namespace is a name, not a fetch.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "a remote URL"
            );
        }
        assert!(INDEX_HTML.contains("<script src=\"/app.js\"></script>"));
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
    }

    #[test]
    fn hosts_are_loopback_names_or_the_served_address() {
        let local: SocketAddr = "127.0.0.1:9470".parse().unwrap();
        for ok in [
            "127.0.0.1:9470",
            "localhost:8080",
            "[::1]:9470",
            "LOCALHOST",
        ] {
            assert!(host_allowed(ok, local), "{ok}");
        }
        for bad in [
            "evil.example:9470",
            "10.0.0.1:9470",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!host_allowed(bad, local), "{bad}");
        }
        let lan: SocketAddr = "192.168.1.5:9470".parse().unwrap();
        assert!(host_allowed("192.168.1.5:9470", lan));
    }
}
