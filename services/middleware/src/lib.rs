//! Small, generic tower layers for foldmesh, each with its own error type, and one place
//! ([`errors::status_for`]) that maps those errors to gRPC statuses.
//!
//! - [`rate_limit`]: keyed rate limiting (per client, per peer) → `RESOURCE_EXHAUSTED`
//! - [`breaker`]: consecutive-failure circuit breakers with a probe after a backoff → `UNAVAILABLE`
//! - [`admission`]: a global concurrency limit with a bounded queue; beyond it, load shedding →
//!   `UNAVAILABLE`
//! - [`errors`]: the error → status mapping and the outermost layer that applies it

pub mod admission;
pub mod boxed;
pub mod breaker;
pub mod deadline;
pub mod errors;
pub mod metrics;
pub mod rate_limit;
pub mod size_limit;
