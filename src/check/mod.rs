//! The `envoy.service.auth.v3.Authorization/Check` service: CheckRequest -> Decision ->
//! CheckResponse, within the caller's deadline. With [`request`] (what is read from Envoy's
//! request) and [`response`] (what is answered), the only module that knows Envoy's message
//! shapes.

pub mod request;
pub mod response;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::warn;

use crate::admission::Ticket;
use crate::authorizer::Authorizer;
use crate::claims::Claims;
use crate::decision::{AllowReason, CheckError, Decision, Denial};
use crate::metrics::Metrics;
use crate::pb::envoy::service::auth::v3::authorization_server::Authorization;
use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use crate::policy::{Policies, PolicyRefusal};
use crate::rate_limit::{Caller, LimitError, Outcome, Policy, RateLimiter};
use crate::revocation::RevocationStore;
use crate::route::{RoutePolicy, RouteRequirements};
use crate::throttle::LogThrottle;
use request::{TokenSource, client_ip, deadline_budget, extract_token, request_facts};
use response::{UpstreamHeaders, allow, deny, failure, rate_limited, step_up};

pub struct CheckService<S> {
    authorizer: Arc<Authorizer<S>>,
    token_source: TokenSource,
    upstream: UpstreamHeaders,
    metrics: Arc<Metrics>,
    failure_warnings: LogThrottle,
    limiter: Option<Arc<RateLimiter>>,
    /// `context_extensions` keys meant for others, which a route may carry.
    ignored_route_keys: Vec<String>,
    /// The CEL rules; `None`: none configured, and a route that names one is a bad route.
    policies: Option<Arc<Policies>>,
}

impl<S> CheckService<S> {
    pub fn new(
        authorizer: Authorizer<S>,
        token_source: TokenSource,
        upstream: UpstreamHeaders,
        metrics: Arc<Metrics>,
    ) -> Self {
        CheckService {
            authorizer: Arc::new(authorizer),
            token_source,
            upstream,
            metrics,
            failure_warnings: LogThrottle::new(Duration::from_secs(10)),
            limiter: None,
            ignored_route_keys: Vec::new(),
            policies: None,
        }
    }

    /// Runs each route's CEL rule (or the default) on the Checks that would be allowed.
    pub fn with_policies(mut self, policies: Arc<Policies>) -> Self {
        self.policies = Some(policies);
        self
    }

    /// Lets routes carry these `context_extensions` keys, meant for others, without failing.
    pub fn ignoring_route_keys(mut self, keys: Vec<String>) -> Self {
        self.ignored_route_keys = keys;
        self
    }

    /// Enforces rate limits on the Checks that would be allowed.
    pub fn with_rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// Spends from the caller's rate-limit buckets. Only called for a request about to be
    /// allowed, so an invalid token never spends a real subject's budget.
    async fn limit(
        &self,
        route: &RouteRequirements<'_>,
        attributes: Option<&AttributeContext>,
        claims: &Claims,
        reason: AllowReason,
    ) -> Result<Option<(&Policy, Outcome)>, CheckError> {
        let names = route.rate_limit.as_deref();
        let Some(limiter) = &self.limiter else {
            return match names {
                Some(["none"]) | None => Ok(None),
                Some(_) => Err(self.bad_route("rate_limit names a policy but none is configured")),
            };
        };
        let config = limiter.config();
        let caller = Caller {
            token: match (reason, claims.iss.as_deref()) {
                (AllowReason::Anonymous, _) | (_, None) => None,
                (_, Some(issuer)) => Some((issuer, claims)),
            },
            ip: client_ip(attributes, config.trusted_proxy_hops),
        };
        match limiter.check(names, caller).await {
            Ok(outcome) => Ok(outcome.map(|o| (&config.policies[o.policy], o))),
            Err(LimitError::BadRoute(problem)) => Err(self.bad_route(&problem)),
            Err(LimitError::Unavailable) => Err(CheckError::RateLimitUnavailable),
        }
    }

    fn bad_route(&self, problem: &str) -> CheckError {
        if let Some(held_back) = self.failure_warnings.allow() {
            warn!(%problem, held_back, "bad per-route context_extensions");
        }
        CheckError::BadRouteConfig
    }
}

/// Counts a Check in flight for as long as it lives, including when Envoy gives up and the
/// handler is dropped mid-way. Its duration counts from the stream's arrival, so time spent
/// waiting for a worker under load shows on the dashboard.
struct InFlight<'m>(&'m Metrics, Instant);

impl<'m> InFlight<'m> {
    fn start(metrics: &'m Metrics, arrived: Instant) -> Self {
        metrics.in_flight.increment(1.0);
        InFlight(metrics, arrived)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.decrement(1.0);
        self.0.request_duration.record(self.1.elapsed());
    }
}

#[tonic::async_trait]
impl<S: RevocationStore> Authorization for CheckService<S> {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // The admission layer's ticket (kept to the end: it holds the permit). A shed Check is
        // a 503 deny, not an RPC error: with failure_mode_allow an Envoy would let an errored
        // Check through unverified, while a denied_response is always enforced.
        let ticket = request.extensions().get::<Ticket>().cloned();
        if let Some(ticket) = &ticket {
            // The request arrived and decoded: its read deadline no longer applies.
            ticket.mark_decoded();
            if !ticket.admitted() {
                self.metrics.failed(CheckError::Overloaded);
                if let Some(held_back) = self.failure_warnings.allow() {
                    warn!(held_back, "shedding Checks: MAX_IN_FLIGHT reached");
                }
                return Ok(Response::new(failure(CheckError::Overloaded)));
            }
        }
        let arrived = ticket.as_ref().map_or_else(Instant::now, Ticket::arrived);
        let _in_flight = InFlight::start(&self.metrics, arrived);
        let waited = arrived.elapsed();
        let budget = deadline_budget(request.metadata()).map(|b| b.saturating_sub(waited));
        if budget == Some(Duration::ZERO) {
            // It waited out the caller's deadline before it was first run: do no work for it.
            self.metrics.failed(CheckError::DeadlineExceeded);
            return Ok(Response::new(failure(CheckError::DeadlineExceeded)));
        }
        let request = request.into_inner();
        let attributes = request.attributes.as_ref();
        let headers = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|http| &http.headers);
        let token = headers.and_then(|h| extract_token(h, &self.token_source));
        let no_extensions = HashMap::new();
        let extensions = attributes.map_or(&no_extensions, |a| &a.context_extensions);
        let route = RouteRequirements::from_extensions(extensions, &self.ignored_route_keys);
        let decide = async {
            let route = route.as_ref().map_err(|problem| self.bad_route(problem))?;
            let now = unix_now();
            match self.authorizer.decide(token, route, now).await {
                Ok(Decision::Allow(claims, reason)) => {
                    // After the token and revocation, before the rate limits: a request the
                    // rule refuses spends no budget.
                    let facts = request_facts(attributes);
                    let ruled = match &self.policies {
                        Some(policies) => policies.check(&route.policy, &claims, &facts, now),
                        None if route.policy == RoutePolicy::Default => Ok(()),
                        None if route.policy == RoutePolicy::None => Ok(()),
                        None => Err(PolicyRefusal::BadRoute("no policies are configured".into())),
                    };
                    match ruled {
                        Ok(()) => self
                            .limit(route, attributes, &claims, reason)
                            .await
                            .map(|limits| (Decision::Allow(claims, reason), limits)),
                        Err(PolicyRefusal::Denied) => {
                            Ok((Decision::Deny(Denial::PolicyDenied), None))
                        }
                        Err(PolicyRefusal::BadRoute(problem)) => Err(self.bad_route(&problem)),
                    }
                }
                other => other.map(|decision| (decision, None)),
            }
        };
        // Answer before Envoy gives up: a 503 we count beats a timeout nobody sees here.
        let decision = match budget {
            Some(budget) => tokio::time::timeout(budget, decide)
                .await
                .unwrap_or(Err(CheckError::DeadlineExceeded)),
            None => decide.await,
        };
        let response = match decision {
            Ok((Decision::Allow(_, _), Some((policy, outcome)))) if outcome.limited => {
                self.metrics.denied(Denial::RateLimited);
                rate_limited(policy, &outcome)
            }
            Ok((Decision::Allow(claims, reason), limits)) => {
                self.metrics.allowed(reason);
                let reported = self
                    .limiter
                    .as_ref()
                    .is_some_and(|l| l.config().response_headers);
                let limits = limits.filter(|_| reported);
                allow(
                    &claims,
                    &self.upstream,
                    limits.as_ref().map(|(p, o)| (*p, o)),
                )
            }
            Ok((Decision::Deny(denial), _)) => {
                self.metrics.denied(denial);
                match (denial, &route) {
                    (Denial::InsufficientUserAuthentication, Ok(route)) => {
                        step_up(&route.acr_values, route.max_age)
                    }
                    _ => deny(denial),
                }
            }
            Err(error) => {
                self.metrics.failed(error);
                if let Some(held_back) = self.failure_warnings.allow() {
                    warn!(reason = error.label(), %error, held_back, "check failed");
                }
                failure(error)
            }
        };
        Ok(Response::new(response))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
