//! Buckets shared by every replica (README, "Rate limits", fleet-wide).
//!
//! A bucket lives in the store as one GCRA arrival time ([`SharedBuckets`];
//! Redis runs the arithmetic in one script on its own clock, so replicas'
//! clocks never matter). A replica does not ask the store per request: it
//! takes a *lease* of cells from the shared bucket in one atomic call and
//! spends them locally, so a verify with a lease in hand does no round
//! trip. The cells of a lease have left the shared bucket, so the fleet
//! together never admits more than the bucket holds: leasing adds no
//! overshoot. What a lease costs is the other direction: cells held by a
//! replica that stops receiving traffic are unavailable to the others until
//! they go back, which happens after [`FleetSettings::lease_idle`]. A
//! lease is sized to the replica's own recent rate (about a quarter second
//! of its traffic) and capped at `slack` × the limit's burst, so an idle
//! replica holds little and the headers lag the truth by at most that.
//!
//! A shared bucket found empty is remembered until the store says a cell
//! is back, so a key hammering a spent limit costs no round trip either.
//!
//! When the store fails or is slower than its budget, the limiter falls
//! back for a second at a time, per limit as configured: a local bucket
//! holding the limit divided by the live replicas it last counted (each
//! replica announces itself through the store every second), admit, or
//! refuse.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use metrics::{Counter, Gauge, counter, gauge};

use super::local::LocalLimiter;
use super::{
    BucketId, BucketOwner, CellSource, Decision, LimitCheck, LimitError, LimitFallback, LimitResult, LimitSpec,
    Limiter, RateLimitPolicy, RateState,
};
use crate::clock::Clock;
use crate::key::KeyId;

/// What a store grants from a shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Cells now held by the caller (0 or at least the `min` asked).
    pub granted: u64,
    /// Cells left in the shared bucket after the grant.
    pub remaining: u64,
    /// Milliseconds until the shared bucket is whole again.
    pub reset_ms: u64,
    /// When nothing was granted: milliseconds until `min` cells are there.
    pub retry_after_ms: u64,
    /// Milliseconds until one cell is there (0 when one is there now).
    pub retry_one_ms: u64,
}

/// What a store offers for buckets shared by the fleet.
#[async_trait]
pub trait SharedBuckets: Send + Sync + 'static {
    /// Gives back `give_back` unspent cells, then takes up to `want` cells
    /// (and at least `min`, or none) from bucket `name` under `policy`,
    /// atomically.
    async fn lease(
        &self,
        name: &str,
        policy: &RateLimitPolicy,
        want: u64,
        min: u64,
        give_back: u64,
    ) -> Result<Grant, LimitError>;

    /// Announces replica `id` as live for `ttl` and counts the live
    /// replicas (itself included).
    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u32, LimitError>;
}

/// How the fleet limiter behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetSettings {
    /// The largest share of a limit's burst one replica may hold at once.
    pub slack: f64,
    /// Unspent cells of a lease go back after this long without use.
    pub lease_idle: Duration,
    /// How long a check waits for the store before falling back.
    pub timeout: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings { slack: 0.01, lease_idle: Duration::from_secs(1), timeout: Duration::from_millis(50) }
    }
}

/// The window over which a replica's demand for a bucket is measured.
const DEMAND_WINDOW_NANOS: u64 = 1_000_000_000;
/// How much traffic one lease should cover.
const LEASE_SPAN_NANOS: u64 = 250_000_000;
/// After a failed store call, how long checks use the fallback before the
/// store is tried again.
const FALLBACK_FOR: Duration = Duration::from_secs(1);
/// How often a replica announces itself, returns idle leases and forgets
/// idle slots.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A replica not heard from for this long no longer counts as live.
const REPLICA_TTL: Duration = Duration::from_secs(5);

type Hasher = foldhash::fast::RandomState;

/// This replica's view of one shared bucket.
struct Lease {
    policy: RateLimitPolicy,
    /// The bucket's name in the store.
    name: String,
    /// Cells taken from the shared bucket and not spent yet.
    cells: u64,
    /// Cells the shared bucket held after the last grant.
    shared_remaining: u64,
    /// Monotonic nanos when the shared bucket was whole, as of the last grant.
    whole_at: u64,
    /// Monotonic nanos before which the shared bucket has no cell at all.
    empty_until: u64,
    /// Monotonic nanos before which a request of `short_cost` cells or more
    /// cannot pass (the store said so for that many).
    short_until: u64,
    short_cost: u64,
    /// Cells asked for since `demand_since`, a window of about a second.
    demand: u64,
    demand_since: u64,
    /// Cells per second asked for in the last whole window.
    last_rate: u64,
    /// Checks of this bucket waiting for a refill: one refill serves them all.
    waiting: u64,
    last_used: u64,
}

struct Slot {
    lease: Mutex<Lease>,
    /// One store call per bucket at a time.
    refill: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(bucket: &BucketId, now: u64) -> Slot {
        let lease = Lease {
            policy: bucket.quota,
            name: bucket.storage_name(),
            cells: 0,
            shared_remaining: bucket.quota.effective_burst(),
            whole_at: now,
            empty_until: 0,
            short_until: 0,
            short_cost: u64::MAX,
            demand: 0,
            demand_since: now,
            last_rate: 0,
            waiting: 0,
            last_used: now,
        };
        Slot { lease: Mutex::new(lease), refill: tokio::sync::Mutex::new(()) }
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a check as waiting for a refill while it lives (also when the
/// caller gives up and drops the check).
struct Waiting<'a>(&'a Slot);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut lease = self.0.lease();
        lease.waiting = lease.waiting.saturating_sub(1);
    }
}

impl Lease {
    fn state(&self, now: u64) -> RateState {
        RateState {
            limit: self.policy.requests,
            remaining: (self.shared_remaining + self.cells).min(self.policy.requests),
            reset_seconds: self.whole_at.saturating_sub(now).div_ceil(1_000_000_000),
            window_seconds: self.policy.window_seconds,
            retry_after_ms: 0,
        }
    }

    fn denied(&self, now: u64, wait_nanos: u64) -> Decision {
        let mut state = self.state(now);
        state.retry_after_ms = wait_nanos.div_ceil(1_000_000).max(1);
        // As for a local bucket: on a denial, when the request could pass.
        state.reset_seconds = state.retry_after_ms.div_ceil(1000);
        Decision { allowed: false, state, source: CellSource::Lease }
    }

    /// Spends from the lease or answers from a known-empty bucket; `None`
    /// when the store must be asked.
    fn try_local(&mut self, cost: u64, now: u64) -> Option<Decision> {
        if self.cells >= cost {
            self.cells -= cost;
            return Some(Decision { allowed: true, state: self.state(now), source: CellSource::Lease });
        }
        if now < self.empty_until {
            let more = (cost - 1).saturating_mul(self.policy.period_nanos());
            return Some(self.denied(now, self.empty_until - now + more));
        }
        if cost >= self.short_cost && now < self.short_until {
            return Some(self.denied(now, self.short_until - now));
        }
        None
    }

    /// Counts `cost` cells asked for; the window rolls over every second.
    /// Not reset by a refill: callers queued behind one make no new demand
    /// meanwhile, and a rate measured from refill to refill would shrink
    /// the leases of a saturated replica to a cell each.
    fn note_demand(&mut self, cost: u64, now: u64) {
        self.demand += cost;
        self.last_used = now;
        let elapsed = now.saturating_sub(self.demand_since);
        if elapsed >= DEMAND_WINDOW_NANOS {
            self.last_rate = (self.demand as u128 * 1_000_000_000 / elapsed as u128) as u64;
            self.demand = 0;
            self.demand_since = now;
        }
    }

    /// Cells to ask for: a quarter second of this replica's recent demand,
    /// at most `slack` of the burst, but at least what the checks waiting
    /// now need (and never more than the burst).
    fn want(&self, cost: u64, slack: f64, now: u64) -> u64 {
        let elapsed = now.saturating_sub(self.demand_since).max(100_000_000);
        let current = (self.demand as u128 * 1_000_000_000 / elapsed as u128) as u64;
        let rate = current.max(self.last_rate);
        let rate_span = (rate as u128 * LEASE_SPAN_NANOS as u128 / 1_000_000_000) as u64;
        let burst = self.policy.effective_burst();
        let cap = ((burst as f64 * slack).floor() as u64).max(1);
        rate_span.clamp(1, cap).max(self.waiting.saturating_mul(cost)).max(cost).min(burst)
    }
}

pub struct FleetLimiter {
    shared: Arc<dyn SharedBuckets>,
    slots: DashMap<BucketId, Arc<Slot>, Hasher>,
    /// The local-share buckets used while the store is out of reach.
    fallback: LocalLimiter,
    settings: FleetSettings,
    replica: String,
    /// Live replicas as last counted through the store (at least 1).
    replicas: AtomicU32,
    /// Monotonic nanos until which checks use the fallback; 0 = none.
    fallback_until: AtomicU64,
    clock: Clock,
    instruments: Instruments,
}

struct Instruments {
    leases: Counter,
    lease_failures: Counter,
    fallback_active: Gauge,
    replicas: Gauge,
    fallback_local_share: Counter,
    fallback_open: Counter,
    fallback_closed: Counter,
}

impl FleetLimiter {
    /// A limiter on `shared`, with its housekeeping task (heartbeat, idle
    /// leases back, idle slots forgotten) running until the limiter is
    /// dropped. Needs a tokio runtime.
    pub fn start(shared: Arc<dyn SharedBuckets>, settings: FleetSettings, clock: Clock) -> Arc<FleetLimiter> {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        let limiter = Arc::new(FleetLimiter {
            shared,
            slots: DashMap::with_hasher(Hasher::default()),
            fallback: LocalLimiter::new(clock.clone()),
            settings,
            replica: id.iter().map(|b| format!("{b:02x}")).collect(),
            replicas: AtomicU32::new(1),
            fallback_until: AtomicU64::new(0),
            clock,
            instruments: Instruments {
                leases: counter!("keystile_limit_leases_total"),
                lease_failures: counter!("keystile_limit_lease_failures_total"),
                fallback_active: gauge!("keystile_limit_fallback_active"),
                replicas: gauge!("keystile_limit_replicas"),
                fallback_local_share: counter!("keystile_limit_fallback_decisions_total", "fallback" => "local_share"),
                fallback_open: counter!("keystile_limit_fallback_decisions_total", "fallback" => "open"),
                fallback_closed: counter!("keystile_limit_fallback_decisions_total", "fallback" => "closed"),
            },
        });
        tokio::spawn(housekeeping(Arc::downgrade(&limiter)));
        limiter
    }

    /// Live replicas as last counted.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// Whether checks use the fallback right now.
    pub fn in_fallback(&self) -> bool {
        self.fallback_until.load(Ordering::Relaxed) > self.clock.mono_nanos()
    }

    fn store_failed(&self, error: &dyn std::fmt::Display) {
        self.instruments.lease_failures.increment(1);
        let until = self.clock.mono_nanos() + FALLBACK_FOR.as_nanos() as u64;
        if self.fallback_until.swap(until, Ordering::Relaxed) == 0 {
            self.instruments.fallback_active.set(1.0);
            tracing::warn!(error = %error, replicas = self.replicas(), "shared rate-limit buckets unavailable; limits use their fallback");
        }
    }

    fn store_answered(&self) {
        if self.fallback_until.swap(0, Ordering::Relaxed) != 0 {
            self.instruments.fallback_active.set(0.0);
            tracing::info!("shared rate-limit buckets reachable again");
        }
    }

    /// A decision without the store, as the limit's fallback says.
    fn fallback(&self, bucket: &BucketId, spec: &LimitSpec, cost: u32) -> LimitResult {
        match spec.fallback {
            LimitFallback::LocalShare => {
                self.instruments.fallback_local_share.increment(1);
                let share = self.share(&bucket.quota);
                let local = BucketId { quota: share, ..*bucket };
                match self.fallback.check(&local, &share, cost, self.clock.mono_nanos()) {
                    LimitCheck::Ready(r) => r.map(|mut d| {
                        // The headers speak of the whole limit.
                        d.state.limit = spec.requests;
                        d.source = CellSource::LocalShare;
                        d
                    }),
                    LimitCheck::Pending(_) => unreachable!("a local bucket answers at once"),
                }
            }
            LimitFallback::Open => {
                self.instruments.fallback_open.increment(1);
                let state = RateState {
                    limit: spec.requests,
                    remaining: spec.requests,
                    reset_seconds: 0,
                    window_seconds: spec.window_seconds,
                    retry_after_ms: 0,
                };
                Ok(Decision { allowed: true, state, source: CellSource::Uncounted })
            }
            LimitFallback::Closed => {
                self.instruments.fallback_closed.increment(1);
                Err(LimitError::Unavailable(format!(
                    "limit {:?} is shared through the store, which cannot be reached, and falls back closed",
                    spec.name.as_str()
                )))
            }
        }
    }

    /// This replica's share of `policy` while the store is out of reach.
    fn share(&self, policy: &RateLimitPolicy) -> RateLimitPolicy {
        let n = self.replicas() as u64;
        RateLimitPolicy {
            requests: (policy.requests / n).max(1),
            window_seconds: policy.window_seconds,
            burst: (policy.effective_burst() / n).max(1),
            per_tenant: false,
        }
    }

    /// Asks the store for cells, once for every check waiting on this
    /// bucket, all within `deadline` (one store budget from the check's
    /// start, queueing included).
    async fn refill(
        &self,
        slot: Arc<Slot>,
        bucket: BucketId,
        spec: LimitSpec,
        cost: u64,
        deadline: tokio::time::Instant,
    ) -> LimitResult {
        let _waiting = Waiting(&slot);
        let Ok(_one) = tokio::time::timeout_at(deadline, slot.refill.lock()).await else {
            // The refill ahead of this one took the whole budget: the
            // store is too slow for its budget.
            self.store_failed(&format_args!("no lease within {:?}", self.settings.timeout));
            return self.fallback(&bucket, &spec, cost as u32);
        };
        let now = self.clock.mono_nanos();
        let (name, want, min) = {
            let mut lease = slot.lease();
            // Another check may have refilled while this one waited.
            if let Some(d) = lease.try_local(cost, now) {
                return Ok(d);
            }
            if self.in_fallback() {
                drop(lease);
                return self.fallback(&bucket, &spec, cost as u32);
            }
            let held = lease.cells;
            let want = lease.want(cost, self.settings.slack, now).saturating_sub(held).max(cost - held);
            (lease.name.clone(), want, cost - held)
        };
        self.instruments.leases.increment(1);
        let asked = self.shared.lease(&name, &bucket.quota, want, min, 0);
        let grant = match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                self.store_failed(&e);
                return self.fallback(&bucket, &spec, cost as u32);
            }
            Err(_) => {
                self.store_failed(&format_args!("no lease within {:?}", self.settings.timeout));
                return self.fallback(&bucket, &spec, cost as u32);
            }
        };
        self.store_answered();
        let now = self.clock.mono_nanos();
        let mut lease = slot.lease();
        lease.cells += grant.granted;
        lease.shared_remaining = grant.remaining;
        lease.whole_at = now + grant.reset_ms * 1_000_000;
        lease.last_used = now;
        if grant.granted == 0 {
            if grant.retry_one_ms > 0 {
                lease.empty_until = now + grant.retry_one_ms * 1_000_000;
            }
            lease.short_cost = cost;
            lease.short_until = now + grant.retry_after_ms.max(1) * 1_000_000;
        } else {
            lease.short_until = 0;
        }
        Ok(lease.try_local(cost, now).unwrap_or_else(|| lease.denied(now, grant.retry_after_ms.max(1) * 1_000_000)))
    }

    /// Gives back leases unused for `lease_idle` and forgets slots idle for
    /// four times that; returns how many cells went back.
    async fn return_idle(&self) -> u64 {
        let now = self.clock.mono_nanos();
        let idle = self.settings.lease_idle.as_nanos() as u64;
        let mut back = Vec::new();
        self.slots.retain(|_, slot| {
            let Ok(mut lease) = slot.lease.try_lock() else { return true };
            let quiet = now.saturating_sub(lease.last_used);
            if lease.cells > 0 && quiet >= idle {
                back.push((lease.name.clone(), lease.policy, std::mem::take(&mut lease.cells)));
            }
            !(lease.cells == 0 && quiet >= 4 * idle)
        });
        let mut total = 0;
        for (name, policy, cells) in back {
            match tokio::time::timeout(self.settings.timeout * 4, self.shared.lease(&name, &policy, 0, 0, cells)).await
            {
                Ok(Ok(_)) => total += cells,
                // Lost cells are only under-admission, bounded by the lease.
                _ => tracing::debug!(cells, "could not give idle lease cells back"),
            }
        }
        total
    }

    async fn heartbeat(&self) {
        match tokio::time::timeout(self.settings.timeout * 4, self.shared.heartbeat(&self.replica, REPLICA_TTL)).await {
            Ok(Ok(n)) => {
                self.replicas.store(n.max(1), Ordering::Relaxed);
                self.instruments.replicas.set(n.max(1) as f64);
            }
            _ => tracing::debug!("replica heartbeat failed; keeping the last count"),
        }
    }

    /// Leases held, for tests.
    pub fn leased_cells(&self) -> u64 {
        self.slots.iter().map(|s| s.lease.lock().map(|l| l.cells).unwrap_or(0)).sum()
    }
}

async fn housekeeping(limiter: Weak<FleetLimiter>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(l) = limiter.upgrade() else { return };
        l.heartbeat().await;
        l.return_idle().await;
    }
}

impl Limiter for FleetLimiter {
    fn check(&self, bucket: &BucketId, policy: &RateLimitPolicy, cost: u32, now: u64) -> LimitCheck<'_> {
        let spec = LimitSpec {
            requests: policy.requests,
            window_seconds: policy.window_seconds,
            burst: policy.burst,
            ..LimitSpec::from_legacy(policy)
        };
        self.check_spec(bucket, &spec, cost, now)
    }

    #[inline]
    fn check_spec(&self, bucket: &BucketId, spec: &LimitSpec, cost: u32, now: u64) -> LimitCheck<'_> {
        let cost = cost.max(1) as u64;
        if cost > bucket.quota.effective_burst() {
            // More than the whole burst can never pass: no store call, and
            // nothing is marked, so smaller requests are not held up.
            let state = RateState {
                limit: bucket.quota.requests,
                remaining: 0,
                reset_seconds: bucket.quota.window_seconds,
                window_seconds: bucket.quota.window_seconds,
                retry_after_ms: bucket.quota.window_seconds * 1000,
            };
            return LimitCheck::Ready(Ok(Decision { allowed: false, state, source: CellSource::Uncounted }));
        }
        let slot = match self.slots.get(bucket) {
            Some(slot) => {
                let mut lease = slot.lease();
                lease.note_demand(cost, now);
                if let Some(d) = lease.try_local(cost, now) {
                    return LimitCheck::Ready(Ok(d));
                }
                lease.waiting += 1;
                drop(lease);
                slot.clone()
            }
            None => {
                let slot = self.slots.entry(*bucket).or_insert_with(|| Arc::new(Slot::new(bucket, now))).clone();
                let mut lease = slot.lease();
                lease.note_demand(cost, now);
                lease.waiting += 1;
                drop(lease);
                slot
            }
        };
        if self.in_fallback() {
            drop(Waiting(&slot));
            return LimitCheck::Ready(self.fallback(bucket, spec, cost as u32));
        }
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        LimitCheck::Pending(Box::pin(self.refill(slot, *bucket, *spec, cost, deadline)))
    }

    fn refund(&self, bucket: &BucketId, decision: &Decision, cost: u32) {
        match decision.source {
            CellSource::Lease => {
                if let Some(slot) = self.slots.get(bucket) {
                    slot.lease().cells += cost.max(1) as u64;
                }
            }
            CellSource::LocalShare => {
                let share = self.share(&bucket.quota);
                let local = BucketId { quota: share, ..*bucket };
                self.fallback.refund(&local, decision, cost);
            }
            CellSource::Local | CellSource::Uncounted => {}
        }
    }

    fn forget_key(&self, id: KeyId) {
        self.slots.retain(|b, _| b.owner != BucketOwner::Key(id));
        self.fallback.forget_key(id);
    }

    fn purge(&self) {
        self.fallback.purge();
    }

    fn len(&self) -> usize {
        self.slots.len() + self.fallback.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Env;
    use crate::limit::LimitName;
    use crate::store::memory::MemoryBuckets;

    fn setup(slack: f64) -> (Arc<MemoryBuckets>, Arc<FleetLimiter>, Clock) {
        let clock = Clock::manual(1_000);
        let shared = Arc::new(MemoryBuckets::new(clock.clone()));
        let settings = FleetSettings { slack, ..FleetSettings::default() };
        let limiter = FleetLimiter::start(shared.clone(), settings, clock.clone());
        (shared, limiter, clock)
    }

    fn bucket(spec: &LimitSpec, id: &str) -> BucketId {
        BucketId::of(spec, id.parse().unwrap(), None, Env::Live)
    }

    async fn take(l: &FleetLimiter, b: &BucketId, spec: &LimitSpec) -> Decision {
        l.check_spec(b, spec, 1, l.clock.mono_nanos()).outcome().await.unwrap()
    }

    #[tokio::test]
    async fn two_replicas_never_admit_more_than_the_bucket() {
        let (shared, a, clock) = setup(0.05);
        let b = FleetLimiter::start(shared.clone(), FleetSettings { slack: 0.05, ..Default::default() }, clock.clone());
        let spec: LimitSpec = "api=100/3600s".parse().unwrap();
        let id = bucket(&spec, "aaaaAAAA");
        let mut admitted = 0;
        for i in 0..400 {
            let l = if i % 10 == 0 { &b } else { &a };
            if take(l, &id, &spec).await.allowed {
                admitted += 1;
            }
            clock.advance(Duration::from_millis(1));
        }
        // 0.4 s of a 36 s period: no cell came back.
        let held = a.leased_cells() + b.leased_cells();
        assert_eq!(admitted + held, 100, "every cell admitted or held, none twice");
        assert!(admitted >= 95, "little held back: {admitted}");
        assert!(shared.calls() < 80, "leases and the empty mark save round trips");
    }

    #[tokio::test]
    async fn a_spent_bucket_is_remembered_until_a_cell_is_back() {
        let (shared, l, clock) = setup(0.01);
        let spec: LimitSpec = "api=2/60s".parse().unwrap();
        let id = bucket(&spec, "aaaaAAAA");
        assert!(take(&l, &id, &spec).await.allowed);
        assert!(take(&l, &id, &spec).await.allowed);
        let denied = take(&l, &id, &spec).await;
        assert!(!denied.allowed);
        assert_eq!(denied.state.retry_after_ms, 30_000);
        let calls = shared.calls();
        for _ in 0..50 {
            assert!(!take(&l, &id, &spec).await.allowed);
        }
        assert_eq!(shared.calls(), calls, "denied locally");
        clock.advance(Duration::from_secs(30));
        assert!(take(&l, &id, &spec).await.allowed, "a cell came back");
    }

    #[tokio::test]
    async fn idle_leases_go_back() {
        let (shared, l, clock) = setup(0.5);
        let spec: LimitSpec = "api=100/3600s".parse().unwrap();
        let id = bucket(&spec, "aaaaAAAA");
        for _ in 0..40 {
            take(&l, &id, &spec).await;
            clock.advance(Duration::from_millis(1));
        }
        let held = l.leased_cells();
        assert!(held > 0, "a busy replica holds a lease");
        clock.advance(Duration::from_secs(2));
        assert_eq!(l.return_idle().await, held);
        assert_eq!(l.leased_cells(), 0);
        let other = FleetLimiter::start(shared.clone(), FleetSettings::default(), clock.clone());
        let mut admitted = 0;
        for _ in 0..100 {
            admitted += take(&other, &id, &spec).await.allowed as u32;
        }
        assert_eq!(admitted, 60, "the returned cells are everyone's again");
    }

    #[tokio::test]
    async fn fallbacks_apply_while_the_store_is_down_and_end_when_it_answers() {
        let (shared, l, clock) = setup(0.01);
        let others: Vec<_> =
            (0..2).map(|_| FleetLimiter::start(shared.clone(), FleetSettings::default(), clock.clone())).collect();
        for o in &others {
            o.heartbeat().await;
        }
        l.heartbeat().await;
        assert_eq!(l.replicas(), 3, "three replicas announced themselves");
        shared.set_failing(true);
        let share: LimitSpec = "share=30/60s".parse().unwrap();
        let open: LimitSpec = "open=1/60s,open".parse().unwrap();
        let closed: LimitSpec = "closed=30/60s,closed".parse().unwrap();
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += take(&l, &bucket(&share, "aaaaAAAA"), &share).await.allowed as u32;
        }
        assert_eq!(admitted, 10, "a third of the limit on each of three replicas");
        assert!(l.in_fallback());
        for _ in 0..5 {
            assert!(take(&l, &bucket(&open, "aaaaAAAA"), &open).await.allowed);
        }
        assert!(l.check_spec(&bucket(&closed, "aaaaAAAA"), &closed, 1, l.clock.mono_nanos()).outcome().await.is_err());
        shared.set_failing(false);
        clock.advance(FALLBACK_FOR);
        let calls = shared.calls();
        assert!(take(&l, &bucket(&closed, "aaaaAAAA"), &closed).await.allowed);
        assert!(!l.in_fallback(), "back on the shared bucket");
        assert!(shared.calls() > calls);
    }

    #[tokio::test]
    async fn a_large_cost_does_not_hold_up_small_requests() {
        let (shared, l, _clock) = setup(0.01);
        let spec: LimitSpec = "api=100/3600s".parse().unwrap();
        let id = bucket(&spec, "aaaaAAAA");
        for _ in 0..95 {
            assert!(take(&l, &id, &spec).await.allowed);
        }
        let huge = l.check_spec(&id, &spec, 1000, l.clock.mono_nanos()).outcome().await.unwrap();
        assert!(!huge.allowed, "more than the burst never passes");
        let calls = shared.calls();
        let big = l.check_spec(&id, &spec, 10, l.clock.mono_nanos()).outcome().await.unwrap();
        assert!(!big.allowed, "ten cells are not there");
        assert_eq!(big.state.retry_after_ms, 5 * 36_000, "five more cells at one per 36 s");
        assert!(shared.calls() > calls);
        let calls = shared.calls();
        assert!(!l.check_spec(&id, &spec, 10, l.clock.mono_nanos()).outcome().await.unwrap().allowed);
        assert_eq!(shared.calls(), calls, "the same cost is refused locally");
        assert!(take(&l, &id, &spec).await.allowed, "a request of one cell still passes");
    }

    #[tokio::test]
    async fn a_refund_puts_cells_back_in_the_lease() {
        let (_shared, l, _clock) = setup(0.5);
        let spec: LimitSpec = "api=10/3600s".parse().unwrap();
        let id = bucket(&spec, "aaaaAAAA");
        let first = take(&l, &id, &spec).await;
        assert!(first.allowed);
        l.refund(&id, &first, 1);
        let again = take(&l, &id, &spec).await;
        assert_eq!(again.state.remaining, first.state.remaining, "the refunded cell was spent again");
        assert_eq!(LimitName::DEFAULT.as_str(), "default");
    }
}
