//! Typing indicators (seed 004): who types in which conversation, for every transport.
//!
//! `set` checks membership and the typist's presence (someone appearing offline types
//! unseen), keeps only transitions, and publishes them on the bus. Delivery to local
//! connections is the WebSocket hub's, from the bus (it applies privacy per viewer); a
//! cluster backend relays this node's transitions to other nodes and theirs to the bus.
//! A typist who goes quiet is reported stopped after `presence.typing_ttl`; so is a
//! typist on another node that stopped being heard from (its node may have died).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::bus::{EventBus, Typing};
use crate::clock::Clock;
use crate::core::{TimerWheel, UserId};
use crate::directory::Directory;
use crate::error::ApiError;
use crate::store::{get_one, Store};

type Key = (Arc<str>, UserId);

struct State {
    /// (conversation, typist) → (deadline, the node the typist is connected to).
    active: HashMap<Key, (i64, Arc<str>)>,
    /// Deadlines to the millisecond (a repeated start leaves its earlier entry stale).
    wheel: TimerWheel<Key>,
}

pub struct Typists {
    node_id: Arc<str>,
    store: Arc<dyn Store>,
    directory: Arc<Directory>,
    bus: EventBus,
    clock: Arc<dyn Clock>,
    ttl_ms: i64,
    state: Mutex<State>,
}

impl Typists {
    pub fn new(
        node_id: Arc<str>,
        store: Arc<dyn Store>,
        directory: Arc<Directory>,
        bus: EventBus,
        clock: Arc<dyn Clock>,
        ttl_ms: i64,
    ) -> Typists {
        let state = State { active: HashMap::new(), wheel: TimerWheel::new(1) };
        Typists { node_id, store, directory, bus, clock, ttl_ms, state: Mutex::new(state) }
    }

    /// Follows other nodes' typists (to stop them when they go quiet) and expires typists.
    pub fn start(self: &Arc<Self>) {
        let mut typing = self.bus.subscribe_typing();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match typing.recv().await {
                    Ok(t) => match weak.upgrade() {
                        Some(me) if *t.node_id != *me.node_id => {
                            me.transition(&t.conversation, &t.user_id, t.is_typing, &t.node_id);
                        }
                        Some(_) => {}
                        None => return,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        crate::clock::spawn_periodic(Arc::downgrade(self), Duration::from_millis(100), |me: Arc<Typists>| async move {
            me.expire(me.clock.now());
        });
    }

    /// Starts or stops `user` typing in `conversation`; members only (403 otherwise).
    pub async fn set(&self, user: &UserId, conversation: &str, is_typing: bool) -> Result<(), ApiError> {
        self.directory
            .members(conversation)
            .filter(|m| m.contains(user))
            .ok_or_else(|| ApiError::Forbidden(format!("{user} is not a member of conversation {conversation:?}")))?;
        if get_one(&*self.store, user).await?.is_some_and(|p| p.appear_offline) {
            return Ok(());
        }
        let conv: Arc<str> = Arc::from(conversation);
        if self.transition(&conv, user, is_typing, &self.node_id.clone()) {
            self.bus.publish_typing(Typing { node_id: self.node_id.clone(), conversation: conv, user_id: user.clone(), is_typing });
        }
        Ok(())
    }

    /// Records a typing transition of a typist connected to `node`; returns whether it
    /// changed anything (a repeated start only extends the deadline).
    fn transition(&self, conv: &Arc<str>, user: &UserId, is_typing: bool, node: &Arc<str>) -> bool {
        let now = self.clock.now();
        let mut t = self.state.lock();
        let key = (conv.clone(), user.clone());
        if is_typing {
            let deadline = now + self.ttl_ms;
            t.wheel.insert(deadline, key.clone());
            t.active.insert(key, (deadline, node.clone())).is_none()
        } else {
            t.active.remove(&key).is_some()
        }
    }

    /// Ends the typing indicators whose TTL passed at `now` (publishing the stop);
    /// returns how many ended.
    pub fn expire(&self, now: i64) -> usize {
        let ended: Vec<(Key, Arc<str>)> = {
            let mut t = self.state.lock();
            let mut ended = Vec::new();
            for (deadline, k) in t.wheel.take_due(now) {
                if t.active.get(&k).is_some_and(|(d, _)| *d == deadline) {
                    if let Some((_, node)) = t.active.remove(&k) {
                        ended.push((k, node));
                    }
                }
            }
            ended
        };
        for ((conv, user), node) in &ended {
            // A remote typist's stop keeps its node: the backend relays only this node's own.
            self.bus.publish_typing(Typing { node_id: node.clone(), conversation: conv.clone(), user_id: user.clone(), is_typing: false });
        }
        ended.len()
    }
}
