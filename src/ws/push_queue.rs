//! A connection's push queue: what waits to be written to one WebSocket.
//!
//! Bounded, in order, and coalescing: a presence push for a watched user (and a typing
//! push for a conversation and typist) replaces the one still pending for the same key,
//! at that one's place in line, so a slow reader holds at most one pending presence per
//! watched user. Past the bound the queue asks to close with 1013. While a snapshot is
//! read for the connection, an event pushed meanwhile wins over the snapshot's older
//! state of that user. No lock and no wake-up here: [`super::client::Client`] holds the
//! queue under its mutex and wakes its writer when a method says so.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::core::UserId;
use crate::error::close;

/// What a coalescing push replaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PushKey {
    Presence(UserId),
    Typing(Arc<str>, UserId),
}

enum Entry {
    Keyed(PushKey),
    Msg(Utf8Bytes),
}

/// Queue room an idle connection keeps between bursts.
const IDLE_ROOM: usize = 4;

/// Why a connection is asked to close: code and reason.
pub type CloseRequest = (u16, &'static str);

#[derive(Default)]
pub struct PushQueue {
    queue: VecDeque<Entry>,
    keyed: HashMap<PushKey, Utf8Bytes>,
    close: Option<CloseRequest>,
    /// While snapshots are being read for this connection (how many, and the keys an
    /// event was pushed for meanwhile): a snapshot's state of such a user is older than
    /// that event's, and must not follow it (it would show a departed user online until
    /// the next change). `None` when no snapshot runs: nothing kept for idle connections
    /// (boxed: one pointer in every connection's queue).
    fresh: Option<Box<(u32, HashSet<PushKey>)>>,
}

impl PushQueue {
    /// Queues a coalescable push: a pending push with the same key is replaced.
    /// `checked: false` for snapshots the client asked for: bounded by its subscription
    /// limit, they are not backlog and do not count against `limit`. Returns whether the
    /// writer has something new to do.
    pub fn push_keyed(&mut self, key: PushKey, payload: Utf8Bytes, checked: bool, limit: usize) -> bool {
        if self.close.is_some() {
            return false;
        }
        if let Some((_, fresh)) = self.fresh.as_deref_mut() {
            if !checked && fresh.contains(&key) {
                return false; // a snapshot older than an event already pushed
            }
            if checked {
                fresh.insert(key.clone());
            }
        }
        if let Some(slot) = self.keyed.get_mut(&key) {
            *slot = payload;
            metrics::counter!("ws_coalesced_total").increment(1);
            return false;
        }
        if checked && self.queue.len() >= limit {
            self.overflow();
        } else {
            self.keyed.insert(key.clone(), payload);
            self.queue.push_back(Entry::Keyed(key));
        }
        true
    }

    /// Queues a message that is delivered as is, in order (acks, errors). Returns whether
    /// the writer has something new to do.
    pub fn push(&mut self, payload: Utf8Bytes, limit: usize) -> bool {
        if self.close.is_some() {
            return false;
        }
        if self.queue.len() >= limit {
            self.overflow();
        } else {
            self.queue.push_back(Entry::Msg(payload));
        }
        true
    }

    /// A snapshot of this connection is about to be read: events pushed from now until
    /// [`PushQueue::end_snapshot`] win over it.
    pub fn begin_snapshot(&mut self) {
        match self.fresh.as_deref_mut() {
            Some((n, _)) => *n += 1,
            None => self.fresh = Some(Box::new((1, HashSet::new()))),
        }
    }

    pub fn end_snapshot(&mut self) {
        if let Some((n, _)) = self.fresh.as_deref_mut() {
            *n -= 1;
            if *n == 0 {
                self.fresh = None;
            }
        }
    }

    fn overflow(&mut self) {
        metrics::counter!("ws_dropped_total", "reason" => "slow_consumer").increment(1);
        self.close = Some((close::TRY_AGAIN_LATER, "outbound queue full: client too slow"));
        self.queue.clear();
        self.keyed.clear();
    }

    /// Asks to close with `code` (the first request wins).
    pub fn close(&mut self, code: u16, reason: &'static str) {
        if self.close.is_none() {
            self.close = Some((code, reason));
        }
    }

    /// Moves everything pending into `out`; returns the close request, if any.
    pub fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseRequest> {
        if let Some(c) = self.close {
            return Some(c);
        }
        out.reserve(self.queue.len());
        while let Some(e) = self.queue.pop_front() {
            match e {
                Entry::Msg(m) => out.push(m),
                Entry::Keyed(k) => {
                    if let Some(m) = self.keyed.remove(&k) {
                        out.push(m);
                    }
                }
            }
        }
        // A burst (a snapshot of many users) must not leave an idle connection holding
        // room for the next one.
        if self.queue.capacity() > IDLE_ROOM {
            self.queue.shrink_to(IDLE_ROOM);
        }
        if self.keyed.capacity() > IDLE_ROOM {
            self.keyed.shrink_to(0);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(u: &str) -> PushKey {
        PushKey::Presence(UserId::parse(u, 8).unwrap())
    }

    fn msg(s: &str) -> Utf8Bytes {
        Utf8Bytes::from(s.to_string())
    }

    #[test]
    fn coalesces_per_watched_user_and_keeps_order() {
        let mut q = PushQueue::default();
        assert!(q.push_keyed(key("a"), msg("a1"), true, 10));
        assert!(q.push(msg("ack1"), 10));
        assert!(q.push_keyed(key("b"), msg("b1"), true, 10));
        assert!(!q.push_keyed(key("a"), msg("a2"), true, 10), "a replacement is nothing new to write");
        let mut out = Vec::new();
        assert_eq!(q.drain(&mut out), None);
        let got: Vec<&str> = out.iter().map(|m| m.as_str()).collect();
        assert_eq!(got, vec!["a2", "ack1", "b1"], "only the newest state of a, at a's place in line");
        out.clear();
        q.push_keyed(key("a"), msg("a3"), true, 10);
        assert_eq!(q.drain(&mut out), None);
        assert_eq!(out.len(), 1);
    }

    /// A watcher re-subscribing reads its snapshot while events go on: an event pushed
    /// meanwhile (a departure, say) is newer than the snapshot's state of that user, which
    /// must not follow it, whether the event is still queued or already written.
    #[test]
    fn an_event_pushed_while_a_snapshot_is_read_wins_over_it() {
        let mut q = PushQueue::default();
        q.begin_snapshot();
        q.push_keyed(key("a"), msg("a offline (event)"), true, 10);
        let mut out = Vec::new();
        q.drain(&mut out); // written before the snapshot is queued
        assert!(!q.push_keyed(key("a"), msg("a online (snapshot)"), false, 10));
        q.push_keyed(key("b"), msg("b (snapshot)"), false, 10);
        q.end_snapshot();
        q.drain(&mut out);
        let got: Vec<&str> = out.iter().map(|m| m.as_str()).collect();
        assert_eq!(got, vec!["a offline (event)", "b (snapshot)"]);
        assert!(q.fresh.is_none(), "nothing kept once no snapshot runs");
        out.clear();
        q.push_keyed(key("a"), msg("a (next snapshot)"), false, 10);
        q.drain(&mut out);
        assert_eq!(out.len(), 1, "a later snapshot is sent");
    }

    #[test]
    fn overflow_requests_close_1013() {
        let mut q = PushQueue::default();
        q.push(msg("1"), 2);
        q.push(msg("2"), 2);
        // A new key at the limit overflows...
        assert!(q.push_keyed(key("a"), msg("x"), true, 2), "the writer must see the close");
        assert_eq!(q.drain(&mut Vec::new()), Some((close::TRY_AGAIN_LATER, "outbound queue full: client too slow")));
        // ...and after a close request nothing more is queued.
        assert!(!q.push(msg("3"), 2));
        assert!(q.queue.is_empty());
    }

    #[test]
    fn snapshots_the_client_asked_for_do_not_count_against_the_bound() {
        let mut q = PushQueue::default();
        for u in ["a", "b", "c"] {
            q.push_keyed(key(u), msg(u), false, 1);
        }
        let mut out = Vec::new();
        assert_eq!(q.drain(&mut out), None);
        assert_eq!(out.len(), 3);
    }
}
