//! `GET /api/v2/stats`: the operator view's figures (scope `presence:admin`).

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::Caller;
use super::{ok, Http, Res};
use crate::wire::json::rfc3339;

#[derive(Serialize, ToSchema)]
pub(crate) struct Stats<'a> {
    node_id: &'a str,
    /// `standalone`, `center` or `leaf`.
    node_type: &'static str,
    /// `memory`, `nats` or `redis`.
    backend: &'static str,
    version: &'static str,
    uptime_seconds: u64,
    /// Users with a live session on this node.
    online_users: u64,
    /// Live device sessions on this node (WebSocket, gateway, HTTP heartbeat).
    sessions: u64,
    /// Presence events per second on this node (its own and relayed ones).
    events_per_second: f64,
    /// Why the node is degraded; `null` when it is not.
    #[schema(required)]
    degraded: Option<String>,
    /// Every 10 s over the last hour, oldest first.
    history: Vec<Point>,
    /// Every node of the cluster as its last lease renewal says (this node alone when
    /// standalone).
    nodes: Vec<Node>,
    sinks: Vec<crate::sinks::SinkHealth>,
    /// The cluster backend's connection; `null` when standalone.
    #[schema(required)]
    backend_health: Option<BackendState>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Point {
    #[schema(format = DateTime)]
    at: String,
    online_users: u64,
    sessions: u64,
    events_per_second: f64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Node {
    node_id: String,
    sessions: u64,
    online_users: u64,
    /// When the node last renewed its lease.
    #[schema(format = DateTime)]
    renewed_at: String,
    /// Renewed within its lease TTL.
    alive: bool,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BackendState {
    /// `nats` or `redis`.
    name: &'static str,
    connected: bool,
    state: &'static str,
    server: String,
}

/// The operator view's figures: this node's users, sessions and events per second (now and
/// over the last hour), the cluster's nodes, the event sinks and the backend's health.
#[utoipa::path(get, path = "/api/v2/stats", operation_id = "stats", tag = "operator", summary = "The operator view's figures",
    description = "Needs the `presence:admin` scope.",
    responses((status = 200, description = "The figures", body = super::envelope::Ok<Stats>)),
    security(("bearer" = [])))]
pub async fn stats(State(state): State<Http>, Caller(who): Caller) -> Res {
    let svc = &state.svc;
    svc.require_admin(&who, "the operator view")?;
    let s = svc.stats();
    let now = svc.clock.now();
    let nodes = match &state.cluster {
        Some(c) => c
            .nodes()
            .await?
            .into_iter()
            .map(|l| Node {
                alive: l.ended_at.is_none() && l.renewed_at.saturating_add(l.ttl_ms) >= now,
                renewed_at: rfc3339(l.renewed_at),
                node_id: l.node_id,
                sessions: l.sessions,
                online_users: l.users,
            })
            .collect(),
        None => vec![Node {
            node_id: svc.node_id.to_string(),
            sessions: s.sessions,
            online_users: s.online_users,
            renewed_at: rfc3339(now),
            alive: true,
        }],
    };
    let backend_health = state.cluster.as_ref().map(|c| {
        let h = c.backend_health();
        BackendState { name: c.backend_name(), connected: h.connected, state: h.state, server: h.server }
    });
    let history = state
        .activity
        .history()
        .into_iter()
        .map(|p| Point { at: rfc3339(p.at), online_users: p.online_users, sessions: p.sessions, events_per_second: p.events_per_second })
        .collect();
    Ok(ok(Stats {
        node_id: &svc.node_id,
        node_type: state.node_type,
        backend: state.backend,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        online_users: s.online_users,
        sessions: s.sessions,
        events_per_second: state.activity.events_per_second(svc),
        degraded: svc.degraded(),
        history,
        nodes,
        sinks: state.sinks.as_ref().map(|s| s.health()).unwrap_or_default(),
        backend_health,
    }))
}
