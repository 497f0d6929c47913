//! VT-d second-stage page tables (VT-d spec rev 4, section 9.8,
//! "Second-Stage Paging Entries"; widths from CAP.SAGAW and CAP.MGAW in
//! 11.4.2, large pages from CAP.SLLPS, snoop control from ECAP.SC).
//!
//! Entry layout used here (same for all levels unless noted):
//!
//! | bits  | name | meaning |
//! |-------|------|---------|
//! | 0     | R    | read allowed |
//! | 1     | W    | write allowed |
//! | 7     | PS   | level 1 and 2 only: the entry maps a 2 MiB / 1 GiB page |
//! | 8     | A    | leaves, with SSADE in the PASID entry: the walker set it on an access |
//! | 9     | D    | leaves, with SSADE in the PASID entry: the walker set it on a write |
//! | 11    | SNP  | leaves only: DMA through this page snoops CPU caches |
//! | 51:12 | ADDR | next table, or the page (2 MiB / 1 GiB aligned for large pages) |
//!
//! An entry is present when R or W is set; there is no separate present
//! bit. A non-leaf entry needs *both* R and W: the effective permission of
//! a walk is the intersection of every level's R/W, so a table entry with
//! only R would make every page below it read-only (QEMU enforces this and
//! so does hardware). Execute (bit 2), the memory-type fields (bits 6:3)
//! and the accessed/dirty bits (8, 9) are left clear: Portcullis enables
//! neither execute requests nor memory-type overrides, and a fresh leaf is
//! clean. With [`VtdSecondStage::with_dirty_tracking`] the format reports
//! D (bit 9) as its [`PtFormat::dirty_bit`]: the unit sets A and D in
//! leaves only for PASID entries with SSADE (second-stage accessed/dirty
//! enable, needs ECAP.SSADS), and the engine reads and clears D.

use crate::format::PtFormat;
use crate::geometry::{Geometry, level_size};
use core::fmt;
use portcullis_iommu::Prot;

/// Read permission (bit 0).
pub const SS_READ: u64 = 1 << 0;
/// Write permission (bit 1).
pub const SS_WRITE: u64 = 1 << 1;
/// Page size: a level-1 or level-2 entry that maps a large page (bit 7).
pub const SS_PS: u64 = 1 << 7;
/// Accessed (bit 8), set by a unit with SSADE enabled.
pub const SS_A: u64 = 1 << 8;
/// Dirty (bit 9), set in a leaf by a unit with SSADE enabled when a device
/// writes through it.
pub const SS_D: u64 = 1 << 9;
/// Snoop: force snooping for DMA through this leaf (bit 11, needs ECAP.SC).
pub const SS_SNP: u64 = 1 << 11;
/// Address field, bits 51:12.
pub const SS_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A VT-d second-stage format for one remapping unit's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdSecondStage {
    geometry: Geometry,
    snoop: bool,
    dirty: bool,
}

impl VtdSecondStage {
    /// A 3-level (39-bit), 4-level (48-bit) or 5-level (57-bit) table with
    /// 2 MiB and 1 GiB pages, no snoop control and 52-bit output addresses;
    /// `None` for other level counts.
    pub const fn new(levels: u32) -> Option<Self> {
        if levels < 3 || levels > 5 {
            return None;
        }
        match Geometry::new(levels) {
            Some(g) => Some(Self { geometry: g.with_large_pages(true, true), snoop: false, dirty: false }),
            None => None,
        }
    }

    /// The format for a unit reporting the SAGAW widths `sagaw_widths`
    /// (39, 48, 57), CAP.MGAW `mgaw`, CAP.SLLPS and ECAP.SC: the narrowest
    /// table width that covers MGAW, or the widest the unit has if none
    /// does, with the aperture limited to MGAW. `None` if the unit offers
    /// no width this engine knows.
    pub fn from_caps(
        sagaw_widths: impl IntoIterator<Item = u32>,
        mgaw: u32,
        large_2m: bool,
        large_1g: bool,
        snoop_control: bool,
    ) -> Option<Self> {
        let mut covering: Option<Self> = None;
        let mut widest: Option<Self> = None;
        for w in sagaw_widths {
            // Only the exact widths of a 3, 4 or 5-level table.
            let levels = Geometry::levels_covering(w);
            let Some(f) = Self::new(levels).filter(|_| Geometry::bits_covered(levels) == w) else { continue };
            if w >= mgaw && covering.is_none_or(|c| levels < c.levels()) {
                covering = Some(f);
            }
            if widest.is_none_or(|c| levels > c.levels()) {
                widest = Some(f);
            }
        }
        let format = covering.or(widest)?.with_large_pages(large_2m, large_1g).with_snoop_control(snoop_control);
        Some(format.with_guest_width(mgaw))
    }

    /// Allows or forbids 2 MiB and 1 GiB leaves (CAP.SLLPS bits 0 and 1).
    pub const fn with_large_pages(mut self, two_mib: bool, one_gib: bool) -> Self {
        self.geometry = self.geometry.with_large_pages(two_mib, one_gib);
        self
    }

    /// Whether leaves may set SNP (ECAP.SC).
    pub const fn with_snoop_control(mut self, snoop_control: bool) -> Self {
        self.snoop = snoop_control;
        self
    }

    /// Whether the engine reads and clears the D bit (bit 9) of leaves:
    /// for tables behind PASID entries with SSADE (ECAP.SSADS).
    pub const fn with_dirty_tracking(mut self, on: bool) -> Self {
        self.dirty = on;
        self
    }

    /// Limits the aperture to `bits` of IOVA (CAP.MGAW); never beyond what
    /// the levels cover, never below 12 bits.
    pub const fn with_guest_width(mut self, bits: u32) -> Self {
        self.geometry = self.geometry.with_input_bits(bits);
        self
    }

    /// Limits output addresses to `bits` (the host address width); at most 52.
    pub const fn with_output_bits(mut self, bits: u32) -> Self {
        self.geometry = self.geometry.with_output_bits(bits);
        self
    }
}

impl PtFormat for VtdSecondStage {
    #[inline]
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    #[inline]
    fn is_present(&self, pte: u64) -> bool {
        pte & (SS_READ | SS_WRITE) != 0
    }
    #[inline]
    fn is_leaf(&self, pte: u64, level: u32) -> bool {
        level == 0 || pte & SS_PS != 0
    }
    #[inline]
    fn table_address(&self, pte: u64) -> u64 {
        pte & SS_ADDR_MASK
    }
    #[inline]
    fn leaf_address(&self, pte: u64, level: u32) -> u64 {
        pte & SS_ADDR_MASK & !(level_size(level) - 1)
    }
    #[inline]
    fn leaf_prot(&self, pte: u64) -> Prot {
        let mut prot = Prot::NONE;
        if pte & SS_READ != 0 {
            prot = prot | Prot::READ;
        }
        if pte & SS_WRITE != 0 {
            prot = prot | Prot::WRITE;
        }
        if pte & SS_SNP != 0 {
            prot = prot | Prot::CACHE;
        }
        prot
    }
    #[inline]
    fn table_entry(&self, table: u64, _level: u32) -> u64 {
        table | SS_READ | SS_WRITE
    }
    #[inline]
    fn leaf_entry(&self, phys: u64, level: u32, prot: Prot) -> u64 {
        let mut pte = phys;
        if prot.readable() {
            pte |= SS_READ;
        }
        if prot.writable() {
            pte |= SS_WRITE;
        }
        if level > 0 {
            pte |= SS_PS;
        }
        if self.snoop && prot.contains(Prot::CACHE) {
            pte |= SS_SNP;
        }
        pte
    }
    fn snoop_control(&self) -> bool {
        self.snoop
    }
    fn dirty_bit(&self) -> u64 {
        if self.dirty { SS_D } else { 0 }
    }
    fn fmt_entry(&self, pte: u64, level: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |bit: u64, name: &'static str| if pte & bit != 0 { name } else { "-" };
        if self.is_leaf(pte, level) {
            write!(
                f,
                "page {:#x} {}{}{}{}{}{}",
                self.leaf_address(pte, level),
                flag(SS_READ, "R"),
                flag(SS_WRITE, "W"),
                flag(SS_PS, " PS"),
                flag(SS_SNP, " SNP"),
                flag(SS_A, " A"),
                flag(SS_D, " D")
            )
        } else {
            write!(f, "table {:#x} {}{}", self.table_address(pte), flag(SS_READ, "R"), flag(SS_WRITE, "W"))
        }
    }
}
