//! One user's presence state and every transition on it: the aggregation rule, session
//! liveness, explicit-status TTL, and which event (if any) a transition produces.
//!
//! Pure: every method takes `now`; no clocks, locks or tasks. Stores call these methods
//! under their own concurrency control (a shard lock in memory, a CAS loop on NATS KV).
//!
//! # The aggregation rule
//! 1. An explicitly set status (`online`/`away`/`busy`/`offline`, with its message) wins
//!    while its TTL lasts (or forever when it has none).
//! 2. Otherwise the user is `online` if at least one device session is alive.
//! 3. Otherwise `offline`.

use std::sync::Arc;

use super::event::EventKind;
use super::model::{empty_message, DeviceId, Millis, Presence, Session, Status, UserId};

/// Stored expiry of a session held by its node's lease (cluster mode): it lives until the
/// owning node ends it or the node's lease lapses and the janitor does.
pub const HELD: Millis = Millis::MAX;

/// A status the user set on purpose.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Explicit {
    pub status: Status,
    pub message: Arc<str>,
    pub set_at: Millis,
    /// `None`: until changed.
    pub expires_at: Option<Millis>,
}

impl Explicit {
    fn live(&self, now: Millis) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// Everything the service knows about one user (cluster mode stores it as one KV value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserState {
    pub explicit: Option<Explicit>,
    /// Device sessions; a handful per user, so a small vector beats a map.
    pub sessions: Vec<Session>,
    pub last_seen: Option<Millis>,
    pub updated_at: Option<Millis>,
    pub node_id: Arc<str>,
}

/// What a transition did, for the caller to publish and persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The event to publish; `None` when nothing a reader can see changed.
    pub event: Option<EventKind>,
    /// Visible status before the transition.
    pub previous: Status,
    /// Whether the durable part (explicit status, last_seen at disconnect) changed.
    pub persist: bool,
}

/// The parts of a state whose change is an event. A new expiry time for the same status
/// and message (a client re-asserting its status) is stored but is not an event.
#[derive(PartialEq, Eq)]
struct Visible {
    status: Status,
    message: Arc<str>,
    online: bool,
}

impl Visible {
    fn of(explicit: Option<&Explicit>, online: bool) -> Visible {
        match explicit {
            Some(e) => Visible { status: e.status, message: e.message.clone(), online },
            None => Visible { status: if online { Status::Online } else { Status::Offline }, message: empty_message(), online },
        }
    }
}

/// Result of registering a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// `false` when the device already had a session (which was replaced).
    pub created: bool,
    pub expires_at: Millis,
}

impl UserState {
    pub fn new(node_id: Arc<str>) -> UserState {
        UserState { explicit: None, sessions: Vec::new(), last_seen: None, updated_at: None, node_id }
    }

    /// The explicit status if it is still in force at `now`.
    pub fn live_explicit(&self, now: Millis) -> Option<&Explicit> {
        self.explicit.as_ref().filter(|e| e.live(now))
    }

    /// Sessions still alive at `now` (a reaper may not have removed expired ones yet).
    pub fn live_sessions(&self, now: Millis) -> impl Iterator<Item = &Session> {
        self.sessions.iter().filter(move |s| s.expires_at > now)
    }

    /// Applies the aggregation rule at `now`. Reads evaluate the rule themselves, so an
    /// expired status or session is never shown even if the reaper has not run yet.
    pub fn view(&self, user_id: &UserId, now: Millis) -> Presence {
        let device_count = self.live_sessions(now).count() as u32;
        let (status, message, expires_at) = match self.live_explicit(now) {
            Some(e) => (e.status, e.message.clone(), e.expires_at),
            None if device_count > 0 => (Status::Online, empty_message(), None),
            None => (Status::Offline, empty_message(), None),
        };
        Presence {
            user_id: user_id.clone(),
            status,
            message,
            last_seen: self.last_seen,
            updated_at: self.updated_at,
            node_id: self.node_id.clone(),
            expires_at,
            device_count,
        }
    }

    fn visible(&self, now: Millis) -> Visible {
        Visible::of(self.live_explicit(now), self.live_sessions(now).next().is_some())
    }

    /// Runs `op`, then decides the event by comparing what a reader saw before (as last
    /// published) with what a reader sees after.
    fn transition(&mut self, node: &Arc<str>, now: Millis, persist: bool, op: impl FnOnce(&mut Self) -> bool) -> Change {
        let before = self.visible_as_stored();
        let explicit_before = self.explicit.is_some();
        let expired = op(self);
        let after = self.visible(now);
        let explicit_expired = expired && explicit_before && self.explicit.is_none();
        let event = if before.online != after.online {
            Some(if after.online { EventKind::UserOnline } else { EventKind::UserOffline })
        } else if explicit_expired {
            Some(EventKind::PresenceExpired)
        } else if before != after {
            Some(EventKind::PresenceUpdated)
        } else {
            None
        };
        if event.is_some() {
            self.updated_at = Some(now);
            self.node_id = node.clone();
        }
        Change { event, previous: before.status, persist: persist || explicit_expired }
    }

    /// The visible state as last published: everything stored counts as live, because
    /// lapsed parts are only removed by [`UserState::expire`], which reports them itself.
    fn visible_as_stored(&self) -> Visible {
        Visible::of(self.explicit.as_ref(), !self.sessions.is_empty())
    }

    /// Removes what has lapsed at `now`: expired sessions and an expired explicit status.
    /// Returns whether anything was removed.
    fn drop_lapsed(&mut self, now: Millis) -> bool {
        let n = self.sessions.len();
        let mut last = self.last_seen;
        self.sessions.retain(|s| {
            let live = s.expires_at > now;
            if !live {
                last = last.max(Some(s.last_heartbeat));
            }
            live
        });
        self.last_seen = last;
        let sessions_dropped = self.sessions.len() != n;
        let explicit_dropped = self.explicit.as_ref().is_some_and(|e| !e.live(now));
        if explicit_dropped {
            self.explicit = None;
        }
        sessions_dropped || explicit_dropped
    }

    /// Sets an explicit status. `ttl_ms: None` keeps it until changed.
    pub fn set_status(&mut self, status: Status, message: Arc<str>, ttl_ms: Option<i64>, node: &Arc<str>, now: Millis) -> Change {
        self.transition(node, now, true, |s| {
            let lapsed = s.drop_lapsed(now);
            s.explicit = Some(Explicit { status, message, set_at: now, expires_at: ttl_ms.map(|t| now.saturating_add(t)) });
            s.last_seen = Some(now);
            lapsed
        })
    }

    /// Clears the explicit status so the derived one applies again.
    pub fn clear_status(&mut self, node: &Arc<str>, now: Millis) -> Change {
        self.transition(node, now, true, |s| {
            let lapsed = s.drop_lapsed(now);
            s.explicit = None;
            lapsed
        })
    }

    /// Registers (or replaces) the session of `device`; the user goes online if it was not.
    pub fn register(&mut self, device: DeviceId, instance: Arc<str>, ttl_ms: i64, node: &Arc<str>, now: Millis) -> (Registered, Change) {
        let expires_at = now.saturating_add(ttl_ms);
        let known_before = self.updated_at.is_some() || self.last_seen.is_some();
        let mut created = true;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let session = Session {
                device_id: device.clone(),
                instance_id: instance,
                connected_at: now,
                last_heartbeat: now,
                expires_at,
                ttl_ms,
                node_id: node.clone(),
            };
            match s.sessions.iter_mut().find(|x| x.device_id == device) {
                Some(existing) => {
                    created = false;
                    *existing = session;
                }
                None => s.sessions.push(session),
            }
            s.last_seen = Some(now);
            lapsed
        });
        (Registered { created, expires_at }, Change { persist: change.persist || !known_before, ..change })
    }

    /// Extends a live session by its TTL. `None` when the device has no live session
    /// (never registered, unregistered or expired): the caller must register again.
    /// Produces no event: a heartbeat changes nothing a reader can see.
    pub fn refresh(&mut self, device: &str, now: Millis) -> Option<Millis> {
        let s = self.sessions.iter_mut().find(|s| &*s.device_id == device && s.expires_at > now)?;
        s.last_heartbeat = now;
        s.expires_at = now.saturating_add(s.ttl_ms);
        let expires_at = s.expires_at;
        self.last_seen = Some(now);
        Some(expires_at)
    }

    /// Removes the session of `device`. The user goes offline only if no device remains.
    pub fn unregister(&mut self, device: &str, node: &Arc<str>, now: Millis) -> (bool, Change) {
        let mut removed = false;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let n = s.sessions.len();
            s.sessions.retain(|x| &*x.device_id != device);
            removed = s.sessions.len() != n;
            if removed {
                s.last_seen = Some(now);
            }
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        (removed, Change { persist, ..change })
    }

    /// Marks the session of `device` as held by `owner`'s node lease (cluster mode): its
    /// stored expiry becomes [`HELD`] and the owning node keeps the real deadline in
    /// memory, so heartbeats cost no store write. Returns whether the session exists.
    pub fn hold(&mut self, device: &str, owner: &Arc<str>) -> bool {
        match self.sessions.iter_mut().find(|s| &*s.device_id == device) {
            Some(s) => {
                s.expires_at = HELD;
                s.node_id = owner.clone();
                true
            }
            None => false,
        }
    }

    /// Ends the session of `device` if `owner` still holds it (its deadline passed on the
    /// owning node, or the owner is gone). `last_seen` is the session's last heartbeat.
    pub fn release(&mut self, device: &str, owner: &str, last_seen: Millis, node: &Arc<str>, now: Millis) -> (bool, Change) {
        self.release_where(|s| &*s.device_id == device && &*s.node_id == owner, last_seen, node, now)
    }

    /// Ends every session `owner` held that started at or before `until` (the janitor
    /// after a node's lease lapsed; `until` keeps a newer incarnation's sessions).
    pub fn release_node(&mut self, owner: &str, until: Millis, last_seen: Millis, node: &Arc<str>, now: Millis) -> Change {
        self.release_where(|s| &*s.node_id == owner && s.connected_at <= until, last_seen, node, now).1
    }

    fn release_where(&mut self, doomed: impl Fn(&Session) -> bool, last_seen: Millis, node: &Arc<str>, now: Millis) -> (bool, Change) {
        let mut removed = false;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let n = s.sessions.len();
            s.sessions.retain(|x| !doomed(x));
            removed = s.sessions.len() != n;
            if removed {
                s.last_seen = s.last_seen.max(Some(last_seen));
            }
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        (removed, Change { persist, ..change })
    }

    /// Makes the sessions `owner` holds exactly `held` (after the owner was cut off: what
    /// it kept in memory is the truth for its own connections). Others' sessions stay.
    pub fn sync_node(&mut self, owner: &Arc<str>, held: &[Session], node: &Arc<str>, now: Millis) -> Change {
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let before = s.sessions.len();
            s.sessions.retain(|x| x.node_id != *owner || held.iter().any(|h| h.device_id == x.device_id));
            let mut last = s.last_seen;
            if s.sessions.len() != before {
                last = last.max(Some(now));
            }
            for h in held {
                match s.sessions.iter_mut().find(|x| x.device_id == h.device_id) {
                    Some(x) if x.node_id == *owner => {}
                    Some(x) => *x = h.clone(),
                    None => s.sessions.push(h.clone()),
                }
                last = last.max(Some(h.last_heartbeat));
            }
            s.last_seen = last;
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        Change { persist, ..change }
    }

    /// Records a heartbeat of a held session in the stored state (at most once per
    /// `presence.last_seen_interval`). Returns whether the session exists.
    pub fn touch(&mut self, device: &str, at: Millis) -> bool {
        match self.sessions.iter_mut().find(|s| &*s.device_id == device) {
            Some(s) => {
                s.last_heartbeat = s.last_heartbeat.max(at);
                self.last_seen = self.last_seen.max(Some(at));
                true
            }
            None => false,
        }
    }

    /// Reaper entry point: drops what has lapsed at `now` and reports the transition.
    pub fn expire(&mut self, node: &Arc<str>, now: Millis) -> Change {
        let change = self.transition(node, now, false, |s| s.drop_lapsed(now));
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        Change { persist, ..change }
    }

    /// The earliest instant at which something in this state lapses, for timer scheduling.
    pub fn next_deadline(&self) -> Option<Millis> {
        let sessions = self.sessions.iter().map(|s| s.expires_at).filter(|t| *t != HELD).min();
        let explicit = self.explicit.as_ref().and_then(|e| e.expires_at);
        match (sessions, explicit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the state holds nothing worth keeping in memory or on disk.
    pub fn is_empty(&self) -> bool {
        self.explicit.is_none() && self.sessions.is_empty() && self.last_seen.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: i64 = 60_000;

    fn node() -> Arc<str> {
        Arc::from("n1")
    }
    fn uid() -> UserId {
        UserId::parse("alice", 64).unwrap()
    }
    fn dev(s: &str) -> DeviceId {
        Arc::from(s)
    }

    #[test]
    fn held_sessions_never_lapse_and_release_goes_offline_once() {
        let mut s = UserState::new(node());
        let a: Arc<str> = Arc::from("node-a");
        s.register(dev("phone"), Arc::from("gw"), TTL, &a, 0);
        s.register(dev("laptop"), Arc::from("gw"), TTL, &a, 0);
        assert!(s.hold("phone", &a) && s.hold("laptop", &a));
        assert!(!s.hold("tablet", &a));
        // Far past the TTL the held sessions are still live; no timer is due.
        assert_eq!(s.view(&uid(), TTL * 1000).device_count, 2);
        assert_eq!(s.next_deadline(), None);
        // Another node cannot release what it does not hold.
        assert!(!s.release("phone", "node-b", 5, &node(), 10).0);
        let (removed, c) = s.release("phone", "node-a", 5, &node(), 10);
        assert!(removed);
        assert_eq!(c.event, None, "one device left: still online");
        let (removed, c) = s.release("laptop", "node-a", 7, &node(), 20);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.last_seen, Some(7), "last_seen is the last heartbeat");
        assert_eq!(s.release("laptop", "node-a", 9, &node(), 30).1.event, None, "released twice: no second event");
    }

    #[test]
    fn release_node_keeps_newer_incarnations_and_other_nodes() {
        let mut s = UserState::new(node());
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        s.register(dev("old"), Arc::from("gw"), TTL, &a, 10);
        s.register(dev("other"), Arc::from("gw"), TTL, &b, 10);
        s.register(dev("new"), Arc::from("gw"), TTL, &a, 500);
        for d in ["old", "other", "new"] {
            let owner = if d == "other" { &b } else { &a };
            s.hold(d, owner);
        }
        let c = s.release_node("a", 100, 90, &node(), 600);
        assert_eq!(c.event, None);
        let left: Vec<&str> = s.sessions.iter().map(|x| &*x.device_id).collect();
        assert_eq!(left, vec!["other", "new"]);
        assert_eq!(s.last_seen, Some(500), "last_seen never moves back");
        s.release_node("b", 100, 95, &node(), 600);
        let c = s.release_node("a", 1000, 650, &node(), 700);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.last_seen, Some(650));
    }

    #[test]
    fn sync_node_adds_what_the_owner_holds_and_drops_what_it_does_not() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let held = |d: &str, at: Millis| Session {
            device_id: dev(d),
            instance_id: Arc::from("gw"),
            connected_at: at,
            last_heartbeat: at,
            expires_at: HELD,
            ttl_ms: TTL,
            node_id: a.clone(),
        };
        let mut s = UserState::new(node());
        // Offline in the store (the janitor ended a's sessions); a still holds two.
        let c = s.sync_node(&a, &[held("phone", 10), held("web", 20)], &node(), 100);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        assert_eq!(s.view(&uid(), 1000).device_count, 2);
        // Another node's session is left alone; a's dropped device goes.
        s.register(dev("tablet"), Arc::from("gw"), TTL, &b, 150);
        let c = s.sync_node(&a, &[held("web", 20)], &node(), 200);
        assert_eq!(c.event, None);
        let mut left: Vec<&str> = s.sessions.iter().map(|x| &*x.device_id).collect();
        left.sort();
        assert_eq!(left, vec!["tablet", "web"]);
        // Nothing changes when the store already agrees.
        let before = s.clone();
        assert_eq!(s.sync_node(&a, &[held("web", 20)], &node(), 300).event, None);
        assert_eq!(s.sessions, before.sessions);
        s.release_node("b", 1000, 250, &node(), 400);
        assert_eq!(s.sync_node(&a, &[], &node(), 500).event, Some(EventKind::UserOffline));
    }

    #[test]
    fn touch_records_the_heartbeat_without_an_event() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), TTL, &node(), 0);
        s.hold("phone", &node());
        let before = s.clone();
        assert!(s.touch("phone", 40));
        assert_eq!(s.sessions[0].last_heartbeat, 40);
        assert_eq!(s.last_seen, Some(40));
        assert_eq!(s.view(&uid(), 50).status, before.view(&uid(), 50).status);
        assert!(!s.touch("tablet", 50));
    }

    #[test]
    fn unknown_state_is_offline() {
        let s = UserState::new(node());
        let p = s.view(&uid(), 0);
        assert_eq!(p.status, Status::Offline);
        assert_eq!(p.device_count, 0);
        assert_eq!(p.last_seen, None);
    }

    #[test]
    fn first_session_goes_online_second_is_silent() {
        let mut s = UserState::new(node());
        let (r, c) = s.register(dev("phone"), Arc::from("gw1"), TTL, &node(), 1_000);
        assert!(r.created);
        assert_eq!(r.expires_at, 61_000);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        assert_eq!(c.previous, Status::Offline);
        let (r2, c2) = s.register(dev("laptop"), Arc::from("gw2"), TTL, &node(), 2_000);
        assert!(r2.created);
        assert_eq!(c2.event, None, "a second device is not a visible change");
        let p = s.view(&uid(), 2_000);
        assert_eq!((p.status, p.device_count), (Status::Online, 2));
        assert_eq!(p.updated_at, Some(1_000));
        // Re-registering the same device replaces it.
        let (r3, c3) = s.register(dev("laptop"), Arc::from("gw3"), TTL, &node(), 3_000);
        assert!(!r3.created);
        assert_eq!(c3.event, None);
        assert_eq!(s.sessions.len(), 2);
    }

    #[test]
    fn offline_only_when_last_device_leaves() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), TTL, &node(), 0);
        s.register(dev("laptop"), Arc::from("gw"), TTL, &node(), 0);
        let (removed, c) = s.unregister("phone", &node(), 10);
        assert!(removed);
        assert_eq!(c.event, None);
        let (removed, c) = s.unregister("laptop", &node(), 20);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert!(c.persist, "last_seen at disconnect is durable");
        let p = s.view(&uid(), 20);
        assert_eq!(p.status, Status::Offline);
        assert_eq!(p.last_seen, Some(20));
        let (removed, c) = s.unregister("laptop", &node(), 30);
        assert!(!removed);
        assert_eq!(c.event, None, "no-op unregister emits nothing");
    }

    #[test]
    fn refresh_extends_and_expiry_takes_user_offline_with_last_heartbeat() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), TTL, &node(), 0);
        assert_eq!(s.refresh("phone", 50_000), Some(110_000));
        assert_eq!(s.refresh("tablet", 50_000), None);
        // Nothing lapses before the deadline.
        assert_eq!(s.expire(&node(), 109_999).event, None);
        assert_eq!(s.next_deadline(), Some(110_000));
        // A read after the deadline already shows offline, even before the reaper runs.
        assert_eq!(s.view(&uid(), 110_000).status, Status::Offline);
        let c = s.expire(&node(), 110_500);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.last_seen, Some(50_000), "last_seen is the last heartbeat, not the reap time");
        assert_eq!(s.refresh("phone", 110_600), None, "an expired session must be registered again");
    }

    #[test]
    fn refresh_of_a_lapsed_but_unreaped_session_is_refused() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), 1_000, &node(), 0);
        assert_eq!(s.refresh("phone", 1_000), None);
    }

    #[test]
    fn explicit_status_wins_then_reverts_with_expiry_event() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), TTL, &node(), 0);
        let c = s.set_status(Status::Busy, Arc::from("In a meeting"), Some(3_600), &node(), 100);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        assert_eq!(c.previous, Status::Online);
        assert!(c.persist);
        let p = s.view(&uid(), 200);
        assert_eq!((p.status, &*p.message, p.expires_at), (Status::Busy, "In a meeting", Some(3_700)));
        // Explicit status survives the device going away.
        let (_, c) = s.unregister("phone", &node(), 300);
        assert_eq!(c.event, Some(EventKind::UserOffline), "connectivity transitions are reported");
        assert_eq!(s.view(&uid(), 300).status, Status::Busy);
        // TTL lapses: reverts to derived (offline) with an expiry event.
        let c = s.expire(&node(), 3_700);
        assert_eq!(c.event, Some(EventKind::PresenceExpired));
        assert_eq!(c.previous, Status::Busy);
        assert!(c.persist);
        let p = s.view(&uid(), 3_700);
        assert_eq!((p.status, &*p.message, p.expires_at), (Status::Offline, "", None));
        assert_eq!(p.updated_at, Some(3_700));
    }

    #[test]
    fn expiry_reverts_to_online_when_a_device_is_connected() {
        let mut s = UserState::new(node());
        s.register(dev("phone"), Arc::from("gw"), TTL, &node(), 0);
        s.set_status(Status::Away, Arc::from(""), Some(1_000), &node(), 0);
        let c = s.expire(&node(), 1_000);
        assert_eq!(c.event, Some(EventKind::PresenceExpired));
        assert_eq!(s.view(&uid(), 1_000).status, Status::Online);
    }

    #[test]
    fn same_status_twice_is_a_no_op() {
        let mut s = UserState::new(node());
        let c = s.set_status(Status::Away, Arc::from("lunch"), None, &node(), 0);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        let c = s.set_status(Status::Away, Arc::from("lunch"), None, &node(), 10);
        assert_eq!(c.event, None);
        assert_eq!(s.view(&uid(), 10).updated_at, Some(0));
        // Re-asserting with a TTL extends it, stores it, but is not an event.
        let c = s.set_status(Status::Away, Arc::from("lunch"), Some(60_000), &node(), 15);
        assert_eq!(c.event, None);
        assert!(c.persist);
        assert_eq!(s.view(&uid(), 15).expires_at, Some(60_015));
        let c = s.set_status(Status::Away, Arc::from("back at 2"), None, &node(), 20);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        // Explicit `online` while connected: the status is the same but the message shows.
        s.register(dev("d"), Arc::from("gw"), TTL, &node(), 30);
        let c = s.set_status(Status::Online, Arc::from(""), None, &node(), 40);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "away -> online");
        let c = s.clear_status(&node(), 50);
        assert_eq!(c.event, None, "explicit online with no message == derived online");
    }

    #[test]
    fn explicit_offline_hides_a_connected_user() {
        let mut s = UserState::new(node());
        s.register(dev("d"), Arc::from("gw"), TTL, &node(), 0);
        s.set_status(Status::Offline, Arc::from(""), None, &node(), 1);
        let p = s.view(&uid(), 2);
        assert_eq!(p.status, Status::Offline);
        assert_eq!(p.device_count, 1);
    }

    #[test]
    fn session_and_status_lapsing_together_is_one_offline_event() {
        let mut s = UserState::new(node());
        s.register(dev("d"), Arc::from("gw"), 1_000, &node(), 0);
        s.set_status(Status::Busy, Arc::from("x"), Some(1_000), &node(), 0);
        let c = s.expire(&node(), 5_000);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert!(c.persist);
        assert!(s.explicit.is_none() && s.sessions.is_empty());
        assert_eq!(s.expire(&node(), 6_000).event, None, "nothing left to expire");
    }

    #[test]
    fn first_registration_is_persisted_so_the_user_is_known_after_restart() {
        let mut s = UserState::new(node());
        let (_, c) = s.register(dev("d"), Arc::from("gw"), TTL, &node(), 0);
        assert!(c.persist);
        let (_, c) = s.register(dev("e"), Arc::from("gw"), TTL, &node(), 1);
        assert!(!c.persist, "later registrations are ephemeral");
    }
}
