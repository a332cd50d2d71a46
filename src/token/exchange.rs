//! The exchange (README, "Token exchange"): an API key holding
//! `token:exchange` (exchange-only keys too) is authenticated through
//! [`crate::auth`], its owner email checked when it has one, and a token
//! signed for it with at most its scopes. Both front ends (gRPC
//! `TokenExchange`, HTTP `POST /v1/auth/token`) call [`exchange`] and map
//! its [`ExchangeError`] the same way.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Issued, Tokens};
use crate::auth::{AuthError, Authenticator};

/// The scope a key needs to be exchanged.
pub const EXCHANGE_SCOPE: &str = "token:exchange";
const MAX_EMAIL: usize = 254;
const MAX_SECRET: usize = 512;
const MAX_SCOPES: usize = 64;

/// One exchange, as asked. `Debug` leaves the secret out.
pub struct ExchangeRequest<'a> {
    /// The API key, `Bearer ` allowed.
    pub secret: &'a str,
    pub email: &'a str,
    /// A subset of the key's scopes; empty = all of them.
    pub scopes: &'a [String],
    /// 0 = the default lifetime.
    pub ttl_seconds: u32,
    /// The transport peer, for failed-attempt shedding.
    pub peer: Option<IpAddr>,
}

crate::secret::debug_without_key!(ExchangeRequest<'_>, "ExchangeRequest", [email, scopes, ttl_seconds, peer]);

/// Why an exchange was refused. The wire error strings are the Verify
/// ones where they mean the same.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Invalid(String),
    /// Wrong secret, wrong email, or a key that is not valid: one answer
    /// for all, so a caller never learns which part was wrong.
    #[error("the API key or email is not valid")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the API key's rate limit is exceeded")]
    RateLimited,
    #[error("too many failed attempts from this address; try again in {0} s")]
    TooManyFailedAttempts(u64),
    #[error("{0}")]
    Unavailable(String),
}

impl ExchangeError {
    /// The stable wire error string.
    pub fn error(&self) -> &'static str {
        match self {
            ExchangeError::Invalid(_) => "invalid_request",
            ExchangeError::Unauthenticated => "invalid_api_key",
            ExchangeError::Forbidden(_) => "insufficient_scope",
            ExchangeError::RateLimited => "rate_limited",
            ExchangeError::TooManyFailedAttempts(_) => "too_many_failed_attempts",
            ExchangeError::Unavailable(_) => "unavailable",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ExchangeError::Invalid(_) => 400,
            ExchangeError::Unauthenticated => 401,
            ExchangeError::Forbidden(_) => 403,
            ExchangeError::RateLimited | ExchangeError::TooManyFailedAttempts(_) => 429,
            ExchangeError::Unavailable(_) => 503,
        }
    }
}

/// Exchanges a key for a token.
pub async fn exchange(
    auth: &Authenticator,
    tokens: &Arc<Tokens>,
    req: &ExchangeRequest<'_>,
) -> Result<Issued, ExchangeError> {
    let mut problems = Vec::new();
    if req.secret.trim().is_empty() {
        problems.push("secret is required: the API key".to_string());
    }
    if req.secret.len() > MAX_SECRET {
        problems.push(format!("secret is longer than {MAX_SECRET} bytes"));
    }
    if req.email.len() > MAX_EMAIL || req.email.chars().any(char::is_control) {
        problems.push(format!("email must be at most {MAX_EMAIL} characters, without control characters"));
    }
    if req.scopes.len() > MAX_SCOPES || req.scopes.iter().any(|s| s.len() > 128) {
        problems.push(format!("at most {MAX_SCOPES} scopes of at most 128 bytes"));
    }
    if !problems.is_empty() {
        return Err(ExchangeError::Invalid(problems.join("; ")));
    }
    let (key, granted) = auth.authenticate_exchange(req.secret, req.email, req.peer).await.map_err(|e| match e {
        AuthError::Unauthenticated(_) => ExchangeError::Unauthenticated,
        AuthError::PermissionDenied(why) => ExchangeError::Forbidden(why),
        AuthError::RateLimited => ExchangeError::RateLimited,
        AuthError::TooManyFailedAttempts(s) => ExchangeError::TooManyFailedAttempts(s),
        AuthError::Unavailable(_) => ExchangeError::Unavailable("the key store did not answer in time".into()),
    })?;
    // The owner's email was checked by the engine, with the secret.
    let record = &key.record;
    // The key's effective scopes: its own and its tiers'.
    let scopes = if req.scopes.is_empty() {
        granted
    } else {
        for s in req.scopes {
            if !crate::scope::all_granted(&granted, [s.as_str()], auth.allow_star_scope()) {
                return Err(ExchangeError::Forbidden("a requested scope is not granted to the key"));
            }
        }
        req.scopes.to_vec()
    };
    let settings = tokens.settings();
    let ttl = match req.ttl_seconds {
        0 => settings.ttl,
        s => Duration::from_secs(s as u64).min(settings.max_ttl),
    };
    let issued =
        tokens.issue(record.key_id, &record.tenant, record.env.as_str(), scopes, ttl).await.map_err(|e| match e {
            crate::store::StoreError::Corrupt(why) => ExchangeError::Invalid(why),
            _ => ExchangeError::Unavailable("the signing keys could not be read; try again".into()),
        })?;
    tracing::debug!(key_id = %record.key_id, expires_in = issued.expires_in, "token issued");
    Ok(issued)
}
