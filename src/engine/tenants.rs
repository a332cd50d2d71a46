//! Tenants' named limits as the engine needs them (README, "Rate limits"):
//! read from the store on first use, kept for `cache_ttl`, dropped at once
//! when the change feed announces a new policy, and read again while the
//! feed is lost. A tenant with no policy is remembered as such, so a key
//! of a tenant without limits costs no store read either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use crate::clock::Clock;
use crate::limit::LimitSpec;
use crate::store::KeyStore;
use crate::verdict::VerifyError;

/// Tenants are those of keys that verified (an admin-controlled set), so a
/// fast hasher is safe here.
type Hasher = foldhash::fast::RandomState;

/// What the engine uses of a tenant's policy.
#[derive(Debug)]
pub struct TenantView {
    pub limits: Vec<LimitSpec>,
    pub tiers: std::collections::BTreeMap<String, Vec<String>>,
    /// This view's own number, never reused: a policy read again is a new
    /// view, so what is derived from views (a key's scopes merged with its
    /// tiers', `CachedKey::tier_scopes`) names the views it came from.
    pub id: u64,
}

impl TenantView {
    pub fn new(limits: Vec<LimitSpec>, tiers: std::collections::BTreeMap<String, Vec<String>>) -> TenantView {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TenantView { limits, tiers, id: NEXT.fetch_add(1, Ordering::Relaxed) }
    }
}

impl Default for TenantView {
    fn default() -> TenantView {
        TenantView::new(Vec::new(), Default::default())
    }
}

struct Entry {
    limits: Arc<TenantView>,
    /// Monotonic nanos of the read.
    fetched: u64,
}

pub struct TenantLimits {
    store: Arc<dyn KeyStore>,
    entries: DashMap<String, Entry, Hasher>,
    /// Bumped by every invalidation: a read that began before one does not
    /// put what it read back.
    generation: AtomicU64,
    ttl: Duration,
    timeout: Duration,
    clock: Clock,
}

impl TenantLimits {
    pub fn new(store: Arc<dyn KeyStore>, ttl: Duration, timeout: Duration, clock: Clock) -> TenantLimits {
        TenantLimits {
            store,
            entries: DashMap::with_hasher(Hasher::default()),
            generation: AtomicU64::new(0),
            ttl,
            timeout,
            clock,
        }
    }

    /// The limits of `tenant`'s policy (empty when it has none). `trusted`:
    /// whether the change feed is live enough for a cached policy to be
    /// believed; `store_down`: whether the store is known to be down (then
    /// an older copy answers at once). A store that cannot answer is an
    /// error unless an older copy is at hand.
    pub async fn get(&self, tenant: &str, trusted: bool, store_down: bool) -> Result<Arc<TenantView>, VerifyError> {
        let now = self.clock.mono_nanos();
        let stale = match self.entries.get(tenant) {
            Some(e) if trusted && now.saturating_sub(e.fetched) < self.ttl.as_nanos() as u64 => {
                return Ok(e.limits.clone());
            }
            Some(e) if store_down => return Ok(e.limits.clone()),
            Some(e) => Some(e.limits.clone()),
            None => None,
        };
        // Boxed, as a key's read is (`RecordSource::lookup_missed`): a cached
        // policy's future stays small.
        Box::pin(self.fetch(tenant, now, stale)).await
    }

    /// A tenant's policy from the store; `stale` if it cannot answer.
    async fn fetch(
        &self,
        tenant: &str,
        now: u64,
        stale: Option<Arc<TenantView>>,
    ) -> Result<Arc<TenantView>, VerifyError> {
        let seen = self.generation.load(Ordering::Acquire);
        match tokio::time::timeout(self.timeout, self.store.tenant_policy(tenant)).await {
            Ok(Ok(policy)) => {
                let limits = Arc::new(policy.map(|p| TenantView::new(p.limits, p.tiers)).unwrap_or_default());
                // Checked under the entry's shard lock: an invalidation
                // bumps the generation before it removes, so either this
                // sees the bump or the removal comes after the insert.
                let entry = self.entries.entry(tenant.to_string());
                if self.generation.load(Ordering::Acquire) == seen {
                    entry.insert(Entry { limits: limits.clone(), fetched: now });
                }
                Ok(limits)
            }
            Ok(Err(_)) => stale.ok_or(VerifyError::StoreUnavailable),
            Err(_) => stale.ok_or(VerifyError::StoreTimeout(self.timeout)),
        }
    }

    /// A tenant's policy changed.
    pub fn invalidate(&self, tenant: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(tenant);
    }

    /// Events may have been lost.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }

    /// Forgets tenants not read for four times the TTL (memory stays bounded
    /// by the tenants in use).
    pub fn purge(&self) {
        let now = self.clock.mono_nanos();
        let keep = 4 * self.ttl.as_nanos() as u64;
        self.entries.retain(|_, e| now.saturating_sub(e.fetched) < keep);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
