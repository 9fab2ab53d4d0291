//! Cross-node fan-out, routed by interest.
//!
//! A node subscribes only to the events of the users its local connections watch
//! (WebSocket subscriptions, the users connected here and the users whose contacts
//! include them, gRPC watch streams), as the bus's [`Interest`](crate::bus::Interest)
//! reports them, and drops the subscription with the last local watcher: the backend then
//! never sends this node a message about a user nobody here watches. A
//! `WatchPresence { all: true }` stream switches to every user's events while it lasts.
//!
//! Batched interest: a subscription per watched user costs the node about 13 KiB (the
//! client's per-subscription channel allocates its first block of 32 messages, plus a
//! forwarding task) and the engine one interest entry per node and user (10 contacts ×
//! 20,000 users is 200,000 per node). Above `store.interest_all_above` watched users
//! (1,000) a node takes every user's events through one wildcard subscription instead and
//! filters locally, which costs it the cluster's event rate; below half of it, back to
//! per-user.
//!
//! Snapshot reads wait until the subscriptions asked for before them are in place, so a
//! client that subscribes and then reads its snapshot misses no change in between. While
//! the feed takes every user's events they wait for nothing: the filter reads the bus's
//! interest as each event arrives, so a user watched a moment ago already passes it (at
//! 52 nodes on two cores, waiting for the relay's loop instead timed out 10,323 times in
//! one ramp). Before the wildcard goes, the loop applies every change made until then, so
//! the per-user subscriptions that replace it include the users nobody waited for.
//!
//! Typing indicators go to every node (they are ephemeral and never stored).
//!
//! Events are not replayed: an event published while this node's subscriptions were
//! down (a reconnect to the engine, a failover) never reaches it. When the backend says
//! its subscriptions are back ([`super::Backplane::resumed`]), this node drops its cached
//! states and catches up ([`ClusterStore::catch_up`]): it reads every user watched here
//! again and makes up the events of those whose stored state its watchers were not shown.
//! The order matters: subscribed first, then read, so a change is in the read or in an
//! event that follows it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::order::Shown;
use super::{unavailable, ClusterStore, Inner, WireEvent};
use crate::bus::{Interest, InterestChange, Typing};
use crate::core::{Event, EventKind, Presence, Status, UserId};
use crate::store::StoreError;

/// Watched users read at once by [`ClusterStore::catch_up`].
const CATCH_UP_CHUNK: usize = 256;

/// A typing indicator on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireTyping {
    node_id: String,
    conversation: String,
    user_id: String,
    is_typing: bool,
}

impl WireTyping {
    fn of(t: &Typing) -> WireTyping {
        WireTyping {
            node_id: t.node_id.to_string(),
            conversation: t.conversation.to_string(),
            user_id: t.user_id.to_string(),
            is_typing: t.is_typing,
        }
    }

    fn into_typing(self) -> Option<Typing> {
        Some(Typing {
            node_id: Arc::from(self.node_id),
            conversation: Arc::from(self.conversation),
            user_id: UserId::parse(&self.user_id, usize::MAX).ok()?,
            is_typing: self.is_typing,
        })
    }
}

/// The two fields that decide whether an event is for this node, read without decoding
/// the rest.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    #[serde(borrow)]
    node_id: &'a str,
}

/// Puts an event received from another node on the local bus. `filter`: while the feed
/// takes every user's events, an event about a user nobody here watches (per the bus's
/// interest, now) is dropped before it is decoded (at 52 nodes every node receives every
/// user's events, and decoding them all was most of a node's CPU during a connect ramp).
fn relay(inner: &Arc<Inner>, payload: &[u8], filter: bool) {
    let names = inner.bp.names();
    let peek = serde_json::from_slice::<Peek<'_>>(payload).ok();
    if peek.as_ref().is_some_and(|p| p.node_id == &*inner.node) {
        return; // our own event, already on the local bus
    }
    inner.counters.remote_events.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(names.events_received).increment(1);
    if let (Some(p), true) = (&peek, filter) {
        if !inner.bus.interest().is_watched(p.user_id) {
            return;
        }
    }
    match serde_json::from_slice::<WireEvent>(payload) {
        Ok(w) if w.presence.node_id != *inner.node => {
            if let Some(ev) = w.into_event() {
                // The cached state is older than this event: read it again next time.
                inner.cache.invalidate(&ev.presence.user_id);
                // Older than what this node already published or relayed: a late arrival.
                let now = inner.clock.now();
                {
                    let mut order = inner.order.lock();
                    if !order.admit(&ev.presence.user_id, ev.presence.revision, now) {
                        metrics::counter!(names.events_out_of_order).increment(1);
                        return;
                    }
                    order.show(&ev.presence);
                }
                // Anti-entropy: the store says a device is gone whose connection is live
                // here (one hash lookup per event, for users connected here).
                // (Not from an erasure: the user's sockets here are being closed.)
                if ev.kind != crate::core::EventKind::UserErased
                    && inner.owned.lock().missing_from(&ev.presence.user_id, &ev.presence.devices, now)
                {
                    ClusterStore { inner: inner.clone() }.repair(&ev.presence.user_id);
                }
                inner.bus.publish_relayed(ev);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, backend = names.backend, "ignoring an unreadable presence event"),
    }
}

/// Whether the feed should take every user's events for `watched` users: above
/// `threshold`, and (once on) until below half of it, so a count hovering at the threshold
/// does not flap. `0` never.
fn wants_all(now_all: bool, watched: usize, threshold: usize) -> bool {
    threshold > 0 && if now_all { watched > threshold / 2 } else { watched > threshold }
}

/// Tells the event order which users are watched here (see what
/// [`super::order::EventOrder`] keeps of what they were shown).
fn note_watch(inner: &std::sync::Weak<Inner>, change: &InterestChange) {
    let Some(inner) = inner.upgrade() else { return };
    match change {
        InterestChange::Watch(u) => inner.order.lock().watch(u, true),
        // Watched again since (the loop lags behind the interest): kept.
        InterestChange::Unwatch(u) if !inner.bus.interest().watches(u) => inner.order.lock().watch(u, false),
        InterestChange::Unwatch(_) => {}
        InterestChange::All(_) => {}
    }
}

/// Applies an interest change to the loop's copy only: while the feed takes every user's
/// events nothing is subscribed per user.
fn absorb(watched: &mut HashSet<UserId>, asked_all: &mut bool, change: InterestChange) {
    match change {
        InterestChange::Watch(u) => {
            watched.insert(u);
        }
        InterestChange::Unwatch(u) => {
            watched.remove(&u);
        }
        InterestChange::All(on) => *asked_all = on,
    }
}

/// Moves the feed to every user's events (`on`) or back to one subscription per watched
/// user; the new subscriptions are made before the old ones go, so nothing is missed.
/// Returns the feed's state, `None` when the wildcard could not be changed.
async fn switch_all(feed: &mut dyn super::backplane::Feed, on: bool, watched: &HashSet<UserId>) -> Option<bool> {
    if on {
        if let Err(e) = feed.watch_all(true).await {
            tracing::warn!(error = %e, "cannot subscribe to every user's events");
            return None;
        }
        for u in watched {
            feed.unwatch(u).await;
        }
        tracing::info!(watched = watched.len(), "interest: one subscription to every user's events");
    } else {
        for u in watched {
            if let Err(e) = feed.watch(u).await {
                tracing::warn!(user = %u, error = %e, "cannot subscribe to a watched user's events");
            }
        }
        if let Err(e) = feed.watch_all(false).await {
            tracing::warn!(error = %e, "cannot drop the subscription to every user's events");
        }
        tracing::info!(watched = watched.len(), "interest: one subscription per watched user");
    }
    Some(on)
}

impl ClusterStore {
    /// After each interruption of this node's subscriptions (see the module's doc): the
    /// cache is read through again and the events missed meanwhile made up.
    pub(super) fn follow_resumes(&self) {
        let mut resumed = self.inner.bp.resumed();
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            while resumed.changed().await.is_ok() {
                // Reads come from the cache while the breaker is open: the store answers
                // first (a call gets through after the back-off), then the cache goes.
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    if !inner.degraded.breaker.is_open() {
                        break;
                    }
                    drop(inner);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let Some(inner) = weak.upgrade() else { return };
                tracing::info!(backend = inner.bp.names().backend, "subscriptions back after an interruption: reading watched users again");
                inner.cache.invalidate_all();
                let store = ClusterStore { inner };
                store.catch_up().await;
            }
        });
        self.inner.tasks.lock().push(h);
    }

    /// Reads every user watched here again and, for each whose stored state is newer than
    /// what its watchers were shown and looks different, publishes an event locally (made
    /// up: its own was published while this node could not hear it). Each such user is
    /// sent once, through the path every event takes (WebSocket pushes, rooms, gRPC
    /// streams).
    ///
    /// Users this node is writing back (changed here while cut off), and users with a
    /// live connection here that the store does not show, are left to the write-back and
    /// the repair: their events follow from those.
    ///
    /// A record missing from the store may have been lost with its data (a Redis
    /// restarted empty): the nodes holding the user's sessions write them again when they
    /// find their lease lost, within a lease period. A user shown online whose record is
    /// missing is made up offline only if it is still missing then (and nothing showed
    /// the user anything else meanwhile).
    pub(super) async fn catch_up(&self) {
        let all = self.inner.order.lock().shown();
        let interest = self.inner.bus.interest();
        let (shown, stale): (Vec<_>, Vec<_>) = all.into_iter().partition(|(u, _)| interest.watches(u));
        {
            // Entries of users no longer watched (a read that raced the last unwatch).
            let mut order = self.inner.order.lock();
            for (u, _) in &stale {
                if !interest.watches(u) {
                    order.watch(u, false);
                }
            }
        }
        let ids: Vec<UserId> = shown.into_iter().filter(|(_, s)| s.is_some()).map(|(u, _)| u).collect();
        let mut missing = Vec::new();
        let mut made = 0;
        for chunk in ids.chunks(CATCH_UP_CHUNK) {
            let before: Vec<Option<Shown>> = chunk.iter().map(|u| self.inner.order.lock().shown_of(u)).collect();
            let found = self.read_for_catch_up(chunk).await;
            for ((user, p), shown) in chunk.iter().zip(found).zip(before) {
                let Some(shown) = shown else { continue };
                match p {
                    Some(p) if shown.missed(&p) => made += usize::from(self.make_up(p, shown)),
                    None if shown.online => missing.push((user.clone(), shown)),
                    _ => {}
                }
            }
        }
        if !missing.is_empty() {
            let wait = self.inner.opts.lease_ttl_ms + 2 * self.inner.opts.tick_ms;
            tokio::time::sleep(std::time::Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
            for chunk in missing.chunks(CATCH_UP_CHUNK) {
                let ids: Vec<UserId> = chunk.iter().map(|(u, _)| u.clone()).collect();
                let found = self.read_for_catch_up(&ids).await;
                for ((user, shown), p) in chunk.iter().zip(found) {
                    match p {
                        Some(p) if shown.missed(&p) => made += usize::from(self.make_up(p, *shown)),
                        None => made += usize::from(self.make_up(Presence::unknown(user.clone(), self.inner.node.clone()), *shown)),
                        _ => {}
                    }
                }
            }
        }
        metrics::counter!(self.inner.bp.names().made_up).increment(made as u64);
        tracing::info!(watched = ids.len(), made_up = made, "caught up after the interruption");
    }

    /// Reads `ids` from the store itself: retried until it answers with the breaker
    /// closed (a read while it is open comes from the cache, emptied for the catch-up:
    /// every user would read as missing).
    async fn read_for_catch_up(&self, ids: &[UserId]) -> Vec<Option<Presence>> {
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            match self.read_many(ids, true).await {
                Ok(found) if !self.inner.degraded.breaker.is_open() => return found,
                Ok(_) => tracing::debug!(attempt, "the store went away during the catch-up's read; reading again"),
                Err(e) => tracing::warn!(error = %e, attempt, "could not read watched users after an interruption; retrying"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(attempt.min(5))).await;
        }
    }

    /// Publishes `p` locally as an event whose own did not reach this node, unless what
    /// the user's watchers were shown changed since `shown` was taken (a newer event came
    /// meanwhile), the user is being written back from here, or the store lost a live
    /// session of theirs here (repaired instead: its write publishes).
    fn make_up(&self, p: Presence, shown: Shown) -> bool {
        let now = self.inner.clock.now();
        let user = p.user_id.clone();
        if self.inner.degraded.dirty.lock().contains(&user) {
            return false;
        }
        if self.inner.owned.lock().missing_from(&user, &p.devices, now) {
            self.repair(&user);
            return false;
        }
        {
            let mut order = self.inner.order.lock();
            if order.shown_of(&user) != Some(shown) || !order.admit(&user, p.revision, now) {
                return false; // its own event, or a newer one, arrived meanwhile
            }
            order.show(&p);
        }
        let online = p.status != Status::Offline;
        let kind = match (online, shown.online) {
            (false, _) => EventKind::UserOffline,
            (true, false) => EventKind::UserOnline,
            (true, true) => EventKind::PresenceUpdated,
        };
        // What the watchers had is known in brief only: each who sees the user differently
        // now than an opposite status would show is told.
        let before = match (online, shown.online) {
            (true, _) => Presence { status: Status::Offline, appear_offline: false, ..p.clone() },
            (false, true) => Presence { status: Status::Online, appear_offline: false, ..p.clone() },
            (false, false) => p.clone(),
        };
        self.inner.degraded.shown.lock().remove(&user);
        self.inner.bus.publish_relayed(Event { kind, presence: p, before, at: now });
        true
    }

    /// Follows the bus's interest with subscriptions and relays what arrives.
    pub(super) async fn relay_remote_events(&self) -> Result<(), StoreError> {
        let mut interest = self.inner.bus.interest().follow();
        let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
        let mut feed = self.inner.bp.feed(tx).await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let threshold = self.inner.opts.interest_all_above;
        let bus_interest: Interest = self.inner.bus.interest().clone();
        let h = tokio::spawn(async move {
            let mut watched: HashSet<UserId> = HashSet::new();
            // A `WatchPresence { all: true }` stream asked for every user's events.
            let mut asked_all = false;
            // The feed takes every user's events (asked, or above the threshold).
            let mut all = false;
            loop {
                tokio::select! {
                    first = interest.recv() => {
                        let Some(first) = first else { return };
                        let mut batch = VecDeque::from([first]);
                        while let Ok(more) = interest.try_recv() {
                            batch.push_back(more);
                        }
                        let mut last = 0;
                        while let Some((seq, change)) = batch.pop_front() {
                            last = seq;
                            note_watch(&weak, &change);
                            match change {
                                InterestChange::Watch(u) => {
                                    if watched.insert(u.clone()) && !all {
                                        if let Err(e) = feed.watch(&u).await {
                                            tracing::warn!(user = %u, error = %e, "cannot subscribe to a watched user's events");
                                        }
                                    }
                                }
                                InterestChange::Unwatch(u) => {
                                    if watched.remove(&u) && !all {
                                        feed.unwatch(&u).await;
                                    }
                                }
                                InterestChange::All(on) => asked_all = on,
                            }
                            // Batched interest: past the threshold one wildcard replaces
                            // the per-user subscriptions (and back below half of it).
                            let mut want = asked_all || wants_all(all, watched.len(), threshold);
                            if all && !want {
                                // Readers wait again from now on; the changes of those that
                                // did not are applied before the wildcard goes.
                                let upto = bus_interest.set_at_once(false);
                                while last < upto {
                                    let next = match batch.pop_front() {
                                        Some(n) => n,
                                        None => match interest.recv().await {
                                            Some(n) => n,
                                            None => return,
                                        },
                                    };
                                    last = next.0;
                                    note_watch(&weak, &next.1);
                                    absorb(&mut watched, &mut asked_all, next.1);
                                }
                                want = asked_all || wants_all(all, watched.len(), threshold);
                            }
                            if want != all {
                                all = switch_all(&mut *feed, want, &watched).await.unwrap_or(all);
                                if let Some(inner) = weak.upgrade() {
                                    inner.counters.interest_all.store(all, Ordering::Relaxed);
                                    metrics::gauge!(inner.bp.names().interest_all).set(if all { 1.0 } else { 0.0 });
                                }
                            }
                        }
                        // The server has the subscriptions once it confirms them.
                        feed.settle().await;
                        // Every user's events arrive (confirmed): readers need not wait.
                        bus_interest.set_at_once(all);
                        let Some(inner) = weak.upgrade() else { return };
                        inner.counters.watched.store(watched.len() as u64, Ordering::Relaxed);
                        metrics::gauge!(inner.bp.names().interest_users).set(watched.len() as f64);
                        inner.interest_applied.send_replace(last);
                    }
                    Some(msg) = rx.recv() => {
                        let Some(inner) = weak.upgrade() else { return };
                        relay(&inner, &msg, all && !asked_all);
                    }
                }
            }
        });
        self.inner.tasks.lock().push(h);
        Ok(())
    }

    /// Waits until the subscriptions asked for so far are in place (normally well under a
    /// millisecond; at most the request timeout on a starved machine).
    pub(super) async fn interest_settled(&self) {
        // Taking every user's events: nothing to wait for.
        let Some(want) = self.inner.bus.interest().seq_to_wait_for() else { return };
        let mut rx = self.inner.interest_applied.subscribe();
        if *rx.borrow() >= want {
            return;
        }
        metrics::counter!(self.inner.bp.names().interest_waits).increment(1);
        if tokio::time::timeout(self.inner.opts.kv_timeout, rx.wait_for(|applied| *applied >= want)).await.is_err() {
            tracing::warn!("subscriptions for newly watched users not confirmed in time; a change made meanwhile may be missed");
        }
    }

    /// Relays typing indicators: local ones out, other nodes' in.
    pub(super) async fn relay_typing(&self) -> Result<(), StoreError> {
        let mut local = self.inner.bus.subscribe_typing();
        let bp = self.inner.bp.clone();
        let node = self.inner.node.clone();
        let out = tokio::spawn(async move {
            loop {
                match local.recv().await {
                    Ok(t) if t.node_id == node => {
                        if let Ok(body) = serde_json::to_vec(&WireTyping::of(&t)) {
                            if let Err(e) = bp.publish_typing(&t.conversation, body.into()).await {
                                tracing::debug!(error = %e, "could not relay a typing indicator");
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut sub = self.inner.bp.subscribe_typing().await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let inbound = tokio::spawn(async move {
            while let Some(payload) = sub.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                match serde_json::from_slice::<WireTyping>(&payload).map(WireTyping::into_typing) {
                    Ok(Some(t)) if t.node_id != inner.node => inner.bus.publish_typing(t),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "ignoring an unreadable typing indicator"),
                }
            }
        });
        self.inner.tasks.lock().extend([out, inbound]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::wants_all;

    #[test]
    fn batched_interest_switches_above_the_threshold_and_back_below_half() {
        assert!(!wants_all(false, 1000, 1000));
        assert!(wants_all(false, 1001, 1000));
        assert!(wants_all(true, 600, 1000), "stays on between half and the threshold");
        assert!(!wants_all(true, 500, 1000));
        assert!(!wants_all(false, 1_000_000, 0), "0: always per user");
    }
}
