//! `presenced-bench backends`: the cluster backends side by side in one run. For each
//! engine (a real nats-server with JetStream, a real redis-server with AOF `everysec`),
//! two `presenced` nodes A and B on it, and:
//!
//! 1. cross-node fan-out: publishers on A change status, WebSocket subscribers on B
//!    watch them; latency from the change sent to its delivery;
//! 2. the bare engine's own publish → subscribe round trip at the same rate (what the
//!    fan-out costs above the engine);
//! 3. status writes per second on one node at saturation (`--writers` WebSocket
//!    clients, each waiting for the ack of its `presence_update` before the next);
//! 4. store writes per second with `--idle` users connected and heartbeating (O(nodes)).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::cluster::{fanout, idle_writes, nats_server, presenced, wait_port, ClusterArgs, Proc, Store};
use super::{free_port, open, pct, percentiles, Res};

#[derive(Parser, Clone)]
pub struct BackendsArgs {
    /// Engines to compare, in this order.
    #[arg(long, value_delimiter = ',', default_value = "nats,redis")]
    engines: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Concurrent writers in the saturation phase.
    #[arg(long, default_value_t = 64)]
    writers: usize,
    /// How long the saturation phase lasts.
    #[arg(long, default_value_t = 10)]
    write_secs: u64,
}

/// One engine's figures.
struct Figures {
    engine: String,
    fanout_p50: u32,
    fanout_p99: u32,
    bare_p50: u32,
    bare_p99: u32,
    writes_per_sec: f64,
    writes_per_change: f64,
    idle_writes_per_sec: f64,
    idle_users: u64,
}

fn redis_server(dir: &Path) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server (apt-get install redis-server): {e}"))?;
    Ok((Proc(child), port))
}

/// The engine's own publish → subscribe latency: `n` messages at `rate`/s, each
/// carrying its send time (µs, sorted). `publish_port`: NATS only, publish through another
/// server (a leaf) than the subscriber's.
pub(super) async fn bare_round_trip(store: &Store, publish_port: Option<u16>, n: usize, rate: f64) -> Res<Vec<u32>> {
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let publish: Box<dyn Fn(Vec<u8>) -> futures_util::future::BoxFuture<'static, Res<()>> + Send + Sync> = match store {
        Store::Nats { port, .. } => {
            let sub_client = async_nats::connect(format!("127.0.0.1:{port}")).await.map_err(|e| e.to_string())?;
            let mut sub = sub_client.subscribe("bench.rtt").await.map_err(|e| e.to_string())?;
            sub_client.flush().await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _keep = sub_client;
                while let Some(m) = sub.next().await {
                    let sent = std::str::from_utf8(&m.payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                    let _ = tx.send(sent);
                }
            });
            let client = async_nats::connect(format!("127.0.0.1:{}", publish_port.unwrap_or(*port))).await.map_err(|e| e.to_string())?;
            if publish_port.is_some_and(|p| p != *port) {
                // The subscription's interest crosses the leaf links before the first publish.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Box::new(move |p| {
                let client = client.clone();
                Box::pin(async move { client.publish("bench.rtt", p.into()).await.map_err(|e| e.to_string()) })
            })
        }
        Store::Redis { port } => {
            let url = format!("redis://127.0.0.1:{port}/?protocol=resp3");
            let client = redis::Client::open(url).map_err(|e| e.to_string())?;
            let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
            let config = redis::AsyncConnectionConfig::new().set_push_sender(ptx);
            let mut sub = client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| e.to_string())?;
            sub.subscribe("bench.rtt").await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _keep = sub;
                while let Some(push) = prx.recv().await {
                    if push.kind != redis::PushKind::Message {
                        continue;
                    }
                    if let Some(redis::Value::BulkString(b)) = push.data.get(1) {
                        let sent = std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let _ = tx.send(sent);
                    }
                }
            });
            let publisher = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
            Box::new(move |p| {
                let mut c = publisher.clone();
                Box::pin(
                    async move { redis::cmd("PUBLISH").arg("bench.rtt").arg(p).query_async::<()>(&mut c).await.map_err(|e| e.to_string()) },
                )
            })
        }
    };
    let received = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(sent)) => lat.push(((start.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000) as u32),
                _ => break,
            }
        }
        lat
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    for _ in 0..n {
        tick.tick().await;
        publish((start.elapsed().as_nanos() as u64).to_string().into_bytes()).await?;
    }
    let mut lat = received.await.map_err(|e| e.to_string())?;
    lat.sort_unstable();
    Ok(lat)
}

/// Status writes per second on node `http`: `writers` WebSocket clients, each sending a
/// `presence_update` and waiting for its ack before the next, for `secs`.
async fn saturate(http: u16, writers: usize, secs: u64) -> Res<f64> {
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().map_err(|e| format!("{e}"))?;
    let acks = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for i in 0..writers {
        conns.push(open(addr, Ipv4Addr::new(127, 0, 0, 2 + (i % 50) as u8), &format!("writer-{i}"), false).await?);
    }
    let go = Instant::now() + Duration::from_millis(500);
    let until = go + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, mut ws) in conns.into_iter().enumerate() {
        let (acks, errors) = (acks.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(go.into()).await;
            let mut n: u64 = 0;
            while Instant::now() < until {
                n += 1;
                let status = if n.is_multiple_of(2) { "busy" } else { "away" };
                let msg = serde_json::json!({"type":"presence_update","id": n,"payload":{"online_status": status,"custom_status": format!("w{i}-{n}")}});
                if ws.send(Message::text(msg.to_string())).await.is_err() {
                    return;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                            match v["type"].as_str() {
                                Some("ack") if v["id"] == n => {
                                    acks.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Some("error") => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                _ => {}
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        println!("  ({errs} writes answered with an error)");
    }
    Ok(acks.load(Ordering::Relaxed) as f64 / secs.max(1) as f64)
}

async fn one(engine: &str, dir: &Path, args: &BackendsArgs) -> Res<Figures> {
    let dir = dir.join(engine);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (_server, store) = match engine {
        "nats" => {
            let (p, port) = nats_server(&dir, "nats", "jetstream { store_dir: \"@STORE@\", max_file_store: 8GB }\n")?;
            (p, Store::Nats { port, domain: None })
        }
        "redis" => {
            let (p, port) = redis_server(&dir)?;
            (p, Store::Redis { port })
        }
        other => return Err(format!("unknown engine {other:?} (nats, redis)")),
    };
    let port = match &store {
        Store::Nats { port, .. } | Store::Redis { port } => *port,
    };
    wait_port(port).await?;
    let (_a, a) = presenced(&dir, "node-a", "center", &store, &args.cluster.lease_ttl)?;
    let (_b, b) = presenced(&dir, "node-b", "center", &store, &args.cluster.lease_ttl)?;
    wait_port(a).await?;
    wait_port(b).await?;
    println!("== {engine}: server :{port}; presenced :{a} (A) :{b} (B)");
    let f = fanout(a, b, &[a, b], store.name(), &args.cluster).await?;
    let bare = bare_round_trip(&store, None, args.cluster.changes, args.cluster.rate).await?;
    println!(
        "bare {engine} publish → subscribe ({} messages at {}/s): {}",
        bare.len(),
        args.cluster.rate,
        percentiles(&bare, &[("p50", 0.5), ("p99", 0.99)])
    );
    let writes_per_sec = saturate(a, args.writers, args.write_secs).await?;
    println!("status writes on node A at saturation ({} writers): {writes_per_sec:.0}/s", args.writers);
    let (idle_users, idle_writes_per_sec, _) = idle_writes(a, &[a, b], store.name(), &args.cluster).await?;
    Ok(Figures {
        engine: engine.to_string(),
        fanout_p50: pct(&f.latencies, 0.5),
        fanout_p99: pct(&f.latencies, 0.99),
        bare_p50: pct(&bare, 0.5),
        bare_p99: pct(&bare, 0.99),
        writes_per_sec,
        writes_per_change: f.writes_per_change,
        idle_writes_per_sec,
        idle_users,
    })
}

pub async fn run(args: BackendsArgs) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("presenced-bench-backends-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = super::cluster::Cleanup(dir.clone());
    let mut all = Vec::new();
    for e in &args.engines {
        all.push(one(e, &dir, &args).await?);
    }
    let ms = |us: u32| format!("{:.2}", f64::from(us) / 1000.0);
    println!(
        "\n| engine | cross-node fan-out p50 / p99 (ms) | bare pub→sub p50 / p99 (ms) | status writes/s, one node | store writes per change | store writes/s, idle users |"
    );
    println!("|---|---|---|---|---|---|");
    for f in all {
        println!(
            "| {} | {} / {} | {} / {} | {:.0} | {:.3} | {:.2} ({} users) |",
            f.engine,
            ms(f.fanout_p50),
            ms(f.fanout_p99),
            ms(f.bare_p50),
            ms(f.bare_p99),
            f.writes_per_sec,
            f.writes_per_change,
            f.idle_writes_per_sec,
            f.idle_users
        );
    }
    Ok(())
}
