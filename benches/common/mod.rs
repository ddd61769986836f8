//! What the benches share: signed tokens for each algorithm over a JWKS file, an authorizer
//! over those keys with any revocation store, and settings for a redis-server of their own.
//! Built on the test suites' helpers (tests/common), so both start Redis and load keys alike.

#![allow(dead_code, unused_imports)] // each bench uses part of it

#[path = "../../tests/common/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use authz_sidecar::authorizer::{Authorizer, Issuer};
use authz_sidecar::jwks::IssuerKeys;
use authz_sidecar::jwt::JwtPolicy;
use authz_sidecar::metrics::Metrics;
use authz_sidecar::redis::PoolSettings;
use authz_sidecar::revocation::{FailureMode, RedisSettings, RevocationStore};
use authz_sidecar::token_cache::TokenCache;
use authz_sidecar::tools::devkeys::{SigningKey, jwks, random_id};
use jsonwebtoken::Algorithm;

pub use support::redis::RedisServer;
pub use support::topology;
pub use support::{AUDIENCE, ISSUER, now, valid_claims};

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
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
            .map(|a| support::key(*a, &format!("{a:?}")))
            .collect();
        let dir = std::env::temp_dir().join(format!("authz-bench-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks_path = dir.join("jwks.json");
        let document = jwks(&keys.iter().collect::<Vec<_>>()).unwrap();
        std::fs::write(&jwks_path, serde_json::to_vec(&document).unwrap()).unwrap();
        Fixture {
            dir,
            keys,
            issuer_keys: support::file_issuer_keys(ISSUER, jwks_path),
            policy: support::jwt_policy(),
        }
    }

    /// An authorizer over these keys and the suites' audience, failing closed.
    pub fn authorizer<S: RevocationStore>(
        &self,
        store: S,
        cache: Option<TokenCache>,
    ) -> Arc<Authorizer<S>> {
        let issuer = Issuer {
            keys: self.issuer_keys.clone(),
            audiences: vec![AUDIENCE.into()],
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

/// A pool of `pool_size` on `redis` with generous timeouts and no breaker: the bench
/// measures lookups, not failure handling.
pub fn redis_settings(
    redis: &RedisServer,
    pool_size: usize,
    cache_max_entries: u64,
) -> RedisSettings {
    redis_settings_at(redis.url(), "revoked:", pool_size, cache_max_entries)
}

/// [`redis_settings`] for any Redis URL (a Sentinel group, a Cluster) and key prefix.
pub fn redis_settings_at(
    url: String,
    key_prefix: &str,
    pool_size: usize,
    cache_max_entries: u64,
) -> RedisSettings {
    RedisSettings {
        pool: PoolSettings {
            url,
            pool_size,
            lookup_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            pool_timeout: Duration::from_secs(5),
            max_queued_commands: 100_000,
            breaker_failures: 0,
            breaker_cooldown: Duration::from_secs(1),
            tls: None,
        },
        key_prefix: key_prefix.into(),
        subject_ttl: Duration::from_secs(3600),
        cache_max_entries,
        cache_ttl: Duration::from_secs(60),
    }
}
