//! The verified-token cache through the real server: a repeated token skips the signature, but
//! never revocation, the time rules, the route's rules, or a key that left the JWKS.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

async fn cache_counts(sidecar: &Sidecar) -> (f64, f64) {
    let (_, scrape) = sidecar.http_get("/metrics").await;
    let count = |result: &str| {
        let prefix = format!("ext_authz_token_cache_requests_total{{result=\"{result}\"}} ");
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(-1.0, |v| v.parse().unwrap())
    };
    (count("hit"), count("miss"))
}

#[tokio::test]
async fn a_repeated_token_is_a_hit_and_is_still_checked_for_revocation() {
    let key = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&key]).await;
    let dir = std::env::temp_dir().join(format!(
        "authz-cache-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let revoked = dir.join("revoked.txt");
    std::fs::write(&revoked, "").unwrap();
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--revocation-file", revoked.to_str().unwrap()],
    ))
    .await;
    let mut claims = valid_claims();
    claims["jti"] = json!("cached-then-revoked");
    let token = key.sign(&claims).unwrap();
    for _ in 0..3 {
        expect_allow(&sidecar.check(&token).await);
    }
    assert_eq!(
        cache_counts(&sidecar).await,
        (2.0, 1.0),
        "verified once, then two hits"
    );

    std::fs::write(&revoked, "jti cached-then-revoked\n").unwrap();
    let denied = eventually(Duration::from_secs(10), || async {
        sidecar.reason(&token).await == "revoked"
    })
    .await;
    assert!(
        denied,
        "a cached token is still looked up in the revocation store"
    );
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_hit_still_applies_the_route_audience_and_scopes() {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let token = key.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);
    let partner_route = sidecar
        .check_route(&token, &[("audiences", "partner-api")])
        .await;
    assert_eq!(expect_deny(&partner_route).2, "wrong_audience");
    let admin_route = sidecar
        .check_route(&token, &[("required_scopes", "admin")])
        .await;
    assert_eq!(expect_deny(&admin_route).2, "insufficient_scope");
    let (hits, _) = cache_counts(&sidecar).await;
    assert_eq!(hits, 2.0, "both route denials came from cache hits");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_key_dropped_from_the_jwks_drops_its_cached_tokens() {
    let old = key(Algorithm::RS256, "old");
    let new = key(Algorithm::RS256, "new");
    let jwks = JwksServer::start(&[&old]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let token = old.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);
    expect_allow(&sidecar.check(&token).await);

    jwks.serve_keys(&[&new]);
    // A token with the new kid makes the sidecar refetch; `old` is gone afterwards.
    expect_allow(&sidecar.check(&new.sign(&valid_claims()).unwrap()).await);
    assert_eq!(sidecar.reason(&token).await, "unknown_kid");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_cached_token_expires_on_time() {
    let key = key(Algorithm::EdDSA, "ed-1");
    let jwks = JwksServer::start(&[&key]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwt-leeway-seconds", "0"],
    ))
    .await;
    let mut claims = valid_claims();
    claims["exp"] = json!(now() + 2);
    let token = key.sign(&claims).unwrap();
    expect_allow(&sidecar.check(&token).await);
    expect_allow(&sidecar.check(&token).await);
    let expired = eventually(Duration::from_secs(10), || async {
        sidecar.reason(&token).await == "expired"
    })
    .await;
    assert!(expired, "exp is checked on every hit");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn zero_entries_disables_the_cache() {
    let key = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&key]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--token-cache-max-entries", "0"],
    ))
    .await;
    let token = key.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);
    expect_allow(&sidecar.check(&token).await);
    assert_eq!(cache_counts(&sidecar).await, (0.0, 0.0));
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_replayed_forgery_is_denied_from_the_negative_cache() {
    let key = key(Algorithm::RS256, "rsa-1");
    let forger = common::key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&key]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let forged = forger.sign(&valid_claims()).unwrap();
    for _ in 0..5 {
        assert_eq!(sidecar.reason(&forged).await, "bad_signature");
    }
    let (_, scrape) = sidecar.http_get("/metrics").await;
    let rejected = scrape
        .lines()
        .find_map(|l| l.strip_prefix("ext_authz_token_cache_requests_total{result=\"rejected\"} "))
        .map(|v| v.parse::<f64>().unwrap());
    assert_eq!(
        rejected,
        Some(4.0),
        "verified once, then denied from the negative cache"
    );
    assert_eq!(cache_counts(&sidecar).await, (0.0, 1.0));
    let genuine = key.sign(&valid_claims()).unwrap();
    assert!(
        sidecar.allows(&genuine).await,
        "a different token is verified as usual"
    );
    sidecar.shutdown().await;
}

/// A cached token keeps only the claims the configuration reads; whatever the configuration,
/// the answer from the cache is the answer full verification gave, field for field.
#[tokio::test]
async fn a_hit_answers_exactly_as_full_verification_did_whatever_claims_are_configured() {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let mut claims = valid_claims();
    claims["sid"] = json!("session-7");
    claims["email"] = json!("alice@example.com");
    claims["scope"] = json!("read write");
    claims["client_id"] = json!(42);
    claims["groups"] = json!(["a", "b"]);
    let configurations: [&[&str]; 4] = [
        &[],
        &["--dynamic-metadata-claims", "*"],
        &[
            "--dynamic-metadata-claims",
            "sub,jti,sid,email,groups",
            "--claim-headers",
            "sub=x-sub,iss=x-iss,email=x-email,client_id=x-client",
        ],
        &["--dynamic-metadata-claims", ""],
    ];
    for flags in configurations {
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], flags)).await;
        let mut token = String::new();
        for route in [&[][..], &[("required_scopes", "write")][..]] {
            // A token of its own per route, so the first Check is a full verification.
            claims["jti"] = json!(authz_sidecar::tools::devkeys::random_id());
            token = key.sign(&claims).unwrap();
            let verified = sidecar.check_route(&token, route).await;
            expect_allow(&verified);
            let cached = sidecar.check_route(&token, route).await;
            assert_eq!(cached, verified, "{flags:?} {route:?}");
        }
        let denied = sidecar
            .check_route(&token, &[("required_scopes", "admin")])
            .await;
        assert_eq!(
            expect_deny(&denied).2,
            "insufficient_scope",
            "from the cache"
        );
        let (hits, _) = cache_counts(&sidecar).await;
        assert_eq!(
            hits, 3.0,
            "{flags:?}: the second Checks and the last were hits"
        );
        sidecar.shutdown().await;
    }
}
