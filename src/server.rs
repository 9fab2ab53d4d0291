//! Wiring: build the store, auth and service from a [`Config`], then serve HTTP on a
//! listener until a shutdown future resolves (mini-redis `server::run` style: the caller
//! owns the listener and the shutdown signal, so tests bind `127.0.0.1:0`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;

use crate::auth::{AuthSetupError, Authenticator};
use crate::bus::EventBus;
use crate::clock::{Clock, SystemClock};
use crate::config::{Backend, Config, NodeType};
use crate::directory::Directory;
use crate::http::{self, Http};
use crate::listener::tls::Tls;
use crate::service::Service;
use crate::store::cluster::{ClusterOptions, ClusterStore};
use crate::store::memory::persist::PersistError;
use crate::store::memory::{MemoryConfig, MemoryStore};
use crate::store::Store;
use crate::ws::hub::{Hub, HubLimits};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("store.backend {0}: {1}")]
    Cluster(&'static str, crate::store::StoreError),
    #[error("{0}")]
    Embedded(String),
    #[error("events.sinks: {0}")]
    Sinks(String),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::listener::tls::TlsError),
    #[error(transparent)]
    Key(#[from] crate::at_rest::KeyError),
    #[error("{0}")]
    Audit(String),
}

impl StartError {
    /// NATS or Redis did not answer: worth waiting for (a compose file or a cluster often
    /// starts presenced first), unlike a configuration mistake.
    pub fn store_unreachable(&self) -> bool {
        matches!(self, StartError::Cluster(_, crate::store::StoreError::Unreachable(_)))
    }
}

/// How long the first retry of a store that is down at start waits, doubling up to
/// [`START_RETRY_MAX`].
const START_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
const START_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Cluster mode with the store down at start (`store.fail_fast: false`): serves 503 on
/// `listener` (`/health` included, so a readiness probe or a load balancer keeps traffic
/// away) while it builds the app again with backoff; returns it once the store answers,
/// or `None` if `shutdown` resolved first. Another error than an unreachable store ends
/// the wait.
pub async fn wait_for_store(
    config: &Config,
    listener: &std::net::TcpListener,
    first: StartError,
    mut shutdown: std::pin::Pin<&mut (dyn Future<Output = ()> + Send)>,
) -> Result<Option<App>, StartError> {
    let starting = TcpListener::from_std(listener.try_clone()?)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let backend = match config.store.backend {
        Backend::Memory => "memory",
        Backend::Nats => "nats",
        Backend::Redis => "redis",
    };
    let router = starting_router(backend);
    // The same server as the node's own (header-read and idle timeouts included).
    let timeouts = crate::listener::Timeouts::of(&config.limits);
    let tls = Tls::load(&config.service.tls)?;
    let mut server = tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        crate::listener::serve_http(starting, router, timeouts, tls, stopped).await
    });
    let end = |app: Result<Option<App>, StartError>| async move {
        let _ = stop.send(());
        // A client holding a request open (half a request head) must not hold up the
        // start: what has not finished in a second is cut.
        if tokio::time::timeout(std::time::Duration::from_secs(1), &mut server).await.is_err() {
            server.abort();
        }
        app
    };
    tracing::warn!(error = %first, retry_in = ?START_RETRY_FIRST, "the store cannot be reached; answering 503 and retrying (store.fail_fast: false)");
    let mut last = first.to_string();
    let mut delay = START_RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.as_mut() => return end(Ok(None)).await,
        }
        attempt += 1;
        let built = tokio::select! {
            built = App::build(config.clone()) => built,
            _ = shutdown.as_mut() => return end(Ok(None)).await,
        };
        match built {
            Ok(app) => {
                tracing::info!(attempt, "the store answers; starting");
                return end(Ok(Some(app))).await;
            }
            Err(e) if e.store_unreachable() => {
                delay = (delay * 2).min(START_RETRY_MAX);
                let message = e.to_string();
                if last == message {
                    tracing::info!(attempt, retry_in = ?delay, "the store still cannot be reached");
                } else {
                    tracing::warn!(attempt, error = %message, retry_in = ?delay, "the store still cannot be reached");
                    last = message;
                }
            }
            Err(e) => return end(Err(e)).await,
        }
    }
}

/// What a node waiting for its store answers: 503 `unavailable`. Which store, not why:
/// the reason (URLs, hosts) is for the log, not for anyone who can reach the port.
fn starting_router(backend: &'static str) -> axum::Router {
    let answer = move || async move {
        let detail = format!("starting: waiting for the store (store.backend {backend}); retrying");
        // Not through `http::error`, which logs each 503: the wait logs itself, and a
        // readiness probe asks every few seconds.
        let body = http::envelope::error_body(&crate::error::ApiError::Unavailable(detail));
        http::json_response(axum::http::StatusCode::SERVICE_UNAVAILABLE, body)
    };
    axum::Router::new().fallback(answer)
}

/// A cluster node's options from the configuration.
fn cluster_options(config: &Config, request_timeout: std::time::Duration) -> ClusterOptions {
    ClusterOptions {
        node_id: config.service.node_id.clone(),
        tick_ms: config.store.tick.as_millis_i64().max(1),
        lease_ttl_ms: config.presence.node_lease_ttl.as_millis_i64(),
        last_seen_interval_ms: config.presence.last_seen_interval.as_millis_i64(),
        offline_grace_ms: config.presence.grace_ms(),
        forget_after_ms: Some(config.presence.forget_after.as_millis_i64()).filter(|f| *f > 0),
        cache_max_cost: config.cache.max_cost,
        kv_timeout: request_timeout.max(std::time::Duration::from_millis(100)),
        interest_all_above: config.store.interest_all_above,
        watch_writes: config.cache.watch_writes,
    }
}

/// A built node, ready to serve.
pub struct App {
    pub config: Config,
    pub svc: Arc<Service>,
    /// This node's WebSocket connections.
    pub hub: Arc<Hub>,
    pub backend: &'static str,
    /// `serve --dev`: development helpers (`GET /dev/token`).
    pub dev: bool,
    /// Cluster mode's store (for `/health/nats`, `/health/redis`).
    pub cluster: Option<ClusterStore>,
    /// The supervised local nats-server (`nats.embedded`).
    pub embedded: Option<Arc<crate::store::nats::embedded::EmbeddedServer>>,
    /// `events.sinks`, running.
    pub sinks: Option<Arc<crate::sinks::Sinks>>,
    /// Users online and events per second over the last hour (the operator view).
    pub activity: Arc<crate::service::activity::Activity>,
    /// `service.tls`: the certificates both ports serve, reloaded when they change.
    pub tls: Option<Arc<Tls>>,
}

impl App {
    /// Opens the configured store and sets up auth. Must run inside a tokio runtime.
    pub async fn build(config: Config) -> Result<App, StartError> {
        // The recorder first: values recorded before it is installed are lost.
        crate::telemetry::register(config.store.backend);
        let bus = EventBus::new(config.limits.event_bus_capacity);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let sealer = crate::at_rest::Sealer::of(&config.store)?;
        let store: Arc<dyn Store> = match config.store.backend {
            Backend::Memory => {
                let mem = MemoryStore::open(
                    MemoryConfig {
                        node_id: Arc::from(config.service.node_id.as_str()),
                        data_dir: config.store.persist.then(|| config.service.data_dir.clone()),
                        shards: config.store.shards,
                        tick_ms: config.store.tick.as_millis_i64().max(1),
                        forget_after_ms: Some(config.presence.forget_after.as_millis_i64()).filter(|f| *f > 0),
                        start_fresh: config.store.start_fresh,
                        sealer,
                    },
                    clock.clone(),
                    bus.clone(),
                )?;
                mem.start();
                Arc::new(mem)
            }
            Backend::Nats => {
                let mut nats_cfg = config.nats.clone();
                let embedded = if config.nats.embedded {
                    let e = crate::store::nats::embedded::EmbeddedServer::start(&config.nats)
                        .await
                        .map_err(|e| StartError::Embedded(e.to_string()))?;
                    nats_cfg.urls = vec![e.url()];
                    Some(Arc::new(e))
                } else {
                    None
                };
                let nats = crate::store::nats::open(
                    &nats_cfg,
                    cluster_options(&config, config.nats.request_timeout.0),
                    clock.clone(),
                    bus.clone(),
                )
                .await
                .map_err(|e| StartError::Cluster("nats", e))?;
                nats.start();
                let mut app = App::with_store(config, Arc::new(nats.clone()), bus, clock).await?;
                app.cluster = Some(nats);
                app.embedded = embedded;
                return Ok(app);
            }
            Backend::Redis => {
                let opts = cluster_options(&config, config.redis.request_timeout.0);
                let redis = crate::store::redis::open(&config.redis, opts, clock.clone(), bus.clone())
                    .await
                    .map_err(|e| StartError::Cluster("redis", e))?;
                redis.start();
                let mut app = App::with_store(config, Arc::new(redis.clone()), bus, clock).await?;
                app.cluster = Some(redis);
                return Ok(app);
            }
        };
        App::with_store(config, store, bus, clock).await
    }

    /// Builds around a given store (used by tests and by other backends' wiring).
    pub async fn with_store(config: Config, store: Arc<dyn Store>, bus: EventBus, clock: Arc<dyn Clock>) -> Result<App, StartError> {
        crate::telemetry::register(config.store.backend);
        let tls = Tls::load(&config.service.tls)?;
        if let Some(t) = &tls {
            t.watch(config.service.tls.reload_interval.0);
        }
        let auth = Arc::new(Authenticator::from_config(&config.auth, &config.service.data_dir)?);
        // Before the service exists: the sinks' dispatchers subscribe to the bus here.
        let sinks = crate::sinks::Sinks::start(&config, &bus, crate::at_rest::Sealer::of(&config.store)?).map_err(StartError::Sinks)?;
        // Watch first, then load: a change made meanwhile is applied twice, never missed.
        let changes = store.watch_directory().await;
        let directory = match Directory::load(&*store).await {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::warn!(error = %e, "could not load contacts, privacy settings and conversations; starting empty");
                Arc::new(Directory::default())
            }
        };
        let mut svc = Service::new(&config, store, directory, bus, auth, clock);
        svc.audit = crate::audit::Audit::open(config.logging.audit_file.as_deref(), &config.service.node_id).map_err(StartError::Audit)?;
        svc.audit.reopen_on_sighup();
        let svc = Arc::new(svc);
        let hub = Arc::new(Hub::new(svc.clone(), HubLimits::of(&config.limits, &config.presence)));
        hub.start();
        if let Some(rx) = changes {
            tokio::spawn(follow_directory(Arc::downgrade(&svc), rx));
        }
        let backend = match config.store.backend {
            Backend::Memory => "memory",
            Backend::Nats => "nats",
            Backend::Redis => "redis",
        };
        let activity = crate::service::activity::Activity::start(&svc);
        Ok(App { config, svc, hub, backend, dev: false, cluster: None, embedded: None, sinks, activity, tls })
    }

    /// Everything served on the HTTP port: the HTTP API and `/ws`.
    pub fn router(&self) -> axum::Router {
        let state = Http {
            svc: self.svc.clone(),
            metrics: crate::telemetry::metrics_handle(),
            started: Instant::now(),
            request_metrics: Default::default(),
            dev: self.dev,
            cluster: self.cluster.clone(),
            sinks: self.sinks.clone(),
            activity: self.activity.clone(),
            access_log: self.config.logging.access_log,
            backend: self.backend,
            cache_max_cost: self.config.cache.max_cost,
            node_type: match self.config.service.node_type {
                NodeType::Center => "center",
                NodeType::Leaf => "leaf",
            },
        };
        let ws = crate::ws::router(crate::ws::Ws { svc: self.svc.clone(), hub: self.hub.clone() });
        http::layered(http::routes(state.clone()).merge(ws), state)
    }

    /// Serves HTTP (and WebSocket) only; see [`App::serve_all`].
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
        self.serve_all(listener, None, shutdown).await
    }

    /// Serves HTTP on `http` and gRPC on `grpc` until `shutdown` resolves, then stops
    /// accepting, lets in-flight requests finish (at most `service.shutdown_grace`), closes
    /// WebSockets and gRPC streams, and flushes the store.
    pub async fn serve_all(
        self,
        listener: TcpListener,
        grpc: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let grpc_task = grpc.map(|l| {
            let svc = self.svc.clone();
            let tls = self.tls.clone();
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = crate::grpc::serve(svc, l, tls, stop).await {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            })
        });
        let grace = self.config.service.shutdown_grace.0;
        let (fired_tx, mut fired_rx) = tokio::sync::watch::channel(false);
        let hub = self.hub.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests and closing WebSockets");
            hub.close_all();
            let _ = fired_tx.send(true);
        };
        // TCP_NODELAY (multi-segment answers never wait for a delayed ACK), header-read and
        // idle timeouts, ConnectInfo for the per-IP limit on /ws.
        let timeouts = crate::listener::Timeouts::of(&self.config.limits);
        let server = crate::listener::serve_http(listener, self.router(), timeouts, self.tls.clone(), signal);
        let deadline = async move {
            let _ = fired_rx.wait_for(|f| *f).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            r = server => r?,
            _ = deadline => tracing::warn!(?grace, "shutdown grace period over; closing remaining connections"),
        }
        // WebSocket tasks outlive their HTTP connection: let them end their sessions.
        let drained = tokio::time::timeout(grace, async {
            while self.hub.connection_count() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(left = self.hub.connection_count(), "WebSocket connections still open at shutdown");
        }
        if let Some(t) = grpc_task {
            if tokio::time::timeout(grace, t).await.is_err() {
                tracing::warn!("gRPC server still draining at shutdown");
            }
        }
        // The embedded store ends its sessions now (sinks hear each user's offline); a
        // cluster node hands them over to the others for the rest of the grace.
        self.svc.store.drain().await;
        self.svc.store.shutdown().await;
        let audit = self.svc.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.close()).await;
        if let Some(s) = &self.sinks {
            s.settle(grace.min(std::time::Duration::from_secs(2))).await;
            s.shutdown().await;
        }
        if let Some(e) = &self.embedded {
            e.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// `presenced rekey`: rewrites `presence.redb` and `sinks.redb` under `service.data_dir`
/// (those that exist) from the key the configuration names (or plain text) to `to`
/// (`None`: plain text), each into a fresh file renamed over the old one. The node must
/// be stopped (the files are locked while it runs). Returns one line per file.
pub fn rekey(config: &Config, to: Option<&crate::at_rest::Sealer>) -> Result<Vec<String>, String> {
    use crate::at_rest::Sealing;
    type Reseal = fn(&std::path::Path, Option<&crate::at_rest::Sealer>, Option<&crate::at_rest::Sealer>) -> Result<usize, String>;
    let from = crate::at_rest::Sealer::of(&config.store).map_err(|e| e.to_string())?;
    let files: [(&str, Reseal); 2] =
        [("presence.redb", crate::store::memory::persist::reseal), ("sinks.redb", crate::sinks::outbox::reseal)];
    let mut done = Vec::new();
    for (name, reseal) in files {
        let path = config.service.data_dir.join(name);
        if !path.exists() {
            continue;
        }
        let current = {
            let db = redb::Database::open(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => format!("{}: in use by a running presenced: stop it first", path.display()),
                e => format!("{}: {e}", path.display()),
            })?;
            let on_new = crate::at_rest::sealing(&db, to).map_err(|e| format!("{}: {e}", path.display()))?;
            if matches!((&on_new, to), (Sealing::Sealed, Some(_)) | (Sealing::Plain, None)) {
                // Already done (a run that stopped after this file): nothing to do.
                let now = to.map_or("plain text".to_string(), |s| format!("on key {}", s.fingerprint));
                done.push(format!("{}: already {now}", path.display()));
                continue;
            }
            match crate::at_rest::sealing(&db, from.as_deref()).map_err(|e| format!("{}: {e}", path.display()))? {
                Sealing::Plain | Sealing::ToSeal => None,
                Sealing::Sealed => from.as_deref(),
                Sealing::KeyMissing => {
                    return Err(format!("{} is encrypted: configure its current key (store.encryption_key_file)", path.display()))
                }
                Sealing::WrongKey => {
                    return Err(format!("the configured key does not open {}: configure the key it was written with", path.display()))
                }
            }
        };
        let records = reseal(&path, current, to).map_err(|e| format!("{}: {e}", path.display()))?;
        let now = to.map_or("plain text".to_string(), |s| format!("encrypted with key {}", s.fingerprint));
        done.push(format!("{}: {records} records, now {now}", path.display()));
    }
    Ok(done)
}

/// Applies directory rows other nodes wrote, and puts what they changed on the bus (the
/// hub tells the local watchers concerned).
async fn follow_directory(svc: std::sync::Weak<Service>, mut rx: tokio::sync::mpsc::Receiver<crate::store::DirRow>) {
    while let Some((table, key, value)) = rx.recv().await {
        let Some(svc) = svc.upgrade() else { return };
        if let Some(change) = svc.directory.apply_remote_row(table, &key, value.as_deref()).await {
            svc.bus.publish_directory(change);
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (inside
/// a runtime), not when first polled: a SIGTERM while the node is still starting (waiting
/// for its store) is a clean stop, not a kill.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let (term, int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
        async move {
            async fn recv(s: Option<Signal>) {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = recv(term) => {},
                _ = recv(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
