//! Cross-node fan-out, routed by interest.
//!
//! A node subscribes to `presence.*.<user>` only for the users its local connections
//! watch (WebSocket subscriptions, the users connected here and the users whose contacts
//! include them, gRPC watch streams), as the bus's [`Interest`](crate::bus::Interest)
//! reports them, and drops the subscription with the last local watcher. nats-server
//! then never sends this node (or, across a leaf link, this leaf) a message about a user
//! nobody here watches. A `WatchPresence { all: true }` stream switches to one wildcard
//! subscription while it lasts.
//!
//! Snapshot reads wait until the subscriptions asked for before them are in place, so a
//! client that subscribes and then reads its snapshot misses no change in between.
//!
//! Typing indicators travel on `presence.typing.<conversation>` to every node (they are
//! ephemeral and never stored).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{unavailable, Inner, NatsStore, WireEvent, EVENT_SUBJECTS};
use crate::bus::{InterestChange, Typing};
use crate::core::UserId;
use crate::natsio::kv::encode_id;
use crate::store::StoreError;

/// A typing indicator on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireTyping {
    node_id: String,
    conversation: String,
    user_id: String,
    is_typing: bool,
}

impl WireTyping {
    fn of(t: &Typing) -> WireTyping {
        WireTyping {
            node_id: t.node_id.to_string(),
            conversation: t.conversation.to_string(),
            user_id: t.user_id.to_string(),
            is_typing: t.is_typing,
        }
    }

    fn into_typing(self) -> Option<Typing> {
        Some(Typing {
            node_id: Arc::from(self.node_id),
            conversation: Arc::from(self.conversation),
            user_id: UserId::parse(&self.user_id, usize::MAX).ok()?,
            is_typing: self.is_typing,
        })
    }
}

/// A subscription's forwarding task, stopped (and the subscription dropped) with it.
struct Forwarder(JoinHandle<()>);

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn user_subject(id: &UserId) -> String {
    format!("presence.*.{}", encode_id(id.as_str()))
}

/// Puts an event received from NATS on the local bus unless this node published it.
fn relay(inner: &Inner, msg: &async_nats::Message) {
    if !EVENT_SUBJECTS.iter().any(|p| msg.subject.starts_with(p.trim_end_matches('>'))) {
        return; // presence.sync / presence.typing with a name equal to a user's
    }
    match serde_json::from_slice::<WireEvent>(&msg.payload) {
        Ok(w) if w.presence.node_id != *inner.node => {
            if let Some(ev) = w.into_event() {
                // The cached state is older than this event: read it again next time.
                inner.cache.invalidate(&ev.presence.user_id);
                inner.counters.remote_events.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("nats_events_received_total").increment(1);
                // Older than what this node already published or relayed: a late arrival.
                if !inner.order.lock().admit(&ev.presence.user_id, ev.presence.revision, inner.clock.now()) {
                    metrics::counter!("nats_events_out_of_order_total").increment(1);
                    return;
                }
                inner.bus.publish(ev);
            }
        }
        Ok(_) => {} // our own event, already on the local bus
        Err(e) => tracing::warn!(subject = %msg.subject, error = %e, "ignoring unreadable presence event"),
    }
}

impl NatsStore {
    /// Follows the bus's interest with subscriptions and relays what arrives.
    pub(super) async fn relay_remote_events(&self) -> Result<(), StoreError> {
        let mut interest = self.inner.bus.interest().follow();
        let client = self.inner.nats.client.clone();
        let weak = Arc::downgrade(&self.inner);
        let h = tokio::spawn(async move {
            // One forwarding task per subscription into one channel: O(1) per message
            // however many users are watched (aborting a task drops, so unsubscribes, it).
            let (tx, mut rx) = mpsc::channel::<async_nats::Message>(4096);
            let forward = |sub: async_nats::Subscriber| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut sub = sub;
                    while let Some(m) = sub.next().await {
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                })
            };
            let mut subs: HashMap<UserId, Forwarder> = HashMap::new();
            let mut all: Option<Forwarder> = None;
            let mut watched: HashSet<UserId> = HashSet::new();
            loop {
                tokio::select! {
                    first = interest.recv() => {
                        let Some(first) = first else { return };
                        let mut batch = vec![first];
                        while let Ok(more) = interest.try_recv() {
                            batch.push(more);
                        }
                        let mut last = 0;
                        for (seq, change) in batch {
                            last = seq;
                            match change {
                                InterestChange::Watch(u) => {
                                    if all.is_none() {
                                        match client.subscribe(user_subject(&u)).await {
                                            Ok(s) => {
                                                subs.insert(u.clone(), Forwarder(forward(s)));
                                            }
                                            Err(e) => tracing::warn!(user = %u, error = %e, "cannot subscribe to a watched user's events"),
                                        }
                                    }
                                    watched.insert(u);
                                }
                                InterestChange::Unwatch(u) => {
                                    watched.remove(&u);
                                    subs.remove(&u);
                                }
                                InterestChange::All(true) => {
                                    match client.subscribe("presence.*.*").await {
                                        Ok(s) => {
                                            all = Some(Forwarder(forward(s)));
                                            subs.clear();
                                        }
                                        Err(e) => tracing::warn!(error = %e, "cannot subscribe to every user's events"),
                                    }
                                }
                                InterestChange::All(false) => {
                                    all = None;
                                    for u in &watched {
                                        if let Ok(s) = client.subscribe(user_subject(u)).await {
                                            subs.insert(u.clone(), Forwarder(forward(s)));
                                        }
                                    }
                                }
                            }
                        }
                        // The server has the subscriptions once it answers the flush.
                        let _ = client.flush().await;
                        let Some(inner) = weak.upgrade() else { return };
                        inner.counters.watched.store(watched.len() as u64, Ordering::Relaxed);
                        metrics::gauge!("nats_interest_users").set(watched.len() as f64);
                        inner.interest_applied.send_replace(last);
                    }
                    Some(msg) = rx.recv() => {
                        let Some(inner) = weak.upgrade() else { return };
                        relay(&inner, &msg);
                    }
                }
            }
        });
        self.inner.tasks.lock().push(h);
        Ok(())
    }

    /// Waits until the subscriptions asked for so far are in place (normally well under a
    /// millisecond; at most `nats.request_timeout` on a starved machine).
    pub(super) async fn interest_settled(&self) {
        let want = self.inner.bus.interest().seq();
        let mut rx = self.inner.interest_applied.subscribe();
        if *rx.borrow() >= want {
            return;
        }
        if tokio::time::timeout(self.inner.opts.kv_timeout, rx.wait_for(|applied| *applied >= want)).await.is_err() {
            tracing::warn!("subscriptions for newly watched users not confirmed in time; a change made meanwhile may be missed");
        }
    }

    /// Relays typing indicators: local ones out, other nodes' in.
    pub(super) async fn relay_typing(&self) -> Result<(), StoreError> {
        let mut local = self.inner.bus.subscribe_typing();
        let client = self.inner.nats.client.clone();
        let node = self.inner.node.clone();
        let out = tokio::spawn(async move {
            loop {
                match local.recv().await {
                    Ok(t) if t.node_id == node => {
                        let subject = format!("presence.typing.{}", encode_id(&t.conversation));
                        if let Ok(body) = serde_json::to_vec(&WireTyping::of(&t)) {
                            if let Err(e) = client.publish(subject, body.into()).await {
                                tracing::debug!(error = %e, "could not relay a typing indicator");
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut sub = self.inner.nats.client.subscribe("presence.typing.>").await.map_err(unavailable)?;
        let weak = Arc::downgrade(&self.inner);
        let inbound = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(inner) = weak.upgrade() else { return };
                match serde_json::from_slice::<WireTyping>(&msg.payload).map(WireTyping::into_typing) {
                    Ok(Some(t)) if t.node_id != inner.node => inner.bus.publish_typing(t),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "ignoring an unreadable typing indicator"),
                }
            }
        });
        self.inner.tasks.lock().extend([out, inbound]);
        Ok(())
    }
}
