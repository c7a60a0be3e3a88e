//! Per-agent token buckets on issuance. On a store that shares them
//! (Redis: one key per agent, moved by a script on the server's clock) the
//! limit is the agent's across every replica, at one round trip; on one
//! that does not (the embedded store: one node) the buckets are this
//! broker's. While the store cannot be reached the broker's own buckets
//! count (whatever is asked of the store then fails anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mayfly_core::SpiffeId;

use crate::store::{LeaseStore, RateTaken};

/// Buckets not touched for this long are dropped.
const IDLE: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per agent.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second; 0 disables the limit.
    rate: f64,
    /// Bucket size.
    burst: f64,
    buckets: Mutex<HashMap<SpiffeId, Bucket>>,
}

impl RateLimiter {
    /// `per_second` credentials per agent, with bursts of `burst`.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            rate: per_second,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `agent` from the store's shared bucket (or this
    /// broker's), or says how long until one is there.
    pub async fn take(&self, store: &dyn LeaseStore, agent: &SpiffeId) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        match store.take_rate(agent, self.rate, self.burst).await {
            Ok(RateTaken::Allowed) => Ok(()),
            Ok(RateTaken::Wait(wait)) => Err(wait),
            Ok(RateTaken::Local) | Err(_) => self.check(agent),
        }
    }

    /// Takes one token for `agent` from this broker's bucket, or says how
    /// long until one is there.
    pub fn check(&self, agent: &SpiffeId) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.at) < IDLE);
        }
        let b = buckets.entry(agent.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_agent() {
        let rl = RateLimiter::new(10.0, 3.0);
        let a = SpiffeId::new("spiffe://td/agent/a").unwrap();
        let b = SpiffeId::new("spiffe://td/agent/b").unwrap();
        for _ in 0..3 {
            rl.check(&a).unwrap();
        }
        let wait = rl.check(&a).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        rl.check(&b).expect("another agent has its own bucket");
        std::thread::sleep(Duration::from_millis(120));
        rl.check(&a).expect("refilled");
        assert!(RateLimiter::new(0.0, 1.0).check(&a).is_ok(), "0 disables");
    }
}
