//! Contacts, privacy settings and conversation members.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::json;

use super::presence::{body_bytes, identity, parse_json, user_from_path};
use super::{ok, Http, Res};
use crate::core::{Privacy, UserId};
use crate::error::ApiError;

fn names(ids: &[UserId]) -> Vec<&str> {
    ids.iter().map(UserId::as_str).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactsBody {
    contacts: Option<Vec<String>>,
}

/// `GET /api/v2/contacts/{user_id}` (own token or `presence:admin`)
pub async fn get_contacts(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    let c = state.svc.contacts(&who, &id)?;
    Ok(ok(json!({ "user_id": id.as_str(), "contacts": names(&c) })))
}

/// `PUT /api/v2/contacts/{user_id}` with `{"contacts": [...]}`: replaces the list.
pub async fn put_contacts(
    State(state): State<Http>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Res {
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    state.svc.authorize_owner(&who, &id, "contacts")?;
    let bytes = body_bytes(body)?;
    let b: ContactsBody = parse_json(&bytes)?;
    let raw = b.contacts.ok_or_else(|| ApiError::BadRequest("contacts is required (a list of user ids)".into()))?;
    let c = state.svc.set_contacts(&who, &id, &raw).await?;
    Ok(ok(json!({ "user_id": id.as_str(), "contacts": names(&c) })))
}

fn privacy_json(id: &UserId, p: &Privacy) -> serde_json::Value {
    json!({ "user_id": id.as_str(), "visibility": p.visibility, "last_seen": p.last_seen })
}

/// `GET /api/v2/presence/{user_id}/privacy` (own token or `presence:admin`)
pub async fn get_privacy(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    let p = state.svc.privacy(&who, &id)?;
    Ok(ok(privacy_json(&id, &p)))
}

/// `PUT /api/v2/presence/{user_id}/privacy` with `{"visibility", "last_seen"}`
/// (`everyone | contacts | nobody`; an absent field keeps its current value).
pub async fn put_privacy(
    State(state): State<Http>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Res {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PrivacyBody {
        visibility: Option<crate::core::Visibility>,
        last_seen: Option<crate::core::Visibility>,
    }
    let who = identity(&state, &headers)?;
    let id = user_from_path(&state, path)?;
    let current = state.svc.privacy(&who, &id)?;
    let bytes = body_bytes(body)?;
    let b: PrivacyBody = parse_json(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("{e} (visibility and last_seen take everyone, contacts or nobody)")))?;
    let p = Privacy { visibility: b.visibility.unwrap_or(current.visibility), last_seen: b.last_seen.unwrap_or(current.last_seen) };
    let p = state.svc.set_privacy(&who, &id, p).await?;
    Ok(ok(privacy_json(&id, &p)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    members: Option<Vec<String>>,
}

fn conversation_from_path(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(c)| c).map_err(|e| ApiError::BadRequest(format!("invalid conversation id in path: {e}")))
}

/// `PUT /api/v2/conversations/{id}/members` with `{"members": [...]}` (scope `presence:admin`)
pub async fn put_members(
    State(state): State<Http>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Res {
    let who = identity(&state, &headers)?;
    let conv = conversation_from_path(path)?;
    state.svc.require_admin(&who, "setting conversation members")?;
    let bytes = body_bytes(body)?;
    let b: MembersBody = parse_json(&bytes)?;
    let raw = b.members.ok_or_else(|| ApiError::BadRequest("members is required (a list of user ids)".into()))?;
    let m = state.svc.set_members(&who, &conv, &raw).await?;
    Ok(ok(json!({ "conversation_id": conv, "members": names(&m) })))
}

/// `GET /api/v2/conversations/{id}/members` (scope `presence:admin`)
pub async fn get_members(State(state): State<Http>, headers: HeaderMap, path: Result<Path<String>, PathRejection>) -> Res {
    let who = identity(&state, &headers)?;
    let conv = conversation_from_path(path)?;
    let m = state.svc.members(&who, &conv)?;
    Ok(ok(json!({ "conversation_id": conv, "members": names(&m) })))
}
