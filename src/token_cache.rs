//! Verified tokens, so a token seen again skips parsing and the signature check (~35-90 µs)
//! for a SHA-256 and a lookup (~1 µs).
//!
//! What a hit still does, every time: the time rules (`exp`, `nbf`, `iat` against now), the
//! route's audiences and scopes, a check that the signing key is still in the issuer's current
//! key set (a key dropped from the JWKS drops its tokens), and the revocation lookup.
//!
//! Keyed by the token's SHA-256 (32 bytes, not the token string: less memory, cheaper hashing).
//! Bounded by `TOKEN_CACHE_MAX_ENTRIES`; an entry expires at the token's `exp` or after
//! `TOKEN_CACHE_TTL`, whichever comes first.
//!
//! Not moka: moka's own bookkeeping (access and write deques, timer wheel, `Arc`s around key
//! and value) is ~400 bytes per entry whatever the value, which alone put 100,000 tokens near
//! the 64 MiB target (BENCHMARKS.md). Here each shard is a flat array of 64-byte slots swept
//! by a CLOCK hand, and an index of 4-byte slot numbers: ~70 bytes per entry besides the
//! claims. Hits take a shard's read lock (never held across an await; there is none), so
//! concurrent hits do not wait on each other; only inserts write.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use hashbrown::HashTable;
use jsonwebtoken::Algorithm;

use crate::claims::{Claims, KeptClaims};
use crate::keys::VerifyingKey;

/// The token's SHA-256.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    digest_bytes(token.as_bytes())
}

/// SHA-256 of any bytes (also used to recognise an unchanged JWKS document).
pub fn digest_bytes(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What a verification established, enough to decide again without the signature. The
/// issuer is the claims' `iss` (a verified token always has one).
pub struct VerifiedToken {
    pub claims: Arc<Claims>,
    pub alg: Algorithm,
    /// Whether the token named its key by `kid` (then it is `key`'s own kid); kept as a flag,
    /// not a copy of the string, because the key already holds it.
    pub named_kid: bool,
    /// The key that verified it; a hit is valid only while the issuer still serves this key.
    pub key: Arc<VerifyingKey>,
    /// The bits of the stamp of the last "not revoked" answer for this token
    /// (`revocation::AnswerStamp`; 0: none). The cache only keeps it, for the authorizer.
    pub revocation_stamp: u64,
}

/// Tokens whose signature failed, remembered this long...
const REJECTED_TTL: Duration = Duration::from_secs(60);
/// ...and at most this many: a replayed forgery then costs a hash, not a signature check,
/// while a flood of distinct forgeries only churns a bounded set.
const REJECTED_MAX_ENTRIES: u64 = 10_000;

/// The verified-token cache's settings; `max_entries` 0 disables it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheConfig {
    pub max_entries: u64,
    pub ttl: Duration,
}

pub struct TokenCache {
    shards: Box<[RwLock<Shard>]>,
    /// Cached tokens across the shards, kept at or under `max_entries`.
    len: AtomicUsize,
    max_entries: usize,
    /// A shard's own limit: its share of `max_entries` and some room for an uneven spread.
    shard_capacity: usize,
    /// Upper bound on an entry's life, below the token's own `exp`.
    ttl_seconds: i64,
    kept: KeptClaims,
    /// The negative side: digests of tokens that failed their signature check. Small and
    /// short-lived, so moka's per-entry cost does not matter here.
    rejected: moka::sync::Cache<TokenDigest, ()>,
}

/// One slice of the cache: the entries in a flat array, which the CLOCK hand sweeps, and an
/// index from digest to slot (4 bytes a bucket, where a map holding the digest needs 32 more).
#[derive(Default)]
struct Shard {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    /// The next slot the CLOCK hand looks at when the shard must make room.
    hand: usize,
}

/// A verified token, flattened into 64 bytes (checked below): one cache line per token.
struct Slot {
    digest: TokenDigest,
    claims: Arc<Claims>,
    key: Arc<VerifyingKey>,
    /// [`VerifiedToken::revocation_stamp`], updated under the read lock.
    revocation_stamp: AtomicU64,
    /// Unix seconds: the token's `exp`, or the cache TTL if that comes first. 32 bits (until
    /// 2106), so the slot stays one cache line.
    expires_at: u32,
    alg: Algorithm,
    named_kid: bool,
    /// Set by a hit, cleared when the hand passes: an entry is evicted only after a full turn
    /// without a hit. Atomic, so a hit under the read lock can set it.
    referenced: AtomicBool,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

/// Shards: enough that the tokio workers of a small pod rarely meet on one lock.
const SHARDS: usize = 16;

impl TokenCache {
    /// `None` when `max_entries` is 0: caching disabled.
    pub fn new(max_entries: u64, ttl: Duration) -> Option<Self> {
        if max_entries == 0 {
            return None;
        }
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        let shards = SHARDS.min(max_entries);
        let share = max_entries.div_ceil(shards);
        Some(TokenCache {
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            len: AtomicUsize::new(0),
            max_entries,
            shard_capacity: share.saturating_add(share / 8).min(u32::MAX as usize),
            ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            kept: KeptClaims::All,
            rejected: moka::sync::Cache::builder()
                .max_capacity(REJECTED_MAX_ENTRIES.min(max_entries as u64))
                .time_to_live(REJECTED_TTL)
                .build(),
        })
    }

    /// Cached tokens keep only these claims by name.
    pub fn keeping(self, kept: KeptClaims) -> Self {
        TokenCache { kept, ..self }
    }

    /// What a cached copy of `claims` holds.
    pub fn compact(&self, claims: &Claims, issuer: &Arc<str>) -> Claims {
        self.kept.compact(claims, issuer)
    }

    /// Whether this token failed its signature check within the last minute.
    pub fn was_rejected(&self, digest: &TokenDigest) -> bool {
        self.rejected.contains_key(digest)
    }

    pub fn reject(&self, digest: TokenDigest) {
        self.rejected.insert(digest, ());
    }

    /// The token verified under this digest, unless it has expired by `now` (unix seconds).
    pub fn get(&self, digest: &TokenDigest, now: i64) -> Option<VerifiedToken> {
        let shard = read(self.shard(digest));
        let slot = &shard.slots[shard.find(digest)?];
        if now >= i64::from(slot.expires_at) {
            return None;
        }
        // Load first: a hot entry's cache line is then only read, not written, by each hit.
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        Some(VerifiedToken {
            claims: slot.claims.clone(),
            alg: slot.alg,
            named_kid: slot.named_kid,
            key: slot.key.clone(),
            revocation_stamp: slot.revocation_stamp.load(Ordering::Relaxed),
        })
    }

    /// Keeps `stamp` with the token cached under `digest`, if it still is.
    pub fn keep_revocation_stamp(&self, digest: &TokenDigest, stamp: u64) {
        let shard = read(self.shard(digest));
        if let Some(at) = shard.find(digest) {
            shard.slots[at]
                .revocation_stamp
                .store(stamp, Ordering::Relaxed);
        }
    }

    /// Caches a verified token until its `exp` or the TTL, whichever is first. When the cache
    /// is full, an entry that went a full turn of the clock without a hit makes room.
    pub fn insert(&self, digest: TokenDigest, token: VerifiedToken, now: i64) {
        let expires_at = token
            .claims
            .exp
            .unwrap_or(now)
            .min(now.saturating_add(self.ttl_seconds));
        if expires_at <= now {
            return;
        }
        let expires_at = u32::try_from(expires_at).unwrap_or(u32::MAX);
        let slot = Slot {
            digest,
            claims: token.claims,
            key: token.key,
            revocation_stamp: AtomicU64::new(token.revocation_stamp),
            expires_at,
            alg: token.alg,
            named_kid: token.named_kid,
            referenced: AtomicBool::new(false),
        };
        let mut shard = write(self.shard(&digest));
        if let Some(at) = shard.find(&digest) {
            // Verified again (it had expired here, or its key changed): same place in the clock.
            shard.slots[at] = slot;
            return;
        }
        // `len` is counted up only when the shard has room, so the global bound holds however
        // inserts race; a replacement takes the count back, since the total does not change.
        let full = shard.slots.len() >= self.shard_capacity
            || self.len.fetch_add(1, Ordering::Relaxed) >= self.max_entries;
        if full && !shard.slots.is_empty() {
            if shard.slots.len() < self.shard_capacity {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            shard.replace_one(slot, now);
        } else {
            shard.push(slot, self.shard_capacity);
        }
    }

    /// Number of cached tokens, expired ones not yet replaced included (for the metrics scrape).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, digest: &TokenDigest) -> &RwLock<Shard> {
        &self.shards[usize::from(digest[31]) % self.shards.len()]
    }
}

/// The index's hash: the digest's first 8 bytes. It is already a SHA-256, and only tokens
/// that passed their signature get in, so nobody can choose digests to crowd a bucket.
fn bucket_hash(digest: &TokenDigest) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Shard {
    fn find(&self, digest: &TokenDigest) -> Option<usize> {
        self.index
            .find(bucket_hash(digest), |&at| {
                self.slots[at as usize].digest == *digest
            })
            .map(|&at| at as usize)
    }

    fn push(&mut self, slot: Slot, capacity: usize) {
        if self.slots.len() == self.slots.capacity() {
            // Doubling, but never past the shard's limit: a full cache wastes no slots.
            let more = self
                .slots
                .capacity()
                .max(16)
                .min(capacity - self.slots.len());
            self.slots.reserve_exact(more);
        }
        let at = self.slots.len() as u32;
        let slots = &self.slots;
        self.index
            .insert_unique(bucket_hash(&slot.digest), at, |&i| {
                bucket_hash(&slots[i as usize].digest)
            });
        self.slots.push(slot);
    }

    /// CLOCK: the hand gives each referenced entry a second chance and replaces the first one
    /// that has none (or has expired). Ends within two turns: the first clears every bit.
    fn replace_one(&mut self, slot: Slot, now: i64) {
        loop {
            let at = self.hand % self.slots.len();
            self.hand = at + 1;
            let victim = &self.slots[at];
            if now < i64::from(victim.expires_at)
                && victim.referenced.swap(false, Ordering::Relaxed)
            {
                continue;
            }
            let (old, new) = (bucket_hash(&victim.digest), bucket_hash(&slot.digest));
            if let Ok(entry) = self.index.find_entry(old, |&i| i as usize == at) {
                entry.remove();
            }
            self.slots[at] = slot;
            let slots = &self.slots;
            self.index
                .insert_unique(new, at as u32, |&i| bucket_hash(&slots[i as usize].digest));
            return;
        }
    }
}

/// The locks guard a shard that no code path leaves half-updated, so a poisoned lock (a panic
/// elsewhere while holding it) still guards a consistent shard: use it, never panic here.
fn read(lock: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(lock: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

// Minting test tokens needs the development keys (the `tools` feature).
#[cfg(all(test, feature = "tools"))]
mod tests {
    use super::*;
    use crate::tools::devkeys::SigningKey;

    const NOW: i64 = 1_700_000_000;

    fn key() -> Arc<VerifyingKey> {
        let signing = SigningKey::generate(Algorithm::ES256, "k").unwrap();
        let jwk = serde_json::from_value(signing.jwk().unwrap()).unwrap();
        Arc::new(VerifyingKey::from_jwk(&jwk).unwrap())
    }

    fn token(key: &Arc<VerifyingKey>, sub: &str, exp: i64) -> VerifiedToken {
        VerifiedToken {
            claims: Arc::new(Claims {
                sub: Some(sub.into()),
                exp: Some(exp),
                ..Claims::default()
            }),
            alg: Algorithm::ES256,
            named_kid: true,
            key: key.clone(),
            revocation_stamp: 0,
        }
    }

    fn digest_of(n: usize) -> TokenDigest {
        digest(&format!("token-{n}"))
    }

    /// A cache of one shard, so the clock order is the insertion order.
    fn one_shard(capacity: usize) -> TokenCache {
        TokenCache {
            shards: vec![RwLock::default()].into(),
            shard_capacity: capacity,
            ..TokenCache::new(capacity as u64, Duration::from_secs(300)).unwrap()
        }
    }

    fn sub_of(hit: Option<VerifiedToken>) -> Option<String> {
        hit.and_then(|t| t.claims.sub.as_deref().map(str::to_owned))
    }

    #[test]
    fn an_entry_lives_until_exp_or_the_ttl_whichever_is_first() {
        let cache = TokenCache::new(100, Duration::from_secs(300)).unwrap();
        let key = key();
        cache.insert(digest_of(1), token(&key, "short", NOW + 60), NOW);
        cache.insert(digest_of(2), token(&key, "long", NOW + 3600), NOW);
        assert_eq!(
            sub_of(cache.get(&digest_of(1), NOW + 59)).as_deref(),
            Some("short")
        );
        assert!(cache.get(&digest_of(1), NOW + 60).is_none(), "past exp");
        assert_eq!(
            sub_of(cache.get(&digest_of(2), NOW + 299)).as_deref(),
            Some("long")
        );
        assert!(
            cache.get(&digest_of(2), NOW + 300).is_none(),
            "past the TTL"
        );
        cache.insert(digest_of(3), token(&key, "expired", NOW), NOW);
        assert!(cache.get(&digest_of(3), NOW).is_none());
        assert_eq!(cache.len(), 2, "an expired token is not stored");
    }

    #[test]
    fn never_holds_more_than_max_entries() {
        let cache = TokenCache::new(1000, Duration::from_secs(300)).unwrap();
        let key = key();
        for n in 0..10_000 {
            cache.insert(digest_of(n), token(&key, "u", NOW + 3600), NOW);
            assert!(
                cache.len() <= 1000,
                "{} entries after {n} inserts",
                cache.len()
            );
        }
        let recent = (9_900..10_000)
            .filter(|n| cache.get(&digest_of(*n), NOW).is_some())
            .count();
        assert!(
            recent >= 90,
            "only {recent} of the last 100 inserts are still cached"
        );
    }

    #[test]
    fn a_token_hit_since_the_hand_last_passed_outlives_one_that_was_not() {
        let cache = one_shard(4);
        let key = key();
        for n in 0..4 {
            cache.insert(digest_of(n), token(&key, &n.to_string(), NOW + 3600), NOW);
        }
        assert!(cache.get(&digest_of(0), NOW).is_some());
        cache.insert(digest_of(4), token(&key, "4", NOW + 3600), NOW);
        assert!(
            cache.get(&digest_of(0), NOW).is_some(),
            "hit: given a second chance"
        );
        assert!(
            cache.get(&digest_of(1), NOW).is_none(),
            "oldest without a hit: evicted"
        );
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn an_expired_entry_goes_first_even_when_it_was_hit() {
        let cache = one_shard(2);
        let key = key();
        cache.insert(digest_of(0), token(&key, "0", NOW + 10), NOW);
        cache.insert(digest_of(1), token(&key, "1", NOW + 3600), NOW);
        assert!(cache.get(&digest_of(0), NOW).is_some());
        cache.insert(digest_of(2), token(&key, "2", NOW + 3600), NOW + 20);
        assert!(cache.get(&digest_of(1), NOW + 20).is_some());
        assert!(cache.get(&digest_of(2), NOW + 20).is_some());
    }

    #[test]
    fn verified_again_replaces_the_entry_in_place() {
        let cache = TokenCache::new(10, Duration::from_secs(300)).unwrap();
        let key = key();
        cache.insert(digest_of(0), token(&key, "old", NOW + 10), NOW);
        cache.insert(digest_of(0), token(&key, "new", NOW + 100), NOW + 20);
        assert_eq!(
            sub_of(cache.get(&digest_of(0), NOW + 50)).as_deref(),
            Some("new")
        );
        assert_eq!(cache.len(), 1);
        let slots: usize = cache.shards.iter().map(|s| read(s).slots.len()).sum();
        assert_eq!(slots, 1, "one slot per token");
    }
}
