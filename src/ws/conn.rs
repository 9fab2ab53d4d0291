//! One WebSocket connection: a single task that reads client messages, writes what the
//! hub queued, pings, and notices staleness. One task (not a reader and a writer) keeps
//! an idle connection small.
//!
//! The loop is generic over the socket (any `Sink<Message> + Stream<Item = Result<Message>>`,
//! as axum's chat example does), so the protocol is tested with an in-memory socket and a
//! paused clock, without the network.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::client::Client;
use super::hub::Hub;
use super::protocol::{self, ClientMsg};
use crate::auth::Identity;
use crate::core::ratelimit::{Rate, TokenBucket};
use crate::core::UserId;
use crate::error::close;
use crate::error::ApiError;
use crate::service::sessions::Leave;
use crate::service::{Service, StatusWrite};

/// What the connection loop reads from and writes to: the upgraded socket
/// ([`super::upgrade::WsSocket`]), or a test's.
pub trait Socket: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin + Send {}

impl<S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin + Send> Socket for S {}

/// Runs a connection (connected to the hub before the upgrade) to its end.
///
/// This future is the connection's task for its whole life, so its size is memory per
/// connection: an `async move` block rather than an `async fn` (whose body keeps a second
/// copy of its arguments, rust-lang/rust#62958), with the transient steps boxed.
#[allow(clippy::manual_async_fn)] // on purpose, as said above
pub fn run<S: Socket>(
    svc: Arc<Service>,
    hub: Arc<Hub>,
    who: Identity,
    conn: Arc<Client>,
    mut socket: S,
) -> impl Future<Output = ()> + Send {
    async move {
        // The user's own presence, and everyone who shares theirs with this user.
        let mut initial = vec![conn.user.clone()];
        initial.extend(svc.directory.audience_of(&conn.user));
        if let Err(e) = Box::pin(hub.snapshot(&conn, &initial)).await {
            conn.push(protocol::error_of(&None, &e));
        }
        drop(initial);
        let (end, leave) = session(&svc, &hub, &conn, &who, &mut socket).await;
        Box::pin(hub.disconnect(&conn, leave)).await;
        if let Some((code, reason)) = end {
            Box::pin(close_with(&mut socket, code, reason)).await;
        }
    }
}

async fn close_with(socket: &mut impl Socket, code: u16, reason: &'static str) {
    let close = socket.send(Message::Close(Some(CloseFrame { code: code.into(), reason: Utf8Bytes::from_static(reason) })));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
}

/// The connection loop; returns the close frame to send, if any, and how the device left
/// (a `bye`, or gone: last heard at the close, or at its last frame when it went silent).
async fn session(
    svc: &Arc<Service>,
    hub: &Arc<Hub>,
    conn: &Arc<Client>,
    who: &Identity,
    socket: &mut impl Socket,
) -> (Option<(u16, &'static str)>, Leave) {
    let heard = |quiet_for: std::time::Duration| svc.clock.now() - quiet_for.as_millis() as i64;
    match run_loop(svc, hub, conn, who, socket).await {
        Exit::Closed(c) => (c, Leave::Lost { last_heard: svc.clock.now() }),
        // Closed by the server (a drain, a slow reader): a client that was heard within a
        // ping's window is there now, and gets the whole grace; one already overdue keeps
        // the moment it was last heard (a silent device is not held longer for the close).
        Exit::Shut { close, quiet_for } => {
            let overdue = quiet_for > ping_after(svc.presence.heartbeat_interval.0, svc.presence.session_ttl.0);
            (Some(close), Leave::Lost { last_heard: if overdue { heard(quiet_for) } else { svc.clock.now() } })
        }
        Exit::Silent { close, quiet_for } => (Some(close), Leave::Lost { last_heard: heard(quiet_for) }),
        Exit::Bye => (Some((close::NORMAL, "bye")), Leave::Bye),
    }
}

/// How the connection loop ended.
enum Exit {
    /// The socket closed or failed (a close frame to send back, if any).
    Closed(Option<(u16, &'static str)>),
    /// The server closes it (a drain, a client too slow); its last frame came `quiet_for` ago.
    Shut { close: (u16, &'static str), quiet_for: std::time::Duration },
    /// No inbound traffic for `session_ttl`: the device was last heard `quiet_for` ago.
    Silent { close: (u16, &'static str), quiet_for: std::time::Duration },
    /// The client said `bye` (its session has ended; the ack is written).
    Bye,
}

/// What answering one text frame did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handled {
    Other,
    /// A heartbeat that refreshed the session.
    Beat,
    /// A `bye`: the session ended; the connection closes.
    Bye,
}

async fn run_loop(svc: &Arc<Service>, hub: &Arc<Hub>, conn: &Arc<Client>, who: &Identity, socket: &mut impl Socket) -> Exit {
    let heartbeat = svc.presence.heartbeat_interval.0;
    let ttl = svc.presence.session_ttl.0;
    let quiet = ping_after(heartbeat, ttl);
    let rate = Rate { per_second: svc.limits.ws_messages_per_sec, burst: svc.limits.ws_message_burst };
    let mut bucket = TokenBucket::new(rate, svc.clock.now());
    let mut last_in = Instant::now();
    let mut refreshed = last_in;
    // The timer is due only when the connection has been quiet for `quiet`: every frame
    // that comes in moves it. A client that heartbeats at the advertised interval is
    // never woken for it (a timer of its own next to its heartbeats was a second wake-up
    // per interval for every connection, and wake-ups are most of what an idle
    // connection costs the CPU).
    let tick = tokio::time::sleep(quiet);
    tokio::pin!(tick);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = conn.woken() => {
                if let Some(close) = conn.drain(&mut batch) {
                    return Exit::Shut { close, quiet_for: last_in.elapsed() };
                }
                if let Some(exit) = write_batch(socket, &mut batch, ttl).await {
                    return exit;
                }
            }
            msg = socket.next() => {
                let msg = match msg {
                    None => return Exit::Closed(None),
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Exit::Closed(read_error(e)),
                };
                last_in = Instant::now();
                match msg {
                    Message::Text(text) => {
                        metrics::counter!("ws_messages_in_total").increment(1);
                        if let Err(wait) = bucket.try_take(rate, svc.clock.now()) {
                            metrics::counter!("presence_rate_limited_total", "scope" => "ws_message").increment(1);
                            let e = ApiError::RateLimited { retry_after_ms: wait };
                            conn.push(protocol::error_of(&protocol::parse(&text).id, &e));
                        } else {
                            match Box::pin(handle(svc, hub, conn, who, &text)).await {
                                Handled::Beat => refreshed = last_in,
                                Handled::Bye => {
                                    // The ack goes out before the close frame.
                                    let _ = conn.drain(&mut batch);
                                    return write_batch(socket, &mut batch, ttl).await.unwrap_or(Exit::Bye);
                                }
                                Handled::Other => {}
                            }
                        }
                    }
                    Message::Binary(_) => {
                        conn.push(protocol::error(&None, "bad_request", "binary frames are not supported: send JSON text frames"));
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    Message::Close(_) => return Exit::Closed(None),
                }
                // Any traffic keeps the session alive (a browser that only answers pings,
                // a client that only sends updates): refreshed at most twice an interval.
                if last_in.duration_since(refreshed) >= heartbeat / 2 {
                    if let Err(e) = Box::pin(hub.refresh(conn)).await {
                        tracing::warn!(user = %conn.user, error = %e, "session refresh failed");
                    }
                    refreshed = last_in;
                }
                tick.as_mut().reset(last_in + quiet);
            }
            _ = &mut tick => {
                // Quiet for `quiet` (or since the last ping): stale past the TTL, else a
                // ping, whose pong counts as traffic. At 600,000 sessions on one box,
                // pings and pongs next to the clients' heartbeats were two of every three
                // frames, and the CPU went to the kernel's TCP: a client that speaks is
                // never pinged.
                let now = Instant::now();
                if now.duration_since(last_in) >= ttl {
                    metrics::counter!("ws_stale_closed_total").increment(1);
                    return Exit::Silent { close: (close::STALE, "no traffic within session_ttl"), quiet_for: now.duration_since(last_in) };
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return Exit::Closed(None);
                }
                // The next ping an interval later, or exactly when the connection turns stale.
                let next = (now + heartbeat).min(last_in + ttl);
                tick.as_mut().reset(next.max(now + std::time::Duration::from_millis(10)));
            }
        }
    }
}

/// Writes what the hub queued; `Some` when the connection must end (the socket failed, or
/// the client stopped reading for `ttl`).
async fn write_batch(socket: &mut impl Socket, batch: &mut Vec<Utf8Bytes>, ttl: std::time::Duration) -> Option<Exit> {
    let n = batch.len() as u64;
    // A client that stops reading must not pin this task (and its memory) forever.
    // Boxed (like the handlers): an idle connection's task then holds only the small loop
    // state, not room for the largest future it might await.
    let written = {
        let mut write = Box::pin(async {
            for m in batch.drain(..) {
                socket.feed(Message::Text(m)).await?;
            }
            socket.flush().await
        });
        // Most writes finish at once (the socket has room): only one that waits gets a timer.
        match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(r) => Ok(r),
            // Boxed: only a write that cannot finish at once pays for the timer, in time
            // and in the size of every connection's task.
            Poll::Pending => Box::pin(tokio::time::timeout(ttl, write)).await,
        }
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Some(Exit::Closed(None)),
        Err(_) => {
            metrics::counter!("ws_dropped_total", "reason" => "write_timeout").increment(1);
            return Some(Exit::Closed(Some((close::TRY_AGAIN_LATER, "client stopped reading"))));
        }
    }
    metrics::counter!("ws_messages_out_total").increment(n);
    if batch.capacity() > 4 {
        batch.shrink_to(4);
    }
    None
}

/// How long a connection may be quiet before it is pinged: a little over the heartbeat
/// interval (a client heartbeating at the interval it was told is never pinged), and
/// early enough before the session TTL for the pong to come back.
fn ping_after(heartbeat: std::time::Duration, ttl: std::time::Duration) -> std::time::Duration {
    heartbeat.mul_f64(1.2).min(ttl.mul_f64(0.75))
}

/// The close frame a read error calls for (RFC 6455 §7.4.1): 1009 for an oversize
/// frame or message, 1002 for a protocol violation, 1007 for a text frame that is not
/// UTF-8. `None` when the connection is simply gone.
fn read_error(e: WsError) -> Option<(u16, &'static str)> {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    let close = match e {
        Error::Capacity(_) => (close::TOO_BIG, "message too big"),
        Error::Utf8(_) => (close::INVALID_DATA, "text frame is not valid UTF-8"),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        Error::Protocol(_) => (close::PROTOCOL_ERROR, "protocol error"),
        _ => return None,
    };
    metrics::counter!("ws_protocol_errors_total", "close_code" => close.0.to_string()).increment(1);
    Some(close)
}

/// Answers one text frame.
async fn handle(svc: &Arc<Service>, hub: &Arc<Hub>, conn: &Arc<Client>, who: &Identity, text: &str) -> Handled {
    let inc = protocol::parse(text);
    let msg = match inc.msg {
        Ok(m) => m,
        Err(e) => {
            conn.push(protocol::error(&inc.id, e.code, &e.message));
            return Handled::Other;
        }
    };
    let handled = match msg {
        ClientMsg::Heartbeat => Handled::Beat,
        ClientMsg::Bye => Handled::Bye,
        _ => Handled::Other,
    };
    match apply(svc, hub, conn, who, msg).await {
        Ok(snapshot) => {
            conn.push(protocol::ack(&inc.id, &inc.kind));
            if !snapshot.users.is_empty() {
                if let Err(e) = hub.snapshot_asked(conn, &snapshot.users).await {
                    conn.push(protocol::error_of(&inc.id, &e));
                }
            }
            if !snapshot.conversations.is_empty() {
                if let Err(e) = hub.join_conversations(conn, &snapshot.conversations).await {
                    conn.push(protocol::error_of(&inc.id, &e));
                }
            }
            handled
        }
        Err(e) => {
            conn.push(protocol::error_of(&inc.id, &e));
            Handled::Other
        }
    }
}

/// What a message asks for after its ack: snapshots of users, and of conversations.
#[derive(Default)]
struct After {
    users: Vec<UserId>,
    conversations: Vec<Arc<str>>,
}

/// The user ids of a (un)subscription; none when it names conversations only.
fn user_ids_of(svc: &Service, users: &[String], conversations: &[String]) -> Result<Vec<UserId>, ApiError> {
    if users.is_empty() && !conversations.is_empty() {
        return Ok(Vec::new());
    }
    svc.parse_ids(users.iter().map(String::as_str))
}

/// Carries out one message; `Ok(after)` says which snapshots follow the ack.
async fn apply(svc: &Arc<Service>, hub: &Arc<Hub>, conn: &Arc<Client>, who: &Identity, msg: ClientMsg) -> Result<After, ApiError> {
    match msg {
        ClientMsg::PresenceUpdate { online_status, custom_status, ttl } => {
            svc.set_status(who, &conn.user, StatusWrite { status: online_status, message: custom_status, ttl_seconds: ttl }).await?;
            Ok(After::default())
        }
        ClientMsg::Heartbeat => {
            hub.refresh(conn).await?;
            Ok(After::default())
        }
        ClientMsg::Activity { active, idle_since } => {
            hub.set_activity(conn, active, idle_since).await?;
            Ok(After::default())
        }
        ClientMsg::Typing { conversation_id, is_typing } => {
            svc.check_id("conversation id", &conversation_id)?;
            svc.typists.set(&conn.user, &conversation_id, is_typing).await?;
            Ok(After::default())
        }
        ClientMsg::Subscribe { user_ids, conversation_ids } => {
            let ids = user_ids_of(svc, &user_ids, &conversation_ids)?;
            let conversations = hub.subscribe_conversations(conn, &conversation_ids)?;
            if let Err(e) = hub.subscribe(conn, &ids) {
                hub.unsubscribe_conversations(conn, &conversations);
                return Err(e);
            }
            Ok(After { users: ids, conversations })
        }
        ClientMsg::Unsubscribe { user_ids, conversation_ids } => {
            let ids = user_ids_of(svc, &user_ids, &conversation_ids)?;
            hub.unsubscribe(conn, &ids);
            hub.unsubscribe_conversations(conn, &conversation_ids);
            Ok(After::default())
        }
        ClientMsg::Bye => {
            hub.disconnect(conn, Leave::Bye).await;
            Ok(After::default())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use super::*;
    use crate::clock::Clock;
    use crate::store::memory::{MemoryConfig, MemoryStore};

    /// An in-memory socket: what the test sends comes in, what the server sends goes out.
    struct FakeSocket {
        incoming: tokio::sync::mpsc::UnboundedReceiver<Result<Message, WsError>>,
        outgoing: tokio::sync::mpsc::UnboundedSender<Message>,
    }

    impl Stream for FakeSocket {
        type Item = Result<Message, WsError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    impl Sink<Message> for FakeSocket {
        type Error = WsError;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, m: Message) -> Result<(), WsError> {
            let _ = self.outgoing.send(m);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Client {
        to_server: tokio::sync::mpsc::UnboundedSender<Result<Message, WsError>>,
        from_server: tokio::sync::mpsc::UnboundedReceiver<Message>,
        task: tokio::task::JoinHandle<()>,
        svc: Arc<Service>,
        /// The store's and the service's clock; [`Client::advance`] moves it with the runtime's.
        clock: Arc<crate::clock::ManualClock>,
        _dir: tempfile::TempDir,
    }

    impl Client {
        fn send(&self, v: serde_json::Value) {
            self.to_server.send(Ok(Message::Text(v.to_string().into()))).unwrap();
        }

        /// The next message the server sent (pings skipped), within 5 s of the test's clock.
        async fn next(&mut self) -> Message {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), self.from_server.recv()).await.expect("a message").expect("open") {
                    Message::Ping(_) => continue,
                    m => return m,
                }
            }
        }

        /// Moves the (paused) runtime clock and the store's clock by `secs`, then lets the
        /// connection run; returns how many pings the server sent meanwhile (other
        /// messages are dropped).
        async fn advance(&mut self, secs: u64) -> u32 {
            tokio::time::advance(Duration::from_secs(secs)).await;
            self.clock.advance(secs as i64 * 1000);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut pings = 0;
            while let Ok(m) = self.from_server.try_recv() {
                pings += matches!(m, Message::Ping(_)) as u32;
            }
            pings
        }

        async fn json(&mut self) -> serde_json::Value {
            match self.next().await {
                Message::Text(t) => serde_json::from_str(&t).unwrap(),
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// A node with the embedded store and one user connected over an in-memory socket.
    async fn connect(user: &str, env: &[(&str, &str)]) -> Client {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![
            ("PRESENCE_AUTH__JWT_SECRET".to_string(), "x".repeat(32)),
            ("PRESENCE_SERVICE__DATA_DIR".to_string(), dir.path().display().to_string()),
            ("PRESENCE_SERVICE__NODE_ID".to_string(), "n1".to_string()),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = crate::config::Config::load(None, vars).unwrap();
        let bus = crate::bus::EventBus::new(1024);
        let manual = Arc::new(crate::clock::ManualClock::new(1_700_000_000_000));
        let clock: Arc<dyn crate::clock::Clock> = manual.clone();
        let store = MemoryStore::open(MemoryConfig::new("n1"), clock.clone(), bus.clone()).unwrap();
        store.start();
        let app = crate::server::App::with_store(config, Arc::new(store), bus, clock).await.unwrap();
        let (svc, hub) = (app.svc.clone(), app.hub.clone());
        let who = Identity::user(user);
        let id = UserId::parse(user, 64).unwrap();
        let hello = protocol::connected(user, "d1", None, "n1", 25, 60, 5);
        let conn = hub.connect(id, Arc::from("d1"), None, false, hello).await.unwrap();
        let (to_server, incoming) = tokio::sync::mpsc::unbounded_channel();
        let (outgoing, from_server) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(svc.clone(), hub, who, conn, FakeSocket { incoming, outgoing }));
        Client { to_server, from_server, task, svc, clock: manual, _dir: dir }
    }

    #[tokio::test]
    async fn the_protocol_over_an_in_memory_socket() {
        let mut c = connect("alice", &[]).await;
        assert_eq!(c.json().await["type"], "connected");
        let own = c.json().await;
        assert_eq!((own["type"].as_str(), own["payload"]["user_id"].as_str()), (Some("presence_update"), Some("alice")));
        c.send(serde_json::json!({"type": "heartbeat", "id": 1}));
        let ack = c.json().await;
        assert_eq!((ack["type"].as_str(), ack["id"].as_i64()), (Some("ack"), Some(1)));
        c.to_server.send(Ok(Message::Text("{nope".into()))).unwrap();
        assert_eq!(c.json().await["payload"]["code"], "malformed");
        c.to_server.send(Ok(Message::Binary(vec![1u8, 2].into()))).unwrap();
        assert_eq!(c.json().await["payload"]["code"], "bad_request");
        c.send(serde_json::json!({"type": "subscribe", "payload": {"user_ids": ["bob"]}, "id": "s"}));
        assert_eq!(c.json().await["type"], "ack");
        let snap = c.json().await;
        assert_eq!((snap["payload"]["user_id"].as_str(), snap["payload"]["status"].as_str()), (Some("bob"), Some("offline")));
        c.send(serde_json::json!({"type": "presence_update", "payload": {"online_status": "busy"}, "id": 2}));
        let mut seen = [c.json().await, c.json().await];
        seen.sort_by_key(|m| m["type"].to_string());
        assert_eq!((seen[0]["type"].as_str(), seen[1]["payload"]["status"].as_str()), (Some("ack"), Some("busy")));
        // The client goes away without a word: the session is held for the offline
        // grace (10 s), then ends.
        drop(c.to_server);
        c.task.await.unwrap();
        let alice = UserId::parse("alice", 64).unwrap();
        let p = c.svc.get_many(std::slice::from_ref(&alice)).await.unwrap().remove(0);
        assert_eq!((p.status, p.device_count), (crate::core::Status::Busy, 1), "held for the grace");
        c.clock.advance(10_000);
        let mut p = c.svc.get_many(std::slice::from_ref(&alice)).await.unwrap().remove(0);
        for _ in 0..100 {
            if p.last_seen == Some(c.clock.now() - 10_000) && p.status == crate::core::Status::Offline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            p = c.svc.get_many(std::slice::from_ref(&alice)).await.unwrap().remove(0);
        }
        assert_eq!((p.status, p.device_count), (crate::core::Status::Offline, 0));
        assert_eq!(p.last_seen, Some(c.clock.now() - 10_000), "last seen when the socket went, not at the end of the grace");
    }

    /// `bye`: acked, then closed with 1000; the session ends at once (no grace).
    #[tokio::test]
    async fn bye_ends_the_session_at_once_and_closes_normally() {
        let mut c = connect("bo", &[]).await;
        assert_eq!(c.json().await["type"], "connected");
        c.json().await;
        c.send(serde_json::json!({"type": "bye", "id": 9}));
        let ack = c.json().await;
        assert_eq!((ack["type"].as_str(), ack["id"].as_i64()), (Some("ack"), Some(9)));
        match c.next().await {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), close::NORMAL),
            other => panic!("expected close 1000, got {other:?}"),
        }
        c.task.await.unwrap();
        let p = c.svc.get_many(&[UserId::parse("bo", 64).unwrap()]).await.unwrap().remove(0);
        assert_eq!((p.status, p.device_count, p.last_seen), (crate::core::Status::Offline, 0, Some(c.clock.now())));
    }

    /// Staleness on a paused clock: no inbound traffic for `session_ttl` closes with 4002.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_4002_after_the_session_ttl() {
        let mut c = connect("sam", &[("PRESENCE_PRESENCE__SESSION_TTL", "60s"), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "25s")]).await;
        assert_eq!(c.json().await["type"], "connected");
        c.json().await;
        tokio::time::advance(Duration::from_secs(59)).await;
        c.send(serde_json::json!({"type": "heartbeat", "id": 1}));
        assert_eq!(c.json().await["type"], "ack", "still open after 59 s");
        tokio::time::advance(Duration::from_secs(61)).await;
        match c.next().await {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), close::STALE),
            other => panic!("expected close 4002, got {other:?}"),
        }
        c.task.await.unwrap();
    }

    /// Pings go to quiet clients only: one that heartbeats gets none, one that stops gets
    /// its first 30 s (1.2 intervals) after its last frame, then one per interval; a pong
    /// counts as traffic, keeps the connection open and refreshes the session.
    #[tokio::test(start_paused = true)]
    async fn only_a_client_that_went_quiet_is_pinged() {
        let mut c = connect("pia", &[("PRESENCE_PRESENCE__SESSION_TTL", "60s"), ("PRESENCE_PRESENCE__HEARTBEAT_INTERVAL", "25s")]).await;
        assert_eq!(c.json().await["type"], "connected");
        c.json().await;
        let mut pings = 0;
        for _ in 0..8 {
            pings += c.advance(10).await;
            c.send(serde_json::json!({"type": "heartbeat"}));
        }
        pings += c.advance(0).await;
        assert_eq!(pings, 0, "a client heartbeating every 10 s is never pinged");
        assert_eq!((c.advance(29).await, c.advance(1).await), (0, 1), "first ping 30 s after the last frame");
        assert_eq!((c.advance(24).await, c.advance(1).await), (0, 1), "unanswered: the next an interval later");
        let pia = UserId::parse("pia", 64).unwrap();
        for i in 0..5 {
            c.to_server.send(Ok(Message::Pong(Default::default()))).unwrap();
            c.advance(0).await;
            let devices = c.svc.sessions.devices(&pia).await.unwrap();
            assert_eq!(devices.len(), 1);
            assert_eq!(devices[0].expires_at, c.clock.now() + 60_000, "the pong refreshed the session (round {i})");
            assert_eq!((c.advance(29).await, c.advance(1).await), (0, 1), "pinged 30 s after the pong (round {i})");
        }
        assert!(!c.task.is_finished(), "pongs alone kept it open for 205 s");
    }
}
