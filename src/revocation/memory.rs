//! The embedded backend: every revocation in process memory, optionally mirrored from a text
//! file that is re-read when its content changes:
//!
//! ```text
//! # comment
//! jti <jti> [<exp>]               revoke one token (until its unix `exp`, when given)
//! sub <iss> <sub> <unix-time>     revoke every token of a subject issued at or before the time
//! sid <iss> <sid> <unix-time>     the same for one session (`sid` claim)
//! <jti>                           a bare word is a jti
//! ```
//!
//! Fields are separated by whitespace. A field that is empty, holds whitespace or a control
//! character, or starts with `"` is written as a JSON string (`"John Smith"`), so every
//! identifier a token can carry round-trips; a field that starts with `"` is read as one.
//! Every other field is taken as it is, so files written before quoting existed read the same.
//!
//! `revoke`/`unrevoke` edit the file under an exclusive lock on `<file>.lock` and replace it
//! with a uniquely named temporary file (write, fsync, rename), after re-reading what they are
//! about to install: concurrent runs never lose an update, and the sidecar never sees half a
//! file or one it would refuse.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::{
    AnswerStamp, Revocation, RevocationStore, RevocationTarget, Revoked, StoreError, TokenIdentity,
};
use crate::metrics::FileReloadMetrics;

/// A file line that could not be read; the whole file is refused so nothing is silently dropped.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{path}:{line}: {message}")]
pub struct FileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

impl FileError {
    fn io(path: &Path, error: &std::io::Error) -> Self {
        FileError {
            path: path.display().to_string(),
            line: 0,
            message: error.to_string(),
        }
    }
}

/// Splits a line into its fields: separated by whitespace, a field that starts with `"` being
/// a JSON string literal that ends at its closing quote.
pub fn split_fields(line: &str) -> Result<Vec<Cow<'_, str>>, String> {
    let mut fields = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let end = if rest.starts_with('"') {
            let mut literal = serde_json::Deserializer::from_str(rest).into_iter::<String>();
            let value = match literal.next() {
                Some(Ok(value)) => value,
                _ => return Err(format!("unterminated or invalid quoted field: {rest}")),
            };
            let end = literal.byte_offset();
            fields.push(Cow::Owned(value));
            end
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            fields.push(Cow::Borrowed(&rest[..end]));
            end
        };
        let after = &rest[end..];
        if !after.is_empty() && !after.starts_with(char::is_whitespace) {
            return Err("a quoted field must be followed by whitespace".into());
        }
        rest = after.trim_start();
    }
    Ok(fields)
}

/// One field as the file holds it: bare when that reads back the same, else a JSON string.
pub fn quote_field(value: &str) -> Cow<'_, str> {
    let bare = !value.is_empty()
        && !value.starts_with('"')
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    if bare {
        Cow::Borrowed(value)
    } else {
        // Serializing a str cannot fail.
        Cow::Owned(serde_json::to_string(value).unwrap_or_default())
    }
}

/// Which cut-off map a `sub`/`sid` line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutKind {
    Subject,
    Session,
}

/// One meaningful line of the file.
#[derive(Debug, PartialEq, Eq)]
enum Entry<'l> {
    Token {
        jti: Cow<'l, str>,
        expires_at: Option<i64>,
    },
    Cut {
        kind: CutKind,
        issuer: Cow<'l, str>,
        id: Cow<'l, str>,
        at: i64,
    },
}

const LINE_FORMS: &str =
    "expected `jti <jti> [<exp>]`, `sub <iss> <sub> <unix>` or `sid <iss> <sid> <unix>`";

/// Reads one line; `Ok(None)` for a blank line or a comment.
fn parse_line(line: &str) -> Result<Option<Entry<'_>>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let mut fields = split_fields(trimmed)?;
    if fields.iter().any(|f| f.is_empty()) {
        return Err("an empty field names nothing".into());
    }
    let number = |text: &str, what: &str| {
        text.parse::<i64>()
            .map_err(|_| format!("{what} must be unix seconds"))
    };
    let entry = match fields.len() {
        1 => Entry::Token {
            jti: fields.remove(0),
            expires_at: None,
        },
        2 | 3 if fields[0] == "jti" => Entry::Token {
            expires_at: match fields.get(2) {
                Some(exp) => Some(number(exp, "exp")?),
                None => None,
            },
            jti: fields.swap_remove(1),
        },
        4 if fields[0] == "sub" || fields[0] == "sid" => Entry::Cut {
            kind: if fields[0] == "sub" {
                CutKind::Subject
            } else {
                CutKind::Session
            },
            at: number(&fields[3], "revoked-at")?,
            id: fields.swap_remove(2),
            issuer: fields.swap_remove(1),
        },
        _ => return Err(LINE_FORMS.into()),
    };
    Ok(Some(entry))
}

/// One immutable snapshot of every revocation, swapped whole on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
            let entry = parse_line(line).map_err(|message| FileError {
                path: path.to_owned(),
                line: index + 1,
                message,
            })?;
            match entry {
                None => {}
                Some(Entry::Token { jti, .. }) => {
                    list.jtis.insert(jti.into_owned());
                }
                Some(Entry::Cut {
                    kind,
                    issuer,
                    id,
                    at,
                }) => {
                    let map = match kind {
                        CutKind::Subject => &mut list.subjects,
                        CutKind::Session => &mut list.sessions,
                    };
                    let entry = map.entry(issuer.into_owned()).or_default();
                    // Two lines for one subject: the later cut-off revokes more, keep it.
                    let cut = entry.entry(id.into_owned()).or_insert(at);
                    *cut = (*cut).max(at);
                }
            }
        }
        Ok(list)
    }

    /// Adds one revocation, as a file line for it would (a later cut-off wins).
    fn insert(&mut self, revocation: &Revocation) {
        let (map, issuer, id, at) = match revocation {
            Revocation::Token { jti, .. } => {
                self.jtis.insert(jti.clone());
                return;
            }
            Revocation::Subject {
                issuer,
                subject,
                revoked_at,
            } => (&mut self.subjects, issuer, subject, *revoked_at),
            Revocation::Session {
                issuer,
                session,
                revoked_at,
            } => (&mut self.sessions, issuer, session, *revoked_at),
        };
        let cut = map
            .entry(issuer.clone())
            .or_default()
            .entry(id.clone())
            .or_insert(at);
        *cut = (*cut).max(at);
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

    /// Whether this list enforces `revocation` (a later cut-off covers an earlier one).
    fn enforces(&self, revocation: &Revocation) -> bool {
        let cut_at = |map: &HashMap<String, HashMap<String, i64>>, issuer: &str, id: &str| {
            map.get(issuer).and_then(|ids| ids.get(id)).copied()
        };
        match revocation {
            Revocation::Token { jti, .. } => self.jtis.contains(jti),
            Revocation::Subject {
                issuer,
                subject,
                revoked_at,
            } => cut_at(&self.subjects, issuer, subject).is_some_and(|cut| cut >= *revoked_at),
            Revocation::Session {
                issuer,
                session,
                revoked_at,
            } => cut_at(&self.sessions, issuer, session).is_some_and(|cut| cut >= *revoked_at),
        }
    }

    /// Whether this list holds anything for `target`.
    fn names(&self, target: &RevocationTarget) -> bool {
        let has = |map: &HashMap<String, HashMap<String, i64>>, issuer: &str, id: &str| {
            map.get(issuer).is_some_and(|ids| ids.contains_key(id))
        };
        match target {
            RevocationTarget::Token { jti } => self.jtis.contains(jti),
            RevocationTarget::Subject { issuer, subject } => has(&self.subjects, issuer, subject),
            RevocationTarget::Session { issuer, session } => has(&self.sessions, issuer, session),
        }
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

/// The file line for one revocation, every identifier quoted when it must be.
fn line_for(revocation: &Revocation) -> String {
    match revocation {
        Revocation::Token { jti, expires_at } => format!("jti {} {expires_at}", quote_field(jti)),
        Revocation::Subject {
            issuer,
            subject,
            revoked_at,
        } => format!(
            "sub {} {} {revoked_at}",
            quote_field(issuer),
            quote_field(subject)
        ),
        Revocation::Session {
            issuer,
            session,
            revoked_at,
        } => format!(
            "sid {} {} {revoked_at}",
            quote_field(issuer),
            quote_field(session)
        ),
    }
}

/// Whether a (valid) file line names `target`.
fn line_matches(entry: &Entry<'_>, target: &RevocationTarget) -> bool {
    match (target, entry) {
        (RevocationTarget::Token { jti }, Entry::Token { jti: line_jti, .. }) => line_jti == jti,
        (
            RevocationTarget::Subject {
                issuer,
                subject: id,
            }
            | RevocationTarget::Session {
                issuer,
                session: id,
            },
            Entry::Cut {
                kind,
                issuer: line_issuer,
                id: line_id,
                ..
            },
        ) => {
            let wanted = match target {
                RevocationTarget::Subject { .. } => CutKind::Subject,
                _ => CutKind::Session,
            };
            *kind == wanted && line_issuer == issuer && line_id == id
        }
        _ => false,
    }
}

/// Whether a line is a jti entry whose token expired more than `leeway` seconds ago: the
/// token can no longer pass verification, so the entry protects nothing.
fn line_expired(entry: &Entry<'_>, now: i64, leeway: i64) -> bool {
    matches!(entry, Entry::Token { expires_at: Some(exp), .. } if exp.saturating_add(leeway) < now)
}

/// Holds `<file>.lock` exclusively for as long as it lives: one `revoke`/`unrevoke` at a time
/// edits the file. A lock file rather than the file itself, because the file is replaced by a
/// rename and a lock on the old inode would not stop the next writer.
struct EditLock {
    _held: std::fs::File,
}

impl EditLock {
    fn take(path: &Path) -> Result<Self, FileError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| FileError::io(&lock_path, &e))?;
        file.lock().map_err(|e| FileError::io(&lock_path, &e))?;
        Ok(EditLock { _held: file })
    }
}

/// Writes `text` to a new, uniquely named file beside `path`, flushes it to disk and renames it
/// over `path`, so a reader sees the old file or the new one, never a mix.
fn replace(path: &Path, text: &str) -> Result<(), FileError> {
    let mut random = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut random);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".{}.{:016x}.tmp",
        std::process::id(),
        u64::from_le_bytes(random)
    ));
    let tmp = PathBuf::from(name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FileError::io(path, &error));
    }
    Ok(())
}

/// Adds `add` and removes lines naming `remove` in the revocation file, pruning expired jti
/// entries, and replaces the file atomically (see the module doc). Returns how many lines were
/// removed for `remove`.
pub fn edit_file(
    path: &Path,
    add: &[Revocation],
    remove: Option<&RevocationTarget>,
    leeway: i64,
) -> Result<usize, FileError> {
    let shown = path.display().to_string();
    let _lock = EditLock::take(path)?;
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(FileError::io(path, &e)),
    };
    // Refuse to rewrite a file the sidecar itself would refuse: nothing in it may be lost.
    RevocationList::parse(&existing, &shown)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut removed = 0;
    let mut out = String::with_capacity(existing.len() + 64 * add.len());
    for line in existing.lines() {
        // Every line parsed above.
        if let Ok(Some(entry)) = parse_line(line) {
            if remove.is_some_and(|target| line_matches(&entry, target)) {
                removed += 1;
                continue;
            }
            if line_expired(&entry, now, leeway) {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    for revocation in add {
        out.push_str(&line_for(revocation));
        out.push('\n');
    }
    // Read back what is about to be installed, as the sidecar will: it must load, hold every
    // addition and no longer hold the removal.
    let installed = RevocationList::parse(&out, &shown)?;
    let wrong = |message: String| FileError {
        path: shown.clone(),
        line: 0,
        message,
    };
    if let Some(missing) = add.iter().find(|r| !installed.enforces(r)) {
        return Err(wrong(format!(
            "not written: the new file would not hold {missing:?}"
        )));
    }
    if remove.is_some_and(|target| installed.names(target)) {
        return Err(wrong(format!(
            "not written: the new file would still hold {remove:?}"
        )));
    }
    replace(path, &out)?;
    Ok(removed)
}

/// The embedded backend: a snapshot in memory, optionally mirrored from a file.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// A std lock: held only to clone the Arc, never across an await.
    list: RwLock<Arc<RevocationList>>,
    /// Changes to the list so far, bumped under its write lock before each change: an answer
    /// stamped with the count it was read under holds while the count is the same.
    changes: AtomicU64,
    file: Option<PathBuf>,
    /// SHA-256 of the file content last read, and whether it loaded; only the reload task
    /// locks it. Content, not (mtime, length): a copy that keeps the mtime, or an edit that
    /// keeps the length within the filesystem's time granularity, is still seen.
    last_read: std::sync::Mutex<Option<LastRead>>,
}

/// The SHA-256 of content read from the file, and whether it loaded.
type LastRead = ([u8; 32], Result<(), FileError>);

/// What one look at the file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The content is what was last read (in force, or already reported as refused).
    Unchanged,
    /// New content, loaded: it is in force now.
    Updated,
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

    /// The list, and the stamp of answers read from it.
    fn stamped_snapshot(&self) -> (Arc<RevocationList>, AnswerStamp) {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        (list.clone(), stamp(self.changes.load(Ordering::Acquire)))
    }

    /// Replaces or edits the list under its write lock, counting the change first: from then
    /// on no earlier answer holds, and a lookup waits for the lock.
    fn change(&self, edit: impl FnOnce(&mut Arc<RevocationList>)) {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, Ordering::AcqRel);
        edit(&mut list);
    }

    /// Re-reads the file when its content changed. On a bad file the previous list stays in
    /// force and the error is returned, on every call until the file is fixed: a refused file
    /// is never "unchanged".
    fn reload(&self, path: &Path) -> Result<Reload, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError::io(path, &e))?;
        let digest = crate::token_cache::digest_bytes(text.as_bytes());
        let mut last = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, outcome)) = &*last
            && *seen == digest
        {
            return outcome.clone().map(|()| Reload::Unchanged);
        }
        let parsed = RevocationList::parse(&text, &path.display().to_string());
        *last = Some((digest, parsed.as_ref().map(|_| ()).map_err(Clone::clone)));
        let list = parsed?;
        info!(file = %path.display(), entries = list.len(), "loaded revocation list");
        self.change(|current| *current = Arc::new(list));
        Ok(Reload::Updated)
    }

    /// Polls the file until the task is aborted. A file that cannot be loaded is counted on
    /// every poll (`failed` keeps rising while it is broken) and logged once per new content.
    pub async fn reload_forever(self: Arc<Self>, every: Duration, metrics: FileReloadMetrics) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut reported: Option<FileError> = None;
        loop {
            tokio::time::sleep(every).await;
            let this = self.clone();
            let path = path.clone();
            // File reads block: keep them off the request-serving workers.
            let Ok(result) = tokio::task::spawn_blocking(move || this.reload(&path)).await else {
                continue;
            };
            match result {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Updated) => {
                    metrics.updated.increment(1);
                    reported = None;
                }
                Err(error) => {
                    metrics.failed.increment(1);
                    if reported.as_ref() != Some(&error) {
                        warn!(%error, "revocation file not loaded; the previous list stays in \
                            force and revocations written since are NOT enforced");
                        reported = Some(error);
                    }
                }
            }
        }
    }
}

impl MemoryStore {
    /// Puts one revocation in force in this process now (back-channel logout). With a file it
    /// is written there first, as `revoke` writes it (locked, atomic), and the file re-read:
    /// it survives every later reload and a restart, and `unrevoke` removes it. Without a file
    /// it lives in memory until the process ends.
    pub async fn add(
        self: &Arc<Self>,
        revocation: Revocation,
        leeway: i64,
    ) -> Result<(), FileError> {
        let Some(path) = self.file.clone() else {
            // In place unless a lookup holds the snapshot this instant: no copy of the list
            // per logout.
            self.change(|list| Arc::make_mut(list).insert(&revocation));
            return Ok(());
        };
        let this = self.clone();
        // File I/O blocks: keep it off the serving workers.
        tokio::task::spawn_blocking(move || {
            edit_file(&path, std::slice::from_ref(&revocation), None, leeway)?;
            this.reload(&path).map(|_| ())
        })
        .await
        .unwrap_or_else(|e| {
            Err(FileError {
                path: String::new(),
                line: 0,
                message: format!("revocation file write did not finish: {e}"),
            })
        })
    }
}

/// The stamp of answers read after `changes` changes to the list (never `NONE`).
fn stamp(changes: u64) -> AnswerStamp {
    AnswerStamp::from_bits(changes.wrapping_add(1).max(1))
}

impl RevocationStore for MemoryStore {
    /// Stamped with the list's change count: a lookup here is a few hash probes, but a stamp
    /// lets a caller that remembers allows (the in-Envoy module) skip even the Check.
    async fn lookup_stamped(
        &self,
        token: &TokenIdentity<'_>,
    ) -> Result<(Option<Revoked>, AnswerStamp), StoreError> {
        let (list, stamp) = self.stamped_snapshot();
        Ok((list.lookup(token), stamp))
    }

    /// No entry expires by the clock: an answer holds until the list changes.
    fn still_holds(&self, answered: AnswerStamp, _: i64) -> bool {
        answered != AnswerStamp::NONE && answered == stamp(self.changes.load(Ordering::Acquire))
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

    /// An answer's stamp holds until the list changes, by a logout or a reload of new file
    /// content, and not past it; re-reading unchanged content keeps it.
    #[tokio::test]
    async fn an_answer_holds_until_the_list_changes() {
        let alice = token("j1", "alice", "s1", Some(10));
        let in_memory = Arc::new(MemoryStore::open(None).unwrap());
        let (revoked, first) = in_memory.lookup_stamped(&alice).await.unwrap();
        assert_eq!(revoked, None);
        assert_ne!(first, AnswerStamp::NONE);
        assert!(in_memory.still_holds(first, 0));
        assert!(!in_memory.still_holds(AnswerStamp::NONE, 0));
        let other = Revocation::Token {
            jti: "someone-else".into(),
            expires_at: i64::MAX / 2,
        };
        in_memory.add(other, 0).await.unwrap();
        assert!(
            !in_memory.still_holds(first, 0),
            "a logout ends every answer"
        );
        let (_, second) = in_memory.lookup_stamped(&alice).await.unwrap();
        assert!(second != first && in_memory.still_holds(second, 0));

        let dir = std::env::temp_dir().join(format!("authz-memory-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("revoked.txt");
        std::fs::write(&path, "# none yet\n").unwrap();
        let from_file = MemoryStore::open(Some(path.clone())).unwrap();
        let (_, stamp) = from_file.lookup_stamped(&alice).await.unwrap();
        assert_eq!(from_file.reload(&path).unwrap(), Reload::Unchanged);
        assert!(from_file.still_holds(stamp, 0), "unchanged content");
        std::fs::write(&path, "jti j1\n").unwrap();
        assert_eq!(from_file.reload(&path).unwrap(), Reload::Updated);
        assert!(!from_file.still_holds(stamp, 0), "new content");
        let (revoked, _) = from_file.lookup_stamped(&alice).await.unwrap();
        assert_eq!(revoked, Some(Revoked::Token));
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn every_identifier_a_token_can_carry_round_trips_through_the_file() {
        let odd = [
            "John Smith",
            "tab\there",
            "new\nline",
            "\"quoted\"",
            "a\"b\\c",
            "no\u{a0}break",
            "#hash",
            "%41 percent",
            "nul\u{0}byte",
            "plain",
        ];
        for id in odd {
            let written = [
                Revocation::Token {
                    jti: id.into(),
                    expires_at: 10,
                },
                Revocation::Subject {
                    issuer: format!("https://idp/ {id}"),
                    subject: id.into(),
                    revoked_at: 5,
                },
                Revocation::Session {
                    issuer: "iss".into(),
                    session: id.into(),
                    revoked_at: 5,
                },
            ];
            let text: String = written.iter().map(|r| line_for(r) + "\n").collect();
            assert_eq!(text.lines().count(), 3, "one line each: {text:?}");
            let list =
                RevocationList::parse(&text, "f").unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert_eq!(list.len(), 3, "{text:?}");
            for revocation in &written {
                assert!(list.enforces(revocation), "{revocation:?} from {text:?}");
            }
            let issuer = format!("https://idp/ {id}");
            let token = TokenIdentity {
                issuer: &issuer,
                jti: Some(id),
                subject: Some(id),
                session: None,
                issued_at: Some(1),
            };
            assert_eq!(list.lookup(&token), Some(Revoked::Token));
            let token = TokenIdentity { jti: None, ..token };
            assert_eq!(list.lookup(&token), Some(Revoked::Subject));
        }
    }

    #[test]
    fn lines_written_before_quoting_read_as_before() {
        let list = RevocationList::parse(
            "a%20b\njti x%41y 5\nsub https://idp:8443/ user@example.com 7\n",
            "f",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert!(list.jtis.contains("a%20b") && list.jtis.contains("x%41y"));
        assert_eq!(list.subjects["https://idp:8443/"]["user@example.com"], 7);
    }

    #[test]
    fn empty_and_broken_quoted_fields_are_refused() {
        for bad in [
            "sub iss \"\" 5",
            "jti \"\" 5",
            "\"\"",
            "sub \"unterminated 5",
            "sub \"a\"b 5",
            "jti \"\\x\" 5",
        ] {
            let error = RevocationList::parse(bad, "f");
            assert!(error.is_err(), "{bad:?} was read as {error:?}");
        }
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
