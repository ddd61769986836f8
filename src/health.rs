//! Liveness and readiness. Ready means every named component is ready:
//! - `keys`: every issuer has usable signing keys;
//! - `revocation`: the store answers (or is failing open, by configuration);
//! - `draining`: the process has not been asked to stop.
//!
//! Served as HTTP `/healthz` (live) and `/readyz` (`?verbose` lists the components) beside
//! `/metrics` on the metrics listener, and as `grpc.health.v1.Health` on the gRPC port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::breaker::BreakerState;
use crate::jwks::IssuerKeys;
use crate::metrics::Metrics;
use crate::revocation::{Backend, FailureMode};

/// The gRPC service name Envoy's health checks (and `grpc_health_probe -service`) ask about.
pub const CHECK_SERVICE: &str = "envoy.service.auth.v3.Authorization";

pub struct Health {
    draining: AtomicBool,
    issuers: Vec<Arc<IssuerKeys>>,
    store: Arc<Backend>,
    failure_mode: FailureMode,
}

/// One line of `/readyz?verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    pub ready: bool,
    pub detail: String,
}

impl Health {
    pub fn new(
        issuers: Vec<Arc<IssuerKeys>>,
        store: Arc<Backend>,
        failure_mode: FailureMode,
    ) -> Self {
        Health {
            draining: AtomicBool::new(false),
            issuers,
            store,
            failure_mode,
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn components(&self) -> [Component; 3] {
        let missing: Vec<&str> = self
            .issuers
            .iter()
            .filter(|i| i.usable().is_none())
            .map(|i| i.issuer())
            .collect();
        let keys = Component {
            name: "keys",
            ready: missing.is_empty(),
            detail: if missing.is_empty() {
                format!("{} issuer(s) with usable keys", self.issuers.len())
            } else {
                format!("no usable keys for {}", missing.join(", "))
            },
        };
        let revocation = match &*self.store {
            Backend::Memory(_) => Component {
                name: "revocation",
                ready: true,
                detail: "memory".into(),
            },
            Backend::Redis(redis) => {
                let (connected, breaker) = (redis.connected(), redis.breaker_state());
                let answering = connected > 0 && breaker != BreakerState::Open;
                let fail_open = self.failure_mode == FailureMode::Open;
                Component {
                    name: "revocation",
                    ready: answering || fail_open,
                    detail: format!(
                        "redis: {connected} connection(s) up, breaker {}{}",
                        breaker.label(),
                        if !answering && fail_open {
                            ", failing open"
                        } else {
                            ""
                        }
                    ),
                }
            }
        };
        let draining = self.draining.load(Ordering::SeqCst);
        let serving = Component {
            name: "draining",
            ready: !draining,
            detail: if draining {
                "shutting down".into()
            } else {
                "serving".into()
            },
        };
        [keys, revocation, serving]
    }

    pub fn is_ready(&self) -> bool {
        self.components().iter().all(|c| c.ready)
    }

    /// Keeps the gRPC health status in step with readiness until the task is aborted.
    pub async fn report_forever(self: Arc<Self>, reporter: HealthReporter, every: Duration) {
        let mut last = None;
        loop {
            let ready = self.is_ready();
            if last != Some(ready) {
                set_grpc_status(&reporter, ready).await;
                last = Some(ready);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Sets both the overall ("") and the Check service's gRPC health status.
pub async fn set_grpc_status(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(CHECK_SERVICE, status).await;
}

/// What the metrics listener serves.
pub struct Observability {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub token_cache: Option<Arc<crate::token_cache::TokenCache>>,
    pub rate_limiter: Option<Arc<crate::rate_limit::RateLimiter>>,
}

pub fn router(state: Arc<Observability>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<Observability>>) -> impl IntoResponse {
    // Gauges derived from time or connection state are computed when someone asks.
    for issuer in &state.health.issuers {
        issuer.publish_age();
    }
    if let Some(cache) = &state.token_cache {
        state.metrics.token_cache_entries.set(cache.len() as f64);
    }
    if let Some(keys) = state.rate_limiter.as_ref().and_then(|l| l.local_keys()) {
        state.metrics.rate_limit_keys.set(keys as f64);
    }
    if let Backend::Redis(redis) = &*state.health.store {
        state
            .metrics
            .redis_connections
            .set(redis.connected() as f64);
        state.metrics.breaker_state(redis.breaker_state());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

#[derive(serde::Deserialize)]
struct ReadyQuery {
    verbose: Option<String>,
}

async fn readyz(
    State(state): State<Arc<Observability>>,
    Query(query): Query<ReadyQuery>,
) -> impl IntoResponse {
    let components = state.health.components();
    let ready = components.iter().all(|c| c.ready);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = String::new();
    if query.verbose.is_some() {
        for c in &components {
            body.push_str(&format!(
                "[{}] {}: {}\n",
                if c.ready { "+" } else { "-" },
                c.name,
                c.detail
            ));
        }
    }
    body.push_str(if ready { "ready\n" } else { "not ready\n" });
    (status, body)
}
