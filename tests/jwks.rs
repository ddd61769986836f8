//! The key set's life against a real HTTP JWKS server: rotation, single-flight refetch, rate
//! limiting, an issuer that goes down or serves garbage, stale expiry, discovery, file reload.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use futures_util::future::join_all;
use jsonwebtoken::Algorithm;

#[tokio::test]
async fn a_rotated_key_is_fetched_once_for_a_hundred_concurrent_checks() {
    let old = key(Algorithm::RS256, "2026-old");
    let new = key(Algorithm::ES256, "2026-new");
    let jwks = JwksServer::start(&[&old]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    expect_allow(&sidecar.check(&old.sign(&valid_claims()).unwrap()).await);
    let before = jwks.fetches();

    jwks.serve_keys(&[&old, &new]);
    let token = new.sign(&valid_claims()).unwrap();
    let responses = join_all((0..100).map(|_| sidecar.check(&token))).await;
    for response in &responses {
        expect_allow(response);
    }
    assert_eq!(
        jwks.fetches() - before,
        1,
        "one refetch shared by every waiting Check"
    );
    expect_allow(&sidecar.check(&old.sign(&valid_claims()).unwrap()).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn an_unknown_kid_flood_fetches_at_most_once_per_min_refresh_interval() {
    let known = key(Algorithm::RS256, "known");
    let jwks = JwksServer::start(&[&known]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwks-min-refresh-interval", "1h"],
    ))
    .await;
    expect_allow(&sidecar.check(&known.sign(&valid_claims()).unwrap()).await);
    let before = jwks.fetches();

    let attackers: Vec<_> = (0..20)
        .map(|i| key(Algorithm::ES256, &format!("forged-{i}")))
        .collect();
    let tokens: Vec<_> = attackers
        .iter()
        .map(|k| k.sign(&valid_claims()).unwrap())
        .collect();
    let responses = join_all(tokens.iter().map(|t| sidecar.check(t))).await;
    for response in &responses {
        assert_eq!(expect_deny(response).2, "unknown_kid");
    }
    // The startup fetch happened moments ago, inside the interval: no fetch at all.
    assert_eq!(
        jwks.fetches(),
        before,
        "unknown kids inside the interval never reach the issuer"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_with_an_unknown_kid_costs_no_fetch() {
    let known = key(Algorithm::RS256, "known");
    let jwks = JwksServer::start(&[&known]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    expect_allow(&sidecar.check(&known.sign(&valid_claims()).unwrap()).await);
    let before = jwks.fetches();
    let mut claims = valid_claims();
    claims["exp"] = serde_json::json!(now() - 3600);
    let stranger = key(Algorithm::ES256, "stranger");
    let response = sidecar.check(&stranger.sign(&claims).unwrap()).await;
    assert_eq!(expect_deny(&response).2, "expired");
    assert_eq!(jwks.fetches(), before);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn cached_keys_keep_verifying_when_the_issuer_goes_down() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let mut jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    expect_allow(&sidecar.check(&rsa.sign(&valid_claims()).unwrap()).await);

    jwks.stop().await;
    // An unknown kid forces a refetch against the dead endpoint.
    let stranger = key(Algorithm::ES256, "stranger");
    let response = sidecar
        .check(&stranger.sign(&valid_claims()).unwrap())
        .await;
    assert_eq!(expect_deny(&response).2, "unknown_kid");
    expect_allow(&sidecar.check(&rsa.sign(&valid_claims()).unwrap()).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn garbage_error_and_empty_documents_never_replace_good_keys() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let token = rsa.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);
    let stranger = key(Algorithm::ES256, "stranger")
        .sign(&valid_claims())
        .unwrap();

    let bad_replies: [(StatusCode, Vec<u8>); 5] = [
        (StatusCode::OK, b"<html>not json</html>".to_vec()),
        (StatusCode::OK, br#"{"keys": []}"#.to_vec()),
        (
            StatusCode::OK,
            br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa-1"}]}"#.to_vec(),
        ),
        (StatusCode::INTERNAL_SERVER_ERROR, b"oops".to_vec()),
        (StatusCode::OK, vec![b' '; 2 * 1024 * 1024]),
    ];
    for (status, body) in bad_replies {
        let before = jwks.fetches();
        jwks.serve(status, body);
        assert_eq!(
            expect_deny(&sidecar.check(&stranger).await).2,
            "unknown_kid"
        );
        assert_eq!(
            jwks.fetches(),
            before + 1,
            "the refetch happened ({status})"
        );
        expect_allow(&sidecar.check(&token).await);
    }
    sidecar.shutdown().await;
}

#[tokio::test]
async fn keys_older_than_max_stale_are_not_used() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let mut jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwks-max-stale", "1s", "--jwks-refresh-interval", "1h"],
    ))
    .await;
    let token = rsa.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);
    jwks.stop().await;

    let went_stale = eventually(Duration::from_secs(10), || async {
        let response = sidecar.check(&token).await;
        response
            .status
            .as_ref()
            .is_some_and(|s| s.code == 14 && s.message == "jwks_unavailable")
    })
    .await;
    assert!(went_stale, "keys must stop serving after JWKS_MAX_STALE");
    let response = sidecar.check(&token).await;
    let (denied, _, _) = expect_deny(&response);
    assert_eq!(denied.status.as_ref().map(|s| s.code), Some(503));
    sidecar.shutdown().await;
}

#[tokio::test]
async fn keys_are_found_by_oidc_discovery() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let issuer = jwks.base_url().to_owned();
    let sidecar = start_sidecar(config(&[], &["--jwt-issuer", &issuer])).await;
    let mut claims = valid_claims();
    claims["iss"] = serde_json::json!(issuer);
    expect_allow(&sidecar.check(&rsa.sign(&claims).unwrap()).await);
    assert_eq!(jwks.fetches(), 1);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn max_age_drives_the_background_refresh() {
    let first = key(Algorithm::RS256, "first");
    let second = key(Algorithm::RS256, "second");
    let jwks = JwksServer::start(&[&first]).await;
    jwks.set_cache_control("public, max-age=1");
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--jwks-min-refresh-interval",
            "1s",
            "--jwks-refresh-interval",
            "1h",
        ],
    ))
    .await;
    expect_allow(&sidecar.check(&first.sign(&valid_claims()).unwrap()).await);
    // Only `second` now: the background refresh (after max-age) drops `first`, no Check asked.
    jwks.serve_keys(&[&second]);
    let refreshed = eventually(Duration::from_secs(10), || async { jwks.fetches() >= 2 }).await;
    assert!(
        refreshed,
        "refresh after max-age=1 s, not after the 1 h default"
    );
    let dropped = eventually(Duration::from_secs(5), || async {
        let response = sidecar.check(&first.sign(&valid_claims()).unwrap()).await;
        response
            .status
            .as_ref()
            .is_some_and(|s| s.message == "unknown_kid")
    })
    .await;
    assert!(dropped, "a key removed from the JWKS stops verifying");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_jwks_file_is_reloaded_when_it_changes() {
    let first = key(Algorithm::EdDSA, "ed-1");
    let second = key(Algorithm::ES384, "ec-2");
    let dir = std::env::temp_dir().join(format!(
        "authz-jwks-file-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let write = |keys: &[&authz_sidecar::tools::devkeys::SigningKey]| {
        let doc = authz_sidecar::tools::devkeys::jwks(keys).unwrap();
        // Write then rename, like a ConfigMap update: readers never see half a file.
        let tmp = dir.join("jwks.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&[&first]);
    let sidecar = start_sidecar(config(&["--jwks-file", path.to_str().unwrap()], &[])).await;
    expect_allow(&sidecar.check(&first.sign(&valid_claims()).unwrap()).await);
    let token = second.sign(&valid_claims()).unwrap();
    assert_eq!(expect_deny(&sidecar.check(&token).await).2, "unknown_kid");

    std::fs::write(&path, "{ broken").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_allow(&sidecar.check(&first.sign(&valid_claims()).unwrap()).await);

    write(&[&first, &second]);
    let reloaded = eventually(Duration::from_secs(10), || sidecar.allows(&token)).await;
    assert!(reloaded, "the new key is picked up from the changed file");
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_broken_jwks_file_lets_the_keys_go_stale_instead_of_confirming_them() {
    let signer = key(Algorithm::ES256, "ec-1");
    let dir = std::env::temp_dir().join(format!(
        "authz-jwks-broken-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let good =
        serde_json::to_vec(&authz_sidecar::tools::devkeys::jwks(&[&signer]).unwrap()).unwrap();
    std::fs::write(&path, &good).unwrap();
    let sidecar = start_sidecar(config(
        &["--jwks-file", path.to_str().unwrap()],
        &["--jwks-max-stale", "2s"],
    ))
    .await;
    let token = signer.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);

    // The operator tries to rotate the key out and the write goes wrong.
    std::fs::write(&path, "{ broken").unwrap();
    let stale = eventually(Duration::from_secs(10), || async {
        sidecar.reason(&token).await == "jwks_unavailable"
    })
    .await;
    assert!(stale, "a broken file never confirms the old keys");
    let scrape = sidecar.http_get("/metrics").await.1;
    let series = |outcome: &str| {
        metric_value(
            &scrape,
            &format!("ext_authz_jwks_refreshes_total{{issuer=\"{ISSUER}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert!(
        series("failed") >= 3.0,
        "every poll of the broken file fails"
    );
    let age = metric_value(
        &scrape,
        &format!("ext_authz_jwks_seconds_since_refresh{{issuer=\"{ISSUER}\"}}"),
    );
    assert!(age >= 2.0, "the keys' age keeps growing: {age}");

    // The good document back: the same bytes confirm the keys again.
    std::fs::write(&path, &good).unwrap();
    let back = eventually(Duration::from_secs(10), || sidecar.allows(&token)).await;
    assert!(back, "the restored file serves the keys again");
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_unknown_kid_fetch_outlives_the_check_that_started_it() {
    let old = key(Algorithm::ES256, "old");
    let new = key(Algorithm::ES256, "new");
    let jwks = JwksServer::start(&[&old]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwks-min-refresh-interval", "3s"],
    ))
    .await;
    expect_allow(&sidecar.check(&old.sign(&valid_claims()).unwrap()).await);
    // Past the interval since the startup fetch, so the new kid may refetch.
    tokio::time::sleep(Duration::from_millis(3200)).await;

    // A cold identity provider: slower than Envoy's 250 ms budget for the Check.
    jwks.set_delay(Duration::from_millis(500));
    jwks.serve_keys(&[&old, &new]);
    let token = new.sign(&valid_claims()).unwrap();
    let mut request = tonic::Request::new(check_request(&[(
        "authorization",
        &format!("Bearer {token}"),
    )]));
    request.set_timeout(Duration::from_millis(250));
    let first = sidecar.client().check(request).await.unwrap().into_inner();
    assert_eq!(
        expect_deny(&first).2,
        "deadline_exceeded",
        "the first Check gives up at its deadline"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    // Still inside the 3 s interval: this Check cannot fetch; only the first one's keys help.
    expect_allow(&sidecar.check(&token).await);
    assert_eq!(jwks.fetches(), 2, "the startup fetch and the one refetch");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn keys_of_two_types_under_one_kid_are_picked_by_alg() {
    let rsa = key(Algorithm::RS256, "shared");
    let ec = key(Algorithm::ES256, "shared");
    for order in [[&rsa, &ec], [&ec, &rsa]] {
        let jwks = JwksServer::start(&order).await;
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
        let tokens = [
            rsa.sign(&valid_claims()).unwrap(),
            ec.sign(&valid_claims()).unwrap(),
        ];
        // Twice each: verified, then a cache hit that must find its own key again.
        for token in tokens.iter().chain(&tokens) {
            expect_allow(&sidecar.check(token).await);
        }
        sidecar.shutdown().await;
    }
}
