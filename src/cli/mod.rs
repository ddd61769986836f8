//! The command line: serving (the default) and the operator's commands, and the dispatch to
//! them. `main` is only `run(Cli::parse())`.

pub mod revoke;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogConfig, LogFormat, Settings};
use crate::server;
use revoke::AdminError;

/// Envoy ext_authz gRPC sidecar: verifies JWTs against a cached JWKS and checks revocations.
#[derive(Debug, Parser)]
#[command(name = "authz-sidecar", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Check requests (the default when no subcommand is given).
    Serve,
    /// Revoke a token, a subject or a session in the configured backend (REVOCATION_BACKEND).
    #[command(subcommand)]
    Revoke(revoke::RevokeCommand),
    /// Remove a revocation from the configured backend.
    #[command(subcommand)]
    Unrevoke(revoke::UnrevokeCommand),
    /// Development and load-test tools (the default `tools` feature).
    #[cfg(feature = "tools")]
    #[command(flatten)]
    Tool(crate::tools::ToolCommand),
}

/// EX_USAGE from sysexits.h: the configuration is wrong, restarting will not help.
const EXIT_BAD_CONFIG: u8 = 64;

/// Runs the command the command line names (serving by default) and says how it ended.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings),
        #[cfg(feature = "tools")]
        Command::Tool(tool) => crate::tools::run(tool),
        Command::Revoke(what) => admin(block_on(revoke::revoke(&cli.settings, &what))),
        Command::Unrevoke(what) => admin(block_on(revoke::unrevoke(&cli.settings, &what))),
    }
}

/// Runs a one-shot command's future on a single-threaded runtime.
fn block_on<F: std::future::Future>(work: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(work))
}

/// Prints a revoke/unrevoke summary, or the error with exit 64 (bad settings) or 1.
fn admin(outcome: std::io::Result<Result<String, AdminError>>) -> ExitCode {
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => return fail(&e),
    };
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error @ (AdminError::Config(_) | AdminError::Usage(_))) => {
            eprintln!("authz-sidecar: {error}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(error) => fail(&error),
    }
}

fn serve(settings: &Settings) -> ExitCode {
    let config = Config::from_settings(settings)
        .and_then(|config| LogConfig::from_settings(settings).map(|log| (config, log)));
    let (config, log) = match config {
        Ok(both) => both,
        Err(e) => {
            eprintln!("authz-sidecar: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(&log);
    let workers = server::runtime_workers(config.server.worker_threads);
    let runtime = match server::build_runtime(workers) {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        let grpc = match bind(config.server.listen_addr).await {
            Ok(listener) => listener,
            Err(code) => return code,
        };
        let metrics = match config.server.metrics_listen_addr {
            None => None,
            Some(addr) => match bind(addr).await {
                Ok(listener) => Some(listener),
                Err(code) => return code,
            },
        };
        let logout = match config.logout.as_ref().map(|l| l.listen_addr) {
            None => None,
            Some(addr) => match bind(addr).await {
                Ok(listener) => Some(listener),
                Err(code) => return code,
            },
        };
        let grpc_unix = match &config.server.tuning.unix_socket {
            None => None,
            Some(path) => match crate::listener::bind_unix(path) {
                Ok(listener) => Some(listener),
                Err(e) => return fail(&format!("cannot listen on {}: {e}", path.display())),
            },
        };
        let listeners = server::Listeners {
            grpc,
            grpc_unix,
            metrics,
            logout,
        };
        match server::run(config, listeners, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| fail(&format!("cannot listen on {addr}: {e}")))
}

fn init_tracing(log: &LogConfig) {
    // Validated in config, so the fallback is never used.
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("authz-sidecar: {error}");
    ExitCode::FAILURE
}
