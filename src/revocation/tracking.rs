//! Revocation keys held in-process and kept true by Redis itself (server-assisted client-side
//! caching): one RESP3 connection runs `CLIENT TRACKING ON BCAST PREFIX <REVOKED_KEY_PREFIX>`,
//! so every write to a revocation key, by any writer (this binary's `revoke`, the Go service,
//! a script), arrives here as an invalidation within a round trip. Most Checks then need no
//! Redis call, yet a new revocation takes effect as fast as Redis can push it.
//!
//! On a Redis Cluster, `CLIENT TRACKING` is sent to every master, so a write on any shard is
//! pushed; a topology change (failover, slot move, node added) restarts
//! tracking, since a master the client newly talks to has not been asked to track.
//!
//! The cache is only used while invalidations are known to flow. It is emptied and bypassed
//! when the tracking connection drops, fails a ping, or lags behind its invalidation channel,
//! and used again once tracking is back on (fred forgets tracking on reconnect). A FLUSHALL's
//! invalidation is dropped by fred; that only ever removes revocations, so at worst a cached
//! "revoked" outlives it until `REVOCATION_CACHE_TTL`: the safe direction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, RespVersion};
use moka::sync::Cache;
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use crate::metrics::{CacheLookup, RevocationCacheMetrics};
use crate::redis::{PoolSettings, StoreError};

/// How often the tracking connection is pinged, and how long a ping may take: a connection
/// that dies silently (a partition, no FIN) bypasses the cache within twice this. A closed
/// connection is noticed at once, from fred's error events.
const PING_INTERVAL: Duration = Duration::from_millis(500);

/// A Redis value of one revocation key as last read: `None` means the key did not exist.
type Value = Option<Arc<str>>;

/// A cached value and the unix second from which it must be read again (its TTL).
#[derive(Clone)]
struct Stored {
    value: Value,
    until: u32,
}

/// What a lookup found in the cache.
pub enum Cached {
    /// Every key was cached: their values, in order, and the stamp of an answer made from them.
    Hit(Vec<Value>, AnswerStamp),
    /// At least one key was not: read them all from Redis, then [`TrackedCache::fill`].
    Miss(Epoch),
    /// Invalidations are not flowing right now: read from Redis and cache nothing.
    Bypass,
}

/// The invalidation count seen before a Redis read; a fill after a newer invalidation could
/// store a value read before it, so such a fill is undone.
#[derive(Clone, Copy)]
pub struct Epoch(u64);

/// What a revocation answer was based on, in 64 bits so a token cache slot can hold it: the
/// cache's epoch when its values were read (low 32 bits; telling apart epochs 2^32
/// invalidations apart is left to the TTL) and the unix second from which the first of them
/// must be read again. Lets a cached token skip the lookup while nothing it read has changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerStamp(u64);

impl AnswerStamp {
    /// No stamp: the answer cannot be reused.
    pub const NONE: AnswerStamp = AnswerStamp(0);

    fn new(epoch: Epoch, until: u32) -> AnswerStamp {
        AnswerStamp((epoch.0 << 32) | u64::from(until))
    }

    fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn until(self) -> u32 {
        self.0 as u32
    }

    /// For storing in an atomic.
    pub fn to_bits(self) -> u64 {
        self.0
    }

    pub fn from_bits(bits: u64) -> AnswerStamp {
        AnswerStamp(bits)
    }
}

fn unix_seconds() -> u32 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

pub struct TrackedCache {
    values: Cache<String, Stored>,
    /// `REVOCATION_CACHE_TTL` in whole seconds, for the stamps.
    ttl_seconds: u32,
    /// Invalidations flow: the cache may answer.
    live: AtomicBool,
    /// Bumped by every invalidation and flush.
    epoch: AtomicU64,
    metrics: RevocationCacheMetrics,
}

impl TrackedCache {
    pub fn new(max_entries: u64, ttl: Duration, metrics: RevocationCacheMetrics) -> Arc<Self> {
        Arc::new(TrackedCache {
            // A sync moka cache: lookups are lock-free reads on the Check path, with no await
            // while any internal lock is held.
            values: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            ttl_seconds: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX),
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            metrics,
        })
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    pub fn get(&self, keys: &[String]) -> Cached {
        // The epoch is read before the live flag and the values, so a flush that races with
        // this lookup is seen by `fill`.
        let epoch = Epoch(self.epoch.load(Ordering::Acquire));
        if !self.is_live() {
            self.metrics.lookup(CacheLookup::Bypass);
            return Cached::Bypass;
        }
        let mut values = Vec::with_capacity(keys.len());
        let mut until = u32::MAX;
        for key in keys {
            match self.values.get(key) {
                Some(stored) => {
                    until = until.min(stored.until);
                    values.push(stored.value);
                }
                None => {
                    self.metrics.lookup(CacheLookup::Miss);
                    return Cached::Miss(epoch);
                }
            }
        }
        self.metrics.lookup(CacheLookup::Hit);
        Cached::Hit(values, AnswerStamp::new(epoch, until))
    }

    /// Stores what Redis answered for `keys`, unless an invalidation arrived since `epoch`;
    /// the stamp of an answer made from them ([`AnswerStamp::NONE`] when they were dropped).
    pub fn fill(&self, epoch: Epoch, keys: &[String], values: &[Option<String>]) -> AnswerStamp {
        let until = unix_seconds().saturating_add(self.ttl_seconds);
        for (key, value) in keys.iter().zip(values) {
            let value = value.as_deref().map(Arc::from);
            self.values.insert(key.clone(), Stored { value, until });
        }
        // Checked after the inserts: an invalidation processed before this point bumped the
        // epoch, so the values may predate it and are dropped; one processed after removes
        // them itself.
        if self.epoch.load(Ordering::Acquire) != epoch.0 || !self.is_live() {
            for key in keys {
                self.values.invalidate(key);
            }
            return AnswerStamp::NONE;
        }
        AnswerStamp::new(epoch, until)
    }

    /// Whether an answer stamped `stamp` still holds at `now` (unix seconds): the cache is live,
    /// no invalidation or flush came since the values were read, and none has outlived its
    /// TTL. Then it is what a lookup would answer, and is counted as a cache hit.
    pub fn still_holds(&self, stamp: AnswerStamp, now: i64) -> bool {
        let holds = stamp != AnswerStamp::NONE
            && now < i64::from(stamp.until())
            && self.is_live()
            && stamp.epoch() == self.epoch.load(Ordering::Acquire) as u32;
        if holds {
            self.metrics.lookup(CacheLookup::Hit);
        }
        holds
    }

    fn invalidate(&self, keys: impl IntoIterator<Item = String>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for key in keys {
            self.values.invalidate(&key);
            self.metrics.invalidations.increment(1);
        }
    }

    /// Empties the cache and stops answering from it until [`Self::go_live`].
    fn go_dark(&self) {
        self.live.store(false, Ordering::Release);
        self.metrics.live.set(0.0);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.values.invalidate_all();
    }

    /// Tracking was (re)started: whatever is cached may have missed invalidations, so it
    /// starts empty.
    fn go_live(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.values.invalidate_all();
        self.live.store(true, Ordering::Release);
        self.metrics.live.set(1.0);
    }

    pub fn entries(&self) -> u64 {
        self.values.entry_count()
    }
}

/// Connects the dedicated RESP3 tracking client. It is separate from the lookup pool: fred
/// pools cannot track, and BCAST tracking needs no reads on the tracking connection.
pub fn tracking_client(settings: &PoolSettings) -> Result<Client, StoreError> {
    let mut config = crate::redis::client_config(settings)?;
    config.version = RespVersion::RESP3;
    config.fail_fast = false;
    Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = settings.connect_timeout)
        .set_policy(crate::redis::reconnect_policy())
        .build()
        .map_err(|e| StoreError::Other(format!("REDIS_URL: {e}")))
}

/// `CLIENT TRACKING ON BCAST PREFIX <prefix>` on every connection that can see a write: the
/// one Redis, or each master of a Cluster. (fred's own `start_tracking` sends BCAST to one
/// cluster node only, and writes to the other shards would never be pushed.)
async fn start_bcast_tracking(client: &Client, prefix: &str) -> Result<(), Error> {
    if !client.is_clustered() {
        return client
            .start_tracking(prefix, true, false, false, false)
            .await;
    }
    let masters = client
        .cached_cluster_state()
        .map(|state| state.unique_primary_nodes())
        .unwrap_or_default();
    if masters.is_empty() {
        return Err(Error::new(
            ErrorKind::Cluster,
            "no cluster masters known yet",
        ));
    }
    for master in masters {
        let command = CustomCommand::new_static("CLIENT", ClusterHash::Random, false);
        let args = vec!["TRACKING", "ON", "BCAST", "PREFIX", prefix];
        let _: fred::types::Value = client
            .with_cluster_node(&master)
            .custom(command, args)
            .await?;
    }
    Ok(())
}

/// Keeps `cache` live while Redis pushes invalidations for `prefix`, and dark otherwise.
/// Runs for the life of the process.
pub async fn track_forever(client: Client, cache: Arc<TrackedCache>, prefix: String) {
    let _connection = client.connect();
    let mut invalidations = client.invalidation_rx();
    let mut reconnects = client.reconnect_rx();
    let mut errors = client.error_rx();
    let mut cluster_changes = client.cluster_change_rx();
    loop {
        cache.go_dark();
        if client.wait_for_connect().await.is_err() {
            tokio::time::sleep(PING_INTERVAL).await;
            continue;
        }
        // OFF first: after a failed ping the connection may still have the old registration,
        // and Redis refuses a prefix that overlaps one already registered.
        let restart = async {
            let _: Result<(), _> = client.stop_tracking().await;
            start_bcast_tracking(&client, &prefix).await
        };
        // Bounded: commands wait for a reconnect, and the loop must get to try again.
        let started = tokio::time::timeout(PING_INTERVAL * 4, restart)
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "CLIENT TRACKING timed out")));
        if let Err(error) = started {
            warn!(%error, "revocation cache: CLIENT TRACKING failed; reading Redis for every Check");
            tokio::time::sleep(PING_INTERVAL).await;
            continue;
        }
        // Events from before tracking was on are moot: the cache starts empty now.
        invalidations = invalidations.resubscribe();
        reconnects = reconnects.resubscribe();
        errors = errors.resubscribe();
        cluster_changes = cluster_changes.resubscribe();
        cache.go_live();
        info!("revocation cache live: Redis pushes invalidations");
        let mut ping = tokio::time::interval(PING_INTERVAL);
        loop {
            tokio::select! {
                invalidation = invalidations.recv() => match invalidation {
                    Ok(invalidation) => cache.invalidate(
                        invalidation.keys.iter().filter_map(|k| k.as_str().map(str::to_owned)),
                    ),
                    Err(RecvError::Lagged(missed)) => {
                        warn!(missed, "revocation cache: invalidations lagged; starting over");
                        break;
                    }
                    Err(RecvError::Closed) => {
                        cache.go_dark();
                        return;
                    }
                },
                _ = reconnects.recv() => {
                    warn!("revocation cache: tracking connection reconnected; starting over");
                    break;
                }
                _ = cluster_changes.recv() => {
                    // A failover or slot move: the client now talks to a master that has
                    // not been asked to track (BCAST tracking is per connection).
                    warn!("revocation cache: Redis Cluster changed; starting over");
                    break;
                }
                _ = errors.recv() => {
                    // The connection closed or failed: pushes may be lost from here on.
                    warn!("revocation cache: tracking connection lost; bypassing the cache");
                    break;
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(PING_INTERVAL, client.ping::<String>(None)).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        warn!("revocation cache: tracking connection not answering; bypassing the cache");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn live_cache(ttl: Duration) -> Arc<TrackedCache> {
        let metrics = Metrics::new(&[]).revocation_cache.clone();
        let cache = TrackedCache::new(100, ttl, metrics);
        cache.go_live();
        cache
    }

    fn keys() -> Vec<String> {
        vec!["revoked:jti:a".into(), "revoked:sub:b".into()]
    }

    /// A stamp of an answer read now, through a fill and through a hit.
    fn stamps(cache: &TrackedCache) -> (AnswerStamp, AnswerStamp) {
        let Cached::Miss(epoch) = cache.get(&keys()) else {
            panic!("empty cache")
        };
        let filled = cache.fill(epoch, &keys(), &[None, Some("5".into())]);
        let Cached::Hit(values, hit) = cache.get(&keys()) else {
            panic!("filled")
        };
        assert_eq!(values, vec![None, Some(Arc::from("5"))]);
        (filled, hit)
    }

    #[test]
    fn a_stamp_holds_until_any_invalidation_flush_or_ttl() {
        let cache = live_cache(Duration::from_secs(60));
        let now = i64::from(unix_seconds());
        let (filled, hit) = stamps(&cache);
        for stamp in [filled, hit] {
            assert_ne!(stamp, AnswerStamp::NONE);
            assert!(cache.still_holds(stamp, now));
            assert!(cache.still_holds(stamp, now + 59), "within the TTL");
            assert!(!cache.still_holds(stamp, now + 61), "past the TTL");
        }

        // An invalidation of any key, not only the token's own, ends every stamp.
        cache.invalidate(["revoked:jti:someone-else".to_string()]);
        assert!(!cache.still_holds(filled, now));
        assert!(!cache.still_holds(hit, now));

        // The token's own keys are still cached: read again, they carry the new epoch.
        let Cached::Hit(_, again) = cache.get(&keys()) else {
            panic!("only another key was invalidated")
        };
        assert!(cache.still_holds(again, now));
        cache.go_dark();
        assert!(!cache.still_holds(again, now), "not while tracking is down");
        cache.go_live();
        assert!(!cache.still_holds(again, now), "nor after it restarts");
        assert!(!cache.still_holds(AnswerStamp::NONE, now));
    }

    #[test]
    fn a_fill_raced_by_an_invalidation_gives_no_stamp() {
        let cache = live_cache(Duration::from_secs(60));
        let Cached::Miss(epoch) = cache.get(&keys()) else {
            panic!("empty cache")
        };
        cache.invalidate(["revoked:jti:a".to_string()]);
        let stamp = cache.fill(epoch, &keys(), &[None, None]);
        assert_eq!(stamp, AnswerStamp::NONE);
        assert!(matches!(cache.get(&keys()), Cached::Miss(_)), "nor values");
    }

    #[test]
    fn a_hit_is_stamped_with_its_oldest_value() {
        let cache = live_cache(Duration::from_secs(60));
        let now = i64::from(unix_seconds());
        let Cached::Miss(epoch) = cache.get(&keys()[..1]) else {
            panic!("empty cache")
        };
        cache.fill(epoch, &keys()[..1], &[None]);
        // Stored 30 s later than the first key: the pair's stamp ends with the first.
        let older = cache.values.get(&keys()[0]).unwrap().until;
        cache.values.insert(
            keys()[1].clone(),
            Stored {
                value: None,
                until: older + 30,
            },
        );
        let Cached::Hit(_, stamp) = cache.get(&keys()) else {
            panic!("both cached")
        };
        assert_eq!(stamp.until(), older);
        assert!(!cache.still_holds(stamp, i64::from(older)));
        assert!(cache.still_holds(stamp, now));
    }
}
