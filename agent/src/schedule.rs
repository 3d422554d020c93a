//! When to renew and when to try again.
//!
//! - Renewal at half the certificate's remaining lifetime as the agent received it,
//!   ±10 % of that lifetime at random, so that pods started together do not all ask
//!   meshd at the same instant again and again. The lifetime counts from receipt, not
//!   from `notBefore` (meshd backdates it for peers whose clocks lag), so a
//!   certificate of a few seconds is not due at once.
//! - Retries (meshd unreachable or refusing) back off exponentially from 500 ms to
//!   30 s, each delay ±20 % at random, and start over after a success.

use std::time::Duration;

const JITTER: f64 = 0.10;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
const RETRY_JITTER: f64 = 0.20;

/// A random number in [-1, 1].
fn unit() -> f64 {
    let r = getrandom::u32().unwrap_or(u32::MAX / 2);
    f64::from(r) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// How long after receipt a certificate valid for `lifetime` is renewed, for `unit` in
/// [-1, 1].
pub fn renew_after_with(lifetime: Duration, unit: f64) -> Duration {
    lifetime.mul_f64((0.5 + JITTER * unit.clamp(-1.0, 1.0)).max(0.0))
}

pub fn renew_after(lifetime: Duration) -> Duration {
    renew_after_with(lifetime, unit())
}

/// Exponential backoff between failed attempts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_RETRY }
    }
}

impl Backoff {
    /// The delay before the next attempt; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(1.0 + RETRY_JITTER * unit());
        self.next = (self.next * 2).min(MAX_RETRY);
        delay
    }

    pub fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_between_40_and_60_percent_of_the_lifetime() {
        let hour = Duration::from_secs(3600);
        assert_eq!(renew_after_with(hour, 0.0), Duration::from_secs(1800));
        assert_eq!(renew_after_with(hour, -1.0), Duration::from_secs(1440));
        assert_eq!(renew_after_with(hour, 1.0), Duration::from_secs(2160));
        for _ in 0..1000 {
            let d = renew_after(hour);
            assert!((1440..=2160).contains(&d.as_secs()), "{d:?}");
        }
        // Four seconds, as a test meshd gives: renewed after about two.
        let d = renew_after(Duration::from_secs(4));
        assert!(d >= Duration::from_millis(1600) && d <= Duration::from_millis(2400));
    }

    #[test]
    fn retries_back_off_to_thirty_seconds_and_start_over() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(600), "{delays:?}");
        assert!(delays[1] >= Duration::from_millis(800), "{delays:?}");
        for d in &delays {
            assert!(*d <= Duration::from_secs(36), "{delays:?}");
        }
        assert!(delays[9] >= Duration::from_secs(24), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(600));
    }
}
