//! Token bucket: `rate` tokens per second, holding at most `burst`.

use super::model::Millis;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    last: Millis,
}

/// Rate-limit parameters shared by every bucket of one limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Millis) -> TokenBucket {
        TokenBucket { tokens: f64::from(rate.burst), last: now }
    }

    /// Takes one token. `Err(wait_ms)` says how long until one is available.
    pub fn try_take(&mut self, rate: Rate, now: Millis) -> Result<(), u64> {
        let elapsed = (now - self.last).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate.per_second <= 0.0 {
            Err(u64::MAX)
        } else {
            Err(((1.0 - self.tokens) / rate.per_second * 1000.0).ceil() as u64)
        }
    }

    /// Whether the bucket would be full at `now` (so it can be forgotten).
    pub fn is_full(&self, rate: Rate, now: Millis) -> bool {
        let elapsed = (now - self.last).max(0) as f64 / 1000.0;
        self.tokens + elapsed * rate.per_second >= f64::from(rate.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rate = Rate { per_second: 10.0, burst: 20 };

    #[test]
    fn burst_then_steady_rate() {
        let mut b = TokenBucket::new(R, 0);
        for _ in 0..20 {
            assert!(b.try_take(R, 0).is_ok());
        }
        assert_eq!(b.try_take(R, 0), Err(100));
        assert!(b.try_take(R, 100).is_ok());
        assert!(b.try_take(R, 100).is_err());
        assert!(!b.is_full(R, 100));
        assert!(b.is_full(R, 2_100));
        // Idle time refills at most to the burst.
        for _ in 0..20 {
            assert!(b.try_take(R, 100_000).is_ok());
        }
        assert!(b.try_take(R, 100_000).is_err());
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let mut b = TokenBucket::new(Rate { per_second: 1.0, burst: 1 }, 1_000);
        assert!(b.try_take(Rate { per_second: 1.0, burst: 1 }, 1_000).is_ok());
        assert!(b.try_take(Rate { per_second: 1.0, burst: 1 }, 0).is_err());
    }
}
