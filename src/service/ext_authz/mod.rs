//! `envoy.service.auth.v3.Authorization/Check` (`--ext-authz`; README,
//! "Protect an API without code"): Envoy's and Istio's external
//! authorization, over [`crate::proxy::Gate`]. Converts Envoy's
//! `CheckRequest` into a [`ProxyRequest`] and the decision into a
//! `CheckResponse`; a store that cannot answer is the gRPC status
//! `UNAVAILABLE` (Envoy's `status_on_error` then answers the client),
//! never an allow.
//!
//! The answer is Envoy's `CheckResponse`, written straight from the
//! decision ([`answer`]; envoy-types' message is the reference its tests
//! decode against). The request is read in place ([`wire`]): only the
//! fields keystile reads, as slices of the received buffer. Envoy's type
//! decodes every header into a `HashMap<String, String>` and a dozen
//! fields never used, which cost more than the whole verification
//! (BENCHMARKS.md, "Proxy front ends").

use std::sync::Arc;

use prost::bytes::{Bytes, BytesMut};
use tonic::codegen::BoxFuture;
use tonic::{Request, Response, Status};

use crate::proxy::{Asked, Decision, Deny, Gate, Overrides, ProxyRequest, RequestHeaders};
use crate::service::protobuf::utf8;
use crate::service::unary::{UnaryCodec, UnaryServer};

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

pub mod answer;
pub mod wire;

pub use answer::CheckAnswer;

/// A field as text, or "" when it is not UTF-8.
fn text(b: &[u8]) -> &str {
    utf8(b).unwrap_or("")
}

pub struct ExtAuthzService {
    gate: Arc<Gate>,
    /// The headers the gate reads, and `:authority`: a CheckRequest's
    /// others are dropped as it is read.
    headers: wire::HeaderFilter,
}

impl ExtAuthzService {
    pub fn new(gate: Arc<Gate>) -> ExtAuthzService {
        let names = gate.header_names().chain([AUTHORITY]);
        let headers = wire::HeaderFilter::new(names, crate::proxy::IDENTITY_PREFIX);
        ExtAuthzService { gate, headers }
    }

    pub fn into_server(self, max_request_bytes: usize) -> ExtAuthzServer {
        UnaryServer::new(CHECK_PATH, max_request_bytes, CheckCall(Arc::new(self)))
    }
}

/// The pseudo-header of the host, where `host` is empty.
const AUTHORITY: &str = ":authority";

/// Envoy's headers, as the view holds them: `headers` entries (lower-case
/// names) and `header_map` values, those the filter kept.
struct CheckHeaders<'v, 'a>(&'v [(&'a [u8], &'a [u8])], &'v wire::HeaderFilter);

impl<'a> RequestHeaders<'a> for CheckHeaders<'_, 'a> {
    fn values(&self, name: &str) -> impl Iterator<Item = &'a str> {
        debug_assert!(self.1.keeps(name.as_bytes()), "{name} is dropped as a CheckRequest is read");
        self.0.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes())).filter_map(|(_, v)| utf8(v))
    }

    fn names_with_prefix(&self, prefix: &'static str) -> impl Iterator<Item = &'a str> {
        debug_assert!(self.1.keeps_prefix(prefix), "{prefix}* is dropped as a CheckRequest is read");
        // Checked as UTF-8 only when they match: most names do not. A
        // name that is not UTF-8 is no header keystile sets.
        self.0
            .iter()
            .filter(move |(k, _)| crate::proxy::credentials::has_prefix(k, prefix))
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
    }

    /// One pass over the headers for all the names (the credential
    /// sources), where each name would be a pass of its own.
    fn each_value_of(&self, names: &[&str], mut each: impl FnMut(usize, &'a str)) {
        // The names' lengths, as bits: a header of a length no name has
        // (most of a request's) is passed over with one test.
        debug_assert!(names.iter().all(|n| n.is_empty() || self.1.keeps(n.as_bytes())), "{names:?}");
        let lengths = names.iter().fold(0u64, |m, n| m | 1 << (n.len() % 64));
        for (k, v) in self.0 {
            if lengths & 1 << (k.len() % 64) == 0 {
                continue;
            }
            for (i, name) in names.iter().enumerate() {
                if !name.is_empty()
                    && k.len() == name.len()
                    && k.eq_ignore_ascii_case(name.as_bytes())
                    && let Some(v) = utf8(v)
                {
                    each(i, v);
                }
            }
        }
    }
}

impl ExtAuthzService {
    /// Answers one Check. Public for the in-process benches; the server
    /// runs the same steps in [`serve_check`].
    pub async fn check(&self, check: wire::RawCheck) -> Result<CheckAnswer, Status> {
        let asked = match self.read(&check)? {
            Ok(asked) => asked,
            Err(deny) => return Ok(CheckAnswer(Decision::Deny(deny))),
        };
        match self.gate.decide(asked).await {
            Ok(decision) => Ok(CheckAnswer(decision)),
            Err(deny) => Err(Status::unavailable(deny.body)),
        }
    }

    /// What the Check asks, or its denial when the request settles it. The
    /// view is made and dropped here, so that a Check's future does not
    /// hold it while the engine answers.
    fn read<'a>(&'a self, check: &'a wire::RawCheck) -> Result<Result<Asked<'a>, Deny>, Status> {
        let mut view = wire::CheckView::default();
        check.read_into(&mut view, &self.headers).map_err(Status::invalid_argument)?;
        if !view.has_http {
            return Err(Status::invalid_argument("CheckRequest has no attributes.request.http"));
        }
        let peer = crate::verdict::parse_ip(text(view.source_address));
        let headers = CheckHeaders(&view.headers, &self.headers);
        let extension =
            |name: &str| view.context_extensions.iter().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| text(v));
        let host = match text(view.host) {
            "" => headers.values(AUTHORITY).next().unwrap_or(""),
            h => h,
        };
        let req = ProxyRequest {
            method: text(view.method),
            host,
            path: text(view.path),
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
        Ok(self.gate.read(&req))
    }
}

/// Envoy's CheckResponse out (written by [`CheckAnswer::write`]), the
/// CheckRequest's bytes in, kept as received for [`wire::RawCheck::read_into`].
pub struct CheckCodec;

impl UnaryCodec for CheckCodec {
    type Request = wire::RawCheck;
    type Answer = CheckAnswer;

    fn decode(message: Bytes) -> Result<wire::RawCheck, Status> {
        Ok(wire::RawCheck(message))
    }

    /// An allow is about 250 bytes; a denial carries its JSON body.
    const ANSWER_BYTES: usize = 1024;

    fn write(answer: &CheckAnswer, buf: &mut BytesMut) {
        answer.write(buf);
    }
}

/// The tonic service for `envoy.service.auth.v3.Authorization`, with
/// [`wire::RawCheck`] as the request type and [`CheckAnswer`] as the
/// response type.
pub type ExtAuthzServer = UnaryServer<CheckCodec, CheckCall>;

impl tonic::server::NamedService for ExtAuthzServer {
    const NAME: &'static str = SERVICE_NAME;
}

/// Check, as the server calls it.
#[derive(Clone)]
pub struct CheckCall(Arc<ExtAuthzService>);

impl tonic::server::UnaryService<wire::RawCheck> for CheckCall {
    type Response = CheckAnswer;
    type Future = BoxFuture<Response<CheckAnswer>, Status>;

    fn call(&mut self, request: Request<wire::RawCheck>) -> Self::Future {
        Box::pin(serve_check(self.0.clone(), request.into_inner()))
    }
}

/// [`ExtAuthzService::check`] as the server calls it, written out rather
/// than awaited: an awaited future is moved into its caller's, and a
/// Check's is about two kilobytes, copied once more per level (BENCHMARKS.md,
/// "A Check as cheap as a Verify").
async fn serve_check(service: Arc<ExtAuthzService>, check: wire::RawCheck) -> Result<Response<CheckAnswer>, Status> {
    let asked = match service.read(&check)? {
        Ok(asked) => asked,
        Err(deny) => return Ok(Response::new(CheckAnswer(Decision::Deny(deny)))),
    };
    match service.gate.decide(asked).await {
        Ok(decision) => Ok(Response::new(CheckAnswer(decision))),
        Err(deny) => Err(Status::unavailable(deny.body)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::app::App;
    use crate::clock::Clock;
    use crate::engine::EngineSettings;
    use crate::key::{Pepper, PepperSet};
    use crate::store::memory::MemoryStore;

    /// The one pass over a Check's headers finds what a pass per source
    /// finds (`credentials.rs`' tests): a credential in any case of any
    /// source, the same one twice, two different ones, none.
    #[test]
    fn a_checks_headers_give_the_credential_of_every_source() {
        use crate::proxy::credentials::{CredentialSources, Found};
        let sources: CredentialSources = "authorization,x-api-key,x-api-token,query:api_key".parse().unwrap();
        type Headers<'h> = &'h [(&'h str, &'h str)];
        let cases: [(Headers, &str, Found); 7] = [
            (&[("accept", "*/*"), ("authorization", "Bearer ks_a")], "", Found::One("ks_a", 0b1)),
            (&[("X-API-TOKEN", "bearer ks_b"), ("x-api-key", "ks_b")], "", Found::One("ks_b", 0b110)),
            (&[("x-api-key", "ks_a"), ("authorization", "Bearer ks_a")], "api_key=ks_a", Found::One("ks_a", 0b1011)),
            (&[("x-api-key", "ks_a"), ("X-Api-Token", "ks_b")], "", Found::Conflict),
            (&[("authorization", "Basic dXNlcjpwdw=="), ("", "ks_c")], "", Found::None),
            (&[("x-api-key", "ks_a")], "api_key=ks_q", Found::Conflict),
            (&[("x-api-key-2", "ks_a"), ("x-api-ke", "ks_a")], "", Found::None),
        ];
        for (headers, query, want) in cases {
            let pairs: Vec<(&[u8], &[u8])> = headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
            assert_eq!(
                sources.find(&CheckHeaders(&pairs, &wire::HeaderFilter::ALL), query),
                want,
                "{headers:?} {query}"
            );
        }
        // A name of 64 bytes (the longest a source may have) shares its
        // bit of the length mask with an empty one: the empty header never
        // matches, the name does, in any case.
        let long = format!("x-{}", "k".repeat(62));
        let sources: CredentialSources = long.parse().unwrap();
        let short: &[u8] = b"";
        let upper = long.to_uppercase();
        let pairs: [(&[u8], &[u8]); 2] = [(short, b"ks_a"), (upper.as_bytes(), b"ks_b")];
        assert_eq!(sources.find(&CheckHeaders(&pairs, &wire::HeaderFilter::ALL), ""), Found::One("ks_b", 0b1));
    }

    /// A Check read with the service's filter (the headers the gate asks
    /// for) is answered byte for byte as one read with every header: a
    /// credential in any source and case, a forged identity header, an
    /// origin, the host from `:authority`, two credentials, none.
    #[tokio::test]
    async fn dropping_the_headers_no_one_reads_changes_no_answer() {
        use envoy_types::ext_authz::v3::pb::CheckRequest;
        use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as Req};
        use prost::Message;

        // Two sidecars of one store, so that each counts the key's limit
        // the same way.
        let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
        let (store, clock) = (Arc::new(MemoryStore::new()), Clock::manual(1_800_000_000));
        let app = App::build(settings.clone(), store.clone(), clock.clone());
        let other = App::build(settings, store, clock);
        let spec = crate::admin::KeySpec {
            name: "filter".into(),
            env: "live".into(),
            scopes: vec!["public:read".into()],
            kind: crate::key::KeyKind::Publishable,
            allowed_origins: vec!["https://app.example.com".into()],
            rate_limit: Some(crate::limit::RateLimitPolicy {
                requests: 100,
                window_seconds: 60,
                burst: 0,
                per_tenant: false,
            }),
            ..Default::default()
        };
        let key = app.admin.create(spec, &crate::admin::Actor::deployment()).await.unwrap().key.expose().to_string();
        let filtered = ExtAuthzService::new(app.gate.clone());
        assert!(!filtered.headers.keeps(b"user-agent") && filtered.headers.keeps(b"X-Api-Token"));
        let every = ExtAuthzService { gate: other.gate.clone(), headers: wire::HeaderFilter::ALL };
        let noise = [("accept", "*/*"), ("user-agent", "x/1"), ("x-request-id", "7d3c"), ("traceparent", "00-4b")];
        let bearer = format!("Bearer {key}");
        let cases: [(&str, Vec<(&str, &str)>); 6] = [
            ("", vec![(":authority", "api.example.com"), ("X-API-KEY", &key), ("origin", "https://app.example.com")]),
            ("h", vec![("authorization", &bearer), ("X-Keystile-Other", "1"), ("origin", "https://app.example.com")]),
            ("h", vec![("x-api-token", &bearer), ("origin", "https://evil.example.com")]),
            ("h", vec![("x-api-key", &key), ("authorization", "Bearer ks_live_other")]),
            ("h", vec![("x-forwarded-for", "198.51.100.1")]),
            ("h", vec![("authorization", "Basic dXNlcjpwdw==")]),
        ];
        for (i, (host, mut headers)) in cases.into_iter().enumerate() {
            headers.extend(noise);
            let http = HttpRequest {
                method: "GET".into(),
                path: "/v1/users".into(),
                host: host.into(),
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            };
            let request = CheckRequest {
                attributes: Some(AttributeContext {
                    request: Some(Req { http: Some(http), ..Default::default() }),
                    ..Default::default()
                }),
            };
            let raw = wire::RawCheck(request.encode_to_vec().into());
            let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
            filtered.check(raw.clone()).await.unwrap().write(&mut a);
            every.check(raw).await.unwrap().write(&mut b);
            assert_eq!(a, b, "{:?}", headers.iter().map(|(k, _)| k).collect::<Vec<_>>());
            // The first two are allowed; the second's forged header is
            // removed from the upstream request.
            let allowed = a.windows(17).any(|w| w == b"x-keystile-key-id");
            assert_eq!(allowed, i < 2, "case {i}");
            assert_eq!(a.windows(16).any(|w| w == b"x-keystile-other"), i == 1, "case {i}");
        }
    }

    fn size_of<F>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A call's future is moved in memory before it first runs, once per
    /// layer that awaits it, so its size is paid per call (BENCHMARKS.md,
    /// "A Check as cheap as a Verify"). The view of a CheckRequest (about
    /// a kilobyte) is not held across the engine's await, a limiter's
    /// answer holds no bucket ids, and a store read is boxed: these bounds
    /// fail if any of them comes back (3,472 and 1,744 bytes before).
    #[test]
    fn a_check_and_a_verify_hold_little_while_they_wait() {
        let settings = EngineSettings::new(PepperSet::single(Pepper::parse(&[7u8; 32]).unwrap()));
        let app = App::build(settings, Arc::new(MemoryStore::new()), Clock::system());
        let service = Arc::new(ExtAuthzService::new(app.gate.clone()));
        let check = service.check(wire::RawCheck(Default::default()));
        let served = serve_check(service.clone(), wire::RawCheck(Default::default()));
        let request = crate::verdict::Request::of_key("x");
        let verify = app.engine.verify(&request);
        let (check, served, verify) = (size_of(&check), size_of(&served), size_of(&verify));
        assert!(check <= 2304, "a Check's future is {check} bytes");
        assert!(served <= 2304, "a Check's future as the server boxes it is {served} bytes");
        assert!(verify <= 1408, "a Verify's future is {verify} bytes");
        assert!(std::mem::size_of::<wire::CheckView>() > 1024, "the view this keeps out of the future is large");
    }
}
