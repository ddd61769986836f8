//! `CONFIG_FILE` (YAML, or TOML by its extension): the issuers, each with its own key source
//! and audiences (instead of JWT_ISSUER and JWKS_*), the rate limits, and the CEL rules
//! (`policies`, `default_policy`); any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::rate_limit::RateLimitSection;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub issuers: Vec<FileIssuer>,
    #[serde(default)]
    pub rate_limits: Option<RateLimitSection>,
    /// Named CEL rules: name -> expression (src/policy.rs).
    #[serde(default)]
    pub policies: BTreeMap<String, String>,
    /// The rule, by name, for routes that name none.
    #[serde(default)]
    pub default_policy: Option<String>,
}

/// One `issuers` entry, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIssuer {
    pub issuer: String,
    /// `None`: JWT_AUDIENCE applies.
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}

/// Reads and parses the file; a file with neither section is an error (a typo'd key would
/// otherwise leave the operator with none of what they wrote).
pub fn read(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let file: ConfigFile = if is_toml {
        toml::from_str(&text).map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?
    } else {
        serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("CONFIG_FILE {}: {e}", path.display()))?
    };
    if file.issuers.is_empty() && file.rate_limits.is_none() && file.policies.is_empty() {
        return Err(format!(
            "CONFIG_FILE {}: has neither `issuers` nor `rate_limits` nor `policies`",
            path.display()
        ));
    }
    Ok(file)
}
