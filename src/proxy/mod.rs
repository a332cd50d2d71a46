//! Proxy front ends' common ground (README, "Protect an API without
//! code"): a request a proxy asks about (method, host, path, headers,
//! client address) becomes a Verify of the same engine, and the verdict an
//! answer a proxy forwards: identity headers upstream and rate-limit
//! headers to the client on allow; the verdict's status, headers and a JSON
//! body from a template on deny. Envoy's ext_authz (`service/ext_authz.rs`)
//! and HTTP forward-auth (`http.rs`, `/authz`) convert at their edges; this
//! module knows neither.
//!
//! - [`credentials`]: where the credential is (`--credential-sources`).
//! - [`routes`]: which tenant a host names and what a path needs (`--routes`).
//! - [`body`]: the error body template (`--error-body`).

pub mod body;
pub mod credentials;
pub mod routes;

use std::net::IpAddr;
use std::sync::Arc;

use crate::engine::Engine;
use crate::limit::LimitName;
use crate::verdict::{self, Outcome, Request};
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
pub struct ProxyRequest<'a, H> {
    pub method: &'a str,
    /// The Host (or `:authority`) of the original request.
    pub host: &'a str,
    /// The original path, query included, as sent.
    pub path: &'a str,
    pub headers: &'a H,
    /// The address the front end sees the request from.
    pub peer: Option<IpAddr>,
    pub overrides: Overrides<'a>,
}

/// Let the request through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// Set (overwriting) on the upstream request.
    pub upstream: Vec<(&'static str, String)>,
    /// Removed from the upstream request: client-sent `x-keystile-*`
    /// headers keystile does not set, and the credential's header with
    /// `--strip-credential`.
    pub remove_upstream: Vec<String>,
    /// The credential's query parameter, with `--strip-credential`.
    pub remove_query: Option<String>,
    /// Added to the answer to the client (rate-limit headers).
    pub response: Vec<(&'static str, String)>,
    pub key_id: String,
    pub tenant: String,
    pub env: String,
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

#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// Decides one request. `Err` is the answer when the store cannot
    /// answer: never an allow (ext_authz turns it into `UNAVAILABLE`,
    /// forward-auth sends it as a 503).
    pub async fn check<H: RequestHeaders>(&self, req: &ProxyRequest<'_, H>) -> Result<Decision, Deny> {
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, q.split('#').next().unwrap_or("")),
            None => (req.path, ""),
        };
        let path = routes::normalise_path(path);
        let (credential, source) = match self.settings.sources.find(req.headers, query) {
            Found::One(c, i) => (c, Some(&self.settings.sources.sources()[i])),
            Found::None => ("", None),
            Found::Conflict => {
                return Ok(Decision::Deny(self.deny_request(
                    &path,
                    "invalid_request",
                    "The request carries two different credentials; send one.",
                )));
            }
        };
        let needs = self.settings.routes.needs(req.method, &path);
        let scopes_override;
        let scopes: &[String] = match req.overrides.scopes {
            Some(list) => {
                scopes_override = split_list(list);
                &scopes_override
            }
            None => &needs.scopes,
        };
        let limits_override;
        let limits: &[String] = match req.overrides.limits {
            Some(list) => {
                limits_override = split_list(list);
                if limits_override.iter().any(|l| l.parse::<LimitName>().is_err()) || limits_override.len() > 8 {
                    return Ok(Decision::Deny(self.deny_request(
                        &path,
                        "invalid_request",
                        "The route's keystile.limits is not a list of at most 8 limit names.",
                    )));
                }
                &limits_override
            }
            None => &needs.limits,
        };
        let tenant = req.overrides.tenant.unwrap_or_else(|| self.settings.routes.tenant_of(req.host));
        let ip = self.client_ip(req);
        let origin = req.headers.values("origin").next().unwrap_or("");
        let request = Request { ip, scopes, tenant, limits, origin, ..Request::of_key(credential) };
        let verdict = match self.engine.verify(&request).await {
            Ok(v) => v,
            Err(_) => {
                let mut deny = self.render(
                    503,
                    "UNAVAILABLE",
                    "unavailable",
                    "The key store is not answering; try again shortly.",
                    &path,
                );
                deny.headers.push(("retry-after", "1".to_string()));
                return Err(deny);
            }
        };
        let now = self.engine.clock().unix_seconds();
        let mut headers = verdict::headers(&verdict, now);
        let granted = headers.iter().position(|(n, _)| *n == "x-api-key-scopes").map(|i| headers.remove(i).1);
        if verdict.outcome != Outcome::Valid {
            let o = verdict.outcome;
            let mut deny = self.render(o.http_status(), o.code_name(), o.error(), o.message(), &path);
            if o.http_status() == 401 {
                deny.headers.push(("www-authenticate", self.www_authenticate("invalid_token")));
            }
            deny.headers.extend(headers);
            return Ok(Decision::Deny(deny));
        }
        let record = verdict.key.as_ref().map(|k| &k.record);
        let key_id = record.map(|r| r.key_id.to_string()).unwrap_or_default();
        let key_tenant = record.map(|r| r.tenant.clone()).unwrap_or_default();
        let env = record.map(|r| r.env.to_string()).unwrap_or_default();
        let kind = record.map_or("secret", |r| r.kind.as_str());
        let mut upstream = vec![
            (KEY_ID, key_id.clone()),
            (ENV, env.clone()),
            (SCOPES, granted.unwrap_or_default()),
            (KIND, kind.to_string()),
        ];
        let mut remove_upstream = Vec::new();
        if key_tenant.is_empty() {
            remove_upstream.push(TENANT.to_string());
        } else {
            upstream.push((TENANT, key_tenant.clone()));
        }
        for name in req.headers.names() {
            let identity = name.len() > IDENTITY_PREFIX.len()
                && name.as_bytes()[..IDENTITY_PREFIX.len()].eq_ignore_ascii_case(IDENTITY_PREFIX.as_bytes());
            if identity {
                let lower = name.to_ascii_lowercase();
                if !upstream.iter().any(|(n, _)| *n == lower) && !remove_upstream.contains(&lower) {
                    remove_upstream.push(lower);
                }
            }
        }
        let mut remove_query = None;
        if self.settings.strip_credential {
            match source {
                Some(Source::Authorization) => remove_upstream.push("authorization".to_string()),
                Some(Source::Header(h)) => remove_upstream.push(h.clone()),
                Some(Source::Query(q)) => remove_query = Some(q.clone()),
                None => {}
            }
        }
        Ok(Decision::Allow(Allow {
            upstream,
            remove_upstream,
            remove_query,
            response: headers,
            key_id,
            tenant: key_tenant,
            env,
        }))
    }

    /// The client's address: the peer, or with `--trusted-hops N` the Nth
    /// `X-Forwarded-For` entry from the right (the peer when there are
    /// fewer).
    fn client_ip<H: RequestHeaders>(&self, req: &ProxyRequest<'_, H>) -> Option<IpAddr> {
        let hops = self.settings.trusted_hops as usize;
        if hops == 0 {
            return req.peer.map(|ip| ip.to_canonical());
        }
        let mut entries: Vec<&str> = Vec::new();
        for v in req.headers.values("x-forwarded-for") {
            entries.extend(v.split(',').map(str::trim).filter(|e| !e.is_empty()));
        }
        if entries.len() < hops {
            return req.peer.map(|ip| ip.to_canonical());
        }
        verdict::parse_ip(entries[entries.len() - hops])
    }

    fn www_authenticate(&self, error: &str) -> String {
        format!("Bearer realm=\"{}\", error=\"{error}\"", self.settings.realm)
    }

    fn deny_request(&self, path: &str, error: &str, message: &str) -> Deny {
        let mut d = self.render(401, "INVALID_REQUEST", error, message, path);
        d.headers.push(("www-authenticate", self.www_authenticate("invalid_request")));
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

/// A comma-separated list, blanks dropped.
fn split_list(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}
