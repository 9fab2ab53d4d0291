//! The presence as JSON, shared by the HTTP and WebSocket transports (seed 003 §3.2 with
//! RFC 3339 times, plus `ttl`/`expires_at`, `device_count` and `devices`), so that a push
//! and a read of the same state are the same bytes.

use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::core::{DeviceSummary, Millis, Presence};

/// RFC 3339 in UTC with millisecond precision, e.g. `2024-01-15T10:30:00.123Z`
/// (`.123` omitted when zero).
pub fn rfc3339(ms: Millis) -> String {
    let mut buf = [0u8; 24];
    let n = write_rfc3339(ms, &mut buf);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Parses an RFC 3339 time (any offset) into Unix milliseconds; `None` when it is not one.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Millis::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats into a stack buffer; returns the length. Years outside 0..=9999 are clamped.
fn write_rfc3339(ms: Millis, out: &mut [u8; 24]) -> usize {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000) as u32;
    let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = t.year().clamp(0, 9999) as u32;
    let fields = [
        (year / 100, 0),
        (year % 100, 2),
        (u32::from(u8::from(t.month())), 5),
        (u32::from(t.day()), 8),
        (u32::from(t.hour()), 11),
        (u32::from(t.minute()), 14),
        (u32::from(t.second()), 17),
    ];
    *out = *b"0000-00-00T00:00:00.000Z";
    for (v, at) in fields {
        out[at] = b'0' + (v / 10) as u8;
        out[at + 1] = b'0' + (v % 10) as u8;
    }
    if millis == 0 {
        out[19] = b'Z';
        20
    } else {
        out[20] = b'0' + (millis / 100) as u8;
        out[21] = b'0' + (millis / 10 % 10) as u8;
        out[22] = b'0' + (millis % 10) as u8;
        24
    }
}

/// Serializes a time as an RFC 3339 string without allocating.
struct Time(Millis);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 24];
        let n = write_rfc3339(self.0, &mut buf);
        s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or("1970-01-01T00:00:00Z"))
    }
}

/// A presence as JSON: seed 003 §3.2 fields, plus `expires_at`/`ttl` (remaining seconds of
/// an explicit status), `device_count` and `devices`.
pub struct PresenceJson<'a> {
    pub p: &'a Presence,
    pub now: Millis,
}

impl Serialize for PresenceJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.p;
        let mut st = s.serialize_struct("Presence", 11)?;
        st.serialize_field("user_id", p.user_id.as_str())?;
        st.serialize_field("status", p.status.as_str())?;
        if !p.message.is_empty() {
            st.serialize_field("message", &*p.message)?;
        } else {
            st.skip_field("message")?;
        }
        st.serialize_field("last_seen", &p.last_seen.map(Time))?;
        st.serialize_field("updated_at", &p.updated_at.map(Time))?;
        st.serialize_field("node_id", &*p.node_id)?;
        match p.expires_at {
            Some(t) => {
                st.serialize_field("ttl", &((t - self.now).max(0) + 999).div_euclid(1000))?;
                st.serialize_field("expires_at", &Time(t))?;
            }
            None => {
                st.skip_field("ttl")?;
                st.skip_field("expires_at")?;
            }
        }
        match p.idle_since {
            Some(t) => st.serialize_field("idle_since", &Time(t))?,
            None => st.skip_field("idle_since")?,
        }
        st.serialize_field("device_count", &p.device_count)?;
        st.serialize_field("devices", &Devices(&p.devices))?;
        st.end()
    }
}

/// The live devices: `[{"device_id": "phone", "platform": "mobile", "active": true}, ...]`
/// (`platform` only when the client declared one; `idle_since` only while idle).
struct Devices<'a>(&'a [DeviceSummary]);

impl Serialize for Devices<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for d in self.0 {
            seq.serialize_element(&Device(d))?;
        }
        seq.end()
    }
}

struct Device<'a>(&'a DeviceSummary);

impl Serialize for Device<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Device", 4)?;
        st.serialize_field("device_id", &*self.0.device_id)?;
        match self.0.platform {
            Some(p) => st.serialize_field("platform", p.as_str())?,
            None => st.skip_field("platform")?,
        }
        st.serialize_field("active", &self.0.active)?;
        match self.0.idle_since {
            Some(t) => st.serialize_field("idle_since", &Time(t))?,
            None => st.skip_field("idle_since")?,
        }
        st.end()
    }
}

/// `data` of a presence answer: a map from user id to presence, in request order.
pub struct PresenceMap<'a> {
    pub items: &'a [Presence],
    pub now: Millis,
}

impl Serialize for PresenceMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.items.len()))?;
        for p in self.items {
            m.serialize_entry(p.user_id.as_str(), &PresenceJson { p, now: self.now })?;
        }
        m.end()
    }
}

// The OpenAPI schema of [`PresenceJson`] (which serializes by hand, without allocating);
// a test checks that a fully populated presence has exactly these fields.
/// What a viewer sees of one user.
#[derive(utoipa::ToSchema)]
#[schema(as = Presence)]
#[allow(dead_code)]
pub struct PresenceDoc {
    user_id: String,
    /// What others see: a hidden or appearing-offline user reads `offline`.
    #[schema(schema_with = status_schema)]
    status: String,
    /// The custom status message (absent when empty).
    message: Option<String>,
    /// When the user was last online; `null` while online, or when hidden from the viewer.
    #[schema(required, format = DateTime)]
    last_seen: Option<String>,
    /// When the presence last changed.
    #[schema(required, format = DateTime)]
    updated_at: Option<String>,
    /// The node that answered (or holds the user); empty when hidden.
    node_id: String,
    /// Remaining seconds of an explicit status with a TTL.
    ttl: Option<i64>,
    /// When an explicit status with a TTL lapses.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    /// With an automatic `away` (every live device idle for `presence.auto_away_after`):
    /// since when the last device went idle. Absent otherwise, and when the viewer may
    /// not see the user's `last_seen`.
    #[schema(format = DateTime)]
    idle_since: Option<String>,
    device_count: u32,
    devices: Vec<DeviceDoc>,
}

/// One live device of a user.
#[derive(utoipa::ToSchema)]
#[schema(as = Device)]
#[allow(dead_code)]
pub struct DeviceDoc {
    device_id: String,
    /// `desktop`, `mobile` or `web`, when the client declared one.
    #[schema(schema_with = platform_schema)]
    platform: Option<String>,
    /// Whether the user is active on the device (its client says when they are not).
    active: bool,
    /// Since when the user is not active on it (absent while active, and when the viewer
    /// may not see the user's `last_seen`).
    #[schema(format = DateTime)]
    idle_since: Option<String>,
}

/// A string schema allowing `values` (and `null` when `nullable`).
pub fn enum_schema(values: impl IntoIterator<Item = &'static str>, nullable: bool) -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    let mut values: Vec<serde_json::Value> = values.into_iter().map(serde_json::Value::from).collect();
    let ty = if nullable {
        values.push(serde_json::Value::Null);
        SchemaType::from_iter([Type::String, Type::Null])
    } else {
        SchemaType::Type(Type::String)
    };
    utoipa::openapi::ObjectBuilder::new().schema_type(ty).enum_values(Some(values)).build()
}

/// `online`, `away`, `busy`, `offline`.
pub fn status_schema() -> utoipa::openapi::Object {
    enum_schema(crate::core::Status::ALL.map(crate::core::Status::as_str), false)
}

/// `desktop`, `mobile`, `web`.
pub fn platform_schema() -> utoipa::openapi::Object {
    enum_schema(crate::core::Platform::ALL.map(crate::core::Platform::as_str), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of the documented schema are the fields a fully populated presence has.
    #[test]
    fn presence_schema_matches_the_serializer() {
        use std::sync::Arc;
        use utoipa::PartialSchema;
        let p = Presence {
            devices: Arc::from(vec![DeviceSummary {
                device_id: Arc::from("phone"),
                platform: Some(crate::core::Platform::Mobile),
                active: false,
                idle_since: Some(3),
            }]),
            idle_since: Some(3),
            message: Arc::from("lunch"),
            expires_at: Some(10_000),
            last_seen: Some(1),
            updated_at: Some(2),
            ..Presence::unknown(crate::core::UserId::parse("alice", 64).unwrap(), Arc::from("n1"))
        };
        let v = serde_json::to_value(PresenceJson { p: &p, now: 0 }).unwrap();
        let schema = serde_json::to_value(PresenceDoc::schema()).unwrap();
        let keys = |o: &serde_json::Value| {
            let mut k: Vec<String> = o.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), keys(&schema["properties"]));
        let device = serde_json::to_value(DeviceDoc::schema()).unwrap();
        assert_eq!(keys(&v["devices"][0]), keys(&device["properties"]));
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_705_314_600_000), "2024-01-15T10:30:00Z");
        assert_eq!(rfc3339(1_705_314_600_123), "2024-01-15T10:30:00.123Z");
        let parsed = time::OffsetDateTime::parse(&rfc3339(1_705_314_600_123), &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(parsed.unix_timestamp_nanos(), 1_705_314_600_123_000_000);
    }
}
