//! REST for gateways that do not speak gRPC (seed 001's session RPCs over HTTP), scope
//! `presence:admin` only: batch registration and removal of device sessions, and
//! instance leases ([`crate::service::instances`]).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::json;

use super::presence::{body_bytes, identity, parse_json};
use super::{ok, Http, Res};
use crate::error::ApiError;
use crate::json::rfc3339;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    user_id: String,
    device_id: String,
    #[serde(default)]
    platform: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    instance_id: String,
    #[serde(default)]
    ttl_seconds: u64,
    sessions: Vec<Entry>,
}

/// `POST /api/v2/sessions` with `{"instance_id", "ttl_seconds"?, "sessions": [{"user_id",
/// "device_id", "platform"?}]}`: registers them (bound to the instance's lease when it
/// holds one); one result per session, in order.
pub async fn register(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let who = identity(&state, &headers)?;
    state.svc.require_admin(&who, "registering sessions")?;
    let b: RegisterBody = parse_json(&body_bytes(body)?)?;
    let instance = state.svc.instance_or(&b.instance_id, "http")?;
    let ttl_ms = state.svc.session_ttl(b.ttl_seconds)?;
    let items = state.svc.gateway_sessions(b.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), e.platform.as_deref())))?;
    let outcomes = state.svc.sessions.open_many(&items, instance, ttl_ms).await?;
    let (mut registered, mut failed) = (0u32, 0u32);
    let results: Vec<serde_json::Value> = items
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| match outcome {
            Ok(reg) => {
                registered += 1;
                json!({ "user_id": item.user.as_str(), "device_id": &*item.device, "created": reg.created, "expires_at": rfc3339(reg.expires_at) })
            }
            Err(e) => {
                e.report("http");
                failed += 1;
                json!({ "user_id": item.user.as_str(), "device_id": &*item.device, "error": e.to_string(), "code": e.code() })
            }
        })
        .collect();
    Ok(ok(json!({ "instance_id": instance, "results": results, "registered": registered, "failed": failed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnregisterEntry {
    user_id: String,
    device_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnregisterBody {
    sessions: Vec<UnregisterEntry>,
}

/// `POST /api/v2/sessions/unregister` with `{"sessions": [{"user_id", "device_id"}]}`.
pub async fn unregister(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let who = identity(&state, &headers)?;
    state.svc.require_admin(&who, "ending sessions")?;
    let b: UnregisterBody = parse_json(&body_bytes(body)?)?;
    let items = state.svc.gateway_sessions(b.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), None)))?;
    let pairs: Vec<_> = items.into_iter().map(|s| (s.user, s.device)).collect();
    let removed = state.svc.sessions.close_many(&pairs).await?;
    let removed_count = removed.iter().filter(|r| **r).count();
    Ok(ok(json!({ "removed": removed, "removed_count": removed_count })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    #[serde(default)]
    ttl_seconds: u64,
}

fn instance_from_path(state: &Http, path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::BadRequest(format!("invalid instance id in path: {e}")))?;
    state.svc.check_id("instance id", &id)?;
    Ok(id)
}

/// `POST /api/v2/instances/{id}/refresh` with `{"ttl_seconds"?}` (or no body): creates
/// or extends the instance's lease.
pub async fn refresh(
    State(state): State<Http>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Res {
    let who = identity(&state, &headers)?;
    state.svc.require_admin(&who, "instance leases")?;
    let id = instance_from_path(&state, path)?;
    let bytes = body_bytes(body)?;
    let b: RefreshBody = if bytes.iter().all(u8::is_ascii_whitespace) { RefreshBody::default() } else { parse_json(&bytes)? };
    let ttl_ms = state.svc.session_ttl(b.ttl_seconds)?;
    let lease = state.svc.sessions.refresh_instance(&id, ttl_ms).await?;
    Ok(ok(json!({ "instance_id": id, "expires_at": rfc3339(lease.expires_at), "registered": lease.registered })))
}

/// `DELETE /api/v2/instances/{id}`: the lease ends now, with its sessions.
pub async fn end(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let who = identity(&state, &headers)?;
    state.svc.require_admin(&who, "instance leases")?;
    let id = instance_from_path(&state, path)?;
    let ended = state.svc.sessions.instances.end(&id).await?;
    Ok(ok(json!({ "instance_id": id, "sessions_ended": ended })))
}
