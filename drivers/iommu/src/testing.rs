//! Helpers for host tests of the drivers (feature `testing`): one test
//! clock for every register-model suite.

use crate::Clock;
use alloc::boxed::Box;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// A [`Clock`] that advances a fixed step on every reading (1 µs by
/// default), so a driver's hardware timeouts end after a bounded number of
/// polls instead of real time.
///
/// [`Self::on_read`] adds a hook run before each reading: a register model
/// can let its hardware make progress while the driver polls (one command
/// per tick, say).
pub struct TickClock {
    now: AtomicU64,
    step_ns: u64,
    hook: Option<Box<dyn Fn() + Send + Sync>>,
}

impl TickClock {
    /// Steps of one microsecond, starting at 0.
    pub fn new() -> Self {
        Self::with_step(1000)
    }

    /// Steps of `step_ns` nanoseconds, starting at 0.
    pub fn with_step(step_ns: u64) -> Self {
        Self { now: AtomicU64::new(0), step_ns, hook: None }
    }

    /// Runs `hook` before every reading.
    pub fn on_read(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// The time the next reading returns, without advancing.
    pub fn peek(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// Jumps `ns` nanoseconds ahead.
    pub fn advance(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Default for TickClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TickClock {
    fn now_ns(&self) -> u64 {
        if let Some(hook) = &self.hook {
            hook();
        }
        self.now.fetch_add(self.step_ns, Ordering::Relaxed)
    }
}

impl fmt::Debug for TickClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TickClock")
            .field("now", &self.peek())
            .field("step_ns", &self.step_ns)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn ticks_and_runs_the_hook_per_reading() {
        let c = TickClock::new();
        assert_eq!((c.now_ns(), c.now_ns(), c.peek()), (0, 1000, 2000));
        c.advance(500);
        assert_eq!(c.now_ns(), 2500);
        let reads = Arc::new(AtomicU64::new(0));
        let seen = reads.clone();
        let c = TickClock::with_step(7).on_read(move || {
            seen.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!((c.now_ns(), c.now_ns()), (0, 7));
        assert_eq!(reads.load(Ordering::Relaxed), 2);
        assert!(alloc::format!("{c:?}").contains("hook: true"));
    }
}
