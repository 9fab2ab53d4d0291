//! `presenced-bench peer`: members joining one room, presenced against a Pusher-protocol
//! server with presence channels (sockudo, `--sockudo PATH`), in the same run.
//!
//! `--members` clients join one after another (`--concurrency` at a time) and keep
//! reading everything they are sent:
//! - **sockudo**: each connects to `/app/KEY` and subscribes to `presence-room` with a
//!   signed `channel_data` (Pusher's presence auth); joined at
//!   `pusher_internal:subscription_succeeded`. Every join is announced to every member
//!   (`member_added`).
//! - **presenced**: the members are set by the backend first (as a chat product does);
//!   each connects to `/ws` and subscribes to the conversation; joined at its
//!   `conversation_presence` snapshot. Defaults throughout (1,000 members or more: one
//!   `conversation_presence` per second with the changes).
//!
//! Then: server CPU and time for all to join, RSS per member connection, one more member
//! joining (its arrival at every member: p50/p99), and that member's abrupt disconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::cluster::{wait_port, Cleanup, Proc};
use super::cpu::cpu_secs;
use super::{free_port, rss_kib, Res};

#[derive(Parser, Clone)]
pub struct PeerArgs {
    /// Members joining the room.
    #[arg(long, default_value_t = 5000)]
    members: usize,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// The sockudo binary (crates.io `sockudo`); without it only presenced runs.
    #[arg(long, default_value = "/work/.sockudo/bin/sockudo")]
    sockudo: String,
    /// Which servers: both, sockudo or presenced.
    #[arg(long, default_value = "both")]
    only: String,
    /// sockudo's per-connection message buffer (`websocket.max_messages`). It is
    /// allocated whole for every connection (about 100 bytes a message: 10,000,000 took
    /// 1 GiB per connection here), so it counts in its RSS per member.
    #[arg(long, default_value_t = 3000)]
    sockudo_buffer: usize,
}

const KEY: &str = "bench-key";
const SECRET: &str = "bench-secret";
const CHANNEL: &str = "presence-room";
const CONV: &str = "room";
const PROBE: &str = "probe-member";

/// What the members saw.
#[derive(Default)]
struct Seen {
    joined: AtomicU64,
    /// Members whose connection or join failed.
    failed: AtomicU64,
    frames: AtomicU64,
    /// µs after the probe's join (or leave) at which each member heard of it.
    probe: parking_lot::Mutex<Vec<u32>>,
    probe_at: parking_lot::Mutex<Option<Instant>>,
    /// Which probe event is being timed (each member reports it once).
    phase: AtomicU64,
}

/// The two servers' shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sockudo,
    Presenced,
}

struct Outcome {
    joined: u64,
    join_secs: f64,
    join_cpu: f64,
    rss_per_member_kib: f64,
    frames: u64,
    arrival: Vec<u32>,
    heard_arrivals: usize,
    departure: Vec<u32>,
    heard_departures: usize,
}

pub async fn run(args: PeerArgs) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("presenced-bench-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(dir.clone());
    let mut results = Vec::new();
    if args.only != "presenced" {
        if std::path::Path::new(&args.sockudo).exists() {
            results.push(("sockudo", one(Kind::Sockudo, &args, &dir).await?));
        } else {
            println!("sockudo: {} not found (cargo install sockudo --version 5.2.0); skipped", args.sockudo);
        }
    }
    if args.only != "sockudo" {
        results.push(("presenced", one(Kind::Presenced, &args, &dir).await?));
    }
    for (name, o) in &results {
        println!(
            "{name:>9}: {} of {} members joined in {:.1}s with {:.1}s of server CPU; {:.0} KiB RSS per member connection; {} frames to members; one more join reached {}/{} members p50 {} p99 {}; its abrupt disconnect reached {} p50 {} p99 {}",
            o.joined,
            args.members,
            o.join_secs,
            o.join_cpu,
            o.rss_per_member_kib,
            o.frames,
            o.heard_arrivals,
            args.members,
            super::ms(super::pct(&o.arrival, 0.5)),
            super::ms(super::pct(&o.arrival, 0.99)),
            o.heard_departures,
            super::ms(super::pct(&o.departure, 0.5)),
            super::ms(super::pct(&o.departure, 0.99)),
        );
    }
    if let [(_, s), (_, p)] = &results[..] {
        println!(
            "presenced against sockudo: join time {:.3}x, join CPU {:.3}x, RSS per member {:.2}x, frames {:.4}x",
            p.join_secs / s.join_secs.max(1e-9),
            p.join_cpu / s.join_cpu.max(1e-9),
            p.rss_per_member_kib / s.rss_per_member_kib.max(1e-9),
            p.frames as f64 / s.frames.max(1) as f64
        );
    }
    Ok(())
}

fn sockudo_config(dir: &std::path::Path, port: u16, buffer: usize) -> Res<std::path::PathBuf> {
    let config = serde_json::json!({
        "debug": false, "host": "127.0.0.1", "port": port, "mode": "production",
        "activity_timeout": 120, "max_connections": 0,
        "adapter": { "driver": "local" }, "cache": { "driver": "memory" }, "queue": { "driver": "none" },
        "app_manager": { "driver": "memory", "array": { "apps": [ {
            "id": "bench-app", "key": KEY, "secret": SECRET, "enabled": true,
            "policy": {
                "limits": { "max_connections": 0, "max_client_events_per_second": 0,
                            "max_presence_members_per_channel": 1_000_000, "max_presence_member_size_in_kb": 10 },
                "features": { "enable_client_messages": false } } } ] } },
        // Its default buffers 1,000 messages per connection and drops (or disconnects) a
        // member beyond: a 5,000-member join storm is 5,000 announcements to each. Raised
        // (`--sockudo-buffer`), and a member past it is not disconnected.
        "websocket": { "max_messages": buffer, "disconnect_on_buffer_full": false },
        "rate_limiter": { "enabled": false, "driver": "memory" },
        "metrics": { "enabled": false },
        "http_api": { "usage_enabled": false },
        "logging": { "colors_enabled": false, "include_target": false }
    });
    let path = dir.join("sockudo.json");
    std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
    Ok(path)
}

async fn one(kind: Kind, args: &PeerArgs, dir: &std::path::Path) -> Res<Outcome> {
    let port = free_port()?;
    let members: Vec<String> = (0..args.members).map(|i| format!("member-{i}")).collect();
    let server = match kind {
        Kind::Sockudo => {
            let config = sockudo_config(dir, port, args.sockudo_buffer)?;
            let child = std::process::Command::new(&args.sockudo)
                .arg("--config")
                .arg(&config)
                .current_dir(dir)
                .env("PORT", port.to_string())
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("sockudo: {e}"))?;
            Proc(child)
        }
        Kind::Presenced => {
            let child = std::process::Command::new(super::sibling("presenced")?)
                .arg("serve")
                .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
                .env("PRESENCE_SERVICE__PORT", port.to_string())
                .env("PRESENCE_SERVICE__GRPC_PORT", "0")
                .env("PRESENCE_SERVICE__DATA_DIR", dir.join("presenced"))
                .env("PRESENCE_LIMITS__MAX_BODY_BYTES", "16MiB")
                .env("PRESENCE_LIMITS__MAX_CONVERSATION_MEMBERS", (args.members + 1).to_string())
                .envs(super::BENCH_ENV)
                .stdout(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("presenced: {e}"))?;
            Proc(child)
        }
    };
    wait_port(port).await?;
    let pid = server.0.id();
    if kind == Kind::Presenced {
        let all: Vec<&str> = members.iter().map(String::as_str).chain(std::iter::once(PROBE)).collect();
        let auth = presenced::auth::Authenticator::new(super::BENCH_SECRET, "presence-service", Duration::from_secs(30), None);
        let token = auth.mint("backend", Duration::from_secs(3600), Some(presenced::auth::ADMIN_SCOPE))?;
        let r = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{port}/api/v2/conversations/{CONV}/members"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&serde_json::json!({ "members": all })).map_err(|e| e.to_string())?)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("members: {}", r.status()));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(pid).unwrap_or(0);
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let seen = Arc::new(Seen::default());
    let start = Instant::now();
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for m in &members {
        let permit = sem.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let (seen, m) = (seen.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = member(kind, port, m, seen.clone(), Some(permit)).await {
                if seen.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("a member failed: {e}");
                }
            }
        }));
    }
    // Until all joined (or failed), or nothing moved for 60 s.
    let (mut progress, mut moved) = (0, Instant::now());
    loop {
        let done = seen.joined.load(Ordering::Relaxed) + seen.failed.load(Ordering::Relaxed);
        if done as usize >= members.len() {
            break;
        }
        if done != progress {
            (progress, moved) = (done, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "stalled: {} joined, {} failed of {}",
                seen.joined.load(Ordering::Relaxed),
                seen.failed.load(Ordering::Relaxed),
                members.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let joined = seen.joined.load(Ordering::Relaxed);
    // Stalled: until the last progress.
    let join_secs = if joined as usize >= members.len() { start.elapsed() } else { moved.duration_since(start) }.as_secs_f64();
    // The announcements of the last joins still on their way count too: wait for quiet.
    let mut last = seen.frames.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = seen.frames.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let join_cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let rss_per_member_kib = rss_kib(pid).unwrap_or(0).saturating_sub(rss0) as f64 / members.len() as f64;
    let frames = seen.frames.load(Ordering::Relaxed);

    // One more member joins; then its connection is cut (no close frame).
    seen.probe.lock().clear();
    *seen.probe_at.lock() = Some(Instant::now());
    seen.phase.store(1, Ordering::Release);
    let (probe_seen, probe_task) = {
        let s = Arc::new(Seen::default());
        let t = tokio::spawn(member(kind, port, PROBE.to_string(), s.clone(), None));
        (s, t)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let arrival = std::mem::take(&mut *seen.probe.lock());
    let heard_arrivals = arrival.len();
    let _ = probe_seen;
    *seen.probe_at.lock() = Some(Instant::now());
    seen.phase.store(2, Ordering::Release);
    probe_task.abort(); // the socket is dropped with no close frame: an abrupt disconnect
                        // presenced holds a device that went away for its offline grace (10 s) first.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let departure = std::mem::take(&mut *seen.probe.lock());
    let heard_departures = departure.len();
    let mut arrival = arrival;
    arrival.sort_unstable();
    let mut departure = departure;
    departure.sort_unstable();
    for t in tasks {
        t.abort();
    }
    drop(server);
    Ok(Outcome { joined, join_secs, join_cpu, rss_per_member_kib, frames, arrival, heard_arrivals, departure, heard_departures })
}

/// One member: joins, then reads everything; reports hearing of the probe member.
async fn member(kind: Kind, port: u16, me: String, seen: Arc<Seen>, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Res<()> {
    let url = match kind {
        Kind::Sockudo => format!("ws://127.0.0.1:{port}/app/{KEY}?protocol=7&client=bench&version=1.0"),
        Kind::Presenced => format!("ws://127.0.0.1:{port}/ws"),
    };
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    if kind == Kind::Presenced {
        req.headers_mut().insert("x-user-id", me.parse().map_err(|_| "bad id")?);
        req.headers_mut().insert("x-device-id", "d".parse().map_err(|_| "bad id")?);
    }
    let config = super::ws_config().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), false).await.map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = ws.split();
    if kind == Kind::Presenced {
        let sub = serde_json::json!({"type": "subscribe", "payload": {"conversation_ids": [CONV]}, "id": 1});
        tx.send(Message::text(sub.to_string())).await.map_err(|e| e.to_string())?;
    }
    let mut permit = permit;
    let mut joined = false;
    let mut reported = 0u64;
    let mut beat = tokio::time::interval(Duration::from_secs(20));
    loop {
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = beat.tick() => {
                let b = match kind { Kind::Sockudo => r#"{"event":"pusher:ping","data":{}}"#, Kind::Presenced => super::HEARTBEAT };
                if tx.send(Message::text(b)).await.is_err() { return Ok(()) }
                continue;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            _ => return Ok(()),
        };
        if joined {
            seen.frames.fetch_add(1, Ordering::Relaxed);
        }
        if kind == Kind::Sockudo && !joined && text.contains("pusher:connection_established") {
            // {"event":..., "data":"{\"activity_timeout\":120,\"socket_id\":\"1.2\"}"}
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap_or("{}")).map_err(|e| e.to_string())?;
            let socket = data["socket_id"].as_str().ok_or("no socket_id")?;
            let channel_data = serde_json::json!({"user_id": me, "user_info": {}}).to_string();
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).map_err(|e| e.to_string())?;
            mac.update(format!("{socket}:{CHANNEL}:{channel_data}").as_bytes());
            let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
            let sub = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": CHANNEL, "auth": format!("{KEY}:{sig}"), "channel_data": channel_data}});
            tx.send(Message::text(sub.to_string())).await.map_err(|e| e.to_string())?;
            continue;
        }
        let join_done = match kind {
            Kind::Sockudo => text.contains("subscription_succeeded"),
            Kind::Presenced => text.contains("\"conversation_presence\"") && text.contains("\"snapshot\":true"),
        };
        if !joined && join_done {
            joined = true;
            seen.joined.fetch_add(1, Ordering::Relaxed);
            permit.take();
            continue;
        }
        let phase = seen.phase.load(Ordering::Acquire);
        if me != PROBE && phase > reported && text.contains(PROBE) {
            reported = phase;
            if let Some(at) = *seen.probe_at.lock() {
                seen.probe.lock().push(at.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
        }
    }
}
