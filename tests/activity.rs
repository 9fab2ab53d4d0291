//! Device activity and automatic away (issue 26), on real sockets: a device says its user
//! is idle or active (`activity` on `/ws`, gRPC `SetActivity` and `RefreshSession`, the
//! legacy heartbeat's `active`); with no explicit status, every live device idle for
//! `presence.auto_away_after` reads `away` with `idle_since`, and one device active again
//! reads `online` at once; reads show each device's state; privacy hides it like any
//! change; in cluster mode (NATS, Redis) the transition is written and seen once.

mod common;

use std::time::Duration;

use common::engine::Engine;
use common::wsclient::{self, Client};
use common::*;
use presenced::grpc::pb;
use serde_json::{json, Value};

const AWAY: (&str, &str) = ("PRESENCE_PRESENCE__AUTO_AWAY_AFTER", "1s");

async fn activity(c: &mut Client, active: bool, idle_since: Option<&str>, id: u64) -> Value {
    let mut payload = json!({"active": active});
    if let Some(t) = idle_since {
        payload["idle_since"] = json!(t);
    }
    c.ack(json!({"type": "activity", "payload": payload, "id": id})).await
}

async fn watch(c: &mut Client, user: &str) -> Value {
    let ack = c.ack(json!({"type":"subscribe","payload":{"user_ids":[user]},"id":"w"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    c.presence_of(user).await
}

fn device<'a>(p: &'a Value, id: &str) -> &'a Value {
    p["devices"].as_array().and_then(|d| d.iter().find(|d| d["device_id"] == id)).unwrap_or(&Value::Null)
}

async fn read(s: &TestServer, user: &str) -> Value {
    let (code, body) = s.get(&format!("/api/v2/presence/{user}")).await;
    assert_eq!(code, 200, "{body}");
    body["data"][user].clone()
}

#[tokio::test]
async fn automatic_away_after_the_configured_time_and_back_at_once() {
    let s = TestServer::start(&[AWAY, NO_GRACE]).await;
    let mut phone = wsclient::connect_platform(&s, "alice", "phone", "mobile").await;
    let mut laptop = wsclient::connect_platform(&s, "alice", "laptop", "desktop").await;
    let mut bob = wsclient::connect(&s, "bob", "b").await;
    let now = watch(&mut bob, "alice").await;
    assert_eq!(now["status"], "online");
    assert_eq!((device(&now, "phone")["active"].clone(), device(&now, "laptop")["active"].clone()), (json!(true), json!(true)));

    // One device idle: each device's state is news, the user stays online.
    let t0 = std::time::Instant::now();
    assert_eq!(activity(&mut phone, false, None, 1).await["type"], "ack");
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].clone(), device(&p, "phone")["active"].clone()), (json!("online"), json!(false)), "{p}");
    assert!(device(&p, "phone")["idle_since"].is_string(), "{p}");
    assert_eq!(device(&p, "laptop")["active"], true);
    assert!(p.get("idle_since").is_none(), "not away: {p}");
    // Said twice: nothing new.
    assert_eq!(activity(&mut phone, false, None, 2).await["type"], "ack");
    bob.silent(300).await;

    // The last device idle: online until auto_away_after has passed since it went idle.
    assert_eq!(activity(&mut laptop, false, None, 3).await["type"], "ack");
    let p = bob.presence_of("alice").await;
    assert_eq!(p["status"], "online", "{p}");
    let laptop_idle = device(&p, "laptop")["idle_since"].as_str().unwrap().to_string();
    let away = bob.presence_of("alice").await;
    assert!(t0.elapsed() >= Duration::from_millis(1000), "away only after the configured time");
    assert_eq!(away["status"], "away", "{away}");
    assert_eq!(away["idle_since"], json!(laptop_idle), "since the last device went idle: {away}");
    let r = read(&s, "alice").await;
    assert_eq!((r["status"].clone(), r["idle_since"].clone()), (json!("away"), json!(laptop_idle)), "{r}");
    assert_eq!((device(&r, "phone")["active"].clone(), device(&r, "laptop")["active"].clone()), (json!(false), json!(false)));

    // Any device active again: online at once.
    assert_eq!(activity(&mut phone, true, None, 4).await["type"], "ack");
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].clone(), device(&p, "phone")["active"].clone()), (json!("online"), json!(true)), "{p}");
    assert!(p.get("idle_since").is_none() && device(&p, "phone").get("idle_since").is_none(), "{p}");
    assert_eq!(read(&s, "alice").await["status"], "online");

    // The active device goes: the idle one is left, whose time has passed: away at once.
    phone.ack(json!({"type":"bye","id":5})).await;
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].clone(), p["device_count"].clone()), (json!("away"), json!(1)), "{p}");
    // A new session starts active.
    let _phone = wsclient::connect(&s, "alice", "phone").await;
    assert_eq!(bob.presence_of("alice").await["status"], "online");
    s.stop().await;
}

#[tokio::test]
async fn an_explicit_status_wins_and_idle_since_is_clamped() {
    let s = TestServer::start(&[AWAY, NO_GRACE]).await;
    let mut phone = wsclient::connect(&s, "alice", "phone").await;
    let mut bob = wsclient::connect(&s, "bob", "b").await;
    watch(&mut bob, "alice").await;
    assert_eq!(phone.ack(json!({"type":"presence_update","payload":{"online_status":"busy"},"id":1})).await["type"], "ack");
    assert_eq!(bob.presence_of("alice").await["status"], "busy");
    // Idle since an hour ago (before the session began): clamped to the session's start,
    // so the automatic away is due at once, but busy wins.
    let hour_ago = presenced::wire::json::rfc3339(chrono_now() - 3_600_000);
    assert_eq!(activity(&mut phone, false, Some(&hour_ago), 2).await["type"], "ack");
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].clone(), device(&p, "phone")["active"].clone()), (json!("busy"), json!(false)), "{p}");
    let since = presenced::wire::json::parse_rfc3339(device(&p, "phone")["idle_since"].as_str().unwrap()).unwrap();
    assert!(since > chrono_now() - 60_000, "clamped to the session's start, not an hour ago");
    bob.silent(1500).await;
    assert_eq!(read(&s, "alice").await["status"], "busy");
    // The explicit status cleared: the automatic away shows at once.
    let (code, _) = s
        .client
        .delete(s.url("/api/v2/presence/alice"))
        .bearer_auth(s.token("alice"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(code, 200);
    let p = bob.presence_of("alice").await;
    assert_eq!(p["status"], "away", "{p}");
    // A time in the future is now; a bad one, or idle_since with active, is refused.
    assert_eq!(activity(&mut phone, true, None, 3).await["type"], "ack");
    assert_eq!(bob.presence_of("alice").await["status"], "online");
    assert_eq!(activity(&mut phone, false, Some("2999-01-01T00:00:00Z"), 4).await["type"], "ack");
    let p = bob.presence_of("alice").await;
    let since = presenced::wire::json::parse_rfc3339(device(&p, "phone")["idle_since"].as_str().unwrap()).unwrap();
    assert!(since <= chrono_now(), "clamped to now");
    for bad in [
        json!({"active": "no"}),
        json!({}),
        json!({"active": true, "idle_since": "2024-01-01T00:00:00Z"}),
        json!({"active": false, "idle_since": "soon"}),
    ] {
        let e = phone.ack(json!({"type":"activity","payload":bad,"id":9})).await;
        assert_eq!((e["type"].clone(), e["payload"]["code"].clone()), (json!("error"), json!("bad_request")), "{e}");
    }
    s.stop().await;
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// An invisible user's idleness reaches nobody: no push at all, not even the moment. A
/// user hiding `last_seen` shows the away (a status) without its times.
#[tokio::test]
async fn privacy_hides_idleness_like_any_change() {
    let s = TestServer::start(&[AWAY, NO_GRACE]).await;
    let put = |user: &str, body: Value| {
        let req = s.client.put(s.url(&format!("/api/v2/presence/{user}/privacy"))).bearer_auth(s.token(user)).json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put("alice", json!({"visibility": "nobody"})).await, 200);
    assert_eq!(put("carol", json!({"last_seen": "nobody"})).await, 200);
    let mut alice = wsclient::connect(&s, "alice", "phone").await;
    let mut carol = wsclient::connect(&s, "carol", "phone").await;
    let mut bob = wsclient::connect(&s, "bob", "b").await;
    assert_eq!(watch(&mut bob, "alice").await["status"], "offline");
    watch(&mut bob, "carol").await;
    bob.settle(200).await;
    assert_eq!(activity(&mut alice, false, None, 1).await["type"], "ack");
    assert_eq!(activity(&mut carol, false, None, 1).await["type"], "ack");
    // carol: idle device, then away, without times.
    let p = bob.presence_of("carol").await;
    assert_eq!(device(&p, "phone")["active"], false, "{p}");
    assert!(device(&p, "phone").get("idle_since").is_none(), "carol hides her times: {p}");
    let p = bob.presence_of("carol").await;
    assert_eq!(p["status"], "away", "{p}");
    assert!(p.get("idle_since").is_none(), "{p}");
    // Nothing at all about alice (her own sockets do see it).
    bob.silent(800).await;
    let own = alice.presence_of("alice").await;
    assert_eq!(device(&own, "phone")["active"], false, "the owner sees their own: {own}");
    let r = read(&s, "alice").await;
    assert_eq!((r["status"].clone(), r["devices"].clone()), (json!("offline"), json!([])), "{r}");
    s.stop().await;
}

/// gRPC: `SetActivity`, `RefreshSession { active }`, `RegisterSession { active: false }`,
/// per-device `active`/`idle_since` in `GetUserDevices` and `GetPresence`, the away on
/// `WatchPresence`; and the legacy heartbeat's `active`.
#[tokio::test]
async fn grpc_and_the_legacy_heartbeat_report_and_read_activity() {
    let s = TestServer::start(&[AWAY, NO_GRACE]).await;
    let mut g = pb::presence_api_client::PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let mut watch = g
        .watch_presence(s.admin_request(pb::WatchPresenceRequest { user_ids: vec!["gina".into()], all: false, conversation_ids: vec![] }))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("in time").unwrap().expect("open");
    assert!(next().await.snapshot);
    let reg = |device: &str, active: Option<bool>| pb::RegisterSessionRequest {
        user_id: "gina".into(),
        device_id: device.into(),
        instance_id: "gw".into(),
        ttl_seconds: 60,
        platform: "desktop".into(),
        active,
    };
    g.register_session(s.admin_request(reg("desk", None))).await.unwrap();
    assert_eq!(next().await.kind, pb::presence_event::Kind::UserOnline as i32);
    g.register_session(s.admin_request(reg("tablet", Some(false)))).await.unwrap();
    let devices =
        g.get_user_devices(s.admin_request(pb::GetUserDevicesRequest { user_id: "gina".into() })).await.unwrap().into_inner().devices;
    let of = |id: &str| devices.iter().find(|d| d.device_id == id).cloned().unwrap();
    assert!(of("desk").active == Some(true) && of("desk").idle_since.is_none());
    assert!(of("tablet").active == Some(false) && of("tablet").idle_since.is_some(), "registered idle");
    // A refresh that says nothing of activity changes nothing; one that says idle does.
    let refresh =
        |active: Option<bool>| pb::RefreshSessionRequest { user_id: "gina".into(), device_id: "desk".into(), active, idle_since: None };
    g.refresh_session(s.admin_request(refresh(None))).await.unwrap();
    g.refresh_session(s.admin_request(refresh(Some(false)))).await.unwrap();
    let away = loop {
        let ev = next().await;
        let p = ev.presence.unwrap();
        if p.status == pb::Status::Away as i32 {
            break p;
        }
    };
    assert!(away.idle_since.is_some() && away.devices.iter().all(|d| d.active == Some(false)), "{away:?}");
    let got = g.get_presence(s.admin_request(pb::GetPresenceRequest { user_ids: vec!["gina".into()] })).await.unwrap().into_inner();
    assert_eq!(got.presences[0].status, pb::Status::Away as i32);
    // SetActivity: back at once.
    let set = |active: bool, idle_since: Option<prost_types::Timestamp>| pb::SetActivityRequest {
        user_id: "gina".into(),
        device_id: "tablet".into(),
        active,
        idle_since,
    };
    g.set_activity(s.admin_request(set(true, None))).await.unwrap();
    let back = next().await.presence.unwrap();
    assert_eq!(back.status, pb::Status::Online as i32);
    let bad = g.set_activity(s.admin_request(set(true, Some(prost_types::Timestamp { seconds: 1, nanos: 0 })))).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let missing = pb::SetActivityRequest { device_id: "nope".into(), ..set(false, None) };
    assert_eq!(g.set_activity(s.admin_request(missing)).await.unwrap_err().code(), tonic::Code::NotFound);
    // Not a gateway's call for a user's own token.
    let mut own = tonic::Request::new(set(false, None));
    own.metadata_mut().insert("authorization", format!("Bearer {}", s.token("gina")).parse().unwrap());
    assert_eq!(g.set_activity(own).await.unwrap_err().code(), tonic::Code::PermissionDenied);

    // The legacy heartbeat.
    let beat = |body: Value| s.client.post(s.url("/presence/heartbeat")).bearer_auth(s.token("hugo")).json(&body).send();
    assert_eq!(beat(json!({"device_id": "web1", "active": false})).await.unwrap().status(), 200);
    let r = read(&s, "hugo").await;
    assert_eq!(device(&r, "web1")["active"], false, "{r}");
    assert_eq!(beat(json!({"device_id": "web1"})).await.unwrap().status(), 200);
    assert_eq!(device(&read(&s, "hugo").await, "web1")["active"], false, "a heartbeat without active leaves it");
    assert_eq!(beat(json!({"device_id": "web1", "active": true})).await.unwrap().status(), 200);
    assert_eq!(device(&read(&s, "hugo").await, "web1")["active"], true);
    assert_eq!(beat(json!({"device_id": "web1", "active": "yes"})).await.unwrap().status(), 400);
    s.stop().await;
}

on_engines!(cluster_activity_is_written_once_and_seen_once_on_every_node: nats, redis);
/// alice on node a, watchers on both nodes: each device transition is one store write
/// (heartbeats none), and the automatic away (a compare-and-swap on the timer of the node
/// that wrote the idleness) is one transition that every watcher sees exactly once.
async fn cluster_activity_is_written_once_and_seen_once_on_every_node(e: Engine) {
    let a = e.node_with("node-a", &[AWAY, NO_GRACE]).await;
    let b = e.node_with("node-b", &[AWAY, NO_GRACE]).await;
    let mut alice = wsclient::connect(&a, "alice", "phone").await;
    let mut bob = wsclient::connect(&a, "bob", "b").await;
    let mut carol = wsclient::connect(&b, "carol", "c").await;
    watch(&mut bob, "alice").await;
    let seen = watch(&mut carol, "alice").await;
    assert_eq!(seen["status"], "online");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The user records written (one metric for both nodes: they share the process).
    let writes = async || a.user_writes().await;
    let w0 = writes().await;
    for i in 0..3 {
        assert_eq!(alice.ack(json!({"type":"heartbeat","id":i})).await["type"], "ack");
    }
    assert_eq!(writes().await, w0, "heartbeats write nothing");
    assert_eq!(activity(&mut alice, false, None, 10).await["type"], "ack");
    assert_eq!(activity(&mut alice, false, None, 11).await["type"], "ack");
    for w in [&mut bob, &mut carol] {
        let p = w.presence_of("alice").await;
        assert_eq!((p["status"].clone(), device(&p, "phone")["active"].clone()), (json!("online"), json!(false)), "{p}");
        let p = w.presence_of("alice").await;
        assert_eq!(p["status"], "away", "{p}");
    }
    // Exactly once on every node.
    bob.silent(1000).await;
    carol.silent(100).await;
    for n in [&a, &b] {
        assert_eq!(read(n, "alice").await["status"], "away");
    }
    assert_eq!(writes().await - w0, 2.0, "one write for the device going idle, one for the away");
    assert_eq!(activity(&mut alice, true, None, 12).await["type"], "ack");
    for w in [&mut bob, &mut carol] {
        assert_eq!(w.presence_of("alice").await["status"], "online");
    }
    eventually("the write back to active", Duration::from_secs(2), async || writes().await - w0 == 3.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(writes().await - w0, 3.0, "one write back to active");
    a.stop().await;
    b.stop().await;
}

on_engines!(an_idle_user_on_a_drained_node_reads_away_on_the_other: nats, redis);
/// alice goes idle on node a, which then drains (a restart) before her away is due: node b
/// takes her session over for the grace, and reads there show the away at its moment (the
/// timer was on a) and never a false online.
async fn an_idle_user_on_a_drained_node_reads_away_on_the_other(e: Engine) {
    let grace = ("PRESENCE_PRESENCE__OFFLINE_GRACE", "6s");
    let a = e.node_with("node-a", &[AWAY, grace]).await;
    let b = e.node_with("node-b", &[AWAY, grace]).await;
    let mut alice = wsclient::connect(&a, "alice", "phone").await;
    assert_eq!(activity(&mut alice, false, None, 1).await["type"], "ack");
    a.stop().await;
    let r = read(&b, "alice").await;
    assert_eq!((r["status"].clone(), device(&r, "phone")["active"].clone()), (json!("online"), json!(false)), "{r}");
    eventually("away on node b", Duration::from_secs(5), async || read(&b, "alice").await["status"] == "away").await;
    b.stop().await;
}
