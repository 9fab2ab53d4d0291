//! The embedded store: sharded in-memory state, a coarse timer wheel for expiry, and
//! optional durability through [`Persister`].
//!
//! Users are spread over shards by hash; each shard is a `parking_lot::Mutex` (held for
//! microseconds, never across an `.await`, so a std-style lock beats tokio's) around the
//! users' states and the shard's timer wheel. The wheel maps a tick (deadline rounded up to
//! `tick_ms`) to the users due then. Each user has at most one live ("armed") entry, at its
//! earliest deadline: a heartbeat that pushes the deadline later touches no timer at all;
//! when the entry fires, the reaper re-evaluates the user and re-arms it at its new earliest
//! deadline. Expiry is therefore O(expiring users), never a scan of all users, and the
//! reaper sleeps until the earliest deadline of any shard (arming an earlier one wakes
//! it; a second at most, in case the wall clock jumps), so an idle store wakes once a
//! second instead of every tick. The same
//! wheel forgets users who have had no session and no status for `forget_after` (their
//! `last_seen` is then dropped, in memory and on disk), so churning ids do not grow the
//! store without bound.
//!
//! Every visible change takes the next value of one store-wide counter as the user's
//! revision, carried by its event and by reads, so receivers can drop what is older
//! than what they already have.
//!
//! Durable writes (statuses) are committed before they are applied: a write answered
//! 503 because the disk refused it was never visible.

pub mod persist;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{DirTable, DirectoryStore, PresenceStore, SetStatus, StoreError, StoreStats};
use crate::bus::EventBus;
use crate::clock::Clock;
use crate::core::{
    Activity, Change, Ending, Event, EventKind, Millis, NewSession, Presence, Registered, Session, TimerWheel, UserId, UserState,
};
use crate::shards::Sharded;
use persist::{Ack, DurableUser, Loaded, PersistError, Persister};

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    pub node_id: Arc<str>,
    /// Where statuses are persisted; `None` keeps everything in memory only.
    pub data_dir: Option<PathBuf>,
    /// Number of shards (rounded up to a power of two).
    pub shards: usize,
    /// Timer resolution: how late at most an expiry is processed.
    pub tick_ms: i64,
    /// Forget a user with no session and no status this long after their last activity
    /// (`presence.forget_after`); `None` keeps everyone.
    pub forget_after_ms: Option<i64>,
    /// `store.start_fresh`: an empty or damaged database file is moved aside.
    pub start_fresh: bool,
    /// `store.encryption_key_file`: the database is encrypted with this key.
    pub sealer: Option<Arc<crate::at_rest::Sealer>>,
}

impl MemoryConfig {
    pub fn new(node_id: &str) -> MemoryConfig {
        MemoryConfig {
            node_id: Arc::from(node_id),
            data_dir: None,
            shards: 64,
            tick_ms: 100,
            forget_after_ms: None,
            start_fresh: false,
            sealer: None,
        }
    }
}

/// A cheap-to-clone handle; all clones share one state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Users by a hash of their id, each shard behind its own lock: writers to different
    /// users rarely wait for each other, and one user's transitions are serialized.
    shards: Sharded<Shard>,
    /// Injected so that tests move time by hand (expiry, grace, TTLs).
    clock: Arc<dyn Clock>,
    /// Where transitions go, published under the shard lock so one user's events keep
    /// their order.
    bus: EventBus,
    /// This node's id, written into every state it changes (`node_id` in reads).
    node: Arc<str>,
    /// The wheel's granularity: deadlines are rounded up to it (`store.tick`).
    tick_ms: i64,
    /// `presence.forget_after`: users with no session and no status are dropped after it
    /// (`None`: kept), so memory does not grow with every id ever seen.
    forget_after_ms: Option<i64>,
    /// The writer of `presence.redb` (`None` without a data dir: nothing survives).
    persist: Option<Persister>,
    /// The last revision handed out (store-wide, so a forgotten user's later revisions
    /// still grow).
    revisions: AtomicU64,
    /// Gauges kept as counters beside the shards (updated in `after_change`), so stats
    /// and `/metrics` never walk or lock the shards: users held, users online, sessions.
    users: AtomicI64,
    online: AtomicI64,
    sessions: AtomicI64,
    /// Reads of users the store holds, and of ids it never saw (`presence_reads_total`).
    hits: AtomicU64,
    misses: AtomicU64,
    /// The expiry task, aborted at shutdown.
    reaper: Mutex<Option<JoinHandle<()>>>,
    /// When the reaper next wakes, and how to wake it sooner (shared with the task, which
    /// holds no reference to the store while it sleeps).
    wake: Arc<ReaperWake>,
    /// Directory rows read at open, handed out once by `load_directory`.
    directory: Mutex<Vec<(DirTable, String, Vec<u8>)>>,
}

/// The longest the reaper sleeps before it looks at the wall clock again.
const REAPER_MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// The reaper sleeps until the earliest deadline any shard holds, as mini-redis's purge
/// task does, instead of waking every tick while nothing is due. Arming an earlier
/// deadline, or dropping the store, wakes it.
#[derive(Default)]
struct ReaperWake {
    /// The time (ms) the reaper sleeps until; `i64::MAX`: no deadline anywhere.
    at: AtomicI64,
    notify: tokio::sync::Notify,
    /// Times the reaper woke (tests: an idle store's reaper sleeps).
    wakes: AtomicU64,
}

impl ReaperWake {
    /// A deadline at `at` was armed: the reaper must wake by then.
    fn armed(&self, at: Millis) {
        if at < self.at.load(Ordering::Acquire) {
            self.at.fetch_min(at, Ordering::AcqRel);
            // Keeps a permit if the reaper is between its scan and its sleep.
            self.notify.notify_one();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reaper finds the store gone and ends.
        self.wake.notify.notify_one();
    }
}

struct Entry {
    state: UserState,
    /// Tick of this user's live wheel entry, if any; entries at other ticks are stale.
    armed: Option<i64>,
    /// Revision of the user's last visible change.
    rev: u64,
}

struct Shard {
    users: HashMap<UserId, Entry>,
    wheel: TimerWheel<UserId>,
}

/// Where a store's revisions start: the clock in microseconds. A store hands out far
/// fewer than a million revisions a second over its life, so every revision after a
/// restart is above every one before it, persisted or not: a consumer that drops events
/// by user and revision (as the README advises) never drops a real change after a
/// restart. Below 2^53 until the year 2255, so exact in JavaScript.
fn first_revision(now: crate::core::Millis) -> u64 {
    (now.max(0) as u64).saturating_mul(1000).max(1)
}

impl MemoryStore {
    /// Opens the store, loading persisted statuses when `data_dir` is set. Call
    /// [`MemoryStore::start`] from within a tokio runtime to run expiry and persistence.
    pub fn open(config: MemoryConfig, clock: Arc<dyn Clock>, bus: EventBus) -> Result<MemoryStore, PersistError> {
        let tick_ms = config.tick_ms.max(1);
        let (persist, loaded) = match &config.data_dir {
            Some(dir) => {
                let (p, l) = Persister::open(dir, config.start_fresh, config.sealer.clone())?;
                (Some(p), l)
            }
            None => (None, Loaded::default()),
        };
        let first = first_revision(clock.now());
        let inner = Inner {
            shards: Sharded::new_with(config.shards, || Shard { users: HashMap::new(), wheel: TimerWheel::new(tick_ms) }),
            clock,
            bus,
            node: config.node_id,
            tick_ms,
            forget_after_ms: config.forget_after_ms.filter(|f| *f > 0),
            revisions: AtomicU64::new(first),
            persist,
            users: AtomicI64::new(0),
            online: AtomicI64::new(0),
            sessions: AtomicI64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reaper: Mutex::new(None),
            wake: Arc::new(ReaperWake { at: AtomicI64::new(i64::MAX), ..Default::default() }),
            directory: Mutex::new(loaded.directory),
        };
        let store = MemoryStore { inner: Arc::new(inner) };
        store.restore(loaded.users);
        Ok(store)
    }

    fn restore(&self, records: Vec<(String, DurableUser)>) {
        let now = self.inner.clock.now();
        let mut loaded = 0usize;
        for (id, record) in records {
            let Ok(user) = UserId::parse(&id, usize::MAX) else {
                continue;
            };
            let mut state = record.into_state();
            if state.explicit.as_ref().is_some_and(|e| e.expires_at.is_some_and(|t| t <= now)) {
                // Lapsed while we were down: the derived status (offline) applies.
                state.explicit = None;
                if let Some(p) = &self.inner.persist {
                    p.enqueue(user.as_str(), Some(&DurableUser::of(&state)), false);
                }
            }
            let mut shard = self.inner.shard(&user).lock();
            // Every restored user shares the store's first revision (a revision orders one
            // user's changes), so a million restored users do not eat into the next ones.
            let rev = self.inner.revisions.load(Ordering::Relaxed);
            let mut entry = Entry { state, armed: None, rev };
            self.inner.arm(&mut shard.wheel, &user, &mut entry);
            shard.users.insert(user, entry);
            loaded += 1;
        }
        self.inner.users.store(loaded as i64, Ordering::Relaxed);
        if loaded > 0 {
            tracing::info!(users = loaded, "restored persisted presence");
        }
    }

    /// Starts the expiry reaper and the persistence writer on the current runtime.
    pub fn start(&self) {
        if let Some(p) = &self.inner.persist {
            p.start();
        }
        let (store, wake, clock) = (Arc::downgrade(&self.inner), self.inner.wake.clone(), self.inner.clock.clone());
        let handle = tokio::spawn(async move {
            loop {
                let Some(inner) = store.upgrade() else { return };
                wake.wakes.fetch_add(1, Ordering::Relaxed);
                let me = MemoryStore { inner };
                // What the reap re-arms is later than the deadline being served: no wake.
                me.reap(clock.now());
                // From here on, an arm the scan below does not see (its shard was scanned
                // before it) finds `at` above its deadline and wakes the task.
                wake.at.store(i64::MAX, Ordering::Release);
                let next = me.inner.shards.iter().filter_map(|s| s.lock().wheel.next_due()).min();
                drop(me);
                let at = wake.at.fetch_min(next.unwrap_or(i64::MAX), Ordering::AcqRel).min(next.unwrap_or(i64::MAX));
                tokio::select! {
                    _ = clock.sleep_until(at), if at != i64::MAX => {}
                    _ = wake.notify.notified() => {}
                    // The wait is measured once, on the steady clock: a step of the wall
                    // clock (NTP, a suspended VM) delays an expiry by a second at most.
                    _ = tokio::time::sleep(REAPER_MAX_SLEEP) => {}
                }
            }
        });
        *self.inner.reaper.lock() = Some(handle);
    }

    /// Processes every timer due at `now`; returns how many users were re-evaluated.
    /// The reaper task calls this when the earliest deadline comes; tests call it
    /// directly with a manual clock.
    pub fn reap(&self, now: Millis) -> usize {
        let inner = &*self.inner;
        let mut evaluated = 0;
        for shard in inner.shards.iter() {
            let mut guard = shard.lock();
            let shard = &mut *guard;
            for (tick, id) in shard.wheel.take_due(now) {
                let Some(entry) = shard.users.get_mut(&id) else {
                    continue;
                };
                if entry.armed != Some(tick) {
                    continue; // stale: the user was re-armed earlier
                }
                entry.armed = None;
                evaluated += 1;
                let sessions = entry.state.sessions.len();
                let before = entry.state.published(&id);
                let change = entry.state.expire(&inner.node, now);
                inner.after_change(&id, entry, sessions, before, &change, now, Persist::IfChanged);
                if inner.forgettable(&entry.state, now) {
                    shard.users.remove(&id);
                    inner.users.fetch_sub(1, Ordering::Relaxed);
                    if let Some(p) = &inner.persist {
                        p.enqueue(id.as_str(), None, false);
                    }
                    metrics::counter!("presence_users_forgotten_total").increment(1);
                    continue;
                }
                inner.arm(&mut shard.wheel, &id, entry);
            }
        }
        evaluated
    }

    /// Ends every session of every user now (see [`PresenceStore::drain`]); returns how
    /// many users had any.
    pub fn end_all(&self, now: Millis) -> usize {
        let inner = &*self.inner;
        let mut n = 0;
        for shard in inner.shards.iter() {
            let mut guard = shard.lock();
            let shard = &mut *guard;
            for (id, entry) in shard.users.iter_mut() {
                if entry.state.sessions.is_empty() {
                    continue;
                }
                n += 1;
                let sessions = entry.state.sessions.len();
                let before = entry.state.published(id);
                let change = entry.state.end_all(&inner.node, now);
                inner.after_change(id, entry, sessions, before, &change, now, Persist::IfChanged);
                inner.arm(&mut shard.wheel, id, entry);
            }
        }
        n
    }

    /// Runs `f` on the user's state under its shard lock at `now`, then accounts,
    /// publishes, persists (as `persist` says) and re-arms. With `create: false` an unknown
    /// user is left alone (`None`).
    fn update<R>(
        &self,
        id: &UserId,
        create: bool,
        persist: Persist,
        now: Millis,
        f: impl FnOnce(&mut UserState, Millis) -> (R, Change),
    ) -> Option<(R, Presence)> {
        let inner = &*self.inner;
        let mut guard = inner.shard(id).lock();
        let shard = &mut *guard;
        if !shard.users.contains_key(id) {
            if !create {
                return None;
            }
            shard.users.insert(id.clone(), Entry { state: UserState::new(inner.node.clone()), armed: None, rev: 0 });
            inner.users.fetch_add(1, Ordering::Relaxed);
        }
        let entry = shard.users.get_mut(id)?;
        let sessions = entry.state.sessions.len();
        let before = entry.state.published(id);
        let (r, change) = f(&mut entry.state, now);
        inner.after_change(id, entry, sessions, before, &change, now, persist);
        inner.arm(&mut shard.wheel, id, entry);
        let mut view = entry.state.view(id, now);
        view.revision = entry.rev;
        Some((r, view))
    }

    /// Makes `f`'s effect on the stored record durable, then applies it: a write the disk
    /// refuses is answered 503 and was never visible. Without persistence, just applies.
    ///
    /// With persistence `f` runs twice: first on a copy of the state, outside the lock, to
    /// stage the record that must be committed before anyone can see the change; then,
    /// once the commit succeeded, on the live state under the shard lock. Another write
    /// may land in between, so the second run is the one that counts, and
    /// [`Persist::UnlessAlready`] skips a second commit when it produced the record already
    /// committed. `f` must therefore depend only on the state and `now` (hence `Fn`).
    async fn durable_update(&self, id: &UserId, f: impl Fn(&mut UserState, Millis) -> Change) -> Result<Presence, StoreError> {
        self.persist_health()?;
        let now = self.inner.clock.now();
        let staged = match &self.inner.persist {
            None => None,
            Some(p) => {
                let mut st = {
                    let shard = self.inner.shard(id).lock();
                    shard.users.get(id).map(|e| e.state.clone())
                }
                .unwrap_or_else(|| UserState::new(self.inner.node.clone()));
                f(&mut st, now);
                let record = DurableUser::of(&st);
                if let Err(e) = Self::durable(p.enqueue(id.as_str(), Some(&record), true)).await {
                    // The client is told 503: the record it staged must not reach the disk
                    // when the writer retries. What memory holds goes there instead.
                    let current = self.inner.shard(id).lock().users.get(id).map(|e| DurableUser::of(&e.state));
                    p.enqueue(id.as_str(), current.as_ref(), false);
                    return Err(e);
                }
                Some(record)
            }
        };
        let persist = match staged {
            Some(r) => Persist::UnlessAlready(r),
            None => Persist::IfChanged,
        };
        let (_, presence) = self
            .update(id, true, persist, now, |s, now| ((), f(s, now)))
            .ok_or_else(|| StoreError::Unreachable("user state vanished".into()))?;
        Ok(presence)
    }

    /// Waits for a commit. The database's own message is logged by the writer, never
    /// passed to clients.
    async fn durable(ack: Option<Ack>) -> Result<(), StoreError> {
        match ack {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(StoreError::NotDurable(DB_FAILING.into())),
                Err(_) => Err(StoreError::ShuttingDown),
            },
        }
    }

    fn persist_health(&self) -> Result<(), StoreError> {
        match &self.inner.persist {
            Some(p) => p.health().map_err(|_| StoreError::NotDurable(DB_FAILING.into())),
            None => Ok(()),
        }
    }
}

/// What clients are told while the database cannot commit (the detail is in the log).
const DB_FAILING: &str = "the presence database cannot commit right now (see the server log); retry later";

/// When a transition's record is written to disk.
enum Persist {
    /// When the transition says its durable part changed.
    IfChanged,
    /// Likewise, unless the record is this one (already committed before applying).
    UnlessAlready(DurableUser),
}

impl Inner {
    fn shard(&self, id: &UserId) -> &Mutex<Shard> {
        self.shards.of(id.as_str())
    }

    /// Bookkeeping after a transition, under the shard lock so that events and
    /// persisted records of one user keep their order.
    #[allow(clippy::too_many_arguments)]
    fn after_change(
        &self,
        id: &UserId,
        entry: &mut Entry,
        sessions_before: usize,
        before: Presence,
        change: &Change,
        now: Millis,
        persist: Persist,
    ) {
        let sessions_after = entry.state.sessions.len();
        self.sessions.fetch_add(sessions_after as i64 - sessions_before as i64, Ordering::Relaxed);
        if let Some(kind) = change.event {
            match kind {
                EventKind::UserOnline => self.online.fetch_add(1, Ordering::Relaxed),
                EventKind::UserOffline => self.online.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            let before = Presence { revision: entry.rev, ..before };
            entry.rev = self.revisions.fetch_add(1, Ordering::Relaxed) + 1;
            let mut presence = entry.state.view(id, now);
            presence.revision = entry.rev;
            self.bus.publish(Event { kind, presence, before, at: now });
        }
        if let (Some(p), true) = (&self.persist, change.persist) {
            let record = DurableUser::of(&entry.state);
            if !matches!(&persist, Persist::UnlessAlready(done) if *done == record) {
                p.enqueue(id.as_str(), Some(&record), false);
            }
        }
    }

    /// Whether the user holds nothing and was last heard of `forget_after` ago.
    fn forgettable(&self, state: &UserState, now: Millis) -> bool {
        match (self.forget_after_ms, state.idle_since()) {
            (Some(f), Some(idle)) => idle.saturating_add(f) <= now,
            _ => false,
        }
    }

    /// Arms the user's wheel entry at its earliest deadline (expiry, or the moment it may
    /// be forgotten) unless one is armed at or before it.
    fn arm(&self, wheel: &mut TimerWheel<UserId>, id: &UserId, entry: &mut Entry) {
        let forget = match (self.forget_after_ms, entry.state.idle_since()) {
            (Some(f), Some(idle)) => Some(idle.saturating_add(f)),
            _ => None,
        };
        let deadline = match (entry.state.next_deadline(), forget) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(d) => d,
                None => return,
            },
        };
        if entry.armed.is_none_or(|a| a > wheel.tick_of(deadline)) {
            let tick = wheel.insert(deadline, id.clone());
            entry.armed = Some(tick);
            self.wake.armed(tick.saturating_mul(self.tick_ms));
        }
    }
}

#[async_trait]
impl PresenceStore for MemoryStore {
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        let (mut hits, mut misses) = (0, 0);
        for id in ids {
            let shard = inner.shard(id).lock();
            let p = shard.users.get(id).map(|e| Presence { revision: e.rev, ..e.state.view(id, now) });
            drop(shard);
            if p.is_some() {
                hits += 1;
            } else {
                misses += 1;
            }
            out.push(p);
        }
        inner.hits.fetch_add(hits, Ordering::Relaxed);
        inner.misses.fetch_add(misses, Ordering::Relaxed);
        Ok(out)
    }

    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        self.durable_update(id, |s, now| s.set_status(req.status, req.message.clone(), req.ttl_ms, &node, now)).await
    }

    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        self.durable_update(id, |s, now| s.clear_status(&node, now)).await
    }

    async fn erase(&self, id: &UserId) -> Result<bool, StoreError> {
        self.persist_health()?;
        let inner = &*self.inner;
        let now = inner.clock.now();
        let (existed, ack) = {
            let mut guard = inner.shard(id).lock();
            let removed = guard.users.remove(id);
            let before = match &removed {
                Some(entry) => {
                    inner.users.fetch_sub(1, Ordering::Relaxed);
                    inner.sessions.fetch_sub(entry.state.sessions.len() as i64, Ordering::Relaxed);
                    if !entry.state.sessions.is_empty() {
                        // Counted online until now (a session not ended before the erasure).
                        inner.online.fetch_sub(1, Ordering::Relaxed);
                    }
                    Presence { revision: entry.rev, ..entry.state.published(id) }
                }
                // Directory rows only: the event and the rewrite all the same.
                None => Presence::unknown(id.clone(), inner.node.clone()),
            };
            let rev = inner.revisions.fetch_add(1, Ordering::Relaxed) + 1;
            let presence = Presence { revision: rev, ..Presence::unknown(id.clone(), inner.node.clone()) };
            inner.bus.publish(Event { kind: EventKind::UserErased, presence, before, at: now });
            // The record goes, and the file is rewritten without it (no old page keeps it).
            (removed.is_some(), inner.persist.as_ref().map(|p| p.erase(id.as_str())))
        };
        if let Some(ack) = ack {
            ack.await.map_err(|_| StoreError::NotDurable(DB_FAILING.into()))?.map_err(|_| StoreError::NotDurable(DB_FAILING.into()))?;
        }
        Ok(existed)
    }

    async fn register_session(&self, id: &UserId, req: NewSession) -> Result<Registered, StoreError> {
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        let (reg, _) = self
            .update(id, true, Persist::IfChanged, now, |s, now| match s.register(req, &node, now) {
                Ok((reg, change)) => (Ok(reg), change),
                Err(limit) => (Err(StoreError::TooManyDevices { max: limit.max }), Change::none()),
            })
            .ok_or_else(|| StoreError::Unreachable("user state vanished".into()))?;
        reg
    }

    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let mut shard = inner.shard(id).lock();
        // Heartbeats are the hottest write: no event, no persistence, no timer work.
        Ok(shard.users.get_mut(id).and_then(|e| e.state.refresh(device, now)))
    }

    async fn end_session(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        Ok(self
            .update(id, false, Persist::IfChanged, now, |s, now| s.end(device, sid, ending, &node, now))
            .is_some_and(|(removed, _)| removed))
    }

    async fn set_activity(&self, id: &UserId, device: &str, sid: Option<u64>, activity: Activity, _: bool) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        let now = self.inner.clock.now();
        Ok(self
            .update(id, false, Persist::IfChanged, now, |s, now| s.set_activity(device, sid, activity, &node, now))
            .is_some_and(|(found, _)| found))
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        let now = self.inner.clock.now();
        let shard = self.inner.shard(id).lock();
        Ok(shard.users.get(id).map(|e| e.state.live_sessions(now).cloned().collect()).unwrap_or_default())
    }

    async fn sessions_of_instance(&self, instance: &str) -> Result<Vec<(UserId, Session)>, StoreError> {
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            let shard = shard.lock();
            for (user, e) in &shard.users {
                for s in e.state.sessions.iter().filter(|s| &*s.instance_id == instance) {
                    out.push((user.clone(), s.clone()));
                }
            }
        }
        Ok(out)
    }

    async fn rebind_session(&self, id: &UserId, device: &str, sid: u64, ttl_ms: i64) -> Result<bool, StoreError> {
        let now = self.inner.clock.now();
        let mut shard = self.inner.shard(id).lock();
        // A later deadline only: the wheel entry re-arms lazily when the old one is due.
        Ok(shard.users.get_mut(id).is_some_and(|e| e.state.rebind(device, sid, ttl_ms, now)))
    }

    fn stats(&self) -> StoreStats {
        let i = &*self.inner;
        StoreStats {
            users: i.users.load(Ordering::Relaxed).max(0) as u64,
            online_users: i.online.load(Ordering::Relaxed).max(0) as u64,
            sessions: i.sessions.load(Ordering::Relaxed).max(0) as u64,
            hits: i.hits.load(Ordering::Relaxed),
            misses: i.misses.load(Ordering::Relaxed),
            read_cache: false,
            ..StoreStats::default()
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.persist_health()
    }

    async fn drain(&self) {
        let n = self.end_all(self.inner.clock.now());
        if n > 0 {
            tracing::info!(users = n, "stopping: ended every device session (the embedded store does not keep them across a restart)");
        }
    }

    async fn shutdown(&self) {
        if let Some(h) = self.inner.reaper.lock().take() {
            h.abort();
        }
        if let Some(p) = &self.inner.persist {
            p.close().await;
        }
    }
}

#[async_trait]
impl DirectoryStore for MemoryStore {
    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        match &self.inner.persist {
            Some(p) => {
                self.persist_health()?;
                Self::durable(Some(p.enqueue_dir(table, key, value))).await
            }
            None => Ok(()),
        }
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        Ok(std::mem::take(&mut *self.inner.directory.lock()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::core::Status;
    use crate::store::get_one;

    const T0: Millis = 1_700_000_000_000;

    fn setup() -> (MemoryStore, Arc<ManualClock>, tokio::sync::broadcast::Receiver<Arc<Event>>) {
        let clock = Arc::new(ManualClock::new(T0));
        let bus = EventBus::new(1024);
        let rx = bus.subscribe();
        let store = MemoryStore::open(MemoryConfig::new("node-a"), clock.clone(), bus).unwrap();
        (store, clock, rx)
    }

    fn uid(s: &str) -> UserId {
        UserId::parse(s, 128).unwrap()
    }

    fn drain(rx: &mut tokio::sync::broadcast::Receiver<Arc<Event>>) -> Vec<(EventKind, String, Status)> {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            v.push((e.kind, e.presence.user_id.to_string(), e.presence.status));
        }
        v
    }

    /// Within `within` (real time), `rx` receives an event of `kind`.
    async fn event_within(rx: &mut tokio::sync::broadcast::Receiver<Arc<Event>>, kind: EventKind, within: std::time::Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.kind == kind => return true,
                    Ok(_) => continue,
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// The reaper does not wake while nothing is due (it used to, every tick; now once a
    /// second at most, for a jump of the wall clock), sleeps until
    /// the earliest deadline, is woken by an earlier one armed while it sleeps, and ends
    /// with its store.
    #[tokio::test]
    async fn the_reaper_sleeps_until_the_earliest_deadline() {
        let (store, clock, mut rx) = setup();
        store.start();
        let wake = store.inner.wake.clone();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let idle = wake.wakes.load(Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await; // five ticks of 100 ms
        assert_eq!(wake.wakes.load(Ordering::Relaxed), idle, "an idle store's reaper sleeps (a second at most)");

        // A far deadline, then a nearer one armed while the reaper sleeps until the first.
        store.register_session(&uid("far"), NewSession::new("d", "gw", 600_000)).await.unwrap();
        store.register_session(&uid("near"), NewSession::new("d", "gw", 5_000)).await.unwrap();
        drain(&mut rx);
        assert_eq!(wake.at.load(Ordering::Relaxed), T0 + 5_000, "it sleeps until the nearer deadline");
        clock.advance(4_000);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(drain(&mut rx).is_empty(), "nothing before the deadline");
        clock.advance(1_000);
        assert!(event_within(&mut rx, EventKind::UserOffline, std::time::Duration::from_secs(5)).await, "the near session ends on time");
        assert_eq!(get_one(&store, &uid("far")).await.unwrap().unwrap().status, Status::Online);
        assert_eq!(wake.at.load(Ordering::Relaxed), T0 + 600_000, "then it sleeps until the far one");

        // The task holds no reference to the store: dropping the store ends it.
        let handle = store.inner.reaper.lock().take().unwrap();
        drop(store);
        assert!(tokio::time::timeout(std::time::Duration::from_secs(5), handle).await.is_ok(), "the reaper ends with its store");
    }

    #[tokio::test]
    async fn session_ttl_expiry_through_the_wheel() {
        let (store, clock, mut rx) = setup();
        let alice = uid("alice");
        store.register_session(&alice, NewSession::new("phone", "gw1", 60_000)).await.unwrap();
        assert_eq!(drain(&mut rx), vec![(EventKind::UserOnline, "alice".into(), Status::Online)]);
        assert_eq!(store.stats().online_users, 1);
        assert_eq!(store.stats().sessions, 1);

        clock.advance(30_000);
        assert_eq!(store.refresh_session(&alice, "phone").await.unwrap(), Some(T0 + 90_000));
        // The original deadline passes: the stale wheel entry re-arms, nothing is emitted.
        clock.advance(30_000);
        assert_eq!(store.reap(clock.now()), 1);
        assert_eq!(drain(&mut rx), vec![]);
        // The refreshed deadline passes: offline.
        clock.advance(30_000);
        store.reap(clock.now());
        assert_eq!(drain(&mut rx), vec![(EventKind::UserOffline, "alice".into(), Status::Offline)]);
        let p = get_one(&store, &alice).await.unwrap().unwrap();
        assert_eq!(p.last_seen, Some(T0 + 30_000));
        assert_eq!(store.stats().online_users, 0);
        assert_eq!(store.stats().sessions, 0);
        assert_eq!(store.refresh_session(&alice, "phone").await.unwrap(), None);
        // Nothing left armed: a later reap evaluates nobody.
        clock.advance(600_000);
        assert_eq!(store.reap(clock.now()), 0);
    }

    #[tokio::test]
    async fn explicit_status_expires_into_derived_with_event() {
        let (store, clock, mut rx) = setup();
        let bob = uid("bob");
        store.register_session(&bob, NewSession::new("d1", "gw", 600_000)).await.unwrap();
        let p = store.set_status(&bob, SetStatus { status: Status::Busy, message: Arc::from("focus"), ttl_ms: Some(5_000) }).await.unwrap();
        assert_eq!((p.status, &*p.message, p.expires_at), (Status::Busy, "focus", Some(T0 + 5_000)));
        drain(&mut rx);
        clock.advance(4_999);
        store.reap(clock.now());
        assert_eq!(drain(&mut rx), vec![]);
        clock.advance(1 + 100);
        store.reap(clock.now());
        assert_eq!(drain(&mut rx), vec![(EventKind::PresenceExpired, "bob".into(), Status::Online)]);
    }

    #[tokio::test]
    async fn multi_device_and_unknown_users() {
        let (store, _clock, mut rx) = setup();
        let carol = uid("carol");
        assert_eq!(get_one(&store, &carol).await.unwrap(), None);
        assert!(!store.unregister_session(&carol, "x", None).await.unwrap());
        assert_eq!(store.stats().users, 0, "reads and no-op writes do not create users");
        store.register_session(&carol, NewSession::new("phone", "gw1", 60_000)).await.unwrap();
        store.register_session(&carol, NewSession::new("laptop", "gw2", 60_000)).await.unwrap();
        let devices = store.devices(&carol).await.unwrap();
        assert_eq!(devices.len(), 2);
        assert!(store.unregister_session(&carol, "phone", None).await.unwrap());
        assert!(store.unregister_session(&carol, "laptop", None).await.unwrap());
        assert_eq!(
            drain(&mut rx),
            vec![
                (EventKind::UserOnline, "carol".into(), Status::Online),
                (EventKind::PresenceUpdated, "carol".into(), Status::Online),
                (EventKind::PresenceUpdated, "carol".into(), Status::Online),
                (EventKind::UserOffline, "carol".into(), Status::Offline)
            ]
        );
        let got = store.get_many(&[carol.clone(), uid("nobody")]).await.unwrap();
        assert_eq!(got[0].as_ref().map(|p| p.status), Some(Status::Offline));
        assert_eq!(got[1], None);
        assert_eq!(store.stats().hits, 1);
    }

    #[tokio::test]
    async fn statuses_survive_restart_and_lapse_while_down() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let mut cfg = MemoryConfig::new("node-a");
        cfg.data_dir = Some(dir.path().to_path_buf());
        {
            let store = MemoryStore::open(cfg.clone(), clock.clone(), EventBus::new(16)).unwrap();
            store.start();
            let set = |s, ttl| SetStatus { status: s, message: Arc::from("msg"), ttl_ms: ttl };
            store.set_status(&uid("long"), set(Status::Busy, Some(3_600_000))).await.unwrap();
            store.set_status(&uid("short"), set(Status::Away, Some(1_000))).await.unwrap();
            store.set_status(&uid("forever"), set(Status::Online, None)).await.unwrap();
            store.register_session(&uid("sess"), NewSession::new("d", "gw", 60_000)).await.unwrap();
            store.shutdown().await;
        }
        clock.advance(10_000);
        let store = MemoryStore::open(cfg, clock.clone(), EventBus::new(16)).unwrap();
        let got = store.get_many(&[uid("long"), uid("short"), uid("forever"), uid("sess")]).await.unwrap();
        let got: Vec<_> = got.into_iter().map(|p| p.map(|p| (p.status, p.message.to_string(), p.expires_at))).collect();
        assert_eq!(
            got,
            vec![
                Some((Status::Busy, "msg".into(), Some(T0 + 3_600_000))),
                Some((Status::Offline, "".into(), None)),
                Some((Status::Online, "msg".into(), None)),
                Some((Status::Offline, "".into(), None)),
            ]
        );
        assert_eq!(store.stats().sessions, 0, "sessions are not restored");
        // The long status still expires on time after the restart.
        clock.set(T0 + 3_600_000);
        assert_eq!(store.reap(clock.now()), 1);
        assert_eq!(get_one(&store, &uid("long")).await.unwrap().unwrap().status, Status::Offline);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sessions_keep_counters_exact() {
        let (store, _clock, _rx) = setup();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..500 {
                    let u = uid(&format!("u{}", i % 50));
                    let d = format!("t{t}");
                    store.register_session(&u, NewSession::new(&d, "gw", 60_000)).await.unwrap();
                    if i % 3 == 0 {
                        store.unregister_session(&u, &d, None).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let ids: Vec<UserId> = (0..50).map(|i| uid(&format!("u{i}"))).collect();
        let total: u64 = {
            let mut n = 0;
            for id in &ids {
                n += store.devices(id).await.unwrap().len() as u64;
            }
            n
        };
        assert_eq!(store.stats().sessions, total);
        let online = store.get_many(&ids).await.unwrap().iter().filter(|p| p.as_ref().unwrap().device_count > 0).count();
        assert_eq!(store.stats().online_users, online as u64);
    }

    /// Revisions only grow, across a restart too: a consumer deduplicating by user and
    /// revision (as the README advises) must not drop the changes made after it.
    #[tokio::test]
    async fn revisions_keep_growing_after_a_restart() {
        let clock = Arc::new(ManualClock::new(T0));
        let u = uid("restarted");
        let before = {
            let store = MemoryStore::open(MemoryConfig::new("node-a"), clock.clone(), EventBus::new(64)).unwrap();
            for s in [Status::Busy, Status::Away, Status::Online, Status::Busy, Status::Away] {
                store.set_status(&u, SetStatus { status: s, message: Arc::from(""), ttl_ms: None }).await.unwrap();
            }
            get_one(&store, &u).await.unwrap().unwrap().revision
        };
        clock.advance(1); // restarted a millisecond later
        let store = MemoryStore::open(MemoryConfig::new("node-a"), clock.clone(), EventBus::new(64)).unwrap();
        store.set_status(&u, SetStatus { status: Status::Busy, message: Arc::from(""), ttl_ms: None }).await.unwrap();
        let after = get_one(&store, &u).await.unwrap().unwrap().revision;
        assert!(after > before, "revision {after} after the restart, {before} before it");
    }

    #[tokio::test]
    async fn every_visible_change_takes_a_higher_revision_and_events_carry_both_sides() {
        let (store, _clock, mut rx) = setup();
        let u = uid("rev");
        store.register_session(&u, NewSession::new("a", "gw", 60_000)).await.unwrap();
        let r1 = get_one(&store, &u).await.unwrap().unwrap().revision;
        store.refresh_session(&u, "a").await.unwrap();
        assert_eq!(get_one(&store, &u).await.unwrap().unwrap().revision, r1, "a heartbeat is not a change");
        store.register_session(&u, NewSession::new("b", "gw", 60_000)).await.unwrap();
        let r2 = get_one(&store, &u).await.unwrap().unwrap().revision;
        assert!(r2 > r1);
        let events: Vec<Arc<Event>> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].before.revision, events[0].presence.revision), (0, r1));
        assert_eq!((events[1].before.revision, events[1].presence.revision), (r1, r2));
        assert_eq!((events[1].before.device_count, events[1].presence.device_count), (1, 2));
    }

    #[tokio::test]
    async fn users_with_nothing_left_are_forgotten_after_the_retention() {
        let clock = Arc::new(ManualClock::new(T0));
        let mut cfg = MemoryConfig::new("node-a");
        cfg.forget_after_ms = Some(60_000);
        let store = MemoryStore::open(cfg, clock.clone(), EventBus::new(64)).unwrap();
        let mut highest = 0;
        for i in 0..100 {
            let u = uid(&format!("churn-{i}"));
            store.register_session(&u, NewSession::new("d", "gw", 10_000)).await.unwrap();
            store.unregister_session(&u, "d", None).await.unwrap();
            highest = highest.max(get_one(&store, &u).await.unwrap().unwrap().revision);
        }
        store.set_status(&uid("keeps-a-status"), SetStatus { status: Status::Busy, message: Arc::from(""), ttl_ms: None }).await.unwrap();
        assert_eq!(store.stats().users, 101);
        clock.advance(59_000);
        store.reap(clock.now());
        assert_eq!(store.stats().users, 101, "not before the retention");
        clock.advance(2_000);
        store.reap(clock.now());
        assert_eq!(store.stats().users, 1, "only the user with a status is left");
        assert_eq!(get_one(&store, &uid("churn-1")).await.unwrap(), None);
        // A forgotten user coming back gets a higher revision than ever before.
        store.register_session(&uid("churn-1"), NewSession::new("d", "gw", 10_000)).await.unwrap();
        assert!(get_one(&store, &uid("churn-1")).await.unwrap().unwrap().revision > highest);
    }

    #[tokio::test]
    async fn concurrent_registrations_never_pass_the_device_limit() {
        let (store, _clock, _rx) = setup();
        let u = uid("limited");
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let (store, u) = (store.clone(), u.clone());
                tokio::spawn(
                    async move { store.register_session(&u, NewSession::new(&format!("d{i}"), "gw", 60_000).max_devices(10)).await },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e, StoreError::TooManyDevices { max: 10 }),
            }
        }
        assert_eq!(ok, 10);
        assert_eq!(store.devices(&u).await.unwrap().len(), 10);
    }
}
