//! Time, injectable. Production uses [`Clock::system`]; tests use
//! [`Clock::manual`] and move time by hand instead of sleeping. The same clock
//! drives key expiry, cache freshness and the governor rate limiters (it is a
//! [`governor::clock::Clock`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System {
        origin: Instant,
    },
    /// Nanoseconds since the unix epoch, set by the test.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn system() -> Clock {
        Clock(Source::System { origin: Instant::now() })
    }

    /// A clock that stands still at `unix_seconds` until advanced.
    pub fn manual(unix_seconds: i64) -> Clock {
        Clock(Source::Manual(Arc::new(AtomicU64::new(unix_seconds.max(0) as u64 * 1_000_000_000))))
    }

    /// Moves a manual clock forward. A no-op on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(ns) = &self.0 {
            ns.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    /// Monotonic nanoseconds from an arbitrary origin.
    #[inline]
    pub fn mono_nanos(&self) -> u64 {
        match &self.0 {
            Source::System { origin } => origin.elapsed().as_nanos() as u64,
            Source::Manual(ns) => ns.load(Ordering::SeqCst),
        }
    }

    /// Wall-clock unix seconds.
    #[inline]
    pub fn unix_seconds(&self) -> i64 {
        match &self.0 {
            Source::System { .. } => {
                SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
            }
            Source::Manual(ns) => (ns.load(Ordering::SeqCst) / 1_000_000_000) as i64,
        }
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    #[inline]
    fn now(&self) -> Nanos {
        Nanos::from(self.mono_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.unix_seconds(), 1_000);
        let t0 = c.mono_nanos();
        c.advance(Duration::from_millis(2_500));
        assert_eq!(c.unix_seconds(), 1_002);
        assert_eq!(c.mono_nanos() - t0, 2_500_000_000);
    }
}
