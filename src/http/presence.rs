//! `/api/v2/presence` handlers.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ok, Http, Res};
use crate::auth::Identity;
use crate::core::UserId;
use crate::error::ApiError;
use crate::json::{PresenceJson, PresenceMap};
use crate::service::StatusWrite;

/// The user of a `/{user_id}` path (documentation only: handlers validate the raw segment).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct UserPath {
    /// A user id: 1 to `limits.max_user_id_len` (128) characters of `A-Z a-z 0-9 . _ @ : + -`.
    #[param(pattern = r"^[A-Za-z0-9._@:+\-]+$", min_length = 1, example = "alice")]
    user_id: String,
}

pub(super) fn user_from_path(state: &Http, path: Result<Path<String>, PathRejection>) -> Result<UserId, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::BadRequest(format!("invalid user id in path: {e}")))?;
    state.svc.parse_user(&raw)
}

pub(super) fn identity(state: &Http, headers: &HeaderMap) -> Result<Identity, ApiError> {
    state.svc.identify(headers, None)
}

pub(super) fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status().as_u16() == 413 {
            ApiError::PayloadTooLarge("request body is too large".into())
        } else {
            ApiError::BadRequest(format!("cannot read request body: {e}"))
        }
    })
}

pub(super) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ApiError::BadRequest("request body is empty: a JSON object is expected".into())),
        // serde would read a struct from an array of its fields: only objects are bodies.
        Some(b'{') => {}
        Some(_) => return Err(ApiError::BadRequest("the request body must be a JSON object".into())),
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

/// The presence envelope; while the node is degraded (cut off from the center) the
/// answer comes from its cache: marked `"stale": true` and `X-Presence-Stale`, and logged.
pub(super) fn presence_map(state: &Http, items: &[crate::core::Presence]) -> Response {
    match state.svc.degraded() {
        None => ok(PresenceMap { items, now: state.svc.clock.now() }),
        Some(reason) => {
            tracing::debug!(users = items.len(), "stale read served from the cache (degraded mode)");
            metrics::counter!("http_stale_reads_total").increment(1);
            let mut r = super::json_response(
                axum::http::StatusCode::OK,
                super::envelope::stale_body(PresenceMap { items, now: state.svc.clock.now() }, &reason),
            );
            r.headers_mut().insert("x-presence-stale", axum::http::HeaderValue::from_static("true"));
            r
        }
    }
}

/// A presence answer: `data` maps each user id to its presence, in request order.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PresenceAnswer {
    /// Always `true`.
    success: bool,
    data: std::collections::HashMap<String, crate::json::PresenceDoc>,
    /// Present (`true`) when a leaf node cut off from the center answered from its cache;
    /// the `X-Presence-Stale: true` header says the same.
    stale: Option<bool>,
    /// Why the answer may be stale.
    warning: Option<String>,
}

/// `GET /api/v2/presence/{user_id}`
#[utoipa::path(get, path = "/api/v2/presence/{user_id}", operation_id = "getPresence", tag = "presence",
    summary = "One user's presence, as the caller may see it",
    description = "Anonymous callers see what `everyone` may see; with a token, what the caller may see. A user never seen is 404 (`not_found`); the batch reads answer them `offline`.",
    params(UserPath),
    responses((status = 200, description = "The presence", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn get_one(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let viewer = state.svc.identify_optional(&headers)?;
    let id = user_from_path(&state, path)?;
    let p = state.svc.get_one_as(viewer.as_ref(), &id).await?;
    Ok(presence_map(&state, std::slice::from_ref(&p)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MultiQuery {
    /// Comma-separated user ids (at most `limits.max_batch_ids`).
    #[param(required, example = "alice,bob")]
    users: Option<String>,
}

/// `GET /api/v2/presence?users=a,b,c`
#[utoipa::path(get, path = "/api/v2/presence", operation_id = "getPresenceMany", tag = "presence", summary = "Several users' presence",
    params(MultiQuery),
    responses((status = 200, description = "The presence of each user, in request order", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn get_many(State(state): State<Http>, headers: HeaderMap, query: Result<Query<MultiQuery>, QueryRejection>) -> Res {
    let viewer = state.svc.identify_optional(&headers)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let users = q.users.ok_or_else(|| ApiError::BadRequest("query parameter users is required (users=a,b,c)".into()))?;
    let ids = state.svc.parse_ids(users.split(',').map(str::trim))?;
    let items = state.svc.get_many_as(viewer.as_ref(), &ids).await?;
    Ok(presence_map(&state, &items))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    /// At most `limits.max_batch_ids` user ids.
    #[schema(required, schema_with = super::openapi::ids, example = json!(["alice", "bob"]))]
    user_ids: Option<Vec<String>>,
}

/// `POST /api/v2/presence/batch` with `{"user_ids": [...]}`
#[utoipa::path(post, path = "/api/v2/presence/batch", operation_id = "getPresenceBatch", tag = "presence", summary = "Several users' presence (ids in the body)",
    request_body = BatchBody,
    responses((status = 200, description = "The presence of each user, in request order", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn batch(State(state): State<Http>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    batch_read(&state, &headers, body).await
}

/// Shared by `POST /api/v2/presence/batch` and the legacy `POST /presence/bulk`.
pub(super) async fn batch_read(state: &Http, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Res {
    let viewer = state.svc.identify_optional(headers)?;
    let bytes = body_bytes(body)?;
    let b: BatchBody = parse_json(&bytes)?;
    let raw = b.user_ids.ok_or_else(|| ApiError::BadRequest("user_ids is required".into()))?;
    let ids = state.svc.parse_ids(raw.iter().map(String::as_str))?;
    let items = state.svc.get_many_as(viewer.as_ref(), &ids).await?;
    Ok(presence_map(state, &items))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutBody {
    /// `online`, `away`, `busy` or `offline` (appear offline). Required: a write sets a
    /// status (`DELETE` clears it).
    #[schema(schema_with = super::openapi::status, required = true)]
    status: Option<String>,
    /// A custom message (at most `limits.max_message_len` characters); absent or `""`: none.
    message: Option<String>,
    /// Seconds until the status lapses; absent: `presence.default_status_ttl`; `0`: until
    /// changed (it never lapses).
    #[schema(minimum = 0)]
    ttl: Option<i64>,
}

/// `PUT /api/v2/presence/{user_id}` with `{"status","message","ttl"}`; JWT `sub` must match.
#[utoipa::path(put, path = "/api/v2/presence/{user_id}", operation_id = "setPresence", tag = "presence", summary = "Set a status",
    description = "The token's `sub` must be `user_id` (or the token has the admin scope).",
    params(UserPath),
    request_body = PutBody,
    responses((status = 200, description = "The presence after the write", body = PresenceAnswer)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<Http>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Res {
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    state.svc.authorize_write(&who, &id)?;
    let bytes = body_bytes(body)?;
    let b: PutBody = parse_json(&bytes)?;
    let p = state.svc.set_status(&who, &id, StatusWrite { status: b.status, message: b.message, ttl_seconds: b.ttl }).await?;
    Ok(presence_map(&state, std::slice::from_ref(&p)))
}

/// `DELETE /api/v2/presence/{user_id}`: clears the explicit status.
#[utoipa::path(delete, path = "/api/v2/presence/{user_id}", operation_id = "clearPresence", tag = "presence", summary = "Clear the explicit status",
    params(UserPath),
    responses((status = 200, description = "The presence after the write", body = PresenceAnswer)),
    security(("bearer" = [])))]
pub async fn delete(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    let p = state.svc.clear_status(&who, &id).await?;
    Ok(ok(serde_json::json!({ id.as_str(): PresenceJson { p: &p, now: state.svc.clock.now() } })))
}
