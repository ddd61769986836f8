//! Sender-constrained tokens through the real gRPC path (issue 23): a certificate-bound token
//! (RFC 8705 `cnf["x5t#S256"]`) passes only with its client certificate, on a fresh token and on
//! a cached one alike; routes can refuse unbound tokens; a DPoP-bound token is refused as a
//! bearer token (DPoP itself: tests/dpop.rs).

mod common;

use authz_sidecar::pb::envoy::service::auth::v3::CheckResponse;
use authz_sidecar::pb::envoy::service::auth::v3::attribute_context::Peer;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::tls::Ca;
use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

const UNAUTHENTICATED: i32 = 16;

/// The PEM as Envoy forwards it with `include_peer_certificate`: URL-encoded.
fn url_encoded(pem: &str) -> String {
    pem.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// RFC 8705 3.1: base64url of the SHA-256 of the certificate's DER.
fn thumbprint(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

type Setup = OneIssuer;

/// A Check with this token, client certificate (PEM; `None`: plain TCP) and route keys.
async fn check(
    setup: &Setup,
    token: &str,
    certificate: Option<&str>,
    extensions: &[(&str, &str)],
) -> CheckResponse {
    let bearer = format!("Bearer {token}");
    let mut request = check_request(&[("authorization", &bearer)]);
    let attributes = request.attributes.as_mut().unwrap();
    attributes.source = Some(Peer {
        certificate: certificate.map(url_encoded).unwrap_or_default(),
        ..Peer::default()
    });
    attributes.context_extensions = extensions
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    setup
        .sidecar
        .client()
        .check(request)
        .await
        .unwrap()
        .into_inner()
}

fn allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().is_none_or(|s| s.code == 0)
}

/// A 401 with this reason and challenge, else the test fails.
fn expect_401(response: &CheckResponse, reason: &str, challenge: &str) {
    let (denied, code, got) = expect_deny(response);
    assert_eq!((code, got), (UNAUTHENTICATED, reason));
    assert_eq!(denied.status.as_ref().unwrap().code, 401);
    assert_eq!(header(&denied.headers, "www-authenticate"), Some(challenge));
}

#[tokio::test]
async fn a_certificate_bound_token_passes_only_with_its_certificate() {
    let setup = Setup::start(&[]).await;
    let ca = Ca::new("clients");
    let mine = ca.client("mine").cert_pem;
    let theirs = ca.client("theirs").cert_pem;
    let token = setup.token(json!({"cnf": {"x5t#S256": thumbprint(&mine)}}));
    let mismatch = "Bearer error=\"invalid_token\", error_description=\"certificate_mismatch\"";

    assert!(allowed(&check(&setup, &token, Some(&mine), &[]).await));
    // Cache hits from here on: the binding is checked against each request all the same.
    expect_401(
        &check(&setup, &token, Some(&theirs), &[]).await,
        "certificate_mismatch",
        mismatch,
    );
    expect_401(
        &check(&setup, &token, None, &[]).await,
        "certificate_mismatch",
        mismatch,
    );
    assert!(allowed(&check(&setup, &token, Some(&mine), &[]).await));
    let scrape = setup.sidecar.http_get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_token_cache_requests_total{result=\"hit\"} "
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_requests_total{result=\"deny\",reason=\"certificate_mismatch\"} "
        ),
        2.0
    );
}

#[tokio::test]
async fn routes_and_the_global_setting_can_refuse_unbound_tokens() {
    let setup = Setup::start(&[]).await;
    let unbound = setup.token(json!({}));
    let required = [("require_sender_constraint", "true")];
    assert!(allowed(&check(&setup, &unbound, None, &[]).await));
    expect_401(
        &check(&setup, &unbound, None, &required).await,
        "unbound_token",
        "Bearer error=\"invalid_token\", error_description=\"unbound_token\"",
    );
    let cert = Ca::new("clients").client("c").cert_pem;
    let bound = setup.token(json!({"cnf": {"x5t#S256": thumbprint(&cert)}}));
    assert!(allowed(
        &check(&setup, &bound, Some(&cert), &required).await
    ));

    let strict = Setup::start(&["--require-sender-constraint", "true"]).await;
    let unbound = strict.token(json!({}));
    assert_eq!(
        expect_deny(&check(&strict, &unbound, None, &[]).await).2,
        "unbound_token"
    );
    let relaxed = [("require_sender_constraint", "false")];
    assert!(allowed(&check(&strict, &unbound, None, &relaxed).await));
    let typo = [("require_sender_constraint", "yes")];
    assert_eq!(
        expect_deny(&check(&strict, &unbound, None, &typo).await).2,
        "bad_route_config"
    );
}

#[tokio::test]
async fn dpop_bound_and_unknown_bindings_are_refused_not_treated_as_bearer() {
    let setup = Setup::start(&["--jwt-algorithms", "ES256,EdDSA"]).await;
    let dpop = setup.token(json!({"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}));
    expect_401(
        &check(&setup, &dpop, None, &[]).await,
        "invalid_dpop_proof",
        "DPoP error=\"invalid_dpop_proof\", error_description=\"invalid_dpop_proof\", \
         algs=\"ES256 EdDSA\"",
    );
    let unknown = setup.token(json!({"cnf": {"kid": "k1"}}));
    assert_eq!(
        expect_deny(&check(&setup, &unknown, None, &[]).await).2,
        "unsupported_binding"
    );
}
