//! [`RangeSet`]: a normalized set of inclusive ranges.

use alloc::collections::BTreeMap;

use super::IntervalError;

/// A set of bytes stored as inclusive spans `[start, last]`, kept normalized:
/// spans never overlap and never touch (`[0, 4]` and `[5, 9]` are kept as
/// `[0, 9]`). Used for an IOAS's allowed IOVA ranges and for the union of
/// its reserved ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> last
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self { map: BTreeMap::new() }
    }

    /// The union of `ranges` (each `(start, last)`, in any order, possibly
    /// overlapping). Refuses an inverted range.
    pub fn from_ranges(ranges: &[(u64, u64)]) -> Result<Self, IntervalError> {
        let mut set = Self::new();
        for &(start, last) in ranges {
            set.insert(start, last)?;
        }
        Ok(set)
    }

    /// The union of `ranges` checked the way `IOMMU_IOAS_ALLOW_IOVAS` checks
    /// its input in Linux (`iommufd_ioas_load_iovas`, both failures
    /// `EINVAL`): a range with `start >= last` (so also a one-byte range) is
    /// [`IntervalError::Invalid`]; a range sharing a byte with an earlier one
    /// is [`IntervalError::Overlap`] (reporting the merged span it hit).
    /// Touching ranges are accepted and merged.
    pub fn from_disjoint_ranges(ranges: &[(u64, u64)]) -> Result<Self, IntervalError> {
        let mut set = Self::new();
        for &(start, last) in ranges {
            if start >= last {
                return Err(IntervalError::Invalid { start, last });
            }
            if let Some((s, l)) = set.iter_overlapping(start, last).next() {
                return Err(IntervalError::Overlap { start: s, last: l });
            }
            set.insert(start, last)?;
        }
        Ok(set)
    }

    /// Adds `[start, last]`, merging it with every span it overlaps or
    /// touches. Refuses an inverted range.
    pub fn insert(&mut self, start: u64, last: u64) -> Result<(), IntervalError> {
        if start > last {
            return Err(IntervalError::Invalid { start, last });
        }
        let (mut s, mut l) = (start, last);
        if let Some((&ps, &pl)) = self.map.range(..=s).next_back()
            && pl.saturating_add(1) >= s
        {
            s = ps;
            l = l.max(pl);
            self.map.remove(&ps);
        }
        // Every later span starting at or before l + 1 merges in.
        while let Some((&ns, &nl)) = self.map.range(s..).next() {
            if ns > l.saturating_add(1) {
                break;
            }
            l = l.max(nl);
            self.map.remove(&ns);
        }
        self.map.insert(s, l);
        Ok(())
    }

    /// Drops every span.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of (normalized) spans.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The spans in ascending order, as `(start, last)`.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64)> + ExactSizeIterator {
        self.map.iter().map(|(&s, &l)| (s, l))
    }

    /// The span containing `iova`.
    pub fn span_containing(&self, iova: u64) -> Option<(u64, u64)> {
        let (&s, &l) = self.map.range(..=iova).next_back()?;
        (l >= iova).then_some((s, l))
    }

    /// Whether `iova` is in the set.
    pub fn contains(&self, iova: u64) -> bool {
        self.span_containing(iova).is_some()
    }

    /// Whether every byte of `[start, last]` is in the set (false when
    /// `start > last`). Since spans are normalized this means one span
    /// holds all of it.
    pub fn contains_range(&self, start: u64, last: u64) -> bool {
        start <= last && self.span_containing(start).is_some_and(|(_, l)| l >= last)
    }

    /// The spans sharing a byte with `[start, last]`, ascending and
    /// unclipped. Empty when `start > last`.
    pub fn iter_overlapping(&self, start: u64, last: u64) -> impl DoubleEndedIterator<Item = (u64, u64)> {
        let from = match self.span_containing(start) {
            Some((s, _)) => s,
            None => start,
        };
        let range = (start <= last).then(|| self.map.range(from..=last));
        range.into_iter().flatten().map(|(&s, &l)| (s, l))
    }

    /// Whether any byte of `[start, last]` is in the set.
    pub fn any_overlap(&self, start: u64, last: u64) -> bool {
        self.iter_overlapping(start, last).next().is_some()
    }

    /// The lowest span start that is `>= iova`.
    pub fn next_start_at_or_after(&self, iova: u64) -> Option<u64> {
        self.map.range(iova..).next().map(|(&s, _)| s)
    }
}
