//! Last-used timestamps: noted on the hot path at most once a second per key
//! (a read of the key's own atomic first, so a hot key's cache line is not
//! written on every call), written to the store in one batch per flush
//! (README, "Admin API and CLI": `last_used_at` is approximate).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;

use crate::cache::CachedKey;
use crate::key::KeyId;
use crate::metrics::Metrics;
use crate::store::{KeyStore, StoreError};

pub struct UsageBatcher {
    /// key_id → last second it verified, waiting to be written.
    pending: DashMap<KeyId, i64>,
    store: Arc<dyn KeyStore>,
    metrics: Metrics,
}

impl UsageBatcher {
    pub fn new(store: Arc<dyn KeyStore>, metrics: Metrics) -> UsageBatcher {
        UsageBatcher { pending: DashMap::new(), store, metrics }
    }

    /// Remembers that `key` verified at unix second `now`.
    #[inline]
    pub fn note(&self, key: &CachedKey, now: i64) {
        if key.last_touch.load(Ordering::Relaxed) != now && key.last_touch.swap(now, Ordering::Relaxed) != now {
            self.pending.insert(key.record.key_id, now);
        }
    }

    /// Takes the pending timestamps and writes them in one batch. What fails
    /// to be written is kept for the next flush.
    pub async fn flush(&self) -> Result<usize, StoreError> {
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
}
