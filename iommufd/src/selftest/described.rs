//! A memory source for benchmarks that describes memory without having
//! any: user page k is "physical" `phys + k * stride`, never touched. A
//! stride of 4 KiB makes the pages physically contiguous (like memory
//! backed by 2 MiB pages); 8 KiB makes no two adjacent (like scattered
//! 4 KiB pages). Pins are counted per page, under one lock per 512 pages
//! (threads pinning different memory do not wait for each other, as in a
//! kernel, which counts references per page), so a benchmark can check
//! that everything was unpinned. Like the guest RAM it stands for, it
//! never moves a pinned page ([`MemorySource::pins_stay_at_user`]): an
//! IOAS unmap drops its pins by user address without reading the page
//! tables back.

use crate::errno::{Errno, Result};
use crate::memsrc::{MemorySource, PAGE_SIZE, push_run};
use alloc::vec;
use alloc::vec::Vec;
use portcullis_iommu::PhysRun;
use spin::Mutex;

/// Pages per pin-count lock.
const STRIPE: usize = 512;

/// `len` bytes of user memory at `base`, described as above.
pub struct DescribedMemory {
    base: u64,
    phys: u64,
    len: u64,
    stride: u64,
    pins: Vec<Mutex<Vec<u32>>>,
}

impl core::fmt::Debug for DescribedMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "DescribedMemory({:#x}+{:#x} at {:#x}, stride {:#x})", self.base, self.len, self.phys, self.stride)
    }
}

impl DescribedMemory {
    /// Memory at user address `base` of `len` bytes; page k at `phys + k *
    /// stride` (`stride` a power of two, at least 4 KiB).
    pub fn new(base: u64, phys: u64, len: u64, stride: u64) -> Self {
        assert!(stride.is_power_of_two() && stride >= PAGE_SIZE);
        let pages = (len / PAGE_SIZE) as usize;
        let pins = (0..pages.div_ceil(STRIPE)).map(|k| Mutex::new(vec![0; STRIPE.min(pages - k * STRIPE)])).collect();
        Self { base, phys, len, stride, pins }
    }

    /// Memory backed like 2 MiB pages (`huge`) or scattered 4 KiB pages.
    pub fn backed(base: u64, phys: u64, len: u64, huge: bool) -> Self {
        Self::new(base, phys, len, if huge { PAGE_SIZE } else { 2 * PAGE_SIZE })
    }

    /// Pages pinned at least once.
    pub fn pinned_pages(&self) -> u64 {
        self.pins.iter().map(|s| s.lock().iter().filter(|&&p| p > 0).count() as u64).sum()
    }

    fn first_page(&self, uptr: u64, npages: u64) -> Result<u64> {
        let first = uptr.checked_sub(self.base).ok_or(Errno::EFAULT)? / PAGE_SIZE;
        if (first + npages) * PAGE_SIZE > self.len {
            return Err(Errno::EFAULT);
        }
        Ok(first)
    }

    /// Applies `f` to the pin counts of pages `[first, first + n)`.
    fn count(&self, first: usize, n: usize, mut f: impl FnMut(&mut u32)) {
        let mut page = first;
        while page < first + n {
            let (stripe, at) = (page / STRIPE, page % STRIPE);
            let upto = (STRIPE - at).min(first + n - page);
            self.pins[stripe].lock()[at..at + upto].iter_mut().for_each(&mut f);
            page += upto;
        }
    }

    /// Drops one pin of each page of the `(first page, pages)` ranges,
    /// keeping a stripe locked while the next range lies in it too
    /// (scattered pages come one per run, mostly in the same stripe).
    fn uncount(&self, ranges: impl Iterator<Item = (usize, usize)>) {
        let mut held: Option<(usize, spin::MutexGuard<'_, Vec<u32>>)> = None;
        for (first, n) in ranges {
            let mut page = first;
            while page < first + n {
                let (stripe, at) = (page / STRIPE, page % STRIPE);
                let upto = (STRIPE - at).min(first + n - page);
                if held.as_ref().is_none_or(|(s, _)| *s != stripe) {
                    // One stripe locked at a time: release before the next.
                    drop(held.take());
                    held = Some((stripe, self.pins[stripe].lock()));
                }
                let (_, counts) = held.as_mut().expect("locked above");
                counts[at..at + upto].iter_mut().for_each(|c| *c -= 1);
                page += upto;
            }
        }
    }

    fn page_of(&self, phys: u64) -> usize {
        ((phys - self.phys) >> self.stride.trailing_zeros()) as usize
    }
}

impl MemorySource for DescribedMemory {
    fn pin(&self, uptr: u64, out: &mut [u64], _write: bool) -> Result<()> {
        let first = self.first_page(uptr, out.len() as u64)?;
        self.count(first as usize, out.len(), |c| *c += 1);
        for (k, o) in out.iter_mut().enumerate() {
            let page = first as usize + k;
            *o = self.phys + page as u64 * self.stride;
        }
        Ok(())
    }
    fn unpin(&self, phys: &[u64], _dirty: bool) {
        self.uncount(phys.iter().map(|&p| (self.page_of(p), 1)));
    }
    fn pin_runs(&self, uptr: u64, npages: u64, _write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let first = self.first_page(uptr, npages)?;
        self.count(first as usize, npages as usize, |c| *c += 1);
        if self.stride == PAGE_SIZE {
            push_run(out, PhysRun::new(self.phys + first * PAGE_SIZE, npages * PAGE_SIZE));
        } else {
            out.extend((first..first + npages).map(|k| PhysRun::new(self.phys + k * self.stride, PAGE_SIZE)));
        }
        Ok(())
    }
    fn unpin_runs(&self, runs: &[PhysRun], _dirty: bool) {
        self.uncount(runs.iter().map(|r| (self.page_of(r.phys), (r.len / PAGE_SIZE) as usize)));
    }
    fn read_user(&self, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn write_user(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn read_phys(&self, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn write_phys(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn pins_stay_at_user(&self) -> bool {
        // Page k is always `phys + k * stride`: described memory, like the
        // guest RAM it stands for, never moves.
        true
    }
    fn unpin_user(&self, uptr: u64, npages: u64, _dirty: bool) {
        let first = self
            .first_page(uptr, npages)
            .unwrap_or_else(|e| panic!("unpin of {npages} pages at {uptr:#x} outside the memory: {e:?}"));
        self.uncount(core::iter::once((first as usize, npages as usize)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_described_and_pins_counted() {
        let m = DescribedMemory::backed(0x1000_0000, 0x10_0000_0000, 8 * PAGE_SIZE, false);
        let mut out = Vec::new();
        m.pin_runs(0x1000_1000, 2, true, &mut out).unwrap();
        assert_eq!(out, [PhysRun::new(0x10_0000_2000, PAGE_SIZE), PhysRun::new(0x10_0000_4000, PAGE_SIZE)]);
        assert_eq!(m.pinned_pages(), 2);
        assert_eq!(m.pin_runs(0x1000_7000, 2, true, &mut out), Err(Errno::EFAULT), "past the end");
        m.unpin_runs(&out, false);
        assert_eq!(m.pinned_pages(), 0);
        let huge = DescribedMemory::backed(0, 0x20_0000, 4 * PAGE_SIZE, true);
        let mut runs = Vec::new();
        huge.pin_runs(0, 4, false, &mut runs).unwrap();
        assert_eq!(runs, [PhysRun::new(0x20_0000, 4 * PAGE_SIZE)], "contiguous: one run");
        let mut pages = [0u64; 2];
        huge.pin(PAGE_SIZE, &mut pages, false).unwrap();
        assert_eq!(pages, [0x20_1000, 0x20_2000]);
        huge.unpin(&pages, false);
        huge.unpin_runs(&runs, false);
        assert_eq!(huge.pinned_pages(), 0);
    }

    #[test]
    fn unpin_by_user_address_drops_the_pins_of_those_pages() {
        let m = DescribedMemory::backed(0x1000_0000, 0x10_0000_0000, 1024 * PAGE_SIZE, false);
        assert!(m.pins_stay_at_user());
        let mut out = Vec::new();
        // Two pins on pages 510..514 (across a lock stripe), one on 514.
        m.pin_runs(0x1000_0000 + 510 * PAGE_SIZE, 5, true, &mut out).unwrap();
        m.pin_runs(0x1000_0000 + 510 * PAGE_SIZE, 4, true, &mut out).unwrap();
        assert_eq!(m.pinned_pages(), 5);
        m.unpin_user(0x1000_0000 + 510 * PAGE_SIZE, 5, false);
        assert_eq!(m.pinned_pages(), 4, "page 514 had one pin");
        m.unpin_user(0x1000_0000 + 510 * PAGE_SIZE, 4, true);
        assert_eq!(m.pinned_pages(), 0);
    }
}
