//! Rate limits, as a layer of their own (README, "Rate limits").
//!
//! - [`Limiter`]: what the engine asks of any limiter: take `cost` cells
//!   from a bucket under a policy, or say why not. A check may be ready at
//!   once (a bucket in this process) or have to wait (a bucket shared
//!   through the store), and it may fail.
//! - [`local::LocalLimiter`]: the in-process implementation, a registry of
//!   [`gcra::GcraBucket`]s keyed by [`BucketId`]. Buckets live in the
//!   registry, not in cache entries: evicting a key from the cache does not
//!   hand out a fresh quota.
//! - [`shedder::FailureShedder`]: failed attempts per client address.
//! - [`policy::RateLimitPolicy`]: a quota as written, parsed and validated.

pub mod gcra;
pub mod local;
pub mod policy;
pub mod shedder;

use std::future::Future;
use std::pin::Pin;

pub use policy::{MAX_REQUESTS, MAX_WINDOW_SECONDS, RateLimitPolicy};

use crate::key::KeyId;

/// The quota state a verdict carries, and from which the headers are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Requests per window.
    pub limit: u64,
    /// Requests that can still be made now; never more than `limit`.
    pub remaining: u64,
    /// Seconds until the quota is whole again (or, when denied, until the
    /// request could pass).
    pub reset_seconds: u64,
    pub window_seconds: u64,
    /// When denied: milliseconds until the same request could pass.
    pub retry_after_ms: u64,
}

/// Whose bucket a request draws from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BucketId {
    Key(KeyId),
    /// Shared by the tenant's keys with this policy.
    Tenant(String, RateLimitPolicy),
}

impl BucketId {
    /// The bucket of key `id` of `tenant` under `policy`.
    pub fn of_key(id: KeyId, tenant: &str, policy: &RateLimitPolicy) -> BucketId {
        if policy.per_tenant && !tenant.is_empty() {
            BucketId::Tenant(tenant.to_string(), *policy)
        } else {
            BucketId::Key(id)
        }
    }
}

/// What a limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The cells were taken.
    pub allowed: bool,
    pub state: RateState,
}

/// A limiter that could not decide (a shared bucket out of reach).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    #[error("the rate limiter is unavailable: {0}")]
    Unavailable(String),
}

pub type LimitResult = Result<Decision, LimitError>;

/// A check in progress: ready at once for an in-process bucket (no
/// allocation on the hot path), a future for one that has to wait.
pub enum LimitCheck<'a> {
    Ready(LimitResult),
    Pending(Pin<Box<dyn Future<Output = LimitResult> + Send + 'a>>),
}

impl LimitCheck<'_> {
    pub async fn outcome(self) -> LimitResult {
        match self {
            LimitCheck::Ready(r) => r,
            LimitCheck::Pending(f) => f.await,
        }
    }
}

/// Any rate limiter the engine can consult.
pub trait Limiter: Send + Sync + 'static {
    /// Takes `cost` cells from `bucket` under `policy` if they are all
    /// there; otherwise takes nothing. A bucket whose policy changed starts
    /// whole under the new one.
    fn check(&self, bucket: &BucketId, policy: &RateLimitPolicy, cost: u32) -> LimitCheck<'_>;

    /// Drops a bucket whose key is gone.
    fn forget(&self, bucket: &BucketId);

    /// Housekeeping on a timer: drops buckets that are whole again.
    fn purge(&self);

    /// Buckets held (for tests and metrics).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
