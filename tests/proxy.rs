//! The proxy front ends (README, "Protect an API without code"): Envoy's
//! ext_authz through a real gRPC client built from Envoy's protos,
//! forward-auth over HTTP with Traefik's headers, and a real nginx
//! (`deploy/nginx/keystile.conf`) in front of a tiny upstream.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keystile::clock::Clock;
use keystile::engine::EngineSettings;
use keystile::proto;
use keystile::proxy::{ErrorBody, ProxySettings, RouteTable};
use keystile::server::{FrontEnd, ServerOptions};
use keystile::store::memory::MemoryStore;

/// The README's route table, as shipped.
const ROUTES: &str = include_str!("../deploy/routes.example.toml");

struct Setup {
    server: TestServer,
    store: Arc<MemoryStore>,
    /// The HTTP listener (forward-auth).
    http: String,
}

async fn setup(proxy: ProxySettings) -> Setup {
    let store = Arc::new(MemoryStore::new());
    let mut settings = EngineSettings::new(test_pepper());
    settings.proxy = proxy;
    let options = ServerOptions {
        front_ends: vec![FrontEnd::Verifier, FrontEnd::KeyAdmin, FrontEnd::ExtAuthz],
        ..Default::default()
    };
    let server = TestServer::start_with(store.clone(), settings, options, Clock::system()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap().to_string();
    let app = server.app.clone();
    tokio::spawn(keystile::http::serve(app, listener, Duration::from_secs(5), std::future::pending()));
    Setup { server, store, http }
}

fn routed() -> ProxySettings {
    ProxySettings { routes: RouteTable::parse(ROUTES).unwrap(), ..Default::default() }
}

/// An acme key with `api:read` and its own `analytics` limit (2 a minute).
async fn acme_key(s: &TestServer, scopes: &[&str]) -> (String, proto::KeyRecord) {
    let mut admin = s.admin().await;
    let req = proto::CreateKeyRequest {
        tenant: "acme".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        limits: vec![limit("analytics=2/1m")],
        ..create_req("acme app")
    };
    create(&mut admin, req).await
}

fn check_request(method: &str, host: &str, path: &str, headers: &[(&str, &str)], ext: &[(&str, &str)]) -> CheckRequest {
    let address = Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "203.0.113.9".into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(41000)),
            ..Default::default()
        })),
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer { address: Some(address), ..Default::default() }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: method.into(),
                    host: host.into(),
                    path: path.into(),
                    headers: headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: ext.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }),
    }
}

async fn check(s: &TestServer, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
    let mut client = AuthorizationClient::new(s.channel().await);
    client.check(req).await.map(|r| r.into_inner())
}

fn headers_of(options: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]) -> HashMap<String, String> {
    options.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
}

/// The deny part of a CheckResponse: (http status, headers, JSON body).
fn denied(r: &CheckResponse) -> (i32, HashMap<String, String>, serde_json::Value) {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => (
            d.status.as_ref().unwrap().code,
            headers_of(&d.headers),
            serde_json::from_str(&d.body).unwrap_or_else(|_| panic!("JSON body: {:?}", d.body)),
        ),
        other => panic!("not a deny: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_allows_with_identity_and_denies_with_the_verdicts_status() {
    let s = setup(routed()).await;
    let (key, rec) = acme_key(&s.server, &["api:read"]).await;
    let bearer = format!("Bearer {key}");
    let host = "acme.api.example.com";

    // Allow: identity upstream (client copies overwritten or removed),
    // rate-limit headers to the client, metadata for access logs.
    let req = check_request(
        "GET",
        host,
        "/v1/users?page=2",
        &[("authorization", &bearer), ("x-keystile-tenant", "forged"), ("x-keystile-admin", "yes")],
        &[],
    );
    let r = check(&s.server, req).await.unwrap();
    assert_eq!(r.status.as_ref().unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
    let up = headers_of(&ok.headers);
    assert_eq!(up["x-keystile-key-id"], rec.key_id);
    assert_eq!(up["x-keystile-tenant"], "acme");
    assert_eq!(up["x-keystile-env"], "live");
    assert_eq!(up["x-keystile-scopes"], "api:read");
    assert!(
        ok.headers.iter().all(|h| h.append_action == 2),
        "every identity header overwrites (OVERWRITE_IF_EXISTS_OR_ADD)"
    );
    assert_eq!(ok.headers_to_remove, ["x-keystile-admin"], "other client-sent x-keystile-* headers are removed");
    let meta = r.dynamic_metadata.as_ref().unwrap();
    assert!(format!("{:?}", meta.fields["key_id"]).contains(&rec.key_id));

    // A route naming a limit: its headers go to the client.
    let post = |key: &str| {
        check_request("POST", host, "/v1/export/daily", &[("x-api-key", key)], &[("keystile.scopes", "api:read")])
    };
    let r = check(&s.server, post(&key)).await.unwrap();
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
    let to_client = headers_of(&ok.response_headers_to_add);
    assert_eq!(to_client["x-ratelimit-limit"], "2");
    assert_eq!(to_client["ratelimit-policy"], "\"analytics\";q=2;w=60");
    check(&s.server, post(&key)).await.unwrap();
    let r = check(&s.server, post(&key)).await.unwrap();
    let (status, headers, body) = denied(&r);
    assert_eq!(
        (status, body["error"].as_str(), body["code"].as_str()),
        (429, Some("rate_limited"), Some("RATE_LIMITED"))
    );
    assert_eq!(r.status.as_ref().unwrap().code, tonic::Code::ResourceExhausted as i32);
    assert!(headers["retry-after"].parse::<u64>().unwrap() >= 1);
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert_eq!(headers["content-type"], "application/json");

    // The route's scope (export:data) that the key lacks: 403.
    let r = check(&s.server, check_request("POST", host, "/v1/export", &[("x-api-key", &key)], &[])).await.unwrap();
    let (status, _, body) = denied(&r);
    assert_eq!((status, body["error"].as_str(), body["status"].as_i64()), (403, Some("insufficient_scope"), Some(403)));
    // context_extensions override the route table.
    let ext = [("keystile.scopes", "admin:all")];
    let r = check(&s.server, check_request("GET", host, "/v1/users", &[("x-api-key", &key)], &ext)).await.unwrap();
    assert_eq!(denied(&r).0, 403);
    let ext = [("keystile.tenant", "acme"), ("keystile.scopes", "")];
    let r = check(&s.server, check_request("GET", "other.example", "/x", &[("x-api-key", &key)], &ext)).await.unwrap();
    assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))), "{r:?}");

    // A wrong tenant from the Host.
    let r = check(&s.server, check_request("GET", "globex.api.example.com", "/v1/users", &[("x-api-key", &key)], &[]))
        .await
        .unwrap();
    let (status, _, body) = denied(&r);
    assert_eq!((status, body["error"].as_str()), (403, Some("wrong_tenant")));

    // No credential, and a malformed one: 401 with WWW-Authenticate
    // (RFC 6750: no error code when none was sent).
    for (headers, challenge) in [
        (vec![], "Bearer realm=\"api\""),
        (vec![("authorization", "Bearer nope")], "Bearer realm=\"api\", error=\"invalid_token\""),
    ] {
        let r = check(&s.server, check_request("GET", host, "/v1/users", &headers, &[])).await.unwrap();
        let (status, h, body) = denied(&r);
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_api_key")));
        assert_eq!(h["www-authenticate"], challenge);
        assert_eq!(r.status.as_ref().unwrap().code, tonic::Code::Unauthenticated as i32);
    }

    // Paths are matched as the API reads them: encoded letters, `;`
    // parameters and dot segments do not dodge the export route's scope;
    // an encoded slash is refused.
    for path in ["/v1/%65xport", "/v1/public/..;/export", "/v1/x/../export/", "/v1//export"] {
        let r = check(&s.server, check_request("POST", host, path, &[("x-api-key", &key)], &[])).await.unwrap();
        let (status, _, body) = denied(&r);
        assert_eq!((status, body["error"].as_str()), (403, Some("insufficient_scope")), "{path}");
    }
    let r = check(&s.server, check_request("POST", host, "/v1%2Fexport", &[("x-api-key", &key)], &[])).await.unwrap();
    let (status, _, body) = denied(&r);
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")));
    // A host no pattern places names no tenant: refused, not "any tenant".
    let r = check(&s.server, check_request("GET", "x.acme.api.example.com", "/v1/users", &[("x-api-key", &key)], &[]))
        .await
        .unwrap();
    assert_eq!(denied(&r).2["error"], "wrong_tenant");

    // The seed's headers: X-API-TOKEN in upper case with Bearer.
    let r = check(&s.server, check_request("GET", host, "/v1/users", &[("X-API-TOKEN", &bearer)], &[])).await.unwrap();
    assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))), "{r:?}");
    // Two different credentials: 401 invalid_request.
    let other = acme_key(&s.server, &["api:read"]).await.0;
    let two = [("authorization", bearer.as_str()), ("x-api-key", other.as_str())];
    let r = check(&s.server, check_request("GET", host, "/v1/users", &two, &[])).await.unwrap();
    let (status, h, body) = denied(&r);
    assert_eq!(
        (status, body["error"].as_str(), body["code"].as_str()),
        (401, Some("invalid_request"), Some("INVALID_REQUEST"))
    );
    assert!(h["www-authenticate"].contains("invalid_request"));

    // A revoked key.
    let mut admin = s.server.admin().await;
    admin.revoke_key(proto::RevokeKeyRequest { key_id: rec.key_id.clone() }).await.unwrap();
    let r = check(&s.server, check_request("GET", host, "/v1/users", &[("x-api-key", &key)], &[])).await.unwrap();
    let (status, _, body) = denied(&r);
    assert_eq!((status, body["code"].as_str()), (401, Some("REVOKED")));

    // The store down, for a key not in the cache: UNAVAILABLE, never an allow.
    let (fresh, _) = acme_key(&s.server, &["api:read"]).await;
    s.store.set_failing(true);
    let err =
        check(&s.server, check_request("GET", host, "/v1/users", &[("x-api-key", &fresh)], &[])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    s.store.set_failing(false);
}

/// The identity an allow sends upstream is encoded once per cached key
/// (BENCHMARKS.md, "A Check's answer encoded once per key"), so it must
/// follow every change: a key's own scopes when the key is updated, a
/// tier's when the tier is, on every Check after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_identity_follows_key_and_tier_changes() {
    let s = setup(ProxySettings::default()).await;
    let mut admin = s.server.admin().await;
    let tier = |scopes: &[&str]| proto::SetTierRequest {
        tenant: "acme".into(),
        name: "premium".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    admin.set_tier(tier(&["read:analytics"])).await.unwrap();
    let held = |tiers: &[&str]| proto::CreateKeyRequest {
        tenant: "acme".into(),
        scopes: vec!["profile".into()],
        tiers: tiers.iter().map(|s| s.to_string()).collect(),
        ..create_req("acme app")
    };
    let (tiered, _) = create(&mut admin, held(&["premium"])).await;
    let (plain, plain_rec) = create(&mut admin, held(&[])).await;
    let server = &s.server;
    let scopes_of = |key: String| async move {
        let bearer = format!("Bearer {key}");
        let r = check(server, check_request("GET", "api.example.com", "/v1/x", &[("authorization", &bearer)], &[]))
            .await
            .unwrap();
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
        headers_of(&ok.headers)["x-keystile-scopes"].clone()
    };
    for _ in 0..2 {
        assert_eq!(scopes_of(tiered.clone()).await, "profile,read:analytics");
        assert_eq!(scopes_of(plain.clone()).await, "profile");
    }
    // Each change is seen by the next Checks: the store and the cache are
    // in one process, so within a few milliseconds.
    admin.set_tier(tier(&["read:analytics", "export:data"])).await.unwrap();
    let update = proto::UpdateKeyRequest {
        key_id: plain_rec.key_id.clone(),
        scopes: Some(proto::StringList { values: vec!["profile".into(), "orders:write".into()] }),
        ..Default::default()
    };
    admin.update_key(update).await.unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let (t, p) = (scopes_of(tiered.clone()).await, scopes_of(plain.clone()).await);
        if t == "profile,read:analytics,export:data" && p == "profile,orders:write" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the changes reached ext_authz: {t:?}, {p:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_has_its_own_size_cap_and_strips_credentials() {
    let s = setup(ProxySettings { strip_credential: true, ..routed() }).await;
    let (key, _) = acme_key(&s.server, &["api:read"]).await;
    // The same key in two places: both stripped.
    let bearer = format!("Bearer {key}");
    let two = [("x-api-key", key.as_str()), ("authorization", bearer.as_str())];
    let r = check(&s.server, check_request("GET", "acme.api.example.com", "/v1/a", &two, &[])).await.unwrap();
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
    assert!(ok.headers_to_remove.contains(&"x-api-key".to_string()), "{:?}", ok.headers_to_remove);
    assert!(ok.headers_to_remove.contains(&"authorization".to_string()), "{:?}", ok.headers_to_remove);
    // Envoy's raw header values (header_map), as sent with
    // encode_raw_headers: read like the map.
    let mut raw = check_request("GET", "acme.api.example.com", "/v1/a", &[], &[]);
    let http = raw.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
    http.header_map = Some(envoy_types::pb::envoy::config::core::v3::HeaderMap {
        headers: vec![envoy_types::ext_authz::v3::pb::HeaderValue {
            key: "x-api-key".into(),
            value: String::new(),
            raw_value: key.clone().into_bytes(),
        }],
    });
    let r = check(&s.server, raw).await.unwrap();
    assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))), "{r:?}");
    // A key without scopes: the empty scopes header is removed, not set.
    let mut admin = s.server.admin().await;
    let (bare, _) = create(&mut admin, proto::CreateKeyRequest { tenant: "acme".into(), ..create_req("bare") }).await;
    let ext = [("keystile.scopes", "")];
    let r = check(&s.server, check_request("GET", "acme.api.example.com", "/v1/a", &[("x-api-key", &bare)], &ext))
        .await
        .unwrap();
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
    assert!(ok.headers_to_remove.contains(&"x-keystile-scopes".to_string()));
    assert!(!headers_of(&ok.headers).contains_key("x-keystile-scopes"));
    // 40 KiB of headers: over the 16 KiB of keystile's own services, within
    // ext_authz's 64 KiB.
    let big = "x".repeat(40 * 1024);
    let req = check_request("GET", "acme.api.example.com", "/v1/a", &[("x-api-key", &key), ("cookie", &big)], &[]);
    let r = check(&s.server, req).await.unwrap();
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
    assert!(ok.headers_to_remove.contains(&"x-api-key".to_string()), "the credential is stripped");
    let huge = "x".repeat(80 * 1024);
    let req = check_request("GET", "acme.api.example.com", "/v1/a", &[("x-api-key", &key), ("cookie", &huge)], &[]);
    let err = check(&s.server, req).await.unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
        "{err:?}"
    );
}

/// Forward-auth with the headers Traefik and Caddy send; the client address
/// from X-Forwarded-For with one trusted hop; a malformed-credential flood
/// costs no store access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_with_traefik_headers() {
    let s = setup(ProxySettings {
        trusted_hops: 1,
        forward_auth_headers: keystile::proxy::ForwardAuthHeaders::XForwarded,
        ..routed()
    })
    .await;
    let (key, rec) = office_key(&s.server).await;
    let front = s.http.clone();
    let ask = move |key: String, xff: &'static str, uri: &'static str| {
        let front = front.clone();
        async move { tokio::task::spawn_blocking(move || http_request_traefik(&front, &key, xff, uri)).await.unwrap() }
    };
    let ok = ask(key.clone(), "10.0.0.1, 198.51.100.7", "/v1/users?x=1").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.header("x-keystile-key-id"), Some(rec.key_id.as_str()));
    assert_eq!(ok.header("x-keystile-tenant"), Some("acme"));
    let outside = ask(key.clone(), "198.51.100.7, 10.0.0.1", "/v1/users").await;
    assert_eq!(outside.status, 403, "the last hop's address is the client's");
    assert_eq!(outside.json()["error"], "ip_not_allowed");
    assert_eq!(outside.header("x-keystile-status"), Some("403"));
    assert_eq!(outside.header("content-type"), Some("application/json"));

    // A client cannot name another path in the header set Traefik does
    // not write: X-Original-URI is not read in x-forwarded mode.
    let addr = s.http.clone();
    let key3 = key.clone();
    let forged = tokio::task::spawn_blocking(move || {
        http(
            &addr,
            "GET",
            "/authz",
            &[
                ("X-Forwarded-Method", "POST"),
                ("X-Forwarded-Host", "acme.api.example.com"),
                ("X-Forwarded-Uri", "/v1/export"),
                ("X-Forwarded-For", "198.51.100.7"),
                ("X-Original-URI", "/health"),
                ("X-Original-Method", "GET"),
                ("X-Api-Key", &key3),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!((forged.status, forged.json()["error"].as_str()), (403, Some("insufficient_scope")));

    // Requests with no credential at all are no failed attempts: many of
    // them from one address leave that address's unknown keys unshed.
    let addr = s.http.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..40 {
            let r = http(
                &addr,
                "OPTIONS",
                "/authz",
                &[("X-Forwarded-Uri", "/v1/users"), ("X-Forwarded-For", "198.51.100.9")],
            );
            assert_eq!(r.status, 401);
            assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"api\""));
        }
    })
    .await
    .unwrap();
    let (fresh, _) = {
        let mut admin = s.server.admin().await;
        let req = proto::CreateKeyRequest {
            tenant: "acme".into(),
            scopes: vec!["api:read".into()],
            ..create_req("not yet cached")
        };
        create(&mut admin, req).await
    };
    let ok = ask(fresh, "198.51.100.9", "/v1/users").await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // Envoy's HTTP ext_authz: the original path appended to /authz.
    let addr = s.http.clone();
    let key2 = key.clone();
    let envoy = tokio::task::spawn_blocking(move || {
        http(
            &addr,
            "GET",
            "/authz/v1/users",
            &[
                ("Host", "acme.api.example.com"),
                ("Authorization", &format!("bearer {key2}")),
                ("X-Forwarded-For", "198.51.100.8"),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(envoy.status, 200, "{}", envoy.body);

    // A flood of forged, malformed credentials: no store access at all.
    let before = s.store.calls();
    let addr = s.http.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..200 {
            let r = http(
                &addr,
                "GET",
                "/authz",
                &[
                    ("X-Forwarded-Host", "acme.api.example.com"),
                    ("X-Forwarded-Uri", "/v1/users"),
                    ("X-Api-Key", &format!("ks_live_forged{i}")),
                    ("X-Forwarded-For", "192.0.2.1"),
                ],
            );
            assert!(r.status == 401 || r.status == 429, "{}", r.status);
        }
    })
    .await
    .unwrap();
    assert_eq!(s.store.calls(), before, "zero store commands for malformed credentials");
}

/// An acme key with `api:read`, usable from 198.51.100.0/24 only.
async fn office_key(s: &TestServer) -> (String, proto::KeyRecord) {
    let mut admin = s.admin().await;
    let req = proto::CreateKeyRequest {
        tenant: "acme".into(),
        scopes: vec!["api:read".into()],
        ip_allowlist: vec!["198.51.100.0/24".into()],
        ..create_req("office only")
    };
    create(&mut admin, req).await
}

fn http_request_traefik(addr: &str, key: &str, xff: &str, uri: &str) -> HttpReply {
    http(
        addr,
        "GET",
        "/authz",
        &[
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "acme.api.example.com"),
            ("X-Forwarded-Uri", uri),
            ("X-Forwarded-For", xff),
            ("X-Api-Key", key),
        ],
    )
}

/// A tiny upstream that records what reaches it.
async fn upstream() -> (String, Arc<Mutex<Vec<HashMap<String, String>>>>) {
    let seen: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let record = record.clone();
        async move {
            let h = headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
            record.lock().unwrap().push(h);
            "upstream ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn nginx_binary() -> String {
    for candidate in ["nginx", "/usr/sbin/nginx"] {
        if std::process::Command::new(candidate).arg("-v").output().is_ok() {
            return candidate.to_string();
        }
    }
    panic!("nginx is needed for this test (Debian: apt-get install nginx-light; .ci/run installs it)");
}

struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy/nginx/keystile.conf` as shipped, with the ports of this test.
fn start_nginx(listen: u16, keystile: &str, api: &str) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/keystile.conf")).unwrap();
    let site = shipped
        .replace("server 127.0.0.1:8081;", &format!("server {keystile};"))
        .replace("server 127.0.0.1:3000;", &format!("server {api};"))
        .replace("listen 8000;", &format!("listen 127.0.0.1:{listen};"));
    assert_ne!(site, shipped);
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{site}\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(nginx_binary())
        .args(["-e", &format!("{d}/error.log"), "-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx { child, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_nginx_in_front_of_an_api() {
    let s = setup(ProxySettings { trusted_hops: 1, ..routed() }).await;
    let (api, seen) = upstream().await;
    let port = free_port();
    let _nginx = start_nginx(port, &s.http, &api);
    let (key, rec) = acme_key(&s.server, &["api:read"]).await;
    let front = format!("127.0.0.1:{port}");
    let get = |host: &'static str, path: &'static str, headers: Vec<(&'static str, String)>| {
        let front = front.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut all: Vec<(&str, &str)> = vec![("Host", host)];
                all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
                http(&front, "GET", path, &all)
            })
            .await
            .unwrap()
        }
    };
    let host = "acme.api.example.com";

    // Allowed: reaches the API with keystile's identity, not the client's.
    let r = get(
        host,
        "/v1/users",
        vec![("Authorization", format!("Bearer {key}")), ("X-Keystile-Tenant", "forged".into())],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "upstream ok"));
    let upstream_saw = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(upstream_saw["x-keystile-key-id"], rec.key_id);
    assert_eq!(upstream_saw["x-keystile-tenant"], "acme");
    assert_eq!(upstream_saw["x-keystile-scopes"], "api:read");
    assert!(!upstream_saw.contains_key("authorization"), "the key does not reach the API");
    let reached = seen.lock().unwrap().len();

    // A wrong tenant by subdomain: 403 with keystile's body.
    let r = get("globex.api.example.com", "/v1/users", vec![("X-Api-Key", key.clone())]).await;
    assert_eq!(r.status, 403, "{r:?}", r = r.body);
    assert_eq!(r.json()["error"], "wrong_tenant");
    assert_eq!(r.header("content-type"), Some("application/json"));
    // A spent limit (the analytics route allows 2 a minute): 429 with
    // Retry-After and the rate-limit headers.
    let export = |key: String| {
        let front = front.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                http(&front, "POST", "/v1/export", &[("Host", host), ("X-Api-Key", &key)])
            })
            .await
            .unwrap()
        }
    };
    // A missing scope by route (POST /v1/export needs export:data).
    let r = export(key.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "insufficient_scope");
    let exporter = acme_key(&s.server, &["api:read", "export:data"]).await.0;
    assert_eq!(export(exporter.clone()).await.status, 200);
    assert_eq!(export(exporter.clone()).await.status, 200);
    let r = export(exporter.clone()).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"], "rate_limited");
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().unwrap() >= 1), "{:?}", r.headers);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));

    // A revoked key: 401 with WWW-Authenticate and keystile's body.
    let mut admin = s.server.admin().await;
    admin.revoke_key(proto::RevokeKeyRequest { key_id: rec.key_id.clone() }).await.unwrap();
    let r = get(host, "/v1/users", vec![("X-Api-Key", key.clone())]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "REVOKED");
    assert_eq!(r.all("www-authenticate"), ["Bearer realm=\"api\", error=\"invalid_token\""]);
    // No key at all.
    let r = get(host, "/v1/users", vec![]).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("invalid_api_key")));

    // The store down for a key not cached: refused, never let through.
    let (fresh, _) = acme_key(&s.server, &["api:read"]).await;
    s.store.set_failing(true);
    let r = get(host, "/v1/users", vec![("X-Api-Key", fresh)]).await;
    s.store.set_failing(false);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAVAILABLE");

    let upstream_count = seen.lock().unwrap().len();
    assert_eq!(upstream_count, reached + 2, "the API saw the allowed requests only (the two exports)");
}

/// The Nudj shape (README, "Protect an API without code"): an error body
/// template for every deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_error_body_shapes_every_deny() {
    let template =
        r#"{"message": "{message}", "code": "UNAUTHORIZED", "data": {"httpStatus": {status}, "path": "{path}"}}"#;
    let s = setup(ProxySettings { error_body: ErrorBody::parse(template).unwrap(), ..routed() }).await;
    let addr = s.http.clone();
    let r = tokio::task::spawn_blocking(move || {
        http(&addr, "GET", "/authz", &[("X-Original-URI", "/v1/users?secret=1"), ("X-Original-Method", "GET")])
    })
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    let body = r.json();
    assert_eq!(body["code"], "UNAUTHORIZED");
    assert_eq!(body["data"]["httpStatus"], 401);
    assert_eq!(body["data"]["path"], "/v1/users", "the path, never the query");
    assert_eq!(r.header("x-keystile-body").map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()), Some(body));
}

/// X-Forwarded-For is believed only from a trusted proxy: from anyone else
/// the peer's own address is the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_only_from_trusted_proxies() {
    let s = setup(ProxySettings { trusted_hops: 1, trusted_proxies: vec![], ..routed() }).await;
    let (key, _) = office_key(&s.server).await;
    let addr = s.http.clone();
    let r = tokio::task::spawn_blocking(move || {
        http(
            &addr,
            "GET",
            "/authz",
            &[
                ("X-Original-URI", "/v1/users"),
                ("X-Forwarded-Host", "acme.api.example.com"),
                ("X-Forwarded-For", "198.51.100.7"),
                ("X-Api-Key", &key),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (403, Some("ip_not_allowed")),
        "the peer (127.0.0.1) is the client"
    );
}
