//! What a Check decides, independent of Envoy's wire shapes.
//!
//! A denial is a normal outcome and a value ([`Denial`]); an infrastructure failure that prevents a
//! decision is an error ([`CheckError`]). Both carry a bounded label for logs and metrics.

use std::sync::Arc;

use crate::claims::Claims;

/// The outcome of one Check.
#[derive(Debug)]
pub enum Decision {
    /// The token verified and is not revoked (or the store failed open: see the reason).
    Allow(Arc<Claims>, AllowReason),
    /// The request must not reach the upstream.
    Deny(Denial),
}

/// Why an allowed Check was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowReason {
    /// Verified and not revoked.
    Verified,
    /// Verified, but the revocation store failed and REVOCATION_FAILURE_MODE=open.
    RevocationFailOpen,
    /// No token, on a route with `allow_anonymous: true`.
    Anonymous,
}

impl AllowReason {
    pub const ALL: [AllowReason; 3] = [
        AllowReason::Verified,
        AllowReason::RevocationFailOpen,
        AllowReason::Anonymous,
    ];

    /// The metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            AllowReason::Verified => "verified",
            AllowReason::RevocationFailOpen => "revocation_fail_open",
            AllowReason::Anonymous => "anonymous",
        }
    }
}

/// Why a request was denied. Labels are stable: dashboards and alerts select on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No token in the configured header or cookie.
    MissingToken,
    /// Not a compact JWS: wrong number of parts, bad base64, bad JSON, bad claim types.
    Malformed,
    /// Longer than the configured maximum; rejected before any parsing.
    TokenTooLarge,
    /// `none`, HMAC, an unknown name, one outside the allowlist, or one the key was not made for.
    DisallowedAlgorithm,
    /// No key with the token's `kid`, even after a refetch of the issuer's JWKS.
    UnknownKid,
    /// The signature does not verify with the issuer's key.
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    NotYetValid,
    /// `iss` is missing or not one of the configured issuers.
    WrongIssuer,
    /// `aud` does not name any of the configured audiences.
    WrongAudience,
    /// A required claim (`exp`, or `jti` unless disabled) is absent.
    MissingClaim,
    /// `JWT_REQUIRE_AT_JWT` is on and the header's `typ` is not `at+jwt` (an ID token, say).
    WrongTokenType,
    /// The token's `jti` is in the revocation store.
    Revoked,
    /// Every token of the subject issued up to a cut-off was revoked (log out everywhere).
    RevokedSubject,
    /// Every token of the session issued up to a cut-off was revoked.
    RevokedSession,
    /// The route requires a scope the token does not carry.
    InsufficientScope,
    /// The route's CEL rule is false, or failed at run time (src/policy.rs).
    PolicyDenied,
    /// The route asks a stronger or more recent authentication (`acr_values`, `max_age`) than
    /// the token's `acr`/`auth_time` show (RFC 9470 step-up; 401).
    InsufficientUserAuthentication,
    /// A rate-limit policy's bucket for this caller is empty (HTTP 429).
    RateLimited,
    /// The token is bound to a client certificate (`cnf["x5t#S256"]`, RFC 8705) and the request
    /// came without it, or with another.
    CertificateMismatch,
    /// The route or `REQUIRE_SENDER_CONSTRAINT` asks for a sender-constrained token and this one
    /// has no `cnf` binding.
    UnboundToken,
    /// DPoP (RFC 9449): the token is DPoP-bound (`cnf.jkt`) and the request has no valid proof
    /// for it (none, a bad one, one for another request, key or token), or it came with the
    /// Bearer scheme; or it came with the DPoP scheme and is not DPoP-bound.
    InvalidDpopProof,
    /// A valid DPoP proof whose `jti` was already used within the proof window: a replay.
    DpopReplay,
    /// The token's `cnf` holds only a confirmation method this sidecar cannot check.
    UnsupportedBinding,
}

impl Denial {
    pub const ALL: [Denial; 24] = [
        Denial::MissingToken,
        Denial::Malformed,
        Denial::TokenTooLarge,
        Denial::DisallowedAlgorithm,
        Denial::UnknownKid,
        Denial::BadSignature,
        Denial::Expired,
        Denial::NotYetValid,
        Denial::WrongIssuer,
        Denial::WrongAudience,
        Denial::MissingClaim,
        Denial::WrongTokenType,
        Denial::Revoked,
        Denial::RevokedSubject,
        Denial::RevokedSession,
        Denial::InsufficientScope,
        Denial::PolicyDenied,
        Denial::InsufficientUserAuthentication,
        Denial::RateLimited,
        Denial::CertificateMismatch,
        Denial::UnboundToken,
        Denial::InvalidDpopProof,
        Denial::DpopReplay,
        Denial::UnsupportedBinding,
    ];

    /// The metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            Denial::MissingToken => "missing_token",
            Denial::Malformed => "malformed",
            Denial::TokenTooLarge => "token_too_large",
            Denial::DisallowedAlgorithm => "disallowed_algorithm",
            Denial::UnknownKid => "unknown_kid",
            Denial::BadSignature => "bad_signature",
            Denial::Expired => "expired",
            Denial::NotYetValid => "not_yet_valid",
            Denial::WrongIssuer => "wrong_issuer",
            Denial::WrongAudience => "wrong_audience",
            Denial::MissingClaim => "missing_claim",
            Denial::WrongTokenType => "wrong_token_type",
            Denial::Revoked => "revoked",
            Denial::RevokedSubject => "revoked_subject",
            Denial::RevokedSession => "revoked_session",
            Denial::InsufficientScope => "insufficient_scope",
            Denial::PolicyDenied => "policy_denied",
            Denial::InsufficientUserAuthentication => "insufficient_user_authentication",
            Denial::RateLimited => "rate_limited",
            Denial::CertificateMismatch => "certificate_mismatch",
            Denial::UnboundToken => "unbound_token",
            Denial::InvalidDpopProof => "invalid_dpop_proof",
            Denial::DpopReplay => "dpop_replay",
            Denial::UnsupportedBinding => "unsupported_binding",
        }
    }

    /// Whether the caller failed to authenticate (401), rather than authenticated but may not
    /// pass (403) or not now (429).
    pub fn is_authentication_failure(self) -> bool {
        !matches!(
            self,
            Denial::WrongAudience
                | Denial::InsufficientScope
                | Denial::PolicyDenied
                | Denial::RateLimited
        )
    }
}

/// What scopes, step-up and the CEL rule would have decided on a dry-run route, where they are
/// recorded (`ext_authz_dry_run_total`) but do not deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WouldDecide {
    Allow,
    /// `InsufficientScope`, `InsufficientUserAuthentication` or `PolicyDenied`.
    Deny(Denial),
    /// The route's rule could not run (an unknown `policy_ref`, an expression that does not
    /// compile): enforced, that would be a 500 `bad_route_config`.
    BadRoute,
}

impl WouldDecide {
    /// Every value, for the metric's series.
    pub const ALL: [WouldDecide; 5] = [
        WouldDecide::Allow,
        WouldDecide::Deny(Denial::InsufficientScope),
        WouldDecide::Deny(Denial::InsufficientUserAuthentication),
        WouldDecide::Deny(Denial::PolicyDenied),
        WouldDecide::BadRoute,
    ];

    /// The `would` label.
    pub fn would(self) -> &'static str {
        match self {
            WouldDecide::Allow => "allow",
            _ => "deny",
        }
    }

    /// The `reason` label: the reason the denial or failure would have been counted under.
    pub fn reason(self) -> &'static str {
        match self {
            WouldDecide::Allow => "none",
            WouldDecide::Deny(denial) => denial.label(),
            WouldDecide::BadRoute => CheckError::BadRouteConfig.label(),
        }
    }
}

/// A failure of the sidecar's own dependencies: no decision could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum CheckError {
    /// The issuer's keys were never loaded, or are older than `JWKS_MAX_STALE`.
    #[error("no usable signing keys for the issuer")]
    JwksUnavailable,
    /// The revocation store could not be asked.
    #[error("revocation store unavailable")]
    RevocationUnavailable,
    /// The route's context_extensions hold a value this sidecar cannot read.
    #[error("bad per-route configuration")]
    BadRouteConfig,
    /// The rate-limit backend could not be asked and its failure mode is closed.
    #[error("rate limit backend unavailable")]
    RateLimitUnavailable,
    /// `MAX_IN_FLIGHT` Checks were already being answered: shed at once, not queued.
    #[error("overloaded: MAX_IN_FLIGHT Checks in flight")]
    Overloaded,
    /// The caller's deadline (`grpc-timeout`) came before a dependency answered.
    #[error("the caller's deadline passed before a decision")]
    DeadlineExceeded,
    /// The stream's request was not received within `GRPC_REQUEST_READ_TIMEOUT` of its
    /// headers (a stalled or slow-loris client): answered so it cannot hold a permit.
    #[error("the request did not arrive within GRPC_REQUEST_READ_TIMEOUT")]
    RequestReadTimeout,
}

impl CheckError {
    pub const ALL: [CheckError; 7] = [
        CheckError::JwksUnavailable,
        CheckError::RevocationUnavailable,
        CheckError::BadRouteConfig,
        CheckError::RateLimitUnavailable,
        CheckError::Overloaded,
        CheckError::DeadlineExceeded,
        CheckError::RequestReadTimeout,
    ];

    /// The metric and log label.
    pub fn label(self) -> &'static str {
        match self {
            CheckError::JwksUnavailable => "jwks_unavailable",
            CheckError::RevocationUnavailable => "revocation_unavailable",
            CheckError::BadRouteConfig => "bad_route_config",
            CheckError::RateLimitUnavailable => "rate_limit_unavailable",
            CheckError::Overloaded => "overloaded",
            CheckError::DeadlineExceeded => "deadline_exceeded",
            CheckError::RequestReadTimeout => "request_read_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_unique_snake_case() {
        let labels: HashSet<_> = Denial::ALL.iter().map(|d| d.label()).collect();
        assert_eq!(labels.len(), Denial::ALL.len());
        for label in labels {
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
        }
    }

    #[test]
    fn only_audience_scope_policy_and_rate_denials_are_not_authentication_failures() {
        for denial in Denial::ALL {
            let authenticated = matches!(
                denial,
                Denial::WrongAudience
                    | Denial::InsufficientScope
                    | Denial::PolicyDenied
                    | Denial::RateLimited
            );
            assert_eq!(denial.is_authentication_failure(), !authenticated);
        }
    }
}
