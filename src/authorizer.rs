//! Turns a token into a [`Decision`]: parse, pick the issuer, check claims, find the key,
//! verify, ask the revocation store. Knows nothing of Envoy's messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{Level, debug, warn};

use crate::decision::{CheckError, Decision, Denial};
use crate::jwks::{IssuerKeys, LookupError};
use crate::jwt::{self, JwtPolicy, UnverifiedJwt};
use crate::metrics::{AllowReason, Metrics};
use crate::revocation::{FailureMode, RevocationStore, Revoked, TokenIdentity};
use crate::route::RouteRequirements;
use crate::throttle::LogThrottle;

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
}

/// Why a token was not allowed: a denial, or a failure that prevented a decision.
enum Refusal {
    Denied(Denial),
    Failed(CheckError),
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
    ) -> Self {
        Authorizer {
            issuers,
            policy,
            store,
            failure_mode,
            metrics,
            store_warnings: LogThrottle::new(Duration::from_secs(10)),
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
        let jwt = match jwt::parse(token, &self.policy) {
            Ok(jwt) => jwt,
            Err(denial) => {
                self.metrics.jwt_verify_duration.record(started.elapsed());
                return Ok(self.deny(Some(token), None, denial));
            }
        };
        let verified = self.verify(&jwt, route, now).await;
        self.metrics.jwt_verify_duration.record(started.elapsed());
        let issuer = match verified {
            Ok(issuer) => issuer,
            Err(Refusal::Denied(denial)) => {
                return Ok(self.deny(Some(token), jwt.claims.iss.as_deref(), denial));
            }
            Err(Refusal::Failed(error)) => return Err(error),
        };

        let identity = TokenIdentity {
            issuer: issuer.keys.issuer(),
            jti: jwt.claims.jti.as_deref(),
            subject: jwt.claims.sub.as_deref(),
            session: jwt.claims.sid.as_deref(),
            issued_at: jwt.claims.iat,
        };
        let started = Instant::now();
        let revoked = self.store.lookup(&identity).await;
        self.metrics
            .revocation_lookup_duration
            .record(started.elapsed());
        let denial = match revoked {
            Ok(None) => return Ok(Decision::Allow(Arc::new(jwt.claims), AllowReason::Verified)),
            Ok(Some(Revoked::Token)) => Denial::Revoked,
            Ok(Some(Revoked::Subject)) => Denial::RevokedSubject,
            Ok(Some(Revoked::Session)) => Denial::RevokedSession,
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
                return Ok(Decision::Allow(
                    Arc::new(jwt.claims),
                    AllowReason::RevocationFailOpen,
                ));
            }
        };
        Ok(self.deny(Some(token), Some(issuer.keys.issuer()), denial))
    }

    /// Everything about the token itself, cheapest first, returning its trusted issuer.
    async fn verify(
        &self,
        jwt: &UnverifiedJwt<'_>,
        route: &RouteRequirements<'_>,
        now: i64,
    ) -> Result<&Issuer, Refusal> {
        let issuer = jwt
            .claims
            .iss
            .as_deref()
            .and_then(|iss| self.issuers.get(iss))
            .ok_or(Denial::WrongIssuer)?;
        // Every claim rule runs before the key lookup, which may fetch: a flood of expired or
        // foreign tokens with unknown kids costs no JWKS traffic.
        match &route.audiences {
            None => jwt::check_claims(&jwt.claims, &issuer.audiences, &self.policy, now)?,
            Some(audiences) => jwt::check_claims(&jwt.claims, audiences, &self.policy, now)?,
        }
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
        if !route.scopes_satisfied(&jwt.claims) {
            return Err(Denial::InsufficientScope.into());
        }
        Ok(issuer)
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
