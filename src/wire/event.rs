//! Presence events on the wire: the JSON schema every backend carries (documented in the
//! README).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::{DeviceSummary, Event, EventKind, Millis, Platform, Presence, Status, UserId};

/// A live device on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireDevice {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Absent (older nodes): active.
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Millis>,
}

fn yes() -> bool {
    true
}

/// A user's presence as an event carries it (full visibility: events are for backends;
/// every node applies privacy for its own watchers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WirePresence {
    pub status: Status,
    #[serde(default)]
    pub message: String,
    pub last_seen: Option<Millis>,
    pub updated_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub device_count: u32,
    #[serde(default)]
    pub devices: Vec<WireDevice>,
    /// With an automatic away: since when the last device went idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Millis>,
    #[serde(default)]
    pub appear_offline: bool,
    pub node_id: String,
    /// Store revision of the state (events of one user are ordered by it).
    #[serde(default)]
    pub revision: u64,
}

impl WirePresence {
    fn of(p: &Presence) -> WirePresence {
        WirePresence {
            status: p.status,
            message: p.message.to_string(),
            last_seen: p.last_seen,
            updated_at: p.updated_at,
            expires_at: p.expires_at,
            device_count: p.device_count,
            devices: p
                .devices
                .iter()
                .map(|d| WireDevice {
                    device_id: d.device_id.to_string(),
                    platform: d.platform,
                    active: d.active,
                    idle_since: d.idle_since,
                })
                .collect(),
            idle_since: p.idle_since,
            appear_offline: p.appear_offline,
            node_id: p.node_id.to_string(),
            revision: p.revision,
        }
    }

    fn into_presence(self, user_id: UserId) -> Presence {
        let devices: Vec<DeviceSummary> = self
            .devices
            .into_iter()
            .map(|d| DeviceSummary { device_id: Arc::from(d.device_id), platform: d.platform, active: d.active, idle_since: d.idle_since })
            .collect();
        Presence {
            user_id,
            status: self.status,
            message: Arc::from(self.message),
            last_seen: self.last_seen,
            updated_at: self.updated_at,
            node_id: Arc::from(self.node_id),
            expires_at: self.expires_at,
            device_count: self.device_count,
            devices: Arc::from(devices),
            idle_since: self.idle_since,
            appear_offline: self.appear_offline,
            revision: self.revision,
        }
    }
}

/// An event on the wire (documented in the README). Times are Unix milliseconds. The
/// presence after the transition is flattened at the top level (the schema consumers
/// already read); `before` is the presence before it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    #[serde(flatten)]
    pub presence: WirePresence,
    pub previous: Status,
    pub at: Millis,
    pub before: Option<WirePresence>,
}

impl WireEvent {
    pub fn of(e: &Event) -> WireEvent {
        // An erasure carries nothing of the user but their id: no `before`, and only the
        // visible status it ended (other nodes tell their watchers with it).
        let before = (e.kind != EventKind::UserErased).then(|| WirePresence::of(&e.before));
        WireEvent {
            kind: e.kind.as_str().into(),
            user_id: e.presence.user_id.to_string(),
            presence: WirePresence::of(&e.presence),
            previous: e.previous(),
            at: e.at,
            before,
        }
    }

    pub fn into_event(self) -> Option<Event> {
        let kind =
            [EventKind::UserOnline, EventKind::UserOffline, EventKind::PresenceUpdated, EventKind::PresenceExpired, EventKind::UserErased]
                .into_iter()
                .find(|k| k.as_str() == self.kind)?;
        let user_id = UserId::parse(&self.user_id, usize::MAX).ok()?;
        let presence = self.presence.into_presence(user_id.clone());
        let before = match self.before {
            Some(b) => b.into_presence(user_id),
            // An event without `before` (an older node): only the status is known.
            None => Presence { status: self.previous, ..Presence::unknown(user_id, presence.node_id.clone()) },
        };
        Some(Event { kind, presence, before, at: self.at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_both_sides_and_the_revision() {
        let id = UserId::parse("tenant:bob", 64).unwrap();
        let mut after = Presence::unknown(id.clone(), Arc::from("n1"));
        after.status = Status::Online;
        after.device_count = 1;
        after.devices = Arc::from(vec![DeviceSummary::new(Arc::from("phone"), Some(Platform::Mobile))]);
        after.revision = 42;
        let before = Presence { revision: 41, ..Presence::unknown(id, Arc::from("n1")) };
        let ev = Event { kind: EventKind::UserOnline, presence: after, before, at: 7 };
        let json = serde_json::to_value(WireEvent::of(&ev)).unwrap();
        assert_eq!(json["type"], "user_online");
        assert_eq!(json["status"], "online");
        assert_eq!(json["previous"], "offline");
        assert_eq!(json["revision"], 42);
        assert_eq!(json["devices"][0]["platform"], "mobile");
        assert_eq!(json["before"]["revision"], 41);
        let back: WireEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back.into_event(), Some(ev));
    }
}
