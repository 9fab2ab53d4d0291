//! Connections to Redis: a single server, a Redis Cluster, or the master a set of
//! Sentinels names; TLS (`rediss://`, with a configured CA and client certificate), ACL
//! credentials, reconnection with exponential backoff, and the connection state for
//! `/health/redis` and the `redis_connected` gauge.
//!
//! Three kinds of connections, each multiplexed (many requests in flight on one socket):
//! commands (a pool of `redis.pool_size`), one for subscriptions (RESP3 push messages,
//! re-subscribed after a reconnect), and one per blocking reader (`XREAD BLOCK` would hold
//! up every request queued behind it on a shared connection).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisFuture, TlsCertificates, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::RedisConfig;

/// One multiplexed connection, to a server or to a cluster. Every request is bounded by
/// `timeout` (when set): a request waiting for a reconnection fails in time rather than
/// hanging, and counts as a failure for the circuit breaker.
#[derive(Clone)]
pub struct Conn {
    kind: Kind,
    timeout: Option<Duration>,
}

#[derive(Clone)]
enum Kind {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within redis.request_timeout"))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let timeout = self.timeout;
        let call = match &mut self.kind {
            Kind::Single(c) => c.req_packed_command(cmd),
            Kind::Cluster(c) => c.req_packed_command(cmd),
        };
        match timeout {
            Some(t) => Box::pin(async move { tokio::time::timeout(t, call).await.map_err(|_| timed_out())? }),
            None => call,
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        let timeout = self.timeout;
        let call = match &mut self.kind {
            Kind::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        };
        match timeout {
            Some(t) => Box::pin(async move { tokio::time::timeout(t, call).await.map_err(|_| timed_out())? }),
            None => call,
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Single(c) => c.get_db(),
            Kind::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Subscribes to a channel: sharded (`SSUBSCRIBE`) on a cluster, so a message only
    /// travels to the shard that owns the channel's slot and to its subscribers.
    pub async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        let call = async {
            match &mut self.kind {
                Kind::Single(c) => c.subscribe(channel).await,
                Kind::Cluster(c) => c.ssubscribe(channel).await,
            }
        };
        bounded(self.timeout, call).await
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        let call = async {
            match &mut self.kind {
                Kind::Single(c) => c.unsubscribe(channel).await,
                Kind::Cluster(c) => c.sunsubscribe(channel).await,
            }
        };
        bounded(self.timeout, call).await
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }
}

async fn bounded<T>(timeout: Option<Duration>, call: impl std::future::Future<Output = redis::RedisResult<T>>) -> redis::RedisResult<T> {
    match timeout {
        Some(t) => tokio::time::timeout(t, call).await.map_err(|_| timed_out())?,
        None => call.await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis: cannot read {what} {path}: {source}")]
    File { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("redis: cannot connect to {urls}: {message}")]
    Connect { urls: String, message: String },
}

/// How connections are made (kept to make more: the pool, subscriptions, blocking readers).
#[derive(Clone)]
pub struct Connector {
    cfg: RedisConfig,
    certs: Option<TlsCertificates>,
    /// A Sentinel deployment: the master's address as last resolved.
    master: Arc<RwLock<Option<redis::ConnectionInfo>>>,
}

fn connect_err(cfg: &RedisConfig, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Connect { urls: cfg.urls.join(","), message: e.to_string() }
}

impl Connector {
    pub fn new(cfg: &RedisConfig) -> Result<Connector, ConnectError> {
        let read = |what: &'static str, p: &std::path::Path| {
            std::fs::read(p).map_err(|source| ConnectError::File { what, path: p.to_path_buf(), source })
        };
        let root_cert = cfg.tls.ca_file.as_deref().map(|p| read("tls.ca_file", p)).transpose()?;
        let client_tls = match (&cfg.tls.cert_file, &cfg.tls.key_file) {
            (Some(c), Some(k)) => {
                Some(redis::ClientTlsConfig { client_cert: read("tls.cert_file", c)?, client_key: read("tls.key_file", k)? })
            }
            _ => None,
        };
        let certs = (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates { client_tls, root_cert });
        Ok(Connector { cfg: cfg.clone(), certs, master: Arc::new(RwLock::new(None)) })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Connection settings of a URL, with RESP3 (push messages) and the configured credentials.
    fn info(&self, url: &str) -> Result<redis::ConnectionInfo, ConnectError> {
        let info = url.into_connection_info().map_err(|e| connect_err(&self.cfg, format!("bad URL {url:?}: {e}")))?;
        Ok(self.with_credentials(info))
    }

    fn with_credentials(&self, info: redis::ConnectionInfo) -> redis::ConnectionInfo {
        let mut settings =
            info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3).set_lib_name("presenced", env!("CARGO_PKG_VERSION"));
        if !self.cfg.username.is_empty() {
            settings = settings.set_username(&self.cfg.username);
        }
        if !self.cfg.password.is_empty() {
            settings = settings.set_password(&self.cfg.password);
        }
        info.set_redis_settings(settings)
    }

    fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client, ConnectError> {
        let r = match &self.certs {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        };
        r.map_err(|e| connect_err(&self.cfg, e))
    }

    /// Asks the Sentinels which server is the master now.
    pub async fn resolve_master(&self) -> Result<redis::ConnectionInfo, ConnectError> {
        let sentinels: Vec<redis::ConnectionInfo> = self.cfg.urls.iter().map(|u| self.info(u)).collect::<Result<_, _>>()?;
        let mut last = String::from("no sentinel answered");
        for s in sentinels {
            // A Sentinel speaks RESP2 and needs no credentials of the data nodes.
            let plain = s.clone().set_redis_settings(redis::RedisConnectionInfo::default());
            let Ok(client) = self.client(plain) else { continue };
            let ask = async {
                let mut c = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.cfg.sentinel_master)
                    .query_async::<Option<(String, u16)>>(&mut c)
                    .await
            };
            match tokio::time::timeout(self.cfg.connect_timeout.0, ask).await {
                Ok(Ok(Some((host, port)))) => {
                    let addr = match s.addr() {
                        redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                            redis::ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() }
                        }
                        _ => redis::ConnectionAddr::Tcp(host, port),
                    };
                    let info = s.set_addr(addr);
                    *self.master.write() = Some(info.clone());
                    return Ok(info);
                }
                Ok(Ok(None)) => last = format!("sentinels do not know a master named {:?}", self.cfg.sentinel_master),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "a sentinel did not answer in time".into(),
            }
        }
        Err(connect_err(&self.cfg, last))
    }

    fn manager_config(&self, response_timeout: Option<Duration>) -> ConnectionManagerConfig {
        let max = self.cfg.max_reconnect_delay.0.max(Duration::from_millis(100));
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.cfg.connect_timeout.0))
            .set_response_timeout(response_timeout)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(max)
            .set_exponent_base(2.0)
            .set_number_of_retries(3)
    }

    /// One connection. `push`: receives pub/sub messages (and re-subscribes after a
    /// reconnect); `response_timeout`: `None` for blocking readers (their caller bounds
    /// each call).
    pub async fn connect(&self, push: Option<UnboundedSender<PushInfo>>, response_timeout: Option<Duration>) -> Result<Conn, ConnectError> {
        if self.cfg.cluster {
            let infos: Vec<redis::ConnectionInfo> = self.cfg.urls.iter().map(|u| self.info(u)).collect::<Result<_, _>>()?;
            let mut b = ClusterClientBuilder::new(infos)
                .use_protocol(ProtocolVersion::RESP3)
                .connection_timeout(self.cfg.connect_timeout.0)
                .retries(3)
                .max_retry_wait(self.cfg.max_reconnect_delay.0.as_millis() as u64);
            if let Some(t) = response_timeout {
                b = b.response_timeout(t);
            }
            if !self.cfg.username.is_empty() {
                b = b.username(&self.cfg.username);
            }
            if !self.cfg.password.is_empty() {
                b = b.password(&self.cfg.password);
            }
            if let Some(certs) = &self.certs {
                b = b.certs(certs.clone());
            }
            if let Some(tx) = push {
                b = b.push_sender(tx);
            }
            let client = b.build().map_err(|e| connect_err(&self.cfg, e))?;
            let conn = tokio::time::timeout(self.cfg.connect_timeout.0, client.get_async_connection())
                .await
                .map_err(|_| connect_err(&self.cfg, "timed out"))?
                .map_err(|e| connect_err(&self.cfg, e))?;
            return Ok(Conn { kind: Kind::Cluster(conn), timeout: response_timeout });
        }
        let info = if self.cfg.sentinel_master.is_empty() {
            self.info(&self.cfg.urls[0])?
        } else {
            let known = self.master.read().clone();
            match known {
                Some(m) => m,
                None => self.resolve_master().await?,
            }
        };
        let client = self.client(info)?;
        let mut mc = self.manager_config(response_timeout);
        if let Some(tx) = push {
            mc = mc.set_push_sender(tx).set_automatic_resubscription();
        }
        let conn = tokio::time::timeout(self.cfg.connect_timeout.0 * 2, client.get_connection_manager_with_config(mc))
            .await
            .map_err(|_| connect_err(&self.cfg, "timed out"))?
            .map_err(|e| connect_err(&self.cfg, e))?;
        Ok(Conn { kind: Kind::Single(conn), timeout: response_timeout })
    }
}

/// The command connections, used round robin, and the connection state.
pub struct Pool {
    conns: RwLock<Arc<Vec<Conn>>>,
    next: AtomicUsize,
    connected: AtomicBool,
    server: RwLock<String>,
}

impl Pool {
    pub async fn open(connector: &Connector) -> Result<Pool, ConnectError> {
        let mut conns = Vec::new();
        for _ in 0..connector.config().pool_size.max(1) {
            conns.push(connector.connect(None, Some(connector.config().request_timeout.0)).await?);
        }
        let pool = Pool {
            conns: RwLock::new(Arc::new(conns)),
            next: AtomicUsize::new(0),
            connected: AtomicBool::new(true),
            server: RwLock::new(String::new()),
        };
        pool.describe().await;
        metrics::gauge!("redis_connected").set(1.0);
        Ok(pool)
    }

    /// A connection (cheap clone) for one request.
    pub fn conn(&self) -> Conn {
        let conns = self.conns.read().clone();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % conns.len();
        conns[i].clone()
    }

    /// Replaces the connections (a Sentinel failover).
    pub fn replace(&self, conns: Vec<Conn>) {
        if !conns.is_empty() {
            *self.conns.write() = Arc::new(conns);
        }
    }

    /// Whether every command connection answers a PING (each reconnects on its own).
    pub async fn all_answer(&self) -> bool {
        let conns = self.conns.read().clone();
        for c in conns.iter() {
            let mut c = c.clone();
            if redis::cmd("PING").query_async::<Value>(&mut c).await.is_err() {
                return false;
            }
        }
        true
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn server(&self) -> String {
        self.server.read().clone()
    }

    /// Records whether the server answered; returns whether that changed.
    pub fn set_connected(&self, up: bool) -> bool {
        let was = self.connected.swap(up, Ordering::Relaxed);
        if was != up {
            metrics::gauge!("redis_connected").set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("redis: connected");
            } else {
                tracing::warn!("redis: server not answering; reconnecting");
            }
        }
        was != up
    }

    /// Reads the server's version and mode for `/health/redis`.
    pub async fn describe(&self) {
        let mut c = self.conn();
        let info: Result<String, _> = redis::cmd("INFO").arg("server").query_async(&mut c).await;
        if let Ok(text) = info {
            let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("?").to_string();
            *self.server.write() = format!("redis {} ({}, port {})", field("redis_version:"), field("redis_mode:"), field("tcp_port:"));
        }
    }
}
