//! `keystile.v1.Verifier`: converts the request, asks the engine, writes the
//! verdict and its headers into the response and, when asked, its metadata
//! (README, "Verdicts" and "Headers"). It runs on [`UnaryServer`] rather
//! than tonic's generated server, with the answer as a [`VerifyAnswer`]:
//! written straight from the verdict, not built as a message first
//! (README, "Performance").

use std::sync::Arc;

use tonic::codegen::BoxFuture;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use prost::bytes::{Bytes, BytesMut};

use super::unary::{UnaryCodec, UnaryServer};
use super::verify_answer::VerifyAnswer;
use super::verify_request::{RawVerify, VerifyView};

use super::status;
use crate::engine::Engine;
use crate::limit::LimitName;
use crate::limit::named::MAX_REQUESTED;
use crate::proto;
use crate::verdict::{self, Outcome, Verdict, Words};

/// Most scopes one request may ask for.
pub const MAX_SCOPES: usize = 64;
const MAX_SCOPE_LEN: usize = 128;
const MAX_TENANT_LEN: usize = 128;
/// Longest `origin` (a scheme, a DNS name and a port fit well within it).
const MAX_ORIGIN_LEN: usize = 512;
/// Largest rate-limit `cost` of one request.
pub const MAX_COST: u32 = 10_000;

pub struct VerifierService {
    engine: Arc<Engine>,
}

impl VerifierService {
    pub fn new(engine: Arc<Engine>) -> VerifierService {
        VerifierService { engine }
    }

    pub fn into_server(self) -> VerifierServer {
        UnaryServer::new(VERIFY_PATH, super::MAX_REQUEST_BYTES, VerifyCall(Arc::new(self)))
    }
}

pub use crate::verdict::parse_ip;

impl<'a> TryFrom<&'a VerifyView<'_>> for verdict::Request<'a> {
    type Error = Status;

    fn try_from(r: &'a VerifyView<'_>) -> Result<Self, Status> {
        if r.scopes.len() > MAX_SCOPES {
            return Err(status::invalid(format!("at most {MAX_SCOPES} scopes per request")));
        }
        if r.scopes.iter().any(|s| s.len() > MAX_SCOPE_LEN) {
            return Err(status::invalid(format!("a scope is longer than {MAX_SCOPE_LEN} bytes")));
        }
        if r.cost.is_some_and(|c| c > MAX_COST) {
            return Err(status::invalid(format!("cost must be at most {MAX_COST}")));
        }
        if r.limits.len() > MAX_REQUESTED {
            return Err(status::invalid(format!("at most {MAX_REQUESTED} limits per request")));
        }
        if let Some(bad) = r.limits.iter().find_map(|l| l.parse::<LimitName>().err()) {
            return Err(status::invalid(bad));
        }
        if r.origin.len() > MAX_ORIGIN_LEN {
            return Err(status::invalid(format!("origin is longer than {MAX_ORIGIN_LEN} bytes")));
        }
        if r.tenant.len() > MAX_TENANT_LEN {
            return Err(status::invalid(format!("tenant is longer than {MAX_TENANT_LEN} bytes")));
        }
        Ok(verdict::Request {
            key: r.key,
            ip: parse_ip(r.ip),
            scopes: Words::Borrowed(&r.scopes),
            tenant: r.tenant,
            cost: r.cost.unwrap_or(1).max(1),
            limits: Words::Borrowed(&r.limits),
            mode: verdict::Mode::Bearer,
            owner_email: "",
            origin: r.origin,
        })
    }
}

pub(super) fn wire_code(outcome: Outcome) -> proto::Code {
    match outcome {
        Outcome::Valid => proto::Code::Valid,
        Outcome::Malformed => proto::Code::Malformed,
        Outcome::NotFound => proto::Code::NotFound,
        Outcome::Revoked => proto::Code::Revoked,
        Outcome::Expired => proto::Code::Expired,
        Outcome::TenantMismatch => proto::Code::TenantMismatch,
        Outcome::IpNotAllowed => proto::Code::IpNotAllowed,
        Outcome::InsufficientScope => proto::Code::InsufficientScope,
        Outcome::TooManyFailedAttempts | Outcome::RateLimited => proto::Code::RateLimited,
        Outcome::Disabled => proto::Code::Disabled,
        Outcome::ExchangeOnly => proto::Code::ExchangeOnly,
        Outcome::OriginNotAllowed => proto::Code::OriginNotAllowed,
    }
}

/// The headers of an answer as gRPC response metadata, for a request that
/// asked for them (`want_metadata`).
pub fn metadata_of(verdict: &Verdict, now_unix: i64) -> MetadataMap {
    let mut metadata = MetadataMap::with_capacity(7);
    verdict::each_header(verdict, now_unix, |name, value| {
        if let Ok(v) = MetadataValue::try_from(value.to_string()) {
            metadata.insert(MetadataKey::from_static(name), v);
        }
    });
    metadata
}

/// The response message.
pub fn to_response(verdict: &Verdict, now_unix: i64) -> proto::VerifyResponse {
    let headers = verdict::headers(verdict, now_unix);
    let mut resp = proto::VerifyResponse {
        valid: verdict.is_valid(),
        code: wire_code(verdict.outcome) as i32,
        error: verdict.outcome.error().to_string(),
        http_status: verdict.outcome.http_status() as u32,
        message: verdict.outcome.message().to_string(),
        headers: headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        ..Default::default()
    };
    if let Some(k) = &verdict.key {
        let r = &k.record;
        resp.key_id = r.key_id.to_string();
        resp.name = r.name.to_string();
        resp.env = r.env.to_string();
        resp.tenant = r.tenant.to_string();
        resp.scopes = verdict.granted_scopes().to_vec();
        resp.metadata = r.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        resp.expires_at = r.expires_at.unwrap_or(0);
        resp.kind = r.kind.as_str().to_string();
    }
    resp.limits = verdict
        .applied()
        .iter()
        .map(|l| proto::LimitState {
            name: l.name.to_string(),
            limit: l.state.limit,
            remaining: l.state.remaining,
            reset_seconds: l.state.reset_seconds,
            window_seconds: l.state.window_seconds,
            retry_after_ms: l.state.retry_after_ms,
        })
        .collect();
    if let Some(rate) = verdict.rate.as_ref().map(|r| &r.state) {
        resp.rate_limit = Some(proto::RateLimitState {
            limit: rate.limit,
            remaining: rate.remaining,
            reset_seconds: rate.reset_seconds,
            window_seconds: rate.window_seconds,
            retry_after_ms: rate.retry_after_ms,
        });
    }
    resp
}

impl VerifierService {
    async fn verify(&self, request: Request<RawVerify>) -> Result<Response<VerifyAnswer>, Status> {
        let raw = request.into_inner();
        let msg = raw.view(MAX_SCOPES, MAX_REQUESTED).map_err(|_| status::undecodable())?;
        let req = verdict::Request::try_from(&msg)?;
        let verdict = self.engine.verify(&req).await.map_err(|e| status::from_verify(&e))?;
        if crate::telemetry::traces_enabled() {
            tracing::Span::current().record("keystile.code", verdict.outcome.label());
        }
        // The engine's clock read: one per call.
        let now_unix = verdict.decided_at;
        let metadata = msg.want_metadata.then(|| metadata_of(&verdict, now_unix));
        let mut response = Response::new(VerifyAnswer { verdict, now_unix });
        if let Some(metadata) = metadata {
            *response.metadata_mut() = metadata;
        }
        Ok(response)
    }
}

/// The gRPC name of the service.
pub const SERVICE_NAME: &str = "keystile.v1.Verifier";
const VERIFY_PATH: &str = "/keystile.v1.Verifier/Verify";

/// `VerifyRequest` in (read in place by the handler), [`VerifyAnswer`] out.
pub struct VerifyCodec;

impl UnaryCodec for VerifyCodec {
    type Request = RawVerify;
    type Answer = VerifyAnswer;

    fn decode(message: Bytes) -> Result<RawVerify, Status> {
        Ok(RawVerify(message))
    }

    /// An answer with a key, its scopes and three named limits is about
    /// 460 bytes (BENCHMARKS.md, "Verify under h2load, by key profile").
    const ANSWER_BYTES: usize = 512;

    fn write(answer: &VerifyAnswer, buf: &mut BytesMut) {
        answer.write(buf);
    }
}

/// The tonic service for `keystile.v1.Verifier`, with [`VerifyAnswer`] as
/// the response type.
pub type VerifierServer = UnaryServer<VerifyCodec, VerifyCall>;

impl tonic::server::NamedService for VerifierServer {
    const NAME: &'static str = SERVICE_NAME;
}

/// Verify, as the server calls it.
#[derive(Clone)]
pub struct VerifyCall(Arc<VerifierService>);

impl tonic::server::UnaryService<RawVerify> for VerifyCall {
    type Response = VerifyAnswer;
    type Future = BoxFuture<Response<VerifyAnswer>, Status>;

    fn call(&mut self, request: Request<RawVerify>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.verify(request).await })
    }
}
