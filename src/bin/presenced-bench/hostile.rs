//! `presenced-bench hostile`: what hostile clients cost the server, measured as its RSS.
//!
//! - `--attack watch`: unauthenticated gRPC `WatchPresence` streams of `--ids` user ids
//!   each, opened over as few HTTP/2 connections as the server allows, never read
//!   (parked). Reports streams accepted and refused, and server RSS.
//! - `--attack stall`: TCP connections that send half a request head and stall. Reports
//!   server RSS with them open, then once the server's header-read timeout had time to act,
//!   and how many it closed.
//!
//! `--presenced PATH` runs another build (e.g. an older one, for a before/after figure);
//! it is started with only the keys every version knows. Loopback only.

use std::time::{Duration, Instant};

use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use super::{free_port, rss_kib, sibling, Res};

#[derive(clap::Parser, Clone)]
pub struct HostileArgs {
    /// `watch` (parked WatchPresence streams) or `stall` (half-sent request heads).
    #[arg(long)]
    attack: String,
    /// Streams (watch) or sockets (stall) to open.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// User ids per watch stream.
    #[arg(long, default_value_t = 1000)]
    ids: usize,
    /// Streams per HTTP/2 connection (the server may allow fewer).
    #[arg(long, default_value_t = 100)]
    per_connection: usize,
    /// The presenced binary to attack (default: the one next to this bench).
    #[arg(long)]
    presenced: Option<std::path::PathBuf>,
    /// Seconds to wait, after opening, before measuring.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
}

struct Target {
    child: std::process::Child,
    http: String,
    grpc: String,
    dir: std::path::PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(bin: &std::path::Path) -> Res<Target> {
    let (port, grpc_port) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("presenced-hostile-{}", std::process::id()));
    let child = std::process::Command::new(bin)
        .arg("serve")
        .env_clear()
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", port.to_string())
        .env("PRESENCE_SERVICE__GRPC_PORT", grpc_port.to_string())
        .env("PRESENCE_SERVICE__DATA_DIR", &dir)
        .env("PRESENCE_AUTH__JWT_SECRET", super::BENCH_SECRET)
        .env("PRESENCE_LOGGING__LEVEL", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let http = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while tokio::net::TcpStream::connect(&http).await.is_err() || tokio::net::TcpStream::connect(("127.0.0.1", grpc_port)).await.is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("presenced did not listen within 20s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Target { child, http, grpc: format!("http://127.0.0.1:{grpc_port}"), dir })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub async fn run(args: HostileArgs) -> Res<()> {
    let bin = match &args.presenced {
        Some(p) => p.clone(),
        None => sibling("presenced")?,
    };
    let target = start(&bin).await?;
    let pid = target.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid).ok_or("cannot read the server's RSS")?;
    println!("presenced {} idle: RSS {}", bin.display(), mib(idle));
    match args.attack.as_str() {
        "watch" => watch(&target, pid, idle, &args).await,
        "stall" => stall(&target, pid, idle, &args).await,
        other => Err(format!("unknown attack {other:?}: watch or stall")),
    }
}

async fn watch(target: &Target, pid: u32, idle: u64, args: &HostileArgs) -> Res<()> {
    let ids: Vec<String> = (0..args.ids).map(|i| format!("victim-{i}")).collect();
    let mut held = Vec::new();
    let (mut accepted, mut refused, mut other) = (0usize, 0usize, 0usize);
    let mut client: Option<PresenceApiClient<tonic::transport::Channel>> = None;
    let start = Instant::now();
    for i in 0..args.count {
        if i % args.per_connection.max(1) == 0 || client.is_none() {
            client = Some(PresenceApiClient::connect(target.grpc.clone()).await.map_err(|e| e.to_string())?);
        }
        let Some(c) = client.as_mut() else { break };
        let req = pb::WatchPresenceRequest { user_ids: ids.clone(), all: false, conversation_ids: vec![] };
        match tokio::time::timeout(Duration::from_secs(10), c.watch_presence(req)).await {
            Ok(Ok(stream)) => {
                accepted += 1;
                held.push(stream); // never read: parked
            }
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
            Ok(Err(s)) => {
                if other == 0 {
                    eprintln!("stream {i}: {s:?}");
                }
                other += 1;
            }
            Err(_) => {
                other += 1;
                client = None; // this connection is stuck (no stream slot): use a new one
            }
        }
    }
    println!(
        "opened in {:.1}s: {accepted} streams accepted, {refused} refused (RESOURCE_EXHAUSTED), {other} other errors",
        start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss = rss_kib(pid).ok_or("server gone")?;
    let per = if accepted > 0 { (rss.saturating_sub(idle)) as f64 / accepted as f64 } else { 0.0 };
    println!(
        "RSS with the streams parked: {} (+{} over idle; {per:.1} KiB per accepted stream of {} ids)",
        mib(rss),
        mib(rss.saturating_sub(idle)),
        args.ids
    );
    drop(held);
    Ok(())
}

async fn stall(target: &Target, pid: u32, idle: u64, args: &HostileArgs) -> Res<()> {
    let addr: std::net::SocketAddr = target.http.parse().map_err(|e| format!("{e}"))?;
    let mut socks = Vec::new();
    for i in 0..args.count {
        let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 50) as u8);
        sock.bind((source, 0).into()).map_err(|e| e.to_string())?;
        match sock.connect(addr).await {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /api/v2/presence/victim HTTP/1.1\r\nHost: x\r\nX-Stall: ").await;
                socks.push(s);
            }
            Err(e) => return Err(format!("connect {i}: {e}")),
        }
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let during = rss_kib(pid).ok_or("server gone")?;
    println!("{} stalled sockets open: RSS {} (+{} over idle)", socks.len(), mib(during), mib(during.saturating_sub(idle)));
    // Give the server's header-read timeout (10 s by default) time to act.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut closed = 0;
    for s in &mut socks {
        let mut b = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
            closed += 1;
        }
    }
    let after = rss_kib(pid).ok_or("server gone")?;
    println!(
        "15 s after opening: {closed} of {} closed by the server; RSS {} (+{} over idle)",
        socks.len(),
        mib(after),
        mib(after.saturating_sub(idle))
    );
    Ok(())
}
