//! Typed presence events: one per visible transition, never for a no-op.

use super::model::{Millis, Presence, Status};

/// The transitions of seed 001 (`UserOnline`/`UserOffline`) and seed 003 (update, expire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The user's first live device session appeared.
    UserOnline,
    /// The user's last live device session ended (unregistered or expired).
    UserOffline,
    /// The visible status, message or status expiry changed.
    PresenceUpdated,
    /// An explicit status ran out of TTL and the derived status applies again.
    PresenceExpired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UserOnline => "user_online",
            EventKind::UserOffline => "user_offline",
            EventKind::PresenceUpdated => "presence_updated",
            EventKind::PresenceExpired => "presence_expired",
        }
    }
}

/// A transition and the presence after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The presence after the transition, as seen by a reader with full visibility.
    pub presence: Presence,
    /// Visible status before the transition.
    pub previous: Status,
    pub at: Millis,
}
