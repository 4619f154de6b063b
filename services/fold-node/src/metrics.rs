//! fold-node's own metrics (beside the gRPC RED metrics of the middleware): storage operations,
//! forwards through the mesh, circuit breakers, and the sidecar link. Every label has a bounded
//! set of values (peer ids are capped, see [`BoundedLabelValues`]).

use std::sync::Arc;
use std::time::Instant;

use fold_middleware::breaker::BreakerState;
use fold_middleware::metrics::{BoundedLabelValues, latency_histogram};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Most distinct peers named in breaker metrics; later ones are "other".
const MAX_PEER_LABELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcomeLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub target: String,
    pub to: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct NodeMetrics {
    storage_ops: Family<OpOutcomeLabels, Counter>,
    storage_seconds: Histograms<OpLabels>,
    forwards: Family<OpOutcomeLabels, Counter>,
    forward_seconds: Histograms<OpLabels>,
    breaker_state: Family<TargetLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    sidecar_link_up: Gauge,
    peers: BoundedLabelValues,
}

impl NodeMetrics {
    pub fn register(reg: &mut Registry) -> Arc<NodeMetrics> {
        let m = NodeMetrics {
            storage_ops: Family::default(),
            storage_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            forwards: Family::default(),
            forward_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            sidecar_link_up: Gauge::default(),
            peers: BoundedLabelValues::new(MAX_PEER_LABELS),
        };
        reg.register(
            "fold_storage_operations",
            "Storage operations by kind and outcome",
            m.storage_ops.clone(),
        );
        reg.register(
            "fold_storage_operation_seconds",
            "Storage operation latency in seconds",
            m.storage_seconds.clone(),
        );
        reg.register(
            "fold_forwards",
            "Requests forwarded to other nodes, by kind and gRPC outcome",
            m.forwards.clone(),
        );
        reg.register(
            "fold_forward_seconds",
            "Latency of requests forwarded to other nodes, in seconds",
            m.forward_seconds.clone(),
        );
        reg.register(
            "fold_circuit_breaker_state",
            "Circuit breaker state per target (0 closed, 1 open, 2 half-open)",
            m.breaker_state.clone(),
        );
        reg.register(
            "fold_circuit_breaker_transitions",
            "Circuit breaker state changes per target",
            m.breaker_transitions.clone(),
        );
        reg.register(
            "fold_sidecar_link_up",
            "1 while the p2p-sidecar link is up",
            m.sidecar_link_up.clone(),
        );
        Arc::new(m)
    }

    pub fn storage(&self, op: &'static str, ok: bool, started: Instant) {
        let outcome = if ok { "ok" } else { "error" };
        self.storage_ops
            .get_or_create(&OpOutcomeLabels { op, outcome })
            .inc();
        self.storage_seconds
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn forward(&self, op: &'static str, outcome: &'static str, started: Instant) {
        self.forwards
            .get_or_create(&OpOutcomeLabels { op, outcome })
            .inc();
        self.forward_seconds
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn breaker(&self, target: &str, state: BreakerState, changed: bool) {
        let target = self.peers.get(target);
        self.breaker_state
            .get_or_create(&TargetLabels {
                target: target.clone(),
            })
            .set(state.as_i64());
        if changed {
            self.breaker_transitions
                .get_or_create(&TransitionLabels {
                    target,
                    to: state.as_str(),
                })
                .inc();
        }
    }

    pub fn sidecar_link(&self, up: bool) {
        self.sidecar_link_up.set(i64::from(up));
    }
}
