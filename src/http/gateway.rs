//! REST for gateways that do not speak gRPC (seed 001's session RPCs over HTTP), scope
//! `presence:admin` only: batch registration and removal of device sessions, and
//! instance leases ([`crate::service::instances`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{Body, Caller, InstanceParam};
use super::schema::InstancePath;
use super::{ok, Http, Res};
use crate::error::ApiError;
use crate::wire::json::rfc3339;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    #[schema(schema_with = super::schema::id, example = "alice")]
    user_id: String,
    #[schema(schema_with = super::schema::id, example = "phone")]
    device_id: String,
    /// `desktop`, `mobile` or `web`.
    #[serde(default)]
    #[schema(schema_with = super::schema::platform_or_null)]
    platform: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// The gateway instance the sessions belong to (its lease ends them all); absent: `http`.
    #[serde(default)]
    #[schema(schema_with = super::schema::id_or_empty, example = "gw-1")]
    instance_id: String,
    /// Session TTL when the instance holds no lease (0: `presence.session_ttl`).
    #[serde(default)]
    ttl_seconds: u64,
    /// At most `limits.max_sessions_per_call` sessions.
    sessions: Vec<Entry>,
}

/// The outcome of one session of a batch: `created`/`expires_at`, or `error`/`code`.
#[derive(Serialize, ToSchema)]
pub(crate) struct RegisterResult<'a> {
    user_id: &'a str,
    device_id: &'a str,
    /// A new session (false: an existing one was refreshed).
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::error::code_schema)]
    code: Option<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Registered<'a> {
    instance_id: &'a str,
    /// One per session, in request order.
    results: Vec<RegisterResult<'a>>,
    registered: u32,
    failed: u32,
}

/// `POST /api/v2/sessions` with `{"instance_id", "ttl_seconds"?, "sessions": [{"user_id",
/// "device_id", "platform"?}]}`: registers them (bound to the instance's lease when it
/// holds one); one result per session, in order.
#[utoipa::path(post, path = "/api/v2/sessions", operation_id = "registerSessions", tag = "gateway", summary = "Register device sessions in bulk",
    description = "For a gateway that holds the connections itself. Needs the `presence:admin` scope.",
    request_body = RegisterBody,
    responses((status = 200, description = "One result per session", body = super::envelope::Ok<Registered>)),
    security(("bearer" = [])))]
pub async fn register(State(state): State<Http>, Caller(who): Caller, body: Body) -> Res {
    state.svc.require_admin(&who, "registering sessions")?;
    let b: RegisterBody = body.json()?;
    let instance = state.svc.instance_or(&b.instance_id, "http")?;
    let ttl_ms = state.svc.session_ttl(b.ttl_seconds)?;
    // A JSON body's platform is exact, as the schema says ("" or " mobile" are refused);
    // gRPC's proto3 default (an empty string) is its own rule, in gateway_sessions.
    for e in &b.sessions {
        state.svc.parse_body_platform(e.platform.as_deref())?;
    }
    let items = state.svc.gateway_sessions(b.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), e.platform.as_deref())))?;
    let outcomes = state.svc.sessions.open_many(&items, instance, ttl_ms).await?;
    let created = items.iter().zip(&outcomes).filter(|(_, o)| o.as_ref().is_ok_and(|r| r.created));
    state.svc.audit_sessions(&who, "session_registered", instance, created.map(|(i, _)| (&i.user, &*i.device)));
    let (mut registered, mut failed) = (0u32, 0u32);
    let results: Vec<RegisterResult> = items
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| {
            let mut r = RegisterResult {
                user_id: item.user.as_str(),
                device_id: &item.device,
                created: None,
                expires_at: None,
                error: None,
                code: None,
            };
            match outcome {
                Ok(reg) => {
                    registered += 1;
                    r.created = Some(reg.created);
                    r.expires_at = Some(rfc3339(reg.expires_at));
                }
                Err(e) => {
                    e.report("http");
                    failed += 1;
                    r.error = Some(e.to_string());
                    r.code = Some(e.code());
                }
            }
            r
        })
        .collect();
    Ok(ok(Registered { instance_id: instance, results, registered, failed }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnregisterEntry {
    #[schema(schema_with = super::schema::id)]
    user_id: String,
    #[schema(schema_with = super::schema::id)]
    device_id: String,
    /// The user signed out on purpose: the session ends now. Absent or `false`: the
    /// socket went away, and the session is held for `presence.offline_grace` (a
    /// registration of the device within it continues it, with no event).
    #[serde(default)]
    immediate: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnregisterBody {
    sessions: Vec<UnregisterEntry>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Unregistered {
    /// Per session, in request order: whether it was live.
    removed: Vec<bool>,
    removed_count: usize,
}

/// `POST /api/v2/sessions/unregister` with `{"sessions": [{"user_id", "device_id", "immediate"?}]}`.
#[utoipa::path(post, path = "/api/v2/sessions/unregister", operation_id = "unregisterSessions", tag = "gateway", summary = "End device sessions in bulk",
    request_body = UnregisterBody,
    responses((status = 200, description = "Which sessions were live", body = super::envelope::Ok<Unregistered>)),
    security(("bearer" = [])))]
pub async fn unregister(State(state): State<Http>, Caller(who): Caller, body: Body) -> Res {
    state.svc.require_admin(&who, "ending sessions")?;
    let b: UnregisterBody = body.json()?;
    let items = state.svc.gateway_sessions(b.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), None)))?;
    let pairs: Vec<_> = items.into_iter().zip(&b.sessions).map(|(s, e)| (s.user, s.device, e.immediate)).collect();
    let removed = state.svc.sessions.close_many(&pairs).await?;
    let ended = pairs.iter().zip(&removed).filter(|(_, r)| **r);
    state.svc.audit_sessions(&who, "session_ended", "", ended.map(|((u, d, _), _)| (u, &**d)));
    let removed_count = removed.iter().filter(|r| **r).count();
    Ok(ok(Unregistered { removed, removed_count }))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    /// The lease's length (0 or absent: `presence.session_ttl`).
    #[serde(default)]
    ttl_seconds: u64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Lease<'a> {
    instance_id: &'a str,
    /// When the lease, and every session bound to it, ends unless refreshed.
    #[schema(format = DateTime)]
    expires_at: String,
    /// Sessions bound to the lease on the answering node since it began there (a
    /// per-node figure: in cluster mode, other nodes hold what was registered through them).
    registered: u64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Ended<'a> {
    instance_id: &'a str,
    sessions_ended: u64,
}

/// `POST /api/v2/instances/{id}/refresh` with `{"ttl_seconds"?}` (or no body): creates
/// or extends the instance's lease.
#[utoipa::path(post, path = "/api/v2/instances/{id}/refresh", operation_id = "refreshInstance", tag = "gateway", summary = "Create or extend an instance's lease",
    params(InstancePath), request_body(content = Option<RefreshBody>, description = "Optional"),
    responses((status = 200, description = "The lease", body = super::envelope::Ok<Lease>)),
    security(("bearer" = [])))]
pub async fn refresh(State(state): State<Http>, Caller(who): Caller, InstanceParam(id): InstanceParam, body: Body) -> Res {
    state.svc.require_admin(&who, "instance leases")?;
    let b: RefreshBody = body.json_or_default()?;
    let ttl_ms = state.svc.session_ttl(b.ttl_seconds)?;
    let lease = state.svc.sessions.refresh_instance(&id, ttl_ms).await?;
    Ok(ok(Lease { instance_id: &id, expires_at: rfc3339(lease.expires_at), registered: lease.registered }))
}

/// `?immediate=` of `DELETE /api/v2/instances/{id}`.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndQuery {
    /// End the sessions now; absent or `false`: each is held for `presence.offline_grace`
    /// (clients reconnecting through another instance continue their sessions).
    #[serde(default)]
    immediate: bool,
}

/// `DELETE /api/v2/instances/{id}`: the lease ends now; its sessions are held for the
/// offline grace (or end now with `?immediate=true`).
#[utoipa::path(delete, path = "/api/v2/instances/{id}", operation_id = "endInstance", tag = "gateway", summary = "End an instance and its sessions",
    params(InstancePath, EndQuery),
    responses((status = 200, description = "How many sessions ended", body = super::envelope::Ok<Ended>)),
    security(("bearer" = [])))]
pub async fn end(
    State(state): State<Http>,
    Caller(who): Caller,
    InstanceParam(id): InstanceParam,
    query: Result<Query<EndQuery>, QueryRejection>,
) -> Res {
    state.svc.require_admin(&who, "instance leases")?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let ended = state.svc.sessions.end_instance(&id, q.immediate).await?;
    state.svc.audit_instance_ended(&who, &id, ended);
    Ok(ok(Ended { instance_id: &id, sessions_ended: ended }))
}
