use clap::Parser;
use fold_node::config::Config;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fold-node: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
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
