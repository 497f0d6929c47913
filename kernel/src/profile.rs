//! A sampling profiler for the kernel under QEMU TCG, where no other
//! profiler sees guest code: the local APIC timer interrupts the CPU
//! every few microseconds of virtual time (which TCG keeps close to host
//! time) and the interrupt entry records the interrupted RIP.
//! `cargo xtask bench --profile` turns the printed addresses into
//! function names with the kernel's symbols.
//!
//! Recording is an atomic store into a fixed buffer (no locks, no heap),
//! so it is safe in an interrupt that may land anywhere. Only code that
//! runs with interrupts enabled between [`start`] and [`stop`] is
//! sampled.

use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// The interrupt vector of the sampling timer.
pub const VECTOR: u8 = 0x27;
/// Samples kept; later ones are counted as lost.
const CAPACITY: usize = 1 << 16;

static ACTIVE: AtomicBool = AtomicBool::new(false);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);
static SAMPLES: [AtomicU64; CAPACITY] = [const { AtomicU64::new(0) }; CAPACITY];

/// Records `rip` if sampling is on; whether it was (the interrupt was the
/// profiler's).
pub fn sample(rip: u64) -> bool {
    if !ACTIVE.load(Relaxed) {
        return false;
    }
    let i = NEXT.fetch_add(1, Relaxed);
    match SAMPLES.get(i) {
        Some(s) => s.store(rip, Relaxed),
        None => {
            LOST.fetch_add(1, Relaxed);
        }
    }
    true
}

/// What a profiling run recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// `(rip, samples)`, most samples first (ties by address).
    pub by_rip: Vec<(u64, u64)>,
    /// Samples recorded.
    pub samples: u64,
    /// Samples that did not fit the buffer.
    pub lost: u64,
}

impl Profile {
    /// Counts the samples `rips` (in any order).
    pub fn of(mut rips: Vec<u64>, lost: u64) -> Profile {
        rips.sort_unstable();
        let samples = rips.len() as u64;
        let mut by_rip: Vec<(u64, u64)> = Vec::new();
        for rip in rips {
            match by_rip.last_mut() {
                Some((r, n)) if *r == rip => *n += 1,
                _ => by_rip.push((rip, 1)),
            }
        }
        by_rip.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Profile { by_rip, samples, lost }
    }
}

/// Why profiling could not start.
#[cfg(target_os = "none")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileError {
    /// A profile is being taken already.
    Running,
    /// The timer vector or the local APIC is not available.
    Irq(crate::arch::irq::IrqError),
}

#[cfg(target_os = "none")]
fn claimed() {}

/// Starts sampling every `period_ns` of virtual time and enables
/// interrupts. The buffer starts empty.
#[cfg(target_os = "none")]
pub fn start(period_ns: u32) -> Result<(), ProfileError> {
    use crate::arch::irq;
    if ACTIVE.swap(true, Relaxed) {
        return Err(ProfileError::Running);
    }
    NEXT.store(0, Relaxed);
    LOST.store(0, Relaxed);
    // The vector's slot is claimed so no test's handler shares it.
    let started = irq::register(VECTOR, claimed)
        .and_then(|()| irq::timer_periodic(VECTOR, period_ns.max(1000)).inspect_err(|_| irq::unregister(VECTOR)));
    if let Err(e) = started {
        ACTIVE.store(false, Relaxed);
        return Err(ProfileError::Irq(e));
    }
    irq::enable();
    Ok(())
}

/// Stops sampling (interrupts disabled again) and returns the profile.
#[cfg(target_os = "none")]
pub fn stop() -> Profile {
    use crate::arch::irq;
    irq::disable();
    irq::timer_stop();
    ACTIVE.store(false, Relaxed);
    irq::unregister(VECTOR);
    let n = NEXT.load(Relaxed).min(CAPACITY);
    Profile::of(SAMPLES[..n].iter().map(|s| s.load(Relaxed)).collect(), LOST.load(Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_counted_by_address_most_first() {
        let p = Profile::of(vec![0x30, 0x10, 0x30, 0x20, 0x10, 0x30], 2);
        assert_eq!(p.by_rip, [(0x30, 3), (0x10, 2), (0x20, 1)]);
        assert_eq!((p.samples, p.lost), (6, 2));
        assert_eq!(Profile::of(Vec::new(), 0), Profile::default());
    }
}
