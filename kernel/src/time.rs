//! Monotonic time from the TSC, calibrated once against PIT channel 2, and
//! [`Deadline`] / [`poll_until`] so every wait on hardware has a timeout.

use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_BOOT: AtomicU64 = AtomicU64::new(0);

/// PIT input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// Reads the time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects and is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// How the TSC frequency was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calibration {
    /// Measured against the PIT over the given number of PIT ticks.
    Pit { ticks: u64 },
    /// The PIT never signalled; a 1 GHz guess is in use.
    Guess,
}

/// Converts TSC ticks over `pit_ticks` PIT ticks into a TSC frequency.
pub fn tsc_hz_from(tsc_delta: u64, pit_ticks: u64) -> u64 {
    ((tsc_delta as u128 * PIT_HZ as u128) / pit_ticks.max(1) as u128) as u64
}

/// Calibrates the TSC (about 10 ms). Call once, early.
#[cfg(target_os = "none")]
pub fn calibrate() -> Calibration {
    use crate::arch::port::{inb, outb};
    const TICKS: u64 = 11_932; // 10 ms
    // Gate channel 2 off, speaker off; mode 0, lobyte/hibyte, binary.
    let gate = inb(0x61);
    outb(0x61, gate & !0x03);
    outb(0x43, 0b1011_0000);
    outb(0x42, (TICKS & 0xff) as u8);
    outb(0x42, (TICKS >> 8) as u8);
    // Rising edge on the gate starts the count; OUT2 (port 0x61 bit 5) goes
    // high when it reaches zero.
    outb(0x61, (gate & !0x02) | 0x01);
    let start = rdtsc();
    let mut spins: u64 = 0;
    let ok = loop {
        if inb(0x61) & 0x20 != 0 {
            break true;
        }
        spins += 1;
        if spins > 50_000_000 {
            break false;
        }
    };
    let end = rdtsc();
    outb(0x61, gate);
    let (hz, how) = if ok && end > start {
        (tsc_hz_from(end - start, TICKS), Calibration::Pit { ticks: TICKS })
    } else {
        (1_000_000_000, Calibration::Guess)
    };
    TSC_BOOT.store(start, Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Relaxed);
    how
}

/// Starts PIT channel 0 as a rate generator (mode 2): its output, ISA
/// IRQ 0, pulses every `divisor` PIT ticks (at least 2), `PIT_HZ /
/// divisor` times a second. Channel 2, which calibration uses, is not
/// touched.
#[cfg(target_os = "none")]
pub fn pit_periodic(divisor: u16) {
    use crate::arch::port::outb;
    let d = divisor.max(2);
    // Channel 0, lobyte/hibyte, mode 2, binary.
    outb(0x43, 0b0011_0100);
    outb(0x40, d as u8);
    outb(0x40, (d >> 8) as u8);
}

/// Stops PIT channel 0's pulses: mode 0 with the longest count, whose
/// output rises once at its end and then stays high (no further edges).
#[cfg(target_os = "none")]
pub fn pit_stop() {
    use crate::arch::port::outb;
    outb(0x43, 0b0011_0000);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
}

/// TSC frequency in Hz (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since calibration (0 before it).
pub fn uptime_ns() -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().saturating_sub(TSC_BOOT.load(Ordering::Relaxed));
    ((ticks as u128 * 1_000_000_000) / hz as u128) as u64
}

/// A point in time after which a wait gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at_ns: u64,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self { at_ns: uptime_ns().saturating_add(timeout.as_nanos() as u64) }
    }
    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        uptime_ns() >= self.at_ns
    }
}

/// A wait that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    /// How long was waited.
    pub waited: Duration,
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, Timeout> {
    let deadline = Deadline::after(timeout);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if deadline.expired() {
            // One last look: the condition may have become true while we
            // were descheduled (under emulation).
            return f().ok_or(Timeout { waited: timeout });
        }
        core::hint::spin_loop();
    }
}

/// Busy-waits for `d`.
pub fn delay(d: Duration) {
    let deadline = Deadline::after(d);
    while !deadline.expired() {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn frequency_arithmetic() {
        // 10 ms of PIT ticks during which a 2.5 GHz TSC advanced 25e6.
        assert!((2499..=2500).contains(&(super::tsc_hz_from(25_000_000, 11_932) / 1_000_000)));
        assert_eq!(super::tsc_hz_from(0, 0), 0);
    }
}
