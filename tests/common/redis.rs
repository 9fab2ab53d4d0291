//! Real Redis servers (Debian's `redis-server` 7.0; `.ci/run` installs it) on ephemeral
//! loopback ports, without persistence, killed when dropped: one server, or a Redis
//! Cluster of three masters made with `redis-cli --cluster create`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn binary(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's redis-server (.ci/run does)");
}

/// A free loopback port whose cluster-bus port (+10000) is free as well.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// One server; `extra` are more `redis-server` arguments (e.g. `--requirepass x`).
    pub fn start(extra: &[&str]) -> RedisServer {
        Self::start_with(extra, false, None)
    }

    /// One server that also listens for TLS on [`RedisServer::tls_port`], with this
    /// certificate and key, clients not asked for one. The TLS port is chosen afresh on
    /// every attempt, as the plain one is (other tests take ports in parallel).
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        Self::start_with(&[], false, Some([cert, key, ca]))
    }

    /// The TLS port, when started with [`RedisServer::start_tls`].
    pub fn tls_port(&self) -> Option<u16> {
        let i = self.args.iter().position(|a| a == "--tls-port")?;
        self.args.get(i + 1)?.parse().ok()
    }

    fn start_with(extra: &[&str], cluster: bool, tls: Option<[&Path; 3]>) -> RedisServer {
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let mut args: Vec<String> = vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.path().display().to_string(),
            ];
            if cluster {
                args.extend(
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "3000"].map(String::from),
                );
            }
            if let Some([cert, key, ca]) = tls {
                let tls_port = loop {
                    let p = free_port();
                    if p != port {
                        break p;
                    }
                };
                args.extend(["--tls-port".to_string(), tls_port.to_string(), "--tls-auth-clients".into(), "no".into()]);
                for (flag, file) in [("--tls-cert-file", cert), ("--tls-key-file", key), ("--tls-ca-cert-file", ca)] {
                    args.extend([flag.to_string(), file.display().to_string()]);
                }
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut s = RedisServer { child: None, port, args, dir };
            if s.spawn_and_wait() {
                return s;
            }
            last_log = std::fs::read_to_string(s.dir().join("redis.log")).unwrap_or_default();
        }
        panic!("redis-server did not start (5 attempts); its last log:\n{last_log}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)starts on the same port. Without persistence, it comes back empty.
    pub fn restart(&mut self) {
        assert!(self.spawn_and_wait(), "redis-server did not listen on {}", self.port);
    }

    fn spawn_and_wait(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir().join("redis.log")).expect("redis log file");
        let mut child = Command::new(binary("redis-server"))
            .args(&self.args)
            .stdout(log.try_clone().expect("redis log file"))
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        let start = Instant::now();
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if self.cli(&["PING"]).is_some_and(|o| o.contains("PONG")) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "redis-server did not answer on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        true
    }

    /// Runs `redis-cli` against this server; its output, `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut all: Vec<String> = vec!["-h".into(), "127.0.0.1".into(), "-p".into(), self.port.to_string()];
        if let Some(i) = self.args.iter().position(|a| a == "--requirepass") {
            all.extend(["--no-auth-warning".into(), "-a".into(), self.args[i + 1].clone()]);
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let out = Command::new(binary("redis-cli")).args(&all).stderr(Stdio::null()).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the server (SIGKILL: no shutdown, nothing saved).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas), every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_with(&[], true, None)).collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.push("--cluster-yes".into());
        let out = Command::new(binary("redis-cli")).args(&args).output().expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let start = Instant::now();
        while !nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))) {
            assert!(start.elapsed() < Duration::from_secs(30), "cluster not ok after 30s");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    /// The seed URLs, as `redis.urls` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A master, a replica of it, and a Sentinel watching them as `mymaster` (quorum 1, a
/// master is down after 1 s without an answer).
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinel: Child,
    pub sentinel_port: u16,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let master = RedisServer::start(&[]);
        let replica = RedisServer::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        let start = Instant::now();
        while !replica.cli(&["INFO", "replication"]).is_some_and(|i| i.contains("master_link_status:up")) {
            assert!(start.elapsed() < Duration::from_secs(15), "replica never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n",
                dir.path().display(),
                master.port
            ),
        )
        .unwrap();
        let sentinel = Command::new(binary("redis-server"))
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sentinel");
        let s = RedisSentinel { master, replica, sentinel, sentinel_port: port, _dir: dir };
        let start = Instant::now();
        while !s.ask(&["SENTINEL", "get-master-addr-by-name", "mymaster"]).is_some_and(|o| o.contains(&s.master.port.to_string())) {
            assert!(start.elapsed() < Duration::from_secs(15), "sentinel never knew the master");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// Runs `redis-cli` against the Sentinel.
    pub fn ask(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(binary("redis-cli"))
            .args(["-p", &self.sentinel_port.to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
    }
}
