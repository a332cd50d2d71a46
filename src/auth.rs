//! Authenticating a presented credential for a purpose (README, "Admin API
//! and CLI"): the credential is an API key, checked by the same engine as
//! every Verify, and must hold the purpose's scope.
//!
//! Failed attempts are counted by the **transport peer address** in a
//! shedder of this module's own, apart from Verify's shedding by the
//! address a caller reports: a flood of bad Verify calls naming
//! `127.0.0.1` cannot lock the operator at 127.0.0.1 out, nor the reverse.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use crate::cache::CachedKey;
use crate::clock::Clock;
use crate::engine::Engine;
use crate::limit::shedder::FailureShedder;
use crate::verdict::{Mode, Outcome, Request, Words};

/// The scope that admits a key to KeyAdmin.
pub const ADMIN_SCOPE: &str = "keystile:admin";

/// What a credential is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// KeyAdmin: the key must hold an admin scope ([`ADMIN_SCOPE`],
    /// `keys:write` or `keys:read`).
    Admin,
}

impl Purpose {
    /// The scope a key needs for this purpose.
    pub fn scope(self) -> &'static str {
        match self {
            Purpose::Admin => ADMIN_SCOPE,
        }
    }
}

/// Who was authenticated: the key, as the engine found it, and what it may
/// do as an admin.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<CachedKey>,
    pub actor: crate::admin::Actor,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("missing or invalid admin key: {0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("the admin key's rate limit is exceeded")]
    RateLimited,
    #[error("too many failed attempts from this address; try again in {0} s")]
    TooManyFailedAttempts(u64),
    /// The store (or a shared limiter) did not answer; the text says which.
    #[error("{0}")]
    Unavailable(String),
}

pub struct Authenticator {
    engine: Arc<Engine>,
    allow_star_scope: bool,
    /// Failed attempts by transport peer address.
    shedder: Option<FailureShedder>,
}

impl Authenticator {
    /// `failed_attempts_per_minute` failures from one peer address before it
    /// is shed; `None` never sheds.
    pub fn new(
        engine: Arc<Engine>,
        failed_attempts_per_minute: Option<NonZeroU32>,
        allow_star_scope: bool,
        clock: Clock,
    ) -> Authenticator {
        Authenticator {
            engine,
            allow_star_scope,
            shedder: failed_attempts_per_minute.map(|n| FailureShedder::new(n, clock)),
        }
    }

    /// Checks that `credential` (the `authorization` value, `Bearer `
    /// allowed) is a valid key holding `purpose`'s scope, presented from
    /// `peer`. The key's own IP allowlist and rate limit apply.
    pub async fn authenticate(
        &self,
        credential: Option<&str>,
        purpose: Purpose,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let Some(key) = credential else {
            return Err(AuthError::Unauthenticated("send `authorization: Bearer <admin key>`"));
        };
        // Any admin scope admits (keys:read reads only); the engine checks
        // the rest: state, IP allowlist, the key's own rate limit.
        let request = Request { ip: peer, mode: Mode::Admin, ..Request::of_key(key) };
        let verdict =
            self.valid(&request, "the key lacks the keystile:admin scope", "the key is not a valid admin key").await?;
        let key = verdict.key.expect("a valid verdict names its key");
        let actor = match purpose {
            Purpose::Admin => crate::admin::Actor::of_key(&key.record, self.allow_star_scope),
        };
        match actor {
            Some(actor) => Ok(Principal { key, actor }),
            None => Err(AuthError::PermissionDenied(
                "the key holds no admin scope (keystile:admin, keys:write or keys:read)",
            )),
        }
    }

    /// Checks that `secret` is a valid key holding `token:exchange`
    /// (exchange-only keys included, tokens not), presented from `peer`
    /// with its owner's `email` when the owner is one; returns the key and
    /// its effective scopes (its tiers' included). The key's IP allowlist
    /// and its automatic rate limits apply.
    pub async fn authenticate_exchange(
        &self,
        secret: &str,
        email: &str,
        peer: Option<IpAddr>,
    ) -> Result<(Arc<CachedKey>, Vec<String>), AuthError> {
        let scopes = [crate::token::exchange::EXCHANGE_SCOPE.to_string()];
        let request = Request {
            ip: peer,
            scopes: Words::Owned(&scopes),
            mode: Mode::Exchange,
            owner_email: email,
            ..Request::of_key(secret)
        };
        let verdict = self.valid(&request, "the key lacks the token:exchange scope", "the key is not valid").await?;
        let granted = verdict.granted_scopes().to_vec();
        Ok((verdict.key.expect("a valid verdict names its key"), granted))
    }

    /// The engine's verdict on `request`, failures counted by peer; any
    /// verdict but VALID as the error a credential gets (`no_scope` when it
    /// lacks the purpose's scope, `invalid` when it is no valid key).
    async fn valid(
        &self,
        request: &Request<'_>,
        no_scope: &'static str,
        invalid: &'static str,
    ) -> Result<crate::verdict::Verdict, AuthError> {
        let verdict = self
            .engine
            .verify_with(request, self.shedder.as_ref())
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        match verdict.outcome {
            Outcome::Valid => Ok(verdict),
            Outcome::InsufficientScope => Err(AuthError::PermissionDenied(no_scope)),
            Outcome::IpNotAllowed | Outcome::TenantMismatch | Outcome::OriginNotAllowed => {
                Err(AuthError::PermissionDenied("the key may not be used from this address"))
            }
            Outcome::RateLimited => Err(AuthError::RateLimited),
            Outcome::TooManyFailedAttempts => Err(AuthError::TooManyFailedAttempts(
                verdict.rate.map_or(60, |r| r.state.retry_after_ms.div_ceil(1000).max(1)),
            )),
            Outcome::Malformed
            | Outcome::NotFound
            | Outcome::Revoked
            | Outcome::Expired
            | Outcome::Disabled
            | Outcome::ExchangeOnly => Err(AuthError::Unauthenticated(invalid)),
        }
    }

    pub fn allow_star_scope(&self) -> bool {
        self.allow_star_scope
    }

    /// Periodic housekeeping: forget peers that stopped failing.
    pub fn purge(&self) {
        if let Some(s) = &self.shedder {
            s.purge();
        }
    }
}
