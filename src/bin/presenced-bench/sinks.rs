//! `presenced-bench sinks`: what an event sink delivers. presenced runs with a webhook
//! sink pointing at a receiver in this process; a gateway registers `--sessions` sessions
//! in `RegisterSessions` batches (one `user_online` event each), as fast as it can, then
//! ends its instance (one `user_offline` each). Reports events delivered per second,
//! the delay from each transition to its receipt (p50/p99/max), the deepest outbox, and
//! any event lost (`sink_events_dropped_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use clap::Parser;
use parking_lot::Mutex;
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;

use super::scrape::metric;
use super::{authed, free_port, ms, pct, spawn_server_env, Res};

#[derive(Parser, Clone)]
pub struct SinksArgs {
    /// Sessions registered (one user each): as many user_online events, then as many
    /// user_offline.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Events per webhook POST (`batch_max`).
    #[arg(long, default_value_t = 100)]
    batch: usize,
}

#[derive(Default)]
struct Received {
    events: AtomicU64,
    posts: AtomicU64,
    /// Transition → receipt, µs.
    delays: Mutex<Vec<u32>>,
}

async fn receive(axum::extract::State(r): axum::extract::State<Arc<Received>>, body: Bytes) -> axum::http::StatusCode {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else { return axum::http::StatusCode::BAD_REQUEST };
    let events = v["events"].as_array().cloned().unwrap_or_default();
    let mut d = r.delays.lock();
    for e in &events {
        if let Some(at) = e["at"].as_i64() {
            d.push((now - at * 1000).clamp(0, u32::MAX as i64) as u32);
        }
    }
    r.events.fetch_add(events.len() as u64, Ordering::Relaxed);
    r.posts.fetch_add(1, Ordering::Relaxed);
    axum::http::StatusCode::NO_CONTENT
}

pub async fn run(args: SinksArgs) -> Res<()> {
    let received = Arc::new(Received::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(received.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let hook = format!("http://{}/hook", l.local_addr().map_err(|e| e.to_string())?);
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let sinks =
        format!("[{{name: bench, type: webhook, url: \"{hook}\", secret: \"bench-secret-0123456789\", batch_max: {}}}]", args.batch);
    let port = free_port()?;
    let env = [("PRESENCE_EVENTS__SINKS", sinks.as_str()), ("PRESENCE_LIMITS__MAX_SESSIONS_PER_CALL", "10000")];
    let server = spawn_server_env(false, Some(port), &env).await?;
    let http = server.addr.clone();
    let (channel, bearer) = super::grpc_admin(port).await?;
    let mut client = PresenceApiClient::new(channel).max_decoding_message_size(64 << 20);
    client
        .refresh_instance(authed(pb::RefreshInstanceRequest { instance_id: "gw".into(), ttl_seconds: 3600 }, &bearer))
        .await
        .map_err(|e| e.to_string())?;

    let n = args.sessions;
    println!("presenced with one webhook sink (batch_max {}); {n} sessions registered, then ended", args.batch);
    let t = Instant::now();
    let mut max_depth = 0f64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let sessions =
            chunk.iter().map(|i| pb::SessionEntry { user_id: format!("u{i}"), device_id: "d".into(), platform: String::new() }).collect();
        client
            .register_sessions(authed(pb::RegisterSessionsRequest { instance_id: "gw".into(), ttl_seconds: 0, sessions }, &bearer))
            .await
            .map_err(|e| e.to_string())?;
    }
    let produced = t.elapsed();
    client
        .unregister_instance(authed(pb::UnregisterInstanceRequest { instance_id: "gw".into(), immediate: true }, &bearer))
        .await
        .map_err(|e| e.to_string())?;
    let all_produced = t.elapsed();
    let want = 2 * n as u64;
    loop {
        max_depth = max_depth.max(metric(&http, "sink_outbox_events{").await.unwrap_or(0.0));
        if received.events.load(Ordering::Relaxed) >= want {
            break;
        }
        let dropped = metric(&http, "sink_events_dropped_total{").await.unwrap_or(0.0);
        if t.elapsed() > Duration::from_secs(600) {
            return Err(format!("{} of {want} events after 600 s ({dropped} dropped)", received.events.load(Ordering::Relaxed)));
        }
        if dropped > 0.0 && received.events.load(Ordering::Relaxed) as f64 + dropped >= want as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t.elapsed();
    let dropped = metric(&http, "sink_events_dropped_total{").await.unwrap_or(0.0);
    let mut d = std::mem::take(&mut *received.delays.lock());
    d.sort_unstable();
    let got = received.events.load(Ordering::Relaxed);
    println!(
        "{want} events produced in {:.2}s ({:.0}/s; the registrations alone {:.2}s); {got} delivered in {:.2}s: {:.0} events/s over {} POSTs",
        all_produced.as_secs_f64(),
        want as f64 / all_produced.as_secs_f64(),
        produced.as_secs_f64(),
        took.as_secs_f64(),
        got as f64 / took.as_secs_f64(),
        received.posts.load(Ordering::Relaxed),
    );
    println!(
        "transition → receipt: p50 {}, p99 {}, max {}; deepest outbox {max_depth:.0} events; dropped {dropped:.0}",
        ms(pct(&d, 0.5)),
        ms(pct(&d, 0.99)),
        ms(d.last().copied().unwrap_or(0)),
    );
    Ok(())
}
