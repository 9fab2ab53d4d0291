//! Encryption at rest (`store.encryption_key_file`) on the real binary: what a user wrote
//! cannot be found as bytes in any file under the data dir, a restart with the key reads
//! it back, a wrong or missing key exits 64 naming the file, a plain data dir is
//! encrypted at the first start with a key, and `presenced rekey` changes the key.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

/// Strings that must never be on disk in clear once encryption is on.
const MESSAGE: &str = "Zanzibar-offsite-7731";
const CONTACT: &str = "contact-quixotic-4410";
const OWNER: &str = "owner-vermilion-2208";

struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cmd(dir: &Path, key: Option<&Path>) -> Command {
    let mut c = presenced_cmd(dir);
    // A sink that is never reachable: its events stay queued in sinks.redb.
    c.env("PRESENCE_EVENTS__SINKS", "[{name: hook, type: webhook, url: \"http://127.0.0.1:9/x\", secret: \"0123456789abcdef0123\"}]");
    if let Some(k) = key {
        c.env("PRESENCE_STORE__ENCRYPTION_KEY_FILE", k);
    }
    c
}

fn start(dir: &Path, key: Option<&Path>) -> Node {
    let (child, addr) = spawn_serve(cmd(dir, key).arg("serve"));
    Node { child, base: format!("http://{addr}") }
}

fn stop(mut n: Node) {
    let pid = n.child.id().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    while n.child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(15), "no exit within 15s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn key_file(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new("openssl").args(["rand", "-hex", "32"]).output().expect("openssl rand");
    let path = dir.join(name);
    std::fs::write(&path, out.stdout).unwrap();
    path
}

fn token(dir: &Path, sub: &str) -> String {
    let out = presenced_cmd(dir).args(["token", "--sub", sub, "--ttl", "1h"]).output().expect("token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn write(n: &Node, dir: &Path) {
    write_to(&n.base, &token(dir, OWNER)).await;
}

/// The owner's status (with `MESSAGE`) and contacts (`[CONTACT]`), through the node at `base`.
async fn write_to(base: &str, token: &str) {
    let c = reqwest::Client::new();
    let put = |path: String, body: serde_json::Value| c.put(format!("{base}{path}")).bearer_auth(token).json(&body).send();
    assert_eq!(
        put(format!("/api/v2/presence/{OWNER}"), serde_json::json!({"status": "busy", "message": MESSAGE})).await.unwrap().status(),
        200
    );
    assert_eq!(put(format!("/api/v2/contacts/{OWNER}"), serde_json::json!({"contacts": [CONTACT]})).await.unwrap().status(), 200);
}

async fn read_back(n: &Node, dir: &Path) {
    let c = reqwest::Client::new();
    let t = token(dir, OWNER);
    let (_, p) = decode(c.get(format!("{}/api/v2/presence/{OWNER}", n.base)).bearer_auth(&t).send().await.unwrap()).await;
    assert_eq!(p["data"][OWNER]["message"], MESSAGE, "{p}");
    assert_eq!(p["data"][OWNER]["status"], "busy", "{p}");
    let (_, cs) = decode(c.get(format!("{}/api/v2/contacts/{OWNER}", n.base)).bearer_auth(&t).send().await.unwrap()).await;
    assert_eq!(cs["data"]["contacts"], serde_json::json!([CONTACT]), "{cs}");
}

/// Every file under `dir` (recursively) holding one of `needles`, with which.
fn files_holding(dir: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for n in needles {
                if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                    found.push(format!("{} holds {n}", p.display()));
                }
            }
        }
    }
    found
}

fn refused(dir: &Path, key: Option<&Path>) -> String {
    let mut c = cmd(dir, key);
    let child = c.arg("serve").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(64), "{err}");
    err
}

#[tokio::test]
async fn nothing_readable_on_disk_and_the_key_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k1");
    let n = start(dir.path(), Some(&key));
    write(&n, dir.path()).await;
    stop(n);
    let needles = [MESSAGE, CONTACT, OWNER];
    assert_eq!(files_holding(dir.path(), &needles), Vec::<String>::new(), "plain text under the data dir");
    assert!(dir.path().join("presence.redb").exists() && dir.path().join("sinks.redb").exists());

    // The right key reads everything back.
    let n = start(dir.path(), Some(&key));
    read_back(&n, dir.path()).await;
    stop(n);

    // A wrong key, and no key, are refused naming the file.
    let wrong = key_file(keys.path(), "k2");
    let err = refused(dir.path(), Some(&wrong));
    assert!(err.contains("presence.redb") && err.contains("another key"), "{err}");
    let err = refused(dir.path(), None);
    assert!(err.contains("presence.redb") && err.contains("encrypted"), "{err}");
    // A key file that is not a key.
    std::fs::write(keys.path().join("bad"), "not a key").unwrap();
    let err = refused(dir.path(), Some(&keys.path().join("bad")));
    assert!(err.contains("store.encryption_key_file") && err.contains("64 hex digits"), "{err}");
}

#[tokio::test]
async fn a_plain_data_dir_is_encrypted_at_the_first_start_with_a_key_and_rekey_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let n = start(dir.path(), None);
    write(&n, dir.path()).await;
    stop(n);
    assert!(!files_holding(dir.path(), &[MESSAGE]).is_empty(), "without a key the data is plain (the test's premise)");

    let k1 = key_file(keys.path(), "k1");
    let n = start(dir.path(), Some(&k1));
    read_back(&n, dir.path()).await;
    stop(n);
    assert_eq!(files_holding(dir.path(), &[MESSAGE, CONTACT, OWNER]), Vec::<String>::new(), "the plain pages are gone");

    // rekey: k1 -> k2, with the node stopped.
    let k2 = key_file(keys.path(), "k2");
    let out = cmd(dir.path(), Some(&k1)).arg("rekey").arg("--new-key-file").arg(&k2).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("presence.redb") && said.contains("sinks.redb"), "{said}");
    let err = refused(dir.path(), Some(&k1));
    assert!(err.contains("another key"), "the old key no longer opens it: {err}");
    // Run again (as after a run that stopped half-way): both files are found done.
    let again = cmd(dir.path(), Some(&k1)).arg("rekey").arg("--new-key-file").arg(&k2).output().unwrap();
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && said.matches("already").count() == 2, "{said} {}", String::from_utf8_lossy(&again.stderr));
    let n = start(dir.path(), Some(&k2));
    read_back(&n, dir.path()).await;
    // rekey refuses while the node runs.
    let k3 = key_file(keys.path(), "k3");
    let out = cmd(dir.path(), Some(&k2)).arg("rekey").arg("--new-key-file").arg(&k3).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stop it first"), "{out:?}");
    stop(n);
    assert_eq!(files_holding(dir.path(), &[MESSAGE, CONTACT, OWNER]), Vec::<String>::new());
}

/// Cluster mode on NATS: nats-server's own JetStream encryption (`cipher`, `key`) keeps
/// the KV buckets and streams presenced writes unreadable on disk; the same run without it
/// shows the data would be there in clear.
#[tokio::test]
async fn jetstream_encryption_keeps_the_cluster_data_unreadable_on_disk() {
    for encrypted in [false, true] {
        let jetstream = if encrypted { "cipher: chachapoly\nkey: \"a-jetstream-key-of-32-chars-or-more\"" } else { "" };
        let mut nats = common::nats::NatsServer::start_with(jetstream, "");
        let url = nats.url();
        let s = TestServer::start(&[("PRESENCE_STORE__BACKEND", "nats"), ("PRESENCE_NATS__URLS", &url)]).await;
        let t = s.token(OWNER);
        write_to(&s.base, &t).await;
        let (_, p) = decode(s.client.get(s.url(&format!("/api/v2/presence/{OWNER}"))).bearer_auth(&t).send().await.unwrap()).await;
        assert_eq!(p["data"][OWNER]["message"], MESSAGE, "read back through the encrypted store");
        s.stop().await;
        nats.stop();
        let found = files_holding(&nats.store_dir(), &[MESSAGE, CONTACT]);
        if encrypted {
            assert_eq!(found, Vec::<String>::new(), "plain text in the encrypted JetStream store");
        } else {
            assert!(!found.is_empty(), "without a cipher the data is in clear (the test's premise)");
        }
    }
}
