//! Where the engine gets a key's record: the cache first, then the store,
//! with one store read shared by every concurrent miss for a key_id (single
//! flight) and an outage breaker that answers at once while the store is
//! known to be down (README, "Storage, cache and revocation").
//!
//! The change feed lands here too ([`RecordSource::apply`]): an invalidated
//! key is dropped from the cache and from the reads in flight, so a lookup
//! that starts afterwards reads the store afresh.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use super::known::KnownKeys;
use super::tenants::TenantLimits;
use crate::cache::{CacheSettings, Cached, CachedKey, KeyCache, Lookup};
use crate::clock::Clock;
use crate::key::KeyId;
use crate::metrics::Metrics;
use crate::store::{FeedEvent, KeyStore};
use crate::verdict::VerifyError;

type Flight = Arc<OnceCell<Result<Lookup, VerifyError>>>;

/// During a store outage, how often one lookup may try the store again:
/// often enough that a probe is always waiting when a stall ends, so the
/// breaker closes with the stall rather than up to a probe later.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Store reads that must fail in a row before the store counts as down (and
/// lookups stop waiting for it): one slow answer on a busy machine is not an
/// outage (README, "Storage, cache and revocation").
const BREAKER_AFTER: u32 = 3;

/// How often a lookup waiting for its address's reads in flight asks again.
const ADMIT_POLL: Duration = Duration::from_millis(1);

/// What the cache could not answer alone (see
/// [`RecordSource::answer_cached`]): the stale entry it held, if any, and
/// since when the store has been known to be down (0: it is not).
pub struct Miss {
    stale: Option<std::sync::Arc<CachedKey>>,
    down_since: u64,
}

/// Whether a lookup may read the store now (see [`RecordSource::lookup_missed`]).
pub enum Admit {
    Read,
    Refuse,
    Wait,
}

pub struct RecordSource {
    store: Arc<dyn KeyStore>,
    cache: KeyCache,
    inflight: DashMap<KeyId, Flight>,
    /// How long a lookup waits for the store.
    timeout: Duration,
    /// Monotonic nanos of the first failed store read of an outage, once
    /// [`BREAKER_AFTER`] reads failed in a row; 0 while the store answers.
    store_down_since: AtomicU64,
    /// Monotonic nanos of the first of the failed reads in a row; 0 after a
    /// read that succeeded.
    failing_since: AtomicU64,
    failures_in_a_row: std::sync::atomic::AtomicU32,
    /// Monotonic nanos since when the change feed is lost; 0 while it is
    /// live (or before it first connected).
    feed_down_since: AtomicU64,
    tenants: TenantLimits,
    /// Which key_ids exist; `None` when switched off.
    known: Option<Arc<KnownKeys>>,
    /// When the store was last tried during an outage.
    last_probe: AtomicU64,
    metrics: Metrics,
    clock: Clock,
}

impl RecordSource {
    pub fn new(
        store: Arc<dyn KeyStore>,
        cache: CacheSettings,
        timeout: Duration,
        metrics: Metrics,
        clock: Clock,
    ) -> RecordSource {
        RecordSource {
            cache: KeyCache::new(cache, clock.clone(), metrics.cache_evictions.clone()),
            tenants: TenantLimits::new(store.clone(), cache.ttl, timeout, clock.clone()),
            known: (cache.known_keys > 0).then(|| Arc::new(KnownKeys::new(cache.known_keys))),
            store,
            inflight: DashMap::new(),
            timeout,
            store_down_since: AtomicU64::new(0),
            failing_since: AtomicU64::new(0),
            failures_in_a_row: std::sync::atomic::AtomicU32::new(0),
            feed_down_since: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            metrics,
            clock,
        }
    }

    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    /// What the cache holds for `id`, read once per Verify and handed to
    /// [`answer_cached`](Self::answer_cached); never reads the store.
    #[inline]
    pub fn peek(&self, id: KeyId, now_mono: u64) -> Cached {
        self.cache.get(id, now_mono)
    }

    /// Whether `peeked` is a key the cache holds fresh and trusted (not
    /// while the feed has been lost past its grace).
    #[inline]
    pub fn is_trusted_hit(&self, peeked: &Cached) -> bool {
        matches!(peeked, Cached::Fresh(Lookup::Present(_))) && !self.feed_lost_too_long()
    }

    /// The record for `id` from what the cache held (`peeked`, from
    /// [`peek`](Self::peek)) when it can answer alone, without a future (a
    /// cache hit, the common case: README, "Performance"); else the miss
    /// to hand to [`lookup_missed`](Self::lookup_missed).
    #[inline]
    pub fn answer_cached(&self, peeked: Cached) -> Result<Lookup, Miss> {
        let down_since = self.store_down_since.load(Ordering::Relaxed);
        let failing = self.failing_since.load(Ordering::Relaxed) != 0;
        let untrusted = self.feed_lost_too_long();
        let stale = match peeked {
            // Never a cached NOT_FOUND while the store fails or the feed is
            // lost: the key may have been created meanwhile.
            Cached::Fresh(Lookup::Absent) if failing || untrusted || down_since != 0 => None,
            // The feed is lost: a cached key may have been revoked; read it
            // again (and fall back to it only if the store fails too).
            Cached::Fresh(Lookup::Present(key)) if untrusted => Some(key),
            Cached::Fresh(found) => {
                self.metrics.cache_hits.increment(1);
                return Ok(found);
            }
            Cached::Stale(key) => Some(key),
            Cached::Missing => None,
        };
        Err(Miss { stale, down_since })
    }

    /// The record for a key_id the cache could not answer for: from the
    /// store (one read, shared by every concurrent miss for the same
    /// key_id), else the stale entry `miss` holds, if the outage is young.
    ///
    /// `charge` is asked before the store is read (README, "Rate limits"):
    /// [`Admit::Refuse`] reads nothing and answers `Absent`, which the
    /// caller must not take as the store's; [`Admit::Wait`] asks again
    /// shortly, for at most the store budget (then the store is too slow
    /// for this caller: `UNAVAILABLE`).
    pub async fn lookup_missed(
        &self,
        id: KeyId,
        miss: Miss,
        charge: impl FnMut() -> Admit,
    ) -> Result<Lookup, VerifyError> {
        let Miss { stale, down_since } = miss;
        // A key_id no one created: NOT_FOUND without the store, and nothing
        // cached for it (README, forged keys).
        if stale.is_none()
            && let Some(known) = &self.known
            && known.rules_out(id)
        {
            self.metrics.known_key_misses.increment(1);
            return Ok(Lookup::Absent);
        }
        // Boxed: what a read of the store holds while it waits would
        // otherwise make every Verify's future that much larger, and each
        // is moved in memory before it runs (README, "Performance").
        Box::pin(self.read_through(id, stale, down_since, charge)).await
    }

    /// [`lookup_missed`](Self::lookup_missed) past the known-key filter:
    /// the store, shared by every concurrent miss of `id`, and `stale` if
    /// it cannot answer.
    async fn read_through(
        &self,
        id: KeyId,
        stale: Option<std::sync::Arc<CachedKey>>,
        down_since: u64,
        mut charge: impl FnMut() -> Admit,
    ) -> Result<Lookup, VerifyError> {
        self.metrics.cache_misses.increment(1);
        // While the store is known to be down, one call at a time probes it
        // (at most every PROBE_EVERY); the rest answer at once instead of
        // each waiting out the store budget.
        // While the store is known to be down and no probe is due, nothing
        // is charged or read.
        let result = if down_since != 0 && !self.probe_due() {
            Err(VerifyError::StoreUnavailable)
        } else {
            match self.admitted(&mut charge).await {
                Ok(false) => return Ok(Lookup::Absent),
                Err(e) => Err(e),
                Ok(true) if down_since != 0 && !self.may_probe() => Err(VerifyError::StoreUnavailable),
                Ok(true) => {
                    let flight = self.inflight.entry(id).or_default().clone();
                    let result = flight.get_or_init(|| self.load(id)).await.clone();
                    self.inflight.remove_if(&id, |_, f| Arc::ptr_eq(f, &flight));
                    result
                }
            }
        };
        match (result, stale) {
            (Ok(found), _) => Ok(found),
            // The store cannot answer: a cached key keeps working until the
            // outage is older than the stale window. Nothing else does, and
            // nothing is cached.
            (Err(e), Some(key)) => {
                let since = self.failing_since.load(Ordering::Relaxed);
                let outage = self.clock.mono_nanos().saturating_sub(since);
                if since != 0 && outage < self.cache.settings().stale_window.as_nanos() as u64 {
                    self.metrics.cache_stale_hits.increment(1);
                    Ok(Lookup::Present(key))
                } else {
                    Err(e)
                }
            }
            (Err(e), None) => Err(e),
        }
    }

    /// The named limits of `tenant`'s policy (README, "Rate limits").
    pub async fn tenant_limits(&self, tenant: &str) -> Result<Arc<super::tenants::TenantView>, VerifyError> {
        let store_down = self.store_down_since.load(Ordering::Relaxed) != 0;
        self.tenants.get(tenant, !self.feed_lost_too_long(), store_down).await
    }

    /// Forgets tenants' policies no longer in use.
    pub fn purge(&self) {
        self.tenants.purge();
    }

    /// Asks `charge` until it admits or refuses the read; waits (for at
    /// most the store budget, on the runtime's clock) while it says wait.
    /// Waiting past the budget is the store's slowness, not the caller's
    /// failure: an error, which a stale entry may still answer.
    async fn admitted(&self, charge: &mut impl FnMut() -> Admit) -> Result<bool, VerifyError> {
        let until = tokio::time::Instant::now() + self.timeout;
        loop {
            match charge() {
                Admit::Read => return Ok(true),
                Admit::Refuse => return Ok(false),
                Admit::Wait if tokio::time::Instant::now() >= until => {
                    return Err(VerifyError::StoreTimeout(self.timeout));
                }
                Admit::Wait => tokio::time::sleep(ADMIT_POLL).await,
            }
        }
    }

    /// Whether a probe of a store known to be down is due (without
    /// claiming it).
    fn probe_due(&self) -> bool {
        let now = self.clock.mono_nanos();
        now.saturating_sub(self.last_probe.load(Ordering::Relaxed)) >= PROBE_EVERY.as_nanos() as u64
    }

    fn may_probe(&self) -> bool {
        let now = self.clock.mono_nanos();
        let last = self.last_probe.load(Ordering::Relaxed);
        now.saturating_sub(last) >= PROBE_EVERY.as_nanos() as u64
            && self.last_probe.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Whether the change feed has been lost for longer than the grace.
    #[inline]
    fn feed_lost_too_long(&self) -> bool {
        let since = self.feed_down_since.load(Ordering::Relaxed);
        since != 0 && self.clock.mono_nanos().saturating_sub(since) > self.cache.settings().feed_grace.as_nanos() as u64
    }

    /// Notes that a store read failed; after [`BREAKER_AFTER`] in a row the
    /// store counts as down (logged once, at that moment).
    fn store_failed(&self, error: &dyn std::fmt::Display) {
        let now = self.clock.mono_nanos().max(1);
        let _ = self.failing_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let in_a_row = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row < BREAKER_AFTER {
            return;
        }
        let since = self.failing_since.load(Ordering::Relaxed).max(1);
        if self.store_down_since.compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.metrics.breaker_open.set(1.0);
            self.last_probe.store(now, Ordering::Relaxed);
            tracing::warn!(error = %error, failures = in_a_row, stale_window = ?self.cache.settings().stale_window, "key store unavailable; cached keys keep verifying for the stale window");
        }
    }

    fn store_answered(&self) {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
            self.failing_since.store(0, Ordering::Relaxed);
        }
        if self.store_down_since.swap(0, Ordering::Relaxed) != 0 {
            self.metrics.breaker_open.set(0.0);
            tracing::info!("key store reachable again");
        }
    }

    async fn load(&self, id: KeyId) -> Result<Lookup, VerifyError> {
        let seen = self.cache.generation(id);
        let budget = self.timeout;
        self.metrics.store_reads.increment(1);
        let read = self.store.get(id);
        tokio::pin!(read);
        let answer = match tokio::time::timeout(budget, &mut read).await {
            Ok(answer) => Ok(answer),
            // The budget is the store's, not a busy runtime's: an answer
            // that has arrived and waits for its connection task to run is
            // taken (README, "Storage, cache and revocation").
            Err(elapsed) => {
                tokio::task::yield_now().await;
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                match std::future::Future::poll(read.as_mut(), &mut cx) {
                    std::task::Poll::Ready(answer) => Ok(answer),
                    std::task::Poll::Pending => Err(elapsed),
                }
            }
        };
        let record = match answer {
            Err(_) => {
                self.metrics.store_timeouts.increment(1);
                self.store_failed(&format_args!("no answer within {budget:?}"));
                return Err(VerifyError::StoreTimeout(budget));
            }
            Ok(Err(e)) => {
                self.metrics.store_errors.increment(1);
                self.store_failed(&e);
                return Err(VerifyError::StoreUnavailable);
            }
            Ok(Ok(record)) => {
                self.store_answered();
                record
            }
        };
        let found = match record {
            None => Lookup::Absent,
            Some(record) => Lookup::Present(Arc::new(CachedKey::new(record))),
        };
        self.cache.insert_if_current(id, seen, found.clone());
        Ok(found)
    }

    /// Applies a change announced by the store.
    pub fn apply(&self, event: &FeedEvent) {
        match event {
            FeedEvent::Invalidate(id) => {
                self.metrics.feed_events_key.increment(1);
                self.invalidate(*id);
            }
            FeedEvent::TenantChanged(tenant) => self.tenants.invalidate(tenant),
            FeedEvent::InvalidateAll => {
                self.metrics.feed_events_all.increment(1);
                self.tenants.invalidate_all();
                self.cache.invalidate_all();
                self.inflight.clear();
                // Events were lost: creations among them.
                self.reload_known();
            }
            FeedEvent::Connected => {
                self.feed_down_since.store(0, Ordering::Relaxed);
                self.reload_known();
            }
            FeedEvent::Disconnected => {
                let now = self.clock.mono_nanos().max(1);
                let _ = self.feed_down_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                if let Some(known) = &self.known {
                    known.distrust();
                }
            }
        }
    }

    /// Drops `id` from the cache and from the loads in flight, so that a
    /// lookup starting now reads the store afresh.
    pub fn invalidate(&self, id: KeyId) {
        if let Some(known) = &self.known {
            known.add(id);
        }
        self.cache.invalidate(id);
        self.inflight.remove(&id);
    }

    /// Loads the known key_ids again in the background (the feed is live,
    /// or had a gap); until it completes, nothing is ruled out.
    fn reload_known(&self) {
        let Some(known) = &self.known else { return };
        // The epoch is taken here, not when the task first runs: a
        // Disconnected applied before then must stop this load.
        let epoch = known.distrust();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(known.clone().load(self.store.clone(), epoch));
        }
    }

    /// Whether `id` may exist as far as the known-key filter can tell (always,
    /// while it is not loaded).
    pub fn may_exist(&self, id: KeyId) -> bool {
        !self.known.as_ref().is_some_and(|k| k.rules_out(id))
    }

    /// Whether the known-key filter rules key_ids out now.
    pub fn known_keys_ready(&self) -> bool {
        self.known.as_ref().is_some_and(|k| k.is_ready())
    }
}
