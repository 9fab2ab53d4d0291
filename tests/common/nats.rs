//! A real `nats-server` (Debian's package; `.ci/run` installs it) with JetStream on an
//! ephemeral loopback port, killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The JetStream file storage every test server offers. Unset, nats-server sizes it at 75 %
/// of the disk's free space, and on a machine whose disk the build has nearly filled that
/// is less than the 1 GiB `PRESENCE_EVENTS` reserves: every node then fails to start (a CI
/// run failed so). The tests write a few megabytes.
const STORE_LIMIT: &str = "max_file_store: 8GB";

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nats-server not found: install Debian's nats-server (.ci/run does)");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl NatsServer {
    /// Starts a server; `extra` is appended to its config (e.g. an `authorization` block).
    pub fn start(extra: &str) -> NatsServer {
        Self::start_with("", extra)
    }

    /// As [`NatsServer::start`], with `jetstream` lines (e.g. `domain: hub`). A port taken
    /// between choosing it and binding it (other tests run in parallel) is chosen again.
    pub fn start_with(jetstream: &str, extra: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(
                &conf,
                format!(
                    "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\"\n{}\n{jetstream} }}\n{extra}\n",
                    store.display(),
                    if jetstream.contains("max_file_store") { "" } else { STORE_LIMIT }
                ),
            )
            .unwrap();
            let mut s = NatsServer { child: None, port, conf: conf.clone(), _dir: tempfile::tempdir().unwrap() };
            if s.spawn_and_wait() {
                s._dir = dir;
                return s;
            }
        }
        panic!("nats-server did not start (5 attempts)");
    }

    /// Where its JetStream store is (to look at what it wrote on disk).
    pub fn store_dir(&self) -> PathBuf {
        self.conf.with_file_name("js")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts on the same port with the same JetStream store.
    pub fn restart(&mut self) {
        assert!(self.spawn_and_wait(), "nats-server did not listen on {}", self.port);
    }

    /// Starts the process and waits until it listens; `false` if it exited first (its
    /// port was taken).
    fn spawn_and_wait(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "nats-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        // Something else may own the port: ours must still be running.
        std::thread::sleep(Duration::from_millis(30));
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        self.child = Some(child);
        true
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port (for a leafnode listener).
pub fn port() -> u16 {
    free_port()
}

/// Waits (at most 15 s) until core messages published on `from` reach a subscriber on
/// `to`: the leafnode link between the two servers is up.
pub async fn linked(from: &NatsServer, to: &NatsServer) {
    use futures_util::StreamExt;
    let t = async_nats::connect(to.url()).await.unwrap();
    let f = async_nats::connect(from.url()).await.unwrap();
    let mut sub = t.subscribe("link.check").await.unwrap();
    t.flush().await.unwrap();
    let start = Instant::now();
    loop {
        f.publish("link.check", "x".into()).await.unwrap();
        f.flush().await.unwrap();
        if tokio::time::timeout(Duration::from_millis(200), sub.next()).await.is_ok() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "leaf link never came up");
    }
}
