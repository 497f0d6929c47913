//! IOVA bookkeeping of an I/O page table: the mapped areas, the allowed
//! and reserved ranges, and IOVA allocation with Linux's policy.
//!
//! Every interval is `[start, last]` with `last` inclusive, so a range may
//! end at `u64::MAX`; callers turning `(iova, length)` into an interval must
//! compute `last = iova + (length - 1)` with overflow checks.
//!
//! * [`IntervalMap`]: non-overlapping intervals with values (the areas).
//! * [`RangeSet`]: a normalized set of ranges (the allowed IOVAs).
//! * [`ReservedRanges`]: possibly overlapping ranges tagged with an owner.
//! * [`IovaSpace`] / [`alloc_iova`] / [`iova_alignment`]: allocation, see
//!   the [`policy`] module for the policy.

mod interval_map;
pub mod policy;
mod range_set;
mod reserved;

#[cfg(test)]
mod tests;

pub use interval_map::{IntervalError, IntervalMap};
pub use policy::{Holes, IovaSpace, LINUX_PAGE_SIZE, alloc_iova, huge_page_size, iova_alignment};
pub use range_set::RangeSet;
pub use reserved::ReservedRanges;

/// `last = start + length - 1`, or `None` for a zero length or on overflow.
pub fn last_of(start: u64, length: u64) -> Option<u64> {
    start.checked_add(length.checked_sub(1)?)
}
