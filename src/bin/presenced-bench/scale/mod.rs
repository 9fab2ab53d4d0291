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

mod generator;
mod host;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use super::cluster::{engine, engine_warnings, get_json, wait_port_unless_exited, Cleanup, Proc};
use super::{free_port, percentiles, rss_kib, sibling, Res, BENCH_ENV};

use super::cpu::{cpu_secs, MachineCpu};
pub use generator::{generator, GenArgs};
use generator::{parse_env, Generator};
use host::{in_own_netns, raise, ramp_left, renice, RampGuard, Sysctl, IN_NETNS};

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
    let cpu_before: f64 = pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum();
    let gen_pids: Vec<u32> = gens.iter().map(|g| g.child.id()).collect();
    let gen_cpu_before: f64 = gen_pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum();
    let nats_pids: Vec<u32> = nats.iter().map(|n| n.0 .0.id()).collect();
    let nats_cpu_before: f64 = nats_pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum();
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
    let cpu = pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum::<f64>() - cpu_before;
    let gen_cpu = gen_pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum::<f64>() - gen_cpu_before;
    let nats_cpu = nats_pids.iter().map(|p| cpu_secs(*p).unwrap_or(0.0)).sum::<f64>() - nats_cpu_before;
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

/// Store writes of every node so far (0 for the baseline's nodes).
async fn store_writes(nodes: &[(Proc, u16)]) -> u64 {
    let mut n = 0;
    for (_, p) in nodes {
        n += get_json(*p, "/health/nats").await.ok().and_then(|v| v["data"]["store_writes"].as_u64()).unwrap_or(0);
    }
    n
}
