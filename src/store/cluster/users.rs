//! Users' records: every change of a user's state is one compare-and-swap on its record
//! (the pure transition of [`crate::core::state`] inside it), followed by its event; reads
//! come from the cache (when the backend keeps it coherent) or the backend; and every
//! backend call goes through the circuit breaker (degraded mode when it is unreachable).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::cache::{Cached, Transition};
use super::{wrote, ClusterStore, Refused, Space, Versioned};
use crate::core::{Change, Event, EventKind, Millis, Presence, UserId, UserState};
use crate::store::StoreError;

/// What one compare-and-swap did.
pub(super) struct Updated {
    pub before: Option<UserState>,
    pub after: Option<UserState>,
    /// Revision after the write (or of the record read when nothing was written).
    pub revision: u64,
    /// Revision of `before` (`0`: no record).
    pub prev_revision: u64,
}

/// Attempts of one compare-and-swap before giving up as contended.
const MAX_ATTEMPTS: usize = 64;

fn decode(id: &UserId, bytes: &[u8]) -> Result<UserState, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: format!("user {id}"), detail: e.to_string() })
}

impl ClusterStore {
    /// Reads the user's record, computes the new state with `f` (`None`: leave it) and
    /// writes it only if nobody wrote in between; on a conflict, reads again and retries.
    /// Two nodes changing the same user at once therefore never lose an update.
    async fn swap_user(&self, id: &UserId, mut f: impl FnMut(Option<UserState>) -> Option<UserState>) -> Result<Updated, StoreError> {
        let inner = &*self.inner;
        let names = inner.bp.names();
        for attempt in 0..MAX_ATTEMPTS {
            let record = self.guarded(inner.bp.get(Space::Users, id.as_str())).await?;
            let (before, revision) = match record {
                Some(Versioned { value: Some(v), revision }) => (Some(decode(id, &v)?), Some(revision)),
                Some(Versioned { value: None, revision }) => (None, Some(revision)),
                None => (None, None),
            };
            let Some(after) = f(before.clone()) else {
                let rev = revision.unwrap_or(0);
                return Ok(Updated { before: before.clone(), after: before, revision: rev, prev_revision: rev });
            };
            let bytes = Bytes::from(serde_json::to_vec(&after).map_err(|e| StoreError::Unreachable(e.to_string()))?);
            let forget = match (after.idle_since(), inner.opts.forget_after_ms) {
                (Some(_), Some(ms)) => Some(Duration::from_millis(ms.max(1) as u64)),
                _ => None,
            };
            let written = self.guarded_swap(inner.bp.swap(Space::Users, id.as_str(), revision, bytes, forget)).await?;
            match written {
                Some(rev) => {
                    metrics::counter!(names.cas_writes).increment(1);
                    return Ok(Updated { before, after: Some(after), revision: rev, prev_revision: revision.unwrap_or(0) });
                }
                None => {
                    metrics::counter!(names.cas_conflicts).increment(1);
                    // Spread retries of hot keys a little.
                    tokio::time::sleep(Duration::from_micros(50 * (1 << attempt.min(6)) as u64)).await;
                }
            }
        }
        Err(StoreError::Contended { key: format!("user {id}") })
    }

    /// Runs `f` on the user's state inside a CAS loop; publishes the event of the
    /// transition that was written and arms the local expiry timer.
    pub(super) async fn apply<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        let inner = &*self.inner;
        let _order = inner.locks.write.lock(id).await;
        let mut result: Option<(R, Change, Millis)> = None;
        let updated = self
            .swap_user(id, |old| {
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

    /// Publishes the event of a transition (if it has one) to other nodes and the local
    /// bus, unless a newer event of the user was already admitted here.
    pub(super) async fn emit(&self, change: &Change, presence: &Presence, before: Presence, now: Millis) {
        let Some(kind) = change.event else { return };
        let names = self.inner.bp.names();
        {
            let mut order = self.inner.order.lock();
            if !order.admit(&presence.user_id, presence.revision, now) {
                metrics::counter!(names.events_out_of_order).increment(1);
                return;
            }
            order.show(presence);
        }
        let ev = Event { kind, presence: presence.clone(), before, at: now };
        if let Ok(payload) = serde_json::to_vec(&super::WireEvent::of(&ev)) {
            // Bounded: a publish waits while the client's outgoing buffer is full (a reconnect).
            let publish = self.inner.bp.publish_event(kind, &ev.presence.user_id, payload.into());
            match tokio::time::timeout(self.inner.opts.kv_timeout, publish).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, backend = names.backend, "could not publish an event"),
                Err(_) => {
                    metrics::counter!(names.publish_timeouts).increment(1);
                    tracing::warn!(backend = names.backend, "publishing an event timed out; it was dropped");
                }
            }
        }
        if !self.shown_while_degraded(&ev.presence) {
            self.inner.bus.publish(ev);
        }
    }

    /// The user's stored state: from the cache unless `fresh` (or the cache is not kept
    /// coherent), else from the backend; while degraded, from the cache whatever `fresh`
    /// says (`None` when not cached: offline). With the state, its revision (`0` for a
    /// state changed here while degraded).
    pub(super) async fn read(&self, id: &UserId, fresh: bool) -> Result<Option<(UserState, u64)>, StoreError> {
        let inner = &*self.inner;
        if (!fresh && inner.coherent) || inner.degraded.breaker.is_open() {
            if let Some(c) = inner.cache.get(id) {
                return Ok(c.state.clone().map(|s| (s, c.revision)));
            }
        }
        let _reading = inner.cache.reading(id);
        let r = match self.guarded(inner.bp.get(Space::Users, id.as_str())).await {
            Ok(Some(Versioned { value: Some(v), revision })) => decode(id, &v).map(|s| Cached { state: Some(s), revision }),
            Ok(Some(Versioned { value: None, revision })) => Ok(Cached { state: None, revision }),
            Ok(None) => Ok(Cached { state: None, revision: 0 }),
            Err(e) => Err(e),
        };
        match r {
            Ok(c) => {
                let state = c.state.clone().map(|s| (s, c.revision));
                if c.revision != 0 {
                    inner.cache.offer(id, c);
                }
                Ok(state)
            }
            Err(_) if inner.degraded.breaker.is_open() => Ok(inner.cache.get(id).and_then(|c| c.state.clone().map(|s| (s, c.revision)))),
            Err(e) => Err(e),
        }
    }

    /// Removes the user's record from the backend (a conditional delete, retried on a
    /// conflict) and publishes `user_erased` to every node; `false` when there was none.
    pub(super) async fn erase_record(&self, id: &UserId) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        let _order = inner.locks.write.lock(id).await;
        for attempt in 0..MAX_ATTEMPTS {
            let (state, revision) = match self.guarded(inner.bp.get(Space::Users, id.as_str())).await? {
                // A record that does not decode is erased all the same.
                Some(Versioned { value: Some(v), revision }) => (decode(id, &v).ok(), revision),
                Some(Versioned { value: None, revision }) => (None, revision),
                None => (None, 0),
            };
            let existed = state.is_some();
            let removed = match revision {
                0 => Some(()),
                r => self.guarded_swap(inner.bp.remove(Space::Users, id.as_str(), Some(r))).await?,
            };
            if removed.is_some() {
                inner.cache.invalidate(id);
                let now = inner.clock.now();
                let before = match &state {
                    Some(s) => Presence { revision, ..s.published(id) },
                    None => Presence { revision, ..Presence::unknown(id.clone(), inner.node.clone()) },
                };
                // Above every revision of the record: receivers admit it after its last event.
                let presence = Presence { revision: revision + 1, ..Presence::unknown(id.clone(), inner.node.clone()) };
                let change = Change { event: Some(EventKind::UserErased), previous: before.status, persist: false };
                self.emit(&change, &presence, before, now).await;
                return Ok(existed);
            }
            tokio::time::sleep(Duration::from_micros(50 * (1 << attempt.min(6)) as u64)).await;
        }
        Err(StoreError::Contended { key: format!("user {id}") })
    }

    /// Runs a backend call through the circuit breaker: refused at once while it is open.
    pub(super) async fn guarded<T>(&self, call: impl std::future::Future<Output = Result<T, super::Fault>>) -> Result<T, StoreError> {
        if !self.inner.degraded.breaker.allow(Instant::now()) {
            return Err(StoreError::Degraded(self.inner.bp.names().degraded_reason.into()));
        }
        let r = call.await;
        self.outcome(r.is_ok());
        r.map_err(|e| StoreError::Unreachable(format!("{}: {e}", self.inner.bp.names().backend)))
    }

    /// As [`ClusterStore::guarded`] for a conditional write: `Ok(None)` on a conflict.
    pub(super) async fn guarded_swap<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, Refused>>,
    ) -> Result<Option<T>, StoreError> {
        let r = self
            .guarded(async {
                match call.await {
                    Ok(v) => Ok(Some(v)),
                    Err(Refused::Conflict) => Ok(None),
                    Err(Refused::Fault(f)) => Err(f),
                }
            })
            .await;
        r
    }

    pub(super) fn outcome(&self, ok: bool) {
        let names = self.inner.bp.names();
        match self.inner.degraded.breaker.record(ok, Instant::now()) {
            Transition::None => {}
            Transition::Opened => {
                metrics::gauge!(names.degraded).set(1.0);
                tracing::warn!(backend = names.backend, "store unreachable: degraded mode (reads from this node's cache, marked stale; status writes refused; local sessions kept in memory)");
            }
            Transition::Closed => {
                metrics::gauge!(names.degraded).set(0.0);
                tracing::info!(backend = names.backend, "store reachable again: leaving degraded mode and writing back local sessions");
                // Missed updates: read through again.
                self.inner.cache.invalidate_all();
                let store = self.clone();
                tokio::spawn(async move { store.sync_dirty().await });
            }
        }
    }

    /// Keeps the cache current from the backend's stream of user record writes.
    pub(super) fn follow_users(&self, mut rx: tokio::sync::mpsc::Receiver<(UserId, Versioned)>) {
        let weak = std::sync::Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while let Some((id, record)) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                // Decoded only for users this node caches or is reading (most of the
                // stream is neither); an unreadable record drops the entry.
                let revision = record.revision;
                inner.cache.refresh(&id, || match record.value {
                    Some(v) => serde_json::from_slice::<UserState>(&v).ok().map(|s| Cached { state: Some(s), revision }),
                    None => Some(Cached { state: None, revision }),
                });
            }
        });
        self.inner.tasks.lock().push(h);
    }

    pub(super) async fn read_many(&self, ids: &[UserId], fresh: bool) -> Result<Vec<Option<Presence>>, StoreError> {
        let states = futures_util::future::join_all(ids.iter().map(|id| self.read(id, fresh))).await;
        let now = self.inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        for (id, st) in ids.iter().zip(states) {
            out.push(st?.map(|(s, revision)| Presence { revision, ..s.view(id, now) }));
        }
        // The first read of a watched user is its watchers' snapshot (see EventOrder).
        // (Under the order's lock, so an unwatch seen meanwhile is not undone.)
        let mut order = self.inner.order.lock();
        let watched = self.inner.bus.interest().watches_each(ids);
        for ((id, p), watched) in ids.iter().zip(&out).zip(watched) {
            if watched {
                order.watch(id, true);
                order.read(id, p.as_ref());
            }
        }
        drop(order);
        Ok(out)
    }
}
