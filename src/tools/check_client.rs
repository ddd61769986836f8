//! `authz-sidecar check`: one Check with a token, described as Envoy would act on it.

use std::collections::HashMap;

use crate::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, check_response};

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
