//! Gateway instance leases and batch session calls (seed 001's gateway model), over a
//! real gRPC socket and over REST: one refresh keeps every bound session alive; a lease
//! that lapses ends them all, with exactly one offline event per user; a clean shutdown
//! ends them at once; in cluster mode a refresh is one store write, wherever it lands.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::engine::Engine;
use common::TestServer;
use presenced::core::{Event, EventKind};
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use serde_json::json;
use tokio::sync::broadcast;
use tonic::transport::Channel;
use tonic::Code;

async fn client(s: &TestServer) -> PresenceApiClient<Channel> {
    PresenceApiClient::connect(s.grpc.clone()).await.expect("grpc connect")
}

fn entries(users: std::ops::Range<usize>, device: &str) -> Vec<pb::SessionEntry> {
    users.map(|i| pb::SessionEntry { user_id: format!("u{i}"), device_id: device.into(), platform: "mobile".into() }).collect()
}

fn batch(instance: &str, sessions: Vec<pb::SessionEntry>) -> pb::RegisterSessionsRequest {
    pb::RegisterSessionsRequest { instance_id: instance.into(), ttl_seconds: 0, sessions }
}

fn refresh(instance: &str, ttl_seconds: u32) -> pb::RefreshInstanceRequest {
    pb::RefreshInstanceRequest { instance_id: instance.into(), ttl_seconds }
}

/// Counts user_offline events by user until `quiet` passes with none, or `within` ends.
async fn offline_events(rx: &mut broadcast::Receiver<std::sync::Arc<Event>>, expect: usize, within: Duration) -> HashMap<String, u32> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + within;
    let mut total = 0;
    loop {
        // After the expected count, keep listening a little: a duplicate would show here.
        let wait = if total >= expect { Duration::from_millis(700) } else { deadline.saturating_duration_since(Instant::now()) };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Ok(e)) if e.kind == EventKind::UserOffline => {
                *seen.entry(e.presence.user_id.to_string()).or_default() += 1;
                total += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("lost {n} events: the test must read faster"),
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return seen,
        }
    }
}

/// 10,000 sessions over two `RegisterSessions` calls, kept alive by refreshing the instance
/// alone past their own TTL; when the gateway stops refreshing, exactly 10,000 offline
/// events, one per user, within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_gateway_ends_its_10000_sessions_with_one_offline_each() {
    let s = TestServer::start(&[("PRESENCE_PRESENCE__SESSION_TTL", "2s"), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "1s")]).await;
    let mut c = client(&s).await;
    let lease = c.refresh_instance(s.admin_request(refresh("gw-1", 2))).await.unwrap().into_inner();
    assert_eq!(lease.registered, 0);
    let mut events = s.svc.bus.subscribe();
    let mut rx_online = 0;
    for part in [0..5000, 5000..10_000] {
        let r = c.register_sessions(s.admin_request(batch("gw-1", entries(part, "phone")))).await.unwrap().into_inner();
        assert_eq!((r.registered, r.failed, r.results.len()), (5000, 0, 5000));
        assert!(r.results.iter().all(|x| x.created && x.error_code.is_empty()));
        // Bound sessions answer the lease's deadline.
        assert!(r.results.iter().all(|x| x.expires_at == lease.expires_at));
    }
    while let Ok(e) = events.try_recv() {
        rx_online += usize::from(e.kind == EventKind::UserOnline);
    }
    assert_eq!(rx_online, 10_000);
    assert_eq!(s.svc.stats().sessions, 10_000);

    // Refreshing the instance alone keeps all of them, past the sessions' own TTL (2 s)
    // and the first lease deadline.
    let mut last = lease;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        last = c.refresh_instance(s.admin_request(refresh("gw-1", 2))).await.unwrap().into_inner();
        assert_eq!(last.registered, 10_000);
    }
    assert_eq!(s.svc.stats().sessions, 10_000, "no session lapsed while the instance was refreshed");
    let r = c.get_presence(pb::GetPresenceRequest { user_ids: vec!["u0".into(), "u9999".into()] }).await.unwrap().into_inner();
    assert!(r.presences.iter().all(|p| p.status == pb::Status::Online as i32));
    // A bound session's refresh and its device list answer the lease's deadline.
    let one = pb::RefreshSessionRequest { user_id: "u7".into(), device_id: "phone".into(), active: None, idle_since: None };
    assert_eq!(c.refresh_session(s.admin_request(one)).await.unwrap().into_inner().expires_at, last.expires_at);
    let d = c.get_user_devices(s.admin_request(pb::GetUserDevicesRequest { user_id: "u7".into() })).await.unwrap().into_inner();
    assert_eq!(d.devices[0].expires_at, last.expires_at);
    assert_eq!(d.devices[0].instance_id, "gw-1");

    // The gateway dies: no more refreshes.
    let stopped = Instant::now();
    let seen = offline_events(&mut events, 10_000, Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    assert_eq!(seen.len(), 10_000, "every user went offline");
    assert!(seen.values().all(|n| *n == 1), "exactly one offline event per user");
    assert_eq!(s.svc.stats().sessions, 0);
    eprintln!("10,000 sessions of a lapsed 2 s lease ended {took:?} after the last refresh");
    s.stop().await;
}

/// Batches report per-session outcomes; a clean shutdown ends the instance's sessions;
/// sessions registered without a lease keep their own TTL; only admins may call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_unregister_instance_and_sessions_without_a_lease() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__MAX_DEVICES_PER_USER", "1"), ("PRESENCE_LIMITS__MAX_SESSIONS_PER_CALL", "4")]).await;
    let mut c = client(&s).await;
    c.refresh_instance(s.admin_request(refresh("gw-2", 30))).await.unwrap();
    let mut sessions = entries(0..3, "phone");
    sessions.push(pb::SessionEntry { user_id: "u0".into(), device_id: "laptop".into(), platform: String::new() });
    let r = c.register_sessions(s.admin_request(batch("gw-2", sessions))).await.unwrap().into_inner();
    assert_eq!((r.registered, r.failed), (3, 1));
    assert_eq!(r.results[3].error_code, "limit_exceeded", "{:?}", r.results[3]);
    assert!(r.results[3].expires_at.is_none());

    // Too many in one call, a bad id, an unknown platform: the whole call is refused.
    for bad in [
        entries(0..5, "x"),
        vec![pb::SessionEntry { user_id: "bad id".into(), device_id: "d".into(), platform: String::new() }],
        vec![pb::SessionEntry { user_id: "u1".into(), device_id: "d".into(), platform: "fridge".into() }],
        vec![],
    ] {
        let e = c.register_sessions(s.admin_request(batch("gw-2", bad))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // Not an admin.
    let mut req = tonic::Request::new(refresh("gw-2", 30));
    req.metadata_mut().insert("authorization", format!("Bearer {}", s.token("u0")).parse().unwrap());
    assert_eq!(c.refresh_instance(req).await.unwrap_err().code(), Code::PermissionDenied);
    let e = c.refresh_instance(s.admin_request(refresh("", 30))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // UnregisterSessions: one removed, one that had none.
    let gone = pb::UnregisterSessionsRequest {
        sessions: vec![
            pb::UnregisterSessionRequest { user_id: "u2".into(), device_id: "phone".into(), immediate: true },
            pb::UnregisterSessionRequest { user_id: "u2".into(), device_id: "tablet".into(), immediate: true },
        ],
    };
    let r = c.unregister_sessions(s.admin_request(gone)).await.unwrap().into_inner();
    assert_eq!((r.removed, r.removed_count), (vec![true, false], 1));

    // A session of an instance with no lease keeps its own TTL.
    let plain = pb::RegisterSessionsRequest { instance_id: "gw-old".into(), ttl_seconds: 1, sessions: entries(10..11, "phone") };
    let r = c.register_sessions(s.admin_request(plain)).await.unwrap().into_inner();
    let exp = r.results[0].expires_at.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(exp.seconds <= now + 2, "own TTL of 1 s: {exp:?}");

    // The gateway shuts down cleanly: its two remaining sessions end now.
    let mut events = s.svc.bus.subscribe();
    let r = c
        .unregister_instance(s.admin_request(pb::UnregisterInstanceRequest { instance_id: "gw-2".into(), immediate: true }))
        .await
        .unwrap();
    assert_eq!(r.into_inner().sessions_ended, 2);
    let seen = offline_events(&mut events, 2, Duration::from_secs(3)).await;
    assert_eq!(seen.keys().filter(|k| *k == "u0" || *k == "u1").count(), 2, "{seen:?}");
    let r = c.get_presence(pb::GetPresenceRequest { user_ids: vec!["u0".into(), "u1".into()] }).await.unwrap().into_inner();
    assert!(r.presences.iter().all(|p| p.status == pb::Status::Offline as i32));
    // Ending it again ends nothing; registering on it now gives plain TTL sessions.
    let r = c
        .unregister_instance(s.admin_request(pb::UnregisterInstanceRequest { instance_id: "gw-2".into(), immediate: true }))
        .await
        .unwrap();
    assert_eq!(r.into_inner().sessions_ended, 0);
    // The session without a lease lapsed on its own TTL.
    common::eventually("u10's 1 s session lapsed", Duration::from_secs(5), async || s.svc.stats().sessions == 0).await;
    s.stop().await;
}

/// The REST equivalents, admin scope only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_gateway_endpoints() {
    let s = TestServer::start(&[]).await;
    let admin = s.admin_token("gateway");
    let post = |path: &str, token: &str, body: serde_json::Value| {
        let req = s.client.post(s.url(path)).bearer_auth(token).json(&body);
        async move { common::decode(req.send().await.unwrap()).await }
    };
    let r = post("/api/v2/instances/gw-rest/refresh", &admin, json!({"ttl_seconds": 30})).await;
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(r.1["data"]["instance_id"], "gw-rest");
    assert_eq!(r.1["data"]["registered"], 0);
    // An empty body takes the default TTL.
    let r = s.client.post(s.url("/api/v2/instances/gw-rest/refresh")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let body = json!({"instance_id": "gw-rest", "sessions": [
        {"user_id": "ann", "device_id": "web-1", "platform": "web"},
        {"user_id": "bob", "device_id": "phone"}
    ]});
    let r = post("/api/v2/sessions", &admin, body.clone()).await;
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!((r.1["data"]["registered"].as_u64(), r.1["data"]["failed"].as_u64()), (Some(2), Some(0)));
    assert_eq!(r.1["data"]["results"][0]["created"], true);
    assert_eq!(s.get("/api/v2/presence/ann").await.1["data"]["ann"]["status"], "online");
    let r = post("/api/v2/instances/gw-rest/refresh", &admin, json!({})).await;
    assert_eq!(r.1["data"]["registered"], 2);

    // Not an admin: 403 with the envelope; malformed: 400.
    let user = s.token("ann");
    common::assert_error(&post("/api/v2/sessions", &user, body).await, 403, "forbidden");
    common::assert_error(&post("/api/v2/instances/gw-rest/refresh", &user, json!({})).await, 403, "forbidden");
    common::assert_error(&post("/api/v2/sessions", &admin, json!({"sessions": "nope"})).await, 400, "bad_request");
    common::assert_error(&post("/api/v2/sessions", &admin, json!({"sessions": []})).await, 400, "bad_request");
    for platform in ["", " mobile", "Mobile", "tv"] {
        let bad = json!({"instance_id": "gw-rest", "sessions": [{"user_id": "ann", "device_id": "tv", "platform": platform}]});
        common::assert_error(&post("/api/v2/sessions", &admin, bad).await, 400, "bad_request");
    }
    common::assert_error(&post("/api/v2/instances/gw-rest/refresh", &admin, json!({"ttl_seconds": 999999})).await, 400, "bad_request");

    let r = post("/api/v2/sessions/unregister", &admin, json!({"sessions": [{"user_id": "bob", "device_id": "phone"}]})).await;
    assert_eq!(r.1["data"]["removed"], json!([true]));
    let r = s.client.delete(s.url("/api/v2/instances/gw-rest")).bearer_auth(&admin).send().await.unwrap();
    let (code, v) = common::decode(r).await;
    assert_eq!((code, v["data"]["sessions_ended"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(s.get("/api/v2/presence/ann").await.1["data"]["ann"]["status"], "offline");
    s.stop().await;
}

/// Two cluster nodes whose sessions' own TTL is `session_ttl`, with a gRPC client each.
async fn two_nodes(e: &Engine, session_ttl: &str) -> (TestServer, TestServer, PresenceApiClient<Channel>, PresenceApiClient<Channel>) {
    let short = [("PRESENCE_PRESENCE__SESSION_TTL", session_ttl), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "1s")];
    let a = e.node_with("node-a", &short).await;
    let b = e.node_with("node-b", &short).await;
    let (ca, cb) = (client(&a).await, client(&b).await);
    (a, b, ca, cb)
}

// Cluster mode: a refresh is one store write whatever the number of sessions; a gateway
// that refreshes through another node keeps its sessions alive (the shared lease); when
// it stops, the node holding them ends each once.
on_engines!(instance_leases_across_nodes: nats, redis);
async fn instance_leases_across_nodes(e: Engine) {
    // Sessions' own TTL (2 s) shorter than the test: only the lease keeps them.
    let (a, b, mut ca, mut cb) = two_nodes(&e, "2s").await;
    ca.refresh_instance(a.admin_request(refresh("gw-c", 2))).await.unwrap();
    let r = ca.register_sessions(a.admin_request(batch("gw-c", entries(0..1000, "phone")))).await.unwrap().into_inner();
    assert_eq!(r.registered, 1000);
    let mut events = a.svc.bus.subscribe();

    // Ten refreshes: ten store writes on the answering node (a node lease renewal may
    // land in the window too), not one per session.
    let writes = |s: &TestServer| s.svc.stats().writes;
    let before = (writes(&a), writes(&b));
    for _ in 0..10 {
        ca.refresh_instance(a.admin_request(refresh("gw-c", 2))).await.unwrap();
    }
    let delta = (writes(&a) - before.0, writes(&b) - before.1);
    assert!((10..=12).contains(&delta.0) && delta.1 <= 2, "store writes for 10 refreshes of a 1,000-session lease: {delta:?}");

    // From now on the gateway refreshes through node B only: A adopts the shared lease.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let l = cb.refresh_instance(b.admin_request(refresh("gw-c", 2))).await.unwrap().into_inner();
        assert_eq!(l.registered, 0, "B holds none of them");
    }
    assert_eq!(a.svc.stats().sessions, 1000, "A kept them through B's refreshes");
    let seen = offline_events(&mut events, 1000, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 1000);
    assert!(seen.values().all(|n| *n == 1), "exactly one offline event per user");
    common::eventually("u0 offline on B", Duration::from_secs(5), async || {
        b.get("/api/v2/presence/u0").await.1["data"]["u0"]["status"] == "offline"
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// The order of the calls does not matter: sessions a gateway registered before its
/// instance took a lease (their own TTL 2 s) are kept by the lease once it begins, and end
/// with it, one offline each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_registered_before_the_lease_are_kept_by_it() {
    let s = TestServer::start(&[("PRESENCE_PRESENCE__SESSION_TTL", "2s"), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "1s")]).await;
    let mut c = client(&s).await;
    let mut b = batch("gw-late", entries(0..50, "phone"));
    b.ttl_seconds = 2;
    let r = c.register_sessions(s.admin_request(b)).await.unwrap().into_inner();
    assert_eq!((r.registered, r.failed), (50, 0));
    let mut events = s.svc.bus.subscribe();
    let mut last = c.refresh_instance(s.admin_request(refresh("gw-late", 2))).await.unwrap().into_inner();
    assert_eq!(last.registered, 50, "the lease counts the sessions it bound when it began");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        last = c.refresh_instance(s.admin_request(refresh("gw-late", 2))).await.unwrap().into_inner();
    }
    assert_eq!(s.svc.stats().sessions, 50, "the lease kept them past their own 2 s");
    let d = c.get_user_devices(s.admin_request(pb::GetUserDevicesRequest { user_id: "u3".into() })).await.unwrap().into_inner();
    assert_eq!(d.devices[0].expires_at, last.expires_at, "a bound session shows the lease's deadline");
    // A session registered now binds at once.
    let mut late = batch("gw-late", entries(50..51, "phone"));
    late.ttl_seconds = 2;
    let r = c.register_sessions(s.admin_request(late)).await.unwrap().into_inner();
    assert_eq!(r.results[0].expires_at, last.expires_at);

    let seen = offline_events(&mut events, 51, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 51, "the lease lapsed and ended them all");
    assert!(seen.values().all(|n| *n == 1), "exactly one offline event per user");
    s.stop().await;
}

// Across nodes: sessions registered through B without a lease, then a lease begun and
// refreshed through A only: B sees it and binds them; when it lapses, B ends each once.
on_engines!(a_lease_begun_on_another_node_binds_earlier_sessions: nats, redis);
async fn a_lease_begun_on_another_node_binds_earlier_sessions(e: Engine) {
    let (a, b, mut ca, mut cb) = two_nodes(&e, "3s").await;
    let mut first = batch("gw-x", entries(0..50, "phone"));
    first.ttl_seconds = 3;
    let r = cb.register_sessions(b.admin_request(first)).await.unwrap().into_inner();
    assert_eq!(r.registered, 50);
    let mut events = b.svc.bus.subscribe();
    for _ in 0..6 {
        ca.refresh_instance(a.admin_request(refresh("gw-x", 3))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    assert_eq!(b.svc.stats().sessions, 50, "B bound them to the lease A keeps: they outlived their own 3 s");
    let r = ca.get_presence(pb::GetPresenceRequest { user_ids: vec!["u0".into(), "u49".into()] }).await.unwrap().into_inner();
    assert!(r.presences.iter().all(|p| p.status == pb::Status::Online as i32));
    let seen = offline_events(&mut events, 50, Duration::from_secs(15)).await;
    assert_eq!(seen.len(), 50, "the lease lapsed: B ended them");
    assert!(seen.values().all(|n| *n == 1), "exactly one offline event per user");
    a.stop().await;
    b.stop().await;
}
