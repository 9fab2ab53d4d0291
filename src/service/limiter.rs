//! Per-key token buckets (per user, per client address), sharded; full buckets are
//! forgotten, so memory follows the keys active now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::config::LimitsConfig;
use crate::core::ratelimit::{Rate, TokenBucket};
use crate::core::Millis;
use crate::shards::Sharded;

/// A per-client-address connection limiter from `limits.connections_per_ip_per_sec`
/// (`None`: off), for `/ws` and for the gRPC listener.
pub fn per_ip(l: &LimitsConfig) -> Option<KeyedLimiter> {
    (l.connections_per_ip_per_sec > 0.0)
        .then(|| KeyedLimiter::new(Rate { per_second: l.connections_per_ip_per_sec, burst: l.connection_burst_per_ip.max(1) }))
}

/// Per-key token buckets, sharded; full buckets are forgotten so memory tracks active keys.
pub struct KeyedLimiter {
    rate: Rate,
    shards: Sharded<HashMap<String, TokenBucket>>,
    last_sweep: AtomicI64,
}

impl KeyedLimiter {
    const SHARDS: usize = 16;
    const SWEEP_EVERY_MS: i64 = 10_000;

    pub fn new(rate: Rate) -> KeyedLimiter {
        KeyedLimiter { rate, shards: Sharded::new(Self::SHARDS), last_sweep: AtomicI64::new(0) }
    }

    /// Takes a token for `key`, or says how long to wait.
    pub fn check(&self, key: &str, now: Millis) -> Result<(), u64> {
        let r = {
            let mut shard = self.shards.of(key).lock();
            match shard.get_mut(key) {
                Some(b) => b.try_take(self.rate, now),
                None => {
                    let mut b = TokenBucket::new(self.rate, now);
                    let r = b.try_take(self.rate, now);
                    shard.insert(key.to_string(), b);
                    r
                }
            }
        };
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last > Self::SWEEP_EVERY_MS && self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            for s in self.shards.iter() {
                s.lock().retain(|_, b| !b.is_full(self.rate, now));
            }
        }
        r
    }

    pub fn tracked_keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_forgets_idle_keys() {
        let l = KeyedLimiter::new(Rate { per_second: 1.0, burst: 2 });
        assert!(l.check("a", 0).is_ok());
        assert!(l.check("a", 0).is_ok());
        assert_eq!(l.check("a", 0), Err(1000));
        assert!(l.check("b", 0).is_ok());
        assert_eq!(l.tracked_keys(), 2);
        // After the sweep interval, refilled buckets are dropped.
        assert!(l.check("c", 20_000).is_ok());
        assert_eq!(l.tracked_keys(), 1);
    }
}
