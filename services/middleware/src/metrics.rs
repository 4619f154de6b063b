//! gRPC RED metrics with the names dashboards already use (go-grpc-prometheus):
//! `grpc_{server,client}_started_total`, `grpc_{server,client}_handled_total` (with `grpc_code`) and
//! `grpc_{server,client}_handling_seconds`, labelled by `grpc_type`, `grpc_service`, `grpc_method`.
//!
//! Label values are bounded: only methods found in the registered descriptor sets are named;
//! anything else a client sends is counted as `unknown`. The status code is read where gRPC puts
//! it — in the response headers (trailers-only responses) or in the trailers at the end of the
//! body — so streams are measured to their real end.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message;
use tonic::Code;
use tower::{Layer, Service};

use crate::errors::{BoxError, status_for};

/// Latency buckets in seconds: fine below a millisecond (local calls), coarse up to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub grpc_type: &'static str,
    pub grpc_service: String,
    pub grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    pub grpc_type: &'static str,
    pub grpc_service: String,
    pub grpc_method: String,
    pub grpc_code: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Which side of the call is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

pub struct GrpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    seconds: HistogramFamily<MethodLabels>,
    /// "/pkg.Service/Method" → labels.
    methods: HashMap<String, MethodLabels>,
}

/// Every gRPC code's canonical name, as in go-grpc-prometheus.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

impl GrpcMetrics {
    /// Register the metric families in `registry` and learn the methods of the given encoded
    /// `FileDescriptorSet`s (only these get their own label values).
    pub fn register(
        registry: &mut Registry,
        side: Side,
        descriptor_sets: &[&[u8]],
    ) -> Arc<GrpcMetrics> {
        let prefix = match side {
            Side::Server => "grpc_server",
            Side::Client => "grpc_client",
        };
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let seconds: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let what = match side {
            Side::Server => "RPCs started on the server",
            Side::Client => "RPCs started by the client",
        };
        registry.register(format!("{prefix}_started"), what, started.clone());
        registry.register(
            format!("{prefix}_handled"),
            "RPCs completed, by gRPC status code",
            handled.clone(),
        );
        registry.register(
            format!("{prefix}_handling_seconds"),
            "Time from the start of an RPC to its status, in seconds",
            seconds.clone(),
        );
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(*set) else {
                tracing::warn!(
                    "a descriptor set for gRPC metrics did not decode; its methods count as unknown"
                );
                continue;
            };
            for file in fds.file {
                let package = file.package.clone().unwrap_or_default();
                for svc in &file.service {
                    let svc_name = svc.name.clone().unwrap_or_default();
                    let full = if package.is_empty() {
                        svc_name
                    } else {
                        format!("{package}.{svc_name}")
                    };
                    for m in &svc.method {
                        let name = m.name.clone().unwrap_or_default();
                        let grpc_type = match (
                            m.client_streaming.unwrap_or(false),
                            m.server_streaming.unwrap_or(false),
                        ) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        methods.insert(
                            format!("/{full}/{name}"),
                            MethodLabels {
                                grpc_type,
                                grpc_service: full.clone(),
                                grpc_method: name,
                            },
                        );
                    }
                }
            }
        }
        Arc::new(GrpcMetrics {
            started,
            handled,
            seconds,
            methods,
        })
    }

    fn labels_for(&self, path: &str) -> MethodLabels {
        self.methods.get(path).cloned().unwrap_or(MethodLabels {
            grpc_type: "unknown",
            grpc_service: "unknown".into(),
            grpc_method: "unknown".into(),
        })
    }

    fn finish(&self, labels: &MethodLabels, code: Code, started: Instant) {
        self.handled
            .get_or_create(&HandledLabels {
                grpc_type: labels.grpc_type,
                grpc_service: labels.grpc_service.clone(),
                grpc_method: labels.grpc_method.clone(),
                grpc_code: code_name(code),
            })
            .inc();
        self.seconds
            .get_or_create(labels)
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Measures every call through it (server side: wrap the whole router; client side: wrap the
/// channel).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(v.parse().ok()?))
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    RB: Body + Send + 'static,
{
    type Response = http::Response<MetricsBody<RB>>;
    type Error = BoxError;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let labels = self.metrics.labels_for(req.uri().path());
        self.metrics.started.get_or_create(&labels).inc();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let pending = match header_code(&parts.headers) {
                        Some(code) => {
                            metrics.finish(&labels, code, started);
                            None
                        }
                        None => Some(Pending {
                            metrics,
                            labels,
                            started,
                        }),
                    };
                    Ok(http::Response::from_parts(
                        parts,
                        MetricsBody {
                            inner: body,
                            pending,
                        },
                    ))
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    metrics.finish(&labels, status_for(&*e).code(), started);
                    Err(e)
                }
            }
        })
    }
}

struct Pending {
    metrics: Arc<GrpcMetrics>,
    labels: MethodLabels,
    started: Instant,
}

impl Pending {
    fn finish(self, code: Code) {
        self.metrics.finish(&self.labels, code, self.started);
    }
}

/// A response body that records the call's status when its trailers go by (or, if the body is
/// dropped before the end, as cancelled).
pub struct MetricsBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Drop for MetricsBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(Code::Cancelled);
        }
    }
}

impl<B> Body for MetricsBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref()
                    && let Some(p) = this.pending.take()
                {
                    p.finish(header_code(t).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.finish(Code::Unavailable);
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Keeps a label's values bounded: the first `max` distinct values are used as they are, any
/// later one becomes `"other"` (so a churn of peers cannot grow the series without limit).
#[derive(Debug)]
pub struct BoundedLabelValues {
    max: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl BoundedLabelValues {
    pub fn new(max: usize) -> Self {
        BoundedLabelValues {
            max,
            seen: Default::default(),
        }
    }

    pub fn get(&self, v: &str) -> String {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(v) {
            return v.to_string();
        }
        if seen.len() < self.max {
            seen.insert(v.to_string());
            return v.to_string();
        }
        "other".to_string()
    }
}

/// Render a registry in the Prometheus text exposition format (version 0.0.4), which every
/// Prometheus and `promtool check metrics` accept: prometheus-client writes OpenMetrics, whose
/// counter families are named without `_total` and which ends with `# EOF`.
pub fn render_prometheus(registry: &Registry) -> String {
    let mut om = String::new();
    if prometheus_client::encoding::text::encode(&mut om, registry).is_err() {
        return String::new();
    }
    let mut counters = std::collections::HashSet::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let fixed = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match fixed {
            Some(f) => out.push_str(&f),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_total_family_names() {
        let mut reg = Registry::default();
        let m = GrpcMetrics::register(&mut reg, Side::Server, &[]);
        let labels = m.labels_for("/x.Y/Z");
        assert_eq!(labels.grpc_service, "unknown");
        m.started.get_or_create(&labels).inc();
        m.finish(&labels, Code::NotFound, Instant::now());
        let text = render_prometheus(&reg);
        assert!(
            text.contains("# TYPE grpc_server_started_total counter"),
            "{text}"
        );
        assert!(text.contains("grpc_server_handled_total{"), "{text}");
        assert!(text.contains("grpc_code=\"NotFound\""), "{text}");
        assert!(
            text.contains("# TYPE grpc_server_handling_seconds histogram"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
