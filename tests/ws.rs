//! `/ws` over real sockets with a real WebSocket client: lifecycle, subscriptions,
//! contacts, privacy, typing, protocol errors, limits and slow consumers.

mod common;

use std::time::Duration;

use common::wsclient::{connect, connect_platform, connect_with, Client};
use common::{assert_error, decode, TestServer};
use futures_util::SinkExt;
use presenced::core::UserId;
use presenced::store::SetStatus;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

async fn admin_put(s: &TestServer, path: &str, body: Value) {
    let r = s.client.put(s.url(path)).bearer_auth(s.admin_token("backend")).json(&body).send().await.unwrap();
    let (code, b) = decode(r).await;
    assert_eq!(code, 200, "{path}: {b}");
}

#[tokio::test]
async fn handshake_auth_device_and_gateway_mode() {
    let s = TestServer::start(&[]).await;
    let e = connect_with(&s, "", &[]).await.err().expect("no token → refused");
    assert_eq!(e.0, 401);
    assert_eq!(e.1["success"], false);
    assert_eq!(e.1["code"], "unauthorized");
    let e = connect_with(&s, "?token=garbage", &[]).await.err().unwrap();
    assert_eq!(e.0, 401);
    // Query-string token (browsers) and a generated device id.
    let mut c = connect_with(&s, &format!("?token={}", s.token("alice")), &[]).await.unwrap();
    let hello = c.recv_type("connected").await;
    assert!(hello["payload"]["device_id"].as_str().unwrap().starts_with("dev-"), "{hello}");
    assert_eq!(hello["payload"]["heartbeat_interval"], 25);
    // X-Device-ID header, and a bad device id is a 400 before the upgrade.
    let mut c2 =
        connect_with(&s, "", &[("authorization", &format!("Bearer {}", s.token("alice"))), ("x-device-id", "tablet-1")]).await.unwrap();
    assert_eq!(c2.recv_type("connected").await["payload"]["device_id"], "tablet-1");
    let e = connect_with(&s, "?device_id=bad%20id", &[("authorization", &format!("Bearer {}", s.token("alice")))]).await.err().unwrap();
    assert_eq!(e.0, 400);
    // A plain GET is not an upgrade.
    assert_error(&s.get("/ws").await, 401, "unauthorized");
    let r = s.client.get(s.url("/ws")).bearer_auth(s.token("alice")).send().await.unwrap();
    assert_error(&decode(r).await, 400, "bad_request");
    s.stop().await;

    // Gateway mode: the gateway's X-User-ID is trusted, as in seed 004's wscat example.
    let s = TestServer::start(&[("PRESENCE_AUTH__MODE", "gateway")]).await;
    let mut c = connect_with(&s, "", &[("x-user-id", "user-uuid"), ("x-device-id", "device-123")]).await.unwrap();
    let hello = c.recv_type("connected").await;
    assert_eq!((hello["payload"]["user_id"].as_str(), hello["payload"]["device_id"].as_str()), (Some("user-uuid"), Some("device-123")));
    let e = connect_with(&s, "", &[("x-device-id", "d")]).await.err().unwrap();
    assert_eq!(e.0, 401);
    // A backend's service token still works (and is still verified) behind the gateway.
    let r = s
        .client
        .put(s.url("/api/v2/contacts/user-uuid"))
        .bearer_auth(s.admin_token("backend"))
        .json(&json!({"contacts":["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s.client.put(s.url("/api/v2/contacts/user-uuid")).bearer_auth("forged").json(&json!({"contacts":[]})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .put(s.url("/api/v2/presence/user-uuid"))
        .header("x-user-id", "user-uuid")
        .json(&json!({"status":"busy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the gateway's user writes their own status");
    s.stop().await;
}

#[tokio::test]
async fn multi_device_online_offline_seen_by_subscriber() {
    let s = TestServer::start(&[]).await;
    let mut bob = connect(&s, "bob", "b1").await;
    let ack = bob.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":1})).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["payload"]["type"], "subscribe");
    let snap = bob.presence_of("alice").await;
    assert_eq!(snap["status"], "offline");

    let phone = connect_platform(&s, "alice", "phone", "mobile").await;
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_i64()), (Some("online"), Some(1)));
    assert_eq!(p["devices"], json!([{"device_id":"phone","platform":"mobile","active":true}]));
    // A second device is news: watchers can show "on phone and laptop".
    let laptop = connect_platform(&s, "alice", "laptop", "desktop").await;
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_i64()), (Some("online"), Some(2)));
    assert_eq!(
        p["devices"],
        json!([{"device_id":"laptop","platform":"desktop","active":true},{"device_id":"phone","platform":"mobile","active":true}])
    );
    let r = s.get("/api/v2/presence/alice").await;
    assert_eq!(r.1["data"]["alice"]["device_count"], 2);
    drop(phone);
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_i64()), (Some("online"), Some(1)), "still online on the laptop");
    drop(laptop);
    let p = bob.presence_of("alice").await;
    assert_eq!(p["status"], "offline");
    assert_eq!(p["devices"], json!([]));
    assert!(p["last_seen"].is_string(), "last_seen recorded: {p}");
    bob.silent(300).await;
    // A platform the server does not know is refused before the upgrade.
    let e = connect_with(&s, "?device_id=x&platform=fridge", &[("authorization", &format!("Bearer {}", s.token("alice")))])
        .await
        .err()
        .unwrap();
    assert_eq!((e.0, e.1["code"].as_str()), (400, Some("bad_request")));
    s.stop().await;
}

#[tokio::test]
async fn subscribe_snapshot_then_updates_and_unsubscribe() {
    let s = TestServer::start(&[]).await;
    assert_eq!(s.put_status("carol", Some(&s.token("carol")), json!({"status":"busy","message":"focus"})).await.0, 200);
    let mut v = connect(&s, "viewer", "v").await;
    v.ack(json!({"type":"subscribe","payload":{"user_ids":["carol","nobody"]},"id":"s1"})).await;
    let mut snap = [v.recv_type("presence_update").await, v.recv_type("presence_update").await];
    snap.sort_by_key(|m| m["payload"]["user_id"].as_str().unwrap().to_string());
    assert_eq!(snap[0]["payload"]["status"], "busy");
    assert_eq!(snap[0]["payload"]["message"], "focus");
    assert_eq!(snap[1]["payload"]["user_id"], "nobody");
    assert_eq!(snap[1]["payload"]["status"], "offline");
    s.put_status("carol", Some(&s.token("carol")), json!({"status":"away"})).await;
    assert_eq!(v.presence_of("carol").await["status"], "away");
    v.ack(json!({"type":"unsubscribe","payload":{"user_ids":["carol"]},"id":"u1"})).await;
    s.put_status("carol", Some(&s.token("carol")), json!({"status":"online"})).await;
    v.silent(300).await;
    s.stop().await;
}

#[tokio::test]
async fn contacts_are_told_and_strangers_are_not() {
    let s = TestServer::start(&[]).await;
    let r = s
        .client
        .put(s.url("/api/v2/contacts/alice"))
        .bearer_auth(s.token("alice"))
        .json(&json!({"contacts":["bob"]}))
        .send()
        .await
        .unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["contacts"], json!(["bob"]));
    let r = s.client.get(s.url("/api/v2/contacts/alice")).bearer_auth(s.token("alice")).send().await.unwrap();
    assert_eq!(decode(r).await.1["data"]["contacts"], json!(["bob"]));
    // Someone else's contacts: 403; a backend with presence:admin may.
    let r = s.client.put(s.url("/api/v2/contacts/alice")).bearer_auth(s.token("bob")).json(&json!({"contacts":[]})).send().await.unwrap();
    assert_error(&decode(r).await, 403, "forbidden");
    admin_put(&s, "/api/v2/contacts/dave", json!({"contacts":["bob"]})).await;

    let mut bob = connect(&s, "bob", "b").await;
    let mut carol = connect(&s, "carol", "c").await;
    carol.settle(300).await; // her own presence
                             // On connect bob gets a snapshot of who shares presence with him (alice, dave).
    let mut shared =
        [bob.recv_type("presence_update").await, bob.recv_type("presence_update").await, bob.recv_type("presence_update").await];
    shared.sort_by_key(|m| m["payload"]["user_id"].as_str().unwrap().to_string());
    let ids: Vec<&str> = shared.iter().map(|m| m["payload"]["user_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["alice", "bob", "dave"]);

    let _alice = connect(&s, "alice", "a").await;
    assert_eq!(bob.presence_of("alice").await["status"], "online");
    s.put_status("alice", Some(&s.token("alice")), json!({"status":"busy","message":"call"})).await;
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].as_str(), p["message"].as_str()), (Some("busy"), Some("call")));
    carol.silent(400).await;
    // Persisted: the list survives in the store's directory table.
    assert!(s.svc.directory.contacts(&UserId::parse("alice", 64).unwrap()).contains(&UserId::parse("bob", 64).unwrap()));
    s.stop().await;
}

#[tokio::test]
async fn privacy_modes_on_rest_and_websocket() {
    let s = TestServer::start(&[]).await;
    let alice_t = s.token("alice");
    s.client.put(s.url("/api/v2/contacts/alice")).bearer_auth(&alice_t).json(&json!({"contacts":["bob"]})).send().await.unwrap();
    s.put_status("alice", Some(&alice_t), json!({"status":"busy","message":"secret meeting"})).await;
    let put_privacy = |body: Value| {
        let req = s.client.put(s.url("/api/v2/presence/alice/privacy")).bearer_auth(&alice_t).json(&body);
        async move { decode(req.send().await.unwrap()).await }
    };
    let read_as = |viewer: Option<String>| {
        let mut req = s.client.get(s.url("/api/v2/presence/alice"));
        if let Some(t) = viewer {
            req = req.bearer_auth(t);
        }
        async move { decode(req.send().await.unwrap()).await.1["data"]["alice"].clone() }
    };
    let mut bob = connect(&s, "bob", "b").await; // contact
    let mut carol = connect(&s, "carol", "c").await; // stranger
    carol.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":1})).await;
    assert_eq!(carol.presence_of("alice").await["status"], "busy");
    assert_eq!(bob.presence_of("alice").await["status"], "busy");

    // visibility: contacts
    let (code, body) = put_privacy(json!({"visibility":"contacts","last_seen":"contacts"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["visibility"], "contacts");
    let pushed = carol.presence_of("alice").await;
    assert_eq!((pushed["status"].as_str(), pushed.get("message")), (Some("offline"), None), "change pushed to the stranger");
    assert_eq!(read_as(None).await["status"], "offline");
    assert_eq!(read_as(Some(s.token("carol"))).await["status"], "offline");
    assert_eq!(read_as(Some(s.token("bob"))).await["status"], "busy");
    assert_eq!(read_as(Some(alice_t.clone())).await["message"], "secret meeting");
    // A stranger's fresh snapshot is hidden too.
    let mut dave = connect(&s, "dave", "d").await;
    dave.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":1})).await;
    assert_eq!(dave.presence_of("alice").await["status"], "offline");

    // visibility: nobody (invisible): even contacts see offline; alice still sees herself.
    put_privacy(json!({"visibility":"nobody"})).await;
    assert_eq!(bob.presence_of("alice").await["status"], "offline");
    assert_eq!(read_as(Some(s.token("bob"))).await["status"], "offline");
    assert!(read_as(Some(s.token("bob"))).await["last_seen"].is_null());
    assert_eq!(read_as(Some(alice_t.clone())).await["status"], "busy");
    let r = s.client.get(s.url("/api/v2/presence/alice/privacy")).bearer_auth(&alice_t).send().await.unwrap();
    let b = decode(r).await.1;
    assert_eq!((b["data"]["visibility"].as_str(), b["data"]["last_seen"].as_str()), (Some("nobody"), Some("contacts")));

    // last_seen only: everyone sees the status, strangers not last_seen.
    put_privacy(json!({"visibility":"everyone","last_seen":"contacts"})).await;
    assert_eq!(carol.presence_of("alice").await["status"], "busy");
    let as_carol = read_as(Some(s.token("carol"))).await;
    assert!(as_carol["last_seen"].is_null() && as_carol["status"] == "busy", "{as_carol}");
    assert!(read_as(Some(s.token("bob"))).await["last_seen"].is_string());

    // Multi reads apply it too; bad values and other people's settings are refused.
    let r = s.get("/api/v2/presence?users=alice").await;
    assert!(r.1["data"]["alice"]["last_seen"].is_null());
    assert_error(&put_privacy(json!({"visibility":"friends"})).await, 400, "bad_request");
    let r = s.client.get(s.url("/api/v2/presence/alice/privacy")).bearer_auth(s.token("bob")).send().await.unwrap();
    assert_error(&decode(r).await, 403, "forbidden");
    s.stop().await;
}

#[tokio::test]
async fn typing_reaches_members_expires_and_refuses_non_members() {
    let s = TestServer::start(&[("PRESENCE_PRESENCE__TYPING_TTL", "1s")]).await;
    // Only a backend sets members.
    let r = s
        .client
        .put(s.url("/api/v2/conversations/conv-1/members"))
        .bearer_auth(s.token("alice"))
        .json(&json!({"members":["alice"]}))
        .send()
        .await
        .unwrap();
    assert_error(&decode(r).await, 403, "forbidden");
    admin_put(&s, "/api/v2/conversations/conv-1/members", json!({"members":["alice","bob"]})).await;
    let mut alice = connect(&s, "alice", "a").await;
    let mut bob = connect(&s, "bob", "b").await;
    let mut carol = connect(&s, "carol", "c").await;
    let ack = alice.ack(json!({"type":"typing","payload":{"conversation_id":"conv-1","is_typing":true},"id":9})).await;
    assert_eq!(ack["type"], "ack");
    let t = bob.recv_type("typing_indicator").await;
    assert_eq!(t["payload"], json!({"conversation_id":"conv-1","user_id":"alice","is_typing":true}));
    // A crashed client never leaves "typing…": it stops by itself after typing_ttl.
    let started = std::time::Instant::now();
    let t = bob.recv_type("typing_indicator").await;
    assert_eq!(t["payload"]["is_typing"], false);
    assert!(started.elapsed() >= Duration::from_millis(700), "expired too early: {:?}", started.elapsed());
    // A non-member is refused.
    let e = carol.ack(json!({"type":"typing","payload":{"conversation_id":"conv-1","is_typing":true},"id":3})).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["payload"]["code"], "forbidden");
    // Explicit stop is delivered at once.
    alice.ack(json!({"type":"typing","payload":{"conversation_id":"conv-1","is_typing":true},"id":10})).await;
    assert_eq!(bob.recv_type("typing_indicator").await["payload"]["is_typing"], true);
    alice.ack(json!({"type":"typing","payload":{"conversation_id":"conv-1","is_typing":false},"id":11})).await;
    assert_eq!(bob.recv_type("typing_indicator").await["payload"]["is_typing"], false);
    s.stop().await;
}

#[tokio::test]
async fn malformed_unknown_and_oversize_messages() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__WS_MAX_MESSAGE_BYTES", "1KiB")]).await;
    let mut c = connect(&s, "alice", "a").await;
    c.ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(c.recv_type("error").await["payload"]["code"], "malformed");
    let e = c.ack(json!({"type":"dance","id":1})).await;
    assert_eq!(e["payload"]["code"], "unknown_type");
    let e = c.ack(json!({"type":"presence_update","payload":{"online_status":"sleeping"},"id":2})).await;
    assert_eq!(e["payload"]["code"], "bad_request");
    let e = c.ack(json!({"type":"subscribe","payload":{"user_ids":["bad id"]},"id":3})).await;
    assert_eq!(e["payload"]["code"], "bad_request");
    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(c.recv_type("error").await["payload"]["code"], "bad_request");
    // Still open and working.
    assert_eq!(c.ack(json!({"type":"heartbeat","id":4})).await["type"], "ack");
    let ok = c.ack(json!({"type":"presence_update","payload":{"online_status":"away","custom_status":"brb"},"id":5})).await;
    assert_eq!(ok["type"], "ack");
    assert_eq!(s.get("/api/v2/presence/alice").await.1["data"]["alice"]["message"], "brb");
    // Oversize: closed with 1009.
    c.ws.send(Message::text(format!("{{\"type\":\"heartbeat\",\"pad\":\"{}\"}}", "x".repeat(2048)))).await.unwrap();
    assert_eq!(c.closed().await, Some(CloseCode::Size));
    s.stop().await;
}

#[tokio::test]
async fn stale_connection_is_closed_and_its_session_expired() {
    let s = TestServer::start(&[("PRESENCE_PRESENCE__SESSION_TTL", "2s"), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "500ms")]).await;
    let mut watcher = connect(&s, "w", "w").await;
    watcher.ack(json!({"type":"subscribe","payload":{"user_ids":["ghost"]},"id":1})).await;
    watcher.presence_of("ghost").await;
    // The ghost's client connects and then never reads: it answers no ping, sends nothing.
    let mut ghost = connect(&s, "ghost", "g").await;
    assert_eq!(watcher.presence_of("ghost").await["status"], "online");
    let started = std::time::Instant::now();
    // The watcher keeps itself alive with heartbeats while waiting.
    let offline = loop {
        watcher.send(json!({"type":"heartbeat"})).await;
        let v = tokio::time::timeout(Duration::from_millis(400), watcher.recv()).await;
        if let Ok(v) = v {
            if v["type"] == "presence_update" && v["payload"]["user_id"] == "ghost" {
                break v;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "ghost never expired");
    };
    assert_eq!(offline["payload"]["status"], "offline");
    assert!(started.elapsed() >= Duration::from_millis(1500), "expired before session_ttl: {:?}", started.elapsed());
    // The ghost's socket holds the server's close frame with 4002 (read raw: the client
    // library would first try to answer the queued pings on a closed socket).
    let raw = match ghost.ws.get_mut() {
        MaybeTlsStream::Plain(tcp) => {
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_end(tcp, &mut buf)).await;
            buf
        }
        _ => unreachable!("plain TCP in tests"),
    };
    let code = 4002u16.to_be_bytes();
    assert!(raw.windows(4).any(|w| w[0] == 0x88 && w[2..4] == code), "no close frame with 4002 in {raw:?}");
    s.stop().await;
}

#[tokio::test]
async fn same_device_reconnect_replaces_the_old_connection() {
    let s = TestServer::start(&[]).await;
    let mut watcher = connect(&s, "w", "w").await;
    watcher.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":1})).await;
    watcher.presence_of("alice").await;
    let mut first = connect(&s, "alice", "phone").await;
    assert_eq!(watcher.presence_of("alice").await["status"], "online");
    let _second = connect(&s, "alice", "phone").await;
    assert_eq!(first.closed().await, Some(CloseCode::Library(4001)));
    watcher.silent(400).await; // the user never blinked offline
    assert_eq!(s.get("/api/v2/presence/alice").await.1["data"]["alice"]["device_count"], 1);
    s.stop().await;
}

#[tokio::test]
async fn limits_devices_subscriptions_and_message_rate() {
    let s = TestServer::start(&[
        ("PRESENCE_LIMITS__MAX_DEVICES_PER_USER", "2"),
        ("PRESENCE_LIMITS__MAX_SUBSCRIPTIONS_PER_CONNECTION", "3"),
        ("PRESENCE_LIMITS__WS_MESSAGES_PER_SEC", "1"),
        ("PRESENCE_LIMITS__WS_MESSAGE_BURST", "5"),
    ])
    .await;
    let _d1 = connect(&s, "alice", "d1").await;
    let _d2 = connect(&s, "alice", "d2").await;
    let e = connect_with(&s, "?device_id=d3", &[("authorization", &format!("Bearer {}", s.token("alice")))]).await.err().unwrap();
    assert_eq!(e.0, 429);
    assert_eq!(e.1["code"], "limit_exceeded");
    // Reconnecting an existing device is fine.
    let _d2b = connect(&s, "alice", "d2").await;

    let mut c = connect(&s, "bob", "b").await;
    let e = c.ack(json!({"type":"subscribe","payload":{"user_ids":["a","b","c","d"]},"id":1})).await;
    assert_eq!(e["payload"]["code"], "limit_exceeded");
    assert_eq!(c.ack(json!({"type":"subscribe","payload":{"user_ids":["a","b","c"]},"id":2})).await["type"], "ack");
    let mut codes = Vec::new();
    for i in 0..6 {
        let m = c.ack(json!({"type":"heartbeat","id":100 + i})).await;
        codes.push(m["payload"]["code"].as_str().unwrap_or("ack").to_string());
    }
    assert!(codes.contains(&"rate_limited".to_string()), "{codes:?}");
    s.stop().await;
}

#[tokio::test]
async fn slow_consumer_gets_coalesced_latest_state() {
    let s = TestServer::start(&[("PRESENCE_STORE__PERSIST", "false")]).await;
    let mut slow = connect(&s, "slow", "s").await;
    let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    slow.ack(json!({"type":"subscribe","payload":{"user_ids":users},"id":1})).await;
    // 20 users × 2000 changes while the client reads nothing (≈ 12 MB if sent one by one).
    let store = s.svc.store.clone();
    let statuses = [presenced::core::Status::Busy, presenced::core::Status::Away];
    for round in 0..2000 {
        for u in &users {
            let id = UserId::parse(u, 64).unwrap();
            let msg = format!("round {round} {}", "x".repeat(200));
            store.set_status(&id, SetStatus { status: statuses[round % 2], message: msg.into(), ttl_ms: None }).await.unwrap();
        }
    }
    for u in &users {
        let id = UserId::parse(u, 64).unwrap();
        store.set_status(&id, SetStatus { status: presenced::core::Status::Online, message: "final".into(), ttl_ms: None }).await.unwrap();
    }
    // Reading now, every user's final state arrives, and far fewer than 40k messages do.
    let mut last = std::collections::HashMap::new();
    let mut received = 0;
    while last.len() < users.len() || last.values().any(|m: &String| m != "final") {
        let p = slow.presence_of_any().await;
        received += 1;
        last.insert(p["user_id"].as_str().unwrap().to_string(), p["message"].as_str().unwrap_or("").to_string());
    }
    assert!(received < 40_000, "coalescing should drop stale states, got {received}");
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let coalesced: f64 =
        metrics.lines().find(|l| l.starts_with("ws_coalesced_total")).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0);
    assert!(coalesced > 0.0, "no coalescing recorded:\n{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn slow_consumer_over_its_queue_is_closed_1013() {
    let s = TestServer::start(&[("PRESENCE_STORE__PERSIST", "false"), ("PRESENCE_LIMITS__WS_OUTBOUND_QUEUE", "8")]).await;
    let mut slow = connect(&s, "slow", "s").await;
    let users: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
    slow.ack(json!({"type":"subscribe","payload":{"user_ids":users},"id":1})).await;
    let store = s.svc.store.clone();
    for round in 0..1000 {
        for u in &users {
            let id = UserId::parse(u, 64).unwrap();
            let msg = format!("round {round} {}", "x".repeat(200));
            store.set_status(&id, SetStatus { status: presenced::core::Status::Busy, message: msg.into(), ttl_ms: None }).await.unwrap();
        }
    }
    assert_eq!(slow.closed().await, Some(CloseCode::Again));
    s.stop().await;
}

impl Client {
    async fn presence_of_any(&mut self) -> Value {
        self.recv_type("presence_update").await["payload"].clone()
    }
}

#[tokio::test]
async fn legacy_http_endpoints() {
    let s = TestServer::start(&[]).await;
    let t = s.token("alice");
    admin_put(&s, "/api/v2/conversations/c9/members", json!({"members":["alice","bob"]})).await;
    let mut bob = connect(&s, "bob", "b").await;
    bob.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":1})).await;
    bob.presence_of("alice").await;

    // POST /presence
    let r = s
        .client
        .post(s.url("/presence"))
        .bearer_auth(&t)
        .json(&json!({"online_status":"away","custom_status":"Busy"}))
        .send()
        .await
        .unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["alice"]["status"], "away");
    assert_eq!(bob.presence_of("alice").await["message"], "Busy");
    let r = s.client.post(s.url("/presence")).json(&json!({"online_status":"away"})).send().await.unwrap();
    assert_error(&decode(r).await, 401, "unauthorized");
    let r = s.client.post(s.url("/presence")).bearer_auth(&t).json(&json!({"online_status":"nap"})).send().await.unwrap();
    assert_error(&decode(r).await, 400, "bad_request");

    // GET /presence/{user_id}
    let (code, body) = s.get("/presence/alice").await;
    assert_eq!((code, body["data"]["alice"]["status"].as_str()), (200, Some("away")));
    assert_error(&s.get("/presence/never-seen").await, 404, "not_found");

    // POST /presence/bulk
    let r = s.client.post(s.url("/presence/bulk")).json(&json!({"user_ids":["alice","zed"]})).send().await.unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200);
    assert_eq!(body["data"]["zed"]["status"], "offline");
    let r = s.client.post(s.url("/presence/bulk")).body("nope").send().await.unwrap();
    assert_error(&decode(r).await, 400, "bad_request");

    // POST /presence/heartbeat keeps an HTTP-only client online.
    let tz = s.token("zed");
    let r = s.client.post(s.url("/presence/heartbeat")).bearer_auth(&tz).header("x-device-id", "kiosk").send().await.unwrap();
    let (code, body) = decode(r).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["device_id"], "kiosk");
    let z = s.get("/api/v2/presence/zed").await.1;
    assert_eq!((z["data"]["zed"]["status"].as_str(), z["data"]["zed"]["device_count"].as_u64()), (Some("online"), Some(1)));
    let r = s.client.post(s.url("/presence/heartbeat")).send().await.unwrap();
    assert_error(&decode(r).await, 401, "unauthorized");
    // The body's fields follow the documented schema exactly, even where headers win.
    for bad in [
        json!({"platform": ""}),
        json!({"platform": "Mobile"}),
        json!({"platform": " web"}),
        json!({"device_id": "bad id"}),
        json!({"device_id": ""}),
    ] {
        let r = s.client.post(s.url("/presence/heartbeat")).bearer_auth(&tz).json(&bad).send().await.unwrap();
        assert_error(&decode(r).await, 400, "bad_request");
        let r = s
            .client
            .post(s.url("/presence/heartbeat"))
            .bearer_auth(&tz)
            .header("x-device-id", "kiosk")
            .header("x-device-platform", "web")
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_error(&decode(r).await, 400, "bad_request");
    }
    let r = s
        .client
        .post(s.url("/presence/heartbeat"))
        .bearer_auth(&tz)
        .json(&json!({"device_id": "tablet", "platform": "mobile"}))
        .send()
        .await
        .unwrap();
    assert_eq!(decode(r).await.1["data"]["device_id"], "tablet");
    let z = s.get("/api/v2/presence/zed").await.1;
    assert!(
        z["data"]["zed"]["devices"]
            .as_array()
            .is_some_and(|d| d.contains(&json!({"device_id":"tablet","platform":"mobile","active":true}))),
        "{z}"
    );

    // POST /presence/typing
    let r = s
        .client
        .post(s.url("/presence/typing"))
        .bearer_auth(&t)
        .json(&json!({"conversation_id":"c9","is_typing":true}))
        .send()
        .await
        .unwrap();
    assert_eq!(decode(r).await.0, 200);
    assert_eq!(bob.recv_type("typing_indicator").await["payload"]["user_id"], "alice");
    let r = s
        .client
        .post(s.url("/presence/typing"))
        .bearer_auth(s.token("mallory"))
        .json(&json!({"conversation_id":"c9","is_typing":true}))
        .send()
        .await
        .unwrap();
    assert_error(&decode(r).await, 403, "forbidden");
    let r = s.client.post(s.url("/presence/typing")).bearer_auth(&t).json(&json!({"conversation_id":"c9"})).send().await.unwrap();
    assert_error(&decode(r).await, 400, "bad_request");
    s.stop().await;
}

#[tokio::test]
async fn ws_metrics_are_exported() {
    let s = TestServer::start(&[]).await;
    let mut a = connect(&s, "alice", "a").await;
    a.ack(json!({"type":"subscribe","payload":{"user_ids":["bob"]},"id":1})).await;
    let _b = connect(&s, "bob", "b").await;
    a.presence_of("bob").await;
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in ["ws_connections 2", "ws_subscriptions 1", "ws_messages_in_total", "ws_messages_out_total", "ws_fanout_seconds_bucket"] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    s.stop().await;
}
