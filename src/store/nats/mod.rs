//! Cluster mode on NATS JetStream (seed 003 §5): the [`Backplane`] over four KV buckets
//! and core NATS subjects. The node logic is [`crate::store::cluster`].
//!
//! | what | where |
//! |---|---|
//! | a user's record | bucket `<bucket>`, key `user.<id>` |
//! | directory rows | bucket `<bucket>_directory`, key `<table>.<key>` |
//! | node leases | bucket `<bucket>_nodes`, key `node.<node>` |
//! | owner index | bucket `<bucket>_owners`, key `<node>.<user>` |
//! | events | `presence.{update,expire,online,offline}.<id>`, kept by the `PRESENCE_EVENTS` stream |
//! | typing | `presence.typing.<conversation>` |
//! | node requests | `presence.node.<node>.{refresh,drop}` (request/reply) |
//! | write-back notices | `presence.sync.<node>` |
//!
//! Ids in keys and subjects are encoded with [`encode_id`]. Revisions are the KV's; the
//! users bucket's watcher keeps every node's read cache coherent.

mod conn;
pub mod embedded;
pub mod kv;

pub use conn::{Nats, NatsError};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv as jkv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cluster::backplane::{Feed, Incoming, RowChange};
use super::cluster::{Backplane, ClusterOptions, ClusterStore, Fault, Health, Names, Refused, Space, Versioned};
use super::{DirTable, StoreError};
use crate::bus::EventBus;
use crate::clock::Clock;
use crate::config::NatsConfig;
use crate::core::{EventKind, UserId};
use kv::{self as nkv, decode_id, encode_id, BucketConfig};

/// Subjects of presence events.
pub const EVENT_SUBJECTS: [&str; 5] =
    ["presence.update.>", "presence.expire.>", "presence.online.>", "presence.offline.>", "presence.erased.>"];

/// Why a write is refused while the center is unreachable.
pub const DEGRADED: &str = "the presence store at the center (NATS JetStream) is unreachable: this node is in degraded mode \
     (reads come from its cache and are marked stale; statuses cannot be written until the center is back)";

pub static NAMES: Names = Names {
    backend: "nats",
    degraded: "nats_degraded",
    cas_writes: "nats_kv_writes_total",
    cas_conflicts: "nats_kv_cas_conflicts_total",
    interest_users: "nats_interest_users",
    interest_all: "nats_interest_all",
    interest_waits: "nats_interest_waits_total",
    events_received: "nats_events_received_total",
    events_out_of_order: "nats_events_out_of_order_total",
    publish_timeouts: "nats_publish_timeouts_total",
    forwarded_heartbeats: "nats_forwarded_heartbeats_total",
    janitor_claims: "nats_janitor_claims_total",
    janitor_spared: "nats_janitor_spared_total",
    lease_lost: "nats_lease_lost_total",
    lease_renewed_at: "nats_lease_renewed_at_seconds",
    degraded_local_changes: "nats_degraded_local_changes_total",
    repairs: "nats_sessions_repaired_total",
    made_up: "nats_events_made_up_total",
    adopted: "nats_sessions_adopted_total",
    directory_rewatch: "nats_directory_rewatch_total",
    degraded_reason: DEGRADED,
};

pub fn subject(kind: EventKind, id: &UserId) -> String {
    let k = match kind {
        EventKind::PresenceUpdated => "update",
        EventKind::PresenceExpired => "expire",
        EventKind::UserOnline => "online",
        EventKind::UserOffline => "offline",
        EventKind::UserErased => "erased",
    };
    format!("presence.{k}.{}", encode_id(id.as_str()))
}

fn dir_key(table: DirTable, key: &str) -> String {
    format!("{}.{}", table.name(), encode_id(key))
}

fn parse_dir_key(k: &str) -> Option<(DirTable, String)> {
    let (t, enc) = k.split_once('.')?;
    Some((DirTable::from_name(t)?, decode_id(enc)?))
}

fn node_subject(node: &str, op: &str) -> String {
    format!("presence.node.{}.{op}", encode_id(node))
}

/// Connects, makes sure the buckets and the event stream exist, and opens a cluster node.
pub async fn open(cfg: &NatsConfig, opts: ClusterOptions, clock: Arc<dyn Clock>, bus: EventBus) -> Result<ClusterStore, StoreError> {
    let bp = NatsBackplane::connect(cfg, &opts).await?;
    ClusterStore::open(Arc::new(bp), opts, clock, bus).await
}

/// The KV buckets.
struct Buckets {
    /// One key per user (`user.<id>`): the user's whole state.
    users: jkv::Store,
    /// The directory's rows (`<table>.<key>`).
    dir: jkv::Store,
    /// Node leases (`node.<node>`): O(nodes) keys.
    nodes: jkv::Store,
    /// Owner index (`<node>.<user>`): which users a node holds sessions of.
    owners: jkv::Store,
    /// The users bucket again, through the subscriptions' connection: its watch.
    users_watch: jkv::Store,
}

/// Two connections per node. Requests (KV reads and writes, lease renewals, node
/// requests) go on `nats`; the streams a node follows (every watched user's events, the
/// users bucket's watch, typing) arrive on `feed`. On one connection, a reply waited
/// behind whatever stream data the server had queued before it: at 52 nodes during a
/// connect ramp, lease renewals took up to 57 s and KV calls timed out.
pub struct NatsBackplane {
    nats: Nats,
    feed: Nats,
    kv: Buckets,
    /// The KV request timeout (also bounds each fetch of a key listing).
    timeout: Duration,
    /// See [`Backplane::resumed`].
    resumed: tokio::sync::watch::Receiver<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault(format!("nats: {e}"))
}

/// The server refused our credentials (a configuration mistake, not a late server).
fn refused_credentials(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("authorization violation") || m.contains("authentication") || m.contains("invalid credentials")
}

/// A JetStream context on `nats` (in the configured domain, if any).
fn context(nats: &Nats, cfg: &NatsConfig, timeout: Duration) -> jetstream::Context {
    let mut js = if cfg.jetstream.domain.is_empty() {
        jetstream::new(nats.client.clone())
    } else {
        jetstream::with_domain(nats.client.clone(), &cfg.jetstream.domain)
    };
    js.set_timeout(timeout);
    js
}

/// Why `PRESENCE_EVENTS` could not be created, with what to change when the server has less
/// JetStream storage than `events.max_bytes` reserves (nats-server sizes `max_file_store`
/// from the free disk when its config does not set it).
fn stream_error(e: &jetstream::context::CreateStreamError, max_bytes: u64) -> String {
    let short = matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED || j.error_code() == jetstream::ErrorCode::INSUFFICIENT_RESOURCES);
    let hint = if short {
        format!(
            "; the stream reserves nats.events.max_bytes ({max_bytes} bytes) of the server's JetStream storage: lower nats.events.max_bytes, \
             or give nats-server more (its jetstream max_file_store; unset, it is 75 % of the free disk)"
        )
    } else {
        String::new()
    };
    format!("cannot create stream PRESENCE_EVENTS: {e}{hint}")
}

fn record(e: jkv::Entry) -> Versioned {
    let value = (e.operation == jkv::Operation::Put).then_some(e.value);
    Versioned { value, revision: e.revision }
}

impl NatsBackplane {
    pub async fn connect(cfg: &NatsConfig, opts: &ClusterOptions) -> Result<NatsBackplane, StoreError> {
        let unavailable = |e: String| StoreError::Unreachable(format!("nats: {e}"));
        // The connect error already says "nats: ...".
        let nats = Nats::connect(cfg, &format!("presenced-{}", opts.node_id)).await.map_err(|e| match &e {
            NatsError::Credentials { .. } => StoreError::Misconfigured(e.to_string()),
            NatsError::Connect { message, .. } if refused_credentials(message) => StoreError::Misconfigured(e.to_string()),
            NatsError::Connect { .. } => StoreError::Unreachable(e.to_string()),
        })?;
        let js = context(&nats, cfg, opts.kv_timeout);
        let open = |js: jetstream::Context, name: String| async move {
            let bucket = BucketConfig { name, replicas: cfg.kv.replicas, file_storage: true };
            nkv::open_bucket(&js, &bucket).await.map_err(|e| unavailable(e.to_string()))
        };
        let users = open(js.clone(), cfg.kv.bucket.clone()).await?;
        let dir = open(js.clone(), format!("{}_directory", cfg.kv.bucket)).await?;
        let nodes = open(js.clone(), format!("{}_nodes", cfg.kv.bucket)).await?;
        let owners = open(js.clone(), format!("{}_owners", cfg.kv.bucket)).await?;
        let feed = Nats::connect(cfg, &format!("presenced-{}-feed", opts.node_id)).await.map_err(|e| unavailable(e.to_string()))?;
        let users_watch = open(context(&feed, cfg, opts.kv_timeout), cfg.kv.bucket.clone()).await?;
        let events = stream::Config {
            name: "PRESENCE_EVENTS".into(),
            subjects: EVENT_SUBJECTS.iter().map(|s| s.to_string()).collect(),
            max_age: cfg.events.max_age.0.max(Duration::from_secs(1)),
            max_bytes: i64::try_from(cfg.events.max_bytes.0).unwrap_or(i64::MAX),
            storage: stream::StorageType::File,
            num_replicas: cfg.kv.replicas.max(1),
            ..Default::default()
        };
        let stream = js.get_or_create_stream(events.clone()).await.map_err(|e| unavailable(stream_error(&e, cfg.events.max_bytes.0)))?;
        // A stream made by an older version lacks a newer event's subjects (`presence.erased.>`).
        let have = &stream.cached_info().config.subjects;
        if !events.subjects.iter().all(|s| have.contains(s)) {
            let mut updated = stream.cached_info().config.clone();
            updated.subjects = events.subjects.clone();
            js.update_stream(updated)
                .await
                .map_err(|e| unavailable(format!("cannot add the new event subjects to PRESENCE_EVENTS: {e}")))?;
        }
        let (resumed, resumes) = tokio::sync::watch::channel(0u64);
        let follow = tokio::spawn(count_resumes(nats.clone(), feed.clone(), resumed, opts.kv_timeout));
        Ok(NatsBackplane {
            nats,
            feed,
            kv: Buckets { users, dir, nodes, owners, users_watch },
            timeout: opts.kv_timeout,
            resumed: resumes,
            tasks: Mutex::new(vec![follow]),
        })
    }

    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// The bucket and key of a record.
    fn locate(&self, space: Space<'_>, key: &str) -> (&jkv::Store, String) {
        match space {
            Space::Users => (&self.kv.users, format!("user.{}", encode_id(key))),
            Space::Leases => (&self.kv.nodes, format!("node.{}", encode_id(key))),
            Space::Owners(node) => (&self.kv.owners, format!("{}.{}", encode_id(node), encode_id(key))),
            Space::Instances => (&self.kv.nodes, format!("instance.{}", encode_id(key))),
        }
    }

    /// Forwards every message of `sub` to `tx` (payloads that `keep` accepts) until
    /// either side ends.
    fn forward(&self, mut sub: async_nats::Subscriber, tx: mpsc::Sender<Bytes>, keep: fn(&str) -> bool) {
        let h = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if keep(&m.subject) && tx.send(m.payload).await.is_err() {
                    return;
                }
            }
        });
        self.tasks.lock().push(h);
    }
}

/// Whether a subject is a presence event (`presence.*.<id>` also matches
/// `presence.sync.<name>` and `presence.typing.<name>`).
fn is_event(subject: &str) -> bool {
    EVENT_SUBJECTS.iter().any(|p| subject.starts_with(p.trim_end_matches('>')))
}

/// A subscription's forwarding task, stopped (and the subscription dropped) with it.
struct Forwarder(JoinHandle<()>);

/// Counts in `resumed` each reconnection of either connection, once both answer a flush:
/// the feed's subscriptions, sent again by the client on reconnecting, are then in place
/// at the server (and requests go through again).
async fn count_resumes(nats: Nats, feed: Nats, resumed: tokio::sync::watch::Sender<u64>, timeout: Duration) {
    let (mut a, mut b) = (nats.reconnects.clone(), feed.reconnects.clone());
    loop {
        tokio::select! {
            r = a.changed() => if r.is_err() { return },
            r = b.changed() => if r.is_err() { return },
        }
        // Seen now: a reconnect while flushing below counts again.
        a.borrow_and_update();
        b.borrow_and_update();
        loop {
            let flushed = async |n: &Nats| matches!(tokio::time::timeout(timeout, n.client.flush()).await, Ok(Ok(())));
            if flushed(&feed).await && flushed(&nats).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        resumed.send_modify(|n| *n += 1);
    }
}

/// A backplane dropped without a shutdown (a start that failed after it connected, and is
/// tried again): its tasks must not outlive it.
impl Drop for NatsBackplane {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per-user subscriptions `presence.*.<id>`, each with its own forwarding task into one
/// channel (O(1) per message however many users are watched), or one wildcard.
struct NatsFeed {
    client: async_nats::Client,
    tx: mpsc::Sender<Bytes>,
    users: HashMap<UserId, Forwarder>,
    all: Option<Forwarder>,
    /// A subscription was made since the last `settle`.
    unsettled: bool,
}

impl NatsFeed {
    fn spawn(&self, mut sub: async_nats::Subscriber) -> Forwarder {
        let tx = self.tx.clone();
        Forwarder(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if is_event(&m.subject) && tx.send(m.payload).await.is_err() {
                    return;
                }
            }
        }))
    }
}

#[async_trait]
impl Feed for NatsFeed {
    async fn watch(&mut self, user: &UserId) -> Result<(), Fault> {
        let sub = self.client.subscribe(format!("presence.*.{}", encode_id(user.as_str()))).await.map_err(fault)?;
        let f = self.spawn(sub);
        self.users.insert(user.clone(), f);
        self.unsettled = true;
        Ok(())
    }

    async fn unwatch(&mut self, user: &UserId) {
        self.users.remove(user);
    }

    async fn watch_all(&mut self, on: bool) -> Result<(), Fault> {
        if on {
            let sub = self.client.subscribe("presence.*.*").await.map_err(fault)?;
            self.all = Some(self.spawn(sub));
            self.unsettled = true;
        } else {
            self.all = None;
        }
        Ok(())
    }

    async fn settle(&mut self) {
        // The server has the subscriptions once it answers the flush. Only after a new
        // subscription: with every user's events taken, newly watched users subscribe
        // nothing, and a flush would wait behind the stream this connection carries (at
        // 550,000 sessions over 52 nodes, past the request timeout for every connect).
        if std::mem::take(&mut self.unsettled) {
            let _ = self.client.flush().await;
        }
    }
}

#[async_trait]
impl Backplane for NatsBackplane {
    fn names(&self) -> &'static Names {
        &NAMES
    }

    async fn get(&self, space: Space<'_>, key: &str) -> Result<Option<Versioned>, Fault> {
        let (bucket, k) = self.locate(space, key);
        Ok(bucket.entry(k).await.map_err(fault)?.map(record))
    }

    async fn put(&self, space: Space<'_>, key: &str, value: Bytes) -> Result<u64, Fault> {
        let (bucket, k) = self.locate(space, key);
        bucket.put(k, value).await.map_err(fault)
    }

    async fn swap(&self, space: Space<'_>, key: &str, expected: Option<u64>, value: Bytes, _: Option<Duration>) -> Result<u64, Refused> {
        let (bucket, k) = self.locate(space, key);
        match expected {
            None => bucket.create(k, value).await.map_err(|e| match e.kind() {
                jkv::CreateErrorKind::AlreadyExists => Refused::Conflict,
                _ => Refused::Fault(fault(e)),
            }),
            Some(rev) => bucket.update(k, value, rev).await.map_err(|e| match e.kind() {
                jkv::UpdateErrorKind::WrongLastRevision => Refused::Conflict,
                _ => Refused::Fault(fault(e)),
            }),
        }
    }

    async fn remove(&self, space: Space<'_>, key: &str, expected: Option<u64>) -> Result<(), Refused> {
        let (bucket, k) = self.locate(space, key);
        bucket.purge_expect_revision(k, expected).await.map_err(|e| match e.kind() {
            // Someone wrote in between: the caller reads again (as for `swap`).
            jkv::UpdateErrorKind::WrongLastRevision => Refused::Conflict,
            _ => Refused::Fault(fault(e)),
        })
    }

    async fn keys(&self, space: Space<'_>) -> Result<Vec<String>, Fault> {
        let (bucket, prefix) = match space {
            Space::Users => return Err(Fault("listing users is not offered".into())),
            Space::Leases => (&self.kv.nodes, "node.".to_string()),
            Space::Owners(node) => (&self.kv.owners, format!("{}.", encode_id(node))),
            Space::Instances => (&self.kv.nodes, "instance.".to_string()),
        };
        let keys = nkv::live_keys(bucket, &prefix, self.timeout).await.map_err(fault)?;
        Ok(keys.iter().filter_map(|k| decode_id(k)).collect())
    }

    fn resumed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resumed.clone()
    }

    fn watch_users(&self) -> Option<mpsc::Receiver<(UserId, Versioned)>> {
        let (tx, rx) = mpsc::channel(1024);
        let users = self.kv.users_watch.clone();
        // Re-watched after errors, for as long as someone listens.
        let h = tokio::spawn(async move {
            while !tx.is_closed() {
                match users.watch_all().await {
                    Ok(mut w) => {
                        while let Some(entry) = w.next().await {
                            let Ok(entry) = entry else { break };
                            let Some(id) =
                                entry.key.strip_prefix("user.").and_then(decode_id).and_then(|s| UserId::parse(&s, usize::MAX).ok())
                            else {
                                continue;
                            };
                            if tx.send((id, record(entry))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot watch the users bucket yet"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        self.tasks.lock().push(h);
        Some(rx)
    }

    async fn put_row(&self, table: DirTable, key: &str, value: Bytes) -> Result<u64, Fault> {
        self.kv.dir.put(dir_key(table, key), value).await.map_err(fault)
    }

    async fn rows(&self) -> Result<Vec<(DirTable, String, Bytes)>, Fault> {
        let keys = nkv::live_keys(&self.kv.dir, "", self.timeout).await.map_err(fault)?;
        let mut out = Vec::new();
        for k in keys {
            let Some((table, id)) = parse_dir_key(&k) else { continue };
            let Some(v) = self.kv.dir.get(&k).await.map_err(fault)? else { continue };
            if !v.is_empty() {
                out.push((table, id, v));
            }
        }
        Ok(out)
    }

    async fn watch_rows(&self) -> Result<mpsc::Receiver<RowChange>, Fault> {
        let first = self.kv.dir.watch_all().await.map_err(fault)?;
        let (tx, rx) = mpsc::channel(1024);
        let dir = self.kv.dir.clone();
        let h = tokio::spawn(async move {
            // The watch ends when the connection to the stream is lost; it is opened again
            // from the revision after the last one seen, so no change falls in between.
            let mut watch = Some(first);
            let mut last: u64 = 0;
            loop {
                if let Some(mut w) = watch.take() {
                    while let Some(entry) = w.next().await {
                        let entry = match entry {
                            Ok(e) => e,
                            Err(e) => {
                                tracing::warn!(error = %e, "directory watch error");
                                continue;
                            }
                        };
                        last = last.max(entry.revision);
                        let Some((table, key)) = parse_dir_key(&entry.key) else { continue };
                        let Versioned { value, revision } = record(entry);
                        if tx.send(RowChange { table, key, value, revision }).await.is_err() {
                            return;
                        }
                    }
                    tracing::warn!(last_revision = last, "the directory watch ended; watching again");
                    metrics::counter!(NAMES.directory_rewatch).increment(1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if tx.is_closed() {
                    return;
                }
                let again = if last > 0 { dir.watch_all_from_revision(last + 1).await } else { dir.watch_with_history(">").await };
                match again {
                    Ok(w) => watch = Some(w),
                    Err(e) => tracing::debug!(error = %e, "cannot watch the directory bucket yet"),
                }
            }
        });
        self.tasks.lock().push(h);
        Ok(rx)
    }

    async fn publish_event(&self, kind: EventKind, user: &UserId, payload: Bytes) -> Result<(), Fault> {
        self.nats.client.publish(subject(kind, user), payload).await.map_err(fault)
    }

    async fn feed(&self, tx: mpsc::Sender<Bytes>) -> Result<Box<dyn Feed>, Fault> {
        Ok(Box::new(NatsFeed { client: self.feed.client.clone(), tx, users: HashMap::new(), all: None, unsettled: false }))
    }

    async fn publish_typing(&self, conversation: &str, payload: Bytes) -> Result<(), Fault> {
        self.nats.client.publish(format!("presence.typing.{}", encode_id(conversation)), payload).await.map_err(fault)
    }

    async fn subscribe_typing(&self) -> Result<mpsc::Receiver<Bytes>, Fault> {
        let sub = self.feed.client.subscribe("presence.typing.>").await.map_err(fault)?;
        let (tx, rx) = mpsc::channel(1024);
        self.forward(sub, tx, |_| true);
        Ok(rx)
    }

    async fn announce_sync(&self, node: &str, payload: Bytes) -> Result<(), Fault> {
        self.nats.client.publish(format!("presence.sync.{}", encode_id(node)), payload).await.map_err(fault)
    }

    async fn request(&self, node: &str, op: &str, payload: Bytes, timeout: Duration) -> Result<Bytes, Fault> {
        match tokio::time::timeout(timeout, self.nats.client.request(node_subject(node, op), payload)).await {
            Ok(Ok(msg)) => Ok(msg.payload),
            Ok(Err(e)) => Err(fault(e)),
            Err(_) => Err(Fault("nats: no answer in time".into())),
        }
    }

    async fn tell(&self, node: &str, op: &str, payload: Bytes) -> Result<(), Fault> {
        self.nats.client.publish(node_subject(node, op), payload).await.map_err(fault)
    }

    async fn serve(&self, node: &str) -> Result<mpsc::Receiver<Incoming>, Fault> {
        let prefix = format!("presence.node.{}.", encode_id(node));
        let mut sub = self.nats.client.subscribe(format!("{prefix}*")).await.map_err(fault)?;
        let (tx, rx) = mpsc::channel(1024);
        let h = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let op = m.subject.strip_prefix(prefix.as_str()).unwrap_or_default().to_string();
                let incoming = Incoming { op, payload: m.payload, reply: m.reply.map(|r| r.to_string()) };
                if tx.send(incoming).await.is_err() {
                    return;
                }
            }
        });
        self.tasks.lock().push(h);
        Ok(rx)
    }

    async fn respond(&self, reply: &str, payload: Bytes) -> Result<(), Fault> {
        self.nats.client.publish(reply.to_string(), payload).await.map_err(fault)
    }

    /// The requests' connection, unless the subscriptions' one is the one down.
    fn health(&self) -> Health {
        let (main, feed) = (self.nats.health(), self.feed.health());
        let h = if main.connected && !feed.connected { feed } else { main };
        Health { state: h.state, connected: h.connected, server: h.server, urls: h.urls }
    }

    async fn flush(&self) {
        let _ = self.nats.client.flush().await;
        let _ = self.feed.client.flush().await;
    }

    fn close(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_keys_round_trip() {
        for (t, k) in [(DirTable::Contacts, "alice"), (DirTable::Privacy, "tenant:bob@x.io"), (DirTable::Conversations, "conv.1")] {
            let key = dir_key(t, k);
            assert_eq!(parse_dir_key(&key), Some((t, k.to_string())), "{key}");
        }
        assert_eq!(parse_dir_key("other.x"), None);
        assert_eq!(parse_dir_key("contacts"), None);
    }

    #[test]
    fn only_event_subjects_are_events() {
        let u = UserId::parse("tenant:bob", 64).unwrap();
        assert!(is_event(&subject(EventKind::UserOnline, &u)));
        assert!(!is_event("presence.typing.tenant=3Abob"));
        assert!(!is_event("presence.sync.tenant=3Abob"));
    }
}
