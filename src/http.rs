//! The HTTP listener (`--http-listen`; README, "Token exchange"): the
//! seed's two-step flow for callers that speak JSON, not gRPC.
//!
//! - `POST /v1/auth/token` `{"secret", "email"?, "scopes"?, "ttl_seconds"?}`
//!   → `200 {"token", "expires_in", "token_type": "Bearer"}`, or
//!   `{"error", "message"}` with 400/401/403/429/503. The same exchange as
//!   gRPC `TokenExchange`.
//! - `GET /.well-known/jwks.json`: the published signing keys.
//!
//! Bodies are capped at 16 KiB; a call may take at most the request
//! timeout. Converts at its edge, like the gRPC front ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::App;
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
    error(StatusCode::NOT_FOUND, "not_found", "no such endpoint: POST /v1/auth/token, GET /.well-known/jwks.json")
}

/// The listener's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/auth/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
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
