//! The Redis revocation backend against a real redis-server per test: the revoke CLI, the key
//! layout and TTLs, one round trip per Check, pool size, and every way Redis can fail.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use authz_sidecar::redis::PoolSettings;
use authz_sidecar::revocation::{
    Persistence, RedisSettings, RedisStore, RevocationStore, StoreError, TokenIdentity,
};
use authz_sidecar::tools::devkeys::SigningKey;
use common::redis::RedisServer;
use common::*;
use futures_util::future::join_all;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

struct Fixture {
    redis: RedisServer,
    jwks: JwksServer,
    key: SigningKey,
}

async fn fixture() -> Fixture {
    let key = key(Algorithm::ES256, "ec-1");
    let jwks = JwksServer::start(&[&key]).await;
    Fixture {
        redis: RedisServer::start(),
        jwks,
        key,
    }
}

impl Fixture {
    async fn sidecar(&self, extra: &[&str]) -> Sidecar {
        let url = self.redis.url();
        let mut flags = vec!["--revocation-backend", "redis", "--redis-url", &url];
        flags.extend_from_slice(extra);
        start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await
    }

    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = valid_claims();
        change(&mut claims);
        self.key.sign(&claims).unwrap()
    }

    /// `authz-sidecar <args>` against this Redis, trusting ISSUER, with nothing from the outer
    /// environment.
    fn admin(&self, args: &[&str]) -> String {
        self.admin_trusting(ISSUER, args)
    }

    /// [`Fixture::admin`] with `JWT_ISSUER` set to `issuers`.
    fn admin_trusting(&self, issuers: &str, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
            .env_clear()
            .env("REVOCATION_BACKEND", "redis")
            .env("REDIS_URL", self.redis.url())
            .env("JWT_ISSUER", issuers)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn reason(response: &authz_sidecar::pb::envoy::service::auth::v3::CheckResponse) -> String {
    response
        .status
        .as_ref()
        .map_or(String::new(), |s| s.message.clone())
}

/// Whether Checks with `token` get `reason` ("" = allowed) within a second: with the
/// revocation cache on, a write reaches the sidecar as Redis's push, a few ms after the CLI
/// returns, not before.
async fn answers_soon(sidecar: &Sidecar, token: &str, reason: &str) -> bool {
    eventually(Duration::from_secs(1), || async {
        sidecar.reason(token).await == reason
    })
    .await
}

#[tokio::test]
async fn revoke_and_unrevoke_jti_subject_and_session_with_the_cli() {
    let f = fixture().await;
    let sidecar = f.sidecar(&[]).await;
    let exp = now() + 300;
    let by_jti = f.token(|c| {
        c["jti"] = json!("jti-1");
        c["exp"] = json!(exp);
    });
    expect_allow(&sidecar.check(&by_jti).await);

    assert_eq!(
        f.admin(&["revoke", "jti", "jti-1", "--exp", &exp.to_string()])
            .trim(),
        "revoked 1"
    );
    assert!(answers_soon(&sidecar, &by_jti, "revoked").await);
    // The entry lives until the token's exp plus the 60 s leeway, never forever.
    let ttl: i64 = f.redis.cli(&["TTL", "revoked:jti:jti-1"]).parse().unwrap();
    assert!(
        (exp + 60 - now() - 5..=exp + 60 - now() + 1).contains(&ttl),
        "ttl {ttl}"
    );
    assert_eq!(f.admin(&["unrevoke", "jti", "jti-1"]).trim(), "unrevoked");
    assert!(answers_soon(&sidecar, &by_jti, "").await);

    let old_alice = f.token(|c| c["iat"] = json!(now() - 10));
    f.admin(&["revoke", "sub", ISSUER, "alice"]);
    assert!(answers_soon(&sidecar, &old_alice, "revoked_subject").await);
    // A token issued after the cut-off (a fresh login) passes.
    expect_allow(
        &sidecar
            .check(&f.token(|c| c["iat"] = json!(now() + 5)))
            .await,
    );
    let ttl: i64 = f
        .redis
        .cli(&["TTL", &format!("revoked:sub:{ISSUER}:alice")])
        .parse()
        .unwrap();
    assert!(
        ttl > 86_000 && ttl <= 86_400,
        "subject revocations expire after REVOKED_SUBJECT_TTL: {ttl}"
    );
    f.admin(&["unrevoke", "sub", ISSUER, "alice"]);
    assert!(answers_soon(&sidecar, &old_alice, "").await);

    let session = f.token(|c| {
        c["sid"] = json!("s-9");
        c["iat"] = json!(now() - 10);
    });
    f.admin(&["revoke", "sid", ISSUER, "s-9"]);
    assert!(answers_soon(&sidecar, &session, "revoked_session").await);
    f.admin(&["unrevoke", "sid", ISSUER, "s-9"]);
    assert!(answers_soon(&sidecar, &session, "").await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn an_issuer_and_a_subject_never_run_into_each_other_in_a_key() {
    let f = fixture().await;
    // Two trusted issuers where one is the other plus `:8443`.
    let near = format!("{ISSUER}:8443");
    let issuers = format!("{ISSUER},{near}");
    let sidecar = f.sidecar(&["--jwt-issuer", &issuers]).await;
    f.admin_trusting(&issuers, &["revoke", "sub", ISSUER, "8443:x"]);
    let token = |iss: &str, sub: &str| {
        f.token(|c| {
            c["iss"] = json!(iss);
            c["sub"] = json!(sub);
            c["iat"] = json!(now() - 10);
        })
    };
    assert!(answers_soon(&sidecar, &token(ISSUER, "8443:x"), "revoked_subject").await);
    expect_allow(&sidecar.check(&token(&near, "x")).await);
    // A subject without `:` or `%` keeps the key the Go service and older versions wrote.
    f.admin(&["revoke", "sub", ISSUER, "alice@example.com"]);
    assert_eq!(
        f.redis
            .cli(&["EXISTS", &format!("revoked:sub:{ISSUER}:alice@example.com")]),
        "1"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn bulk_revocation_from_a_file_is_pipelined() {
    let f = fixture().await;
    let dir = std::env::temp_dir().join(format!(
        "authz-bulk-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let list = dir.join("jtis.txt");
    let exp = now() + 600;
    let mut text = String::from("# stolen batch\n");
    for i in 0..2500 {
        text.push_str(&format!("bulk-{i} {exp}\n"));
    }
    text.push_str(&format!("long-expired {}\n", now() - 3600));
    std::fs::write(&list, text).unwrap();
    f.redis.cli(&["CONFIG", "RESETSTAT"]);
    let summary = f.admin(&["revoke", "jti", "--from-file", list.to_str().unwrap()]);
    assert_eq!(summary.trim(), "revoked 2500 (skipped 1 already expired)");
    assert_eq!(f.redis.cli(&["DBSIZE"]), "2500");
    assert_eq!(f.redis.command_calls("set"), 2500);
    let sidecar = f.sidecar(&[]).await;
    let token = f.token(|c| c["jti"] = json!("bulk-2499"));
    assert_eq!(sidecar.reason(&token).await, "revoked");
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn one_check_is_one_mget_whatever_it_reads() {
    let f = fixture().await;
    // The read path itself, without the revocation cache (tests/revocation_cache.rs).
    let sidecar = f.sidecar(&["--revocation-cache-max-entries", "0"]).await;
    let token = f.token(|c| c["sid"] = json!("session-1"));
    expect_allow(&sidecar.check(&token).await);
    f.redis.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..25 {
        expect_allow(&sidecar.check(&token).await);
    }
    assert_eq!(
        f.redis.command_calls("mget"),
        25,
        "jti, sub and sid in one MGET per Check"
    );
    for other in ["get", "exists", "ttl", "set"] {
        assert_eq!(f.redis.command_calls(other), 0, "{other}");
    }
    sidecar.shutdown().await;
}

#[tokio::test]
async fn the_pool_opens_exactly_redis_pool_size_connections() {
    let f = fixture().await;
    // The cache's tracking connection would be a fourth; it has its own test.
    let sidecar = f
        .sidecar(&[
            "--redis-pool-size",
            "3",
            "--revocation-cache-max-entries",
            "0",
        ])
        .await;
    let three = eventually(Duration::from_secs(10), || async {
        f.redis.client_count() == 3
    })
    .await;
    assert!(
        three,
        "CLIENT LIST shows {} connections",
        f.redis.client_count()
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn killed_redis_fails_closed_fast_and_recovers_on_restart() {
    let mut f = fixture().await;
    let sidecar = f.sidecar(&["--redis-lookup-timeout", "200ms"]).await;
    let token = f.token(|_| {});
    expect_allow(&sidecar.check(&token).await);

    f.redis.kill();
    for _ in 0..10 {
        let started = Instant::now();
        let response = sidecar.check(&token).await;
        let elapsed = started.elapsed();
        assert_eq!(reason(&response), "revocation_unavailable");
        let (denied, code, _) = expect_deny(&response);
        assert_eq!(code, 14, "UNAVAILABLE");
        assert_eq!(denied.status.as_ref().map(|s| s.code), Some(503));
        assert!(
            elapsed < Duration::from_secs(1),
            "answered within the lookup timeout, took {elapsed:?}"
        );
    }

    f.redis.restart();
    let recovered = eventually(Duration::from_secs(20), || sidecar.allows(&token)).await;
    assert!(
        recovered,
        "reconnects to the restarted Redis without a sidecar restart"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn fail_open_allows_while_redis_is_down() {
    let mut f = fixture().await;
    let sidecar = f.sidecar(&["--revocation-failure-mode", "open"]).await;
    let revoked = f.token(|c| c["jti"] = json!("bad-one"));
    f.admin(&[
        "revoke",
        "jti",
        "bad-one",
        "--exp",
        &(now() + 300).to_string(),
    ]);
    assert_eq!(sidecar.reason(&revoked).await, "revoked");
    f.redis.kill();
    expect_allow(&sidecar.check(&f.token(|_| {})).await);
    sidecar.shutdown().await;
}

fn store_settings(url: String) -> RedisSettings {
    RedisSettings {
        pool: PoolSettings {
            url,
            pool_size: 2,
            lookup_timeout: Duration::from_millis(200),
            write_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            pool_timeout: Duration::from_secs(5),
            max_queued_commands: 10_000,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(60),
            tls: None,
        },
        key_prefix: "revoked:".into(),
        subject_ttl: Duration::from_secs(3600),
        cache_max_entries: 0,
        cache_ttl: Duration::from_secs(60),
    }
}

fn identity() -> TokenIdentity<'static> {
    TokenIdentity {
        issuer: ISSUER,
        jti: Some("j"),
        subject: Some("s"),
        session: None,
        issued_at: Some(1),
    }
}

#[tokio::test]
async fn a_paused_redis_costs_one_timeout_per_lookup_until_the_breaker_opens() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&store_settings(redis.url()))
        .await
        .unwrap();
    assert_eq!(store.lookup(&identity()).await, Ok(None));

    redis.pause();
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(store.lookup(&identity()).await, Err(StoreError::Timeout));
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(150),
            "waited for the timeout: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(1500),
            "timeout + margin: {elapsed:?}"
        );
    }
    let started = Instant::now();
    for _ in 0..1000 {
        assert_eq!(
            store.lookup(&identity()).await,
            Err(StoreError::BreakerOpen)
        );
    }
    let per_lookup = started.elapsed() / 1000;
    assert!(
        per_lookup < Duration::from_millis(1),
        "an open breaker answers at once: {per_lookup:?}"
    );
    redis.resume();
}

#[tokio::test]
async fn starting_with_redis_down_serves_and_recovers_when_it_arrives() {
    let f = fixture().await;
    let port = f.redis.port;
    drop(f.redis);
    let url = format!("redis://127.0.0.1:{port}");
    let sidecar = start_sidecar(config(
        &["--jwks-url", &f.jwks.jwks_url()],
        &[
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--redis-pool-timeout",
            "100ms",
        ],
    ))
    .await;
    let token = {
        let mut claims = valid_claims();
        claims["jti"] = json!("j");
        f.key.sign(&claims).unwrap()
    };
    assert_eq!(sidecar.reason(&token).await, "revocation_unavailable");

    let _redis = RedisServer::start_on(port);
    let recovered = eventually(Duration::from_secs(20), || sidecar.allows(&token)).await;
    assert!(recovered, "connects once Redis is up, no restart needed");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_thousand_concurrent_checks_each_get_their_own_answer() {
    let f = fixture().await;
    // Correctness under concurrency, not latency: on 2 cores 1,000 Checks queue for the CPU
    // longer than the 50 ms default budget (shedding that load is admission control's job).
    let sidecar = f
        .sidecar(&["--redis-pool-size", "2", "--redis-lookup-timeout", "10s"])
        .await;
    let exp = now() + 300;
    let mut revoke_list = String::new();
    let tokens: Vec<(String, bool)> = (0..1000)
        .map(|i| {
            let revoked = i % 3 == 0;
            let jti = format!("c-{i}");
            if revoked {
                revoke_list.push_str(&format!("{jti} {exp}\n"));
            }
            (f.token(|c| c["jti"] = json!(jti)), revoked)
        })
        .collect();
    let dir = std::env::temp_dir().join(format!(
        "authz-concurrent-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("list.txt"), revoke_list).unwrap();
    f.admin(&[
        "revoke",
        "jti",
        "--from-file",
        dir.join("list.txt").to_str().unwrap(),
    ]);

    let responses = join_all(tokens.iter().map(|(t, _)| sidecar.check(t))).await;
    for ((_, revoked), response) in tokens.iter().zip(&responses) {
        let code = response.status.as_ref().map_or(0, |s| s.code);
        if *revoked {
            assert_eq!(reason(response), "revoked");
        } else {
            assert_eq!(code, 0, "{response:?}");
        }
    }
    sidecar.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Startup warns when the revocation Redis would forget every revocation on a restart, and a
/// Redis that forbids CONFIG (as managed services do) is no error.
#[tokio::test]
async fn persistence_is_read_and_a_forbidden_config_is_not_an_error() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&store_settings(redis.url()))
        .await
        .unwrap();
    assert_eq!(
        store.persistence().await,
        Persistence::Off,
        "save \"\", appendonly no"
    );
    redis.cli(&["CONFIG", "SET", "appendonly", "yes"]);
    assert_eq!(store.persistence().await, Persistence::On);
    redis.cli(&[
        "ACL", "SETUSER", "lookups", "on", ">pw", "~*", "+@all", "-config",
    ]);
    let limited = format!("redis://lookups:pw@127.0.0.1:{}", redis.port);
    let store = RedisStore::connect(&store_settings(limited)).await.unwrap();
    assert_eq!(store.connected(), 2, "connected as the limited user");
    assert_eq!(store.persistence().await, Persistence::Unknown);
}
