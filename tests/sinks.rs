//! Event sinks (webhook): every transition reaches a real HTTP receiver, signed with
//! HMAC-SHA256, in order per user; a receiver that fails for a while, and a presenced
//! restart meanwhile, lose nothing (the on-disk outbox); a full outbox drops the oldest
//! and counts them; `/health` shows a failing sink as degraded, not down.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::TestServer;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret-0123456789";

/// A webhook receiver: checks every request's signature, keeps the events, and fails
/// (503) while `failing` is set.
#[derive(Clone, Default)]
struct Receiver {
    events: Arc<Mutex<Vec<Value>>>,
    deliveries: Arc<Mutex<Vec<String>>>,
    bad_signatures: Arc<Mutex<u32>>,
    failing: Arc<AtomicBool>,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if r.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let sig = headers.get("x-presence-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (t, v1) = sig.split_once(",v1=").map(|(t, v)| (t.trim_start_matches("t=").to_string(), v.to_string())).unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    if expected != v1 || t.parse::<i64>().map_or(true, |t| (now - t).abs() > 300) {
        *r.bad_signatures.lock() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    r.events.lock().extend(v["events"].as_array().unwrap().iter().cloned());
    r.deliveries.lock().push(headers.get("x-presence-delivery").unwrap().to_str().unwrap().to_string());
    StatusCode::NO_CONTENT
}

async fn receiver() -> (Receiver, String) {
    let r = Receiver::default();
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(r.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (r, url)
}

fn sink_env(url: &str, max_events: u64) -> Vec<(String, String)> {
    vec![
        (
            "PRESENCE_EVENTS__SINKS".into(),
            format!("[{{name: hook, type: webhook, url: \"{url}\", secret: \"{SECRET}\", batch_max: 25, timeout: 2s}}]"),
        ),
        ("PRESENCE_EVENTS__OUTBOX__MAX_EVENTS".into(), max_events.to_string()),
        ("PRESENCE_EVENTS__OUTBOX__INITIAL_BACKOFF".into(), "50ms".into()),
        ("PRESENCE_EVENTS__OUTBOX__MAX_BACKOFF".into(), "200ms".into()),
        ("PRESENCE_LIMITS__WRITE_RATE_PER_SEC".into(), "1000".into()),
        ("PRESENCE_LIMITS__WRITE_BURST".into(), "1000".into()),
    ]
}

async fn start(env: &[(String, String)]) -> TestServer {
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start(&refs).await
}

/// `users` × `changes` status writes: user `u<i>`'s message counts 0, 1, 2, ...
async fn write_changes(s: &TestServer, users: usize, changes: usize, from: usize) {
    for c in from..from + changes {
        for u in 0..users {
            let user = format!("u{u}");
            let (code, body) = s.put_status(&user, Some(&s.token(&user)), json!({"status": "busy", "message": format!("m{c}")})).await;
            assert_eq!(code, 200, "{body}");
        }
    }
}

/// Every user's messages, in arrival order (redeliveries included).
fn messages_by_user(events: &[Value]) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for e in events.iter().filter(|e| e["type"] == "presence_updated") {
        by.entry(e["user_id"].as_str().unwrap().to_string()).or_default().push(e["message"].as_str().unwrap_or("").to_string());
    }
    by
}

/// Each user saw `m0..m<n>` in order (a redelivered batch may repeat a run: at-least-once).
fn assert_in_order_at_least_once(by: &HashMap<String, Vec<String>>, users: usize, n: usize) {
    assert_eq!(by.len(), users, "every user's events arrived");
    for (user, msgs) in by {
        let mut dedup: Vec<&String> = Vec::new();
        for m in msgs {
            let k: usize = m[1..].parse().unwrap();
            let last: Option<usize> = dedup.last().map(|l| l[1..].parse().unwrap());
            match last {
                Some(l) if k <= l => {} // a redelivery of what came already
                _ => {
                    assert_eq!(k, last.map_or(0, |l| l + 1), "{user}: {msgs:?}");
                    dedup.push(m);
                }
            }
        }
        assert_eq!(dedup.len(), n, "{user}: {msgs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receives_every_event_signed_and_in_order() {
    let (r, url) = receiver().await;
    let s = start(&sink_env(&url, 100_000)).await;
    write_changes(&s, 8, 12, 0).await;
    // A device connects and leaves: online, then offline.
    use presenced::grpc::pb;
    let mut c = pb::presence_api_client::PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let reg = pb::RegisterSessionRequest { user_id: "dora".into(), device_id: "phone".into(), ..Default::default() };
    c.register_session(s.admin_request(reg)).await.unwrap();
    c.unregister_session(s.admin_request(pb::UnregisterSessionRequest {
        user_id: "dora".into(),
        device_id: "phone".into(),
        immediate: true,
    }))
    .await
    .unwrap();
    common::eventually("all delivered", Duration::from_secs(10), async || r.events.lock().len() >= 98).await;
    let events = r.events.lock().clone();
    assert_eq!(*r.bad_signatures.lock(), 0);
    assert_in_order_at_least_once(&messages_by_user(&events), 8, 12);
    let dora: Vec<&str> = events.iter().filter(|e| e["user_id"] == "dora").map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(dora, vec!["user_online", "user_offline"]);
    // The documented schema, with the revision consumers order and deduplicate by.
    let e = events.iter().find(|e| e["type"] == "presence_updated").unwrap();
    for key in ["user_id", "status", "message", "previous", "at", "revision", "node_id", "before"] {
        assert!(e.get(key).is_some(), "{key} missing: {e}");
    }
    assert!(r.deliveries.lock().iter().all(|d| d.starts_with("test-node:hook:")), "{:?}", r.deliveries.lock());
    let (code, health) = s.get("/health").await;
    assert_eq!(code, 200);
    assert_eq!(health["data"]["status"], "ok", "{health}");
    assert_eq!(health["data"]["sinks"][0]["name"], "hook");
    assert_eq!(health["data"]["sinks"][0]["state"], "up");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_and_a_restart_meanwhile_lose_nothing() {
    let (r, url) = receiver().await;
    r.failing.store(true, Ordering::SeqCst);
    let data = tempfile::tempdir().unwrap();
    let mut env = sink_env(&url, 100_000);
    env.push(("PRESENCE_SERVICE__DATA_DIR".into(), data.path().display().to_string()));
    let s = start(&env).await;
    write_changes(&s, 5, 6, 0).await;
    common::eventually("the sink seen down", Duration::from_secs(5), async || {
        s.get("/health").await.1["data"]["sinks"][0]["state"] == "down"
    })
    .await;
    common::eventually("30 queued", Duration::from_secs(5), async || s.get("/health").await.1["data"]["sinks"][0]["outbox_events"] == 30)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, health) = s.get("/health").await;
    assert_eq!(code, 200, "a failing sink degrades health, it does not fail it");
    assert_eq!(health["data"]["status"], "degraded");
    assert!(health["data"]["sinks"][0]["lag_seconds"].as_f64().unwrap() > 0.0, "{health}");
    let m = s.scrape().await;
    assert!(common::sample(&m, "sink_delivery_failures_total{sink=\"hook\"}") >= 1.0, "{m}");
    assert_eq!(common::sample(&m, "sink_outbox_events{sink=\"hook\"}"), 30.0, "{m}");
    assert!(common::sample(&m, "sink_lag_seconds{sink=\"hook\"}") > 0.0, "{m}");
    assert!(common::sample(&m, "sink_delivery_seconds_count{sink=\"hook\",outcome=\"failed\"}") >= 1.0, "{m}");
    assert!(health["data"]["sinks"][0]["last_error"].as_str().unwrap().contains("503"), "{health}");
    // presenced stops while the receiver is still failing; it comes back on the same
    // data dir, and more changes happen.
    s.stop().await;
    let s = start(&env).await;
    write_changes(&s, 5, 4, 6).await;
    common::eventually("the 30 kept across the restart, and 20 more", Duration::from_secs(5), async || {
        s.get("/health").await.1["data"]["sinks"][0]["outbox_events"] == 50
    })
    .await;
    r.failing.store(false, Ordering::SeqCst);
    common::eventually("all delivered after the receiver recovered", Duration::from_secs(10), async || {
        s.get("/health").await.1["data"]["sinks"][0]["outbox_events"] == 0
    })
    .await;
    assert_in_order_at_least_once(&messages_by_user(&r.events.lock()), 5, 10);
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let sent = common::sample(&metrics, "sink_events_sent_total{sink=\"hook\"}");
    assert!(sent >= 50.0, "{sent}");
    assert!(common::sample(&metrics, "sink_events_retried_total{sink=\"hook\"}") > 0.0);
    assert!(common::sample(&metrics, "sink_delivery_seconds_count{sink=\"hook\",outcome=\"ok\"}") >= 1.0, "{metrics}");
    assert_eq!(s.get("/health").await.1["data"]["status"], "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_and_counts_them() {
    let (r, url) = receiver().await;
    r.failing.store(true, Ordering::SeqCst);
    let s = start(&sink_env(&url, 5)).await;
    write_changes(&s, 1, 20, 0).await;
    common::eventually("20 queued, 15 dropped", Duration::from_secs(5), async || {
        let m = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        common::sample(&m, "sink_events_dropped_total{sink=\"hook\",reason=\"outbox_full\"}") == 15.0
    })
    .await;
    common::eventually("5 queued", Duration::from_secs(5), async || s.get("/health").await.1["data"]["sinks"][0]["outbox_events"] == 5)
        .await;
    r.failing.store(false, Ordering::SeqCst);
    common::eventually("the newest 5 delivered", Duration::from_secs(10), async || r.events.lock().len() >= 5).await;
    let msgs: Vec<String> = messages_by_user(&r.events.lock()).remove("u0").unwrap();
    assert_eq!(msgs, vec!["m15", "m16", "m17", "m18", "m19"]);
    s.stop().await;
}

#[tokio::test]
async fn sink_configuration_is_validated() {
    for (sinks, key) in [
        ("[{name: hook, type: webhook, url: \"ftp://x\", secret: \"0123456789abcdef\"}]", "events.sinks[0].url"),
        ("[{name: hook, type: webhook, url: \"http://x\", secret: \"short\"}]", "events.sinks[0].secret"),
        ("[{name: \"Bad Name\", type: webhook, url: \"http://x\", secret: \"0123456789abcdef\"}]", "events.sinks[0].name"),
        (
            "[{name: a, type: webhook, url: \"http://x\", secret: \"0123456789abcdef\"}, {name: a, type: webhook, url: \"http://y\", secret: \"0123456789abcdef\"}]",
            "events.sinks[1].name",
        ),
        ("[{name: a, type: webhook, url: \"http://x\", secret: \"0123456789abcdef\", colour: red}]", "colour"),
        ("[{name: a, type: webhook, url: \"http://x\", secret: \"0123456789abcdef\", unroutable: drop}]", "events.sinks[0].unroutable"),
        ("[{name: a, type: amqp, url: \"amqp://h\", unroutable: lose}]", "unroutable"),
    ] {
        let e = presenced::config::Config::load(None, [("PRESENCE_EVENTS__SINKS", sinks)]).unwrap_err().to_string();
        assert!(e.contains(key), "{sinks}: {e}");
    }
    let ok = presenced::config::Config::load(
        None,
        [("PRESENCE_EVENTS__SINKS", "[{name: hook, type: webhook, url: \"https://example.com/h\", secret: \"0123456789abcdef\"}]")],
    )
    .unwrap();
    assert!(!format!("{ok:?}").contains("0123456789abcdef"), "the secret never reaches a log");
    assert!(!serde_yaml::to_string(&ok.redacted()).unwrap().contains("0123456789abcdef"));
    let amqp = presenced::config::Config::load(
        None,
        [("PRESENCE_EVENTS__SINKS", "[{name: r, type: amqp, url: \"amqp://svc:pw-rabbit-77@h:5672/%2f\"}]")],
    )
    .unwrap();
    assert!(!format!("{amqp:?}").contains("pw-rabbit-77"));
    let printed = serde_yaml::to_string(&amqp.redacted()).unwrap();
    assert!(!printed.contains("pw-rabbit-77") && printed.contains("amqp://svc:<redacted>@h:5672"), "{printed}");
}

// Cluster mode: each node delivers the transitions it made, not those it relays for its
// watchers, so a change reaches the sink once even when every node follows the user.
on_engines!(each_node_delivers_its_own_transitions_once: nats);
async fn each_node_delivers_its_own_transitions_once(e: common::engine::Engine) {
    let (r, url) = receiver().await;
    let env = sink_env(&url, 100_000);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a_data = a_dir.path().display().to_string();
    let b_data = b_dir.path().display().to_string();
    let a = e.node_with("node-a", &[extra.clone(), vec![("PRESENCE_SERVICE__DATA_DIR", a_data.as_str())]].concat()).await;
    let b = e.node_with("node-b", &[extra, vec![("PRESENCE_SERVICE__DATA_DIR", b_data.as_str())]].concat()).await;
    // B follows u0 (a WebSocket watcher there), so B relays u0's events from A.
    let mut watcher = b.watch("w", &["u0"]).await;
    watcher.next("u0").await;
    write_changes(&a, 1, 5, 0).await;
    // B relayed them (pushes to a watcher coalesce: wait for the last one, not for five).
    watcher.until("u0", |p| p["message"] == "m4").await;
    common::eventually("A's 5 delivered", Duration::from_secs(10), async || r.events.lock().len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = messages_by_user(&r.events.lock()).remove("u0").unwrap();
    assert_eq!(msgs, vec!["m0", "m1", "m2", "m3", "m4"], "each once: B did not deliver what it relayed");
    let events = r.events.lock().clone();
    assert!(events.iter().filter(|e| e["user_id"] == "u0").all(|e| e["node_id"] == "node-a"));
    // The watcher's own connection is B's transition, delivered by B.
    assert!(events.iter().any(|e| e["user_id"] == "w" && e["type"] == "user_online" && e["node_id"] == "node-b"));
    assert!(r.deliveries.lock().iter().any(|d| d.starts_with("node-b:hook:")));
    a.stop().await;
    b.stop().await;
}

/// A consumer of the `presence` exchange: a durable queue bound to `presence.#`, whose
/// deliveries (routing key, event) it keeps. Reconnects when the broker comes back.
struct AmqpConsumer {
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl AmqpConsumer {
    async fn start(url: String) -> AmqpConsumer {
        let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let bound = Arc::new(tokio::sync::Notify::new());
        let (g, b) = (got.clone(), bound.clone());
        tokio::spawn(async move {
            use futures_util::StreamExt;
            use lapin::options::*;
            use lapin::types::FieldTable;
            loop {
                let Ok(conn) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(ch) = conn.create_channel().await else { continue };
                let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
                ch.exchange_declare("presence".into(), lapin::ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
                let q = QueueDeclareOptions { durable: true, ..Default::default() };
                ch.queue_declare("test-events".into(), q, FieldTable::default()).await.unwrap();
                ch.queue_bind(
                    "test-events".into(),
                    "presence".into(),
                    "presence.#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
                let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
                let mut consumer = ch.basic_consume("test-events".into(), "test".into(), no_ack, FieldTable::default()).await.unwrap();
                b.notify_one();
                while let Some(Ok(d)) = consumer.next().await {
                    let v: Value = serde_json::from_slice(&d.data).unwrap();
                    g.lock().push((d.routing_key.to_string(), v));
                }
                // The broker went away: connect again.
            }
        });
        tokio::time::timeout(Duration::from_secs(30), bound.notified()).await.expect("consumer bound");
        AmqpConsumer { got }
    }

    fn events(&self) -> Vec<Value> {
        self.got.lock().iter().map(|(_, v)| v.clone()).collect()
    }
}

fn amqp_env(url: &str, data: &str) -> Vec<(String, String)> {
    vec![
        ("PRESENCE_EVENTS__SINKS".into(), format!("[{{name: rabbit, type: amqp, url: \"{url}\", batch_max: 20, timeout: 3s}}]")),
        ("PRESENCE_EVENTS__OUTBOX__INITIAL_BACKOFF".into(), "100ms".into()),
        ("PRESENCE_EVENTS__OUTBOX__MAX_BACKOFF".into(), "500ms".into()),
        ("PRESENCE_LIMITS__WRITE_RATE_PER_SEC".into(), "1000".into()),
        ("PRESENCE_LIMITS__WRITE_BURST".into(), "1000".into()),
        ("PRESENCE_SERVICE__DATA_DIR".into(), data.into()),
    ]
}

/// RabbitMQ (seed 002's other broker): every event on the durable topic exchange
/// `presence` with routing key `presence.<type>.<user>`, confirmed; the broker killed
/// while changes happen and presenced restarted meanwhile, then the broker back: nothing
/// lost, each user's events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sink_publishes_confirmed_and_survives_a_broker_outage_and_a_restart() {
    let mut rabbit = tokio::task::spawn_blocking(common::rabbit::RabbitServer::start).await.unwrap();
    let consumer = AmqpConsumer::start(rabbit.url()).await;
    let data = tempfile::tempdir().unwrap();
    let env = amqp_env(&rabbit.url(), &data.path().display().to_string());
    let s = start(&env).await;
    write_changes(&s, 3, 4, 0).await;
    common::eventually("12 events consumed", Duration::from_secs(15), async || consumer.events().len() >= 12).await;
    {
        let got = consumer.got.lock();
        let (key, v) = &got[0];
        assert_eq!(key, &format!("presence.presence_updated.{}", v["user_id"].as_str().unwrap()));
        assert!(got.iter().all(|(k, v)| *k == format!("presence.{}.{}", v["type"].as_str().unwrap(), v["user_id"].as_str().unwrap())));
    }
    assert_eq!(s.get("/health").await.1["data"]["sinks"][0]["type"], "amqp");

    // The broker dies; changes go on; presenced restarts meanwhile; more changes.
    rabbit.stop();
    write_changes(&s, 3, 3, 4).await;
    common::eventually("the sink seen down", Duration::from_secs(10), async || {
        s.get("/health").await.1["data"]["sinks"][0]["state"] == "down"
    })
    .await;
    s.stop().await;
    let s = start(&env).await;
    write_changes(&s, 3, 3, 7).await;
    common::eventually("18 waiting in the outbox", Duration::from_secs(5), async || {
        s.get("/health").await.1["data"]["sinks"][0]["outbox_events"] == 18
    })
    .await;
    let mut rabbit = tokio::task::spawn_blocking(move || {
        rabbit.restart();
        rabbit
    })
    .await
    .unwrap();
    common::eventually("all 30 consumed after the broker came back", Duration::from_secs(30), async || {
        all_arrived(&consumer.events(), 3, 10)
    })
    .await;
    assert_in_order_at_least_once(&messages_by_user(&consumer.events()), 3, 10);
    assert_eq!(s.get("/health").await.1["data"]["sinks"][0]["state"], "up");
    s.stop().await;
    rabbit.stop();
}

/// With no queue bound to the exchange, nothing is lost: the exchange exists from the
/// start (a consumer may check for it first), every event comes back unroutable and waits
/// in the outbox (the sink `down`, saying why); once a queue is bound, all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_exchange_with_no_queue_bound_keeps_the_events_until_one_is() {
    let rabbit = tokio::task::spawn_blocking(common::rabbit::RabbitServer::start).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let s = start(&amqp_env(&rabbit.url(), &data.path().display().to_string())).await;
    common::eventually("the sink checked up before any event", Duration::from_secs(10), async || {
        s.get("/health").await.1["data"]["sinks"][0]["state"] == "up"
    })
    .await;
    {
        use lapin::options::ExchangeDeclareOptions;
        let conn = lapin::Connection::connect(&rabbit.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
        ch.exchange_declare("presence".into(), lapin::ExchangeKind::Topic, passive, lapin::types::FieldTable::default())
            .await
            .expect("the exchange exists before the first event");
    }
    write_changes(&s, 2, 3, 0).await;
    common::eventually("unroutable events kept", Duration::from_secs(10), async || {
        let h = s.get("/health").await.1;
        let sink = &h["data"]["sinks"][0];
        sink["state"] == "down"
            && sink["outbox_events"] == 6
            && sink["last_error"].as_str().is_some_and(|e| e.contains("no queue is bound to exchange presence"))
    })
    .await;
    let consumer = AmqpConsumer::start(rabbit.url()).await;
    common::eventually("all 6 consumed once a queue is bound", Duration::from_secs(15), async || all_arrived(&consumer.events(), 2, 3))
        .await;
    assert_in_order_at_least_once(&messages_by_user(&consumer.events()), 2, 3);
    common::eventually("the sink up again, its outbox empty", Duration::from_secs(5), async || {
        let h = s.get("/health").await.1;
        h["data"]["sinks"][0]["state"] == "up" && h["data"]["sinks"][0]["outbox_events"] == 0
    })
    .await;
    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("sink_delivery_failures_total{sink=\"rabbit\"}") && !l.ends_with(" 0")), "{metrics}");
    s.stop().await;
}

/// A sink pointed at nothing shows `down` (with the reason) before any event, not `up`;
/// one pointed at a receiver shows `up`; a webhook receiver that takes only POSTs is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_are_checked_at_start() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (_r, url) = receiver().await;
    let sinks = format!(
        "[{{name: gone, type: webhook, url: \"http://127.0.0.1:{closed}/hook\", secret: \"{SECRET}\", timeout: 1s}}, \
          {{name: here, type: webhook, url: \"{url}\", secret: \"{SECRET}\", timeout: 1s}}, \
          {{name: nobroker, type: amqp, url: \"amqp://guest:guest@127.0.0.1:{closed}/%2f\", timeout: 1s}}]"
    );
    let s = start(&[("PRESENCE_EVENTS__SINKS".into(), sinks)]).await;
    common::eventually("each sink's state known", Duration::from_secs(10), async || {
        let h = s.get("/health").await.1;
        let st = |i: usize| h["data"]["sinks"][i]["state"].as_str().unwrap_or_default().to_string();
        st(0) == "down" && st(1) == "up" && st(2) == "down"
    })
    .await;
    let h = s.get("/health").await.1;
    assert!(h["data"]["sinks"][0]["last_error"].as_str().unwrap().contains("HEAD http://127.0.0.1"), "{h}");
    assert!(h["data"]["sinks"][2]["last_error"].as_str().unwrap().contains("AMQP connect"), "{h}");
    assert_eq!(h["data"]["sinks"][0]["outbox_events"], 0, "nothing was sent to find out");
    assert_eq!(h["data"]["status"], "degraded", "{h}");
    s.stop().await;
}

/// Whether every user's events m0..m<n> have arrived (in any state of duplication).
fn all_arrived(events: &[Value], users: usize, n: usize) -> bool {
    let by = messages_by_user(events);
    by.len() == users && by.values().all(|m| (0..n).all(|k| m.contains(&format!("m{k}"))))
}

/// Kafka through librdkafka's mock cluster (the real wire protocol, in this process): every
/// event a record keyed by user id on `presence.events` (JSON) and, from a second sink,
/// on `presence.events.pb` as protobuf `PresenceEvent`; a broker outage with a presenced
/// restart meanwhile loses nothing, and each user's records stay in order.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_keys_by_user_keeps_order_and_survives_an_outage_and_a_restart() {
    use prost::Message as _;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("presence.events", 3, 1).unwrap();
    mock.create_topic("presence.events.pb", 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    // (key, type header, partition, event)
    type Records = Arc<Mutex<Vec<(String, String, i32, Value)>>>;
    let got: Records = Arc::default();
    let pb_got: Arc<Mutex<Vec<presenced::grpc::pb::PresenceEvent>>> = Arc::default();
    let mut consumers = Vec::new();
    for (topic, group) in [("presence.events", "json"), ("presence.events.pb", "pb")] {
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", group)
            .set("reconnect.backoff.max.ms", "200")
            .create()
            .unwrap();
        // Assigned, not subscribed: no group rebalance to wait for.
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let (g, p) = (got.clone(), pb_got.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else { continue };
                let payload = m.payload().unwrap_or_default();
                if m.topic() == "presence.events" {
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                    let kind = m.headers().and_then(|h| h.iter().find(|x| x.key == "type")).and_then(|x| x.value).unwrap_or_default();
                    let v: Value = serde_json::from_slice(payload).unwrap();
                    g.lock().push((key, String::from_utf8_lossy(kind).to_string(), m.partition(), v));
                } else {
                    p.lock().push(presenced::grpc::pb::PresenceEvent::decode(payload).unwrap());
                }
            }
        }));
    }
    let data = tempfile::tempdir().unwrap();
    let sinks = format!(
        "[{{name: kafka, type: kafka, brokers: \"{brokers}\", batch_max: 20, timeout: 2s, \
            properties: {{reconnect.backoff.max.ms: \"200\"}}}}, \
          {{name: kafka-pb, type: kafka, brokers: \"{brokers}\", topic: presence.events.pb, format: protobuf, compression: gzip}}]"
    );
    let env: Vec<(String, String)> = vec![
        ("PRESENCE_EVENTS__SINKS".into(), sinks),
        ("PRESENCE_EVENTS__OUTBOX__INITIAL_BACKOFF".into(), "100ms".into()),
        ("PRESENCE_EVENTS__OUTBOX__MAX_BACKOFF".into(), "500ms".into()),
        ("PRESENCE_LIMITS__WRITE_RATE_PER_SEC".into(), "1000".into()),
        ("PRESENCE_LIMITS__WRITE_BURST".into(), "1000".into()),
        ("PRESENCE_SERVICE__DATA_DIR".into(), data.path().display().to_string()),
    ];
    let s = start(&env).await;
    write_changes(&s, 4, 3, 0).await;
    common::eventually("12 records consumed", Duration::from_secs(20), async || got.lock().len() >= 12).await;
    {
        let g = got.lock();
        // Keyed by user, the type in a header, one user's records in one partition.
        assert!(g.iter().all(|(k, kind, _, v)| v["user_id"] == k.as_str() && v["type"] == kind.as_str()));
        for u in 0..4 {
            let parts: std::collections::HashSet<i32> = g.iter().filter(|x| x.0 == format!("u{u}")).map(|x| x.2).collect();
            assert_eq!(parts.len(), 1, "u{u} spread over partitions {parts:?}");
        }
    }
    common::eventually("protobuf records", Duration::from_secs(20), async || pb_got.lock().len() >= 12).await;
    {
        let p = pb_got.lock();
        let e = p.iter().find(|e| e.presence.as_ref().is_some_and(|x| x.user_id == "u0")).unwrap();
        assert_eq!(e.kind, presenced::grpc::pb::presence_event::Kind::PresenceUpdated as i32);
        assert_eq!(e.presence.as_ref().unwrap().status, presenced::grpc::pb::Status::Busy as i32);
    }

    // The broker goes down; changes go on; presenced restarts meanwhile.
    mock.broker_down(1).unwrap();
    write_changes(&s, 4, 2, 3).await;
    common::eventually("the kafka sink seen down", Duration::from_secs(20), async || {
        s.get("/health").await.1["data"]["sinks"][0]["state"] == "down"
    })
    .await;
    s.stop().await;
    let s = start(&env).await;
    write_changes(&s, 4, 2, 5).await;
    mock.broker_up(1).unwrap();
    common::eventually("all 28 records consumed", Duration::from_secs(30), async || {
        let events: Vec<Value> = got.lock().iter().map(|x| x.3.clone()).collect();
        all_arrived(&events, 4, 7)
    })
    .await;
    let events: Vec<Value> = got.lock().iter().map(|x| x.3.clone()).collect();
    assert_in_order_at_least_once(&messages_by_user(&events), 4, 7);
    s.stop().await;
    // Consumers go before the cluster they talk to (else closing them waits for it).
    for c in consumers {
        c.abort();
        let _ = c.await;
    }
    drop(mock);
}

/// A lone node (the embedded store) that is drained and not restarted reports its users
/// offline to its sinks once, at exit: it does not keep sessions across a restart, and
/// exit comes before the end of the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_lone_node_reports_its_users_offline_to_its_sinks_at_exit() {
    let (r, url) = receiver().await;
    let mut env = sink_env(&url, 1000);
    env.push(("PRESENCE_PRESENCE__OFFLINE_GRACE".into(), "30s".into()));
    let s = start(&env).await;
    let mut ws = common::wsclient::connect(&s, "erin", "phone").await;
    common::eventually("online delivered", Duration::from_secs(5), async || r.events.lock().iter().any(|e| e["type"] == "user_online"))
        .await;
    let stopping = tokio::spawn(s.stop());
    assert_eq!(ws.closed().await, Some(tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Restart));
    stopping.await.unwrap();
    let offline: Vec<Value> = r.events.lock().iter().filter(|e| e["type"] == "user_offline").cloned().collect();
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert_eq!(offline[0]["user_id"], "erin");
}
