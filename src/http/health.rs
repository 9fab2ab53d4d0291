//! `/health`, `/health/cache`, `/metrics` (seed 003 §11).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{error, ok, Http};
use crate::error::ApiError;

/// Liveness plus store readiness: 200 when the store can serve, 503 otherwise.
pub async fn health(State(state): State<Http>) -> Response {
    let svc = &state.svc;
    let sinks = state.sinks.as_ref().map(|s| s.health()).unwrap_or_default();
    let sink_down = sinks.iter().any(|s| s.state != "up");
    match svc.health().await {
        Ok(()) => ok(json!({
            // degraded: a leaf cut off from the center, still serving its local users; or
            // an event sink failing (its events wait in the outbox).
            "status": if svc.degraded().is_some() || sink_down { "degraded" } else { "ok" },
            "degraded": svc.degraded(),
            "sinks": sinks,
            "node_id": &*svc.node_id,
            "node_type": state.node_type,
            "store": { "backend": state.backend, "ready": true },
            "uptime_seconds": state.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        })),
        Err(e) => error(&e),
    }
}

/// Read statistics of the node's presence cache. With the embedded store the in-memory
/// state *is* the cache: a hit is a read of a known user, a miss a read of an unknown one.
pub async fn cache(State(state): State<Http>) -> Response {
    let s = state.svc.stats();
    let total = s.hits + s.misses;
    ok(json!({
        "type": state.backend,
        "hits": s.hits,
        "misses": s.misses,
        "hit_ratio": if total == 0 { 0.0 } else { s.hits as f64 / total as f64 },
        "keys": s.users,
        "evictions": s.evictions,
        "cost": s.cache_cost,
        "max_cost": state.cache_max_cost,
        "stale": state.svc.degraded().is_some(),
    }))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<Http>) -> Response {
    crate::telemetry::record_store_stats(&state.svc.stats());
    state.metrics.run_upkeep();
    let mut r = state.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// NATS connectivity (seed 003 §11): 200 when connected, 503 while disconnected; with
/// another backend, says NATS is not in use.
pub async fn nats(State(state): State<Http>) -> Response {
    backend(&state, "nats")
}

/// Redis connectivity: as `/health/nats`, for `store.backend: redis`.
pub async fn redis(State(state): State<Http>) -> Response {
    backend(&state, "redis")
}

fn backend(state: &Http, name: &'static str) -> Response {
    match state.cluster.as_ref().filter(|c| c.backend_name() == name) {
        None => ok(json!({ "enabled": false, "backend": state.backend })),
        Some(c) => {
            let h = c.backend_health();
            let s = state.svc.stats();
            if h.connected {
                ok(json!({
                    "enabled": true,
                    "state": h.state,
                    "server": h.server,
                    "urls": h.urls,
                    "node_id": state.svc.node_id.as_ref(),
                    "degraded": state.svc.degraded().is_some(),
                    // Interest-routed fan-out: users followed here, other nodes' events received.
                    "interest": { "watched_users": s.watched_users, "events_received": s.remote_events },
                    "store_writes": s.writes,
                    "sessions_held": s.sessions,
                }))
            } else {
                error(&ApiError::Unavailable(format!("{name} {} ({})", h.state, h.urls)))
            }
        }
    }
}
