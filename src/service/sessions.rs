//! Device sessions for every transport (WebSocket connections, gRPC gateways, HTTP-only
//! clients): open, heartbeat, close, list. The device limit is enforced by the store in
//! the same step that adds a session; each registration gets a random tag, so that only
//! the connection that opened a session can end it by its tag.

use std::sync::Arc;

use crate::core::{Millis, NewSession, Platform, Registered, Session, UserId};
use crate::error::ApiError;
use crate::store::Store;

pub struct Sessions {
    store: Arc<dyn Store>,
    /// `limits.max_devices_per_user`.
    max_devices: usize,
    /// `presence.session_ttl`.
    ttl_ms: i64,
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, max_devices: usize, ttl_ms: i64) -> Sessions {
        Sessions { store, max_devices, ttl_ms }
    }

    /// Opens (or replaces) the session of `device`, alive for `ttl_ms` (default
    /// `presence.session_ttl`) unless refreshed; 429 `limit_exceeded` over the device limit.
    pub async fn open(
        &self,
        user: &UserId,
        device: &str,
        instance: &str,
        ttl_ms: Option<i64>,
        platform: Option<Platform>,
    ) -> Result<Registered, ApiError> {
        let req = NewSession::new(device, instance, ttl_ms.unwrap_or(self.ttl_ms))
            .platform(platform)
            .sid(rand::random())
            .max_devices(self.max_devices);
        Ok(self.store.register_session(user, req).await?)
    }

    /// Extends a live session; `None` when there is none (open it again).
    pub async fn refresh(&self, user: &UserId, device: &str) -> Result<Option<Millis>, ApiError> {
        Ok(self.store.refresh_session(user, device).await?)
    }

    /// A heartbeat that opens the session when there is none (HTTP-only clients, and a
    /// WebSocket whose session lapsed). Returns the new expiry and, when it opened one,
    /// the registration.
    pub async fn heartbeat_or_open(
        &self,
        user: &UserId,
        device: &str,
        instance: &str,
        platform: Option<Platform>,
    ) -> Result<(Millis, Option<Registered>), ApiError> {
        match self.refresh(user, device).await? {
            Some(t) => Ok((t, None)),
            None => {
                let reg = self.open(user, device, instance, None, platform).await?;
                Ok((reg.expires_at, Some(reg)))
            }
        }
    }

    /// Ends the session of `device` (only the registration tagged `sid`, when given).
    pub async fn close(&self, user: &UserId, device: &str, sid: Option<u64>) -> Result<bool, ApiError> {
        Ok(self.store.unregister_session(user, device, sid).await?)
    }

    /// The user's live sessions.
    pub async fn devices(&self, user: &UserId) -> Result<Vec<Session>, ApiError> {
        Ok(self.store.devices(user).await?)
    }
}
