//! Dependency faults and junk under load, against a real sidecar driven by the load generator:
//! cached keys keep verifying through every JWKS failure, an unknown-kid flood fetches at most
//! once per interval, and a junk flood is all denied without growing memory.

mod common;

use std::time::Duration;

use authz_sidecar::pb::envoy::service::auth::v3::CheckRequest;
use authz_sidecar::tools::loadgen::{Target, closed_loop, each_once};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;

fn bearer(token: &str) -> CheckRequest {
    check_request(&[("authorization", &format!("Bearer {token}"))])
}

/// A well-formed token for a `kid` nobody publishes, with a junk signature: it gets as far as
/// the key lookup.
fn unknown_kid_token(i: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!("{{\"alg\":\"ES256\",\"kid\":\"flood-{i}\"}}"));
    let payload = URL_SAFE_NO_PAD.encode(valid_claims().to_string());
    let signature = URL_SAFE_NO_PAD.encode([7u8; 64]);
    format!("{header}.{payload}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_keep_verifying_through_every_jwks_fault_under_load() {
    let known = key(Algorithm::ES256, "known");
    let mut jwks = JwksServer::start(&[&known]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--jwks-min-refresh-interval",
            "1s",
            "--jwks-fetch-timeout",
            "500ms",
        ],
    ))
    .await;
    assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);
    let valid = known.sign(&valid_claims()).unwrap();
    // Even positions valid, odd ones an unknown kid that makes the Check want a refetch:
    // 10,000 distinct kids.
    let requests: Vec<CheckRequest> = (0..20_000)
        .map(|i| {
            if i % 2 == 0 {
                bearer(&valid)
            } else {
                bearer(&unknown_kid_token(i))
            }
        })
        .collect();
    let target = load_on(&sidecar, requests).await;
    let huge = format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let faults: [(&str, StatusCode, Vec<u8>, Duration); 4] = [
        (
            "500",
            StatusCode::INTERNAL_SERVER_ERROR,
            b"oops".to_vec(),
            Duration::ZERO,
        ),
        (
            "garbage",
            StatusCode::OK,
            b"<html>not json".to_vec(),
            Duration::ZERO,
        ),
        (
            "2 MiB body",
            StatusCode::OK,
            huge.into_bytes(),
            Duration::ZERO,
        ),
        (
            "10 s slow",
            StatusCode::OK,
            b"{}".to_vec(),
            Duration::from_secs(10),
        ),
    ];
    let mut seconds = 0.0;
    for (name, status, body, delay) in faults {
        jwks.serve(status, body);
        jwks.set_delay(delay);
        let report = closed_loop(&target, 16, Duration::from_millis(1500)).await;
        seconds += report.elapsed.as_secs_f64();
        assert_eq!(report.errors, 0, "{name}: {}", report.summary());
        assert_eq!(
            report.allowed,
            report.sent.div_ceil(2),
            "{name}: every valid token allowed, every unknown kid denied: {}",
            report.summary()
        );
        assert_eq!(
            sidecar.http_get("/readyz").await.0,
            200,
            "{name}: still ready"
        );
    }
    jwks.set_delay(Duration::ZERO);
    jwks.stop().await;
    let report = closed_loop(&target, 16, Duration::from_millis(1500)).await;
    seconds += report.elapsed.as_secs_f64();
    assert_eq!(
        report.allowed,
        report.sent.div_ceil(2),
        "issuer down: {}",
        report.summary()
    );

    let scrape = sidecar.http_get("/metrics").await.1;
    let issuer = format!("{{issuer=\"{ISSUER}\",outcome=\"failed\"}}");
    let failed = metric_value(&scrape, &format!("ext_authz_jwks_refreshes_total{issuer}"));
    assert!(failed >= 1.0, "the failures are counted");
    let fetches = jwks.fetches() as f64;
    assert!(
        fetches <= seconds / 1.0 + 6.0,
        "about one fetch per JWKS_MIN_REFRESH_INTERVAL (1 s) in {seconds:.1} s, not one per \
         unknown kid: {fetches}"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_junk_flood_is_all_denied_cheaply_and_memory_stays_bounded() {
    let known = key(Algorithm::ES256, "known");
    let jwks = JwksServer::start(&[&known]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwks-min-refresh-interval", "1h"],
    ))
    .await;
    assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);
    let valid = known.sign(&valid_claims()).unwrap();
    let forger = key(Algorithm::ES256, "known");
    // 100,000 distinct tokens; the oversized ones are 1 in 20 to keep the set itself small.
    let junk: Vec<CheckRequest> = (0..100_000usize)
        .map(|i| {
            let token = match i % 20 {
                0..=5 => format!("{:x}{:x}", i.wrapping_mul(0x9E37_79B9), i),
                6..=11 => valid[..(i % valid.len()).max(1)].to_owned(),
                12 => format!("{}{i}", "a".repeat(9000)),
                13..=17 => unknown_kid_token(i),
                _ => {
                    let mut claims = valid_claims();
                    claims["jti"] = serde_json::json!(format!("forged-{i}"));
                    forger.sign(&claims).unwrap()
                }
            };
            bearer(&token)
        })
        .collect();
    let valid_set: Vec<CheckRequest> = (0..1_000).map(|_| bearer(&valid)).collect();
    let valid_target = load_on(&sidecar, valid_set).await;
    let target = load_on(&sidecar, junk).await;
    // CPU per Check for the flood against the same for cached valid tokens, in this process
    // (sidecar and generator together): junk must cost what the cheapest allow costs.
    let cpu = || async {
        let before = cpu_time();
        let report = each_once(&valid_target, 32).await;
        (report, cpu_time() - before)
    };
    let (warm, _) = cpu().await;
    assert_eq!(warm.allowed, 1_000, "{}", warm.summary());
    let (hits, hits_cpu) = cpu().await;
    let before = resident_bytes();
    let cpu_before = cpu_time();
    let report = each_once(&target, 32).await;
    let junk_cpu = cpu_time() - cpu_before;
    let per_check = |cpu: Duration, n: u64| cpu / n.max(1) as u32;
    eprintln!(
        "junk flood: {}; CPU per Check: junk {:?}, cached valid {:?}",
        report.summary(),
        per_check(junk_cpu, report.sent),
        per_check(hits_cpu, hits.sent)
    );
    assert_eq!(report.sent, 100_000);
    assert_eq!(report.allowed, 0, "{}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(report.denied, 100_000, "{}", report.summary());
    assert!(
        per_check(junk_cpu, report.sent) <= per_check(hits_cpu, hits.sent) * 2,
        "a junk Check costs about what a cached allow costs: junk {:?} against {:?}",
        per_check(junk_cpu, report.sent),
        per_check(hits_cpu, hits.sent)
    );
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "memory stays within the cache bounds: grew {} MiB",
        grown >> 20
    );
    assert_eq!(jwks.fetches(), 1, "no fetch for any of it (interval 1 h)");
    sidecar.shutdown().await;
}

/// The identity provider unreachable at startup: not ready, every Check a fast 503
/// `jwks_unavailable` (never an allow, never a hang), and ready with Checks allowed as soon
/// as the keys can be fetched, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_keys_at_startup_checks_fail_fast_until_the_keys_arrive() {
    let known = key(Algorithm::ES256, "known");
    let jwks = JwksServer::start(&[&known]).await;
    jwks.serve(StatusCode::SERVICE_UNAVAILABLE, "down for maintenance");
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--jwks-min-refresh-interval", "1s"],
    ))
    .await;
    let token = known.sign(&valid_claims()).unwrap();
    let target = load_on(&sidecar, vec![bearer(&token)]).await;
    let report = closed_loop(&target, 8, Duration::from_millis(1500)).await;
    eprintln!("no keys: {}", report.summary());
    assert_eq!(report.allowed, 0, "{}", report.summary());
    assert_eq!(
        report.errors,
        0,
        "every Check answered: {}",
        report.summary()
    );
    assert!(
        report.slowest_answer() < Duration::from_secs(1),
        "failing fast: {}",
        report.summary()
    );
    assert_eq!(sidecar.reason(&token).await, "jwks_unavailable");
    assert_eq!(sidecar.http_get("/readyz").await.0, 503, "not ready");

    jwks.serve_keys(&[&known]);
    assert!(
        http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(15)).await,
        "ready once the keys can be fetched"
    );
    assert!(all_allowed_again(&target).await, "and Checks are allowed");
    sidecar.shutdown().await;
}

/// Redis killed, restarted and paused while Checks keep coming: every Check is answered within
/// a bound set by the lookup timeout (never Envoy's timeout), fail-closed answers are 503s, and
/// the sidecar recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill_restart_and_pause_under_load_keep_every_answer_bounded() {
    redis_faults_under_load(&[]).await;
}

/// The same with Redis rate limits on: revocation fails open here and the limiter fails
/// closed, so a Check with Redis gone waits on both calls in turn, and after the restart the
/// limiter must load its script again (Redis forgot it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_faults_with_rate_limits_on_keep_every_answer_bounded() {
    let dir = std::env::temp_dir().join(format!("authz-faults-rl-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let limits = dir.join("limits.yaml");
    std::fs::write(
        &limits,
        "rate_limits:\n  backend: redis\n  failure_mode: closed\n  default: [per-user]\n  \
         policies:\n    per-user: {key: subject, rate: 1000000, per: 1s}\n",
    )
    .unwrap();
    let limits = limits.to_str().unwrap().to_owned();
    redis_faults_under_load(&["--config", &limits, "--revocation-failure-mode", "open"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Kill, restart and pause Redis under 16 callers; every answer inside a bound, none allowed
/// while Redis is gone (with the flags given, some Redis call fails closed), all allowed after.
async fn redis_faults_under_load(extra: &[&str]) {
    let known = key(Algorithm::ES256, "known");
    let jwks = JwksServer::start(&[&known]).await;
    let mut redis = RedisServer::start();
    let url = redis.url();
    let mut flags = vec![
        "--revocation-backend",
        "redis",
        "--redis-url",
        &url,
        "--redis-lookup-timeout",
        "50ms",
        // The lookup path itself; the revocation cache's own fault handling (it stops
        // answering once it cannot trust Redis's pushes) is in tests/revocation_cache.rs.
        "--revocation-cache-max-entries",
        "0",
    ];
    flags.extend_from_slice(extra);
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &flags)).await;
    assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);
    let requests = vec![bearer(&known.sign(&valid_claims()).unwrap())];
    let target = load_on(&sidecar, requests).await;
    let load = || closed_loop(&target, 16, Duration::from_millis(1500));
    // Generous: the lookup budget is 50 ms; a debug build on two shared cores adds queueing.
    let bound = Duration::from_millis(750);

    let healthy = load().await;
    assert_eq!(healthy.allowed, healthy.sent, "{}", healthy.summary());

    redis.kill();
    let down = load().await;
    eprintln!(
        "killed: slowest {:?}; {}",
        down.slowest_answer(),
        down.summary()
    );
    assert_eq!(
        down.errors,
        0,
        "killed: every Check answered: {}",
        down.summary()
    );
    assert_eq!(down.allowed, 0, "killed: fail closed: {}", down.summary());
    assert!(down.slowest_answer() < bound, "killed: {}", down.summary());

    redis.restart();
    let recovered = all_allowed_again(&target).await;
    assert!(
        recovered,
        "allowed again once Redis is back, without a restart"
    );

    redis.pause();
    let paused = load().await;
    redis.resume();
    eprintln!(
        "paused: slowest {:?}; {}",
        paused.slowest_answer(),
        paused.summary()
    );
    assert_eq!(
        paused.errors,
        0,
        "paused: every Check answered: {}",
        paused.summary()
    );
    assert!(
        paused.slowest_answer() < bound,
        "paused: {}",
        paused.summary()
    );
    let resumed = all_allowed_again(&target).await;
    assert!(resumed, "allowed again once Redis answers");
    sidecar.shutdown().await;
}

/// The load generator on two connections to the sidecar, cycling through `requests`.
async fn load_on(sidecar: &Sidecar, requests: Vec<CheckRequest>) -> Target {
    Target::connect(
        &format!("http://{}", sidecar.addr),
        2,
        requests,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// Whether, within 15 s, a short burst of Checks is allowed in full again.
async fn all_allowed_again(target: &Target) -> bool {
    eventually(Duration::from_secs(15), || async {
        let report = closed_loop(target, 4, Duration::from_millis(200)).await;
        report.sent > 0 && report.allowed == report.sent
    })
    .await
}

/// CPU time this process has used so far (user and system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// This process's resident set, from /proc.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
