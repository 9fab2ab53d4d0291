//! A real RabbitMQ node (Debian's `rabbitmq-server`; `.ci/run` installs it) on ephemeral
//! loopback ports, with its own Erlang port mapper (`epmd`), node name, data and log
//! directories, so it shares nothing with a system broker or another test. Killed (its
//! whole process group) when dropped. It starts in about four seconds.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn server_binary() -> PathBuf {
    for p in ["/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("rabbitmq-server not found: install Debian's rabbitmq-server (.ci/run does)");
}

/// Kills a process group (the broker script, beam.smp and its helpers).
fn kill_group(child: &mut Child) {
    let pgid = child.id();
    let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status();
    let _ = child.wait();
}

pub struct RabbitServer {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    epmd: Option<Child>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RabbitServer {
    pub fn start() -> RabbitServer {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").unwrap();
        let epmd_port = free_port();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn epmd (Debian's erlang-base, installed with rabbitmq-server)");
        let mut s = RabbitServer { port: free_port(), dist_port: free_port(), epmd_port, epmd: Some(epmd), child: None, dir };
        s.spawn_and_wait();
        s
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("log").join("stdout.log")).unwrap();
        let child = Command::new(server_binary())
            .env("HOME", d)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", format!("presenced-test-{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn rabbitmq-server");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(c) = &mut self.child {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    let log = std::fs::read_to_string(d.join("log").join("stdout.log")).unwrap_or_default();
                    panic!("rabbitmq-server exited before listening:\n{log}");
                }
            }
            assert!(start.elapsed() < Duration::from_secs(60), "rabbitmq-server did not listen on {} within 60 s", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the broker (SIGKILL: what it confirmed is on disk, nothing else).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c);
        }
    }

    /// Starts it again: same node, ports and data (durable queues and their persistent
    /// messages are back).
    pub fn restart(&mut self) {
        self.spawn_and_wait();
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut e) = self.epmd.take() {
            kill_group(&mut e);
        }
    }
}
