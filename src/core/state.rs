//! One user's presence state and every transition on it: the aggregation rule, session
//! liveness, explicit-status TTL, and which event (if any) a transition produces.
//!
//! Pure: every method takes `now`; no clocks, locks or tasks. Stores call these methods
//! under their own concurrency control (a shard lock in memory, a CAS loop on NATS KV).
//!
//! # The aggregation rule
//! 1. While at least one device session is alive: the explicit status (with its message)
//!    if one is in force, else `online`. An explicit status set while the user is
//!    connected is a *preference*: it shows only while a device is live.
//! 2. With no live session: `offline`, with `last_seen`; the preference is kept and
//!    shows again when a device reconnects, until its TTL runs out or it is cleared.
//! 3. Except: a status written while the user had no live session at all (a REST-only
//!    client, a backend setting `busy` from a calendar) shows as written, until a device
//!    that connects later goes away again (whichever happened last wins).
//!
//! An explicit `offline` ("appear offline") hides a connected user: everyone but the
//! user sees them as a hidden user (see [`crate::core::privacy::project`]).

use std::sync::Arc;

use super::event::EventKind;
use super::model::{empty_message, no_devices, DeviceId, DeviceSummary, Millis, Platform, Presence, Session, Status, UserId};

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
    /// Written while the user had no live session: shown as written until a device that
    /// connects later goes away again. Otherwise the status is a preference, shown only
    /// while a device is live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standalone: bool,
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

impl Change {
    /// A change that shows nothing and stores nothing durable.
    pub fn none() -> Change {
        Change { event: None, previous: Status::Offline, persist: false }
    }
}

/// The parts of a state whose change is an event. A new expiry time for the same status
/// and message (a client re-asserting its status) is stored but is not an event; nor is
/// a heartbeat (`last_seen`).
#[derive(PartialEq, Eq)]
struct Visible {
    status: Status,
    message: Arc<str>,
    online: bool,
    devices: Vec<(DeviceId, Option<Platform>)>,
    appear_offline: bool,
}

/// The explicit status readers are shown, given how many sessions are live and whether
/// any session is stored at all (a standalone status shows only while none is).
fn shown(explicit: Option<&Explicit>, live: usize, stored: usize) -> Option<&Explicit> {
    explicit.filter(|e| live > 0 || (e.standalone && stored == 0))
}

impl Visible {
    fn of<'a>(explicit: Option<&Explicit>, sessions: impl Iterator<Item = &'a Session>, stored: usize) -> Visible {
        let mut devices: Vec<(DeviceId, Option<Platform>)> = sessions.map(|s| (s.device_id.clone(), s.platform)).collect();
        devices.sort();
        let online = !devices.is_empty();
        let appear_offline = explicit.is_some_and(|e| e.status == Status::Offline);
        match shown(explicit, devices.len(), stored) {
            Some(e) => Visible { status: e.status, message: e.message.clone(), online, devices, appear_offline },
            None => Visible {
                status: if online { Status::Online } else { Status::Offline },
                message: empty_message(),
                online,
                devices,
                appear_offline,
            },
        }
    }
}

/// A device session to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub device: DeviceId,
    pub instance: Arc<str>,
    pub ttl_ms: i64,
    pub platform: Option<Platform>,
    /// Tag of this registration (see [`Session::sid`]).
    pub sid: u64,
    /// A new device is refused when the user already has this many live sessions.
    pub max_devices: usize,
}

impl NewSession {
    /// A session of `device` on `instance` for `ttl_ms`: no platform, tag `0`, no device
    /// limit (set those with the builder methods).
    pub fn new(device: &str, instance: &str, ttl_ms: i64) -> NewSession {
        NewSession { device: Arc::from(device), instance: Arc::from(instance), ttl_ms, platform: None, sid: 0, max_devices: usize::MAX }
    }

    /// As [`NewSession::new`] with ids the caller already holds: sessions of one instance
    /// (a node, a gateway) share its id instead of a copy each.
    pub fn shared(device: DeviceId, instance: Arc<str>, ttl_ms: i64) -> NewSession {
        NewSession { device, instance, ttl_ms, platform: None, sid: 0, max_devices: usize::MAX }
    }

    pub fn platform(mut self, p: Option<Platform>) -> NewSession {
        self.platform = p;
        self
    }

    pub fn sid(mut self, sid: u64) -> NewSession {
        self.sid = sid;
        self
    }

    pub fn max_devices(mut self, max: usize) -> NewSession {
        self.max_devices = max;
        self
    }
}

/// Result of registering a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// `false` when the device already had a session (which was replaced).
    pub created: bool,
    pub expires_at: Millis,
    /// Tag of the registration, to end exactly this one later.
    pub sid: u64,
}

/// A registration refused because the user is at `max` live devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimit {
    pub max: usize,
}

impl UserState {
    pub fn new(node_id: Arc<str>) -> UserState {
        UserState { explicit: None, sessions: Vec::new(), last_seen: None, updated_at: None, node_id }
    }

    /// The explicit status if it is still in force at `now` (shown or kept as a preference).
    pub fn live_explicit(&self, now: Millis) -> Option<&Explicit> {
        self.explicit.as_ref().filter(|e| e.live(now))
    }

    /// Sessions still alive at `now` (a reaper may not have removed expired ones yet).
    pub fn live_sessions(&self, now: Millis) -> impl Iterator<Item = &Session> {
        self.sessions.iter().filter(move |s| s.expires_at > now)
    }

    /// Applies the aggregation rule at `now`. Reads evaluate the rule themselves, so an
    /// expired status or session is never shown even if the reaper has not run yet.
    /// `revision` is left `0`: the store that holds the state fills it in.
    pub fn view(&self, user_id: &UserId, now: Millis) -> Presence {
        let live = self.live_sessions(now).count();
        let summary = |s: &Session| DeviceSummary { device_id: s.device_id.clone(), platform: s.platform };
        let devices: Arc<[DeviceSummary]> = if live == 0 {
            no_devices()
        } else if live == 1 {
            // The common case, in one allocation.
            match self.live_sessions(now).next() {
                Some(s) => Arc::new([summary(s)]),
                None => no_devices(),
            }
        } else {
            let mut v: Vec<DeviceSummary> = self.live_sessions(now).map(summary).collect();
            v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
            Arc::from(v)
        };
        let explicit = self.live_explicit(now);
        let (status, message, expires_at) = match shown(explicit, live, self.sessions.len()) {
            Some(e) => (e.status, e.message.clone(), e.expires_at),
            None if live > 0 => (Status::Online, empty_message(), None),
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
            device_count: live as u32,
            devices,
            appear_offline: explicit.is_some_and(|e| e.status == Status::Offline),
            revision: 0,
        }
    }

    /// The presence as last published: everything stored counts as live, because lapsed
    /// parts are only removed by [`UserState::expire`], which reports them itself. The
    /// `before` side of an event.
    pub fn published(&self, user_id: &UserId) -> Presence {
        self.view(user_id, Millis::MIN)
    }

    fn visible(&self, now: Millis) -> Visible {
        Visible::of(self.live_explicit(now), self.live_sessions(now), self.sessions.len())
    }

    fn visible_as_stored(&self) -> Visible {
        Visible::of(self.explicit.as_ref(), self.sessions.iter(), self.sessions.len())
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
        } else if before == after {
            None
        } else if explicit_expired {
            Some(EventKind::PresenceExpired)
        } else {
            Some(EventKind::PresenceUpdated)
        };
        if event.is_some() {
            self.updated_at = Some(now);
            self.node_id = node.clone();
        }
        Change { event, previous: before.status, persist: persist || explicit_expired }
    }

    /// Keeps the sessions `keep` says; returns how many were removed. When the last
    /// session goes, a standalone status becomes a preference: the disconnect happened
    /// after it was written, and the later of the two wins.
    fn retain_sessions(&mut self, keep: impl FnMut(&Session) -> bool) -> usize {
        let n = self.sessions.len();
        self.sessions.retain(keep);
        let removed = n - self.sessions.len();
        if removed > 0 {
            // Most users hold one or two sessions: keep no spare room (a million users
            // would otherwise keep megabytes of it, offline ones included).
            self.sessions.shrink_to_fit();
        }
        if removed > 0 && self.sessions.is_empty() {
            if let Some(e) = &mut self.explicit {
                e.standalone = false;
            }
        }
        removed
    }

    /// Removes what has lapsed at `now`: expired sessions and an expired explicit status.
    /// Returns whether anything was removed.
    fn drop_lapsed(&mut self, now: Millis) -> bool {
        let last = self.sessions.iter().filter(|s| s.expires_at <= now).map(|s| s.last_heartbeat).max();
        let sessions_dropped = self.retain_sessions(|s| s.expires_at > now) > 0;
        self.last_seen = self.last_seen.max(last);
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
            let standalone = s.sessions.is_empty();
            s.explicit = Some(Explicit { status, message, set_at: now, expires_at: ttl_ms.map(|t| now.saturating_add(t)), standalone });
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

    /// Registers (or replaces) the session of `req.device`; the user goes online if it
    /// was not. A new device beyond `req.max_devices` live sessions is refused, here,
    /// in the same step that would add it (so concurrent registrations cannot overshoot).
    pub fn register(&mut self, req: NewSession, node: &Arc<str>, now: Millis) -> Result<(Registered, Change), DeviceLimit> {
        let live = self.live_sessions(now).count();
        let replaces = self.live_sessions(now).any(|s| s.device_id == req.device);
        if !replaces && live >= req.max_devices {
            return Err(DeviceLimit { max: req.max_devices });
        }
        let expires_at = now.saturating_add(req.ttl_ms);
        let known_before = self.updated_at.is_some() || self.last_seen.is_some();
        let mut created = true;
        let sid = req.sid;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let session = Session {
                device_id: req.device.clone(),
                instance_id: req.instance,
                connected_at: now,
                last_heartbeat: now,
                expires_at,
                ttl_ms: req.ttl_ms,
                node_id: node.clone(),
                platform: req.platform,
                sid,
            };
            match s.sessions.iter_mut().find(|x| x.device_id == req.device) {
                Some(existing) => {
                    created = false;
                    *existing = session;
                }
                None => {
                    s.sessions.reserve_exact(1);
                    s.sessions.push(session)
                }
            }
            s.last_seen = Some(now);
            lapsed
        });
        Ok((Registered { created, expires_at, sid }, Change { persist: change.persist || !known_before, ..change }))
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

    /// Removes the session of `device` (only the registration tagged `sid`, when given,
    /// so an old connection's goodbye cannot end a newer connection of the same device).
    /// The user goes offline only if no device remains.
    pub fn unregister(&mut self, device: &str, sid: Option<u64>, node: &Arc<str>, now: Millis) -> (bool, Change) {
        let mut removed = false;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            removed = s.retain_sessions(|x| !(&*x.device_id == device && sid.is_none_or(|t| t == x.sid))) > 0;
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
            removed = s.retain_sessions(|x| !doomed(x)) > 0;
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
            let dropped = s.retain_sessions(|x| x.node_id != *owner || held.iter().any(|h| h.device_id == x.device_id));
            let mut last = s.last_seen;
            if dropped > 0 {
                last = last.max(Some(now));
            }
            for h in held {
                match s.sessions.iter_mut().find(|x| x.device_id == h.device_id) {
                    Some(x) if x.node_id == *owner => {}
                    Some(x) => *x = h.clone(),
                    None => {
                        s.sessions.reserve_exact(1);
                        s.sessions.push(h.clone())
                    }
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

    /// When a user with no session and no status was last heard of: the start of the
    /// retention period after which a store may forget them. `None` while anything is held.
    pub fn idle_since(&self) -> Option<Millis> {
        if self.explicit.is_some() || !self.sessions.is_empty() {
            return None;
        }
        Some(self.last_seen.max(self.updated_at).unwrap_or(Millis::MIN))
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

    fn reg(s: &mut UserState, d: &str, ttl: i64, node: &Arc<str>, now: Millis) -> (Registered, Change) {
        let req = NewSession { device: dev(d), instance: Arc::from("gw"), ttl_ms: ttl, platform: None, sid: 7, max_devices: 10 };
        s.register(req, node, now).unwrap()
    }

    #[test]
    fn held_sessions_never_lapse_and_release_goes_offline_once() {
        let mut s = UserState::new(node());
        let a: Arc<str> = Arc::from("node-a");
        reg(&mut s, "phone", TTL, &a, 0);
        reg(&mut s, "laptop", TTL, &a, 0);
        assert!(s.hold("phone", &a) && s.hold("laptop", &a));
        assert!(!s.hold("tablet", &a));
        // Far past the TTL the held sessions are still live; no timer is due.
        assert_eq!(s.view(&uid(), TTL * 1000).device_count, 2);
        assert_eq!(s.next_deadline(), None);
        // Another node cannot release what it does not hold.
        assert!(!s.release("phone", "node-b", 5, &node(), 10).0);
        let (removed, c) = s.release("phone", "node-a", 5, &node(), 10);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "one device left: still online, one device fewer");
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
        reg(&mut s, "old", TTL, &a, 10);
        reg(&mut s, "other", TTL, &b, 10);
        reg(&mut s, "new", TTL, &a, 500);
        for d in ["old", "other", "new"] {
            let owner = if d == "other" { &b } else { &a };
            s.hold(d, owner);
        }
        let c = s.release_node("a", 100, 90, &node(), 600);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "still online, one device fewer");
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
            platform: None,
            sid: 0,
        };
        let mut s = UserState::new(node());
        // Offline in the store (the janitor ended a's sessions); a still holds two.
        let c = s.sync_node(&a, &[held("phone", 10), held("web", 20)], &node(), 100);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        assert_eq!(s.view(&uid(), 1000).device_count, 2);
        // Another node's session is left alone; a's dropped device goes.
        reg(&mut s, "tablet", TTL, &b, 150);
        let c = s.sync_node(&a, &[held("web", 20)], &node(), 200);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "the phone is gone");
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
        reg(&mut s, "phone", TTL, &node(), 0);
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
    fn first_session_goes_online_and_device_changes_are_updates() {
        let mut s = UserState::new(node());
        let (r, c) = reg(&mut s, "phone", TTL, &node(), 1_000);
        assert!(r.created);
        assert_eq!(r.expires_at, 61_000);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        assert_eq!(c.previous, Status::Offline);
        let (r2, c2) = reg(&mut s, "laptop", TTL, &node(), 2_000);
        assert!(r2.created);
        assert_eq!(c2.event, Some(EventKind::PresenceUpdated), "watchers see the second device");
        let p = s.view(&uid(), 2_000);
        assert_eq!((p.status, p.device_count), (Status::Online, 2));
        let ids: Vec<&str> = p.devices.iter().map(|d| &*d.device_id).collect();
        assert_eq!(ids, vec!["laptop", "phone"], "devices ordered by id");
        assert_eq!(p.updated_at, Some(2_000));
        // Re-registering the same device replaces it: no visible change.
        let (r3, c3) = reg(&mut s, "laptop", TTL, &node(), 3_000);
        assert!(!r3.created);
        assert_eq!(c3.event, None);
        assert_eq!(s.sessions.len(), 2);
        // ...unless it now says which platform it is.
        let req = NewSession {
            device: dev("laptop"),
            instance: Arc::from("gw"),
            ttl_ms: TTL,
            platform: Some(Platform::Desktop),
            sid: 8,
            max_devices: 10,
        };
        let (_, c4) = s.register(req, &node(), 4_000).unwrap();
        assert_eq!(c4.event, Some(EventKind::PresenceUpdated));
        assert_eq!(s.view(&uid(), 4_000).devices[0].platform, Some(Platform::Desktop));
    }

    #[test]
    fn the_device_limit_is_checked_in_the_step_that_adds() {
        let mut s = UserState::new(node());
        let req = |d: &str| NewSession { device: dev(d), instance: Arc::from("gw"), ttl_ms: 1_000, platform: None, sid: 1, max_devices: 2 };
        s.register(req("a"), &node(), 0).unwrap();
        s.register(req("b"), &node(), 0).unwrap();
        assert_eq!(s.register(req("c"), &node(), 0).err(), Some(DeviceLimit { max: 2 }));
        assert!(s.register(req("b"), &node(), 10).is_ok(), "replacing a device is not a new one");
        // Lapsed sessions do not count.
        s.refresh("b", 500);
        assert!(s.register(req("c"), &node(), 1_200).is_ok());
    }

    #[test]
    fn offline_only_when_last_device_leaves() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        reg(&mut s, "laptop", TTL, &node(), 0);
        let (removed, c) = s.unregister("phone", None, &node(), 10);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "one device fewer");
        let (removed, c) = s.unregister("laptop", None, &node(), 20);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert!(c.persist, "last_seen at disconnect is durable");
        let p = s.view(&uid(), 20);
        assert_eq!(p.status, Status::Offline);
        assert_eq!(p.last_seen, Some(20));
        let (removed, c) = s.unregister("laptop", None, &node(), 30);
        assert!(!removed);
        assert_eq!(c.event, None, "no-op unregister emits nothing");
    }

    #[test]
    fn an_old_registrations_goodbye_leaves_a_newer_one_alone() {
        let mut s = UserState::new(node());
        let req = |sid| NewSession { device: dev("phone"), instance: Arc::from("gw"), ttl_ms: TTL, platform: None, sid, max_devices: 10 };
        s.register(req(1), &node(), 0).unwrap();
        s.register(req(2), &node(), 10).unwrap();
        let (removed, c) = s.unregister("phone", Some(1), &node(), 20);
        assert!(!removed);
        assert_eq!(c.event, None);
        assert_eq!(s.view(&uid(), 20).device_count, 1);
        assert!(s.unregister("phone", Some(2), &node(), 30).0);
    }

    #[test]
    fn refresh_extends_and_expiry_takes_user_offline_with_last_heartbeat() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
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
        reg(&mut s, "phone", 1_000, &node(), 0);
        assert_eq!(s.refresh("phone", 1_000), None);
    }

    #[test]
    fn a_status_set_while_connected_is_a_preference_shown_only_while_a_device_is_live() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        let c = s.set_status(Status::Busy, Arc::from("In a meeting"), Some(3_600), &node(), 100);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        assert_eq!(c.previous, Status::Online);
        assert!(c.persist);
        let p = s.view(&uid(), 200);
        assert_eq!((p.status, &*p.message, p.expires_at), (Status::Busy, "In a meeting", Some(3_700)));
        // The last device goes: offline, whatever the preference says.
        let (_, c) = s.unregister("phone", None, &node(), 300);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(c.previous, Status::Busy);
        assert!(c.persist);
        let p = s.view(&uid(), 300);
        assert_eq!((p.status, &*p.message, p.expires_at, p.last_seen), (Status::Offline, "", None, Some(300)));
        // The preference is kept: a device that reconnects shows it again.
        let (_, c) = reg(&mut s, "laptop", TTL, &node(), 400);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        let p = s.view(&uid(), 400);
        assert_eq!((p.status, &*p.message, p.expires_at), (Status::Busy, "In a meeting", Some(3_700)));
        s.unregister("laptop", None, &node(), 500);
        // It lapses while the user is away: nothing a reader sees changes, no event.
        let c = s.expire(&node(), 3_700);
        assert_eq!(c.event, None);
        assert!(c.persist, "the lapsed preference is removed from disk");
        assert!(s.explicit.is_none());
        let (_, c) = reg(&mut s, "laptop", TTL, &node(), 4_000);
        assert_eq!(c.event, Some(EventKind::UserOnline));
        assert_eq!(s.view(&uid(), 4_000).status, Status::Online);
    }

    #[test]
    fn a_status_written_with_no_live_session_shows_until_a_later_device_leaves() {
        let mut s = UserState::new(node());
        // A backend sets `busy` from a calendar; nobody is connected: shown as written.
        let c = s.set_status(Status::Busy, Arc::from("calendar"), Some(10_000), &node(), 0);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        assert_eq!(s.view(&uid(), 10).status, Status::Busy);
        assert_eq!(s.view(&uid(), 10).device_count, 0);
        // A device connects and leaves again: the disconnect is the later fact.
        reg(&mut s, "phone", TTL, &node(), 100);
        assert_eq!(s.view(&uid(), 100).status, Status::Busy);
        let (_, c) = s.unregister("phone", None, &node(), 200);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.view(&uid(), 200).status, Status::Offline);
        // A lapsed, unreaped session counts as gone for reads too.
        s.set_status(Status::Away, Arc::from(""), None, &node(), 300);
        reg(&mut s, "phone", 1_000, &node(), 400);
        assert_eq!(s.view(&uid(), 1_500).status, Status::Offline);
        assert_eq!(s.expire(&node(), 1_500).event, Some(EventKind::UserOffline));
        assert_eq!(s.view(&uid(), 1_600).status, Status::Offline);
        // The standalone part survives a round trip through storage.
        s.set_status(Status::Away, Arc::from(""), None, &node(), 2_000);
        let back: UserState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.view(&uid(), 2_100).status, Status::Away);
    }

    #[test]
    fn appear_offline_is_marked_while_in_force_connected_or_not() {
        let mut s = UserState::new(node());
        reg(&mut s, "d", TTL, &node(), 0);
        let c = s.set_status(Status::Offline, Arc::from(""), Some(5_000), &node(), 10);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        assert!(s.view(&uid(), 20).appear_offline);
        s.unregister("d", None, &node(), 30);
        assert!(s.view(&uid(), 40).appear_offline, "still hiding while away");
        // Lapsing while away changes what others may see (the user is no longer hiding).
        assert_eq!(s.expire(&node(), 5_010).event, Some(EventKind::PresenceExpired));
        assert!(!s.view(&uid(), 5_020).appear_offline);
    }

    #[test]
    fn idle_users_can_be_forgotten_after_their_last_activity() {
        let mut s = UserState::new(node());
        assert_eq!(s.idle_since(), Some(Millis::MIN));
        reg(&mut s, "d", TTL, &node(), 0);
        assert_eq!(s.idle_since(), None);
        s.unregister("d", None, &node(), 50);
        assert_eq!(s.idle_since(), Some(50));
        s.set_status(Status::Busy, Arc::from(""), None, &node(), 60);
        assert_eq!(s.idle_since(), None);
    }

    #[test]
    fn expiry_reverts_to_online_when_a_device_is_connected() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
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
        reg(&mut s, "d", TTL, &node(), 30);
        let c = s.set_status(Status::Online, Arc::from(""), None, &node(), 40);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "away -> online");
        let c = s.clear_status(&node(), 50);
        assert_eq!(c.event, None, "explicit online with no message == derived online");
    }

    #[test]
    fn explicit_offline_hides_a_connected_user() {
        let mut s = UserState::new(node());
        reg(&mut s, "d", TTL, &node(), 0);
        s.set_status(Status::Offline, Arc::from(""), None, &node(), 1);
        let p = s.view(&uid(), 2);
        assert_eq!(p.status, Status::Offline);
        assert!(p.appear_offline);
        assert_eq!(p.device_count, 1, "the user's own view still counts the device");
        // A second device of a hidden user is an update for the owner only (privacy
        // projects it away for everyone else).
        assert_eq!(reg(&mut s, "e", TTL, &node(), 3).1.event, Some(EventKind::PresenceUpdated));
    }

    #[test]
    fn session_and_status_lapsing_together_is_one_offline_event() {
        let mut s = UserState::new(node());
        reg(&mut s, "d", 1_000, &node(), 0);
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
        let (_, c) = reg(&mut s, "d", TTL, &node(), 0);
        assert!(c.persist);
        let (_, c) = reg(&mut s, "e", TTL, &node(), 1);
        assert!(!c.persist, "later registrations are ephemeral");
    }
}
