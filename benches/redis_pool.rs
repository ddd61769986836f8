//! Revocation lookups through the fred pool against a local redis-server, for each pool size
//! at 64 and 512 concurrent lookups. Rounds interleave every combination (A B C ... A B C) and
//! the median round is reported.
//!
//!     cargo bench --bench redis_pool            (or: make bench)

mod common;

use std::sync::Arc;
use std::time::Instant;

use authz_sidecar::revocation::{RedisStore, RevocationStore, TokenIdentity};
use common::{RedisServer, median, redis_settings};

const POOL_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 50];
const CONCURRENCY: [usize; 2] = [64, 512];
const ROUNDS: usize = 5;
const LOOKUPS_PER_RUN: usize = 40_000;

struct Run {
    p50_us: f64,
    p99_us: f64,
    per_second: f64,
}

async fn run(store: Arc<RedisStore>, concurrency: usize) -> Run {
    let per_task = LOOKUPS_PER_RUN / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let jti = format!("bench-{task}");
                let identity = TokenIdentity {
                    issuer: "https://bench.test",
                    jti: Some(&jti),
                    subject: Some("bench-user"),
                    session: None,
                    issued_at: Some(1),
                };
                let mut latencies = Vec::with_capacity(per_task);
                for _ in 0..per_task {
                    let t = Instant::now();
                    store.lookup(&identity).await.expect("lookup");
                    latencies.push(t.elapsed().as_secs_f64() * 1e6);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(LOOKUPS_PER_RUN);
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    Run {
        p50_us: all[all.len() / 2],
        p99_us: all[all.len() * 99 / 100],
        per_second: all.len() as f64 / elapsed,
    }
}

#[tokio::main]
async fn main() {
    let redis = RedisServer::start();
    let mut stores = Vec::new();
    for size in POOL_SIZES {
        let settings = redis_settings(&redis, size, 0);
        stores.push(Arc::new(RedisStore::connect(&settings).await.unwrap()));
    }
    for store in &stores {
        run(store.clone(), 64).await; // warm up every pool
    }

    let combos: Vec<(usize, usize)> = CONCURRENCY
        .iter()
        .flat_map(|c| (0..POOL_SIZES.len()).map(move |i| (*c, i)))
        .collect();
    let mut results: Vec<Vec<Run>> = (0..combos.len()).map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (slot, (concurrency, pool)) in combos.iter().enumerate() {
            results[slot].push(run(stores[*pool].clone(), *concurrency).await);
        }
    }
    println!(
        "MGET revocation lookups (jti + sub keys) through a fred pool, median of {ROUNDS} rounds x {LOOKUPS_PER_RUN}:"
    );
    println!(
        "{:>11} {:>5} {:>10} {:>10} {:>12}",
        "concurrent", "pool", "p50 us", "p99 us", "lookups/s"
    );
    for ((concurrency, pool), runs) in combos.iter().zip(results) {
        let p50 = median(runs.iter().map(|r| r.p50_us).collect());
        let p99 = median(runs.iter().map(|r| r.p99_us).collect());
        let rate = median(runs.iter().map(|r| r.per_second).collect());
        println!(
            "{concurrency:>11} {:>5} {p50:>10.0} {p99:>10.0} {rate:>12.0}",
            POOL_SIZES[*pool]
        );
    }
}
