//! Failed-attempt shedding: failures per client address (IPv6 by /64),
//! checked before any cache or store work (README, "Rate limits"). One
//! shedder counts Verify's caller-reported addresses; `auth` keeps another
//! for the transport peers of admin calls, so neither can lock out the other.

use std::net::IpAddr;
use std::num::NonZeroU32;

use dashmap::DashMap;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::clock::Clock;

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, Clock, NoOpMiddleware<Nanos>>;

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

/// Sheds callers that fail too often. Failures take cells from the IP's
/// bucket; once a failure finds the bucket empty, the IP is blocked until a
/// cell is back. Both maps are purged on a timer, so memory follows the
/// number of recently failing IPs, not of all IPs ever seen.
pub struct FailureShedder {
    per_minute: NonZeroU32,
    failures: Keyed<IpBucket>,
    blocked: DashMap<IpBucket, u64>,
    clock: Clock,
}

impl FailureShedder {
    /// At most `per_minute` failures a minute, all of them at once.
    pub fn new(per_minute: NonZeroU32, clock: Clock) -> FailureShedder {
        FailureShedder {
            per_minute,
            failures: RateLimiter::dashmap_with_clock(Quota::per_minute(per_minute), clock.clone()),
            blocked: DashMap::new(),
            clock,
        }
    }

    /// Failures a minute before an address is shed.
    pub fn per_minute(&self) -> u64 {
        self.per_minute.get() as u64
    }

    /// Whether `ip` is shed now; when it is, the milliseconds until it is not.
    #[inline]
    pub fn shed(&self, ip: IpAddr) -> Option<u64> {
        let until = *self.blocked.get(&IpBucket::from(ip))?;
        let now = self.clock.mono_nanos();
        (until > now).then(|| (until - now).div_ceil(1_000_000))
    }

    /// Counts a failed attempt from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        let bucket = IpBucket::from(ip);
        if let Err(not_until) = self.failures.check_key(&bucket) {
            self.blocked.insert(bucket, u64::from(not_until.earliest_possible()));
        }
    }

    /// Forgets IPs whose buckets are full again and blocks that have ended.
    pub fn purge(&self) {
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
        let now = self.clock.mono_nanos();
        self.blocked.retain(|_, until| *until > now);
        self.blocked.shrink_to_fit();
    }

    /// How many IP groups are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.failures.len() + self.blocked.len()
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
        for _ in 0..3 {
            shed.record_failure(a);
            assert!(shed.shed(a).is_none());
        }
        shed.record_failure(a);
        assert_eq!(shed.shed(a), Some(20_000), "one failure back every 20 s");
        assert!(shed.shed(b).is_none());
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert!(shed.shed(mapped).is_some(), "IPv4-mapped IPv6 is the IPv4 address");

        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for _ in 0..4 {
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
