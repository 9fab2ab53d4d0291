//! A user's data as a whole: export (the right of access) and erasure (the right to be
//! forgotten), for the user's own token or an admin's ([`crate::service::erasure`]).

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::{Caller, UserParam};
use super::schema::UserPath;
use super::{ok, Http, Res};
use crate::core::{Platform, Visibility};
use crate::wire::json::{rfc3339, PresenceJson};

/// What an erasure removed.
#[derive(Serialize, ToSchema)]
pub(crate) struct Erased<'a> {
    user_id: &'a str,
    /// Device sessions ended by the erasure.
    sessions_ended: usize,
    /// Other users' contact lists the user was removed from.
    removed_from_contacts: usize,
    /// Conversations the user was removed from.
    removed_from_conversations: usize,
}

/// One device session, as held.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionExport {
    device_id: String,
    /// Absent when the client did not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::wire::json::platform_schema)]
    platform: Option<&'static str>,
    instance_id: String,
    #[schema(format = DateTime)]
    connected_at: String,
    #[schema(format = DateTime)]
    last_heartbeat: String,
    #[schema(format = DateTime)]
    expires_at: String,
    /// Since when the user has not been active on the device (absent while active).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    idle_since: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct PrivacyExport {
    visibility: Visibility,
    last_seen: Visibility,
}

/// Everything held about a user.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Export {
    user_id: String,
    /// The stored presence (status, message, `last_seen`, devices); `null` when none.
    presence: Option<crate::wire::json::PresenceDoc>,
    sessions: Vec<SessionExport>,
    privacy: PrivacyExport,
    /// The user's contacts.
    contacts: Vec<String>,
    /// The conversations the user is a member of.
    conversations: Vec<String>,
    /// How many users list this one as a contact (who they are is their own data).
    listed_as_contact_by: usize,
    #[schema(format = DateTime)]
    exported_at: String,
}

/// `GET /api/v2/users/{user_id}/export` (own token or `presence:admin`)
#[utoipa::path(get, path = "/api/v2/users/{user_id}/export", operation_id = "exportUser", tag = "users", summary = "Everything held about a user",
    description = "The right of access: the stored presence, device sessions, privacy settings, contacts and conversation memberships. The user's own token, or one with the `presence:admin` scope. 404 when nothing is held.",
    params(UserPath), responses((status = 200, description = "The user's data", body = super::envelope::Ok<Export>)),
    security(("bearer" = [])))]
pub async fn export(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam) -> Res {
    let e = state.svc.export_user(&who, &id).await?;
    let now = state.svc.clock.now();
    let sessions: Vec<SessionExport> = e
        .sessions
        .iter()
        .map(|s| SessionExport {
            device_id: s.device_id.to_string(),
            platform: s.platform.map(Platform::as_str),
            instance_id: s.instance_id.to_string(),
            connected_at: rfc3339(s.connected_at),
            last_heartbeat: rfc3339(s.last_heartbeat),
            expires_at: rfc3339(s.expires_at),
            idle_since: s.idle_since.map(rfc3339),
        })
        .collect();
    let body = serde_json::json!({
        "user_id": id.as_str(),
        "presence": e.presence.as_ref().map(|p| PresenceJson { p, now }),
        "sessions": sessions,
        "privacy": PrivacyExport { visibility: e.privacy.visibility, last_seen: e.privacy.last_seen },
        "contacts": e.contacts.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "conversations": e.conversations,
        "listed_as_contact_by": e.listed_as_contact_by,
        "exported_at": rfc3339(now),
    });
    Ok(ok(body))
}

/// `DELETE /api/v2/users/{user_id}` (own token or `presence:admin`)
#[utoipa::path(delete, path = "/api/v2/users/{user_id}", operation_id = "eraseUser", tag = "users", summary = "Erase everything held about a user",
    description = "The right to erasure. Ends the user's sessions (their sockets close with 4003) and erases their status, message, `last_seen`, privacy settings and contacts, their place in other users' contact lists and in conversations: in memory, on disk and in NATS or Redis, on every node. One `user_erased` event goes to the event streams and every sink. Afterwards the user reads as unknown (404). The user's own token, or one with the `presence:admin` scope. 404 when nothing is held.",
    params(UserPath), responses((status = 200, description = "What was erased", body = super::envelope::Ok<Erased>)),
    security(("bearer" = [])))]
pub async fn erase(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam) -> Res {
    let e = state.svc.erase_user(&who, &id).await?;
    Ok(ok(Erased {
        user_id: id.as_str(),
        sessions_ended: e.sessions_ended,
        removed_from_contacts: e.removed_from_contacts,
        removed_from_conversations: e.removed_from_conversations,
    }))
}
