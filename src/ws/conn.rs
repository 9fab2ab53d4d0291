//! One WebSocket connection: a single task that reads client messages, writes what the
//! hub queued, pings, and notices staleness. One task (not a reader and a writer) keeps
//! an idle connection small.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;

use super::hub::{Conn, Hub};
use super::protocol::{self, ClientMsg};
use crate::auth::Identity;
use crate::core::ratelimit::{Rate, TokenBucket};
use crate::core::UserId;
use crate::error::close;
use crate::error::ApiError;
use crate::service::{Service, StatusWrite};

/// Runs a connection (connected to the hub before the upgrade) to its end.
pub async fn run(svc: Arc<Service>, hub: Arc<Hub>, who: Identity, conn: Arc<Conn>, mut socket: WebSocket) {
    // The user's own presence, and everyone who shares theirs with this user.
    let mut initial = vec![conn.user.clone()];
    initial.extend(svc.directory.audience_of(&conn.user));
    if let Err(e) = hub.snapshot(&conn, &initial).await {
        conn.push(protocol::error_of(&None, &e));
    }
    let end = session(&svc, &hub, &conn, &who, &mut socket).await;
    hub.disconnect(&conn).await;
    if let Some((code, reason)) = end {
        let close = socket.send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) })));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
    }
}

/// The connection loop; returns the close frame to send, if any.
async fn session(
    svc: &Arc<Service>,
    hub: &Arc<Hub>,
    conn: &Arc<Conn>,
    who: &Identity,
    socket: &mut WebSocket,
) -> Option<(u16, &'static str)> {
    let heartbeat = svc.presence.heartbeat_interval.0;
    let ttl = svc.presence.session_ttl.0;
    let rate = Rate { per_second: svc.limits.ws_messages_per_sec, burst: svc.limits.ws_message_burst };
    let mut bucket = TokenBucket::new(rate, svc.clock.now());
    let mut last_in = Instant::now();
    let mut refreshed = last_in;
    let tick = tokio::time::sleep(heartbeat.min(ttl));
    tokio::pin!(tick);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = conn.woken() => {
                if let Some(c) = conn.drain(&mut batch) {
                    return Some(c);
                }
                let n = batch.len() as u64;
                // A client that stops reading must not pin this task (and its memory) forever.
                // Boxed (like the handlers below): an idle connection's task then holds only
                // the small loop state, not room for the largest future it might await.
                let written = tokio::time::timeout(ttl, Box::pin(async {
                    for m in batch.drain(..) {
                        socket.feed(Message::Text(m)).await?;
                    }
                    socket.flush().await
                }))
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return None,
                    Err(_) => {
                        metrics::counter!("ws_dropped_total", "reason" => "write_timeout").increment(1);
                        return Some((close::TRY_AGAIN_LATER, "client stopped reading"));
                    }
                }
                metrics::counter!("ws_messages_out_total").increment(n);
            }
            msg = socket.recv() => {
                let msg = match msg {
                    None => return None,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return read_error(e),
                };
                last_in = Instant::now();
                match msg {
                    Message::Text(text) => {
                        metrics::counter!("ws_messages_in_total").increment(1);
                        if let Err(wait) = bucket.try_take(rate, svc.clock.now()) {
                            metrics::counter!("presence_rate_limited_total", "scope" => "ws_message").increment(1);
                            let e = ApiError::RateLimited { retry_after_ms: wait };
                            conn.push(protocol::error_of(&protocol::parse(&text).id, &e));
                            continue;
                        }
                        Box::pin(handle(svc, hub, conn, who, &text)).await;
                    }
                    Message::Binary(_) => {
                        conn.push(protocol::error(&None, "bad_request", "binary frames are not supported: send JSON text frames"));
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => return None,
                }
            }
            _ = &mut tick => {
                let now = Instant::now();
                if now.duration_since(last_in) >= ttl {
                    metrics::counter!("ws_stale_closed_total").increment(1);
                    return Some((close::STALE, "no traffic within session_ttl"));
                }
                if last_in > refreshed {
                    if let Err(e) = Box::pin(hub.refresh(conn)).await {
                        tracing::warn!(user = %conn.user, error = %e, "session refresh failed");
                    }
                    refreshed = now;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return None;
                }
                // Wake at the next ping, or exactly when the connection would turn stale.
                let next = (now + heartbeat).min(last_in + ttl);
                tick.as_mut().reset(tokio::time::Instant::from_std(next.max(now + std::time::Duration::from_millis(10))));
            }
        }
    }
}

/// The close frame a read error calls for (RFC 6455 §7.4.1): 1009 for an oversize
/// frame or message, 1002 for a protocol violation, 1007 for a text frame that is not
/// UTF-8. `None` when the connection is simply gone.
fn read_error(e: axum::Error) -> Option<(u16, &'static str)> {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    let e = e.into_inner().downcast::<Error>().ok()?;
    let close = match *e {
        Error::Capacity(_) => (close::TOO_BIG, "message too big"),
        Error::Utf8(_) => (close::INVALID_DATA, "text frame is not valid UTF-8"),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        Error::Protocol(_) => (close::PROTOCOL_ERROR, "protocol error"),
        _ => return None,
    };
    metrics::counter!("ws_protocol_errors_total", "close_code" => close.0.to_string()).increment(1);
    Some(close)
}

async fn handle(svc: &Arc<Service>, hub: &Arc<Hub>, conn: &Arc<Conn>, who: &Identity, text: &str) {
    let inc = protocol::parse(text);
    let msg = match inc.msg {
        Ok(m) => m,
        Err(e) => {
            conn.push(protocol::error(&inc.id, e.code, &e.message));
            return;
        }
    };
    match apply(svc, hub, conn, who, msg).await {
        Ok(snapshot) => {
            conn.push(protocol::ack(&inc.id, &inc.kind));
            if let Some(ids) = snapshot {
                if let Err(e) = hub.snapshot_asked(conn, &ids).await {
                    conn.push(protocol::error_of(&inc.id, &e));
                }
            }
        }
        Err(e) => conn.push(protocol::error_of(&inc.id, &e)),
    }
}

/// Carries out one message; `Ok(Some(ids))` asks for a snapshot of `ids` after the ack.
async fn apply(
    svc: &Arc<Service>,
    hub: &Arc<Hub>,
    conn: &Arc<Conn>,
    who: &Identity,
    msg: ClientMsg,
) -> Result<Option<Vec<UserId>>, ApiError> {
    match msg {
        ClientMsg::PresenceUpdate { online_status, custom_status, ttl } => {
            svc.set_status(who, &conn.user, StatusWrite { status: online_status, message: custom_status, ttl_seconds: ttl }).await?;
            Ok(None)
        }
        ClientMsg::Heartbeat => {
            hub.refresh(conn).await?;
            Ok(None)
        }
        ClientMsg::Typing { conversation_id, is_typing } => {
            svc.check_id("conversation id", &conversation_id)?;
            svc.typists.set(&conn.user, &conversation_id, is_typing).await?;
            Ok(None)
        }
        ClientMsg::Subscribe { user_ids } => {
            let ids = svc.parse_ids(user_ids.iter().map(String::as_str))?;
            hub.subscribe(conn, &ids)?;
            Ok(Some(ids))
        }
        ClientMsg::Unsubscribe { user_ids } => {
            let ids = svc.parse_ids(user_ids.iter().map(String::as_str))?;
            hub.unsubscribe(conn, &ids);
            Ok(None)
        }
    }
}
