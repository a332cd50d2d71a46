//! The in-process cache of key records (README, "Storage, cache and
//! revocation").
//!
//! Positive entries are fresh for `cache_ttl`; after that they are stale:
//! re-read from the store on the next use, and kept (until the size bound
//! pushes them out) so that they can still answer while the store is down,
//! for as long as the engine's stale window allows. Negative entries
//! (no such key_id) are fresh for `negative_ttl` and never served stale.
//! Freshness is judged by the injectable [`Clock`], on read.
//!
//! Memory is bounded in bytes (README, "Memory budget"): positive entries
//! live in a moka cache weighed by what each record holds, negative ones
//! in a map of their own with an eighth of the budget, purged of expired
//! entries every second ([`KeyCache::purge_expired`]), so neither kind can
//! crowd the other out and a forged-key flood cannot keep memory past its
//! TTL. `max_entries` stays a second bound: no entry weighs less than its
//! share of the budget at that count.
//!
//! Every key_id maps to one of [`STRIPES`] generation counters. An
//! invalidation bumps the counter under its lock; a loader inserts only if
//! the counter is what it was before the store read began. So a lookup that
//! started before a revocation can never put the revoked record back.
//!
//! In front of moka, each thread keeps its last few fresh hits
//! ([`FRONT_SLOTS`]), each with the cache's change count when it was read
//! from moka. Every change to the positive entries (an insert, an
//! invalidation) bumps that count after it is made, so a kept hit is
//! answered only while moka would answer the same; a hot key is then
//! found without moka's hashing, epoch pin and read log (README,
//! "Performance").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::key::KeyId;
use crate::store::KeyRecord;

const STRIPES: usize = 256;

/// Fresh hits each thread keeps in front of moka, by key_id.
pub const FRONT_SLOTS: usize = 16;

/// A fresh hit kept by a thread: which cache, which key, and the cache's
/// change count when it was read.
struct FrontSlot {
    cache: u64,
    id: KeyId,
    entry: Entry,
    changes: u64,
}

thread_local! {
    static FRONT: std::cell::RefCell<[Option<FrontSlot>; FRONT_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; FRONT_SLOTS]) };
}

/// Tells the caches of one process apart in the threads' fronts.
static CACHES: AtomicU64 = AtomicU64::new(1);

/// A record as the hot path needs it. Holds no rate-limit state: buckets
/// live in [`crate::limit`], so an eviction cannot reset a quota.
pub struct CachedKey {
    pub record: KeyRecord,
    /// The tag of the tenant's shared buckets, hashed once here rather than
    /// per request; `None` without a tenant.
    pub tenant_tag: Option<crate::limit::TenantTag>,
    /// The last unix second this key verified on this sidecar.
    pub last_touch: std::sync::atomic::AtomicI64,
    /// Verdicts since the last usage flush, by outcome discriminant. 32
    /// bits each (README, "Memory budget"): a flush takes them every few
    /// seconds, and what a failed flush puts back stops at
    /// [`crate::engine::usage::MAX_HELD_COUNT`].
    pub counts: [std::sync::atomic::AtomicU32; OUTCOMES],
    /// The unix second the key last registered for a usage flush (0 = not
    /// registered).
    pub counted_at: std::sync::atomic::AtomicI64,
    /// Answer bytes a front end derives from this record alone, encoded on
    /// the key's first answer and copied into every later one (the
    /// ext_authz allow's identity headers and access-log metadata;
    /// BENCHMARKS.md, "A Check's answer encoded once per key"). A changed
    /// key is a new entry, so they cannot go stale; they are weighed with
    /// the key when a front end that fills them is on
    /// ([`CacheSettings::encoded_answers`]).
    pub encoded: std::sync::OnceLock<EncodedParts>,
    /// For a key with tiers: its scopes merged with its tiers' (README,
    /// "Tiers"), kept with the policies they were merged from; `None` for
    /// a key without tiers, which has nothing to merge.
    /// A read lock on a hit: calls of one hot key on several cores read
    /// it together and wait only for a new merge being stored.
    tier_scopes: Option<Box<std::sync::RwLock<Option<TierScopes>>>>,
}

/// A key's scopes merged with its tiers', and the numbers of the policy
/// views (the tenant's, the deployment's) they were merged from. A view is
/// never changed, only replaced by a new one with a new number, so a merge
/// is current while both numbers are those of the views at hand.
struct TierScopes {
    from: [u64; 2],
    scopes: Arc<[String]>,
}

/// The most a key's merged tier scopes are kept for (their strings,
/// rounded as [`KeyRecord::heap_bytes`] rounds, and the list): a larger
/// merge is made again on each call instead, so that what a key with tiers
/// may hold is known when it is weighed.
pub const TIER_SCOPES_KEPT_BYTES: usize = 512;

/// The boxed slot of a key with tiers, rounded to the allocator's class.
const TIER_SCOPES_SLOT_BYTES: usize = std::mem::size_of::<std::sync::RwLock<Option<TierScopes>>>().next_multiple_of(16);

fn tier_scopes_bytes(scopes: &[String]) -> usize {
    16 + std::mem::size_of_val(scopes).next_multiple_of(16)
        + scopes.iter().map(|s| s.len().next_multiple_of(16)).sum::<usize>()
}

/// Bytes encoded once for a cached key, in two parts that an answer
/// writes at two places.
pub struct EncodedParts {
    bytes: Box<[u8]>,
    split: usize,
}

impl EncodedParts {
    /// The two parts, written one after the other, kept in an allocation
    /// of their size (a shrunk vector may keep its larger block).
    pub fn new(both: &[u8], split: usize) -> EncodedParts {
        assert!(split <= both.len(), "the split lies inside the bytes");
        EncodedParts { bytes: Box::from(both), split }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn parts(&self) -> (&[u8], &[u8]) {
        self.bytes.split_at(self.split)
    }
}

/// What [`CachedKey::encoded`] holds beyond the identity strings it
/// repeats, at most: the identity header names and the three access-log
/// field names (`key_id`, `tenant`, `env`: 15 bytes), with their keys and
/// lengths (up to 13 bytes a header and 11 a field when a value is longer
/// than 127 bytes), and the metadata message's own key and length.
pub const ENCODED_PARTS_BYTES: usize = {
    let names = &crate::proxy::IDENTITY_HEADERS;
    let (mut i, mut bytes) = (0, 0);
    while i < names.len() {
        bytes += names[i].len() + 13;
        i += 1;
    }
    bytes + 15 + 3 * 11 + 3
};

/// The most [`CachedKey::encoded`] can hold for `r`: the identity strings
/// (key_id, tenant and env twice, as headers and as access-log fields;
/// the scopes joined by commas; the kind) and [`ENCODED_PARTS_BYTES`].
pub fn encoded_parts_bound(r: &KeyRecord) -> usize {
    2 * (r.key_id.as_str().len() + r.tenant.len() + r.env.as_str().len())
        + r.scopes.iter().map(|s| s.len() + 1).sum::<usize>()
        + r.kind.as_str().len()
        + ENCODED_PARTS_BYTES
}

/// How many outcomes a key's usage counts keep apart (`verdict::Outcome`).
pub const OUTCOMES: usize = 13;

impl CachedKey {
    pub fn new(record: KeyRecord) -> CachedKey {
        let tenant_tag = (!record.tenant.is_empty()).then(|| crate::limit::tenant_tag(&record.tenant));
        let tiered = !record.tiers.is_empty();
        CachedKey {
            record,
            tenant_tag,
            last_touch: std::sync::atomic::AtomicI64::new(0),
            counts: Default::default(),
            counted_at: std::sync::atomic::AtomicI64::new(0),
            encoded: std::sync::OnceLock::new(),
            tier_scopes: tiered.then(Default::default),
        }
    }

    /// The key's scopes merged with its tiers' from the policy views
    /// numbered `from`: the merge kept for those same views, else `merge()`
    /// (kept when it is at most [`TIER_SCOPES_KEPT_BYTES`]). A cached key
    /// with tiers so merges once per policy it is checked against, not on
    /// every call (BENCHMARKS.md, "Verify's request read in place, one
    /// codegen unit").
    pub fn tier_scopes(&self, from: [u64; 2], merge: impl FnOnce() -> Vec<String>) -> Arc<[String]> {
        let Some(slot) = &self.tier_scopes else { return merge().into() };
        if let Some(kept) =
            slot.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().filter(|k| k.from == from)
        {
            return kept.scopes.clone();
        }
        let scopes: Arc<[String]> = merge().into();
        if tier_scopes_bytes(&scopes) <= TIER_SCOPES_KEPT_BYTES {
            *slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(TierScopes { from, scopes: scopes.clone() });
        }
        scopes
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
    key: Arc<CachedKey>,
    loaded_at: u64,
}

/// What a cached key costs beyond its record's own bytes: the moka entry,
/// its node in the eviction order and the allocator's rounding (measured
/// with `cargo bench --bench footprint`, README "Memory budget").
pub const ENTRY_OVERHEAD_BYTES: usize = 500;
/// What a negative entry costs: the key_id, its load time and the map's
/// slack.
pub const NEGATIVE_ENTRY_BYTES: u64 = 48;
/// The part of the byte budget negative entries may use: one eighth.
const NEGATIVE_SHARE: u64 = 8;

impl CachedKey {
    /// Bytes this key is counted for in the cache's budget; with
    /// `encoded_answers`, what [`CachedKey::encoded`] may come to hold too,
    /// with the allocator's rounding (size classes a quarter apart).
    pub fn weight(&self, encoded_answers: bool) -> usize {
        let encoded = if encoded_answers { encoded_parts_bound(&self.record) * 5 / 4 + 16 } else { 0 };
        let tier_scopes = match self.tier_scopes {
            Some(_) => TIER_SCOPES_SLOT_BYTES + TIER_SCOPES_KEPT_BYTES,
            None => 0,
        };
        std::mem::size_of::<CachedKey>() + self.record.heap_bytes() + encoded + tier_scopes + ENTRY_OVERHEAD_BYTES
    }
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
    /// Bytes the cache may hold, positive and negative entries together
    /// (README, "Memory budget").
    pub max_bytes: u64,
    /// How long cached entries stay trusted after the change feed is lost:
    /// past it, lookups read through to the store until the feed is back.
    pub feed_grace: Duration,
    /// Key_ids the known-key filter is sized for (README, forged keys);
    /// 0 = no filter, every unknown key_id reads the store.
    pub known_keys: usize,
    /// Whether a front end encodes answer parts once per cached key
    /// (`--ext-authz`): each key is then weighed with them. A program that
    /// writes ext_authz answers itself should set it too.
    pub encoded_answers: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            stale_window: Duration::from_secs(60),
            max_entries: 1_000_000,
            max_bytes: DEFAULT_MAX_BYTES,
            feed_grace: Duration::from_secs(2),
            known_keys: 1_000_000,
            encoded_answers: false,
        }
    }
}

/// The default byte budget: 32 MiB, which with the process's own ~15 MiB
/// fits the 64 MiB memory request of `deploy/` (README, "Memory budget").
pub const DEFAULT_MAX_BYTES: u64 = 32 << 20;

/// Positive entries are only keys the store holds (a forged key_id never
/// gets one), so a fast seeded hasher is safe for them and keeps the hit
/// cheap; absences, whose key_ids a caller chooses, keep the default.
type EntryHasher = foldhash::fast::RandomState;

pub struct KeyCache {
    entries: moka::sync::Cache<KeyId, Entry, EntryHasher>,
    /// key_id → when it was found absent (monotonic nanos).
    negative: dashmap::DashMap<KeyId, u64>,
    /// Entries in `negative`, kept beside it: a map's own count locks
    /// every shard.
    negative_len: AtomicUsize,
    /// Most negative entries held: past it, absences are not cached.
    max_negative: usize,
    generations: Box<[Mutex<u64>]>,
    /// Bumped by `invalidate_all`, read together with the stripe.
    epoch: AtomicU64,
    /// This cache, in the threads' fronts.
    instance: u64,
    /// Changes made to `entries` (inserts, invalidations), counted after
    /// each is made: a front's hit is good while this is unchanged.
    changes: AtomicU64,
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
        let negative_bytes = settings.max_bytes / NEGATIVE_SHARE;
        let positive_bytes = settings.max_bytes - negative_bytes;
        // The entry bound, as a least weight: `max_entries` entries fill
        // the byte budget even when each is smaller than that.
        let encoded_answers = settings.encoded_answers;
        let least_weight = positive_bytes.div_ceil(settings.max_entries.max(1)).min(u32::MAX as u64) as u32;
        let max_negative = (negative_bytes / NEGATIVE_ENTRY_BYTES).min(settings.max_entries / NEGATIVE_SHARE);
        KeyCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(positive_bytes)
                .weigher(move |_, entry: &Entry| {
                    (entry.key.weight(encoded_answers).min(u32::MAX as usize) as u32).max(least_weight)
                })
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evictions.increment(1);
                    }
                })
                .build_with_hasher(EntryHasher::default()),
            negative: dashmap::DashMap::new(),
            negative_len: AtomicUsize::new(0),
            max_negative: max_negative as usize,
            generations: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            epoch: AtomicU64::new(0),
            instance: CACHES.fetch_add(1, Ordering::Relaxed),
            changes: AtomicU64::new(0),
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

    /// What the cache holds for `id` at monotonic `now` (the caller's one
    /// clock read).
    #[inline]
    pub fn get(&self, id: KeyId, now: u64) -> Cached {
        // Read before moka: a change made after this read bumps the count
        // past it, so what is kept with it goes at the next change.
        let changes = self.changes.load(Ordering::Acquire);
        let slot = front_slot(id);
        let kept = FRONT.with_borrow(|front| match &front[slot] {
            Some(f) if f.cache == self.instance && f.id == id && f.changes == changes => Some(f.entry.clone()),
            _ => None,
        });
        // Only a fresh hit is answered from the front: past its TTL, what
        // moka holds decides (a key moka evicted is then missing, never
        // served stale from a thread's front during an outage).
        if let Some(entry) = kept
            && now.saturating_sub(entry.loaded_at) < self.ttl_nanos
        {
            return Cached::Fresh(Lookup::Present(entry.key));
        }
        let Some(entry) = self.entries.get(&id) else {
            return self.get_negative(id, now);
        };
        if now.saturating_sub(entry.loaded_at) >= self.ttl_nanos {
            return Cached::Stale(entry.key);
        }
        let key = entry.key.clone();
        FRONT.with_borrow_mut(|front| front[slot] = Some(FrontSlot { cache: self.instance, id, entry, changes }));
        Cached::Fresh(Lookup::Present(key))
    }

    #[cold]
    fn get_negative(&self, id: KeyId, now: u64) -> Cached {
        match self.negative.get(&id) {
            Some(at) if now.saturating_sub(*at) < self.negative_nanos => Cached::Fresh(Lookup::Absent),
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
        let now = self.clock.mono_nanos();
        match lookup {
            Lookup::Present(key) => {
                self.remove_negative(id);
                self.entries.insert(id, Entry { key, loaded_at: now });
                self.changes.fetch_add(1, Ordering::Release);
                true
            }
            // A key that is gone must not stay behind as a stale entry.
            Lookup::Absent => {
                self.entries.invalidate(&id);
                self.changes.fetch_add(1, Ordering::Release);
                if self.negative_nanos == 0 {
                    return false;
                }
                // A place is taken before the insert, so concurrent loads
                // cannot overshoot the cap.
                if let Some(mut at) = self.negative.get_mut(&id) {
                    *at = now;
                    return true;
                }
                if self.negative_len.fetch_add(1, Ordering::Relaxed) >= self.max_negative {
                    self.negative_len.fetch_sub(1, Ordering::Relaxed);
                    return false;
                }
                if self.negative.insert(id, now).is_some() {
                    self.negative_len.fetch_sub(1, Ordering::Relaxed);
                }
                true
            }
        }
    }

    fn remove_negative(&self, id: KeyId) {
        if self.negative.remove(&id).is_some() {
            self.negative_len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops negative entries past their TTL, so that their memory goes
    /// when they expire, not when something else pushes them out. Run
    /// every second by the server.
    pub fn purge_expired(&self) {
        let now = self.clock.mono_nanos();
        let mut removed = 0;
        self.negative.retain(|_, at| {
            let keep = now.saturating_sub(*at) < self.negative_nanos;
            removed += usize::from(!keep);
            keep
        });
        let before = self.negative_len.fetch_sub(removed, Ordering::Relaxed);
        if removed > 0 && removed >= before / 2 {
            self.negative.shrink_to_fit();
        }
    }

    /// Bytes the cache counts itself as holding (positive weights and
    /// negative entries).
    pub fn weighed_bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size() + self.negative_len.load(Ordering::Relaxed) as u64 * NEGATIVE_ENTRY_BYTES
    }

    /// Drops `id` (positive or negative) and fences off loads in flight.
    pub fn invalidate(&self, id: KeyId) {
        let mut stripe = self.stripe(id).lock().unwrap_or_else(|e| e.into_inner());
        *stripe += 1;
        self.entries.invalidate(&id);
        self.changes.fetch_add(1, Ordering::Release);
        self.remove_negative(id);
    }

    /// Drops everything and fences off every load in flight. Holds every
    /// stripe while it does, so that no insert can check the old epoch and
    /// land after the drop.
    pub fn invalidate_all(&self) {
        let guards: Vec<_> = self.generations.iter().map(|g| g.lock().unwrap_or_else(|e| e.into_inner())).collect();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
        self.changes.fetch_add(1, Ordering::Release);
        let mut removed = 0;
        self.negative.retain(|_, _| {
            removed += 1;
            false
        });
        self.negative_len.fetch_sub(removed, Ordering::Relaxed);
        self.negative.shrink_to_fit();
        drop(guards);
    }

    /// Entries held (approximate; for metrics and tests).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count() + self.negative_len.load(Ordering::Relaxed) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key_id's slot in a thread's front: key_ids are uniformly random, so
/// a few of their bits are a good hash.
#[inline]
fn front_slot(id: KeyId) -> usize {
    let b = id.as_bytes();
    usize::from(b[1] ^ b[6].rotate_left(3)) % FRONT_SLOTS
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
                max_bytes: 1 << 20,
                feed_grace: Duration::from_secs(2),
                known_keys: 0,
                encoded_answers: false,
            },
            clock.clone(),
            metrics::Counter::noop(),
        )
    }

    fn id() -> KeyId {
        "abcdEFGH".parse().unwrap()
    }

    fn nth_id(n: u32) -> KeyId {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut bytes = [b'0'; 8];
        let mut n = n as u64;
        for b in bytes.iter_mut().rev() {
            *b = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        std::str::from_utf8(&bytes).unwrap().parse().unwrap()
    }

    fn key(id: KeyId, name_len: usize) -> Lookup {
        let record = KeyRecord::for_tests(id, &"n".repeat(name_len), 1);
        Lookup::Present(Arc::new(CachedKey::new(record)))
    }

    fn sized(clock: &Clock, max_bytes: u64, max_entries: u64) -> KeyCache {
        let settings = CacheSettings { max_bytes, max_entries, known_keys: 0, ..CacheSettings::default() };
        KeyCache::new(settings, clock.clone(), metrics::Counter::noop())
    }

    /// README, "Tiers": a key's scopes merged with its tiers' are merged
    /// once per pair of policy views and kept within what the key is
    /// weighed for; a key without tiers keeps nothing (its slot is an empty
    /// pointer).
    #[test]
    fn a_keys_tier_scopes_are_merged_once_per_policy_and_kept_within_its_weight() {
        let mut record = KeyRecord::for_tests(id(), "n", 1);
        let plain = CachedKey::new(record.clone());
        record.tiers = vec!["pro".into()];
        let tiered = CachedKey::new(record);
        let record_grew = tiered.record.heap_bytes() - plain.record.heap_bytes();
        assert_eq!(
            tiered.weight(false) - plain.weight(false) - record_grew,
            TIER_SCOPES_SLOT_BYTES + TIER_SCOPES_KEPT_BYTES
        );

        let merges = std::cell::Cell::new(0);
        let merge = |scopes: Vec<String>| {
            merges.set(merges.get() + 1);
            scopes
        };
        let two = || vec!["read".to_string(), "export:data".to_string()];
        let first = tiered.tier_scopes([3, 4], || merge(two()));
        let again = tiered.tier_scopes([3, 4], || merge(two()));
        assert_eq!((merges.get(), &*again), (1, &two()[..]));
        assert!(Arc::ptr_eq(&first, &again), "the kept merge is shared, not copied");
        // A new view of either policy (a tier changed): merged again.
        let changed = tiered.tier_scopes([5, 4], || merge(vec!["read".into()]));
        assert_eq!((merges.get(), &*changed), (2, &["read".to_string()][..]));
        tiered.tier_scopes([5, 6], || merge(two()));
        assert_eq!(merges.get(), 3);
        // Too large to keep: merged on every call, nothing held beyond the weight.
        let large = || vec!["s".repeat(100); 8];
        assert!(tier_scopes_bytes(&large()) > TIER_SCOPES_KEPT_BYTES);
        tiered.tier_scopes([7, 8], || merge(large()));
        tiered.tier_scopes([7, 8], || merge(large()));
        assert_eq!(merges.get(), 5);
        // Without tiers: merged each time, nothing kept.
        plain.tier_scopes([1, 1], || merge(two()));
        plain.tier_scopes([1, 1], || merge(two()));
        assert_eq!(merges.get(), 7);
        assert!(tier_scopes_bytes(&two()) <= TIER_SCOPES_KEPT_BYTES);
    }

    /// README, "Memory budget": the cache holds what its byte budget
    /// allows, weighed by what each record holds, and the entry count
    /// stays a second bound.
    #[test]
    fn the_cache_is_bounded_in_bytes_and_in_entries() {
        let clock = Clock::manual(0);
        let c = sized(&clock, 1 << 20, 1_000_000);
        for n in 0..5_000 {
            c.insert_if_current(nth_id(n), c.generation(nth_id(n)), key(nth_id(n), 10));
        }
        let held = c.weighed_bytes();
        assert!(held <= (1 << 20) * 7 / 8, "{held} bytes held over the positive share");
        let small = c.len();
        assert!(small > 100 && small < 5_000, "{small} small keys");
        // Keys ten times larger: about a tenth as many fit.
        let c = sized(&clock, 1 << 20, 1_000_000);
        for n in 0..5_000 {
            c.insert_if_current(nth_id(n), c.generation(nth_id(n)), key(nth_id(n), 12_000));
        }
        assert!(c.weighed_bytes() <= (1 << 20) * 7 / 8);
        assert!(c.len() * 5 < small, "{} large keys vs {small} small", c.len());
        // The entry bound, whatever the bytes allow.
        let c = sized(&clock, 1 << 30, 100);
        for n in 0..1_000 {
            c.insert_if_current(nth_id(n), c.generation(nth_id(n)), key(nth_id(n), 10));
        }
        assert!(c.len() <= 100 + 100 / 8, "{} entries", c.len());
    }

    /// Negative entries have a share of their own: a flood of absences
    /// neither evicts cached keys nor outgrows its share, and expired ones
    /// leave memory at the next purge.
    #[test]
    fn negative_entries_cannot_crowd_out_keys_and_leave_memory_when_they_expire() {
        let clock = Clock::manual(0);
        let c = sized(&clock, 1 << 20, 1_000_000);
        for n in 0..200 {
            c.insert_if_current(nth_id(n), c.generation(nth_id(n)), key(nth_id(n), 10));
        }
        for n in 1_000..200_000 {
            c.insert_if_current(nth_id(n), c.generation(nth_id(n)), Lookup::Absent);
        }
        for n in 0..200 {
            assert!(
                matches!(c.get(nth_id(n), clock.mono_nanos()), Cached::Fresh(Lookup::Present(_))),
                "key {n} was pushed out"
            );
        }
        let negatives = c.len() - 200;
        assert_eq!(negatives, (1 << 20) / 8 / NEGATIVE_ENTRY_BYTES, "negatives fill their share and no more");
        clock.advance(Duration::from_secs(4));
        c.purge_expired();
        assert_eq!(c.len() - 200, negatives, "not yet expired");
        clock.advance(Duration::from_secs(1));
        c.purge_expired();
        assert_eq!(c.len(), 200, "expired negatives are gone");
        assert!(c.weighed_bytes() < (1 << 20) * 7 / 8);
    }

    /// A key found gone does not linger as a stale entry behind its
    /// absence, and a key found again replaces its absence.
    #[test]
    fn presence_and_absence_replace_each_other() {
        let clock = Clock::manual(0);
        let c = cache(&clock);
        c.insert_if_current(id(), c.generation(id()), key(id(), 1));
        clock.advance(Duration::from_secs(61));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Stale(_)));
        c.insert_if_current(id(), c.generation(id()), Lookup::Absent);
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Fresh(Lookup::Absent)));
        c.insert_if_current(id(), c.generation(id()), key(id(), 1));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Fresh(Lookup::Present(_))));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn negative_entries_expire_and_are_never_stale() {
        let clock = Clock::manual(0);
        let c = cache(&clock);
        assert!(c.insert_if_current(id(), c.generation(id()), Lookup::Absent));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Fresh(Lookup::Absent)));
        clock.advance(Duration::from_secs(5));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing));
    }

    /// A thread's front answers only what moka would (README, "Storage,
    /// cache and revocation"): a kept hit goes with a new record for its
    /// key, an invalidation, an `invalidate_all` and its TTL; on another
    /// thread too; and when moka no longer held the key (its size bound
    /// pushed it out) before the invalidation came.
    #[test]
    fn a_threads_kept_hit_goes_with_every_change() {
        let clock = Clock::manual(0);
        let c = cache(&clock);
        let present = |c: &KeyCache| match c.get(id(), clock.mono_nanos()) {
            Cached::Fresh(Lookup::Present(k)) => Some(k),
            _ => None,
        };
        let put = |c: &KeyCache, name_len| assert!(c.insert_if_current(id(), c.generation(id()), key(id(), name_len)));
        put(&c, 1);
        let first = present(&c).unwrap();
        assert!(Arc::ptr_eq(&present(&c).unwrap(), &first), "the same record, kept");
        put(&c, 2);
        let second = present(&c).unwrap();
        assert_eq!(second.record.name.len(), 2, "a new record for the key replaces the kept one");
        c.invalidate(id());
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing), "invalidated");
        put(&c, 2);
        assert!(present(&c).is_some());
        assert!(c.insert_if_current(id(), c.generation(id()), Lookup::Absent));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Fresh(Lookup::Absent)), "found gone");

        put(&c, 3);
        assert!(present(&c).is_some());
        c.invalidate_all();
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing), "all invalidated");

        put(&c, 4);
        assert!(present(&c).is_some());
        clock.advance(Duration::from_secs(61));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Stale(_)), "past its TTL");

        // Dropped by moka as an eviction drops it (no change counted): the
        // front still answers, until the key's invalidation.
        put(&c, 5);
        assert!(present(&c).is_some());
        c.entries.invalidate(&id());
        assert!(present(&c).is_some(), "kept past moka's eviction");
        c.invalidate(id());
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing), "evicted, then revoked");
        // Evicted, then past its TTL: missing, as moka says, not stale.
        put(&c, 5);
        assert!(present(&c).is_some());
        c.entries.invalidate(&id());
        clock.advance(Duration::from_secs(61));
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing), "never stale from the front");

        // Another thread's kept hit.
        put(&c, 6);
        let turn = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            let other = s.spawn(|| {
                let kept = present(&c).is_some();
                turn.wait();
                turn.wait();
                (kept, matches!(c.get(id(), clock.mono_nanos()), Cached::Missing))
            });
            turn.wait();
            c.invalidate(id());
            turn.wait();
            assert_eq!(other.join().unwrap(), (true, true), "the other thread's kept hit went too");
        });

        // Two caches on one thread never answer for each other.
        put(&c, 7);
        assert!(present(&c).is_some());
        let other = cache(&clock);
        assert!(matches!(other.get(id(), clock.mono_nanos()), Cached::Missing));
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
        assert!(matches!(c.get(id(), clock.mono_nanos()), Cached::Missing));
        assert!(c.insert_if_current(id(), c.generation(id()), Lookup::Absent));
    }
}
