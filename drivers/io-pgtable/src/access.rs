//! How one engine operation reaches table memory: exclusively (`&mut`,
//! the [`TableMemory`] seam, nothing else running) or concurrently (`&`,
//! the [`SharedTableMemory`] seam, other callers working on disjoint
//! ranges of the same tree). The walk, map and unmap algorithms are
//! written once, generic over [`Access`]; the two implementations differ
//! only in how an entry is read, written and installed.
//!
//! Concurrent rules (what makes disjoint callers safe without a lock):
//! * A caller owns the entries that lie inside its IOVA range, and every
//!   table whose whole span lies inside it: it reads and writes those
//!   with plain atomic loads and stores.
//! * An entry shared with other callers (a table entry whose span reaches
//!   outside the range) changes only with a compare-and-swap: not present
//!   to a new table (the loser frees its table, never seen by anyone, and
//!   descends into the winner's), or a large leaf to the table that splits
//!   it (the loser likewise). Such an entry is never cleared, so a table
//!   another caller may be inside is never unlinked.
//! * Reads of entries are acquire and installs release, so the zeroes (or
//!   leaves) of a table reach a thread that follows the new entry.

use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

use crate::memory::{Cleared, SharedTableMemory, TableMemory};

/// Table memory as one engine operation uses it.
pub(crate) trait Access {
    /// Whether other callers may be working on the same tree.
    const SHARED: bool;
    /// Entry `index` of `table`.
    fn read(&self, table: u64, index: usize) -> u64;
    /// Writes an entry this operation owns.
    fn write(&mut self, table: u64, index: usize, value: u64);
    /// Replaces `old` by `new` in an entry other callers may install too;
    /// `Err(current)` when it no longer holds `old`.
    fn cas(&mut self, table: u64, index: usize, old: u64, new: u64) -> Result<(), u64>;
    /// A zeroed table.
    fn alloc(&mut self) -> Option<u64>;
    /// Frees a table that was never linked (nobody, walker included, saw it).
    fn free(&mut self, table: u64);
    /// Writes back cache lines for a walker that does not snoop.
    fn flush(&mut self, phys: u64, len: u64);
    /// Whether every entry of `table` is zero.
    fn is_empty(&self, table: u64) -> bool;
    /// As [`TableMemory::is_empty_except`].
    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool;
    /// As [`TableMemory::fill`].
    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize;
    /// As [`TableMemory::clear`].
    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared;
    /// Writes `make(k)` into entry `index + k` of `table` for `k` in
    /// `0..count`, stopping at the first entry that is not zero (an entry
    /// of this caller's range); returns how many were written. One view
    /// of the table for the whole run (scattered 4 KiB pages, each its
    /// own leaf value).
    fn fill_with(&mut self, table: u64, index: usize, count: usize, make: impl FnMut(usize) -> u64) -> usize;
    /// As [`Self::clear`], also handing each entry it cleared (in index
    /// order) to `seen`.
    fn clear_each(&mut self, table: u64, index: usize, count: usize, mut seen: impl FnMut(u64)) -> Cleared {
        let mut c = Cleared::default();
        for k in index..index + count {
            let e = self.read(table, k);
            if e != 0 {
                self.write(table, k, 0);
                c.note(k);
                seen(e);
            }
        }
        c
    }
}

/// The exclusive path: `&mut` memory, nothing else running.
pub(crate) struct Exclusive<'a, M>(pub(crate) &'a mut M);

impl<M: TableMemory> Access for Exclusive<'_, M> {
    const SHARED: bool = false;
    #[inline]
    fn read(&self, table: u64, index: usize) -> u64 {
        self.0.read(table, index)
    }
    #[inline]
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.0.write(table, index, value)
    }
    #[inline]
    fn cas(&mut self, table: u64, index: usize, old: u64, new: u64) -> Result<(), u64> {
        let current = self.0.read(table, index);
        if current != old {
            return Err(current);
        }
        self.0.write(table, index, new);
        Ok(())
    }
    #[inline]
    fn alloc(&mut self) -> Option<u64> {
        self.0.alloc_table()
    }
    #[inline]
    fn free(&mut self, table: u64) {
        self.0.free_table(table)
    }
    #[inline]
    fn flush(&mut self, phys: u64, len: u64) {
        self.0.flush(phys, len)
    }
    #[inline]
    fn is_empty(&self, table: u64) -> bool {
        self.0.is_empty(table)
    }
    #[inline]
    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        self.0.is_empty_except(table, index, count)
    }
    #[inline]
    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        self.0.fill(table, index, count, first, step)
    }
    #[inline]
    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        self.0.clear(table, index, count)
    }
    fn fill_with(&mut self, table: u64, index: usize, count: usize, mut make: impl FnMut(usize) -> u64) -> usize {
        for k in 0..count {
            if self.0.read(table, index + k) != 0 {
                return k;
            }
            self.0.write(table, index + k, make(k));
        }
        count
    }
}

/// The concurrent path: shared memory, other callers on disjoint ranges.
/// Inner loops run over the whole-table view
/// ([`SharedTableMemory::entries`]), one lookup per table.
pub(crate) struct Concurrent<'a, M: ?Sized>(pub(crate) &'a M);

impl<M: SharedTableMemory + ?Sized> Access for Concurrent<'_, M> {
    const SHARED: bool = true;
    #[inline]
    fn read(&self, table: u64, index: usize) -> u64 {
        self.0.entries(table)[index].load(Acquire)
    }
    #[inline]
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.0.entries(table)[index].store(value, Release)
    }
    #[inline]
    fn cas(&mut self, table: u64, index: usize, old: u64, new: u64) -> Result<(), u64> {
        self.0.entries(table)[index].compare_exchange(old, new, AcqRel, Acquire).map(|_| ())
    }
    #[inline]
    fn alloc(&mut self) -> Option<u64> {
        self.0.alloc_shared()
    }
    #[inline]
    fn free(&mut self, table: u64) {
        self.0.free_shared(table)
    }
    #[inline]
    fn flush(&mut self, phys: u64, len: u64) {
        self.0.flush_shared(phys, len)
    }
    fn is_empty(&self, table: u64) -> bool {
        self.0.entries(table).iter().all(|e| e.load(Acquire) == 0)
    }
    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        let (before, rest) = self.0.entries(table).split_at(index);
        before.iter().chain(&rest[count..]).all(|e| e.load(Acquire) == 0)
    }
    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        // `make` is called once per entry, in order: the value steps along.
        let mut value = first;
        self.fill_with(table, index, count, |_| {
            let v = value;
            value = value.wrapping_add(step);
            v
        })
    }
    fn fill_with(&mut self, table: u64, index: usize, count: usize, mut make: impl FnMut(usize) -> u64) -> usize {
        let run = &self.0.entries(table)[index..index + count];
        for (k, e) in run.iter().enumerate() {
            // Entries of this caller's range: nobody else writes them.
            if e.load(Relaxed) != 0 {
                return k;
            }
            e.store(make(k), Release);
        }
        count
    }
    fn clear_each(&mut self, table: u64, index: usize, count: usize, mut seen: impl FnMut(u64)) -> Cleared {
        let run = &self.0.entries(table)[index..index + count];
        let mut c = Cleared::default();
        for (k, e) in run.iter().enumerate() {
            let v = e.load(Relaxed);
            if v != 0 {
                e.store(0, Release);
                c.note(index + k);
                seen(v);
            }
        }
        c
    }
    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        self.clear_each(table, index, count, |_| {})
    }
}
