//! Revoked tokens, subjects and sessions behind one store trait.
//!
//! The embedded in-memory backend is the default, so the sidecar runs without Redis. It is
//! loaded from an optional text file that is re-read when it changes:
//!
//! ```text
//! # comment
//! jti <jti>                       revoke one token
//! sub <iss> <sub> <unix-time>     revoke every token of a subject issued at or before the time
//! sid <iss> <sid> <unix-time>     the same for one session (`sid` claim)
//! <jti>                           a bare word is a jti
//! ```

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

/// What the store is asked about one verified token: everything in one call, so a networked
/// backend can answer with one round trip.
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

/// The store could not answer; the failure policy decides what the Check returns.
#[derive(Debug, thiserror::Error)]
#[error("revocation store unavailable: {0}")]
pub struct StoreError(pub String);

/// A source of revocations. Implementations answer in one call and never panic.
pub trait RevocationStore: Send + Sync + 'static {
    fn lookup(
        &self,
        token: &TokenIdentity<'_>,
    ) -> impl Future<Output = Result<Option<Revoked>, StoreError>> + Send;
}

impl<T: RevocationStore> RevocationStore for std::sync::Arc<T> {
    fn lookup(
        &self,
        token: &TokenIdentity<'_>,
    ) -> impl Future<Output = Result<Option<Revoked>, StoreError>> + Send {
        (**self).lookup(token)
    }
}

/// Which backend to run, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationConfig {
    Memory { file: Option<PathBuf> },
}

/// A file line that could not be read; the whole file is refused so nothing is silently dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}:{line}: {message}")]
pub struct FileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

/// One immutable snapshot of every revocation, swapped whole on reload.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    jtis: HashSet<String>,
    /// issuer -> subject -> revoked-at (unix seconds). Nested so a lookup borrows, never allocates.
    subjects: HashMap<String, HashMap<String, i64>>,
    sessions: HashMap<String, HashMap<String, i64>>,
}

impl RevocationList {
    pub fn parse(text: &str, path: &str) -> Result<Self, FileError> {
        let mut list = RevocationList::default();
        for (index, line) in text.lines().enumerate() {
            let error = |message: &str| FileError {
                path: path.to_owned(),
                line: index + 1,
                message: message.to_owned(),
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [jti] | ["jti", jti] => {
                    list.jtis.insert((*jti).to_owned());
                }
                [kind @ ("sub" | "sid"), issuer, id, at] => {
                    let at: i64 = at
                        .parse()
                        .map_err(|_| error("revoked-at must be unix seconds"))?;
                    let map = if *kind == "sub" {
                        &mut list.subjects
                    } else {
                        &mut list.sessions
                    };
                    let entry = map.entry((*issuer).to_owned()).or_default();
                    // Two lines for one subject: the later cut-off revokes more, keep it.
                    let cut = entry.entry((*id).to_owned()).or_insert(at);
                    *cut = (*cut).max(at);
                }
                _ => {
                    return Err(error(
                        "expected `jti <jti>`, `sub <iss> <sub> <unix>` or `sid <iss> <sid> <unix>`",
                    ));
                }
            }
        }
        Ok(list)
    }

    pub fn lookup(&self, token: &TokenIdentity<'_>) -> Option<Revoked> {
        if token.jti.is_some_and(|jti| self.jtis.contains(jti)) {
            return Some(Revoked::Token);
        }
        let issued_before = |map: &HashMap<String, HashMap<String, i64>>, id: Option<&str>| {
            let cut = id.and_then(|id| map.get(token.issuer)?.get(id));
            cut.is_some_and(|cut| token.issued_at.is_none_or(|iat| iat <= *cut))
        };
        if issued_before(&self.subjects, token.subject) {
            return Some(Revoked::Subject);
        }
        if issued_before(&self.sessions, token.session) {
            return Some(Revoked::Session);
        }
        None
    }

    pub fn len(&self) -> usize {
        self.jtis.len()
            + self.subjects.values().map(HashMap::len).sum::<usize>()
            + self.sessions.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The embedded backend: a snapshot in memory, optionally mirrored from a file.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// A std lock: held only to clone the Arc, never across an await.
    list: RwLock<Arc<RevocationList>>,
    file: Option<PathBuf>,
    file_stamp: std::sync::Mutex<Option<(SystemTime, u64)>>,
}

impl MemoryStore {
    /// Loads the file, if any. A missing or unreadable file is an error: starting with an empty
    /// list where the operator configured one would silently un-revoke tokens.
    pub fn open(file: Option<PathBuf>) -> Result<Self, FileError> {
        let store = MemoryStore {
            file,
            ..MemoryStore::default()
        };
        if let Some(path) = &store.file {
            store.reload(path)?;
        }
        Ok(store)
    }

    fn snapshot(&self) -> Arc<RevocationList> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the file when its modification time or length changed. On a bad file the
    /// previous list stays in force.
    fn reload(&self, path: &Path) -> Result<bool, FileError> {
        let io_error = |e: std::io::Error| FileError {
            path: path.display().to_string(),
            line: 0,
            message: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(io_error)?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut last = self.file_stamp.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some(stamp) {
            return Ok(false);
        }
        *last = Some(stamp);
        let text = std::fs::read_to_string(path).map_err(io_error)?;
        let list = RevocationList::parse(&text, &path.display().to_string())?;
        info!(file = %path.display(), entries = list.len(), "loaded revocation list");
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
        Ok(true)
    }

    /// Polls the file until the task is aborted.
    pub async fn reload_forever(self: Arc<Self>, every: Duration) {
        let Some(path) = self.file.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(every).await;
            let this = self.clone();
            let path = path.clone();
            // File reads block: keep them off the request-serving workers.
            let result = tokio::task::spawn_blocking(move || this.reload(&path)).await;
            if let Ok(Err(error)) = result {
                warn!(%error, "revocation file not reloaded; keeping the previous list");
            }
        }
    }
}

impl RevocationStore for MemoryStore {
    async fn lookup(&self, token: &TokenIdentity<'_>) -> Result<Option<Revoked>, StoreError> {
        Ok(self.snapshot().lookup(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token<'a>(jti: &'a str, sub: &'a str, sid: &'a str, iat: Option<i64>) -> TokenIdentity<'a> {
        TokenIdentity {
            issuer: "iss",
            jti: Some(jti),
            subject: Some(sub),
            session: Some(sid),
            issued_at: iat,
        }
    }

    #[test]
    fn parses_every_line_kind() {
        let list = RevocationList::parse(
            "# revoked\n\nbare-jti\njti  typed-jti \nsub iss alice 100\nsub iss alice 50\nsid iss s1 200\n",
            "f",
        )
        .unwrap();
        assert_eq!(list.len(), 4);
        assert_eq!(
            list.lookup(&token("bare-jti", "x", "x", None)),
            Some(Revoked::Token)
        );
        assert_eq!(
            list.lookup(&token("typed-jti", "x", "x", None)),
            Some(Revoked::Token)
        );
        assert_eq!(
            list.lookup(&token("ok", "alice", "x", Some(100))),
            Some(Revoked::Subject)
        );
        assert_eq!(
            list.lookup(&token("ok", "alice", "x", Some(101))),
            None,
            "issued after the cut"
        );
        assert_eq!(
            list.lookup(&token("ok", "alice", "x", None)),
            Some(Revoked::Subject)
        );
        assert_eq!(
            list.lookup(&token("ok", "bob", "s1", Some(150))),
            Some(Revoked::Session)
        );
        let other_issuer = TokenIdentity {
            issuer: "other",
            ..token("ok", "alice", "s1", Some(1))
        };
        assert_eq!(list.lookup(&other_issuer), None);
    }

    #[test]
    fn a_bad_line_refuses_the_whole_file() {
        let err = RevocationList::parse("ok\nsub iss alice\n", "revoked.txt").unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.path, "revoked.txt");
        let err = RevocationList::parse("sid iss s yesterday\n", "f").unwrap_err();
        assert!(err.message.contains("unix seconds"), "{err}");
    }
}
