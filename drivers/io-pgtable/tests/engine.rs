//! Engine behaviour: page-size choice, memory use, splits, fault injection,
//! flush batching, the domain wrapper.

use std::collections::{BTreeMap, BTreeSet};

use io_pgtable::*;
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain, IotlbGather, IovaRange, PhysRun};

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

type SsTable = PageTable<VtdSecondStage, HeapTables>;

fn ss(levels: u32) -> SsTable {
    PageTable::new(VtdSecondStage::new(levels).unwrap(), HeapTables::default()).unwrap()
}

fn mappings<F: PtFormat, M: TableMemory>(pt: &PageTable<F, M>) -> Vec<(u64, u64, u64, Prot)> {
    let mut v = Vec::new();
    pt.for_each_mapping(|iova, size, phys, prot| v.push((iova, size, phys, prot)));
    v
}

/// Memory held must be exactly what the table says it holds.
fn check_accounting(pt: &SsTable) {
    pt.check_invariants().unwrap();
    assert_eq!(pt.memory().live_tables(), pt.table_count() + pt.deferred_count());
}

#[test]
fn largest_page_sizes_are_chosen() {
    let mut pt = ss(4);
    // 2 MiB-aligned on both sides: 2 MiB pages.
    pt.map(2 * M2, 4 * M2, 2 * M2, Prot::RW).unwrap();
    assert_eq!(pt.page_size(2 * M2), Some(M2));
    assert_eq!(pt.page_size(4 * M2 - 1), Some(M2));
    // 1 GiB-aligned, 1 GiB long: one 1 GiB page.
    pt.map(4 * G1, 7 * G1, G1, Prot::READ).unwrap();
    assert_eq!(pt.page_size(4 * G1 + 12345), Some(G1));
    assert_eq!(pt.iova_to_phys(4 * G1 + 0x1234_5678), Some((7 * G1 + 0x1234_5678, Prot::READ)));
    // Ragged: 4 KiB up to the 2 MiB boundary, 2 MiB, then 4 KiB.
    let iova = 16 * G1 - 2 * K4;
    pt.map(iova, 32 * G1 - 2 * K4, 2 * K4 + M2 + K4, Prot::RW).unwrap();
    assert_eq!(pt.page_size(iova), Some(K4));
    assert_eq!(pt.page_size(16 * G1), Some(M2));
    assert_eq!(pt.page_size(16 * G1 + M2), Some(K4));
    assert_eq!(pt.page_size(16 * G1 + M2 + K4), None);
    // Same IOVA alignment but phys only 4 KiB aligned: all 4 KiB.
    pt.map(8 * G1, 0x1000, M2, Prot::RW).unwrap();
    assert_eq!(pt.page_size(8 * G1), Some(K4));
    assert_eq!(pt.page_size(8 * G1 + M2 - K4), Some(K4));
    check_accounting(&pt);
}

#[test]
fn page_size_limits_are_respected() {
    // No 1 GiB pages on the unit: 512 x 2 MiB.
    let mut pt =
        PageTable::new(VtdSecondStage::new(3).unwrap().with_large_pages(true, false), HeapTables::default()).unwrap();
    assert_eq!(pt.page_sizes(), K4 | M2);
    pt.map(G1, G1, G1, Prot::RW).unwrap();
    assert_eq!(pt.page_size(G1), Some(M2));
    // First stage without FS1GP likewise; with it, a 1 GiB page.
    let mut fs = PageTable::new(X86FirstStage::four_level(), HeapTables::default()).unwrap();
    fs.map(G1, G1, G1, Prot::RW).unwrap();
    assert_eq!(fs.page_size(G1), Some(M2));
    let mut fs = PageTable::new(X86FirstStage::four_level().with_1g_pages(true), HeapTables::default()).unwrap();
    fs.map(G1, G1, G1, Prot::RW).unwrap();
    assert_eq!(fs.page_size(G1), Some(G1));
    // Restricted by configuration (VFIO type1 emulation): 4 KiB only.
    let mut pt = ss(3);
    pt.set_page_sizes(K4);
    assert_eq!(pt.page_sizes(), K4);
    pt.map(0, 0, M2, Prot::RW).unwrap();
    assert_eq!(pt.page_size(0), Some(K4));
}

#[test]
fn table_memory_for_a_gib_of_small_pages() {
    // Full size on the host; a scaled-down run under Miri.
    let length = if cfg!(miri) { 8 * M2 } else { G1 };
    let mut pt = ss(4);
    pt.set_page_sizes(K4);
    pt.map(G1, 0x1_0000_0000, length, Prot::RW).unwrap();
    // One leaf table per 2 MiB, plus one table per level above.
    let leaf_tables = length / M2;
    assert_eq!(pt.table_count() as u64, leaf_tables + 3);
    let bytes = pt.table_bytes();
    assert_eq!(bytes, (leaf_tables + 3) * 4096);
    if !cfg!(miri) {
        assert!(bytes as f64 <= 2.012 * (1 << 20) as f64, "{bytes} bytes of tables");
    }
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(G1, length, &mut g), length);
    assert_eq!(g.freed_tables as u64, leaf_tables + 2);
    assert_eq!((g.start, g.last), (Some(G1), G1 + length - 1));
    assert_eq!(pt.table_count(), 1);
    assert_eq!(pt.release_deferred() as u64, leaf_tables + 2);
    assert_eq!(pt.memory().live_tables(), 1);
}

#[test]
fn large_pages_use_few_tables() {
    let mut pt = ss(4);
    pt.map(0, 0, 4 * G1, Prot::RW).unwrap();
    // Root + one level-2 table holding four 1 GiB leaves.
    assert_eq!(pt.table_count(), 2);
    pt.map(4 * G1, 0x20_0000, G1, Prot::RW).unwrap();
    // 2 MiB aligned phys: 512 x 2 MiB in one level-1 table.
    assert_eq!(pt.table_count(), 3);
    assert_eq!(pt.page_size(4 * G1 + 7 * M2), Some(M2));
    check_accounting(&pt);
}

#[test]
fn overlap_is_refused_and_nothing_changes() {
    let mut pt = ss(3);
    pt.map(0x10_0000, 0x8000_0000, 4 * K4, Prot::RW).unwrap();
    pt.map(4 * M2, 8 * M2, M2, Prot::READ).unwrap();
    let before = mappings(&pt);
    let tables = pt.table_count();
    // Overlap at the end of a longer range (unwinds what it mapped first).
    assert_eq!(pt.map(0, 0x9000_0000, 0x10_3000, Prot::RW), Err(Error::AlreadyMapped { iova: 0x10_0000 }));
    // Overlap with a large page, from below it.
    assert_eq!(pt.map(2 * M2, 0, 3 * M2, Prot::RW), Err(Error::AlreadyMapped { iova: 4 * M2 }));
    // A 1 GiB piece over a table with a mapping in it reports that mapping.
    assert_eq!(pt.map(0, 0, G1, Prot::RW), Err(Error::AlreadyMapped { iova: 0x10_0000 }));
    assert_eq!(mappings(&pt), before);
    pt.release_deferred();
    assert_eq!(pt.table_count(), tables);
    check_accounting(&pt);
}

#[test]
fn bad_arguments() {
    let mut pt = ss(3);
    let last = (1u64 << 39) - 1;
    assert_eq!(pt.aperture(), IovaRange::new(0, last));
    assert_eq!(pt.map(0x800, 0, K4, Prot::RW), Err(Error::BadRange { iova: 0x800, length: K4 }));
    assert_eq!(pt.map(0, 0, 0, Prot::RW), Err(Error::BadRange { iova: 0, length: 0 }));
    assert_eq!(pt.map(0, 0, 0x1800, Prot::RW), Err(Error::BadRange { iova: 0, length: 0x1800 }));
    assert_eq!(
        pt.map(last + 1 - K4, 0, 2 * K4, Prot::RW),
        Err(Error::BadRange { iova: last + 1 - K4, length: 2 * K4 })
    );
    assert!(matches!(pt.map(u64::MAX - 0xfff, 0, K4, Prot::RW), Err(Error::BadRange { .. })));
    assert_eq!(pt.map(0, 0x10, K4, Prot::RW), Err(Error::BadPhys { phys: 0x10, length: K4 }));
    assert_eq!(pt.map(0, 1 << 52, K4, Prot::RW), Err(Error::BadPhys { phys: 1 << 52, length: K4 }));
    assert_eq!(pt.map(0, u64::MAX - 0xfff, K4, Prot::RW), Err(Error::BadPhys { phys: u64::MAX - 0xfff, length: K4 }));
    assert_eq!(pt.map(0, 0, K4, Prot::NONE), Err(Error::BadProt { prot: Prot::NONE }));
    assert_eq!(pt.map(0, 0, K4, Prot::CACHE), Err(Error::BadProt { prot: Prot::CACHE }));
    // The last page of the aperture is fine.
    pt.map(last + 1 - K4, 0, K4, Prot::RW).unwrap();
    assert_eq!(pt.iova_to_phys(last), Some((0xfff, Prot::RW)));
    assert_eq!(pt.iova_to_phys(last + 1), None);
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(0x800, K4, &mut g), 0);
    assert!(matches!(pt.try_unmap(0, 0, &mut g), Err(PartialUnmap { unmapped: 0, .. })));
    assert!(g.is_empty());
    assert_eq!(pt.unmap(0, 1 << 39, &mut g), K4);
    assert!(pt.is_empty());
}

#[test]
fn partial_unmap_splits_large_pages() {
    let mut pt = ss(4);
    pt.map(G1, 3 * G1, G1, Prot::RW).unwrap();
    let mut g = IotlbGather::default();
    // One 4 KiB page out of the middle of a 1 GiB page.
    let hole = G1 + 5 * M2 + 3 * K4;
    assert_eq!(pt.unmap(hole, K4, &mut g), K4);
    // The IOTLB may hold the 1 GiB translation: the gather covers it.
    assert_eq!((g.start, g.last), (Some(G1), 2 * G1 - 1));
    assert_eq!(g.freed_tables, 0);
    assert_eq!(pt.iova_to_phys(hole), None);
    assert_eq!(pt.page_size(hole - K4), Some(K4));
    assert_eq!(pt.page_size(hole + K4), Some(K4));
    assert_eq!(pt.page_size(G1), Some(M2));
    assert_eq!(pt.page_size(2 * G1 - 1), Some(M2));
    for probe in [G1, hole - K4, hole + K4, hole + M2, 2 * G1 - 1] {
        assert_eq!(pt.iova_to_phys(probe), Some((probe + 2 * G1, Prot::RW)), "{probe:#x}");
    }
    // Root, level 2, the split 1 GiB (level 1) and the split 2 MiB (level 0).
    assert_eq!(pt.table_count(), 4);
    check_accounting(&pt);
    // An unmap straddling the split region and the next 2 MiB pages.
    assert_eq!(pt.unmap(G1 + 5 * M2 + M2 - K4, 2 * M2, &mut g), 2 * M2);
    assert_eq!(pt.page_size(G1 + 8 * M2 - K4), Some(K4));
    assert_eq!(pt.page_size(G1 + 8 * M2 - 2 * K4), None);
    assert_eq!(pt.iova_to_phys(G1 + 8 * M2 - K4), Some((3 * G1 + 8 * M2 - K4, Prot::RW)));
    check_accounting(&pt);
    // Everything else.
    let rest = G1 - K4 - 2 * M2;
    assert_eq!(pt.unmap(0, 4 * G1, &mut g), rest);
    assert!(pt.is_empty());
    assert_eq!(pt.table_count(), 1);
    assert_eq!(pt.release_deferred(), 4);
    assert_eq!(pt.memory().live_tables(), 1);
}

#[test]
fn split_failure_leaves_the_page_translating() {
    let mut pt = ss(4);
    pt.map(0, 0x5000_0000, 4 * K4, Prot::RW).unwrap();
    pt.map(G1, 3 * G1, G1, Prot::READ).unwrap();
    let before = mappings(&pt);
    let mut g = IotlbGather::default();
    // Range covers the small pages and part of the 1 GiB page; the first
    // split fails: the small pages go, the large page stays whole.
    pt.memory_mut().fail_nth_alloc(Some(1));
    let r = pt.try_unmap(0, G1 + M2, &mut g);
    assert_eq!(r, Err(PartialUnmap { unmapped: 4 * K4, iova: G1, error: Error::NoMemory { iova: G1, level: 1 } }));
    assert_eq!(mappings(&pt), before[4..]);
    assert_eq!((g.start, g.last), (Some(0), 4 * K4 - 1));
    check_accounting(&pt);
    // Second-level split fails: the 1 GiB page is now 2 MiB pages that
    // translate the same, nothing is unmapped.
    pt.memory_mut().fail_nth_alloc(Some(2));
    let r = pt.try_unmap(G1 + K4, K4, &mut g);
    assert_eq!(r.unwrap_err().unmapped, 0);
    for probe in [G1, G1 + K4, G1 + M2 + 77, 2 * G1 - 1] {
        assert_eq!(pt.iova_to_phys(probe), Some((probe + 2 * G1, Prot::READ)));
    }
    check_accounting(&pt);
    // With memory, the same unmap works.
    assert_eq!(pt.unmap(G1 + K4, K4, &mut g), K4);
    assert_eq!(pt.iova_to_phys(G1 + K4), None);
    assert_eq!(pt.iova_to_phys(G1), Some((3 * G1, Prot::READ)));
    check_accounting(&pt);
}

/// Fail the 1st, 2nd, ... table allocation of a map that needs several:
/// each time the mappings are unchanged and, after the sync, so is memory.
#[test]
fn map_fault_injection_sweep() {
    let formats = [VtdSecondStage::new(4).unwrap(), VtdSecondStage::new(3).unwrap().with_large_pages(false, false)];
    // Under Miri one format, non-coherent (the slower path), is enough.
    let formats = if cfg!(miri) { &formats[..1] } else { &formats[..] };
    let coherence: &[bool] = if cfg!(miri) { &[false] } else { &[true, false] };
    for &format in formats {
        for &coherent in coherence {
            let mut d = PagingDomain::new(format, HeapTables::new(coherent), RecordingInvalidator::default()).unwrap();
            d.map(5 * G1 + M2, 0x4000_0000, 4 * K4, Prot::RW).unwrap();
            d.map(6 * G1, 0, M2, Prot::READ).unwrap();
            let before = mappings(d.table());
            let live = d.table().memory().live_tables();
            // 4 KiB pieces at both ends, 2 MiB and 1 GiB in the middle,
            // crossing several tables at every level.
            let (iova, len) = (G1 - 3 * K4, G1 + 4 * M2);
            let mut n = 1;
            loop {
                d.table_mut().memory_mut().fail_nth_alloc(Some(n));
                let attempts = d.table().memory().alloc_attempts();
                match d.map(iova, 0x10_0000_0000 + iova, len, Prot::RW) {
                    Ok(()) => break,
                    Err(e) => assert_eq!(e, DomainError::NoMemory),
                }
                assert_eq!(d.table().memory().alloc_attempts(), attempts + n, "stopped at the failure");
                assert_eq!(mappings(d.table()), before, "n = {n}");
                d.table().check_invariants().unwrap();
                assert_eq!(d.table().deferred_count(), 0, "released by the failed map");
                assert_eq!(d.table().memory().live_tables(), live, "n = {n}: leaked tables");
                let inv = d.invalidator_mut().invalidations.pop();
                assert_eq!(inv.map(|(s, l, _)| (s, l)), Some((iova, iova + len - 1)));
                n += 1;
            }
            assert!(n > 4, "the sweep covered several allocations ({n})");
            d.table_mut().memory_mut().fail_nth_alloc(None);
            assert_eq!(d.iova_to_phys(iova), Some(0x10_0000_0000 + iova));
            assert_eq!(d.iova_to_phys(iova + len - 1), Some(0x10_0000_0000 + iova + len - 1));
        }
    }
}

/// Lines whose bytes differ between two sets of table snapshots.
fn changed_lines(before: &BTreeMap<u64, [u64; 512]>, after: &BTreeMap<u64, [u64; 512]>) -> BTreeSet<u64> {
    let zero = [0u64; 512];
    let mut lines = BTreeSet::new();
    for (&t, now) in after {
        let old = before.get(&t).unwrap_or(&zero);
        for i in 0..512 {
            if old[i] != now[i] {
                lines.insert(t + (i as u64 / 8) * 64);
            }
        }
    }
    lines
}

fn snapshot(mem: &HeapTables) -> BTreeMap<u64, [u64; 512]> {
    mem.live_addresses().into_iter().map(|t| (t, mem.snapshot(t))).collect()
}

#[test]
fn non_coherent_flushes_each_changed_line_once() {
    let mut pt = PageTable::new(VtdSecondStage::new(4).unwrap(), HeapTables::new(false)).unwrap();
    pt.memory_mut().record_flushes(true);
    let cases: [(u64, u64, u64); 5] = [
        (0, 0, K4),
        (G1 - 5 * K4, 0x7000_0000 - 5 * K4, 4 * M2 + 9 * K4), // ragged, crosses 1 GiB
        (3 * G1, 0, G1),                                      // one 1 GiB leaf
        (8 * G1 + 3 * K4, 0x1000, 3 * M2),                    // 1.5 k small pages
        (512 * G1 - M2, 0, 2 * M2),                           // crosses a level-3 entry
    ];
    for (iova, phys, len) in cases {
        let before = snapshot(pt.memory());
        pt.memory_mut().take_flush_log();
        let calls = pt.memory().flush_stats().0;
        pt.map(iova, phys, len, Prot::RW).unwrap();
        let changed = changed_lines(&before, &snapshot(pt.memory()));
        let log = pt.memory_mut().take_flush_log();
        assert_eq!(log.keys().copied().collect::<BTreeSet<_>>(), changed, "map {iova:#x}+{len:#x}");
        assert!(log.values().all(|&n| n == 1), "a line flushed twice in map {iova:#x}+{len:#x}");
        // Adjacent lines go out in one call.
        assert!(pt.memory().flush_stats().0 - calls <= changed.len() as u64);
    }
    // Unmap without splits: the same holds (freed tables are not flushed).
    for (iova, _, len) in cases {
        let before = snapshot(pt.memory());
        pt.memory_mut().take_flush_log();
        let mut g = IotlbGather::default();
        assert_eq!(pt.unmap(iova, len, &mut g), len);
        let changed = changed_lines(&before, &snapshot(pt.memory()));
        let log = pt.memory_mut().take_flush_log();
        for line in &changed {
            assert_eq!(log.get(line), Some(&1), "line {line:#x} in unmap {iova:#x}+{len:#x}");
        }
        assert!(log.keys().all(|l| changed.contains(l) || pt.memory().is_live(*l & !0xfff)));
    }
    // A coherent walker gets no flushes at all.
    let mut pt = ss(4);
    pt.map(0, 0, G1 + K4, Prot::RW).unwrap();
    assert_eq!(pt.memory().flush_stats(), (0, 0));
}

#[test]
fn split_table_is_flushed_before_it_is_linked() {
    let mut pt = PageTable::new(VtdSecondStage::new(3).unwrap(), HeapTables::new(false)).unwrap();
    pt.map(0, 0, M2, Prot::RW).unwrap();
    pt.memory_mut().record_flushes(true);
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(K4, K4, &mut g), K4);
    let log = pt.memory_mut().take_flush_log();
    let split = pt.walk(0)[1].raw & SS_ADDR_MASK;
    // All 64 lines of the new table, the changed line of it once more, and
    // the parent's line.
    assert_eq!(log.keys().filter(|l| *l & !0xfff == split).count(), 64);
    assert_eq!(log[&split], 2);
    assert_eq!(log.len(), 65);
}

#[test]
fn domain_defers_frees_until_sync() {
    let format = VtdSecondStage::new(3).unwrap().with_snoop_control(true);
    let mut d = PagingDomain::new(format, HeapTables::default(), RecordingInvalidator::default()).unwrap();
    let dom: &mut dyn IommuDomain = &mut d;
    assert_eq!(dom.page_sizes(), K4 | M2 | G1);
    assert_eq!(dom.granule(), K4);
    assert_eq!(dom.aperture(), IovaRange::new(0, (1 << 39) - 1));
    assert!(dom.enforce_cache_coherency());
    dom.attach_device(DeviceHandle::Opaque(7)).unwrap();
    dom.map(0x10_0000, 0x20_0000, 3 * K4, Prot::RW).unwrap();
    assert_eq!(dom.iova_to_phys(0x10_1234), Some(0x20_1234));
    assert_eq!(dom.map(0x10_0000, 0, K4, Prot::RW), Err(DomainError::AlreadyMapped { iova: 0x10_0000 }));
    let mut g = IotlbGather::default();
    assert_eq!(dom.unmap(0, M2, &mut g), 3 * K4);
    assert_eq!(g.freed_tables, 2);
    assert_eq!(d.table().memory().live_tables(), 3, "freed tables wait for the sync");
    d.iotlb_sync(&mut g).unwrap();
    assert!(g.is_empty());
    assert_eq!(d.table().memory().live_tables(), 1);
    assert_eq!(d.invalidator().invalidations.last(), Some(&(0x10_0000, 0x10_2fff, true)));
    // Forced snooping shows in the leaves.
    d.map(0, 0, K4, Prot::READ).unwrap();
    assert_eq!(d.table().walk(0)[2].raw, 0x801);
    assert_eq!(d.table().iova_to_phys(0), Some((0, Prot::READ | Prot::CACHE)));
    assert_eq!(d.devices(), [DeviceHandle::Opaque(7)]);
    d.detach_device(DeviceHandle::Opaque(7)).unwrap();
    assert!(d.devices().is_empty());
    // Snooping cannot be forced late, nor on a format without SNP.
    let mut d = PagingDomain::new(
        VtdSecondStage::new(3).unwrap().with_snoop_control(true),
        HeapTables::default(),
        NoInvalidator,
    )
    .unwrap();
    d.map(0, 0, K4, Prot::RW).unwrap();
    assert!(!d.enforce_cache_coherency());
    let mut d = PagingDomain::new(X86FirstStage::four_level(), HeapTables::default(), NoInvalidator).unwrap();
    assert!(!d.enforce_cache_coherency());
}

/// A memory whose page count outlives the table, to see Drop free it all.
struct Shared(HeapTables, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl TableMemory for Shared {
    fn alloc_table(&mut self) -> Option<u64> {
        let t = self.0.alloc_table();
        self.1.store(self.0.live_tables(), std::sync::atomic::Ordering::Relaxed);
        t
    }
    fn free_table(&mut self, table: u64) {
        self.0.free_table(table);
        self.1.store(self.0.live_tables(), std::sync::atomic::Ordering::Relaxed);
    }
    fn read(&self, table: u64, index: usize) -> u64 {
        self.0.read(table, index)
    }
    fn write(&mut self, table: u64, index: usize, value: u64) {
        self.0.write(table, index, value)
    }
    fn coherent(&self) -> bool {
        true
    }
    fn flush(&mut self, phys: u64, len: u64) {
        self.0.flush(phys, len)
    }
}

#[test]
fn drop_frees_every_table() {
    let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pt = PageTable::new(VtdSecondStage::new(4).unwrap(), Shared(HeapTables::default(), live.clone())).unwrap();
    pt.map(0, 0x1000, 4 * M2, Prot::RW).unwrap();
    pt.map(5 * G1, 0, G1, Prot::RW).unwrap();
    let mut g = IotlbGather::default();
    pt.unmap(0, M2, &mut g);
    assert!(pt.deferred_count() > 0);
    assert!(live.load(std::sync::atomic::Ordering::Relaxed) > 4);
    drop(pt);
    assert_eq!(live.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn phys_runs_cover_whole_leaves_and_contiguous_neighbours() {
    let mut pt = ss(4);
    // Two contiguous 2 MiB pages, then a 4 KiB page elsewhere.
    pt.map(0x4000_0000, 0x1_0000_0000, 0x40_0000, Prot::RW).unwrap();
    pt.map(0x4040_0000, 0x2_0000_0000, 0x1000, Prot::READ).unwrap();
    assert_eq!(pt.phys_run(0x4000_1000, u64::MAX), Some(PhysRun::new(0x1_0000_1000, 0x3f_f000)));
    assert_eq!(pt.phys_run(0x4000_1000, 0x2000), Some(PhysRun::new(0x1_0000_1000, 0x2000)));
    assert_eq!(pt.phys_run(0x4020_0000, u64::MAX), Some(PhysRun::new(0x1_0020_0000, 0x20_0000)));
    assert_eq!(pt.phys_run(0x4040_0800, u64::MAX), Some(PhysRun::new(0x2_0000_0800, 0x800)));
    assert_eq!(pt.phys_run(0x4040_1000, u64::MAX), None);
    assert_eq!(pt.phys_run(0x4000_0000, 0), None);
    // Contiguous 4 KiB leaves join; a gap in the physical addresses ends the run.
    pt.map(0x8000_0000, 0x3_0000_0000, 0x3000, Prot::RW).unwrap();
    pt.map(0x8000_3000, 0x3_0000_4000, 0x1000, Prot::RW).unwrap();
    assert_eq!(pt.phys_run(0x8000_0000, u64::MAX), Some(PhysRun::new(0x3_0000_0000, 0x3000)));
    let d = PagingDomain::new(VtdSecondStage::new(4).unwrap(), HeapTables::default(), NoInvalidator).unwrap();
    assert_eq!(d.iova_to_phys_run(0, 0x1000), None);
}

#[test]
fn map_runs_maps_scattered_pieces_all_or_nothing() {
    let mut pt = ss(4);
    // 4 KiB, then 2 MiB (IOVA 2 MiB aligned: one large page), then 8 KiB.
    let runs = [
        PhysRun::new(0x1_0000_0000, 0x1000),
        PhysRun::new(0x2_0000_0000, 0x20_0000),
        PhysRun::new(0x3_0000_5000, 0x2000),
    ];
    pt.map_runs(0x1f_f000, &runs, Prot::RW).unwrap();
    assert_eq!(pt.iova_to_phys(0x1f_f000), Some((0x1_0000_0000, Prot::RW)));
    assert_eq!(pt.page_size(0x20_0000), Some(0x20_0000));
    assert_eq!(pt.iova_to_phys(0x3f_ffff), Some((0x2_001f_ffff, Prot::RW)));
    assert_eq!(pt.iova_to_phys(0x40_1fff), Some((0x3_0000_6fff, Prot::RW)));
    assert_eq!(pt.iova_to_phys(0x40_2000), None);
    // A later piece runs into a mapping: the earlier pieces are unwound.
    pt.map(0x400_0000, 0x9_0000_0000, 0x1000, Prot::RW).unwrap();
    let tables = pt.table_count();
    assert_eq!(
        pt.map_runs(0x3ff_e000, &[PhysRun::new(0xb_0000_0000, 0x1000), PhysRun::new(0xc_0000_0000, 0x2000)], Prot::RW),
        Err(Error::AlreadyMapped { iova: 0x400_0000 })
    );
    assert_eq!(pt.iova_to_phys(0x3ff_e000), None, "the first piece was unwound");
    assert_eq!(pt.table_count(), tables);
    // Bad pieces and prot are refused before anything is written.
    assert_eq!(
        pt.map_runs(
            0x500_0000,
            &[PhysRun::new(0x1000, 0x1000), PhysRun::new(0x2000, 0x800), PhysRun::new(0x3000, 0x800)],
            Prot::RW
        ),
        Err(Error::BadRange { iova: 0x500_1000, length: 0x800 })
    );
    assert_eq!(pt.map_runs(0x500_0000, &[], Prot::RW), Err(Error::BadRange { iova: 0x500_0000, length: 0 }));
    assert!(matches!(pt.map_runs(0x500_0000, &[PhysRun::new(0x1000, 0x1000)], Prot::NONE), Err(Error::BadProt { .. })));
    assert_eq!(pt.iova_to_phys(0x500_0000), None);
    pt.check_invariants().unwrap();
}

#[test]
fn phys_runs_read_a_range_back_in_few_runs() {
    let mut pt = ss(4);
    // 4 KiB pages: two contiguous, then one elsewhere, then a 2 MiB page
    // continuing nothing, then a hole.
    pt.map(0x1f_d000, 0x5000, 0x2000, Prot::RW).unwrap();
    pt.map(0x1f_f000, 0x9000, 0x1000, Prot::RW).unwrap();
    pt.map(0x20_0000, 0x40_0000, 0x20_0000, Prot::RW).unwrap();
    let mut out = [PhysRun::default(); 8];
    assert_eq!(pt.phys_runs(0x1f_d800, 0x40_0000, &mut out), (3, 0x20_2800));
    assert_eq!(
        out[..3],
        [PhysRun::new(0x5800, 0x1800), PhysRun::new(0x9000, 0x1000), PhysRun::new(0x40_0000, 0x20_0000)]
    );
    // Stops when the output is full, and after `length` bytes.
    let mut one = [PhysRun::default(); 1];
    assert_eq!(pt.phys_runs(0x1f_d000, 0x40_0000, &mut one), (1, 0x2000));
    assert_eq!(pt.phys_runs(0x20_1000, 0x3000, &mut out), (1, 0x3000));
    assert_eq!(out[0], PhysRun::new(0x40_1000, 0x3000));
    assert_eq!(pt.phys_runs(0x40_0000, 0x1000, &mut out), (0, 0));
    // Through the domain.
    let mut d = PagingDomain::new(VtdSecondStage::new(4).unwrap(), HeapTables::default(), NoInvalidator).unwrap();
    d.map(0x1f_d000, 0x5000, 0x2000, Prot::RW).unwrap();
    d.map(0x1f_f000, 0x9000, 0x1000, Prot::RW).unwrap();
    let mut runs = [PhysRun::default(); 4];
    assert_eq!(d.iova_to_phys_runs(0x1f_d800, 0x10_0000, &mut runs), (2, 0x2800));
    assert_eq!(runs[..2], [PhysRun::new(0x5800, 0x1800), PhysRun::new(0x9000, 0x1000)]);
}

#[test]
fn map_runs_of_scattered_pages_across_tables_and_their_unwind() {
    let mut pt = ss(4);
    let scattered =
        |n: u64| -> Vec<PhysRun> { (0..n).map(|k| PhysRun::new(0x10_0000_0000 + k * 0x3000, 0x1000)).collect() };
    // 1500 single pages from 3 pages before a 2 MiB boundary: three leaf tables.
    let iova = 0x4000_0000 - 0x3000;
    pt.map_runs(iova, &scattered(1500), Prot::RW).unwrap();
    for k in 0..1500 {
        assert_eq!(pt.iova_to_phys(iova + k * 0x1000), Some((0x10_0000_0000 + k * 0x3000, Prot::RW)));
    }
    assert_eq!(pt.iova_to_phys(iova + 1500 * 0x1000), None);
    pt.check_invariants().unwrap();
    // A second call whose pieces run into the first mapping half way
    // through a leaf table: nothing of it stays, tables included.
    let tables = pt.table_count();
    let start = iova - 700 * 0x1000;
    assert_eq!(pt.map_runs(start, &scattered(800), Prot::READ), Err(Error::AlreadyMapped { iova }));
    for k in 0..700 {
        assert_eq!(pt.iova_to_phys(start + k * 0x1000), None);
    }
    assert_eq!(pt.table_count(), tables);
    // Mixed: single pages, then a 2 MiB piece, then single pages again.
    let mut runs = scattered(3);
    runs.push(PhysRun::new(0x20_0000_0000, 0x20_0000));
    runs.extend(scattered(2));
    let at = 0x8000_0000 - 0x3000;
    pt.map_runs(at, &runs, Prot::RW).unwrap();
    assert_eq!(pt.page_size(0x8000_0000), Some(0x20_0000));
    assert_eq!(pt.iova_to_phys(0x8020_1000), Some((0x10_0000_3000, Prot::RW)));
    pt.check_invariants().unwrap();
}

/// A format offering 1 GiB but not 2 MiB leaves gets 4 KiB pages only:
/// splitting a 1 GiB leaf would need the 2 MiB leaves it may not use.
#[test]
fn large_pages_only_with_every_smaller_size() {
    let f = VtdSecondStage::new(4).unwrap().with_large_pages(false, true);
    let mut pt = PageTable::new(f, HeapTables::default()).unwrap();
    assert_eq!(pt.page_sizes(), 4096);
    pt.map(1 << 30, 1 << 30, 1 << 30, Prot::RW).unwrap();
    assert_eq!(pt.page_size(1 << 30), Some(4096));
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap((1 << 30) + (5 << 21), 4096, &mut g), 4096);
    pt.check_invariants().unwrap();
    pt.set_page_sizes(1 << 30);
    assert_eq!(pt.page_sizes(), 4096, "set_page_sizes keeps the rule");
}

/// An invalidator that fails while `fail` is set.
#[derive(Default)]
struct FlakyInvalidator {
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calls: Vec<(u64, u64, bool)>,
}

impl Invalidator for FlakyInvalidator {
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        self.calls.push((start, last, tables_freed));
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(DomainError::Hardware {
                unit: 0xfed9_0000,
                cause: portcullis_iommu::HwError::Timeout { register: "test", waited_ns: 1 },
            });
        }
        Ok(())
    }
}

/// A failed invalidation is reported by the sync, keeps the tables the
/// unmap unlinked (the walker may hold them), and makes the domain refuse
/// maps until a full invalidation succeeds.
#[test]
fn failed_invalidation_keeps_tables_and_blocks_maps_until_recovered() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inv = FlakyInvalidator { fail: fail.clone(), calls: Vec::new() };
    let mut d = PagingDomain::new(VtdSecondStage::new(3).unwrap(), HeapTables::default(), inv).unwrap();
    d.map(0x10_0000, 0x20_0000, 3 * K4, Prot::RW).unwrap();
    let tables = d.table().memory().live_tables();
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut g = IotlbGather::default();
    assert_eq!(d.unmap(0, M2, &mut g), 3 * K4);
    assert!(matches!(d.iotlb_sync(&mut g), Err(DomainError::Hardware { unit: 0xfed9_0000, .. })));
    assert!(d.needs_recovery());
    assert_eq!(d.table().memory().live_tables(), tables, "unlinked tables are kept after a failed sync");
    assert_eq!(d.map(0x40_0000, 0, K4, Prot::RW), Err(DomainError::NeedsRecovery));
    assert_eq!(d.recover().map_err(|_| ()), Err(()), "recovery fails while the unit does");
    fail.store(false, std::sync::atomic::Ordering::Relaxed);
    d.recover().unwrap();
    assert_eq!(d.invalidator().calls.last(), Some(&(0, (1 << 39) - 1, true)), "recovery invalidates everything");
    assert_eq!(d.table().memory().live_tables(), 1, "tables freed once the unit is clean");
    d.map(0x40_0000, 0, K4, Prot::RW).unwrap();
}
