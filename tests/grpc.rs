//! `realchat.presence.v1.PresenceApi` over a real socket with a real tonic client: every
//! RPC and error code, cross-transport visibility, expiry on WatchPresence, health and
//! reflection (including a generic client that has no proto file).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use presenced::grpc::pb::presence_event::Kind;
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn client(s: &TestServer) -> PresenceApiClient<Channel> {
    PresenceApiClient::connect(s.grpc.clone()).await.expect("grpc connect")
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn register(user: &str, device: &str, instance: &str, ttl: u32) -> pb::RegisterSessionRequest {
    pb::RegisterSessionRequest {
        user_id: user.into(),
        device_id: device.into(),
        instance_id: instance.into(),
        ttl_seconds: ttl,
        platform: String::new(),
        active: None,
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn get_presence_reads_batches_with_privacy_and_validates() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__MAX_BATCH_IDS", "3")]).await;
    let mut c = client(&s).await;
    s.put_status("alice", Some(&s.token("alice")), json!({"status":"busy","message":"deep work"})).await;
    let r = c.get_presence(pb::GetPresenceRequest { user_ids: vec!["alice".into(), "ghost".into()] }).await.unwrap().into_inner();
    assert_eq!(r.presences.len(), 2);
    assert_eq!(r.presences[0].status, pb::Status::Busy as i32);
    assert_eq!(r.presences[0].message, "deep work");
    assert!(r.presences[0].updated_at.is_some() && r.presences[0].expires_at.is_some());
    assert_eq!(r.presences[1].status, pb::Status::Offline as i32);
    assert!(r.presences[1].last_seen.is_none());
    for ids in [vec![], vec!["a".to_string(), "b".into(), "c".into(), "d".into()], vec!["bad id".to_string()]] {
        let e = c.get_presence(pb::GetPresenceRequest { user_ids: ids }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(!e.message().is_empty());
    }
    // Privacy: anonymous readers see what everyone may see; the owner sees everything.
    s.client
        .put(s.url("/api/v2/presence/alice/privacy"))
        .bearer_auth(s.token("alice"))
        .json(&json!({"visibility":"nobody"}))
        .send()
        .await
        .unwrap();
    let anon = c.get_presence(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }).await.unwrap().into_inner();
    assert_eq!(anon.presences[0].status, pb::Status::Offline as i32);
    let own =
        c.get_presence(authed(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }, &s.token("alice"))).await.unwrap().into_inner();
    assert_eq!(own.presences[0].status, pb::Status::Busy as i32);
    let e = c.get_presence(authed(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }, "garbage")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    s.stop().await;
}

#[tokio::test]
async fn sessions_over_grpc_are_seen_by_rest_and_websocket() {
    let s = TestServer::start(&[]).await;
    let mut c = client(&s).await;
    let admin = s.admin_token("delivery-service");
    // A WebSocket subscriber of alice.
    let mut watcher = s.watch("watcher", &["alice"]).await;
    assert_eq!(watcher.next("alice").await["status"], "offline");

    let r = c.register_session(authed(register("alice", "phone", "gw-1", 60), &admin)).await.unwrap().into_inner();
    assert!(r.created);
    let exp = r.expires_at.unwrap().seconds;
    assert!((exp - now_s() - 60).abs() <= 2, "expires_at ≈ now + 60s");
    assert_eq!(watcher.next("alice").await["status"], "online");
    let rest = s.get("/api/v2/presence/alice").await.1;
    assert_eq!(rest["data"]["alice"]["status"], "online");
    assert_eq!(rest["data"]["alice"]["device_count"], 1);

    // Same device again: replaced. Second device on another instance.
    assert!(!c.register_session(authed(register("alice", "phone", "gw-1", 60), &admin)).await.unwrap().into_inner().created);
    assert!(c.register_session(authed(register("alice", "laptop", "gw-2", 0), &admin)).await.unwrap().into_inner().created);
    let devices =
        c.get_user_devices(authed(pb::GetUserDevicesRequest { user_id: "alice".into() }, &admin)).await.unwrap().into_inner().devices;
    let mut pairs: Vec<(String, String)> = devices.iter().map(|d| (d.device_id.clone(), d.instance_id.clone())).collect();
    pairs.sort();
    assert_eq!(pairs, vec![("laptop".into(), "gw-2".into()), ("phone".into(), "gw-1".into())]);
    assert!(devices.iter().all(|d| d.connected_at.is_some() && d.last_seen.is_some() && d.expires_at.is_some()));
    // The user may list their own devices; someone else may not.
    assert_eq!(
        c.get_user_devices(authed(pb::GetUserDevicesRequest { user_id: "alice".into() }, &s.token("alice")))
            .await
            .unwrap()
            .into_inner()
            .devices
            .len(),
        2
    );
    let e = c.get_user_devices(authed(pb::GetUserDevicesRequest { user_id: "alice".into() }, &s.token("bob"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Refresh extends; unregister the first device: still online; the last: offline.
    let before = exp;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refreshed = c
        .refresh_session(authed(
            pb::RefreshSessionRequest { user_id: "alice".into(), device_id: "phone".into(), active: None, idle_since: None },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(refreshed.expires_at.unwrap().seconds > before);
    assert!(
        c.unregister_session(authed(
            pb::UnregisterSessionRequest { user_id: "alice".into(), device_id: "phone".into(), immediate: true },
            &admin
        ))
        .await
        .unwrap()
        .into_inner()
        .removed
    );
    assert_eq!(s.get("/api/v2/presence/alice").await.1["data"]["alice"]["status"], "online");
    let p = watcher.until("alice", |p| p["device_count"] == 1).await;
    assert_eq!(p["status"], "online", "one device fewer is pushed: {p}");
    assert!(
        c.unregister_session(authed(
            pb::UnregisterSessionRequest { user_id: "alice".into(), device_id: "laptop".into(), immediate: true },
            &admin
        ))
        .await
        .unwrap()
        .into_inner()
        .removed
    );
    assert_eq!(watcher.next("alice").await["status"], "offline");
    assert!(
        !c.unregister_session(authed(
            pb::UnregisterSessionRequest { user_id: "alice".into(), device_id: "laptop".into(), immediate: true },
            &admin
        ))
        .await
        .unwrap()
        .into_inner()
        .removed
    );
    let e = c
        .refresh_session(authed(
            pb::RefreshSessionRequest { user_id: "alice".into(), device_id: "laptop".into(), active: None, idle_since: None },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    s.stop().await;
}

#[tokio::test]
async fn session_rpcs_need_the_admin_scope_and_valid_input() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__MAX_DEVICES_PER_USER", "1")]).await;
    let mut c = client(&s).await;
    let admin = s.admin_token("svc");
    let e = c.register_session(register("alice", "d", "i", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c.register_session(authed(register("alice", "d", "i", 0), &s.token("alice"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("presence:admin"), "{}", e.message());
    let e = c
        .refresh_session(authed(
            pb::RefreshSessionRequest { user_id: "alice".into(), device_id: "d".into(), active: None, idle_since: None },
            &s.token("alice"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .unregister_session(Request::new(pb::UnregisterSessionRequest { user_id: "alice".into(), device_id: "d".into(), immediate: true }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    for bad in [
        register("", "d", "i", 0),
        register("alice", "", "i", 0),
        register("alice", "d d", "i", 0),
        register("alice", "d", "i/x", 0),
        register("alice", "d", "i", 10 * 86_400),
    ] {
        let e = c.register_session(authed(bad.clone(), &admin)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
    }
    c.register_session(authed(register("alice", "d1", "i", 0), &admin)).await.unwrap();
    let e = c.register_session(authed(register("alice", "d2", "i", 0), &admin)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    s.stop().await;
}

#[tokio::test]
async fn set_presence_permissions_validation_and_rate_limit() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__WRITE_RATE_PER_SEC", "1"), ("PRESENCE_LIMITS__WRITE_BURST", "2")]).await;
    let mut c = client(&s).await;
    let req = |status: pb::Status, ttl: u32, until_changed: bool| pb::SetPresenceRequest {
        user_id: "alice".into(),
        status: status as i32,
        message: "on a call".into(),
        ttl_seconds: ttl,
        until_changed,
    };
    let p = c.set_presence(authed(req(pb::Status::Busy, 120, false), &s.token("alice"))).await.unwrap().into_inner();
    assert_eq!((p.status, p.message.as_str()), (pb::Status::Busy as i32, "on a call"));
    assert!((p.expires_at.unwrap().seconds - now_s() - 120).abs() <= 2);
    assert_eq!(s.get("/api/v2/presence/alice").await.1["data"]["alice"]["status"], "busy");
    let p = c.set_presence(authed(req(pb::Status::Away, 0, true), &s.token("alice"))).await.unwrap().into_inner();
    assert!(p.expires_at.is_none(), "until_changed has no expiry");
    let e = c.set_presence(authed(req(pb::Status::Away, 0, false), &s.token("alice"))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "burst of 2 spent");
    let e = c.set_presence(authed(req(pb::Status::Busy, 0, false), &s.token("mallory"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c.set_presence(req(pb::Status::Busy, 0, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut bad = req(pb::Status::Unspecified, 0, false);
    bad.user_id = "bob".into();
    let e = c.set_presence(authed(bad, &s.admin_token("svc"))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bob = req(pb::Status::Online, 0, false);
    bob.user_id = "bob".into();
    assert!(c.set_presence(authed(bob, &s.admin_token("svc"))).await.is_ok(), "admin may set anyone");
    s.stop().await;
}

#[tokio::test]
async fn watch_presence_snapshot_then_changes_and_ttl_expiry_is_user_offline() {
    let s = TestServer::start(&[]).await;
    let mut c = client(&s).await;
    let admin = s.admin_token("svc");
    let mut stream = c
        .watch_presence(pb::WatchPresenceRequest { user_ids: vec!["carol".into()], all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("event in time").unwrap().expect("open");
    let snap = next().await;
    assert!(snap.snapshot);
    assert_eq!(snap.presence.as_ref().unwrap().status, pb::Status::Offline as i32);
    c.register_session(authed(register("carol", "phone", "gw-1", 1), &admin)).await.unwrap();
    let online = next().await;
    assert_eq!((online.kind, online.snapshot), (Kind::UserOnline as i32, false));
    assert!(online.at.is_some());
    // Not refreshed: the session lapses after its 1 s TTL.
    let offline = next().await;
    assert_eq!(offline.kind, Kind::UserOffline as i32);
    assert_eq!(offline.presence.unwrap().status, pb::Status::Offline as i32);
    let e = c
        .refresh_session(authed(
            pb::RefreshSessionRequest { user_id: "carol".into(), device_id: "phone".into(), active: None, idle_since: None },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "an expired session must be registered again");
    // An explicit status with a TTL expires with PRESENCE_EXPIRED.
    c.set_presence(authed(
        pb::SetPresenceRequest {
            user_id: "carol".into(),
            status: pb::Status::Busy as i32,
            message: String::new(),
            ttl_seconds: 1,
            until_changed: false,
        },
        &s.token("carol"),
    ))
    .await
    .unwrap();
    assert_eq!(next().await.kind, Kind::PresenceUpdated as i32);
    assert_eq!(next().await.kind, Kind::PresenceExpired as i32);
    s.stop().await;
}

#[tokio::test]
async fn watch_all_needs_admin_and_sees_everyone() {
    let s = TestServer::start(&[]).await;
    let mut c = client(&s).await;
    let e = c.watch_presence(pb::WatchPresenceRequest { user_ids: vec![], all: true, conversation_ids: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .watch_presence(authed(pb::WatchPresenceRequest { user_ids: vec![], all: true, conversation_ids: vec![] }, &s.token("alice")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c.watch_presence(pb::WatchPresenceRequest { user_ids: vec![], all: false, conversation_ids: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut all = c
        .watch_presence(authed(pb::WatchPresenceRequest { user_ids: vec![], all: true, conversation_ids: vec![] }, &s.admin_token("svc")))
        .await
        .unwrap()
        .into_inner();
    for u in ["u1", "u2", "u3"] {
        s.put_status(u, Some(&s.token(u)), json!({"status":"away"})).await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), all.message()).await.unwrap().unwrap().unwrap();
        seen.push(ev.presence.unwrap().user_id);
    }
    assert_eq!(seen, vec!["u1", "u2", "u3"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watch_reader_is_coalesced_to_the_latest_state() {
    let s = TestServer::start(&[("PRESENCE_STORE__PERSIST", "false")]).await;
    let mut c = client(&s).await;
    let users: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    let mut stream = c
        .watch_presence(pb::WatchPresenceRequest { user_ids: users.clone(), all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let store = s.svc.store.clone();
    // ≈ 18 MB of events while the reader reads nothing: far over the HTTP/2 windows.
    for round in 0..3000 {
        for u in &users {
            let id = presenced::core::UserId::parse(u, 64).unwrap();
            let status = if round % 2 == 0 { presenced::core::Status::Busy } else { presenced::core::Status::Away };
            store
                .set_status(
                    &id,
                    presenced::store::SetStatus { status, message: Arc::from(format!("r{round} {}", "x".repeat(500))), ttl_ms: None },
                )
                .await
                .unwrap();
        }
    }
    for u in &users {
        let id = presenced::core::UserId::parse(u, 64).unwrap();
        store
            .set_status(
                &id,
                presenced::store::SetStatus { status: presenced::core::Status::Online, message: Arc::from("final"), ttl_ms: None },
            )
            .await
            .unwrap();
    }
    let mut last = std::collections::HashMap::new();
    let mut received = 0;
    while last.len() < users.len() || last.values().any(|m: &String| m != "final") {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("events").unwrap().expect("open");
        received += 1;
        let p = ev.presence.unwrap();
        last.insert(p.user_id, p.message);
    }
    eprintln!("slow reader received {received} of 30020 events");
    assert!(received < 30_000, "coalescing keeps only the newest state per user: {received}");
    s.stop().await;
}

#[tokio::test]
async fn store_down_is_unavailable() {
    let s = TestServer::with_store(&[], Arc::new(common::DownStore)).await;
    let mut c = client(&s).await;
    let e = c.get_presence(pb::GetPresenceRequest { user_ids: vec!["a".into()] }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let e = c.register_session(authed(register("a", "d", "i", 0), &s.admin_token("svc"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    s.stop().await;
}

#[tokio::test]
async fn health_serving_reflection_lists_and_metrics_count_calls() {
    let s = TestServer::start(&[]).await;
    let channel = Channel::from_shared(s.grpc.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "realchat.presence.v1.PresenceApi".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"realchat.presence.v1.PresenceApi".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");

    let mut c = client(&s).await;
    let (ok, bad) =
        (r#"grpc_requests_total{method="GetPresence",code="OK"}"#, r#"grpc_requests_total{method="GetPresence",code="INVALID_ARGUMENT"}"#);
    let before = s.scrape().await;
    c.get_presence(pb::GetPresenceRequest { user_ids: vec!["a".into()] }).await.unwrap();
    let _ = c.get_presence(pb::GetPresenceRequest { user_ids: vec![] }).await;
    let text = s.scrape().await;
    // Counted by method and code (compared with a scrape before: `cargo test` runs other
    // tests in this process).
    assert!(common::sample(&text, ok) - common::sample(&before, ok) >= 1.0, "{text}");
    assert!(common::sample(&text, bad) - common::sample(&before, bad) >= 1.0, "{text}");
    s.stop().await;
}

/// A generic client with no proto file: Python's grpcio-reflection discovers the service,
/// builds the message types from the server's descriptors and calls GetPresence.
#[tokio::test]
async fn generic_client_through_reflection_alone() {
    let s = TestServer::start(&[]).await;
    s.put_status("alice", Some(&s.token("alice")), json!({"status":"away","message":"lunch"})).await;
    let script = common::source::source_root().join("tests/reflection_client.py");
    let target = s.grpc.trim_start_matches("http://").to_string();
    let out = tokio::process::Command::new("python3").arg(script).arg(&target).arg("alice").output().await.expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reflection client failed (pip install grpcio grpcio-reflection protobuf; .ci/run does):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v["services"].as_array().unwrap().iter().any(|x| x == "realchat.presence.v1.PresenceApi"), "{v}");
    assert_eq!(v["response"]["presences"][0]["userId"], "alice");
    assert_eq!(v["response"]["presences"][0]["status"], "STATUS_AWAY");
    assert_eq!(v["response"]["presences"][0]["message"], "lunch");
    s.stop().await;
}
