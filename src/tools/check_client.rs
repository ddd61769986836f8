//! `authz-sidecar check`: one Check with a token, described as Envoy would act on it.

use crate::pb::envoy::service::auth::v3::check_response;

/// Sends one Check carrying `token` to a sidecar and describes the answer in one line, as
/// Envoy would act on it: `allow x-jwt-sub=alice` or `deny 401 expired`.
pub async fn check_with_token(addr: &str, token: &str) -> Result<String, tonic::transport::Error> {
    use crate::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

    let mut client = AuthorizationClient::connect(addr.to_owned()).await?;
    let request = super::bearer_request(token);
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
