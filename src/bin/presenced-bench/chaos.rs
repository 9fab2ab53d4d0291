//! `presenced-bench chaos`: does presence tell the truth at the edges?
//!
//! Three (`--nodes`) presenced processes in cluster mode on a real engine (nats-server
//! or redis-server), each reaching it through a TCP proxy in this process that the bench
//! can cut; `--clients` WebSocket clients, each a user with a stable device id, that
//! heartbeat, reconnect as a real client does (after a 1012 from a draining node within a
//! second, to another node; after a lost socket with backoff) and log when they were
//! connected: the ground truth. On every node, watchers log what they are shown: WebSocket
//! connections subscribed to every user, and a gRPC `WatchPresence {all: true}` stream.
//!
//! Scenarios: `rolling` (SIGTERM each node in turn, start it again), `kill` (`kill -9` of
//! a node, started again after the lease), `partition` (one node cut from the engine for
//! longer than the node lease; during the cut some of its clients move to other nodes and
//! some leave for good), `flaky` (random socket drops, each client back within 0.5-5 s).
//! In every scenario a few clients leave for good, half closing their socket and half
//! going silent, so departures are measured too.
//!
//! The checker compares what watchers were shown, and what every node reads at the end,
//! with the ground truth: false offline events (an offline shown for a user who was away
//! for less than the grace, or not at all) per 1,000 reconnects, false online events (a
//! user shown online again while gone), zombie-seconds (online shown past the moment a
//! departure should show: the grace, or `session_ttl` for a silent device, plus a
//! second), duplicate events, detection latency of real departures, and (partition) the
//! time every node's reads take to agree with the truth after the heal. Each scenario
//! runs with `--grace` and, side by side, with `offline_grace: 0s` (the baseline: what
//! users saw before the grace existed). Loopback only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::cluster::{nats_server, wait_port, Proc};
use super::{free_port, sibling, ws_config, Res};

#[derive(Parser, Clone)]
pub struct ChaosArgs {
    /// `nats`, `redis`, or `both`.
    #[arg(long, default_value = "both")]
    pub engine: String,
    /// `rolling`, `kill`, `partition`, `flaky` (several: comma-separated), or `all`.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// WebSocket clients (users), spread over the nodes.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// `presence.offline_grace` of the run (seconds).
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Skip the side-by-side run with `offline_grace: 0s`.
    #[arg(long)]
    pub no_baseline: bool,
    /// `presence.node_lease_ttl` (seconds).
    #[arg(long, default_value_t = 6)]
    pub lease_secs: u64,
    /// `presence.session_ttl` (seconds); clients heartbeat at `heartbeat_secs`.
    #[arg(long, default_value_t = 20)]
    pub session_ttl_secs: u64,
    #[arg(long, default_value_t = 8)]
    pub heartbeat_secs: u64,
    /// Share of the clients that leave for good during the scenario (half close their
    /// socket, half go silent).
    #[arg(long, default_value_t = 0.03)]
    pub leavers: f64,
    /// `flaky`: how long the network misbehaves, and each client's chance per second to
    /// lose its socket.
    #[arg(long, default_value_t = 30)]
    pub flaky_secs: u64,
    #[arg(long, default_value_t = 0.02)]
    pub drop_rate: f64,
    /// `partition`: share of the cut node's clients that move to another node during the
    /// cut, and share that leave for good.
    #[arg(long, default_value_t = 0.3)]
    pub movers: f64,
    #[arg(long, default_value_t = 0.1)]
    pub partition_leavers: f64,
    /// Also write the reports as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Milliseconds since the bench's clock started.
#[derive(Clone, Copy)]
struct Epoch(Instant);

impl Epoch {
    fn ms(&self) -> i64 {
        self.0.elapsed().as_millis() as i64
    }
}

/// What one client lived: when it was connected (and to which node), and how it left.
#[derive(Default, Debug, Clone)]
struct Truth {
    /// (from, to, node): from its `connected` message to the socket's end.
    intervals: Vec<(i64, Option<i64>, usize)>,
    /// Left for good: last heard at, and whether it went silent (no close).
    left: Option<(i64, bool)>,
}

/// What a scenario tells a client to do.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Lose the socket (no close frame); come back after `back_ms`, to node `to` (or the same).
    Drop { back_ms: u64, to: Option<usize> },
    /// Close the socket and never come back.
    Leave,
    /// Stop sending and reading, socket open: a phone that lost its network.
    Silent,
}

/// One thing a watcher was shown.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: i64,
    user: usize,
    online: bool,
    /// The first push of the user after (re)subscribing: a snapshot, not a transition.
    snapshot: bool,
    /// Which of the watcher's connections it came on (an index into its `conns`).
    conn: usize,
}

/// A watcher's log (a WebSocket or a WatchPresence stream): what it saw, on which node, and
/// when it was connected (what it did not see while disconnected is no one's fault).
#[derive(Default)]
struct Log {
    node: usize,
    seen: Mutex<Vec<Seen>>,
    conns: Mutex<Vec<(i64, Option<i64>)>>,
}

impl Log {
    fn new(node: usize) -> Log {
        Log { node, ..Log::default() }
    }

    /// A connection begins now; returns its index.
    fn open(&self, at: i64) -> usize {
        let mut c = self.conns.lock();
        c.push((at, None));
        c.len() - 1
    }

    fn close(&self, conn: usize, at: i64) {
        if let Some(c) = self.conns.lock().get_mut(conn) {
            c.1.get_or_insert(at);
        }
    }
}

/// A log as the checker reads it.
struct Watched {
    node: usize,
    seen: Vec<Seen>,
    conns: Vec<(i64, Option<i64>)>,
}

struct Node {
    id: String,
    http: u16,
    grpc: u16,
    proc: Option<Proc>,
    proxy: Proxy,
}

/// Everything the tasks share.
struct World {
    epoch: Epoch,
    http_ports: Vec<u16>,
    /// Nodes that take connections now (the others are down or draining).
    up: Vec<AtomicBool>,
    truths: Vec<Mutex<Truth>>,
    heartbeat: Duration,
    stop: AtomicBool,
}

impl World {
    fn live_node(&self, from: usize) -> usize {
        let n = self.http_ports.len();
        (0..n).map(|k| (from + k) % n).find(|i| self.up[*i].load(Ordering::Relaxed)).unwrap_or(from % n)
    }
}

/// The figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub engine: String,
    pub scenario: String,
    pub grace_secs: u64,
    pub clients: usize,
    pub reconnects: usize,
    pub departures: usize,
    pub false_offline: usize,
    pub false_offline_per_1000_reconnects: f64,
    /// Offline shown during a partition (and the few seconds its repair takes) by the
    /// cut node's watchers, or by other nodes' watchers of the cut node's users: neither
    /// side can know the other's truth then; counted apart.
    pub cut_off_offline: usize,
    pub false_online: usize,
    pub duplicates: usize,
    pub zombie_seconds: f64,
    pub detection_closed_p50_ms: i64,
    pub detection_closed_p99_ms: i64,
    pub detection_silent_p50_ms: i64,
    pub detection_silent_p99_ms: i64,
    pub undetected_departures: usize,
    pub converge_ms: Option<i64>,
    pub read_mismatches: usize,
    /// Each mismatched read of the final check: node, user, what it read, and the
    /// user's lived truth (so a failing run says which read lied).
    pub mismatch_details: Vec<String>,
    pub observations: usize,
}

pub async fn run(args: ChaosArgs) -> Res<()> {
    let engines: Vec<&str> = match args.engine.as_str() {
        "both" => vec!["nats", "redis"],
        "nats" | "redis" => vec![args.engine.as_str()],
        other => return Err(format!("--engine {other}: expected nats, redis or both")),
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec!["rolling", "kill", "partition", "flaky"],
        list => list.split(',').map(str::trim).collect(),
    };
    if let Some(bad) = scenarios.iter().find(|s| !["rolling", "kill", "partition", "flaky"].contains(s)) {
        return Err(format!("--scenario {bad}: expected rolling, kill, partition, flaky (comma-separated) or all"));
    }
    if args.clients == 0 || args.nodes < 2 {
        return Err("--clients must be at least 1 and --nodes at least 2".into());
    }
    let mut reports = Vec::new();
    for engine in &engines {
        for scenario in &scenarios {
            let mut graces = vec![args.grace_secs];
            if !args.no_baseline && args.grace_secs > 0 {
                graces.push(0);
            }
            for grace in graces {
                eprintln!("chaos: {engine} {scenario} grace {grace}s ...");
                let r = one(&args, engine, scenario, grace).await?;
                print_report(&r);
                reports.push(r);
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&reports).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "{} {} grace {}s: {} clients, {} reconnects, {} departures | false offline {} ({:.2}/1000 reconnects), cut-off offline {}, \
         false online {}, duplicates {}, zombie-seconds {:.1} | detection closed p50 {} ms p99 {} ms, silent p50 {} ms p99 {} ms, \
         undetected {} | converge after heal {} | read mismatches {} | {} observations",
        r.engine,
        r.scenario,
        r.grace_secs,
        r.clients,
        r.reconnects,
        r.departures,
        r.false_offline,
        r.false_offline_per_1000_reconnects,
        r.cut_off_offline,
        r.false_online,
        r.duplicates,
        r.zombie_seconds,
        r.detection_closed_p50_ms,
        r.detection_closed_p99_ms,
        r.detection_silent_p50_ms,
        r.detection_silent_p99_ms,
        r.undetected_departures,
        r.converge_ms.map_or("-".to_string(), |m| format!("{m} ms")),
        r.read_mismatches,
        r.observations,
    );
    for d in &r.mismatch_details {
        println!("  read mismatch: {d}");
    }
}

// ---------------------------------------------------------------- the engine and nodes

fn redis_server(dir: &Path) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server (apt-get install redis-server): {e}"))?;
    Ok((Proc(child), port))
}

fn start_engine(engine: &str, dir: &Path) -> Res<(Proc, u16)> {
    match engine {
        "nats" => nats_server(dir, "engine", "jetstream { store_dir: \"@STORE@\", max_file_store: 8GB }\n"),
        _ => redis_server(dir),
    }
}

struct Settings {
    engine: String,
    grace_secs: u64,
    lease_secs: u64,
    session_ttl_secs: u64,
    heartbeat_secs: u64,
}

fn start_node(dir: &Path, node: &Node, s: &Settings) -> Res<Proc> {
    let mut cmd = Command::new(sibling("presenced")?);
    let engine_url = match s.engine.as_str() {
        "nats" => ("PRESENCE_NATS__URLS", format!("[\"nats://127.0.0.1:{}\"]", node.proxy.port)),
        _ => ("PRESENCE_REDIS__URLS", format!("[\"redis://127.0.0.1:{}\"]", node.proxy.port)),
    };
    cmd.arg("serve")
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", node.http.to_string())
        .env("PRESENCE_SERVICE__GRPC_PORT", node.grpc.to_string())
        .env("PRESENCE_SERVICE__NODE_ID", &node.id)
        .env("PRESENCE_SERVICE__DATA_DIR", dir.join(&node.id))
        .env("PRESENCE_SERVICE__SHUTDOWN_GRACE", "5s")
        .env("PRESENCE_STORE__BACKEND", &s.engine)
        .env(engine_url.0, engine_url.1)
        .env("PRESENCE_NATS__REQUEST_TIMEOUT", "1s")
        .env("PRESENCE_REDIS__REQUEST_TIMEOUT", "1s")
        .env("PRESENCE_PRESENCE__NODE_LEASE_TTL", format!("{}s", s.lease_secs))
        .env("PRESENCE_PRESENCE__SESSION_TTL", format!("{}s", s.session_ttl_secs))
        .env("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", format!("{}s", s.heartbeat_secs))
        .env("PRESENCE_PRESENCE__OFFLINE_GRACE", format!("{}s", s.grace_secs))
        .envs(super::BENCH_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // CHAOS_LOGS=dir keeps each node's log (at debug level) there, one file per start.
    if let Some(logs) = std::env::var_os("CHAOS_LOGS") {
        let path = Path::new(&logs).join(format!(
            "{}-{}.log",
            node.id,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
        ));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.env("PRESENCE_LOGGING__LEVEL", "info,presenced=debug").stderr(file);
    }
    let child = cmd.spawn().map_err(|e| format!("presenced: {e}"))?;
    Ok(Proc(child))
}

/// Starts a node again on its ports (after a stop or a kill) and waits until it listens;
/// a start that exits before it listens is tried again, up to three times.
async fn restart_node(dir: &Path, node: &mut Node, s: &Settings) -> Res<()> {
    for _ in 0..3 {
        let mut p = start_node(dir, node, s)?;
        let up = super::cluster::wait_port_unless_exited(node.http, Some(&mut p)).await?;
        node.proc = Some(p);
        if up {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("node {} did not listen again on :{}", node.id, node.http))
}

fn signal(p: &Proc, sig: &str) {
    let _ = Command::new("kill").args([sig, &p.0.id().to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Waits (at most `limit`) for a process to exit.
async fn exited(p: &mut Proc, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if matches!(p.0.try_wait(), Ok(Some(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A TCP proxy from a port of its own to the engine, which the bench can cut (every link
/// dropped, new ones refused) and heal: a node's network partition.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Res<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, l) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut links = l.lock();
                links.retain(|h| !h.is_finished());
                links.push(h);
            }
        });
        Ok(Proxy { port, cut, links, accept })
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.links.lock().drain(..) {
            h.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.links.lock().drain(..) {
            h.abort();
        }
    }
}

// ---------------------------------------------------------------- clients and watchers

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Connects from 127.0.0.2-127.0.0.9 (by `user`), never from 127.0.0.1: thousands of
/// reconnects take ephemeral ports, and one taken on the nodes' own address could be the
/// port a restarting node must listen on again.
async fn open(port: u16, user: &str, device: &str) -> Res<Ws> {
    let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (user.bytes().map(u32::from).sum::<u32>() % 8) as u8);
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind((source, 0).into()).map_err(|e| format!("bind {source}: {e}"))?;
    let stream = sock.connect(([127, 0, 0, 1], port).into()).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("ws://127.0.0.1:{port}/ws").into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("x-user-id", user.parse().map_err(|_| "bad user id")?);
    req.headers_mut().insert("x-device-id", device.parse().map_err(|_| "bad device id")?);
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Waits for the server's `connected` message.
async fn greeted(ws: &mut Ws) -> bool {
    let wait = async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.contains("\"type\":\"connected\"") {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap_or(false)
}

fn jitter(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rand::random::<u64>() % (hi - lo).max(1))
}

/// One client: connects, heartbeats, obeys the scenario, reconnects as a real client
/// does, and logs when it was connected.
async fn client(world: Arc<World>, i: usize, mut orders: mpsc::UnboundedReceiver<Order>) {
    let (user, device) = (format!("u{i}"), format!("d{i}"));
    let n = world.http_ports.len();
    let mut node = i % n;
    let mut wait = Duration::ZERO;
    let mut attempt = 0u32;
    loop {
        if world.stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(wait).await;
        let target = world.live_node(node);
        let mut ws = match open(world.http_ports[target], &user, &device).await {
            Ok(ws) => ws,
            Err(_) => {
                attempt += 1;
                node = target + 1;
                wait = jitter(250, 500 << attempt.min(3));
                continue;
            }
        };
        if !greeted(&mut ws).await {
            node = target + 1;
            wait = jitter(250, 1000);
            continue;
        }
        attempt = 0;
        node = target;
        let since = world.epoch.ms();
        world.truths[i].lock().intervals.push((since, None, node));
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + world.heartbeat, world.heartbeat);
        let mut last_sent = since;
        let end = |world: &World, at: i64| {
            if let Some(last) = world.truths[i].lock().intervals.last_mut() {
                last.1 = Some(at);
            }
        };
        let next = loop {
            tokio::select! {
                _ = beat.tick() => {
                    if ws.send(Message::Text(super::HEARTBEAT.into())).await.is_err() {
                        break None;
                    }
                    last_sent = world.epoch.ms();
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Close(f))) => break Some(f.map_or(0, |f| u16::from(f.code))),
                    None | Some(Err(_)) => break None,
                    Some(Ok(_)) => {}
                },
                o = orders.recv() => match o {
                    Some(Order::Drop { back_ms, to }) => {
                        end(&world, world.epoch.ms());
                        drop(ws);
                        wait = Duration::from_millis(back_ms);
                        node = to.unwrap_or(node);
                        break Some(u16::MAX);
                    }
                    Some(Order::Leave) => {
                        let at = world.epoch.ms();
                        end(&world, at);
                        world.truths[i].lock().left = Some((at, false));
                        let _ = ws.close(None).await;
                        return;
                    }
                    Some(Order::Silent) => {
                        // Last heard: the last frame it sent. The socket stays open, unread.
                        end(&world, last_sent);
                        world.truths[i].lock().left = Some((last_sent, true));
                        while !world.stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        return;
                    }
                    None => return,
                },
            }
        };
        match next {
            Some(u16::MAX) => continue, // dropped on order: `wait` and `node` are set
            Some(1012) => {
                end(&world, world.epoch.ms());
                node += 1;
                wait = jitter(0, 1000);
            }
            _ => {
                end(&world, world.epoch.ms());
                node += 1;
                wait = jitter(500, 2000);
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Push {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: serde_json::Value,
}

/// A WebSocket watcher on `node`, subscribed to users `users`: logs every push. Comes
/// back to the same node when it is up again.
async fn ws_watcher(world: Arc<World>, node: usize, k: usize, users: std::ops::Range<usize>, log: Arc<Log>) {
    let me = format!("watch-{node}-{k}");
    let ids: Vec<String> = users.clone().map(|u| format!("u{u}")).collect();
    while !world.stop.load(Ordering::Relaxed) {
        if !world.up[node].load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let Ok(mut ws) = open(world.http_ports[node], &me, "watch").await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let sub = serde_json::json!({"type": "subscribe", "payload": {"user_ids": ids}, "id": 1}).to_string();
        if ws.send(Message::Text(sub.into())).await.is_err() {
            continue;
        }
        let conn = log.open(world.epoch.ms());
        let mut snapshotted = vec![false; users.len()];
        let mut beat = tokio::time::interval(world.heartbeat);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if ws.send(Message::Text(super::HEARTBEAT.into())).await.is_err() {
                        break;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(p) = serde_json::from_str::<Push>(&t) else { continue };
                        if p.kind != "presence_update" {
                            continue;
                        }
                        let Some(user) = p.payload["user_id"].as_str().and_then(|u| u.strip_prefix('u')).and_then(|u| u.parse::<usize>().ok()) else { continue };
                        if !users.contains(&user) {
                            continue;
                        }
                        let snapshot = !std::mem::replace(&mut snapshotted[user - users.start], true);
                        let online = p.payload["status"] != "offline";
                        log.seen.lock().push(Seen { at: world.epoch.ms(), user, online, snapshot, conn });
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                },
            }
            if world.stop.load(Ordering::Relaxed) {
                return;
            }
        }
        log.close(conn, world.epoch.ms());
    }
}

/// A gRPC `WatchPresence {all: true}` stream on `node`: logs every event, and the
/// snapshot-free transitions as such. Opens again when the stream ends.
async fn grpc_watcher(world: Arc<World>, grpc: u16, log: Arc<Log>, users: usize) {
    use presenced::grpc::pb;
    use presenced::grpc::pb::presence_api_client::PresenceApiClient;
    use presenced::grpc::pb::presence_event::Kind;
    let auth = presenced::auth::Authenticator::new(super::BENCH_SECRET, "presence-service", Duration::from_secs(30), None);
    let Ok(token) = auth.mint("chaos", Duration::from_secs(24 * 3600), Some(presenced::auth::ADMIN_SCOPE)) else { return };
    let Ok(bearer) = format!("Bearer {token}").parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>() else { return };
    while !world.stop.load(Ordering::Relaxed) {
        let Ok(ep) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}")) else { return };
        let Ok(channel) = ep.connect_timeout(Duration::from_secs(2)).connect().await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut c = PresenceApiClient::new(channel);
        let req = super::authed(pb::WatchPresenceRequest { user_ids: Vec::new(), all: true }, &bearer);
        let Ok(stream) = c.watch_presence(req).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let conn = log.open(world.epoch.ms());
        while let Ok(Some(ev)) = stream.message().await {
            let Some(p) = ev.presence else { continue };
            let Some(user) = p.user_id.strip_prefix('u').and_then(|u| u.parse::<usize>().ok()).filter(|u| *u < users) else { continue };
            let online = match Kind::try_from(ev.kind) {
                Ok(Kind::UserOnline) => true,
                Ok(Kind::UserOffline) => false,
                _ => continue, // device-list updates and expiries are no transition of connectivity
            };
            log.seen.lock().push(Seen { at: world.epoch.ms(), user, online, snapshot: ev.snapshot, conn });
        }
        log.close(conn, world.epoch.ms());
        if world.stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every user's status as node `port` reads it (`None` if the node does not answer).
async fn read_all(port: u16, users: usize) -> Option<Vec<bool>> {
    let mut out = Vec::with_capacity(users);
    for chunk in (0..users).collect::<Vec<_>>().chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|u| format!("u{u}")).collect();
        let body = serde_json::json!({ "user_ids": ids }).to_string();
        let v = post_json(port, "/api/v2/presence/batch", &body).await?;
        for id in &ids {
            out.push(v["data"][id]["status"].as_str()? != "offline");
        }
    }
    Some(out)
}

async fn post_json(port: u16, path: &str, body: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let body = text.split("\r\n\r\n").nth(1)?;
        let (a, b) = (body.find('{')?, body.rfind('}')?);
        serde_json::from_str(&body[a..=b]).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), io).await.ok().flatten()
}

// ---------------------------------------------------------------- one run

async fn one(args: &ChaosArgs, engine: &str, scenario: &str, grace_secs: u64) -> Res<Report> {
    let dir = std::env::temp_dir().join(format!("presenced-chaos-{}-{engine}-{scenario}-{grace_secs}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = run_in(args, engine, scenario, grace_secs, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn run_in(args: &ChaosArgs, engine: &str, scenario: &str, grace_secs: u64, dir: &Path) -> Res<Report> {
    let (_engine, engine_port) = start_engine(engine, dir)?;
    wait_port(engine_port).await?;
    let settings = Settings {
        engine: engine.to_string(),
        grace_secs,
        lease_secs: args.lease_secs,
        session_ttl_secs: args.session_ttl_secs,
        heartbeat_secs: args.heartbeat_secs,
    };
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let proxy = Proxy::start(engine_port).await?;
        nodes.push(Node { id: format!("n{i}"), http: free_port()?, grpc: free_port()?, proc: None, proxy });
    }
    for n in &mut nodes {
        n.proc = Some(start_node(dir, n, &settings)?);
    }
    for n in &nodes {
        wait_port(n.http).await?;
    }
    let epoch = Epoch(Instant::now());
    let world = Arc::new(World {
        epoch,
        http_ports: nodes.iter().map(|n| n.http).collect(),
        up: (0..args.nodes).map(|_| AtomicBool::new(true)).collect(),
        truths: (0..args.clients).map(|_| Mutex::new(Truth::default())).collect(),
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        stop: AtomicBool::new(false),
    });

    // Watchers first: on every node, WebSocket connections covering every user (at most
    // 1,000 each), and a gRPC stream.
    let mut logs: Vec<Arc<Log>> = Vec::new();
    let mut tasks = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        for (k, start) in (0..args.clients).step_by(1000).enumerate() {
            let log = Arc::new(Log::new(ni));
            logs.push(log.clone());
            tasks.push(tokio::spawn(ws_watcher(world.clone(), ni, k, start..(start + 1000).min(args.clients), log)));
        }
        let log = Arc::new(Log::new(ni));
        logs.push(log.clone());
        tasks.push(tokio::spawn(grpc_watcher(world.clone(), n.grpc, log, args.clients)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut orders = Vec::new();
    for i in 0..args.clients {
        let (tx, rx) = mpsc::unbounded_channel();
        orders.push(tx);
        tasks.push(tokio::spawn(client(world.clone(), i, rx)));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Everyone connected, and the watchers have seen it.
    let t0 = Instant::now();
    while world.truths.iter().any(|t| t.lock().intervals.is_empty()) {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("not every client connected within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = world.epoch.ms();

    // Leavers: at random moments in the scenario's first part.
    let leavers = ((args.clients as f64) * args.leavers).round() as usize;
    let mut rng_users: Vec<usize> = (0..args.clients).collect();
    shuffle(&mut rng_users);
    let (leaving, rest) = rng_users.split_at(leavers.min(args.clients));
    let window = Duration::from_secs(10);
    for (k, u) in leaving.iter().enumerate() {
        let tx = orders[*u].clone();
        let at = jitter(0, window.as_millis() as u64);
        let order = if k % 2 == 0 { Order::Leave } else { Order::Silent };
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            let _ = tx.send(order);
        });
    }
    let movable: Vec<usize> = rest.to_vec();

    let lease = Duration::from_secs(args.lease_secs);
    let mut cut: Option<(i64, i64, usize)> = None;
    match scenario {
        "rolling" => {
            for (i, node) in nodes.iter_mut().enumerate() {
                world.up[i].store(false, Ordering::Relaxed);
                if let Some(p) = node.proc.as_mut() {
                    signal(p, "-TERM");
                    if !exited(p, Duration::from_secs(30)).await {
                        return Err(format!("node n{i} did not exit within 30 s of SIGTERM"));
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                restart_node(dir, node, &settings).await?;
                world.up[i].store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
        "kill" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            world.up[0].store(false, Ordering::Relaxed);
            if let Some(p) = &nodes[0].proc {
                signal(p, "-KILL");
            }
            tokio::time::sleep(lease + Duration::from_secs(5)).await;
            restart_node(dir, &mut nodes[0], &settings).await?;
            world.up[0].store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        "partition" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let cut_at = world.epoch.ms();
            nodes[0].proxy.cut();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Some of node 0's clients move to the other nodes; some leave for good.
            let on_0: Vec<usize> = movable
                .iter()
                .copied()
                .filter(|u| world.truths[*u].lock().intervals.last().is_some_and(|(_, to, n)| to.is_none() && *n == 0))
                .collect();
            let moving = ((on_0.len() as f64) * args.movers).round() as usize;
            let gone = ((on_0.len() as f64) * args.partition_leavers).round() as usize;
            for (k, u) in on_0.iter().enumerate() {
                let order = if k < moving {
                    Order::Drop { back_ms: rand::random::<u64>() % 500, to: Some(1 + k % (nodes.len() - 1)) }
                } else if k < moving + gone {
                    Order::Leave
                } else {
                    continue;
                };
                let _ = orders[*u].send(order);
            }
            tokio::time::sleep(lease * 2 + Duration::from_secs(2)).await;
            nodes[0].proxy.heal();
            cut = Some((cut_at, world.epoch.ms(), 0));
        }
        "flaky" => {
            let until = Instant::now() + Duration::from_secs(args.flaky_secs);
            let per_tick = args.drop_rate / 10.0;
            while Instant::now() < until {
                for u in &movable {
                    if rand::random::<f64>() < per_tick {
                        let back = 500 + rand::random::<u64>() % 4500;
                        let _ = orders[*u].send(Order::Drop { back_ms: back, to: None });
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        _ => unreachable!("scenario validated above"),
    }

    // Convergence after a heal: every node reads what the truth says.
    let mut converge_ms = None;
    if let Some((_, healed, _)) = cut {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let now = world.epoch.ms();
            let expected = expected_reads(&world, now, grace_secs, args.session_ttl_secs);
            let mut agree = true;
            for n in &nodes {
                match read_all(n.http, args.clients).await {
                    Some(got) => agree &= mismatches(&expected, &got) == 0,
                    None => agree = false,
                }
            }
            if agree {
                converge_ms = Some(world.epoch.ms() - healed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Let every departure show (grace, or session_ttl for a silent one, the lease for a
    // lost node), then read every node.
    let settle = Duration::from_secs(grace_secs.max(args.session_ttl_secs) + args.lease_secs + 4);
    tokio::time::sleep(settle).await;
    let end = world.epoch.ms();
    let expected = expected_reads(&world, end, grace_secs, args.session_ttl_secs);
    let mut read_mismatches = 0;
    let mut mismatch_details = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        match read_all(n.http, args.clients).await {
            Some(got) => {
                read_mismatches += mismatches(&expected, &got);
                for (u, (e, g)) in expected.iter().zip(&got).enumerate() {
                    if e.is_some_and(|e| e != *g) {
                        let t = world.truths[u].lock();
                        mismatch_details.push(format!(
                            "node n{i} read u{u} {} at {end} ms (cut, healed: {:?}); lived {:?}, left {:?}",
                            if *g { "online" } else { "offline" },
                            cut.map(|(c, h, _)| (c, h)),
                            t.intervals,
                            t.left
                        ));
                    }
                }
            }
            None => read_mismatches += args.clients,
        }
    }
    world.stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    for n in &mut nodes {
        if let Some(p) = n.proc.as_mut() {
            signal(p, "-KILL");
            let _ = exited(p, Duration::from_secs(5)).await;
        }
    }
    let truths: Vec<Truth> = world.truths.iter().map(|t| t.lock().clone()).collect();
    let logs: Vec<Watched> =
        logs.iter().map(|l| Watched { node: l.node, seen: l.seen.lock().clone(), conns: l.conns.lock().clone() }).collect();
    let check = Check {
        truths: &truths,
        logs: &logs,
        reference_grace_ms: args.grace_secs as i64 * 1000,
        run_grace_ms: grace_secs as i64 * 1000,
        session_ttl_ms: args.session_ttl_secs as i64 * 1000,
        start,
        end,
        cut,
    };
    let mut r = check.report();
    r.engine = engine.to_string();
    r.scenario = scenario.to_string();
    r.grace_secs = grace_secs;
    r.converge_ms = converge_ms;
    r.read_mismatches = read_mismatches;
    r.mismatch_details = mismatch_details;
    Ok(r)
}

fn shuffle(v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = (rand::random::<u64>() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// What a read should say of each user at `now`: `Some(true)` connected, `Some(false)`
/// gone long enough to show, `None` in between (either is right).
fn expected_reads(world: &World, now: i64, grace_secs: u64, ttl_secs: u64) -> Vec<Option<bool>> {
    world
        .truths
        .iter()
        .map(|t| {
            let t = t.lock();
            match t.intervals.last() {
                Some((from, None, _)) if now - from > 1_000 => Some(true),
                Some((_, None, _)) => None,
                Some((_, Some(to), _)) => {
                    let silent = t.left.is_some_and(|(_, s)| s);
                    let shows_by = to + if silent { ttl_secs as i64 * 1000 } else { grace_secs as i64 * 1000 } + 3_000;
                    (now > shows_by).then_some(false)
                }
                None => None,
            }
        })
        .collect()
}

fn mismatches(expected: &[Option<bool>], got: &[bool]) -> usize {
    expected.iter().zip(got).filter(|(e, g)| e.is_some_and(|e| e != **g)).count()
}

// ---------------------------------------------------------------- the checker

/// A time a user was not connected: `start` (the socket's end, or its last frame for a
/// silent device) to `end` (its next `connected`; `None`: never came back).
#[derive(Debug, Clone, Copy)]
struct Gap {
    start: i64,
    end: Option<i64>,
    silent: bool,
}

fn gaps(t: &Truth) -> Vec<Gap> {
    let mut out = Vec::new();
    for w in t.intervals.windows(2) {
        if let (Some(to), (from, _, _)) = (w[0].1, w[1]) {
            out.push(Gap { start: to, end: Some(from), silent: false });
        }
    }
    if let Some((at, silent)) = t.left {
        out.push(Gap { start: at, end: None, silent });
    }
    out
}

struct Check<'a> {
    truths: &'a [Truth],
    logs: &'a [Watched],
    /// What counts as a real departure: away longer than this (the run's grace, also for
    /// its `0s` baseline: a shorter absence shown offline is the flap users see).
    reference_grace_ms: i64,
    /// The grace the nodes ran with.
    run_grace_ms: i64,
    session_ttl_ms: i64,
    start: i64,
    end: i64,
    /// A partition: (cut, healed, node).
    cut: Option<(i64, i64, usize)>,
}

/// Slack for delivery: an offline of a departure may arrive this long after the client
/// came back, and a departure shows this long after its deadline without being a zombie.
const SLACK_MS: i64 = 2_000;

impl Check<'_> {
    fn long(&self, g: &Gap) -> bool {
        g.end.is_none_or(|e| e - g.start > self.reference_grace_ms)
    }

    /// The node `user` was connected to at `at`, if it was.
    fn connected_to(&self, user: usize, at: i64) -> Option<usize> {
        self.truths[user].intervals.iter().find(|(f, t, _)| *f <= at && t.is_none_or(|t| at <= t)).map(|(_, _, n)| *n)
    }

    /// Whether what log on `node` showed of `user` at `at` is stale by the partition:
    /// the log is on the cut node, or the user was connected to it, during the cut (and
    /// a few seconds after the heal, the time a write-back takes to show).
    fn partitioned(&self, node: usize, user: usize, at: i64) -> bool {
        self.cut.is_some_and(|(from, to, cut_node)| {
            at >= from && at <= to + 5_000 && (node == cut_node || self.connected_to(user, at.min(to)) == Some(cut_node))
        })
    }

    fn report(&self) -> Report {
        let all_gaps: Vec<Vec<Gap>> = self.truths.iter().map(gaps).collect();
        let reconnects = all_gaps.iter().flatten().filter(|g| g.end.is_some()).count();
        let departures: Vec<(usize, Gap)> =
            all_gaps.iter().enumerate().flat_map(|(u, gs)| gs.iter().filter(|g| g.end.is_none()).map(move |g| (u, *g))).collect();
        let (mut false_offline, mut cut_off, mut false_online, mut duplicates) = (0, 0, 0, 0);
        let mut observations = 0;
        for log in self.logs {
            let node = &log.node;
            observations += log.seen.len();
            let mut last: HashMap<usize, bool> = HashMap::new();
            let mut conn = usize::MAX;
            for s in log.seen.iter().filter(|s| s.at >= self.start) {
                if s.conn != conn {
                    // A new connection of the watcher: what it knew before is stale.
                    conn = s.conn;
                    last.clear();
                }
                let prev = last.insert(s.user, s.online);
                if s.snapshot {
                    // A snapshot after a watcher (re)subscribed: compared with the
                    // truth, not counted as a repeat.
                    if prev == Some(s.online) || prev.is_none() {
                        continue;
                    }
                } else if prev == Some(s.online) {
                    duplicates += 1;
                    continue;
                }
                let justified =
                    all_gaps[s.user].iter().any(|g| self.long(g) && g.start <= s.at && g.end.is_none_or(|e| s.at <= e + SLACK_MS));
                if !s.online && prev != Some(false) && !justified {
                    if self.partitioned(*node, s.user, s.at) {
                        cut_off += 1;
                    } else {
                        false_offline += 1;
                    }
                }
                if s.online && prev == Some(false) {
                    // Shown back online: wrong if the user was away (a long gap) then,
                    // past the time its departure may take to show (the grace, or the
                    // TTL of a silent device), and no delivery was on its way.
                    let gone = all_gaps[s.user].iter().any(|g| {
                        let shows = if g.silent { self.session_ttl_ms } else { self.run_grace_ms };
                        self.long(g) && s.at > g.start + shows + SLACK_MS && g.end.is_none_or(|e| s.at + SLACK_MS < e)
                    });
                    if gone && !self.partitioned(*node, s.user, s.at) {
                        false_online += 1;
                    }
                }
            }
        }
        // Departures: when did each show as offline? A log's first offline push after it
        // left times it (a snapshot after the watcher reconnected only bounds it); a log
        // connected when it was due and still showing it online counts zombie time.
        let (mut closed, mut silent, mut zombie_ms, mut undetected) = (Vec::new(), Vec::new(), 0i64, 0usize);
        for (u, g) in &departures {
            let due = g.start + if g.silent { self.session_ttl_ms } else { self.run_grace_ms } + 1_000;
            let mut pushed: Vec<i64> = Vec::new();
            let (mut worst_zombie, mut shown, mut measured) = (0, false, false);
            for log in self.logs {
                if self.partitioned(log.node, *u, due) {
                    continue; // a cut-off node's view, or of a cut-off node's user: stale by the partition
                }
                let mine: Vec<&Seen> = log.seen.iter().filter(|s| s.user == *u).collect();
                if mine.iter().rev().find(|s| s.at < g.start).is_none_or(|s| !s.online) {
                    continue; // nothing seen before it left, or already shown offline
                }
                measured = true;
                let after: Vec<&&Seen> = mine.iter().filter(|s| s.at >= g.start && !s.online).collect();
                shown |= !after.is_empty();
                if let Some(s) = after.iter().find(|s| !s.snapshot) {
                    pushed.push(s.at);
                }
                // Zombie time: the connection up at `due`, if it showed the user online then.
                if let Some(ci) = log.conns.iter().position(|(f, t)| *f <= due && t.is_none_or(|t| t > due)) {
                    let until = log.conns[ci].1.unwrap_or(self.end);
                    let at_due = mine.iter().rev().find(|s| s.conn == ci && s.at <= due);
                    if at_due.is_some_and(|s| s.online) {
                        let off = mine.iter().find(|s| s.conn == ci && s.at > due && !s.online).map_or(until, |s| s.at.min(until));
                        worst_zombie = worst_zombie.max(off - due);
                    }
                }
            }
            zombie_ms += worst_zombie.max(0);
            if worst_zombie > 0 && std::env::var_os("CHAOS_DEBUG").is_some() {
                eprintln!("zombie {worst_zombie} ms: u{u} {g:?} due {due} truth {:?}", self.truths[*u]);
                for log in self.logs {
                    let mine: Vec<(i64, bool, bool, usize)> =
                        log.seen.iter().filter(|s| s.user == *u).map(|s| (s.at, s.online, s.snapshot, s.conn)).collect();
                    eprintln!("  log on n{}: conns {:?} seen {mine:?}", log.node, log.conns);
                }
            }
            if !measured {
                continue; // no watcher could tell (all cut off)
            }
            if !shown {
                if std::env::var_os("CHAOS_DEBUG").is_some() {
                    eprintln!("undetected: u{u} {g:?} truth {:?} cut {:?}", self.truths[*u], self.cut);
                    for log in self.logs {
                        let mine: Vec<(i64, bool, bool, usize)> =
                            log.seen.iter().filter(|s| s.user == *u).map(|s| (s.at, s.online, s.snapshot, s.conn)).collect();
                        eprintln!("  log on n{}: conns {:?} seen {mine:?}", log.node, log.conns);
                    }
                }
                undetected += 1;
                continue;
            }
            if pushed.is_empty() {
                continue; // shown, but only in snapshots: no time to tell
            }
            pushed.sort_unstable();
            let latency = pushed[pushed.len() / 2] - g.start;
            if g.silent {
                silent.push(latency);
            } else {
                closed.push(latency);
            }
        }
        closed.sort_unstable();
        silent.sort_unstable();
        let p = |v: &[i64], q: f64| if v.is_empty() { 0 } else { v[((v.len() - 1) as f64 * q).round() as usize] };
        Report {
            engine: String::new(),
            scenario: String::new(),
            grace_secs: 0,
            clients: self.truths.len(),
            reconnects,
            departures: departures.len(),
            false_offline,
            false_offline_per_1000_reconnects: if reconnects == 0 { 0.0 } else { false_offline as f64 * 1000.0 / reconnects as f64 },
            cut_off_offline: cut_off,
            false_online,
            duplicates,
            zombie_seconds: zombie_ms as f64 / 1000.0,
            detection_closed_p50_ms: p(&closed, 0.5),
            detection_closed_p99_ms: p(&closed, 0.99),
            detection_silent_p50_ms: p(&silent, 0.5),
            detection_silent_p99_ms: p(&silent, 0.99),
            undetected_departures: undetected,
            converge_ms: None,
            read_mismatches: 0,
            mismatch_details: Vec::new(),
            observations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<'a>(truths: &'a [Truth], logs: &'a [Watched]) -> Report {
        Check { truths, logs, reference_grace_ms: 10_000, run_grace_ms: 10_000, session_ttl_ms: 20_000, start: 0, end: 100_000, cut: None }
            .report()
    }

    fn seen(at: i64, online: bool) -> Seen {
        Seen { at, user: 0, online, snapshot: false, conn: 0 }
    }

    fn log(seen: Vec<Seen>) -> Vec<Watched> {
        vec![Watched { node: 2, seen, conns: vec![(0, None)] }]
    }

    #[test]
    fn an_offline_during_a_short_reconnect_is_a_flap_and_a_real_departure_is_not() {
        // Connected 0-10 s, back at 11 s (a reload), gone for good at 30 s.
        let t = Truth { intervals: vec![(0, Some(10_000), 0), (11_000, Some(30_000), 1)], left: Some((30_000, false)) };
        let logs = log(vec![seen(0, true), seen(10_100, false), seen(11_100, true), seen(40_500, false)]);
        let r = check(std::slice::from_ref(&t), &logs);
        assert_eq!((r.reconnects, r.departures, r.false_offline, r.duplicates), (1, 1, 1, 0));
        assert_eq!((r.detection_closed_p50_ms, r.zombie_seconds), (10_500, 0.0));
        // Shown offline late: zombie-seconds past the grace and a second.
        let logs = log(vec![seen(0, true), seen(45_000, false), seen(46_000, false)]);
        let r = check(std::slice::from_ref(&t), &logs);
        assert_eq!((r.false_offline, r.duplicates, r.zombie_seconds), (0, 1, 4.0));
        // Announced online again while gone.
        let logs = log(vec![seen(0, true), seen(40_500, false), seen(50_000, true)]);
        assert_eq!(check(std::slice::from_ref(&t), &logs).false_online, 1);
    }
}
