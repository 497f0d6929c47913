//! Where the tables live: the [`TableMemory`] seam, and [`HeapTables`], the
//! host implementation on heap pages used by tests, Miri and benchmarks.
//! With the `testing` feature (and in this crate's tests),
//! [`NonCoherentTables`] models a walker that does not snoop: it sees only
//! what was flushed.
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
//!
//! [`ContiguousMemory`] extends the seam with physically contiguous runs of
//! pages, for structures larger than one table (an AMD-Vi device table, a
//! VT-d interrupt remapping table of up to 65536 entries, large AMD-Vi
//! interrupt tables). Contract, in addition to `TableMemory`'s:
//! * `alloc_contiguous(pages)` returns the 4 KiB-aligned physical address
//!   of `pages` contiguous 4 KiB pages, zeroed as the walker sees them (as
//!   for `alloc_table`), or `None` (nothing allocated) when it cannot;
//! * every page `base + k * 4096` of such an allocation can be read,
//!   written and flushed through `TableMemory::read`/`write`/`flush` as if
//!   it were a table, and `flush` may cover several of its pages at once;
//! * `free_contiguous(base, pages)` takes back exactly one earlier
//!   allocation, with the same page count.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;

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

    /// The same memory through the concurrent seam, for implementations
    /// that offer it (`Some(self)`); `None`, the default, for the others,
    /// whose page tables then map and unmap only through `&mut`.
    fn shared(&self) -> Option<&dyn SharedTableMemory> {
        None
    }

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

    /// Whether every entry of `table` outside `index..index + count` is
    /// zero: [`TableMemory::is_empty`] right after those entries were
    /// cleared, without reading them again (an unmap of a whole table
    /// reads nothing).
    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        (0..index).chain(index + count..ENTRIES).all(|i| self.read(table, i) == 0)
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

    /// Clears `bits` in entry `index` of `table` and returns the entry as
    /// it was. The walker may set bits of the same entry at the same time
    /// (accessed and dirty bits of a leaf): implementations over memory the
    /// hardware walks must do this as one atomic read-modify-write
    /// (`lock and`), so a bit the walker sets in between is not lost. The
    /// default reads and writes back, which is enough where no walker runs
    /// (host models).
    fn clear_bits(&mut self, table: u64, index: usize, bits: u64) -> u64 {
        let old = self.read(table, index);
        if old & bits != 0 {
            self.write(table, index, old & !bits);
        }
        old
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

/// [`TableMemory`] that several threads can use at once, for the engine's
/// concurrent map and unmap ([`crate::PageTable::map_shared`],
/// [`crate::PageTable::unmap_shared`]). Contract, in addition to
/// `TableMemory`'s (which the exclusive methods still follow):
/// * `alloc_shared` / `free_shared` are `alloc_table` / `free_table`
///   through `&self`, internally synchronised;
/// * `entries(table)` is the whole table as 512 atomic words, for the
///   life of the allocation: the walker and every thread see the same
///   words (the kernel's implementation points into its direct map, the
///   one place this needs `unsafe`). The engine reads entries with acquire
///   loads and installs tables with a release compare-and-swap on it;
/// * `flush_shared` is `flush` through `&self`.
pub trait SharedTableMemory: TableMemory + Sync {
    /// Allocates a zeroed 4 KiB table (zero as the walker sees it).
    fn alloc_shared(&self) -> Option<u64>;
    /// Returns a table to the allocator.
    fn free_shared(&self, table: u64);
    /// The 512 entries of the live table at `table`.
    fn entries(&self, table: u64) -> &[AtomicU64; ENTRIES];
    /// Writes back the cache lines covering `[phys, phys + len)`.
    fn flush_shared(&self, phys: u64, len: u64);
}

/// [`TableMemory`] that can also hand out physically contiguous runs of
/// pages (see the module documentation for the contract). The kernel
/// implements it over its frame allocator; host tests over heap pages
/// ([`HeapTables`]).
pub trait ContiguousMemory: TableMemory {
    /// Allocates `pages` (>= 1) zeroed, physically contiguous 4 KiB pages.
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64>;

    /// Returns a run from [`Self::alloc_contiguous`].
    fn free_contiguous(&mut self, base: u64, pages: usize);
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

/// A table's page on the heap, aligned as a real table is (with the
/// allocator's 16-byte alignment a table would straddle two pages, at an
/// offset that changes from run to run).
#[derive(Debug)]
#[repr(C, align(4096))]
struct Page([u64; ENTRIES]);

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
    pages: Vec<Box<Page>>,
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

    /// Whether an allocation failure is armed and has not happened yet.
    pub fn failure_armed(&self) -> bool {
        self.fail_at.is_some()
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
        &self.pages[self.live_slot(phys)].0
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
                self.pages[s].0.fill(0);
                s
            }
            None => {
                self.pages.push(Box::new(Page([0; ENTRIES])));
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
        self.pages[slot].0[index] = value;
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
        first_nonzero(self.page(table)) == ENTRIES
    }

    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        zero_except(self.page(table), index, count)
    }

    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        let slot = self.live_slot(table);
        fill_words(&mut self.pages[slot].0[index..index + count], first, step)
    }

    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        let slot = self.live_slot(table);
        clear_words(&mut self.pages[slot].0, index, count)
    }
}

/// Words per block of the loops below: the blocks are checked with
/// branch-free code the compiler turns into vector instructions, and only
/// a block holding a nonzero word is searched word by word.
const BLOCK: usize = ENTRIES_PER_LINE;

/// Index of the first nonzero word of `words` (`words.len()` when none).
#[inline]
fn first_nonzero(words: &[u64]) -> usize {
    let mut blocks = words.chunks_exact(BLOCK);
    let mut base = 0;
    for b in &mut blocks {
        if b.iter().fold(0, |a, &e| a | e) != 0 {
            return base + b.iter().position(|&e| e != 0).unwrap_or(BLOCK);
        }
        base += BLOCK;
    }
    base + blocks.remainder().iter().position(|&e| e != 0).unwrap_or(blocks.remainder().len())
}

/// [`TableMemory::is_empty_except`] on plain words.
#[inline]
fn zero_except(words: &[u64; ENTRIES], index: usize, count: usize) -> bool {
    let (before, rest) = words.split_at(index);
    let after = &rest[count..];
    first_nonzero(before) == before.len() && first_nonzero(after) == after.len()
}

/// [`TableMemory::fill`] on plain words: writes `first`, `first + step`,
/// ... while the words are zero; returns how many were written.
#[inline]
fn fill_words(words: &mut [u64], first: u64, step: u64) -> usize {
    // One pass: each block is checked and, when all zero, written while
    // it is in hand (a scan of the whole run and then a second pass to
    // write it made a 1 MiB map 1.2-1.4x slower on the host).
    let mut value = first;
    let mut done = 0;
    let mut blocks = words.chunks_exact_mut(BLOCK);
    for b in &mut blocks {
        if b.iter().fold(0, |a, &e| a | e) != 0 {
            break;
        }
        for e in b.iter_mut() {
            *e = value;
            value = value.wrapping_add(step);
        }
        done += BLOCK;
    }
    for e in &mut words[done..] {
        if *e != 0 {
            break;
        }
        *e = value;
        value = value.wrapping_add(step);
        done += 1;
    }
    done
}

/// [`TableMemory::clear`] on the plain words of a table.
#[inline]
fn clear_words(table: &mut [u64; ENTRIES], index: usize, count: usize) -> Cleared {
    let run = &mut table[index..index + count];
    let nonzero = run.iter().filter(|&&e| e != 0).count();
    if nonzero == 0 {
        return Cleared::default();
    }
    let first = index + first_nonzero(run);
    let last = index + run.iter().rposition(|&e| e != 0).unwrap_or(0);
    let mut lines = 0u64;
    let mut i = index;
    while i < index + count {
        let line_end = ((i / ENTRIES_PER_LINE + 1) * ENTRIES_PER_LINE).min(index + count);
        if table[i..line_end].iter().fold(0, |a, &e| a | e) != 0 {
            lines |= 1 << (i / ENTRIES_PER_LINE);
        }
        i = line_end;
    }
    table[index..index + count].fill(0);
    Cleared { count: nonzero, first, last, lines }
}

/// Runs are fresh slots at the end of the slab, so their fake physical
/// addresses are consecutive; each page is then a table of its own for
/// `read`/`write` (and for the use-after-free checks). Allocation failures
/// injected with [`HeapTables::fail_nth_alloc`] count one attempt per run.
impl ContiguousMemory for HeapTables {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        self.attempts += 1;
        if self.fail_at == Some(self.attempts) {
            self.fail_at = None;
            return None;
        }
        if pages == 0 {
            return None;
        }
        let first = self.pages.len();
        for _ in 0..pages {
            self.pages.push(Box::new(Page([0; ENTRIES])));
            self.live.push(true);
        }
        self.live_count += pages;
        self.peak = self.peak.max(self.live_count);
        self.allocs += 1;
        Some(Self::phys_of(first))
    }

    fn free_contiguous(&mut self, base: u64, pages: usize) {
        for k in 0..pages as u64 {
            self.free_table(base + k * TABLE_SIZE);
        }
        // Counted as one free, as the allocation was one.
        self.frees -= pages.saturating_sub(1) as u64;
    }
}

/// What the walker sees in a fresh [`NonCoherentTables`] table until its
/// zeroes are flushed: garbage that is present in every format (bits 0 and
/// 1 set: R|W for the VT-d second stage, P for x86, PR for AMD v1), so a
/// walker that trusts it translates to a nonsense address instead of
/// faulting.
#[cfg(any(test, feature = "testing"))]
pub const WALKER_POISON: u64 = 0xdead_beef_0bad_f00f;

/// Why [`NonCoherentTables::walker_read`] refused a read.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkerFault {
    /// The cache line holding the entry differs between what the CPU wrote
    /// and what the walker sees: a write that was not flushed, or the
    /// zeroes of a fresh table that the allocation never flushed (then
    /// `walker` is [`WALKER_POISON`]).
    Stale {
        /// The table read.
        table: u64,
        /// The entry read.
        index: usize,
        /// The entry as the walker sees it (what the hardware would use).
        walker: u64,
        /// The entry as the CPU wrote it.
        cpu: u64,
    },
    /// The walker followed an address that is not a live table (freed, or
    /// never allocated, for example read out of poison).
    NotATable {
        /// The address.
        table: u64,
    },
}

#[cfg(any(test, feature = "testing"))]
impl core::fmt::Display for WalkerFault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Stale { table, index, walker, cpu } => write!(
                f,
                "walker read {table:#x}[{index}] from an unflushed line: it sees {walker:#x}, the CPU wrote {cpu:#x}"
            ),
            Self::NotATable { table } => write!(f, "walker read {table:#x}, which is not a live table"),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl core::error::Error for WalkerFault {}

/// Table memory as a walker that does not snoop CPU caches sees it (VT-d
/// ECAP.C = 0), for host tests. Built only for this crate's tests and with
/// the `testing` feature, so other crates' tests can use it too.
///
/// Two views of every table:
/// * the **CPU view**, what [`TableMemory::read`] and [`TableMemory::write`]
///   see (a [`HeapTables`], with its use-after-free checks, fault injection
///   and flush log, reachable through [`NonCoherentTables::cpu_mut`]);
/// * the **walker view**, what the IOMMU would read from memory, which
///   changes only when [`TableMemory::flush`] writes a line back. A fresh
///   table holds [`WALKER_POISON`] there: the allocator's zeroes are still
///   in the CPU's cache.
///
/// The [`TableMemory`] contract says `alloc_table` itself flushes the
/// zeroes of a fresh table on a non-coherent unit.
/// [`NonCoherentTables::new`] does (the correct behaviour);
/// [`NonCoherentTables::without_alloc_flush`] does not (the bug a kernel
/// memory source can have), so that a test can show that it is caught.
///
/// A test walker reads entries with [`NonCoherentTables::walker_read`],
/// which refuses any read from a line whose two views differ: between
/// operations every line a walker can reach must have been flushed.
/// [`NonCoherentTables::unflushed_lines`] lists every such line of every
/// live table.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct NonCoherentTables {
    cpu: HeapTables,
    walker: BTreeMap<u64, Box<[u64; ENTRIES]>>,
    flush_on_alloc: bool,
    alloc_flushes: u64,
}

#[cfg(any(test, feature = "testing"))]
impl Default for NonCoherentTables {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(any(test, feature = "testing"))]
impl NonCoherentTables {
    /// Empty memory whose `alloc_table` flushes the zeroes of each fresh
    /// table, as the [`TableMemory`] contract asks.
    pub fn new() -> Self {
        Self { cpu: HeapTables::new(false), walker: BTreeMap::new(), flush_on_alloc: true, alloc_flushes: 0 }
    }

    /// Empty memory whose `alloc_table` does *not* flush the zeroes: the
    /// walker sees [`WALKER_POISON`] in every line of a fresh table the
    /// engine has not written and flushed since.
    pub fn without_alloc_flush() -> Self {
        Self { flush_on_alloc: false, ..Self::new() }
    }

    /// Whether `alloc_table` flushes the zeroes of fresh tables.
    pub fn flushes_allocations(&self) -> bool {
        self.flush_on_alloc
    }

    /// How many fresh tables `alloc_table` flushed (not counted in the CPU
    /// view's [`HeapTables::flush_stats`], which counts the engine's
    /// flushes only).
    pub fn alloc_flushes(&self) -> u64 {
        self.alloc_flushes
    }

    /// The CPU view (table counts, flush statistics, snapshots).
    pub fn cpu(&self) -> &HeapTables {
        &self.cpu
    }

    /// The CPU view, mutably, for fault injection and the flush log.
    /// Allocating, freeing or writing through it bypasses the walker view.
    pub fn cpu_mut(&mut self) -> &mut HeapTables {
        &mut self.cpu
    }

    /// Entry `index` of `table` as the walker sees it, unchecked; `None`
    /// when `table` is not a live table.
    pub fn walker_entry(&self, table: u64, index: usize) -> Option<u64> {
        self.walker.get(&table).map(|page| page[index])
    }

    /// Entry `index` of `table` as the walker reads it: refused when the
    /// cache line holding it was changed by the CPU and not flushed (or is
    /// a fresh table's unflushed poison), or when `table` is not live.
    pub fn walker_read(&self, table: u64, index: usize) -> Result<u64, WalkerFault> {
        let (Some(seen), true) = (self.walker.get(&table), self.cpu.is_live(table)) else {
            return Err(WalkerFault::NotATable { table });
        };
        let cpu = self.cpu.page(table);
        let line = index / ENTRIES_PER_LINE * ENTRIES_PER_LINE;
        let range = line..line + ENTRIES_PER_LINE;
        if seen[range.clone()] != cpu[range] {
            return Err(WalkerFault::Stale { table, index, walker: seen[index], cpu: cpu[index] });
        }
        Ok(seen[index])
    }

    /// Every line of every live table whose walker view differs from the
    /// CPU view, as `(table, line)` with `line` in `0..64`, ascending.
    pub fn unflushed_lines(&self) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        for (&table, seen) in &self.walker {
            let cpu = self.cpu.page(table);
            for (line, (a, b)) in seen.chunks(ENTRIES_PER_LINE).zip(cpu.chunks(ENTRIES_PER_LINE)).enumerate() {
                if a != b {
                    out.push((table, line));
                }
            }
        }
        out
    }

    /// Copies the lines `[phys, phys + len)` touches from the CPU view to
    /// the walker view.
    fn write_back(&mut self, phys: u64, len: u64) {
        let mut line = phys & !(CACHE_LINE - 1);
        while line < phys + len {
            let table = line & !(TABLE_SIZE - 1);
            let first = ((line - table) / 8) as usize;
            let cpu = self.cpu.page(table);
            let Some(seen) = self.walker.get_mut(&table) else {
                panic!("flush of {line:#x}, which is not in a live table")
            };
            seen[first..first + ENTRIES_PER_LINE].copy_from_slice(&cpu[first..first + ENTRIES_PER_LINE]);
            line += CACHE_LINE;
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl TableMemory for NonCoherentTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let table = self.cpu.alloc_table()?;
        self.walker.insert(table, Box::new([WALKER_POISON; ENTRIES]));
        if self.flush_on_alloc {
            self.write_back(table, TABLE_SIZE);
            self.alloc_flushes += 1;
        }
        Some(table)
    }

    fn free_table(&mut self, table: u64) {
        self.cpu.free_table(table);
        self.walker.remove(&table);
    }

    #[inline]
    fn read(&self, table: u64, index: usize) -> u64 {
        self.cpu.read(table, index)
    }

    #[inline]
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.cpu.write(table, index, value);
    }

    fn coherent(&self) -> bool {
        false
    }

    fn flush(&mut self, phys: u64, len: u64) {
        self.cpu.flush(phys, len);
        self.write_back(phys, len);
    }

    fn is_empty(&self, table: u64) -> bool {
        self.cpu.is_empty(table)
    }

    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        self.cpu.is_empty_except(table, index, count)
    }

    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        self.cpu.fill(table, index, count, first, step)
    }

    fn clear(&mut self, table: u64, index: usize, count: usize) -> Cleared {
        self.cpu.clear(table, index, count)
    }
}

#[cfg(any(test, feature = "testing"))]
impl ContiguousMemory for NonCoherentTables {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        let base = self.cpu.alloc_contiguous(pages)?;
        for k in 0..pages as u64 {
            self.walker.insert(base + k * TABLE_SIZE, Box::new([WALKER_POISON; ENTRIES]));
        }
        if self.flush_on_alloc {
            self.write_back(base, pages as u64 * TABLE_SIZE);
            self.alloc_flushes += 1;
        }
        Some(base)
    }

    fn free_contiguous(&mut self, base: u64, pages: usize) {
        self.cpu.free_contiguous(base, pages);
        for k in 0..pages as u64 {
            self.walker.remove(&(base + k * TABLE_SIZE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A table with nonzero words at `set` (indexes taken modulo 512).
    fn table_with(set: &[usize]) -> [u64; ENTRIES] {
        let mut t = [0u64; ENTRIES];
        for &i in set {
            t[i % ENTRIES] = (0x1000 * (i as u64 + 1)) | 1;
        }
        t
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 4 } else { 512 }))]

        /// The blocked loops give what the word-by-word defaults of
        /// `TableMemory` give, on any pattern and any range.
        #[test]
        fn plain_word_loops_match_the_defaults(
            set in prop::collection::vec(0usize..ENTRIES, 0..12),
            index in 0usize..ENTRIES,
            len in 1usize..=ENTRIES,
            first in any::<u64>(),
        ) {
            let count = len.min(ENTRIES - index);
            let table = table_with(&set);
            let mut expected = table;
            let mut want = Cleared::default();
            for (k, e) in expected[index..index + count].iter_mut().enumerate() {
                if *e != 0 {
                    *e = 0;
                    want.note(index + k);
                }
            }
            let mut got = table;
            prop_assert_eq!(clear_words(&mut got, index, count), want);
            prop_assert_eq!(got, expected);

            let mut expected = table;
            let mut written = count;
            for k in 0..count {
                if expected[index + k] != 0 {
                    written = k;
                    break;
                }
                expected[index + k] = first.wrapping_add(0x1000 * k as u64);
            }
            let mut got = table;
            prop_assert_eq!(fill_words(&mut got[index..index + count], first, 0x1000), written);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(first_nonzero(&table) == ENTRIES, set.is_empty());
            let outside = set.iter().all(|&i| (index..index + count).contains(&(i % ENTRIES)));
            prop_assert_eq!(zero_except(&table, index, count), outside);
        }
    }

    #[test]
    fn contiguous_runs_are_consecutive_live_pages() {
        let mut mem = HeapTables::new(true);
        let single = mem.alloc_table().unwrap();
        mem.free_table(single);
        let run = mem.alloc_contiguous(3).unwrap();
        // A spare slot is never part of a run: the run's pages follow
        // each other.
        assert_ne!(run, single);
        for k in 0..3 {
            assert!(mem.is_live(run + k * TABLE_SIZE));
            mem.write(run + k * TABLE_SIZE, 511, k + 1);
        }
        assert_eq!(mem.read(run + 2 * TABLE_SIZE, 511), 3);
        assert_eq!(mem.live_tables(), 3);
        mem.free_contiguous(run, 3);
        assert_eq!(mem.live_tables(), 0);
        assert_eq!((mem.allocs(), mem.frees()), (2, 2));
        mem.fail_nth_alloc(Some(1));
        assert_eq!(mem.alloc_contiguous(2), None);
        assert!(mem.alloc_contiguous(2).is_some());

        let mut nc = NonCoherentTables::new();
        let run = nc.alloc_contiguous(2).unwrap();
        assert_eq!(nc.walker_read(run + TABLE_SIZE, 7), Ok(0));
        nc.write(run + TABLE_SIZE, 7, 9);
        nc.flush(run, 2 * TABLE_SIZE);
        assert_eq!(nc.walker_read(run + TABLE_SIZE, 7), Ok(9));
        nc.free_contiguous(run, 2);
        assert_eq!(nc.walker_read(run, 0), Err(WalkerFault::NotATable { table: run }));
    }

    #[test]
    fn writes_reach_the_walker_only_when_flushed() {
        let mut mem = NonCoherentTables::new();
        let t = mem.alloc_table().unwrap();
        assert_eq!(mem.alloc_flushes(), 1);
        assert_eq!(mem.walker_read(t, 9), Ok(0));
        mem.write(t, 9, 0x1003);
        // The whole line 8..16 is refused, not just the entry written.
        let stale = WalkerFault::Stale { table: t, index: 12, walker: 0, cpu: 0 };
        assert_eq!(mem.walker_read(t, 12), Err(stale));
        assert_eq!(mem.walker_read(t, 9), Err(WalkerFault::Stale { table: t, index: 9, walker: 0, cpu: 0x1003 }));
        assert_eq!(mem.walker_read(t, 16), Ok(0));
        assert_eq!(mem.unflushed_lines(), [(t, 1)]);
        mem.flush(t + 64, 64);
        assert_eq!(mem.walker_read(t, 9), Ok(0x1003));
        assert!(mem.unflushed_lines().is_empty());
        assert_eq!(mem.cpu().flush_stats(), (1, 64));
    }

    #[test]
    fn fresh_tables_hold_poison_unless_the_allocation_flushes() {
        let mut mem = NonCoherentTables::without_alloc_flush();
        assert!(!mem.flushes_allocations());
        let t = mem.alloc_table().unwrap();
        assert_eq!(mem.read(t, 0), 0);
        assert_eq!(mem.walker_entry(t, 0), Some(WALKER_POISON));
        assert_eq!(
            mem.walker_read(t, 0),
            Err(WalkerFault::Stale { table: t, index: 0, walker: WALKER_POISON, cpu: 0 })
        );
        assert_eq!(mem.unflushed_lines().len(), 64);
        // Writing and flushing one line fixes that line only.
        mem.write(t, 3, 0x2003);
        mem.flush(t, 64);
        assert_eq!(mem.walker_read(t, 3), Ok(0x2003));
        assert!(matches!(mem.walker_read(t, 8), Err(WalkerFault::Stale { walker: WALKER_POISON, .. })));
        assert_eq!(mem.unflushed_lines().len(), 63);
        // Poison is present in every format.
        assert_eq!(WALKER_POISON & 3, 3);
    }

    #[test]
    fn freed_tables_are_not_tables() {
        let mut mem = NonCoherentTables::new();
        let t = mem.alloc_table().unwrap();
        mem.free_table(t);
        assert_eq!(mem.walker_read(t, 0), Err(WalkerFault::NotATable { table: t }));
        assert_eq!(mem.walker_read(0x1000, 0), Err(WalkerFault::NotATable { table: 0x1000 }));
        // A reused table is poisoned again until its zeroes are flushed.
        let mut bad = NonCoherentTables::without_alloc_flush();
        let u = bad.alloc_table().unwrap();
        bad.flush(u, TABLE_SIZE);
        bad.free_table(u);
        assert_eq!(bad.alloc_table(), Some(u));
        assert_eq!(bad.walker_entry(u, 100), Some(WALKER_POISON));
    }
}
