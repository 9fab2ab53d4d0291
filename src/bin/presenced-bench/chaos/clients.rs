//! The clients (each lives the truth it logs), the watchers (WebSocket and gRPC: what
//! they are shown), and the HTTP reads of every node.

use super::*;

pub(super) type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Connects from 127.0.0.2-127.0.0.9 (by `user`), never from 127.0.0.1: thousands of
/// reconnects take ephemeral ports, and one taken on the nodes' own address could be the
/// port a restarting node must listen on again.
pub(super) async fn open(port: u16, user: &str, device: &str) -> Res<Ws> {
    let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + (user.bytes().map(u32::from).sum::<u32>() % 8) as u8);
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind((source, 0).into()).map_err(|e| format!("bind {source}: {e}"))?;
    let stream = sock.connect(([127, 0, 0, 1], port).into()).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("ws://127.0.0.1:{port}/ws").into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert("x-user-id", user.parse().map_err(|_| "bad user id")?);
    req.headers_mut().insert("x-device-id", device.parse().map_err(|_| "bad device id")?);
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(ws)
}

/// Waits for the server's `connected` message.
pub(super) async fn greeted(ws: &mut Ws) -> bool {
    let wait = async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.contains("\"type\":\"connected\"") {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap_or(false)
}

pub(super) fn jitter(lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rand::random::<u64>() % (hi - lo).max(1))
}

/// One client: connects, heartbeats, obeys the scenario, reconnects as a real client
/// does, and logs when it was connected.
pub(super) async fn client(world: Arc<World>, i: usize, mut orders: mpsc::UnboundedReceiver<Order>) {
    let (user, device) = (format!("u{i}"), format!("d{i}"));
    let n = world.http_ports.len();
    let mut node = i % n;
    let mut wait = Duration::ZERO;
    let mut attempt = 0u32;
    loop {
        if world.stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(wait).await;
        let target = world.live_node(node);
        let mut ws = match open(world.http_ports[target], &user, &device).await {
            Ok(ws) => ws,
            Err(_) => {
                attempt += 1;
                node = target + 1;
                wait = jitter(250, 500 << attempt.min(3));
                continue;
            }
        };
        if !greeted(&mut ws).await {
            node = target + 1;
            wait = jitter(250, 1000);
            continue;
        }
        attempt = 0;
        node = target;
        let since = world.epoch.ms();
        world.truths[i].lock().intervals.push((since, None, node));
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + world.heartbeat, world.heartbeat);
        let mut last_sent = since;
        let end = |world: &World, at: i64| {
            if let Some(last) = world.truths[i].lock().intervals.last_mut() {
                last.1 = Some(at);
            }
        };
        let next = loop {
            tokio::select! {
                _ = beat.tick() => {
                    if ws.send(Message::Text(crate::HEARTBEAT.into())).await.is_err() {
                        break None;
                    }
                    last_sent = world.epoch.ms();
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Close(f))) => break Some(f.map_or(0, |f| u16::from(f.code))),
                    None | Some(Err(_)) => break None,
                    Some(Ok(_)) => {}
                },
                o = orders.recv() => match o {
                    Some(Order::Drop { back_ms, to }) => {
                        end(&world, world.epoch.ms());
                        drop(ws);
                        wait = Duration::from_millis(back_ms);
                        node = to.unwrap_or(node);
                        break Some(u16::MAX);
                    }
                    Some(Order::Leave) => {
                        let at = world.epoch.ms();
                        end(&world, at);
                        world.truths[i].lock().left = Some((at, false));
                        let _ = ws.close(None).await;
                        return;
                    }
                    Some(Order::Silent) => {
                        // Last heard: the last frame it sent. The socket stays open, unread.
                        end(&world, last_sent);
                        world.truths[i].lock().left = Some((last_sent, true));
                        while !world.stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        return;
                    }
                    None => return,
                },
            }
        };
        match next {
            Some(u16::MAX) => continue, // dropped on order: `wait` and `node` are set
            Some(1012) => {
                end(&world, world.epoch.ms());
                node += 1;
                wait = jitter(0, 1000);
            }
            _ => {
                end(&world, world.epoch.ms());
                node += 1;
                wait = jitter(500, 2000);
            }
        }
    }
}

#[derive(serde::Deserialize)]
pub(super) struct Push {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) payload: serde_json::Value,
}

/// A WebSocket watcher on `node`, subscribed to users `users`: logs every push. Comes
/// back to the same node when it is up again.
pub(super) async fn ws_watcher(world: Arc<World>, node: usize, k: usize, users: std::ops::Range<usize>, log: Arc<Log>) {
    let me = format!("watch-{node}-{k}");
    let ids: Vec<String> = users.clone().map(|u| format!("u{u}")).collect();
    while !world.stop.load(Ordering::Relaxed) {
        if !world.up[node].load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let Ok(mut ws) = open(world.http_ports[node], &me, "watch").await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let sub = serde_json::json!({"type": "subscribe", "payload": {"user_ids": ids}, "id": 1}).to_string();
        if ws.send(Message::Text(sub.into())).await.is_err() {
            continue;
        }
        let conn = log.open(world.epoch.ms());
        let mut snapshotted = vec![false; users.len()];
        let mut beat = tokio::time::interval(world.heartbeat);
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    if ws.send(Message::Text(crate::HEARTBEAT.into())).await.is_err() {
                        break;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let Ok(p) = serde_json::from_str::<Push>(&t) else { continue };
                        if p.kind != "presence_update" {
                            continue;
                        }
                        let Some(user) = p.payload["user_id"].as_str().and_then(|u| u.strip_prefix('u')).and_then(|u| u.parse::<usize>().ok()) else { continue };
                        if !users.contains(&user) {
                            continue;
                        }
                        let snapshot = !std::mem::replace(&mut snapshotted[user - users.start], true);
                        let online = p.payload["status"] != "offline";
                        log.seen.lock().push(Seen { at: world.epoch.ms(), user, online, snapshot, conn });
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                },
            }
            if world.stop.load(Ordering::Relaxed) {
                return;
            }
        }
        log.close(conn, world.epoch.ms());
    }
}

/// A gRPC `WatchPresence {all: true}` stream on `node`: logs every event, and the
/// snapshot-free transitions as such. Opens again when the stream ends.
pub(super) async fn grpc_watcher(world: Arc<World>, grpc: u16, log: Arc<Log>, users: usize) {
    use presenced::grpc::pb;
    use presenced::grpc::pb::presence_api_client::PresenceApiClient;
    use presenced::grpc::pb::presence_event::Kind;
    let auth = presenced::auth::Authenticator::new(crate::BENCH_SECRET, "presence-service", Duration::from_secs(30), None);
    let Ok(token) = auth.mint("chaos", Duration::from_secs(24 * 3600), Some(presenced::auth::ADMIN_SCOPE)) else { return };
    let Ok(bearer) = format!("Bearer {token}").parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>() else { return };
    while !world.stop.load(Ordering::Relaxed) {
        let Ok(ep) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}")) else { return };
        let Ok(channel) = ep.connect_timeout(Duration::from_secs(2)).connect().await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut c = PresenceApiClient::new(channel);
        let req = crate::authed(pb::WatchPresenceRequest { user_ids: Vec::new(), all: true, conversation_ids: vec![] }, &bearer);
        let Ok(stream) = c.watch_presence(req).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let conn = log.open(world.epoch.ms());
        while let Ok(Some(ev)) = stream.message().await {
            let Some(p) = ev.presence else { continue };
            let Some(user) = p.user_id.strip_prefix('u').and_then(|u| u.parse::<usize>().ok()).filter(|u| *u < users) else { continue };
            let online = match Kind::try_from(ev.kind) {
                Ok(Kind::UserOnline) => true,
                Ok(Kind::UserOffline) => false,
                _ => continue, // device-list updates and expiries are no transition of connectivity
            };
            log.seen.lock().push(Seen { at: world.epoch.ms(), user, online, snapshot: ev.snapshot, conn });
        }
        log.close(conn, world.epoch.ms());
        if world.stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every user's status as node `port` reads it (`None` if the node does not answer).
pub(super) async fn read_all(port: u16, users: usize) -> Option<Vec<bool>> {
    let mut out = Vec::with_capacity(users);
    for chunk in (0..users).collect::<Vec<_>>().chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|u| format!("u{u}")).collect();
        let body = serde_json::json!({ "user_ids": ids }).to_string();
        let v = post_json(port, "/api/v2/presence/batch", &body).await?;
        for id in &ids {
            out.push(v["data"][id]["status"].as_str()? != "offline");
        }
    }
    Some(out)
}

pub(super) async fn post_json(port: u16, path: &str, body: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let body = text.split("\r\n\r\n").nth(1)?;
        let (a, b) = (body.find('{')?, body.rfind('}')?);
        serde_json::from_str(&body[a..=b]).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), io).await.ok().flatten()
}
