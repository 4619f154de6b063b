//! The swarm's behaviour: every libp2p protocol the sidecar speaks, and the sidecar's own policy
//! behaviours: reachability ([`crate::reach_keeper`]), the connect behaviour
//! ([`crate::connector`]) and the peer book ([`crate::book_keeper`]).

use std::time::Duration;

use fold_proto::wire::{CheckSchemasRequest, CheckSchemasResponse};
use libp2p::kad::store::MemoryStore;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, allow_block_list, autonat, connection_limits, dcutr, identify,
    identity, kad, mdns, memory_connection_limits, ping, relay, request_response,
};

use crate::book_keeper::BookKeeper;
use crate::codec::{ProstCodec, SCHEMA_PROTOCOL};
use crate::command::Outbound;
use crate::config::Config;
use crate::connector::Connector;
use crate::reach::Relays;
use crate::reach_keeper::ReachKeeper;

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
    /// Circuit relay v2, client side: reservations on relays and dials through them (always on
    /// in the product; off only in swarms built without the relay transport, e.g. memory tests).
    pub relay_client: Toggle<relay::client::Behaviour>,
    /// Circuit relay v2, relay side (--relay-server), with its limits.
    pub relay_server: Toggle<relay::Behaviour>,
    /// Direct connection upgrade through relay: hole punching on relayed connections.
    pub dcutr: dcutr::Behaviour,
    /// AutoNAT v2, client side: asks peers to dial back the addresses it was observed at.
    pub autonat: autonat::v2::client::Behaviour,
    /// AutoNAT v2, server side: dials back peers that ask (on the address they were observed at).
    pub autonat_server: autonat::v2::server::Behaviour,
    /// AutoNAT's verdict, relay reservations, relay service counts, dial-back cleanup
    /// (crate::reach_keeper).
    pub reach: ReachKeeper,
    /// Requests held until their peer connects: known address → DHT → relay (crate::connector).
    pub connect: Connector<Outbound>,
    /// The peer book, bootstrap and redials (crate::book_keeper). Last: its
    /// `handle_pending_outbound_connection` sees only dials the behaviours above let through.
    pub book: BookKeeper,
}

impl Behaviour {
    /// `relay_client` comes from the swarm builder (it is paired with the relay transport).
    pub fn new(
        key: &identity::Keypair,
        config: &Config,
        relay_client: Option<relay::client::Behaviour>,
    ) -> anyhow::Result<Behaviour> {
        let peer_id = key.public().to_peer_id();
        let (deny, allow) = access_lists(config);
        Ok(Behaviour {
            deny,
            allow: allow.into(),
            limits: connection_limits(config),
            memory: memory_limits(config)?.into(),
            identify: identify(key),
            ping: ping(config),
            mdns: mdns(config, peer_id)?.into(),
            kad: kad(peer_id),
            schema: schema(config),
            stream: libp2p_stream::Behaviour::new(),
            relay_client: relay_client.into(),
            relay_server: relay_server(peer_id, config)?.into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: autonat::v2::server::Behaviour::default(),
            reach: ReachKeeper::new(Relays::new(config)?, config.relay_limits.max_reservations),
            connect: Connector::default(),
            book: BookKeeper::new(peer_id, config.bootstrap.clone()),
        })
    }
}

/// The connection limits (--max-connections, per peer, pending).
fn connection_limits(config: &Config) -> connection_limits::Behaviour {
    connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_incoming(Some(config.max_pending_incoming))
            .with_max_pending_outgoing(Some(config.max_pending_outgoing)),
    )
}

/// New connections refused above a memory use (--max-memory-bytes or --max-memory-percent).
fn memory_limits(config: &Config) -> anyhow::Result<Option<memory_connection_limits::Behaviour>> {
    if config.max_memory_bytes > 0 {
        let bytes = usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX);
        Ok(Some(memory_connection_limits::Behaviour::with_max_bytes(
            bytes,
        )))
    } else if config.max_memory_percent > 0.0 {
        if !config.max_memory_percent.is_finite() || config.max_memory_percent > 100.0 {
            anyhow::bail!(
                "--max-memory-percent must be a number above 0 and at most 100, not {}",
                config.max_memory_percent
            );
        }
        Ok(Some(
            memory_connection_limits::Behaviour::with_max_percentage(
                config.max_memory_percent / 100.0,
            ),
        ))
    } else if config.max_memory_percent < 0.0 || config.max_memory_percent.is_nan() {
        anyhow::bail!(
            "--max-memory-percent must be a number above 0 and at most 100, not {}",
            config.max_memory_percent
        );
    } else {
        Ok(None)
    }
}

fn identify(key: &identity::Keypair) -> identify::Behaviour {
    identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
            .with_agent_version(format!("p2p-sidecar/{}", env!("CARGO_PKG_VERSION")))
            // New listen addresses (a relay reservation's relayed address above all) reach
            // connected peers, and through them the DHT, at once.
            .with_push_listen_addr_updates(true)
            // No address cache of its own: what a peer reports reaches dials only through
            // the peer book and the DHT, which drop other hosts' loopback and link-local
            // addresses (crate::peer_book::learnable).
            .with_cache_size(0),
    )
}

/// A ping unanswered for one interval has failed; the event loop closes a connection after
/// --ping-max-failures of them (libp2p's ping no longer closes connections itself).
fn ping(config: &Config) -> ping::Behaviour {
    let ping_every = Duration::from_secs(config.ping_interval_secs.max(1));
    ping::Behaviour::new(
        ping::Config::new()
            .with_interval(ping_every)
            .with_timeout(ping_every),
    )
}

fn mdns(config: &Config, peer_id: PeerId) -> anyhow::Result<Option<mdns::tokio::Behaviour>> {
    if !config.mdns_enabled() {
        return Ok(None);
    }
    let cfg = mdns::Config {
        query_interval: Duration::from_secs(config.mdns_query_interval_secs.max(1)),
        ..Default::default()
    };
    Ok(Some(mdns::tokio::Behaviour::new(cfg, peer_id)?))
}

fn kad(peer_id: PeerId) -> kad::Behaviour<MemoryStore> {
    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg.set_query_timeout(Duration::from_secs(10));
    // The event loop bootstraps after the first connection and every five minutes; libp2p's
    // own timer would only warn "no known peers" on a node that is alone.
    kad_cfg.set_periodic_bootstrap_interval(None);
    // Provider records are re-announced by the event loop whenever the routing table
    // changes; keep libp2p's own republication too, for long-lived meshes.
    kad_cfg.set_provider_publication_interval(Some(Duration::from_secs(600)));
    // Provider records (schema → nodes) are what the mesh uses; plain records are not, so
    // what other peers may PUT here is kept small: at most 1024 records of under 1 KiB
    // (libp2p's default would allow 65 KiB each, 64 MiB in all). Provider records keep
    // libp2p's bounds: 1024 keys × 20 providers (docs/DEPLOY.md#memory).
    let store = MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_records: 1024,
            max_value_bytes: 1024,
            ..kad::store::MemoryStoreConfig::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

fn schema(config: &Config) -> request_response::Behaviour<SchemaCodec> {
    request_response::Behaviour::with_codec(
        SchemaCodec::new(config.max_schema_bytes),
        [(SCHEMA_PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_millis(config.request_timeout_ms))
            .with_max_concurrent_streams(config.max_concurrent_streams),
    )
}

/// --deny-peers, and --allow-peers when any are given.
fn access_lists(
    config: &Config,
) -> (
    allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    Option<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
) {
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
    (deny, allow)
}

/// The relay service (--relay-server) with the configured limits; None when it is off.
fn relay_server(
    peer_id: libp2p::PeerId,
    config: &Config,
) -> anyhow::Result<Option<relay::Behaviour>> {
    if !config.relay_server {
        return Ok(None);
    }
    let r = &config.relay_limits;
    for (flag, v) in [
        ("--relay-max-reservations", r.max_reservations as u64),
        (
            "--relay-max-reservations-per-peer",
            r.max_reservations_per_peer as u64,
        ),
        ("--relay-max-circuits", r.max_circuits as u64),
        (
            "--relay-max-circuits-per-peer",
            r.max_circuits_per_peer as u64,
        ),
        (
            "--relay-max-circuit-duration-secs",
            r.max_circuit_duration_secs,
        ),
        ("--relay-max-circuit-bytes", r.max_circuit_bytes),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be above 0 (or leave --relay-server off)");
        }
    }
    let cfg = relay::Config {
        max_reservations: r.max_reservations,
        max_reservations_per_peer: r.max_reservations_per_peer,
        max_circuits: r.max_circuits,
        max_circuits_per_peer: r.max_circuits_per_peer,
        max_circuit_duration: Duration::from_secs(r.max_circuit_duration_secs),
        max_circuit_bytes: r.max_circuit_bytes,
        ..relay::Config::default()
    };
    Ok(Some(relay::Behaviour::new(peer_id, cfg)))
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
        let b = Behaviour::new(&key, &config(&[]), None).unwrap();
        assert!(!b.memory.is_enabled(), "off by default");
        let b = Behaviour::new(&key, &config(&["--max-memory-bytes", "1000000000"]), None).unwrap();
        assert_eq!(
            b.memory.as_ref().map(|m| m.max_allowed_bytes()),
            Some(1_000_000_000)
        );
        let b = Behaviour::new(&key, &config(&["--max-memory-percent", "50"]), None).unwrap();
        assert!(b.memory.as_ref().is_some_and(|m| m.max_allowed_bytes() > 0));
        for bad in ["--max-memory-percent=150", "--max-memory-percent=-1"] {
            let e = Behaviour::new(&key, &config(&[bad]), None).err().unwrap();
            assert!(e.to_string().contains("--max-memory-percent"), "{e}");
        }
    }

    #[tokio::test]
    async fn the_relay_server_is_opt_in_with_limits() {
        let key = identity::Keypair::generate_ed25519();
        let b = Behaviour::new(&key, &config(&[]), None).unwrap();
        assert!(!b.relay_server.is_enabled(), "off by default");
        let b = Behaviour::new(&key, &config(&["--relay-server"]), None).unwrap();
        assert!(b.relay_server.is_enabled());
        for bad in [
            "--relay-max-circuits=0",
            "--relay-max-circuit-bytes=0",
            "--relay-max-circuit-duration-secs=0",
            "--relay-max-reservations=0",
        ] {
            let e = Behaviour::new(&key, &config(&["--relay-server", bad]), None)
                .err()
                .unwrap();
            let flag = bad.split('=').next().unwrap();
            assert!(e.to_string().contains(flag), "{e}");
        }
    }
}
