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

/// `service.worker_threads` sets how many threads the runtime runs (its own count, read
/// from the runtime and logged with "presenced listening"); 0 is one per core.
#[test]
fn worker_threads_sets_the_runtime_size() {
    use std::io::{BufRead, BufReader};
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    for (setting, want) in [("1", 1), ("3", 3), ("0", cores)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = base_cmd(dir.path());
        cmd.env("PRESENCE_SERVICE__WORKER_THREADS", setting).arg("serve");
        let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["http"].is_string() {
                        let _ = tx.send(v["workers"].as_u64());
                    }
                }
            }
        });
        let workers = rx.recv_timeout(Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(workers, Ok(Some(want as u64)), "service.worker_threads={setting}");
    }
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
    assert!(text.contains("jwt_secret: <redacted>"), "{text}");

    // Readable durations and sizes; a generated secret said to be one; a sink's own keys only.
    let out = base_cmd(dir.path())
        .env_remove("PRESENCE_AUTH__JWT_SECRET")
        .env("PRESENCE_EVENTS__SINKS", "[{name: hook, type: webhook, url: \"http://h/x\", secret: \"0123456789abcdef\"}]")
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["presence"]["forget_after"].as_str(), Some("30d"), "{text}");
    assert_eq!(v["presence"]["session_ttl"].as_str(), Some("1m"), "{text}");
    assert!(v["auth"]["jwt_secret"].as_str().unwrap().starts_with("<generated: "), "{text}");
    assert!(v["auth"]["jwt_secret"].as_str().unwrap().ends_with("jwt.secret>"), "{text}");
    assert!(!text.contains("2592000"), "{text}");
    let sink = v["events"]["sinks"][0].as_mapping().unwrap();
    let keys: Vec<&str> = sink.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(keys, ["name", "type", "batch_max", "timeout", "url", "secret"], "{text}");
    // And what it prints is a configuration presenced reads back (secrets aside).
    let back = dir.path().join("printed.yaml");
    let generated = v["auth"]["jwt_secret"].as_str().unwrap();
    std::fs::write(&back, text.replace("<redacted>", "0123456789abcdef").replace(generated, "0123456789abcdef-0123456789abcdef")).unwrap();
    let out =
        base_cmd(dir.path()).env_remove("PRESENCE_AUTH__JWT_SECRET").args(["--config", back.to_str().unwrap(), "config"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The placeholders themselves are not secrets.
    for placeholder in [generated, "<redacted>"] {
        let out = base_cmd(dir.path()).env("PRESENCE_AUTH__JWT_SECRET", placeholder).arg("config").output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{placeholder} refused as a secret");
        assert!(String::from_utf8_lossy(&out.stderr).contains("placeholder"), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `PRESENCE_CONFIG` names the file, and the variables Kubernetes injects into every pod
/// for a Service named `presence` do not stop the start; a misspelt override still does.
#[test]
fn presence_config_and_kubernetes_service_variables_are_not_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "presence:\n  session_ttl: 90s\n").unwrap();
    let out = base_cmd(dir.path()).env("PRESENCE_CONFIG", &cfg).arg("config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("session_ttl: 1m30s"), "the file named by PRESENCE_CONFIG is read");

    let k8s = [
        ("PRESENCE_PORT", "tcp://10.96.0.12:8080"),
        ("PRESENCE_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
        ("PRESENCE_PORT_8080_TCP_ADDR", "10.96.0.12"),
        ("PRESENCE_PORT_8080_TCP_PORT", "8080"),
        ("PRESENCE_PORT_8080_TCP_PROTO", "tcp"),
        ("PRESENCE_SERVICE_HOST", "10.96.0.12"),
        ("PRESENCE_SERVICE_PORT", "8080"),
        ("PRESENCE_SERVICE_PORT_GRPC", "9090"),
    ];
    let mut cmd = base_cmd(dir.path());
    cmd.envs(k8s).env("PRESENCE_CONFIG", &cfg).env("PRESENCE_NATS__URLS", "nats://a:4222,nats://b:4222").arg("serve");
    let p = start_or_exit(&mut cmd).unwrap_or_else(|(code, log)| panic!("exited {code:?} under Kubernetes' variables: {log}"));
    drop(p);

    let out = base_cmd(dir.path()).env("PRESENCE_SERVCE__PORT", "1").arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "a misspelt override is still refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("servce"));
}

/// The sample cluster under `deploy/` (center + two leaves) is valid: every presenced
/// config loads, and every nats-server config passes `nats-server -t`.
#[test]
fn deploy_samples_are_valid() {
    let root = common::source::source_root().join("deploy");
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

/// Starts `cmd` and waits (at most 20 s) until it listens (`Ok`) or exits (`Err` with its
/// exit code and stderr).
fn start_or_exit(cmd: &mut Command) -> Result<Proc, (Option<i32>, String)> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    loop {
        while let Ok(l) = rx.try_recv() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                if let Some(addr) = v["http"].as_str() {
                    return Ok(Proc { child, addr: addr.to_string() });
                }
            }
            lines.push(l);
        }
        if let Some(st) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(50));
            lines.extend(rx.try_iter());
            return Err((st.code(), lines.join("\n")));
        }
        assert!(start.elapsed() < Duration::from_secs(20), "neither listening nor exited in 20s: {lines:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn put(addr: &str, token: &str, user: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r =
        reqwest::Client::new().put(format!("http://{addr}/api/v2/presence/{user}")).bearer_auth(token).json(&body).send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap())
}

async fn get_status(addr: &str, user: &str) -> serde_json::Value {
    reqwest::get(format!("http://{addr}/api/v2/presence/{user}")).await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn damaged_or_missing_data_stops_the_start_clearly_never_with_a_panic() {
    // An empty or whitespace-only JWT secret file: forged tokens would verify. Refused.
    for content in ["", "  \n"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwt.secret"), content).unwrap();
        let (code, err) = start_or_exit(base_cmd(dir.path()).arg("serve")).err().expect("refused");
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("jwt.secret") && err.contains("32 bytes"), "{err}");
        let out = base_cmd(dir.path()).args(["token", "--sub", "a"]).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "token refuses it too");
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = start_or_exit(base_cmd(dir.path()).env("PRESENCE_AUTH__JWT_SECRET", "too-short").arg("serve")).err().unwrap();
    assert_eq!(code, Some(64));
    assert!(err.contains("auth.jwt_secret"), "{err}");

    // A database with data in it.
    let dir = tempfile::tempdir().unwrap();
    let admin = {
        let out = base_cmd(dir.path()).args(["token", "--sub", "svc", "--scope", "presence:admin"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    {
        let mut p = serve(dir.path());
        for i in 0..200 {
            let (code, _) =
                put(&p.addr, &admin, &format!("user-{i}"), serde_json::json!({"status":"busy","message":"m".repeat(200)})).await;
            assert_eq!(code, 200);
        }
        assert!(sigterm_and_wait(&mut p).success());
    }
    // A second process on the same data dir is told who holds it.
    {
        let _first = serve(dir.path());
        let (code, err) = start_or_exit(base_cmd(dir.path()).arg("serve")).err().expect("refused");
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("another presenced is using") && err.contains(&dir.path().display().to_string()), "{err}");
    }
    let db = dir.path().join("presence.redb");
    let pristine = std::fs::read(&db).unwrap();
    // One zeroed 4 KiB page at a time: repaired, or refused with the file's name and the
    // way out; never a panic (exit 101).
    let pages = pristine.len() / 4096;
    let (mut started, mut refused) = (0, 0);
    for page in 0..pages.min(24) {
        let mut bytes = pristine.clone();
        bytes[page * 4096..(page + 1) * 4096].fill(0);
        std::fs::write(&db, &bytes).unwrap();
        match start_or_exit(base_cmd(dir.path()).arg("serve")) {
            Ok(p) => {
                started += 1;
                drop(p);
            }
            Err((code, err)) => {
                assert_eq!(code, Some(64), "page {page}: {err}");
                assert!(err.contains("presence.redb") && err.contains("start_fresh") && !err.contains("panicked"), "page {page}: {err}");
                refused += 1;
            }
        }
    }
    eprintln!("{pages} pages: {started} repaired and started, {refused} refused");
    assert!(started + refused > 0);
    // A 0-byte database would start empty (and make invisible users visible): refused,
    // unless told to start fresh (the file is kept aside).
    std::fs::write(&db, b"").unwrap();
    let (code, err) = start_or_exit(base_cmd(dir.path()).arg("serve")).err().expect("refused");
    assert_eq!(code, Some(64));
    assert!(err.contains("empty (0 bytes)") && err.contains("start_fresh"), "{err}");
    let p = start_or_exit(base_cmd(dir.path()).env("PRESENCE_STORE__START_FRESH", "true").arg("serve")).expect("starts fresh");
    assert_eq!(get_status(&p.addr, "user-1").await["code"], "not_found");
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("presence.redb.empty-")));
}

/// The disk fills up (a file-size limit set on the running process with prlimit, as a
/// full disk would: writes fail with an I/O error): status writes answer 503 without the
/// database's own message and are not applied; once space is back the store recovers by
/// itself, and what was refused never reaches the disk.
#[tokio::test]
async fn a_full_disk_is_503_then_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let admin = {
        let out = base_cmd(dir.path()).args(["token", "--sub", "svc", "--scope", "presence:admin"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // SIGXFSZ ignored (as a shell does with trap), so the write fails instead of killing.
    let mut cmd = base_cmd(dir.path());
    cmd.env("PRESENCE_LIMITS__WRITE_RATE_PER_SEC", "100000").env("PRESENCE_LIMITS__WRITE_BURST", "100000");
    let mut sh = Command::new("/bin/sh");
    sh.args(["-c", "trap '' XFSZ; exec \"$0\" serve", BIN]).env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    let mut p = start_or_exit(&mut sh).expect("starts");
    let pid = p.child.id().to_string();
    let db = dir.path().join("presence.redb");
    let size = std::fs::metadata(&db).unwrap().len();
    let limit = |soft: &str| {
        let st =
            Command::new("prlimit").args(["--pid", &pid, &format!("--fsize={soft}:unlimited")]).status().expect("prlimit (util-linux)");
        assert!(st.success());
    };
    limit(&size.to_string());
    let big = "m".repeat(250);
    let mut refused = None;
    for i in 0..2000 {
        let (code, body) = put(&p.addr, &admin, &format!("u{i}"), serde_json::json!({"status":"busy","message": big})).await;
        if code != 200 {
            assert_eq!(code, 503, "{body}");
            assert_eq!(body["code"], "unavailable");
            let msg = body["error"].as_str().unwrap();
            assert!(!msg.contains("I/O") && !msg.contains("large") && !msg.contains("redb"), "no internal detail: {msg}");
            refused = Some(i);
            break;
        }
    }
    let i = refused.expect("the file-size limit was reached");
    assert_eq!(get_status(&p.addr, &format!("u{i}")).await["code"], "not_found", "a write answered 503 is not visible");
    let h = reqwest::get(format!("http://{}/health", p.addr)).await.unwrap();
    assert_eq!(h.status(), 503);
    // Space is back.
    limit("unlimited");
    let start = Instant::now();
    loop {
        let (code, _) = put(&p.addr, &admin, "after", serde_json::json!({"status":"away"})).await;
        if code == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the store did not recover by itself");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reqwest::get(format!("http://{}/health", p.addr)).await.unwrap().status(), 200);
    assert!(sigterm_and_wait(&mut p).success());
    let p = serve(dir.path());
    assert_eq!(get_status(&p.addr, "after").await["data"]["after"]["status"], "away");
    assert_eq!(get_status(&p.addr, &format!("u{i}")).await["code"], "not_found", "the refused write never reached the disk");
}

/// What a newcomer trips on says what to do: `token` tells where it created a signing
/// secret (the usual mistake is another working directory than `serve`'s); a taken port
/// names the setting.
#[tokio::test]
async fn token_says_where_it_signs_and_a_taken_port_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let first = base_cmd(dir.path()).args(["token", "--sub", "a"]).output().unwrap();
    assert!(first.status.success());
    let err = String::from_utf8_lossy(&first.stderr);
    let secret = std::fs::canonicalize(dir.path().join("jwt.secret")).unwrap();
    assert!(err.contains("new one was created") && err.contains(&secret.display().to_string()), "{err}");
    assert!(err.contains("service.data_dir"), "{err}");
    // The secret exists now: nothing to say, and a running server accepts the token.
    let second = base_cmd(dir.path()).args(["token", "--sub", "a"]).output().unwrap();
    assert!(second.status.success() && second.stderr.is_empty(), "{}", String::from_utf8_lossy(&second.stderr));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, err) = start_or_exit(base_cmd(dir.path()).env("PRESENCE_SERVICE__PORT", &port).arg("serve")).err().expect("refused");
    assert_ne!(code, Some(0));
    assert!(err.contains("service.port") && err.contains(&port), "{err}");
}

/// Text logs into a pipe (a file, journald, `docker logs`) carry no ANSI colour codes.
#[test]
fn text_logs_into_a_pipe_have_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = base_cmd(dir.path())
        .env("PRESENCE_LOGGING__FORMAT", "text")
        .args(["serve", "--dev"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let start = Instant::now();
    while !lines.iter().any(|l: &String| l.contains("presenced listening")) {
        assert!(start.elapsed() < Duration::from_secs(20), "no listening line: {lines:?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "colour codes in piped logs: {lines:?}");
}

/// Lines of a child's stderr, collected as they come.
fn collect_stderr(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, BufReader};
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Starts `cmd` (a `serve`), keeping every stderr line, and waits (at most 20 s) for the
/// "listening" line with the bound address.
fn serve_collecting(cmd: &mut Command) -> (Proc, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().expect("spawn");
    let lines = collect_stderr(&mut child);
    let start = Instant::now();
    loop {
        let addr = lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["http"].as_str().map(String::from));
        if let Some(addr) = addr {
            return (Proc { child, addr }, lines);
        }
        assert!(child.try_wait().unwrap().is_none(), "exited: {:?}", lines.lock().unwrap());
        assert!(start.elapsed() < Duration::from_secs(20), "not listening within 20 s: {:?}", lines.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A store that is down at start (the usual order in a compose file or a cluster):
/// presenced starts anyway, answers 503 on `/health` and everything else while it retries,
/// says why once (not "nats: nats:"), and serves by itself once the store answers.
/// `store.fail_fast: true` exits 64 at once instead.
async fn a_store_down_at_start_is_waited_for(mut engine: common::engine::Engine) {
    engine.stop();
    let dir = tempfile::tempdir().unwrap();
    let env = engine.env("late-node", None);
    let fast = start_or_exit(common::presenced_cmd(dir.path()).envs(env.clone()).env("PRESENCE_STORE__FAIL_FAST", "true").arg("serve"));
    let (code, log) = fast.err().expect("fail_fast: exits while the store is down");
    assert_eq!(code, Some(64), "{log}");
    assert!(!log.contains("nats: nats:"), "the reason once: {log}");

    let port = common::nats::port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = common::presenced_cmd(dir.path())
        .envs(env)
        .env("PRESENCE_SERVICE__PORT", port.to_string())
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    let mut p = Proc { child, addr: addr.clone() };
    let http = reqwest::Client::new();
    let health = || async { http.get(format!("http://{addr}/health")).send().await.ok() };
    let start = Instant::now();
    let r = loop {
        if let Some(r) = health().await {
            break r;
        }
        assert!(p.child.try_wait().unwrap().is_none(), "presenced exited: {:?}", lines.lock().unwrap());
        assert!(start.elapsed() < Duration::from_secs(20), "no answer on {addr}: {:?}", lines.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(body["error"].as_str().unwrap().contains("starting"), "{body}");
    assert!(!body.to_string().contains("127.0.0.1"), "the store's addresses stay in the log: {body}");
    let r = http.get(format!("http://{addr}/api/v2/presence/alice")).send().await.unwrap();
    assert_eq!(r.status(), 503, "every route waits for the store");

    engine.restart();
    let start = Instant::now();
    loop {
        if let Some(r) = health().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(p.child.try_wait().unwrap().is_none(), "presenced exited: {:?}", lines.lock().unwrap());
        assert!(start.elapsed() < Duration::from_secs(40), "not ready after the store came: {:?}", lines.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = common::presenced_cmd(dir.path()).args(["token", "--sub", "alice"]).output().unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (status, body) = put(&addr, &token, "alice", serde_json::json!({"status": "busy"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_status(&addr, "alice").await["data"]["alice"]["status"], "busy");
    assert_eq!(sigterm_and_wait(&mut p).code(), Some(0));
    let log = lines.lock().unwrap().join("\n");
    assert!(!log.contains("nats: nats:"), "{log}");
    assert!(log.contains("the store cannot be reached") && log.contains("the store answers"), "{log}");
}

#[tokio::test]
async fn nats_down_at_start_is_waited_for() {
    a_store_down_at_start_is_waited_for(common::engine::Engine::nats()).await;
}

#[tokio::test]
async fn redis_down_at_start_is_waited_for() {
    a_store_down_at_start_is_waited_for(common::engine::Engine::redis()).await;
}

/// `logging.access_log`: one line per request with the route's template, status, latency
/// and peer, never a token (not even one in a query string); refused WebSocket
/// handshakes are logged at debug with their reason.
#[tokio::test]
async fn access_log_lines_name_the_route_never_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::presenced_cmd(dir.path());
    cmd.env("PRESENCE_LOGGING__ACCESS_LOG", "true").env("PRESENCE_LOGGING__LEVEL", "debug").arg("serve");
    let (p, lines) = serve_collecting(&mut cmd);
    let out = common::presenced_cmd(dir.path()).args(["token", "--sub", "alice"]).output().unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (status, _) = put(&p.addr, &token, "alice", serde_json::json!({"status": "busy"})).await;
    assert_eq!(status, 200);
    let http = reqwest::Client::new();
    let secret_in_query = "not-a-real-token-but-secret";
    let ws = http
        .get(format!("http://{}/ws?token={secret_in_query}", p.addr))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(ws.status(), 401);
    assert_eq!(http.get(format!("http://{}/no/such/route", p.addr)).send().await.unwrap().status(), 404);

    let start = Instant::now();
    let access = |route: &str, status: u64| {
        lines.lock().unwrap().iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|v| {
            v["target"] == "presenced::access"
                && v["route"] == route
                && v["status"] == status
                && v["latency_ms"].is_number()
                && v["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:"))
        })
    };
    while !(access("/api/v2/presence/{user_id}", 200) && access("/ws", 401) && access("unmatched", 404)) {
        assert!(start.elapsed() < Duration::from_secs(10), "access lines missing: {:?}", lines.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("WebSocket handshake refused"), "{log}");
    assert!(!log.contains(secret_in_query) && !log.contains(&token), "a token in the log: {log}");
    assert!(log.contains("/no/such/route"), "an unmatched request names its path: {log}");
}

/// Waiting for a store is for a store that is late, not for settings that cannot work: a
/// missing TLS or credentials file still exits 64 at once, naming it.
#[test]
fn a_store_configuration_mistake_still_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [&[(&str, &str)]; 2] = [
        &[
            ("PRESENCE_STORE__BACKEND", "redis"),
            ("PRESENCE_REDIS__URLS", "rediss://127.0.0.1:1"),
            ("PRESENCE_REDIS__TLS__CA_FILE", "/nonexistent/ca.pem"),
        ],
        &[
            ("PRESENCE_STORE__BACKEND", "nats"),
            ("PRESENCE_NATS__URLS", "nats://127.0.0.1:1"),
            ("PRESENCE_NATS__CREDENTIALS_FILE", "/nonexistent/app.creds"),
        ],
    ];
    for env in cases {
        let (code, log) = start_or_exit(common::presenced_cmd(dir.path()).envs(env.iter().copied()).arg("serve"))
            .err()
            .unwrap_or_else(|| panic!("{env:?}: started"));
        assert_eq!(code, Some(64), "{env:?}: {log}");
        assert!(log.contains("/nonexistent/"), "{env:?}: names the file: {log}");
    }
}
