//! Typed presence events: one per visible transition, never for a no-op.

use super::model::{Millis, Presence, Status};

/// The transitions of seed 001 (`UserOnline`/`UserOffline`) and seed 003 (update, expire),
/// and erasure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The user's first live device session appeared.
    UserOnline,
    /// The user's last live device session ended (unregistered or expired).
    UserOffline,
    /// The visible status or message changed, or the set of live devices did.
    PresenceUpdated,
    /// An explicit status ran out of TTL and the derived status applies again.
    PresenceExpired,
    /// Everything held about the user was erased (`DELETE /api/v2/users/{id}`): downstream
    /// services forget them too. The presence after it is an unknown user's.
    UserErased,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UserOnline => "user_online",
            EventKind::UserOffline => "user_offline",
            EventKind::PresenceUpdated => "presence_updated",
            EventKind::PresenceExpired => "presence_expired",
            EventKind::UserErased => "user_erased",
        }
    }
}

/// A transition, with the presence before and after it.
///
/// Both sides travel with the event so that every receiver can apply the privacy rule
/// "a viewer is told only when what *they* may see changed": it projects `before` and
/// `presence` for the viewer and stays silent when the two look the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The presence after the transition, as seen by a reader with full visibility.
    pub presence: Presence,
    /// The presence before it (as last published), with full visibility.
    pub before: Presence,
    pub at: Millis,
}

impl Event {
    /// Visible status before the transition.
    pub fn previous(&self) -> Status {
        self.before.status
    }
}
