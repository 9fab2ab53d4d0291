//! `presenced-bench cluster`: the hub-and-spoke topology on this machine (a center
//! nats-server with JetStream domain `hub`, two leaf nats-servers, one `presenced` on each)
//! and three measurements:
//!
//! 1. cross-node fan-out: publishers connected to leaf A change their status; subscribers
//!    connected to leaf B watch them; latency from the change sent to its delivery;
//! 2. KV writes per status change (the nodes' `store_writes` counters);
//! 3. store writes per second with many idle connected users heartbeating (leases absorb
//!    heartbeats: it must be O(nodes), not O(sessions)).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use super::{free_port, open, percentiles, sibling, subscriber, Res, Shared, Sub, MARK};

#[derive(Parser, Clone)]
pub struct ClusterArgs {
    /// Subscriber connections on leaf B (each watches every publisher).
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publisher users connected to leaf A.
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Status changes to drive (round robin over the publishers).
    #[arg(long, default_value_t = 1000)]
    pub changes: usize,
    /// Status changes per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Idle users connected to leaf A for the store-write measurement.
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// How long to count store writes with the idle users connected.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    /// Each idle client sends a `heartbeat` message this often.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// `presence.node_lease_ttl` of the nodes (renewed every third of it).
    #[arg(long, default_value = "15s")]
    pub lease_ttl: String,
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn nats_binary() -> Res<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| "nats-server not found: apt-get install nats-server".to_string())
}

pub fn nats_server(dir: &Path, name: &str, body: &str) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join(format!("{name}.conf"));
    let store = dir.join(format!("js-{name}"));
    let text = format!("listen: 127.0.0.1:{port}\n{}", body.replace("@STORE@", &store.display().to_string()));
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    // Its log stays in `dir` (removed with it) for the bench to summarize its warnings.
    let child = Command::new(nats_binary()?)
        .arg("-c")
        .arg(&conf)
        .arg("-l")
        .arg(dir.join(format!("{name}.log")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nats-server: {e}"))?;
    Ok((Proc(child), port))
}

/// The warnings and errors in the nats-servers' logs under `dir`, counted by kind (the
/// text after the client prefix, digits dropped), most frequent first.
pub fn engine_warnings(dir: &Path) -> Vec<(String, usize)> {
    let mut kinds: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let logs = std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "log"));
    for log in logs {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("[WRN]") || l.contains("[ERR]")) {
            let level = if line.contains("[ERR]") { "ERR" } else { "WRN" };
            let what = line.rsplit(" - ").next().unwrap_or(line);
            let what = what.split_once("] ").map_or(what, |(_, rest)| rest);
            let key: String = what.chars().filter(|c| !c.is_ascii_digit()).take(80).collect();
            *kinds.entry(format!("{level} {}", key.trim())).or_default() += 1;
        }
    }
    let mut kinds: Vec<(String, usize)> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    kinds
}

pub async fn wait_port(port: u16) -> Res<()> {
    wait_port_unless_exited(port, None).await.map(|_| ())
}

/// Waits until `port` takes connections (true), or `process`, the one meant to listen
/// there, exits first (false).
pub async fn wait_port_unless_exited(port: u16, mut process: Option<&mut Proc>) -> Res<bool> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if process.as_mut().is_some_and(|p| matches!(p.0.try_wait(), Ok(Some(_)))) {
            return Ok(false);
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("nothing listens on {port} after 20s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(true)
}

/// Waits until core messages cross from `from` to `to` (the leaf link is up).
async fn linked(from: u16, to: u16) -> Res<()> {
    let t = async_nats::connect(format!("127.0.0.1:{to}")).await.map_err(|e| e.to_string())?;
    let f = async_nats::connect(format!("127.0.0.1:{from}")).await.map_err(|e| e.to_string())?;
    let mut sub = t.subscribe("bench.link").await.map_err(|e| e.to_string())?;
    t.flush().await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        f.publish("bench.link", "x".into()).await.map_err(|e| e.to_string())?;
        f.flush().await.map_err(|e| e.to_string())?;
        if tokio::time::timeout(Duration::from_millis(200), sub.next()).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err("leaf link not up after 20s".into());
        }
    }
}

/// Starts the engine: one nats-server with JetStream, or (`leaves` > 0) the center with
/// JetStream domain `hub` and `leaves` leaf nats-servers linked to it, as deploy/ has them.
/// Each as (process, client port, monitoring port), the center first.
pub async fn engine(dir: &Path, leaves: usize) -> Res<Vec<(Proc, u16, u16)>> {
    let mon = free_port()?;
    let mut servers = Vec::with_capacity(1 + leaves);
    if leaves == 0 {
        let body = format!("http: 127.0.0.1:{mon}\nmax_payload: 1MB\njetstream {{ store_dir: \"@STORE@\", max_file_store: 8GB }}\n");
        let (p, port) = nats_server(dir, "scale", &body)?;
        servers.push((p, port, mon));
    } else {
        let link = free_port()?;
        let body = format!(
            "http: 127.0.0.1:{mon}\nmax_payload: 1MB\njetstream {{ domain: hub, store_dir: \"@STORE@\", max_file_store: 8GB }}\nleafnodes {{ listen: \"127.0.0.1:{link}\" }}\n"
        );
        let (p, port) = nats_server(dir, "center", &body)?;
        servers.push((p, port, mon));
        for k in 0..leaves {
            let mon = free_port()?;
            let body = format!(
                "http: 127.0.0.1:{mon}\nmax_payload: 1MB\njetstream {{ domain: leaf{k}, store_dir: \"@STORE@\", max_file_store: 8GB }}\nleafnodes {{ remotes = [ {{ url: \"nats-leaf://127.0.0.1:{link}\" }} ] }}\n"
            );
            let (p, port) = nats_server(dir, &format!("leaf{k}"), &body)?;
            servers.push((p, port, mon));
        }
    }
    for (_, port, _) in &servers {
        wait_port(*port).await?;
    }
    if let Some(((_, center, _), leaves)) = servers.split_first() {
        for (_, leaf, _) in leaves {
            linked(*leaf, *center).await?;
        }
    }
    Ok(servers)
}

/// How a node reaches its engine.
#[derive(Clone)]
pub enum Store {
    /// NATS at a port, through JetStream domain `hub` (the hub-and-spoke topology) or none.
    Nats {
        port: u16,
        domain: Option<&'static str>,
    },
    Redis {
        port: u16,
    },
}

impl Store {
    /// The backend's name (`/health/<name>`).
    pub fn name(&self) -> &'static str {
        match self {
            Store::Nats { .. } => "nats",
            Store::Redis { .. } => "redis",
        }
    }
}

pub fn presenced(dir: &Path, id: &str, node_type: &str, store: &Store, lease: &str) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let mut cmd = Command::new(sibling("presenced")?);
    cmd.arg("serve")
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", port.to_string())
        .env("PRESENCE_SERVICE__GRPC_PORT", "0")
        .env("PRESENCE_SERVICE__NODE_ID", id)
        .env("PRESENCE_SERVICE__NODE_TYPE", node_type)
        .env("PRESENCE_SERVICE__DATA_DIR", dir.join(id))
        .env("PRESENCE_STORE__BACKEND", store.name())
        .env("PRESENCE_PRESENCE__NODE_LEASE_TTL", lease)
        .env("PRESENCE_PRESENCE__SESSION_TTL", "30s")
        .env("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "10s")
        .envs(super::BENCH_ENV);
    match store {
        Store::Nats { port, domain } => {
            cmd.env("PRESENCE_NATS__URLS", format!("[\"nats://127.0.0.1:{port}\"]"));
            if let Some(d) = domain {
                cmd.env("PRESENCE_NATS__JETSTREAM__DOMAIN", d);
            }
        }
        Store::Redis { port } => {
            cmd.env("PRESENCE_REDIS__URLS", format!("[\"redis://127.0.0.1:{port}\"]"));
        }
    }
    let child = cmd.stdout(Stdio::null()).spawn().map_err(|e| format!("presenced: {e}"))?;
    Ok((Proc(child), port))
}

/// `GET path` on 127.0.0.1:port, the JSON body.
pub async fn get_json(port: u16, path: &str) -> Res<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).ok_or("no HTTP body")?;
    // Chunked or not, the JSON object is the span between the first '{' and the last '}'.
    let (a, b) = (body.find('{').ok_or("no JSON")?, body.rfind('}').ok_or("no JSON")?);
    serde_json::from_str(&body[a..=b]).map_err(|e| e.to_string())
}

/// Store writes of every node so far (their `/health/<backend>`).
async fn total_writes(ports: &[u16], backend: &str) -> Res<u64> {
    let mut n = 0;
    for p in ports {
        n += get_json(*p, &format!("/health/{backend}")).await?["data"]["store_writes"].as_u64().ok_or("no store_writes")?;
    }
    Ok(n)
}

/// Sessions a node holds (0 when it cannot say).
async fn held(port: u16, backend: &str) -> u64 {
    get_json(port, &format!("/health/{backend}")).await.ok().and_then(|v| v["data"]["sessions_held"].as_u64()).unwrap_or(0)
}

/// What the fan-out phase measured.
pub struct Fanout {
    /// Delivery latencies (µs), sorted.
    pub latencies: Vec<u32>,
    /// Store writes per status change (lease renewals included).
    pub writes_per_change: f64,
}

pub async fn run(args: ClusterArgs) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("presenced-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(dir.clone());
    let servers = engine(&dir, 2).await?;
    let [(_, center, _), (_, leaf_a, _), (_, leaf_b, _)] = servers.as_slice() else {
        return Err("the hub and spoke did not start three nats-servers".into());
    };
    let (center, leaf_a, leaf_b) = (*center, *leaf_a, *leaf_b);
    let on = |port: u16| Store::Nats { port, domain: Some("hub") };
    let (_c, c_http) = presenced(&dir, "center-1", "center", &on(center), &args.lease_ttl)?;
    wait_port(c_http).await?;
    let (_a, a_http) = presenced(&dir, "leaf-a", "leaf", &on(leaf_a), &args.lease_ttl)?;
    let (_b, b_http) = presenced(&dir, "leaf-b", "leaf", &on(leaf_b), &args.lease_ttl)?;
    wait_port(a_http).await?;
    wait_port(b_http).await?;
    let nodes = [c_http, a_http, b_http];
    println!("cluster: center nats :{center} (domain hub), leaf nats :{leaf_a} :{leaf_b}; presenced http :{c_http} (center) :{a_http} (leaf A) :{b_http} (leaf B)");

    // 1 and 2. Cross-node fan-out, subscribers on leaf B, publishers on leaf A; writes per change.
    fanout(a_http, b_http, &nodes, "nats", &args).await?;
    // 3. Idle users heartbeating on leaf A.
    idle_writes(a_http, &nodes, "nats", &args).await?;
    Ok(())
}

/// Cross-node fan-out: `subscribers` WebSocket clients on node `sub_http` watch
/// `publishers` users connected to node `pub_http`, who change status `changes` times at
/// `rate`/s; latency from the change sent to each delivery.
pub async fn fanout(pub_http: u16, sub_http: u16, nodes: &[u16], backend: &str, args: &ClusterArgs) -> Res<Fanout> {
    let shared =
        Arc::new(Shared { start: Instant::now(), connected: AtomicU64::new(0), failed: AtomicU64::new(0), samples: Default::default() });
    let publishers: Arc<Vec<String>> = Arc::new((0..args.publishers.max(1)).map(|i| format!("pub-{i}")).collect());
    let (stop_tx, stop_rx) = watch::channel(false);
    let b_addr: SocketAddr = format!("127.0.0.1:{sub_http}").parse().map_err(|e| format!("{e}"))?;
    let a_addr: SocketAddr = format!("127.0.0.1:{pub_http}").parse().map_err(|e| format!("{e}"))?;
    let gate = Arc::new(Semaphore::new(128));
    let mut tasks = Vec::new();
    for id in 0..args.subscribers {
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let sub = Sub {
            addr: b_addr,
            source: Ipv4Addr::new(127, 0, 0, 2 + (id % 50) as u8),
            id,
            watch_users: publishers.clone(),
            conversations: Vec::new(),
            baseline: false,
        };
        tasks.push(tokio::spawn(subscriber(shared.clone(), sub, stop_rx.clone(), permit)));
    }
    while shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < args.subscribers as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_subs = shared.connected.load(Ordering::Relaxed);
    let mut pubs = Vec::new();
    for (i, u) in publishers.iter().enumerate() {
        pubs.push(open(a_addr, Ipv4Addr::new(127, 0, 0, 2 + (i % 50) as u8), u, false).await?);
    }
    // A handshake completes before its session is written: wait for all of them.
    let t1 = Instant::now();
    while (held(sub_http, backend).await < connected_subs || held(pub_http, backend).await < publishers.len() as u64)
        && t1.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    shared.samples.lock().clear();
    let writes_before = total_writes(nodes, backend).await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.001)));
    for n in 0..args.changes {
        tick.tick().await;
        let ts = shared.start.elapsed().as_nanos() as u64;
        let count = pubs.len();
        let status = if (n / count) % 2 == 0 { "busy" } else { "away" };
        let text =
            serde_json::json!({"type": "presence_update", "payload": {"online_status": status, "custom_status": format!("{MARK}{ts}")}});
        pubs[n % count].send(Message::text(text.to_string())).await.map_err(|e| format!("publish: {e}"))?;
    }
    for mut p in pubs {
        tokio::spawn(async move { while let Some(Ok(_)) = p.next().await {} });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let change_secs = started.elapsed().as_secs_f64();
    let writes = total_writes(nodes, backend).await? - writes_before;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let samples = std::mem::take(&mut *shared.samples.lock());
    let mut latencies: Vec<u32> = samples.iter().map(|s| s.1).collect();
    latencies.sort_unstable();
    let connected = shared.connected.load(Ordering::Relaxed);
    println!(
        "cross-node fan-out ({backend}: change on node :{pub_http} → subscriber on node :{sub_http}): {} changes × {connected} subscribers: {} deliveries of {} expected",
        args.changes,
        latencies.len(),
        args.changes as u64 * connected
    );
    println!("  latency {}", percentiles(&latencies, &[("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]));
    let writes_per_change = writes as f64 / args.changes.max(1) as f64;
    println!(
        "store writes per status change: {writes_per_change:.3} ({writes} writes over {change_secs:.1}s for {} changes, lease renewals included)",
        args.changes
    );
    Ok(Fanout { latencies, writes_per_change })
}

/// Store writes per second with `args.idle` users connected to node `http`, each
/// sending a `heartbeat` every `args.heartbeat_secs`: (users online, writes/s, heartbeats/s).
pub async fn idle_writes(http: u16, nodes: &[u16], backend: &str, args: &ClusterArgs) -> Res<(u64, f64, f64)> {
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().map_err(|e| format!("{e}"))?;
    let gate = Arc::new(Semaphore::new(128));
    // Sessions already there (publishers; writers that just left settle first).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let already = held(http, backend).await;
    let connected = Arc::new(AtomicU64::new(0));
    let beats = Arc::new(AtomicU64::new(0));
    let (idle_stop, idle_rx) = watch::channel(false);
    let mut idle = Vec::new();
    let t0 = Instant::now();
    for id in 0..args.idle {
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (connected, beats, mut stop) = (connected.clone(), beats.clone(), idle_rx.clone());
        let every = Duration::from_secs(args.heartbeat_secs.max(1));
        idle.push(tokio::spawn(async move {
            let source = Ipv4Addr::new(127, 0, 0, 2 + (id % 58) as u8);
            let ws = open(addr, source, &format!("idle-{id}"), false).await;
            drop(permit);
            let Ok(mut ws) = ws else { return };
            connected.fetch_add(1, Ordering::Relaxed);
            // Spread the heartbeats over the interval.
            let offset = every.mul_f64((id % 1000) as f64 / 1000.0);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tick.tick() => {
                        if ws.send(Message::text(r#"{"type":"heartbeat"}"#)).await.is_err() { break; }
                        beats.fetch_add(1, Ordering::Relaxed);
                    }
                    m = ws.next() => if !matches!(m, Some(Ok(_))) { break },
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    while connected.load(Ordering::Relaxed) < args.idle as u64 && t0.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let online = connected.load(Ordering::Relaxed);
    while held(http, backend).await < online + already && t0.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("idle: {online} users connected to node :{http} and their sessions written in {:.1}s", t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (w0, b0, s0) = (total_writes(nodes, backend).await?, beats.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (w1, b1, secs) = (total_writes(nodes, backend).await?, beats.load(Ordering::Relaxed), s0.elapsed().as_secs_f64());
    let held = held(http, backend).await;
    let (writes, beats) = ((w1 - w0) as f64 / secs, (b1 - b0) as f64 / secs);
    println!(
        "store writes with {online} idle users ({held} sessions held by node :{http}, {backend}): {writes:.2} writes/s over {secs:.0}s, while they sent {beats:.0} heartbeats/s"
    );
    let _ = idle_stop.send(true);
    for t in idle {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    Ok((online, writes, beats))
}

pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
