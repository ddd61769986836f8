//! The only place that reads flags and the environment, and the one place that builds every
//! component's settings from them.
//!
//! Every setting is one clap argument: flag, env var, default, unit and range in its doc, and
//! its parser in `value_parser`. Parsers never stop clap ([`parse::check`]); the builder,
//! [`Config::from_settings`], collects every refused setting and every rule across settings,
//! so a bad deployment gets one message listing every problem (and exits with 64, EX_USAGE)
//! instead of one error per restart. Components receive typed settings structs, declared next
//! to them, and never read the environment.

mod file;
mod issuers;
pub mod parse;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use jsonwebtoken::Algorithm;

use crate::check::request::TokenSource;
use crate::check::response::{ClaimHeader, MetadataClaims, UpstreamHeaders};
use crate::dpop::DpopSettings;
use crate::jwks::JwksSettings;
use crate::jwt::JwtPolicy;
use crate::logout::LogoutSettings;
use crate::rate_limit::RateLimitSection;
use crate::redis::{PoolSettings, RedisTls, is_tls_url};
use crate::revocation::{BackendKind, FailureMode, RedisSettings, RevocationConfig};
pub use crate::server::Config;
use crate::server::{GrpcTuning, ServerSettings, ShutdownConfig};
use crate::tls::TlsFiles;
use crate::token_cache::TokenCacheConfig;
pub use issuers::issuer_names;
use parse::{
    Checked, Problems, boolean, check, duration, duration_from, duration_within, in_range, list,
    one_of, optional_socket_addr, socket_addr, text,
};

const MS: fn(u64) -> Duration = Duration::from_millis;
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Every serving setting, each declared once.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address of the gRPC Check listener.
    #[arg(long, env = "GRPC_LISTEN_ADDR", default_value = "0.0.0.0:9191",
        value_parser = check(socket_addr))]
    pub grpc_listen_addr: Checked<SocketAddr>,

    /// Concurrent Check streams one client connection may open (HTTP/2 SETTINGS); 1-10000.
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value = "100",
        value_parser = check(in_range(1u32, 10_000)))]
    pub grpc_max_concurrent_streams: Checked<u32>,

    /// Runtime worker threads serving Checks; 0 = the container's CPU quota (cgroup-aware,
    /// rounded up). 1 is a current-thread runtime: the least CPU per Check.
    #[arg(long, env = "GRPC_NUM_STREAM_WORKERS", default_value = "0",
        value_parser = check(in_range(0usize, 1024)))]
    pub grpc_num_stream_workers: Checked<usize>,

    /// Checks answered at once; beyond it a Check is shed at once with a 503 `overloaded` deny.
    /// 0 = 256 per runtime worker thread.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = "0",
        value_parser = check(in_range(0usize, 1_000_000)))]
    pub max_in_flight: Checked<usize>,

    /// A unix domain socket to serve Checks on as well, for an Envoy in the same pod (no TCP
    /// stack, no port); empty = none. Always plaintext.
    #[arg(long, env = "GRPC_UNIX_SOCKET", default_value = "", value_parser = check(text))]
    pub grpc_unix_socket: Checked<String>,

    /// Close a client connection after this age (GOAWAY, then `GRPC_MAX_CONNECTION_AGE_GRACE`),
    /// plus or minus 10 % per process, so Envoy's long-lived connections spread onto new
    /// replicas; 0 = never.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE", default_value = "0s",
        value_parser = check(duration))]
    pub grpc_max_connection_age: Checked<Duration>,

    /// How long Checks on a connection closed for its age may take to finish.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE_GRACE", default_value = "10s",
        value_parser = check(duration))]
    pub grpc_max_connection_age_grace: Checked<Duration>,

    /// HTTP/2 PING sent to an idle client this often, to find dead connections; 0 = never.
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", default_value = "30s",
        value_parser = check(duration))]
    pub grpc_keepalive_interval: Checked<Duration>,

    /// A keepalive PING unanswered this long closes the connection.
    #[arg(long, env = "GRPC_KEEPALIVE_TIMEOUT", default_value = "10s",
        value_parser = check(duration))]
    pub grpc_keepalive_timeout: Checked<Duration>,

    /// HTTP/2 initial flow-control window per stream, bytes (65535-2147483647).
    #[arg(long, env = "GRPC_INITIAL_STREAM_WINDOW_BYTES", default_value = "1048576",
        value_parser = check(in_range(65_535u32, 2_147_483_647)))]
    pub grpc_initial_stream_window_bytes: Checked<u32>,

    /// HTTP/2 initial flow-control window per connection, bytes (65535-2147483647).
    #[arg(long, env = "GRPC_INITIAL_CONNECTION_WINDOW_BYTES", default_value = "1048576",
        value_parser = check(in_range(65_535u32, 2_147_483_647)))]
    pub grpc_initial_connection_window_bytes: Checked<u32>,

    /// TCP_NODELAY on Check connections (true|false): small answers leave at once.
    #[arg(long, env = "GRPC_TCP_NODELAY", default_value = "true", value_parser = check(boolean))]
    pub grpc_tcp_nodelay: Checked<bool>,

    /// Largest CheckRequest accepted, bytes (65536-67108864); bigger ones are refused unread.
    #[arg(long, env = "GRPC_MAX_MESSAGE_BYTES", default_value = "4194304",
        value_parser = check(in_range(64usize << 10, 64 << 20)))]
    pub grpc_max_message_bytes: Checked<usize>,

    /// Longest a Check stream may take from its headers to a complete request; a stream that
    /// has not sent its request by then is answered 503 `request_read_timeout` and releases its
    /// MAX_IN_FLIGHT permit (slow-loris clients). Keep it well under Envoy's timeout (250 ms).
    #[arg(long, env = "GRPC_REQUEST_READ_TIMEOUT", default_value = "100ms",
        value_parser = check(duration_within(MS(1), SECS(60))))]
    pub grpc_request_read_timeout: Checked<Duration>,

    /// TLS handshakes in progress at once on the Check listener (1-65536); a connection beyond
    /// it is closed at once, so silent connections cannot pile up handshake tasks.
    #[arg(long, env = "GRPC_TLS_MAX_HANDSHAKES", default_value = "256",
        value_parser = check(in_range(1usize, 65_536)))]
    pub grpc_tls_max_handshakes: Checked<usize>,

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
    #[arg(long, env = "METRICS_LISTEN_ADDR", default_value = "0.0.0.0:9090",
        value_parser = check(optional_socket_addr))]
    pub metrics_listen_addr: Checked<Option<SocketAddr>>,

    /// After SIGTERM/SIGINT: time spent not ready but still answering, so traffic moves away.
    #[arg(long, env = "SHUTDOWN_DRAIN_DELAY", default_value = "5s", value_parser = check(duration))]
    pub shutdown_drain_delay: Checked<Duration>,

    /// After the drain delay: how long in-flight Checks may take before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = check(duration))]
    pub shutdown_timeout: Checked<Duration>,

    /// YAML or TOML file with `issuers` (instead of JWT_ISSUER and JWKS_*), `rate_limits`,
    /// `policies` and `default_policy`; any of them.
    #[arg(long = "config", env = "CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Accepted `iss` values, comma-separated. Each gets its own key set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Accepted `aud` values, comma-separated; empty means `aud` is not checked.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "", value_parser = check(list))]
    pub jwt_audience: Checked<Vec<String>>,

    /// JWKS location (http or https). Without it and JWKS_FILE, keys come from OIDC discovery.
    #[arg(long, env = "JWKS_URL")]
    pub jwks_url: Option<String>,

    /// JWKS file, re-read when it changes.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Allow plaintext `http://` JWKS and discovery URLs to hosts other than loopback
    /// (true|false). Anyone on the path could then replace the keys; warned at startup.
    #[arg(long, env = "JWKS_ALLOW_HTTP", default_value = "false", value_parser = check(boolean))]
    pub jwks_allow_http: Checked<bool>,

    /// Accepted signature algorithms, comma-separated (HMAC and `none` are never accepted).
    #[arg(long, env = "JWT_ALGORITHMS",
        default_value = "RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA",
        value_parser = check(JwtPolicy::parse_algorithms))]
    pub jwt_algorithms: Checked<Vec<Algorithm>>,

    /// Clock skew tolerated on exp/nbf/iat, in seconds (0-600).
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value = "60",
        value_parser = check(in_range(0i64, 600)))]
    pub jwt_leeway_seconds: Checked<i64>,

    /// Deny tokens without a `jti` claim (true|false).
    #[arg(long, env = "JWT_REQUIRE_JTI", default_value = "true", value_parser = check(boolean))]
    pub jwt_require_jti: Checked<bool>,

    /// Require the header's `typ` to be `at+jwt` (RFC 9068 access tokens; true|false): ID
    /// tokens and other JWTs of the same issuer are then denied 401 `wrong_token_type`.
    #[arg(long, env = "JWT_REQUIRE_AT_JWT", default_value = "false", value_parser = check(boolean))]
    pub jwt_require_at_jwt: Checked<bool>,

    /// Longest token accepted, in bytes (256-65536); checked before any parsing.
    #[arg(long, env = "JWT_MAX_TOKEN_BYTES", default_value = "8192",
        value_parser = check(in_range(256usize, 65_536)))]
    pub jwt_max_token_bytes: Checked<usize>,

    /// Request header carrying the token. For `authorization` the Bearer scheme is required.
    #[arg(long, env = "TOKEN_HEADER", default_value = "authorization",
        value_parser = check(parse::header_name))]
    pub token_header: Checked<String>,

    /// Cookie carrying the token, read when the header has none; empty disables cookies.
    #[arg(long, env = "TOKEN_COOKIE", default_value = "",
        value_parser = check(TokenSource::parse_cookie))]
    pub token_cookie: Checked<Option<String>>,

    /// Claims copied to upstream request headers, `claim=header` comma-separated (overwritten,
    /// so a client cannot send its own). An absent claim removes the header.
    #[arg(long, env = "CLAIM_HEADERS", default_value = "sub=x-jwt-sub",
        value_parser = check(ClaimHeader::parse_list))]
    pub claim_headers: Checked<Vec<ClaimHeader>>,

    /// Claims returned to Envoy as dynamic metadata (for access logs and later filters),
    /// comma-separated; `*` = every claim, empty = none. Each one costs Envoy work per request.
    #[arg(long, env = "DYNAMIC_METADATA_CLAIMS", default_value = "iss,sub",
        value_parser = check(MetadataClaims::parse))]
    pub dynamic_metadata_claims: Checked<MetadataClaims>,

    /// `context_extensions` keys meant for others (access-log tags, other filters) that a route
    /// may carry, comma-separated. Any other key this sidecar does not read answers 500
    /// `bad_route_config`, so a typo never removes a requirement.
    #[arg(long, env = "CONTEXT_EXTENSIONS_IGNORED", default_value = "",
        value_parser = check(crate::route::parse_ignored_keys))]
    pub context_extensions_ignored: Checked<Vec<String>>,

    /// Claims an inline `policy` (a CEL rule in a route's context_extensions) may read,
    /// comma-separated; `*` = any claim, empty = inline rules off (`policy_ref` still works).
    /// The verified-token cache keeps these claims (`*`: every claim, about twice the memory
    /// per cached token); an inline rule reading another claim answers 500 `bad_route_config`.
    #[arg(long, env = "POLICY_INLINE_CLAIMS", default_value = "",
        value_parser = check(crate::policy::InlinePolicies::parse))]
    pub policy_inline_claims: Checked<crate::policy::InlinePolicies>,

    /// Dry run on every route (true|false): required scopes, step-up and CEL rules are evaluated
    /// and counted (`ext_authz_dry_run_total`) but do not deny; a valid token passes. A route's
    /// `dry_run` context extension overrides it. Warned at startup: it switches rules off.
    #[arg(long, env = "POLICY_DRY_RUN", default_value = "false", value_parser = check(boolean))]
    pub policy_dry_run: Checked<bool>,

    /// Refuse tokens without a `cnf` sender binding (true|false) on every route; a route's
    /// `require_sender_constraint` overrides. Bound tokens are checked either way.
    #[arg(long, env = "REQUIRE_SENDER_CONSTRAINT", default_value = "false",
        value_parser = check(boolean))]
    pub require_sender_constraint: Checked<bool>,

    /// Decision log: empty = off, `stderr`, or a file path (appended). One JSON line per Check.
    #[arg(long, env = "AUDIT_LOG", default_value = "",
        value_parser = check(crate::audit::AuditSink::parse))]
    pub audit_log: Checked<crate::audit::AuditSink>,

    /// Share of allowed Checks the decision log records, 0-1; denials and failures are always
    /// recorded.
    #[arg(long, env = "AUDIT_ALLOW_SAMPLE", default_value = "1",
        value_parser = check(crate::audit::AuditSettings::parse_sample))]
    pub audit_allow_sample: Checked<f64>,

    /// Decision log records queued for the writer (1-1000000); beyond it records are dropped
    /// and counted, never waited for.
    #[arg(long, env = "AUDIT_QUEUE_RECORDS", default_value = "10000",
        value_parser = check(in_range(1usize, 1_000_000)))]
    pub audit_queue_records: Checked<usize>,

    /// Strip the Authorization header before the request goes upstream (true|false).
    #[arg(long, env = "REMOVE_AUTHORIZATION_HEADER", default_value = "false",
        value_parser = check(boolean))]
    pub remove_authorization_header: Checked<bool>,

    /// Verified tokens kept so a repeated token skips the signature check; 0 disables the cache.
    #[arg(long, env = "TOKEN_CACHE_MAX_ENTRIES", default_value = "100000",
        value_parser = check(in_range(0u64, 100_000_000)))]
    pub token_cache_max_entries: Checked<u64>,

    /// Longest a verified token stays cached (it also leaves at its `exp`).
    #[arg(long, env = "TOKEN_CACHE_TTL", default_value = "5m", value_parser = check(duration))]
    pub token_cache_ttl: Checked<Duration>,

    /// Background JWKS refresh period without Cache-Control max-age, and max-age's upper bound.
    #[arg(long, env = "JWKS_REFRESH_INTERVAL", default_value = "5m",
        value_parser = check(duration_from(SECS(1))))]
    pub jwks_refresh_interval: Checked<Duration>,

    /// Minimum time between two fetches of one issuer's JWKS (rate-limits unknown-kid refetches).
    #[arg(long, env = "JWKS_MIN_REFRESH_INTERVAL", default_value = "10s",
        value_parser = check(JwksSettings::parse_min_refresh_interval))]
    pub jwks_min_refresh_interval: Checked<Duration>,

    /// How long the last good keys keep serving while the JWKS source fails.
    #[arg(long, env = "JWKS_MAX_STALE", default_value = "24h",
        value_parser = check(duration_from(SECS(1))))]
    pub jwks_max_stale: Checked<Duration>,

    /// Timeout of one JWKS or discovery request.
    #[arg(long, env = "JWKS_FETCH_TIMEOUT", default_value = "2s",
        value_parser = check(duration_from(MS(10))))]
    pub jwks_fetch_timeout: Checked<Duration>,

    /// How often JWKS_FILE, REVOCATION_FILE and the GRPC_TLS_* files are checked for changes.
    #[arg(long, env = "FILE_POLL_INTERVAL", default_value = "2s",
        value_parser = check(duration_from(MS(10))))]
    pub file_poll_interval: Checked<Duration>,

    /// Revocation store: `memory` (embedded) or `redis` (shared by every replica).
    #[arg(long, env = "REVOCATION_BACKEND", default_value = "memory",
        value_parser = check(one_of(&[("memory", BackendKind::Memory), ("redis", BackendKind::Redis)])))]
    pub revocation_backend: Checked<BackendKind>,

    /// Revoked jtis/subjects/sessions for the memory backend, re-read when it changes.
    #[arg(long, env = "REVOCATION_FILE")]
    pub revocation_file: Option<PathBuf>,

    /// When the revocation store cannot answer: `closed` denies with 503, `open` allows.
    #[arg(long, env = "REVOCATION_FAILURE_MODE", default_value = "closed",
        value_parser = check(one_of(&[("closed", FailureMode::Closed), ("open", FailureMode::Open)])))]
    pub revocation_failure_mode: Checked<FailureMode>,

    /// Redis for the `redis` backend: redis://, rediss:// (TLS), redis-sentinel://, redis-cluster://.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379",
        value_parser = check(PoolSettings::parse_url))]
    pub redis_url: Checked<String>,

    /// PEM CA bundle a `rediss` server's certificate must chain to (a managed Redis's private
    /// CA); empty: the system roots.
    #[arg(long, env = "REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,

    /// PEM client certificate chain presented to a `rediss` server that asks for one; set
    /// with REDIS_TLS_KEY.
    #[arg(long, env = "REDIS_TLS_CERT")]
    pub redis_tls_cert: Option<PathBuf>,

    /// PEM private key of REDIS_TLS_CERT.
    #[arg(long, env = "REDIS_TLS_KEY")]
    pub redis_tls_key: Option<PathBuf>,

    /// Connections in the Redis pool (1-256); each multiplexes many concurrent lookups.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value = "2",
        value_parser = check(in_range(1usize, 256)))]
    pub redis_pool_size: Checked<usize>,

    /// Accepted for compatibility: every pool connection stays open, so this is always
    /// REDIS_POOL_SIZE in effect. Must not exceed it.
    #[arg(long, env = "REDIS_MIN_IDLE_CONNS", value_parser = check(in_range(0usize, 256)))]
    pub redis_min_idle_conns: Option<Checked<usize>>,

    /// How long startup and `revoke` wait for the Redis pool to connect.
    #[arg(long, env = "REDIS_POOL_TIMEOUT", default_value = "5s", value_parser = check(duration))]
    pub redis_pool_timeout: Checked<Duration>,

    /// A Redis connection with a reply outstanding this long is closed and reconnected.
    #[arg(long, env = "REDIS_READ_TIMEOUT", default_value = "2s",
        value_parser = check(duration_from(MS(10))))]
    pub redis_read_timeout: Checked<Duration>,

    /// Timeout of Redis commands other than lookups (revocation writes).
    #[arg(long, env = "REDIS_WRITE_TIMEOUT", default_value = "2s",
        value_parser = check(duration_from(MS(1))))]
    pub redis_write_timeout: Checked<Duration>,

    /// Timeout of one Redis connection attempt (TCP, TLS, AUTH).
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT", default_value = "1s",
        value_parser = check(duration_from(MS(1))))]
    pub redis_connect_timeout: Checked<Duration>,

    /// Budget of one Check's revocation lookup; keep it well inside Envoy's timeout (200 ms).
    #[arg(long, env = "REDIS_LOOKUP_TIMEOUT", default_value = "50ms",
        value_parser = check(duration_from(MS(1))))]
    pub redis_lookup_timeout: Checked<Duration>,

    /// Redis commands queued per connection before new ones fail at once (backpressure).
    #[arg(long, env = "REDIS_MAX_QUEUED_COMMANDS", default_value = "10000",
        value_parser = check(in_range(1usize, 10_000_000)))]
    pub redis_max_queued_commands: Checked<usize>,

    /// Consecutive failed lookups that open the circuit breaker (0 disables it).
    #[arg(long, env = "REDIS_BREAKER_FAILURES", default_value = "5",
        value_parser = check(in_range(0u32, 1_000_000)))]
    pub redis_breaker_failures: Checked<u32>,

    /// How long an open breaker fails lookups at once before one probe goes to Redis.
    #[arg(long, env = "REDIS_BREAKER_COOLDOWN", default_value = "1s",
        value_parser = check(duration_from(MS(1))))]
    pub redis_breaker_cooldown: Checked<Duration>,

    /// Prefix of every revocation key in Redis. No hash tag on a Cluster: without one the keys
    /// spread over every shard (a hash tag puts them all on one).
    #[arg(long, env = "REVOKED_KEY_PREFIX", default_value = "revoked:")]
    pub revoked_key_prefix: String,

    /// `revoke` with the Redis backend: after writing, wait until this many replicas have the
    /// revocation (Redis WAIT) and exit 1 if fewer did; 0 does not wait. A revocation only the
    /// master held is lost if it fails over before replicating.
    #[arg(long, env = "REVOKE_WAIT_REPLICAS", default_value = "0", global = true,
        value_parser = check(in_range(0u32, 100)))]
    pub revoke_wait_replicas: Checked<u32>,

    /// `revoke`: the longest REVOKE_WAIT_REPLICAS waits for the replicas.
    #[arg(long, env = "REVOKE_WAIT_TIMEOUT", default_value = "1s", global = true,
        value_parser = check(duration_within(MS(1), SECS(60))))]
    pub revoke_wait_timeout: Checked<Duration>,

    /// How long a subject/session revocation is kept in Redis: at least the longest token lifetime.
    #[arg(long, env = "REVOKED_SUBJECT_TTL", default_value = "24h",
        value_parser = check(duration_from(SECS(1))))]
    pub revoked_subject_ttl: Checked<Duration>,

    /// Redis backend: revocation keys held in-process, kept true by Redis's invalidation pushes
    /// (RESP3 CLIENT TRACKING); 0 reads Redis on every Check.
    #[arg(long, env = "REVOCATION_CACHE_MAX_ENTRIES", default_value = "50000",
        value_parser = check(in_range(0u64, 10_000_000)))]
    pub revocation_cache_max_entries: Checked<u64>,

    /// Redis backend: longest a cached revocation value is used before it is read again.
    #[arg(long, env = "REVOCATION_CACHE_TTL", default_value = "5m",
        value_parser = check(duration_from(SECS(1))))]
    pub revocation_cache_ttl: Checked<Duration>,

    /// Address of the OpenID Connect Back-Channel Logout listener (POST /backchannel-logout);
    /// empty = off. Its own listener: the identity provider must reach it.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_LISTEN_ADDR", default_value = "",
        value_parser = check(optional_socket_addr))]
    pub backchannel_logout_listen_addr: Checked<Option<SocketAddr>>,

    /// The `aud` a logout token must contain: this relying party's client id at the identity
    /// provider. Required when the logout listener is on.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_CLIENT_ID", default_value = "", value_parser = check(text))]
    pub backchannel_logout_client_id: Checked<String>,

    /// Issuers whose logout tokens are accepted, comma-separated; each must be a trusted
    /// issuer (JWT_ISSUER or CONFIG_FILE). Empty = every trusted issuer.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_ISSUERS", default_value = "", value_parser = check(list))]
    pub backchannel_logout_issuers: Checked<Vec<String>>,

    /// Oldest logout token accepted, by `iat` (1s-1h); `jti`s are remembered this long plus
    /// twice JWT_LEEWAY_SECONDS.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_MAX_AGE", default_value = "5m",
        value_parser = check(duration_within(SECS(1), SECS(3600))))]
    pub backchannel_logout_max_age: Checked<Duration>,

    /// Largest logout request body read, bytes (1024-1048576); a bigger one is answered 413.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_MAX_BODY_BYTES", default_value = "16384",
        value_parser = check(in_range(1024usize, 1 << 20)))]
    pub backchannel_logout_max_body_bytes: Checked<usize>,

    /// Logout requests answered per second, in bursts of as many (1-100000); beyond it, 429.
    #[arg(long, env = "BACKCHANNEL_LOGOUT_RATE_LIMIT", default_value = "50",
        value_parser = check(in_range(1u32, 100_000)))]
    pub backchannel_logout_rate_limit: Checked<u32>,

    /// Logout token `jti`s remembered in process for the replay check (1000-10000000).
    #[arg(long, env = "BACKCHANNEL_LOGOUT_REPLAY_CACHE_MAX_ENTRIES", default_value = "100000",
        value_parser = check(in_range(1000u64, 10_000_000)))]
    pub backchannel_logout_replay_cache_max_entries: Checked<u64>,

    /// Redis backend: prefix of the shared logout `jti` replay keys (SET NX with expiry); must
    /// not start with REVOKED_KEY_PREFIX (the revocation cache would track them).
    #[arg(
        long,
        env = "BACKCHANNEL_LOGOUT_REPLAY_KEY_PREFIX",
        default_value = "logout-jti:"
    )]
    pub backchannel_logout_replay_key_prefix: String,

    /// Oldest DPoP proof accepted, by its `iat` (1s-10m); proof `jti`s are remembered this long
    /// plus JWT_LEEWAY_SECONDS (which is also how far ahead an `iat` may be).
    #[arg(long, env = "DPOP_PROOF_MAX_AGE", default_value = "60s",
        value_parser = check(duration_within(SECS(1), SECS(600))))]
    pub dpop_proof_max_age: Checked<Duration>,

    /// DPoP proof `jti`s remembered in process for the replay check (1000-10000000); size it
    /// to the DPoP requests of one window (DPOP_PROOF_MAX_AGE plus leeway): when full, some
    /// are forgotten early, and only Redis still catches their replay.
    #[arg(long, env = "DPOP_REPLAY_CACHE_MAX_ENTRIES", default_value = "100000",
        value_parser = check(in_range(1000u64, 10_000_000)))]
    pub dpop_replay_cache_max_entries: Checked<u64>,

    /// Redis backend: prefix of the shared DPoP proof `jti` replay keys (SET NX with expiry);
    /// must not overlap REVOKED_KEY_PREFIX or BACKCHANNEL_LOGOUT_REPLAY_KEY_PREFIX.
    #[arg(long, env = "DPOP_REPLAY_KEY_PREFIX", default_value = "dpop-jti:")]
    pub dpop_replay_key_prefix: String,

    /// Read the scheme a DPoP proof's `htu` is compared with from `x-forwarded-proto`
    /// (true|false): only when a TLS terminator in front of Envoy sets it and Envoy keeps it
    /// (`use_remote_address`/`xff_num_trusted_hops`); else the scheme of Envoy's own listener.
    #[arg(long, env = "DPOP_TRUST_FORWARDED_PROTO", default_value = "false",
        value_parser = check(boolean))]
    pub dpop_trust_forwarded_proto: Checked<bool>,

    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text",
        value_parser = check(one_of(&[("text", LogFormat::Text), ("json", LogFormat::Json)])))]
    pub log_format: Checked<LogFormat>,

    /// Log filter in tracing's EnvFilter syntax (e.g. `info,authz_sidecar=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info", value_parser = check(log_filter))]
    pub log_filter: Checked<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// In tracing's EnvFilter syntax, already checked.
    pub filter: String,
}

impl LogConfig {
    /// The logging settings alone: the process sets logging up before anything else.
    pub fn from_settings(s: &Settings) -> Result<LogConfig, ConfigError> {
        let mut p = Problems::default();
        let log = log_settings(s, &mut p);
        match p.0.is_empty() {
            true => Ok(log),
            false => Err(ConfigError(p.0)),
        }
    }
}

fn log_settings(s: &Settings, p: &mut Problems) -> LogConfig {
    LogConfig {
        format: p.take(&s.log_format),
        filter: p.take(&s.log_filter),
    }
}

fn log_filter(value: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(value)
        .map(|_| value.to_owned())
        .map_err(|e| e.to_string())
}

impl Settings {
    /// The settings from `NAME=value` pairs named by their env vars, and nothing else: the
    /// process environment and the command line are not read. For the Envoy module, whose
    /// filter config carries the sidecar's env vars as keys. A name that is not a setting is
    /// refused, as clap refuses an unknown flag.
    pub fn from_env_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Settings, ConfigError> {
        use clap::{Command, FromArgMatches};
        let mut flags = std::collections::HashMap::new();
        // The env names become flags; the env itself is never consulted.
        let command = Settings::augment_args(Command::new("authz-sidecar").no_binary_name(true))
            .mut_args(|arg| {
                if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
                    flags.insert(env.to_string_lossy().into_owned(), long.to_owned());
                }
                arg.env(None)
            });
        let mut args = Vec::new();
        let mut unknown = Vec::new();
        for (name, value) in pairs {
            match flags.get(name) {
                Some(long) => args.push(format!("--{long}={value}")),
                None => unknown.push(format!("{name}: not a setting")),
            }
        }
        if !unknown.is_empty() {
            return Err(ConfigError(unknown));
        }
        command
            .try_get_matches_from(args)
            .and_then(|matches| Settings::from_arg_matches(&matches))
            .map_err(|e| ConfigError(vec![e.to_string().trim().to_owned()]))
    }
}

/// Every problem found in the settings, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let mut warnings = Vec::new();
        let server = server_settings(s, &mut p);

        let file = match &s.config_file {
            Some(path) => p.note(file::read(path)).unwrap_or_default(),
            None => file::ConfigFile::default(),
        };
        let audiences = p.take(&s.jwt_audience);
        let allow_http = p.take(&s.jwks_allow_http);
        let issuers = p
            .note(issuers::read(s, &audiences, file.issuers))
            .unwrap_or_default();
        for issuer in &issuers {
            match issuers::plaintext_key_source(issuer, allow_http) {
                Ok(Some(warning)) => warnings.push(warning),
                Ok(None) => {}
                Err(problem) => p.add(problem),
            }
        }

        let jwt = JwtPolicy {
            algorithms: p.take(&s.jwt_algorithms),
            leeway_seconds: p.take(&s.jwt_leeway_seconds),
            require_jti: p.take(&s.jwt_require_jti),
            max_token_bytes: p.take(&s.jwt_max_token_bytes),
            require_at_jwt: p.take(&s.jwt_require_at_jwt),
        };
        let token_source = TokenSource {
            header: p.take(&s.token_header),
            cookie: p.take(&s.token_cookie),
        };
        let upstream = UpstreamHeaders {
            claim_headers: p.take(&s.claim_headers),
            remove_authorization: p.take(&s.remove_authorization_header),
            metadata_claims: p
                .get(&s.dynamic_metadata_claims)
                .unwrap_or(MetadataClaims::All),
        };
        let token_cache = TokenCacheConfig {
            max_entries: p.take(&s.token_cache_max_entries),
            ttl: p.take(&s.token_cache_ttl),
        };
        let jwks = JwksSettings {
            refresh_interval: p.take(&s.jwks_refresh_interval),
            min_refresh_interval: p.take(&s.jwks_min_refresh_interval),
            max_stale: p.take(&s.jwks_max_stale),
            fetch_timeout: p.take(&s.jwks_fetch_timeout),
            file_poll_interval: p.take(&s.file_poll_interval),
            allow_http,
        };
        warnings.extend(jwks.warnings());

        let (revocation, revocation_failure_mode) = revocation_with(s, &mut p);
        let rate_limits = file
            .rate_limits
            .map(RateLimitSection::validate)
            .and_then(|section| section.map_err(|problems| p.0.extend(problems)).ok());
        if let Some(limits) = &rate_limits {
            p.note(limits.fits(&revocation));
        }
        let policies = crate::policy::PolicyConfig::build(
            file.policies,
            file.default_policy,
            p.take(&s.policy_inline_claims),
        )
        .map_err(|problems| p.0.extend(problems))
        .unwrap_or_default();
        let dry_run = p.take(&s.policy_dry_run);
        if dry_run {
            warnings.push(
                "POLICY_DRY_RUN=true: required scopes, step-up and CEL rules are only recorded; \
                 any valid token passes on routes without `dry_run: false`"
                    .into(),
            );
        }
        let require_sender_constraint = p.take(&s.require_sender_constraint);
        let audit = crate::audit::AuditSettings {
            sink: p.take(&s.audit_log),
            allow_sample: p.take(&s.audit_allow_sample),
            queue_records: p.take(&s.audit_queue_records),
        };
        let logout = logout_settings(s, &issuers, &server, &revocation, &mut p);
        let dpop = dpop_settings(s, &revocation, &mut p);
        // Read by the caller on its own; checked here so every problem is reported together.
        log_settings(s, &mut p);
        let ignored_route_keys = p.take(&s.context_extensions_ignored);

        if !p.0.is_empty() {
            return Err(ConfigError(p.0));
        }
        Ok(Config {
            server,
            issuers,
            jwt,
            token_source,
            upstream,
            ignored_route_keys,
            token_cache,
            jwks,
            revocation,
            revocation_failure_mode,
            rate_limits,
            policies,
            dry_run,
            audit,
            logout,
            require_sender_constraint,
            dpop,
            warnings,
        })
    }
}

/// The back-channel logout endpoint: `None` when off. Every setting is checked either way,
/// and a combination that cannot work is a problem.
fn logout_settings(
    s: &Settings,
    issuers: &[crate::jwks::IssuerConfig],
    server: &ServerSettings,
    revocation: &RevocationConfig,
    p: &mut Problems,
) -> Option<LogoutSettings> {
    let listen_addr = p.take(&s.backchannel_logout_listen_addr);
    let client_id = p.take(&s.backchannel_logout_client_id);
    let narrowed = p.take(&s.backchannel_logout_issuers);
    let max_age = p.take(&s.backchannel_logout_max_age);
    let max_body_bytes = p.take(&s.backchannel_logout_max_body_bytes);
    let rate_per_second = p.take(&s.backchannel_logout_rate_limit);
    let replay_cache_max_entries = p.take(&s.backchannel_logout_replay_cache_max_entries);
    let replay_key_prefix = s.backchannel_logout_replay_key_prefix.clone();
    let Some(listen_addr) = listen_addr else {
        if !client_id.is_empty() || !narrowed.is_empty() {
            p.add(
                "BACKCHANNEL_LOGOUT_CLIENT_ID/BACKCHANNEL_LOGOUT_ISSUERS are set but                  BACKCHANNEL_LOGOUT_LISTEN_ADDR is empty: the logout endpoint is off; set its                  address or unset them",
            );
        }
        return None;
    };
    if client_id.is_empty() {
        p.add(
            "BACKCHANNEL_LOGOUT_LISTEN_ADDR is set but BACKCHANNEL_LOGOUT_CLIENT_ID is empty:              a logout token's aud must be checked against this client's id at the identity              provider",
        );
    }
    if [Some(server.listen_addr), server.metrics_listen_addr].contains(&Some(listen_addr))
        && listen_addr.port() != 0
    {
        p.add(format!(
            "BACKCHANNEL_LOGOUT_LISTEN_ADDR={listen_addr} is also GRPC_LISTEN_ADDR or              METRICS_LISTEN_ADDR: give the logout endpoint a listener of its own"
        ));
    }
    let trusted: Vec<String> = issuers.iter().map(|i| i.issuer.clone()).collect();
    for issuer in &narrowed {
        if !trusted.contains(issuer) {
            p.add(format!(
                "BACKCHANNEL_LOGOUT_ISSUERS names {issuer:?}, which is not a trusted issuer                  (JWT_ISSUER or CONFIG_FILE): its keys are not loaded, so none of its logout                  tokens could be verified"
            ));
        }
    }
    if let RevocationConfig::Redis(redis) = revocation {
        if replay_key_prefix.is_empty() {
            p.add("BACKCHANNEL_LOGOUT_REPLAY_KEY_PREFIX is empty");
        } else if replay_key_prefix.starts_with(&redis.key_prefix)
            || redis.key_prefix.starts_with(&replay_key_prefix)
        {
            p.add(format!(
                "BACKCHANNEL_LOGOUT_REPLAY_KEY_PREFIX={replay_key_prefix:?} overlaps                  REVOKED_KEY_PREFIX={:?}: replay keys would be read as revocations",
                redis.key_prefix
            ));
        }
    }
    Some(LogoutSettings {
        listen_addr,
        client_id,
        issuers: if narrowed.is_empty() {
            trusted
        } else {
            narrowed
        },
        max_age,
        max_body_bytes,
        rate_per_second,
        replay_cache_max_entries,
        replay_key_prefix,
    })
}

/// DPoP proof checks (always on: they apply to DPoP-bound tokens only). With the Redis backend
/// the replay keys must not fall under another prefix the sidecar reads.
fn dpop_settings(s: &Settings, revocation: &RevocationConfig, p: &mut Problems) -> DpopSettings {
    let settings = DpopSettings {
        proof_max_age: p.take(&s.dpop_proof_max_age),
        replay_cache_max_entries: p.take(&s.dpop_replay_cache_max_entries),
        replay_key_prefix: s.dpop_replay_key_prefix.clone(),
        trust_forwarded_proto: p.take(&s.dpop_trust_forwarded_proto),
    };
    if let RevocationConfig::Redis(redis) = revocation {
        let prefix = &settings.replay_key_prefix;
        let overlaps =
            |other: &str| prefix.starts_with(other) || other.starts_with(prefix.as_str());
        if prefix.is_empty() {
            p.add("DPOP_REPLAY_KEY_PREFIX is empty");
        } else if overlaps(&redis.key_prefix) {
            p.add(format!(
                "DPOP_REPLAY_KEY_PREFIX={prefix:?} overlaps REVOKED_KEY_PREFIX={:?}: replay keys \
                 would be read as revocations",
                redis.key_prefix
            ));
        } else if overlaps(&s.backchannel_logout_replay_key_prefix) {
            p.add(format!(
                "DPOP_REPLAY_KEY_PREFIX={prefix:?} overlaps \
                 BACKCHANNEL_LOGOUT_REPLAY_KEY_PREFIX={:?}: the two replay checks would share keys",
                s.backchannel_logout_replay_key_prefix
            ));
        }
    }
    settings
}

/// The Check and metrics listeners, their HTTP/2, TLS and shutdown settings.
fn server_settings(s: &Settings, p: &mut Problems) -> ServerSettings {
    let workers = p.take(&s.grpc_num_stream_workers);
    let worker_threads = (workers > 0).then_some(workers);
    let max_in_flight = match p.take(&s.max_in_flight) {
        0 => crate::server::default_max_in_flight(worker_threads),
        n => n,
    };
    let unix_socket = p.take(&s.grpc_unix_socket);
    let max_age = p.take(&s.grpc_max_connection_age);
    let keepalive = p.take(&s.grpc_keepalive_interval);
    let tuning = GrpcTuning {
        unix_socket: (!unix_socket.is_empty()).then(|| PathBuf::from(unix_socket)),
        max_connection_age: (!max_age.is_zero()).then_some(max_age),
        max_connection_age_grace: p.take(&s.grpc_max_connection_age_grace),
        keepalive_interval: (!keepalive.is_zero()).then_some(keepalive),
        keepalive_timeout: p.take(&s.grpc_keepalive_timeout),
        initial_stream_window_bytes: p.take(&s.grpc_initial_stream_window_bytes),
        initial_connection_window_bytes: p.take(&s.grpc_initial_connection_window_bytes),
        tcp_nodelay: p.take(&s.grpc_tcp_nodelay),
        request_read_timeout: p.take(&s.grpc_request_read_timeout),
        tls_max_handshakes: p.take(&s.grpc_tls_max_handshakes),
    };
    ServerSettings {
        listen_addr: p
            .get(&s.grpc_listen_addr)
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        max_concurrent_streams: p.take(&s.grpc_max_concurrent_streams),
        max_message_bytes: p.take(&s.grpc_max_message_bytes),
        max_in_flight,
        worker_threads,
        tuning,
        tls: p.note(grpc_tls_files(s)).flatten(),
        metrics_listen_addr: p.take(&s.metrics_listen_addr),
        shutdown: ShutdownConfig {
            drain_delay: p.take(&s.shutdown_drain_delay),
            timeout: p.take(&s.shutdown_timeout),
        },
    }
}

/// The revocation backend and failure mode alone: what the `revoke` command needs too.
pub fn revocation_settings(s: &Settings) -> Result<(RevocationConfig, FailureMode), Vec<String>> {
    let mut p = Problems::default();
    let revocation = revocation_with(s, &mut p);
    if p.0.is_empty() {
        Ok(revocation)
    } else {
        Err(p.0)
    }
}

/// The Redis settings are read, and their problems reported, only with the Redis backend.
fn revocation_with(s: &Settings, p: &mut Problems) -> (RevocationConfig, FailureMode) {
    let failure_mode = p.take(&s.revocation_failure_mode);
    if p.take(&s.revocation_backend) == BackendKind::Memory {
        let file = s.revocation_file.clone();
        return (RevocationConfig::Memory { file }, failure_mode);
    }
    let pool = PoolSettings {
        url: p.take(&s.redis_url),
        pool_size: p.take(&s.redis_pool_size),
        lookup_timeout: p.take(&s.redis_lookup_timeout),
        write_timeout: p.take(&s.redis_write_timeout),
        read_timeout: p.take(&s.redis_read_timeout),
        connect_timeout: p.take(&s.redis_connect_timeout),
        pool_timeout: p.take(&s.redis_pool_timeout),
        max_queued_commands: p.take(&s.redis_max_queued_commands),
        breaker_failures: p.take(&s.redis_breaker_failures),
        breaker_cooldown: p.take(&s.redis_breaker_cooldown),
        tls: redis_tls(s, p),
    };
    if let Some(min_idle) = s.redis_min_idle_conns.as_ref().and_then(|n| p.get(n))
        && min_idle > pool.pool_size
    {
        p.add(format!(
            "REDIS_MIN_IDLE_CONNS={min_idle} exceeds REDIS_POOL_SIZE={}",
            pool.pool_size
        ));
    }
    let redis = RedisSettings {
        pool,
        key_prefix: s.revoked_key_prefix.clone(),
        subject_ttl: p.take(&s.revoked_subject_ttl),
        cache_max_entries: p.take(&s.revocation_cache_max_entries),
        cache_ttl: p.take(&s.revocation_cache_ttl),
    };
    (RevocationConfig::Redis(redis), failure_mode)
}

/// The `REDIS_TLS_*` files, loaded once here so a bad file is a configuration error at
/// startup, and refused beside a URL without TLS (they would be ignored silently).
fn redis_tls(s: &Settings, p: &mut Problems) -> Option<RedisTls> {
    let set = |path: &Option<PathBuf>| path.clone().filter(|p| !p.as_os_str().is_empty());
    let client = match (set(&s.redis_tls_cert), set(&s.redis_tls_key)) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => {
            p.add("REDIS_TLS_CERT and REDIS_TLS_KEY must be set together");
            return None;
        }
    };
    let tls = RedisTls {
        ca: set(&s.redis_tls_ca),
        client,
    };
    if tls.ca.is_none() && tls.client.is_none() {
        return None;
    }
    let url = p.get(&s.redis_url)?;
    if !is_tls_url(&url) {
        p.add(format!(
            "REDIS_TLS_CA/REDIS_TLS_CERT/REDIS_TLS_KEY are set but REDIS_URL ({}://...) does \
             not use TLS: use rediss://, rediss-cluster:// or rediss-sentinel://",
            url.split("://").next().unwrap_or_default()
        ));
        return None;
    }
    if let Err(problem) = tls.load() {
        p.add(problem);
        return None;
    }
    Some(tls)
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwks::JwksSource;
    use crate::keys::ASYMMETRIC_ALGORITHMS;
    use crate::rate_limit::LimiterBackend;
    use clap::Parser;

    #[test]
    fn settings_from_env_pairs_read_the_pairs_and_refuse_unknown_names() {
        let settings = Settings::from_env_pairs([
            ("JWT_ISSUER", "https://i"),
            ("JWKS_FILE", "/k"),
            ("GRPC_MAX_CONCURRENT_STREAMS", "7"),
        ])
        .unwrap();
        let config = Config::from_settings(&settings).unwrap();
        assert_eq!(config.issuers[0].issuer, "https://i");
        assert_eq!(config.server.max_concurrent_streams, 7);
        // Unset names keep their documented defaults, whatever the process environment says.
        assert_eq!(config.server.listen_addr.port(), 9191);
        let refused = Settings::from_env_pairs([("JWT_ISSUER", "x"), ("JWKS_URLL", "y")])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("JWKS_URLL: not a setting"), "{refused}");
        let bad = Settings::from_env_pairs([("GRPC_MAX_CONCURRENT_STREAMS", "0")])
            .and_then(|s| Config::from_settings(&s))
            .unwrap_err()
            .to_string();
        assert!(
            bad.to_uppercase().contains("GRPC_MAX_CONCURRENT_STREAMS"),
            "{bad}"
        );
    }

    #[test]
    fn bad_tuning_settings_are_each_reported() {
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
        crate::cli::Cli::try_parse_from(argv).unwrap().settings
    }

    fn errors(args: &[&str]) -> Vec<String> {
        Config::from_settings(&settings(args)).unwrap_err().0
    }

    #[test]
    fn defaults_with_one_issuer() {
        let config =
            Config::from_settings(&settings(&["--jwt-issuer", "https://id.example"])).unwrap();
        assert_eq!(config.server.listen_addr.to_string(), "0.0.0.0:9191");
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
            problems[0].contains("neither `issuers` nor `rate_limits` nor `policies`"),
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

        // On a Cluster one Check's buckets must share a slot: a hash tag in the prefix.
        let cluster = [
            "--revocation-backend",
            "redis",
            "--redis-url",
            "redis-cluster://127.0.0.1:7000",
        ];
        for (prefix, accepted) in [("ratelimit:", false), ("{ratelimit}:", true)] {
            let limits = write(
                "cluster-limits.yaml",
                &format!(
                    "rate_limits:\n  backend: redis\n  key_prefix: \"{prefix}\"\n  policies:\n    \
                     p: {{key: global, rate: 1, per: 1s}}\n"
                ),
            );
            let mut args = with(&["--config", &limits]);
            args.extend_from_slice(&cluster);
            match Config::from_settings(&settings(&args)) {
                Err(ConfigError(problems)) => {
                    assert!(!accepted, "{prefix}: {problems:?}");
                    assert!(problems[0].contains("hash tag"), "{problems:?}");
                }
                Ok(_) => assert!(accepted, "{prefix} on a Cluster was accepted"),
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn connection_age_jitter_stays_within_ten_percent() {
        let with_age = |args: &[&str]| {
            let mut all = vec!["--jwt-issuer", "https://i", "--jwks-file", "/k"];
            all.extend_from_slice(args);
            Config::from_settings(&settings(&all))
                .unwrap()
                .server
                .tuning
        };
        let tuning = with_age(&["--grpc-max-connection-age", "300s"]);
        let ages: Vec<Duration> = (0..200)
            .map(|_| tuning.jittered_max_connection_age().unwrap())
            .collect();
        assert!(
            ages.iter()
                .all(|a| (270.0..=330.0).contains(&a.as_secs_f64()))
        );
        assert!(ages.iter().any(|a| a.as_secs() < 295) && ages.iter().any(|a| a.as_secs() > 305));
        assert_eq!(with_age(&[]).jittered_max_connection_age(), None);
    }

    #[test]
    fn every_default_is_a_valid_value_for_either_backend() {
        for backend in ["memory", "redis"] {
            let args = [
                "--jwt-issuer",
                "https://i.example",
                "--revocation-backend",
                backend,
            ];
            let config = Config::from_settings(&settings(&args));
            assert!(config.is_ok(), "{backend}: {:?}", config.err());
        }
    }
}
