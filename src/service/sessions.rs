//! Device sessions for every transport (WebSocket connections, gRPC gateways, HTTP-only
//! clients): open, heartbeat, close, list. The device limit is enforced by the store in
//! the same step that adds a session; each registration gets a random tag, so that only
//! the connection that opened a session can end it by its tag.
//!
//! Gateways (gRPC, REST `/api/v2/sessions`) register through [`Sessions::open_gateway`]
//! and [`Sessions::open_many`]: a session of an instance holding a lease is bound to it
//! ([`super::instances`]).

use std::sync::Arc;

use futures_util::stream::{self, StreamExt};

use super::instances::{Instances, LeaseInfo, BOUND_TTL_MS};
use crate::core::{Activity, DeviceId, Ending, Millis, NewSession, Platform, Registered, Session, UserId};
use crate::error::ApiError;
use crate::store::Store;

/// Registrations of one batch in flight at once (cluster stores are round trips).
const BATCH_CONCURRENCY: usize = 32;

/// How a device left, as the transport saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// A deliberate sign-out (WebSocket `bye`, an unregistration that says `immediate`):
    /// the session ends at once.
    Bye,
    /// It went without saying so (a lost or closed socket, a gateway's plain
    /// unregistration, a drained node), last heard of at `last_heard`: held for
    /// `presence.offline_grace` from then.
    Lost { last_heard: Millis },
}

/// One session a gateway registers (validated by the transport).
#[derive(Debug, Clone)]
pub struct GatewaySession {
    pub user: UserId,
    pub device: DeviceId,
    pub platform: Option<Platform>,
    /// Whether the user is active on the device as it registers (`None`: a new session
    /// starts active, one continued keeps what its device last said).
    pub active: Option<bool>,
}

pub struct Sessions {
    store: Arc<dyn Store>,
    pub instances: Arc<Instances>,
    /// `limits.max_devices_per_user`.
    max_devices: usize,
    /// `presence.session_ttl`.
    ttl_ms: i64,
    /// `presence.offline_grace`.
    grace_ms: i64,
    /// `presence.auto_away_after`.
    away_after_ms: i64,
}

impl Sessions {
    pub fn new(
        store: Arc<dyn Store>,
        instances: Arc<Instances>,
        max_devices: usize,
        ttl_ms: i64,
        grace_ms: i64,
        away_after_ms: i64,
    ) -> Sessions {
        Sessions { store, instances, max_devices, ttl_ms, grace_ms, away_after_ms }
    }

    /// How the store ends a session that left as `leave` says, now.
    pub fn ending(&self, leave: Leave) -> Ending {
        match leave {
            Leave::Bye => Ending::Now,
            Leave::Lost { last_heard } => Ending::lost(last_heard, self.grace_ms, self.instances.now()),
        }
    }

    /// Opens (or replaces) the session of `device`, alive for `ttl_ms` (default
    /// `presence.session_ttl`) unless refreshed; 429 `limit_exceeded` over the device limit.
    pub async fn open(
        &self,
        user: &UserId,
        device: &str,
        instance: &Arc<str>,
        ttl_ms: Option<i64>,
        platform: Option<Platform>,
    ) -> Result<Registered, ApiError> {
        self.open_shared(user, Arc::from(device), instance.clone(), ttl_ms, platform, None).await
    }

    async fn open_shared(
        &self,
        user: &UserId,
        device: DeviceId,
        instance: Arc<str>,
        ttl_ms: Option<i64>,
        platform: Option<Platform>,
        active: Option<bool>,
    ) -> Result<Registered, ApiError> {
        // Idle from the start: since before the session began (unknown), so it does not
        // hold off an automatic away.
        let activity = active.map(|a| self.activity(a, Some(Millis::MIN)));
        let req = NewSession::shared(device, instance, ttl_ms.unwrap_or(self.ttl_ms))
            .platform(platform)
            .sid(rand::random())
            .max_devices(self.max_devices)
            .activity(activity);
        Ok(self.store.register_session(user, req).await?)
    }

    /// Opens a gateway's session of `s.device` on `instance`: bound to the instance's
    /// lease when it holds one (then `ttl_ms` is not used), else alive for `ttl_ms`.
    pub async fn open_gateway(&self, s: &GatewaySession, instance: &str, ttl_ms: Option<i64>) -> Result<Registered, ApiError> {
        let lease = self.instances.lease_of(instance).await?;
        let id = lease.as_ref().map_or_else(|| Arc::from(instance), |l| l.instance.clone());
        self.open_on(s, &id, ttl_ms, lease.is_some()).await
    }

    /// [`Sessions::open_gateway`] for many sessions of one instance (a gateway
    /// re-registering its sockets after a restart); one result per session, in order.
    pub async fn open_many(
        &self,
        items: &[GatewaySession],
        instance: &str,
        ttl_ms: Option<i64>,
    ) -> Result<Vec<Result<Registered, ApiError>>, ApiError> {
        let lease = self.instances.lease_of(instance).await?;
        let bound = lease.is_some();
        let id: Arc<str> = lease.map_or_else(|| Arc::from(instance), |l| l.instance);
        let id = &id;
        let open = |s: GatewaySession| async move { self.open_on(&s, id, ttl_ms, bound).await };
        Ok(stream::iter(items.to_vec()).map(open).buffered(BATCH_CONCURRENCY).collect().await)
    }

    async fn open_on(&self, s: &GatewaySession, instance: &Arc<str>, ttl_ms: Option<i64>, bound: bool) -> Result<Registered, ApiError> {
        let ttl = if bound { BOUND_TTL_MS } else { ttl_ms.unwrap_or(self.ttl_ms) };
        let mut reg = self.open_shared(&s.user, s.device.clone(), instance.clone(), Some(ttl), s.platform, s.active).await?;
        if !bound {
            // The instance may have taken a lease meanwhile (or take one later).
            if let Some(t) = self.instances.bind_late(&s.user, &s.device, &reg, instance, ttl).await? {
                reg.expires_at = t;
            }
            return Ok(reg);
        }
        if !self.instances.bind(instance) {
            // The lease ended while this registered: end it as the lease would have.
            self.store.unregister_session(&s.user, &s.device, Some(reg.sid)).await?;
            return Err(ApiError::NotFound(format!("the lease of instance {instance} ended: refresh it, then register again")));
        }
        reg.expires_at = self.instances.deadline(instance).unwrap_or(reg.expires_at);
        Ok(reg)
    }

    /// Creates or extends `instance`'s lease for `ttl_ms` (default `presence.session_ttl`).
    pub async fn refresh_instance(&self, instance: &str, ttl_ms: Option<i64>) -> Result<LeaseInfo, ApiError> {
        self.instances.refresh(instance, ttl_ms.unwrap_or(self.ttl_ms)).await
    }

    /// Extends a live session; `None` when there is none (open it again). A session bound
    /// to an instance lease answers the lease's deadline.
    pub async fn refresh(&self, user: &UserId, device: &str) -> Result<Option<Millis>, ApiError> {
        let t = self.store.refresh_session(user, device).await?;
        // Only a bound session has a deadline this far out: answer its lease's.
        if t.is_some_and(|t| t > self.instances.now().saturating_add(BOUND_TTL_MS / 2)) {
            let sessions = self.store.devices(user).await?;
            if let Some(lease) = sessions.iter().find(|s| &*s.device_id == device).and_then(|s| self.lease_deadline(s)) {
                return Ok(Some(lease));
            }
        }
        Ok(t)
    }

    /// The lease deadline of a session bound to one.
    fn lease_deadline(&self, s: &Session) -> Option<Millis> {
        (s.ttl_ms == BOUND_TTL_MS).then(|| self.instances.deadline(&s.instance_id)).flatten()
    }

    /// A heartbeat that opens the session when there is none (HTTP-only clients, and a
    /// WebSocket whose session lapsed). Returns the new expiry and, when it opened one,
    /// the registration.
    pub async fn heartbeat_or_open(
        &self,
        user: &UserId,
        device: &str,
        instance: &Arc<str>,
        platform: Option<Platform>,
        active: Option<bool>,
    ) -> Result<(Millis, Option<Registered>), ApiError> {
        match self.refresh(user, device).await? {
            Some(t) => {
                if let Some(a) = active {
                    // Said with every heartbeat: written only when it changes.
                    self.set_activity(user, device, None, (a, None), true).await?;
                }
                Ok((t, None))
            }
            None => {
                let reg = self.open_shared(user, Arc::from(device), instance.clone(), None, platform, active).await?;
                Ok((reg.expires_at, Some(reg)))
            }
        }
    }

    /// Says whether the user is active on `device` (the registration tagged `sid`, when
    /// given); idle since `idle_since` (the client noticed earlier; clamped to the
    /// session's start and to now), else now. 404 when the device has no live session.
    /// `reassert`: said with a heartbeat (see [`crate::store::PresenceStore::set_activity`]).
    pub async fn set_activity(
        &self,
        user: &UserId,
        device: &str,
        sid: Option<u64>,
        (active, idle_since): (bool, Option<Millis>),
        reassert: bool,
    ) -> Result<(), ApiError> {
        let activity = self.activity(active, idle_since);
        if self.store.set_activity(user, device, sid, activity, reassert).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound(format!("device {device} of user {user} has no live session")))
        }
    }

    /// What a device says: active, or idle since `idle_since` (default now: the core clamps
    /// a later time to now).
    fn activity(&self, active: bool, idle_since: Option<Millis>) -> Activity {
        if active {
            Activity::Active
        } else {
            Activity::Idle { since: idle_since.unwrap_or(Millis::MAX), away_after_ms: self.away_after_ms }
        }
    }

    /// Ends the session of `device` (only the registration tagged `sid`, when given): at
    /// once for a sign-out, else held for the offline grace.
    pub async fn close(&self, user: &UserId, device: &str, sid: Option<u64>, leave: Leave) -> Result<bool, ApiError> {
        Ok(self.store.end_session(user, device, sid, self.ending(leave)).await?)
    }

    /// A gateway ending a session (gRPC `UnregisterSession`, REST `/api/v2/sessions/unregister`):
    /// held for the grace unless `immediate` (seed 001's delivery service unregisters on
    /// every socket disconnect, page reloads included).
    pub async fn close_gateway(&self, user: &UserId, device: &str, immediate: bool) -> Result<bool, ApiError> {
        let leave = if immediate { Leave::Bye } else { Leave::Lost { last_heard: self.instances.now() } };
        self.close(user, device, None, leave).await
    }

    /// Ends a gateway instance's lease now (it shuts down cleanly) with the sessions
    /// bound to it held here: held for the grace unless `immediate`.
    pub async fn end_instance(&self, instance: &str, immediate: bool) -> Result<u64, ApiError> {
        let leave = if immediate { Leave::Bye } else { Leave::Lost { last_heard: self.instances.now() } };
        self.instances.end(instance, self.ending(leave)).await
    }

    /// [`Sessions::close_gateway`] for many sessions (a gateway's batch); `true` for each removed.
    pub async fn close_many(&self, items: &[(UserId, DeviceId, bool)]) -> Result<Vec<bool>, ApiError> {
        let results: Vec<Result<bool, ApiError>> = stream::iter(items.to_vec())
            .map(|(u, d, now)| async move { self.close_gateway(&u, &d, now).await })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The user's live sessions (a bound session shows its lease's deadline).
    pub async fn devices(&self, user: &UserId) -> Result<Vec<Session>, ApiError> {
        let mut list = self.store.devices(user).await?;
        for s in &mut list {
            if let Some(t) = self.lease_deadline(s) {
                s.expires_at = t;
            }
        }
        Ok(list)
    }
}
