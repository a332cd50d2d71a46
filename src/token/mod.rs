//! Short-lived tokens exchanged for an API key (README, "Token exchange").
//!
//! - [`Tokens`]: signs tokens (EdDSA, `kid` in the header) with the newest
//!   signing key, verifies them (signature, `iss`, `exp` with a leeway on
//!   the injectable clock) with any published key, and remembers verified
//!   tokens so a repeated token costs a hash and a cache lookup. A token
//!   says which key it was exchanged for; what it may do is decided by that
//!   key's record on every Verify, so revoking the key kills its tokens.
//! - [`signing`]: key pairs, sealed in the store under the pepper or read
//!   from files; the JWKS.
//! - [`exchange`]: the exchange itself, behind both front ends.

pub mod exchange;
pub mod signing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::key::{KeyId, PepperSet};
use crate::store::{KeyStore, StoreError};
use signing::SigningPair;

/// How tokens are made and checked. `Debug` leaves the key files out.
#[derive(Clone)]
pub struct TokenSettings {
    /// `iss` of every token, and the only one accepted.
    pub issuer: String,
    /// Lifetime when the caller asks for none.
    pub ttl: Duration,
    /// Longest lifetime a caller may ask for.
    pub max_ttl: Duration,
    /// Clock difference tolerated on `exp`.
    pub leeway: Duration,
    /// Signing keys from files (PKCS#8 PEM text); the first signs. Empty:
    /// keys are generated per deployment and kept in the store.
    pub key_pems: Vec<String>,
    /// Verified tokens remembered.
    pub cache_entries: u64,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSettings")
            .field("issuer", &self.issuer)
            .field("ttl", &self.ttl)
            .field("max_ttl", &self.max_ttl)
            .field("leeway", &self.leeway)
            .field("key_files", &self.key_pems.len())
            .finish_non_exhaustive()
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: "keystile".into(),
            ttl: Duration::from_secs(15 * 60),
            max_ttl: Duration::from_secs(60 * 60),
            leeway: Duration::from_secs(30),
            key_pems: Vec::new(),
            cache_entries: 100_000,
        }
    }
}

/// Signing keys kept in the store at once; `signing-keys rotate` drops the
/// oldest beyond this.
pub const KEEP_SIGNING_KEYS: usize = 3;
/// A key generated or rotated in signs only after this long, so that every
/// replica has loaded it (they reload this often) before a token it signed
/// reaches them.
pub const PUBLISH_BEFORE_SIGNING: Duration = Duration::from_secs(60);
/// Longest a token may be (bytes); anything longer is malformed.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The key_id of the key it was exchanged for.
    pub sub: String,
    #[serde(default)]
    pub tenant: String,
    pub env: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// A token whose signature, issuer and form were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub key_id: KeyId,
    pub env: String,
    /// Shared with every verdict that names them (no copy per Verify).
    pub scopes: Arc<[String]>,
    pub exp: i64,
}

/// Why a token was refused (never which part of a signature failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("not a token of this deployment")]
    Invalid,
    #[error("the token has expired")]
    Expired,
}

/// A token just issued.
#[derive(Clone)]
pub struct Issued {
    pub token: crate::secret::Secret,
    pub expires_in: u32,
}

pub struct Tokens {
    settings: TokenSettings,
    peppers: PepperSet,
    store: Arc<dyn KeyStore>,
    /// Oldest first; the newest one old enough signs.
    keys: RwLock<Arc<Vec<SigningPair>>>,
    from_files: bool,
    /// Verified tokens by their BLAKE3 hash (the token itself is a
    /// credential and is not kept).
    verified: moka::sync::Cache<[u8; 32], Arc<VerifiedToken>>,
    /// Monotonic nanos of the last reload from the store.
    last_reload: AtomicU64,
    clock: Clock,
}

/// Whether `s` has the shape of a JWS (three base64url parts, a JSON
/// header): what sends a credential down the token path.
pub fn looks_like_token(s: &str) -> bool {
    // An API key is told apart by its first byte (visible ASCII, neither
    // a token's `e` nor a `Bearer`'s `B`), before any trimming.
    match s.as_bytes().first() {
        None => return false,
        Some(b) if b.is_ascii_graphic() && !matches!(b, b'e' | b'B' | b'b') => return false,
        Some(_) => {}
    }
    let s = s.trim();
    let s = s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer ")).unwrap_or(s).trim();
    // `find` scans with SIMD; a byte loop costs more than the rest of a
    // cached token's check.
    if !s.starts_with("eyJ") {
        return false;
    }
    let Some(first) = s.find('.') else { return false };
    let rest = &s[first + 1..];
    rest.find('.').is_some_and(|second| !rest[second + 1..].contains('.'))
}

impl Tokens {
    /// Tokens with keys from `settings.key_pems`, or (without files) the
    /// store's keys once [`Tokens::reload`] has read them.
    pub fn new(
        settings: TokenSettings,
        peppers: PepperSet,
        store: Arc<dyn KeyStore>,
        clock: Clock,
    ) -> Result<Tokens, String> {
        let mut keys = Vec::new();
        for (i, pem) in settings.key_pems.iter().enumerate() {
            keys.push(SigningPair::from_pem(pem).map_err(|e| format!("signing key file {}: {e}", i + 1))?);
        }
        // The first file signs: keep it last, where the signer is taken.
        keys.reverse();
        let from_files = !keys.is_empty();
        Ok(Tokens {
            verified: moka::sync::Cache::builder()
                .max_capacity(settings.cache_entries)
                .time_to_live(settings.max_ttl + settings.leeway)
                .build(),
            settings,
            peppers,
            store,
            keys: RwLock::new(Arc::new(keys)),
            from_files,
            last_reload: AtomicU64::new(0),
            clock,
        })
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }

    fn keys(&self) -> Arc<Vec<SigningPair>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the store's signing keys (a no-op with keys from files).
    /// Keys that cannot be opened are skipped and named in the error.
    pub async fn reload(&self) -> Result<(), String> {
        if self.from_files {
            return Ok(());
        }
        self.last_reload.store(self.clock.mono_nanos().max(1), Ordering::Relaxed);
        let stored = self.store.signing_keys().await.map_err(|e| e.to_string())?;
        let mut keys = Vec::with_capacity(stored.len());
        let mut problems = Vec::new();
        for s in &stored {
            match SigningPair::unseal(s, &self.peppers) {
                Ok(pair) => keys.push(pair),
                Err(e) => problems.push(e),
            }
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// A signing key: the newest published for long enough, or, when none
    /// is, the oldest; generated and stored when the deployment has none.
    async fn signer(&self) -> Result<SigningPair, StoreError> {
        let now = self.clock.unix_seconds();
        let pick = |keys: &[SigningPair]| {
            let settled = now - PUBLISH_BEFORE_SIGNING.as_secs() as i64;
            // None published long enough (a new deployment): the one
            // published first.
            keys.iter().rev().find(|k| k.created_at <= settled).or(keys.first()).cloned()
        };
        if let Some(k) = pick(&self.keys()) {
            return Ok(k);
        }
        // None loaded: read the store again (another replica may have made
        // one). Generate only when it holds none at all: keys it holds but
        // this sidecar cannot open (another pepper) are an error, not a
        // reason to add one.
        let stored = self.store.signing_keys().await?;
        if !stored.is_empty() {
            let _ = self.reload().await;
            return pick(&self.keys()).ok_or_else(|| {
                StoreError::Corrupt("no signing key in the store can be opened with this sidecar's peppers".into())
            });
        }
        let fresh = SigningPair::generate(now);
        // Never pruned here: replicas generating at once all keep theirs.
        self.store.add_signing_key(&fresh.seal(self.peppers.current()), usize::MAX).await?;
        tracing::info!(kid = %fresh.kid, "token signing key generated");
        let _ = self.reload().await;
        Ok(pick(&self.keys()).unwrap_or(fresh))
    }

    /// Signs a token for `claims` (`iss`, `iat`, `exp`, `jti` are set here).
    pub async fn issue(
        &self,
        key_id: KeyId,
        tenant: &str,
        env: &str,
        scopes: Vec<String>,
        ttl: Duration,
    ) -> Result<Issued, StoreError> {
        let signer = self.signer().await?;
        let now = self.clock.unix_seconds();
        let ttl = ttl.min(self.settings.max_ttl).max(Duration::from_secs(1));
        let mut jti = [0u8; 12];
        getrandom::fill(&mut jti).expect("the OS CSPRNG is unavailable");
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: key_id.to_string(),
            tenant: tenant.to_string(),
            env: env.to_string(),
            scopes,
            iat: now,
            exp: now + ttl.as_secs() as i64,
            jti: base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, jti),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(signer.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, signer.encoding())
            .map_err(|e| StoreError::Unavailable(format!("signing failed: {e}")))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(StoreError::Corrupt(format!(
                "the token would be longer than {MAX_TOKEN_BYTES} bytes (too many scopes): ask for fewer"
            )));
        }
        Ok(Issued { token: crate::secret::Secret::new(token), expires_in: ttl.as_secs() as u32 })
    }

    /// Checks a token: form, `kid` among the published keys, EdDSA
    /// signature, `iss`, `exp` (with the leeway). Never reads the store:
    /// an unknown `kid` asks for a reload in the background, at most once
    /// a second.
    pub fn verify(self: &Arc<Self>, token: &str) -> Result<Arc<VerifiedToken>, TokenRejection> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").or_else(|| token.strip_prefix("bearer ")).unwrap_or(token).trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenRejection::Invalid);
        }
        let digest = *blake3::hash(token.as_bytes()).as_bytes();
        let now = self.clock.unix_seconds();
        if let Some(hit) = self.verified.get(&digest) {
            return self.fresh(hit, now);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Invalid)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenRejection::Invalid);
        }
        let kid = header.kid.ok_or(TokenRejection::Invalid)?;
        let keys = self.keys();
        let Some(pair) = keys.iter().find(|k| k.kid == kid) else {
            self.reload_soon();
            return Err(TokenRejection::Invalid);
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.settings.issuer]);
        // `exp` is checked below on the injectable clock.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "iss", "sub"].iter().map(|s| s.to_string()).collect();
        let data =
            jsonwebtoken::decode::<Claims>(token, pair.decoding(), &validation).map_err(|_| TokenRejection::Invalid)?;
        let claims = data.claims;
        let key_id: KeyId = claims.sub.parse().map_err(|_| TokenRejection::Invalid)?;
        let verified =
            Arc::new(VerifiedToken { key_id, env: claims.env, scopes: claims.scopes.into(), exp: claims.exp });
        let fresh = self.fresh(verified.clone(), now)?;
        self.verified.insert(digest, verified);
        Ok(fresh)
    }

    fn fresh(&self, t: Arc<VerifiedToken>, now: i64) -> Result<Arc<VerifiedToken>, TokenRejection> {
        if t.exp + self.settings.leeway.as_secs() as i64 <= now { Err(TokenRejection::Expired) } else { Ok(t) }
    }

    fn reload_soon(self: &Arc<Self>) {
        if self.from_files {
            return;
        }
        let now = self.clock.mono_nanos();
        let last = self.last_reload.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1_000_000_000
            || self.last_reload.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn(async move {
                if let Err(e) = me.reload().await {
                    tracing::warn!(error = %e, "reloading token signing keys failed");
                }
            });
        }
    }

    /// The published keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys().iter().rev().map(SigningPair::jwk).collect::<Vec<_>>() })
    }

    /// The published keys, newest first (for `signing-keys list`).
    pub fn published(&self) -> Vec<(String, i64)> {
        self.keys().iter().rev().map(|k| (k.kid.clone(), k.created_at)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_told_from_keys_by_shape() {
        assert!(looks_like_token("eyJh.eyJi.c2ln"));
        assert!(looks_like_token("Bearer eyJh.eyJi.c2ln"));
        assert!(looks_like_token("eyJh.eyJi."), "alg none has an empty signature, and is refused later");
        for not in ["ks_live_abcdEFGH_xyz", "eyJh.eyJi", "eyJh.eyJi.c2ln.more", "abc.def.ghi", ""] {
            assert!(!looks_like_token(not), "{not}");
        }
    }
}
