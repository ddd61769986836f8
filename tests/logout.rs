//! OpenID Connect Back-Channel Logout through the real boundaries: logout tokens POSTed over
//! HTTP to the sidecar's logout listener, keys from a real JWKS server, the effect seen through
//! real Check RPCs, and a real redis-server shared by two sidecars.

mod common;

use std::process::Command;
use std::time::Duration;

use authz_sidecar::logout::LOGOUT_EVENT;
use authz_sidecar::tools::devkeys::{SigningKey, random_id};
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The relying party's client id at the identity provider: the `aud` of logout tokens.
const CLIENT_ID: &str = "rp-client";

struct Fixture {
    jwks: JwksServer,
    key: SigningKey,
}

async fn fixture() -> Fixture {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    Fixture { jwks, key }
}

impl Fixture {
    /// A sidecar with the logout endpoint on, plus `extra` flags.
    async fn sidecar(&self, extra: &[&str]) -> Sidecar {
        let mut flags = vec![
            "--backchannel-logout-listen-addr",
            "127.0.0.1:0",
            "--backchannel-logout-client-id",
            CLIENT_ID,
        ];
        flags.extend_from_slice(extra);
        start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await
    }

    /// An access token for a Check, of this subject and session, issued a little while ago.
    fn access_token(&self, sub: &str, sid: &str) -> String {
        let mut claims = valid_claims();
        claims["sub"] = json!(sub);
        claims["sid"] = json!(sid);
        claims["iat"] = json!(now() - 30);
        self.key.sign(&claims).unwrap()
    }

    /// A logout token as an identity provider sends it (`typ: logout+jwt`), with `change`
    /// applied to valid claims.
    fn logout_token(&self, change: impl FnOnce(&mut Value)) -> String {
        sign_logout(&self.key, change)
    }
}

fn logout_claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": now(),
        "exp": now() + 120,
        "jti": random_id(),
        "sub": "alice",
        "sid": "session-1",
        "events": {LOGOUT_EVENT: {}},
    })
}

fn sign_logout(key: &SigningKey, change: impl FnOnce(&mut Value)) -> String {
    let mut claims = logout_claims();
    change(&mut claims);
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    header.typ = Some("logout+jwt".into());
    let encoding = EncodingKey::from_ec_pem(key.pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &encoding).unwrap()
}

/// What the logout endpoint answered.
struct Answer {
    status: u16,
    cache_control: Option<String>,
    allow: Option<String>,
    body: String,
}

impl Answer {
    /// The `error_description` of a 400, after checking the error body's shape.
    fn refusal(&self) -> String {
        assert_eq!(self.status, 400, "{}", self.body);
        let body: Value = serde_json::from_str(&self.body).expect("a JSON error body");
        assert_eq!(body["error"], "invalid_request", "{body}");
        body["error_description"].as_str().unwrap().to_owned()
    }
}

async fn send(
    sidecar: &Sidecar,
    method: reqwest::Method,
    content_type: &str,
    body: String,
) -> Answer {
    let url = format!(
        "http://{}{}",
        sidecar.logout_addr.expect("logout listener on"),
        authz_sidecar::logout::PATH
    );
    let response = reqwest::Client::new()
        .request(method, url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("the logout listener answers");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (cache_control, allow) = (header("cache-control"), header("allow"));
    Answer {
        status: response.status().as_u16(),
        cache_control,
        allow,
        body: response.text().await.unwrap(),
    }
}

/// POSTs `logout_token=<token>` as an identity provider does.
async fn post_logout(sidecar: &Sidecar, token: &str) -> Answer {
    let body = format!("logout_token={token}");
    send(
        sidecar,
        reqwest::Method::POST,
        "application/x-www-form-urlencoded",
        body,
    )
    .await
}

async fn logout_count(sidecar: &Sidecar, result: &str) -> f64 {
    metric_value(
        &sidecar.http_get("/metrics").await.1,
        &format!("ext_authz_backchannel_logout_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test]
async fn a_logout_token_with_a_sid_revokes_that_session_and_no_other() {
    let f = fixture().await;
    let sidecar = f.sidecar(&[]).await;
    let session_1 = f.access_token("alice", "session-1");
    let session_2 = f.access_token("alice", "session-2");
    assert!(sidecar.allows(&session_1).await);

    let answer = post_logout(&sidecar, &f.logout_token(|_| {})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.cache_control.as_deref(), Some("no-store"));

    assert_eq!(sidecar.reason(&session_1).await, "revoked_session");
    assert!(
        sidecar.allows(&session_2).await,
        "the subject's other session passes: a sid logs out that session only"
    );
    assert_eq!(logout_count(&sidecar, "ok").await, 1.0);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_logout_token_with_only_a_sub_revokes_every_session_of_the_subject() {
    let f = fixture().await;
    let sidecar = f.sidecar(&[]).await;
    let token = f.logout_token(|c| {
        c.as_object_mut().unwrap().remove("sid");
    });
    assert_eq!(post_logout(&sidecar, &token).await.status, 200);

    for sid in ["session-1", "session-2"] {
        let reason = sidecar.reason(&f.access_token("alice", sid)).await;
        assert_eq!(reason, "revoked_subject", "{sid}");
    }
    assert!(sidecar.allows(&f.access_token("bob", "session-1")).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn bad_logout_tokens_are_refused_with_400_and_revoke_nothing() {
    let f = fixture().await;
    let sidecar = f.sidecar(&[]).await;
    let forger = key(Algorithm::ES256, "ec-1");
    let hmac = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ec-1".into());
        header.typ = Some("logout+jwt".into());
        let secret = EncodingKey::from_secret(f.key.jwk().unwrap()["x"].to_string().as_bytes());
        jsonwebtoken::encode(&header, &logout_claims(), &secret).unwrap()
    };
    let remove = |name: &'static str| {
        move |c: &mut Value| {
            c.as_object_mut().unwrap().remove(name);
        }
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "forged signature",
            sign_logout(&forger, |_| {}),
            "signature",
        ),
        ("HMAC alg", hmac, "alg"),
        (
            "wrong aud",
            f.logout_token(|c| c["aud"] = json!("another-client")),
            "aud",
        ),
        (
            "untrusted iss",
            f.logout_token(|c| c["iss"] = json!("https://elsewhere.test")),
            "iss",
        ),
        ("missing events", f.logout_token(remove("events")), "events"),
        (
            "events without the logout member",
            f.logout_token(|c| c["events"] = json!({"http://example.com/other": {}})),
            "events",
        ),
        (
            "nonce present",
            f.logout_token(|c| c["nonce"] = json!("n-1")),
            "nonce",
        ),
        (
            "missing sid and sub",
            f.logout_token(|c| {
                remove("sid")(c);
                remove("sub")(c);
            }),
            "sid",
        ),
        ("missing jti", f.logout_token(remove("jti")), "jti"),
        ("missing iat", f.logout_token(remove("iat")), "iat"),
        (
            "expired",
            f.logout_token(|c| {
                c["iat"] = json!(now() - 200);
                c["exp"] = json!(now() - 100);
            }),
            "expired",
        ),
        (
            "iat too old",
            f.logout_token(|c| {
                c["iat"] = json!(now() - 3600);
                remove("exp")(c);
            }),
            "older",
        ),
        ("not a JWT", "not-a-jwt".into(), "well-formed"),
    ];
    for (name, token, expected) in &cases {
        let answer = post_logout(&sidecar, token).await;
        assert_eq!(answer.cache_control.as_deref(), Some("no-store"), "{name}");
        let why = answer.refusal();
        assert!(why.contains(expected), "{name}: {why}");
    }
    let good = f.logout_token(|_| {});
    let not_a_form = send(
        &sidecar,
        reqwest::Method::POST,
        "application/json",
        format!("logout_token={good}"),
    )
    .await;
    assert!(not_a_form.refusal().contains("Content-Type"));
    let no_token = send(
        &sidecar,
        reqwest::Method::POST,
        "application/x-www-form-urlencoded",
        format!("id_token={good}"),
    )
    .await;
    assert!(no_token.refusal().contains("missing"));

    assert!(
        sidecar.allows(&f.access_token("alice", "session-1")).await,
        "no refused token revoked anything"
    );
    assert_eq!(
        logout_count(&sidecar, "invalid").await,
        cases.len() as f64 + 2.0
    );
    assert_eq!(logout_count(&sidecar, "ok").await, 0.0);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_replayed_logout_token_is_refused() {
    let f = fixture().await;
    let sidecar = f.sidecar(&[]).await;
    let token = f.logout_token(|_| {});
    assert_eq!(post_logout(&sidecar, &token).await.status, 200);
    let again = post_logout(&sidecar, &token).await;
    assert!(again.refusal().contains("already"), "{}", again.body);
    assert_eq!(logout_count(&sidecar, "replay").await, 1.0);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_and_other_methods_405() {
    let f = fixture().await;
    let sidecar = f
        .sidecar(&["--backchannel-logout-max-body-bytes", "2048"])
        .await;
    let padded = format!(
        "logout_token={}&padding={}",
        f.logout_token(|_| {}),
        "x".repeat(4096)
    );
    let form = "application/x-www-form-urlencoded";
    let large = send(&sidecar, reqwest::Method::POST, form, padded).await;
    assert_eq!(large.status, 413, "{}", large.body);
    assert_eq!(large.cache_control.as_deref(), Some("no-store"));

    let get = send(&sidecar, reqwest::Method::GET, form, String::new()).await;
    assert_eq!(get.status, 405, "{}", get.body);
    assert_eq!(get.allow.as_deref(), Some("POST"));
    assert_eq!(get.cache_control.as_deref(), Some("no-store"));
    assert_eq!(logout_count(&sidecar, "too_large").await, 1.0);
    assert_eq!(logout_count(&sidecar, "method_not_allowed").await, 1.0);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn requests_beyond_the_rate_limit_get_429() {
    let f = fixture().await;
    let sidecar = f.sidecar(&["--backchannel-logout-rate-limit", "2"]).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post_logout(&sidecar, &f.logout_token(|_| {})).await.status);
    }
    assert_eq!(&statuses[..2], [200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert!(logout_count(&sidecar, "rate_limited").await >= 1.0);
    sidecar.shutdown().await;
}

/// With REVOCATION_FILE, the logout is written to the file as `revoke` writes it: it is in
/// force at once, and stays in force when the file is reloaded after another edit.
#[tokio::test]
async fn with_a_revocation_file_the_logout_is_written_there_and_survives_reloads() {
    let f = fixture().await;
    let dir = std::env::temp_dir().join(format!("authz-logout-{}", random_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("revoked.txt");
    std::fs::write(&file, "# operator's list\n").unwrap();
    let sidecar = f
        .sidecar(&["--revocation-file", file.to_str().unwrap()])
        .await;
    let session_1 = f.access_token("alice", "session-1");
    assert_eq!(
        post_logout(&sidecar, &f.logout_token(|_| {})).await.status,
        200
    );
    assert_eq!(sidecar.reason(&session_1).await, "revoked_session");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains(&format!("sid {ISSUER} session-1 ")),
        "{text:?}"
    );

    // Another writer edits the file; the reload keeps the logout in force.
    std::fs::write(&file, format!("{text}jti some-other-token\n")).unwrap();
    let other = f.key.sign(&{
        let mut claims = valid_claims();
        claims["jti"] = json!("some-other-token");
        claims
    });
    let reloaded = eventually(Duration::from_secs(10), || async {
        sidecar.reason(other.as_ref().unwrap()).await == "revoked"
    })
    .await;
    assert!(reloaded, "the edited file was reloaded");
    assert_eq!(sidecar.reason(&session_1).await, "revoked_session");
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Two replicas sharing one Redis: a logout posted to A is enforced by B (which had already
/// cached "not revoked" for that session), and the same token replayed to B is refused.
#[tokio::test]
async fn a_logout_posted_to_one_sidecar_is_enforced_and_remembered_by_another() {
    let f = fixture().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let shared = ["--revocation-backend", "redis", "--redis-url", &url];
    let a = f.sidecar(&shared).await;
    let b = f.sidecar(&shared).await;
    assert!(cache_live_within(&b, Duration::from_secs(10)).await);
    let session_1 = f.access_token("alice", "session-1");
    assert!(b.allows(&session_1).await, "cached as not revoked on B");

    let token = f.logout_token(|_| {});
    assert_eq!(post_logout(&a, &token).await.status, 200);
    let enforced = eventually(Duration::from_secs(2), || async {
        b.reason(&session_1).await == "revoked_session"
    })
    .await;
    assert!(
        enforced,
        "B denies the session within the cache's push time"
    );
    assert!(b.allows(&f.access_token("alice", "session-2")).await);

    let replayed = post_logout(&b, &token).await;
    assert!(replayed.refusal().contains("already"), "{}", replayed.body);
    a.shutdown().await;
    b.shutdown().await;
}

/// A store that cannot take the write answers 503 (the identity provider retries), and the
/// retry of the same token is not refused as a replay.
#[tokio::test]
async fn a_failed_write_answers_503_and_the_retry_succeeds() {
    let f = fixture().await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let sidecar = f
        .sidecar(&[
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--redis-write-timeout",
            "300ms",
        ])
        .await;
    let token = f.logout_token(|_| {});
    redis.kill();
    let down = post_logout(&sidecar, &token).await;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.cache_control.as_deref(), Some("no-store"));
    assert_eq!(logout_count(&sidecar, "store_error").await, 1.0);

    redis.restart();
    let retried = eventually(Duration::from_secs(10), || async {
        post_logout(&sidecar, &token).await.status == 200
    })
    .await;
    assert!(retried, "the IdP's retry of the same token is accepted");
    assert_eq!(
        sidecar.reason(&f.access_token("alice", "session-1")).await,
        "revoked_session"
    );
    sidecar.shutdown().await;
}

/// Settings that cannot work stop startup with 64 and say why.
#[test]
fn a_logout_listener_without_a_client_id_or_with_an_untrusted_issuer_exits_64() {
    let run = |extra: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"));
        command
            .env_clear()
            .env("JWT_ISSUER", ISSUER)
            .env("JWKS_URL", "http://127.0.0.1:1/jwks.json")
            .env("BACKCHANNEL_LOGOUT_LISTEN_ADDR", "127.0.0.1:0");
        for (name, value) in extra {
            command.env(name, value);
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("BACKCHANNEL_LOGOUT_CLIENT_ID"), "{stderr}");
    let (code, stderr) = run(&[
        ("BACKCHANNEL_LOGOUT_CLIENT_ID", CLIENT_ID),
        ("BACKCHANNEL_LOGOUT_ISSUERS", "https://elsewhere.test"),
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("BACKCHANNEL_LOGOUT_ISSUERS"), "{stderr}");
}
