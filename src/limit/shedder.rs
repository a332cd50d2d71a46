//! Failed-attempt shedding: failures per client address (IPv6 by /64),
//! checked before any cache or store work (README, "Rate limits"). One
//! shedder counts Verify's caller-reported addresses; `auth` keeps another
//! for the transport peers of admin calls, so neither can lock out the other.

use std::net::IpAddr;
use std::num::NonZeroU32;

use dashmap::DashMap;

use crate::clock::Clock;

/// The group an address is counted in: itself for IPv4 (and IPv4-mapped
/// IPv6), its /64 for IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpBucket {
    V4(u32),
    V6Net(u64),
}

impl From<IpAddr> for IpBucket {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => IpBucket::V4(v4.to_bits()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpBucket::V4(v4.to_bits()),
                None => IpBucket::V6Net((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// Sheds callers that fail too often: `per_minute` failures a minute per
/// address group, all of them at once, one back every `60 s / per_minute`
/// (a GCRA per group: the group's "theoretical arrival time" of its next
/// failure, in monotonic nanos).
///
/// A lookup that will read the store is charged as a failure *before* the
/// read and refunded when the key turns out valid (README, "Rate limits"),
/// so a caller cannot get more reads than its allowance by sending many at
/// once: the charge that finds the group's allowance spent is refused and
/// that request reads nothing. Groups whose allowance is whole again are
/// purged on a timer, so memory follows the number of recently failing
/// groups, not of all addresses ever seen.
pub struct FailureShedder {
    per_minute: NonZeroU32,
    /// Nanos one failure takes to come back.
    interval: u64,
    /// How far ahead of now a group's arrival time may be and still admit a
    /// failure: `(per_minute - 1) * interval`.
    tolerance: u64,
    arrivals: DashMap<IpBucket, u64>,
    clock: Clock,
}

impl FailureShedder {
    /// At most `per_minute` failures a minute, all of them at once.
    pub fn new(per_minute: NonZeroU32, clock: Clock) -> FailureShedder {
        let interval = 60_000_000_000 / per_minute.get() as u64;
        FailureShedder {
            per_minute,
            interval,
            tolerance: interval * (per_minute.get() as u64 - 1),
            arrivals: DashMap::new(),
            clock,
        }
    }

    /// Failures a minute before an address is shed.
    pub fn per_minute(&self) -> u64 {
        self.per_minute.get() as u64
    }

    /// Whether `ip` is shed now (its allowance is spent); when it is, the
    /// milliseconds until a failure is allowed again.
    #[inline]
    pub fn shed(&self, ip: IpAddr) -> Option<u64> {
        let arrival = *self.arrivals.get(&IpBucket::from(ip))?;
        self.wait(arrival, self.clock.mono_nanos())
    }

    /// Nanos past `now` the group with `arrival` must wait, as milliseconds.
    fn wait(&self, arrival: u64, now: u64) -> Option<u64> {
        let free_at = arrival.saturating_sub(self.tolerance);
        (free_at > now).then(|| (free_at - now).div_ceil(1_000_000))
    }

    /// Takes one failure from `ip`'s allowance before work that may fail
    /// (a store read). `Err` carries the milliseconds until one is back:
    /// the allowance is spent and the work must not be done.
    pub fn charge(&self, ip: IpAddr) -> Result<(), u64> {
        let now = self.clock.mono_nanos();
        let mut arrival = self.arrivals.entry(IpBucket::from(ip)).or_insert(0);
        let base = (*arrival).max(now);
        if let Some(ms) = self.wait(base, now) {
            return Err(ms);
        }
        *arrival = base + self.interval;
        Ok(())
    }

    /// Gives back a failure [`charge`](Self::charge)d for work that did not
    /// fail (the key was valid).
    pub fn refund(&self, ip: IpAddr) {
        if let Some(mut arrival) = self.arrivals.get_mut(&IpBucket::from(ip)) {
            *arrival = arrival.saturating_sub(self.interval);
        }
    }

    /// Counts a failed attempt from `ip` that was not charged beforehand
    /// (a malformed key; a key the cache answered). Once the allowance is
    /// spent this keeps the group shed for the next failure's interval.
    pub fn record_failure(&self, ip: IpAddr) {
        let now = self.clock.mono_nanos();
        let mut arrival = self.arrivals.entry(IpBucket::from(ip)).or_insert(0);
        // Never more than one interval past a spent allowance: a flood of
        // failures cannot block an address for hours.
        *arrival = ((*arrival).max(now) + self.interval).min(now + self.tolerance + self.interval);
    }

    /// Forgets groups whose allowance is whole again.
    pub fn purge(&self) {
        let now = self.clock.mono_nanos();
        self.arrivals.retain(|_, arrival| *arrival > now);
        self.arrivals.shrink_to_fit();
    }

    /// How many address groups are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.arrivals.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn shedding_by_ip_and_ipv6_slash_64() {
        let clock = Clock::manual(0);
        let shed = FailureShedder::new(NonZeroU32::new(3).unwrap(), clock.clone());
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        for _ in 0..2 {
            shed.record_failure(a);
            assert!(shed.shed(a).is_none());
        }
        shed.record_failure(a);
        assert_eq!(shed.shed(a), Some(20_000), "three failures spend the allowance; one back every 20 s");
        shed.record_failure(a);
        assert_eq!(shed.shed(a), Some(20_000), "failing on while shed never blocks longer than one interval");
        assert!(shed.shed(b).is_none());
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert!(shed.shed(mapped).is_some(), "IPv4-mapped IPv6 is the IPv4 address");

        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for _ in 0..3 {
            shed.record_failure(v6a);
        }
        assert!(shed.shed(v6b).is_some(), "same /64");
        assert!(shed.shed(v6c).is_none(), "other /64");

        clock.advance(Duration::from_secs(20));
        assert!(shed.shed(a).is_none());
    }

    #[test]
    fn shedder_memory_is_bounded_by_purge() {
        let clock = Clock::manual(0);
        let shed = FailureShedder::new(NonZeroU32::new(20).unwrap(), clock.clone());
        for i in 0..1_000_000u32 {
            shed.record_failure(IpAddr::from(i.to_be_bytes()));
        }
        assert_eq!(shed.tracked(), 1_000_000);
        clock.advance(Duration::from_secs(61));
        shed.purge();
        assert_eq!(shed.tracked(), 0, "a purge forgets every IP whose bucket is whole again");
    }
}
