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
