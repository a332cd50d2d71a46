//! The verify engine: SPEC §4's checks in order, over the cache, the store
//! and the limiters. Knows nothing of gRPC; `service::verifier` converts at
//! the edge.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;

use crate::cache::{CacheSettings, Cached, CachedKey, KeyCache, Lookup};
use crate::clock::Clock;
use crate::key::{KeyFormat, KeyId, Malformed, PepperSet};
use crate::limit::{FailureShedder, LimiterRegistry, RateState};
use crate::metrics::Metrics;
use crate::store::{FeedEvent, KeyRecord, KeyStore, RateLimitPolicy, StoreError};

/// The outcome of a verification, in SPEC §4's order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Valid,
    Malformed,
    /// `RATE_LIMITED` because this IP failed too often recently.
    TooManyFailedAttempts,
    NotFound,
    Revoked,
    Expired,
    TenantMismatch,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
}

impl Code {
    /// The stable wire error string; empty when valid.
    pub fn error(self) -> &'static str {
        match self {
            Code::Valid => "",
            Code::Malformed | Code::NotFound => "invalid_api_key",
            Code::TooManyFailedAttempts => "too_many_failed_attempts",
            Code::Revoked | Code::Expired => "expired_api_key",
            Code::TenantMismatch => "wrong_tenant",
            Code::IpNotAllowed => "ip_not_allowed",
            Code::InsufficientScope => "insufficient_scope",
            Code::RateLimited => "rate_limited",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Code::Valid => 200,
            Code::Malformed | Code::NotFound | Code::Revoked | Code::Expired => 401,
            Code::TenantMismatch | Code::IpNotAllowed | Code::InsufficientScope => 403,
            Code::TooManyFailedAttempts | Code::RateLimited => 429,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Code::Valid => "The API key is valid.",
            Code::Malformed => "The API key is malformed.",
            Code::TooManyFailedAttempts => "Too many failed attempts from this address; try again later.",
            Code::NotFound => "The API key is not valid.",
            Code::Revoked => "The API key has been revoked.",
            Code::Expired => "The API key has expired.",
            Code::TenantMismatch => "The API key does not belong to this tenant.",
            Code::IpNotAllowed => "The API key may not be used from this address.",
            Code::InsufficientScope => "The API key lacks a scope this request needs.",
            Code::RateLimited => "The API key's rate limit is exceeded; try again later.",
        }
    }

    /// Whether the caller's IP is charged a failed attempt.
    pub fn is_failed_attempt(self) -> bool {
        matches!(self, Code::Malformed | Code::NotFound)
    }
}

/// What one `Verify` asks. Its `Debug` leaves the key out.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The credential as presented, `Bearer ` and whitespace allowed.
    pub key: &'a str,
    /// The end client's address, already canonical (IPv4-mapped → IPv4).
    pub ip: Option<IpAddr>,
    pub scopes: &'a [String],
    /// Empty = any tenant.
    pub tenant: &'a str,
    /// Rate-limit cells to take; at least 1.
    pub cost: u32,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("key", &"<redacted>")
            .field("ip", &self.ip)
            .field("scopes", &self.scopes)
            .field("tenant", &self.tenant)
            .field("cost", &self.cost)
            .finish()
    }
}

/// The answer: a code, the key when it was identified, the quota state.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub code: Code,
    /// Set from `REVOKED` on (never for `MALFORMED`/`NOT_FOUND`).
    pub key: Option<Arc<CachedKey>>,
    pub rate: Option<RateState>,
    /// Why a key was malformed (for logs; never contains key material).
    pub malformed: Option<Malformed>,
}

impl Verdict {
    fn bare(code: Code) -> Verdict {
        Verdict { code, key: None, rate: None, malformed: None }
    }

    pub fn is_valid(&self) -> bool {
        self.code == Code::Valid
    }
}

/// A real failure, not a verdict: the answer needed the store and the store
/// did not give one in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("the key store did not answer within {0:?}")]
    StoreTimeout(Duration),
    #[error("the key store is unavailable")]
    StoreUnavailable,
}

/// Everything the engine is built from.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub format: KeyFormat,
    pub peppers: PepperSet,
    pub cache: CacheSettings,
    /// Applies to keys without their own limit; `None` = unlimited.
    pub default_rate_limit: Option<RateLimitPolicy>,
    /// Failed attempts per minute per IP before shedding; `None` = never.
    pub failed_attempts_per_minute: Option<NonZeroU32>,
    /// How long a Verify waits for the store.
    pub store_timeout: Duration,
}

impl EngineSettings {
    pub fn new(peppers: PepperSet) -> EngineSettings {
        EngineSettings {
            format: KeyFormat::default(),
            peppers,
            cache: CacheSettings::default(),
            default_rate_limit: None,
            failed_attempts_per_minute: NonZeroU32::new(20),
            store_timeout: Duration::from_millis(50),
        }
    }
}

type Flight = Arc<OnceCell<Result<Lookup, VerifyError>>>;

/// During a store outage, how often one Verify may try the store again.
const PROBE_EVERY: Duration = Duration::from_millis(200);

pub struct Engine {
    settings: EngineSettings,
    store: Arc<dyn KeyStore>,
    cache: KeyCache,
    limiters: LimiterRegistry,
    shedder: Option<FailureShedder>,
    inflight: DashMap<KeyId, Flight>,
    /// Monotonic nanos of the first failed store read of an outage; 0 while
    /// the store answers.
    store_down_since: AtomicU64,
    /// When the store was last tried during an outage.
    last_probe: AtomicU64,
    metrics: Metrics,
    /// key_id → last second it verified, waiting to be written in a batch.
    usage: DashMap<KeyId, i64>,
    clock: Clock,
}

impl Engine {
    pub fn new(settings: EngineSettings, store: Arc<dyn KeyStore>, clock: Clock) -> Engine {
        let metrics = Metrics::new();
        Engine {
            cache: KeyCache::new(settings.cache, clock.clone(), metrics.cache_evictions.clone()),
            metrics,
            limiters: LimiterRegistry::new(settings.default_rate_limit, clock.clone()),
            shedder: settings.failed_attempts_per_minute.map(|n| FailureShedder::new(n, clock.clone())),
            inflight: DashMap::new(),
            store_down_since: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            usage: DashMap::new(),
            settings,
            store,
            clock,
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one request. Every denial is a [`Verdict`]; only a store
    /// that cannot answer is an error.
    pub async fn verify(&self, req: &Request<'_>) -> Result<Verdict, VerifyError> {
        let started = std::time::Instant::now();
        let outcome = self.decide(req).await;
        self.metrics.verify_seconds.record(started.elapsed().as_secs_f64());
        match &outcome {
            Ok(v) => self.metrics.verdict(v.code),
            Err(_) => self.metrics.verify_unavailable.increment(1),
        }
        outcome
    }

    async fn decide(&self, req: &Request<'_>) -> Result<Verdict, VerifyError> {
        let presented = match self.settings.format.parse(req.key) {
            Ok(p) => p,
            Err(why) => {
                self.count_failure(req.ip);
                return Ok(Verdict { malformed: Some(why), ..Verdict::bare(Code::Malformed) });
            }
        };
        if let (Some(ip), Some(shedder)) = (req.ip, &self.shedder)
            && let Some(retry_after_ms) = shedder.shed(ip)
        {
            let limit = self.settings.failed_attempts_per_minute.map_or(0, |n| n.get() as u64);
            let rate = RateState {
                limit,
                remaining: 0,
                reset_seconds: retry_after_ms.div_ceil(1000),
                window_seconds: 60,
                retry_after_ms,
            };
            self.metrics.shed.increment(1);
            return Ok(Verdict { rate: Some(rate), ..Verdict::bare(Code::TooManyFailedAttempts) });
        }

        let key = match self.lookup(presented.key_id).await? {
            Lookup::Present(key)
                if key.record.env == presented.env
                    && self.settings.peppers.matches(&key.record.secret_hash, presented.key_id, presented.secret()) =>
            {
                key
            }
            _ => {
                self.count_failure(req.ip);
                return Ok(Verdict::bare(Code::NotFound));
            }
        };

        let now = self.clock.unix_seconds();
        let record = &key.record;
        let code = if record.is_revoked_at(now) {
            Code::Revoked
        } else if record.is_expired_at(now) {
            Code::Expired
        } else if !req.tenant.is_empty() && req.tenant != record.tenant {
            Code::TenantMismatch
        } else if !record.ip_allowlist.is_empty()
            && !req.ip.is_some_and(|ip| record.ip_allowlist.iter().any(|net| net.contains(&ip)))
        {
            Code::IpNotAllowed
        } else if !req.scopes.iter().all(|s| record.scopes.iter().any(|g| g == s)) {
            Code::InsufficientScope
        } else {
            Code::Valid
        };
        if code != Code::Valid {
            return Ok(Verdict { code, key: Some(key), rate: None, malformed: None });
        }
        let (code, rate) = match &key.limiter {
            None => (Code::Valid, None),
            Some(limiter) => {
                let (ok, state) = limiter.check(req.cost.max(1));
                (if ok { Code::Valid } else { Code::RateLimited }, Some(state))
            }
        };
        if code == Code::Valid {
            self.note_use(&key, now);
        }
        Ok(Verdict { code, key: Some(key), rate, malformed: None })
    }

    fn count_failure(&self, ip: Option<IpAddr>) {
        if let (Some(ip), Some(shedder)) = (ip, &self.shedder) {
            shedder.record_failure(ip);
        }
    }

    /// Remembers that a key was used, at most once a second per key, for
    /// the batched `last_used_at` writes.
    #[inline]
    fn note_use(&self, key: &CachedKey, now: i64) {
        // Read first: a hot key's cache line is not written on every call.
        if key.last_touch.load(Ordering::Relaxed) != now && key.last_touch.swap(now, Ordering::Relaxed) != now {
            self.usage.insert(key.record.key_id, now);
        }
    }

    /// The record for `id` from the cache, or from the store on a miss (one
    /// read, shared by every concurrent miss for the same key_id).
    async fn lookup(&self, id: KeyId) -> Result<Lookup, VerifyError> {
        let down_since = self.store_down_since.load(Ordering::Relaxed);
        let stale = match self.cache.get(id) {
            Cached::Fresh(Lookup::Absent) if down_since != 0 => None,
            Cached::Fresh(found) => {
                self.metrics.cache_hits.increment(1);
                return Ok(found);
            }
            Cached::Stale(key) => Some(key),
            Cached::Missing => None,
        };
        self.metrics.cache_misses.increment(1);
        // While the store is known to be down, one call at a time probes it
        // (at most every PROBE_EVERY); the rest answer at once instead of
        // each waiting out the store budget.
        let result = if down_since != 0 && !self.may_probe() {
            Err(VerifyError::StoreUnavailable)
        } else {
            let flight = self.inflight.entry(id).or_default().clone();
            let result = flight.get_or_init(|| self.load(id)).await.clone();
            self.inflight.remove_if(&id, |_, f| Arc::ptr_eq(f, &flight));
            result
        };
        match (result, stale) {
            (Ok(found), _) => Ok(found),
            // The store cannot answer: a cached key keeps working until the
            // outage is older than the stale window. Nothing else does, and
            // nothing is cached.
            (Err(e), Some(key)) => {
                let since = self.store_down_since.load(Ordering::Relaxed);
                let outage = self.clock.mono_nanos().saturating_sub(since);
                if since != 0 && outage < self.settings.cache.stale_window.as_nanos() as u64 {
                    self.metrics.cache_stale_hits.increment(1);
                    Ok(Lookup::Present(key))
                } else {
                    Err(e)
                }
            }
            (Err(e), None) => Err(e),
        }
    }

    fn may_probe(&self) -> bool {
        let now = self.clock.mono_nanos();
        let last = self.last_probe.load(Ordering::Relaxed);
        now.saturating_sub(last) >= PROBE_EVERY.as_nanos() as u64
            && self.last_probe.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// Notes that the store failed; logs only the start of an outage.
    fn store_failed(&self, error: &dyn std::fmt::Display) {
        let now = self.clock.mono_nanos().max(1);
        if self.store_down_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.last_probe.store(now, Ordering::Relaxed);
            tracing::warn!(error = %error, stale_window = ?self.settings.cache.stale_window, "key store unavailable; cached keys keep verifying for the stale window");
        }
    }

    fn store_answered(&self) {
        if self.store_down_since.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("key store reachable again");
        }
    }

    async fn load(&self, id: KeyId) -> Result<Lookup, VerifyError> {
        let seen = self.cache.generation(id);
        let budget = self.settings.store_timeout;
        self.metrics.store_reads.increment(1);
        let record = match tokio::time::timeout(budget, self.store.get(id)).await {
            Err(_) => {
                self.metrics.store_timeouts.increment(1);
                self.store_failed(&format_args!("no answer within {budget:?}"));
                return Err(VerifyError::StoreTimeout(budget));
            }
            Ok(Err(e)) => {
                self.metrics.store_errors.increment(1);
                self.store_failed(&e);
                return Err(VerifyError::StoreUnavailable);
            }
            Ok(Ok(record)) => {
                self.store_answered();
                record
            }
        };
        let found = match record {
            None => Lookup::Absent,
            Some(record) => Lookup::Present(Arc::new(self.prepare(record))),
        };
        self.cache.insert_if_current(id, seen, found.clone());
        Ok(found)
    }

    fn prepare(&self, record: KeyRecord) -> CachedKey {
        let limiter = self.limiters.for_key(record.key_id, &record.tenant, record.rate_limit);
        CachedKey { limiter, last_touch: AtomicI64::new(0), record }
    }

    /// Applies a change announced by the store.
    pub fn apply(&self, event: &FeedEvent) {
        match event {
            FeedEvent::Invalidate(id) => {
                self.metrics.feed_events_key.increment(1);
                self.invalidate(*id);
            }
            FeedEvent::InvalidateAll => {
                self.metrics.feed_events_all.increment(1);
                self.cache.invalidate_all();
                self.inflight.clear();
            }
            FeedEvent::Connected | FeedEvent::Disconnected => {}
        }
    }

    /// Drops `id` from the cache and from the loads in flight, so that a
    /// lookup starting now reads the store afresh.
    pub fn invalidate(&self, id: KeyId) {
        self.cache.invalidate(id);
        self.inflight.remove(&id);
    }

    /// Takes the pending last-used timestamps and writes them in one batch.
    /// What fails to be written is kept for the next flush.
    pub async fn flush_usage(&self) -> Result<usize, StoreError> {
        let batch: Vec<(KeyId, i64)> = self.usage.iter().map(|e| (*e.key(), *e.value())).collect();
        if batch.is_empty() {
            return Ok(0);
        }
        self.metrics.last_used_writes.increment(1);
        self.store.touch_last_used(&batch).await?;
        for (id, at) in &batch {
            self.usage.remove_if(id, |_, v| v == at);
        }
        Ok(batch.len())
    }

    /// Periodic housekeeping: forget idle IPs and unused buckets.
    pub fn purge(&self) {
        if let Some(s) = &self.shedder {
            s.purge();
        }
        self.limiters.purge_unused();
    }

    /// Forgets a deleted key's bucket.
    pub fn forget_limiter(&self, id: KeyId) {
        self.limiters.forget(id);
    }
}

/// The HTTP headers a caller can forward (SPEC §4), lower-case.
pub fn headers(verdict: &Verdict, now_unix: i64) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(7);
    if let Some(r) = &verdict.rate {
        out.push(("x-ratelimit-limit", r.limit.to_string()));
        out.push(("x-ratelimit-remaining", r.remaining.to_string()));
        out.push(("x-ratelimit-reset", (now_unix.max(0) as u64 + r.reset_seconds).to_string()));
        out.push(("ratelimit-policy", format!("\"default\";q={};w={}", r.limit, r.window_seconds)));
        out.push(("ratelimit", format!("\"default\";r={};t={}", r.remaining, r.reset_seconds)));
        if verdict.code.http_status() == 429 {
            out.push(("retry-after", r.retry_after_ms.div_ceil(1000).max(1).to_string()));
        }
    }
    if verdict.code == Code::Valid
        && let Some(k) = &verdict.key
    {
        // Joined per answer rather than kept: as cheap as cloning a kept
        // copy, and a cached key stays smaller.
        out.push(("x-api-key-scopes", k.record.scopes.join(",")));
    }
    out
}
