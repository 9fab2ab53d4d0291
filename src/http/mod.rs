//! HTTP transport: REST API v2 (seed 003 §4), health and metrics. Thin: handlers extract,
//! call [`Service`], and encode; every error leaves as the JSON envelope.

mod account;
pub mod envelope;
mod extract;
mod gateway;
mod health;
mod legacy;
pub mod openapi;
mod presence;
mod schema;
mod social;
mod stats;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::ApiError;
use crate::service::Service;

/// What handlers return: an error leaves as the JSON envelope (`ApiError: IntoResponse`).
pub type Res = Result<Response, ApiError>;

/// State shared by the handlers.
#[derive(Clone)]
pub struct Http {
    pub svc: Arc<Service>,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    pub backend: &'static str,
    pub node_type: &'static str,
    /// `cache.max_cost`, reported by `/health/cache`.
    pub cache_max_cost: u64,
    pub request_metrics: Arc<RequestMetrics>,
    /// `serve --dev`: enables `GET /dev/token`.
    pub dev: bool,
    /// Cluster mode's store, whose backend `/health/nats` or `/health/redis` reports.
    pub cluster: Option<crate::store::cluster::ClusterStore>,
    /// The event sinks `/health` lists.
    pub sinks: Option<Arc<crate::sinks::Sinks>>,
    /// The operator view's history (`/api/v2/stats`).
    pub activity: Arc<crate::service::activity::Activity>,
    /// `logging.access_log`: a line per request.
    pub access_log: bool,
}

/// The HTTP API's routes (without the layers: see [`layered`]).
pub fn routes(state: Http) -> Router {
    // A batch of sessions may exceed `limits.max_body_bytes`: room for every entry.
    let batch_limit = axum::extract::DefaultBodyLimit::max(
        (state.svc.limits.max_sessions_per_call.saturating_mul(512)).max(state.svc.limits.max_body_bytes.0 as usize),
    );
    let mut r = Router::new()
        .route("/", get(page))
        .route("/favicon.ico", get(favicon))
        .route("/api/v2/presence", get(presence::get_many))
        .route("/api/v2/presence/batch", post(presence::batch))
        .route("/api/v2/presence/{user_id}", get(presence::get_one).put(presence::put).delete(presence::delete))
        .route("/api/v2/presence/{user_id}/privacy", get(social::get_privacy).put(social::put_privacy))
        .route("/api/v2/contacts/{user_id}", get(social::get_contacts).put(social::put_contacts))
        .route("/api/v2/users/{user_id}", delete(account::erase))
        .route("/api/v2/users/{user_id}/export", get(account::export))
        .route("/api/v2/conversations/{id}/members", get(social::get_members).put(social::put_members))
        .route("/api/v2/conversations/{id}/presence", get(social::get_conversation_presence))
        .route("/api/v2/stats", get(stats::stats))
        .route("/client.js", get(client_js))
        .route("/api/v2/sessions", post(gateway::register).layer(batch_limit))
        .route("/api/v2/sessions/unregister", post(gateway::unregister).layer(batch_limit))
        .route("/api/v2/instances/{id}", delete(gateway::end))
        .route("/api/v2/instances/{id}/refresh", post(gateway::refresh))
        .route("/presence", post(legacy::update))
        .route("/presence/bulk", post(legacy::bulk))
        .route("/presence/heartbeat", post(legacy::heartbeat))
        .route("/presence/bye", post(legacy::bye))
        .route("/presence/typing", post(legacy::typing))
        .route("/presence/{user_id}", get(legacy::get))
        .route("/health", get(health::health))
        .route("/health/cache", get(health::cache))
        .route("/health/nats", get(health::nats))
        .route("/health/redis", get(health::redis))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json));
    if state.dev {
        r = r.route("/dev/token", get(dev_token));
    }
    r.with_state(state)
}

/// Everything served on the HTTP port (these routes merged with others, e.g. `/ws`),
/// with what every route gets: the envelope for unknown routes and methods, the
/// request-duration histogram by route template, `limits.request_timeout`, the body limit.
pub fn layered(router: Router, state: Http) -> Router {
    let body_limit = state.svc.limits.max_body_bytes.0 as usize;
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state, observe))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
}

/// Every route template, so a request's route label is a `&'static str` (a test checks
/// that every route the router serves is here).
pub const ROUTES: [&str; 31] = [
    "/",
    "/favicon.ico",
    "/ws",
    "/api/v2/presence",
    "/api/v2/presence/batch",
    "/api/v2/users/{user_id}",
    "/api/v2/users/{user_id}/export",
    "/api/v2/presence/{user_id}",
    "/api/v2/presence/{user_id}/privacy",
    "/api/v2/contacts/{user_id}",
    "/api/v2/conversations/{id}/members",
    "/api/v2/conversations/{id}/presence",
    "/api/v2/stats",
    "/client.js",
    "/api/v2/sessions",
    "/api/v2/sessions/unregister",
    "/api/v2/instances/{id}",
    "/api/v2/instances/{id}/refresh",
    "/presence",
    "/presence/bulk",
    "/presence/heartbeat",
    "/presence/bye",
    "/presence/typing",
    "/presence/{user_id}",
    "/health",
    "/health/cache",
    "/health/nats",
    "/health/redis",
    "/metrics",
    "/openapi.json",
    "/dev/token",
];

fn route_label(req: &Request) -> &'static str {
    match req.extensions().get::<MatchedPath>() {
        Some(m) => ROUTES.iter().find(|r| **r == m.as_str()).copied().unwrap_or("other"),
        None => "unmatched",
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

type HistKey = (&'static str, &'static str, u16);

/// Histogram handles by (route, method, status): registering a labelled metric costs
/// allocations and a registry lookup, so each combination is registered once.
#[derive(Default)]
pub struct RequestMetrics {
    handles: parking_lot::RwLock<HashMap<HistKey, metrics::Histogram>>,
}

impl RequestMetrics {
    fn record(&self, key: HistKey, secs: f64) {
        if let Some(h) = self.handles.read().get(&key) {
            h.record(secs);
            return;
        }
        let h = metrics::histogram!(
            "http_request_duration_seconds",
            "route" => key.0,
            "method" => key.1,
            "status" => key.2.to_string()
        );
        h.record(secs);
        self.handles.write().insert(key, h);
    }
}

/// Records the request-duration histogram by route, method and status, and bounds the
/// time a request may take (`limits.request_timeout`, answered 503).
async fn observe(State(state): State<Http>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = route_label(&req);
    let method = method_label(req.method());
    // The path only where there is no template to name (it is not copied otherwise).
    let (path, peer) = if state.access_log {
        let peer = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0);
        let path = matches!(route, "unmatched" | "other").then(|| req.uri().path().to_owned());
        (path, peer)
    } else {
        (None, None)
    };
    let resp = match tokio::time::timeout(state.svc.limits.request_timeout.0, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(&ApiError::Unavailable("request timed out".into())),
    };
    let status = resp.status().as_u16();
    let took = start.elapsed();
    state.request_metrics.record((route, method, status), took.as_secs_f64());
    if state.access_log {
        // The route's template, never the query string (a WebSocket token rides there).
        let latency_ms = took.as_secs_f64() * 1000.0;
        let peer = peer.map(tracing::field::display);
        tracing::info!(target: "presenced::access", method, route, path, status, latency_ms, peer, "request");
    }
    resp
}

/// The live page: presence dots over `/ws`, embedded in the binary.
#[utoipa::path(get, path = "/", operation_id = "page", tag = "page", summary = "The live page (and, with an admin token, the operator view)",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
async fn page() -> Response {
    embedded(include_str!("../../web/index.html"), "text/html; charset=utf-8", "no-cache")
}

/// A file embedded in the binary, with its content type and cache policy.
fn embedded(body: &'static str, content_type: &'static str, cache: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

/// The JavaScript client (`clients/js`), as the live page imports it.
#[utoipa::path(get, path = "/client.js", operation_id = "clientJs", tag = "page", summary = "The JavaScript client (ES module)",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript")))]
async fn client_js() -> Response {
    embedded(include_str!("../../clients/js/src/index.js"), "text/javascript; charset=utf-8", "no-cache")
}

/// The live page's icon (browsers ask for `/favicon.ico`): a green presence dot, SVG.
#[utoipa::path(get, path = "/favicon.ico", operation_id = "favicon", tag = "page", summary = "The page's icon",
    responses((status = 200, description = "SVG", body = String, content_type = "image/svg+xml")))]
async fn favicon() -> Response {
    const DOT: &str =
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><circle cx=\"8\" cy=\"8\" r=\"6\" fill=\"#2ecc71\"/></svg>";
    embedded(DOT, "image/svg+xml", "public, max-age=86400")
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DevTokenQuery {
    /// The user the token is for.
    #[param(required, example = "alice")]
    sub: Option<String>,
    /// With `true`: the token has the `presence:admin` scope (the operator view).
    admin: Option<bool>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct DevToken<'a> {
    sub: &'a str,
    token: String,
}

/// `GET /dev/token?sub=alice` (only with `serve --dev`): a token for trying the page.
#[utoipa::path(get, path = "/dev/token", operation_id = "devToken", tag = "page", summary = "A day's token for any user (only with `serve --dev`; 404 otherwise)",
    params(DevTokenQuery),
    responses((status = 200, description = "The token", body = envelope::Ok<DevToken>)))]
async fn dev_token(
    State(state): State<Http>,
    q: Result<axum::extract::Query<DevTokenQuery>, axum::extract::rejection::QueryRejection>,
) -> Res {
    let axum::extract::Query(q) = q.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let sub = q.sub.ok_or_else(|| ApiError::BadRequest("sub is required: /dev/token?sub=alice".into()))?;
    let user = state.svc.parse_user(&sub)?;
    let scope = q.admin.unwrap_or(false).then_some("presence:admin");
    let token = state.svc.auth.mint(user.as_str(), std::time::Duration::from_secs(24 * 3600), scope).map_err(ApiError::Internal)?;
    Ok(ok(DevToken { sub: user.as_str(), token }))
}

async fn not_found(req: Request) -> Response {
    error(&ApiError::NotFound(format!("no route for {} {}", req.method(), req.uri().path())))
}

async fn method_not_allowed(req: Request) -> Response {
    error(&ApiError::MethodNotAllowed(format!("method {} is not allowed on {}", req.method(), req.uri().path())))
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// `{"success":true,"data":...}` with 200.
pub fn ok<T: serde::Serialize>(data: T) -> Response {
    json_response(StatusCode::OK, envelope::ok_body(data))
}

/// The error envelope with the status from the error table. Internal errors are logged
/// here, once, and never leak their detail.
pub fn error(e: &ApiError) -> Response {
    e.report("http");
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, envelope::error_body(e));
    if let ApiError::RateLimited { retry_after_ms } = e {
        let secs = retry_after_ms.div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    if let ApiError::Unauthorized(_) = e {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(&self)
    }
}
