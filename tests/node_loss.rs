//! Node leases on real processes, on NATS and on Redis: a `presenced` node killed with
//! SIGKILL has its users go offline everywhere within the lease TTL, with exactly one
//! offline event per user (one janitor wins); heartbeats, wherever they land, cost no
//! store write; a node stops in bounded time with its engine gone.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::engine::{Engine, EventLog};
use common::TestServer;
use futures_util::StreamExt;

const LEASE: Duration = Duration::from_secs(2);

fn cluster_env(e: &Engine, node: &str, lease: Duration) -> Vec<(String, String)> {
    let mut env = e.env(node, None);
    env.push(("PRESENCE_PRESENCE__NODE_LEASE_TTL".into(), format!("{}ms", lease.as_millis())));
    env
}

async fn node(e: &Engine, id: &str) -> TestServer {
    node_with_lease(e, id, LEASE).await
}

async fn node_with_lease(e: &Engine, id: &str, lease: Duration) -> TestServer {
    let env = cluster_env(e, id, lease);
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&refs).await
}

/// A `presenced serve` process (killed when dropped).
struct Proc {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(e: &Engine, id: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::presenced_cmd(dir.path());
    cmd.env("PRESENCE_SERVICE__SHUTDOWN_GRACE", "1s")
        .env("PRESENCE_NATS__REQUEST_TIMEOUT", "500ms")
        .env("PRESENCE_REDIS__REQUEST_TIMEOUT", "500ms");
    for (k, v) in cluster_env(e, id, LEASE) {
        cmd.env(k, v);
    }
    let (child, addr) = common::spawn_serve(cmd.arg("serve"));
    Proc { child, base: format!("http://{addr}"), _dir: dir }
}

fn ws_url(base: &str, token: &str, device: &str) -> String {
    format!("{}/ws?token={token}&device_id={device}", base.replace("http", "ws"))
}

on_engines!(a_killed_node_takes_its_users_offline_once_within_the_lease_ttl: nats, redis);
async fn a_killed_node_takes_its_users_offline_once_within_the_lease_ttl(e: Engine) {
    let a = node(&e, "node-a").await;
    let c = node(&e, "node-c").await;
    let b = spawn_node(&e, "node-b");

    // Every offline event the engine carries, whoever publishes it.
    let mut offline = EventLog::open(&e, "offline").await;

    let users = ["u1", "u2", "u3"];
    let mut watcher = a.watch("watcher", &users).await;
    for u in users {
        assert_eq!(watcher.next(u).await["status"], "offline");
    }
    // The users connect to B (u3 on two devices) and stay connected.
    let mut sockets = Vec::new();
    for (u, dev) in [("u1", "phone"), ("u2", "phone"), ("u3", "phone"), ("u3", "laptop")] {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(&b.base, &a.token(u), dev)).await.expect("connect to B");
        sockets.push(ws);
    }
    // Their online events arrive in any order.
    let mut online = std::collections::BTreeSet::new();
    while online.len() < users.len() {
        let p = watcher.next_any().await;
        assert_eq!(p["status"], "online", "{p}");
        online.insert(p["user_id"].as_str().unwrap().to_string());
    }
    // (On NATS, C's REST read comes from its cache, which follows the KV within milliseconds.)
    let two = async || c.get("/api/v2/presence/u3").await.1["data"]["u3"]["device_count"] == 2;
    common::eventually("u3's two devices seen on C", Duration::from_secs(5), two).await;

    // SIGKILL: no goodbye, no unregister.
    let killed = Instant::now();
    drop(b);
    let mut seen = Vec::new();
    while seen.len() < users.len() {
        let p = watcher.next_any().await;
        if p["status"] == "offline" {
            seen.push(p["user_id"].as_str().unwrap().to_string());
        }
    }
    let took = killed.elapsed();
    eprintln!("users of the killed node offline on node A after {took:?} (lease TTL {LEASE:?})");
    // Lapse after at most one TTL from the last renewal, found at the next janitor pass.
    assert!(took < LEASE + LEASE / 3 + Duration::from_secs(2), "took {took:?}");
    seen.sort();
    assert_eq!(seen, users);

    // Exactly one offline event per user, though two nodes run janitors.
    tokio::time::sleep(LEASE).await;
    assert_eq!(offline.users().await, users);
    for u in users {
        let (_, body) = c.get(&format!("/api/v2/presence/{u}")).await;
        assert_eq!(body["data"][u]["status"], "offline", "{body}");
        assert!(body["data"][u]["last_seen"].is_string(), "last_seen kept: {body}");
    }
    drop(sockets);
    a.stop().await;
    c.stop().await;
}

on_engines!(heartbeats_cost_no_store_writes_wherever_they_land: nats, redis);
async fn heartbeats_cost_no_store_writes_wherever_they_land(e: Engine) {
    use presenced::grpc::pb;
    // A long lease: no renewal falls in the measured window, so any write is a heartbeat's.
    let a = node_with_lease(&e, "node-a", Duration::from_secs(60)).await;
    let c = node_with_lease(&e, "node-c", Duration::from_secs(60)).await;
    let mut ga = pb::presence_api_client::PresenceApiClient::connect(a.grpc.clone()).await.unwrap();
    let mut gc = pb::presence_api_client::PresenceApiClient::connect(c.grpc.clone()).await.unwrap();
    let reg = pb::RegisterSessionRequest {
        user_id: "dana".into(),
        device_id: "d1".into(),
        instance_id: "gw".into(),
        ttl_seconds: 30,
        platform: String::new(),
        active: None,
    };
    ga.register_session(a.admin_request(reg)).await.unwrap();
    let refresh = || pb::RefreshSessionRequest { user_id: "dana".into(), device_id: "d1".into(), active: None, idle_since: None };
    let writes = || a.svc.store.stats().writes + c.svc.store.stats().writes;
    let before = writes();
    for _ in 0..50 {
        assert!(ga.refresh_session(a.admin_request(refresh())).await.unwrap().into_inner().expires_at.is_some());
    }
    // Heartbeats reaching a node that does not own the session go to the owner.
    for _ in 0..20 {
        assert!(gc.refresh_session(c.admin_request(refresh())).await.unwrap().into_inner().expires_at.is_some());
    }
    let heartbeat_writes = writes() - before;
    assert_eq!(heartbeat_writes, 0, "{heartbeat_writes} writes for 70 heartbeats");
    let devices = gc.get_user_devices(c.admin_request(pb::GetUserDevicesRequest { user_id: "dana".into() })).await.unwrap().into_inner();
    assert_eq!(devices.devices.len(), 1);

    // The owner stops: the session ends with it (graceful shutdown releases what it holds).
    a.stop().await;
    let (_, body) = c.get("/api/v2/presence/dana").await;
    assert_eq!(body["data"]["dana"]["status"], "offline", "{body}");
    let lapsed = gc.refresh_session(c.admin_request(refresh())).await.unwrap_err();
    assert_eq!(lapsed.code(), tonic::Code::NotFound);
    c.stop().await;
}

on_engines!(shutdown_is_bounded_when_the_engine_is_gone: nats, redis);
/// SIGTERM while the engine is gone: the node still exits, in bounded time (its sessions
/// are left to its lease and the janitor).
async fn shutdown_is_bounded_when_the_engine_is_gone(mut e: Engine) {
    let mut b = spawn_node(&e, "node-b");
    let (ws, _) = tokio_tungstenite::connect_async(ws_url(&b.base, &b_token("u9"), "phone")).await.expect("connect to B");
    e.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = b.child.id().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    loop {
        if b.child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(12), "presenced did not exit within 12s of SIGTERM with {} down", e.name());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("exited {:?} after SIGTERM with {} down", start.elapsed(), e.name());
    drop(ws);
}

fn b_token(sub: &str) -> String {
    let auth = presenced::auth::Authenticator::new(common::SECRET, common::ISSUER, Duration::from_secs(30), None);
    auth.mint(sub, Duration::from_secs(3600), None).expect("mint")
}

/// Node A (lease TTL `lease`) on its own nats-server, and a client of that server with
/// the leases bucket (the engine is returned to keep the server running).
async fn node_a_and_leases(lease: Duration) -> (Engine, TestServer, async_nats::Client, async_nats::jetstream::kv::Store) {
    let e = Engine::nats();
    let Engine::Nats(server) = &e else { unreachable!() };
    let a = node_with_lease(&e, "node-a", lease).await; // it creates the buckets
    let client = async_nats::connect(server.url()).await.unwrap();
    let leases = async_nats::jetstream::new(client.clone()).get_key_value("presence_nodes").await.unwrap();
    (e, a, client, leases)
}

/// A counter from the node's `/metrics` (0 until first counted).
async fn counter(n: &TestServer, name: &str) -> f64 {
    let metrics = reqwest::get(n.url("/metrics")).await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map_or(0.0, |l| l.split_whitespace().last().unwrap().parse().unwrap())
}

/// A lease also lapses when the store is too slow to take renewals. Its node still
/// runs: the janitor asks it first and leaves it its lease (a claim would end all its
/// sessions, which it would then write all back), up to four TTLs lapsed. A node that
/// does not answer, or one lapsed longer, is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_whose_node_answers_is_not_claimed() {
    // A's own lease is long enough that its renewals are never slow (over a third of
    // its TTL) on a loaded machine: then it would spare every lease, answering or not.
    // Its janitor scans every 2 s.
    let (_e, a, client, leases) = node_a_and_leases(Duration::from_secs(6)).await;
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Two nodes that answer: "slow" (5 s TTL) lapsed 1 s ago, "stuck" (1 s) 10 s ago;
    // and "gone" (1 s), lapsed 1 s ago, which answers nothing.
    for (node, ttl, renewed_ago) in [("slow", 5000, 6000), ("stuck", 1000, 11_000), ("gone", 1000, 2000)] {
        let lease = serde_json::json!({"node_id": node, "started_at": 0, "renewed_at": now() - renewed_ago, "ttl_ms": ttl});
        leases.put(format!("node.{node}"), lease.to_string().into()).await.unwrap();
    }
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut answering = Vec::new();
    for node in ["slow", "stuck"] {
        let mut sub = client.subscribe(format!("presence.node.{node}.alive")).await.unwrap();
        let (c, asked) = (client.clone(), asked.clone());
        answering.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(reply) = m.reply {
                    let _ = c.publish(reply, "".into()).await;
                }
            }
        }));
    }
    client.flush().await.unwrap();
    let state = async |node: &str| {
        let v = leases.get(format!("node.{node}")).await.unwrap();
        v.map(|v| serde_json::from_slice::<serde_json::Value>(&v).unwrap())
    };
    let claimed = async |node: &str| state(node).await.is_none_or(|l| l["ended_by"].is_string());
    common::eventually("the silent node's lease claimed", Duration::from_secs(10), async || claimed("gone").await).await;
    common::eventually("the stuck node's lease claimed", Duration::from_secs(10), async || claimed("stuck").await).await;
    // Two janitor periods later (at most 14 s after the start), the slow node keeps its lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let slow = state("slow").await.expect("the slow node's lease");
    assert!(slow["ended_by"].is_null(), "{slow}");
    let spared = counter(&a, "nats_janitor_spared_total").await;
    assert!(spared >= 1.0, "spared {spared}");
    // Past four TTLs from its renewal (20 s) it is claimed though it answers.
    common::eventually("the slow node's lease claimed at last", Duration::from_secs(20), async || claimed("slow").await).await;
    assert!(asked.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the janitor asked the slow node");
    for h in answering {
        h.abort();
    }
    a.stop().await;
}

/// A renewal can be written though its answer times out under load: the lease's revision
/// moved and the node's next compare-and-swap conflicts. That is not a claim: the node
/// carries on from the stored lease (still its own, unclaimed) instead of writing all its
/// sessions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_answer_was_lost_is_not_taken_for_a_claim() {
    let (_e, a, _client, leases) = node_a_and_leases(LEASE).await;
    let lease = async || serde_json::from_slice::<serde_json::Value>(&leases.get("node.node-a").await.unwrap().unwrap()).unwrap();
    // The same lease written again, as a renewal whose answer never came back.
    let before = lease().await;
    leases.put("node.node-a", serde_json::to_vec(&before).unwrap().into()).await.unwrap();
    let renewed = async || lease().await["renewed_at"].as_i64() > before["renewed_at"].as_i64();
    common::eventually("renewed after the lost answer", Duration::from_secs(5), renewed).await;
    tokio::time::sleep(LEASE).await;
    let after = lease().await;
    assert!(after["ended_by"].is_null(), "{after}");
    assert_eq!(counter(&a, "nats_lease_lost_total").await, 0.0, "no lease taken for lost");
    a.stop().await;
}

on_engines!(a_killed_nodes_sessions_are_held_for_the_grace_by_the_node_that_adopts_them: nats, redis);
/// With a grace longer than the lease: the janitor that claims a killed node's lease
/// adopts its sessions, held until the grace (counted from the node's last renewal) ends.
/// A client that comes back after the claim but within the grace continues its session;
/// one that does not is offline once, at the end of the grace, on the event stream too.
async fn a_killed_nodes_sessions_are_held_for_the_grace_by_the_node_that_adopts_them(e: Engine) {
    let grace = ("PRESENCE_PRESENCE__OFFLINE_GRACE", "6s");
    let env = cluster_env(&e, "node-a", LEASE);
    let mut refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    refs.push(grace);
    let a = TestServer::start(&refs).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::presenced_cmd(dir.path());
    for (k, v) in cluster_env(&e, "node-b", LEASE) {
        cmd.env(k, v);
    }
    cmd.env(grace.0, grace.1);
    let (child, addr) = common::spawn_serve(cmd.arg("serve"));
    let b = Proc { child, base: format!("http://{addr}"), _dir: dir };
    let mut offline = EventLog::open(&e, "offline").await;
    let mut watcher = a.watch("watcher", &["back", "gone"]).await;
    watcher.next("back").await;
    watcher.next("gone").await;
    let mut sockets = Vec::new();
    for u in ["back", "gone"] {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(&b.base, &a.token(u), "phone")).await.expect("connect to B");
        sockets.push(ws);
        assert_eq!(watcher.next(u).await["status"], "online");
    }
    let claims = format!("{}_janitor_claims_total", e.name());
    let before = common::sample(&a.scrape().await, &claims);
    let killed = Instant::now();
    drop(b);
    drop(sockets);
    common::eventually("A claimed B's lease", Duration::from_secs(10), async || common::sample(&a.scrape().await, &claims) > before).await;
    let claimed = killed.elapsed();
    // Back after the claim, within the grace: the session continues, on A.
    let (_back, _) = tokio_tungstenite::connect_async(a.ws_url("back", "phone")).await.expect("connect to A");
    let p = watcher.next_any().await;
    assert_eq!((p["user_id"].as_str(), p["status"].as_str()), (Some("gone"), Some("offline")), "only gone is shown: {p}");
    let took = killed.elapsed();
    eprintln!("lease claimed {claimed:?} after the kill; gone offline after {took:?} (grace 6 s from B's last renewal)");
    assert!(took > Duration::from_secs(4) && took < Duration::from_secs(9), "{took:?}");
    watcher.nothing_about("back", 1000).await;
    assert_eq!(offline.users().await, vec!["gone".to_string()]);
    assert_eq!(a.get("/api/v2/presence/back").await.1["data"]["back"]["status"], "online");
    a.stop().await;
}
