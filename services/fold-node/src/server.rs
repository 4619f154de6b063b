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
use local_link::LinkListener;
use local_link::token::LinkToken;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

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

pub async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    prepare_data_dir(&data_dir)?;
    let db_path = data_dir.join("fold.redb");
    private_file(&db_path)?;
    let policy = config.trust_policy().map_err(anyhow::Error::msg)?;
    let owner_addr = config.owner_addr().map_err(anyhow::Error::msg)?;
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
    let registry = Arc::new(Mutex::new(Registry::default()));
    let (node_metrics, server_metrics, client_metrics, refusals) = {
        let mut reg = registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sets: [&[u8]; 4] = [
            fold_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        (
            NodeMetrics::register(&mut reg),
            GrpcMetrics::register(&mut reg, Side::Server, &sets),
            GrpcMetrics::register(&mut reg, Side::Client, &sets),
            RefusalMetrics::register(&mut reg, "fold"),
        )
    };
    store.set_change_log_retention(config.change_log_retention);
    let data = Data::new(
        store.clone(),
        identities,
        node_metrics.clone(),
        crate::subscribe::SubscribeLimits {
            buffer: usize::try_from(config.subscription_buffer).unwrap_or(usize::MAX),
            max_subscriptions: config.max_subscriptions,
            per_client: usize::try_from(config.max_subscriptions_per_client).unwrap_or(usize::MAX),
            max_scans: usize::try_from(config.max_scans).unwrap_or(usize::MAX),
            scans_per_client: usize::try_from(config.max_scans_per_client).unwrap_or(usize::MAX),
        },
    )
    .context("cannot start the group-commit writer thread")?
    .with_idempotency_window(Duration::from_secs(config.idempotency_window_secs));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FoldNodeServer<FoldNodeApi>>().await;
    health
        .set_service_status(NETWORK_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;

    let sidecar_addr = config.sidecar_addr.clone().relative_to(&data_dir);
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
    let mesh = MeshLink::new(
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
            token: token.clone(),
        },
        node_metrics.clone(),
        client_metrics,
    );

    // Followed schemas are read-only from the first request on.
    crate::follow::start(
        &config.follow,
        data.replicas(),
        store.clone(),
        data.hub().clone(),
        mesh.clone(),
        node_metrics.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--follow: {e}"))?;

    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let owner_reflection = reflection()?;
    let max = config.max_message_bytes;
    let router = Router::new(
        crate::execute::Executor::new(data.clone(), Arc::new(mesh.clone())),
        node_metrics.clone(),
        RouteOptions {
            provider_ttl: Duration::from_secs(config.provider_ttl_secs),
            retry_ratio: config.retry_budget_percent as f32 / 100.0,
            retry_min_per_sec: config.retry_min_per_sec,
            hedge_after: (config.hedge_after_ms > 0)
                .then(|| Duration::from_millis(config.hedge_after_ms)),
            ..RouteOptions::default()
        },
    );
    // The admin address, known once bound below; Network.Status reports it.
    let admin_addr_cell: Arc<std::sync::OnceLock<String>> = Arc::default();
    let fold_service =
        FoldNodeServer::new(FoldNodeApi::new(data.clone(), mesh.clone(), router.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
    let network_service = NetworkServer::new(
        NetworkApi::new(data.clone(), mesh.clone(), router.clone())
            .with_admin_addr(admin_addr_cell.clone()),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let peer_service = PeerRequestsServer::new(
        PeerRequestsApi::new(data.clone(), mesh.clone())
            .with_metrics(node_metrics.clone())
            .with_faults(config.fault_percent, node_metrics.clone())
            .with_max_message_bytes(max),
    )
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let grpc_addr = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let peer_addr = config.peer_requests_listen.clone().relative_to(&data_dir);
    let peer_listener = LinkListener::bind(&peer_addr).await.with_context(|| {
        format!("cannot listen for the sidecar on {peer_addr} (--peer-requests-listen)")
    })?;
    let peer_addr = peer_listener.local_addr()?;

    // One shutdown signal fans out to both servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    // Outermost first: errors → statuses, per-client rate limit, load shedding over a bounded
    // queue (admission: a global concurrency limit), per-request deadline, then the services.
    let limiter = KeyedLimiter::new(config.rate_limit_per_client, config.rate_limit_burst);
    let middleware = tower::ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(server_metrics.clone()))
        .layer(GrpcErrorsLayer::new(Some(refusals)))
        .layer(TooLargeLayer)
        .option_layer(limiter.map(|l| KeyedRateLimitLayer::new(l, client_key)))
        .layer(AdmissionLayer::new(
            config.max_concurrent_requests,
            config.queue_depth,
        ))
        .layer(GrpcDeadlineLayer::new(Duration::from_millis(
            config.request_timeout_ms,
        )))
        .into_inner();
    let mut builder = Server::builder();
    let tls = tls_config(&config)?;
    let tls_on = tls.is_some();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration (--tls-cert / --tls-key / --tls-client-ca)")?;
    }
    let health_only = health_service.clone();
    let owner_health = health_service.clone();
    let owner_metrics = server_metrics.clone();
    let public = builder
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
        .layer(middleware)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(fold_service)
        .add_service(network_service)
        .serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()));
    let peer_service = tonic::service::interceptor::InterceptedService::new(
        peer_service,
        move |req: tonic::Request<()>| match &token {
            Some(t) => t.check(req),
            None => Ok(req),
        },
    );
    // The sidecar's calls are measured like any client's (same metric families, service
    // fold.sidecar.v1.PeerRequests), so the inbound half of a forward shows up on node B.
    let local = Server::builder()
        .layer(GrpcMetricsLayer::new(server_metrics))
        .add_service(peer_service)
        .serve_with_incoming_shutdown(peer_listener.into_incoming(), wait_stop(stop_rx.clone()));
    let public = tokio::spawn(public);
    // Plaintext health for probes that cannot speak TLS; nothing else is served there.
    let mut health_addr = None;
    if let Some(addr) = config.health_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--health-listen)"))?;
        health_addr = Some(l.local_addr()?);
        let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
        let server = Server::builder()
            .add_service(health_only)
            .serve_with_incoming_shutdown(incoming, wait_stop(stop_rx.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "health port failed");
            }
        });
    }
    let local = tokio::spawn(local);

    // The owner listener: the same API, where every caller is the node's owner.
    let mut owner_shown = None;
    if let Some(addr) = &owner_addr {
        let l = LinkListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (--owner-listen; \"off\" disables it)")
        })?;
        owner_shown = Some(l.local_addr()?);
        let mark = |mut req: tonic::Request<()>| {
            req.extensions_mut().insert(OwnerConnection);
            Ok(req)
        };
        let fold_owner = tonic::service::interceptor::InterceptedService::new(
            FoldNodeServer::new(FoldNodeApi::new(data.clone(), mesh.clone(), router.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            mark,
        );
        let network_owner = tonic::service::interceptor::InterceptedService::new(
            NetworkServer::new(
                NetworkApi::new(data.clone(), mesh.clone(), router.clone())
                    .with_admin_addr(admin_addr_cell.clone()),
            )
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            mark,
        );
        let stack = tower::ServiceBuilder::new()
            .layer(GrpcMetricsLayer::new(owner_metrics.clone()))
            .layer(GrpcErrorsLayer::new(None))
            .layer(TooLargeLayer)
            .layer(AdmissionLayer::new(
                config.max_concurrent_requests,
                config.queue_depth,
            ))
            .layer(GrpcDeadlineLayer::new(Duration::from_millis(
                config.request_timeout_ms,
            )))
            .into_inner();
        let server = Server::builder()
            .layer(stack)
            .add_service(owner_health)
            .add_service(owner_reflection.0)
            .add_service(owner_reflection.1)
            .add_service(fold_owner)
            .add_service(network_owner)
            .serve_with_incoming_shutdown(l.into_incoming(), wait_stop(stop_rx.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "owner listener failed");
            }
        });
    }

    let admin_state = AdminState::new(registry.clone())
        .readiness_check(
            "storage",
            Box::new({
                let store = store.clone();
                move || {
                    store
                        .meta_get("node_id")
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            }),
        )
        .readiness_check(
            "sidecar-link",
            Box::new({
                let mesh = mesh.clone();
                move || {
                    if mesh.is_up() {
                        Ok(())
                    } else {
                        Err("the p2p-sidecar is not connected".into())
                    }
                }
            }),
        );
    let (admin_addr, admin) = fold_telemetry::admin::bind(config.admin_listen, admin_state)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;
    let _ = admin_addr_cell.set(admin_addr.to_string());
    let admin = tokio::spawn(admin);

    mesh.spawn_monitor();
    tracing::info!(grpc = %grpc_addr, tls = tls_on, health = ?health_addr, admin = %admin_addr, peer_requests = %peer_addr, owner = ?owner_shown, sidecar = %sidecar_addr, data_dir = %data_dir.display(), "fold-node serving");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "fold-node ready grpc={grpc_addr} peer_requests={peer_addr} admin={admin_addr}{}{}",
            health_addr
                .map(|a| format!(" health={a}"))
                .unwrap_or_default(),
            owner_shown
                .as_ref()
                .map(|a| format!(" owner={a}"))
                .unwrap_or_default()
        )?;
        out.flush()?;
    }

    shutdown_signal().await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(true);
    // Streams that would never end on their own.
    data.hub().stop();
    admin.abort();
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
    Ok(())
}
