//! The verdict vocabulary: what a Verify asks ([`Request`]), what it answers
//! ([`Verdict`] with its [`Outcome`]), the one real failure
//! ([`VerifyError`]) and the headers a caller forwards. A leaf module: it
//! knows nothing of the engine, the store or gRPC, and everything that
//! speaks about verdicts (the engine, metrics, front ends) imports it.
//!
//! Each outcome's wire error string, HTTP status, message and metric label
//! live here together, in the order of precedence the README's "Verdicts"
//! table gives.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CachedKey;
use crate::key::Malformed;
use crate::limit::RateState;

/// The outcome of a verification, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Valid,
    Malformed,
    /// `RATE_LIMITED` because this address failed too often recently.
    TooManyFailedAttempts,
    NotFound,
    Revoked,
    Expired,
    TenantMismatch,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
    /// Disabled by an admin (checked after `Expired`).
    Disabled,
}

impl Outcome {
    /// Every outcome, indexed by discriminant (metrics keep one counter each).
    pub const ALL: [Outcome; 11] = [
        Outcome::Valid,
        Outcome::Malformed,
        Outcome::TooManyFailedAttempts,
        Outcome::NotFound,
        Outcome::Revoked,
        Outcome::Expired,
        Outcome::TenantMismatch,
        Outcome::IpNotAllowed,
        Outcome::InsufficientScope,
        Outcome::RateLimited,
        Outcome::Disabled,
    ];

    /// The stable wire error string; empty when valid.
    pub fn error(self) -> &'static str {
        match self {
            Outcome::Valid => "",
            Outcome::Malformed | Outcome::NotFound => "invalid_api_key",
            Outcome::TooManyFailedAttempts => "too_many_failed_attempts",
            Outcome::Revoked | Outcome::Expired => "expired_api_key",
            Outcome::TenantMismatch => "wrong_tenant",
            Outcome::IpNotAllowed => "ip_not_allowed",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::RateLimited => "rate_limited",
            Outcome::Disabled => "disabled_api_key",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            Outcome::Valid => 200,
            Outcome::Malformed | Outcome::NotFound | Outcome::Revoked | Outcome::Expired => 401,
            Outcome::TenantMismatch | Outcome::IpNotAllowed | Outcome::InsufficientScope | Outcome::Disabled => 403,
            Outcome::TooManyFailedAttempts | Outcome::RateLimited => 429,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Outcome::Valid => "The API key is valid.",
            Outcome::Malformed => "The API key is malformed.",
            Outcome::TooManyFailedAttempts => "Too many failed attempts from this address; try again later.",
            Outcome::NotFound => "The API key is not valid.",
            Outcome::Revoked => "The API key has been revoked.",
            Outcome::Expired => "The API key has expired.",
            Outcome::TenantMismatch => "The API key does not belong to this tenant.",
            Outcome::IpNotAllowed => "The API key may not be used from this address.",
            Outcome::InsufficientScope => "The API key lacks a scope this request needs.",
            Outcome::RateLimited => "The API key's rate limit is exceeded; try again later.",
            Outcome::Disabled => "The API key is disabled.",
        }
    }

    /// The `code` label value of `keystile_verify_verdicts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Valid => "valid",
            Outcome::Malformed => "malformed",
            Outcome::TooManyFailedAttempts => "too_many_failed_attempts",
            Outcome::NotFound => "not_found",
            Outcome::Revoked => "revoked",
            Outcome::Expired => "expired",
            Outcome::TenantMismatch => "tenant_mismatch",
            Outcome::IpNotAllowed => "ip_not_allowed",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::RateLimited => "rate_limited",
            Outcome::Disabled => "disabled",
        }
    }

    /// Whether the caller's address is charged a failed attempt.
    pub fn is_failed_attempt(self) -> bool {
        matches!(self, Outcome::Malformed | Outcome::NotFound)
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

crate::secret::debug_without_key!(Request<'_>, "Request", [ip, scopes, tenant, cost]);

/// The answer: an outcome, the key when it was identified, the quota state.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    /// Set from `REVOKED` on (never for `MALFORMED`/`NOT_FOUND`).
    pub key: Option<Arc<CachedKey>>,
    pub rate: Option<RateState>,
    /// Why a key was malformed (for logs; never contains key material).
    pub malformed: Option<Malformed>,
}

impl Verdict {
    pub fn bare(outcome: Outcome) -> Verdict {
        Verdict { outcome, key: None, rate: None, malformed: None }
    }

    pub fn is_valid(&self) -> bool {
        self.outcome == Outcome::Valid
    }
}

/// A real failure, not a verdict: the answer needed the store (or a shared
/// limiter) and it did not give one in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("the key store did not answer within {0:?}")]
    StoreTimeout(Duration),
    #[error("the key store is unavailable")]
    StoreUnavailable,
    #[error("the rate limiter is unavailable: {0}")]
    LimiterUnavailable(String),
}

/// The HTTP headers a caller can forward (README "Headers"), lower-case.
pub fn headers(verdict: &Verdict, now_unix: i64) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(7);
    if let Some(r) = &verdict.rate {
        out.push(("x-ratelimit-limit", r.limit.to_string()));
        out.push(("x-ratelimit-remaining", r.remaining.to_string()));
        out.push(("x-ratelimit-reset", (now_unix.max(0) as u64 + r.reset_seconds).to_string()));
        out.push(("ratelimit-policy", format!("\"default\";q={};w={}", r.limit, r.window_seconds)));
        out.push(("ratelimit", format!("\"default\";r={};t={}", r.remaining, r.reset_seconds)));
        if verdict.outcome.http_status() == 429 {
            out.push(("retry-after", r.retry_after_ms.div_ceil(1000).max(1).to_string()));
        }
    }
    if verdict.outcome == Outcome::Valid
        && let Some(k) = &verdict.key
    {
        // Joined per answer rather than kept: as cheap as cloning a kept
        // copy, and a cached key stays smaller.
        out.push(("x-api-key-scopes", k.record.scopes.join(",")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_indexed_by_discriminant() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }
}
