//! `envoy.service.auth.v3.Authorization/Check` (`--ext-authz`; README,
//! "Protect an API without code"): Envoy's and Istio's external
//! authorization, over [`crate::proxy::Gate`]. Converts Envoy's
//! `CheckRequest` into a [`ProxyRequest`] and the decision into a
//! `CheckResponse`; a store that cannot answer is the gRPC status
//! `UNAVAILABLE` (Envoy's `status_on_error` then answers the client),
//! never an allow.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::proxy::{Decision, Gate, Overrides, ProxyRequest, RequestHeaders};

/// Largest CheckRequest accepted by default: it carries every header of
/// the original request.
pub const DEFAULT_MAX_CHECK_BYTES: usize = 64 * 1024;

/// The `context_extensions` keys that override the route table.
pub const TENANT_EXTENSION: &str = "keystile.tenant";
pub const SCOPES_EXTENSION: &str = "keystile.scopes";
pub const LIMITS_EXTENSION: &str = "keystile.limits";

pub struct ExtAuthzService {
    gate: Arc<Gate>,
}

impl ExtAuthzService {
    pub fn new(gate: Arc<Gate>) -> ExtAuthzService {
        ExtAuthzService { gate }
    }

    pub fn into_server(self, max_request_bytes: usize) -> AuthorizationServer<ExtAuthzService> {
        AuthorizationServer::new(self).max_decoding_message_size(max_request_bytes)
    }
}

/// Envoy's headers: the `headers` map (lower-case keys), or `header_map`
/// when Envoy sends raw headers.
struct CheckHeaders<'a> {
    map: &'a HashMap<String, String>,
    raw: &'a [HeaderValue],
}

impl RequestHeaders for CheckHeaders<'_> {
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s str> {
        // Envoy writes header names in lower case: one lookup, and a scan
        // without case only for a map written by someone else.
        let exact = self.map.get(name).map(String::as_str);
        let other_case = exact.is_none() && self.map.keys().any(|k| k.bytes().any(|c| c.is_ascii_uppercase()));
        let from_map = exact.into_iter().chain(
            self.map.iter().filter(move |(k, _)| other_case && k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()),
        );
        let from_raw = self.raw.iter().filter(move |h| h.key.eq_ignore_ascii_case(name)).filter_map(|h| {
            // raw_value is bytes; only UTF-8 values can be credentials.
            if h.value.is_empty() { std::str::from_utf8(&h.raw_value).ok() } else { Some(h.value.as_str()) }
        });
        from_map.chain(from_raw)
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str).chain(self.raw.iter().map(|h| h.key.as_str()))
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

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let check = request.into_inner();
        let attributes = check.attributes.unwrap_or_default();
        let Some(http) = attributes.request.as_ref().and_then(|r| r.http.as_ref()) else {
            return Err(Status::invalid_argument("CheckRequest has no attributes.request.http"));
        };
        let peer =
            attributes.source.as_ref().and_then(|p| p.address.as_ref()).and_then(|a| a.address.as_ref()).and_then(
                |a| match a {
                    Address::SocketAddress(s) => crate::verdict::parse_ip(&s.address),
                    _ => None,
                },
            );
        let empty = Vec::new();
        let headers = CheckHeaders { map: &http.headers, raw: http.header_map.as_ref().map_or(&empty, |m| &m.headers) };
        let ext = &attributes.context_extensions;
        let host = if http.host.is_empty() { headers.values(":authority").next().unwrap_or("") } else { &http.host };
        let req = ProxyRequest {
            method: &http.method,
            host,
            path: &http.path,
            headers: &headers,
            peer,
            // Envoy wrote the X-Forwarded-For it sends.
            peer_is_proxy: true,
            overrides: Overrides {
                tenant: ext.get(TENANT_EXTENSION).map(String::as_str),
                scopes: ext.get(SCOPES_EXTENSION).map(String::as_str),
                limits: ext.get(LIMITS_EXTENSION).map(String::as_str),
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
        Ok(Response::new(response))
    }
}
