//! The AMD-Vi v1 format: bit layouts written out by hand from the AMD
//! IOMMU specification (pub. 48882, 2.2.3: PR bit 0, NextLevel 11:9,
//! address 51:12, U 59, FC 60, IR 61, IW 62), the depth rules (DTE Mode,
//! EFR.HATS), the classification of encodings the engine never writes, and
//! the engine driving it (raw entries along a walk, splits, frees).

use io_pgtable::*;
use portcullis_iommu::{IommuDomain, IotlbGather, IovaRange};

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

const IR: u64 = 1 << 61;
const IW: u64 = 1 << 62;
const FC: u64 = 1 << 60;

/// QEMU 10's `amd-iommu` Extended Feature Register: PREF, PPR, GT, IA, GA,
/// HE, GATS = 10b, HATS = 10b.
const QEMU_EFR: u64 = 0x1 | 0x2 | 0x10 | 0x40 | 0x80 | 0x100 | (2 << 12) | (2 << 10);

fn amd(levels: u32) -> AmdV1 {
    AmdV1::new(levels).unwrap()
}

fn table(format: AmdV1) -> PageTable<AmdV1, HeapTables> {
    PageTable::new(format, HeapTables::default()).unwrap()
}

#[test]
fn constants_match_the_spec() {
    assert_eq!((AMD_PR, AMD_D, AMD_U, AMD_FC, AMD_IR, AMD_IW), (1, 1 << 6, 1 << 59, FC, IR, IW));
    assert_eq!((AMD_NEXT_LEVEL_SHIFT, AMD_NEXT_LEVEL_MASK), (9, 0xe00));
    assert_eq!(AMD_ADDR_MASK, ((1 << 52) - 1) & !0xfff);
    assert_eq!(amd_next_level(0x0000_0000_1234_5a01), 5);
}

#[test]
fn table_entries_name_the_next_hardware_level() {
    let f = amd(4);
    // Engine level l points at a hardware level-l table: NextLevel = l,
    // PR, and IR|IW so the walk's AND leaves permissions to the leaf.
    assert_eq!(f.table_entry(0x1234_5000, 3), IR | IW | 0x1234_5000 | 3 << 9 | 1);
    assert_eq!(f.table_entry(0x1234_5000, 2), IR | IW | 0x1234_5401);
    assert_eq!(f.table_entry(0x000f_ffff_ffff_f000, 1), IR | IW | 0x000f_ffff_ffff_f201);
    assert_eq!(amd(6).table_entry(0x7000, 5), IR | IW | 0x7a01);
    // No FC, U or D in table entries, even with forced coherence.
    assert_eq!(f.with_force_coherent(true).table_entry(0x5000, 1), IR | IW | 0x5201);
}

#[test]
fn leaves_have_next_level_zero_at_every_level() {
    let f = amd(4);
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::RW), IR | IW | 0xabcd_e001);
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::READ), IR | 0xabcd_e001);
    // IR and IW are independent: write-only is expressible.
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::WRITE), IW | 0xabcd_e001);
    assert_eq!(f.leaf_prot(IW | 0xabcd_e001), Prot::WRITE);
    assert!(f.accepts(Prot::WRITE) && !f.accepts(Prot::NONE) && !f.accepts(Prot::CACHE));
    // 2 MiB and 1 GiB: the same encoding one and two levels up.
    assert_eq!(f.leaf_entry(0x4020_0000, 1, Prot::READ), IR | 0x4020_0001);
    assert_eq!(f.leaf_entry(0x1_4000_0000, 2, Prot::RW), IR | IW | 0x1_4000_0001);
    assert!(f.is_leaf(IR | 0x4020_0001, 1) && f.is_leaf(IR | 0x1_4000_0001, 2));
    assert!(!f.is_leaf(f.table_entry(0x4020_0000, 1), 1));
    // FC follows Prot::CACHE, or is always on when forced.
    assert_eq!(f.leaf_entry(0x5000, 0, Prot::RW | Prot::CACHE), FC | IR | IW | 0x5001);
    assert_eq!(f.leaf_prot(FC | IR | 0x5001), Prot::READ | Prot::CACHE);
    let fc = f.with_force_coherent(true);
    assert!(fc.force_coherent() && !f.force_coherent());
    assert_eq!(fc.leaf_entry(0x5000, 0, Prot::READ), FC | IR | 0x5001);
    assert!(f.snoop_control() && fc.snoop_control());
    // Present is PR alone; the zero entry is not present.
    assert!(!f.is_present(0) && !f.is_present(IR | IW | 0x5000) && f.is_present(1));
    // Bits above 51 are not address.
    assert_eq!(f.table_address(IR | IW | FC | 0x8_1234_5601), 0x8_1234_5000);
    assert_eq!(f.leaf_address(IR | 0x4020_0001, 1), 0x4020_0000);
}

#[test]
fn depth_and_aperture() {
    assert!(AmdV1::new(2).is_none() && AmdV1::new(7).is_none());
    let widths: Vec<u64> = (3..=6).map(|l| amd(l).aperture_last()).collect();
    assert_eq!(widths, [(1 << 39) - 1, (1 << 48) - 1, (1 << 57) - 1, u64::MAX]);
    assert_eq!(amd(4).dte_mode(), 4);
    assert_eq!(amd(4).with_input_bits(40).aperture_last(), (1 << 40) - 1);
    assert_eq!(amd(3).with_input_bits(48).aperture_last(), (1 << 39) - 1);
    assert_eq!(amd(4).with_output_bits(60).output_bits(), 52);
    assert_eq!(amd(4).with_output_bits(40).output_bits(), 40);
    // EFR.HATS (bits 11:10): 4 + HATS levels, 11b reserved.
    assert_eq!(AmdV1::max_levels_from_efr(0), Some(4));
    assert_eq!(AmdV1::max_levels_from_efr(1 << 10), Some(5));
    assert_eq!(AmdV1::max_levels_from_efr(QEMU_EFR), Some(6));
    assert_eq!(AmdV1::max_levels_from_efr(3 << 10), None);
    assert_eq!([39, 40, 48, 49, 57, 64].map(AmdV1::levels_for_input_bits), [3, 4, 4, 5, 5, 6]);
    // QEMU, 48 bits wanted: 4 levels. A HATS=00b unit asked for 64 bits:
    // 4 levels, 48-bit aperture.
    let f = AmdV1::from_caps(QEMU_EFR, 48).unwrap();
    assert_eq!((f.levels(), f.aperture_last(), f.leaf_levels()), (4, (1 << 48) - 1, 0b111));
    let f = AmdV1::from_caps(0, 64).unwrap();
    assert_eq!((f.levels(), f.aperture_last()), (4, (1 << 48) - 1));
    assert_eq!(AmdV1::from_caps(QEMU_EFR, 64).unwrap().aperture_last(), u64::MAX);
    assert!(AmdV1::from_caps(3 << 10, 48).is_none());
    assert_eq!(amd(4).with_large_pages(true, false).leaf_levels(), 0b011);
    // 1 GiB leaves only with 2 MiB ones (a split 1 GiB page is 2 MiB leaves).
    assert_eq!(amd(4).with_large_pages(false, true).leaf_levels(), 0b001);
    assert_eq!(amd(4).with_large_pages(false, false).leaf_levels(), 0b001);
    assert_eq!(sizes_of_leaf_levels(amd(4).leaf_levels()), K4 | M2 | G1);
}

/// Encodings the engine never writes: classified by `decode`, terminal for
/// the engine, named by `Debug`.
#[test]
fn foreign_encodings_are_classified() {
    let f = amd(4);
    assert_eq!(AmdV1::decode(0, 2), AmdV1Entry::NotPresent);
    assert_eq!(AmdV1::decode(IR | IW | 0x7000, 2), AmdV1Entry::NotPresent);
    assert_eq!(AmdV1::decode(f.table_entry(0x7000, 2), 2), AmdV1Entry::Table { table: 0x7000 });
    assert_eq!(
        AmdV1::decode(f.leaf_entry(0x4020_0000, 1, Prot::RW), 1),
        AmdV1Entry::Page { phys: 0x4020_0000, size: M2, prot: Prot::RW }
    );
    // NextLevel 7: 64 KiB page at 0x10000 = address bits 12..14 set, 15
    // clear; 8 KiB = bit 12 clear.
    let sized = IR | 0x1_7000 | 7 << 9 | 1;
    assert_eq!(AmdV1::decode(sized, 0), AmdV1Entry::SizedPage { phys: 0x1_0000, size: 0x1_0000, prot: Prot::READ });
    assert_eq!(
        AmdV1::decode(IR | IW | 0x6000 | 0xe01, 0),
        AmdV1Entry::SizedPage { phys: 0x6000, size: 0x2000, prot: Prot::RW }
    );
    // 4 MiB at engine level 1 (2 x 2 MiB entries): bits 12..20 ones, 21 zero.
    let four_mib = IR | IW | 0x80_0000 | 0x1f_f000 | 0xe01;
    assert_eq!(AmdV1::decode(four_mib, 1), AmdV1Entry::SizedPage { phys: 0x80_0000, size: 4 << 20, prot: Prot::RW });
    // A level-3 entry pointing straight at a hardware level-1 table.
    let skip = IR | IW | 0x9000 | 1 << 9 | 1;
    assert_eq!(AmdV1::decode(skip, 3), AmdV1Entry::SkippingTable { table: 0x9000, next_level: 1 });
    // NextLevel not below the entry's own hardware level.
    assert_eq!(AmdV1::decode(IR | 0x9000 | 2 << 9 | 1, 1), AmdV1Entry::Invalid { next_level: 2 });
    assert_eq!(AmdV1::decode(IR | 0x9000 | 1 << 9 | 1, 0), AmdV1Entry::Invalid { next_level: 1 });
    // The engine walks only into NextLevel = level; everything else stops it.
    for (pte, level) in [(sized, 0), (four_mib, 1), (skip, 3), (IR | 0x9000 | 3 << 9 | 1, 2)] {
        assert!(f.is_present(pte) && f.is_leaf(pte, level), "{pte:#x} at {level}");
    }
    let show = |raw: u64, level: u32| format!("{:?}", Entry { format: &f, level, raw });
    assert!(show(skip, 3).contains("skipping levels (not written by this engine)"), "{}", show(skip, 3));
    assert!(show(four_mib, 1).contains("sized page 0x800000+0x400000 NL7"), "{}", show(four_mib, 1));
    assert!(show(IR | 0x9000 | 2 << 9 | 1, 1).contains("invalid NextLevel 2 at hardware level 2"));
    assert!(show(f.table_entry(0x7000, 2), 2).contains("table 0x7000 NL2 IR IW"));
    assert!(show(FC | IR | 0x4020_0001, 1).contains("page 0x40200000 NL0 IR FC"));
    assert!(show(0, 1).contains("(not present)"));
}

/// The laws of format.rs at every level, for several configurations.
#[test]
fn round_trips() {
    for f in [amd(3), amd(4).with_force_coherent(true), amd(5).with_large_pages(true, false), amd(6)] {
        for level in 0..f.levels() {
            let t = 0x7_6543_2000;
            if level > 0 {
                let te = f.table_entry(t, level);
                assert!(f.is_present(te) && !f.is_leaf(te, level), "{f:?} L{level}");
                assert_eq!(f.table_address(te), t);
                assert_eq!(AmdV1::decode(te, level), AmdV1Entry::Table { table: t });
            }
            if level == 0 || f.leaf_levels() >> level & 1 != 0 {
                let p = 0x3_0000_0000u64 & !(level_size(level) - 1);
                for prot in [Prot::READ, Prot::WRITE, Prot::RW, Prot::RW | Prot::CACHE] {
                    let e = f.leaf_entry(p, level, prot);
                    assert!(f.is_present(e) && f.is_leaf(e, level));
                    assert_eq!(f.leaf_address(e, level), p);
                    assert_eq!(f.leaf_entry(f.leaf_address(e, level), level, f.leaf_prot(e)), e);
                    let step = level_size(level);
                    assert_eq!(f.leaf_entry(p + 5 * step, level, prot), e + 5 * step);
                    assert_eq!(amd_next_level(e), 0);
                }
            }
        }
    }
}

#[test]
fn two_mib_map_uses_two_mib_leaves_with_the_right_next_levels() {
    let mut pt = table(amd(4));
    pt.map(5 * G1 + 2 * M2, 0x4000_0000, 2 * M2, Prot::RW).unwrap();
    assert_eq!(pt.page_size(5 * G1 + 2 * M2), Some(M2));
    // Root, the level-2 table, the level-1 table holding two 2 MiB leaves.
    assert_eq!(pt.table_count(), 3);
    let steps = pt.walk(5 * G1 + 3 * M2 + 0x1234);
    assert_eq!(steps.iter().map(|s| s.level).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(steps.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 5, 3]);
    // Each table entry: PR, IR, IW, NextLevel = the hardware level below.
    for (step, nl) in steps[..2].iter().zip([3, 2]) {
        assert_eq!(step.raw & !AMD_ADDR_MASK, IR | IW | nl << 9 | 1, "L{}", step.level);
    }
    // The 2 MiB leaf: NextLevel 0 in a hardware level-2 table.
    assert_eq!(steps[2].raw, IR | IW | 0x4020_0001);
    // Each table entry's address is the next step's table.
    assert_eq!(steps[0].raw & AMD_ADDR_MASK, steps[1].table);
    assert_eq!(steps[1].raw & AMD_ADDR_MASK, steps[2].table);
    assert_eq!(pt.iova_to_phys(5 * G1 + 3 * M2 + 0x1234), Some((0x4020_1234, Prot::RW)));
    let text = format!("{:?}", pt.describe(&steps[2]));
    assert!(text.contains("page 0x40200000 NL0 IR IW"), "{text}");
    // Misaligned phys: 4 KiB leaves, NextLevel 1 for the level-1 entry.
    pt.map(7 * G1, 0x1000, M2, Prot::READ).unwrap();
    let steps = pt.walk(7 * G1 + K4);
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[2].raw & !AMD_ADDR_MASK, IR | IW | 1 << 9 | 1);
    assert_eq!(steps[3].raw, IR | 0x2001);
    pt.check_invariants().unwrap();
}

#[test]
fn three_and_six_levels() {
    // 3 levels: a 1 GiB leaf right in the root (hardware level 3).
    let mut pt = table(amd(3));
    pt.map(G1, 3 * G1, G1, Prot::READ).unwrap();
    let steps = pt.walk(G1 + 77);
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].raw, IR | 0xc000_0001);
    assert_eq!(pt.aperture(), IovaRange::new(0, (1 << 39) - 1));
    // 6 levels: the whole 64-bit space but its last page (see
    // `last_page_of_64_bit_space`); the top pages sit in entry 127 of the
    // root (IOVA bits 63:57).
    let mut pt = table(amd(6));
    assert_eq!(pt.aperture(), IovaRange::new(0, u64::MAX - K4));
    let high = u64::MAX - 2 * M2 + 1;
    pt.map(high, 0x20_0000, M2, Prot::RW).unwrap();
    pt.map(0, 0x1000, K4, Prot::WRITE).unwrap();
    let steps = pt.walk(high + M2 - 1);
    assert_eq!(steps.iter().map(|s| s.level).collect::<Vec<_>>(), [5, 4, 3, 2, 1]);
    assert_eq!(steps.iter().map(|s| s.index).collect::<Vec<_>>(), [127, 511, 511, 511, 510]);
    for (step, nl) in steps[..4].iter().zip([5, 4, 3, 2]) {
        assert_eq!(amd_next_level(step.raw), nl);
        assert_eq!(step.raw & (IR | IW | 1), IR | IW | 1);
    }
    assert_eq!(steps[4].raw, IR | IW | 0x20_0001);
    assert_eq!(pt.iova_to_phys(high + M2 - 1), Some((0x3f_ffff, Prot::RW)));
    assert_eq!(pt.iova_to_phys(high + M2), None);
    assert_eq!(pt.iova_to_phys(0x10), Some((0x1010, Prot::WRITE)));
    assert_eq!(pt.walk(0).last().unwrap().raw, IW | 0x1001);
    pt.check_invariants().unwrap();
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(0, K4, &mut g), K4);
    assert_eq!(pt.unmap(high, M2, &mut g), M2);
    assert!(pt.is_empty());
    // Five tables below the root towards 0, four towards the top.
    assert_eq!(pt.release_deferred(), 9);
    assert_eq!(pt.memory().live_tables(), 1);
}

/// A 6-level table covers all 64 bits, but the engine works with exclusive
/// ends, so the page ending at 2^64 is outside its aperture: a map there
/// is refused as out of range (never an overflow), the page below it works.
#[test]
fn last_page_of_64_bit_space() {
    let mut pt = table(amd(6));
    assert_eq!(pt.aperture(), IovaRange::new(0, u64::MAX - K4));
    let top = u64::MAX - K4 + 1;
    assert!(matches!(pt.map(top, 0x5000, K4, Prot::READ), Err(io_pgtable::Error::BadRange { .. })));
    let mut g = IotlbGather::default();
    assert_eq!(pt.unmap(top, K4, &mut g), 0);
    assert!(pt.is_empty());
    pt.map(top - K4, 0x5000, K4, Prot::READ).unwrap();
    assert_eq!(pt.iova_to_phys(top - 1), Some((0x5fff, Prot::READ)));
}

#[test]
fn partial_unmap_splits_and_empty_tables_are_freed() {
    let mut pt = table(amd(4));
    pt.map(G1, 3 * G1, G1, Prot::RW).unwrap();
    assert_eq!(pt.walk(G1)[1].raw, IR | IW | 0xc000_0001, "one 1 GiB leaf");
    let mut g = IotlbGather::default();
    let hole = G1 + 5 * M2 + 3 * K4;
    assert_eq!(pt.unmap(hole, K4, &mut g), K4);
    assert_eq!((g.start, g.last), (Some(G1), 2 * G1 - 1));
    assert_eq!(pt.iova_to_phys(hole), None);
    // The split: 1 GiB -> 2 MiB leaves in a new hardware level-2 table,
    // the hole's 2 MiB -> 4 KiB leaves in a new hardware level-1 table.
    let steps = pt.walk(hole + K4);
    assert_eq!(steps.iter().map(|s| s.level).collect::<Vec<_>>(), [3, 2, 1, 0]);
    assert_eq!(steps[1].raw & !AMD_ADDR_MASK, IR | IW | 2 << 9 | 1);
    assert_eq!(steps[2].raw & !AMD_ADDR_MASK, IR | IW | 1 << 9 | 1);
    assert_eq!(steps[3].raw, IR | IW | (3 * G1 + 5 * M2 + 4 * K4) | 1);
    assert_eq!(pt.walk(G1 + 7 * M2)[2].raw, IR | IW | (3 * G1 + 7 * M2) | 1, "2 MiB leaf after the split");
    for probe in [G1, hole - K4, hole + K4, hole + M2, 2 * G1 - 1] {
        assert_eq!(pt.iova_to_phys(probe), Some((probe + 2 * G1, Prot::RW)), "{probe:#x}");
    }
    assert_eq!(pt.table_count(), 4);
    pt.check_invariants().unwrap();
    // Unmapping the rest empties and unlinks both new tables and the
    // level-2 table; they are freed only after the sync.
    assert_eq!(pt.unmap(0, 4 * G1, &mut g), G1 - K4);
    assert!(pt.is_empty());
    assert_eq!(pt.table_count(), 1);
    assert_eq!(pt.memory().live_tables(), 4);
    assert_eq!(pt.release_deferred(), 3);
    assert_eq!(pt.memory().live_tables(), 1);
    assert_eq!(pt.walk(G1)[0].raw, 0);
}

#[test]
fn domain_enforces_coherency_with_fc() {
    let mut d = PagingDomain::new(amd(4), HeapTables::new(false), RecordingInvalidator::default()).unwrap();
    let dom: &mut dyn IommuDomain = &mut d;
    assert_eq!(dom.page_sizes(), K4 | M2 | G1);
    assert_eq!(dom.aperture(), IovaRange::new(0, (1 << 48) - 1));
    assert!(dom.enforce_cache_coherency());
    dom.map(0x10_0000, 0x20_0000, K4, Prot::READ).unwrap();
    assert_eq!(d.table().walk(0x10_0000)[3].raw, FC | IR | 0x20_0001);
    assert_eq!(d.table().iova_to_phys(0x10_0000), Some((0x20_0000, Prot::READ | Prot::CACHE)));
    // Without the request, no FC.
    let mut pt = table(amd(4));
    pt.map(0, 0, K4, Prot::RW).unwrap();
    assert_eq!(pt.walk(0)[3].raw, IR | IW | 1);
    // A 2 MiB-only unit maps 1 GiB as 512 leaves of 2 MiB.
    let mut pt = table(amd(4).with_large_pages(true, false));
    pt.map(G1, G1, G1, Prot::RW).unwrap();
    assert_eq!(pt.page_size(G1), Some(M2));
    assert_eq!(pt.table_count(), 3);
}
