//! Small, generic tower layers for foldmesh, each with its own error type, and one place
//! ([`errors::status_for`]) that maps those errors to gRPC statuses.
//!
//! - [`rate_limit`]: keyed rate limiting (per client, per peer) → `RESOURCE_EXHAUSTED`
//! - [`breaker`]: consecutive-failure circuit breakers with a probe after a backoff → `UNAVAILABLE`
//! - load shedding (tower's `LoadShed` over a `Buffer` over a `ConcurrencyLimit`) → `UNAVAILABLE`
//! - [`errors`]: the error → status mapping and the outermost layer that applies it

pub mod breaker;
pub mod deadline;
pub mod errors;
pub mod metrics;
pub mod rate_limit;
pub mod size_limit;
