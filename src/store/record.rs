//! The stored form of a key (README, "Storage, cache and revocation"). Holds a keyed hash of the secret,
//! never the secret; its `Debug` redacts even that.

use std::collections::BTreeMap;

use compact_str::CompactString;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::key::{Env, KeyId, KeyKind, SecretHash};
use crate::limit::{LimitSpec, RateLimitPolicy};

/// One key, as the store holds it. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: KeyId,
    /// The prefix the key was minted with, for its display prefix.
    pub prefix: CompactString,
    pub secret_hash: SecretHash,
    /// Secret, publishable or restricted (README, "Key kinds"); a presented
    /// key's prefix must say the same.
    #[serde(default, skip_serializing_if = "KeyKind::is_secret")]
    pub kind: KeyKind,
    pub name: CompactString,
    pub env: Env,
    #[serde(default)]
    pub tenant: CompactString,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub ip_allowlist: Vec<IpNet>,
    /// The limit named `default` (README, "Rate limits"); `limits` may
    /// define more, and a `default` there wins.
    #[serde(default)]
    pub rate_limit: Option<RateLimitPolicy>,
    /// Tiers the key holds: their scopes add to `scopes` (the tenant's tier
    /// of a name, else the deployment's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<String>,
    /// Per-key named limits: override the tenant's of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitSpec>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at: i64,
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Valid for token exchange only, refused by Verify as a bearer
    /// credential (README, "Token exchange").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exchange_only: bool,
    /// When set, the key is revoked from this instant on (a rotated key
    /// carries the end of its grace window here).
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// An email or external id; empty = none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// Publishable keys only: the browser origins (`scheme://host[:port]`,
    /// `https://*.example.com` for subdomains) it answers for; empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Disabled keys answer DISABLED until enabled again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Kept outside the record in the store; filled in on reads.
    #[serde(skip)]
    pub last_used_at: Option<i64>,
    /// Verifications over the last day by code; kept outside the record,
    /// filled in by the admin API's single-key reads only.
    #[serde(skip)]
    pub usage: Vec<UsageCount>,
    pub version: u64,
}

/// How many verifications of a key ended with one code (README, "Usage").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCount {
    /// The verdict code's name, e.g. `VALID`.
    pub code: String,
    pub count: u64,
}

/// A token signing key as the store keeps it (README, "Token exchange"):
/// the public half in the clear, the private half sealed under the pepper
/// (`sealed`: base64 of nonce and ciphertext; never logged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSigningKey {
    pub kid: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The Ed25519 public key, base64url without padding (a JWK's `x`).
    pub public: String,
    pub sealed: String,
    /// The pepper the private half is sealed under.
    pub pepper_id: String,
}

impl std::fmt::Debug for StoredSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("public", &self.public)
            .field("pepper_id", &self.pepper_id)
            .finish_non_exhaustive()
    }
}

/// One admin mutation, as kept for `ListAuditEvents` (README, "Audit"):
/// who, what, when; never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Set by the store (its order: newer events have greater ids).
    #[serde(default, skip_serializing)]
    pub id: String,
    /// Unix seconds.
    pub at: i64,
    /// The acting admin key's id, or `keystile` for the deployment itself.
    pub actor: String,
    /// The admin's transport address, when known.
    #[serde(default)]
    pub peer: String,
    /// `create`, `update`, `revoke`, `rotate`, `disable`, `enable`,
    /// `delete`, `set_tenant_policy`, `set_tier`.
    pub action: String,
    #[serde(default)]
    pub key_id: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub env: String,
    /// What changed: field names, or `name=value` for non-secret values.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// Filters and paging for audit events, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub actor: Option<String>,
    pub env: Option<String>,
    /// Events older than this id.
    pub before: Option<String>,
    pub limit: usize,
}

/// A tenant's named limits (README, "Rate limits"): one per API type,
/// shared or per key as each says.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TenantPolicy {
    /// "" = the deployment's (tiers only).
    pub tenant: String,
    pub limits: Vec<LimitSpec>,
    /// Named scope bundles (README, "Tiers"): tier → scopes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<String, Vec<String>>,
    /// Unix seconds of the last change.
    #[serde(default)]
    pub updated_at: i64,
}

impl KeyRecord {
    /// A live secret key named `name` with nothing else set (unit tests).
    #[cfg(test)]
    pub(crate) fn for_tests(key_id: KeyId, name: &str, version: u64) -> KeyRecord {
        KeyRecord {
            key_id,
            prefix: "ks".into(),
            secret_hash: crate::key::PepperSet::new(crate::key::Pepper::new([7; 32]), vec![]).seal(key_id, b"x"),
            kind: Default::default(),
            name: name.into(),
            env: crate::key::Env::Live,
            tenant: Default::default(),
            scopes: vec![],
            ip_allowlist: vec![],
            rate_limit: None,
            tiers: vec![],
            limits: vec![],
            metadata: Default::default(),
            created_at: 0,
            expires_at: None,
            exchange_only: false,
            revoked_at: None,
            owner: String::new(),
            allowed_origins: vec![],
            disabled: false,
            last_used_at: None,
            usage: vec![],
            version,
        }
    }

    /// Bytes the record holds on the heap (strings, lists, metadata),
    /// as the cache weighs it: lengths rounded up to the allocator's
    /// 16-byte steps, plus each element's inline size.
    pub fn heap_bytes(&self) -> usize {
        fn text(s: &str) -> usize {
            s.len().next_multiple_of(16)
        }
        // Up to 24 bytes are held inline (README, "Memory budget").
        fn compact(s: &CompactString) -> usize {
            if s.is_heap_allocated() { s.capacity().next_multiple_of(16) } else { 0 }
        }
        fn list<T>(v: &[T], each: impl Fn(&T) -> usize) -> usize {
            std::mem::size_of_val(v).next_multiple_of(16) + v.iter().map(each).sum::<usize>()
        }
        compact(&self.prefix)
            + compact(&self.name)
            + compact(&self.tenant)
            + compact(&self.secret_hash.pepper_id)
            + text(&self.owner)
            + list(&self.scopes, |s| text(s))
            + list(&self.ip_allowlist, |_| 0)
            + list(&self.tiers, |s| text(s))
            + list(&self.limits, |_| 0)
            + list(&self.allowed_origins, |s| text(s))
            + list(&self.usage, |u| text(&u.code))
            // A B-tree node per ~11 entries, ~ 550 bytes each.
            + self.metadata.len().div_ceil(11) * 550
            + self.metadata.iter().map(|(k, v)| text(k) + text(v)).sum::<usize>()
    }

    pub fn display_prefix(&self) -> String {
        crate::key::format::display_prefix(&self.prefix, self.env, self.key_id)
    }

    pub fn is_revoked_at(&self, now: i64) -> bool {
        self.revoked_at.is_some_and(|t| t <= now)
    }

    pub fn is_expired_at(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Env {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Env {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for SecretHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for SecretHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretHash::decode(&s).ok_or_else(|| de::Error::custom("malformed secret_hash"))
    }
}
