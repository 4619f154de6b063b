//! What the node needs of the mesh, as a trait: [`Link`]. Routing and forwarding depend on it,
//! not on the sidecar link itself ([`crate::link::mesh::MeshLink`] implements it), so the routing
//! logic runs in unit tests over a fake link.
//!
//! An operation for another node leaves through the one [`Link::forward`]; [`ask`] turns its
//! answer into the response type the caller expects ([`Reply`]).

pub mod forward_stream;
pub mod mesh;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fold_proto::v1::{
    BatchMutateResponse, CheckSchemasResponse, HistoryResponse, ListPeersResponse, MutateResponse,
    QueryResponse,
};
use fold_proto::wire::{ChangesResponse, Requester, forward_response, operation};

use crate::error::NodeError;

/// A boxed future answering with a value or the node's domain error.
pub type LinkFuture<T> = Pin<Box<dyn Future<Output = Result<T, NodeError>> + Send + 'static>>;

/// The mesh as routing and forwarding see it.
pub trait Link: Send + Sync + 'static {
    /// This node's id, once known.
    fn node_id(&self) -> Option<String>;

    /// This node's id, or empty while it is not known.
    fn node_id_or_empty(&self) -> String {
        self.node_id().unwrap_or_default()
    }

    /// True when `target` names this node (empty always does).
    fn is_local(&self, target: &str) -> bool {
        target.is_empty() || self.node_id().is_some_and(|id| id == target)
    }

    /// `Ok` while the link can carry requests; else the error to fail with at once.
    fn ready(&self) -> Result<(), NodeError>;

    /// The longest a forward may take when the caller set no deadline.
    fn forward_timeout(&self) -> Duration;

    /// May routing send to `node` now (connected, its breaker not open)?
    fn routable(&self, node: &str) -> bool;

    /// Run `op` on node `target` for `requester`, answering within `deadline`.
    fn forward(
        &self,
        target: String,
        op: operation::Kind,
        requester: Requester,
        deadline: Option<Duration>,
    ) -> LinkFuture<forward_response::Result>;

    /// The nodes with a provider record of `schema` (unconfirmed), within `timeout`.
    fn providers(&self, schema: &str, timeout: Duration) -> LinkFuture<Vec<String>>;

    /// Ask `node` which of `names` it serves, within `timeout`.
    fn check_schemas(
        &self,
        node: &str,
        names: Vec<String>,
        timeout: Duration,
    ) -> LinkFuture<CheckSchemasResponse>;

    /// Call `f` with a peer's id when it connects again after a disconnection (set once).
    fn on_reconnect(&self, f: Box<dyn Fn(&str) + Send + Sync>);
}

/// A response type one kind of operation answers with.
pub trait Reply: Sized {
    /// The operation, as named in "node X answered {WHAT} with a different kind of response".
    const WHAT: &'static str;
    /// The response, if `r` is one.
    fn take(r: forward_response::Result) -> Option<Self>;
}

macro_rules! reply {
    ($($ty:ty => $variant:ident, $what:literal;)*) => {$(
        impl Reply for $ty {
            const WHAT: &'static str = $what;
            fn take(r: forward_response::Result) -> Option<Self> {
                match r {
                    forward_response::Result::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    )*};
}

reply! {
    QueryResponse => Query, "a query";
    MutateResponse => Mutate, "a mutation";
    BatchMutateResponse => BatchMutate, "a batch";
    HistoryResponse => History, "a history request";
    ChangesResponse => Changes, "a changes request";
    ListPeersResponse => Peers, "a peers request";
}

/// The answer `r` of node `target` as the response type `T` the operation answers with.
pub fn expect<T: Reply>(target: &str, r: forward_response::Result) -> Result<T, NodeError> {
    T::take(r).ok_or_else(|| {
        NodeError::internal(format!(
            "node {target} answered {} with a different kind of response",
            T::WHAT
        ))
    })
}

/// Forward `op` to `target` and expect a `T` back.
pub async fn ask<T: Reply>(
    link: &dyn Link,
    target: &str,
    op: operation::Kind,
    requester: Requester,
    deadline: Option<Duration>,
) -> Result<T, NodeError> {
    let r = link
        .forward(target.to_string(), op, requester, deadline)
        .await?;
    expect(target, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_another_kind_is_an_internal_error() {
        let r = forward_response::Result::Query(QueryResponse::default());
        assert!(expect::<QueryResponse>("n", r.clone()).is_ok());
        let e = expect::<HistoryResponse>("n", r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert_eq!(
            e.message(),
            "node n answered a history request with a different kind of response"
        );
    }
}
