//! The trusted issuers, from JWT_ISSUER (one key source for all) or from CONFIG_FILE (each its
//! own), and the rules every issuer's key source must meet.

use std::collections::HashSet;
use std::path::PathBuf;

use super::Settings;
use super::file::{self, FileIssuer};
use super::parse::split_list;
use crate::jwks::{IssuerConfig, JwksSource, discovery_url, insecure_url, is_loopback};

/// The names of the issuers these settings trust (JWT_ISSUER, or CONFIG_FILE's `issuers`),
/// without validating the rest: what `revoke` checks a subject's issuer against.
pub fn issuer_names(s: &Settings) -> Result<Vec<String>, String> {
    let from_file = match &s.config_file {
        Some(path) => file::read(path)?.issuers,
        None => Vec::new(),
    };
    Ok(if from_file.is_empty() {
        split_list(s.jwt_issuer.as_deref().unwrap_or(""))
    } else {
        from_file.into_iter().map(|i| i.issuer).collect()
    })
}

/// Every issuer with its audiences (`audiences`: JWT_AUDIENCE) and key source.
pub fn read(
    s: &Settings,
    audiences: &[String],
    from_file: Vec<FileIssuer>,
) -> Result<Vec<IssuerConfig>, String> {
    let from_env = split_list(s.jwt_issuer.as_deref().unwrap_or(""));
    let issuers = match (from_file.is_empty(), from_env.is_empty()) {
        (false, false) => {
            return Err("set issuers in CONFIG_FILE or in JWT_ISSUER, not both".into());
        }
        (true, true) => {
            return Err("JWT_ISSUER is required (or CONFIG_FILE listing issuers)".into());
        }
        (true, false) => {
            let source = jwks_source(s.jwks_url.clone(), s.jwks_file.clone())
                .map_err(|e| format!("JWKS_URL/JWKS_FILE: {e}"))?;
            from_env
                .into_iter()
                .map(|issuer| IssuerConfig {
                    issuer,
                    audiences: audiences.to_vec(),
                    jwks: source.clone(),
                })
                .collect()
        }
        (false, true) => {
            if s.jwks_url.is_some() || s.jwks_file.is_some() {
                return Err(
                    "JWKS_URL/JWKS_FILE apply to JWT_ISSUER; with CONFIG_FILE set \
                            jwks_url/jwks_file per issuer"
                        .into(),
                );
            }
            from_file
                .into_iter()
                .map(|entry| from_file_entry(entry, audiences))
                .collect::<Result<Vec<_>, String>>()?
        }
    };
    let mut seen = HashSet::new();
    for issuer in &issuers {
        if issuer.issuer.is_empty() {
            return Err("an issuer is empty".into());
        }
        if !seen.insert(&issuer.issuer) {
            return Err(format!("issuer {:?} is listed twice", issuer.issuer));
        }
        if issuer.jwks == JwksSource::Discovery && !is_http_url(&issuer.issuer) {
            return Err(format!(
                "issuer {:?} has no JWKS_URL/JWKS_FILE and is not an http(s) URL for discovery",
                issuer.issuer
            ));
        }
    }
    Ok(issuers)
}

fn from_file_entry(entry: FileIssuer, audiences: &[String]) -> Result<IssuerConfig, String> {
    if entry.audiences.as_ref().is_some_and(Vec::is_empty) && !audiences.is_empty() {
        return Err(format!(
            "CONFIG_FILE issuer {:?}: `audiences: []` would stop checking `aud` for this issuer \
             although JWT_AUDIENCE is set; omit the line to use JWT_AUDIENCE, or list this \
             issuer's audiences",
            entry.issuer
        ));
    }
    let jwks = jwks_source(entry.jwks_url, entry.jwks_file)
        .map_err(|e| format!("CONFIG_FILE issuer {:?}: {e}", entry.issuer))?;
    Ok(IssuerConfig {
        audiences: entry.audiences.unwrap_or_else(|| audiences.to_vec()),
        issuer: entry.issuer,
        jwks,
    })
}

/// Refuses a key source over plaintext http to a host that is not loopback, unless
/// `allow_http`; then returns the warning to log at startup.
pub fn plaintext_key_source(
    issuer: &IssuerConfig,
    allow_http: bool,
) -> Result<Option<String>, String> {
    let url = match &issuer.jwks {
        JwksSource::Url(url) => url.clone(),
        JwksSource::Discovery => discovery_url(&issuer.issuer),
        JwksSource::File(_) => return Ok(None),
    };
    let Ok(url) = reqwest::Url::parse(&url) else {
        return Ok(None);
    };
    if let Some(why) = insecure_url(&url, allow_http) {
        return Err(format!("issuer {:?}: {why}", issuer.issuer));
    }
    if url.scheme() == "http" && !is_loopback(&url) {
        return Ok(Some(format!(
            "issuer {:?}: keys are fetched over plaintext http ({url}): anyone on the path can \
             replace them (JWKS_ALLOW_HTTP=true)",
            issuer.issuer
        )));
    }
    Ok(None)
}

fn jwks_source(url: Option<String>, file: Option<PathBuf>) -> Result<JwksSource, String> {
    match (
        url.filter(|u| !u.is_empty()),
        file.filter(|f| !f.as_os_str().is_empty()),
    ) {
        (Some(_), Some(_)) => Err("set a JWKS URL or a JWKS file, not both".into()),
        (Some(url), None) if is_http_url(&url) => Ok(JwksSource::Url(url)),
        (Some(url), None) => Err(format!("{url:?} is not an http:// or https:// URL")),
        (None, Some(file)) => Ok(JwksSource::File(file)),
        (None, None) => Ok(JwksSource::Discovery),
    }
}

fn is_http_url(value: &str) -> bool {
    reqwest::Url::parse(value).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}
