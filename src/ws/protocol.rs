//! The WebSocket message protocol (seed 004): JSON text frames `{"type", "payload", "id"?}`.
//! Parsing and encoding only; no sockets.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::core::{Millis, Platform, Presence};
use crate::error::ApiError;
use crate::wire::json::PresenceJson;

/// A message from a client, validated for shape (values are validated by the service).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    /// `{"online_status": "away", "custom_status": "In a meeting", "ttl"?: seconds}`
    PresenceUpdate {
        online_status: Option<String>,
        custom_status: Option<String>,
        ttl: Option<i64>,
    },
    Heartbeat,
    Typing {
        conversation_id: String,
        is_typing: bool,
    },
    /// Users, conversations (issue 27), or both.
    Subscribe {
        user_ids: Vec<String>,
        conversation_ids: Vec<String>,
    },
    Unsubscribe {
        user_ids: Vec<String>,
        conversation_ids: Vec<String>,
    },
    /// A deliberate sign-out: the session ends now (no offline grace), the server acks
    /// and closes with 1000.
    Bye,
    /// `{"active": false, "idle_since"?: RFC 3339}`: whether the user is active on this
    /// device (idle, or the app in the background; input again).
    Activity {
        active: bool,
        idle_since: Option<Millis>,
    },
}

/// Why a frame could not be understood; sent back as an `error` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    pub code: &'static str,
    pub message: String,
}

/// A parsed frame: the client's correlation `id` (echoed in `ack`/`error`), its `type`,
/// and the message or the reason it was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub id: Option<Value>,
    pub kind: String,
    pub msg: Result<ClientMsg, ProtoError>,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresencePayload {
    online_status: Option<String>,
    custom_status: Option<String>,
    ttl: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypingPayload {
    conversation_id: Option<String>,
    is_typing: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivityPayload {
    active: Option<bool>,
    idle_since: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersPayload {
    user_ids: Option<Vec<String>>,
    conversation_ids: Option<Vec<String>>,
}

fn bad(message: impl Into<String>) -> ProtoError {
    ProtoError { code: "bad_request", message: message.into() }
}

fn payload<T: for<'de> Deserialize<'de>>(kind: &str, v: Option<Value>) -> Result<T, ProtoError> {
    let v = match v {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v) => v,
    };
    serde_json::from_value(v).map_err(|e| bad(format!("invalid {kind} payload: {e}")))
}

/// Parses one text frame.
pub fn parse(text: &str) -> ClientFrame {
    let frame: Frame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            return ClientFrame {
                id: None,
                kind: String::new(),
                msg: Err(ProtoError { code: "malformed", message: format!("malformed JSON message: {e}") }),
            }
        }
    };
    let id = frame.id.filter(|v| v.is_string() || v.is_number());
    let Some(kind) = frame.kind else {
        return ClientFrame {
            id,
            kind: String::new(),
            msg: Err(ProtoError { code: "malformed", message: "message has no \"type\"".into() }),
        };
    };
    let msg = match kind.as_str() {
        "presence_update" => payload::<PresencePayload>(&kind, frame.payload).map(|p| ClientMsg::PresenceUpdate {
            online_status: p.online_status,
            custom_status: p.custom_status,
            ttl: p.ttl,
        }),
        "heartbeat" => Ok(ClientMsg::Heartbeat),
        "bye" => Ok(ClientMsg::Bye),
        "typing" => payload::<TypingPayload>(&kind, frame.payload).and_then(|p| match (p.conversation_id, p.is_typing) {
            (Some(c), Some(t)) => Ok(ClientMsg::Typing { conversation_id: c, is_typing: t }),
            _ => Err(bad("typing needs conversation_id and is_typing")),
        }),
        "activity" => payload::<ActivityPayload>(&kind, frame.payload).and_then(|p| {
            let active = p.active.ok_or_else(|| bad("activity needs active (true or false)"))?;
            let idle_since = match p.idle_since {
                None => None,
                Some(_) if active => return Err(bad("idle_since goes with active: false")),
                Some(t) => {
                    Some(crate::wire::json::parse_rfc3339(&t).ok_or_else(|| bad(format!("idle_since {t:?} is not an RFC 3339 time")))?)
                }
            };
            Ok(ClientMsg::Activity { active, idle_since })
        }),
        "subscribe" | "unsubscribe" => payload::<UsersPayload>(&kind, frame.payload).and_then(|p| {
            if p.user_ids.is_none() && p.conversation_ids.is_none() {
                return Err(bad(format!("{kind} needs user_ids or conversation_ids")));
            }
            let (user_ids, conversation_ids) = (p.user_ids.unwrap_or_default(), p.conversation_ids.unwrap_or_default());
            Ok(if kind == "subscribe" {
                ClientMsg::Subscribe { user_ids, conversation_ids }
            } else {
                ClientMsg::Unsubscribe { user_ids, conversation_ids }
            })
        }),
        other => Err(ProtoError {
            code: "unknown_type",
            message: format!(
                "unknown message type {other:?} (expected presence_update, heartbeat, activity, typing, subscribe, unsubscribe or bye)"
            ),
        }),
    };
    ClientFrame { id, kind, msg }
}

/// `presence_update` pushed to a watcher; `payload` is the presence as in the REST API.
pub fn presence_update(p: &Presence, now: Millis) -> String {
    json!({"type": "presence_update", "payload": PresenceJson { p, now }}).to_string()
}

/// A conversation's presence as one viewer may see it (issue 27).
pub struct ConversationView<'a> {
    pub conversation_id: &'a str,
    /// Members in the conversation.
    pub members: usize,
    /// Members the viewer sees with any status but offline.
    pub online: usize,
    /// Snapshot: the first page of members the viewer sees online. Otherwise: the members
    /// whose view changed (an offline one is no longer online).
    pub presences: &'a [Presence],
    pub next_cursor: Option<&'a str>,
    /// A snapshot replaces what the client holds; otherwise the message updates it.
    pub snapshot: bool,
    /// Members who left the conversation.
    pub removed: &'a [crate::core::UserId],
    pub now: Millis,
}

/// `conversation_presence`: counts, and a page or the changes.
pub fn conversation_presence(v: &ConversationView<'_>) -> String {
    #[derive(Serialize)]
    struct Payload<'a> {
        conversation_id: &'a str,
        members: usize,
        online: usize,
        presences: Vec<PresenceJson<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        next_cursor: Option<&'a str>,
        snapshot: bool,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        removed: Vec<&'a str>,
    }
    #[derive(Serialize)]
    struct Msg<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        payload: Payload<'a>,
    }
    let payload = Payload {
        conversation_id: v.conversation_id,
        members: v.members,
        online: v.online,
        presences: v.presences.iter().map(|p| PresenceJson { p, now: v.now }).collect(),
        next_cursor: v.next_cursor,
        snapshot: v.snapshot,
        removed: v.removed.iter().map(|u| u.as_str()).collect(),
    };
    serde_json::to_string(&Msg { kind: "conversation_presence", payload }).unwrap_or_default()
}

pub fn typing_indicator(conversation_id: &str, user_id: &str, is_typing: bool) -> String {
    json!({"type": "typing_indicator", "payload": {"conversation_id": conversation_id, "user_id": user_id, "is_typing": is_typing}})
        .to_string()
}

pub fn ack(id: &Option<Value>, kind: &str) -> String {
    // Written straight from borrowed fields (one allocation, not a map of values): every
    // heartbeat gets one. Fields in the order the `json!` map wrote them.
    #[derive(Serialize)]
    struct Ack<'a> {
        id: &'a Option<Value>,
        payload: AckPayload<'a>,
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(Serialize)]
    struct AckPayload<'a> {
        id: &'a Option<Value>,
        #[serde(rename = "type")]
        kind: &'a str,
    }
    serde_json::to_string(&Ack { id, payload: AckPayload { id, kind }, kind: "ack" }).unwrap_or_default()
}

/// An `error` message for a refused request (the code from [`crate::error::TABLE`]); what
/// the client is not told is logged once.
pub fn error_of(id: &Option<Value>, e: &ApiError) -> String {
    e.report("ws");
    error(id, e.code(), &e.to_string())
}

pub fn error(id: &Option<Value>, code: &str, message: &str) -> String {
    json!({"type": "error", "id": id, "payload": {"id": id, "code": code, "message": message}}).to_string()
}

/// The `error` a subscriber gets when it is removed from a conversation (it no longer
/// follows it); it names the conversation.
pub fn removed_from(conversation_id: &str) -> String {
    let message = format!("no longer a member of conversation {conversation_id}: unsubscribed");
    json!({"type": "error", "id": null, "payload": {"id": null, "code": "forbidden", "message": message, "conversation_id": conversation_id}})
        .to_string()
}

/// First message on a new connection: who the server thinks you are and the timing to keep.
pub fn connected(
    user_id: &str,
    device_id: &str,
    platform: Option<Platform>,
    node_id: &str,
    heartbeat_secs: u64,
    session_ttl_secs: u64,
    typing_ttl_secs: u64,
) -> String {
    let mut payload = json!({
        "user_id": user_id, "device_id": device_id, "node_id": node_id,
        "heartbeat_interval": heartbeat_secs, "session_ttl": session_ttl_secs, "typing_ttl": typing_ttl_secs,
    });
    if let (Some(p), Some(map)) = (platform, payload.as_object_mut()) {
        map.insert("platform".into(), json!(p.as_str()));
    }
    json!({"type": "connected", "payload": payload}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_messages() {
        let m = parse(r#"{"type": "presence_update", "payload": {"online_status": "away", "custom_status": "In a meeting"}}"#);
        assert_eq!(
            m.msg,
            Ok(ClientMsg::PresenceUpdate { online_status: Some("away".into()), custom_status: Some("In a meeting".into()), ttl: None })
        );
        assert_eq!(parse(r#"{"type": "heartbeat", "payload": {}}"#).msg, Ok(ClientMsg::Heartbeat));
        assert_eq!(parse(r#"{"type": "heartbeat"}"#).msg, Ok(ClientMsg::Heartbeat));
        assert_eq!(parse(r#"{"type": "bye", "id": 3}"#).msg, Ok(ClientMsg::Bye));
        let t = parse(r#"{"type": "typing", "payload": {"conversation_id": "conv-uuid", "is_typing": true}, "id": 7}"#);
        assert_eq!(t.msg, Ok(ClientMsg::Typing { conversation_id: "conv-uuid".into(), is_typing: true }));
        assert_eq!(t.id, Some(json!(7)));
        assert_eq!(
            parse(r#"{"type":"subscribe","payload":{"user_ids":["a","b"]},"id":"x"}"#).msg,
            Ok(ClientMsg::Subscribe { user_ids: vec!["a".into(), "b".into()], conversation_ids: vec![] })
        );
    }

    #[test]
    fn refusals_have_codes() {
        assert_eq!(parse("{").msg.unwrap_err().code, "malformed");
        assert_eq!(parse("[]").msg.unwrap_err().code, "malformed");
        assert_eq!(parse(r#"{"payload":{}}"#).msg.unwrap_err().code, "malformed");
        assert_eq!(parse(r#"{"type":"dance"}"#).msg.unwrap_err().code, "unknown_type");
        assert_eq!(parse(r#"{"type":"typing","payload":{"conversation_id":"c"}}"#).msg.unwrap_err().code, "bad_request");
        let idle = parse(r#"{"type":"activity","payload":{"active":false,"idle_since":"2024-01-15T10:30:00.5+01:00"},"id":3}"#);
        assert_eq!(idle.msg, Ok(ClientMsg::Activity { active: false, idle_since: Some(1_705_311_000_500) }));
        let back = parse(r#"{"type":"activity","payload":{"active":true}}"#).msg;
        assert_eq!(back, Ok(ClientMsg::Activity { active: true, idle_since: None }));
        for bad in [
            r#"{"type":"activity","payload":{}}"#,
            r#"{"type":"activity","payload":{"active":"no"}}"#,
            r#"{"type":"activity","payload":{"active":false,"idle_since":"yesterday"}}"#,
            r#"{"type":"activity","payload":{"active":true,"idle_since":"2024-01-15T10:30:00Z"}}"#,
            r#"{"type":"activity","payload":{"active":false,"since":"2024-01-15T10:30:00Z"}}"#,
        ] {
            assert_eq!(parse(bad).msg.unwrap_err().code, "bad_request", "{bad}");
        }
        assert_eq!(parse(r#"{"type":"subscribe","payload":{"user_ids":"a"}}"#).msg.unwrap_err().code, "bad_request");
        assert_eq!(parse(r#"{"type":"presence_update","payload":{"status":"away"}}"#).msg.unwrap_err().code, "bad_request");
        // Only scalar ids are echoed.
        assert_eq!(parse(r#"{"type":"heartbeat","id":{"x":1}}"#).id, None);
    }

    #[test]
    fn encodes_server_messages() {
        // Byte for byte what clients (and the scale bench's baseline) have always read.
        assert_eq!(ack(&None, "heartbeat"), r#"{"id":null,"payload":{"id":null,"type":"heartbeat"},"type":"ack"}"#);
        assert_eq!(ack(&Some(json!(7)), "typing"), r#"{"id":7,"payload":{"id":7,"type":"typing"},"type":"ack"}"#);
        let v: Value = serde_json::from_str(&ack(&Some(json!("abc")), "heartbeat")).unwrap();
        assert_eq!(v, json!({"type":"ack","id":"abc","payload":{"id":"abc","type":"heartbeat"}}));
        let v: Value = serde_json::from_str(&error(&None, "forbidden", "no")).unwrap();
        assert_eq!(v["payload"]["code"], "forbidden");
        let v: Value = serde_json::from_str(&typing_indicator("c1", "bob", false)).unwrap();
        assert_eq!(v["payload"], json!({"conversation_id":"c1","user_id":"bob","is_typing":false}));
    }
}
