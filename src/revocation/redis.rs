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
//! One Check is one `MGET` of the keys its token has: one round trip, however many keys.
//! fred multiplexes and pipelines commands from concurrent Checks on each connection, so a
//! small pool carries high concurrency; the pool round-robins over connected clients.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;
use fred::types::config::Options;
use tracing::{info, warn};

use super::tracking::{Cached, TrackedCache, track_forever, tracking_client};
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
    /// `None`: every lookup reads Redis.
    cache: Option<Arc<TrackedCache>>,
}

impl RedisStore {
    /// Builds the pool and starts connecting (see [`connect_pool`]): a Redis that is down is
    /// not an error, only a URL fred cannot use is.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let pool = connect_pool(&settings.pool).await?;
        Ok(RedisStore {
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
        let client = tracking_client(&settings.pool.url, settings.pool.connect_timeout)
            .map_err(|e| StoreError::Other(format!("REDIS_URL: {e}")))?;
        let cache = TrackedCache::new(settings.cache_max_entries, settings.cache_ttl, metrics);
        self.cache = Some(cache.clone());
        Ok(Some(track_forever(client, cache, self.prefix.clone())))
    }

    /// Whether lookups are being answered from the cache right now.
    pub fn cache_live(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.is_live())
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

    /// Writes revocations in pipelines of up to 1,000 commands.
    pub async fn write(
        &self,
        revocations: &[Revocation],
        leeway_seconds: i64,
    ) -> Result<(), StoreError> {
        for batch in revocations.chunks(WRITE_BATCH) {
            let pipeline = self.pool.next_connected().pipeline();
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
        Ok(())
    }

    fn subject_ttl_secs(&self) -> i64 {
        self.subject_ttl.as_secs().max(1) as i64
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
    async fn lookup(&self, token: &TokenIdentity<'_>) -> Result<Option<Revoked>, StoreError> {
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
            return Ok(None);
        }
        let epoch = match self.cache.as_ref().map(|cache| cache.get(&keys)) {
            Some(Cached::Hit(values)) => {
                return Ok(judge(token, &kinds, values.iter().map(|v| v.as_deref())));
            }
            Some(Cached::Miss(epoch)) => Some(epoch),
            Some(Cached::Bypass) | None => None,
        };
        let values = self.read(&keys).await?;
        if let (Some(cache), Some(epoch)) = (&self.cache, epoch) {
            cache.fill(epoch, &keys, &values);
        }
        Ok(judge(token, &kinds, values.iter().map(|v| v.as_deref())))
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
        let reply = tokio::time::timeout(
            self.lookup_timeout * 2,
            Box::pin(client.mget::<Vec<Option<String>>, _>(keys.to_vec())),
        )
        .await
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "lookup timed out")));
        match self.breaker.record(reply.is_ok()) {
            Some(BreakerState::Open) => warn!("Redis lookups failing; circuit breaker open"),
            Some(BreakerState::Closed) => {
                info!("Redis lookups succeeding again; circuit breaker closed")
            }
            _ => {}
        }
        reply.map_err(|e| StoreError::from(&e))
    }
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
