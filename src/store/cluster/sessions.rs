//! Sessions held by this node: registration (and take-over from a node that no longer
//! answers), heartbeats in memory (forwarded to the owning node when they land elsewhere),
//! the owner index, the end of sessions whose deadline passed, and the node-to-node
//! requests (`refresh`, answered; `drop`, not). The bookkeeping itself, with no I/O, is
//! [`super::owned::OwnedTable`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::owned::Owned;
use super::{unavailable, wrote, ClusterStore, Space};
use crate::core::{Change, Millis, NewSession, Registered, Session, UserId, HELD};
use crate::store::StoreError;

/// A heartbeat forwarded to the owning node, and its answer.
#[derive(Debug, Serialize, Deserialize)]
struct NodeRequest {
    op: String,
    user_id: String,
    device_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefreshReply {
    expires_at: Option<Millis>,
}

impl ClusterStore {
    /// Answers other nodes about the sessions this node owns: a forwarded heartbeat
    /// (`refresh`, request/reply) and a session ended elsewhere (`drop`); and whether this
    /// node runs (`alive`, asked before a janitor claims its lapsed lease).
    pub(super) async fn serve_node_requests(&self) -> Result<(), StoreError> {
        let mut rx = self.inner.bp.serve(&self.inner.node).await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                let store = ClusterStore { inner };
                if msg.op == "alive" {
                    // A janitor asking before it claims this node's lapsed lease.
                    if let Some(reply) = msg.reply {
                        tokio::spawn(async move {
                            let answer = store.inner.bp.respond(&reply, Bytes::new());
                            let _ = tokio::time::timeout(store.inner.opts.kv_timeout, answer).await;
                        });
                    }
                    continue;
                }
                let Ok(req) = serde_json::from_slice::<NodeRequest>(&msg.payload) else {
                    tracing::warn!(op = %msg.op, "ignoring unreadable node request");
                    continue;
                };
                let Ok(user) = UserId::parse(&req.user_id, usize::MAX) else { continue };
                // Each request in its own task: one slow answer (a last_seen write) must
                // not hold up the heartbeats queued behind it.
                tokio::spawn(async move {
                    match req.op.as_str() {
                        "refresh" => {
                            let expires_at = store.beat(&user, &req.device_id).await;
                            if let (Some(reply), Ok(body)) = (msg.reply, serde_json::to_vec(&RefreshReply { expires_at })) {
                                let answer = store.inner.bp.respond(&reply, body.into());
                                if let Ok(Err(e)) = tokio::time::timeout(store.inner.opts.kv_timeout, answer).await {
                                    tracing::debug!(error = %e, "could not answer a forwarded heartbeat");
                                }
                            }
                        }
                        "drop" => {
                            store.inner.owned.lock().remove(&user, &req.device_id);
                            store.index_end(&user).await;
                        }
                        _ => {}
                    }
                });
            }
        });
        self.inner.tasks.lock().push(h);
        Ok(())
    }

    /// Before a session of `user` is written as ours: makes sure the owner index names
    /// this node for `user`, so the janitor finds the session if this node dies.
    pub(super) async fn index_begin(&self, user: &UserId) -> Result<(), StoreError> {
        let _g = self.inner.locks.index.lock(user).await;
        let first = self.inner.owned.lock().begin(user);
        if first {
            let put = self.guarded(self.inner.bp.put(Space::Owners(&self.inner.node), user.as_str(), Bytes::new()));
            match put.await {
                Ok(_) => wrote(&self.inner, "index"),
                // Degraded: written back with the user's sessions on recovery.
                Err(_) if self.inner.degraded.breaker.is_open() => {
                    self.inner.degraded.dirty.lock().insert(user.clone());
                }
                Err(e) => {
                    self.inner.owned.lock().finish(user, &crate::core::DeviceId::from(""), None);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// After a session of `user` ended: drops the index entry when this node holds none.
    pub(super) async fn index_end(&self, user: &UserId) {
        let _g = self.inner.locks.index.lock(user).await;
        // While degraded the entry stays (harmless: the janitor finds nothing to end there).
        if self.inner.owned.lock().is_unowned(user) && !self.inner.degraded.breaker.is_open() {
            match self.inner.bp.remove(Space::Owners(&self.inner.node), user.as_str(), None).await {
                Ok(()) => wrote(&self.inner, "index"),
                Err(e) => tracing::debug!(user = %user, error = %e, "owner index entry left behind (harmless)"),
            }
        }
    }

    /// A heartbeat of a session this node owns: memory only (plus `last_seen` at most
    /// once per interval). `None` when this node does not hold a live session for it.
    pub(super) async fn beat(&self, id: &UserId, device: &str) -> Option<Millis> {
        let (expires_at, write_at) = self.beat_in_memory(id, device)?;
        if let Some(now) = write_at {
            self.write_last_seen(id, device, now).await;
        }
        Some(expires_at)
    }

    /// The memory part of [`beat`](Self::beat): the new deadline, and the time to write as
    /// `last_seen` when a write is due.
    pub(super) fn beat_in_memory(&self, id: &UserId, device: &str) -> Option<(Millis, Option<Millis>)> {
        let now = self.inner.clock.now();
        let beat = self.inner.owned.lock().beat(id, device, now, self.inner.opts.last_seen_interval_ms)?;
        Some((beat.expires_at, beat.write_last_seen.then_some(now)))
    }

    pub(super) async fn write_last_seen(&self, id: &UserId, device: &str, now: Millis) {
        let r = self
            .apply(id, false, |s, _| {
                s.touch(device, now);
                ((), Change::none())
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(user = %id, error = %e, "could not write last_seen; will try at the next interval");
        }
    }

    /// Ends, in the KV, sessions this node owned whose deadline passed, and explicit
    /// statuses this node wrote whose TTL passed. Returns how many users were looked at.
    pub async fn reap(&self, now: Millis) -> usize {
        let lapsed = self.inner.owned.lock().lapsed(now);
        let mut n = lapsed.len();
        for (user, device, o) in lapsed {
            let node = self.inner.node.clone();
            let r = self.apply_session(&user, false, |s, now| s.release(&device, &node, o.last_heartbeat, &node, now)).await;
            if let Err(e) = r {
                tracing::warn!(user = %user, error = %e, "could not end a lapsed session; will retry");
                let retry = Owned { expires_at: now, ..o };
                let mut t = self.inner.owned.lock();
                t.begin(&user);
                t.finish(&user, &device, Some(retry));
                continue;
            }
            self.index_end(&user).await;
        }
        let tick_ms = self.inner.opts.tick_ms.max(1);
        let due: Vec<UserId> = self.inner.timers.lock().take_due(now).into_iter().map(|(_, id)| id).collect();
        let mut seen = std::collections::HashSet::new();
        for id in due.into_iter().filter(|id| seen.insert(id.clone())) {
            let node = self.inner.node.clone();
            if let Err(e) = self.apply(&id, false, |s, now| ((), s.expire(&node, now))).await {
                tracing::warn!(user = %id, error = %e, "expiry failed; will retry");
                self.inner.timers.lock().insert(now + 10 * tick_ms, id);
            }
        }
        n += seen.len();
        n
    }

    /// Registers `req.device` as held by this node (a new session, or, with
    /// `take_over`, one taken over from a node that no longer answers for it).
    pub(super) async fn own(&self, id: &UserId, req: NewSession, take_over: bool) -> Result<Option<Registered>, StoreError> {
        self.index_begin(id).await?;
        let node = self.inner.node.clone();
        let (dev, inst) = (req.device.clone(), req.instance.clone());
        let r = self
            .apply_session(id, !take_over, |s, now| {
                if take_over {
                    let Some(sess) = s.sessions.iter().find(|x| x.device_id == dev && x.expires_at > now) else {
                        return (None, Change::none());
                    };
                    let (ttl, sid, platform) = (sess.ttl_ms, sess.sid, sess.platform);
                    s.hold(&dev, &node);
                    s.touch(&dev, now);
                    let reg = Registered { created: false, expires_at: now.saturating_add(ttl), sid };
                    (Some(Ok((reg, ttl, platform))), Change::none())
                } else {
                    match s.register(req.clone(), &node, now) {
                        Ok((reg, change)) => {
                            s.hold(&dev, &node);
                            (Some(Ok((reg, req.ttl_ms, req.platform))), change)
                        }
                        Err(limit) => (Some(Err(StoreError::TooManyDevices { max: limit.max })), Change::none()),
                    }
                }
            })
            .await;
        let now = self.inner.clock.now();
        let done = match &r {
            Ok(Some((Some(Ok((reg, ttl, platform))), _))) => Some(Owned {
                instance: inst.clone(),
                platform: *platform,
                sid: reg.sid,
                ttl_ms: *ttl,
                connected_at: now,
                expires_at: reg.expires_at,
                last_heartbeat: now,
                written_at: now,
            }),
            _ => None,
        };
        let ok = done.is_some();
        self.inner.owned.lock().finish(id, &dev, done);
        if !ok {
            self.index_end(id).await;
        }
        match r?.and_then(|(x, _)| x) {
            Some(Ok((reg, _, _))) => Ok(Some(reg)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// A heartbeat for a session this node does not hold (its caller tried
    /// [`beat_in_memory`](Self::beat_in_memory) first): forwarded to the owner, or the
    /// session taken over when the owner does not answer.
    pub(super) async fn refresh_not_held(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        let now = self.inner.clock.now();
        let Some((state, _)) = self.read(id, true).await? else { return Ok(None) };
        let Some(owner) = state.live_sessions(now).find(|s| &*s.device_id == device).map(|s| s.node_id.clone()) else {
            return Ok(None);
        };
        if *owner != *self.inner.node {
            let req = NodeRequest { op: "refresh".into(), user_id: id.to_string(), device_id: device.into() };
            let body = serde_json::to_vec(&req).map_err(unavailable)?;
            match self.inner.bp.request(&owner, "refresh", body.into(), Duration::from_secs(1)).await {
                Ok(answer) => {
                    if let Ok(RefreshReply { expires_at: Some(t) }) = serde_json::from_slice(&answer) {
                        metrics::counter!(self.inner.bp.names().forwarded_heartbeats).increment(1);
                        return Ok(Some(t));
                    }
                }
                Err(e) => tracing::debug!(owner = %owner, error = %e, "owner did not take the heartbeat; taking the session over"),
            }
        }
        let r = self.own(id, NewSession::new(device, "", 0), true).await?;
        Ok(r.map(|r| r.expires_at))
    }

    pub(super) async fn unregister(&self, id: &UserId, device: &str, sid: Option<u64>) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        let mut owner: Option<Arc<str>> = None;
        let r = self
            .apply_session(id, false, |s, now| {
                owner = s.sessions.iter().find(|x| *x.device_id == *device && sid.is_none_or(|t| t == x.sid)).map(|x| x.node_id.clone());
                s.unregister(device, sid, &node, now)
            })
            .await?;
        let removed = r.as_ref().is_some_and(|(removed, _)| *removed);
        if !removed {
            // A newer registration of the device (or none at all): nothing of ours ended.
            return Ok(false);
        }
        self.inner.owned.lock().remove(id, device);
        self.index_end(id).await;
        if let Some(o) = owner.filter(|o| **o != *node && !o.is_empty()) {
            // The owner forgets it (no write): it would otherwise keep answering heartbeats.
            let req = NodeRequest { op: "drop".into(), user_id: id.to_string(), device_id: device.into() };
            if let Ok(body) = serde_json::to_vec(&req) {
                if let Err(e) = self.inner.bp.tell(&o, "drop", body.into()).await {
                    tracing::debug!(owner = %o, error = %e, "could not tell the owner its session ended");
                }
            }
        }
        Ok(true)
    }

    pub(super) async fn live_devices(&self, id: &UserId) -> Result<Vec<Session>, StoreError> {
        let now = self.inner.clock.now();
        // The device list is read from the store: it is not a hot path, and callers use it
        // right after registering elsewhere.
        let Some((state, _)) = self.read(id, true).await? else { return Ok(Vec::new()) };
        let owned = self.inner.owned.lock();
        let local = owned.all_of(id);
        Ok(state
            .live_sessions(now)
            .map(|s| {
                let mut s = s.clone();
                if s.expires_at == HELD {
                    // Held by a node lease: ours we know exactly; another node's lasts at
                    // least one TTL past its last recorded heartbeat.
                    s.expires_at = match local.iter().find(|(d, _)| *d == s.device_id) {
                        Some((_, o)) => o.expires_at,
                        None => s.last_heartbeat.saturating_add(s.ttl_ms).max(now),
                    };
                }
                s
            })
            .collect())
    }
}
