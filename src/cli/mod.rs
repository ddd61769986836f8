//! The command line: serving (the default) and the operator's commands, and the dispatch to
//! them. `main` is only `run(Cli::parse())`.

pub mod revoke;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogConfig, LogFormat, Settings};
use crate::{devkeys, server};
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
    /// Create a development signing key, its JWKS and an empty revocation file, if missing.
    DevKeys {
        /// Folder for the generated files (git-ignored).
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
    /// Print a token signed with the development key.
    Token(crate::devkeys::TokenArgs),
    /// Print a mixed token set (JSON lines) for load tests, signed with the development key.
    Tokens(crate::devkeys::TokenSetArgs),
    /// Revoke a token, a subject or a session in the configured backend (REVOCATION_BACKEND).
    #[command(subcommand)]
    Revoke(revoke::RevokeCommand),
    /// Remove a revocation from the configured backend.
    #[command(subcommand)]
    Unrevoke(revoke::UnrevokeCommand),
    /// Offer Checks to a running sidecar (open or closed loop) and print latency and rates.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Send one Check with a token to a running sidecar and print the decision (exit 0 = allow).
    Check {
        /// The sidecar's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:9191")]
        addr: String,
        /// The token, sent as `Authorization: Bearer <token>`.
        #[arg(long)]
        token: String,
    },
}

/// EX_USAGE from sysexits.h: the configuration is wrong, restarting will not help.
const EXIT_BAD_CONFIG: u8 = 64;

/// Runs the command the command line names (serving by default) and says how it ended.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings),
        Command::DevKeys { dir } => match devkeys::write_dev_keys(&dir) {
            Ok(created) => {
                let what = if created { "created" } else { "kept existing" };
                eprintln!("{what} development keys in {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Token(args) => match devkeys::dev_token(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Tokens(args) => {
            let stdout = std::io::stdout();
            match devkeys::token_set(&args, &mut stdout.lock()) {
                Ok(count) => {
                    eprintln!(
                        "wrote {count} tokens; revoked jtis in {}",
                        args.revoked_out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Check { addr, token } => check_once(&addr, &token),
        Command::Loadgen(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            match runtime.map(|r| r.block_on(crate::loadgen::run(&args))) {
                Ok(Ok(report)) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(&e),
                Err(e) => fail(&e),
            }
        }
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

/// `authz-sidecar check`: what Envoy would do with this token, without Envoy.
fn check_once(addr: &str, token: &str) -> ExitCode {
    let outcome = match block_on(crate::authz::check_with_token(addr, token)) {
        Ok(outcome) => outcome,
        Err(e) => return fail(&e),
    };
    match outcome {
        Ok(verdict) => {
            println!("{verdict}");
            if verdict.starts_with("allow") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            let cause =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            fail(&format!(
                "cannot reach the sidecar at {addr} ({cause}); is it running (make run)?"
            ))
        }
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let workers = server::runtime_workers(config.server.worker_threads);
    builder.worker_threads(workers);
    let runtime = match builder.enable_all().build() {
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
