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
    #[inline]
    pub fn count(&self, key: &Arc<CachedKey>, outcome: Outcome, now: i64) {
        key.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if outcome == Outcome::Valid {
            self.note(key, now);
        }
        if key.counted_at.load(Ordering::Relaxed) != now && key.counted_at.swap(now, Ordering::Relaxed) != now {
            self.register(key);
        }
    }

    #[cold]
    fn register(&self, key: &Arc<CachedKey>) {
        match self.counted.entry(key.record.key_id) {
            dashmap::Entry::Occupied(mut e) => {
                if !Arc::ptr_eq(e.get(), key) {
                    // The cache holds a newer copy of the record: carry the
                    // older copy's counts over so none is lost.
                    let old = e.insert(key.clone());
                    for (from, to) in old.counts.iter().zip(key.counts.iter()) {
                        to.fetch_add(from.swap(0, Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
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
            key.counted_at.store(0, Ordering::Relaxed);
            let counts: Vec<UsageCount> = Outcome::ALL
                .iter()
                .zip(key.counts.iter())
                .filter_map(|(o, c)| {
                    let n = c.swap(0, Ordering::Relaxed);
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
        if let Err(e) = self.store.add_usage(hour, &batch).await {
            // Put them back for the next flush.
            for (key, (_, counts)) in keys.iter().zip(&batch) {
                for c in counts {
                    if let Some(i) = Outcome::ALL.iter().position(|o| o.code_name() == c.code) {
                        key.counts[i].fetch_add(c.count as u32, Ordering::Relaxed);
                    }
                }
                self.register(key);
            }
            return Err(e);
        }
        Ok(batch.len())
    }
}

/// A key's counts over the last day at unix second `now`, from the store
/// (every replica's flushed counts).
pub async fn last_day(store: &dyn KeyStore, id: KeyId, now: i64) -> Result<Vec<UsageCount>, StoreError> {
    let hour = now.div_euclid(3600);
    store.usage(id, hour - (USAGE_HOURS - 1), hour, &Outcome::usage_codes()).await
}
