//! `nats.embedded: true` (seed 003 §9.1): the Rust counterpart of the seed's embedded Go
//! server. presenced starts a local `nats-server` child with JetStream in `nats.data_dir`,
//! restarts it (with backoff) if it dies, and stops it on shutdown.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NatsConfig;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("nats.embedded: the nats-server binary {0:?} was not found (install nats-server, e.g. `apt-get install nats-server`, or set nats.server_binary)")]
    Missing(PathBuf),
    #[error("nats.embedded: cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: std::io::Error },
    #[error("nats.embedded: cannot start {binary:?}: {message}")]
    Start { binary: PathBuf, message: String },
}

struct Shared {
    stop: watch::Sender<bool>,
    pid: AtomicU32,
    restarts: AtomicU64,
}

/// A supervised `nats-server` child process.
pub struct EmbeddedServer {
    shared: Arc<Shared>,
    listen: String,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Finds the executable: as configured (a path, or a name on PATH), then Debian's /usr/sbin.
fn resolve(binary: &Path) -> Result<PathBuf, EmbeddedError> {
    if binary.components().count() > 1 {
        return if binary.exists() { Ok(binary.to_path_buf()) } else { Err(EmbeddedError::Missing(binary.to_path_buf())) };
    }
    let name = binary.as_os_str();
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join(name));
    on_path
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].iter().map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
        .ok_or_else(|| EmbeddedError::Missing(binary.to_path_buf()))
}

fn config_text(cfg: &NatsConfig) -> String {
    let domain = if cfg.jetstream.domain.is_empty() { String::new() } else { format!("  domain: {}\n", cfg.jetstream.domain) };
    format!(
        "# Written by presenced (nats.embedded); changes are overwritten at start.\nlisten: {}\njetstream {{\n  store_dir: \"{}\"\n  max_memory_store: {}\n  max_file_store: {}\n{domain}}}\n",
        cfg.embedded_listen,
        cfg.data_dir.join("jetstream").display(),
        cfg.jetstream.max_memory.0,
        cfg.jetstream.max_file.0,
    )
}

async fn spawn(binary: &Path, conf: &Path, log: &Path, listen: &str) -> Result<Child, EmbeddedError> {
    let err = |message: String| EmbeddedError::Start { binary: binary.to_path_buf(), message };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| EmbeddedError::Prepare { path: log.to_path_buf(), source })?;
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            return Err(err(format!("exited with {status}: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "))));
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill().await;
            return Err(err(format!("not listening on {listen} after 15s (see {})", log.display())));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl EmbeddedServer {
    /// Starts the server and its supervisor; returns once it accepts connections.
    pub async fn start(cfg: &NatsConfig) -> Result<EmbeddedServer, EmbeddedError> {
        let binary = resolve(&cfg.server_binary)?;
        let prepare = |path: &Path, source| EmbeddedError::Prepare { path: path.to_path_buf(), source };
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| prepare(&cfg.data_dir, e))?;
        let conf = cfg.data_dir.join("nats-server.conf");
        let log = cfg.data_dir.join("nats-server.log");
        std::fs::write(&conf, config_text(cfg)).map_err(|e| prepare(&conf, e))?;
        let listen = cfg.embedded_listen.clone();
        let child = spawn(&binary, &conf, &log, &listen).await?;
        tracing::info!(listen = %listen, binary = %binary.display(), "embedded nats-server started");
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::new(Shared { stop, pid: AtomicU32::new(child.id().unwrap_or(0)), restarts: AtomicU64::new(0) });
        let sup = shared.clone();
        let addr = listen.clone();
        let task = tokio::spawn(async move {
            let mut child = child;
            loop {
                tokio::select! {
                    _ = stopped.changed() => {
                        let _ = child.kill().await;
                        return;
                    }
                    status = child.wait() => {
                        tracing::error!(status = ?status, "embedded nats-server exited; restarting");
                        metrics::counter!("nats_embedded_restarts_total").increment(1);
                        let mut attempt = 0;
                        loop {
                            tokio::time::sleep(super::conn::backoff(attempt, Duration::from_secs(5))).await;
                            if *stopped.borrow() {
                                return;
                            }
                            match spawn(&binary, &conf, &log, &addr).await {
                                Ok(c) => {
                                    sup.pid.store(c.id().unwrap_or(0), Ordering::Relaxed);
                                    sup.restarts.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!("embedded nats-server restarted");
                                    child = c;
                                    break;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "embedded nats-server did not come back; retrying");
                                    attempt += 1;
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok(EmbeddedServer { shared, listen, task: Mutex::new(Some(task)) })
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.listen)
    }

    /// The current server process id (changes when it is restarted).
    pub fn pid(&self) -> u32 {
        self.shared.pid.load(Ordering::Relaxed)
    }

    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Stops the server (and its supervisor). Idempotent.
    pub async fn stop(&self) {
        let _ = self.shared.stop.send(true);
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for EmbeddedServer {
    /// A dropped handle must not leave a detached supervisor (and server) running.
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_carries_listen_store_and_limits() {
        let mut cfg = NatsConfig { data_dir: PathBuf::from("/var/lib/p"), embedded_listen: "127.0.0.1:4333".into(), ..Default::default() };
        cfg.jetstream.domain = "hub".into();
        let t = config_text(&cfg);
        assert!(t.contains("listen: 127.0.0.1:4333"), "{t}");
        assert!(t.contains("store_dir: \"/var/lib/p/jetstream\""), "{t}");
        assert!(t.contains("max_file_store: 10737418240"), "{t}");
        assert!(t.contains("domain: hub"), "{t}");
    }

    #[test]
    fn a_missing_binary_is_named() {
        let e = resolve(Path::new("/nonexistent/nats-server")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/nats-server") && e.contains("apt-get install nats-server"), "{e}");
        assert!(resolve(Path::new("surely-not-a-nats-server-binary")).is_err());
    }
}
