//! Per-user event order on one node.
//!
//! Every event of a user carries the store revision of the write that caused it, and the
//! revisions of one record only grow. Events still reach a node out of order: two
//! local tasks finish their compare-and-swaps in one order and publish in the other, and
//! an event relayed from another node can arrive after a newer local one. A watcher that
//! applied them in arrival order would end on a stale state. So each node admits, per
//! user, only events newer than the last one it admitted.
//!
//! The memory is bounded by time, not by users: an entry is kept for `keep_ms` after its
//! last event (reordering happens within milliseconds), then forgotten.

use std::collections::HashMap;

use crate::core::{Millis, UserId};

#[derive(Debug)]
pub struct EventOrder {
    last: HashMap<UserId, (u64, Millis)>,
    keep_ms: i64,
    pruned_at: Millis,
}

impl EventOrder {
    pub fn new(keep_ms: i64) -> EventOrder {
        EventOrder { last: HashMap::new(), keep_ms: keep_ms.max(1), pruned_at: 0 }
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
