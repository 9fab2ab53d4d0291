//! Pub/sub on Redis: one subscription connection per node (RESP3 push messages, sharded
//! `SSUBSCRIBE` on a cluster), a router that hands each message to its consumer by
//! channel (events of watched users, typing, this node's inbox), and request/reply
//! between nodes over their inbox channels.
//!
//! Inbox frames: a header line, then the payload.
//! - `R <id> <from-node> <op>`: a request; the answer goes to `<from-node>`'s inbox as
//!   `A <id>`.
//! - `T <op>`: a notice, no answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::conn::{Conn, Connector};
use super::keys::Keys;
use crate::store::cluster::backplane::Incoming;
use crate::store::cluster::Fault;

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault(format!("redis: {e}"))
}

/// Where messages go, by channel.
#[derive(Default)]
struct Routes {
    events: Option<mpsc::Sender<Bytes>>,
    typing: Option<mpsc::Sender<Bytes>>,
    inbox: Option<mpsc::Sender<Incoming>>,
    /// Requests this node sent, waiting for their answer.
    pending: HashMap<u64, oneshot::Sender<Bytes>>,
}

pub struct PubSub {
    conn: tokio::sync::Mutex<Conn>,
    /// Where every subscription connection delivers (kept for a new connection).
    push: mpsc::UnboundedSender<PushInfo>,
    /// The channels subscribed to, to subscribe again on a new connection.
    channels: Mutex<std::collections::HashSet<String>>,
    keys: Arc<Keys>,
    node: String,
    routes: Arc<Mutex<Routes>>,
    next_id: AtomicU64,
    /// Counts the times the subscription connection was lost.
    lost: tokio::sync::watch::Receiver<u64>,
    router: JoinHandle<()>,
}

impl Drop for PubSub {
    fn drop(&mut self) {
        self.router.abort();
    }
}

/// A message's channel and payload (`message` and `smessage` pushes).
fn message(push: PushInfo) -> Option<(Vec<u8>, Bytes)> {
    if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
        return None;
    }
    let mut data = push.data.into_iter();
    let bytes = |v: Option<Value>| match v {
        Some(Value::BulkString(b)) => Some(b),
        Some(Value::SimpleString(s)) => Some(s.into_bytes()),
        _ => None,
    };
    let channel = bytes(data.next())?;
    let payload = bytes(data.next())?;
    Some((channel, Bytes::from(payload)))
}

/// Splits a frame into its header words and payload.
fn parse_frame(frame: &Bytes) -> Option<(Vec<&str>, Bytes)> {
    let nl = frame.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&frame[..nl]).ok()?;
    Some((header.split(' ').collect(), frame.slice(nl + 1..)))
}

fn frame(header: &str, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(header.len() + 1 + payload.len());
    f.extend_from_slice(header.as_bytes());
    f.push(b'\n');
    f.extend_from_slice(payload);
    f
}

impl PubSub {
    /// Opens the subscription connection and subscribes to this node's inbox.
    pub async fn open(connector: &Connector, keys: Arc<Keys>, node: &str) -> Result<PubSub, Fault> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PushInfo>();
        let conn = connector.connect(Some(tx.clone()), Some(connector.config().request_timeout.0)).await.map_err(fault)?;
        let routes = Arc::new(Mutex::new(Routes::default()));
        let r = routes.clone();
        let k = keys.clone();
        let inbox = k.inbox(node);
        let (lost_tx, lost) = tokio::sync::watch::channel(0u64);
        let router = tokio::spawn(async move {
            while let Some(push) = rx.recv().await {
                if push.kind == PushKind::Disconnection {
                    lost_tx.send_modify(|n| *n += 1);
                    continue;
                }
                let Some((channel, payload)) = message(push) else { continue };
                if channel.starts_with(k.events_channel_prefix().as_bytes()) {
                    let tx = r.lock().events.clone();
                    if let Some(tx) = tx {
                        let _ = tx.send(payload).await;
                    }
                } else if channel == k.typing_channel().as_bytes() {
                    let tx = r.lock().typing.clone();
                    if let Some(tx) = tx {
                        let _ = tx.send(payload).await;
                    }
                } else if channel == inbox.as_bytes() {
                    route_inbox(&r, payload).await;
                }
            }
        });
        let ps = PubSub {
            conn: tokio::sync::Mutex::new(conn),
            push: tx,
            channels: Mutex::default(),
            keys,
            node: node.to_string(),
            routes,
            next_id: AtomicU64::new(1),
            lost,
            router,
        };
        ps.subscribe(&ps.keys.inbox(node)).await?;
        Ok(ps)
    }

    pub async fn subscribe(&self, channel: &str) -> Result<(), Fault> {
        self.channels.lock().insert(channel.to_string());
        self.conn.lock().await.subscribe(channel).await.map_err(fault)
    }

    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Fault> {
        self.channels.lock().remove(channel);
        self.conn.lock().await.unsubscribe(channel).await.map_err(fault)
    }

    /// Counts the times the subscription connection was lost (the connection manager
    /// connects again and subscribes again by itself).
    pub fn lost(&self) -> tokio::sync::watch::Receiver<u64> {
        self.lost.clone()
    }

    /// Whether the subscription connection answers: after a reconnection, its channels
    /// are then subscribed again (the subscriptions go first on a new connection).
    pub async fn ping(&self) -> bool {
        let mut c = self.conn.lock().await.clone();
        redis::cmd("PING").query_async::<Value>(&mut c).await.is_ok()
    }

    /// Moves the subscriptions to a new connection (the master moved: a Sentinel
    /// failover; the old connection would keep retrying a dead server).
    pub async fn reconnect(&self, connector: &Connector) -> Result<(), Fault> {
        let mut conn = connector.connect(Some(self.push.clone()), Some(connector.config().request_timeout.0)).await.map_err(fault)?;
        let channels: Vec<String> = self.channels.lock().iter().cloned().collect();
        for c in &channels {
            conn.subscribe(c).await.map_err(fault)?;
        }
        *self.conn.lock().await = conn;
        Ok(())
    }

    pub fn route_events(&self, tx: mpsc::Sender<Bytes>) {
        self.routes.lock().events = Some(tx);
    }

    pub async fn route_typing(&self) -> Result<mpsc::Receiver<Bytes>, Fault> {
        let (tx, rx) = mpsc::channel(1024);
        self.routes.lock().typing = Some(tx);
        self.subscribe(&self.keys.typing_channel()).await?;
        Ok(rx)
    }

    pub fn route_inbox(&self) -> mpsc::Receiver<Incoming> {
        let (tx, rx) = mpsc::channel(1024);
        self.routes.lock().inbox = Some(tx);
        rx
    }

    /// Publishes on a channel (sharded on a cluster); returns how many subscribers got it.
    pub async fn publish(conn: &mut Conn, channel: &str, payload: &[u8]) -> Result<u64, Fault> {
        let cmd = if conn.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        redis::cmd(cmd).arg(channel).arg(payload).query_async::<u64>(conn).await.map_err(fault)
    }

    /// Sends a request to `node`'s inbox and waits for the answer.
    pub async fn request(&self, conn: &mut Conn, node: &str, op: &str, payload: &[u8], timeout: Duration) -> Result<Bytes, Fault> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.routes.lock().pending.insert(id, tx);
        let sent = Self::publish(conn, &self.keys.inbox(node), &frame(&format!("R {id} {} {op}", self.node), payload)).await;
        let r = match sent {
            // Nobody subscribed to that inbox: the node is gone (no need to wait).
            Ok(0) => Err(Fault(format!("redis: node {node} is not listening"))),
            Ok(_) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err(Fault("redis: request dropped".into())),
                Err(_) => Err(Fault(format!("redis: node {node} did not answer in time"))),
            },
            Err(e) => Err(e),
        };
        self.routes.lock().pending.remove(&id);
        r
    }

    /// Sends a notice to `node`'s inbox.
    pub async fn tell(&self, conn: &mut Conn, node: &str, op: &str, payload: &[u8]) -> Result<(), Fault> {
        Self::publish(conn, &self.keys.inbox(node), &frame(&format!("T {op}"), payload)).await.map(|_| ())
    }

    /// Answers a request (`reply` as given in [`Incoming::reply`]: `<node> <id>`).
    pub async fn respond(conn: &mut Conn, keys: &Keys, reply: &str, payload: &[u8]) -> Result<(), Fault> {
        let (node, id) = reply.split_once(' ').ok_or_else(|| Fault("redis: bad reply address".into()))?;
        Self::publish(conn, &keys.inbox(node), &frame(&format!("A {id}"), payload)).await.map(|_| ())
    }
}

async fn route_inbox(routes: &Mutex<Routes>, payload: Bytes) {
    let Some((header, body)) = parse_frame(&payload) else { return };
    let incoming = match header.as_slice() {
        ["A", id] => {
            let waiter = id.parse::<u64>().ok().and_then(|id| routes.lock().pending.remove(&id));
            if let Some(w) = waiter {
                let _ = w.send(body);
            }
            return;
        }
        ["R", id, from, op] => Incoming { op: op.to_string(), payload: body, reply: Some(format!("{from} {id}")) },
        ["T", op] => Incoming { op: op.to_string(), payload: body, reply: None },
        _ => return,
    };
    let tx = routes.lock().inbox.clone();
    if let Some(tx) = tx {
        let _ = tx.send(incoming).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Bytes::from(frame("R 7 node-a refresh", b"{\"x\":1}\nmore"));
        let (h, body) = parse_frame(&f).unwrap();
        assert_eq!(h, vec!["R", "7", "node-a", "refresh"]);
        assert_eq!(&body[..], b"{\"x\":1}\nmore");
        assert!(parse_frame(&Bytes::from_static(b"no newline")).is_none());
    }

    #[tokio::test]
    async fn answers_reach_their_waiter_and_requests_the_inbox() {
        let routes = Mutex::new(Routes::default());
        let (tx, rx) = oneshot::channel();
        routes.lock().pending.insert(3, tx);
        route_inbox(&routes, Bytes::from(frame("A 3", b"ok"))).await;
        assert_eq!(&rx.await.unwrap()[..], b"ok");
        let (itx, mut irx) = mpsc::channel(4);
        routes.lock().inbox = Some(itx);
        route_inbox(&routes, Bytes::from(frame("R 9 node-b refresh", b"q"))).await;
        let got = irx.recv().await.unwrap();
        assert_eq!((got.op.as_str(), got.reply.as_deref(), &got.payload[..]), ("refresh", Some("node-b 9"), &b"q"[..]));
        route_inbox(&routes, Bytes::from(frame("T drop", b"d"))).await;
        assert_eq!(irx.recv().await.unwrap().reply, None);
    }
}
