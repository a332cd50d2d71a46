//! The HTTP listener (`--http-listen`; README, "Token exchange"): the
//! seed's two-step flow for callers that speak JSON, not gRPC.
//!
//! - `POST /v1/auth/token` `{"secret", "email"?, "scopes"?, "ttl_seconds"?}`
//!   → `200 {"token", "expires_in", "token_type": "Bearer"}`, or
//!   `{"error", "message"}` with 400/401/403/429/503. The same exchange as
//!   gRPC `TokenExchange`.
//! - `GET /.well-known/jwks.json`: the published signing keys.
//! - any method on `/authz` and below: forward-auth for nginx
//!   `auth_request`, Traefik `ForwardAuth`, Caddy `forward_auth` and
//!   Envoy's HTTP ext_authz (README, "Protect an API without code"), over
//!   [`crate::proxy::Gate`]: the original method, host and URI from
//!   `X-Original-Method`/`X-Original-URI` (nginx), `X-Forwarded-Method`/
//!   `-Host`/`-Uri` (Traefik, Caddy) or the request itself (Envoy, which
//!   appends the original path to `/authz`).
//!
//! Bodies are capped at 16 KiB; a call may take at most the request
//! timeout. Converts at its edge, like the gRPC front ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::App;
use crate::proxy::{Decision, Deny, ForwardAuthHeaders, Overrides, ProxyRequest, RequestHeaders};
use crate::service::MAX_REQUEST_BYTES;
use crate::token::exchange::{ExchangeError, ExchangeRequest, exchange};

/// How long a JWKS may be cached by its readers: less than the time a new
/// key is published before it signs.
const JWKS_MAX_AGE: &str = "public, max-age=30";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    secret: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    ttl_seconds: u32,
}

fn error(status: StatusCode, error: &str, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({"error": error, "message": message}))).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn token(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::Json<TokenBody>, JsonRejection>,
) -> Response {
    let Some(tokens) = app.tokens.clone() else {
        return error(StatusCode::NOT_FOUND, "not_found", "token exchange is switched off");
    };
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => {
            // The rejection's text never quotes the body (it may hold a key).
            let message = match e {
                JsonRejection::MissingJsonContentType(_) => "send Content-Type: application/json".to_string(),
                JsonRejection::JsonSyntaxError(_) => "the body is not valid JSON".to_string(),
                JsonRejection::JsonDataError(_) => {
                    "the body must be {\"secret\": \"<api key>\", \"email\": \"...\"} (optional: scopes, ttl_seconds)"
                        .to_string()
                }
                _ => "the body could not be read".to_string(),
            };
            return error(StatusCode::BAD_REQUEST, "invalid_request", &message);
        }
    };
    let req = ExchangeRequest {
        secret: &body.secret,
        email: &body.email,
        scopes: &body.scopes,
        ttl_seconds: body.ttl_seconds,
        peer: Some(peer.ip().to_canonical()),
    };
    match exchange(&app.auth, &tokens, &req).await {
        Ok(issued) => {
            let mut r = axum::Json(json!({
                "token": issued.token.expose(),
                "expires_in": issued.expires_in,
                "token_type": "Bearer",
            }))
            .into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = error(status, e.error(), &e.to_string());
            if let ExchangeError::TooManyFailedAttempts(s) = e {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            r
        }
    }
}

async fn jwks(State(app): State<Arc<App>>) -> Response {
    let keys = app.tokens.as_ref().map_or_else(|| json!({"keys": []}), |t| t.jwks());
    let mut r = axum::Json(keys).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(JWKS_MAX_AGE));
    r
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: POST /v1/auth/token, GET /.well-known/jwks.json, any method on /authz",
    )
}

/// An axum request's headers, as the proxy core reads them.
struct HttpHeaders<'a>(&'a HeaderMap);

impl<'a> RequestHeaders<'a> for HttpHeaders<'a> {
    fn values(&self, name: &str) -> impl Iterator<Item = &'a str> {
        self.0.get_all(name).iter().filter_map(|v| v.to_str().ok())
    }

    fn names_with_prefix(&self, prefix: &'static str) -> impl Iterator<Item = &'a str> {
        self.0
            .keys()
            .map(HeaderName::as_str)
            .filter(move |n| crate::proxy::credentials::has_prefix(n.as_bytes(), prefix))
    }
}

/// The status and body of a deny travel in headers too: nginx's
/// `auth_request` keeps only the headers of a subrequest's answer (and
/// turns a 429 or 503 into its own 500), so its `error_page` location
/// answers from `x-keystile-status` and `x-keystile-body` (`deploy/nginx/`).
const STATUS_HEADER: &str = "x-keystile-status";
const BODY_HEADER: &str = "x-keystile-body";

fn deny_response(deny: Deny) -> Response {
    let status = StatusCode::from_u16(deny.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut r = Response::new(axum::body::Body::from(deny.body.clone()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (name, value) in deny.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.append(HeaderName::from_static(name), v);
        }
    }
    h.insert(STATUS_HEADER, HeaderValue::from(deny.status));
    let flat: String = deny.body.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if let Ok(v) = HeaderValue::from_str(&flat) {
        h.insert(BODY_HEADER, v);
    }
    r
}

async fn authz(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let own_path = match (uri.path().strip_prefix("/authz").unwrap_or(""), uri.query()) {
        ("", None) => "/".to_string(),
        ("", Some(q)) => format!("/?{q}"),
        (p, None) => p.to_string(),
        (p, Some(q)) => format!("{p}?{q}"),
    };
    // One header set, the one the configured proxy writes itself.
    let (original_method, path, host) = match app.gate.settings().forward_auth_headers {
        ForwardAuthHeaders::XOriginal => (
            header("x-original-method").unwrap_or(method.as_str()),
            header("x-original-uri").unwrap_or(&own_path),
            header("x-forwarded-host").or(header("host")).unwrap_or(""),
        ),
        ForwardAuthHeaders::XForwarded => (
            header("x-forwarded-method").unwrap_or(method.as_str()),
            header("x-forwarded-uri").unwrap_or(&own_path),
            header("x-forwarded-host").or(header("host")).unwrap_or(""),
        ),
        ForwardAuthHeaders::Request => (method.as_str(), own_path.as_str(), header("host").unwrap_or("")),
    };
    let view = HttpHeaders(&headers);
    let peer = peer.ip().to_canonical();
    let req = ProxyRequest {
        method: original_method,
        host,
        path,
        headers: &view,
        peer: Some(peer),
        peer_is_proxy: app.gate.is_trusted_proxy(peer),
        overrides: Overrides::default(),
    };
    match app.gate.check(&req).await {
        Ok(Decision::Allow(allow)) => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            for (name, value) in allow.upstream() {
                if let Ok(v) = HeaderValue::try_from(value.to_string()) {
                    h.insert(HeaderName::from_static(name), v);
                }
            }
            allow.each_response_header(|name, value| {
                if let Ok(v) = HeaderValue::try_from(value.to_string()) {
                    h.insert(HeaderName::from_static(name), v);
                }
            });
            r
        }
        Ok(Decision::Deny(deny)) | Err(deny) => deny_response(deny),
    }
}

/// The listener's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/auth/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/authz", any(authz))
        .route("/authz/{*rest}", any(authz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(app)
}

/// Serves the HTTP listener on `listener` until `shutdown` completes; calls
/// in flight get `grace` to finish.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(app).layer(axum::middleware::from_fn(move |req, next: axum::middleware::Next| async move {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the request took too long"),
        }
    }));
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}
