//! The embedded backend: every revocation in process memory, optionally mirrored from a text
//! file that is re-read when it changes:
//!
//! ```text
//! # comment
//! jti <jti> [<exp>]               revoke one token (until its unix `exp`, when given)
//! sub <iss> <sub> <unix-time>     revoke every token of a subject issued at or before the time
//! sid <iss> <sid> <unix-time>     the same for one session (`sid` claim)
//! <jti>                           a bare word is a jti
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::{Revocation, RevocationStore, RevocationTarget, Revoked, StoreError, TokenIdentity};

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
                ["jti", jti, exp] => {
                    exp.parse::<i64>()
                        .map_err(|_| error("exp must be unix seconds"))?;
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
                        "expected `jti <jti> [<exp>]`, `sub <iss> <sub> <unix>` or `sid <iss> <sid> <unix>`",
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

/// The file line for one revocation.
fn line_for(revocation: &Revocation) -> String {
    match revocation {
        Revocation::Token { jti, expires_at } => format!("jti {jti} {expires_at}"),
        Revocation::Subject {
            issuer,
            subject,
            revoked_at,
        } => format!("sub {issuer} {subject} {revoked_at}"),
        Revocation::Session {
            issuer,
            session,
            revoked_at,
        } => format!("sid {issuer} {session} {revoked_at}"),
    }
}

/// Whether a file line names `target`.
fn line_matches(line: &str, target: &RevocationTarget) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match (target, fields.as_slice()) {
        (RevocationTarget::Token { jti }, [only] | ["jti", only] | ["jti", only, _]) => only == jti,
        (RevocationTarget::Subject { issuer, subject }, ["sub", iss, sub, _]) => {
            iss == issuer && sub == subject
        }
        (RevocationTarget::Session { issuer, session }, ["sid", iss, sid, _]) => {
            iss == issuer && sid == session
        }
        _ => false,
    }
}

/// Whether a line is a jti entry whose token expired more than `leeway` seconds ago: the
/// token can no longer pass verification, so the entry protects nothing.
fn line_expired(line: &str, now: i64, leeway: i64) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    matches!(fields.as_slice(), ["jti", _, exp] if exp.parse::<i64>().is_ok_and(|exp| exp.saturating_add(leeway) < now))
}

/// Adds `add` and removes lines naming `remove` in the revocation file, pruning expired jti
/// entries, and replaces the file atomically (write + rename) so the sidecar never reads half
/// a file. Returns how many lines were removed for `remove`.
pub fn edit_file(
    path: &Path,
    add: &[Revocation],
    remove: Option<&RevocationTarget>,
    leeway: i64,
) -> Result<usize, FileError> {
    let io_error = |e: std::io::Error| FileError {
        path: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_error(e)),
    };
    // Refuse to rewrite a file the sidecar itself would refuse: nothing in it may be lost.
    RevocationList::parse(&existing, &path.display().to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut removed = 0;
    let mut out = String::with_capacity(existing.len() + 64 * add.len());
    for line in existing.lines() {
        if remove.is_some_and(|target| line_matches(line, target)) {
            removed += 1;
            continue;
        }
        if line_expired(line, now, leeway) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for revocation in add {
        out.push_str(&line_for(revocation));
        out.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out).map_err(io_error)?;
    std::fs::rename(&tmp, path).map_err(io_error)?;
    Ok(removed)
}

/// The embedded backend: a snapshot in memory, optionally mirrored from a file.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// A std lock: held only to clone the Arc, never across an await.
    list: RwLock<Arc<RevocationList>>,
    file: Option<PathBuf>,
    /// The file's last seen mtime and length; only the reload task locks it, briefly.
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
    fn edits_add_remove_and_prune_atomically() {
        let dir = std::env::temp_dir().join(format!("authz-memory-edit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("revoked.txt");
        std::fs::write(
            &path,
            "# keep me\nold-bare\njti long-gone 1000\nsub iss alice 5\n",
        )
        .unwrap();
        let add = [
            Revocation::Token {
                jti: "new".into(),
                expires_at: i64::MAX / 2,
            },
            Revocation::Session {
                issuer: "iss".into(),
                session: "s".into(),
                revoked_at: 7,
            },
        ];
        let subject = RevocationTarget::Subject {
            issuer: "iss".into(),
            subject: "alice".into(),
        };
        assert_eq!(edit_file(&path, &add, Some(&subject), 60).unwrap(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "# keep me\nold-bare\njti new {}\nsid iss s 7\n",
                i64::MAX / 2
            )
        );
        let bare = RevocationTarget::Token {
            jti: "old-bare".into(),
        };
        assert_eq!(edit_file(&path, &[], Some(&bare), 60).unwrap(), 1);
        std::fs::write(&path, "sub broken\n").unwrap();
        assert!(
            edit_file(&path, &add, None, 60).is_err(),
            "a broken file is not rewritten"
        );
        std::fs::remove_dir_all(dir).unwrap();
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
