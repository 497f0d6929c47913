//! [`SharedHeapTables`]: page tables on the heap that several threads can
//! map and unmap in at once (host tests, Miri and benchmarks of the
//! engine's concurrent path).
//!
//! Pages are atomic words in chunks that never move: chunk `c` holds
//! `64 << c` pages and is created once, on first use, so a page's address
//! is stable for the life of the memory and an entry access is two index
//! operations, without a lock. Allocation takes a spare page (a short
//! lock) or the next fresh one (an atomic counter). Like [`HeapTables`],
//! any access to a freed or unknown page panics, which turns a
//! use-after-free in the engine into a test failure, and the Nth
//! allocation can be made to fail.
//!
//! [`HeapTables`]: crate::HeapTables

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use crate::memory::{HEAP_TABLES_BASE, SharedTableMemory, TableMemory};
use crate::{ENTRIES, TABLE_SIZE};

/// Pages in chunk 0; chunk `c` holds `FIRST_CHUNK << c`. Small under
/// Miri, where every atomic word created costs.
const FIRST_CHUNK: usize = if cfg!(miri) { 4 } else { 64 };
/// Chunks: room for about 2^32 tables (16 TiB of table memory; 2^28
/// under Miri).
const CHUNKS: usize = 26;

/// Cache-line aligned, so no two tables (which threads mapping disjoint
/// ranges write at once) share a line.
#[repr(align(64))]
struct Page {
    entries: [AtomicU64; ENTRIES],
    live: AtomicBool,
}

impl Page {
    fn new() -> Self {
        Self { live: AtomicBool::new(false), entries: [const { AtomicU64::new(0) }; ENTRIES] }
    }
}

/// Page tables on the heap that threads share (see the module
/// documentation). Implements [`TableMemory`] too, so one
/// [`crate::PageTable`] can use the exclusive and the concurrent paths.
pub struct SharedHeapTables {
    chunks: [spin::Once<Box<[Page]>>; CHUNKS],
    next: AtomicUsize,
    /// Spare pages and the counts, under one lock: an allocation or a
    /// free takes it once (threads mapping at once would otherwise pass
    /// each of five counters' cache lines between their cores).
    book: spin::Mutex<Book>,
    coherent: bool,
    flush_calls: AtomicU64,
    flushed_bytes: AtomicU64,
}

/// What [`SharedHeapTables`] keeps under its lock.
#[derive(Default)]
struct Book {
    spare: Vec<usize>,
    live: usize,
    peak: usize,
    allocs: u64,
    frees: u64,
    attempts: u64,
    /// Fail the allocation attempt with this number (0: none).
    fail_at: u64,
}

impl core::fmt::Debug for SharedHeapTables {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.book.lock();
        f.debug_struct("SharedHeapTables")
            .field("live", &b.live)
            .field("allocs", &b.allocs)
            .field("frees", &b.frees)
            .finish()
    }
}

impl Default for SharedHeapTables {
    fn default() -> Self {
        Self::new(true)
    }
}

/// Chunk and index in it of page slot `slot`.
#[inline]
fn locate(slot: usize) -> (usize, usize) {
    let n = slot / FIRST_CHUNK + 1;
    let chunk = (usize::BITS - 1 - n.leading_zeros()) as usize;
    (chunk, slot - FIRST_CHUNK * ((1 << chunk) - 1))
}

impl SharedHeapTables {
    /// Empty memory; `coherent` is what [`TableMemory::coherent`] reports.
    pub fn new(coherent: bool) -> Self {
        Self {
            chunks: [const { spin::Once::new() }; CHUNKS],
            next: AtomicUsize::new(0),
            book: spin::Mutex::new(Book::default()),
            coherent,
            flush_calls: AtomicU64::new(0),
            flushed_bytes: AtomicU64::new(0),
        }
    }

    /// Makes the `n`th allocation attempt from now fail (`None`: none).
    pub fn fail_nth_alloc(&self, n: Option<u64>) {
        let mut b = self.book.lock();
        b.fail_at = n.map_or(0, |n| b.attempts + n);
    }
    /// Tables allocated and not freed.
    pub fn live_tables(&self) -> usize {
        self.book.lock().live
    }
    /// Most tables live at once.
    pub fn peak_tables(&self) -> usize {
        self.book.lock().peak
    }
    /// Successful allocations so far.
    pub fn allocs(&self) -> u64 {
        self.book.lock().allocs
    }
    /// Frees so far.
    pub fn frees(&self) -> u64 {
        self.book.lock().frees
    }
    /// `(flush calls, bytes flushed)`.
    pub fn flush_stats(&self) -> (u64, u64) {
        (self.flush_calls.load(Relaxed), self.flushed_bytes.load(Relaxed))
    }
    /// Whether `table` is a live table.
    pub fn is_live(&self, table: u64) -> bool {
        self.page(table).is_some_and(|p| p.live.load(Relaxed))
    }

    fn slot_of(phys: u64) -> Option<usize> {
        let off = phys.checked_sub(HEAP_TABLES_BASE)?;
        if off % TABLE_SIZE != 0 {
            return None;
        }
        usize::try_from(off / TABLE_SIZE).ok()
    }

    fn page(&self, phys: u64) -> Option<&Page> {
        let (chunk, index) = locate(Self::slot_of(phys)?);
        self.chunks.get(chunk)?.get()?.get(index)
    }

    #[inline]
    fn live_page(&self, phys: u64) -> &Page {
        match self.page(phys) {
            Some(p) if p.live.load(Relaxed) => p,
            _ => panic!("access to {phys:#x}, which is not a live table"),
        }
    }
}

impl SharedTableMemory for SharedHeapTables {
    fn alloc_shared(&self) -> Option<u64> {
        let spare = {
            let mut b = self.book.lock();
            b.attempts += 1;
            if b.fail_at == b.attempts {
                b.fail_at = 0;
                return None;
            }
            // Counted as taken now; given back below if there is no room.
            b.live += 1;
            b.peak = b.peak.max(b.live);
            b.allocs += 1;
            b.spare.pop()
        };
        let slot = match spare {
            Some(s) => s,
            None => {
                let s = self.next.fetch_add(1, Relaxed);
                let (chunk, _) = locate(s);
                if chunk >= CHUNKS {
                    let mut b = self.book.lock();
                    b.live -= 1;
                    b.allocs -= 1;
                    return None;
                }
                self.chunks[chunk].call_once(|| (0..FIRST_CHUNK << chunk).map(|_| Page::new()).collect());
                s
            }
        };
        let (chunk, index) = locate(slot);
        let page = &self.chunks[chunk].get().expect("chunk exists")[index];
        for e in &page.entries {
            e.store(0, Relaxed);
        }
        // Release: a thread that sees the page live sees its zeroes (the
        // engine's install of the table is a release too).
        page.live.store(true, Release);
        Some(HEAP_TABLES_BASE + slot as u64 * TABLE_SIZE)
    }

    fn free_shared(&self, table: u64) {
        let page = self.live_page(table);
        page.live.store(false, Relaxed);
        let slot = Self::slot_of(table).expect("a live table has a slot");
        let mut b = self.book.lock();
        b.live -= 1;
        b.frees += 1;
        b.spare.push(slot);
    }

    #[inline]
    fn entries(&self, table: u64) -> &[AtomicU64; ENTRIES] {
        &self.live_page(table).entries
    }

    fn flush_shared(&self, phys: u64, len: u64) {
        // Flushing a table that is not live would be a use-after-free.
        self.live_page(phys & !(TABLE_SIZE - 1));
        self.flush_calls.fetch_add(1, Relaxed);
        self.flushed_bytes.fetch_add(len, Relaxed);
    }
}

impl TableMemory for SharedHeapTables {
    fn shared(&self) -> Option<&dyn SharedTableMemory> {
        Some(self)
    }
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc_shared()
    }
    fn free_table(&mut self, table: u64) {
        self.free_shared(table)
    }
    #[inline]
    fn read(&self, table: u64, index: usize) -> u64 {
        // Acquire: a lookup racing a concurrent map of a neighbouring
        // range follows table entries that thread installed.
        self.entries(table)[index].load(Acquire)
    }
    #[inline]
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.entries(table)[index].store(value, Relaxed)
    }
    fn coherent(&self) -> bool {
        self.coherent
    }
    fn flush(&mut self, phys: u64, len: u64) {
        self.flush_shared(phys, len)
    }
    fn is_empty(&self, table: u64) -> bool {
        self.entries(table).iter().all(|e| e.load(Relaxed) == 0)
    }
    fn is_empty_except(&self, table: u64, index: usize, count: usize) -> bool {
        let (before, rest) = self.entries(table).split_at(index);
        before.iter().chain(&rest[count..]).all(|e| e.load(Relaxed) == 0)
    }
    fn fill(&mut self, table: u64, index: usize, count: usize, first: u64, step: u64) -> usize {
        let mut value = first;
        for (k, e) in self.entries(table)[index..index + count].iter().enumerate() {
            if e.load(Relaxed) != 0 {
                return k;
            }
            e.store(value, Relaxed);
            value = value.wrapping_add(step);
        }
        count
    }
    fn clear(&mut self, table: u64, index: usize, count: usize) -> crate::Cleared {
        let mut c = crate::Cleared::default();
        for (k, e) in self.entries(table)[index..index + count].iter().enumerate() {
            if e.load(Relaxed) != 0 {
                e.store(0, Relaxed);
                c.note(index + k);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "chunk sizes differ under Miri")]
    fn slots_map_to_growing_chunks() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(63), (0, 63));
        assert_eq!(locate(64), (1, 0));
        assert_eq!(locate(191), (1, 127));
        assert_eq!(locate(192), (2, 0));
    }

    #[test]
    fn pages_are_reused_zeroed_and_dead_pages_refused() {
        let m = SharedHeapTables::new(true);
        let ts: Vec<u64> = (0..200).map(|_| m.alloc_shared().unwrap()).collect();
        assert_eq!(m.live_tables(), 200);
        m.entries(ts[150])[3].store(7, Relaxed);
        m.free_shared(ts[150]);
        assert!(!m.is_live(ts[150]));
        let again = m.alloc_shared().unwrap();
        assert_eq!(again, ts[150]);
        assert_eq!(m.entries(again)[3].load(Relaxed), 0);
        m.fail_nth_alloc(Some(2));
        assert!(m.alloc_shared().is_some());
        assert!(m.alloc_shared().is_none());
        assert!(m.alloc_shared().is_some());
        assert_eq!((m.allocs(), m.frees(), m.peak_tables()), (203, 1, 202));
        let freed = ts[0];
        m.free_shared(freed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.entries(freed)[0].load(Relaxed)));
        assert!(r.is_err(), "a freed table is not a table");
    }
}
