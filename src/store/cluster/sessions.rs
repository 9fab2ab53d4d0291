//! Sessions held by this node: registration (and take-over from a node that no longer
//! answers), heartbeats in memory (forwarded to the owning node when they land elsewhere),
//! the offline grace (a session whose connection went lingers in memory until its
//! deadline), the owner index, the end of sessions whose deadline passed, and the
//! node-to-node requests (`refresh`, answered; `drop`, answered when asked before the end
//! is written; `adopt`, not). The bookkeeping itself, with no I/O, is
//! [`super::owned::OwnedTable`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::owned::Owned;
use super::{unavailable, wrote, ClusterStore, Space};
use crate::core::{Change, Ending, Millis, NewSession, Registered, Session, UserId, HELD};
use crate::store::StoreError;

/// A heartbeat forwarded to the owning node (`refresh`), or a session ended elsewhere
/// (`drop`, the registration tagged `sid` when given).
#[derive(Debug, Serialize, Deserialize)]
struct NodeRequest {
    op: String,
    user_id: String,
    device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefreshReply {
    expires_at: Option<Millis>,
}

/// How soon the end of a lapsed session that could not be written is tried again.
const RETRY_MS: Millis = 1_000;

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
                if msg.op == "adopt" {
                    // A draining node handed its sessions over: adopt them now rather
                    // than at the next janitor round.
                    if let Ok(node) = std::str::from_utf8(&msg.payload).map(str::to_string) {
                        tokio::spawn(async move { store.adopt_drained(&node).await });
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
                            store.inner.owned.lock().remove_tagged(&user, &req.device_id, req.sid);
                            if let Some(reply) = msg.reply {
                                // Asked before the session's end is written: forgotten now.
                                let answer = store.inner.bp.respond(&reply, Bytes::new());
                                let _ = tokio::time::timeout(store.inner.opts.kv_timeout, answer).await;
                            }
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

    /// Ends, in the store, sessions this node owned whose deadline passed (a silent
    /// device, or the end of a lost connection's grace), and explicit statuses this node
    /// wrote whose TTL passed. Returns how many users were looked at.
    pub async fn reap(&self, now: Millis) -> usize {
        let lapsed = self.inner.owned.lock().lapsed(now);
        let mut n = lapsed.len();
        for (user, device, o) in lapsed {
            let node = self.inner.node.clone();
            let sid = Some(o.sid);
            let r = self.apply_session(&user, false, |s, now| s.release(&device, &node, sid, o.last_heartbeat, &node, now)).await;
            if r.is_err() || self.inner.degraded.breaker.is_open() {
                // Not in the store yet: kept (due, lingering) until it is, so a write-back
                // ends it with its own last_seen and the janitor does not get it back.
                if let Err(e) = &r {
                    tracing::warn!(user = %user, error = %e, "could not end a lapsed session; will retry");
                }
                let due = Owned { expires_at: o.expires_at.min(now), lingering: true, ..o };
                self.inner.owned.lock().requeue(&user, &device, due, now.saturating_add(RETRY_MS));
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
                    // A lingering session is not taken over by a heartbeat: its connection
                    // went, and only a registration continues it.
                    let Some(sess) = s.sessions.iter().find(|x| x.device_id == dev && x.expires_at > now && !x.lingering) else {
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
                lingering: false,
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
    /// session taken over when the owner does not answer. An owner that answers "not
    /// held" (the session lingers there: its connection went) is believed.
    pub(super) async fn refresh_not_held(&self, id: &UserId, device: &str) -> Result<Option<Millis>, StoreError> {
        let now = self.inner.clock.now();
        let Some((state, _)) = self.read(id, true).await? else { return Ok(None) };
        let Some(owner) = state.live_sessions(now).find(|s| &*s.device_id == device && !s.lingering).map(|s| s.node_id.clone()) else {
            return Ok(None);
        };
        if *owner != *self.inner.node {
            let req = NodeRequest { op: "refresh".into(), user_id: id.to_string(), device_id: device.into(), sid: None };
            let body = serde_json::to_vec(&req).map_err(unavailable)?;
            match self.inner.bp.request(&owner, "refresh", body.into(), Duration::from_secs(1)).await {
                Ok(answer) => match serde_json::from_slice(&answer) {
                    Ok(RefreshReply { expires_at: Some(t) }) => {
                        metrics::counter!(self.inner.bp.names().forwarded_heartbeats).increment(1);
                        return Ok(Some(t));
                    }
                    Ok(RefreshReply { expires_at: None }) => return Ok(None),
                    Err(_) => {}
                },
                Err(e) => tracing::debug!(owner = %owner, error = %e, "owner did not take the heartbeat; taking the session over"),
            }
        }
        let r = self.own(id, NewSession::new(device, "", 0), true).await?;
        Ok(r.map(|r| r.expires_at))
    }

    /// Ends a session as `ending` says. Held for the grace: if this node holds it, in
    /// memory only (the store is written when the grace ends, or not at all if the
    /// device registers again first); if another node holds it, taken over here as
    /// lingering (one write), and that node told to forget it.
    pub(super) async fn end(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError> {
        let now = self.inner.clock.now();
        let (until, last_heard) = match ending {
            Ending::Held { until, last_heard } if until > now => (until, last_heard),
            _ => return self.end_now(id, device, sid, ending).await,
        };
        if let Some(was_live) = self.inner.owned.lock().linger(id, device, sid, until, last_heard) {
            return Ok(was_live);
        }
        self.index_begin(id).await?;
        let node = self.inner.node.clone();
        let r = self.apply_session(id, false, |s, now| (s.take_lingering(device, sid, &node, last_heard, now), Change::none())).await;
        let taken = match &r {
            Ok(Some((Some(prev), _))) => Some(prev.clone()),
            _ => None,
        };
        let done = taken.as_ref().map(|p| Owned {
            instance: p.instance_id.clone(),
            platform: p.platform,
            sid: p.sid,
            ttl_ms: p.ttl_ms,
            connected_at: p.connected_at,
            expires_at: until,
            last_heartbeat: p.last_heartbeat.max(last_heard),
            written_at: now,
            lingering: true,
        });
        let device_id: crate::core::DeviceId = Arc::from(device);
        self.inner.owned.lock().finish(id, &device_id, done);
        r?;
        let Some(prev) = taken else {
            self.index_end(id).await;
            return Ok(false);
        };
        self.tell_drop(&prev.node_id, id, device, Some(prev.sid)).await;
        Ok(true)
    }

    /// Ends a session now (a sign-out, or a grace already over).
    async fn end_now(&self, id: &UserId, device: &str, sid: Option<u64>, ending: Ending) -> Result<bool, StoreError> {
        let node = self.inner.node.clone();
        // A session another node holds: that node forgets it first. Told after the write,
        // it could see the write's event before the word, find a live connection of its
        // own missing from the store and write the session back (anti-entropy).
        let now = self.inner.clock.now();
        // Unreadable (the store is out of reach): a session held here ends here, kept for
        // the write-back; one of another node is not this node's to end blind.
        let read = match self.read(id, false).await {
            Ok(r) => r,
            Err(e) if !self.inner.owned.lock().all_of(id).iter().any(|(d, _)| **d == *device) => return Err(e),
            Err(_) => None,
        };
        let held_elsewhere = read.and_then(|(state, _)| {
            state
                .live_sessions(now)
                .find(|x| *x.device_id == *device && sid.is_none_or(|t| t == x.sid) && *x.node_id != *node)
                .map(|x| (x.node_id.clone(), x.sid))
        });
        if let Some((o, t)) = &held_elsewhere {
            self.ask_drop(o, id, device, *t).await;
        }
        let mut owner: Option<(Arc<str>, u64)> = None;
        let r = self
            .apply_session(id, false, |s, now| {
                owner = s
                    .sessions
                    .iter()
                    .find(|x| *x.device_id == *device && sid.is_none_or(|t| t == x.sid))
                    .map(|x| (x.node_id.clone(), x.sid));
                s.end(device, sid, ending, &node, now)
            })
            .await?;
        let removed = r.as_ref().is_some_and(|(removed, _)| *removed);
        if !removed {
            // A newer registration of the device (or none at all): nothing of ours ended
            // in the store. This node's registration of it, if it holds one, is over all
            // the same: a write-back must not bring it back (a store restarted empty has
            // no record to end it in, and the node's lost lease has its sessions written
            // again).
            if self.inner.owned.lock().remove_tagged(id, device, sid).is_some() {
                self.index_end(id).await;
            }
            return Ok(false);
        }
        let tag = owner.as_ref().map(|(_, t)| *t);
        self.inner.owned.lock().remove_tagged(id, device, tag);
        self.index_end(id).await;
        if let Some((o, t)) = owner {
            if held_elsewhere.is_none_or(|(asked, at)| asked != o || at != t) {
                self.tell_drop(&o, id, device, Some(t)).await;
            }
        }
        Ok(true)
    }

    /// As [`ClusterStore::tell_drop`], waiting (briefly) for the owner to say it forgot
    /// the session; an owner that does not answer is gone or cut off, and goes on.
    async fn ask_drop(&self, owner: &str, id: &UserId, device: &str, sid: u64) {
        let req = NodeRequest { op: "drop".into(), user_id: id.to_string(), device_id: device.into(), sid: Some(sid) };
        let Ok(body) = serde_json::to_vec(&req) else { return };
        if let Err(e) = self.inner.bp.request(owner, "drop", body.into(), Duration::from_secs(1)).await {
            tracing::debug!(owner = %owner, error = %e, "the owner did not confirm its session ended; ending it all the same");
        }
    }

    /// Tells `owner` (when it is another node) that its session of `device` ended or moved
    /// here, so it forgets it (no write): it would otherwise keep answering heartbeats.
    async fn tell_drop(&self, owner: &str, id: &UserId, device: &str, sid: Option<u64>) {
        if owner == &*self.inner.node || owner.is_empty() {
            return;
        }
        let req = NodeRequest { op: "drop".into(), user_id: id.to_string(), device_id: device.into(), sid };
        if let Ok(body) = serde_json::to_vec(&req) {
            if let Err(e) = self.inner.bp.tell(owner, "drop", body.into()).await {
                tracing::debug!(owner = %owner, error = %e, "could not tell the owner its session ended");
            }
        }
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
                        Some((_, o)) => {
                            s.ttl_ms = o.ttl_ms; // bound to a lease since it was written
                            o.expires_at
                        }
                        None => s.last_heartbeat.saturating_add(s.ttl_ms).max(now),
                    };
                }
                s
            })
            .collect())
    }
}
