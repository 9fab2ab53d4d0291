//! The node's read cache (seed 003 §6) and the circuit breaker in front of the store (§12.2).
//!
//! The cache holds users' stored states with their store revision: W-TinyLFU admission
//! and eviction (moka), bounded by cost (`cache.max_cost`, approximate bytes), entries
//! living at most `CACHE_TTL`. Where the backend streams record writes (NATS KV), they
//! keep it current (a newer revision replaces an older one, never the reverse) and reads
//! are served from it; this node's own writes go in as they are made, and an event
//! received from another node drops the user's entry so the next read fetches it.
//! Elsewhere (Redis) reads go to the store and the cache is only degraded mode's copy.
//!
//! The breaker counts consecutive store failures; at `threshold` it opens: calls fail at
//! once instead of waiting for timeouts, for a back-off that doubles (up to a cap) each
//! time a probe fails. While it is open the node is *degraded*: reads come from the cache
//! (marked stale), writes of statuses are refused with 503, and the sessions of local
//! connections are kept in memory and written back when the center is reachable again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use parking_lot::Mutex;

use crate::core::{UserId, UserState};

/// Upper bound on how long an entry is trusted without a watcher update.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

/// A user's stored state (`None`: no record) at a store revision (`0`: written locally while
/// degraded, not yet in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub state: Option<UserState>,
    pub revision: u64,
}

/// Cache counters for `/health/cache` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub keys: u64,
    pub cost: u64,
    pub evictions: u64,
}

fn cost(id: &UserId, c: &Cached) -> u32 {
    let state = c.state.as_ref().map_or(0, |s| {
        let msg = s.explicit.as_ref().map_or(0, |e| e.message.len());
        96 + msg + s.sessions.iter().map(|x| 128 + x.device_id.len() + x.instance_id.len() + x.node_id.len()).sum::<usize>()
    });
    u32::try_from(64 + id.as_str().len() + state).unwrap_or(u32::MAX)
}

/// A read from the store in flight ([`PresenceCache::reading`]).
pub struct Reading<'a> {
    cache: &'a PresenceCache,
    id: UserId,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut r = self.cache.reading.lock();
        if let Some(n) = r.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.id);
            }
        }
    }
}

pub struct PresenceCache {
    cache: moka::sync::Cache<UserId, Arc<Cached>>,
    /// Users whose record a read is fetching now (with how many reads): the store's
    /// stream of writes refreshes those as well as the cached ones.
    reading: Mutex<HashMap<UserId, u32>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

impl PresenceCache {
    pub fn new(max_cost: u64, ttl: Duration) -> PresenceCache {
        let evictions = Arc::new(AtomicU64::new(0));
        let ev = evictions.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_cost.max(1))
            .weigher(|k: &UserId, v: &Arc<Cached>| cost(k, v))
            .time_to_live(ttl)
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    ev.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("cache_evictions_total").increment(1);
                }
            })
            .build();
        PresenceCache { cache, reading: Default::default(), hits: AtomicU64::new(0), misses: AtomicU64::new(0), evictions }
    }

    pub fn get(&self, id: &UserId) -> Option<Arc<Cached>> {
        let r = self.cache.get(id);
        if r.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("cache_hits_total").increment(1);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("cache_misses_total").increment(1);
        }
        r
    }

    /// Offers a state read from (or written to) the store: kept unless the cache already has
    /// a newer revision.
    pub fn offer(&self, id: &UserId, c: Cached) {
        self.cache.entry(id.clone()).and_compute_with(|old| match old {
            Some(e) if e.value().revision > c.revision && c.revision != 0 => Op::Nop,
            _ => Op::Put(Arc::new(c)),
        });
    }

    /// A write seen on the store's stream of user records: refreshes the entry if this node
    /// caches that user or is reading it now, and adds no other. (Every node sees every
    /// user's writes; caching them all would hold the whole cluster's users on each node,
    /// whoever its connections watch.) The read in flight is what closes the race with a
    /// fill: its store answer may predate this write, and `offer` keeps the newer one.
    /// `decode` runs only for those users; `None` (unreadable) drops the entry.
    pub fn refresh(&self, id: &UserId, decode: impl FnOnce() -> Option<Cached>) {
        if !(self.cache.contains_key(id) || self.reading.lock().contains_key(id)) {
            return;
        }
        match decode() {
            Some(c) => self.offer(id, c),
            None => self.invalidate(id),
        }
    }

    /// Marks a read of `id` from the store in flight until the guard is dropped (after
    /// its answer was offered).
    pub fn reading(&self, id: &UserId) -> Reading<'_> {
        *self.reading.lock().entry(id.clone()).or_insert(0) += 1;
        Reading { cache: self, id: id.clone() }
    }

    /// Replaces the entry whatever its revision (a local change made while degraded).
    pub fn put_local(&self, id: &UserId, state: UserState) {
        let revision = self.cache.get(id).map_or(0, |c| c.revision);
        self.cache.insert(id.clone(), Arc::new(Cached { state: Some(state), revision }));
    }

    pub fn invalidate(&self, id: &UserId) {
        self.cache.invalidate(id);
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.run_pending_tasks();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            keys: self.cache.entry_count(),
            cost: self.cache.weighted_size(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// One probe is in flight.
    HalfOpen {
        backoff: Duration,
    },
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The store is now considered unreachable: degraded mode begins.
    Opened,
    /// A call succeeded after an outage: degraded mode ends.
    Closed,
}

pub struct Breaker {
    mode: Mutex<Mode>,
    threshold: u32,
    base: Duration,
    max: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, base: Duration, max: Duration) -> Breaker {
        Breaker { mode: Mutex::new(Mode::Closed { failures: 0 }), threshold: threshold.max(1), base, max }
    }

    /// Whether a store call may go ahead now (while open, one probe per back-off period).
    pub fn allow(&self, now: Instant) -> bool {
        let mut m = self.mode.lock();
        match *m {
            Mode::Closed { .. } => true,
            Mode::Open { until, backoff } if now >= until => {
                *m = Mode::HalfOpen { backoff };
                true
            }
            Mode::Open { .. } | Mode::HalfOpen { .. } => false,
        }
    }

    pub fn record(&self, ok: bool, now: Instant) -> Transition {
        let mut m = self.mode.lock();
        match (*m, ok) {
            (Mode::Closed { .. }, true) => {
                *m = Mode::Closed { failures: 0 };
                Transition::None
            }
            (Mode::Closed { failures }, false) => {
                if failures + 1 >= self.threshold {
                    *m = Mode::Open { until: now + self.base, backoff: self.base };
                    Transition::Opened
                } else {
                    *m = Mode::Closed { failures: failures + 1 };
                    Transition::None
                }
            }
            (Mode::Open { .. } | Mode::HalfOpen { .. }, true) => {
                *m = Mode::Closed { failures: 0 };
                Transition::Closed
            }
            (Mode::HalfOpen { backoff }, false) => {
                let backoff = (backoff * 2).min(self.max);
                *m = Mode::Open { until: now + backoff, backoff };
                Transition::None
            }
            (Mode::Open { .. }, false) => Transition::None,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.mode.lock(), Mode::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc as A;

    fn uid(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    fn state(devices: usize) -> UserState {
        let mut s = UserState::new(A::from("n"));
        for d in 0..devices {
            s.register(crate::core::NewSession::new(&format!("d{d}"), "gw", 1000), &A::from("n"), 0).unwrap();
        }
        s
    }

    #[test]
    fn newer_revisions_win_and_local_changes_replace() {
        let c = PresenceCache::new(1 << 20, CACHE_TTL);
        let u = uid("alice");
        c.offer(&u, Cached { state: Some(state(1)), revision: 5 });
        c.offer(&u, Cached { state: None, revision: 4 });
        assert_eq!(c.get(&u).unwrap().revision, 5, "an older read does not replace a newer state");
        c.offer(&u, Cached { state: Some(state(2)), revision: 7 });
        assert_eq!(c.get(&u).unwrap().state.as_ref().unwrap().sessions.len(), 2);
        c.put_local(&u, state(0));
        let e = c.get(&u).unwrap();
        assert_eq!((e.revision, e.state.as_ref().unwrap().sessions.len()), (7, 0));
        c.invalidate(&u);
        assert!(c.get(&u).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (3, 1));
    }

    #[test]
    fn the_write_stream_refreshes_cached_and_in_flight_users_only() {
        let c = PresenceCache::new(1 << 20, CACHE_TTL);
        let (cached, reading, other) = (uid("cached"), uid("reading"), uid("other"));
        c.offer(&cached, Cached { state: Some(state(1)), revision: 3 });
        c.refresh(&cached, || Some(Cached { state: Some(state(2)), revision: 4 }));
        assert_eq!(c.get(&cached).unwrap().revision, 4, "a cached user is kept current");
        c.refresh(&other, || Some(Cached { state: Some(state(1)), revision: 9 }));
        c.refresh(&other, || unreachable!("a user nobody here caches or reads is not decoded"));
        assert!(c.get(&other).is_none(), "a user nobody here read is not added");
        // A read's answer (revision 5) can predate a write (6) seen while it was in flight.
        let guard = c.reading(&reading);
        c.refresh(&reading, || Some(Cached { state: Some(state(2)), revision: 6 }));
        c.offer(&reading, Cached { state: Some(state(1)), revision: 5 });
        drop(guard);
        assert_eq!(c.get(&reading).unwrap().revision, 6, "the write seen during the read wins");
        assert!(c.reading.lock().is_empty(), "nothing left in flight");
        c.invalidate(&reading);
        c.refresh(&reading, || Some(Cached { state: Some(state(1)), revision: 7 }));
        assert!(c.get(&reading).is_none(), "after the read, only a cached entry is refreshed");
    }

    #[test]
    fn cost_bounds_the_cache_and_evictions_are_counted() {
        let c = PresenceCache::new(20_000, CACHE_TTL);
        for i in 0..2_000 {
            let u = uid(&format!("user-{i}"));
            c.offer(&u, Cached { state: Some(state(1)), revision: 1 });
            // Reads make entries frequent enough to compete for admission.
            let _ = c.get(&u);
        }
        let s = c.stats();
        assert!(s.cost <= 20_000, "{s:?}");
        assert!(s.keys < 2_000, "{s:?}");
        assert!(s.keys > 10, "{s:?}");
    }

    #[test]
    fn breaker_opens_probes_backs_off_and_closes() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_millis(100), Duration::from_millis(400));
        assert_eq!(b.record(false, t0), Transition::None);
        assert_eq!(b.record(false, t0), Transition::None);
        assert!(b.allow(t0));
        assert_eq!(b.record(false, t0), Transition::Opened);
        assert!(b.is_open());
        assert!(!b.allow(t0 + Duration::from_millis(50)), "fails fast while open");
        assert!(b.allow(t0 + Duration::from_millis(100)), "one probe after the back-off");
        assert!(!b.allow(t0 + Duration::from_millis(101)), "only one");
        assert_eq!(b.record(false, t0 + Duration::from_millis(110)), Transition::None);
        assert!(!b.allow(t0 + Duration::from_millis(250)), "back-off doubled to 200ms");
        assert!(b.allow(t0 + Duration::from_millis(311)));
        assert_eq!(b.record(true, t0 + Duration::from_millis(320)), Transition::Closed);
        assert!(!b.is_open());
        // A success resets the count of consecutive failures.
        b.record(false, t0);
        b.record(true, t0);
        b.record(false, t0);
        assert_eq!(b.record(false, t0), Transition::None);
    }
}
