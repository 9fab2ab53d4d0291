//! gRPC transport: `realchat.presence.v1.PresenceApi` (seed 001) on `service.grpc_port`,
//! with `grpc.health.v1.Health` and server reflection (v1 and v1alpha). A thin adapter
//! over [`Service`]: sessions registered here are the same sessions the WebSocket and
//! HTTP front ends see.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::auth::Identity;
use crate::core::{visible_change, Event, Millis, Presence, UserId};
use crate::error::ApiError;
use crate::service::{Service, StatusWrite};

pub use crate::wire::proto::pb;
use crate::wire::proto::{kind_pb, presence_pb, ts};

use pb::presence_api_server::{PresenceApi, PresenceApiServer};

/// Snapshot presences read from the store at once for a `WatchPresence` stream.
const SNAPSHOT_CHUNK: usize = 64;

/// An error as a gRPC status (the code from [`crate::error::TABLE`]); what the client is
/// not told is logged once.
pub fn to_status(e: ApiError) -> GrpcStatus {
    e.report("grpc");
    GrpcStatus::new(e.wire().grpc, e.to_string())
}

/// Counts a finished call by method and code.
fn observe<T>(method: &'static str, start: Instant, r: &Result<T, GrpcStatus>) {
    let code = match r {
        Ok(_) => "OK",
        Err(s) => code_name(s.code()),
    };
    metrics::counter!("grpc_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("grpc_request_duration_seconds", "method" => method).record(start.elapsed().as_secs_f64());
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How many `WatchPresence` streams are open, and how many ids they watch together
/// (`limits.grpc_max_watch_streams`, `limits.grpc_max_watched_ids`).
#[derive(Default)]
pub struct WatchBudget {
    streams: AtomicUsize,
    ids: AtomicUsize,
}

/// One stream's share of the budget, given back when the stream ends.
struct WatchPermit {
    budget: Arc<WatchBudget>,
    ids: usize,
}

impl WatchBudget {
    /// Takes a stream watching `ids` users, or says which cap it would exceed.
    fn take(self: &Arc<Self>, ids: usize, max_streams: usize, max_ids: usize) -> Result<WatchPermit, ApiError> {
        let refuse = |reason: &'static str, msg: String| {
            metrics::counter!("grpc_watch_refused_total", "reason" => reason).increment(1);
            Err(ApiError::LimitExceeded(msg))
        };
        if self.streams.fetch_add(1, Ordering::AcqRel) >= max_streams {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return refuse("streams", format!("too many WatchPresence streams open on this server (limit {max_streams}); retry later"));
        }
        if self.ids.fetch_add(ids, Ordering::AcqRel).saturating_add(ids) > max_ids {
            self.ids.fetch_sub(ids, Ordering::AcqRel);
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return refuse("ids", format!("too many users watched by WatchPresence streams on this server (limit {max_ids}); retry later"));
        }
        metrics::gauge!("grpc_watch_streams").increment(1.0);
        Ok(WatchPermit { budget: self.clone(), ids })
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.budget.streams.fetch_sub(1, Ordering::AcqRel);
        self.budget.ids.fetch_sub(self.ids, Ordering::AcqRel);
        metrics::gauge!("grpc_watch_streams").decrement(1.0);
    }
}

/// The `PresenceApi` implementation.
#[derive(Clone)]
pub struct Api {
    svc: Arc<Service>,
    shutdown: watch::Receiver<bool>,
    watches: Arc<WatchBudget>,
}

impl Api {
    fn caller<T>(&self, req: &Request<T>) -> Result<Identity, ApiError> {
        let peer = req.extensions().get::<crate::listener::ConnMeta>().map(|m| m.remote);
        Ok(self.svc.identify(&req.metadata().clone().into_headers(), None)?.via("grpc", peer))
    }

    fn caller_optional<T>(&self, req: &Request<T>) -> Result<Option<Identity>, ApiError> {
        self.svc.identify_optional(&req.metadata().clone().into_headers())
    }

    fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<Identity, ApiError> {
        let who = self.caller(req)?;
        self.svc.require_admin(&who, what)?;
        Ok(who)
    }

    fn device(&self, raw: &str) -> Result<(), ApiError> {
        self.svc.check_id("device id", raw)
    }

    /// `idle_since` of an activity report: only with `active = false`.
    fn idle_since(&self, t: Option<&prost_types::Timestamp>, active: Option<bool>) -> Result<Option<Millis>, ApiError> {
        match (t, active) {
            (None, _) => Ok(None),
            (Some(t), Some(false)) => {
                crate::wire::proto::millis_of(t).map(Some).ok_or_else(|| ApiError::BadRequest("idle_since is out of range".into()))
            }
            (Some(_), _) => Err(ApiError::BadRequest("idle_since goes with active = false".into())),
        }
    }
}

type Rpc<T> = Result<Response<T>, GrpcStatus>;

#[tonic::async_trait]
impl PresenceApi for Api {
    async fn get_presence(&self, req: Request<pb::GetPresenceRequest>) -> Rpc<pb::GetPresenceResponse> {
        let start = Instant::now();
        let r = async {
            let viewer = self.caller_optional(&req)?;
            let ids = self.svc.parse_ids(req.get_ref().user_ids.iter().map(String::as_str))?;
            let items = self.svc.get_many_as(viewer.as_ref(), &ids).await?;
            Ok(pb::GetPresenceResponse { presences: items.iter().map(presence_pb).collect() })
        }
        .await
        .map(|body| {
            let mut r = Response::new(body);
            // Degraded cluster node: answered from its cache (as REST's `"stale": true`).
            if self.svc.degraded().is_some() {
                r.metadata_mut().insert("x-presence-stale", tonic::metadata::MetadataValue::from_static("true"));
            }
            r
        })
        .map_err(to_status);
        observe("GetPresence", start, &r);
        r
    }

    async fn register_session(&self, req: Request<pb::RegisterSessionRequest>) -> Rpc<pb::RegisterSessionResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.admin(&req, "RegisterSession")?;
            let m = req.get_ref();
            let instance = self.svc.instance_or(&m.instance_id, "grpc")?;
            let ttl_ms = self.svc.session_ttl(u64::from(m.ttl_seconds))?;
            let one = std::iter::once((m.user_id.as_str(), m.device_id.as_str(), Some(m.platform.as_str())));
            let mut session = self.svc.gateway_sessions(one)?.remove(0);
            session.active = m.active;
            let reg = self.svc.sessions.open_gateway(&session, instance, ttl_ms).await?;
            if reg.created {
                self.svc.audit_sessions(&who, "session_registered", instance, [(&session.user, &*session.device)]);
            }
            Ok(pb::RegisterSessionResponse { created: reg.created, expires_at: Some(ts(reg.expires_at)) })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("RegisterSession", start, &r);
        r
    }

    async fn unregister_session(&self, req: Request<pb::UnregisterSessionRequest>) -> Rpc<pb::UnregisterSessionResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.admin(&req, "UnregisterSession")?;
            let m = req.get_ref();
            let user = self.svc.parse_user(&m.user_id)?;
            self.device(&m.device_id)?;
            let removed = self.svc.sessions.close_gateway(&user, &m.device_id, m.immediate).await?;
            if removed {
                self.svc.audit_sessions(&who, "session_ended", "", [(&user, m.device_id.as_str())]);
            }
            Ok(pb::UnregisterSessionResponse { removed })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("UnregisterSession", start, &r);
        r
    }

    async fn refresh_session(&self, req: Request<pb::RefreshSessionRequest>) -> Rpc<pb::RefreshSessionResponse> {
        let start = Instant::now();
        let r = async {
            self.admin(&req, "RefreshSession")?;
            let m = req.get_ref();
            let user = self.svc.parse_user(&m.user_id)?;
            self.device(&m.device_id)?;
            let idle_since = self.idle_since(m.idle_since.as_ref(), m.active)?;
            if m.active.is_some() {
                self.svc.check_write_rate(&user)?;
            }
            match self.svc.sessions.refresh(&user, &m.device_id).await? {
                Some(t) => {
                    if let Some(active) = m.active {
                        self.svc.sessions.set_activity(&user, &m.device_id, None, (active, idle_since), true).await?;
                    }
                    Ok(pb::RefreshSessionResponse { expires_at: Some(ts(t)) })
                }
                None => Err(ApiError::NotFound(format!("no live session for {user} on device {}: register it again", m.device_id))),
            }
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("RefreshSession", start, &r);
        r
    }

    async fn set_activity(&self, req: Request<pb::SetActivityRequest>) -> Rpc<pb::SetActivityResponse> {
        let start = Instant::now();
        let r = async {
            self.admin(&req, "SetActivity")?;
            let m = req.get_ref();
            let user = self.svc.parse_user(&m.user_id)?;
            self.device(&m.device_id)?;
            let idle_since = self.idle_since(m.idle_since.as_ref(), Some(m.active))?;
            self.svc.check_write_rate(&user)?;
            self.svc.sessions.set_activity(&user, &m.device_id, None, (m.active, idle_since), false).await?;
            Ok(pb::SetActivityResponse {})
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("SetActivity", start, &r);
        r
    }

    async fn refresh_instance(&self, req: Request<pb::RefreshInstanceRequest>) -> Rpc<pb::RefreshInstanceResponse> {
        let start = Instant::now();
        let r = async {
            self.admin(&req, "RefreshInstance")?;
            let m = req.get_ref();
            self.svc.check_id("instance id", &m.instance_id)?;
            let ttl_ms = self.svc.session_ttl(u64::from(m.ttl_seconds))?;
            let lease = self.svc.sessions.refresh_instance(&m.instance_id, ttl_ms).await?;
            Ok(pb::RefreshInstanceResponse { expires_at: Some(ts(lease.expires_at)), registered: lease.registered })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("RefreshInstance", start, &r);
        r
    }

    async fn unregister_instance(&self, req: Request<pb::UnregisterInstanceRequest>) -> Rpc<pb::UnregisterInstanceResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.admin(&req, "UnregisterInstance")?;
            let m = req.get_ref();
            self.svc.check_id("instance id", &m.instance_id)?;
            let sessions_ended = self.svc.sessions.end_instance(&m.instance_id, m.immediate).await?;
            self.svc.audit_instance_ended(&who, &m.instance_id, sessions_ended);
            Ok(pb::UnregisterInstanceResponse { sessions_ended })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("UnregisterInstance", start, &r);
        r
    }

    async fn register_sessions(&self, req: Request<pb::RegisterSessionsRequest>) -> Rpc<pb::RegisterSessionsResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.admin(&req, "RegisterSessions")?;
            let m = req.get_ref();
            let instance = self.svc.instance_or(&m.instance_id, "grpc")?;
            let ttl_ms = self.svc.session_ttl(u64::from(m.ttl_seconds))?;
            let raw = m.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), Some(e.platform.as_str())));
            let items = self.svc.gateway_sessions(raw)?;
            let outcomes = self.svc.sessions.open_many(&items, instance, ttl_ms).await?;
            let created = items.iter().zip(&outcomes).filter(|(_, o)| o.as_ref().is_ok_and(|r| r.created));
            self.svc.audit_sessions(&who, "session_registered", instance, created.map(|(i, _)| (&i.user, &*i.device)));
            let mut out = pb::RegisterSessionsResponse::default();
            for (item, outcome) in items.iter().zip(outcomes) {
                let mut res =
                    pb::SessionResult { user_id: item.user.to_string(), device_id: item.device.to_string(), ..Default::default() };
                match outcome {
                    Ok(reg) => {
                        out.registered += 1;
                        res.created = reg.created;
                        res.expires_at = Some(ts(reg.expires_at));
                    }
                    Err(e) => {
                        e.report("grpc");
                        out.failed += 1;
                        res.error_code = e.wire().code.to_string();
                        res.error = e.to_string();
                    }
                }
                out.results.push(res);
            }
            Ok(out)
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("RegisterSessions", start, &r);
        r
    }

    async fn unregister_sessions(&self, req: Request<pb::UnregisterSessionsRequest>) -> Rpc<pb::UnregisterSessionsResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.admin(&req, "UnregisterSessions")?;
            let m = req.get_ref();
            let raw = m.sessions.iter().map(|e| (e.user_id.as_str(), e.device_id.as_str(), None));
            let items: Vec<_> =
                self.svc.gateway_sessions(raw)?.into_iter().zip(&m.sessions).map(|(s, e)| (s.user, s.device, e.immediate)).collect();
            let removed = self.svc.sessions.close_many(&items).await?;
            let ended = items.iter().zip(&removed).filter(|(_, r)| **r);
            self.svc.audit_sessions(&who, "session_ended", "", ended.map(|((u, d, _), _)| (u, &**d)));
            let removed_count = removed.iter().filter(|r| **r).count() as u32;
            Ok(pb::UnregisterSessionsResponse { removed, removed_count })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("UnregisterSessions", start, &r);
        r
    }

    async fn get_user_devices(&self, req: Request<pb::GetUserDevicesRequest>) -> Rpc<pb::GetUserDevicesResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.caller(&req)?;
            let user = self.svc.parse_user(&req.get_ref().user_id)?;
            self.svc.authorize_owner(&who, &user, "devices")?;
            let devices = self.svc.sessions.devices(&user).await?;
            Ok(pb::GetUserDevicesResponse {
                devices: devices
                    .iter()
                    .map(|d| pb::DeviceInfo {
                        device_id: d.device_id.to_string(),
                        instance_id: d.instance_id.to_string(),
                        connected_at: Some(ts(d.connected_at)),
                        last_seen: Some(ts(d.last_heartbeat)),
                        expires_at: Some(ts(d.expires_at)),
                        platform: d.platform.map(|p| p.as_str().to_string()).unwrap_or_default(),
                        active: Some(d.idle_since.is_none()),
                        idle_since: d.idle_since.map(ts),
                    })
                    .collect(),
            })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("GetUserDevices", start, &r);
        r
    }

    async fn erase_user(&self, req: Request<pb::EraseUserRequest>) -> Rpc<pb::EraseUserResponse> {
        let start = Instant::now();
        let r = async {
            let who = self.caller(&req)?;
            let user = self.svc.parse_user(&req.get_ref().user_id)?;
            let e = self.svc.erase_user(&who, &user).await?;
            let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
            Ok(pb::EraseUserResponse {
                sessions_ended: n(e.sessions_ended),
                removed_from_contacts: n(e.removed_from_contacts),
                removed_from_conversations: n(e.removed_from_conversations),
            })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("EraseUser", start, &r);
        r
    }

    async fn set_presence(&self, req: Request<pb::SetPresenceRequest>) -> Rpc<pb::UserPresence> {
        let start = Instant::now();
        let r = async {
            let who = self.caller(&req)?;
            let m = req.get_ref();
            let user = self.svc.parse_user(&m.user_id)?;
            let status = match pb::Status::try_from(m.status) {
                Ok(pb::Status::Online) => "online",
                Ok(pb::Status::Away) => "away",
                Ok(pb::Status::Busy) => "busy",
                Ok(pb::Status::Offline) => "offline",
                _ => return Err(ApiError::BadRequest("status must be STATUS_ONLINE, STATUS_AWAY, STATUS_BUSY or STATUS_OFFLINE".into())),
            };
            let ttl_seconds = if m.until_changed {
                Some(0)
            } else if m.ttl_seconds == 0 {
                None
            } else {
                Some(i64::from(m.ttl_seconds))
            };
            let p = self
                .svc
                .set_status(&who, &user, StatusWrite { status: Some(status.into()), message: Some(m.message.clone()), ttl_seconds })
                .await?;
            Ok(presence_pb(&p))
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("SetPresence", start, &r);
        r
    }

    type WatchPresenceStream = ReceiverStream<Result<pb::PresenceEvent, GrpcStatus>>;

    async fn get_conversation_presence(
        &self,
        req: Request<pb::GetConversationPresenceRequest>,
    ) -> Rpc<pb::GetConversationPresenceResponse> {
        use crate::service::conversations::{Listed, DEFAULT_PAGE};
        use pb::get_conversation_presence_request::Listed as L;
        let start = Instant::now();
        let r = async {
            let who = self.caller(&req)?;
            let m = req.get_ref();
            let listed = match L::try_from(m.listed) {
                Ok(L::Online) => Listed::Online,
                Ok(L::Offline) => Listed::Offline,
                Ok(L::All) => Listed::All,
                Err(_) => return Err(ApiError::BadRequest(format!("listed {} is not a Listed value", m.listed))),
            };
            let limit = if m.limit == 0 { DEFAULT_PAGE } else { m.limit as usize };
            let cursor = (!m.cursor.is_empty()).then_some(m.cursor.as_str());
            let page = self.svc.conversation_presence(&who, &m.conversation_id, listed, limit, cursor).await?;
            Ok(pb::GetConversationPresenceResponse {
                members: page.members as u32,
                online: page.online as u32,
                presences: page.presences.iter().map(presence_pb).collect(),
                next_cursor: page.next_cursor.unwrap_or_default(),
            })
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("GetConversationPresence", start, &r);
        r
    }

    async fn watch_presence(&self, req: Request<pb::WatchPresenceRequest>) -> Rpc<Self::WatchPresenceStream> {
        let start = Instant::now();
        let r = async {
            let m = req.get_ref();
            let mut directory = None;
            let (viewer, watched, explicit) = if m.all {
                (Some(self.admin(&req, "WatchPresence with all: true")?), None, Vec::new())
            } else if m.conversation_ids.is_empty() {
                let viewer = self.caller_optional(&req)?;
                let mut ids = self.svc.parse_ids(m.user_ids.iter().map(String::as_str))?;
                ids.sort();
                (viewer, Some(ids), Vec::new())
            } else {
                // Conversations need a caller who may see them. Membership changes are
                // followed from before the check, so a removal right after it is seen.
                directory = Some(self.svc.bus.subscribe_directory());
                let viewer = self.caller(&req)?;
                for c in &m.conversation_ids {
                    self.svc.may_see_conversation(&viewer, c)?;
                }
                let explicit =
                    if m.user_ids.is_empty() { Vec::new() } else { self.svc.parse_ids(m.user_ids.iter().map(String::as_str))? };
                let ids = watched_ids(&self.svc, &explicit, &m.conversation_ids);
                (Some(viewer), Some(ids), explicit)
            };
            let conversations: Vec<Arc<str>> =
                if m.all { Vec::new() } else { m.conversation_ids.iter().map(|c| Arc::from(c.as_str())).collect() };
            let limits = &self.svc.limits;
            let permit =
                self.watches.take(watched.as_ref().map_or(0, Vec::len), limits.grpc_max_watch_streams, limits.grpc_max_watched_ids)?;
            // Subscribe before any snapshot is read, so no change falls in between.
            let events = self.svc.bus.subscribe();
            let (tx, rx) = mpsc::channel(16);
            // Cluster mode: this node now follows other nodes' events about these users.
            let interest = crate::bus::InterestGuard::new(self.svc.bus.interest(), watched.clone().unwrap_or_default(), m.all);
            let fwd = Forwarder {
                svc: self.svc.clone(),
                viewer,
                watched: watched.unwrap_or_default(),
                explicit,
                conversations,
                directory,
                all: m.all,
                shutdown: self.shutdown.clone(),
                interest,
                _permit: permit,
            };
            tokio::spawn(fwd.run(events, tx));
            Ok(ReceiverStream::new(rx))
        }
        .await
        .map(Response::new)
        .map_err(to_status);
        observe("WatchPresence", start, &r);
        r
    }
}

/// Feeds one `WatchPresence` stream: first the snapshot of the watched users (read from
/// the store in small chunks as the reader takes them, so a parked stream holds its
/// ids, not their presences), then the events about them that change what the viewer
/// may see (privacy hides the moment of a change, not only its content), coalesced per
/// user while the reader is slow: at most one pending event per user, the newest. A
/// stream holding more than `limits.grpc_watch_buffer` pending users, or whose reader
/// falls behind the bus itself, ends with `RESOURCE_EXHAUSTED`.
struct Forwarder {
    svc: Arc<Service>,
    viewer: Option<Identity>,
    /// Sorted; empty with `all`.
    watched: Vec<UserId>,
    /// With conversations: the users asked for by id (sorted), and the conversations,
    /// whose members are watched as the membership changes.
    explicit: Vec<UserId>,
    conversations: Vec<Arc<str>>,
    /// Membership changes, for a stream that watches conversations.
    directory: Option<broadcast::Receiver<crate::bus::DirectoryChanged>>,
    all: bool,
    shutdown: watch::Receiver<bool>,
    interest: crate::bus::InterestGuard,
    _permit: WatchPermit,
}

impl Forwarder {
    fn watches(&self, user: &UserId) -> bool {
        self.all || self.watched.binary_search(user).is_ok()
    }

    fn encode(&self, p: Presence, kind: pb::presence_event::Kind, at: Millis, snapshot: bool) -> pb::PresenceEvent {
        let seen = self.svc.view_as(self.viewer.as_ref(), p);
        pb::PresenceEvent { kind: kind as i32, presence: Some(presence_pb(&seen)), at: Some(ts(at)), snapshot }
    }

    /// A conversation of the stream changed members: the watched users follow (those who
    /// joined are queued for a snapshot in `to_snapshot`). `Err` when the caller may no
    /// longer see it.
    fn members_changed(&mut self, conversation: &str, to_snapshot: &mut Vec<UserId>) -> Result<(), GrpcStatus> {
        if !self.conversations.iter().any(|c| **c == *conversation) {
            return Ok(());
        }
        if let Some(viewer) = &self.viewer {
            self.svc.may_see_conversation(viewer, conversation).map_err(|_| {
                GrpcStatus::permission_denied(format!("no longer a member of conversation {conversation}: the stream ends"))
            })?;
        }
        let conversations: Vec<String> = self.conversations.iter().map(|c| c.to_string()).collect();
        let now = watched_ids(&self.svc, &self.explicit, &conversations);
        let added: Vec<UserId> = now.iter().filter(|u| self.watched.binary_search(u).is_err()).cloned().collect();
        let removed: Vec<UserId> = self.watched.iter().filter(|u| now.binary_search(u).is_err()).cloned().collect();
        self.interest.add(&added);
        self.interest.remove(&removed);
        to_snapshot.extend(added);
        self.watched = now;
        Ok(())
    }

    async fn run(mut self, mut events: broadcast::Receiver<Arc<Event>>, tx: mpsc::Sender<Result<pb::PresenceEvent, GrpcStatus>>) {
        let mut shutdown = self.shutdown.clone();
        let buffer = self.svc.limits.grpc_watch_buffer;
        let mut directory = self.directory.take();
        // Snapshot still to send: `to_snapshot[cursor..]` (the watched users, then those
        // who joined a conversation since), and a chunk read ahead.
        let mut to_snapshot: Vec<UserId> = self.watched.clone();
        let mut cursor = 0usize;
        let mut ready: VecDeque<pb::PresenceEvent> = VecDeque::new();
        // Events to send, oldest user first, the newest event per user.
        let mut order: VecDeque<UserId> = VecDeque::new();
        let mut pending: HashMap<UserId, Arc<Event>> = HashMap::new();
        // The revision of each user's snapshot, for a while: an event still on its way
        // from before the read is no news after it (it would roll the reader back).
        let mut snapshot_revs: HashMap<UserId, u64> = HashMap::new();
        let mut snapshot_times: VecDeque<(std::time::Instant, UserId)> = VecDeque::new();
        let end = loop {
            let has_output = !ready.is_empty() || cursor < to_snapshot.len() || !order.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Some(draining()),
                _ = tx.closed() => break None,
                permit = tx.reserve(), if has_output => {
                    let Ok(permit) = permit else { break None };
                    if ready.is_empty() && cursor < to_snapshot.len() {
                        let chunk = &to_snapshot[cursor..(cursor + SNAPSHOT_CHUNK).min(to_snapshot.len())];
                        cursor += chunk.len();
                        let now = self.svc.clock.now();
                        match self.svc.get_many_fresh(chunk).await {
                            Ok(found) => {
                                let read_at = std::time::Instant::now();
                                while snapshot_times.front().is_some_and(|(t, _)| read_at.duration_since(*t) > SNAPSHOT_REVISIONS_KEPT) {
                                    if let Some((_, u)) = snapshot_times.pop_front() {
                                        snapshot_revs.remove(&u);
                                    }
                                }
                                for p in found {
                                    // The snapshot is as new as any event queued before it.
                                    if pending.remove(&p.user_id).is_some() {
                                        order.retain(|u| *u != p.user_id);
                                    }
                                    if p.revision != 0 {
                                        snapshot_revs.insert(p.user_id.clone(), p.revision);
                                        snapshot_times.push_back((read_at, p.user_id.clone()));
                                    }
                                    ready.push_back(self.encode(p, pb::presence_event::Kind::PresenceUpdated, now, true));
                                }
                            }
                            Err(e) => break Some(to_status(e)),
                        }
                    }
                    if let Some(ev) = ready.pop_front() {
                        permit.send(Ok(ev));
                    } else if let Some(ev) = order.pop_front().and_then(|u| pending.remove(&u)) {
                        permit.send(Ok(self.encode(ev.presence.clone(), kind_pb(ev.kind), ev.at, false)));
                    }
                }
                change = async {
                    match directory.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match change {
                    Ok(crate::bus::DirectoryChanged::Members { conversation, .. }) => {
                        if let Err(status) = self.members_changed(&conversation, &mut to_snapshot) {
                            break Some(status);
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Changes were missed: work the watched users out again.
                        let conversations = self.conversations.clone();
                        if let Some(status) = conversations.iter().find_map(|c| self.members_changed(c, &mut to_snapshot).err()) {
                            break Some(status);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => directory = None,
                },
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        let user = &ev.presence.user_id;
                        if !self.watches(user) {
                            continue;
                        }
                        let rev = ev.presence.revision;
                        if rev != 0 && snapshot_revs.get(user).is_some_and(|snap| rev <= *snap) {
                            continue; // older than the snapshot already taken
                        }
                        let rel = self.svc.relation(self.viewer.as_ref(), user);
                        if !visible_change(&ev.before, &ev.presence, &self.svc.directory.privacy(user), rel) {
                            continue; // nothing this viewer may see changed: not even the moment
                        }
                        if pending.insert(user.clone(), ev.clone()).is_some() {
                            metrics::counter!("grpc_watch_coalesced_total").increment(1);
                        } else {
                            order.push_back(user.clone());
                        }
                        if pending.len() > buffer {
                            break Some(GrpcStatus::resource_exhausted(format!(
                                "stream reader too slow: more than {buffer} users pending (limits.grpc_watch_buffer)"
                            )));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        break Some(GrpcStatus::resource_exhausted(format!("stream reader too slow: {n} events missed; open a new stream")));
                    }
                    Err(broadcast::error::RecvError::Closed) => break Some(GrpcStatus::unavailable("server shutting down")),
                }
            }
        };
        if let Some(status) = end {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tx.send(Err(status))).await;
        }
    }
}

/// The users a stream watches: `explicit` and the members of `conversations`, sorted.
fn watched_ids(svc: &Service, explicit: &[UserId], conversations: &[String]) -> Vec<UserId> {
    let mut ids: Vec<UserId> = explicit.to_vec();
    for c in conversations {
        if let Some(members) = svc.directory.members(c) {
            ids.extend(members.iter().cloned());
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// How long a snapshot's revisions are kept to drop events older than it that were
/// still on their way (they arrive within milliseconds).
const SNAPSHOT_REVISIONS_KEPT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a watch stream ends when its node drains: `UNAVAILABLE`, with gRPC's retry
/// pushback (`grpc-retry-pushback-ms: 0`: retry now) and a message saying where to go.
fn draining() -> GrpcStatus {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert("grpc-retry-pushback-ms", tonic::metadata::MetadataValue::from_static("0"));
    GrpcStatus::with_metadata(
        tonic::Code::Unavailable,
        "node draining (restart or deploy): open the stream again now, on any node; it starts with a fresh snapshot",
        meta,
    )
}

/// Serves gRPC on `listener` (over TLS with `tls`) until `shutdown` resolves.
pub async fn serve(
    svc: Arc<Service>,
    listener: TcpListener,
    tls: Option<Arc<crate::listener::tls::Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PresenceApiServer<Api>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1();
    let reflection_v1alpha = reflection().build_v1alpha();
    let mut router = tonic::transport::Server::builder()
        // Calls per connection; pings find dead peers (an idle connection is closed by
        // the listener's idle timeout).
        .max_concurrent_streams(svc.limits.grpc_max_concurrent_streams)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(crate::listener::GrpcConnLayer)
        .add_service(health_service);
    match (reflection_v1, reflection_v1alpha) {
        (Ok(v1), Ok(v1alpha)) => {
            router = router.add_service(v1).add_service(v1alpha);
        }
        (Err(e), _) | (_, Err(e)) => tracing::error!(error = %e, "gRPC reflection disabled: descriptor set rejected"),
    }
    let limits = svc.limits.clone();
    let clock = svc.clock.clone();
    let api = PresenceApiServer::new(Api { svc, shutdown: stop_rx, watches: Arc::default() });
    let signal = async move {
        shutdown.await;
        health.set_not_serving::<PresenceApiServer<Api>>().await;
        let _ = stop_tx.send(true);
    };
    let timeouts = crate::listener::Timeouts::of(&limits);
    let incoming = crate::listener::grpc_incoming(listener, timeouts, crate::service::limiter::per_ip(&limits), clock, tls);
    router.add_service(api).serve_with_incoming_shutdown(incoming, signal).await
}
