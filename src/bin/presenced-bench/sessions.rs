//! `presenced-bench sessions`: seed 001's gateway model at a million device sessions in
//! one presenced process (embedded store), driven over one gRPC connection as a gateway
//! would:
//!
//! 1. `RefreshInstance` (the gateway's lease), then `RegisterSessions` batches until
//!    `users × devices` sessions are live: registrations/s, server RSS per session.
//! 2. `GetPresence` of 100 ids at that size: p50/p99.
//! 3. Liveness at the seed's heartbeat (`--heartbeat-secs`, 25 s): per-session
//!    `RefreshSession` at full speed (calls/s the box sustains, server CPU per call) against
//!    the instance lease (one `RefreshInstance` per heartbeat), and what each needs for
//!    all the sessions.
//! 4. The gateway stops refreshing: time from the lease deadline until every user is
//!    offline (events counted on `/metrics`), and the RSS after (memory returned).

use std::time::{Duration, Instant};

use clap::Parser;
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;

use super::cpu::cpu_secs;
use super::scrape::metric;
use super::{authed, free_port, measure_calls, ms, rss_kib, spawn_server_env, Res};

#[derive(Parser, Clone)]
pub struct SessionsArgs {
    /// Users registered.
    #[arg(long, default_value_t = 500_000)]
    users: usize,
    /// Devices (sessions) per user.
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Sessions per `RegisterSessions` call.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// `RegisterSessions` calls in flight at once.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// The seed's heartbeat interval, for the liveness comparison.
    #[arg(long, default_value_t = 25)]
    heartbeat_secs: u64,
    /// The instance lease TTL (also how long the expiry phase waits for the deadline).
    #[arg(long, default_value_t = 10)]
    lease_secs: u32,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

pub async fn run(args: SessionsArgs) -> Res<()> {
    let port = free_port()?;
    let env = [
        ("PRESENCE_LIMITS__MAX_SESSIONS_PER_CALL", "10000"),
        ("PRESENCE_LIMITS__GRPC_MAX_CONCURRENT_STREAMS", "256"),
        // Keep users (offline, with last_seen) after their sessions end: the RSS after
        // expiry is then the users' own state, and what the sessions cost is the difference.
        ("PRESENCE_PRESENCE__FORGET_AFTER", "0s"),
    ];
    let server = spawn_server_env(false, Some(port), &env).await?;
    let pid = server.pid.ok_or("no server pid")?;
    let http = server.addr.clone();
    let (channel, bearer) = super::grpc_admin(port).await?;
    let client = PresenceApiClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = rss_kib(pid).ok_or("no RSS")?;
    let sessions = args.users * args.devices;
    println!(
        "presenced (embedded store) idle: RSS {}; registering {} users × {} devices = {sessions} sessions",
        mib(idle_kib),
        args.users,
        args.devices
    );

    // 1. The gateway's lease, kept by a refresher (every third of its TTL, as a gateway
    //    would), then its sessions in batches.
    let deadline = std::sync::Arc::new(parking_lot::Mutex::new(0i64));
    let refresher = {
        let (mut c, b, d, ttl) = (client.clone(), bearer.clone(), deadline.clone(), args.lease_secs);
        let req = move || authed(pb::RefreshInstanceRequest { instance_id: "gw-0".into(), ttl_seconds: ttl }, &b);
        let first = c.refresh_instance(req()).await.map_err(|e| e.to_string())?.into_inner();
        *d.lock() = first.expires_at.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(u64::from(ttl) * 1000 / 3)).await;
                match c.refresh_instance(req()).await {
                    Ok(r) => *d.lock() = r.into_inner().expires_at.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
                    Err(e) => eprintln!("RefreshInstance: {e}"),
                }
            }
        })
    };
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let entries: Vec<pb::SessionEntry> = (0..args.users)
        .flat_map(|u| {
            (0..args.devices).map(move |d| pb::SessionEntry {
                user_id: format!("u{u}"),
                device_id: format!("d{d}"),
                platform: String::new(),
            })
        })
        .collect();
    let batches: Vec<Vec<pb::SessionEntry>> = entries.chunks(args.batch).map(<[_]>::to_vec).collect();
    drop(entries);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(args.in_flight));
    let mut calls = Vec::new();
    for b in batches {
        let permit = sem.clone().acquire_owned().await.map_err(|e| e.to_string())?;
        let mut c = client.clone();
        let req = authed(pb::RegisterSessionsRequest { instance_id: "gw-0".into(), ttl_seconds: 0, sessions: b }, &bearer);
        calls.push(tokio::spawn(async move {
            let r = c.register_sessions(req).await.map_err(|e| e.to_string());
            drop(permit);
            r.map(|r| r.into_inner().failed)
        }));
    }
    let mut failed = 0;
    for c in calls {
        failed += c.await.map_err(|e| e.to_string())??;
    }
    let took = t0.elapsed().as_secs_f64();
    let cpu_reg = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    if failed > 0 {
        return Err(format!("{failed} registrations failed"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full_kib = rss_kib(pid).ok_or("no RSS")?;
    let per_session = (full_kib.saturating_sub(idle_kib) * 1024) as f64 / sessions as f64;
    println!(
        "registered {sessions} sessions in {took:.1}s: {:.0} registrations/s ({:.1} µs server CPU each); RSS {} (+{}): {per_session:.0} B per session, {:.0} B per user",
        sessions as f64 / took,
        cpu_reg * 1e6 / sessions as f64,
        mib(full_kib),
        mib(full_kib - idle_kib),
        per_session * args.devices as f64,
    );

    // 2. Batch reads at that size.
    let ids: Vec<String> = (0..100).map(|i| format!("u{}", i * (args.users / 100).max(1))).collect();
    let c = client.clone();
    let get = measure_calls(16, args.seconds, move |_| {
        let mut c = c.clone();
        let req = tonic::Request::new(pb::GetPresenceRequest { user_ids: ids.clone() });
        async move {
            let r = c.get_presence(req).await.map_err(|e| e.to_string())?;
            if r.get_ref().presences.iter().all(|p| p.status == pb::Status::Online as i32) {
                Ok(())
            } else {
                Err("a user is not online".into())
            }
        }
    })
    .await?;
    println!(
        "GetPresence (100 ids, 16 in flight) with {sessions} sessions: {:.0}/s, p50 {}, p99 {}",
        get.per_sec,
        ms(get.p50_us),
        ms(get.p99_us)
    );

    // 3. Liveness: per-session refresh at full speed, against the instance lease.
    let need = sessions as f64 / args.heartbeat_secs as f64;
    let (users, devices) = (args.users, args.devices);
    let (c, b) = (client.clone(), bearer.clone());
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let refresh = measure_calls(128, args.seconds, move |i| {
        let mut c = c.clone();
        let req = authed(
            pb::RefreshSessionRequest {
                user_id: format!("u{}", (i / devices) % users),
                device_id: format!("d{}", i % devices),
                active: None,
                idle_since: None,
            },
            &b,
        );
        async move { c.refresh_session(req).await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await?;
    let cpu_refresh = (cpu_secs(pid).unwrap_or(0.0) - cpu0) / args.seconds as f64;
    let per_call_us = cpu_refresh * 1e6 / refresh.per_sec.max(1.0);
    println!(
        "per-session RefreshSession (128 in flight): {:.0}/s, p50 {}, p99 {}, server CPU {:.2} cores ({per_call_us:.1} µs per call); {sessions} sessions at a {} s heartbeat need {need:.0}/s = {:.2} cores{}",
        refresh.per_sec,
        ms(refresh.p50_us),
        ms(refresh.p99_us),
        cpu_refresh,
        args.heartbeat_secs,
        per_call_us * need / 1e6,
        if refresh.per_sec < need { " (more than this box sustains)" } else { "" },
    );
    // The lease alone: the refresher's one call per third of the lease TTL is all the
    // liveness traffic; what the server spends meanwhile (idle work included).
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu_lease = (cpu_secs(pid).unwrap_or(0.0) - cpu0) / t.elapsed().as_secs_f64();
    println!(
        "instance lease: one RefreshInstance per heartbeat keeps all {sessions} sessions ({:.2} calls/s at {} s; the bench refreshes every {:.1} s); server CPU meanwhile {:.3} cores, idle work included",
        1.0 / args.heartbeat_secs as f64,
        args.heartbeat_secs,
        f64::from(args.lease_secs) / 3.0,
        cpu_lease,
    );

    // 4. The gateway dies: no more refreshes; the lease lapses and every session ends.
    refresher.abort();
    let offline0 = metric(&http, "presence_events_total{kind=\"user_offline\"}").await?;
    let deadline = *deadline.lock();
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    tokio::time::sleep(Duration::from_millis((deadline - now_ms()).max(0) as u64)).await;
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let t = Instant::now();
    let mut sessions_left_at = None;
    loop {
        let off = metric(&http, "presence_events_total{kind=\"user_offline\"}").await? - offline0;
        if sessions_left_at.is_none() && metric(&http, "presence_sessions ").await? == 0.0 {
            sessions_left_at = Some(t.elapsed());
        }
        if off as usize >= args.users && sessions_left_at.is_some() {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {off} of {} users offline 300 s after the lease deadline", args.users));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_offline = t.elapsed();
    let cpu = cpu_secs(pid).unwrap_or(0.0) - cpu0;
    println!(
        "lease lapsed: all {sessions} sessions ended and {} user_offline events published {:.2}s after its deadline ({:.0} sessions/s); server CPU {cpu:.1}s",
        args.users,
        all_offline.as_secs_f64(),
        sessions as f64 / all_offline.as_secs_f64(),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_kib = rss_kib(pid).ok_or("no RSS")?;
    println!(
        "RSS after every session ended: {} ({} of the {} the sessions added returned; the {} users stay, offline with last_seen)",
        mib(after_kib),
        mib(full_kib.saturating_sub(after_kib)),
        mib(full_kib.saturating_sub(idle_kib)),
        args.users,
    );
    Ok(())
}
