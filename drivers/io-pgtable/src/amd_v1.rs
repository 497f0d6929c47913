//! AMD-Vi "v1" host page tables (AMD I/O Virtualization Technology (IOMMU)
//! Specification, pub. 48882, section 2.2.3 "I/O Page Tables for Host
//! Translations"; the device table entry's Mode field in 2.2.2; the
//! supported depth from EFR.HATS, the Extended Feature Register at MMIO
//! offset 0x0030, section 3.4).
//!
//! # Entries
//!
//! Every entry is 64 bits. Page directory entries (PDEs, pointing at the
//! next table) and page table entries (PTEs, mapping a page) share one
//! layout, told apart by the NextLevel field:
//!
//! | bits  | name      | meaning |
//! |-------|-----------|---------|
//! | 0     | PR        | present |
//! | 5     | A         | PTE: accessed (written by the IOMMU only when the DTE's HAD enables it; never set here) |
//! | 6     | D         | PTE: dirty (written by the IOMMU only when the DTE's HAD is 11b; never set here) |
//! | 11:9  | NextLevel | PDE: hardware level of the table it points at; PTE: 0 (or 7, see below) |
//! | 51:12 | address   | next table, or the page (aligned to the page size) |
//! | 59    | U         | PTE: an ATS-capable device must use untranslated requests for this page (not used here) |
//! | 60    | FC        | PTE: force coherent, the upstream request snoops whatever the device asked |
//! | 61    | IR        | read allowed |
//! | 62    | IW        | write allowed |
//!
//! # Levels
//!
//! The hardware numbers tables from 1 (the table of 4 KiB PTEs) up to 6;
//! the DTE's Mode field says how many levels the walk starts with. This
//! engine numbers *entries* from 0 (4 KiB leaves), so an entry at engine
//! level `l` sits in a table of hardware level `l + 1`:
//!
//! * a table entry at engine level `l` points at a table of hardware level
//!   `l`, so its NextLevel is `l` ([`AmdV1::table_entry`] writes exactly
//!   that);
//! * a leaf has NextLevel 0 at every level: at engine level 0 it maps
//!   4 KiB, at level 1 2 MiB, at level 2 1 GiB. There is no page-size bit:
//!   "NextLevel 0 above the bottom" *is* the large page.
//!
//! The walk ANDs IR and IW over the DTE, every PDE and the PTE, so table
//! entries always carry IR|IW and the leaf alone decides the permissions.
//! IR and IW are independent bits, so a write-only page is expressible and
//! [`PtFormat::accepts`] keeps its default (read or write or both).
//!
//! # What this format does not produce
//!
//! Two encodings in 2.2.3 are never written here:
//!
//! * **NextLevel 7**: a PTE whose page size is a power of two between the
//!   level sizes, encoded in the low address bits (a run of ones from
//!   bit 12 ended by a zero: size = 2^(13 + number of ones)) and replicated
//!   in every entry the page covers.
//! * **Level skipping**: a PDE whose NextLevel is lower than the level just
//!   below it, so the walk jumps over levels (the IOVA bits of the skipped
//!   levels must then be zero).
//!
//! The engine only ever reads tables it built, so it never meets them. For
//! tables built by someone else, [`AmdV1::decode`] classifies every entry
//! as what it is ([`AmdV1Entry`]), and `Debug` output through
//! [`crate::Entry`] names them. Through the [`PtFormat`] seam, any present
//! entry that is not exactly "table one hardware level down" counts as
//! terminal ([`PtFormat::is_leaf`] is true), so the engine never follows a
//! pointer it does not understand into memory it does not own, nor frees
//! it as a table. [`PageTable::check_invariants`](crate::PageTable::check_invariants)
//! is not the tool for foreign tables; [`AmdV1::decode`] is.
//!
//! # Depth
//!
//! 3 to 6 levels (39, 48, 57 bits and the full 64-bit space; a sixth level
//! uses only the 128 entries for IOVA bits 63:57). Four levels (48 bits)
//! is the usual choice. EFR.HATS (bits 11:10) says how deep the unit walks:
//! 00b four levels, 01b five, 10b six, 11b reserved
//! ([`AmdV1::max_levels_from_efr`]). QEMU's `amd-iommu` reports 10b (six
//! levels) and its walker follows DTE Mode 1 to 6.

use crate::format::PtFormat;
use crate::geometry::{Geometry, level_size};
use core::fmt;
use portcullis_iommu::Prot;

/// Present (bit 0).
pub const AMD_PR: u64 = 1 << 0;
/// Accessed (bit 5), set in a PTE by the IOMMU only when the DTE's HAD
/// field enables host access tracking; this format never sets it.
pub const AMD_A: u64 = 1 << 5;
/// Dirty (bit 6), set in a PTE by the IOMMU on a write only when the DTE's
/// HAD field is 11b (host dirty, EFR.HDSup); this format never sets it,
/// and reads and clears it when made with [`AmdV1::with_dirty_tracking`].
pub const AMD_D: u64 = 1 << 6;
/// First bit of the NextLevel field (bits 11:9).
pub const AMD_NEXT_LEVEL_SHIFT: u32 = 9;
/// NextLevel field, bits 11:9.
pub const AMD_NEXT_LEVEL_MASK: u64 = 7 << AMD_NEXT_LEVEL_SHIFT;
/// Address field, bits 51:12.
pub const AMD_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// U (bit 59): an ATS-capable device must use untranslated requests for
/// this page; never set here.
pub const AMD_U: u64 = 1 << 59;
/// Force coherent (bit 60, PTEs only).
pub const AMD_FC: u64 = 1 << 60;
/// Read permission (bit 61).
pub const AMD_IR: u64 = 1 << 61;
/// Write permission (bit 62).
pub const AMD_IW: u64 = 1 << 62;

/// The NextLevel value of a page whose size is encoded in its address.
const NEXT_LEVEL_SIZED: u32 = 7;

/// The NextLevel field of `pte`.
#[inline]
pub const fn amd_next_level(pte: u64) -> u32 {
    ((pte & AMD_NEXT_LEVEL_MASK) >> AMD_NEXT_LEVEL_SHIFT) as u32
}

/// An AMD-Vi v1 host page-table format for one unit's capabilities.
///
/// Built with [`AmdV1::new`] (or [`AmdV1::from_caps`]) and adjusted with
/// the `with_*` methods. The DTE of a device using it gets Mode =
/// [`AmdV1::dte_mode`] and the root table's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdV1 {
    geometry: Geometry,
    force_coherent: bool,
    dirty: bool,
}

impl AmdV1 {
    /// A table of `levels` levels (3 to 6; DTE Mode = `levels`) with 2 MiB
    /// and 1 GiB leaves, FC set only on mappings asking for
    /// [`Prot::CACHE`], 52-bit output addresses and the whole aperture the
    /// levels cover. `None` for other level counts.
    pub const fn new(levels: u32) -> Option<Self> {
        if levels < 3 || levels > 6 {
            return None;
        }
        match Geometry::new(levels) {
            Some(g) => Some(Self { geometry: g.with_large_pages(true, true), force_coherent: false, dirty: false }),
            None => None,
        }
    }

    /// The deepest table the unit walks, from its Extended Feature Register
    /// (EFR.HATS, bits 11:10: 00b four levels, 01b five, 10b six). `None`
    /// for the reserved 11b, which means host translation is unusable.
    pub const fn max_levels_from_efr(efr: u64) -> Option<u32> {
        match (efr >> 10) & 3 {
            3 => None,
            hats => Some(4 + hats as u32),
        }
    }

    /// The levels needed to translate `input_bits` of IOVA, never fewer
    /// than 3 (at most 6 covers all 64 bits).
    pub const fn levels_for_input_bits(input_bits: u32) -> u32 {
        let levels = Geometry::levels_covering(input_bits);
        if levels < 3 { 3 } else { levels }
    }

    /// The format for a unit with Extended Feature Register `efr` when
    /// `input_bits` of IOVA are wanted (for example 48, or the unit's
    /// VAsize): the fewest levels covering them, but no more than EFR.HATS
    /// allows, with the aperture limited to `input_bits`. `None` when
    /// EFR.HATS is reserved.
    pub const fn from_caps(efr: u64, input_bits: u32) -> Option<Self> {
        let Some(max) = Self::max_levels_from_efr(efr) else { return None };
        let mut levels = Self::levels_for_input_bits(input_bits);
        if levels > max {
            levels = max;
        }
        match Self::new(levels) {
            Some(f) => Some(f.with_input_bits(input_bits)),
            None => None,
        }
    }

    /// Allows or forbids 2 MiB (NextLevel 0 at hardware level 2) and 1 GiB
    /// (NextLevel 0 at hardware level 3) leaves. Both on by default. The
    /// hardware takes either at any level; 1 GiB leaves are only allowed
    /// together with 2 MiB ones, because the engine splits a 1 GiB page
    /// into 2 MiB leaves when part of it is unmapped.
    pub const fn with_large_pages(mut self, two_mib: bool, one_gib: bool) -> Self {
        self.geometry = self.geometry.with_large_pages(two_mib, two_mib && one_gib);
        self
    }

    /// Whether every leaf sets FC, whatever the mapping asked for. Off by
    /// default: then FC follows [`Prot::CACHE`] (which
    /// `PagingDomain::enforce_cache_coherency` adds to every mapping).
    pub const fn with_force_coherent(mut self, on: bool) -> Self {
        self.force_coherent = on;
        self
    }

    /// Whether the engine reads and clears the D bit (bit 6) of PTEs: for
    /// tables behind DTEs with HAD = 11b (host dirty, EFR.HDSup).
    pub const fn with_dirty_tracking(mut self, on: bool) -> Self {
        self.dirty = on;
        self
    }

    /// Limits the aperture to `bits` of IOVA; never beyond what the levels
    /// cover, never below 12 bits.
    pub const fn with_input_bits(mut self, bits: u32) -> Self {
        self.geometry = self.geometry.with_input_bits(bits);
        self
    }

    /// Limits output addresses to `bits` (the host address width); at most 52.
    pub const fn with_output_bits(mut self, bits: u32) -> Self {
        self.geometry = self.geometry.with_output_bits(bits);
        self
    }

    /// The DTE Mode field for this table (the number of levels).
    pub const fn dte_mode(&self) -> u32 {
        self.geometry.levels()
    }

    /// Whether every leaf sets FC (see [`AmdV1::with_force_coherent`]).
    pub const fn force_coherent(&self) -> bool {
        self.force_coherent
    }

    /// Classifies the raw entry `pte` found at engine level `level` (in a
    /// table of hardware level `level + 1`), including the encodings this
    /// format never writes.
    pub const fn decode(pte: u64, level: u32) -> AmdV1Entry {
        if pte & AMD_PR == 0 {
            return AmdV1Entry::NotPresent;
        }
        let addr = pte & AMD_ADDR_MASK;
        let prot = prot_of(pte);
        match amd_next_level(pte) {
            0 => {
                let size = level_size(level);
                AmdV1Entry::Page { phys: addr & !(size - 1), size, prot }
            }
            NEXT_LEVEL_SIZED => {
                // A run of ones from bit 12, ended by a zero, encodes the size.
                let ones = (addr >> crate::PAGE_SHIFT).trailing_ones();
                let size = 1u64 << (crate::PAGE_SHIFT + 1 + ones);
                AmdV1Entry::SizedPage { phys: addr & !(size - 1), size, prot }
            }
            n if n == level => AmdV1Entry::Table { table: addr },
            n if n < level => AmdV1Entry::SkippingTable { table: addr, next_level: n },
            n => AmdV1Entry::Invalid { next_level: n },
        }
    }
}

/// The permissions in IR, IW and FC.
const fn prot_of(pte: u64) -> Prot {
    let mut prot = Prot::NONE;
    if pte & AMD_IR != 0 {
        prot = prot.union(Prot::READ);
    }
    if pte & AMD_IW != 0 {
        prot = prot.union(Prot::WRITE);
    }
    if pte & AMD_FC != 0 {
        prot = prot.union(Prot::CACHE);
    }
    prot
}

/// One entry as the hardware reads it, from [`AmdV1::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmdV1Entry {
    /// PR clear: translates nothing.
    NotPresent,
    /// A table one hardware level down (NextLevel = engine level), the
    /// only kind of table entry this format writes.
    Table {
        /// Address of the next table.
        table: u64,
    },
    /// A page of the entry's own size (NextLevel 0), the only kind of leaf
    /// this format writes.
    Page {
        /// Start of the page.
        phys: u64,
        /// Its size: 4 KiB at engine level 0, 2 MiB at 1, 1 GiB at 2...
        size: u64,
        /// IR, IW and FC as [`Prot`].
        prot: Prot,
    },
    /// NextLevel 7: a page of `size` bytes encoded in the address bits and
    /// replicated in each entry it covers. Never written by this format.
    SizedPage {
        /// Start of the whole page.
        phys: u64,
        /// The encoded size.
        size: u64,
        /// IR, IW and FC as [`Prot`].
        prot: Prot,
    },
    /// A table entry whose NextLevel skips one or more levels (the skipped
    /// IOVA bits must be zero). Never written by this format.
    SkippingTable {
        /// Address of the next table.
        table: u64,
        /// The hardware level of that table.
        next_level: u32,
    },
    /// A NextLevel the hardware refuses here (not below the entry's own
    /// hardware level, and not 7): the walk faults.
    Invalid {
        /// The NextLevel field.
        next_level: u32,
    },
}

impl PtFormat for AmdV1 {
    #[inline]
    fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    #[inline]
    fn is_present(&self, pte: u64) -> bool {
        pte & AMD_PR != 0
    }
    #[inline]
    fn is_leaf(&self, pte: u64, level: u32) -> bool {
        // Only "table exactly one hardware level down" is walked into;
        // NextLevel 0 is a page, and foreign encodings stop the walk.
        level == 0 || amd_next_level(pte) != level
    }
    #[inline]
    fn table_address(&self, pte: u64) -> u64 {
        pte & AMD_ADDR_MASK
    }
    #[inline]
    fn leaf_address(&self, pte: u64, level: u32) -> u64 {
        pte & AMD_ADDR_MASK & !(level_size(level) - 1)
    }
    #[inline]
    fn leaf_prot(&self, pte: u64) -> Prot {
        prot_of(pte)
    }
    #[inline]
    fn table_entry(&self, table: u64, level: u32) -> u64 {
        table | (level as u64) << AMD_NEXT_LEVEL_SHIFT | AMD_PR | AMD_IR | AMD_IW
    }
    #[inline]
    fn leaf_entry(&self, phys: u64, _level: u32, prot: Prot) -> u64 {
        // NextLevel 0 at any level: the page is the entry's own size.
        let mut pte = phys | AMD_PR;
        if prot.readable() {
            pte |= AMD_IR;
        }
        if prot.writable() {
            pte |= AMD_IW;
        }
        if self.force_coherent || prot.contains(Prot::CACHE) {
            pte |= AMD_FC;
        }
        pte
    }
    /// FC exists in every v1 PTE, so snooping can always be forced.
    fn snoop_control(&self) -> bool {
        true
    }
    fn dirty_bit(&self) -> u64 {
        if self.dirty { AMD_D } else { 0 }
    }
    fn fmt_entry(&self, pte: u64, level: u32, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |bit: u64, name: &'static str| if pte & bit != 0 { name } else { "" };
        let perms = |f: &mut fmt::Formatter<'_>| {
            write!(f, "{}{}{}", flag(AMD_IR, " IR"), flag(AMD_IW, " IW"), flag(AMD_FC, " FC"))
        };
        let nl = amd_next_level(pte);
        match AmdV1::decode(pte, level) {
            AmdV1Entry::NotPresent => write!(f, "not present"),
            AmdV1Entry::Table { table } => {
                write!(f, "table {table:#x} NL{nl}")?;
                perms(f)
            }
            AmdV1Entry::Page { phys, .. } => {
                write!(f, "page {phys:#x} NL0")?;
                perms(f)?;
                write!(f, "{}{}{}", flag(AMD_U, " U"), flag(AMD_A, " A"), flag(AMD_D, " D"))
            }
            AmdV1Entry::SizedPage { phys, size, .. } => {
                write!(f, "sized page {phys:#x}+{size:#x} NL7 (not written by this engine)")?;
                perms(f)
            }
            AmdV1Entry::SkippingTable { table, next_level } => {
                write!(f, "table {table:#x} NL{next_level} skipping levels (not written by this engine)")?;
                perms(f)
            }
            AmdV1Entry::Invalid { next_level } => {
                write!(f, "invalid NextLevel {next_level} at hardware level {}", level + 1)
            }
        }
    }
}
