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
        authz_sidecar::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    let write = |keys: &[&authz_sidecar::devkeys::SigningKey]| {
        let doc = authz_sidecar::devkeys::jwks(keys).unwrap();
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
