//! x86-64 paging used as the VT-d first stage (VT-d spec rev 4, section
//! 9.7, "First-Stage Paging Entries", which defers to the Intel SDM's
//! 4-level and 5-level paging formats; 1 GiB pages need CAP.FS1GP, 5 levels
//! CAP.FS5LP).
//!
//! Entry layout used here:
//!
//! | bits  | name | meaning |
//! |-------|------|---------|
//! | 0     | P    | present |
//! | 1     | R/W  | writes allowed (reads are implied by P) |
//! | 2     | U/S  | user accesses allowed |
//! | 5     | A    | accessed |
//! | 6     | D    | dirty (leaves) |
//! | 7     | PS   | level 1 and 2 only: the entry maps a 2 MiB / 1 GiB page |
//! | 12    | PAT  | large leaves only; never set here, masked from addresses |
//! | 51:12 | ADDR | next table or page (2 MiB / 1 GiB aligned for large pages) |
//! | 63    | XD   | execute disable (optional, see [`X86FirstStage::with_execute_disable`]) |
//!
//! Choices:
//! * Every entry, table or leaf, has U/S set (configurable): DMA requests
//!   are checked as user accesses unless the PASID entry grants supervisor
//!   requests, and U/S must be set at every level for a user access.
//! * A is set on every entry and D on every writable leaf up front, so the
//!   walker never has to write the tables back (an atomic update the
//!   engine would otherwise race with, and a write to memory that may not
//!   be coherent). With [`X86FirstStage::with_dirty_tracking`] D is left
//!   clear instead, so the walker sets it on the first write through a
//!   leaf, and the engine reads and clears it ([`PtFormat::dirty_bit`]).
//! * Table entries carry R/W: as in the second stage, the walk's
//!   permissions are the intersection over the levels.
//! * There is no write-only mapping on x86: a write-only request maps as
//!   read-write, and [`PtFormat::leaf_prot`] reports that.
//! * There is no snoop bit in the entries (first-stage snooping is the
//!   PASID entry's PGSNP), so [`Prot::CACHE`] is not encoded.

use crate::format::PtFormat;
use crate::geometry::{Geometry, level_size};
use core::fmt;
use portcullis_iommu::Prot;

/// Present (bit 0).
pub const FS_P: u64 = 1 << 0;
/// Read/write (bit 1).
pub const FS_RW: u64 = 1 << 1;
/// User/supervisor (bit 2).
pub const FS_US: u64 = 1 << 2;
/// Accessed (bit 5).
pub const FS_A: u64 = 1 << 5;
/// Dirty (bit 6).
pub const FS_D: u64 = 1 << 6;
/// Page size (bit 7) in level 1 and 2 entries.
pub const FS_PS: u64 = 1 << 7;
/// Execute disable (bit 63).
pub const FS_XD: u64 = 1 << 63;
/// Address field, bits 51:12.
pub const FS_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// x86-64 first-stage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X86FirstStage {
    geometry: Geometry,
    user: bool,
    execute_disable: bool,
    dirty: bool,
}

impl X86FirstStage {
    /// `levels`-level paging with the lower canonical half as aperture (the
    /// top bit the levels translate is the sign bit) and 2 MiB pages.
    const fn with_levels(levels: u32) -> Self {
        let Some(g) = Geometry::new(levels) else { panic!("x86 paging has 4 or 5 levels") };
        let geometry = g.with_input_bits(g.covered_bits() - 1).with_large_pages(true, false);
        Self { geometry, user: true, execute_disable: false, dirty: false }
    }

    /// 4-level paging (48-bit, lower canonical half usable) with 2 MiB
    /// pages, user accesses, no XD.
    pub const fn four_level() -> Self {
        Self::with_levels(4)
    }

    /// 5-level paging (57-bit; CAP.FS5LP).
    pub const fn five_level() -> Self {
        Self::with_levels(5)
    }

    /// Allows 1 GiB leaves (CAP.FS1GP).
    pub const fn with_1g_pages(mut self, on: bool) -> Self {
        self.geometry = self.geometry.with_large_pages(true, on);
        self
    }

    /// Whether entries set U/S (default true).
    pub const fn with_user(mut self, on: bool) -> Self {
        self.user = on;
        self
    }

    /// Whether leaves set XD. Off by default: bit 63 is only meaningful
    /// when the PASID entry enables execute requests.
    pub const fn with_execute_disable(mut self, on: bool) -> Self {
        self.execute_disable = on;
        self
    }

    /// Whether writable leaves start clean (D clear) so the walker marks
    /// written pages, for dirty tracking; off by default (D set up front).
    pub const fn with_dirty_tracking(mut self, on: bool) -> Self {
        self.dirty = on;
        self
    }

    /// Limits output addresses to `bits`; at most 52.
    pub const fn with_output_bits(mut self, bits: u32) -> Self {
        self.geometry = self.geometry.with_output_bits(bits);
        self
    }

    const fn common(&self) -> u64 {
        FS_P | FS_A | if self.user { FS_US } else { 0 }
    }
}

impl PtFormat for X86FirstStage {
    #[inline]
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    #[inline]
    fn is_present(&self, pte: u64) -> bool {
        pte & FS_P != 0
    }
    #[inline]
    fn is_leaf(&self, pte: u64, level: u32) -> bool {
        level == 0 || pte & FS_PS != 0
    }
    #[inline]
    fn table_address(&self, pte: u64) -> u64 {
        pte & FS_ADDR_MASK
    }
    #[inline]
    fn leaf_address(&self, pte: u64, level: u32) -> u64 {
        pte & FS_ADDR_MASK & !(level_size(level) - 1)
    }
    #[inline]
    fn leaf_prot(&self, pte: u64) -> Prot {
        if pte & FS_RW != 0 { Prot::RW } else { Prot::READ }
    }
    #[inline]
    fn table_entry(&self, table: u64, _level: u32) -> u64 {
        table | self.common() | FS_RW
    }
    #[inline]
    fn leaf_entry(&self, phys: u64, level: u32, prot: Prot) -> u64 {
        let mut pte = phys | self.common();
        if prot.writable() {
            pte |= FS_RW;
            if !self.dirty {
                pte |= FS_D;
            }
        }
        if level > 0 {
            pte |= FS_PS;
        }
        if self.execute_disable {
            pte |= FS_XD;
        }
        pte
    }
    fn dirty_bit(&self) -> u64 {
        if self.dirty { FS_D } else { 0 }
    }
    fn fmt_entry(&self, pte: u64, level: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |bit: u64, name: &'static str| if pte & bit != 0 { name } else { "" };
        let kind = if self.is_leaf(pte, level) { "page" } else { "table" };
        let addr = if self.is_leaf(pte, level) { self.leaf_address(pte, level) } else { self.table_address(pte) };
        write!(
            f,
            "{kind} {addr:#x} P{}{}{}{}{}{}",
            flag(FS_RW, " RW"),
            flag(FS_US, " US"),
            flag(FS_A, " A"),
            flag(FS_D, " D"),
            flag(FS_PS, " PS"),
            flag(FS_XD, " XD")
        )
    }
}
