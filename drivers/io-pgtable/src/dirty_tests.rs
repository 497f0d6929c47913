//! Dirty tracking in the engine: the walker's part is played by
//! `PageTable::mark_dirty`, which sets the format's dirty bit in the leaf
//! translating an IOVA, as a unit with SSADE (VT-d) or HAD = 11b (AMD)
//! does on a write. QEMU 10 emulates neither, so this is the model.

use alloc::vec::Vec;

use portcullis_iommu::{DomainError, IommuDomain, IotlbGather};

use crate::*;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

fn read<F: PtFormat, M: TableMemory>(
    pt: &mut PageTable<F, M>,
    iova: u64,
    len: u64,
    clear: bool,
) -> (Vec<(u64, u64)>, IotlbGather) {
    let mut seen = Vec::new();
    let mut g = IotlbGather::default();
    pt.read_and_clear_dirty(iova, len, clear, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
    (seen, g)
}

/// 4 KiB pages at [0, 64 KiB), a 2 MiB page at 2 MiB, a 1 GiB page at
/// 1 GiB, in `format`.
fn populated<F: PtFormat, M: TableMemory>(format: F, mem: M) -> PageTable<F, M> {
    let mut pt = PageTable::new(format, mem).unwrap();
    pt.map(0, 0x10_0000, 16 * K4, Prot::RW).unwrap();
    pt.map(M2, 0x4000_0000, M2, Prot::RW).unwrap();
    pt.map(G1, 0x8000_0000, G1, Prot::RW).unwrap();
    assert_eq!(pt.page_size(M2), Some(M2));
    assert_eq!(pt.page_size(G1), Some(G1));
    pt
}

fn read_mark_clear<F: PtFormat, M: TableMemory>(pt: &mut PageTable<F, M>, dirty_bit: u64) {
    assert!(pt.dirty_capable());
    assert_eq!(pt.format().dirty_bit(), dirty_bit);
    let whole = 2 * G1;
    // Fresh mappings are clean.
    assert_eq!(read(pt, 0, whole, true).0, []);
    // The walker marks a few leaves (out of order, one twice).
    for iova in [G1 + 5 * M2 + 0x123, 3 * K4, M2 + 0x1000, 3 * K4 + 8, 9 * K4] {
        assert!(pt.mark_dirty(iova));
    }
    assert!(!pt.mark_dirty(100 * K4), "unmapped");
    let expect = [(3 * K4, K4), (9 * K4, K4), (M2, M2), (G1, G1)];
    // Reading without clearing leaves them dirty.
    let (seen, g) = read(pt, 0, whole, false);
    assert_eq!(seen, expect);
    assert!(g.is_empty());
    // Read and clear: reported in ascending order with their sizes, the
    // cleared leaves in the gather.
    let (seen, g) = read(pt, 0, whole, true);
    assert_eq!(seen, expect);
    assert_eq!((g.start, g.last), (Some(3 * K4), 2 * G1 - 1));
    assert_eq!(pt.is_dirty(M2), Some(false));
    // Clean again; translations unchanged.
    assert_eq!(read(pt, 0, whole, true).0, []);
    assert_eq!(pt.iova_to_phys(M2 + 0x1000).map(|t| t.0), Some(0x4000_1000));
    assert_eq!(pt.iova_to_phys(9 * K4).map(|t| t.0), Some(0x10_9000));
    // A sub-range sees only its own leaves.
    pt.mark_dirty(0);
    pt.mark_dirty(15 * K4);
    assert_eq!(read(pt, K4, 15 * K4, true).0, [(15 * K4, K4)]);
    assert_eq!(read(pt, 0, K4, true).0, [(0, K4)]);
    pt.check_invariants().unwrap();
}

#[test]
fn vtd_second_stage_reads_and_clears_bit_9() {
    let f = VtdSecondStage::new(4).unwrap().with_dirty_tracking(true);
    let mut pt = populated(f, HeapTables::default());
    read_mark_clear(&mut pt, 1 << 9);
    // The bit sits where the hardware writes it, beside the permissions.
    pt.mark_dirty(M2);
    let e = pt.walk(M2).last().unwrap().raw;
    assert_eq!(e & (SS_D | SS_PS | SS_READ | SS_WRITE), SS_D | SS_PS | SS_READ | SS_WRITE);
    assert!(alloc::format!("{:?}", pt.describe(pt.walk(M2).last().unwrap())).contains(" D"));
}

#[test]
fn amd_v1_reads_and_clears_bit_6() {
    let f = AmdV1::new(4).unwrap().with_dirty_tracking(true);
    let mut pt = populated(f, HeapTables::default());
    read_mark_clear(&mut pt, 1 << 6);
}

#[test]
fn x86_first_stage_leaves_start_clean() {
    let f = X86FirstStage::four_level().with_1g_pages(true).with_dirty_tracking(true);
    let mut pt = populated(f, HeapTables::default());
    assert_eq!(pt.walk(K4).last().unwrap().raw & FS_D, 0);
    read_mark_clear(&mut pt, FS_D);
    // Without tracking the first stage presets D, and reports nothing.
    let mut plain = populated(X86FirstStage::four_level().with_1g_pages(true), HeapTables::default());
    assert_ne!(plain.walk(K4).last().unwrap().raw & FS_D, 0);
    assert!(!plain.dirty_capable());
    assert_eq!(read(&mut plain, 0, G1, true).0, []);
}

#[test]
fn formats_without_tracking_report_nothing() {
    let mut pt = populated(VtdSecondStage::new(4).unwrap(), HeapTables::default());
    assert!(!pt.dirty_capable());
    assert!(!pt.mark_dirty(0));
    assert_eq!(read(&mut pt, 0, 2 * G1, true).0, []);
    let mut g = IotlbGather::default();
    assert_eq!(
        pt.read_and_clear_dirty(1, K4, true, &mut g, &mut |_, _| {}),
        Err(Error::BadRange { iova: 1, length: K4 })
    );
}

#[test]
fn a_large_page_partly_in_range_is_reported_clipped_and_stays_dirty() {
    let f = VtdSecondStage::new(4).unwrap().with_dirty_tracking(true);
    let mut pt = populated(f, HeapTables::default());
    pt.mark_dirty(M2 + 0x5000);
    // The part of the 2 MiB page the range covers is reported...
    let (seen, g) = read(&mut pt, M2 + 16 * K4, 4 * K4, true);
    assert_eq!(seen, [(M2 + 16 * K4, 4 * K4)]);
    // ...but clearing would lose writes outside the range: it stays dirty.
    assert!(g.is_empty());
    assert_eq!(pt.is_dirty(M2), Some(true));
    let (seen, _) = read(&mut pt, 0, 4 * M2, true);
    assert_eq!(seen, [(M2, M2)]);
    assert_eq!(pt.is_dirty(M2), Some(false));
}

#[test]
fn a_split_after_dirtying_keeps_the_rest_dirty() {
    let f = VtdSecondStage::new(4).unwrap().with_dirty_tracking(true);
    let mut pt = populated(f, HeapTables::default());
    pt.mark_dirty(M2 + 0x3000);
    pt.mark_dirty(G1);
    // Unmapping one 4 KiB page splits the 2 MiB page: which part was
    // written is unknown, so every remaining 4 KiB page is dirty.
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(M2 + 7 * K4, K4, &mut g), K4);
    pt.release_deferred();
    assert_eq!(pt.page_size(M2), Some(K4));
    // And a 1 GiB page split twice (1 GiB -> 2 MiB -> 4 KiB).
    assert_eq!(pt.unmap(G1 + 3 * M2 + K4, K4, &mut g), K4);
    pt.release_deferred();
    let (seen, g) = read(&mut pt, 0, 2 * G1, true);
    let mut expect: Vec<(u64, u64)> = (0..512).filter(|&k| k != 7).map(|k| (M2 + k * K4, K4)).collect();
    expect.extend((0..3).map(|k| (G1 + k * M2, M2)));
    expect.extend((0..512).filter(|&k| k != 1).map(|k| (G1 + 3 * M2 + k * K4, K4)));
    expect.extend((4..512).map(|k| (G1 + k * M2, M2)));
    assert_eq!(seen, expect);
    assert_eq!((g.start, g.last), (Some(M2), 2 * G1 - 1));
    assert_eq!(read(&mut pt, 0, 2 * G1, true).0, []);
    pt.check_invariants().unwrap();
}

#[test]
fn non_coherent_clears_reach_the_walker() {
    let f = AmdV1::new(4).unwrap().with_dirty_tracking(true);
    let mut pt = populated(f, NonCoherentTables::new());
    pt.mark_dirty(5 * K4);
    pt.mark_dirty(M2);
    let leaf = *pt.walk(5 * K4).last().unwrap();
    assert_ne!(pt.memory().walker_entry(leaf.table, leaf.index).unwrap() & AMD_D, 0);
    let (seen, _) = read(&mut pt, 0, G1, true);
    assert_eq!(seen, [(5 * K4, K4), (M2, M2)]);
    assert_eq!(pt.memory().walker_entry(leaf.table, leaf.index).unwrap() & AMD_D, 0);
    let big = *pt.walk(M2).last().unwrap();
    assert_eq!(pt.memory().walker_entry(big.table, big.index).unwrap() & AMD_D, 0);
    assert_eq!(pt.memory().unflushed_lines(), []);
}

#[test]
fn paging_domain_tracks_through_the_trait() {
    let f = VtdSecondStage::new(4).unwrap().with_dirty_tracking(true);
    let mut d = PagingDomain::new(f, HeapTables::default(), RecordingInvalidator::default()).unwrap();
    assert!(d.dirty_capable());
    d.map(0, 0x4000_0000, M2 * 2, Prot::RW).unwrap();
    let mut g = IotlbGather::default();
    // Tracking off: refused.
    let off = d.read_and_clear_dirty(0, M2, true, &mut g, &mut |_, _| {});
    assert_eq!(off, Err(DomainError::BadRange { iova: 0, length: M2 }));
    // Writes before tracking starts are forgotten when it starts.
    d.table_mut().mark_dirty(0);
    d.set_dirty_tracking(true).unwrap();
    assert!(d.dirty_tracking());
    assert_eq!(d.table().is_dirty(0), Some(false));
    d.invalidator_mut().invalidations.clear();
    d.table_mut().mark_dirty(M2 + 0x10);
    let mut seen = Vec::new();
    d.read_and_clear_dirty(0, 2 * M2, true, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
    assert_eq!(seen, [(M2, M2)]);
    d.iotlb_sync(&mut g).unwrap();
    assert_eq!(d.invalidator().invalidations, [(M2, 2 * M2 - 1, false)]);
    d.set_dirty_tracking(false).unwrap();
    assert!(d.read_and_clear_dirty(0, M2, true, &mut g, &mut |_, _| {}).is_err());

    let mut plain = PagingDomain::new(VtdSecondStage::new(4).unwrap(), HeapTables::default(), NoInvalidator).unwrap();
    assert!(!plain.dirty_capable());
    assert_eq!(plain.set_dirty_tracking(true), Err(DomainError::NotSupported));
    assert_eq!(plain.read_and_clear_dirty(0, K4, true, &mut g, &mut |_, _| {}), Err(DomainError::NotSupported));
}
