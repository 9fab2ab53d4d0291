//! The node's time source (stores, service, sinks, listener): the system clock in production,
//! a manual one in tests, and the periodic task every sweeper runs on.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::Millis;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Millis) -> ManualClock {
        ManualClock(AtomicI64::new(start))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    pub fn set(&self, t: Millis) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs `f` on the owner of `weak` every `every` (missed ticks are delayed, not bunched),
/// until the owner is dropped. The task holds only a weak reference, so it never keeps
/// its owner alive. Used by the stores' expiry reapers and the hub's typing expiry.
pub fn spawn_periodic<T, F, Fut>(weak: Weak<T>, every: Duration, f: F) -> tokio::task::JoinHandle<()>
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            f(owner).await;
        }
    })
}
