//! `presenced-bench`: WebSocket load generator for presenced, with a bare broadcast server
//! as the baseline so the fan-out cost is measured side by side.
//!
//! `presenced-bench run --clients 10000 --watch 1 --changes 50 --rate 5` spawns
//! `presenced serve` (gateway auth, generous limits, a temporary data dir), connects N
//! subscriber clients spread over source addresses 127.0.0.2–127.0.0.60, subscribes each
//! to M publisher users, drives status changes from the publishers' own connections, and
//! reports connect rate, server RSS per connection and end-to-end fan-out latency.
//! `--baseline` does the same against `presenced-bench baseline-server`, a bare
//! tokio-tungstenite broadcast server. Loopback only.
//!
//! `presenced-bench hostile --attack watch|stall` measures what hostile clients cost the
//! server (parked gRPC watch streams, stalled request heads; see `hostile.rs`).
//!
//! `presenced-bench cluster` runs the hub-and-spoke topology (center + two leaves, real
//! nats-servers) and measures cross-node fan-out, store writes per change and store
//! writes with idle users (see `cluster.rs`). `presenced-bench backends` compares the
//! cluster backends (NATS, Redis) side by side (see `backends.rs`). `presenced-bench scale`
//! runs many nodes and load-generator processes toward a million sessions (`scale.rs`).
//! `presenced-bench chaos` checks what watchers are shown against what clients lived
//! through restarts, node loss, partitions and a flaky network (`chaos.rs`).
#![forbid(unsafe_code)]

mod activity;
mod backends;
mod chaos;
mod cluster;
mod conversation;
mod cpu;
mod hostile;
mod lean;
mod peer;
mod scale;
mod scrape;
mod sessions;
mod sinks;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

const MARK: &str = "@@T";

#[derive(Parser)]
#[command(name = "presenced-bench", about = "WebSocket load generator for presenced (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a load test.
    Run(RunArgs),
    /// Hub and spoke on real nats-servers: cross-node fan-out latency, KV writes per
    /// status change, store writes per second with idle connected users.
    Cluster(cluster::ClusterArgs),
    /// The cluster backends side by side (NATS, Redis): cross-node fan-out against the
    /// engine's bare pub/sub, status writes/s at saturation, store writes with idle users.
    Backends(backends::BackendsArgs),
    /// gRPC throughput over one HTTP/2 connection: RefreshSession and GetPresence(100 ids).
    Grpc(GrpcArgs),
    /// A million device sessions in one process (seed 001's gateway model): RSS per
    /// session, registrations/s, GetPresence at that size, instance leases against
    /// per-session refresh, expiry of them all and the memory it returns.
    Sessions(sessions::SessionsArgs),
    /// Device activity in cluster mode (NATS): store writes and CPU of devices toggling
    /// idle/active every few minutes against the same sessions with no activity.
    Activity(activity::ActivityArgs),
    /// Conversation presence at scale: one conversation of 100,000 members, viewers
    /// subscribed to it against the same viewers subscribed to members by user id.
    Conversation(conversation::ConversationArgs),
    /// Members joining one room: presenced's conversation presence against a
    /// Pusher-protocol server's presence channel (sockudo), in the same run.
    Peer(peer::PeerArgs),
    /// Event sinks: events/s a webhook sink delivers, transition → receipt delay, outbox
    /// depth, events lost.
    Sinks(sinks::SinksArgs),
    /// Many presenced nodes in cluster mode on one nats-server, many load-generator
    /// processes: up to a million WebSocket sessions with contacts on other nodes, status
    /// changes and heartbeats; memory, NATS, delivery latency, store writes, CPU.
    Scale(scale::ScaleArgs),
    /// One load-generator process of `scale` (started by it).
    #[command(hide = true)]
    ScaleGen(scale::GenArgs),
    /// What hostile clients cost: parked WatchPresence streams, stalled request heads.
    Hostile(hostile::HostileArgs),
    /// Presence at the edges: rolling restarts, kill -9, a partition, a flaky network on
    /// three nodes; what watchers were shown against what clients lived.
    Chaos(chaos::ChaosArgs),
    /// The bare broadcast server used by `run --baseline`: every text frame received is
    /// sent to every connection.
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// Subscriber connections to open.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Publisher users each subscriber watches (0: idle connections only).
    #[arg(long, default_value_t = 1)]
    watch: usize,
    /// Status changes to drive in total.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Status changes per second (over all publishers).
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Source addresses `127.0.0.2 ..= 127.0.0.<last>` (each has ~28k ephemeral ports).
    #[arg(long, default_value_t = 60)]
    last_source: u8,
    /// Run against the bare broadcast server instead of presenced.
    #[arg(long)]
    baseline: bool,
    /// Target an already running server (ws://host:port) instead of spawning one;
    /// with --server-pid to measure its RSS. presenced must run with auth.mode gateway.
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    server_pid: Option<u32>,
    /// How long to hold the idle connections before measuring RSS.
    #[arg(long, default_value = "3")]
    settle_secs: u64,
    /// presenced only: conversations of `--conversation-size` subscribers each, set by
    /// the backend before the subscribers connect; every subscriber also subscribes to
    /// the conversations it is in (10,000 of 10 with 10,000 clients: 10 each).
    #[arg(long, default_value_t = 0)]
    conversations: usize,
    #[arg(long, default_value_t = 10)]
    conversation_size: usize,
}

#[derive(Parser, Clone)]
struct GrpcArgs {
    /// Concurrent requests (HTTP/2 streams) on the one connection.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Seconds per measured RPC.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sessions registered (and refreshed round-robin).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A load generator is one of ~50 processes on the machine: one thread, so none
    // wakes another (the orchestrator and the other benches use every core).
    let mut builder = match cli.cmd {
        Cmd::ScaleGen(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = match cli.cmd {
        Cmd::Run(args) => rt.block_on(run(args)),
        Cmd::Grpc(args) => rt.block_on(grpc_bench(args)),
        Cmd::Sessions(args) => rt.block_on(sessions::run(args)),
        Cmd::Activity(args) => rt.block_on(activity::run(args)),
        Cmd::Conversation(args) => rt.block_on(conversation::run(args)),
        Cmd::Peer(args) => rt.block_on(peer::run(args)),
        Cmd::Sinks(args) => rt.block_on(sinks::run(args)),
        Cmd::Cluster(args) => rt.block_on(cluster::run(args)),
        Cmd::Backends(args) => rt.block_on(backends::run(args)),
        Cmd::Hostile(args) => rt.block_on(hostile::run(args)),
        Cmd::Chaos(args) => rt.block_on(chaos::run(args)),
        Cmd::Scale(args) => rt.block_on(scale::run(args)),
        Cmd::ScaleGen(args) => rt.block_on(scale::generator(args)),
        Cmd::BaselineServer { listen } => rt.block_on(baseline_server(listen)),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presenced-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_message_size(Some(64 << 10)).max_frame_size(Some(64 << 10))
}

// ---------------------------------------------------------------- baseline server

/// The heartbeat the scale bench's clients send, and presenced's answer to it.
pub(crate) const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;
pub(crate) const HEARTBEAT_ACK: &str = r#"{"id":null,"payload":{"id":null,"type":"heartbeat"},"type":"ack"}"#;

async fn baseline_server(listen: SocketAddr) -> Res<()> {
    let listener = TcpListener::bind(listen).await.map_err(|e| e.to_string())?;
    println!("listening {}", listener.local_addr().map_err(|e| e.to_string())?);
    let (tx, _) = broadcast::channel::<Utf8Bytes>(4096);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await else { return };
            let mut rx = tx.subscribe();
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        // A heartbeat gets the ack presenced sends (the scale bench's CPU
                        // baseline); any other text frame goes to everyone.
                        Some(Ok(Message::Text(t))) if t.as_str() == HEARTBEAT => {
                            let sent = ws.send(Message::Text(Utf8Bytes::from_static(HEARTBEAT_ACK))).await;
                            if sent.is_err() { return }
                        }
                        Some(Ok(Message::Text(t))) => { let _ = tx.send(t); }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                        _ => {}
                    },
                    b = rx.recv() => match b {
                        Ok(t) => if ws.send(Message::Text(t)).await.is_err() { return },
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
            }
        });
    }
}

// ---------------------------------------------------------------- server under test

struct Server {
    child: Option<Child>,
    addr: String,
    pid: Option<u32>,
    _dir: Option<std::path::PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self._dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn sibling(name: &str) -> Res<std::path::PathBuf> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = me.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} not found next to presenced-bench (cargo build --release builds both)", p.display()))
    }
}

/// A free loopback port, never one this process handed out before: the kernel may give
/// a port just released by one call to the next, and two nodes told the same port end
/// as one (the cluster bench once measured leaf A against itself).
fn free_port() -> Res<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())?;
        let mut given = GIVEN.lock().map_err(|_| "port list poisoned".to_string())?;
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    Err("no fresh free port after 100 tries".into())
}

const BENCH_SECRET: &str = "presenced-bench-secret-presenced-bench-secret";

/// How the bench runs presenced: gateway auth (clients name themselves), quiet logs, and
/// rate limits out of the way.
const BENCH_ENV: [(&str, &str); 8] = [
    ("PRESENCE_AUTH__JWT_SECRET", BENCH_SECRET),
    ("PRESENCE_AUTH__MODE", "gateway"),
    ("PRESENCE_LOGGING__LEVEL", "warn"),
    ("PRESENCE_LIMITS__WS_MESSAGES_PER_SEC", "100000"),
    ("PRESENCE_LIMITS__WS_MESSAGE_BURST", "100000"),
    ("PRESENCE_LIMITS__WRITE_RATE_PER_SEC", "100000"),
    ("PRESENCE_LIMITS__WRITE_BURST", "100000"),
    // The load generator opens thousands of connections per second from 59 addresses.
    ("PRESENCE_LIMITS__CONNECTIONS_PER_IP_PER_SEC", "0"),
];

async fn spawn_server(baseline: bool) -> Res<Server> {
    spawn_server_with(baseline, None).await
}

/// With `grpc_port`, presenced also serves gRPC there (HS256 secret [`BENCH_SECRET`]).
async fn spawn_server_with(baseline: bool, grpc_port: Option<u16>) -> Res<Server> {
    spawn_server_env(baseline, grpc_port, &[]).await
}

/// As [`spawn_server_with`], with more environment for presenced.
async fn spawn_server_env(baseline: bool, grpc_port: Option<u16>, extra: &[(&str, &str)]) -> Res<Server> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let (child, dir) = if baseline {
        let c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args(["baseline-server", "--listen", &addr])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        (c, None)
    } else {
        let dir = std::env::temp_dir().join(format!("presenced-bench-{}", std::process::id()));
        let c = Command::new(sibling("presenced")?)
            .arg("serve")
            .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
            .env("PRESENCE_SERVICE__PORT", port.to_string())
            .env("PRESENCE_SERVICE__GRPC_PORT", grpc_port.map_or("0".to_string(), |p| p.to_string()))
            .envs(BENCH_ENV)
            .envs(extra.iter().copied())
            .env("PRESENCE_SERVICE__DATA_DIR", &dir)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        (c, Some(dir))
    };
    let pid = child.id();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("server did not start listening within 20s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Server { child: Some(child), addr, pid: Some(pid), _dir: dir })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- clients

struct Shared {
    start: Instant,
    connected: AtomicU64,
    failed: AtomicU64,
    /// (change timestamp ns, latency µs) per delivery, merged at the end.
    samples: parking_lot::Mutex<Vec<(u64, u32)>>,
}

async fn open(
    addr: SocketAddr,
    source: Ipv4Addr,
    user: &str,
    baseline: bool,
) -> Res<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).map_err(|e| format!("bind {source}: {e}"))?;
    let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("ws://{addr}/ws").into_client_request().map_err(|e| e.to_string())?;
    if !baseline {
        req.headers_mut().insert("x-user-id", user.parse().map_err(|_| "bad user id")?);
        req.headers_mut().insert("x-device-id", "bench".parse().map_err(|_| "bad device id")?);
    }
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await.map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

fn marker_ts(text: &str) -> Option<u64> {
    let i = text.find(MARK)? + MARK.len();
    let digits: &str = &text[i..text[i..].find(|c: char| !c.is_ascii_digit()).map_or(text.len(), |e| i + e)];
    digits.parse().ok()
}

/// One subscriber client's parameters.
struct Sub {
    addr: SocketAddr,
    source: Ipv4Addr,
    id: usize,
    watch_users: Arc<Vec<String>>,
    /// The conversations it subscribes to.
    conversations: Vec<String>,
    baseline: bool,
}

/// Sets `count` conversations (`conv-<k>`) of `size` subscribers each (`sub-<i>`, in
/// turn), 100 requests in flight; returns each subscriber's conversations.
async fn set_conversations(addr: &str, clients: usize, count: usize, size: usize) -> Res<Vec<Vec<String>>> {
    let auth = presenced::auth::Authenticator::new(BENCH_SECRET, "presence-service", Duration::from_secs(30), None);
    let token = auth.mint("backend", Duration::from_secs(3600), Some(presenced::auth::ADMIN_SCOPE))?;
    let http = reqwest::Client::new();
    let mut joins: Vec<Vec<String>> = vec![Vec::new(); clients];
    let mut bodies = Vec::with_capacity(count);
    for k in 0..count {
        let conv = format!("conv-{k}");
        let members: Vec<String> = (0..size).map(|j| (k * size + j) % clients.max(1)).map(|i| format!("sub-{i}")).collect();
        for j in 0..size {
            let i = (k * size + j) % clients.max(1);
            if joins[i].last() != Some(&conv) {
                joins[i].push(conv.clone());
            }
        }
        bodies.push((conv, members));
    }
    let results: Vec<Res<()>> = futures_util::stream::iter(bodies)
        .map(|(conv, members)| {
            let (http, token) = (http.clone(), token.clone());
            async move {
                let r = http
                    .put(format!("http://{addr}/api/v2/conversations/{conv}/members"))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(serde_json::json!({ "members": members }).to_string())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("members of {conv}: {}", r.status()))
                }
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    results.into_iter().collect::<Res<Vec<()>>>()?;
    Ok(joins)
}

async fn subscriber(shared: Arc<Shared>, sub: Sub, mut stop: watch::Receiver<bool>, permit: tokio::sync::OwnedSemaphorePermit) {
    let Sub { addr, source, id, watch_users, conversations, baseline } = sub;
    let opened = open(addr, source, &format!("sub-{id}"), baseline).await;
    drop(permit); // the next handshake may start
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            if shared.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("client {id}: {e}");
            }
            return;
        }
    };
    if !baseline && (!watch_users.is_empty() || !conversations.is_empty()) {
        let sub =
            serde_json::json!({"type": "subscribe", "payload": {"user_ids": &*watch_users, "conversation_ids": conversations}}).to_string();
        if ws.send(Message::text(sub)).await.is_err() {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut local: Vec<(u64, u32)> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(ts) = marker_ts(&t) {
                        let now = shared.start.elapsed().as_nanos() as u64;
                        local.push((ts, (now.saturating_sub(ts) / 1000) as u32));
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
    shared.samples.lock().extend(local);
    let _ = ws.close(None).await;
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `p50 1.00 ms  p99 2.00 ms  max 3.00 ms` over sorted latencies (µs).
fn percentiles(sorted: &[u32], ps: &[(&str, f64)]) -> String {
    let mut out: Vec<String> = ps.iter().map(|(name, p)| format!("{name} {}", ms(pct(sorted, *p)))).collect();
    out.push(format!("max {}", ms(sorted.last().copied().unwrap_or(0))));
    out.join("  ")
}

fn ms(us: u32) -> String {
    format!("{:.2} ms", f64::from(us) / 1000.0)
}

async fn run(args: RunArgs) -> Res<()> {
    let server = match &args.target {
        Some(t) => {
            let addr = t.trim_start_matches("ws://").trim_start_matches("http://").trim_end_matches('/').to_string();
            Server { child: None, addr, pid: args.server_pid, _dir: None }
        }
        None => spawn_server(args.baseline).await?,
    };
    let addr: SocketAddr = server.addr.parse().map_err(|e| format!("target address: {e}"))?;
    let mode = if args.baseline { "baseline (bare broadcast)" } else { "presenced" };
    println!("mode: {mode}  server: {}  pid: {:?}", server.addr, server.pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rss_before = server.pid.and_then(rss_kib);

    let shared =
        Arc::new(Shared { start: Instant::now(), connected: AtomicU64::new(0), failed: AtomicU64::new(0), samples: Default::default() });
    let publishers: Arc<Vec<String>> = Arc::new((0..args.watch).map(|i| format!("pub-{i}")).collect());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sources: Vec<Ipv4Addr> = (2..=args.last_source.max(2)).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut joins: Vec<Vec<String>> = vec![Vec::new(); args.clients];
    if args.conversations > 0 && !args.baseline {
        let t = Instant::now();
        joins = set_conversations(&server.addr, args.clients, args.conversations, args.conversation_size).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The membership is the directory's, not the connections': counted apart.
        let with = server.pid.and_then(rss_kib);
        println!(
            "conversations: {} of {} members set in {:.2}s; server RSS {:.1} → {:.1} MiB",
            args.conversations,
            args.conversation_size,
            t.elapsed().as_secs_f64(),
            rss_before.unwrap_or(0) as f64 / 1024.0,
            with.unwrap_or(0) as f64 / 1024.0
        );
        rss_before = with;
    }

    // Connect the subscribers, `concurrency` handshakes at a time.
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (shared, publishers, stop) = (shared.clone(), publishers.clone(), stop_rx.clone());
        let source = sources[id % sources.len()];
        let baseline = args.baseline;
        let conversations = std::mem::take(&mut joins[id]);
        let sub = Sub { addr, source, id, watch_users: publishers, conversations, baseline };
        tasks.push(tokio::spawn(subscriber(shared, sub, stop, permit)));
    }
    while (shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)) < args.clients as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t0.elapsed() > Duration::from_secs(600) {
            return Err("connecting took over 10 minutes".into());
        }
    }
    let connect_time = t0.elapsed();
    let connected = shared.connected.load(Ordering::Relaxed);
    println!(
        "connected: {connected}/{} in {:.2}s ({:.0} conn/s), failed {}",
        args.clients,
        connect_time.as_secs_f64(),
        connected as f64 / connect_time.as_secs_f64().max(1e-9),
        shared.failed.load(Ordering::Relaxed)
    );

    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    if let (Some(pid), Some(before)) = (server.pid, rss_before) {
        if let Some(after) = rss_kib(pid) {
            let per = (after.saturating_sub(before)) as f64 / connected.max(1) as f64;
            println!(
                "server RSS: {:.1} MiB before, {:.1} MiB with {connected} connections: {per:.2} KiB per connection",
                before as f64 / 1024.0,
                after as f64 / 1024.0
            );
        }
    }

    // Drive the changes from the publishers' own connections.
    let mut sent = 0usize;
    if args.watch > 0 && args.changes > 0 {
        let mut pubs = Vec::new();
        for (i, u) in publishers.iter().enumerate() {
            let source = sources[i % sources.len()];
            pubs.push(open(addr, source, u, args.baseline).await?);
        }
        // Let subscriptions and the publishers' own online events settle.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shared.samples.lock().clear();
        let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
        let mut tick = tokio::time::interval(interval);
        for n in 0..args.changes {
            tick.tick().await;
            let ts = shared.start.elapsed().as_nanos() as u64;
            let count = pubs.len();
            let p = &mut pubs[n % count];
            let text = if args.baseline {
                // The same bytes presenced pushes for a change, so both servers move
                // equal payloads and the comparison measures the server, not the size.
                serde_json::json!({"type": "presence_update", "payload": {
                    "user_id": "pub-0", "status": "busy", "message": format!("{MARK}{ts}"),
                    "last_seen": "2026-11-24T01:20:00.123Z", "updated_at": "2026-11-24T01:20:00.123Z",
                    "node_id": "bench-node", "device_count": 1}})
                .to_string()
            } else {
                let status = if n % 2 == 0 { "busy" } else { "away" };
                serde_json::json!({"type": "presence_update", "payload": {"online_status": status, "custom_status": format!("{MARK}{ts}")}})
                    .to_string()
            };
            p.send(Message::text(text)).await.map_err(|e| format!("publish: {e}"))?;
            sent += 1;
        }
        // Drain publisher sockets in the background so acks never back up.
        for mut p in pubs {
            tokio::spawn(async move { while let Some(Ok(_)) = p.next().await {} });
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }

    if sent > 0 {
        let samples = std::mem::take(&mut *shared.samples.lock());
        // Every subscriber watches every publisher: each change reaches all of them.
        let expected = sent as u64 * connected;
        let mut lat: Vec<u32> = samples.iter().map(|s| s.1).collect();
        lat.sort_unstable();
        let mut per_change: HashMap<u64, u32> = HashMap::new();
        for (ts, l) in &samples {
            let e = per_change.entry(*ts).or_insert(0);
            *e = (*e).max(*l);
        }
        let mut fan: Vec<u32> = per_change.into_values().collect();
        fan.sort_unstable();
        println!("changes: {sent} sent; deliveries {} of {expected} expected", samples.len());
        println!("delivery latency: {}", percentiles(&lat, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]));
        println!("fan-out time (change sent → last subscriber has it): {}", percentiles(&fan, &[("p50", 0.5), ("p99", 0.99)]));
    }
    Ok(())
}

// ---------------------------------------------------------------- gRPC

/// An admin ("presence:admin") bearer for the spawned server, and a gRPC channel to
/// `port` once it listens (at most 20 s).
async fn grpc_admin(port: u16) -> Res<(tonic::transport::Channel, tonic::metadata::MetadataValue<tonic::metadata::Ascii>)> {
    let auth = presenced::auth::Authenticator::new(BENCH_SECRET, "presence-service", Duration::from_secs(30), None);
    let token = auth.mint("gateway", Duration::from_secs(3600), Some(presenced::auth::ADMIN_SCOPE))?;
    let bearer = format!("Bearer {token}").parse().map_err(|_| "token")?;
    let start = Instant::now();
    loop {
        match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).map_err(|e| e.to_string())?.connect().await {
            Ok(c) => return Ok((c, bearer)),
            Err(_) if start.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(format!("gRPC connect: {e}")),
        }
    }
}

async fn grpc_bench(args: GrpcArgs) -> Res<()> {
    use presenced::grpc::pb;
    use presenced::grpc::pb::presence_api_client::PresenceApiClient;

    let port = free_port()?;
    let _server = spawn_server_with(false, Some(port)).await?;
    let (channel, bearer) = grpc_admin(port).await?;
    let client = PresenceApiClient::new(channel);
    for i in 0..args.sessions {
        let req = pb::RegisterSessionRequest {
            user_id: format!("u{i}"),
            device_id: "d".into(),
            instance_id: "bench".into(),
            ttl_seconds: 600,
            platform: String::new(),
            active: None,
        };
        client.clone().register_session(authed(req, &bearer)).await.map_err(|e| e.to_string())?;
    }
    println!("one HTTP/2 connection, {} concurrent streams, {} sessions registered", args.concurrency, args.sessions);

    let sessions = args.sessions;
    let (c0, b0) = (client.clone(), bearer.clone());
    let refresh = measure(&args, move |i| {
        let mut c = c0.clone();
        let req = authed(
            pb::RefreshSessionRequest { user_id: format!("u{}", i % sessions), device_id: "d".into(), active: None, idle_since: None },
            &b0,
        );
        async move { c.refresh_session(req).await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await?;
    println!("RefreshSession: {refresh}");
    let ids: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let get = measure(&args, move |_| {
        let mut c = client.clone();
        let req = tonic::Request::new(pb::GetPresenceRequest { user_ids: ids.clone() });
        async move {
            let r = c.get_presence(req).await.map_err(|e| e.to_string())?;
            if r.get_ref().presences.len() == 100 {
                Ok(())
            } else {
                Err("short answer".into())
            }
        }
    })
    .await?;
    println!("GetPresence (100 ids): {get}");
    Ok(())
}

fn authed<T>(msg: T, bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", bearer.clone());
    r
}

/// Runs `call(i)` from `concurrency` workers for `seconds`; returns "N/s, p50, p99".
async fn measure<F, Fut>(args: &GrpcArgs, call: F) -> Res<String>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let m = measure_calls(args.concurrency, args.seconds, call).await?;
    Ok(format!("{:.0}/s, p50 {}, p99 {}", m.per_sec, ms(m.p50_us), ms(m.p99_us)))
}

/// What [`measure_calls`] saw.
pub struct Calls {
    pub per_sec: f64,
    pub p50_us: u32,
    pub p99_us: u32,
}

/// Runs `call(i)` from `concurrency` workers for `seconds`.
pub async fn measure_calls<F, Fut>(concurrency: usize, seconds: u64, call: F) -> Res<Calls>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let counter = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (call, counter) = (call.clone(), counter.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                call(i).await?;
                lat.push(t.elapsed().as_micros() as u32);
                counter.fetch_add(1, Ordering::Relaxed);
                i += 7919;
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.map_err(|e| e.to_string())??);
    }
    all.sort_unstable();
    let n = counter.load(Ordering::Relaxed);
    Ok(Calls { per_sec: n as f64 / seconds as f64, p50_us: pct(&all, 0.5), p99_us: pct(&all, 0.99) })
}
