//! Helpers for host tests of the drivers (feature `testing`): one test
//! clock for every register-model suite, and the memory seam through which
//! the drivers' register models (`vtd::testing`, `amdvi::testing`) read
//! and write physical memory as the hardware would.

use crate::Clock;
use alloc::boxed::Box;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// Physical memory as an IOMMU register model reaches it: what the unit
/// reads (descriptor and command fetches, table walks: on a unit that does
/// not snoop CPU caches, that is memory, not what the CPU last wrote), and
/// its DMA writes (completion stores, log entries), which the CPU sees too
/// (DMA writes snoop on x86).
///
/// A model holds it as `Arc<dyn DeviceMemory>`, so the memory a test gives
/// the driver (its table memory or a whole test platform) and the memory the
/// model fetches from are the same.
pub trait DeviceMemory: Send + Sync {
    /// The naturally aligned 64-bit word at `phys`, as the unit reads it.
    fn read_u64(&self, phys: u64) -> u64;

    /// The unit writes the naturally aligned 64-bit word at `phys`.
    fn write_u64(&self, phys: u64, value: u64);

    /// The unit writes the naturally aligned 32-bit word at `phys` (the
    /// other half of its 64-bit word is kept).
    fn write_u32(&self, phys: u64, value: u32) {
        let word = phys & !7;
        let shift = (phys & 4) * 8;
        let old = self.read_u64(word);
        self.write_u64(word, old & !(0xffff_ffffu64 << shift) | (value as u64) << shift);
    }

    /// An ordering stamp: a counter the memory advances whenever what the
    /// unit can read changes. A model records it with every command it
    /// runs, so a test can check that an invalidation came after the
    /// change it covers. Memories that do not count return 0.
    fn stamp(&self) -> u64 {
        0
    }
}

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
