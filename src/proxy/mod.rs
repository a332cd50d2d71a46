//! Proxy front ends' common ground (README, "Protect an API without
//! code"): a request a proxy asks about (method, host, path, headers,
//! client address) becomes a Verify of the same engine, and the verdict an
//! answer a proxy forwards: identity headers upstream and rate-limit
//! headers to the client on allow; the verdict's status, headers and a JSON
//! body from a template on deny. Envoy's ext_authz (`service/ext_authz/`)
//! and HTTP forward-auth (`http.rs`, `/authz`) convert at their edges; this
//! module knows neither.
//!
//! - [`credentials`]: where the credential is (`--credential-sources`).
//! - [`routes`]: which tenant a host names and what a path needs (`--routes`).
//! - [`body`]: the error body template (`--error-body`).

pub mod body;
pub mod credentials;
pub mod routes;

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::engine::Engine;
use crate::limit::LimitName;
use crate::verdict::{self, Outcome, Request, Verdict, Words};
pub use body::ErrorBody;
pub use credentials::{CredentialSources, Found, RequestHeaders, Source};
pub use routes::RouteTable;

/// Identity headers the allow answer sets upstream; any other
/// `x-keystile-*` header a client sent is removed.
pub const IDENTITY_PREFIX: &str = "x-keystile-";
pub const KEY_ID: &str = "x-keystile-key-id";
pub const TENANT: &str = "x-keystile-tenant";
pub const ENV: &str = "x-keystile-env";
pub const SCOPES: &str = "x-keystile-scopes";
pub const KIND: &str = "x-keystile-key-kind";
/// Every identity header, each either set or removed on allow.
pub const IDENTITY_HEADERS: [&str; 5] = [KEY_ID, TENANT, ENV, SCOPES, KIND];

/// How the proxy front ends read requests and answer.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub sources: CredentialSources,
    pub routes: RouteTable,
    pub error_body: ErrorBody,
    /// Remove the credential from the upstream request (ext_authz; an HTTP
    /// proxy does it in its own configuration).
    pub strip_credential: bool,
    /// Proxies in front whose `X-Forwarded-For` entries are trusted: 0 =
    /// the client is the connection's peer (ext_authz: Envoy's
    /// `source.address`), N = the Nth address from the right.
    pub trusted_hops: u8,
    /// The realm of `WWW-Authenticate: Bearer realm="…"`.
    pub realm: String,
    /// Forward-auth peers whose `X-Forwarded-For` is believed (the proxy
    /// in front); anyone else's address is the client's.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Which headers name the original request on `/authz`.
    pub forward_auth_headers: ForwardAuthHeaders,
}

/// Where forward-auth reads the original method, host and URI
/// (`--forward-auth-headers`). One set only: a proxy that passes its
/// client's headers on (Traefik, Caddy) would otherwise let a client name
/// another path in the set the proxy does not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardAuthHeaders {
    /// nginx: `X-Original-Method`, `X-Original-URI`, `X-Forwarded-Host`
    /// (as `deploy/nginx/keystile.conf` sets them).
    #[default]
    XOriginal,
    /// Traefik, Caddy: `X-Forwarded-Method`, `-Uri`, `-Host`.
    XForwarded,
    /// Envoy's HTTP ext_authz: the request itself (the path after `/authz`,
    /// its method and Host).
    Request,
}

impl std::str::FromStr for ForwardAuthHeaders {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "x-original" => Ok(ForwardAuthHeaders::XOriginal),
            "x-forwarded" => Ok(ForwardAuthHeaders::XForwarded),
            "request" => Ok(ForwardAuthHeaders::Request),
            other => {
                Err(format!("{other:?}: expected x-original (nginx), x-forwarded (Traefik, Caddy) or request (Envoy)"))
            }
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            sources: CredentialSources::default(),
            routes: RouteTable::default(),
            error_body: ErrorBody::default(),
            strip_credential: false,
            trusted_hops: 0,
            realm: "api".to_string(),
            trusted_proxies: vec!["127.0.0.0/8".parse().expect("a CIDR"), "::1/128".parse().expect("a CIDR")],
            forward_auth_headers: ForwardAuthHeaders::default(),
        }
    }
}

/// What a route's per-request settings override (Envoy's
/// `context_extensions` `keystile.tenant`, `keystile.scopes`,
/// `keystile.limits`, comma-separated lists).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides<'a> {
    pub tenant: Option<&'a str>,
    pub scopes: Option<&'a str>,
    pub limits: Option<&'a str>,
}

/// One request a proxy asks about.
pub struct ProxyRequest<'a, 'h, H> {
    pub method: &'a str,
    /// The Host (or `:authority`) of the original request.
    pub host: &'a str,
    /// The original path, query included, as sent.
    pub path: &'a str,
    /// Its headers, as the front end holds them (`'h`), whose values
    /// borrow the request (`'a`).
    pub headers: &'h H,
    /// The address the front end sees the request from.
    pub peer: Option<IpAddr>,
    /// Whether the peer is a proxy whose `X-Forwarded-For` may be believed
    /// (ext_authz: Envoy itself; forward-auth: a `--trusted-proxies` peer).
    pub peer_is_proxy: bool,
    pub overrides: Overrides<'a>,
}

/// What a request asks of the engine, read by [`Gate::read`]. Its `Debug`
/// never shows the credential.
pub struct Asked<'a> {
    credential: &'a str,
    /// The sources the credential was found in (bit `i` = source `i`).
    found_in: u64,
    /// The normalised path, for error bodies.
    path: Cow<'a, str>,
    scopes: Cow<'a, [String]>,
    limits: Cow<'a, [String]>,
    tenant: &'a str,
    ip: Option<IpAddr>,
    origin: &'a str,
    /// Client-sent `x-keystile-*` headers keystile does not set, lower
    /// case: removed on allow.
    client_identity: SmallVec<[Cow<'static, str>; 2]>,
}

impl fmt::Debug for Asked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Asked")
            .field("credential", &crate::secret::REDACTED)
            .field("path", &self.path)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// Let the request through. The headers it sets are read from the verdict
/// as the answer is written, not copied into strings first (README,
/// "Performance").
#[derive(Debug, Clone)]
pub struct Allow {
    /// The valid verdict, with its key.
    pub verdict: Verdict,
    /// Removed from the upstream request: identity headers with no value
    /// (so that no proxy has to overwrite a client's copy with nothing),
    /// client-sent `x-keystile-*` headers keystile does not set, and the
    /// credential's header with `--strip-credential`.
    pub remove_upstream: SmallVec<[Cow<'static, str>; 4]>,
    /// The credential's query parameters, with `--strip-credential`.
    pub remove_query: Vec<String>,
}

/// An identity header's value, borrowed from the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityValue<'a> {
    Text(&'a str),
    /// The granted scopes, joined by commas.
    Scopes(&'a [String]),
}

impl IdentityValue<'_> {
    pub fn len(&self) -> usize {
        match self {
            IdentityValue::Text(t) => t.len(),
            IdentityValue::Scopes(s) => s.iter().map(String::len).sum::<usize>() + s.len().saturating_sub(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes, piece by piece.
    pub fn each_piece(&self, mut piece: impl FnMut(&[u8])) {
        match self {
            IdentityValue::Text(t) => piece(t.as_bytes()),
            IdentityValue::Scopes(s) => {
                for (i, scope) in s.iter().enumerate() {
                    if i > 0 {
                        piece(b",");
                    }
                    piece(scope.as_bytes());
                }
            }
        }
    }
}

impl fmt::Display for IdentityValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut result = Ok(());
        self.each_piece(|p| {
            if result.is_ok() {
                // Pieces are slices of strings: whole UTF-8 sequences.
                result = f.write_str(std::str::from_utf8(p).unwrap_or(""));
            }
        });
        result
    }
}

impl Allow {
    /// Every identity header with its value, empty ones included (those
    /// are in `remove_upstream` instead).
    pub fn identity_headers(&self) -> [(&'static str, IdentityValue<'_>); 5] {
        let record = self.verdict.key.as_ref().map(|k| &k.record);
        let text = |read: fn(&crate::store::KeyRecord) -> &str| IdentityValue::Text(record.map_or("", read));
        let scopes = if record.is_some() { self.verdict.granted_scopes() } else { &[] };
        [
            (KEY_ID, text(|r| r.key_id.as_str())),
            (TENANT, text(|r| &r.tenant)),
            (ENV, text(|r| r.env.as_str())),
            (SCOPES, IdentityValue::Scopes(scopes)),
            (KIND, IdentityValue::Text(record.map_or("secret", |r| r.kind.as_str()))),
        ]
    }

    /// The identity headers set (overwriting) on the upstream request:
    /// those with a value.
    pub fn upstream(&self) -> impl Iterator<Item = (&'static str, IdentityValue<'_>)> {
        self.identity_headers().into_iter().filter(|(_, v)| !v.is_empty())
    }

    /// Calls `each` with every header added to the answer to the client
    /// (the rate-limit headers).
    pub fn each_response_header<'a>(&'a self, mut each: impl FnMut(&'static str, verdict::HeaderValue<'a>)) {
        verdict::each_header(&self.verdict, self.verdict.decided_at, |name, value| {
            // The granted scopes go upstream, as `x-keystile-scopes`.
            if name != "x-api-key-scopes" {
                each(name, value);
            }
        });
    }
}

/// Refuse the request with this answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    pub status: u16,
    /// `CODE` name (`REVOKED`, `INVALID_REQUEST`, `UNAVAILABLE`, ...).
    pub code: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// Not boxed though an allow is larger than a denial: allows are the hot
/// path, and a box would be an allocation per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Allow),
    Deny(Deny),
}

/// The proxy front ends' engine: one per process.
pub struct Gate {
    engine: Arc<Engine>,
    settings: ProxySettings,
}

impl Gate {
    pub fn new(engine: Arc<Engine>, settings: ProxySettings) -> Gate {
        Gate { engine, settings }
    }

    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// Every header [`read`](Self::read) may look for, besides the names
    /// with [`IDENTITY_PREFIX`]: a front end may drop the others as it
    /// reads a request.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.settings.sources.header_names().chain(["origin", "x-forwarded-for"])
    }

    /// Decides one request. `Err` is the answer when the store cannot
    /// answer: never an allow (ext_authz turns it into `UNAVAILABLE`,
    /// forward-auth sends it as a 503).
    pub async fn check<'a, H: RequestHeaders<'a>>(&'a self, req: &ProxyRequest<'a, '_, H>) -> Result<Decision, Deny> {
        match self.read(req) {
            Ok(asked) => self.decide(asked).await,
            Err(answer) => Ok(Decision::Deny(answer)),
        }
    }

    /// What a request asks, read from it without the engine; or the
    /// denial when the request alone settles it. What it keeps borrows the
    /// request's bytes, not the front end's view of them, which can go
    /// before the engine is asked (ext_authz's is a kilobyte of a call's
    /// future otherwise).
    pub fn read<'a, H: RequestHeaders<'a>>(&'a self, req: &ProxyRequest<'a, '_, H>) -> Result<Asked<'a>, Deny> {
        // Byte searches: `?` and `#` are ASCII, and the common path has
        // neither (a `char` pattern search costs more than the routes).
        let (path, query) = match req.path.bytes().position(|b| b == b'?') {
            Some(i) => {
                let q = &req.path[i + 1..];
                (&req.path[..i], q.bytes().position(|b| b == b'#').map_or(q, |j| &q[..j]))
            }
            None => (req.path, ""),
        };
        let path = match routes::normalise_path(path) {
            Ok(p) => p,
            Err(why) => {
                let mut d = self.render(400, "INVALID_REQUEST", "invalid_request", why, "");
                d.headers.push(("www-authenticate", self.www_authenticate(Some("invalid_request"))));
                return Err(d);
            }
        };
        let (credential, found_in) = match self.settings.sources.find(req.headers, query) {
            Found::One(c, mask) => (c, mask),
            // Nothing sent is no guess: answered without the engine, so it
            // never counts as a failed attempt of the address (a proxy's,
            // a browser's preflight).
            Found::None => {
                let o = Outcome::Malformed;
                let mut d = self.render(401, o.code_name(), o.error(), "The request carries no API key.", &path);
                d.headers.push(("www-authenticate", self.www_authenticate(None)));
                return Err(d);
            }
            Found::Conflict => {
                return Err(self.deny_request(
                    &path,
                    "invalid_request",
                    "The request carries two different credentials; send one.",
                ));
            }
        };
        let needs = self.settings.routes.needs(req.method, &path);
        let scopes = match req.overrides.scopes {
            Some(list) => Cow::Owned(split_list(list)),
            None => Cow::Borrowed(&needs.scopes[..]),
        };
        let limits = match req.overrides.limits {
            Some(list) => {
                let limits = split_list(list);
                if limits.iter().any(|l| l.parse::<LimitName>().is_err()) || limits.len() > 8 {
                    return Err(self.deny_request(
                        &path,
                        "invalid_request",
                        "The route's keystile.limits is not a list of at most 8 limit names.",
                    ));
                }
                Cow::Owned(limits)
            }
            None => Cow::Borrowed(&needs.limits[..]),
        };
        let tenant = match req.overrides.tenant {
            Some(t) => t,
            None => match self.settings.routes.tenant_of(req.host) {
                Some(t) => t,
                None => {
                    let o = Outcome::TenantMismatch;
                    let message = "The request's host names no tenant this deployment serves.";
                    return Err(self.render(403, o.code_name(), o.error(), message, &path));
                }
            },
        };
        // Every identity header is set or removed on allow; any other
        // `x-keystile-*` a client sent is removed.
        let client_identity = client_identity(req.headers.names_with_prefix(IDENTITY_PREFIX));
        Ok(Asked {
            credential,
            found_in,
            path,
            scopes,
            limits,
            tenant,
            ip: self.client_ip(req),
            origin: req.headers.values("origin").next().unwrap_or(""),
            client_identity,
        })
    }

    /// Asks the engine and turns its verdict into the answer.
    pub async fn decide(&self, asked: Asked<'_>) -> Result<Decision, Deny> {
        let request = Request {
            ip: asked.ip,
            scopes: Words::Owned(&asked.scopes),
            tenant: asked.tenant,
            limits: Words::Owned(&asked.limits),
            origin: asked.origin,
            ..Request::of_key(asked.credential)
        };
        let verdict = match self.engine.verify(&request).await {
            Ok(v) => v,
            Err(_) => {
                let mut deny = self.render(
                    503,
                    "UNAVAILABLE",
                    "unavailable",
                    "The key store is not answering; try again shortly.",
                    &asked.path,
                );
                deny.headers.push(("retry-after", "1".to_string()));
                return Err(deny);
            }
        };
        if verdict.outcome != Outcome::Valid {
            let o = verdict.outcome;
            let mut deny = self.render(o.http_status(), o.code_name(), o.error(), o.message(), &asked.path);
            if o.http_status() == 401 {
                deny.headers.push(("www-authenticate", self.www_authenticate(Some("invalid_token"))));
            }
            deny.headers.extend(verdict::headers(&verdict, verdict.decided_at));
            return Ok(Decision::Deny(deny));
        }
        let mut allow = Allow { verdict, remove_upstream: SmallVec::new(), remove_query: Vec::new() };
        let empty = allow.identity_headers().map(|(name, value)| value.is_empty().then_some(name));
        allow.remove_upstream.extend(empty.into_iter().flatten().map(Cow::Borrowed));
        allow.remove_upstream.extend(asked.client_identity);
        if self.settings.strip_credential {
            // Every place the credential was sent, not just the first.
            for (i, source) in self.settings.sources.sources().iter().enumerate() {
                if asked.found_in & (1u64 << i.min(63)) == 0 {
                    continue;
                }
                match source {
                    Source::Authorization => allow.remove_upstream.push(Cow::Borrowed("authorization")),
                    Source::Header(h) => allow.remove_upstream.push(Cow::Owned(h.clone())),
                    Source::Query(q) => allow.remove_query.push(q.clone()),
                }
            }
        }
        Ok(Decision::Allow(allow))
    }

    /// The client's address: the peer, or with `--trusted-hops N` and a
    /// peer that is a trusted proxy the Nth `X-Forwarded-For` entry from
    /// the right (the peer when there are fewer, or that entry is no
    /// address).
    fn client_ip<'a, H: RequestHeaders<'a>>(&self, req: &ProxyRequest<'a, '_, H>) -> Option<IpAddr> {
        let hops = self.settings.trusted_hops as usize;
        if hops == 0 || !req.peer_is_proxy {
            return req.peer.map(|ip| ip.to_canonical());
        }
        let mut entries: Vec<&str> = Vec::new();
        for v in req.headers.values("x-forwarded-for") {
            entries.extend(v.split(',').map(str::trim).filter(|e| !e.is_empty()));
        }
        if entries.len() < hops {
            return req.peer.map(|ip| ip.to_canonical());
        }
        verdict::parse_ip(entries[entries.len() - hops]).or(req.peer.map(|ip| ip.to_canonical()))
    }

    /// Whether forward-auth believes `peer`'s `X-Forwarded-For`.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.settings.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// `Bearer realm="…"`, with `error="…"` when a credential was sent
    /// (RFC 6750: none for a request that carried none).
    fn www_authenticate(&self, error: Option<&str>) -> String {
        match error {
            Some(e) => format!("Bearer realm=\"{}\", error=\"{e}\"", self.settings.realm),
            None => format!("Bearer realm=\"{}\"", self.settings.realm),
        }
    }

    fn deny_request(&self, path: &str, error: &str, message: &str) -> Deny {
        let mut d = self.render(401, "INVALID_REQUEST", error, message, path);
        d.headers.push(("www-authenticate", self.www_authenticate(Some("invalid_request"))));
        d
    }

    fn render(&self, status: u16, code: &'static str, error: &str, message: &str, path: &str) -> Deny {
        let body = self.settings.error_body.render(&body::Fields { code, error, message, status, path });
        Deny {
            status,
            code,
            headers: vec![("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())],
            body,
        }
    }
}

/// Client-sent `x-keystile-*` names that are none of the identity
/// headers, lower case, once each. Sorted to drop repeats: a request of
/// thousands of such names (up to the size cap) costs a sort, not a
/// comparison of every pair.
fn client_identity<'a>(names: impl Iterator<Item = &'a str>) -> SmallVec<[Cow<'static, str>; 2]> {
    let mut out: SmallVec<[Cow<'static, str>; 2]> = names
        .filter(|name| !IDENTITY_HEADERS.iter().any(|n| n.eq_ignore_ascii_case(name)))
        .map(|name| Cow::Owned(name.to_ascii_lowercase()))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A comma-separated list, blanks dropped.
fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_sent_identity_names_are_removed_once_each_and_ours_are_left_to_the_answer() {
        let names = ["X-Keystile-Admin", "x-keystile-admin", "x-keystile-tenant", "X-KEYSTILE-KEY-ID", "x-keystile-b"];
        assert_eq!(client_identity(names.into_iter()).as_slice(), ["x-keystile-admin", "x-keystile-b"]);
        // A hostile request's thousands of names, with repeats in every
        // case: each kept once.
        let many: Vec<String> =
            (0..4000).flat_map(|i| [format!("x-keystile-{i}"), format!("X-KEYSTILE-{i}")]).collect();
        let kept = client_identity(many.iter().map(String::as_str));
        assert_eq!(kept.len(), 4000);
        assert!(kept.iter().all(|n| n.bytes().all(|b| !b.is_ascii_uppercase())));
    }
}
