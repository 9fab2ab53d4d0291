//! Degraded mode and the write-back: while the store is unreachable, session changes of
//! this node's own connections are applied to the cached state and published on this
//! node's bus only (no other node can order them: they are not in the store), and the
//! users concerned are marked; when the store is back (or this node's lease was claimed
//! while it was cut off, or lost with the store's data), their sessions are reconciled
//! with the store by registration tag (see [`UserState::sync_node`]): this node's memory
//! is the truth for its own connections, and nothing else. The same reconciliation
//! repairs a user whose stored record lost a session a connection here holds
//! (anti-entropy: an event that shows the device gone).

use bytes::Bytes;

use super::{lease, wrote, ClusterStore, Space};
use crate::core::{Change, Event, Millis, Presence, Session, UserId, UserState};
use crate::store::StoreError;

impl ClusterStore {
    /// Like [`ClusterStore::apply`] for session changes, which must not be lost when the
    /// store cannot be reached (degraded, or a first failure before the breaker opens: a
    /// departure dropped there would be written back as live by the next write-back):
    /// then they are applied to the cached state (or, uncached, to the sessions this node
    /// holds of the user), published locally (uncached: a new session only), and the
    /// user is marked for write-back.
    pub(super) async fn apply_session<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        let failed = match self.apply(id, create, &mut f).await {
            Err(StoreError::Unreachable(e)) => StoreError::Unreachable(e),
            Err(e) if self.inner.degraded.breaker.is_open() => e,
            other => return other,
        };
        let now = self.inner.clock.now();
        // Uncached: what this node holds of the user is all it knows. Nothing but a new
        // session is published from that (the user may be online elsewhere): the
        // write-back will.
        let (mut st, trusted) = match self.inner.cache.get(id).and_then(|c| c.state.clone()) {
            Some(s) => (s, true),
            None => {
                let held = self.held_sessions(id);
                if held.is_empty() && !create {
                    // Nothing here to keep: the caller (a reaper) tries again on the error.
                    return if self.inner.degraded.breaker.is_open() { Ok(None) } else { Err(failed) };
                }
                let mut s = UserState::new(self.inner.node.clone());
                s.sessions = held;
                // A new session: the user is online here at least, as shown.
                (s, create)
            }
        };
        tracing::debug!(user = %id, error = %failed, "store unreachable: a session change kept here for the write-back");
        let before = st.published(id);
        let (r, change) = f(&mut st, now);
        if trusted {
            // A state built from an ending on this node's sessions alone is not the
            // user's: not cached.
            self.inner.cache.put_local(id, st.clone());
        }
        self.inner.degraded.dirty.lock().insert(id.clone());
        metrics::counter!(self.inner.bp.names().degraded_local_changes).increment(1);
        // Revision 0: not in the store yet (the write-back gives it one).
        let presence = st.view(id, now);
        if let Some(kind) = change.event.filter(|_| trusted) {
            // This node's watchers only: published to the others, it would reach them when
            // the link heals (a client buffers what it could not send), a transition the
            // store never made. The write-back publishes the one it makes, if any.
            self.inner.degraded.shown.lock().insert(id.clone(), presence.clone());
            self.inner.order.lock().show(&presence);
            self.inner.bus.publish(Event { kind, presence: presence.clone(), before, at: now });
        }
        Ok(Some((r, presence)))
    }

    /// Whether the presence an event of the write-back carries is what this node's
    /// watchers were already shown while it was degraded (then only the other nodes need
    /// it). Forgets what was shown of the user either way.
    pub(super) fn shown_while_degraded(&self, p: &Presence) -> bool {
        let mut shown = self.inner.degraded.shown.lock();
        !shown.is_empty() && shown.remove(&p.user_id).is_some_and(|s| s.same_state(p))
    }

    /// Writes back the sessions of users changed while degraded (this node's memory is
    /// the truth for its own connections) and announces it.
    pub(super) async fn sync_dirty(&self) {
        let users: Vec<UserId> = self.inner.degraded.dirty.lock().drain().collect();
        if users.is_empty() {
            return;
        }
        let n = self.sync_users(&users).await;
        self.inner.degraded.shown.lock().clear();
        self.announce_sync(n).await;
    }

    /// Reconciles the store with this node's sessions of `users`, by registration tag
    /// ([`UserState::sync_node`]): a session moved to another node or ended is not
    /// brought back, one whose connection is here is. Returns how many users were
    /// written; failures go back to the dirty set for the next attempt.
    pub(super) async fn sync_users(&self, users: &[UserId]) -> usize {
        let node = self.inner.node.clone();
        let mut written = 0;
        for user in users {
            let held = self.held_sessions(user);
            let live = held.iter().any(|h| !h.lingering);
            if live {
                match self.guarded(self.inner.bp.put(Space::Owners(&node), user.as_str(), Bytes::new())).await {
                    Ok(_) => wrote(&self.inner, "index"),
                    Err(_) => {
                        self.inner.degraded.dirty.lock().insert(user.clone());
                        continue;
                    }
                }
            }
            // Held as of the write (under the user's write lock): a session that ended
            // while this write waited for the lock is not written back.
            let mut held = held;
            let r = self
                .apply(user, live, |s, now| {
                    held = self.held_sessions(user);
                    let (change, forget) = s.sync_node(&node, &held, &node, now);
                    (forget, change)
                })
                .await;
            match r {
                Ok(r) => {
                    written += 1;
                    // No record at all: nothing held here is to be restored.
                    let forget = match r {
                        Some((forget, _)) => forget,
                        None => held.iter().map(|h| h.device_id.clone()).collect(),
                    };
                    {
                        let mut owned = self.inner.owned.lock();
                        for d in &forget {
                            let sid = held.iter().find(|h| h.device_id == *d).map(|h| h.sid);
                            owned.remove_tagged(user, d, sid);
                        }
                    }
                    if !forget.is_empty() {
                        self.index_end(user).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "could not write back a user's sessions; will retry");
                    self.inner.degraded.dirty.lock().insert(user.clone());
                }
            }
        }
        written
    }

    /// The sessions of `user` this node holds (its connections: the truth for them).
    fn held_sessions(&self, user: &UserId) -> Vec<Session> {
        let node = self.inner.node.clone();
        self.inner.owned.lock().all_of(user).into_iter().map(|(d, o)| o.session(&d, &node)).collect()
    }

    /// Anti-entropy: an event showed `user` without a device whose connection is live
    /// here (the store lost the session: a stale write-back of another node, a janitor
    /// that ended it while this node was slow). Rewrites it, once at a time per user.
    pub(super) fn repair(&self, user: &UserId) {
        if !self.inner.degraded.repairing.lock().insert(user.clone()) {
            return;
        }
        metrics::counter!(self.inner.bp.names().repairs).increment(1);
        tracing::info!(user = %user, "a session held here was missing from the store; writing it again");
        let store = self.clone();
        let user = user.clone();
        tokio::spawn(async move {
            store.sync_users(std::slice::from_ref(&user)).await;
            store.inner.degraded.repairing.lock().remove(&user);
        });
    }

    pub(super) async fn announce_sync(&self, users: usize) {
        let notice = lease::SyncNotice { node_id: self.inner.node.to_string(), sessions: users, at: self.inner.clock.now() };
        if let Ok(body) = serde_json::to_vec(&notice) {
            if let Err(e) = self.inner.bp.announce_sync(&self.inner.node, body.into()).await {
                tracing::debug!(error = %e, "could not announce the write-back");
            }
        }
        tracing::info!(users, "this node's sessions written back to the store");
    }
}
