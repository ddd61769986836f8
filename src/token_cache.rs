//! Verified tokens, so a token seen again skips parsing and the signature check (~35-90 µs)
//! for a SHA-256 and a lookup (~1 µs).
//!
//! What a hit still does, every time: the time rules (`exp`, `nbf`, `iat` against now), the
//! route's audiences and scopes, a check that the signing key is still in the issuer's current
//! key set (a key dropped from the JWKS drops its tokens), and the revocation lookup.
//!
//! Keyed by the token's SHA-256 (32 bytes, not the token string: less memory, cheaper hashing).
//! A moka cache: bounded by `TOKEN_CACHE_MAX_ENTRIES`, each entry expiring at the token's `exp`
//! or after `TOKEN_CACHE_TTL`, whichever comes first. moka's sync cache takes no lock across
//! an await (there is none) and shards internally, so concurrent Checks do not contend.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;

use std::collections::HashSet;

use crate::jwt::{Claims, TYPED_STRING_CLAIMS, VerifyingKey};

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

/// What a verification established, enough to decide again without the signature.
pub struct VerifiedToken {
    pub claims: Arc<Claims>,
    pub issuer: String,
    pub kid: Option<String>,
    pub alg: Algorithm,
    /// The key that verified it; a hit is valid only while the issuer still serves this key.
    pub key: Arc<VerifyingKey>,
}

struct ExpireAtExp {
    ttl: Duration,
}

impl moka::Expiry<TokenDigest, Arc<VerifiedToken>> for ExpireAtExp {
    fn expire_after_create(
        &self,
        _key: &TokenDigest,
        token: &Arc<VerifiedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let until_exp = token
            .claims
            .exp
            .map_or(0, |exp| exp.saturating_sub(now).max(0) as u64);
        Some(self.ttl.min(Duration::from_secs(until_exp)))
    }
}

/// Tokens whose signature failed, remembered this long...
const REJECTED_TTL: Duration = Duration::from_secs(60);
/// ...and at most this many: a replayed forgery then costs a hash, not a signature check,
/// while a flood of distinct forgeries only churns a bounded set.
const REJECTED_MAX_ENTRIES: u64 = 10_000;

/// Which claims a cached token keeps by name, besides its typed fields: the ones the
/// configuration reads (dynamic metadata, claim headers, scopes, rate-limit keys). Keeping
/// only those took a cached token from ~1.8 KiB to about half (BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptClaims {
    /// Every claim (`DYNAMIC_METADATA_CLAIMS=*`).
    All,
    Named(HashSet<String>),
}

impl KeptClaims {
    /// The cached copy of verified claims: typed fields as they are, named claims only where
    /// kept and not already typed ([`Claims::value`] rebuilds those).
    pub fn compact(&self, claims: &Claims) -> Claims {
        match self {
            KeptClaims::All => claims.clone(),
            KeptClaims::Named(names) => Claims {
                all: claims
                    .all
                    .only(|name| names.contains(name) && !TYPED_STRING_CLAIMS.contains(&name)),
                ..claims.clone()
            },
        }
    }
}

pub struct TokenCache {
    cache: moka::sync::Cache<TokenDigest, Arc<VerifiedToken>>,
    kept: KeptClaims,
    /// The negative side: digests of tokens that failed their signature check.
    rejected: moka::sync::Cache<TokenDigest, ()>,
}

impl TokenCache {
    /// `None` when `max_entries` is 0: caching disabled.
    pub fn new(max_entries: u64, ttl: Duration) -> Option<Self> {
        (max_entries > 0).then(|| TokenCache {
            kept: KeptClaims::All,
            cache: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(ExpireAtExp { ttl })
                .build(),
            rejected: moka::sync::Cache::builder()
                .max_capacity(REJECTED_MAX_ENTRIES.min(max_entries))
                .time_to_live(REJECTED_TTL)
                .build(),
        })
    }

    /// Cached tokens keep only these claims by name.
    pub fn keeping(self, kept: KeptClaims) -> Self {
        TokenCache { kept, ..self }
    }

    /// What a cached copy of `claims` holds.
    pub fn compact(&self, claims: &Claims) -> Claims {
        self.kept.compact(claims)
    }

    /// Whether this token failed its signature check within the last minute.
    pub fn was_rejected(&self, digest: &TokenDigest) -> bool {
        self.rejected.contains_key(digest)
    }

    pub fn reject(&self, digest: TokenDigest) {
        self.rejected.insert(digest, ());
    }

    pub fn get(&self, digest: &TokenDigest) -> Option<Arc<VerifiedToken>> {
        self.cache.get(digest)
    }

    pub fn insert(&self, digest: TokenDigest, token: VerifiedToken) -> Arc<VerifiedToken> {
        let token = Arc::new(token);
        self.cache.insert(digest, token.clone());
        token
    }

    /// Approximate number of cached tokens (for the metrics scrape).
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
