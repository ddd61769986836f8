//! Wiring: builds the components from a [`Config`] and serves until the shutdown future
//! resolves. Tests call the same [`run`] as `main`, on `127.0.0.1:0` listeners.
//!
//! Shutdown drains in two steps so a rollout loses no Check: at the signal, readiness and
//! gRPC health turn NOT_SERVING while Checks are still answered for `SHUTDOWN_DRAIN_DELAY`
//! (endpoints and Envoy stop sending); then the listener closes and in-flight Checks get up
//! to `SHUTDOWN_TIMEOUT` to finish.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::admission::{AdmissionLayer, LateAnswer};
use crate::audit::{AuditLog, AuditSettings};
use crate::authorizer::{Authorizer, Issuer};
use crate::binding::SenderConstraint;
use crate::check::CheckService;
use crate::check::request::TokenSource;
use crate::check::response::UpstreamHeaders;
use crate::claims::{KeptClaims, ReadsClaims};
use crate::decision::CheckError;
use crate::dpop::{DpopSettings, DpopVerifier};
use crate::health::{Health, set_grpc_status};
use crate::jwks::IssuerKeys;
use crate::jwks::{IssuerConfig, JwksSettings};
use crate::jwt::JwtPolicy;
use crate::listener::Connection;
use crate::logout::{LogoutEndpoint, LogoutSettings};
use crate::metrics::Metrics;
use crate::ops_server::{Observability, router};
use crate::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use crate::policy::{Policies, PolicyConfig};
use crate::rate_limit::RateLimitConfig;
use crate::rate_limit::{self, LimiterBackend, LocalLimiter, RateLimiter, RedisLimiter};
use crate::revocation::FailureMode;
use crate::revocation::{
    Backend, FileError, MemoryStore, RedisStore, RevocationConfig, StoreError,
};
use crate::route::RouteRules;
use crate::tls::{ReloadingTls, TlsFiles};
use crate::token_cache::TokenCache;
use crate::token_cache::TokenCacheConfig;

/// Everything [`run`] needs, validated: every component's settings. Built from flags and env
/// by `config` (the one place that reads them); tests build it the same way.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerSettings,
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
    /// CEL rules: CONFIG_FILE's `policies` and `default_policy`, and POLICY_INLINE_CLAIMS.
    pub policies: PolicyConfig,
    /// `POLICY_DRY_RUN`: scopes, step-up and rules recorded, not enforced, where a route does
    /// not say otherwise.
    pub dry_run: bool,
    /// The decision log (`AUDIT_*`).
    pub audit: AuditSettings,
    /// The back-channel logout endpoint (BACKCHANNEL_LOGOUT_*); `None`: off.
    pub logout: Option<LogoutSettings>,
    /// `REQUIRE_SENDER_CONSTRAINT`: unbound tokens refused where a route does not say.
    pub require_sender_constraint: bool,
    /// DPoP proof checks (DPOP_*).
    pub dpop: DpopSettings,
    /// Settings that weaken a protection on purpose, logged as warnings at startup.
    pub warnings: Vec<String>,
}

/// The Check listener (`GRPC_*`, `MAX_IN_FLIGHT`), the metrics listener and the drain.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen_addr: SocketAddr,
    /// Concurrent streams per client connection (HTTP/2 SETTINGS).
    pub max_concurrent_streams: u32,
    pub max_message_bytes: usize,
    /// Admission limit: Checks in flight before new ones are shed.
    pub max_in_flight: usize,
    /// Worker threads for the runtime; `None` lets it follow the CPU quota.
    pub worker_threads: Option<usize>,
    pub tuning: GrpcTuning,
    /// `None`: plaintext.
    pub tls: Option<TlsFiles>,
    /// `None`: no metrics/health HTTP listener.
    pub metrics_listen_addr: Option<SocketAddr>,
    pub shutdown: ShutdownConfig,
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

/// The two steps of a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownConfig {
    pub drain_delay: Duration,
    pub timeout: Duration,
}

/// Default admission limit per worker thread. Measured (BENCHMARKS.md "Overload"): 64 shed
/// Checks at half the peak, because open-loop arrivals come in bursts; 256 shed none up to 75 %
/// of the peak while still bounding the backlog a worker can hold.
const IN_FLIGHT_PER_WORKER: usize = 256;

/// `MAX_IN_FLIGHT=0`: 256 per runtime worker thread.
pub fn default_max_in_flight(worker_threads: Option<usize>) -> usize {
    IN_FLIGHT_PER_WORKER * runtime_workers(worker_threads)
}

/// The runtime's worker threads: as configured, else the CPU quota (available_parallelism reads
/// the cgroup limit), so a 200m-CPU pod does not run one busy thread per node core.
pub fn runtime_workers(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The runtime that serves: one worker thread is a current-thread runtime, which costs less CPU
/// per Check than a one-worker pool (no hand-offs between the accepting thread and the worker,
/// no work-stealing wake-ups; BENCHMARKS.md, "CPU per request under Envoy"); more are a pool.
pub fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut pool = tokio::runtime::Builder::new_multi_thread();
            pool.worker_threads(n);
            pool
        }
    };
    builder.enable_all().build()
}

/// How often gRPC health follows readiness, and histograms are drained into buckets.
const HEALTH_REPORT_INTERVAL: Duration = Duration::from_millis(250);
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The sockets to serve on, bound by the caller (so tests can use port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    /// `GRPC_UNIX_SOCKET`, served alongside `grpc`.
    pub grpc_unix: Option<tokio::net::UnixListener>,
    /// `/metrics`, `/healthz`, `/readyz`; `None` disables them.
    pub metrics: Option<TcpListener>,
    /// The back-channel logout endpoint; served when `Config::logout` is set too.
    pub logout: Option<TcpListener>,
}

/// What cached tokens keep by name: the union of what every claim reader declares. A new
/// reader of claims by name joins this list, and only this list.
fn kept_claims(config: &Config) -> KeptClaims {
    let readers: [Option<&dyn ReadsClaims>; 5] = [
        Some(&config.upstream),
        Some(&RouteRules),
        Some(&SenderConstraint),
        Some(&config.policies),
        config
            .rate_limits
            .as_ref()
            .map(|limits| limits as &dyn ReadsClaims),
    ];
    KeptClaims::union(readers.into_iter().flatten())
}

/// Why the server could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("revocation file: {0}")]
    RevocationFile(#[from] FileError),
    #[error("Redis: {0}")]
    Redis(#[from] StoreError),
    #[error("HTTP client for JWKS: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("decision log: {0}")]
    AuditLog(std::io::Error),
}

/// What [`build`] makes from a [`Config`]: the Check service and everything it needs alive.
/// The sidecar serves it over gRPC ([`run`]); the Envoy module calls it in-process.
pub struct Built {
    pub service: CheckService<Arc<Backend>>,
    /// JWKS refresh, revocation reloads and invalidations, health, metrics upkeep, the
    /// operations and logout listeners: stopped when this is dropped.
    pub background: JoinSet<()>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
}

/// Builds every component from `config` and starts their background work on the current
/// runtime; serves `/metrics` and the logout endpoint on the listeners given. The one place
/// the components are put together, for the sidecar and the Envoy module alike.
pub async fn build(
    config: Config,
    metrics_listener: Option<TcpListener>,
    logout_listener: Option<TcpListener>,
) -> Result<Built, RunError> {
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let mut background = JoinSet::new();
    let kept_claims = kept_claims(&config);
    let issuer_names: Vec<String> = config.issuers.iter().map(|i| i.issuer.clone()).collect();
    let metrics = Arc::new(Metrics::new(&issuer_names));

    let http = reqwest::Client::builder()
        .timeout(config.jwks.fetch_timeout)
        .connect_timeout(config.jwks.fetch_timeout)
        .user_agent(concat!("authz-sidecar/", env!("CARGO_PKG_VERSION")))
        // Never from https down to http, nor to a host a configured URL could not name.
        .redirect(crate::jwks::redirect_policy(config.jwks.allow_http))
        .build()?;
    let mut issuers = HashMap::new();
    for issuer in &config.issuers {
        let keys = IssuerKeys::new(
            issuer.issuer.clone(),
            issuer.jwks.clone(),
            config.jwks.clone(),
            http.clone(),
            metrics.jwks(&issuer.issuer),
        );
        background.spawn(keys.clone().refresh_forever());
        issuers.insert(
            issuer.issuer.clone(),
            Issuer {
                keys,
                audiences: issuer.audiences.clone(),
            },
        );
    }

    let store = Arc::new(match config.revocation.clone() {
        RevocationConfig::Memory { file } => {
            let store = Arc::new(MemoryStore::open(file)?);
            background.spawn(store.clone().reload_forever(
                config.jwks.file_poll_interval,
                metrics.revocation_file.clone(),
            ));
            Backend::Memory(store)
        }
        RevocationConfig::Redis(settings) => {
            let mut store = RedisStore::connect(&settings).await?;
            if let Some(tracker) = store.start_cache(&settings, metrics.revocation_cache.clone())? {
                background.spawn(tracker);
            }
            Backend::Redis(store)
        }
    });

    let rate_limiter = config.rate_limits.map(|limits| {
        let backend = match (limits.backend, &config.revocation, &*store) {
            (LimiterBackend::Redis, RevocationConfig::Redis(settings), Backend::Redis(redis)) => {
                rate_limit::Backend::Redis(RedisLimiter::new(
                    redis.pool().clone(),
                    limits.key_prefix.clone(),
                    &settings.pool,
                ))
            }
            // Config rejects a Redis limiter without the Redis revocation backend.
            _ => rate_limit::Backend::Local(LocalLimiter::new(
                limits.max_keys,
                metrics.rate_limit_evictions.clone(),
            )),
        };
        info!(policies = limits.policies.len(), backend = ?limits.backend, "rate limits on");
        Arc::new(RateLimiter::new(limits, backend, metrics.clone()))
    });

    let health = Arc::new(Health::new(
        issuers.values().map(|i| i.keys.clone()).collect(),
        store.clone(),
        config.revocation_failure_mode,
    ));

    let token_cache = TokenCache::new(config.token_cache.max_entries, config.token_cache.ttl)
        .map(|cache| Arc::new(cache.keeping(kept_claims)));
    if let Some(listener) = metrics_listener {
        let app = router(Arc::new(Observability {
            health: health.clone(),
            metrics: metrics.clone(),
            token_cache: token_cache.clone(),
            rate_limiter: rate_limiter.clone(),
        }));
        background.spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                warn!(%error, "metrics listener stopped");
            }
        });
    }
    if let (Some(listener), Some(settings)) = (logout_listener, config.logout) {
        let keys = issuers
            .iter()
            .map(|(name, issuer)| (name.clone(), issuer.keys.clone()))
            .collect();
        let endpoint =
            LogoutEndpoint::new(settings, &keys, &config.jwt, store.clone(), metrics.clone());
        info!(addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            issuers = endpoint.settings().issuers.len(), "serving back-channel logout");
        let app = crate::logout::router(Arc::new(endpoint));
        background.spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                warn!(%error, "back-channel logout listener stopped");
            }
        });
    }
    let upkeep = metrics.clone();
    background.spawn(async move {
        loop {
            tokio::time::sleep(METRICS_UPKEEP_INTERVAL).await;
            upkeep.upkeep();
        }
    });

    // Replays are refused across replicas with the Redis backend, under the same failure mode.
    let dpop = DpopVerifier::new(
        &config.dpop,
        &config.jwt,
        Some(store.clone()),
        config.revocation_failure_mode,
    );
    let authorizer = Authorizer::new(
        issuers,
        config.jwt,
        store,
        config.revocation_failure_mode,
        metrics.clone(),
        token_cache,
    );
    let mut service = CheckService::new(
        authorizer,
        config.token_source,
        config.upstream,
        metrics.clone(),
    )
    .ignoring_route_keys(config.ignored_route_keys)
    .with_policies(Arc::new(Policies::new(&config.policies, &metrics)))
    .dry_run_by_default(config.dry_run)
    .requiring_sender_constraint(config.require_sender_constraint)
    .with_dpop(dpop);
    if let Some(audit) =
        AuditLog::start(&config.audit, metrics.audit.clone()).map_err(RunError::AuditLog)?
    {
        service = service.with_audit_log(audit);
    }
    if let Some(limiter) = rate_limiter {
        service = service.with_rate_limiter(limiter);
    }

    Ok(Built {
        service,
        background,
        health,
        metrics,
    })
}

/// Serves until `shutdown` resolves, then drains (see the module doc). Background tasks live
/// in a JoinSet, so they stop when this returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let server = config.server.clone();
    let file_poll_interval = config.jwks.file_poll_interval;
    let issuer_count = config.issuers.len();
    let Built {
        service,
        mut background,
        health,
        metrics,
    } = build(config, listeners.metrics, listeners.logout).await?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_grpc_status(&reporter, false).await;
    background.spawn(
        health
            .clone()
            .report_forever(reporter.clone(), HEALTH_REPORT_INTERVAL),
    );
    let listening = Arc::new(Notify::new());
    let stop_accepting = listening.clone();
    let drain_delay = server.shutdown.drain_delay;
    let drain = async move {
        shutdown.await;
        info!(
            ?drain_delay,
            "shutdown requested: not ready, still answering Checks"
        );
        health.start_draining();
        set_grpc_status(&reporter, false).await;
        tokio::time::sleep(drain_delay).await;
        info!("closing the listener; finishing in-flight Checks");
        stop_accepting.notify_one();
    };

    let tls = match &server.tls {
        Some(files) => {
            let tls = ReloadingTls::new(files.clone(), metrics.clone())?;
            background.spawn(tls.clone().reload_forever(file_poll_interval));
            Some(tls)
        }
        None => None,
    };
    info!(addr = %listeners.grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        issuers = issuer_count, tls = tls.is_some(),
        mtls = server.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        "serving ext_authz Check");
    let tuning = &server.tuning;
    let mut builder = Server::builder()
        // Per connection: Envoy multiplexes Checks over few HTTP/2 connections.
        .max_concurrent_streams(server.max_concurrent_streams)
        .initial_stream_window_size(tuning.initial_stream_window_bytes)
        .initial_connection_window_size(tuning.initial_connection_window_bytes)
        .http2_keepalive_interval(tuning.keepalive_interval)
        .http2_keepalive_timeout(Some(tuning.keepalive_timeout));
    if let Some(age) = tuning.jittered_max_connection_age() {
        info!(?age, grace = ?tuning.max_connection_age_grace, "connections closed at this age");
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(tuning.max_connection_age_grace);
    }
    let router = builder
        // Process-wide, taken as each stream arrives; a stream must deliver its request
        // within GRPC_REQUEST_READ_TIMEOUT or be answered and release its permit (admission.rs).
        .layer(AdmissionLayer::new(
            server.max_in_flight,
            tuning.request_read_timeout,
            LateAnswer {
                message: crate::check::response::encoded_failure(CheckError::RequestReadTimeout),
                counter: metrics.failure_counter(CheckError::RequestReadTimeout),
            },
        ))
        .add_service(health_service)
        .add_service(
            AuthorizationServer::new(service).max_decoding_message_size(server.max_message_bytes),
        );
    let nodelay = tuning.tcp_nodelay;
    let max_handshakes = tuning.tls_max_handshakes;
    let serve = async move {
        let network: Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>> = match tls {
            None => Box::pin(
                TcpIncoming::from(listeners.grpc)
                    .with_nodelay(Some(nodelay))
                    .map(|s| s.map(Connection::Tcp)),
            ),
            Some(tls) => Box::pin(
                crate::tls::incoming(listeners.grpc, tls, max_handshakes)
                    .map(|s| s.map(|tls| Connection::Tls(Box::new(tls)))),
            ),
        };
        let incoming = crate::listener::with_unix(network, listeners.grpc_unix);
        router.serve_with_incoming_shutdown(incoming, drain).await
    };
    let shutdown_timeout = server.shutdown.timeout;
    tokio::select! {
        served = serve => served?,
        () = async { listening.notified().await; tokio::time::sleep(shutdown_timeout).await } => {
            warn!(?shutdown_timeout, "in-flight Checks did not finish in time; exiting anyway");
        }
    }
    background.shutdown().await;
    info!("stopped");
    Ok(())
}
