//! The I/O page-table engine: one generic map/unmap/translate
//! implementation for every page-table format Portcullis drives.
//!
//! # Design
//!
//! Three seams, each a trait, so that the logic runs on the host and under
//! Miri without hardware:
//!
//! * [`PtFormat`]: the geometry and entry encoding of one format (a
//!   [`Geometry`]: levels, aperture, output width, which levels may hold
//!   leaves; and the present/leaf/address/permission bits, snoop). Implemented by [`VtdSecondStage`] (VT-d second stage, 3/4/5
//!   levels per CAP.SAGAW, large pages per CAP.SLLPS, SNP per ECAP.SC) and
//!   [`X86FirstStage`] (x86-64 4/5-level paging as the VT-d first stage)
//!   and [`AmdV1`] (AMD-Vi v1 host tables, 3 to 6 levels, large pages as
//!   NextLevel 0 above the bottom level, FC for forced coherence).
//! * [`TableMemory`]: where tables live (allocate a zeroed 4 KiB table,
//!   free it, read/write one entry, flush cache lines for non-coherent
//!   walkers). [`HeapTables`] is the host implementation with fault
//!   injection and flush logging; the kernel implements it over frames in
//!   its direct map, which is the only place `unsafe` is needed. With the
//!   `testing` feature, `NonCoherentTables` models a walker that sees only
//!   flushed cache lines, for the tests of crates that drive the engine.
//!   [`ContiguousMemory`] extends it with physically contiguous runs of
//!   pages for the units' larger structures (device and interrupt tables).
//!   [`SharedTableMemory`] is the concurrent seam: a whole table as atomic
//!   words and allocation through `&self` ([`SharedHeapTables`] on the
//!   host, the kernel's direct map), for [`PageTable::map_shared`] and
//!   [`PageTable::unmap_shared`], which map and unmap disjoint ranges from
//!   several threads at once.
//! * [`Invalidator`]: the IOTLB side of a domain, used by [`PagingDomain`],
//!   which puts a [`PageTable`] behind `portcullis_iommu::IommuDomain`.
//!
//! [`PageTable`] is the engine. `map` walks down from the root once per
//! run of same-size pages and then writes consecutive leaves in the same
//! table; the tables on the path are cached between runs, so a large map
//! costs one table read per entry written plus one per table crossed. It
//! picks for each piece the largest page that the alignment of IOVA and
//! physical address, the remaining length and the allowed sizes permit,
//! and is all-or-nothing: on an overlap or an allocation failure it unwinds
//! what it wrote. `unmap` removes everything in a range, splitting a large
//! page the range only partly covers, unlinks tables that become empty and
//! defers their freeing until the caller's IOTLB sync.
//!
//! Dirty tracking: a format made with `with_dirty_tracking` names the bit
//! the walker sets in a leaf on a write ([`PtFormat::dirty_bit`]: D, bit 9
//! of a VT-d second-stage leaf under SSADE; D, bit 6 of an AMD v1 PTE under
//! HAD = 11b; D, bit 6 of an x86 first-stage leaf, left clear at map).
//! [`PageTable::read_and_clear_dirty`] walks a range and reports dirty
//! leaves in ascending order, clearing each with one atomic
//! read-modify-write ([`TableMemory::clear_bits`]) and collecting them in
//! the caller's gather; a split copies a large page's dirty bit into every
//! smaller page. [`PagingDomain`] offers it as `IommuDomain`'s dirty
//! methods.
//!
//! For walkers that do not snoop CPU caches (VT-d ECAP.C = 0) each map and
//! unmap collects the cache lines it changed, per table, and flushes each
//! line once when it leaves that table (see `flush.rs`); coherent walkers
//! cost nothing extra.
//!
//! # Invariants
//!
//! * Levels are numbered from the leaves: level 0 entries map 4 KiB, level
//!   1 entries 2 MiB, level 2 entries 1 GiB; the root holds entries of
//!   level `levels - 1`. Every table is 4 KiB with 512 entries.
//! * The tree never holds an empty non-root table between calls, so a
//!   present table entry means something is mapped below it.
//! * Tables leave memory only through the deferred list, after the caller
//!   says the walker's caches were invalidated
//!   ([`PageTable::release_deferred`], called by `iotlb_sync`).
//! * Entries are written whole; a walker racing with an update sees the
//!   translation from before or after it.
//! * No `unsafe` in this crate.
//!
//! See the crate's README.md for usage and the numbers.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod access;
mod amd_v1;
#[cfg(test)]
mod dirty_tests;
mod domain;
mod first_stage;
mod flush;
mod format;
mod geometry;
mod memory;
#[cfg(test)]
mod noncoherent_tests;
mod second_stage;
mod shared_heap;
mod table;

use core::fmt;

pub use amd_v1::{
    AMD_A, AMD_ADDR_MASK, AMD_D, AMD_FC, AMD_IR, AMD_IW, AMD_NEXT_LEVEL_MASK, AMD_NEXT_LEVEL_SHIFT, AMD_PR, AMD_U,
    AmdV1, AmdV1Entry, amd_next_level,
};
pub use domain::{Invalidator, NoInvalidator, PagingDomain, RecordingInvalidator};
pub use first_stage::{FS_A, FS_ADDR_MASK, FS_D, FS_P, FS_PS, FS_RW, FS_US, FS_XD, X86FirstStage};
pub use format::{Entry, PtFormat};
pub use geometry::{Geometry, level_shift, level_size, sizes_of_leaf_levels};
pub use memory::{Cleared, ContiguousMemory, HEAP_TABLES_BASE, HeapTables, SharedTableMemory, TableMemory};
#[cfg(any(test, feature = "testing"))]
pub use memory::{NonCoherentTables, WALKER_POISON, WalkerFault};
pub use portcullis_iommu::Prot;
pub use second_stage::{SS_A, SS_ADDR_MASK, SS_D, SS_PS, SS_READ, SS_SNP, SS_WRITE, VtdSecondStage};
pub use shared_heap::SharedHeapTables;
pub use table::{PageTable, PartialUnmap, WalkStep};

/// log2 of the smallest page and of a table.
pub const PAGE_SHIFT: u32 = 12;
/// The smallest page (the granule).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Bytes in one table.
pub const TABLE_SIZE: u64 = 4096;
/// IOVA bits translated per level.
pub const BITS_PER_LEVEL: u32 = 9;
/// Entries in one table.
pub const ENTRIES: usize = 1 << BITS_PER_LEVEL;
/// Most levels any format may have (AMD-Vi v1 goes to six).
pub const MAX_LEVELS: usize = 6;
/// Cache line size assumed for flushes (x86 `clflush` granularity).
pub const CACHE_LINE: u64 = 64;
/// Entries per cache line.
pub const ENTRIES_PER_LINE: usize = (CACHE_LINE / 8) as usize;

/// Why a page-table operation failed. Each variant says where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The IOVA range is empty, not 4 KiB aligned, overflows, or leaves the
    /// aperture.
    BadRange {
        /// Start of the range.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// The physical range is not 4 KiB aligned or does not fit the
    /// format's output width.
    BadPhys {
        /// Start of the physical range.
        phys: u64,
        /// Its length.
        length: u64,
    },
    /// The format cannot express these permissions (neither read nor write).
    BadProt {
        /// The permissions asked for.
        prot: Prot,
    },
    /// Something is already mapped at `iova` (the first such IOVA found).
    AlreadyMapped {
        /// A mapped IOVA inside the requested range.
        iova: u64,
    },
    /// No memory for a table needed to map `iova` (a table of `level`
    /// entries), or to split the large page at `iova` on unmap.
    NoMemory {
        /// The IOVA being mapped or the large page being split.
        iova: u64,
        /// Level of the table that could not be allocated.
        level: u32,
    },
    /// A concurrent map or unmap on a table memory without the concurrent
    /// seam ([`TableMemory::shared`] is `None`).
    NotShared,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRange { iova, length } => write!(f, "bad IOVA range {iova:#x}+{length:#x}"),
            Self::BadPhys { phys, length } => write!(f, "bad physical range {phys:#x}+{length:#x}"),
            Self::BadProt { prot } => write!(f, "permissions {:#x} cannot be mapped", prot.bits()),
            Self::AlreadyMapped { iova } => write!(f, "IOVA {iova:#x} is already mapped"),
            Self::NoMemory { iova, level } => {
                write!(f, "no memory for a level-{level} table at IOVA {iova:#x}")
            }
            Self::NotShared => write!(f, "this table memory cannot be used concurrently"),
        }
    }
}
