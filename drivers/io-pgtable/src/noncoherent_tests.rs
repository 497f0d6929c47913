//! The engine on a walker that does not snoop (VT-d ECAP.C = 0), through
//! `NonCoherentTables`: after every map, unmap, split and sync, a test
//! walker reading only what was flushed must translate every IOVA exactly
//! as the CPU view does. And a table memory that breaks the contract by not
//! flushing the zeroes of fresh tables must be caught: its walker reads
//! poison.

use alloc::vec::Vec;

use portcullis_iommu::IotlbGather;

use crate::*;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

/// A leaf as a walk finds it: `(iova, size, phys, prot)`.
type Leaf = (u64, u64, u64, Prot);

/// Translates `iova` the way the hardware does, reading only the walker
/// view: root to leaf, decoding each entry with the format.
fn walk<F: PtFormat>(pt: &PageTable<F, NonCoherentTables>, iova: u64) -> Result<Option<(u64, Prot)>, WalkerFault> {
    let (format, mem) = (pt.format(), pt.memory());
    let geo = format.geometry();
    if iova > geo.aperture_last() {
        return Ok(None);
    }
    let mut table = pt.root();
    let mut level = geo.top_level();
    loop {
        let e = mem.walker_read(table, geo.index(iova, level))?;
        if !format.is_present(e) {
            return Ok(None);
        }
        if format.is_leaf(e, level) {
            let offset = iova & (geo.level_size(level) - 1);
            return Ok(Some((format.leaf_address(e, level) + offset, format.leaf_prot(e))));
        }
        table = format.table_address(e);
        level -= 1;
    }
}

/// Every leaf the walker can reach, in IOVA order, reading every entry of
/// every table it reaches (so every line of them must be flushed).
fn walker_leaves<F: PtFormat>(pt: &PageTable<F, NonCoherentTables>) -> Result<Vec<Leaf>, WalkerFault> {
    fn visit<F: PtFormat>(
        format: &F,
        mem: &NonCoherentTables,
        table: u64,
        level: u32,
        base: u64,
        out: &mut Vec<Leaf>,
    ) -> Result<(), WalkerFault> {
        let size = format.geometry().level_size(level);
        for i in 0..ENTRIES {
            let e = mem.walker_read(table, i)?;
            if !format.is_present(e) {
                continue;
            }
            let iova = base + i as u64 * size;
            if format.is_leaf(e, level) {
                out.push((iova, size, format.leaf_address(e, level), format.leaf_prot(e)));
            } else {
                visit(format, mem, format.table_address(e), level - 1, iova, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(pt.format(), pt.memory(), pt.root(), pt.format().geometry().top_level(), 0, &mut out)?;
    Ok(out)
}

/// The CPU view's leaves (what the engine itself reads).
fn cpu_leaves<F: PtFormat>(pt: &PageTable<F, NonCoherentTables>) -> Vec<Leaf> {
    let mut v = Vec::new();
    pt.for_each_mapping(|iova, size, phys, prot| v.push((iova, size, phys, prot)));
    v
}

/// The walker view translates exactly like the CPU view: the same leaves
/// over the whole tree, and the same answer for single walks of every
/// 4 KiB page of the `windows` (where the scenario splits and unlinks
/// tables), every 2 MiB across the first `span` bytes, and the first,
/// middle and last page of every leaf. Then no line of any live table may
/// be left unflushed.
fn check<F: PtFormat>(pt: &PageTable<F, NonCoherentTables>, windows: &[u64], span: u64) -> Result<(), WalkerFault> {
    let leaves = walker_leaves(pt)?;
    assert_eq!(leaves, cpu_leaves(pt), "walker and CPU views hold different leaves");
    // Miri walks a sample of the pages.
    let (page_step, span_step) = if cfg!(miri) { (64 * K4, 256 * M2) } else { (K4, M2) };
    let mut iovas: Vec<u64> = Vec::new();
    for &w in windows {
        iovas.extend((0..M2 / page_step).map(|k| w + k * page_step));
    }
    iovas.extend((0..span / span_step).map(|k| k * span_step + 0x234));
    for &(iova, size, _, _) in &leaves {
        iovas.extend([iova, iova + size / 2 + 0x18, iova + size - 8]);
    }
    for iova in iovas {
        assert_eq!(walk(pt, iova)?, pt.iova_to_phys(iova), "walk of {iova:#x}");
    }
    assert_eq!(pt.memory().unflushed_lines(), [], "lines changed and not flushed");
    Ok(())
}

/// Maps, unmaps, splits (1 GiB → 2 MiB → 4 KiB, and 2 MiB → 4 KiB),
/// empties tables, syncs (the freed tables come back fresh) and maps at
/// the top of the aperture, checking the walker after every step. Returns
/// the first fault the walker meets.
fn scenario<F: PtFormat>(format: F, mem: NonCoherentTables) -> Result<(), WalkerFault> {
    let mut pt = PageTable::new(format, mem).unwrap();
    assert_eq!(pt.page_sizes(), K4 | M2 | G1, "the scenario wants every page size");
    let mut gather = IotlbGather::default();
    let small = 4 * G1 + 64 * M2;
    let windows = [G1 + M2, 4 * G1 + 3 * M2, small];
    let span = 8 * G1;

    // A 1 GiB leaf, three 2 MiB leaves, and 4 KiB leaves spread over the
    // lines of one leaf table.
    pt.map(G1, 8 * G1, G1, Prot::RW).unwrap();
    pt.map(4 * G1 + 2 * M2, 16 * G1, 3 * M2, Prot::READ).unwrap();
    for (k, slot) in [0u64, 9, 100, 101, 511].into_iter().enumerate() {
        let prot = if k % 2 == 0 { Prot::RW } else { Prot::READ };
        pt.map(small + slot * K4, 0x4000_0000 + k as u64 * 0x7000, K4, prot).unwrap();
    }
    check(&pt, &windows, span)?;

    // One 4 KiB page out of the 1 GiB leaf: it becomes 2 MiB leaves, one
    // of which becomes 4 KiB leaves (both split tables are fresh).
    assert_eq!(pt.unmap(G1 + M2 + 2 * K4, K4, &mut gather), K4);
    assert_eq!(pt.page_size(G1), Some(M2));
    assert_eq!(pt.page_size(G1 + M2), Some(K4));
    check(&pt, &windows, span)?;

    // The middle 1 MiB of the last 2 MiB leaf.
    assert_eq!(pt.unmap(4 * G1 + 3 * M2 + 256 * K4, 256 * K4, &mut gather), 256 * K4);
    check(&pt, &windows, span)?;

    // Empty the 4 KiB table: it is unlinked (one line of its parent
    // changes), then freed at the sync.
    assert_eq!(pt.unmap(small, M2, &mut gather), 5 * K4);
    check(&pt, &windows, span)?;
    assert!(pt.release_deferred() > 0);
    check(&pt, &windows, span)?;

    // Mapping there again allocates a table (the freed one, reused): its
    // zeroes must reach the walker again.
    pt.map(small + 300 * K4, 0x5000_0000, 2 * K4, Prot::RW).unwrap();
    check(&pt, &windows, span)?;

    // A run of pages into another leaf table that the remembered walk's
    // level-1 table links (the run fast path): the hole made above.
    pt.map(4 * G1 + 3 * M2 + 256 * K4, 0x5200_0000, 16 * K4, Prot::RW).unwrap();
    check(&pt, &windows, span)?;

    // Single pages through the remembered walk (the one-page fast paths):
    // a map beside those two, then each page unmapped alone; the last
    // empties the leaf table, which is unlinked as above.
    pt.map(small + 302 * K4, 0x5100_0000, K4, Prot::READ).unwrap();
    check(&pt, &windows, span)?;
    let tables = pt.table_count();
    for slot in [301, 300, 302] {
        assert_eq!(pt.unmap(small + slot * K4, K4, &mut gather), K4);
        check(&pt, &windows, span)?;
    }
    assert_eq!(pt.page_size(small + 300 * K4), None);
    assert_eq!(pt.table_count(), tables - 1, "the emptied leaf table is unlinked");

    // The top of the aperture, far from everything else: a new table at
    // every level below the root.
    let last = pt.aperture().last;
    let top = (last - 2 * M2) & !(M2 - 1);
    pt.map(top, 0x6000_0000, M2, Prot::RW).unwrap();
    pt.map(top + M2, 0x7000_0000, K4, Prot::READ).unwrap();
    check(&pt, &windows, span)?;
    for iova in [top, top + M2 - K4, top + M2, top + M2 + K4] {
        assert_eq!(walk(&pt, iova)?, pt.iova_to_phys(iova), "walk of {iova:#x}");
    }

    // Everything away; only the root is left, and it is all zero.
    pt.unmap(0, span, &mut gather);
    pt.unmap(top, 2 * M2, &mut gather);
    pt.release_deferred();
    assert!(pt.is_empty());
    assert_eq!(pt.table_count(), 1);
    check(&pt, &windows, span)?;
    assert_eq!(pt.memory().cpu().live_tables(), 1);
    Ok(())
}

fn vtd(levels: u32) -> VtdSecondStage {
    VtdSecondStage::new(levels).unwrap()
}

#[test]
fn vtd_second_stage_walker_sees_every_change() {
    let levels = if cfg!(miri) { 4..=4 } else { 3..=5 };
    for levels in levels {
        let mem = NonCoherentTables::new();
        assert_eq!(scenario(vtd(levels), mem), Ok(()), "{levels} levels");
    }
}

#[test]
#[cfg_attr(miri, ignore = "the same engine paths as the VT-d run")]
fn other_formats_walker_sees_every_change() {
    scenario(X86FirstStage::four_level().with_1g_pages(true), NonCoherentTables::new()).unwrap();
    scenario(X86FirstStage::five_level().with_1g_pages(true), NonCoherentTables::new()).unwrap();
    for levels in [3, 4, 6] {
        scenario(AmdV1::new(levels).unwrap(), NonCoherentTables::new()).unwrap();
    }
}

#[test]
fn allocation_flushes_are_counted() {
    let mut pt = PageTable::new(vtd(4), NonCoherentTables::new()).unwrap();
    pt.map(G1, 0, K4, Prot::RW).unwrap();
    // Root, and a table at levels 2, 1 and 0, each flushed once when
    // allocated; the engine flushed the one changed line of each.
    assert_eq!(pt.memory().alloc_flushes(), 4);
    assert_eq!(pt.memory().cpu().flush_stats(), (4, 4 * 64));
}

#[test]
fn unflushed_zeroes_of_fresh_tables_are_caught() {
    for levels in 3..=5 {
        let fault = scenario(vtd(levels), NonCoherentTables::without_alloc_flush()).unwrap_err();
        // The walker read an entry the CPU holds as zero and saw poison.
        assert!(matches!(fault, WalkerFault::Stale { walker: WALKER_POISON, cpu: 0, .. }), "{levels} levels: {fault}");
    }
}

#[test]
fn what_the_missing_flush_does_to_a_walk() {
    let mut pt = PageTable::new(vtd(4), NonCoherentTables::without_alloc_flush()).unwrap();
    pt.map(G1 + 9 * K4, 0x4000_0000, K4, Prot::RW).unwrap();
    // The walk of the page mapped reads only lines the engine flushed, so
    // it works: a test of mapped pages alone would not notice.
    assert_eq!(walk(&pt, G1 + 9 * K4), Ok(Some((0x4000_0000, Prot::RW))));
    assert_eq!(pt.memory().alloc_flushes(), 0);
    // Its neighbour in another line of the same fresh leaf table is
    // unmapped, but the walker finds poison there, present in the format:
    // the device's DMA would go to a garbage address instead of faulting.
    let neighbour = G1 + 16 * K4;
    assert_eq!(pt.iova_to_phys(neighbour), None);
    let fault = walk(&pt, neighbour).unwrap_err();
    let leaf_table = pt.walk(neighbour)[3].table;
    assert_eq!(fault, WalkerFault::Stale { table: leaf_table, index: 16, walker: WALKER_POISON, cpu: 0 });
    assert!(pt.format().is_present(WALKER_POISON));
    // So does an IOVA in another line of the root.
    assert!(matches!(walk(&pt, 100 * (1 << 39)), Err(WalkerFault::Stale { walker: WALKER_POISON, .. })));
    // Every line the engine did not write is left unflushed: 63 in each
    // of the four tables.
    assert_eq!(pt.memory().unflushed_lines().len(), 4 * 63);
}
