//! foldctl: the command line for a fold-node. Parses flags, connects with fold-client, runs one
//! command, prints a table or stable JSON, and maps failures to documented exit codes
//! (docs/FOLDCTL.md): 0 ok, 1 usage/local error, 2 node unreachable, 3 node refused, 4 `check`
//! found problems.

mod check;
mod cli;
mod commands;
mod dashboard;
mod finding;
mod group;
mod group_check;
mod metrics;
mod replica_check;
mod table;
mod top;
mod topology;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use fold_client::{Client, ClientBuilder, Error};

use cli::{Cli, Command, Global, Output};

/// What a command produced: the JSON document and the text for people. A `null` document
/// means the text is the output in every mode (pictures: DOT, SVG).
pub struct Out {
    pub json: serde_json::Value,
    pub text: String,
}

impl Out {
    /// Output printed as is whatever `-o` says.
    pub fn text_only(text: String) -> Out {
        Out {
            json: serde_json::Value::Null,
            text,
        }
    }
}

/// A command's failure.
#[derive(Debug)]
pub enum Failure {
    /// From the client library (status, connection, configuration, input).
    Client(Error),
    /// A local problem (file, JSON input, rendering).
    Local(String),
    /// `check` found problems; its report is already printed.
    Problems,
    /// A refusal from the node, and what to do about it (printed after the error).
    Hinted(Error, String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Client(e)
    }
}

pub const EXIT_LOCAL: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;
pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_PROBLEMS: u8 = 4;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_LOCAL } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Command::Completions { shell } = cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "foldctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("foldctl: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let output = cli.global.output;
    table::set_wide(output == Output::Wide);
    match rt.block_on(run(cli)) {
        Ok(out) => {
            let output = if out.json.is_null() {
                Output::Table
            } else {
                output
            };
            match output {
                Output::Json => match serde_json::to_string_pretty(&out.json) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("foldctl: cannot render JSON: {e}");
                        return ExitCode::from(EXIT_LOCAL);
                    }
                },
                Output::Table | Output::Wide => print!("{}", out.text),
            }
            ExitCode::SUCCESS
        }
        Err(f) => ExitCode::from(report(f)),
    }
}

/// Print a failure on stderr and return its exit code.
fn report(f: Failure) -> u8 {
    match f {
        Failure::Problems => EXIT_PROBLEMS,
        Failure::Hinted(e, hint) => {
            let code = report(Failure::Client(e));
            eprintln!("foldctl: hint: {hint}");
            code
        }
        Failure::Local(m) => {
            eprintln!("foldctl: error: {m}");
            EXIT_LOCAL
        }
        Failure::Client(e) => {
            match &e {
                Error::Status { code, message } => {
                    eprintln!(
                        "foldctl: error: {}: {message}",
                        fold_client::code_name(*code)
                    )
                }
                Error::Connect { .. } => {
                    eprintln!("foldctl: error: UNAVAILABLE: {e}");
                    if e.is_tls() {
                        eprintln!(
                            "foldctl: hint: TLS handshake failed; `foldctl check` explains the usual causes"
                        );
                    }
                }
                other => eprintln!("foldctl: error: {other}"),
            }
            exit_code(&e)
        }
    }
}

/// The documented exit code of a client error.
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Config(_) | Error::Input(_) => EXIT_LOCAL,
        Error::Connect { .. } => EXIT_UNREACHABLE,
        Error::Status { code, .. } if *code == tonic::Code::Unavailable => EXIT_UNREACHABLE,
        Error::Status { .. } => EXIT_REFUSED,
    }
}

/// A node id short enough for a picture: its last 8 characters (ids share the `12D3KooW`
/// prefix); the full id stays one hover or click away.
pub fn short_id(id: &str) -> String {
    let n = id.chars().count();
    if n <= 12 {
        return id.to_string();
    }
    let tail: String = id.chars().skip(n - 8).collect();
    format!("…{tail}")
}

/// The client for the global flags.
pub fn builder(g: &Global) -> ClientBuilder {
    builder_at(g, &g.addr)
}

/// The client for the global flags, at another address.
pub fn builder_at(g: &Global, addr: &str) -> ClientBuilder {
    let mut b = ClientBuilder::new(addr).timeout(g.timeout);
    if let Some(ca) = &g.tls_ca {
        b = b.tls_ca_file(ca);
    }
    if let (Some(c), Some(k)) = (&g.tls_cert, &g.tls_key) {
        b = b.tls_identity_files(c, k);
    }
    if let Some(n) = &g.tls_server_name {
        b = b.tls_server_name(n);
    }
    b
}

async fn connect(g: &Global) -> Result<Client, Failure> {
    Ok(builder(g).connect().await?)
}

async fn run(cli: Cli) -> Result<Out, Failure> {
    let g = &cli.global;
    match cli.command {
        Command::Check {
            metrics_addr,
            sidecar_metrics_addr,
        } => {
            let flags = check::AdminFlags {
                node: metrics_addr.as_deref(),
                sidecar: sidecar_metrics_addr.as_deref(),
            };
            check::run(g, flags).await
        }
        Command::Dashboard(args) => dashboard::run(g, args).await,
        Command::Top {
            metrics_addrs,
            interval,
            iterations,
        } => {
            let addrs = if metrics_addrs.is_empty() {
                check::reported_admin_addrs(g).await
            } else {
                metrics_addrs
            };
            top::run(g, &addrs, interval, iterations).await
        }
        Command::Completions { .. } => Err(Failure::Local("completions are handled before".into())),
        cmd => {
            let client = connect(g).await?;
            commands::run(&client, g, cmd).await
        }
    }
}
