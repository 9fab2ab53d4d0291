//! Presence vocabulary: statuses, identifiers, timestamps and the presence view.
//!
//! Everything here is plain data. Times are Unix milliseconds ([`Millis`]) so that
//! the rules can be evaluated at any `now` a caller (or a test) chooses.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

/// Wall-clock time in milliseconds since the Unix epoch.
pub type Millis = i64;

/// The four statuses of seed 003 §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Away,
    Busy,
    Offline,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Online, Status::Away, Status::Busy, Status::Offline];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Offline => "offline",
        }
    }

    /// Parses the wire name; `None` for anything else (callers turn that into a 400).
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated user id: 1..=`max_len` bytes of `[A-Za-z0-9._@:+-]`.
///
/// The charset covers UUIDs, numeric ids, e-mail-like ids and `tenant:user` ids, and every
/// such id has a reversible encoding into a NATS KV key. Cheap to clone (an `Arc<str>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

/// Hash and equality are the `str`'s (derived through `Arc<str>`), so sets of ids can be
/// asked about a borrowed `&str` without allocating an id.
impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Why an id was refused. The message is shown to API clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} contains an invalid character {ch:?} (allowed: letters, digits and . _ @ : + -)")]
    BadChar { what: &'static str, ch: char },
}

/// Validates an identifier (user, device, instance, conversation) against the common charset.
pub fn validate_id(what: &'static str, s: &str, max_len: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max_len {
        return Err(IdError::TooLong { what, max: max_len });
    }
    if let Some(ch) = s.chars().find(|c| !is_id_char(*c)) {
        return Err(IdError::BadChar { what, ch });
    }
    Ok(())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | ':' | '+' | '-')
}

impl UserId {
    pub fn parse(s: &str, max_len: usize) -> Result<UserId, IdError> {
        validate_id("user id", s, max_len)?;
        Ok(UserId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// The empty message, shared so that reads of users without one allocate nothing.
pub fn empty_message() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

/// A device id, validated like a user id.
pub type DeviceId = Arc<str>;

/// The kind of client a device session comes from, as the client declares it on connect
/// (`?platform=` / `X-Device-Platform`), so readers can say "on phone and laptop"
/// (Discord's `client_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Desktop,
    Mobile,
    Web,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Desktop, Platform::Mobile, Platform::Web];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Desktop => "desktop",
            Platform::Mobile => "mobile",
            Platform::Web => "web",
        }
    }

    /// Parses the wire name; `None` for anything else (callers turn that into a 400).
    pub fn parse(s: &str) -> Option<Platform> {
        Platform::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// One live device of a user, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub device_id: DeviceId,
    pub platform: Option<Platform>,
    /// Whether the user is active on the device (not idle, the app not in the background).
    pub active: bool,
    /// Since when the user has not been active on it; `None` while they are, or when the
    /// viewer may not see the user's times.
    pub idle_since: Option<Millis>,
}

impl DeviceSummary {
    /// An active device.
    pub fn new(device_id: DeviceId, platform: Option<Platform>) -> DeviceSummary {
        DeviceSummary { device_id, platform, active: true, idle_since: None }
    }
}

/// The empty device list, shared so that views of users without devices allocate nothing.
pub fn no_devices() -> Arc<[DeviceSummary]> {
    static EMPTY: std::sync::OnceLock<Arc<[DeviceSummary]>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(Vec::new())).clone()
}

/// What a reader sees of one user: the shape of seed 003 §3.2, plus `device_count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user_id: UserId,
    pub status: Status,
    /// Custom message of the explicit status; empty when none.
    pub message: Arc<str>,
    /// Last activity (connect, heartbeat, disconnect, status write); `None` for a user never seen.
    pub last_seen: Option<Millis>,
    /// When the visible presence last changed; `None` for a user never seen.
    pub updated_at: Option<Millis>,
    /// Node that made the last change.
    pub node_id: Arc<str>,
    /// When the explicit status reverts to the derived one, if it has a TTL.
    pub expires_at: Option<Millis>,
    /// Live device sessions.
    pub device_count: u32,
    /// The live devices, ordered by device id.
    pub devices: Arc<[DeviceSummary]>,
    /// The status is an automatic `away` (no explicit status, every live device idle for
    /// `presence.auto_away_after`): since when the last of them went idle.
    pub idle_since: Option<Millis>,
    /// An explicit `offline` ("appear offline") is in force: everyone but the user sees
    /// them as a hidden user (see [`crate::core::privacy::project`]).
    pub appear_offline: bool,
    /// Revision of the stored state this view was taken from: increases with every
    /// visible change of the user (per store); `0` when unknown. Lets receivers drop
    /// events older than what they already have.
    pub revision: u64,
}

impl Presence {
    /// The answer for a user the service has never seen (seed 003 §12.2: default `offline`).
    pub fn unknown(user_id: UserId, node_id: Arc<str>) -> Presence {
        Presence {
            user_id,
            status: Status::Offline,
            message: empty_message(),
            last_seen: None,
            updated_at: None,
            node_id,
            expires_at: None,
            device_count: 0,
            devices: no_devices(),
            idle_since: None,
            appear_offline: false,
            revision: 0,
        }
    }

    /// Whether `self` and `other` show the same state: status, message, expiry, devices,
    /// hiding (times, node and revision aside).
    pub fn same_state(&self, other: &Presence) -> bool {
        self.user_id == other.user_id
            && self.status == other.status
            && self.message == other.message
            && self.expires_at == other.expires_at
            && self.device_count == other.device_count
            && self.devices == other.devices
            && self.idle_since == other.idle_since
            && self.appear_offline == other.appear_offline
    }

    /// Whether `self` and `other` show a reader the same thing (the revision aside).
    pub fn same_view(&self, other: &Presence) -> bool {
        self.user_id == other.user_id
            && self.status == other.status
            && self.message == other.message
            && self.last_seen == other.last_seen
            && self.updated_at == other.updated_at
            && self.node_id == other.node_id
            && self.expires_at == other.expires_at
            && self.device_count == other.device_count
            && self.devices == other.devices
            && self.idle_since == other.idle_since
            && self.appear_offline == other.appear_offline
    }
}

impl Session {
    /// Takes what the device says of its user's activity (see
    /// [`super::session::Activity`]). A device already idle keeps the moment it went idle.
    pub fn say(&mut self, activity: super::session::Activity, now: Millis) {
        use super::session::Activity;
        match activity {
            Activity::Active => (self.idle_since, self.away_at) = (None, None),
            Activity::Idle { .. } if self.idle_since.is_some() => {}
            Activity::Idle { since, away_after_ms } => {
                let since = since.min(now);
                self.idle_since = Some(since.max(self.connected_at.min(now)));
                self.away_at = (away_after_ms > 0).then(|| since.saturating_add(away_after_ms));
            }
        }
    }
}

/// One device session of a user (seed 001 `DeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub device_id: DeviceId,
    /// The instance (gateway / node) that owns the connection.
    pub instance_id: Arc<str>,
    pub connected_at: Millis,
    pub last_heartbeat: Millis,
    pub expires_at: Millis,
    /// The TTL the session was registered with, reused by refreshes.
    pub ttl_ms: i64,
    /// The presenced node that registered the session (cluster mode groups by it).
    #[serde(default)]
    pub node_id: Arc<str>,
    /// What kind of client the device is, when it said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Tag of this registration (random): ending a session "as registered by this
    /// connection" leaves a newer registration of the same device alone.
    #[serde(default)]
    pub sid: u64,
    /// The device's connection is gone and the session is held for the offline grace
    /// (`presence.offline_grace`): still shown, until `expires_at` (or, held by a node's
    /// lease, the deadline in that node's memory); a heartbeat does not extend it, and a
    /// registration of the same device continues it without any event.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lingering: bool,
    /// Since when the user has not been active on the device; `None` while they are (a
    /// new session starts active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<Millis>,
    /// When the device's idleness makes the user automatically `away` (`idle_since` plus
    /// `presence.auto_away_after` as it was when the device went idle); `None` while
    /// active, or with automatic away off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub away_at: Option<Millis>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_its_wire_name() {
        for st in Status::ALL {
            assert_eq!(Status::parse(st.as_str()), Some(st));
        }
        assert_eq!(Status::parse("Online"), None);
        assert_eq!(Status::parse("invisible"), None);
    }

    #[test]
    fn user_ids_are_validated() {
        assert!(UserId::parse("alice", 128).is_ok());
        assert!(UserId::parse("550e8400-e29b-41d4-a716-446655440000", 128).is_ok());
        assert!(UserId::parse("tenant:bob@example.com", 128).is_ok());
        assert_eq!(UserId::parse("", 128), Err(IdError::Empty { what: "user id" }));
        assert!(matches!(UserId::parse("a b", 128), Err(IdError::BadChar { ch: ' ', .. })));
        assert!(matches!(UserId::parse("a/b", 128), Err(IdError::BadChar { .. })));
        assert!(matches!(UserId::parse("é", 128), Err(IdError::BadChar { .. })));
        assert!(matches!(UserId::parse(&"x".repeat(129), 128), Err(IdError::TooLong { .. })));
    }
}
