//! Envoy's `CheckResponse` written straight from the gate's decision into
//! the call's send buffer, as the Verify answer is (README,
//! "Performance"): the bytes prost writes for [`to_check_response`]'s
//! message, without building it (about thirty strings, a hashed map and
//! their frees per Check). `to_check_response` stays as the reference the
//! tests decode against.

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use prost::bytes::BufMut;

use smallvec::SmallVec;

use crate::cache::EncodedParts;
use crate::proxy::{Allow, Decision, Deny};
use crate::service::protobuf::{message, nested, string, string_always, string_always_len, string_len, uint, uint_len};
use crate::verdict::HeaderValue as VerdictHeader;

/// What a header set by keystile does to one already there: replaces it
/// (README, "Protect an API without code": identity headers cannot be
/// forged).
const OVERWRITE: u64 = HeaderAppendAction::OverwriteIfExistsOrAdd as u64;

/// The gRPC status of a denial that Envoy logs (the HTTP answer is
/// `denied_response`).
fn deny_code(status: u16) -> tonic::Code {
    match status {
        400 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        429 => tonic::Code::ResourceExhausted,
        _ => tonic::Code::PermissionDenied,
    }
}

/// A Check's answer as it will be written.
pub struct CheckAnswer(pub Decision);

impl CheckAnswer {
    /// Appends the encoded `CheckResponse` to `buf`.
    pub fn write(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Decision::Allow(allow) => {
                // status: OK, every field default, still present.
                message(1, 0, buf);
                // What the key alone decides, encoded once per cached key.
                // A token's or a tier's scopes are the call's own: written
                // in place, as before, with nothing allocated.
                let cached = match &allow.verdict.key {
                    Some(k) if allow.verdict.token_scopes.is_none() => {
                        Some(k.encoded.get_or_init(|| key_parts(allow)).parts())
                    }
                    _ => None,
                };
                let upstream_len = match cached {
                    Some((upstream, _)) => upstream.len(),
                    None => allow.upstream().map(|(n, v)| nested(2, header_option_len(n, v.len()))).sum(),
                };
                // The client's headers: measured first, written after.
                let mut response = SmallVec::<[(&'static str, VerdictHeader); 6]>::new();
                allow.each_response_header(|name, value| response.push((name, value)));
                let ok_len = upstream_len
                    + allow.remove_upstream.iter().map(|n| string_always_len(5, n)).sum::<usize>()
                    + response.iter().map(|(n, v)| nested(6, header_option_len(n, v.len()))).sum::<usize>()
                    + allow.remove_query.iter().map(|n| string_always_len(8, n)).sum::<usize>();
                message(3, ok_len, buf);
                match cached {
                    Some((upstream, _)) => buf.put_slice(upstream),
                    None => write_upstream(allow, buf),
                }
                for name in &allow.remove_upstream {
                    string_always(5, name, buf);
                }
                for (name, value) in &response {
                    header_option(6, name, value.len(), buf, |buf| value.write(&mut |b| buf.put_slice(b)));
                }
                for name in &allow.remove_query {
                    string_always(8, name, buf);
                }
                match cached {
                    Some((_, fields)) => buf.put_slice(fields),
                    None => write_metadata(allow, buf),
                }
            }
            Decision::Deny(deny) => {
                let code = deny_code(deny.status) as i32 as u64;
                message(1, uint_len(1, code) + string_len(2, deny.code), buf);
                uint(1, code, buf);
                string(2, deny.code, buf);
                message(2, denied_response_len(deny), buf);
                message(1, uint_len(1, u64::from(deny.status)), buf);
                uint(1, u64::from(deny.status), buf);
                for (name, value) in &deny.headers {
                    header_option(2, name, value.len(), buf, |buf| buf.put_slice(value.as_bytes()));
                }
                string(3, &deny.body, buf);
            }
        }
    }
}

/// An allow's parts that its key alone decides: the identity headers for
/// the upstream request (`OkHttpResponse.headers`, field 2 entries), then
/// the access-log metadata (`CheckResponse.dynamic_metadata`, field 4, key
/// and length included).
fn key_parts(allow: &Allow) -> EncodedParts {
    let mut buf = Vec::with_capacity(256);
    write_upstream(allow, &mut buf);
    let split = buf.len();
    write_metadata(allow, &mut buf);
    EncodedParts::new(&buf, split)
}

/// The identity headers for the upstream request, as field 2 entries.
fn write_upstream(allow: &Allow, buf: &mut impl BufMut) {
    for (name, value) in allow.upstream() {
        header_option(2, name, value.len(), buf, |buf| value.each_piece(|p| buf.put_slice(p)));
    }
}

/// The access-log metadata, field 4 with its key and length.
fn write_metadata(allow: &Allow, buf: &mut impl BufMut) {
    let fields = metadata(allow);
    message(4, fields.iter().map(|(k, v)| field_entry_len(k, v)).sum(), buf);
    for (k, v) in fields {
        let value_len = string_always_len(3, v);
        message(1, string_len(1, k) + nested(2, value_len), buf);
        string(1, k, buf);
        message(2, value_len, buf);
        string_always(3, v, buf);
    }
}

/// The message prost would build for the same answer.
pub fn to_check_response(decision: Decision) -> CheckResponse {
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
    match decision {
        Decision::Allow(allow) => CheckResponse {
            status: Some(rpc::Status { code: tonic::Code::Ok as i32, ..Default::default() }),
            dynamic_metadata: Some(Struct {
                fields: metadata(&allow).into_iter().map(|(k, v)| (k.to_string(), string(v.to_string()))).collect(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: allow.upstream().map(|(n, v)| set(n, v.to_string())).collect(),
                headers_to_remove: allow.remove_upstream.iter().map(|n| n.to_string()).collect(),
                response_headers_to_add: {
                    let mut out = Vec::new();
                    allow.each_response_header(|n, v| out.push(set(n, v.to_string())));
                    out
                },
                query_parameters_to_remove: allow.remove_query.clone(),
                ..Default::default()
            })),
        },
        Decision::Deny(deny) => CheckResponse {
            status: Some(rpc::Status {
                code: deny_code(deny.status) as i32,
                message: deny.code.to_string(),
                details: Vec::new(),
            }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: deny.status as i32 }),
                headers: deny.headers.into_iter().map(|(n, v)| set(n, v)).collect(),
                body: deny.body,
            })),
        },
    }
}

/// `dynamic_metadata` of an allow, for access logs (README, "Protect an
/// API without code").
fn metadata(allow: &Allow) -> [(&'static str, &str); 3] {
    let r = allow.verdict.key.as_ref().map(|k| &k.record);
    [
        ("key_id", r.map_or("", |r| r.key_id.as_str())),
        ("tenant", r.map_or("", |r| r.tenant.as_str())),
        ("env", r.map_or("", |r| r.env.as_str())),
    ]
}

fn denied_response_len(deny: &Deny) -> usize {
    nested(1, uint_len(1, u64::from(deny.status)))
        + deny.headers.iter().map(|(n, v)| nested(2, header_option_len(n, v.len()))).sum::<usize>()
        + string_len(3, &deny.body)
}

/// A `HeaderValueOption` that overwrites: its `HeaderValue` (always
/// present) and its append action.
/// `value` writes the header's value, `value_len` bytes.
fn header_option<B: BufMut>(field: u32, name: &str, value_len: usize, buf: &mut B, value: impl FnOnce(&mut B)) {
    message(field, header_option_len(name, value_len), buf);
    message(1, header_value_len(name, value_len), buf);
    string(1, name, buf);
    // A proto3 string: the empty value is not written.
    if value_len > 0 {
        message(2, value_len, buf);
        value(buf);
    }
    uint(3, OVERWRITE, buf);
}

/// A `HeaderValue` of `name` and a value of `value_len` bytes.
fn header_value_len(name: &str, value_len: usize) -> usize {
    string_len(1, name) + if value_len == 0 { 0 } else { nested(2, value_len) }
}

fn header_option_len(name: &str, value_len: usize) -> usize {
    nested(1, header_value_len(name, value_len)) + uint_len(3, OVERWRITE)
}

/// A `Struct` field entry: the name, and a `Value` holding a string (a
/// oneof member: written even when empty).
fn field_entry_len(name: &str, value: &str) -> usize {
    nested(1, string_len(1, name) + nested(2, string_always_len(3, value)))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::service::verify_answer::tests::key;
    use crate::verdict::tests::applied;
    use crate::verdict::{Outcome, Verdict};

    /// Written and built-then-encoded answers are the same message of the
    /// same length, for allows and denials, with empty values among them.
    #[test]
    fn the_written_answer_is_the_message_to_check_response_builds() {
        // A valid verdict of a key of `tenant` (scopes and env set, an
        // empty tenant removed), with or without a limit.
        let allow = |tenant: &str, limited: bool, strip: bool| {
            let mut verdict = Verdict::bare(Outcome::Valid);
            verdict.key = Some(key(tenant, &["read", "write"], &[], None));
            if limited {
                verdict.rate = Some(applied("integration", 1000, 0, 7, 0));
            }
            verdict.decided_at = 1_700_000_000;
            let mut remove_upstream: SmallVec<[std::borrow::Cow<'static, str>; 4]> = SmallVec::new();
            if tenant.is_empty() {
                remove_upstream.push("x-keystile-tenant".into());
            }
            if strip {
                remove_upstream.push("authorization".into());
                remove_upstream.push(String::from("x-keystile-other").into());
            }
            let remove_query = if strip { vec!["api_key".into(), String::new()] } else { vec![] };
            Allow { verdict, remove_upstream, remove_query }
        };
        let limits = vec![("x-ratelimit-limit", "1000".to_string()), ("ratelimit", String::new())];
        let body = "{\"error\": \"rate_limited\"}".to_string();
        let decisions = [
            Decision::Allow(allow("acme", true, false)),
            Decision::Allow(allow("", false, true)),
            Decision::Deny(Deny { status: 401, code: "REVOKED", headers: vec![], body: body.clone() }),
            Decision::Deny(Deny { status: 429, code: "RATE_LIMITED", headers: limits.clone(), body }),
            Decision::Deny(Deny { status: 403, code: "", headers: limits, body: String::new() }),
            Decision::Deny(Deny { status: 400, code: "INVALID_REQUEST", headers: vec![], body: "x".repeat(300) }),
        ];
        for decision in decisions {
            let built = to_check_response(decision.clone());
            let mut written = Vec::new();
            CheckAnswer(decision).write(&mut written);
            assert_eq!(written.len(), built.encoded_len(), "{built:?}");
            assert_eq!(CheckResponse::decode(&written[..]).unwrap(), built);
        }
    }

    /// What a key's parts hold stays within what the cache weighs them
    /// for, whatever the lengths: empty values, values past 127 bytes (two
    /// bytes of length each), many scopes.
    #[test]
    fn a_keys_parts_stay_within_their_weight() {
        let long_scopes: Vec<String> = (0..60).map(|i| format!("scope-number-{i:03}:read")).collect();
        let long_scopes: Vec<&str> = long_scopes.iter().map(String::as_str).collect();
        let tenant_300 = "t".repeat(300);
        let cases: [(&str, &[&str]); 5] =
            [("", &[]), ("acme", &["read"]), (&tenant_300, &["read", "write"]), ("acme", &long_scopes), ("", &[""])];
        for (tenant, scopes) in cases {
            let k = key(tenant, scopes, &[], None);
            let mut verdict = Verdict::bare(Outcome::Valid);
            verdict.key = Some(k.clone());
            let parts = key_parts(&Allow { verdict, remove_upstream: SmallVec::new(), remove_query: vec![] });
            let bound = crate::cache::encoded_parts_bound(&k.record);
            assert!(parts.len() <= bound, "{} bytes, weighed for {bound} ({tenant:?}, {scopes:?})", parts.len());
            assert!(k.weight(true) >= k.weight(false) + bound, "the weight counts the parts");
        }
    }

    /// A key's identity headers and access-log fields are encoded on its
    /// first allow and copied into the later ones. A token's scopes are
    /// that call's own: they are neither taken from the key's parts nor put
    /// into them, whichever comes first.
    #[test]
    fn a_keys_parts_are_encoded_once_and_a_tokens_scopes_stay_its_own() {
        let k = key("acme", &["read", "write"], &[], None);
        let allow = |token: Option<&[&str]>| {
            let mut verdict = Verdict::bare(Outcome::Valid);
            verdict.key = Some(k.clone());
            verdict.token_scopes = token.map(|t| t.iter().map(|s| s.to_string()).collect());
            Decision::Allow(Allow { verdict, remove_upstream: SmallVec::new(), remove_query: vec![] })
        };
        let scopes = |response: &CheckResponse| match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-keystile-scopes")
                .map(|h| h.value.clone()),
            _ => None,
        };
        let want = ["read", "read,write", "read,write", "read"];
        let calls = [allow(Some(&["read"])), allow(None), allow(None), allow(Some(&["read"]))];
        for (i, (decision, want)) in calls.into_iter().zip(want).enumerate() {
            let built = to_check_response(decision.clone());
            let mut written = Vec::new();
            CheckAnswer(decision).write(&mut written);
            let written = CheckResponse::decode(&written[..]).unwrap();
            assert_eq!(written, built);
            assert_eq!(scopes(&written).as_deref(), Some(want));
            // The token's allow, first, leaves them empty.
            assert_eq!(k.encoded.get().is_some(), i > 0, "call {i}");
        }
    }
}
