//! The swarm's behaviour: every libp2p protocol the sidecar speaks.

use std::time::Duration;

use fold_proto::wire::{CheckSchemasRequest, CheckSchemasResponse};
use libp2p::kad::store::MemoryStore;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, connection_limits, identify, identity, kad, mdns,
    memory_connection_limits, ping, request_response,
};

use crate::codec::{ProstCodec, SCHEMA_PROTOCOL};
use crate::config::Config;

pub const IDENTIFY_PROTOCOL: &str = "/fold/id/1.0.0";
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fold/kad/1.0.0");

pub type SchemaCodec = ProstCodec<CheckSchemasRequest, CheckSchemasResponse>;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Denied peers cannot hold a connection.
    pub deny: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// With an allowlist, nobody else can.
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub limits: connection_limits::Behaviour,
    /// New connections refused while the process uses too much memory (when configured).
    pub memory: Toggle<memory_connection_limits::Behaviour>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub kad: kad::Behaviour<MemoryStore>,
    pub schema: request_response::Behaviour<SchemaCodec>,
    /// Long-lived streams: `/fold/forward/2.0.0` (crate::forward).
    pub stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    pub fn new(key: &identity::Keypair, config: &Config) -> anyhow::Result<Behaviour> {
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(config.max_connections))
                .with_max_established_per_peer(Some(config.max_connections_per_peer))
                .with_max_pending_incoming(Some(config.max_pending_incoming))
                .with_max_pending_outgoing(Some(config.max_pending_outgoing)),
        );
        let memory = if config.max_memory_bytes > 0 {
            let bytes = usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX);
            Some(memory_connection_limits::Behaviour::with_max_bytes(bytes))
        } else if config.max_memory_percent > 0.0 {
            if !config.max_memory_percent.is_finite() || config.max_memory_percent > 100.0 {
                anyhow::bail!(
                    "--max-memory-percent must be a number above 0 and at most 100, not {}",
                    config.max_memory_percent
                );
            }
            Some(memory_connection_limits::Behaviour::with_max_percentage(
                config.max_memory_percent / 100.0,
            ))
        } else if config.max_memory_percent < 0.0 || config.max_memory_percent.is_nan() {
            anyhow::bail!(
                "--max-memory-percent must be a number above 0 and at most 100, not {}",
                config.max_memory_percent
            );
        } else {
            None
        };
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("p2p-sidecar/{}", env!("CARGO_PKG_VERSION"))),
        );
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15)));
        let mdns = if config.mdns_enabled() {
            let cfg = mdns::Config {
                query_interval: Duration::from_secs(config.mdns_query_interval_secs.max(1)),
                ..Default::default()
            };
            Some(mdns::tokio::Behaviour::new(cfg, peer_id)?)
        } else {
            None
        };
        let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
        kad_cfg.set_query_timeout(Duration::from_secs(10));
        // The event loop bootstraps after the first connection and every five minutes; libp2p's
        // own timer would only warn "no known peers" on a node that is alone.
        kad_cfg.set_periodic_bootstrap_interval(None);
        // Provider records are re-announced by the event loop whenever the routing table
        // changes; keep libp2p's own republication too, for long-lived meshes.
        kad_cfg.set_provider_publication_interval(Some(Duration::from_secs(600)));
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_cfg);
        kad.set_mode(Some(kad::Mode::Server));
        let rr = |timeout_ms: u64| {
            request_response::Config::default()
                .with_request_timeout(Duration::from_millis(timeout_ms))
                .with_max_concurrent_streams(config.max_concurrent_streams)
        };
        let schema = request_response::Behaviour::with_codec(
            SchemaCodec::new(config.max_schema_bytes),
            [(SCHEMA_PROTOCOL, request_response::ProtocolSupport::Full)],
            rr(config.request_timeout_ms),
        );
        let mut deny = allow_block_list::Behaviour::<allow_block_list::BlockedPeers>::default();
        for p in &config.deny_peers {
            deny.block_peer(*p);
        }
        let allow = if config.allow_peers.is_empty() {
            None
        } else {
            let mut a = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for p in &config.allow_peers {
                a.allow_peer(*p);
            }
            Some(a)
        };
        Ok(Behaviour {
            deny,
            allow: allow.into(),
            limits,
            memory: memory.into(),
            identify,
            ping,
            mdns: mdns.into(),
            kad,
            schema,
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        let mut v = vec!["p2p-sidecar", "--mdns", "off"];
        v.extend_from_slice(args);
        crate::config::Cli::parse_from(v).config
    }

    #[tokio::test]
    async fn memory_limits_come_from_configuration() {
        let key = identity::Keypair::generate_ed25519();
        let b = Behaviour::new(&key, &config(&[])).unwrap();
        assert!(!b.memory.is_enabled(), "off by default");
        let b = Behaviour::new(&key, &config(&["--max-memory-bytes", "1000000000"])).unwrap();
        assert_eq!(
            b.memory.as_ref().map(|m| m.max_allowed_bytes()),
            Some(1_000_000_000)
        );
        let b = Behaviour::new(&key, &config(&["--max-memory-percent", "50"])).unwrap();
        assert!(b.memory.as_ref().is_some_and(|m| m.max_allowed_bytes() > 0));
        for bad in ["--max-memory-percent=150", "--max-memory-percent=-1"] {
            let e = Behaviour::new(&key, &config(&[bad])).err().unwrap();
            assert!(e.to_string().contains("--max-memory-percent"), "{e}");
        }
    }
}
