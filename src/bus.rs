//! The in-process event bus: every presence transition, published once, read by every
//! transport and backend that subscribed. A subscriber that falls behind by more than the
//! capacity gets `Lagged` and must resynchronise from the store; publishers never block.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::core::Event;

#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// Publishes an event; with no subscriber it is simply dropped.
    pub fn publish(&self, event: Event) {
        metrics::counter!("presence_events_total", "kind" => event.kind.as_str()).increment(1);
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
