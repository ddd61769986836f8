//! What SREs and Kubernetes see: the Prometheus scrape, readiness and gRPC health, and a
//! graceful drain on SIGTERM of the real binary while Checks keep coming.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Samples of one metric: (labels text, value).
fn samples<'a>(scrape: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| (labels, value.parse().unwrap()))
        })
        .collect()
}

fn value(scrape: &str, name: &str, labels: &str) -> f64 {
    samples(scrape, name)
        .into_iter()
        .find(|(l, _)| *l == labels)
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in scrape:\n{scrape}"))
        .1
}

#[tokio::test]
async fn the_scrape_counts_a_known_sequence_with_bounded_labels() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    let mut secrets = Vec::new();
    for i in 0..3 {
        let mut claims = valid_claims();
        claims["sub"] = json!(format!("subject-{i}-secret"));
        let token = rsa.sign(&claims).unwrap();
        expect_allow(&sidecar.check(&token).await);
        secrets.push(token);
        secrets.push(format!("subject-{i}-secret"));
    }
    for _ in 0..2 {
        let mut claims = valid_claims();
        claims["exp"] = json!(now() - 3600);
        expect_deny(&sidecar.check(&rsa.sign(&claims).unwrap()).await);
    }
    expect_deny(
        &sidecar
            .check_headers(&[("x-path", "/private/path-secret")])
            .await,
    );

    let (status, scrape) = sidecar.http_get("/metrics").await;
    assert_eq!(status, 200);
    let total = "ext_authz_requests_total";
    assert_eq!(
        value(&scrape, total, r#"result="allow",reason="verified""#),
        3.0
    );
    assert_eq!(
        value(&scrape, total, r#"result="deny",reason="expired""#),
        2.0
    );
    assert_eq!(
        value(&scrape, total, r#"result="deny",reason="missing_token""#),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            total,
            r#"result="error",reason="jwks_unavailable""#
        ),
        0.0
    );
    assert_eq!(
        value(&scrape, "ext_authz_request_duration_seconds_count", ""),
        6.0
    );
    assert_eq!(
        value(&scrape, "ext_authz_jwt_verify_duration_seconds_count", ""),
        5.0
    );
    assert_eq!(
        value(&scrape, "ext_authz_redis_lookup_duration_seconds_count", ""),
        3.0
    );
    assert_eq!(value(&scrape, "ext_authz_requests_in_flight", ""), 0.0);
    for histogram in [
        "ext_authz_request_duration_seconds_bucket",
        "ext_authz_jwt_verify_duration_seconds_bucket",
        "ext_authz_redis_lookup_duration_seconds_bucket",
    ] {
        let buckets = samples(&scrape, histogram);
        assert_eq!(
            buckets.len(),
            16,
            "15 bounds from 25 us to 1 s, plus +Inf: {histogram}"
        );
        assert!(buckets.iter().any(|(l, _)| *l == r#"le="0.000025""#));
        assert!(buckets.iter().any(|(l, _)| *l == r#"le="1""#));
    }
    let issuer = format!(r#"issuer="{ISSUER}""#);
    assert_eq!(value(&scrape, "ext_authz_jwks_keys", &issuer), 1.0);
    assert!(
        value(
            &scrape,
            "ext_authz_jwks_refreshes_total",
            &format!(r#"{issuer},outcome="updated""#)
        ) >= 1.0
    );
    assert!(value(&scrape, "ext_authz_jwks_seconds_since_refresh", &issuer) >= 0.0);
    assert_eq!(
        value(
            &scrape,
            "ext_authz_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );

    // No label carries request data: only known label names, and values from enums/config.
    let allowed_names: HashSet<&str> = [
        "result", "reason", "issuer", "outcome", "kind", "state", "version", "le", "rule", "would",
    ]
    .into();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        let labels = line.split_once('{').unwrap().1.rsplit_once('}').unwrap().0;
        for pair in labels.split(',') {
            let (name, value) = pair.split_once('=').unwrap();
            assert!(
                allowed_names.contains(name),
                "unexpected label {name} in {line}"
            );
            if name == "issuer" {
                assert_eq!(value.trim_matches('"'), ISSUER);
            }
            if name == "would" {
                // What a dry-run route would have decided.
                assert!(matches!(value, r#""allow""# | r#""deny""#), "{line}");
            }
            if name == "rule" {
                // A CEL rule's name from CONFIG_FILE (none here), or `inline`.
                assert_eq!(value.trim_matches('"'), "inline");
            }
        }
    }
    for secret in secrets.iter().map(String::as_str).chain(["path-secret"]) {
        assert!(
            !scrape.contains(secret),
            "request data in the scrape: {secret}"
        );
    }
    sidecar.shutdown().await;
}

async fn health_client(target: String) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(target)
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn grpc_health(sidecar: &Sidecar, service: &str) -> ServingStatus {
    let mut client = health_client(format!("http://{}", sidecar.addr)).await;
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let response = client.check(request).await.unwrap().into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

/// A Redis that is down must not take a replica out of the Service (every replica would go
/// NotReady at once, and new pods would never start): the sidecar stays ready and answers
/// Checks with the failure policy's fast 503, while `/readyz?verbose` still shows the store.
#[tokio::test]
async fn readiness_does_not_follow_the_revocation_store() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let nobody = format!("redis://127.0.0.1:{}", free_port());
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--revocation-backend",
            "redis",
            "--redis-url",
            &nobody,
            "--redis-pool-timeout",
            "100ms",
        ],
    ))
    .await;
    assert!(
        http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await,
        "ready with keys loaded, Redis down: {:?}",
        sidecar.http_get("/readyz?verbose").await
    );
    let (_, body) = sidecar.http_get("/readyz?verbose").await;
    assert!(
        body.contains("[!] revocation: redis: 0 connection(s) up"),
        "{body}"
    );
    let service = authz_sidecar::health::CHECK_SERVICE;
    assert_eq!(grpc_health(&sidecar, service).await, ServingStatus::Serving);
    let response = sidecar.check(&rsa.sign(&valid_claims()).unwrap()).await;
    let (denied, _, _) = expect_deny(&response);
    assert_eq!(denied.status.as_ref().unwrap().code, 503, "fail closed");
    sidecar.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_keys_and_drain() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    jwks.serve(StatusCode::INTERNAL_SERVER_ERROR, "down for now");
    let mut sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &["--shutdown-drain-delay", "2s"],
    ))
    .await;
    assert_eq!(
        sidecar.http_get("/healthz").await,
        (200, "ok\n".into()),
        "alive regardless"
    );
    let (status, body) = sidecar.http_get("/readyz?verbose").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("[-] keys: no usable keys for https://issuer.test"),
        "{body}"
    );
    assert!(body.contains("[+] revocation: memory"), "{body}");
    let service = authz_sidecar::health::CHECK_SERVICE;
    assert_eq!(
        grpc_health(&sidecar, service).await,
        ServingStatus::NotServing
    );

    jwks.serve_keys(&[&rsa]);
    let ready = eventually(Duration::from_secs(15), || async {
        sidecar.http_get("/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "ready once the keys arrive (background retry)");
    let serving = eventually(Duration::from_secs(5), || async {
        grpc_health(&sidecar, service).await == ServingStatus::Serving
    })
    .await;
    assert!(serving, "gRPC health follows readiness");
    assert_eq!(grpc_health(&sidecar, "").await, ServingStatus::Serving);

    sidecar.request_shutdown();
    let draining = eventually(Duration::from_secs(1), || async {
        sidecar.http_get("/readyz").await.0 == 503
    })
    .await;
    assert!(draining, "not ready as soon as shutdown is asked");
    assert_eq!(
        grpc_health(&sidecar, service).await,
        ServingStatus::NotServing
    );
    let (_, body) = sidecar.http_get("/readyz?verbose").await;
    assert!(body.contains("[-] draining: shutting down"), "{body}");
    // Still answering during the drain delay.
    expect_allow(&sidecar.check(&rsa.sign(&valid_claims()).unwrap()).await);
    sidecar.shutdown().await;
}

#[tokio::test]
async fn sigterm_under_load_loses_no_check_and_exits_zero() {
    let dir = std::env::temp_dir().join(format!(
        "authz-sigterm-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    let rsa = key(Algorithm::RS256, "rsa-1");
    std::fs::create_dir_all(&dir).unwrap();
    let jwks_file = dir.join("jwks.json");
    std::fs::write(
        &jwks_file,
        serde_json::to_vec(&authz_sidecar::tools::devkeys::jwks(&[&rsa]).unwrap()).unwrap(),
    )
    .unwrap();
    let (grpc_port, metrics_port) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_authz-sidecar"))
        .env_clear()
        .env("GRPC_LISTEN_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("METRICS_LISTEN_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("JWT_ISSUER", ISSUER)
        .env("JWT_AUDIENCE", AUDIENCE)
        .env("JWKS_FILE", &jwks_file)
        .env("SHUTDOWN_DRAIN_DELAY", "1500ms")
        .env("SHUTDOWN_TIMEOUT", "5s")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let ready = http_ok_within(metrics_addr, "/readyz", Duration::from_secs(20)).await;
    assert!(ready, "the binary becomes ready");

    let token = rsa.sign(&valid_claims()).unwrap();
    let target = format!("http://127.0.0.1:{grpc_port}");
    let mut check_client = authz_sidecar::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(target.clone()).await.unwrap();
    let mut health_client = health_client(target).await;
    let request = authz_sidecar::pb::envoy::service::auth::v3::CheckRequest {
        attributes: Some(authz_sidecar::pb::envoy::service::auth::v3::AttributeContext {
            request: Some(authz_sidecar::pb::envoy::service::auth::v3::attribute_context::Request {
                http: Some(authz_sidecar::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
                    headers: [("authorization".to_string(), format!("Bearer {token}"))].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };

    // Like Envoy: keep sending until health says NOT_SERVING, and a little after (propagation).
    let (mut sent, mut failed) = (0u32, 0u32);
    let mut sigterm_at = None;
    let mut not_serving_at: Option<Instant> = None;
    let started = Instant::now();
    loop {
        match check_client.check(request.clone()).await {
            Ok(r) if r.get_ref().status.as_ref().is_some_and(|s| s.code == 0) => {}
            _ => failed += 1,
        }
        sent += 1;
        if sigterm_at.is_none() && started.elapsed() > Duration::from_millis(300) {
            assert!(
                Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
            sigterm_at = Some(Instant::now());
        }
        if sigterm_at.is_some() && not_serving_at.is_none() && sent % 20 == 0 {
            let health = health_client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if health.is_ok_and(|h| h.get_ref().status == ServingStatus::NotServing as i32) {
                not_serving_at = Some(Instant::now());
            }
        }
        if not_serving_at.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "health never turned NOT_SERVING"
        );
    }
    assert_eq!(
        failed, 0,
        "{failed} of {sent} Checks failed during the drain"
    );
    assert!(sent > 50, "a steady stream was sent: {sent}");

    let sigterm_at = sigterm_at.unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sigterm_at.elapsed() < Duration::from_secs(10),
            "exits within drain delay + timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        sigterm_at.elapsed() >= Duration::from_millis(1400),
        "it waited out the drain delay"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn promtool_accepts_the_scrape() {
    let rsa = key(Algorithm::RS256, "rsa-1");
    let jwks = JwksServer::start(&[&rsa]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    expect_allow(&sidecar.check(&rsa.sign(&valid_claims()).unwrap()).await);
    let (_, scrape) = sidecar.http_get("/metrics").await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by `make deps` (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
    sidecar.shutdown().await;
}
