//! [`ReservedRanges`]: IOVA ranges no area may use, each tagged with an owner.

use alloc::vec::Vec;

use super::{IntervalError, RangeSet};

/// Reserved IOVA ranges, each tagged with the owner that reserved it (a
/// device's reserved regions, a domain's out-of-aperture space, the
/// selftest hook, ...). Ranges of different owners, or even of one owner,
/// may overlap; removing an owner drops all of its ranges.
///
/// The ranges are kept sorted by `(start, last)` next to a cached
/// [`RangeSet`] of their union, which answers the hot queries (overlap and
/// free-gap walks) in `O(log n)`. Adding or removing costs `O(n)`; an IOAS
/// has few reserved ranges and changes them only on attach/detach.
#[derive(Debug, Clone)]
pub struct ReservedRanges<O> {
    entries: Vec<(u64, u64, O)>,
    union: RangeSet,
}

impl<O> Default for ReservedRanges<O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<O> ReservedRanges<O> {
    /// No reserved ranges.
    pub const fn new() -> Self {
        Self { entries: Vec::new(), union: RangeSet::new() }
    }

    /// Number of reserved ranges (not merged).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is reserved.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The union of all reserved ranges.
    pub fn union(&self) -> &RangeSet {
        &self.union
    }

    /// Whether any reserved range shares a byte with `[start, last]`.
    pub fn any_overlap(&self, start: u64, last: u64) -> bool {
        self.union.any_overlap(start, last)
    }

    /// Whether `iova` is reserved.
    pub fn contains(&self, iova: u64) -> bool {
        self.union.contains(iova)
    }
}

impl<O: Copy + Eq> ReservedRanges<O> {
    /// Reserves `[start, last]` for `owner`. Refuses an inverted range and
    /// nothing else: checking it against areas and allowed ranges (Linux's
    /// `iopt_reserve_iova` answers `EADDRINUSE` then) is the caller's job.
    pub fn add(&mut self, start: u64, last: u64, owner: O) -> Result<(), IntervalError> {
        if start > last {
            return Err(IntervalError::Invalid { start, last });
        }
        let at = self.entries.partition_point(|&(s, l, _)| (s, l) <= (start, last));
        self.entries.insert(at, (start, last, owner));
        self.union.insert(start, last)?;
        Ok(())
    }

    /// Drops every range of `owner`; returns how many there were.
    pub fn remove_owner(&mut self, owner: O) -> usize {
        let before = self.entries.len();
        self.entries.retain(|&(_, _, o)| o != owner);
        let removed = before - self.entries.len();
        if removed != 0 {
            self.union.clear();
            for &(s, l, _) in &self.entries {
                // Entries were validated on add.
                let _ = self.union.insert(s, l);
            }
        }
        removed
    }

    /// Every reserved range as `(start, last, owner)`, sorted by
    /// `(start, last)` (equal ranges in insertion order).
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64, O)> + ExactSizeIterator {
        self.entries.iter().copied()
    }

    /// The ranges of `owner`, sorted.
    pub fn iter_owner(&self, owner: O) -> impl DoubleEndedIterator<Item = (u64, u64)> {
        self.entries.iter().filter(move |&&(_, _, o)| o == owner).map(|&(s, l, _)| (s, l))
    }

    /// The reserved range with the lowest `(start, last)` that shares a byte
    /// with `[start, last]`.
    pub fn first_overlapping(&self, start: u64, last: u64) -> Option<(u64, u64, O)> {
        if !self.any_overlap(start, last) {
            return None;
        }
        self.entries.iter().take_while(|&&(s, _, _)| s <= last).find(|&&(_, l, _)| l >= start).copied()
    }
}
