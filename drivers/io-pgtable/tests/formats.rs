//! Bit layouts of each format against the specifications, written out by
//! hand from VT-d spec rev 4 section 9.8 (second stage) and 9.7 / the SDM
//! 4-level paging tables (first stage).

use io_pgtable::*;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

fn ss4() -> VtdSecondStage {
    VtdSecondStage::new(4).unwrap()
}

#[test]
fn second_stage_entries() {
    let f = ss4();
    // Non-leaf: address | R | W (both needed for the walk to allow anything).
    assert_eq!(f.table_entry(0x1234_5000, 3), 0x1234_5003);
    assert_eq!(f.table_entry(0x000f_ffff_ffff_f000, 1), 0x000f_ffff_ffff_f003);
    // 4 KiB leaves: R bit 0, W bit 1, no PS.
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::RW), 0xabcd_e003);
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::READ), 0xabcd_e001);
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::WRITE), 0xabcd_e002);
    // 2 MiB and 1 GiB leaves: PS is bit 7.
    assert_eq!(f.leaf_entry(0x4020_0000, 1, Prot::READ), 0x4020_0081);
    assert_eq!(f.leaf_entry(0x1_4000_0000, 2, Prot::RW), 0x1_4000_0083);
    // SNP (bit 11) only with snoop control and a CACHE request.
    assert_eq!(f.leaf_entry(0x5000, 0, Prot::RW | Prot::CACHE), 0x5003);
    let sc = f.with_snoop_control(true);
    assert_eq!(sc.leaf_entry(0x5000, 0, Prot::RW | Prot::CACHE), 0x5803);
    assert_eq!(sc.leaf_entry(0x5000, 0, Prot::RW), 0x5003);
    assert_eq!(sc.leaf_prot(0x5803), Prot::RW | Prot::CACHE);
    assert_eq!(SS_SNP, 0x800);
    assert_eq!(SS_PS, 0x80);
}

#[test]
fn second_stage_decode() {
    let f = ss4();
    // Present means R or W: there is no present bit.
    assert!(!f.is_present(0));
    assert!(!f.is_present(0xabcd_e000 | SS_PS | SS_SNP));
    assert!(f.is_present(1) && f.is_present(2));
    assert!(f.is_leaf(0xabcd_e003, 0));
    assert!(!f.is_leaf(0xabcd_e003, 1));
    assert!(f.is_leaf(0x4020_0083, 1));
    assert_eq!(f.table_address(0x8_1234_5003), 0x8_1234_5000);
    assert_eq!(f.leaf_address(0x4020_0081, 1), 0x4020_0000);
    assert_eq!(f.leaf_address(0x1_4000_0083, 2), 0x1_4000_0000);
    assert_eq!(f.leaf_prot(0x4020_0081), Prot::READ);
    assert_eq!(f.leaf_prot(0x4020_0082), Prot::WRITE);
    // Bits above 51 are not address.
    assert_eq!(f.table_address(0xfff0_0000_0000_1003), 0x1000);
}

#[test]
fn second_stage_widths() {
    let f3 = VtdSecondStage::new(3).unwrap();
    assert_eq!((f3.levels(), f3.aperture_last()), (3, (1 << 39) - 1));
    assert_eq!(ss4().aperture_last(), (1 << 48) - 1);
    assert_eq!(VtdSecondStage::new(5).unwrap().aperture_last(), (1 << 57) - 1);
    assert!(VtdSecondStage::new(2).is_none() && VtdSecondStage::new(6).is_none());
    // SAGAW 39/48 with MGAW 48: 4 levels. MGAW 39: 3 levels.
    let f = VtdSecondStage::from_caps([39, 48], 48, true, true, false).unwrap();
    assert_eq!((f.levels(), f.aperture_last()), (4, (1 << 48) - 1));
    let f = VtdSecondStage::from_caps([39, 48], 39, true, false, false).unwrap();
    assert_eq!((f.levels(), f.aperture_last(), f.leaf_levels()), (3, (1 << 39) - 1, 0b011));
    // Only 48-bit tables but MGAW 39: 4 levels, aperture 39 bits.
    let f = VtdSecondStage::from_caps([48], 39, false, false, true).unwrap();
    assert_eq!((f.levels(), f.aperture_last(), f.leaf_levels()), (4, (1 << 39) - 1, 0b001));
    assert!(f.snoop_control());
    // MGAW beyond every table width: the widest, limited to what it covers.
    let f = VtdSecondStage::from_caps([39], 48, true, true, false).unwrap();
    assert_eq!((f.levels(), f.aperture_last()), (3, (1 << 39) - 1));
    assert!(VtdSecondStage::from_caps([30], 39, true, true, false).is_none());
    assert_eq!(sizes_of_leaf_levels(ss4().leaf_levels()), K4 | M2 | G1);
}

#[test]
fn first_stage_entries() {
    let f = X86FirstStage::four_level();
    // Non-leaf: P | R/W | U/S | A.
    assert_eq!(f.table_entry(0x1000_0000, 3), 0x1000_0027);
    // 4 KiB leaves: P | U/S | A, plus R/W and D when writable.
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::RW), 0xabcd_e067);
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::READ), 0xabcd_e025);
    // No write-only pages on x86: write implies read.
    assert_eq!(f.leaf_entry(0xabcd_e000, 0, Prot::WRITE), 0xabcd_e067);
    assert_eq!(f.leaf_prot(0xabcd_e067), Prot::RW);
    // PS bit 7 for 2 MiB / 1 GiB.
    assert_eq!(f.leaf_entry(0x4020_0000, 1, Prot::READ), 0x4020_00a5);
    assert_eq!(f.leaf_entry(0x1_4000_0000, 2, Prot::RW), 0x1_4000_00e7);
    // XD is bit 63, only when asked for.
    let xd = f.with_execute_disable(true);
    assert_eq!(xd.leaf_entry(0x5000, 0, Prot::READ), 0x8000_0000_0000_5025);
    assert_eq!(xd.leaf_address(0x8000_0000_0000_5025, 0), 0x5000);
    // Without U/S.
    let sup = f.with_user(false);
    assert_eq!(sup.table_entry(0x1000, 1), 0x1023);
    assert_eq!(sup.leaf_entry(0x2000, 0, Prot::RW), 0x2063);
    // CACHE is not encodable in first-stage entries.
    assert_eq!(f.leaf_entry(0x5000, 0, Prot::RW | Prot::CACHE), 0x5067);
    assert!(!f.snoop_control());
    assert_eq!((FS_P, FS_RW, FS_US, FS_A, FS_D, FS_PS, FS_XD), (1, 2, 4, 0x20, 0x40, 0x80, 1 << 63));
}

#[test]
fn first_stage_decode() {
    let f = X86FirstStage::four_level();
    assert!(!f.is_present(0) && !f.is_present(0xabcd_e066));
    assert!(f.is_present(0xabcd_e067));
    assert!(f.is_leaf(0x4020_00a5, 1) && !f.is_leaf(0x4020_0027, 1));
    // PAT (bit 12) of a large page is not part of the address.
    assert_eq!(f.leaf_address(0x4020_10a5, 1), 0x4020_0000);
    assert_eq!(f.leaf_prot(0x4020_00a5), Prot::READ);
    // Lower canonical half of 48 / 57 bits.
    assert_eq!(f.aperture_last(), 0x7fff_ffff_ffff);
    assert_eq!(X86FirstStage::five_level().aperture_last(), (1 << 56) - 1);
    assert_eq!(f.leaf_levels(), 0b011);
    assert_eq!(f.with_1g_pages(true).leaf_levels(), 0b111);
}

/// Round trip laws from format.rs for both formats at every level.
#[test]
fn round_trips() {
    fn check<F: PtFormat>(f: &F) {
        for level in 0..f.levels() {
            let t = 0x7_6543_2000;
            let te = f.table_entry(t, level);
            if level > 0 {
                assert!(f.is_present(te) && !f.is_leaf(te, level), "{f:?} L{level}");
                assert_eq!(f.table_address(te), t);
            }
            if level == 0 || f.leaf_levels() >> level & 1 != 0 {
                let p = 0x3_0000_0000u64 & !(level_size(level) - 1);
                for prot in [Prot::READ, Prot::WRITE, Prot::RW, Prot::RW | Prot::CACHE] {
                    let e = f.leaf_entry(p, level, prot);
                    assert!(f.is_present(e) && f.is_leaf(e, level));
                    assert_eq!(f.leaf_address(e, level), p);
                    assert_eq!(f.leaf_entry(f.leaf_address(e, level), level, f.leaf_prot(e)), e);
                    // Linear address field (runs are written by adding).
                    let step = level_size(level);
                    assert_eq!(f.leaf_entry(p + 5 * step, level, prot), e + 5 * step);
                    // The address goes in as it is (small leaves are built
                    // as address | bits): up to the top of the output width.
                    let bits = f.leaf_entry(0, level, prot);
                    assert_eq!(e, p | bits, "{f:?} L{level} {prot:?}");
                    let top = (1u64 << f.output_bits().min(63)) - step;
                    assert_eq!(f.leaf_entry(top, level, prot), top | bits, "{f:?} L{level} {prot:?}");
                }
            }
        }
    }
    check(&ss4());
    check(&ss4().with_snoop_control(true));
    check(&VtdSecondStage::new(5).unwrap());
    check(&X86FirstStage::four_level().with_1g_pages(true));
    check(&X86FirstStage::five_level().with_execute_disable(true));
    check(&AmdV1::new(4).unwrap());
    check(&AmdV1::new(6).unwrap().with_force_coherent(true));
}

#[test]
fn walk_shows_spec_encodings() {
    let mut pt = PageTable::new(ss4(), HeapTables::default()).unwrap();
    pt.map(0x20_0000, 0x4000_0000, M2, Prot::READ).unwrap();
    let steps = pt.walk(0x20_1234);
    assert_eq!(steps.iter().map(|s| s.level).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(steps[0].raw & 0xfff, 0x003);
    assert_eq!(steps[1].raw & 0xfff, 0x003);
    assert_eq!(steps[2].raw, 0x4000_0081);
    assert_eq!((steps[0].index, steps[1].index, steps[2].index), (0, 0, 1));
    let text = format!("{:?}", pt.describe(&steps[2]));
    assert!(text.contains("page 0x40000000 R- PS"), "{text}");
    assert_eq!(pt.iova_to_phys(0x20_1234), Some((0x4000_1234, Prot::READ)));

    let mut fs = PageTable::new(X86FirstStage::four_level(), HeapTables::default()).unwrap();
    fs.map(0x1000, 0x9000, K4, Prot::RW).unwrap();
    let steps = fs.walk(0x1000);
    assert_eq!(steps.len(), 4);
    assert!(steps[..3].iter().all(|s| s.raw & 0xfff == 0x027));
    assert_eq!(steps[3].raw, 0x9067);
}
