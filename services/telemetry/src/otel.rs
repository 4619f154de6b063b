//! Logs and traces, each with its own filter. Logs go to stderr; `RUST_LOG` sets their level
//! (default [`DEFAULT_LOG_FILTER`]) and nothing else. Traces are exported over OTLP/gRPC when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and
//! are off otherwise; which spans are exported is up to the `OTEL_*` variables alone
//! (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_EXPORTER=none`, `OTEL_SDK_DISABLED`, the exporter's
//! own), over the spans of [`SPAN_FILTER`] — never the log level: `RUST_LOG=warn` still exports
//! every request's spans. `OTEL_SERVICE_NAME` overrides the service name.
//!
//! The resource names the process: `service.name` (the binary, or `OTEL_SERVICE_NAME`),
//! `service.namespace` = `foldmesh`, `fold.role` (`node` or `sidecar`), and, once the process
//! knows it ([`set_instance_id`]), `service.instance.id` = the node id (the libp2p PeerId the
//! two processes of one node share).
//!
//! W3C trace context (`traceparent`, `tracestate`) crosses every hop: [`extract_metadata`] /
//! [`extract_map`] read a parent context from gRPC metadata or from a message's trace-context
//! map, and [`inject_current`] writes the current span's context into a map for the next hop.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and stops the trace exporter when dropped (at process exit).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace exporter shutdown: {e}");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for trace export.
pub fn otlp_requested() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Log filter when `RUST_LOG` is not set. libp2p-kad's behaviour module warns "Failed to trigger
/// bootstrap: No known peers" whenever a node without connections gains a listen address, which
/// is every start of a node that is (still) alone; the sidecar bootstraps on its own schedule and
/// logs what matters, so that module logs errors only unless `RUST_LOG` says otherwise.
pub const DEFAULT_LOG_FILTER: &str = "info,libp2p_kad::behaviour=error,openraft=warn";

/// Spans (and the events inside them) that trace export sees, whatever `RUST_LOG` says: the
/// request spans of both processes are at INFO; libraries' DEBUG/TRACE spans stay out.
pub const SPAN_FILTER: &str = "info,libp2p_kad::behaviour=error,openraft=warn";

/// The node id, once known: the resource's `service.instance.id`.
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// Name this process's traces with its node id (`service.instance.id`). The first call wins;
/// spans exported before it carry the rest of the resource only.
pub fn set_instance_id(node_id: &str) {
    if !node_id.is_empty() {
        let _ = INSTANCE_ID.set(node_id.to_string());
    }
}

/// The role of a process from its service name: `node` or `sidecar`.
fn role(service_name: &str) -> &'static str {
    if service_name.contains("sidecar") {
        "sidecar"
    } else {
        "node"
    }
}

/// Install logging (and tracing export when configured). Call inside a tokio runtime.
pub fn init(service_name: &'static str, log_format: &str) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // openraft logs every vote and append at INFO: keep it to warnings unless RUST_LOG names it.
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if v.contains("openraft") => filter,
        _ => match "openraft=warn".parse() {
            Ok(d) => filter.add_directive(d),
            Err(_) => filter,
        },
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if log_format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut provider = None;
    let mut export_error = None;
    let otel_layer = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let p = tracer_provider(service_name, exporter);
                let tracer = p.tracer(service_name);
                provider = Some(p);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(EnvFilter::new(SPAN_FILTER)),
                )
            }
            Err(e) => {
                export_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    // Each layer has its own filter: the log level never decides what is traced.
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel_layer)
        .init();
    if let Some(e) = export_error {
        tracing::error!(error = %e, "OTLP trace export is configured but could not start; traces are off");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    TelemetryGuard { provider }
}

/// The tracer provider: batches to `exporter`, with the resource naming this process.
fn tracer_provider<E: SpanExporter + 'static>(
    service_name: &'static str,
    exporter: E,
) -> SdkTracerProvider {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| service_name.to_string());
    SdkTracerProvider::builder()
        .with_batch_exporter(InstanceExporter::new(exporter))
        .with_resource(
            Resource::builder()
                .with_service_name(name)
                .with_attributes([
                    KeyValue::new("service.namespace", "foldmesh"),
                    KeyValue::new("fold.role", role(service_name)),
                ])
                .build(),
        )
        .build()
}

/// An exporter that adds `service.instance.id` to the resource as soon as the node id is known
/// (the provider's resource is fixed when it is built, before the process knows its id).
#[derive(Debug)]
struct InstanceExporter<E> {
    inner: tokio::sync::Mutex<E>,
    resource: Resource,
    named: AtomicBool,
}

impl<E> InstanceExporter<E> {
    fn new(inner: E) -> Self {
        InstanceExporter {
            inner: tokio::sync::Mutex::new(inner),
            resource: Resource::builder_empty().build(),
            named: AtomicBool::new(false),
        }
    }
}

/// `base` with `service.instance.id` = `id`.
fn with_instance(base: &Resource, id: &str) -> Resource {
    Resource::builder_empty()
        .with_attributes(
            base.iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_attribute(KeyValue::new("service.instance.id", id.to_string()))
        .build()
}

impl<E: SpanExporter> SpanExporter for InstanceExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut inner = self.inner.lock().await;
        if !self.named.load(Ordering::Acquire)
            && let Some(id) = INSTANCE_ID.get()
        {
            inner.set_resource(&with_instance(&self.resource, id));
            self.named.store(true, Ordering::Release);
        }
        inner.export(batch).await
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            Err(_) => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.force_flush(),
            Err(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
        self.named.store(false, Ordering::Release);
        self.inner.get_mut().set_resource(resource);
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The remote parent carried in gRPC metadata (`traceparent`), if any.
pub fn extract_metadata(md: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(md))
}

/// The remote parent carried in HTTP headers, if any.
pub fn extract_headers(h: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(h))
}

/// The remote parent carried in a message's trace-context map, if any.
pub fn extract_map(map: &HashMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(map)
}

/// Make `span` a child of the remote parent in `cx` (no-op when `cx` carries no span).
pub fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    let _ = span.set_parent(cx);
}

/// The current span's context as a W3C trace-context map, for the next hop.
pub fn inject_current() -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut map);
    map
}

/// Put a trace-context map into outgoing gRPC metadata.
pub fn inject_metadata(map: &HashMap<String, String>, md: &mut tonic::metadata::MetadataMap) {
    for (k, v) in map {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(v.as_str()),
        ) {
            md.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_names_the_node_and_its_role() {
        assert_eq!(role("p2p-sidecar"), "sidecar");
        assert_eq!(role("fold-node"), "node");
        let base = Resource::builder_empty()
            .with_service_name("fold-node")
            .with_attribute(KeyValue::new("fold.role", "node"))
            .build();
        let r = with_instance(&base, "12D3KooWX");
        let get = |k: &str| {
            r.get(&opentelemetry::Key::from(k.to_string()))
                .map(|v| v.to_string())
        };
        assert_eq!(get("service.instance.id").as_deref(), Some("12D3KooWX"));
        assert_eq!(get("service.name").as_deref(), Some("fold-node"));
        assert_eq!(get("fold.role").as_deref(), Some("node"));
    }

    #[test]
    fn extracts_w3c_parents() {
        let mut map = HashMap::new();
        map.insert(
            "traceparent".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        );
        let cx = extract_map(&map);
        use opentelemetry::trace::TraceContextExt;
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut md = tonic::metadata::MetadataMap::new();
        inject_metadata(&map, &mut md);
        let cx = extract_metadata(&md);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            !extract_map(&HashMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }
}
