//! The passthrough crate end to end over AMD-Vi register models: bring-up
//! from real machines' IVRS tables, guest memory, assignment, MSI routes
//! and unassignment, checked by walking the device table entries, page
//! tables and interrupt remapping tables the driver wrote.
//!
//! Tables from the corpus (`drivers/acpi-tables/tests/corpus/SOURCES.tsv`):
//! * `ivrs-524ae61a2aa7.dat` (Gigabyte 990XA-UD3): one IVHD naming each
//!   device id, with the alias range 06:00.0-06:1f.7 -> 00:14.4 (the
//!   southbridge's conventional PCI bridge, whose secondary bus is 6);
//! * `ivrs-2a874809fdc6.dat` (ThinkPad T14 Gen 3): an IVMD exclusion range
//!   for device 03:00.0, which the driver maps one-to-one;
//! * `ivrs-0f5700a19b3b.dat` (PRIME X399-A): two IOMMUs, device ids
//!   0x0008-0x3ffe and 0x4008-0xfffe.

mod support;

use amdvi::event::{self, Event};
use amdvi::testing::{Invalidation, QEMU_EFR};
use portcullis::{Bdf, Function, GuestAddr, GuestDma, Iommus, PassthroughError, PciFunction, PhysAddr};
use support::host::pci::{CONVENTIONAL, ENDPOINT, INTEGRATED, ROOT_PORT, bdf, bridge, endpoint};
use support::host::{HostBuilder, ModelHost};
use support::walk::{Msi, Outcome, Walk};
use support::{amd_first, amd_invalidated, assert_blocked, assert_maps, changed_since, walk};

const IVRS_990XA: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/ivrs/ivrs-524ae61a2aa7.dat");
const IVRS_T14: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/ivrs/ivrs-2a874809fdc6.dat");
const IVRS_X399: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/ivrs/ivrs-0f5700a19b3b.dat");

/// Guest RAM: (GPA, HPA, length), as in the VT-d tests.
const R1: (u64, u64, u64) = (0, 0x2_4000_0000, 8 << 20);
const R2: (u64, u64, u64) = (0x1_0000_0000, 0x2_8000_3000, 0x20_5000);

/// The IOMMU's PCI capability (IVHD capability offset 0x40): header with
/// EFRSup and CapExt, no NpCache; misc: 48-bit virtual and physical
/// addresses.
fn with_iommu_function(b: HostBuilder, at: Bdf) -> HostBuilder {
    b.config_dword(0, at, 0x40, 0x0f | 1 << 27 | 1 << 28).config_dword(0, at, 0x50, 48 << 15 | 48 << 8)
}

fn mark(host: &ModelHost) -> u64 {
    for b in host.bases() {
        host.amd(b).take_log();
    }
    host.mem.stamp()
}

fn untouched(host: &ModelHost, busy: &[u64], what: &str) {
    for b in host.bases().into_iter().filter(|b| !busy.contains(b)) {
        assert_eq!(host.amd(b).log(), [], "{what}: unit {b:#x} ran commands");
    }
}

/// After a device was attached (since stamp `t0`): its device table entry
/// changed, and the unit was told (INVALIDATE_DEVTAB_ENTRY, and the old
/// entry's domain 0 dropped) after that, and waited for.
fn assert_attach_invalidated(host: &ModelHost, base: u64, rid: u16, t0: u64) -> u16 {
    let w = walk(host, base, rid, 0);
    let did = w.domain.expect("a device table entry");
    assert_ne!(did, 0);
    let changed = changed_since(host, host.unit(base).view, &w.entry_words, t0).expect("the entry changed");
    let log = host.amd(base).log();
    amd_invalidated(&log, changed, "attach: device table entry", |i| i.covers_device(rid));
    amd_invalidated(&log, changed, "attach: the blocked entry's domain", |i| i.covers_pages(0, 0, true));
    did
}

/// What is still allocated besides `at_bring_up`: the per-device interrupt
/// remapping tables of `devices` (the unit keeps them), nothing else.
fn assert_only_interrupt_tables_left(host: &ModelHost, base: u64, at_bring_up: &[(u64, usize)], devices: &[u16]) {
    let kept: Vec<(u64, usize)> = host.mem.live_runs().into_iter().filter(|r| !at_bring_up.contains(r)).collect();
    let (table, _) = host.amd(base).device_table().unwrap();
    let mut expected: Vec<(u64, usize)> = devices
        .iter()
        .map(|&d| {
            let w2 = host.mem.read(host.unit(base).view, table + d as u64 * 32 + 16).unwrap();
            (w2 & 0x000f_ffff_ffff_f000, 1)
        })
        .collect();
    expected.sort();
    assert_eq!(kept, expected, "frames left besides the interrupt remapping tables");
}

const UNIT_990: u64 = 0xfeb2_0000;
/// 06:05.0, behind 00:14.4: its DMA carries 00:14.4's id.
const LEGACY_PCI: Bdf = bdf(6, 5, 0);
const ALIAS_RID: u16 = 0x00a4;
const GPU: Bdf = bdf(1, 0, 0);

fn topology_990() -> Vec<PciFunction> {
    let rp2 = bdf(0, 2, 0);
    let rp4 = bdf(0, 4, 0);
    let sb_bridge = bdf(0, 0x14, 4);
    vec![
        endpoint(bdf(0, 0, 0), None, None),
        endpoint(bdf(0, 0, 2), None, None),
        bridge(rp2, None, ROOT_PORT, 1, 1),
        endpoint(GPU, Some(rp2), ENDPOINT),
        endpoint(bdf(1, 0, 1), Some(rp2), ENDPOINT),
        bridge(rp4, None, ROOT_PORT, 2, 2),
        endpoint(bdf(2, 0, 0), Some(rp4), ENDPOINT),
        endpoint(bdf(0, 0x11, 0), None, None),
        endpoint(bdf(0, 0x12, 0), None, None),
        bridge(sb_bridge, None, CONVENTIONAL, 6, 6),
        endpoint(LEGACY_PCI, Some(sb_bridge), CONVENTIONAL),
        endpoint(bdf(6, 6, 0), Some(sb_bridge), CONVENTIONAL),
        // Northbridge function: no IVHD entry names it.
        endpoint(bdf(0, 0x18, 0), None, None),
    ]
}

/// `ivrs` with the Coherent flag (bit 5) of every IVHD cleared and the
/// checksum fixed: the same machine with a unit whose fetches do not snoop.
fn without_coherent_flag(ivrs: &[u8]) -> Vec<u8> {
    let mut t = ivrs.to_vec();
    let mut at = 48;
    while at + 4 <= t.len() {
        let len = u16::from_le_bytes([t[at + 2], t[at + 3]]) as usize;
        if matches!(t[at], 0x10 | 0x11 | 0x40) {
            t[at + 1] &= !(1 << 5);
        }
        at += len.max(4);
    }
    t[9] = 0;
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = sum.wrapping_neg();
    t
}

#[test]
fn one_unit_from_a_real_ivrs_with_an_alias_range() {
    scenario_990(true);
}

/// The same with the IVHD's Coherent flag clear: the unit reads memory,
/// not the CPU's caches, and the walker reads only lines written back
/// (device table, interrupt tables, page tables, fresh frames' zeroes).
#[test]
fn one_unit_from_a_real_ivrs_non_coherent() {
    let host = scenario_990(false);
    assert!(!host.mem.flushes().is_empty());
}

fn scenario_990(coherent: bool) -> std::sync::Arc<ModelHost> {
    let ivrs = if coherent { IVRS_990XA.to_vec() } else { without_coherent_flag(IVRS_990XA) };
    let host = with_iommu_function(ModelHost::builder(), bdf(0, 0, 2))
        .amd_unit(UNIT_990, QEMU_EFR, coherent)
        .functions(topology_990())
        .ivrs(&ivrs)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build();
    // The alias range is the firmware's.
    let ivrs = acpi_tables::ivrs::Ivrs::parse(IVRS_990XA).unwrap();
    let ranges = ivrs.ivhds().next().unwrap().device_ranges().unwrap();
    assert!(ranges.iter().any(|r| (r.first, r.last, r.alias) == (0x600, 0x6ff, Some(0xa4))));

    let iommus = Iommus::bring_up(host.clone());
    assert_eq!(iommus.units().len(), 1);
    assert!(iommus.units()[0].state.is_ok(), "{:?}", iommus.units());
    assert_eq!(iommus.problems(), []);
    for (f, rid) in [
        (GPU, 0x100),
        (bdf(1, 0, 1), 0x101),
        (LEGACY_PCI, ALIAS_RID),
        (bdf(6, 6, 0), ALIAS_RID),
        (bdf(0, 0x11, 0), 0x88),
    ] {
        assert_eq!(iommus.assignment(0, f).map(|a| a.requester_id), Some(rid), "{f}");
    }
    assert_eq!(iommus.assignment(0, LEGACY_PCI).unwrap().alias_bridge, Some(bdf(0, 0x14, 4)));
    assert_eq!(iommus.assignment(0, bdf(0, 0x18, 0)), None, "not in the IVRS");
    assert_eq!(iommus.assignment(0, bdf(0, 0, 2)), None, "the IOMMU itself");
    // Every device id is blocked, DMA and interrupts, named by the IVRS or
    // not.
    for rid in [0x0000, 0x0088, 0x0100, 0x0101, ALIAS_RID, 0x0628, 0x00c0, 0x7000, 0xffff] {
        assert_blocked(&host, UNIT_990, rid, 0x1000, "after bring-up");
        assert_eq!(
            walk::msi(&host, UNIT_990, rid, 0xfee0_0000, 0).unwrap(),
            Msi::Blocked("IntCtl: abort"),
            "{rid:#06x}'s MSIs after bring-up"
        );
    }
    let runs_at_bring_up = host.mem.live_runs();

    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    for (gpa, hpa, len) in [R1, R2] {
        guest.add_memory(GuestAddr(gpa), PhysAddr(hpa), len, true).unwrap();
    }
    let nb = Function { segment: 0, bdf: bdf(0, 0x18, 0) };
    assert_eq!(guest.assign(&iommus, 0, bdf(0, 0x18, 0)), Err(PassthroughError::NotIsolated(nb)));

    // The function behind the PCI bridge: reached under the bridge's id.
    let t0 = mark(&host);
    guest.assign(&iommus, 0, LEGACY_PCI).unwrap();
    let did = assert_attach_invalidated(&host, UNIT_990, ALIAS_RID, t0);
    for r in [R1, R2] {
        assert_maps(&host, UNIT_990, ALIAS_RID, r);
    }
    assert_blocked(&host, UNIT_990, 0x0628, R1.0, "06:05.0's own id");
    assert_blocked(&host, UNIT_990, 0x0100, R1.0, "the GPU, not assigned yet");
    for iova in [R1.0 + R1.2, R2.0 - 0x1000, R2.0 + R2.2, 0x4000_0000, 0xfee0_0000, 1 << 48] {
        assert_blocked(&host, UNIT_990, ALIAS_RID, iova, "outside guest memory");
    }
    let t0 = mark(&host);
    guest.assign(&iommus, 0, GPU).unwrap();
    assert_attach_invalidated(&host, UNIT_990, 0x100, t0);
    assert_maps(&host, UNIT_990, 0x100, R1);
    assert_blocked(&host, UNIT_990, 0x101, R1.0, "01:00.1 was not assigned");

    // MSIs: each device's own table; the entry names vector and
    // destination, the device table entry points at the table.
    let t0 = mark(&host);
    let portcullis::Msi { address, data, .. } = guest.route_msi(0, LEGACY_PCI, 0x51, 2).unwrap();
    let Msi::Remapped(r) = walk::msi(&host, UNIT_990, ALIAS_RID, address, data).unwrap() else {
        panic!("not remapped")
    };
    assert_eq!((r.vector, r.destination), (0x51, 2));
    let view = host.unit(UNIT_990).view;
    let log = host.amd(UNIT_990).log();
    let (dte, irte) = r.words.split_at(4);
    let changed = changed_since(&host, view, dte, t0).expect("the entry switched to remapped interrupts");
    amd_invalidated(&log, changed, "DTE interrupt fields", |i| i.covers_device(ALIAS_RID));
    let changed = changed_since(&host, view, irte, t0).unwrap();
    amd_invalidated(&log, changed, "IRTE written", |i| i.covers_interrupts(ALIAS_RID));
    assert_eq!(
        walk::msi(&host, UNIT_990, 0x100, address, data).unwrap(),
        Msi::Blocked("IntCtl: abort"),
        "the GPU has no route yet"
    );
    let portcullis::Msi { address: address_gpu, data: data_gpu, .. } = guest.route_msi(0, GPU, 0x52, 0).unwrap();
    let Msi::Remapped(g) = walk::msi(&host, UNIT_990, 0x100, address_gpu, data_gpu).unwrap() else { panic!() };
    assert_eq!((g.vector, g.destination), (0x52, 0));
    let Msi::Remapped(again) = walk::msi(&host, UNIT_990, ALIAS_RID, address_gpu, data_gpu).unwrap() else { panic!() };
    assert_eq!(again.vector, 0x51, "the same message from the other device uses that device's own table");

    // Events the unit logs reach the guest's view.
    assert!(host.amd(UNIT_990).log_event(Event::encode(
        event::IO_PAGE_FAULT,
        ALIAS_RID,
        did,
        event::flags::RW,
        0x9000
    )));
    let batch = guest.dma_faults();
    assert_eq!(
        batch.faults.iter().map(|f| (f.function, f.address, f.write, f.reason)).collect::<Vec<_>>(),
        [(Function { segment: 0, bdf: LEGACY_PCI }, 0x9000, true, event::IO_PAGE_FAULT)]
    );
    assert!(guest.dma_faults().faults.is_empty(), "each fault is read once");

    // Removing memory.
    let devices = [ALIAS_RID, 0x100];
    let before: Vec<Vec<Walk>> = devices
        .iter()
        .map(|&rid| (0..R2.2).step_by(4096).map(|off| walk(&host, UNIT_990, rid, R2.0 + off)).collect())
        .collect();
    let t0 = mark(&host);
    guest.remove_memory(GuestAddr(R2.0), R2.2).unwrap();
    let freed: Vec<_> = host.mem.freed().into_iter().filter(|f| f.stamp > t0).collect();
    let log = host.amd(UNIT_990).log();
    for (&rid, walks) in devices.iter().zip(&before) {
        for (k, old) in walks.iter().enumerate() {
            let iova = R2.0 + k as u64 * 4096;
            assert_blocked(&host, UNIT_990, rid, iova, "removed memory");
            let in_freed = |a: u64| freed.iter().any(|f| a >= f.base && a < f.base + f.count as u64 * 4096);
            let kept: Vec<u64> = old.table_words.iter().copied().filter(|&a| !in_freed(a)).collect();
            let changed = changed_since(&host, view, &kept, t0).expect("an entry on the walk changed");
            let tables = old.tables.iter().any(|&t| in_freed(t));
            amd_invalidated(&log, changed, "unmap", |i| i.covers_pages(did, iova, tables));
            let inv = amd_first(&log, changed, |i| i.covers_pages(did, iova, tables)).unwrap();
            for f in
                freed.iter().filter(|f| old.tables.iter().any(|&t| t >= f.base && t < f.base + f.count as u64 * 4096))
            {
                assert!(f.stamp > inv, "table {:#x} freed before the invalidation covering {iova:#x}", f.base);
            }
        }
        assert_maps(&host, UNIT_990, rid, R1);
    }

    // Unassigning.
    let t0 = mark(&host);
    guest.unassign(0, LEGACY_PCI).unwrap();
    let w = walk(&host, UNIT_990, ALIAS_RID, R1.0);
    assert_eq!(w.outcome, Outcome::Blocked("mode 0 without IR/IW"));
    let log = host.amd(UNIT_990).log();
    let changed = changed_since(&host, view, &w.entry_words, t0).unwrap();
    amd_invalidated(&log, changed, "detach: device table entry", |i| i.covers_device(ALIAS_RID));
    amd_invalidated(&log, changed, "detach: the domain's IOTLB", |i| {
        matches!(*i, Invalidation::IommuPages { domain_id, start: 0, last: u64::MAX, pde: true, pasid: None } if domain_id == did)
            || *i == Invalidation::All
    });
    assert_eq!(walk::msi(&host, UNIT_990, ALIAS_RID, address, data).unwrap(), Msi::Blocked("RemapEn clear"));
    let changed = changed_since(&host, view, irte, t0).unwrap();
    amd_invalidated(&log, changed, "IRTE cleared", |i| i.covers_interrupts(ALIAS_RID));
    assert_maps(&host, UNIT_990, 0x100, R1);

    guest.unassign(0, GPU).unwrap();
    assert_eq!(walk::msi(&host, UNIT_990, 0x100, address_gpu, data_gpu).unwrap(), Msi::Blocked("RemapEn clear"));
    for rid in [0x100, ALIAS_RID] {
        assert_blocked(&host, UNIT_990, rid, R1.0, "at the end");
    }
    guest.remove_memory(GuestAddr(R1.0), R1.2).unwrap();
    drop(guest);
    assert_only_interrupt_tables_left(&host, UNIT_990, &runs_at_bring_up, &[ALIAS_RID, 0x100]);
    assert_eq!(host.amd(UNIT_990).state().illegal_commands, 0);
    host
}

/// The T14's IVMD exclusion range for 03:00.0 is mapped one-to-one (the
/// driver gives exclusion ranges that way) before the device's entry
/// points at the domain.
#[test]
fn an_ivmd_exclusion_range_is_identity_mapped_on_attach() {
    const UNIT: u64 = 0xfe00_0000;
    const EXCLUDED: (u64, u64) = (0x7132_f000, 0x7132_f000 + 0x26000 - 1);
    let rp = bdf(0, 2, 4);
    let host = with_iommu_function(ModelHost::builder(), bdf(0, 0, 2))
        .amd_unit(UNIT, QEMU_EFR, true)
        .functions(vec![
            endpoint(bdf(0, 0, 0), None, None),
            endpoint(bdf(0, 0, 2), None, None),
            bridge(rp, None, ROOT_PORT, 3, 3),
            endpoint(bdf(3, 0, 0), Some(rp), ENDPOINT),
            endpoint(bdf(0, 8, 1), None, INTEGRATED),
        ])
        .ivrs(IVRS_T14)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build();
    let iommus = Iommus::bring_up(host.clone());
    assert!(iommus.units()[0].state.is_ok());
    assert_eq!(iommus.problems(), []);
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    let t0 = mark(&host);
    guest.assign(&iommus, 0, bdf(3, 0, 0)).unwrap();
    assert_attach_invalidated(&host, UNIT, 0x300, t0);
    assert_maps(&host, UNIT, 0x300, R1);
    let view = host.unit(UNIT).view;
    let entry_changed = changed_since(&host, view, &walk(&host, UNIT, 0x300, 0).entry_words, t0).unwrap();
    for page in (EXCLUDED.0..EXCLUDED.1).step_by(4096) {
        let w = walk(&host, UNIT, 0x300, page + 0x10);
        assert_eq!(w.hpa(true), Some(page + 0x10), "excluded page {page:#x}: {:?}", w.outcome);
        let mapped = changed_since(&host, view, &w.table_words, t0).unwrap();
        assert!(mapped < entry_changed, "page {page:#x} mapped after the device was attached");
    }
    assert_blocked(&host, UNIT, 0x300, EXCLUDED.1 + 1, "past the range");
    assert_blocked(&host, UNIT, 0x41, EXCLUDED.0, "00:08.1 was not assigned");
    // The range can never be guest memory for that device.
    assert!(guest.add_memory(GuestAddr(EXCLUDED.0), PhysAddr(0x3_0000_0000), 0x1000, true).is_err());
}

/// Two IOMMUs: each device goes through the unit the IVRS puts it under,
/// and the other unit is never touched.
#[test]
fn two_units_each_translate_only_their_own_devices() {
    const DIE0: u64 = 0xefd0_0000;
    const DIE1: u64 = 0xb7b0_0000;
    let (rp0, rp1) = (bdf(0, 1, 1), bdf(0x40, 1, 1));
    let (dev0, dev1) = (bdf(1, 0, 0), bdf(0x41, 0, 0));
    let b = with_iommu_function(ModelHost::builder(), bdf(0, 0, 2));
    let host = with_iommu_function(b, bdf(0x40, 0, 2))
        .amd_unit(DIE0, QEMU_EFR, true)
        .amd_unit(DIE1, QEMU_EFR, true)
        .functions(vec![
            endpoint(bdf(0, 0, 2), None, None),
            endpoint(bdf(0x40, 0, 2), None, None),
            bridge(rp0, None, ROOT_PORT, 1, 1),
            endpoint(dev0, Some(rp0), ENDPOINT),
            bridge(rp1, None, ROOT_PORT, 0x41, 0x41),
            endpoint(dev1, Some(rp1), ENDPOINT),
        ])
        .ivrs(IVRS_X399)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build();
    let iommus = Iommus::bring_up(host.clone());
    let bases: Vec<u64> = iommus.units().iter().map(|u| u.base.0).collect();
    assert_eq!(bases.len(), 2);
    assert!(bases.contains(&DIE0) && bases.contains(&DIE1));
    assert!(iommus.units().iter().all(|u| u.state.is_ok()));
    assert_eq!(bases[iommus.assignment(0, dev0).unwrap().unit], DIE0);
    assert_eq!(bases[iommus.assignment(0, dev1).unwrap().unit], DIE1);
    assert_eq!(iommus.assignment(0, bdf(0x40, 0, 2)), None, "the second IOMMU itself");

    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    for (dev, rid, unit, other) in [(dev0, 0x100, DIE0, DIE1), (dev1, 0x4100, DIE1, DIE0)] {
        let t0 = mark(&host);
        guest.assign(&iommus, 0, dev).unwrap();
        untouched(&host, &[unit], &format!("assigning {dev}"));
        assert_attach_invalidated(&host, unit, rid, t0);
        assert_maps(&host, unit, rid, R1);
        assert_blocked(&host, other, rid, R1.0, "the other unit's entry for the same id");
    }
    let t0 = mark(&host);
    guest.unassign(0, dev0).unwrap();
    untouched(&host, &[DIE0], "unassigning 01:00.0");
    let w = walk(&host, DIE0, 0x100, R1.0);
    assert!(w.blocked());
    let changed = changed_since(&host, host.unit(DIE0).view, &w.entry_words, t0).unwrap();
    amd_invalidated(&host.amd(DIE0).log(), changed, "detach", |i| i.covers_device(0x100));
    assert_maps(&host, DIE1, 0x4100, R1);
}

/// 06:05.0 and 06:06.0 both reach the unit as 00:14.4: one guest at a
/// time may have them.
#[test]
fn functions_behind_the_pci_bridge_belong_to_one_guest() {
    let host = with_iommu_function(ModelHost::builder(), bdf(0, 0, 2))
        .amd_unit(UNIT_990, QEMU_EFR, true)
        .functions(topology_990())
        .ivrs(IVRS_990XA)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build();
    let iommus = Iommus::bring_up(host.clone());
    let mut g1 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g1.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    let mut g2 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g2.add_memory(GuestAddr(R1.0), PhysAddr(R2.1), R1.2, true).unwrap();
    g1.assign(&iommus, 0, LEGACY_PCI).unwrap();
    mark(&host);
    let sibling = bdf(6, 6, 0);
    assert_eq!(
        g2.assign(&iommus, 0, sibling),
        Err(PassthroughError::Owned(Function { segment: 0, bdf: sibling }, g1.owner()))
    );
    untouched(&host, &[], "a refused assignment");
    assert_maps(&host, UNIT_990, ALIAS_RID, R1);
    drop(g1);
    assert_blocked(&host, UNIT_990, ALIAS_RID, R1.0, "the first guest is gone");
    g2.assign(&iommus, 0, sibling).unwrap();
    assert_maps(&host, UNIT_990, ALIAS_RID, (R1.0, R2.1, R1.2));
}

/// A function's interrupt remapping table holds as many entries as its
/// MSI/MSI-X capabilities give it vectors (the next power of two, at least
/// 2): the GPU's MSI-X table of 37 vectors gets 64 entries, the PCI
/// device with one MSI vector 2; a route beyond the table is refused.
#[test]
fn interrupt_tables_are_sized_to_the_functions_vectors() {
    let host = with_iommu_function(ModelHost::builder(), bdf(0, 0, 2))
        .amd_unit(UNIT_990, QEMU_EFR, true)
        .functions(topology_990())
        // The GPU: PCI Express capability at 0x40, then MSI-X at 0x60 with
        // Table Size 36 (37 vectors).
        .config_dword(0, GPU, 0x40, 0x10 | 0x60 << 8 | 2 << 16)
        .config_dword(0, GPU, 0x60, 0x11 | 36 << 16)
        // 06:05.0: a capability list with MSI alone, Multiple Message
        // Capable 0 (one vector).
        .config_dword(0, LEGACY_PCI, 0x04, 1 << 20)
        .config_dword(0, LEGACY_PCI, 0x34, 0x50)
        .config_dword(0, LEGACY_PCI, 0x50, 0x05)
        .ivrs(IVRS_990XA)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build();
    let iommus = Iommus::bring_up(host.clone());
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    guest.assign(&iommus, 0, GPU).unwrap();
    guest.assign(&iommus, 0, LEGACY_PCI).unwrap();
    let int_tab_len = |rid: u16| {
        let w = walk(&host, UNIT_990, rid, 0);
        host.mem.read(host.unit(UNIT_990).view, w.entry_words[2]).unwrap() >> 1 & 0xf
    };
    let mut gpu = Vec::new();
    for k in 0..64u32 {
        let m = guest.route_msi(0, GPU, 0x40 + k as u8, 0).unwrap();
        assert_eq!(m.data, k, "entry {k}");
        gpu.push(m);
    }
    assert_eq!(int_tab_len(0x100), 6, "64 entries for 37 vectors");
    let e = guest.route_msi(0, GPU, 0x90, 0).unwrap_err();
    assert!(matches!(e, PassthroughError::Interrupt(_, ref u) if u.cause == amdvi::HwError::TableFull), "{e:?}");
    let Msi::Remapped(r) = walk::msi(&host, UNIT_990, 0x100, gpu[63].address, gpu[63].data).unwrap() else {
        panic!("entry 63 not remapped")
    };
    assert_eq!(r.vector, 0x40 + 63);
    for k in 0..2 {
        assert_eq!(guest.route_msi(0, LEGACY_PCI, 0x50 + k, 1).unwrap().data, k as u32);
    }
    assert_eq!(int_tab_len(ALIAS_RID), 1, "2 entries for one vector");
    assert!(guest.route_msi(0, LEGACY_PCI, 0x52, 1).is_err(), "a third route of a 2-entry table");
    assert_eq!(walk::msi(&host, UNIT_990, ALIAS_RID, 0xfee0_0000, 2).unwrap(), Msi::Blocked("index beyond IntTabLen"));
}
