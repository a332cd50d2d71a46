//! `keystile.v1.KeyAdmin`: authenticates every call with the caller's admin
//! key ([`crate::auth`], by transport peer), converts at the edge and leaves
//! the rest to [`crate::admin::Admin`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::status;
use crate::admin::{self, Actor, Admin, KeyPatch, KeySpec, KeyState};
use crate::auth::{Authenticator, Purpose};
use crate::clock::Clock;
use crate::key::KeyKind;
use crate::limit::named::MAX_LIMITS;
use crate::limit::{LimitFallback, LimitScope, LimitSpec};
use crate::proto;
use crate::store::{KeyRecord, RateLimitPolicy, TenantPolicy};

pub struct AdminService {
    admin: Arc<Admin>,
    auth: Arc<Authenticator>,
    clock: Clock,
}

impl AdminService {
    pub fn new(admin: Arc<Admin>, auth: Arc<Authenticator>, clock: Clock) -> AdminService {
        AdminService { admin, auth, clock }
    }

    pub fn into_server(self) -> proto::key_admin_server::KeyAdminServer<Self> {
        proto::key_admin_server::KeyAdminServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }

    /// Authenticates the caller; the span names the acting admin key, so
    /// that every log line of the call says who did it.
    async fn authorize<T>(&self, request: &Request<T>) -> Result<(tracing::Span, Actor), Status> {
        let bearer = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let ip = super::fairness::peer_ip(request);
        let principal = self.auth.authenticate(bearer, Purpose::Admin, ip).await.map_err(|e| status::from_auth(&e))?;
        let peer = ip.map(|ip| ip.to_string()).unwrap_or_default();
        let span = tracing::info_span!("admin", actor = %principal.key.record.key_id, peer = %peer);
        let mut actor = principal.actor;
        actor.peer = ip;
        Ok((span, actor))
    }

    fn record(&self, r: &KeyRecord) -> proto::KeyRecord {
        to_proto(r, self.clock.unix_seconds())
    }
}

/// A stored record as the API shows it. Never carries the secret hash.
pub fn to_proto(r: &KeyRecord, now: i64) -> proto::KeyRecord {
    let state = match admin::state_at(r, now) {
        KeyState::Active => proto::KeyState::Active,
        KeyState::Rotating => proto::KeyState::Rotating,
        KeyState::Expired => proto::KeyState::Expired,
        KeyState::Revoked => proto::KeyState::Revoked,
        KeyState::Disabled => proto::KeyState::Disabled,
    };
    proto::KeyRecord {
        key_id: r.key_id.to_string(),
        display_prefix: r.display_prefix(),
        name: r.name.to_string(),
        env: r.env.to_string(),
        tenant: r.tenant.to_string(),
        scopes: r.scopes.clone(),
        ip_allowlist: r.ip_allowlist.iter().map(|n| n.to_string()).collect(),
        rate_limit: r.rate_limit.map(|p| proto::RateLimit {
            requests: p.requests,
            window_seconds: p.window_seconds,
            burst: p.burst,
            per_tenant: p.per_tenant,
        }),
        metadata: r.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        created_at: r.created_at,
        expires_at: r.expires_at.unwrap_or(0),
        revoked_at: r.revoked_at.unwrap_or(0),
        last_used_at: r.last_used_at.unwrap_or(0),
        version: r.version,
        state: state as i32,
        owner: r.owner.clone(),
        disabled: r.disabled,
        limits: r.limits.iter().map(limit_to_proto).collect(),
        exchange_only: r.exchange_only,
        tiers: r.tiers.clone(),
        kind: kind_to_proto(r.kind) as i32,
        allowed_origins: r.allowed_origins.clone(),
        usage: r.usage.iter().map(|u| proto::UsageCount { code: u.code.clone(), count: u.count }).collect(),
    }
}

fn kind_to_proto(k: KeyKind) -> proto::KeyKind {
    match k {
        KeyKind::Secret => proto::KeyKind::Secret,
        KeyKind::Publishable => proto::KeyKind::Publishable,
        KeyKind::Restricted => proto::KeyKind::Restricted,
    }
}

fn kind_from_proto(k: i32) -> Result<KeyKind, Status> {
    match proto::KeyKind::try_from(k) {
        Ok(proto::KeyKind::Unspecified | proto::KeyKind::Secret) => Ok(KeyKind::Secret),
        Ok(proto::KeyKind::Publishable) => Ok(KeyKind::Publishable),
        Ok(proto::KeyKind::Restricted) => Ok(KeyKind::Restricted),
        Err(_) => Err(status::invalid(format!("unknown key kind {k}"))),
    }
}

/// A named limit as the API shows it.
pub fn limit_to_proto(l: &LimitSpec) -> proto::LimitSpec {
    proto::LimitSpec {
        name: l.name.to_string(),
        requests: l.requests,
        window_seconds: l.window_seconds,
        burst: l.burst,
        per: match l.per {
            LimitScope::Key => proto::LimitScope::Key,
            LimitScope::Tenant => proto::LimitScope::Tenant,
        } as i32,
        auto_apply: l.auto_apply,
        fallback: match l.fallback {
            LimitFallback::LocalShare => proto::LimitFallback::LocalShare,
            LimitFallback::Open => proto::LimitFallback::Open,
            LimitFallback::Closed => proto::LimitFallback::Closed,
        } as i32,
    }
}

impl TryFrom<proto::LimitSpec> for LimitSpec {
    type Error = Status;

    fn try_from(l: proto::LimitSpec) -> Result<Self, Status> {
        let name = l.name.parse().map_err(status::invalid)?;
        let per = match proto::LimitScope::try_from(l.per) {
            Ok(proto::LimitScope::Unspecified | proto::LimitScope::Key) => LimitScope::Key,
            Ok(proto::LimitScope::Tenant) => LimitScope::Tenant,
            Err(_) => return Err(status::invalid(format!("limit {:?}: unknown per {}", l.name, l.per))),
        };
        let fallback = match proto::LimitFallback::try_from(l.fallback) {
            Ok(proto::LimitFallback::Unspecified | proto::LimitFallback::LocalShare) => LimitFallback::LocalShare,
            Ok(proto::LimitFallback::Open) => LimitFallback::Open,
            Ok(proto::LimitFallback::Closed) => LimitFallback::Closed,
            Err(_) => return Err(status::invalid(format!("limit {:?}: unknown fallback {}", l.name, l.fallback))),
        };
        Ok(LimitSpec {
            name,
            requests: l.requests,
            window_seconds: l.window_seconds,
            burst: l.burst,
            per,
            auto_apply: l.auto_apply,
            fallback,
        })
    }
}

fn limits(list: Vec<proto::LimitSpec>) -> Result<Vec<LimitSpec>, Status> {
    if list.len() > MAX_LIMITS {
        return Err(status::invalid(format!("at most {MAX_LIMITS} limits, not {}", list.len())));
    }
    list.into_iter().map(LimitSpec::try_from).collect()
}

fn tenant_policy_to_proto(p: &TenantPolicy) -> proto::TenantPolicy {
    proto::TenantPolicy {
        tenant: p.tenant.clone(),
        limits: p.limits.iter().map(limit_to_proto).collect(),
        updated_at: p.updated_at,
    }
}

fn policy(p: proto::RateLimit) -> RateLimitPolicy {
    RateLimitPolicy { requests: p.requests, window_seconds: p.window_seconds, burst: p.burst, per_tenant: p.per_tenant }
}

fn expiry(at: i64) -> Result<Option<i64>, Status> {
    match at {
        0 => Ok(None),
        at if at < 0 => Err(status::invalid("expires_at must be unix seconds in the future, or 0 for never")),
        at => Ok(Some(at)),
    }
}

impl TryFrom<proto::CreateKeyRequest> for KeySpec {
    type Error = Status;

    fn try_from(r: proto::CreateKeyRequest) -> Result<Self, Status> {
        Ok(KeySpec {
            name: r.name,
            env: r.env,
            tenant: r.tenant,
            scopes: r.scopes,
            ip_allowlist: r.ip_allowlist,
            rate_limit: r.rate_limit.map(policy),
            limits: limits(r.limits)?,
            metadata: r.metadata.into_iter().collect(),
            expires_at: expiry(r.expires_at)?,
            owner: r.owner,
            exchange_only: r.exchange_only,
            tiers: r.tiers,
            kind: kind_from_proto(r.kind)?,
            allowed_origins: r.allowed_origins,
        })
    }
}

impl TryFrom<proto::UpdateKeyRequest> for KeyPatch {
    type Error = Status;

    fn try_from(r: proto::UpdateKeyRequest) -> Result<Self, Status> {
        if r.clear_rate_limit && r.rate_limit.is_some() {
            return Err(status::invalid("set either rate_limit or clear_rate_limit, not both"));
        }
        if r.clear_limits && !r.limits.is_empty() {
            return Err(status::invalid("set either limits or clear_limits, not both"));
        }
        let named = match (r.clear_limits, r.limits.is_empty()) {
            (true, _) => Some(Vec::new()),
            (false, true) => None,
            (false, false) => Some(limits(r.limits)?),
        };
        Ok(KeyPatch {
            name: r.name,
            scopes: r.scopes.map(|s| s.values),
            ip_allowlist: r.ip_allowlist.map(|s| s.values),
            rate_limit: if r.clear_rate_limit { Some(None) } else { r.rate_limit.map(|p| Some(policy(p))) },
            limits: named,
            metadata: r.metadata.map(|m| m.entries.into_iter().collect()),
            expires_at: r.expires_at.map(expiry).transpose()?,
            owner: r.owner,
            exchange_only: r.exchange_only,
            tiers: match (r.clear_tiers, r.tiers.is_empty()) {
                (true, true) => Some(Vec::new()),
                (true, false) => return Err(status::invalid("set either tiers or clear_tiers, not both")),
                (false, true) => None,
                (false, false) => Some(r.tiers),
            },
            allowed_origins: r.allowed_origins.map(|s| s.values),
        })
    }
}

#[tonic::async_trait]
impl proto::key_admin_server::KeyAdmin for AdminService {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::CreateKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let spec = KeySpec::try_from(request.into_inner())?;
        let minted = self.admin.create(spec, &actor).instrument(span).await.map_err(|e| status::from_admin(&e))?;
        let record = Some(self.record(&minted.record));
        Ok(Response::new(proto::CreateKeyResponse { key: minted.key.into_exposed(), record }))
    }

    async fn get_key(&self, request: Request<proto::GetKeyRequest>) -> Result<Response<proto::GetKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let r = self
            .admin
            .get(&request.get_ref().key_id, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::GetKeyResponse { record: Some(self.record(&r)) }))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let q = request.get_ref();
        let page = self
            .admin
            .list(&q.tenant, &q.env, q.page_size as usize, &q.page_token, &q.owner, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::ListKeysResponse {
            records: page.records.iter().map(|r| self.record(r)).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::UpdateKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let msg = request.into_inner();
        let id = msg.key_id.clone();
        let patch = KeyPatch::try_from(msg)?;
        let r = self.admin.update(&id, patch, &actor).instrument(span).await.map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::UpdateKeyResponse { record: Some(self.record(&r)) }))
    }

    async fn revoke_key(
        &self,
        request: Request<proto::RevokeKeyRequest>,
    ) -> Result<Response<proto::RevokeKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let r = self
            .admin
            .revoke(&request.get_ref().key_id, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::RevokeKeyResponse { record: Some(self.record(&r)) }))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let q = request.get_ref();
        let (minted, previous) = self
            .admin
            .rotate(&q.key_id, q.grace_seconds, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::RotateKeyResponse {
            record: Some(self.record(&minted.record)),
            key: minted.key.into_exposed(),
            previous: Some(self.record(&previous)),
        }))
    }

    async fn delete_key(
        &self,
        request: Request<proto::DeleteKeyRequest>,
    ) -> Result<Response<proto::DeleteKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        self.admin
            .delete(&request.get_ref().key_id, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::DeleteKeyResponse {}))
    }

    async fn disable_key(
        &self,
        request: Request<proto::DisableKeyRequest>,
    ) -> Result<Response<proto::DisableKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let r = self
            .admin
            .set_disabled(&request.get_ref().key_id, true, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::DisableKeyResponse { record: Some(self.record(&r)) }))
    }

    async fn enable_key(
        &self,
        request: Request<proto::EnableKeyRequest>,
    ) -> Result<Response<proto::EnableKeyResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let r = self
            .admin
            .set_disabled(&request.get_ref().key_id, false, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::EnableKeyResponse { record: Some(self.record(&r)) }))
    }

    async fn set_tenant_policy(
        &self,
        request: Request<proto::SetTenantPolicyRequest>,
    ) -> Result<Response<proto::TenantPolicy>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let msg = request.into_inner();
        let list = limits(msg.limits)?;
        let p = self
            .admin
            .set_tenant_policy(&msg.tenant, list, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(tenant_policy_to_proto(&p)))
    }

    async fn get_tenant_policy(
        &self,
        request: Request<proto::GetTenantPolicyRequest>,
    ) -> Result<Response<proto::TenantPolicy>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let p = self
            .admin
            .tenant_policy(&request.get_ref().tenant, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(tenant_policy_to_proto(&p)))
    }

    async fn set_tier(&self, request: Request<proto::SetTierRequest>) -> Result<Response<proto::Tier>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let msg = request.into_inner();
        if msg.scopes.len() > 64 {
            return Err(status::invalid("at most 64 scopes per tier"));
        }
        let (name, scopes) = self
            .admin
            .set_tier(&msg.tenant, &msg.name, msg.scopes, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::Tier { tenant: msg.tenant, name, scopes }))
    }

    async fn list_tiers(
        &self,
        request: Request<proto::ListTiersRequest>,
    ) -> Result<Response<proto::ListTiersResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let tiers = self
            .admin
            .list_tiers(&request.get_ref().tenant, &actor)
            .instrument(span)
            .await
            .map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::ListTiersResponse {
            tiers: tiers.into_iter().map(|(tenant, name, scopes)| proto::Tier { tenant, name, scopes }).collect(),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        let (span, actor) = self.authorize(&request).await?;
        let q = request.into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        if q.page_token.len() > 64 {
            return Err(status::invalid("page_token is not one this server gave"));
        }
        let query = crate::store::AuditQuery {
            tenant: some(q.tenant),
            key_id: some(q.key_id),
            actor: some(q.actor),
            env: None,
            before: some(q.page_token),
            limit: if q.page_size == 0 { 100 } else { q.page_size as usize },
        };
        let (events, next) =
            self.admin.audit_events(query, &actor).instrument(span).await.map_err(|e| status::from_admin(&e))?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| proto::AuditEvent {
                    id: e.id,
                    at: e.at,
                    actor: e.actor,
                    peer: e.peer,
                    action: e.action,
                    key_id: e.key_id,
                    tenant: e.tenant,
                    env: e.env,
                    fields: e.fields,
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}
