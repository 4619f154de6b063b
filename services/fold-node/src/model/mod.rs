//! Plain value types every layer shares, with no dependency on the rest of the crate: trust
//! distances and field policies (distance), range filters over keys (filter).

pub mod distance;
pub mod filter;
