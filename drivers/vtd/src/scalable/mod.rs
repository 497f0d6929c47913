//! Scalable-mode translation structures (VT-d spec rev 4.x, chapter 9) and
//! [`ScalableTables`], which owns them for one unit:
//!
//! * [`entries`]: the entry encodings, pure bit layouts (root, context,
//!   PASID-directory and PASID-table entries, the PGTT and snoop fields);
//! * [`tables`]: [`ScalableTables`] (allocating the pages, installing and
//!   blocking entries in a safe order, walking them back) and the
//!   [`Invalidations`] each change calls for; the entries of PASIDs other
//!   than 0 (`set_pasid_*`, `clear_pasid`, a PASID table per group of 64
//!   made on demand) sit in its `pasids` submodule.
//!
//! Everything is re-exported here, so `vtd::scalable::PasidEntry` and
//! `vtd::scalable::ScalableTables` both work.
//!
//! With RTADDR.TTM = 01b a request without PASID from `bus:dev.fn` is
//! translated through four levels of tables, all 4 KiB pages:
//!
//! | structure | spec | entry | per page | indexed by |
//! | --- | --- | --- | --- | --- |
//! | root table | 9.2 | 128 bits: lower + upper context-table pointer | 256 | bus |
//! | context table (lower / upper) | 9.4 | 256 bits | 128 | `devfn & 0x7f` (lower for devfn 0-127, upper for 128-255) |
//! | PASID directory | 9.5 | 64 bits | 512 | `pasid >> 6` |
//! | PASID table | 9.6 | 512 bits | 64 | `pasid & 0x3f` |
//!
//! Requests without PASID use PASID 0 (the RID_PASID field of the context
//! entry is left 0, which is also what rev 4.x hardware without ECAP.RPS
//! assumes). The PASID-table entry decides the translation: first stage
//! only, second stage only, nested or pass-through (PGTT), and tags it with
//! a domain id.
//!
//! # What [`ScalableTables`] guarantees
//!
//! * Entries are built bottom-up: a PASID-table entry is complete before
//!   the directory entry points at its table, the directory before the
//!   context entry points at it, the context table before the root entry
//!   points at it. Within a multi-word entry every other word is written
//!   first and the word holding the present bit last; when an entry is
//!   cleared the present bit goes first.
//! * When the [`TableMemory`](io_pgtable::TableMemory) is not coherent, every cache line changed is
//!   flushed once, before anything that points at it becomes present.
//! * No invalidation is issued here: every change returns the
//!   [`Invalidations`] the unit must submit (and wait for) before relying
//!   on it.
//!
//! # Changing a present entry (spec 6.5.3.3, guidance to software)
//!
//! A 512-bit PASID-table entry cannot be replaced atomically, so a live
//! entry is never overwritten: the `set_*` methods refuse with
//! [`TablesError::Busy`]. To move a device to another translation:
//!
//! 1. [`ScalableTables::block`]: clears the present bit (then the rest) and
//!    flushes the line;
//! 2. submit what it returns, then an invalidation wait: PASID-selective
//!    PASID-cache invalidation for (old domain id, PASID 0), then the IOTLB
//!    for the old translation (domain-selective IOTLB invalidation for
//!    second-stage or nested entries, PASID-selective PASID-based IOTLB
//!    invalidation for first-stage or pass-through entries; a Device-TLB
//!    invalidation would follow if ATS were enabled, which it is not here);
//! 3. `set_*` the new entry; its [`Invalidations::caching_mode`] list is
//!    needed only when CAP.CM = 1 (not-present to present needs nothing
//!    otherwise).
//!
//! The context entry of a device stays present and keeps pointing at its
//! PASID directory once made: a blocked device faults on the non-present
//! PASID entry (fault reason "PASID entry not present").

pub mod entries;
pub mod tables;

pub use entries::{
    FirstStageTable, PDTS_ONE_PAGE, PasidDirEntry, PasidEntry, Pgtt, RID_PASID, RTADDR_TTM_SCALABLE,
    ScalableContextEntry, ScalableRootEntry, Snoop,
};
pub use tables::{DIRECTORY_PASID_BITS, DeviceEntries, Invalidation, Invalidations, ScalableTables, TablesError};
