//! Key and algorithm safety through the Check RPC, and secrets hygiene of a real process:
//! what an attacker can put in a token header changes nothing, and no token reaches a log.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use authz_sidecar::tools::devkeys::SigningKey;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

/// A compact JWS over exactly these header and payload bytes, signed by `key`: for headers and
/// claims a JWT library would not produce (duplicate names, `jku`, odd `kid`s).
fn sign_raw(key: &SigningKey, header: &str, payload: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let encoding = match key_alg(key) {
        Algorithm::ES256 => EncodingKey::from_ec_pem(key.pem().as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(key.pem().as_bytes()).unwrap(),
    };
    let signature =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &encoding, key_alg(key)).unwrap();
    format!("{signing_input}.{signature}")
}

fn key_alg(key: &SigningKey) -> Algorithm {
    let jwk = key.jwk().unwrap();
    match jwk["alg"].as_str().unwrap() {
        "ES256" => Algorithm::ES256,
        _ => Algorithm::RS256,
    }
}

fn claims_text() -> String {
    valid_claims().to_string()
}

#[tokio::test]
async fn header_fields_an_attacker_controls_never_choose_the_key() {
    let trusted = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&trusted]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let attacker = key(Algorithm::RS256, "evil");
    let attacker_jwks = JwksServer::start(&[&attacker]).await;

    // jku / x5u point at the attacker's own key set: never fetched, never used.
    for field in ["jku", "x5u"] {
        let header = json!({"alg": "RS256", "kid": "evil", field: attacker_jwks.jwks_url()});
        let token = sign_raw(&attacker, &header.to_string(), &claims_text());
        assert_eq!(sidecar.reason(&token).await, "unknown_kid", "{field}");
    }
    // An embedded jwk, signed by the key it carries.
    let header = json!({"alg": "RS256", "kid": "evil", "jwk": attacker.jwk().unwrap()});
    let token = sign_raw(&attacker, &header.to_string(), &claims_text());
    assert_eq!(sidecar.reason(&token).await, "unknown_kid");
    assert_eq!(
        attacker_jwks.fetches(),
        0,
        "a token never makes us fetch its own URL"
    );

    // kid values that would be dangerous as a path, a query or a log line are only map keys.
    for kid in [
        "../../../../etc/passwd",
        "/dev/zero",
        "' OR '1'='1",
        "rsa-1\u{0}",
        "rsa-1\n{\"level\":\"error\"}",
        &"k".repeat(4096),
    ] {
        let header = json!({"alg": "RS256", "kid": kid});
        let token = sign_raw(&trusted, &header.to_string(), &claims_text());
        let reason = sidecar.reason(&token).await;
        assert!(
            reason == "unknown_kid" || reason == "token_too_large",
            "kid {:?}: {reason}",
            kid.chars().take(40).collect::<String>()
        );
    }
    sidecar.shutdown().await;
}

#[tokio::test]
async fn duplicate_names_crit_and_mismatched_algorithms_are_refused() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let ec = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&rsa, &ec]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let claims = valid_claims();

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "duplicate alg in the header",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1","alg":"none"}"#,
                &claims.to_string(),
            ),
            "malformed",
        ),
        (
            "duplicate sub in the claims",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1"}"#,
                &format!(
                    "{{\"sub\":\"admin\",{}",
                    &claims.to_string()[1..] // claims already has "sub": "alice"
                ),
            ),
            "malformed",
        ),
        (
            "duplicate typ in the header (a name this sidecar does not read)",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1","typ":"JWT","typ":"at+jwt"}"#,
                &claims.to_string(),
            ),
            "malformed",
        ),
        (
            "duplicate name nested in the header",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1","jwk":{"kty":"RSA","kty":"EC"}}"#,
                &claims.to_string(),
            ),
            "malformed",
        ),
        (
            "duplicate name nested in the claims",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1"}"#,
                &format!(
                    "{{\"realm_access\":{{\"roles\":[\"user\"],\"roles\":[\"admin\"]}},{}",
                    &claims.to_string()[1..]
                ),
            ),
            "malformed",
        ),
        (
            "crit names an extension",
            sign_raw(
                &rsa,
                r#"{"alg":"RS256","kid":"rsa-1","crit":["exp"],"exp":1}"#,
                &claims.to_string(),
            ),
            "malformed",
        ),
        (
            "RSA key named by an ES256 token",
            sign_raw(&ec, r#"{"alg":"ES256","kid":"rsa-1"}"#, &claims.to_string()),
            "disallowed_algorithm",
        ),
        (
            "PS256 claimed for a key declared RS256",
            {
                let token = rsa.sign(&claims).unwrap();
                let (_, rest) = token.split_once('.').unwrap();
                format!(
                    "{}.{rest}",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"PS256","kid":"rsa-1"}"#)
                )
            },
            "disallowed_algorithm",
        ),
    ];
    for (name, token, expected) in cases {
        assert_eq!(sidecar.reason(&token).await, expected, "{name}");
    }
    assert!(sidecar.allows(&rsa.sign(&claims).unwrap()).await, "control");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn odd_authorization_headers_are_denied_not_guessed() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let token = rsa.sign(&valid_claims()).unwrap();
    let other = rsa.sign(&valid_claims()).unwrap();
    let (head, rest) = token.split_once('.').unwrap();
    for (name, value) in [
        // Envoy joins repeated request headers with a comma.
        (
            "two Authorization headers",
            format!("Bearer {token},Bearer {other}"),
        ),
        ("two tokens", format!("Bearer {token} {other}")),
        ("whitespace inside", format!("Bearer {head}. {rest}")),
        ("tab inside", format!("Bearer {head}.\t{rest}")),
    ] {
        let response = sidecar
            .check_headers(&[("authorization", value.as_str())])
            .await;
        let (_, _, reason) = expect_deny(&response);
        assert_eq!(reason, "malformed", "{name}");
    }
    sidecar.shutdown().await;
}

/// A real process at debug level, every kind of outcome, then its whole stderr and /metrics:
/// no token, signature or payload segment anywhere.
#[tokio::test]
async fn no_token_or_signature_reaches_the_logs_or_metrics() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("JWT_ISSUER", ISSUER)
        .env("JWT_AUDIENCE", AUDIENCE)
        .env("JWKS_URL", jwks.jwks_url())
        .env("GRPC_LISTEN_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("METRICS_LISTEN_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("SHUTDOWN_DRAIN_DELAY", "0s")
        .env("RUST_LOG", "debug")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    assert!(http_ok_within(metrics_addr, "/readyz", Duration::from_secs(20)).await);

    let impostor = key(Algorithm::RS256, "rsa-1");
    let tokens: Vec<String> = vec![
        rsa.sign(&valid_claims()).unwrap(),
        rsa.sign(&{
            let mut c = valid_claims();
            c["exp"] = json!(now() - 3600);
            c
        })
        .unwrap(),
        impostor.sign(&valid_claims()).unwrap(),
        rsa.sign(&{
            let mut c: Value = valid_claims();
            c["aud"] = json!("other");
            c
        })
        .unwrap(),
        "not.a.token-at-all".to_owned(),
    ];
    let addr = format!("http://127.0.0.1:{grpc_port}");
    for token in &tokens {
        authz_sidecar::tools::check_client::check_with_token(&addr, token)
            .await
            .unwrap();
    }
    let scrape = http_get(metrics_addr, "/metrics").await.1;

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child.wait().unwrap();
    assert!(
        logs.contains("\"reason\":\"bad_signature\""),
        "the denials were logged at debug:\n{logs}"
    );
    for token in &tokens {
        for secret in
            std::iter::once(token.as_str()).chain(token.split('.').filter(|s| s.len() > 8))
        {
            assert!(!logs.contains(secret), "logs hold a token part: {secret}");
            assert!(
                !scrape.contains(secret),
                "/metrics holds a token part: {secret}"
            );
        }
    }
    assert!(!logs.contains("BEGIN"), "no key material in the logs");
}

#[tokio::test]
async fn an_oversized_check_request_is_refused_unread_and_the_next_one_is_served() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--grpc-max-message-bytes", "65536"],
    ))
    .await;
    let padding = "x".repeat(70 * 1024);
    let request = check_request(&[("x-padding", padding.as_str())]);
    let refused = sidecar.client().check(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let token = rsa.sign(&valid_claims()).unwrap();
    assert!(
        sidecar.allows(&token).await,
        "the connection and the server carry on"
    );
    sidecar.shutdown().await;
}
