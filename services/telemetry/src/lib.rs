//! Observability plumbing shared by both processes.
//!
//! [`admin`]: the admin HTTP port — `/metrics` (Prometheus text format), `/livez` and `/readyz`.
//! [`otel`]: logs, OpenTelemetry trace export over OTLP, and W3C trace-context propagation.

pub mod admin;
pub mod otel;
