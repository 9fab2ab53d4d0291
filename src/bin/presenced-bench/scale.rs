//! `presenced-bench scale`: many presenced nodes in cluster mode on one nats-server with
//! JetStream, driven by many load-generator processes (each under the open-file limit),
//! all on this machine's loopback.
//!
//! Users `0..sessions` connect to node `user % nodes` (gateway auth: `X-User-Id`), each
//! watches `contacts` other users (`user+1 ..= user+contacts`: with more nodes than
//! contacts, every contact lives on another node, so fan-out crosses nodes), heartbeats at
//! `heartbeat_secs` with a random phase, and during the hold `change_pct_per_min` % of the
//! users change status per minute with a timestamp in the message: every contact that
//! receives it measures change → delivery across processes (wall clock, same machine).
//!
//! Reported side by side with `--baseline` (bare tokio-tungstenite nodes, no NATS, which
//! answer the same heartbeats with the same ack): sessions held, server RSS per session
//! beyond the nodes' idle footprint, nats-server RSS and subscriptions (its monitoring
//! endpoint), connect rate, delivery p50/p99/max, store writes/s, heartbeats sent and
//! acked, CPU per 10K sessions (nodes and generators) and the machine's CPU during the
//! hold. Every process it starts is stopped by pid, the temporary
//! directory removed, and any sysctl it changed reported and restored.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::sync::{watch, Notify, Semaphore};

use super::cluster::{engine, engine_warnings, get_json, wait_port_unless_exited, Cleanup, Proc};
use super::lean::{LeanWs, Read};
use super::{free_port, percentiles, rss_kib, sibling, Res, BENCH_ENV, MARK};

#[derive(Parser, Clone)]
pub struct ScaleArgs {
    /// presenced nodes (each holds sessions / nodes connections; at most ~19,500 each).
    #[arg(long, default_value_t = 50)]
    pub nodes: usize,
    /// Concurrent WebSocket sessions in total.
    #[arg(long, default_value_t = 1_000_000)]
    pub sessions: usize,
    /// Users each user watches (subscribes to).
    #[arg(long, default_value_t = 10)]
    pub contacts: usize,
    /// Percent of the users that change status per minute during the hold.
    #[arg(long, default_value_t = 1.0)]
    pub change_pct_per_min: f64,
    /// Seconds of steady state measured once every session is up.
    #[arg(long, default_value_t = 60)]
    pub hold_secs: u64,
    /// Sessions per load-generator process (each under the 20,000 open files).
    #[arg(long, default_value_t = 19_000)]
    pub per_generator: usize,
    /// Heartbeat interval of the clients (the server's default is 25 s).
    #[arg(long, default_value_t = 25)]
    pub heartbeat_secs: u64,
    /// Handshakes in flight per generator.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Bare tokio-tungstenite nodes (no NATS, no presence) instead of presenced: the
    /// memory and CPU baseline (they answer each heartbeat with the ack presenced sends).
    #[arg(long)]
    pub baseline: bool,
    /// Stop the ramp (kill the generators, report who held the memory) when the machine's
    /// MemAvailable falls below this many MiB.
    #[arg(long, default_value_t = 1536)]
    pub min_free_mib: u64,
    /// Leave the sysctls alone (by default the bench widens the ephemeral port range and
    /// the accept backlog when it can, and restores them at the end).
    #[arg(long)]
    pub no_sysctl: bool,
    /// Extra configuration for every node, `NAME=value` (e.g.
    /// `PRESENCE_CACHE__WATCH_WRITES=false`); repeatable.
    #[arg(long = "node-env", value_parser = parse_env)]
    pub node_env: Vec<(String, String)>,
    /// The seed's hub and spoke (deploy/): a center nats-server (JetStream domain `hub`,
    /// where the KV lives) and this many leaf nats-servers linked to it; node i connects to
    /// leaf i % leaves as a `leaf` node. 0: every node on one nats-server.
    #[arg(long, default_value_t = 0)]
    pub leaves: usize,
    /// Run everything in a network namespace of its own whose TCP established-connection
    /// hash has this many buckets (`net.ipv4.tcp_child_ehash_entries`; needs root, Linux
    /// 6.1+, `unshare` and `ip`). The host's table is sized at boot (262,144 buckets here):
    /// with two million loopback sockets its chains grow long, and at 735,000 sessions
    /// the lookup took 10 % of the CPU. 0: the host's namespace.
    #[arg(long, default_value_t = 0)]
    pub netns_ehash: u64,
    /// Times a client tries a refused handshake again (after 1, 2, 4... s), as real
    /// clients reconnect; each retry is counted and reported.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Run the nats-servers at this nice value (`renice`; below 0 needs root). On one box
    /// with 52 nodes and their clients, nats-server gets a 1/100th share of the CPU and the
    /// whole cluster waits on it; in production the store has machines of its own. 0: as
    /// started.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub engine_nice: i32,
    /// Give up on the ramp after this many seconds (every generator must report its
    /// sessions up by then).
    #[arg(long, default_value_t = 1800)]
    pub ramp_timeout_secs: u64,
}

/// Set in the bench's own process once it runs in its own network namespace.
const IN_NETNS: &str = "PRESENCED_BENCH_IN_NETNS";

/// Runs this same command again in a new network namespace (its loopback up) whose TCP
/// hash has `buckets` buckets; the sysctl is set for the namespace's creation and restored.
fn in_own_netns(buckets: u64) -> Res<()> {
    let key = "net.ipv4.tcp_child_ehash_entries";
    let want = buckets.to_string();
    let restore = raise(key, &want, |v| v.parse::<u64>().is_ok_and(|n| n != buckets));
    let now = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries").unwrap_or_default();
    if now.trim() != want {
        return Err(format!("{key} is {:?}, not {want}: --netns-ehash needs root and Linux 6.1 or later", now.trim()));
    }
    println!("netns: a network namespace of its own, {buckets} TCP hash buckets");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(IN_NETNS, "1")
        .status()
        .map_err(|e| format!("unshare (util-linux): {e}"))?;
    drop(restore);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the bench in its own network namespace: {status}"))
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
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

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

// ---------------------------------------------------------------- the generator process

struct GenShared {
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
struct Client {
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
    async fn run(
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
            if t == super::HEARTBEAT_ACK.as_bytes() {
                shared.acks.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Ok(t) = std::str::from_utf8(t) else { return };
            if t.contains(r#""type":"error""#) {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if let Some(ts) = super::marker_ts(t) {
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
                    if ws.send_text(super::HEARTBEAT).await.is_err() { break; }
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

// ---------------------------------------------------------------- the orchestrator

/// A sysctl the bench changed, restored on drop.
struct Sysctl {
    key: &'static str,
    old: String,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let path = format!("/proc/sys/{}", self.key.replace('.', "/"));
        match std::fs::write(&path, &self.old) {
            Ok(()) => println!("sysctl {} restored to {:?}", self.key, self.old.trim()),
            Err(e) => println!("sysctl {}: could not restore {:?}: {e}", self.key, self.old.trim()),
        }
    }
}

/// Sets `key` to `want` when the current value is smaller (per `smaller`), reporting it.
fn raise(key: &'static str, want: &str, smaller: impl Fn(&str) -> bool) -> Option<Sysctl> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let old = std::fs::read_to_string(&path).ok()?;
    if !smaller(old.trim()) {
        return None;
    }
    match std::fs::write(&path, want) {
        Ok(()) => {
            println!("sysctl {key}: {:?} -> {want:?} (restored at the end)", old.trim());
            Some(Sysctl { key, old })
        }
        Err(e) => {
            println!("sysctl {key} is {:?}; could not set {want:?} ({e}): run as root, or set it yourself", old.trim());
            None
        }
    }
}

struct Generator {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Generator {
    fn send(&mut self, line: &str) -> Res<()> {
        let s = self.stdin.as_mut().ok_or("generator stdin closed")?;
        writeln!(s, "{line}").and_then(|_| s.flush()).map_err(|e| format!("generator: {e}"))
    }

    fn expect(&self, prefix: &str, within: Duration) -> Res<String> {
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

/// What is left of a ramp allowed `limit_secs` from `t0` (at least a second, for the
/// answers already waiting).
fn ramp_left(t0: Instant, limit_secs: u64) -> Duration {
    Duration::from_secs(limit_secs).saturating_sub(t0.elapsed()).max(Duration::from_secs(1))
}

/// CPU seconds (user + system) a process used so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// The machine's CPU time so far, from /proc/stat's `cpu` line (in ticks): user (with
/// nice), system, softirq (with irq), idle (with iowait), steal.
#[derive(Debug, Default, Clone, Copy)]
pub struct MachineCpu {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    pub idle: u64,
    pub steal: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        MachineCpu { user: at(0) + at(1), system: at(2), idle: at(3) + at(4), softirq: at(5) + at(6), steal: at(7) }
    }

    /// CPU-seconds (all CPUs) between `before` and now.
    pub fn elapsed_secs(&self, before: &MachineCpu) -> f64 {
        let total = |c: &MachineCpu| c.user + c.system + c.softirq + c.idle + c.steal;
        total(self).saturating_sub(total(before)) as f64 / 100.0
    }

    /// Shares of the time since `before`, in percent: (busy, user, system, softirq).
    pub fn since(&self, before: &MachineCpu) -> (f64, f64, f64, f64) {
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let (u, sy, si) = (d(self.user, before.user), d(self.system, before.system), d(self.softirq, before.softirq));
        let total = (u + sy + si + d(self.idle, before.idle) + d(self.steal, before.steal)).max(1.0);
        let pct = |x: f64| 100.0 * x / total;
        (pct(u + sy + si), pct(u), pct(sy), pct(si))
    }
}

/// What a scale run measured.
#[derive(Debug, Default)]
pub struct ScaleReport {
    pub sessions: u64,
    pub failed: u64,
    pub retried: u64,
    pub connect_secs: f64,
    pub node_rss_idle_kib: u64,
    pub node_rss_kib: u64,
    /// The load generators' RSS (the clients' side of the same sessions).
    pub generators_rss_kib: u64,
    /// What the nodes' read caches hold (their `/health/cache` cost), part of the RSS.
    pub cache_bytes: u64,
    pub nats_rss_kib: u64,
    pub nats_subscriptions: u64,
    pub latencies: Vec<u32>,
    /// The bare NATS publish -> subscribe baseline (µs, sorted).
    pub bare_latencies: Vec<u32>,
    pub changes: u64,
    /// Heartbeats the clients sent during the hold (and a little after), and the acks
    /// they received.
    pub heartbeats: (u64, u64),
    /// Status changes the nodes refused during the hold (`error` answers).
    pub refused: u64,
    /// The nats-servers' CPU seconds per second during the hold (all of them summed).
    pub nats_cpu_per_sec: f64,
    /// Nodes in degraded mode at the end of the hold (their `/health/nats`).
    pub nodes_degraded: usize,
    pub store_writes_per_sec: f64,
    pub cpu_secs_per_10k: f64,
    /// The generators' CPU, the same way (the clients' side of the heartbeats).
    pub generators_cpu_secs_per_10k: f64,
    /// The whole machine during the hold: (busy, user, system, softirq) in percent.
    pub machine: (f64, f64, f64, f64),
    /// Of the machine's busy time, the percent not charged to the bench's processes
    /// (nodes, generators, nats-servers): softirq work no process pays for, and anything
    /// else running on the machine.
    pub outside_pct: f64,
    /// The nats-servers' logged warnings and errors over the whole run, by kind.
    pub engine_warnings: Vec<(String, usize)>,
}

pub async fn run(args: ScaleArgs) -> Res<()> {
    if args.netns_ehash > 0 && std::env::var_os(IN_NETNS).is_none() {
        return in_own_netns(args.netns_ehash);
    }
    let r = measure(&args).await?;
    let mode = if args.baseline { "baseline (bare tokio-tungstenite nodes)" } else { "presenced (cluster mode on NATS)" };
    println!("== scale: {mode}, {} nodes", args.nodes);
    if !args.baseline {
        println!("layout               {}", layout(args.leaves));
    }
    for (k, v) in &args.node_env {
        println!("node configuration   {k}={v}");
    }
    println!(
        "sessions held        {} of {} ({} failed; {} handshakes refused and retried)",
        r.sessions, args.sessions, r.failed, r.retried
    );
    println!("connect rate         {:.0}/s ({:.1} s to connect them all)", r.sessions as f64 / r.connect_secs.max(0.001), r.connect_secs);
    let per = (r.node_rss_kib.saturating_sub(r.node_rss_idle_kib)) as f64 * 1024.0 / r.sessions.max(1) as f64;
    println!(
        "server RSS           {:.1} MiB idle, {:.1} MiB with the sessions: {:.2} KiB per session (all nodes summed)",
        r.node_rss_idle_kib as f64 / 1024.0,
        r.node_rss_kib as f64 / 1024.0,
        per / 1024.0
    );
    if !args.baseline {
        println!(
            "  of which caches    {:.1} MiB in the nodes' read caches ({:.2} KiB per session; bounded by cache.max_cost per node)",
            r.cache_bytes as f64 / 1048576.0,
            r.cache_bytes as f64 / 1024.0 / r.sessions.max(1) as f64
        );
    }
    println!(
        "generators RSS       {:.1} MiB ({:.2} KiB per client session)",
        r.generators_rss_kib as f64 / 1024.0,
        r.generators_rss_kib as f64 / r.sessions.max(1) as f64
    );
    if !args.baseline {
        println!(
            "nats-server          {:.1} MiB RSS, {} subscriptions{}",
            r.nats_rss_kib as f64 / 1024.0,
            r.nats_subscriptions,
            if args.leaves > 0 { format!(" (center and {} leaves summed)", args.leaves) } else { String::new() }
        );
        println!("store writes         {:.1}/s during the hold", r.store_writes_per_sec);
        println!(
            "nats-server CPU      {:.3} s per second during the hold; {} of {} nodes degraded at its end",
            r.nats_cpu_per_sec, r.nodes_degraded, args.nodes
        );
        println!(
            "change -> contact    {} deliveries of {} changes ({} refused by the nodes): {}",
            r.latencies.len(),
            r.changes,
            r.refused,
            percentiles(&r.latencies, &[("p50", 0.5), ("p99", 0.99)])
        );
        println!(
            "bare NATS pub->sub   {} messages at the same rate through the same servers: {}",
            r.bare_latencies.len(),
            percentiles(&r.bare_latencies, &[("p50", 0.5), ("p99", 0.99)])
        );
        let logged: usize = r.engine_warnings.iter().map(|(_, n)| n).sum();
        println!("nats-server log      {logged} warnings and errors over the run");
        for (kind, n) in r.engine_warnings.iter().take(5) {
            println!("  {n:>8} × {kind}");
        }
    }
    println!("heartbeats           {} sent during the hold, {} acked", r.heartbeats.0, r.heartbeats.1);
    println!(
        "CPU                  {:.3} s of node CPU per second per 10K sessions; generators {:.3}",
        r.cpu_secs_per_10k, r.generators_cpu_secs_per_10k
    );
    let (busy, user, system, softirq) = r.machine;
    println!(
        "machine CPU          {busy:.0} % busy during the hold (user {user:.0} %, system {system:.0} %, softirq {softirq:.0} %); {:.0} % outside the bench's processes",
        r.outside_pct
    );
    Ok(())
}

fn layout(leaves: usize) -> String {
    if leaves == 0 {
        "every node on one nats-server (JetStream)".into()
    } else {
        format!("hub and spoke: a center nats-server (JetStream domain hub) and {leaves} leaf nats-servers; node i on leaf i % {leaves}")
    }
}

/// Runs one scale measurement (also used by the smoke test through the CLI).
pub async fn measure(args: &ScaleArgs) -> Res<ScaleReport> {
    if args.per_generator == 0 || args.nodes == 0 {
        return Err("--nodes and --per-generator must be above 0".into());
    }
    let per_node = args.sessions.div_ceil(args.nodes);
    if per_node > 19_500 {
        println!("warning: {per_node} sessions per node is above what one process holds (20,000 open files): use more --nodes");
    }
    let _sysctls: Vec<Sysctl> = if args.no_sysctl {
        Vec::new()
    } else {
        [
            raise("net.ipv4.ip_local_port_range", "1024 65535", |v| {
                v.split_whitespace().next().and_then(|a| a.parse::<u32>().ok()).is_some_and(|a| a > 1024)
            }),
            raise("net.core.somaxconn", "65535", |v| v.parse::<u32>().is_ok_and(|n| n < 65535)),
            raise("net.ipv4.tcp_max_syn_backlog", "65535", |v| v.parse::<u32>().is_ok_and(|n| n < 65535)),
        ]
        .into_iter()
        .flatten()
        .collect()
    };
    let dir = std::env::temp_dir().join(format!("presenced-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(dir.clone());

    // The engine: nats-servers with their monitoring ports; the first holds JetStream.
    let nats = if args.baseline { Vec::new() } else { engine(&dir, args.leaves).await? };
    if args.engine_nice != 0 {
        for (p, _, _) in &nats {
            renice(p.0.id(), args.engine_nice)?;
        }
        println!("nats-servers reniced to {}", args.engine_nice);
    }
    // Where node i connects: the one server, or leaf i % leaves.
    let server_of = |i: usize| if args.leaves > 0 { nats[1 + i % args.leaves].1 } else { nats.first().map(|n| n.1).unwrap_or(0) };

    // The nodes. Each gets a port no other node or server has: `free_port` can hand out
    // one twice, and a node started earlier may take a chosen port as the source port of
    // its NATS connections, so a node that exits before it listens starts again elsewhere.
    let mut taken: std::collections::HashSet<u16> = nats.iter().map(|n| n.1).collect();
    let mut pick = || -> Res<u16> {
        loop {
            let port = free_port()?;
            if taken.insert(port) {
                return Ok(port);
            }
        }
    };
    let spawn_node = |i: usize, port: u16| -> Res<Proc> {
        let mut cmd = if args.baseline {
            let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
            c.args(["baseline-server", "--listen", &format!("127.0.0.1:{port}")]);
            c
        } else {
            let mut c = Command::new(sibling("presenced")?);
            let nats_port = server_of(i);
            if args.leaves > 0 {
                c.env("PRESENCE_SERVICE__NODE_TYPE", "leaf").env("PRESENCE_NATS__JETSTREAM__DOMAIN", "hub");
            }
            c.arg("serve")
                .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
                .env("PRESENCE_SERVICE__PORT", port.to_string())
                .env("PRESENCE_SERVICE__GRPC_PORT", "0")
                .env("PRESENCE_SERVICE__NODE_ID", format!("n{i}"))
                .env("PRESENCE_SERVICE__DATA_DIR", dir.join(format!("n{i}")))
                .env("PRESENCE_STORE__BACKEND", "nats")
                .env("PRESENCE_NATS__URLS", format!("[\"nats://127.0.0.1:{nats_port}\"]"))
                .env("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", format!("{}s", args.heartbeat_secs))
                .env("PRESENCE_PRESENCE__SESSION_TTL", format!("{}s", args.heartbeat_secs * 3))
                .envs(BENCH_ENV)
                .envs(args.node_env.iter().map(|(k, v)| (k, v)));
            c
        };
        let child = cmd.stdout(Stdio::null()).spawn().map_err(|e| format!("node {i}: {e}"))?;
        Ok(Proc(child))
    };
    let mut nodes: Vec<(Proc, u16)> = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let port = pick()?;
        nodes.push((spawn_node(i, port)?, port));
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut tries = 0;
        while !wait_port_unless_exited(node.1, Some(&mut node.0)).await? {
            tries += 1;
            if tries >= 3 {
                return Err(format!("node {i} exited before it listened, {tries} times"));
            }
            let port = pick()?;
            println!("node {i} could not listen on :{}; starting it again on :{port}", node.1);
            *node = (spawn_node(i, port)?, port);
        }
    }
    if !args.baseline {
        // 52 nodes opening their buckets at once keep nats-server busy for a while: the
        // sessions start once every node is connected and out of degraded mode.
        let start = Instant::now();
        for (_, port) in &nodes {
            loop {
                let h = get_json(*port, "/health/nats").await.ok();
                if h.is_some_and(|h| h["data"]["degraded"] == false) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    return Err(format!("node :{port} not connected to NATS (or degraded) after 120 s"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        println!("{} nodes connected to NATS in {:.1} s", nodes.len(), start.elapsed().as_secs_f64());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<u32> = nodes.iter().map(|(p, _)| p.0.id()).collect();
    let node_rss_idle_kib: u64 = pids.iter().filter_map(|p| rss_kib(*p)).sum();
    let targets = nodes.iter().map(|(_, p)| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");

    // The generators, all at once; each reports when its sessions are up.
    let t0 = Instant::now();
    let mut gens = Vec::new();
    let mut first = 0;
    while first < args.sessions {
        let count = args.per_generator.min(args.sessions - first);
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("scale-gen")
            .args(["--targets", &targets])
            .args(["--first", &first.to_string(), "--count", &count.to_string(), "--total", &args.sessions.to_string()])
            .args(["--contacts", &args.contacts.to_string(), "--change-pct-per-min", &args.change_pct_per_min.to_string()])
            .args(["--heartbeat-secs", &args.heartbeat_secs.to_string(), "--concurrency", &args.concurrency.to_string()])
            .args(["--retries", &args.retries.to_string()])
            .args(if args.baseline { vec!["--baseline"] } else { vec![] })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("generator: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("generator stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        gens.push(Generator { child, stdin, lines });
        first += count;
    }
    let guard = RampGuard::start(
        args.min_free_mib,
        pids.clone(),
        gens.iter().map(|g| g.child.id()).collect(),
        nats.iter().map(|n| n.0 .0.id()).collect(),
    );
    let (mut sessions, mut failed, mut retried) = (0u64, 0u64, 0u64);
    for g in &gens {
        let ready = tokio::task::block_in_place(|| g.expect("ready", ramp_left(t0, args.ramp_timeout_secs)));
        let ready = match (ready, guard.tripped()) {
            (_, Some(why)) => return Err(format!("memory guard: {why}")),
            (r, None) => r?,
        };
        let mut f = ready.split_whitespace();
        sessions += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        failed += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let _secs = f.next();
        retried += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    drop(guard);
    println!("{sessions} sessions up in {connect_secs:.1} s ({failed} failed, {retried} handshakes retried); holding {} s", args.hold_secs);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The hold: status changes, heartbeats; CPU and store writes counted over it.
    let writes_before = store_writes(&nodes).await;
    let cpu_before: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let gen_pids: Vec<u32> = gens.iter().map(|g| g.child.id()).collect();
    let gen_cpu_before: f64 = gen_pids.iter().map(|p| cpu_secs(*p)).sum();
    let nats_pids: Vec<u32> = nats.iter().map(|n| n.0 .0.id()).collect();
    let nats_cpu_before: f64 = nats_pids.iter().map(|p| cpu_secs(*p)).sum();
    let machine_before = MachineCpu::now();
    let hold_start = Instant::now();
    for g in &mut gens {
        g.send(&format!("change {}", args.hold_secs))?;
    }
    // The baseline for delivery: the engine's bare publish -> subscribe at the same rate,
    // on the same loaded nats-servers, during the hold (with leaves: published on the
    // second node's leaf, received on the first's, across the center as events are).
    let bare = (!nats.is_empty()).then(|| {
        let store = super::cluster::Store::Nats { port: server_of(0), domain: None };
        let publish_port = server_of(1);
        let rate = (args.sessions as f64 * args.change_pct_per_min / 100.0 / 60.0).max(1.0);
        let n = ((rate * args.hold_secs as f64) as usize).clamp(10, 20_000);
        tokio::spawn(async move { super::backends::bare_round_trip(&store, Some(publish_port), n, rate).await })
    });
    let mut latencies = Vec::new();
    let (mut changes, mut beats, mut acks, mut refused) = (0, 0, 0, 0);
    for g in &gens {
        let done = tokio::task::block_in_place(|| g.expect("done", Duration::from_secs(args.hold_secs + 120)))?;
        let mut f = done.splitn(6, ' ');
        changes += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let _still = f.next();
        beats += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        acks += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        refused += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        latencies.extend(f.next().unwrap_or("").split(',').filter_map(|v| v.parse::<u32>().ok()));
    }
    let hold = hold_start.elapsed().as_secs_f64();
    let bare_latencies = match bare {
        Some(t) => t.await.map_err(|e| e.to_string())??,
        None => Vec::new(),
    };
    let cpu = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu_before;
    let gen_cpu = gen_pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - gen_cpu_before;
    let nats_cpu = nats_pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - nats_cpu_before;
    let machine_now = MachineCpu::now();
    let machine = machine_now.since(&machine_before);
    let bench_pct = 100.0 * (cpu + gen_cpu + nats_cpu) / machine_now.elapsed_secs(&machine_before).max(0.01);
    let outside_pct = (machine.0 - bench_pct).max(0.0);
    let writes = store_writes(&nodes).await.saturating_sub(writes_before);
    let mut nodes_degraded = 0;
    if !args.baseline {
        for (_, p) in &nodes {
            let h = get_json(*p, "/health/nats").await.ok();
            nodes_degraded += usize::from(h.is_none_or(|h| h["data"]["degraded"] != false));
        }
    }
    let node_rss_kib: u64 = pids.iter().filter_map(|p| rss_kib(*p)).sum();
    let mut cache_bytes = 0;
    for (_, p) in &nodes {
        cache_bytes += get_json(*p, "/health/cache").await.ok().and_then(|v| v["data"]["cost"].as_u64()).unwrap_or(0);
    }
    let generators_rss_kib: u64 = gens.iter().filter_map(|g| rss_kib(g.child.id())).sum();
    latencies.sort_unstable();
    let (mut nats_rss_kib, mut nats_subscriptions) = (0, 0);
    for (p, _, mon) in &nats {
        nats_subscriptions += get_json(*mon, "/varz").await.ok().and_then(|v| v["subscriptions"].as_u64()).unwrap_or(0);
        nats_rss_kib += rss_kib(p.0.id()).unwrap_or(0);
    }
    for g in &mut gens {
        let _ = g.send("stop");
    }
    drop(gens);
    drop(nodes);
    drop(nats);
    let engine_warnings = engine_warnings(&dir);
    Ok(ScaleReport {
        sessions,
        failed,
        retried,
        connect_secs,
        node_rss_idle_kib,
        node_rss_kib,
        generators_rss_kib,
        cache_bytes,
        nats_rss_kib,
        nats_subscriptions,
        latencies,
        bare_latencies,
        changes,
        heartbeats: (beats, acks),
        refused,
        nats_cpu_per_sec: nats_cpu / hold.max(0.001),
        nodes_degraded,
        store_writes_per_sec: writes as f64 / hold.max(0.001),
        cpu_secs_per_10k: cpu / hold.max(0.001) / (sessions.max(1) as f64 / 10_000.0),
        generators_cpu_secs_per_10k: gen_cpu / hold.max(0.001) / (sessions.max(1) as f64 / 10_000.0),
        machine,
        outside_pct,
        engine_warnings,
    })
}

/// Sets a process's nice value with `renice` (util-linux), or says why it could not.
fn renice(pid: u32, nice: i32) -> Res<()> {
    let out = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
        .output()
        .map_err(|e| format!("--engine-nice: cannot run renice: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("--engine-nice {nice}: renice failed (below 0 needs root): {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Watches the machine while the sessions ramp up: prints where the memory is every 15 s
/// and, when MemAvailable falls below the floor, kills the generators (their sessions end
/// with them) and keeps that breakdown: what ran out first, measured rather than guessed.
struct RampGuard {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tripped: Arc<parking_lot::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn meminfo_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// (TCP sockets in use, pages of TCP buffer memory) from /proc/net/sockstat.
fn tcp_sockstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("TCP:")) else { return (0, 0) };
    let f: Vec<&str> = line.split_whitespace().collect();
    let field = |k: &str| f.iter().position(|x| *x == k).and_then(|i| f.get(i + 1)?.parse().ok()).unwrap_or(0);
    (field("inuse"), field("mem"))
}

impl RampGuard {
    fn start(min_free_mib: u64, nodes: Vec<u32>, gens: Vec<u32>, nats: Vec<u32>) -> RampGuard {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tripped = Arc::new(parking_lot::Mutex::new(None));
        let (st, tr) = (stop.clone(), tripped.clone());
        let (tcp0, slab0) = (tcp_sockstat().0, meminfo_kib("Slab:"));
        let thread = std::thread::spawn(move || {
            let gib = |kib: u64| kib as f64 / (1024.0 * 1024.0);
            let sum = |pids: &[u32]| pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>();
            let start = Instant::now();
            let mut last = start;
            let mut cpu_then = MachineCpu::now();
            while !st.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let avail = meminfo_kib("MemAvailable:");
                let low = avail < min_free_mib * 1024;
                if !low && last.elapsed() < Duration::from_secs(15) {
                    continue;
                }
                last = Instant::now();
                let cpu_now = MachineCpu::now();
                let (busy, _, system, softirq) = cpu_now.since(&cpu_then);
                cpu_then = cpu_now;
                let (tcp, tcp_pages) = tcp_sockstat();
                let line = format!(
                    "{:.0} s, ~{} sessions: nodes {:.2} GiB, generators {:.2} GiB, nats-server {:.2} GiB, kernel slab +{:.2} GiB, TCP buffers {:.2} GiB; {:.2} GiB available; CPU {:.0} % busy (system {:.0} %, softirq {:.0} %)",
                    start.elapsed().as_secs_f64(),
                    tcp.saturating_sub(tcp0) / 2,
                    gib(sum(&nodes)),
                    gib(sum(&gens)),
                    gib(sum(&nats)),
                    gib(meminfo_kib("Slab:").saturating_sub(slab0)),
                    gib(tcp_pages * 4),
                    gib(avail),
                    busy,
                    system,
                    softirq,
                );
                println!("ramp: {line}");
                if low {
                    *tr.lock() = Some(format!("MemAvailable under {min_free_mib} MiB at {line}"));
                    for p in &gens {
                        let _ = Command::new("kill").args(["-s", "KILL", &p.to_string()]).status();
                    }
                    return;
                }
            }
        });
        RampGuard { stop, tripped, thread: Some(thread) }
    }

    fn tripped(&self) -> Option<String> {
        self.tripped.lock().clone()
    }
}

impl Drop for RampGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Store writes of every node so far (0 for the baseline's nodes).
async fn store_writes(nodes: &[(Proc, u16)]) -> u64 {
    let mut n = 0;
    for (_, p) in nodes {
        n += get_json(*p, "/health/nats").await.ok().and_then(|v| v["data"]["store_writes"].as_u64()).unwrap_or(0);
    }
    n
}
