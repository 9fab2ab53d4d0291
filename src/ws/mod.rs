//! WebSocket transport (seed 004): `GET /ws`, the hub that fans presence out to local
//! connections, and the message protocol.

pub mod conn;
pub mod hub;
pub mod protocol;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use std::sync::Arc;

use crate::core::validate_id;
use crate::http::{Http, Res};
use crate::service::ApiError;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    device_id: Option<String>,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `GET /ws`: authenticates before upgrading (a refusal is the JSON envelope, 401/400/429).
pub async fn upgrade(
    State(state): State<Http>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Res {
    let svc = state.svc.clone();
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let who = svc.identify(&headers, q.token.as_deref())?;
    let user = svc.parse_user(&who.sub)?;
    let device = match header(&headers, "x-device-id").or(q.device_id.as_deref()) {
        Some(d) => {
            validate_id("device id", d, svc.limits.max_user_id_len).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            Arc::from(d)
        }
        None => Arc::from(format!("dev-{:016x}", rand::random::<u64>()).as_str()),
    };
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("GET /ws needs a WebSocket upgrade request: {e}")))?;
    let devices = svc.store.devices(&user).await?;
    if devices.len() >= svc.limits.max_devices_per_user && !devices.iter().any(|s| s.device_id == device) {
        return Err(ApiError::LimitExceeded(format!("at most {} devices per user", svc.limits.max_devices_per_user)));
    }
    let max = svc.limits.ws_max_message_bytes.0 as usize;
    Ok(ws
        .read_buffer_size(svc.limits.ws_read_buffer_bytes.0 as usize)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| conn::run(svc, who, user, device, socket)))
}
