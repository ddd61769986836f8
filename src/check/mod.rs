//! The `envoy.service.auth.v3.Authorization/Check` service: CheckRequest -> Decision ->
//! CheckResponse, within the caller's deadline. With [`request`] (what is read from Envoy's
//! request) and [`response`] (what is answered), the only module that knows Envoy's message
//! shapes.

mod again;
pub mod request;
pub mod response;

pub use again::RepeatableAllow;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::admission::Ticket;
use crate::audit::{AuditLog, Record, now_rfc3339};
use crate::authorizer::{Authorizer, fingerprint};
use crate::binding::{self, Proof, Scheme};
use crate::claims::Claims;
use crate::decision::{AllowReason, CheckError, Decision, Denial, WouldDecide};
use crate::dpop::{DpopVerifier, ProofOutcome};
use crate::metrics::Metrics;
use crate::pb::envoy::service::auth::v3::authorization_server::Authorization;
use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use crate::policy::{Policies, PolicyRefusal, RequestFacts};
use crate::rate_limit::{Caller, LimitError, Outcome, Policy, RateLimiter};
use crate::revocation::RevocationStore;
use crate::route::{RoutePolicy, RouteRequirements};
use crate::throttle::LogThrottle;
use request::{
    TokenSource, client_ip, deadline_budget, dpop_proof, extract_token, proof_target, request_facts,
};
use response::{
    UpstreamHeaders, allow, deny, failure, http_status, in_dpop_scheme, rate_limited, step_up,
};

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
    /// `POLICY_DRY_RUN`: routes without a `dry_run` key record scopes, step-up and rules only.
    dry_run: bool,
    /// One "would deny" line per interval on dry-run routes (the metric counts every one).
    dry_run_notes: LogThrottle,
    /// The decision log, when `AUDIT_LOG` is set.
    audit: Option<AuditLog>,
    /// `REQUIRE_SENDER_CONSTRAINT`: unbound tokens are refused where a route does not say.
    require_sender_constraint: bool,
    /// DPoP proof checks; `None`: every DPoP-bound token is refused (`invalid_dpop_proof`).
    dpop: Option<DpopVerifier>,
    /// One warning per interval while the shared DPoP replay check fails.
    replay_warnings: LogThrottle,
}

/// What the Check decided, with what the response, the metrics and the decision log need.
struct Decided<'l> {
    decision: Decision,
    /// The verified claims, also when the rule refused them (for the decision log).
    claims: Option<Arc<Claims>>,
    /// The rate-limit policy that decided and its outcome.
    limits: Option<(&'l Policy, Outcome)>,
    /// On a dry-run route: what scopes, step-up and the rule would have decided.
    would: Option<WouldDecide>,
}

impl Decided<'_> {
    fn plain(decision: Decision) -> Self {
        Decided {
            decision,
            claims: None,
            limits: None,
            would: None,
        }
    }
}

impl<S: RevocationStore> CheckService<S> {
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
            dry_run: false,
            dry_run_notes: LogThrottle::new(Duration::from_secs(1)),
            audit: None,
            require_sender_constraint: false,
            dpop: None,
            replay_warnings: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    /// Verifies DPoP proofs, so DPoP-bound tokens can pass.
    pub fn with_dpop(mut self, verifier: DpopVerifier) -> Self {
        self.dpop = Some(verifier);
        self
    }

    /// Refuses unbound tokens on routes without `require_sender_constraint`.
    pub fn requiring_sender_constraint(mut self, required: bool) -> Self {
        self.require_sender_constraint = required;
        self
    }

    /// Records, rather than enforces, scopes, step-up and rules on routes without `dry_run`.
    pub fn dry_run_by_default(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Writes a decision log record for every denial and failure, and sampled allows.
    pub fn with_audit_log(mut self, audit: AuditLog) -> Self {
        self.audit = Some(audit);
        self
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

    /// The route's CEL rule (or the default) over the verified claims and the request.
    fn run_policy(
        &self,
        route: &RouteRequirements<'_>,
        claims: &Claims,
        facts: &RequestFacts<'_>,
        now: i64,
    ) -> Result<(), PolicyRefusal> {
        match &self.policies {
            Some(policies) => policies.check(&route.policy, claims, facts, now),
            None if route.policy == RoutePolicy::Default => Ok(()),
            None if route.policy == RoutePolicy::None => Ok(()),
            None => Err(PolicyRefusal::BadRoute("no policies are configured".into())),
        }
    }

    /// On a dry-run route, what the checks the authorizer skipped (scopes, step-up) and the
    /// rule would have decided, in the order they run when enforced; counted and noted.
    fn would_decide(
        &self,
        route: &RouteRequirements<'_>,
        claims: &Claims,
        reason: AllowReason,
        facts: &RequestFacts<'_>,
        now: i64,
    ) -> WouldDecide {
        // Anonymous requests skip scopes and step-up when enforced too.
        let authenticated = reason != AllowReason::Anonymous;
        let would = if authenticated && !route.scopes_satisfied(claims) {
            WouldDecide::Deny(Denial::InsufficientScope)
        } else if authenticated && !route.authentication_satisfied(claims, now) {
            WouldDecide::Deny(Denial::InsufficientUserAuthentication)
        } else {
            match self.run_policy(route, claims, facts, now) {
                Ok(()) => WouldDecide::Allow,
                Err(PolicyRefusal::Denied) => WouldDecide::Deny(Denial::PolicyDenied),
                Err(PolicyRefusal::BadRoute(problem)) => {
                    self.bad_route(&problem);
                    WouldDecide::BadRoute
                }
            }
        };
        self.metrics.dry_run(would);
        if would != WouldDecide::Allow
            && let Some(held_back) = self.dry_run_notes.allow()
        {
            info!(
                reason = would.reason(),
                rule = self.rule_name(route),
                route = route.route_id.unwrap_or("-"),
                subject = claims.sub.as_deref().unwrap_or("-"),
                held_back,
                "dry run: would deny; allowed"
            );
        }
        would
    }

    /// The name of the rule the route runs, for the logs.
    fn rule_name<'r>(&'r self, route: &RouteRequirements<'r>) -> Option<&'r str> {
        self.policies.as_ref()?.rule_name(&route.policy)
    }

    /// The request's DPoP proof for a token bound to `jkt`: `Ok(true)` when it passed on the
    /// local replay check alone (Redis failed, REVOCATION_FAILURE_MODE=open).
    async fn check_proof(
        &self,
        token: &str,
        jkt: &str,
        attributes: Option<&AttributeContext>,
        now: i64,
    ) -> Result<Result<bool, Denial>, CheckError> {
        let Some(dpop) = &self.dpop else {
            return Ok(Err(Denial::InvalidDpopProof));
        };
        let headers = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|http| &http.headers);
        let target = proof_target(attributes, dpop.trusts_forwarded_proto());
        let outcome = dpop
            .check(dpop_proof(headers), &target, token, jkt, now)
            .await;
        let (error, fail_open) = match outcome {
            ProofOutcome::Valid => return Ok(Ok(false)),
            ProofOutcome::Refused(denial) => return Ok(Err(denial)),
            ProofOutcome::ValidHereOnly(error) => (error, true),
            ProofOutcome::Unavailable(error) => (error, false),
        };
        // Counted with the revocation lookups: the same store, the same failure policy.
        self.metrics.revocation_error(&error);
        if let Some(held_back) = self.replay_warnings.allow() {
            warn!(kind = error.label(), %error, fail_open, held_back,
                "DPoP replay check in Redis failed");
        }
        match fail_open {
            true => Ok(Ok(true)),
            false => Err(CheckError::RevocationUnavailable),
        }
    }

    /// Decides for a token on a route: the authorizer, then the binding, then the rule, then
    /// the rate limits.
    async fn decide<'l>(
        &'l self,
        token: Option<(&str, Scheme)>,
        route: &RouteRequirements<'_>,
        attributes: Option<&AttributeContext>,
    ) -> Result<Decided<'l>, CheckError> {
        let now = unix_now();
        let (token, scheme) = token.unzip();
        let (claims, mut reason) = match self.authorizer.decide(token, route, now).await? {
            Decision::Allow(claims, reason) => (claims, reason),
            denied => return Ok(Decided::plain(denied)),
        };
        let facts = request_facts(attributes);
        // The binding is to this request: checked on every Check, before any rule reads the
        // claims of a token its holder may not use.
        if let (Some(token), Some(scheme)) = (token, scheme)
            && reason != AllowReason::Anonymous
        {
            let required =
                (route.require_sender_constraint).unwrap_or(self.require_sender_constraint);
            let bound = match binding::check(&claims, facts.source_certificate, scheme, required) {
                Ok(Proof::Done) => Ok(()),
                Ok(Proof::Dpop(jkt)) => match self.check_proof(token, &jkt, attributes, now).await?
                {
                    Ok(true) => {
                        reason = AllowReason::RevocationFailOpen;
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(denial) => Err(denial),
                },
                Err(denial) => Err(denial),
            };
            if let Err(denial) = bound {
                return Ok(Decided {
                    decision: Decision::Deny(denial),
                    claims: Some(claims),
                    limits: None,
                    would: None,
                });
            }
        }
        // After the token and revocation, before the rate limits: a request the rule refuses
        // spends no budget.
        let (ruled, would) = match route.dry_run() {
            true => {
                let would = self.would_decide(route, &claims, reason, &facts, now);
                (Ok(()), Some(would))
            }
            false => (self.run_policy(route, &claims, &facts, now), None),
        };
        match ruled {
            Ok(()) => {
                let limits = self.limit(route, attributes, &claims, reason).await?;
                Ok(Decided {
                    decision: Decision::Allow(claims, reason),
                    claims: None,
                    limits,
                    would,
                })
            }
            Err(PolicyRefusal::Denied) => Ok(Decided {
                decision: Decision::Deny(Denial::PolicyDenied),
                claims: Some(claims),
                limits: None,
                would,
            }),
            Err(PolicyRefusal::BadRoute(problem)) => Err(self.bad_route(&problem)),
        }
    }

    /// The decision log's record of one answered Check, if it is kept.
    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        audit: &AuditLog,
        outcome: (&'static str, &'static str),
        response: &CheckResponse,
        decided: Option<&Decided<'_>>,
        route: Option<&RouteRequirements<'_>>,
        token: Option<&str>,
        attributes: Option<&AttributeContext>,
    ) {
        let (decision, reason) = outcome;
        if decision == "allow" && !audit.sample_allow() {
            return;
        }
        let claims = decided.and_then(|d| match &d.decision {
            Decision::Allow(claims, _) => Some(&**claims),
            Decision::Deny(_) => d.claims.as_deref(),
        });
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let request_id = http.and_then(|h| match h.id.as_str() {
            "" => h.headers.get("x-request-id").map(String::as_str),
            id => Some(id),
        });
        let hops = self
            .limiter
            .as_ref()
            .map_or(0, |l| l.config().trusted_proxy_hops);
        let ran_rule = claims.is_some() && route.is_some_and(|r| r.policy != RoutePolicy::None);
        audit.record(&Record {
            time: now_rfc3339(),
            decision,
            reason,
            status: http_status(response),
            rule: route.filter(|_| ran_rule).and_then(|r| self.rule_name(r)),
            dry_run: decided.and_then(|d| d.would).map(|w| {
                if w == WouldDecide::Allow {
                    "allow"
                } else {
                    w.reason()
                }
            }),
            route: route.and_then(|r| r.route_id),
            iss: claims.and_then(|c| c.iss.as_deref()),
            sub: claims.and_then(|c| c.sub.as_deref()),
            token: token.map(fingerprint),
            client_ip: client_ip(attributes, hops).map(|ip| ip.to_string()),
            request_id,
        });
    }

    /// The algorithms a DPoP proof may use, for the DPoP challenge.
    fn dpop_algs(&self) -> &str {
        self.dpop.as_ref().map_or("", DpopVerifier::algs)
    }

    /// The route's requirements from its `context_extensions`, with this service's defaults.
    fn route<'e>(
        &self,
        extensions: &'e HashMap<String, String>,
    ) -> Result<RouteRequirements<'e>, String> {
        let mut route = RouteRequirements::from_extensions(extensions, &self.ignored_route_keys)?;
        route.dry_run.get_or_insert(self.dry_run);
        Ok(route)
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
        let budget = deadline_budget(request.metadata());
        Ok(Response::new(
            self.answer(request.into_inner(), arrived, budget).await,
        ))
    }
}

impl<S: RevocationStore> CheckService<S> {
    /// Answers one Check that `arrived` at that instant, within `budget` of it (the caller's
    /// deadline; `None`: none). The gRPC service and the in-Envoy module both answer here.
    pub async fn answer(
        &self,
        request: CheckRequest,
        arrived: Instant,
        budget: Option<Duration>,
    ) -> CheckResponse {
        let _in_flight = InFlight::start(&self.metrics, arrived);
        let started = Instant::now();
        let waited = started - arrived;
        let budget = budget.map(|b| b.saturating_sub(waited));
        if budget == Some(Duration::ZERO) {
            // It waited out the caller's deadline before it was first run: do no work for it.
            self.metrics.failed(CheckError::DeadlineExceeded);
            return failure(CheckError::DeadlineExceeded);
        }
        let attributes = request.attributes.as_ref();
        let headers = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|http| &http.headers);
        let presented = headers.and_then(|h| extract_token(h, &self.token_source));
        let token = presented.map(|(token, _)| token);
        let no_extensions = HashMap::new();
        let extensions = attributes.map_or(&no_extensions, |a| &a.context_extensions);
        let route = self.route(extensions);
        let decide = async {
            let route = route.as_ref().map_err(|problem| self.bad_route(problem))?;
            self.decide(presented, route, attributes).await
        };
        // Answer before Envoy gives up: a 503 we count beats a timeout nobody sees here.
        let decided = match budget.and_then(|budget| started.checked_add(budget)) {
            Some(deadline) => within(deadline, decide).await,
            None => decide.await,
        };
        let (response, outcome) = match &decided {
            Ok(Decided {
                decision: Decision::Allow(_, _),
                limits: Some((policy, outcome)),
                ..
            }) if outcome.limited => {
                self.metrics.denied(Denial::RateLimited);
                (
                    rate_limited(policy, outcome),
                    ("deny", Denial::RateLimited.label()),
                )
            }
            Ok(Decided {
                decision: Decision::Allow(claims, reason),
                limits,
                ..
            }) => {
                self.metrics.allowed(*reason);
                let reported = self
                    .limiter
                    .as_ref()
                    .is_some_and(|l| l.config().response_headers);
                let limits = limits.as_ref().filter(|_| reported);
                let response = allow(claims, &self.upstream, limits.map(|(p, o)| (*p, o)));
                (response, ("allow", reason.label()))
            }
            Ok(Decided {
                decision: Decision::Deny(denial),
                ..
            }) => {
                let denial = *denial;
                self.metrics.denied(denial);
                let response = match (denial, &route) {
                    (Denial::InsufficientUserAuthentication, Ok(route)) => {
                        step_up(&route.acr_values, route.max_age)
                    }
                    _ => deny(denial),
                };
                let dpop_scheme = presented.is_some_and(|(_, scheme)| scheme == Scheme::Dpop);
                // RFC 9449 7.1: a DPoP client is challenged in the DPoP scheme, whatever failed.
                let dpop_denial = matches!(denial, Denial::InvalidDpopProof | Denial::DpopReplay);
                let response = if dpop_scheme || dpop_denial {
                    in_dpop_scheme(response, self.dpop_algs())
                } else {
                    response
                };
                (response, ("deny", denial.label()))
            }
            Err(error) => {
                self.metrics.failed(*error);
                if let Some(held_back) = self.failure_warnings.allow() {
                    warn!(reason = error.label(), %error, held_back, "check failed");
                }
                (failure(*error), ("error", error.label()))
            }
        };
        if let Some(audit) = &self.audit {
            self.audit(
                audit,
                outcome,
                &response,
                decided.as_ref().ok(),
                route.as_ref().ok(),
                token,
                attributes,
            );
        }
        response
    }
}

/// `work`, or `DeadlineExceeded` at `deadline`. Polled once before any timer is set: a Check
/// answered at once (a cached token, no Redis call) costs no timer.
async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = Result<T, CheckError>>,
) -> Result<T, CheckError> {
    let mut work = std::pin::pin!(work);
    let at_once = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    match at_once {
        Poll::Ready(done) => done,
        Poll::Pending => tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or(Err(CheckError::DeadlineExceeded)),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
