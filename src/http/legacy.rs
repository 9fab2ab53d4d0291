//! The seed 004 HTTP endpoints under `/presence`, for clients that cannot hold a
//! WebSocket. Same semantics as the WebSocket messages, same envelope and error codes.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use super::presence::{batch_read, body_bytes, identity, parse_json, presence_map};
use super::{Http, Res};
use crate::error::ApiError;
use crate::json::rfc3339;
use crate::service::StatusWrite;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    online_status: Option<String>,
    custom_status: Option<String>,
    ttl: Option<i64>,
}

/// `POST /presence` `{"online_status", "custom_status"}`: sets the caller's status.
pub async fn update(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let user = state.svc.parse_user(&who.sub)?;
    let bytes = body_bytes(body)?;
    let b: UpdateBody = parse_json(&bytes)?;
    let p =
        state.svc.set_status(&who, &user, StatusWrite { status: b.online_status, message: b.custom_status, ttl_seconds: b.ttl }).await?;
    Ok(presence_map(&state, std::slice::from_ref(&p)))
}

/// `GET /presence/{user_id}`
pub async fn get(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    super::presence::get_one(State(state), headers, path).await
}

/// `POST /presence/bulk` `{"user_ids": [...]}`
pub async fn bulk(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    batch_read(&state, &headers, body).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    device_id: Option<String>,
    platform: Option<String>,
}

/// `POST /presence/heartbeat`: keeps the caller's device session alive, opening it if
/// needed (device from `X-Device-ID` or `device_id`; default `http`). A client that stops
/// heartbeating goes offline after `presence.session_ttl`.
pub async fn heartbeat(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let user = state.svc.parse_user(&who.sub)?;
    let bytes = body_bytes(body)?;
    let b: HeartbeatBody = if bytes.iter().all(u8::is_ascii_whitespace) { HeartbeatBody::default() } else { parse_json(&bytes)? };
    let device =
        headers.get("x-device-id").and_then(|v| v.to_str().ok()).map(str::to_string).or(b.device_id).unwrap_or_else(|| "http".into());
    state.svc.check_id("device id", &device)?;
    let svc = &state.svc;
    let platform_header = headers.get("x-device-platform").and_then(|v| v.to_str().ok());
    let platform = svc.parse_platform(platform_header.or(b.platform.as_deref()))?;
    let (expires_at, _) = svc.sessions.heartbeat_or_open(&user, &device, &svc.http_instance, platform).await?;
    Ok(super::ok(json!({ "user_id": user.as_str(), "device_id": device, "expires_at": rfc3339(expires_at) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypingBody {
    conversation_id: Option<String>,
    is_typing: Option<bool>,
}

/// `POST /presence/typing` `{"conversation_id", "is_typing"}`
pub async fn typing(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let user = state.svc.parse_user(&who.sub)?;
    let bytes = body_bytes(body)?;
    let b: TypingBody = parse_json(&bytes)?;
    let (Some(conv), Some(is_typing)) = (b.conversation_id, b.is_typing) else {
        return Err(ApiError::BadRequest("typing needs conversation_id and is_typing".into()));
    };
    state.svc.check_id("conversation id", &conv)?;
    state.svc.check_write_rate(&user)?;
    state.svc.typists.set(&user, &conv, is_typing).await?;
    let conv: Arc<str> = Arc::from(conv);
    Ok(super::ok(json!({ "conversation_id": &*conv, "user_id": user.as_str(), "is_typing": is_typing })))
}
