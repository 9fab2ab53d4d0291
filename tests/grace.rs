//! Presence that never lies, on real sockets and real engines: the offline grace (a
//! reconnect within it is no event for anyone; a departure shows once, after it, with the
//! real `last_seen`), deliberate sign-outs (`bye`, `immediate`) that end at once, a
//! draining node that hands its sessions over, partitions that heal to the truth, and a
//! store that lost a live session repaired by the node holding the connection.

mod common;

use std::time::{Duration, Instant};

use common::engine::{Engine, EventLog};
use common::proxy::Proxy;
use common::wsclient::connect;
use common::{eventually, now_ms, unix_ms, TestServer};
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use presenced::grpc::pb::presence_event::Kind;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The grace of these tests: long enough for a reconnect, short enough to wait out.
const GRACE: (&str, &str) = ("PRESENCE_PRESENCE__OFFLINE_GRACE", "2s");

async fn read(n: &TestServer, user: &str) -> Value {
    n.get(&format!("/api/v2/presence/{user}")).await.1["data"][user].clone()
}

/// A `WatchPresence` stream of `users` on `n`, past its snapshot.
async fn grpc_watch(n: &TestServer, users: &[&str]) -> tonic::Streaming<pb::PresenceEvent> {
    let mut c = PresenceApiClient::connect(n.grpc.clone()).await.unwrap();
    let req = pb::WatchPresenceRequest { user_ids: users.iter().map(|u| u.to_string()).collect(), all: false, conversation_ids: vec![] };
    let mut stream = c.watch_presence(n.admin_request(req)).await.unwrap().into_inner();
    for _ in users {
        assert!(stream.message().await.unwrap().unwrap().snapshot);
    }
    stream
}

/// The transitions a stream delivers within `ms`.
async fn events_within(stream: &mut tonic::Streaming<pb::PresenceEvent>, ms: u64) -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Ok(Some(ev))) = tokio::time::timeout_at(deadline, stream.message()).await {
        out.push((ev.presence.unwrap().user_id, Kind::try_from(ev.kind).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_grace_is_no_event_and_a_departure_shows_once_after_it() {
    let s = TestServer::start(&[GRACE]).await;
    let mut w = s.watch("wendy", &["alice"]).await;
    assert_eq!(w.next("alice").await["status"], "offline");
    let mut g = grpc_watch(&s, &["alice"]).await;
    let a = connect(&s, "alice", "phone").await;
    assert_eq!(w.next("alice").await["status"], "online");
    assert_eq!(events_within(&mut g, 1000).await, vec![("alice".to_string(), Kind::UserOnline)]);

    // A page reload: the socket goes without a word, the same device is back at once.
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = read(&s, "alice").await;
    assert_eq!((p["status"].as_str(), p["device_count"].as_u64()), (Some("online"), Some(1)), "held during the grace: {p}");
    let a = connect(&s, "alice", "phone").await;
    w.nothing_about("alice", 2500).await;
    assert_eq!(events_within(&mut g, 10).await, vec![], "no gRPC event either");
    assert_eq!(read(&s, "alice").await["status"], "online");

    // Gone for good: offline once, after the grace, last seen when the socket went.
    let gone = now_ms();
    drop(a);
    let t = Instant::now();
    let p = w.next("alice").await;
    assert_eq!(p["status"], "offline");
    assert!(t.elapsed() >= Duration::from_millis(1800), "not before the grace: {:?}", t.elapsed());
    assert!((unix_ms(&p["last_seen"]) - gone).abs() < 1000, "last_seen {} is the moment the socket went ({gone})", p["last_seen"]);
    assert_eq!(events_within(&mut g, 1000).await, vec![("alice".to_string(), Kind::UserOffline)]);
    w.nothing_about("alice", 500).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_other_devices_see_the_held_device_until_the_grace_ends() {
    let s = TestServer::start(&[GRACE]).await;
    let mut phone = connect(&s, "alice", "phone").await;
    let laptop = connect(&s, "alice", "laptop").await;
    while phone.presence_of("alice").await["device_count"] != 2 {}
    drop(laptop);
    // Nothing for the phone during the grace: the laptop is still one of alice's devices.
    assert!(tokio::time::timeout(Duration::from_millis(1500), phone.presence_of("alice")).await.is_err());
    let p = phone.presence_of("alice").await;
    assert_eq!((p["device_count"].as_u64(), p["status"].as_str()), (Some(1), Some("online")), "{p}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_outs_end_at_once_on_every_transport() {
    let s = TestServer::start(&[GRACE]).await;
    let mut w = s.watch("wendy", &["alice", "bob", "carol", "dora"]).await;
    for u in ["alice", "bob", "carol", "dora"] {
        w.next(u).await;
    }
    // WebSocket `bye`: acked, closed 1000, offline at once.
    let mut a = connect(&s, "alice", "phone").await;
    assert_eq!(w.next("alice").await["status"], "online");
    let t = Instant::now();
    assert_eq!(a.ack(json!({"type": "bye", "id": 5})).await["type"], "ack");
    assert_eq!(a.closed().await, Some(CloseCode::Normal));
    assert_eq!(w.next("alice").await["status"], "offline");
    assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());

    // gRPC: a plain UnregisterSession is a socket that went (held); a registration of the
    // device continues it; `immediate: true` ends it now.
    let mut c = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let reg =
        || pb::RegisterSessionRequest { user_id: "bob".into(), device_id: "d".into(), instance_id: "gw".into(), ..Default::default() };
    c.register_session(s.admin_request(reg())).await.unwrap();
    assert_eq!(w.next("bob").await["status"], "online");
    let plain = pb::UnregisterSessionRequest { user_id: "bob".into(), device_id: "d".into(), immediate: false };
    assert!(c.unregister_session(s.admin_request(plain.clone())).await.unwrap().into_inner().removed);
    assert!(!c.unregister_session(s.admin_request(plain)).await.unwrap().into_inner().removed, "already held");
    assert_eq!(read(&s, "bob").await["status"], "online");
    let again = c.register_session(s.admin_request(reg())).await.unwrap().into_inner();
    assert!(!again.created, "the session continues");
    w.nothing_about("bob", 2500).await;
    let now = pb::UnregisterSessionRequest { user_id: "bob".into(), device_id: "d".into(), immediate: true };
    assert!(c.unregister_session(s.admin_request(now)).await.unwrap().into_inner().removed);
    assert_eq!(w.next("bob").await["status"], "offline");

    // REST gateway: `immediate` per session.
    let admin = s.admin_token("gw");
    let post = |path: &str, body: Value| s.client.post(s.url(path)).bearer_auth(&admin).json(&body).send();
    let r = post("/api/v2/sessions", json!({"instance_id": "gw", "sessions": [{"user_id": "carol", "device_id": "d"}]})).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.next("carol").await["status"], "online");
    let r = post("/api/v2/sessions/unregister", json!({"sessions": [{"user_id": "carol", "device_id": "d", "immediate": true}]})).await;
    assert_eq!(common::decode(r.unwrap()).await.1["data"]["removed"], json!([true]));
    assert_eq!(w.next("carol").await["status"], "offline");

    // Legacy HTTP: `POST /presence/bye`.
    let token = s.token("dora");
    let r = s.client.post(s.url("/presence/heartbeat")).bearer_auth(&token).header("x-device-id", "web-1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.next("dora").await["status"], "online");
    let r = s.client.post(s.url("/presence/bye")).bearer_auth(&token).json(&json!({"device_id": "web-1"})).send().await.unwrap();
    let (code, body) = common::decode(r).await;
    assert_eq!((code, body["data"]["removed"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(w.next("dora").await["status"], "offline");
    s.stop().await;
}

/// A node that drains (SIGTERM: here the test's stop) closes every WebSocket with 1012
/// and ends its gRPC watch streams with UNAVAILABLE and a retry hint; alone (the embedded
/// store), it ends its sessions at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_says_1012_and_unavailable_with_a_retry_hint() {
    let s = TestServer::start(&[GRACE]).await;
    let mut a = connect(&s, "alice", "phone").await;
    let mut g = grpc_watch(&s, &["alice"]).await;
    let svc = s.svc.clone();
    let stop = tokio::spawn(s.stop());
    assert_eq!(a.closed().await, Some(CloseCode::Restart));
    let end = loop {
        match g.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable);
    assert_eq!(end.metadata().get("grpc-retry-pushback-ms").map(|v| v.to_str().unwrap()), Some("0"));
    stop.await.unwrap();
    let p = svc.get_many(&[presenced::core::UserId::parse("alice", 64).unwrap()]).await.unwrap().remove(0);
    assert_eq!((p.status, p.device_count), (presenced::core::Status::Offline, 0), "a lone node ends its sessions at exit");
}

// ---------------------------------------------------------------- cluster mode

fn cluster_env(e: &Engine, id: &str, port: Option<u16>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = e.env(id, port);
    for (k, v) in [GRACE, ("PRESENCE_NATS__REQUEST_TIMEOUT", "300ms"), ("PRESENCE_REDIS__REQUEST_TIMEOUT", "300ms")] {
        env.push((k.into(), v.into()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn node(e: &Engine, id: &str, port: Option<u16>, extra: &[(&str, &str)]) -> TestServer {
    let env = cluster_env(e, id, port, extra);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&refs).await
}

on_engines!(a_reconnect_to_another_node_within_the_grace_is_no_event: nats, redis);
async fn a_reconnect_to_another_node_within_the_grace_is_no_event(e: Engine) {
    let (a, b) = (node(&e, "node-a", None, &[]).await, node(&e, "node-b", None, &[]).await);
    let mut w = b.watch("wendy", &["alice"]).await;
    assert_eq!(w.next("alice").await["status"], "offline");
    let mut offline = EventLog::open(&e, "offline").await;
    let phone = connect(&a, "alice", "phone").await;
    assert_eq!(w.next("alice").await["status"], "online");
    drop(phone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _phone = connect(&b, "alice", "phone").await;
    w.nothing_about("alice", 3000).await;
    for n in [&a, &b] {
        let p = read(n, "alice").await;
        assert_eq!((p["status"].as_str(), p["device_count"].as_u64()), (Some("online"), Some(1)), "{p}");
    }
    assert_eq!(offline.users().await, Vec::<String>::new(), "no offline on the engine's event stream either");
    a.stop().await;
    b.stop().await;
}

on_engines!(a_drained_node_hands_its_sessions_over: nats, redis);
async fn a_drained_node_hands_its_sessions_over(e: Engine) {
    let (a, b) = (node(&e, "node-a", None, &[]).await, node(&e, "node-b", None, &[]).await);
    let mut w = b.watch("wendy", &["mover", "leaver"]).await;
    w.next("mover").await;
    w.next("leaver").await;
    let mut offline = EventLog::open(&e, "offline").await;
    let mut mover = connect(&a, "mover", "phone").await;
    let mut leaver = connect(&a, "leaver", "phone").await;
    assert_eq!(w.next("mover").await["status"], "online");
    assert_eq!(w.next("leaver").await["status"], "online");
    let drained_at = now_ms();
    let stop = tokio::spawn(a.stop());
    assert_eq!(mover.closed().await, Some(CloseCode::Restart));
    assert_eq!(leaver.closed().await, Some(CloseCode::Restart));
    // The mover is back at once, on the other node: nobody sees it flap.
    let _mover = connect(&b, "mover", "phone").await;
    stop.await.unwrap();
    // The leaver does not come back: offline once, at the end of the grace (adopted by B).
    let p = w.next("leaver").await;
    assert_eq!(p["status"], "offline");
    let shown = now_ms() - drained_at;
    assert!((1500..6000).contains(&shown), "offline {shown} ms after the drain (grace 2 s)");
    assert!((unix_ms(&p["last_seen"]) - drained_at).abs() < 1000, "{p}");
    w.nothing_about("mover", 1000).await;
    assert_eq!(read(&b, "mover").await["device_count"], 1);
    assert_eq!(offline.users().await, vec!["leaver".to_string()]);
    b.stop().await;
}

on_engines!(a_partition_heals_to_the_truth: nats, redis);
/// Node A cut off from the engine for longer than its lease. During the cut `mover`
/// leaves A and reconnects at once to C with the same device; `leaver` leaves A for good;
/// `stayer` stays on A. After the heal: the mover is online everywhere (and stays so),
/// never shown offline, not on the event stream either; the leaver is not announced
/// online again and is shown offline once; the stayer, whom the rest of the cluster could
/// not vouch for during the cut, is online again.
async fn a_partition_heals_to_the_truth(e: Engine) {
    let proxy = Proxy::start(e.port()).await;
    let fast = [
        ("PRESENCE_PRESENCE__NODE_LEASE_TTL", "1500ms"),
        ("PRESENCE_PRESENCE__SESSION_TTL", "4s"),
        ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "1s"),
    ];
    let a = node(&e, "node-a", Some(proxy.port), &fast).await;
    let c = node(&e, "node-c", None, &fast).await;
    let mut w = c.watch("wendy", &["mover", "leaver", "stayer"]).await;
    for u in ["mover", "leaver", "stayer"] {
        w.next(u).await;
    }
    let mut offline = EventLog::open(&e, "offline").await;
    let mover = connect(&a, "mover", "phone").await;
    let leaver = connect(&a, "leaver", "phone").await;
    // The stayer answers the server's pings only when read: it heartbeats all along.
    let stayer = alive(connect(&a, "stayer", "phone").await);
    for u in ["mover", "leaver", "stayer"] {
        assert_eq!(w.next(u).await["status"], "online");
    }

    proxy.cut();
    // At once, before A even knows it is cut off: the mover's socket goes, and it comes
    // back on C; the leaver goes for good.
    drop(mover);
    drop(leaver);
    let mover = alive(connect(&c, "mover", "phone").await);
    // A is degraded, and says so with 200 (it still serves its own users).
    eventually("A degraded", Duration::from_secs(10), async || {
        let (code, h) = a.get("/health").await;
        code == 200 && h["data"]["status"] == "degraded"
    })
    .await;
    // The rest of the cluster cannot vouch for A's users once A's lease lapsed.
    let mut log: Vec<(String, String, Instant)> = Vec::new();
    let cut_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(log.iter().any(|(u, s, _)| u == "stayer" && s == "offline") && log.iter().any(|(u, s, _)| u == "leaver" && s == "offline")) {
        let Some(p) = w.next_any_until(cut_deadline).await else { panic!("C never saw A's users go: {log:?}") };
        log.push((p["user_id"].as_str().unwrap().into(), p["status"].as_str().unwrap().into(), Instant::now()));
    }
    proxy.heal();
    let healed = Instant::now();
    let back_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !log.iter().any(|(u, s, t)| u == "stayer" && s == "online" && *t > healed) {
        let Some(p) = w.next_any_until(back_deadline).await else { panic!("the stayer never came back: {log:?}") };
        log.push((p["user_id"].as_str().unwrap().into(), p["status"].as_str().unwrap().into(), Instant::now()));
    }
    // Whatever else C's watcher is shown for a while after the heal.
    let settle = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Some(p) = w.next_any_until(settle).await {
        log.push((p["user_id"].as_str().unwrap().into(), p["status"].as_str().unwrap().into(), Instant::now()));
    }
    let about = |u: &str| log.iter().filter(|(x, _, _)| x == u).map(|(_, s, _)| s.as_str()).collect::<Vec<_>>();
    assert!(!about("mover").contains(&"offline"), "the mover was shown offline: {log:?}");
    assert_eq!(about("leaver"), vec!["offline"], "the leaver: one offline, never online again: {log:?}");
    for n in [&a, &c] {
        let (m, l, s) = (read(n, "mover").await, read(n, "leaver").await, read(n, "stayer").await);
        assert_eq!((m["status"].as_str(), m["device_count"].as_u64()), (Some("online"), Some(1)), "mover: {m}");
        assert_eq!(l["status"], "offline", "leaver: {l}");
        assert_eq!(s["status"], "online", "stayer: {s}");
    }
    let gone = offline.users().await;
    assert!(!gone.contains(&"mover".to_string()), "{gone:?}");
    assert_eq!(gone.iter().filter(|u| *u == "leaver").count(), 1, "one offline for the leaver on the event stream: {gone:?}");
    stayer.abort();
    mover.abort();
    a.stop().await;
    c.stop().await;
}

/// Keeps a client connected: a heartbeat every 800 ms (and its answers read), until aborted.
fn alive(mut c: common::wsclient::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            c.send(json!({"type": "heartbeat"})).await;
            c.settle(800).await;
        }
    })
}

on_engines!(a_store_that_lost_a_live_session_is_repaired_by_its_node: nats, redis);
/// The stored record of a user connected to node A loses the session (deleted behind the
/// nodes' back, as a stale write-back would). The next event about the user that reaches A
/// shows the device missing, and A, which holds the connection, writes it again.
async fn a_store_that_lost_a_live_session_is_repaired_by_its_node(e: Engine) {
    let (a, b) = (node(&e, "node-a", None, &[]).await, node(&e, "node-b", None, &[]).await);
    let _alice = connect(&a, "alice", "phone").await;
    eventually("online on B", Duration::from_secs(5), async || read(&b, "alice").await["status"] == "online").await;
    match &e {
        Engine::Nats(s) => {
            let client = async_nats::connect(s.url()).await.unwrap();
            let kv = async_nats::jetstream::new(client).get_key_value("presence").await.unwrap();
            kv.purge("user.alice").await.unwrap();
        }
        _ => {
            let out = std::process::Command::new("redis-cli").args(["-p", &e.port().to_string(), "DEL", "presence:user:{alice}"]).output();
            assert_eq!(String::from_utf8_lossy(&out.unwrap().stdout).trim(), "1");
        }
    }
    // A write through B: its event shows alice with no device.
    let (code, _) = b.put_status("alice", Some(&b.admin_token("backend")), json!({"status": "busy"})).await;
    assert_eq!(code, 200);
    eventually("A wrote the session again", Duration::from_secs(5), async || read(&b, "alice").await["device_count"] == 1).await;
    assert_eq!(read(&b, "alice").await["status"], "busy");
    let repaired = common::sample(&a.scrape().await, &format!("{}_sessions_repaired_total", e.name()));
    assert!(repaired >= 1.0, "{repaired}");
    a.stop().await;
    b.stop().await;
}
