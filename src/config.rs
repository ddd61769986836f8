//! The only place that reads flags and the environment.
//!
//! Every knob is one clap argument with its env var, default and unit. Values are kept as text
//! here and validated together in [`Config::from_settings`], so a bad deployment gets one message
//! listing every problem (and `main` exits with 64, EX_USAGE) instead of one error per restart.
//! Components receive the typed structs built here and never read the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::authz::{ClaimHeader, MetadataClaims, TokenSource, UpstreamHeaders};
use crate::jwks::{JwksSettings, JwksSource};
use crate::jwt::JwtPolicy;
use crate::keys::ASYMMETRIC_ALGORITHMS;
use crate::rate_limit::{LimiterBackend, RateLimitConfig, RateLimitSection};
use crate::redis::PoolSettings;
use crate::revocation::{FailureMode, RedisSettings, RevocationConfig};
use crate::tls::TlsFiles;

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
    Revoke(crate::admin::RevokeCommand),
    /// Remove a revocation from the configured backend.
    #[command(subcommand)]
    Unrevoke(crate::admin::UnrevokeCommand),
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

/// Every serving setting. Text values are validated by [`Config::from_settings`].
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address of the gRPC Check listener.
    #[arg(long, env = "GRPC_LISTEN_ADDR", default_value = "0.0.0.0:9191")]
    pub grpc_listen_addr: String,

    /// Concurrent Check streams one client connection may open (HTTP/2 SETTINGS); 1-10000.
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value = "100")]
    pub grpc_max_concurrent_streams: String,

    /// Runtime worker threads serving Checks; 0 = the container's CPU quota (cgroup-aware).
    #[arg(long, env = "GRPC_NUM_STREAM_WORKERS", default_value = "0")]
    pub grpc_num_stream_workers: String,

    /// Checks answered at once; beyond it a Check is shed at once with a 503 `overloaded` deny.
    /// 0 = 256 per runtime worker thread.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = "0")]
    pub max_in_flight: String,

    /// A unix domain socket to serve Checks on as well, for an Envoy in the same pod (no TCP
    /// stack, no port); empty = none. Always plaintext.
    #[arg(long, env = "GRPC_UNIX_SOCKET", default_value = "")]
    pub grpc_unix_socket: String,

    /// Close a client connection after this age (GOAWAY, then `GRPC_MAX_CONNECTION_AGE_GRACE`),
    /// plus or minus 10 % per process, so Envoy's long-lived connections spread onto new
    /// replicas; 0 = never.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE", default_value = "0s")]
    pub grpc_max_connection_age: String,

    /// How long Checks on a connection closed for its age may take to finish.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE_GRACE", default_value = "10s")]
    pub grpc_max_connection_age_grace: String,

    /// HTTP/2 PING sent to an idle client this often, to find dead connections; 0 = never.
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", default_value = "30s")]
    pub grpc_keepalive_interval: String,

    /// A keepalive PING unanswered this long closes the connection.
    #[arg(long, env = "GRPC_KEEPALIVE_TIMEOUT", default_value = "10s")]
    pub grpc_keepalive_timeout: String,

    /// HTTP/2 initial flow-control window per stream, bytes (65535-2147483647).
    #[arg(
        long,
        env = "GRPC_INITIAL_STREAM_WINDOW_BYTES",
        default_value = "1048576"
    )]
    pub grpc_initial_stream_window_bytes: String,

    /// HTTP/2 initial flow-control window per connection, bytes (65535-2147483647).
    #[arg(
        long,
        env = "GRPC_INITIAL_CONNECTION_WINDOW_BYTES",
        default_value = "1048576"
    )]
    pub grpc_initial_connection_window_bytes: String,

    /// TCP_NODELAY on Check connections (true|false): small answers leave at once.
    #[arg(long, env = "GRPC_TCP_NODELAY", default_value = "true")]
    pub grpc_tcp_nodelay: String,

    /// Largest CheckRequest accepted, bytes (65536-67108864); bigger ones are refused unread.
    #[arg(long, env = "GRPC_MAX_MESSAGE_BYTES", default_value = "4194304")]
    pub grpc_max_message_bytes: String,

    /// Longest a Check stream may take from its headers to a complete request; a stream that
    /// has not sent its request by then is answered 503 `request_read_timeout` and releases its
    /// MAX_IN_FLIGHT permit (slow-loris clients). Keep it well under Envoy's timeout (250 ms).
    #[arg(long, env = "GRPC_REQUEST_READ_TIMEOUT", default_value = "100ms")]
    pub grpc_request_read_timeout: String,

    /// TLS handshakes in progress at once on the Check listener (1-65536); a connection beyond
    /// it is closed at once, so silent connections cannot pile up handshake tasks.
    #[arg(long, env = "GRPC_TLS_MAX_HANDSHAKES", default_value = "256")]
    pub grpc_tls_max_handshakes: String,

    /// PEM certificate chain for TLS on the Check listener; unset: plaintext (same-pod use).
    #[arg(long, env = "GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key of GRPC_TLS_CERT.
    #[arg(long, env = "GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM CA bundle: clients must present a certificate it issued (mTLS; Envoy's only).
    #[arg(long, env = "GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// Address of the HTTP listener for /metrics, /healthz and /readyz; empty disables it.
    #[arg(long, env = "METRICS_LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_listen_addr: String,

    /// After SIGTERM/SIGINT: time spent not ready but still answering, so traffic moves away.
    #[arg(long, env = "SHUTDOWN_DRAIN_DELAY", default_value = "5s")]
    pub shutdown_drain_delay: String,

    /// After the drain delay: how long in-flight Checks may take before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: String,

    /// YAML or TOML file with `issuers` (instead of JWT_ISSUER and JWKS_*) and/or `rate_limits`.
    #[arg(long = "config", env = "CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Accepted `iss` values, comma-separated. Each gets its own key set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Accepted `aud` values, comma-separated; empty means `aud` is not checked.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "")]
    pub jwt_audience: String,

    /// JWKS location (http or https). Without it and JWKS_FILE, keys come from OIDC discovery.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// JWKS file, re-read when it changes.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Allow plaintext `http://` JWKS and discovery URLs to hosts other than loopback
    /// (true|false). Anyone on the path could then replace the keys; warned at startup.
    #[arg(long, env = "JWKS_ALLOW_HTTP", default_value = "false")]
    pub jwks_allow_http: String,

    /// Accepted signature algorithms, comma-separated (HMAC and `none` are never accepted).
    #[arg(
        long,
        env = "JWT_ALGORITHMS",
        default_value = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA"
    )]
    pub jwt_algorithms: String,

    /// Clock skew tolerated on exp/nbf/iat, in seconds (0-600).
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value = "60")]
    pub jwt_leeway_seconds: String,

    /// Deny tokens without a `jti` claim (true|false).
    #[arg(long, env = "JWT_REQUIRE_JTI", default_value = "true")]
    pub jwt_require_jti: String,

    /// Longest token accepted, in bytes (256-65536); checked before any parsing.
    #[arg(long, env = "JWT_MAX_TOKEN_BYTES", default_value = "8192")]
    pub jwt_max_token_bytes: String,

    /// Request header carrying the token. For `authorization` the Bearer scheme is required.
    #[arg(long, env = "TOKEN_HEADER", default_value = "authorization")]
    pub token_header: String,

    /// Cookie carrying the token, read when the header has none; empty disables cookies.
    #[arg(long, env = "TOKEN_COOKIE", default_value = "")]
    pub token_cookie: String,

    /// Claims copied to upstream request headers, `claim=header` comma-separated (overwritten,
    /// so a client cannot send its own). An absent claim removes the header.
    #[arg(long, env = "CLAIM_HEADERS", default_value = "sub=x-jwt-sub")]
    pub claim_headers: String,

    /// Claims returned to Envoy as dynamic metadata (for access logs and later filters),
    /// comma-separated; `*` = every claim, empty = none. Each one costs Envoy work per request.
    #[arg(long, env = "DYNAMIC_METADATA_CLAIMS", default_value = "iss,sub")]
    pub dynamic_metadata_claims: String,

    /// `context_extensions` keys meant for others (access-log tags, other filters) that a route
    /// may carry, comma-separated. Any other key this sidecar does not read answers 500
    /// `bad_route_config`, so a typo never removes a requirement.
    #[arg(long, env = "CONTEXT_EXTENSIONS_IGNORED", default_value = "")]
    pub context_extensions_ignored: String,

    /// Strip the Authorization header before the request goes upstream (true|false).
    #[arg(long, env = "REMOVE_AUTHORIZATION_HEADER", default_value = "false")]
    pub remove_authorization_header: String,

    /// Verified tokens kept so a repeated token skips the signature check; 0 disables the cache.
    #[arg(long, env = "TOKEN_CACHE_MAX_ENTRIES", default_value = "100000")]
    pub token_cache_max_entries: String,

    /// Longest a verified token stays cached (it also leaves at its `exp`).
    #[arg(long, env = "TOKEN_CACHE_TTL", default_value = "5m")]
    pub token_cache_ttl: String,

    /// Background JWKS refresh period without Cache-Control max-age, and max-age's upper bound.
    #[arg(long, env = "JWKS_REFRESH_INTERVAL", default_value = "5m")]
    pub jwks_refresh_interval: String,

    /// Minimum time between two fetches of one issuer's JWKS (rate-limits unknown-kid refetches).
    #[arg(long, env = "JWKS_MIN_REFRESH_INTERVAL", default_value = "10s")]
    pub jwks_min_refresh_interval: String,

    /// How long the last good keys keep serving while the JWKS source fails.
    #[arg(long, env = "JWKS_MAX_STALE", default_value = "24h")]
    pub jwks_max_stale: String,

    /// Timeout of one JWKS or discovery request.
    #[arg(long, env = "JWKS_FETCH_TIMEOUT", default_value = "2s")]
    pub jwks_fetch_timeout: String,

    /// How often JWKS_FILE, REVOCATION_FILE and the GRPC_TLS_* files are checked for changes.
    #[arg(long, env = "FILE_POLL_INTERVAL", default_value = "2s")]
    pub file_poll_interval: String,

    /// Revocation store: `memory` (embedded) or `redis` (shared by every replica).
    #[arg(long, env = "REVOCATION_BACKEND", default_value = "memory")]
    pub revocation_backend: String,

    /// Revoked jtis/subjects/sessions for the memory backend, re-read when it changes.
    #[arg(long, env = "REVOCATION_FILE")]
    pub revocation_file: Option<PathBuf>,

    /// When the revocation store cannot answer: `closed` denies with 503, `open` allows.
    #[arg(long, env = "REVOCATION_FAILURE_MODE", default_value = "closed")]
    pub revocation_failure_mode: String,

    /// Redis for the `redis` backend: redis://, rediss:// (TLS), redis-sentinel://, redis-cluster://.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Connections in the Redis pool (1-256); each multiplexes many concurrent lookups.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value = "2")]
    pub redis_pool_size: String,

    /// Accepted for compatibility: every pool connection stays open, so this is always
    /// REDIS_POOL_SIZE in effect. Must not exceed it.
    #[arg(long, env = "REDIS_MIN_IDLE_CONNS")]
    pub redis_min_idle_conns: Option<String>,

    /// How long startup and `revoke` wait for the Redis pool to connect.
    #[arg(long, env = "REDIS_POOL_TIMEOUT", default_value = "5s")]
    pub redis_pool_timeout: String,

    /// A Redis connection with a reply outstanding this long is closed and reconnected.
    #[arg(long, env = "REDIS_READ_TIMEOUT", default_value = "2s")]
    pub redis_read_timeout: String,

    /// Timeout of Redis commands other than lookups (revocation writes).
    #[arg(long, env = "REDIS_WRITE_TIMEOUT", default_value = "2s")]
    pub redis_write_timeout: String,

    /// Timeout of one Redis connection attempt (TCP, TLS, AUTH).
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT", default_value = "1s")]
    pub redis_connect_timeout: String,

    /// Budget of one Check's revocation lookup; keep it well inside Envoy's timeout (200 ms).
    #[arg(long, env = "REDIS_LOOKUP_TIMEOUT", default_value = "50ms")]
    pub redis_lookup_timeout: String,

    /// Redis commands queued per connection before new ones fail at once (backpressure).
    #[arg(long, env = "REDIS_MAX_QUEUED_COMMANDS", default_value = "10000")]
    pub redis_max_queued_commands: String,

    /// Consecutive failed lookups that open the circuit breaker (0 disables it).
    #[arg(long, env = "REDIS_BREAKER_FAILURES", default_value = "5")]
    pub redis_breaker_failures: String,

    /// How long an open breaker fails lookups at once before one probe goes to Redis.
    #[arg(long, env = "REDIS_BREAKER_COOLDOWN", default_value = "1s")]
    pub redis_breaker_cooldown: String,

    /// Prefix of every revocation key in Redis (use a hash tag such as `{revoked}:` on a cluster).
    #[arg(long, env = "REVOKED_KEY_PREFIX", default_value = "revoked:")]
    pub revoked_key_prefix: String,

    /// How long a subject/session revocation is kept in Redis: at least the longest token lifetime.
    #[arg(long, env = "REVOKED_SUBJECT_TTL", default_value = "24h")]
    pub revoked_subject_ttl: String,

    /// Redis backend: revocation keys held in-process, kept true by Redis's invalidation pushes
    /// (RESP3 CLIENT TRACKING); 0 reads Redis on every Check.
    #[arg(long, env = "REVOCATION_CACHE_MAX_ENTRIES", default_value = "50000")]
    pub revocation_cache_max_entries: String,

    /// Redis backend: longest a cached revocation value is used before it is read again.
    #[arg(long, env = "REVOCATION_CACHE_TTL", default_value = "5m")]
    pub revocation_cache_ttl: String,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Log filter in tracing's EnvFilter syntax (e.g. `info,authz_sidecar=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen_addr: SocketAddr,
    pub grpc_tuning: GrpcTuning,
    pub grpc_max_concurrent_streams: u32,
    pub grpc_max_message_bytes: usize,
    /// Admission limit: Checks in flight before new ones are shed.
    pub max_in_flight: usize,
    /// `None`: plaintext.
    pub grpc_tls: Option<TlsFiles>,
    /// Worker threads for the runtime; `None` lets it follow the CPU quota.
    pub worker_threads: Option<usize>,
    /// `None`: no metrics/health HTTP listener.
    pub metrics_listen_addr: Option<SocketAddr>,
    pub shutdown: ShutdownConfig,
    pub issuers: Vec<IssuerConfig>,
    pub jwt: JwtPolicy,
    pub token_source: TokenSource,
    pub upstream: UpstreamHeaders,
    /// `context_extensions` keys a route may carry for others (CONTEXT_EXTENSIONS_IGNORED).
    pub ignored_route_keys: Vec<String>,
    pub token_cache: TokenCacheConfig,
    pub jwks: JwksSettings,
    pub revocation: RevocationConfig,
    pub revocation_failure_mode: FailureMode,
    /// From CONFIG_FILE's `rate_limits`; `None`: no limits.
    pub rate_limits: Option<RateLimitConfig>,
    pub log: LogConfig,
    /// Settings that weaken a protection on purpose, logged as warnings at startup.
    pub warnings: Vec<String>,
}

/// The verified-token cache; `max_entries` 0 disables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheConfig {
    pub max_entries: u64,
    pub ttl: Duration,
}

/// The two steps of a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownConfig {
    pub drain_delay: Duration,
    pub timeout: Duration,
}

/// One trusted issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    pub issuer: String,
    /// Accepted audiences; empty means `aud` is not checked for this issuer.
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

/// Every problem found in the settings, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// `CONFIG_FILE`: the issuers (instead of JWT_ISSUER and JWKS_*) and the rate limits, either
/// or both.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    issuers: Vec<ConfigFileIssuer>,
    #[serde(default)]
    rate_limits: Option<RateLimitSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFileIssuer {
    issuer: String,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default)]
    jwks_url: Option<String>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
}

impl Config {
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let mut check = |result: Result<(), String>| {
            if let Err(e) = result {
                errors.push(e);
            }
        };

        let mut grpc_listen_addr = SocketAddr::from(([0, 0, 0, 0], 9191));
        check(parse_into(
            &mut grpc_listen_addr,
            "GRPC_LISTEN_ADDR",
            &s.grpc_listen_addr,
            |v| {
                v.parse()
                    .map_err(|_| "expected host:port, e.g. 0.0.0.0:9191".into())
            },
        ));

        let mut grpc_max_concurrent_streams = 100;
        check(parse_into(
            &mut grpc_max_concurrent_streams,
            "GRPC_MAX_CONCURRENT_STREAMS",
            &s.grpc_max_concurrent_streams,
            |v| parse_in_range(v, 1, 10_000),
        ));
        let mut workers = 0usize;
        check(parse_into(
            &mut workers,
            "GRPC_NUM_STREAM_WORKERS",
            &s.grpc_num_stream_workers,
            |v| parse_in_range(v, 0, 1024),
        ));
        let worker_threads = (workers > 0).then_some(workers);
        let mut max_in_flight = 0usize;
        check(parse_into(
            &mut max_in_flight,
            "MAX_IN_FLIGHT",
            &s.max_in_flight,
            |v| parse_in_range(v, 0, 1_000_000),
        ));
        if max_in_flight == 0 {
            max_in_flight = IN_FLIGHT_PER_WORKER * runtime_workers(worker_threads);
        }

        let mut grpc_max_message_bytes = 4 << 20;
        check(parse_into(
            &mut grpc_max_message_bytes,
            "GRPC_MAX_MESSAGE_BYTES",
            &s.grpc_max_message_bytes,
            |v| parse_in_range(v, 64 << 10, 64 << 20),
        ));
        let mut grpc_tuning = GrpcTuning::default();
        let unix_socket = s.grpc_unix_socket.trim();
        grpc_tuning.unix_socket = (!unix_socket.is_empty()).then(|| PathBuf::from(unix_socket));
        let mut max_age = Duration::ZERO;
        let mut keepalive = Duration::ZERO;
        for (slot, name, value) in [
            (
                &mut max_age,
                "GRPC_MAX_CONNECTION_AGE",
                &s.grpc_max_connection_age,
            ),
            (
                &mut grpc_tuning.max_connection_age_grace,
                "GRPC_MAX_CONNECTION_AGE_GRACE",
                &s.grpc_max_connection_age_grace,
            ),
            (
                &mut keepalive,
                "GRPC_KEEPALIVE_INTERVAL",
                &s.grpc_keepalive_interval,
            ),
            (
                &mut grpc_tuning.keepalive_timeout,
                "GRPC_KEEPALIVE_TIMEOUT",
                &s.grpc_keepalive_timeout,
            ),
        ] {
            check(parse_into(slot, name, value, parse_duration));
        }
        grpc_tuning.max_connection_age = (!max_age.is_zero()).then_some(max_age);
        grpc_tuning.keepalive_interval = (!keepalive.is_zero()).then_some(keepalive);
        for (slot, name, value) in [
            (
                &mut grpc_tuning.initial_stream_window_bytes,
                "GRPC_INITIAL_STREAM_WINDOW_BYTES",
                &s.grpc_initial_stream_window_bytes,
            ),
            (
                &mut grpc_tuning.initial_connection_window_bytes,
                "GRPC_INITIAL_CONNECTION_WINDOW_BYTES",
                &s.grpc_initial_connection_window_bytes,
            ),
        ] {
            // RFC 9113 section 6.9.1: at most 2^31-1; below the 65,535 default makes no sense.
            check(parse_into(slot, name, value, |v| {
                parse_in_range(v, 65_535, 2_147_483_647)
            }));
        }
        check(parse_into(
            &mut grpc_tuning.tcp_nodelay,
            "GRPC_TCP_NODELAY",
            &s.grpc_tcp_nodelay,
            parse_bool,
        ));
        check(parse_into(
            &mut grpc_tuning.request_read_timeout,
            "GRPC_REQUEST_READ_TIMEOUT",
            &s.grpc_request_read_timeout,
            |v| {
                let d = parse_duration(v)?;
                if d < Duration::from_millis(1) || d > Duration::from_secs(60) {
                    return Err("must be between 1ms and 60s".into());
                }
                Ok(d)
            },
        ));
        check(parse_into(
            &mut grpc_tuning.tls_max_handshakes,
            "GRPC_TLS_MAX_HANDSHAKES",
            &s.grpc_tls_max_handshakes,
            |v| parse_in_range(v, 1, 65_536),
        ));
        let mut grpc_tls = None;
        match grpc_tls_files(s) {
            Ok(files) => grpc_tls = files,
            Err(problem) => check(Err(problem)),
        }

        let mut metrics_listen_addr = None;
        if !s.metrics_listen_addr.trim().is_empty() {
            check(parse_into(
                &mut metrics_listen_addr,
                "METRICS_LISTEN_ADDR",
                &s.metrics_listen_addr,
                |v| {
                    v.parse()
                        .map(Some)
                        .map_err(|_| "expected host:port, e.g. 0.0.0.0:9090, or empty".into())
                },
            ));
        }
        let mut shutdown = ShutdownConfig {
            drain_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        };
        for (slot, name, value) in [
            (
                &mut shutdown.drain_delay,
                "SHUTDOWN_DRAIN_DELAY",
                &s.shutdown_drain_delay,
            ),
            (
                &mut shutdown.timeout,
                "SHUTDOWN_TIMEOUT",
                &s.shutdown_timeout,
            ),
        ] {
            check(parse_into(slot, name, value, parse_duration));
        }

        let mut file = ConfigFile::default();
        if let Some(path) = &s.config_file {
            check(read_config_file(path).map(|read| file = read));
        }
        let mut warnings = Vec::new();
        let mut allow_http = false;
        check(parse_into(
            &mut allow_http,
            "JWKS_ALLOW_HTTP",
            &s.jwks_allow_http,
            parse_bool,
        ));
        let audiences = split_list(&s.jwt_audience);
        let mut issuers = Vec::new();
        check(read_issuers(s, &audiences, file.issuers).map(|found| issuers = found));
        for issuer in &issuers {
            let Some(url) = key_source_url(issuer) else {
                continue;
            };
            match crate::jwks::insecure_url(&url, allow_http) {
                Some(why) => check(Err(format!("issuer {:?}: {why}", issuer.issuer))),
                None if url.scheme() == "http" && !crate::jwks::is_loopback(&url) => {
                    warnings.push(format!(
                        "issuer {:?}: keys are fetched over plaintext http ({url}): anyone on \
                         the path can replace them (JWKS_ALLOW_HTTP=true)",
                        issuer.issuer
                    ));
                }
                None => {}
            }
        }

        let mut algorithms = Vec::new();
        check(parse_into(
            &mut algorithms,
            "JWT_ALGORITHMS",
            &s.jwt_algorithms,
            parse_algorithms,
        ));
        let mut leeway_seconds = 60;
        check(parse_into(
            &mut leeway_seconds,
            "JWT_LEEWAY_SECONDS",
            &s.jwt_leeway_seconds,
            |v| parse_in_range(v, 0, 600),
        ));
        let mut require_jti = true;
        check(parse_into(
            &mut require_jti,
            "JWT_REQUIRE_JTI",
            &s.jwt_require_jti,
            parse_bool,
        ));
        let mut max_token_bytes = 8192;
        check(parse_into(
            &mut max_token_bytes,
            "JWT_MAX_TOKEN_BYTES",
            &s.jwt_max_token_bytes,
            |v| parse_in_range(v, 256, 65536),
        ));

        let header = s.token_header.trim().to_ascii_lowercase();
        check(valid_header_name(&header).map_err(|e| format!("TOKEN_HEADER: {e}")));
        let cookie = s.token_cookie.trim();
        if cookie.contains([';', '=', ',', ' ']) {
            check(Err(format!(
                "TOKEN_COOKIE: {cookie:?} is not a cookie name"
            )));
        }

        let mut claim_headers = Vec::new();
        check(parse_into(
            &mut claim_headers,
            "CLAIM_HEADERS",
            &s.claim_headers,
            parse_claim_headers,
        ));
        let ignored_route_keys = split_list(&s.context_extensions_ignored);
        if let Some(known) = ignored_route_keys
            .iter()
            .find(|key| crate::route::KNOWN_KEYS.contains(&key.as_str()))
        {
            check(Err(format!(
                "CONTEXT_EXTENSIONS_IGNORED: {known:?} is a key this sidecar reads; it cannot \
                 be ignored"
            )));
        }
        let mut remove_authorization = false;
        check(parse_into(
            &mut remove_authorization,
            "REMOVE_AUTHORIZATION_HEADER",
            &s.remove_authorization_header,
            parse_bool,
        ));

        let mut token_cache = TokenCacheConfig {
            max_entries: 100_000,
            ttl: Duration::from_secs(300),
        };
        check(parse_into(
            &mut token_cache.max_entries,
            "TOKEN_CACHE_MAX_ENTRIES",
            &s.token_cache_max_entries,
            |v| parse_in_range(v, 0, 100_000_000),
        ));
        check(parse_into(
            &mut token_cache.ttl,
            "TOKEN_CACHE_TTL",
            &s.token_cache_ttl,
            parse_duration,
        ));

        let mut durations = [Duration::ZERO; 5];
        let duration_settings = [
            (
                "JWKS_REFRESH_INTERVAL",
                &s.jwks_refresh_interval,
                Duration::from_secs(1),
            ),
            (
                "JWKS_MIN_REFRESH_INTERVAL",
                &s.jwks_min_refresh_interval,
                Duration::ZERO,
            ),
            ("JWKS_MAX_STALE", &s.jwks_max_stale, Duration::from_secs(1)),
            (
                "JWKS_FETCH_TIMEOUT",
                &s.jwks_fetch_timeout,
                Duration::from_millis(10),
            ),
            (
                "FILE_POLL_INTERVAL",
                &s.file_poll_interval,
                Duration::from_millis(10),
            ),
        ];
        for (slot, (name, value, min)) in durations.iter_mut().zip(duration_settings) {
            check(parse_into(slot, name, value, |v| {
                let d = parse_duration(v)?;
                if d < min {
                    return Err(format!("must be at least {min:?}"));
                }
                Ok(d)
            }));
        }
        let [
            refresh_interval,
            min_refresh_interval,
            max_stale,
            fetch_timeout,
            file_poll_interval,
        ] = durations;
        // Zero only when it was given as zero (a value that did not parse is reported above).
        let zero_given = parse_duration(&s.jwks_min_refresh_interval).is_ok_and(|d| d.is_zero());
        if zero_given {
            check(Err(format!(
                "JWKS_MIN_REFRESH_INTERVAL={:?}: 0 lets every token with an unknown kid fetch \
                 the issuer's JWKS, so a flood of forged tokens becomes a flood on the IdP; use \
                 1s or more",
                s.jwks_min_refresh_interval
            )));
        } else if !min_refresh_interval.is_zero() && min_refresh_interval < Duration::from_secs(1) {
            warnings.push(format!(
                "JWKS_MIN_REFRESH_INTERVAL={min_refresh_interval:?}: tokens with unknown kids may \
                 fetch each issuer's JWKS up to {} times a second (meant for tests; use 1s or more)",
                (1.0 / min_refresh_interval.as_secs_f64()).round()
            ));
        }

        let (mut revocation, mut revocation_failure_mode) =
            (RevocationConfig::Memory { file: None }, FailureMode::Closed);
        match revocation_settings(s) {
            Ok(parsed) => (revocation, revocation_failure_mode) = parsed,
            Err(problems) => problems.into_iter().for_each(|p| check(Err(p))),
        }
        let mut rate_limits = None;
        match file.rate_limits.map(RateLimitSection::validate) {
            None => {}
            Some(Ok(limits)) => {
                match (&revocation, limits.backend) {
                    (RevocationConfig::Redis(redis), LimiterBackend::Redis) => {
                        let (limit, revoked) = (&limits.key_prefix, &redis.key_prefix);
                        if limit.starts_with(revoked.as_str())
                            || revoked.starts_with(limit.as_str())
                        {
                            check(Err(format!(
                                "rate_limits: key_prefix {limit:?} overlaps REVOKED_KEY_PREFIX \
                                 {revoked:?}: the limiter would write into revocation keys (and \
                                 every write would be pushed to every sidecar as an \
                                 invalidation); give them prefixes neither of which starts the \
                                 other"
                            )));
                        }
                    }
                    (_, LimiterBackend::Redis) => check(Err(
                        "rate_limits: backend redis rides the revocation Redis pool: \
                         set REVOCATION_BACKEND=redis and REDIS_URL"
                            .into(),
                    )),
                    _ => {}
                }
                rate_limits = Some(limits);
            }
            Some(Err(problems)) => problems.into_iter().for_each(|p| check(Err(p))),
        }

        let format = match s.log_format.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                check(Err(format!(
                    "LOG_FORMAT: {other:?} is not one of: text, json"
                )));
                LogFormat::Text
            }
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log_filter) {
            check(Err(format!("RUST_LOG: {e}")));
        }

        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(Config {
            grpc_listen_addr,
            grpc_tuning,
            grpc_max_concurrent_streams,
            grpc_max_message_bytes,
            max_in_flight,
            grpc_tls,
            worker_threads,
            metrics_listen_addr,
            shutdown,
            issuers,
            jwt: JwtPolicy {
                algorithms,
                leeway_seconds,
                require_jti,
                max_token_bytes,
            },
            token_source: TokenSource {
                header,
                cookie: (!cookie.is_empty()).then(|| cookie.to_owned()),
            },
            token_cache,
            ignored_route_keys,
            upstream: UpstreamHeaders {
                metadata_claims: parse_metadata_claims(&s.dynamic_metadata_claims),
                claim_headers,
                remove_authorization,
            },
            jwks: JwksSettings {
                refresh_interval,
                min_refresh_interval,
                max_stale,
                fetch_timeout,
                file_poll_interval,
                allow_http,
            },
            revocation,
            revocation_failure_mode,
            rate_limits,
            log: LogConfig {
                format,
                filter: s.log_filter.clone(),
            },
            warnings,
        })
    }
}

/// The revocation backend and failure mode alone: what the `revoke` command needs too.
pub fn revocation_settings(s: &Settings) -> Result<(RevocationConfig, FailureMode), Vec<String>> {
    let mut errors = Vec::new();
    let mut check = |result: Result<(), String>| {
        if let Err(e) = result {
            errors.push(e);
        }
    };
    let failure_mode = match s.revocation_failure_mode.trim() {
        "closed" => FailureMode::Closed,
        "open" => FailureMode::Open,
        other => {
            check(Err(format!(
                "REVOCATION_FAILURE_MODE: {other:?} is not one of: closed, open"
            )));
            FailureMode::Closed
        }
    };
    let duration = |name: &str, value: &str, min: Duration| {
        let mut slot = Duration::ZERO;
        parse_into(&mut slot, name, value, |v| {
            let d = parse_duration(v)?;
            if d < min {
                return Err(format!("must be at least {min:?}"));
            }
            Ok(d)
        })
        .map(|()| slot)
    };
    let ms = Duration::from_millis;
    let backend = s.revocation_backend.trim();
    let config = match backend {
        "memory" => RevocationConfig::Memory {
            file: s.revocation_file.clone(),
        },
        "redis" => {
            let mut redis = RedisSettings {
                pool: PoolSettings {
                    url: s.redis_url.trim().to_owned(),
                    pool_size: 2,
                    lookup_timeout: ms(50),
                    write_timeout: ms(2000),
                    read_timeout: ms(2000),
                    connect_timeout: ms(1000),
                    pool_timeout: ms(5000),
                    max_queued_commands: 10_000,
                    breaker_failures: 5,
                    breaker_cooldown: ms(1000),
                },
                key_prefix: s.revoked_key_prefix.clone(),
                subject_ttl: Duration::from_secs(86_400),
                cache_max_entries: 50_000,
                cache_ttl: Duration::from_secs(300),
            };
            let schemes = [
                "redis://",
                "rediss://",
                "redis-sentinel://",
                "redis-cluster://",
                "rediss-cluster://",
                "rediss-sentinel://",
            ];
            if !schemes
                .iter()
                .any(|scheme| redis.pool.url.starts_with(scheme))
            {
                check(Err(format!(
                    "REDIS_URL: {:?} must start with one of {}",
                    redis.pool.url,
                    schemes.join(", ")
                )));
            }
            check(parse_into(
                &mut redis.pool.pool_size,
                "REDIS_POOL_SIZE",
                &s.redis_pool_size,
                |v| parse_in_range(v, 1, 256),
            ));
            if let Some(min_idle) = &s.redis_min_idle_conns {
                let mut n = 0usize;
                check(parse_into(&mut n, "REDIS_MIN_IDLE_CONNS", min_idle, |v| {
                    parse_in_range(v, 0, 256)
                }));
                if n > redis.pool.pool_size {
                    check(Err(format!(
                        "REDIS_MIN_IDLE_CONNS={n} exceeds REDIS_POOL_SIZE={}",
                        redis.pool.pool_size
                    )));
                }
            }
            let timeouts = [
                (
                    &mut redis.pool.pool_timeout,
                    "REDIS_POOL_TIMEOUT",
                    &s.redis_pool_timeout,
                    ms(0),
                ),
                (
                    &mut redis.pool.read_timeout,
                    "REDIS_READ_TIMEOUT",
                    &s.redis_read_timeout,
                    ms(10),
                ),
                (
                    &mut redis.pool.write_timeout,
                    "REDIS_WRITE_TIMEOUT",
                    &s.redis_write_timeout,
                    ms(1),
                ),
                (
                    &mut redis.pool.connect_timeout,
                    "REDIS_CONNECT_TIMEOUT",
                    &s.redis_connect_timeout,
                    ms(1),
                ),
                (
                    &mut redis.pool.lookup_timeout,
                    "REDIS_LOOKUP_TIMEOUT",
                    &s.redis_lookup_timeout,
                    ms(1),
                ),
                (
                    &mut redis.pool.breaker_cooldown,
                    "REDIS_BREAKER_COOLDOWN",
                    &s.redis_breaker_cooldown,
                    ms(1),
                ),
                (
                    &mut redis.subject_ttl,
                    "REVOKED_SUBJECT_TTL",
                    &s.revoked_subject_ttl,
                    Duration::from_secs(1),
                ),
                (
                    &mut redis.cache_ttl,
                    "REVOCATION_CACHE_TTL",
                    &s.revocation_cache_ttl,
                    Duration::from_secs(1),
                ),
            ];
            for (slot, name, value, min) in timeouts {
                match duration(name, value, min) {
                    Ok(d) => *slot = d,
                    Err(e) => check(Err(e)),
                }
            }
            check(parse_into(
                &mut redis.cache_max_entries,
                "REVOCATION_CACHE_MAX_ENTRIES",
                &s.revocation_cache_max_entries,
                |v| parse_in_range(v, 0, 10_000_000),
            ));
            check(parse_into(
                &mut redis.pool.max_queued_commands,
                "REDIS_MAX_QUEUED_COMMANDS",
                &s.redis_max_queued_commands,
                |v| parse_in_range(v, 1, 10_000_000),
            ));
            check(parse_into(
                &mut redis.pool.breaker_failures,
                "REDIS_BREAKER_FAILURES",
                &s.redis_breaker_failures,
                |v| parse_in_range(v, 0, 1_000_000),
            ));
            RevocationConfig::Redis(redis)
        }
        other => {
            check(Err(format!(
                "REVOCATION_BACKEND: {other:?} is not one of: memory, redis"
            )));
            RevocationConfig::Memory { file: None }
        }
    };
    if errors.is_empty() {
        Ok((config, failure_mode))
    } else {
        Err(errors)
    }
}

/// Parses `value` into `slot`, naming the setting in the error.
fn parse_into<T>(
    slot: &mut T,
    name: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<(), String> {
    *slot = parse(value.trim()).map_err(|e| format!("{name}={value:?}: {e}"))?;
    Ok(())
}

/// Default admission limit per worker thread. Measured (BENCHMARKS.md "Overload"): 64 shed
/// Checks at half the peak, because open-loop arrivals come in bursts; 256 shed none up to 75 %
/// of the peak while still bounding the backlog a worker can hold.
const IN_FLIGHT_PER_WORKER: usize = 256;

/// The runtime's worker threads: as configured, else the CPU quota (available_parallelism reads
/// the cgroup limit), so a 200m-CPU pod does not run one busy thread per node core.
pub fn runtime_workers(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The TLS files, loaded once here so a bad certificate is a configuration error at startup.
fn grpc_tls_files(s: &Settings) -> Result<Option<TlsFiles>, String> {
    let set = |path: &Option<PathBuf>| path.clone().filter(|p| !p.as_os_str().is_empty());
    let files = match (
        set(&s.grpc_tls_cert),
        set(&s.grpc_tls_key),
        set(&s.grpc_tls_client_ca),
    ) {
        (None, None, None) => return Ok(None),
        (Some(cert), Some(key), client_ca) => TlsFiles {
            cert,
            key,
            client_ca,
        },
        (None, None, Some(_)) => {
            return Err("GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY".into());
        }
        _ => return Err("set GRPC_TLS_CERT and GRPC_TLS_KEY together".into()),
    };
    crate::tls::load(&files).map_err(|e| format!("GRPC_TLS_*: {e}"))?;
    Ok(Some(files))
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The names of the issuers these settings trust (JWT_ISSUER, or CONFIG_FILE's `issuers`),
/// without validating the rest: what `revoke` checks a subject's issuer against.
pub fn issuer_names(s: &Settings) -> Result<Vec<String>, String> {
    let from_file = match &s.config_file {
        Some(path) => read_config_file(path)?.issuers,
        None => Vec::new(),
    };
    Ok(if from_file.is_empty() {
        split_list(s.jwt_issuer.as_deref().unwrap_or(""))
    } else {
        from_file.into_iter().map(|i| i.issuer).collect()
    })
}

fn read_issuers(
    s: &Settings,
    audiences: &[String],
    from_file: Vec<ConfigFileIssuer>,
) -> Result<Vec<IssuerConfig>, String> {
    let from_env = split_list(s.jwt_issuer.as_deref().unwrap_or(""));
    let issuers = match (from_file.is_empty(), from_env.is_empty()) {
        (false, false) => {
            return Err("set issuers in CONFIG_FILE or in JWT_ISSUER, not both".into());
        }
        (true, true) => {
            return Err("JWT_ISSUER is required (or CONFIG_FILE listing issuers)".into());
        }
        (true, false) => {
            let source = jwks_source(s.jwks_url.clone(), s.jwks_file.clone())
                .map_err(|e| format!("JWKS_URL/JWKS_FILE: {e}"))?;
            from_env
                .into_iter()
                .map(|issuer| IssuerConfig {
                    issuer,
                    audiences: audiences.to_vec(),
                    jwks: source.clone(),
                })
                .collect()
        }
        (false, true) => {
            if s.jwks_url.is_some() || s.jwks_file.is_some() {
                return Err(
                    "JWKS_URL/JWKS_FILE apply to JWT_ISSUER; with CONFIG_FILE set \
                            jwks_url/jwks_file per issuer"
                        .into(),
                );
            }
            from_file
                .into_iter()
                .map(|entry| {
                    if entry.audiences.as_ref().is_some_and(Vec::is_empty) && !audiences.is_empty()
                    {
                        return Err(format!(
                            "CONFIG_FILE issuer {:?}: `audiences: []` would stop checking `aud` \
                             for this issuer although JWT_AUDIENCE is set; omit the line to use \
                             JWT_AUDIENCE, or list this issuer's audiences",
                            entry.issuer
                        ));
                    }
                    let jwks = jwks_source(entry.jwks_url, entry.jwks_file)
                        .map_err(|e| format!("CONFIG_FILE issuer {:?}: {e}", entry.issuer))?;
                    Ok(IssuerConfig {
                        audiences: entry.audiences.unwrap_or_else(|| audiences.to_vec()),
                        issuer: entry.issuer,
                        jwks,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?
        }
    };
    let mut seen = std::collections::HashSet::new();
    for issuer in &issuers {
        if issuer.issuer.is_empty() {
            return Err("an issuer is empty".into());
        }
        if !seen.insert(&issuer.issuer) {
            return Err(format!("issuer {:?} is listed twice", issuer.issuer));
        }
        if issuer.jwks == JwksSource::Discovery && !is_http_url(&issuer.issuer) {
            return Err(format!(
                "issuer {:?} has no JWKS_URL/JWKS_FILE and is not an http(s) URL for discovery",
                issuer.issuer
            ));
        }
    }
    Ok(issuers)
}

/// The URL an issuer's keys are fetched from first: its JWKS URL, or its discovery document.
fn key_source_url(issuer: &IssuerConfig) -> Option<reqwest::Url> {
    let url = match &issuer.jwks {
        JwksSource::Url(url) => url.clone(),
        JwksSource::Discovery => crate::jwks::discovery_url(&issuer.issuer),
        JwksSource::File(_) => return None,
    };
    reqwest::Url::parse(&url).ok()
}

fn read_config_file(path: &PathBuf) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let file: ConfigFile = if is_toml {
        toml::from_str(&text).map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?
    } else {
        serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?
    };
    if file.issuers.is_empty() && file.rate_limits.is_none() {
        return Err(format!(
            "CONFIG_FILE {}: has neither `issuers` nor `rate_limits`",
            path.display()
        ));
    }
    Ok(file)
}

fn jwks_source(url: Option<String>, file: Option<PathBuf>) -> Result<JwksSource, String> {
    match (
        url.filter(|u| !u.is_empty()),
        file.filter(|f| !f.as_os_str().is_empty()),
    ) {
        (Some(_), Some(_)) => Err("set a JWKS URL or a JWKS file, not both".into()),
        (Some(url), None) if is_http_url(&url) => Ok(JwksSource::Url(url)),
        (Some(url), None) => Err(format!("{url:?} is not an http:// or https:// URL")),
        (None, Some(file)) => Ok(JwksSource::File(file)),
        (None, None) => Ok(JwksSource::Discovery),
    }
}

fn is_http_url(value: &str) -> bool {
    reqwest::Url::parse(value).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

fn parse_algorithms(value: &str) -> Result<Vec<Algorithm>, String> {
    let mut algorithms = Vec::new();
    for name in split_list(value) {
        let alg: Algorithm = name
            .parse()
            .map_err(|_| format!("unknown algorithm {name:?}"))?;
        if !ASYMMETRIC_ALGORITHMS.contains(&alg) {
            return Err(format!(
                "{name} is not allowed: only public-key algorithms can use a JWKS"
            ));
        }
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    if algorithms.is_empty() {
        return Err("at least one algorithm is required".into());
    }
    Ok(algorithms)
}

fn parse_claim_headers(value: &str) -> Result<Vec<ClaimHeader>, String> {
    let mut out = Vec::new();
    for pair in split_list(value) {
        let (claim, header) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not claim=header"))?;
        let (claim, header) = (claim.trim(), header.trim().to_ascii_lowercase());
        if claim.is_empty() {
            return Err(format!("{pair:?} names no claim"));
        }
        valid_header_name(&header)?;
        if header == "authorization" || header.starts_with(':') || header == "host" {
            return Err(format!("{header:?} cannot carry a claim"));
        }
        out.push(ClaimHeader {
            claim: claim.to_owned(),
            header,
        });
    }
    Ok(out)
}

fn valid_header_name(name: &str) -> Result<(), String> {
    let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token_char) {
        return Err(format!("{name:?} is not a valid HTTP header name"));
    }
    Ok(())
}

/// `*`: every claim; otherwise the listed names (empty: none).
fn parse_metadata_claims(value: &str) -> MetadataClaims {
    match value.trim() {
        "*" => MetadataClaims::All,
        names => MetadataClaims::Only(split_list(names)),
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_in_range<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    value: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let n: T = value
        .parse()
        .map_err(|_| "expected a whole number".to_string())?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

/// `250ms`, `10s`, `5m`, `24h`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a duration such as 250ms, 10s, 5m or 24h".to_string())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| "duration out of range".to_string())
}

/// HTTP/2 and TCP behaviour of the Check listener (the `GRPC_*` tuning settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTuning {
    /// Also serve on this unix domain socket.
    pub unix_socket: Option<PathBuf>,
    /// `None`: connections live as long as the client keeps them.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
    /// `None`: no server-sent keepalive PINGs.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    pub initial_stream_window_bytes: u32,
    pub initial_connection_window_bytes: u32,
    pub tcp_nodelay: bool,
    /// From a stream's headers to its decoded request, at most.
    pub request_read_timeout: Duration,
    /// TLS handshakes in progress at once.
    pub tls_max_handshakes: usize,
}

impl Default for GrpcTuning {
    /// The documented defaults (the flags' defaults).
    fn default() -> Self {
        GrpcTuning {
            unix_socket: None,
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            initial_stream_window_bytes: 1 << 20,
            initial_connection_window_bytes: 1 << 20,
            tcp_nodelay: true,
            request_read_timeout: Duration::from_millis(100),
            tls_max_handshakes: 256,
        }
    }
}

impl GrpcTuning {
    /// The connection age this process uses: the setting moved by up to 10 % either way, so
    /// replicas started together do not all drop their connections at the same moment.
    pub fn jittered_max_connection_age(&self) -> Option<Duration> {
        let age = self.max_connection_age?;
        let mut byte = [0u8; 1];
        let _ = aws_lc_rs::rand::fill(&mut byte);
        // -10 % .. +10 % in 255 steps.
        let factor = 0.9 + 0.2 * f64::from(byte[0]) / 255.0;
        Some(age.mul_f64(factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_age_jitter_stays_within_ten_percent() {
        let tuning = GrpcTuning {
            max_connection_age: Some(Duration::from_secs(300)),
            ..GrpcTuning::default()
        };
        let ages: Vec<Duration> = (0..200)
            .map(|_| tuning.jittered_max_connection_age().unwrap())
            .collect();
        assert!(
            ages.iter()
                .all(|a| (270.0..=330.0).contains(&a.as_secs_f64()))
        );
        assert!(ages.iter().any(|a| a.as_secs() < 295) && ages.iter().any(|a| a.as_secs() > 305));
        assert_eq!(GrpcTuning::default().jittered_max_connection_age(), None);
    }

    #[test]
    fn the_tuning_defaults_are_the_flags_defaults() {
        let config = Config::from_settings(&settings(&[
            "--jwt-issuer",
            "https://i",
            "--jwks-file",
            "/k",
        ]))
        .unwrap();
        assert_eq!(config.grpc_tuning, GrpcTuning::default());
        let errors = errors(&[
            "--jwt-issuer",
            "https://i",
            "--jwks-file",
            "/k",
            "--grpc-initial-stream-window-bytes",
            "100",
            "--grpc-tcp-nodelay",
            "maybe",
            "--grpc-max-connection-age",
            "soon",
        ]);
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["authz-sidecar"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().settings
    }

    fn errors(args: &[&str]) -> Vec<String> {
        Config::from_settings(&settings(args)).unwrap_err().0
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_with_one_issuer() {
        let config =
            Config::from_settings(&settings(&["--jwt-issuer", "https://id.example"])).unwrap();
        assert_eq!(config.grpc_listen_addr.to_string(), "0.0.0.0:9191");
        assert_eq!(config.issuers.len(), 1);
        assert_eq!(config.issuers[0].jwks, JwksSource::Discovery);
        assert_eq!(config.jwt.algorithms, ASYMMETRIC_ALGORITHMS.to_vec());
        assert_eq!(config.jwt.leeway_seconds, 60);
        assert!(config.jwt.require_jti);
        assert_eq!(config.jwt.max_token_bytes, 8192);
        assert_eq!(config.token_source.header, "authorization");
        assert_eq!(config.token_source.cookie, None);
        assert_eq!(config.upstream.claim_headers.len(), 1);
        assert_eq!(config.jwks.min_refresh_interval, Duration::from_secs(10));
        assert_eq!(config.jwks.max_stale, Duration::from_secs(86400));
        assert_eq!(config.revocation, RevocationConfig::Memory { file: None });
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = errors(&[
            "--grpc-listen-addr",
            "nowhere",
            "--jwt-algorithms",
            "RS256,HS256",
            "--jwt-leeway-seconds=-1",
            "--jwt-require-jti",
            "maybe",
            "--claim-headers",
            "sub",
            "--jwks-max-stale",
            "1d",
            "--revocation-backend",
            "postgres",
            "--log-format",
            "xml",
        ]);
        let joined = problems.join("\n");
        for name in [
            "GRPC_LISTEN_ADDR",
            "JWT_ISSUER",
            "JWT_ALGORITHMS",
            "JWT_LEEWAY_SECONDS",
            "JWT_REQUIRE_JTI",
            "CLAIM_HEADERS",
            "JWKS_MAX_STALE",
            "REVOCATION_BACKEND",
            "LOG_FORMAT",
        ] {
            assert!(joined.contains(name), "{name} missing from:\n{joined}");
        }
        assert_eq!(problems.len(), 9, "{joined}");
    }

    #[test]
    fn jwks_source_rules() {
        let both = errors(&[
            "--jwt-issuer",
            "i",
            "--jwks-url",
            "https://a/j",
            "--jwks-file",
            "f",
        ]);
        assert!(both[0].contains("not both"), "{both:?}");
        let ftp = errors(&["--jwt-issuer", "i", "--jwks-url", "ftp://a/j"]);
        assert!(ftp[0].contains("http"), "{ftp:?}");
        let no_discovery = errors(&["--jwt-issuer", "not-a-url"]);
        assert!(no_discovery[0].contains("discovery"), "{no_discovery:?}");
        let ok = settings(&[
            "--jwt-issuer",
            "a, b",
            "--jwks-file",
            "k.json",
            "--jwt-audience",
            "x,y",
        ]);
        let config = Config::from_settings(&ok).unwrap();
        assert_eq!(config.issuers.len(), 2);
        assert_eq!(config.issuers[1].issuer, "b");
        assert_eq!(
            config.issuers[1].audiences,
            vec!["x".to_string(), "y".to_string()]
        );
        assert_eq!(config.issuers[1].jwks, JwksSource::File("k.json".into()));
    }

    #[test]
    fn config_file_lists_issuers_in_yaml_or_toml() {
        let dir = std::env::temp_dir().join(format!("authz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("issuers.yaml");
        std::fs::write(
            &yaml,
            "issuers:\n  - issuer: https://a.example\n    jwks_url: https://a.example/keys\n    audiences: [api]\n  - issuer: https://b.example\n",
        )
        .unwrap();
        let toml = dir.join("issuers.toml");
        std::fs::write(
            &toml,
            "[[issuers]]\nissuer = \"c\"\njwks_file = \"c.json\"\n",
        )
        .unwrap();
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "issuers:\n  - issuer: x\n    jwks_uri: typo\n").unwrap();

        let path = yaml.to_str().unwrap();
        let config =
            Config::from_settings(&settings(&["--config", path, "--jwt-audience", "d"])).unwrap();
        assert_eq!(config.issuers[0].audiences, vec!["api".to_string()]);
        assert_eq!(
            config.issuers[0].jwks,
            JwksSource::Url("https://a.example/keys".into())
        );
        assert_eq!(
            config.issuers[1].audiences,
            vec!["d".to_string()],
            "falls back to JWT_AUDIENCE"
        );
        assert_eq!(config.issuers[1].jwks, JwksSource::Discovery);

        let config =
            Config::from_settings(&settings(&["--config", toml.to_str().unwrap()])).unwrap();
        assert_eq!(config.issuers[0].jwks, JwksSource::File("c.json".into()));

        let problems = errors(&["--config", bad.to_str().unwrap()]);
        assert!(problems[0].contains("jwks_uri"), "{problems:?}");
        let problems = errors(&["--config", path, "--jwt-issuer", "x"]);
        assert!(problems[0].contains("not both"), "{problems:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn config_file_may_hold_only_rate_limits() {
        let dir = std::env::temp_dir().join(format!("authz-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let local = write(
            "local.yaml",
            "rate_limits:\n  policies:\n    p: {key: global, rate: 1, per: 1s}\n",
        );
        let config = Config::from_settings(&settings(&[
            "--config",
            &local,
            "--jwt-issuer",
            "https://a.example",
        ]))
        .unwrap();
        assert_eq!(config.issuers[0].issuer, "https://a.example");
        let limits = config.rate_limits.unwrap();
        assert_eq!(limits.backend, LimiterBackend::Local);
        assert_eq!(limits.policies[0].name, "p");

        let redis = write(
            "redis.toml",
            "[rate_limits]\nbackend = \"redis\"\n[rate_limits.policies.p]\nkey = \"subject\"\n\
             rate = 1\nper = \"1s\"\n",
        );
        let problems = errors(&["--config", &redis, "--jwt-issuer", "https://a.example"]);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("REVOCATION_BACKEND=redis")),
            "{problems:?}"
        );
        let config = Config::from_settings(&settings(&[
            "--config",
            &redis,
            "--jwt-issuer",
            "https://a.example",
            "--revocation-backend",
            "redis",
            "--redis-url",
            "redis://127.0.0.1:6390",
        ]))
        .unwrap();
        assert_eq!(config.rate_limits.unwrap().backend, LimiterBackend::Redis);

        let empty = write("empty.yaml", "{}\n");
        let problems = errors(&["--config", &empty, "--jwt-issuer", "https://a.example"]);
        assert!(
            problems[0].contains("neither `issuers` nor `rate_limits`"),
            "{problems:?}"
        );
        let bad = write(
            "bad.yaml",
            "rate_limits:\n  policies:\n    p: {key: user, rate: 1, per: 1s}\n",
        );
        let problems = errors(&["--config", &bad, "--jwt-issuer", "https://a.example"]);
        assert!(
            problems[0].starts_with("rate_limits: policy \"p\""),
            "{problems:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn settings_that_switch_off_a_protection_are_refused_or_warned() {
        const BASE: [&str; 4] = ["--jwt-issuer", "https://i.example", "--jwks-file", "/k"];
        fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            let mut args = BASE.to_vec();
            args.extend_from_slice(extra);
            args
        }
        let base = BASE;
        let problems = errors(&with(&["--jwks-min-refresh-interval", "0s"]));
        assert!(
            problems.len() == 1 && problems[0].contains("forged tokens"),
            "{problems:?}"
        );
        let fast =
            Config::from_settings(&settings(&with(&["--jwks-min-refresh-interval", "100ms"])))
                .unwrap();
        assert!(
            fast.warnings[0].contains("JWKS_MIN_REFRESH_INTERVAL"),
            "{:?}",
            fast.warnings
        );
        let defaults = Config::from_settings(&settings(&base)).unwrap();
        assert!(defaults.warnings.is_empty(), "{:?}", defaults.warnings);

        // Plaintext key sources: loopback only, unless JWKS_ALLOW_HTTP says so (and is warned).
        let remote = [
            "--jwt-issuer",
            "https://i.example",
            "--jwks-url",
            "http://keys.example/j",
        ];
        let problems = errors(&remote);
        assert!(problems[0].contains("JWKS_ALLOW_HTTP"), "{problems:?}");
        let mut allowed = remote.to_vec();
        allowed.extend_from_slice(&["--jwks-allow-http", "true"]);
        let config = Config::from_settings(&settings(&allowed)).unwrap();
        assert!(config.jwks.allow_http);
        assert!(
            config.warnings[0].contains("plaintext http"),
            "{:?}",
            config.warnings
        );
        let local = [
            "--jwt-issuer",
            "https://i.example",
            "--jwks-url",
            "http://127.0.0.1:1/j",
        ];
        let config = Config::from_settings(&settings(&local)).unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let problems = errors(&["--jwt-issuer", "http://idp.example"]);
        assert!(
            problems[0].contains("JWKS_ALLOW_HTTP"),
            "discovery too: {problems:?}"
        );

        let dir = std::env::temp_dir().join(format!("authz-protections-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        // `audiences: []` would silently drop JWT_AUDIENCE for that issuer.
        let empty = write(
            "empty-aud.yaml",
            "issuers:\n  - issuer: a\n    jwks_file: a.json\n    audiences: []\n",
        );
        let problems = errors(&["--config", &empty, "--jwt-audience", "api"]);
        assert!(problems[0].contains("audiences: []"), "{problems:?}");
        let config = Config::from_settings(&settings(&["--config", &empty])).unwrap();
        assert!(config.issuers[0].audiences.is_empty(), "nothing to drop");

        // The limiter's keys must not land among the revocation keys.
        let redis = [
            "--revocation-backend",
            "redis",
            "--redis-url",
            "redis://127.0.0.1:6390",
        ];
        for (prefix, overlaps) in [
            ("revoked:", true),
            ("revoked:rl:", true),
            ("rev", true),
            ("ratelimit:", false),
        ] {
            let limits = write(
                "limits.yaml",
                &format!(
                    "rate_limits:\n  backend: redis\n  key_prefix: \"{prefix}\"\n  policies:\n    \
                     p: {{key: global, rate: 1, per: 1s}}\n"
                ),
            );
            let mut args = with(&["--config", &limits]);
            args.extend_from_slice(&redis);
            let result = Config::from_settings(&settings(&args));
            match result {
                Err(ConfigError(problems)) => {
                    assert!(overlaps, "{prefix}: {problems:?}");
                    assert!(problems[0].contains("REVOKED_KEY_PREFIX"), "{problems:?}");
                }
                Ok(_) => assert!(!overlaps, "{prefix} overlaps and was accepted"),
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn claim_headers_are_validated() {
        let ok = parse_claim_headers("sub=x-jwt-sub, email = X-JWT-Email").unwrap();
        assert_eq!(
            ok[1],
            ClaimHeader {
                claim: "email".into(),
                header: "x-jwt-email".into()
            }
        );
        assert!(parse_claim_headers("sub=authorization").is_err());
        assert!(parse_claim_headers("sub=bad header").is_err());
        assert!(parse_claim_headers("=x").is_err());
        assert_eq!(parse_claim_headers("").unwrap(), vec![]);
    }
}
