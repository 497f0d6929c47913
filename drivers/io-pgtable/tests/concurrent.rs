//! The engine's concurrent path (`map_shared` / `unmap_shared` through
//! `&self`): threads mapping and unmapping disjoint ranges of one tree,
//! checked afterwards by an independent walk of every page; the install
//! race (the loser frees its table and uses the winner's) forced
//! deterministically; concurrent splits of one large page. The small races
//! also run under Miri (`cargo +nightly miri test -p io-pgtable --test
//! concurrent`), which checks the atomics for data races.

use std::sync::Mutex;

use io_pgtable::*;
use portcullis_iommu::{IotlbGather, PhysRun};

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;

type Table<M> = PageTable<VtdSecondStage, M>;

fn ss() -> Table<SharedHeapTables> {
    PageTable::new(VtdSecondStage::new(4).unwrap(), SharedHeapTables::new(true)).unwrap()
}

/// Output address of a page in these tests: distinct per IOVA.
fn phys_of(iova: u64) -> u64 {
    (iova ^ 0x55_5000_0000) & ((1 << 46) - 1)
}

/// An independent walk (the engine's own `walk`, entry by entry from the
/// root) of every page in `[start, end)`: the leaf found must translate to
/// `expect(iova)`, or nothing must be mapped when it is `None`.
fn check_pages(pt: &Table<SharedHeapTables>, start: u64, end: u64, expect: impl Fn(u64) -> Option<u64>) {
    let format = pt.format();
    let mut iova = start;
    while iova < end {
        let steps = pt.walk(iova);
        let last = steps.last().expect("a walk reads the root");
        let got = format.is_present(last.raw).then(|| {
            let size = level_size(last.level);
            format.leaf_address(last.raw, last.level) + (iova & (size - 1))
        });
        assert_eq!(got, expect(iova), "translation of {iova:#x}: walk {steps:x?}");
        iova += K4;
    }
}

#[test]
fn threads_map_and_unmap_disjoint_ranges() {
    let pt = ss();
    let threads: u64 = if cfg!(miri) { 2 } else { 4 };
    // Pages interleaved between threads (page n belongs to thread n %
    // threads): every leaf table and every table above is shared, so the
    // installs race; plus per-thread 2 MiB runs above, mapped whole.
    let pages: u64 = if cfg!(miri) { 16 } else { 4096 };
    let big = 64 * M2;
    let rounds = if cfg!(miri) { 1 } else { 4 };
    for round in 0..rounds {
        std::thread::scope(|s| {
            for t in 0..threads {
                let pt = &pt;
                s.spawn(move || {
                    let mut unlinked = Vec::new();
                    for n in (t..pages).step_by(threads as usize) {
                        let iova = n * K4;
                        pt.map_shared(iova, &[PhysRun::new(phys_of(iova), K4)], Prot::RW, &mut unlinked).unwrap();
                    }
                    if !cfg!(miri) {
                        let at = big + t * 4 * M2;
                        pt.map_shared(at, &[PhysRun::new(phys_of(at), 4 * M2)], Prot::RW, &mut unlinked).unwrap();
                        assert_eq!(pt.page_size(at), Some(M2));
                    }
                    assert!(unlinked.is_empty());
                });
            }
        });
        check_pages(&pt, 0, pages * K4 + 8 * K4, |iova| (iova < pages * K4).then(|| phys_of(iova)));
        if !cfg!(miri) {
            check_pages(&pt, big, big + threads * 4 * M2, |iova| Some(phys_of(iova)));
        }
        // Each thread unmaps the odd pages it owns (partial: tables stay),
        // then its large run (whole leaf tables: none were made).
        std::thread::scope(|s| {
            for t in 0..threads {
                let pt = &pt;
                s.spawn(move || {
                    let mut unlinked = Vec::new();
                    for n in (t..pages).step_by(threads as usize).filter(|n| n % 2 == 1) {
                        let mut g = IotlbGather::default();
                        assert_eq!(pt.unmap_shared(n * K4, K4, &mut g, &mut unlinked), Ok(K4));
                        assert_eq!(g.start, Some(n * K4));
                    }
                    if !cfg!(miri) {
                        let mut g = IotlbGather::default();
                        let at = big + t * 4 * M2;
                        assert_eq!(pt.unmap_shared(at, 4 * M2, &mut g, &mut unlinked), Ok(4 * M2));
                    }
                    assert!(unlinked.is_empty(), "no unmap covered a whole table");
                });
            }
        });
        check_pages(&pt, 0, pages * K4, |iova| (iova / K4).is_multiple_of(2).then(|| phys_of(iova)));
        // The even pages, with one call over everything: it covers the
        // tables, which are unlinked and handed back.
        let mut g = IotlbGather::default();
        let mut unlinked = Vec::new();
        let whole = 1 << 39;
        assert_eq!(pt.unmap_shared(0, whole, &mut g, &mut unlinked), Ok(pages / 2 * K4), "round {round}");
        assert_eq!(g.freed_tables, unlinked.len());
        assert_eq!(pt.table_count(), 1);
        pt.free_unlinked(&mut unlinked);
        assert!(unlinked.is_empty());
        assert_eq!(pt.memory().live_tables(), 1, "only the root is left");
        check_pages(&pt, 0, pages * K4, |_| None);
    }
}

#[test]
fn two_threads_race_to_install_one_table() {
    // The smallest race: two pages in one leaf table that does not exist
    // yet, nor the tables above it. Every interleaving must end with both
    // pages mapped through one set of tables and no table leaked.
    let tries = if cfg!(miri) { 4 } else { 200 };
    for _ in 0..tries {
        let pt = ss();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let pt = &pt;
                s.spawn(move || {
                    let iova = 0x40_0000_0000 + t * K4;
                    let mut unlinked = Vec::new();
                    pt.map_shared(iova, &[PhysRun::new(phys_of(iova), K4)], Prot::RW, &mut unlinked).unwrap();
                });
            }
        });
        assert_eq!(pt.table_count(), 4);
        assert_eq!(pt.memory().live_tables(), 4, "every loser freed its tables");
        assert_eq!(pt.memory().allocs() - pt.memory().frees(), 4);
        let (a, b) = (pt.walk(0x40_0000_0000), pt.walk(0x40_0000_1000));
        assert_eq!(a.last().unwrap().table, b.last().unwrap().table, "one leaf table");
        check_pages(&pt, 0x40_0000_0000, 0x40_0000_3000, |iova| (iova < 0x40_0000_2000).then(|| phys_of(iova)));
        pt.check_invariants().unwrap();
    }
}

/// Shared heap tables whose next allocation first runs `hook` (which may
/// install a table of its own where the engine is about to install one,
/// as a thread winning the race would).
struct Racing {
    inner: SharedHeapTables,
    hook: Mutex<Option<Hook>>,
}

type Hook = Box<dyn FnOnce(&SharedHeapTables) + Send>;

impl TableMemory for Racing {
    fn shared(&self) -> Option<&dyn SharedTableMemory> {
        Some(self)
    }
    fn alloc_table(&mut self) -> Option<u64> {
        self.alloc_shared()
    }
    fn free_table(&mut self, table: u64) {
        self.free_shared(table)
    }
    fn read(&self, table: u64, index: usize) -> u64 {
        self.inner.read(table, index)
    }
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.inner.write(table, index, value)
    }
    fn coherent(&self) -> bool {
        true
    }
    fn flush(&mut self, _phys: u64, _len: u64) {}
}

impl SharedTableMemory for Racing {
    fn alloc_shared(&self) -> Option<u64> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook(&self.inner);
        }
        self.inner.alloc_shared()
    }
    fn free_shared(&self, table: u64) {
        self.inner.free_shared(table)
    }
    fn entries(&self, table: u64) -> &[std::sync::atomic::AtomicU64; ENTRIES] {
        self.inner.entries(table)
    }
    fn flush_shared(&self, phys: u64, len: u64) {
        self.inner.flush_shared(phys, len)
    }
}

#[test]
fn the_loser_of_an_install_frees_its_table_and_uses_the_winners() {
    let format = VtdSecondStage::new(4).unwrap();
    let racing = Racing { inner: SharedHeapTables::new(true), hook: Mutex::new(None) };
    let pt = PageTable::new(format, racing).unwrap();
    let root = pt.root();
    let iova = 0x80_1234_5000u64;
    let winner = std::sync::Arc::new(Mutex::new(0u64));
    let w = winner.clone();
    let entry = pt.format().table_entry(0, 3);
    // When the engine allocates the level-2 table for the root entry of
    // `iova`, another "thread" has just installed its own there.
    *pt.memory().hook.lock().unwrap() = Some(Box::new(move |mem: &SharedHeapTables| {
        let t = mem.alloc_shared().unwrap();
        let i = (iova >> 39) as usize & 511;
        mem.entries(root)[i].store(entry | t, std::sync::atomic::Ordering::Release);
        *w.lock().unwrap() = t;
    }));
    let mut unlinked = Vec::new();
    pt.map_shared(iova, &[PhysRun::new(0x9000, K4)], Prot::RW, &mut unlinked).unwrap();
    let winner = *winner.lock().unwrap();
    let steps = pt.walk(iova);
    assert_eq!(steps[1].table, winner, "the map went through the winner's table: {steps:x?}");
    assert_eq!(pt.iova_to_phys(iova), Some((0x9000, Prot::RW)));
    let mem = &pt.memory().inner;
    // Root, the winner's, and the two below it; the loser's was freed.
    assert_eq!((mem.allocs(), mem.frees(), mem.live_tables()), (5, 1, 4));
    // The winner's table is counted by whoever installed it: not this
    // page table, which linked two.
    assert_eq!(pt.table_count(), 3);
}

#[test]
fn concurrent_unmaps_split_one_large_page_once() {
    let tries = if cfg!(miri) { 2 } else { 100 };
    for _ in 0..tries {
        let pt = ss();
        let mut unlinked = Vec::new();
        pt.map_shared(M2, &[PhysRun::new(4 * M2, M2)], Prot::RW, &mut unlinked).unwrap();
        assert_eq!(pt.page_size(M2), Some(M2));
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let pt = &pt;
                s.spawn(move || {
                    let mut g = IotlbGather::default();
                    let mut unlinked = Vec::new();
                    let at = M2 + t * 100 * K4;
                    assert_eq!(pt.unmap_shared(at, K4, &mut g, &mut unlinked), Ok(K4));
                    assert!(unlinked.is_empty());
                });
            }
        });
        assert_eq!(pt.table_count(), 4, "one split table");
        assert_eq!(pt.memory().live_tables(), 4, "the losing split's table was freed");
        check_pages(&pt, M2, 2 * M2, |iova| {
            let off = iova - M2;
            (off != 0 && off != 100 * K4).then_some(4 * M2 + off)
        });
    }
}

#[test]
#[cfg_attr(miri, ignore = "single-threaded: the same paths as on the host")]
fn a_map_uses_an_empty_table_a_partial_unmap_left_where_a_large_page_would_go() {
    let pt = ss();
    let mut unlinked = Vec::new();
    pt.map_shared(M2 + K4, &[PhysRun::new(0x1000, K4)], Prot::RW, &mut unlinked).unwrap();
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap_shared(M2 + K4, K4, &mut g, &mut unlinked), Ok(K4));
    assert!(unlinked.is_empty(), "the leaf table stays (the unmap did not cover it)");
    assert_eq!(pt.table_count(), 4);
    // A 2 MiB piece there maps as 512 small pages inside the empty table.
    pt.map_shared(M2, &[PhysRun::new(8 * M2, M2)], Prot::RW, &mut unlinked).unwrap();
    assert_eq!(pt.page_size(M2), Some(K4));
    check_pages(&pt, M2, 2 * M2, |iova| Some(8 * M2 + iova - M2));
    // A map that really overlaps is still refused, naming the page.
    assert_eq!(
        pt.map_shared(0, &[PhysRun::new(0, 2 * M2)], Prot::RW, &mut unlinked),
        Err(Error::AlreadyMapped { iova: M2 })
    );
    check_pages(&pt, 0, M2, |_| None);
    // The exclusive path works on the same tree afterwards, and unlinks
    // the leaf table it empties.
    let mut pt = pt;
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(M2, M2, &mut g), M2);
    assert_eq!((pt.table_count(), pt.deferred_count()), (1, 3), "everything below the root emptied");
    pt.map(M2, 2 * M2, M2, Prot::READ).unwrap();
    assert_eq!(pt.page_size(M2 + K4), Some(M2));
    pt.check_invariants().unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "single-threaded: the same paths as on the host")]
fn a_failed_concurrent_map_unwinds_and_hands_back_what_it_unlinked() {
    let pt = ss();
    let mut unlinked = Vec::new();
    // Enough for the first 2 MiB (three tables: 4 KiB pages, as the
    // physical side is not 2 MiB aligned), not the next leaf table.
    pt.memory().fail_nth_alloc(Some(4));
    let runs = [PhysRun::new(0x10_0000_1000, M2 + K4)];
    assert_eq!(
        pt.map_shared(0x40_0000_0000, &runs, Prot::RW, &mut unlinked),
        Err(Error::NoMemory { iova: 0x40_0000_0000 + M2, level: 0 })
    );
    check_pages(&pt, 0x40_0000_0000, 0x40_0000_0000 + 4 * M2, |_| None);
    // The unwind covered the first leaf table: unlinked, for the caller to
    // free after its invalidation.
    assert_eq!(unlinked.len(), 1);
    pt.free_unlinked(&mut unlinked);
    assert_eq!(pt.memory().live_tables(), pt.table_count());
}

#[test]
fn an_unmap_hands_back_what_it_cleared_as_a_read_back_would() {
    // Scattered 4 KiB pages, a physically contiguous stretch that joins
    // into one run, a 2 MiB leaf, and a hole: the collected runs are what
    // `phys_runs` read before the unmap, and the range is empty after.
    let pt = ss();
    let mut unlinked = Vec::new();
    let base = 0x40_0000_0000u64;
    let mut runs: Vec<PhysRun> = (0..40).map(|k| PhysRun::new(0x100_0000 + k * 2 * K4, K4)).collect();
    runs.extend((0..8).map(|k| PhysRun::new(0x900_0000 + k * K4, K4)));
    let small: u64 = runs.iter().map(|r| r.len).sum();
    pt.map_shared(base, &runs, Prot::RW, &mut unlinked).unwrap();
    pt.map_shared(base + M2, &[PhysRun::new(16 * M2, M2)], Prot::RW, &mut unlinked).unwrap();
    let end = base + 2 * M2;
    // Read back on both sides of the hole (a read stops at one).
    let mut before = vec![PhysRun::default(); 256];
    let (n, done) = pt.phys_runs(base, small, &mut before);
    assert_eq!(done, small);
    let (m, done) = pt.phys_runs(base + M2, M2, &mut before[n..]);
    assert_eq!(done, M2);
    before.truncate(n + m);
    assert_eq!(before.len(), 40 + 1 + 1, "scattered, the joined stretch, the large leaf: {before:x?}");
    let mut g = IotlbGather::default();
    let mut collected = Vec::new();
    let unmapped = pt.unmap_shared_collect(base, end - base, &mut g, &mut unlinked, &mut collected).unwrap();
    assert_eq!(unmapped, small + M2);
    assert_eq!(collected, before);
    check_pages(&pt, base, end, |_| None);
    // Without mappings the same call collects nothing.
    let mut again = Vec::new();
    assert_eq!(pt.unmap_shared_collect(base, end - base, &mut g, &mut unlinked, &mut again).unwrap(), 0);
    assert!(again.is_empty());
}

#[test]
fn a_run_of_4k_leaves_across_leaf_tables_is_handed_back_as_one() {
    // Physically contiguous but 4 KiB-misaligned for 2 MiB: 4 KiB leaves
    // in three leaf tables, handed back joined into the one run mapped,
    // after a run in `out` it does not continue.
    let pt = ss();
    let mut unlinked = Vec::new();
    let base = 0x40_0000_0000u64 + M2 - 8 * K4;
    let run = PhysRun::new(0x7700_1000, 2 * M2);
    pt.map_shared(base, &[run], Prot::RW, &mut unlinked).unwrap();
    let mut g = IotlbGather::default();
    let earlier = PhysRun::new(0x1000, K4);
    let mut collected = vec![earlier];
    assert_eq!(pt.unmap_shared_collect(base, 2 * M2, &mut g, &mut unlinked, &mut collected).unwrap(), 2 * M2);
    assert_eq!(collected, [earlier, run]);
    check_pages(&pt, base, base + 2 * M2, |_| None);
}
