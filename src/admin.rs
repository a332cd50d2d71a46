//! Key lifecycle (README, "Admin API and CLI"): create, read, list,
//! update, revoke, rotate and delete, with the validation of every field.
//! Callers are authenticated before they get here (`auth`). No gRPC types
//! here; `service::admin` converts at the edge and `service::status` maps
//! [`AdminError`] to a status.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

pub use crate::auth::ADMIN_SCOPE;
use crate::clock::Clock;
use crate::engine::EngineSettings;
use crate::engine::source::RecordSource;
use crate::key::{Env, FullKey, KeyFormat, KeyId, KeyKind, PepperSet, generate_kind};
use crate::limit::named::{self, LimitSpec};
use crate::limit::{Limiter, RateLimitPolicy};
use crate::store::{AuditEvent, AuditQuery, TenantPolicy};
use crate::store::{KeyRecord, KeyStore, ListPage, ListQuery, StoreError};
/// Default grace window of a rotation.
pub const DEFAULT_GRACE_SECONDS: u64 = 3600;
/// Longest grace window of a rotation (30 days).
pub const MAX_GRACE_SECONDS: u64 = 30 * 86_400;

const MAX_NAME: usize = 200;
const MAX_TENANT: usize = 128;
const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;
const MAX_CIDRS: usize = 64;
const MAX_METADATA: usize = 32;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Every problem found, one sentence each.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("no key with key_id {0}")]
    NotFound(KeyId),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the key was changed by someone else at the same time; retry")]
    Conflict,
    /// The store did not answer; the text is its error (never a secret).
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => AdminError::Conflict,
            other => {
                tracing::warn!(error = %other, "store call failed");
                AdminError::Unavailable(other.to_string())
            }
        }
    }
}

/// A new key's attributes, as asked (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub name: String,
    pub env: String,
    pub tenant: String,
    pub scopes: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitPolicy>,
    /// Named limits of this key (override its tenant's of the same name).
    pub limits: Vec<LimitSpec>,
    pub metadata: BTreeMap<String, String>,
    /// Unix seconds; `None` = never.
    pub expires_at: Option<i64>,
    /// An email or external id; empty = none.
    pub owner: String,
    /// Valid for token exchange only, not as a bearer credential.
    pub exchange_only: bool,
    /// Tiers the key holds (README, "Tiers").
    pub tiers: Vec<String>,
    /// Secret (the default), publishable or restricted (README, "Key kinds").
    pub kind: KeyKind,
    /// Publishable keys only: the browser origins it answers for.
    pub allowed_origins: Vec<String>,
}

/// Changes to a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub ip_allowlist: Option<Vec<String>>,
    /// `Some(None)` removes the key's own limit.
    pub rate_limit: Option<Option<RateLimitPolicy>>,
    /// Replaces the key's named limits (`Some(vec![])` removes them).
    pub limits: Option<Vec<LimitSpec>>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// `Some(None)` = never expires.
    pub expires_at: Option<Option<i64>>,
    /// `Some("")` removes the owner.
    pub owner: Option<String>,
    pub exchange_only: Option<bool>,
    /// Replaces the key's tiers (`Some(vec![])` removes them).
    pub tiers: Option<Vec<String>>,
    /// Replaces a publishable key's origin allowlist (`Some(vec![])`
    /// removes it).
    pub allowed_origins: Option<Vec<String>>,
}

impl KeyPatch {
    /// Whether it names no field at all.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.scopes.is_none()
            && self.ip_allowlist.is_none()
            && self.rate_limit.is_none()
            && self.limits.is_none()
            && self.metadata.is_none()
            && self.expires_at.is_none()
            && self.owner.is_none()
            && self.exchange_only.is_none()
            && self.tiers.is_none()
            && self.allowed_origins.is_none()
    }
}

/// Where a key stands at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    /// Rotated: valid until its `revoked_at`.
    Rotating,
    Expired,
    Revoked,
    /// Disabled until enabled again.
    Disabled,
}

pub fn state_at(record: &KeyRecord, now: i64) -> KeyState {
    if record.is_revoked_at(now) {
        KeyState::Revoked
    } else if record.is_expired_at(now) {
        KeyState::Expired
    } else if record.disabled {
        KeyState::Disabled
    } else if record.revoked_at.is_some() {
        KeyState::Rotating
    } else {
        KeyState::Active
    }
}

/// A freshly minted key: the full key (shown once) and its record.
#[derive(Debug)]
pub struct Minted {
    pub key: FullKey,
    pub record: KeyRecord,
}

/// The admin scopes, strongest first (README, "Admin API and CLI"):
/// everything; key reads and mutations; key reads.
pub const ADMIN_SCOPES: [&str; 3] = [ADMIN_SCOPE, "keys:write", "keys:read"];

/// Who acts through KeyAdmin, and so what it may manage: an admin key bound
/// to a tenant manages that tenant's keys only, a `test` admin key `test`
/// keys only, a `keys:read` key reads only, and only a `keystile:admin`
/// key grants admin scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The acting admin key; `None` for keystile itself (the dev key,
    /// `keys bootstrap`).
    pub key_id: Option<KeyId>,
    /// `Some`: that tenant's keys only.
    pub tenant: Option<String>,
    /// Manages `test` keys only.
    pub test_only: bool,
    pub can_write: bool,
    pub can_grant_admin: bool,
    /// The admin's transport address, for the audit trail.
    pub peer: Option<std::net::IpAddr>,
}

impl Actor {
    /// keystile itself: every key, every right.
    pub fn deployment() -> Actor {
        Actor { key_id: None, tenant: None, test_only: false, can_write: true, can_grant_admin: true, peer: None }
    }

    /// The rights of an admin key's record; `None` when it holds no admin
    /// scope at all.
    pub fn of_key(record: &KeyRecord, allow_star: bool) -> Option<Actor> {
        let holds = |scope: &str| record.scopes.iter().any(|g| crate::scope::grants(g, scope, allow_star));
        if !ADMIN_SCOPES.iter().any(|s| holds(s)) {
            return None;
        }
        Some(Actor {
            key_id: Some(record.key_id),
            tenant: (!record.tenant.is_empty()).then(|| record.tenant.to_string()),
            test_only: record.env == Env::Test,
            can_write: holds(ADMIN_SCOPE) || holds("keys:write"),
            can_grant_admin: holds(ADMIN_SCOPE),
            peer: None,
        })
    }

    fn write(&self) -> Result<(), AdminError> {
        if self.can_write {
            Ok(())
        } else {
            Err(AdminError::PermissionDenied("this admin key may only read keys (keys:read)".into()))
        }
    }

    /// Refuses a key this actor may not manage.
    fn manages(&self, record: &KeyRecord) -> Result<(), AdminError> {
        if let Some(t) = &self.tenant
            && record.tenant != t
        {
            return Err(AdminError::PermissionDenied(format!(
                "key {} is not of tenant {t:?}, the only tenant this admin key manages",
                record.key_id
            )));
        }
        if self.test_only && record.env != Env::Test {
            return Err(AdminError::PermissionDenied(format!(
                "key {} is a live key; a test admin key manages test keys only",
                record.key_id
            )));
        }
        Ok(())
    }

    /// Refuses scopes that would make an admin, unless this actor may.
    fn grants(&self, scopes: &[String], allow_star: bool) -> Result<(), AdminError> {
        let admin = scopes.iter().find(|g| ADMIN_SCOPES.iter().any(|s| crate::scope::grants(g, s, allow_star)));
        match admin {
            Some(g) if !self.can_grant_admin => Err(AdminError::PermissionDenied(format!(
                "scope {g:?} makes an admin key: only a key with keystile:admin may grant it"
            ))),
            _ => Ok(()),
        }
    }
}

/// What key lifecycle needs, and nothing more.
pub struct Admin {
    store: Arc<dyn KeyStore>,
    /// This sidecar's cache, told at once of its own changes (the change
    /// feed tells the others).
    records: Arc<RecordSource>,
    /// Told when a key is deleted, so that its bucket goes with it.
    limiter: Arc<dyn Limiter>,
    format: KeyFormat,
    peppers: PepperSet,
    allow_star_scope: bool,
    clock: Clock,
}

impl Admin {
    /// Mints keys in the engine's key format, sealed with its current pepper.
    pub fn new(
        store: Arc<dyn KeyStore>,
        records: Arc<RecordSource>,
        limiter: Arc<dyn Limiter>,
        engine: &EngineSettings,
        clock: Clock,
    ) -> Admin {
        let (format, peppers) = (engine.format.clone(), engine.peppers.clone());
        Admin { store, records, limiter, format, peppers, allow_star_scope: engine.allow_star_scope, clock }
    }

    fn now(&self) -> i64 {
        self.clock.unix_seconds()
    }

    pub async fn create(&self, mut spec: KeySpec, actor: &Actor) -> Result<Minted, AdminError> {
        actor.write()?;
        if let Some(t) = &actor.tenant {
            if spec.tenant.is_empty() {
                spec.tenant = t.clone();
            } else if &spec.tenant != t {
                return Err(AdminError::PermissionDenied(format!(
                    "this admin key manages tenant {t:?}'s keys only, not {:?}'s",
                    spec.tenant
                )));
            }
        }
        if actor.test_only && spec.env != Env::Test.to_string() {
            return Err(AdminError::PermissionDenied("a test admin key creates test keys only".into()));
        }
        actor.grants(&spec.scopes, self.allow_star_scope)?;
        let now = self.now();
        let mut problems = Vec::new();
        let env = match spec.env.parse::<Env>() {
            Ok(e) if self.format.accepts_env(e) => Some(e),
            Ok(e) => {
                problems.push(format!("env {e} is not accepted by this deployment"));
                None
            }
            Err(_) if spec.env.is_empty() => {
                problems.push("env is required: \"live\" or \"test\"".to_string());
                None
            }
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let name = check_name(&spec.name, &mut problems);
        check_tenant(&spec.tenant, &mut problems);
        let scopes = check_scopes(&spec.scopes, self.allow_star_scope, &mut problems);
        let ip_allowlist = check_cidrs(&spec.ip_allowlist, &mut problems);
        if let Some(p) = &spec.rate_limit {
            problems.extend(p.problems());
        }
        problems.extend(named::list_problems(&spec.limits));
        check_tier_names(&spec.tiers, &mut problems);
        let allowed_origins = crate::origin::check(&spec.allowed_origins, &mut problems);
        check_kind(spec.kind, &scopes, &spec.tiers, &allowed_origins, spec.exchange_only, &mut problems);
        check_metadata(&spec.metadata, &mut problems);
        if let Some(at) = spec.expires_at
            && at <= now
        {
            problems.push("expires_at must be in the future".to_string());
        }
        let Some(env) = env.filter(|_| problems.is_empty()) else {
            return Err(AdminError::Invalid(problems));
        };
        let owner = check_owner(&spec.owner, &mut problems);
        let fields = RecordFields {
            name,
            owner,
            tenant: spec.tenant,
            scopes,
            ip_allowlist,
            rate_limit: spec.rate_limit,
            limits: spec.limits,
            metadata: spec.metadata,
            expires_at: spec.expires_at,
            exchange_only: spec.exchange_only,
            tiers: spec.tiers,
            kind: spec.kind,
            allowed_origins,
        };
        let minted = self.mint(env, fields, now).await?;
        self.audit(actor, "create", Some(&minted.record), &[]).await;
        Ok(minted)
    }

    async fn mint(&self, env: Env, fields: RecordFields, now: i64) -> Result<Minted, AdminError> {
        let format = &self.format;
        // A key_id collision is astronomically unlikely (62^8); retry anyway.
        for _ in 0..3 {
            let new = generate_kind(format, env, fields.kind);
            let presented = format.parse(new.key.expose()).expect("a generated key parses");
            let secret_hash = self.peppers.seal_kind(new.key_id, fields.kind, presented.secret());
            let record = KeyRecord {
                key_id: new.key_id,
                prefix: format.prefix_for(fields.kind).into(),
                secret_hash,
                kind: fields.kind,
                allowed_origins: fields.allowed_origins.clone(),
                name: fields.name.as_str().into(),
                env,
                tenant: fields.tenant.as_str().into(),
                scopes: fields.scopes.clone(),
                ip_allowlist: fields.ip_allowlist.clone(),
                rate_limit: fields.rate_limit,
                limits: fields.limits.clone(),
                metadata: fields.metadata.clone(),
                owner: fields.owner.clone(),
                disabled: false,
                exchange_only: fields.exchange_only,
                tiers: fields.tiers.clone(),
                created_at: now,
                expires_at: fields.expires_at,
                revoked_at: None,
                last_used_at: None,
                usage: Vec::new(),
                version: 1,
            };
            match self.store.create(&record).await {
                Ok(()) => {
                    self.records.invalidate(record.key_id);
                    tracing::info!(key_id = %record.key_id, env = %env, "key created");
                    return Ok(Minted { key: new.key, record });
                }
                Err(StoreError::AlreadyExists) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AdminError::Unavailable("no free key_id after three tries".into()))
    }

    pub async fn get(&self, id: &str, actor: &Actor) -> Result<KeyRecord, AdminError> {
        let id = parse_id(id)?;
        let mut record = self.store.get(id).await?.ok_or(AdminError::NotFound(id))?;
        actor.manages(&record)?;
        record.last_used_at = self.store.last_used(id).await?;
        // Usage is a convenience: a key is still shown when it cannot be read.
        record.usage = match crate::engine::usage::last_day(self.store.as_ref(), id, self.now()).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(key_id = %id, error = %e, "could not read a key's usage counts");
                Vec::new()
            }
        };
        Ok(record)
    }

    pub async fn list(
        &self,
        tenant: &str,
        env: &str,
        page_size: usize,
        page_token: &str,
        owner: &str,
        actor: &Actor,
    ) -> Result<ListPage, AdminError> {
        // A tenant admin lists its tenant, a test admin test keys.
        let tenant = match &actor.tenant {
            Some(t) if tenant.is_empty() || tenant == t => t.as_str(),
            Some(t) => {
                return Err(AdminError::PermissionDenied(format!(
                    "this admin key lists tenant {t:?}'s keys only, not {tenant:?}'s"
                )));
            }
            None => tenant,
        };
        let env = match (actor.test_only, env) {
            (true, "" | "test") => "test",
            (true, other) => {
                return Err(AdminError::PermissionDenied(format!(
                    "a test admin key lists test keys only, not {other:?}"
                )));
            }
            (false, env) => env,
        };
        let mut problems = Vec::new();
        let env = if env.is_empty() { None } else { env.parse::<Env>().map_err(|e| problems.push(e)).ok() };
        if page_size > MAX_PAGE_SIZE {
            problems.push(format!("page_size must be at most {MAX_PAGE_SIZE}"));
        }
        if !page_token.is_empty() && !valid_page_token(page_token) {
            problems.push("page_token is not one this server handed out".to_string());
        }
        check_tenant(tenant, &mut problems);
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems));
        }
        let query = ListQuery {
            tenant: (!tenant.is_empty()).then(|| tenant.to_string()),
            owner: (!owner.trim().is_empty()).then(|| owner.trim().to_string()),
            env,
            after: (!page_token.is_empty()).then(|| page_token.to_string()),
            limit: if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size },
        };
        Ok(self.store.list(&query).await?)
    }

    /// Applies `patch`. A patch that names no field changes nothing (and
    /// bumps no version): the key is returned as it is.
    pub async fn update(&self, id: &str, patch: KeyPatch, actor: &Actor) -> Result<KeyRecord, AdminError> {
        let id = parse_id(id)?;
        if patch.is_empty() {
            return self.get(id.as_str(), actor).await;
        }
        actor.write()?;
        if let Some(scopes) = &patch.scopes {
            actor.grants(scopes, self.allow_star_scope)?;
        }
        let mut problems = Vec::new();
        let name = patch.name.as_deref().map(|n| check_name(n, &mut problems));
        let scopes = patch.scopes.as_deref().map(|s| check_scopes(s, self.allow_star_scope, &mut problems));
        let cidrs = patch.ip_allowlist.as_deref().map(|c| check_cidrs(c, &mut problems));
        let owner = patch.owner.as_deref().map(|o| check_owner(o, &mut problems));
        if let Some(Some(p)) = &patch.rate_limit {
            problems.extend(p.problems());
        }
        if let Some(l) = &patch.limits {
            problems.extend(named::list_problems(l));
        }
        if let Some(t) = &patch.tiers {
            check_tier_names(t, &mut problems);
        }
        let origins = patch.allowed_origins.as_deref().map(|o| crate::origin::check(o, &mut problems));
        if let Some(m) = &patch.metadata {
            check_metadata(m, &mut problems);
        }
        if let Some(Some(at)) = patch.expires_at
            && at <= self.now()
        {
            problems.push("expires_at must be in the future".to_string());
        }
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems));
        }
        // The audit names the fields changed, never their values.
        let changed: Vec<String> = [
            ("name", patch.name.is_some()),
            ("scopes", patch.scopes.is_some()),
            ("ip_allowlist", patch.ip_allowlist.is_some()),
            ("rate_limit", patch.rate_limit.is_some()),
            ("limits", patch.limits.is_some()),
            ("metadata", patch.metadata.is_some()),
            ("expires_at", patch.expires_at.is_some()),
            ("owner", patch.owner.is_some()),
            ("exchange_only", patch.exchange_only.is_some()),
            ("tiers", patch.tiers.is_some()),
            ("allowed_origins", patch.allowed_origins.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(f, _)| f.to_string())
        .collect();
        let updated = self
            .mutate(id, actor, |r, now| {
                if r.is_revoked_at(now) {
                    return Err(AdminError::FailedPrecondition(format!(
                        "key {} is revoked and cannot be changed",
                        r.key_id
                    )));
                }
                if let Some(n) = &name {
                    r.name = n.as_str().into();
                }
                if let Some(s) = &scopes {
                    r.scopes = s.clone();
                }
                if let Some(c) = &cidrs {
                    r.ip_allowlist = c.clone();
                }
                if let Some(l) = patch.rate_limit {
                    r.rate_limit = l;
                }
                if let Some(l) = &patch.limits {
                    r.limits = l.clone();
                }
                if let Some(m) = &patch.metadata {
                    r.metadata = m.clone();
                }
                if let Some(e) = patch.expires_at {
                    r.expires_at = e;
                }
                if let Some(x) = patch.exchange_only {
                    r.exchange_only = x;
                }
                if let Some(t) = &patch.tiers {
                    r.tiers = t.clone();
                }
                if let Some(o) = &owner {
                    r.owner = o.clone();
                }
                if let Some(o) = &origins {
                    r.allowed_origins = o.clone();
                }
                // The kind's rules hold for the key as it now stands.
                let mut problems = Vec::new();
                check_kind(r.kind, &r.scopes, &r.tiers, &r.allowed_origins, r.exchange_only, &mut problems);
                if !problems.is_empty() {
                    return Err(AdminError::Invalid(problems));
                }
                Ok(())
            })
            .await
            .inspect(|r| tracing::info!(key_id = %r.key_id, version = r.version, "key updated"))?;
        self.audit(actor, "update", Some(&updated), &changed).await;
        Ok(updated)
    }

    /// Revokes at once. Revoking a revoked key changes nothing.
    pub async fn revoke(&self, id: &str, actor: &Actor) -> Result<KeyRecord, AdminError> {
        self.set_state(id, actor, "key revoked", |r, now| {
            if r.is_revoked_at(now) {
                return Ok(false);
            }
            r.revoked_at = Some(now);
            Ok(true)
        })
        .await
    }

    /// Applies `change`, which says `Ok(false)` when the key is already so:
    /// then nothing is written and the key is returned as it is. Logs
    /// `done` after a write.
    async fn set_state(
        &self,
        id: &str,
        actor: &Actor,
        done: &'static str,
        change: impl Fn(&mut KeyRecord, i64) -> Result<bool, AdminError>,
    ) -> Result<KeyRecord, AdminError> {
        let id = parse_id(id)?;
        actor.write()?;
        // An empty FailedPrecondition stands for "already so", inside here.
        let record = self
            .mutate(id, actor, |r, now| {
                if change(r, now)? { Ok(()) } else { Err(AdminError::FailedPrecondition(String::new())) }
            })
            .await;
        match record {
            Err(AdminError::FailedPrecondition(s)) if s.is_empty() => self.get(id.as_str(), actor).await,
            other => {
                if let Ok(r) = &other {
                    tracing::info!(key_id = %id, "{done}");
                    let action = match done {
                        "key revoked" => "revoke",
                        "key disabled" => "disable",
                        _ => "enable",
                    };
                    self.audit(actor, action, Some(r), &[]).await;
                }
                other
            }
        }
    }

    /// Mints a new key with the same attributes; the old one stays valid for
    /// `grace_seconds`, then counts as revoked.
    pub async fn rotate(
        &self,
        id: &str,
        grace_seconds: Option<u64>,
        actor: &Actor,
    ) -> Result<(Minted, KeyRecord), AdminError> {
        let id = parse_id(id)?;
        actor.write()?;
        let grace = grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
        if grace > MAX_GRACE_SECONDS {
            return Err(AdminError::Invalid(vec![format!(
                "grace_seconds must be at most {MAX_GRACE_SECONDS} (30 days)"
            )]));
        }
        let old = self.store.get(id).await?.ok_or(AdminError::NotFound(id))?;
        actor.manages(&old)?;
        let now = self.now();
        if old.is_revoked_at(now) {
            return Err(AdminError::FailedPrecondition(format!("key {id} is revoked and cannot be rotated")));
        }
        if old.is_expired_at(now) {
            return Err(AdminError::FailedPrecondition(format!("key {id} has expired and cannot be rotated")));
        }
        let fields = RecordFields {
            name: old.name.to_string(),
            owner: old.owner.clone(),
            tenant: old.tenant.to_string(),
            scopes: old.scopes.clone(),
            ip_allowlist: old.ip_allowlist.clone(),
            rate_limit: old.rate_limit,
            limits: old.limits.clone(),
            metadata: old.metadata.clone(),
            expires_at: old.expires_at,
            exchange_only: old.exchange_only,
            tiers: old.tiers.clone(),
            kind: old.kind,
            allowed_origins: old.allowed_origins.clone(),
        };
        let minted = self.mint(old.env, fields, now).await?;
        let end = now.saturating_add(grace as i64);
        let previous = match self
            .mutate(id, actor, |r, _| {
                r.revoked_at = Some(r.revoked_at.map_or(end, |t| t.min(end)));
                Ok(())
            })
            .await
        {
            Ok(previous) => previous,
            Err(e) => {
                // The new key was never handed out: do not leave it behind.
                if let Err(cleanup) = self.store.delete(minted.record.key_id).await {
                    tracing::warn!(key_id = %minted.record.key_id, error = %cleanup, "could not remove the key of a failed rotation");
                }
                self.records.invalidate(minted.record.key_id);
                return Err(e);
            }
        };
        tracing::info!(key_id = %id, new_key_id = %minted.record.key_id, grace_seconds = grace, "key rotated");
        let new = format!("new_key_id={}", minted.record.key_id);
        self.audit(actor, "rotate", Some(&previous), &[new, format!("grace_seconds={grace}")]).await;
        Ok((minted, previous))
    }

    /// Disables (`true`) or enables a key. A revoked key stays revoked;
    /// setting what is already set changes nothing.
    pub async fn set_disabled(&self, id: &str, disabled: bool, actor: &Actor) -> Result<KeyRecord, AdminError> {
        let done = if disabled { "key disabled" } else { "key enabled" };
        self.set_state(id, actor, done, |r, now| {
            if r.is_revoked_at(now) {
                return Err(AdminError::FailedPrecondition(format!(
                    "key {} is revoked, and revocation is final",
                    r.key_id
                )));
            }
            if r.disabled == disabled {
                return Ok(false);
            }
            r.disabled = disabled;
            Ok(true)
        })
        .await
    }

    /// Removes a key for good; afterwards it is `NOT_FOUND`, not `REVOKED`.
    pub async fn delete(&self, id: &str, actor: &Actor) -> Result<(), AdminError> {
        let id = parse_id(id)?;
        actor.write()?;
        let existing = self.store.get(id).await?;
        if let Some(record) = &existing {
            actor.manages(record)?;
        }
        let removed = self.store.delete(id).await?;
        self.records.invalidate(id);
        self.limiter.forget_key(id);
        if !removed {
            return Err(AdminError::NotFound(id));
        }
        tracing::info!(key_id = %id, "key deleted");
        self.audit(actor, "delete", existing.as_ref(), &[]).await;
        Ok(())
    }

    /// Records a mutation of `record` (README, "Audit"). A store that
    /// cannot take it does not undo the mutation: it is logged instead.
    async fn audit(&self, actor: &Actor, action: &str, record: Option<&KeyRecord>, fields: &[String]) {
        let event = AuditEvent {
            at: self.now(),
            actor: actor.key_id.map_or("keystile".to_string(), |k| k.to_string()),
            peer: actor.peer.map(|p| p.to_string()).unwrap_or_default(),
            action: action.to_string(),
            key_id: record.map(|r| r.key_id.to_string()).unwrap_or_default(),
            tenant: record.map(|r| r.tenant.to_string()).unwrap_or_default(),
            env: record.map(|r| r.env.to_string()).unwrap_or_default(),
            fields: fields.to_vec(),
            ..AuditEvent::default()
        };
        self.keep(event).await;
    }

    async fn audit_tenant(&self, actor: &Actor, action: &str, tenant: &str, fields: &[String]) {
        let event = AuditEvent {
            at: self.now(),
            actor: actor.key_id.map_or("keystile".to_string(), |k| k.to_string()),
            peer: actor.peer.map(|p| p.to_string()).unwrap_or_default(),
            action: action.to_string(),
            tenant: tenant.to_string(),
            fields: fields.to_vec(),
            ..AuditEvent::default()
        };
        self.keep(event).await;
    }

    async fn keep(&self, event: AuditEvent) {
        if let Err(e) = self.store.append_audit(&event).await {
            tracing::warn!(error = %e, action = %event.action, key_id = %event.key_id, "could not keep the audit event");
        }
    }

    /// Audit events, newest first, within what `actor` may see: a tenant's
    /// admin its tenant's, a test admin test keys'.
    pub async fn audit_events(
        &self,
        mut query: AuditQuery,
        actor: &Actor,
    ) -> Result<(Vec<AuditEvent>, Option<String>), AdminError> {
        if let Some(t) = &actor.tenant {
            match &query.tenant {
                Some(asked) if asked != t => {
                    return Err(AdminError::PermissionDenied(format!(
                        "this admin key sees tenant {t:?}'s events only, not {asked:?}'s"
                    )));
                }
                _ => query.tenant = Some(t.clone()),
            }
        }
        if actor.test_only {
            query.env = Some("test".into());
        }
        query.limit = query.limit.clamp(1, 1000);
        Ok(self.store.list_audit(&query).await?)
    }

    /// A tenant's policy (README, "Rate limits"); an empty one when it has
    /// none. Any admin of the tenant (or of the deployment) may read it.
    pub async fn tenant_policy(&self, tenant: &str, actor: &Actor) -> Result<TenantPolicy, AdminError> {
        self.may_see_tenant(tenant, actor)?;
        Ok(self
            .store
            .tenant_policy(tenant)
            .await?
            .unwrap_or_else(|| TenantPolicy { tenant: tenant.to_string(), ..TenantPolicy::default() }))
    }

    /// Replaces a tenant's limits (none = no policy). Only a live admin
    /// with write rights, of the deployment or of this tenant: the policy
    /// applies to live keys too.
    pub async fn set_tenant_policy(
        &self,
        tenant: &str,
        limits: Vec<LimitSpec>,
        actor: &Actor,
    ) -> Result<TenantPolicy, AdminError> {
        actor.write()?;
        self.may_see_tenant(tenant, actor)?;
        if actor.test_only {
            return Err(AdminError::PermissionDenied(
                "a test admin key cannot change a tenant's limits: they apply to live keys too".into(),
            ));
        }
        let problems = named::list_problems(&limits);
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems));
        }
        let mut policy = self.store.tenant_policy(tenant).await?.unwrap_or_default();
        policy.tenant = tenant.to_string();
        policy.limits = limits;
        policy.updated_at = self.now();
        self.store.set_tenant_policy(&policy).await?;
        self.records.apply(&crate::store::FeedEvent::TenantChanged(tenant.to_string()));
        tracing::info!(tenant, limits = policy.limits.len(), "tenant policy set");
        let names: Vec<String> = policy.limits.iter().map(|l| l.to_string()).collect();
        self.audit_tenant(actor, "set_tenant_policy", tenant, &names).await;
        Ok(policy)
    }

    /// Sets tier `name` of `tenant` ("" = deployment-wide) to `scopes`;
    /// no scopes removes it. Every key holding it sees the change on its
    /// next Verify, on every sidecar (README, "Tiers").
    pub async fn set_tier(
        &self,
        tenant: &str,
        name: &str,
        scopes: Vec<String>,
        actor: &Actor,
    ) -> Result<(String, Vec<String>), AdminError> {
        actor.write()?;
        if tenant.is_empty() {
            if actor.tenant.is_some() || actor.test_only {
                return Err(AdminError::PermissionDenied(
                    "deployment-wide tiers are set by a live admin key without a tenant".into(),
                ));
            }
        } else {
            self.may_see_tenant(tenant, actor)?;
            if actor.test_only {
                return Err(AdminError::PermissionDenied("a test admin key cannot change tiers".into()));
            }
        }
        let mut problems = Vec::new();
        check_tier_names(&[name.to_string()], &mut problems);
        let scopes = check_scopes(&scopes, self.allow_star_scope, &mut problems);
        if let Some(s) = scopes.iter().find(|s| ADMIN_SCOPES.iter().any(|a| crate::scope::grants(s, a, true))) {
            problems.push(format!("scope {s:?} grants admin rights and cannot be in a tier"));
        }
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems));
        }
        let mut policy = self.store.tenant_policy(tenant).await?.unwrap_or_default();
        policy.tenant = tenant.to_string();
        if scopes.is_empty() {
            policy.tiers.remove(name);
        } else {
            if !policy.tiers.contains_key(name) && policy.tiers.len() >= MAX_TIERS {
                return Err(AdminError::Invalid(vec![format!("at most {MAX_TIERS} tiers per tenant")]));
            }
            policy.tiers.insert(name.to_string(), scopes.clone());
        }
        policy.updated_at = self.now();
        self.store.set_tenant_policy(&policy).await?;
        self.records.apply(&crate::store::FeedEvent::TenantChanged(tenant.to_string()));
        tracing::info!(tenant, tier = name, scopes = scopes.len(), "tier set");
        self.audit_tenant(actor, "set_tier", tenant, &[format!("{name}={}", scopes.join(","))]).await;
        Ok((name.to_string(), scopes))
    }

    /// The tiers of `tenant` and the deployment's, as (tenant, name, scopes).
    pub async fn list_tiers(
        &self,
        tenant: &str,
        actor: &Actor,
    ) -> Result<Vec<(String, String, Vec<String>)>, AdminError> {
        if !tenant.is_empty() {
            self.may_see_tenant(tenant, actor)?;
        }
        let mut out = Vec::new();
        let mut tenants = vec![""];
        if !tenant.is_empty() {
            tenants.insert(0, tenant);
        }
        for t in tenants {
            if let Some(p) = self.store.tenant_policy(t).await? {
                out.extend(p.tiers.into_iter().map(|(name, scopes)| (t.to_string(), name, scopes)));
            }
        }
        Ok(out)
    }

    fn may_see_tenant(&self, tenant: &str, actor: &Actor) -> Result<(), AdminError> {
        let mut problems = Vec::new();
        if tenant.is_empty() {
            problems.push("tenant is required".to_string());
        }
        check_tenant(tenant, &mut problems);
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems));
        }
        match &actor.tenant {
            Some(t) if t != tenant => {
                Err(AdminError::PermissionDenied(format!("this admin key manages tenant {t:?} only, not {tenant:?}")))
            }
            _ => Ok(()),
        }
    }

    /// Read, change, write with the version as a fence; retries a few times
    /// when another writer got there first.
    async fn mutate(
        &self,
        id: KeyId,
        actor: &Actor,
        change: impl Fn(&mut KeyRecord, i64) -> Result<(), AdminError>,
    ) -> Result<KeyRecord, AdminError> {
        for _ in 0..5 {
            let mut record = self.store.get(id).await?.ok_or(AdminError::NotFound(id))?;
            actor.manages(&record)?;
            let expected = record.version;
            change(&mut record, self.now())?;
            record.version = expected + 1;
            match self.store.update(&record, expected).await {
                Ok(()) => {
                    self.records.invalidate(id);
                    record.last_used_at = self.store.last_used(id).await.unwrap_or(None);
                    return Ok(record);
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::NotFound) => return Err(AdminError::NotFound(id)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(AdminError::Conflict)
    }
}

struct RecordFields {
    name: String,
    owner: String,
    tenant: String,
    scopes: Vec<String>,
    ip_allowlist: Vec<IpNet>,
    rate_limit: Option<RateLimitPolicy>,
    limits: Vec<LimitSpec>,
    metadata: BTreeMap<String, String>,
    expires_at: Option<i64>,
    exchange_only: bool,
    tiers: Vec<String>,
    kind: KeyKind,
    allowed_origins: Vec<String>,
}

/// What each kind of key may hold (README, "Key kinds"): a publishable key
/// only `public:` scopes and no tiers, nor exchange; a restricted key an
/// explicit list of scopes, no patterns and no tiers; origins belong to
/// publishable keys.
fn check_kind(
    kind: KeyKind,
    scopes: &[String],
    tiers: &[String],
    origins: &[String],
    exchange_only: bool,
    problems: &mut Vec<String>,
) {
    match kind {
        KeyKind::Publishable => {
            if let Some(s) = scopes.iter().find(|s| !crate::scope::is_public(s)) {
                problems.push(format!(
                    "a publishable key holds only scopes under \"public:\" (it may be seen by anyone); {s:?} is not"
                ));
            }
            if !tiers.is_empty() {
                problems.push("a publishable key holds no tiers; give it public: scopes".to_string());
            }
            if exchange_only {
                problems.push("a publishable key cannot be exchange-only: it is never exchanged".to_string());
            }
        }
        KeyKind::Restricted => {
            if scopes.is_empty() {
                problems.push("a restricted key needs an explicit list of scopes".to_string());
            }
            if let Some(s) = scopes.iter().find(|s| s.contains('*')) {
                problems.push(format!("a restricted key lists its scopes one by one; {s:?} is a pattern"));
            }
            if !tiers.is_empty() {
                problems.push("a restricted key holds no tiers; list its scopes".to_string());
            }
        }
        KeyKind::Secret => {}
    }
    if kind != KeyKind::Publishable && !origins.is_empty() {
        problems.push("allowed_origins is for publishable keys only".to_string());
    }
}

fn parse_id(id: &str) -> Result<KeyId, AdminError> {
    id.parse::<KeyId>().map_err(|e| AdminError::Invalid(vec![format!("key_id: {e}")]))
}

fn valid_page_token(t: &str) -> bool {
    t.len() == 29
        && t.split_once(':').is_some_and(|(ts, id)| {
            ts.len() == 20 && ts.bytes().all(|c| c.is_ascii_digit()) && id.parse::<KeyId>().is_ok()
        })
}

fn check_name(name: &str, problems: &mut Vec<String>) -> String {
    let name = name.trim();
    if name.is_empty() {
        problems.push("name must not be empty".to_string());
    } else if name.chars().count() > MAX_NAME {
        problems.push(format!("name must be at most {MAX_NAME} characters"));
    } else if name.chars().any(char::is_control) {
        problems.push("name must not contain control characters".to_string());
    }
    name.to_string()
}

/// An owner is an email or an external id: at most 254 characters, no
/// control characters; kept as given, compared without case.
fn check_owner(owner: &str, problems: &mut Vec<String>) -> String {
    let owner = owner.trim();
    if owner.chars().count() > 254 || owner.chars().any(char::is_control) {
        problems.push("owner must be at most 254 characters, without control characters".to_string());
    }
    owner.to_string()
}

/// Most tiers one tenant (or the deployment) defines, and one key holds.
pub const MAX_TIERS: usize = 64;

fn check_tier_names(names: &[String], problems: &mut Vec<String>) {
    if names.len() > 16 {
        problems.push("a key holds at most 16 tiers".to_string());
    }
    for n in names {
        if n.is_empty()
            || n.len() > 32
            || !n.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-".contains(&c))
        {
            problems.push(format!(
                "tier {:?} must be 1 to 32 characters of a-z, 0-9, '_' and '-'",
                n.chars().take(40).collect::<String>()
            ));
        }
    }
}

fn check_tenant(tenant: &str, problems: &mut Vec<String>) {
    if tenant.len() > MAX_TENANT || !tenant.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c)) {
        problems.push(format!("tenant must be at most {MAX_TENANT} characters of [A-Za-z0-9._:-]"));
    }
}

/// Scope syntax: 1–128 characters of `[A-Za-z0-9._:/*-]`. Duplicates are
/// dropped, order is kept.
pub fn check_scopes(scopes: &[String], allow_star: bool, problems: &mut Vec<String>) -> Vec<String> {
    if scopes.len() > MAX_SCOPES {
        problems.push(format!("at most {MAX_SCOPES} scopes"));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for s in scopes {
        if s.is_empty()
            || s.len() > MAX_SCOPE_LEN
            || !s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._:/*-".contains(&c))
        {
            problems.push(format!("scope {s:?} must be 1-{MAX_SCOPE_LEN} characters of [A-Za-z0-9._:/*-]"));
        } else if let Some(why) = crate::scope::pattern_problem(s, allow_star) {
            problems.push(why);
        } else if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// CIDRs or bare addresses (a bare address is its own /32 or /128).
/// IPv4-mapped IPv6 is written as IPv4, as the engine compares it.
fn check_cidrs(cidrs: &[String], problems: &mut Vec<String>) -> Vec<IpNet> {
    if cidrs.len() > MAX_CIDRS {
        problems.push(format!("at most {MAX_CIDRS} ip_allowlist entries"));
    }
    let mut out = Vec::with_capacity(cidrs.len());
    for c in cidrs {
        let t = c.trim();
        let net = t.parse::<IpNet>().or_else(|_| t.parse::<IpAddr>().map(IpNet::from));
        match net {
            Ok(IpNet::V6(v6)) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                let v4 = v6.addr().to_ipv4_mapped().expect("checked");
                out.push(IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix <= 32")).trunc());
            }
            Ok(net) => out.push(net.trunc()),
            Err(_) => {
                problems.push(format!("ip_allowlist entry {c:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"))
            }
        }
    }
    out
}

fn check_metadata(m: &BTreeMap<String, String>, problems: &mut Vec<String>) {
    if m.len() > MAX_METADATA {
        problems.push(format!("at most {MAX_METADATA} metadata entries"));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY {
            problems.push(format!("metadata key {k:?} must be 1-{MAX_METADATA_KEY} bytes"));
        }
        if v.len() > MAX_METADATA_VALUE {
            problems.push(format!("metadata value of {k:?} must be at most {MAX_METADATA_VALUE} bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_accept_bare_addresses_and_map_ipv4_in_ipv6() {
        let mut p = Vec::new();
        let nets = check_cidrs(
            &["10.1.2.3/8".into(), "192.0.2.1".into(), "::ffff:198.51.100.0/120".into(), "2001:db8::/32".into()],
            &mut p,
        );
        assert!(p.is_empty(), "{p:?}");
        let shown: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.0.2.1/32", "198.51.100.0/24", "2001:db8::/32"]);
        check_cidrs(&["10.0.0.0/33".into(), "nope".into()], &mut p);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn scopes_are_checked_and_deduplicated() {
        let mut p = Vec::new();
        assert_eq!(
            check_scopes(&["read".into(), "read".into(), "keystile:admin".into()], false, &mut p),
            ["read", "keystile:admin"]
        );
        check_scopes(&["".into(), "has space".into()], false, &mut p);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn page_tokens_are_checked() {
        assert!(valid_page_token("00000000001700000000:abcdEFGH"));
        assert!(!valid_page_token("garbage"));
    }
}
