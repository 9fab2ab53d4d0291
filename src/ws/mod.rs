//! WebSocket transport (seed 004): `GET /ws` (its own router, merged with the HTTP API's
//! in `server.rs`), the hub that fans presence out to local connections, and the message
//! protocol.

pub mod client;
pub mod conn;
pub mod hub;
pub mod protocol;
pub mod push_queue;
pub mod rooms;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::error::ApiError;
use crate::service::Service;
use hub::Hub;
use upgrade::{Refused, Upgrade};

/// What the `/ws` handler needs.
#[derive(Clone)]
pub struct Ws {
    pub svc: Arc<Service>,
    pub hub: Arc<Hub>,
}

/// `GET /ws`.
pub fn router(state: Ws) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(state)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// The JWT, for clients that cannot set `Authorization` (browsers).
    token: Option<String>,
    /// The device (or `X-Device-ID`); absent: a random `dev-…` id.
    device_id: Option<String>,
    /// `desktop`, `mobile` or `web` (or `X-Device-Platform`).
    platform: Option<String>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `GET /ws`: authenticates, applies the per-IP connection rate limit and opens the
/// device session (the device limit is enforced there, atomically) before upgrading, so
/// a refusal is the JSON envelope (401/400/429). Documented in `http::openapi`.
pub async fn upgrade(
    state: State<Ws>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<Upgrade, Refused>,
) -> Result<Response, ApiError> {
    let addr = peer.as_ref().map(|Extension(ConnectInfo(a))| *a);
    let answer = handshake(state, peer, headers, query, ws).await;
    if let Err(e) = &answer {
        // Refusals are counted in metrics; at debug, each is also a log line (never the token).
        tracing::debug!(peer = ?addr, error = %e, "WebSocket handshake refused");
    }
    answer
}

async fn handshake(
    State(state): State<Ws>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<Upgrade, Refused>,
) -> Result<Response, ApiError> {
    let (svc, hub) = (state.svc.clone(), state.hub.clone());
    if let Some(Extension(ConnectInfo(addr))) = peer {
        svc.check_connect_rate(addr.ip())?;
    }
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let who = svc.identify(&headers, q.token.as_deref())?.via("ws", peer.as_ref().map(|Extension(ConnectInfo(a))| *a));
    let user = svc.parse_user(&who.sub)?;
    let device = match header(&headers, "x-device-id").or(q.device_id.as_deref()) {
        Some(d) => {
            svc.check_id("device id", d)?;
            Arc::from(d)
        }
        None => Arc::from(format!("dev-{:016x}", rand::random::<u64>()).as_str()),
    };
    let platform = svc.parse_platform(header(&headers, "x-device-platform").or(q.platform.as_deref()))?;
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("GET /ws needs a WebSocket upgrade request: {e}")))?;
    let hello = protocol::connected(
        user.as_str(),
        &device,
        platform,
        &svc.node_id,
        svc.presence.heartbeat_interval.0.as_secs(),
        svc.presence.session_ttl.0.as_secs(),
        svc.presence.typing_ttl.0.as_secs().max(1),
    );
    let conn = hub.connect(user, device, platform, who.is_admin(), hello).await?;
    let max = svc.limits.ws_max_message_bytes.0 as usize;
    let failed = (hub.clone(), conn.clone());
    let config = WebSocketConfig::default()
        .read_buffer_size(svc.limits.ws_read_buffer_bytes.0 as usize)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let failed = move |e: hyper::Error| {
        tracing::debug!(error = %e, "WebSocket upgrade failed; ending the session it opened");
        let (hub, conn) = failed;
        // As a lost socket: held for the grace (a reload whose upgrade broke off).
        let leave = crate::service::sessions::Leave::Lost { last_heard: hub.now() };
        tokio::spawn(async move { hub.disconnect(&conn, leave).await });
    };
    Ok(ws.config(config).on_upgrade(failed, move |socket| conn::run(svc, hub, who, conn, socket)))
}
