//! Memory for the unit's own structures.
//!
//! The command buffer, the event log and the completion-wait store each
//! fit one 4 KiB page and come from [`TableMemory::alloc_table`]. The
//! device table is up to 2 MiB (32 bytes for each of up to 65536 device
//! ids) and must be physically contiguous (spec §3.4, MMIO 0000h: one base
//! and a size): [`ContiguousMemory`] adds that one capability.
//!
//! Contract, in addition to `TableMemory`'s:
//! * `alloc_contiguous(pages)` returns the 4 KiB-aligned physical address
//!   of `pages` contiguous, zeroed 4 KiB pages, or `None` (nothing
//!   allocated) when it cannot;
//! * every page `base + k * 4096` of such an allocation can be read,
//!   written and flushed through `TableMemory::read`/`write`/`flush` as if
//!   it were a table;
//! * `free_contiguous(base, pages)` takes back exactly one earlier
//!   allocation, with the same page count.

use io_pgtable::TableMemory;

/// [`TableMemory`] that can also hand out physically contiguous runs of
/// pages. The kernel implements it over its frame allocator; host tests
/// over heap pages.
pub trait ContiguousMemory: TableMemory {
    /// Allocates `pages` (>= 1) zeroed, physically contiguous 4 KiB pages.
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64>;

    /// Returns a run from [`Self::alloc_contiguous`].
    fn free_contiguous(&mut self, base: u64, pages: usize);
}
