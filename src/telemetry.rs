//! Logs (`tracing`, text or JSON) and metrics (Prometheus text at `/metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};
use crate::store::StoreStats;

/// Installs the global log subscriber. A second call is a no-op.
pub fn init_logging(cfg: &LoggingConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cfg.level).map_err(|e| format!("logging.level: invalid filter {:?}: {e}", cfg.level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
            let builder = PrometheusBuilder::new();
            let builder =
                builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets).unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    h
                }
                // Another recorder is installed (embedding applications): render ours anyway.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("presence_updates_total", "Accepted presence writes (status set or cleared).");
    describe_counter!("presence_events_total", "Presence transitions published on the event bus, by kind.");
    describe_gauge!("presence_sessions", "Live device sessions on this node.");
    describe_gauge!("presence_online_users", "Users with at least one live device session.");
    describe_gauge!("presence_known_users", "Users held by the store.");
    describe_counter!("presence_cache_hits_total", "Presence reads that found the user.");
    describe_counter!("presence_cache_misses_total", "Presence reads of users never seen.");
    describe_counter!("presence_rate_limited_total", "Requests refused by a rate limit.");
    describe_counter!("presence_persist_commits_total", "Commits of the embedded store's database.");
    describe_counter!("presence_persist_failures_total", "Failed commits of the embedded store's database.");
    describe_histogram!("http_request_duration_seconds", Unit::Seconds, "HTTP request latency by route, method and status.");
}

/// Copies the store's counters into gauges (called at scrape time).
pub fn record_store_stats(s: &StoreStats) {
    metrics::gauge!("presence_sessions").set(s.sessions as f64);
    metrics::gauge!("presence_online_users").set(s.online_users as f64);
    metrics::gauge!("presence_known_users").set(s.users as f64);
    metrics::counter!("presence_cache_hits_total").absolute(s.hits);
    metrics::counter!("presence_cache_misses_total").absolute(s.misses);
}
