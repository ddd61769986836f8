//! Turns a token into a [`Decision`]: parse, pick the issuer, check claims, find the key,
//! verify, ask the revocation store. Knows nothing of Envoy's messages.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{Level, debug, warn};

use crate::claims::Claims;
use crate::decision::{AllowReason, CheckError, Decision, Denial};
use crate::jwks::{IssuerKeys, KeySet, LookupError};
use crate::jwt::{self, JwtPolicy, UnverifiedJwt};
use crate::keys::VerifyingKey;
use crate::metrics::Metrics;
use crate::revocation::{AnswerStamp, FailureMode, RevocationStore, Revoked, TokenIdentity};
use crate::route::RouteRequirements;
use crate::throttle::LogThrottle;
use crate::token_cache::{self, TokenCache, TokenDigest, VerifiedToken};

/// One trusted issuer at run time.
pub struct Issuer {
    pub keys: Arc<IssuerKeys>,
    /// Accepted audiences; empty means `aud` is not checked.
    pub audiences: Vec<String>,
}

pub struct Authorizer<S> {
    issuers: HashMap<String, Issuer>,
    policy: JwtPolicy,
    store: S,
    failure_mode: FailureMode,
    metrics: Arc<Metrics>,
    store_warnings: LogThrottle,
    token_cache: Option<Arc<TokenCache>>,
}

/// A token the cache holds as verified, with the stamp of its last "not revoked" answer, known
/// on one route: what [`Authorizer::decides_again`] needs to allow it again there without
/// hashing or parsing it, or reading its claims. For a caller that finds tokens by their own
/// bytes and route (the in-Envoy module). In declared order, what every reuse reads first: a
/// caller keeping many of them reads one or two cache lines per reuse.
#[repr(C)]
pub struct KnownToken {
    /// The set that served the token's key when it became known, and the issuer's keys: while
    /// the issuer still serves that same set, the key needs no lookup.
    served_by: Arc<KeySet>,
    keys: Arc<IssuerKeys>,
    /// The unix seconds during which the route's rules allow the claims
    /// ([`Authorizer::rules_hold`]).
    valid_from: i64,
    valid_until: i64,
    verified: VerifiedToken,
}

impl KnownToken {
    pub fn claims(&self) -> &Arc<Claims> {
        &self.verified.claims
    }
}

/// Why a token was not allowed: a denial, or a failure that prevented a decision.
enum Refusal {
    Denied(Denial),
    Failed(CheckError),
}

/// A token that passed its signature (now or when it was cached), time and route checks.
struct Authenticated<'a> {
    claims: Arc<Claims>,
    issuer: &'a Issuer,
    /// Where the token cache holds it, and the stamp of its last "not revoked" answer.
    cached: Option<(TokenDigest, AnswerStamp)>,
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Self {
        Refusal::Denied(denial)
    }
}

impl<S: RevocationStore> Authorizer<S> {
    pub fn new(
        issuers: HashMap<String, Issuer>,
        policy: JwtPolicy,
        store: S,
        failure_mode: FailureMode,
        metrics: Arc<Metrics>,
        token_cache: Option<Arc<TokenCache>>,
    ) -> Self {
        Authorizer {
            issuers,
            policy,
            store,
            failure_mode,
            metrics,
            store_warnings: LogThrottle::new(Duration::from_secs(10)),
            token_cache,
        }
    }

    /// Decides for one request on a route. `now` is unix seconds.
    pub async fn decide(
        &self,
        token: Option<&str>,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<Decision, CheckError> {
        let Some(token) = token else {
            if route.allow_anonymous {
                return Ok(Decision::Allow(Arc::default(), AllowReason::Anonymous));
            }
            return Ok(self.deny(None, None, Denial::MissingToken));
        };
        let started = Instant::now();
        let authenticated = self.authenticate(token, route, now).await;
        let verified_at = Instant::now();
        self.metrics
            .jwt_verify_duration
            .record(verified_at - started);
        let Authenticated {
            claims,
            issuer,
            cached,
        } = match authenticated {
            Ok(found) => found,
            Err((Refusal::Denied(denial), claimed_issuer)) => {
                return Ok(self.deny(Some(token), claimed_issuer.as_deref(), denial));
            }
            Err((Refusal::Failed(error), _)) => return Err(error),
        };
        // Nothing the token's last "not revoked" answer read has changed since: that answer is
        // what a lookup would give (counted as a revocation cache hit, no lookup timed).
        if let Some((_, stamp)) = cached
            && self.store.still_holds(stamp, now)
        {
            return Ok(Decision::Allow(claims, AllowReason::Verified));
        }

        let identity = TokenIdentity {
            issuer: issuer.keys.issuer(),
            jti: claims.jti.as_deref(),
            subject: claims.sub.as_deref(),
            session: claims.sid.as_deref(),
            issued_at: claims.iat,
        };
        let revoked = self.store.lookup_stamped(&identity).await;
        self.metrics
            .revocation_lookup_duration
            .record(verified_at.elapsed());
        let denial = match revoked {
            Ok((None, stamp)) => {
                if let (Some(cache), Some((digest, kept))) = (&self.token_cache, cached)
                    && stamp != AnswerStamp::NONE
                    && stamp != kept
                {
                    cache.keep_revocation_stamp(&digest, stamp.to_bits());
                }
                return Ok(Decision::Allow(claims, AllowReason::Verified));
            }
            Ok((Some(Revoked::Token), _)) => Denial::Revoked,
            Ok((Some(Revoked::Subject), _)) => Denial::RevokedSubject,
            Ok((Some(Revoked::Session), _)) => Denial::RevokedSession,
            Err(error) => {
                self.metrics.revocation_error(&error);
                let fail_open = self.failure_mode == FailureMode::Open;
                if let Some(held_back) = self.store_warnings.allow() {
                    warn!(kind = error.label(), %error, fail_open, held_back,
                        "revocation lookup failed");
                }
                if !fail_open {
                    return Err(CheckError::RevocationUnavailable);
                }
                return Ok(Decision::Allow(claims, AllowReason::RevocationFailOpen));
            }
        };
        Ok(self.deny(Some(token), Some(issuer.keys.issuer()), denial))
    }

    /// The token as the cache holds it, if it is verified under a key still served, its last
    /// lookup left a stamp (a store without stamps has none to reuse), and the
    /// route's rules allow it at `now`.
    pub fn known(
        &self,
        token: &str,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Option<KnownToken> {
        let cache = self.token_cache.as_ref()?;
        let verified = cache.get(&token_cache::digest(token), now)?;
        let issuer = self.issuers.get(verified.claims.iss.as_deref()?)?;
        let served_by = issuer.keys.usable()?;
        let holds = self.rules_hold(&verified.claims, route)?;
        let known = verified.revocation_stamp != AnswerStamp::NONE.to_bits()
            && key_served_by(&served_by, &verified)
            && self
                .route_rules(&verified.claims, issuer, route, now)
                .is_ok()
            && holds.contains(&now);
        known.then(|| KnownToken {
            served_by,
            keys: issuer.keys.clone(),
            valid_from: *holds.start(),
            valid_until: *holds.end(),
            verified,
        })
    }

    /// Whether `decide` would allow the known token at `now` as a verified token on the route
    /// it became known on, from what can change there: the key still served, the time rules,
    /// and the revocation stamp still holding. Counted as a token cache hit when it would (the
    /// caller times it); when it would not, nothing is counted and the caller decides in full.
    pub fn decides_again(&self, known: &KnownToken, now: i64) -> bool {
        let key_served = known.keys.usable().is_some_and(|set| {
            Arc::ptr_eq(&set, &known.served_by) || key_served_by(&set, &known.verified)
        });
        let stamp = AnswerStamp::from_bits(known.verified.revocation_stamp);
        let allowed = (known.valid_from..=known.valid_until).contains(&now)
            && key_served
            && self.store.still_holds(stamp, now);
        if allowed {
            self.metrics.token_cache(true);
        }
        allowed
    }

    /// The unix seconds during which [`Authorizer::route_rules`] gives the claims on `route`
    /// the answer it gives at any one of them (`None` if it never allows them): its other
    /// rules read no clock.
    fn rules_hold(
        &self,
        claims: &Claims,
        route: &RouteRequirements<'_>,
    ) -> Option<RangeInclusive<i64>> {
        let claims_hold = jwt::claims_hold(claims, &self.policy)?;
        let until = route.authentication_holds_until(claims)?;
        Some(*claims_hold.start()..=(*claims_hold.end()).min(until))
    }

    /// The token's verified claims and issuer: from the cache when the token was verified
    /// before and its key is still served, else by full verification (then cached). On a
    /// refusal, also the issuer the token claimed, for the log line.
    async fn authenticate(
        &self,
        token: &str,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<Authenticated<'_>, (Refusal, Option<String>)> {
        let cached = self
            .token_cache
            .as_ref()
            .map(|cache| (cache, token_cache::digest(token)));
        if let Some((cache, digest)) = &cached {
            let hit = cache.get(digest, now).and_then(|hit| {
                let issuer = self.issuers.get(hit.claims.iss.as_deref()?)?;
                key_still_served(issuer, &hit).then_some((hit, issuer))
            });
            if hit.is_none() && cache.was_rejected(digest) {
                // A replay of a token whose signature failed: no parsing, no signature work.
                self.metrics.token_cache_rejected();
                return Err((Denial::BadSignature.into(), None));
            }
            self.metrics.token_cache(hit.is_some());
            if let Some((hit, issuer)) = hit {
                // Skipped: parsing and the signature. Never skipped: time and route rules.
                let stamp = AnswerStamp::from_bits(hit.revocation_stamp);
                return match self.route_rules(&hit.claims, issuer, route, now) {
                    Ok(()) => Ok(Authenticated {
                        claims: hit.claims,
                        issuer,
                        cached: Some((*digest, stamp)),
                    }),
                    Err(denial) => {
                        Err((denial.into(), hit.claims.iss.as_deref().map(str::to_owned)))
                    }
                };
            }
        }
        let jwt = jwt::parse(token, &self.policy).map_err(|denial| (denial.into(), None))?;
        let (issuer, key) = match self.verify(&jwt, route, now).await {
            Ok(verified) => verified,
            Err(refusal) => {
                if let (Refusal::Denied(Denial::BadSignature), Some((cache, digest))) =
                    (&refusal, &cached)
                {
                    cache.reject(*digest);
                }
                return Err((refusal, jwt.claims.iss.as_deref().map(str::to_owned)));
            }
        };
        let claims = Arc::new(jwt.claims);
        if let Some((cache, digest)) = cached {
            let verified = VerifiedToken {
                claims: Arc::new(cache.compact(&claims, issuer.keys.shared_issuer())),
                alg: jwt.alg,
                named_kid: jwt.kid.is_some(),
                key,
                revocation_stamp: AnswerStamp::NONE.to_bits(),
            };
            cache.insert(digest, verified, now);
        }
        Ok(Authenticated {
            claims,
            issuer,
            cached: cached.map(|(_, digest)| (digest, AnswerStamp::NONE)),
        })
    }

    /// The rules that depend on the time and the route: time, audience, scopes and step-up (the
    /// last two not on a dry-run route). Run on every Check, a cache hit or a full verification
    /// alike.
    fn route_rules(
        &self,
        claims: &Claims,
        issuer: &Issuer,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<(), Denial> {
        self.time_and_audience(claims, issuer, route, now)?;
        if route.dry_run() {
            // Recorded by the Check service, not enforced: see `CheckService::dry_run`.
            return Ok(());
        }
        if !route.scopes_satisfied(claims) {
            return Err(Denial::InsufficientScope);
        }
        if !route.authentication_satisfied(claims, now) {
            return Err(Denial::InsufficientUserAuthentication);
        }
        Ok(())
    }

    /// `exp`/`nbf`/`iat`, `jti`, and `aud` against the route's audiences (else the issuer's).
    fn time_and_audience(
        &self,
        claims: &Claims,
        issuer: &Issuer,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<(), Denial> {
        match &route.audiences {
            None => jwt::check_claims(claims, &issuer.audiences, &self.policy, now),
            Some(audiences) => jwt::check_claims(claims, audiences, &self.policy, now),
        }
    }

    /// Everything about the token itself, cheapest first, returning its trusted issuer and the
    /// key that verified it.
    async fn verify(
        &self,
        jwt: &UnverifiedJwt<'_>,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<(&Issuer, Arc<VerifyingKey>), Refusal> {
        let issuer = jwt
            .claims
            .iss
            .as_deref()
            .and_then(|iss| self.issuers.get(iss))
            .ok_or(Denial::WrongIssuer)?;
        // The time and audience rules run before the key lookup too, which may fetch: a flood
        // of expired or foreign tokens with unknown kids costs no JWKS traffic.
        self.time_and_audience(&jwt.claims, issuer, route, now)?;
        let key = issuer
            .keys
            .key_for(jwt.kid.as_deref(), jwt.alg)
            .await
            .map_err(|e| match e {
                LookupError::UnknownKid => Refusal::Denied(Denial::UnknownKid),
                LookupError::Unavailable => Refusal::Failed(CheckError::JwksUnavailable),
            })?;
        jwt::verify_signature(jwt, &key)?;
        // After the signature: only a genuine token's scopes are worth reporting as missing.
        self.route_rules(&jwt.claims, issuer, route, now)?;
        Ok((issuer, key))
    }

    /// A denial, logged at debug with its reason, the (claimed) issuer and a short fingerprint
    /// that correlates repeated attempts without ever logging the token.
    fn deny(&self, token: Option<&str>, issuer: Option<&str>, denial: Denial) -> Decision {
        if tracing::enabled!(Level::DEBUG) {
            let fingerprint = token.map(fingerprint);
            let issuer: String = issuer.unwrap_or("-").chars().take(128).collect();
            debug!(
                reason = denial.label(),
                issuer,
                token = fingerprint.as_deref().unwrap_or("-"),
                "denied"
            );
        }
        Decision::Deny(denial)
    }
}

/// The first 8 bytes of the token's SHA-256, in hex: enough to correlate, useless to replay.
pub fn fingerprint(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the issuer still serves the exact key that verified a cached token: a key dropped
/// from (or replaced in) the JWKS, or keys gone stale, send the token back to verification.
fn key_still_served(issuer: &Issuer, token: &VerifiedToken) -> bool {
    issuer
        .keys
        .usable()
        .is_some_and(|set| key_served_by(&set, token))
}

/// Whether `set` holds the exact key that verified the token, under the token's `kid`.
fn key_served_by(set: &KeySet, token: &VerifiedToken) -> bool {
    set.find(
        token.named_kid.then(|| token.key.kid()).flatten(),
        token.alg,
    )
    .is_some_and(|key| Arc::ptr_eq(&key, &token.key))
}
