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

mod check;
mod clients;
mod nodes;

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
use check::*;
use clients::*;
use nodes::*;

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
    /// The first duplicates (a watcher shown the same online-ness twice in a row):
    /// node, user, when, and when the one before came.
    pub duplicate_details: Vec<String>,
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
    for d in &r.duplicate_details {
        println!("  duplicate: {d}");
    }
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
