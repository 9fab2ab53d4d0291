//! Shared test harness: a real `presenced` router on a real loopback socket.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use presenced::bus::EventBus;
use presenced::clock::SystemClock;
use presenced::config::Config;
use presenced::core::{Ending, Millis, NewSession, Presence, Registered, Session, UserId};
use presenced::server::App;
use presenced::service::Service;
use presenced::store::Store;
use presenced::store::{DirTable, DirectoryStore, PresenceStore, SetStatus, StoreError, StoreStats};
use tokio::sync::oneshot;

pub mod engine;
pub mod nats;
pub mod proxy;
pub mod rabbit;
pub mod redis;
pub mod source;
pub mod wsclient;

pub const SECRET: &str = "test-secret-test-secret-test-secret";

/// Polls `f` until it holds; panics naming `what` after `within`. Returns how long it took.
pub async fn eventually(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The offline grace of the suite's servers: `0s`, a socket's end shows at once (what the
/// tests written before the grace expect, and the grace's own baseline). Tests of the
/// grace set `PRESENCE_PRESENCE__OFFLINE_GRACE` themselves (a later setting wins).
pub const NO_GRACE: (&str, &str) = ("PRESENCE_PRESENCE__OFFLINE_GRACE", "0s");

/// The real `presenced` binary with nothing from the environment: loopback, ephemeral
/// HTTP and gRPC ports, data in `dir`, the test secret, JSON logs, no offline grace (add
/// the subcommand).
pub fn presenced_cmd(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_presenced"));
    cmd.env_clear()
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", "0")
        .env("PRESENCE_SERVICE__GRPC_PORT", "0")
        .env("PRESENCE_SERVICE__DATA_DIR", dir)
        .env("PRESENCE_AUTH__JWT_SECRET", SECRET)
        .env("PRESENCE_LOGGING__FORMAT", "json")
        .env(NO_GRACE.0, NO_GRACE.1);
    cmd
}

/// Spawns a `presenced serve` command (stderr piped, JSON logs) and waits, at most 20 s,
/// for the log line giving its bound HTTP address.
pub fn spawn_serve(cmd: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().expect("spawn presenced");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = v["http"].as_str() {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("presenced did not report its address within 20s");
    (child, addr)
}
pub const ISSUER: &str = "presence-service";

/// A server on 127.0.0.1:<ephemeral>, stopped when dropped or by [`TestServer::stop`].
pub struct TestServer {
    pub base: String,
    /// `http://127.0.0.1:<port>` of the gRPC listener.
    pub grpc: String,
    pub svc: Arc<Service>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// A config for tests: fixed secret, temporary data dir, loopback, no offline grace
/// ([`NO_GRACE`]; `extra_env` may set one).
pub fn test_config(extra_env: &[(&str, &str)]) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env: Vec<(String, String)> = vec![
        ("PRESENCE_AUTH__JWT_SECRET".into(), SECRET.into()),
        ("PRESENCE_SERVICE__HOST".into(), "127.0.0.1".into()),
        ("PRESENCE_SERVICE__NODE_ID".into(), "test-node".into()),
        ("PRESENCE_SERVICE__DATA_DIR".into(), dir.path().display().to_string()),
        (NO_GRACE.0.into(), NO_GRACE.1.into()),
    ];
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    (Config::load(None, env).expect("test config"), dir)
}

impl TestServer {
    pub async fn start(extra_env: &[(&str, &str)]) -> TestServer {
        let (config, dir) = test_config(extra_env);
        let app = App::build(config).await.expect("build app");
        Self::serve(app, Some(dir)).await
    }

    /// As [`TestServer::start`], with `serve --dev`'s `/dev/token`.
    pub async fn start_dev(extra_env: &[(&str, &str)]) -> TestServer {
        let (config, dir) = test_config(extra_env);
        let mut app = App::build(config).await.expect("build app");
        app.dev = true;
        Self::serve(app, Some(dir)).await
    }

    /// Serves around a given store (e.g. one that fails on purpose).
    pub async fn with_store(extra_env: &[(&str, &str)], store: Arc<dyn Store>) -> TestServer {
        Self::with_store_and_bus(extra_env, store, EventBus::new(1024)).await
    }

    /// Serves around a given store that publishes its events on `bus`.
    pub async fn with_store_and_bus(extra_env: &[(&str, &str)], store: Arc<dyn Store>, bus: EventBus) -> TestServer {
        let (config, dir) = test_config(extra_env);
        let app = App::with_store(config, store, bus, Arc::new(SystemClock)).await.expect("build app");
        Self::serve(app, Some(dir)).await
    }

    async fn serve(app: App, dir: Option<tempfile::TempDir>) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let grpc = format!("http://{}", grpc_listener.local_addr().expect("addr"));
        let svc = app.svc.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.serve_all(listener, Some(grpc_listener), async move {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        TestServer { base, grpc, svc, client, stop: Some(tx), task: Some(task), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A token for `sub` signed with the test secret.
    pub fn token(&self, sub: &str) -> String {
        self.svc.auth.mint(sub, Duration::from_secs(3600), None).expect("mint")
    }

    pub fn admin_token(&self, sub: &str) -> String {
        self.svc.auth.mint(sub, Duration::from_secs(3600), Some("presence:admin")).expect("mint")
    }

    /// A gRPC request carrying a backend's (`presence:admin`) token.
    pub fn admin_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert("authorization", format!("Bearer {}", self.admin_token("svc")).parse().expect("header"));
        r
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(self.url(path)).send().await.expect("request");
        decode(r).await
    }

    pub async fn put_status(&self, user: &str, token: Option<&str>, body: serde_json::Value) -> (u16, serde_json::Value) {
        let mut req = self.client.put(self.url(&format!("/api/v2/presence/{user}"))).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        decode(req.send().await.expect("request")).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Unix milliseconds of an RFC 3339 time (the API's `last_seen`, `updated_at`).
pub fn unix_ms(rfc3339: &serde_json::Value) -> i64 {
    let s = rfc3339.as_str().unwrap_or_else(|| panic!("not a time: {rfc3339}"));
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// The value of one series (`name` or `name{labels}`) in Prometheus text; 0 when absent.
/// Metrics are process-wide: where tests share a process (`cargo test`), compare a value
/// with one read before, not with an absolute number.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl TestServer {
    /// `GET /metrics`.
    pub async fn scrape(&self) -> String {
        self.client.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("metrics body")
    }

    /// `store_writes_total{kind="user"}` (the users' records written; one process-wide
    /// metric, so every node a test starts adds to it).
    pub async fn user_writes(&self) -> f64 {
        let text = self.scrape().await;
        text.lines()
            .find(|l| l.starts_with("store_writes_total{") && l.contains("kind=\"user\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Status and JSON body; panics (failing the test) when the body is not JSON.
pub async fn decode(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, json)
}

/// Asserts the error envelope: `success: false`, a non-empty `error`, the given code.
pub fn assert_error(resp: &(u16, serde_json::Value), status: u16, code: &str) {
    let (s, body) = resp;
    assert_eq!(*s, status, "unexpected status, body: {body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
}

/// A store whose backend is down, to check the 503 / UNAVAILABLE mapping end to end.
pub struct DownStore;

fn down<T>() -> Result<T, StoreError> {
    Err(StoreError::Unreachable("backend down".into()))
}

#[async_trait]
impl PresenceStore for DownStore {
    async fn get_many(&self, _: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        down()
    }

    async fn set_status(&self, _: &UserId, _: SetStatus) -> Result<Presence, StoreError> {
        down()
    }

    async fn clear_status(&self, _: &UserId) -> Result<Presence, StoreError> {
        down()
    }

    async fn erase(&self, _: &UserId) -> Result<bool, StoreError> {
        down()
    }

    async fn register_session(&self, _: &UserId, _: NewSession) -> Result<Registered, StoreError> {
        down()
    }

    async fn refresh_session(&self, _: &UserId, _: &str) -> Result<Option<Millis>, StoreError> {
        down()
    }

    async fn end_session(&self, _: &UserId, _: &str, _: Option<u64>, _: Ending) -> Result<bool, StoreError> {
        down()
    }

    async fn set_activity(&self, _: &UserId, _: &str, _: Option<u64>, _: presenced::core::Activity, _: bool) -> Result<bool, StoreError> {
        down()
    }

    async fn devices(&self, _: &UserId) -> Result<Vec<Session>, StoreError> {
        down()
    }

    async fn sessions_of_instance(&self, _: &str) -> Result<Vec<(UserId, Session)>, StoreError> {
        down()
    }

    async fn rebind_session(&self, _: &UserId, _: &str, _: u64, _: i64) -> Result<bool, StoreError> {
        down()
    }

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    async fn health(&self) -> Result<(), StoreError> {
        down()
    }
    async fn shutdown(&self) {}
}

#[async_trait]
impl DirectoryStore for DownStore {
    async fn put_directory(&self, _: DirTable, _: &str, _: Option<Vec<u8>>) -> Result<(), StoreError> {
        down()
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        down()
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client subscribed to some users, reading the pushes about them.
pub struct Watcher {
    ws: WsStream,
}

impl TestServer {
    /// `ws://…/ws` for `user` on `device`, with a token in the query.
    pub fn ws_url(&self, user: &str, device: &str) -> String {
        format!("{}/ws?token={}&device_id={device}", self.base.replace("http", "ws"), self.token(user))
    }

    /// Connects as `viewer` and subscribes to `users`.
    pub async fn watch(&self, viewer: &str, users: &[&str]) -> Watcher {
        use futures_util::SinkExt;
        let (mut ws, _) = tokio_tungstenite::connect_async(self.ws_url(viewer, "watcher")).await.expect("ws connect");
        let sub = serde_json::json!({"type": "subscribe", "payload": {"user_ids": users}}).to_string();
        ws.send(tokio_tungstenite::tungstenite::Message::text(sub)).await.expect("subscribe");
        Watcher { ws }
    }
}

impl Watcher {
    /// The next pushed presence of `user` (its `payload`), within 5 s.
    pub async fn next(&mut self, user: &str) -> serde_json::Value {
        loop {
            let p = self.next_any().await;
            if p["user_id"] == user {
                return p;
            }
        }
    }

    /// The first pushed presence of `user` for which `pred` holds (skipping others, e.g.
    /// device-count changes on the way), within 5 s each.
    pub async fn until(&mut self, user: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        loop {
            let p = self.next(user).await;
            if pred(&p) {
                return p;
            }
        }
    }

    /// Asserts that no push about `user` arrives within `ms` (pushes about others are
    /// skipped).
    pub async fn nothing_about(&mut self, user: &str, ms: u64) {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(m) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = m {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON push");
                assert!(!(v["type"] == "presence_update" && v["payload"]["user_id"] == user), "expected nothing about {user}, got {v}");
            }
        }
    }

    /// The next pushed presence of anyone (its `payload`), within 5 s.
    pub async fn next_any(&mut self) -> serde_json::Value {
        self.next_any_until(tokio::time::Instant::now() + Duration::from_secs(5)).await.expect("a push within 5s")
    }

    /// The next pushed presence of anyone (its `payload`) before `deadline`, whatever
    /// other frames come meanwhile; `None` if none came.
    pub async fn next_any_until(&mut self, deadline: tokio::time::Instant) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?.expect("open").expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON push");
                if v["type"] == "presence_update" {
                    return Some(v["payload"].clone());
                }
            }
        }
    }
}

/// Runs `openssl args` in `dir`; panics with its error output when it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with openssl.
pub fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=presenced-test-ca",
    ]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// Durable state written through node `n`: alice busy ("flight", until changed), her
/// contacts `[bob]`, her privacy `contacts` (see [`assert_durable_state`]).
pub async fn write_durable_state(n: &TestServer) {
    let alice = n.token("alice");
    assert_eq!(n.put_status("alice", Some(&alice), serde_json::json!({"status":"busy","message":"flight","ttl":0})).await.0, 200);
    for (path, body) in [
        ("/api/v2/contacts/alice", serde_json::json!({"contacts":["bob"]})),
        ("/api/v2/presence/alice/privacy", serde_json::json!({"visibility":"contacts"})),
    ] {
        let r = n.client.put(n.url(path)).bearer_auth(&alice).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

/// What [`write_durable_state`] wrote, read through node `n` (after every process
/// restarted): the status, the contacts, and privacy (a stranger sees her offline, her
/// contact sees her busy).
pub async fn assert_durable_state(n: &TestServer) {
    let get = async |path: &str, viewer: &str| {
        let r = n.client.get(n.url(path)).bearer_auth(n.token(viewer)).send().await.unwrap();
        decode(r).await.1["data"].clone()
    };
    let me = get("/api/v2/presence/alice", "alice").await;
    assert_eq!((me["alice"]["status"].as_str(), me["alice"]["message"].as_str()), (Some("busy"), Some("flight")));
    assert_eq!(get("/api/v2/contacts/alice", "alice").await["contacts"], serde_json::json!(["bob"]));
    assert_eq!(get("/api/v2/presence/alice", "carol").await["alice"]["status"], "offline", "privacy survived: a stranger sees her offline");
    assert_eq!(get("/api/v2/presence/alice", "bob").await["alice"]["status"], "busy", "her contact sees her");
}
