//! `/health`, `/health/cache`, `/metrics` (seed 003 §11).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::{error, ok, Http};
use crate::error::ApiError;

#[derive(Serialize, ToSchema)]
pub(crate) struct Health<'a> {
    /// `ok`, or `degraded`: a leaf cut off from the center, still serving its local users;
    /// or an event sink failing (its events wait in the outbox).
    #[schema(example = "ok")]
    status: &'static str,
    /// Why the node is degraded; `null` when it is not.
    #[schema(required)]
    degraded: Option<String>,
    sinks: Vec<crate::sinks::SinkHealth>,
    node_id: &'a str,
    /// `standalone`, `center` or `leaf`.
    node_type: &'static str,
    store: StoreHealth,
    uptime_seconds: u64,
    version: &'static str,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct StoreHealth {
    /// `memory`, `nats` or `redis`.
    backend: &'static str,
    ready: bool,
}

/// Liveness plus store readiness: 200 when the store can serve, 503 otherwise.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "health", summary = "Liveness and store readiness",
    responses((status = 200, description = "The node can serve", body = super::envelope::Ok<Health>),
              (status = 503, description = "The store cannot serve", body = super::envelope::Err)))]
pub async fn health(State(state): State<Http>) -> Response {
    let svc = &state.svc;
    let sinks = state.sinks.as_ref().map(|s| s.health()).unwrap_or_default();
    let sink_down = sinks.iter().any(|s| s.state == "down");
    match svc.health().await {
        Ok(()) => ok(Health {
            status: if svc.degraded().is_some() || sink_down { "degraded" } else { "ok" },
            degraded: svc.degraded(),
            sinks,
            node_id: &svc.node_id,
            node_type: state.node_type,
            store: StoreHealth { backend: state.backend, ready: true },
            uptime_seconds: state.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION"),
        }),
        Err(e) => error(&e),
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct CacheStats {
    /// The store backend.
    #[serde(rename = "type")]
    kind: &'static str,
    hits: u64,
    misses: u64,
    hit_ratio: f64,
    /// Users held.
    keys: u64,
    evictions: u64,
    cost: u64,
    max_cost: u64,
    /// The node is degraded: reads may be stale.
    stale: bool,
}

/// Read statistics of the node's presence cache. With the embedded store the in-memory
/// state *is* the cache: a hit is a read of a known user, a miss a read of an unknown one.
#[utoipa::path(get, path = "/health/cache", operation_id = "healthCache", tag = "health", summary = "The node's presence cache",
    responses((status = 200, description = "Cache statistics", body = super::envelope::Ok<CacheStats>)))]
pub async fn cache(State(state): State<Http>) -> Response {
    let s = state.svc.stats();
    let total = s.hits + s.misses;
    ok(CacheStats {
        kind: state.backend,
        hits: s.hits,
        misses: s.misses,
        hit_ratio: if total == 0 { 0.0 } else { s.hits as f64 / total as f64 },
        keys: s.users,
        evictions: s.evictions,
        cost: s.cache_cost,
        max_cost: state.cache_max_cost,
        stale: state.svc.degraded().is_some(),
    })
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "health", summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Http>) -> Response {
    crate::telemetry::record_store_stats(&state.svc.stats());
    state.metrics.run_upkeep();
    let mut text = state.metrics.render();
    text.push_str(&crate::telemetry::process_metrics());
    let mut r = text.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// NATS connectivity (seed 003 §11): 200 when connected, 503 while disconnected; with
/// another backend, says NATS is not in use.
#[utoipa::path(get, path = "/health/nats", operation_id = "healthNats", tag = "health", summary = "NATS connectivity (cluster mode)",
    responses((status = 200, description = "Connected, or NATS not in use (`enabled: false`)", body = super::envelope::Ok<BackendHealth>),
              (status = 503, description = "Disconnected", body = super::envelope::Err)))]
pub async fn nats(State(state): State<Http>) -> Response {
    backend(&state, "nats")
}

/// Redis connectivity: as `/health/nats`, for `store.backend: redis`.
#[utoipa::path(get, path = "/health/redis", operation_id = "healthRedis", tag = "health", summary = "Redis connectivity (cluster mode)",
    responses((status = 200, description = "Connected, or Redis not in use (`enabled: false`)", body = super::envelope::Ok<BackendHealth>),
              (status = 503, description = "Disconnected", body = super::envelope::Err)))]
pub async fn redis(State(state): State<Http>) -> Response {
    backend(&state, "redis")
}

/// A cluster backend's health; with another backend only `enabled: false` and `backend`.
#[derive(Serialize, ToSchema, Default)]
pub(crate) struct BackendHealth<'a> {
    enabled: bool,
    /// The backend in use, when it is not this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    urls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    degraded: Option<bool>,
    /// Interest-routed fan-out: users followed here, other nodes' events received.
    #[serde(skip_serializing_if = "Option::is_none")]
    interest: Option<Interest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sessions_held: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Interest {
    /// Users this node listens to.
    watched_users: u64,
    /// Taking every user's events through one subscription (above
    /// `store.interest_all_above` watched users, or for a watch-all stream).
    all: bool,
    events_received: u64,
}

fn backend(state: &Http, name: &'static str) -> Response {
    match state.cluster.as_ref().filter(|c| c.backend_name() == name) {
        None => ok(BackendHealth { enabled: false, backend: Some(state.backend), ..Default::default() }),
        Some(c) => {
            let h = c.backend_health();
            let s = state.svc.stats();
            if h.connected {
                ok(BackendHealth {
                    enabled: true,
                    backend: None,
                    state: Some(h.state),
                    server: Some(h.server),
                    urls: Some(h.urls),
                    node_id: Some(&state.svc.node_id),
                    degraded: Some(state.svc.degraded().is_some()),
                    interest: Some(Interest { watched_users: s.watched_users, all: c.interest_all(), events_received: s.remote_events }),
                    store_writes: Some(s.writes),
                    sessions_held: Some(s.sessions),
                })
            } else {
                error(&ApiError::Unavailable(format!("{name} {} ({})", h.state, h.urls)))
            }
        }
    }
}
