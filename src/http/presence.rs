//! `/api/v2/presence` handlers.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::extract::{Body, Caller, UserParam, Viewer};
use super::schema::UserPath;
use super::{ok, Http, Res};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::service::StatusWrite;
use crate::wire::json::{PresenceJson, PresenceMap};

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
    data: std::collections::HashMap<String, crate::wire::json::PresenceDoc>,
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
pub async fn get_one(State(state): State<Http>, Viewer(viewer): Viewer, UserParam(id): UserParam) -> Res {
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
pub async fn get_many(State(state): State<Http>, Viewer(viewer): Viewer, query: Result<Query<MultiQuery>, QueryRejection>) -> Res {
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
    #[schema(required, schema_with = super::schema::ids, example = json!(["alice", "bob"]))]
    user_ids: Option<Vec<String>>,
}

/// `POST /api/v2/presence/batch` with `{"user_ids": [...]}`
#[utoipa::path(post, path = "/api/v2/presence/batch", operation_id = "getPresenceBatch", tag = "presence", summary = "Several users' presence (ids in the body)",
    request_body = BatchBody,
    responses((status = 200, description = "The presence of each user, in request order", body = PresenceAnswer)),
    security((), ("bearer" = [])))]
pub async fn batch(State(state): State<Http>, Viewer(viewer): Viewer, body: Body) -> Res {
    batch_read(&state, viewer.as_ref(), body).await
}

/// Shared by `POST /api/v2/presence/batch` and the legacy `POST /presence/bulk`.
pub(super) async fn batch_read(state: &Http, viewer: Option<&Identity>, body: Body) -> Res {
    let b: BatchBody = body.json()?;
    let raw = b.user_ids.ok_or_else(|| ApiError::BadRequest("user_ids is required".into()))?;
    let ids = state.svc.parse_ids(raw.iter().map(String::as_str))?;
    let items = state.svc.get_many_as(viewer, &ids).await?;
    Ok(presence_map(state, &items))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutBody {
    /// `online`, `away`, `busy` or `offline` (appear offline). Required: a write sets a
    /// status (`DELETE` clears it).
    #[schema(schema_with = super::schema::status, required = true)]
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
pub async fn put(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam, body: Body) -> Res {
    state.svc.authorize_write(&who, &id)?;
    let b: PutBody = body.json()?;
    let p = state.svc.set_status(&who, &id, StatusWrite { status: b.status, message: b.message, ttl_seconds: b.ttl }).await?;
    Ok(presence_map(&state, std::slice::from_ref(&p)))
}

/// `DELETE /api/v2/presence/{user_id}`: clears the explicit status.
#[utoipa::path(delete, path = "/api/v2/presence/{user_id}", operation_id = "clearPresence", tag = "presence", summary = "Clear the explicit status",
    params(UserPath),
    responses((status = 200, description = "The presence after the write", body = PresenceAnswer)),
    security(("bearer" = [])))]
pub async fn delete(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam) -> Res {
    let p = state.svc.clear_status(&who, &id).await?;
    Ok(ok(serde_json::json!({ id.as_str(): PresenceJson { p: &p, now: state.svc.clock.now() } })))
}
