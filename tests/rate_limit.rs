//! Rate limits: the GCRA buckets on tokio's paused clock, then through the Check RPC with the
//! local backend and with two sidecars sharing one real redis-server.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use authz_sidecar::claims::Claims;
use authz_sidecar::metrics::Metrics;
use authz_sidecar::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use authz_sidecar::pb::envoy::service::auth::v3::CheckResponse;
use authz_sidecar::pb::envoy::service::auth::v3::attribute_context::Peer;
use authz_sidecar::rate_limit::{
    Backend, Caller, LimitError, LocalLimiter, RateLimitSection, RateLimiter,
};
use authz_sidecar::tools::devkeys::SigningKey;
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

fn limiter(yaml: &str) -> RateLimiter {
    limiter_with_metrics(yaml).0
}

fn limiter_with_metrics(yaml: &str) -> (RateLimiter, Arc<Metrics>) {
    let config = serde_yaml_ng::from_str::<RateLimitSection>(yaml)
        .unwrap()
        .validate()
        .unwrap();
    let metrics = Arc::new(Metrics::new(&[]));
    let local = LocalLimiter::new(config.max_keys, metrics.rate_limit_evictions.clone());
    let limiter = RateLimiter::new(config, Backend::Local(local), metrics.clone());
    (limiter, metrics)
}

fn subject(sub: &str) -> Claims {
    Claims {
        iss: Some(ISSUER.into()),
        sub: Some(sub.into()),
        ..Claims::default()
    }
}

fn caller(claims: &Claims) -> Caller<'_> {
    Caller {
        token: Some((ISSUER, claims)),
        ip: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_n_plus_one_allows_n_and_names_the_wait() {
    // 5 per second with a burst of 5: one request earns back every 200 ms.
    let limiter =
        limiter("default: [per-user]\npolicies:\n  per-user: {key: subject, rate: 5, per: 1s}\n");
    let (alice, bob) = (subject("alice"), subject("bob"));
    for expected_remaining in (0..5).rev() {
        let outcome = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
        assert!(!outcome.limited);
        assert_eq!(outcome.remaining, expected_remaining);
    }
    let refused = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
    assert!(refused.limited);
    assert_eq!(
        refused.reset,
        Duration::from_millis(200),
        "the wait for one request"
    );

    let other = limiter.check(None, caller(&bob)).await.unwrap().unwrap();
    assert!(!other.limited, "another subject has its own bucket");
    assert_eq!(other.remaining, 4);

    tokio::time::advance(Duration::from_millis(199)).await;
    let early = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
    assert!(early.limited, "1 ms early is still too early");
    assert_eq!(early.reset, Duration::from_millis(1));
    tokio::time::advance(Duration::from_millis(1)).await;
    let on_time = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
    assert!(!on_time.limited);
    assert_eq!(on_time.remaining, 0);

    // Idle for a full window: the whole burst is back.
    tokio::time::advance(Duration::from_secs(1)).await;
    let rested = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
    assert_eq!((rested.limited, rested.remaining), (false, 4));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_one_policy_spends_from_none() {
    let limiter = limiter(
        "default: [burst, minute]\npolicies:\n  burst: {key: subject, rate: 10, per: 1s}\n  \
         minute: {key: subject, rate: 1, per: 60s}\n",
    );
    let alice = subject("alice");
    let first = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
    assert!(!first.limited);
    assert_eq!(
        limiter.config().policies[first.policy].name,
        "minute",
        "headers report the policy closest to refusing"
    );
    for _ in 0..4 {
        let refused = limiter.check(None, caller(&alice)).await.unwrap().unwrap();
        assert!(refused.limited);
        assert_eq!(
            limiter.config().policies[refused.policy].name,
            "minute",
            "the refusal names the policy that refused"
        );
    }
    // The burst bucket passed those four before the minute one refused them: they were refunded.
    let burst = limiter
        .check(Some(&["burst"]), caller(&alice))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(burst.remaining, 8, "spent: the first request and this one");
}

#[tokio::test(start_paused = true)]
async fn routes_choose_policies_and_anonymous_callers_skip_subject_limits() {
    let limiter = limiter(
        "default: [per-user]\npolicies:\n  per-user: {key: subject, rate: 1, per: 60s}\n  \
         per-ip: {key: client_ip, rate: 1, per: 60s}\n",
    );
    let alice = subject("alice");
    let anonymous = Caller {
        token: None,
        ip: Some("192.0.2.7".parse().unwrap()),
    };
    assert_eq!(limiter.check(None, anonymous).await, Ok(None), "no subject");
    assert!(
        !limiter
            .check(Some(&["per-ip"]), anonymous)
            .await
            .unwrap()
            .unwrap()
            .limited
    );
    assert!(
        limiter
            .check(Some(&["per-ip"]), anonymous)
            .await
            .unwrap()
            .unwrap()
            .limited
    );
    assert!(
        !limiter
            .check(None, caller(&alice))
            .await
            .unwrap()
            .unwrap()
            .limited
    );
    assert_eq!(
        limiter.check(Some(&["none"]), caller(&alice)).await,
        Ok(None)
    );
    assert!(matches!(
        limiter.check(Some(&["per-usr"]), caller(&alice)).await,
        Err(LimitError::BadRoute(problem)) if problem.contains("per-usr")
    ));
}

#[tokio::test(start_paused = true)]
async fn local_buckets_are_capped() {
    let (limiter, metrics) = limiter_with_metrics(
        "max_keys: 100\ndefault: [per-user]\npolicies:\n  per-user: {key: subject, rate: 1, per: 1s}\n",
    );
    for i in 0..1000 {
        let claims = subject(&format!("user-{i}"));
        limiter.check(None, caller(&claims)).await.unwrap();
    }
    let keys = limiter.local_keys().unwrap();
    assert!(keys <= 100, "{keys} buckets kept with max_keys 100");
    let evicted = metric_value(&metrics.render(), "ext_authz_rate_limit_evictions_total");
    assert!(evicted >= 900.0, "evictions are counted: {evicted}");
}

#[tokio::test]
async fn a_bucket_is_forgotten_once_it_is_full_again() {
    // 10 a second: each key's state lives 100 ms after its last request.
    let limiter =
        limiter("default: [per-user]\npolicies:\n  per-user: {key: subject, rate: 10, per: 1s}\n");
    for i in 0..50 {
        let claims = subject(&format!("user-{i}"));
        limiter.check(None, caller(&claims)).await.unwrap();
    }
    assert_eq!(limiter.local_keys(), Some(50));
    // moka's timer wheel is about 1 s coarse: allow several.
    assert!(
        eventually(Duration::from_secs(5), || async {
            limiter.local_keys() == Some(0)
        })
        .await,
        "idle keys expire: memory follows activity"
    );
}

// --- Through the Check RPC ---------------------------------------------------------------

struct Fixture {
    key: SigningKey,
    jwks: JwksServer,
    dir: PathBuf,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let key = key(Algorithm::ES256, "rl-1");
        let jwks = JwksServer::start(&[&key]).await;
        let dir = std::env::temp_dir().join(format!("authz-rl-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Fixture { key, jwks, dir }
    }

    /// A sidecar with this `rate_limits` section (YAML) and these extra flags.
    async fn sidecar(&self, rate_limits: &str, extra: &[&str]) -> Sidecar {
        let path = self.dir.join(format!("limits-{}.yaml", free_port()));
        std::fs::write(&path, format!("rate_limits:\n{rate_limits}")).unwrap();
        let path = path.to_str().unwrap().to_owned();
        let mut flags = vec!["--config", &path];
        flags.extend_from_slice(extra);
        start_sidecar(config(&["--jwks-url", &self.jwks.jwks_url()], &flags)).await
    }

    fn token(&self, sub: &str) -> String {
        let mut claims = valid_claims();
        claims["sub"] = json!(sub);
        self.key.sign(&claims).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().is_some_and(|s| s.code == 0)
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_and_ratelimit_fields() {
    let f = Fixture::new("local").await;
    // 3 a minute: one request earns back every 20 s, so the wait does not drift during the test.
    let sidecar = f
        .sidecar(
            "  response_headers: true\n  default: [per-user]\n  policies:\n    \
             per-user: {key: subject, rate: 3, per: 60s}\n",
            &[],
        )
        .await;
    let alice = f.token("alice");
    for remaining in ["2", "1", "0"] {
        let response = sidecar.check(&alice).await;
        let ok = expect_allow(&response);
        assert_eq!(
            header(&ok.response_headers_to_add, "ratelimit-policy"),
            Some("\"per-user\";q=3;w=60")
        );
        let fields = header(&ok.response_headers_to_add, "ratelimit").unwrap();
        assert!(
            fields.starts_with(&format!("\"per-user\";r={remaining};t=")),
            "{fields}"
        );
    }
    let response = sidecar.check(&alice).await;
    let (denied, grpc_code, reason) = expect_deny(&response);
    assert_eq!(reason, "rate_limited");
    assert_eq!(grpc_code, 8, "RESOURCE_EXHAUSTED");
    assert_eq!(denied.status.as_ref().unwrap().code, 429);
    let retry_after: u64 = header(&denied.headers, "retry-after")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (19..=20).contains(&retry_after),
        "one request earns back in 20 s, got {retry_after}"
    );
    assert_eq!(
        header(&denied.headers, "ratelimit"),
        Some(format!("\"per-user\";r=0;t={retry_after}").as_str())
    );
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        None,
        "the token was fine: no challenge"
    );

    assert!(
        sidecar.allows(&f.token("bob")).await,
        "bob has his own budget"
    );
    let metrics = sidecar.http_get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            "ext_authz_requests_total{result=\"deny\",reason=\"rate_limited\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&metrics, "ext_authz_rate_limit_keys"), 2.0);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn invalid_tokens_never_spend_a_real_subjects_budget() {
    let f = Fixture::new("forged").await;
    let sidecar = f
        .sidecar(
            "  default: [per-user]\n  policies:\n    per-user: {key: subject, rate: 2, per: 60s}\n",
            &[],
        )
        .await;
    let forger = key(Algorithm::ES256, "rl-1");
    let mut claims = valid_claims();
    claims["sub"] = json!("carol");
    let forged = forger.sign(&claims).unwrap();
    let mut expired_claims: Value = claims.clone();
    expired_claims["exp"] = json!(now() - 3600);
    let expired = f.key.sign(&expired_claims).unwrap();
    for _ in 0..5 {
        assert_eq!(sidecar.reason(&forged).await, "bad_signature");
        assert_eq!(sidecar.reason(&expired).await, "expired");
    }
    let carol = f.token("carol");
    assert!(sidecar.allows(&carol).await);
    assert!(sidecar.allows(&carol).await);
    assert_eq!(sidecar.reason(&carol).await, "rate_limited");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn routes_opt_in_or_out_and_a_typo_fails_closed() {
    let f = Fixture::new("routes").await;
    let sidecar = f
        .sidecar(
            "  policies:\n    orders: {key: subject, rate: 1, per: 60s}\n    \
             per-ip: {key: client_ip, rate: 1, per: 60s}\n",
            &[],
        )
        .await;
    let alice = f.token("alice");
    // No defaults: routes without `rate_limit` are not limited.
    for _ in 0..3 {
        assert!(is_allowed(&sidecar.check(&alice).await));
    }
    let orders = [("rate_limit", "orders")];
    assert!(is_allowed(&sidecar.check_route(&alice, &orders).await));
    let second = sidecar.check_route(&alice, &orders).await;
    assert_eq!(expect_deny(&second).2, "rate_limited");
    let typo = sidecar
        .check_route(&alice, &[("rate_limit", "order")])
        .await;
    let (denied, _, reason) = expect_deny(&typo);
    assert_eq!(
        (reason, denied.status.as_ref().unwrap().code),
        ("bad_route_config", 500)
    );

    // Anonymous route limited per client address, from Envoy's `source` peer.
    let anonymous = |ip: &str| {
        let mut request = check_request(&[]);
        let attributes = request.attributes.as_mut().unwrap();
        attributes.context_extensions = [
            ("allow_anonymous".to_owned(), "true".to_owned()),
            ("rate_limit".to_owned(), "per-ip".to_owned()),
        ]
        .into();
        attributes.source = Some(Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.to_owned(),
                    ..SocketAddress::default()
                })),
            }),
            ..Peer::default()
        });
        request
    };
    let mut client = sidecar.client();
    let mut answer = async |ip: &str| {
        let response = client.check(anonymous(ip)).await.unwrap().into_inner();
        response.status.map(|s| s.message).unwrap_or_default()
    };
    assert_eq!(answer("198.51.100.1").await, "");
    assert_eq!(answer("198.51.100.1").await, "rate_limited");
    assert_eq!(answer("198.51.100.2").await, "", "another address");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_limit_named_by_a_route_without_rate_limits_configured_is_a_bad_route() {
    let key = key(Algorithm::ES256, "rl-1");
    let jwks = JwksServer::start(&[&key]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let token = key.sign(&valid_claims()).unwrap();
    let response = sidecar
        .check_route(&token, &[("rate_limit", "orders")])
        .await;
    assert_eq!(expect_deny(&response).2, "bad_route_config");
    assert!(is_allowed(
        &sidecar.check_route(&token, &[("rate_limit", "none")]).await
    ));
    sidecar.shutdown().await;
}

// --- Redis: one budget for every replica -------------------------------------------------

const SHARED: &str = "  backend: redis\n  default: [per-user]\n  policies:\n    \
                      per-user: {key: subject, rate: 5, per: 60s}\n";

async fn redis_sidecar(f: &Fixture, redis: &RedisServer, section: &str) -> Sidecar {
    let url = redis.url();
    f.sidecar(
        section,
        &[
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            // Revocation fails open here, so what a Check gets with Redis down is the limiter's
            // own failure mode.
            "--revocation-failure-mode",
            "open",
            "--redis-breaker-failures",
            "0",
        ],
    )
    .await
}

#[tokio::test]
async fn two_replicas_share_one_budget_through_redis() {
    let f = Fixture::new("shared").await;
    let redis = RedisServer::start();
    let a = redis_sidecar(&f, &redis, SHARED).await;
    let b = redis_sidecar(&f, &redis, SHARED).await;
    let alice = f.token("alice");
    let mut allowed = 0;
    for i in 0..12 {
        let sidecar = if i % 2 == 0 { &a } else { &b };
        if is_allowed(&sidecar.check(&alice).await) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5, "the budget is shared, not 5 per replica");
    let key = format!("ratelimit:per-user:{ISSUER}:alice");
    let ttl: i64 = redis.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the key expires when the bucket is full again, pttl {ttl}"
    );
    assert!(
        redis.command_calls("evalsha") + redis.command_calls("eval") >= 12,
        "one script call per Check"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn redis_down_follows_the_failure_mode_and_recovers_without_restart() {
    let f = Fixture::new("down").await;
    let mut redis = RedisServer::start();
    let open = redis_sidecar(&f, &redis, SHARED).await;
    let closed_section = format!("  failure_mode: closed\n{SHARED}");
    let closed = redis_sidecar(&f, &redis, &closed_section).await;
    let alice = f.token("alice");
    for sidecar in [&open, &closed] {
        // Both pools connected before Redis goes: a pool still connecting waits REDIS_POOL_TIMEOUT.
        assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);
    }
    assert!(is_allowed(&open.check(&alice).await));

    redis.kill();
    let started = std::time::Instant::now();
    assert!(
        is_allowed(&open.check(&alice).await),
        "open: a limiter outage lets verified users through"
    );
    let response = closed.check(&alice).await;
    let (denied, _, reason) = expect_deny(&response);
    assert_eq!(
        (reason, denied.status.as_ref().unwrap().code),
        ("rate_limit_unavailable", 503)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a dead Redis answers fast, took {:?}",
        started.elapsed()
    );
    let metrics = open.http_get("/metrics").await.1;
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("ext_authz_rate_limit_errors_total{"))
            .any(|l| !l.ends_with(" 0")),
        "the failure is counted:\n{metrics}"
    );

    // A restarted Redis has an empty script cache: EVALSHA's NOSCRIPT falls back to EVAL.
    redis.restart();
    assert_eq!(redis.command_calls("eval"), 0);
    let bob = f.token("bob");
    assert!(
        eventually(Duration::from_secs(15), || async {
            is_allowed(&closed.check(&bob).await)
        })
        .await,
        "limits answer again once Redis is back"
    );
    let mut allowed = 1;
    for _ in 0..10 {
        if is_allowed(&closed.check(&bob).await) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5, "and enforce the limit again");
    assert!(
        redis.command_calls("eval") >= 1,
        "the script was loaded again"
    );
    open.shutdown().await;
    closed.shutdown().await;
}
