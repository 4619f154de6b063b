//! Observability plumbing shared by both processes.
//!
//! [`admin`]: the admin HTTP port — `/metrics` (Prometheus text format), `/livez` and `/readyz`.

pub mod admin;
