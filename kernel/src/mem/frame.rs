//! Physical frame allocator: one bit per 4 KiB frame (1 = free), built from
//! the boot memory map.
//!
//! The bitmap storage is a type parameter so the kernel can keep it in a
//! fixed `.bss` array and the host tests in a `Vec`. Everything starts
//! *used*; [`FrameAllocator::add_free`] opens RAM ranges and
//! [`FrameAllocator::reserve`] closes what must never be handed out (kernel
//! image, boot hand-over, low memory). A frame is only free if it lies
//! entirely inside a RAM range and outside every reserved range, whatever
//! order the calls come in, because reservations are remembered and applied
//! last by [`FrameAllocator::finish`].

/// Size of one frame.
pub const FRAME_SIZE: u64 = 4096;

/// Errors from the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No run of free frames satisfies the request.
    OutOfMemory { frames: usize },
    /// A free of a frame that is not allocated (double free or never allocated).
    NotAllocated { addr: u64 },
    /// Address not 4 KiB aligned or outside the tracked range.
    BadAddress { addr: u64 },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory { frames } => write!(f, "out of physical memory ({} contiguous frames wanted)", frames),
            Self::NotAllocated { addr } => write!(f, "frame {:#x} freed but not allocated", addr),
            Self::BadAddress { addr } => write!(f, "bad frame address {:#x}", addr),
        }
    }
}

const MAX_RESERVED: usize = 32;

/// A bitmap frame allocator over physical addresses `[0, frames * 4 KiB)`.
#[derive(Debug)]
pub struct FrameAllocator<S> {
    bits: S,
    /// Frames ever made free (usable RAM under management).
    managed: usize,
    free: usize,
    /// Frames that were allocated and not yet freed.
    allocated: usize,
    /// Where the next search starts (rotating first fit).
    hint: usize,
    reserved: [(u64, u64); MAX_RESERVED],
    reserved_count: usize,
    /// RAM above the tracked range that had to be ignored.
    pub ignored_bytes: u64,
}

impl<S: AsRef<[u64]> + AsMut<[u64]>> FrameAllocator<S> {
    /// An allocator with every frame used, tracking `64 * bits.len()`
    /// frames. `bits` must be zeroed. (All-zero, so a static of it lives in
    /// `.bss`, not in the image.)
    pub const fn new(bits: S) -> Self {
        Self {
            bits,
            managed: 0,
            free: 0,
            allocated: 0,
            hint: 0,
            reserved: [(0, 0); MAX_RESERVED],
            reserved_count: 0,
            ignored_bytes: 0,
        }
    }

    fn frames(&self) -> usize {
        self.bits.as_ref().len() * 64
    }

    /// Highest physical address (exclusive) this allocator can track.
    pub fn limit(&self) -> u64 {
        self.frames() as u64 * FRAME_SIZE
    }

    fn is_free(&self, f: usize) -> bool {
        self.bits.as_ref()[f / 64] & (1 << (f % 64)) != 0
    }

    fn set(&mut self, f: usize, free: bool) {
        let w = &mut self.bits.as_mut()[f / 64];
        if free {
            *w |= 1 << (f % 64);
        } else {
            *w &= !(1 << (f % 64));
        }
    }

    /// Marks whole frames inside `[start, end)` free (RAM from the memory map).
    pub fn add_free(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let limit = self.frames() as u64;
        if end > self.limit() {
            self.ignored_bytes += end - start.max(self.limit());
        }
        let last = (end / FRAME_SIZE).min(limit);
        for f in first..last.max(first) {
            if !self.is_free(f as usize) {
                self.set(f as usize, true);
                self.free += 1;
                self.managed += 1;
            }
        }
    }

    /// Marks every frame touching `[start, end)` used, now and after any later
    /// [`add_free`](Self::add_free) (applied again by [`finish`](Self::finish)).
    pub fn reserve(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        if self.reserved_count < MAX_RESERVED {
            self.reserved[self.reserved_count] = (start, end);
            self.reserved_count += 1;
        }
        self.apply_reserve(start, end);
    }

    fn apply_reserve(&mut self, start: u64, end: u64) {
        let first = (start / FRAME_SIZE) as usize;
        let last = (end.div_ceil(FRAME_SIZE)).min(self.frames() as u64) as usize;
        for f in first..last.max(first) {
            if self.is_free(f) {
                self.set(f, false);
                self.free -= 1;
                self.managed -= 1;
            }
        }
    }

    /// Re-applies every reservation; call once after all `add_free` calls.
    pub fn finish(&mut self) {
        for i in 0..self.reserved_count {
            let (s, e) = self.reserved[i];
            self.apply_reserve(s, e);
        }
    }

    /// Allocates `count` contiguous frames whose first frame is aligned to
    /// `align` bytes (a power of two, at least 4 KiB) and which end at or
    /// below `below`. Returns the physical address of the first frame.
    pub fn alloc(&mut self, count: usize, align: u64, below: u64) -> Result<u64, FrameError> {
        let oom = FrameError::OutOfMemory { frames: count };
        if count == 0 || !align.is_power_of_two() {
            return Err(oom);
        }
        let step = (align / FRAME_SIZE).max(1) as usize;
        let end_limit = ((below / FRAME_SIZE) as usize).min(self.frames());
        if count > end_limit || count > self.free {
            return Err(oom);
        }
        // Two passes: from the hint to the end, then from 0.
        for (from, to) in [(self.hint, end_limit), (0, end_limit)] {
            let mut f = from.div_ceil(step) * step;
            while f + count <= to {
                match (f..f + count).rev().find(|&g| !self.is_free(g)) {
                    None => {
                        for g in f..f + count {
                            self.set(g, false);
                        }
                        self.free -= count;
                        self.allocated += count;
                        self.hint = f + count;
                        return Ok(f as u64 * FRAME_SIZE);
                    }
                    // Skip past the used frame, keeping alignment.
                    Some(used) => f = (used + 1).div_ceil(step) * step,
                }
            }
        }
        Err(oom)
    }

    /// One frame anywhere.
    pub fn alloc_one(&mut self) -> Result<u64, FrameError> {
        self.alloc(1, FRAME_SIZE, u64::MAX)
    }

    /// Frees `count` frames from `addr` (which [`alloc`](Self::alloc) returned).
    /// Nothing changes if any of them is not allocated.
    pub fn free(&mut self, addr: u64, count: usize) -> Result<(), FrameError> {
        if !addr.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::BadAddress { addr });
        }
        let first = (addr / FRAME_SIZE) as usize;
        if first.checked_add(count).is_none_or(|end| end > self.frames()) {
            return Err(FrameError::BadAddress { addr });
        }
        if let Some(f) = (first..first + count).find(|&f| self.is_free(f)) {
            return Err(FrameError::NotAllocated { addr: f as u64 * FRAME_SIZE });
        }
        if count > self.allocated {
            return Err(FrameError::NotAllocated { addr });
        }
        for f in first..first + count {
            self.set(f, true);
        }
        self.free += count;
        self.allocated -= count;
        Ok(())
    }

    /// Frames free now.
    pub fn free_frames(&self) -> usize {
        self.free
    }

    /// Frames under management (free + allocated).
    pub fn managed_frames(&self) -> usize {
        self.managed
    }

    /// Frames allocated and not freed.
    pub fn allocated_frames(&self) -> usize {
        self.allocated
    }

    /// Whether the frame at `addr` is currently free.
    pub fn is_frame_free(&self, addr: u64) -> bool {
        let f = (addr / FRAME_SIZE) as usize;
        f < self.frames() && self.is_free(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc_mib(mib: usize) -> FrameAllocator<Vec<u64>> {
        let frames = mib * 256;
        FrameAllocator::new(vec![0; frames.div_ceil(64)])
    }

    #[test]
    fn reservations_win_whatever_the_order() {
        let mut a = alloc_mib(16);
        a.reserve(0x20_0000, 0x40_0000); // "kernel image"
        a.add_free(0x10_0000, 0x100_0000);
        a.reserve(0x9000, 0x9018); // "start info", partial frame
        a.add_free(0, 0x9f000);
        a.finish();
        assert!(!a.is_frame_free(0x20_0000));
        assert!(!a.is_frame_free(0x3f_f000));
        assert!(!a.is_frame_free(0x9000));
        assert!(a.is_frame_free(0x8000));
        assert!(a.is_frame_free(0x40_0000));
        let expect = (0x9f000 / 4096 - 1) + (0x100_0000 - 0x10_0000 - 0x20_0000) / 4096;
        assert_eq!(a.free_frames(), expect);
    }

    #[test]
    fn partial_frames_at_region_edges_are_not_free() {
        let mut a = alloc_mib(4);
        a.add_free(0x1800, 0x3800);
        a.finish();
        assert_eq!(a.free_frames(), 1);
        assert!(a.is_frame_free(0x2000));
    }

    #[test]
    fn aligned_contiguous_allocation_and_limits() {
        let mut a = alloc_mib(16);
        a.add_free(0x1000, 0x100_0000);
        a.finish();
        let p = a.alloc(512, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(p % 0x20_0000, 0);
        assert_ne!(p, 0);
        let q = a.alloc(1, 4096, 0x2000).unwrap();
        assert_eq!(q, 0x1000);
        assert_eq!(a.alloc(1, 4096, 0x2000), Err(FrameError::OutOfMemory { frames: 1 }));
        assert!(a.alloc(100_000, 4096, u64::MAX).is_err());
        a.free(p, 512).unwrap();
        assert_eq!(a.free(p, 1), Err(FrameError::NotAllocated { addr: p }));
        assert_eq!(a.free(123, 1), Err(FrameError::BadAddress { addr: 123 }));
    }

    #[test]
    fn ram_beyond_the_bitmap_is_counted_as_ignored() {
        let mut a = alloc_mib(1);
        a.add_free(0, 0x20_0000);
        assert_eq!(a.ignored_bytes, 0x10_0000);
        assert_eq!(a.free_frames(), 256);
    }

    proptest! {
        #[test]
        fn never_hands_out_a_frame_twice_or_a_reserved_one(
            ops in proptest::collection::vec((1usize..40, 0u32..4, any::<bool>()), 1..200)
        ) {
            let mut a = alloc_mib(2);
            a.add_free(0, 0x20_0000);
            a.reserve(0x8_0000, 0x9_0000);
            a.finish();
            let total = a.free_frames();
            let mut owned: Vec<(u64, usize)> = Vec::new();
            let mut map = vec![false; 512];
            for (count, align_shift, free_one) in ops {
                if free_one && !owned.is_empty() {
                    let (p, n) = owned.swap_remove(count % owned.len());
                    a.free(p, n).unwrap();
                    for f in 0..n { map[p as usize / 4096 + f] = false; }
                } else if let Ok(p) = a.alloc(count, 4096 << align_shift, u64::MAX) {
                    prop_assert_eq!(p % (4096 << align_shift), 0);
                    for f in 0..count {
                        let idx = p as usize / 4096 + f;
                        prop_assert!(!map[idx], "frame handed out twice");
                        prop_assert!(!(0x80..0x90).contains(&idx), "reserved frame handed out");
                        map[idx] = true;
                    }
                    owned.push((p, count));
                }
                let used: usize = owned.iter().map(|o| o.1).sum();
                prop_assert_eq!(a.free_frames() + used, total);
            }
        }
    }
}
