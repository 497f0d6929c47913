//! [`IntervalMap`]: non-overlapping inclusive intervals, each with a value.

use alloc::collections::BTreeMap;

/// Why an interval was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalError {
    /// The interval is inverted (`start > last`).
    Invalid {
        /// The refused start.
        start: u64,
        /// The refused last.
        last: u64,
    },
    /// The interval intersects the already present `[start, last]` (the
    /// lowest such one).
    Overlap {
        /// Start of the existing interval.
        start: u64,
        /// Last byte of the existing interval.
        last: u64,
    },
}

/// Non-overlapping inclusive intervals `[start, last]`, each carrying a `V`.
///
/// Keyed by `start` in a `BTreeMap`; because no two intervals intersect,
/// the only interval that can contain a point `x` is the one with the
/// greatest start `<= x`, so every point or range query costs `O(log n)`
/// (plus the size of its output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntervalMap<V> {
    map: BTreeMap<u64, (u64, V)>,
}

impl<V> Default for IntervalMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IntervalMap<V> {
    /// An empty map.
    pub const fn new() -> Self {
        Self { map: BTreeMap::new() }
    }

    /// Number of intervals.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no intervals.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drops every interval.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Adds `[start, last] -> value`. Refuses an inverted interval and one
    /// that shares any byte with an existing interval (touching is fine).
    pub fn insert(&mut self, start: u64, last: u64, value: V) -> Result<(), IntervalError> {
        if start > last {
            return Err(IntervalError::Invalid { start, last });
        }
        if let Some((s, l, _)) = self.first_overlapping(start, last) {
            return Err(IntervalError::Overlap { start: s, last: l });
        }
        self.map.insert(start, (last, value));
        Ok(())
    }

    /// Removes the interval that starts exactly at `start`.
    pub fn remove(&mut self, start: u64) -> Option<(u64, u64, V)> {
        self.map.remove(&start).map(|(last, v)| (start, last, v))
    }

    /// The interval that starts exactly at `start`: `(last, &value)`.
    pub fn get(&self, start: u64) -> Option<(u64, &V)> {
        self.map.get(&start).map(|(last, v)| (*last, v))
    }

    /// The interval that starts exactly at `start`: `(last, &mut value)`.
    pub fn get_mut(&mut self, start: u64) -> Option<(u64, &mut V)> {
        self.map.get_mut(&start).map(|(last, v)| (*last, v))
    }

    /// The interval containing `iova`, as `(start, last, &value)`.
    pub fn get_containing(&self, iova: u64) -> Option<(u64, u64, &V)> {
        let (&s, (l, v)) = self.map.range(..=iova).next_back()?;
        (*l >= iova).then_some((s, *l, v))
    }

    /// The interval containing `iova`, as `(start, last, &mut value)`.
    pub fn get_containing_mut(&mut self, iova: u64) -> Option<(u64, u64, &mut V)> {
        let (&s, (l, v)) = self.map.range_mut(..=iova).next_back()?;
        (*l >= iova).then_some((s, *l, v))
    }

    /// The smallest key from which a forward walk meets every interval
    /// intersecting `[start, ..]`: the start of the interval holding `start`,
    /// or `start` itself.
    fn walk_from(&self, start: u64) -> u64 {
        match self.map.range(..=start).next_back() {
            Some((&s, (l, _))) if *l >= start => s,
            _ => start,
        }
    }

    /// Every interval sharing at least one byte with `[start, last]`, in
    /// ascending order. Empty when `start > last`.
    pub fn iter_overlapping(&self, start: u64, last: u64) -> impl DoubleEndedIterator<Item = (u64, u64, &V)> {
        let range = (start <= last).then(|| self.map.range(self.walk_from(start)..=last));
        range.into_iter().flatten().map(|(&s, (l, v))| (s, *l, v))
    }

    /// The lowest interval sharing a byte with `[start, last]`.
    pub fn first_overlapping(&self, start: u64, last: u64) -> Option<(u64, u64, &V)> {
        self.iter_overlapping(start, last).next()
    }

    /// The highest interval sharing a byte with `[start, last]`.
    pub fn last_overlapping(&self, start: u64, last: u64) -> Option<(u64, u64, &V)> {
        if start > last {
            return None;
        }
        let (&s, (l, v)) = self.map.range(..=last).next_back()?;
        (*l >= start).then_some((s, *l, v))
    }

    /// Whether any interval shares a byte with `[start, last]`.
    pub fn any_overlap(&self, start: u64, last: u64) -> bool {
        self.first_overlapping(start, last).is_some()
    }

    /// Every interval in ascending order, as `(start, last, &value)`.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, u64, &V)> + ExactSizeIterator {
        self.map.iter().map(|(&s, (l, v))| (s, *l, v))
    }

    /// Every interval in ascending order, as `(start, last, &mut value)`.
    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (u64, u64, &mut V)> {
        self.map.iter_mut().map(|(&s, (l, v))| (s, *l, v))
    }

    /// The lowest interval start that is `>= iova`.
    pub fn next_start_at_or_after(&self, iova: u64) -> Option<u64> {
        self.map.range(iova..).next().map(|(&s, _)| s)
    }

    /// Whether the intervals cover every byte of `[start, last]` with no
    /// hole (they may extend beyond it at either end). False when
    /// `start > last`.
    pub fn span_is_fully_covered(&self, start: u64, last: u64) -> bool {
        let mut need = start;
        for (s, l, _) in self.iter_overlapping(start, last) {
            if s > need {
                return false;
            }
            if l >= last {
                return true;
            }
            // l < last <= u64::MAX, so this cannot overflow.
            need = l + 1;
        }
        false
    }

    /// Whether every interval that shares a byte with `[start, last]` lies
    /// entirely inside it (vacuously true when none does). This is the
    /// "no partial unmap" condition of an unmap request.
    pub fn overlapping_are_within(&self, start: u64, last: u64) -> bool {
        match (self.first_overlapping(start, last), self.last_overlapping(start, last)) {
            (Some((fs, _, _)), Some((_, ll, _))) => fs >= start && ll <= last,
            _ => true,
        }
    }

    /// Splits the interval `[s, l]` that contains `at`, where `s < at`, into
    /// `[s, at - 1]` and `[at, l]`. `split_value` gets the left value (which
    /// it may adjust) and the byte offset `at - s` of the cut, and returns
    /// the right value.
    ///
    /// Returns false, changing nothing and not calling `split_value`, when
    /// no interval contains `at` or when `at` already starts one.
    pub fn split<F>(&mut self, at: u64, split_value: F) -> bool
    where
        F: FnOnce(&mut V, u64) -> V,
    {
        let Some((&s, (l, v))) = self.map.range_mut(..at).next_back() else {
            return false;
        };
        if *l < at {
            return false;
        }
        let last = *l;
        *l = at - 1;
        let right = split_value(v, at - s);
        self.map.insert(at, (last, right));
        true
    }
}
