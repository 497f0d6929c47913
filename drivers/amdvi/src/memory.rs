//! Memory for the unit's own structures.
//!
//! The command buffer, the event log and the completion-wait store each
//! fit one 4 KiB page and come from [`io_pgtable::TableMemory::alloc_table`]. The
//! device table is up to 2 MiB (32 bytes for each of up to 65536 device
//! ids) and must be physically contiguous (spec §3.4, MMIO 0000h: one base
//! and a size), as must an interrupt remapping table larger than a page:
//! both come from [`ContiguousMemory`], the seam's extension that
//! `io_pgtable` defines for every driver (VT-d's interrupt remapping table
//! uses it too); it is re-exported here.

pub use io_pgtable::ContiguousMemory;
