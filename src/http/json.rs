//! Wire encoding shared by the HTTP and WebSocket transports: the seed 003 envelope
//! `{"success","data","error"}` and the presence object with RFC 3339 times.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use crate::core::{Millis, Presence};
use crate::service::ApiError;

/// RFC 3339 in UTC with millisecond precision, e.g. `2024-01-15T10:30:00.123Z`.
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => {
            let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
            let (h, mi, s) = (t.hour(), t.minute(), t.second());
            if millis == 0 {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
            } else {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{millis:03}Z")
            }
        }
        Err(_) => "1970-01-01T00:00:00Z".into(),
    }
}

/// A presence as JSON: seed 003 §3.2 fields, plus `expires_at`/`ttl` (remaining seconds of
/// an explicit status) and `device_count`.
pub struct PresenceJson<'a> {
    pub p: &'a Presence,
    pub now: Millis,
}

impl Serialize for PresenceJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.p;
        let mut st = s.serialize_struct("Presence", 9)?;
        st.serialize_field("user_id", p.user_id.as_str())?;
        st.serialize_field("status", p.status.as_str())?;
        if !p.message.is_empty() {
            st.serialize_field("message", &*p.message)?;
        } else {
            st.skip_field("message")?;
        }
        st.serialize_field("last_seen", &p.last_seen.map(rfc3339))?;
        st.serialize_field("updated_at", &p.updated_at.map(rfc3339))?;
        st.serialize_field("node_id", &*p.node_id)?;
        match p.expires_at {
            Some(t) => {
                st.serialize_field("ttl", &((t - self.now).max(0) + 999).div_euclid(1000))?;
                st.serialize_field("expires_at", &rfc3339(t))?;
            }
            None => {
                st.skip_field("ttl")?;
                st.skip_field("expires_at")?;
            }
        }
        st.serialize_field("device_count", &p.device_count)?;
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

/// `{"success": true, "data": ...}`
#[derive(Serialize)]
pub struct Ok<T: Serialize> {
    pub success: bool,
    pub data: T,
}

pub fn ok_body<T: Serialize>(data: T) -> Vec<u8> {
    serde_json::to_vec(&Ok {
        success: true,
        data,
    })
    .unwrap_or_else(|_| br#"{"success":false,"error":"internal error","code":"internal"}"#.to_vec())
}

/// `{"success": false, "error": "...", "code": "..."}`
pub fn error_body(e: &ApiError) -> Vec<u8> {
    #[derive(Serialize)]
    struct Err<'a> {
        success: bool,
        error: String,
        code: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    let retry_after_ms = match e {
        ApiError::RateLimited { retry_after_ms } => Some(*retry_after_ms),
        _ => None,
    };
    serde_json::to_vec(&Err {
        success: false,
        error: e.to_string(),
        code: e.code(),
        retry_after_ms,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_705_314_600_000), "2024-01-15T10:30:00Z");
        assert_eq!(rfc3339(1_705_314_600_123), "2024-01-15T10:30:00.123Z");
        let parsed = time::OffsetDateTime::parse(
            &rfc3339(1_705_314_600_123),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert_eq!(parsed.unix_timestamp_nanos(), 1_705_314_600_123_000_000);
    }
}
