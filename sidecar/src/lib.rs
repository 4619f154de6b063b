//! p2p-sidecar: the network half of a foldmesh node.
//!
//! Where things are: [`identity`] (the persistent key; node id = PeerId), [`behaviour`] (the
//! libp2p protocols), [`codec`] (length-delimited protobuf with size limits), [`event_loop`] (the
//! one owner of the `Swarm`: it dispatches to handlers in child modules by concern), [`client`] (the handle everything else uses), [`mesh_api`] (the
//! gRPC service for the node), [`node_link`] (calls into the node), [`server`] (process wiring).
//! The sidecar's policy is in `NetworkBehaviour`s composed into the swarm's behaviour, each tested
//! with real swarms on the memory transport: [`book_keeper`] (the peer book, bootstrap, redial),
//! [`connector`] (requests held until their peer connects), [`reach_keeper`] (AutoNAT, relay
//! reservations, dial-back cleanup). They and the loop drive plain state machines: [`bootstrap`],
//! [`connect`], [`conns`], [`upgrade`], [`reach`], [`peer_book`] (its file written by
//! [`book_file`]); [`status`] is the snapshot `Mesh.Status` is built from, [`schema_check`] the
//! schema checks between peers.

pub mod behaviour;
pub mod book_file;
pub mod book_keeper;
pub mod bootstrap;
pub mod client;
pub mod codec;
pub mod command;
pub mod config;
pub mod connect;
pub mod connector;
pub mod conns;
pub mod event_loop;
pub mod forward;
pub mod gate;
pub mod identity;
pub mod mesh_api;
pub mod metrics;
pub mod node_link;
pub mod peer_book;
pub mod policy_kit;
pub mod reach;
pub mod reach_keeper;
pub mod schema_check;
pub mod server;
pub mod signing;
pub mod status;
pub mod upgrade;
