//! The node's time source (stores, service, sinks, listener): the system clock in production,
//! a manual one in tests; sleeping until a time of that clock; and the periodic task the
//! sweepers that run on ticks use.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::Millis;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock milliseconds since the Unix epoch.
    fn now(&self) -> Millis;

    /// Resolves once [`Clock::now`] has reached `at` (at once if it has).
    fn sleep_until(&self, at: Millis) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = at.saturating_sub(self.now()).max(0);
        Box::pin(tokio::time::sleep(Duration::from_millis(wait as u64)))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
    }
}

/// A clock that moves only when told to; a task sleeping on it wakes when it is moved.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
    moved: tokio::sync::Notify,
}

impl ManualClock {
    pub fn new(start: Millis) -> ManualClock {
        ManualClock { now: AtomicI64::new(start), moved: tokio::sync::Notify::new() }
    }
    pub fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
    pub fn set(&self, t: Millis) {
        self.now.store(t, Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }

    fn sleep_until(&self, at: Millis) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                // Registered before the time is read, so a move in between is not missed.
                let moved = self.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if self.now() >= at {
                    return;
                }
                moved.await;
            }
        })
    }
}

/// Runs `f` on the owner of `weak` every `every` (missed ticks are delayed, not bunched),
/// until the owner is dropped. The task holds only a weak reference, so it never keeps
/// its owner alive. Used by the cluster store's sweepers, typing expiry and the gateway
/// leases' reaper (the memory store's reaper sleeps until its next deadline instead).
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
