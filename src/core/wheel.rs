//! A coarse timer wheel: deadlines rounded up to ticks of `tick_ms`, and the keys due at
//! or before a time. Used for everything that lapses: sessions and statuses in the
//! embedded store, owned sessions and status expiry in cluster mode, typing indicators.
//!
//! Pure: the caller owns the wheel (under its own lock) and says what time it is. A key
//! may be inserted more than once (a later deadline of the same thing); the caller
//! checks, when a key comes due, whether it is still due (lazy cancellation), so moving a
//! deadline later costs nothing here.

use std::collections::BTreeMap;

use super::model::Millis;

#[derive(Debug)]
pub struct TimerWheel<K> {
    tick_ms: i64,
    slots: BTreeMap<i64, Vec<K>>,
    len: usize,
}

impl<K> TimerWheel<K> {
    pub fn new(tick_ms: i64) -> TimerWheel<K> {
        TimerWheel { tick_ms: tick_ms.max(1), slots: BTreeMap::new(), len: 0 }
    }

    /// The tick at which `deadline` falls due: rounded up, so never early.
    pub fn tick_of(&self, deadline: Millis) -> i64 {
        deadline.div_euclid(self.tick_ms) + i64::from(deadline.rem_euclid(self.tick_ms) != 0)
    }

    /// The last tick due at `now`.
    fn due_tick(&self, now: Millis) -> i64 {
        now.div_euclid(self.tick_ms)
    }

    /// Schedules `key` at `deadline`; returns its tick.
    pub fn insert(&mut self, deadline: Millis, key: K) -> i64 {
        let tick = self.tick_of(deadline);
        self.slots.entry(tick).or_default().push(key);
        self.len += 1;
        tick
    }

    /// Whether anything is due at `now`.
    pub fn any_due(&self, now: Millis) -> bool {
        self.slots.first_key_value().is_some_and(|(t, _)| *t <= self.due_tick(now))
    }

    /// Removes and returns every key due at `now`, with its tick, earliest first.
    pub fn take_due(&mut self, now: Millis) -> Vec<(i64, K)> {
        if !self.any_due(now) {
            return Vec::new();
        }
        let later = self.slots.split_off(&(self.due_tick(now) + 1));
        let due = std::mem::replace(&mut self.slots, later);
        let out: Vec<(i64, K)> = due.into_iter().flat_map(|(t, keys)| keys.into_iter().map(move |k| (t, k))).collect();
        self.len -= out.len();
        out
    }

    /// The earliest tick anything is scheduled at (stale entries included), in ms since
    /// the epoch: when the wheel next has something to say.
    pub fn next_due(&self) -> Option<Millis> {
        self.slots.first_key_value().map(|(t, _)| t.saturating_mul(self.tick_ms))
    }

    /// Keys scheduled (stale ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_due_at_their_tick_never_early() {
        let mut w = TimerWheel::new(100);
        assert_eq!(w.insert(1_050, "a"), 11);
        assert_eq!(w.insert(1_100, "b"), 11, "a deadline on a tick is due at that tick");
        assert_eq!(w.insert(900, "c"), 9);
        assert_eq!(w.insert(5_000, "d"), 50);
        assert_eq!(w.len(), 4);
        assert!(w.take_due(899).is_empty());
        assert_eq!(w.take_due(1_099), vec![(9, "c")]);
        assert_eq!(w.take_due(1_100), vec![(11, "a"), (11, "b")]);
        assert!(!w.any_due(4_999));
        assert_eq!(w.take_due(10_000), vec![(50, "d")]);
        assert!(w.is_empty());
    }

    #[test]
    fn negative_times_round_up_too() {
        let w: TimerWheel<()> = TimerWheel::new(100);
        assert_eq!(w.tick_of(-150), -1);
        assert_eq!(w.tick_of(-100), -1);
    }
}
