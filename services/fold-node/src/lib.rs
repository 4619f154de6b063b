//! fold-node: the data service of a foldmesh node. The crate is laid out by where a request
//! goes:
//!
//! - [`api`]: where it enters — the public gRPC API (`fold.v1.FoldNode`, `fold.v1.Network`) and
//!   [`api::peer_requests`] (requests from other nodes, via the sidecar);
//! - [`access`]: where it is checked — [`access::bounds`] (every string's limit, first),
//!   [`access::identity`] (who is asking → trust distance), [`access::permissions`] (field
//!   policies);
//! - [`routing`]: where it is routed — the one operation [`routing::pipeline`], schema-addressed
//!   reads ([`routing::route`]);
//! - [`ops`]: where it executes — here or forwarded ([`ops::execute`]), on the data
//!   ([`ops::data`]: schema state, fields, filters), subscriptions and the change hub;
//! - [`link`]: how it leaves for another node — the [`link::Link`] trait and the sidecar link
//!   ([`link::mesh`]);
//! - [`storage`]: where it is stored — redb ([`storage::store`]), written in groups (one
//!   transaction and one fsync each) by [`storage::commit`];
//! - [`replication`]: where it is replicated — replicas ([`replication::follow`]) and schema
//!   groups on Raft ([`replication::groups`]).
//!
//! Domain code fails with [`error::NodeError`], mapped to a gRPC status only at the edge.

pub mod access;
pub mod api;
pub mod config;
pub mod error;
pub mod link;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod replication;
pub mod routing;
pub mod server;
pub mod storage;
