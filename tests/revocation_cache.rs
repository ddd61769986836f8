//! The in-process revocation cache in front of Redis: repeated Checks need no Redis call, yet a
//! revocation written by anyone takes effect within a round trip of Redis's invalidation push,
//! and one written while the tracking connection was down is seen once it is back.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;

struct Fixture {
    redis: RedisServer,
    jwks: JwksServer,
    key: authz_sidecar::tools::devkeys::SigningKey,
}

impl Fixture {
    async fn new() -> Fixture {
        let key = key(Algorithm::ES256, "rc-1");
        Fixture {
            redis: RedisServer::start(),
            jwks: JwksServer::start(&[&key]).await,
            key,
        }
    }

    /// A sidecar on this Redis whose revocation cache is live (tracking is on).
    async fn sidecar(&self) -> Sidecar {
        let url = self.redis.url();
        let flags = ["--revocation-backend", "redis", "--redis-url", &url];
        let sidecar = start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await;
        assert!(
            cache_live_within(&sidecar, Duration::from_secs(10)).await,
            "the cache turns live once tracking is on"
        );
        sidecar
    }

    fn token(&self, jti: &str, sub: &str) -> String {
        let mut claims = valid_claims();
        claims["jti"] = jti.into();
        claims["sub"] = sub.into();
        self.key.sign(&claims).unwrap()
    }

    /// Runs commands on one redis-cli connection, in order.
    fn cli_session(&self, commands: &str) {
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.redis.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(commands.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}

async fn cache_lookups(sidecar: &Sidecar, result: &str) -> f64 {
    metric_value(
        &sidecar.http_get("/metrics").await.1,
        &format!("ext_authz_revocation_cache_requests_total{{result=\"{result}\"}}"),
    )
}

/// Checks until the token is denied as `reason`; how long that took.
async fn denied_after(sidecar: &Sidecar, token: &str, reason: &str) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if sidecar.reason(token).await == reason {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn repeated_checks_are_answered_without_redis() {
    let f = Fixture::new().await;
    let sidecar = f.sidecar().await;
    let token = f.token("hot-1", "alice");
    assert!(sidecar.allows(&token).await);
    f.redis.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..50 {
        assert!(sidecar.allows(&token).await);
    }
    assert_eq!(f.redis.command_calls("mget"), 0, "all 50 from the cache");
    assert_eq!(cache_lookups(&sidecar, "hit").await, 50.0);
    assert_eq!(cache_lookups(&sidecar, "miss").await, 1.0);
    // The cached token keeps its answer's stamp: the 50 repeats made no lookup at all.
    let scrape = sidecar.http_get("/metrics").await.1;
    assert_eq!(
        metric_value(&scrape, "ext_authz_redis_lookup_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        f.redis.client_count(),
        3,
        "the pool's 2 connections and one for tracking"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_revocation_by_any_writer_takes_effect_at_once_despite_the_cache() {
    let f = Fixture::new().await;
    let sidecar = f.sidecar().await;
    let token = f.token("prop-1", "bob");
    for _ in 0..3 {
        assert!(sidecar.allows(&token).await, "cached as not revoked");
    }

    // Another writer (not this binary) revokes the token: Redis pushes the invalidation.
    let started = Instant::now();
    f.redis.cli(&["SET", "revoked:jti:prop-1", "1"]);
    let took = denied_after(&sidecar, &token, "revoked")
        .await
        .expect("the revocation takes effect");
    eprintln!(
        "jti revocation seen after {took:?} ({:?} including redis-cli)",
        started.elapsed()
    );
    // Typically well under a millisecond after the SET; generous for a loaded machine.
    assert!(took < Duration::from_millis(500), "{took:?}");

    // A subject-wide revocation through the CLI, for a token cached a moment ago.
    let other = f.token("prop-2", "bob");
    assert!(sidecar.allows(&other).await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    f.redis.cli(&[
        "SET",
        &format!("revoked:sub:{ISSUER}:bob"),
        &now.to_string(),
    ]);
    let took = denied_after(&sidecar, &other, "revoked_subject").await;
    assert!(
        took.is_some_and(|t| t < Duration::from_millis(500)),
        "{took:?}"
    );
    // Unrevoking propagates the same way.
    f.redis.cli(&["DEL", "revoked:jti:prop-1"]);
    let allowed_again = eventually(Duration::from_millis(500), || async {
        sidecar.allows(&f.token("prop-1", "carol")).await
    })
    .await;
    assert!(allowed_again);
    assert!(
        metric_value(
            &sidecar.http_get("/metrics").await.1,
            "ext_authz_revocation_cache_invalidations_total"
        ) >= 3.0
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_revocation_written_while_tracking_was_down_is_seen_after_the_reconnect() {
    let f = Fixture::new().await;
    let sidecar = f.sidecar().await;
    let token = f.token("gap-1", "dave");
    assert!(sidecar.allows(&token).await, "cached as not revoked");
    // One redis-cli connection drops every other client (the tracking connection among them)
    // and then writes, so no invalidation can reach the sidecar for this write.
    f.cli_session("CLIENT KILL TYPE normal\nSET revoked:jti:gap-1 1\n");
    let took = denied_after(&sidecar, &token, "revoked").await;
    eprintln!("revocation missed by the push seen after {took:?}");
    assert!(
        took.is_some(),
        "the cache is emptied when tracking restarts, so Redis is read again"
    );
    assert!(
        cache_live_within(&sidecar, Duration::from_secs(10)).await,
        "tracking comes back by itself"
    );
    assert_eq!(sidecar.reason(&token).await, "revoked");
    sidecar.shutdown().await;
}

/// How long, after Redis stops answering, Checks keep being served from the cache.
async fn cached_answers_after(sidecar: &Sidecar, token: &str) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if sidecar.reason(token).await == "revocation_unavailable" {
            return started.elapsed();
        }
    }
    Duration::MAX
}

#[tokio::test]
async fn with_redis_killed_or_paused_the_cache_stops_answering_within_a_second() {
    let mut f = Fixture::new().await;
    let sidecar = f.sidecar().await;
    let token = f.token("down-1", "erin");
    assert!(sidecar.allows(&token).await, "cached as not revoked");

    // Killed: the tracking connection closes, which is noticed at once. Without pushes the
    // cache cannot be trusted (a partitioned sidecar would miss revocations), so the Check
    // follows REVOCATION_FAILURE_MODE (closed by default).
    f.redis.kill();
    let window = cached_answers_after(&sidecar, &token).await;
    eprintln!("killed: cached answers for {window:?}");
    assert!(window < Duration::from_millis(500), "{window:?}");
    f.redis.restart();
    assert!(cache_live_within(&sidecar, Duration::from_secs(15)).await);
    let allowed = eventually(Duration::from_secs(15), || async {
        sidecar.allows(&token).await
    })
    .await;
    assert!(allowed, "allowed again once the pool reconnects too");

    // Paused (SIGSTOP): nothing closes; the pings find it, within two ping intervals.
    assert!(sidecar.allows(&token).await, "cached again");
    f.redis.pause();
    let window = cached_answers_after(&sidecar, &token).await;
    f.redis.resume();
    eprintln!("paused: cached answers for {window:?}");
    assert!(window < Duration::from_millis(2500), "{window:?}");
    sidecar.shutdown().await;
}
