//! The in-process event bus: every presence transition, published once, read by every
//! transport and backend that subscribed. A subscriber that falls behind by more than the
//! capacity gets `Lagged` and must resynchronise from the store; publishers never block.
//!
//! Beside events the bus carries typing indicators (ephemeral, never stored: the service
//! publishes them, the WebSocket hub delivers them, a cluster backend relays them),
//! directory changes (a user's contacts or privacy settings changed, here or on another
//! node: the hub tells the watchers whose view changed), and *interest*: which users
//! this node's connections watch, so a cluster backend subscribes to other nodes' events
//! about those users only (interest-routed fan-out).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use crate::core::{Event, Privacy, UserId};

/// A typing indicator, as the hub reports it and a cluster backend relays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typing {
    /// The node the typist is connected to.
    pub node_id: Arc<str>,
    pub conversation: Arc<str>,
    pub user_id: UserId,
    pub is_typing: bool,
}

/// A directory row changed what someone may see of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChanged {
    /// `user`'s contacts changed; `changed` were added or dropped.
    Contacts { user: UserId, changed: Vec<UserId> },
    /// `user`'s privacy settings changed from `previous`.
    Privacy { user: UserId, previous: Privacy },
    /// A conversation's members changed: `added` joined, `removed` left.
    Members { conversation: Arc<str>, added: Vec<UserId>, removed: Vec<UserId> },
}

/// A change of this node's interest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterestChange {
    /// A first local watcher of the user appeared.
    Watch(UserId),
    /// The last local watcher of the user left.
    Unwatch(UserId),
    /// Whether something here watches every user (a gRPC `WatchPresence { all: true }`).
    All(bool),
}

#[derive(Default)]
struct InterestState {
    counts: HashMap<UserId, usize>,
    all: usize,
    /// Changes sent to the follower so far (their sequence numbers).
    seq: u64,
    follower: Option<mpsc::UnboundedSender<(u64, InterestChange)>>,
    /// The follower takes every user's events already and lets through those of whoever
    /// is watched at the moment they arrive: a newly watched user needs no wait.
    at_once: bool,
}

impl InterestState {
    fn send(&mut self, change: InterestChange) {
        if let Some(f) = &self.follower {
            self.seq += 1;
            let _ = f.send((self.seq, change));
        }
    }
}

/// Reference counts of watched users (each source adds a user at most once per reason).
#[derive(Clone, Default)]
pub struct Interest {
    state: Arc<Mutex<InterestState>>,
    /// Set once a backend follows: until then reports cost one atomic load.
    followed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Interest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interest").field("watched", &self.watched()).finish()
    }
}

impl Interest {
    pub fn add<'a>(&self, ids: impl IntoIterator<Item = &'a UserId>) {
        if !self.is_followed() {
            return; // nobody routes by interest (the embedded store): nothing to count
        }
        let mut s = self.state.lock();
        for id in ids {
            let n = s.counts.entry(id.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                s.send(InterestChange::Watch(id.clone()));
            }
        }
    }

    pub fn remove<'a>(&self, ids: impl IntoIterator<Item = &'a UserId>) {
        if !self.is_followed() {
            return;
        }
        let mut s = self.state.lock();
        for id in ids {
            let Some(n) = s.counts.get_mut(id) else { continue };
            *n -= 1;
            if *n == 0 {
                s.counts.remove(id);
                s.send(InterestChange::Unwatch(id.clone()));
            }
        }
    }

    pub fn set_all(&self, on: bool) {
        if !self.is_followed() {
            return;
        }
        let mut s = self.state.lock();
        let before = s.all > 0;
        if on {
            s.all += 1;
        } else {
            s.all = s.all.saturating_sub(1);
        }
        let after = s.all > 0;
        if before != after {
            s.send(InterestChange::All(after));
        }
    }

    /// Whether a backend routes by interest (otherwise transports need not report it).
    pub fn is_followed(&self) -> bool {
        self.followed.load(Ordering::Acquire)
    }

    /// Users watched now.
    pub fn watched(&self) -> usize {
        self.state.lock().counts.len()
    }

    /// Whether something here watches the user now (or every user).
    pub fn is_watched(&self, id: &str) -> bool {
        let s = self.state.lock();
        s.all > 0 || s.counts.contains_key(id)
    }

    /// Whether something here watches this user by id (not merely every user).
    pub fn watches(&self, id: &UserId) -> bool {
        self.state.lock().counts.contains_key(id)
    }

    /// [`Interest::watches`] for each of `ids`, under one lock.
    pub fn watches_each(&self, ids: &[UserId]) -> Vec<bool> {
        let s = self.state.lock();
        ids.iter().map(|id| s.counts.contains_key(id)).collect()
    }

    /// Sequence number of the last change sent to the follower: once the follower has
    /// applied it, events about every user watched before this call reach this node.
    pub fn seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// As [`seq`](Self::seq), or `None` when the follower takes every user's events and
    /// filters them by this interest as they arrive: nothing to wait for.
    pub fn seq_to_wait_for(&self) -> Option<u64> {
        let s = self.state.lock();
        (!s.at_once).then_some(s.seq)
    }

    /// The follower says whether it takes every user's events and filters them by this
    /// interest as they arrive. Returns the sequence number of the last change sent: when
    /// turning it off, the follower applies the changes up to it before it stops taking
    /// every user's events (a caller that saw `at_once` did not wait for its change).
    pub fn set_at_once(&self, on: bool) -> u64 {
        let mut s = self.state.lock();
        s.at_once = on;
        s.seq
    }

    /// The changes from now on, numbered (one follower: the backend, which calls this
    /// before any transport exists; without a follower nothing is counted).
    pub fn follow(&self) -> mpsc::UnboundedReceiver<(u64, InterestChange)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.state.lock();
        s.follower = Some(tx);
        self.followed.store(true, Ordering::Release);
        let ids: Vec<UserId> = s.counts.keys().cloned().collect();
        for id in ids {
            s.send(InterestChange::Watch(id));
        }
        if s.all > 0 {
            s.send(InterestChange::All(true));
        }
        rx
    }
}

/// Interest held until dropped (a gRPC watch stream's users).
pub struct InterestGuard {
    interest: Interest,
    ids: Vec<UserId>,
    all: bool,
}

impl InterestGuard {
    pub fn new(interest: &Interest, ids: Vec<UserId>, all: bool) -> InterestGuard {
        // Without a backend routing by interest nothing is counted: keep no copy of the ids.
        let ids = if interest.is_followed() { ids } else { Vec::new() };
        interest.add(&ids);
        if all {
            interest.set_all(true);
        }
        InterestGuard { interest: interest.clone(), ids, all }
    }

    /// Holds these users too.
    pub fn add(&mut self, ids: &[UserId]) {
        if self.interest.is_followed() {
            self.interest.add(ids);
            self.ids.extend(ids.iter().cloned());
        }
    }

    /// No longer holds these users.
    pub fn remove(&mut self, ids: &[UserId]) {
        if !self.interest.is_followed() || ids.is_empty() {
            return;
        }
        let mut held = Vec::new();
        for id in ids {
            if let Some(i) = self.ids.iter().position(|u| u == id) {
                held.push(self.ids.swap_remove(i));
            }
        }
        self.interest.remove(&held);
    }
}

impl Drop for InterestGuard {
    fn drop(&mut self) {
        self.interest.remove(&self.ids);
        if self.all {
            self.interest.set_all(false);
        }
    }
}

/// One event sink's queue of this node's transitions.
#[derive(Debug)]
struct Tap {
    name: String,
    tx: mpsc::Sender<Arc<Event>>,
}

#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    /// Taps on the transitions made on this node (not those relayed from other nodes):
    /// one per event sink (each node delivers its own transitions, so none is sent
    /// twice). A bounded queue each, filled without waiting: a full one drops and counts.
    taps: Arc<parking_lot::RwLock<Vec<Tap>>>,
    typing: broadcast::Sender<Typing>,
    directory: broadcast::Sender<DirectoryChanged>,
    interest: Interest,
    /// Events published (local and relayed), for the operator view's events per second.
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let (typing, _) = broadcast::channel(capacity.max(1));
        let (directory, _) = broadcast::channel(capacity.clamp(1, 4096));
        EventBus { tx, taps: Arc::default(), typing, directory, interest: Interest::default(), published: Arc::default() }
    }

    /// How many events were published so far (local and relayed).
    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes a transition made on this node; with no subscriber it is simply dropped.
    pub fn publish(&self, event: Event) {
        metrics::counter!("presence_events_total", "kind" => event.kind.as_str()).increment(1);
        self.published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let event = Arc::new(event);
        for t in self.taps.read().iter() {
            if t.tx.try_send(event.clone()).is_err() {
                metrics::counter!("sink_events_dropped_total", "sink" => t.name.clone(), "reason" => "buffer_full").increment(1);
            }
        }
        let _ = self.tx.send(event);
    }

    /// Publishes a transition another node made (cluster mode), for local watchers only.
    pub fn publish_relayed(&self, event: Event) {
        metrics::counter!("presence_events_total", "kind" => event.kind.as_str()).increment(1);
        self.published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.tx.send(Arc::new(event));
    }

    /// The transitions made on this node from now on (not those relayed from others),
    /// for event sink `name`; at most `capacity` waiting (beyond: dropped, counted).
    pub fn tap_origin(&self, name: &str, capacity: usize) -> mpsc::Receiver<Arc<Event>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.taps.write().push(Tap { name: name.to_string(), tx });
        rx
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn publish_typing(&self, t: Typing) {
        let _ = self.typing.send(t);
    }

    pub fn subscribe_typing(&self) -> broadcast::Receiver<Typing> {
        self.typing.subscribe()
    }

    pub fn publish_directory(&self, c: DirectoryChanged) {
        let _ = self.directory.send(c);
    }

    pub fn subscribe_directory(&self) -> broadcast::Receiver<DirectoryChanged> {
        self.directory.subscribe()
    }

    pub fn interest(&self) -> &Interest {
        &self.interest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> UserId {
        UserId::parse(s, 64).unwrap()
    }

    /// While the follower takes every user's events, a caller has nothing to wait for;
    /// turning that off tells the follower how far the changes nobody waited for go.
    #[test]
    fn interest_waits_only_while_the_follower_subscribes_per_user() {
        let i = Interest::default();
        let mut rx = i.follow();
        i.add(&[u("a")]);
        assert_eq!(i.seq_to_wait_for(), Some(1));
        assert_eq!(i.set_at_once(true), 1);
        i.add(&[u("b")]);
        assert_eq!(i.seq_to_wait_for(), None, "taking every user's events: no wait");
        assert!(i.is_watched("b") && !i.is_watched("c"), "the filter sees b at once");
        i.add(&[u("c")]);
        assert_eq!(i.set_at_once(false), 3, "b and c were not waited for: the follower applies up to 3");
        let got: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok().map(|(seq, _)| seq)).collect();
        assert_eq!(got, vec![1, 2, 3]);
        i.add(&[u("d")]);
        assert_eq!(i.seq_to_wait_for(), Some(4));
    }

    #[test]
    fn interest_reports_only_first_and_last_watchers() {
        let i = Interest::default();
        i.add(&[u("unrouted")]);
        assert_eq!(i.watched(), 0, "without a follower nothing is counted");
        let mut rx = i.follow();
        i.add(&[u("early")]);
        assert_eq!(rx.try_recv().unwrap(), (1, InterestChange::Watch(u("early"))));
        i.add(&[u("a"), u("a"), u("b")]);
        i.remove(&[u("a")]);
        i.remove(&[u("a"), u("b"), u("never")]);
        let got: Vec<InterestChange> = std::iter::from_fn(|| rx.try_recv().ok().map(|(_, c)| c)).collect();
        assert_eq!(
            got,
            vec![
                InterestChange::Watch(u("a")),
                InterestChange::Watch(u("b")),
                InterestChange::Unwatch(u("a")),
                InterestChange::Unwatch(u("b"))
            ]
        );
        {
            let _g1 = InterestGuard::new(&i, vec![u("c")], true);
            let _g2 = InterestGuard::new(&i, vec![], true);
            assert!(i.is_watched("zzz"));
        }
        let got: Vec<InterestChange> = std::iter::from_fn(|| rx.try_recv().ok().map(|(_, c)| c)).collect();
        assert_eq!(
            got,
            vec![InterestChange::Watch(u("c")), InterestChange::All(true), InterestChange::Unwatch(u("c")), InterestChange::All(false)]
        );
        assert_eq!(i.watched(), 1);
        assert_eq!(i.seq(), 9, "every change numbered");
    }
}
