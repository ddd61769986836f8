//! What a Check answers, in Envoy's message shapes: an allow with the claim headers and dynamic
//! metadata, a deny with its status, challenge and body, a 429, or a failure.
//!
//! Envoy allows a request whose CheckResponse has no status (code 0 is the default), so every
//! deny and every failure here sets a non-zero code explicitly.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::Value;
use tonic::Code;

use crate::claims::{Claims, KeptClaims, ReadsClaims};
use crate::decision::{CheckError, Denial};
use crate::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, header_value_option};
use crate::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use crate::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use crate::pb::google::rpc;
use crate::rate_limit::{self, Outcome, Policy};

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

/// An allow: the claim headers (and the `RateLimit` fields, when `rate_limit` says how close
/// the caller is to its limit) on the upstream request, the claims as dynamic metadata.
pub fn allow(
    claims: &Claims,
    upstream: &UpstreamHeaders,
    rate_limit: Option<(&Policy, &Outcome)>,
) -> CheckResponse {
    let mut headers = Vec::with_capacity(upstream.claim_headers.len());
    let mut headers_to_remove = Vec::new();
    for mapping in &upstream.claim_headers {
        match claims.value(&mapping.claim).and_then(header_value) {
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
            response_headers_to_add: rate_limit
                .map(|(policy, outcome)| rate_limit_headers(policy, outcome).into())
                .unwrap_or_default(),
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
fn header_value(claim: Cow<'_, Value>) -> Option<String> {
    let text = match claim {
        // Rebuilt from a typed field (`sub`, `iss`): move the string, do not copy it again.
        Cow::Owned(Value::String(s)) => s,
        claim => match &*claim {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        },
    };
    (!text.chars().any(char::is_control)).then_some(text)
}

/// The HTTP status Envoy answers the client with: 200 for an allow (the upstream's own status
/// follows), else the denied response's.
pub fn http_status(response: &CheckResponse) -> u16 {
    match &response.http_response {
        Some(check_response::HttpResponse::DeniedResponse(denied)) => denied
            .status
            .as_ref()
            .map_or(403, |status| status.code as u16),
        _ => 200,
    }
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
            Code::ResourceExhausted as i32,
            StatusCode::TooManyRequests,
            "too_many_requests",
        )
    } else if denial.is_authentication_failure() {
        (
            Code::Unauthenticated as i32,
            StatusCode::Unauthorized,
            "unauthenticated",
        )
    } else {
        (
            Code::PermissionDenied as i32,
            StatusCode::Forbidden,
            "forbidden",
        )
    };
    // RFC 6750 3.1: no error code when the request carried no credentials at all.
    let challenge = match denial {
        Denial::MissingToken => Some("Bearer".to_owned()),
        Denial::InsufficientScope => Some("Bearer error=\"insufficient_scope\"".to_owned()),
        Denial::InsufficientUserAuthentication => {
            Some("Bearer error=\"insufficient_user_authentication\"".to_owned())
        }
        // The token is valid; it lacks what the route's rule asks (RFC 6750 3.1's nearest fit).
        Denial::PolicyDenied => Some(format!(
            "Bearer error=\"insufficient_scope\", error_description=\"{reason}\""
        )),
        // The token was fine: nothing to challenge.
        Denial::RateLimited => None,
        // RFC 9449 7.1: a DPoP-bound token is challenged under the DPoP scheme (with `algs`:
        // see `in_dpop_scheme`).
        Denial::InvalidDpopProof | Denial::DpopReplay => Some(format!(
            "DPoP error=\"invalid_dpop_proof\", error_description=\"{reason}\""
        )),
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

/// The denial's challenge under the DPoP scheme, naming the algorithms a proof may use
/// (RFC 9449 7.1: `algs`, space-separated): for the DPoP denials, and for any denial of a
/// request that came with `Authorization: DPoP`, so the client is told in the scheme it used.
pub fn in_dpop_scheme(mut response: CheckResponse, algs: &str) -> CheckResponse {
    if let Some(check_response::HttpResponse::DeniedResponse(denied)) =
        response.http_response.as_mut()
        && let Some(challenge) = denied
            .headers
            .iter_mut()
            .filter_map(|h| h.header.as_mut())
            .find(|h| h.key == "www-authenticate")
    {
        if let Some(rest) = challenge.value.strip_prefix("Bearer") {
            challenge.value = format!("DPoP{rest}");
        }
        if !challenge.value.contains("algs=") {
            let separator = if challenge.value == "DPoP" { " " } else { ", " };
            challenge
                .value
                .push_str(&format!("{separator}algs=\"{algs}\""));
        }
    }
    response
}

/// A 401 asking the client to authenticate again (RFC 9470 3): the route's `acr_values` and
/// `max_age` in the challenge, so it knows what to ask its authorization server for.
pub fn step_up(acr_values: &[&str], max_age: Option<i64>) -> CheckResponse {
    let mut response = deny(Denial::InsufficientUserAuthentication);
    let mut challenge = format!(
        "Bearer error=\"insufficient_user_authentication\", error_description=\"{}\"",
        Denial::InsufficientUserAuthentication.label()
    );
    if !acr_values.is_empty() {
        challenge.push_str(&format!(", acr_values=\"{}\"", acr_values.join(" ")));
    }
    if let Some(max_age) = max_age {
        challenge.push_str(&format!(", max_age={max_age}"));
    }
    if let Some(check_response::HttpResponse::DeniedResponse(denied)) =
        response.http_response.as_mut()
    {
        denied.headers.retain(|h| {
            h.header
                .as_ref()
                .is_none_or(|h| h.key != "www-authenticate")
        });
        denied
            .headers
            .insert(0, overwrite("www-authenticate", challenge));
    }
    response
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
            Code::Internal as i32,
            StatusCode::InternalServerError,
            "misconfigured",
        ),
        CheckError::JwksUnavailable
        | CheckError::RevocationUnavailable
        | CheckError::RateLimitUnavailable
        | CheckError::Overloaded
        | CheckError::DeadlineExceeded
        | CheckError::RequestReadTimeout => (
            Code::Unavailable as i32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_header_values() {
        assert_eq!(
            header_value(Cow::Owned(json!("alice"))),
            Some("alice".into())
        );
        assert_eq!(
            header_value(Cow::Borrowed(&json!("alice"))),
            Some("alice".into())
        );
        assert_eq!(header_value(Cow::Owned(json!("a\nb"))), None);
        assert_eq!(
            header_value(Cow::Owned(json!(["a", "b"]))),
            Some("a b".into())
        );
        assert_eq!(header_value(Cow::Owned(json!(42))), Some("42".into()));
        assert_eq!(
            header_value(Cow::Owned(json!({"k": 1}))),
            Some("{\"k\":1}".into())
        );
        assert_eq!(header_value(Cow::Owned(json!("evil\r\nx-admin: 1"))), None);
        assert_eq!(header_value(Cow::Owned(Value::Null)), None);
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
            Code::Unavailable as i32
        );
        assert_eq!(
            failure(CheckError::BadRouteConfig).status.unwrap().code,
            Code::Internal as i32
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
