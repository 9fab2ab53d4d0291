//! Seed 003's hub and spoke on real servers: a center nats-server (JetStream domain `hub`)
//! and two leaf nats-servers, one `presenced` on each. Leaf 1 reaches the center through a
//! proxy the test can cut: degraded mode while cut off, repair with nothing lost after.

mod common;

use std::time::{Duration, Instant};

use common::nats::{linked, NatsServer};
use common::proxy::Proxy;
use common::wsclient::connect;
use common::{eventually, TestServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn leaf_server(domain: &str, remote_port: u16) -> NatsServer {
    NatsServer::start_with(
        &format!("domain: {domain}"),
        &format!("leafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{remote_port}\" }} ] }}"),
    )
}

async fn presenced(server: &NatsServer, id: &str, node_type: &str, lease: &str) -> TestServer {
    let urls = format!("[\"{}\"]", server.url());
    TestServer::start(&[
        ("PRESENCE_STORE__BACKEND", "nats"),
        ("PRESENCE_NATS__URLS", &urls),
        ("PRESENCE_NATS__JETSTREAM__DOMAIN", "hub"),
        ("PRESENCE_NATS__REQUEST_TIMEOUT", "400ms"),
        ("PRESENCE_SERVICE__NODE_ID", id),
        ("PRESENCE_SERVICE__NODE_TYPE", node_type),
        ("PRESENCE_PRESENCE__NODE_LEASE_TTL", lease),
    ])
    .await
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

async fn status_on(n: &TestServer, user: &str) -> Value {
    n.get(&format!("/api/v2/presence/{user}")).await.1["data"][user]["status"].clone()
}

/// The topology: center, leaf 1 (behind a proxy), leaf 2, one presenced on each.
struct Topology {
    center: NatsServer,
    proxy: Proxy,
    _leaves: (NatsServer, NatsServer),
    c: TestServer,
    l1: TestServer,
    l2: TestServer,
}

impl Topology {
    async fn start(lease: &str) -> Topology {
        let leaf_port = common::nats::port();
        // The center advertises the proxy as its leafnode address: a leaf that learned the
        // real one from the INFO would reconnect around the partition.
        let proxy = Proxy::start(leaf_port).await;
        let center = NatsServer::start_with(
            "domain: hub",
            &format!("leafnodes {{ listen: \"127.0.0.1:{leaf_port}\", advertise: \"127.0.0.1:{}\" }}", proxy.port),
        );
        let leaf1 = leaf_server("leaf1", proxy.port);
        let leaf2 = leaf_server("leaf2", leaf_port);
        linked(&leaf1, &center).await;
        linked(&leaf2, &center).await;
        let c = presenced(&center, "center", "center", lease).await;
        let l1 = presenced(&leaf1, "leaf-1", "leaf", lease).await;
        let l2 = presenced(&leaf2, "leaf-2", "leaf", lease).await;
        assert_eq!(l1.get("/health").await.1["data"]["node_type"], "leaf");
        Topology { center, proxy, _leaves: (leaf1, leaf2), c, l1, l2 }
    }

    /// Cuts leaf 1 off and waits until its node says it is degraded.
    async fn cut_leaf1(&self) {
        self.proxy.cut();
        eventually("leaf 1 degraded", Duration::from_secs(15), async || {
            // Reads keep KV traffic going; the breaker opens after three failures.
            let _ = self.l1.get("/api/v2/presence/dave").await;
            self.l1.get("/health").await.1["data"]["status"] == "degraded"
        })
        .await;
    }

    async fn stop(self) {
        self.c.stop().await;
        self.l1.stop().await;
        self.l2.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_and_two_leaves_survive_a_partition_with_nothing_lost() {
    let t = Topology::start("2s").await;
    let (c, l1, l2, center) = (&t.c, &t.l1, &t.l2, &t.center);

    // A user connected on leaf 1: a WebSocket subscriber on leaf 2 and REST on the center
    // see her online within a second.
    let mut far = l2.watch("far", &["alice", "bob", "carol"]).await;
    for u in ["alice", "bob", "carol"] {
        assert_eq!(far.next(u).await["status"], "offline");
    }
    let started = Instant::now();
    let alice = connect(l1, "alice", "phone").await;
    let connected = started.elapsed();
    assert_eq!(far.next("alice").await["status"], "online");
    eprintln!("alice connected (greeting) after {connected:?}");
    let to_leaf2 = started.elapsed();
    let to_center =
        eventually("alice online at the center", Duration::from_secs(1), async || status_on(c, "alice").await == "online").await;
    eprintln!("leaf 1 → leaf 2 WebSocket: {to_leaf2:?}; leaf 1 → center REST: {:?}", started.elapsed().max(to_center));
    assert!(to_leaf2 < Duration::from_secs(1), "{to_leaf2:?}");
    let carol = connect(l1, "carol", "phone").await;
    assert_eq!(far.next("carol").await["status"], "online");
    let mut near = l1.watch("near", &["alice", "bob", "carol"]).await;
    for (u, s) in [("alice", "online"), ("bob", "offline"), ("carol", "online")] {
        assert_eq!(near.next(u).await["status"], s);
    }
    // Leaf 1's cache knows alice.
    assert_eq!(status_on(l1, "alice").await, "online");

    // The partition.
    t.cut_leaf1().await;
    // Writes are refused, with a clear message.
    let (code, body) = l1.put_status("alice", Some(&l1.token("alice")), json!({"status":"busy"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("degraded mode"), "{body}");
    // Reads come from the cache, marked stale.
    let r = l1.client.get(l1.url("/api/v2/presence/alice")).send().await.unwrap();
    assert_eq!(r.headers()["x-presence-stale"], "true");
    let (_, body) = common::decode(r).await;
    assert_eq!((body["stale"].as_bool(), body["data"]["alice"]["status"].as_str()), (Some(true), Some("online")), "{body}");
    // gRPC reads say so too.
    let mut g = presenced::grpc::pb::presence_api_client::PresenceApiClient::connect(l1.grpc.clone()).await.unwrap();
    let r = g.get_presence(presenced::grpc::pb::GetPresenceRequest { user_ids: vec!["alice".into()] }).await.unwrap();
    assert_eq!(r.metadata().get("x-presence-stale").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(r.into_inner().presences[0].status, presenced::grpc::pb::Status::Online as i32);
    let cache = l1.get("/health/cache").await.1;
    assert_eq!(cache["data"]["stale"], true, "{cache}");
    assert!(cache["data"]["hits"].as_u64().unwrap() > 0, "{cache}");
    // Local users stay online to each other: bob arrives, carol leaves, all on leaf 1.
    let bob = connect(l1, "bob", "laptop").await;
    assert_eq!(near.next("bob").await["status"], "online");
    drop(carol);
    assert_eq!(near.next("carol").await["status"], "offline");
    // The center never heard of bob; after the lease TTL it ends leaf 1's sessions.
    let (code, body) = c.get("/api/v2/presence/bob").await;
    assert_eq!(code, 404, "{body}");
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if status_on(c, "alice").await == "offline" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    if r.is_err() {
        let js = async_nats::jetstream::new(async_nats::connect(center.url()).await.unwrap());
        for b in ["presence", "presence_nodes", "presence_owners"] {
            let kv = js.get_key_value(b).await.unwrap();
            let mut keys = kv.keys().await.unwrap();
            while let Some(Ok(k)) = keys.next().await {
                let v = kv.get(&k).await.unwrap().unwrap_or_default();
                eprintln!("{b} {k} = {}", String::from_utf8_lossy(&v));
            }
        }
        eprintln!("C now: {}", unix_ms());
        panic!("center did not end leaf 1's sessions");
    }

    // Healed: leaf 1 writes back what it kept, announces it on presence.sync.<node>, and
    // the center's view is repaired.
    let nc = async_nats::connect(center.url()).await.unwrap();
    let mut sync = nc.subscribe("presence.sync.>").await.unwrap();
    nc.flush().await.unwrap();
    t.proxy.heal();
    let repaired = eventually("repair", Duration::from_secs(20), async || {
        status_on(c, "alice").await == "online" && status_on(c, "bob").await == "online" && status_on(c, "carol").await == "offline"
    })
    .await;
    eprintln!("center view repaired {repaired:?} after the partition healed");
    let notice = tokio::time::timeout(Duration::from_secs(5), sync.next()).await.expect("a sync notice").unwrap();
    assert_eq!(notice.subject.as_str(), "presence.sync.leaf-1");
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice["node_id"], "leaf-1");
    assert!(notice["sessions"].as_u64().unwrap() >= 2, "{notice}");
    eventually("leaf 1 healthy", Duration::from_secs(5), async || l1.get("/health").await.1["data"]["status"] == "ok").await;
    // Leaf 2's subscriber hears about bob too, and writes work again on leaf 1.
    assert_eq!(far.next("bob").await["status"], "online");
    let (code, _) = l1.put_status("alice", Some(&l1.token("alice")), json!({"status":"busy"})).await;
    assert_eq!(code, 200);
    // (after the offline and online the partition caused)
    eventually("leaf 2 sees busy", Duration::from_secs(5), async || far.next("alice").await["status"] == "busy").await;
    drop((alice, bob));
    t.stop().await;
}

/// A partition shorter than the lease TTL: the center keeps leaf 1's sessions meanwhile;
/// on reconnection leaf 1 writes back exactly what changed locally (no lease was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_partition_is_repaired_from_what_the_leaf_kept() {
    let t = Topology::start("30s").await;
    let (c, l1) = (&t.c, &t.l1);
    let alice = connect(l1, "alice", "phone").await;
    let carol = connect(l1, "carol", "phone").await;
    eventually("both online at the center", Duration::from_secs(2), async || {
        status_on(c, "alice").await == "online" && status_on(c, "carol").await == "online"
    })
    .await;
    let nc = async_nats::connect(t.center.url()).await.unwrap();
    let mut offline = nc.subscribe("presence.offline.>").await.unwrap();
    let mut sync = nc.subscribe("presence.sync.>").await.unwrap();
    nc.flush().await.unwrap();

    t.cut_leaf1().await;
    let bob = connect(l1, "bob", "laptop").await;
    drop(carol);
    eventually("carol offline locally", Duration::from_secs(5), async || status_on(l1, "carol").await == "offline").await;
    // The center still has the old picture: the lease (30 s) has not lapsed.
    assert_eq!(status_on(c, "carol").await, "online");
    assert_eq!(status_on(c, "alice").await, "online");

    t.proxy.heal();
    eventually("center repaired", Duration::from_secs(20), async || {
        status_on(c, "bob").await == "online" && status_on(c, "carol").await == "offline" && status_on(c, "alice").await == "online"
    })
    .await;
    let notice = tokio::time::timeout(Duration::from_secs(5), sync.next()).await.expect("a sync notice").unwrap();
    assert_eq!(notice.subject.as_str(), "presence.sync.leaf-1");
    // alice never went offline anywhere; carol's offline reached the event stream once.
    let mut offs = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), offline.next()).await {
        offs.push(m.subject.to_string());
    }
    assert_eq!(offs, vec!["presence.offline.carol"]);
    drop((alice, bob));
    t.stop().await;
}
