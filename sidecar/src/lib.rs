//! p2p-sidecar: the network half of a foldmesh node.
//!
//! Where things are: [`identity`] (the persistent key; node id = PeerId), [`behaviour`] (the
//! libp2p protocols), [`codec`] (length-delimited protobuf with size limits), [`event_loop`] (the
//! one owner of the `Swarm`), [`client`] (the handle everything else uses), [`mesh_api`] (the
//! gRPC service for the node), [`node_link`] (calls into the node), [`server`] (process wiring).

pub mod behaviour;
pub mod client;
pub mod codec;
pub mod command;
pub mod config;
pub mod event_loop;
pub mod forward;
pub mod gate;
pub mod identity;
pub mod mesh_api;
pub mod metrics;
pub mod node_link;
pub mod peer_book;
pub mod reach;
pub mod server;
pub mod signing;
