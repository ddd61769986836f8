//! Turns a token into a [`Decision`]: parse, pick the issuer, check claims, find the key,
//! verify, ask the revocation store. Knows nothing of Envoy's messages.

use std::collections::HashMap;
use std::sync::Arc;

use crate::decision::{CheckError, Decision, Denial};
use crate::jwks::{IssuerKeys, LookupError};
use crate::jwt::{self, JwtPolicy};
use crate::revocation::{FailureMode, RevocationStore, Revoked, TokenIdentity};

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
    ) -> Self {
        Authorizer {
            issuers,
            policy,
            store,
            failure_mode,
        }
    }

    /// Decides for one request. `now` is unix seconds.
    pub async fn decide(&self, token: Option<&str>, now: i64) -> Result<Decision, CheckError> {
        let Some(token) = token else {
            return Ok(Decision::Deny(Denial::MissingToken));
        };
        match self.verify(token, now).await {
            Ok(claims) => Ok(Decision::Allow(Arc::new(claims))),
            Err(Refusal::Denied(denial)) => Ok(Decision::Deny(denial)),
            Err(Refusal::Failed(error)) => Err(error),
        }
    }

    async fn verify(&self, token: &str, now: i64) -> Result<jwt::Claims, Refusal> {
        let jwt = jwt::parse(token, &self.policy)?;
        let issuer = jwt
            .claims
            .iss
            .as_deref()
            .and_then(|iss| self.issuers.get(iss))
            .ok_or(Denial::WrongIssuer)?;
        // Every claim rule runs before the key lookup, which may fetch: a flood of expired or
        // foreign tokens with unknown kids costs no JWKS traffic.
        jwt::check_claims(&jwt.claims, &issuer.audiences, &self.policy, now)?;
        let key = issuer
            .keys
            .key_for(jwt.kid.as_deref(), jwt.alg)
            .await
            .map_err(|e| match e {
                LookupError::UnknownKid => Refusal::Denied(Denial::UnknownKid),
                LookupError::Unavailable => Refusal::Failed(CheckError::JwksUnavailable),
            })?;
        jwt::verify_signature(&jwt, &key)?;

        let identity = TokenIdentity {
            issuer: issuer.keys.issuer(),
            jti: jwt.claims.jti.as_deref(),
            subject: jwt.claims.sub.as_deref(),
            session: jwt.claims.sid.as_deref(),
            issued_at: jwt.claims.iat,
        };
        match self.store.lookup(&identity).await {
            Ok(None) => Ok(jwt.claims),
            Ok(Some(Revoked::Token)) => Err(Denial::Revoked.into()),
            Ok(Some(Revoked::Subject)) => Err(Denial::RevokedSubject.into()),
            Ok(Some(Revoked::Session)) => Err(Denial::RevokedSession.into()),
            Err(error) => match self.failure_mode {
                FailureMode::Closed => {
                    tracing::debug!(reason = error.label(), %error, "revocation lookup failed; denying");
                    Err(Refusal::Failed(CheckError::RevocationUnavailable))
                }
                FailureMode::Open => {
                    tracing::debug!(reason = error.label(), %error, "revocation lookup failed; allowing (fail-open)");
                    Ok(jwt.claims)
                }
            },
        }
    }
}
