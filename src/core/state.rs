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
//! 4. Automatic away: with no explicit status shown, a user whose every live device has
//!    been idle for `presence.auto_away_after` reads `away`, with `idle_since` (when the
//!    last device went idle); one device active again reads `online` at once. The
//!    moment comes from a timer ([`UserState::next_deadline`]) and is stored, like every
//!    other transition, so that it is published once.
//!
//! An explicit `offline` ("appear offline") hides a connected user: everyone but the
//! user sees them as a hidden user (see [`crate::core::privacy::project`]).

use std::sync::Arc;

use super::event::EventKind;
use super::model::{empty_message, no_devices, DeviceId, DeviceSummary, Millis, Platform, Presence, Session, Status, UserId};
use super::session::{Activity, DeviceLimit, Ending, NewSession, Registered};

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
    /// Automatic away is in force (rule 4): since when the last device went idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub away: Option<Millis>,
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
    /// Each device with its platform and since when it is idle.
    devices: Vec<(DeviceId, Option<Platform>, Option<Millis>)>,
    appear_offline: bool,
}

/// The explicit status readers are shown, given how many sessions are live and whether
/// any session is stored at all (a standalone status shows only while none is).
fn shown(explicit: Option<&Explicit>, live: usize, stored: usize) -> Option<&Explicit> {
    explicit.filter(|e| live > 0 || (e.standalone && stored == 0))
}

impl Visible {
    fn of<'a>(explicit: Option<&Explicit>, sessions: impl Iterator<Item = &'a Session>, stored: usize, away: bool) -> Visible {
        let mut devices: Vec<(DeviceId, Option<Platform>, Option<Millis>)> =
            sessions.map(|s| (s.device_id.clone(), s.platform, s.idle_since)).collect();
        devices.sort();
        let online = !devices.is_empty();
        let appear_offline = explicit.is_some_and(|e| e.status == Status::Offline);
        match shown(explicit, devices.len(), stored) {
            // An explicit `online` says nothing of presence at the keyboard: the automatic
            // away applies to it (its message stays).
            Some(e) if e.status == Status::Online && online && away => {
                Visible { status: Status::Away, message: e.message.clone(), online, devices, appear_offline }
            }
            Some(e) => Visible { status: e.status, message: e.message.clone(), online, devices, appear_offline },
            None => Visible {
                status: match (online, away) {
                    (true, true) => Status::Away,
                    (true, false) => Status::Online,
                    (false, _) => Status::Offline,
                },
                message: empty_message(),
                online,
                devices,
                appear_offline,
            },
        }
    }
}

impl UserState {
    pub fn new(node_id: Arc<str>) -> UserState {
        UserState { explicit: None, sessions: Vec::new(), last_seen: None, updated_at: None, node_id, away: None }
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
        let summary = |s: &Session| DeviceSummary {
            device_id: s.device_id.clone(),
            platform: s.platform,
            active: s.idle_since.is_none(),
            idle_since: s.idle_since,
        };
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
        // Stored by the transition at its moment; worked out here too, so a read is right
        // even before (or without) the timer that publishes it.
        let away =
            if live > 0 { self.away.or_else(|| self.away_due(now).filter(|(_, at)| *at <= now).map(|(since, _)| since)) } else { None };
        let (status, message, expires_at, idle_since) = match shown(explicit, live, self.sessions.len()) {
            Some(e) if e.status == Status::Online && away.is_some() => (Status::Away, e.message.clone(), e.expires_at, away),
            Some(e) => (e.status, e.message.clone(), e.expires_at, None),
            None if away.is_some() => (Status::Away, empty_message(), None, away),
            None if live > 0 => (Status::Online, empty_message(), None, None),
            None => (Status::Offline, empty_message(), None, None),
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
            idle_since,
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
        Visible::of(self.live_explicit(now), self.live_sessions(now), self.sessions.len(), self.away.is_some())
    }

    fn visible_as_stored(&self) -> Visible {
        Visible::of(self.explicit.as_ref(), self.sessions.iter(), self.sessions.len(), self.away.is_some())
    }

    /// While every live device is idle with automatic away on: since when the last of
    /// them went idle, and when that makes the user away.
    fn away_due(&self, now: Millis) -> Option<(Millis, Millis)> {
        let mut due: Option<(Millis, Millis)> = None;
        for s in self.live_sessions(now) {
            let (since, at) = (s.idle_since?, s.away_at?);
            due = Some(due.map_or((since, at), |(a, b)| (a.max(since), b.max(at))));
        }
        due
    }

    /// Rule 4, after every transition: automatic away holds from its moment on, and ends
    /// as soon as a device is active (or the last one goes).
    fn settle_away(&mut self, now: Millis) {
        self.away = self.away_due(now).filter(|(_, at)| *at <= now).map(|(since, _)| since);
    }

    /// Runs `op`, then decides the event by comparing what a reader saw before (as last
    /// published) with what a reader sees after.
    fn transition(&mut self, node: &Arc<str>, now: Millis, persist: bool, op: impl FnOnce(&mut Self) -> bool) -> Change {
        let before = self.visible_as_stored();
        let explicit_before = self.explicit.is_some();
        let expired = op(self);
        self.settle_away(now);
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
            self.after_removal();
        }
        removed
    }

    /// After sessions were removed: no spare room kept (most users hold one or two
    /// sessions; a million users would otherwise keep megabytes of it, offline ones
    /// included), and with the last one gone a standalone status becomes a preference.
    fn after_removal(&mut self) {
        self.sessions.shrink_to_fit();
        if self.sessions.is_empty() {
            if let Some(e) = &mut self.explicit {
                e.standalone = false;
            }
        }
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
                lingering: false,
                idle_since: None,
                away_at: None,
            };
            match s.sessions.iter_mut().find(|x| x.device_id == req.device) {
                Some(existing) => {
                    // The same device again (continued within its grace, or a new
                    // connection replacing its old one): its activity stays unless it says.
                    created = false;
                    *existing = Session { idle_since: existing.idle_since, away_at: existing.away_at, ..session };
                }
                None => {
                    s.sessions.reserve_exact(1);
                    s.sessions.push(session)
                }
            }
            if let (Some(a), Some(x)) = (req.activity, s.sessions.iter_mut().find(|x| x.device_id == req.device)) {
                x.say(a, now);
            }
            s.last_seen = Some(now);
            lapsed
        });
        Ok((Registered { created, expires_at, sid }, Change { persist: change.persist || !known_before, ..change }))
    }

    /// Extends a live session by its TTL. `None` when the device has no live session
    /// (never registered, unregistered, expired, or held for the grace after its
    /// connection went): the caller must register again.
    /// Produces no event: a heartbeat changes nothing a reader can see.
    pub fn refresh(&mut self, device: &str, now: Millis) -> Option<Millis> {
        let s = self.sessions.iter_mut().find(|s| &*s.device_id == device && s.expires_at > now && !s.lingering)?;
        s.last_heartbeat = now;
        s.expires_at = now.saturating_add(s.ttl_ms);
        let expires_at = s.expires_at;
        self.last_seen = Some(now);
        Some(expires_at)
    }

    /// Says whether the user is active on `device` (the live, connected registration
    /// tagged `sid`, when given). A device already idle keeps the moment it went idle. A
    /// change of a device's activity is an event (readers see each device's); so are the
    /// automatic away it completes and the return from it. Returns whether the session
    /// was there.
    pub fn set_activity(&mut self, device: &str, sid: Option<u64>, activity: Activity, node: &Arc<str>, now: Millis) -> (bool, Change) {
        let mut found = false;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let mine = |x: &&mut Session| &*x.device_id == device && sid.is_none_or(|t| t == x.sid) && x.expires_at > now && !x.lingering;
            if let Some(x) = s.sessions.iter_mut().find(mine) {
                found = true;
                x.say(activity, now);
            }
            lapsed
        });
        (found, change)
    }

    /// Gives the live registration of `device` tagged `sid` the TTL `ttl_ms` from `now`
    /// (a gateway session bound to its instance's lease after it registered). No event:
    /// the user's presence does not change. `false` when there is none (ended, held for
    /// the grace, or replaced by a newer registration).
    pub fn rebind(&mut self, device: &str, sid: u64, ttl_ms: i64, now: Millis) -> bool {
        let Some(s) = self.sessions.iter_mut().find(|s| &*s.device_id == device && s.sid == sid && s.expires_at > now && !s.lingering)
        else {
            return false;
        };
        s.ttl_ms = ttl_ms;
        s.expires_at = now.saturating_add(ttl_ms);
        true
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

    /// Ends the session of `device` (only the registration tagged `sid`, when given) as
    /// `ending` says: at once, or held for the grace (no event: readers still see the
    /// device; see [`Ending::Held`]). Returns whether the session was there (to hold: and
    /// not held already).
    pub fn end(&mut self, device: &str, sid: Option<u64>, ending: Ending, node: &Arc<str>, now: Millis) -> (bool, Change) {
        let (until, last_heard) = match ending {
            Ending::Now => return self.unregister(device, sid, node, now),
            Ending::Held { until, last_heard } => (until, last_heard),
        };
        let mine = |x: &Session| &*x.device_id == device && sid.is_none_or(|t| t == x.sid) && x.expires_at > now;
        if until <= now {
            return self.release_where(mine, last_heard, node, now);
        }
        let mut found = false;
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            if let Some(x) = s.sessions.iter_mut().find(|x| mine(x)) {
                found = !x.lingering;
                x.expires_at = if x.lingering { x.expires_at.min(until) } else { until };
                x.lingering = true;
                x.last_heartbeat = x.last_heartbeat.max(last_heard.min(now));
            }
            lapsed
        });
        (found, change)
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

    /// Takes the live session of `device` (tag `sid`, when given) over for `owner`, held
    /// for the offline grace: another node held it, and its device went away through
    /// this one (a gateway's plain unregistration). Stored as held by `owner`'s lease,
    /// lingering, last heard at `last_heard`; nothing a reader sees changes. Returns the
    /// session as it was (its node is told), `None` when there is none.
    pub fn take_lingering(&mut self, device: &str, sid: Option<u64>, owner: &Arc<str>, last_heard: Millis, now: Millis) -> Option<Session> {
        let x = self.sessions.iter_mut().find(|x| &*x.device_id == device && sid.is_none_or(|t| t == x.sid) && x.expires_at > now)?;
        let before = x.clone();
        x.node_id = owner.clone();
        x.expires_at = HELD;
        x.lingering = true;
        x.last_heartbeat = x.last_heartbeat.max(last_heard.min(now));
        Some(before)
    }

    /// Ends the session of `device` if `owner` still holds it (with tag `sid`, when given):
    /// its deadline passed on the owning node, or the owner is gone. `last_seen` is the
    /// session's last heartbeat.
    pub fn release(
        &mut self,
        device: &str,
        owner: &str,
        sid: Option<u64>,
        last_seen: Millis,
        node: &Arc<str>,
        now: Millis,
    ) -> (bool, Change) {
        self.release_where(|s| &*s.device_id == device && &*s.node_id == owner && sid.is_none_or(|t| t == s.sid), last_seen, node, now)
    }

    /// Takes over what node `owner` held (it is gone: drained, or its lease lapsed) of the
    /// sessions that started at or before `until` (a newer incarnation's stay its own).
    /// Nobody is connected to them any more: each is held for the grace from the moment
    /// it was last heard of (`last_alive`, the owner's last lease renewal, for a session
    /// held by its lease; a session the owner handed over when it drained keeps the
    /// deadline and `lingering` it was written with), and is held by `adopter` from now
    /// on. One whose deadline has passed ends now, `last_seen` its last heard moment.
    /// Returns the change and the adopted sessions, each with its real deadline in
    /// `expires_at`, for the adopter's memory.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt_node(
        &mut self,
        owner: &str,
        until: Millis,
        last_alive: Millis,
        grace_ms: i64,
        adopter: &Arc<str>,
        node: &Arc<str>,
        now: Millis,
    ) -> (Change, Vec<Session>) {
        let mut adopted = Vec::new();
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            s.settle_owned(owner, |x| {
                if x.connected_at > until {
                    return None;
                }
                let (deadline, heard, lingering) = if x.expires_at == HELD {
                    let heard = last_alive.max(x.last_heartbeat);
                    (heard.saturating_add(grace_ms.max(0)), heard, true)
                } else {
                    (x.expires_at, x.last_heartbeat, x.lingering)
                };
                if deadline <= now {
                    return Some(heard.min(now));
                }
                x.node_id = adopter.clone();
                x.expires_at = HELD;
                x.lingering = lingering;
                x.last_heartbeat = heard;
                adopted.push(Session { expires_at: deadline, ..x.clone() });
                None
            });
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        (Change { persist, ..change }, adopted)
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

    /// Makes the stored state agree with what `owner` holds, matching sessions by device
    /// and registration tag (after the owner was cut off from the store or lost its
    /// lease: what it keeps in memory is the truth for its own connections). `held`: the
    /// owner's sessions, each with its real deadline in `expires_at`, and `lingering` when
    /// its connection is gone.
    /// - A session stored as the owner's that `held` lacks ended there meanwhile: it ends.
    /// - A held session whose device is stored under another tag was registered again
    ///   since (here or on another node): the newer registration stays.
    /// - A held live session that is not stored (the janitor ended it while the owner was
    ///   cut off) is restored, and so is one another node adopted meanwhile: its
    ///   connection is here. A lingering one is not: nobody is connected to it.
    /// - A held lingering session whose deadline passed ends, `last_seen` its last heard
    ///   moment; the others are stored as held by the owner's lease.
    ///
    /// Others' sessions stay. Returns the change and the held devices the owner must
    /// forget (registered again elsewhere, or not to be restored).
    pub fn sync_node(&mut self, owner: &Arc<str>, held: &[Session], node: &Arc<str>, now: Millis) -> (Change, Vec<DeviceId>) {
        let mut forget = Vec::new();
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            let tagged = |x: &Session, h: &Session| x.device_id == h.device_id && x.sid == h.sid;
            s.settle_owned(owner, |x| match held.iter().find(|h| tagged(x, h)) {
                Some(h) if h.lingering && h.expires_at <= now => Some(h.last_heartbeat.min(now)),
                Some(h) => {
                    x.expires_at = HELD;
                    x.lingering = h.lingering;
                    x.last_heartbeat = x.last_heartbeat.max(h.last_heartbeat);
                    None
                }
                None => Some(now),
            });
            for h in held {
                match s.sessions.iter_mut().find(|x| x.device_id == h.device_id) {
                    Some(x) if x.node_id == *owner && x.sid == h.sid => {}
                    Some(x) if x.sid == h.sid && !h.lingering => {
                        // Adopted by another node while this one was cut off; the
                        // connection is here.
                        x.node_id = owner.clone();
                        x.expires_at = HELD;
                        x.lingering = false;
                    }
                    Some(_) => forget.push(h.device_id.clone()),
                    None if h.lingering => forget.push(h.device_id.clone()),
                    None => {
                        s.sessions.reserve_exact(1);
                        s.sessions.push(Session { expires_at: HELD, node_id: owner.clone(), ..h.clone() });
                        s.last_seen = s.last_seen.max(Some(h.last_heartbeat));
                    }
                }
            }
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        (Change { persist, ..change }, forget)
    }

    /// Writes the real deadlines of what `owner` holds into the stored state, so that
    /// another node can adopt the sessions (see [`UserState::adopt_node`]): the owner is
    /// draining. `held` as for [`UserState::sync_node`]; a stored session of the owner's
    /// that it no longer holds, or whose deadline passed, ends. Nothing a reader sees
    /// changes otherwise.
    pub fn hand_over(&mut self, owner: &Arc<str>, held: &[Session], node: &Arc<str>, now: Millis) -> Change {
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            s.settle_owned(owner, |x| match held.iter().find(|h| h.device_id == x.device_id && h.sid == x.sid) {
                Some(h) if h.expires_at > now => {
                    x.expires_at = h.expires_at;
                    x.lingering = h.lingering;
                    x.last_heartbeat = x.last_heartbeat.max(h.last_heartbeat);
                    None
                }
                Some(h) => Some(h.last_heartbeat.min(now)),
                None => Some(now),
            });
            lapsed
        });
        let persist = change.persist || change.event == Some(EventKind::UserOffline);
        Change { persist, ..change }
    }

    /// Goes over the sessions `owner` holds: `end` keeps one (changed as it likes, `None`)
    /// or ends it (`Some(the moment it was last heard of)`, which `last_seen` takes).
    fn settle_owned(&mut self, owner: &str, mut end: impl FnMut(&mut Session) -> Option<Millis>) {
        let n = self.sessions.len();
        let mut last = self.last_seen;
        self.sessions.retain_mut(|x| {
            if &*x.node_id != owner {
                return true;
            }
            match end(x) {
                None => true,
                Some(heard) => {
                    last = last.max(Some(heard));
                    false
                }
            }
        });
        self.last_seen = last;
        if self.sessions.len() < n {
            self.after_removal();
        }
    }

    /// Ends every session at once (an embedded node stopping: its sessions do not
    /// outlive the process). `last_seen` is the last heard moment of a lingering session,
    /// the stop itself for a connected one.
    pub fn end_all(&mut self, node: &Arc<str>, now: Millis) -> Change {
        let heard = self.sessions.iter().map(|x| if x.lingering { x.last_heartbeat.min(now) } else { now }).max();
        let change = self.transition(node, now, false, |s| {
            let lapsed = s.drop_lapsed(now);
            if s.retain_sessions(|_| false) > 0 {
                s.last_seen = s.last_seen.max(heard);
            }
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
        let away = if self.away.is_none() { self.away_due(Millis::MIN).map(|(_, at)| at) } else { None };
        [sessions, explicit, away].into_iter().flatten().min()
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
        let req = NewSession {
            device: dev(d),
            instance: Arc::from("gw"),
            ttl_ms: ttl,
            platform: None,
            sid: 7,
            max_devices: 10,
            activity: Default::default(),
        };
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
        // Another node cannot release what it does not hold, nor anyone another registration.
        assert!(!s.release("phone", "node-b", None, 5, &node(), 10).0);
        assert!(!s.release("phone", "node-a", Some(99), 5, &node(), 10).0);
        let (removed, c) = s.release("phone", "node-a", Some(7), 5, &node(), 10);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "one device left: still online, one device fewer");
        let (removed, c) = s.release("laptop", "node-a", None, 7, &node(), 20);
        assert!(removed);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.last_seen, Some(7), "last_seen is the last heartbeat");
        assert_eq!(s.release("laptop", "node-a", None, 9, &node(), 30).1.event, None, "released twice: no second event");
    }

    fn session(d: &str, owner: &Arc<str>, heard: Millis, sid: u64) -> Session {
        Session {
            device_id: dev(d),
            instance_id: Arc::from("gw"),
            connected_at: heard,
            last_heartbeat: heard,
            expires_at: HELD,
            ttl_ms: TTL,
            node_id: owner.clone(),
            platform: None,
            sid,
            lingering: false,
            idle_since: None,
            away_at: None,
        }
    }

    #[test]
    fn a_lost_connection_is_held_for_the_grace_and_a_registration_continues_it() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        let before = s.view(&uid(), 1_000);
        // The socket closes at 1 s: held until 11 s, no event, still shown with its device.
        let (found, c) = s.end("phone", Some(7), Ending::lost(1_000, 10_000, 1_000), &node(), 1_000);
        assert!(found);
        assert_eq!(c.event, None, "nobody is told of a lost socket");
        let held = s.view(&uid(), 5_000);
        assert_eq!((held.status, held.device_count, held.devices.clone()), (Status::Online, 1, before.devices.clone()));
        assert_eq!(s.refresh("phone", 2_000), None, "a heartbeat does not revive it: it must register again");
        assert_eq!(s.next_deadline(), Some(11_000));
        // The same device registers again within the grace: the session continues, no event.
        let (r, c) = reg(&mut s, "phone", TTL, &node(), 6_000);
        assert!(!r.created);
        assert_eq!(c.event, None);
        assert!(!s.sessions[0].lingering);
        assert_eq!(s.expire(&node(), 11_500).event, None, "the old deadline no longer applies");
        // Lost again, never back: offline once at the deadline, last_seen when last heard.
        s.end("phone", None, Ending::lost(20_000, 10_000, 20_000), &node(), 20_000);
        assert_eq!(s.expire(&node(), 29_999).event, None);
        assert_eq!(s.view(&uid(), 30_000).status, Status::Offline, "a read at the deadline already says offline");
        let c = s.expire(&node(), 30_000);
        assert_eq!(c.event, Some(EventKind::UserOffline));
        assert_eq!(s.last_seen, Some(20_000), "last_seen is when the device was last heard, not the end of the grace");
    }

    fn idle(since: Millis) -> Activity {
        Activity::Idle { since, away_after_ms: 10_000 }
    }

    #[test]
    fn every_device_idle_for_the_time_is_away_once_and_one_active_device_is_online_at_once() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        reg(&mut s, "laptop", TTL, &node(), 0);
        // One device idle: an event (its state shows), still online, nothing armed.
        let (found, c) = s.set_activity("phone", None, idle(1_000), &node(), 1_000);
        assert!(found);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated));
        let v = s.view(&uid(), 1_000);
        assert_eq!((v.status, v.idle_since), (Status::Online, None));
        assert_eq!(v.devices.iter().map(|d| (d.active, d.idle_since)).collect::<Vec<_>>(), [(true, None), (false, Some(1_000))]);
        assert_eq!(s.next_deadline(), Some(TTL), "only the TTLs while a device is active");
        // Said again: nothing changes, the first moment stays.
        assert_eq!(s.set_activity("phone", None, idle(2_000), &node(), 2_000).1.event, None);
        // The last device idle: away is due 10 s after it went idle.
        assert_eq!(s.set_activity("laptop", None, idle(3_000), &node(), 3_000).1.event, Some(EventKind::PresenceUpdated));
        assert_eq!(s.next_deadline(), Some(13_000));
        assert_eq!(s.expire(&node(), 12_999).event, None);
        let c = s.expire(&node(), 13_000);
        assert_eq!((c.event, c.previous), (Some(EventKind::PresenceUpdated), Status::Online));
        let v = s.view(&uid(), 13_000);
        assert_eq!((v.status, v.idle_since), (Status::Away, Some(3_000)), "since the last device went idle");
        assert_eq!(s.published(&uid()).status, Status::Away, "stored: published once");
        assert_eq!(s.expire(&node(), 14_000).event, None, "not twice");
        // One device active: online at once.
        let c = s.set_activity("phone", None, Activity::Active, &node(), 20_000).1;
        assert_eq!((c.event, c.previous), (Some(EventKind::PresenceUpdated), Status::Away));
        assert_eq!(s.view(&uid(), 20_000).status, Status::Online);
        assert_eq!(s.away, None);
        // Back to idle: the away is counted from the new idleness; a new device is active.
        s.set_activity("phone", None, idle(21_000), &node(), 21_000);
        assert_eq!(s.next_deadline(), Some(31_000));
        reg(&mut s, "tablet", TTL, &node(), 22_000);
        assert_eq!(s.expire(&node(), 31_000).event, None, "a new session starts active");
        assert_eq!(s.view(&uid(), 31_000).status, Status::Online);
    }

    #[test]
    fn a_device_idle_from_its_start_does_not_hold_off_an_away_and_reads_need_no_timer() {
        let mut s = UserState::new(node());
        reg(&mut s, "laptop", TTL, &node(), 0);
        s.set_activity("laptop", None, idle(1_000), &node(), 1_000);
        assert_eq!(s.expire(&node(), 11_000).event, Some(EventKind::PresenceUpdated));
        assert_eq!(s.view(&uid(), 11_000).status, Status::Away);
        // A phone app opened in the background: one transition, still away.
        let req = NewSession::new("phone", "gw", TTL).activity(Some(Activity::Idle { since: Millis::MIN, away_after_ms: 10_000 }));
        let (r, c) = s.register(req, &node(), 12_000).unwrap();
        assert!(r.created);
        assert_eq!((c.previous, s.view(&uid(), 12_000).status), (Status::Away, Status::Away), "{c:?}");
        assert_eq!(s.sessions[1].idle_since, Some(12_000), "shown idle since it connected");
        // The same device registering again saying active: active, online.
        let (_, c) = s.register(NewSession::new("phone", "gw", TTL).activity(Some(Activity::Active)), &node(), 13_000).unwrap();
        assert_eq!((c.event, s.view(&uid(), 13_000).status), (Some(EventKind::PresenceUpdated), Status::Online));
        // Idle again; a read after the moment shows away before any timer ran.
        s.set_activity("phone", None, idle(14_000), &node(), 14_000);
        assert_eq!(s.view(&uid(), 23_999).status, Status::Online);
        let v = s.view(&uid(), 24_000);
        assert_eq!((v.status, v.idle_since), (Status::Away, Some(14_000)));
        assert_eq!(s.published(&uid()).status, Status::Online, "published only by the transition");
        // An explicit online with a message: the automatic away applies, the message stays.
        let c = s.set_status(Status::Online, Arc::from("wfh"), None, &node(), 25_000);
        let v = s.view(&uid(), 25_000);
        assert_eq!((v.status, &*v.message), (Status::Away, "wfh"), "{c:?}");
    }

    #[test]
    fn an_explicit_status_wins_over_automatic_away_and_idle_since_is_clamped() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 5_000);
        s.set_status(Status::Busy, Arc::from("call"), None, &node(), 5_000);
        // Idle since before the session began: clamped to its start; in the future: now.
        s.set_activity("phone", None, idle(1), &node(), 6_000);
        assert_eq!(s.sessions[0].idle_since, Some(5_000));
        assert_eq!(s.expire(&node(), 15_000).event, None, "busy wins: nothing shows");
        assert_eq!(s.view(&uid(), 15_000).status, Status::Busy);
        assert_eq!(s.away, Some(5_000), "the away is kept, for when the status goes");
        let c = s.clear_status(&node(), 16_000);
        assert_eq!((c.event, s.view(&uid(), 16_000).status), (Some(EventKind::PresenceUpdated), Status::Away));
        s.set_activity("phone", None, Activity::Active, &node(), 17_000);
        s.set_activity("phone", None, idle(Millis::MAX), &node(), 18_000);
        assert_eq!(s.sessions[0].idle_since, Some(18_000), "a time in the future is now");
        // Off (0): idle devices, never away; a lingering or unknown device is not found.
        s.set_activity("phone", None, Activity::Active, &node(), 19_000);
        s.set_activity("phone", None, Activity::Idle { since: 19_000, away_after_ms: 0 }, &node(), 19_000);
        assert_eq!(s.next_deadline(), Some(5_000 + TTL), "the TTL only: no away armed");
        assert!(!s.set_activity("tablet", None, Activity::Active, &node(), 19_000).0);
        assert!(!s.set_activity("phone", Some(99), Activity::Active, &node(), 19_000).0, "another registration's tag");
        // The same device registering again keeps its activity (a continued session).
        reg(&mut s, "phone", TTL, &node(), 20_000);
        assert_eq!(s.sessions[0].idle_since, Some(19_000));
    }

    #[test]
    fn a_sign_out_a_zero_grace_and_a_silent_device_end_at_once() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        let (found, c) = s.end("phone", None, Ending::Now, &node(), 500);
        assert!(found);
        assert_eq!((c.event, s.last_seen), (Some(EventKind::UserOffline), Some(500)));
        reg(&mut s, "phone", TTL, &node(), 1_000);
        assert_eq!(s.end("phone", None, Ending::lost(2_000, 0, 2_000), &node(), 2_000).1.event, Some(EventKind::UserOffline));
        // A device last heard 60 s ago (its session_ttl) is not held any longer.
        reg(&mut s, "phone", TTL, &node(), 3_000);
        assert_eq!(Ending::lost(3_000, 10_000, 63_000), Ending::Held { until: 63_000, last_heard: 3_000 });
        let c = s.end("phone", None, Ending::lost(3_000, 10_000, 63_000), &node(), 63_000).1;
        assert_eq!((c.event, s.last_seen), (Some(EventKind::UserOffline), Some(3_000)));
        // Another registration's goodbye, held or not, leaves the device alone.
        reg(&mut s, "phone", TTL, &node(), 70_000);
        assert!(!s.end("phone", Some(1), Ending::lost(71_000, 10_000, 71_000), &node(), 71_000).0);
        assert!(!s.sessions[0].lingering);
    }

    #[test]
    fn adopting_a_gone_nodes_sessions_holds_them_from_when_they_were_last_heard() {
        let (a, b, j): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"), Arc::from("j"));
        let mut s = UserState::new(node());
        s.sessions = vec![session("old", &a, 10, 1), session("other", &b, 10, 2), session("new", &a, 500, 3)];
        s.last_seen = Some(500);
        // Node a's lease was last renewed at 90; the grace is 1 s: held until 1,090.
        let (c, adopted) = s.adopt_node("a", 100, 90, 1_000, &j, &node(), 600);
        assert_eq!(c.event, None, "nothing a reader sees changes");
        assert_eq!(adopted.len(), 1, "a newer incarnation's session stays its own");
        assert_eq!((adopted[0].expires_at, adopted[0].last_heartbeat, adopted[0].lingering), (1_090, 90, true));
        let old = s.sessions.iter().find(|x| &*x.device_id == "old").unwrap();
        assert_eq!((&*old.node_id, old.expires_at, old.lingering), ("j", HELD, true));
        // Past its grace already: ends at once, once, with last_seen the node's last renewal.
        let mut t = UserState::new(node());
        t.sessions = vec![session("phone", &a, 10, 1)];
        let (c, adopted) = t.adopt_node("a", 100, 90, 1_000, &j, &node(), 5_000);
        assert_eq!((c.event, adopted.len(), t.last_seen), (Some(EventKind::UserOffline), 0, Some(90)));
        // A handed-over session keeps the deadline it was written with.
        let mut u = UserState::new(node());
        u.sessions = vec![Session { expires_at: 7_000, lingering: true, ..session("web", &a, 3_000, 4) }];
        let (_, adopted) = u.adopt_node("a", 100_000, 4_000, 1_000, &j, &node(), 5_000);
        assert_eq!((adopted[0].expires_at, adopted[0].last_heartbeat), (7_000, 3_000));
        assert_eq!(u.sessions[0].expires_at, HELD);
    }

    #[test]
    fn a_write_back_matches_registrations_by_tag() {
        let (a, c_node): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("c"));
        let mut s = UserState::new(node());
        // Offline in the store (the janitor ended a's sessions while a was cut off); a
        // still holds two live connections: both come back.
        let (c, forget) = s.sync_node(&a, &[session("phone", &a, 10, 1), session("web", &a, 20, 2)], &node(), 100);
        assert_eq!((c.event, forget.len()), (Some(EventKind::UserOnline), 0));
        assert_eq!(s.view(&uid(), 1_000).device_count, 2);
        // The phone registered again on node c during the cut: a's stale copy stays out,
        // and a is told to forget it. Nothing a reader sees changes.
        s.sessions.retain(|x| &*x.device_id != "phone");
        s.sessions.push(session("phone", &c_node, 50, 9));
        let (c, forget) = s.sync_node(&a, &[session("phone", &a, 10, 1), session("web", &a, 20, 2)], &node(), 200);
        assert_eq!(c.event, None);
        assert_eq!(forget, vec![dev("phone")]);
        assert_eq!(&*s.sessions.iter().find(|x| &*x.device_id == "phone").unwrap().node_id, "c");
        // A connection that closed during the cut and never came back is not restored;
        // one still lingering whose grace is over ends, with its own last_seen.
        let mut gone = UserState::new(node());
        let lingering = Session { expires_at: 150, lingering: true, ..session("tab", &a, 120, 5) };
        let (c, forget) = gone.sync_node(&a, std::slice::from_ref(&lingering), &node(), 300);
        assert_eq!((c.event, forget.clone()), (None, vec![dev("tab")]), "no online for a client that left");
        gone.sessions = vec![session("tab", &a, 100, 5)];
        let (c, forget) = gone.sync_node(&a, &[lingering], &node(), 300);
        assert_eq!((c.event, forget, gone.last_seen), (Some(EventKind::UserOffline), vec![dev("tab")], Some(120)));
        // Adopted by another node while a was cut off, but the connection is on a: a takes it back.
        let mut adopted = UserState::new(node());
        adopted.sessions = vec![Session { lingering: true, ..session("phone", &c_node, 10, 1) }];
        let (c, forget) = adopted.sync_node(&a, &[session("phone", &a, 10, 1)], &node(), 400);
        assert_eq!((c.event, forget.len()), (None, 0));
        assert_eq!((&*adopted.sessions[0].node_id, adopted.sessions[0].lingering), ("a", false));
        // Nothing changes when the store already agrees.
        let before = s.clone();
        let (c, _) = s.sync_node(&a, &[session("web", &a, 20, 2)], &node(), 300);
        assert_eq!(c.event, None);
        assert_eq!(s.sessions, before.sessions);
        let (c, _) = s.sync_node(&a, &[], &node(), 500);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "web ended on a while it was cut off");
    }

    #[test]
    fn a_drain_writes_the_deadlines_without_an_event() {
        let a: Arc<str> = Arc::from("a");
        let mut s = UserState::new(node());
        s.sessions = vec![session("phone", &a, 10, 1), session("gone", &a, 10, 2)];
        let handed = Session { expires_at: 10_500, lingering: true, ..session("phone", &a, 500, 1) };
        let c = s.hand_over(&a, &[handed], &node(), 600);
        assert_eq!(c.event, Some(EventKind::PresenceUpdated), "a device the node no longer holds ends");
        assert_eq!((s.sessions.len(), s.sessions[0].expires_at, s.sessions[0].lingering), (1, 10_500, true));
        assert_eq!(s.view(&uid(), 10_000).status, Status::Online);
        assert_eq!(s.next_deadline(), Some(10_500));
    }

    #[test]
    fn a_stopping_embedded_node_ends_everything_once() {
        let mut s = UserState::new(node());
        reg(&mut s, "phone", TTL, &node(), 0);
        reg(&mut s, "web", TTL, &node(), 0);
        s.end("web", None, Ending::lost(300, 10_000, 300), &node(), 300);
        let c = s.end_all(&node(), 1_000);
        assert_eq!((c.event, s.last_seen, s.sessions.len()), (Some(EventKind::UserOffline), Some(1_000), 0));
        assert_eq!(s.end_all(&node(), 2_000).event, None);
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
            activity: Default::default(),
        };
        let (_, c4) = s.register(req, &node(), 4_000).unwrap();
        assert_eq!(c4.event, Some(EventKind::PresenceUpdated));
        assert_eq!(s.view(&uid(), 4_000).devices[0].platform, Some(Platform::Desktop));
    }

    #[test]
    fn the_device_limit_is_checked_in_the_step_that_adds() {
        let mut s = UserState::new(node());
        let req = |d: &str| NewSession {
            device: dev(d),
            instance: Arc::from("gw"),
            ttl_ms: 1_000,
            platform: None,
            sid: 1,
            max_devices: 2,
            activity: Default::default(),
        };
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
        let req = |sid| NewSession {
            device: dev("phone"),
            instance: Arc::from("gw"),
            ttl_ms: TTL,
            platform: None,
            sid,
            max_devices: 10,
            activity: Default::default(),
        };
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
    fn a_rebound_session_takes_the_new_ttl_only_while_live_and_only_by_its_tag() {
        let mut s = UserState::new(node());
        let req = |sid| NewSession {
            device: dev("phone"),
            instance: Arc::from("gw"),
            ttl_ms: 4_000,
            platform: None,
            sid,
            max_devices: 10,
            activity: Default::default(),
        };
        s.register(req(1), &node(), 0).unwrap();
        assert!(!s.rebind("phone", 2, TTL, 1_000), "another registration's tag");
        assert!(s.rebind("phone", 1, TTL, 1_000));
        assert_eq!((s.sessions[0].ttl_ms, s.sessions[0].expires_at), (TTL, 1_000 + TTL));
        assert_eq!(s.expire(&node(), 5_000).event, None, "its own TTL no longer ends it");
        assert_eq!(s.refresh("phone", 2_000), Some(2_000 + TTL), "a refresh extends by the new TTL");
        assert!(!s.rebind("phone", 1, TTL, 3_000 + TTL), "a lapsed one is not revived");
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
