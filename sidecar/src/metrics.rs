//! The sidecar's own metrics, beside libp2p's swarm metrics and the gRPC RED metrics: inbound
//! requests from peers by protocol and outcome (accepted, rate limited, queue full, forged
//! origin, wrong target, failed). Both labels have fixed value sets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub protocol: &'static str,
    pub outcome: &'static str,
}

pub struct SidecarMetrics {
    inbound: Family<InboundLabels, Counter>,
}

impl SidecarMetrics {
    pub fn register(reg: &mut Registry) -> Arc<SidecarMetrics> {
        let m = SidecarMetrics {
            inbound: Family::default(),
        };
        reg.register(
            "fold_sidecar_inbound_requests",
            "Requests from peers on the fold protocols, by protocol and outcome",
            m.inbound.clone(),
        );
        Arc::new(m)
    }

    pub fn inbound(&self, protocol: &'static str, outcome: &'static str) {
        self.inbound
            .get_or_create(&InboundLabels { protocol, outcome })
            .inc();
    }
}
