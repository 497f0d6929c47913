//! Where the tables live: the [`TableMemory`] seam, and [`HeapTables`], the
//! host implementation on heap pages used by tests, Miri and benchmarks.
//!
//! Invariants of a `TableMemory` (the engine relies on them):
//! * `alloc_table` returns a 4 KiB-aligned physical address of a 4 KiB
//!   table whose 512 entries are zero *as the walker sees them*: on a
//!   non-coherent unit the implementation flushes the zeroes itself.
//! * `read`/`write` access one naturally aligned 64-bit entry in one
//!   access (the walker may read it at any moment and must never see a
//!   torn value); `index < 512`.
//! * `free_table` is only called for tables no longer linked into a tree
//!   *and* whose IOTLB/paging-structure cache entries were invalidated: the
//!   engine defers frees until the caller's sync.
//! * When [`TableMemory::coherent`] is false, `flush(phys, len)` writes
//!   back the cache lines of `[phys, phys + len)` so the walker sees them.
//!   The engine calls it with 64-byte-aligned ranges, once per changed line
//!   per operation.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::{CACHE_LINE, ENTRIES, ENTRIES_PER_LINE, TABLE_SIZE};

/// Memory that holds page tables, addressed by physical address.
pub trait TableMemory {
    /// Allocates a zeroed 4 KiB table and returns its physical address, or
    /// `None` when out of memory.
    fn alloc_table(&mut self) -> Option<u64>;

    /// Returns a table to the allocator.
    fn free_table(&mut self, table: u64);

    /// Reads entry `index` of the table at `table`.
    fn read(&self, table: u64, index: usize) -> u64;

    /// Writes entry `index` of the table at `table`.
    fn write(&mut self, table: u64, index: usize, value: u64);

    /// Whether the walker snoops CPU caches (VT-d ECAP.C = 1). When false,
    /// the engine calls [`TableMemory::flush`] for what it changed.
    fn coherent(&self) -> bool;

    /// Writes back the cache lines covering `[phys, phys + len)`.
    fn flush(&mut self, phys: u64, len: u64);

    /// Whether every entry of `table` is zero. Implementations with direct
    /// access to the page should override this and the two methods below
    /// with plain loops over the page: they are the engine's inner loops.
    fn is_empty(&self, table: u64) -> bool {
        (0..ENTRIES).all(|i| self.read(table, i) == 0)
    }

    /// Writes `first`, `first + step`, `first + 2 * step`, ... to entries
    /// `index..index + count` (within one table) while they are zero;
    /// stops at the first nonzero entry. Returns how many were written.
    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        let mut value = first;
        for k in 0..count {
            if self.read(table, index + k) != 0 {
                return k;
            }
            self.write(table, index + k, value);
            value = value.wrapping_add(step);
        }
        count
    }

    /// Zeroes entries `index..index + count` (within one table) and says
    /// which were nonzero.
    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        let mut c = Cleared::default();
        for i in index..index + count {
            if self.read(table, i) != 0 {
                self.write(table, i, 0);
                c.note(i);
            }
        }
        c
    }
}

/// What [`TableMemory::clear`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Entries that were nonzero.
    pub count: usize,
    /// Index of the first of them (meaningless when `count` is 0).
    pub first: usize,
    /// Index of the last of them.
    pub last: usize,
    /// Cache lines that changed (bit n = bytes `64 * n .. 64 * n + 63`).
    pub lines: u64,
}

impl Cleared {
    /// Records that entry `index` (ascending order) was cleared.
    #[inline]
    pub fn note(&mut self, index: usize) {
        if self.count == 0 {
            self.first = index;
        }
        self.count += 1;
        self.last = index;
        self.lines |= 1 << (index / ENTRIES_PER_LINE);
    }
}

/// Fake physical address of the first [`HeapTables`] page: nonzero, 4 KiB
/// aligned and well inside 52 bits, so a stray use of a table address as
/// something else shows up.
pub const HEAP_TABLES_BASE: u64 = 0x10_0000_0000;

/// Page tables on the heap, for host tests and benchmarks.
///
/// Pages live in a slab indexed by `(phys - HEAP_TABLES_BASE) / 4096`, so
/// an entry access is an index, not a search. Freed pages are kept for
/// reuse and marked dead: any access to a dead or unknown page panics, which
/// turns a use-after-free in the engine into a test failure.
///
/// Counts allocations, frees and flushes, can fail the Nth allocation
/// ([`HeapTables::fail_nth_alloc`]) and can log every flushed cache line
/// ([`HeapTables::record_flushes`]).
#[derive(Debug)]
pub struct HeapTables {
    pages: Vec<Box<[u64; ENTRIES]>>,
    live: Vec<bool>,
    spare: Vec<usize>,
    live_count: usize,
    peak: usize,
    allocs: u64,
    frees: u64,
    attempts: u64,
    fail_at: Option<u64>,
    coherent: bool,
    flush_calls: u64,
    flushed_bytes: u64,
    flush_log: Option<BTreeMap<u64, u32>>,
}

impl Default for HeapTables {
    fn default() -> Self {
        Self::new(true)
    }
}

impl HeapTables {
    /// Empty memory; `coherent` says whether the pretend walker snoops
    /// caches (if not, the engine flushes).
    pub fn new(coherent: bool) -> Self {
        Self {
            pages: Vec::new(),
            live: Vec::new(),
            spare: Vec::new(),
            live_count: 0,
            peak: 0,
            allocs: 0,
            frees: 0,
            attempts: 0,
            fail_at: None,
            coherent,
            flush_calls: 0,
            flushed_bytes: 0,
            flush_log: None,
        }
    }

    /// Tables allocated and not freed.
    pub fn live_tables(&self) -> usize {
        self.live_count
    }
    /// Most tables live at once.
    pub fn peak_tables(&self) -> usize {
        self.peak
    }
    /// Successful allocations so far.
    pub fn allocs(&self) -> u64 {
        self.allocs
    }
    /// Frees so far.
    pub fn frees(&self) -> u64 {
        self.frees
    }
    /// Allocation attempts so far, failed ones included.
    pub fn alloc_attempts(&self) -> u64 {
        self.attempts
    }

    /// Makes the `n`th allocation attempt from now fail (1-based); `None`
    /// stops injecting. One failure per call.
    pub fn fail_nth_alloc(&mut self, n: Option<u64>) {
        self.fail_at = n.map(|n| self.attempts + n);
    }

    /// `flush` calls and bytes so far.
    pub fn flush_stats(&self) -> (u64, u64) {
        (self.flush_calls, self.flushed_bytes)
    }

    /// Starts (or with `false` stops) logging each flushed cache line.
    pub fn record_flushes(&mut self, on: bool) {
        self.flush_log = on.then(BTreeMap::new);
    }

    /// The cache lines flushed since the last call (line address → times),
    /// clearing the log.
    pub fn take_flush_log(&mut self) -> BTreeMap<u64, u32> {
        self.flush_log.as_mut().map(core::mem::take).unwrap_or_default()
    }

    /// Whether `phys` is a live table.
    pub fn is_live(&self, phys: u64) -> bool {
        self.slot_of(phys).is_some_and(|s| self.live[s])
    }

    /// A copy of a live table (for tests that compare before and after).
    pub fn snapshot(&self, table: u64) -> [u64; ENTRIES] {
        *self.page(table)
    }

    /// Every live table's address, ascending.
    pub fn live_addresses(&self) -> Vec<u64> {
        (0..self.pages.len()).filter(|&s| self.live[s]).map(Self::phys_of).collect()
    }

    fn phys_of(slot: usize) -> u64 {
        HEAP_TABLES_BASE + slot as u64 * TABLE_SIZE
    }

    #[inline]
    fn slot_of(&self, phys: u64) -> Option<usize> {
        let off = phys.checked_sub(HEAP_TABLES_BASE)?;
        let slot = (off / TABLE_SIZE) as usize;
        (off % TABLE_SIZE == 0 && slot < self.pages.len()).then_some(slot)
    }

    #[inline]
    fn live_slot(&self, phys: u64) -> usize {
        match self.slot_of(phys) {
            Some(s) if self.live[s] => s,
            _ => panic!("access to {phys:#x}, which is not a live table"),
        }
    }

    #[inline]
    fn page(&self, phys: u64) -> &[u64; ENTRIES] {
        &self.pages[self.live_slot(phys)]
    }
}

impl TableMemory for HeapTables {
    fn alloc_table(&mut self) -> Option<u64> {
        self.attempts += 1;
        if self.fail_at == Some(self.attempts) {
            self.fail_at = None;
            return None;
        }
        let slot = match self.spare.pop() {
            Some(s) => {
                self.pages[s].fill(0);
                s
            }
            None => {
                self.pages.push(Box::new([0; ENTRIES]));
                self.live.push(false);
                self.pages.len() - 1
            }
        };
        self.live[slot] = true;
        self.live_count += 1;
        self.peak = self.peak.max(self.live_count);
        self.allocs += 1;
        Some(Self::phys_of(slot))
    }

    fn free_table(&mut self, table: u64) {
        let slot = self.live_slot(table);
        self.live[slot] = false;
        self.live_count -= 1;
        self.frees += 1;
        self.spare.push(slot);
    }

    #[inline]
    fn read(&self, table: u64, index: usize) -> u64 {
        self.page(table)[index]
    }

    #[inline]
    fn write(&mut self, table: u64, index: usize, value: u64) {
        let slot = self.live_slot(table);
        self.pages[slot][index] = value;
    }

    #[inline]
    fn coherent(&self) -> bool {
        self.coherent
    }

    fn flush(&mut self, phys: u64, len: u64) {
        self.flush_calls += 1;
        self.flushed_bytes += len;
        // Flushing a table that is not live would be a use-after-free.
        self.live_slot(phys & !(TABLE_SIZE - 1));
        if let Some(log) = &mut self.flush_log {
            let first = phys & !(CACHE_LINE - 1);
            let mut line = first;
            while line < phys + len {
                *log.entry(line).or_default() += 1;
                line += CACHE_LINE;
            }
        }
    }

    fn is_empty(&self, table: u64) -> bool {
        self.page(table).iter().all(|&e| e == 0)
    }

    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        let slot = self.live_slot(table);
        let run = &mut self.pages[slot][index..index + count];
        let mut value = first;
        for (k, e) in run.iter_mut().enumerate() {
            if *e != 0 {
                return k;
            }
            *e = value;
            value = value.wrapping_add(step);
        }
        count
    }

    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        let slot = self.live_slot(table);
        let run = &mut self.pages[slot][index..index + count];
        let mut c = Cleared::default();
        for (k, e) in run.iter_mut().enumerate() {
            if *e != 0 {
                *e = 0;
                c.note(index + k);
            }
        }
        c
    }
}
