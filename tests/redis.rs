//! Cluster mode on real Redis servers (`store.backend: redis`), beyond what the shared
//! cluster tests cover: a Redis restarted without its data is repaired by the nodes, a
//! network cut between a node and Redis (degraded mode) and its healing, the event
//! stream and persistence, interest-routed subscriptions as Redis itself reports them,
//! key prefixes, TLS with a throwaway CA, ACL credentials, and clear start-up errors.

mod common;

use std::time::{Duration, Instant};

use common::engine::Engine;
use common::proxy::Proxy;
use common::redis::RedisServer;
use common::wsclient::connect;
use common::{eventually, TestServer};
use serde_json::{json, Value};

async fn status_on(n: &TestServer, user: &str) -> Value {
    n.get(&format!("/api/v2/presence/{user}")).await.1["data"][user]["status"].clone()
}

async fn node_on(server: &RedisServer, id: &str, extra: &[(&str, &str)]) -> TestServer {
    let urls = format!("[\"{}\"]", server.url());
    let mut env = vec![("PRESENCE_STORE__BACKEND", "redis"), ("PRESENCE_REDIS__URLS", urls.as_str()), ("PRESENCE_SERVICE__NODE_ID", id)];
    env.extend_from_slice(extra);
    TestServer::start(&env).await
}

/// Redis dies and comes back empty (no persistence): each node finds its lease gone and
/// writes back the sessions it holds, so every connected user is online again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_without_its_data_is_repaired_by_the_nodes() {
    let mut e = Engine::redis();
    let fast = [("PRESENCE_PRESENCE__NODE_LEASE_TTL", "1500ms"), ("PRESENCE_REDIS__REQUEST_TIMEOUT", "300ms")];
    let a = e.node_with("node-a", &fast).await;
    let b = e.node_with("node-b", &fast).await;
    let alice = connect(&a, "alice", "phone").await;
    let bob = connect(&b, "bob", "laptop").await;
    let bob2 = connect(&a, "bob", "phone").await;
    for u in ["alice", "bob"] {
        eventually(&format!("{u} online"), Duration::from_secs(5), async || status_on(&a, u).await == "online").await;
    }
    e.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.restart();
    let Engine::Redis(server) = &e else { unreachable!() };
    assert_eq!(server.cli(&["DBSIZE"]).unwrap().trim(), "0", "restarted empty");
    let repaired = eventually("every user back online on both nodes", Duration::from_secs(15), async || {
        let mut ok = true;
        for n in [&a, &b] {
            ok &= status_on(n, "alice").await == "online";
            ok &= n.get("/api/v2/presence/bob").await.1["data"]["bob"]["device_count"] == 2;
        }
        ok
    })
    .await;
    eprintln!("repaired {repaired:?} after Redis came back empty");
    // Both nodes took new leases.
    let leases = server.cli(&["HKEYS", "presence:leases"]).unwrap();
    assert!(leases.contains("node-a") && leases.contains("node-b"), "{leases}");
    // And the cluster works as before: bob leaves B, one device remains.
    drop(bob);
    eventually("bob on one device", Duration::from_secs(5), async || {
        a.get("/api/v2/presence/bob").await.1["data"]["bob"]["device_count"] == 1
    })
    .await;
    drop((alice, bob2));
    a.stop().await;
    b.stop().await;
}

/// A node cut off from Redis (a proxy the test cuts): degraded mode on that node (writes
/// refused with a clear message, its local users kept), the other node ends its sessions
/// after the lease TTL, and when the link heals the node writes back what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_between_a_node_and_redis_degrades_then_heals() {
    let e = Engine::redis();
    let proxy = Proxy::start(e.port()).await;
    let lease = ("PRESENCE_PRESENCE__NODE_LEASE_TTL", "1500ms");
    let timeout = ("PRESENCE_REDIS__REQUEST_TIMEOUT", "300ms");
    let mut env = e.env("node-a", Some(proxy.port));
    env.extend([lease, timeout].map(|(k, v)| (k.to_string(), v.to_string())));
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = TestServer::start(&refs).await;
    let b = e.node_with("node-b", &[lease, timeout]).await;
    let mut far = b.watch("far", &["alice", "bob"]).await;
    assert_eq!(far.next("alice").await["status"], "offline");
    assert_eq!(far.next("bob").await["status"], "offline");
    let alice = connect(&a, "alice", "phone").await;
    assert_eq!(far.next("alice").await["status"], "online");
    let mut near = a.watch("near", &["alice", "bob"]).await;
    assert_eq!(near.next("alice").await["status"], "online");
    assert_eq!(near.next("bob").await["status"], "offline");

    proxy.cut();
    eventually("node A degraded", Duration::from_secs(15), async || {
        let _ = a.get("/api/v2/presence/alice").await;
        a.get("/health").await.1["data"]["status"] == "degraded"
    })
    .await;
    let (code, body) = a.put_status("alice", Some(&a.token("alice")), json!({"status":"busy"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Redis"), "{body}");
    eventually("/health/redis says the link is down", Duration::from_secs(5), async || a.get("/health/redis").await.0 == 503).await;
    // Local users keep working on A: bob arrives there and A's watcher sees him.
    let bob = connect(&a, "bob", "laptop").await;
    assert_eq!(near.next("bob").await["status"], "online");
    // B never hears of bob; after A's lease lapses, B's janitor ends alice's session.
    let cut_at = Instant::now();
    assert_eq!(far.next("alice").await["status"], "offline");
    eprintln!("B ended A's sessions {:?} after the cut", cut_at.elapsed());

    proxy.heal();
    let healed = Instant::now();
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let p = far.next_any().await;
        if p["status"] == "online" {
            seen.insert(p["user_id"].as_str().unwrap().to_string(), ());
        }
    }
    eprintln!("B sees A's users online again {:?} after the link healed", healed.elapsed());
    eventually("A healthy", Duration::from_secs(10), async || a.get("/health").await.1["data"]["status"] == "ok").await;
    let (code, _) = a.put_status("alice", Some(&a.token("alice")), json!({"status":"busy"})).await;
    assert_eq!(code, 200);
    eventually("B sees busy", Duration::from_secs(5), async || status_on(&b, "alice").await == "busy").await;
    drop((alice, bob));
    a.stop().await;
    b.stop().await;
}

/// Events go to the `presence:events` stream for consumers that replay (read here with
/// redis-cli); with Redis persistence on, statuses, contacts and privacy survive a
/// restart of everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_replay_from_the_stream_and_a_persistent_redis_loses_nothing() {
    let mut server = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = node_on(&server, "node-a", &[]).await;
    common::write_durable_state(&a).await;
    let out = server.cli(&["--json", "XRANGE", "presence:events", "-", "+"]).unwrap();
    let entries: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // An entry: [id, [field, value, field, value, ...]].
    let fields: std::collections::HashMap<&str, &str> =
        entries[0][1].as_array().unwrap().chunks(2).map(|kv| (kv[0].as_str().unwrap(), kv[1].as_str().unwrap())).collect();
    assert_eq!((fields["type"], fields["user_id"]), ("presence_updated", "alice"), "{entries}");
    let ev: Value = serde_json::from_str(fields["event"]).unwrap();
    assert_eq!((ev["status"].as_str(), ev["message"].as_str(), ev["previous"].as_str()), (Some("busy"), Some("flight"), Some("offline")));
    assert_eq!(ev["node_id"], "node-a");
    a.stop().await;

    server.stop();
    server.restart();
    let b = node_on(&server, "node-b", &[]).await;
    common::assert_durable_state(&b).await;
    b.stop().await;
}

/// Interest routing as Redis reports it: a node subscribes to a user's channel with its
/// first watcher and unsubscribes with the last; nobody subscribes to unwatched users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sees_a_subscription_only_for_watched_users() {
    let server = RedisServer::start(&[]);
    let a = node_on(&server, "node-a", &[]).await;
    let subscribers = |user: &str| {
        let out = server.cli(&["PUBSUB", "NUMSUB", &format!("presence:events:{{{user}}}")]).unwrap();
        out.lines().nth(1).unwrap_or("0").trim().parse::<u32>().unwrap()
    };
    assert_eq!(subscribers("vera"), 0);
    let w = a.watch("watcher", &["vera"]).await;
    assert_eq!(subscribers("vera"), 1, "the first watcher subscribes");
    // The connected user's own channel is subscribed in the background.
    eventually("a connected user is followed (their contacts may change)", Duration::from_secs(5), async || subscribers("watcher") == 1)
        .await;
    assert_eq!(subscribers("ulysses"), 0);
    let w2 = a.watch("watcher2", &["vera"]).await;
    assert_eq!(subscribers("vera"), 1, "one subscription per node, however many watchers");
    drop(w);
    drop(w2);
    eventually("the last watcher unsubscribes", Duration::from_secs(5), async || subscribers("vera") == 0).await;
    a.stop().await;
}

/// Two deployments on one Redis, with their own key prefixes, never see each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefixes_keep_deployments_apart() {
    let server = RedisServer::start(&[]);
    let blue = node_on(&server, "blue-1", &[("PRESENCE_REDIS__KEY_PREFIX", "blue:")]).await;
    let green = node_on(&server, "green-1", &[("PRESENCE_REDIS__KEY_PREFIX", "green:")]).await;
    assert_eq!(blue.put_status("alice", Some(&blue.token("alice")), json!({"status":"busy"})).await.0, 200);
    assert_eq!(status_on(&blue, "alice").await, "busy");
    assert_eq!(green.get("/api/v2/presence/alice").await.0, 404, "green never heard of alice");
    let keys = server.cli(&["KEYS", "*"]).unwrap();
    assert!(keys.lines().all(|k| k.starts_with("blue:") || k.starts_with("green:")), "{keys}");
    assert!(keys.contains("blue:user:{alice}"), "{keys}");
    blue.stop().await;
    green.stop().await;
}

fn redis_config(env: &[(&str, &str)]) -> presenced::config::Config {
    let mut vars: Vec<(String, String)> = vec![
        ("PRESENCE_STORE__BACKEND".into(), "redis".into()),
        ("PRESENCE_AUTH__JWT_SECRET".into(), common::SECRET.into()),
        ("PRESENCE_REDIS__CONNECT_TIMEOUT".into(), "2s".into()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let dir = tempfile::tempdir().unwrap().keep();
    vars.push(("PRESENCE_SERVICE__DATA_DIR".into(), dir.display().to_string()));
    presenced::config::Config::load(None, vars).expect("config")
}

/// TLS (`rediss://`) with a throwaway CA given in `redis.tls.ca_file`; without it, the
/// server's certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::certificates(certs.path());
    let server = RedisServer::start_tls(&cert, &key, &ca);
    let url = format!("[\"rediss://127.0.0.1:{}\"]", server.tls_port().unwrap());
    let ca = ca.display().to_string();
    let config = redis_config(&[("PRESENCE_REDIS__URLS", &url), ("PRESENCE_REDIS__TLS__CA_FILE", &ca)]);
    let app = presenced::server::App::build(config).await.unwrap_or_else(|e| panic!("TLS with the right CA: {e}"));
    let id = presenced::core::UserId::parse("alice", 64).unwrap();
    let status = presenced::store::SetStatus { status: presenced::core::Status::Away, message: "over tls".into(), ttl_ms: None };
    app.svc.store.set_status(&id, status).await.unwrap();
    assert!(server.cli(&["HGET", "presence:user:{alice}", "v"]).unwrap().contains("over tls"));
    app.svc.store.shutdown().await;
    let e =
        presenced::server::App::build(redis_config(&[("PRESENCE_REDIS__URLS", &url)])).await.err().expect("untrusted certificate refused");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

/// ACL credentials from the configuration (here the environment, as an operator would
/// pass a secret); wrong ones, or none, stop the start with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_credentials_from_the_environment() {
    let server = RedisServer::start(&[]);
    server.cli(&["ACL", "SETUSER", "presenced", "on", ">s3cret-pass", "~presence:*", "&presence:*", "+@all"]).unwrap();
    server.cli(&["ACL", "SETUSER", "default", "off"]).unwrap();
    let urls = format!("[\"{}\"]", server.url());
    let good = redis_config(&[
        ("PRESENCE_REDIS__URLS", &urls),
        ("PRESENCE_REDIS__USERNAME", "presenced"),
        ("PRESENCE_REDIS__PASSWORD", "s3cret-pass"),
    ]);
    assert!(!format!("{good:?}").contains("s3cret-pass"), "the password never reaches a log");
    let app = presenced::server::App::build(good).await.unwrap_or_else(|e| panic!("{e}"));
    app.svc.store.health().await.unwrap();
    app.svc.store.shutdown().await;
    let bad =
        redis_config(&[("PRESENCE_REDIS__URLS", &urls), ("PRESENCE_REDIS__USERNAME", "presenced"), ("PRESENCE_REDIS__PASSWORD", "wrong")]);
    let e = presenced::server::App::build(bad).await.err().expect("wrong password refused").to_string();
    assert!(e.contains("redis") && e.contains("cannot connect"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_fails_the_start_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("[\"redis://127.0.0.1:{port}\"]");
    let start = Instant::now();
    let e =
        presenced::server::App::build(redis_config(&[("PRESENCE_REDIS__URLS", &url)])).await.err().expect("nothing listens").to_string();
    assert!(e.contains("store.backend redis") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
}

/// Sentinel: nodes ask the Sentinel for the master; when the master dies and the
/// Sentinel promotes its replica, the nodes follow (writes, reads and cross-node events
/// work again on the new master, with the replicated data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_sentinel_failover() {
    let mut s = common::redis::RedisSentinel::start();
    let urls = format!("[\"redis://127.0.0.1:{}\"]", s.sentinel_port);
    let env = |id: &'static str| {
        vec![
            ("PRESENCE_STORE__BACKEND", "redis".to_string()),
            ("PRESENCE_REDIS__URLS", urls.clone()),
            ("PRESENCE_REDIS__SENTINEL_MASTER", "mymaster".to_string()),
            ("PRESENCE_REDIS__REQUEST_TIMEOUT", "500ms".to_string()),
            ("PRESENCE_SERVICE__NODE_ID", id.to_string()),
        ]
    };
    let start = async |id: &'static str| {
        let e = env(id);
        let refs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        TestServer::start(&refs).await
    };
    let a = start("node-a").await;
    let b = start("node-b").await;
    assert!(a.get("/health/redis").await.1["data"]["server"].as_str().unwrap().contains(&s.master.port.to_string()));
    let mut w = b.watch("w", &["alice"]).await;
    assert_eq!(w.next("alice").await["status"], "offline");
    assert_eq!(a.put_status("alice", Some(&a.token("alice")), json!({"status":"busy","message":"before"})).await.0, 200);
    assert_eq!(w.next("alice").await["status"], "busy");
    // Replicated before the master dies.
    eventually("replicated", Duration::from_secs(5), async || {
        s.replica.cli(&["HGET", "presence:user:{alice}", "v"]).is_some_and(|v| v.contains("before"))
    })
    .await;

    s.master.stop();
    let killed = Instant::now();
    let promoted = eventually("the sentinel promotes the replica", Duration::from_secs(30), async || {
        s.ask(&["SENTINEL", "get-master-addr-by-name", "mymaster"]).is_some_and(|o| o.contains(&s.replica.port.to_string()))
    })
    .await;
    let writable = eventually("node A writes to the new master", Duration::from_secs(30), async || {
        a.put_status("alice", Some(&a.token("alice")), json!({"status":"away","message":"after"})).await.0 == 200
    })
    .await;
    eprintln!(
        "failover: promoted after {promoted:?}, node A writing again {writable:?} after that ({:?} after the kill)",
        killed.elapsed()
    );
    let p = w.until("alice", |p| p["status"] == "away").await;
    assert_eq!(p["message"], "after", "B's watcher hears about changes made after the failover");
    let v = b.get("/api/v2/presence/alice").await.1;
    assert_eq!(v["data"]["alice"]["message"], "after");
    a.stop().await;
    b.stop().await;
}
