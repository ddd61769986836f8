//! The Redis backend: revocations shared by every replica, read through a fred pool.
//!
//! Key layout (prefix `REVOKED_KEY_PREFIX`, default `revoked:`):
//! - `revoked:jti:<jti>` exists: that token is revoked. Expires at the token's `exp` + leeway.
//! - `revoked:sub:<iss>:<sub>` = unix time: every token of the subject with `iat` <= it is revoked.
//! - `revoked:sid:<iss>:<sid>` = unix time: the same for a session.
//!
//! In `<sub>` and `<sid>`, `%` is written `%25` and `:` is written `%3A`, so the last `:` of a
//! key always ends the issuer: `https://idp` + `8443:x` and `https://idp:8443` + `x` are two
//! keys, not one. An identifier with neither character keeps the key older versions (and the
//! Go service) wrote.
//!
//! One Check reads the (up to three) keys its token has in one round trip: one `MGET` on a
//! single Redis (standalone or behind Sentinel). On a Cluster the keys hash to different
//! slots (no hash tag, so revocations spread over every shard instead of loading one), and
//! `MGET` would fail with CROSSSLOT: there each key is one `GET`, all sent at once, so a Check
//! costs at most one round trip per shard involved, in parallel. (A hash-tag prefix such as
//! `{revoked}:` puts every key in one slot, so a Check is one `MGET` again, but one shard
//! then carries every lookup of the fleet; BENCHMARKS.md measures both.) fred multiplexes and
//! pipelines commands from concurrent Checks on each connection, so a small pool carries high
//! concurrency; the pool round-robins over connected clients.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};
use fred::types::{Expiration, SetOptions};
use tracing::{debug, info, warn};

use super::tracking::{AnswerStamp, Cached, TrackedCache, track_forever, tracking_client};
use super::{Revocation, RevocationStore, RevocationTarget, Revoked, TokenIdentity};
use crate::breaker::{Breaker, BreakerState};
use crate::metrics::RevocationCacheMetrics;
use crate::redis::{PoolSettings, StoreError, connect_pool};

/// How many revocations one pipeline carries when writing in bulk.
const WRITE_BATCH: usize = 1000;

/// The Redis backend's settings: the shared pool's, and what is the backend's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub pool: PoolSettings,
    pub key_prefix: String,
    /// How long a subject/session revocation is kept: the longest lifetime of a token.
    pub subject_ttl: Duration,
    /// Revocation keys held in-process, kept true by Redis's invalidation pushes; 0 disables.
    pub cache_max_entries: u64,
    /// Longest a cached value is used without being read again (a net under the pushes).
    pub cache_ttl: Duration,
}

/// `revoke --wait-replicas`: after writing, wait until this many replicas have the writes
/// (Redis `WAIT`), at most `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

/// Which key of a Check's MGET a reply belongs to.
#[derive(Debug, Clone, Copy)]
enum KeyKind {
    Token,
    Subject,
    Session,
}

pub struct RedisStore {
    pool: Pool,
    prefix: String,
    lookup_options: Options,
    lookup_timeout: Duration,
    breaker: Breaker,
    subject_ttl: Duration,
    /// Why the pool was not connected when startup stopped waiting (see [`crate::redis::StartedPool`]).
    connect_error: Option<String>,
    /// A Redis Cluster: `wait` asks each master written to.
    clustered: bool,
    /// A Cluster with keys spread over slots (no hash tag in the prefix): a Check's keys are
    /// read one `GET` each, sent together. Otherwise one `MGET` (see the module doc).
    read_per_key: bool,
    /// `None`: every lookup reads Redis.
    cache: Option<Arc<TrackedCache>>,
}

impl RedisStore {
    /// Builds the pool and starts connecting (see [`connect_pool`]): a Redis that is down is
    /// not an error, only a URL fred cannot use is.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let started = connect_pool(&settings.pool).await?;
        let pool = started.pool;
        let clustered = pool.next().is_clustered();
        let one_slot = crate::redis::has_hash_tag(&settings.key_prefix);
        if clustered && one_slot {
            warn!(
                prefix = %settings.key_prefix,
                "REVOKED_KEY_PREFIX has a hash tag: every revocation key lands in one slot, so \
                 one shard carries every lookup; the default prefix spreads them over the cluster"
            );
        }
        if started.not_connected.is_none() {
            match read_persistence(pool.next()).await {
                Persistence::Off => warn!(
                    "the revocation Redis persists nothing (appendonly no, save \"\"): a \
                     restart forgets every revocation and those tokens work again; turn on AOF \
                     (appendonly yes, appendfsync everysec) or RDB snapshots"
                ),
                Persistence::Unknown => {
                    debug!(
                        "Redis persistence not checked: CONFIG GET not permitted or not answered"
                    )
                }
                Persistence::On => {}
            }
        }
        Ok(RedisStore {
            connect_error: started.not_connected,
            clustered,
            read_per_key: clustered && !one_slot,
            pool,
            prefix: settings.key_prefix.clone(),
            lookup_options: settings.pool.check_call_options(),
            lookup_timeout: settings.pool.lookup_timeout,
            breaker: settings.pool.breaker(),
            subject_ttl: settings.subject_ttl,
            cache: None,
        })
    }

    /// Turns the revocation cache on (unless `cache_max_entries` is 0) and returns the task
    /// that keeps it true, for the caller to run for the life of the store.
    pub fn start_cache(
        &mut self,
        settings: &RedisSettings,
        metrics: RevocationCacheMetrics,
    ) -> Result<Option<impl Future<Output = ()> + Send + 'static>, StoreError> {
        if settings.cache_max_entries == 0 {
            return Ok(None);
        }
        let client = tracking_client(&settings.pool)?;
        let cache = TrackedCache::new(settings.cache_max_entries, settings.cache_ttl, metrics);
        self.cache = Some(cache.clone());
        Ok(Some(track_forever(client, cache, self.prefix.clone())))
    }

    /// Whether lookups are being answered from the cache right now.
    pub fn cache_live(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.is_live())
    }

    /// Why the pool had no connection when startup stopped waiting for it; `None` if it had.
    pub fn connect_error(&self) -> Option<String> {
        self.connect_error.clone()
    }

    /// Whether the Redis keeps revocations across a restart (read with `CONFIG GET`; startup
    /// warns when it does not).
    pub async fn persistence(&self) -> Persistence {
        read_persistence(self.pool.next()).await
    }

    /// How many pool connections are up.
    pub fn connected(&self) -> usize {
        self.pool
            .clients()
            .iter()
            .filter(|c| c.is_connected())
            .count()
    }

    /// The pool, for other Redis users (the rate limiter) to ride.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    fn key(&self, kind: KeyKind, issuer: &str, id: &str) -> String {
        match kind {
            KeyKind::Token => format!("{}jti:{id}", self.prefix),
            KeyKind::Subject => format!("{}sub:{issuer}:{}", self.prefix, key_part(id)),
            KeyKind::Session => format!("{}sid:{issuer}:{}", self.prefix, key_part(id)),
        }
    }

    /// Writes revocations in pipelines of up to 1,000 commands, all on one connection, then,
    /// with `wait`, asks each Redis written to how many replicas have them (`WAIT`). Returns
    /// the fewest replicas any of them reached; `None` when not asked to wait.
    pub async fn write(
        &self,
        revocations: &[Revocation],
        leeway_seconds: i64,
        wait: Option<ReplicaWait>,
    ) -> Result<Option<u32>, StoreError> {
        // One client throughout: WAIT counts the writes made on its own connection (on a
        // Cluster, on its connection to each shard).
        let client = self.pool.next_connected();
        let mut keys = Vec::with_capacity(revocations.len());
        for batch in revocations.chunks(WRITE_BATCH) {
            let pipeline = client.pipeline();
            for revocation in batch {
                let (key, value, expiration) = match revocation {
                    Revocation::Token { jti, expires_at } => (
                        self.key(KeyKind::Token, "", jti),
                        "1".to_owned(),
                        Expiration::EXAT(expires_at.saturating_add(leeway_seconds)),
                    ),
                    Revocation::Subject {
                        issuer,
                        subject,
                        revoked_at,
                    } => (
                        self.key(KeyKind::Subject, issuer, subject),
                        revoked_at.to_string(),
                        Expiration::EX(self.subject_ttl_secs()),
                    ),
                    Revocation::Session {
                        issuer,
                        session,
                        revoked_at,
                    } => (
                        self.key(KeyKind::Session, issuer, session),
                        revoked_at.to_string(),
                        Expiration::EX(self.subject_ttl_secs()),
                    ),
                };
                if wait.is_some() && self.clustered {
                    keys.push(key.clone());
                }
                let () = pipeline
                    .set(key, value, Some(expiration), None, false)
                    .await
                    .map_err(|e| StoreError::from(&e))?;
            }
            let replies: Vec<Value> = pipeline.all().await.map_err(|e| StoreError::from(&e))?;
            if replies.len() != batch.len() {
                return Err(StoreError::Other(format!(
                    "{} of {} writes acknowledged",
                    replies.len(),
                    batch.len()
                )));
            }
        }
        let Some(wait) = wait else { return Ok(None) };
        let timeout_ms = wait.timeout.as_millis().min(i64::MAX as u128) as i64;
        let replicas = i64::from(wait.replicas);
        let mut fewest = u32::MAX;
        for node in self.nodes_written(client, &keys) {
            let asked = async {
                match &node {
                    Some(server) => {
                        let on_node = client.with_cluster_node(server);
                        on_node.wait::<i64>(replicas, timeout_ms).await
                    }
                    None => client.wait::<i64>(replicas, timeout_ms).await,
                }
            };
            // The command's own timeout must outlast WAIT's.
            let reached = tokio::time::timeout(wait.timeout + Duration::from_secs(5), asked)
                .await
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "WAIT timed out")))
                .map_err(|e| StoreError::from(&e))?;
            fewest = fewest.min(u32::try_from(reached.max(0)).unwrap_or(u32::MAX));
        }
        Ok(Some(if fewest == u32::MAX { 0 } else { fewest }))
    }

    /// The masters `keys` live on, on a Cluster (from fred's cached slot map); one `None` for
    /// a single Redis.
    fn nodes_written(
        &self,
        client: &Client,
        keys: &[String],
    ) -> Vec<Option<fred::types::config::Server>> {
        if !self.clustered {
            return vec![None];
        }
        // No slot map: no master can be asked for the writes it took, so nothing is confirmed
        // (reported as 0 replicas: `revoke` exits 1, the safe direction).
        let Some(state) = client.cached_cluster_state() else {
            return Vec::new();
        };
        let mut servers: Vec<fred::types::config::Server> = Vec::new();
        for key in keys {
            let slot = fred::util::redis_keyslot(key.as_bytes());
            if let Some(server) = state.get_server(slot)
                && !servers.contains(server)
            {
                servers.push(server.clone());
            }
        }
        servers.into_iter().map(Some).collect()
    }

    fn subject_ttl_secs(&self) -> i64 {
        self.subject_ttl.as_secs().max(1) as i64
    }

    /// `SET key 1 NX EX ttl`: true when this call created the key, false when it existed.
    /// One round trip; every replica sharing the Redis sees the same answer (back-channel
    /// logout's shared `jti` replay check).
    pub async fn claim_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = ttl.as_secs().max(1) as i64;
        let reply: Option<String> = self
            .pool
            .set(
                key,
                "1",
                Some(Expiration::EX(ttl)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(|e| StoreError::from(&e))?;
        Ok(reply.is_some())
    }

    /// Deletes a key [`Self::claim_once`] created, so a request that failed after claiming it
    /// can be retried.
    pub async fn release(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = self.pool.del(key).await.map_err(|e| StoreError::from(&e))?;
        Ok(())
    }

    /// Deletes a revocation; returns whether it existed.
    pub async fn remove(&self, target: &RevocationTarget) -> Result<bool, StoreError> {
        let key = match target {
            RevocationTarget::Token { jti } => self.key(KeyKind::Token, "", jti),
            RevocationTarget::Subject { issuer, subject } => {
                self.key(KeyKind::Subject, issuer, subject)
            }
            RevocationTarget::Session { issuer, session } => {
                self.key(KeyKind::Session, issuer, session)
            }
        };
        let deleted: i64 = self.pool.del(key).await.map_err(|e| StoreError::from(&e))?;
        Ok(deleted > 0)
    }
}

impl RevocationStore for RedisStore {
    async fn lookup_stamped(
        &self,
        token: &TokenIdentity<'_>,
    ) -> Result<(Option<Revoked>, AnswerStamp), StoreError> {
        let wanted = [
            (KeyKind::Token, token.jti),
            (KeyKind::Subject, token.subject),
            (KeyKind::Session, token.session),
        ];
        let mut kinds = Vec::with_capacity(3);
        let mut keys = Vec::with_capacity(3);
        for (kind, id) in wanted {
            if let Some(id) = id {
                kinds.push(kind);
                keys.push(self.key(kind, token.issuer, id));
            }
        }
        if keys.is_empty() {
            return Ok((None, AnswerStamp::NONE));
        }
        let epoch = match self.cache.as_ref().map(|cache| cache.get(&keys)) {
            Some(Cached::Hit(values, stamp)) => {
                let revoked = judge(token, &kinds, values.iter().map(|v| v.as_deref()));
                return Ok((revoked, stamp));
            }
            Some(Cached::Miss(epoch)) => Some(epoch),
            Some(Cached::Bypass) | None => None,
        };
        let values = self.read(&keys).await?;
        let stamp = match (&self.cache, epoch) {
            (Some(cache), Some(epoch)) => cache.fill(epoch, &keys, &values),
            _ => AnswerStamp::NONE,
        };
        let revoked = judge(token, &kinds, values.iter().map(|v| v.as_deref()));
        Ok((revoked, stamp))
    }

    fn still_holds(&self, stamp: AnswerStamp, now: i64) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|cache| cache.still_holds(stamp, now))
    }
}

impl RedisStore {
    /// One MGET of `keys` under the lookup budget and the breaker.
    async fn read(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if !self.breaker.admit() {
            return Err(StoreError::BreakerOpen);
        }
        let client = self
            .pool
            .next_connected()
            .with_options(&self.lookup_options);
        // fred's own timeout is the real one; this outer bound only guards against a reply
        // path that never resolves. Boxed: fred's command future is ~7 KB, and inline it made
        // every Check's future that size, copied on each move even when no Redis call is made
        // (a revocation-cache hit, the memory backend). A box costs only the calls that go out.
        let read: std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>> = if self.read_per_key {
            Box::pin(get_each(client, keys))
        } else {
            Box::pin(client.mget::<Vec<Option<String>>, _>(keys.to_vec()))
        };
        let reply = tokio::time::timeout(self.lookup_timeout * 2, read)
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "lookup timed out")));
        self.record(reply.is_ok());
        reply.map_err(|e| StoreError::from(&e))
    }

    /// [`Self::claim_once`] on a Check's path (the DPoP replay check): within the lookup
    /// budget and behind the circuit breaker, like a lookup, so a dead Redis costs a Check
    /// microseconds once the breaker is open rather than a write timeout each.
    pub async fn claim_once_for_check(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        if !self.breaker.admit() {
            return Err(StoreError::BreakerOpen);
        }
        let ttl = ttl.as_secs().max(1) as i64;
        let client = self
            .pool
            .next_connected()
            .with_options(&self.lookup_options);
        // Boxed for the reason `read` gives: fred's future would make every Check's that size.
        let claim: std::pin::Pin<
            Box<dyn Future<Output = Result<Option<String>, Error>> + Send + '_>,
        > = Box::pin(client.set(
            key,
            "1",
            Some(Expiration::EX(ttl)),
            Some(SetOptions::NX),
            false,
        ));
        let reply = tokio::time::timeout(self.lookup_timeout * 2, claim)
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "claim timed out")));
        self.record(reply.is_ok());
        reply
            .map(|created| created.is_some())
            .map_err(|e| StoreError::from(&e))
    }

    /// One Check-path call's outcome, to the breaker; its state changes, to the log.
    fn record(&self, ok: bool) {
        match self.breaker.record(ok) {
            Some(BreakerState::Open) => warn!("Redis lookups failing; circuit breaker open"),
            Some(BreakerState::Closed) => {
                info!("Redis lookups succeeding again; circuit breaker closed")
            }
            _ => {}
        }
    }
}

/// Whether the revocation Redis keeps its data across a restart, as far as it tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// AOF or RDB snapshots are on.
    On,
    /// Neither: a restart forgets every revocation, and those tokens work again.
    Off,
    /// `CONFIG GET` is not permitted (managed services forbid it) or not answered: they
    /// persist by their own rules, which is not an error.
    Unknown,
}

async fn read_persistence(client: &Client) -> Persistence {
    let config_get = |name: &'static str| {
        let command = CustomCommand::new_static("CONFIG", ClusterHash::Random, false);
        client.custom::<Vec<String>, _>(command, vec!["GET", name])
    };
    let read = async { (config_get("appendonly").await, config_get("save").await) };
    match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok((Ok(appendonly), Ok(save))) => {
            let aof = appendonly.get(1).is_some_and(|v| v == "yes");
            let snapshots = save.get(1).is_some_and(|v| !v.trim().is_empty());
            if aof || snapshots {
                Persistence::On
            } else {
                Persistence::Off
            }
        }
        _ => Persistence::Unknown,
    }
}

/// Up to three keys (a token's `jti`, subject and session), one `GET` each, all sent before
/// any reply is awaited: on a Cluster, each goes to its own shard in parallel.
async fn get_each<C: KeysInterface + Sync>(
    client: C,
    keys: &[String],
) -> Result<Vec<Option<String>>, Error> {
    let get = |i: usize| {
        let client = &client;
        async move {
            match keys.get(i) {
                Some(key) => client
                    .get::<Option<String>, _>(key.as_str())
                    .await
                    .map(Some),
                None => Ok(None),
            }
        }
    };
    debug_assert!(keys.len() <= 3, "a token has at most three revocation keys");
    let (first, second, third) = tokio::try_join!(get(0), get(1), get(2))?;
    Ok([first, second, third]
        .into_iter()
        .take(keys.len())
        .map(Option::flatten)
        .collect())
}

/// The last part of a key that follows another part: `%` and `:` percent-encoded, so the
/// part holds no `:` and the key splits back one way only. Borrowed when there is nothing to
/// encode (almost every identifier), so a lookup allocates nothing more.
pub(crate) fn key_part(id: &str) -> std::borrow::Cow<'_, str> {
    if !id.contains([':', '%']) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut encoded = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => encoded.push_str("%25"),
            ':' => encoded.push_str("%3A"),
            c => encoded.push(c),
        }
    }
    std::borrow::Cow::Owned(encoded)
}

/// Whether the values of a token's keys (in `kinds` order; `None`: no such key) revoke it.
fn judge<'v>(
    token: &TokenIdentity<'_>,
    kinds: &[KeyKind],
    values: impl Iterator<Item = Option<&'v str>>,
) -> Option<Revoked> {
    for (kind, value) in kinds.iter().zip(values) {
        let Some(value) = value else { continue };
        let cut_revokes = || match value.trim().parse::<i64>() {
            Ok(cut) => token.issued_at.is_none_or(|iat| iat <= cut),
            // A cut-off we cannot read is treated as "revoke everything": never un-revoke
            // because of a bad write.
            Err(_) => {
                warn!(kind = ?kind, "unreadable revocation cut-off in Redis; treating as revoked");
                true
            }
        };
        match kind {
            KeyKind::Token => return Some(Revoked::Token),
            KeyKind::Subject if cut_revokes() => return Some(Revoked::Subject),
            KeyKind::Session if cut_revokes() => return Some(Revoked::Session),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::key_part;

    #[test]
    fn hash_tags_are_found_only_when_they_pin_a_slot() {
        use crate::redis::has_hash_tag;
        assert!(has_hash_tag("{revoked}:"));
        assert!(has_hash_tag("app:{r}:"));
        assert!(!has_hash_tag("revoked:"));
        assert!(
            !has_hash_tag("{}revoked:"),
            "an empty tag hashes the whole key"
        );
        assert!(!has_hash_tag("revoked{:"));
    }

    #[test]
    fn key_parts_hold_no_colon_and_keep_plain_identifiers() {
        assert_eq!(key_part("alice@example.com"), "alice@example.com");
        assert_eq!(key_part("8443:x"), "8443%3Ax");
        assert_eq!(key_part("a%3Ab"), "a%253Ab");
        assert_ne!(key_part("a:b"), key_part("a%3Ab"));
        let joined = |issuer: &str, id: &str| format!("{issuer}:{}", key_part(id));
        assert_ne!(
            joined("https://idp", "8443:x"),
            joined("https://idp:8443", "x")
        );
    }
}
