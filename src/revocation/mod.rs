//! Revoked tokens, subjects and sessions behind one store trait, with two backends:
//! [`memory`] (embedded, the default, optionally mirrored from a file) and [`redis`] (a fred
//! pool, shared by every replica).

pub mod memory;
pub mod redis;
pub mod tracking;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use crate::redis::StoreError;
pub use memory::{FileError, MemoryStore, RevocationList};
pub use redis::{Persistence, RedisSettings, RedisStore, ReplicaWait};
pub use tracking::AnswerStamp;

/// What the store is asked about one verified token: everything in one call, so a networked
/// backend answers with one round trip.
#[derive(Debug, Clone, Copy)]
pub struct TokenIdentity<'a> {
    pub issuer: &'a str,
    pub jti: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub session: Option<&'a str>,
    /// `iat`; a token without one is treated as issued before any subject/session revocation.
    pub issued_at: Option<i64>,
}

/// Which revocation matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Token,
    Subject,
    Session,
}

/// A source of revocations. Implementations answer in one call and never panic.
pub trait RevocationStore: Send + Sync + 'static {
    /// Whether the token is revoked, with a stamp of what the answer was based on when the
    /// store can later tell, without asking, that it still holds ([`Self::still_holds`]);
    /// else [`AnswerStamp::NONE`].
    fn lookup_stamped(
        &self,
        token: &TokenIdentity<'_>,
    ) -> impl Future<Output = Result<(Option<Revoked>, AnswerStamp), StoreError>> + Send;

    /// Whether the answer stamped `stamp` is still what a lookup would answer at `now` (unix
    /// seconds). A token cache hit that holds one skips the lookup. Required, like the
    /// lookup, so that no store (a wrapper above all) loses the stamps by default.
    fn still_holds(&self, stamp: AnswerStamp, now: i64) -> bool;

    /// Whether the token is revoked.
    fn lookup(
        &self,
        token: &TokenIdentity<'_>,
    ) -> impl Future<Output = Result<Option<Revoked>, StoreError>> + Send {
        async move { Ok(self.lookup_stamped(token).await?.0) }
    }
}

impl<T: RevocationStore> RevocationStore for Arc<T> {
    fn lookup_stamped(
        &self,
        token: &TokenIdentity<'_>,
    ) -> impl Future<Output = Result<(Option<Revoked>, AnswerStamp), StoreError>> + Send {
        (**self).lookup_stamped(token)
    }

    fn still_holds(&self, stamp: AnswerStamp, now: i64) -> bool {
        (**self).still_holds(stamp, now)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Deny with 503: a revoked token can never pass while the store is down.
    #[default]
    Closed,
    /// Allow and count it: availability over revocation while the store is down.
    Open,
}

/// `REVOCATION_BACKEND`: which store holds the revocations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// Embedded, optionally mirrored from `REVOCATION_FILE`.
    #[default]
    Memory,
    /// Shared by every replica.
    Redis,
}

/// Which backend to run, with its settings.
#[derive(Debug, Clone, PartialEq)]
// Built once at startup and read by reference: the size of the Redis variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum RevocationConfig {
    Memory { file: Option<PathBuf> },
    Redis(RedisSettings),
}

/// The configured backend. An enum rather than a trait object: `lookup` stays a plain
/// `async fn` with no allocation per Check.
// One instance per process: its size does not matter, an extra indirection per lookup would.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    Memory(Arc<MemoryStore>),
    Redis(RedisStore),
}

impl RevocationStore for Backend {
    async fn lookup_stamped(
        &self,
        token: &TokenIdentity<'_>,
    ) -> Result<(Option<Revoked>, AnswerStamp), StoreError> {
        match self {
            Backend::Memory(store) => store.lookup_stamped(token).await,
            Backend::Redis(store) => store.lookup_stamped(token).await,
        }
    }

    fn still_holds(&self, stamp: AnswerStamp, now: i64) -> bool {
        match self {
            Backend::Memory(store) => store.still_holds(stamp, now),
            Backend::Redis(store) => store.still_holds(stamp, now),
        }
    }
}

impl Backend {
    /// Writes one revocation so that every Check this backend answers enforces it: in this
    /// process (and the memory backend's file, if any), or in Redis for every replica.
    pub async fn revoke(&self, revocation: Revocation, leeway: i64) -> Result<(), StoreError> {
        match self {
            Backend::Memory(store) => store
                .add(revocation, leeway)
                .await
                .map_err(|e| StoreError::Other(e.to_string())),
            Backend::Redis(store) => store.write(&[revocation], leeway, None).await.map(|_| ()),
        }
    }
}

/// One revocation to write (the `revoke` command, back-channel logout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The token with this `jti`; kept until its `exp` (plus leeway) and no longer.
    Token { jti: String, expires_at: i64 },
    /// Every token of the subject issued at or before `revoked_at`.
    Subject {
        issuer: String,
        subject: String,
        revoked_at: i64,
    },
    /// Every token of the session issued at or before `revoked_at`.
    Session {
        issuer: String,
        session: String,
        revoked_at: i64,
    },
}

/// What `unrevoke` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    Token { jti: String },
    Subject { issuer: String, subject: String },
    Session { issuer: String, session: String },
}
