//! End-to-end test support: start the real foldmesh binaries as processes (on loopback or inside
//! Linux network namespaces made by [`netns`]) and talk to them with real clients.

pub mod cgroup;
pub mod client;
pub mod foldctl;
pub mod groups;
pub mod http;
pub mod loopback;
pub mod mesh;
pub mod natlab;
pub mod netns;
pub mod process;
pub mod tls;
pub mod tools;
