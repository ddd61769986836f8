//! The embedded revocation store through the real server: jti, subject and session entries,
//! and a file that is re-read when it changes.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

struct Fixture {
    jwks: JwksServer,
    file: std::path::PathBuf,
    key: authz_sidecar::devkeys::SigningKey,
}

async fn fixture(initial: &str) -> Fixture {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let dir = std::env::temp_dir().join(format!(
        "authz-revocation-{}",
        authz_sidecar::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("revoked.txt");
    std::fs::write(&file, initial).unwrap();
    Fixture { jwks, file, key }
}

impl Fixture {
    async fn sidecar(&self) -> Sidecar {
        start_sidecar(config(
            &["--jwks-url", &self.jwks.jwks_url()],
            &["--revocation-file", self.file.to_str().unwrap()],
        ))
        .await
    }
}

#[tokio::test]
async fn subject_and_session_revocations_cut_off_older_tokens_only() {
    let cut = now() - 100;
    let f = fixture(&format!(
        "sub {ISSUER} alice {cut}\nsid {ISSUER} session-9 {cut}\n"
    ))
    .await;
    let sidecar = f.sidecar().await;
    let token = |sub: &str, sid: &str, iat: i64| {
        let mut claims = valid_claims();
        claims["sub"] = json!(sub);
        claims["sid"] = json!(sid);
        claims["iat"] = json!(iat);
        f.key.sign(&claims).unwrap()
    };

    let before_cut = sidecar.check(&token("alice", "s1", cut - 10)).await;
    assert_eq!(expect_deny(&before_cut).2, "revoked_subject");
    let at_cut = sidecar.check(&token("alice", "s1", cut)).await;
    assert_eq!(
        expect_deny(&at_cut).2,
        "revoked_subject",
        "issued at the cut-off counts as revoked"
    );
    expect_allow(&sidecar.check(&token("alice", "s1", cut + 10)).await);
    let session = sidecar.check(&token("bob", "session-9", cut - 1)).await;
    assert_eq!(expect_deny(&session).2, "revoked_session");
    expect_allow(&sidecar.check(&token("bob", "session-8", cut - 1)).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_jti_added_to_the_file_is_revoked_without_a_restart() {
    let f = fixture("# none yet\n").await;
    let sidecar = f.sidecar().await;
    let mut claims = valid_claims();
    claims["jti"] = json!("stolen-token");
    let token = f.key.sign(&claims).unwrap();
    expect_allow(&sidecar.check(&token).await);

    std::fs::write(&f.file, "# none yet\njti stolen-token\n").unwrap();
    let revoked = eventually(Duration::from_secs(10), || async {
        sidecar.reason(&token).await == "revoked"
    })
    .await;
    assert!(revoked, "the reloaded file revokes the token");

    // A broken file keeps the previous list instead of un-revoking everything.
    std::fs::write(&f.file, "jti stolen-token\nsub only-two-fields\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(expect_deny(&sidecar.check(&token).await).2, "revoked");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_missing_revocation_file_stops_startup() {
    let f = fixture("").await;
    std::fs::remove_file(&f.file).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listeners = authz_sidecar::server::Listeners {
        grpc,
        grpc_unix: None,
        metrics: None,
    };
    let config = config(
        &["--jwks-url", &f.jwks.jwks_url()],
        &["--revocation-file", f.file.to_str().unwrap()],
    );
    let result = authz_sidecar::server::run(config, listeners, std::future::pending()).await;
    let error = result
        .expect_err("must not start with an empty list in place of the file")
        .to_string();
    assert!(error.contains("revoked.txt"), "{error}");
}
