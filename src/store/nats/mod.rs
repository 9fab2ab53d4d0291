//! Cluster backend: presence in NATS JetStream KV (seed 003 §5), shared by every node.
//!
//! One key per user (`user.<encoded id>`, see [`crate::natsio::kv::encode_id`]) holding the
//! user's whole [`UserState`] (explicit status, message, expiry, `last_seen`, sessions with
//! their owning node). Every change runs the same pure transition as the embedded store,
//! inside a compare-and-swap on the key's revision ([`crate::natsio::kv::update`]), so
//! concurrent writers on different nodes never lose an update, and exactly one of them
//! performs (and reports) each transition.
//!
//! Events go to this node's bus and to `presence.{update,expire,online,offline}.<id>`
//! (JSON, captured by the `PRESENCE_EVENTS` stream for durable consumers); events from
//! other nodes arrive on those subjects and are put on this node's bus, so local
//! WebSocket and gRPC watchers see changes made anywhere.
//!
//! Sessions are held by node leases ([`lease`]): a session registered on this node is
//! stored with expiry [`HELD`], its real deadline lives in this node's memory
//! ([`owned::OwnedTable`]) and heartbeats never touch the KV. A heartbeat that reaches
//! another node is forwarded to the owner (`presence.node.<node>.refresh`, request/reply);
//! only when the owner does not answer does that node take the session over (one write).
//! When a node dies its lease lapses and one surviving node ends its sessions.
//!
//! Explicit-status expiry: the node that wrote a status with a TTL keeps a local timer
//! and applies `expire` (under CAS) when it passes; reads apply the rule at read time, so
//! a lapsed status is never shown even before that.

pub mod cache;
pub mod lease;
pub mod order;
pub mod owned;
mod relay;
pub mod wire;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv as jkv, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{Clock, DirTable, DirectoryStore, PresenceStore, SetStatus, StoreError, StoreStats};
use crate::bus::EventBus;
use crate::config::NatsConfig;
use crate::core::{Change, Event, Millis, NewSession, Presence, Registered, Session, TimerWheel, UserId, UserState, HELD};
use crate::natsio::kv::{self, decode_id, encode_id, user_key, BucketConfig, KvError};
use crate::natsio::Nats;
use crate::store::locks::UserLocks;
use cache::{Breaker, Cached, PresenceCache, Transition, CACHE_TTL};
use owned::{Owned, OwnedTable};
pub use wire::{subject, WireEvent, EVENT_SUBJECTS};

/// What a cluster node needs besides the connection settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub node_id: String,
    /// Granularity of local timers.
    pub tick_ms: i64,
    /// `presence.node_lease_ttl`.
    pub lease_ttl_ms: i64,
    /// `presence.last_seen_interval` (`0`: never while connected).
    pub last_seen_interval_ms: i64,
    /// `cache.max_cost`: bound of the read cache, in approximate bytes.
    pub cache_max_cost: u64,
    /// Timeout of one KV request; consecutive failures open the circuit breaker.
    pub kv_timeout: Duration,
}

impl ClusterOptions {
    pub fn new(node_id: &str, tick_ms: i64) -> ClusterOptions {
        ClusterOptions {
            node_id: node_id.into(),
            tick_ms,
            lease_ttl_ms: 15_000,
            last_seen_interval_ms: 0,
            cache_max_cost: 64 << 20,
            kv_timeout: Duration::from_secs(2),
        }
    }
}

/// Counts one KV write (the `store_writes_total{kind}` metric and [`NatsStore::writes`]):
/// `user` (a user's record), `index` (owner index), `lease`, `directory`.
fn wrote(inner: &Inner, kind: &'static str) {
    inner.writes.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("store_writes_total", "backend" => "nats", "kind" => kind).increment(1);
}

/// A heartbeat forwarded to the owning node, and its answer.
#[derive(Debug, Serialize, Deserialize)]
struct NodeRequest {
    op: String,
    user_id: String,
    device_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefreshReply {
    expires_at: Option<Millis>,
}

/// Why a write is refused while the center is unreachable.
pub const DEGRADED: &str = "the presence store at the center (NATS JetStream) is unreachable: this node is in degraded mode \
     (reads come from its cache and are marked stale; statuses cannot be written until the center is back)";

fn node_subject(node: &str, op: &str) -> String {
    format!("presence.node.{}.{op}", encode_id(node))
}

fn dir_key(table: DirTable, key: &str) -> String {
    let t = match table {
        DirTable::Contacts => "contacts",
        DirTable::Privacy => "privacy",
        DirTable::Conversations => "conversations",
    };
    format!("{t}.{}", encode_id(key))
}

fn parse_dir_key(k: &str) -> Option<(DirTable, String)> {
    let (t, enc) = k.split_once('.')?;
    let table = match t {
        "contacts" => DirTable::Contacts,
        "privacy" => DirTable::Privacy,
        "conversations" => DirTable::Conversations,
        _ => return None,
    };
    Some((table, decode_id(enc)?))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("nats: {e}"))
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        unavailable(e)
    }
}

/// The NATS JetStream KV store.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    nats: Nats,
    users: jkv::Store,
    dir: jkv::Store,
    /// Node leases (`node.<node>`): O(nodes) keys.
    nodes: jkv::Store,
    /// Owner index (`<node>.<user>`): which users a node holds sessions of.
    owners: jkv::Store,
    node: Arc<str>,
    opts: ClusterOptions,
    started_at: Millis,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    /// Local deadlines of explicit statuses this node wrote: tick → users.
    timers: Mutex<TimerWheel<UserId>>,
    owned: Mutex<OwnedTable>,
    /// Serialise owner-index writes per user (see [`NatsStore::index_begin`]), and each
    /// user's compare-and-swap with the event it publishes, so this node publishes one
    /// user's events in revision order.
    index_locks: UserLocks,
    write_locks: UserLocks,
    /// The newest event revision admitted here per user (drops late, older events).
    order: Mutex<order::EventOrder>,
    lease: lease::LeaseState,
    writes: AtomicU64,
    /// Other nodes' events received (interest-routed) and the users watched here.
    remote_events: AtomicU64,
    watched: AtomicU64,
    /// Sequence number of the last interest change whose subscriptions are in place.
    interest_applied: tokio::sync::watch::Sender<u64>,
    cache: PresenceCache,
    breaker: Breaker,
    /// Users whose sessions changed here while degraded: written back on recovery.
    dirty: Mutex<HashSet<UserId>>,
    /// Directory key → newest revision applied here (own writes included).
    dir_revisions: Mutex<std::collections::HashMap<String, u64>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NatsStore {
    /// Connects, makes sure the buckets and the event stream exist, and starts relaying
    /// other nodes' events to the local bus.
    pub async fn open(cfg: &NatsConfig, opts: ClusterOptions, clock: Arc<dyn Clock>, bus: EventBus) -> Result<NatsStore, StoreError> {
        let node = opts.node_id.clone();
        let nats = Nats::connect(cfg, &format!("presenced-{node}")).await.map_err(unavailable)?;
        let mut js = if cfg.jetstream.domain.is_empty() {
            jetstream::new(nats.client.clone())
        } else {
            jetstream::with_domain(nats.client.clone(), &cfg.jetstream.domain)
        };
        js.set_timeout(opts.kv_timeout);
        let bucket = |name: String| BucketConfig { name, replicas: cfg.kv.replicas, file_storage: true };
        let users = kv::open_bucket(&js, &bucket(cfg.kv.bucket.clone())).await?;
        let dir = kv::open_bucket(&js, &bucket(format!("{}_directory", cfg.kv.bucket))).await?;
        let nodes = kv::open_bucket(&js, &bucket(format!("{}_nodes", cfg.kv.bucket))).await?;
        let owners = kv::open_bucket(&js, &bucket(format!("{}_owners", cfg.kv.bucket))).await?;
        let events = stream::Config {
            name: "PRESENCE_EVENTS".into(),
            subjects: EVENT_SUBJECTS.iter().map(|s| s.to_string()).collect(),
            max_age: cfg.events.max_age.0.max(Duration::from_secs(1)),
            max_bytes: i64::try_from(cfg.events.max_bytes.0).unwrap_or(i64::MAX),
            storage: stream::StorageType::File,
            num_replicas: cfg.kv.replicas.max(1),
            ..Default::default()
        };
        js.get_or_create_stream(events).await.map_err(|e| unavailable(format!("cannot create stream PRESENCE_EVENTS: {e}")))?;
        let started_at = clock.now();
        let opts_cache_cost = opts.cache_max_cost;
        let tick_ms = opts.tick_ms;
        let inner = Arc::new(Inner {
            nats,
            users,
            dir,
            nodes,
            owners,
            node: Arc::from(node.as_str()),
            owned: Mutex::new(OwnedTable::new(tick_ms)),
            opts,
            started_at,
            clock,
            bus,
            timers: Mutex::new(TimerWheel::new(tick_ms)),
            index_locks: UserLocks::default(),
            write_locks: UserLocks::default(),
            order: Mutex::new(order::EventOrder::new(60_000)),
            lease: lease::LeaseState::default(),
            writes: AtomicU64::new(0),
            remote_events: AtomicU64::new(0),
            watched: AtomicU64::new(0),
            interest_applied: tokio::sync::watch::Sender::new(0),
            cache: PresenceCache::new(opts_cache_cost, CACHE_TTL),
            breaker: Breaker::new(3, Duration::from_millis(500), Duration::from_secs(10)),
            dirty: Mutex::new(HashSet::new()),
            dir_revisions: Mutex::new(std::collections::HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let store = NatsStore { inner };
        store.relay_remote_events().await?;
        store.relay_typing().await?;
        store.watch_users();
        store.serve_node_requests().await?;
        // Sessions a previous incarnation of this node left behind end now, then the lease starts.
        store.take_lease().await?;
        Ok(store)
    }

    /// Starts the local timers, lease renewal and the janitor (call within the runtime).
    pub fn start(&self) {
        let tick = Duration::from_millis(self.inner.opts.tick_ms.max(1) as u64);
        let h = super::spawn_periodic(Arc::downgrade(&self.inner), tick, |inner: Arc<Inner>| async move {
            let now = inner.clock.now();
            let store = NatsStore { inner };
            store.reap(now).await;
            // Degraded: probe the center (a lease renewal) as soon as the back-off allows,
            // rather than at the next renewal period.
            if store.inner.breaker.is_open() {
                store.renew_lease().await;
            }
        });
        let every = Duration::from_millis((self.inner.opts.lease_ttl_ms / 3).max(100) as u64);
        let l = super::spawn_periodic(Arc::downgrade(&self.inner), every, |inner: Arc<Inner>| async move {
            let store = NatsStore { inner };
            store.renew_lease().await;
            store.janitor().await;
        });
        self.inner.tasks.lock().extend([h, l]);
    }

    pub fn nats(&self) -> &Nats {
        &self.inner.nats
    }

    /// KV writes this node made since it started (the `store_writes_total` metric).
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Relaxed)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// Answers other nodes about the sessions this node owns: a forwarded heartbeat
    /// (`refresh`, request/reply) and a session ended elsewhere (`drop`).
    async fn serve_node_requests(&self) -> Result<(), StoreError> {
        let prefix = format!("presence.node.{}.", encode_id(&self.inner.node));
        let mut sub = self.inner.nats.client.subscribe(format!("{prefix}*")).await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(inner) = weak.upgrade() else { return };
                let store = NatsStore { inner };
                let Ok(req) = serde_json::from_slice::<NodeRequest>(&msg.payload) else {
                    tracing::warn!(subject = %msg.subject, "ignoring unreadable node request");
                    continue;
                };
                let Ok(user) = UserId::parse(&req.user_id, usize::MAX) else { continue };
                // Each request in its own task: one slow answer (a last_seen write) must
                // not hold up the heartbeats queued behind it.
                tokio::spawn(async move {
                    match req.op.as_str() {
                        "refresh" => {
                            let expires_at = store.beat(&user, &req.device_id).await;
                            if let (Some(reply), Ok(body)) = (msg.reply, serde_json::to_vec(&RefreshReply { expires_at })) {
                                store.publish_bounded(reply.to_string(), body).await;
                            }
                        }
                        "drop" => {
                            store.inner.owned.lock().remove(&user, &req.device_id);
                            store.index_end(&user).await;
                        }
                        _ => {}
                    }
                });
            }
        });
        self.inner.tasks.lock().push(h);
        Ok(())
    }

    /// Before a session of `user` is written as ours: makes sure the owner index names
    /// this node for `user`, so the janitor finds the session if this node dies.
    async fn index_begin(&self, user: &UserId) -> Result<(), StoreError> {
        let _g = self.inner.index_locks.lock(user).await;
        let first = self.inner.owned.lock().begin(user);
        if first {
            let key = lease::owner_key(&self.inner.node, user);
            let put =
                self.guarded(async { self.inner.owners.put(key, bytes::Bytes::new()).await.map_err(|e| KvError::Backend(e.to_string())) });
            match put.await {
                Ok(_) => wrote(&self.inner, "index"),
                // Degraded: written back with the user's sessions on recovery.
                Err(_) if self.inner.breaker.is_open() => {
                    self.inner.dirty.lock().insert(user.clone());
                }
                Err(e) => {
                    self.inner.owned.lock().finish(user, &crate::core::DeviceId::from(""), None);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// After a session of `user` ended: drops the index entry when this node holds none.
    async fn index_end(&self, user: &UserId) {
        let _g = self.inner.index_locks.lock(user).await;
        // While degraded the entry stays (harmless: the janitor finds nothing to end there).
        if self.inner.owned.lock().is_unowned(user) && !self.inner.breaker.is_open() {
            match self.inner.owners.purge(lease::owner_key(&self.inner.node, user)).await {
                Ok(()) => wrote(&self.inner, "index"),
                Err(e) => tracing::debug!(user = %user, error = %e, "owner index entry left behind (harmless)"),
            }
        }
    }

    /// Runs `f` on the user's state inside a CAS loop; publishes the event of the
    /// transition that was written and arms the local expiry timer.
    async fn apply<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        let inner = &*self.inner;
        let key = user_key(id);
        let _order = inner.write_locks.lock(id).await;
        let mut result: Option<(R, Change, Millis)> = None;
        let updated = self
            .guarded(kv::update::<UserState, _>(&inner.users, &key, |old| {
                let now = inner.clock.now();
                let mut st = match old.clone() {
                    Some(s) => s,
                    None if create => UserState::new(inner.node.clone()),
                    None => {
                        result = None;
                        return None;
                    }
                };
                let (r, change) = f(&mut st, now);
                result = Some((r, change, now));
                // Write only what changed.
                (old.as_ref() != Some(&st)).then_some(st)
            }))
            .await?;
        let Some((r, change, now)) = result else { return Ok(None) };
        let Some(state) = updated.after else { return Ok(None) };
        if updated.revision != 0 && updated.before.as_ref() != Some(&state) {
            wrote(inner, "user");
        }
        inner.cache.offer(id, Cached { state: Some(state.clone()), revision: updated.revision });
        let presence = Presence { revision: updated.revision, ..state.view(id, now) };
        if change.event.is_some() {
            let before = match &updated.before {
                Some(b) => Presence { revision: updated.prev_revision, ..b.published(id) },
                None => Presence::unknown(id.clone(), inner.node.clone()),
            };
            self.emit(&change, &presence, before, now).await;
        }
        if let Some(deadline) = state.next_deadline() {
            inner.timers.lock().insert(deadline, id.clone());
        }
        Ok(Some((r, presence)))
    }

    /// Publishes the event of a transition (if it has one) on NATS and the local bus,
    /// unless a newer event of the user was already admitted here.
    async fn emit(&self, change: &Change, presence: &Presence, before: Presence, now: Millis) {
        let Some(kind) = change.event else { return };
        if !self.inner.order.lock().admit(&presence.user_id, presence.revision, now) {
            metrics::counter!("nats_events_out_of_order_total").increment(1);
            return;
        }
        let ev = Event { kind, presence: presence.clone(), before, at: now };
        if let Ok(payload) = serde_json::to_vec(&WireEvent::of(&ev)) {
            self.publish_bounded(subject(ev.kind, &ev.presence.user_id), payload).await;
        }
        self.inner.bus.publish(ev);
    }

    /// Publishes on NATS, waiting at most `nats.request_timeout` (a publish waits while
    /// the client's outgoing buffer is full, e.g. during a reconnect).
    async fn publish_bounded(&self, subject: String, payload: Vec<u8>) {
        match tokio::time::timeout(self.inner.opts.kv_timeout, self.inner.nats.client.publish(subject, payload.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not publish on NATS"),
            Err(_) => {
                metrics::counter!("nats_publish_timeouts_total").increment(1);
                tracing::warn!("publishing on NATS timed out; the message was dropped");
            }
        }
    }

    /// A heartbeat of a session this node owns: memory only (plus `last_seen` at most
    /// once per interval). `None` when this node does not hold a live session for it.
    async fn beat(&self, id: &UserId, device: &str) -> Option<Millis> {
        let now = self.inner.clock.now();
        let beat = self.inner.owned.lock().beat(id, device, now, self.inner.opts.last_seen_interval_ms)?;
        if beat.write_last_seen {
            let r = self
                .apply(id, false, |s, _| {
                    s.touch(device, now);
                    ((), Change::none())
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(user = %id, error = %e, "could not write last_seen; will try at the next interval");
            }
        }
        Some(beat.expires_at)
    }

    /// Ends, in the KV, sessions this node owned whose deadline passed, and explicit
    /// statuses this node wrote whose TTL passed. Returns how many users were looked at.
    pub async fn reap(&self, now: Millis) -> usize {
        let lapsed = self.inner.owned.lock().lapsed(now);
        let mut n = lapsed.len();
        for (user, device, o) in lapsed {
            let node = self.inner.node.clone();
            let r = self.apply_session(&user, false, |s, now| s.release(&device, &node, o.last_heartbeat, &node, now)).await;
            if let Err(e) = r {
                tracing::warn!(user = %user, error = %e, "could not end a lapsed session; will retry");
                let retry = Owned { expires_at: now, ..o };
                let mut t = self.inner.owned.lock();
                t.begin(&user);
                t.finish(&user, &device, Some(retry));
                continue;
            }
            self.index_end(&user).await;
        }
        let tick_ms = self.inner.opts.tick_ms.max(1);
        let due: Vec<UserId> = self.inner.timers.lock().take_due(now).into_iter().map(|(_, id)| id).collect();
        let mut seen = std::collections::HashSet::new();
        for id in due.into_iter().filter(|id| seen.insert(id.clone())) {
            let node = self.inner.node.clone();
            if let Err(e) = self.apply(&id, false, |s, now| ((), s.expire(&node, now))).await {
                tracing::warn!(user = %id, error = %e, "expiry failed; will retry");
                self.inner.timers.lock().insert(now + 10 * tick_ms, id);
            }
        }
        n += seen.len();
        n
    }

    /// The user's stored state: from the cache unless `fresh`, else from the KV; while
    /// degraded, from the cache whatever `fresh` says (`None` when not cached: offline).
    /// With the state, its KV revision (`0` for a state changed here while degraded).
    async fn read(&self, id: &UserId, fresh: bool) -> Result<Option<(UserState, u64)>, StoreError> {
        if !fresh || self.inner.breaker.is_open() {
            if let Some(c) = self.inner.cache.get(id) {
                return Ok(c.state.clone().map(|s| (s, c.revision)));
            }
        }
        let users = &self.inner.users;
        let r = self
            .guarded(async {
                match users.entry(user_key(id)).await.map_err(|e| KvError::Backend(e.to_string()))? {
                    Some(e) if e.operation == jkv::Operation::Put => {
                        let state = serde_json::from_slice::<UserState>(&e.value)
                            .map_err(|err| KvError::Corrupt { key: user_key(id), message: err.to_string() })?;
                        Ok(Cached { state: Some(state), revision: e.revision })
                    }
                    Some(e) => Ok(Cached { state: None, revision: e.revision }),
                    None => Ok(Cached { state: None, revision: 0 }),
                }
            })
            .await;
        match r {
            Ok(c) => {
                let state = c.state.clone().map(|s| (s, c.revision));
                if c.revision != 0 {
                    self.inner.cache.offer(id, c);
                }
                Ok(state)
            }
            Err(_) if self.inner.breaker.is_open() => Ok(self.inner.cache.get(id).and_then(|c| c.state.clone().map(|s| (s, c.revision)))),
            Err(e) => Err(e),
        }
    }

    /// Runs a KV call through the circuit breaker: refused at once while it is open.
    async fn guarded<T>(&self, call: impl std::future::Future<Output = Result<T, KvError>>) -> Result<T, StoreError> {
        if !self.inner.breaker.allow(Instant::now()) {
            return Err(StoreError::Unavailable(DEGRADED.into()));
        }
        let r = call.await;
        self.outcome(!matches!(r, Err(KvError::Backend(_))));
        r.map_err(StoreError::from)
    }

    fn outcome(&self, ok: bool) {
        match self.inner.breaker.record(ok, Instant::now()) {
            Transition::None => {}
            Transition::Opened => {
                metrics::gauge!("nats_degraded").set(1.0);
                tracing::warn!("center unreachable: degraded mode (reads from this node's cache, marked stale; status writes refused; local sessions kept in memory)");
            }
            Transition::Closed => {
                metrics::gauge!("nats_degraded").set(0.0);
                tracing::info!("center reachable again: leaving degraded mode and writing back local sessions");
                // Missed watcher updates: read through again.
                self.inner.cache.invalidate_all();
                let store = self.clone();
                tokio::spawn(async move { store.sync_dirty().await });
            }
        }
    }

    /// Like [`NatsStore::apply`] for session changes, which must not be lost while the
    /// center is unreachable: then they are applied to the cached state, published
    /// locally, and the user is marked for write-back.
    async fn apply_session<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        match self.apply(id, create, &mut f).await {
            Err(_) if self.inner.breaker.is_open() => {}
            other => return other,
        }
        let now = self.inner.clock.now();
        let mut st = match self.inner.cache.get(id).and_then(|c| c.state.clone()) {
            Some(s) => s,
            None if create => UserState::new(self.inner.node.clone()),
            None => return Ok(None),
        };
        let before = st.published(id);
        let (r, change) = f(&mut st, now);
        self.inner.cache.put_local(id, st.clone());
        self.inner.dirty.lock().insert(id.clone());
        metrics::counter!("nats_degraded_local_changes_total").increment(1);
        // Revision 0: not in the KV yet (the write-back gives it one).
        let presence = st.view(id, now);
        self.emit(&change, &presence, before, now).await;
        Ok(Some((r, presence)))
    }

    /// Writes back the sessions of users changed while degraded (this node's memory is
    /// the truth for its own connections) and announces it on `presence.sync.<node>`.
    pub(super) async fn sync_dirty(&self) {
        let users: Vec<UserId> = self.inner.dirty.lock().drain().collect();
        if users.is_empty() {
            return;
        }
        let n = self.sync_users(&users).await;
        self.announce_sync(n).await;
    }

    /// Makes the KV hold exactly this node's sessions of `users`; returns how many users
    /// were written. Failures go back to the dirty set for the next attempt.
    pub(super) async fn sync_users(&self, users: &[UserId]) -> usize {
        let node = self.inner.node.clone();
        let mut written = 0;
        for user in users {
            let held: Vec<Session> = self
                .inner
                .owned
                .lock()
                .all_of(user)
                .into_iter()
                .map(|(d, o)| Session {
                    device_id: d,
                    instance_id: o.instance,
                    connected_at: o.connected_at,
                    last_heartbeat: o.last_heartbeat,
                    expires_at: HELD,
                    ttl_ms: o.ttl_ms,
                    node_id: node.clone(),
                    platform: o.platform,
                    sid: o.sid,
                })
                .collect();
            if !held.is_empty() {
                match self
                    .guarded(async {
                        self.inner
                            .owners
                            .put(lease::owner_key(&node, user), bytes::Bytes::new())
                            .await
                            .map_err(|e| KvError::Backend(e.to_string()))
                    })
                    .await
                {
                    Ok(_) => wrote(&self.inner, "index"),
                    Err(_) => {
                        self.inner.dirty.lock().insert(user.clone());
                        continue;
                    }
                }
            }
            match self.apply(user, !held.is_empty(), |s, now| ((), s.sync_node(&node, &held, &node, now))).await {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "could not write back a user's sessions; will retry");
                    self.inner.dirty.lock().insert(user.clone());
                }
            }
        }
        written
    }

    pub(super) async fn announce_sync(&self, users: usize) {
        let notice = lease::SyncNotice { node_id: self.inner.node.to_string(), sessions: users, at: self.inner.clock.now() };
        if let Ok(body) = serde_json::to_vec(&notice) {
            let _ = self.inner.nats.client.publish(format!("presence.sync.{}", encode_id(&self.inner.node)), body.into()).await;
        }
        tracing::info!(users, "this node's sessions written back to the center");
    }

    /// Keeps the cache current from the users bucket's changes (re-watching after errors).
    fn watch_users(&self) {
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let watch = inner.users.watch_all().await;
                drop(inner);
                match watch {
                    Ok(mut w) => {
                        while let Some(entry) = w.next().await {
                            let Some(inner) = weak.upgrade() else { return };
                            let Ok(entry) = entry else { break };
                            let Some(id) =
                                entry.key.strip_prefix("user.").and_then(decode_id).and_then(|s| UserId::parse(&s, usize::MAX).ok())
                            else {
                                continue;
                            };
                            let state = match entry.operation {
                                jkv::Operation::Put => match serde_json::from_slice::<UserState>(&entry.value) {
                                    Ok(s) => Some(s),
                                    Err(_) => {
                                        inner.cache.invalidate(&id);
                                        continue;
                                    }
                                },
                                _ => None,
                            };
                            inner.cache.offer(&id, Cached { state, revision: entry.revision });
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot watch the users bucket yet"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        self.inner.tasks.lock().push(h);
    }

    /// Registers `req.device` as held by this node (a new session, or, with
    /// `take_over`, one taken over from a node that no longer answers for it).
    async fn own(&self, id: &UserId, req: NewSession, take_over: bool) -> Result<Option<Registered>, StoreError> {
        self.index_begin(id).await?;
        let node = self.inner.node.clone();
        let (dev, inst) = (req.device.clone(), req.instance.clone());
        let r = self
            .apply_session(id, !take_over, |s, now| {
                if take_over {
                    let Some(sess) = s.sessions.iter().find(|x| x.device_id == dev && x.expires_at > now) else {
                        return (None, Change::none());
                    };
                    let (ttl, sid, platform) = (sess.ttl_ms, sess.sid, sess.platform);
                    s.hold(&dev, &node);
                    s.touch(&dev, now);
                    let reg = Registered { created: false, expires_at: now.saturating_add(ttl), sid };
                    (Some(Ok((reg, ttl, platform))), Change::none())
                } else {
                    match s.register(req.clone(), &node, now) {
                        Ok((reg, change)) => {
                            s.hold(&dev, &node);
                            (Some(Ok((reg, req.ttl_ms, req.platform))), change)
                        }
                        Err(limit) => (Some(Err(StoreError::TooManyDevices { max: limit.max })), Change::none()),
                    }
                }
            })
            .await;
        let now = self.inner.clock.now();
        let done = match &r {
            Ok(Some((Some(Ok((reg, ttl, platform))), _))) => Some(Owned {
                instance: inst.clone(),
                platform: *platform,
                sid: reg.sid,
                ttl_ms: *ttl,
                connected_at: now,
                expires_at: reg.expires_at,
                last_heartbeat: now,
                written_at: now,
            }),
            _ => None,
        };
        let ok = done.is_some();
        self.inner.owned.lock().finish(id, &dev, done);
        if !ok {
            self.index_end(id).await;
        }
        match r?.and_then(|(x, _)| x) {
            Some(Ok((reg, _, _))) => Ok(Some(reg)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

impl NatsStore {
    async fn read_many(&self, ids: &[UserId], fresh: bool) -> Result<Vec<Option<Presence>>, StoreError> {
        let states = futures_util::future::join_all(ids.iter().map(|id| self.read(id, fresh))).await;
        let now = self.inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        for (id, st) in ids.iter().zip(states) {
            out.push(st?.map(|(s, revision)| Presence { revision, ..s.view(id, now) }));
        }
        Ok(out)
    }
}

#[async_trait]
impl PresenceStore for NatsStore {
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.read_many(ids, false).await
    }

    async fn get_many_fresh(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.interest_settled().await;
        self.read_many(ids, true).await
    }

    fn degraded(&self) -> Option<String> {
        self.inner.breaker.is_open().then(|| DEGRADED.to_string())
    }

    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        let r = self.apply(id, true, |s, now| ((), s.set_status(req.status, req.message.clone(), req.ttl_ms, &node, now))).await?;
        match r {
            Some((_, p)) => Ok(p),
            // Nothing changed (same status and expiry): answer the current state.
            None => Ok(self
                .read_many(std::slice::from_ref(id), true)
                .await?
                .pop()
                .flatten()
                .unwrap_or_else(|| Presence::unknown(id.clone(), node))),
        }
    }

    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        self.apply(id, true, |s, now| ((), s.clear_status(&node, now))).await?;
        Ok(self.read_many(std::slice::from_ref(id), false).await?.pop().flatten().unwrap_or_else(|| Presence::unknown(id.clone(), node)))
    }

    async fn register_session(&self, id: &UserId, req: NewSession) -> Result<Registered, StoreError> {
        self.own(id, req, false).await?.ok_or_else(|| unavailable("registration was not written"))
    }

    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        if let Some(t) = self.beat(id, device).await {
            return Ok(Some(t));
        }
        // Not ours: find the owner.
        let now = self.inner.clock.now();
        let Some((state, _)) = self.read(id, true).await? else { return Ok(None) };
        let Some(owner) = state.live_sessions(now).find(|s| &*s.device_id == device).map(|s| s.node_id.clone()) else {
            return Ok(None);
        };
        if *owner != *self.inner.node {
            let req = NodeRequest { op: "refresh".into(), user_id: id.to_string(), device_id: device.into() };
            let body = serde_json::to_vec(&req).map_err(unavailable)?;
            let ask = self.inner.nats.client.request(node_subject(&owner, "refresh"), body.into());
            match tokio::time::timeout(Duration::from_secs(1), ask).await {
                Ok(Ok(msg)) => {
                    if let Ok(RefreshReply { expires_at: Some(t) }) = serde_json::from_slice(&msg.payload) {
                        metrics::counter!("nats_forwarded_heartbeats_total").increment(1);
                        return Ok(Some(t));
                    }
                }
                Ok(Err(e)) => tracing::debug!(owner = %owner, error = %e, "owner did not take the heartbeat; taking the session over"),
                Err(_) => tracing::debug!(owner = %owner, "owner did not answer in time; taking the session over"),
            }
        }
        let r = self.own(id, NewSession::new(device, "", 0), true).await?;
        Ok(r.map(|r| r.expires_at))
    }

    async fn unregister_session(&self, id: &UserId, device: &str, sid: Option<u64>) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        let mut owner: Option<Arc<str>> = None;
        let r = self
            .apply_session(id, false, |s, now| {
                owner = s.sessions.iter().find(|x| *x.device_id == *device && sid.is_none_or(|t| t == x.sid)).map(|x| x.node_id.clone());
                s.unregister(device, sid, &node, now)
            })
            .await?;
        let removed = r.as_ref().is_some_and(|(removed, _)| *removed);
        if !removed {
            // A newer registration of the device (or none at all): nothing of ours ended.
            return Ok(false);
        }
        self.inner.owned.lock().remove(id, device);
        self.index_end(id).await;
        if let Some(o) = owner.filter(|o| **o != *node && !o.is_empty()) {
            // The owner forgets it (no write): it would otherwise keep answering heartbeats.
            let req = NodeRequest { op: "drop".into(), user_id: id.to_string(), device_id: device.into() };
            if let Ok(body) = serde_json::to_vec(&req) {
                let _ = self.inner.nats.client.publish(node_subject(&o, "drop"), body.into()).await;
            }
        }
        Ok(true)
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        let now = self.inner.clock.now();
        // The device list is read from the KV: it is not a hot path, and callers use it
        // right after registering elsewhere.
        let Some((state, _)) = self.read(id, true).await? else { return Ok(Vec::new()) };
        let owned = self.inner.owned.lock();
        let local = owned.all_of(id);
        Ok(state
            .live_sessions(now)
            .map(|s| {
                let mut s = s.clone();
                if s.expires_at == HELD {
                    // Held by a node lease: ours we know exactly; another node's lasts at
                    // least one TTL past its last recorded heartbeat.
                    s.expires_at = match local.iter().find(|(d, _)| *d == s.device_id) {
                        Some((_, o)) => o.expires_at,
                        None => s.last_heartbeat.saturating_add(s.ttl_ms).max(now),
                    };
                }
                s
            })
            .collect())
    }

    fn stats(&self) -> StoreStats {
        let c = self.inner.cache.stats();
        let owned = self.inner.owned.lock();
        StoreStats {
            hits: c.hits,
            misses: c.misses,
            read_cache: true,
            users: c.keys,
            evictions: c.evictions,
            cache_cost: c.cost,
            sessions: owned.session_count(),
            online_users: owned.user_count(),
            writes: self.inner.writes.load(Ordering::Relaxed),
            remote_events: self.inner.remote_events.load(Ordering::Relaxed),
            watched_users: self.inner.watched.load(Ordering::Relaxed),
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        let h = self.inner.nats.health();
        if h.connected {
            Ok(())
        } else {
            Err(unavailable(format!("{} ({})", h.state, h.urls)))
        }
    }

    async fn shutdown(&self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        // Sessions still held (gRPC/HTTP-registered ones) end now rather than at lease
        // expiry. Bounded: with NATS unreachable the lease simply lapses instead.
        let limit = self.inner.opts.kv_timeout * 2;
        if self.inner.nats.health().connected && tokio::time::timeout(limit, self.release_all()).await.is_err() {
            tracing::warn!("could not release this node's sessions in time; its lease will lapse and the janitor will end them");
        }
        // A flush waits for a connection: never longer than the limit.
        let _ = tokio::time::timeout(limit, self.inner.nats.client.flush()).await;
    }
}

#[async_trait]
impl DirectoryStore for NatsStore {
    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let k = dir_key(table, key);
        let dir = &self.inner.dir;
        // A deleted row is an empty value (a put, so it has a revision like any other).
        let bytes = bytes::Bytes::from(value.unwrap_or_default());
        let rev = self.guarded(async { dir.put(&k, bytes).await.map_err(|e| KvError::Backend(e.to_string())) }).await?;
        wrote(&self.inner, "directory");
        // Our own write's echo (or an older one arriving late) must not be applied again.
        let mut revs = self.inner.dir_revisions.lock();
        let seen = revs.entry(k).or_insert(0);
        *seen = (*seen).max(rev);
        Ok(())
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        let mut keys = self.inner.dir.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            let Some((table, id)) = parse_dir_key(&k) else { continue };
            let Some(v) = self.inner.dir.get(&k).await.map_err(unavailable)? else { continue };
            if !v.is_empty() {
                out.push((table, id, v.to_vec()));
            }
        }
        Ok(out)
    }

    async fn watch_directory(&self) -> Option<tokio::sync::mpsc::Receiver<super::DirRow>> {
        let first = match self.inner.dir.watch_all().await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the directory bucket: changes made on other nodes will not be seen");
                return None;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let weak = Arc::downgrade(&self.inner);
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
                        let Some((table, id)) = parse_dir_key(&entry.key) else { continue };
                        {
                            let Some(inner) = weak.upgrade() else { return };
                            let mut revs = inner.dir_revisions.lock();
                            let seen = revs.entry(entry.key.clone()).or_insert(0);
                            if entry.revision <= *seen {
                                continue; // this node's own write, or older than what it applied
                            }
                            *seen = entry.revision;
                        }
                        let value = (entry.operation == jkv::Operation::Put && !entry.value.is_empty()).then(|| entry.value.to_vec());
                        if tx.send((table, id, value)).await.is_err() {
                            return;
                        }
                    }
                    tracing::warn!(last_revision = last, "the directory watch ended; watching again");
                    metrics::counter!("nats_directory_rewatch_total").increment(1);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(inner) = weak.upgrade() else { return };
                let again =
                    if last > 0 { inner.dir.watch_all_from_revision(last + 1).await } else { inner.dir.watch_with_history(">").await };
                match again {
                    Ok(w) => watch = Some(w),
                    Err(e) => tracing::debug!(error = %e, "cannot watch the directory bucket yet"),
                }
            }
        });
        self.inner.tasks.lock().push(h);
        Some(rx)
    }
}
