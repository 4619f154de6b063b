//! The seam between the data service and the mesh: where a request for another node goes.
//!
//! The FoldNode API asks a [`Remote`] whether a target node id names this node; if not, it
//! hands the request to the remote, which forwards it through the p2p-sidecar (the `mesh`
//! module) and returns that node's real answer or an honest error status.

use fold_proto::v1::{MutateRequest, MutateResponse, QueryRequest, QueryResponse};
use tonic::Status;

#[tonic::async_trait]
pub trait Remote: Send + Sync + 'static {
    /// True when `target` names this node (the empty string always does).
    fn is_local(&self, target: &str) -> bool;
    /// This node's id when known (the sidecar's PeerId), for stamping responses.
    fn local_node_id(&self) -> Option<String>;
    /// Forward a query to node `req.target_node_id` and return its answer.
    async fn forward_query(&self, req: QueryRequest) -> Result<QueryResponse, Status>;
    /// Forward a mutation to node `req.target_node_id` and return its answer.
    async fn forward_mutate(&self, req: MutateRequest) -> Result<MutateResponse, Status>;
}

/// A node without a mesh link: every non-local target is refused as unreachable.
pub struct NoMesh;

#[tonic::async_trait]
impl Remote for NoMesh {
    fn is_local(&self, target: &str) -> bool {
        target.is_empty()
    }
    fn local_node_id(&self) -> Option<String> {
        None
    }
    async fn forward_query(&self, req: QueryRequest) -> Result<QueryResponse, Status> {
        Err(no_mesh(&req.target_node_id))
    }
    async fn forward_mutate(&self, req: MutateRequest) -> Result<MutateResponse, Status> {
        Err(no_mesh(&req.target_node_id))
    }
}

fn no_mesh(target: &str) -> Status {
    Status::unavailable(format!(
        "cannot reach node {target}: this node has no mesh link (start it with a p2p-sidecar)"
    ))
}
