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
        let mut st = s.serialize_struct("Presence", 10)?;
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
        st.serialize_field("device_count", &p.device_count)?;
        st.serialize_field("devices", &Devices(&p.devices))?;
        st.end()
    }
}

/// The live devices: `[{"device_id": "phone", "platform": "mobile"}, ...]` (`platform`
/// only when the client declared one).
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
        let mut st = s.serialize_struct("Device", 2)?;
        st.serialize_field("device_id", &*self.0.device_id)?;
        match self.0.platform {
            Some(p) => st.serialize_field("platform", p.as_str())?,
            None => st.skip_field("platform")?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_705_314_600_000), "2024-01-15T10:30:00Z");
        assert_eq!(rfc3339(1_705_314_600_123), "2024-01-15T10:30:00.123Z");
        let parsed = time::OffsetDateTime::parse(&rfc3339(1_705_314_600_123), &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(parsed.unix_timestamp_nanos(), 1_705_314_600_123_000_000);
    }
}
