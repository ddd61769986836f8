//! What a rate limit adds to a Check, per backend: the limiter call alone, in process, with
//! one policy keyed by subject over 1,000 subjects. The revocation MGET on the same Redis and
//! pool runs beside it for scale: the Redis limiter is one more round trip of that kind.
//! Rounds interleave the variants (A B C A B C ...); medians of the rounds are reported.
//!
//!     cargo bench --bench rate_limit            (or: make bench)

mod common;

use std::sync::Arc;
use std::time::Instant;

use authz_sidecar::claims::Claims;
use authz_sidecar::metrics::Metrics;
use authz_sidecar::rate_limit::{
    Backend, Caller, LocalLimiter, RateLimitSection, RateLimiter, RedisLimiter,
};
use authz_sidecar::revocation::{RedisStore, RevocationStore, TokenIdentity};
use common::{ISSUER, RedisServer, median, redis_settings};

const ROUNDS: usize = 7;
const SUBJECTS: usize = 1000;
const CALLS_PER_RUN: usize = 20_000;
const CONCURRENCY: usize = 64;
/// Generous enough that the bench measures the allow path, as most Checks take it.
const SECTION: &str =
    "default: [per-user]\npolicies:\n  per-user: {key: subject, rate: 1000000, per: 1s}\n";

#[derive(Clone, Copy)]
enum Variant {
    Local,
    Redis,
    RevocationMget,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Local, Variant::Redis, Variant::RevocationMget];

    fn name(self) -> &'static str {
        match self {
            Variant::Local => "limit, local backend",
            Variant::Redis => "limit, Redis backend (EVALSHA)",
            Variant::RevocationMget => "revocation lookup (MGET), for scale",
        }
    }
}

struct Subjects(Vec<Claims>);

impl Subjects {
    fn new() -> Self {
        Subjects(
            (0..SUBJECTS)
                .map(|i| Claims {
                    iss: Some(ISSUER.into()),
                    sub: Some(format!("user-{i}").into()),
                    ..Claims::default()
                })
                .collect(),
        )
    }
}

struct Setup {
    local: RateLimiter,
    redis: RateLimiter,
    store: RedisStore,
    subjects: Subjects,
}

impl Setup {
    /// One call of the variant for subject `i`.
    async fn call(&self, variant: Variant, i: usize) {
        let claims = &self.subjects.0[i % SUBJECTS];
        let caller = Caller {
            token: Some((ISSUER, claims)),
            ip: None,
        };
        match variant {
            Variant::Local => assert!(self.local.check(None, caller).await.unwrap().is_some()),
            Variant::Redis => assert!(self.redis.check(None, caller).await.unwrap().is_some()),
            Variant::RevocationMget => {
                let identity = TokenIdentity {
                    issuer: ISSUER,
                    jti: Some("bench-jti"),
                    subject: claims.sub.as_deref(),
                    session: None,
                    issued_at: Some(1),
                };
                self.store.lookup(&identity).await.unwrap();
            }
        }
    }
}

/// Microseconds per call, one after another (the latency a Check sees).
async fn sequential(setup: &Setup, variant: Variant) -> f64 {
    let calls = CALLS_PER_RUN / 10;
    let started = Instant::now();
    for i in 0..calls {
        setup.call(variant, i).await;
    }
    started.elapsed().as_secs_f64() * 1e6 / calls as f64
}

/// Calls per second with 64 in flight (how the pool carries concurrent Checks).
async fn concurrent(setup: &Arc<Setup>, variant: Variant) -> f64 {
    let per_task = CALLS_PER_RUN / CONCURRENCY;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let setup = setup.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    setup.call(variant, task * per_task + i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (per_task * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let redis_server = RedisServer::start();
    let settings = redis_settings(&redis_server, 4, 0);
    let store = RedisStore::connect(&settings).await.unwrap();
    let config = || {
        serde_yaml_ng::from_str::<RateLimitSection>(SECTION)
            .unwrap()
            .validate()
            .unwrap()
    };
    let metrics = Arc::new(Metrics::new(&[]));
    let local = RateLimiter::new(
        config(),
        Backend::Local(LocalLimiter::new(
            100_000,
            metrics.rate_limit_evictions.clone(),
        )),
        metrics.clone(),
    );
    let redis_limiter = RateLimiter::new(
        config(),
        Backend::Redis(RedisLimiter::new(
            store.pool().clone(),
            "ratelimit:".into(),
            &settings.pool,
        )),
        metrics,
    );
    let setup = Arc::new(Setup {
        local,
        redis: redis_limiter,
        store,
        subjects: Subjects::new(),
    });
    for variant in Variant::ALL {
        sequential(&setup, variant).await; // warm up: buckets exist, the script is cached
    }

    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    let mut throughput: Vec<Vec<f64>> = vec![Vec::new(); Variant::ALL.len()];
    for _ in 0..ROUNDS {
        for (slot, variant) in Variant::ALL.iter().enumerate() {
            latency[slot].push(sequential(&setup, *variant).await);
            throughput[slot].push(concurrent(&setup, *variant).await);
        }
    }
    println!(
        "Rate-limit cost per Check, one subject policy over {SUBJECTS} subjects, Redis pool 4, \
         median of {ROUNDS} rounds:"
    );
    println!(
        "{:<38} {:>16} {:>22}",
        "variant", "sequential us", "calls/s at 64 in flight"
    );
    for (slot, variant) in Variant::ALL.iter().enumerate() {
        println!(
            "{:<38} {:>16.1} {:>22.0}",
            variant.name(),
            median(latency[slot].clone()),
            median(throughput[slot].clone())
        );
    }
}
