//! The NATS connection for cluster mode (seed 002): several servers (a cluster), reconnects
//! with backoff and jitter, lifecycle logging, credentials from configuration (and so from
//! the environment), TLS, and the connection state for `/health/nats` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectOptions, Event};

use crate::config::NatsConfig;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats: cannot read credentials file {path}: {source}")]
    Credentials { path: std::path::PathBuf, source: std::io::Error },
    #[error("nats: cannot connect to {urls}: {message}")]
    Connect { urls: String, message: String },
}

/// A connected client plus what health reporting needs.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    urls: Arc<str>,
    /// Counts the reconnections (a connection after a disconnection).
    pub reconnects: tokio::sync::watch::Receiver<u64>,
}

/// Health of the connection, as `/health/nats` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NatsHealth {
    pub state: &'static str,
    pub connected: bool,
    pub server: String,
    pub urls: String,
}

/// Delay before reconnection attempt `attempt`: exponential from 50 ms up to `max`,
/// with ±25 % jitter so that many nodes do not reconnect in lockstep.
pub(super) fn backoff(attempt: usize, max: Duration) -> Duration {
    let base = Duration::from_millis(50).saturating_mul(1u32 << attempt.min(16) as u32).min(max);
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    base.mul_f64(jitter).min(max)
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Connected => "connected",
        State::Disconnected => "disconnected",
        State::Pending => "connecting",
    }
}

/// Logs a connection event, keeps `nats_connected`, and counts a connection that follows
/// a disconnection (`down`) in `reconnected`.
fn on_event(event: Event, reconnected: &tokio::sync::watch::Sender<u64>, down: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    let state = match &event {
        Event::Connected => {
            tracing::info!("nats: connected");
            if down.swap(false, Ordering::AcqRel) {
                reconnected.send_modify(|n| *n += 1);
            }
            1.0
        }
        Event::Disconnected => {
            tracing::warn!("nats: disconnected; reconnecting");
            down.store(true, Ordering::Release);
            0.0
        }
        Event::LameDuckMode => {
            tracing::warn!("nats: server entering lame duck mode");
            return;
        }
        Event::SlowConsumer(sid) => {
            tracing::warn!(sid, "nats: slow consumer");
            metrics::counter!("nats_slow_consumer_total").increment(1);
            return;
        }
        other => {
            tracing::warn!(event = %other, "nats: event");
            return;
        }
    };
    metrics::gauge!("nats_connected").set(state);
}

impl Nats {
    /// Connects with the configured servers, credentials and TLS.
    pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<Nats, NatsError> {
        let max_delay = cfg.max_reconnect_delay.0;
        let (reconnected, reconnects) = tokio::sync::watch::channel(0u64);
        let reconnected = Arc::new(reconnected);
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = ConnectOptions::new()
            .name(name)
            .connection_timeout(cfg.connect_timeout.0)
            .reconnect_delay_callback(move |attempt| backoff(attempt, max_delay))
            .event_callback(move |event| {
                let (reconnected, down) = (reconnected.clone(), down.clone());
                async move { on_event(event, &reconnected, &down) }
            });
        if !cfg.user.is_empty() || !cfg.password.is_empty() {
            opts = opts.user_and_password(cfg.user.clone(), cfg.password.clone());
        } else if !cfg.token.is_empty() {
            opts = opts.token(cfg.token.clone());
        } else if !cfg.nkey_seed.is_empty() {
            opts = opts.nkey(cfg.nkey_seed.clone());
        } else if let Some(path) = &cfg.credentials_file {
            opts = opts.credentials_file(path).await.map_err(|source| NatsError::Credentials { path: path.clone(), source })?;
        }
        if cfg.tls.required {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = &cfg.tls.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let urls = cfg.urls.join(",");
        let addrs: Vec<async_nats::ServerAddr> = cfg
            .urls
            .iter()
            .map(|u| {
                u.parse().map_err(|e: std::io::Error| NatsError::Connect { urls: urls.clone(), message: format!("bad URL {u:?}: {e}") })
            })
            .collect::<Result<_, _>>()?;
        let client = opts.connect(addrs).await.map_err(|e| NatsError::Connect { urls: urls.clone(), message: e.to_string() })?;
        metrics::gauge!("nats_connected").set(1.0);
        Ok(Nats { client, urls: Arc::from(urls), reconnects })
    }

    pub fn health(&self) -> NatsHealth {
        let state = self.client.connection_state();
        let info = self.client.server_info();
        NatsHealth {
            state: state_name(&state),
            connected: state == State::Connected,
            server: format!("{} ({} {})", info.server_name, info.host, info.version),
            urls: self.urls.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(5);
        assert!(backoff(0, max) <= Duration::from_millis(63));
        assert!(backoff(3, max) >= Duration::from_millis(300));
        for a in [10, 20, 1000] {
            let d = backoff(a, max);
            assert!(d <= max && d >= Duration::from_millis(3750), "{d:?}");
        }
        let samples: std::collections::HashSet<u128> = (0..20).map(|_| backoff(4, max).as_micros()).collect();
        assert!(samples.len() > 1, "jitter spreads reconnects");
    }
}
