//! Gateway instance leases (seed 001's delivery-service instances): one `RefreshInstance`
//! keeps every session a gateway instance registered alive, so liveness costs one call
//! (and, in cluster mode, one store write) per gateway per period instead of one per
//! session.
//!
//! A lease exists from the instance's first refresh. A session registered through a
//! gateway path (gRPC `RegisterSession(s)`, REST `POST /api/v2/sessions`) while its
//! instance holds a live lease is *bound*: the store keeps it with a far deadline
//! ([`BOUND_TTL_MS`]) and it ends when the lease does, here. A session registered while
//! its instance has no lease keeps its own TTL (seed 001's per-session refresh).
//!
//! When a lease passes its deadline this node first asks the store whether another node
//! shared a later one (a gateway may refresh through any node); if not, every bound
//! session of the instance held here ends, one `unregister` (tagged with the
//! registration's `sid`) each, so each user whose last device it was gets exactly one
//! offline event. Sessions are ended by the node that registered them; if that node dies,
//! its own node lease ends them (cluster mode).
//!
//! Bookkeeping is in memory: the bound sessions by user (sharded), and per instance its
//! deadline, a count, and a timer. A bound session replaced or removed by another path
//! leaves a stale entry whose `sid` no longer matches: harmless when the lease ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::core::{DeviceId, Millis, TimerWheel, UserId};
use crate::error::ApiError;
use crate::shards::Sharded;
use crate::store::{Clock, Store};

/// The store deadline of a bound session: far enough never to come due while its lease
/// is refreshed (ten years); the lease ends it.
pub const BOUND_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

/// How long a "this instance has no lease" answer from the store is trusted before a
/// registration asks again (cluster mode; the embedded store answers at once).
const NEGATIVE_TTL_MS: i64 = 1_000;

/// Sessions ended at once when a lease lapses (cluster stores are round trips).
const END_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
struct Bound {
    device: DeviceId,
    instance: Arc<str>,
    sid: u64,
}

#[derive(Debug)]
struct Lease {
    expires_at: Millis,
    /// Bound sessions registered here (stale entries included until the lease ends).
    sessions: u64,
}

#[derive(Debug)]
struct Leases {
    live: HashMap<Arc<str>, Lease>,
    /// Instances the store said had no lease, and when it said so.
    unknown: HashMap<Arc<str>, Millis>,
    wheel: TimerWheel<Arc<str>>,
    /// Sum of the live leases' `sessions`.
    bound: u64,
}

/// A lease as the caller sees it after a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub expires_at: Millis,
    /// Sessions this node holds bound to the lease.
    pub sessions: u64,
}

pub struct Instances {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    bound: Sharded<HashMap<UserId, Vec<Bound>>>,
    leases: Mutex<Leases>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    tick_ms: i64,
}

impl Instances {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, tick_ms: i64) -> Instances {
        Instances {
            store,
            clock,
            bound: Sharded::new(64),
            leases: Mutex::new(Leases { live: HashMap::new(), unknown: HashMap::new(), wheel: TimerWheel::new(tick_ms.max(1)), bound: 0 }),
            reaper: Mutex::new(None),
            tick_ms: tick_ms.max(1),
        }
    }

    /// Starts the task that ends lapsed leases (every tick).
    pub fn start(self: &Arc<Self>) {
        let tick = Duration::from_millis(self.tick_ms as u64);
        let h = crate::store::spawn_periodic(Arc::downgrade(self), tick, |me: Arc<Instances>| async move {
            let now = me.clock.now();
            me.lapse(now).await;
        });
        *self.reaper.lock() = Some(h);
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    pub fn stop(&self) {
        if let Some(h) = self.reaper.lock().take() {
            h.abort();
        }
    }

    /// Creates or extends the lease of `instance` until `now + ttl_ms`, shared with the
    /// other nodes first (a refresh the store refused changed nothing).
    pub async fn refresh(&self, instance: &str, ttl_ms: i64) -> Result<LeaseInfo, ApiError> {
        let expires_at = self.clock.now().saturating_add(ttl_ms);
        self.store.put_instance_lease(instance, Some(expires_at)).await?;
        let mut l = self.leases.lock();
        let key: Arc<str> = Arc::from(instance);
        l.unknown.remove(instance);
        let lease = l.live.entry(key.clone()).or_insert(Lease { expires_at, sessions: 0 });
        lease.expires_at = lease.expires_at.max(expires_at);
        let info = LeaseInfo { expires_at: lease.expires_at, sessions: lease.sessions };
        l.wheel.insert(expires_at, key);
        self.gauges(&l);
        Ok(info)
    }

    /// The live lease deadline of `instance`: known here, or shared by another node (then
    /// adopted here). `None` when it has none.
    pub async fn lease_of(&self, instance: &str) -> Result<Option<Millis>, ApiError> {
        let now = self.clock.now();
        {
            let l = self.leases.lock();
            if let Some(lease) = l.live.get(instance) {
                return Ok((lease.expires_at > now).then_some(lease.expires_at));
            }
            if l.unknown.get(instance).is_some_and(|at| now - at < NEGATIVE_TTL_MS) {
                return Ok(None);
            }
        }
        let shared = self.store.instance_lease(instance).await?;
        let mut l = self.leases.lock();
        let key: Arc<str> = Arc::from(instance);
        match shared.filter(|t| *t > now) {
            Some(t) => {
                l.unknown.remove(instance);
                let lease = l.live.entry(key.clone()).or_insert(Lease { expires_at: t, sessions: 0 });
                lease.expires_at = lease.expires_at.max(t);
                let t = lease.expires_at;
                l.wheel.insert(t, key);
                self.gauges(&l);
                Ok(Some(t))
            }
            None => {
                if l.unknown.len() > 100_000 {
                    l.unknown.retain(|_, at| now - *at < NEGATIVE_TTL_MS);
                }
                l.unknown.insert(key, now);
                Ok(None)
            }
        }
    }

    /// Records a session registered as bound to `instance`'s lease. `false` when the
    /// lease ended in the meantime (the caller ends the session it just registered).
    pub fn bind(&self, user: &UserId, device: &DeviceId, instance: &str, sid: u64) -> bool {
        let mut l = self.leases.lock();
        let Some(instance) = l.live.get_key_value(instance).map(|(k, _)| k.clone()) else { return false };
        if let Some(lease) = l.live.get_mut(&instance) {
            lease.sessions += 1;
        }
        l.bound += 1;
        // Under the leases lock, so a lapse (which removes the lease under it first) sees
        // every binding made before it.
        let mut shard = self.bound.of(user).lock();
        let list = shard.entry(user.clone()).or_default();
        list.retain(|b| b.device != *device);
        list.push(Bound { device: device.clone(), instance, sid });
        drop(shard);
        self.gauges(&l);
        true
    }

    /// Forgets the binding of `user`'s `device` (its session ended or was replaced).
    pub fn unbind(&self, user: &UserId, device: &str) {
        let removed = {
            let mut shard = self.bound.of(user).lock();
            let Some(list) = shard.get_mut(user) else { return };
            let Some(i) = list.iter().position(|b| &*b.device == device) else { return };
            let b = list.swap_remove(i);
            if list.is_empty() {
                shard.remove(user);
            }
            b
        };
        let mut l = self.leases.lock();
        if let Some(lease) = l.live.get_mut(&removed.instance) {
            lease.sessions = lease.sessions.saturating_sub(1);
            l.bound = l.bound.saturating_sub(1);
        }
        self.gauges(&l);
    }

    /// The lease deadline of a bound session (the registration tagged `sid`, when
    /// given); `None` when it is not bound.
    pub fn bound_deadline(&self, user: &UserId, device: &str, sid: Option<u64>) -> Option<Millis> {
        let instance = {
            let shard = self.bound.of(user).lock();
            shard.get(user)?.iter().find(|b| &*b.device == device && sid.is_none_or(|s| s == b.sid))?.instance.clone()
        };
        self.leases.lock().live.get(&instance).map(|l| l.expires_at)
    }

    /// Ends the lease of `instance` now (a gateway shutting down cleanly): its bound
    /// sessions held here end, and the shared lease is removed. Returns how many ended.
    pub async fn end(&self, instance: &str) -> Result<u64, ApiError> {
        self.store.put_instance_lease(instance, None).await?;
        let existed = {
            let mut l = self.leases.lock();
            let existed = Self::remove_lease(&mut l, instance);
            self.gauges(&l);
            existed
        };
        if !existed {
            return Ok(0);
        }
        Ok(self.end_sessions(instance).await)
    }

    /// Ends every lease whose deadline passed at `now` (unless another node shared a
    /// later one). The reaper calls this every tick; tests may call it directly.
    pub async fn lapse(&self, now: Millis) -> usize {
        let due: Vec<Arc<str>> = {
            let mut l = self.leases.lock();
            let mut due: Vec<Arc<str>> = Vec::new();
            for (_, key) in l.wheel.take_due(now) {
                if l.live.get(&key).is_some_and(|lease| lease.expires_at <= now) && !due.contains(&key) {
                    due.push(key);
                }
            }
            due
        };
        let mut ended = 0;
        for instance in due {
            // Refreshed through another node? Then adopt its deadline.
            let shared = match self.store.instance_lease(&instance).await {
                Ok(t) => t,
                Err(e) => {
                    // Cannot tell: keep the sessions (their owner's node lease still
                    // guards them in cluster mode) and ask again next tick.
                    tracing::warn!(instance = %instance, error = %e, "cannot read a shared instance lease; lapse deferred");
                    self.leases.lock().wheel.insert(now + self.tick_ms, instance);
                    continue;
                }
            };
            {
                let mut l = self.leases.lock();
                let Some(lease) = l.live.get_mut(&instance) else { continue };
                if let Some(t) = shared.filter(|t| *t > now) {
                    lease.expires_at = lease.expires_at.max(t);
                    let t = lease.expires_at;
                    l.wheel.insert(t, instance);
                    continue;
                }
                if lease.expires_at > now {
                    continue; // refreshed here while we asked
                }
                Self::remove_lease(&mut l, &instance);
                self.gauges(&l);
            }
            metrics::counter!("presence_instance_leases_lapsed_total").increment(1);
            tracing::info!(instance = %instance, "gateway instance lease lapsed; ending its sessions");
            ended += self.end_sessions(&instance).await as usize;
        }
        ended
    }

    /// Ends the bound sessions of `instance` held here (its lease is already gone).
    async fn end_sessions(&self, instance: &str) -> u64 {
        let mut victims: Vec<(UserId, Vec<Bound>)> = Vec::new();
        for shard in self.bound.iter() {
            let mut shard = shard.lock();
            shard.retain(|user, list| {
                let (mine, rest): (Vec<Bound>, Vec<Bound>) = list.drain(..).partition(|b| &*b.instance == instance);
                *list = rest;
                if !mine.is_empty() {
                    victims.push((user.clone(), mine));
                }
                !list.is_empty()
            });
        }
        let store = &self.store;
        let ended: u64 = stream::iter(victims)
            .map(|(user, devices)| async move {
                let mut n = 0u64;
                // One user's devices one after the other: the last one makes it offline.
                for b in devices {
                    match store.unregister_session(&user, &b.device, Some(b.sid)).await {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(user = %user, device = %b.device, error = %e, "could not end a session of a lapsed instance")
                        }
                    }
                }
                n
            })
            .buffer_unordered(END_CONCURRENCY)
            .fold(0u64, |acc, n| async move { acc + n })
            .await;
        metrics::counter!("presence_instance_sessions_ended_total").increment(ended);
        ended
    }

    fn remove_lease(l: &mut Leases, instance: &str) -> bool {
        match l.live.remove(instance) {
            Some(lease) => {
                l.bound = l.bound.saturating_sub(lease.sessions);
                true
            }
            None => false,
        }
    }

    fn gauges(&self, l: &Leases) {
        metrics::gauge!("presence_instance_leases").set(l.live.len() as f64);
        metrics::gauge!("presence_instance_bound_sessions").set(l.bound as f64);
    }
}
