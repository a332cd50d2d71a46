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
//! - [`fleet::FleetLimiter`]: buckets shared by every replica through the
//!   store, spent locally from leases ([`fleet::SharedBuckets`] is what the
//!   store must offer).
//! - [`shedder::FailureShedder`]: failed attempts per client address.
//! - [`policy::RateLimitPolicy`]: a quota as written, parsed and validated.
//! - [`named`]: named limits, their layers and which apply to a request.

pub mod fleet;
pub mod gcra;
pub mod local;
pub mod named;
pub mod policy;
pub mod shedder;

use std::future::Future;
use std::pin::Pin;

pub use named::{LimitFallback, LimitName, LimitScope, LimitSpec};
pub use policy::{MAX_REQUESTS, MAX_WINDOW_SECONDS, RateLimitPolicy};

use crate::key::{Env, KeyId};

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

/// A tenant's name, hashed to a fixed size once per cached key, so that a
/// bucket id is `Copy` and the hot path allocates nothing for it.
pub type TenantTag = [u8; 16];

/// The tag of `tenant`'s buckets.
pub fn tenant_tag(tenant: &str) -> TenantTag {
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&blake3::hash(tenant.as_bytes()).as_bytes()[..16]);
    tag
}

/// Who a bucket counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketOwner {
    Key(KeyId),
    /// The tenant's keys of one environment: live and test keys never share
    /// a bucket.
    Tenant {
        tag: TenantTag,
        env: Env,
    },
}

/// Whose bucket a request draws from: a limit's name, its owner and its
/// numbers. Two keys of a tenant may define one name with different
/// numbers (a key's override): they count in different buckets rather than
/// reset one bucket in turns. A changed policy names a new bucket, whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketId {
    pub name: LimitName,
    pub owner: BucketOwner,
    pub quota: RateLimitPolicy,
}

impl BucketId {
    /// The bucket of limit `spec` for key `id` of the tenant tagged `tenant`
    /// (`None`: no tenant, so a per-tenant limit counts the key alone).
    pub fn of(spec: &LimitSpec, id: KeyId, tenant: Option<&TenantTag>, env: Env) -> BucketId {
        let owner = match (spec.per, tenant) {
            (LimitScope::Tenant, Some(tag)) => BucketOwner::Tenant { tag: *tag, env },
            _ => BucketOwner::Key(id),
        };
        BucketId { name: spec.name, owner, quota: spec.policy() }
    }

    /// A stable, printable name of the bucket, for a shared store.
    pub fn storage_name(&self) -> String {
        let policy = &self.quota;
        let q = format!("{}/{}/{}", policy.requests, policy.window_seconds, policy.effective_burst());
        match &self.owner {
            BucketOwner::Key(id) => format!("{}:k:{id}:{q}", self.name),
            BucketOwner::Tenant { tag, env } => {
                let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
                format!("{}:t:{env}:{hex}:{q}", self.name)
            }
        }
    }
}

/// What a limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The cells were taken.
    pub allowed: bool,
    pub state: RateState,
    /// Where the cells came from, so that a refund puts them back there.
    pub source: CellSource,
}

/// Where a decision's cells came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CellSource {
    /// An in-process bucket.
    #[default]
    Local,
    /// A lease from a shared bucket.
    Lease,
    /// The local share of a shared limit, while the store is out of reach.
    LocalShare,
    /// Admitted without counting (the `open` fallback): nothing to give back.
    Uncounted,
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
    /// whole under the new one. `now` is the caller's reading of the
    /// limiter's clock in monotonic nanos (one read per Verify).
    fn check(&self, bucket: &BucketId, policy: &RateLimitPolicy, cost: u32, now: u64) -> LimitCheck<'_>;

    /// Gives back `cost` cells that [`Limiter::check`] took (as `decision`
    /// says where from), because another limit of the same request denied
    /// it (all or nothing, README "Rate limits").
    fn refund(&self, bucket: &BucketId, decision: &Decision, cost: u32);

    /// Checks a limit whose fallback matters (the fleet limiter applies it
    /// when the shared buckets are out of reach); by default the same as
    /// [`Limiter::check`].
    fn check_spec(&self, bucket: &BucketId, spec: &LimitSpec, cost: u32, now: u64) -> LimitCheck<'_> {
        self.check(bucket, &spec.policy(), cost, now)
    }

    /// Drops every bucket of a key that is gone.
    fn forget_key(&self, id: KeyId);

    /// Housekeeping on a timer: drops buckets that are whole again.
    fn purge(&self);

    /// Buckets held (for tests and metrics).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
