//! The sessions this node owns, in memory: their real deadlines, heartbeats and the
//! owner index bookkeeping. No I/O; the store drives it under one lock.
//!
//! In the store a session this node owns is stored with expiry [`crate::core::HELD`]: it
//! lives while this node's lease does. Heartbeats only move the deadline here; when a
//! deadline passes without one, the store ends the session there. A session whose
//! connection went (a lost socket, a plain unregistration) stays here as *lingering*
//! until the end of its offline grace: no heartbeat moves it, a registration of the
//! device replaces it, and the store is written only when the grace ends (or the device
//! registers again), not when the socket goes.

use std::sync::Arc;

use crate::core::{DeviceId, Millis, TimerWheel, UserId};
use crate::shards::FastMap;

/// One owned session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub instance: Arc<str>,
    pub platform: Option<crate::core::Platform>,
    /// Tag of the registration (see [`crate::core::Session::sid`]).
    pub sid: u64,
    pub ttl_ms: i64,
    pub connected_at: Millis,
    pub expires_at: Millis,
    pub last_heartbeat: Millis,
    /// When `last_seen` was last written to the store for it.
    pub written_at: Millis,
    /// The connection is gone; held until `expires_at` (the offline grace), not refreshed.
    pub lingering: bool,
}

impl Owned {
    /// A session adopted from another node (its real deadline in `expires_at`).
    pub fn of(s: &crate::core::Session, now: Millis) -> Owned {
        Owned {
            instance: s.instance_id.clone(),
            platform: s.platform,
            sid: s.sid,
            ttl_ms: s.ttl_ms,
            connected_at: s.connected_at,
            expires_at: s.expires_at,
            last_heartbeat: s.last_heartbeat,
            written_at: now,
            lingering: s.lingering,
        }
    }

    /// The session as this node holds it, its real deadline in `expires_at`.
    pub fn session(&self, device: &DeviceId, node: &Arc<str>) -> crate::core::Session {
        crate::core::Session {
            device_id: device.clone(),
            instance_id: self.instance.clone(),
            connected_at: self.connected_at,
            last_heartbeat: self.last_heartbeat,
            expires_at: self.expires_at,
            ttl_ms: self.ttl_ms,
            node_id: node.clone(),
            platform: self.platform,
            sid: self.sid,
            lingering: self.lingering,
            // Not kept here: a session written back after the store lost it reads active
            // until its device next says otherwise.
            idle_since: None,
            away_at: None,
        }
    }
}

#[derive(Debug, Default)]
struct LocalUser {
    devices: FastMap<DeviceId, Owned>,
    /// Registrations in flight (index written, record not yet).
    pending: u32,
}

/// What a heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    pub expires_at: Millis,
    /// `last_seen` is due to be written (per `presence.last_seen_interval`).
    pub write_last_seen: bool,
}

#[derive(Debug)]
pub struct OwnedTable {
    users: FastMap<UserId, LocalUser>,
    /// Sessions to look at when their deadline passes (lazy: a deadline moved later by a
    /// heartbeat is re-armed when the old one comes due).
    wheel: TimerWheel<(UserId, DeviceId)>,
    sessions: u64,
}

impl OwnedTable {
    pub fn new(tick_ms: i64) -> OwnedTable {
        OwnedTable { users: FastMap::default(), wheel: TimerWheel::new(tick_ms), sessions: 0 }
    }

    fn arm(&mut self, user: &UserId, device: &DeviceId, deadline: Millis) {
        self.wheel.insert(deadline, (user.clone(), device.clone()));
    }

    /// A registration is about to be written: keeps the owner index entry alive meanwhile.
    /// Returns whether the user had no index entry yet (the caller writes it).
    pub fn begin(&mut self, user: &UserId) -> bool {
        let u = self.users.entry(user.clone()).or_default();
        let first = u.devices.is_empty() && u.pending == 0;
        u.pending += 1;
        first
    }

    /// The registration was written (`Some`) or failed (`None`).
    pub fn finish(&mut self, user: &UserId, device: &DeviceId, session: Option<Owned>) {
        let Some(u) = self.users.get_mut(user) else { return };
        u.pending = u.pending.saturating_sub(1);
        if let Some(o) = session {
            let deadline = o.expires_at;
            if u.devices.insert(device.clone(), o).is_none() {
                self.sessions += 1;
            }
            self.arm(user, device, deadline);
        } else if u.devices.is_empty() && u.pending == 0 {
            self.users.remove(user);
        }
    }

    /// Adds a session adopted from another node (between [`OwnedTable::begin`] and
    /// [`OwnedTable::finish`]), due at its `expires_at`.
    pub fn insert(&mut self, user: &UserId, device: &DeviceId, o: Owned) {
        let deadline = o.expires_at;
        let u = self.users.entry(user.clone()).or_default();
        if u.devices.insert(device.clone(), o).is_none() {
            self.sessions += 1;
        }
        self.arm(user, device, deadline);
    }

    /// Puts back a lapsed session whose end could not be written to the store yet, due
    /// again at `retry_at`. Left out if a registration of the device took its place.
    pub fn requeue(&mut self, user: &UserId, device: &DeviceId, o: Owned, retry_at: Millis) {
        let u = self.users.entry(user.clone()).or_default();
        if u.devices.contains_key(device) {
            return;
        }
        u.devices.insert(device.clone(), o);
        self.sessions += 1;
        self.arm(user, device, retry_at);
    }

    /// A heartbeat of an owned session alive at `now`; `None` if this node does not hold
    /// it (or holds it only for the grace: its connection went).
    pub fn beat(&mut self, user: &UserId, device: &str, now: Millis, last_seen_interval: i64) -> Option<Beat> {
        let o = self.users.get_mut(user)?.devices.get_mut(device).filter(|o| o.expires_at > now && !o.lingering)?;
        o.expires_at = now.saturating_add(o.ttl_ms);
        o.last_heartbeat = now;
        let write_last_seen = last_seen_interval > 0 && now - o.written_at >= last_seen_interval;
        if write_last_seen {
            o.written_at = now;
        }
        Some(Beat { expires_at: o.expires_at, write_last_seen })
    }

    /// The connection of an owned session went (the registration tagged `sid`, when
    /// given): it is held until `until` (kept if already held to an earlier one), its
    /// device last heard at `last_heard`. `None` when this node does not hold it, else
    /// whether it was live until now.
    pub fn linger(&mut self, user: &UserId, device: &str, sid: Option<u64>, until: Millis, last_heard: Millis) -> Option<bool> {
        let u = self.users.get_mut(user)?;
        let key = u.devices.get_key_value(device).map(|(k, _)| k.clone())?;
        let o = u.devices.get_mut(device).filter(|o| sid.is_none_or(|t| t == o.sid))?;
        let was_live = !o.lingering;
        o.expires_at = if o.lingering { o.expires_at.min(until) } else { until };
        o.lingering = true;
        o.last_heartbeat = o.last_heartbeat.max(last_heard);
        let deadline = o.expires_at;
        self.arm(user, &key, deadline);
        Some(was_live)
    }

    /// Forgets a session (ended by a client or by another node). Returns it if it was held.
    pub fn remove(&mut self, user: &UserId, device: &str) -> Option<Owned> {
        self.remove_tagged(user, device, None)
    }

    /// [`OwnedTable::remove`], only for the registration tagged `sid` when given (a newer
    /// registration of the device here stays).
    pub fn remove_tagged(&mut self, user: &UserId, device: &str, sid: Option<u64>) -> Option<Owned> {
        let u = self.users.get_mut(user)?;
        if sid.is_some_and(|t| u.devices.get(device).is_some_and(|o| o.sid != t)) {
            return None;
        }
        let o = u.devices.remove(device)?;
        self.sessions -= 1;
        if u.devices.is_empty() && u.pending == 0 {
            self.users.remove(user);
        }
        Some(o)
    }

    /// Whether this node holds nothing for `user` any more (its index entry can go).
    pub fn is_unowned(&self, user: &UserId) -> bool {
        !self.users.contains_key(user)
    }

    /// Removes and returns the sessions whose deadline passed at `now`.
    pub fn lapsed(&mut self, now: Millis) -> Vec<(UserId, DeviceId, Owned)> {
        let mut out = Vec::new();
        for (_, (user, device)) in self.wheel.take_due(now) {
            let Some(o) = self.users.get(&user).and_then(|u| u.devices.get(&device)) else { continue };
            if o.expires_at > now {
                let deadline = o.expires_at;
                self.arm(&user, &device, deadline);
            } else if let Some(o) = self.remove(&user, &device) {
                out.push((user, device, o));
            }
        }
        out
    }

    /// Every owned session (to write them again after this node's lease was lost).
    pub fn all(&self) -> Vec<(UserId, DeviceId, Owned)> {
        self.users.iter().flat_map(|(u, lu)| lu.devices.iter().map(move |(d, o)| (u.clone(), d.clone(), o.clone()))).collect()
    }

    /// The sessions of `user` this node owns.
    pub fn all_of(&self, user: &UserId) -> Vec<(DeviceId, Owned)> {
        self.users.get(user).map(|u| u.devices.iter().map(|(d, o)| (d.clone(), o.clone())).collect()).unwrap_or_default()
    }

    /// Whether this node holds a live (not lingering) session of `user` on a device
    /// `shown` does not list: the store lost it (anti-entropy, see the cluster store).
    pub fn missing_from(&self, user: &UserId, shown: &[crate::core::DeviceSummary], now: Millis) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.devices.iter().any(|(d, o)| !o.lingering && o.expires_at > now && !shown.iter().any(|s| s.device_id == *d)))
    }

    pub fn session_count(&self) -> u64 {
        self.sessions
    }

    pub fn user_count(&self) -> u64 {
        self.users.len() as u64
    }

    /// Sessions held here of gateway instance `instance`, each as the store would list it.
    pub fn of_instance(&self, instance: &str, node: &Arc<str>) -> Vec<(UserId, crate::core::Session)> {
        let mut out = Vec::new();
        for (user, u) in &self.users {
            for (device, o) in u.devices.iter().filter(|(_, o)| &*o.instance == instance) {
                out.push((user.clone(), o.session(device, node)));
            }
        }
        out
    }

    /// Gives the live registration of `device` tagged `sid` the TTL `ttl_ms` from `now`
    /// (bound to its instance's lease). Only memory changes: the store keeps an owned
    /// session with this node's lease as its deadline. The old wheel entry re-arms when due.
    pub fn rebind(&mut self, user: &UserId, device: &str, sid: u64, ttl_ms: i64, now: Millis) -> bool {
        let Some(o) = self.users.get_mut(user).and_then(|u| u.devices.get_mut(device)) else { return false };
        if o.sid != sid || o.lingering || o.expires_at <= now {
            return false;
        }
        o.ttl_ms = ttl_ms;
        o.expires_at = now.saturating_add(ttl_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    fn owned(now: Millis, ttl: i64) -> Owned {
        Owned {
            instance: Arc::from("gw"),
            platform: None,
            sid: 0,
            ttl_ms: ttl,
            connected_at: now,
            expires_at: now + ttl,
            last_heartbeat: now,
            written_at: now,
            lingering: false,
        }
    }

    #[test]
    fn heartbeats_move_the_deadline_and_lapse_only_when_they_stop() {
        let mut t = OwnedTable::new(10);
        let (u, d): (UserId, DeviceId) = (uid("alice"), Arc::from("phone"));
        assert!(t.begin(&u));
        t.finish(&u, &d, Some(owned(0, 100)));
        assert_eq!(t.session_count(), 1);
        for now in [50, 100, 140] {
            assert_eq!(t.beat(&u, "phone", now, 0), Some(Beat { expires_at: now + 100, write_last_seen: false }));
        }
        assert!(t.lapsed(200).is_empty(), "deadline moved to 240");
        let gone = t.lapsed(250);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].2.last_heartbeat, 140);
        assert!(t.is_unowned(&u));
        assert_eq!(t.beat(&u, "phone", 260, 0), None);
    }

    #[test]
    fn last_seen_is_due_once_per_interval() {
        let mut t = OwnedTable::new(10);
        let (u, d): (UserId, DeviceId) = (uid("bob"), Arc::from("web"));
        t.begin(&u);
        t.finish(&u, &d, Some(owned(0, 1000)));
        let due: Vec<bool> = [100, 200, 300, 350, 500].iter().map(|n| t.beat(&u, "web", *n, 250).unwrap().write_last_seen).collect();
        assert_eq!(due, vec![false, false, true, false, false]);
        assert!(t.beat(&u, "web", 550, 250).unwrap().write_last_seen);
    }

    #[test]
    fn a_pending_registration_keeps_the_index_entry() {
        let mut t = OwnedTable::new(10);
        let u = uid("carol");
        let (a, b): (DeviceId, DeviceId) = (Arc::from("a"), Arc::from("b"));
        assert!(t.begin(&u));
        t.finish(&u, &a, Some(owned(0, 100)));
        assert!(!t.begin(&u), "index already written");
        assert!(t.remove(&u, "a").is_some());
        assert!(!t.is_unowned(&u), "b's registration is in flight");
        t.finish(&u, &b, None);
        assert!(t.is_unowned(&u));
    }
}
