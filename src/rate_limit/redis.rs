//! The Redis backend: one budget shared by every replica, through the revocation pool.
//!
//! One Check is one `EVALSHA` of a script that runs the same GCRA step as the local backend
//! for every bucket, on Redis's own clock (`TIME`, so replica clocks do not matter), and writes
//! the new TATs only if every bucket allows: atomic, all or nothing, one round trip. Each key
//! expires when its bucket is full again. Keys: `<prefix><policy>:<issuer>:<value>` etc.; on a
//! Redis Cluster put a hash tag in the prefix (`{ratelimit}:`) so one script's keys share a slot.
//!
//! The script is sent as a custom command, not through fred's `evalsha`: fred never pipelines
//! its EVAL/EVALSHA, so every call would wait for the one before it on the connection (and
//! behind a dead connection's timeout). A custom command pipelines like MGET; a NOSCRIPT
//! reply (Redis restarted, failed over, SCRIPT FLUSH) is answered by one EVAL, which caches it.
//!
//! Failures go through the backend's own breaker, with the lookup timeout and fail-fast options
//! of revocation lookups; the section's `failure_mode` decides what the Check gets.

use std::time::Duration;

use fred::prelude::*;
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};
use tracing::{info, warn};

use super::{Bucket, Outcome, Policy};
use crate::breaker::{Breaker, BreakerState};
use crate::redis::{PoolSettings, StoreError};

/// KEYS: one per bucket. ARGV: per bucket, its interval and tolerance in microseconds.
/// Returns {allowed (1/0), bucket (1-based), remaining, reset in microseconds}: for a refusal
/// the refusing bucket and the wait; else the bucket with the fewest requests left.
const SCRIPT: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tats = {}
local tightest, fewest, reset = 0, 0, 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '') or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > tolerance then
    return {0, i, 0, new_tat - now - tolerance}
  end
  tats[i] = new_tat
  local remaining = math.floor((tolerance - (new_tat - now)) / interval)
  if tightest == 0 or remaining < fewest then
    tightest, fewest, reset = i, remaining, new_tat - now
  end
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', tats[i]), 'PX',
    math.max(1, math.ceil((tats[i] - now) / 1000)))
end
return {1, tightest, fewest, reset}
"#;

pub struct RedisLimiter {
    pool: Pool,
    prefix: String,
    options: Options,
    timeout: Duration,
    breaker: Breaker,
    sha: String,
}

impl RedisLimiter {
    /// Rides `pool`, with its Check budget and a breaker of its own from `settings`.
    pub fn new(pool: Pool, prefix: String, settings: &PoolSettings) -> Self {
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            SCRIPT.as_bytes(),
        );
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        RedisLimiter {
            pool,
            prefix,
            options: settings.check_call_options(),
            timeout: settings.lookup_timeout,
            breaker: settings.breaker(),
            sha,
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub async fn spend(
        &self,
        buckets: &[Bucket],
        policies: &[Policy],
    ) -> Result<Outcome, StoreError> {
        if !self.breaker.admit() {
            return Err(StoreError::BreakerOpen);
        }
        // EVALSHA <sha> <numkeys> <keys...> <interval tolerance...>
        let mut args: Vec<Value> = Vec::with_capacity(2 + 3 * buckets.len());
        args.push(self.sha.as_str().into());
        args.push((buckets.len() as i64).into());
        for bucket in buckets {
            args.push(format!("{}{}", self.prefix, bucket.key).into());
        }
        for bucket in buckets {
            let policy = &policies[bucket.policy];
            args.push(micros(policy.interval()).into());
            args.push(micros(policy.tolerance()).into());
        }
        // On a cluster, the slot of the keys (the prefix's hash tag makes them share it).
        let slot = match &args[2] {
            Value::String(key) => fred::util::redis_keyslot(key.as_bytes()),
            _ => 0,
        };
        let command =
            |name: &'static str| CustomCommand::new_static(name, ClusterHash::Custom(slot), false);
        let client = self.pool.next_connected().with_options(&self.options);
        let call = async {
            let reply = client
                .custom::<Vec<i64>, Value>(command("EVALSHA"), args.clone())
                .await;
            match reply {
                Err(e) if e.details().contains("NOSCRIPT") => {
                    args[0] = SCRIPT.into();
                    client
                        .custom::<Vec<i64>, Value>(command("EVAL"), args)
                        .await
                }
                other => other,
            }
        };
        // fred's timeout is the real one; this only guards a reply path that never resolves.
        // Boxed, as the revocation lookup's: fred's futures would make every Check's future
        // many KB, copied on each move, with or without a rate limit.
        let reply = tokio::time::timeout(self.timeout * 2, Box::pin(call))
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "rate limit timed out")));
        match self.breaker.record(reply.is_ok()) {
            Some(BreakerState::Open) => warn!("Redis rate limits failing; circuit breaker open"),
            Some(BreakerState::Closed) => {
                info!("Redis rate limits answering again; breaker closed")
            }
            _ => {}
        }
        let reply = reply.map_err(|e| StoreError::from(&e))?;
        let [allowed, bucket, remaining, reset] = reply[..] else {
            return Err(StoreError::Other(format!(
                "unexpected script reply {reply:?}"
            )));
        };
        let bucket = usize::try_from(bucket - 1)
            .ok()
            .and_then(|i| buckets.get(i))
            .ok_or_else(|| StoreError::Other(format!("script named bucket {bucket}")))?;
        Ok(Outcome {
            policy: bucket.policy,
            limited: allowed == 0,
            remaining: remaining.max(0) as u64,
            reset: Duration::from_micros(reset.max(0) as u64),
        })
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
