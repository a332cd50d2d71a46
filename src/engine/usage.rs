//! What a key's verifications leave behind, batched to the store (README,
//! "Admin API and CLI" and "Usage"): the last-used timestamp, noted at most
//! once a second per key, and counts by verdict code, kept in the cached
//! key's own atomics and written once per flush, never a store write per
//! request.
//!
//! A hot key costs one relaxed add and a read of its own second per Verify;
//! the first verdict of a second registers the key for the next flush.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;

use crate::cache::CachedKey;
use crate::clock::Clock;
use crate::key::KeyId;
use crate::metrics::Metrics;
use crate::store::{KeyStore, StoreError, UsageCount};
use crate::verdict::Outcome;

/// Hours a key's usage is shown over: the last day.
pub const USAGE_HOURS: i64 = 24;

pub struct UsageBatcher {
    /// key_id → last second it verified, waiting to be written.
    pending: DashMap<KeyId, i64>,
    /// Keys with counts waiting to be written.
    counted: DashMap<KeyId, Arc<CachedKey>>,
    store: Arc<dyn KeyStore>,
    metrics: Metrics,
    clock: Clock,
}

impl UsageBatcher {
    pub fn new(store: Arc<dyn KeyStore>, metrics: Metrics, clock: Clock) -> UsageBatcher {
        UsageBatcher { pending: DashMap::new(), counted: DashMap::new(), store, metrics, clock }
    }

    /// Counts one verdict of an identified key at unix second `now`; a
    /// `VALID` one also moves its last-used time.
    ///
    /// The add and the read of `counted_at` are sequentially consistent
    /// with the flush's clear-then-take, so a count is either in what a
    /// flush takes or registers the key again.
    #[inline]
    pub fn count(&self, key: &Arc<CachedKey>, outcome: Outcome, now: i64) {
        key.counts[outcome as usize].fetch_add(1, Ordering::SeqCst);
        if outcome == Outcome::Valid {
            self.note(key, now);
        }
        if key.counted_at.load(Ordering::SeqCst) != now && key.counted_at.swap(now, Ordering::SeqCst) != now {
            self.register(key);
        }
    }

    /// Puts `key` in the next flush. Several copies of one record can be
    /// in use at once (the cache refilled while calls held the old one):
    /// the map keeps the newest, and a copy that is not kept hands its
    /// counts to the kept one and forgets it registered, so its next count
    /// registers (and hands over) again.
    #[cold]
    fn register(&self, key: &Arc<CachedKey>) {
        match self.counted.entry(key.record.key_id) {
            dashmap::Entry::Occupied(mut e) => {
                if Arc::ptr_eq(e.get(), key) {
                    return;
                }
                let (kept, other) = if key.record.version >= e.get().record.version {
                    let old = e.insert(key.clone());
                    (key.clone(), old)
                } else {
                    (e.get().clone(), key.clone())
                };
                hand_over(&other, &kept);
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(key.clone());
            }
        }
    }

    /// Remembers that `key` verified at unix second `now`.
    #[inline]
    fn note(&self, key: &CachedKey, now: i64) {
        if key.last_touch.load(Ordering::Relaxed) != now && key.last_touch.swap(now, Ordering::Relaxed) != now {
            self.pending.insert(key.record.key_id, now);
        }
    }

    /// Writes the pending timestamps and counts, one batch each. What fails
    /// to be written is kept for the next flush. Returns how many keys
    /// had something written.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let counts = self.flush_counts().await;
        let touched = self.flush_last_used().await?;
        Ok(touched.max(counts?))
    }

    async fn flush_last_used(&self) -> Result<usize, StoreError> {
        let batch: Vec<(KeyId, i64)> = self.pending.iter().map(|e| (*e.key(), *e.value())).collect();
        if batch.is_empty() {
            return Ok(0);
        }
        self.metrics.last_used_writes.increment(1);
        self.store.touch_last_used(&batch).await?;
        for (id, at) in &batch {
            self.pending.remove_if(id, |_, v| v == at);
        }
        Ok(batch.len())
    }

    async fn flush_counts(&self) -> Result<usize, StoreError> {
        let ids: Vec<KeyId> = self.counted.iter().map(|e| *e.key()).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut keys = Vec::with_capacity(ids.len());
        let mut batch = Vec::with_capacity(ids.len());
        for id in ids {
            let Some((_, key)) = self.counted.remove(&id) else { continue };
            // Cleared before the counts are taken: a verdict from here on
            // registers the key again, one before is in what is taken.
            key.counted_at.store(0, Ordering::SeqCst);
            let counts: Vec<UsageCount> = Outcome::ALL
                .iter()
                .zip(key.counts.iter())
                .filter_map(|(o, c)| {
                    let n = c.swap(0, Ordering::SeqCst);
                    (n > 0).then(|| UsageCount { code: o.code_name().to_string(), count: n as u64 })
                })
                .collect();
            if !counts.is_empty() {
                batch.push((id, counts));
                keys.push(key);
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        self.metrics.usage_writes.increment(1);
        let hour = self.clock.unix_seconds().div_euclid(3600);
        if let Err(failed) = self.store.add_usage(hour, &batch).await {
            // Put back what was not written, for the next flush.
            for (key, (id, counts)) in keys.iter().zip(&batch) {
                if failed.written.contains(id) {
                    continue;
                }
                for c in counts {
                    if let Some(i) = Outcome::ALL.iter().position(|o| o.code_name() == c.code) {
                        put_back(&key.counts[i], c.count);
                    }
                }
                self.register(key);
            }
            return Err(failed.error);
        }
        Ok(batch.len())
    }
}

/// Moves `from`'s counts to `to`; `from` forgets it registered first, so a
/// count it takes after the move registers it again.
fn hand_over(from: &CachedKey, to: &CachedKey) {
    from.counted_at.store(0, Ordering::SeqCst);
    for (f, t) in from.counts.iter().zip(to.counts.iter()) {
        put_back(t, f.swap(0, Ordering::SeqCst) as u64);
    }
}

/// Most verdicts of one code a key holds while flushes fail: past it, more
/// are not counted. Half the counter, so that the hot path's plain
/// increments (a few seconds' worth between flushes) cannot wrap it.
pub const MAX_HELD_COUNT: u32 = u32::MAX / 2;

/// Adds `n` to `counter` without passing [`MAX_HELD_COUNT`].
fn put_back(counter: &std::sync::atomic::AtomicU32, n: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
        let sum = (c as u64 + n).min(MAX_HELD_COUNT as u64);
        Some(sum.max(c as u64) as u32)
    });
}

/// A key's counts over the last day at unix second `now`, from the store
/// (every replica's flushed counts).
pub async fn last_day(store: &dyn KeyStore, id: KeyId, now: i64) -> Result<Vec<UsageCount>, StoreError> {
    let hour = now.div_euclid(3600);
    store.usage(id, hour - (USAGE_HOURS - 1), hour, &Outcome::usage_codes()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn copy(version: u64) -> Arc<CachedKey> {
        let key_id: KeyId = "AAAAAAAA".parse().unwrap();
        let record = crate::store::KeyRecord::for_tests(key_id, "k", version);
        Arc::new(CachedKey::new(record))
    }

    /// Counts put back by failed flushes stop at the cap instead of
    /// wrapping the 32-bit counter.
    #[test]
    fn counts_put_back_stop_at_the_cap() {
        let c = std::sync::atomic::AtomicU32::new(10);
        put_back(&c, 5);
        assert_eq!(c.load(Ordering::SeqCst), 15);
        put_back(&c, u64::from(u32::MAX) * 3);
        assert_eq!(c.load(Ordering::SeqCst), MAX_HELD_COUNT);
        put_back(&c, 1);
        assert_eq!(c.load(Ordering::SeqCst), MAX_HELD_COUNT);
        // A counter the hot path pushed past the cap is never lowered.
        let c = std::sync::atomic::AtomicU32::new(MAX_HELD_COUNT + 7);
        put_back(&c, 1);
        assert_eq!(c.load(Ordering::SeqCst), MAX_HELD_COUNT + 7);
    }

    /// Two copies of one record in use at once (a refill while calls held
    /// the old one), counting in the same second and after: nothing lost,
    /// nothing counted twice.
    #[tokio::test]
    async fn copies_of_one_record_lose_no_count() {
        let store = Arc::new(MemoryStore::new());
        let clock = Clock::manual(1_800_000_000);
        let usage = UsageBatcher::new(store.clone(), Metrics::new(), clock.clone());
        let (old, new) = (copy(1), copy(2));
        usage.count(&old, Outcome::Valid, 5);
        usage.count(&new, Outcome::Valid, 5);
        usage.count(&old, Outcome::Valid, 5);
        usage.count(&old, Outcome::RateLimited, 5);
        usage.count(&new, Outcome::Valid, 6);
        usage.count(&old, Outcome::Valid, 6);
        assert_eq!(usage.flush().await.unwrap(), 1);
        usage.count(&old, Outcome::Valid, 7);
        usage.flush().await.unwrap();
        let id = old.record.key_id;
        let got = store.usage(id, 0, i64::MAX, &Outcome::usage_codes()).await.unwrap();
        let n = |c: &str| got.iter().find(|u| u.code == c).map_or(0, |u| u.count);
        assert_eq!((n("VALID"), n("RATE_LIMITED")), (6, 1), "{got:?}");
    }
}
