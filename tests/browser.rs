//! The live page in real headless Chromium (Debian `chromium` + `chromium-driver`, which
//! `.ci/run` installs): two browsers as two users; one changes status, the other sees the
//! dot change. Spoken to over the W3C WebDriver protocol with plain HTTP.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver runs in its own process group: killing the group also ends the
        // browsers it started, even when a failed test never quit its sessions.
        // `kill -s KILL -- -<pgid>`: procps reads `kill -KILL -<pgid>` as other arguments
        // (seen here: kill(-1, SIGKILL), every process on the machine).
        // Only while it runs: once reaped, its id may belong to someone else.
        if self.child.id() > 1 && matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.child.id())]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port for chromedriver, outside the ephemeral range: chromedriver binds without
/// SO_REUSEADDR, so a port some test connection just used (in TIME_WAIT) makes it exit
/// with "Address already in use"; the suite churns through many of those.
fn driver_port() -> u16 {
    loop {
        let p = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn find(bin: &str) -> Option<String> {
    ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"].iter().map(|d| format!("{d}/{bin}")).find(|p| std::path::Path::new(p).exists())
}

impl Driver {
    async fn start() -> Driver {
        let bin = find("chromedriver").expect("chromedriver not found: install Debian's chromium and chromium-driver (.ci/run does)");
        // A port taken between choosing and binding it (tests run in parallel): try another.
        for _ in 0..5 {
            let port = driver_port();
            let mut cmd = Command::new(&bin);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let child = cmd
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let mut d = Driver { child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
            let start = Instant::now();
            loop {
                if d.http.get(format!("{}/status", d.base)).send().await.is_ok() {
                    return d;
                }
                if matches!(d.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("chromedriver did not start (5 attempts)");
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{}", self.base, path)).timeout(Duration::from_secs(60));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.expect("webdriver request").json().await.expect("webdriver JSON");
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    /// A new browser (its own profile: a separate user).
    async fn browser(&self, profile: &std::path::Path) -> Browser<'_> {
        let chromium = find("chromium").expect("chromium not found");
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=900,700", format!("--user-data-dir={}", profile.display())]
        }}}});
        let v = self.call(reqwest::Method::POST, "/session", Some(caps)).await;
        Browser { d: self, id: v["sessionId"].as_str().expect("session id").to_string() }
    }
}

struct Browser<'a> {
    d: &'a Driver,
    id: String,
}

impl Browser<'_> {
    async fn go(&self, url: &str) {
        self.d.call(reqwest::Method::POST, &format!("/session/{}/url", self.id), Some(json!({"url": url}))).await;
    }
    async fn el(&self, css: &str) -> String {
        let v = self
            .d
            .call(reqwest::Method::POST, &format!("/session/{}/element", self.id), Some(json!({"using": "css selector", "value": css})))
            .await;
        // A web element reference: an object with one `element-6066-…` key.
        let id = v.as_object().and_then(|o| o.iter().find(|(k, _)| k.starts_with("element-6066")).map(|(_, v)| v.clone()));
        id.and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| panic!("no element for {css}: {v}"))
    }
    async fn click(&self, css: &str) {
        let e = self.el(css).await;
        self.d.call(reqwest::Method::POST, &format!("/session/{}/element/{e}/click", self.id), Some(json!({}))).await;
    }
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.el(css).await;
        self.d.call(reqwest::Method::POST, &format!("/session/{}/element/{e}/clear", self.id), Some(json!({}))).await;
        self.d.call(reqwest::Method::POST, &format!("/session/{}/element/{e}/value", self.id), Some(json!({"text": text}))).await;
    }
    async fn js(&self, script: &str) -> Value {
        self.d.call(reqwest::Method::POST, &format!("/session/{}/execute/sync", self.id), Some(json!({"script": script, "args": []}))).await
    }
    /// Polls `script` until it returns `want` (10 s).
    async fn wait_for(&self, script: &str, want: Value) {
        let start = Instant::now();
        loop {
            let got = self.js(script).await;
            if got == want {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{script} stayed {got}, wanted {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    async fn screenshot(&self, path: &std::path::Path) {
        use std::io::Write;
        let b64 = self.d.call(reqwest::Method::GET, &format!("/session/{}/screenshot", self.id), None).await;
        let bytes = decode_b64(b64.as_str().unwrap_or(""));
        let _ = std::fs::File::create(path).and_then(|mut f| f.write_all(&bytes));
    }
    async fn quit(self) {
        self.d.call(reqwest::Method::DELETE, &format!("/session/{}", self.id), None).await;
    }
}

fn decode_b64(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The status a row shows, by its dot's colour class and by the word beside it (which
/// must agree: colour alone does not tell busy from online to colour-blind users).
fn dot(user: &str) -> String {
    format!(
        "const li = document.querySelector('li[data-user=\"{user}\"]'); if (!li) return null; \
         const d = li.querySelector('.dot'), w = li.querySelector('.word'); \
         return d && w && d.classList.contains(w.textContent) ? w.textContent : 'dot ' + (d && d.className) + ' word ' + (w && w.textContent);"
    )
}

#[tokio::test]
async fn two_browsers_see_each_others_dots_change() {
    let (config, dir) = common::test_config(&[]);
    let mut app = presenced::server::App::build(config).await.unwrap();
    app.dev = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async move {
        let _ = stopped.await;
    }));

    let driver = Driver::start().await;
    let alice = driver.browser(&dir.path().join("profile-alice")).await;
    let bob = driver.browser(&dir.path().join("profile-bob")).await;

    // Bob opens the page and watches alice: grey (never seen).
    bob.go(&format!("{base}/?user=bob&watch=alice")).await;
    bob.wait_for(&dot("alice"), json!("offline")).await;

    // Alice opens the page (typing her name and clicking Connect): green for bob.
    alice.go(&format!("{base}/")).await;
    alice.type_into("#user", "alice").await;
    alice.click("#connect").await;
    bob.wait_for(&dot("alice"), json!("online")).await;
    alice.wait_for(&dot("alice"), json!("online")).await;

    // Alice sets herself busy with a message: red for bob, with the message.
    alice.js("document.getElementById('status').value = 'busy';").await;
    alice.type_into("#message", "In a meeting").await;
    alice.click("#set").await;
    bob.wait_for(&dot("alice"), json!("busy")).await;
    bob.wait_for("return document.querySelector('li[data-user=\"alice\"] .msg').textContent;", json!("In a meeting")).await;
    if let Ok(p) = std::env::var("PRESENCED_SCREENSHOT") {
        bob.screenshot(std::path::Path::new(&p)).await;
    }

    // Away: yellow.
    alice.js("document.getElementById('status').value = 'away';").await;
    alice.type_into("#message", "back soon").await;
    alice.click("#set").await;
    bob.wait_for(&dot("alice"), json!("away")).await;
    // Clearing the explicit status shows the derived one: online, she is connected...
    let token = app_token(&base, "alice").await;
    let r = reqwest::Client::new().delete(format!("{base}/api/v2/presence/alice")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    bob.wait_for(&dot("alice"), json!("online")).await;
    // ...and closing her browser takes her offline.
    alice.quit().await;
    bob.wait_for(&dot("alice"), json!("offline")).await;
    bob.wait_for("return document.querySelector('li[data-user=\"alice\"] .seen').textContent;", json!("last seen just now")).await;
    bob.quit().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

async fn app_token(base: &str, sub: &str) -> String {
    let v: Value = reqwest::get(format!("{base}/dev/token?sub={sub}")).await.unwrap().json().await.unwrap();
    v["data"]["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn dev_token_only_with_dev_flag() {
    let s = common::TestServer::start(&[]).await;
    let (code, body) = s.get("/dev/token?sub=alice").await;
    assert_eq!(code, 404, "{body}");
    // The page itself is always served.
    let r = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(r#"import { PresenceClient } from "/client.js""#));
    s.stop().await;
}

/// The user view in words (devices, typing, last seen) and the operator view (admin
/// token): users online with a sparkline, events per second, nodes, sinks. Screenshots of
/// both go to `$PRESENCED_SCREENSHOTS/` when set.
#[tokio::test]
async fn the_user_view_speaks_in_words_and_the_operator_view_counts() {
    let s = common::TestServer::start_dev(&[("PRESENCE_PRESENCE__AUTO_AWAY_AFTER", "1s")]).await;
    let admin = s.admin_token("ops");
    let r = s
        .client
        .put(s.url("/api/v2/conversations/room-1/members"))
        .bearer_auth(&admin)
        .json(&json!({"members": ["alice", "bob"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // carol was here a moment ago; bob is on a phone and a laptop.
    let carol = common::wsclient::connect(&s, "carol", "c1").await;
    drop(carol);
    let mut bob_phone = common::wsclient::connect_platform(&s, "bob", "phone", "mobile").await;
    let mut bob_laptop = common::wsclient::connect_platform(&s, "bob", "laptop", "desktop").await;

    let driver = Driver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let alice = driver.browser(&dir.path().join("profile-alice")).await;
    alice.go(&format!("{}/?user=alice&watch=bob,carol&conv=room-1", s.base)).await;
    alice.wait_for(&dot("bob"), json!("online")).await;
    alice.wait_for("return document.querySelector('li[data-user=\"bob\"] .devices').textContent;", json!("on phone and laptop")).await;
    alice.wait_for(&dot("carol"), json!("offline")).await;
    alice.wait_for("return document.querySelector('li[data-user=\"carol\"] .seen').textContent;", json!("last seen just now")).await;
    alice.wait_for("return document.getElementById('state').textContent.startsWith('connected as alice (');", json!(true)).await;
    // bob types in room-1: "typing…" beside him, until he stops.
    bob_phone.ack(json!({"type": "typing", "payload": {"conversation_id": "room-1", "is_typing": true}, "id": 1})).await;
    alice.wait_for("return document.querySelector('li[data-user=\"bob\"] .typing')?.textContent ?? null;", json!("typing…")).await;
    if let Ok(d) = std::env::var("PRESENCED_SCREENSHOTS") {
        alice.screenshot(&std::path::Path::new(&d).join("user-view.png")).await;
    }
    bob_phone.ack(json!({"type": "typing", "payload": {"conversation_id": "room-1", "is_typing": false}, "id": 2})).await;
    alice
        .wait_for("return document.querySelector('li[data-user=\"bob\"] .devices')?.textContent ?? null;", json!("on phone and laptop"))
        .await;
    // bob idle on his phone: each device's state; on both: away, idle for how long.
    let idle = |id: u64| json!({"type": "activity", "payload": {"active": false}, "id": id});
    bob_phone.ack(idle(3)).await;
    let states = "return document.querySelector('li[data-user=\"bob\"] .states')?.textContent ?? null;";
    alice.wait_for(states, json!("laptop: active · phone: idle 0 min")).await;
    bob_laptop.ack(idle(4)).await;
    alice.wait_for(&dot("bob"), json!("away")).await;
    alice.wait_for("return document.querySelector('li[data-user=\"bob\"] .idle')?.textContent ?? null;", json!("· idle 0 min")).await;
    alice.wait_for(states, json!("laptop: idle 0 min · phone: idle 0 min")).await;
    bob_phone.ack(json!({"type": "activity", "payload": {"active": true}, "id": 5})).await;
    alice.wait_for(&dot("bob"), json!("online")).await;
    // The conversation's member list: a dot for each member online, and the counter.
    let counter = "return document.getElementById('counter').textContent;";
    let member = |u: &str| format!("return document.querySelector('#members li[data-member=\"{u}\"] .dot')?.dataset.status ?? null;");
    alice.wait_for(counter, json!("2 of 2 online")).await;
    alice.wait_for(&member("bob"), json!("online")).await;
    alice.wait_for(&member("alice"), json!("online")).await;
    // carol joins the conversation, offline: counted, not listed; then she comes online.
    let put =
        |ids: Value| s.client.put(s.url("/api/v2/conversations/room-1/members")).bearer_auth(&admin).json(&json!({"members": ids})).send();
    assert_eq!(put(json!(["alice", "bob", "carol"])).await.unwrap().status(), 200);
    alice.wait_for(counter, json!("2 of 3 online")).await;
    assert_eq!(alice.js(&member("carol")).await, Value::Null);
    let mut carol = common::wsclient::connect(&s, "carol", "c2").await;
    alice.wait_for(counter, json!("3 of 3 online")).await;
    alice.wait_for(&member("carol"), json!("online")).await;
    if let Ok(d) = std::env::var("PRESENCED_SCREENSHOTS") {
        alice.screenshot(&std::path::Path::new(&d).join("conversation.png")).await;
    }
    carol.ack(json!({"type": "bye", "id": 1})).await;
    alice.wait_for(counter, json!("2 of 3 online")).await;
    alice.wait_for(&member("carol"), Value::Null).await;
    // alice types in the page: bob's socket hears it once, debounced.
    alice.type_into("#compose", "hello").await;
    let t = bob_phone.recv_type("typing_indicator").await;
    assert_eq!(t["payload"], json!({"conversation_id": "room-1", "user_id": "alice", "is_typing": true}));

    // The operator view: hidden for alice, shown for an admin token.
    assert_eq!(alice.js("return document.getElementById('ops').hidden;").await, json!(true));
    let ops = driver.browser(&dir.path().join("profile-ops")).await;
    ops.go(&format!("{}/?user=ops&admin=1", s.base)).await;
    ops.wait_for("return document.getElementById('ops').hidden;", json!(false)).await;
    // alice, bob and ops are online on this node (carol left).
    ops.wait_for("return document.getElementById('ops-online').textContent;", json!("3")).await;
    ops.wait_for("return Number(document.getElementById('ops-spark').dataset.points) >= 2;", json!(true)).await;
    ops.wait_for("return document.querySelector('#ops-nodes tr[data-node=\"test-node\"] td:nth-child(2)').textContent;", json!("4")).await;
    ops.wait_for("return document.querySelector('#ops-nodes tr[data-node=\"test-node\"] .pill').textContent;", json!("alive")).await;
    let eps = ops.js("return Number(document.getElementById('ops-eps').textContent);").await;
    assert!(eps.as_f64().is_some_and(|e| e >= 0.0), "{eps}");
    assert_eq!(ops.js("return document.getElementById('ops-backend').textContent;").await, json!("embedded store"));
    if let Ok(d) = std::env::var("PRESENCED_SCREENSHOTS") {
        ops.screenshot(&std::path::Path::new(&d).join("operator-view.png")).await;
    }
    // The figures come from /api/v2/stats, which needs the admin scope.
    let r = s.client.get(s.url("/api/v2/stats")).bearer_auth(s.token("alice")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    alice.quit().await;
    ops.quit().await;
    s.stop().await;
}
