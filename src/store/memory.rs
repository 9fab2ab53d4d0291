//! The embedded store: sharded in-memory state, a coarse timer wheel for expiry, and
//! optional durability through [`Persister`].
//!
//! Users are spread over shards by hash; each shard is a `parking_lot::Mutex` (held for
//! microseconds, never across an `.await`, so a std-style lock beats tokio's) around the
//! users' states and the shard's timer wheel. The wheel maps a tick (deadline rounded up to
//! `tick_ms`) to the users due then. Each user has at most one live ("armed") entry, at its
//! earliest deadline: a heartbeat that pushes the deadline later touches no timer at all;
//! when the entry fires, the reaper re-evaluates the user and re-arms it at its new earliest
//! deadline. Expiry is therefore O(expiring users), never a scan of all users.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::persist::{Ack, DirTable, Loaded, PersistError, Persister, Record};
use super::{Clock, SetStatus, Store, StoreError, StoreStats};
use crate::bus::EventBus;
use crate::core::{Change, Event, EventKind, Millis, Presence, Registered, Session, UserId, UserState};

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
}

impl MemoryConfig {
    pub fn new(node_id: &str) -> MemoryConfig {
        MemoryConfig { node_id: Arc::from(node_id), data_dir: None, shards: 64, tick_ms: 100 }
    }
}

/// A cheap-to-clone handle; all clones share one state.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    node: Arc<str>,
    tick_ms: i64,
    persist: Option<Persister>,
    users: AtomicI64,
    online: AtomicI64,
    sessions: AtomicI64,
    hits: AtomicU64,
    misses: AtomicU64,
    reaper: Mutex<Option<JoinHandle<()>>>,
    /// Directory rows read at open, handed out once by `load_directory`.
    directory: Mutex<Vec<(DirTable, String, Vec<u8>)>>,
}

struct Entry {
    state: UserState,
    /// Tick of this user's live wheel entry, if any; entries at other ticks are stale.
    armed: Option<i64>,
}

#[derive(Default)]
struct Shard {
    users: HashMap<UserId, Entry>,
    wheel: BTreeMap<i64, Vec<UserId>>,
}

impl MemoryStore {
    /// Opens the store, loading persisted statuses when `data_dir` is set. Call
    /// [`MemoryStore::start`] from within a tokio runtime to run expiry and persistence.
    pub fn open(config: MemoryConfig, clock: Arc<dyn Clock>, bus: EventBus) -> Result<MemoryStore, PersistError> {
        let n = config.shards.max(1).next_power_of_two();
        let (persist, loaded) = match &config.data_dir {
            Some(dir) => {
                let (p, l) = Persister::open(dir)?;
                (Some(p), l)
            }
            None => (None, Loaded::default()),
        };
        let inner = Inner {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
            clock,
            bus,
            node: config.node_id,
            tick_ms: config.tick_ms.max(1),
            persist,
            users: AtomicI64::new(0),
            online: AtomicI64::new(0),
            sessions: AtomicI64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reaper: Mutex::new(None),
            directory: Mutex::new(loaded.directory),
        };
        let store = MemoryStore { inner: Arc::new(inner) };
        store.restore(loaded.users);
        Ok(store)
    }

    fn restore(&self, records: Vec<(String, Record)>) {
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
                    p.enqueue(user.as_str(), Some(&Record::of(&state)), false);
                }
            }
            let mut shard = self.inner.shard(&user).lock();
            let mut entry = Entry { state, armed: None };
            arm(&mut shard.wheel, &user, &mut entry, self.inner.tick_ms);
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
        let tick = Duration::from_millis(self.inner.tick_ms as u64);
        let handle = super::spawn_periodic(Arc::downgrade(&self.inner), tick, |inner: Arc<Inner>| async move {
            let now = inner.clock.now();
            MemoryStore { inner }.reap(now);
        });
        *self.inner.reaper.lock() = Some(handle);
    }

    /// Processes every timer due at `now`; returns how many users were re-evaluated.
    /// The reaper task calls this every tick; tests call it directly with a manual clock.
    pub fn reap(&self, now: Millis) -> usize {
        let inner = &*self.inner;
        let due_tick = now.div_euclid(inner.tick_ms);
        let mut evaluated = 0;
        for shard in inner.shards.iter() {
            let mut guard = shard.lock();
            let shard = &mut *guard;
            let Some((&first, _)) = shard.wheel.first_key_value() else {
                continue;
            };
            if first > due_tick {
                continue;
            }
            let later = shard.wheel.split_off(&(due_tick + 1));
            let due = std::mem::replace(&mut shard.wheel, later);
            for (tick, ids) in due {
                for id in ids {
                    let Some(entry) = shard.users.get_mut(&id) else {
                        continue;
                    };
                    if entry.armed != Some(tick) {
                        continue; // stale: the user was re-armed earlier
                    }
                    entry.armed = None;
                    evaluated += 1;
                    let before = entry.state.sessions.len();
                    let change = entry.state.expire(&inner.node, now);
                    inner.after_change(&id, entry, before, &change, now, false);
                    arm(&mut shard.wheel, &id, entry, inner.tick_ms);
                }
            }
        }
        evaluated
    }

    /// Runs `f` on the user's state under its shard lock, then accounts, publishes,
    /// persists and re-arms. With `create: false` an unknown user is left alone (`None`).
    fn update<R>(
        &self,
        id: &UserId,
        create: bool,
        ack: bool,
        f: impl FnOnce(&mut UserState, Millis) -> (R, Change),
    ) -> Option<(R, Presence, Option<Ack>)> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let mut guard = inner.shard(id).lock();
        let shard = &mut *guard;
        if !shard.users.contains_key(id) {
            if !create {
                return None;
            }
            shard.users.insert(id.clone(), Entry { state: UserState::new(inner.node.clone()), armed: None });
            inner.users.fetch_add(1, Ordering::Relaxed);
        }
        let entry = shard.users.get_mut(id)?;
        let before = entry.state.sessions.len();
        let (r, change) = f(&mut entry.state, now);
        let ack = inner.after_change(id, entry, before, &change, now, ack);
        arm(&mut shard.wheel, id, entry, inner.tick_ms);
        Some((r, entry.state.view(id, now), ack))
    }

    async fn durable(ack: Option<Ack>) -> Result<(), StoreError> {
        match ack {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(StoreError::Unavailable(format!("could not persist the change: {e}"))),
                Err(_) => Err(StoreError::Unavailable("persistence is shutting down".into())),
            },
        }
    }

    fn persist_health(&self) -> Result<(), StoreError> {
        match &self.inner.persist {
            Some(p) => p.health().map_err(|e| StoreError::Unavailable(format!("presence database: {e}"))),
            None => Ok(()),
        }
    }
}

impl Inner {
    fn shard(&self, id: &UserId) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(id.as_str()) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Bookkeeping after a transition, under the shard lock so that events and
    /// persisted records of one user keep their order.
    fn after_change(&self, id: &UserId, entry: &Entry, sessions_before: usize, change: &Change, now: Millis, ack: bool) -> Option<Ack> {
        let sessions_after = entry.state.sessions.len();
        self.sessions.fetch_add(sessions_after as i64 - sessions_before as i64, Ordering::Relaxed);
        if let Some(kind) = change.event {
            match kind {
                EventKind::UserOnline => self.online.fetch_add(1, Ordering::Relaxed),
                EventKind::UserOffline => self.online.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            self.bus.publish(Event { kind, presence: entry.state.view(id, now), previous: change.previous, at: now });
        }
        match &self.persist {
            Some(p) if change.persist || ack => p.enqueue(id.as_str(), Some(&Record::of(&entry.state)), ack),
            _ => None,
        }
    }
}

/// Arms the user's wheel entry at its earliest deadline unless one is armed at or before it.
fn arm(wheel: &mut BTreeMap<i64, Vec<UserId>>, id: &UserId, entry: &mut Entry, tick_ms: i64) {
    let Some(deadline) = entry.state.next_deadline() else {
        return;
    };
    let tick = deadline.div_euclid(tick_ms) + i64::from(deadline.rem_euclid(tick_ms) != 0);
    if entry.armed.is_none_or(|a| a > tick) {
        wheel.entry(tick).or_default().push(id.clone());
        entry.armed = Some(tick);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        let (mut hits, mut misses) = (0, 0);
        for id in ids {
            let shard = inner.shard(id).lock();
            let p = shard.users.get(id).map(|e| e.state.view(id, now));
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
        self.persist_health()?;
        let node = self.inner.node.clone();
        let (_, presence, ack) = self
            .update(id, true, true, |s, now| ((), s.set_status(req.status, req.message, req.ttl_ms, &node, now)))
            .ok_or_else(|| StoreError::Unavailable("user state vanished".into()))?;
        Self::durable(ack).await?;
        Ok(presence)
    }

    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError> {
        self.persist_health()?;
        let node = self.inner.node.clone();
        let (_, presence, ack) = self
            .update(id, true, true, |s, now| ((), s.clear_status(&node, now)))
            .ok_or_else(|| StoreError::Unavailable("user state vanished".into()))?;
        Self::durable(ack).await?;
        Ok(presence)
    }

    async fn register_session(&self, id: &UserId, device: &str, instance: &str, ttl_ms: i64) -> Result<Registered, StoreError> {
        let node = self.inner.node.clone();
        let (reg, _, _) = self
            .update(id, true, false, |s, now| s.register(Arc::from(device), Arc::from(instance), ttl_ms, &node, now))
            .ok_or_else(|| StoreError::Unavailable("user state vanished".into()))?;
        Ok(reg)
    }

    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        let inner = &*self.inner;
        let now = inner.clock.now();
        let mut shard = inner.shard(id).lock();
        // Heartbeats are the hottest write: no event, no persistence, no timer work.
        Ok(shard.users.get_mut(id).and_then(|e| e.state.refresh(device, now)))
    }

    async fn unregister_session(&self, id: &UserId, device: &str) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        Ok(self.update(id, false, false, |s, now| s.unregister(device, &node, now)).is_some_and(|(removed, _, _)| removed))
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        let now = self.inner.clock.now();
        let shard = self.inner.shard(id).lock();
        Ok(shard.users.get(id).map(|e| e.state.live_sessions(now).cloned().collect()).unwrap_or_default())
    }

    fn stats(&self) -> StoreStats {
        let i = &*self.inner;
        StoreStats {
            users: i.users.load(Ordering::Relaxed).max(0) as u64,
            online_users: i.online.load(Ordering::Relaxed).max(0) as u64,
            sessions: i.sessions.load(Ordering::Relaxed).max(0) as u64,
            hits: i.hits.load(Ordering::Relaxed),
            misses: i.misses.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.persist_health()
    }

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

    async fn shutdown(&self) {
        if let Some(h) = self.inner.reaper.lock().take() {
            h.abort();
        }
        if let Some(p) = &self.inner.persist {
            p.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Status;
    use crate::store::{get_one, ManualClock};

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

    #[tokio::test]
    async fn session_ttl_expiry_through_the_wheel() {
        let (store, clock, mut rx) = setup();
        let alice = uid("alice");
        store.register_session(&alice, "phone", "gw1", 60_000).await.unwrap();
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
        store.register_session(&bob, "d1", "gw", 600_000).await.unwrap();
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
        assert!(!store.unregister_session(&carol, "x").await.unwrap());
        assert_eq!(store.stats().users, 0, "reads and no-op writes do not create users");
        store.register_session(&carol, "phone", "gw1", 60_000).await.unwrap();
        store.register_session(&carol, "laptop", "gw2", 60_000).await.unwrap();
        let devices = store.devices(&carol).await.unwrap();
        assert_eq!(devices.len(), 2);
        assert!(store.unregister_session(&carol, "phone").await.unwrap());
        assert!(store.unregister_session(&carol, "laptop").await.unwrap());
        assert_eq!(
            drain(&mut rx),
            vec![(EventKind::UserOnline, "carol".into(), Status::Online), (EventKind::UserOffline, "carol".into(), Status::Offline)]
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
            store.register_session(&uid("sess"), "d", "gw", 60_000).await.unwrap();
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
                    store.register_session(&u, &d, "gw", 60_000).await.unwrap();
                    if i % 3 == 0 {
                        store.unregister_session(&u, &d).await.unwrap();
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
}
