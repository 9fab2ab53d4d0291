//! Export and erasure (`GET /api/v2/users/{id}/export`, `DELETE /api/v2/users/{id}`, gRPC
//! `EraseUser`) on the embedded store and on real NATS and Redis engines: the user is
//! gone from reads, from others' contacts and from conversations, on every node; their
//! sockets close with 4003; one `user_erased` event reaches a sink.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::engine::Engine;
use common::wsclient;
use common::*;
use parking_lot::Mutex;
use presenced::grpc::pb;
use serde_json::{json, Value};

const MESSAGE: &str = "erase-me-Kestrel-5521";

/// A webhook receiver keeping every event.
async fn receiver() -> (Arc<Mutex<Vec<Value>>>, String) {
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = events.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                kept.lock().extend(v["events"].as_array().unwrap().iter().cloned());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (events, url)
}

fn sink(url: &str) -> String {
    format!("[{{name: hook, type: webhook, url: \"{url}\", secret: \"0123456789abcdef0123\", batch_max: 25, timeout: 2s}}]")
}

async fn call(s: &TestServer, method: reqwest::Method, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = s.client.request(method, s.url(path)).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    decode(r.send().await.unwrap()).await
}

/// alice: busy with a message, contacts [bob], privacy contacts, member of c1 with bob;
/// bob lists alice and carol.
async fn seed(s: &TestServer) {
    let (alice, bob, admin) = (s.token("alice"), s.token("bob"), s.admin_token("backend"));
    let put = reqwest::Method::PUT;
    assert_eq!(call(s, put.clone(), "/api/v2/presence/alice", &alice, Some(json!({"status": "busy", "message": MESSAGE}))).await.0, 200);
    assert_eq!(call(s, put.clone(), "/api/v2/contacts/alice", &alice, Some(json!({"contacts": ["bob"]}))).await.0, 200);
    assert_eq!(call(s, put.clone(), "/api/v2/presence/alice/privacy", &alice, Some(json!({"visibility": "contacts"}))).await.0, 200);
    assert_eq!(call(s, put.clone(), "/api/v2/contacts/bob", &bob, Some(json!({"contacts": ["alice", "carol"]}))).await.0, 200);
    assert_eq!(call(s, put, "/api/v2/conversations/c1/members", &admin, Some(json!({"members": ["alice", "bob"]}))).await.0, 200);
}

/// After an erasure done through any node: `s` (any node) no longer knows alice.
async fn assert_gone(s: &TestServer) {
    let (bob, admin) = (s.token("bob"), s.admin_token("backend"));
    let get = reqwest::Method::GET;
    eventually("alice reads as unknown", Duration::from_secs(10), async || s.get("/api/v2/presence/alice").await.0 == 404).await;
    eventually("bob's contacts without alice", Duration::from_secs(10), async || {
        call(s, get.clone(), "/api/v2/contacts/bob", &bob, None).await.1["data"]["contacts"] == json!(["carol"])
    })
    .await;
    eventually("c1 without alice", Duration::from_secs(10), async || {
        call(s, get.clone(), "/api/v2/conversations/c1/members", &admin, None).await.1["data"]["members"] == json!(["bob"])
    })
    .await;
    let (code, body) = call(s, get, "/api/v2/users/alice/export", &admin, None).await;
    assert_error(&(code, body), 404, "not_found");
    // And stays gone once the sockets' own endings (and any grace) have run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.get("/api/v2/presence/alice").await.0, 404, "the erased user came back");
}

async fn one_erased_event(events: &Arc<Mutex<Vec<Value>>>) {
    let erased = || events.lock().iter().filter(|e| e["type"] == "user_erased" && e["user_id"] == "alice").count();
    eventually("a user_erased event at the sink", Duration::from_secs(10), async || erased() >= 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(erased(), 1, "exactly one user_erased event");
    let ev = events.lock().iter().find(|e| e["type"] == "user_erased").cloned().unwrap();
    assert_eq!(ev["status"], "offline", "{ev}");
    assert!(ev.get("message").is_none_or(|m| m.is_null() || m == ""), "the event carries nothing of the user: {ev}");
    assert!(ev["before"].is_null(), "no copy of the erased presence in the event: {ev}");
    assert!(ev["last_seen"].is_null() && ev["devices"] == json!([]), "{ev}");
}

#[tokio::test]
async fn export_then_erase_on_the_embedded_store() {
    let (events, url) = receiver().await;
    let data = tempfile::tempdir().unwrap();
    let s =
        TestServer::start(&[("PRESENCE_EVENTS__SINKS", &sink(&url)), ("PRESENCE_SERVICE__DATA_DIR", data.path().to_str().unwrap())]).await;
    seed(&s).await;
    let mut ws = wsclient::connect(&s, "alice", "laptop").await;
    let (alice, bob) = (s.token("alice"), s.token("bob"));

    // Export: the user (or an admin) only.
    let (code, body) = call(&s, reqwest::Method::GET, "/api/v2/users/alice/export", &bob, None).await;
    assert_error(&(code, body), 403, "forbidden");
    let (code, ex) = call(&s, reqwest::Method::GET, "/api/v2/users/alice/export", &alice, None).await;
    assert_eq!(code, 200, "{ex}");
    let d = &ex["data"];
    assert_eq!(d["presence"]["status"], "busy", "{ex}");
    assert_eq!(d["presence"]["message"], MESSAGE);
    assert_eq!(d["contacts"], json!(["bob"]));
    assert_eq!(d["privacy"]["visibility"], "contacts");
    assert_eq!(d["conversations"], json!(["c1"]));
    assert_eq!(d["listed_as_contact_by"], 1);
    assert_eq!(d["sessions"][0]["device_id"], "laptop");

    // Erase: bob may not; alice may.
    let (code, body) = call(&s, reqwest::Method::DELETE, "/api/v2/users/alice", &bob, None).await;
    assert_error(&(code, body), 403, "forbidden");
    let (code, er) = call(&s, reqwest::Method::DELETE, "/api/v2/users/alice", &alice, None).await;
    assert_eq!(code, 200, "{er}");
    assert_eq!(er["data"], json!({"user_id": "alice", "sessions_ended": 1, "removed_from_contacts": 1, "removed_from_conversations": 1}));
    assert_eq!(ws.closed().await.map(u16::from), Some(4003), "alice's socket closes with 4003");
    assert_gone(&s).await;
    let (code, body) = call(&s, reqwest::Method::DELETE, "/api/v2/users/alice", &s.admin_token("backend"), None).await;
    assert_error(&(code, body), 404, "not_found");
    one_erased_event(&events).await;
    // The database file was rewritten without her records.
    let db = std::fs::read(data.path().join("presence.redb")).unwrap();
    assert!(!db.windows(MESSAGE.len()).any(|w| w == MESSAGE.as_bytes()), "the erased message is still in presence.redb");
    s.stop().await;
    // A restart on the same data dir: she stays gone, and the rewrite kept everyone else's data.
    let s = TestServer::start(&[("PRESENCE_SERVICE__DATA_DIR", data.path().to_str().unwrap())]).await;
    assert_gone(&s).await;
    s.stop().await;
}

/// Two nodes on one engine: alice's socket is on node b, the erasure goes through node a
/// (by gRPC `EraseUser`, with an admin token).
async fn erase_across_nodes(engine: Engine, grace: &str) {
    let (events, url) = receiver().await;
    // With an offline grace (where given): the closed sockets' sessions must not bring the
    // user back.
    let grace = ("PRESENCE_PRESENCE__OFFLINE_GRACE", grace);
    let a = engine.node_with("node-a", &[("PRESENCE_EVENTS__SINKS", &sink(&url)), grace]).await;
    let b = engine.node_with("node-b", &[grace]).await;
    seed(&a).await;
    let mut ws = wsclient::connect(&b, "alice", "phone").await;
    let admin = a.admin_token("backend");
    eventually("node a sees alice online", Duration::from_secs(10), async || {
        call(&a, reqwest::Method::GET, "/api/v2/presence/alice", &admin, None).await.1["data"]["alice"]["device_count"] == 1
    })
    .await;
    let mut grpc = pb::presence_api_client::PresenceApiClient::connect(a.grpc.clone()).await.unwrap();
    let r = grpc.erase_user(a.admin_request(pb::EraseUserRequest { user_id: "alice".into() })).await.expect("EraseUser").into_inner();
    assert_eq!((r.sessions_ended, r.removed_from_contacts, r.removed_from_conversations), (1, 1, 1));
    assert_eq!(ws.closed().await.map(u16::from), Some(4003), "the socket on the other node closes");
    assert_gone(&a).await;
    assert_gone(&b).await;
    one_erased_event(&events).await;
    let again = grpc.erase_user(a.admin_request(pb::EraseUserRequest { user_id: "alice".into() })).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn erase_on_nats() {
    erase_across_nodes(Engine::nats(), "1s").await;
}

#[tokio::test]
async fn erase_on_redis() {
    erase_across_nodes(Engine::redis(), "1s").await;
}

/// A `PRESENCE_EVENTS` stream made by a version without erasure gains its subject at
/// start, so `user_erased` events are kept like the others.
#[tokio::test]
async fn an_older_event_stream_gains_the_erased_subject() {
    let nats = common::nats::NatsServer::start("");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let old: Vec<String> = ["presence.update.>", "presence.expire.>", "presence.online.>", "presence.offline.>"].map(String::from).to_vec();
    js.get_or_create_stream(async_nats::jetstream::stream::Config { name: "PRESENCE_EVENTS".into(), subjects: old, ..Default::default() })
        .await
        .unwrap();
    let url = nats.url();
    let s = TestServer::start(&[("PRESENCE_STORE__BACKEND", "nats"), ("PRESENCE_NATS__URLS", &url)]).await;
    let subjects = js.get_stream("PRESENCE_EVENTS").await.unwrap().info().await.unwrap().config.subjects.clone();
    assert!(subjects.contains(&"presence.erased.>".to_string()), "{subjects:?}");
    // And an erasure's event is in it.
    seed(&s).await;
    let (code, _) = call(&s, reqwest::Method::DELETE, "/api/v2/users/alice", &s.token("alice"), None).await;
    assert_eq!(code, 200);
    let stream = js.get_stream("PRESENCE_EVENTS").await.unwrap();
    eventually("the erasure in the stream", Duration::from_secs(10), async || {
        stream.get_last_raw_message_by_subject("presence.erased.alice").await.is_ok()
    })
    .await;
    s.stop().await;
}
