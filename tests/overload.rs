//! Admission control: beyond MAX_IN_FLIGHT a Check is shed at once with a 503, never queued,
//! and the limit frees up as soon as the held Checks finish. Checks are held in flight for
//! real, by a paused (SIGSTOP) redis-server behind their revocation lookups. Deadlines are
//! honoured, and at twice the peak the sidecar keeps its goodput (real processes, pinned).

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;

#[tokio::test]
async fn checks_beyond_max_in_flight_are_shed_at_once_and_the_limit_frees_up() {
    let signing = key(Algorithm::ES256, "ov-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let redis = RedisServer::start();
    let url = redis.url();
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        &[
            "--max-in-flight",
            "2",
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            // Long budgets, so the held Checks stay in flight while Redis is stopped.
            "--redis-lookup-timeout",
            "3s",
            "--redis-read-timeout",
            "10s",
            "--redis-breaker-failures",
            "0",
        ],
    ))
    .await;
    assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);
    let token = signing.sign(&valid_claims()).unwrap();
    assert!(sidecar.allows(&token).await);

    redis.pause();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut client = sidecar.client();
            let request = check_request(&[("authorization", &format!("Bearer {token}"))]);
            tokio::spawn(async move { client.check(request).await.unwrap().into_inner() })
        })
        .collect();
    let both_in_flight = eventually(Duration::from_secs(5), || async {
        metric_value(
            &sidecar.http_get("/metrics").await.1,
            "ext_authz_requests_in_flight",
        ) == 2.0
    })
    .await;
    assert!(both_in_flight, "two Checks wait on the stopped Redis");

    let started = Instant::now();
    let shed = sidecar.check(&token).await;
    let elapsed = started.elapsed();
    let (denied, grpc_code, reason) = expect_deny(&shed);
    assert_eq!(reason, "overloaded");
    assert_eq!(grpc_code, 14, "UNAVAILABLE");
    assert_eq!(denied.status.as_ref().unwrap().code, 503);
    assert_eq!(header(&denied.headers, "retry-after"), Some("1"));
    assert!(
        elapsed < Duration::from_secs(1),
        "shed at once, not queued behind the 3 s lookups: {elapsed:?}"
    );

    redis.resume();
    for check in held {
        let response = check.await.unwrap();
        assert!(
            response.status.as_ref().is_some_and(|s| s.code == 0),
            "the held Checks finish normally: {response:?}"
        );
    }
    assert!(sidecar.allows(&token).await, "permits come back");
    let metrics = sidecar.http_get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            "ext_authz_requests_total{result=\"error\",reason=\"overloaded\"}"
        ),
        1.0
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_check_answers_before_the_callers_deadline_when_a_dependency_is_slow() {
    let known = key(Algorithm::ES256, "ov-1");
    let rotated = key(Algorithm::ES256, "ov-2");
    let jwks = JwksServer::start(&[&known]).await;
    let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], &[])).await;
    assert!(http_ok_within(sidecar.metrics_addr, "/readyz", Duration::from_secs(10)).await);

    // The identity provider turns slow; a token with a new kid makes the Check refetch.
    jwks.set_delay(Duration::from_secs(3));
    let token = rotated.sign(&valid_claims()).unwrap();
    let mut request = tonic::Request::new(check_request(&[(
        "authorization",
        &format!("Bearer {token}"),
    )]));
    request.set_timeout(Duration::from_millis(300)); // grpc-timeout, as Envoy sends it
    let started = Instant::now();
    let response = sidecar
        .client()
        .check(request)
        .await
        .expect("an answer, not the caller's own timeout")
        .into_inner();
    let elapsed = started.elapsed();
    let (denied, _, reason) = expect_deny(&response);
    assert_eq!(reason, "deadline_exceeded");
    assert_eq!(denied.status.as_ref().unwrap().code, 503);
    assert!(
        elapsed < Duration::from_millis(300),
        "inside the caller's 300 ms: {elapsed:?}"
    );

    // Keys already held still verify at once.
    jwks.set_delay(Duration::ZERO);
    assert!(sidecar.allows(&known.sign(&valid_claims()).unwrap()).await);
    let metrics = sidecar.http_get("/metrics").await.1;
    assert_eq!(
        metric_value(
            &metrics,
            "ext_authz_requests_total{result=\"error\",reason=\"deadline_exceeded\"}"
        ),
        1.0
    );
    sidecar.shutdown().await;
}

/// Twice the peak for 10 s against a real sidecar process, with the generator a separate
/// process on the other core (`taskset`), so the sidecar, not the generator, is what
/// saturates: one worker thread, the token cache off and ES384 tokens make every allow cost
/// a signature check. The generator behaves like Envoy: it sends `grpc-timeout` and keeps at
/// most 1,024 Checks outstanding (Envoy's default `max_requests` circuit breaker).
/// Figures in BENCHMARKS.md "Overload"; the bounds here are generous on purpose.
#[tokio::test]
async fn at_twice_the_peak_goodput_holds_latency_is_bounded_and_recovery_is_immediate() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(
        cpus >= 2,
        "this test pins the sidecar and the generator to separate cores"
    );
    let dir = std::env::temp_dir().join(format!(
        "authz-overload-{}",
        authz_sidecar::tools::devkeys::random_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let signing = key(Algorithm::ES384, "ov-384");
    let jwks_file = dir.join("jwks.json");
    let jwks = authz_sidecar::tools::devkeys::jwks(&[&signing]).unwrap();
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let tokens_file = dir.join("tokens.jsonl");
    let tokens: String = (0..200)
        .map(|i| {
            let mut claims = valid_claims();
            claims["sub"] = format!("user-{i}").into();
            format!(
                "{}\n",
                serde_json::json!({ "token": signing.sign(&claims).unwrap() })
            )
        })
        .collect();
    std::fs::write(&tokens_file, tokens).unwrap();

    let (grpc_port, metrics_port) = (free_port(), free_port());
    let mut sidecar = std::process::Command::new("taskset")
        .args(["-c", "0", env!("CARGO_BIN_EXE_authz-sidecar")])
        .env_clear()
        .env("GRPC_LISTEN_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("METRICS_LISTEN_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("JWT_ISSUER", ISSUER)
        .env("JWT_AUDIENCE", AUDIENCE)
        .env("JWKS_FILE", &jwks_file)
        .env("GRPC_NUM_STREAM_WORKERS", "1")
        .env("TOKEN_CACHE_MAX_ENTRIES", "0")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("taskset (util-linux) runs the sidecar");
    let metrics_addr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    assert!(http_ok_within(metrics_addr, "/readyz", Duration::from_secs(20)).await);

    // One run of `authz-sidecar loadgen` on core 1; its JSON report.
    let load = |mode: &str, seconds: u32| {
        let out = std::process::Command::new("taskset")
            .args([
                "-c",
                "1",
                env!("CARGO_BIN_EXE_authz-sidecar"),
                "loadgen",
                "--json",
            ])
            .args(["--addr", &format!("http://127.0.0.1:{grpc_port}")])
            .arg("--tokens")
            .arg(&tokens_file)
            .args(["--seconds", &seconds.to_string(), "--timeout-ms", "2000"])
            .args(mode.split(' '))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("{mode} for {seconds} s: {report}");
        report
    };

    load("--concurrency 32", 1); // warm up
    let peak = load("--concurrency 64", 3);
    let peak_rate = peak["allowed_per_second"].as_f64().unwrap();
    assert!(peak["errors"] == 0 && peak_rate > 0.0, "{peak}");
    let rate = |share: f64| format!("--rate {:.0}", share * peak_rate);
    let before = load(&rate(0.25), 2);
    let scrape = || async { http_get(metrics_addr, "/metrics").await.1 };
    let scrape_before = scrape().await;
    let over = load(&rate(2.0), 10);
    let scrape_after = scrape().await;
    let after = load(&rate(0.25), 2);
    let _ = sidecar.kill();
    let _ = sidecar.wait();

    let goodput = over["allowed_per_second"].as_f64().unwrap();
    assert!(
        goodput >= 0.9 * peak_rate,
        "goodput at 2x peak {goodput:.0}/s against a peak of {peak_rate:.0}/s: {over}"
    );
    assert_eq!(
        over["errors"], 0,
        "every Check answered inside its deadline: {over}"
    );
    // Inside the sidecar, from each stream's arrival: the queue it lets form is bounded by
    // MAX_IN_FLIGHT (256 for one worker), so its p99 stays a fraction of the deadline. The
    // rest of the wait is in the client's own queue, as it would be in Envoy's.
    let sidecar_p99 = histogram_quantile_between(
        &scrape_before,
        &scrape_after,
        "ext_authz_request_duration_seconds",
        0.99,
    );
    eprintln!("the sidecar's own p99 at 2x peak: <= {sidecar_p99} s");
    assert!(
        sidecar_p99 <= 0.5,
        "admitted Checks' p99 inside the sidecar: <= {sidecar_p99} s"
    );
    let p99 = |r: &serde_json::Value| r["allowed_latency_us"]["p99"].as_u64().unwrap();
    let baseline = p99(&before).max(20_000);
    assert!(
        p99(&after) <= 5 * baseline && after["denied"] == 0 && after["errors"] == 0,
        "back to baseline at once: before {before} / after {after}"
    );
}

/// Opens `count` Check streams on one raw HTTP/2 connection, sending HEADERS only: the request
/// message never follows (a slow-loris client). The send halves are returned to keep the
/// streams open; each response future resolves when the sidecar answers the stream.
async fn streams_without_a_request(
    addr: std::net::SocketAddr,
    count: usize,
) -> Vec<(h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>)> {
    use tonic::codegen::http;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..count {
        let request = http::Request::post(format!(
            "http://{addr}/envoy.service.auth.v3.Authorization/Check"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        streams.push(client.send_request(request, false).unwrap());
        client = client.ready().await.unwrap();
    }
    streams
}

#[tokio::test]
async fn streams_that_never_send_their_request_cannot_hold_the_permits() {
    use prost::Message;
    let signing = key(Algorithm::ES256, "slow-1");
    let jwks = JwksServer::start(&[&signing]).await;
    let sidecar = start_sidecar(config(
        &["--jwks-url", &jwks.jwks_url()],
        // The default GRPC_REQUEST_READ_TIMEOUT: 100 ms.
        &["--max-in-flight", "4"],
    ))
    .await;
    let token = signing.sign(&valid_claims()).unwrap();
    expect_allow(&sidecar.check(&token).await);

    let started = Instant::now();
    let streams = streams_without_a_request(sidecar.addr, 10).await;
    // Every permit is held by a stream that will never send: without a read deadline every
    // Check from here on would be shed as overloaded, for as long as the connection lives.
    let served = eventually(Duration::from_secs(5), || sidecar.allows(&token)).await;
    assert!(
        served,
        "real Checks are served again once the stalled streams time out"
    );

    for (response, _send) in streams {
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("a stalled stream is answered, not left open")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut framed = Vec::new();
        while let Some(chunk) = body.data().await {
            framed.extend_from_slice(&chunk.unwrap());
        }
        let trailers = body.trailers().await.unwrap().expect("grpc trailers");
        assert_eq!(trailers["grpc-status"], "0");
        let answer =
            authz_sidecar::pb::envoy::service::auth::v3::CheckResponse::decode(&framed[5..])
                .unwrap();
        let (denied, code, reason) = expect_deny(&answer);
        assert_eq!((code, reason), (14, "request_read_timeout"));
        assert_eq!(denied.status.as_ref().map(|s| s.code), Some(503));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered near the 100 ms deadline, not at some connection timeout: {:?}",
        started.elapsed()
    );
    let scrape = sidecar.http_get("/metrics").await.1;
    let late = metric_value(
        &scrape,
        "ext_authz_requests_total{result=\"error\",reason=\"request_read_timeout\"}",
    );
    assert_eq!(late, 10.0);
    sidecar.shutdown().await;
}
