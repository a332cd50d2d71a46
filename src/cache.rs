//! The in-process cache of key records (README, "Storage, cache and
//! revocation").
//!
//! Positive entries are fresh for `cache_ttl`; after that they are stale:
//! re-read from the store on the next use, and kept (until the size bound
//! pushes them out) so that they can still answer while the store is down,
//! for as long as the engine's stale window allows. Negative entries
//! (no such key_id) are fresh for `negative_ttl` and never served stale.
//! Freshness is judged by the injectable [`Clock`], on read; moka only
//! bounds the number of entries (no moka time-to-live: it would cost every
//! read a second clock check and every write an extra queue).
//!
//! Every key_id maps to one of [`STRIPES`] generation counters. An
//! invalidation bumps the counter under its lock; a loader inserts only if
//! the counter is what it was before the store read began. So a lookup that
//! started before a revocation can never put the revoked record back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::key::KeyId;
use crate::store::KeyRecord;

const STRIPES: usize = 256;

/// A record as the hot path needs it. Holds no rate-limit state: buckets
/// live in [`crate::limit`], so an eviction cannot reset a quota.
pub struct CachedKey {
    pub record: KeyRecord,
    /// The tag of the tenant's shared buckets, hashed once here rather than
    /// per request; `None` without a tenant.
    pub tenant_tag: Option<crate::limit::TenantTag>,
    /// The last unix second this key verified on this sidecar.
    pub last_touch: std::sync::atomic::AtomicI64,
    /// Verdicts since the last usage flush, by outcome discriminant.
    pub counts: [std::sync::atomic::AtomicU64; OUTCOMES],
    /// The unix second the key last registered for a usage flush (0 = not
    /// registered).
    pub counted_at: std::sync::atomic::AtomicI64,
}

/// How many outcomes a key's usage counts keep apart (`verdict::Outcome`).
pub const OUTCOMES: usize = 13;

impl CachedKey {
    pub fn new(record: KeyRecord) -> CachedKey {
        let tenant_tag = (!record.tenant.is_empty()).then(|| crate::limit::tenant_tag(&record.tenant));
        CachedKey {
            record,
            tenant_tag,
            last_touch: std::sync::atomic::AtomicI64::new(0),
            counts: Default::default(),
            counted_at: std::sync::atomic::AtomicI64::new(0),
        }
    }
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey").field("record", &self.record).finish_non_exhaustive()
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    Present(Arc<CachedKey>),
    Absent,
}

#[derive(Clone)]
struct Entry {
    lookup: Lookup,
    loaded_at: u64,
}

/// Freshness of a cached entry.
pub enum Cached {
    Fresh(Lookup),
    /// Past its TTL: use only if the store fails (within the stale window).
    Stale(Arc<CachedKey>),
    Missing,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_window: Duration,
    pub max_entries: u64,
    /// How long cached entries stay trusted after the change feed is lost:
    /// past it, lookups read through to the store until the feed is back.
    pub feed_grace: Duration,
    /// Key_ids the known-key filter is sized for (README, forged keys);
    /// 0 = no filter, every unknown key_id reads the store.
    pub known_keys: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_window: Duration::from_secs(60),
            max_entries: 1_000_000,
            feed_grace: Duration::from_secs(2),
            known_keys: 1_000_000,
        }
    }
}

pub struct KeyCache {
    entries: moka::sync::Cache<KeyId, Entry>,
    generations: Box<[Mutex<u64>]>,
    /// Bumped by `invalidate_all`, read together with the stripe.
    epoch: AtomicU64,
    settings: CacheSettings,
    ttl_nanos: u64,
    negative_nanos: u64,
    clock: Clock,
}

/// A loader's ticket: the generation seen before the store read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64, u64);

impl KeyCache {
    /// `evictions` counts entries pushed out by the size bound.
    pub fn new(settings: CacheSettings, clock: Clock, evictions: metrics::Counter) -> KeyCache {
        KeyCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(settings.max_entries)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.increment(1);
                    }
                })
                .build(),
            generations: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            epoch: AtomicU64::new(0),
            ttl_nanos: settings.ttl.as_nanos() as u64,
            negative_nanos: settings.negative_ttl.as_nanos() as u64,
            settings,
            clock,
        }
    }

    pub fn settings(&self) -> CacheSettings {
        self.settings
    }

    fn stripe(&self, id: KeyId) -> &Mutex<u64> {
        // key_ids are uniformly random: a few of their bytes are a good hash.
        let b = id.as_bytes();
        let h = (b[0] as usize) ^ ((b[3] as usize) << 1) ^ ((b[7] as usize) << 2);
        &self.generations[h % STRIPES]
    }

    #[inline]
    pub fn get(&self, id: KeyId) -> Cached {
        let Some(entry) = self.entries.get(&id) else { return Cached::Missing };
        let age = self.clock.mono_nanos().saturating_sub(entry.loaded_at);
        match entry.lookup {
            Lookup::Present(key) if age < self.ttl_nanos => Cached::Fresh(Lookup::Present(key)),
            Lookup::Present(key) => Cached::Stale(key),
            Lookup::Absent if age < self.negative_nanos => Cached::Fresh(Lookup::Absent),
            _ => Cached::Missing,
        }
    }

    /// Call before reading the store for `id`.
    pub fn generation(&self, id: KeyId) -> Generation {
        let stripe = *self.stripe(id).lock().unwrap_or_else(|e| e.into_inner());
        Generation(stripe, self.epoch.load(Ordering::SeqCst))
    }

    /// Inserts what the store said, unless `id` was invalidated since
    /// `seen` was taken. Returns whether it was inserted.
    pub fn insert_if_current(&self, id: KeyId, seen: Generation, lookup: Lookup) -> bool {
        let stripe = self.stripe(id).lock().unwrap_or_else(|e| e.into_inner());
        if Generation(*stripe, self.epoch.load(Ordering::SeqCst)) != seen {
            return false;
        }
        if matches!(lookup, Lookup::Absent) && self.negative_nanos == 0 {
            return false;
        }
        self.entries.insert(id, Entry { lookup, loaded_at: self.clock.mono_nanos() });
        true
    }

    /// Drops `id` (positive or negative) and fences off loads in flight.
    pub fn invalidate(&self, id: KeyId) {
        let mut stripe = self.stripe(id).lock().unwrap_or_else(|e| e.into_inner());
        *stripe += 1;
        self.entries.invalidate(&id);
    }

    /// Drops everything and fences off every load in flight. Holds every
    /// stripe while it does, so that no insert can check the old epoch and
    /// land after the drop.
    pub fn invalidate_all(&self) {
        let guards: Vec<_> = self.generations.iter().map(|g| g.lock().unwrap_or_else(|e| e.into_inner())).collect();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
        drop(guards);
    }

    /// Entries held (approximate; for metrics and tests).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(clock: &Clock) -> KeyCache {
        KeyCache::new(
            CacheSettings {
                ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(5),
                stale_window: Duration::from_secs(30),
                max_entries: 100,
                feed_grace: Duration::from_secs(2),
                known_keys: 0,
            },
            clock.clone(),
            metrics::Counter::noop(),
        )
    }

    fn id() -> KeyId {
        "abcdEFGH".parse().unwrap()
    }

    #[test]
    fn negative_entries_expire_and_are_never_stale() {
        let clock = Clock::manual(0);
        let c = cache(&clock);
        assert!(c.insert_if_current(id(), c.generation(id()), Lookup::Absent));
        assert!(matches!(c.get(id()), Cached::Fresh(Lookup::Absent)));
        clock.advance(Duration::from_secs(5));
        assert!(matches!(c.get(id()), Cached::Missing));
    }

    #[test]
    fn an_invalidation_during_a_load_wins() {
        let clock = Clock::manual(0);
        let c = cache(&clock);
        let seen = c.generation(id());
        c.invalidate(id());
        assert!(!c.insert_if_current(id(), seen, Lookup::Absent), "the load began before the invalidation");
        let seen = c.generation(id());
        c.invalidate_all();
        assert!(!c.insert_if_current(id(), seen, Lookup::Absent));
        assert!(matches!(c.get(id()), Cached::Missing));
        assert!(c.insert_if_current(id(), c.generation(id()), Lookup::Absent));
    }
}
