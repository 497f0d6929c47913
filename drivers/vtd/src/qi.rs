//! Queued invalidation (VT-d spec 6.5.2): 128-bit descriptors in a ring
//! the hardware consumes from IQH to IQT.
//!
//! Invariants: the producer reads the hardware head before reusing a slot;
//! every batch ends with an invalidation-wait descriptor whose status
//! write tells the driver the whole batch completed (never SW together with
//! IF: QEMU asserts on that combination).

use core::fmt;

/// One invalidation descriptor (legacy 128-bit format).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Descriptor(pub [u64; 2]);

/// Granularity of an IOTLB invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbScope {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// `2^am` pages from `addr` (aligned to that size) in one domain;
    /// `leaf_only` (IH) keeps paging-structure caches.
    Pages { did: u16, addr: u64, am: u8, leaf_only: bool },
}

/// Granularity of a context-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextScope {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// One device (source id) of a domain.
    Device { did: u16, sid: u16 },
}

impl Descriptor {
    /// Type 1: context-cache invalidate.
    pub fn context(scope: ContextScope) -> Self {
        let lo = match scope {
            ContextScope::Global => 1 << 4,
            ContextScope::Domain(did) => 2 << 4 | (did as u64) << 16,
            ContextScope::Device { did, sid } => 3 << 4 | (did as u64) << 16 | (sid as u64) << 32,
        };
        Self([lo | 0x1, 0])
    }

    /// Type 2: IOTLB invalidate, draining reads and writes.
    pub fn iotlb(scope: IotlbScope) -> Self {
        let drain = 1 << 6 | 1 << 7;
        match scope {
            IotlbScope::Global => Self([0x2 | 1 << 4 | drain, 0]),
            IotlbScope::Domain(did) => Self([0x2 | 2 << 4 | drain | (did as u64) << 16, 0]),
            IotlbScope::Pages { did, addr, am, leaf_only } => Self([
                0x2 | 3 << 4 | drain | (did as u64) << 16,
                addr & !0xfff | (leaf_only as u64) << 6 | (am as u64 & 0x3f),
            ]),
        }
    }

    /// Type 5: invalidation wait, writing `data` to `status_addr` (4-byte
    /// aligned) when everything before it completed.
    pub fn wait(status_addr: u64, data: u32) -> Self {
        Self([0x5 | 1 << 5 | (data as u64) << 32, status_addr & !0x3])
    }

    /// Descriptor type (low 4 bits).
    pub fn kind(self) -> u8 {
        (self.0[0] & 0xf) as u8
    }
}

impl fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [lo, hi] = self.0;
        match self.kind() {
            1 => write!(f, "CC(g{} did {} sid {:#x})", (lo >> 4) & 3, (lo >> 16) as u16, (lo >> 32) as u16),
            2 => write!(
                f,
                "IOTLB(g{} did {} addr {:#x} am {} ih {})",
                (lo >> 4) & 3,
                (lo >> 16) as u16,
                hi & !0xfff,
                hi & 0x3f,
                (hi >> 6) & 1
            ),
            5 => write!(f, "WAIT(status {:#x} data {:#x})", hi, lo >> 32),
            k => write!(f, "Desc(type {k} {lo:#x} {hi:#x})"),
        }
    }
}

/// Splits `[start, last]` (4 KiB granular) into page-selective
/// invalidations: naturally aligned power-of-two blocks of at most
/// `2^max_am` pages. Returns `None` when more than `max_descs` would be
/// needed (the caller then invalidates the whole domain).
pub fn page_blocks(start: u64, last: u64, max_am: u8, max_descs: usize) -> Option<alloc::vec::Vec<(u64, u8)>> {
    let mut out = alloc::vec::Vec::new();
    let mut page = start >> 12;
    let end = (last >> 12) + 1;
    while page < end {
        let align = if page == 0 { 63 } else { page.trailing_zeros() };
        let fit = 63 - (end - page).leading_zeros();
        let am = align.min(fit).min(max_am as u32) as u8;
        out.push((page << 12, am));
        if out.len() > max_descs {
            return None;
        }
        page += 1 << am;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_layouts() {
        assert_eq!(Descriptor::context(ContextScope::Global).0, [0x11, 0]);
        assert_eq!(Descriptor::context(ContextScope::Device { did: 3, sid: 0x10 }).0, [0x31 | 3 << 16 | 0x10 << 32, 0]);
        assert_eq!(Descriptor::iotlb(IotlbScope::Domain(5)).0, [0x2 | 0x20 | 0xc0 | 5 << 16, 0]);
        let p = Descriptor::iotlb(IotlbScope::Pages { did: 1, addr: 0x20_0000, am: 9, leaf_only: true });
        assert_eq!(p.0, [0x2 | 0x30 | 0xc0 | 1 << 16, 0x20_0000 | 1 << 6 | 9]);
        let w = Descriptor::wait(0x1000, 7);
        assert_eq!(w.0, [0x5 | 0x20 | 7 << 32, 0x1000]);
        assert_eq!(w.0[0] & 0x10, 0, "never IF together with SW");
    }

    #[test]
    fn page_blocks_are_aligned_and_cover_exactly() {
        assert_eq!(page_blocks(0x1000, 0x1fff, 9, 8), Some(alloc::vec![(0x1000, 0)]));
        assert_eq!(page_blocks(0, 0x3f_ffff, 9, 8), Some(alloc::vec![(0, 9), (0x20_0000, 9)]));
        assert_eq!(page_blocks(0x3000, 0x8fff, 9, 8), Some(alloc::vec![(0x3000, 0), (0x4000, 2), (0x8000, 0)]));
        assert_eq!(page_blocks(0x1000, 0x10_0fff, 0, 8), None, "too many single pages");
    }
}
