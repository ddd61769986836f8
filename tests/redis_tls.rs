//! The Redis backend over TLS (`rediss://`) against a real TLS-only redis-server with a test
//! CA and client certificates: lookups, `revoke`, the tracked revocation cache, and a server
//! certificate from the wrong CA failing closed with a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::redis::{RedisServer, ServerTls};
use common::tls::Ca;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

/// A TLS-only Redis signed by one CA, the files a sidecar needs to reach it, and a second CA
/// that signed nothing of it.
struct Fixture {
    redis: RedisServer,
    dir: PathBuf,
    ca: PathBuf,
    wrong_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = std::env::temp_dir().join(format!("authz-redis-tls-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("redis test CA");
        let wrong = Ca::new("some other CA");
        let path = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca_path = path("ca.pem", &ca.pem);
        let wrong_ca = path("wrong-ca.pem", &wrong.pem);
        let (server_cert, server_key) = ca.server("redis").write(&dir, "server");
        let (client_cert, client_key) = ca.client("sidecar").write(&dir, "client");
        let text = |p: &Path| p.to_str().unwrap().to_owned();
        let redis = RedisServer::start_tls(ServerTls {
            cert: text(&server_cert),
            key: text(&server_key),
            ca: text(&ca_path),
            client_cert: text(&client_cert),
            client_key: text(&client_key),
        });
        Fixture {
            redis,
            dir,
            ca: ca_path,
            wrong_ca,
            client_cert,
            client_key,
        }
    }

    /// The flags that reach this Redis, trusting `ca`.
    fn flags<'a>(&'a self, url: &'a str, ca: &'a Path) -> Vec<&'a str> {
        vec![
            "--revocation-backend",
            "redis",
            "--redis-url",
            url,
            "--redis-tls-ca",
            ca.to_str().unwrap(),
            "--redis-tls-cert",
            self.client_cert.to_str().unwrap(),
            "--redis-tls-key",
            self.client_key.to_str().unwrap(),
        ]
    }

    /// `authz-sidecar revoke ...` against this Redis, trusting `ca`, with nothing from the
    /// outer environment.
    fn revoke(&self, ca: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
            .env_clear()
            .env("REVOCATION_BACKEND", "redis")
            .env("REDIS_URL", self.redis.url())
            .env("REDIS_TLS_CA", ca)
            .env("REDIS_TLS_CERT", &self.client_cert)
            .env("REDIS_TLS_KEY", &self.client_key)
            .env("REDIS_POOL_TIMEOUT", "2s")
            .env("JWT_ISSUER", ISSUER)
            .arg("revoke")
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn lookups_revoke_and_the_tracked_cache_work_over_tls() {
    let f = Fixture::new();
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let url = f.redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &f.flags(&url, &f.ca),
    ))
    .await;
    let live = eventually(Duration::from_secs(10), || async {
        metric_value(
            &sidecar.http_get("/metrics").await.1,
            "ext_authz_revocation_cache_live",
        ) == 1.0
    })
    .await;
    assert!(live, "CLIENT TRACKING runs over the TLS connection too");

    let exp = now() + 300;
    let mut claims = valid_claims();
    claims["jti"] = json!("tls-jti-1");
    claims["exp"] = json!(exp);
    let token = key.sign(&claims).unwrap();
    expect_allow(&sidecar.check(&token).await);
    expect_allow(&sidecar.check(&token).await);

    let out = f.revoke(&f.ca, &["jti", "tls-jti-1", "--exp", &exp.to_string()]);
    assert!(
        out.status.success(),
        "revoke over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.redis.cli(&["EXISTS", "revoked:jti:tls-jti-1"]), "1");
    let denied = eventually(Duration::from_secs(2), || async {
        sidecar.reason(&token).await == "revoked"
    })
    .await;
    assert!(
        denied,
        "the revocation reaches the cache as a pushed invalidation"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_fails_closed_with_a_clear_error() {
    let f = Fixture::new();
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let url = f.redis.url();
    let mut flags = f.flags(&url, &f.wrong_ca);
    flags.extend(["--redis-pool-timeout", "200ms"]);
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &flags)).await;
    let token = key.sign(&valid_claims()).unwrap();
    let response = sidecar.check(&token).await;
    let (denied, _, _) = expect_deny(&response);
    assert_eq!(denied.status.as_ref().unwrap().code, 503, "never an allow");
    assert_eq!(sidecar.reason(&token).await, "revocation_unavailable");
    sidecar.shutdown().await;

    let out = f.revoke(
        &f.wrong_ca,
        &["jti", "x", "--exp", &(now() + 60).to_string()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a write to an untrusted server fails"
    );
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the error names the certificate problem: {stderr}"
    );
}

#[test]
fn tls_files_beside_a_plaintext_url_or_a_key_without_its_certificate_are_refused() {
    let f = Fixture::new();
    let run = |envs: &[(&str, &Path)], url: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
        command
            .env_clear()
            .env("JWT_ISSUER", ISSUER)
            .env("JWKS_URL", "https://idp.example/jwks")
            .env("REVOCATION_BACKEND", "redis")
            .env("REDIS_URL", url);
        for (name, value) in envs {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let plaintext = run(&[("REDIS_TLS_CA", &f.ca)], "redis://127.0.0.1:6379");
    assert_eq!(plaintext.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&plaintext.stderr).contains("does not use TLS"),
        "{}",
        String::from_utf8_lossy(&plaintext.stderr)
    );
    let half = run(&[("REDIS_TLS_KEY", &f.client_key)], &f.redis.url());
    assert_eq!(half.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&half.stderr).contains("must be set together"));
    let missing = run(
        &[("REDIS_TLS_CA", &f.dir.join("no-such-ca.pem"))],
        &f.redis.url(),
    );
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("REDIS_TLS_CA"));
}
