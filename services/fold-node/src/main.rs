use clap::Parser;
use fold_node::config::Config;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    // Several TLS users (tonic, libp2p's QUIC) share rustls; pick its crypto provider once, so
    // rustls never has to guess between the ones the dependency graph enables.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fold-node: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(fold_node::config::Command::Probe {
        addr,
        service,
        timeout_ms,
    }) = &config.command
    {
        return runtime.block_on(probe(addr, service, *timeout_ms));
    }
    runtime.block_on(async move {
        let _telemetry = fold_telemetry::otel::init("fold-node", &config.log_format);
        match fold_node::server::run(config).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("fold-node: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

async fn probe(
    addr: &local_link::LinkAddr,
    service: &str,
    timeout_ms: u64,
) -> std::process::ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let mut client = HealthClient::new(local_link::channel(addr, timeout));
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(req)).await {
        Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32 => {
            println!("SERVING");
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(resp)) => {
            println!(
                "{}",
                ServingStatus::try_from(resp.get_ref().status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN")
            );
            std::process::ExitCode::FAILURE
        }
        Ok(Err(status)) => {
            eprintln!("health check of {addr} failed: {}", status.message());
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("health check of {addr} timed out after {timeout_ms} ms");
            std::process::ExitCode::FAILURE
        }
    }
}
