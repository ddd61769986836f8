//! Check decisions through the real gRPC server: every algorithm allowed, every denial reason
//! with its gRPC code, HTTP status and challenge header.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const UNAUTHENTICATED: i32 = 16;
const PERMISSION_DENIED: i32 = 7;

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn with(mut claims: Value, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    change(claims.as_object_mut().unwrap());
    claims
}

#[tokio::test]
async fn valid_tokens_of_every_algorithm_are_allowed_with_claim_headers() {
    let keys: Vec<_> = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ]
    .into_iter()
    .map(|alg| key(alg, &format!("kid-{alg:?}")))
    .collect();
    let jwks = JwksServer::start(&keys.iter().collect::<Vec<_>>()).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--claim-headers",
            "sub=x-jwt-sub,email=x-jwt-email,scope=x-jwt-scope",
        ],
    ))
    .await;

    for key in &keys {
        let claims = with(valid_claims(), |c| {
            c.insert("sub".into(), json!(format!("user-{:?}", key.alg)));
            c.insert("scope".into(), json!(["read", "write"]));
        });
        let response = sidecar.check(&key.sign(&claims).unwrap()).await;
        let ok = expect_allow(&response);
        assert_eq!(
            header(&ok.headers, "x-jwt-sub"),
            Some(format!("user-{:?}", key.alg).as_str())
        );
        assert_eq!(header(&ok.headers, "x-jwt-scope"), Some("read write"));
        // Overwrite, never append: a client cannot smuggle its own x-jwt-sub.
        for option in &ok.headers {
            assert_eq!(option.append, Some(false));
            assert_eq!(option.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD");
        }
        // The token has no email claim: a client-sent x-jwt-email must be stripped.
        assert_eq!(ok.headers_to_remove, vec!["x-jwt-email".to_string()]);
    }
    assert_eq!(jwks.fetches(), 1, "one key set load serves every algorithm");
    sidecar.shutdown().await;
}

struct DenyCase {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    reason: &'static str,
    grpc: i32,
    http: i32,
}

fn bearer(token: String) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

fn case(name: &'static str, token: String, reason: &'static str) -> DenyCase {
    DenyCase {
        name,
        headers: bearer(token),
        reason,
        grpc: UNAUTHENTICATED,
        http: 401,
    }
}

#[tokio::test]
async fn every_denial_has_its_reason_code_and_status() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let impostor = key(Algorithm::RS256, "rsa-1");
    let stranger = key(Algorithm::ES256, "not-in-jwks");
    let jwks = JwksServer::start(&[&rsa]).await;
    let revoked_jti = "revoked-jti-1";
    let dir = tempdir("deny-matrix");
    let revocations = dir.join("revoked.txt");
    std::fs::write(&revocations, format!("jti {revoked_jti}\n")).unwrap();
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--revocation-file", revocations.to_str().unwrap()],
    ))
    .await;

    let sign = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut claims = valid_claims();
        change(claims.as_object_mut().unwrap());
        rsa.sign(&claims).unwrap()
    };
    let rsa_jwk = rsa.jwk().unwrap();
    let public_key_bytes = serde_json::to_vec(&rsa_jwk).unwrap();
    let hs256_with_public_key = jsonwebtoken::encode(
        &Header {
            kid: Some("rsa-1".into()),
            ..Header::new(Algorithm::HS256)
        },
        &valid_claims(),
        &EncodingKey::from_secret(&public_key_bytes),
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa-1"})),
        b64(&valid_claims())
    );
    let valid = sign(&|_| {});
    let (head, rest) = valid.split_once('.').unwrap();
    let bad_json = format!("{}.{}", URL_SAFE_NO_PAD.encode("{\"alg\":"), rest);
    let (_, signature) = rest.split_once('.').unwrap();
    let mallory = with(valid_claims(), |c| {
        c.insert("sub".into(), json!("mallory"));
    });
    let tampered = format!("{head}.{}.{signature}", b64(&mallory));

    let cases = vec![
        case(
            "expired",
            sign(&|c| {
                c.insert("exp".into(), json!(now() - 3600));
                c.insert("iat".into(), json!(now() - 7200));
            }),
            "expired",
        ),
        case(
            "nbf in the future",
            sign(&|c| {
                c.insert("nbf".into(), json!(now() + 3600));
            }),
            "not_yet_valid",
        ),
        case(
            "wrong issuer",
            sign(&|c| {
                c.insert("iss".into(), json!("https://evil.test"));
            }),
            "wrong_issuer",
        ),
        case(
            "no issuer",
            sign(&|c| {
                c.remove("iss");
            }),
            "wrong_issuer",
        ),
        DenyCase {
            name: "wrong audience",
            headers: bearer(sign(&|c| {
                c.insert("aud".into(), json!(["other"]));
            })),
            reason: "wrong_audience",
            grpc: PERMISSION_DENIED,
            http: 403,
        },
        case(
            "no jti",
            sign(&|c| {
                c.remove("jti");
            }),
            "missing_claim",
        ),
        case(
            // An empty jti names no token: it could never be revoked by jti.
            "empty jti",
            sign(&|c| {
                c.insert("jti".into(), json!(""));
            }),
            "missing_claim",
        ),
        case(
            "no exp",
            sign(&|c| {
                c.remove("exp");
            }),
            "missing_claim",
        ),
        case(
            "bad signature",
            impostor.sign(&valid_claims()).unwrap(),
            "bad_signature",
        ),
        case("payload changed after signing", tampered, "bad_signature"),
        case("alg none", none, "disallowed_algorithm"),
        case(
            "HS256 signed with the public key",
            hs256_with_public_key,
            "disallowed_algorithm",
        ),
        case(
            "unknown kid",
            stranger.sign(&valid_claims()).unwrap(),
            "unknown_kid",
        ),
        case(
            "two parts",
            format!("{head}.{}", rest.split_once('.').unwrap().0),
            "malformed",
        ),
        case(
            "bad base64",
            format!("{head}.!!!!.{}", rest.split_once('.').unwrap().1),
            "malformed",
        ),
        case("bad JSON", bad_json, "malformed"),
        case("64 KiB token", "a".repeat(64 * 1024), "token_too_large"),
        case(
            "revoked jti",
            sign(&|c| {
                c.insert("jti".into(), json!(revoked_jti));
            }),
            "revoked",
        ),
        DenyCase {
            name: "no header",
            headers: vec![],
            reason: "missing_token",
            grpc: UNAUTHENTICATED,
            http: 401,
        },
        DenyCase {
            name: "basic scheme",
            headers: vec![("authorization", "Basic YWxpY2U6cHc=".into())],
            reason: "missing_token",
            grpc: UNAUTHENTICATED,
            http: 401,
        },
        DenyCase {
            name: "two authorization headers joined by Envoy",
            headers: vec![("authorization", format!("Bearer {valid},Bearer {valid}"))],
            reason: "malformed",
            grpc: UNAUTHENTICATED,
            http: 401,
        },
    ];

    for case in cases {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = sidecar.check_headers(&headers).await;
        let (denied, grpc, reason) = expect_deny(&response);
        assert_eq!(reason, case.reason, "{}", case.name);
        assert_eq!(grpc, case.grpc, "{}", case.name);
        assert_eq!(
            denied.status.as_ref().map(|s| s.code),
            Some(case.http),
            "{}",
            case.name
        );
        let challenge = header(&denied.headers, "www-authenticate").unwrap_or_default();
        if case.reason == "missing_token" {
            assert_eq!(
                challenge, "Bearer",
                "{}: RFC 6750 sends no error without credentials",
                case.name
            );
        } else {
            assert!(
                challenge.starts_with("Bearer error=\"invalid_token\""),
                "{}: {challenge}",
                case.name
            );
            assert!(
                challenge.contains(case.reason),
                "{}: {challenge}",
                case.name
            );
        }
        let body: Value = serde_json::from_str(&denied.body).expect("JSON body");
        assert_eq!(body["reason"], case.reason, "{}", case.name);
    }
    // The valid token itself still passes: the cases above did not poison anything.
    expect_allow(&sidecar.check(&valid).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_and_a_cookie_can_carry_the_token() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--token-cookie",
            "access_token",
            "--remove-authorization-header",
            "true",
        ],
    ))
    .await;
    let token = rsa.sign(&valid_claims()).unwrap();

    let lower = sidecar
        .check_headers(&[("authorization", &format!("bearer {token}"))])
        .await;
    assert_eq!(
        expect_allow(&lower).headers_to_remove,
        vec!["authorization".to_string()]
    );
    let cookie = format!("theme=dark; access_token={token}");
    expect_allow(&sidecar.check_headers(&[("cookie", &cookie)]).await);
    let response = sidecar.check_headers(&[("cookie", "other=1")]).await;
    assert_eq!(expect_deny(&response).2, "missing_token");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn an_algorithm_outside_the_configured_allowlist_is_denied() {
    let es = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&es]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwt-algorithms", "RS256"],
    ))
    .await;
    let response = sidecar.check(&es.sign(&valid_claims()).unwrap()).await;
    assert_eq!(expect_deny(&response).2, "disallowed_algorithm");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_check_request_without_attributes_is_denied_not_crashed() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let response = sidecar
        .client()
        .check(authz_sidecar::pb::envoy::service::auth::v3::CheckRequest { attributes: None })
        .await
        .unwrap()
        .into_inner();
    let (_, _, reason) = expect_deny(&response);
    assert_eq!(reason, "missing_token");
    sidecar.shutdown().await;
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "authz-{name}-{}-{}",
        std::process::id(),
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn dynamic_metadata_carries_the_configured_claims_only() {
    let signing = key(Algorithm::ES256, "md-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let mut claims = valid_claims();
    claims["email"] = "alice@example.com".into();
    let token = signing.sign(&claims).unwrap();
    let fields = |response: &authz_sidecar::pb::envoy::service::auth::v3::CheckResponse| {
        let mut names: Vec<String> = response
            .dynamic_metadata
            .as_ref()
            .map(|s| s.fields.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    for (setting, expected) in [
        (None, vec!["iss", "sub"]),
        (
            Some("*"),
            vec!["aud", "email", "exp", "iat", "iss", "jti", "sub"],
        ),
        (Some("email, missing"), vec!["email"]),
        (Some(""), vec![]),
    ] {
        let mut extra = vec![];
        if let Some(value) = setting {
            extra = vec!["--dynamic-metadata-claims", value];
        }
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &extra)).await;
        let response = sidecar.check(&token).await;
        expect_allow(&response);
        assert_eq!(
            fields(&response),
            expected,
            "DYNAMIC_METADATA_CLAIMS={setting:?}"
        );
        sidecar.shutdown().await;
    }
}

#[tokio::test]
async fn a_typo_in_a_route_key_answers_500_instead_of_dropping_the_requirement() {
    let signer = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&signer]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--context-extensions-ignored", "team, log_tag"],
    ))
    .await;
    // A valid token without the `admin` scope.
    let token = signer.sign(&valid_claims()).unwrap();
    let typo = sidecar
        .check_route(&token, &[("required_scope", "admin")])
        .await;
    let (denied, code, reason) = expect_deny(&typo);
    assert_eq!(reason, "bad_route_config");
    assert_eq!(code, 13, "INTERNAL");
    assert_eq!(denied.status.as_ref().map(|s| s.code), Some(500));
    // Keys listed as meant for others pass, and the real requirement still applies.
    let tagged = sidecar
        .check_route(&token, &[("team", "payments"), ("log_tag", "x")])
        .await;
    expect_allow(&tagged);
    let scoped = sidecar
        .check_route(
            &token,
            &[("team", "payments"), ("required_scopes", "admin")],
        )
        .await;
    assert_eq!(expect_deny(&scoped).2, "insufficient_scope");
    sidecar.shutdown().await;
}
