//! Presence events on the wire: subjects and the JSON schema (documented in the README).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::{Event, EventKind, Millis, Presence, Status, UserId};
use crate::nats::kv::encode_id;

/// Subjects of presence events.
pub const EVENT_SUBJECTS: [&str; 4] = ["presence.update.>", "presence.expire.>", "presence.online.>", "presence.offline.>"];

pub fn subject(kind: EventKind, id: &UserId) -> String {
    let k = match kind {
        EventKind::PresenceUpdated => "update",
        EventKind::PresenceExpired => "expire",
        EventKind::UserOnline => "online",
        EventKind::UserOffline => "offline",
    };
    format!("presence.{k}.{}", encode_id(id.as_str()))
}

/// An event on the wire (documented in the README). Times are Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub status: Status,
    #[serde(default)]
    pub message: String,
    pub previous: Status,
    pub last_seen: Option<Millis>,
    pub updated_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub device_count: u32,
    pub node_id: String,
    pub at: Millis,
}

impl WireEvent {
    pub fn of(e: &Event) -> WireEvent {
        let p = &e.presence;
        WireEvent {
            kind: e.kind.as_str().into(),
            user_id: p.user_id.to_string(),
            status: p.status,
            message: p.message.to_string(),
            previous: e.previous,
            last_seen: p.last_seen,
            updated_at: p.updated_at,
            expires_at: p.expires_at,
            device_count: p.device_count,
            node_id: p.node_id.to_string(),
            at: e.at,
        }
    }

    pub fn into_event(self) -> Option<Event> {
        let kind = [EventKind::UserOnline, EventKind::UserOffline, EventKind::PresenceUpdated, EventKind::PresenceExpired]
            .into_iter()
            .find(|k| k.as_str() == self.kind)?;
        let presence = Presence {
            user_id: UserId::parse(&self.user_id, usize::MAX).ok()?,
            status: self.status,
            message: Arc::from(self.message),
            last_seen: self.last_seen,
            updated_at: self.updated_at,
            node_id: Arc::from(self.node_id),
            expires_at: self.expires_at,
            device_count: self.device_count,
        };
        Some(Event { kind, presence, previous: self.previous, at: self.at })
    }
}
