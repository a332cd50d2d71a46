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

/// Most address groups tracked at once: past it, a new group's failures
/// are not counted (the known-key filter still keeps forged keys from the
/// store), so memory stays bounded whatever addresses callers claim
/// (README, "Memory budget"). About 64 bytes each.
pub const MAX_TRACKED: usize = 262_144;

/// One address group: its failures (a GCRA "theoretical arrival time" in
/// monotonic nanos) and its store reads still in flight.
#[derive(Debug, Clone, Copy, Default)]
struct Group {
    arrival: u64,
    pending: u32,
}

/// Sheds callers that fail too often: `per_minute` failures a minute per
/// address group, all of them at once, one back every `60 s / per_minute`.
///
/// A lookup that will read the store takes a [`Charge`] first (README,
/// "Rate limits"): reads in flight count against what is left of the
/// allowance, so an address sending many misses at once cannot get more
/// reads than its allowance. A read beyond it waits for those in flight to
/// settle (a valid key gives its charge back, so a client that sends many
/// good keys at once is slowed, never refused); only failures that have
/// happened shed an address. Groups whose allowance is whole again are
/// purged on a timer.
pub struct FailureShedder {
    per_minute: NonZeroU32,
    /// Nanos one failure takes to come back.
    interval: u64,
    /// How far ahead of now a group's arrival time may be and still admit a
    /// failure: `(per_minute - 1) * interval`.
    tolerance: u64,
    groups: DashMap<IpBucket, Group>,
    /// Entries in `groups`, kept beside it: a map's own count locks every
    /// shard, and this is read on every failure.
    tracked: std::sync::atomic::AtomicUsize,
    clock: Clock,
}

/// What [`FailureShedder::charge`] decided.
pub enum Charged<'a> {
    /// Read; settle with [`Charge::failed`], or drop to give it back.
    Yes(Charge<'a>),
    /// The address is shed: milliseconds until it may try again.
    Shed(u64),
    /// Its allowance is taken by reads in flight: try again shortly.
    Busy,
}

/// A store read charged to an address. Dropped, it is given back (the key
/// was valid, the store failed, or the caller went away); [`failed`]
/// keeps it as a failure.
///
/// [`failed`]: Charge::failed
#[must_use]
pub struct Charge<'a> {
    shedder: &'a FailureShedder,
    bucket: IpBucket,
    failed: bool,
    /// False when the table was full and nothing was taken.
    tracked: bool,
}

impl Charge<'_> {
    /// The read found no key (or a wrong secret): it counts as a failure.
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if !self.tracked {
            return;
        }
        let now = self.shedder.clock.mono_nanos();
        if let Some(mut group) = self.shedder.groups.get_mut(&self.bucket) {
            group.pending = group.pending.saturating_sub(1);
            if self.failed {
                group.arrival = self.shedder.after_failure(group.arrival, now);
            }
        }
    }
}

impl FailureShedder {
    /// At most `per_minute` failures a minute, all of them at once.
    pub fn new(per_minute: NonZeroU32, clock: Clock) -> FailureShedder {
        let interval = 60_000_000_000 / per_minute.get() as u64;
        FailureShedder {
            per_minute,
            interval,
            tolerance: interval * (per_minute.get() as u64 - 1),
            groups: DashMap::new(),
            tracked: std::sync::atomic::AtomicUsize::new(0),
            clock,
        }
    }

    /// Failures a minute before an address is shed.
    pub fn per_minute(&self) -> u64 {
        self.per_minute.get() as u64
    }

    /// Whether `ip` is shed now (its allowance is spent by failures); when
    /// it is, the milliseconds until a failure is allowed again.
    #[inline]
    pub fn shed(&self, ip: IpAddr) -> Option<u64> {
        // Nobody failing, the usual case: no lookup on the hot path.
        if self.tracked.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return None;
        }
        let arrival = self.groups.get(&IpBucket::from(ip))?.arrival;
        self.wait(arrival, self.clock.mono_nanos())
    }

    /// Nanos past `now` the group with `arrival` must wait, as milliseconds.
    fn wait(&self, arrival: u64, now: u64) -> Option<u64> {
        let free_at = arrival.saturating_sub(self.tolerance);
        (free_at > now).then(|| (free_at - now).div_ceil(1_000_000))
    }

    /// Failures still counted against a group with `arrival` at `now`.
    fn used(&self, arrival: u64, now: u64) -> u64 {
        arrival.saturating_sub(now).div_ceil(self.interval)
    }

    /// The arrival time after one more failure: never more than one
    /// interval past a spent allowance, so failing on cannot block an
    /// address for hours.
    fn after_failure(&self, arrival: u64, now: u64) -> u64 {
        (arrival.max(now) + self.interval).min(now + self.tolerance + self.interval)
    }

    /// Asks to read the store for `ip` (README, "Rate limits").
    pub fn charge(&self, ip: IpAddr) -> Charged<'_> {
        let bucket = IpBucket::from(ip);
        let now = self.clock.mono_nanos();
        let Some(mut group) = self.group(bucket) else {
            // Not tracked: read without a charge.
            return Charged::Yes(Charge { shedder: self, bucket, failed: false, tracked: false });
        };
        if let Some(ms) = self.wait(group.arrival, now) {
            return Charged::Shed(ms);
        }
        if self.used(group.arrival, now) + group.pending as u64 >= self.per_minute() {
            return Charged::Busy;
        }
        group.pending += 1;
        Charged::Yes(Charge { shedder: self, bucket, failed: false, tracked: true })
    }

    /// The group of `bucket`, made if there is room for one more.
    fn group(&self, bucket: IpBucket) -> Option<dashmap::mapref::one::RefMut<'_, IpBucket, Group>> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(group) = self.groups.get_mut(&bucket) {
            return Some(group);
        }
        if self.tracked.load(Relaxed) >= MAX_TRACKED {
            return None;
        }
        match self.groups.entry(bucket) {
            dashmap::Entry::Occupied(e) => Some(e.into_ref()),
            dashmap::Entry::Vacant(e) => {
                self.tracked.fetch_add(1, Relaxed);
                Some(e.insert(Group::default()))
            }
        }
    }

    /// Counts a failed attempt from `ip` that read nothing (a malformed
    /// key; a key_id the filter or the cache knows is absent).
    pub fn record_failure(&self, ip: IpAddr) {
        let Some(mut group) = self.group(IpBucket::from(ip)) else { return };
        let now = self.clock.mono_nanos();
        group.arrival = self.after_failure(group.arrival, now);
    }

    /// Forgets groups whose allowance is whole again and that have no read
    /// in flight.
    pub fn purge(&self) {
        let now = self.clock.mono_nanos();
        let mut removed = 0;
        self.groups.retain(|_, g| {
            let keep = g.arrival > now || g.pending > 0;
            removed += usize::from(!keep);
            keep
        });
        self.tracked.fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
        self.groups.shrink_to_fit();
    }

    /// How many address groups are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.groups.len()
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
        assert_eq!(shed.tracked(), MAX_TRACKED, "no more groups than the bound, whatever addresses callers claim");
        clock.advance(Duration::from_secs(61));
        shed.purge();
        assert_eq!(shed.tracked(), 0, "a purge forgets every IP whose bucket is whole again");
    }

    /// Reads in flight count against the allowance; a valid key's charge
    /// comes back, a failure's stays; a dropped charge is given back.
    #[test]
    fn charges_in_flight_count_and_only_failures_shed() {
        let clock = Clock::manual(1_000_000_000);
        let shed = FailureShedder::new(NonZeroU32::new(3).unwrap(), clock.clone());
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        fn yes(c: Charged<'_>) -> Option<Charge<'_>> {
            match c {
                Charged::Yes(c) => Some(c),
                _ => None,
            }
        }
        let first = yes(shed.charge(a)).unwrap();
        let second = yes(shed.charge(a)).unwrap();
        let third = yes(shed.charge(a)).unwrap();
        assert!(matches!(shed.charge(a), Charged::Busy), "three reads in flight take the allowance");
        assert!(shed.shed(a).is_none(), "nothing has failed yet");
        drop(first); // a valid key
        let fourth = yes(shed.charge(a)).expect("a charge given back makes room");
        second.failed();
        third.failed();
        fourth.failed();
        assert!(matches!(shed.charge(a), Charged::Shed(20_000)), "three failures shed the address");
        assert!(shed.shed(a).is_some());
        clock.advance(Duration::from_secs(20));
        let again = yes(shed.charge(a)).expect("one failure is back after 20 s");
        assert!(matches!(shed.charge(a), Charged::Busy));
        drop(again);
        shed.purge();
        assert_eq!(shed.tracked(), 1, "a group with failures still counted is kept");
    }
}
