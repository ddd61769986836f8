//! The `rate_limits` section of `CONFIG_FILE`: named policies, which of them apply by default,
//! and the backend that keeps their state. Read and validated once at startup.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use crate::claims::{KeptClaims, ReadsClaims};
use crate::config::parse::duration as parse_duration;
use crate::revocation::{FailureMode, RevocationConfig};

/// What a policy counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The verified token's `sub` (per issuer). Anonymous requests are not counted.
    Subject,
    /// Another verified claim, e.g. `client_id`: a string or a number. Tokens without it are
    /// not counted by this policy.
    Claim(String),
    /// The client address: Envoy's downstream peer, or a trusted `x-forwarded-for` entry.
    /// IPv6 clients are counted per /64, the block one subscriber usually holds.
    ClientIp,
    /// Every request through this sidecar (or through every replica, with Redis).
    Global,
}

/// One GCRA bucket definition: `rate` requests per `per`, at most `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub key: KeySource,
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Policy {
    /// What one request costs: the time it takes the bucket to earn it back.
    pub fn interval(&self) -> Duration {
        self.per / self.rate
    }

    /// How far ahead of now the bucket may be spent: `burst` requests.
    pub fn tolerance(&self) -> Duration {
        self.interval() * self.burst
    }
}

/// Where bucket state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterBackend {
    /// In this process: each replica enforces the full limit on its own share of traffic.
    Local,
    /// In Redis, through the revocation pool: one budget shared by every replica.
    Redis,
}

/// The validated `rate_limits` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub backend: LimiterBackend,
    /// What a Check gets when the Redis backend cannot answer.
    pub failure_mode: FailureMode,
    /// Local backend: buckets kept at most; the least recently used one goes first.
    pub max_keys: u64,
    /// Redis backend: prefix of every bucket key.
    pub key_prefix: String,
    /// Proxies in front of Envoy that append to `x-forwarded-for`; 0 uses Envoy's peer address.
    pub trusted_proxy_hops: usize,
    /// Add `RateLimit-Policy`/`RateLimit` to allowed responses too (429s always carry them).
    pub response_headers: bool,
    pub policies: Vec<Policy>,
    /// Indices into `policies` applied to routes that name none.
    pub default_policies: Vec<usize>,
}

impl ReadsClaims for RateLimitConfig {
    /// The claims `claim:<name>` policies key buckets by (`sub` is held typed anyway).
    fn claims_read(&self) -> KeptClaims {
        let claims = self.policies.iter().filter_map(|p| match &p.key {
            KeySource::Claim(claim) => Some(claim.clone()),
            _ => None,
        });
        KeptClaims::Named(claims.collect())
    }
}

impl RateLimitConfig {
    /// Whether these limits can run beside this revocation backend: the Redis limiter rides the
    /// revocation pool, and its keys must not land among the revocation keys (the limiter
    /// would write into them, and every write would be pushed to every sidecar's cache).
    pub fn fits(&self, revocation: &RevocationConfig) -> Result<(), String> {
        match (self.backend, revocation) {
            (LimiterBackend::Local, _) => Ok(()),
            (LimiterBackend::Redis, RevocationConfig::Memory { .. }) => Err(
                "rate_limits: backend redis rides the revocation Redis pool: set \
                 REVOCATION_BACKEND=redis and REDIS_URL"
                    .into(),
            ),
            (LimiterBackend::Redis, RevocationConfig::Redis(redis)) => {
                let (limit, revoked) = (&self.key_prefix, &redis.key_prefix);
                if limit.starts_with(revoked.as_str()) || revoked.starts_with(limit.as_str()) {
                    return Err(format!(
                        "rate_limits: key_prefix {limit:?} overlaps REVOKED_KEY_PREFIX \
                         {revoked:?}: the limiter would write into revocation keys (and every \
                         write would be pushed to every sidecar as an invalidation); give them \
                         prefixes neither of which starts the other"
                    ));
                }
                if crate::redis::is_cluster_url(&redis.pool.url)
                    && !crate::redis::has_hash_tag(limit)
                {
                    return Err(format!(
                        "rate_limits: on a Redis Cluster, key_prefix {limit:?} needs a hash tag \
                         (e.g. \"{{ratelimit}}:\"): one Check's buckets are spent in one script, \
                         which Redis runs only on keys of one slot"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The policy indices a route's `rate_limit` extension names; `none` names no policy.
    pub fn resolve(&self, names: &[&str]) -> Result<Vec<usize>, String> {
        if names == ["none"] {
            return Ok(Vec::new());
        }
        names
            .iter()
            .map(|name| {
                self.policies
                    .iter()
                    .position(|p| p.name == *name)
                    .ok_or_else(|| format!("rate_limit names unknown policy {name:?}"))
            })
            .collect()
    }
}

/// The section as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    failure_mode: Option<String>,
    #[serde(default)]
    max_keys: Option<u64>,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    trusted_proxy_hops: Option<usize>,
    #[serde(default)]
    response_headers: Option<bool>,
    /// Policy names applied where a route names none; empty: only routes that opt in.
    #[serde(default)]
    default: Vec<String>,
    policies: HashMap<String, PolicySection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    key: String,
    rate: u32,
    per: String,
    #[serde(default)]
    burst: Option<u32>,
}

/// Defaults of the section, documented in the README's "Rate limits".
const DEFAULT_MAX_KEYS: u64 = 100_000;
const DEFAULT_KEY_PREFIX: &str = "ratelimit:";
/// The Lua script counts in microseconds: one request may cost no less.
const MIN_INTERVAL: Duration = Duration::from_micros(1);

impl RateLimitSection {
    /// Every problem in the section, prefixed with where it is.
    pub fn validate(self) -> Result<RateLimitConfig, Vec<String>> {
        let mut problems = Vec::new();
        let backend = match self.backend.as_deref().unwrap_or("local") {
            "local" => LimiterBackend::Local,
            "redis" => LimiterBackend::Redis,
            other => {
                problems.push(format!("backend {other:?} is not one of: local, redis"));
                LimiterBackend::Local
            }
        };
        // Open by default: a limiter outage should not lock every user out.
        let failure_mode = match self.failure_mode.as_deref().unwrap_or("open") {
            "open" => FailureMode::Open,
            "closed" => FailureMode::Closed,
            other => {
                problems.push(format!(
                    "failure_mode {other:?} is not one of: open, closed"
                ));
                FailureMode::Open
            }
        };
        let max_keys = self.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if !(1..=100_000_000).contains(&max_keys) {
            problems.push(format!("max_keys {max_keys} is not in 1..=100000000"));
        }
        let trusted_proxy_hops = self.trusted_proxy_hops.unwrap_or(0);
        if trusted_proxy_hops > 16 {
            problems.push(format!(
                "trusted_proxy_hops {trusted_proxy_hops} is above 16"
            ));
        }
        if self.policies.is_empty() {
            problems.push("policies is empty".into());
        }
        let mut policies: Vec<Policy> = Vec::new();
        for (name, section) in self.policies {
            match section.validate(&name) {
                Ok(policy) => policies.push(policy),
                Err(problem) => problems.push(format!("policy {name:?}: {problem}")),
            }
        }
        // A stable order, whatever order the map came in.
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut config = RateLimitConfig {
            backend,
            failure_mode,
            max_keys,
            key_prefix: self
                .key_prefix
                .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned()),
            trusted_proxy_hops,
            response_headers: self.response_headers.unwrap_or(false),
            policies,
            default_policies: Vec::new(),
        };
        let names: Vec<&str> = self.default.iter().map(String::as_str).collect();
        if names.contains(&"none") {
            problems.push("default: `none` is for routes; leave `default` out instead".into());
        } else {
            match config.resolve(&names) {
                Ok(indices) => config.default_policies = indices,
                Err(problem) => problems.push(format!("default: {problem}")),
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems
                .into_iter()
                .map(|p| format!("rate_limits: {p}"))
                .collect())
        }
    }
}

impl PolicySection {
    fn validate(self, name: &str) -> Result<Policy, String> {
        if name.is_empty()
            || name == "none"
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err("a name is letters, digits, '-', '_' or '.', and not `none`".into());
        }
        let key = match self.key.trim() {
            "subject" => KeySource::Subject,
            "client_ip" => KeySource::ClientIp,
            "global" => KeySource::Global,
            other => match other.strip_prefix("claim:") {
                Some(claim) if !claim.is_empty() => KeySource::Claim(claim.to_owned()),
                _ => {
                    return Err(format!(
                        "key {other:?} is not one of: subject, client_ip, global, claim:<name>"
                    ));
                }
            },
        };
        let per = parse_duration(&self.per).map_err(|e| format!("per: {e}"))?;
        if per < Duration::from_secs(1) || per.subsec_nanos() != 0 {
            return Err(format!(
                "per {:?} must be whole seconds (RateLimit headers count in seconds)",
                self.per
            ));
        }
        if self.rate == 0 {
            return Err("rate must be at least 1".into());
        }
        let burst = self.burst.unwrap_or(self.rate);
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        let policy = Policy {
            name: name.to_owned(),
            key,
            rate: self.rate,
            per,
            burst,
        };
        if policy.interval() < MIN_INTERVAL {
            return Err("more than 1,000,000 requests per second".into());
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> Result<RateLimitConfig, Vec<String>> {
        serde_yaml_ng::from_str::<RateLimitSection>(yaml)
            .unwrap()
            .validate()
    }

    #[test]
    fn reads_policies_with_defaults() {
        let config = section(
            "default: [per-user]\npolicies:\n  per-user: {key: subject, rate: 5, per: 1s}\n  \
             orders: {key: 'claim:client_id', rate: 60, per: 1m, burst: 10}\n",
        )
        .unwrap();
        assert_eq!(config.backend, LimiterBackend::Local);
        assert_eq!(config.failure_mode, FailureMode::Open);
        assert_eq!(config.max_keys, DEFAULT_MAX_KEYS);
        assert_eq!(config.policies[0].name, "orders");
        assert_eq!(config.policies[0].key, KeySource::Claim("client_id".into()));
        assert_eq!(config.policies[0].interval(), Duration::from_secs(1));
        assert_eq!(config.policies[0].tolerance(), Duration::from_secs(10));
        assert_eq!(config.policies[1].burst, 5, "burst defaults to rate");
        assert_eq!(config.default_policies, vec![1]);
        assert_eq!(config.resolve(&["orders", "per-user"]), Ok(vec![0, 1]));
        assert_eq!(config.resolve(&["none"]), Ok(vec![]));
        assert!(config.resolve(&["order"]).unwrap_err().contains("order"));
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let problems = section(
            "backend: memcached\nfailure_mode: maybe\ndefault: [missing]\npolicies:\n  \
             a: {key: user, rate: 1, per: 1s}\n  b: {key: subject, rate: 0, per: 1s}\n  \
             c: {key: subject, rate: 1, per: 500ms}\n  d: {key: 'claim:', rate: 1, per: 1s}\n",
        )
        .unwrap_err();
        for needle in [
            "backend \"memcached\"",
            "failure_mode \"maybe\"",
            "default: rate_limit names unknown policy \"missing\"",
            "policy \"a\": key \"user\"",
            "policy \"b\": rate must be at least 1",
            "policy \"c\": per \"500ms\" must be whole seconds",
            "policy \"d\": key \"claim:\"",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle:?} not in {problems:#?}"
            );
        }
        assert!(problems.iter().all(|p| p.starts_with("rate_limits: ")));
        assert!(
            serde_yaml_ng::from_str::<RateLimitSection>("policies: {}\nburst_size: 3\n").is_err(),
            "unknown fields are rejected"
        );
    }
}
