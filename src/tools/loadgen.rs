//! An open-loop load generator for the Check RPC: requests leave on a fixed schedule whatever
//! the answers do, and each latency is measured from when its request was *due*, so a stalled
//! server shows up as latency instead of silently lowering the offered rate (no coordinated
//! omission). Also a closed-loop mode to find the peak. It speaks gRPC Checks straight to a
//! sidecar, or plain HTTP/2 GETs to an Envoy in front of one (`--protocol http`). Used by the
//! overload tests and `make bench-envoy`; figures in BENCHMARKS.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use std::sync::Mutex;
use tokio::time::Instant;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};

use crate::pb::envoy::service::auth::v3::CheckRequest;
use crate::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

/// `authz-sidecar loadgen`: Checks at a sidecar, open loop at `--rate` or closed loop with
/// `--concurrency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// The sidecar's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:9191")]
    pub addr: String,
    /// Token set written by `authz-sidecar tokens` (JSON lines with a `token` field), sent in turn.
    #[arg(long)]
    pub tokens: std::path::PathBuf,
    /// Offered Checks per second (open loop). Ignored with --concurrency.
    #[arg(long, default_value = "1000")]
    pub rate: f64,
    /// Closed loop instead: this many callers sending back to back (finds the peak).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// With --concurrency: send every token exactly once, then stop (ignores --seconds).
    #[arg(long)]
    pub once: bool,
    /// Seconds to run.
    #[arg(long, default_value = "10")]
    pub seconds: u64,
    /// HTTP/2 connections, used in turn.
    #[arg(long, default_value = "4")]
    pub connections: usize,
    /// A Check unanswered after this many milliseconds counts as an error; it is also sent as
    /// the Check's `grpc-timeout`, as Envoy sends its ext_authz timeout.
    #[arg(long, default_value = "2000")]
    pub timeout_ms: u64,
    /// Open loop: Checks outstanding at most; a Check due beyond it is counted as `dropped`
    /// and never sent, as Envoy's circuit breaker (`max_requests`, default 1024) does.
    #[arg(long, default_value = "1024")]
    pub max_outstanding: u64,
    /// Print the report as one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    /// `grpc`: Checks to the sidecar at --addr. `http`: `GET --path` with the token as a Bearer
    /// credential to an HTTP server (Envoy) at --addr, over HTTP/2 (h2c); 200 counts as
    /// allowed, 401/403/429/503 as denied.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "http"])]
    pub protocol: String,
    /// HTTP mode: the path requested.
    #[arg(long, default_value = "/")]
    pub path: String,
}

/// Runs `authz-sidecar loadgen` and returns its one-line report.
pub async fn run(args: &LoadgenArgs) -> Result<String, String> {
    let text = std::fs::read_to_string(&args.tokens)
        .map_err(|e| format!("{}: {e}", args.tokens.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|entry| entry["token"].as_str().map(str::to_owned))
        .collect();
    if tokens.is_empty() {
        return Err(format!("{}: no tokens", args.tokens.display()));
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let target = if args.protocol == "http" {
        Target::connect_http(&args.addr, &args.path, args.connections, &tokens, timeout).await
    } else {
        let requests = tokens
            .iter()
            .map(|token| super::bearer_request(token))
            .collect();
        Target::connect(&args.addr, args.connections, requests, timeout)
            .await
            .map_err(|e| e.to_string())
    }
    .map_err(|e| format!("{}: {e}", args.addr))?
    .with_max_outstanding(args.max_outstanding);
    let duration = Duration::from_secs(args.seconds);
    let report = match args.concurrency {
        Some(concurrency) if args.once => each_once(&target, concurrency).await,
        Some(concurrency) => closed_loop(&target, concurrency, duration).await,
        None => open_loop(&target, args.rate, duration).await,
    };
    Ok(if args.json {
        report.to_json().to_string()
    } else {
        report.summary()
    })
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub sent: u64,
    /// Answered with an allow.
    pub allowed: u64,
    /// Answered with a deny or failure status (shed, 401, ...).
    pub denied: u64,
    /// RPC errors and per-request timeouts.
    pub errors: u64,
    /// Due while the outstanding cap was reached: never sent (the client's circuit breaker).
    pub dropped: u64,
    pub elapsed: Duration,
    /// Latency of the allowed requests, µs, from when each was due.
    pub allowed_latency: Histogram<u64>,
    /// Latency of every answered request, allowed or denied, µs.
    pub answered_latency: Histogram<u64>,
}

impl Report {
    pub fn allowed_per_second(&self) -> f64 {
        self.allowed as f64 / self.elapsed.as_secs_f64()
    }

    pub fn sent_per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }

    /// Allowed latency at quantile `q` (0-1).
    pub fn allowed_at(&self, q: f64) -> Duration {
        Duration::from_micros(self.allowed_latency.value_at_quantile(q))
    }

    /// The slowest answer, allowed or denied.
    pub fn slowest_answer(&self) -> Duration {
        Duration::from_micros(self.answered_latency.max())
    }

    /// The report for another program (the overload test reads it); latencies in µs.
    pub fn to_json(&self) -> serde_json::Value {
        let quantiles = |h: &Histogram<u64>| {
            serde_json::json!({
                "p50": h.value_at_quantile(0.5),
                "p90": h.value_at_quantile(0.9),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
            })
        };
        serde_json::json!({
            "sent": self.sent,
            "allowed": self.allowed,
            "denied": self.denied,
            "errors": self.errors,
            "dropped": self.dropped,
            "seconds": self.elapsed.as_secs_f64(),
            "allowed_per_second": self.allowed_per_second(),
            "allowed_latency_us": quantiles(&self.allowed_latency),
            "answered_latency_us": quantiles(&self.answered_latency),
        })
    }

    pub fn summary(&self) -> String {
        format!(
            "sent {} ({:.0}/s), allowed {} ({:.0}/s), denied {}, errors {}, dropped {}; \
             allowed p50 {:?} p90 {:?} p99 {:?} p99.9 {:?}",
            self.sent,
            self.sent_per_second(),
            self.allowed,
            self.allowed_per_second(),
            self.denied,
            self.errors,
            self.dropped,
            self.allowed_at(0.5),
            self.allowed_at(0.9),
            self.allowed_at(0.99),
            self.allowed_at(0.999),
        )
    }
}

/// The connections of a run and what is sent on them.
#[derive(Clone)]
enum Clients {
    Grpc {
        clients: Vec<AuthorizationClient<Channel>>,
        requests: Arc<Vec<CheckRequest>>,
    },
    Http {
        senders: Vec<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>,
        uri: http::Uri,
        /// `Bearer <token>` for each token, built once.
        credentials: Arc<Vec<http::HeaderValue>>,
    },
}

/// What one request came back as.
enum Outcome {
    Allowed,
    Denied,
    Failed,
}

impl Clients {
    /// Sends request `i` (the `i`-th connection and token, in turn).
    async fn send(&self, i: u64, timeout: Duration) -> Outcome {
        match self {
            Clients::Grpc { clients, requests } => {
                let mut client = clients[i as usize % clients.len()].clone();
                let mut request =
                    tonic::Request::new(requests[i as usize % requests.len()].clone());
                request.set_timeout(timeout);
                match tokio::time::timeout(timeout, client.check(request)).await {
                    Ok(Ok(response)) => {
                        let allowed = response
                            .get_ref()
                            .status
                            .as_ref()
                            .is_none_or(|s| s.code == 0);
                        if allowed {
                            Outcome::Allowed
                        } else {
                            Outcome::Denied
                        }
                    }
                    _ => Outcome::Failed,
                }
            }
            Clients::Http {
                senders,
                uri,
                credentials,
            } => {
                let mut sender = senders[i as usize % senders.len()].clone();
                let request = http::Request::get(uri.clone())
                    .header(
                        http::header::AUTHORIZATION,
                        credentials[i as usize % credentials.len()].clone(),
                    )
                    .body(Empty::<Bytes>::new());
                let Ok(request) = request else {
                    return Outcome::Failed;
                };
                // The body is read to its end, as a real client would; a response whose body
                // fails counts as failed.
                let exchange = async {
                    let response = sender.send_request(request).await?;
                    let status = response.status().as_u16();
                    response.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(Ok(200)) => Outcome::Allowed,
                    Ok(Ok(401 | 403 | 429 | 503)) => Outcome::Denied,
                    _ => Outcome::Failed,
                }
            }
        }
    }
}

/// Connections and requests for a run.
#[derive(Clone)]
pub struct Target {
    clients: Clients,
    /// A request unanswered after this counts as an error; sent as its `grpc-timeout`.
    timeout: Duration,
    /// Open loop: requests in flight at most (see [`LoadgenArgs::max_outstanding`]).
    max_outstanding: u64,
}

impl Target {
    /// `connections` HTTP/2 connections to `addr` (`http://host:port`); requests are sent in
    /// turn from `requests`.
    pub async fn connect(
        addr: &str,
        connections: usize,
        requests: Vec<CheckRequest>,
        timeout: Duration,
    ) -> Result<Target, tonic::transport::Error> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let channel = Endpoint::from_shared(addr.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await?;
            clients.push(AuthorizationClient::new(channel));
        }
        Ok(Target {
            clients: Clients::Grpc {
                clients,
                requests: Arc::new(requests),
            },
            timeout,
            max_outstanding: 1024,
        })
    }

    /// `connections` HTTP/2 (h2c) connections to the HTTP server at `addr` (`http://host:port`),
    /// sending `GET path` with each token in turn as a Bearer credential.
    pub async fn connect_http(
        addr: &str,
        path: &str,
        connections: usize,
        tokens: &[String],
        timeout: Duration,
    ) -> Result<Target, String> {
        let uri: http::Uri = format!("{}{path}", addr.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("bad address or path: {e}"))?;
        let authority = uri
            .authority()
            .ok_or("the address needs host:port")?
            .to_string();
        let mut senders = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            let tcp = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let (sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            senders.push(sender);
        }
        let credentials = tokens
            .iter()
            .map(|token| http::HeaderValue::from_str(&format!("Bearer {token}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a token is not a header value: {e}"))?;
        Ok(Target {
            clients: Clients::Http {
                senders,
                uri,
                credentials: Arc::new(credentials),
            },
            timeout,
            max_outstanding: 1024,
        })
    }

    /// How many distinct requests are sent in turn.
    fn distinct(&self) -> usize {
        match &self.clients {
            Clients::Grpc { requests, .. } => requests.len(),
            Clients::Http { credentials, .. } => credentials.len(),
        }
    }

    /// Caps the requests an open loop keeps in flight; 0 means no cap beyond memory's.
    pub fn with_max_outstanding(mut self, max_outstanding: u64) -> Self {
        self.max_outstanding = if max_outstanding == 0 {
            u64::MAX
        } else {
            max_outstanding
        };
        self
    }
}

#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
    outstanding: AtomicU64,
}

/// Sends request `i` and records the outcome; latency counts from `due`.
/// Latency histograms: of allowed requests, and of every answer.
struct Latencies {
    allowed: Mutex<Histogram<u64>>,
    answered: Mutex<Histogram<u64>>,
}

impl Latencies {
    fn new() -> Arc<Self> {
        Arc::new(Latencies {
            allowed: Mutex::new(histogram()),
            answered: Mutex::new(histogram()),
        })
    }
}

fn record(histogram: &Mutex<Histogram<u64>>, micros: u64) {
    if let Ok(mut histogram) = histogram.lock() {
        let _ = histogram.record(micros);
    }
}

fn snapshot(histogram: &Mutex<Histogram<u64>>) -> Histogram<u64> {
    histogram
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| self::histogram())
}

async fn send(target: &Target, i: u64, due: Instant, counts: &Counts, latency: &Latencies) {
    let outcome = target.clients.send(i, target.timeout).await;
    let micros = due.elapsed().as_micros().max(1) as u64;
    match outcome {
        Outcome::Allowed => {
            record(&latency.answered, micros);
            counts.allowed.fetch_add(1, Ordering::Relaxed);
            record(&latency.allowed, micros);
        }
        Outcome::Denied => {
            record(&latency.answered, micros);
            counts.denied.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Failed => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Offers `rate` requests per second for `duration`, open loop.
pub async fn open_loop(target: &Target, rate: f64, duration: Duration) -> Report {
    let counts = Arc::new(Counts::default());
    let latency = Latencies::new();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let start = Instant::now();
    let total = (duration.as_secs_f64() * rate) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let mut dropped = 0;
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        if counts.outstanding.load(Ordering::Relaxed) >= target.max_outstanding {
            dropped += 1;
            continue;
        }
        counts.outstanding.fetch_add(1, Ordering::Relaxed);
        let (target, counts, latency) = (target.clone(), counts.clone(), latency.clone());
        tasks.spawn(async move {
            send(&target, i, due, &counts, &latency).await;
            counts.outstanding.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().max(duration);
    report(&counts, latency, total - dropped, dropped, elapsed).await
}

/// `concurrency` callers sending back to back for `duration`: the peak the server sustains.
pub async fn closed_loop(target: &Target, concurrency: usize, duration: Duration) -> Report {
    callers(target, concurrency, Some(duration), u64::MAX).await
}

/// `concurrency` callers sending back to back until every request of the set went out once.
pub async fn each_once(target: &Target, concurrency: usize) -> Report {
    callers(target, concurrency, None, target.distinct() as u64).await
}

/// Closed loop until `duration` is over (if any) or `limit` requests were sent.
async fn callers(
    target: &Target,
    concurrency: usize,
    duration: Option<Duration>,
    limit: u64,
) -> Report {
    let counts = Arc::new(Counts::default());
    let latency = Latencies::new();
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (target, counts, latency, sent) = (
            target.clone(),
            counts.clone(),
            latency.clone(),
            sent.clone(),
        );
        tasks.spawn(async move {
            while duration.is_none_or(|d| start.elapsed() < d) {
                let i = sent.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                send(&target, i, Instant::now(), &counts, &latency).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let sent = sent.load(Ordering::Relaxed).min(limit);
    report(&counts, latency, sent, 0, start.elapsed()).await
}

async fn report(
    counts: &Counts,
    latency: Arc<Latencies>,
    sent: u64,
    dropped: u64,
    elapsed: Duration,
) -> Report {
    Report {
        sent,
        allowed: counts.allowed.load(Ordering::Relaxed),
        denied: counts.denied.load(Ordering::Relaxed),
        errors: counts.errors.load(Ordering::Relaxed),
        dropped,
        elapsed,
        allowed_latency: snapshot(&latency.allowed),
        answered_latency: snapshot(&latency.answered),
    }
}
