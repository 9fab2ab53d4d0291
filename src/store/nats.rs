//! Cluster backend: presence in NATS JetStream KV (seed 003 §5), shared by every node.
//!
//! One key per user (`user.<encoded id>`, see [`crate::nats::kv::encode_id`]) holding the
//! user's whole [`UserState`] (explicit status, message, expiry, `last_seen`, sessions with
//! their owning node). Every change runs the same pure transition as the embedded store,
//! inside a compare-and-swap on the key's revision ([`crate::nats::kv::update`]), so
//! concurrent writers on different nodes never lose an update, and exactly one of them
//! performs (and reports) each transition.
//!
//! Events go to this node's bus and to `presence.{update,expire,online,offline}.<id>`
//! (JSON, captured by the `PRESENCE_EVENTS` stream for durable consumers); events from
//! other nodes arrive on those subjects and are put on this node's bus, so local
//! WebSocket and gRPC watchers see changes made anywhere.
//!
//! Expiry: the node that last changed a user keeps a local timer for the user's next
//! deadline and applies `expire` (under CAS) when it passes; reads apply the rule at read
//! time, so a lapsed status or session is never shown even before that.
//!
//! Not yet here (issue 5, next steps): node leases and the janitor for dead nodes,
//! heartbeats absorbed in memory, interest-routed subscriptions, leaf/center topology,
//! the read cache and degraded mode.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv as jkv, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{Clock, DirTable, SetStatus, Store, StoreError, StoreStats};
use crate::bus::EventBus;
use crate::config::NatsConfig;
use crate::core::{Change, Event, EventKind, Millis, Presence, Registered, Session, Status, UserId, UserState};
use crate::nats::kv::{self, decode_id, encode_id, user_key, BucketConfig, KvError};
use crate::nats::Nats;

/// Subjects of presence events.
pub const EVENT_SUBJECTS: [&str; 4] = ["presence.update.>", "presence.expire.>", "presence.online.>", "presence.offline.>"];

fn subject(kind: EventKind, id: &UserId) -> String {
    let k = match kind {
        EventKind::PresenceUpdated => "update",
        EventKind::PresenceExpired => "expire",
        EventKind::UserOnline => "online",
        EventKind::UserOffline => "offline",
    };
    format!("presence.{k}.{}", encode_id(id.as_str()))
}

/// An event on the wire (documented in the README). Times are Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub status: Status,
    #[serde(default)]
    pub message: String,
    pub previous: Status,
    pub last_seen: Option<Millis>,
    pub updated_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    pub device_count: u32,
    pub node_id: String,
    pub at: Millis,
}

impl WireEvent {
    fn of(e: &Event) -> WireEvent {
        let p = &e.presence;
        WireEvent {
            kind: e.kind.as_str().into(),
            user_id: p.user_id.to_string(),
            status: p.status,
            message: p.message.to_string(),
            previous: e.previous,
            last_seen: p.last_seen,
            updated_at: p.updated_at,
            expires_at: p.expires_at,
            device_count: p.device_count,
            node_id: p.node_id.to_string(),
            at: e.at,
        }
    }

    fn into_event(self) -> Option<Event> {
        let kind = [EventKind::UserOnline, EventKind::UserOffline, EventKind::PresenceUpdated, EventKind::PresenceExpired]
            .into_iter()
            .find(|k| k.as_str() == self.kind)?;
        let presence = Presence {
            user_id: UserId::parse(&self.user_id, usize::MAX).ok()?,
            status: self.status,
            message: Arc::from(self.message),
            last_seen: self.last_seen,
            updated_at: self.updated_at,
            node_id: Arc::from(self.node_id),
            expires_at: self.expires_at,
            device_count: self.device_count,
        };
        Some(Event { kind, presence, previous: self.previous, at: self.at })
    }
}

fn dir_key(table: DirTable, key: &str) -> String {
    let t = match table {
        DirTable::Contacts => "contacts",
        DirTable::Privacy => "privacy",
        DirTable::Conversations => "conversations",
    };
    format!("{t}.{}", encode_id(key))
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

struct Inner {
    nats: Nats,
    users: jkv::Store,
    dir: jkv::Store,
    node: Arc<str>,
    clock: Arc<dyn Clock>,
    bus: EventBus,
    tick_ms: i64,
    /// Local deadlines of users this node changed: tick → users.
    timers: Mutex<BTreeMap<i64, Vec<UserId>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NatsStore {
    /// Connects, makes sure the buckets and the event stream exist, and starts relaying
    /// other nodes' events to the local bus and running local expiry timers.
    pub async fn open(cfg: &NatsConfig, node: &str, clock: Arc<dyn Clock>, bus: EventBus, tick_ms: i64) -> Result<NatsStore, StoreError> {
        let nats = Nats::connect(cfg, &format!("presenced-{node}")).await.map_err(unavailable)?;
        let js = if cfg.jetstream.domain.is_empty() {
            jetstream::new(nats.client.clone())
        } else {
            jetstream::with_domain(nats.client.clone(), &cfg.jetstream.domain)
        };
        let bucket = |name: String| BucketConfig { name, replicas: cfg.kv.replicas, file_storage: true };
        let users = kv::open_bucket(&js, &bucket(cfg.kv.bucket.clone())).await?;
        let dir = kv::open_bucket(&js, &bucket(format!("{}_directory", cfg.kv.bucket))).await?;
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
        let inner = Arc::new(Inner {
            nats,
            users,
            dir,
            node: Arc::from(node),
            clock,
            bus,
            tick_ms: tick_ms.max(1),
            timers: Mutex::new(BTreeMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let store = NatsStore { inner };
        store.relay_remote_events().await?;
        Ok(store)
    }

    /// Starts the local expiry ticker (call within the runtime).
    pub fn start(&self) {
        let tick = Duration::from_millis(self.inner.tick_ms as u64);
        let h = super::spawn_periodic(Arc::downgrade(&self.inner), tick, |inner: Arc<Inner>| async move {
            let now = inner.clock.now();
            NatsStore { inner }.reap(now).await;
        });
        self.inner.tasks.lock().push(h);
    }

    pub fn nats(&self) -> &Nats {
        &self.inner.nats
    }

    async fn relay_remote_events(&self) -> Result<(), StoreError> {
        let mut sub = self.inner.nats.client.subscribe("presence.*.*").await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(inner) = weak.upgrade() else { return };
                match serde_json::from_slice::<WireEvent>(&msg.payload) {
                    Ok(w) if w.node_id != *inner.node => {
                        if let Some(ev) = w.into_event() {
                            metrics::counter!("nats_events_received_total").increment(1);
                            inner.bus.publish(ev);
                        }
                    }
                    Ok(_) => {} // our own event, already on the local bus
                    Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "ignoring unreadable presence event"),
                }
            }
        });
        self.inner.tasks.lock().push(h);
        Ok(())
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
        let mut result: Option<(R, Change, Millis)> = None;
        let updated = kv::update::<UserState, _>(&inner.users, &key, |old| {
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
        })
        .await?;
        let Some((r, change, now)) = result else { return Ok(None) };
        let Some(state) = updated.after else { return Ok(None) };
        let presence = state.view(id, now);
        if let Some(kind) = change.event {
            let ev = Event { kind, presence: presence.clone(), previous: change.previous, at: now };
            self.publish(&ev).await;
            inner.bus.publish(ev);
        }
        if let Some(deadline) = state.next_deadline() {
            let tick = deadline.div_euclid(inner.tick_ms) + 1;
            inner.timers.lock().entry(tick).or_default().push(id.clone());
        }
        Ok(Some((r, presence)))
    }

    async fn publish(&self, ev: &Event) {
        let Ok(payload) = serde_json::to_vec(&WireEvent::of(ev)) else { return };
        if let Err(e) = self.inner.nats.client.publish(subject(ev.kind, &ev.presence.user_id), payload.into()).await {
            tracing::warn!(error = %e, "could not publish presence event");
        }
    }

    /// Applies expiry to users whose local deadline passed; returns how many were looked at.
    pub async fn reap(&self, now: Millis) -> usize {
        let due: Vec<UserId> = {
            let mut timers = self.inner.timers.lock();
            let later = timers.split_off(&(now.div_euclid(self.inner.tick_ms) + 1));
            std::mem::replace(&mut *timers, later).into_values().flatten().collect()
        };
        let mut seen = std::collections::HashSet::new();
        for id in due.into_iter().filter(|id| seen.insert(id.clone())) {
            let node = self.inner.node.clone();
            if let Err(e) = self.apply(&id, false, |s, now| ((), s.expire(&node, now))).await {
                tracing::warn!(user = %id, error = %e, "expiry failed; will retry");
                self.inner.timers.lock().entry(now.div_euclid(self.inner.tick_ms) + 10).or_default().push(id);
            }
        }
        seen.len()
    }

    async fn read(&self, id: &UserId) -> Result<Option<UserState>, StoreError> {
        match self.inner.users.get(user_key(id)).await.map_err(unavailable)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| unavailable(format!("unreadable record of {id}: {e}"))),
        }
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<Option<Presence>>, StoreError> {
        let states = futures_util::future::join_all(ids.iter().map(|id| self.read(id))).await;
        let now = self.inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        for (id, st) in ids.iter().zip(states) {
            let p = st?.map(|s| s.view(id, now));
            if p.is_some() {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
            }
            out.push(p);
        }
        Ok(out)
    }

    async fn set_status(&self, id: &UserId, req: SetStatus) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        let r = self.apply(id, true, |s, now| ((), s.set_status(req.status, req.message.clone(), req.ttl_ms, &node, now))).await?;
        match r {
            Some((_, p)) => Ok(p),
            // Nothing changed (same status and expiry): answer the current state.
            None => {
                Ok(self.read(id).await?.map(|s| s.view(id, self.inner.clock.now())).unwrap_or_else(|| Presence::unknown(id.clone(), node)))
            }
        }
    }

    async fn clear_status(&self, id: &UserId) -> Result<Presence, StoreError> {
        let node = self.inner.node.clone();
        self.apply(id, true, |s, now| ((), s.clear_status(&node, now))).await?;
        Ok(self.read(id).await?.map(|s| s.view(id, self.inner.clock.now())).unwrap_or_else(|| Presence::unknown(id.clone(), node)))
    }

    async fn register_session(&self, id: &UserId, device: &str, instance: &str, ttl_ms: i64) -> Result<Registered, StoreError> {
        let node = self.inner.node.clone();
        let (device, instance): (Arc<str>, Arc<str>) = (Arc::from(device), Arc::from(instance));
        let r = self.apply(id, true, |s, now| s.register(device.clone(), instance.clone(), ttl_ms, &node, now)).await?;
        r.map(|(reg, _)| reg).ok_or_else(|| unavailable("registration was not written"))
    }

    async fn refresh_session(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        // A CAS write per refresh for now; absorbing heartbeats in node memory comes with leases.
        let r = self
            .apply(id, false, |s, now| (s.refresh(device, now), Change { event: None, previous: Status::Offline, persist: false }))
            .await?;
        Ok(r.and_then(|(t, _)| t))
    }

    async fn unregister_session(&self, id: &UserId, device: &str) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        Ok(self.apply(id, false, |s, now| s.unregister(device, &node, now)).await?.is_some_and(|(removed, _)| removed))
    }

    async fn devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        let now = self.inner.clock.now();
        Ok(self.read(id).await?.map(|s| s.live_sessions(now).cloned().collect()).unwrap_or_default())
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            ..StoreStats::default()
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

    async fn put_directory(&self, table: DirTable, key: &str, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let k = dir_key(table, key);
        match value {
            Some(v) => self.inner.dir.put(k, v.into()).await.map(|_| ()).map_err(unavailable),
            None => self.inner.dir.purge(k).await.map_err(unavailable),
        }
    }

    async fn load_directory(&self) -> Result<Vec<(DirTable, String, Vec<u8>)>, StoreError> {
        let mut keys = self.inner.dir.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(unavailable)?;
            let Some((t, enc)) = k.split_once('.') else { continue };
            let table = match t {
                "contacts" => DirTable::Contacts,
                "privacy" => DirTable::Privacy,
                "conversations" => DirTable::Conversations,
                _ => continue,
            };
            let (Some(id), Some(v)) = (decode_id(enc), self.inner.dir.get(&k).await.map_err(unavailable)?) else { continue };
            out.push((table, id, v.to_vec()));
        }
        Ok(out)
    }

    async fn shutdown(&self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        let _ = self.inner.nats.client.flush().await;
    }
}
