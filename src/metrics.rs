//! Every metric, declared once with its help text. Names are the ones existing dashboards query.
//!
//! Each sidecar owns its recorder (no process-global one), so two sidecars in one process (the
//! tests) never mix counts. Handles are registered up front for every label value, and label
//! values come from enums or from the configured issuer list only: cardinality is bounded and
//! no token, subject or path can reach a label. On the hot path an update is an atomic add.

use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::audit::AuditCounters;
use crate::breaker::BreakerState;
use crate::decision::{AllowReason, CheckError, Denial, WouldDecide};
use crate::redis::StoreError;

/// Histogram buckets in seconds, 25 us to 1 s: real `_bucket` series for `histogram_quantile`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

const REQUEST_DURATION: (&str, &str) = (
    "ext_authz_request_duration_seconds",
    "Time to answer one Check, end to end.",
);
const JWT_VERIFY_DURATION: (&str, &str) = (
    "ext_authz_jwt_verify_duration_seconds",
    "Time to verify a token: parsing, claim rules, key lookup (and any refetch) and signature.",
);
const REDIS_LOOKUP_DURATION: (&str, &str) = (
    "ext_authz_redis_lookup_duration_seconds",
    "Time of the revocation lookup, whatever the backend (name kept for existing dashboards); \
     a cached token whose last Redis answer still holds makes none.",
);
const REQUESTS: (&str, &str) = (
    "ext_authz_requests_total",
    "Checks answered, by result (allow, deny, error) and reason.",
);
const IN_FLIGHT: (&str, &str) = ("ext_authz_requests_in_flight", "Checks being answered now.");
const JWKS_REFRESHES: (&str, &str) = (
    "ext_authz_jwks_refreshes_total",
    "JWKS fetches by issuer and outcome (updated, unchanged, failed).",
);
const JWKS_KEYS: (&str, &str) = (
    "ext_authz_jwks_keys",
    "Usable signing keys loaded, by issuer.",
);
const JWKS_AGE: (&str, &str) = (
    "ext_authz_jwks_seconds_since_refresh",
    "Seconds since the issuer's keys were last confirmed by their source (-1: never loaded).",
);
const REVOCATION_ERRORS: (&str, &str) = (
    "ext_authz_revocation_errors_total",
    "Revocation lookups that failed, by kind (timeout, breaker_open, connection, ...).",
);
const REDIS_CONNECTIONS: (&str, &str) = (
    "ext_authz_redis_connections",
    "Redis pool connections that are up.",
);
const BREAKER_STATE: (&str, &str) = (
    "ext_authz_redis_breaker_state",
    "Redis circuit breaker: 1 for the current state (closed, open, half_open), 0 for the others.",
);
const TOKEN_CACHE_REQUESTS: (&str, &str) = (
    "ext_authz_token_cache_requests_total",
    "Verified-token cache lookups by result (hit: the signature check was skipped; rejected: a \
     token whose signature failed within the last minute, denied at once).",
);
const TOKEN_CACHE_ENTRIES: (&str, &str) = (
    "ext_authz_token_cache_entries",
    "Verified tokens cached (approximate).",
);
const ALLOW_REUSES: (&str, &str) = (
    "ext_authz_allow_reuses_total",
    "Allows the in-Envoy module gave again from its memo without building a Check (each also \
     counted in ext_authz_requests_total).",
);
const REVOCATION_CACHE_REQUESTS: (&str, &str) = (
    "ext_authz_revocation_cache_requests_total",
    "Redis revocation lookups by how the in-process cache served them (hit: no Redis call; \
     miss: read and cached; bypass: invalidations not flowing, read and not cached).",
);
const REVOCATION_CACHE_LIVE: (&str, &str) = (
    "ext_authz_revocation_cache_live",
    "1 while Redis pushes revocation invalidations and the cache answers; 0 while bypassed.",
);
const REVOCATION_CACHE_INVALIDATIONS: (&str, &str) = (
    "ext_authz_revocation_cache_invalidations_total",
    "Revocation keys Redis reported as changed (each removed from the cache).",
);
const RATE_LIMIT_DURATION: (&str, &str) = (
    "ext_authz_rate_limit_duration_seconds",
    "Time to spend one Check's requests from its rate-limit buckets (local or Redis).",
);
const RATE_LIMIT_ERRORS: (&str, &str) = (
    "ext_authz_rate_limit_errors_total",
    "Rate-limit backend calls that failed, by kind; the section's failure_mode decided the Check.",
);
const RATE_LIMIT_KEYS: (&str, &str) = (
    "ext_authz_rate_limit_keys",
    "Local rate-limit buckets that are not full (approximate; capped by max_keys).",
);
const RATE_LIMIT_EVICTIONS: (&str, &str) = (
    "ext_authz_rate_limit_evictions_total",
    "Local buckets dropped to stay under max_keys before they were full again.",
);
const TLS_RELOADS: (&str, &str) = (
    "ext_authz_tls_reloads_total",
    "Changed GRPC_TLS_* files seen, by outcome (updated, failed: the old certificate serves on).",
);
const TLS_HANDSHAKE_FAILURES: (&str, &str) = (
    "ext_authz_tls_handshake_failures_total",
    "Connections to the Check listener dropped in the TLS handshake (bad or no client cert, \
     timeout, more than GRPC_TLS_MAX_HANDSHAKES in progress).",
);
const REVOCATION_FILE_RELOADS: (&str, &str) = (
    "ext_authz_revocation_file_reloads_total",
    "Polls of REVOCATION_FILE that found content not in force, by outcome (updated: loaded; \
     failed: refused or unreadable, the previous list stays in force; counted on every poll \
     until the file is fixed).",
);
const POLICY_EVALUATIONS: (&str, &str) = (
    "ext_authz_policy_evaluations_total",
    "CEL rule evaluations by rule (its CONFIG_FILE name, or `inline`) and outcome (allow; deny: \
     false; error: a run-time error or a result that is not a bool, denied too).",
);
const DRY_RUN: (&str, &str) = (
    "ext_authz_dry_run_total",
    "Checks on dry-run routes by what scopes, step-up and the CEL rule would have decided \
     (would: allow, deny) and the reason they would have been denied under; each was allowed.",
);
const AUDIT_RECORDS: (&str, &str) = (
    "ext_authz_audit_records_total",
    "Decision log records by outcome (written; dropped: the queue was full, the Check did not \
     wait; failed: the write failed).",
);
const BACKCHANNEL_LOGOUT: (&str, &str) = (
    "ext_authz_backchannel_logout_total",
    "Back-channel logout requests by result (ok, invalid, replay, store_error, \
     keys_unavailable, rate_limited, too_large, method_not_allowed).",
);
const BUILD_INFO: (&str, &str) = ("ext_authz_build_info", "Always 1; the version is a label.");

/// What a JWKS fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Updated,
    Unchanged,
    Failed,
}

impl RefreshOutcome {
    const ALL: [RefreshOutcome; 3] = [
        RefreshOutcome::Updated,
        RefreshOutcome::Unchanged,
        RefreshOutcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            RefreshOutcome::Updated => "updated",
            RefreshOutcome::Unchanged => "unchanged",
            RefreshOutcome::Failed => "failed",
        }
    }
}

/// The `rule` label of every inline CEL rule: their text is no bounded label.
pub const INLINE_RULE: &str = "inline";

/// What a CEL rule evaluated to (src/policy.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOutcome {
    Allow,
    Deny,
    Error,
}

impl PolicyOutcome {
    const ALL: [PolicyOutcome; 3] = [
        PolicyOutcome::Allow,
        PolicyOutcome::Deny,
        PolicyOutcome::Error,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PolicyOutcome::Allow => "allow",
            PolicyOutcome::Deny => "deny",
            PolicyOutcome::Error => "error",
        }
    }
}

/// One rule's evaluation counters, held by the rule: counting is an atomic add.
#[derive(Clone)]
pub struct PolicyCounters([Counter; 3]);

impl PolicyCounters {
    pub fn count(&self, outcome: PolicyOutcome) {
        self.0[outcome as usize].increment(1);
    }
}

/// How one back-channel logout request ended (src/logout.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoutResult {
    /// Validated and written: 200.
    Ok,
    /// Not a valid logout request or token: 400.
    Invalid,
    /// A valid token whose `jti` was seen before: 400.
    Replay,
    /// The revocation (or the shared replay check) could not be written: 503.
    StoreError,
    /// The issuer's keys are not loaded: 503.
    KeysUnavailable,
    /// Over BACKCHANNEL_LOGOUT_RATE_LIMIT: 429.
    RateLimited,
    /// Body over BACKCHANNEL_LOGOUT_MAX_BODY_BYTES: 413.
    TooLarge,
    /// Not a POST: 405.
    MethodNotAllowed,
}

impl LogoutResult {
    pub const ALL: [LogoutResult; 8] = [
        LogoutResult::Ok,
        LogoutResult::Invalid,
        LogoutResult::Replay,
        LogoutResult::StoreError,
        LogoutResult::KeysUnavailable,
        LogoutResult::RateLimited,
        LogoutResult::TooLarge,
        LogoutResult::MethodNotAllowed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LogoutResult::Ok => "ok",
            LogoutResult::Invalid => "invalid",
            LogoutResult::Replay => "replay",
            LogoutResult::StoreError => "store_error",
            LogoutResult::KeysUnavailable => "keys_unavailable",
            LogoutResult::RateLimited => "rate_limited",
            LogoutResult::TooLarge => "too_large",
            LogoutResult::MethodNotAllowed => "method_not_allowed",
        }
    }
}

const BREAKER_STATES: [BreakerState; 3] = [
    BreakerState::Closed,
    BreakerState::Open,
    BreakerState::HalfOpen,
];

/// One issuer's JWKS metrics, handed to its key source.
#[derive(Clone)]
pub struct JwksMetrics {
    refreshes: [Counter; 3],
    pub keys: Gauge,
    pub seconds_since_refresh: Gauge,
}

impl JwksMetrics {
    pub fn refreshed(&self, outcome: RefreshOutcome) {
        self.refreshes[outcome as usize].increment(1);
    }
}

/// What the memory backend's file polls found (src/revocation/memory.rs).
#[derive(Clone)]
pub struct FileReloadMetrics {
    pub updated: Counter,
    pub failed: Counter,
}

/// The Redis revocation cache's series (src/revocation/tracking.rs).
#[derive(Clone)]
pub struct RevocationCacheMetrics {
    /// [hit, miss, bypass]
    requests: [Counter; 3],
    pub live: Gauge,
    pub invalidations: Counter,
}

/// How the revocation cache served one lookup.
#[derive(Debug, Clone, Copy)]
pub enum CacheLookup {
    Hit,
    Miss,
    Bypass,
}

impl CacheLookup {
    const ALL: [CacheLookup; 3] = [CacheLookup::Hit, CacheLookup::Miss, CacheLookup::Bypass];

    fn label(self) -> &'static str {
        match self {
            CacheLookup::Hit => "hit",
            CacheLookup::Miss => "miss",
            CacheLookup::Bypass => "bypass",
        }
    }
}

impl RevocationCacheMetrics {
    pub fn lookup(&self, how: CacheLookup) {
        self.requests[how as usize].increment(1);
    }
}

pub struct Metrics {
    handle: PrometheusHandle,
    /// Kept to register the series of the configured policy rules ([`Metrics::policy_counters`]).
    registry: Registry,
    pub request_duration: Histogram,
    pub jwt_verify_duration: Histogram,
    pub revocation_lookup_duration: Histogram,
    pub in_flight: Gauge,
    allowed: [Counter; 3],
    denied: [Counter; Denial::ALL.len()],
    failed: [Counter; CheckError::ALL.len()],
    revocation_errors: HashMap<&'static str, Counter>,
    pub redis_connections: Gauge,
    breaker_state: [Gauge; 3],
    jwks: HashMap<String, JwksMetrics>,
    /// [miss, hit]
    token_cache: [Counter; 2],
    token_cache_rejected: Counter,
    pub token_cache_entries: Gauge,
    allow_reuses: Counter,
    pub revocation_cache: RevocationCacheMetrics,
    pub rate_limit_duration: Histogram,
    rate_limit_errors: HashMap<&'static str, Counter>,
    pub rate_limit_keys: Gauge,
    pub rate_limit_evictions: Counter,
    /// [failed, updated]
    tls_reloads: [Counter; 2],
    tls_handshake_failures: Counter,
    pub revocation_file: FileReloadMetrics,
    /// In the order of [`WouldDecide::ALL`].
    dry_run: [Counter; WouldDecide::ALL.len()],
    pub audit: AuditCounters,
    backchannel_logout: [Counter; LogoutResult::ALL.len()],
}

struct Registry {
    recorder: PrometheusRecorder,
}

impl Registry {
    fn describe(&self, (name, help): (&'static str, &'static str), unit: Option<Unit>) {
        // Describing a name once covers every kind; the exporter looks descriptions up by name.
        self.recorder
            .describe_counter(KeyName::from_const_str(name), unit, help.into());
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn metadata() -> Metadata<'static> {
        Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &Self::metadata())
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &Self::metadata())
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, &[]), &Self::metadata())
    }
}

impl Metrics {
    /// Registers every series for the configured issuers; all start at zero so dashboards and
    /// alerts see them before the first event.
    pub fn new(issuers: &[String]) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&DURATION_BUCKETS)
            .expect("bucket list is non-empty")
            .build_recorder();
        let r = Registry { recorder };
        for (metric, unit) in [
            (REQUEST_DURATION, Some(Unit::Seconds)),
            (JWT_VERIFY_DURATION, Some(Unit::Seconds)),
            (REDIS_LOOKUP_DURATION, Some(Unit::Seconds)),
            (REQUESTS, None),
            (IN_FLIGHT, None),
            (JWKS_REFRESHES, None),
            (JWKS_KEYS, None),
            (JWKS_AGE, Some(Unit::Seconds)),
            (REVOCATION_ERRORS, None),
            (REDIS_CONNECTIONS, None),
            (BREAKER_STATE, None),
            (TOKEN_CACHE_REQUESTS, None),
            (TOKEN_CACHE_ENTRIES, None),
            (ALLOW_REUSES, None),
            (REVOCATION_CACHE_REQUESTS, None),
            (REVOCATION_CACHE_LIVE, None),
            (REVOCATION_CACHE_INVALIDATIONS, None),
            (RATE_LIMIT_DURATION, Some(Unit::Seconds)),
            (RATE_LIMIT_ERRORS, None),
            (RATE_LIMIT_KEYS, None),
            (RATE_LIMIT_EVICTIONS, None),
            (TLS_RELOADS, None),
            (TLS_HANDSHAKE_FAILURES, None),
            (REVOCATION_FILE_RELOADS, None),
            (POLICY_EVALUATIONS, None),
            (DRY_RUN, None),
            (AUDIT_RECORDS, None),
            (BACKCHANNEL_LOGOUT, None),
            (BUILD_INFO, None),
        ] {
            r.describe(metric, unit);
        }
        let requests = |result: &str, reason: &str| {
            r.counter(REQUESTS.0, &[("result", result), ("reason", reason)])
        };
        r.gauge(BUILD_INFO.0, &[("version", env!("CARGO_PKG_VERSION"))])
            .set(1.0);
        let jwks = issuers
            .iter()
            .map(|issuer| {
                let labels = |outcome: RefreshOutcome| {
                    r.counter(
                        JWKS_REFRESHES.0,
                        &[("issuer", issuer), ("outcome", outcome.label())],
                    )
                };
                let metrics = JwksMetrics {
                    refreshes: RefreshOutcome::ALL.map(labels),
                    keys: r.gauge(JWKS_KEYS.0, &[("issuer", issuer)]),
                    seconds_since_refresh: r.gauge(JWKS_AGE.0, &[("issuer", issuer)]),
                };
                metrics.seconds_since_refresh.set(-1.0);
                (issuer.clone(), metrics)
            })
            .collect();
        let metrics = Metrics {
            request_duration: r.histogram(REQUEST_DURATION.0),
            jwt_verify_duration: r.histogram(JWT_VERIFY_DURATION.0),
            revocation_lookup_duration: r.histogram(REDIS_LOOKUP_DURATION.0),
            in_flight: r.gauge(IN_FLIGHT.0, &[]),
            allowed: AllowReason::ALL.map(|reason| requests("allow", reason.label())),
            denied: Denial::ALL.map(|denial| requests("deny", denial.label())),
            failed: CheckError::ALL.map(|error| requests("error", error.label())),
            revocation_errors: StoreError::LABELS
                .iter()
                .map(|kind| (*kind, r.counter(REVOCATION_ERRORS.0, &[("kind", kind)])))
                .collect(),
            redis_connections: r.gauge(REDIS_CONNECTIONS.0, &[]),
            breaker_state: BREAKER_STATES
                .map(|s| r.gauge(BREAKER_STATE.0, &[("state", s.label())])),
            jwks,
            token_cache: ["miss", "hit"]
                .map(|result| r.counter(TOKEN_CACHE_REQUESTS.0, &[("result", result)])),
            token_cache_rejected: r.counter(TOKEN_CACHE_REQUESTS.0, &[("result", "rejected")]),
            token_cache_entries: r.gauge(TOKEN_CACHE_ENTRIES.0, &[]),
            allow_reuses: r.counter(ALLOW_REUSES.0, &[]),
            revocation_cache: RevocationCacheMetrics {
                requests: CacheLookup::ALL
                    .map(|how| r.counter(REVOCATION_CACHE_REQUESTS.0, &[("result", how.label())])),
                live: r.gauge(REVOCATION_CACHE_LIVE.0, &[]),
                invalidations: r.counter(REVOCATION_CACHE_INVALIDATIONS.0, &[]),
            },
            rate_limit_duration: r.histogram(RATE_LIMIT_DURATION.0),
            rate_limit_errors: StoreError::LABELS
                .iter()
                .map(|kind| (*kind, r.counter(RATE_LIMIT_ERRORS.0, &[("kind", kind)])))
                .collect(),
            rate_limit_keys: r.gauge(RATE_LIMIT_KEYS.0, &[]),
            rate_limit_evictions: r.counter(RATE_LIMIT_EVICTIONS.0, &[]),
            tls_reloads: ["failed", "updated"]
                .map(|outcome| r.counter(TLS_RELOADS.0, &[("outcome", outcome)])),
            tls_handshake_failures: r.counter(TLS_HANDSHAKE_FAILURES.0, &[]),
            revocation_file: FileReloadMetrics {
                updated: r.counter(REVOCATION_FILE_RELOADS.0, &[("outcome", "updated")]),
                failed: r.counter(REVOCATION_FILE_RELOADS.0, &[("outcome", "failed")]),
            },
            dry_run: WouldDecide::ALL.map(|would| {
                r.counter(
                    DRY_RUN.0,
                    &[("would", would.would()), ("reason", would.reason())],
                )
            }),
            audit: AuditCounters {
                written: r.counter(AUDIT_RECORDS.0, &[("outcome", "written")]),
                dropped: r.counter(AUDIT_RECORDS.0, &[("outcome", "dropped")]),
                failed: r.counter(AUDIT_RECORDS.0, &[("outcome", "failed")]),
            },
            backchannel_logout: LogoutResult::ALL
                .map(|result| r.counter(BACKCHANNEL_LOGOUT.0, &[("result", result.label())])),
            handle: r.recorder.handle(),
            registry: r,
        };
        metrics.policy_counters(INLINE_RULE);
        metrics
    }

    /// The evaluation counters of a rule, registered at zero: called at startup for every
    /// configured rule name and for `inline`, so the label stays bounded.
    pub fn policy_counters(&self, rule: &str) -> PolicyCounters {
        PolicyCounters(PolicyOutcome::ALL.map(|outcome| {
            self.registry.counter(
                POLICY_EVALUATIONS.0,
                &[("rule", rule), ("outcome", outcome.label())],
            )
        }))
    }

    pub fn allowed(&self, reason: AllowReason) {
        self.allowed[reason as usize].increment(1);
    }

    pub fn denied(&self, denial: Denial) {
        self.denied[denial as usize].increment(1);
    }

    pub fn failed(&self, error: CheckError) {
        self.failed[error as usize].increment(1);
    }

    /// The counter of one failure, for a component that counts it without the rest of Metrics.
    pub fn failure_counter(&self, error: CheckError) -> Counter {
        self.failed[error as usize].clone()
    }

    /// Counts what a dry-run route would have decided.
    pub fn dry_run(&self, would: WouldDecide) {
        if let Some(i) = WouldDecide::ALL.iter().position(|w| *w == would) {
            self.dry_run[i].increment(1);
        }
    }

    pub fn token_cache(&self, hit: bool) {
        self.token_cache[hit as usize].increment(1);
    }

    pub fn allow_reused(&self) {
        self.allow_reuses.increment(1);
    }

    pub fn token_cache_rejected(&self) {
        self.token_cache_rejected.increment(1);
    }

    pub fn revocation_error(&self, error: &StoreError) {
        if let Some(counter) = self.revocation_errors.get(error.label()) {
            counter.increment(1);
        }
    }

    pub fn backchannel_logout(&self, result: LogoutResult) {
        self.backchannel_logout[result as usize].increment(1);
    }

    pub fn tls_reloaded(&self, updated: bool) {
        self.tls_reloads[updated as usize].increment(1);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.increment(1);
    }

    pub fn rate_limit_error(&self, error: &StoreError) {
        if let Some(counter) = self.rate_limit_errors.get(error.label()) {
            counter.increment(1);
        }
    }

    pub fn breaker_state(&self, state: BreakerState) {
        for (gauge, candidate) in self.breaker_state.iter().zip(BREAKER_STATES) {
            gauge.set(if candidate == state { 1.0 } else { 0.0 });
        }
    }

    /// The JWKS metrics of a configured issuer.
    pub fn jwks(&self, issuer: &str) -> Option<JwksMetrics> {
        self.jwks.get(issuer).cloned()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; run every few seconds so memory stays flat
    /// between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_positions_index_their_counters() {
        for (i, denial) in Denial::ALL.iter().enumerate() {
            assert_eq!(*denial as usize, i, "{denial:?}");
        }
        for (i, error) in CheckError::ALL.iter().enumerate() {
            assert_eq!(*error as usize, i, "{error:?}");
        }
        for (i, outcome) in RefreshOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i);
        }
        for (i, reason) in AllowReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        for (i, result) in LogoutResult::ALL.iter().enumerate() {
            assert_eq!(*result as usize, i, "{result:?}");
        }
    }

    #[test]
    fn every_series_exists_before_any_event_with_buckets() {
        let metrics = Metrics::new(&["https://a.example".to_string()]);
        metrics.request_duration.record(0.0003);
        metrics.denied(Denial::Expired);
        let text = metrics.render();
        for needle in [
            "ext_authz_request_duration_seconds_bucket{le=\"0.000025\"} 0",
            "ext_authz_request_duration_seconds_bucket{le=\"0.0005\"} 1",
            "ext_authz_requests_total{result=\"deny\",reason=\"expired\"} 1",
            "ext_authz_requests_total{result=\"allow\",reason=\"verified\"} 0",
            "ext_authz_requests_total{result=\"error\",reason=\"jwks_unavailable\"} 0",
            "ext_authz_jwks_refreshes_total{issuer=\"https://a.example\",outcome=\"failed\"} 0",
            "ext_authz_jwks_seconds_since_refresh{issuer=\"https://a.example\"} -1",
            "# HELP ext_authz_requests_total Checks answered",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
