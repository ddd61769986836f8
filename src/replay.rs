//! "Seen before?" for one-time identifiers (a logout token's `jti`, a DPoP proof's `jti`): in
//! this process always, and in Redis with the Redis backend, so a copy replayed to another
//! replica is refused too.
//!
//! The shared check is one `SET key 1 NX EX window` round trip ([`RedisStore::claim_once`]);
//! what a failed one means (refuse, or rely on the local check) is the caller's policy.

use std::time::Duration;

use moka::sync::Cache;

use crate::revocation::{Backend, RedisStore, StoreError};

/// Identifiers seen within the window.
pub struct ReplayGuard {
    /// A sync moka cache: bounded in size and time, and `entry().or_insert` is atomic, so two
    /// concurrent copies of one identifier cannot both pass. No await happens inside it.
    seen: Cache<[u8; 32], ()>,
    window: Duration,
    /// Prefix of the shared keys in Redis.
    prefix: String,
    /// Claims run on a Check's path: within its budget and behind the breaker.
    on_check_path: bool,
}

/// What the replay check found.
#[derive(Debug)]
pub enum Claimed {
    /// Not seen before, here nor (with Redis) anywhere else.
    First,
    /// Seen within the window.
    Replay,
    /// Not seen here; Redis could not be asked. The local claim stands until
    /// [`ReplayGuard::forget_local`].
    Failed(StoreError),
}

impl ReplayGuard {
    /// `max_entries` identifiers, each remembered for `window`.
    pub fn new(max_entries: u64, window: Duration, prefix: String) -> Self {
        ReplayGuard {
            seen: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(window)
                .build(),
            window,
            prefix,
            on_check_path: false,
        }
    }

    /// Claims in Redis with a Check's budget and breaker ([`RedisStore::claim_once_for_check`])
    /// rather than the write timeout.
    pub fn on_check_path(mut self) -> Self {
        self.on_check_path = true;
        self
    }

    /// How long an identifier is remembered.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The parts hashed, with a zero byte between them: a fixed-size key, and no way for one
    /// tuple of names without zero bytes to read as another. (Logout's keys were made this
    /// way before this module existed; the same bytes keep them the same across an upgrade.)
    pub fn key(parts: &[&str]) -> [u8; 32] {
        let mut all = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                all.push(0);
            }
            all.extend_from_slice(part.as_bytes());
        }
        crate::token_cache::digest_bytes(&all)
    }

    fn redis_key(&self, key: &[u8; 32]) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(self.prefix.len() + 64);
        out.push_str(&self.prefix);
        for byte in key {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }

    /// Claims `key`: locally first (a local replay costs no round trip), then in Redis when
    /// the backend is Redis.
    pub async fn claim(&self, key: [u8; 32], store: Option<&Backend>) -> Claimed {
        if !self.seen.entry(key).or_insert(()).is_fresh() {
            return Claimed::Replay;
        }
        let Some(redis) = shared(store) else {
            return Claimed::First;
        };
        let redis_key = self.redis_key(&key);
        let claimed = match self.on_check_path {
            true => redis.claim_once_for_check(&redis_key, self.window).await,
            // Boxed: fred's command future is ~7 KB, and inline it would make every Check's
            // future that size (copied on each move) though only logouts take this branch.
            false => Box::pin(redis.claim_once(&redis_key, self.window)).await,
        };
        match claimed {
            Ok(true) => Claimed::First,
            Ok(false) => Claimed::Replay,
            Err(error) => Claimed::Failed(error),
        }
    }

    /// Forgets a local claim (the request it came with was not served).
    pub fn forget_local(&self, key: &[u8; 32]) {
        self.seen.invalidate(key);
    }

    /// Forgets a claim here and in Redis, so a retry of the same identifier is not refused.
    pub async fn release(&self, key: [u8; 32], store: Option<&Backend>) -> Result<(), StoreError> {
        self.seen.invalidate(&key);
        match shared(store) {
            Some(redis) => redis.release(&self.redis_key(&key)).await,
            None => Ok(()),
        }
    }
}

fn shared(store: Option<&Backend>) -> Option<&RedisStore> {
    match store {
        Some(Backend::Redis(redis)) => Some(redis),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_passes_once_within_the_window() {
        let guard = ReplayGuard::new(100, Duration::from_secs(60), "p:".into());
        let key = ReplayGuard::key(&["a", "b"]);
        assert!(matches!(guard.claim(key, None).await, Claimed::First));
        assert!(matches!(guard.claim(key, None).await, Claimed::Replay));
        guard.forget_local(&key);
        assert!(matches!(guard.claim(key, None).await, Claimed::First));
        assert_ne!(ReplayGuard::key(&["ab", ""]), ReplayGuard::key(&["a", "b"]));
        let mut logout = b"https://idp".to_vec();
        logout.push(0);
        logout.extend_from_slice(b"j1");
        assert_eq!(
            ReplayGuard::key(&["https://idp", "j1"]),
            crate::token_cache::digest_bytes(&logout),
            "the key logout used before"
        );
        assert_eq!(
            guard.redis_key(&[0xab; 32]),
            format!("p:{}", "ab".repeat(32))
        );
    }
}
