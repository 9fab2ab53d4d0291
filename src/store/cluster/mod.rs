//! Cluster mode: presence shared by every node through a [`Backplane`] (NATS JetStream,
//! seed 003 §5, or Redis, seed 001), written once over it.
//!
//! One record per user holding the user's whole [`crate::core::UserState`] (explicit
//! status, message, expiry, `last_seen`, sessions with their owning node). Every change
//! runs the same pure transition as the embedded store, inside a compare-and-swap on the
//! record's revision, so concurrent writers on different nodes never lose an update, and
//! exactly one of them performs (and reports) each transition.
//!
//! Events go to this node's bus and to the backplane (each user's watchers on other nodes,
//! and the backend's durable event log); events from other nodes arrive for the users
//! this node's connections watch (`relay`) and are put on the local bus, so local
//! WebSocket and gRPC watchers see changes made anywhere.
//!
//! Sessions are held by node leases ([`lease`]): a session registered on this node is
//! stored with expiry [`crate::core::HELD`], its real deadline lives in this node's memory
//! ([`owned::OwnedTable`]) and heartbeats never touch the store. A heartbeat that reaches
//! another node is forwarded to the owner (request/reply); only when the owner does not
//! answer does that node take the session over (one write). When a node dies its lease
//! lapses and one surviving node ends its sessions.
//!
//! Explicit-status expiry: the node that wrote a status with a TTL keeps a local timer
//! and applies `expire` (under CAS) when it passes; reads apply the rule at read time, so
//! a lapsed status is never shown even before that.
//!
//! Rooms: this file (the handle, its state, start-up, the `Store` traits delegating);
//! [`backplane`] (what a backend provides); `users` (compare-and-swap writes and their
//! events, reads, the cache watcher, the breaker); `sessions` (sessions held here,
//! heartbeats, the owner index, node-to-node requests); `degraded` (local changes while
//! cut off, and their write-back); [`directory`] (directory rows); [`lease`] (node
//! leases, the janitor); `relay` (interest-routed subscriptions, typing); [`cache`] (read
//! cache, circuit breaker); [`order`] (per-user event order); [`owned`] (the sessions
//! this node holds, no I/O); `locks` (per-user write locks). Events are encoded with
//! [`crate::wire::event`]. Logic with no I/O is tested
//! alone in `owned`, `order`, `directory` ([`directory::Revisions`]), `cache` and `lease`.

pub mod backplane;
pub mod cache;
mod degraded;
pub mod directory;
pub mod lease;
mod locks;
pub mod order;
pub mod owned;
mod relay;
mod sessions;
mod users;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{DirTable, DirectoryStore, PresenceStore, SetStatus, StoreError, StoreStats};
use crate::bus::EventBus;
use crate::clock::Clock;
use crate::core::{Activity, Ending, Millis, NewSession, Presence, Registered, Session, TimerWheel, UserId};
pub use crate::wire::event::WireEvent;
pub use backplane::{Backplane, Fault, Health, Names, Refused, Space, Versioned};
use cache::{Breaker, PresenceCache, CACHE_TTL};
use locks::UserLocks;
use owned::OwnedTable;

/// What a cluster node needs besides the backend's connection settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub node_id: String,
    /// Granularity of local timers.
    pub tick_ms: i64,
    /// `presence.node_lease_ttl`.
    pub lease_ttl_ms: i64,
    /// `presence.last_seen_interval` (`0`: never while connected).
    pub last_seen_interval_ms: i64,
    /// `presence.offline_grace`: how long a dead or drained node's sessions are held
    /// (from when each was last heard of) by the node that adopts them.
    pub offline_grace_ms: i64,
    /// `presence.forget_after`: a user with nothing live may be dropped after this long
    /// (backends with per-key expiry); `None` keeps everyone.
    pub forget_after_ms: Option<i64>,
    /// `cache.max_cost`: bound of the read cache, in approximate bytes.
    pub cache_max_cost: u64,
    /// Timeout of one store request; consecutive failures open the circuit breaker.
    pub kv_timeout: Duration,
    /// `store.interest_all_above`: watched users above which one wildcard subscription
    /// replaces the per-user ones (`0`: never).
    pub interest_all_above: usize,
    /// `cache.watch_writes`: follow the backend's stream of user writes (where it has
    /// one) to serve reads from the cache.
    pub watch_writes: bool,
}

impl ClusterOptions {
    pub fn new(node_id: &str, tick_ms: i64) -> ClusterOptions {
        ClusterOptions {
            node_id: node_id.into(),
            tick_ms,
            lease_ttl_ms: 15_000,
            last_seen_interval_ms: 0,
            offline_grace_ms: 10_000,
            forget_after_ms: None,
            cache_max_cost: 64 << 20,
            kv_timeout: Duration::from_secs(2),
            interest_all_above: 1_000,
            watch_writes: true,
        }
    }
}

/// Counts one store write (the `store_writes_total{backend,kind}` metric and
/// [`ClusterStore::writes`]): `user` (a user's record), `index` (owner index), `lease`,
/// `directory`.
fn wrote(inner: &Inner, kind: &'static str) {
    inner.counters.writes.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("store_writes_total", "backend" => inner.bp.names().backend, "kind" => kind).increment(1);
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unreachable(e.to_string())
}

/// The longest back-off between two probes of an unreachable store: a third of the lease
/// TTL, within 0.5-10 s.
fn probe_backoff_max(lease_ttl_ms: i64) -> Duration {
    Duration::from_millis((lease_ttl_ms / 3).clamp(500, 10_000) as u64)
}

/// A cluster node's store.
#[derive(Clone)]
pub struct ClusterStore {
    inner: Arc<Inner>,
}

/// Counters for `stats()` and `/health/<backend>`.
#[derive(Default)]
pub(crate) struct Counters {
    writes: AtomicU64,
    /// Other nodes' events received (interest-routed) and the users watched here.
    remote_events: AtomicU64,
    watched: AtomicU64,
    /// The node takes every user's events (batched interest, or a watch-all stream).
    interest_all: std::sync::atomic::AtomicBool,
}

/// Serialise work on one user that spans the network: owner-index writes (see
/// [`ClusterStore::index_begin`]), and each compare-and-swap with the event it publishes,
/// so this node publishes one user's events in revision order.
#[derive(Default)]
pub(crate) struct Locks {
    index: UserLocks,
    write: UserLocks,
}

/// The circuit breaker in front of the backend, and what changed here while it was open.
pub(crate) struct Degraded {
    breaker: Breaker,
    /// Users whose sessions changed here while degraded: written back on recovery.
    dirty: Mutex<HashSet<UserId>>,
    /// What this node's watchers were shown of a user while degraded (published on the
    /// local bus only): the write-back's event for the same state is not shown again.
    shown: Mutex<std::collections::HashMap<UserId, Presence>>,
    /// Users whose sessions are being written again (anti-entropy), one repair at a time.
    repairing: Mutex<HashSet<UserId>>,
}

pub(crate) struct Inner {
    bp: Arc<dyn Backplane>,
    node: Arc<str>,
    opts: ClusterOptions,
    started_at: Millis,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    /// Local deadlines of explicit statuses this node wrote: tick → users.
    timers: Mutex<TimerWheel<UserId>>,
    owned: Mutex<OwnedTable>,
    locks: Locks,
    /// The newest event revision admitted here per user (drops late, older events).
    order: Mutex<order::EventOrder>,
    lease: lease::LeaseState,
    counters: Counters,
    /// Sequence number of the last interest change whose subscriptions are in place.
    interest_applied: tokio::sync::watch::Sender<u64>,
    cache: PresenceCache,
    /// Whether the backend keeps the cache coherent ([`Backplane::watch_users`]): only
    /// then are reads served from it (otherwise it is the degraded mode's last copy).
    coherent: bool,
    degraded: Degraded,
    /// Directory key → newest revision applied here (own writes included).
    dir_revisions: Mutex<directory::Revisions>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ClusterStore {
    /// A node on `bp`: starts relaying other nodes' events and typing to the local bus,
    /// answering node requests, and takes this node's lease (ending what a previous run of
    /// this node left behind).
    pub async fn open(
        bp: Arc<dyn Backplane>,
        opts: ClusterOptions,
        clock: Arc<dyn Clock>,
        bus: EventBus,
    ) -> Result<ClusterStore, StoreError> {
        let started_at = clock.now();
        let tick_ms = opts.tick_ms;
        let lease_ttl_ms = opts.lease_ttl_ms;
        let users = if opts.watch_writes { bp.watch_users() } else { None };
        let inner = Arc::new(Inner {
            node: Arc::from(opts.node_id.as_str()),
            owned: Mutex::new(OwnedTable::new(tick_ms)),
            cache: PresenceCache::new(opts.cache_max_cost, CACHE_TTL),
            coherent: users.is_some(),
            bp,
            opts,
            started_at,
            clock,
            bus,
            timers: Mutex::new(TimerWheel::new(tick_ms)),
            locks: Locks::default(),
            order: Mutex::new(order::EventOrder::new(60_000)),
            lease: lease::LeaseState::default(),
            counters: Counters::default(),
            interest_applied: tokio::sync::watch::Sender::new(0),
            degraded: Degraded {
                // Probes at most every third of the lease TTL (as its renewals), so a healed
                // link is noticed within one renewal period however long the cut lasted.
                breaker: Breaker::new(3, Duration::from_millis(500), probe_backoff_max(lease_ttl_ms)),
                dirty: Mutex::new(HashSet::new()),
                shown: Mutex::new(std::collections::HashMap::new()),
                repairing: Mutex::new(HashSet::new()),
            },
            dir_revisions: Mutex::new(directory::Revisions::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let store = ClusterStore { inner };
        if let Some(rx) = users {
            store.follow_users(rx);
        }
        store.relay_remote_events().await?;
        store.follow_resumes();
        store.relay_typing().await?;
        store.serve_node_requests().await?;
        // Sessions a previous incarnation of this node left behind end now, then the lease starts.
        store.take_lease().await?;
        Ok(store)
    }

    /// Starts the local timers, lease renewal and the janitor (call within the runtime).
    pub fn start(&self) {
        let tick = Duration::from_millis(self.inner.opts.tick_ms.max(1) as u64);
        let h = crate::clock::spawn_periodic(Arc::downgrade(&self.inner), tick, |inner: Arc<Inner>| async move {
            let now = inner.clock.now();
            let store = ClusterStore { inner };
            store.reap(now).await;
            // Degraded: probe the backend (a lease renewal) as soon as the back-off
            // allows, rather than at the next renewal period.
            if store.inner.degraded.breaker.is_open() {
                store.renew_lease().await;
            }
        });
        let every = Duration::from_millis((self.inner.opts.lease_ttl_ms / 3).max(100) as u64);
        // Renewal alone in its task: nothing else may delay it past the lease's TTL.
        let l = crate::clock::spawn_periodic(Arc::downgrade(&self.inner), every, |inner: Arc<Inner>| async move {
            let store = ClusterStore { inner };
            let t0 = std::time::Instant::now();
            store.renew_lease().await;
            let slow = Duration::from_millis((store.inner.opts.lease_ttl_ms / 3) as u64);
            if t0.elapsed() > slow {
                tracing::warn!(renewal_ms = t0.elapsed().as_millis() as u64, "lease renewal slow: the store is overloaded");
            }
        });
        let j = crate::clock::spawn_periodic(Arc::downgrade(&self.inner), every, |inner: Arc<Inner>| async move {
            ClusterStore { inner }.janitor_round().await;
        });
        self.inner.tasks.lock().extend([h, l, j]);
    }

    /// Store writes this node made since it started (the `store_writes_total` metric).
    pub fn writes(&self) -> u64 {
        self.inner.counters.writes.load(Ordering::Relaxed)
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The backend's connection health (`/health/<backend>`).
    pub fn backend_health(&self) -> Health {
        self.inner.bp.health()
    }

    /// Whether this node takes every user's events through one subscription.
    pub fn interest_all(&self) -> bool {
        self.inner.counters.interest_all.load(Ordering::Relaxed)
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.bp.names().backend
    }
}

#[async_trait]
impl PresenceStore for ClusterStore {
    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        // The common heartbeat (a session held here) touches memory only, and its future
        // stays small: the paths with I/O (a last_seen write, forwarding to the owner,
        // taking the session over) are boxed on their own. Inline, they made every
        // heartbeat allocate the state machine of all of them (at 52 nodes, glibc's
        // malloc and malloc_consolidate under that allocation were in a node's profile).
        match self.beat_in_memory(id, device) {
            Some((expires_at, None)) => Ok(Some(expires_at)),
            Some((expires_at, Some(now))) => {
                Box::pin(self.write_last_seen(id, device, now)).await;
                Ok(Some(expires_at))
            }
            None => Box::pin(self.refresh_not_held(id, device)).await,
        }
    }

    async fn end_session(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError> {
        self.end(id, device, sid, ending).await
    }

    async fn set_activity(
        &self,
        id: &UserId,
        device: &str,
        sid: Option<u64>,
        activity: Activity,
        reassert: bool,
    ) -> Result<bool, StoreError> {
        // Said again with nothing changed (passed with every heartbeat): answered from the
        // cache, no round trip to the backend.
        let now = self.inner.clock.now();
        if let Some((state, _)) = if reassert { self.read(id, false).await? } else { None } {
            let idle = matches!(activity, Activity::Idle { .. });
            let mine = |x: &&crate::core::Session| &*x.device_id == device && sid.is_none_or(|t| t == x.sid) && !x.lingering;
            if state.live_sessions(now).find(mine).is_some_and(|x| x.idle_since.is_some() == idle) {
                return Ok(true);
            }
        }
        let node = self.inner.node.clone();
        let r = self.apply_session(id, false, |s, now| s.set_activity(device, sid, activity, &node, now)).await?;
        Ok(r.is_some_and(|(found, _)| found))
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        self.live_devices(id).await
    }

    async fn sessions_of_instance(&self, instance: &str) -> Result<Vec<(UserId, Session)>, StoreError> {
        Ok(self.inner.owned.lock().of_instance(instance, &self.inner.node))
    }

    async fn rebind_session(&self, id: &UserId, device: &str, sid: u64, ttl_ms: i64) -> Result<bool, StoreError> {
        let now = self.inner.clock.now();
        Ok(self.inner.owned.lock().rebind(id, device, sid, ttl_ms, now))
    }

    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.read_many(ids, false).await
    }

    async fn get_many_fresh(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        self.interest_settled().await;
        self.read_many(ids, true).await
    }

    /// Degraded while the circuit breaker is open or the backend's connection is down
    /// (the breaker opens only after three failed calls: a node with nothing to write
    /// would not notice a cut otherwise).
    fn degraded(&self) -> Option<String> {
        let cut = self.inner.degraded.breaker.is_open() || !self.inner.bp.health().connected;
        cut.then(|| self.inner.bp.names().degraded_reason.to_string())
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

    async fn erase(&self, id: &UserId) -> Result<bool, StoreError> {
        self.erase_record(id).await
    }

    async fn put_instance_lease(&self, instance: &str, expires_at: Option<Millis>) -> Result<(), StoreError> {
        match expires_at {
            Some(t) => {
                self.guarded(self.inner.bp.put(Space::Instances, instance, Bytes::from(t.to_string()))).await?;
            }
            None => match self.inner.bp.remove(Space::Instances, instance, None).await {
                Ok(()) => {}
                Err(Refused::Conflict) => {}
                Err(Refused::Fault(e)) => return Err(unavailable(e)),
            },
        }
        wrote(&self.inner, "instance");
        Ok(())
    }

    fn shares_instance_leases(&self) -> bool {
        true
    }

    async fn instance_lease(&self, instance: &str) -> Result<Option<Millis>, StoreError> {
        let record = self.guarded(self.inner.bp.get(Space::Instances, instance)).await?;
        Ok(record.and_then(|r| r.value).and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
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
            writes: self.inner.counters.writes.load(Ordering::Relaxed),
            remote_events: self.inner.counters.remote_events.load(Ordering::Relaxed),
            watched_users: self.inner.counters.watched.load(Ordering::Relaxed),
        }
    }

    /// A cluster node cut off from its store still serves: its own users, in memory, and
    /// reads from its cache, marked stale (degraded mode; `/health` answers 200
    /// `degraded`, the backend's own `/health/<backend>` 503). Only a store that refuses
    /// what it is sent would make it unready, and that shows as the breaker opening.
    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn drain(&self) {
        // Nothing of this node's runs on meanwhile: a lease renewal after the hand-over
        // would take the lease back, a reaper round end a session just handed over.
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        // Bounded: with the backend unreachable (or slow) the lease simply lapses instead,
        // and a janitor adopts the sessions as a dead node's.
        let limit = (self.inner.opts.kv_timeout * 4).max(Duration::from_secs(10));
        if !self.inner.bp.health().connected || self.inner.degraded.breaker.is_open() {
            tracing::warn!(
                "draining while the store is unreachable: this node's lease will lapse and another node will adopt its sessions"
            );
            return;
        }
        if tokio::time::timeout(limit, self.hand_over_all()).await.is_err() {
            tracing::warn!("could not hand this node's sessions over in time; its lease will lapse and another node will adopt them");
        }
    }

    async fn shutdown(&self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        // A flush waits for a connection: never longer than the limit.
        let limit = self.inner.opts.kv_timeout * 2;
        let _ = tokio::time::timeout(limit, self.inner.bp.flush()).await;
        self.inner.bp.close();
    }
}

#[async_trait]
impl DirectoryStore for ClusterStore {
    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        self.put_row(table, key, value).await
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        self.load_rows().await
    }

    async fn watch_directory(&self) -> Option<tokio::sync::mpsc::Receiver<super::DirRow>> {
        self.watch_rows().await
    }
}
