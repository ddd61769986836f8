use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use authz_sidecar::config::{Cli, Command, Config, LogConfig, LogFormat};
use authz_sidecar::{admin, devkeys, server};

/// EX_USAGE from sysexits.h: the configuration is wrong, restarting will not help.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(Config::from_settings(&cli.settings)),
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
            match runtime.map(|r| r.block_on(authz_sidecar::loadgen::run(&args))) {
                Ok(Ok(report)) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(&e),
                Err(e) => fail(&e),
            }
        }
        Command::Revoke(what) => admin(block_on(admin::revoke(&cli.settings, &what))),
        Command::Unrevoke(what) => admin(block_on(admin::unrevoke(&cli.settings, &what))),
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
fn admin(outcome: std::io::Result<Result<String, admin::AdminError>>) -> ExitCode {
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => return fail(&e),
    };
    match outcome {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error @ (admin::AdminError::Config(_) | admin::AdminError::Usage(_))) => {
            eprintln!("authz-sidecar: {error}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(error) => fail(&error),
    }
}

/// `authz-sidecar check`: what Envoy would do with this token, without Envoy.
fn check_once(addr: &str, token: &str) -> ExitCode {
    let outcome = match block_on(authz_sidecar::authz::check_with_token(addr, token)) {
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

fn serve(config: Result<Config, authz_sidecar::config::ConfigError>) -> ExitCode {
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("authz-sidecar: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(&config.log);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let workers = authz_sidecar::config::runtime_workers(config.worker_threads);
    builder.worker_threads(workers);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        let grpc = match bind(config.grpc_listen_addr).await {
            Ok(listener) => listener,
            Err(code) => return code,
        };
        let metrics = match config.metrics_listen_addr {
            None => None,
            Some(addr) => match bind(addr).await {
                Ok(listener) => Some(listener),
                Err(code) => return code,
            },
        };
        let grpc_unix = match &config.grpc_tuning.unix_socket {
            None => None,
            Some(path) => match authz_sidecar::listener::bind_unix(path) {
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
