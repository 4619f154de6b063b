//! The sidecar's own metrics, beside libp2p's swarm metrics and the gRPC RED metrics: inbound
//! requests from peers by protocol and outcome (accepted, rate limited, queue full, forged
//! origin, bad signature, stale, replayed, oversized field, deadline exceeded, replay cache full,
//! wrong target, failed), forwards the node asked for (by outcome, with their latency: the
//! per-request view of the node ⇄ sidecar forward stream), the replay cache's size, the sizes of
//! signature verification batches, and connections closed because their peer stopped answering
//! pings. Every
//! label has a fixed value set.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub protocol: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct SidecarMetrics {
    inbound: Family<InboundLabels, Counter>,
    outbound: Family<OutcomeLabels, Counter>,
    outbound_seconds: prometheus_client::metrics::histogram::Histogram,
    forward_streams: Family<DirectionLabels, Counter>,
    replay_cache_bytes: Gauge,
    signature_batches: prometheus_client::metrics::histogram::Histogram,
    dead_connections: Counter,
    connected_peers: Gauge,
}

impl SidecarMetrics {
    pub fn register(reg: &mut Registry) -> Arc<SidecarMetrics> {
        let m = SidecarMetrics {
            inbound: Family::default(),
            outbound: Family::default(),
            outbound_seconds: fold_middleware::metrics::latency_histogram(),
            replay_cache_bytes: Gauge::default(),
            signature_batches: prometheus_client::metrics::histogram::Histogram::new([
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0,
            ]),
            forward_streams: Family::default(),
            dead_connections: Counter::default(),
            connected_peers: Gauge::default(),
        };
        reg.register(
            "fold_sidecar_connected_peers",
            "Peers with at least one open connection (what Network.Status counts as connected)",
            m.connected_peers.clone(),
        );
        reg.register(
            "fold_sidecar_dead_connections_closed",
            "Connections closed because the peer stopped answering pings (--ping-max-failures)",
            m.dead_connections.clone(),
        );
        reg.register(
            "fold_sidecar_forward_streams_opened",
            "Long-lived /fold/forward/2.0.0 streams opened, by direction (outbound: to a peer; inbound: from one)",
            m.forward_streams.clone(),
        );
        reg.register(
            "fold_sidecar_outbound_forwards",
            "Forwards the node asked for (Mesh.Forward or one request on Mesh.ForwardStream), by gRPC outcome of the mesh hop (a remote node's own refusal is OK here)",
            m.outbound.clone(),
        );
        reg.register(
            "fold_sidecar_outbound_forward_seconds",
            "Time from the node's forward request to the remote node's answer, in seconds",
            m.outbound_seconds.clone(),
        );
        reg.register(
            "fold_sidecar_replay_cache_bytes",
            "Bytes held by the replay cache (request ids remembered within the clock-skew window)",
            m.replay_cache_bytes.clone(),
        );
        reg.register(
            "fold_sidecar_signature_batch_size",
            "Signatures of inbound requests verified together in one round (1: alone); _count is the rounds, _sum the signatures",
            m.signature_batches.clone(),
        );
        reg.register(
            "fold_sidecar_inbound_requests",
            "Requests from peers on the fold protocols, by protocol and outcome",
            m.inbound.clone(),
        );
        Arc::new(m)
    }

    pub fn forward_stream(&self, direction: &'static str) {
        self.forward_streams
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// One forward asked by the node: its mesh outcome (a gRPC code name) and how long it took.
    pub fn outbound(&self, outcome: &'static str, seconds: f64) {
        self.outbound
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.outbound_seconds.observe(seconds);
    }

    pub fn connected_peers(&self, n: usize) {
        self.connected_peers
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A connection closed because its peer stopped answering pings.
    pub fn dead_connection(&self) {
        self.dead_connections.inc();
    }

    pub fn replay_cache_bytes(&self, bytes: usize) {
        self.replay_cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// One verification round of `n` signatures.
    pub fn signature_batch(&self, n: usize) {
        self.signature_batches.observe(n as f64);
    }

    pub fn inbound(&self, protocol: &'static str, outcome: &'static str) {
        self.inbound
            .get_or_create(&InboundLabels { protocol, outcome })
            .inc();
    }
}
