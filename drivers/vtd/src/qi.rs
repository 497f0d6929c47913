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

    /// Type 4: interrupt entry cache invalidate (spec 6.5.2.7): every
    /// entry (`None`) or the `2^im` entries from `index` (aligned to that
    /// count). Word 0: type, G in bit 4 (index-selective), IM in 31:27,
    /// IIDX in 47:32.
    pub fn iec(index: Option<(u16, u8)>) -> Self {
        match index {
            None => Self([0x4, 0]),
            Some((index, im)) => Self([0x4 | 1 << 4 | ((im as u64) & 0x1f) << 27 | (index as u64) << 32, 0]),
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
            4 => write!(f, "IEC(g{} index {} im {})", (lo >> 4) & 1, (lo >> 32) as u16, (lo >> 27) & 0x1f),
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

// ---------------------------------------------------------------------------
// 256-bit descriptors (scalable mode).
//
// With IQA.DW = 1 every slot of the queue is 32 bytes and every descriptor,
// old types included, occupies one: the legacy types keep their 128-bit
// layout in the low half and leave the high half zero (QEMU treats all of
// words 2 and 3 as reserved for them and reports IQE otherwise). The
// PASID-based types (PASID-based IOTLB, PASID-cache) only exist in this
// form: QEMU rejects them in a 128-bit queue.
// ---------------------------------------------------------------------------

/// Queue geometry with IQA.DW = 1 (spec 11.4.9.1-3).
pub mod iq256 {
    /// IQA.DW: 256-bit descriptors.
    pub const IQA_DW: u64 = 1 << 11;
    /// IQH/IQT hold the slot index shifted left by this (bit 4 of IQT is
    /// reserved with DW = 1: QEMU reports IQE when it is set).
    pub const INDEX_SHIFT: u32 = 5;
    /// 32-byte slots in one 4 KiB page (IQA.QS = 0).
    pub const SLOTS_PER_PAGE: u64 = 128;
    /// `u64` words per slot.
    pub const WORDS: usize = 4;
}

/// One invalidation descriptor in the 256-bit format (spec 6.5.2, IQA.DW = 1).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor256(pub [u64; 4]);

/// Granularity of a PASID-cache invalidation (spec 6.5.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasidCacheScope {
    /// Every PASID-cache entry tagged with the domain (G = 00b).
    Domain(u16),
    /// The entry for one PASID of one domain (G = 01b).
    Pasid { did: u16, pasid: u32 },
    /// Every PASID-cache entry (G = 11b).
    Global,
}

/// Granularity of a PASID-based IOTLB invalidation (spec 6.5.2.4).
///
/// Only G = 10b and 11b exist in rev 4.x (00b/01b are reserved; QEMU
/// reports IQE for them). To drop every PASID of a domain, use the
/// ordinary IOTLB descriptor, domain-selective ([`Descriptor256::iotlb`]
/// with [`IotlbScope::Domain`]): in scalable mode it covers all PASIDs
/// and all translation types tagged with that domain id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasidIotlbScope {
    /// All mappings of one PASID in one domain (G = 10b), paging-structure
    /// caches included.
    Pasid { did: u16, pasid: u32 },
    /// `2^am` pages from `addr` (aligned to that size) of one PASID in one
    /// domain (G = 11b); `leaf_only` (IH) keeps paging-structure caches.
    Pages { did: u16, pasid: u32, addr: u64, am: u8, leaf_only: bool },
}

impl From<Descriptor> for Descriptor256 {
    fn from(d: Descriptor) -> Self {
        Self([d.0[0], d.0[1], 0, 0])
    }
}

impl Descriptor256 {
    /// A legacy descriptor in a 256-bit slot: the same low 128 bits, the
    /// high 128 bits zero.
    pub fn from_legacy(d: Descriptor) -> Self {
        d.into()
    }

    /// Type 1: context-cache invalidate (256-bit slot). In scalable mode
    /// the hardware ignores the domain id of a device-selective request.
    pub fn context(scope: ContextScope) -> Self {
        Descriptor::context(scope).into()
    }

    /// Type 2: IOTLB invalidate (256-bit slot), draining reads and writes.
    /// In scalable mode, domain-selective covers every PASID of the domain.
    pub fn iotlb(scope: IotlbScope) -> Self {
        Descriptor::iotlb(scope).into()
    }

    /// Type 5: invalidation wait with status write (256-bit slot).
    pub fn wait(status_addr: u64, data: u32) -> Self {
        Descriptor::wait(status_addr, data).into()
    }

    /// Type 7: PASID-cache invalidate (spec 6.5.2.5). Word 0: type in
    /// bits 3:0, granularity in 5:4, domain id in 31:16, PASID in 51:32;
    /// words 1-3 zero.
    pub fn pasid_cache(scope: PasidCacheScope) -> Self {
        let lo = match scope {
            PasidCacheScope::Domain(did) => (did as u64) << 16,
            PasidCacheScope::Pasid { did, pasid } => 1 << 4 | (did as u64) << 16 | pasid_field(pasid),
            PasidCacheScope::Global => 3 << 4,
        };
        Self([0x7 | lo, 0, 0, 0])
    }

    /// Type 6: PASID-based IOTLB invalidate (spec 6.5.2.4). Word 0: type,
    /// granularity in 5:4, domain id in 31:16, PASID in 51:32. Word 1 (for
    /// page-selective): AM in 5:0, IH in bit 6, address in 63:12.
    pub fn pasid_iotlb(scope: PasidIotlbScope) -> Self {
        match scope {
            PasidIotlbScope::Pasid { did, pasid } => {
                Self([0x6 | 2 << 4 | (did as u64) << 16 | pasid_field(pasid), 0, 0, 0])
            }
            PasidIotlbScope::Pages { did, pasid, addr, am, leaf_only } => Self([
                0x6 | 3 << 4 | (did as u64) << 16 | pasid_field(pasid),
                addr & !0xfff | (leaf_only as u64) << 6 | (am as u64 & 0x3f),
                0,
                0,
            ]),
        }
    }

    /// Descriptor type (bits 3:0; the high type bits 11:9 are zero for
    /// every type built here).
    pub fn kind(self) -> u8 {
        (self.0[0] & 0xf) as u8
    }
}

/// The 20-bit PASID field at bits 51:32 of word 0.
fn pasid_field(pasid: u32) -> u64 {
    ((pasid & 0xf_ffff) as u64) << 32
}

impl fmt::Debug for Descriptor256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [w0, w1, w2, w3] = self.0;
        let g = (w0 >> 4) & 3;
        let did = (w0 >> 16) as u16;
        let pasid = (w0 >> 32) & 0xf_ffff;
        match self.kind() {
            1 | 2 | 5 if w2 == 0 && w3 == 0 => write!(f, "{:?}", Descriptor([w0, w1])),
            6 => write!(
                f,
                "PIOTLB(g{g} did {did} pasid {pasid} addr {:#x} am {} ih {})",
                w1 & !0xfff,
                w1 & 0x3f,
                (w1 >> 6) & 1
            ),
            7 => write!(f, "PC(g{g} did {did} pasid {pasid})"),
            k => write!(f, "Desc256(type {k} {w0:#x} {w1:#x} {w2:#x} {w3:#x})"),
        }
    }
}

#[cfg(test)]
mod tests256 {
    use super::*;

    /// Reserved bits of word 0 QEMU checks for types 6 and 7 (bits 8:6,
    /// 15:12, 63:52), and of word 1 for type 6 (bits 11:7).
    const PASID_DESC_RSVD0: u64 = 0xfff0_0000_0000_f1c0;
    const PIOTLB_RSVD1: u64 = 0xf80;

    #[test]
    fn legacy_types_fill_the_low_half_only() {
        let c = Descriptor256::context(ContextScope::Device { did: 3, sid: 0x10 });
        assert_eq!(c.0, [0x31 | 3 << 16 | 0x10 << 32, 0, 0, 0]);
        let i = Descriptor256::iotlb(IotlbScope::Pages { did: 1, addr: 0x20_0000, am: 9, leaf_only: true });
        assert_eq!(i.0, [0x2 | 0x30 | 0xc0 | 1 << 16, 0x20_0000 | 1 << 6 | 9, 0, 0]);
        let w = Descriptor256::wait(0x1000, 7);
        assert_eq!(w.0, [0x5 | 0x20 | 7 << 32, 0x1000, 0, 0]);
        assert_eq!(Descriptor256::from_legacy(Descriptor::iotlb(IotlbScope::Global)).0[2..], [0, 0]);
        assert_eq!((c.kind(), i.kind(), w.kind()), (1, 2, 5));
    }

    #[test]
    fn pasid_cache_layout() {
        let d = Descriptor256::pasid_cache(PasidCacheScope::Pasid { did: 0x1234, pasid: 0xa_bcde });
        assert_eq!(d.0, [0x7 | 1 << 4 | 0x1234 << 16 | 0xa_bcde << 32, 0, 0, 0]);
        assert_eq!(Descriptor256::pasid_cache(PasidCacheScope::Domain(5)).0, [0x7 | 5 << 16, 0, 0, 0]);
        assert_eq!(Descriptor256::pasid_cache(PasidCacheScope::Global).0, [0x37, 0, 0, 0]);
        // PASID 0 for requests without PASID.
        assert_eq!(Descriptor256::pasid_cache(PasidCacheScope::Pasid { did: 1, pasid: 0 }).0[0], 0x17 | 1 << 16);
        // Out-of-range PASIDs are truncated, never spill into reserved bits.
        let big = Descriptor256::pasid_cache(PasidCacheScope::Pasid { did: 0xffff, pasid: u32::MAX });
        assert_eq!(big.0[0] & PASID_DESC_RSVD0, 0);
        assert_eq!(d.kind(), 7);
    }

    #[test]
    fn pasid_iotlb_layout() {
        let p = Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did: 9, pasid: 0 });
        assert_eq!(p.0, [0x6 | 2 << 4 | 9 << 16, 0, 0, 0]);
        let g = Descriptor256::pasid_iotlb(PasidIotlbScope::Pages {
            did: 2,
            pasid: 0x10,
            addr: 0x7f_ffe0_0fff,
            am: 3,
            leaf_only: true,
        });
        assert_eq!(g.0, [0x6 | 3 << 4 | 2 << 16 | 0x10 << 32, 0x7f_ffe0_0000 | 1 << 6 | 3, 0, 0]);
        let worst = Descriptor256::pasid_iotlb(PasidIotlbScope::Pages {
            did: 0xffff,
            pasid: u32::MAX,
            addr: u64::MAX,
            am: 0xff,
            leaf_only: true,
        });
        assert_eq!(worst.0[0] & PASID_DESC_RSVD0, 0);
        assert_eq!(worst.0[1] & PIOTLB_RSVD1, 0);
        assert_eq!(worst.0[2..], [0, 0]);
        assert_eq!(g.kind(), 6);
    }

    #[test]
    fn debug_decodes() {
        let s = alloc::format!("{:?}", Descriptor256::pasid_cache(PasidCacheScope::Pasid { did: 4, pasid: 0 }));
        assert_eq!(s, "PC(g1 did 4 pasid 0)");
        let s = alloc::format!("{:?}", Descriptor256::iotlb(IotlbScope::Domain(4)));
        assert!(s.starts_with("IOTLB(g2 did 4"), "{s}");
        let s = alloc::format!("{:?}", Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did: 4, pasid: 0 }));
        assert!(s.starts_with("PIOTLB(g2 did 4 pasid 0"), "{s}");
    }
}
