//! The local backend: buckets in this process, each replica enforcing the full limit on the
//! share of traffic it receives.
//!
//! A moka cache of key -> TAT. Why moka: it bounds the key count (`max_keys`), expires each key
//! the moment its bucket is full again (its state is then worthless), and `and_compute_with`
//! serialises updates per key without a lock of ours: no lock is held across an await because
//! there is no await. LRU rather than moka's default TinyLFU admission, which may refuse to
//! store a new key at all when full: a refused key would be a key never limited.
//!
//! Time is tokio's clock, so tests drive it with a paused clock instead of sleeping.

use std::time::Duration;

use metrics::Counter;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use tokio::time::Instant;

use super::{Bucket, Outcome, Policy, Step, gcra};

#[derive(Debug, Clone, Copy)]
struct State {
    tat: Duration,
    /// How long until the TAT passes, when this state was written: its time to live.
    ttl: Duration,
}

struct UntilFull;

impl moka::Expiry<String, State> for UntilFull {
    fn expire_after_create(
        &self,
        _key: &String,
        state: &State,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(state.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        state: &State,
        _updated_at: std::time::Instant,
        _until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(state.ttl)
    }
}

pub struct LocalLimiter {
    buckets: Cache<String, State>,
    origin: Instant,
}

impl LocalLimiter {
    /// `evicted` counts keys pushed out by the `max_keys` bound (their buckets restart full).
    pub fn new(max_keys: u64, evicted: Counter) -> Self {
        let buckets = Cache::builder()
            .max_capacity(max_keys)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(UntilFull)
            .eviction_listener(move |_key, _state, cause| {
                if cause == RemovalCause::Size {
                    evicted.increment(1);
                }
            })
            .build();
        LocalLimiter {
            buckets,
            origin: Instant::now(),
        }
    }

    /// Keys with a bucket that is not full (approximate).
    pub fn len(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spends one request from every bucket, or from none if any refuses.
    pub fn spend(&self, buckets: &[Bucket], policies: &[Policy]) -> Option<Outcome> {
        let now = self.origin.elapsed();
        let mut tightest: Option<Outcome> = None;
        for (spent, bucket) in buckets.iter().enumerate() {
            let policy = &policies[bucket.policy];
            let mut step = None;
            self.buckets
                .entry_by_ref(&bucket.key)
                .and_compute_with(|entry| {
                    let answer = gcra(entry.map(|e| e.into_value().tat), now, policy);
                    step = Some(answer);
                    match answer {
                        Step::Allowed { tat, .. } => Op::Put(State {
                            tat,
                            ttl: tat - now,
                        }),
                        Step::Limited { .. } => Op::Nop,
                    }
                });
            match step? {
                Step::Limited { retry_after } => {
                    self.refund(&buckets[..spent], policies, now);
                    return Some(Outcome {
                        policy: bucket.policy,
                        limited: true,
                        remaining: 0,
                        reset: retry_after,
                    });
                }
                Step::Allowed { tat, remaining } => {
                    if tightest.is_none_or(|t| remaining < t.remaining) {
                        tightest = Some(Outcome {
                            policy: bucket.policy,
                            limited: false,
                            remaining,
                            reset: tat - now,
                        });
                    }
                }
            }
        }
        tightest
    }

    /// Gives back the request just spent from these buckets (another policy refused it).
    fn refund(&self, buckets: &[Bucket], policies: &[Policy], now: Duration) {
        for bucket in buckets {
            let interval = policies[bucket.policy].interval();
            self.buckets
                .entry_by_ref(&bucket.key)
                .and_compute_with(|entry| {
                    let Some(entry) = entry else { return Op::Nop };
                    let tat = entry.into_value().tat.saturating_sub(interval);
                    if tat <= now {
                        Op::Remove
                    } else {
                        Op::Put(State {
                            tat,
                            ttl: tat - now,
                        })
                    }
                });
        }
    }
}
