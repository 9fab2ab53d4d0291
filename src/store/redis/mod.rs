//! Cluster mode on Redis (seed 001's store; seed 004's "Redis Pub/Sub for multi-instance
//! broadcasting"): the [`Backplane`] over a single Redis, a Redis Cluster, or the master
//! of a Sentinel deployment. The node logic is [`crate::store::cluster`], shared with NATS.
//!
//! - Records (users, leases, the owner index) are two fields of a hash, the value and its
//!   revision, changed only by Lua scripts (`scripts/*.lua`, each with a header naming its
//!   KEYS and ARGV) that compare the revision: [`Backplane::swap`] is a compare-and-swap.
//!   Scripts run with `EVALSHA`, and with `EVAL` after a `NOSCRIPT` (a restarted or
//!   failed-over server), which loads them again.
//! - Key layout: [`keys`]. A user's keys share a hash tag, so on a cluster each script
//!   touches one slot.
//! - Events: `PUBLISH` (`SPUBLISH` on a cluster) on the user's channel, which only nodes
//!   whose connections watch that user subscribe to; and `XADD` to the `<p>events` stream
//!   (trimmed to about `redis.events.max_len`) for consumers that replay.
//! - The directory: one hash and a change stream each node follows with `XREAD`; after an
//!   interruption the node reads the hash again (rows carry revisions, deleted rows stay
//!   as empty values), so no change is missed.
//! - Node-to-node requests travel on the nodes' inbox channels (`pubsub`).

mod conn;
pub mod keys;
mod pubsub;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::{ErrorKind, Script, ServerErrorKind, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cluster::backplane::{Feed, Incoming, RowChange};
use super::cluster::{Backplane, ClusterOptions, ClusterStore, Fault, Health, Names, Refused, Space, Versioned};
use super::{DirTable, StoreError};
use crate::bus::EventBus;
use crate::clock::Clock;
use crate::config::RedisConfig;
use crate::core::{EventKind, UserId};
use conn::{Conn, Connector, Pool};
use keys::Keys;
use pubsub::PubSub;

/// Why a write is refused while Redis is unreachable.
pub const DEGRADED: &str = "the presence store (Redis) is unreachable: this node is in degraded mode \
     (reads come from its cache and are marked stale; statuses cannot be written until Redis is back)";

pub static NAMES: Names = Names {
    backend: "redis",
    degraded: "redis_degraded",
    cas_writes: "redis_cas_writes_total",
    cas_conflicts: "redis_cas_conflicts_total",
    interest_users: "redis_interest_users",
    interest_all: "redis_interest_all",
    interest_waits: "redis_interest_waits_total",
    events_received: "redis_events_received_total",
    events_out_of_order: "redis_events_out_of_order_total",
    publish_timeouts: "redis_publish_timeouts_total",
    forwarded_heartbeats: "redis_forwarded_heartbeats_total",
    janitor_claims: "redis_janitor_claims_total",
    janitor_spared: "redis_janitor_spared_total",
    lease_lost: "redis_lease_lost_total",
    lease_renewed_at: "redis_lease_renewed_at_seconds",
    degraded_local_changes: "redis_degraded_local_changes_total",
    repairs: "redis_sessions_repaired_total",
    made_up: "redis_events_made_up_total",
    adopted: "redis_sessions_adopted_total",
    directory_rewatch: "redis_directory_rewatch_total",
    degraded_reason: DEGRADED,
};

/// How long one blocking read (`XREAD BLOCK`) waits for new entries.
const BLOCK_MS: u64 = 1000;

/// Connects and opens a cluster node on Redis.
pub async fn open(cfg: &RedisConfig, opts: ClusterOptions, clock: Arc<dyn Clock>, bus: EventBus) -> Result<ClusterStore, StoreError> {
    let bp = RedisBackplane::connect(cfg, &opts.node_id).await?;
    ClusterStore::open(Arc::new(bp), opts, clock, bus).await
}

struct Scripts {
    swap: Script,
    remove: Script,
    put_row: Script,
}

pub struct RedisBackplane {
    connector: Connector,
    pool: Arc<Pool>,
    pubsub: Arc<PubSub>,
    keys: Arc<Keys>,
    scripts: Scripts,
    max_len: u64,
    request_timeout: Duration,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// See [`Backplane::resumed`]: counted when the subscription connection is back after
    /// a loss, or moved to a new master (a failover).
    resumed: Arc<tokio::sync::watch::Sender<u64>>,
}

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault(format!("redis: {e}"))
}

/// The server refused our credentials (a configuration mistake, not a late server).
fn refused_credentials(message: &str) -> bool {
    message.contains("WRONGPASS") || message.contains("NOAUTH") || message.contains("invalid username-password")
}

fn kind_name(kind: EventKind) -> &'static str {
    kind.as_str()
}

/// A Redis value as bytes (bulk or simple strings).
fn bytes_of(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

/// `XREAD`/`XREVRANGE` entries: `(id, field → value)`.
type Entries = Vec<(String, Vec<(String, Bytes)>)>;

fn entries(v: &Value) -> Entries {
    let mut out = Vec::new();
    let Value::Array(items) = v else { return out };
    for item in items {
        let Value::Array(pair) = item else { continue };
        let (Some(id), Some(Value::Array(fields))) = (pair.first().and_then(bytes_of), pair.get(1)) else { continue };
        let mut kv = Vec::new();
        for f in fields.chunks(2) {
            if let [k, v] = f {
                if let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v)) {
                    kv.push((String::from_utf8_lossy(&k).into_owned(), v));
                }
            }
        }
        out.push((String::from_utf8_lossy(&id).into_owned(), kv));
    }
    out
}

/// The entries of one stream in an `XREAD` answer (RESP3: a map of stream → entries).
fn xread_entries(v: &Value) -> Entries {
    match v {
        Value::Map(streams) => streams.first().map(|(_, e)| entries(e)).unwrap_or_default(),
        Value::Array(streams) => streams
            .first()
            .and_then(|s| match s {
                Value::Array(pair) => pair.get(1).map(entries),
                _ => None,
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn field<'a>(fields: &'a [(String, Bytes)], name: &str) -> Option<&'a Bytes> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A directory change from its stream entry.
fn row_change(fields: &[(String, Bytes)]) -> Option<RowChange> {
    let row = std::str::from_utf8(field(fields, "row")?).ok()?;
    let (table, key) = row.split_once('.')?;
    let revision = std::str::from_utf8(field(fields, "rev")?).ok()?.parse().ok()?;
    let value = field(fields, "value").cloned().filter(|v| !v.is_empty());
    Some(RowChange { table: DirTable::from_name(table)?, key: key.to_string(), value, revision })
}

impl RedisBackplane {
    pub async fn connect(cfg: &RedisConfig, node: &str) -> Result<RedisBackplane, StoreError> {
        let unavailable = |e: String| StoreError::Unreachable(e);
        // A bad URL, an unreadable TLS file or refused credentials: waiting would not help.
        let classify = |e: conn::ConnectError| match &e {
            conn::ConnectError::File { .. } => StoreError::Misconfigured(e.to_string()),
            conn::ConnectError::Connect { message, .. } if refused_credentials(message) => StoreError::Misconfigured(e.to_string()),
            conn::ConnectError::Connect { .. } => StoreError::Unreachable(e.to_string()),
        };
        let connector = Connector::new(cfg).map_err(|e| StoreError::Misconfigured(e.to_string()))?;
        let pool = Arc::new(Pool::open(&connector).await.map_err(classify)?);
        let keys = Arc::new(Keys::new(&cfg.key_prefix));
        let pubsub = Arc::new(PubSub::open(&connector, keys.clone(), node).await.map_err(|e| unavailable(e.0))?);
        let bp = RedisBackplane {
            connector,
            pool,
            pubsub,
            keys,
            scripts: Scripts {
                swap: Script::new(include_str!("scripts/swap.lua")),
                remove: Script::new(include_str!("scripts/remove.lua")),
                put_row: Script::new(include_str!("scripts/put_row.lua")),
            },
            max_len: cfg.events.max_len,
            request_timeout: cfg.request_timeout.0,
            tasks: Mutex::new(Vec::new()),
            resumed: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        bp.monitor();
        bp.follow_losses();
        Ok(bp)
    }

    /// PINGs every second: the connection state for `/health/redis` and `redis_connected`;
    /// on a Sentinel deployment, follows a failover to the new master.
    fn monitor(&self) {
        let pool = self.pool.clone();
        let pubsub = self.pubsub.clone();
        let connector = self.connector.clone();
        let resumed = self.resumed.clone();
        let limit = self.request_timeout.min(Duration::from_secs(1));
        let h = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut c = pool.conn();
                let ping = tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut c)).await;
                let ok = matches!(ping, Ok(Ok(_)));
                failures = if ok { 0 } else { failures + 1 };
                if pool.set_connected(ok) && ok {
                    pool.describe().await;
                }
                if !connector.config().sentinel_master.is_empty() && (failures >= 2 || (ok && !is_master(&mut c).await)) {
                    follow_failover(&connector, &pool, &pubsub, &resumed).await;
                }
            }
        });
        self.tasks.lock().push(h);
    }

    /// Counts in `resumed` each loss of the subscription connection once it answers
    /// again (subscribed again: what was published meanwhile never reached this node) and
    /// so do the command connections (the reads that follow go through).
    fn follow_losses(&self) {
        let pubsub = self.pubsub.clone();
        let pool = self.pool.clone();
        let resumed = self.resumed.clone();
        let mut lost = pubsub.lost();
        let h = tokio::spawn(async move {
            while lost.changed().await.is_ok() {
                // Seen now: a loss while waiting below counts again.
                lost.borrow_and_update();
                while !(pubsub.ping().await && pool.all_answer().await) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tracing::info!("redis: subscriptions back after a lost connection");
                resumed.send_modify(|n| *n += 1);
            }
        });
        self.tasks.lock().push(h);
    }

    /// Runs a script by its SHA; after `NOSCRIPT` (a restarted or failed-over server), by
    /// its source, which loads it again.
    async fn eval(&self, script: &Script, source: &str, keys: &[&str], args: &[&[u8]]) -> Result<i64, Fault> {
        let mut c = self.pool.conn();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
        match cmd.query_async::<i64>(&mut c).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                metrics::counter!("redis_script_loads_total").increment(1);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(source).arg(keys.len()).arg(keys).arg(args);
                cmd.query_async::<i64>(&mut c).await.map_err(fault)
            }
            other => other.map_err(fault),
        }
    }

    /// The hash and field of a record.
    fn locate(&self, space: Space<'_>, key: &str) -> (String, String) {
        match space {
            Space::Users => (self.keys.user(key), "v".to_string()),
            Space::Leases => (self.keys.leases(), key.to_string()),
            Space::Owners(node) => (self.keys.owners(node), key.to_string()),
            Space::Instances => (self.keys.instances(), key.to_string()),
        }
    }

    async fn swap_script(
        &self,
        space: Space<'_>,
        key: &str,
        expected: &str,
        value: &[u8],
        forget: Option<Duration>,
    ) -> Result<u64, Refused> {
        let (hash, f) = self.locate(space, key);
        let ttl = forget.map_or(0, |d| d.as_millis().max(1) as u64).to_string();
        let rev = self
            .eval(
                &self.scripts.swap,
                include_str!("scripts/swap.lua"),
                &[&hash],
                &[f.as_bytes(), expected.as_bytes(), value, ttl.as_bytes()],
            )
            .await?;
        u64::try_from(rev).map_err(|_| Refused::Conflict)
    }
}

/// The id of the newest entry of a stream (`0-0` when it is empty).
async fn last_id(pool: &Pool, stream: &str) -> Result<String, Fault> {
    let mut c = pool.conn();
    let v: Value = redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).query_async(&mut c).await.map_err(fault)?;
    Ok(entries(&v).into_iter().next().map_or_else(|| "0-0".to_string(), |(id, _)| id))
}

async fn is_master(c: &mut Conn) -> bool {
    let role: Result<Value, _> = redis::cmd("ROLE").query_async(c).await;
    match role {
        Ok(Value::Array(v)) => v.first().and_then(bytes_of).is_some_and(|r| &r[..] == b"master"),
        _ => true,
    }
}

/// Asks the Sentinels for the master and connects the pool and the subscriptions to it
/// (blocking readers reconnect to it by themselves).
async fn follow_failover(connector: &Connector, pool: &Pool, pubsub: &PubSub, resumed: &tokio::sync::watch::Sender<u64>) {
    let Ok(master) = connector.resolve_master().await else { return };
    tracing::warn!(master = ?master.addr(), "redis: following the master the sentinels name");
    let mut conns = Vec::new();
    for _ in 0..connector.config().pool_size.max(1) {
        match connector.connect(None, Some(connector.config().request_timeout.0)).await {
            Ok(c) => conns.push(c),
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot connect to the new master yet");
                return;
            }
        }
    }
    pool.replace(conns);
    match pubsub.reconnect(connector).await {
        // Events published between the failover and now were lost for this node.
        Ok(()) => resumed.send_modify(|n| *n += 1),
        Err(e) => tracing::warn!(error = %e, "redis: cannot move the subscriptions to the new master yet"),
    }
}

/// The `XREAD` loop of a stream: each entry after `from` that `convert` accepts goes to
/// `tx` (waiting while it is full: nothing is dropped), until `tx` closes. After an
/// interruption, `restart` gives what to send first and the id to go on from.
async fn read_stream<T, R, Fut>(
    connector: Connector,
    stream: String,
    from: String,
    timeout: Duration,
    tx: mpsc::Sender<T>,
    convert: fn(&[(String, Bytes)]) -> Option<T>,
    mut restart: R,
) where
    T: Send,
    R: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<(String, Vec<T>)>>,
{
    let mut last = from;
    let mut conn: Option<Conn> = None;
    while !tx.is_closed() {
        let c = match &mut conn {
            Some(c) => c,
            None => match connector.connect(None, None).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::debug!(error = %e, stream = %stream, "redis: cannot open a stream reader yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(512).arg("BLOCK").arg(BLOCK_MS).arg("STREAMS").arg(&stream).arg(&last);
        match tokio::time::timeout(Duration::from_millis(BLOCK_MS) + timeout, cmd.query_async::<Value>(c)).await {
            Ok(Ok(v)) => {
                for (id, fields) in xread_entries(&v) {
                    last = id;
                    if let Some(t) = convert(&fields) {
                        if tx.send(t).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some((id, first)) = restart().await else { return };
                for t in first {
                    if tx.send(t).await.is_err() {
                        return;
                    }
                }
                last = id;
            }
        }
    }
}

/// Subscriptions to the watched users' channels; every user's events through the events
/// stream while `watch_all` is on (sharded pub/sub has no patterns).
struct RedisFeed {
    pubsub: Arc<PubSub>,
    keys: Arc<Keys>,
    connector: Connector,
    tx: mpsc::Sender<Bytes>,
    request_timeout: Duration,
    all: Option<JoinHandle<()>>,
}

/// A backplane dropped without a shutdown (a start that failed after it connected, and is
/// tried again): its monitor must not outlive it, holding connections.
impl Drop for RedisBackplane {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
    }
}

impl Drop for RedisFeed {
    fn drop(&mut self) {
        if let Some(h) = self.all.take() {
            h.abort();
        }
    }
}

#[async_trait]
impl Feed for RedisFeed {
    async fn watch(&mut self, user: &UserId) -> Result<(), Fault> {
        self.pubsub.subscribe(&self.keys.events_channel(user.as_str())).await
    }

    async fn unwatch(&mut self, user: &UserId) {
        if let Err(e) = self.pubsub.unsubscribe(&self.keys.events_channel(user.as_str())).await {
            tracing::debug!(user = %user, error = %e, "redis: could not unsubscribe");
        }
    }

    async fn watch_all(&mut self, on: bool) -> Result<(), Fault> {
        if let Some(h) = self.all.take() {
            h.abort();
        }
        if on {
            self.all = Some(tokio::spawn(read_stream(
                self.connector.clone(),
                self.keys.events_stream(),
                "$".to_string(),
                self.request_timeout,
                self.tx.clone(),
                |fields| field(fields, "event").cloned(),
                || async { Some(("$".to_string(), Vec::new())) },
            )));
        }
        Ok(())
    }

    async fn settle(&mut self) {
        // Each subscribe returned once the server confirmed it.
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    fn names(&self) -> &'static Names {
        &NAMES
    }

    async fn get(&self, space: Space<'_>, key: &str) -> Result<Option<Versioned>, Fault> {
        let (hash, f) = self.locate(space, key);
        let mut c = self.pool.conn();
        let (value, rev): (Option<Vec<u8>>, Option<u64>) =
            redis::cmd("HMGET").arg(&hash).arg(&f).arg(format!("{f}#")).query_async(&mut c).await.map_err(fault)?;
        Ok(rev.map(|revision| Versioned { value: value.map(Bytes::from), revision }))
    }

    async fn put(&self, space: Space<'_>, key: &str, value: Bytes) -> Result<u64, Fault> {
        self.swap_script(space, key, "*", &value, None).await.map_err(|e| match e {
            Refused::Fault(f) => f,
            Refused::Conflict => Fault("redis: unconditional write refused".into()),
        })
    }

    async fn swap(
        &self,
        space: Space<'_>,
        key: &str,
        expected: Option<u64>,
        value: Bytes,
        forget: Option<Duration>,
    ) -> Result<u64, Refused> {
        self.swap_script(space, key, &expected.unwrap_or(0).to_string(), &value, forget).await
    }

    async fn remove(&self, space: Space<'_>, key: &str, expected: Option<u64>) -> Result<(), Refused> {
        let (hash, f) = self.locate(space, key);
        let expected = expected.map_or_else(|| "*".to_string(), |r| r.to_string());
        let r = self.eval(&self.scripts.remove, include_str!("scripts/remove.lua"), &[&hash], &[f.as_bytes(), expected.as_bytes()]).await?;
        if r < 0 {
            Err(Refused::Conflict)
        } else {
            Ok(())
        }
    }

    async fn keys(&self, space: Space<'_>) -> Result<Vec<String>, Fault> {
        let hash = match space {
            Space::Users => return Err(Fault("listing users is not offered".into())),
            Space::Leases => self.keys.leases(),
            Space::Owners(node) => self.keys.owners(node),
            Space::Instances => self.keys.instances(),
        };
        let mut c = self.pool.conn();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, page): (u64, Vec<(String, Vec<u8>)>) =
                redis::cmd("HSCAN").arg(&hash).arg(cursor).arg("COUNT").arg(1000).query_async(&mut c).await.map_err(fault)?;
            out.extend(page.into_iter().map(|(k, _)| k).filter(|k| !k.ends_with('#')));
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    fn watch_users(&self) -> Option<mpsc::Receiver<(UserId, Versioned)>> {
        None
    }

    fn resumed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resumed.subscribe()
    }

    async fn put_row(&self, table: DirTable, key: &str, value: Bytes) -> Result<u64, Fault> {
        let (dir, log) = (self.keys.dir(), self.keys.dir_log());
        let row = format!("{}.{key}", table.name());
        let max_len = self.max_len.to_string();
        let rev = self
            .eval(&self.scripts.put_row, include_str!("scripts/put_row.lua"), &[&dir, &log], &[row.as_bytes(), &value, max_len.as_bytes()])
            .await?;
        u64::try_from(rev).map_err(fault)
    }

    async fn rows(&self) -> Result<Vec<(DirTable, String, Bytes)>, Fault> {
        let mut c = self.pool.conn();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL").arg(self.keys.dir()).query_async(&mut c).await.map_err(fault)?;
        Ok(rows_of(&all).into_iter().filter_map(|r| Some((r.table, r.key, r.value?))).collect())
    }

    async fn watch_rows(&self) -> Result<mpsc::Receiver<RowChange>, Fault> {
        // From the stream's end now: what the caller loads next is newer than that.
        let from = last_id(&self.pool, &self.keys.dir_log()).await?;
        let (tx, rx) = mpsc::channel(1024);
        let reader = RowsReader { pool: self.pool.clone(), keys: self.keys.clone() };
        let h =
            tokio::spawn(read_stream(self.connector.clone(), self.keys.dir_log(), from, self.request_timeout, tx, row_change, move || {
                let reader = reader.clone();
                async move {
                    // Interrupted: read every row again (revisions drop what was applied).
                    metrics::counter!(NAMES.directory_rewatch).increment(1);
                    for _ in 0..600 {
                        match reader.reload().await {
                            Ok(r) => return Some(r),
                            Err(e) => {
                                tracing::debug!(error = %e, "redis: cannot read the directory yet");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                    tracing::error!(
                        "redis: the directory could not be read again for 5 minutes; changes made on other nodes are no longer followed"
                    );
                    None
                }
            }));
        self.tasks.lock().push(h);
        Ok(rx)
    }

    async fn publish_event(&self, kind: EventKind, user: &UserId, payload: Bytes) -> Result<(), Fault> {
        let mut c = self.pool.conn();
        let mut publish = redis::cmd(if c.is_cluster() { "SPUBLISH" } else { "PUBLISH" });
        publish.arg(self.keys.events_channel(user.as_str())).arg(&payload[..]);
        let mut append = redis::cmd("XADD");
        append
            .arg(self.keys.events_stream())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("type")
            .arg(kind_name(kind))
            .arg("user_id")
            .arg(user.as_str())
            .arg("event")
            .arg(&payload[..]);
        if c.is_cluster() {
            // Two slots: a pipeline may not cross them on a cluster; both go at once.
            let mut c2 = c.clone();
            let (p, a) = tokio::join!(publish.query_async::<()>(&mut c), append.query_async::<()>(&mut c2));
            p.and(a).map_err(fault)
        } else {
            redis::pipe().add_command(publish).ignore().add_command(append).ignore().query_async::<()>(&mut c).await.map_err(fault)
        }
    }

    async fn feed(&self, tx: mpsc::Sender<Bytes>) -> Result<Box<dyn Feed>, Fault> {
        self.pubsub.route_events(tx.clone());
        Ok(Box::new(RedisFeed {
            pubsub: self.pubsub.clone(),
            keys: self.keys.clone(),
            connector: self.connector.clone(),
            tx,
            request_timeout: self.request_timeout,
            all: None,
        }))
    }

    async fn publish_typing(&self, _conversation: &str, payload: Bytes) -> Result<(), Fault> {
        PubSub::publish(&mut self.pool.conn(), &self.keys.typing_channel(), &payload).await.map(|_| ())
    }

    async fn subscribe_typing(&self) -> Result<mpsc::Receiver<Bytes>, Fault> {
        self.pubsub.route_typing().await
    }

    async fn announce_sync(&self, _node: &str, payload: Bytes) -> Result<(), Fault> {
        PubSub::publish(&mut self.pool.conn(), &self.keys.sync_channel(), &payload).await.map(|_| ())
    }

    async fn request(&self, node: &str, op: &str, payload: Bytes, timeout: Duration) -> Result<Bytes, Fault> {
        self.pubsub.request(&mut self.pool.conn(), node, op, &payload, timeout).await
    }

    async fn tell(&self, node: &str, op: &str, payload: Bytes) -> Result<(), Fault> {
        self.pubsub.tell(&mut self.pool.conn(), node, op, &payload).await
    }

    async fn serve(&self, _node: &str) -> Result<mpsc::Receiver<Incoming>, Fault> {
        Ok(self.pubsub.route_inbox())
    }

    async fn respond(&self, reply: &str, payload: Bytes) -> Result<(), Fault> {
        PubSub::respond(&mut self.pool.conn(), &self.keys, reply, &payload).await
    }

    fn health(&self) -> Health {
        let connected = self.pool.is_connected();
        Health {
            state: if connected { "connected" } else { "disconnected" },
            connected,
            server: self.pool.server(),
            urls: self.connector.config().urls.join(","),
        }
    }

    async fn flush(&self) {}

    fn close(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// What the directory reader needs to read every row again.
#[derive(Clone)]
struct RowsReader {
    pool: Arc<Pool>,
    keys: Arc<Keys>,
}

impl RowsReader {
    /// The stream's newest id, then every row: a change after that id comes from the
    /// stream (perhaps as well as here: revisions drop the repeat).
    async fn reload(&self) -> Result<(String, Vec<RowChange>), Fault> {
        let id = last_id(&self.pool, &self.keys.dir_log()).await?;
        let mut c = self.pool.conn();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL").arg(self.keys.dir()).query_async(&mut c).await.map_err(fault)?;
        Ok((id, rows_of(&all)))
    }
}

/// Directory rows (with revisions; deleted rows as `None`) from the hash's fields.
fn rows_of(all: &[(String, Vec<u8>)]) -> Vec<RowChange> {
    let revs: std::collections::HashMap<&str, u64> =
        all.iter().filter_map(|(k, v)| Some((k.strip_suffix('#')?, std::str::from_utf8(v).ok()?.parse().ok()?))).collect();
    let mut out = Vec::new();
    for (k, v) in all {
        if k.ends_with('#') {
            continue;
        }
        let Some((table, key)) = k.split_once('.') else { continue };
        let Some(table) = DirTable::from_name(table) else { continue };
        let value = (!v.is_empty()).then(|| Bytes::copy_from_slice(v));
        out.push(RowChange { table, key: key.to_string(), value, revision: revs.get(k.as_str()).copied().unwrap_or(0) });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_rows_come_with_revisions_and_deletions() {
        let all = vec![
            ("contacts.alice".to_string(), b"[\"bob\"]".to_vec()),
            ("contacts.alice#".to_string(), b"17".to_vec()),
            ("privacy.bob".to_string(), Vec::new()),
            ("privacy.bob#".to_string(), b"18".to_vec()),
            ("#seq".to_string(), b"18".to_vec()),
            ("unknown.x".to_string(), b"1".to_vec()),
        ];
        let rows = rows_of(&all);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].table, rows[0].key.as_str(), rows[0].revision), (DirTable::Contacts, "alice", 17));
        assert_eq!((rows[1].value.clone(), rows[1].revision), (None, 18));
    }

    #[test]
    fn stream_entries_parse_in_both_protocols() {
        let entry = Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"row".to_vec()),
                Value::BulkString(b"contacts.a.b".to_vec()),
                Value::BulkString(b"value".to_vec()),
                Value::BulkString(b"[]".to_vec()),
                Value::BulkString(b"rev".to_vec()),
                Value::BulkString(b"5".to_vec()),
            ]),
        ]);
        let resp3 = Value::Map(vec![(Value::BulkString(b"s".to_vec()), Value::Array(vec![entry.clone()]))]);
        let resp2 = Value::Array(vec![Value::Array(vec![Value::BulkString(b"s".to_vec()), Value::Array(vec![entry])])]);
        for v in [resp3, resp2] {
            let e = xread_entries(&v);
            assert_eq!(e.len(), 1);
            let c = row_change(&e[0].1).unwrap();
            assert_eq!((c.table, c.key.as_str(), c.revision), (DirTable::Contacts, "a.b", 5));
        }
    }
}
