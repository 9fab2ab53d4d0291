//! Degraded mode: while the store is unreachable, session changes of this node's own
//! connections are applied to the cached state and published locally, and the users
//! concerned are marked; when the store is back (or this node's lease was claimed while
//! it was cut off, or lost with the store's data), their sessions are written back from
//! this node's memory.

use bytes::Bytes;

use super::{lease, wrote, ClusterStore, Space};
use crate::core::{Change, Millis, Presence, Session, UserId, UserState, HELD};
use crate::store::StoreError;

impl ClusterStore {
    /// Like [`ClusterStore::apply`] for session changes, which must not be lost while the
    /// store is unreachable: then they are applied to the cached state, published
    /// locally, and the user is marked for write-back.
    pub(super) async fn apply_session<R: Clone>(
        &self,
        id: &UserId,
        create: bool,
        mut f: impl FnMut(&mut UserState, Millis) -> (R, Change),
    ) -> Result<Option<(R, Presence)>, StoreError> {
        match self.apply(id, create, &mut f).await {
            Err(_) if self.inner.degraded.breaker.is_open() => {}
            other => return other,
        }
        let now = self.inner.clock.now();
        let mut st = match self.inner.cache.get(id).and_then(|c| c.state.clone()) {
            Some(s) => s,
            None if create => UserState::new(self.inner.node.clone()),
            None => return Ok(None),
        };
        let before = st.published(id);
        let (r, change) = f(&mut st, now);
        self.inner.cache.put_local(id, st.clone());
        self.inner.degraded.dirty.lock().insert(id.clone());
        metrics::counter!(self.inner.bp.names().degraded_local_changes).increment(1);
        // Revision 0: not in the store yet (the write-back gives it one).
        let presence = st.view(id, now);
        self.emit(&change, &presence, before, now).await;
        Ok(Some((r, presence)))
    }

    /// Writes back the sessions of users changed while degraded (this node's memory is
    /// the truth for its own connections) and announces it.
    pub(super) async fn sync_dirty(&self) {
        let users: Vec<UserId> = self.inner.degraded.dirty.lock().drain().collect();
        if users.is_empty() {
            return;
        }
        let n = self.sync_users(&users).await;
        self.announce_sync(n).await;
    }

    /// Makes the store hold exactly this node's sessions of `users`; returns how many users
    /// were written. Failures go back to the dirty set for the next attempt.
    pub(super) async fn sync_users(&self, users: &[UserId]) -> usize {
        let node = self.inner.node.clone();
        let mut written = 0;
        for user in users {
            let held: Vec<Session> = self
                .inner
                .owned
                .lock()
                .all_of(user)
                .into_iter()
                .map(|(d, o)| Session {
                    device_id: d,
                    instance_id: o.instance,
                    connected_at: o.connected_at,
                    last_heartbeat: o.last_heartbeat,
                    expires_at: HELD,
                    ttl_ms: o.ttl_ms,
                    node_id: node.clone(),
                    platform: o.platform,
                    sid: o.sid,
                })
                .collect();
            if !held.is_empty() {
                match self.guarded(self.inner.bp.put(Space::Owners(&node), user.as_str(), Bytes::new())).await {
                    Ok(_) => wrote(&self.inner, "index"),
                    Err(_) => {
                        self.inner.degraded.dirty.lock().insert(user.clone());
                        continue;
                    }
                }
            }
            match self.apply(user, !held.is_empty(), |s, now| ((), s.sync_node(&node, &held, &node, now))).await {
                Ok(_) => written += 1,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "could not write back a user's sessions; will retry");
                    self.inner.degraded.dirty.lock().insert(user.clone());
                }
            }
        }
        written
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
