use clap::Parser;
use fold_node::config::Config;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    fold_node::server::init_tracing(&config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fold-node: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fold_node::server::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fold-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
