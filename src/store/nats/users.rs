//! The users bucket: every change of a user's state is one compare-and-swap on its key
//! (the pure transition of [`crate::core::state`] inside it), followed by its event; reads
//! come from the cache or the KV; a watcher keeps the cache current; and every KV call
//! goes through the circuit breaker (degraded mode when the center is unreachable).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv as jkv;
use futures_util::StreamExt;

use super::cache::{Cached, Transition};
use super::{subject, wrote, NatsStore, WireEvent, DEGRADED};
use crate::core::{Change, Event, Millis, Presence, UserId, UserState};
use crate::natsio::kv::{self, decode_id, user_key, KvError};
use crate::store::StoreError;

impl NatsStore {
    /// Runs `f` on the user's state inside a CAS loop; publishes the event of the
    /// transition that was written and arms the local expiry timer.
    pub(super) async fn apply<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        let inner = &*self.inner;
        let key = user_key(id);
        let _order = inner.locks.write.lock(id).await;
        let mut result: Option<(R, Change, Millis)> = None;
        let updated = self
            .guarded(kv::update::<UserState, _>(&inner.kv.users, &key, |old| {
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
    pub(super) async fn emit(&self, change: &Change, presence: &Presence, before: Presence, now: Millis) {
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
    pub(super) async fn publish_bounded(&self, subject: String, payload: Vec<u8>) {
        match tokio::time::timeout(self.inner.opts.kv_timeout, self.inner.nats.client.publish(subject, payload.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not publish on NATS"),
            Err(_) => {
                metrics::counter!("nats_publish_timeouts_total").increment(1);
                tracing::warn!("publishing on NATS timed out; the message was dropped");
            }
        }
    }

    /// The user's stored state: from the cache unless `fresh`, else from the KV; while
    /// degraded, from the cache whatever `fresh` says (`None` when not cached: offline).
    /// With the state, its KV revision (`0` for a state changed here while degraded).
    pub(super) async fn read(&self, id: &UserId, fresh: bool) -> Result<Option<(UserState, u64)>, StoreError> {
        if !fresh || self.inner.degraded.breaker.is_open() {
            if let Some(c) = self.inner.cache.get(id) {
                return Ok(c.state.clone().map(|s| (s, c.revision)));
            }
        }
        let users = &self.inner.kv.users;
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
            Err(_) if self.inner.degraded.breaker.is_open() => {
                Ok(self.inner.cache.get(id).and_then(|c| c.state.clone().map(|s| (s, c.revision))))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a KV call through the circuit breaker: refused at once while it is open.
    pub(super) async fn guarded<T>(&self, call: impl std::future::Future<Output = Result<T, KvError>>) -> Result<T, StoreError> {
        if !self.inner.degraded.breaker.allow(Instant::now()) {
            return Err(StoreError::Degraded(DEGRADED.into()));
        }
        let r = call.await;
        self.outcome(!matches!(r, Err(KvError::Backend(_))));
        r.map_err(StoreError::from)
    }

    pub(super) fn outcome(&self, ok: bool) {
        match self.inner.degraded.breaker.record(ok, Instant::now()) {
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

    /// Keeps the cache current from the users bucket's changes (re-watching after errors).
    pub(super) fn watch_users(&self) {
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let watch = inner.kv.users.watch_all().await;
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

    pub(super) async fn read_many(&self, ids: &[UserId], fresh: bool) -> Result<Vec<Option<Presence>>, StoreError> {
        let states = futures_util::future::join_all(ids.iter().map(|id| self.read(id, fresh))).await;
        let now = self.inner.clock.now();
        let mut out = Vec::with_capacity(ids.len());
        for (id, st) in ids.iter().zip(states) {
            out.push(st?.map(|(s, revision)| Presence { revision, ..s.view(id, now) }));
        }
        Ok(out)
    }
}
