//! Request rate limits, enforced in the Check once a request would otherwise be allowed: the
//! token verified and is not revoked (or the route is anonymous). So a denied or forged token
//! never spends a real subject's budget, and a limit only ever turns an allow into a 429.
//!
//! Every policy is a GCRA bucket (the generic cell rate algorithm, the token bucket written
//! as one timestamp): a key's state is its theoretical arrival time (TAT). Each request moves
//! the TAT one `interval` (`per / rate`) ahead of max(TAT, now); a request that would push it
//! more than `burst` intervals past now is refused and changes nothing. A key whose TAT has
//! passed is a full bucket, so its state can be dropped: that is how idle keys expire.
//!
//! A Check under several policies passes only if all pass, and then spends from all; a refusal
//! spends from none (the local backend refunds, the Redis script writes nothing).

pub mod local;
pub mod policy;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::claims::Claims;
use crate::metrics::Metrics;
use crate::revocation::FailureMode;
use crate::revocation::redis::key_part;
use crate::throttle::LogThrottle;
pub use local::LocalLimiter;
pub use policy::{KeySource, LimiterBackend, Policy, RateLimitConfig, RateLimitSection};
pub use redis::RedisLimiter;

/// The answer of one GCRA step for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Spend it: store `tat` as the key's new state.
    Allowed { tat: Duration, remaining: u64 },
    /// Refused; the earliest a retry can pass is `retry_after` from now.
    Limited { retry_after: Duration },
}

/// One GCRA step. Times are offsets from any fixed origin; `tat` is `None` for a key with no
/// state (never seen, or expired because its TAT passed).
pub fn gcra(tat: Option<Duration>, now: Duration, policy: &Policy) -> Step {
    let (interval, tolerance) = (policy.interval(), policy.tolerance());
    let new_tat = tat.map_or(now, |tat| tat.max(now)) + interval;
    let ahead = new_tat - now;
    if ahead > tolerance {
        return Step::Limited {
            retry_after: ahead - tolerance,
        };
    }
    let remaining = ((tolerance - ahead).as_nanos() / interval.as_nanos()) as u64;
    Step::Allowed {
        tat: new_tat,
        remaining,
    }
}

/// What the limits said about one Check: about the policy closest to refusing it (or the one
/// that did), for the `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Index of the policy in [`RateLimitConfig::policies`].
    pub policy: usize,
    pub limited: bool,
    /// Requests left in the bucket now (0 when limited).
    pub remaining: u64,
    /// Limited: the wait before a retry can pass. Allowed: until the bucket is full again.
    pub reset: Duration,
}

/// One bucket a Check spends from: the policy and the key it counts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub policy: usize,
    pub key: String,
}

/// The backend, an enum so a Check's call is a plain `async fn` (no boxing per Check).
pub enum Backend {
    Local(LocalLimiter),
    Redis(RedisLimiter),
}

/// The request facts limits are keyed by.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// The verified issuer and claims; `None` for an anonymous request.
    pub token: Option<(&'a str, &'a Claims)>,
    pub ip: Option<IpAddr>,
}

/// What the limiter could not do: the route named a policy that does not exist, or the backend
/// failed and the failure mode is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    BadRoute(String),
    Unavailable,
}

pub struct RateLimiter {
    config: RateLimitConfig,
    backend: Backend,
    metrics: Arc<Metrics>,
    warnings: LogThrottle,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig, backend: Backend, metrics: Arc<Metrics>) -> Self {
        RateLimiter {
            config,
            backend,
            metrics,
            warnings: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// How many buckets the local backend holds; `None` for Redis.
    pub fn local_keys(&self) -> Option<u64> {
        match &self.backend {
            Backend::Local(local) => Some(local.len()),
            Backend::Redis(_) => None,
        }
    }

    /// Spends one request from every bucket the route's policies (or the defaults) key this
    /// caller under. `Ok(None)`: no policy applied.
    pub async fn check(
        &self,
        route_policies: Option<&[&str]>,
        caller: Caller<'_>,
    ) -> Result<Option<Outcome>, LimitError> {
        let resolved;
        let policies = match route_policies {
            Some(names) => {
                resolved = self.config.resolve(names).map_err(LimitError::BadRoute)?;
                &resolved
            }
            None => &self.config.default_policies,
        };
        let buckets: Vec<Bucket> = policies
            .iter()
            .filter_map(|&policy| {
                let key = bucket_key(&self.config.policies[policy], caller)?;
                Some(Bucket { policy, key })
            })
            .collect();
        if buckets.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let spent = match &self.backend {
            Backend::Local(local) => Ok(local.spend(&buckets, &self.config.policies)),
            Backend::Redis(redis) => redis.spend(&buckets, &self.config.policies).await.map(Some),
        };
        self.metrics.rate_limit_duration.record(started.elapsed());
        match spent {
            Ok(outcome) => Ok(outcome),
            Err(error) => {
                self.metrics.rate_limit_error(&error);
                let fail_open = self.config.failure_mode == FailureMode::Open;
                if let Some(held_back) = self.warnings.allow() {
                    warn!(kind = error.label(), %error, fail_open, held_back,
                        "rate limit backend failed");
                }
                if fail_open {
                    Ok(None)
                } else {
                    Err(LimitError::Unavailable)
                }
            }
        }
    }
}

/// The key a policy counts this caller under, or `None` when the policy does not apply to it
/// (an anonymous caller under a subject policy, a token without the claim, no address).
/// Shaped like the revocation keys: `<policy>:<issuer>:<value>` (the value's `%` and `:`
/// encoded, so two issuers never share a bucket), `<policy>:<ip>`, `<policy>`.
fn bucket_key(policy: &Policy, caller: Caller<'_>) -> Option<String> {
    let name = &policy.name;
    match &policy.key {
        KeySource::Subject => {
            let (issuer, claims) = caller.token?;
            Some(format!(
                "{name}:{issuer}:{}",
                key_part(claims.sub.as_deref()?)
            ))
        }
        KeySource::Claim(claim) => {
            let (issuer, claims) = caller.token?;
            match claims.value(claim)?.as_ref() {
                serde_json::Value::String(s) => Some(format!("{name}:{issuer}:{}", key_part(s))),
                serde_json::Value::Number(n) => Some(format!("{name}:{issuer}:{n}")),
                _ => None,
            }
        }
        KeySource::ClientIp => Some(format!("{name}:{}", caller.ip?)),
        KeySource::Global => Some(name.clone()),
    }
}

/// Whole seconds, rounded up, as the `Retry-After` and `RateLimit` headers count: never 0 for
/// a wait that is not over.
pub fn ceil_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate: u32, per_secs: u64, burst: u32) -> Policy {
        Policy {
            name: "p".into(),
            key: KeySource::Global,
            rate,
            per: Duration::from_secs(per_secs),
            burst,
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let p = policy(1, 1, 3);
        let (mut tat, now) = (None, Duration::from_secs(100));
        for expected_remaining in [2, 1, 0] {
            match gcra(tat, now, &p) {
                Step::Allowed { tat: t, remaining } => {
                    assert_eq!(remaining, expected_remaining);
                    tat = Some(t);
                }
                limited => panic!("{limited:?}"),
            }
        }
        assert_eq!(
            gcra(tat, now, &p),
            Step::Limited {
                retry_after: Duration::from_secs(1)
            }
        );
        let later = now + Duration::from_millis(400);
        assert_eq!(
            gcra(tat, later, &p),
            Step::Limited {
                retry_after: Duration::from_millis(600)
            }
        );
        let after_one = now + Duration::from_secs(1);
        assert!(matches!(
            gcra(tat, after_one, &p),
            Step::Allowed { remaining: 0, .. }
        ));
        // A key idle for longer than the bucket takes to fill is a full bucket again.
        let idle = now + Duration::from_secs(10);
        assert!(matches!(
            gcra(tat, idle, &p),
            Step::Allowed { remaining: 2, .. }
        ));
    }

    #[test]
    fn a_rate_per_minute_earns_one_request_per_interval() {
        let p = policy(60, 60, 60);
        assert_eq!(p.interval(), Duration::from_secs(1));
        let now = Duration::from_secs(5);
        let Step::Allowed { remaining, .. } = gcra(None, now, &p) else {
            panic!()
        };
        assert_eq!(remaining, 59);
    }

    #[test]
    fn keys_apply_only_to_callers_they_can_name() {
        let claims = Claims {
            sub: Some("alice".into()),
            all: serde_json::json!({"sub": "alice", "client_id": 42, "tags": ["x"]})
                .as_object()
                .unwrap()
                .clone()
                .into(),
            ..Claims::default()
        };
        let with = |key: KeySource| Policy {
            key,
            ..policy(1, 1, 1)
        };
        let token = Caller {
            token: Some(("iss", &claims)),
            ip: Some("192.0.2.1".parse().unwrap()),
        };
        let anonymous = Caller {
            token: None,
            ..token
        };
        assert_eq!(
            bucket_key(&with(KeySource::Subject), token).as_deref(),
            Some("p:iss:alice")
        );
        assert_eq!(bucket_key(&with(KeySource::Subject), anonymous), None);
        assert_eq!(
            bucket_key(&with(KeySource::Claim("client_id".into())), token).as_deref(),
            Some("p:iss:42")
        );
        assert_eq!(
            bucket_key(&with(KeySource::Claim("tags".into())), token),
            None
        );
        assert_eq!(
            bucket_key(&with(KeySource::ClientIp), anonymous).as_deref(),
            Some("p:192.0.2.1")
        );
        assert_eq!(
            bucket_key(&with(KeySource::Global), anonymous).as_deref(),
            Some("p")
        );
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(ceil_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ceil_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ceil_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_seconds(Duration::ZERO), 0);
    }
}
