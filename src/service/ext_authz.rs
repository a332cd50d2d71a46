//! `envoy.service.auth.v3.Authorization/Check` (`--ext-authz`; README,
//! "Protect an API without code"): Envoy's and Istio's external
//! authorization, over [`crate::proxy::Gate`]. Converts Envoy's
//! `CheckRequest` into a [`ProxyRequest`] and the decision into a
//! `CheckResponse`; a store that cannot answer is the gRPC status
//! `UNAVAILABLE` (Envoy's `status_on_error` then answers the client),
//! never an allow.
//!
//! The answer is Envoy's own `CheckResponse` (envoy-types). The request is
//! read through [`wire::CheckRequest`], wire compatible with Envoy's but
//! holding only the fields keystile reads, as slices of the received
//! buffer: Envoy's type decodes every header into a `HashMap<String,
//! String>` and a dozen fields never used, which cost more than the whole
//! verification (BENCHMARKS.md, "Proxy front ends").

use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::{Request, Response, Status};

use crate::proxy::{Decision, Gate, Overrides, ProxyRequest, RequestHeaders};

/// Largest CheckRequest accepted by default: it carries every header of
/// the original request.
pub const DEFAULT_MAX_CHECK_BYTES: usize = 64 * 1024;

/// The `context_extensions` keys that override the route table.
pub const TENANT_EXTENSION: &str = "keystile.tenant";
pub const SCOPES_EXTENSION: &str = "keystile.scopes";
pub const LIMITS_EXTENSION: &str = "keystile.limits";

/// The gRPC service name Envoy calls.
pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The fields of Envoy's `envoy.service.auth.v3.CheckRequest` keystile
/// reads, with Envoy's field numbers; the rest is skipped unread. Text is
/// kept as bytes (the same wire type as a string), sliced from the
/// received buffer without a copy, and checked as UTF-8 where it is read.
pub mod wire {
    use prost::bytes::Bytes;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<Request>,
        /// A `map<string, string>`: on the wire, repeated entries.
        #[prost(message, repeated, tag = "10")]
        pub context_extensions: Vec<Entry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
    }

    /// `envoy.config.core.v3.Address`: only its `socket_address` (1).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(bytes = "bytes", tag = "2")]
        pub address: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(bytes = "bytes", tag = "2")]
        pub method: Bytes,
        /// A `map<string, string>` with lower-case names.
        #[prost(message, repeated, tag = "3")]
        pub headers: Vec<Entry>,
        #[prost(bytes = "bytes", tag = "4")]
        pub path: Bytes,
        #[prost(bytes = "bytes", tag = "5")]
        pub host: Bytes,
        /// Set instead of `headers` when Envoy sends raw header values.
        #[prost(message, optional, tag = "13")]
        pub header_map: Option<HeaderMap>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(bytes = "bytes", tag = "1")]
        pub key: Bytes,
        #[prost(bytes = "bytes", tag = "2")]
        pub value: Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderMap {
        #[prost(message, repeated, tag = "1")]
        pub headers: Vec<HeaderValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(bytes = "bytes", tag = "1")]
        pub key: Bytes,
        #[prost(bytes = "bytes", tag = "2")]
        pub value: Bytes,
        #[prost(bytes = "bytes", tag = "3")]
        pub raw_value: Bytes,
    }
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

pub struct ExtAuthzService {
    gate: Arc<Gate>,
}

impl ExtAuthzService {
    pub fn new(gate: Arc<Gate>) -> ExtAuthzService {
        ExtAuthzService { gate }
    }

    pub fn into_server(self, max_request_bytes: usize) -> ExtAuthzServer {
        ExtAuthzServer { inner: Arc::new(self), max_request_bytes }
    }
}

/// Envoy's headers: the `headers` entries (lower-case names) and the
/// `header_map` ones.
struct CheckHeaders<'a> {
    map: &'a [wire::Entry],
    raw: &'a [wire::HeaderValue],
}

impl RequestHeaders for CheckHeaders<'_> {
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s str> {
        let from_map = self
            .map
            .iter()
            .filter(move |e| e.key.eq_ignore_ascii_case(name.as_bytes()))
            .filter_map(|e| std::str::from_utf8(&e.value).ok());
        let from_raw = self.raw.iter().filter(move |h| h.key.eq_ignore_ascii_case(name.as_bytes())).filter_map(|h| {
            // raw_value is bytes; only UTF-8 values can be credentials.
            std::str::from_utf8(if h.value.is_empty() { &h.raw_value } else { &h.value }).ok()
        });
        from_map.chain(from_raw)
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.map.iter().map(|e| text(&e.key)).chain(self.raw.iter().map(|h| text(&h.key)))
    }
}

fn set(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: name.to_string(), value, raw_value: Vec::new() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string(s: String) -> Value {
    Value { kind: Some(Kind::StringValue(s)) }
}

impl ExtAuthzService {
    /// Answers one Check. Public for the in-process benches.
    pub async fn check(&self, check: wire::CheckRequest) -> Result<CheckResponse, Status> {
        let attributes = check.attributes.unwrap_or_default();
        let Some(http) = attributes.request.as_ref().and_then(|r| r.http.as_ref()) else {
            return Err(Status::invalid_argument("CheckRequest has no attributes.request.http"));
        };
        let peer = attributes
            .source
            .as_ref()
            .and_then(|p| p.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
            .and_then(|s| crate::verdict::parse_ip(text(&s.address)));
        let raw: &[wire::HeaderValue] = http.header_map.as_ref().map_or(&[], |m| &m.headers);
        let headers = CheckHeaders { map: &http.headers, raw };
        let extension = |name: &str| {
            attributes.context_extensions.iter().find(|e| e.key == name.as_bytes()).map(|e| text(&e.value))
        };
        let host = match text(&http.host) {
            "" => headers.values(":authority").next().unwrap_or(""),
            h => h,
        };
        let req = ProxyRequest {
            method: text(&http.method),
            host,
            path: text(&http.path),
            headers: &headers,
            peer,
            // Envoy wrote the X-Forwarded-For it sends.
            peer_is_proxy: true,
            overrides: Overrides {
                tenant: extension(TENANT_EXTENSION),
                scopes: extension(SCOPES_EXTENSION),
                limits: extension(LIMITS_EXTENSION),
            },
        };
        let decision = match self.gate.check(&req).await {
            Ok(d) => d,
            Err(deny) => return Err(Status::unavailable(deny.body)),
        };
        let response = match decision {
            Decision::Allow(allow) => {
                let metadata = Struct {
                    fields: [
                        ("key_id".to_string(), string(allow.key_id)),
                        ("tenant".to_string(), string(allow.tenant)),
                        ("env".to_string(), string(allow.env)),
                    ]
                    .into_iter()
                    .collect(),
                };
                CheckResponse {
                    status: Some(rpc::Status { code: tonic::Code::Ok as i32, ..Default::default() }),
                    dynamic_metadata: Some(metadata),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: allow.upstream.into_iter().map(|(n, v)| set(n, v)).collect(),
                        headers_to_remove: allow.remove_upstream,
                        response_headers_to_add: allow.response.into_iter().map(|(n, v)| set(n, v)).collect(),
                        query_parameters_to_remove: allow.remove_query,
                        ..Default::default()
                    })),
                }
            }
            Decision::Deny(deny) => {
                let code = match deny.status {
                    400 => tonic::Code::InvalidArgument,
                    401 => tonic::Code::Unauthenticated,
                    429 => tonic::Code::ResourceExhausted,
                    _ => tonic::Code::PermissionDenied,
                };
                CheckResponse {
                    status: Some(rpc::Status {
                        code: code as i32,
                        message: deny.code.to_string(),
                        details: Vec::new(),
                    }),
                    dynamic_metadata: None,
                    http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                        status: Some(HttpStatus { code: deny.status as i32 }),
                        headers: deny.headers.into_iter().map(|(n, v)| set(n, v)).collect(),
                        body: deny.body,
                    })),
                }
            }
        };
        Ok(response)
    }
}

/// The tonic service for `envoy.service.auth.v3.Authorization`, written
/// out as tonic's generated servers are, with [`wire::CheckRequest`] as
/// the request type.
#[derive(Clone)]
pub struct ExtAuthzServer {
    inner: Arc<ExtAuthzService>,
    max_request_bytes: usize,
}

impl tonic::server::NamedService for ExtAuthzServer {
    const NAME: &'static str = SERVICE_NAME;
}

struct CheckCall(Arc<ExtAuthzService>);

impl tonic::server::UnaryService<wire::CheckRequest> for CheckCall {
    type Response = CheckResponse;
    type Future = BoxFuture<Response<CheckResponse>, Status>;

    fn call(&mut self, request: Request<wire::CheckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.check(request.into_inner()).await.map(Response::new) })
    }
}

impl<B> Service<http::Request<B>> for ExtAuthzServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let (inner, max) = (self.inner.clone(), self.max_request_bytes);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<CheckResponse, wire::CheckRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(CheckCall(inner), req).await)
        })
    }
}
