//! Tables built by hand: ones shaped like QEMU's intel-iommu / amd-iommu
//! output, and small broken tables checking that each error names the right
//! offset, structure and problem.

mod common;

use acpi_tables::dmar::{self, AtsrFlags, Dmar, DmarFlags, DrhdFlags, SatcFlags, Structure};
use acpi_tables::ivrs::{self, Block, DeviceRange, EntryKind, IvhdFlags, IvmdFlags, Ivrs, Uid};
use acpi_tables::scope::{self, Bdf, ConfigSpace};
use acpi_tables::{Error, ErrorKind};
use common::*;

/// Shaped like QEMU's q35 + `-device intel-iommu,intremap=on,device-iotlb=on`:
/// 39-bit HAW, INTR_REMAP, one INCLUDE_PCI_ALL DRHD at 0xfed90000 whose only
/// scope is the IOAPIC on the pseudo platform bus, and an ALL_PORTS ATSR.
fn qemu_dmar() -> Vec<u8> {
    dmar(
        38,
        dmar::FLAG_INTR_REMAP,
        &[drhd(1, 0, 0, 0xfed9_0000, &[scope(dmar::SCOPE_IOAPIC, 0, 0xff, &[(0, 0)])]), atsr(1, 0, &[])],
    )
}

#[test]
fn qemu_intel_iommu_dmar() {
    let t = Dmar::parse(&qemu_dmar()).unwrap();
    assert_eq!(&t.header.signature, b"DMAR");
    assert_eq!(&t.header.oem_id, b"BOCHS ");
    assert_eq!(t.host_address_width, 38);
    assert_eq!(t.dma_address_bits(), 39);
    assert!(t.has_flag(dmar::FLAG_INTR_REMAP));
    assert!(!t.has_flag(dmar::FLAG_X2APIC_OPT_OUT));
    assert_eq!(t.flags(), DmarFlags::INTR_REMAP);
    let drhds: Vec<_> = t.drhds().collect();
    assert_eq!(drhds.len(), 1);
    let d = drhds[0];
    assert_eq!((d.offset, d.segment, d.register_base), (48, 0, 0xfed9_0000));
    assert!(d.include_pci_all());
    assert_eq!(d.flags(), DrhdFlags::INCLUDE_PCI_ALL);
    assert_eq!(d.register_set_bytes(), 4096);
    assert_eq!(d.scopes.len(), 1);
    let s = &d.scopes[0];
    assert_eq!((s.offset, s.scope_type, s.enumeration_id, s.start_bus), (64, 3, 0, 0xff));
    assert_eq!(s.path, vec![(0, 0)]);
    assert_eq!(s.type_name(), "IOAPIC");
    struct NoDevices;
    impl ConfigSpace for NoDevices {
        fn read_u32(&self, _: u16, _: Bdf, _: u16) -> Option<u32> {
            None
        }
    }
    assert_eq!(scope::resolve(d.segment, s, &NoDevices), Ok(Bdf::new(0xff, 0, 0)));
    let atsr: Vec<_> = t.atsrs().collect();
    assert!(atsr[0].all_ports() && atsr[0].scopes.is_empty());
    assert_eq!(atsr[0].flags(), AtsrFlags::ALL_PORTS);
    assert_eq!(t.rmrrs().count(), 0);
}

#[test]
fn dmar_with_every_structure_type() {
    let mut andd_body = vec![0, 0, 0, 7];
    andd_body.extend_from_slice(b"\\_SB.PCI0.I2C1\0");
    let mut rhsa_body = vec![0; 4];
    rhsa_body.extend_from_slice(&0xfed9_1000u64.to_le_bytes());
    rhsa_body.extend_from_slice(&3u32.to_le_bytes());
    let t = dmar(
        45,
        dmar::FLAG_INTR_REMAP | dmar::FLAG_DMA_CTRL_PLATFORM_OPT_IN,
        &[
            drhd(
                0,
                2,
                1,
                0xfed9_1000,
                &[
                    scope(dmar::SCOPE_PCI_ENDPOINT, 0, 0, &[(2, 0)]),
                    scope(dmar::SCOPE_PCI_SUB_HIERARCHY, 0, 0, &[(0x1c, 0), (0, 0)]),
                    scope(dmar::SCOPE_HPET, 0, 0, &[(0x1f, 0)]),
                    scope(dmar::SCOPE_ACPI_NAMESPACE_DEVICE, 7, 0, &[(0x15, 1)]),
                ],
            ),
            rmrr(0, 0x7c00_0000, 0x7fff_ffff, &[scope(1, 0, 0, &[(2, 0)])]),
            structure(3, &rhsa_body, &[]),
            structure(4, &andd_body, &[]),
            structure(5, &[1, 0, 0, 0], &[scope(1, 0, 0, &[(0xb, 0)])]),
            structure(6, &[0, 0, 0, 0], &[scope(1, 0, 0, &[(0xc, 0)])]),
            structure(0x99, &[1, 2, 3, 4], &[]),
        ],
    );
    let t = Dmar::parse(&t).unwrap();
    assert_eq!(t.flags(), DmarFlags::INTR_REMAP | DmarFlags::DMA_CTRL_PLATFORM_OPT_IN);
    let names: Vec<_> = t.structures.iter().map(Structure::name).collect();
    assert_eq!(names, ["DRHD", "RMRR", "RHSA", "ANDD", "SATC", "SIDP", "unknown"]);
    let d = t.drhds().next().unwrap();
    assert_eq!((d.segment, d.size, d.register_set_bytes()), (1, 2, 16384));
    assert!(!d.include_pci_all() && d.flags().is_empty());
    assert_eq!(d.scopes[1].path, vec![(0x1c, 0), (0, 0)]);
    let r = t.rmrrs().next().unwrap();
    assert_eq!((r.base, r.limit), (0x7c00_0000, 0x7fff_ffff));
    match &t.structures[2] {
        Structure::Rhsa(x) => assert_eq!((x.register_base, x.proximity_domain), (0xfed9_1000, 3)),
        s => panic!("{s:?}"),
    }
    match &t.structures[3] {
        Structure::Andd(x) => assert_eq!((x.acpi_device_number, x.object_name.as_str()), (7, "\\_SB.PCI0.I2C1")),
        s => panic!("{s:?}"),
    }
    match &t.structures[4] {
        Structure::Satc(x) => {
            assert_eq!((x.flags, x.scopes[0].path[0]), (1, (0xb, 0)));
            assert!(x.atc_required() && x.flags() == SatcFlags::ATC_REQUIRED);
        }
        s => panic!("{s:?}"),
    }
    match &t.structures[5] {
        Structure::Sidp(x) => assert_eq!(x.scopes[0].path[0], (0xc, 0)),
        s => panic!("{s:?}"),
    }
    match t.structures[6] {
        Structure::Unknown { kind, length, offset } => {
            assert_eq!((kind, length), (0x99, 8));
            assert_eq!(offset, t.structures[5].offset() + 16);
        }
        ref s => panic!("{s:?}"),
    }
}

/// Shaped like QEMU's `-device amd-iommu`: IVHD 0x10, 0x11 and 0x40 blocks
/// for the IOMMU at 00:02.0 with MMIO at 0xfed80000, each covering all
/// devices and naming the IOAPIC (ID 0) behind 00:14.0.
fn qemu_ivrs(with_hid: bool) -> Vec<u8> {
    let mut entries = vec![e4(1, 0, 0), special(0, 0x00a0, 0xd7, ivrs::VARIETY_IOAPIC)];
    let plain = entries.clone();
    if with_hid {
        entries.push(hid_entry(0x00a5, 0x40, b"AMDI0020", &[0; 8], ivrs::UID_STRING, b"\\_SB.FUR0\0"));
        entries.push(hid_entry(0x00a6, 0, b"AMDI0040", b"PNP0C0A\0", ivrs::UID_INTEGER, &5u64.to_le_bytes()));
        entries.push(hid_entry(0x00a7, 0, b"AMDI0050", &[0; 8], ivrs::UID_NONE, &[]));
    }
    ivrs(
        (40 << 8) | (48 << 15) | 1,
        &[
            ivhd(0x10, 0xd1, 0x0010, 0xfed8_0000, 0x0000_0044, 0, &plain),
            ivhd(0x11, 0xd1, 0x0010, 0xfed8_0000, 0, 0x0000_0000_0000_00a5, &plain),
            ivhd(0x40, 0xd1, 0x0010, 0xfed8_0000, 0, 0x0000_0000_0000_00a5, &entries),
        ],
    )
}

#[test]
fn qemu_amd_iommu_ivrs() {
    let t = Ivrs::parse(&qemu_ivrs(true)).unwrap();
    assert_eq!(t.iv_info, (40 << 8) | (48 << 15) | 1);
    let hs: Vec<_> = t.ivhds().collect();
    assert_eq!(hs.iter().map(|h| h.kind).collect::<Vec<_>>(), [0x10, 0x11, 0x40]);
    for h in &hs {
        assert_eq!((h.device_id, h.capability_offset, h.base_address, h.segment), (0x10, 0x40, 0xfed8_0000, 0));
        // 0xd1: PPRSup, PreFSup, IotlbSup, HtTunEn; not coherent.
        let want = IvhdFlags::PPR_SUP | IvhdFlags::PREF_SUP | IvhdFlags::IOTLB_SUP | IvhdFlags::HT_TUN_EN;
        assert_eq!(h.flags(), want);
        assert!(!h.coherent());
        assert_eq!(
            h.device_ranges().unwrap(),
            [DeviceRange { first: 0, last: 0xffff, data_setting: 0, alias: None, ext: None }]
        );
        assert_eq!(h.specials().collect::<Vec<_>>(), [(ivrs::VARIETY_IOAPIC, 0, 0x00a0)]);
    }
    assert_eq!((hs[0].feature, hs[0].efr, hs[0].efr2), (0x44, None, None));
    assert_eq!((hs[1].efr, hs[1].efr2), (Some(0xa5), Some(0)));
    let hids: Vec<_> = hs[2]
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::AcpiHid { device_id, hid, cid, uid, .. } => {
                Some((*device_id, ivrs::id_string(hid), ivrs::id_string(cid), uid.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        hids,
        [
            (0xa5, "AMDI0020".to_string(), String::new(), Uid::String("\\_SB.FUR0".into())),
            (0xa6, "AMDI0040".to_string(), "PNP0C0A".to_string(), Uid::Integer(5)),
            (0xa7, "AMDI0050".to_string(), String::new(), Uid::None),
        ]
    );
    // The entry after a variable-length one starts where it ends.
    let offs: Vec<_> = hs[2].entries.iter().map(|e| e.offset).collect();
    assert_eq!(offs[3] - offs[2], 22 + 10);
    assert_eq!(offs[4] - offs[3], 22 + 8);
}

#[test]
fn ivhd_entry_kinds_and_ranges() {
    let entries = vec![
        e4(0, 0, 0),
        e4(2, 0x0008, 0x11),
        e4(3, 0x0100, 0x22),
        special(1, 0x00a0, 0, ivrs::VARIETY_HPET),
        e4(4, 0x01ff, 0),
        e8(0x42, 0x0300, 0x33, [0, 0x10, 0x03, 0]),
        e8(0x43, 0x0400, 0x44, [0, 0xa5, 0x00, 0]),
        e4(4, 0x04ff, 0),
        e8(0x46, 0x0500, 0x55, 0x8000_0001u32.to_le_bytes()),
        e8(0x47, 0x0600, 0x66, 7u32.to_le_bytes()),
        e4(4, 0x0610, 0),
        e8(0x40, 0, 0, [0; 4]),
        e4(0x3f, 0, 0),
        e8(0x7f, 0, 0, [0; 4]),
    ];
    let t = Ivrs::parse(&ivrs(0, &[ivhd(0x10, 0, 2, 0xfd20_0000, 0, 0, &entries)])).unwrap();
    let h = t.ivhds().next().unwrap();
    let names: Vec<_> = h.entries.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names,
        [
            "pad4",
            "select",
            "start_range",
            "special",
            "end_range",
            "alias_select",
            "alias_start_range",
            "end_range",
            "ext_select",
            "ext_start_range",
            "end_range",
            "pad8",
            "reserved",
            "reserved"
        ]
    );
    assert_eq!(h.entries[12].kind, EntryKind::Reserved { length: 4 });
    assert_eq!(h.entries[13].kind, EntryKind::Reserved { length: 8 });
    let r = |first, last, data_setting, alias, ext| DeviceRange { first, last, data_setting, alias, ext };
    assert_eq!(
        h.device_ranges().unwrap(),
        [
            r(0x0008, 0x0008, 0x11, None, None),
            r(0x0100, 0x01ff, 0x22, None, None),
            r(0x0300, 0x0300, 0x33, Some(0x0310), None),
            r(0x0400, 0x04ff, 0x44, Some(0x00a5), None),
            r(0x0500, 0x0500, 0x55, None, Some(0x8000_0001)),
            r(0x0600, 0x0610, 0x66, None, Some(7)),
        ]
    );
}

#[test]
fn ivmd_and_unknown_blocks() {
    let mut unknown = vec![0x51, 0, 12, 0];
    unknown.extend_from_slice(&[0xaa; 8]);
    let t = Ivrs::parse(&ivrs(
        0,
        &[ivmd(0x20, 1, 0, 0, 0x1000, 0x2000), ivmd(0x22, 8, 0x0100, 0x01ff, 0x7000_0000, 0x10_0000), unknown],
    ))
    .unwrap();
    assert_eq!(t.ivmds().count(), 2);
    match &t.blocks[1] {
        Block::Ivmd(m) => {
            assert_eq!((m.offset, m.kind, m.flags, m.device_id, m.aux_data), (80, 0x22, 8, 0x100, 0x1ff));
            assert_eq!(m.flags(), IvmdFlags::EXCLUSION_RANGE);
            assert_eq!((m.start, m.length), (0x7000_0000, 0x10_0000));
        }
        b => panic!("{b:?}"),
    }
    assert_eq!(t.blocks[2], Block::Unknown { kind: 0x51, offset: 112, length: 12 });
}

// ---- error paths ----------------------------------------------------------

fn err(bytes: &[u8]) -> Error {
    if bytes.starts_with(b"IVRS") { Ivrs::parse(bytes).unwrap_err() } else { Dmar::parse(bytes).unwrap_err() }
}

fn expect(bytes: &[u8], offset: usize, structure: &str, kind: ErrorKind) {
    let e = err(bytes);
    assert_eq!((e.offset, e.structure, &e.kind), (offset, structure, &kind), "{e}");
    let shown = e.to_string();
    assert!(shown.contains(&format!("{offset:#x}")) && shown.contains(structure), "{shown}");
}

#[test]
fn header_errors() {
    let good = qemu_dmar();
    expect(&good[..10], 0, "table header", ErrorKind::Truncated { needed: 36, available: 10 });
    expect(
        &good[..good.len() - 1],
        0,
        "table header",
        ErrorKind::Truncated { needed: good.len(), available: good.len() - 1 },
    );
    let mut b = good.clone();
    b[9] = b[9].wrapping_add(1);
    expect(&b, 9, "table header", ErrorKind::BadChecksum { sum: 1 });
    assert_eq!(err(&b).to_string(), "table header at offset 0x9: bad checksum (bytes sum to 0x01, expected 0)");
    let e = Ivrs::parse(&good).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadSignature { expected: *b"IVRS", found: *b"DMAR" });
    assert!(e.to_string().contains("bad signature \"DMAR\" (expected \"IVRS\")"), "{e}");
    // Length shorter than the DMAR fixed part.
    let mut b = good[..40].to_vec();
    finish(&mut b);
    expect(&b, 4, "table header", ErrorKind::BadLength { length: 40, min: 48 });
    // Trailing bytes past the declared length are ignored.
    let mut b = good.clone();
    b.extend_from_slice(&[0xee; 7]);
    assert!(Dmar::parse(&b).is_ok());
}

#[test]
fn dmar_structure_errors() {
    // Zero-length structure: must not loop.
    let mut zero = drhd(1, 0, 0, 0xfed9_0000, &[]);
    zero[2] = 0;
    zero[3] = 0;
    expect(&dmar(38, 1, &[zero]), 48, "DRHD", ErrorKind::BadLength { length: 0, min: 16 });
    // Shorter than the fixed part.
    let mut short = rmrr(0, 0, 0xfff, &[]);
    short[2] = 20;
    short.truncate(20);
    expect(&dmar(38, 1, &[short]), 48, "RMRR", ErrorKind::BadLength { length: 20, min: 24 });
    // Overrunning the table.
    let mut over = drhd(1, 0, 0, 0xfed9_0000, &[]);
    over[2] = 0x40;
    expect(&dmar(38, 1, &[over]), 48, "DRHD", ErrorKind::Overrun { length: 64, available: 16 });
    // Unknown type with a zero length is still an error.
    expect(&dmar(38, 1, &[vec![9, 0, 0, 0]]), 48, "remapping structure", ErrorKind::BadLength { length: 0, min: 4 });
    // Fewer than 4 bytes left for a structure header.
    let good = drhd(1, 0, 0, 0xfed9_0000, &[]);
    expect(
        &dmar(38, 1, &[good.clone(), vec![0, 0]]),
        64,
        "remapping structure",
        ErrorKind::Truncated { needed: 4, available: 2 },
    );
    // RHSA shorter than 20.
    expect(&dmar(38, 1, &[structure(3, &[0; 8], &[])]), 48, "RHSA", ErrorKind::BadLength { length: 12, min: 20 });
}

#[test]
fn device_scope_errors() {
    let s = scope(1, 0, 0, &[(2, 0)]);
    let with = |mutate: &dyn Fn(&mut Vec<u8>)| {
        let mut sc = s.clone();
        mutate(&mut sc);
        dmar(38, 1, &[drhd(0, 0, 0, 0xfed9_0000, &[sc])])
    };
    // Scope starts at 48 + 16 = 64.
    expect(&with(&|sc| sc[1] = 0), 64, "device scope", ErrorKind::BadLength { length: 0, min: 6 });
    expect(&with(&|sc| sc[1] = 5), 64, "device scope", ErrorKind::BadLength { length: 5, min: 6 });
    expect(&with(&|sc| sc[1] = 7), 65, "device scope", ErrorKind::BadLength { length: 7, min: 6 });
    expect(&with(&|sc| sc[1] = 10), 64, "device scope", ErrorKind::Overrun { length: 10, available: 8 });
    // A single stray byte after the last scope.
    expect(&with(&|sc| sc.push(0)), 72, "device scope", ErrorKind::Truncated { needed: 2, available: 1 });
    // A scope with an empty path parses (resolution reports it).
    let t = Dmar::parse(&with(&|sc| {
        sc.truncate(6);
        sc[1] = 6;
    }))
    .unwrap();
    assert!(t.drhds().next().unwrap().scopes[0].path.is_empty());
}

#[test]
fn ivrs_errors() {
    let ok_block = ivhd(0x10, 0, 2, 0xfd20_0000, 0, 0, &[e4(1, 0, 0)]);
    // Zero-length block.
    let mut b = ok_block.clone();
    b[2] = 0;
    expect(&ivrs(0, &[b]), 48, "IVHD type 0x10", ErrorKind::BadLength { length: 0, min: 24 });
    // 0x11 block shorter than its 40-byte fixed part.
    let mut b = ok_block.clone();
    b[0] = 0x11;
    expect(&ivrs(0, &[b]), 48, "IVHD type 0x11", ErrorKind::BadLength { length: 28, min: 40 });
    // Block overrunning the table.
    let mut b = ok_block.clone();
    b[2] = 0xff;
    expect(&ivrs(0, &[b]), 48, "IVHD type 0x10", ErrorKind::Overrun { length: 255, available: 28 });
    // IVMD too short.
    let mut m = ivmd(0x21, 0, 8, 0, 0, 0x1000);
    m[2] = 16;
    expect(&ivrs(0, &[m]), 48, "IVMD", ErrorKind::BadLength { length: 16, min: 32 });
    // 8-byte entry cut by the block end: block = 24 + 4 + 4.
    let b = ivhd(0x10, 0, 2, 0, 0, 0, &[e4(1, 0, 0), e4(0x42, 0, 0)]);
    expect(&ivrs(0, &[b]), 76, "IVHD entry", ErrorKind::Overrun { length: 8, available: 4 });
    // Variable-length type of unknown size.
    let b = ivhd(0x10, 0, 2, 0, 0, 0, &[e4(0x80, 0, 0)]);
    expect(&ivrs(0, &[b]), 72, "IVHD entry", ErrorKind::UnknownEntrySize { entry_type: 0x80 });
    // ACPI HID entry whose UID runs past the block.
    let mut h = hid_entry(0xa5, 0, b"AMDI0020", &[0; 8], 2, b"\\_SB.FUR0\0");
    h[21] = 40;
    let b = ivhd(0x40, 0, 2, 0, 0, 0, &[h]);
    expect(&ivrs(0, &[b]), 88, "IVHD entry", ErrorKind::Overrun { length: 62, available: 32 });
    // ACPI HID entry too short to hold its UID length byte.
    let b = ivhd(0x40, 0, 2, 0, 0, 0, &[hid_entry(0xa5, 0, b"AMDI0020", &[0; 8], 0, &[])[..16].to_vec()]);
    expect(&ivrs(0, &[b]), 88, "IVHD entry", ErrorKind::Truncated { needed: 22, available: 16 });
    // Block header cut short.
    expect(
        &ivrs(0, &[ok_block.clone(), vec![0x10, 0]]),
        76,
        "IVRS block",
        ErrorKind::Truncated { needed: 4, available: 2 },
    );
}

#[test]
fn device_range_errors() {
    let ranges = |entries: &[Vec<u8>]| {
        let t = Ivrs::parse(&ivrs(0, &[ivhd(0x10, 0, 2, 0, 0, 0, entries)])).unwrap();
        t.ivhds().next().unwrap().device_ranges()
    };
    let e = ranges(&[e4(3, 0x10, 0)]).unwrap_err();
    assert_eq!((e.offset, e.kind), (72, ErrorKind::UnpairedRangeStart));
    let e = ranges(&[e4(3, 0x10, 0), e4(3, 0x20, 0), e4(4, 0x30, 0)]).unwrap_err();
    assert_eq!((e.offset, e.kind), (72, ErrorKind::UnpairedRangeStart));
    let e = ranges(&[e4(2, 0x10, 0), e4(4, 0x30, 0)]).unwrap_err();
    assert_eq!((e.offset, e.kind), (76, ErrorKind::UnpairedRangeEnd));
    let e = ranges(&[e8(0x43, 0x40, 0, [0; 4]), e4(4, 0x30, 0)]).unwrap_err();
    assert_eq!((e.offset, e.kind.clone()), (80, ErrorKind::InvertedRange { first: 0x40, last: 0x30 }));
    assert_eq!(e.to_string(), "IVHD entry at offset 0x50: range 0x0040..=0x0030 ends before it starts");
}
