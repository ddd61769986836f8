//! A circuit breaker for a dependency on the request path: after `threshold` consecutive
//! failures it opens and callers fail at once (microseconds instead of a timeout each) for
//! `cooldown`; then one probe is let through, and its outcome closes or re-opens it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out. If it never reports (its caller was cancelled), another probe is
    /// allowed after `cooldown`, so the breaker cannot stick half-open.
    HalfOpen {
        probe_started: Instant,
    },
}

#[derive(Debug)]
pub struct Breaker {
    /// A std Mutex: held for a few instructions, never across an await.
    inner: Mutex<Inner>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// `threshold` of 0 disables the breaker (it never opens).
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            threshold,
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go to the dependency now. Each `true` must be followed by `record`.
    pub fn admit(&self) -> bool {
        let mut inner = self.lock();
        let now = Instant::now();
        let blocked = match *inner {
            Inner::Closed { .. } => return true,
            Inner::Open { until } => now < until,
            Inner::HalfOpen { probe_started } => now < probe_started + self.cooldown,
        };
        if blocked {
            return false;
        }
        *inner = Inner::HalfOpen { probe_started: now };
        true
    }

    /// Reports a call's outcome; returns the new state when it changed (for a log line).
    pub fn record(&self, success: bool) -> Option<BreakerState> {
        let mut inner = self.lock();
        let was_closed = matches!(*inner, Inner::Closed { .. });
        *inner = match (&*inner, success) {
            (_, true) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, false)
                if self.threshold == 0 || failures + 1 < self.threshold =>
            {
                Inner::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => Inner::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        match (&*inner, was_closed) {
            (Inner::Closed { .. }, false) => Some(BreakerState::Closed),
            (Inner::Open { .. }, true) => Some(BreakerState::Open),
            _ => None,
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            // Cooldown over: the next call will probe.
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let breaker = Breaker::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            assert!(breaker.admit());
            breaker.record(false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit());
        assert_eq!(breaker.record(false), Some(BreakerState::Open));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.admit(), "open: fail at once");

        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.admit(), "cooldown over: one probe");
        assert!(!breaker.admit(), "only one probe at a time");
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Open, "failed probe re-opens");

        std::thread::sleep(Duration::from_millis(60));
        assert!(breaker.admit());
        assert_eq!(breaker.record(true), Some(BreakerState::Closed));
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.record(true), None, "no change, no log line");
        assert!(breaker.admit());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.record(false);
        breaker.record(true);
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_lost_probe_does_not_stick_half_open() {
        let breaker = Breaker::new(1, Duration::from_millis(30));
        breaker.record(false);
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            breaker.admit(),
            "probe admitted, then its caller is cancelled"
        );
        assert!(!breaker.admit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.admit(), "a new probe once the lost one is overdue");
    }

    #[test]
    fn threshold_zero_never_opens() {
        let breaker = Breaker::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            breaker.record(false);
        }
        assert!(breaker.admit());
    }
}
