//! The `revoke` and `unrevoke` commands: write revocations to the configured backend (Redis,
//! or the memory backend's file), so operators use one tool whatever the backend.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use crate::config::parse::Problems;
use crate::config::{Settings, issuer_names, revocation_settings};
use crate::revocation::memory::{edit_file, split_fields};
use crate::revocation::{RedisStore, ReplicaWait, Revocation, RevocationConfig, RevocationTarget};

#[derive(Debug, Clone, Subcommand)]
pub enum RevokeCommand {
    /// Revoke one token by `jti`, until its `exp` (plus JWT_LEEWAY_SECONDS); or many from a file.
    Jti {
        /// The token's `jti` claim.
        #[arg(required_unless_present = "from_file", conflicts_with = "from_file")]
        jti: Option<String>,
        /// The token's `exp` (unix seconds): the entry lives until then plus the leeway.
        #[arg(long, required_unless_present = "from_file")]
        exp: Option<i64>,
        /// A file of `<jti> <exp>` lines (blank lines and `#` comments skipped; a jti with
        /// spaces as a JSON string, `"a b"`), written in bulk.
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// Revoke every token of a subject issued at or before `--at` (default: now).
    Sub {
        issuer: String,
        subject: String,
        /// Cut-off, unix seconds.
        #[arg(long)]
        at: Option<i64>,
        /// Write it even if the issuer is not one the sidecar trusts (JWT_ISSUER/CONFIG_FILE).
        #[arg(long)]
        any_issuer: bool,
    },
    /// Revoke every token of a session (`sid` claim) issued at or before `--at` (default: now).
    Sid {
        issuer: String,
        session: String,
        /// Cut-off, unix seconds.
        #[arg(long)]
        at: Option<i64>,
        /// Write it even if the issuer is not one the sidecar trusts (JWT_ISSUER/CONFIG_FILE).
        #[arg(long)]
        any_issuer: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum UnrevokeCommand {
    /// Remove a token revocation.
    Jti { jti: String },
    /// Remove a subject revocation.
    Sub { issuer: String, subject: String },
    /// Remove a session revocation.
    Sid { issuer: String, session: String },
}

/// What went wrong, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// The command line names something that cannot be revoked as given (exit 64).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("REVOCATION_BACKEND=memory needs REVOCATION_FILE to write revocations to")]
    NoFile,
    #[error("{0}")]
    File(#[from] crate::revocation::FileError),
    #[error("Redis: {0}")]
    Redis(#[from] crate::revocation::StoreError),
    #[error("Redis at {url} is not reachable (waited REDIS_POOL_TIMEOUT): {why}")]
    Unreachable { url: String, why: String },
    /// The revocations were written but fewer replicas than asked have them: a failover now
    /// could lose them. Writing again is safe.
    #[error(
        "written, but only {reached} of {wanted} replica(s) acknowledged within \
         REVOKE_WAIT_TIMEOUT: a failover before they replicate would lose the revocation; \
         check the replicas and run the same command again"
    )]
    PartialAck { reached: u32, wanted: u32 },
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn leeway(settings: &Settings) -> Result<i64, AdminError> {
    let mut problems = Problems::default();
    let leeway = problems.take(&settings.jwt_leeway_seconds);
    match problems.0.is_empty() {
        true => Ok(leeway),
        false => Err(AdminError::Config(problems.0)),
    }
}

/// `REVOKE_WAIT_REPLICAS`/`REVOKE_WAIT_TIMEOUT`: `None` when not waiting.
fn replica_wait(settings: &Settings) -> Result<Option<ReplicaWait>, AdminError> {
    let mut problems = Problems::default();
    let replicas = problems.take(&settings.revoke_wait_replicas);
    let timeout = problems.take(&settings.revoke_wait_timeout);
    if !problems.0.is_empty() {
        return Err(AdminError::Config(problems.0));
    }
    Ok((replicas > 0).then_some(ReplicaWait { replicas, timeout }))
}

/// Reads `<jti> <exp>` lines, fields quoted as in the revocation file.
pub fn read_jti_file(path: &Path) -> Result<Vec<Revocation>, AdminError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AdminError::Input(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            AdminError::Input(format!(
                "{}:{}: expected `<jti> <exp>`{why}",
                path.display(),
                index + 1
            ))
        };
        let fields = split_fields(line).map_err(|e| bad(&format!(": {e}")))?;
        let [jti, exp] = fields.as_slice() else {
            return Err(bad(""));
        };
        if jti.is_empty() {
            return Err(bad(": the jti is empty"));
        }
        let expires_at = exp.parse().map_err(|_| bad(": exp is not unix seconds"))?;
        out.push(Revocation::Token {
            jti: jti.to_string(),
            expires_at,
        });
    }
    Ok(out)
}

/// An empty identifier names no token: writing it would revoke nothing (or, in a file written
/// without quoting, shift the next field into its place).
fn non_empty(what: &str, value: &str) -> Result<(), AdminError> {
    if value.is_empty() {
        return Err(AdminError::Usage(format!(
            "the {what} is empty: an empty {what} names no token"
        )));
    }
    Ok(())
}

/// A subject or session of an issuer the sidecar does not trust can never match a token: most
/// likely a typo (a trailing slash), which would print `revoked 1` and revoke nothing.
fn trusted_issuer(settings: &Settings, issuer: &str) -> Result<(), AdminError> {
    let trusted = issuer_names(settings).map_err(|e| AdminError::Config(vec![e]))?;
    if trusted.is_empty() {
        return Err(AdminError::Usage(
            "no issuer is configured to check the issuer against: set JWT_ISSUER or \
             CONFIG_FILE as the sidecar has them, or pass --any-issuer"
                .into(),
        ));
    }
    if trusted.iter().any(|t| t == issuer) {
        return Ok(());
    }
    let folded = |s: &str| s.trim_end_matches('/').to_ascii_lowercase();
    let near = trusted.iter().find(|t| folded(t) == folded(issuer));
    let hint = near.map_or_else(String::new, |t| format!(" Did you mean {t:?}?"));
    Err(AdminError::Usage(format!(
        "issuer {issuer:?} is not one the sidecar trusts ({}), so no token can match this \
         revocation.{hint} Pass --any-issuer to write it anyway",
        trusted
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A subject's or session's cut-off as given: both identifiers non-empty, the issuer one the
/// sidecar trusts (unless `any_issuer`), the time `at` or now.
fn cut_off(
    settings: &Settings,
    what: &str,
    issuer: String,
    id: String,
    at: Option<i64>,
    any_issuer: bool,
) -> Result<(String, String, i64), AdminError> {
    non_empty("issuer", &issuer)?;
    non_empty(what, &id)?;
    if !any_issuer {
        trusted_issuer(settings, &issuer)?;
    }
    Ok((issuer, id, at.unwrap_or_else(now)))
}

fn revocations(
    settings: &Settings,
    command: &RevokeCommand,
) -> Result<Vec<Revocation>, AdminError> {
    Ok(match command.clone() {
        RevokeCommand::Jti {
            from_file: Some(path),
            ..
        } => read_jti_file(&path)?,
        RevokeCommand::Jti {
            jti: Some(jti),
            exp: Some(expires_at),
            ..
        } => {
            non_empty("jti", &jti)?;
            vec![Revocation::Token { jti, expires_at }]
        }
        RevokeCommand::Jti { .. } => {
            return Err(AdminError::Usage(
                "give a JTI and --exp, or --from-file".into(),
            ));
        }
        RevokeCommand::Sub {
            issuer,
            subject,
            at,
            any_issuer,
        } => {
            let (issuer, subject, revoked_at) =
                cut_off(settings, "subject", issuer, subject, at, any_issuer)?;
            vec![Revocation::Subject {
                issuer,
                subject,
                revoked_at,
            }]
        }
        RevokeCommand::Sid {
            issuer,
            session,
            at,
            any_issuer,
        } => {
            let (issuer, session, revoked_at) =
                cut_off(settings, "session", issuer, session, at, any_issuer)?;
            vec![Revocation::Session {
                issuer,
                session,
                revoked_at,
            }]
        }
    })
}

async fn redis(settings: &crate::revocation::RedisSettings) -> Result<RedisStore, AdminError> {
    let store = RedisStore::connect(settings).await?;
    if store.connected() == 0 {
        return Err(AdminError::Unreachable {
            url: crate::redis::redacted_url(&settings.pool.url),
            why: store
                .connect_error()
                .unwrap_or_else(|| "no connection came up".into()),
        });
    }
    Ok(store)
}

/// `revoke ...`: returns a one-line summary for the operator.
pub async fn revoke(settings: &Settings, command: &RevokeCommand) -> Result<String, AdminError> {
    let (backend, _) = revocation_settings(settings).map_err(AdminError::Config)?;
    let leeway = leeway(settings)?;
    let all = revocations(settings, command)?;
    // A jti whose token already expired cannot pass verification: nothing to store.
    let (live, expired): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| match r {
        Revocation::Token { expires_at, .. } => expires_at.saturating_add(leeway) > now(),
        _ => true,
    });
    if !live.is_empty() {
        match &backend {
            RevocationConfig::Redis(redis_settings) => {
                let wait = replica_wait(settings)?;
                let reached = redis(redis_settings)
                    .await?
                    .write(&live, leeway, wait)
                    .await?;
                if let (Some(wait), Some(reached)) = (wait, reached)
                    && reached < wait.replicas
                {
                    return Err(AdminError::PartialAck {
                        reached,
                        wanted: wait.replicas,
                    });
                }
            }
            RevocationConfig::Memory { file: Some(path) } => {
                edit_file(path, &live, None, leeway)?;
            }
            RevocationConfig::Memory { file: None } => return Err(AdminError::NoFile),
        }
    }
    let mut summary = format!("revoked {}", live.len());
    if !expired.is_empty() {
        summary.push_str(&format!(" (skipped {} already expired)", expired.len()));
    }
    Ok(summary)
}

/// `unrevoke ...`: returns a one-line summary for the operator.
pub async fn unrevoke(
    settings: &Settings,
    command: &UnrevokeCommand,
) -> Result<String, AdminError> {
    let (backend, _) = revocation_settings(settings).map_err(AdminError::Config)?;
    let target = match command.clone() {
        UnrevokeCommand::Jti { jti } => RevocationTarget::Token { jti },
        UnrevokeCommand::Sub { issuer, subject } => RevocationTarget::Subject { issuer, subject },
        UnrevokeCommand::Sid { issuer, session } => RevocationTarget::Session { issuer, session },
    };
    let removed = match &backend {
        RevocationConfig::Redis(redis_settings) => {
            redis(redis_settings).await?.remove(&target).await?
        }
        RevocationConfig::Memory { file: Some(path) } => {
            edit_file(path, &[], Some(&target), leeway(settings)?)? > 0
        }
        RevocationConfig::Memory { file: None } => return Err(AdminError::NoFile),
    };
    Ok(if removed {
        "unrevoked".into()
    } else {
        "not revoked; nothing to remove".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_files_are_read_strictly() {
        let dir = std::env::temp_dir().join(format!("authz-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.txt");
        std::fs::write(&good, "# bulk\na 10\n\nb 20\n").unwrap();
        assert_eq!(
            read_jti_file(&good).unwrap(),
            vec![
                Revocation::Token {
                    jti: "a".into(),
                    expires_at: 10
                },
                Revocation::Token {
                    jti: "b".into(),
                    expires_at: 20
                }
            ]
        );
        let bad = dir.join("bad.txt");
        std::fs::write(&bad, "a 10\nb\n").unwrap();
        let error = read_jti_file(&bad).unwrap_err().to_string();
        assert!(error.contains("bad.txt:2"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
