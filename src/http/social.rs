//! Contacts, privacy settings and conversation members.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{Body, Caller, ConversationParam, UserParam};
use super::schema::{ConversationPath, UserPath};
use super::{ok, Http, Res};
use crate::core::{Privacy, UserId, Visibility};
use crate::error::ApiError;

fn names(ids: &[UserId]) -> Vec<&str> {
    ids.iter().map(UserId::as_str).collect()
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContactsBody {
    /// The whole list (replaces the previous one), at most `limits.max_contacts` ids.
    #[schema(required, schema_with = super::schema::ids, example = json!(["bob", "carol"]))]
    contacts: Option<Vec<String>>,
}

/// A user's contacts: who is told of their changes when their visibility is `contacts`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Contacts<'a> {
    user_id: &'a str,
    contacts: Vec<&'a str>,
}

/// Who may see a user, and who may see their `last_seen`.
#[derive(Serialize, ToSchema)]
pub(crate) struct PrivacyAnswer<'a> {
    user_id: &'a str,
    visibility: Visibility,
    last_seen: Visibility,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrivacyBody {
    /// Who sees the user's presence; absent keeps the current setting.
    visibility: Option<Visibility>,
    /// Who sees `last_seen`; absent keeps the current setting.
    last_seen: Option<Visibility>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Members<'a> {
    conversation_id: &'a str,
    members: Vec<&'a str>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembersBody {
    /// The whole member list (replaces the previous one).
    #[schema(required, schema_with = super::schema::ids, example = json!(["alice", "bob"]))]
    members: Option<Vec<String>>,
}

/// `GET /api/v2/contacts/{user_id}` (own token or `presence:admin`)
#[utoipa::path(get, path = "/api/v2/contacts/{user_id}", operation_id = "getContacts", tag = "contacts", summary = "A user's contacts",
    description = "The user's own token, or one with the `presence:admin` scope.",
    params(UserPath), responses((status = 200, description = "The contacts", body = super::envelope::Ok<Contacts>)),
    security(("bearer" = [])))]
pub async fn get_contacts(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam) -> Res {
    let c = state.svc.contacts(&who, &id)?;
    Ok(ok(Contacts { user_id: id.as_str(), contacts: names(&c) }))
}

/// `PUT /api/v2/contacts/{user_id}` with `{"contacts": [...]}`: replaces the list.
#[utoipa::path(put, path = "/api/v2/contacts/{user_id}", operation_id = "setContacts", tag = "contacts", summary = "Replace a user's contacts",
    params(UserPath), request_body = ContactsBody,
    responses((status = 200, description = "The contacts now", body = super::envelope::Ok<Contacts>)),
    security(("bearer" = [])))]
pub async fn put_contacts(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam, body: Body) -> Res {
    state.svc.authorize_owner(&who, &id, "contacts")?;
    let b: ContactsBody = body.json()?;
    let raw = b.contacts.ok_or_else(|| ApiError::BadRequest("contacts is required (a list of user ids)".into()))?;
    let c = state.svc.set_contacts(&who, &id, &raw).await?;
    Ok(ok(Contacts { user_id: id.as_str(), contacts: names(&c) }))
}

fn privacy_json<'a>(id: &'a UserId, p: &Privacy) -> PrivacyAnswer<'a> {
    PrivacyAnswer { user_id: id.as_str(), visibility: p.visibility, last_seen: p.last_seen }
}

/// `GET /api/v2/presence/{user_id}/privacy` (own token or `presence:admin`)
#[utoipa::path(get, path = "/api/v2/presence/{user_id}/privacy", operation_id = "getPrivacy", tag = "privacy", summary = "A user's privacy settings",
    params(UserPath), responses((status = 200, description = "The settings", body = super::envelope::Ok<PrivacyAnswer>)),
    security(("bearer" = [])))]
pub async fn get_privacy(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam) -> Res {
    let p = state.svc.privacy(&who, &id)?;
    Ok(ok(privacy_json(&id, &p)))
}

/// `PUT /api/v2/presence/{user_id}/privacy` with `{"visibility", "last_seen"}`
/// (`everyone | contacts | nobody`; an absent field keeps its current value).
#[utoipa::path(put, path = "/api/v2/presence/{user_id}/privacy", operation_id = "setPrivacy", tag = "privacy", summary = "Change privacy settings",
    params(UserPath), request_body = PrivacyBody,
    responses((status = 200, description = "The settings now", body = super::envelope::Ok<PrivacyAnswer>)),
    security(("bearer" = [])))]
pub async fn put_privacy(State(state): State<Http>, Caller(who): Caller, UserParam(id): UserParam, body: Body) -> Res {
    let current = state.svc.privacy(&who, &id)?;
    body.bytes()?; // too large or unreadable: that error, not a schema hint
    let b: PrivacyBody =
        body.json().map_err(|e| ApiError::BadRequest(format!("{e} (visibility and last_seen take everyone, contacts or nobody)")))?;
    let p = Privacy { visibility: b.visibility.unwrap_or(current.visibility), last_seen: b.last_seen.unwrap_or(current.last_seen) };
    let p = state.svc.set_privacy(&who, &id, p).await?;
    Ok(ok(privacy_json(&id, &p)))
}

/// `PUT /api/v2/conversations/{id}/members` with `{"members": [...]}` (scope `presence:admin`)
#[utoipa::path(put, path = "/api/v2/conversations/{id}/members", operation_id = "setMembers", tag = "conversations", summary = "Replace a conversation's members",
    description = "Needs the `presence:admin` scope. Members see each other's typing indicators.",
    params(ConversationPath), request_body = MembersBody,
    responses((status = 200, description = "The members now", body = super::envelope::Ok<Members>)),
    security(("bearer" = [])))]
pub async fn put_members(State(state): State<Http>, Caller(who): Caller, ConversationParam(conv): ConversationParam, body: Body) -> Res {
    state.svc.require_admin(&who, "setting conversation members")?;
    let b: MembersBody = body.json()?;
    let raw = b.members.ok_or_else(|| ApiError::BadRequest("members is required (a list of user ids)".into()))?;
    let m = state.svc.set_members(&who, &conv, &raw).await?;
    Ok(ok(Members { conversation_id: &conv, members: names(&m) }))
}

/// `GET /api/v2/conversations/{id}/members` (scope `presence:admin`)
#[utoipa::path(get, path = "/api/v2/conversations/{id}/members", operation_id = "getMembers", tag = "conversations", summary = "A conversation's members",
    params(ConversationPath), responses((status = 200, description = "The members", body = super::envelope::Ok<Members>)),
    security(("bearer" = [])))]
pub async fn get_members(State(state): State<Http>, Caller(who): Caller, ConversationParam(conv): ConversationParam) -> Res {
    let m = state.svc.members(&who, &conv)?;
    Ok(ok(Members { conversation_id: &conv, members: names(&m) }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConversationPresenceQuery {
    /// `online` (default: any status but offline), `offline` or `all`.
    #[param(example = "online")]
    status: Option<String>,
    /// Members per page, 1 to 1000 (default 100).
    #[param(example = 100)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Counts and a page of a conversation's members, as the caller may see them.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct ConversationPresenceDoc {
    conversation_id: String,
    /// Members in the conversation.
    members: usize,
    /// Members the caller sees with any status but offline.
    online: usize,
    /// The page, ordered by user id.
    presences: Vec<crate::wire::json::PresenceDoc>,
    /// Where the next page starts; absent on the last one.
    next_cursor: Option<String>,
}

struct ConversationPresence<'a> {
    conversation_id: &'a str,
    page: &'a crate::service::conversations::Page,
    now: crate::core::Millis,
}

impl Serialize for ConversationPresence<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let presences: Vec<crate::wire::json::PresenceJson<'_>> =
            self.page.presences.iter().map(|p| crate::wire::json::PresenceJson { p, now: self.now }).collect();
        let mut st = s.serialize_struct("ConversationPresence", 5)?;
        st.serialize_field("conversation_id", self.conversation_id)?;
        st.serialize_field("members", &self.page.members)?;
        st.serialize_field("online", &self.page.online)?;
        st.serialize_field("presences", &presences)?;
        match &self.page.next_cursor {
            Some(c) => st.serialize_field("next_cursor", c)?,
            None => st.skip_field("next_cursor")?,
        }
        st.end()
    }
}

/// `GET /api/v2/conversations/{id}/presence?status=online|offline|all&limit=100&cursor=…`
#[utoipa::path(get, path = "/api/v2/conversations/{id}/presence", operation_id = "getConversationPresence", tag = "conversations",
    summary = "Who of a conversation's members is here, and how many",
    description = "For members of the conversation and `presence:admin`. `members` and `online` are counts; `presences` a page \
        of members as the caller may see them (a member hidden from the caller is counted and listed offline), ordered by user \
        id; `next_cursor` continues it.",
    params(ConversationPath, ConversationPresenceQuery),
    responses((status = 200, description = "Counts and a page", body = super::envelope::Ok<ConversationPresenceDoc>),
              (status = 403, description = "Not a member", body = super::envelope::Err),
              (status = 404, description = "No members set (admin)", body = super::envelope::Err)),
    security(("bearer" = [])))]
pub async fn get_conversation_presence(
    State(state): State<Http>,
    Caller(who): Caller,
    ConversationParam(conv): ConversationParam,
    query: Result<axum::extract::Query<ConversationPresenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Res {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let listed = match q.status.as_deref() {
        None => crate::service::conversations::Listed::Online,
        Some(s) => crate::service::conversations::Listed::parse(s)
            .ok_or_else(|| ApiError::BadRequest(format!("status must be online, offline or all, not {s:?}")))?,
    };
    let limit = q.limit.unwrap_or(crate::service::conversations::DEFAULT_PAGE);
    let page = state.svc.conversation_presence(&who, &conv, listed, limit, q.cursor.as_deref()).await?;
    Ok(ok(ConversationPresence { conversation_id: &conv, page: &page, now: state.svc.clock.now() }))
}
