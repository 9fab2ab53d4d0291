//! Presenced nodes sharing one engine: what one node learns, the other serves (REST,
//! WebSocket, gRPC), concurrent writers on different nodes never lose an update, privacy
//! and typing hold across nodes, and fan-out is routed by interest. Each test runs on a
//! real nats-server and a real redis-server (some on a three-master Redis Cluster too).

mod common;

use std::time::{Duration, Instant};

use common::engine::Engine;
use common::nats::NatsServer;
use common::TestServer;
use futures_util::StreamExt;
use presenced::core::NewSession;
use presenced::core::UserId;
use serde_json::{json, Value};

async fn node(server: &NatsServer, id: &str) -> TestServer {
    let urls = format!("[\"{}\"]", server.url());
    TestServer::start(&[("PRESENCE_STORE__BACKEND", "nats"), ("PRESENCE_NATS__URLS", &urls), ("PRESENCE_SERVICE__NODE_ID", id)]).await
}

async fn eventually(what: &str, f: impl AsyncFnMut() -> bool) -> Duration {
    common::eventually(what, Duration::from_secs(5), f).await
}

on_engines!(what_one_node_learns_the_other_serves: nats, redis, redis_cluster);
async fn what_one_node_learns_the_other_serves(e: Engine) {
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let (code, health) = b.get(&format!("/health/{}", e.name())).await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["data"]["state"], "connected");
    assert_eq!(b.get("/health").await.1["data"]["store"]["backend"], e.name());

    // A WebSocket subscriber of alice on node B.
    let mut watcher = b.watch("watcher", &["alice"]).await;
    assert_eq!(watcher.next("alice").await["status"], "offline");

    // Alice connects on node A: B's subscriber and B's REST see her online.
    let started = Instant::now();
    let (alice_ws, _) = tokio_tungstenite::connect_async(a.ws_url("alice", "phone")).await.unwrap();
    assert_eq!(watcher.next("alice").await["status"], "online");
    let cross_node = started.elapsed();
    assert_eq!(b.get("/api/v2/presence/alice").await.1["data"]["alice"]["device_count"], 1);
    eprintln!("cross-node online seen by a WebSocket subscriber on the other node after {cross_node:?}");

    // A status written on A (token minted by B: the nodes share the secret) reaches B.
    let (code, _) = a.put_status("alice", Some(&b.token("alice")), json!({"status":"busy","message":"call"})).await;
    assert_eq!(code, 200);
    let p = watcher.next("alice").await;
    assert_eq!((p["status"].as_str(), p["message"].as_str()), (Some("busy"), Some("call")));
    // Leaving A: offline everywhere (the explicit status is cleared first).
    let r = a.client.delete(a.url("/api/v2/presence/alice")).bearer_auth(a.token("alice")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(watcher.next("alice").await["status"], "online");
    drop(alice_ws);
    assert_eq!(watcher.next("alice").await["status"], "offline");

    // A session registered over gRPC on B is seen by REST on A.
    use presenced::grpc::pb;
    let mut grpc = pb::presence_api_client::PresenceApiClient::connect(b.grpc.clone()).await.unwrap();
    let reg = pb::RegisterSessionRequest {
        user_id: "carol".into(),
        device_id: "d".into(),
        instance_id: "gw-b".into(),
        ttl_seconds: 60,
        platform: String::new(),
        active: None,
    };
    grpc.register_session(b.admin_request(reg)).await.unwrap();
    eventually("carol online on A", async || a.get("/api/v2/presence/carol").await.1["data"]["carol"]["status"] == "online").await;
    a.stop().await;
    b.stop().await;
}

on_engines!(concurrent_writers_on_two_nodes_lose_nothing: nats, redis);
async fn concurrent_writers_on_two_nodes_lose_nothing(e: Engine) {
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let user = UserId::parse("shared", 64).unwrap();
    let spawn = |s: std::sync::Arc<dyn presenced::store::Store>, prefix: &'static str| {
        let user = user.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                s.register_session(&user, NewSession::new(&format!("{prefix}-{i}"), prefix, 600_000)).await.unwrap();
            }
        })
    };
    let (ta, tb) = (spawn(a.svc.store.clone(), "a"), spawn(b.svc.store.clone(), "b"));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(a.svc.store.devices(&user).await.unwrap().len(), 80, "every registration from both nodes kept");
    // REST reads on B: from its cache (NATS: it follows the KV within milliseconds) or Redis.
    eventually("B's cached view", async || b.get("/api/v2/presence/shared").await.1["data"]["shared"]["device_count"] == 80).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replay_durably_and_restarts_lose_nothing() {
    let mut server = NatsServer::start("");
    let a = node(&server, "node-a").await;
    common::write_durable_state(&a).await;

    // A delivery service that starts afterwards still gets every event, durably.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("PRESENCE_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config { durable_name: Some("delivery".into()), ..Default::default() })
        .await
        .unwrap();
    let mut msgs = consumer.fetch().max_messages(10).expires(Duration::from_secs(2)).messages().await.unwrap();
    let first = msgs.next().await.expect("an event").unwrap();
    assert_eq!(first.subject.as_str(), "presence.update.alice");
    let ev: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["user_id"].as_str(), ev["status"].as_str()),
        (Some("presence_updated"), Some("alice"), Some("busy"))
    );
    assert_eq!(
        (ev["message"].as_str(), ev["previous"].as_str(), ev["node_id"].as_str()),
        (Some("flight"), Some("offline"), Some("node-a"))
    );
    assert!(ev["at"].as_i64().is_some());
    first.ack().await.unwrap();
    a.stop().await;

    // Every process restarts: statuses, contacts and privacy are all still there.
    server.stop();
    server.restart();
    let b = node(&server, "node-b").await;
    common::assert_durable_state(&b).await;
    b.stop().await;
}

/// Seed 003's hub and spoke: a center nats-server (JetStream domain `hub`, leafnode port)
/// and a leaf nats-server connected to it. A presenced node on the leaf reaches the
/// center's KV through the domain; nodes on either side see each other's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_leaf_shares_the_centers_state() {
    let leaf_port = common::nats::port();
    let center = NatsServer::start_with("domain: hub", &format!("leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}"));
    let leaf =
        NatsServer::start_with("domain: leaf", &format!("leafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] }}"));
    // Wait for the leaf link: core pub/sub crosses it once it is up.
    common::nats::linked(&leaf, &center).await;

    let on = |server: &NatsServer, id: &'static str| {
        let urls = format!("[\"{}\"]", server.url());
        async move {
            TestServer::start(&[
                ("PRESENCE_STORE__BACKEND", "nats"),
                ("PRESENCE_NATS__URLS", &urls),
                ("PRESENCE_NATS__JETSTREAM__DOMAIN", "hub"),
                ("PRESENCE_SERVICE__NODE_ID", id),
            ])
            .await
        }
    };
    let center_node = on(&center, "center-1").await;
    let leaf_node = on(&leaf, "leaf-a").await;

    // Written on the leaf, read on the center (one KV, at the center).
    assert_eq!(
        leaf_node.put_status("alice", Some(&leaf_node.token("alice")), json!({"status":"away","message":"from the leaf"})).await.0,
        200
    );
    let v = center_node.get("/api/v2/presence/alice").await.1;
    assert_eq!((v["data"]["alice"]["status"].as_str(), v["data"]["alice"]["node_id"].as_str()), (Some("away"), Some("leaf-a")));

    // A WebSocket subscriber on the center sees a connection on the leaf come and go.
    let mut watcher = center_node.watch("watcher", &["bob"]).await;
    assert_eq!(watcher.next("bob").await["status"], "offline");
    let (bob_ws, _) = tokio_tungstenite::connect_async(leaf_node.ws_url("bob", "phone")).await.unwrap();
    assert_eq!(watcher.next("bob").await["status"], "online");
    drop(bob_ws);
    assert_eq!(watcher.next("bob").await["status"], "offline");
    center_node.stop().await;
    leaf_node.stop().await;
}

async fn interest(n: &TestServer, engine: &str) -> Value {
    n.get(&format!("/health/{engine}")).await.1["data"]["interest"].clone()
}

on_engines!(a_node_receives_only_what_its_connections_watch: nats, redis, redis_cluster);
/// Interest-routed fan-out: a node receives other nodes' events only about users its
/// connections watch, starting with the first watcher and ending with the last.
async fn a_node_receives_only_what_its_connections_watch(e: Engine) {
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let interest = async |n: &TestServer| interest(n, e.name()).await;
    let mut w = b.watch("watcher", &["vera"]).await;
    assert_eq!(w.next("vera").await["status"], "offline");
    // B follows its connected user and what it subscribed to.
    assert_eq!(interest(&b).await["watched_users"], 2);
    let received = async || interest(&b).await["events_received"].as_u64().unwrap();
    let before = received().await;
    // Nobody on B watches ulysses: none of his changes reach B.
    for s in ["busy", "away", "busy", "away", "online"] {
        assert_eq!(a.put_status("ulysses", Some(&a.token("ulysses")), json!({ "status": s })).await.0, 200);
    }
    // Vera's change does (published after his, so it would arrive after them).
    a.put_status("vera", Some(&a.token("vera")), json!({"status":"busy"})).await;
    assert_eq!(w.next("vera").await["status"], "busy");
    assert_eq!(received().await - before, 1, "B received vera's event and nothing about ulysses");

    // A first watcher of ulysses on B: his events flow, after a snapshot of the current state.
    let mut w2 = b.watch("watcher2", &["ulysses"]).await;
    assert_eq!(w2.next("ulysses").await["status"], "online");
    a.put_status("ulysses", Some(&a.token("ulysses")), json!({"status":"away"})).await;
    assert_eq!(w2.next("ulysses").await["status"], "away");
    assert_eq!(received().await - before, 2);

    // The last watcher leaves: B stops receiving them again.
    drop(w2);
    eventually("B drops ulysses", async || interest(&b).await["watched_users"] == 2).await;
    a.put_status("ulysses", Some(&a.token("ulysses")), json!({"status":"busy"})).await;
    a.put_status("vera", Some(&a.token("vera")), json!({"status":"away"})).await;
    assert_eq!(w.next("vera").await["status"], "away");
    assert_eq!(received().await - before, 3);
    // The metric says the same.
    let metrics = b.client.get(b.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(&format!("{}_interest_users 2", e.name())), "{metrics}");
    a.stop().await;
    b.stop().await;
}

on_engines!(devices_ttl_privacy_and_typing_hold_across_nodes: nats, redis, redis_cluster);
/// What the embedded mode does for one node holds across nodes: several devices on
/// different nodes, status TTL, privacy (set on one node, enforced on another) and typing.
async fn devices_ttl_privacy_and_typing_hold_across_nodes(e: Engine) {
    use common::wsclient::connect;
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let mut obs = a.watch("obs", &["alice"]).await;
    assert_eq!(obs.next("alice").await["status"], "offline");

    // Two devices on two nodes: online once, offline only when both are gone.
    let phone = connect(&a, "alice", "phone").await;
    assert_eq!(obs.next("alice").await["status"], "online");
    let mut laptop = connect(&b, "alice", "laptop").await;
    eventually("two devices", async || a.get("/api/v2/presence/alice").await.1["data"]["alice"]["device_count"] == 2).await;
    drop(phone);
    eventually("one device", async || b.get("/api/v2/presence/alice").await.1["data"]["alice"]["device_count"] == 1).await;
    assert_eq!(a.get("/api/v2/presence/alice").await.1["data"]["alice"]["status"], "online");

    // A status with a TTL, written on B, lapses on time and A's watcher is told.
    // Device changes on either node reach A's watcher.
    let p = obs.until("alice", |p| p["device_count"] == 1 && p["devices"][0]["device_id"] == "laptop").await;
    assert_eq!(p["status"], "online");
    let (code, _) = b.put_status("alice", Some(&b.token("alice")), json!({"status":"busy","ttl":1})).await;
    assert_eq!(code, 200);
    assert_eq!(obs.next("alice").await["status"], "busy");
    let t = Instant::now();
    assert_eq!(obs.next("alice").await["status"], "online");
    assert!(t.elapsed() > Duration::from_millis(500), "lapsed early: {:?}", t.elapsed());

    // Privacy set on A is enforced on B (contacts and settings reach every node).
    let alice_t = a.token("alice");
    let r = a.client.put(a.url("/api/v2/contacts/alice")).bearer_auth(&alice_t).json(&json!({"contacts":["bob"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = a
        .client
        .put(a.url("/api/v2/presence/alice/privacy"))
        .bearer_auth(&alice_t)
        .json(&json!({"visibility":"contacts"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let read_as = async |viewer: &str| {
        let r = b.client.get(b.url("/api/v2/presence/alice")).bearer_auth(b.token(viewer)).send().await.unwrap();
        common::decode(r).await.1["data"]["alice"]["status"].clone()
    };
    eventually("privacy reaches B", async || read_as("carol").await == "offline").await;
    assert_eq!(read_as("bob").await, "online");

    // Typing: members set on A; alice types on B; bob, connected to A, sees it start and stop.
    let r = a
        .client
        .put(a.url("/api/v2/conversations/c1/members"))
        .bearer_auth(a.admin_token("backend"))
        .json(&json!({"members":["alice","bob"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bob = connect(&a, "bob", "web").await;
    let typing = json!({"type":"typing","payload":{"conversation_id":"c1","is_typing":true},"id":1});
    let mut ack = laptop.ack(typing.clone()).await;
    for _ in 0..50 {
        if ack["type"] == "ack" {
            break;
        }
        // Members written on A may reach B a moment later.
        tokio::time::sleep(Duration::from_millis(20)).await;
        ack = laptop.ack(typing.clone()).await;
    }
    assert_eq!(ack["type"], "ack", "{ack}");
    let t = bob.recv_type("typing_indicator").await;
    assert_eq!(t["payload"], json!({"conversation_id":"c1","user_id":"alice","is_typing":true}));
    laptop.ack(json!({"type":"typing","payload":{"conversation_id":"c1","is_typing":false},"id":2})).await;
    assert_eq!(bob.recv_type("typing_indicator").await["payload"]["is_typing"], false);
    a.stop().await;
    b.stop().await;
}

on_engines!(grpc_watch_on_one_node_follows_sessions_on_another: nats, redis);
/// gRPC across nodes: a `WatchPresence` stream on B follows a session registered over gRPC
/// on A, including its TTL lapsing in A's memory (no heartbeat: offline after 1 s).
async fn grpc_watch_on_one_node_follows_sessions_on_another(e: Engine) {
    use presenced::grpc::pb;
    use presenced::grpc::pb::presence_event::Kind;
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let mut ga = pb::presence_api_client::PresenceApiClient::connect(a.grpc.clone()).await.unwrap();
    let mut gb = pb::presence_api_client::PresenceApiClient::connect(b.grpc.clone()).await.unwrap();
    let mut stream = gb
        .watch_presence(pb::WatchPresenceRequest { user_ids: vec!["gina".into()], all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("event in time").unwrap().expect("open");
    assert!(next().await.snapshot);
    let reg = pb::RegisterSessionRequest {
        user_id: "gina".into(),
        device_id: "d".into(),
        instance_id: "gw-a".into(),
        ttl_seconds: 1,
        platform: String::new(),
        active: None,
    };
    ga.register_session(a.admin_request(reg)).await.unwrap();
    let online = next().await;
    assert_eq!(online.kind, Kind::UserOnline as i32);
    let offline = next().await;
    assert_eq!(offline.kind, Kind::UserOffline as i32, "the lapsed TTL reaches B");
    a.stop().await;
    b.stop().await;
}

on_engines!(a_session_ended_through_another_node_stays_ended: nats, redis);
/// A session held on B and ended through A (a gateway behind a load balancer): B forgets
/// it before the end is written. Told after, B saw the write's event first, found a
/// session it holds missing from the store and wrote it back (anti-entropy): a zombie
/// until its TTL, and an erased user read back (issue 25).
async fn a_session_ended_through_another_node_stays_ended(e: Engine) {
    use presenced::grpc::pb;
    use presenced::grpc::pb::presence_event::Kind;
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let mut ga = pb::presence_api_client::PresenceApiClient::connect(a.grpc.clone()).await.unwrap();
    let mut gb = pb::presence_api_client::PresenceApiClient::connect(b.grpc.clone()).await.unwrap();
    // Watched on B, so B's relay decodes gina's events (where the write-back started).
    let mut stream = gb
        .watch_presence(pb::WatchPresenceRequest { user_ids: vec!["gina".into()], all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    let next = async |s: &mut tonic::Streaming<pb::PresenceEvent>, within: u64| {
        tokio::time::timeout(Duration::from_millis(within), s.message()).await.ok().map(|m| m.unwrap().expect("open"))
    };
    assert!(next(&mut stream, 5000).await.expect("the snapshot").snapshot);
    for round in 0..3 {
        let reg = pb::RegisterSessionRequest {
            user_id: "gina".into(),
            device_id: "d".into(),
            instance_id: "gw-b".into(),
            ttl_seconds: 60,
            platform: String::new(),
            active: None,
        };
        gb.register_session(b.admin_request(reg)).await.unwrap();
        assert_eq!(next(&mut stream, 5000).await.map(|e| e.kind), Some(Kind::UserOnline as i32), "round {round}");
        let end = pb::UnregisterSessionRequest { user_id: "gina".into(), device_id: "d".into(), immediate: true };
        ga.unregister_session(a.admin_request(end)).await.unwrap();
        assert_eq!(next(&mut stream, 5000).await.map(|e| e.kind), Some(Kind::UserOffline as i32), "round {round}");
        let more = next(&mut stream, 1500).await;
        assert!(more.is_none(), "round {round}: the ended session came back: {more:?}");
        for n in [&a, &b] {
            let (code, body) = n.get("/api/v2/presence/gina").await;
            assert_eq!((code, body["data"]["gina"]["device_count"].as_u64()), (200, Some(0)), "round {round}: {body}");
        }
    }
    a.stop().await;
    b.stop().await;
}

/// A node's read cache follows writes made on other nodes through the KV watcher, even
/// for users nobody on it watches (no event reaches it about them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_follow_other_nodes_writes() {
    let server = NatsServer::start("");
    let a = node(&server, "node-a").await;
    let b = node(&server, "node-b").await;
    a.put_status("hugo", Some(&a.token("hugo")), json!({"status":"away"})).await;
    let status = async || b.get("/api/v2/presence/hugo").await.1["data"]["hugo"]["status"].clone();
    assert_eq!(status().await, "away");
    let hits = b.get("/health/cache").await.1["data"]["hits"].as_u64().unwrap();
    assert_eq!(status().await, "away");
    assert!(b.get("/health/cache").await.1["data"]["hits"].as_u64().unwrap() > hits, "second read served by the cache");
    for s in ["busy", "online", "away"] {
        a.put_status("hugo", Some(&a.token("hugo")), json!({ "status": s })).await;
        // Far below the cache's 30 s TTL: only the watcher can make this true.
        let took = eventually(&format!("B reads {s}"), async || status().await == s).await;
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    let cache = b.get("/health/cache").await.1;
    assert_eq!(cache["data"]["type"], "nats", "{cache}");
    assert!(cache["data"]["keys"].as_u64().unwrap() >= 1, "{cache}");
    a.stop().await;
    b.stop().await;
}

/// `cache.watch_writes: false`: a node does not follow the users bucket (no consumer on
/// it), and its reads go to the store, so they are current at once all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_write_watch_reads_go_to_the_store() {
    let server = NatsServer::start("");
    let urls = format!("[\"{}\"]", server.url());
    let unwatched = async |id: &str| {
        TestServer::start(&[
            ("PRESENCE_STORE__BACKEND", "nats"),
            ("PRESENCE_NATS__URLS", &urls),
            ("PRESENCE_SERVICE__NODE_ID", id),
            ("PRESENCE_CACHE__WATCH_WRITES", "false"),
        ])
        .await
    };
    let a = unwatched("node-a").await;
    let b = unwatched("node-b").await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let watchers = async || js.get_stream("KV_presence").await.unwrap().info().await.unwrap().state.consumer_count;
    assert_eq!(watchers().await, 0, "no node follows the users bucket");
    let status = async || b.get("/api/v2/presence/hugo").await.1["data"]["hugo"]["status"].clone();
    for s in ["away", "busy", "online", "away"] {
        a.put_status("hugo", Some(&a.token("hugo")), json!({ "status": s })).await;
        assert_eq!(status().await, s, "B's read right after A's write");
    }
    let hits = b.get("/health/cache").await.1["data"]["hits"].as_u64().unwrap();
    assert_eq!(status().await, "away");
    assert_eq!(b.get("/health/cache").await.1["data"]["hits"].as_u64().unwrap(), hits, "not served by the cache");
    // A node with the default follows it: one consumer more.
    let c = node(&server, "node-c").await;
    assert_eq!(watchers().await, 1);
    for n in [a, b, c] {
        n.stop().await;
    }
}

on_engines!(a_late_event_from_a_slow_node_does_not_roll_watchers_back: nats, redis);
/// An event that arrives late (its node's link to the engine is slow) must not roll
/// watchers back: events carry the store revision, and every node drops an event older
/// than one it already passed on.
async fn a_late_event_from_a_slow_node_does_not_roll_watchers_back(e: Engine) {
    use presenced::core::Status;
    use presenced::store::SetStatus;
    let proxy = common::proxy::Proxy::start(e.port()).await;
    let env = e.env("node-a", Some(proxy.port));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = TestServer::start(&refs).await;
    let b = e.node("node-b").await;
    let c = e.node("node-c").await;
    let mut wb = b.watch("w", &["hot"]).await;
    let mut wc = c.watch("w", &["hot"]).await;
    assert_eq!(wb.next("hot").await["status"], "offline");
    assert_eq!(wc.next("hot").await["status"], "offline");
    let hot = UserId::parse("hot", 64).unwrap();
    proxy.delay(Duration::from_millis(300));
    // A writes first; its event is still on the slow link when B writes a newer state.
    a.svc.store.set_status(&hot, SetStatus { status: Status::Away, message: "from-a".into(), ttl_ms: None }).await.unwrap();
    b.svc.store.set_status(&hot, SetStatus { status: Status::Busy, message: "from-b".into(), ttl_ms: None }).await.unwrap();
    for (name, w) in [("B", &mut wb), ("C", &mut wc)] {
        let mut last = Value::Null;
        while let Ok(p) = tokio::time::timeout(Duration::from_millis(1_000), w.next("hot")).await {
            last = p;
        }
        assert_eq!(
            (last["status"].as_str(), last["message"].as_str()),
            (Some("busy"), Some("from-b")),
            "the watcher on {name} was rolled back"
        );
    }
    proxy.delay(Duration::ZERO);
}

on_engines!(directory_changes_reach_other_nodes_after_a_restart: nats, redis);
/// Following the directory survives its server restarting: a contact list changed on
/// one node after the restart still reaches the other.
async fn directory_changes_reach_other_nodes_after_a_restart(mut e: Engine) {
    let a = e.node("node-a").await;
    let b = e.node("node-b").await;
    let admin = a.admin_token("backend");
    let put = async |n: &TestServer, contacts: Value| {
        let r =
            n.client.put(n.url("/api/v2/contacts/alice")).bearer_auth(&admin).json(&json!({"contacts": contacts})).send().await.unwrap();
        r.status().as_u16()
    };
    assert_eq!(put(&a, json!(["bob"])).await, 200);
    eventually("B learns alice's contacts", async || b.svc.directory.contacts(&UserId::parse("alice", 64).unwrap()).len() == 1).await;
    e.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    e.restart();
    common::eventually("A writes again", Duration::from_secs(20), async || put(&a, json!(["bob", "carol"])).await == 200).await;
    common::eventually("B follows A after the restart", Duration::from_secs(20), async || {
        b.svc.directory.contacts(&UserId::parse("alice", 64).unwrap()).len() == 2
    })
    .await;
    // The engine's gauges are exported (the recorder exists before the connection is made).
    let name = e.name();
    common::eventually("connected again", Duration::from_secs(10), async || {
        let text = b.client.get(b.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.contains(&format!("{name}_connected 1")) && text.contains(&format!("{name}_degraded 0"))
    })
    .await;
}

on_engines!(the_operator_view_counts_every_nodes_sessions: nats, redis);
/// `/api/v2/stats` on any node lists every node with the sessions it holds (carried by the
/// node's lease renewal), and the backend's connection.
async fn the_operator_view_counts_every_nodes_sessions(e: Engine) {
    let fast = [("PRESENCE_PRESENCE__NODE_LEASE_TTL", "1500ms")];
    let a = e.node_with("node-a", &fast).await;
    let b = e.node_with("node-b", &fast).await;
    let _a1 = common::wsclient::connect(&a, "alice", "phone").await;
    let _a2 = common::wsclient::connect(&a, "alice", "laptop").await;
    let _b1 = common::wsclient::connect(&b, "bob", "phone").await;
    let admin = a.admin_token("ops");
    let stats = async || -> Value {
        let r = a.client.get(a.url("/api/v2/stats")).bearer_auth(&admin).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["data"].clone()
    };
    let counts = |d: &Value| -> Vec<(String, u64, u64, bool)> {
        d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap().to_string(),
                    n["sessions"].as_u64().unwrap(),
                    n["online_users"].as_u64().unwrap(),
                    n["alive"] == true,
                )
            })
            .collect()
    };
    let want = vec![("node-a".to_string(), 2, 1, true), ("node-b".to_string(), 1, 1, true)];
    common::eventually("both nodes' sessions in the stats", Duration::from_secs(10), async || counts(&stats().await) == want).await;
    let d = stats().await;
    assert_eq!(d["node_id"], "node-a");
    assert_eq!((d["sessions"].as_u64(), d["online_users"].as_u64()), (Some(2), Some(1)), "this node's own figures: {d}");
    assert_eq!(d["backend_health"]["name"], e.name());
    assert_eq!(d["backend_health"]["connected"], true);
    assert!(!d["history"].as_array().unwrap().is_empty());
    a.stop().await;
    b.stop().await;
}

on_engines!(past_the_threshold_one_subscription_takes_every_users_events: nats, redis);
/// Batched interest: above `store.interest_all_above` watched users a node takes every
/// user's events through one subscription (its watchers still get only what they watch),
/// and below half of it goes back to one subscription per watched user.
async fn past_the_threshold_one_subscription_takes_every_users_events(e: Engine) {
    let env = [("PRESENCE_STORE__INTEREST_ALL_ABOVE", "4")];
    let a = e.node_with("node-a", &env).await;
    let b = e.node_with("node-b", &env).await;
    let name = e.name();
    let health = async || b.get(&format!("/health/{name}")).await.1["data"]["interest"].clone();
    let mut w = common::wsclient::connect(&b, "w", "d1").await;
    let subscribe = async |w: &mut common::wsclient::Client, kind: &str, ids: &[&str], id: u32| {
        let m = w.ack(json!({"type": kind, "payload": {"user_ids": ids}, "id": id})).await;
        assert_eq!(m["type"], "ack", "{m}");
    };
    let set = async |user: &str, status: &str| {
        assert_eq!(a.put_status(user, Some(&a.token(user)), json!({ "status": status })).await.0, 200);
    };
    // w itself and three users: 4, not above 4: one subscription each.
    subscribe(&mut w, "subscribe", &["u1", "u2", "u3"], 1).await;
    eventually("4 watched, per user", async || health().await == json!({"watched_users": 4, "all": false, "events_received": 0})).await;
    // zed, watched by nobody here, does not reach B; u1 does.
    set("zed", "busy").await;
    set("u1", "busy").await;
    while w.presence_of("u1").await["status"] != "busy" {} // after its snapshot
    eventually("B received u1 only", async || health().await["events_received"] == 1).await;

    // Three more: 7 watched, above 4: one subscription to every user's events.
    subscribe(&mut w, "subscribe", &["u4", "u5", "u6"], 2).await;
    eventually("every user's events", async || health().await["all"] == true).await;
    let before = health().await["events_received"].as_u64().unwrap();
    set("zed", "away").await;
    set("u5", "busy").await;
    // The watcher gets u5 (after its snapshot); nothing about zed is pushed to it.
    while w.presence_of("u5").await["status"] != "busy" {}
    eventually("B received zed too", async || health().await["events_received"].as_u64().unwrap() >= before + 2).await;
    // Taking every user's events, a newly watched user's snapshot waits for nothing, and
    // a change made right after the subscription is answered still reaches the watcher.
    let waits = format!("{name}_interest_waits_total");
    let waited = common::sample(&b.scrape().await, &waits);
    for (k, user) in ["n1", "n2", "n3", "n4", "n5"].into_iter().enumerate() {
        subscribe(&mut w, "subscribe", &[user], 10 + k as u32).await;
        set(user, "busy").await;
        while w.presence_of(user).await["status"] != "busy" {}
    }
    assert_eq!(common::sample(&b.scrape().await, &waits), waited, "a snapshot read waited for the relay");

    // Down to w and u1: 2, not above half of 4: back to one subscription per user.
    subscribe(&mut w, "unsubscribe", &["u2", "u3", "u4", "u5", "u6", "n1", "n2", "n3", "n4", "n5"], 3).await;
    eventually("per user again", async || {
        let i = health().await;
        i["all"] == false && i["watched_users"] == 2
    })
    .await;
    let before = health().await["events_received"].as_u64().unwrap();
    set("zed", "busy").await;
    set("u1", "away").await;
    while w.presence_of("u1").await["status"] != "away" {}
    eventually("B received u1 only", async || health().await["events_received"].as_u64().unwrap() == before + 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(health().await["events_received"].as_u64().unwrap(), before + 1, "zed reached B");
    a.stop().await;
    b.stop().await;
}

on_engines!(heartbeats_write_last_seen_at_most_once_per_interval: nats, redis);
/// `presence.last_seen_interval`: a connected user's heartbeats touch the owning node's
/// memory only, except that `last_seen` is written at most once per interval, and another
/// node then serves it.
async fn heartbeats_write_last_seen_at_most_once_per_interval(e: Engine) {
    let a = e.node_with("node-a", &[("PRESENCE_PRESENCE__LAST_SEEN_INTERVAL", "1s")]).await;
    let b = e.node("node-b").await;
    let user_writes = async || a.user_writes().await;
    let mut c = common::wsclient::connect(&a, "lsu", "d1").await;
    let last_seen = async || b.get("/api/v2/presence/lsu").await.1["data"]["lsu"]["last_seen"].clone();
    eventually("B sees the user online", async || b.get("/api/v2/presence/lsu").await.1["data"]["lsu"]["status"] == "online").await;
    // Within the interval: heartbeats write nothing.
    let before = user_writes().await;
    for _ in 0..3 {
        c.send(json!({"type": "heartbeat"})).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(user_writes().await, before, "a heartbeat within last_seen_interval wrote the user's record");
    // Past it: the next heartbeat writes last_seen once, and B serves the new value.
    let seen = last_seen().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send(json!({"type": "heartbeat"})).await;
    eventually("last_seen written and served by B", async || {
        let now = last_seen().await;
        now.is_string() && now != seen
    })
    .await;
    assert_eq!(user_writes().await, before + 1.0, "one write for last_seen");
    a.stop().await;
    b.stop().await;
}
