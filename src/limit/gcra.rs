//! One GCRA bucket on governor and the injectable [`Clock`]: takes `cost`
//! cells or nothing, and reports the quota state the headers are made of.

use std::num::NonZeroU32;

use governor::RateLimiter;
use governor::clock::Clock as _;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};

use super::{RateLimitPolicy, RateState};
use crate::clock::Clock;

type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// One bucket: governor's GCRA with the instant it will be whole again.
pub struct GcraBucket {
    policy: RateLimitPolicy,
    limiter: Direct,
    clock: Clock,
    period_nanos: u64,
}

impl GcraBucket {
    pub fn new(policy: RateLimitPolicy, clock: Clock) -> GcraBucket {
        let quota = policy.quota();
        let period_nanos = quota.replenish_interval().as_nanos() as u64;
        GcraBucket {
            policy,
            limiter: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
            period_nanos,
        }
    }

    pub fn policy(&self) -> RateLimitPolicy {
        self.policy
    }

    /// Takes `cost` cells if they are all there; otherwise takes nothing.
    #[inline]
    pub fn check(&self, cost: u32) -> (bool, RateState) {
        let burst = self.policy.effective_burst();
        let mut state = RateState {
            limit: self.policy.requests,
            remaining: 0,
            reset_seconds: 0,
            window_seconds: self.policy.window_seconds,
            retry_after_ms: 0,
        };
        let n = NonZeroU32::new(cost.max(1)).expect(">= 1");
        match self.limiter.check_n(n) {
            Ok(Ok(snapshot)) => {
                state.remaining = (snapshot.remaining_burst_capacity() as u64).min(state.limit);
                let missing = burst.saturating_sub(state.remaining);
                state.reset_seconds = ceil_seconds(missing * self.period_nanos);
                (true, state)
            }
            Ok(Err(not_until)) => {
                let now = self.clock.now();
                let wait = not_until.wait_time_from(now).as_nanos() as u64;
                // `cost` cells conform after `wait`, so about wait/period
                // fewer than `cost` are there now.
                let short = wait.div_ceil(self.period_nanos.max(1));
                state.remaining = (n.get() as u64).saturating_sub(short).min(state.limit);
                if state.remaining >= n.get() as u64 {
                    state.remaining = n.get() as u64 - 1;
                }
                state.retry_after_ms = wait.div_ceil(1_000_000).max(1);
                state.reset_seconds = ceil_seconds(wait).max(1);
                (false, state)
            }
            Err(_insufficient) => {
                // More than the whole burst: this request can never pass.
                state.retry_after_ms = self.policy.window_seconds * 1000;
                state.reset_seconds = self.policy.window_seconds;
                (false, state)
            }
        }
    }
}

impl GcraBucket {
    /// Whether every cell is back, found by taking the whole burst: a
    /// denied take takes nothing, and a whole bucket that was emptied this
    /// way is about to be dropped. For housekeeping only, when no request
    /// can reach the bucket any more.
    pub fn drain_if_full(&self) -> bool {
        let burst = NonZeroU32::new(self.policy.effective_burst().clamp(1, u32::MAX as u64) as u32).expect(">= 1");
        matches!(self.limiter.check_n(burst), Ok(Ok(_)))
    }
}

fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(requests: u64, window_seconds: u64, burst: u64) -> RateLimitPolicy {
        RateLimitPolicy { requests, window_seconds, burst, per_tenant: false }
    }

    #[test]
    fn burst_then_refill() {
        let clock = Clock::manual(1_000);
        let l = GcraBucket::new(policy(5, 60, 0), clock.clone());
        for left in (0..5).rev() {
            let (ok, s) = l.check(1);
            assert!(ok);
            assert_eq!(s.remaining, left);
            assert_eq!(s.limit, 5);
        }
        let (ok, s) = l.check(1);
        assert!(!ok);
        assert_eq!(s.remaining, 0);
        assert_eq!(s.retry_after_ms, 12_000, "one cell every 12 s");
        assert_eq!(s.reset_seconds, 12);
        clock.advance(Duration::from_secs(12));
        let (ok, s) = l.check(1);
        assert!(ok, "a cell came back");
        assert_eq!(s.remaining, 0);
        assert_eq!(s.reset_seconds, 60, "the whole burst is back in a window");
    }

    #[test]
    fn reset_header_counts_missing_cells() {
        let clock = Clock::manual(0);
        let l = GcraBucket::new(policy(10, 10, 0), clock.clone());
        let (_, s) = l.check(3);
        assert_eq!(s.remaining, 7);
        assert_eq!(s.reset_seconds, 3);
    }

    #[test]
    fn cost_above_one_and_denial_takes_nothing() {
        let clock = Clock::manual(0);
        let l = GcraBucket::new(policy(10, 10, 0), clock.clone());
        assert!(l.check(8).0);
        let (ok, s) = l.check(5);
        assert!(!ok);
        assert_eq!(s.remaining, 2, "the denied batch took nothing");
        assert_eq!(s.retry_after_ms, 3_000);
        let (ok, s) = l.check(2);
        assert!(ok, "the two cells that were left are still there");
        assert_eq!(s.remaining, 0);
        let (ok, s) = l.check(11);
        assert!(!ok, "more than the burst can never pass");
        assert_eq!(s.retry_after_ms, 10_000);
    }

    #[test]
    fn a_bucket_knows_when_it_is_whole_again() {
        let clock = Clock::manual(0);
        let fresh = GcraBucket::new(policy(10, 10, 0), clock.clone());
        assert!(fresh.drain_if_full(), "a new bucket is whole");
        let l = GcraBucket::new(policy(10, 10, 0), clock.clone());
        l.check(3);
        assert!(!l.drain_if_full());
        assert_eq!(l.check(1).1.remaining, 6, "a failed test takes nothing");
        clock.advance(Duration::from_millis(3_999));
        assert!(!l.drain_if_full());
        clock.advance(Duration::from_millis(1));
        assert!(l.drain_if_full(), "four cells at one a second");
    }
}
