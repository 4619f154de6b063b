//! fold-node's own metrics (beside the gRPC RED metrics of the middleware): storage operations,
//! group commit (group sizes, commit latency, write queue depth), forwards through the mesh,
//! circuit breakers, and the sidecar link. Every label has a bounded
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets of the group-size histograms: 1, 2, 4, … 8192.
fn group_size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 14,
    ))
}

pub struct NodeMetrics {
    storage_ops: Family<OpOutcomeLabels, Counter>,
    storage_seconds: Histograms<OpLabels>,
    forwards: Family<OpOutcomeLabels, Counter>,
    forward_seconds: Histograms<OpLabels>,
    breaker_state: Family<TargetLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    sidecar_link_up: Gauge,
    peers: BoundedLabelValues,
    commit_group_requests: Histogram,
    commit_group_records: Histogram,
    commit_seconds: Histogram,
    commit_failures: Counter,
    write_queue_depth: Gauge,
    route_requests: Family<RouteLabels, Counter>,
    route_attempts: Family<OpLabels, Counter>,
    route_retries: Family<OutcomeLabels, Counter>,
    provider_lookups: Family<OutcomeLabels, Counter>,
    route_peer_latency: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    route_peer_in_flight: Family<TargetLabels, Gauge>,
    injected_faults: Counter,
    peer_requests: Family<OpOutcomeLabels, Counter>,
    peer_request_seconds: Histograms<OpLabels>,
    subscribers: Gauge,
    subscription_changes: Counter,
    subscription_ends: Family<ReasonLabels, Counter>,
    replica_applied: Family<SchemaLabels, Gauge>,
    replica_lag: Family<SchemaLabels, Gauge>,
    replica_refused: Family<ReplicaRefusalLabels, Counter>,
}

/// A followed schema (at most `follow::MAX_FOLLOWED`, from the node's own flags).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchemaLabels {
    pub schema: String,
}

/// A followed schema and why an answer of its source was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaRefusalLabels {
    pub schema: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl NodeMetrics {
    pub fn register(reg: &mut Registry) -> Arc<NodeMetrics> {
        let m = NodeMetrics::new();
        m.register_peer_requests(reg);
        m.register_routing(reg);
        m.register_link(reg);
        m.register_commits(reg);
        m.register_streams(reg);
        Arc::new(m)
    }

    fn new() -> NodeMetrics {
        NodeMetrics {
            storage_ops: Family::default(),
            storage_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            forwards: Family::default(),
            forward_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            sidecar_link_up: Gauge::default(),
            peers: BoundedLabelValues::new(MAX_PEER_LABELS),
            commit_group_requests: group_size_histogram(),
            commit_group_records: group_size_histogram(),
            commit_seconds: latency_histogram(),
            commit_failures: Counter::default(),
            write_queue_depth: Gauge::default(),
            route_requests: Family::default(),
            route_attempts: Family::default(),
            route_retries: Family::default(),
            provider_lookups: Family::default(),
            route_peer_latency: Family::default(),
            route_peer_in_flight: Family::default(),
            injected_faults: Counter::default(),
            peer_requests: Family::default(),
            peer_request_seconds: Family::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            ),
            subscribers: Gauge::default(),
            subscription_changes: Counter::default(),
            subscription_ends: Family::default(),
            replica_applied: Family::default(),
            replica_lag: Family::default(),
            replica_refused: Family::default(),
        }
    }

    /// Requests from other nodes and fault injection.
    fn register_peer_requests(&self, reg: &mut Registry) {
        reg.register(
            "fold_peer_requests",
            "Requests from other nodes (handed over by the sidecar), by operation and gRPC outcome",
            self.peer_requests.clone(),
        );
        reg.register(
            "fold_peer_request_seconds",
            "Time this node took to serve a request from another node, in seconds",
            self.peer_request_seconds.clone(),
        );
        reg.register(
            "fold_injected_faults",
            "Requests from peers refused with UNAVAILABLE by fault injection (--fault-percent)",
            self.injected_faults.clone(),
        );
    }

    /// Schema-addressed reads.
    fn register_routing(&self, reg: &mut Registry) {
        reg.register(
            "fold_route_requests",
            "Schema-addressed reads (route any/all) by outcome (all: OK, partial, all_failed)",
            self.route_requests.clone(),
        );
        reg.register(
            "fold_route_attempts",
            "Nodes asked by schema-addressed reads (first tries, failovers and hedges)",
            self.route_attempts.clone(),
        );
        reg.register(
            "fold_route_retries",
            "Failovers of schema-addressed reads: retried, hedged, or budget_exhausted (not retried)",
            self.route_retries.clone(),
        );
        reg.register(
            "fold_provider_lookups",
            "Provider set lookups (DHT + schema checks): found, none_found, failed",
            self.provider_lookups.clone(),
        );
        reg.register(
            "fold_route_peer_latency_seconds",
            "Peak-EWMA latency estimate per provider, as of its last routed request, in seconds",
            self.route_peer_latency.clone(),
        );
        reg.register(
            "fold_route_peer_in_flight",
            "Routed requests in flight per provider",
            self.route_peer_in_flight.clone(),
        );
    }

    /// Storage, forwards, breakers and the sidecar link.
    fn register_link(&self, reg: &mut Registry) {
        reg.register(
            "fold_storage_operations",
            "Storage operations by kind and outcome",
            self.storage_ops.clone(),
        );
        reg.register(
            "fold_storage_operation_seconds",
            "Storage operation latency in seconds",
            self.storage_seconds.clone(),
        );
        reg.register(
            "fold_forwards",
            "Requests forwarded to other nodes, by kind and gRPC outcome",
            self.forwards.clone(),
        );
        reg.register(
            "fold_forward_seconds",
            "Latency of requests forwarded to other nodes, in seconds",
            self.forward_seconds.clone(),
        );
        reg.register(
            "fold_circuit_breaker_state",
            "Circuit breaker state per target (0 closed, 1 open, 2 half-open)",
            self.breaker_state.clone(),
        );
        reg.register(
            "fold_circuit_breaker_transitions",
            "Circuit breaker state changes per target",
            self.breaker_transitions.clone(),
        );
        reg.register(
            "fold_sidecar_link_up",
            "1 while the p2p-sidecar link is up",
            self.sidecar_link_up.clone(),
        );
    }

    /// The group-commit writer.
    fn register_commits(&self, reg: &mut Registry) {
        reg.register(
            "fold_commit_group_requests",
            "Write requests (Mutate or BatchMutate calls) per group commit",
            self.commit_group_requests.clone(),
        );
        reg.register(
            "fold_commit_group_records",
            "Mutations (records) per group commit",
            self.commit_group_records.clone(),
        );
        reg.register(
            "fold_commit_seconds",
            "Latency of one group commit (applying the group and the durable commit), in seconds",
            self.commit_seconds.clone(),
        );
        reg.register(
            "fold_commit_failures",
            "Group commits that failed in storage (every request of the group got INTERNAL)",
            self.commit_failures.clone(),
        );
        reg.register(
            "fold_write_queue_depth",
            "Write requests waiting for the group-commit writer",
            self.write_queue_depth.clone(),
        );
    }

    /// Subscriptions and replicas.
    fn register_streams(&self, reg: &mut Registry) {
        reg.register(
            "fold_subscribers",
            "Open FoldNode.Subscribe streams",
            self.subscribers.clone(),
        );
        reg.register(
            "fold_subscription_changes_sent",
            "Changes sent to subscribers",
            self.subscription_changes.clone(),
        );
        reg.register(
            "fold_subscription_ends",
            "Subscriptions ended by the node, by reason (overflow: the subscriber fell behind its buffer; full: --max-subscriptions reached; out_of_range: history no longer kept)",
            self.subscription_ends.clone(),
        );
        reg.register(
            "fold_replica_applied_sequence",
            "Per followed schema (--follow): the last change applied to the replica",
            self.replica_applied.clone(),
        );
        reg.register(
            "fold_replica_lag",
            "Per followed schema (--follow): changes the source had at its last answer that the replica has not applied",
            self.replica_lag.clone(),
        );
        reg.register(
            "fold_replica_refused",
            "Per followed schema (--follow): answers of the source refused (reason: diverged = its history is not this replica's; refused_change = a change that would touch what the schema does not own)",
            self.replica_refused.clone(),
        );
    }

    /// A replica's progress.
    pub fn replica(&self, schema: &str, applied: u64, lag: u64) {
        let l = SchemaLabels {
            schema: schema.to_string(),
        };
        self.replica_applied
            .get_or_create(&l)
            .set(i64::try_from(applied).unwrap_or(i64::MAX));
        self.replica_lag
            .get_or_create(&l)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    /// An answer of a replica's source refused.
    pub fn replica_refused(&self, schema: &str, reason: &'static str) {
        self.replica_refused
            .get_or_create(&ReplicaRefusalLabels {
                schema: schema.to_string(),
                reason,
            })
            .inc();
    }

    /// A subscription stream opened (`+1`) or closed (`-1`).
    pub fn subscribers(&self, delta: i64) {
        self.subscribers.inc_by(delta);
    }

    /// `n` changes sent to a subscriber.
    pub fn subscription_sent(&self, n: u64) {
        self.subscription_changes.inc_by(n);
    }

    /// A subscription refused or cut by the node.
    pub fn subscription_end(&self, reason: &'static str) {
        self.subscription_ends
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// One group commit: its size and how long applying and committing took.
    pub fn commit_group(&self, requests: usize, records: usize, ok: bool, started: Instant) {
        self.commit_group_requests.observe(requests as f64);
        self.commit_group_records.observe(records as f64);
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
        if !ok {
            self.commit_failures.inc();
        }
    }

    /// Write requests entered (`+n`) or left (`-n`) the group-commit queue.
    pub fn write_queue(&self, delta: i64) {
        self.write_queue_depth.inc_by(delta);
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

    pub fn route_request(&self, route: &'static str, outcome: &'static str) {
        self.route_requests
            .get_or_create(&RouteLabels { route, outcome })
            .inc();
    }

    pub fn route_attempt(&self, op: &'static str) {
        self.route_attempts.get_or_create(&OpLabels { op }).inc();
    }

    pub fn route_retry(&self, outcome: &'static str) {
        self.route_retries
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn provider_lookup(&self, outcome: &'static str) {
        self.provider_lookups
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A provider's routing estimate: its decayed latency and requests in flight.
    pub fn route_peer(&self, node: &str, latency: std::time::Duration, in_flight: u32) {
        let labels = TargetLabels {
            target: if node.is_empty() {
                "self".to_string()
            } else {
                self.peers.get(node)
            },
        };
        self.route_peer_latency
            .get_or_create(&labels)
            .set(latency.as_secs_f64());
        self.route_peer_in_flight
            .get_or_create(&labels)
            .set(i64::from(in_flight));
    }

    pub fn peer_request(&self, op: &'static str, outcome: &'static str, started: Instant) {
        self.peer_requests
            .get_or_create(&OpOutcomeLabels { op, outcome })
            .inc();
        self.peer_request_seconds
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn injected_fault(&self) {
        self.injected_faults.inc();
    }

    pub fn sidecar_link(&self, up: bool) {
        self.sidecar_link_up.set(i64::from(up));
    }
}
