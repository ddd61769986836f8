//! An allow given again without a Check, for the in-Envoy module: it remembers, per route, the
//! allows of the tokens it saw, and asks here whether each would still be the same answer.
//!
//! Only where the token alone decides: a bearer token, unbound, on a route with no rule, no
//! rate limit, no dry run, and no decision log of allows (each reads the request or counts it).
//! On every reuse what a token cache hit checks and can change on one route is checked again
//! (the key still served, the time rules, the revocation stamp still holding), so a reuse
//! answers what a Check would; when any fails, the caller runs the Check in full.

use std::collections::HashMap;
use std::time::Instant;

use super::request::token_in_header;
use super::response::allow;
use super::{CheckService, unix_now};
use crate::authorizer::KnownToken;
use crate::binding::{self, Proof, Scheme};
use crate::decision::AllowReason;
use crate::pb::envoy::service::auth::v3::CheckResponse;
use crate::revocation::RevocationStore;
use crate::route::{RoutePolicy, RouteRequirements};

/// An allowed token, as the token cache knows it, to judge each reuse by.
pub struct RepeatableAllow {
    known: KnownToken,
}

impl<S: RevocationStore> CheckService<S> {
    /// The header the token is read from (lower-case).
    pub fn token_header(&self) -> &str {
        &self.token_source.header
    }

    /// After a Check allowed: the allow of the token in `header` (the one value of the token
    /// header) on the route of `extensions`, if it can be given again without a Check, with
    /// what that Check answered and each reuse answers (`allow` of the claims, no rate-limit
    /// fields).
    pub fn repeatable_allow(
        &self,
        header: &str,
        extensions: &HashMap<String, String>,
    ) -> Option<(RepeatableAllow, CheckResponse)> {
        let (token, Scheme::Bearer) = token_in_header(header, &self.token_source)? else {
            return None;
        };
        let route = self.route(extensions).ok()?;
        if token.is_empty() || !self.token_alone_decides(&route) {
            return None;
        }
        let known = self.authorizer.known(token, &route, unix_now())?;
        let required = route
            .require_sender_constraint
            .unwrap_or(self.require_sender_constraint);
        // Unbound only: a bound token is checked against each request's proof or certificate.
        let unbound = matches!(
            binding::check(known.claims(), "", Scheme::Bearer, required),
            Ok(Proof::Done)
        );
        unbound.then(|| {
            let response = allow(known.claims(), &self.upstream, None);
            (RepeatableAllow { known }, response)
        })
    }

    /// Whether the Check would allow it again now with the same answer, on the route it was
    /// made for (the caller finds it by route). When it would, it is counted as that Check: an
    /// allow of a verified token, a token and revocation cache hit, and its duration from
    /// `arrived`, which is also the token's verification time (one clock read for both: a reuse
    /// is all verification).
    pub fn allows_again(&self, again: &RepeatableAllow, arrived: Instant) -> bool {
        if !self.authorizer.decides_again(&again.known, unix_now()) {
            return false;
        }
        let took = arrived.elapsed();
        self.metrics.jwt_verify_duration.record(took);
        self.metrics.allowed(AllowReason::Verified);
        self.metrics.allow_reused();
        self.metrics.request_duration.record(took);
        true
    }

    /// Whether nothing but the token decides on this route: no rule, rate limit or dry run
    /// reads the request, and the decision log records no allow.
    fn token_alone_decides(&self, route: &RouteRequirements<'_>) -> bool {
        let no_rule = match &self.policies {
            Some(policies) => policies.rule_name(&route.policy).is_none(),
            None => matches!(route.policy, RoutePolicy::Default | RoutePolicy::None),
        };
        let no_limit = match (&self.limiter, route.rate_limit.as_deref()) {
            (_, Some(["none"])) | (None, None) => true,
            (Some(limiter), None) => limiter.config().default_policies.is_empty(),
            (_, Some(_)) => false,
        };
        let no_allow_records = self.audit.as_ref().is_none_or(|a| !a.records_allows());
        no_rule && no_limit && no_allow_records && !route.dry_run()
    }
}
