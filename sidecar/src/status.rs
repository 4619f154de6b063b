//! What the event loop hands out for `Mesh.Status`: a plain [`NetworkSnapshot`] of the swarm's
//! state, turned into the gRPC reply ([`NetworkSnapshot::into_response`]) by the gRPC layer,
//! off the swarm task.

use fold_proto::v1::{
    BootstrapStatus, NetworkStatusResponse, Reachability, RelayReservation, RelayServerStatus,
};
use libp2p::{Multiaddr, PeerId};

/// The swarm's state at one moment, as the event loop sees it (no formatting, no protos built
/// on the swarm task beyond what other modules already keep).
#[derive(Debug, Clone)]
pub struct NetworkSnapshot {
    pub node_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    pub connected_peers: usize,
    pub known_peers: usize,
    pub mdns_enabled: bool,
    /// The schemas this node announces in the DHT (sorted).
    pub provided_schemas: Vec<String>,
    /// The outcome of each bootstrap address's last dial (in configuration order).
    pub bootstrap: Vec<BootstrapStatus>,
    pub reachability: Reachability,
    pub reachable_addrs: Vec<String>,
    pub relays: Vec<RelayReservation>,
    /// This node's relay service: its limits (its counters are the two fields below).
    pub relay_server: RelayServerStatus,
    /// Reservations this node's relay service holds for other nodes.
    pub relay_reservations: u32,
    /// Circuits this node's relay service carries.
    pub relay_circuits: u32,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl NetworkSnapshot {
    /// The `Mesh.Status` reply. The replicas are filled in by the fold-node, the admin
    /// addresses by the Mesh API and the fold-node.
    pub fn into_response(self) -> NetworkStatusResponse {
        let mut listen: Vec<String> = self.listen_addrs.iter().map(|a| a.to_string()).collect();
        listen.sort();
        let enabled = self.relay_server.enabled;
        NetworkStatusResponse {
            node_id: self.node_id.to_string(),
            listen_addrs: listen,
            external_addrs: self.external_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: count(self.connected_peers),
            known_peers: count(self.known_peers),
            mdns_enabled: self.mdns_enabled,
            provided_schemas: self.provided_schemas,
            bootstrap: self.bootstrap,
            replicas: Vec::new(),
            reachability: self.reachability as i32,
            reachable_addrs: self.reachable_addrs,
            relays: self.relays,
            relay_server: Some(RelayServerStatus {
                reservations: if enabled { self.relay_reservations } else { 0 },
                circuits: if enabled { self.relay_circuits } else { 0 },
                ..self.relay_server
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(enabled: bool) -> NetworkSnapshot {
        NetworkSnapshot {
            node_id: PeerId::random(),
            listen_addrs: vec![
                "/ip4/127.0.0.1/tcp/9".parse().expect("addr"),
                "/ip4/127.0.0.1/tcp/1".parse().expect("addr"),
            ],
            external_addrs: Vec::new(),
            connected_peers: 2,
            known_peers: 3,
            mdns_enabled: false,
            provided_schemas: vec!["a".into()],
            bootstrap: Vec::new(),
            reachability: Reachability::Unknown,
            reachable_addrs: Vec::new(),
            relays: Vec::new(),
            relay_server: RelayServerStatus {
                enabled,
                max_reservations: 7,
                ..Default::default()
            },
            relay_reservations: 4,
            relay_circuits: 5,
        }
    }

    #[test]
    fn listen_addresses_are_sorted_and_counts_carried() {
        let r = snapshot(true).into_response();
        assert_eq!(
            r.listen_addrs,
            vec!["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/9"]
        );
        assert_eq!((r.connected_peers, r.known_peers), (2, 3));
        let rs = r.relay_server.expect("relay server");
        assert_eq!(
            (rs.reservations, rs.circuits, rs.max_reservations),
            (4, 5, 7)
        );
    }

    #[test]
    fn a_disabled_relay_service_reports_no_counters() {
        let rs = snapshot(false)
            .into_response()
            .relay_server
            .expect("relay server");
        assert_eq!((rs.reservations, rs.circuits), (0, 0));
    }
}
