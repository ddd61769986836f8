//! Allows remembered by token and route, so a token seen before is allowed again without
//! copying the request into a CheckRequest or turning a CheckResponse into stream changes.
//! The core still judges every reuse (`CheckService::allows_again`: the key, the clock rules,
//! the revocation stamp), and the stream gets the changes that Check answered.
//!
//! Found by the token header's exact bytes: the hash reads only the last bytes (a JWT's
//! signature), which is safe because only allowed tokens get in, so nobody without valid
//! tokens can fill one bucket; a lookup always compares the whole value.

use std::sync::{Arc, Mutex};

use authz_sidecar::check::RepeatableAllow;
use hashbrown::HashTable;

use crate::replay::Replay;

/// Shards, so the workers of a busy Envoy seldom wait on one lock. A std Mutex: it is held only
/// to find, insert or remove an entry, never across a call into Envoy or an await.
const SHARDS: usize = 16;

pub struct AllowMemo {
    shards: Box<[Mutex<HashTable<Slot>>]>,
    per_shard: usize,
}

/// Where an allow is kept: its route and token header beside the entry, not in it, so a lookup
/// loads the header to compare and the entry to reuse at once (most entries have left the
/// CPU's caches by the time their token comes again, and each load is a wait).
struct Slot {
    route: u64,
    header: Box<[u8]>,
    entry: Arc<Remembered>,
}

/// One allow: the core's judgement of it, and what it does to the stream.
pub struct Remembered {
    pub allow: RepeatableAllow,
    pub replay: Replay,
    hash: u64,
}

impl AllowMemo {
    /// Room for `entries` allows in all; `None` for 0 (the memo off).
    pub fn new(entries: usize) -> Option<AllowMemo> {
        (entries > 0).then(|| AllowMemo {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: entries.div_ceil(SHARDS),
        })
    }

    /// The allow remembered for this token header on this route.
    pub fn find(&self, route: u64, header: &[u8]) -> Option<Arc<Remembered>> {
        let hash = hash(route, header);
        let shard = self.shard(hash);
        shard
            .find(hash, |s| s.route == route && *s.header == *header)
            .map(|s| s.entry.clone())
    }

    /// Remembers an allow. A full shard is emptied first: a burst of full Checks, never an
    /// unbounded memo.
    pub fn remember(&self, route: u64, header: &[u8], allow: RepeatableAllow, replay: Replay) {
        let hash = hash(route, header);
        let entry = Arc::new(Remembered {
            allow,
            replay,
            hash,
        });
        let mut shard = self.shard(hash);
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        match shard.find_entry(hash, |s| s.route == route && *s.header == *header) {
            Ok(mut found) => found.get_mut().entry = entry,
            Err(_) => {
                let slot = Slot {
                    route,
                    header: header.into(),
                    entry,
                };
                shard.insert_unique(hash, slot, |s| self::hash(s.route, &s.header));
            }
        }
    }

    /// Forgets an allow the core no longer gives again (expired, revoked, key gone...).
    pub fn forget(&self, stale: &Remembered) {
        let mut shard = self.shard(stale.hash);
        if let Ok(found) = shard.find_entry(stale.hash, |s| std::ptr::eq(&*s.entry, stale)) {
            found.remove();
        }
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, HashTable<Slot>> {
        self.shards[hash as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// The route and the last 32 bytes of the header (or all of a shorter one) and its length,
/// mixed a word at a time.
fn hash(route: u64, header: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let tail = &header[header.len().saturating_sub(32)..];
    let mut h = (route ^ header.len() as u64).wrapping_mul(K);
    for chunk in tail.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = (h.rotate_left(23) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::hash;

    #[test]
    fn the_hash_tells_routes_tails_and_lengths_apart() {
        let token = b"header.payload.signature-bytes-that-differ-at-the-end-0001";
        let mut other = *token;
        other[token.len() - 1] = b'2';
        assert_ne!(hash(1, token), hash(2, token));
        assert_ne!(hash(1, token), hash(1, &other));
        assert_ne!(hash(1, token), hash(1, &token[1..]));
        assert_eq!(hash(1, token), hash(1, token));
        assert_ne!(hash(0, b""), hash(0, b"a"));
    }
}
