//! fold-node: the data service of a foldmesh node.
//!
//! Where a request enters: [`api`] (public gRPC: `fold.v1.FoldNode`, `fold.v1.Network`) and
//! [`peer_requests`] (requests from other nodes, via the sidecar). Where it is checked:
//! [`bounds`] (every string's limit, first), [`identity`] (who is asking → trust distance), [`permissions`] (field policies) and [`data`]
//! (schema state, fields, filters). Where it is stored: [`store`] (redb); mutations are written
//! in groups, one transaction and one fsync each, by [`commit`] (the group-commit writer).
//! Requests for another node leave through [`mesh`] (the link to the p2p-sidecar).
//! Domain code fails with [`error::NodeError`], mapped to a gRPC status only at the edge.

pub mod api;
pub mod balance;
pub mod bounds;
pub mod commit;
pub mod config;
pub mod data;
pub mod distance;
pub mod error;
pub mod execute;
pub mod filter;
pub mod follow;
pub mod forward_stream;
pub mod groups;
pub mod hub;
pub mod identity;
pub mod link;
pub mod mesh;
pub mod metrics;
pub mod paging;
pub mod peer_requests;
pub mod permissions;
pub mod pipeline;
pub mod route;
pub mod schema;
pub mod server;
pub mod slots;
pub mod store;
pub mod subscribe;
pub mod topology;
