//! What the benches share: signed tokens for each algorithm over a JWKS file, an authorizer
//! over those keys with any revocation store, and a redis-server of their own.

#![allow(dead_code)] // each bench uses part of it

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use authz_sidecar::authorizer::{Authorizer, Issuer};
use authz_sidecar::devkeys::{SigningKey, jwks, random_id};
use authz_sidecar::jwks::{IssuerKeys, JwksSettings, JwksSource};
use authz_sidecar::jwt::{ASYMMETRIC_ALGORITHMS, JwtPolicy};
use authz_sidecar::metrics::Metrics;
use authz_sidecar::revocation::{FailureMode, RedisSettings, RevocationStore};
use authz_sidecar::token_cache::TokenCache;
use jsonwebtoken::Algorithm;
use serde_json::json;

pub const ISSUER: &str = "https://bench.test";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Claims of a valid token: an hour left, a fresh `jti`.
pub fn claims() -> serde_json::Value {
    json!({"iss": ISSUER, "sub": "bench-user", "aud": "api", "iat": now(), "exp": now() + 3600, "jti": random_id()})
}

/// One signing key per algorithm, their JWKS in a temporary file, and the issuer's key set.
pub struct Fixture {
    pub dir: PathBuf,
    pub keys: Vec<SigningKey>,
    pub issuer_keys: Arc<IssuerKeys>,
    pub policy: JwtPolicy,
}

impl Fixture {
    pub fn new(algs: &[Algorithm]) -> Self {
        let keys: Vec<SigningKey> = algs
            .iter()
            .map(|a| SigningKey::generate(*a, &format!("{a:?}")).unwrap())
            .collect();
        let dir = std::env::temp_dir().join(format!("authz-bench-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks_path = dir.join("jwks.json");
        let document = jwks(&keys.iter().collect::<Vec<_>>()).unwrap();
        std::fs::write(&jwks_path, serde_json::to_vec(&document).unwrap()).unwrap();
        let settings = JwksSettings {
            refresh_interval: Duration::from_secs(3600),
            min_refresh_interval: Duration::from_secs(3600),
            max_stale: Duration::from_secs(86400),
            fetch_timeout: Duration::from_secs(2),
            file_poll_interval: Duration::from_secs(3600),
        };
        let issuer_keys = IssuerKeys::new(
            ISSUER.into(),
            JwksSource::File(jwks_path),
            settings,
            reqwest::Client::new(),
            None,
        );
        let policy = JwtPolicy {
            algorithms: ASYMMETRIC_ALGORITHMS.to_vec(),
            leeway_seconds: 60,
            require_jti: true,
            max_token_bytes: 8192,
        };
        Fixture {
            dir,
            keys,
            issuer_keys,
            policy,
        }
    }

    /// An authorizer over these keys, audience `api`, failing closed.
    pub fn authorizer<S: RevocationStore>(
        &self,
        store: S,
        cache: Option<TokenCache>,
    ) -> Arc<Authorizer<S>> {
        let issuer = Issuer {
            keys: self.issuer_keys.clone(),
            audiences: vec!["api".into()],
        };
        Arc::new(Authorizer::new(
            HashMap::from([(ISSUER.to_owned(), issuer)]),
            self.policy.clone(),
            store,
            FailureMode::Closed,
            Arc::new(Metrics::new(&[ISSUER.to_owned()])),
            cache.map(Arc::new),
        ))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server on a free port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (make deps installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }

    /// Settings for a pool of `pool_size` with generous timeouts and no breaker.
    pub fn settings(&self, pool_size: usize, cache_max_entries: u64) -> RedisSettings {
        RedisSettings {
            url: format!("redis://127.0.0.1:{}", self.port),
            pool_size,
            key_prefix: "revoked:".into(),
            lookup_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            pool_timeout: Duration::from_secs(5),
            max_queued_commands: 100_000,
            breaker_failures: 0,
            breaker_cooldown: Duration::from_secs(1),
            subject_ttl: Duration::from_secs(3600),
            cache_max_entries,
            cache_ttl: Duration::from_secs(60),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
