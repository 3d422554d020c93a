//! Logging what peers send, without letting them write the log.
//!
//! - [`Escaped`]: every string a peer chose (a node id, a type URL, a NACK's message, a
//!   resource name, an HTTP header) is logged through it. Control characters are
//!   written as escapes (`\n`, `\u{1b}`), so a peer cannot end a line and forge the
//!   next one, nor send terminal escapes; and the text is cut at
//!   [`MAX_LOGGED_BYTES`], so a peer cannot make one line megabytes long.
//! - [`Throttle`]: a warning a peer can trigger at will (a failed TLS handshake) is
//!   logged at most `burst` times per window; the first line after a window says how
//!   many were left out. The metrics still count every one.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest peer-supplied text one log field carries.
pub const MAX_LOGGED_BYTES: usize = 512;

/// A peer-supplied string, safe to log.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = 0;
        for (i, c) in self.0.char_indices() {
            if written >= MAX_LOGGED_BYTES {
                return write!(f, "…({} more bytes)", self.0.len() - i);
            }
            if c.is_control() {
                for e in c.escape_default() {
                    f.write_fmt(format_args!("{e}"))?;
                }
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
            written += c.len_utf8();
        }
        Ok(())
    }
}

/// At most `burst` lines per `window` for one kind of warning.
#[derive(Debug)]
pub struct Throttle {
    burst: u32,
    window: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug)]
struct ThrottleState {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(burst: u32, window: Duration) -> Self {
        Throttle {
            burst,
            window,
            state: Mutex::new(ThrottleState {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether to log this occurrence: `Some(n)` to log it, `n` being how many were
    /// left out since the last line logged; `None` to leave it out.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = s
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged < self.burst {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// Logs a warning through a [`Throttle`]: the first line after a suppressed run says
/// how many similar lines were left out.
#[macro_export]
macro_rules! throttled_warn {
    ($throttle:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $throttle.check() {
            if suppressed > 0 {
                tracing::warn!(
                    suppressed,
                    "{suppressed} similar warnings were not logged (at most one burst per {:?})",
                    $throttle.window()
                );
            }
            tracing::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_cannot_end_the_line_or_send_terminal_escapes() {
        let forged = "bad\n2026-12-01T00:00:00Z  INFO meshd: all good\r\u{1b}[2J";
        let logged = Escaped(forged).to_string();
        assert!(!logged.contains('\n') && !logged.contains('\r') && !logged.contains('\u{1b}'));
        assert_eq!(
            logged,
            "bad\\n2026-12-01T00:00:00Z  INFO meshd: all good\\r\\u{1b}[2J"
        );
        assert_eq!(Escaped("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn long_peer_text_is_cut() {
        let long = "x".repeat(1 << 20);
        let logged = Escaped(&long).to_string();
        assert!(logged.len() < MAX_LOGGED_BYTES + 40, "{}", logged.len());
        assert!(logged.ends_with(&format!("…({} more bytes)", (1 << 20) - MAX_LOGGED_BYTES)));
    }

    #[test]
    fn a_throttle_logs_a_burst_per_window_and_then_counts_what_it_left_out() {
        let t = Throttle::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let logged: Vec<_> = (0..100).map(|_| t.check_at(start)).collect();
        assert_eq!(logged.iter().filter(|l| l.is_some()).count(), 3);
        assert_eq!(logged[0], Some(0));
        // The next window's first line reports the 97 left out.
        assert_eq!(t.check_at(start + Duration::from_secs(10)), Some(97));
        assert_eq!(t.check_at(start + Duration::from_secs(11)), Some(0));
    }
}
