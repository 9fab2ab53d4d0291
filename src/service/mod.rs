//! The application layer shared by every transport: input validation, permissions, rate
//! limits and defaults. Its error type is [`crate::error::ApiError`], whose mapping to
//! every transport is decided in one table there.
//!
//! Transports extract, call a method here, and encode the result; they hold no rules.
//! Rooms: [`sessions`] (device sessions for every transport), [`typing`] (typing
//! indicators), [`limiter`] (per-key token buckets). The service depends on nothing
//! above it: what the WebSocket hub must learn (presence events, typing, directory
//! changes) goes on the bus.

pub mod activity;
pub mod conversations;
pub mod erasure;
pub mod instances;
pub mod limiter;
pub mod sessions;
pub mod typing;

pub use limiter::KeyedLimiter;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;

use crate::audit::{Audit, Subject};
use crate::auth::{AuthError, Authenticator, Identity};
use crate::bus::{DirectoryChanged, EventBus};
use crate::clock::Clock;
use crate::config::{AuthMode, Config, LimitsConfig, PresenceConfig};
use crate::core::ratelimit::Rate;
use crate::core::{project, Platform, Presence, Privacy, Relation, Status, UserId};
use crate::directory::Directory;
use crate::error::ApiError;
use crate::store::{get_one, SetStatus, Store};
use sessions::{GatewaySession, Sessions};

/// Longest TTL a gateway may give a session or an instance lease (a day).
pub const MAX_SESSION_TTL_SECS: u64 = 24 * 3600;
use typing::Typists;

/// An explicit status write as received from a client, before validation.
#[derive(Debug, Clone, Default)]
pub struct StatusWrite {
    pub status: Option<String>,
    pub message: Option<String>,
    /// Seconds; `0` = until changed; absent = `presence.default_status_ttl`.
    pub ttl_seconds: Option<i64>,
}

/// Everything a transport needs, shared behind an `Arc`.
pub struct Service {
    pub store: Arc<dyn Store>,
    pub directory: Arc<Directory>,
    pub sessions: Sessions,
    pub typists: Arc<Typists>,
    pub auth_mode: AuthMode,
    pub bus: EventBus,
    pub auth: Arc<Authenticator>,
    pub clock: Arc<dyn Clock>,
    pub limits: LimitsConfig,
    pub presence: PresenceConfig,
    pub node_id: Arc<str>,
    /// The instance id of sessions HTTP-only clients open (`<node>/http`).
    pub http_instance: Arc<str>,
    writes: KeyedLimiter,
    /// New connections per client IP (`/ws` upgrades; the gRPC listener has its own).
    connects: Option<KeyedLimiter>,
    /// `logging.audit_file`: every change of someone's presence data (off: no-op).
    pub audit: Audit,
}

impl Service {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        directory: Arc<Directory>,
        bus: EventBus,
        auth: Arc<Authenticator>,
        clock: Arc<dyn Clock>,
    ) -> Service {
        let rate = Rate { per_second: config.limits.write_rate_per_sec, burst: config.limits.write_burst };
        let node_id: Arc<str> = Arc::from(config.service.node_id.as_str());
        let instances = Arc::new(instances::Instances::new(store.clone(), clock.clone(), config.store.tick.as_millis_i64()));
        instances.start();
        let sessions = Sessions::new(
            store.clone(),
            instances,
            config.limits.max_devices_per_user,
            config.presence.session_ttl.as_millis_i64(),
            config.presence.grace_ms(),
            config.presence.auto_away_after.as_millis_i64(),
        );
        let typists = Arc::new(Typists::new(
            node_id.clone(),
            store.clone(),
            directory.clone(),
            bus.clone(),
            clock.clone(),
            config.presence.typing_ttl.as_millis_i64(),
        ));
        typists.start();
        Service {
            store,
            directory,
            sessions,
            typists,
            auth_mode: config.auth.mode,
            bus,
            auth,
            clock,
            limits: config.limits.clone(),
            presence: config.presence.clone(),
            http_instance: Arc::from(format!("{node_id}/http")),
            node_id,
            writes: KeyedLimiter::new(rate),
            connects: limiter::per_ip(&config.limits),
            audit: Audit::default(),
        }
    }

    /// `Some(reason)` while reads come from a possibly stale copy (a degraded cluster node).
    pub fn degraded(&self) -> Option<String> {
        self.store.degraded()
    }

    /// Whether the store can serve (503 with the reason otherwise).
    pub async fn health(&self) -> Result<(), ApiError> {
        Ok(self.store.health().await?)
    }

    /// The store's counters, for health and metrics.
    pub fn stats(&self) -> crate::store::StoreStats {
        self.store.stats()
    }

    /// Per-IP rate limit on new connections (429 / `RESOURCE_EXHAUSTED`).
    pub fn check_connect_rate(&self, ip: std::net::IpAddr) -> Result<(), ApiError> {
        let Some(l) = &self.connects else { return Ok(()) };
        l.check(&ip.to_string(), self.clock.now()).map_err(|retry_after_ms| {
            metrics::counter!("presence_rate_limited_total", "scope" => "connect").increment(1);
            ApiError::RateLimited { retry_after_ms }
        })
    }

    /// A device's declared platform (`desktop`, `mobile`, `web`); absent is fine.
    pub fn parse_platform(&self, raw: Option<&str>) -> Result<Option<Platform>, ApiError> {
        match raw.map(str::trim).filter(|r| !r.is_empty()) {
            None => Ok(None),
            Some(r) => Platform::parse(r)
                .map(Some)
                .ok_or_else(|| ApiError::BadRequest(format!("invalid platform {r:?}: expected desktop, mobile or web"))),
        }
    }

    /// A platform from a JSON body, where the schema is exact: `null` or absent is no
    /// platform; anything else (an empty string, other case, spaces) must be one of the names.
    pub fn parse_body_platform(&self, raw: Option<&str>) -> Result<Option<Platform>, ApiError> {
        raw.map(|r| {
            Platform::parse(r).ok_or_else(|| ApiError::BadRequest(format!("invalid platform {r:?}: expected desktop, mobile or web")))
        })
        .transpose()
    }

    pub fn parse_user(&self, raw: &str) -> Result<UserId, ApiError> {
        Ok(UserId::parse(raw, self.limits.max_user_id_len)?)
    }

    /// Validates a device, instance or conversation id (400 with the reason).
    pub fn check_id(&self, what: &'static str, raw: &str) -> Result<(), ApiError> {
        Ok(crate::core::validate_id(what, raw, self.limits.max_user_id_len)?)
    }

    /// Validates a list of ids: not empty, at most `limits.max_batch_ids`, each valid;
    /// duplicates are answered once.
    pub fn parse_ids<'a>(&self, raw: impl IntoIterator<Item = &'a str>) -> Result<Vec<UserId>, ApiError> {
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        let mut count = 0usize;
        for r in raw {
            count += 1;
            if count > self.limits.max_batch_ids {
                return Err(ApiError::BadRequest(format!("too many user ids: at most {} per request", self.limits.max_batch_ids)));
            }
            let id = self.parse_user(r)?;
            if seen.insert(id.clone()) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Err(ApiError::BadRequest("no user ids given".into()));
        }
        Ok(ids)
    }

    /// Presence of each id; users never seen come back `offline` (seed 003 §12.2).
    pub async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Presence>, ApiError> {
        let found = self.store.get_many(ids).await?;
        Ok(ids.iter().zip(found).map(|(id, p)| p.unwrap_or_else(|| Presence::unknown(id.clone(), self.node_id.clone()))).collect())
    }

    /// As [`Service::get_many`], from the source of truth (a snapshot that events follow).
    pub async fn get_many_fresh(&self, ids: &[UserId]) -> Result<Vec<Presence>, ApiError> {
        let found = self.store.get_many_fresh(ids).await?;
        Ok(ids.iter().zip(found).map(|(id, p)| p.unwrap_or_else(|| Presence::unknown(id.clone(), self.node_id.clone()))).collect())
    }

    /// Presence of one user; 404 for a user never seen.
    pub async fn get_one(&self, id: &UserId) -> Result<Presence, ApiError> {
        get_one(&*self.store, id).await?.ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))
    }

    /// `who` may act for `user`, else 403.
    pub fn authorize_write(&self, who: &Identity, user: &UserId) -> Result<(), ApiError> {
        if who.may_act_for(user.as_str()) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("a token for {:?} cannot change the presence of {user}", who.sub)))
        }
    }

    /// Per-user write rate limit (token bucket).
    pub fn check_write_rate(&self, user: &UserId) -> Result<(), ApiError> {
        self.writes.check(user.as_str(), self.clock.now()).map_err(|retry_after_ms| {
            metrics::counter!("presence_rate_limited_total", "scope" => "write").increment(1);
            ApiError::RateLimited { retry_after_ms }
        })
    }

    /// Validates a status write into what the store takes.
    pub fn validate_status(&self, w: StatusWrite) -> Result<SetStatus, ApiError> {
        let raw = w.status.ok_or_else(|| ApiError::BadRequest("status is required (online, away, busy or offline)".into()))?;
        let status = Status::parse(&raw)
            .ok_or_else(|| ApiError::BadRequest(format!("invalid status {raw:?}: expected online, away, busy or offline")))?;
        let message = w.message.unwrap_or_default();
        if message.chars().count() > self.limits.max_message_len {
            return Err(ApiError::BadRequest(format!("message is longer than {} characters", self.limits.max_message_len)));
        }
        if message.chars().any(|c| c.is_control()) {
            return Err(ApiError::BadRequest("message must not contain control characters".into()));
        }
        let max_ttl = self.limits.max_status_ttl.0.as_secs() as i64;
        let ttl_ms = match w.ttl_seconds {
            None => Some(self.presence.default_status_ttl.as_millis_i64()).filter(|&t| t > 0),
            Some(0) => None,
            Some(t) if t < 0 => return Err(ApiError::BadRequest("ttl must be 0 (until changed) or a positive number of seconds".into())),
            Some(t) if t > max_ttl => return Err(ApiError::BadRequest(format!("ttl must be at most {max_ttl} seconds"))),
            Some(t) => Some(t * 1000),
        };
        Ok(SetStatus { status, message: Arc::from(message), ttl_ms })
    }

    /// The whole write path: permission, input, rate limit, store.
    pub async fn set_status(&self, who: &Identity, user: &UserId, write: StatusWrite) -> Result<Presence, ApiError> {
        self.authorize_write(who, user)?;
        let req = self.validate_status(write)?;
        self.check_write_rate(user)?;
        let change = self.audit.enabled().then(|| json!({"status": req.status.as_str(), "message": &*req.message, "ttl_ms": req.ttl_ms}));
        let p = self.store.set_status(user, req).await?;
        metrics::counter!("presence_updates_total").increment(1);
        if let Some(change) = change {
            self.audit.record(who, Subject::User(user.as_str()), "status_set", change);
        }
        Ok(p)
    }

    /// Clears the explicit status (the derived one applies again).
    pub async fn clear_status(&self, who: &Identity, user: &UserId) -> Result<Presence, ApiError> {
        self.authorize_write(who, user)?;
        self.check_write_rate(user)?;
        let p = self.store.clear_status(user).await?;
        metrics::counter!("presence_updates_total").increment(1);
        self.audit.record(who, Subject::User(user.as_str()), "status_cleared", json!({}));
        Ok(p)
    }

    /// Who is calling: a JWT from `Authorization: Bearer` or, for browsers opening a
    /// WebSocket, the `token` query parameter. In `auth.mode: gateway` a request without a
    /// token is trusted as the gateway's `X-User-ID` (seed 003 §2.2); backends calling with
    /// a service token (`presence:admin`) are still verified.
    pub fn identify(&self, headers: &axum::http::HeaderMap, token_param: Option<&str>) -> Result<Identity, ApiError> {
        let header = |name: &str| match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(Some).map_err(|_| ApiError::Unauthorized(AuthError::Malformed)),
        };
        match (header("authorization")?, token_param) {
            (Some(h), _) => Ok(self.auth.verify_header(Some(h))?),
            (None, Some(t)) => Ok(self.auth.verify(t)?),
            (None, None) if self.auth_mode == AuthMode::Gateway => {
                let user = header("x-user-id")?.ok_or(ApiError::Unauthorized(AuthError::MissingGatewayUser))?;
                self.parse_user(user)?;
                let mut who = Identity::user(user);
                who.origin.gateway = true;
                Ok(who)
            }
            (None, None) if headers.contains_key("x-user-id") => Err(ApiError::Unauthorized(AuthError::GatewayHeaderIgnored)),
            (None, None) => Err(ApiError::Unauthorized(AuthError::Missing)),
        }
    }

    /// The reader's identity when it sent credentials; anonymous otherwise.
    pub fn identify_optional(&self, headers: &axum::http::HeaderMap) -> Result<Option<Identity>, ApiError> {
        let present = headers.contains_key("authorization") || (self.auth_mode == AuthMode::Gateway && headers.contains_key("x-user-id"));
        if present {
            self.identify(headers, None).map(Some)
        } else {
            Ok(None)
        }
    }

    /// How `viewer` relates to `owner` for privacy.
    pub fn relation(&self, viewer: Option<&Identity>, owner: &UserId) -> Relation {
        match viewer {
            Some(v) if v.is_admin() || v.sub == owner.as_str() => Relation::Owner,
            Some(v) => match UserId::parse(&v.sub, usize::MAX) {
                Ok(vid) if self.directory.contacts(owner).contains(&vid) => Relation::Contact,
                _ => Relation::Other,
            },
            None => Relation::Other,
        }
    }

    /// `p` as `viewer` may see it.
    pub fn view_as(&self, viewer: Option<&Identity>, p: Presence) -> Presence {
        let rel = self.relation(viewer, &p.user_id);
        if rel == Relation::Owner {
            return p;
        }
        project(&p, &self.directory.privacy(&p.user_id), rel)
    }

    /// [`Service::get_many`] with privacy applied for `viewer`.
    pub async fn get_many_as(&self, viewer: Option<&Identity>, ids: &[UserId]) -> Result<Vec<Presence>, ApiError> {
        Ok(self.get_many(ids).await?.into_iter().map(|p| self.view_as(viewer, p)).collect())
    }

    /// [`Service::get_one`] with privacy applied for `viewer`.
    pub async fn get_one_as(&self, viewer: Option<&Identity>, id: &UserId) -> Result<Presence, ApiError> {
        Ok(self.view_as(viewer, self.get_one(id).await?))
    }

    /// Only the user (or a backend with `presence:admin`) may read or change their
    /// contacts and privacy settings.
    pub fn authorize_owner(&self, who: &Identity, user: &UserId, what: &str) -> Result<(), ApiError> {
        if who.may_act_for(user.as_str()) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("a token for {:?} cannot access the {what} of {user}", who.sub)))
        }
    }

    pub fn require_admin(&self, who: &Identity, what: &str) -> Result<(), ApiError> {
        if who.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("{what} needs a service token with scope {}", crate::auth::ADMIN_SCOPE)))
        }
    }

    /// Replaces the user's contacts (their audience); pushes the change to everyone whose
    /// view of the user changed.
    pub async fn set_contacts(&self, who: &Identity, user: &UserId, raw: &[String]) -> Result<Vec<UserId>, ApiError> {
        self.authorize_owner(who, user, "contacts")?;
        let ids = self.parse_id_list(raw, self.limits.max_contacts, "contacts")?;
        let old = self.directory.set_contacts(&*self.store, user, ids.clone()).await?;
        let mut sorted: Vec<UserId> = self.directory.contacts(user).iter().cloned().collect();
        sorted.sort();
        let now: HashSet<&UserId> = sorted.iter().collect();
        let mut changed: Vec<UserId> = old.iter().filter(|c| !now.contains(c)).cloned().collect();
        changed.extend(sorted.iter().filter(|c| !old.contains(*c)).cloned());
        if !changed.is_empty() {
            self.bus.publish_directory(DirectoryChanged::Contacts { user: user.clone(), changed });
        }
        self.audit.record(who, Subject::User(user.as_str()), "contacts_set", json!({ "contacts": &sorted }));
        Ok(sorted)
    }

    pub fn contacts(&self, who: &Identity, user: &UserId) -> Result<Vec<UserId>, ApiError> {
        self.authorize_owner(who, user, "contacts")?;
        let mut v: Vec<UserId> = self.directory.contacts(user).iter().cloned().collect();
        v.sort();
        Ok(v)
    }

    pub fn privacy(&self, who: &Identity, user: &UserId) -> Result<Privacy, ApiError> {
        self.authorize_owner(who, user, "privacy settings")?;
        Ok(self.directory.privacy(user))
    }

    /// Changes privacy settings and pushes what watchers may now see.
    pub async fn set_privacy(&self, who: &Identity, user: &UserId, p: Privacy) -> Result<Privacy, ApiError> {
        self.authorize_owner(who, user, "privacy settings")?;
        self.check_write_rate(user)?;
        let old = self.directory.set_privacy(&*self.store, user, p).await?;
        if old != p {
            self.bus.publish_directory(DirectoryChanged::Privacy { user: user.clone(), previous: old });
        }
        self.audit.record(who, Subject::User(user.as_str()), "privacy_set", json!({ "privacy": p }));
        Ok(p)
    }

    /// Sets a conversation's members (backends only).
    pub async fn set_members(&self, who: &Identity, conversation: &str, raw: &[String]) -> Result<Vec<UserId>, ApiError> {
        self.require_admin(who, "setting conversation members")?;
        self.check_id("conversation id", conversation)?;
        let ids = self.parse_id_list(raw, self.limits.max_conversation_members, "members")?;
        if let Some(change) = self.directory.set_members(&*self.store, conversation, ids.clone()).await? {
            self.bus.publish_directory(change);
        }
        self.audit.record(who, Subject::Conversation(conversation), "conversation_members_set", json!({ "members": &ids }));
        Ok(ids)
    }

    pub fn members(&self, who: &Identity, conversation: &str) -> Result<Vec<UserId>, ApiError> {
        self.require_admin(who, "reading conversation members")?;
        let mut v: Vec<UserId> = self.directory.members(conversation).map(|m| m.iter().cloned().collect()).unwrap_or_default();
        v.sort();
        Ok(v)
    }

    /// The audit log's line for device sessions a gateway (or an admin) opened or ended.
    pub fn audit_sessions<'a>(
        &self,
        who: &Identity,
        action: &str,
        instance: &str,
        sessions: impl IntoIterator<Item = (&'a UserId, &'a str)>,
    ) {
        if !self.audit.enabled() {
            return;
        }
        for (user, device) in sessions {
            self.audit.record(who, Subject::User(user.as_str()), action, json!({ "device_id": device, "instance_id": instance }));
        }
    }

    /// The audit log's line for a gateway instance ended by an admin.
    pub fn audit_instance_ended(&self, who: &Identity, instance: &str, sessions_ended: u64) {
        self.audit.record(who, Subject::Instance(instance), "instance_ended", json!({ "sessions_ended": sessions_ended }));
    }

    /// A list of ids that may be empty (unlike a read), bounded by `max`.
    fn parse_id_list(&self, raw: &[String], max: usize, what: &str) -> Result<Vec<UserId>, ApiError> {
        if raw.len() > max {
            return Err(ApiError::BadRequest(format!("too many {what}: at most {max}")));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for r in raw {
            let id = self.parse_user(r)?;
            if seen.insert(id.clone()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// A gateway's session TTL in seconds (`0`: `presence.session_ttl`); at most a day.
    pub fn session_ttl(&self, seconds: u64) -> Result<Option<i64>, ApiError> {
        if seconds > MAX_SESSION_TTL_SECS {
            return Err(ApiError::BadRequest(format!("ttl_seconds must be at most {MAX_SESSION_TTL_SECS}")));
        }
        Ok((seconds > 0).then(|| seconds as i64 * 1000))
    }

    /// A gateway instance id given with a session (`default` when absent).
    pub fn instance_or<'a>(&self, raw: &'a str, default: &'a str) -> Result<&'a str, ApiError> {
        let instance = if raw.is_empty() { default } else { raw };
        self.check_id("instance id", instance)?;
        Ok(instance)
    }

    /// The sessions of a gateway's batch: at most `limits.max_sessions_per_call`, each
    /// with a valid user, device and platform (the first invalid one fails the call).
    pub fn gateway_sessions<'a>(
        &self,
        raw: impl ExactSizeIterator<Item = (&'a str, &'a str, Option<&'a str>)>,
    ) -> Result<Vec<GatewaySession>, ApiError> {
        let max = self.limits.max_sessions_per_call;
        if raw.len() > max {
            return Err(ApiError::BadRequest(format!("too many sessions: at most {max} per call (limits.max_sessions_per_call)")));
        }
        if raw.len() == 0 {
            return Err(ApiError::BadRequest("no sessions given".into()));
        }
        raw.map(|(user, device, platform)| {
            let user = self.parse_user(user)?;
            self.check_id("device id", device)?;
            Ok(GatewaySession { user, device: device.into(), platform: self.parse_platform(platform)?, active: None })
        })
        .collect()
    }

    /// Verifies an `Authorization` header.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Identity, ApiError> {
        Ok(self.auth.verify_header(header)?)
    }
}
