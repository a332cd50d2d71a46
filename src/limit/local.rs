//! The in-process limiter: one [`GcraBucket`] per [`BucketId`], owned here
//! and independent of the cache. A bucket is dropped only when it is whole
//! again (then it is the same as a new one) or its key is deleted, so a key
//! pushed out of the cache keeps its spent quota. The registry is bounded
//! by the keys that really verified recently: forged or unknown keys never
//! reach a limiter.

use std::sync::Arc;

use dashmap::DashMap;

use super::gcra::GcraBucket;
use super::{BucketId, Decision, LimitCheck, Limiter, RateLimitPolicy, RateState};
use crate::clock::Clock;

/// Buckets exist only for keys that verified (forged key_ids never get
/// one), so a fast hasher is safe here and keeps the lookup cheap on the hot
/// path.
type Hasher = foldhash::fast::RandomState;

pub struct LocalLimiter {
    buckets: DashMap<BucketId, Arc<GcraBucket>, Hasher>,
    clock: Clock,
}

impl LocalLimiter {
    pub fn new(clock: Clock) -> LocalLimiter {
        LocalLimiter { buckets: DashMap::with_hasher(Hasher::default()), clock }
    }

    /// Takes `cost` cells from the bucket for `id` under `policy`; a changed
    /// policy gets a new, whole bucket. A cache refresh or an unrelated
    /// update (a new name) keeps the bucket. The check runs under the map's
    /// shard lock, so a purge cannot drop a bucket between lookup and take.
    fn take(&self, id: &BucketId, policy: &RateLimitPolicy, cost: u32) -> (bool, RateState) {
        if let Some(b) = self.buckets.get(id)
            && b.policy() == *policy
        {
            return b.check(cost);
        }
        let mut slot =
            self.buckets.entry(id.clone()).or_insert_with(|| Arc::new(GcraBucket::new(*policy, self.clock.clone())));
        if slot.policy() != *policy {
            *slot = Arc::new(GcraBucket::new(*policy, self.clock.clone()));
        }
        slot.check(cost)
    }
}

impl Limiter for LocalLimiter {
    #[inline]
    fn check(&self, bucket: &BucketId, policy: &RateLimitPolicy, cost: u32) -> LimitCheck<'_> {
        let (allowed, state) = self.take(bucket, policy, cost);
        LimitCheck::Ready(Ok(Decision { allowed, state }))
    }

    fn forget(&self, bucket: &BucketId) {
        self.buckets.remove(bucket);
    }

    fn purge(&self) {
        // Under the shard's write lock no check can reach the bucket, so a
        // whole bucket emptied by the test is dropped before anyone sees it.
        self.buckets.retain(|_, b| !b.drain_if_full());
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::key::KeyId;

    fn policy(requests: u64, window_seconds: u64) -> RateLimitPolicy {
        RateLimitPolicy { requests, window_seconds, burst: 0, per_tenant: false }
    }

    fn take(l: &LocalLimiter, b: &BucketId, p: &RateLimitPolicy, cost: u32) -> Decision {
        match l.check(b, p, cost) {
            LimitCheck::Ready(r) => r.unwrap(),
            LimitCheck::Pending(_) => panic!("a local bucket answers at once"),
        }
    }

    #[test]
    fn a_bucket_is_kept_until_the_policy_changes() {
        let l = LocalLimiter::new(Clock::manual(0));
        let id = BucketId::Key("abcdEFGH".parse::<KeyId>().unwrap());
        assert!(take(&l, &id, &policy(2, 60), 1).allowed);
        assert_eq!(take(&l, &id, &policy(2, 60), 1).state.remaining, 0, "same policy, same bucket");
        assert_eq!(take(&l, &id, &policy(3, 60), 1).state.remaining, 2, "new policy, new bucket");
    }

    #[test]
    fn purge_drops_only_whole_buckets() {
        let clock = Clock::manual(0);
        let l = LocalLimiter::new(clock.clone());
        let spent = BucketId::Key("aaaaAAAA".parse().unwrap());
        let touched = BucketId::Key("bbbbBBBB".parse().unwrap());
        let hourly = policy(5, 3600);
        for _ in 0..5 {
            assert!(take(&l, &spent, &hourly, 1).allowed);
        }
        take(&l, &touched, &policy(10, 10), 1);
        clock.advance(Duration::from_secs(11));
        l.purge();
        assert_eq!(l.len(), 1, "the refilled bucket went, the spent one stayed");
        assert!(!take(&l, &spent, &hourly, 1).allowed, "a purge never hands out a fresh quota");
        clock.advance(Duration::from_secs(3600));
        l.purge();
        assert!(l.is_empty());
    }

    #[test]
    fn tenant_buckets_are_shared() {
        let l = LocalLimiter::new(Clock::manual(0));
        let shared = RateLimitPolicy { per_tenant: true, ..policy(3, 60) };
        let a = BucketId::of_key("aaaaAAAA".parse().unwrap(), "acme", &shared);
        let b = BucketId::of_key("bbbbBBBB".parse().unwrap(), "acme", &shared);
        let other = BucketId::of_key("ccccCCCC".parse().unwrap(), "globex", &shared);
        assert_eq!(a, b);
        assert!(take(&l, &a, &shared, 2).allowed);
        assert_eq!(take(&l, &b, &shared, 1).state.remaining, 0, "the tenant's keys drew from one bucket");
        assert!(!take(&l, &b, &shared, 1).allowed);
        assert!(take(&l, &other, &shared, 1).allowed, "another tenant has its own");
    }
}
