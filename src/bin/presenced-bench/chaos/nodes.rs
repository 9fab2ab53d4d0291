//! The engine (nats-server or redis-server) and the presenced nodes of a chaos run: start,
//! signal, restart, and the proxy that cuts a node off its engine.

use super::*;

pub(super) fn redis_server(dir: &Path) -> Res<(Proc, u16)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server (apt-get install redis-server): {e}"))?;
    Ok((Proc(child), port))
}

pub(super) fn start_engine(engine: &str, dir: &Path) -> Res<(Proc, u16)> {
    match engine {
        "nats" => nats_server(dir, "engine", "jetstream { store_dir: \"@STORE@\", max_file_store: 8GB }\n"),
        _ => redis_server(dir),
    }
}

pub(super) struct Settings {
    pub(super) engine: String,
    pub(super) grace_secs: u64,
    pub(super) lease_secs: u64,
    pub(super) session_ttl_secs: u64,
    pub(super) heartbeat_secs: u64,
}

pub(super) fn start_node(dir: &Path, node: &Node, s: &Settings) -> Res<Proc> {
    let mut cmd = Command::new(sibling("presenced")?);
    let engine_url = match s.engine.as_str() {
        "nats" => ("PRESENCE_NATS__URLS", format!("[\"nats://127.0.0.1:{}\"]", node.proxy.port)),
        _ => ("PRESENCE_REDIS__URLS", format!("[\"redis://127.0.0.1:{}\"]", node.proxy.port)),
    };
    cmd.arg("serve")
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", node.http.to_string())
        .env("PRESENCE_SERVICE__GRPC_PORT", node.grpc.to_string())
        .env("PRESENCE_SERVICE__NODE_ID", &node.id)
        .env("PRESENCE_SERVICE__DATA_DIR", dir.join(&node.id))
        .env("PRESENCE_SERVICE__SHUTDOWN_GRACE", "5s")
        .env("PRESENCE_STORE__BACKEND", &s.engine)
        .env(engine_url.0, engine_url.1)
        .env("PRESENCE_NATS__REQUEST_TIMEOUT", "1s")
        .env("PRESENCE_REDIS__REQUEST_TIMEOUT", "1s")
        .env("PRESENCE_PRESENCE__NODE_LEASE_TTL", format!("{}s", s.lease_secs))
        .env("PRESENCE_PRESENCE__SESSION_TTL", format!("{}s", s.session_ttl_secs))
        .env("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", format!("{}s", s.heartbeat_secs))
        .env("PRESENCE_PRESENCE__OFFLINE_GRACE", format!("{}s", s.grace_secs))
        .envs(crate::BENCH_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // CHAOS_LOGS=dir keeps each node's log (at debug level) there, one file per start.
    if let Some(logs) = std::env::var_os("CHAOS_LOGS") {
        let path = Path::new(&logs).join(format!(
            "{}-{}.log",
            node.id,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
        ));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        cmd.env("PRESENCE_LOGGING__LEVEL", "info,presenced=debug").stderr(file);
    }
    let child = cmd.spawn().map_err(|e| format!("presenced: {e}"))?;
    Ok(Proc(child))
}

/// Starts a node again on its ports (after a stop or a kill) and waits until it listens;
/// a start that exits before it listens is tried again, up to three times.
pub(super) async fn restart_node(dir: &Path, node: &mut Node, s: &Settings) -> Res<()> {
    for _ in 0..3 {
        let mut p = start_node(dir, node, s)?;
        let up = crate::cluster::wait_port_unless_exited(node.http, Some(&mut p)).await?;
        node.proc = Some(p);
        if up {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("node {} did not listen again on :{}", node.id, node.http))
}

pub(super) fn signal(p: &Proc, sig: &str) {
    let _ = Command::new("kill").args([sig, &p.0.id().to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Waits (at most `limit`) for a process to exit.
pub(super) async fn exited(p: &mut Proc, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if matches!(p.0.try_wait(), Ok(Some(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A TCP proxy from a port of its own to the engine, which the bench can cut (every link
/// dropped, new ones refused) and heal: a node's network partition.
pub(super) struct Proxy {
    pub(super) port: u16,
    pub(super) cut: Arc<AtomicBool>,
    pub(super) links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub(super) accept: JoinHandle<()>,
}

impl Proxy {
    pub(super) async fn start(target: u16) -> Res<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, l) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut links = l.lock();
                links.retain(|h| !h.is_finished());
                links.push(h);
            }
        });
        Ok(Proxy { port, cut, links, accept })
    }

    pub(super) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.links.lock().drain(..) {
            h.abort();
        }
    }

    pub(super) fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.links.lock().drain(..) {
            h.abort();
        }
    }
}
