//! Where data is replicated: read-only replicas that follow another node (follow), and schema groups on Raft (groups).

pub mod follow;
pub mod groups;
