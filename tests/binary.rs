//! The real `presenced` binary: `serve` with no config file, `token`, SIGTERM, restart
//! with persisted statuses, and bad configuration.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_presenced");

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base_cmd(data_dir: &std::path::Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", "0")
        .env("PRESENCE_SERVICE__GRPC_PORT", "0")
        .env("PRESENCE_SERVICE__DATA_DIR", data_dir)
        .env("PRESENCE_SERVICE__NODE_ID", "bin-node")
        .env("PRESENCE_LOGGING__FORMAT", "json");
    c
}

/// Starts `serve` and waits (bounded) for the "listening" log line with the bound address.
fn serve(data_dir: &std::path::Path) -> Proc {
    let (child, addr) = common::spawn_serve(base_cmd(data_dir).arg("serve"));
    Proc { child, addr }
}

fn token(data_dir: &std::path::Path, sub: &str) -> String {
    let out = base_cmd(data_dir).args(["token", "--sub", sub, "--ttl", "1h"]).output().expect("run token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn sigterm_and_wait(p: &mut Proc) -> std::process::ExitStatus {
    let pid = p.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "presenced did not exit within 15s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn token_write_sigterm_restart_keeps_status() {
    let dir = tempfile::tempdir().unwrap();
    let t = token(dir.path(), "alice");
    assert_eq!(t.split('.').count(), 3, "a JWT: {t}");

    let mut p = serve(dir.path());
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/v2/presence/alice", p.addr);
    let r = client
        .put(&url)
        .bearer_auth(&t)
        .json(&serde_json::json!({"status": "busy", "message": "In a meeting", "ttl": 3600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // A token minted for another user is refused (403) by the same server.
    let r = client.put(&url).bearer_auth(token(dir.path(), "bob")).json(&serde_json::json!({"status": "away"})).send().await.unwrap();
    assert_eq!(r.status(), 403);

    let st = sigterm_and_wait(&mut p);
    assert!(st.success(), "clean exit on SIGTERM, got {st:?}");

    let p2 = serve(dir.path());
    let url = format!("http://{}/api/v2/presence/alice", p2.addr);
    let body: serde_json::Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["data"]["alice"]["status"], "busy", "{body}");
    assert_eq!(body["data"]["alice"]["message"], "In a meeting");
    let ttl = body["data"]["alice"]["ttl"].as_i64().unwrap();
    assert!(ttl > 3500 && ttl <= 3600, "expiry survives the restart: {ttl}");
    // The secret survived too: the first token still writes.
    let r = client.put(&url).bearer_auth(&t).json(&serde_json::json!({"status": "online"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "service:\n  port: 8080\n  prot: 1\n").unwrap();
    let out = base_cmd(dir.path()).args(["--config", cfg.to_str().unwrap(), "serve"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prot"), "{err}");

    let out = base_cmd(dir.path()).env("PRESENCE_PRESENCE__SESSION_TTL", "forever").arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("presence.session_ttl") && err.contains("60s"), "{err}");

    std::fs::write(&cfg, "auth:\n  jwt_secret: ${MISSING_SECRET}\n").unwrap();
    let out = base_cmd(dir.path()).args(["--config", cfg.to_str().unwrap(), "token", "--sub", "a"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MISSING_SECRET"));
}

#[test]
fn config_subcommand_prints_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "auth:\n  jwt_secret: ${S}\nservice:\n  port: ${PORT:-7000}\n").unwrap();
    let out = base_cmd(dir.path())
        .env_remove("PRESENCE_SERVICE__PORT")
        .env("S", "hunter2-hunter2-hunter2-hunter2-hunter2")
        .args(["--config", cfg.to_str().unwrap(), "config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("port: 7000"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// The sample cluster under `deploy/` (center + two leaves) is valid: every presenced
/// config loads, and every nats-server config passes `nats-server -t`.
#[test]
fn deploy_samples_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for n in ["center", "leaf-a", "leaf-b"] {
        let out = Command::new(BIN)
            .env_clear()
            .env("JWT_SECRET", "sample-secret-sample-secret-sample-secret")
            .current_dir(&root)
            .args(["config", "--config", &format!("presenced/{n}.yaml")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{n}: {}", String::from_utf8_lossy(&out.stderr));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains("backend: nats") && printed.contains("domain: hub"), "{n}: {printed}");
        let nats =
            ["/usr/sbin/nats-server", "/usr/bin/nats-server"].into_iter().find(|p| std::path::Path::new(p).exists()).expect("nats-server");
        let t = Command::new(nats).current_dir(&root).args(["-t", "-c", &format!("nats/{n}.conf")]).output().unwrap();
        assert!(t.status.success(), "{n}.conf: {}", String::from_utf8_lossy(&t.stderr));
    }
}
