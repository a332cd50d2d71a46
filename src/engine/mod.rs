//! The decision pipeline: one Verify flows one way through it (README,
//! "Verdicts"; docs/architecture.md draws it):
//!
//! parse → shed → record source → checks → limiters → verdict
//!
//! Only the checks, in order, live in this file. Where records come from is
//! [`source::RecordSource`]; rate limits are behind [`crate::limit::Limiter`];
//! last-used timestamps go to [`usage::UsageBatcher`]. Knows nothing of gRPC:
//! front ends convert at their edge.

pub mod known;
pub mod source;
pub mod tenants;
pub mod usage;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::{CacheSettings, Lookup};
use crate::clock::Clock;
use crate::key::{KeyFormat, KeyKind, PepperSet};
use crate::limit::LimitName;
use crate::limit::fleet::FleetSettings;
use crate::limit::named::{self, LimitSpec};
use crate::limit::shedder::{Charged, FailureShedder};
use crate::limit::{BucketId, Decision, LimitCheck, Limiter, RateLimitPolicy, RateState};
use crate::metrics::Metrics;
use crate::token::{TokenSettings, Tokens};
use crate::verdict::{AppliedLimit, Mode, Outcome, Request, Verdict, VerifyError, most_constraining};
use source::{Admit, RecordSource};
use usage::UsageBatcher;

/// Everything the engine is built from.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub format: KeyFormat,
    pub peppers: PepperSet,
    pub cache: CacheSettings,
    /// Applies to keys without their own limit; `None` = unlimited. The
    /// deployment's limit named `default`, applied automatically.
    pub default_rate_limit: Option<RateLimitPolicy>,
    /// The deployment's named limits (`--limit`), below tenants' and keys'.
    pub limits: Vec<LimitSpec>,
    /// Share buckets across replicas when the store can (README, "Rate
    /// limits", fleet-wide); `None` = count in this process only.
    pub fleet: Option<FleetSettings>,
    /// Failed attempts per minute per address before shedding; `None` =
    /// never. Verify's caller-reported addresses and admin callers' peer
    /// addresses are counted apart, each against this number.
    pub failed_attempts_per_minute: Option<NonZeroU32>,
    /// How long a Verify waits for the store.
    pub store_timeout: Duration,
    /// Whether a granted scope `*` satisfies every scope (README, "Scopes").
    pub allow_star_scope: bool,
    /// Tokens exchanged for keys (README, "Token exchange"); `None` = a
    /// token is just a malformed key.
    pub tokens: Option<TokenSettings>,
    /// How the proxy front ends (ext_authz, forward-auth) read requests and
    /// answer (README, "Protect an API without code").
    pub proxy: crate::proxy::ProxySettings,
}

impl EngineSettings {
    pub fn new(peppers: PepperSet) -> EngineSettings {
        EngineSettings {
            format: KeyFormat::default(),
            peppers,
            cache: CacheSettings::default(),
            default_rate_limit: None,
            limits: Vec::new(),
            fleet: Some(FleetSettings::default()),
            failed_attempts_per_minute: NonZeroU32::new(20),
            store_timeout: Duration::from_millis(50),
            allow_star_scope: false,
            tokens: Some(TokenSettings::default()),
            proxy: crate::proxy::ProxySettings::default(),
        }
    }
}

pub struct Engine {
    format: KeyFormat,
    peppers: PepperSet,
    /// The deployment's layer of named limits, `--default-rate-limit` as
    /// `default` included.
    limits: Vec<LimitSpec>,
    allow_star_scope: bool,
    /// Failed attempts by the address a Verify caller reports.
    shedder: Option<FailureShedder>,
    records: Arc<RecordSource>,
    limiter: Arc<dyn Limiter>,
    tokens: Option<Arc<Tokens>>,
    usage: Arc<UsageBatcher>,
    metrics: Metrics,
    clock: Clock,
}

impl Engine {
    pub fn new(
        settings: &EngineSettings,
        records: Arc<RecordSource>,
        limiter: Arc<dyn Limiter>,
        tokens: Option<Arc<Tokens>>,
        usage: Arc<UsageBatcher>,
        metrics: Metrics,
        clock: Clock,
    ) -> Engine {
        Engine {
            format: settings.format.clone(),
            peppers: settings.peppers.clone(),
            limits: deployment_limits(settings),
            allow_star_scope: settings.allow_star_scope,
            shedder: settings.failed_attempts_per_minute.map(|n| FailureShedder::new(n, clock.clone())),
            records,
            limiter,
            tokens,
            usage,
            metrics,
            clock,
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Answers one Verify. Every denial is a [`Verdict`]; only a store that
    /// cannot answer is an error.
    pub async fn verify(&self, req: &Request<'_>) -> Result<Verdict, VerifyError> {
        self.verify_with(req, self.shedder.as_ref()).await
    }

    /// The pipeline with failures counted by `shedder` against `req.ip`,
    /// and the verdict counted in the metrics. Verify passes its own
    /// shedder; `auth` passes one keyed by transport peer.
    pub(crate) async fn verify_with(
        &self,
        req: &Request<'_>,
        shedder: Option<&FailureShedder>,
    ) -> Result<Verdict, VerifyError> {
        let started = self.metrics.timed.then(std::time::Instant::now);
        // One clock read per Verify (README, "Performance"): the cache's
        // age, the limiters, the checks and the usage count share it.
        let now = self.clock.now();
        // The pipeline, in this function's own state rather than a future
        // of its own, which would be built and then copied here on every
        // call (over a kilobyte; README, "Performance"). Each step that
        // decides breaks out of the block with the Verify's answer.
        let outcome: Result<Verdict, VerifyError> = 'decide: {
            // 1. Parse: prefix, shape and checksum, before anything else; or,
            // for a token (README, "Token exchange"), its signature, issuer and
            // expiry, without the store.
            let token = match &self.tokens {
                Some(tokens) if crate::token::looks_like_token(req.key) => match tokens.verify(req.key) {
                    Ok(t) if req.mode == Mode::Bearer => Some(t),
                    // A token this deployment signed, past its expiry: said so,
                    // as for a key (no key is named).
                    Err(crate::token::TokenRejection::Expired) if req.mode == Mode::Bearer => {
                        break 'decide Ok(Verdict::bare(Outcome::Expired));
                    }
                    _ => {
                        count_failure(shedder, req.ip);
                        break 'decide Ok(Verdict::bare(Outcome::Malformed));
                    }
                },
                _ => None,
            };
            let presented = match &token {
                Some(_) => None,
                None => match self.format.parse(req.key) {
                    Ok(p) => Some(p),
                    Err(why) => {
                        count_failure(shedder, req.ip);
                        break 'decide Ok(Verdict { malformed: Some(why), ..Verdict::bare(Outcome::Malformed) });
                    }
                },
            };
            // A publishable key answers only for public scopes (README, "Key
            // kinds"): its kind is in its prefix, so anything else is refused
            // here, before the cache or the store, whatever the key_id.
            if let Some(p) = &presented
                && p.kind == KeyKind::Publishable
                && (req.mode != Mode::Bearer || !req.scopes.iter().all(crate::scope::is_public))
            {
                break 'decide Ok(Verdict::bare(Outcome::InsufficientScope));
            }
            let key_id = match (&presented, &token) {
                (Some(p), _) => p.key_id,
                (None, Some(t)) => t.key_id,
                (None, None) => unreachable!("a key or a token"),
            };
            // 2. Shed an address that failed too often: it protects the store,
            // so a key already in the cache is answered whatever its address's
            // failures (nobody can lock a victim's valid key out by forging
            // failures from the victim's address).
            // An exchange is shed whatever the cache holds: its secret and
            // email are what is being guessed.
            // The cache is read once: what it holds is taken on to the lookup.
            let peeked = self.records.peek(key_id, now.mono);
            if let (Some(ip), Some(shedder)) = (req.ip, shedder)
                && (req.mode == Mode::Exchange || !self.records.is_trusted_hit(&peeked))
                && let Some(retry_after_ms) = shedder.shed(ip)
            {
                break 'decide Ok(self.shed(shedder, retry_after_ms));
            }

            // 3. The record, and the secret checked against it (a token's
            // signature stood for it). A read of the store is charged to the
            // caller's address before it is made and given back if the key is
            // good (README, "Rate limits"): many misses sent at once cannot
            // read more than the address's allowance.
            let mut charge = None;
            let mut shed_for = None;
            // The clock reading is the limiters' too, unless the Verify had to
            // wait (a store read, a tenant's policy, a shared bucket): then
            // they read the clock again, so a wait is not admitted as cells.
            let mut waited = Waited::default();
            let charge_read = || match req.ip.zip(shedder) {
                None => Admit::Read,
                Some((ip, shedder)) => match shedder.charge(ip) {
                    Charged::Yes(c) => {
                        charge = Some(c);
                        Admit::Read
                    }
                    Charged::Shed(ms) => {
                        shed_for = Some(ms);
                        Admit::Refuse
                    }
                    Charged::Busy => Admit::Wait,
                },
            };
            let found = match self.records.answer_cached(peeked) {
                Ok(found) => Ok(found),
                Err(miss) => waited.on(self.records.lookup_missed(key_id, miss, charge_read)).await,
            };
            if let (Some(shedder), Some(ms)) = (shedder, shed_for) {
                break 'decide Ok(self.shed(shedder, ms));
            }
            // The charge is given back when dropped (a valid key, a store
            // error, a caller gone); a failure keeps it.
            let mut failed = || match charge.take() {
                Some(c) => c.failed(),
                None => count_failure(shedder, req.ip),
            };
            let found = tri!(found, 'decide);
            let key = match found {
                Lookup::Present(key)
                    if match (&presented, &token) {
                        // The kind too: a publishable key's secret is public, so
                        // re-prefixed as a secret key it must find nothing.
                        (Some(p), _) => {
                            key.record.env == p.env
                                && key.record.kind == p.kind
                                && self.peppers.matches_kind(&key.record.secret_hash, p.key_id, p.kind, p.secret())
                        }
                        (None, Some(t)) => key.record.env.as_str() == t.env,
                        (None, None) => false,
                    } =>
                {
                    key
                }
                _ => {
                    failed();
                    break 'decide Ok(Verdict::bare(Outcome::NotFound));
                }
            };
            // An exchange of a key owned by an email names that email: a wrong
            // one is a wrong credential, answered and counted as such before
            // any other check or limit could tell the secret was right.
            if req.mode == Mode::Exchange && !owner_matches(&key.record.owner, req.owner_email) {
                failed();
                break 'decide Ok(Verdict::bare(Outcome::NotFound));
            }
            drop(charge);

            // The tenant's policy (limits, tiers), read once when needed.
            let record = &key.record;
            let tenant_view = match record.tenant.is_empty() || (record.tiers.is_empty() && req.mode == Mode::Admin) {
                true => None,
                false => Some(tri!(waited.on(self.records.tenant_limits(&record.tenant)).await, 'decide)),
            };
            // A key's tiers add their scopes (README, "Tiers"): the tenant's tier
            // of a name, else the deployment's. Only keys with tiers pay for it.
            let tier_scopes: Option<Arc<[String]>> = if record.tiers.is_empty() {
                None
            } else {
                let deployment = tri!(waited.on(self.records.tenant_limits("")).await, 'decide);
                let from = [tenant_view.as_ref().map_or(0, |v| v.id), deployment.id];
                Some(key.tier_scopes(from, || {
                    let mut all = record.scopes.clone();
                    for tier in &record.tiers {
                        let bundle =
                            tenant_view.as_ref().and_then(|v| v.tiers.get(tier)).or(deployment.tiers.get(tier));
                        for s in bundle.into_iter().flatten() {
                            if !all.contains(s) {
                                all.push(s.clone());
                            }
                        }
                    }
                    all
                }))
            };
            let granted: &[String] = tier_scopes.as_deref().unwrap_or(&record.scopes);

            // 4. The checks, in order of precedence.
            let outcome = if record.is_revoked_at(now.unix) {
                Outcome::Revoked
            } else if record.is_expired_at(now.unix) {
                Outcome::Expired
            } else if record.disabled {
                Outcome::Disabled
            } else if record.exchange_only && req.mode != Mode::Exchange && token.is_none() {
                Outcome::ExchangeOnly
            } else if !req.tenant.is_empty() && req.tenant != record.tenant {
                Outcome::TenantMismatch
            } else if !record.ip_allowlist.is_empty()
                && !req.ip.is_some_and(|ip| record.ip_allowlist.iter().any(|net| net.contains(&ip)))
            {
                Outcome::IpNotAllowed
            } else if !record.allowed_origins.is_empty() && !crate::origin::allowed(&record.allowed_origins, req.origin)
            {
                Outcome::OriginNotAllowed
            } else if !crate::scope::all_granted(granted, req.scopes.iter(), self.allow_star_scope)
                || token
                    .as_ref()
                    .is_some_and(|t| !crate::scope::all_granted(&t.scopes, req.scopes.iter(), self.allow_star_scope))
            {
                Outcome::InsufficientScope
            } else {
                Outcome::Valid
            };
            if outcome != Outcome::Valid {
                break 'decide Ok(Verdict { outcome, key: Some(key), ..Verdict::bare(outcome) });
            }
            // A token's scopes that its key still holds: all of them, unless
            // the key lost some since the exchange (then a copy without them).
            // For a key with tiers: its scopes and its tiers'.
            let token_scopes = match &token {
                Some(t) => {
                    let held = |s: &String| crate::scope::all_granted(granted, [s.as_str()], self.allow_star_scope);
                    Some(if t.scopes.iter().all(held) {
                        t.scopes.clone()
                    } else {
                        t.scopes.iter().filter(|s| held(s)).cloned().collect::<Vec<_>>().into()
                    })
                }
                None => tier_scopes.clone(),
            };

            // 5. The limits (README, "Rate limits"): every applicable one is
            // checked, and cells stay taken only if all pass.
            let tenant_limits = match (tenant_view, record.tenant.is_empty()) {
                (Some(v), _) => Some(v),
                (None, true) => None,
                (None, false) => Some(tri!(waited.on(self.records.tenant_limits(&record.tenant)).await, 'decide)),
            };
            let mut applicable: smallvec::SmallVec<[LimitSpec; 4]> = smallvec::SmallVec::new();
            let legacy = record.rate_limit.as_ref().map(LimitSpec::from_legacy);
            let tenant_layer = tenant_limits.as_deref().map_or(&[][..], |v| &v.limits[..]);
            if req.limits.is_empty() && record.limits.is_empty() && tenant_layer.is_empty() && self.limits.is_empty() {
                // The common case: at most the key's own `rate_limit`.
                if let Some(l) = legacy {
                    applicable.push(l);
                }
            } else {
                named::applicable(req.limits, [&record.limits, tenant_layer, &self.limits], legacy, &mut applicable);
            }
            // The cells taken so far, one decision per limit of `applicable`
            // in order, to give back if a later limit denies. Only these are
            // held while a limiter answers: the bucket ids are made again for
            // a refund and the applied limits after the loop, which keeps
            // every Verify's future (moved before it runs) smaller.
            let mut taken: smallvec::SmallVec<[Decision; 4]> = smallvec::SmallVec::new();
            let cost = req.cost.max(1);
            let bucket_of = |spec: &LimitSpec| BucketId::of(spec, record.key_id, key.tenant_tag.as_ref(), record.env);
            let applied_of = |taken: &[Decision]| -> smallvec::SmallVec<[AppliedLimit; 4]> {
                applicable.iter().zip(taken).map(|(spec, d)| AppliedLimit { name: spec.name, state: d.state }).collect()
            };
            for spec in &applicable {
                let at = waited.now(now.mono, &self.clock);
                // An in-process bucket answers at once: taken as it is, with
                // no future around it (README, "Performance").
                let decision = match self.limiter.check_spec(&bucket_of(spec), spec, cost, at) {
                    LimitCheck::Ready(answer) => answer,
                    LimitCheck::Pending(wait) => waited.on(wait).await,
                };
                let decision = match decision {
                    Ok(d) => d,
                    Err(e) => {
                        self.refund(applicable.iter().map(bucket_of).zip(&taken), cost);
                        break 'decide Err(VerifyError::LimiterUnavailable(e.to_string()));
                    }
                };
                if !decision.allowed {
                    self.refund(applicable.iter().map(bucket_of).zip(&taken), cost);
                    let mut applied = applied_of(&taken);
                    for a in applied.iter_mut() {
                        a.state.remaining = (a.state.remaining + cost as u64).min(a.state.limit);
                    }
                    let denied = AppliedLimit { name: spec.name, state: decision.state };
                    applied.push(denied);
                    break 'decide Ok(Verdict {
                        outcome: Outcome::RateLimited,
                        key: Some(key),
                        rate: Some(denied),
                        limits: if applied.len() > 1 { applied.to_vec() } else { Vec::new() },
                        malformed: None,
                        token_scopes,
                        decided_at: now.unix,
                    });
                }
                taken.push(decision);
            }
            // One limit, the common case, is its own most constraining one.
            let (rate, limits) = match (&applicable[..], &taken[..]) {
                ([], _) | (_, []) => (None, Vec::new()),
                ([spec], [d]) => (Some(AppliedLimit { name: spec.name, state: d.state }), Vec::new()),
                _ => {
                    let applied = applied_of(&taken);
                    (most_constraining(&applied).copied(), applied.to_vec())
                }
            };

            // 6. Valid.
            Ok(Verdict {
                outcome: Outcome::Valid,
                key: Some(key),
                rate,
                limits,
                malformed: None,
                token_scopes,
                decided_at: now.unix,
            })
        };
        let outcome = outcome.map(|v| Verdict { decided_at: now.unix, ..v });
        if let Some(started) = started {
            self.metrics.verify_seconds.record(started.elapsed().as_secs_f64());
        }
        match &outcome {
            Ok(v) => {
                self.metrics.verdict(v.outcome);
                if let Some(key) = &v.key {
                    self.usage.count(key, v.outcome, now.unix);
                }
            }
            Err(VerifyError::LimiterUnavailable(_)) => self.metrics.limiter_unavailable.increment(1),
            Err(_) => self.metrics.verify_unavailable.increment(1),
        }
        outcome
    }

    /// The answer to an address that failed too often: 429 with when it
    /// may try again.
    fn shed(&self, shedder: &FailureShedder, retry_after_ms: u64) -> Verdict {
        let rate = RateState {
            limit: shedder.per_minute(),
            remaining: 0,
            reset_seconds: retry_after_ms.div_ceil(1000),
            window_seconds: 60,
            retry_after_ms,
        };
        self.metrics.shed.increment(1);
        let rate = AppliedLimit { name: LimitName::DEFAULT, state: rate };
        Verdict { rate: Some(rate), ..Verdict::bare(Outcome::TooManyFailedAttempts) }
    }

    /// Gives back the cells a denied request took.
    fn refund<'d>(&self, taken: impl Iterator<Item = (BucketId, &'d Decision)>, cost: u32) {
        for (bucket, decision) in taken {
            self.limiter.refund(&bucket, decision, cost);
        }
    }

    /// Drops the cache's expired negative entries (every second).
    pub fn purge_expired(&self) {
        self.records.cache().purge_expired();
        self.metrics.cache_bytes.set(self.records.cache().weighed_bytes() as f64);
    }

    /// Periodic housekeeping: forget addresses that stopped failing.
    pub fn purge(&self) {
        if let Some(s) = &self.shedder {
            s.purge();
        }
        self.records.purge();
    }
}

/// `?` inside the pipeline's block: an error is the block's answer.
macro_rules! tri {
    ($result:expr, $block:lifetime) => {
        match $result {
            Ok(value) => value,
            Err(e) => break $block Err(e),
        }
    };
}
use tri;

/// Whether a Verify has had to wait since its clock reading (README,
/// "Performance": one clock read per Verify, when it does not wait).
#[derive(Default)]
struct Waited {
    /// Something waited since the last reading.
    since: bool,
    /// The reading taken after a wait, if any.
    again: Option<u64>,
}

impl Waited {
    /// Awaits `f`, noting whether it had to wait.
    async fn on<F: std::future::Future>(&mut self, f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| {
            let poll = f.as_mut().poll(cx);
            self.since |= poll.is_pending();
            poll
        })
        .await
    }

    /// Monotonic now: the Verify's `first` reading while nothing has
    /// waited, else a reading taken after the last wait.
    fn now(&mut self, first: u64, clock: &Clock) -> u64 {
        if std::mem::take(&mut self.since) {
            self.again = Some(clock.mono_nanos());
        }
        self.again.unwrap_or(first)
    }
}

/// The deployment's layer: `--limit`s, and `--default-rate-limit` as the
/// automatic limit `default` unless a `--limit` names `default` itself.
fn deployment_limits(settings: &EngineSettings) -> Vec<LimitSpec> {
    let mut limits = settings.limits.clone();
    if let Some(p) = &settings.default_rate_limit
        && !limits.iter().any(|l| l.name == crate::limit::LimitName::DEFAULT)
    {
        limits.push(LimitSpec::from_legacy(p));
    }
    limits
}

/// Whether `given` names `owner` when the owner is an email (compared
/// without case, in constant time over hashes); an owner that is no email
/// needs nothing.
fn owner_matches(owner: &str, given: &str) -> bool {
    let owner = owner.trim();
    if !owner.contains('@') {
        return true;
    }
    let h = |s: &str| *blake3::hash(s.trim().to_ascii_lowercase().as_bytes()).as_bytes();
    subtle::ConstantTimeEq::ct_eq(&h(owner)[..], &h(given)[..]).into()
}

fn count_failure(shedder: Option<&FailureShedder>, ip: Option<IpAddr>) {
    if let (Some(ip), Some(shedder)) = (ip, shedder) {
        shedder.record_failure(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future pending once before it is ready (a store read, say).
    fn pending_once() -> impl std::future::Future<Output = ()> {
        let mut polled = false;
        std::future::poll_fn(move |cx| {
            if std::mem::replace(&mut polled, true) {
                std::task::Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        })
    }

    /// The limiters get the Verify's one clock reading while nothing has
    /// waited, and a reading taken after the last wait otherwise, so a
    /// store read's time is never admitted as cells.
    #[tokio::test]
    async fn the_limiters_read_the_clock_again_only_after_a_wait() {
        let clock = Clock::manual(1_000);
        let first = clock.mono_nanos();
        let mut waited = Waited::default();
        waited.on(std::future::ready(())).await;
        clock.advance(Duration::from_millis(5));
        assert_eq!(waited.now(first, &clock), first, "nothing waited: the first reading");
        waited.on(pending_once()).await;
        assert_eq!(waited.now(first, &clock), first + 5_000_000, "after a wait: read again");
        clock.advance(Duration::from_millis(5));
        assert_eq!(waited.now(first, &clock), first + 5_000_000, "nothing waited since: that reading");
        waited.on(pending_once()).await;
        assert_eq!(waited.now(first, &clock), first + 10_000_000);
    }
}
