//! Envoy's reconnect backoff for a failed xDS stream (`JitteredExponentialBackOffStrategy`
//! with the gRPC mux's defaults): the ceiling starts at 500 ms and doubles up to 30 s;
//! each wait is drawn uniformly below the ceiling ("full jitter"), so proxies dropped
//! together do not come back together. A stream that receives a response resets it.

use std::time::Duration;

pub const BASE: Duration = Duration::from_millis(500);
pub const MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Backoff {
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { ceiling: BASE }
    }
}

impl Backoff {
    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(MAX);
        let random = getrandom::u64().unwrap_or(u64::MAX / 2);
        Duration::from_millis(random % ceiling.as_millis().max(1) as u64)
    }

    /// After a stream got a response: the next failure starts over at [`BASE`].
    pub fn reset(&mut self) {
        self.ceiling = BASE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_below_a_ceiling_that_doubles_to_30s_and_resets() {
        let mut b = Backoff::default();
        let ceilings = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
        for ceiling in ceilings {
            for _ in 0..50 {
                let mut probe = b.clone();
                assert!(probe.next_delay() < Duration::from_millis(ceiling));
            }
            b.next_delay();
        }
        b.reset();
        let delays: Vec<Duration> = (0..200).map(|_| b.clone().next_delay()).collect();
        assert!(delays.iter().all(|d| *d < BASE));
        // Jittered: not all the same.
        assert!(delays.iter().any(|d| *d != delays[0]));
    }
}
