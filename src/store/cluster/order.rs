//! Per-user event order on one node.
//!
//! Every event of a user carries the store revision of the write that caused it, and the
//! revisions of one record only grow. Events still reach a node out of order: two
//! local tasks finish their compare-and-swaps in one order and publish in the other, and
//! an event relayed from another node can arrive after a newer local one. A watcher that
//! applied them in arrival order would end on a stale state. So each node admits, per
//! user, only events newer than the last one it admitted.
//!
//! The revisions' memory is bounded by time, not by users: an entry is kept for `keep_ms`
//! after its last event (reordering happens within milliseconds), then forgotten.
//!
//! Apart from that, for each user this node watches (as long as it is watched), it keeps
//! what its watchers were last shown ([`Shown`]: the first read after the user was
//! watched, then every event published here). After the node's subscriptions were interrupted, a
//! user whose stored state is newer and looks different had an event this node missed
//! ([`super::ClusterStore::catch_up`]).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::core::{Millis, Presence, Status, UserId};

#[derive(Debug)]
pub struct EventOrder {
    last: HashMap<UserId, (u64, Millis)>,
    keep_ms: i64,
    pruned_at: Millis,
    /// Watched users: what their watchers were shown (`None`: not read yet).
    shown: HashMap<UserId, Option<Shown>>,
}

/// What the watchers of a user were last shown, in brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    /// The newest revision shown (a change made here while cut off has none: kept).
    pub revision: u64,
    /// Any status but offline.
    pub online: bool,
    /// A digest of what a watcher sees (status, message, devices, times of the status),
    /// not of what a write of the same state changes too (`updated_at`, `last_seen`, the
    /// node): a write-back of what was shown is not a change.
    pub view: u64,
}

impl Shown {
    pub fn of(p: &Presence) -> Shown {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (p.status, &p.message, p.appear_offline, p.device_count, p.expires_at, p.idle_since).hash(&mut h);
        for d in p.devices.iter() {
            (&d.device_id, d.platform, d.active, d.idle_since).hash(&mut h);
        }
        Shown { revision: p.revision, online: p.status != Status::Offline, view: h.finish() }
    }

    /// Whether `p`, stored, is a state its watchers were not shown.
    pub fn missed(&self, p: &Presence) -> bool {
        p.revision > self.revision && Shown::of(p).view != self.view
    }
}

impl EventOrder {
    pub fn new(keep_ms: i64) -> EventOrder {
        EventOrder { last: HashMap::new(), keep_ms: keep_ms.max(1), pruned_at: 0, shown: HashMap::new() }
    }

    /// `user` is watched here from now on (`false`: no longer).
    pub fn watch(&mut self, user: &UserId, on: bool) {
        if on {
            self.shown.entry(user.clone()).or_insert(None);
        } else {
            self.shown.remove(user);
        }
    }

    /// A read of `user` (`None`: no record): the watchers' snapshot if it is the first
    /// since the user was watched (later reads are not what earlier watchers were given).
    pub fn read(&mut self, user: &UserId, p: Option<&Presence>) {
        if let Some(shown @ None) = self.shown.get_mut(user) {
            // No record: the watchers were shown the user as never seen.
            *shown = Some(p.map_or_else(|| Shown::of(&Presence::unknown(user.clone(), Arc::from(""))), Shown::of));
        }
    }

    /// `p` was published to this node's watchers (or they were shown it already).
    pub fn show(&mut self, p: &Presence) {
        if let Some(shown) = self.shown.get_mut(&p.user_id) {
            let revision = shown.map_or(0, |s| s.revision).max(p.revision);
            *shown = Some(Shown { revision, ..Shown::of(p) });
        }
    }

    /// Each watched user with what its watchers were shown (`None`: never read).
    pub fn shown(&self) -> Vec<(UserId, Option<Shown>)> {
        self.shown.iter().map(|(u, s)| (u.clone(), *s)).collect()
    }

    /// What `user`'s watchers were shown, if watched and read.
    pub fn shown_of(&self, user: &UserId) -> Option<Shown> {
        self.shown.get(user).copied().flatten()
    }

    /// Whether an event of `user` at `revision` is newer than every one admitted so far
    /// (and records it). Revision `0` (unknown: a change made while cut off from the
    /// store) is always admitted.
    pub fn admit(&mut self, user: &UserId, revision: u64, now: Millis) -> bool {
        self.prune(now);
        if revision == 0 {
            return true;
        }
        match self.last.get_mut(user) {
            Some((last, _)) if *last >= revision => false,
            Some(entry) => {
                *entry = (revision, now);
                true
            }
            None => {
                self.last.insert(user.clone(), (revision, now));
                true
            }
        }
    }

    fn prune(&mut self, now: Millis) {
        if now - self.pruned_at < self.keep_ms {
            return;
        }
        self.pruned_at = now;
        let keep = self.keep_ms;
        self.last.retain(|_, (_, at)| now - *at < keep);
        // A burst (every user connecting) must not leave its table behind.
        if self.last.capacity() > 64 && self.last.capacity() > 4 * self.last.len() {
            self.last.shrink_to_fit();
        }
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    #[test]
    fn older_and_repeated_revisions_are_dropped_per_user() {
        let mut o = EventOrder::new(60_000);
        assert!(o.admit(&u("a"), 6, 0));
        assert!(!o.admit(&u("a"), 5, 1), "published late: older than what was admitted");
        assert!(!o.admit(&u("a"), 6, 2), "the same event twice");
        assert!(o.admit(&u("b"), 5, 3), "per user");
        assert!(o.admit(&u("a"), 7, 4));
        assert!(o.admit(&u("a"), 0, 5) && o.admit(&u("a"), 0, 6), "unknown revisions always pass");
    }

    fn at(user: &str, status: Status, revision: u64) -> Presence {
        Presence { status, revision, ..Presence::unknown(u(user), std::sync::Arc::from("n")) }
    }

    #[test]
    fn watched_users_keep_what_their_watchers_were_shown() {
        let mut o = EventOrder::new(1_000);
        o.show(&at("a", Status::Online, 3));
        assert_eq!(o.shown_of(&u("a")), None, "not watched: nothing kept");
        o.watch(&u("a"), true);
        o.read(&u("a"), Some(&at("a", Status::Online, 4)));
        o.read(&u("a"), Some(&at("a", Status::Offline, 9)));
        let first = o.shown_of(&u("a")).unwrap();
        assert_eq!((first.revision, first.online), (4, true), "the first read is the watchers' snapshot; later ones are not theirs");
        o.show(&at("a", Status::Away, 6));
        assert_eq!(o.shown_of(&u("a")).map(|s| (s.revision, s.online)), Some((6, true)), "then each event published");
        // A change made here while cut off (no revision yet): its view, the revision kept.
        o.show(&at("a", Status::Offline, 0));
        let s = o.shown_of(&u("a")).unwrap();
        assert_eq!((s.revision, s.online), (6, false));
        // Stored later: missed only if it looks different from what was shown.
        assert!(!s.missed(&at("a", Status::Offline, 8)), "the write-back of what was shown");
        assert!(s.missed(&at("a", Status::Online, 8)));
        assert!(!s.missed(&at("a", Status::Online, 5)), "older than shown");
        o.admit(&u("b"), 1, 5_000);
        assert_eq!(o.shown().len(), 1, "kept past the reordering window while watched");
        o.watch(&u("a"), false);
        assert!(o.shown().is_empty());
        o.watch(&u("a"), true);
        o.read(&u("a"), None);
        let s = o.shown_of(&u("a")).unwrap();
        assert!(!s.online, "no record: shown offline");
        assert!(!s.missed(&at("a", Status::Offline, 8)), "an offline record written later is what was shown");
    }

    #[test]
    fn entries_are_forgotten_after_their_time() {
        let mut o = EventOrder::new(1_000);
        o.admit(&u("a"), 5, 0);
        o.admit(&u("b"), 5, 900);
        o.admit(&u("c"), 1, 1_500);
        assert_eq!(o.len(), 2, "a was pruned, b kept");
        assert!(o.admit(&u("a"), 3, 1_600), "a forgotten: a very late event passes");
    }
}
