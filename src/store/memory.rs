//! The embedded store: the default of `serve --dev`, and the store of tests
//! that do not need Redis. Counts its calls so that tests can prove that a
//! malformed key never reaches a store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{AUDIT_MAXLEN, AUDIT_SCAN_LIMIT, AuditEvent, AuditQuery, audit_matches};
use super::{
    FEED_CAPACITY, FeedEvent, KeyRecord, KeyStore, ListPage, ListQuery, StoreError, StoredSigningKey, TenantPolicy,
    USAGE_HOURS_KEPT, UsageCount, UsageWriteError, page_token,
};
use crate::clock::Clock;
use crate::key::KeyId;
use crate::limit::fleet::{Grant, SharedBuckets};
use crate::limit::{LimitError, RateLimitPolicy};

pub struct MemoryStore {
    records: Mutex<HashMap<KeyId, KeyRecord>>,
    last_used: Mutex<HashMap<KeyId, i64>>,
    /// (key, unix hour, code) → verifications; hours older than a day are
    /// dropped on every add.
    usage: Mutex<HashMap<(KeyId, i64, String), u64>>,
    tenants: Mutex<HashMap<String, TenantPolicy>>,
    signing: Mutex<Vec<StoredSigningKey>>,
    audit: Mutex<(u64, std::collections::VecDeque<AuditEvent>)>,
    feed: broadcast::Sender<FeedEvent>,
    calls: AtomicU64,
    begun: AtomicU64,
    failing: std::sync::atomic::AtomicBool,
    latency_ms: AtomicU64,
    buckets: Option<Arc<MemoryBuckets>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        MemoryStore {
            records: Mutex::default(),
            last_used: Mutex::default(),
            usage: Mutex::default(),
            tenants: Mutex::default(),
            signing: Mutex::default(),
            audit: Mutex::default(),
            feed,
            calls: AtomicU64::new(0),
            begun: AtomicU64::new(0),
            failing: Default::default(),
            latency_ms: AtomicU64::new(0),
            buckets: None,
        }
    }

    /// A store that also shares rate-limit buckets, in this process, with
    /// every engine built on it: the fleet limiter without Redis, for tests
    /// and benches of several engines in one process.
    pub fn sharing_buckets(clock: Clock) -> MemoryStore {
        MemoryStore { buckets: Some(Arc::new(MemoryBuckets::new(clock))), ..MemoryStore::new() }
    }

    /// The shared buckets, when the store was made with them.
    pub fn buckets(&self) -> Option<&Arc<MemoryBuckets>> {
        self.buckets.as_ref()
    }

    /// How many store operations have begun (waiting out the latency or
    /// made).
    pub fn begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// How many store operations were made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes every later call fail as if the store were down (tests).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Makes every later read take this long to answer (tests of timeouts,
    /// coalescing and races).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.latency_ms.store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    async fn delay(&self) {
        self.begun.fetch_add(1, Ordering::SeqCst);
        let ms = self.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }

    fn enter(&self) -> Result<MutexGuard<'_, HashMap<KeyId, KeyRecord>>, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the in-memory store is switched off".into()));
        }
        Ok(self.records.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn announce(&self, id: KeyId) {
        // No receivers is fine: nothing is cached anywhere yet.
        let _ = self.feed.send(FeedEvent::Invalidate(id));
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn get(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        // Read, then wait: like a reply that is slow to arrive, so that tests
        // can hold a stale answer in flight while the record changes.
        let found = self.enter()?.get(&id).cloned();
        self.delay().await;
        Ok(found)
    }

    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut map = self.enter()?;
        if map.contains_key(&record.key_id) {
            return Err(StoreError::AlreadyExists);
        }
        map.insert(record.key_id, record.clone());
        drop(map);
        self.announce(record.key_id);
        Ok(())
    }

    async fn update(&self, record: &KeyRecord, expected_version: u64) -> Result<(), StoreError> {
        let mut map = self.enter()?;
        match map.get_mut(&record.key_id) {
            None => return Err(StoreError::NotFound),
            Some(old) if old.version != expected_version => return Err(StoreError::Conflict),
            Some(old) => *old = record.clone(),
        }
        drop(map);
        self.announce(record.key_id);
        Ok(())
    }

    async fn delete(&self, id: KeyId) -> Result<bool, StoreError> {
        let removed = self.enter()?.remove(&id).is_some();
        self.last_used.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        if removed {
            self.announce(id);
        }
        Ok(removed)
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let map = self.enter()?;
        let mut all: Vec<&KeyRecord> = map
            .values()
            .filter(|r| query.tenant.as_ref().is_none_or(|t| r.tenant == t))
            .filter(|r| query.owner.as_ref().is_none_or(|o| r.owner.eq_ignore_ascii_case(o)))
            .filter(|r| query.env.is_none_or(|e| r.env == e))
            .filter(|r| query.after.as_ref().is_none_or(|a| page_token(r).as_str() > a.as_str()))
            .collect();
        all.sort_by_key(|r| page_token(r));
        let more = all.len() > query.limit;
        all.truncate(query.limit);
        let last_used = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
        let records: Vec<KeyRecord> = all
            .into_iter()
            .map(|r| KeyRecord { last_used_at: last_used.get(&r.key_id).copied(), ..r.clone() })
            .collect();
        let next = if more { records.last().map(page_token) } else { None };
        Ok(ListPage { records, next })
    }

    async fn key_ids(&self, cursor: &str, limit: usize) -> Result<(Vec<KeyId>, Option<String>), StoreError> {
        let map = self.enter()?;
        let mut ids: Vec<KeyId> = map.keys().copied().filter(|id| id.as_str() > cursor).collect();
        ids.sort();
        let more = ids.len() > limit;
        ids.truncate(limit);
        let next = if more { ids.last().map(|id| id.to_string()) } else { None };
        Ok((ids, next))
    }

    async fn last_used(&self, id: KeyId) -> Result<Option<i64>, StoreError> {
        drop(self.enter()?);
        Ok(self.last_used.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied())
    }

    async fn touch_last_used(&self, batch: &[(KeyId, i64)]) -> Result<(), StoreError> {
        let map = self.enter()?;
        let mut last_used = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
        for &(id, at) in batch {
            if map.contains_key(&id) {
                let slot = last_used.entry(id).or_insert(at);
                *slot = (*slot).max(at);
            }
        }
        Ok(())
    }

    async fn add_usage(&self, hour: i64, batch: &[(KeyId, Vec<UsageCount>)]) -> Result<(), UsageWriteError> {
        drop(self.enter()?);
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        usage.retain(|(_, h, _), _| *h > hour - USAGE_HOURS_KEPT);
        for (id, counts) in batch {
            for c in counts {
                *usage.entry((*id, hour, c.code.clone())).or_default() += c.count;
            }
        }
        Ok(())
    }

    async fn usage(&self, id: KeyId, from: i64, to: i64, codes: &[&str]) -> Result<Vec<UsageCount>, StoreError> {
        drop(self.enter()?);
        let usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<UsageCount> = Vec::new();
        for ((k, h, code), n) in usage.iter() {
            if *k == id && (from..=to).contains(h) && codes.contains(&code.as_str()) {
                match out.iter_mut().find(|c| c.code == *code) {
                    Some(c) => c.count += n,
                    None => out.push(UsageCount { code: code.clone(), count: *n }),
                }
            }
        }
        out.sort_by_key(|c| codes.iter().position(|k| *k == c.code));
        Ok(out)
    }

    async fn tenant_policy(&self, tenant: &str) -> Result<Option<TenantPolicy>, StoreError> {
        self.delay().await;
        drop(self.enter()?);
        Ok(self.tenants.lock().unwrap_or_else(|e| e.into_inner()).get(tenant).cloned())
    }

    async fn set_tenant_policy(&self, policy: &TenantPolicy) -> Result<(), StoreError> {
        drop(self.enter()?);
        {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            if policy.limits.is_empty() && policy.tiers.is_empty() {
                tenants.remove(&policy.tenant);
            } else {
                tenants.insert(policy.tenant.clone(), policy.clone());
            }
        }
        let _ = self.feed.send(FeedEvent::TenantChanged(policy.tenant.clone()));
        Ok(())
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        drop(self.enter()?);
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        audit.0 += 1;
        let mut e = event.clone();
        e.id = format!("{:020}", audit.0);
        audit.1.push_back(e);
        if audit.1.len() > AUDIT_MAXLEN {
            audit.1.pop_front();
        }
        Ok(())
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<(Vec<AuditEvent>, Option<String>), StoreError> {
        drop(self.enter()?);
        let audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (scanned, e) in audit.1.iter().rev().filter(|e| query.before.as_ref().is_none_or(|b| &e.id < b)).enumerate()
        {
            if audit_matches(e, query) {
                out.push(e.clone());
            }
            if out.len() == query.limit || scanned + 1 >= AUDIT_SCAN_LIMIT {
                return Ok((out, Some(e.id.clone())));
            }
        }
        Ok((out, None))
    }

    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        drop(self.enter()?);
        Ok(self.signing.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    async fn add_signing_key(&self, key: &StoredSigningKey, keep: usize) -> Result<(), StoreError> {
        drop(self.enter()?);
        let mut keys = self.signing.lock().unwrap_or_else(|e| e.into_inner());
        if keys.iter().any(|k| k.kid == key.kid) {
            return Err(StoreError::AlreadyExists);
        }
        keys.push(key.clone());
        keys.sort_by_key(|k| k.created_at);
        let extra = keys.len().saturating_sub(keep.max(1));
        keys.drain(..extra);
        Ok(())
    }

    fn shared_buckets(&self) -> Option<Arc<dyn SharedBuckets>> {
        self.buckets.clone().map(|b| b as Arc<dyn SharedBuckets>)
    }

    fn feed(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }

    fn feed_is_live(&self) -> bool {
        true
    }
}

/// Shared rate-limit buckets in this process: the same GCRA arithmetic as
/// the Redis script, on the injectable clock. Counts its calls and can be
/// switched off, as the store can.
pub struct MemoryBuckets {
    clock: Clock,
    tats: Mutex<HashMap<String, u64>>,
    calls: AtomicU64,
    failing: std::sync::atomic::AtomicBool,
    replicas: Mutex<HashMap<String, u64>>,
}

impl MemoryBuckets {
    pub fn new(clock: Clock) -> MemoryBuckets {
        MemoryBuckets {
            clock,
            tats: Mutex::default(),
            calls: AtomicU64::new(0),
            failing: Default::default(),
            replicas: Mutex::default(),
        }
    }

    /// Lease and heartbeat calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes every later call fail (tests of the fallback).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn enter(&self) -> Result<(), LimitError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(LimitError::Unavailable("the in-memory buckets are switched off".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl SharedBuckets for MemoryBuckets {
    async fn lease(
        &self,
        name: &str,
        policy: &RateLimitPolicy,
        want: u64,
        min: u64,
        give_back: u64,
    ) -> Result<Grant, LimitError> {
        self.enter()?;
        let now = self.clock.mono_nanos();
        let period = policy.period_nanos();
        let capacity = period.saturating_mul(policy.effective_burst());
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        let tat = tats.entry(name.to_string()).or_insert(0);
        *tat = (*tat).max(now);
        *tat = tat.saturating_sub(give_back.saturating_mul(period)).max(now);
        let avail = capacity.saturating_sub(*tat - now) / period;
        let retry_one_ms =
            if avail == 0 { (*tat + period).saturating_sub(capacity + now).div_ceil(1_000_000).max(1) } else { 0 };
        let granted = if avail >= min && want > 0 { want.min(avail) } else { 0 };
        *tat += granted * period;
        let ahead = *tat - now;
        let retry_after_ms = if granted < min {
            (*tat + min * period).saturating_sub(capacity + now).div_ceil(1_000_000).max(1)
        } else {
            0
        };
        Ok(Grant {
            granted,
            remaining: avail - granted,
            reset_ms: ahead.div_ceil(1_000_000),
            retry_after_ms,
            retry_one_ms,
        })
    }

    async fn heartbeat(&self, id: &str, ttl: Duration) -> Result<u32, LimitError> {
        self.enter()?;
        let now = self.clock.mono_nanos();
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        replicas.insert(id.to_string(), now);
        replicas.retain(|_, seen| now.saturating_sub(*seen) <= ttl.as_nanos() as u64);
        Ok(replicas.len() as u32)
    }
}
