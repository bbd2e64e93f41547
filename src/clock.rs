//! Wall-clock time for what expires (contexts) and what people read (turn
//! timings). Injectable, so a test can move it 12 hours ahead; the daemon
//! uses the system clock unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Default)]
pub struct Clock {
    /// Added to the system clock; only tests ever change it.
    ahead_ms: Arc<AtomicU64>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        crate::message::unix_ms() + self.ahead_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.ahead_ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Exponential backoff: `base` before the second attempt, doubling after
/// each failed one, never above `max`.
pub fn backoff(base: Duration, max: Duration, failed_attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(failed_attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let s = Duration::from_secs(1);
        let waits: Vec<u64> = (1..=8).map(|n| backoff(s, 30 * s, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(s, 30 * s, 200), 30 * s, "no overflow");
    }
}
