//! The `envoy.service.auth.v3.Authorization/Check` service: CheckRequest -> Decision ->
//! CheckResponse. The only module that knows Envoy's message shapes.
//!
//! Envoy allows a request whose CheckResponse has no status (code 0 is the default), so every
//! deny and every failure here sets a non-zero code explicitly.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::admission::Ticket;
use crate::authorizer::Authorizer;
use crate::claims::{Claims, KeptClaims, ReadsClaims};
use crate::decision::{AllowReason, CheckError, Decision, Denial};
use crate::metrics::Metrics;
use crate::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, header_value_option};
use crate::pb::envoy::service::auth::v3::authorization_server::Authorization;
use crate::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    check_response,
};
use crate::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use crate::pb::google::rpc;
use crate::rate_limit::{self, Caller, LimitError, Outcome, Policy, RateLimiter};
use crate::revocation::RevocationStore;
use crate::route::RouteRequirements;
use crate::throttle::LogThrottle;

/// google.rpc.Code values used on denies (Envoy only tests for non-zero).
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_INTERNAL: i32 = 13;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSource {
    /// Lower-case header name (Envoy lower-cases the keys it sends).
    pub header: String,
    /// Cookie consulted when the header carries no token.
    pub cookie: Option<String>,
}

impl TokenSource {
    /// `TOKEN_COOKIE`: a cookie name, or empty for none.
    pub fn parse_cookie(value: &str) -> Result<Option<String>, String> {
        if value.contains([';', '=', ',', ' ']) {
            return Err(format!("{value:?} is not a cookie name"));
        }
        Ok((!value.is_empty()).then(|| value.to_owned()))
    }
}

/// One verified claim copied to an upstream request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHeader {
    pub claim: String,
    /// Lower-case header name.
    pub header: String,
}

impl ClaimHeader {
    /// `CLAIM_HEADERS`: `claim=header` pairs, comma-separated. A header that routes or
    /// authenticates the request (`authorization`, `host`, pseudo-headers) cannot carry a claim.
    pub fn parse_list(value: &str) -> Result<Vec<ClaimHeader>, String> {
        let mut out = Vec::new();
        for pair in crate::config::parse::split_list(value) {
            let (claim, header) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not claim=header"))?;
            let claim = claim.trim();
            if claim.is_empty() {
                return Err(format!("{pair:?} names no claim"));
            }
            let header = crate::config::parse::header_name(header.trim())?;
            if header == "authorization" || header.starts_with(':') || header == "host" {
                return Err(format!("{header:?} cannot carry a claim"));
            }
            out.push(ClaimHeader {
                claim: claim.to_owned(),
                header,
            });
        }
        Ok(out)
    }
}

/// What an allowed request carries upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHeaders {
    pub claim_headers: Vec<ClaimHeader>,
    pub remove_authorization: bool,
    pub metadata_claims: MetadataClaims,
}

impl ReadsClaims for UpstreamHeaders {
    fn claims_read(&self) -> KeptClaims {
        let MetadataClaims::Only(metadata) = &self.metadata_claims else {
            return KeptClaims::All;
        };
        let headers = self.claim_headers.iter().map(|h| &h.claim);
        KeptClaims::Named(metadata.iter().chain(headers).cloned().collect())
    }
}

/// Which verified claims go back to Envoy as dynamic metadata (`DYNAMIC_METADATA_CLAIMS`).
/// Envoy parses and stores every field for every request, so the default is a short list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataClaims {
    All,
    Only(Vec<String>),
}

impl MetadataClaims {
    /// `DYNAMIC_METADATA_CLAIMS`: `*` for every claim, else the listed names (empty: none).
    pub fn parse(value: &str) -> Result<Self, String> {
        Ok(match value.trim() {
            "*" => MetadataClaims::All,
            names => MetadataClaims::Only(crate::config::parse::split_list(names)),
        })
    }
}

pub struct CheckService<S> {
    authorizer: Arc<Authorizer<S>>,
    token_source: TokenSource,
    upstream: UpstreamHeaders,
    metrics: Arc<Metrics>,
    failure_warnings: LogThrottle,
    limiter: Option<Arc<RateLimiter>>,
    /// `context_extensions` keys meant for others, which a route may carry.
    ignored_route_keys: Vec<String>,
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
        }
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
            ip: rate_limit::client_ip(attributes, config.trusted_proxy_hops),
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
        let decide = async {
            let route = RouteRequirements::from_extensions(extensions, &self.ignored_route_keys)
                .map_err(|problem| self.bad_route(&problem))?;
            match self.authorizer.decide(token, &route, unix_now()).await {
                Ok(Decision::Allow(claims, reason)) => self
                    .limit(&route, attributes, &claims, reason)
                    .await
                    .map(|limits| (Decision::Allow(claims, reason), limits)),
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
                let mut response = allow(&claims, &self.upstream);
                let reported = self
                    .limiter
                    .as_ref()
                    .is_some_and(|l| l.config().response_headers);
                if let Some((policy, outcome)) = limits.filter(|_| reported)
                    && let Some(check_response::HttpResponse::OkResponse(ok)) =
                        response.http_response.as_mut()
                {
                    ok.response_headers_to_add = rate_limit_headers(policy, &outcome).into();
                }
                response
            }
            Ok((Decision::Deny(denial), _)) => {
                self.metrics.denied(denial);
                deny(denial)
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

/// The time left to answer: the caller's `grpc-timeout` (Envoy sends its ext_authz timeout)
/// less a tenth, kept for the answer's trip back. `None` without the header.
fn deadline_budget(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    Some(timeout - timeout / 10)
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits, then H, M, S, m, u or n.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The token from the configured header, else from the configured cookie. On the
/// `authorization` header only the Bearer scheme (any case) counts; a custom header may carry
/// the bare token or a Bearer value.
pub fn extract_token<'h>(
    headers: &'h HashMap<String, String>,
    source: &TokenSource,
) -> Option<&'h str> {
    let from_header = headers.get(&source.header).and_then(|value| {
        let value = value.trim();
        match strip_bearer(value) {
            Some(token) => Some(token),
            None if source.header == "authorization" => None,
            None => Some(value),
        }
    });
    let from_cookie = || {
        let name = source.cookie.as_deref()?;
        headers.get("cookie")?.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.trim_matches('"'))
        })
    };
    from_header.or_else(from_cookie).filter(|t| !t.is_empty())
}

fn strip_bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start())
}

fn rpc_status(code: i32, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

/// A header set on the upstream request, replacing any value the client sent. `append` is set
/// explicitly because every Envoy version honours it before `append_action`.
fn overwrite(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append: Some(false),
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

pub fn allow(claims: &Claims, upstream: &UpstreamHeaders) -> CheckResponse {
    let mut headers = Vec::with_capacity(upstream.claim_headers.len());
    let mut headers_to_remove = Vec::new();
    for mapping in &upstream.claim_headers {
        match claims
            .value(&mapping.claim)
            .and_then(|value| header_value(&value))
        {
            Some(value) => headers.push(overwrite(&mapping.header, value)),
            // No claim: strip whatever the client sent under that name.
            None => headers_to_remove.push(mapping.header.clone()),
        }
    }
    if upstream.remove_authorization {
        headers_to_remove.push("authorization".to_owned());
    }
    CheckResponse {
        status: rpc_status(0, ""),
        http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..OkHttpResponse::default()
        })),
        // Envoy stores this under `envoy.filters.http.ext_authz` for access logs and later
        // filters (e.g. `%DYNAMIC_METADATA(envoy.filters.http.ext_authz:sub)%`).
        dynamic_metadata: metadata(claims, &upstream.metadata_claims),
    }
}

/// The configured claims as a protobuf Struct; `None` when none of them is present.
fn metadata(claims: &Claims, wanted: &MetadataClaims) -> Option<prost_types::Struct> {
    let fields: BTreeMap<String, prost_types::Value> = match wanted {
        MetadataClaims::All => claims
            .all
            .iter()
            .map(|(k, v)| (k.clone(), proto_value(v)))
            .collect(),
        MetadataClaims::Only(names) => names
            .iter()
            .filter_map(|name| {
                let value = match claims.value(name)? {
                    Cow::Borrowed(value) => proto_value(value),
                    // Rebuilt from a typed field: move the string, do not copy it again.
                    Cow::Owned(Value::String(s)) => prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(s)),
                    },
                    Cow::Owned(value) => proto_value(&value),
                };
                Some((name.clone(), value))
            })
            .collect(),
    };
    (!fields.is_empty()).then_some(prost_types::Struct { fields })
}

/// Verified claims as a protobuf Struct.
fn claims_struct(claims: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), proto_value(v)))
            .collect(),
    }
}

fn proto_value(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(proto_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A claim as header text: strings as they are, lists of strings space-separated (like `scope`),
/// anything else as JSON. Values that could split a header (control characters) are dropped.
fn header_value(claim: &Value) -> Option<String> {
    let text = match claim {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    (!text.chars().any(char::is_control)).then_some(text)
}

fn denied_response(
    http: StatusCode,
    headers: Vec<HeaderValueOption>,
    body: String,
) -> check_response::HttpResponse {
    check_response::HttpResponse::DeniedResponse(DeniedHttpResponse {
        status: Some(HttpStatus { code: http as i32 }),
        headers,
        body,
    })
}

pub fn deny(denial: Denial) -> CheckResponse {
    let reason = denial.label();
    let (grpc, http, error) = if denial == Denial::RateLimited {
        (
            GRPC_RESOURCE_EXHAUSTED,
            StatusCode::TooManyRequests,
            "too_many_requests",
        )
    } else if denial.is_authentication_failure() {
        (
            GRPC_UNAUTHENTICATED,
            StatusCode::Unauthorized,
            "unauthenticated",
        )
    } else {
        (GRPC_PERMISSION_DENIED, StatusCode::Forbidden, "forbidden")
    };
    // RFC 6750 3.1: no error code when the request carried no credentials at all.
    let challenge = match denial {
        Denial::MissingToken => Some("Bearer".to_owned()),
        Denial::InsufficientScope => Some("Bearer error=\"insufficient_scope\"".to_owned()),
        // The token was fine: nothing to challenge.
        Denial::RateLimited => None,
        _ => Some(format!(
            "Bearer error=\"invalid_token\", error_description=\"{reason}\""
        )),
    };
    let mut headers = vec![overwrite("content-type", "application/json".to_owned())];
    if let Some(challenge) = challenge {
        headers.insert(0, overwrite("www-authenticate", challenge));
    }
    let body = format!("{{\"error\":\"{error}\",\"reason\":\"{reason}\"}}");
    CheckResponse {
        status: rpc_status(grpc, reason),
        http_response: Some(denied_response(http, headers, body)),
        dynamic_metadata: None,
    }
}

/// The IETF draft fields (draft-ietf-httpapi-ratelimit-headers): the policy's quota per window
/// and what is left of it, in whole seconds.
fn rate_limit_headers(policy: &Policy, outcome: &Outcome) -> [HeaderValueOption; 2] {
    let name = &policy.name;
    [
        overwrite(
            "ratelimit-policy",
            format!("\"{name}\";q={};w={}", policy.rate, policy.per.as_secs()),
        ),
        overwrite(
            "ratelimit",
            format!(
                "\"{name}\";r={};t={}",
                outcome.remaining,
                rate_limit::ceil_seconds(outcome.reset)
            ),
        ),
    ]
}

/// 429 with `Retry-After` (whole seconds, at least 1) and the `RateLimit` fields.
pub fn rate_limited(policy: &Policy, outcome: &Outcome) -> CheckResponse {
    let mut response = deny(Denial::RateLimited);
    if let Some(check_response::HttpResponse::DeniedResponse(denied)) =
        response.http_response.as_mut()
    {
        let retry_after = rate_limit::ceil_seconds(outcome.reset).max(1);
        denied
            .headers
            .push(overwrite("retry-after", retry_after.to_string()));
        denied.headers.extend(rate_limit_headers(policy, outcome));
    }
    response
}

/// A failure answered as a definite deny (503, or 500 for a bad route), not as an RPC error or
/// an `error_response`: either of those lets an Envoy with `failure_mode_allow: true` pass the
/// request unverified.
pub fn failure(error: CheckError) -> CheckResponse {
    let reason = error.label();
    let (grpc, http, kind) = match error {
        CheckError::BadRouteConfig => (
            GRPC_INTERNAL,
            StatusCode::InternalServerError,
            "misconfigured",
        ),
        CheckError::JwksUnavailable
        | CheckError::RevocationUnavailable
        | CheckError::RateLimitUnavailable
        | CheckError::Overloaded
        | CheckError::DeadlineExceeded
        | CheckError::RequestReadTimeout => (
            GRPC_UNAVAILABLE,
            StatusCode::ServiceUnavailable,
            "unavailable",
        ),
    };
    let mut headers = vec![overwrite("content-type", "application/json".to_owned())];
    if error == CheckError::Overloaded {
        // Shedding is momentary: tell well-behaved clients to come back shortly.
        headers.push(overwrite("retry-after", "1".to_owned()));
    }
    let body = format!("{{\"error\":\"{kind}\",\"reason\":\"{reason}\"}}");
    CheckResponse {
        status: rpc_status(grpc, reason),
        http_response: Some(denied_response(http, headers, body)),
        dynamic_metadata: None,
    }
}

/// A failure as the encoded CheckResponse message, for the admission layer to answer a stream
/// whose request never arrived.
pub fn encoded_failure(error: CheckError) -> bytes::Bytes {
    prost::Message::encode_to_vec(&failure(error)).into()
}

/// Sends one Check carrying `token` to a sidecar and describes the answer in one line, as
/// Envoy would act on it: `allow x-jwt-sub=alice` or `deny 401 expired`.
pub async fn check_with_token(addr: &str, token: &str) -> Result<String, tonic::transport::Error> {
    use crate::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as HttpAttrs,
    };
    use crate::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

    let mut client = AuthorizationClient::connect(addr.to_owned()).await?;
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(HttpAttrs {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..HttpAttrs::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let response = match client.check(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(format!("error {:?}: {}", status.code(), status.message())),
    };
    let code = response.status.as_ref().map_or(0, |s| s.code);
    Ok(match response.http_response {
        _ if code != 0 => {
            let http = match &response.http_response {
                Some(check_response::HttpResponse::DeniedResponse(d)) => {
                    d.status.as_ref().map_or(403, |s| s.code)
                }
                _ => 403,
            };
            let reason = response.status.map(|s| s.message).unwrap_or_default();
            format!("deny {http} {reason}")
        }
        Some(check_response::HttpResponse::OkResponse(ok)) => {
            let set: Vec<String> = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| format!("{}={}", h.key, h.value))
                .collect();
            format!("allow {}", set.join(" ")).trim_end().to_owned()
        }
        _ => "allow".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn token_extraction() {
        let bearer = TokenSource {
            header: "authorization".into(),
            cookie: Some("session".into()),
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (&[("authorization", "Bearer abc")], Some("abc")),
            (&[("authorization", "bearer  abc ")], Some("abc")),
            (&[("authorization", "BEARER abc")], Some("abc")),
            (&[("authorization", "Basic abc")], None),
            (&[("authorization", "abc")], None),
            (&[("authorization", "Bearer ")], None),
            (&[("cookie", "a=1; session=tok; b=2")], Some("tok")),
            (&[("cookie", "sessionx=no")], None),
            (
                &[("authorization", "Basic x"), ("cookie", "session=tok")],
                Some("tok"),
            ),
            (
                &[("authorization", "Bearer h"), ("cookie", "session=c")],
                Some("h"),
            ),
            (&[], None),
        ];
        for (pairs, expected) in cases {
            assert_eq!(
                extract_token(&headers(pairs), &bearer),
                *expected,
                "{pairs:?}"
            );
        }
        let custom = TokenSource {
            header: "x-access-token".into(),
            cookie: None,
        };
        assert_eq!(
            extract_token(&headers(&[("x-access-token", "raw")]), &custom),
            Some("raw")
        );
        assert_eq!(
            extract_token(&headers(&[("x-access-token", "Bearer t")]), &custom),
            Some("t")
        );
        assert_eq!(
            extract_token(&headers(&[("cookie", "session=tok")]), &custom),
            None
        );
    }

    #[test]
    fn grpc_timeouts_parse_by_the_spec() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "١S", "1١"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn claim_header_values() {
        assert_eq!(header_value(&json!("alice")), Some("alice".into()));
        assert_eq!(header_value(&json!(["a", "b"])), Some("a b".into()));
        assert_eq!(header_value(&json!(42)), Some("42".into()));
        assert_eq!(header_value(&json!({"k": 1})), Some("{\"k\":1}".into()));
        assert_eq!(header_value(&json!("evil\r\nx-admin: 1")), None);
        assert_eq!(header_value(&Value::Null), None);
    }

    #[test]
    fn every_deny_sets_a_non_zero_status() {
        for denial in Denial::ALL {
            let response = deny(denial);
            assert_ne!(response.status.unwrap().code, 0, "{denial:?}");
        }
        for error in CheckError::ALL {
            assert_ne!(failure(error).status.unwrap().code, 0, "{error:?}");
        }
        assert_eq!(
            failure(CheckError::JwksUnavailable).status.unwrap().code,
            GRPC_UNAVAILABLE
        );
        assert_eq!(
            failure(CheckError::BadRouteConfig).status.unwrap().code,
            GRPC_INTERNAL
        );
    }

    #[test]
    fn claim_headers_are_validated() {
        let ok = ClaimHeader::parse_list("sub=x-jwt-sub, email = X-JWT-Email").unwrap();
        assert_eq!(
            ok[1],
            ClaimHeader {
                claim: "email".into(),
                header: "x-jwt-email".into()
            }
        );
        assert!(ClaimHeader::parse_list("sub=authorization").is_err());
        assert!(ClaimHeader::parse_list("sub=bad header").is_err());
        assert!(ClaimHeader::parse_list("=x").is_err());
        assert_eq!(ClaimHeader::parse_list("").unwrap(), vec![]);
    }
}
