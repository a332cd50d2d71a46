//! Where keys live (README, "Storage, cache and revocation"). One trait, [`KeyStore`]; the verify engine does
//! not know whether it talks to [`memory::MemoryStore`] (embedded, `serve
//! --dev`, tests) or [`redis::RedisStore`] (production, shared by replicas).
//!
//! Every mutation also announces itself on the store's [`FeedEvent`] feed so
//! that every sidecar drops its cached copy.

pub mod memory;
pub mod record;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

pub use record::{AuditEvent, AuditQuery, KeyRecord, StoredSigningKey, TenantPolicy, UsageCount};

pub use crate::limit::RateLimitPolicy;

use crate::key::{Env, KeyId};

/// Which store a sidecar uses, as configured.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded store: one process, nothing persisted.
    Memory,
    Redis {
        topology: Box<redis::connection::Topology>,
        namespace: String,
    },
}

impl StoreConfig {
    /// Opens the store (inside a tokio runtime: Redis starts its feed task).
    pub fn open(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(match self {
            StoreConfig::Memory => Arc::new(memory::MemoryStore::new()),
            StoreConfig::Redis { topology, namespace } => Arc::new(redis::RedisStore::connect(topology, namespace)?),
        })
    }

    /// A one-word description for logs; never a password.
    pub fn describe(&self) -> String {
        match self {
            StoreConfig::Memory => "memory".to_string(),
            StoreConfig::Redis { topology, namespace } => format!("redis {} ns={namespace}", topology.describe()),
        }
    }
}

/// Why the store could not answer. Never cached by the engine.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the key store is unavailable: {0}")]
    Unavailable(String),
    #[error("the key store did not answer in time")]
    Timeout,
    #[error("a key with this key_id already exists")]
    AlreadyExists,
    #[error("no such key")]
    NotFound,
    #[error("the key was changed concurrently; retry")]
    Conflict,
    #[error("a stored record could not be decoded: {0}")]
    Corrupt(String),
}

/// A change that sidecars must apply to their caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// This key changed (created, updated, revoked, rotated or deleted).
    Invalidate(KeyId),
    /// This tenant's policy changed.
    TenantChanged(String),
    /// Events may have been lost: drop every cached entry.
    InvalidateAll,
    /// The feed is live (first subscription or after a reconnect + resync).
    Connected,
    /// The feed lost its connection.
    Disconnected,
}

/// Filters and paging for [`KeyStore::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub tenant: Option<String>,
    pub owner: Option<String>,
    pub env: Option<Env>,
    /// Opaque token from the previous page.
    pub after: Option<String>,
    pub limit: usize,
}

/// One page of records, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub records: Vec<KeyRecord>,
    pub next: Option<String>,
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record for `id`, tombstones included; `None` when it does not exist.
    async fn get(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Inserts a new record; `AlreadyExists` if the key_id is taken.
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError>;

    /// Replaces a record whose stored version is `expected_version`
    /// (`Conflict` otherwise, `NotFound` if it is gone).
    async fn update(&self, record: &KeyRecord, expected_version: u64) -> Result<(), StoreError>;

    /// Removes a record for good; `false` if there was none.
    async fn delete(&self, id: KeyId) -> Result<bool, StoreError>;

    /// Records ordered by creation, filtered and paged.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// A page of every key_id the store holds (tombstones included), in
    /// no particular order, after `cursor` (`""` = from the start), and
    /// the cursor of the next page (`None` after the last).
    async fn key_ids(&self, cursor: &str, limit: usize) -> Result<(Vec<KeyId>, Option<String>), StoreError>;

    /// When the key was last used, as far as the sidecars have reported.
    async fn last_used(&self, id: KeyId) -> Result<Option<i64>, StoreError>;

    /// Writes a batch of last-used timestamps (only ever moves them forward).
    async fn touch_last_used(&self, batch: &[(KeyId, i64)]) -> Result<(), StoreError>;

    /// Adds verification counts by code for the unix `hour` (README,
    /// "Usage"); the store keeps about a day of hours. On failure, says
    /// which keys' counts were written all the same (never to be re-sent).
    async fn add_usage(&self, hour: i64, batch: &[(KeyId, Vec<UsageCount>)]) -> Result<(), UsageWriteError>;

    /// A key's verification counts of `codes` over the hours `from..=to`,
    /// in the order of `codes` (codes with none left out).
    async fn usage(&self, id: KeyId, from: i64, to: i64, codes: &[&str]) -> Result<Vec<UsageCount>, StoreError>;

    /// A tenant's policy; `None` when it has none.
    async fn tenant_policy(&self, tenant: &str) -> Result<Option<TenantPolicy>, StoreError>;

    /// Replaces a tenant's policy (no limits = none) and announces it.
    async fn set_tenant_policy(&self, policy: &TenantPolicy) -> Result<(), StoreError>;

    /// Keeps an audit event (the store bounds how many it keeps).
    async fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;

    /// Audit events matching `query`, newest first, and the token of the
    /// next page.
    async fn list_audit(&self, query: &AuditQuery) -> Result<(Vec<AuditEvent>, Option<String>), StoreError>;

    /// The token signing keys, oldest first.
    async fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError>;

    /// Adds a signing key and drops the oldest beyond `keep`.
    async fn add_signing_key(&self, key: &StoredSigningKey, keep: usize) -> Result<(), StoreError>;

    /// Buckets shared by every replica, when this store can hold them
    /// (README, "Rate limits", fleet-wide); `None` = limits stay local.
    fn shared_buckets(&self) -> Option<Arc<dyn crate::limit::fleet::SharedBuckets>> {
        None
    }

    /// Subscribes to the feed of changes.
    fn feed(&self) -> broadcast::Receiver<FeedEvent>;

    /// Whether the feed is connected right now (a subscriber that joins
    /// late learns the state here, then follows Connected/Disconnected).
    fn feed_is_live(&self) -> bool;
}

/// A usage write that failed part way.
#[derive(Debug)]
pub struct UsageWriteError {
    pub error: StoreError,
    /// Keys whose counts were written before the failure.
    pub written: Vec<KeyId>,
}

impl From<StoreError> for UsageWriteError {
    fn from(error: StoreError) -> Self {
        UsageWriteError { error, written: Vec::new() }
    }
}

/// Hours of usage counts a store keeps: a day and some slack for clocks.
pub const USAGE_HOURS_KEPT: i64 = 26;

/// Audit events kept (about: Redis trims its stream approximately).
pub const AUDIT_MAXLEN: usize = 100_000;
/// Longest a listing scans for one page of audit events when filters skip.
pub const AUDIT_SCAN_LIMIT: usize = 10_000;

/// Whether `e` passes `q`'s filters.
pub fn audit_matches(e: &AuditEvent, q: &AuditQuery) -> bool {
    q.tenant.as_ref().is_none_or(|t| &e.tenant == t)
        && q.key_id.as_ref().is_none_or(|k| &e.key_id == k)
        && q.actor.as_ref().is_none_or(|a| &e.actor == a)
        && q.env.as_ref().is_none_or(|v| &e.env == v)
}

/// Capacity of the in-process feed channels. A receiver that lags this far
/// behind drops its whole cache instead.
pub const FEED_CAPACITY: usize = 4096;

/// The sort key of a record in listings (creation time, then key_id), also
/// used as the opaque page token.
pub fn page_token(record: &KeyRecord) -> String {
    format!("{:020}:{}", record.created_at.max(0), record.key_id)
}
