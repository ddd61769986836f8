//! End to end through a real Envoy 1.40 running `deploy/envoy/envoy.yaml` (ports swapped for
//! free ones): Envoy -> ext_authz gRPC -> sidecar (Redis revocations) -> echo upstream.
//! Envoy comes from the git-ignored venv that `make e2e` / `make test` create.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use authz_sidecar::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use authz_sidecar::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use common::envoy::*;
use common::redis::RedisServer;
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The gateway Envoy of the `sidecar` kustomize overlay, with its upstream app on loopback.
const OVERLAY: &str = "deploy/k8s/overlays/sidecar/envoy.yaml";
/// What makes the overlay's config run here: its app is a cluster-DNS name on 8080.
const OVERLAY_APP: (&str, &str) = (
    "address: orders.orders.svc.cluster.local, port_value: 8080 }",
    "address: 127.0.0.1, port_value: 8081 }",
);

/// Every config this suite runs: its path, and what to replace so that it runs here.
const GATEWAYS: [(&str, &[(&str, &str)]); 2] = [(EXAMPLE, &[]), (OVERLAY, &[OVERLAY_APP])];

struct Stack {
    redis: RedisServer,
    jwks: JwksServer,
    key: authz_sidecar::tools::devkeys::SigningKey,
    app_port: u16,
    sidecar_port: u16,
}

impl Stack {
    async fn start() -> Stack {
        let key = key(Algorithm::RS256, "gw-1");
        let jwks = JwksServer::start(&[&key]).await;
        Stack {
            redis: RedisServer::start(),
            jwks,
            key,
            app_port: start_echo().await,
            sidecar_port: free_port(),
        }
    }

    /// The sidecar on its fixed port (Envoy's cluster points there), with Redis revocation.
    async fn sidecar(&self, failure_mode: &str) -> Sidecar {
        self.sidecar_with(failure_mode, &[]).await
    }

    async fn sidecar_with(&self, failure_mode: &str, extra: &[&str]) -> Sidecar {
        let url = self.redis.url();
        let addr = format!("127.0.0.1:{}", self.sidecar_port);
        let mut flags = vec![
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--revocation-failure-mode",
            failure_mode,
            "--redis-pool-timeout",
            "500ms",
            "--grpc-listen-addr",
            &addr,
        ];
        flags.extend_from_slice(extra);
        let config = config(&["--jwks-url", &self.jwks.jwks_url()], &flags);
        start_sidecar_on(config, self.sidecar_port).await
    }

    fn token(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = valid_claims();
        change(&mut claims);
        self.key.sign(&claims).unwrap()
    }
}

#[tokio::test]
async fn the_gateway_matrix_through_a_real_envoy() {
    let stack = Stack::start().await;
    let sidecar = stack.sidecar("closed").await;
    let envoy = Envoy::start(stack.app_port, stack.sidecar_port).await;

    // Valid: 200, and the upstream sees the verified subject, not the one the client sent.
    let valid = stack.token(|_| {});
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &bearer(&valid)), ("x-jwt-sub", "mallory")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let upstream = reply.upstream_headers();
    assert_eq!(upstream.get("x-jwt-sub").map(String::as_str), Some("alice"));
    let logged = eventually(Duration::from_secs(5), || async {
        envoy.access_log.lock().unwrap().iter().any(|l| {
            l.contains("/orders") && l.contains("sub=alice") && l.contains(&format!("iss={ISSUER}"))
        })
    })
    .await;
    assert!(
        logged,
        "verified claims reach Envoy's access log as dynamic metadata: {:?}",
        envoy.access_log.lock().unwrap()
    );

    // Every flavour of bad token: 401 with a Bearer challenge.
    let stranger = key(Algorithm::ES256, "not-published");
    let (head, rest) = valid.split_once('.').unwrap();
    let payload = rest.split_once('.').unwrap().0;
    let none = format!(
        "{}.{payload}.",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            r#"{"alg":"none"}"#
        )
    );
    let revoked_jti = stack.token(|c| c["jti"] = json!("stolen"));
    stack
        .redis
        .cli(&["SET", "revoked:jti:stolen", "1", "EX", "600"]);
    let revoked_subject = stack.token(|c| {
        c["sub"] = json!("bob");
        c["iat"] = json!(now() - 60);
    });
    stack.redis.cli(&[
        "SET",
        &format!("revoked:sub:{ISSUER}:bob"),
        &now().to_string(),
        "EX",
        "600",
    ]);
    let unauthorized: Vec<(&str, Option<String>)> = vec![
        ("missing token", None),
        ("malformed", Some(format!("{head}.{payload}"))),
        (
            "expired",
            Some(stack.token(|c| {
                c["exp"] = json!(now() - 3600);
                c["iat"] = json!(now() - 7200);
            })),
        ),
        (
            "bad signature",
            Some(format!("{head}.{payload}.{}", "A".repeat(342))),
        ),
        ("alg none", Some(none)),
        ("unknown kid", Some(stranger.sign(&valid_claims()).unwrap())),
        ("revoked jti", Some(revoked_jti)),
        ("revoked subject", Some(revoked_subject)),
        ("16 KiB token", Some("x".repeat(16 * 1024))),
    ];
    for (case, token) in &unauthorized {
        let auth = token.as_deref().map(bearer);
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = get(&envoy, "/orders", &headers).await;
        assert_eq!(reply.status, 401, "{case}: {}", reply.body);
        let challenge = reply.www_authenticate.unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{case}: {challenge:?}");
    }

    // Forbidden: wrong audience, and a scoped route without the scope.
    let wrong_aud = stack.token(|c| c["aud"] = json!("someone-else"));
    assert_eq!(
        get(&envoy, "/orders", &[("authorization", &bearer(&wrong_aud))])
            .await
            .status,
        403
    );
    let no_scope = get(
        &envoy,
        "/admin/users",
        &[("authorization", &bearer(&valid))],
    )
    .await;
    assert_eq!(no_scope.status, 403);
    assert!(
        no_scope
            .www_authenticate
            .unwrap_or_default()
            .contains("insufficient_scope")
    );
    let admin = stack.token(|c| c["scope"] = json!("read admin"));
    assert_eq!(
        get(
            &envoy,
            "/admin/users",
            &[("authorization", &bearer(&admin))]
        )
        .await
        .status,
        200
    );

    // Per-route audience override.
    let partner = stack.token(|c| c["aud"] = json!("partner-api"));
    assert_eq!(
        get(
            &envoy,
            "/partner/feed",
            &[("authorization", &bearer(&partner))]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get(
            &envoy,
            "/partner/feed",
            &[("authorization", &bearer(&valid))]
        )
        .await
        .status,
        403
    );

    // Anonymous route: no token passes (and a spoofed claim header is stripped), a bad one fails.
    let anonymous = get(&envoy, "/public/info", &[("x-jwt-sub", "mallory")]).await;
    assert_eq!(anonymous.status, 200, "{}", anonymous.body);
    assert_eq!(
        anonymous.upstream_headers().get("x-jwt-sub"),
        None,
        "spoofed header removed"
    );
    let expired = stack.token(|c| c["exp"] = json!(now() - 3600));
    assert_eq!(
        get(
            &envoy,
            "/public/info",
            &[("authorization", &bearer(&expired))]
        )
        .await
        .status,
        401
    );

    // Envoy's own per-route switch: no Check at all.
    assert_eq!(get(&envoy, "/healthz", &[]).await.status, 200);

    // Redis down, fail-closed: a fast 503, not a hang and not a 403.
    let mut stack = stack;
    stack.redis.kill();
    let reply = get(&envoy, "/orders", &[("authorization", &bearer(&valid))]).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("revocation_unavailable"),
        "{}",
        reply.body
    );
    assert!(
        reply.elapsed < Duration::from_secs(1),
        "{:?}",
        reply.elapsed
    );

    // Sidecar down: the status the example promises (status_on_error 503), still fast.
    sidecar.shutdown().await;
    let reply = get(&envoy, "/orders", &[("authorization", &bearer(&valid))]).await;
    assert_eq!(reply.status, 503);
    assert!(
        reply.elapsed < Duration::from_secs(2),
        "{:?}",
        reply.elapsed
    );

    // Same port, fail-open sidecar: Redis still down, valid tokens pass.
    let _fail_open = stack.sidecar("open").await;
    let passed = eventually(Duration::from_secs(10), || async {
        get(&envoy, "/orders", &[("authorization", &bearer(&valid))])
            .await
            .status
            == 200
    })
    .await;
    assert!(
        passed,
        "fail-open lets valid tokens through while Redis is down"
    );
    assert_eq!(
        get(&envoy, "/orders", &[("authorization", &bearer(&expired))])
            .await
            .status,
        401
    );
}

/// A route that opts in to the `per-user` policy, as a user would add it to the example.
const LIMITED_ROUTE: &str = r#"                        - match: { prefix: "/limited" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  rate_limit: "per-user"
"#;

#[tokio::test]
async fn a_limited_route_answers_429_with_its_headers_through_envoy() {
    let stack = Stack::start().await;
    let limits = std::env::temp_dir().join(format!("authz-e2e-limits-{}.yaml", free_port()));
    std::fs::write(
        &limits,
        "rate_limits:\n  backend: redis\n  response_headers: true\n  policies:\n    \
         per-user: {key: subject, rate: 2, per: 60s}\n",
    )
    .unwrap();
    let sidecar = stack
        .sidecar_with("closed", &["--config", limits.to_str().unwrap()])
        .await;
    let envoy = Envoy::start_with_routes(stack.app_port, stack.sidecar_port, LIMITED_ROUTE).await;
    let token = stack.token(|_| {});
    let auth = bearer(&token);
    let field = |reply: &Reply, name: &str| {
        reply
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    for remaining in [1, 0] {
        let reply = get(&envoy, "/limited/items", &[("authorization", &auth)]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let fields = field(&reply, "ratelimit").expect("RateLimit on the allowed response");
        assert!(
            fields.starts_with(&format!("\"per-user\";r={remaining};t=")),
            "{fields}"
        );
    }
    let reply = get(&envoy, "/limited/items", &[("authorization", &auth)]).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    let retry_after: u64 = field(&reply, "retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(
        field(&reply, "ratelimit-policy").as_deref(),
        Some("\"per-user\";q=2;w=60")
    );
    assert!(reply.body.contains("rate_limited"), "{}", reply.body);
    assert_eq!(reply.www_authenticate, None);

    // Routes that name no policy are not limited (the section has no defaults).
    let reply = get(&envoy, "/orders", &[("authorization", &auth)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(field(&reply, "ratelimit"), None);
    drop(envoy);
    sidecar.shutdown().await;
    let _ = std::fs::remove_file(limits);
}

#[tokio::test]
async fn envoy_calls_the_sidecar_over_mtls_with_the_tls_example() {
    use common::tls::Ca;
    let stack = Stack::start().await;
    let dir = std::env::temp_dir().join(format!("authz-e2e-mtls-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let sidecar_ca = Ca::new("sidecar CA");
    let envoy_ca = Ca::new("envoy CA");
    let (cert, key) = sidecar_ca
        .server_for("authz-sidecar.authz.svc")
        .write(&dir, "sidecar");
    envoy_ca.client("envoy").write(&dir, "client");
    std::fs::write(dir.join("sidecar-ca.pem"), &sidecar_ca.pem).unwrap();
    let client_ca = dir.join("envoy-ca.pem");
    std::fs::write(&client_ca, &envoy_ca.pem).unwrap();

    let url = stack.redis.url();
    let addr = format!("127.0.0.1:{}", stack.sidecar_port);
    let config = config(
        &["--jwks-url", &stack.jwks.jwks_url()],
        &[
            "--revocation-backend",
            "redis",
            "--redis-url",
            &url,
            "--grpc-listen-addr",
            &addr,
            "--grpc-tls-cert",
            cert.to_str().unwrap(),
            "--grpc-tls-key",
            key.to_str().unwrap(),
            "--grpc-tls-client-ca",
            client_ca.to_str().unwrap(),
        ],
    );
    let sidecar = start_sidecar_tls_on(config, stack.sidecar_port).await;
    let tls_dir = format!("{}/", dir.display());
    let envoy = Envoy::start_example(
        "deploy/envoy/envoy-mtls.yaml",
        stack.app_port,
        stack.sidecar_port,
        "",
        &[("/etc/envoy/tls/", &tls_dir)],
    )
    .await;

    let valid = stack.token(|_| {});
    let reply = get(&envoy, "/orders", &[("authorization", &bearer(&valid))]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply
            .upstream_headers()
            .get("x-jwt-sub")
            .map(String::as_str),
        Some("alice")
    );
    let expired = stack.token(|c| c["exp"] = json!(now() - 3600));
    let reply = get(&envoy, "/orders", &[("authorization", &bearer(&expired))]).await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let metrics = sidecar.http_get("/metrics").await.1;
    assert!(
        metrics.contains("ext_authz_tls_handshake_failures_total 0"),
        "Envoy's certificate was accepted on the first try"
    );
    drop(envoy);
    sidecar.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// What a request sent byte for byte came back with. reqwest would resolve `..` and reject a
/// backslash before sending, which is exactly what a client looking for a bypass does not do.
struct RawReply {
    status: u16,
    /// The target the echo upstream was sent, if the request reached it.
    upstream_path: Option<String>,
    head: String,
}

async fn get_raw(envoy: &Envoy, target: &str) -> RawReply {
    get_raw_with(envoy, target, &[]).await
}

/// [`get_raw`] with these request headers.
async fn get_raw_with(envoy: &Envoy, target: &str, headers: &[(&str, &str)]) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", envoy.port))
        .await
        .expect("connect to Envoy");
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: api.test\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    // The head is all this needs; reading on to the end would wait out Envoy's delayed close
    // (1 s) after each 400.
    let read_head = async {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), read_head)
        .await
        .expect("Envoy answers within 10 s");
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{target}: no HTTP status line in {text:?}"));
    let upstream_path = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case(UPSTREAM_PATH)
            .then(|| value.trim().to_owned())
    });
    RawReply {
        status,
        upstream_path,
        head,
    }
}

/// Where an anonymous request must end up.
#[derive(Debug)]
enum Outcome {
    /// At the sidecar, on a route that needs a token: 401, never at the upstream.
    Denied,
    /// Refused by Envoy itself (an escaped slash): 400, never at the upstream.
    Rejected,
    /// At the upstream as public, which is then sent exactly this canonical path.
    Public(&'static str),
}

/// Anonymous requests that try to reach a private route through `/public`'s `allow_anonymous`.
/// Envoy must route on the path the upstream will be sent: dot segments resolved (also when
/// percent-encoded), slashes merged, escaped slashes refused, and `/public` matched as a whole
/// segment, case-sensitively.
const PATH_TRICKS: &[(&str, Outcome)] = &[
    ("/public/x", Outcome::Public("/public/x")),
    ("/public", Outcome::Public("/public")),
    ("/public/./x", Outcome::Public("/public/x")),
    ("/%70ublic/x", Outcome::Public("/public/x")),
    // Dot segments, plain and percent-encoded.
    ("/public/../admin/x", Outcome::Denied),
    ("/public/x/../../admin/x", Outcome::Denied),
    ("/public/%2e%2e/admin/x", Outcome::Denied),
    ("/public/%2E%2E/admin/x", Outcome::Denied),
    ("/public/.%2e/admin/x", Outcome::Denied),
    ("/public/..;/admin/x", Outcome::Denied),
    ("/public\\..\\admin/x", Outcome::Denied),
    // Escaped slashes and backslashes: an upstream that decodes them would see /admin.
    ("/public%2F..%2Fadmin/x", Outcome::Rejected),
    ("/public%2f..%2fadmin/x", Outcome::Rejected),
    ("/public/..%2Fadmin/x", Outcome::Rejected),
    ("/public/%2e%2e%2fadmin/x", Outcome::Rejected),
    ("/public%5C..%5Cadmin/x", Outcome::Rejected),
    // Doubled slashes: merged before routing, so the upstream gets what was routed.
    ("//public/x", Outcome::Public("/public/x")),
    ("/public//x", Outcome::Public("/public/x")),
    // The dot segment removes the empty one before the merge: still under /public upstream.
    ("/public//../admin/x", Outcome::Public("/public/admin/x")),
    ("//admin/x", Outcome::Denied),
    // Not the /public segment.
    ("/publicX", Outcome::Denied),
    ("/public-admin/x", Outcome::Denied),
    ("/PUBLIC/x", Outcome::Denied),
    ("/Public/x", Outcome::Denied),
];

#[tokio::test]
async fn path_tricks_never_reach_the_upstream_as_public() {
    let stack = Stack::start().await;
    let _sidecar = stack.sidecar("closed").await;
    for (file, replace) in GATEWAYS {
        let envoy =
            Envoy::start_example(file, stack.app_port, stack.sidecar_port, "", replace).await;
        let mut wrong = Vec::new();
        for (target, expected) in PATH_TRICKS {
            let reply = get_raw(&envoy, target).await;
            let right = match expected {
                Outcome::Denied => {
                    reply.status == 401
                        && reply.upstream_path.is_none()
                        && (reply.head.to_ascii_lowercase()).contains("www-authenticate: bearer")
                }
                Outcome::Rejected => reply.status == 400 && reply.upstream_path.is_none(),
                Outcome::Public(path) => {
                    reply.status == 200 && reply.upstream_path.as_deref() == Some(*path)
                }
            };
            if !right {
                wrong.push(format!(
                    "{target}: expected {expected:?}, got {} (upstream sent {:?})",
                    reply.status, reply.upstream_path
                ));
            }
        }
        assert!(wrong.is_empty(), "{file}:\n{}", wrong.join("\n"));
    }
}

/// A Check server that allows everything and keeps the header names of every request.
#[derive(Clone, Default)]
struct HeaderRecorder {
    seen: Arc<Mutex<Vec<Vec<String>>>>,
}

#[tonic::async_trait]
impl Authorization for HeaderRecorder {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let mut names: Vec<String> = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|http| http.headers.into_keys().collect())
            .unwrap_or_default();
        names.sort();
        self.seen.lock().unwrap().push(names);
        // An empty answer is an allow.
        Ok(tonic::Response::new(CheckResponse::default()))
    }
}

async fn start_header_recorder(port: u16) -> HeaderRecorder {
    let recorder = HeaderRecorder::default();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let service = AuthorizationServer::new(recorder.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    recorder
}

/// Request headers the sidecar reads: the token header (TOKEN_HEADER), the token cookie
/// (TOKEN_COOKIE), the DPoP proof (`dpop`) and the client address for `client_ip` rate limits
/// (`x-forwarded-for`).
const HEADERS_THE_SIDECAR_READS: [&str; 4] = ["authorization", "cookie", "dpop", "x-forwarded-for"];

#[tokio::test]
async fn envoy_sends_the_sidecar_only_the_headers_it_reads() {
    let app_port = start_echo().await;
    for (file, replace) in GATEWAYS {
        let check_port = free_port();
        let recorder = start_header_recorder(check_port).await;
        let envoy = Envoy::start_example(file, app_port, check_port, "", replace).await;
        let reply = get(
            &envoy,
            "/orders",
            &[
                ("authorization", "Bearer t"),
                ("cookie", "access_token=t; theme=dark"),
                ("dpop", "a.proof.jwt"),
                ("x-forwarded-for", "198.51.100.7"),
                ("x-api-key", "not for the sidecar"),
                ("user-agent", "e2e"),
                ("accept-language", "en"),
            ],
        )
        .await;
        assert_eq!(reply.status, 200, "{file}: {}", reply.body);
        let seen = recorder.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![HEADERS_THE_SIDECAR_READS.map(String::from).to_vec()],
            "{file}: the Check carries the headers the sidecar reads, and no others"
        );
    }
}

/// A route limited by the client address, counted per `x-forwarded-for` entry.
const PER_CLIENT_ROUTE: &str = r#"                        - match: { prefix: "/limited" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  rate_limit: "per-client"
"#;

#[tokio::test]
async fn token_cookies_and_forwarded_client_addresses_reach_the_sidecar_through_envoy() {
    let stack = Stack::start().await;
    let limits = std::env::temp_dir().join(format!("authz-e2e-per-client-{}.yaml", free_port()));
    std::fs::write(
        &limits,
        "rate_limits:\n  trusted_proxy_hops: 1\n  policies:\n    \
         per-client: {key: client_ip, rate: 1, per: 60s}\n",
    )
    .unwrap();
    let sidecar = stack
        .sidecar_with(
            "closed",
            &[
                "--config",
                limits.to_str().unwrap(),
                "--token-cookie",
                "access_token",
            ],
        )
        .await;
    let valid = stack.token(|_| {});
    let auth = bearer(&valid);
    for (round, (file, replace)) in GATEWAYS.into_iter().enumerate() {
        let routes = PER_CLIENT_ROUTE;
        let envoy =
            Envoy::start_example(file, stack.app_port, stack.sidecar_port, routes, replace).await;

        let cookie = format!("theme=dark; access_token={valid}");
        let reply = get(&envoy, "/orders", &[("cookie", &cookie)]).await;
        assert_eq!(reply.status, 200, "{file}: a cookie token: {}", reply.body);
        assert_eq!(
            reply
                .upstream_headers()
                .get("x-jwt-sub")
                .map(String::as_str),
            Some("alice")
        );

        // Each config gets its own addresses: the limiter outlives the Envoy.
        for (client, expected, why) in [
            (1, 200, "the first request"),
            (1, 429, "one a minute"),
            (2, 200, "another client address has its own budget"),
        ] {
            let xff = format!("198.51.100.{}", 10 * round + client);
            let reply = get(
                &envoy,
                "/limited/items",
                &[("authorization", &auth), ("x-forwarded-for", &xff)],
            )
            .await;
            assert_eq!(reply.status, expected, "{file}: {why}: {}", reply.body);
        }
    }
    sidecar.shutdown().await;
    let _ = std::fs::remove_file(limits);
}

/// Routes with CEL rules (issue 22), as a user would add them to the example: one named in
/// CONFIG_FILE, one inline reading a request header, one inline that does not compile.
const POLICY_ROUTES: &str = r#"                        - match: { prefix: "/tenants/" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  policy_ref: "tenant-in-path"
                        - match: { prefix: "/by-header" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  policy: 'request.headers["x-tenant"] == claims.tenant'
                        - match: { prefix: "/broken" }
                          route: { cluster: app }
                          typed_per_filter_config:
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  policy: "claims.tenant =="
"#;

/// The example's `allowed_headers` with `x-tenant` added, as the README asks of anyone whose
/// rules read a header.
const FORWARD_X_TENANT: (&str, &str) = (
    "                          - exact: x-forwarded-for\n",
    concat!(
        "                          - exact: x-forwarded-for\n",
        "                          - exact: x-tenant\n",
    ),
);

/// What the README promises for a rule that says no: 403, reason `policy_denied`.
const POLICY_DENIED_CHALLENGE: &str =
    "Bearer error=\"insufficient_scope\", error_description=\"policy_denied\"";

/// Tenant paths spelled every way a client might, sent byte for byte with a token for tenant
/// `acme` through the example's path normalisation: the status each must get, and the path the
/// upstream must be sent when it is reached at all.
///
/// The sidecar resolves `..` in `request.path_segments` itself, so the plain dot-segment tricks
/// would be denied even by an Envoy that did not normalise; what Envoy's normalisation adds is
/// that the route is chosen, and the upstream called, on that same resolved path. Without it
/// (tried: `normalize_path: false`, escaped slashes kept), `/orders/../tenants/globex/orders`
/// takes the catch-all route where no rule runs and reaches the upstream, and so does
/// `/tenants/acme/..%2fglobex/orders`, which a decoding upstream serves as globex's.
const TENANT_PATHS: &[(&str, u16, Option<&str>)] = &[
    ("/tenants/acme/orders", 200, Some("/tenants/acme/orders")),
    ("/tenants/globex/orders", 403, None),
    // Dot segments are resolved before the route is chosen and before the Check, so the rule
    // reads the path the upstream will be sent: climbing out of acme lands in globex, denied.
    ("/tenants/acme/../globex/orders", 403, None),
    ("/tenants/acme/%2e%2e/globex/orders", 403, None),
    ("/tenants/acme/orders/../../globex", 403, None),
    ("/tenants/./globex/orders", 403, None),
    // Climbing from another tenant into acme's is acme's request, and the upstream sees exactly
    // that: allowing it is right, not a bypass.
    (
        "/tenants/globex/../acme/orders",
        200,
        Some("/tenants/acme/orders"),
    ),
    ("/tenants//acme/orders", 200, Some("/tenants/acme/orders")),
    // Envoy decodes escaped unreserved characters: the rule and the upstream both see `acme`.
    ("/tenants/ac%6De/orders", 200, Some("/tenants/acme/orders")),
    // A dot segment that removes the tenant leaves none to compare: the rule fails, denied.
    ("/tenants/acme/..", 403, None),
    // From outside the rule's prefix into it: routed (and ruled) on the normalised path, not
    // on the catch-all that has no rule.
    ("/orders/../tenants/globex/orders", 403, None),
    // Escaped slashes: an upstream decoding them would see globex; Envoy refuses them before
    // any Check, so the rule never has to tell.
    ("/tenants/acme%2F..%2Fglobex/orders", 400, None),
    ("/tenants/acme/..%2fglobex/orders", 400, None),
];

#[tokio::test]
async fn per_route_policies_run_through_a_real_envoy() {
    let stack = Stack::start().await;
    let policies = std::env::temp_dir().join(format!("authz-e2e-policies-{}.yaml", free_port()));
    std::fs::write(
        &policies,
        "policies:\n  tenant-in-path: request.path_segments[1] == claims.tenant\n",
    )
    .unwrap();
    let sidecar = stack
        .sidecar_with(
            "closed",
            &[
                "--config",
                policies.to_str().unwrap(),
                "--policy-inline-claims",
                "tenant",
            ],
        )
        .await;
    let acme = bearer(&stack.token(|c| c["tenant"] = json!("acme")));
    let acme = [("authorization", acme.as_str())];
    let envoy = Envoy::start_example(
        EXAMPLE,
        stack.app_port,
        stack.sidecar_port,
        POLICY_ROUTES,
        &[FORWARD_X_TENANT],
    )
    .await;

    // The named rule, from CONFIG_FILE: the tenant in the path is the token's.
    let reply = get(&envoy, "/tenants/acme/orders", &acme).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply
            .upstream_headers()
            .get("x-jwt-sub")
            .map(String::as_str),
        Some("alice"),
        "the upstream answered, with the verified subject"
    );
    let reply = get(&envoy, "/tenants/globex/orders", &acme).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(
        reply.www_authenticate.as_deref(),
        Some(POLICY_DENIED_CHALLENGE)
    );
    assert_eq!(
        reply.body, "{\"error\":\"forbidden\",\"reason\":\"policy_denied\"}",
        "the sidecar's deny body, not the upstream's"
    );
    assert_eq!(reply.headers.get(UPSTREAM_PATH), None);
    // The rule runs on a verified token only: none is a 401, not a 403.
    let reply = get(&envoy, "/tenants/acme/orders", &[]).await;
    assert_eq!(reply.status, 401, "{}", reply.body);

    let mut wrong = Vec::new();
    for (target, status, upstream) in TENANT_PATHS {
        let reply = get_raw_with(&envoy, target, &acme).await;
        let challenge = reply.head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("www-authenticate")
                .then(|| value.trim().to_owned())
        });
        let right = reply.status == *status
            && reply.upstream_path.as_deref() == *upstream
            && (*status != 403 || challenge.as_deref() == Some(POLICY_DENIED_CHALLENGE));
        if !right {
            wrong.push(format!(
                "{target}: expected {status} (upstream sent {upstream:?}), got {} (upstream \
                 sent {:?}, challenge {challenge:?})",
                reply.status, reply.upstream_path
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every /tenants request with a token but the two escaped-slash ones reached the rule.
    let scrape = sidecar.http_get("/metrics").await.1;
    let evaluations = |outcome: &str| {
        let labels = format!("rule=\"tenant-in-path\",outcome=\"{outcome}\"");
        metric_value(
            &scrape,
            &format!("ext_authz_policy_evaluations_total{{{labels}}} "),
        )
    };
    assert_eq!(
        (
            evaluations("allow"),
            evaluations("deny"),
            evaluations("error")
        ),
        (5.0, 7.0, 1.0),
        "allowed: 1 above, 4 in the table; denied: 1 above, 6 in the table; failed: /tenants/"
    );

    // The inline rule reads a header Envoy forwards (x-tenant added to allowed_headers).
    let with_tenant = |tenant| [acme[0], ("x-tenant", tenant)];
    let reply = get(&envoy, "/by-header", &with_tenant("acme")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.upstream_headers().get("x-tenant").map(String::as_str),
        Some("acme")
    );
    for (headers, case) in [
        (&with_tenant("globex")[..], "another tenant's header"),
        (&acme[..], "no header: the rule fails, which denies"),
    ] {
        let reply = get(&envoy, "/by-header", headers).await;
        assert_eq!(reply.status, 403, "{case}: {}", reply.body);
        assert_eq!(
            reply.www_authenticate.as_deref(),
            Some(POLICY_DENIED_CHALLENGE),
            "{case}"
        );
        assert!(
            reply.body.contains("\"policy_denied\""),
            "{case}: {}",
            reply.body
        );
    }

    // An inline rule that does not compile: the route is misconfigured, a 500, never an allow.
    let reply = get(&envoy, "/broken/x", &acme).await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert!(
        reply.body.contains("\"bad_route_config\""),
        "{}",
        reply.body
    );
    assert_eq!(reply.headers.get(UPSTREAM_PATH), None);
    drop(envoy);

    // The example as shipped does not forward x-tenant: to the sidecar the header was never sent,
    // so even the right value is denied. A rule's header must be in allowed_headers.
    let stock = Envoy::start_with_routes(stack.app_port, stack.sidecar_port, POLICY_ROUTES).await;
    let reply = get(&stock, "/by-header", &with_tenant("acme")).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains("\"policy_denied\""), "{}", reply.body);
    drop(stock);
    sidecar.shutdown().await;
    let _ = std::fs::remove_file(policies);
}

/// A GET over TLS to Envoy's listener, with a client certificate (PEM cert + key) or none.
async fn get_tls(
    envoy: &Envoy,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    token: &str,
) -> Reply {
    let mut client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], envoy.port).into())
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        let pem = format!("{cert}{key}");
        client = client.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    let started = Instant::now();
    let response = client
        .build()
        .unwrap()
        .get(format!("https://localhost:{}/orders", envoy.port))
        .header("authorization", bearer(token))
        .send()
        .await
        .expect("Envoy answers over TLS");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let www_authenticate = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.text().await.unwrap();
    Reply {
        status,
        headers,
        www_authenticate,
        body,
        elapsed: started.elapsed(),
    }
}

/// RFC 8705 3.1: base64url of the SHA-256 of the certificate's DER.
fn certificate_thumbprint(pem: &str) -> String {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

#[tokio::test]
async fn a_certificate_bound_token_passes_envoy_only_with_its_client_certificate() {
    use common::tls::Ca;
    let stack = Stack::start().await;
    let dir = std::env::temp_dir().join(format!("authz-e2e-client-certs-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let gateway_ca = Ca::new("gateway CA");
    let clients_ca = Ca::new("clients CA");
    gateway_ca.server("gateway").write(&dir, "gateway");
    std::fs::write(dir.join("clients-ca.pem"), &clients_ca.pem).unwrap();
    let mine = clients_ca.client("mine");
    let theirs = clients_ca.client("theirs");
    let _sidecar = stack.sidecar("closed").await;
    let tls_dir = format!("{}/", dir.display());
    let envoy = Envoy::start_example(
        "deploy/envoy/envoy-client-certs.yaml",
        stack.app_port,
        stack.sidecar_port,
        "",
        &[("/etc/envoy/tls/", &tls_dir)],
    )
    .await;

    let bound =
        stack.token(|c| c["cnf"] = json!({"x5t#S256": certificate_thumbprint(&mine.cert_pem)}));
    let reply = get_tls(
        &envoy,
        &gateway_ca.pem,
        Some((&mine.cert_pem, &mine.key_pem)),
        &bound,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply
            .upstream_headers()
            .get("x-jwt-sub")
            .map(String::as_str),
        Some("alice")
    );
    let mismatch = "Bearer error=\"invalid_token\", error_description=\"certificate_mismatch\"";
    for identity in [Some((&*theirs.cert_pem, &*theirs.key_pem)), None] {
        let reply = get_tls(&envoy, &gateway_ca.pem, identity, &bound).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert_eq!(reply.www_authenticate.as_deref(), Some(mismatch));
    }
    // An unbound token passes with or without a certificate (no route asks for a binding).
    let unbound = stack.token(|_| {});
    let reply = get_tls(&envoy, &gateway_ca.pem, None, &unbound).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    drop(envoy);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_dpop_bound_token_passes_envoy_only_with_a_fresh_proof_for_the_request() {
    use common::dpop::ProofKey;
    let stack = Stack::start().await;
    let _sidecar = stack.sidecar("closed").await;
    let envoy = Envoy::start(stack.app_port, stack.sidecar_port).await;
    let client = ProofKey::new(Algorithm::ES256);
    let token = stack.token(|c| c["cnf"] = json!({"jkt": client.thumbprint()}));
    // What Envoy tells the sidecar the request was: its scheme, :authority and path.
    let htu = format!("http://127.0.0.1:{}/orders", envoy.port);
    let dpop = format!("DPoP {token}");

    let proof = client.proof_for(&token, "GET", &htu);
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &dpop), ("dpop", &proof)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply
            .upstream_headers()
            .get("x-jwt-sub")
            .map(String::as_str),
        Some("alice")
    );
    let refused = |reply: &Reply, reason: &str| {
        assert_eq!(reply.status, 401, "{}", reply.body);
        let challenge = reply.www_authenticate.as_deref().unwrap_or_default();
        assert!(
            challenge.starts_with(&format!(
                "DPoP error=\"invalid_dpop_proof\", error_description=\"{reason}\""
            )),
            "{challenge}"
        );
    };
    // The same proof again: a replay.
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &dpop), ("dpop", &proof)],
    )
    .await;
    refused(&reply, "dpop_replay");
    // A proof made for another method, or none at all, or the bound token as a bearer token.
    let post = client.proof_for(&token, "POST", &htu);
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &dpop), ("dpop", &post)],
    )
    .await;
    refused(&reply, "invalid_dpop_proof");
    let reply = get(&envoy, "/orders", &[("authorization", &dpop)]).await;
    refused(&reply, "invalid_dpop_proof");
    let fresh = client.proof_for(&token, "GET", &htu);
    let bearer = bearer(&token);
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &bearer), ("dpop", &fresh)],
    )
    .await;
    refused(&reply, "invalid_dpop_proof");
    // Still unused: the refused Bearer request did not spend the proof.
    let reply = get(
        &envoy,
        "/orders",
        &[("authorization", &dpop), ("dpop", &fresh)],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}
