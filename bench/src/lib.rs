//! What Portcullis's benchmarks share, so that the host benchmark
//! (`iommufd/benches/ioas.rs`), the in-guest one (`qemu-tests`) and
//! `cargo xtask bench` measure and summarise the same way:
//!
//! * [`Backing`] and [`BackedMemory`]: user memory described as the frames
//!   Linux's benchmark gets from anonymous memory (scattered 4 KiB pages, or
//!   transparent huge pages: scattered 2 MiB-aligned 2 MiB frames), plus
//!   one physically contiguous GiB as a case of its own;
//! * [`Summary`]: median, minimum and maximum of repeated measurements.
//!
//! Memory is described, never touched: a page's "physical" address is
//! computed from its index, and pins are counted so a benchmark can check
//! that everything was unpinned.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;
use iommufd::errno::{Errno, Result};
use iommufd::memsrc::{MemorySource, PAGE_SIZE, PinCounts, push_run};
use portcullis_iommu::PhysRun;
use spin::Mutex;

/// log2 of [`PAGE_SIZE`].
const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// How user memory is laid out physically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// 4 KiB frames, no two physically adjacent (anonymous memory without
    /// huge pages, at its most fragmented): the engine writes 4 KiB leaves.
    Scattered4K,
    /// 2 MiB-aligned 2 MiB frames, no two physically adjacent (transparent
    /// huge pages): the engine writes 2 MiB leaves, 512 per GiB.
    Scattered2M,
    /// One physically contiguous, 1 GiB-aligned range: the engine may
    /// write 1 GiB leaves. Linux's anonymous memory never looks like this,
    /// so it is a case of its own.
    Contiguous,
}

impl Backing {
    /// Every backing, in the order the benchmarks print them.
    pub const ALL: [Backing; 3] = [Backing::Scattered4K, Backing::Scattered2M, Backing::Contiguous];

    /// The label printed in tables.
    pub fn label(self) -> &'static str {
        match self {
            Backing::Scattered4K => "4 KiB scattered",
            Backing::Scattered2M => "2 MiB scattered",
            Backing::Contiguous => "contiguous",
        }
    }

    /// The short name in machine-read lines (`backing=...`).
    pub fn key(self) -> &'static str {
        match self {
            Backing::Scattered4K => "4k",
            Backing::Scattered2M => "2m",
            Backing::Contiguous => "1g",
        }
    }

    /// The backing whose [`Self::key`] is `key`.
    pub fn from_key(key: &str) -> Option<Backing> {
        Self::ALL.into_iter().find(|b| b.key() == key)
    }

    /// Bytes of one frame (contiguous memory is one frame).
    fn frame(self) -> u64 {
        match self {
            Backing::Scattered4K => PAGE_SIZE,
            Backing::Scattered2M => 2 << 20,
            Backing::Contiguous => 1 << 30,
        }
    }

    /// Distance between the starts of consecutive frames: twice the frame
    /// for scattered frames (a gap as large as the frame between them),
    /// the frame itself for contiguous memory.
    fn stride(self) -> u64 {
        match self {
            Backing::Contiguous => self.frame(),
            _ => 2 * self.frame(),
        }
    }
}

/// `len` bytes of user memory at `base`, laid out as a [`Backing`] from
/// physical address `phys` (aligned to the backing's frame; never accessed).
pub struct BackedMemory {
    base: u64,
    phys: u64,
    len: u64,
    backing: Backing,
    /// Counted per frame while whole frames are pinned, as Linux counts
    /// pins per folio.
    pins: Mutex<PinCounts>,
}

impl fmt::Debug for BackedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackedMemory({:#x}+{:#x} at {:#x}, {})", self.base, self.len, self.phys, self.backing.label())
    }
}

impl BackedMemory {
    /// Memory at user address `base` of `len` bytes (both page-aligned),
    /// its frames from `phys` on (aligned to the backing's frame).
    pub fn new(base: u64, phys: u64, len: u64, backing: Backing) -> Self {
        assert!(base.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE), "page-aligned memory");
        assert!(phys.is_multiple_of(backing.frame()), "frames aligned to their size");
        let pages = (len / PAGE_SIZE) as usize;
        let per = (backing.frame() / PAGE_SIZE) as usize;
        Self { base, phys, len, backing, pins: Mutex::new(PinCounts::new(pages, per)) }
    }

    /// Pages pinned at least once.
    pub fn pinned_pages(&self) -> u64 {
        self.pins.lock().pinned_pages() as u64
    }

    /// Pages per frame.
    fn per_frame(&self) -> u64 {
        self.backing.frame() / PAGE_SIZE
    }

    /// Physical address of user page `page` (frames and strides are
    /// powers of two: shifts and masks, not divisions, which cost the
    /// in-guest benchmark under TCG a helper call each).
    fn phys_of(&self, page: u64) -> u64 {
        let per = self.per_frame();
        self.phys
            + ((page >> per.trailing_zeros()) << self.backing.stride().trailing_zeros())
            + (page & (per - 1)) * PAGE_SIZE
    }

    /// User page of physical address `phys` (one [`Self::phys_of`] gave).
    fn page_of(&self, phys: u64) -> usize {
        let rel = phys - self.phys;
        let stride = self.backing.stride();
        (((rel >> stride.trailing_zeros()) << self.per_frame().trailing_zeros()) + ((rel & (stride - 1)) >> PAGE_SHIFT))
            as usize
    }

    fn first_page(&self, uptr: u64, npages: u64) -> Result<u64> {
        let first = uptr.checked_sub(self.base).ok_or(Errno::EFAULT)? / PAGE_SIZE;
        match first.checked_add(npages).and_then(|end| end.checked_mul(PAGE_SIZE)) {
            Some(end) if end <= self.len => Ok(first),
            _ => Err(Errno::EFAULT),
        }
    }
}

impl MemorySource for BackedMemory {
    fn pin(&self, uptr: u64, out: &mut [u64], _write: bool) -> Result<()> {
        let first = self.first_page(uptr, out.len() as u64)?;
        self.pins.lock().pin(first as usize, out.len());
        for (k, o) in (first..).zip(out.iter_mut()) {
            *o = self.phys_of(k);
        }
        Ok(())
    }
    fn unpin(&self, phys: &[u64], _dirty: bool) {
        let mut pins = self.pins.lock();
        for &p in phys {
            pins.unpin(self.page_of(p), 1);
        }
    }
    fn pin_runs(&self, uptr: u64, npages: u64, _write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        let first = self.first_page(uptr, npages)?;
        let end = first + npages;
        self.pins.lock().pin(first as usize, npages as usize);
        // One run per frame touched (push_run joins contiguous memory).
        let per = self.per_frame();
        if per == 1 {
            // Scattered 4 KiB frames: no two adjacent, so only the first
            // can join a run already in `out`.
            out.reserve(npages as usize);
            push_run(out, PhysRun::new(self.phys_of(first), PAGE_SIZE));
            let stride = self.backing.stride();
            out.extend((first + 1..end).map(|k| PhysRun::new(self.phys + k * stride, PAGE_SIZE)));
            return Ok(());
        }
        let mut k = first;
        while k < end {
            let piece_end = end.min((k / per + 1) * per);
            push_run(out, PhysRun::new(self.phys_of(k), (piece_end - k) * PAGE_SIZE));
            k = piece_end;
        }
        Ok(())
    }
    fn unpin_runs(&self, runs: &[PhysRun], _dirty: bool) {
        // A run never crosses a gap between frames, so its pages are
        // consecutive user pages.
        let mut pins = self.pins.lock();
        if self.per_frame() == 1 {
            // Scattered 4 KiB frames: one page per run, found by a shift
            // (the counterpart of pin_runs' single pass); consecutive user
            // pages (runs come in IOVA order) are unpinned as one range.
            let shift = self.backing.stride().trailing_zeros();
            let (mut first, mut n) = (0, 0);
            for r in runs {
                debug_assert_eq!(r.len, PAGE_SIZE, "scattered frames are never adjacent");
                let page = ((r.phys - self.phys) >> shift) as usize;
                if page != first + n {
                    pins.unpin(first, n);
                    (first, n) = (page, 0);
                }
                n += 1;
            }
            pins.unpin(first, n);
            return;
        }
        for &PhysRun { phys, len } in runs {
            pins.unpin(self.page_of(phys), (len / PAGE_SIZE) as usize);
        }
    }
    fn pins_stay_at_user(&self) -> bool {
        // Described memory never changes.
        true
    }
    fn unpin_user(&self, uptr: u64, npages: u64, _dirty: bool) {
        let first = self.first_page(uptr, npages).expect("unpin of pages outside the memory");
        self.pins.lock().unpin(first as usize, npages as usize);
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
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The middle value (the mean of the two middle ones for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Summary {
    /// Summarises `samples` (sorting them); `None` when there are none.
    pub fn of(samples: &mut [f64]) -> Option<Summary> {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let (&min, &max) = (samples.first()?, samples.last()?);
        let median = if !n.is_multiple_of(2) { samples[n / 2] } else { (samples[n / 2 - 1] + samples[n / 2]) / 2.0 };
        Some(Summary { median, min, max, n })
    }
}

/// `median [min-max]`, each to two significant digits below 10 and in
/// whole units above.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = |x: f64| match x {
            x if x < 1.0 => alloc::format!("{x:.2}"),
            x if x < 10.0 => alloc::format!("{x:.1}"),
            x => alloc::format!("{x:.0}"),
        };
        f.pad(&alloc::format!("{} [{}-{}]", num(self.median), num(self.min), num(self.max)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;
    const PHYS: u64 = 0x100_0000_0000;
    const M2: u64 = 2 << 20;

    fn runs(m: &BackedMemory, page: u64, npages: u64) -> Vec<PhysRun> {
        let mut out = Vec::new();
        m.pin_runs(BASE + page * PAGE_SIZE, npages, true, &mut out).unwrap();
        out
    }

    #[test]
    fn scattered_4k_pages_are_never_adjacent() {
        let m = BackedMemory::new(BASE, PHYS, 8 * PAGE_SIZE, Backing::Scattered4K);
        let r = runs(&m, 1, 2);
        assert_eq!(r, [PhysRun::new(PHYS + 2 * PAGE_SIZE, PAGE_SIZE), PhysRun::new(PHYS + 4 * PAGE_SIZE, PAGE_SIZE)]);
        assert_eq!(m.pinned_pages(), 2);
        m.unpin_runs(&r, false);
        assert_eq!(m.pinned_pages(), 0);
    }

    #[test]
    fn scattered_2m_frames_are_aligned_and_apart() {
        let m = BackedMemory::new(BASE, PHYS, 3 * M2, Backing::Scattered2M);
        // From the middle of frame 0 to the middle of frame 2.
        let r = runs(&m, 256, 1024);
        assert_eq!(
            r,
            [PhysRun::new(PHYS + M2 / 2, M2 / 2), PhysRun::new(PHYS + 2 * M2, M2), PhysRun::new(PHYS + 4 * M2, M2 / 2),]
        );
        assert!(r[1..].iter().all(|run| run.phys % M2 == 0), "each frame starts 2 MiB-aligned");
        assert_eq!(m.pinned_pages(), 1024);
        let mut pages = [0u64; 2];
        m.pin(BASE + 511 * PAGE_SIZE, &mut pages, false).unwrap();
        assert_eq!(pages, [PHYS + M2 - PAGE_SIZE, PHYS + 2 * M2], "a frame's last page, the next frame's first");
        m.unpin(&pages, false);
        m.unpin_runs(&r, false);
        assert_eq!(m.pinned_pages(), 0);
    }

    #[test]
    fn contiguous_memory_is_one_run() {
        let m = BackedMemory::new(BASE, PHYS, 4 * M2, Backing::Contiguous);
        let r = runs(&m, 0, 4 * 512);
        assert_eq!(r, [PhysRun::new(PHYS, 4 * M2)]);
        m.unpin_runs(&r, false);
        assert_eq!(m.pinned_pages(), 0);
    }

    #[test]
    fn outside_the_memory_is_efault_and_pins_nothing() {
        let m = BackedMemory::new(BASE, PHYS, 4 * PAGE_SIZE, Backing::Scattered2M);
        let mut out = Vec::new();
        assert_eq!(m.pin_runs(BASE + 3 * PAGE_SIZE, 2, true, &mut out), Err(Errno::EFAULT));
        assert_eq!(m.pin_runs(BASE - PAGE_SIZE, 1, true, &mut out), Err(Errno::EFAULT));
        assert_eq!(m.pin_runs(BASE, u64::MAX, true, &mut out), Err(Errno::EFAULT));
        assert!(out.is_empty());
        assert_eq!(m.pinned_pages(), 0);
    }

    #[test]
    fn keys_round_trip() {
        for b in Backing::ALL {
            assert_eq!(Backing::from_key(b.key()), Some(b));
        }
        assert_eq!(Backing::from_key("8k"), None);
    }

    #[test]
    fn summary_is_median_min_max() {
        assert_eq!(Summary::of(&mut []), None);
        let s = Summary::of(&mut [5.0, 1.0, 9.0, 3.0, 7.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (5.0, 1.0, 9.0, 5));
        let even = Summary::of(&mut [4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert_eq!(alloc::format!("{s}"), "5.0 [1.0-9.0]");
        let wide = Summary::of(&mut [0.25, 12.4, 3.125]).unwrap();
        assert_eq!(alloc::format!("{wide:>20}"), "       3.1 [0.25-12]", "padded as one field");
    }
}
