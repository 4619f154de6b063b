//! Process wiring: storage, identities, the sidecar link, the public gRPC server and the local
//! PeerRequests server, readiness line, and graceful shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fold_middleware::admission::AdmissionLayer;
use fold_middleware::breaker::BreakerConfig;
use fold_middleware::deadline::GrpcDeadlineLayer;
use fold_middleware::errors::{GrpcErrorsLayer, RefusalMetrics};
use fold_middleware::metrics::{GrpcMetrics, GrpcMetricsLayer, Side};
use fold_middleware::rate_limit::{KeyedLimiter, KeyedRateLimitLayer};
use fold_middleware::size_limit::TooLargeLayer;
use fold_proto::sidecar::peer_requests_server::PeerRequestsServer;
use fold_proto::v1::fold_node_server::FoldNodeServer;
use fold_proto::v1::network_server::NetworkServer;
use fold_telemetry::admin::AdminState;
use fold_telemetry::otel;
use local_link::token::LinkToken;
use local_link::{LinkAddr, LinkListener};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::layer::util::{Identity, Stack};
use tower::util::Either;

use crate::api::{FoldNodeApi, NetworkApi, OwnerConnection};
use crate::config::Config;
use crate::data::Data;
use crate::identity::{CertIdentity, Identities};
use crate::mesh::{MeshLink, MeshOptions, NETWORK_SERVICE};
use crate::metrics::NodeMetrics;
use crate::peer_requests::PeerRequestsApi;
use crate::route::{RouteOptions, Router};
use crate::store::Store;

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; draining"),
    }
}

/// Rate-limit key of a public-port request: the client's address (an authenticated identity
/// will take its place when clients authenticate).
fn client_key<B>(req: &http::Request<B>) -> String {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        if let Some(id) = tls
            .peer_certs()
            .and_then(|c| c.first().and_then(|c| CertIdentity::from_der(c.as_ref())))
        {
            return format!("client {}", id.name);
        }
        if let Some(a) = tls.get_ref().remote_addr() {
            return format!("client {}", a.ip());
        }
    }
    match ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()) {
        Some(a) => format!("client {}", a.ip()),
        None => "client unknown".to_string(),
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Server reflection, v1 and v1alpha (grpcurl 1.8 and some GUI clients speak only v1alpha).
#[allow(clippy::type_complexity)]
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let build = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fold_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("fold.v1.FoldNode")
            .with_service_name("fold.v1.Network")
            .with_service_name("grpc.health.v1.Health")
    };
    Ok((
        build()
            .build_v1()
            .context("cannot build the reflection service")?,
        build()
            .build_v1alpha()
            .context("cannot build the reflection service")?,
    ))
}

/// TLS settings of the public port, if configured.
fn tls_config(config: &Config) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let identity = tonic::transport::Identity::from_pem(
        read_pem(cert, "TLS certificate (--tls-cert)")?,
        read_pem(key, "TLS key (--tls-key)")?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(read_pem(
                ca,
                "client CA (--tls-client-ca)",
            )?))
            .client_auth_optional(config.tls_client_auth == "optional");
    }
    Ok(Some(tls))
}

/// Create the data directory (mode 0700) if it is missing, and tighten it to 0700 if it is not;
/// a directory we cannot tighten (e.g. a volume owned by another user) is only a warning.
pub fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data directory {}", dir.display()))?;
    if meta.permissions().mode() & 0o077 != 0
        && let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot restrict the data directory to its owner (mode 0700)");
    }
    Ok(())
}

/// Create `path` with mode 0600 if it does not exist yet (so a database file is never readable
/// by others, whatever the umask), and tighten an existing one to 0600.
pub fn private_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to mode 0600", path.display()))
}

/// The key of a request to the per-client rate limit.
type KeyFn = fn(&http::Request<tonic::body::Body>) -> String;

/// The middleware of an API listener (see [`api_stack`]).
type ApiStack = Stack<
    GrpcDeadlineLayer,
    Stack<
        AdmissionLayer,
        Stack<
            Either<KeyedRateLimitLayer<KeyFn>, Identity>,
            Stack<TooLargeLayer, Stack<GrpcErrorsLayer, Stack<GrpcMetricsLayer, Identity>>>,
        >,
    >,
>;

/// The one middleware stack of the API listeners (public and owner), outermost first: metrics,
/// errors → statuses (refusals counted on the public port), the size limit, a per-client rate
/// limit (public port only), load shedding over a bounded queue (admission: a global
/// concurrency limit), the per-request deadline; then the services.
fn api_stack(
    config: &Config,
    metrics: Arc<GrpcMetrics>,
    refusals: Option<RefusalMetrics>,
    limiter: Option<KeyedLimiter>,
) -> ApiStack {
    tower::ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(metrics))
        .layer(GrpcErrorsLayer::new(refusals))
        .layer(TooLargeLayer)
        .option_layer(limiter.map(|l| KeyedRateLimitLayer::new(l, client_key as KeyFn)))
        .layer(AdmissionLayer::new(
            config.max_concurrent_requests,
            config.queue_depth,
        ))
        .layer(GrpcDeadlineLayer::new(Duration::from_millis(
            config.request_timeout_ms,
        )))
        .into_inner()
}

/// The node's metric families, in the registry the admin port serves.
struct Metrics {
    registry: Arc<Mutex<Registry>>,
    node: Arc<NodeMetrics>,
    server: Arc<GrpcMetrics>,
    client: Arc<GrpcMetrics>,
    refusals: RefusalMetrics,
}

fn register_metrics() -> Metrics {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let mut reg = registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let sets: [&[u8]; 4] = [
        fold_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let node = NodeMetrics::register(&mut reg);
    let server = GrpcMetrics::register(&mut reg, Side::Server, &sets);
    let client = GrpcMetrics::register(&mut reg, Side::Client, &sets);
    let refusals = RefusalMetrics::register(&mut reg, "fold");
    crate::groups::status::register(&mut reg);
    drop(reg);
    Metrics {
        registry,
        node,
        server,
        client,
        refusals,
    }
}

/// Open the database in the data directory (created private), with the trust seeds of the
/// command line written into it.
fn open_store(config: &Config) -> anyhow::Result<Store> {
    let data_dir = &config.data_dir;
    prepare_data_dir(data_dir)?;
    let db_path = data_dir.join("fold.redb");
    private_file(&db_path)?;
    let store = Store::open_with_cache(&db_path, config.cache_size).with_context(|| {
        format!(
            "cannot open the database {} (is another fold-node using this --data-dir?)",
            db_path.display()
        )
    })?;
    for seed in &config.trust {
        store
            .trust_set(&seed.node_id, Some(seed.record))
            .context("cannot write the trust table")?;
    }
    store.set_change_log_retention(config.change_log_retention);
    Ok(store)
}

/// The node's data: identities under the trust policy, and the group-commit writer.
fn start_data(config: &Config, store: &Store, metrics: &Metrics) -> anyhow::Result<Data> {
    let policy = config.trust_policy().map_err(anyhow::Error::msg)?;
    if !config.listen.ip().is_loopback()
        && config.tls_client_ca.is_none()
        && matches!((policy.client_distance, policy.admin_distance), (Some(c), Some(a)) if c <= a)
    {
        tracing::warn!(
            listen = %config.listen,
            "every client that can reach --listen holds the admin right (anonymous clients are at distance {:?}, --admin-distance {:?}); set --client-trust-distance above --admin-distance and manage the node through --owner-listen, or require client certificates",
            policy.client_distance,
            policy.admin_distance
        );
    }
    let identities = Identities::new(policy, store.clone());
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Ok(Data::new(
        store.clone(),
        identities,
        metrics.node.clone(),
        crate::subscribe::SubscribeLimits {
            buffer: size(config.subscription_buffer),
            max_subscriptions: config.max_subscriptions,
            per_client: size(config.max_subscriptions_per_client),
            max_scans: size(config.max_scans),
            scans_per_client: size(config.max_scans_per_client),
        },
    )
    .context("cannot start the group-commit writer thread")?
    .with_idempotency_window(Duration::from_secs(config.idempotency_window_secs))
    .with_group_settings(group_settings(config)?))
}

/// The schema groups' timings and log compaction, from the command line.
fn group_settings(config: &Config) -> anyhow::Result<crate::groups::GroupSettings> {
    let mut s = crate::groups::GroupSettings::default();
    let c = &mut s.config;
    c.heartbeat_interval = Duration::from_millis(config.group_heartbeat_ms);
    c.election_timeout_min = Duration::from_millis(config.group_election_timeout_ms);
    c.election_timeout_max = Duration::from_millis(config.group_election_timeout_ms * 2);
    c.rpc_timeout = c.rpc_timeout.max(c.heartbeat_interval * 2);
    c.snapshot_every = config.group_snapshot_every;
    c.keep_after_snapshot = config.group_keep_logs;
    if config.group_election_timeout_ms < 3 * config.group_heartbeat_ms {
        anyhow::bail!(
            "--group-election-timeout-ms ({}) must be at least 3 × --group-heartbeat-ms ({})",
            config.group_election_timeout_ms,
            config.group_heartbeat_ms
        );
    }
    c.to_raft_config("check")
        .map_err(|e| anyhow::anyhow!("group settings: {e}"))?;
    Ok(s)
}

/// Connect the schema groups to the mesh, and open the groups this node is a member of once it
/// knows its node id (from the sidecar, or saved from an earlier run).
fn start_groups(data: &Data, mesh: &MeshLink) {
    let groups = data.groups().clone();
    groups.transport().set_link(Arc::new(mesh.clone()));
    let mesh = mesh.clone();
    tokio::spawn(async move {
        let me = loop {
            if let Some(id) = mesh.node_id() {
                break id;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match groups.open_saved(&me).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(groups = n, "schema groups opened"),
            Err(e) => tracing::error!(error = %e, "cannot open the schema groups of this node"),
        }
    });
}

/// The shared secret of the local link; required when either side of it is TCP.
fn link_token(config: &Config, sidecar_addr: &LinkAddr) -> anyhow::Result<Option<LinkToken>> {
    let token = match &config.link_token_file {
        Some(path) => Some(LinkToken::load(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    if token.is_none() && (sidecar_addr.is_tcp() || config.peer_requests_listen.is_tcp()) {
        anyhow::bail!(
            "the local link to the sidecar uses TCP ({} / {}), which any local user can reach: give both processes the same --link-token-file",
            sidecar_addr,
            config.peer_requests_listen
        );
    }
    Ok(token)
}

/// The link to the sidecar, with its breakers.
fn mesh_link(
    config: &Config,
    sidecar_addr: &LinkAddr,
    token: Option<LinkToken>,
    store: &Store,
    health: &HealthReporter,
    metrics: &Metrics,
) -> anyhow::Result<MeshLink> {
    Ok(MeshLink::new(
        sidecar_addr.clone(),
        store.clone(),
        health.clone(),
        MeshOptions {
            forward_timeout: Duration::from_millis(config.forward_timeout_ms),
            max_message_bytes: config.max_message_bytes,
            breaker: BreakerConfig {
                failure_threshold: config.breaker_failures.max(1),
                backoff: Duration::from_millis(config.breaker_backoff_ms),
                max_backoff: Duration::from_secs(30)
                    .max(Duration::from_millis(config.breaker_backoff_ms)),
            },
            link_forward: config
                .link_forward
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--link-forward: {e}"))?,
            token,
        },
        metrics.node.clone(),
        metrics.client.clone(),
    ))
}

/// Routing of schema-addressed reads, over the executor (here or through the link).
fn router(config: &Config, data: &Data, mesh: &MeshLink, metrics: &Metrics) -> Router {
    Router::new(
        crate::execute::Executor::new(data.clone(), Arc::new(mesh.clone())),
        metrics.node.clone(),
        RouteOptions {
            provider_ttl: Duration::from_secs(config.provider_ttl_secs),
            retry_ratio: config.retry_budget_percent as f32 / 100.0,
            retry_min_per_sec: config.retry_min_per_sec,
            hedge_after: (config.hedge_after_ms > 0)
                .then(|| Duration::from_millis(config.hedge_after_ms)),
            ..RouteOptions::default()
        },
    )
}

/// What the listeners serve: the node's parts, wired.
#[derive(Clone)]
struct Node {
    data: Data,
    mesh: MeshLink,
    router: Router,
    health: HealthServer<HealthService>,
    /// This node's admin address, known once bound; Network.Status reports it.
    admin_addr: Arc<std::sync::OnceLock<String>>,
    max_message_bytes: usize,
}

impl Node {
    fn fold(&self) -> FoldNodeServer<FoldNodeApi> {
        let api = FoldNodeApi::new(self.data.clone(), self.mesh.clone(), self.router.clone());
        FoldNodeServer::new(api)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    fn network(&self) -> NetworkServer<NetworkApi> {
        let api = NetworkApi::new(self.data.clone(), self.mesh.clone(), self.router.clone())
            .with_admin_addr(self.admin_addr.clone());
        NetworkServer::new(api)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }
}

/// Resolves once the shutdown signal is sent.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// The public port: the API (TLS when configured), health and reflection.
async fn serve_public(
    config: &Config,
    node: &Node,
    metrics: &Metrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(std::net::SocketAddr, bool, ServerTask)> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let limiter = KeyedLimiter::new(config.rate_limit_per_client, config.rate_limit_burst);
    let stack = api_stack(
        config,
        metrics.server.clone(),
        Some(metrics.refusals.clone()),
        limiter,
    );
    let mut builder = Server::builder();
    let tls = tls_config(config)?;
    let tls_on = tls.is_some();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration (--tls-cert / --tls-key / --tls-client-ca)")?;
    }
    let server = builder
        .trace_fn(|req: &http::Request<()>| {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %req.uri().path().trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
            );
            otel::set_parent(&span, otel::extract_headers(req.headers()));
            span
        })
        .layer(stack)
        .add_service(node.health.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(node.fold())
        .add_service(node.network())
        .serve_with_incoming_shutdown(incoming, stopped(stop));
    Ok((addr, tls_on, tokio::spawn(server)))
}

/// The local PeerRequests server the sidecar calls with requests from other nodes.
async fn serve_peer_requests(
    config: &Config,
    node: &Node,
    metrics: &Metrics,
    token: Option<LinkToken>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(LinkAddr, ServerTask)> {
    let addr = config
        .peer_requests_listen
        .clone()
        .relative_to(&config.data_dir);
    let listener = LinkListener::bind(&addr).await.with_context(|| {
        format!("cannot listen for the sidecar on {addr} (--peer-requests-listen)")
    })?;
    let addr = listener.local_addr()?;
    let max = node.max_message_bytes;
    let service = PeerRequestsServer::new(
        PeerRequestsApi::new(node.data.clone(), node.mesh.clone())
            .with_metrics(metrics.node.clone())
            .with_faults(config.fault_percent, metrics.node.clone())
            .with_max_message_bytes(max),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        move |req: tonic::Request<()>| match &token {
            Some(t) => t.check(req),
            None => Ok(req),
        },
    );
    // The sidecar's calls are measured like any client's (same metric families, service
    // fold.sidecar.v1.PeerRequests), so the inbound half of a forward shows up on node B.
    let server = Server::builder()
        .layer(GrpcMetricsLayer::new(metrics.server.clone()))
        .add_service(service)
        .serve_with_incoming_shutdown(listener.into_incoming(), stopped(stop));
    Ok((addr, tokio::spawn(server)))
}

/// Run a server of its own; its failure is logged as `what`.
fn spawn_logged(
    server: impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    what: &'static str,
) {
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "{what}");
        }
    });
}

/// Plaintext health for probes that cannot speak TLS; nothing else is served there.
async fn serve_health(
    config: &Config,
    node: &Node,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(addr) = config.health_listen else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--health-listen)"))?;
    let bound = l.local_addr()?;
    let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
    let server = Server::builder()
        .add_service(node.health.clone())
        .serve_with_incoming_shutdown(incoming, stopped(stop));
    spawn_logged(server, "health port failed");
    Ok(Some(bound))
}

/// The owner listener: the same API, where every caller is the node's owner.
async fn serve_owner(
    config: &Config,
    node: &Node,
    metrics: &Metrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<LinkAddr>> {
    let Some(addr) = config.owner_addr().map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let l = LinkListener::bind(&addr).await.with_context(|| {
        format!("cannot listen on {addr} (--owner-listen; \"off\" disables it)")
    })?;
    let shown = l.local_addr()?;
    let mark = |mut req: tonic::Request<()>| {
        req.extensions_mut().insert(OwnerConnection);
        Ok(req)
    };
    use tonic::service::interceptor::InterceptedService;
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let server = Server::builder()
        .layer(api_stack(config, metrics.server.clone(), None, None))
        .add_service(node.health.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(node.fold(), mark))
        .add_service(InterceptedService::new(node.network(), mark))
        .serve_with_incoming_shutdown(l.into_incoming(), stopped(stop));
    spawn_logged(server, "owner listener failed");
    Ok(Some(shown))
}

/// The admin port (metrics, readiness: storage and the sidecar link).
async fn serve_admin(
    config: &Config,
    store: &Store,
    node: &Node,
    metrics: &Metrics,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let store = store.clone();
    let mesh = node.mesh.clone();
    let admin_state = AdminState::new(metrics.registry.clone())
        .readiness_check(
            "storage",
            Box::new(move || {
                store
                    .meta_get("node_id")
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        )
        .readiness_check(
            "sidecar-link",
            Box::new(move || {
                if mesh.is_up() {
                    Ok(())
                } else {
                    Err("the p2p-sidecar is not connected".into())
                }
            }),
        );
    let (addr, admin) = fold_telemetry::admin::bind(config.admin_listen, admin_state)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;
    let _ = node.admin_addr.set(addr.to_string());
    Ok((addr, tokio::spawn(admin)))
}

/// Where the node listens, for the log and the readiness line.
struct Bound {
    grpc: std::net::SocketAddr,
    tls: bool,
    peer_requests: LinkAddr,
    health: Option<std::net::SocketAddr>,
    owner: Option<LinkAddr>,
    admin: std::net::SocketAddr,
}

/// Log where the node serves, and print the readiness line (`fold-node ready grpc=… …`).
fn announce(config: &Config, sidecar_addr: &LinkAddr, b: &Bound) -> anyhow::Result<()> {
    tracing::info!(grpc = %b.grpc, tls = b.tls, health = ?b.health, admin = %b.admin, peer_requests = %b.peer_requests, owner = ?b.owner, sidecar = %sidecar_addr, data_dir = %config.data_dir.display(), "fold-node serving");
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fold-node ready grpc={} peer_requests={} admin={}{}{}",
        b.grpc,
        b.peer_requests,
        b.admin,
        b.health.map(|a| format!(" health={a}")).unwrap_or_default(),
        b.owner
            .as_ref()
            .map(|a| format!(" owner={a}"))
            .unwrap_or_default()
    )?;
    out.flush()?;
    Ok(())
}

/// Let in-flight requests finish within the grace period.
async fn drain(config: &Config, public: ServerTask, local: ServerTask) {
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        let a = public.await;
        let b = local.await;
        (a, b)
    })
    .await;
    match drained {
        Ok((a, b)) => {
            for r in [a, b] {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "server ended with an error"),
                    Err(e) => tracing::error!(error = %e, "server task failed"),
                }
            }
            tracing::info!("drained; bye");
        }
        Err(_) => tracing::warn!(
            grace_secs = config.shutdown_grace_secs,
            "in-flight requests did not finish within the grace period; exiting anyway"
        ),
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Checked before the database is touched: a bad flag fails the start.
    config.trust_policy().map_err(anyhow::Error::msg)?;
    config.owner_addr().map_err(anyhow::Error::msg)?;
    let store = open_store(&config)?;
    let metrics = register_metrics();
    let data = start_data(&config, &store, &metrics)?;
    let health = HealthReporter::new();
    health.set_serving::<FoldNodeServer<FoldNodeApi>>().await;
    health
        .set_service_status(NETWORK_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let sidecar_addr = config.sidecar_addr.clone().relative_to(&config.data_dir);
    let token = link_token(&config, &sidecar_addr)?;
    let mesh = mesh_link(
        &config,
        &sidecar_addr,
        token.clone(),
        &store,
        &health,
        &metrics,
    )?;
    start_groups(&data, &mesh);
    // Followed schemas are read-only from the first request on.
    crate::follow::start(
        &config.follow,
        data.replicas(),
        store.clone(),
        data.hub().clone(),
        mesh.clone(),
        metrics.node.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--follow: {e}"))?;
    let node = Node {
        router: router(&config, &data, &mesh, &metrics),
        data,
        mesh,
        health: HealthServer::new(HealthService::from_health_reporter(health.clone())),
        admin_addr: Arc::default(),
        max_message_bytes: config.max_message_bytes,
    };

    // One shutdown signal fans out to every server.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (grpc, tls, public) = serve_public(&config, &node, &metrics, stop_rx.clone()).await?;
    let (peer_requests, local) =
        serve_peer_requests(&config, &node, &metrics, token, stop_rx.clone()).await?;
    let health_addr = serve_health(&config, &node, stop_rx.clone()).await?;
    let owner = serve_owner(&config, &node, &metrics, stop_rx).await?;
    let (admin_addr, admin) = serve_admin(&config, &store, &node, &metrics).await?;

    node.mesh.spawn_monitor();
    let bound = Bound {
        grpc,
        tls,
        peer_requests,
        health: health_addr,
        owner,
        admin: admin_addr,
    };
    announce(&config, &sidecar_addr, &bound)?;

    shutdown_signal().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(true);
    // Streams that would never end on their own.
    node.data.hub().stop();
    admin.abort();
    drain(&config, public, local).await;
    Ok(())
}
