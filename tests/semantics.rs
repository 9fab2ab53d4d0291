//! Presence semantics clients rely on, over real sockets with real clients: the last
//! device gone means offline (an explicit status is a preference), device changes reach
//! watchers, connect is deterministic, privacy hides the moment of a change (WebSocket,
//! gRPC, typing), and the races found by reading the code (reconnect of the same device,
//! concurrent registrations past the device limit, a hub that falls behind the bus).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::wsclient::{connect, connect_with, Client};
use common::{decode, TestServer};
use presenced::bus::EventBus;
use presenced::clock::SystemClock;
use presenced::core::{Ending, Millis, NewSession, Presence, Registered, Session, Status, UserId};
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use presenced::grpc::pb::presence_event::Kind;
use presenced::store::memory::{MemoryConfig, MemoryStore};
use presenced::store::{DirTable, DirectoryStore, PresenceStore, SetStatus, StoreError, StoreStats};
use serde_json::{json, Value};
use tonic::Request;

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn admin_put(s: &TestServer, path: &str, body: Value) {
    let r = s.client.put(s.url(path)).bearer_auth(s.admin_token("backend")).json(&body).send().await.unwrap();
    let (code, b) = decode(r).await;
    assert_eq!(code, 200, "{path}: {b}");
}

async fn rest(s: &TestServer, user: &str, viewer: Option<&str>) -> Value {
    let mut req = s.client.get(s.url(&format!("/api/v2/presence/{user}")));
    if let Some(v) = viewer {
        req = req.bearer_auth(s.token(v));
    }
    decode(req.send().await.unwrap()).await.1["data"][user].clone()
}

/// Every message a client receives within `ms`.
async fn collect(c: &mut Client, ms: u64) -> Vec<Value> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(ms), async {
        while let Some(Ok(m)) = c.ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                out.push(serde_json::from_str(&t).unwrap());
            }
        }
    })
    .await;
    out
}

#[tokio::test]
async fn the_last_device_gone_means_offline_and_the_preference_comes_back() {
    let s = TestServer::start(&[]).await;
    let mut bob = s.watch("bob", &["alice"]).await;
    assert_eq!(bob.next("alice").await["status"], "offline");
    let mut grpc = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let mut stream = grpc
        .watch_presence(pb::WatchPresenceRequest { user_ids: vec!["alice".into()], all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("event in time").unwrap().unwrap();
    assert!(next().await.snapshot);

    // The live page's explicit status while connected: a preference.
    let mut alice = connect(&s, "alice", "laptop").await;
    assert_eq!(bob.next("alice").await["status"], "online");
    assert_eq!(next().await.kind, Kind::UserOnline as i32);
    let ack = alice.ack(json!({"type":"presence_update","payload":{"online_status":"away","custom_status":"lunch"},"id":1})).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(bob.next("alice").await["status"], "away");
    assert_eq!(next().await.presence.unwrap().status, pb::Status::Away as i32);

    // The last device closes: offline everywhere, with last_seen; gRPC says STATUS_OFFLINE.
    drop(alice);
    let p = bob.next("alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_i64()), (Some("offline"), Some(0)), "{p}");
    assert!(p["last_seen"].is_string() && p.get("message").is_none(), "{p}");
    let ev = next().await;
    assert_eq!(ev.kind, Kind::UserOffline as i32);
    assert_eq!(ev.presence.unwrap().status, pb::Status::Offline as i32, "USER_OFFLINE carries STATUS_OFFLINE");
    let r = rest(&s, "alice", None).await;
    assert_eq!((r["status"].as_str(), r["device_count"].as_i64()), (Some("offline"), Some(0)));

    // A device reconnects: the preference (status, message, remaining TTL) applies again.
    let _alice = connect(&s, "alice", "phone").await;
    let p = bob.next("alice").await;
    assert_eq!((p["status"].as_str(), p["message"].as_str()), (Some("away"), Some("lunch")), "{p}");
    assert!(p["ttl"].as_i64().unwrap() > 3000, "{p}");

    // gRPC sessions behave the same.
    let admin = s.admin_token("delivery");
    let reg = pb::RegisterSessionRequest {
        user_id: "dora".into(),
        device_id: "d".into(),
        instance_id: "gw".into(),
        ttl_seconds: 60,
        platform: "web".into(),
        active: None,
    };
    grpc.register_session(authed(reg, &admin)).await.unwrap();
    let set = pb::SetPresenceRequest {
        user_id: "dora".into(),
        status: pb::Status::Busy as i32,
        message: "x".into(),
        ttl_seconds: 0,
        until_changed: true,
    };
    grpc.set_presence(authed(set, &admin)).await.unwrap();
    grpc.unregister_session(authed(
        pb::UnregisterSessionRequest { user_id: "dora".into(), device_id: "d".into(), immediate: true },
        &admin,
    ))
    .await
    .unwrap();
    let r = grpc.get_presence(pb::GetPresenceRequest { user_ids: vec!["dora".into()] }).await.unwrap().into_inner();
    assert_eq!(r.presences[0].status, pb::Status::Offline as i32);

    // Written with no live session at all (a backend's calendar): shown as written, until
    // a device that connects later leaves again.
    let (code, _) = s.put_status("erin", Some(&s.admin_token("calendar")), json!({"status":"busy","message":"meeting"})).await;
    assert_eq!(code, 200);
    assert_eq!(rest(&s, "erin", None).await["status"], "busy");
    let erin = connect(&s, "erin", "phone").await;
    assert_eq!(rest(&s, "erin", None).await["status"], "busy");
    drop(erin);
    common::eventually("erin offline", Duration::from_secs(5), async || rest(&s, "erin", None).await["status"] == "offline").await;
    s.stop().await;
}

#[tokio::test]
async fn connect_sends_connected_first_and_the_own_presence_exactly_once() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__CONNECTIONS_PER_IP_PER_SEC", "0")]).await;
    admin_put(&s, "/api/v2/contacts/carol", json!({"contacts":["alice"]})).await;
    for i in 0..25 {
        let device = format!("d{i}");
        let mut c = connect_with(&s, &format!("?device_id={device}&token={}", s.token("alice")), &[]).await.expect("handshake");
        let got = collect(&mut c, 150).await;
        assert_eq!(got.first().map(|m| m["type"].clone()), Some(json!("connected")), "round {i}: {got:?}");
        let own: Vec<&Value> = got.iter().filter(|m| m["type"] == "presence_update" && m["payload"]["user_id"] == "alice").collect();
        assert_eq!(own.len(), 1, "round {i}: own presence exactly once: {got:?}");
        assert_eq!(own[0]["payload"]["device_count"], 1);
        let carol: Vec<&Value> = got.iter().filter(|m| m["payload"]["user_id"] == "carol").collect();
        assert_eq!(carol.len(), 1, "round {i}: the user whose contact alice is: {got:?}");
        drop(c);
        common::eventually("gone", Duration::from_secs(5), async || rest(&s, "alice", None).await["device_count"] == 0).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn privacy_hides_the_moment_of_a_change_on_websocket_grpc_and_typing() {
    let s = TestServer::start(&[]).await;
    admin_put(&s, "/api/v2/contacts/alice", json!({"contacts":["bob"]})).await;
    admin_put(&s, "/api/v2/conversations/c1/members", json!({"members":["alice","bob","carol"]})).await;
    let set_privacy = async |visibility: &str| {
        let r = s
            .client
            .put(s.url("/api/v2/presence/alice/privacy"))
            .bearer_auth(s.token("alice"))
            .json(&json!({"visibility": visibility}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    set_privacy("contacts").await;
    // carol, a stranger, watches alice on both transports; bob is a contact.
    let mut carol_ws = connect(&s, "carol", "c").await;
    carol_ws.ack(json!({"type":"subscribe","payload":{"user_ids":["alice"]},"id":"s"})).await;
    assert_eq!(carol_ws.presence_of("alice").await["status"], "offline");
    let mut bob_ws = connect(&s, "bob", "b").await;
    assert_eq!(bob_ws.presence_of("alice").await["status"], "offline", "the snapshot of a user bob is a contact of");
    let mut grpc = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let mut carol_grpc = grpc
        .watch_presence(authed(
            pb::WatchPresenceRequest { user_ids: vec!["alice".into()], all: false, conversation_ids: vec![] },
            &s.token("carol"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(carol_grpc.message().await.unwrap().unwrap().snapshot);

    // alice comes, changes status, types, goes: bob is told; carol learns nothing, not even when.
    let mut alice = connect(&s, "alice", "phone").await;
    assert_eq!(bob_ws.presence_of("alice").await["status"], "online");
    alice.ack(json!({"type":"presence_update","payload":{"online_status":"busy"},"id":1})).await;
    assert_eq!(bob_ws.presence_of("alice").await["status"], "busy");
    alice.ack(json!({"type":"typing","payload":{"conversation_id":"c1","is_typing":true},"id":2})).await;
    assert_eq!(bob_ws.recv_type("typing_indicator").await["payload"]["user_id"], "alice");
    drop(alice);
    assert_eq!(bob_ws.presence_of("alice").await["status"], "offline");
    carol_ws.silent(400).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), carol_grpc.message()).await.is_err(), "no gRPC event for carol");

    // Invisible: nobody but alice learns anything, contacts included.
    set_privacy("nobody").await;
    bob_ws.settle(200).await;
    let mut alice = connect(&s, "alice", "phone").await;
    alice.ack(json!({"type":"typing","payload":{"conversation_id":"c1","is_typing":true},"id":3})).await;
    drop(alice);
    bob_ws.silent(400).await;
    carol_ws.silent(100).await;
    assert!(tokio::time::timeout(Duration::from_millis(200), carol_grpc.message()).await.is_err());
    s.stop().await;
}

#[tokio::test]
async fn appearing_offline_hides_devices_times_typing_and_the_moment() {
    let s = TestServer::start(&[]).await;
    admin_put(&s, "/api/v2/contacts/alice", json!({"contacts":["bob"]})).await;
    admin_put(&s, "/api/v2/conversations/c1/members", json!({"members":["alice","bob"]})).await;
    let mut bob = connect(&s, "bob", "b").await;
    assert_eq!(bob.presence_of("alice").await["status"], "offline");
    let mut alice = connect(&s, "alice", "phone").await;
    assert_eq!(bob.presence_of("alice").await["status"], "online");
    alice.ack(json!({"type":"presence_update","payload":{"online_status":"offline"},"id":1})).await;
    let p = bob.presence_of("alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_i64(), p["last_seen"].clone()), (Some("offline"), Some(0), Value::Null));
    assert_eq!(p["devices"], json!([]));
    // She keeps using the service: a second device, typing, leaving. Bob sees nothing.
    let laptop = connect(&s, "alice", "laptop").await;
    alice.ack(json!({"type":"typing","payload":{"conversation_id":"c1","is_typing":true},"id":2})).await;
    drop(laptop);
    bob.silent(400).await;
    let r = rest(&s, "alice", Some("bob")).await;
    assert_eq!((r["status"].as_str(), r["device_count"].as_i64(), r["last_seen"].clone()), (Some("offline"), Some(0), Value::Null));
    // Alice herself sees the truth.
    let own = rest(&s, "alice", Some("alice")).await;
    assert_eq!((own["status"].as_str(), own["device_count"].as_i64()), (Some("offline"), Some(1)));
    s.stop().await;
}

/// A store whose session calls are slow, as over a network: an old connection's goodbye
/// lands after a new connection of the same device registered; registrations overlap.
struct Slow {
    inner: MemoryStore,
    register: Duration,
    unregister: Duration,
}

impl Slow {
    fn around(register_ms: u64, unregister_ms: u64) -> (Arc<Slow>, EventBus) {
        let bus = EventBus::new(1024);
        let inner = MemoryStore::open(MemoryConfig::new("test-node"), Arc::new(SystemClock), bus.clone()).unwrap();
        inner.start();
        (Arc::new(Slow { inner, register: Duration::from_millis(register_ms), unregister: Duration::from_millis(unregister_ms) }), bus)
    }
}

#[async_trait]
impl PresenceStore for Slow {
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.inner.get_many(ids).await
    }

    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError> {
        self.inner.set_status(id, req).await
    }

    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError> {
        self.inner.clear_status(id).await
    }

    async fn erase(&self, id: &UserId) -> Result<bool, StoreError> {
        self.inner.erase(id).await
    }

    async fn register_session(&self, id: &UserId, req: NewSession) -> Result<Registered, StoreError> {
        tokio::time::sleep(self.register).await;
        self.inner.register_session(id, req).await
    }

    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        self.inner.refresh_session(id, device).await
    }

    async fn end_session(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError> {
        tokio::time::sleep(self.unregister).await;
        self.inner.end_session(id, device, sid, ending).await
    }

    async fn set_activity(
        &self,
        id: &UserId,
        device: &str,
        sid: Option<u64>,
        activity: presenced::core::Activity,
        reassert: bool,
    ) -> Result<bool, StoreError> {
        self.inner.set_activity(id, device, sid, activity, reassert).await
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        self.inner.devices(id).await
    }

    async fn sessions_of_instance(&self, instance: &str) -> Result<Vec<(UserId, Session)>, StoreError> {
        self.inner.sessions_of_instance(instance).await
    }

    async fn rebind_session(&self, id: &UserId, device: &str, sid: u64, ttl_ms: i64) -> Result<bool, StoreError> {
        self.inner.rebind_session(id, device, sid, ttl_ms).await
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[async_trait]
impl DirectoryStore for Slow {
    async fn put_directory(&self, t: DirTable, k: &str, v: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.inner.put_directory(t, k, v).await
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        self.inner.load_directory().await
    }
}

#[tokio::test]
async fn a_reconnecting_device_is_not_taken_offline_by_its_old_connection() {
    let (store, bus) = Slow::around(0, 400);
    let s = TestServer::with_store_and_bus(&[], store, bus).await;
    let mut watcher = s.watch("bob", &["alice"]).await;
    assert_eq!(watcher.next("alice").await["status"], "offline");
    let old = connect(&s, "alice", "phone").await;
    assert_eq!(watcher.next("alice").await["status"], "online");
    drop(old); // the server starts ending the old session (slowly)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _new = connect(&s, "alice", "phone").await; // the app reconnects at once
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = rest(&s, "alice", None).await;
    assert_eq!((r["status"].as_str(), r["device_count"].as_i64()), (Some("online"), Some(1)), "the new connection's session survives: {r}");
    s.stop().await;
}

/// `n` devices of `user` connecting at once; the connections that got in (the others
/// must have been refused with 429).
async fn connect_devices_at_once(s: &Arc<TestServer>, user: &str, n: usize) -> Vec<Client> {
    let tries: Vec<_> = (0..n)
        .map(|i| {
            let (s, user) = (s.clone(), user.to_string());
            tokio::spawn(async move {
                let auth = format!("Bearer {}", s.token(&user));
                connect_with(&s, &format!("?device_id=d{i}"), &[("authorization", &auth)]).await.map_err(|r| r.0)
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tries {
        match t.await.unwrap() {
            Ok(c) => open.push(c),
            Err(code) => assert_eq!(code, 429),
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_never_pass_the_device_limit() {
    let s = Arc::new(
        TestServer::start(&[("PRESENCE_LIMITS__MAX_DEVICES_PER_USER", "3"), ("PRESENCE_LIMITS__CONNECTIONS_PER_IP_PER_SEC", "0")]).await,
    );
    let open = connect_devices_at_once(&s, "alice", 16).await;
    assert_eq!(open.len(), 3);
    assert_eq!(rest(&s, "alice", Some("alice")).await["device_count"], 3);
    // gRPC registrations share the limit, atomically too.
    let mut grpc = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let admin = s.admin_token("svc");
    let calls = (0..10).map(|i| {
        let mut g = grpc.clone();
        let admin = admin.clone();
        async move {
            let reg = pb::RegisterSessionRequest {
                user_id: "gina".into(),
                device_id: format!("g{i}"),
                instance_id: "gw".into(),
                ttl_seconds: 60,
                platform: String::new(),
                active: None,
            };
            g.register_session(authed(reg, &admin)).await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert!(results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.code() == tonic::Code::ResourceExhausted));
    let r = grpc.get_presence(pb::GetPresenceRequest { user_ids: vec!["gina".into()] }).await.unwrap().into_inner();
    assert_eq!(r.presences[0].device_count, 3);
    drop(open);
}

/// The limit was checked before the upgrade and the session registered after it: with a
/// store that answers in 100 ms (a network hop), ten devices got in with a limit of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_through_a_slow_store_never_pass_the_device_limit() {
    let (store, bus) = Slow::around(100, 0);
    let env = [("PRESENCE_LIMITS__MAX_DEVICES_PER_USER", "3"), ("PRESENCE_LIMITS__CONNECTIONS_PER_IP_PER_SEC", "0")];
    let s = Arc::new(TestServer::with_store_and_bus(&env, store, bus).await);
    let open = connect_devices_at_once(&s, "alice", 10).await;
    assert_eq!(open.len(), 3);
    assert_eq!(s.svc.store.devices(&UserId::parse("alice", 64).unwrap()).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_hub_that_falls_behind_the_bus_resends_what_its_watchers_watch() {
    // A bus that holds 4 events, and 200 changes published without a pause: the hub lags.
    let s = TestServer::start(&[("PRESENCE_LIMITS__EVENT_BUS_CAPACITY", "4"), ("PRESENCE_STORE__PERSIST", "false")]).await;
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let mut c = connect(&s, "viewer", "v").await;
    c.ack(json!({"type":"subscribe","payload":{"user_ids": users},"id":"s"})).await;
    for u in &users {
        let id = UserId::parse(u, 64).unwrap();
        s.svc
            .store
            .set_status(&id, SetStatus { status: Status::Away, message: Arc::from(format!("final-{u}")), ttl_ms: None })
            .await
            .unwrap();
    }
    let mut last = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while last.values().filter(|m: &&String| m.starts_with("final-")).count() < users.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher missed changes: {} of {} final",
            last.values().filter(|m: &&String| m.starts_with("final-")).count(),
            users.len()
        );
        let m = c.recv_type("presence_update").await;
        last.insert(m["payload"]["user_id"].as_str().unwrap().to_string(), m["payload"]["message"].as_str().unwrap_or("").to_string());
    }
    for u in &users {
        assert_eq!(last[u], format!("final-{u}"));
    }
    s.stop().await;
}
