//! Which key_ids exist (README, "Storage, cache and revocation", forged
//! keys): a Bloom filter of every key_id the store holds, loaded from the
//! store's index and kept current by the change feed, so that a
//! well-formed key with a key_id nobody created (the checksum is public,
//! anyone can make one) is answered NOT_FOUND with no store read and no
//! cache entry.
//!
//! It is trusted only while it is complete: after a load that ran wholly
//! while the feed was live. A lost feed, a gap in it (InvalidateAll) or a
//! failed load stops it ruling anything out until the next complete load;
//! meanwhile every miss reads the store, as without it. A key created
//! anywhere is announced on the feed and added before any replica can be
//! asked for it through the filter, and a key created here is added when
//! the admin API drops it from the cache. Nothing is ever removed (a
//! deleted key's bits stay, costing one store read when it is tried), so
//! its false positives grow with churn beyond the capacity; a restart
//! starts afresh.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fastbloom::AtomicBloomFilter;

use crate::key::KeyId;
use crate::store::KeyStore;

/// Key_ids read from the store per page while loading.
const PAGE: usize = 1000;
/// The filter's false-positive rate at its capacity.
const FALSE_POSITIVES: f64 = 0.01;

pub struct KnownKeys {
    filter: AtomicBloomFilter,
    /// `epoch << 1 | ready`. Ready: complete and kept current, may rule
    /// key_ids out. The epoch moves whenever the feed is lost or has a
    /// gap, so a load that began before never makes the filter ready: one
    /// word, so that "still the same epoch" and "ready" are set together.
    state: AtomicU64,
}

impl KnownKeys {
    /// A filter sized for `capacity` key_ids (about 1.2 MB per million).
    pub fn new(capacity: usize) -> KnownKeys {
        KnownKeys {
            filter: AtomicBloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity.max(1000)),
            state: AtomicU64::new(0),
        }
    }

    pub fn add(&self, id: KeyId) {
        self.filter.insert(id.as_bytes());
    }

    /// Whether `id` certainly does not exist.
    #[inline]
    pub fn rules_out(&self, id: KeyId) -> bool {
        self.is_ready() && !self.filter.contains(id.as_bytes())
    }

    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) & 1 == 1
    }

    /// The feed is lost or missed events: stop ruling out until a load
    /// that starts after this completes. Returns the new epoch, for that
    /// load.
    pub fn distrust(&self) -> u64 {
        let prev = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some((s + 2) & !1));
        (prev.unwrap_or(0) + 2) & !1
    }

    /// Adds every key_id the store holds, then becomes ready if the epoch
    /// is still `epoch` (from [`KnownKeys::distrust`]). Feed events keep
    /// adding while it runs. A failed page is tried again (backing off up
    /// to 10 s) for as long as the epoch holds.
    pub async fn load(self: Arc<Self>, store: Arc<dyn KeyStore>, epoch: u64) {
        let mut cursor = String::new();
        let mut count = 0usize;
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.state.load(Ordering::Acquire) != epoch {
                return;
            }
            match store.key_ids(&cursor, PAGE).await {
                Ok((ids, next)) => {
                    for id in &ids {
                        self.add(*id);
                    }
                    count += ids.len();
                    match next {
                        Some(n) => cursor = n,
                        None => break,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "could not load the known key_ids; every unknown key reads the store meanwhile");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        if self.state.compare_exchange(epoch, epoch | 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            tracing::info!(keys = count, "known key_ids loaded; unknown key_ids are answered without the store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// A load that began before the feed was lost never makes the filter
    /// ready, however it interleaves.
    #[tokio::test]
    async fn a_load_from_an_older_epoch_never_makes_it_ready() {
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let known = Arc::new(KnownKeys::new(1000));
        let old = known.distrust();
        let newer = known.distrust();
        known.clone().load(store.clone(), old).await;
        assert!(!known.is_ready(), "a stale load");
        known.clone().load(store.clone(), newer).await;
        assert!(known.is_ready());
        known.distrust();
        assert!(!known.is_ready());
        let id: KeyId = "AAAAAAAA".parse().unwrap();
        assert!(!known.rules_out(id), "not ready: nothing ruled out");
    }
}
