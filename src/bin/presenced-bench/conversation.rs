//! `presenced-bench conversation`: conversation presence at scale (issue 27). One
//! conversation of `--members` members, `--online-pct` of them online (gateway sessions
//! over gRPC, bound to an instance lease), `--viewers` WebSocket viewers (members too),
//! and `--change-pct-per-min` of the members changing per minute (a session registered or
//! ended), on one node (embedded store) or on `--nodes` nodes on one nats-server (the
//! viewers spread over them, the sessions on the first).
//!
//! Two modes, taken in turn, with the same changes to the same members:
//! - **conversation**: each viewer subscribes to the conversation (`subscribe
//!   {conversation_ids}`): counts and the changed members every
//!   `presence.conversation_interval`;
//! - **baseline**: each viewer subscribes to the members by user id, as a client must
//!   without conversation presence, as far as the cap allows
//!   (`limits.max_subscriptions_per_connection`, 1,000): the changes are drawn from those
//!   members, so both modes deliver the same changes.
//!
//! Per run: presenced CPU (all nodes) and nats-server CPU per change, bytes/s per viewer,
//! and freshness: change → each viewer's message carrying it (p50, p99, and p99 of the
//! slowest viewer per change). Once: the RSS the conversation's room adds per member.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::cluster::{nats_server, wait_port, Cleanup, Proc};
use super::cpu::cpu_secs;
use super::{authed, free_port, rss_kib, Res};

#[derive(Parser, Clone)]
pub struct ConversationArgs {
    /// Members of the conversation.
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Members online, percent.
    #[arg(long, default_value_t = 10.0)]
    online_pct: f64,
    /// Members changing (coming online or going offline) per minute, percent.
    #[arg(long, default_value_t = 1.0)]
    change_pct_per_min: f64,
    /// WebSocket viewers subscribed (members too).
    #[arg(long, default_value_t = 1000)]
    viewers: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// 1: one node on the embedded store; more: nodes on one nats-server.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Conversation/baseline pairs.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

const CONV: &str = "big";
/// Members a viewer may subscribe to by user id (the default cap).
const CAP: usize = 1000;

struct Node {
    proc: Proc,
    http: u16,
}

/// What the viewers saw.
#[derive(Default)]
struct Seen {
    measuring: AtomicBool,
    bytes: AtomicU64,
    /// Every byte received, measuring or not (to see when a snapshot is done).
    all_bytes: AtomicU64,
    snapshots: AtomicU64,
    /// (change id, latency µs) per delivery of a change to a viewer.
    samples: parking_lot::Mutex<Vec<(u64, u32)>>,
}

/// The last change of each member: (change id, when it was sent).
type Changes = Arc<parking_lot::Mutex<HashMap<String, (u64, Instant)>>>;

struct Run {
    changes: usize,
    secs: f64,
    cpu: f64,
    nats_cpu: f64,
    bytes: u64,
    lat: Vec<u32>,
    worst: Vec<u32>,
}

fn node(dir: &std::path::Path, k: usize, nats: Option<u16>, members: usize) -> Res<(Node, u16)> {
    let http = free_port()?;
    let grpc = free_port()?;
    let mut cmd = std::process::Command::new(super::sibling("presenced")?);
    cmd.arg("serve")
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", http.to_string())
        .env("PRESENCE_SERVICE__GRPC_PORT", grpc.to_string())
        .env("PRESENCE_SERVICE__NODE_ID", format!("n{k}"))
        .env("PRESENCE_SERVICE__DATA_DIR", dir.join(format!("n{k}")))
        .env("PRESENCE_LIMITS__MAX_CONVERSATION_MEMBERS", members.to_string())
        .env("PRESENCE_LIMITS__MAX_BODY_BYTES", "16MiB")
        .env("PRESENCE_LIMITS__MAX_SESSIONS_PER_CALL", "10000")
        .env("PRESENCE_PRESENCE__OFFLINE_GRACE", "0s")
        .envs(super::BENCH_ENV);
    if let Some(port) = nats {
        cmd.env("PRESENCE_STORE__BACKEND", "nats").env("PRESENCE_NATS__URLS", format!("[\"nats://127.0.0.1:{port}\"]"));
    }
    let child = cmd.stdout(std::process::Stdio::null()).spawn().map_err(|e| format!("presenced: {e}"))?;
    Ok((Node { proc: Proc(child), http }, grpc))
}

pub async fn run(args: ConversationArgs) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("presenced-bench-conversation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(dir.clone());
    let nats = if args.nodes > 1 {
        let (p, port) = nats_server(&dir, "engine", "max_payload: 8MB\njetstream { store_dir: \"@STORE@\" }\n")?;
        wait_port(port).await?;
        Some((p, port))
    } else {
        None
    };
    let mut nodes = Vec::new();
    let mut grpc0 = 0;
    for k in 0..args.nodes.max(1) {
        let (n, g) = node(&dir, k, nats.as_ref().map(|n| n.1), args.members)?;
        wait_port(n.http).await?;
        if k == 0 {
            grpc0 = g;
        }
        nodes.push(n);
    }
    let pids: Vec<u32> = nodes.iter().map(|n| n.proc.0.id()).collect();
    let nats_pid = nats.as_ref().map(|n| n.0 .0.id());
    let (channel, bearer) = super::grpc_admin(grpc0).await?;
    let client = PresenceApiClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    let token = bearer.to_str().map_err(|e| e.to_string())?.to_string();

    // The conversation: viewers first (v0…), then the other members (m…).
    let viewers: Vec<String> = (0..args.viewers).map(|i| format!("v{i}")).collect();
    let others: Vec<String> = (0..args.members.saturating_sub(args.viewers)).map(|i| format!("m{i}")).collect();
    let all: Vec<&str> = viewers.iter().chain(others.iter()).map(String::as_str).collect();
    let t0 = Instant::now();
    let body = serde_json::to_vec(&serde_json::json!({ "members": all })).map_err(|e| e.to_string())?;
    let r = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{}/api/v2/conversations/{CONV}/members", nodes[0].http))
        .header("authorization", &token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("setting the members: {} {}", r.status(), r.text().await.unwrap_or_default()));
    }
    println!("{} members set in {:.1}s", all.len(), t0.elapsed().as_secs_f64());

    // The members online besides the viewers: gateway sessions on node 0, on a lease.
    let online_target = ((args.members as f64 * args.online_pct / 100.0) as usize).saturating_sub(args.viewers);
    let refresher = {
        let (mut c, b) = (client.clone(), bearer.clone());
        let req = move || authed(pb::RefreshInstanceRequest { instance_id: "gw".into(), ttl_seconds: 30 }, &b);
        c.refresh_instance(req()).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let _ = c.refresh_instance(req()).await;
            }
        })
    };
    // The members that change: those a viewer can subscribe to by id (the first CAP
    // others), online or not; the rest of the online ones are steady.
    let pool: Vec<String> = others.iter().take(CAP).cloned().collect();
    let mut online = vec![false; pool.len()];
    let steady: Vec<&String> = others.iter().skip(CAP).take(online_target.saturating_sub(pool.len() / 10)).collect();
    let mut first: Vec<String> = steady.iter().map(|s| s.to_string()).collect();
    for (i, o) in online.iter_mut().enumerate().take(pool.len()) {
        if i % 10 == 0 {
            *o = true;
            first.push(pool[i].clone());
        }
    }
    for chunk in first.chunks(5000) {
        let sessions =
            chunk.iter().map(|u| pb::SessionEntry { user_id: u.clone(), device_id: "d".into(), platform: String::new() }).collect();
        let req = authed(pb::RegisterSessionsRequest { instance_id: "gw".into(), ttl_seconds: 0, sessions }, &bearer);
        client.clone().register_sessions(req).await.map_err(|e| e.to_string())?;
    }
    println!("{} members online by gateway sessions", first.len());

    // The viewers, spread over the nodes.
    let seen = Arc::new(Seen::default());
    let changes: Changes = Arc::default();
    let mut outs = Vec::new();
    for (i, v) in viewers.iter().enumerate() {
        let addr: SocketAddr = format!("127.0.0.1:{}", nodes[i % nodes.len()].http).parse().map_err(|_| "addr")?;
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        let ws = open(addr, v).await?;
        tokio::spawn(viewer(ws, v.clone(), rx, seen.clone(), changes.clone()));
        outs.push(tx);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = |pids: &[u32]| pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>();
    let rate = args.members as f64 * args.change_pct_per_min / 100.0 / 60.0;
    println!(
        "{} viewers on {} node(s); {:.1} changes/s ({}% of {} members a minute), among {} members",
        viewers.len(),
        nodes.len(),
        rate,
        args.change_pct_per_min,
        args.members,
        pool.len()
    );
    let mut state = (online, 0u64);
    let mut pairs = Vec::new();
    for round in 0..args.rounds {
        // Conversation mode: one viewer per node first (the rooms' memory), then the rest.
        let before = rss(&pids);
        let snaps = seen.snapshots.load(Ordering::Relaxed);
        let sub = serde_json::json!({"type": "subscribe", "payload": {"conversation_ids": [CONV]}, "id": "c"}).to_string();
        for o in outs.iter().take(nodes.len()) {
            let _ = o.send(sub.clone());
        }
        while seen.snapshots.load(Ordering::Relaxed) < snaps + nodes.len().min(outs.len()) as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let room_kib = rss(&pids).saturating_sub(before);
        let t = Instant::now();
        for o in outs.iter().skip(nodes.len()) {
            let _ = o.send(sub.clone());
        }
        while seen.snapshots.load(Ordering::Relaxed) < snaps + viewers.len() as u64 {
            if t.elapsed() > Duration::from_secs(120) {
                return Err("viewers' snapshots not in within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let snap_secs = t.elapsed().as_secs_f64();
        println!(
            "round {}: {} viewers subscribed to the conversation in {snap_secs:.2}s; the room: RSS +{} KiB over the nodes ({:.1} B per member per node)",
            round + 1,
            viewers.len(),
            room_kib,
            room_kib as f64 * 1024.0 / args.members as f64 / nodes.len() as f64
        );
        let conv = measure(&client, &bearer, &pool, &mut state, rate, args.seconds, &seen, &changes, &pids, nats_pid).await?;
        let unsub = serde_json::json!({"type": "unsubscribe", "payload": {"conversation_ids": [CONV]}, "id": "u"}).to_string();
        for o in &outs {
            let _ = o.send(unsub.clone());
        }
        // Baseline: the same viewers subscribe to the changing members by id.
        let sub = serde_json::json!({"type": "subscribe", "payload": {"user_ids": pool}, "id": "b"}).to_string();
        for o in &outs {
            let _ = o.send(sub.clone());
        }
        settle(&seen).await;
        let base = measure(&client, &bearer, &pool, &mut state, rate, args.seconds, &seen, &changes, &pids, nats_pid).await?;
        let unsub = serde_json::json!({"type": "unsubscribe", "payload": {"user_ids": pool}, "id": "x"}).to_string();
        for o in &outs {
            let _ = o.send(unsub.clone());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (name, r) in [("conversation", &conv), ("baseline", &base)] {
            println!(
                "round {} {name:>12}: {} changes in {:.1}s | presenced CPU {:.3} core, {:.0} µs per change (nats {:.3} core) | {:.0} B/s per viewer | freshness p50 {} p99 {}, slowest viewer per change p99 {}",
                round + 1,
                r.changes,
                r.secs,
                r.cpu / r.secs,
                r.cpu * 1e6 / r.changes.max(1) as f64,
                r.nats_cpu / r.secs,
                r.bytes as f64 / r.secs / viewers.len() as f64,
                super::ms(super::pct(&r.lat, 0.50)),
                super::ms(super::pct(&r.lat, 0.99)),
                super::ms(super::pct(&r.worst, 0.99)),
            );
        }
        pairs.push((conv, base));
    }
    let mean = |f: &dyn Fn(&(Run, Run)) -> f64| pairs.iter().map(f).sum::<f64>() / pairs.len().max(1) as f64;
    println!(
        "conversation against baseline: CPU per change {:.2}x, bytes per viewer {:.2}x",
        mean(&|(c, b)| (c.cpu / c.changes.max(1) as f64) / (b.cpu / b.changes.max(1) as f64).max(1e-12)),
        mean(&|(c, b)| (c.bytes as f64 / c.secs) / (b.bytes as f64 / b.secs).max(1e-9)),
    );
    refresher.abort();
    drop(nodes);
    drop(nats);
    Ok(())
}

/// One run: `rate` changes per second for `seconds`, each flipping a member of `pool`
/// (a session registered, or ended at once).
#[allow(clippy::too_many_arguments)]
async fn measure(
    client: &PresenceApiClient<tonic::transport::Channel>,
    bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    pool: &[String],
    state: &mut (Vec<bool>, u64),
    rate: f64,
    seconds: u64,
    seen: &Arc<Seen>,
    changes: &Changes,
    pids: &[u32],
    nats_pid: Option<u32>,
) -> Res<Run> {
    settle(seen).await;
    // Only this run's changes count.
    changes.lock().clear();
    seen.samples.lock().clear();
    seen.bytes.store(0, Ordering::Relaxed);
    seen.measuring.store(true, Ordering::Release);
    let cpu = |pids: &[u32]| pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
    let (c0, n0) = (cpu(pids), nats_pid.and_then(cpu_secs).unwrap_or(0.0));
    let start = Instant::now();
    let n = (rate * seconds as f64) as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        // A spread order over the pool (a prime stride).
        let k = ((state.1 as usize + i) * 7919) % pool.len();
        state.0[k] = !state.0[k];
        let user = pool[k].clone();
        let id = state.1 + i as u64 + 1;
        changes.lock().insert(user.clone(), (id, Instant::now()));
        let mut c = client.clone();
        let on = state.0[k];
        let reg = authed(
            pb::RegisterSessionRequest {
                user_id: user.clone(),
                device_id: "d".into(),
                instance_id: "gw".into(),
                ttl_seconds: 0,
                ..Default::default()
            },
            bearer,
        );
        let unreg = authed(pb::UnregisterSessionRequest { user_id: user, device_id: "d".into(), immediate: true }, bearer);
        tasks.spawn(async move {
            if on {
                c.register_session(reg).await.map(|_| ())
            } else {
                c.unregister_session(unreg).await.map(|_| ())
            }
        });
    }
    state.1 += n as u64;
    tokio::time::sleep_until((start + Duration::from_secs(seconds)).into()).await;
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    // The last changes' messages (a large conversation sends once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seen.measuring.store(false, Ordering::Release);
    let secs = start.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *seen.samples.lock());
    let mut lat: Vec<u32> = samples.iter().map(|s| s.1).collect();
    lat.sort_unstable();
    let mut worst: HashMap<u64, u32> = HashMap::new();
    for (id, l) in &samples {
        let w = worst.entry(*id).or_default();
        *w = (*w).max(*l);
    }
    let mut worst: Vec<u32> = worst.into_values().collect();
    worst.sort_unstable();
    Ok(Run {
        changes: n,
        secs,
        cpu: cpu(pids) - c0,
        nats_cpu: nats_pid.and_then(cpu_secs).unwrap_or(0.0) - n0,
        bytes: seen.bytes.load(Ordering::Relaxed),
        lat,
        worst,
    })
}

/// Waits until the viewers received nothing for a second (a snapshot is done).
async fn settle(seen: &Seen) {
    loop {
        let before = seen.all_bytes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if seen.all_bytes.load(Ordering::Relaxed) == before {
            return;
        }
    }
}

async fn open(addr: SocketAddr, user: &str) -> Res<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("ws://{addr}/ws").into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("x-user-id", user.parse().map_err(|_| "bad user id")?);
    req.headers_mut().insert("x-device-id", "bench".parse().map_err(|_| "bad device id")?);
    let config = super::ws_config().max_message_size(Some(16 << 20)).max_frame_size(Some(16 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await.map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// One viewer: sends what it is told, heartbeats, and reports each member change it is
/// told of (a `conversation_presence` listing the member, or its `presence_update`).
async fn viewer(
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    me: String,
    mut rx: mpsc::UnboundedReceiver<String>,
    seen: Arc<Seen>,
    changes: Changes,
) {
    let (mut tx, mut incoming) = ws.split();
    let mut beat = tokio::time::interval(Duration::from_secs(20));
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => if tx.send(Message::text(m)).await.is_err() { return },
                None => return,
            },
            _ = beat.tick() => if tx.send(Message::text(super::HEARTBEAT)).await.is_err() { return },
            msg = incoming.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    _ => return,
                };
                let now = Instant::now();
                let measuring = seen.measuring.load(Ordering::Acquire);
                seen.all_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                if measuring {
                    seen.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                let users: Vec<&str> = match v["type"].as_str() {
                    Some("conversation_presence") => {
                        if v["payload"]["snapshot"] == true {
                            seen.snapshots.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        v["payload"]["presences"].as_array().map(|a| a.iter().filter_map(|p| p["user_id"].as_str()).collect()).unwrap_or_default()
                    }
                    Some("presence_update") => v["payload"]["user_id"].as_str().into_iter().collect(),
                    _ => continue,
                };
                if !measuring {
                    continue;
                }
                let c = changes.lock();
                let mut out = Vec::new();
                for u in users.into_iter().filter(|u| *u != me) {
                    if let Some((id, at)) = c.get(u) {
                        out.push((*id, now.duration_since(*at).as_micros().min(u32::MAX as u128) as u32));
                    }
                }
                drop(c);
                seen.samples.lock().extend(out);
            }
        }
    }
}
