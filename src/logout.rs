//! OpenID Connect Back-Channel Logout 1.0: the identity provider POSTs a signed logout token
//! (`logout_token=<JWT>`, form-encoded) when a user logs out, and this endpoint turns it into a
//! session (`sid`) or subject (`sub`) cut-off revocation in the configured backend, so every
//! Check of every replica denies that session's tokens from then on.
//!
//! Off unless `BACKCHANNEL_LOGOUT_LISTEN_ADDR` is set. It runs on a listener of its own: the
//! identity provider must reach it, and nothing else on the operations listener should be
//! reachable from there.
//!
//! What is checked, cheapest first, and why a token is refused (400 `invalid_request`): the
//! JWT's structure and `alg` (the JWT_ALGORITHMS allowlist: never `none` or HMAC), `iss` (a
//! trusted issuer, optionally fewer), `aud` (holds BACKCHANNEL_LOGOUT_CLIENT_ID), `iat`
//! (present, not ahead of the clock beyond the leeway, not older than
//! BACKCHANNEL_LOGOUT_MAX_AGE), `exp` (when present, not passed), `events` (an object with the
//! back-channel-logout member, itself an object), `sid` and/or `sub`, no `nonce`, a `jti`; then
//! the signature with the issuer's keys (the JWKS machinery Checks use), then `jti` not seen
//! within the replay window. A `typ` header is not required; `logout+jwt` is accepted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::claims::Claims;
use crate::decision::Denial;
use crate::jwks::{IssuerKeys, LookupError};
use crate::jwt::{self, JwtPolicy};
use crate::metrics::{LogoutResult, Metrics};
use crate::replay::{Claimed, ReplayGuard};
use crate::revocation::{Backend, Revocation, StoreError};
use crate::throttle::LogThrottle;

/// The path the identity provider is configured with (`backchannel_logout_uri`).
pub const PATH: &str = "/backchannel-logout";

/// The `events` member that makes a JWT a logout token (spec section 2.4).
pub const LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// The endpoint's settings (the `BACKCHANNEL_LOGOUT_*` settings), built by `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutSettings {
    pub listen_addr: SocketAddr,
    /// The `aud` a logout token must carry: this relying party's client id at the IdP.
    pub client_id: String,
    /// Issuers whose logout tokens are accepted: trusted issuers, all of them unless narrowed.
    pub issuers: Vec<String>,
    /// Oldest `iat` accepted; also how long a `jti` is remembered (plus twice the leeway).
    pub max_age: Duration,
    /// Largest request body read, bytes; a bigger one is answered 413 unread.
    pub max_body_bytes: usize,
    /// Requests per second the endpoint answers (a bucket of as many); beyond it, 429.
    pub rate_per_second: u32,
    /// `jti`s remembered in process for the replay check.
    pub replay_cache_max_entries: u64,
    /// Redis backend: prefix of the shared replay keys (`SET NX` with expiry).
    pub replay_key_prefix: String,
}

/// Why a logout request was refused: the `error_description` of the 400, and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// What a valid logout token asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutToken {
    pub issuer: String,
    pub jti: String,
    pub session: Option<String>,
    pub subject: Option<String>,
}

impl LogoutToken {
    /// Spec section 2.4: with a `sid`, that session is logged out; with only a `sub`, every
    /// session of the subject.
    pub fn revocation(&self, now: i64) -> Revocation {
        match (&self.session, &self.subject) {
            (Some(session), _) => Revocation::Session {
                issuer: self.issuer.clone(),
                session: session.clone(),
                revoked_at: now,
            },
            (None, subject) => Revocation::Subject {
                issuer: self.issuer.clone(),
                subject: subject.clone().unwrap_or_default(),
                revoked_at: now,
            },
        }
    }
}

/// A non-empty string claim; an empty `sid`, `sub` or `jti` names nothing.
fn non_empty(value: Option<&str>) -> Option<String> {
    value.filter(|v| !v.is_empty()).map(str::to_owned)
}

/// The claim rules of a logout token (everything but the signature and the replay check).
/// `now` is unix seconds. Pure, so every rule is a row of a table test.
pub fn check_claims(
    claims: &Claims,
    settings: &LogoutSettings,
    leeway: i64,
    now: i64,
) -> Result<LogoutToken, Invalid> {
    let issuer = claims
        .iss
        .as_deref()
        .filter(|iss| settings.issuers.iter().any(|i| i == iss))
        .ok_or(Invalid(
            "iss is not an issuer whose logout tokens are accepted",
        ))?;
    if !claims.aud.iter().any(|a| **a == *settings.client_id) {
        return Err(Invalid("aud does not contain this client's id"));
    }
    let iat = claims.iat.ok_or(Invalid("iat is missing"))?;
    if iat > now.saturating_add(leeway) {
        return Err(Invalid("iat is in the future"));
    }
    let max_age = settings.max_age.as_secs().min(i64::MAX as u64) as i64;
    if iat < now.saturating_sub(max_age).saturating_sub(leeway) {
        return Err(Invalid("iat is older than the accepted age"));
    }
    if let Some(exp) = claims.exp
        && now >= exp.saturating_add(leeway)
    {
        return Err(Invalid("the logout token expired"));
    }
    let event = claims
        .all
        .get("events")
        .and_then(Value::as_object)
        .and_then(|events| events.get(LOGOUT_EVENT));
    if !event.is_some_and(Value::is_object) {
        return Err(Invalid(
            "events does not hold the back-channel logout event as an object",
        ));
    }
    // Present at all, even `null`: the spec forbids the claim, so that a logout token can
    // never pass as an ID token in an authentication response.
    if claims.all.get("nonce").is_some() {
        return Err(Invalid("a logout token must not contain nonce"));
    }
    let session = non_empty(claims.sid.as_deref());
    let subject = non_empty(claims.sub.as_deref());
    if session.is_none() && subject.is_none() {
        return Err(Invalid("neither sid nor sub is present"));
    }
    let jti = non_empty(claims.jti.as_deref()).ok_or(Invalid("jti is missing"))?;
    Ok(LogoutToken {
        issuer: issuer.to_owned(),
        jti,
        session,
        subject,
    })
}

/// Why a denial from the shared JWT parser refuses a logout token.
fn parse_refusal(denial: Denial) -> Invalid {
    match denial {
        Denial::TokenTooLarge => Invalid("the logout token is too large"),
        Denial::DisallowedAlgorithm => Invalid("the token's alg is not accepted"),
        _ => Invalid("the logout token is not a well-formed signed JWT"),
    }
}

/// A token bucket over every request: the endpoint's only client is the identity provider,
/// so one bucket, not one per address.
struct Bucket {
    rate: f64,
    /// A std lock: a few arithmetic operations under it, no await.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Bucket {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The endpoint: validation, the replay check, the write, and the answers.
pub struct LogoutEndpoint {
    settings: LogoutSettings,
    issuers: HashMap<String, Arc<IssuerKeys>>,
    policy: JwtPolicy,
    store: Arc<Backend>,
    replay: ReplayGuard,
    bucket: Bucket,
    metrics: Arc<Metrics>,
    store_warnings: LogThrottle,
}

impl LogoutEndpoint {
    /// `issuers`: every trusted issuer's keys; only `settings.issuers` are used. `policy`: the
    /// Check policy, whose algorithm allowlist, leeway and size limit apply here too.
    pub fn new(
        settings: LogoutSettings,
        issuers: &HashMap<String, Arc<IssuerKeys>>,
        policy: &JwtPolicy,
        store: Arc<Backend>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let issuers = issuers
            .iter()
            .filter(|(name, _)| settings.issuers.contains(name))
            .map(|(name, keys)| (name.clone(), keys.clone()))
            .collect();
        let leeway = Duration::from_secs(policy.leeway_seconds.max(0) as u64);
        let window = settings.max_age + leeway * 2;
        let replay = ReplayGuard::new(
            settings.replay_cache_max_entries,
            window,
            settings.replay_key_prefix.clone(),
        );
        LogoutEndpoint {
            bucket: Bucket::new(settings.rate_per_second),
            policy: JwtPolicy {
                // A logout token is not an access token, and its `jti` is checked here.
                require_at_jwt: false,
                require_jti: false,
                ..policy.clone()
            },
            settings,
            issuers,
            store,
            replay,
            metrics,
            store_warnings: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    pub fn settings(&self) -> &LogoutSettings {
        &self.settings
    }

    /// Validates one logout token and writes its revocation.
    async fn logout(&self, token: &str, now: i64) -> Result<(), (LogoutResult, &'static str)> {
        let invalid = |Invalid(why): Invalid| (LogoutResult::Invalid, why);
        let jwt = jwt::parse(token, &self.policy).map_err(|d| invalid(parse_refusal(d)))?;
        let logout = check_claims(&jwt.claims, &self.settings, self.policy.leeway_seconds, now)
            .map_err(invalid)?;
        let keys = self
            .issuers
            .get(&logout.issuer)
            .ok_or((LogoutResult::Invalid, "iss has no keys configured"))?;
        let key = keys
            .key_for(jwt.kid.as_deref(), jwt.alg)
            .await
            .map_err(|e| match e {
                LookupError::UnknownKid => (LogoutResult::Invalid, "no key of the issuer matches"),
                LookupError::Unavailable => (
                    LogoutResult::KeysUnavailable,
                    "the issuer's keys are not available",
                ),
            })?;
        jwt::verify_signature(&jwt, &key)
            .map_err(|_| (LogoutResult::Invalid, "the signature does not verify"))?;
        // `iss` and `jti`: one issuer's `jti` cannot block another's.
        let replay_key = ReplayGuard::key(&[&logout.issuer, &logout.jti]);
        match self.replay.claim(replay_key, Some(&*self.store)).await {
            Claimed::First => {}
            Claimed::Replay => {
                return Err((
                    LogoutResult::Replay,
                    "this logout token was already received",
                ));
            }
            Claimed::Failed(error) => {
                // The identity provider retries: its retry must not read as a replay.
                self.replay.forget_local(&replay_key);
                self.store_failed(&error);
                return Err((LogoutResult::StoreError, "the replay check failed"));
            }
        }
        let leeway = self.policy.leeway_seconds;
        if let Err(error) = self.store.revoke(logout.revocation(now), leeway).await {
            self.store_failed(&error);
            if let Err(error) = self.replay.release(replay_key, Some(&*self.store)).await {
                warn!(%error, "back-channel logout: could not release the replay key; a retry \
                    of this logout token is refused until it expires");
            }
            return Err((
                LogoutResult::StoreError,
                "the revocation could not be written",
            ));
        }
        info!(
            issuer = %logout.issuer,
            session = logout.session.is_some(),
            "back-channel logout: revoked {}",
            if logout.session.is_some() { "a session" } else { "a subject" }
        );
        Ok(())
    }

    fn store_failed(&self, error: &StoreError) {
        if let Some(held_back) = self.store_warnings.allow() {
            warn!(kind = error.label(), %error, held_back, "back-channel logout: store write failed");
        }
    }

    /// One HTTP request, answered; every answer carries `Cache-Control: no-store`.
    async fn handle(&self, request: Request) -> Response {
        let (result, response) = self.answer(request).await;
        self.metrics.backchannel_logout(result);
        let mut response = response;
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    async fn answer(&self, request: Request) -> (LogoutResult, Response) {
        if request.method() != Method::POST {
            let response = (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, "POST")],
                error_body("invalid_request", "only POST is accepted"),
            );
            return (LogoutResult::MethodNotAllowed, response.into_response());
        }
        // Before the body is read: a flood costs one lock each.
        if !self.bucket.take() {
            let response = (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                error_body("temporarily_unavailable", "too many logout requests"),
            );
            return (LogoutResult::RateLimited, response.into_response());
        }
        let limit = self.settings.max_body_bytes;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || {
            let body = error_body("invalid_request", "the request body is too large");
            (
                LogoutResult::TooLarge,
                (StatusCode::PAYLOAD_TOO_LARGE, body).into_response(),
            )
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return too_large();
        }
        let form = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        let Ok(body) = axum::body::to_bytes(request.into_body(), limit).await else {
            return too_large();
        };
        let bad = |why: &'static str| {
            (
                LogoutResult::Invalid,
                (StatusCode::BAD_REQUEST, error_body("invalid_request", why)).into_response(),
            )
        };
        if !form {
            return bad("Content-Type must be application/x-www-form-urlencoded");
        }
        let mut tokens = form_urlencoded::parse(&body)
            .filter(|(name, _)| name == "logout_token")
            .map(|(_, value)| value);
        let token = match (tokens.next(), tokens.next()) {
            (Some(token), None) => token,
            (None, _) => return bad("logout_token is missing"),
            (Some(_), Some(_)) => return bad("logout_token is given more than once"),
        };
        match self.logout(&token, unix_now()).await {
            Ok(()) => (LogoutResult::Ok, StatusCode::OK.into_response()),
            Err((result, why)) => {
                debug!(result = result.label(), why, "back-channel logout refused");
                let status = match result {
                    LogoutResult::StoreError | LogoutResult::KeysUnavailable => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                let error = match status {
                    StatusCode::BAD_REQUEST => "invalid_request",
                    _ => "temporarily_unavailable",
                };
                (result, (status, error_body(error, why)).into_response())
            }
        }
    }
}

fn error_body(error: &str, description: &str) -> Response {
    let body = json!({"error": error, "error_description": description}).to_string();
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The listener's routes: [`PATH`], and 404 (with `no-store` too) for anything else.
pub fn router(endpoint: Arc<LogoutEndpoint>) -> axum::Router {
    axum::Router::new()
        .route(
            PATH,
            any(
                |State(e): State<Arc<LogoutEndpoint>>, request: Request| async move {
                    e.handle(request).await
                },
            ),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CACHE_CONTROL, "no-store")],
                "not found\n",
            )
        })
        .with_state(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> LogoutSettings {
        LogoutSettings {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            client_id: "rp".into(),
            issuers: vec!["https://idp".into()],
            max_age: Duration::from_secs(300),
            max_body_bytes: 16384,
            rate_per_second: 10,
            replay_cache_max_entries: 1000,
            replay_key_prefix: "logout-jti:".into(),
        }
    }

    const NOW: i64 = 1_000_000;

    fn claims(change: impl Fn(&mut serde_json::Map<String, Value>)) -> Claims {
        let mut object = json!({
            "iss": "https://idp",
            "aud": ["other", "rp"],
            "iat": NOW,
            "jti": "j1",
            "sid": "s1",
            "sub": "alice",
            "events": {LOGOUT_EVENT: {}},
        })
        .as_object()
        .unwrap()
        .clone();
        change(&mut object);
        Claims::from_object(object).unwrap()
    }

    /// One change to valid logout-token claims.
    type Change<'a> = &'a dyn Fn(&mut serde_json::Map<String, Value>);

    #[test]
    fn claim_rules() {
        let check = |change: Change<'_>| check_claims(&claims(change), &settings(), 60, NOW);
        let good = check(&|_| {}).unwrap();
        assert_eq!(good.session.as_deref(), Some("s1"));
        let refused: Vec<(&str, Change<'_>)> = vec![
            ("iss", &|c| {
                c.insert("iss".into(), json!("https://other"));
            }),
            ("aud", &|c| {
                c.insert("aud".into(), json!("other"));
            }),
            ("iat", &|c| {
                c.remove("iat");
            }),
            ("future", &|c| {
                c.insert("iat".into(), json!(NOW + 61));
            }),
            ("older", &|c| {
                c.insert("iat".into(), json!(NOW - 361));
            }),
            ("expired", &|c| {
                c.insert("exp".into(), json!(NOW - 60));
            }),
            ("events", &|c| {
                c.remove("events");
            }),
            ("events", &|c| {
                c.insert("events".into(), json!({LOGOUT_EVENT: "yes"}));
            }),
            ("events", &|c| {
                c.insert("events".into(), json!([LOGOUT_EVENT]));
            }),
            ("nonce", &|c| {
                c.insert("nonce".into(), json!("n"));
            }),
            ("nonce", &|c| {
                c.insert("nonce".into(), Value::Null);
            }),
            ("sid", &|c| {
                c.remove("sid");
                c.remove("sub");
            }),
            ("sid", &|c| {
                c.insert("sid".into(), json!(""));
                c.remove("sub");
            }),
            ("jti", &|c| {
                c.remove("jti");
            }),
        ];
        for (name, change) in refused {
            let Invalid(why) = check(change).expect_err(name);
            assert!(
                why.contains(name) || name == "future" || name == "older",
                "{name}: {why}"
            );
        }
        assert!(
            check(&|c| {
                c.insert("exp".into(), json!(NOW - 59));
            })
            .is_ok()
        );
        assert!(
            check(&|c| {
                c.insert("iat".into(), json!(NOW - 359));
            })
            .is_ok()
        );
    }

    #[test]
    fn a_sid_revokes_the_session_and_only_a_sub_the_subject() {
        let both = check_claims(&claims(|_| {}), &settings(), 60, NOW).unwrap();
        assert!(
            matches!(both.revocation(7), Revocation::Session { session, revoked_at: 7, .. } if session == "s1")
        );
        let sub = check_claims(
            &claims(|c| {
                c.remove("sid");
            }),
            &settings(),
            60,
            NOW,
        )
        .unwrap();
        assert!(
            matches!(sub.revocation(7), Revocation::Subject { subject, .. } if subject == "alice")
        );
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let bucket = Bucket::new(2);
        assert!(bucket.take() && bucket.take());
        assert!(!bucket.take());
    }
}
