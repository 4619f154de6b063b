//! The one operation pipeline of client requests. The API edge ([`crate::api`]) extracts the
//! principal, the deadline and the operation, and calls [`Pipeline::call`]; then:
//!
//! 1. **routing** ([`crate::routing::route::Router`]): a read addressed by schema (`ROUTE_ANY`,
//!    `ROUTE_ALL`) chooses its nodes (balancing, retries within the budget, hedging);
//! 2. **execution** ([`crate::ops::execute::Executor`]): an operation runs here, or is forwarded
//!    through the link to the node it names.

use std::time::Duration;

use fold_proto::wire::{forward_response, operation};

use crate::access::identity::Principal;
use crate::error::NodeError;
use crate::link::{Reply, expect};
use crate::ops::execute::{Executor, target_of};
use crate::routing::route::Router;

#[derive(Clone)]
pub struct Pipeline {
    router: Router,
    exec: Executor,
}

impl Pipeline {
    /// Routing by `router`, execution by the router's executor.
    pub fn new(router: Router) -> Self {
        let exec = router.executor().clone();
        Pipeline { router, exec }
    }

    /// Run `op` for `who` within `deadline`, answered as the response type `T` it expects.
    pub async fn call<T: Reply>(
        &self,
        who: &Principal,
        op: operation::Kind,
        deadline: Option<Duration>,
    ) -> Result<T, NodeError> {
        let target = target_of(&op).to_string();
        let r = self.run(who, op, deadline).await?;
        expect(&target, r)
    }

    /// Run `op` for `who` within `deadline`: routed when it names a route, else executed.
    pub async fn run(
        &self,
        who: &Principal,
        op: operation::Kind,
        deadline: Option<Duration>,
    ) -> Result<forward_response::Result, NodeError> {
        use forward_response::Result as R;
        match op {
            operation::Kind::Query(q) if q.route != 0 => {
                self.router.query(who, q, deadline).await.map(R::Query)
            }
            operation::Kind::History(h) if h.route != 0 => {
                self.router.history(who, h, deadline).await.map(R::History)
            }
            op => self.exec.execute(who, op, deadline).await,
        }
    }
}
