//! The seed 004 HTTP endpoints under `/presence`, for clients that cannot hold a
//! WebSocket. Same semantics as the WebSocket messages, same envelope and error codes.

use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{Body, Caller, UserParam, Viewer};
use super::presence::{batch_read, presence_map, BatchBody, PresenceAnswer};
use super::schema::UserPath;
use super::{Http, Res};
use crate::core::Platform;
use crate::error::ApiError;
use crate::service::sessions::Leave;
use crate::service::StatusWrite;
use crate::wire::json::rfc3339;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    /// `online`, `away`, `busy` or `offline`.
    #[schema(schema_with = super::schema::status, required = true)]
    online_status: Option<String>,
    /// The custom message.
    custom_status: Option<String>,
    /// Seconds until the status lapses; absent: `presence.default_status_ttl`; `0`: until
    /// changed.
    #[schema(minimum = 0)]
    ttl: Option<i64>,
}

/// `POST /presence` `{"online_status", "custom_status"}`: sets the caller's status.
#[utoipa::path(post, path = "/presence", operation_id = "legacySetPresence", tag = "legacy", summary = "Set the caller's status (seed 004)",
    request_body = UpdateBody,
    responses((status = 200, description = "The presence after the write", body = PresenceAnswer)),
    security(("bearer" = [])))]
pub async fn update(State(state): State<Http>, Caller(who): Caller, body: Body) -> Res {
    let user = state.svc.parse_user(&who.sub)?;
    let b: UpdateBody = body.json()?;
    if b.online_status.is_none() {
        return Err(ApiError::BadRequest("online_status is required (online, away, busy or offline)".into()));
    }
    let p =
        state.svc.set_status(&who, &user, StatusWrite { status: b.online_status, message: b.custom_status, ttl_seconds: b.ttl }).await?;
    Ok(presence_map(&state, std::slice::from_ref(&p)))
}

/// `GET /presence/{user_id}`
#[utoipa::path(get, path = "/presence/{user_id}", operation_id = "legacyGetPresence", tag = "legacy", summary = "One user's presence (seed 004)",
    params(UserPath), responses((status = 200, description = "The presence", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn get(state: State<Http>, viewer: Viewer, user: UserParam) -> Res {
    super::presence::get_one(state, viewer, user).await
}

/// `POST /presence/bulk` `{"user_ids": [...]}`
#[utoipa::path(post, path = "/presence/bulk", operation_id = "legacyGetPresenceBulk", tag = "legacy", summary = "Several users' presence (seed 004)",
    request_body = BatchBody, responses((status = 200, description = "The presence of each user", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn bulk(State(state): State<Http>, Viewer(viewer): Viewer, body: Body) -> Res {
    batch_read(&state, viewer.as_ref(), body).await
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatBody {
    /// The device (the `X-Device-ID` header wins); default `http`.
    #[schema(schema_with = super::schema::id_or_null, example = "laptop")]
    device_id: Option<String>,
    /// `desktop`, `mobile` or `web` (the `X-Device-Platform` header wins).
    #[schema(schema_with = super::schema::platform_or_null)]
    platform: Option<String>,
    /// Whether the user is active on the device (`false`: idle, or the app in the
    /// background); written only when it changes. Absent: unchanged (a new session
    /// starts active).
    active: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Heartbeat<'a> {
    user_id: &'a str,
    device_id: &'a str,
    /// When the session ends without another heartbeat.
    #[schema(format = DateTime)]
    expires_at: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypingBody {
    #[schema(required, schema_with = super::schema::id, example = "room-1")]
    conversation_id: Option<String>,
    #[schema(required)]
    is_typing: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Typing<'a> {
    conversation_id: &'a str,
    user_id: &'a str,
    is_typing: bool,
}

/// `POST /presence/heartbeat`: keeps the caller's device session alive, opening it if
/// needed (device from `X-Device-ID` or `device_id`; default `http`). A client that stops
/// heartbeating goes offline after `presence.session_ttl`; one that signs out says so with
/// `POST /presence/bye`.
#[utoipa::path(post, path = "/presence/heartbeat", operation_id = "legacyHeartbeat", tag = "legacy", summary = "Keep the caller's device session alive (seed 004)",
    request_body(content = Option<HeartbeatBody>, description = "Optional"),
    params(("X-Device-ID" = Option<String>, Header, description = "The device"),
           ("X-Device-Platform" = Option<String>, Header, description = "desktop, mobile or web")),
    responses((status = 200, description = "The session", body = super::envelope::Ok<Heartbeat>)),
    security(("bearer" = [])))]
pub async fn heartbeat(State(state): State<Http>, Caller(who): Caller, headers: HeaderMap, body: Body) -> Res {
    let user = state.svc.parse_user(&who.sub)?;
    let (device, platform, active) = device_of(&state, &headers, &body)?;
    let svc = &state.svc;
    if active.is_some() {
        svc.check_write_rate(&user)?;
    }
    let (expires_at, _) = svc.sessions.heartbeat_or_open(&user, &device, &svc.http_instance, platform, active).await?;
    Ok(super::ok(Heartbeat { user_id: user.as_str(), device_id: &device, expires_at: rfc3339(expires_at) }))
}

/// The device (and platform) of a legacy request: the headers win, but a body that
/// breaks the documented schema is refused either way.
fn device_of(state: &Http, headers: &HeaderMap, body: &Body) -> Result<(String, Option<Platform>, Option<bool>), ApiError> {
    let b: HeartbeatBody = body.json_or_default()?;
    if let Some(d) = b.device_id.as_deref() {
        state.svc.check_id("device id", d)?;
    }
    let body_platform = state.svc.parse_body_platform(b.platform.as_deref())?;
    let device =
        headers.get("x-device-id").and_then(|v| v.to_str().ok()).map(str::to_string).or(b.device_id).unwrap_or_else(|| "http".into());
    state.svc.check_id("device id", &device)?;
    let platform = match headers.get("x-device-platform").and_then(|v| v.to_str().ok()) {
        Some(h) => state.svc.parse_platform(Some(h))?,
        None => body_platform,
    };
    Ok((device, platform, b.active))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Bye<'a> {
    user_id: &'a str,
    device_id: &'a str,
    /// Whether the device had a session.
    removed: bool,
}

/// `POST /presence/bye`: the caller signs out of the device (as `POST /presence/heartbeat`
/// names it) on purpose: its session ends now, with no offline grace.
#[utoipa::path(post, path = "/presence/bye", operation_id = "legacyBye", tag = "legacy", summary = "Sign the caller's device out now",
    request_body(content = Option<HeartbeatBody>, description = "Optional"),
    params(("X-Device-ID" = Option<String>, Header, description = "The device")),
    responses((status = 200, description = "Whether the device had a session", body = super::envelope::Ok<Bye>)),
    security(("bearer" = [])))]
pub async fn bye(State(state): State<Http>, Caller(who): Caller, headers: HeaderMap, body: Body) -> Res {
    let user = state.svc.parse_user(&who.sub)?;
    let (device, _, _) = device_of(&state, &headers, &body)?;
    let removed = state.svc.sessions.close(&user, &device, None, Leave::Bye).await?;
    Ok(super::ok(Bye { user_id: user.as_str(), device_id: &device, removed }))
}

/// `POST /presence/typing` `{"conversation_id", "is_typing"}`
#[utoipa::path(post, path = "/presence/typing", operation_id = "legacyTyping", tag = "legacy", summary = "Say the caller is (not) typing in a conversation",
    request_body = TypingBody,
    responses((status = 200, description = "What was set", body = super::envelope::Ok<Typing>)),
    security(("bearer" = [])))]
pub async fn typing(State(state): State<Http>, Caller(who): Caller, body: Body) -> Res {
    let user = state.svc.parse_user(&who.sub)?;
    let b: TypingBody = body.json()?;
    let (Some(conv), Some(is_typing)) = (b.conversation_id, b.is_typing) else {
        return Err(ApiError::BadRequest("typing needs conversation_id and is_typing".into()));
    };
    state.svc.check_id("conversation id", &conv)?;
    state.svc.check_write_rate(&user)?;
    state.svc.typists.set(&user, &conv, is_typing).await?;
    Ok(super::ok(Typing { conversation_id: &conv, user_id: user.as_str(), is_typing }))
}
