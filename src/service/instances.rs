//! Gateway instance leases (seed 001's delivery-service instances): one `RefreshInstance`
//! keeps every session a gateway instance registered alive, so liveness costs one call
//! (and, in cluster mode, one store write) per gateway per period instead of one per
//! session.
//!
//! A lease exists from the instance's first refresh. A session registered through a
//! gateway path (gRPC `RegisterSession(s)`, REST `POST /api/v2/sessions`) while its
//! instance holds a live lease is *bound*: the store keeps it with the TTL
//! [`BOUND_TTL_MS`] (ten years: the mark of a bound session, never reached while the
//! lease is refreshed) and it ends when the lease does, here. A session registered while
//! its instance has no lease keeps its own TTL (seed 001's per-session refresh).
//!
//! When a lease passes its deadline this node first asks the store whether another node
//! shared a later one (a gateway may refresh through any node); if not, every bound
//! session of the instance held here ends, one `unregister` (tagged with the
//! registration's `sid`) each, so each user whose last device it was gets exactly one
//! offline event. Sessions are ended by the node that registered them; if that node dies,
//! its own node lease ends them (cluster mode).
//!
//! Bookkeeping here is per instance only (its deadline, a count, a timer): nothing per
//! session. The store already records each session's instance and TTL, so when a lease
//! ends the store is asked for the bound sessions of that instance it holds
//! ([`crate::store::PresenceStore::sessions_of_instance`], a scan: leases end rarely).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use parking_lot::Mutex;
use tokio::task::JoinHandle;

use crate::core::{Ending, Millis, TimerWheel, UserId};
use crate::error::ApiError;
use crate::store::{Clock, Store};

/// The store deadline of a bound session: far enough never to come due while its lease
/// is refreshed (ten years); the lease ends it.
pub const BOUND_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

/// How long a "this instance has no lease" answer from the store is trusted before a
/// registration asks again (cluster mode; the embedded store answers at once).
const NEGATIVE_TTL_MS: i64 = 1_000;

/// Sessions ended at once when a lease lapses (cluster stores are round trips).
const END_CONCURRENCY: usize = 64;

#[derive(Debug)]
struct Lease {
    /// The instance id, shared by every session bound to the lease.
    id: Arc<str>,
    expires_at: Millis,
    /// Bound registrations made through this node since the lease began here.
    registered: u64,
}

#[derive(Debug)]
struct Leases {
    live: HashMap<Arc<str>, Lease>,
    /// Instances the store said had no lease, and when it said so.
    unknown: HashMap<Arc<str>, Millis>,
    wheel: TimerWheel<Arc<str>>,
}

/// A lease as the caller sees it after a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub expires_at: Millis,
    /// Bound registrations made through the answering node since the lease began there
    /// (`0`: that node holds none of the instance's sessions, e.g. it restarted).
    pub registered: u64,
}

/// A live lease, as a registration binds to it.
#[derive(Debug, Clone)]
pub struct LiveLease {
    /// The instance id (shared by the sessions bound to it).
    pub instance: Arc<str>,
    pub expires_at: Millis,
}

pub struct Instances {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    leases: Mutex<Leases>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    tick_ms: i64,
}

impl Instances {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, tick_ms: i64) -> Instances {
        Instances {
            store,
            clock,
            leases: Mutex::new(Leases { live: HashMap::new(), unknown: HashMap::new(), wheel: TimerWheel::new(tick_ms.max(1)) }),
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

    /// Creates or extends the lease of `instance` until `now + ttl_ms`, shared with the
    /// other nodes first (a refresh the store refused changed nothing).
    pub async fn refresh(&self, instance: &str, ttl_ms: i64) -> Result<LeaseInfo, ApiError> {
        let expires_at = self.clock.now().saturating_add(ttl_ms);
        self.store.put_instance_lease(instance, Some(expires_at)).await?;
        let mut l = self.leases.lock();
        l.unknown.remove(instance);
        let lease = Self::entry(&mut l, instance, expires_at);
        let info = LeaseInfo { expires_at: lease.expires_at, registered: lease.registered };
        let key = lease.id.clone();
        l.wheel.insert(expires_at, key);
        self.gauges(&l);
        Ok(info)
    }

    /// The lease of `instance`, created (or moved later) to `expires_at`.
    fn entry<'a>(l: &'a mut Leases, instance: &str, expires_at: Millis) -> &'a mut Lease {
        let lease = l.live.entry(Arc::from(instance)).or_insert_with_key(|k| Lease { id: k.clone(), expires_at, registered: 0 });
        lease.expires_at = lease.expires_at.max(expires_at);
        lease
    }

    /// The live lease of `instance`: known here, or shared by another node (then
    /// adopted here). `None` when it has none.
    pub async fn lease_of(&self, instance: &str) -> Result<Option<LiveLease>, ApiError> {
        let now = self.clock.now();
        {
            let l = self.leases.lock();
            if let Some(lease) = l.live.get(instance) {
                return Ok((lease.expires_at > now).then(|| LiveLease { instance: lease.id.clone(), expires_at: lease.expires_at }));
            }
            if l.unknown.get(instance).is_some_and(|at| now - at < NEGATIVE_TTL_MS) {
                return Ok(None);
            }
        }
        let shared = self.store.instance_lease(instance).await?;
        let mut l = self.leases.lock();
        match shared.filter(|t| *t > now) {
            Some(t) => {
                l.unknown.remove(instance);
                let lease = Self::entry(&mut l, instance, t);
                let live = LiveLease { instance: lease.id.clone(), expires_at: lease.expires_at };
                l.wheel.insert(live.expires_at, live.instance.clone());
                self.gauges(&l);
                Ok(Some(live))
            }
            None => {
                if l.unknown.len() > 100_000 {
                    l.unknown.retain(|_, at| now - *at < NEGATIVE_TTL_MS);
                }
                l.unknown.insert(Arc::from(instance), now);
                Ok(None)
            }
        }
    }

    /// Counts a registration just bound to `instance`'s lease. `false` when the lease
    /// ended in the meantime (the caller ends the session it just registered): a lease
    /// ends under the same lock before its sessions are looked up, so every session
    /// bound before that is found, and none after.
    pub fn bind(&self, instance: &str) -> bool {
        let mut l = self.leases.lock();
        let Some(lease) = l.live.get_mut(instance) else { return false };
        lease.registered += 1;
        true
    }

    /// The deadline of `instance`'s lease, if it has one here.
    pub fn deadline(&self, instance: &str) -> Option<Millis> {
        self.leases.lock().live.get(instance).map(|l| l.expires_at)
    }

    /// Ends the lease of `instance` now (a gateway shutting down cleanly): its bound
    /// sessions held here end as `ending` says (held for the offline grace: the
    /// gateway's clients reconnect through another instance, which registers them again
    /// and continues them), and the shared lease is removed. Returns how many ended.
    pub async fn end(&self, instance: &str, ending: Ending) -> Result<u64, ApiError> {
        self.store.put_instance_lease(instance, None).await?;
        let existed = {
            let mut l = self.leases.lock();
            let existed = l.live.remove(instance).is_some();
            self.gauges(&l);
            existed
        };
        if !existed {
            return Ok(0);
        }
        Ok(self.end_sessions(instance, ending).await)
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
                l.live.remove(&instance);
                self.gauges(&l);
            }
            metrics::counter!("presence_instance_leases_lapsed_total").increment(1);
            tracing::info!(instance = %instance, "gateway instance lease lapsed; ending its sessions");
            // The gateway is gone (its lease went unrefreshed for its TTL): its clients
            // had that long to reconnect through another instance.
            ended += self.end_sessions(&instance, Ending::Now).await as usize;
        }
        ended
    }

    /// Ends the bound sessions of `instance` held here (its lease is already gone).
    async fn end_sessions(&self, instance: &str, ending: Ending) -> u64 {
        let mut victims = match self.store.sessions_of_instance(instance, BOUND_TTL_MS).await {
            Ok(v) => v,
            Err(e) => {
                // Their owner's node lease still ends them if this node dies; otherwise
                // they stay until a retry (UnregisterInstance) finds them.
                tracing::error!(instance, error = %e, "cannot list the sessions of an ended instance lease");
                return 0;
            }
        };
        // One user's devices one after the other (the last one makes it offline).
        victims.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut by_user: Vec<(UserId, Vec<(crate::core::DeviceId, u64)>)> = Vec::new();
        for (user, device, sid) in victims {
            match by_user.last_mut() {
                Some((u, list)) if *u == user => list.push((device, sid)),
                _ => by_user.push((user, vec![(device, sid)])),
            }
        }
        let store = &self.store;
        let ended: u64 = stream::iter(by_user)
            .map(|(user, devices)| async move {
                let mut n = 0u64;
                for (device, sid) in devices {
                    match store.end_session(&user, &device, Some(sid), ending).await {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(user = %user, device = %device, error = %e, "could not end a session of an ended instance lease")
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

    fn gauges(&self, l: &Leases) {
        metrics::gauge!("presence_instance_leases").set(l.live.len() as f64);
    }
}
