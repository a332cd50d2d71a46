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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fastbloom::AtomicBloomFilter;

use crate::key::KeyId;
use crate::store::KeyStore;

/// Key_ids read from the store per page while loading.
const PAGE: usize = 1000;
/// The filter's false-positive rate at its capacity.
const FALSE_POSITIVES: f64 = 0.01;

pub struct KnownKeys {
    filter: AtomicBloomFilter,
    /// Complete and kept current: may rule key_ids out.
    ready: AtomicBool,
    /// Bumped whenever the feed is lost or has a gap: a load that began
    /// before it does not make the filter ready.
    epoch: AtomicU64,
}

impl KnownKeys {
    /// A filter sized for `capacity` key_ids (about 1.2 MB per million).
    pub fn new(capacity: usize) -> KnownKeys {
        KnownKeys {
            filter: AtomicBloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(capacity.max(1000)),
            ready: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    pub fn add(&self, id: KeyId) {
        self.filter.insert(id.as_bytes());
    }

    /// Whether `id` certainly does not exist.
    #[inline]
    pub fn rules_out(&self, id: KeyId) -> bool {
        self.ready.load(Ordering::Acquire) && !self.filter.contains(id.as_bytes())
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The feed is lost or missed events: stop ruling out until a load
    /// completes again.
    pub fn distrust(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.ready.store(false, Ordering::Release);
    }

    /// Adds every key_id the store holds; ready afterwards unless the
    /// feed was lost meanwhile. Feed events keep adding while it runs.
    pub async fn load(self: Arc<Self>, store: Arc<dyn KeyStore>) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let mut cursor = String::new();
        let mut count = 0usize;
        loop {
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
                    tracing::warn!(error = %e, "could not load the known key_ids; every unknown key reads the store");
                    return;
                }
            }
            if self.epoch.load(Ordering::Acquire) != epoch {
                return;
            }
        }
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.ready.store(true, Ordering::Release);
            tracing::info!(keys = count, "known key_ids loaded; unknown key_ids are answered without the store");
        }
    }
}
