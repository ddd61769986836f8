//! The binary as an operator meets it: bad configuration, the development quickstart, and the
//! README's settings table kept in step with the flags.

mod common;

use std::process::Command;

use authz_sidecar::cli::Cli;
use clap::CommandFactory;
use common::*;

fn sidecar_binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
    // Only what the test passes: nothing from the developer's or CI's environment.
    command.env_clear();
    command
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_64() {
    let output = sidecar_binary()
        .env("JWT_LEEWAY_SECONDS", "ten")
        .env("JWKS_URL", "ftp://keys.example/jwks")
        .env("JWT_ISSUER", "https://issuer.test")
        .env("JWT_ALGORITHMS", "HS256")
        .env("LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for setting in [
        "JWT_LEEWAY_SECONDS",
        "JWKS_URL",
        "JWT_ALGORITHMS",
        "LOG_FORMAT",
    ] {
        assert!(
            stderr.contains(setting),
            "{setting} not reported in:\n{stderr}"
        );
    }
    assert!(output.stdout.is_empty());
}

#[test]
fn no_issuer_is_a_configuration_error() {
    let output = sidecar_binary().output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_ISSUER is required"));
}

#[tokio::test]
async fn dev_keys_and_token_make_a_working_quickstart() {
    let dir = std::env::temp_dir().join(format!(
        "authz-quickstart-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    let dir_arg = dir.to_str().unwrap();
    let created = sidecar_binary()
        .args(["dev-keys", "--dir", dir_arg])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key_before = std::fs::read(dir.join("signing-key.pem")).unwrap();
    let again = sidecar_binary()
        .args(["dev-keys", "--dir", dir_arg])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(dir.join("signing-key.pem")).unwrap(),
        key_before,
        "existing keys are kept"
    );

    let mint = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "--dir",
            dir_arg,
            "--issuer",
            ISSUER,
            "--audience",
            AUDIENCE,
        ];
        args.extend_from_slice(extra);
        let out = sidecar_binary().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let sidecar = start_sidecar(config(
        &["--jwks-file", dir.join("jwks.json").to_str().unwrap()],
        &[
            "--revocation-file",
            dir.join("revoked.txt").to_str().unwrap(),
        ],
    ))
    .await;
    let ok = sidecar.check(&mint(&["--subject", "carol"])).await;
    assert_eq!(
        header(&expect_allow(&ok).headers, "x-jwt-sub"),
        Some("carol")
    );
    let expired = sidecar.check(&mint(&["--expired"])).await;
    assert_eq!(expect_deny(&expired).2, "expired");
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// One row of the README settings table: `| `ENV` | `--flag` | default | meaning |`.
struct Row {
    env: String,
    flag: String,
    default: String,
}

fn readme_rows() -> Vec<Row> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Settings")
        .nth(1)
        .expect("README has a Settings section");
    section
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| l.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let unquote = |s: &str| s.trim_matches('`').to_owned();
            Row {
                env: unquote(cells[1]),
                flag: unquote(cells[2]),
                default: unquote(cells[3]),
            }
        })
        .collect()
}

#[test]
fn readme_settings_table_matches_the_flags() {
    let rows = readme_rows();
    let command = Cli::command();
    let mut documented = 0;
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let env = env.to_string_lossy();
        let row = rows
            .iter()
            .find(|r| r.env == env)
            .unwrap_or_else(|| panic!("{env} missing from README"));
        let flag = format!("--{}", arg.get_long().unwrap());
        assert_eq!(row.flag, flag, "{env}");
        let default = arg
            .get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned());
        let expected = match default.as_deref() {
            None => "(none)".to_owned(),
            Some("") => "(empty)".to_owned(),
            Some(value) => value.to_owned(),
        };
        assert_eq!(row.default, expected, "default of {env}");
        documented += 1;
    }
    assert_eq!(
        rows.len(),
        documented,
        "README lists settings the binary does not have"
    );
}

#[test]
fn readme_names_every_reason_label_the_binary_exports() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let scrape = authz_sidecar::metrics::Metrics::new(&[]).render();
    let reasons: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("ext_authz_requests_total{"))
        .filter_map(|l| l.split("reason=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        reasons.len() > 15,
        "every reason is registered at startup: {reasons:?}"
    );
    for reason in reasons {
        assert!(
            readme.contains(&format!("`{reason}`")),
            "README does not name the reason `{reason}`"
        );
    }
}

#[test]
fn readme_metrics_table_lists_every_metric_the_binary_exports() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let scrape = authz_sidecar::metrics::Metrics::new(&[]).render();
    let names: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.len() > 15,
        "every metric is registered at startup: {names:?}"
    );
    for name in names {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README's metrics table has no row for `{name}`"
        );
    }
}
