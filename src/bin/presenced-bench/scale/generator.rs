//! The load-generator process (`presenced-bench scale-gen`, one per ~19,500 sockets) and
//! the orchestrator's handle on it: lines on stdin and stdout.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::sync::{watch, Notify, Semaphore};

use crate::lean::{LeanWs, Read};
use crate::{Res, MARK};

pub(super) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if k.starts_with("PRESENCE_") => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected PRESENCE_NAME=value, got {s:?}")),
    }
}

/// One load-generator process (started by `scale`; not for direct use).
#[derive(Parser, Clone)]
pub struct GenArgs {
    /// The nodes, `host:port` comma-separated; user u goes to node u % len.
    #[arg(long)]
    pub targets: String,
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub total: usize,
    #[arg(long)]
    pub contacts: usize,
    #[arg(long)]
    pub change_pct_per_min: f64,
    #[arg(long)]
    pub heartbeat_secs: u64,
    #[arg(long)]
    pub concurrency: usize,
    /// Source addresses 127.0.0.<from>..=<to>.
    #[arg(long, default_value = "2-60")]
    pub sources: String,
    #[arg(long)]
    pub baseline: bool,
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
}

pub(super) fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

// ---------------------------------------------------------------- the generator process

pub(super) struct GenShared {
    connected: AtomicU64,
    failed: AtomicU64,
    /// Handshakes refused and tried again.
    retried: AtomicU64,
    changes: AtomicU64,
    samples: parking_lot::Mutex<Vec<u32>>,
    /// Heartbeats sent and acks received since the last `change`.
    beats: AtomicU64,
    acks: AtomicU64,
    /// Status changes the node refused (an `error` answer: degraded, rate limited...)
    /// since the last `change`.
    refused: AtomicU64,
}

/// `scale-gen`: opens its users' sessions, reports `ready <connected> <failed> <secs> <retried>`,
/// then on `change <secs>` drives status changes for that long and reports
/// `done <changes> <connected> <heartbeats sent> <acks received> <changes refused>
/// <latency µs,...>`; `stop`
/// (or stdin closing) ends it.
pub async fn generator(args: GenArgs) -> Res<()> {
    let targets: Vec<SocketAddr> =
        args.targets.split(',').map(|t| t.parse().map_err(|e| format!("target {t}: {e}"))).collect::<Res<_>>()?;
    if targets.is_empty() {
        return Err("no targets".into());
    }
    let (lo, hi) = args.sources.split_once('-').ok_or("--sources a-b")?;
    let (lo, hi): (u8, u8) = (lo.parse().map_err(|_| "sources")?, hi.parse().map_err(|_| "sources")?);
    let sources: Vec<Ipv4Addr> = (lo..=hi.max(lo)).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let shared = Arc::new(GenShared {
        connected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        retried: AtomicU64::new(0),
        changes: AtomicU64::new(0),
        samples: Default::default(),
        beats: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // One wake-up per client: "change your status now".
    let changers: Arc<[Notify]> = (0..args.count).map(|_| Notify::new()).collect();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let user = args.first + i;
        let permit = gate.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let target = targets[user % targets.len()];
        let source = sources[i % sources.len()];
        let client = Client {
            user,
            slot: i,
            total: args.total,
            contacts: args.contacts,
            target,
            source,
            heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
            retries: args.retries,
        };
        tasks.push(tokio::spawn(client.run(shared.clone(), stop_rx.clone(), changers.clone(), permit, args.baseline)));
    }
    // Every handshake done (or failed).
    let _ = gate.acquire_many(args.concurrency.max(1) as u32).await;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ready {} {} {secs:.3} {}",
        shared.connected.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.retried.load(Ordering::Relaxed)
    );
    let _ = std::io::stdout().flush();

    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    while let Ok(Some(line)) = lines.next_line().await {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("change") => {
                let secs: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(10.0);
                let per_sec = args.count as f64 * args.change_pct_per_min / 100.0 / 60.0;
                let interval = Duration::from_secs_f64(1.0 / per_sec.max(0.001));
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let mut tick = tokio::time::interval(interval);
                shared.beats.store(0, Ordering::Relaxed);
                shared.acks.store(0, Ordering::Relaxed);
                shared.refused.store(0, Ordering::Relaxed);
                while Instant::now() < end {
                    tick.tick().await;
                    if let Some(c) = changers.get((rand::random::<u64>() % args.count.max(1) as u64) as usize) {
                        c.notify_one();
                        shared.changes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Late deliveries.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let mut s = std::mem::take(&mut *shared.samples.lock());
                s.sort_unstable();
                let list: Vec<String> = s.iter().map(u32::to_string).collect();
                println!(
                    "done {} {} {} {} {} {}",
                    shared.changes.swap(0, Ordering::Relaxed),
                    shared.connected.load(Ordering::Relaxed),
                    shared.beats.load(Ordering::Relaxed),
                    shared.acks.load(Ordering::Relaxed),
                    shared.refused.load(Ordering::Relaxed),
                    list.join(",")
                );
                let _ = std::io::stdout().flush();
            }
            Some("stop") | None => break,
            _ => {}
        }
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(())
}

/// One generated user. Kept small on purpose: a generator holds up to 19,000 of these,
/// and what they cost is reported next to the nodes' figures.
pub(super) struct Client {
    user: usize,
    /// This client's place in its generator (its wake-up).
    slot: usize,
    total: usize,
    contacts: usize,
    target: SocketAddr,
    source: Ipv4Addr,
    heartbeat: Duration,
    retries: u32,
}

impl Client {
    pub(super) async fn run(
        self,
        shared: Arc<GenShared>,
        mut stop: watch::Receiver<bool>,
        changes: Arc<[Notify]>,
        permit: tokio::sync::OwnedSemaphorePermit,
        baseline: bool,
    ) {
        let me = format!("u{}", self.user);
        // A refused handshake (503 while a node is degraded, a reset) is tried again after
        // 1, 2, 4... s, as a real client reconnects; the permit is kept meanwhile, so a
        // generator whose nodes refuse slows down.
        let mut attempt = 0;
        let mut ws = loop {
            match LeanWs::connect(self.target, self.source, (!baseline).then_some(me.as_str())).await {
                Ok(ws) => break ws,
                Err(e) if attempt < self.retries => {
                    attempt += 1;
                    if shared.retried.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("user {}: {e}; trying again", self.user);
                    }
                    let backoff = Duration::from_secs(1 << (attempt - 1).min(5));
                    tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 1000)).await;
                }
                Err(e) => {
                    if shared.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("user {}: {e}", self.user);
                    }
                    drop(permit);
                    return;
                }
            }
        };
        let own = format!("\"{me}\"");
        drop(me);
        // Own echo excluded: a contact's change carries another user's id.
        let mut on_text = |t: &[u8]| {
            if t == crate::HEARTBEAT_ACK.as_bytes() {
                shared.acks.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Ok(t) = std::str::from_utf8(t) else { return };
            if t.contains(r#""type":"error""#) {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Some(ts) = crate::marker_ts(t) {
                if !t.contains(&own) {
                    shared.samples.lock().push((unix_ns().saturating_sub(ts) / 1000) as u32);
                }
            }
        };
        if !baseline && self.contacts > 0 {
            let ids: Vec<String> = (1..=self.contacts).map(|k| format!("u{}", (self.user + k) % self.total.max(1))).collect();
            let sub = serde_json::json!({"type": "subscribe", "payload": {"user_ids": ids}}).to_string();
            if ws.send_text(&sub).await.is_err() {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                return;
            }
        }
        if !matches!(ws.drain_buffered(&mut on_text).await, Ok(Read::Open)) {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            return;
        }
        shared.connected.fetch_add(1, Ordering::Relaxed);
        drop(permit);
        let phase = Duration::from_millis(rand::random::<u64>() % self.heartbeat.as_millis().max(1) as u64);
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + phase, self.heartbeat);
        // The bare server answers heartbeats as presenced does (the CPU baseline); status
        // changes are presenced's only.
        let changing = !baseline;
        let Some(change) = changes.get(self.slot) else { return };
        let mut flip = false;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = beat.tick() => {
                    if ws.send_text(crate::HEARTBEAT).await.is_err() { break; }
                    shared.beats.fetch_add(1, Ordering::Relaxed);
                }
                _ = change.notified(), if changing => {
                    flip = !flip;
                    let msg = serde_json::json!({"type": "presence_update", "payload": {
                        "online_status": if flip { "away" } else { "online" },
                        "custom_status": format!("{MARK}{}", unix_ns()),
                    }}).to_string();
                    if ws.send_text(&msg).await.is_err() { break; }
                }
                r = ws.readable() => {
                    if r.is_err() || !matches!(ws.on_readable(&mut on_text).await, Ok(Read::Open)) {
                        break;
                    }
                }
            }
        }
        ws.close().await;
    }
}

pub(super) struct Generator {
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Generator {
    pub(super) fn send(&mut self, line: &str) -> Res<()> {
        let s = self.stdin.as_mut().ok_or("generator stdin closed")?;
        writeln!(s, "{line}").and_then(|_| s.flush()).map_err(|e| format!("generator: {e}"))
    }

    pub(super) fn expect(&self, prefix: &str, within: Duration) -> Res<String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| format!("generator said no {prefix:?} within {within:?}"))?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
    }
}
