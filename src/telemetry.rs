//! Logs (`tracing`, text or JSON) and metrics (Prometheus text at `/metrics`).
//!
//! Every metric the service exports is listed once, in [`METRICS`], with its help text
//! and the label sets it is created with: [`register`] describes them all and creates
//! them at zero when the node starts (after the recorder is installed), so a scrape
//! sees every documented series from the first second, not only once it was used.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{Backend, LogFormat, LoggingConfig};
use crate::store::StoreStats;

/// Installs the global log subscriber. A second call is a no-op.
pub fn init_logging(cfg: &LoggingConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cfg.level).map_err(|e| format!("logging.level: invalid filter {:?}: {e}", cfg.level))?;
    // Colours only for a person at a terminal: not in files, pipes or journald, nor with NO_COLOR.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// The process-wide Prometheus recorder, installed on first use. Call it before anything
/// records a metric (values recorded earlier are lost).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Up to a minute: the request timeout (`limits.request_timeout`, 10 s by
            // default) and a sink's `timeout` fall inside a bucket, not in `+Inf` alone.
            let buckets =
                [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let builder = PrometheusBuilder::new();
            let builder =
                builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets).unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (embedding applications): render ours anyway.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which nodes export a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    /// The embedded store.
    Memory,
    /// Cluster mode, whatever the backend.
    Cluster,
    /// Cluster mode on NATS.
    Nats,
    /// Cluster mode on Redis.
    Redis,
    /// Per configured event sink (`events.sinks`): series appear when a sink starts.
    Sinks,
}

/// One exported metric: name, kind, where, help text, and the label sets created at start.
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub help: &'static str,
    pub labels: &'static [&'static [(&'static str, &'static str)]],
}

const NONE: &[&[(&str, &str)]] = &[&[]];
/// Series created per configured sink at its start (described only, until then).
const PER_SINK: &[&[(&str, &str)]] = &[];

macro_rules! m {
    ($name:literal, $kind:ident, $scope:ident, $help:literal) => {
        Metric { name: $name, kind: Kind::$kind, scope: Scope::$scope, help: $help, labels: NONE }
    };
    ($name:literal, $kind:ident, $scope:ident, $help:literal, $labels:expr) => {
        Metric { name: $name, kind: Kind::$kind, scope: Scope::$scope, help: $help, labels: $labels }
    };
}

/// Every metric, as the README's operations section lists them.
pub const METRICS: &[Metric] = &[
    m!(
        "presenced_build_info",
        Gauge,
        All,
        "Always 1; the labels say which build runs.",
        &[&[("version", env!("CARGO_PKG_VERSION"))]]
    ),
    m!("presence_updates_total", Counter, All, "Accepted presence writes (status set or cleared)."),
    m!(
        "presence_events_total",
        Counter,
        All,
        "Presence transitions published on the event bus, by kind.",
        &[&[("kind", "user_online")], &[("kind", "user_offline")], &[("kind", "presence_updated")], &[("kind", "presence_expired")], &[("kind", "user_erased")]]
    ),
    m!("presence_sessions", Gauge, All, "Live device sessions on this node (all users, hidden ones included)."),
    m!("presence_online_users", Gauge, All, "Users with at least one live device session on this node (all users, hidden ones included)."),
    m!("presence_known_users", Gauge, All, "Users held by the store (embedded) or by the read cache (cluster)."),
    m!(
        "presence_reads_total",
        Counter,
        Memory,
        "Presence lookups by the embedded store: of a user it knows, or of one never seen.",
        &[&[("result", "known")], &[("result", "unknown")]]
    ),
    m!("sink_events_sent_total", Counter, Sinks, "Events an event sink delivered (acknowledged), by sink.", PER_SINK),
    m!("sink_delivery_failures_total", Counter, Sinks, "Failed delivery attempts (each retried with backoff), by sink.", PER_SINK),
    m!("sink_events_retried_total", Counter, Sinks, "Events delivered by a retry after a failed attempt, by sink.", PER_SINK),
    m!("sink_events_dropped_total", Counter, Sinks, "Events a sink lost: its outbox was full (oldest dropped) or a burst overflowed events.outbox.buffer, by sink and reason.", PER_SINK),
    m!("sink_outbox_events", Gauge, Sinks, "Events waiting in a sink's on-disk outbox.", PER_SINK),
    m!("sink_delivery_seconds", Histogram, Sinks, "Time of each delivery attempt of a batch, by sink and outcome (ok, failed).", PER_SINK),
    m!("sink_lag_seconds", Gauge, Sinks, "Age of the oldest event a sink has not delivered yet (0 when none).", PER_SINK),
    m!("sink_events_unroutable_total", Counter, Sinks, "Events an AMQP sink with unroutable: drop skipped because no queue was bound to receive them, by sink.", PER_SINK),
    m!("presence_instance_leases", Gauge, All, "Gateway instance leases live on this node."),
    m!("presence_instance_leases_lapsed_total", Counter, All, "Gateway instance leases that lapsed (not refreshed in time) on this node."),
    m!("presence_instance_sessions_ended_total", Counter, All, "Device sessions ended because their instance lease lapsed or was ended."),
    m!("presence_instance_sessions_bound_late_total", Counter, All, "Device sessions registered before their instance's lease began, bound to it when it did."),
    m!("presence_users_forgotten_total", Counter, Memory, "Users forgotten after presence.forget_after with no session and no status."),
    m!(
        "presence_rate_limited_total",
        Counter,
        All,
        "Requests and connections refused by a rate limit, by scope.",
        &[&[("scope", "write")], &[("scope", "ws_message")], &[("scope", "connect")], &[("scope", "grpc_connect")]]
    ),
    m!("presence_users_erased_total", Counter, All, "Users erased on this node (DELETE /api/v2/users/{id}, gRPC EraseUser)."),
    m!("presence_persist_commits_total", Counter, Memory, "Commits of the embedded store's database."),
    m!("presence_persist_purges_total", Counter, Memory, "Rewrites of the embedded store's database after an erasure (no freed page keeps an erased user's records)."),
    m!(
        "presence_persist_failures_total",
        Counter,
        Memory,
        "Failed commits of the embedded store's database (retried; the database is reopened)."
    ),
    m!(
        "http_request_duration_seconds",
        Histogram,
        All,
        "HTTP request latency by route template, method and status.",
        &[&[("route", "/metrics"), ("method", "GET"), ("status", "200")]]
    ),
    m!("http_stale_reads_total", Counter, Nats, "Reads answered from a degraded node's cache (marked stale)."),
    m!(
        "connections_timed_out_total",
        Counter,
        All,
        "HTTP and gRPC connections closed by limits.header_read_timeout, limits.idle_timeout, or (gRPC) a second after being refused for the per-IP connection rate.",
        &[&[("reason", "header_read")], &[("reason", "idle")], &[("reason", "rate_limited")]]
    ),
    m!("accept_errors_total", Counter, All, "Failed accepts (e.g. out of file descriptors); retried."),
    m!("audit_lines_lost_total", Counter, All, "logging.audit_file: lines that could not be written (the file failed, or the writer stopped)."),
    m!("tls_reloads_total", Counter, All, "service.tls: certificate, key or client CA files that changed and were loaded (rotation)."),
    m!("tls_reload_failures_total", Counter, All, "service.tls: changed files that did not load (the previous certificate stays in use)."),
    m!(
        "tls_handshake_failures_total",
        Counter,
        All,
        "Connections to a TLS port closed before a request: plain text refused, a failed handshake (a missing or untrusted client certificate on gRPC), or no ClientHello within limits.header_read_timeout; by port and reason.",
        &[
            &[("port", "http"), ("reason", "plain_text")],
            &[("port", "http"), ("reason", "handshake")],
            &[("port", "http"), ("reason", "timeout")],
            &[("port", "grpc"), ("reason", "plain_text")],
            &[("port", "grpc"), ("reason", "handshake")],
            &[("port", "grpc"), ("reason", "timeout")],
        ]
    ),
    m!("ws_connections", Gauge, All, "Open WebSocket connections."),
    m!("ws_subscriptions", Gauge, All, "WebSocket subscriptions (watched users, summed over connections)."),
    m!("ws_messages_in_total", Counter, All, "WebSocket text messages received."),
    m!("ws_messages_out_total", Counter, All, "WebSocket messages sent."),
    m!("ws_coalesced_total", Counter, All, "Pushes that replaced a pending push about the same user in an outbox."),
    m!(
        "ws_dropped_total",
        Counter,
        All,
        "WebSocket connections closed or pushes lost, by reason.",
        &[&[("reason", "slow_consumer")], &[("reason", "write_timeout")], &[("reason", "bus_lag")]]
    ),
    m!("ws_resyncs_total", Counter, All, "Fresh snapshots sent to every connection after the hub fell behind the event bus."),
    m!("ws_conversation_rooms", Gauge, All, "Conversations this node's WebSocket connections follow (one room each, whatever the viewers)."),
    m!("ws_conversation_pushes_total", Counter, All, "conversation_presence messages queued for WebSocket viewers."),
    m!("ws_stale_closed_total", Counter, All, "WebSocket connections closed with 4002 (no traffic within session_ttl)."),
    m!(
        "ws_protocol_errors_total",
        Counter,
        All,
        "WebSocket connections closed for a bad frame, by close code (1002 protocol, 1007 bad UTF-8, 1009 too big).",
        &[&[("close_code", "1002")], &[("close_code", "1007")], &[("close_code", "1009")]]
    ),
    m!("ws_fanout_seconds", Histogram, All, "Time to queue one change for all its WebSocket targets."),
    m!("ws_fanout_targets_total", Counter, All, "WebSocket pushes queued by fan-out."),
    m!(
        "grpc_requests_total",
        Counter,
        All,
        "gRPC calls by method and status code.",
        &[
            &[("method", "GetPresence"), ("code", "OK")],
            &[("method", "RegisterSession"), ("code", "OK")],
            &[("method", "RefreshSession"), ("code", "OK")],
            &[("method", "UnregisterSession"), ("code", "OK")],
            &[("method", "GetUserDevices"), ("code", "OK")],
            &[("method", "SetPresence"), ("code", "OK")],
            &[("method", "WatchPresence"), ("code", "OK")]
        ]
    ),
    m!(
        "grpc_request_duration_seconds",
        Histogram,
        All,
        "gRPC call latency by method (a WatchPresence call: until its stream starts).",
        &[
            &[("method", "GetPresence")],
            &[("method", "RegisterSession")],
            &[("method", "RefreshSession")],
            &[("method", "UnregisterSession")],
            &[("method", "GetUserDevices")],
            &[("method", "SetPresence")],
            &[("method", "WatchPresence")]
        ]
    ),
    m!("grpc_watch_streams", Gauge, All, "Open WatchPresence streams."),
    m!("grpc_watch_coalesced_total", Counter, All, "WatchPresence events that replaced a pending event about the same user."),
    m!(
        "grpc_watch_refused_total",
        Counter,
        All,
        "WatchPresence calls refused (RESOURCE_EXHAUSTED) by limits.grpc_max_watch_streams or limits.grpc_max_watched_ids.",
        &[&[("reason", "streams")], &[("reason", "ids")]]
    ),
    m!("nats_connected", Gauge, Nats, "1 while connected to NATS."),
    m!("nats_degraded", Gauge, Nats, "1 while the circuit breaker is open (degraded mode)."),
    m!(
        "store_writes_total",
        Counter,
        Cluster,
        "Writes to the shared store, by backend and kind (user record, owner index, node lease, gateway instance lease, directory).",
        &[
            &[("backend", BACKEND), ("kind", "user")],
            &[("backend", BACKEND), ("kind", "index")],
            &[("backend", BACKEND), ("kind", "lease")],
            &[("backend", BACKEND), ("kind", "instance")],
            &[("backend", BACKEND), ("kind", "directory")]
        ]
    ),
    m!("nats_kv_writes_total", Counter, Nats, "Compare-and-swap writes to the users bucket."),
    m!("nats_kv_cas_conflicts_total", Counter, Nats, "Compare-and-swap conflicts (retried)."),
    m!("nats_interest_users", Gauge, Nats, "Users this node follows other nodes' events about."),
    m!("nats_interest_all", Gauge, Nats, "1 while this node takes every user's events through one subscription (store.interest_all_above), else 0."),
    m!("nats_events_received_total", Counter, Nats, "Other nodes' events received."),
    m!("nats_events_out_of_order_total", Counter, Nats, "Events dropped as older than one already published or relayed here."),
    m!("nats_publish_timeouts_total", Counter, Nats, "Publishes to NATS dropped after nats.request_timeout."),
    m!("nats_forwarded_heartbeats_total", Counter, Nats, "Heartbeats forwarded to the node that holds the session."),
    m!("nats_janitor_claims_total", Counter, Nats, "Lapsed node leases claimed by this node's janitor."),
    m!("nats_janitor_spared_total", Counter, Nats, "Lapsed node leases this node's janitor left unclaimed: their node answered, or its own renewals were late."),
    m!("nats_interest_waits_total", Counter, Nats, "Snapshot reads that waited for the subscriptions to newly watched users (none while the node takes every user's events)."),
    m!("nats_lease_lost_total", Counter, Nats, "Times this node found its lease claimed (it was cut off too long)."),
    m!("nats_lease_renewed_at_seconds", Gauge, Nats, "Unix time of this node's last lease renewal."),
    m!("nats_degraded_local_changes_total", Counter, Nats, "Session changes kept locally while degraded."),
    m!("nats_sessions_repaired_total", Counter, Nats, "Users whose stored record lacked a session a connection here holds, written again (anti-entropy)."),
    m!("nats_events_made_up_total", Counter, Nats, "Events made up after this node's subscriptions to the engine were interrupted: a watched user's stored state was newer than what its watchers were given."),
    m!("nats_sessions_adopted_total", Counter, Nats, "Sessions of a drained or dead node this node took over, held for the offline grace."),
    m!("nats_directory_rewatch_total", Counter, Nats, "Times the directory watch was opened again after it ended."),
    m!("nats_slow_consumer_total", Counter, Nats, "NATS slow-consumer notices."),
    m!("nats_embedded_restarts_total", Counter, Nats, "Restarts of the embedded nats-server."),
    m!("redis_connected", Gauge, Redis, "1 while connected to Redis (a PING every second answers)."),
    m!("redis_degraded", Gauge, Redis, "1 while the circuit breaker is open (degraded mode)."),
    m!("redis_cas_writes_total", Counter, Redis, "Compare-and-swap writes of users' records."),
    m!("redis_cas_conflicts_total", Counter, Redis, "Compare-and-swap conflicts (retried)."),
    m!("redis_interest_users", Gauge, Redis, "Users this node follows other nodes' events about."),
    m!("redis_interest_all", Gauge, Redis, "1 while this node takes every user's events through one subscription (store.interest_all_above), else 0."),
    m!("redis_events_received_total", Counter, Redis, "Other nodes' events received."),
    m!("redis_events_out_of_order_total", Counter, Redis, "Events dropped as older than one already published or relayed here."),
    m!("redis_publish_timeouts_total", Counter, Redis, "Event publishes dropped after redis.request_timeout."),
    m!("redis_forwarded_heartbeats_total", Counter, Redis, "Heartbeats forwarded to the node that holds the session."),
    m!("redis_janitor_claims_total", Counter, Redis, "Lapsed node leases claimed by this node's janitor."),
    m!("redis_janitor_spared_total", Counter, Redis, "Lapsed node leases this node's janitor left unclaimed: their node answered, or its own renewals were late."),
    m!("redis_interest_waits_total", Counter, Redis, "Snapshot reads that waited for the subscriptions to newly watched users (none while the node takes every user's events)."),
    m!("redis_lease_lost_total", Counter, Redis, "Times this node found its lease claimed or gone (cut off too long, or Redis lost its data)."),
    m!("redis_lease_renewed_at_seconds", Gauge, Redis, "Unix time of this node's last lease renewal."),
    m!("redis_degraded_local_changes_total", Counter, Redis, "Session changes kept locally while degraded."),
    m!("redis_sessions_repaired_total", Counter, Redis, "Users whose stored record lacked a session a connection here holds, written again (anti-entropy)."),
    m!("redis_events_made_up_total", Counter, Redis, "Events made up after this node's subscriptions to the engine were interrupted: a watched user's stored state was newer than what its watchers were given."),
    m!("redis_sessions_adopted_total", Counter, Redis, "Sessions of a drained or dead node this node took over, held for the offline grace."),
    m!("redis_directory_rewatch_total", Counter, Redis, "Times the directory was read again after its change stream was interrupted."),
    m!("redis_script_loads_total", Counter, Redis, "Lua scripts (re)loaded after a NOSCRIPT answer (a restarted or failed-over Redis)."),
    m!("cache_hits_total", Counter, Cluster, "Reads served by the node's read cache."),
    m!("cache_misses_total", Counter, Cluster, "Reads the read cache did not hold."),
    m!("cache_evictions_total", Counter, Cluster, "Read-cache entries evicted for space."),
];

/// In a label set of [`METRICS`]: replaced by the node's backend (`nats`, `redis`) when
/// the series is created.
const BACKEND: &str = "$backend";

/// Installs the recorder, then describes every metric and creates it at zero (histograms
/// with zero observations, for the label sets listed).
pub fn register(backend: Backend) -> PrometheusHandle {
    let handle = metrics_handle();
    let backend_name = match backend {
        Backend::Memory => "memory",
        Backend::Nats => "nats",
        Backend::Redis => "redis",
    };
    let label = |k: &'static str, v: &'static str| metrics::Label::new(k, if v == BACKEND { backend_name } else { v });
    for m in METRICS {
        let applies = match m.scope {
            Scope::All => true,
            Scope::Memory => backend == Backend::Memory,
            Scope::Cluster => backend != Backend::Memory,
            Scope::Nats => backend == Backend::Nats,
            Scope::Redis => backend == Backend::Redis,
            Scope::Sinks => true,
        };
        if !applies {
            continue;
        }
        match m.kind {
            Kind::Counter => {
                metrics::describe_counter!(m.name, m.help);
                for labels in m.labels {
                    let l: Vec<metrics::Label> = labels.iter().map(|(k, v)| label(k, v)).collect();
                    metrics::counter!(m.name, l).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(m.name, m.help);
                for labels in m.labels {
                    let l: Vec<metrics::Label> = labels.iter().map(|(k, v)| label(k, v)).collect();
                    metrics::gauge!(m.name, l).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(m.name, metrics::Unit::Seconds, m.help);
                for labels in m.labels {
                    let l: Vec<metrics::Label> = labels.iter().map(|(k, v)| label(k, v)).collect();
                    // A registered histogram renders (with zero counts) before its first sample.
                    let _ = metrics::histogram!(m.name, l);
                }
            }
        }
    }
    metrics::gauge!("presenced_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    handle
}

/// The standard `process_*` metrics, as Prometheus's client libraries export them (CPU
/// seconds, resident and virtual memory, open and maximum file descriptors, start time),
/// read from `/proc` at each scrape and appended to `/metrics`. Empty where there is no
/// `/proc` (not Linux).
pub fn process_metrics() -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let (Some(stat), Some(status)) = (read("/proc/self/stat"), read("/proc/self/status")) else {
        return String::new();
    };
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
    let max_fds = read("/proc/self/limits").as_deref().and_then(max_open_files);
    let boot = read("/proc/stat").as_deref().and_then(boot_time);
    render_process(&stat, &status, open_fds, max_fds, boot)
}

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

fn render_process(stat: &str, status: &str, open_fds: Option<usize>, max_fds: Option<u64>, boot: Option<u64>) -> String {
    use std::fmt::Write;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // `f[0]` is field 3 (state): field n is `f[n - 3]`.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let kib = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok())
    };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    };
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) as f64 / USER_HZ);
    metric("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
    metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kib("VmRSS:").map(|k| (k * 1024) as f64));
    metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", field(23).map(|v| v as f64));
    metric("process_open_fds", "gauge", "Number of open file descriptors.", open_fds.map(|n| n as f64));
    metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds.map(|n| n as f64));
    let start = boot.zip(field(22)).map(|(b, ticks)| b as f64 + ticks as f64 / USER_HZ);
    metric("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start);
    out
}

/// The soft limit of "Max open files" in `/proc/<pid>/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// `btime` of `/proc/stat`: when the machine booted, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// Copies the store's counters into gauges (called at scrape time).
pub fn record_store_stats(s: &StoreStats) {
    metrics::gauge!("presence_sessions").set(s.sessions as f64);
    metrics::gauge!("presence_online_users").set(s.online_users as f64);
    metrics::gauge!("presence_known_users").set(s.users as f64);
    if !s.read_cache {
        // Cluster backends count their cache's hits themselves (`cache_hits_total`).
        metrics::counter!("presence_reads_total", "result" => "known").absolute(s.hits);
        metrics::counter!("presence_reads_total", "result" => "unknown").absolute(s.misses);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_read_from_proc() {
        let stat =
            "4242 (presenced (x) y) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 130 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615";
        let status = "Name:\tpresenced\nVmRSS:\t   81920 kB\nThreads:\t9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            20000                20000                files\n";
        let text = render_process(stat, status, Some(17), max_open_files(limits), boot_time("cpu 1 2 3\nbtime 1700000000\n"));
        let value =
            |name: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
        assert_eq!(value("process_cpu_seconds_total"), 3.8, "utime + stime ticks: {text}");
        assert_eq!(value("process_resident_memory_bytes"), 81920.0 * 1024.0);
        assert_eq!(value("process_virtual_memory_bytes"), 987654321.0);
        assert_eq!(value("process_open_fds"), 17.0);
        assert_eq!(value("process_max_fds"), 20000.0);
        assert_eq!(value("process_start_time_seconds"), 1700000000.0 + 1234.56);
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        // The live process reads too (this test runs on Linux).
        let live = process_metrics();
        assert!(live.contains("process_resident_memory_bytes ") && live.contains("process_start_time_seconds "), "{live}");
    }

    #[test]
    fn every_metric_is_listed_once_with_help() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a metric is listed twice");
        for m in METRICS {
            assert!(!m.help.is_empty(), "{}", m.name);
            assert!(m.kind != Kind::Counter || m.name.ends_with("_total"), "{}: counters end in _total", m.name);
        }
    }

    /// Every metric the code records is in the table (so it is described, registered
    /// and documented).
    #[test]
    fn every_recorded_metric_is_in_the_table() {
        let listed: std::collections::HashSet<&str> = METRICS.iter().map(|m| m.name).collect();
        // At run time first: a test binary kept in a shared target dir may come from another
        // clone of the same sources.
        let root = std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from);
        let src = root.unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()).join("src");
        let mut missing = Vec::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for kind in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                    for part in text.split(kind).skip(1) {
                        let name = part.split('"').next().unwrap();
                        if !listed.contains(name) && !path.ends_with("telemetry.rs") {
                            missing.push(format!("{name} ({})", path.display()));
                        }
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in telemetry::METRICS: {missing:?}");
    }

    /// The cluster layer records under each backend's names: those are in the table too,
    /// in that backend's scope.
    #[test]
    fn every_backend_metric_name_is_in_the_table() {
        for (names, scope) in [(&crate::store::nats::NAMES, Scope::Nats), (&crate::store::redis::NAMES, Scope::Redis)] {
            let n = names;
            for name in [
                n.degraded,
                n.cas_writes,
                n.cas_conflicts,
                n.interest_users,
                n.interest_all,
                n.events_received,
                n.events_out_of_order,
                n.publish_timeouts,
                n.forwarded_heartbeats,
                n.janitor_claims,
                n.janitor_spared,
                n.interest_waits,
                n.lease_lost,
                n.lease_renewed_at,
                n.degraded_local_changes,
                n.repairs,
                n.made_up,
                n.adopted,
                n.directory_rewatch,
            ] {
                let m = METRICS.iter().find(|m| m.name == name);
                assert!(m.is_some_and(|m| m.scope == scope), "{name}: not in METRICS with scope {scope:?}");
            }
        }
    }
}
