//! What a session transition of [`super::state::UserState`] takes and answers: the
//! session to open, the registration made, the device limit that refused one, how a
//! session ends (at once, or held for the offline grace), and a device's activity.

use std::sync::Arc;

use super::model::{DeviceId, Millis, Platform};

/// A device session to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub device: DeviceId,
    pub instance: Arc<str>,
    pub ttl_ms: i64,
    pub platform: Option<Platform>,
    /// Tag of this registration (see [`super::model::Session::sid`]).
    pub sid: u64,
    /// A new device is refused when the user already has this many live sessions.
    pub max_devices: usize,
    /// What the device says of its user's activity as it registers. `None`: a new session
    /// starts active, and one that continues (the same device again) keeps its own.
    pub activity: Option<Activity>,
}

impl NewSession {
    /// A session of `device` on `instance` for `ttl_ms`: no platform, tag `0`, no device
    /// limit (set those with the builder methods).
    pub fn new(device: &str, instance: &str, ttl_ms: i64) -> NewSession {
        NewSession {
            device: Arc::from(device),
            instance: Arc::from(instance),
            ttl_ms,
            platform: None,
            sid: 0,
            max_devices: usize::MAX,
            activity: None,
        }
    }

    /// As [`NewSession::new`] with ids the caller already holds: sessions of one instance
    /// (a node, a gateway) share its id instead of a copy each.
    pub fn shared(device: DeviceId, instance: Arc<str>, ttl_ms: i64) -> NewSession {
        NewSession { device, instance, ttl_ms, platform: None, sid: 0, max_devices: usize::MAX, activity: None }
    }

    pub fn platform(mut self, p: Option<Platform>) -> NewSession {
        self.platform = p;
        self
    }

    pub fn sid(mut self, sid: u64) -> NewSession {
        self.sid = sid;
        self
    }

    pub fn max_devices(mut self, max: usize) -> NewSession {
        self.max_devices = max;
        self
    }

    pub fn activity(mut self, a: Option<Activity>) -> NewSession {
        self.activity = a;
        self
    }
}

/// Result of registering a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// `false` when the device already had a session (which was replaced).
    pub created: bool,
    pub expires_at: Millis,
    /// Tag of the registration, to end exactly this one later.
    pub sid: u64,
}

/// A registration refused because the user is at `max` live devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimit {
    pub max: usize,
}

/// How a device session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A deliberate sign-out (WebSocket `bye`, an unregistration that says "now"): the
    /// session ends at once, `last_seen` now.
    Now,
    /// The device went away without saying so (a lost or closed socket, a gateway's
    /// plain unregistration, a drained or lost node): the session is held, still shown,
    /// until `until`; a registration of the same device before then continues it with no
    /// event. At `until` it ends with `last_seen` = `last_heard`.
    Held { until: Millis, last_heard: Millis },
}

impl Ending {
    /// A device last heard at `last_heard`, held for `grace_ms` from then (never ending
    /// before `now`). The grace counts from the moment the device was last heard of: a
    /// closed socket is heard at its close; a silent device's `session_ttl` has already
    /// waited longer than the grace, so its session ends when the TTL passes.
    pub fn lost(last_heard: Millis, grace_ms: i64, now: Millis) -> Ending {
        let last_heard = last_heard.min(now);
        Ending::Held { until: last_heard.saturating_add(grace_ms.max(0)).max(now), last_heard }
    }
}

/// Whether the user is active on a device, as its client says (see
/// [`super::state::UserState::set_activity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Input again (or never idle): a new session starts so.
    Active,
    /// Idle, or the app went to the background, since `since` (shown clamped to the
    /// session's start and to now; [`Millis::MIN`]: since before the session began, when
    /// unknown). The user becomes automatically `away` once every live device has been
    /// idle for `away_after_ms` (`0`: never), counted from `since` itself: a device that
    /// was idle before it connected does not hold the away off.
    Idle { since: Millis, away_after_ms: i64 },
}
