//! The operations listener (`METRICS_LISTEN_ADDR`): `/metrics` for Prometheus, `/healthz`
//! (the process runs) and `/readyz` (every readiness component is ready; `?verbose` lists them).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::revocation::Backend;

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
    for issuer in state.health.issuers() {
        issuer.publish_age();
    }
    if let Some(cache) = &state.token_cache {
        state.metrics.token_cache_entries.set(cache.len() as f64);
    }
    if let Some(keys) = state.rate_limiter.as_ref().and_then(|l| l.local_keys()) {
        state.metrics.rate_limit_keys.set(keys as f64);
    }
    if let Backend::Redis(redis) = state.health.store() {
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
    let ready = crate::health::is_ready(&components);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = String::new();
    if query.verbose.is_some() {
        for c in &components {
            body.push_str(&format!("[{}] {}: {}\n", c.mark(), c.name, c.detail));
        }
    }
    body.push_str(if ready { "ready\n" } else { "not ready\n" });
    (status, body)
}
