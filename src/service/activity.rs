//! What the operator view draws over time: users online, sessions and events per second on
//! this node, sampled every [`Activity::PERIOD`] for the last hour, in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Service;
use crate::core::Millis;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Millis,
    pub online_users: u64,
    pub sessions: u64,
    /// Events published per second since the previous sample.
    pub events_per_second: f64,
}

#[derive(Debug)]
pub struct Activity {
    samples: Mutex<VecDeque<Sample>>,
    /// Events published at the last sample, and when it was taken.
    last: Mutex<(u64, Instant)>,
}

impl Activity {
    pub const PERIOD: Duration = Duration::from_secs(10);
    /// One hour of samples.
    pub const KEEP: usize = 360;

    /// Starts sampling `svc` (a first sample now); stops when the service is dropped.
    pub fn start(svc: &Arc<Service>) -> Arc<Activity> {
        let a = Arc::new(Activity { samples: Mutex::new(VecDeque::new()), last: Mutex::new((svc.bus.published(), Instant::now())) });
        a.sample(svc);
        tokio::spawn(run(Arc::downgrade(svc), Arc::downgrade(&a)));
        a
    }

    fn sample(&self, svc: &Service) {
        let s = svc.stats();
        let events_per_second = self.rate(svc, true);
        let mut samples = self.samples.lock();
        if samples.len() == Self::KEEP {
            samples.pop_front();
        }
        samples.push_back(Sample { at: svc.clock.now(), online_users: s.online_users, sessions: s.sessions, events_per_second });
    }

    /// Events per second since the last sample (`advance`: that sample is now).
    fn rate(&self, svc: &Service, advance: bool) -> f64 {
        let published = svc.bus.published();
        let mut last = self.last.lock();
        let secs = last.1.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { published.saturating_sub(last.0) as f64 / secs } else { 0.0 };
        if advance {
            *last = (published, Instant::now());
        }
        rate
    }

    /// Events per second over the current (unfinished) period; the last full period's
    /// rate during its first second.
    pub fn events_per_second(&self, svc: &Service) -> f64 {
        if self.last.lock().1.elapsed() < Duration::from_secs(1) {
            return self.samples.lock().back().map_or(0.0, |s| s.events_per_second);
        }
        self.rate(svc, false)
    }

    /// The samples, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.samples.lock().iter().copied().collect()
    }
}

async fn run(svc: Weak<Service>, activity: Weak<Activity>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Activity::PERIOD, Activity::PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(svc), Some(a)) = (svc.upgrade(), activity.upgrade()) else { return };
        a.sample(&svc);
    }
}
