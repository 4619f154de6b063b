//! The fold-node binary: flags, the allocator's settings, the async runtime, then the server.

use clap::Parser;
use fold_node::config::Config;

/// glibc's malloc, tuned so resident memory stays near what is in use (issue 28; measured in
/// docs/BENCHMARKS.md "Memory while the database grows"). By default glibc gives each thread
/// that allocates under contention its own arena, up to 8 per core, and a freed block stays in
/// its arena: the database's 4 KiB page buffers, allocated and freed on many blocking-pool
/// threads, left the node at ~3× its page cache. Two arenas (unless MALLOC_ARENA_MAX is set),
/// and free memory handed back to the kernel every 10 s, keep it at the cache plus a bounded
/// overhead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    use std::ffi::c_int;
    // glibc's own declarations (malloc.h); M_ARENA_MAX is -8.
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
        fn malloc_trim(pad: usize) -> c_int;
    }
    const M_ARENA_MAX: c_int = -8;
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
    let _ = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(10));
                // SAFETY: malloc_trim only returns free memory of the arenas to the kernel.
                unsafe {
                    malloc_trim(0);
                }
            }
        });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    if config.command.is_none() {
        tune_malloc();
    }
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

/// A probe address as a local link: a host name is resolved (within the probe's timeout).
async fn resolve(
    addr: &fold_node::config::ProbeAddr,
    timeout: std::time::Duration,
) -> Result<local_link::LinkAddr, String> {
    use fold_node::config::ProbeAddr;
    match addr {
        ProbeAddr::Link(a) => Ok(a.clone()),
        ProbeAddr::Host(host, port) => {
            let found =
                tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), *port)))
                    .await
                    .map_err(|_| format!("resolving {host} timed out"))?
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .next();
            found
                .map(local_link::LinkAddr::Tcp)
                .ok_or_else(|| format!("{host} resolves to no address"))
        }
    }
}

async fn probe(
    addr: &fold_node::config::ProbeAddr,
    service: &str,
    timeout_ms: u64,
) -> std::process::ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let timeout = std::time::Duration::from_millis(timeout_ms);
    let addr = match resolve(addr, timeout).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("health check of {addr} failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = &addr;
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
