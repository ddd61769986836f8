//! Helpers shared by the black-box suites: a real JWKS HTTP server, the sidecar started through
//! the same `server::run` as `main`, a real tonic client, and token minting.
#![allow(dead_code)]

pub mod dpop;
pub mod envoy;
pub mod redis;
pub mod tls;
pub mod topology;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use authz_sidecar::cli::Cli;
use authz_sidecar::config::Config;
use authz_sidecar::jwks::{IssuerKeys, JwksSettings, JwksSource};
use authz_sidecar::jwt::JwtPolicy;
use authz_sidecar::keys::ASYMMETRIC_ALGORITHMS;
use authz_sidecar::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use authz_sidecar::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use authz_sidecar::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    check_response,
};
use authz_sidecar::tools::devkeys::{SigningKey, jwks, random_id};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "api";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims that pass every rule of [`sidecar_args`]; tests change one thing at a time.
pub fn valid_claims() -> Value {
    json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 300,
        "jti": random_id(),
    })
}

pub fn key(alg: Algorithm, kid: &str) -> SigningKey {
    SigningKey::generate(alg, kid).expect("key generation")
}

/// Every asymmetric algorithm, 60 s of leeway, `jti` required, 8 KiB tokens: the defaults.
pub fn jwt_policy() -> JwtPolicy {
    JwtPolicy {
        require_at_jwt: false,
        algorithms: ASYMMETRIC_ALGORITHMS.to_vec(),
        leeway_seconds: 60,
        require_jti: true,
        max_token_bytes: 8192,
    }
}

/// An issuer's keys from a JWKS file, loaded on first use and then left alone (hourly
/// refresh, a day's staleness): for suites and benches that drive an `Authorizer` in process.
pub fn file_issuer_keys(issuer: &str, jwks_path: std::path::PathBuf) -> Arc<IssuerKeys> {
    let settings = JwksSettings {
        refresh_interval: Duration::from_secs(3600),
        min_refresh_interval: Duration::from_secs(3600),
        max_stale: Duration::from_secs(86400),
        fetch_timeout: Duration::from_secs(2),
        file_poll_interval: Duration::from_secs(3600),
        allow_http: false,
    };
    IssuerKeys::new(
        issuer.into(),
        JwksSource::File(jwks_path),
        settings,
        reqwest::Client::new(),
        None,
    )
}

/// What the JWKS endpoint answers right now.
#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    cache_control: Option<String>,
    delay: Duration,
}

#[derive(Clone)]
struct JwksState {
    reply: Arc<Mutex<Reply>>,
    fetches: Arc<AtomicUsize>,
    base_url: String,
}

/// A real HTTP server for `/jwks.json` and OIDC discovery, whose answer tests can switch.
pub struct JwksServer {
    state: JwksState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl JwksServer {
    pub async fn start(keys: &[&SigningKey]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let state = JwksState {
            reply: Arc::new(Mutex::new(Reply {
                status: StatusCode::OK,
                body: serde_json::to_vec(&jwks(keys).unwrap()).unwrap(),
                cache_control: None,
                delay: Duration::ZERO,
            })),
            fetches: Arc::new(AtomicUsize::new(0)),
            base_url,
        };
        let app = axum::Router::new()
            .route("/jwks.json", get(serve_jwks))
            .route("/.well-known/openid-configuration", get(serve_discovery))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        JwksServer {
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The issuer URL when keys are found by discovery.
    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.state.base_url)
    }

    /// How many times `/jwks.json` was requested.
    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    pub fn serve_keys(&self, keys: &[&SigningKey]) {
        self.serve(
            StatusCode::OK,
            serde_json::to_vec(&jwks(keys).unwrap()).unwrap(),
        );
    }

    pub fn serve(&self, status: StatusCode, body: impl Into<Vec<u8>>) {
        let mut reply = self.state.reply.lock().unwrap();
        reply.status = status;
        reply.body = body.into();
    }

    /// Every later answer waits this long first (a slow identity provider).
    pub fn set_delay(&self, delay: Duration) {
        self.state.reply.lock().unwrap().delay = delay;
    }

    pub fn set_cache_control(&self, value: &str) {
        self.state.reply.lock().unwrap().cache_control = Some(value.to_owned());
    }

    /// Stops listening and closes idle connections: later fetches get connection refused.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("JWKS server stops")
                .unwrap();
        }
    }
}

async fn serve_jwks(State(state): State<JwksState>) -> impl IntoResponse {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let reply = state.reply.lock().unwrap().clone();
    tokio::time::sleep(reply.delay).await;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    if let Some(cc) = reply.cache_control {
        headers.insert(header::CACHE_CONTROL, cc.parse().unwrap());
    }
    (reply.status, headers, reply.body)
}

async fn serve_discovery(State(state): State<JwksState>) -> impl IntoResponse {
    axum::Json(json!({
        "issuer": state.base_url,
        "jwks_uri": format!("{}/jwks.json", state.base_url),
    }))
}

/// Settings for a test sidecar: one issuer, audience `api`, fast file polling and refetches.
/// `extra` flags override or add to these.
pub fn config(jwks_flag: &[&str], extra: &[&str]) -> Config {
    let mut argv = vec![
        "authz-sidecar",
        "--grpc-listen-addr",
        "127.0.0.1:0",
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwks-min-refresh-interval",
        "1ms",
        "--file-poll-interval",
        "50ms",
        "--shutdown-drain-delay",
        "0s",
    ];
    argv.extend_from_slice(jwks_flag);
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(argv).expect("test flags parse");
    Config::from_settings(&cli.settings).expect("test config is valid")
}

/// A sidecar serving on a free loopback port, stopped when dropped.
pub struct Sidecar {
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` listener.
    pub metrics_addr: SocketAddr,
    /// The back-channel logout listener, when the config turns it on.
    pub logout_addr: Option<SocketAddr>,
    client: AuthorizationClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A sidecar trusting one ES256 key, served by a real JWKS server, and tokens signed by it: what
/// most suites that test one feature over valid tokens start with.
pub struct OneIssuer {
    pub key: SigningKey,
    pub sidecar: Sidecar,
    _jwks: JwksServer,
}

impl OneIssuer {
    /// The sidecar with the test defaults ([`config`]) and these flags.
    pub async fn start(extra: &[&str]) -> OneIssuer {
        let key = key(Algorithm::ES256, "one-issuer");
        let jwks = JwksServer::start(&[&key]).await;
        let sidecar = start_sidecar(config(&["--jwks-url", &jwks.jwks_url()], extra)).await;
        OneIssuer {
            key,
            sidecar,
            _jwks: jwks,
        }
    }

    /// A valid token with these claims added (or replaced).
    pub fn token(&self, extra: Value) -> String {
        let mut claims = valid_claims();
        for (name, value) in extra.as_object().expect("claims are an object") {
            claims[name] = value.clone();
        }
        self.key.sign(&claims).unwrap()
    }

    /// The Prometheus scrape of the sidecar's metrics listener.
    pub async fn scrape(&self) -> String {
        self.sidecar.http_get("/metrics").await.1
    }
}

pub async fn start_sidecar(config: Config) -> Sidecar {
    start_sidecar_on(config, 0).await
}

/// A sidecar on a chosen loopback port (0: any free one).
pub async fn start_sidecar_on(config: Config, port: u16) -> Sidecar {
    start(config, port, true).await
}

/// A sidecar whose Check listener speaks TLS: its plaintext helper client is never connected;
/// tests use `tls::client`.
pub async fn start_sidecar_tls(config: Config) -> Sidecar {
    start(config, 0, false).await
}

/// [`start_sidecar_tls`] on a chosen port (where an Envoy cluster points).
pub async fn start_sidecar_tls_on(config: Config, port: u16) -> Sidecar {
    start(config, port, false).await
}

async fn start(config: Config, port: u16, plaintext: bool) -> Sidecar {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let grpc_unix = config
        .server
        .tuning
        .unix_socket
        .as_ref()
        .map(|path| authz_sidecar::listener::bind_unix(path).unwrap());
    let logout = match &config.logout {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let logout_addr = logout.as_ref().map(|l| l.local_addr().unwrap());
    let listeners = authz_sidecar::server::Listeners {
        grpc: listener,
        grpc_unix,
        metrics: Some(metrics),
        logout,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        authz_sidecar::server::run(config, listeners, async {
            let _ = stopped.await;
        })
        .await
        .expect("sidecar runs");
    });
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let channel = if plaintext {
        endpoint.connect().await.expect("connect to sidecar")
    } else {
        endpoint.connect_lazy()
    };
    let client = AuthorizationClient::new(channel);
    Sidecar {
        addr,
        metrics_addr,
        logout_addr,
        client,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Sidecar {
    pub fn client(&self) -> AuthorizationClient<Channel> {
        self.client.clone()
    }

    /// A Check with the token on a route carrying these `context_extensions`.
    pub async fn check_route(&self, token: &str, extensions: &[(&str, &str)]) -> CheckResponse {
        let mut request = check_request(&[("authorization", &format!("Bearer {token}"))]);
        if let Some(attributes) = request.attributes.as_mut() {
            attributes.context_extensions = extensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        self.client()
            .check(request)
            .await
            .expect("Check RPC succeeds")
            .into_inner()
    }

    pub async fn check_headers(&self, headers: &[(&str, &str)]) -> CheckResponse {
        let request = check_request(headers);
        self.client()
            .check(request)
            .await
            .expect("Check RPC succeeds")
            .into_inner()
    }
}

impl Sidecar {
    /// Whether a Check with this token is allowed right now.
    pub async fn allows(&self, token: &str) -> bool {
        self.check(token)
            .await
            .status
            .as_ref()
            .is_some_and(|s| s.code == 0)
    }

    /// The reason a Check with this token gets now (empty when allowed).
    pub async fn reason(&self, token: &str) -> String {
        let response = self.check(token).await;
        response.status.map(|s| s.message).unwrap_or_default()
    }

    /// Sends the token as `Authorization: Bearer <token>`.
    pub async fn check(&self, token: &str) -> CheckResponse {
        self.check_headers(&[("authorization", &format!("Bearer {token}"))])
            .await
    }

    /// GET on the metrics listener: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr, path).await
    }

    /// Asks for shutdown without waiting for it (the drain runs in the background).
    pub fn request_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("sidecar drains")
                .unwrap();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The allow half of a response, failing the test if it is a deny.
pub fn expect_allow(response: &CheckResponse) -> &OkHttpResponse {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, 0, "expected allow, got {response:?}");
    match &response.http_response {
        Some(check_response::HttpResponse::OkResponse(ok)) => ok,
        other => panic!("expected an ok_response, got {other:?}"),
    }
}

/// The deny half of a response, with its reason (the status message), failing on an allow.
pub fn expect_deny(response: &CheckResponse) -> (&DeniedHttpResponse, i32, &str) {
    let status = response
        .status
        .as_ref()
        .expect("a deny always carries a status");
    assert_ne!(status.code, 0, "expected a deny, got {response:?}");
    match &response.http_response {
        Some(check_response::HttpResponse::DeniedResponse(denied)) => {
            (denied, status.code, &status.message)
        }
        other => panic!("expected a denied_response, got {other:?}"),
    }
}

pub fn header<'a>(
    headers: &'a [authz_sidecar::pb::envoy::config::core::v3::HeaderValueOption],
    name: &str,
) -> Option<&'a str> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

/// Polls `probe` until it returns true or `limit` passes. Generous bounds: CI cores are noisy.
pub async fn eventually<F, Fut>(limit: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `GET path` until it answers 200, for up to `limit`; false if it never does.
pub async fn http_ok_within(addr: SocketAddr, path: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        tokio::net::TcpStream::connect(addr).await.is_ok() && http_get(addr, path).await.0 == 200
    })
    .await
}

/// A CheckRequest for `GET /orders` with these request headers.
pub fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    host: "api.test".into(),
                    headers,
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

/// The value of one series (name with its labels, exactly as exposed) in a Prometheus scrape.
pub fn metric_value(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in\n{scrape}"))
}

/// The upper bound (seconds) of the bucket holding quantile `q` of what a histogram recorded
/// between two scrapes, Prometheus's `histogram_quantile` without the interpolation.
pub fn histogram_quantile_between(before: &str, after: &str, histogram: &str, q: f64) -> f64 {
    let buckets = |scrape: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{histogram}_bucket{{le=\"");
        scrape
            .lines()
            .filter_map(|line| {
                let (le, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    };
    let (before, after) = (buckets(before), buckets(after));
    assert!(!after.is_empty(), "{histogram} has no buckets");
    let recorded: Vec<(f64, f64)> = after
        .iter()
        .zip(before.iter().chain(std::iter::repeat(&(0.0, 0.0))))
        .map(|(&(le, now), &(_, then))| (le, now - then))
        .collect();
    let total = recorded.last().map_or(0.0, |&(_, n)| n);
    recorded
        .iter()
        .find(|&&(_, n)| n >= q * total)
        .map_or(f64::INFINITY, |&(le, _)| le)
}

/// A loopback port nothing listens on right now (for processes that must be told a port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ext_authz_revocation_cache_live` from one scrape: 1 while Redis pushes invalidations.
pub async fn revocation_cache_live(sidecar: &Sidecar) -> f64 {
    metric_value(
        &sidecar.http_get("/metrics").await.1,
        "ext_authz_revocation_cache_live",
    )
}

/// Whether the revocation cache turns live within `within`.
pub async fn cache_live_within(sidecar: &Sidecar, within: Duration) -> bool {
    eventually(within, || async {
        revocation_cache_live(sidecar).await == 1.0
    })
    .await
}
