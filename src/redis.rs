//! What every Redis user in this process shares: the pool and how it is built, the reconnect
//! policy, the per-Check call options and breaker settings, and the error a failed call becomes.
//! The revocation store, its tracking connection and the rate limiter all ride one pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::config::{Options, TlsConfig, TlsConnector, UnresponsiveConfig};
use tracing::{info, warn};

use crate::breaker::Breaker;

/// Reconnect backoff: exponential from 100 ms to 5 s, plus up to 100 ms of jitter so replicas
/// do not reconnect in lockstep after a Redis restart. Retries forever.
const RECONNECT_MIN_DELAY_MS: u32 = 100;
const RECONNECT_MAX_DELAY_MS: u32 = 5000;
const RECONNECT_JITTER_MS: u32 = 100;

/// The reconnect policy of every Redis connection this process keeps (pool and tracking).
/// Without one, fred never reconnects.
pub fn reconnect_policy() -> ReconnectPolicy {
    let mut policy =
        ReconnectPolicy::new_exponential(0, RECONNECT_MIN_DELAY_MS, RECONNECT_MAX_DELAY_MS, 2);
    policy.set_jitter(RECONNECT_JITTER_MS);
    policy
}

/// The pool and the budgets of calls made on a Check's behalf (the `REDIS_*` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// `redis://`, `rediss://` (TLS), `redis-sentinel://` or `redis-cluster://` URL.
    pub url: String,
    /// Connections in the pool; each multiplexes many concurrent calls.
    pub pool_size: usize,
    /// Budget of one Check's call (a revocation lookup, a rate-limit step), timeout included;
    /// fits inside Envoy's 200 ms default.
    pub lookup_timeout: Duration,
    /// Timeout of commands not made for a Check (the `revoke` writes).
    pub write_timeout: Duration,
    /// A connection with a reply outstanding this long is closed and reconnected.
    pub read_timeout: Duration,
    /// Timeout of one connection attempt (TCP, TLS, AUTH).
    pub connect_timeout: Duration,
    /// How long startup and the `revoke` command wait for the pool to connect.
    pub pool_timeout: Duration,
    /// Commands queued per connection before new ones fail at once (backpressure).
    pub max_queued_commands: usize,
    /// Consecutive failed calls that open a breaker (0 disables it).
    pub breaker_failures: u32,
    /// How long an open breaker fails calls at once before one probe is let through.
    pub breaker_cooldown: Duration,
    /// TLS beyond the system roots (`REDIS_TLS_*`); `None`: a `rediss` URL verifies the server
    /// against the system CA store, as fred does by default.
    pub tls: Option<RedisTls>,
}

/// A private CA and/or a client certificate for a `rediss` URL (managed Redis services sign
/// with their own CA; some require a client certificate). Read when a client is built: at
/// startup, where a bad file is a configuration error, and again by `revoke`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// `REDIS_TLS_CA`: the only roots the server's certificate may chain to.
    pub ca: Option<PathBuf>,
    /// `REDIS_TLS_CERT` and `REDIS_TLS_KEY`: presented when the server asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// fred's TLS configuration from the files: rustls with aws-lc-rs, TLS 1.2/1.3.
    pub fn load(&self) -> Result<TlsConfig, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                for ca in
                    crate::pem::certificates(path).map_err(|e| format!("REDIS_TLS_CA: {e}"))?
                {
                    roots
                        .add(ca)
                        .map_err(|e| format!("REDIS_TLS_CA: {}: {e}", path.display()))?;
                }
            }
            None => {
                let system = rustls_native_certs::load_native_certs();
                for cert in system.certs {
                    // A system certificate rustls cannot use is skipped, as fred does.
                    let _ = roots.add(cert);
                }
            }
        }
        let builder = builder.with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain =
                    crate::pem::certificates(cert).map_err(|e| format!("REDIS_TLS_CERT: {e}"))?;
                let key =
                    crate::pem::private_key(key).map_err(|e| format!("REDIS_TLS_KEY: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("REDIS_TLS_CERT/REDIS_TLS_KEY: {e}"))?
            }
        };
        Ok(TlsConfig::from(TlsConnector::from(config)))
    }
}

/// Whether a `REDIS_URL` names a Redis Cluster (`redis-cluster://`, `rediss-cluster://`).
pub fn is_cluster_url(url: &str) -> bool {
    url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://")
}

/// Whether a `REDIS_URL` connects with TLS.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss")
}

/// A fred configuration from the settings: the URL, and the TLS files if any.
pub fn client_config(settings: &PoolSettings) -> Result<Config, StoreError> {
    let mut config = Config::from_url(&settings.url)
        .map_err(|e| StoreError::Other(format!("REDIS_URL: {e}")))?;
    if let Some(tls) = &settings.tls {
        config.tls = Some(tls.load().map_err(StoreError::Other)?);
    }
    Ok(config)
}

impl PoolSettings {
    /// `REDIS_URL`: one of the schemes fred connects with.
    pub fn parse_url(value: &str) -> Result<String, String> {
        const SCHEMES: [&str; 6] = [
            "redis://",
            "rediss://",
            "redis-sentinel://",
            "redis-cluster://",
            "rediss-cluster://",
            "rediss-sentinel://",
        ];
        if !SCHEMES.iter().any(|scheme| value.starts_with(scheme)) {
            return Err(format!("must start with one of {}", SCHEMES.join(", ")));
        }
        Ok(value.to_owned())
    }

    /// Options of a call made for a Check: its budget, and failing at once on a disconnected
    /// client rather than waiting for the reconnect.
    pub fn check_call_options(&self) -> Options {
        Options {
            timeout: Some(self.lookup_timeout),
            fail_fast: true,
            ..Options::default()
        }
    }

    /// A breaker with these settings (each Redis user keeps its own).
    pub fn breaker(&self) -> Breaker {
        Breaker::new(self.breaker_failures, self.breaker_cooldown)
    }
}

/// A pool, and why it was not connected yet when startup stopped waiting for it.
pub struct StartedPool {
    pub pool: Pool,
    /// `None`: connected. Otherwise the last connection error (a refused TLS certificate, a
    /// wrong password, a refused connection), for the operator.
    pub not_connected: Option<String>,
}

/// Builds the pool and starts connecting. A Redis that is down is not an error: the
/// connections keep retrying in the background and calls fail (fast) until they are up. Only
/// a URL fred cannot use is an error.
pub async fn connect_pool(settings: &PoolSettings) -> Result<StartedPool, StoreError> {
    let mut config = client_config(settings)?;
    // Run the reconnect policy for the first connection too, instead of failing startup.
    config.fail_fast = false;
    let pool = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = settings.connect_timeout;
            c.max_command_buffer_len = settings.max_queued_commands;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(settings.read_timeout),
                interval: (settings.read_timeout / 4).max(Duration::from_millis(10)),
            };
        })
        .with_performance_config(|p| p.default_command_timeout = settings.write_timeout)
        .set_policy(reconnect_policy())
        .build_pool(settings.pool_size)
        .map_err(|e| StoreError::Other(e.to_string()))?;
    // Subscribed before connecting, so the first failure's reason is kept.
    let mut errors = pool.clients().first().map(|client| client.error_rx());
    // The connection tasks run (and reconnect) for the life of the pool.
    let _connections = pool.connect();
    let waited = tokio::time::timeout(settings.pool_timeout, pool.wait_for_connect()).await;
    let mut last_error = None;
    while let Some(Ok((error, _))) = errors.as_mut().map(|rx| rx.try_recv()) {
        last_error = Some(error.to_string());
    }
    let not_connected = match waited {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(last_error.unwrap_or_else(|| {
            format!(
                "no connection within REDIS_POOL_TIMEOUT ({:?})",
                settings.pool_timeout
            )
        })),
    };
    match &not_connected {
        None => info!(pool_size = settings.pool_size, "connected to Redis"),
        Some(why) => warn!(
            url = %redacted_url(&settings.url),
            error = %why,
            "Redis not reachable yet; retrying in the background"
        ),
    }
    Ok(StartedPool {
        pool,
        not_connected,
    })
}

/// Whether a key prefix holds a Redis Cluster hash tag (`{...}` with something inside): keys
/// with one all hash to the same slot.
pub fn has_hash_tag(prefix: &str) -> bool {
    prefix
        .find('{')
        .and_then(|open| prefix[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

/// A `REDIS_URL` fit for logs and messages: the password (and user) replaced by `***`.
pub fn redacted_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// Why a store (Redis, or the memory backend's) could not answer. The failure mode decides
/// what the Check returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("lookup timed out")]
    Timeout,
    #[error("circuit breaker open")]
    BreakerOpen,
    #[error("connection: {0}")]
    Connection(String),
    #[error("command queue full")]
    Backpressure,
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// Every label, for metrics registered up front.
    pub const LABELS: [&'static str; 5] = [
        "timeout",
        "breaker_open",
        "connection",
        "backpressure",
        "other",
    ];

    /// Bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::BreakerOpen => "breaker_open",
            StoreError::Connection(_) => "connection",
            StoreError::Backpressure => "backpressure",
            StoreError::Other(_) => "other",
        }
    }
}

impl From<&Error> for StoreError {
    fn from(error: &Error) -> Self {
        match error.kind() {
            ErrorKind::Timeout => StoreError::Timeout,
            ErrorKind::Backpressure => StoreError::Backpressure,
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Tls | ErrorKind::Auth => {
                StoreError::Connection(error.to_string())
            }
            _ => StoreError::Other(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redacted_url("rediss://user:s3cret@redis.example:6380/0"),
            "rediss://***@redis.example:6380/0"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redacted_url("redis-sentinel://:pw@a:26379?node=b:26379"),
            "redis-sentinel://***@a:26379?node=b:26379"
        );
    }

    #[test]
    fn every_error_has_one_of_the_labels() {
        for error in [
            StoreError::Timeout,
            StoreError::BreakerOpen,
            StoreError::Connection(String::new()),
            StoreError::Backpressure,
            StoreError::Other(String::new()),
        ] {
            assert!(StoreError::LABELS.contains(&error.label()), "{error:?}");
        }
    }
}
