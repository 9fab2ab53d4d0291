//! Two presenced nodes on one real nats-server (`store.backend: nats`): what one node
//! learns, the other serves (REST, WebSocket, gRPC), and concurrent writers on different
//! nodes never lose an update.

mod common;

use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::TestServer;
use futures_util::StreamExt;
use presenced::core::UserId;
use serde_json::{json, Value};

async fn node(server: &NatsServer, id: &str) -> TestServer {
    let urls = format!("[\"{}\"]", server.url());
    TestServer::start(&[("PRESENCE_STORE__BACKEND", "nats"), ("PRESENCE_NATS__URLS", &urls), ("PRESENCE_SERVICE__NODE_ID", id)]).await
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: not within 5s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_learns_the_other_serves() {
    let server = NatsServer::start("");
    let a = node(&server, "node-a").await;
    let b = node(&server, "node-b").await;
    let (code, health) = b.get("/health/nats").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["data"]["state"], "connected");
    assert_eq!(b.get("/health").await.1["data"]["store"]["backend"], "nats");

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
    let mut req = tonic::Request::new(pb::RegisterSessionRequest {
        user_id: "carol".into(),
        device_id: "d".into(),
        instance_id: "gw-b".into(),
        ttl_seconds: 60,
    });
    req.metadata_mut().insert("authorization", format!("Bearer {}", b.admin_token("svc")).parse().unwrap());
    grpc.register_session(req).await.unwrap();
    eventually("carol online on A", async || a.get("/api/v2/presence/carol").await.1["data"]["carol"]["status"] == "online").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_nodes_lose_nothing() {
    let server = NatsServer::start("");
    let a = node(&server, "node-a").await;
    let b = node(&server, "node-b").await;
    let user = UserId::parse("shared", 64).unwrap();
    let spawn = |s: std::sync::Arc<dyn presenced::store::Store>, prefix: &'static str| {
        let user = user.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                s.register_session(&user, &format!("{prefix}-{i}"), prefix, 600_000).await.unwrap();
            }
        })
    };
    let (ta, tb) = (spawn(a.svc.store.clone(), "a"), spawn(b.svc.store.clone(), "b"));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(a.svc.store.devices(&user).await.unwrap().len(), 80, "every registration from both nodes kept");
    assert_eq!(b.get("/api/v2/presence/shared").await.1["data"]["shared"]["device_count"], 80);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replay_durably_and_restarts_lose_nothing() {
    let mut server = NatsServer::start("");
    let a = node(&server, "node-a").await;
    let alice = a.token("alice");
    assert_eq!(a.put_status("alice", Some(&alice), json!({"status":"busy","message":"flight","ttl":0})).await.0, 200);
    let r = a.client.put(a.url("/api/v2/contacts/alice")).bearer_auth(&alice).json(&json!({"contacts":["bob"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = a
        .client
        .put(a.url("/api/v2/presence/alice/privacy"))
        .bearer_auth(&alice)
        .json(&json!({"visibility":"contacts"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

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
    let me =
        b.client.get(b.url("/api/v2/presence/alice")).bearer_auth(b.token("alice")).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!((me["data"]["alice"]["status"].as_str(), me["data"]["alice"]["message"].as_str()), (Some("busy"), Some("flight")));
    let c =
        b.client.get(b.url("/api/v2/contacts/alice")).bearer_auth(b.token("alice")).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(c["data"]["contacts"], json!(["bob"]));
    // Privacy survived too: a stranger sees her offline, her contact sees her busy.
    let stranger =
        b.client.get(b.url("/api/v2/presence/alice")).bearer_auth(b.token("carol")).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(stranger["data"]["alice"]["status"], "offline");
    let contact =
        b.client.get(b.url("/api/v2/presence/alice")).bearer_auth(b.token("bob")).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(contact["data"]["alice"]["status"], "busy");
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
    let c = async_nats::connect(center.url()).await.unwrap();
    let l = async_nats::connect(leaf.url()).await.unwrap();
    let mut sub = c.subscribe("link.check").await.unwrap();
    c.flush().await.unwrap();
    let start = Instant::now();
    loop {
        l.publish("link.check", "x".into()).await.unwrap();
        l.flush().await.unwrap();
        if tokio::time::timeout(Duration::from_millis(200), sub.next()).await.is_ok() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "leaf link never came up");
    }

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
