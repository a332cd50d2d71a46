//! One GCRA bucket (README, "Rate limits") on the injectable [`Clock`]:
//! the whole state is one theoretical arrival time in an atomic, so a
//! bucket can take `cost` cells or nothing, give cells back (a request
//! denied by another of its limits takes nothing from this one), and say
//! whether it is whole without changing it. Governor cannot give cells back,
//! which is why this is written here.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{RateLimitPolicy, RateState};
use crate::clock::Clock;

/// One bucket: cells come back one per `period`; at most `burst` are held.
pub struct GcraBucket {
    policy: RateLimitPolicy,
    /// Theoretical arrival time, in the clock's monotonic nanoseconds: the
    /// bucket is whole when it is not after now.
    tat: AtomicU64,
    clock: Clock,
    period_nanos: u64,
    /// `burst` periods: how far ahead of now the arrival time may run.
    capacity_nanos: u64,
}

impl GcraBucket {
    pub fn new(policy: RateLimitPolicy, clock: Clock) -> GcraBucket {
        let period_nanos = policy.period_nanos();
        GcraBucket {
            policy,
            tat: AtomicU64::new(0),
            clock,
            period_nanos,
            capacity_nanos: period_nanos.saturating_mul(policy.effective_burst()),
        }
    }

    pub fn policy(&self) -> RateLimitPolicy {
        self.policy
    }

    /// Takes `cost` cells if they are all there; otherwise takes nothing.
    #[inline]
    pub fn check(&self, cost: u32) -> (bool, RateState) {
        self.check_at(cost, self.clock.mono_nanos())
    }

    /// [`check`](Self::check) at monotonic `now`, read by the caller (it
    /// may be a little older than readings other calls already used), of a
    /// bucket its limiter still holds.
    #[inline]
    pub fn check_at(&self, cost: u32, now: u64) -> (bool, RateState) {
        self.take_live(cost, now).unwrap_or_else(|| self.retired_answer())
    }

    /// [`check_at`](Self::check_at), or `None` if the bucket was retired
    /// ([`retire_if_whole`](Self::retire_if_whole)): a holder of it outside
    /// its limiter's map then asks the map again.
    #[inline(always)]
    pub fn take_live(&self, cost: u32, now: u64) -> Option<(bool, RateState)> {
        let need = self.period_nanos.saturating_mul(cost.max(1) as u64);
        let mut state = RateState {
            limit: self.policy.requests,
            remaining: 0,
            reset_seconds: 0,
            window_seconds: self.policy.window_seconds,
            retry_after_ms: 0,
        };
        if need > self.capacity_nanos {
            // More than the whole burst: this request can never pass.
            state.retry_after_ms = self.policy.window_seconds * 1000;
            state.reset_seconds = self.policy.window_seconds;
            return Some((false, state));
        }
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            if tat == RETIRED {
                return None;
            }
            let start = tat.max(now);
            let next = start + need;
            if next - now > self.capacity_nanos {
                let wait = next - now - self.capacity_nanos;
                // `now` may be older than a reading another call already
                // moved the arrival time with (each Verify reads the clock
                // once, at its start): then nothing is left, not a wrap.
                state.remaining = self.cells_in(self.capacity_nanos.saturating_sub(start - now)).min(state.limit);
                state.retry_after_ms = wait.div_ceil(1_000_000).max(1);
                state.reset_seconds = ceil_seconds(wait).max(1);
                return Some((false, state));
            }
            match self.tat.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    state.remaining = self.cells_in(self.capacity_nanos - (next - now)).min(state.limit);
                    state.reset_seconds = ceil_seconds(next - now);
                    return Some((true, state));
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back `cost` cells taken by [`GcraBucket::check`] (never more
    /// than make the bucket whole).
    /// A retired bucket's answer, never given by a limiter's map (it holds
    /// no retired bucket): nothing left for a window.
    #[cold]
    fn retired_answer(&self) -> (bool, RateState) {
        let window = self.policy.window_seconds;
        let state = RateState {
            limit: self.policy.requests,
            remaining: 0,
            reset_seconds: window,
            window_seconds: window,
            retry_after_ms: window * 1000,
        };
        (false, state)
    }

    /// Retires the bucket if it is whole (then it is the same as a new
    /// one), in one step with any take: a take that lands first leaves it
    /// unretired, one that comes after finds it retired. The caller drops
    /// it from its map.
    pub fn retire_if_whole(&self) -> bool {
        let tat = self.tat.load(Ordering::Acquire);
        tat != RETIRED
            && tat <= self.clock.mono_nanos()
            && self.tat.compare_exchange(tat, RETIRED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Retires the bucket whatever it holds (its key is gone, or its
    /// policy changed): no cell is taken from it again.
    pub fn retire(&self) {
        self.tat.store(RETIRED, Ordering::Release);
    }

    pub fn refund(&self, cost: u32) {
        let back = self.period_nanos.saturating_mul(cost.max(1) as u64);
        let now = self.clock.mono_nanos();
        let _ = self.tat.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |tat| {
            (tat != RETIRED && tat > now).then(|| tat.saturating_sub(back).max(now))
        });
    }

    /// Cells there now, without taking any.
    pub fn available(&self) -> u64 {
        let now = self.clock.mono_nanos();
        let ahead = self.tat.load(Ordering::Relaxed).saturating_sub(now);
        self.cells_in(self.capacity_nanos.saturating_sub(ahead))
    }

    fn cells_in(&self, nanos: u64) -> u64 {
        nanos / self.period_nanos.max(1)
    }

    /// Whether every cell is back. For housekeeping: a whole bucket is the
    /// same as a new one and may be dropped.
    pub fn is_whole(&self) -> bool {
        self.tat.load(Ordering::Acquire) <= self.clock.mono_nanos()
    }
}

/// The theoretical arrival time of a retired bucket: later than any.
const RETIRED: u64 = u64::MAX;

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

    /// A retired bucket gives no cell again, a refund does not bring it
    /// back, and only a whole bucket retires by `retire_if_whole`.
    #[test]
    fn a_retired_bucket_gives_nothing() {
        let clock = Clock::manual(1_000);
        let l = GcraBucket::new(policy(5, 60, 0), clock.clone());
        assert!(l.check(1).0);
        assert!(!l.retire_if_whole(), "a cell is out");
        clock.advance(Duration::from_secs(12));
        assert!(l.retire_if_whole());
        assert!(!l.is_whole());
        assert_eq!(l.take_live(1, clock.mono_nanos()), None);
        l.refund(1);
        assert_eq!(l.take_live(1, clock.mono_nanos()), None, "a refund does not revive it");
        let fresh = GcraBucket::new(policy(5, 60, 0), clock.clone());
        fresh.retire();
        assert_eq!(fresh.take_live(1, clock.mono_nanos()), None);
        assert!(!fresh.check(1).0);
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

    /// A call whose clock reading is older than one another call already
    /// spent the bucket with (each Verify reads the clock once, at its
    /// start) is denied with nothing left, not a wrapped count.
    #[test]
    fn an_older_reading_than_the_last_spend_is_denied_cleanly() {
        let clock = Clock::manual(1_000);
        let l = GcraBucket::new(policy(5, 60, 0), clock.clone());
        let earlier = clock.mono_nanos();
        clock.advance(Duration::from_secs(30));
        for _ in 0..5 {
            assert!(l.check(1).0);
        }
        let (ok, s) = l.check_at(1, earlier);
        assert!(!ok);
        assert_eq!(s.remaining, 0);
        assert!(s.retry_after_ms > 0);
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
        assert!(fresh.is_whole(), "a new bucket is whole");
        let l = GcraBucket::new(policy(10, 10, 0), clock.clone());
        l.check(3);
        assert!(!l.is_whole());
        assert_eq!(l.check(1).1.remaining, 6, "a test takes nothing");
        clock.advance(Duration::from_millis(3_999));
        assert!(!l.is_whole());
        clock.advance(Duration::from_millis(1));
        assert!(l.is_whole(), "four cells at one a second");
    }

    #[test]
    fn refunds_give_cells_back_but_never_beyond_whole() {
        let clock = Clock::manual(0);
        let l = GcraBucket::new(policy(10, 10, 0), clock.clone());
        assert!(l.check(4).0);
        l.refund(3);
        assert_eq!(l.available(), 9);
        l.refund(5);
        assert_eq!(l.available(), 10, "no more than whole");
        assert!(l.is_whole());
        assert!(l.check(10).0, "and no more than the burst after a refund");
        assert!(!l.check(1).0);
    }
}
