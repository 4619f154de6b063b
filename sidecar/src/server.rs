//! Process wiring: identity, swarm, event loop, the Mesh gRPC server, the admin port, the
//! readiness line, and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fold_middleware::errors::GrpcErrorsLayer;
use fold_middleware::metrics::{GrpcMetrics, GrpcMetricsLayer, Side};
use fold_proto::sidecar::mesh_server::MeshServer;
use fold_telemetry::admin::AdminState;
use libp2p::{Multiaddr, noise, tcp, yamux};
use local_link::LinkListener;
use local_link::token::LinkToken;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, mpsc};
use tonic::transport::Server;

use crate::behaviour::Behaviour;
use crate::client::Client;
use crate::config::Config;
use crate::event_loop::{EventLoop, EventLoopParts};
use crate::mesh_api::MeshApi;
use crate::metrics::SidecarMetrics;
use crate::node_link::NodeLink;

/// A running sidecar (for in-process use and tests).
pub struct Running {
    pub client: Client,
    pub mesh_addr: local_link::LinkAddr,
    pub admin_addr: std::net::SocketAddr,
    pub listen: Vec<Multiaddr>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop serving and wait (bounded) for the servers to finish.
    pub async fn shutdown(self) {
        // Keep what the peer book learned since its last write.
        match tokio::time::timeout(Duration::from_secs(2), self.client.save_peers()).await {
            Ok(Ok(true)) => {}
            _ => tracing::warn!("the peer book was not written at shutdown"),
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// Read a pre-shared network key in the IPFS swarm.key format.
/// Swarm settings shared by both transports. Substream protocols are negotiated lazily
/// (multistream-select "V1Lazy"): the dialer sends its single protocol proposal together with the
/// first request bytes instead of waiting a round trip for the listener's confirmation. Each
/// forwarded request opens a new Yamux substream, so this saves one network round trip per
/// request; a listener that does not speak the protocol still refuses it (the request fails with
/// an unsupported-protocol error instead of before it is sent).
fn swarm_config(c: libp2p::swarm::Config, idle: Duration) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(idle)
        .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
}

fn read_psk(path: &std::path::Path) -> anyhow::Result<libp2p::pnet::PreSharedKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the private network key {}", path.display()))?;
    text.trim().parse::<libp2p::pnet::PreSharedKey>().map_err(|e| {
        anyhow::anyhow!(
            "{} is not a swarm key (expected \"/key/swarm/psk/1.0.0/\", \"/base16/\", 64 hex digits): {e}",
            path.display()
        )
    })
}

/// Everything behind the swarm, on any transport: the event loop that owns the swarm, the
/// forward streams and their inbound gate, and the [`Client`] handle. `node` answers inbound
/// requests (the real node link, or a test's stand-in).
pub fn assemble(
    mut swarm: libp2p::Swarm<Behaviour>,
    config: &Config,
    node: Arc<dyn crate::node_link::NodeHandler>,
    libp2p_metrics: libp2p::metrics::Metrics,
    metrics: Arc<SidecarMetrics>,
) -> anyhow::Result<(Client, Vec<tokio::task::JoinHandle<()>>)> {
    let local_peer_id = *swarm.local_peer_id();
    // Forwarded requests: long-lived streams, handled off the swarm task.
    let mut stream_control = swarm.behaviour_mut().stream.new_control();
    let incoming_forwards = stream_control
        .accept(crate::codec::FORWARD_PROTOCOL)
        .map_err(|_| anyhow::anyhow!("the forward protocol is registered twice"))?;
    let forward_streams =
        crate::forward::Outbound::new(stream_control, config.max_forward_bytes, metrics.clone());
    let gate = Arc::new(crate::gate::InboundGate::new(
        local_peer_id,
        fold_middleware::rate_limit::KeyedLimiter::new(
            config.peer_rate_limit,
            config.peer_rate_burst,
        ),
        crate::signing::Verifier::new(
            Duration::from_secs(config.max_clock_skew_secs),
            config.replay_cache_bytes,
        ),
        crate::gate::Budget {
            slots: config.inbound_queue,
            peer_share_percent: config.inbound_peer_share,
            long_polls: config.inbound_long_polls,
            long_polls_per_peer: config.inbound_long_polls_per_peer,
        },
        metrics.clone(),
    ));
    let (tx, rx) = mpsc::channel(1024);
    let (events, _) = broadcast::channel(256);
    let client = Client::new(tx.clone(), local_peer_id, events.clone())
        .with_streams(forward_streams.clone());
    let event_loop = EventLoop::new(EventLoopParts {
        swarm,
        commands: rx,
        self_tx: tx,
        events,
        node: node.clone(),
        mdns_enabled: config.mdns_enabled(),
        gate: gate.clone(),
        libp2p_metrics,
        metrics: metrics.clone(),
        forward: forward_streams,
        peers_path: Some(config.peers_path()),
        relay_server: crate::reach::RelayServer::default().status(config),
        ping: crate::conns::PingPolicy::from_config(config),
    });
    let tasks = vec![
        tokio::spawn(event_loop.run()),
        tokio::spawn(crate::forward::serve(
            incoming_forwards,
            gate,
            node,
            config.max_forward_bytes,
            metrics,
        )),
    ];
    Ok((client, tasks))
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let key =
        crate::identity::load_or_create(&config.identity_path(), config.identity_key.is_none())?;
    let signing_key = Arc::new(key.clone());
    fold_telemetry::otel::set_instance_id(&key.public().to_peer_id().to_string());

    let mesh_addr = config.mesh_listen.clone().relative_to(&config.data_dir);
    let node_addr = config.node_addr.clone().relative_to(&config.data_dir);
    let token = link_token(&config, &mesh_addr, &node_addr)?;
    let m = ProcessMetrics::register();
    let swarm = build_swarm(&config, key)?;

    let timeout = Duration::from_millis(config.request_timeout_ms);
    let node = NodeLink::new(
        node_addr,
        token.clone(),
        timeout,
        config.max_forward_bytes,
        m.client,
    );
    let node = if config.link_forward == "unary" {
        node.unary()
    } else {
        node
    };
    let (client, mut tasks) =
        assemble(swarm, &config, Arc::new(node), m.libp2p, m.sidecar.clone())?;

    // The admin address, known once bound below; Status reports it to the node.
    let admin_addr_cell: Arc<std::sync::OnceLock<String>> = Arc::default();
    let mesh = MeshApi::new(client.clone(), timeout, signing_key)
        .with_admin_addr(admin_addr_cell.clone())
        .with_max_stream_forwards(config.max_stream_forwards)
        .with_max_message_bytes(config.max_forward_bytes)
        .with_metrics(m.sidecar);
    let (mesh_addr, stop, server) = serve_mesh(mesh, &config, token, &mesh_addr, m.server).await?;
    tasks.push(server);
    let (admin_addr, admin) = serve_admin(&config, m.registry, client.clone()).await?;
    let _ = admin_addr_cell.set(admin_addr.to_string());
    tasks.push(admin);

    let listen = wait_listening(&client, &config).await?;
    Ok(Running {
        client,
        mesh_addr,
        admin_addr,
        listen,
        stop,
        tasks,
    })
}

/// The link token (--link-token-file); required when either side of the local link is TCP.
fn link_token(
    config: &Config,
    mesh_addr: &local_link::LinkAddr,
    node_addr: &local_link::LinkAddr,
) -> anyhow::Result<Option<LinkToken>> {
    let token = match &config.link_token_file {
        Some(p) => Some(LinkToken::load(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if token.is_none() && (mesh_addr.is_tcp() || node_addr.is_tcp()) {
        anyhow::bail!(
            "the local link to the node uses TCP ({mesh_addr} / {node_addr}), which any local user can reach: give both processes the same --link-token-file"
        );
    }
    Ok(token)
}

/// The process's metrics: one registry (served on the admin port) and what records into it.
struct ProcessMetrics {
    registry: Arc<Mutex<Registry>>,
    libp2p: libp2p::metrics::Metrics,
    server: Arc<GrpcMetrics>,
    client: Arc<GrpcMetrics>,
    sidecar: Arc<SidecarMetrics>,
}

impl ProcessMetrics {
    fn register() -> ProcessMetrics {
        let mut registry = Registry::default();
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let sets: [&[u8]; 2] = [
            fold_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let server = GrpcMetrics::register(&mut registry, Side::Server, &sets);
        let client = GrpcMetrics::register(&mut registry, Side::Client, &sets);
        let sidecar = SidecarMetrics::register(&mut registry);
        ProcessMetrics {
            registry: Arc::new(Mutex::new(registry)),
            libp2p,
            server,
            client,
            sidecar,
        }
    }
}

/// The swarm on TCP + QUIC, or on TCP inside a private network (--private-network-key),
/// listening on --listen with the --external-address ones added.
fn build_swarm(
    config: &Config,
    key: libp2p::identity::Keypair,
) -> anyhow::Result<libp2p::Swarm<Behaviour>> {
    if config.connection_timeout_secs == 0 {
        anyhow::bail!("--connection-timeout-secs must be above 0");
    }
    let mut swarm = match &config.private_network_key {
        None => plain_swarm(config, key)?,
        Some(path) => private_swarm(config, key, path)?,
    };
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr} (--listen)"))?;
    }
    for addr in &config.external_address {
        swarm.add_external_address(addr.clone());
    }
    Ok(swarm)
}

/// The builder steps both transports share once the transport is set: DNS, the relay client,
/// the behaviour and the swarm settings. A macro rather than a function: libp2p does not export
/// the builder's phase types.
macro_rules! finish_swarm {
    ($builder:expr, $config:expr) => {{
        let config: &Config = $config;
        let idle = Duration::from_secs(config.idle_connection_timeout_secs);
        $builder
            .with_dns()
            .context("cannot set up DNS resolution")?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .context("cannot set up the relay transport")?
            .with_behaviour(|key, relay| {
                Behaviour::new(key, config, Some(relay)).map_err(Into::into)
            })
            .context("cannot set up the libp2p behaviour")?
            .with_swarm_config(|c| swarm_config(c, idle))
            .with_connection_timeout(Duration::from_secs(config.connection_timeout_secs))
            .build()
    }};
}

fn plain_swarm(
    config: &Config,
    key: libp2p::identity::Keypair,
) -> anyhow::Result<libp2p::Swarm<Behaviour>> {
    let builder = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("cannot set up the TCP transport")?
        .with_quic();
    Ok(finish_swarm!(builder, config))
}

/// TCP only, each connection first proving the pre-shared key at `path`.
fn private_swarm(
    config: &Config,
    key: libp2p::identity::Keypair,
    path: &std::path::Path,
) -> anyhow::Result<libp2p::Swarm<Behaviour>> {
    let psk = read_psk(path)?;
    if let Some(q) = config.listen.iter().find(|a| {
        a.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
    }) {
        anyhow::bail!(
            "{q}: QUIC cannot carry a private network (--private-network-key); listen on TCP only"
        );
    }
    tracing::info!(fingerprint = %psk.fingerprint(), "private network: only peers with this key can connect");
    let builder = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            use libp2p::Transport;
            let noise = noise::Config::new(key)?;
            Ok(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise)
                    .multiplex(yamux::Config::default())
                    .timeout(Duration::from_secs(20)),
            )
        })
        .context("cannot set up the private-network transport")?;
    Ok(finish_swarm!(builder, config))
}

/// Serve `Mesh` (and health) to the node on the local link at `mesh_addr`, behind the link
/// token when there is one. Returns the bound address, the stop switch and the server's task.
async fn serve_mesh(
    mesh: MeshApi,
    config: &Config,
    token: Option<LinkToken>,
    mesh_addr: &local_link::LinkAddr,
    server_metrics: Arc<GrpcMetrics>,
) -> anyhow::Result<(
    local_link::LinkAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<MeshServer<MeshApi>>().await;
    let mesh = MeshServer::new(mesh)
        .max_decoding_message_size(config.max_forward_bytes)
        .max_encoding_message_size(config.max_forward_bytes);
    let mesh = tonic::service::interceptor::InterceptedService::new(
        mesh,
        move |req: tonic::Request<()>| match &token {
            Some(t) => t.check(req),
            None => Ok(req),
        },
    );
    let listener = LinkListener::bind(mesh_addr)
        .await
        .with_context(|| format!("cannot serve the node link on {mesh_addr} (--mesh-listen)"))?;
    let mesh_addr = listener.local_addr()?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_wait = stop_rx.clone();
    let server = Server::builder()
        .trace_fn(|req: &http::Request<()>| {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %req.uri().path().trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
            );
            fold_telemetry::otel::set_parent(
                &span,
                fold_telemetry::otel::extract_headers(req.headers()),
            );
            span
        })
        .layer(
            tower::ServiceBuilder::new()
                .layer(GrpcMetricsLayer::new(server_metrics))
                .layer(GrpcErrorsLayer::default())
                .into_inner(),
        )
        .add_service(health_service)
        .add_service(mesh)
        .serve_with_incoming_shutdown(listener.into_incoming(), async move {
            let _ = stop_wait.wait_for(|v| *v).await;
        });
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "mesh server failed");
        }
    });
    Ok((mesh_addr, stop, task))
}

/// The admin port (--admin-listen): metrics and readiness (the swarm has an identity).
async fn serve_admin(
    config: &Config,
    registry: Arc<Mutex<Registry>>,
    client: Client,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let admin_state = AdminState::new(registry).readiness_check(
        "swarm",
        Box::new(move || {
            if client.local_peer_id().to_string().is_empty() {
                Err("no identity".into())
            } else {
                Ok(())
            }
        }),
    );
    let (admin_addr, admin) = fold_telemetry::admin::bind(config.admin_listen, admin_state)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;
    Ok((admin_addr, tokio::spawn(admin)))
}

/// Ready once the swarm reports its listen addresses (port 0 resolved); in the order
/// Mesh.Status reports them.
async fn wait_listening(client: &Client, config: &Config) -> anyhow::Result<Vec<Multiaddr>> {
    let mut listen = Vec::new();
    for _ in 0..200 {
        let st = client.status().await?;
        if st.listen_addrs.len() >= config.listen.len()
            || (!st.listen_addrs.is_empty() && listen.len() == st.listen_addrs.len())
        {
            listen = st.listen_addrs;
            break;
        }
        listen = st.listen_addrs;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut listen: Vec<Multiaddr> = listen;
    listen.sort_by_key(|a| a.to_string());
    if listen.is_empty() {
        anyhow::bail!(
            "the swarm did not start listening on any of {:?}",
            config.listen
        );
    }
    Ok(listen)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let running = start(config).await?;
    let listen: Vec<String> = running.listen.iter().map(|a| a.to_string()).collect();
    tracing::info!(node_id = %running.client.local_peer_id(), mesh = %running.mesh_addr, admin = %running.admin_addr, listen = ?listen, "p2p-sidecar serving");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "p2p-sidecar ready node_id={} mesh={} listen={} admin={}",
            running.client.local_peer_id(),
            running.mesh_addr,
            listen.join(","),
            running.admin_addr
        )?;
        out.flush()?;
    }
    shutdown_signal().await;
    running.shutdown().await;
    tracing::info!("bye");
    Ok(())
}
