//! Hostile clients on real sockets: stalled request heads and idle keep-alive connections
//! are closed (WebSockets are not), malformed WebSocket frames get the RFC 6455 close
//! codes, scopes are split on U+0020 only, new connections are rate limited per IP, and
//! `WatchPresence` streams are capped per process.

mod common;

use std::time::{Duration, Instant};

use common::wsclient::connect;
use common::TestServer;
use futures_util::StreamExt;
use presenced::grpc::pb;
use presenced::grpc::pb::presence_api_client::PresenceApiClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the socket; returns how long that took (panics after `within`).
async fn closed_within(sock: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the socket open for {within:?}"),
        }
    }
}

const FAST: [(&str, &str); 2] = [("PRESENCE_LIMITS__HEADER_READ_TIMEOUT", "500ms"), ("PRESENCE_LIMITS__IDLE_TIMEOUT", "1s")];

#[tokio::test]
async fn stalled_heads_and_idle_connections_are_closed_but_websockets_are_not() {
    let s = TestServer::start(&FAST).await;
    // Half a request line, then nothing.
    let mut half = TcpStream::connect(addr(&s.base)).await.unwrap();
    half.write_all(b"GET /api/v2/pres").await.unwrap();
    let t = closed_within(&mut half, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(400), "closed too early: {t:?}");
    // Headers that never end.
    let mut headers = TcpStream::connect(addr(&s.base)).await.unwrap();
    headers.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n").await.unwrap();
    closed_within(&mut headers, Duration::from_secs(5)).await;
    // Connected, silent.
    let mut silent = TcpStream::connect(addr(&s.base)).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    // A keep-alive connection after one good request: closed after the idle timeout,
    // not the (shorter) header timeout.
    let mut keep = TcpStream::connect(addr(&s.base)).await.unwrap();
    keep.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = keep.read(&mut buf).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("HTTP/1.1 200"));
    let t = closed_within(&mut keep, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(800), "idle keep-alive closed after {t:?}");
    // A WebSocket silent for longer than both timeouts stays open and works.
    let mut ws = connect(&s, "alice", "d").await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let ack = ws.ack(json!({"type":"heartbeat","id":1})).await;
    assert_eq!(ack["type"], "ack");
    // gRPC: half the HTTP/2 preface, then nothing.
    let mut g = TcpStream::connect(addr(&s.grpc)).await.unwrap();
    g.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    closed_within(&mut g, Duration::from_secs(5)).await;
    // A gRPC stream that waits for events longer than the idle timeout is not idle.
    let mut c = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let mut stream = c
        .watch_presence(pb::WatchPresenceRequest { user_ids: vec!["bob".into()], all: false, conversation_ids: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().snapshot);
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    s.put_status("bob", Some(&s.token("bob")), json!({"status":"away"})).await;
    let ev = tokio::time::timeout(Duration::from_secs(3), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.presence.unwrap().status, pb::Status::Away as i32);
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l.starts_with(r#"connections_timed_out_total{reason="header_read"}"#) && !l.ends_with(" 0")), "{text}");
    s.stop().await;
}

/// Completes a WebSocket handshake and hands back the raw socket, to write frames the
/// client library would never produce.
async fn raw_ws(s: &TestServer) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr(&s.base)).await.unwrap();
    let url = format!("ws://{}/ws?device_id=raw&token={}", addr(&s.base), s.token("mallory"));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.contains("\"connected\"") {
                return ws;
            }
        }
    }
}

/// A masked client frame with the given first byte and payload.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

async fn close_code(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Option<CloseCode> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.expect("a close frame within 5s") {
            Some(Ok(Message::Close(f))) => return f.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn malformed_frames_get_1002_and_bad_utf8_1007() {
    let s = TestServer::start(&[]).await;
    // Reserved bits set: a protocol error.
    let mut ws = raw_ws(&s).await;
    ws.get_mut().write_all(&frame(0xC1, b"{}")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Protocol));
    // An unknown opcode.
    let mut ws = raw_ws(&s).await;
    ws.get_mut().write_all(&frame(0x83, b"x")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Protocol));
    // A text frame that is not UTF-8.
    let mut ws = raw_ws(&s).await;
    ws.get_mut().write_all(&frame(0x81, &[0xff, 0xfe, 0x41])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Invalid));
    // The session of each ended.
    common::eventually("sessions ended", Duration::from_secs(5), async || {
        s.get("/api/v2/presence/mallory").await.1["data"]["mallory"]["device_count"] == 0
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn scopes_are_split_on_spaces_only() {
    let s = TestServer::start(&[]).await;
    for (scope, code) in [("foo\u{a0}presence:admin", 403), ("foo\tpresence:admin", 403), ("foo presence:admin", 200)] {
        let token = s.svc.auth.mint("mallory", Duration::from_secs(60), Some(scope)).unwrap();
        let (got, body) = s.put_status("victim", Some(&token), json!({"status":"busy"})).await;
        assert_eq!(got, code, "scope {scope:?}: {body}");
    }
    s.stop().await;
}

#[tokio::test]
async fn new_connections_are_rate_limited_per_address() {
    let s = TestServer::start(&[("PRESENCE_LIMITS__CONNECTIONS_PER_IP_PER_SEC", "0.5"), ("PRESENCE_LIMITS__CONNECTION_BURST_PER_IP", "3")])
        .await;
    let auth = format!("Bearer {}", s.token("alice"));
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(
            common::wsclient::connect_with(&s, &format!("?device_id=d{i}"), &[("authorization", &auth)]).await.expect("within the burst"),
        );
    }
    let e = common::wsclient::connect_with(&s, "?device_id=d9", &[("authorization", &auth)]).await.err().expect("over the rate");
    assert_eq!((e.0, e.1["code"].as_str()), (429, Some("rate_limited")));
    // Another address is not affected.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(addr(&s.base).parse().unwrap()).await.unwrap();
    let url = format!("ws://{}/ws?device_id=other&token={}", addr(&s.base), s.token("bob"));
    assert!(tokio_tungstenite::client_async(url, tcp).await.is_ok(), "127.0.0.2 has its own budget");
    // gRPC: each new connection counts; the one over the rate is refused call by call.
    let mut refused = 0;
    for _ in 0..5 {
        let mut c = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
        match c.get_presence(pb::GetPresenceRequest { user_ids: vec!["alice".into()] }).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 2, "a burst of 3 new gRPC connections, then refusals");
    drop(open);
    s.stop().await;
}

#[tokio::test]
async fn watch_streams_are_capped_per_process_and_per_connection() {
    let s = TestServer::start(&[
        ("PRESENCE_LIMITS__GRPC_MAX_WATCH_STREAMS", "3"),
        ("PRESENCE_LIMITS__GRPC_MAX_WATCHED_IDS", "8"),
        ("PRESENCE_LIMITS__GRPC_MAX_CONCURRENT_STREAMS", "4"),
    ])
    .await;
    let c = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let watch = |ids: &[&str]| {
        let mut c = c.clone();
        let req = pb::WatchPresenceRequest { user_ids: ids.iter().map(|s| s.to_string()).collect(), all: false, conversation_ids: vec![] };
        async move { c.watch_presence(req).await }
    };
    let a = watch(&["a", "b"]).await.unwrap();
    let b = watch(&["c"]).await.unwrap();
    let e = watch(&["d", "e", "f", "g", "h", "i"]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "over the watched-ids budget: {e:?}");
    let third = watch(&["z"]).await.unwrap();
    let e = watch(&["y"]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "over the stream cap: {e:?}");
    assert!(e.message().contains("WatchPresence"), "{}", e.message());
    drop(b);
    common::eventually("a slot is free again", Duration::from_secs(5), async || watch(&["y"]).await.is_ok()).await;
    let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for reason in ["streams", "ids"] {
        let line = text.lines().find(|l| l.starts_with(&format!(r#"grpc_watch_refused_total{{reason="{reason}"}}"#))).unwrap_or_default();
        assert!(!line.is_empty() && !line.ends_with(" 0"), "refusals counted by {reason}: {text}");
    }
    drop((a, third));
    s.stop().await;

    // Per connection: the server allows 2 concurrent calls (SETTINGS_MAX_CONCURRENT_STREAMS);
    // a third call on the same connection waits for a slot.
    let s = TestServer::start(&[("PRESENCE_LIMITS__GRPC_MAX_CONCURRENT_STREAMS", "2")]).await;
    let mut c = PresenceApiClient::connect(s.grpc.clone()).await.unwrap();
    let one =
        c.watch_presence(pb::WatchPresenceRequest { user_ids: vec!["a".into()], all: false, conversation_ids: vec![] }).await.unwrap();
    let _two =
        c.watch_presence(pb::WatchPresenceRequest { user_ids: vec!["b".into()], all: false, conversation_ids: vec![] }).await.unwrap();
    let mut c3 = c.clone();
    let third = tokio::spawn(async move { c3.get_presence(pb::GetPresenceRequest { user_ids: vec!["a".into()] }).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third concurrent call on one connection must wait");
    drop(one);
    let r = tokio::time::timeout(Duration::from_secs(5), third).await.expect("runs once a slot is free").unwrap();
    assert!(r.is_ok());
    s.stop().await;
}
