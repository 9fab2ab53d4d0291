//! Cluster-mode foundations on a real `nats-server`: connection and health, credentials,
//! KV bucket set-up on 2.9.10. (Concurrent nodes hammering one user: the conformance
//! suite's `two_nodes_hammering_one_user_lose_nothing`, on every cluster backend.)

mod common;

use std::time::{Duration, Instant};

use common::nats::NatsServer;
use presenced::config::Config;
use presenced::store::nats::kv::{self, BucketConfig};
use presenced::store::nats::Nats;

fn cfg(url: &str, env: &[(&str, &str)]) -> presenced::config::NatsConfig {
    let mut vars: Vec<(String, String)> =
        vec![("PRESENCE_NATS__URLS".into(), format!("[\"{url}\"]")), ("PRESENCE_NATS__CONNECT_TIMEOUT".into(), "2s".into())];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(None, vars).expect("config").nats
}

fn bucket() -> BucketConfig {
    BucketConfig { name: "presence".into(), replicas: 1, file_storage: true }
}

#[tokio::test]
async fn health_follows_the_server_through_a_restart() {
    let mut server = NatsServer::start("");
    let n = Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__MAX_RECONNECT_DELAY", "200ms")]), "node").await.unwrap();
    let h = n.health();
    assert!(h.connected && h.state == "connected", "{h:?}");
    assert!(h.server.contains("2."), "{h:?}");
    let store = kv::open_bucket(&async_nats::jetstream::new(n.client.clone()), &bucket()).await.unwrap();
    store.put("k", "v1".into()).await.unwrap();

    server.stop();
    wait_until(|| !n.health().connected, "disconnected").await;
    assert_eq!(n.health().state, "disconnected");
    server.restart();
    wait_until(|| n.health().connected, "reconnected").await;
    // JetStream state survived the restart and the client works again.
    let v = tokio::time::timeout(Duration::from_secs(10), store.get("k")).await.unwrap().unwrap();
    assert_eq!(v.as_deref(), Some(&b"v1"[..]));
}

async fn wait_until(f: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(15), "not {what} within 15s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn credentials_from_configuration() {
    let server = NatsServer::start("authorization { user: presenced, password: \"s3cret pw\" }");
    let ok =
        Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__USER", "presenced"), ("PRESENCE_NATS__PASSWORD", "s3cret pw")]), "n").await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    let bad = Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__USER", "presenced"), ("PRESENCE_NATS__PASSWORD", "wrong")]), "n").await;
    let e = bad.err().expect("wrong password refused").to_string();
    assert!(e.contains(&server.url()), "error names the servers: {e}");

    let server = NatsServer::start("authorization { token: \"t0ken\" }");
    assert!(Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__TOKEN", "t0ken")]), "n").await.is_ok());
    assert!(Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__TOKEN", "nope")]), "n").await.is_err());
}

#[tokio::test]
async fn unreachable_servers_fail_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let start = Instant::now();
    let e = Nats::connect(&cfg(&url, &[]), "n").await.err().expect("nothing listens there").to_string();
    assert!(e.contains("cannot connect") && e.contains(&url), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn tls_with_a_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = common::certificates(certs.path());
    let server = NatsServer::start(&format!("tls {{ cert_file: \"{}\", key_file: \"{}\" }}", cert.display(), key.display()));
    let ca_s = ca.display().to_string();
    let n = Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__TLS__CA_FILE", &ca_s), ("PRESENCE_NATS__TLS__REQUIRED", "true")]), "n")
        .await
        .expect("TLS with the right CA");
    let store = kv::open_bucket(&async_nats::jetstream::new(n.client.clone()), &bucket()).await.unwrap();
    store.put("k", "over tls".into()).await.unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"over tls"[..]));
    // Without the CA the server's certificate is not trusted.
    let e = Nats::connect(&cfg(&server.url(), &[("PRESENCE_NATS__TLS__REQUIRED", "true")]), "n")
        .await
        .err()
        .expect("untrusted certificate refused");
    assert!(e.to_string().contains("cannot connect"), "{e}");
}

fn embedded_env(dir: &std::path::Path, port: u16) -> Vec<(String, String)> {
    vec![
        ("PRESENCE_STORE__BACKEND".into(), "nats".into()),
        ("PRESENCE_NATS__EMBEDDED".into(), "true".into()),
        ("PRESENCE_NATS__EMBEDDED_LISTEN".into(), format!("127.0.0.1:{port}")),
        ("PRESENCE_NATS__DATA_DIR".into(), dir.join("nats").display().to_string()),
        ("PRESENCE_NATS__MAX_RECONNECT_DELAY".into(), "200ms".into()),
        ("PRESENCE_SERVICE__DATA_DIR".into(), dir.display().to_string()),
        ("PRESENCE_AUTH__JWT_SECRET".into(), "s".repeat(32)),
        ("PRESENCE_SERVICE__NODE_ID".into(), "solo".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_nats_server_is_started_restarted_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = Config::load(None, embedded_env(dir.path(), port)).unwrap();
    let app = presenced::server::App::build(config).await.expect("starts its own nats-server");
    let embedded = app.embedded.clone().expect("embedded server");
    let svc = app.svc.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let token = svc.auth.mint("alice", Duration::from_secs(600), None).unwrap();
    let r = http
        .put(format!("{base}/api/v2/presence/alice"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"status":"busy","ttl":0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The server dies: the supervisor brings it back, the node reconnects, nothing is lost.
    let pid = embedded.pid();
    assert!(pid > 1, "a real child pid (never kill -9 0: that is our own process group)");
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    wait_until(|| embedded.restarts() == 1, "restarted").await;
    assert_ne!(embedded.pid(), pid);
    let start = Instant::now();
    loop {
        let r = http.get(format!("{base}/health/nats")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v: serde_json::Value = http.get(format!("{base}/api/v2/presence/alice")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["data"]["alice"]["status"], "busy");

    // Shutdown stops the child.
    let pid = embedded.pid();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server).await.unwrap().unwrap().unwrap();
    wait_until(
        || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        },
        "nats-server stopped",
    )
    .await;
}

#[tokio::test]
async fn embedded_with_a_missing_binary_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = embedded_env(dir.path(), 1);
    env.push(("PRESENCE_NATS__SERVER_BINARY".into(), "/nonexistent/nats-server".into()));
    let e = presenced::server::App::build(Config::load(None, env).unwrap()).await.err().expect("refused").to_string();
    assert!(e.contains("/nonexistent/nats-server") && e.contains("not found"), "{e}");
}

/// A nats-server with less JetStream storage than the events stream reserves: the node
/// refuses to start and says which two settings to change (nats-server sizes its storage
/// from the free disk when its config does not; a CI machine with a full disk hit this).
#[tokio::test]
async fn too_little_jetstream_storage_is_refused_with_what_to_change() {
    let server = NatsServer::start_with("max_file_store: 64MB", "");
    let dir = tempfile::tempdir().unwrap();
    let env = |max_bytes: &str| -> Vec<(String, String)> {
        [
            ("PRESENCE_STORE__BACKEND", "nats".to_string()),
            ("PRESENCE_NATS__URLS", format!("[\"{}\"]", server.url())),
            ("PRESENCE_SERVICE__DATA_DIR", dir.path().display().to_string()),
            ("PRESENCE_AUTH__JWT_SECRET", "s".repeat(32)),
            ("PRESENCE_SERVICE__NODE_ID", "small".to_string()),
            ("PRESENCE_NATS__EVENTS__MAX_BYTES", max_bytes.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let e = presenced::server::App::build(Config::load(None, env("1GiB")).unwrap()).await.err().expect("refused").to_string();
    assert!(e.contains("PRESENCE_EVENTS") && e.contains("nats.events.max_bytes (1073741824 bytes)") && e.contains("max_file_store"), "{e}");
    // Within the server's storage, the same node starts.
    let app = presenced::server::App::build(Config::load(None, env("16MiB")).unwrap()).await;
    assert!(app.is_ok(), "{:?}", app.err().map(|e| e.to_string()));
}

/// Key listings (the janitor's view of the leases, a dead node's owner index) end, and
/// hold exactly the live keys under the prefix: not purged or deleted ones, not another
/// prefix's, each once though rewritten while listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_listings_end_with_the_live_keys_while_they_are_rewritten() {
    let server = NatsServer::start("");
    let n = Nats::connect(&cfg(&server.url(), &[]), "node").await.unwrap();
    let store = kv::open_bucket(&async_nats::jetstream::new(n.client.clone()), &bucket()).await.unwrap();
    let list = || async {
        let mut k = tokio::time::timeout(Duration::from_secs(10), kv::live_keys(&store, "node.", Duration::from_secs(2)))
            .await
            .expect("a listing ends")
            .expect("listed");
        k.sort();
        k
    };
    assert!(list().await.is_empty(), "an empty bucket lists nothing");
    // More keys than one fetch takes, some removed, and keys under another prefix.
    for i in 0..1500 {
        store.put(format!("node.n{i:04}"), "v".into()).await.unwrap();
    }
    for i in 0..1500 {
        if i % 3 == 0 {
            store.purge(format!("node.n{i:04}")).await.unwrap();
        } else if i % 3 == 1 {
            store.delete(format!("node.n{i:04}")).await.unwrap();
        }
    }
    store.put("instance.gw", "v".into()).await.unwrap();
    let live: Vec<String> = (0..1500).filter(|i| i % 3 == 2).map(|i| format!("n{i:04}")).collect();
    assert_eq!(list().await, live);
    // Listed again and again while three keys are rewritten as fast as the server takes them.
    let w = store.clone();
    let writer = tokio::spawn(async move {
        loop {
            for i in [2, 5, 8] {
                let _ = w.put(format!("node.n{i:04}"), "v2".into()).await;
            }
        }
    });
    for _ in 0..30 {
        assert_eq!(list().await, live);
    }
    writer.abort();
    // Nothing left behind on the server: each listing removed its consumer.
    let info = store.stream.clone().info().await.unwrap().clone();
    assert_eq!(info.state.consumer_count, 0, "{:?}", info.state);
}
