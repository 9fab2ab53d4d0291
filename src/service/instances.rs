//! Gateway instance leases (seed 001's delivery-service instances): one `RefreshInstance`
//! keeps every session a gateway instance registered alive, so liveness costs one call
//! (and, in cluster mode, one store write) per gateway per period instead of one per
//! session.
//!
//! A lease exists from the instance's first refresh. A session registered through a
//! gateway path (gRPC `RegisterSession(s)`, REST `POST /api/v2/sessions`) of an instance
//! that holds a live lease is *bound*: the store keeps it with the TTL [`BOUND_TTL_MS`]
//! (ten years: the mark of a bound session, never reached while the lease is refreshed)
//! and it ends when the lease does, here. A session registered while its instance has no
//! lease keeps its own TTL (seed 001's per-session refresh) until the instance takes
//! one, whatever the order of the calls:
//! - a lease that begins on this node (or that this node first learns of) binds the
//!   live sessions of the instance held here (a scan, once per lease);
//! - a registration that raced with that scan binds itself when it sees the lease;
//! - in cluster mode a lease may begin on another node: this node remembers the
//!   instances it holds unbound sessions of (one entry per instance, not per session)
//!   and reads their shared lease every [`UNBOUND_POLL_MS`] until one appears or those
//!   sessions are gone.
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

use crate::clock::Clock;
use crate::core::{Ending, Millis, Registered, TimerWheel, UserId};
use crate::error::ApiError;
use crate::store::Store;

/// The store deadline of a bound session: far enough never to come due while its lease
/// is refreshed (ten years); the lease ends it.
pub const BOUND_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

/// How long a "this instance has no lease" answer from the store is trusted before a
/// registration asks again (cluster mode; the embedded store answers at once).
const NEGATIVE_TTL_MS: i64 = 1_000;

/// Sessions ended at once when a lease lapses (cluster stores are round trips).
const END_CONCURRENCY: usize = 64;

/// How often a cluster node reads the shared lease of an instance it holds unbound
/// sessions of (a session's own TTL is seconds at least, so one is bound in time).
pub const UNBOUND_POLL_MS: i64 = 1_000;

/// Shared leases read at once by that poll.
const POLL_CONCURRENCY: usize = 32;

#[derive(Debug)]
struct InstanceLease {
    /// The instance id, shared by every session bound to the lease.
    id: Arc<str>,
    expires_at: Millis,
    /// Sessions bound to the lease on this node since it began here (registered while it
    /// was live, or live here when it began).
    registered: u64,
    /// Which lease of the instance this is (a lease that ends and begins again is another).
    generation: u64,
}

#[derive(Debug)]
struct Leases {
    live: HashMap<Arc<str>, InstanceLease>,
    /// Instances the store said had no lease, and when it said so.
    unknown: HashMap<Arc<str>, Millis>,
    wheel: TimerWheel<Arc<str>>,
    /// Cluster mode: instances with unbound sessions held here, and the latest deadline
    /// seen among them (after it, a scan tells whether any are left).
    unbound: HashMap<Arc<str>, Millis>,
    next_poll: Millis,
    generations: u64,
}

/// A lease as the caller sees it after a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub expires_at: Millis,
    /// Sessions bound to the lease through the answering node since the lease began there
    /// (`0` on a lone node: it holds none of the instance's sessions, e.g. it restarted).
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
    /// The store shares leases with other nodes (cluster mode).
    shared: bool,
}

impl Instances {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, tick_ms: i64) -> Instances {
        let leases = Leases {
            live: HashMap::new(),
            unknown: HashMap::new(),
            wheel: TimerWheel::new(tick_ms.max(1)),
            unbound: HashMap::new(),
            next_poll: 0,
            generations: 0,
        };
        let shared = store.shares_instance_leases();
        Instances { store, clock, leases: Mutex::new(leases), reaper: Mutex::new(None), tick_ms: tick_ms.max(1), shared }
    }

    /// Starts the task that ends lapsed leases and (cluster mode) looks for leases
    /// begun on other nodes (every tick).
    pub fn start(self: &Arc<Self>) {
        let tick = Duration::from_millis(self.tick_ms as u64);
        let h = crate::clock::spawn_periodic(Arc::downgrade(self), tick, |me: Arc<Instances>| async move {
            let now = me.clock.now();
            me.lapse(now).await;
            me.poll_unbound(now).await;
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
        if let Some(generation) = self.take(instance, expires_at) {
            self.bind_held(instance, generation).await;
        }
        let l = self.leases.lock();
        let lease = l.live.get(instance);
        Ok(LeaseInfo { expires_at: lease.map_or(expires_at, |x| x.expires_at), registered: lease.map_or(0, |x| x.registered) })
    }

    /// Records the lease of `instance` here until (at least) `expires_at`. `Some(its
    /// generation)` when it begins here, or takes over from a local deadline that had
    /// passed (sessions registered meanwhile were not bound): the caller then binds the
    /// instance's sessions held here.
    fn take(&self, instance: &str, expires_at: Millis) -> Option<u64> {
        let now = self.clock.now();
        let mut l = self.leases.lock();
        l.unknown.remove(instance);
        l.unbound.remove(instance);
        l.generations += 1;
        let generation = l.generations;
        let mut began = !l.live.contains_key(instance);
        let lease = l.live.entry(Arc::from(instance)).or_insert_with_key(|k| InstanceLease {
            id: k.clone(),
            expires_at,
            registered: 0,
            generation,
        });
        began |= lease.expires_at <= now;
        lease.expires_at = lease.expires_at.max(expires_at);
        let (key, generation) = (lease.id.clone(), lease.generation);
        l.wheel.insert(expires_at, key);
        self.gauges(&l);
        began.then_some(generation)
    }

    /// Binds to `instance`'s lease (generation `generation`, just begun here) every live
    /// session of it this node holds that registered without one. A scan, once per lease.
    /// If the lease ended meanwhile (its own scan may have missed some of these), those
    /// get their own TTL back: a bound session with no lease would never end.
    async fn bind_held(&self, instance: &str, generation: u64) {
        let held = match self.store.sessions_of_instance(instance).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(instance, error = %e, "cannot list the sessions of an instance to bind them to its lease");
                return;
            }
        };
        let now = self.clock.now();
        let mut bound = Vec::new();
        for (user, s) in held.into_iter().filter(|(_, s)| s.ttl_ms != BOUND_TTL_MS && !s.lingering && s.expires_at > now) {
            match self.store.rebind_session(&user, &s.device_id, s.sid, BOUND_TTL_MS).await {
                Ok(true) => bound.push((user, s)),
                Ok(false) => {}
                Err(e) => tracing::warn!(instance, user = %user, error = %e, "cannot bind a session to its instance's lease"),
            }
        }
        if bound.is_empty() {
            return;
        }
        let still = {
            let mut l = self.leases.lock();
            match l.live.get_mut(instance).filter(|lease| lease.generation == generation) {
                Some(lease) => {
                    lease.registered += bound.len() as u64;
                    true
                }
                None => false,
            }
        };
        if !still {
            for (user, s) in &bound {
                let _ = self.store.rebind_session(user, &s.device_id, s.sid, s.ttl_ms).await;
            }
            return;
        }
        metrics::counter!("presence_instance_sessions_bound_late_total").increment(bound.len() as u64);
        tracing::debug!(instance, bound = bound.len(), "sessions registered before their instance's lease are bound to it");
    }

    /// A session just registered without a lease: if the lease began meanwhile, binds it
    /// (the lease's scan may have run before it was written) and answers the lease's
    /// deadline; else remembers its instance (cluster mode: a lease may begin elsewhere).
    pub async fn bind_late(
        &self,
        user: &UserId,
        device: &str,
        reg: &Registered,
        instance: &Arc<str>,
        ttl_ms: i64,
    ) -> Result<Option<Millis>, ApiError> {
        let now = self.clock.now();
        if self.deadline(instance).is_some_and(|t| t > now) {
            if !self.store.rebind_session(user, device, reg.sid, BOUND_TTL_MS).await? {
                return Ok(None);
            }
            if self.bind(instance) {
                metrics::counter!("presence_instance_sessions_bound_late_total").increment(1);
                return Ok(self.deadline(instance));
            }
            // The lease ended meanwhile (its scan may have missed this one): its own TTL again.
            self.store.rebind_session(user, device, reg.sid, ttl_ms).await?;
            return Ok(None);
        }
        let expires_at = reg.expires_at;
        if self.shared {
            let mut l = self.leases.lock();
            let until = l.unbound.entry(instance.clone()).or_insert(expires_at);
            *until = (*until).max(expires_at);
        }
        Ok(None)
    }

    /// Cluster mode: reads the shared lease of each instance this node holds unbound
    /// sessions of (every [`UNBOUND_POLL_MS`]); a live one binds them. An instance whose
    /// unbound sessions are all gone is forgotten.
    pub async fn poll_unbound(&self, now: Millis) {
        if !self.shared {
            return;
        }
        let watch: Vec<(Arc<str>, Millis)> = {
            let mut l = self.leases.lock();
            if now < l.next_poll || l.unbound.is_empty() {
                return;
            }
            l.next_poll = now + UNBOUND_POLL_MS;
            // An instance whose lease here has passed its deadline stays watched: the
            // lease may go on elsewhere, and sessions registered meanwhile are unbound.
            let Leases { unbound, live, .. } = &mut *l;
            unbound.retain(|k, _| live.get(k).is_none_or(|lease| lease.expires_at <= now));
            unbound.iter().map(|(k, t)| (k.clone(), *t)).collect()
        };
        stream::iter(watch)
            .for_each_concurrent(POLL_CONCURRENCY, |(instance, until)| async move {
                if until <= now && !self.still_unbound(&instance, now).await {
                    return;
                }
                match self.store.instance_lease(&instance).await {
                    Ok(Some(t)) if t > now => {
                        if let Some(generation) = self.take(&instance, t) {
                            self.bind_held(&instance, generation).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(instance = %instance, error = %e, "cannot read a shared instance lease; asking again"),
                }
            })
            .await;
    }

    /// Whether this node still holds live unbound sessions of `instance` (their latest
    /// deadline is noted for the next look); forgets the instance if not.
    async fn still_unbound(&self, instance: &Arc<str>, now: Millis) -> bool {
        let Ok(held) = self.store.sessions_of_instance(instance).await else { return true };
        let latest =
            held.iter().filter(|(_, s)| s.ttl_ms != BOUND_TTL_MS && !s.lingering && s.expires_at > now).map(|(_, s)| s.expires_at).max();
        let mut l = self.leases.lock();
        match latest {
            Some(t) => {
                l.unbound.insert(instance.clone(), t);
                true
            }
            None => {
                l.unbound.remove(instance);
                false
            }
        }
    }

    /// The live lease of `instance`: known here, or shared by another node (then
    /// adopted here). `None` when it has none.
    pub async fn lease_of(&self, instance: &str) -> Result<Option<LiveLease>, ApiError> {
        let now = self.clock.now();
        {
            let l = self.leases.lock();
            // Live here: bind to it. Past its deadline here: ask the store (it may go on
            // through another node; the reaper has not looked yet).
            if let Some(lease) = l.live.get(instance).filter(|lease| lease.expires_at > now) {
                return Ok(Some(LiveLease { instance: lease.id.clone(), expires_at: lease.expires_at }));
            }
            if l.unknown.get(instance).is_some_and(|at| now - at < NEGATIVE_TTL_MS) {
                return Ok(None);
            }
        }
        let shared = self.store.instance_lease(instance).await?;
        match shared.filter(|t| *t > now) {
            Some(t) => {
                // Begun on another node: sessions registered here before it are bound now.
                if let Some(generation) = self.take(instance, t) {
                    self.bind_held(instance, generation).await;
                }
                let l = self.leases.lock();
                Ok(l.live.get(instance).map(|lease| LiveLease { instance: lease.id.clone(), expires_at: lease.expires_at }))
            }
            None => {
                let mut l = self.leases.lock();
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
            // `Some(to_bind)`: the lease goes on (adopted from the store); `None`: it lapsed.
            let adopted: Option<Option<u64>> = {
                let mut l = self.leases.lock();
                let Some(lease) = l.live.get_mut(&instance) else { continue };
                if let Some(t) = shared.filter(|t| *t > now) {
                    lease.expires_at = lease.expires_at.max(t);
                    let (t, generation) = (lease.expires_at, lease.generation);
                    l.wheel.insert(t, instance.clone());
                    // Sessions registered here after the local deadline passed are unbound.
                    Some(l.unbound.remove(&instance).map(|_| generation))
                } else {
                    if lease.expires_at > now {
                        continue; // refreshed here while we asked
                    }
                    l.live.remove(&instance);
                    self.gauges(&l);
                    None
                }
            };
            if let Some(to_bind) = adopted {
                if let Some(generation) = to_bind {
                    self.bind_held(&instance, generation).await;
                }
                continue;
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
        let mut victims: Vec<(UserId, crate::core::DeviceId, u64)> = match self.store.sessions_of_instance(instance).await {
            Ok(v) => v.into_iter().filter(|(_, s)| s.ttl_ms == BOUND_TTL_MS).map(|(u, s)| (u, s.device_id, s.sid)).collect(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EventBus;
    use crate::clock::ManualClock;
    use crate::core::UserId;
    use crate::service::sessions::{GatewaySession, Sessions};
    use crate::store::memory::{MemoryConfig, MemoryStore};

    fn node() -> (Arc<ManualClock>, Arc<dyn Store>, Sessions) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store: Arc<dyn Store> = Arc::new(MemoryStore::open(MemoryConfig::new("n1"), clock.clone(), EventBus::new(64)).unwrap());
        let instances = Arc::new(Instances::new(store.clone(), clock.clone(), 100));
        (clock.clone(), store.clone(), Sessions::new(store, instances, 10, 60_000, 0, 0))
    }

    fn phone(user: &str) -> GatewaySession {
        GatewaySession { user: UserId::parse(user, 64).unwrap(), device: Arc::from("phone"), platform: None, active: None }
    }

    /// A registration after the lease's deadline here, before the reaper ran: unbound
    /// (no lease is live); a refresh then continues the lease and binds it too.
    #[tokio::test]
    async fn a_refresh_after_the_deadline_binds_what_registered_in_between() {
        let (clock, store, sessions) = node();
        sessions.refresh_instance("gw", Some(1_000)).await.unwrap();
        sessions.open_gateway(&phone("before"), "gw", Some(4_000)).await.unwrap();
        clock.advance(1_500);
        let reg = sessions.open_gateway(&phone("between"), "gw", Some(4_000)).await.unwrap();
        assert_eq!(reg.expires_at, clock.now() + 4_000, "no live lease: its own TTL");
        let lease = sessions.refresh_instance("gw", Some(1_000)).await.unwrap();
        for user in ["before", "between"] {
            let d = store.devices(&UserId::parse(user, 64).unwrap()).await.unwrap();
            assert_eq!(d[0].ttl_ms, BOUND_TTL_MS, "{user} is bound to the lease");
        }
        assert_eq!(lease.registered, 2);
    }

    /// Bound sessions whose lease ended while they were being bound get their own TTL
    /// back (a bound session with no lease would never end).
    #[tokio::test]
    async fn a_binding_that_outlived_its_lease_is_undone() {
        let (_clock, store, sessions) = node();
        let reg = sessions.open_gateway(&phone("u"), "gw", Some(4_000)).await.unwrap();
        let generation = sessions.instances.take("gw", sessions.instances.now() + 1_000).expect("begins");
        // The lease ends (a gateway's UnregisterInstance) before the binding is checked.
        sessions.instances.end("gw", Ending::Now).await.unwrap();
        // The session was not bound yet, so it survived the end; now bind with the old generation.
        let u = UserId::parse("u", 64).unwrap();
        assert_eq!(store.devices(&u).await.unwrap()[0].sid, reg.sid);
        sessions.instances.bind_held("gw", generation).await;
        assert_eq!(store.devices(&u).await.unwrap()[0].ttl_ms, 4_000, "its own TTL again");
    }
}
