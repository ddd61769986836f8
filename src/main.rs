use std::process::ExitCode;

use authz_sidecar::cli::{Cli, run};
use clap::Parser;

fn main() -> ExitCode {
    run(Cli::parse())
}
