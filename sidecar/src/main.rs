//! The p2p-sidecar binary: parses the command line, runs `identity` subcommands, or starts the
//! sidecar (`p2p_sidecar::server::run`) on a Tokio runtime sized by --worker-threads.

use clap::Parser;
use p2p_sidecar::config::{Cli, Command, IdentityAction};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Identity { action }) = &cli.command {
        return identity_command(&cli, action);
    }
    // Several TLS users (tonic, libp2p's QUIC) share rustls; pick its crypto provider once, so
    // rustls never has to guess between the ones the dependency graph enables.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = if cli.config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if cli.config.worker_threads > 0 {
            b.worker_threads(cli.config.worker_threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("p2p-sidecar: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = fold_telemetry::otel::init("p2p-sidecar", &cli.config.log_format);
        match p2p_sidecar::server::run(cli.config).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("p2p-sidecar: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

fn identity_command(cli: &Cli, action: &IdentityAction) -> std::process::ExitCode {
    let result = match action {
        IdentityAction::Show => {
            p2p_sidecar::identity::load_or_create(&cli.config.identity_path(), false)
                .map(|k| k.public().to_peer_id())
        }
        IdentityAction::Generate { out } => {
            let key = libp2p::identity::Keypair::generate_ed25519();
            p2p_sidecar::identity::write_new(out, &key).map(|()| key.public().to_peer_id())
        }
    };
    match result {
        Ok(id) => {
            println!("{id}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("p2p-sidecar: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
