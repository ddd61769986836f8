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
    key: authz_sidecar::tools::devkeys::SigningKey,
}

async fn fixture(initial: &str) -> Fixture {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    let dir = std::env::temp_dir().join(format!(
        "authz-revocation-{}",
        authz_sidecar::tools::devkeys::random_id()
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
        logout: None,
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

/// `authz-sidecar <args>` with the memory backend on this fixture's file, trusting ISSUER, and
/// nothing from the outer environment.
fn admin(f: &Fixture, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("REVOCATION_FILE", &f.file)
        .env("JWT_ISSUER", ISSUER)
        .args(args)
        .output()
        .unwrap()
}

fn admin_ok(f: &Fixture, args: &[&str]) -> String {
    let out = admin(f, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn identifiers_with_spaces_are_revoked_and_the_file_stays_loadable() {
    let f = fixture("jti old-style-line\n").await;
    let sidecar = f.sidecar().await;
    let token = |sub: &str, jti: &str| {
        let mut claims = valid_claims();
        claims["sub"] = json!(sub);
        claims["jti"] = json!(jti);
        // Issued before the revocations below, whichever second they land in: a subject
        // revocation covers tokens issued up to its second, not one minted a second later.
        claims["iat"] = json!(now() - 60);
        f.key.sign(&claims).unwrap()
    };
    let exp = (now() + 300).to_string();

    assert_eq!(
        admin_ok(&f, &["revoke", "sub", ISSUER, "John Smith"]).trim(),
        "revoked 1"
    );
    let john = token("John Smith", "j-1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.reason(&john).await == "revoked_subject"
        })
        .await,
        "the running sidecar loads the new line and enforces it"
    );
    // Every later edit still works, and reaches the sidecar.
    admin_ok(&f, &["revoke", "jti", "tab\tand space", "--exp", &exp]);
    let tabbed = token("mary", "tab\tand space");
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.reason(&tabbed).await == "revoked"
        })
        .await
    );
    expect_allow(&sidecar.check(&token("John", "j-2")).await);
    assert_eq!(
        admin_ok(&f, &["unrevoke", "sub", ISSUER, "John Smith"]).trim(),
        "unrevoked"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.allows(&john).await
        })
        .await
    );
    sidecar.shutdown().await;

    // A restart loads the file it left behind: no crash loop across a rollout.
    let restarted = f.sidecar().await;
    assert_eq!(restarted.reason(&tabbed).await, "revoked");
    assert_eq!(
        restarted.reason(&token("x", "old-style-line")).await,
        "revoked"
    );
    restarted.shutdown().await;
}

#[tokio::test]
async fn empty_identifiers_and_untrusted_issuers_are_refused_with_64() {
    let f = fixture("# untouched\n").await;
    let exp = (now() + 300).to_string();
    for args in [
        vec!["revoke", "sub", ISSUER, ""],
        vec!["revoke", "sid", ISSUER, ""],
        vec!["revoke", "sub", "", "alice"],
        vec!["revoke", "jti", "", "--exp", &exp],
    ] {
        let out = admin(&f, &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is empty"), "{args:?}: {stderr}");
    }
    // A trailing-slash typo would be a no-op that prints `revoked 1`.
    let typo = format!("{ISSUER}/");
    let out = admin(&f, &["revoke", "sub", &typo, "alice"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("Did you mean {ISSUER:?}")),
        "{stderr}"
    );
    let out = admin(&f, &["revoke", "sid", "https://elsewhere.test", "s-1"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        std::fs::read_to_string(&f.file).unwrap(),
        "# untouched\n",
        "nothing was written"
    );
    admin_ok(&f, &["revoke", "sub", &typo, "alice", "--any-issuer"]);
    assert!(std::fs::read_to_string(&f.file).unwrap().contains(&typo));
}

#[test]
fn fifty_concurrent_revokes_all_land() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let f = runtime.block_on(fixture(""));
    let exp = (now() + 600).to_string();
    let children: Vec<_> = (0..50)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
                .env_clear()
                .env("REVOCATION_FILE", &f.file)
                .args(["revoke", "jti", &format!("parallel-{i}"), "--exp", &exp])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&f.file).unwrap();
    let list = authz_sidecar::revocation::RevocationList::parse(&text, "revoked.txt").unwrap();
    assert_eq!(list.len(), 50, "every revoke landed:\n{text}");
    let dir = f.file.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[tokio::test]
async fn a_same_length_edit_that_keeps_the_mtime_is_seen_and_a_broken_file_keeps_counting() {
    let f = fixture("jti aaaa\n").await;
    let sidecar = f.sidecar().await;
    let token = |jti: &str| {
        let mut claims = valid_claims();
        claims["jti"] = json!(jti);
        f.key.sign(&claims).unwrap()
    };
    assert_eq!(sidecar.reason(&token("aaaa")).await, "revoked");
    let mtime = std::fs::metadata(&f.file).unwrap().modified().unwrap();
    // Same length, mtime put back: what `cp -p` or a restore from backup does.
    std::fs::write(&f.file, "jti bbbb\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f.file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.reason(&token("bbbb")).await == "revoked"
        })
        .await,
        "the new content is in force"
    );
    expect_allow(&sidecar.check(&token("aaaa")).await);

    let failed = |scrape: &str| {
        metric_value(
            scrape,
            "ext_authz_revocation_file_reloads_total{outcome=\"failed\"}",
        )
    };
    std::fs::write(&f.file, "jti bbbb\nsub only-two-fields\n").unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && seen.last().is_none_or(|n| *n < 3.0) {
        seen.push(failed(&sidecar.http_get("/metrics").await.1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counting = seen.last().is_some_and(|n| *n >= 3.0);
    assert!(
        counting,
        "a broken file counts on every poll, not once: {seen:?}"
    );
    assert_eq!(
        sidecar.reason(&token("bbbb")).await,
        "revoked",
        "the last good list stays in force"
    );
    sidecar.shutdown().await;
}
