//! Batching of cache-line flushes for walkers that do not snoop.
//!
//! An operation marks each entry it changes; the batch remembers, per
//! level, one table and a 64-bit mask of its dirty cache lines (a 4 KiB
//! table is exactly 64 lines of 64 bytes). When the operation moves to
//! another table at a level, the previous one's lines are flushed, runs of
//! adjacent lines in one call. Map and unmap walk IOVAs in ascending order,
//! so a table they leave is not visited again in the same operation and
//! each changed line is flushed once. The exceptions are the unwind after a
//! failed map, which revisits tables (it flushes again; correctness does
//! not depend on counting), and a split table, which must be flushed before
//! it is linked and may have lines changed again afterwards.
//!
//! Ordering: the engine never needs a flush *between* two writes of one
//! operation, because every table it links is already zero in memory
//! (allocation contract) or flushed before linking (split), so the walker
//! sees either the old or the new tree wherever eviction happens to write
//! lines back early.

use crate::access::Access;
use crate::{CACHE_LINE, ENTRIES_PER_LINE, MAX_LEVELS};

#[derive(Debug)]
pub(crate) struct FlushBatch {
    active: bool,
    slots: [(u64, u64); MAX_LEVELS],
}

impl FlushBatch {
    #[inline]
    pub(crate) fn new(active: bool) -> Self {
        Self { active, slots: [(0, 0); MAX_LEVELS] }
    }

    /// Whether lines are flushed at all (the walker does not snoop).
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.active
    }

    #[inline]
    pub(crate) fn mark<A: Access>(&mut self, mem: &mut A, level: u32, table: u64, index: usize) {
        if !self.active {
            return;
        }
        let slot = &mut self.slots[level as usize];
        if slot.0 != table {
            if slot.1 != 0 {
                flush_lines(mem, slot.0, slot.1);
            }
            *slot = (table, 0);
        }
        slot.1 |= 1 << (index / ENTRIES_PER_LINE);
    }

    /// Marks the lines in `lines` (bit n = line n) of `table`.
    #[inline]
    pub(crate) fn mark_lines<A: Access>(&mut self, mem: &mut A, level: u32, table: u64, lines: u64) {
        if !self.active || lines == 0 {
            return;
        }
        let slot = &mut self.slots[level as usize];
        if slot.0 != table {
            if slot.1 != 0 {
                flush_lines(mem, slot.0, slot.1);
            }
            *slot = (table, 0);
        }
        slot.1 |= lines;
    }

    pub(crate) fn finish<A: Access>(&mut self, mem: &mut A) {
        if !self.active {
            return;
        }
        for slot in &mut self.slots {
            if slot.1 != 0 {
                flush_lines(mem, slot.0, slot.1);
                slot.1 = 0;
            }
        }
    }
}

/// Flushes the lines in `lines` (bit n = line n) of `table`, runs of
/// adjacent lines in one call.
pub(crate) fn flush_lines<A: Access>(mem: &mut A, table: u64, mut lines: u64) {
    while lines != 0 {
        let start = lines.trailing_zeros();
        let run = (lines >> start).trailing_ones();
        mem.flush(table + u64::from(start) * CACHE_LINE, u64::from(run) * CACHE_LINE);
        lines &= if start + run >= 64 { 0 } else { !0u64 << (start + run) };
    }
}

/// The mask of lines holding entries `index..index + count` (count > 0).
#[inline]
pub(crate) fn lines_of(index: usize, count: usize) -> u64 {
    let first = index / ENTRIES_PER_LINE;
    let last = (index + count - 1) / ENTRIES_PER_LINE;
    let upto = if last == 63 { !0 } else { (1u64 << (last + 1)) - 1 };
    upto & !((1u64 << first) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Exclusive;
    use crate::memory::{HeapTables, TableMemory};

    #[test]
    fn runs_of_lines_coalesce() {
        let mut mem = HeapTables::new(false);
        let t = mem.alloc_table().unwrap();
        mem.record_flushes(true);
        flush_lines(&mut Exclusive(&mut mem), t, 0b1110_0101 | 1 << 63);
        assert_eq!(mem.flush_stats().0, 4);
        let log = mem.take_flush_log();
        let lines: alloc::vec::Vec<u64> = log.keys().map(|l| (l - t) / CACHE_LINE).collect();
        assert_eq!(lines, [0, 2, 5, 6, 7, 63]);
        assert!(log.values().all(|&n| n == 1));
        flush_lines(&mut Exclusive(&mut mem), t, !0);
        assert_eq!(lines_of(0, 512), !0);
        assert_eq!(lines_of(7, 2), 0b11);
        assert_eq!(lines_of(8, 8), 0b10);
        assert_eq!(lines_of(511, 1), 1 << 63);
        assert_eq!(mem.flush_stats(), (5, 6 * 64 + 4096));
    }
}
