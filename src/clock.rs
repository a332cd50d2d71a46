//! Time, injectable. Production uses [`Clock::system`]; tests use
//! [`Clock::manual`] and move time by hand instead of sleeping. The same clock
//! drives key expiry, cache freshness and the governor rate limiters (it is a
//! [`governor::clock::Clock`]).
//!
//! The system clock counts with the CPU's time-stamp counter where it is
//! invariant (`quanta`, calibrated once against the OS's monotonic clock at
//! the first [`Clock::system`]), else with the OS's monotonic clock: reading
//! the counter costs a few nanoseconds where `clock_gettime` costs about
//! twenty, and a Verify reads the clock once (README, "Performance").

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System {
        mono: Arc<Monotonic>,
        /// Unix nanos at the monotonic origin, as last read from the wall
        /// clock, and the monotonic nanos it was read at: [`Clock::now`]
        /// derives unix time from its one monotonic read and reads the wall
        /// clock again once a second, so a stepped wall clock is followed
        /// within one.
        wall: Arc<WallOffset>,
    },
    /// Nanoseconds since the unix epoch, set by the test.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn system() -> Clock {
        let ticks = quanta::Clock::new();
        let mono = Monotonic { origin: ticks.raw(), ticks };
        let wall = WallOffset { unix_at_origin: AtomicI64::new(0), due: AtomicU64::new(0) };
        wall.refresh(&mono);
        Clock(Source::System { mono: Arc::new(mono), wall: Arc::new(wall) })
    }

    /// Both clocks from one reading (README, "Performance": one clock read
    /// per Verify): monotonic nanos, and unix seconds derived from them.
    #[inline]
    pub fn now(&self) -> Now {
        match &self.0 {
            Source::System { mono: clock, wall } => {
                let mono = clock.nanos();
                if mono >= wall.due.load(Ordering::Relaxed) {
                    wall.refresh(clock);
                }
                let unix_nanos = wall.unix_at_origin.load(Ordering::Relaxed).saturating_add(mono as i64);
                Now { mono, unix: unix_nanos.div_euclid(1_000_000_000) }
            }
            Source::Manual(ns) => {
                let ns = ns.load(Ordering::SeqCst);
                Now { mono: ns, unix: (ns / 1_000_000_000) as i64 }
            }
        }
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
            Source::System { mono, .. } => mono.nanos(),
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

/// One reading of the clock: [`Clock::now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic nanoseconds, as [`Clock::mono_nanos`].
    pub mono: u64,
    /// Unix seconds, as [`Clock::unix_seconds`].
    pub unix: i64,
}

/// How often [`Clock::now`] reads the wall clock again.
const WALL_REFRESH_NANOS: u64 = 1_000_000_000;

/// Monotonic nanoseconds since the clock was made.
#[derive(Debug)]
struct Monotonic {
    ticks: quanta::Clock,
    /// The raw reading the clock was made at.
    origin: u64,
}

impl Monotonic {
    /// Nanoseconds since `origin`; never below zero. The counters of two
    /// cores may differ by a few ticks: every user of the clock already
    /// takes a reading a little older than another call's in its stride
    /// (a Verify reads the clock once, at its start).
    #[inline]
    fn nanos(&self) -> u64 {
        self.ticks.delta_as_nanos(self.origin, self.ticks.raw())
    }
}

/// The wall clock's offset from the monotonic origin.
#[derive(Debug)]
struct WallOffset {
    unix_at_origin: AtomicI64,
    /// Monotonic nanos from which the wall clock is read again.
    due: AtomicU64,
}

impl WallOffset {
    /// Reads the wall clock, and the monotonic clock right after it (a
    /// caller's earlier reading would set the time ahead by any delay in
    /// between). Racing refreshes store readings a few nanoseconds apart;
    /// either is right.
    #[cold]
    fn refresh(&self, mono: &Monotonic) {
        let unix_nanos = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(_) => 0,
        };
        let mono = mono.nanos();
        self.unix_at_origin.store(unix_nanos - mono as i64, Ordering::Relaxed);
        self.due.store(mono + WALL_REFRESH_NANOS, Ordering::Relaxed);
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
        assert_eq!(c.now(), Now { mono: c.mono_nanos(), unix: 1_002 });
    }

    /// The unix time of one reading is the wall clock's, to the second,
    /// and stays so as time passes (it is read again once a second).
    #[test]
    fn one_reading_gives_the_wall_clock_too() {
        let c = Clock::system();
        for _ in 0..3 {
            let before = c.unix_seconds();
            let now = c.now();
            let after = c.unix_seconds();
            assert!(before - 1 <= now.unix && now.unix <= after + 1, "{before} <= {} <= {after}", now.unix);
            // Within a millisecond: the thread may have moved to a core
            // whose counter is a few ticks behind.
            assert!(now.mono <= c.mono_nanos() + 1_000_000);
        }
        // Once due, the offset is read again: a wrong one is replaced.
        let Source::System { wall, .. } = &c.0 else { unreachable!() };
        wall.unix_at_origin.store(0, Ordering::Relaxed);
        assert!(c.now().unix < 10, "not due yet: the offset is kept");
        wall.due.store(0, Ordering::Relaxed);
        assert!((c.now().unix - c.unix_seconds()).abs() <= 1, "due: the wall clock is read again");
    }
}
