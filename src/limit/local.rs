//! The in-process limiter: one [`GcraBucket`] per [`BucketId`], owned here
//! and independent of the cache. A bucket is dropped only when it is whole
//! again (then it is the same as a new one) or its key is deleted, so a key
//! pushed out of the cache keeps its spent quota. The registry is bounded
//! by the keys that really verified recently: forged or unknown keys never
//! reach a limiter.

use std::sync::Arc;

use dashmap::DashMap;

use super::gcra::GcraBucket;
use super::{BucketId, BucketOwner, CellSource, Decision, LimitCheck, Limiter, RateLimitPolicy, RateState};
use crate::clock::Clock;
use crate::key::KeyId;

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
    fn take(&self, id: &BucketId, policy: &RateLimitPolicy, cost: u32, now: u64) -> (bool, RateState) {
        if let Some(b) = self.buckets.get(id)
            && b.policy() == *policy
        {
            return b.check_at(cost, now);
        }
        let mut slot =
            self.buckets.entry(*id).or_insert_with(|| Arc::new(GcraBucket::new(*policy, self.clock.clone())));
        if slot.policy() != *policy {
            *slot = Arc::new(GcraBucket::new(*policy, self.clock.clone()));
        }
        slot.check_at(cost, now)
    }
}

impl Limiter for LocalLimiter {
    #[inline]
    fn check(&self, bucket: &BucketId, policy: &RateLimitPolicy, cost: u32, now: u64) -> LimitCheck<'_> {
        let (allowed, state) = self.take(bucket, policy, cost, now);
        LimitCheck::Ready(Ok(Decision { allowed, state, source: CellSource::Local }))
    }

    fn refund(&self, bucket: &BucketId, _decision: &Decision, cost: u32) {
        if let Some(b) = self.buckets.get(bucket) {
            b.refund(cost);
        }
    }

    fn forget_key(&self, id: KeyId) {
        self.buckets.retain(|b, _| b.owner != BucketOwner::Key(id));
    }

    fn purge(&self) {
        // Under the shard's write lock no check can reach the bucket, so a
        // whole bucket emptied by the test is dropped before anyone sees it.
        self.buckets.retain(|_, b| !b.is_whole());
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::key::{Env, KeyId};
    use crate::limit::{LimitSpec, tenant_tag};

    fn policy(requests: u64, window_seconds: u64) -> RateLimitPolicy {
        RateLimitPolicy { requests, window_seconds, burst: 0, per_tenant: false }
    }

    fn key_bucket(id: &str) -> BucketId {
        let spec: LimitSpec = "default=1/1s".parse().unwrap();
        BucketId::of(&spec, id.parse::<KeyId>().unwrap(), None, Env::Live)
    }

    fn with(b: &BucketId, p: &RateLimitPolicy) -> BucketId {
        BucketId { quota: *p, ..*b }
    }

    fn take(l: &LocalLimiter, b: &BucketId, p: &RateLimitPolicy, cost: u32) -> Decision {
        match l.check(b, p, cost, l.clock.mono_nanos()) {
            LimitCheck::Ready(r) => r.unwrap(),
            LimitCheck::Pending(_) => panic!("a local bucket answers at once"),
        }
    }

    #[test]
    fn a_bucket_is_kept_until_the_policy_changes() {
        let l = LocalLimiter::new(Clock::manual(0));
        let id = key_bucket("abcdEFGH");
        let (two, three) = (policy(2, 60), policy(3, 60));
        assert!(take(&l, &with(&id, &two), &two, 1).allowed);
        assert_eq!(take(&l, &with(&id, &two), &two, 1).state.remaining, 0, "same policy, same bucket");
        assert_eq!(take(&l, &with(&id, &three), &three, 1).state.remaining, 2, "new policy, new bucket");
        assert_eq!(take(&l, &with(&id, &two), &two, 1).state.remaining, 0, "and the old one is kept, not reset");
    }

    #[test]
    fn purge_drops_only_whole_buckets() {
        let clock = Clock::manual(0);
        let l = LocalLimiter::new(clock.clone());
        let hourly = policy(5, 3600);
        let spent = with(&key_bucket("aaaaAAAA"), &hourly);
        let touched = with(&key_bucket("bbbbBBBB"), &policy(10, 10));
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
    fn tenant_buckets_are_shared_by_environment_and_name() {
        let l = LocalLimiter::new(Clock::manual(0));
        let shared: LimitSpec = "integration=3/60s@tenant".parse().unwrap();
        let other_name: LimitSpec = "admin=3/60s@tenant".parse().unwrap();
        let p = shared.policy();
        let acme = tenant_tag("acme");
        let a = BucketId::of(&shared, "aaaaAAAA".parse().unwrap(), Some(&acme), Env::Live);
        let b = BucketId::of(&shared, "bbbbBBBB".parse().unwrap(), Some(&acme), Env::Live);
        let test = BucketId::of(&shared, "dddddDDD".parse().unwrap(), Some(&acme), Env::Test);
        let admin = BucketId::of(&other_name, "aaaaAAAA".parse().unwrap(), Some(&acme), Env::Live);
        let other = BucketId::of(&shared, "ccccCCCC".parse().unwrap(), Some(&tenant_tag("globex")), Env::Live);
        assert_eq!(a, b);
        assert!(take(&l, &a, &p, 2).allowed);
        assert_eq!(take(&l, &b, &p, 1).state.remaining, 0, "the tenant's keys drew from one bucket");
        assert!(!take(&l, &b, &p, 1).allowed);
        assert!(take(&l, &other, &p, 1).allowed, "another tenant has its own");
        assert_eq!(take(&l, &test, &p, 1).state.remaining, 2, "test keys never share live quota");
        assert_eq!(take(&l, &admin, &p, 1).state.remaining, 2, "two limits with the same numbers do not collide");
    }
}
