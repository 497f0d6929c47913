//! Writing a dirty bitmap into the caller's memory (`IOMMU_HWPT_GET_DIRTY_BITMAP`).
//!
//! Bit `k` of the bitmap is bit `k % 8` of byte `k / 8` at `data` (the
//! little-endian `u64` words the uAPI describes, at any byte alignment).
//! Bits are only ever set: the caller's other bits stay as they were, so
//! each touched byte is read, ORed and written back.
//!
//! Work happens one *window* of at most [`WINDOW`] bytes of bitmap at a
//! time, so the bitmap's size (the caller's) never sizes an allocation,
//! and so a bitmap the caller cannot have written loses no dirty bit: the
//! caller opens a window ([`BitmapWriter::open`], which pins the one or
//! two user pages under it and reads them), then reads and clears the
//! domain's dirty bits of the IOVA the window covers, then closes it
//! ([`BitmapWriter::close`]: writes the pinned pages and unpins them). A
//! bitmap that reaches unmapped memory fails with `EFAULT` at the first
//! window that reaches it, before the dirty bits behind that window are
//! cleared; the windows before it were reported and cleared. Linux does
//! the same: it pins the bitmap's pages a chunk at a time before reading
//! the domain.

use crate::errno::{Errno, Result};
use crate::memsrc::{MemorySource, PAGE_SIZE};
use alloc::sync::Arc;

/// Bytes of bitmap handled at a time (one page: a window spans at most
/// two pages).
pub const WINDOW: usize = 4096;

/// Bits of bitmap in one window.
pub const WINDOW_BITS: u64 = WINDOW as u64 * 8;

/// An open window: where it starts in the bitmap, its length, and the
/// user pages under it, pinned.
#[derive(Clone, Copy)]
struct Open {
    start: u64,
    len: usize,
    phys: [u64; 2],
    pages: usize,
}

/// Sets bits of a user bitmap, a window at a time.
pub struct BitmapWriter<'a> {
    source: &'a Arc<dyn MemorySource>,
    data: u64,
    /// Bytes the bitmap has (its bit count rounded up).
    bytes: u64,
    window: Option<Open>,
    /// The caller's bytes of the open window, with the bits set so far.
    buf: [u8; WINDOW],
}

impl core::fmt::Debug for BitmapWriter<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "BitmapWriter(at {:#x}, {} bytes)", self.data, self.bytes)
    }
}

impl<'a> BitmapWriter<'a> {
    /// A writer for a bitmap of `bits` bits at user address `data`.
    pub fn new(source: &'a Arc<dyn MemorySource>, data: u64, bits: u64) -> Self {
        Self { source, data, bytes: bits.div_ceil(8), window: None, buf: [0; WINDOW] }
    }

    /// How many windows the bitmap has.
    pub fn windows(&self) -> u64 {
        self.bytes.div_ceil(WINDOW as u64)
    }

    /// Opens window `w` (bits `w * WINDOW_BITS ..`): pins the user pages
    /// under it and reads the caller's bytes. `EFAULT` when they are not
    /// mapped writable, or the window's addresses wrap.
    pub fn open(&mut self, w: u64) -> Result<()> {
        debug_assert!(self.window.is_none(), "one window at a time");
        let start = w.checked_mul(WINDOW as u64).filter(|&s| s < self.bytes).ok_or(Errno::EFAULT)?;
        let len = (self.bytes - start).min(WINDOW as u64) as usize;
        let addr = self.data.checked_add(start).ok_or(Errno::EFAULT)?;
        let last = addr.checked_add(len as u64 - 1).ok_or(Errno::EFAULT)?;
        let first_page = addr & !(PAGE_SIZE - 1);
        let pages = ((last / PAGE_SIZE) - (addr / PAGE_SIZE) + 1) as usize;
        let mut phys = [0u64; 2];
        self.source.pin(first_page, &mut phys[..pages], true)?;
        let open = Open { start, len, phys, pages };
        let mut buf = [0u8; WINDOW];
        let read = self.pieces(open, |at, p, n| self.source.read_phys(p, &mut buf[at..at + n]));
        if let Err(e) = read {
            self.source.unpin(&phys[..pages], false);
            return Err(e);
        }
        self.buf = buf;
        self.window = Some(open);
        Ok(())
    }

    /// Calls `f(offset in window, physical address, length)` for the
    /// window's piece in each of its pinned pages.
    fn pieces(&self, open: Open, mut f: impl FnMut(usize, u64, usize) -> Result<()>) -> Result<()> {
        let addr = self.data + open.start;
        let mut at = 0usize;
        for k in 0..open.pages {
            let off = if k == 0 { addr % PAGE_SIZE } else { 0 };
            let n = ((PAGE_SIZE - off) as usize).min(open.len - at);
            f(at, open.phys[k] + off, n)?;
            at += n;
        }
        Ok(())
    }

    /// Sets bits `first..=last` of the bitmap; bits outside the open
    /// window (or with no window open) are ignored.
    pub fn set(&mut self, first: u64, last: u64) {
        let Some(Open { start, len, .. }) = self.window else { return };
        let lo = start * 8;
        let hi = lo + len as u64 * 8 - 1;
        let mut bit = first.max(lo);
        let last = last.min(hi);
        while bit <= last {
            let byte = (bit / 8 - start) as usize;
            // The rest of this byte, at most.
            let k = (bit % 8) as u32;
            let n = (8 - k).min((last - bit + 1).min(8) as u32);
            let mask = (((1u16 << n) - 1) << k) as u8;
            self.buf[byte] |= mask;
            bit += n as u64;
        }
    }

    /// Writes the open window back with its bits set (into the pages
    /// pinned since `open`), unpins them and closes the window.
    pub fn close(&mut self) -> Result<()> {
        let Some(open) = self.window.take() else { return Ok(()) };
        let buf = self.buf;
        let r = self.pieces(open, |at, p, n| self.source.write_phys(p, &buf[at..at + n]));
        self.source.unpin(&open.phys[..open.pages], true);
        r
    }
}

impl Drop for BitmapWriter<'_> {
    fn drop(&mut self) {
        if let Some(open) = self.window.take() {
            self.source.unpin(&open.phys[..open.pages], false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memsrc::FakeAddressSpace;

    #[test]
    fn bits_are_set_at_any_alignment_and_others_kept() {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(0x10_0000, 0x4000, true);
        let src: Arc<dyn MemorySource> = mem.clone();
        // An odd start address; a byte the caller already had bits in.
        let data = 0x10_0003;
        mem.write_user(data, &[0x80]).unwrap();
        let mut w = BitmapWriter::new(&src, data, 40_000);
        assert_eq!(w.windows(), 2);
        w.open(0).unwrap();
        w.set(0, 2);
        w.set(9, 9);
        w.set(60, 70);
        // Bits of the next window wait for it.
        w.set(8 * 4096 + 1, 8 * 4096 + 1);
        w.close().unwrap();
        w.open(1).unwrap();
        w.set(8 * 4096 + 1, 8 * 4096 + 1);
        w.set(39_999, 50_000);
        w.close().unwrap();
        let mut b = [0u8; 10];
        mem.read_user(data, &mut b).unwrap();
        assert_eq!(b, [0x87, 0x02, 0, 0, 0, 0, 0, 0xf0, 0x7f, 0]);
        let mut far = [0u8; 1];
        mem.read_user(data + 4096, &mut far).unwrap();
        assert_eq!(far, [0x02], "second window");
        mem.read_user(data + 4999, &mut far).unwrap();
        assert_eq!(far, [0x80], "the last bit, nothing beyond");
    }

    #[test]
    fn a_bitmap_beyond_the_callers_memory_is_efault() {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(0x10_0000, 0x1000, true);
        let src: Arc<dyn MemorySource> = mem.clone();
        // The second window is unmapped: it fails when opened.
        let mut w = BitmapWriter::new(&src, 0x10_0000, 8 * 0x2000);
        w.open(0).unwrap();
        w.close().unwrap();
        assert_eq!(w.open(1), Err(Errno::EFAULT));
        // Addresses that wrap.
        let mut w = BitmapWriter::new(&src, u64::MAX - 2, 64);
        assert_eq!(w.open(0), Err(Errno::EFAULT));
        assert_eq!(w.open(1), Err(Errno::EFAULT), "beyond the bitmap");
        // A window straddling two pages pins both while open, and only
        // then; one that reaches an unmapped page pins nothing.
        let mut w = BitmapWriter::new(&src, 0x10_0ffc, 64);
        assert_eq!(w.open(0), Err(Errno::EFAULT));
        assert_eq!(mem.pins(0x10_0000), 0);
        mem.map(0x10_1000, 0x1000, true);
        let mut w = BitmapWriter::new(&src, 0x10_0ffc, 64);
        w.open(0).unwrap();
        assert_eq!((mem.pins(0x10_0000), mem.pins(0x10_1000)), (1, 1));
        w.set(0, 0);
        w.set(63, 63);
        w.close().unwrap();
        assert_eq!((mem.pins(0x10_0000), mem.pins(0x10_1000)), (0, 0));
        let mut b = [0u8; 8];
        mem.read_user(0x10_0ffc, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 1 | 1 << 63);
        let mut w = BitmapWriter::new(&src, 0x10_0ffc, 64);
        w.open(0).unwrap();
        drop(w);
        assert_eq!(mem.pins(0x10_0000), 0, "dropped open: unpinned");
    }
}
