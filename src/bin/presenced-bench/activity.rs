//! `presenced-bench activity`: what device activity (issue 26) costs in cluster mode. One
//! presenced node on a real nats-server (JetStream) holds `--sessions` gateway sessions
//! (bound to an instance lease, as seed 001's gateways do; one device per user), then runs
//! of `--seconds` each, taken in turn `--rounds` times:
//!
//! - **off**: the sessions just live (the baseline: what the node costs with no activity);
//! - **on**: each device toggles idle ↔ active every `--period-secs` on average (a
//!   realistic day: 5–15 minutes), that is `SetActivity` at sessions / period per second,
//!   spread evenly over the run; with `--away-secs` the automatic away of users who stay
//!   idle follows, as it would in production;
//! - **status**: the same users changing their explicit status (`SetPresence`, away ↔
//!   online) at the same rate: what any presence transition costs on this path, the
//!   yardstick for the activity's cost.
//!
//! Per run: store writes/s of users' records (`store_writes_total{kind="user"}`), and the
//! CPU of presenced and of nats-server. One store write per transition is the target; a
//! heartbeat writes nothing in either run.

use std::time::{Duration, Instant};

use clap::Parser;
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;

use super::cluster::{nats_server, wait_port, Cleanup};
use super::cpu::cpu_secs;
use super::scrape::metric;
use super::{authed, free_port, spawn_server_env, Res};

#[derive(Parser, Clone)]
pub struct ActivityArgs {
    /// Device sessions (one user each).
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Mean seconds between two activity changes of one device.
    #[arg(long, default_value_t = 600)]
    period_secs: u64,
    /// `presence.auto_away_after`, seconds.
    #[arg(long, default_value_t = 600)]
    away_secs: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Off/on pairs.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// What a run sends.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Nothing,
    Activity,
    Status,
}

struct Run {
    writes: f64,
    cpu: f64,
    nats_cpu: f64,
    calls: u64,
    secs: f64,
}

pub async fn run(args: ActivityArgs) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("presenced-bench-activity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(dir.clone());
    let (nats, nats_port) = nats_server(&dir, "engine", "jetstream { store_dir: \"@STORE@\" }\n")?;
    wait_port(nats_port).await?;
    let nats_pid = nats.0.id();
    let grpc = free_port()?;
    let urls = format!("[\"nats://127.0.0.1:{nats_port}\"]");
    let away = format!("{}s", args.away_secs);
    let env = [
        ("PRESENCE_STORE__BACKEND", "nats"),
        ("PRESENCE_NATS__URLS", urls.as_str()),
        ("PRESENCE_LIMITS__MAX_SESSIONS_PER_CALL", "10000"),
        ("PRESENCE_PRESENCE__AUTO_AWAY_AFTER", away.as_str()),
    ];
    let server = spawn_server_env(false, Some(grpc), &env).await?;
    let pid = server.pid.ok_or("no server pid")?;
    let http = server.addr.clone();
    let (channel, bearer) = super::grpc_admin(grpc).await?;
    let client = PresenceApiClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);

    // The gateway's lease, kept alive, then its sessions.
    let refresher = {
        let (mut c, b) = (client.clone(), bearer.clone());
        let req = move || authed(pb::RefreshInstanceRequest { instance_id: "gw-0".into(), ttl_seconds: 30 }, &b);
        c.refresh_instance(req()).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if let Err(e) = c.refresh_instance(req()).await {
                    eprintln!("RefreshInstance: {e}");
                }
            }
        })
    };
    let t0 = Instant::now();
    for chunk in (0..args.sessions).collect::<Vec<_>>().chunks(5000) {
        let sessions =
            chunk.iter().map(|u| pb::SessionEntry { user_id: format!("u{u}"), device_id: "d".into(), platform: String::new() }).collect();
        let req = authed(pb::RegisterSessionsRequest { instance_id: "gw-0".into(), ttl_seconds: 0, sessions }, &bearer);
        let r = client.clone().register_sessions(req).await.map_err(|e| e.to_string())?.into_inner();
        if r.failed > 0 {
            return Err(format!("{} registrations failed", r.failed));
        }
    }
    println!("{} sessions registered on NATS in {:.1}s; settling", args.sessions, t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;

    let rate = args.sessions as f64 / args.period_secs.max(1) as f64;
    println!("runs of {}s: off, then on ({rate:.0} SetActivity/s: every device every {}s on average)", args.seconds, args.period_secs);
    let mut next_device = 0usize;
    let mut idle = vec![false; args.sessions];
    let mut pairs = Vec::new();
    let mut status_runs = Vec::new();
    for round in 0..args.rounds {
        let off = measure(&client, &bearer, &http, pid, nats_pid, args.seconds, 0.0, Kind::Nothing, Vec::new()).await?;
        let n = (rate * args.seconds as f64) as usize;
        let changes: Vec<(usize, bool)> = (0..n)
            .map(|_| {
                // Devices in a spread order (a prime stride); each flips its state.
                next_device = (next_device + 7919) % args.sessions;
                idle[next_device] = !idle[next_device];
                (next_device, !idle[next_device])
            })
            .collect();
        let on = measure(&client, &bearer, &http, pid, nats_pid, args.seconds, rate, Kind::Activity, changes.clone()).await?;
        let status = measure(&client, &bearer, &http, pid, nats_pid, args.seconds, rate, Kind::Status, changes).await?;
        println!(
            "round {}: status changes at the same rate: {:.1} writes/s, {:.2} CPU-s/s (nats {:.2}); +{:.1} µs presenced CPU per change",
            round + 1,
            status.writes / status.secs,
            status.cpu / status.secs,
            status.nats_cpu / status.secs,
            (status.cpu / status.secs - off.cpu / off.secs) * 1e6 / (status.calls as f64 / status.secs),
        );
        println!(
            "round {}: off {:.1} writes/s, {:.2} CPU-s/s (nats {:.2}) | on {:.0} calls/s, {:.1} writes/s ({:.2} per change), {:.2} CPU-s/s (nats {:.2}); +{:.1} µs presenced CPU per change",
            round + 1,
            off.writes / off.secs,
            off.cpu / off.secs,
            off.nats_cpu / off.secs,
            on.calls as f64 / on.secs,
            on.writes / on.secs,
            on.writes / on.calls.max(1) as f64,
            on.cpu / on.secs,
            on.nats_cpu / on.secs,
            (on.cpu / on.secs - off.cpu / off.secs) * 1e6 / (on.calls as f64 / on.secs),
        );
        status_runs.push(status);
        pairs.push((off, on));
    }
    let mean = |f: &dyn Fn(&(Run, Run)) -> f64| pairs.iter().map(f).sum::<f64>() / pairs.len().max(1) as f64;
    println!(
        "mean: writes/s off {:.1} on {:.1}; presenced CPU off {:.3} on {:.3} (ratio {:.2}); nats CPU off {:.3} on {:.3}",
        mean(&|(a, _)| a.writes / a.secs),
        mean(&|(_, b)| b.writes / b.secs),
        mean(&|(a, _)| a.cpu / a.secs),
        mean(&|(_, b)| b.cpu / b.secs),
        mean(&|(a, b)| (b.cpu / b.secs) / (a.cpu / a.secs).max(1e-9)),
        mean(&|(a, _)| a.nats_cpu / a.secs),
        mean(&|(_, b)| b.nats_cpu / b.secs),
    );
    let status_cpu = status_runs.iter().map(|r| r.cpu / r.secs).sum::<f64>() / status_runs.len().max(1) as f64;
    println!(
        "activity against status changes at the same rate: presenced CPU {:.3} against {status_cpu:.3} (ratio {:.2})",
        mean(&|(_, b)| b.cpu / b.secs),
        mean(&|(_, b)| b.cpu / b.secs) / status_cpu.max(1e-9),
    );
    refresher.abort();
    drop(server);
    drop(nats);
    Ok(())
}

/// One run of `seconds`: the `changes` (device, active) sent as `SetActivity` at `rate`
/// per second, evenly paced, at most 64 in flight.
#[allow(clippy::too_many_arguments)]
async fn measure(
    client: &PresenceApiClient<tonic::transport::Channel>,
    bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    http: &str,
    pid: u32,
    nats_pid: u32,
    seconds: u64,
    rate: f64,
    kind: Kind,
    changes: Vec<(usize, bool)>,
) -> Res<Run> {
    const USER_WRITES: &str = "store_writes_total{backend=\"nats\",kind=\"user\"}";
    let w0 = metric(http, USER_WRITES).await?;
    let (c0, n0) = (cpu_secs(pid).unwrap_or(0.0), cpu_secs(nats_pid).unwrap_or(0.0));
    let start = Instant::now();
    let calls = changes.len() as u64;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (device, active)) in changes.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = sem.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let mut c = client.clone();
        let user_id = format!("u{device}");
        let activity = authed(pb::SetActivityRequest { user_id: user_id.clone(), device_id: "d".into(), active, idle_since: None }, bearer);
        let status = if active { pb::Status::Online } else { pb::Status::Away };
        let explicit = authed(
            pb::SetPresenceRequest { user_id, status: status as i32, message: String::new(), ttl_seconds: 0, until_changed: true },
            bearer,
        );
        tasks.spawn(async move {
            let r = match kind {
                Kind::Status => c.set_presence(explicit).await.map(|_| ()),
                _ => c.set_activity(activity).await.map(|_| ()),
            };
            drop(permit);
            r.map_err(|e| e.to_string())
        });
    }
    let end = start + Duration::from_secs(seconds);
    tokio::time::sleep_until(end.into()).await;
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    // Writes of the run's last calls land before they answer.
    let w1 = metric(http, USER_WRITES).await?;
    Ok(Run { writes: w1 - w0, cpu: cpu_secs(pid).unwrap_or(0.0) - c0, nats_cpu: cpu_secs(nats_pid).unwrap_or(0.0) - n0, calls, secs })
}
