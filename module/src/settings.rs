//! The module's own settings: what only an in-Envoy filter has. Everything else in the filter
//! config is one of the sidecar's env vars, read by the sidecar's own `config`.

use std::time::Duration;

use authz_sidecar::config::parse::{duration_within, in_range, text};

/// Each setting once: its key in the filter config, its default, and what it means.
pub const SETTINGS: [(&str, &str, &str); 4] = [
    (
        "CHECK_TIMEOUT",
        "250ms",
        "A Check's deadline, as ext_authz's `timeout`: a Check that must wait (Redis, a JWKS \
         fetch) and is not answered by then is a 503. 1ms-60s.",
    ),
    (
        "MODULE_THREADS",
        "1",
        "Threads of the module's runtime: background work (JWKS refresh, Redis, invalidations) \
         and the Checks that wait. Cached answers run on Envoy's workers. 1-64.",
    ),
    (
        "METADATA_NAMESPACE",
        "envoy.filters.http.ext_authz",
        "Dynamic metadata namespace of an allow's claims; ext_authz's, so access logs and \
         later filters read the same keys in both modes.",
    ),
    (
        "ALLOW_MEMO_ENTRIES",
        "10000",
        "Allows remembered per filter config (token and route), given again without building \
         a Check while the token cache's checks still pass; about 1-2 KB each. 0 turns it off. \
         0-1000000.",
    ),
];

#[derive(Debug, Clone)]
pub struct ModuleSettings {
    pub check_timeout: Duration,
    pub threads: usize,
    pub metadata_namespace: String,
    pub memo_entries: usize,
}

impl ModuleSettings {
    /// Whether `key` is one of these settings (else it is one of the sidecar's).
    pub fn owns(key: &str) -> bool {
        SETTINGS.iter().any(|(name, _, _)| *name == key)
    }

    /// From the filter config's module keys; the defaults for the others. Every bad value is
    /// reported, each with its key.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<ModuleSettings, String> {
        let value = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .or_else(|| {
                    SETTINGS
                        .iter()
                        .find(|(k, _, _)| *k == key)
                        .map(|(_, d, _)| *d)
                })
                .unwrap_or_default()
        };
        let mut problems = Vec::new();
        let mut note = |key: &str, e: String| problems.push(format!("{key}: {e}"));
        let check_timeout = duration_within(Duration::from_millis(1), Duration::from_secs(60))(
            value("CHECK_TIMEOUT"),
        )
        .unwrap_or_else(|e| {
            note("CHECK_TIMEOUT", e);
            Duration::ZERO
        });
        let threads = in_range(1usize, 64)(value("MODULE_THREADS")).unwrap_or_else(|e| {
            note("MODULE_THREADS", e);
            1
        });
        let metadata_namespace = text(value("METADATA_NAMESPACE"))
            .ok()
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| {
                note("METADATA_NAMESPACE", "must not be empty".into());
                String::new()
            });
        let memo_entries =
            in_range(0usize, 1_000_000)(value("ALLOW_MEMO_ENTRIES")).unwrap_or_else(|e| {
                note("ALLOW_MEMO_ENTRIES", e);
                0
            });
        match problems.is_empty() {
            true => Ok(ModuleSettings {
                check_timeout,
                threads,
                metadata_namespace,
                memo_entries,
            }),
            false => Err(problems.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_readme_lists_every_setting_with_its_default() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        for (key, default, _) in SETTINGS {
            let row = format!("| `{key}` | `{default}` |");
            assert!(readme.contains(&row), "README has no row {row}");
        }
    }

    #[test]
    fn defaults_hold_and_every_bad_value_is_named() {
        let settings = ModuleSettings::from_pairs(&[]).unwrap();
        assert_eq!(settings.check_timeout, Duration::from_millis(250));
        assert_eq!(settings.threads, 1);
        assert_eq!(settings.metadata_namespace, "envoy.filters.http.ext_authz");
        assert_eq!(settings.memo_entries, 10_000);
        let error = ModuleSettings::from_pairs(&pairs(&[
            ("CHECK_TIMEOUT", "2h"),
            ("MODULE_THREADS", "0"),
            ("ALLOW_MEMO_ENTRIES", "-1"),
        ]))
        .unwrap_err();
        assert!(
            error.contains("CHECK_TIMEOUT")
                && error.contains("MODULE_THREADS")
                && error.contains("ALLOW_MEMO_ENTRIES"),
            "{error}"
        );
    }
}
