//! Per-route CEL rules through the real gRPC server: the README's examples, bad and failing
//! expressions, named rules and the default from CONFIG_FILE, the verified-token cache, and the
//! scope claims read alike (issue 22).

mod common;

use std::process::Command;
use std::time::Duration;

use authz_sidecar::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse};
use authz_sidecar::tools::devkeys::random_id;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

const PERMISSION_DENIED: i32 = 7;
const INTERNAL: i32 = 13;

/// A route's request: method, path, extra headers, `context_extensions`.
struct Route<'a> {
    method: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    extensions: &'a [(&'a str, &'a str)],
}

impl Default for Route<'_> {
    fn default() -> Self {
        Route {
            method: "GET",
            path: "/orders",
            headers: &[],
            extensions: &[],
        }
    }
}

async fn check(sidecar: &Sidecar, token: &str, route: Route<'_>) -> CheckResponse {
    let bearer = format!("Bearer {token}");
    let mut headers = vec![("authorization", bearer.as_str())];
    headers.extend_from_slice(route.headers);
    let mut request = check_request(&headers);
    let attributes = request.attributes.as_mut().unwrap();
    let http = attributes.request.as_mut().unwrap().http.as_mut().unwrap();
    http.method = route.method.into();
    http.path = route.path.into();
    attributes.context_extensions = route
        .extensions
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    sidecar.client().check(request).await.unwrap().into_inner()
}

fn allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().is_none_or(|s| s.code == 0)
}

/// A 403 `policy_denied` with its challenge, else the test fails.
fn expect_policy_denied(response: &CheckResponse) {
    let (denied, code, reason): (&DeniedHttpResponse, i32, &str) = expect_deny(response);
    assert_eq!((code, reason), (PERMISSION_DENIED, "policy_denied"));
    assert_eq!(denied.status.as_ref().unwrap().code, 403);
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        Some("Bearer error=\"insufficient_scope\", error_description=\"policy_denied\"")
    );
}

fn expect_bad_route(response: &CheckResponse) {
    let (denied, code, reason) = expect_deny(response);
    assert_eq!((code, reason), (INTERNAL, "bad_route_config"));
    assert_eq!(denied.status.as_ref().unwrap().code, 500);
}

/// One issuer's sidecar (tests/common): `start`, `token`, `scrape`.
type Setup = OneIssuer;

fn evaluations(scrape: &str, rule: &str, outcome: &str) -> f64 {
    metric_value(
        scrape,
        &format!("ext_authz_policy_evaluations_total{{rule=\"{rule}\",outcome=\"{outcome}\"}} "),
    )
}

fn write_config(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("authz-policy-{}", random_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_readme_examples_allow_and_deny_as_written() {
    let setup = Setup::start(&["--policy-inline-claims", "*"]).await;
    let tenant_in_path = [("policy", "request.path_segments[1] == claims.tenant")];
    let acme = setup.token(json!({"tenant": "acme"}));
    let route = |path| Route {
        path,
        extensions: &tenant_in_path,
        ..Route::default()
    };
    assert!(allowed(
        &check(&setup.sidecar, &acme, route("/tenants/acme/orders?x=1")).await
    ));
    expect_policy_denied(&check(&setup.sidecar, &acme, route("/tenants/globex/orders")).await);
    // Dot segments are resolved as a normalising upstream would: not acme's path.
    expect_policy_denied(
        &check(
            &setup.sidecar,
            &acme,
            route("/tenants/acme/../globex/orders"),
        )
        .await,
    );

    let role = [("policy", "\"admin\" in claims.roles")];
    let on_role = || Route {
        extensions: &role,
        ..Route::default()
    };
    let admin = setup.token(json!({"roles": ["user", "admin"]}));
    let user = setup.token(json!({"roles": ["user"]}));
    assert!(allowed(&check(&setup.sidecar, &admin, on_role()).await));
    expect_policy_denied(&check(&setup.sidecar, &user, on_role()).await);

    let regex = [("policy", r#"claims.email.matches("@example\\.com$")"#)];
    let on_regex = || Route {
        extensions: &regex,
        ..Route::default()
    };
    let inside = setup.token(json!({"email": "ann@example.com"}));
    let outside = setup.token(json!({"email": "ann@example.com.evil"}));
    assert!(allowed(&check(&setup.sidecar, &inside, on_regex()).await));
    expect_policy_denied(&check(&setup.sidecar, &outside, on_regex()).await);

    let delete = [(
        "policy",
        r#"request.method != "DELETE" || "orders:delete" in token.scopes"#,
    )];
    let method = |method| Route {
        method,
        extensions: &delete,
        ..Route::default()
    };
    let deleter = setup.token(json!({"scp": ["orders:read", "orders:delete"]}));
    let reader = setup.token(json!({"scope": "orders:read"}));
    assert!(allowed(
        &check(&setup.sidecar, &deleter, method("DELETE")).await
    ));
    assert!(allowed(
        &check(&setup.sidecar, &reader, method("GET")).await
    ));
    expect_policy_denied(&check(&setup.sidecar, &reader, method("DELETE")).await);

    let header_rule = [("policy", r#"request.headers["x-tenant"] == claims.tenant"#)];
    let with_header = |headers| Route {
        headers,
        extensions: &header_rule,
        ..Route::default()
    };
    assert!(allowed(
        &check(&setup.sidecar, &acme, with_header(&[("x-tenant", "acme")])).await
    ));
    expect_policy_denied(
        &check(
            &setup.sidecar,
            &acme,
            with_header(&[("x-tenant", "globex")]),
        )
        .await,
    );
    // No header at all: a run-time error (no such key), denied too.
    expect_policy_denied(&check(&setup.sidecar, &acme, with_header(&[])).await);

    let scrape = setup.scrape().await;
    assert_eq!(evaluations(&scrape, "inline", "allow"), 6.0);
    assert_eq!(evaluations(&scrape, "inline", "deny"), 6.0);
    assert_eq!(evaluations(&scrape, "inline", "error"), 1.0);
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_requests_total{result=\"deny\",reason=\"policy_denied\"} "
        ),
        7.0
    );
}

#[tokio::test]
async fn broken_expressions_never_allow() {
    let setup = Setup::start(&["--policy-inline-claims", "*"]).await;
    let token = setup.token(json!({"tenant": "acme", "level": 3}));
    let on = |policy| Route {
        extensions: std::slice::from_ref(Box::leak(Box::new(("policy", policy)))),
        ..Route::default()
    };
    // Syntax errors: the route is misconfigured (500), on first sight and from the cache.
    for _ in 0..2 {
        expect_bad_route(&check(&setup.sidecar, &token, on("claims.tenant ==")).await);
    }
    // Run-time errors: a wrong type, a missing claim, a result that is not a bool.
    for failing in [
        "claims.tenant > 5",
        "claims.missing == 'x'",
        "claims.tenant",
        "claims.level / 0 == 1",
    ] {
        expect_policy_denied(&check(&setup.sidecar, &token, on(failing)).await);
    }
    assert!(allowed(
        &check(&setup.sidecar, &token, on("claims.level >= 3")).await
    ));
    let scrape = setup.scrape().await;
    assert_eq!(evaluations(&scrape, "inline", "error"), 4.0);
    assert_eq!(evaluations(&scrape, "inline", "allow"), 1.0);

    // A route naming both, or a rule nobody configured.
    let both = [("policy", "true"), ("policy_ref", "x")];
    let route = Route {
        extensions: &both,
        ..Route::default()
    };
    expect_bad_route(&check(&setup.sidecar, &token, route).await);
    let unknown = [("policy_ref", "nobody-wrote-this")];
    let route = Route {
        extensions: &unknown,
        ..Route::default()
    };
    expect_bad_route(&check(&setup.sidecar, &token, route).await);
}

#[tokio::test]
async fn inline_rules_are_off_or_limited_to_the_listed_claims() {
    let off = Setup::start(&[]).await;
    let token = off.token(json!({"tenant": "acme", "email": "a@example.com"}));
    let tenant = [("policy", "claims.tenant == 'acme'")];
    let route = || Route {
        extensions: &tenant,
        ..Route::default()
    };
    expect_bad_route(&check(&off.sidecar, &token, route()).await);

    let limited = Setup::start(&["--policy-inline-claims", "tenant"]).await;
    let token = limited.token(json!({"tenant": "acme", "email": "a@example.com"}));
    assert!(allowed(&check(&limited.sidecar, &token, route()).await));
    // Cached now, with only the tenant claim kept: the rule still sees it.
    assert!(allowed(&check(&limited.sidecar, &token, route()).await));
    let email = [("policy", "claims.email.endsWith('@example.com')")];
    let route = Route {
        extensions: &email,
        ..Route::default()
    };
    expect_bad_route(&check(&limited.sidecar, &token, route).await);
}

#[tokio::test]
async fn named_rules_and_the_default_come_from_the_config_file() {
    let path = write_config(
        "policies.yaml",
        "policies:\n  tenant-in-path: request.path_segments[1] == claims.tenant\n  \
         staff-only: '\"staff\" in claims.roles'\ndefault_policy: staff-only\n",
    );
    let setup = Setup::start(&["--config", &path]).await;
    let acme_staff = setup.token(json!({"tenant": "acme", "roles": ["staff"]}));
    let acme_guest = setup.token(json!({"tenant": "acme", "roles": ["guest"]}));
    let by_name = [("policy_ref", "tenant-in-path")];
    let named = |path| Route {
        path,
        extensions: &by_name,
        ..Route::default()
    };
    assert!(allowed(
        &check(&setup.sidecar, &acme_guest, named("/t/acme/x")).await
    ));
    expect_policy_denied(&check(&setup.sidecar, &acme_guest, named("/t/globex/x")).await);

    // Routes naming no rule get the default; `policy_ref: none` switches it off.
    assert!(allowed(
        &check(&setup.sidecar, &acme_staff, Route::default()).await
    ));
    expect_policy_denied(&check(&setup.sidecar, &acme_guest, Route::default()).await);
    let none = [("policy_ref", "none")];
    let route = Route {
        extensions: &none,
        ..Route::default()
    };
    assert!(allowed(&check(&setup.sidecar, &acme_guest, route).await));

    let scrape = setup.scrape().await;
    assert_eq!(evaluations(&scrape, "tenant-in-path", "allow"), 1.0);
    assert_eq!(evaluations(&scrape, "tenant-in-path", "deny"), 1.0);
    assert_eq!(evaluations(&scrape, "staff-only", "allow"), 1.0);
    assert_eq!(evaluations(&scrape, "staff-only", "deny"), 1.0);
    // Inline rules are off (POLICY_INLINE_CLAIMS empty): named rules need no setting.
    assert_eq!(evaluations(&scrape, "inline", "allow"), 0.0);
}

#[tokio::test]
async fn a_cached_token_runs_the_rule_again_with_its_claims() {
    let path = write_config(
        "cached.toml",
        "default_policy = \"tenant\"\n[policies]\ntenant = \"request.path_segments[1] == \
         claims.tenant\"\n",
    );
    let setup = Setup::start(&["--config", &path]).await;
    let token = setup.token(json!({"tenant": "acme", "unread": "x"}));
    let at = |path| Route {
        path,
        ..Route::default()
    };
    assert!(allowed(&check(&setup.sidecar, &token, at("/t/acme")).await));
    assert!(allowed(
        &check(&setup.sidecar, &token, at("/t/acme/2")).await
    ));
    expect_policy_denied(&check(&setup.sidecar, &token, at("/t/globex")).await);
    let scrape = setup.scrape().await;
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_token_cache_requests_total{result=\"hit\"} "
        ),
        2.0,
        "the second and third Checks skipped the signature"
    );
    assert_eq!(evaluations(&scrape, "tenant", "allow"), 2.0);
    assert_eq!(evaluations(&scrape, "tenant", "deny"), 1.0);
    assert_eq!(evaluations(&scrape, "tenant", "error"), 0.0);
}

#[test]
fn a_config_file_rule_that_does_not_compile_exits_64() {
    let path = write_config(
        "broken.yaml",
        "policies:\n  broken: 'claims.tenant =='\n  fine: 'true'\ndefault_policy: absent\n",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("JWT_ISSUER", "https://issuer.test")
        .env("JWKS_FILE", "/nonexistent/jwks.json")
        .env("CONFIG_FILE", &path)
        .env("POLICY_INLINE_CLAIMS", "*")
        .env("JWT_LEEWAY_SECONDS", "ten")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for problem in [
        "policies: \"broken\" does not compile",
        "default_policy: \"absent\"",
        "JWT_LEEWAY_SECONDS",
    ] {
        assert!(stderr.contains(problem), "{problem} not in:\n{stderr}");
    }
}

#[tokio::test]
async fn scope_scp_and_scopes_are_read_alike() {
    let setup = Setup::start(&["--policy-inline-claims", "*"]).await;
    let required = [("required_scopes", "orders:read orders:write")];
    let by_rule = [("policy", "'orders:write' in token.scopes")];
    for claims in [
        json!({"scope": "orders:read orders:write"}),
        json!({"scp": ["orders:read", "orders:write"]}),
        json!({"scp": "orders:read orders:write"}),
        json!({"scopes": ["orders:read", "orders:write"]}),
        json!({"scopes": "orders:read orders:write"}),
        json!({"scope": "orders:read", "scopes": ["orders:write"]}),
    ] {
        let token = setup.token(claims.clone());
        for extensions in [&required[..], &by_rule[..]] {
            let route = Route {
                extensions,
                ..Route::default()
            };
            assert!(
                allowed(&check(&setup.sidecar, &token, route).await),
                "{claims} on {extensions:?}"
            );
        }
    }
    let short = setup.token(json!({"scopes": ["orders:read"]}));
    let route = Route {
        extensions: &required,
        ..Route::default()
    };
    let response = check(&setup.sidecar, &short, route).await;
    assert_eq!(expect_deny(&response).2, "insufficient_scope");
    let route = Route {
        extensions: &by_rule,
        ..Route::default()
    };
    expect_policy_denied(&check(&setup.sidecar, &short, route).await);
}

#[tokio::test]
async fn jwt_require_at_jwt_refuses_tokens_of_another_type() {
    let setup = Setup::start(&["--jwt-require-at-jwt", "true"]).await;
    let typed = |typ: Option<&str>| {
        let header = jsonwebtoken::Header {
            typ: typ.map(str::to_owned),
            kid: Some("one-issuer".into()),
            ..jsonwebtoken::Header::new(Algorithm::ES256)
        };
        let key = jsonwebtoken::EncodingKey::from_ec_pem(setup.key.pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &valid_claims(), &key).unwrap()
    };
    assert!(allowed(
        &check(&setup.sidecar, &typed(Some("at+jwt")), Route::default()).await
    ));
    for other in [Some("JWT"), None] {
        let response = check(&setup.sidecar, &typed(other), Route::default()).await;
        let (denied, code, reason) = expect_deny(&response);
        assert_eq!((code, reason), (16, "wrong_token_type"), "{other:?}");
        assert_eq!(denied.status.as_ref().unwrap().code, 401);
        assert_eq!(
            header(&denied.headers, "www-authenticate"),
            Some("Bearer error=\"invalid_token\", error_description=\"wrong_token_type\"")
        );
    }
    // The same sidecar's default token (typ JWT) is refused; off by default it passes.
    assert!(!allowed(
        &check(&setup.sidecar, &setup.token(json!({})), Route::default()).await
    ));
    let lenient = Setup::start(&[]).await;
    assert!(allowed(
        &check(
            &lenient.sidecar,
            &lenient.token(json!({})),
            Route::default()
        )
        .await
    ));
}

#[tokio::test]
async fn a_route_asks_for_step_up_with_acr_values_and_max_age() {
    let setup = Setup::start(&[]).await;
    let strong = setup.token(json!({"acr": "mfa", "auth_time": now() - 60}));
    let weak = setup.token(json!({"acr": "pwd", "auth_time": now() - 60}));
    let step_up = [("acr_values", "mfa hwk"), ("max_age", "300")];
    let route = || Route {
        extensions: &step_up,
        ..Route::default()
    };
    assert!(allowed(&check(&setup.sidecar, &strong, route()).await));
    // A cache hit now: acr and auth_time are kept (the route rules declare them).
    assert!(allowed(&check(&setup.sidecar, &strong, route()).await));
    let challenge = "Bearer error=\"insufficient_user_authentication\", \
                     error_description=\"insufficient_user_authentication\", \
                     acr_values=\"mfa hwk\", max_age=300";
    let response = check(&setup.sidecar, &weak, route()).await;
    let (denied, code, reason) = expect_deny(&response);
    assert_eq!((code, reason), (16, "insufficient_user_authentication"));
    assert_eq!(denied.status.as_ref().unwrap().code, 401);
    assert_eq!(header(&denied.headers, "www-authenticate"), Some(challenge));

    // The same cached token on a route wanting a more recent login.
    let recent = [("max_age", "30")];
    let route = Route {
        extensions: &recent,
        ..Route::default()
    };
    let response = check(&setup.sidecar, &strong, route).await;
    let (denied, _, reason) = expect_deny(&response);
    assert_eq!(reason, "insufficient_user_authentication");
    assert_eq!(
        header(&denied.headers, "www-authenticate"),
        Some(
            "Bearer error=\"insufficient_user_authentication\", \
             error_description=\"insufficient_user_authentication\", max_age=30"
        )
    );
    let scrape = setup.scrape().await;
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_token_cache_requests_total{result=\"hit\"} "
        ),
        2.0
    );
    let no_acr = setup.token(json!({"auth_time": now()}));
    let acr_only = [("acr_values", "mfa")];
    let route = Route {
        extensions: &acr_only,
        ..Route::default()
    };
    let response = check(&setup.sidecar, &no_acr, route).await;
    assert_eq!(expect_deny(&response).2, "insufficient_user_authentication");
}

fn dry_runs(scrape: &str, would: &str, reason: &str) -> f64 {
    metric_value(
        scrape,
        &format!("ext_authz_dry_run_total{{would=\"{would}\",reason=\"{reason}\"}} "),
    )
}

#[tokio::test]
async fn a_dry_run_route_counts_what_it_would_deny_and_allows_valid_tokens() {
    let config = write_config(
        "rules.yaml",
        "policies:\n  tenant: request.path_segments[1] == claims.tenant\n",
    );
    let setup = Setup::start(&["--config", &config]).await;
    let acme = setup.token(json!({"tenant": "acme", "scope": "orders:read", "acr": "pwd"}));
    let dry = |extensions: &'static [(&'static str, &'static str)], path: &'static str| Route {
        path,
        extensions,
        ..Route::default()
    };
    let rule: &[(&str, &str)] = &[("policy_ref", "tenant"), ("dry_run", "true")];
    let scope: &[(&str, &str)] = &[("required_scopes", "orders:write"), ("dry_run", "true")];
    let step_up: &[(&str, &str)] = &[("acr_values", "mfa"), ("dry_run", "TRUE")];
    let missing: &[(&str, &str)] = &[("policy_ref", "absent"), ("dry_run", "true")];
    for (route, path) in [
        (rule, "/t/globex/orders"),
        (scope, "/orders"),
        (step_up, "/orders"),
        (missing, "/orders"),
        (rule, "/t/acme/orders"),
    ] {
        let response = check(&setup.sidecar, &acme, dry(route, path)).await;
        assert!(allowed(&response), "{route:?} {path}: {response:?}");
    }
    // Enforced, the same checks deny.
    expect_policy_denied(
        &check(
            &setup.sidecar,
            &acme,
            dry(&[("policy_ref", "tenant")], "/t/globex/orders"),
        )
        .await,
    );
    let response = check(
        &setup.sidecar,
        &acme,
        dry(
            &[("required_scopes", "orders:write"), ("dry_run", "false")],
            "/",
        ),
    )
    .await;
    assert_eq!(expect_deny(&response).2, "insufficient_scope");
    // The token itself is still checked: a bad signature or an expired token is denied.
    let other = key(Algorithm::ES256, "one-issuer");
    let forged = other.sign(&valid_claims()).unwrap();
    let response = check(&setup.sidecar, &forged, dry(rule, "/t/acme/orders")).await;
    assert_eq!(expect_deny(&response).2, "bad_signature");
    let mut expired = valid_claims();
    expired["exp"] = json!(now() - 3600);
    let expired = setup.key.sign(&expired).unwrap();
    let response = check(&setup.sidecar, &expired, dry(rule, "/t/acme/orders")).await;
    assert_eq!(expect_deny(&response).2, "expired");

    let scrape = setup.scrape().await;
    assert_eq!(dry_runs(&scrape, "deny", "policy_denied"), 1.0);
    assert_eq!(dry_runs(&scrape, "deny", "insufficient_scope"), 1.0);
    assert_eq!(
        dry_runs(&scrape, "deny", "insufficient_user_authentication"),
        1.0
    );
    assert_eq!(dry_runs(&scrape, "deny", "bad_route_config"), 1.0);
    assert_eq!(dry_runs(&scrape, "allow", "none"), 1.0);
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_requests_total{result=\"allow\",reason=\"verified\"} "
        ),
        5.0
    );
}

#[tokio::test]
async fn policy_dry_run_covers_every_route_but_those_that_say_false() {
    let setup = Setup::start(&["--policy-dry-run", "true"]).await;
    let token = setup.token(json!({"scope": "orders:read"}));
    let route = |extensions| Route {
        extensions,
        ..Route::default()
    };
    let response = check(
        &setup.sidecar,
        &token,
        route(&[("required_scopes", "admin")]),
    )
    .await;
    assert!(allowed(&response), "{response:?}");
    let enforced = [("required_scopes", "admin"), ("dry_run", "false")];
    let response = check(&setup.sidecar, &token, route(&enforced)).await;
    assert_eq!(expect_deny(&response).2, "insufficient_scope");
    let scrape = setup.scrape().await;
    assert_eq!(dry_runs(&scrape, "deny", "insufficient_scope"), 1.0);
    // A misspelt value is a bad route, never a silent dry run.
    let response = check(&setup.sidecar, &token, route(&[("dry_run", "yes")])).await;
    expect_bad_route(&response);
}

/// The decision log's records, one JSON object per line.
fn audit_records(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[tokio::test]
async fn the_decision_log_keeps_every_denial_and_a_sample_of_allows() {
    let log = write_config("decisions.jsonl", "");
    let config = write_config(
        "rules.yaml",
        "policies:\n  tenant: request.path_segments[1] == claims.tenant\n",
    );
    let setup = Setup::start(&[
        "--config",
        &config,
        "--audit-log",
        &log,
        "--audit-allow-sample",
        "0.5",
    ])
    .await;
    let token = setup.token(json!({"tenant": "acme", "email": "ann@acme.test"}));
    let rule = [("policy_ref", "tenant"), ("route_id", "tenant-orders")];
    let request = |path, id| Route {
        path,
        headers: id,
        extensions: &rule,
        ..Route::default()
    };
    for _ in 0..4 {
        let response = check(&setup.sidecar, &token, request("/t/acme/x", &[])).await;
        assert!(allowed(&response));
    }
    let id = [("x-request-id", "req-42")];
    expect_policy_denied(&check(&setup.sidecar, &token, request("/t/globex/x", &id)).await);
    let response = check(&setup.sidecar, "not.a.jwt", Route::default()).await;
    assert_eq!(expect_deny(&response).2, "malformed");

    let flushed = eventually(Duration::from_secs(10), || async {
        audit_records(&log).len() >= 4
    })
    .await;
    assert!(flushed, "{:?}", audit_records(&log));
    let records = audit_records(&log);
    let by = |decision: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["decision"] == decision)
            .collect()
    };
    assert_eq!(by("allow").len(), 2, "half of 4 allows: {records:#?}");
    assert_eq!(by("deny").len(), 2, "{records:#?}");
    let denied = by("deny")
        .into_iter()
        .find(|r| r["reason"] == "policy_denied")
        .expect("the policy denial is recorded");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["rule"], "tenant");
    assert_eq!(denied["route"], "tenant-orders");
    assert_eq!(denied["request_id"], "req-42");
    assert_eq!(denied["iss"], ISSUER);
    assert_eq!(denied["sub"], valid_claims()["sub"]);
    assert_eq!(denied["audit"], true);
    assert_eq!(denied["token"].as_str().unwrap().len(), 16);
    assert!(denied["time"].as_str().unwrap().ends_with('Z'));
    let malformed = by("deny")
        .into_iter()
        .find(|r| r["reason"] == "malformed")
        .unwrap();
    assert_eq!(malformed["status"], 401);
    assert!(malformed.get("sub").is_none(), "unverified: {malformed}");
    // Never the token, never a claim beyond iss and sub.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(&token[..40]) && !text.contains("ann@acme.test"));
    let scrape = setup.scrape().await;
    assert_eq!(
        metric_value(
            &scrape,
            "ext_authz_audit_records_total{outcome=\"written\"} "
        ),
        4.0
    );
}

#[tokio::test]
async fn a_stuck_decision_log_drops_records_and_never_holds_a_check() {
    let dir = std::env::temp_dir().join(format!("authz-audit-{}", random_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("stuck");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // A reader that opens the pipe and never reads: once the pipe's buffer is full, every
    // write blocks, as with a stuck log shipper.
    let reader_path = fifo.clone();
    let (hold, held) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let reader = std::fs::File::open(reader_path).unwrap();
        hold.send(reader).unwrap();
    });
    let setup = Setup::start(&[
        "--audit-log",
        fifo.to_str().unwrap(),
        "--audit-queue-records",
        "16",
    ])
    .await;
    let _reader = held.recv_timeout(Duration::from_secs(10)).unwrap();
    // About 300 bytes a record: 3,000 denials are far beyond the pipe's and the writer's
    // buffers. A blocking log would stop answering here.
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..3000 {
            let response = check(&setup.sidecar, "not.a.jwt", Route::default()).await;
            assert_eq!(expect_deny(&response).2, "malformed");
        }
    })
    .await;
    assert!(answered.is_ok(), "Checks waited for the decision log");
    let scrape = setup.scrape().await;
    let dropped = metric_value(
        &scrape,
        "ext_authz_audit_records_total{outcome=\"dropped\"} ",
    );
    assert!(dropped > 1000.0, "dropped {dropped}");
}

#[test]
fn a_decision_log_that_cannot_be_opened_stops_the_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("JWT_ISSUER", "https://issuer.test")
        .env("JWKS_FILE", "/nonexistent/jwks.json")
        .env("GRPC_LISTEN_ADDR", "127.0.0.1:0")
        .env("METRICS_LISTEN_ADDR", "127.0.0.1:0")
        .env("AUDIT_LOG", "/nonexistent-dir/decisions.jsonl")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("decision log") && stderr.contains("/nonexistent-dir/decisions.jsonl"),
        "{stderr}"
    );
}
