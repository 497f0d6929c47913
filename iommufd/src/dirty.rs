//! Writing a dirty bitmap into the caller's memory (`IOMMU_HWPT_GET_DIRTY_BITMAP`).
//!
//! Bit `k` of the bitmap is bit `k % 8` of byte `k / 8` at `data` (the
//! little-endian `u64` words the uAPI describes, at any byte alignment).
//! Bits are only ever set: the caller's other bits stay as they were, so
//! each touched byte is read, ORed and written back. Work happens one
//! window of at most [`WINDOW`] bytes at a time, so the bitmap's size
//! (the caller's) never sizes an allocation; the domain reports dirty
//! pieces in ascending IOVA order, so each window is written once.

use crate::errno::{Errno, Result};
use crate::memsrc::MemorySource;
use alloc::sync::Arc;

/// Bytes of bitmap handled at a time.
pub const WINDOW: usize = 4096;

/// Sets bits of a user bitmap, a window at a time.
pub struct BitmapWriter<'a> {
    source: &'a Arc<dyn MemorySource>,
    data: u64,
    /// Bytes the bitmap has (its bit count rounded up).
    bytes: u64,
    /// First byte of the current window, if any bit was set in it.
    window: Option<u64>,
    buf: [u8; WINDOW],
    /// The first failure (later bits are dropped; `finish` reports it).
    error: Option<Errno>,
}

impl core::fmt::Debug for BitmapWriter<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "BitmapWriter(at {:#x}, {} bytes)", self.data, self.bytes)
    }
}

impl<'a> BitmapWriter<'a> {
    /// A writer for a bitmap of `bits` bits at user address `data`.
    pub fn new(source: &'a Arc<dyn MemorySource>, data: u64, bits: u64) -> Self {
        Self { source, data, bytes: bits.div_ceil(8), window: None, buf: [0; WINDOW], error: None }
    }

    /// Sets bits `first..=last`.
    pub fn set(&mut self, first: u64, last: u64) {
        let mut bit = first;
        while bit <= last && self.error.is_none() {
            let byte = bit / 8;
            if byte >= self.bytes {
                return;
            }
            let start = byte - byte % WINDOW as u64;
            if self.window != Some(start) {
                self.flush();
                self.window = Some(start);
                self.buf = [0; WINDOW];
            }
            // The rest of this byte, at most.
            let k = (bit % 8) as u32;
            let n = (8 - k).min((last - bit + 1).min(8) as u32);
            let mask = (((1u16 << n) - 1) << k) as u8;
            self.buf[(byte - start) as usize] |= mask;
            bit += n as u64;
        }
    }

    /// ORs the current window into the caller's bitmap.
    fn flush(&mut self) {
        let Some(start) = self.window.take() else { return };
        if self.error.is_some() {
            return;
        }
        let len = (self.bytes - start).min(WINDOW as u64) as usize;
        let Some(addr) = self.data.checked_add(start).filter(|a| a.checked_add(len as u64).is_some()) else {
            self.error = Some(Errno::EFAULT);
            return;
        };
        let mut old = [0u8; WINDOW];
        let r = self.source.read_user(addr, &mut old[..len]).and_then(|()| {
            for (o, b) in old[..len].iter_mut().zip(&self.buf[..len]) {
                *o |= *b;
            }
            self.source.write_user(addr, &old[..len])
        });
        if let Err(e) = r {
            self.error = Some(e);
        }
    }

    /// Writes what is left; the first failure, if any (`EFAULT`).
    pub fn finish(mut self) -> Result<()> {
        self.flush();
        self.error.map_or(Ok(()), Err)
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
        w.set(0, 2);
        w.set(9, 9);
        w.set(60, 70);
        w.set(8 * 4096 + 1, 8 * 4096 + 1);
        w.set(39_999, 50_000);
        w.finish().unwrap();
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
        let mut w = BitmapWriter::new(&src, 0x10_0000, 8 * 0x2000);
        w.set(8 * 0x1800, 8 * 0x1800);
        assert_eq!(w.finish(), Err(Errno::EFAULT));
        let w = BitmapWriter::new(&src, u64::MAX - 2, 64);
        assert_eq!(w.finish(), Ok(()), "nothing set, nothing written");
        let mut w = BitmapWriter::new(&src, u64::MAX - 2, 64);
        w.set(0, 0);
        assert_eq!(w.finish(), Err(Errno::EFAULT));
    }
}
