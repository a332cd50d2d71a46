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
    /// This limiter, in the threads' fronts.
    instance: u64,
}

/// Buckets each thread keeps in front of the map, by bucket id: a hot
/// key's bucket is found without hashing its id, locking a shard and
/// comparing in the map (README, "Performance"). A bucket the map drops is
/// retired first ([`GcraBucket::retire_if_whole`], [`GcraBucket::retire`]),
/// so a kept one is never taken from after it left the map.
pub const FRONT_SLOTS: usize = 16;

/// A kept bucket: which limiter, which id, the bucket.
type Kept = Option<(u64, BucketId, Arc<GcraBucket>)>;

thread_local! {
    static FRONT: std::cell::RefCell<[Kept; FRONT_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; FRONT_SLOTS]) };
}

/// Tells the limiters of one process apart in the threads' fronts.
static LIMITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A bucket's slot in a thread's front: key_ids and tenant tags are
/// uniformly random, so a few of their bits are a good hash.
#[inline]
fn front_slot(id: &BucketId) -> usize {
    let owner = match &id.owner {
        BucketOwner::Key(k) => k.as_bytes()[1] ^ k.as_bytes()[6].rotate_left(3),
        BucketOwner::Tenant { tag, .. } => tag[0] ^ tag[5].rotate_left(3),
    };
    usize::from(owner ^ id.name.as_str().len() as u8) % FRONT_SLOTS
}

impl LocalLimiter {
    pub fn new(clock: Clock) -> LocalLimiter {
        let instance = LIMITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LocalLimiter { buckets: DashMap::with_hasher(Hasher::default()), clock, instance }
    }

    /// Takes `cost` cells from the bucket for `id` under `policy`; a changed
    /// policy gets a new, whole bucket. A cache refresh or an unrelated
    /// update (a new name) keeps the bucket. The check runs under the map's
    /// shard lock, so a purge cannot drop a bucket between lookup and take.
    #[inline]
    fn take(&self, id: &BucketId, policy: &RateLimitPolicy, cost: u32, now: u64) -> (bool, RateState) {
        let at = front_slot(id);
        let kept = FRONT.with_borrow(|front| match &front[at] {
            Some((limiter, kept, bucket)) if *limiter == self.instance && kept == id && bucket.policy() == *policy => {
                bucket.take_live(cost, now)
            }
            _ => None,
        });
        if let Some(answer) = kept {
            return answer;
        }
        let (answer, bucket) = self.take_from_map(id, policy, cost, now);
        FRONT.with_borrow_mut(|front| front[at] = Some((self.instance, *id, bucket)));
        answer
    }

    /// [`take`](Self::take) through the map, and the bucket it took from.
    fn take_from_map(
        &self,
        id: &BucketId,
        policy: &RateLimitPolicy,
        cost: u32,
        now: u64,
    ) -> ((bool, RateState), Arc<GcraBucket>) {
        if let Some(b) = self.buckets.get(id)
            && b.policy() == *policy
        {
            return (b.check_at(cost, now), b.clone());
        }
        let mut slot =
            self.buckets.entry(*id).or_insert_with(|| Arc::new(GcraBucket::new(*policy, self.clock.clone())));
        if slot.policy() != *policy {
            slot.retire();
            *slot = Arc::new(GcraBucket::new(*policy, self.clock.clone()));
        }
        (slot.check_at(cost, now), slot.clone())
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
        self.buckets.retain(|b, bucket| {
            let keep = b.owner != BucketOwner::Key(id);
            if !keep {
                bucket.retire();
            }
            keep
        });
    }

    fn purge(&self) {
        // Under the shard's write lock no check through the map can reach
        // the bucket, and one through a thread's front either lands before
        // the retirement (the bucket is not whole, and stays) or finds it
        // retired and asks the map, which no longer holds it.
        self.buckets.retain(|_, b| !b.retire_if_whole());
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

    /// A bucket a thread keeps in front of the map is not taken from once
    /// the map dropped it: after a purge of whole buckets (on this thread
    /// and another) and after its key's deletion; and two limiters on one
    /// thread never share one. (A changed policy is another bucket id, so
    /// another slot's key.)
    #[test]
    fn a_kept_bucket_goes_when_the_map_drops_it() {
        let clock = Clock::manual(0);
        let l = LocalLimiter::new(clock.clone());
        let two = policy(2, 60);
        let id = with(&key_bucket("aaaaAAAA"), &two);
        assert!(take(&l, &id, &two, 1).allowed);
        clock.advance(Duration::from_secs(60));
        l.purge();
        assert!(l.is_empty(), "whole, so purged");
        assert!(take(&l, &id, &two, 1).allowed);
        assert_eq!(l.len(), 1, "the take went through the map and made a new bucket");

        assert!(take(&l, &id, &two, 1).allowed);
        assert!(!take(&l, &id, &two, 1).allowed, "spent");
        l.forget_key("aaaaAAAA".parse().unwrap());
        assert!(take(&l, &id, &two, 1).allowed, "the deleted key's spent bucket is not used again");
        assert_eq!(l.len(), 1);

        let other = LocalLimiter::new(clock.clone());
        assert_eq!(take(&other, &id, &two, 1).state.remaining, 1, "another limiter's bucket of that id");
        assert_eq!(take(&l, &id, &two, 1).state.remaining, 0, "and this one's is its own");

        // On another thread: what it kept from the map goes with a purge.
        let hourly = policy(1, 3600);
        let spent = with(&key_bucket("bbbbBBBB"), &hourly);
        std::thread::scope(|s| {
            s.spawn(|| assert!(take(&l, &spent, &hourly, 1).allowed));
        });
        assert!(!take(&l, &spent, &hourly, 1).allowed);
        clock.advance(Duration::from_secs(3600));
        l.purge();
        std::thread::scope(|s| {
            s.spawn(|| assert!(take(&l, &spent, &hourly, 1).allowed, "a new bucket"));
        });
        assert!(!take(&l, &spent, &hourly, 1).allowed, "the other thread's take is in the map's bucket");
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
