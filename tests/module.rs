//! The in-Envoy mode end to end: `deploy/envoy/envoy-module.yaml` in a real Envoy 1.40 loading
//! the module `make test` builds, next to the ext_authz sidecar behind `deploy/envoy/envoy.yaml`.
//! Every case is asked of both gateways and must be answered alike; then faults (Redis killed
//! and restarted, the JWKS server gone, an unknown-kid flood) with Envoy's watchdogs watching.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use authz_sidecar::config::{Config, Settings};
use common::envoy::*;
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const MODULE_EXAMPLE: &str = "deploy/envoy/envoy-module.yaml";

/// Where `make test` put the module: next to the sidecar binary of the same profile.
fn module_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_authz-sidecar"))
        .parent()
        .unwrap()
        .to_owned();
    let library = dir.join("libauthz_sidecar_module.so");
    assert!(
        library.exists(),
        "{} missing: `make test` builds it (cargo build -p authz-sidecar-module)",
        library.display()
    );
    dir
}

/// The module example with its filter config replaced by `settings` (the sidecar's env vars
/// and the module's keys) and each route's `rate_limit` as in [`LIMITED_ROUTE_EXT_AUTHZ`].
fn module_example(settings: &[(&str, String)]) -> String {
    let example = read_example(MODULE_EXAMPLE);
    let start = example
        .find("                        value:\n                          JWT_ISSUER")
        .expect("the example's filter config");
    let end = example
        .find("                  - name: envoy.filters.http.router")
        .unwrap();
    let mut block = String::from("                        value:\n");
    for (key, value) in settings {
        block.push_str(&format!(
            "                          {key}: {}\n",
            json!(value)
        ));
    }
    format!("{}{block}{}", &example[..start], &example[end..])
}

/// The route both examples get: the `per-user` rate-limit policy.
const LIMITED_ROUTE_EXT_AUTHZ: &str = r#"                        - match: { prefix: "/limited" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  rate_limit: "per-user"
"#;
/// A module route on `prefix` with the per-route `settings` (the keys of `context_extensions`).
fn module_route(prefix: &str, settings: &str) -> String {
    format!(
        r#"                        - match: {{ prefix: "{prefix}" }}
                          route: {{ cluster: app }}
                          typed_per_filter_config:
                            authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilterPerRoute
                              dynamic_module_config: {{ name: authz_sidecar_module, do_not_close: true }}
                              filter_name: authz
                              filter_config:
                                "@type": type.googleapis.com/google.protobuf.Struct
                                value: {{ {settings} }}
"#
    )
}

/// The module's routes: `/limited` as in [`LIMITED_ROUTE_EXT_AUTHZ`], and `/recent`, which
/// wants an authentication at most 4 seconds old.
fn module_routes() -> String {
    module_route("/limited", r#"rate_limit: "per-user""#)
        + &module_route("/recent", r#"max_age: "4""#)
}

struct Stack {
    redis: RedisServer,
    jwks: JwksServer,
    key: authz_sidecar::tools::devkeys::SigningKey,
    app_port: u16,
    /// Local limits: each mode spends its own budget, so both see the same sequence.
    limits: PathBuf,
}

impl Stack {
    async fn start() -> Stack {
        let key = key(Algorithm::RS256, "gw-1");
        let limits = std::env::temp_dir().join(format!("authz-module-limits-{}.yaml", free_port()));
        std::fs::write(
            &limits,
            "rate_limits:\n  backend: local\n  response_headers: true\n  policies:\n    \
             per-user: {key: subject, rate: 2, per: 60s}\n",
        )
        .unwrap();
        Stack {
            redis: RedisServer::start(),
            jwks: JwksServer::start(&[&key]).await,
            key,
            app_port: start_echo().await,
            limits,
        }
    }

    /// The same settings for both modes: the sidecar's flags and the module's env var keys.
    fn settings(&self, failure_mode: &str) -> Vec<(&'static str, String)> {
        vec![
            ("JWT_ISSUER", ISSUER.into()),
            ("JWT_AUDIENCE", AUDIENCE.into()),
            ("JWKS_URL", self.jwks.jwks_url()),
            ("JWKS_MIN_REFRESH_INTERVAL", "1ms".into()),
            ("FILE_POLL_INTERVAL", "50ms".into()),
            ("REVOCATION_BACKEND", "redis".into()),
            ("REDIS_URL", self.redis.url()),
            ("REVOCATION_FAILURE_MODE", failure_mode.into()),
            ("REDIS_POOL_TIMEOUT", "500ms".into()),
            ("CONFIG_FILE", self.limits.display().to_string()),
            ("SHUTDOWN_DRAIN_DELAY", "0s".into()),
        ]
    }

    /// The sidecar with the same settings, read the way the module reads them.
    async fn sidecar(&self, failure_mode: &str, port: u16) -> Sidecar {
        let mut settings = self.settings(failure_mode);
        settings.push(("GRPC_LISTEN_ADDR", format!("127.0.0.1:{port}")));
        settings.push(("METRICS_LISTEN_ADDR", "127.0.0.1:0".into()));
        let settings = Settings::from_env_pairs(settings.iter().map(|(k, v)| (*k, v.as_str())))
            .expect("the settings parse");
        let config = Config::from_settings(&settings).expect("the settings are valid");
        start_sidecar_on(config, port).await
    }

    async fn module_envoy(&self, failure_mode: &str) -> Envoy {
        self.module_envoy_with(failure_mode, free_port(), &[]).await
    }

    /// The module's gateway, its `/metrics` on `metrics_port`, with more settings.
    async fn module_envoy_with(
        &self,
        failure_mode: &str,
        metrics_port: u16,
        more: &[(&'static str, String)],
    ) -> Envoy {
        let mut settings = self.settings(failure_mode);
        // `more` wins: a key once in the filter config.
        settings.retain(|(key, _)| more.iter().all(|(replaced, _)| replaced != key));
        settings.extend_from_slice(more);
        settings.push(("METRICS_LISTEN_ADDR", format!("127.0.0.1:{metrics_port}")));
        settings.push(("CHECK_TIMEOUT", "250ms".into()));
        let config = module_example(&settings);
        let dir = module_dir();
        Envoy::start_config(
            MODULE_EXAMPLE,
            &config,
            self.app_port,
            0,
            &module_routes(),
            &[("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", dir.to_str().unwrap())],
        )
        .await
    }

    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = valid_claims();
        change(&mut claims);
        self.key.sign(&claims).unwrap()
    }
}

/// What a client (and the upstream) saw of one request: the parts the authorization decides.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    www_authenticate: Option<String>,
    /// A reply's body (the upstream's echo is compared by its claim headers instead).
    body: Option<String>,
    /// The claim headers and whether `authorization` went on, on an allowed request.
    upstream: Option<Vec<(String, String)>>,
    ratelimit: Option<String>,
    ratelimit_policy: Option<String>,
    retry_after: Option<String>,
}

async fn seen(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Seen {
    let reply = get(envoy, path, headers).await;
    let field = |name: &str| {
        reply
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let upstream = (reply.status == 200).then(|| {
        let mut seen: Vec<(String, String)> = reply
            .upstream_headers()
            .into_iter()
            .filter(|(k, _)| k.starts_with("x-jwt-") || k == "authorization")
            .collect();
        seen.sort();
        seen
    });
    Seen {
        status: reply.status,
        www_authenticate: reply.www_authenticate.clone(),
        body: (reply.status != 200).then(|| reply.body.clone()),
        upstream,
        ratelimit: field("ratelimit"),
        ratelimit_policy: field("ratelimit-policy"),
        retry_after: field("retry-after"),
    }
}

/// Asks both gateways; they must agree. Returns the (common) answer.
async fn alike(modes: &[&Envoy; 2], case: &str, path: &str, headers: &[(&str, &str)]) -> Seen {
    let ext_authz = seen(modes[0], path, headers).await;
    let in_envoy = seen(modes[1], path, headers).await;
    assert_eq!(
        ext_authz, in_envoy,
        "{case}: ext_authz (left) and the module (right) differ"
    );
    ext_authz
}

#[tokio::test]
async fn both_modes_answer_every_case_alike() {
    let mut stack = Stack::start().await;
    let sidecar_port = free_port();
    let sidecar = stack.sidecar("closed", sidecar_port).await;
    let ext_authz = Envoy::start_config(
        EXAMPLE,
        &read_example(EXAMPLE),
        stack.app_port,
        sidecar_port,
        LIMITED_ROUTE_EXT_AUTHZ,
        &[],
    )
    .await;
    let in_envoy = stack.module_envoy("closed").await;
    let modes = [&ext_authz, &in_envoy];

    let valid = stack.token(|_| {});
    let (head, rest) = valid.split_once('.').unwrap();
    let payload = rest.split_once('.').unwrap().0;
    let stranger = key(Algorithm::ES256, "not-published");
    stack
        .redis
        .cli(&["SET", "revoked:jti:stolen", "1", "EX", "600"]);
    stack.redis.cli(&[
        "SET",
        &format!("revoked:sub:{ISSUER}:bob"),
        &now().to_string(),
        "EX",
        "600",
    ]);
    let tokens: Vec<(&str, &str, Option<String>, u16)> = vec![
        ("valid", "/orders", Some(valid.clone()), 200),
        ("valid again (cached)", "/orders", Some(valid.clone()), 200),
        // Given from the module's memo once the second Check left it there.
        ("valid a third time", "/orders", Some(valid.clone()), 200),
        ("missing token", "/orders", None, 401),
        (
            "malformed",
            "/orders",
            Some(format!("{head}.{payload}")),
            401,
        ),
        (
            "expired",
            "/orders",
            Some(stack.token(|c| {
                c["exp"] = json!(now() - 3600);
                c["iat"] = json!(now() - 7200);
            })),
            401,
        ),
        (
            "bad signature",
            "/orders",
            Some(format!("{head}.{payload}.{}", "A".repeat(342))),
            401,
        ),
        (
            "unknown kid",
            "/orders",
            Some(stranger.sign(&valid_claims()).unwrap()),
            401,
        ),
        (
            "revoked jti",
            "/orders",
            Some(stack.token(|c| c["jti"] = json!("stolen"))),
            401,
        ),
        (
            "revoked subject",
            "/orders",
            Some(stack.token(|c| {
                c["sub"] = json!("bob");
                c["iat"] = json!(now() - 60);
            })),
            401,
        ),
        ("16 KiB token", "/orders", Some("x".repeat(16 * 1024)), 401),
        (
            "wrong audience",
            "/orders",
            Some(stack.token(|c| c["aud"] = json!("someone-else"))),
            403,
        ),
        ("no scope", "/admin/users", Some(valid.clone()), 403),
        (
            "scope",
            "/admin/users",
            Some(stack.token(|c| c["scope"] = json!("read admin"))),
            200,
        ),
        (
            "partner audience",
            "/partner/feed",
            Some(stack.token(|c| c["aud"] = json!("partner-api"))),
            200,
        ),
        (
            "default audience on partner",
            "/partner/feed",
            Some(valid.clone()),
            403,
        ),
        ("anonymous", "/public/info", None, 200),
        (
            "anonymous route, bad token",
            "/public/info",
            Some(stack.token(|c| c["exp"] = json!(now() - 3600))),
            401,
        ),
        ("no Check at all", "/healthz", None, 200),
        ("limited 1", "/limited/items", Some(valid.clone()), 200),
        ("limited 2", "/limited/items", Some(valid.clone()), 200),
        ("limited 3", "/limited/items", Some(valid.clone()), 429),
    ];
    for (case, path, token, status) in &tokens {
        let auth = token.as_deref().map(bearer);
        let mut headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        // A client's own claim header never reaches the upstream as a verified one.
        headers.push(("x-jwt-sub", "mallory"));
        let answer = alike(&modes, case, path, &headers).await;
        assert_eq!(answer.status, *status, "{case}: {answer:?}");
    }

    // The claims reach the module's access log as dynamic metadata, as with ext_authz: for
    // each of the three allows on /orders, the remembered one too. Envoy flushes its stdout
    // log every 10 s (the bootstrap's `file_flush_interval` default).
    let logged = eventually(Duration::from_secs(15), || async {
        let log = in_envoy.access_log.lock().unwrap();
        let with_claims = log.iter().filter(|l| {
            l.contains("/orders") && l.contains("sub=alice") && l.contains(&format!("iss={ISSUER}"))
        });
        with_claims.count() >= 3
    })
    .await;
    assert!(logged, "{:?}", in_envoy.access_log.lock().unwrap());

    // Redis down, fail-closed: both a fast 503 with the same body, not a pass and not a hang.
    // A token neither has seen, so both must ask Redis (a cached "not revoked" answer stands
    // until each notices its invalidation connection is gone; nobody can revoke meanwhile).
    stack.redis.kill();
    let auth = bearer(&stack.token(|c| c["jti"] = json!("unseen")));
    let started = Instant::now();
    let down = alike(&modes, "Redis down", "/orders", &[("authorization", &auth)]).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert!(
        down.body
            .as_deref()
            .unwrap_or_default()
            .contains("revocation_unavailable"),
        "{down:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(in_envoy);
    drop(ext_authz);
    sidecar.shutdown().await;
    let _ = std::fs::remove_file(&stack.limits);
}

/// Envoy's watchdog counters (`*watchdog_miss*`, `*watchdog_mega_miss*`) from its admin API.
async fn watchdog_misses(envoy: &Envoy) -> Vec<(String, u64)> {
    let stats = reqwest::get(format!(
        "http://127.0.0.1:{}/stats?filter=watchdog",
        envoy.admin_port
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    stats
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn the_module_keeps_envoy_serving_through_faults() {
    let mut stack = Stack::start().await;
    let envoy = stack.module_envoy("closed").await;
    let valid = stack.token(|_| {});
    let auth = bearer(&valid);
    assert_eq!(
        get(&envoy, "/orders", &[("authorization", &auth)])
            .await
            .status,
        200
    );

    // Redis killed: a Check that must ask it is a 503 at once (nothing passes unchecked);
    // restarted: allowed again without restarting Envoy.
    stack.redis.kill();
    let fresh = stack.token(|c| c["jti"] = json!("fresh"));
    let reply = get(&envoy, "/orders", &[("authorization", &bearer(&fresh))]).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.elapsed < Duration::from_secs(1),
        "{:?}",
        reply.elapsed
    );
    // A cached token's answer stands only until the module notices the lost connection.
    let cached_refused = eventually(Duration::from_secs(2), || async {
        get(&envoy, "/orders", &[("authorization", &auth)])
            .await
            .status
            == 503
    })
    .await;
    assert!(
        cached_refused,
        "the cached token is refused once Redis is gone"
    );
    stack.redis.restart();
    let back = eventually(Duration::from_secs(15), || async {
        get(&envoy, "/orders", &[("authorization", &auth)])
            .await
            .status
            == 200
    })
    .await;
    assert!(back, "allowed again after Redis came back");

    // Redis frozen (SIGSTOP): a Check that must wait for it is a 503 within its deadline
    // (CHECK_TIMEOUT 250 ms, or the sooner REDIS_LOOKUP_TIMEOUT), and Envoy answers other
    // routes meanwhile: the wait is on the module's threads, not Envoy's.
    stack.redis.pause();
    let waiting = bearer(&stack.token(|c| c["jti"] = json!("while-paused")));
    let headers = [("authorization", waiting.as_str())];
    let started = Instant::now();
    let (reply, health) = tokio::join!(
        get(&envoy, "/orders", &headers),
        get(&envoy, "/healthz", &[])
    );
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(health.status, 200);
    stack.redis.resume();
    let back = eventually(Duration::from_secs(15), || async {
        get(&envoy, "/orders", &headers).await.status == 200
    })
    .await;
    assert!(back, "allowed again after Redis resumed");

    // The JWKS server gone and a flood of unknown kids: each a 401 (the refetch is single
    // flight and rate-limited), while known tokens still pass on the cached keys and Envoy's
    // own routes answer.
    stack.jwks.stop().await;
    let stranger = key(Algorithm::ES256, "not-published");
    let flood: Vec<String> = (0..200)
        .map(|i| {
            let mut claims = valid_claims();
            claims["jti"] = json!(format!("flood-{i}"));
            stranger.sign(&claims).unwrap()
        })
        .collect();
    let started = Instant::now();
    // 20 at a time: 200 connections at once overflow the accept backlog on a busy machine,
    // and a dropped SYN waits seconds for its retry, which would time the client, not Envoy.
    use futures_util::StreamExt;
    let answers: Vec<u16> = futures_util::stream::iter(flood.iter().map(|token| {
        let auth = bearer(token);
        let envoy = &envoy;
        async move {
            get(envoy, "/orders", &[("authorization", &auth)])
                .await
                .status
        }
    }))
    .buffer_unordered(20)
    .collect()
    .await;
    assert_eq!(answers.len(), 200);
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        get(&envoy, "/orders", &[("authorization", &auth)])
            .await
            .status,
        200
    );
    assert_eq!(get(&envoy, "/healthz", &[]).await.status, 200);

    // No Envoy thread was held up by any of it.
    let misses = watchdog_misses(&envoy).await;
    assert!(
        misses
            .iter()
            .any(|(name, _)| name.contains("watchdog_miss")),
        "Envoy reports its watchdogs: {misses:?}"
    );
    assert!(misses.iter().all(|(_, n)| *n == 0), "{misses:?}");
    let _ = std::fs::remove_file(&stack.limits);
}

/// One series of the module's own `/metrics` (every series is registered up front).
async fn module_metric(metrics_port: u16, series: &str) -> f64 {
    let scrape = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("the module's metrics listener answers")
        .text()
        .await
        .unwrap();
    metric_value(&scrape, series)
}

const REUSES: &str = "ext_authz_allow_reuses_total";
const ALLOWED: &str = r#"ext_authz_requests_total{result="allow",reason="verified"}"#;

/// Asks with `auth` until an answer comes from the memo (at most 20 requests, all allowed).
async fn until_reused(envoy: &Envoy, metrics_port: u16, path: &str, auth: &str) {
    let before = module_metric(metrics_port, REUSES).await;
    for _ in 0..20 {
        let reply = get(envoy, path, &[("authorization", auth)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if module_metric(metrics_port, REUSES).await > before {
            return;
        }
    }
    panic!("20 allows of one token on {path} and none came from the memo");
}

/// Waits up to `within` for `auth` to be refused on `path`, then requires it refused every time
/// after: once refused, never allowed again from the memo.
async fn until_refused_for_good(envoy: &Envoy, path: &str, auth: &str, within: Duration) {
    let refused = eventually(within, || async {
        get(envoy, path, &[("authorization", auth)]).await.status == 401
    })
    .await;
    assert!(refused, "{path}: the token is refused within {within:?}");
    for _ in 0..5 {
        let reply = get(envoy, path, &[("authorization", auth)]).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
}

#[tokio::test]
async fn an_allow_is_given_again_only_while_a_check_would_give_it() {
    let stack = Stack::start().await;
    let metrics_port = free_port();
    // No leeway, so a token can expire within the test (the token cache, and so the memo,
    // keeps none past its `exp`).
    let no_leeway = [("JWT_LEEWAY_SECONDS", "0".to_owned())];
    let envoy = stack
        .module_envoy_with("closed", metrics_port, &no_leeway)
        .await;

    // Reuses answer as the Check did, and count as allowed Checks.
    let token = stack.token(|c| c["jti"] = json!("memo-revoked"));
    let auth = bearer(&token);
    let allowed_before = module_metric(metrics_port, ALLOWED).await;
    until_reused(&envoy, metrics_port, "/orders", &auth).await;
    let reply = get(&envoy, "/orders", &[("authorization", &auth)]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply
            .upstream_headers()
            .get("x-jwt-sub")
            .map(String::as_str),
        Some("alice"),
        "a reuse writes the claim headers"
    );
    let allowed = module_metric(metrics_port, ALLOWED).await - allowed_before;
    let reused = module_metric(metrics_port, REUSES).await;
    assert!(
        reused >= 2.0 && allowed >= reused + 1.0,
        "{allowed} allowed, {reused} reused"
    );

    // Revoked in Redis: refused as soon as the invalidation arrives, never from the memo after.
    stack
        .redis
        .cli(&["SET", "revoked:jti:memo-revoked", "1", "EX", "600"]);
    until_refused_for_good(&envoy, "/orders", &auth, Duration::from_secs(2)).await;

    // Expired: refused at once, whatever the memo held.
    let exp = now() + 4;
    let expiring = stack.token(|c| {
        c["jti"] = json!("memo-expiring");
        c["exp"] = json!(exp);
    });
    let expiring_auth = bearer(&expiring);
    until_reused(&envoy, metrics_port, "/orders", &expiring_auth).await;
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = get(&envoy, "/orders", &[("authorization", &expiring_auth)]).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(reply.body.contains("expired"), "{}", reply.body);

    // Authenticated too long ago for a route's `max_age`: refused for a step-up at once.
    let auth_time = now();
    let recent = stack.token(|c| {
        c["jti"] = json!("memo-recent");
        c["auth_time"] = json!(auth_time);
    });
    let recent_auth = bearer(&recent);
    until_reused(&envoy, metrics_port, "/recent", &recent_auth).await;
    while now() <= auth_time + 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = get(&envoy, "/recent", &[("authorization", &recent_auth)]).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(
        reply.body.contains("insufficient_user_authentication"),
        "{}",
        reply.body
    );

    // Its key withdrawn from the JWKS: refused once the module has fetched the new set (a
    // token under a new key makes it refetch), as a fresh Check would refuse it.
    let rotated = stack.token(|c| c["jti"] = json!("memo-rotated"));
    let rotated_auth = bearer(&rotated);
    until_reused(&envoy, metrics_port, "/orders", &rotated_auth).await;
    let successor = key(Algorithm::ES256, "gw-2");
    stack.jwks.serve_keys(&[&successor]);
    let mut claims = valid_claims();
    claims["jti"] = json!("under-the-new-key");
    let fresh = bearer(&successor.sign(&claims).unwrap());
    let refetched = eventually(Duration::from_secs(5), || async {
        get(&envoy, "/orders", &[("authorization", &fresh)])
            .await
            .status
            == 200
    })
    .await;
    assert!(refetched, "the token under the new key is allowed");
    let reply = get(&envoy, "/orders", &[("authorization", &rotated_auth)]).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let _ = std::fs::remove_file(&stack.limits);
}

/// With the memory backend (the default) allows are remembered too, under the revocation list's
/// change count: a revocation written to its file ends them at the next reload.
#[tokio::test]
async fn a_memory_backed_module_remembers_allows_until_its_list_changes() {
    let stack = Stack::start().await;
    let metrics_port = free_port();
    let list = std::env::temp_dir().join(format!("authz-module-revoked-{metrics_port}.txt"));
    std::fs::write(&list, "# nothing revoked yet\n").unwrap();
    let memory = [
        ("REVOCATION_BACKEND", "memory".to_owned()),
        ("REVOCATION_FILE", list.display().to_string()),
    ];
    let envoy = stack
        .module_envoy_with("closed", metrics_port, &memory)
        .await;
    let auth = bearer(&stack.token(|c| c["jti"] = json!("memory-memo")));
    until_reused(&envoy, metrics_port, "/orders", &auth).await;

    std::fs::write(&list, "jti memory-memo\n").unwrap();
    until_refused_for_good(&envoy, "/orders", &auth, Duration::from_secs(5)).await;
    let _ = std::fs::remove_file(&list);
    let _ = std::fs::remove_file(&stack.limits);
}
