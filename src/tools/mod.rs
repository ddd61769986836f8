//! Development and load-test tools, in the binary only with the default `tools` feature (the
//! container image is built without them, so production ships no token minter):
//! - [`devkeys`]: development keys and tokens for `make run` / `make token` and the tests;
//! - [`loadgen`]: an open-loop (and closed-loop) Check load generator with HDR histograms;
//! - [`check_client`]: one Check with a token, described as Envoy would act on it.

pub mod check_client;
pub mod devkeys;
pub mod loadgen;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

#[derive(Debug, Subcommand)]
pub enum ToolCommand {
    /// Create a development signing key, its JWKS and an empty revocation file, if missing.
    DevKeys {
        /// Folder for the generated files (git-ignored).
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
    },
    /// Print a token signed with the development key.
    Token(devkeys::TokenArgs),
    /// Print a mixed token set (JSON lines) for load tests, signed with the development key.
    Tokens(devkeys::TokenSetArgs),
    /// Offer Checks to a running sidecar (open or closed loop) and print latency and rates.
    Loadgen(loadgen::LoadgenArgs),
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

/// Runs a tool and says how it ended.
pub fn run(tool: ToolCommand) -> ExitCode {
    match tool {
        ToolCommand::DevKeys { dir } => match devkeys::write_dev_keys(&dir) {
            Ok(created) => {
                let what = if created { "created" } else { "kept existing" };
                eprintln!("{what} development keys in {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        ToolCommand::Token(args) => match devkeys::dev_token(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        ToolCommand::Tokens(args) => {
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
        ToolCommand::Check { addr, token } => check_once(&addr, &token),
        ToolCommand::Loadgen(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            match runtime.map(|r| r.block_on(loadgen::run(&args))) {
                Ok(Ok(report)) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => fail(&e),
                Err(e) => fail(&e),
            }
        }
    }
}

/// `authz-sidecar check`: what Envoy would do with this token, without Envoy.
fn check_once(addr: &str, token: &str) -> ExitCode {
    let outcome = match block_on(check_client::check_with_token(addr, token)) {
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

/// A Check for `GET /` with the token as a Bearer credential.
pub fn bearer_request(token: &str) -> CheckRequest {
    let headers = [("authorization".to_owned(), format!("Bearer {token}"))].into();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// Runs a one-shot future on a single-threaded runtime.
fn block_on<F: std::future::Future>(work: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(work))
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("authz-sidecar: {error}");
    ExitCode::FAILURE
}
