//! Rate limits (SPEC §6), both on governor's GCRA and the injectable
//! [`Clock`]:
//! - [`KeyLimiter`]: one key's quota, kept across cache refreshes by
//!   [`LimiterRegistry`] and rebuilt only when the key's policy changes;
//! - [`FailureShedder`]: failed attempts per client IP (IPv6 by /64), checked
//!   before any cache or store work.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Clock;
use crate::key::KeyId;
use crate::store::RateLimitPolicy;

type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;
type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, Clock, NoOpMiddleware<Nanos>>;

/// The quota state a verdict carries, and from which the headers are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests per window.
    pub limit: u64,
    /// Requests that can still be made now; never more than `limit`.
    pub remaining: u64,
    /// Seconds until the quota is whole again (or, when denied, until the
    /// request could pass).
    pub reset_seconds: u64,
    pub window_seconds: u64,
    /// When denied: milliseconds until the same request could pass.
    pub retry_after_ms: u64,
}

/// Longest window a policy may have (a day) and largest request count; both
/// keep the GCRA arithmetic far from overflow.
pub const MAX_WINDOW_SECONDS: u64 = 86_400;
pub const MAX_REQUESTS: u64 = 1_000_000_000;

impl RateLimitPolicy {
    /// Every problem with this policy, for INVALID_ARGUMENT or a config error.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            out.push(format!("rate_limit.requests must be between 1 and {MAX_REQUESTS}"));
        }
        if self.window_seconds == 0 || self.window_seconds > MAX_WINDOW_SECONDS {
            out.push(format!("rate_limit.window_seconds must be between 1 and {MAX_WINDOW_SECONDS}"));
        }
        if self.burst > u32::MAX as u64 {
            out.push("rate_limit.burst is too large".to_string());
        }
        out
    }

    /// The burst actually applied: `burst`, or `requests` when unset, at most
    /// `requests`.
    pub fn effective_burst(&self) -> u64 {
        if self.burst == 0 { self.requests } else { self.burst.min(self.requests) }
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_nanos(
            ((self.window_seconds as u128 * 1_000_000_000) / self.requests.max(1) as u128).max(1) as u64,
        );
        let burst = NonZeroU32::new(self.effective_burst().clamp(1, u32::MAX as u64) as u32).expect("clamped to >= 1");
        Quota::with_period(period).expect("period > 0").allow_burst(burst)
    }
}

impl std::str::FromStr for RateLimitPolicy {
    type Err = String;

    /// `1000/60s`, `100/1m`, `10/1s:20` (with a burst of 20), and any of
    /// them with `@tenant` (shared by the tenant's keys).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || {
            format!(
                "rate limit {s:?} must look like 1000/60s, 1000/60s:100 or 1000/60s@tenant (requests/window[:burst][@tenant])"
            )
        };
        let (s, per_tenant) = match s.trim().strip_suffix("@tenant") {
            Some(rest) => (rest, true),
            None => (s.trim(), false),
        };
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, b.parse::<u64>().map_err(|_| err())?),
            None => (s, 0),
        };
        let (requests, window) = rate.split_once('/').ok_or_else(err)?;
        let requests = requests.trim().parse::<u64>().map_err(|_| err())?;
        let window = humantime::parse_duration(window.trim()).map_err(|_| err())?;
        let policy = RateLimitPolicy { requests, window_seconds: window.as_secs(), burst, per_tenant };
        match policy.problems().first() {
            Some(p) => Err(format!("rate limit {s:?}: {p}")),
            None => Ok(policy),
        }
    }
}

/// One key's GCRA bucket.
pub struct KeyLimiter {
    policy: RateLimitPolicy,
    limiter: Direct,
    clock: Clock,
    period_nanos: u64,
}

impl KeyLimiter {
    pub fn new(policy: RateLimitPolicy, clock: Clock) -> KeyLimiter {
        let quota = policy.quota();
        let period_nanos = quota.replenish_interval().as_nanos() as u64;
        KeyLimiter {
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

fn ceil_seconds(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

/// Whose bucket a request draws from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketId {
    Key(KeyId),
    /// Shared by the tenant's keys with this policy.
    Tenant(String, RateLimitPolicy),
}

/// Keeps each bucket while a cached key refers to it, so that a cache
/// refresh or an unrelated update (a new name) does not hand out a fresh
/// quota; a changed policy gets a new, full bucket.
pub struct LimiterRegistry {
    limiters: DashMap<BucketId, Arc<KeyLimiter>>,
    default_policy: Option<RateLimitPolicy>,
    clock: Clock,
}

impl LimiterRegistry {
    pub fn new(default_policy: Option<RateLimitPolicy>, clock: Clock) -> LimiterRegistry {
        LimiterRegistry { limiters: DashMap::new(), default_policy, clock }
    }

    /// The bucket of key `id` of `tenant` under its own policy or the
    /// default; `None` for an unlimited key.
    pub fn for_key(&self, id: KeyId, tenant: &str, own: Option<RateLimitPolicy>) -> Option<Arc<KeyLimiter>> {
        let Some(policy) = own.or(self.default_policy) else {
            self.limiters.remove(&BucketId::Key(id));
            return None;
        };
        let bucket = if policy.per_tenant && !tenant.is_empty() {
            BucketId::Tenant(tenant.to_string(), policy)
        } else {
            BucketId::Key(id)
        };
        let mut slot =
            self.limiters.entry(bucket).or_insert_with(|| Arc::new(KeyLimiter::new(policy, self.clock.clone())));
        if slot.policy != policy {
            *slot = Arc::new(KeyLimiter::new(policy, self.clock.clone()));
        }
        Some(slot.clone())
    }

    /// Drops the bucket of a deleted key.
    pub fn forget(&self, id: KeyId) {
        self.limiters.remove(&BucketId::Key(id));
    }

    /// Drops buckets that no cached key refers to any more.
    pub fn purge_unused(&self) {
        self.limiters.retain(|_, l| Arc::strong_count(l) > 1);
    }

    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}

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
    failures: Keyed<IpBucket>,
    blocked: DashMap<IpBucket, u64>,
    clock: Clock,
}

impl FailureShedder {
    /// At most `per_minute` failures a minute, all of them at once.
    pub fn new(per_minute: NonZeroU32, clock: Clock) -> FailureShedder {
        FailureShedder {
            failures: RateLimiter::dashmap_with_clock(Quota::per_minute(per_minute), clock.clone()),
            blocked: DashMap::new(),
            clock,
        }
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
    use super::*;

    fn policy(requests: u64, window_seconds: u64, burst: u64) -> RateLimitPolicy {
        RateLimitPolicy { requests, window_seconds, burst, per_tenant: false }
    }

    #[test]
    fn burst_then_refill() {
        let clock = Clock::manual(1_000);
        let l = KeyLimiter::new(policy(5, 60, 0), clock.clone());
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
        let l = KeyLimiter::new(policy(10, 10, 0), clock.clone());
        let (_, s) = l.check(3);
        assert_eq!(s.remaining, 7);
        assert_eq!(s.reset_seconds, 3);
    }

    #[test]
    fn cost_above_one_and_denial_takes_nothing() {
        let clock = Clock::manual(0);
        let l = KeyLimiter::new(policy(10, 10, 0), clock.clone());
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
    fn policies_parse_and_validate() {
        assert_eq!("1000/60s".parse::<RateLimitPolicy>().unwrap(), policy(1000, 60, 0));
        assert_eq!("10/1m:20".parse::<RateLimitPolicy>().unwrap(), policy(10, 60, 20));
        assert!("0/60s".parse::<RateLimitPolicy>().is_err());
        assert!("10/0s".parse::<RateLimitPolicy>().is_err());
        assert!("ten per minute".parse::<RateLimitPolicy>().is_err());
        assert_eq!(policy(10, 60, 50).effective_burst(), 10);
    }

    #[test]
    fn registry_keeps_a_bucket_until_the_policy_changes() {
        let clock = Clock::manual(0);
        let reg = LimiterRegistry::new(None, clock);
        let id: KeyId = "abcdEFGH".parse().unwrap();
        assert!(reg.for_key(id, "", None).is_none(), "no policy, no limit");
        let a = reg.for_key(id, "", Some(policy(2, 60, 0))).unwrap();
        assert!(a.check(1).0);
        let b = reg.for_key(id, "", Some(policy(2, 60, 0))).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg.for_key(id, "", Some(policy(3, 60, 0))).unwrap();
        assert_eq!(c.check(1).1.remaining, 2, "new policy, new bucket");
        drop((a, b, c));
        reg.purge_unused();
        assert!(reg.is_empty());
    }

    #[test]
    fn per_tenant_buckets_are_shared() {
        let reg = LimiterRegistry::new(None, Clock::manual(0));
        let shared = RateLimitPolicy { per_tenant: true, ..policy(3, 60, 0) };
        let a = reg.for_key("aaaaAAAA".parse().unwrap(), "acme", Some(shared)).unwrap();
        let b = reg.for_key("bbbbBBBB".parse().unwrap(), "acme", Some(shared)).unwrap();
        let other = reg.for_key("ccccCCCC".parse().unwrap(), "globex", Some(shared)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.check(2).0);
        assert_eq!(b.check(1).1.remaining, 0, "the tenant's keys drew from one bucket");
        assert!(!b.check(1).0);
        assert!(other.check(1).0, "another tenant has its own");
        assert_eq!(
            "10/1m@tenant".parse::<RateLimitPolicy>().unwrap(),
            RateLimitPolicy { per_tenant: true, ..policy(10, 60, 0) }
        );
    }

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
