//! Revocation lookups through `RedisStore` on each Redis topology the sidecar supports, and
//! how fast a revocation reaches the sidecars that cache (issue 20).
//!
//! Topologies, all real `redis-server` processes on loopback (tests/common/topology.rs):
//! a standalone Redis; a Sentinel group (master, replica, three sentinels); a Cluster of three
//! masters with one replica each, read with the default prefix `revoked:` (a Check's keys on
//! up to three shards, one GET each, in parallel) and with `{revoked}:` (every key in one
//! slot, one MGET to one master). A second Cluster of six masters (no replicas, to keep
//! start-up short) with both layouts shows how the load per shard moves with the number of
//! shards. Each with the revocation cache off and on, at 64 and 512 concurrent lookups; every
//! lookup asks for three keys (jti, subject, session), as a Check does. Rounds interleave all
//! variants (A B C ... A B C ...); medians of the rounds.
//!
//! With the cache on, each task takes a token never seen before on every tenth lookup, so
//! about 10 % of lookups miss and read Redis; the subject and session keys stay cached. The
//! hit share printed is the store's own counter.
//!
//! Load per shard: `INFO cpu commandstats` of every master serving the variant, read before
//! and after each run; the GET and MGET calls and the CPU seconds are the differences. The
//! CPU this process used (/proc/self/stat) is the sidecar's side of the same lookups.
//!
//! Propagation: stores with the cache on and tracking (1, and a group of 3, each group on its
//! own key prefix so neither sees the other's writes), a separate store writes one revoked
//! `jti` (the `revoke` path), and a poller asks every store of the group until all report it
//! revoked. The clock starts before the write is sent.
//!
//!     cargo bench --bench redis_topologies        (part of make bench-process; ~75 s after the build)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use authz_sidecar::metrics::Metrics;
use authz_sidecar::revocation::{RedisStore, Revocation, RevocationStore, Revoked, TokenIdentity};
use common::topology::{Cluster, Sentinels, cli};
use common::{RedisServer, median, redis_settings_at};

const ISSUER: &str = "https://bench.test";
const CONCURRENCY: [usize; 2] = [64, 512];
const ROUNDS: usize = 7;
const LOOKUPS_PER_RUN: usize = 30_000;
/// The sidecar's default `REDIS_POOL_SIZE`.
const POOL_SIZE: usize = 2;
/// The sidecar's default `REVOCATION_CACHE_MAX_ENTRIES`.
const CACHE_ENTRIES: u64 = 50_000;
/// With the cache on, one lookup in this many is for a token not seen before.
const NEW_TOKEN_EVERY: usize = 10;
const REVOCATIONS: usize = 200;
/// A revocation not seen by every store within this is counted as lost.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);

/// One Redis deployment as a store sees it: a URL, a key prefix, the masters that serve it.
struct Target {
    name: &'static str,
    url: String,
    prefix: &'static str,
    masters: Vec<u16>,
}

/// A store on one target, with the cache off or on, and the metrics its cache counts into.
struct Store {
    target: usize,
    cache: bool,
    store: Arc<RedisStore>,
    metrics: Arc<Metrics>,
}

/// What one master did during a run: GET + MGET calls, CPU seconds (user + sys).
#[derive(Clone, Copy, Default)]
struct NodeLoad {
    reads: u64,
    cpu: f64,
}

struct Run {
    p50_us: f64,
    p99_us: f64,
    per_second: f64,
    lookups: u64,
    hits: u64,
    /// One entry per master of the target, in `Target::masters` order.
    load: Vec<NodeLoad>,
    /// CPU seconds this process (the sidecar's side: the store, fred, the tasks) used.
    client_cpu: f64,
}

/// Distinct jti for every run, so the cache-on variants miss on new tokens every time.
static RUN_ID: AtomicUsize = AtomicUsize::new(0);

async fn connect(target: &Target, cache: bool) -> (Arc<RedisStore>, Arc<Metrics>) {
    let entries = if cache { CACHE_ENTRIES } else { 0 };
    let settings = redis_settings_at(target.url.clone(), target.prefix, POOL_SIZE, entries);
    let metrics = Arc::new(Metrics::new(&[ISSUER.to_owned()]));
    let mut store = RedisStore::connect(&settings).await.expect("store");
    if let Some(tracker) = store
        .start_cache(&settings, metrics.revocation_cache.clone())
        .expect("tracking client")
    {
        tokio::spawn(tracker);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !store.cache_live() {
            assert!(
                Instant::now() < deadline,
                "{}: cache not live in 15 s",
                target.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (Arc::new(store), metrics)
}

/// `ext_authz_revocation_cache_requests_total{result="hit"}` as the store counted it.
fn cache_hits(metrics: &Metrics) -> u64 {
    let prefix = "ext_authz_revocation_cache_requests_total{result=\"hit\"}";
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat (in clock ticks of
/// 10 ms: summed over the rounds of a variant, that is a few per cent of what is measured).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) and its closing parenthesis;
    // utime and stime are the 14th and 15th fields of the line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// GET + MGET calls so far and CPU seconds used, from `INFO cpu commandstats`.
fn node_load(port: u16) -> NodeLoad {
    let info = cli(port, &["INFO", "cpu", "commandstats"]);
    let mut load = NodeLoad::default();
    for line in info.lines() {
        let line = line.trim();
        if let Some(stats) = line
            .strip_prefix("cmdstat_get:")
            .or_else(|| line.strip_prefix("cmdstat_mget:"))
        {
            let calls = stats
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok());
            load.reads += calls.unwrap_or(0);
        } else if let Some(seconds) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            load.cpu += seconds.parse::<f64>().unwrap_or(0.0);
        }
    }
    load
}

async fn run(store: &Store, target: &Target, concurrency: usize) -> Run {
    let run_id = RUN_ID.fetch_add(1, Ordering::Relaxed);
    let per_task = LOOKUPS_PER_RUN / concurrency;
    let before: Vec<NodeLoad> = target.masters.iter().map(|&p| node_load(p)).collect();
    let hits_before = cache_hits(&store.metrics);
    let cpu_before = own_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let store = store.store.clone();
            tokio::spawn(async move {
                let subject = format!("user-{task}");
                let session = format!("session-{task}");
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    // Offset by task, so the misses are spread over the run, not all at once.
                    let jti = format!("r{run_id}-t{task}-{}", (i + task) / NEW_TOKEN_EVERY);
                    let identity = TokenIdentity {
                        issuer: ISSUER,
                        jti: Some(&jti),
                        subject: Some(&subject),
                        session: Some(&session),
                        issued_at: Some(1),
                    };
                    let t = Instant::now();
                    let verdict = store.lookup(&identity).await.expect("lookup");
                    latencies.push(t.elapsed().as_secs_f64() * 1e6);
                    assert!(verdict.is_none(), "nothing is revoked here");
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
    let client_cpu = own_cpu() - cpu_before;
    let load = target
        .masters
        .iter()
        .zip(&before)
        .map(|(&port, b)| {
            let after = node_load(port);
            NodeLoad {
                reads: after.reads - b.reads,
                cpu: after.cpu - b.cpu,
            }
        })
        .collect();
    all.sort_by(|a, b| a.total_cmp(b));
    Run {
        p50_us: all[all.len() / 2],
        p99_us: all[all.len() * 99 / 100],
        per_second: all.len() as f64 / elapsed,
        lookups: all.len() as u64,
        hits: cache_hits(&store.metrics) - hits_before,
        load,
        client_cpu,
    }
}

/// A group of sidecars (stores with the cache on) and the store that writes revocations to
/// them; all on one key prefix of their own.
struct Fleet {
    label: String,
    readers: Vec<Arc<RedisStore>>,
    writer: RedisStore,
    /// Until the last reader reports a revocation, one per revocation, in ms.
    last: Vec<f64>,
    /// Until the writer's `SET` was acknowledged, in ms.
    acked: Vec<f64>,
    lost: usize,
}

impl Fleet {
    async fn start(target: &Target, prefix: &'static str, sidecars: usize) -> Fleet {
        let group = Target {
            name: target.name,
            url: target.url.clone(),
            prefix,
            masters: Vec::new(),
        };
        let mut readers = Vec::new();
        for _ in 0..sidecars {
            readers.push(connect(&group, true).await.0);
        }
        let settings = redis_settings_at(target.url.clone(), prefix, POOL_SIZE, 0);
        Fleet {
            label: format!("{}, {sidecars} sidecar(s)", target.name),
            readers,
            writer: RedisStore::connect(&settings).await.expect("writer"),
            last: Vec::new(),
            acked: Vec::new(),
            lost: 0,
        }
    }

    /// Primes every reader's cache with "not revoked" for a new token, revokes it, and polls
    /// every reader until each says revoked.
    async fn revoke_one(&mut self, n: usize) {
        let jti = format!("prop-{n}-{}", RUN_ID.fetch_add(1, Ordering::Relaxed));
        let identity = TokenIdentity {
            issuer: ISSUER,
            jti: Some(&jti),
            subject: Some("prop-user"),
            session: Some("prop-session"),
            issued_at: Some(1),
        };
        for reader in &self.readers {
            for _ in 0..2 {
                assert!(reader.lookup(&identity).await.unwrap().is_none());
            }
        }
        let revocation = [Revocation::Token {
            jti: jti.clone(),
            expires_at: common::now() + 600,
        }];
        let started = Instant::now();
        let write = async {
            self.writer
                .write(&revocation, 0, None)
                .await
                .expect("write");
            started.elapsed()
        };
        let poll = async {
            let mut pending: Vec<&Arc<RedisStore>> = self.readers.iter().collect();
            while !pending.is_empty() && started.elapsed() < PROPAGATION_LIMIT {
                let mut still = Vec::with_capacity(pending.len());
                for reader in pending {
                    if reader.lookup(&identity).await.unwrap() != Some(Revoked::Token) {
                        still.push(reader);
                    }
                }
                pending = still;
                tokio::task::yield_now().await;
            }
            (pending.is_empty(), started.elapsed())
        };
        let (acked, (seen, last)) = tokio::join!(write, poll);
        if seen {
            self.last.push(last.as_secs_f64() * 1e3);
        } else {
            self.lost += 1;
        }
        self.acked.push(acked.as_secs_f64() * 1e3);
    }
}

/// NaN when there are no samples (every revocation of a fleet lost).
fn percentile(mut samples: Vec<f64>, pct: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[(samples.len() * pct / 100).min(samples.len() - 1)]
}

fn main() {
    let began = Instant::now();
    let standalone = RedisServer::start();
    let t = Instant::now();
    let sentinels = Sentinels::start();
    println!(
        "Sentinel group (master, replica, 3 sentinels) up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let cluster = Cluster::start(3, 1);
    println!(
        "Cluster (3 masters, 1 replica each) up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let wide = Cluster::start(6, 0);
    println!(
        "Cluster (6 masters, no replicas) up in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let targets = [
        Target {
            name: "standalone",
            url: standalone.url(),
            prefix: "revoked:",
            masters: vec![standalone.port],
        },
        Target {
            name: "sentinel",
            url: sentinels.url(),
            prefix: "revoked:",
            masters: vec![sentinels.master()],
        },
        Target {
            name: "cluster 3, spread (revoked:)",
            url: cluster.url(),
            prefix: "revoked:",
            masters: cluster.masters(),
        },
        Target {
            name: "cluster 3, one slot ({revoked}:)",
            url: cluster.url(),
            prefix: "{revoked}:",
            masters: cluster.masters(),
        },
        Target {
            name: "cluster 6, spread (revoked:)",
            url: wide.url(),
            prefix: "revoked:",
            masters: wide.masters(),
        },
        Target {
            name: "cluster 6, one slot ({revoked}:)",
            url: wide.url(),
            prefix: "{revoked}:",
            masters: wide.masters(),
        },
    ];

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut stores = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            for cache in [false, true] {
                let (store, metrics) = connect(target, cache).await;
                stores.push(Store {
                    target: i,
                    cache,
                    store,
                    metrics,
                });
            }
        }
        for store in &stores {
            run(store, &targets[store.target], 64).await; // warm up every pool and cache
        }
        let variants: Vec<(usize, usize)> = (0..stores.len())
            .flat_map(|s| CONCURRENCY.iter().map(move |&c| (s, c)))
            .collect();
        let mut results: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
        for _ in 0..ROUNDS {
            for (slot, &(s, concurrency)) in variants.iter().enumerate() {
                let store = &stores[s];
                results[slot].push(run(store, &targets[store.target], concurrency).await);
            }
        }
        report_lookups(&targets, &stores, &variants, &results);

        // Propagation: 1 and 3 sidecars on the standalone Redis and on the Cluster (spread),
        // the four fleets revoking in turn.
        let mut fleets = vec![
            Fleet::start(&targets[0], "prop1:", 1).await,
            Fleet::start(&targets[0], "prop3:", 3).await,
            Fleet::start(&targets[2], "prop1:", 1).await,
            Fleet::start(&targets[2], "prop3:", 3).await,
        ];
        for n in 0..REVOCATIONS {
            for fleet in &mut fleets {
                fleet.revoke_one(n).await;
            }
        }
        println!(
            "\nRevocation propagation, {REVOCATIONS} revocations per fleet, ms from sending the \
             write until every sidecar's lookup reports it:"
        );
        println!(
            "{:<44} {:>7} {:>7} {:>7} {:>13}",
            "fleet", "p50 ms", "p99 ms", "max ms", "write ack p50"
        );
        for fleet in &fleets {
            println!(
                "{:<44} {:>7.2} {:>7.2} {:>7.2} {:>13.2}{}",
                fleet.label,
                percentile(fleet.last.clone(), 50),
                percentile(fleet.last.clone(), 99),
                percentile(fleet.last.clone(), 100),
                percentile(fleet.acked.clone(), 50),
                if fleet.lost > 0 {
                    format!("  ({} not seen within {PROPAGATION_LIMIT:?})", fleet.lost)
                } else {
                    String::new()
                }
            );
        }
    });
    println!("\nwhole run: {:.0} s", began.elapsed().as_secs_f64());
}

fn report_lookups(
    targets: &[Target],
    stores: &[Store],
    variants: &[(usize, usize)],
    results: &[Vec<Run>],
) {
    println!(
        "\nRevocation lookups (3 keys: jti, subject, session) through RedisStore, pool \
         {POOL_SIZE}, median of {ROUNDS} rounds x {LOOKUPS_PER_RUN}; cache on: 1 lookup in \
         {NEW_TOKEN_EVERY} is a new token:"
    );
    println!(
        "{:<34} {:>5} {:>4} {:>7} {:>7} {:>9} {:>5} {:>8} {:>8} {:>8} {:>9} {:>10}  reads per master %",
        "topology",
        "cache",
        "conc",
        "p50 us",
        "p99 us",
        "lookups/s",
        "hit%",
        "cmds/lkp",
        "hot/lkp",
        "hot CPU",
        "Redis CPU",
        "client CPU"
    );
    let mut rates = Vec::new();
    for (&(s, concurrency), runs) in variants.iter().zip(results) {
        let store = &stores[s];
        let target = &targets[store.target];
        let p50 = median(runs.iter().map(|r| r.p50_us).collect());
        let p99 = median(runs.iter().map(|r| r.p99_us).collect());
        let rate = median(runs.iter().map(|r| r.per_second).collect());
        rates.push(((store.target, store.cache, concurrency), rate));
        let lookups: u64 = runs.iter().map(|r| r.lookups).sum();
        let hits: u64 = runs.iter().map(|r| r.hits).sum();
        let per_master: Vec<NodeLoad> = (0..target.masters.len())
            .map(|m| NodeLoad {
                reads: runs.iter().map(|r| r.load[m].reads).sum(),
                cpu: runs.iter().map(|r| r.load[m].cpu).sum(),
            })
            .collect();
        let reads: u64 = per_master.iter().map(|l| l.reads).sum();
        let redis_cpu: f64 = per_master.iter().map(|l| l.cpu).sum();
        let client_cpu: f64 = runs.iter().map(|r| r.client_cpu).sum();
        let hot = per_master
            .iter()
            .max_by_key(|l| l.reads)
            .copied()
            .unwrap_or_default();
        let shares: Vec<String> = per_master
            .iter()
            .map(|l| format!("{:.0}", 100.0 * l.reads as f64 / reads.max(1) as f64))
            .collect();
        println!(
            "{:<34} {:>5} {concurrency:>4} {p50:>7.0} {p99:>7.0} {rate:>9.0} {:>5.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>10.2}  {}",
            target.name,
            if store.cache { "on" } else { "off" },
            100.0 * hits as f64 / lookups as f64,
            reads as f64 / lookups as f64,
            hot.reads as f64 / lookups as f64,
            hot.cpu * 1e6 / lookups as f64,
            redis_cpu * 1e6 / lookups as f64,
            client_cpu * 1e6 / lookups as f64,
            shares.join("/"),
        );
    }
    println!(
        "cmds/lkp: GET + MGET per lookup over all masters; hot/lkp and hot CPU (us per lookup): \
         the busiest master's; Redis CPU: all masters together; client CPU: this process"
    );

    let rate = |target: usize, cache: bool, concurrency: usize| {
        rates
            .iter()
            .find(|(k, _)| *k == (target, cache, concurrency))
            .map_or(f64::NAN, |(_, r)| *r)
    };
    println!("\nRatios of lookups/s (medians):");
    for concurrency in CONCURRENCY {
        for cache in [false, true] {
            let on = if cache { "on" } else { "off" };
            println!(
                "  {concurrency:>3} concurrent, cache {on:<3}: vs standalone: sentinel {:.2}, \
                 cluster 3 spread {:.2}, cluster 3 one slot {:.2}",
                rate(1, cache, concurrency) / rate(0, cache, concurrency),
                rate(2, cache, concurrency) / rate(0, cache, concurrency),
                rate(3, cache, concurrency) / rate(0, cache, concurrency),
            );
        }
        for (spread, one_slot) in [(2, 3), (4, 5)] {
            println!(
                "  {concurrency:>3} concurrent: {} / one slot, cache off {:.2}, cache on {:.2}",
                targets[spread].name,
                rate(spread, false, concurrency) / rate(one_slot, false, concurrency),
                rate(spread, true, concurrency) / rate(one_slot, true, concurrency),
            );
        }
        let on_off: Vec<String> = (0..targets.len())
            .map(|t| {
                format!(
                    "{:.1}",
                    rate(t, true, concurrency) / rate(t, false, concurrency)
                )
            })
            .collect();
        println!(
            "  {concurrency:>3} concurrent, cache on/off, topologies in table order: {}",
            on_off.join(", ")
        );
    }
}
