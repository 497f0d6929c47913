//! The passthrough crate end to end over VT-d register models: bring-up
//! from a real machine's DMAR, guest memory, assignment, MSI routes and
//! unassignment, checked by walking what the driver wrote.
//!
//! The DMAR is `dmar-0d29630957f2.dat` from the corpus (a Supermicro
//! X10DAi, two Xeon sockets; `drivers/acpi-tables/tests/corpus/SOURCES.tsv`):
//! three DRHDs, one with endpoint scopes (80:04.0-7) and sub-hierarchy
//! scopes (bridges 80:01.0 and 80:02.0) on the second root bus, one with
//! the single endpoint 00:1b.0, and an INCLUDE_PCI_ALL unit; one RMRR for
//! the USB controllers 00:14.0, 00:1a.0 and 00:1d.0. The PCI topology below
//! is built to what those scopes name, with a PCIe-to-PCI bridge (82:00.0)
//! under 80:02.0 whose conventional devices alias to 83:00.0.

mod support;

use iommufd::uapi::{
    IOMMU_PGFAULT_FLAGS_LAST_PAGE, IOMMU_PGFAULT_PERM_READ, IOMMU_PGFAULT_PERM_WRITE, IommuHwptPgfault,
    PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE,
};
use portcullis::{
    Bdf, GuestAddr, GuestDma, GuestFault, HwError, Iommus, Options, PassthroughError, PciFunction, PhysAddr, UnitError,
};
use std::sync::Arc;
use support::host::pci::{CONVENTIONAL, ENDPOINT, INTEGRATED, PCIE_TO_PCI, ROOT_PORT, bdf, bridge, endpoint};
use support::host::{ModelHost, POISON, View};
use support::walk::{Msi, Outcome, Walk, WalkError};
use support::{assert_blocked, assert_maps, changed_since, vtd_first, vtd_invalidated, walk};
use vtd::testing::{Config, Invalidation};

const DMAR: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/dmar/dmar-0d29630957f2.dat");

/// Endpoints 80:04.0-7, bridges 80:01.0 and 80:02.0.
const UNIT_A: u64 = 0xfbff_c000;
/// Endpoint 00:1b.0.
const UNIT_B: u64 = 0xf3ff_d000;
/// INCLUDE_PCI_ALL.
const UNIT_C: u64 = 0xf3ff_c000;
/// The RMRR of 00:14.0, 00:1a.0 and 00:1d.0.
const RMRR: (u64, u64) = (0x7b46_1000, 0x7b47_0fff);

/// 83:01.0, behind the PCIe-to-PCI bridge 82:00.0.
const ALIASED: Bdf = bdf(0x83, 1, 0);
/// The id its DMA carries: the bridge's secondary bus, 00.0.
const ALIAS_RID: u16 = 0x8300;
/// 81:00.0, below the sub-hierarchy scope 80:01.0.
const NVME: Bdf = bdf(0x81, 0, 0);
/// 00:14.0, xHCI with an RMRR, under the catch-all unit.
const XHCI: Bdf = bdf(0, 0x14, 0);

/// Guest RAM: (GPA, HPA, length). The first is 2 MiB aligned on both
/// sides; the second is not, and is not a whole number of 2 MiB.
const R1: (u64, u64, u64) = (0, 0x2_4000_0000, 8 << 20);
const R2: (u64, u64, u64) = (0x1_0000_0000, 0x2_8000_3000, 0x20_5000);

fn topology() -> Vec<PciFunction> {
    let rp1 = bdf(0x80, 1, 0);
    let rp2 = bdf(0x80, 2, 0);
    let p2p = bdf(0x82, 0, 0);
    let rp0 = bdf(0, 0x1c, 0);
    let mut f = vec![
        endpoint(bdf(0, 0, 0), None, None),
        endpoint(bdf(0, 0x14, 0), None, INTEGRATED),
        endpoint(bdf(0, 0x19, 0), None, INTEGRATED),
        endpoint(bdf(0, 0x1a, 0), None, INTEGRATED),
        endpoint(bdf(0, 0x1b, 0), None, INTEGRATED),
        endpoint(bdf(0, 0x1d, 0), None, INTEGRATED),
        bridge(rp0, None, ROOT_PORT, 2, 2),
        endpoint(bdf(2, 0, 0), Some(rp0), ENDPOINT),
        bridge(rp1, None, ROOT_PORT, 0x81, 0x81),
        endpoint(NVME, Some(rp1), ENDPOINT),
        endpoint(bdf(0x81, 0, 1), Some(rp1), ENDPOINT),
        bridge(rp2, None, ROOT_PORT, 0x82, 0x83),
        bridge(p2p, Some(rp2), PCIE_TO_PCI, 0x83, 0x83),
        endpoint(ALIASED, Some(p2p), CONVENTIONAL),
        endpoint(bdf(0x83, 2, 0), Some(p2p), CONVENTIONAL),
    ];
    f.extend((0..8).map(|func| endpoint(bdf(0x80, 4, func), None, INTEGRATED)));
    f
}

fn host(config: Config) -> Arc<ModelHost> {
    ModelHost::builder()
        .vtd_unit(UNIT_A, config)
        .vtd_unit(UNIT_B, config)
        .vtd_unit(UNIT_C, config)
        .functions(topology())
        .dmar(DMAR)
        .guest_ram(0x2_0000_0000, 1 << 32)
        .build()
}

/// The stamp, and every unit's log emptied: what a call does shows next.
fn mark(host: &ModelHost) -> u64 {
    for b in host.bases() {
        host.vtd(b).take_log();
    }
    host.mem.stamp()
}

/// Asserts the units other than `busy` ran nothing since [`mark`].
fn untouched(host: &ModelHost, busy: &[u64], what: &str) {
    for b in host.bases().into_iter().filter(|b| !busy.contains(b)) {
        assert_eq!(host.vtd(b).log(), [], "{what}: unit {b:#x} ran invalidations");
    }
}

/// After a device was attached (since stamp `t0`): its entries changed,
/// and the context cache and the IOTLB of its domain were invalidated
/// after that, and waited for.
fn assert_attach_invalidated(host: &ModelHost, base: u64, rid: u16, t0: u64) -> u16 {
    let w = walk(host, base, rid, 0);
    let did = w.domain.expect("attached");
    let view = host.unit(base).view;
    let changed = changed_since(host, view, &w.entry_words, t0).expect("the device's entries changed");
    let log = host.vtd(base).log();
    vtd_invalidated(&log, changed, "attach: context cache", |i| i.covers_context(did, rid));
    vtd_invalidated(&log, changed, "attach: IOTLB", |i| i.covers_iotlb(did, 0, true));
    did
}

fn fault_hi(reason: u64, read: bool, sid: u16) -> u64 {
    1 << 63 | (read as u64) << 62 | reason << 32 | sid as u64
}

/// The whole flow on the three units of the DMAR, every unit built with
/// `config`.
fn scenario(config: Config) -> Arc<ModelHost> {
    let host = host(config);
    let iommus = Iommus::bring_up(host.clone());

    // Bring-up: three units, in DMAR order, running with interrupt
    // remapping; every scope resolved.
    let bases: Vec<u64> = iommus.units().iter().map(|u| u.base.0).collect();
    assert_eq!(bases, [UNIT_A, UNIT_B, UNIT_C]);
    assert!(iommus.units().iter().all(|u| u.state.is_ok()), "{:?}", iommus.units());
    assert_eq!(iommus.problems(), []);
    for b in host.bases() {
        assert!(host.vtd(b).root_table().is_some(), "{b:#x}: translation on");
        assert!(host.vtd(b).interrupt_table().is_some(), "{b:#x}: interrupt remapping on");
    }
    // Which unit translates what, under which requester id.
    let expect = [
        (ALIASED, 0, ALIAS_RID),
        (bdf(0x83, 2, 0), 0, ALIAS_RID),
        (bdf(0x82, 0, 0), 0, 0x8200),
        (NVME, 0, 0x8100),
        (bdf(0x80, 4, 3), 0, 0x8023),
        (bdf(0, 0x1b, 0), 1, 0x00d8),
        (XHCI, 2, 0x00a0),
        (bdf(2, 0, 0), 2, 0x0200),
        (bdf(0, 0x19, 0), 2, 0x00c8),
    ];
    for (f, unit, rid) in expect {
        let a = iommus.assignment(0, f).unwrap_or_else(|| panic!("{f} not translated"));
        assert_eq!((a.unit, a.requester_id), (unit, rid), "{f}");
    }
    assert_eq!(iommus.assignment(0, ALIASED).unwrap().alias_bridge, Some(bdf(0x82, 0, 0)));
    // Every function is blocked.
    for (f, a) in iommus.assignments() {
        assert_blocked(&host, bases[a.unit], a.requester_id, 0x1000, &format!("{f} after bring-up"));
        assert_blocked(&host, bases[a.unit], a.requester_id, RMRR.0, &format!("{f} after bring-up"));
    }
    let runs_at_bring_up = host.mem.live_runs();

    // Guest memory: nothing translates it until a device is assigned.
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    for (gpa, hpa, len) in [R1, R2] {
        guest.add_memory(GuestAddr(gpa), PhysAddr(hpa), len, true).unwrap();
    }
    assert_blocked(&host, UNIT_A, ALIAS_RID, R1.0, "memory without devices");

    // The aliased function: reached under the bridge's id only.
    let t0 = mark(&host);
    guest.assign(&iommus, 0, ALIASED).unwrap();
    let did_a = assert_attach_invalidated(&host, UNIT_A, ALIAS_RID, t0);
    untouched(&host, &[UNIT_A], "assigning 83:01.0");
    assert_eq!(iommus.attached_domain(0, ALIASED), Some(did_a));
    for r in [R1, R2] {
        assert_maps(&host, UNIT_A, ALIAS_RID, r);
    }
    assert_blocked(&host, UNIT_A, ALIASED.requester_id(), R1.0, "83:01.0's own id");
    for rid in [0x8100, 0x8101, 0x8200, 0x8023] {
        assert_blocked(&host, UNIT_A, rid, R1.0, "a function not assigned");
    }
    for iova in [R1.0 + R1.2, R2.0 - 0x1000, R2.0 + R2.2, 0x4000_0000, RMRR.0, 0xfee0_0000] {
        assert_blocked(&host, UNIT_A, ALIAS_RID, iova, "outside guest memory");
    }

    // A second device of the same unit.
    let t0 = mark(&host);
    guest.assign(&iommus, 0, NVME).unwrap();
    assert_attach_invalidated(&host, UNIT_A, 0x8100, t0);
    untouched(&host, &[UNIT_A], "assigning 81:00.0");
    assert_maps(&host, UNIT_A, 0x8100, R1);
    assert_blocked(&host, UNIT_A, 0x8101, R1.0, "81:00.1 was not assigned");

    // A device of the catch-all unit, with an RMRR: identity-mapped
    // before the device translates through the domain.
    let t0 = mark(&host);
    guest.assign(&iommus, 0, XHCI).unwrap();
    let did_c = assert_attach_invalidated(&host, UNIT_C, 0x00a0, t0);
    untouched(&host, &[UNIT_C], "assigning 00:14.0");
    for r in [R1, R2] {
        assert_maps(&host, UNIT_C, 0x00a0, r);
    }
    let view = host.unit(UNIT_C).view;
    let entry_changed = changed_since(&host, view, &walk(&host, UNIT_C, 0x00a0, 0).entry_words, t0).unwrap();
    for page in (RMRR.0..RMRR.1).step_by(4096) {
        let w = walk(&host, UNIT_C, 0x00a0, page + 8);
        assert_eq!(w.hpa(true), Some(page + 8), "RMRR page {page:#x}: {:?}", w.outcome);
        let mapped = changed_since(&host, view, &w.table_words, t0).unwrap();
        assert!(mapped < entry_changed, "RMRR page {page:#x} mapped after the device was attached");
    }
    assert_blocked(&host, UNIT_C, 0x00d0, RMRR.0, "00:1a.0 shares the RMRR but was not assigned");
    assert_blocked(&host, UNIT_A, ALIAS_RID, RMRR.0, "the RMRR is 00:14.0's only");
    // Unit B's device was never assigned: its unit holds no entry at all.
    assert_blocked(&host, UNIT_B, 0x00d8, R1.0, "00:1b.0");

    // MSIs: an entry naming the vector, the destination and the source id.
    let t0 = mark(&host);
    let portcullis::Msi { address, data, .. } = guest.route_msi(0, ALIASED, 0x41, 3).unwrap();
    untouched(&host, &[UNIT_A], "routing an MSI of 83:01.0");
    let Msi::Remapped(r) = walk::msi(&host, UNIT_A, ALIAS_RID, address, data).unwrap() else { panic!("not remapped") };
    assert_eq!((r.vector, r.destination), (0x41, 3));
    let irte = r.index as u16;
    let changed = changed_since(&host, host.unit(UNIT_A).view, &r.words, t0).unwrap();
    vtd_invalidated(&host.vtd(UNIT_A).log(), changed, "IRTE written", |i| i.covers_interrupt_entry(irte));
    assert_eq!(
        walk::msi(&host, UNIT_A, 0x8100, address, data).unwrap(),
        Msi::Blocked("source id not allowed by the entry"),
        "another device using the same message"
    );
    // An APIC id the unit's xAPIC-format entries cannot hold is refused,
    // not truncated to another CPU's.
    let t0 = mark(&host);
    let e = guest.route_msi(0, ALIASED, 0x43, 0x123).unwrap_err();
    assert!(matches!(e, PassthroughError::Interrupt(_, UnitError { cause: HwError::Invalid(_), .. })), "{e:?}");
    assert!(changed_since(&host, host.unit(UNIT_A).view, &[r.words[0] + 16], t0).is_none(), "no entry written");
    let portcullis::Msi { address: address_c, data: data_c, .. } = guest.route_msi(0, XHCI, 0x42, 1).unwrap();
    let Msi::Remapped(rc) = walk::msi(&host, UNIT_C, 0x00a0, address_c, data_c).unwrap() else { panic!() };
    assert_eq!((rc.vector, rc.destination), (0x42, 1));

    // Faults the unit records reach the guest's view.
    host.vtd(UNIT_A).record_fault(0x1234_5000, fault_hi(6, true, ALIAS_RID));
    let batch = guest.dma_faults();
    assert_eq!(
        batch.faults,
        [GuestFault {
            function: portcullis::Function { segment: 0, bdf: ALIASED },
            requester: portcullis::RequesterRef { unit: 0, requester_id: ALIAS_RID },
            address: 0x1234_5000,
            write: false,
            reason: 6
        }]
    );
    assert_eq!(batch.lost, 0);
    assert!(guest.dma_faults().faults.is_empty(), "each fault is read once");

    // The same stream through an iommufd fault queue, as page requests
    // are read: one record per fault, the function's iommufd device.
    let (fault, _fd) = guest.ictx().fault_alloc().unwrap();
    assert!(guest.forward_dma_faults(fault + 100).is_err(), "an unknown fault object takes nothing");
    // (One at a time: the model, as QEMU, records one fault until read.)
    for (addr, reason, read) in [(0x2345_6000, 6, false), (0x3456_7000, 5, true)] {
        host.vtd(UNIT_A).record_fault(addr, fault_hi(reason, read, ALIAS_RID));
        let left = guest.forward_dma_faults(fault).unwrap();
        assert_eq!((left.faults.len(), left.lost), (0, 0));
    }
    let mut buf = [0u8; 3 * iommufd::ctx::FAULT_RECORD_SIZE];
    let n = guest.ictx().fault_read(fault, &mut buf).unwrap();
    let recs: Vec<IommuHwptPgfault> =
        buf[..n].chunks(iommufd::ctx::FAULT_RECORD_SIZE).map(IommuHwptPgfault::read).collect();
    let dev = guest.device_id(0, ALIASED).expect("an iommufd device");
    let flags = IOMMU_PGFAULT_FLAGS_LAST_PAGE | PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE;
    assert_eq!(
        recs.iter().map(|r| (r.flags, r.dev_id, r.addr, r.perm)).collect::<Vec<_>>(),
        [(flags, dev, 0x2345_6000, IOMMU_PGFAULT_PERM_WRITE), (flags, dev, 0x3456_7000, IOMMU_PGFAULT_PERM_READ)],
        "in order, reads and writes told apart"
    );
    assert!(guest.dma_faults().faults.is_empty(), "forwarded, not also in the stream");

    // Removing memory: every page of it blocked, each covered by an IOTLB
    // invalidation after its entry changed; tables freed only after.
    let devices = [(UNIT_A, ALIAS_RID, did_a), (UNIT_A, 0x8100, did_a), (UNIT_C, 0x00a0, did_c)];
    let before: Vec<Vec<Walk>> = devices
        .iter()
        .map(|&(b, rid, _)| (0..R2.2).step_by(4096).map(|off| walk(&host, b, rid, R2.0 + off)).collect())
        .collect();
    let t0 = mark(&host);
    guest.remove_memory(GuestAddr(R2.0), R2.2).unwrap();
    untouched(&host, &[UNIT_A, UNIT_C], "removing memory");
    let freed: Vec<_> = host.mem.freed().into_iter().filter(|f| f.stamp > t0).collect();
    for (&(base, rid, did), walks) in devices.iter().zip(&before) {
        let view = host.unit(base).view;
        let log = host.vtd(base).log();
        for (k, old) in walks.iter().enumerate() {
            let iova = R2.0 + k as u64 * 4096;
            assert_blocked(&host, base, rid, iova, "removed memory");
            let in_freed = |a: u64| freed.iter().any(|f| a >= f.base && a < f.base + f.count as u64 * 4096);
            // Words of freed tables "change" when freed: the free is
            // checked against the invalidation below instead.
            let kept: Vec<u64> = old.table_words.iter().copied().filter(|&a| !in_freed(a)).collect();
            let changed = changed_since(&host, view, &kept, t0).expect("an entry on the walk changed");
            let gone: Vec<_> = freed
                .iter()
                .filter(|f| {
                    old.tables.iter().any(|&t| in_freed(t) && t >= f.base && t < f.base + f.count as u64 * 4096)
                })
                .collect();
            let tables = !gone.is_empty();
            vtd_invalidated(&log, changed, "unmap", |i| i.covers_iotlb(did, iova, tables));
            let inv = vtd_first(&log, changed, |i| i.covers_iotlb(did, iova, tables)).unwrap();
            for f in gone {
                assert!(f.stamp > inv, "table {:#x} freed before the invalidation covering {iova:#x}", f.base);
            }
        }
        assert_maps(&host, base, rid, R1);
    }
    assert_eq!(guest.pinned_pages(), R1.2 / 4096);

    // Unassigning: DMA and MSIs blocked again, each change invalidated.
    let t0 = mark(&host);
    guest.unassign(0, ALIASED).unwrap();
    untouched(&host, &[UNIT_A], "unassigning 83:01.0");
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    assert_eq!(w.outcome, Outcome::Blocked("context entry not present"));
    let log = host.vtd(UNIT_A).log();
    let changed = changed_since(&host, host.unit(UNIT_A).view, &w.entry_words, t0).unwrap();
    vtd_invalidated(&log, changed, "detach: context cache", |i| i.covers_context(did_a, ALIAS_RID));
    vtd_invalidated(&log, changed, "detach: IOTLB", |i| i.covers_iotlb(did_a, R1.0, true));
    assert_eq!(walk::msi(&host, UNIT_A, ALIAS_RID, address, data).unwrap(), Msi::Blocked("entry not present"));
    let irte_at = host.vtd(UNIT_A).interrupt_table().unwrap() & !0xfff;
    let irte_words = [irte_at + irte as u64 * 16, irte_at + irte as u64 * 16 + 8];
    let changed = changed_since(&host, host.unit(UNIT_A).view, &irte_words, t0).unwrap();
    vtd_invalidated(&log, changed, "IRTE cleared", |i| i.covers_interrupt_entry(irte));
    assert_eq!(iommus.attached_domain(0, ALIASED), None);
    assert_maps(&host, UNIT_A, 0x8100, R1);

    guest.unassign(0, NVME).unwrap();
    guest.unassign(0, XHCI).unwrap();
    assert_eq!(walk::msi(&host, UNIT_C, 0x00a0, address_c, data_c).unwrap(), Msi::Blocked("entry not present"));
    for (f, a) in iommus.assignments() {
        assert_blocked(&host, bases[a.unit], a.requester_id, R1.0, &format!("{f} at the end"));
    }
    guest.remove_memory(GuestAddr(R1.0), R1.2).unwrap();
    drop(guest);
    // Every domain's tables are freed; the units keep the context tables
    // they made (one per bus with an assigned device).
    let kept: Vec<(u64, usize)> = host.mem.live_runs().into_iter().filter(|r| !runs_at_bring_up.contains(r)).collect();
    let context_tables: Vec<(u64, usize)> = [(UNIT_A, 0x81), (UNIT_A, 0x83), (UNIT_C, 0)]
        .iter()
        .map(|&(b, bus)| {
            let root = host.vtd(b).root_table().unwrap() & !0xfff;
            let e = host.mem.read(View::Cpu, root + bus * 16).unwrap();
            assert_eq!(e & 1, 1, "root entry of bus {bus:#x} on {b:#x}");
            (e & !0xfff, 1)
        })
        .collect();
    let mut expected = context_tables;
    expected.sort();
    assert_eq!(kept, expected, "frames left besides the context tables");
    // Unit B's device was never involved.
    assert!(host.vtd(UNIT_B).log().is_empty());
    host
}

#[test]
fn three_units_from_a_real_dmar_coherent() {
    let host = scenario(Config::QEMU.coherent(true));
    assert_eq!(host.mem.flushes(), [], "snooping units: nothing to flush");
}

/// ECAP.C = 0 (QEMU's default): the units read memory, not the CPU's
/// caches. The walker reads only lines written back, and a fresh frame
/// reads as poison until its zeroes are: the walks above succeeding means
/// every table, entry and zeroed frame they touch was flushed.
#[test]
fn three_units_from_a_real_dmar_non_coherent() {
    let host = scenario(Config::QEMU);
    assert!(!host.mem.flushes().is_empty());
}

/// The same platform dropping the flush of every freshly allocated run
/// (what `PlatformTables` would be without it): the walker meets the
/// unflushed zeroes of the root table.
#[test]
fn without_the_flush_of_zeroed_frames_the_walker_reads_poison() {
    let host = host(Config::QEMU);
    host.mem.drop_alloc_flushes(true);
    let iommus = Iommus::bring_up(host.clone());
    assert!(iommus.units().iter().all(|u| u.state.is_ok()));
    let e = walk::translate(&host, UNIT_B, 0x00d8, 0).unwrap_err();
    assert!(matches!(e, WalkError::Stale { memory: POISON, cpu: 0, .. }), "{e:?}");
}

/// Scalable mode (ECAP.SMTS with second-stage translation) and caching
/// mode (CAP.CM, as QEMU with `caching-mode=on`: not-present entries may be
/// cached, so making one present needs an invalidation too): the same
/// assignment through scalable root, context and PASID entries.
#[test]
fn scalable_mode_second_stage_with_caching_mode() {
    let config = Config { cap: Config::QEMU.cap | 1 << 7, ecap: Config::QEMU.ecap | 1 << 43 | 1 << 46 | 1 };
    let host = host(config);
    let iommus =
        Iommus::bring_up_with(host.clone(), Options { vtd_mode: Some(vtd::Mode::Scalable), ..Options::default() });
    assert!(iommus.units().iter().all(|u| u.state.is_ok()), "{:?}", iommus.units());
    for b in host.bases() {
        assert_eq!(host.vtd(b).root_table().unwrap() >> 10 & 3, 1, "scalable root table");
    }
    let pasid_cache = |did: u16| {
        move |i: &Invalidation| {
            matches!(*i, Invalidation::PasidCache { g: 1, did: d, pasid: 0 } if d == did)
                || matches!(*i, Invalidation::PasidCache { g: 0, did: d, .. } if d == did)
                || matches!(i, Invalidation::PasidCache { g: 3, .. })
        }
    };
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    let t0 = mark(&host);
    guest.assign(&iommus, 0, ALIASED).unwrap();
    untouched(&host, &[UNIT_A], "assigning 83:01.0");
    let log = host.vtd(UNIT_A).log();
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    let did = w.domain.unwrap();
    assert_ne!(did, 0, "domain id 0 is reserved in caching mode");
    let changed = changed_since(&host, View::Cpu, &w.entry_words, t0).unwrap();
    vtd_invalidated(&log, changed, "PASID entry made present", pasid_cache(did));
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    for off in (0..R1.2).step_by(4096) {
        let w = walk(&host, UNIT_A, ALIAS_RID, R1.0 + off);
        let changed = changed_since(&host, View::Cpu, &w.table_words, t0).unwrap();
        vtd_invalidated(&log, changed, "map in caching mode", |i| i.covers_iotlb(did, R1.0 + off, false));
    }
    assert_blocked(&host, UNIT_A, 0x8100, R1.0, "81:00.0 not assigned");
    assert_blocked(&host, UNIT_A, ALIAS_RID, R1.0 + R1.2, "outside guest memory");

    let t0 = mark(&host);
    guest.unassign(0, ALIASED).unwrap();
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    assert!(w.blocked(), "{:?}", w.outcome);
    let log = host.vtd(UNIT_A).log();
    let changed = changed_since(&host, View::Cpu, &w.entry_words, t0).unwrap();
    vtd_invalidated(&log, changed, "PASID entry cleared", pasid_cache(did));
    vtd_invalidated(&log, changed, "IOTLB after the PASID entry cleared", |i| i.covers_iotlb(did, R1.0, true));
}

/// Memory added while devices translate reaches them (ECAP.C = 0: the new
/// tables and entries are flushed); dropping the guest blocks its devices
/// and clears their MSI routes, each change invalidated.
#[test]
fn memory_added_later_and_dropping_the_guest() {
    let host = host(Config::QEMU);
    let iommus = Iommus::bring_up(host.clone());
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    guest.assign(&iommus, 0, ALIASED).unwrap();
    guest.assign(&iommus, 0, XHCI).unwrap();
    guest.add_memory(GuestAddr(R2.0), PhysAddr(R2.1), R2.2, true).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, R2);
    assert_maps(&host, UNIT_C, 0x00a0, R2);
    let portcullis::Msi { address, data, .. } = guest.route_msi(0, ALIASED, 0x41, 3).unwrap();
    let did = walk(&host, UNIT_A, ALIAS_RID, 0).domain.unwrap();
    let t0 = mark(&host);
    drop(guest);
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    assert_eq!(w.outcome, Outcome::Blocked("context entry not present"));
    let changed = changed_since(&host, View::Memory, &w.entry_words, t0).unwrap();
    vtd_invalidated(&host.vtd(UNIT_A).log(), changed, "detach on drop", |i| i.covers_context(did, ALIAS_RID));
    assert_eq!(walk::msi(&host, UNIT_A, ALIAS_RID, address, data).unwrap(), Msi::Blocked("entry not present"));
    assert_blocked(&host, UNIT_C, 0x00a0, R2.0, "00:14.0 after the drop");
    assert_eq!(iommus.attached_domain(0, ALIASED), None);
    // The requester ids are free again.
    let mut next = GuestDma::new(&iommus, 1 << 20).unwrap();
    next.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    next.assign(&iommus, 0, ALIASED).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
}

/// 83:01.0 and 83:02.0 sit behind the same PCIe-to-PCI bridge: their DMA
/// both carries 83:00.0, so the unit cannot tell them apart. Another
/// guest may have neither once one is assigned (it would retarget the
/// first guest's device to its own memory); within one guest, the id is
/// detached only when the last of them is unassigned.
#[test]
fn functions_sharing_a_requester_id_belong_to_one_guest() {
    let sibling = bdf(0x83, 2, 0);
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    let mut g1 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g1.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    let mut g2 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g2.add_memory(GuestAddr(R1.0), PhysAddr(R2.1), R1.2, true).unwrap();
    g1.assign(&iommus, 0, ALIASED).unwrap();
    mark(&host);
    for f in [sibling, ALIASED] {
        let e = g2.assign(&iommus, 0, f);
        assert_eq!(
            e,
            Err(PassthroughError::Owned(portcullis::Function { segment: 0, bdf: f }, g1.owner())),
            "the owner is named"
        );
    }
    untouched(&host, &[], "refused assignments");
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    // The sibling in the same guest shares the translation.
    g1.assign(&iommus, 0, sibling).unwrap();
    g1.unassign(0, ALIASED).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    assert_eq!(iommus.attached_domain(0, sibling), walk(&host, UNIT_A, ALIAS_RID, 0).domain);
    assert_eq!(
        g2.assign(&iommus, 0, ALIASED),
        Err(PassthroughError::Owned(portcullis::Function { segment: 0, bdf: ALIASED }, g1.owner()))
    );
    g1.unassign(0, sibling).unwrap();
    assert_blocked(&host, UNIT_A, ALIAS_RID, R1.0, "both unassigned");
    // Now the other guest may have them.
    g2.assign(&iommus, 0, sibling).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, (R1.0, R2.1, R1.2));
    // A function with its own id is unaffected by all this.
    g1.assign(&iommus, 0, NVME).unwrap();
    assert_maps(&host, UNIT_A, 0x8100, R1);
}

/// Scalable mode on a unit with first-stage translation only (as QEMU's
/// `x-flts=on`): the domain's table is an x86 first-stage table behind a
/// PASID entry with PGTT = first-stage; unmaps and detaches use
/// PASID-based IOTLB invalidation.
#[test]
fn scalable_mode_first_stage_only() {
    let config = Config { cap: Config::QEMU.cap | 1 << 56, ecap: Config::QEMU.ecap | 1 << 43 | 1 << 47 };
    let host = host(config);
    let iommus = Iommus::bring_up(host.clone());
    assert!(iommus.units().iter().all(|u| u.state.is_ok()), "{:?}", iommus.units());
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    for (gpa, hpa, len) in [R1, R2] {
        guest.add_memory(GuestAddr(gpa), PhysAddr(hpa), len, true).unwrap();
    }
    guest.assign(&iommus, 0, ALIASED).unwrap();
    for r in [R1, R2] {
        assert_maps(&host, UNIT_A, ALIAS_RID, r);
    }
    assert_blocked(&host, UNIT_A, 0x8100, R1.0, "81:00.0 not assigned");
    let did = walk(&host, UNIT_A, ALIAS_RID, 0).domain.unwrap();
    let before: Vec<Walk> = (0..R2.2).step_by(4096).map(|off| walk(&host, UNIT_A, ALIAS_RID, R2.0 + off)).collect();
    let t0 = mark(&host);
    guest.remove_memory(GuestAddr(R2.0), R2.2).unwrap();
    let log = host.vtd(UNIT_A).log();
    let freed: Vec<_> = host.mem.freed().into_iter().filter(|f| f.stamp > t0).collect();
    for (k, old) in before.iter().enumerate() {
        let iova = R2.0 + k as u64 * 4096;
        assert_blocked(&host, UNIT_A, ALIAS_RID, iova, "removed memory");
        let in_freed = |a: u64| freed.iter().any(|f| a >= f.base && a < f.base + f.count as u64 * 4096);
        let kept: Vec<u64> = old.table_words.iter().copied().filter(|&a| !in_freed(a)).collect();
        let changed = changed_since(&host, host.unit(UNIT_A).view, &kept, t0).unwrap();
        let tables = old.tables.iter().any(|&t| in_freed(t));
        vtd_invalidated(&log, changed, "first-stage unmap", |i| i.covers_pasid_iotlb(did, 0, iova, tables));
    }
    let t0 = mark(&host);
    guest.unassign(0, ALIASED).unwrap();
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    assert!(w.blocked(), "{:?}", w.outcome);
    let log = host.vtd(UNIT_A).log();
    let changed = changed_since(&host, host.unit(UNIT_A).view, &w.entry_words, t0).unwrap();
    vtd_invalidated(
        &log,
        changed,
        "PASID entry cleared",
        |i| matches!(*i, Invalidation::PasidCache { g: 1, did: d, pasid: 0 } if d == did),
    );
    vtd_invalidated(&log, changed, "first-stage IOTLB after the PASID entry cleared", |i| {
        i.covers_pasid_iotlb(did, 0, R1.0, true)
    });
}

/// Guest memory over the RMRR: the device that needs the RMRR cannot be
/// given to that guest (its DMA would land in guest memory), nothing is
/// written, and its requester id stays free for another guest.
#[test]
fn an_rmrr_inside_guest_memory_refuses_the_device() {
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    let mut g1 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g1.add_memory(GuestAddr(RMRR.0 & !0x1f_ffff), PhysAddr(R1.1), 0x20_0000, true).unwrap();
    mark(&host);
    assert!(matches!(g1.assign(&iommus, 0, XHCI), Err(PassthroughError::Iommufd("attach", _))));
    // (The domain made for the attach was filled and dropped again: its
    // invalidations ran, but no device entry was written.)
    assert_eq!(walk(&host, UNIT_C, 0x00a0, RMRR.0).outcome, Outcome::Blocked("root entry not present"));
    let mut g2 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g2.add_memory(GuestAddr(R1.0), PhysAddr(R2.1), R1.2, true).unwrap();
    g2.assign(&iommus, 0, XHCI).unwrap();
    assert_eq!(walk(&host, UNIT_C, 0x00a0, RMRR.0).hpa(true), Some(RMRR.0));
}

/// Machine-wide ownership with two guests and the host: a group (one
/// requester id, or an ACS-less multi-function device) belongs to one
/// owner; a claim by anyone else is refused naming the owner and changes
/// nothing; the host's pass-through device reaches physical memory; each
/// owner reads only its own faults, each once.
#[test]
fn two_guests_and_the_host_own_disjoint_groups_and_read_their_own_faults() {
    use portcullis::{HostUse, Owner};
    let sibling = bdf(0x81, 0, 1);
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    // Groups: the PCIe-to-PCI bridge's functions share one id; the two
    // functions of the NVMe device have no ACS, so they are one group.
    let g = |f| iommus.group_of(0, f).unwrap().id;
    assert_eq!(g(ALIASED), g(bdf(0x83, 2, 0)));
    assert_eq!(g(NVME), g(sibling));
    assert_eq!(iommus.group_of(0, NVME).unwrap().requester_ids, [0x8100, 0x8101]);
    assert_ne!(g(NVME), g(ALIASED));
    assert!(iommus.groups().len() > 10);

    let mut g1 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g1.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    let mut g2 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g2.add_memory(GuestAddr(R1.0), PhysAddr(R2.1), R1.2, true).unwrap();
    assert_ne!(g1.owner(), g2.owner());
    g1.assign(&iommus, 0, NVME).unwrap();
    g2.assign(&iommus, 0, ALIASED).unwrap();
    iommus.claim_for_host(0, XHCI, HostUse::PassThrough).unwrap();
    assert_eq!(iommus.owner_of(0, sibling), Some(g1.owner()), "the group came with the function");
    assert_eq!(iommus.owner_of(0, XHCI), Some(Owner::Host));

    // Refusals name the owner and change nothing.
    mark(&host);
    let f = |bdf| portcullis::Function { segment: 0, bdf };
    assert_eq!(g2.assign(&iommus, 0, sibling), Err(PassthroughError::Owned(f(sibling), g1.owner())));
    assert_eq!(g2.assign(&iommus, 0, NVME), Err(PassthroughError::Owned(f(NVME), g1.owner())));
    assert_eq!(g1.assign(&iommus, 0, XHCI), Err(PassthroughError::Owned(f(XHCI), Owner::Host)));
    assert_eq!(iommus.claim_for_host(0, NVME, HostUse::Blocked), Err(PassthroughError::Owned(f(NVME), g1.owner())));
    untouched(&host, &[], "refused claims");
    // Each guest's device reaches its own memory only; the host's passes.
    assert_maps(&host, UNIT_A, 0x8100, R1);
    assert_maps(&host, UNIT_A, ALIAS_RID, (R1.0, R2.1, R1.2));
    assert!(matches!(walk(&host, UNIT_C, 0x00a0, 0x1234_5000).outcome, Outcome::Untranslated));

    // Faults: each lands in its owner's stream only, read once.
    host.vtd(UNIT_A).record_fault(0x7000, fault_hi(6, false, ALIAS_RID));
    assert!(g1.dma_faults().faults.is_empty(), "guest 1 sees guest 2's fault");
    host.vtd(UNIT_A).record_fault(0x8000, fault_hi(5, false, 0x8101));
    let f2 = g2.dma_faults();
    assert_eq!(f2.faults.iter().map(|x| (x.function, x.address)).collect::<Vec<_>>(), [(f(ALIASED), 0x7000)]);
    let f1 = g1.dma_faults();
    // The sibling's DMA is the group's: guest 1's, reported under the
    // requester id it carried.
    assert_eq!(f1.faults.iter().map(|x| (x.requester.requester_id, x.address)).collect::<Vec<_>>(), [(0x8101, 0x8000)]);
    assert!(g1.dma_faults().faults.is_empty() && g2.dma_faults().faults.is_empty(), "read once");
    // A device nobody owns: the host's stream.
    host.vtd(UNIT_B).record_fault(0x9000, fault_hi(6, true, bdf(0, 0x1b, 0).requester_id()));
    let h = iommus.host_faults();
    assert_eq!(h.faults.iter().map(|x| x.fault.address).collect::<Vec<_>>(), [0x9000]);
    assert!(g1.dma_faults().faults.is_empty() && g2.dma_faults().faults.is_empty());

    // Released by the host, blocked again, and any guest may have it.
    iommus.release_host(0, XHCI).unwrap();
    assert_blocked(&host, UNIT_C, 0x00a0, 0x1234_5000, "released by the host");
    assert_eq!(iommus.owner_of(0, XHCI), None);
    g1.assign(&iommus, 0, XHCI).unwrap();
    // A guest gone gives its groups back.
    drop(g2);
    assert_eq!(iommus.owner_of(0, ALIASED), None);
    assert_blocked(&host, UNIT_A, ALIAS_RID, R1.0, "its guest is gone");
    g1.assign(&iommus, 0, ALIASED).unwrap();
}

/// Lost faults are counted: a unit whose fault recording overflowed (every
/// owner with devices on it is told), and a guest's queue that filled up
/// while it did not read it.
#[test]
fn faults_lost_to_overflow_or_a_full_queue_are_counted() {
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    let mut g1 = GuestDma::new(&iommus, 1 << 20).unwrap();
    let mut g2 = GuestDma::new(&iommus, 1 << 20).unwrap();
    g1.assign(&iommus, 0, NVME).unwrap();
    g2.assign(&iommus, 0, ALIASED).unwrap();
    // Two faults before anyone polls: the unit keeps one, overflows once.
    host.vtd(UNIT_A).record_fault(0x1000, fault_hi(6, false, ALIAS_RID));
    host.vtd(UNIT_A).record_fault(0x2000, fault_hi(6, false, ALIAS_RID));
    let b2 = g2.dma_faults();
    assert_eq!((b2.faults.len(), b2.lost), (1, 1));
    assert_eq!(g1.dma_faults().lost, 1, "guest 1 has a device on the unit that overflowed");
    // Guest 2 does not read while guest 1 polls: its queue fills.
    for k in 0..(portcullis::FAULT_QUEUE as u64 + 10) {
        host.vtd(UNIT_A).record_fault(0x10_0000 + k * 0x1000, fault_hi(6, false, ALIAS_RID));
        assert!(g1.dma_faults().faults.is_empty());
    }
    let b2 = g2.dma_faults();
    assert_eq!((b2.faults.len(), b2.lost), (portcullis::FAULT_QUEUE, 10));
    assert_eq!(b2.faults[0].address, 0x10_0000, "oldest first");
    let empty = g2.dma_faults();
    assert!(empty.faults.is_empty() && empty.lost == 0);
}

/// `Iommus` is shared by threads and a `GuestDma` moves to one: three
/// guests assign, map, unmap and unassign concurrently; at the end every
/// table is as the last step left it.
#[test]
fn guests_on_several_threads() {
    fn sync<T: Sync + Send>() {}
    fn send<T: Send>() {}
    sync::<Iommus<ModelHost>>();
    send::<GuestDma<ModelHost>>();
    let host = host(Config::QEMU.coherent(true));
    let iommus = Arc::new(Iommus::bring_up(host.clone()));
    let devices = [NVME, ALIASED, bdf(0x80, 4, 3)];
    let hpa = [0x2_4000_0000u64, 0x2_8000_0000, 0x2_c000_0000];
    std::thread::scope(|s| {
        for k in 0..3 {
            let iommus = iommus.clone();
            s.spawn(move || {
                let mut g = GuestDma::new(&iommus, 1 << 20).unwrap();
                for round in 0..8u64 {
                    let gpa = round << 24;
                    g.add_memory(GuestAddr(gpa), PhysAddr(hpa[k] + (round << 21)), 1 << 20, true).unwrap();
                    g.assign(&iommus, 0, devices[k]).unwrap();
                    if round < 7 {
                        g.unassign(0, devices[k]).unwrap();
                        g.remove_memory(GuestAddr(gpa), 1 << 20).unwrap();
                    }
                }
                // Kept alive (assigned, last round mapped) for the check.
                std::mem::forget(g);
            });
        }
    });
    for (k, (d, rid)) in devices.iter().zip([0x8100u16, ALIAS_RID, bdf(0x80, 4, 3).requester_id()]).enumerate() {
        let gpa = 7u64 << 24;
        assert_maps(&host, UNIT_A, rid, (gpa, hpa[k] + (7 << 21), 1 << 20));
        assert_blocked(&host, UNIT_A, rid, 6 << 24, "an earlier round's memory");
        assert!(iommus.owner_of(0, *d).is_some());
    }
}

/// Interrupt routes go only to the guest's CPUs; a retarget rewrites the
/// entry in place (same address and data), and a freed entry is reused.
#[test]
fn routes_go_to_the_guests_cpus_and_retarget_in_place() {
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    let mut g = GuestDma::new(&iommus, 1 << 20).unwrap();
    g.assign(&iommus, 0, NVME).unwrap();
    g.set_cpus(&[1, 3]);
    let nvme = portcullis::Function { segment: 0, bdf: NVME };
    assert_eq!(g.route_msi(0, NVME, 0x40, 2).unwrap_err(), PassthroughError::ForeignCpu(nvme, 2));
    let m = g.route_msi(0, NVME, 0x40, 3).unwrap();
    let Msi::Remapped(r) = walk::msi(&host, UNIT_A, 0x8100, m.address, m.data).unwrap() else { panic!() };
    assert_eq!((r.vector, r.destination), (0x40, 3));
    assert_eq!(g.retarget_msi(m.handle, 0x41, 5).unwrap_err(), PassthroughError::ForeignCpu(nvme, 5));
    g.retarget_msi(m.handle, 0x41, 1).unwrap();
    let Msi::Remapped(r) = walk::msi(&host, UNIT_A, 0x8100, m.address, m.data).unwrap() else { panic!() };
    assert_eq!((r.vector, r.destination), (0x41, 1), "retargeted in place");
    let second = g.route_msi(0, NVME, 0x42, 1).unwrap();
    assert_ne!(second.address, m.address);
    g.free_msi(m.handle).unwrap();
    assert!(!matches!(walk::msi(&host, UNIT_A, 0x8100, m.address, m.data), Ok(Msi::Remapped(_))), "freed: blocked");
    assert_eq!(g.free_msi(m.handle), Err(PassthroughError::NoSuchRoute));
    let again = g.route_msi(0, NVME, 0x43, 3).unwrap();
    assert_eq!((again.address, again.data), (m.address, m.data), "the freed entry is reused");
}

/// Maps 4 KiB at `gpa` to `hpa` in the x86-64 4-level table at `root` (as
/// a hypervisor's nested page table: P, R/W, U/S on every level), each
/// entry written back from the cache (the model's units do not snoop).
fn map_4level(host: &ModelHost, root: u64, gpa: u64, hpa: Option<u64>) {
    use portcullis::Platform;
    let mut table = root;
    for level in [3u32, 2, 1] {
        let slot = PhysAddr(table + ((gpa >> (12 + 9 * level)) & 511) * 8);
        let e = host.read_u64(slot);
        table = if e & 1 != 0 {
            e & 0x000f_ffff_ffff_f000
        } else {
            let next = host.alloc_frames(1, 4096).unwrap().0;
            host.flush_cache(PhysAddr(next), 4096);
            host.write_u64(slot, next | 7);
            host.flush_cache(slot, 8);
            next
        };
    }
    let leaf = PhysAddr(table + ((gpa >> 12) & 511) * 8);
    host.write_u64(leaf, hpa.map_or(0, |h| h | 7));
    host.flush_cache(leaf, 8);
}

/// One table for the CPU and the device: a guest view sharing a 4-level
/// table the caller owns (its nested page table) attaches the device
/// through a PASID entry with PGTT = first stage at that very root, maps
/// nothing of its own, invalidates the PASID-based IOTLB on request, and
/// blocks the device again on unassign; units that cannot walk the format
/// refuse with the reason.
#[test]
fn a_shared_table_is_walked_by_the_device_as_first_stage() {
    use portcullis::Platform;
    let (host, iommus, root) = shared_table_world();
    let (gpa, hpa, _) = R1;
    let live = host.mem.live_frames();
    let mut guest = GuestDma::new_sharing_table(&iommus, PhysAddr(root)).unwrap();
    assert_eq!(guest.shared_table(), Some(PhysAddr(root)));
    assert!(matches!(
        guest.add_memory(GuestAddr(R2.0), PhysAddr(R2.1), R2.2, true),
        Err(PassthroughError::SharedTable(_))
    ));
    guest.assign(&iommus, 0, ALIASED).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    let w = walk(&host, UNIT_A, ALIAS_RID, gpa);
    assert_eq!(w.tables.first(), Some(&root), "the device walks the caller's table");
    // The attach structures only (context table, PASID directory and
    // table): no page table of the IOMMU's own.
    assert!(
        host.mem.live_frames() <= live + 3,
        "no page table of the IOMMU's own: {} frames more",
        host.mem.live_frames() - live
    );
    let did = w.domain.unwrap();
    // Remap one page to another frame, then remove it.
    let page = gpa + 0x3000;
    map_4level(&host, root, page, Some(R2.1));
    mark(&host);
    guest.invalidate_table(GuestAddr(page), 4096).unwrap();
    assert!(
        host.vtd(UNIT_A).log().iter().any(|i| i.what.covers_pasid_iotlb(did, 0, page, true)),
        "{:?}",
        host.vtd(UNIT_A).log()
    );
    assert_eq!(walk(&host, UNIT_A, ALIAS_RID, page).hpa(false), Some(R2.1));
    map_4level(&host, root, page, None);
    guest.invalidate_table(GuestAddr(page), 4096).unwrap();
    assert_blocked(&host, UNIT_A, ALIAS_RID, page, "removed page");
    untouched(&host, &[UNIT_A], "invalidate_table");
    guest.unassign(0, ALIASED).unwrap();
    assert_blocked(&host, UNIT_A, ALIAS_RID, gpa, "unassigned");
    // Nothing of the caller's table was freed or changed by the crate.
    assert_eq!(walk_table(&host, root, gpa), Some(hpa));

    // Legacy mode (VT-d second stage, EPT's format) refuses.
    let legacy = self::host(Config::QEMU);
    let iommus = Iommus::bring_up(legacy.clone());
    let root = legacy.alloc_frames(1, 4096).unwrap().0;
    let mut guest = GuestDma::new_sharing_table(&iommus, PhysAddr(root)).unwrap();
    let e = guest.assign(&iommus, 0, ALIASED).unwrap_err();
    assert!(matches!(e, PassthroughError::Unit(_, UnitError { cause: HwError::Unsupported(_), .. })), "{e}");
    assert!(e.to_string().contains("EPT"), "{e}");
    assert_blocked(&legacy, UNIT_A, ALIAS_RID, 0, "refused");
    assert!(guest.assign(&iommus, 0, ALIASED).is_err(), "refused again, the group was given back");
}

/// Shared table, devices on two units: each unit numbers its domain ids
/// from the same start, so the two attachments may carry the same id;
/// unassigning one still detaches it, and leaves the other attached.
#[test]
fn a_shared_table_on_two_units_detaches_each_device_on_its_own() {
    let (host, iommus, root) = shared_table_world();
    let gpa = R1.0;
    let mut guest = GuestDma::new_sharing_table(&iommus, PhysAddr(root)).unwrap();
    guest.assign(&iommus, 0, ALIASED).unwrap();
    guest.assign(&iommus, 0, XHCI).unwrap();
    let (a, c) = (walk(&host, UNIT_A, ALIAS_RID, gpa), walk(&host, UNIT_C, 0x00a0, gpa));
    assert_eq!(a.domain, c.domain, "the case that matters: the same id on both units");
    guest.unassign(0, ALIASED).unwrap();
    assert_blocked(&host, UNIT_A, ALIAS_RID, gpa, "unassigned");
    assert_eq!(iommus.owner_of(0, ALIASED), None);
    assert_maps(&host, UNIT_C, 0x00a0, R1);
    drop(guest);
    assert_blocked(&host, UNIT_C, 0x00a0, gpa, "the guest is gone");
}

/// Units that walk first-stage tables in scalable mode (CAP.FS1GP,
/// ECAP.SMTS and FSTS) and a 4-level table of the caller's mapping R1:
/// (host, units, the table's root).
fn shared_table_world() -> (Arc<ModelHost>, Iommus<ModelHost>, u64) {
    use portcullis::Platform;
    let config = Config { cap: Config::QEMU.cap | 1 << 56, ecap: Config::QEMU.ecap | 1 << 43 | 1 << 47 };
    let host = host(config);
    let iommus = Iommus::bring_up(host.clone());
    let root = host.alloc_frames(1, 4096).unwrap().0;
    host.flush_cache(PhysAddr(root), 4096);
    let (gpa, hpa, len) = R1;
    for off in (0..len).step_by(4096) {
        map_4level(&host, root, gpa + off, Some(hpa + off));
    }
    (host, iommus, root)
}

/// The host address `gpa` maps to in the 4-level table at `root`.
fn walk_table(host: &ModelHost, root: u64, gpa: u64) -> Option<u64> {
    use portcullis::Platform;
    let mut table = root;
    for level in [3u32, 2, 1, 0] {
        let e = host.read_u64(PhysAddr(table + ((gpa >> (12 + 9 * level)) & 511) * 8));
        if e & 1 == 0 {
            return None;
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    Some(table)
}

/// Dirty tracking for live migration (ECAP.SSADS in scalable mode with
/// second-stage translation; QEMU 10 has neither, so the test plays the
/// walker: it sets D, bit 9, in the leaf a device writes through).
#[test]
fn dirty_tracking_reports_what_devices_wrote() {
    use portcullis::Platform;
    let tracking = Config { cap: Config::QEMU.cap, ecap: Config::QEMU.ecap | 1 << 43 | 1 << 45 | 1 << 46 | 1 };
    let options = Options { vtd_mode: Some(vtd::Mode::Scalable), ..Options::default() };
    // Without ECAP.SSADS: refused, naming the function.
    let plain = Config { ecap: tracking.ecap & !(1 << 45), ..tracking };
    let host0 = host(plain);
    let iommus = Iommus::bring_up_with(host0.clone(), options);
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    guest.assign(&iommus, 0, ALIASED).unwrap();
    let e = guest.start_dirty_tracking().unwrap_err();
    assert!(matches!(e, PassthroughError::Unit(f, _) if f.bdf == ALIASED), "{e}");
    assert!(!guest.dirty_tracking());
    let mut out = [0u64; 64];
    assert!(guest.read_dirty(GuestAddr(R1.0), R1.2, 4096, &mut out).is_err(), "not tracking");
    assert_maps(&host0, UNIT_A, ALIAS_RID, R1);

    let host = host(tracking);
    let iommus = Iommus::bring_up_with(host.clone(), options);
    let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
    guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    guest.assign(&iommus, 0, ALIASED).unwrap();
    guest.start_dirty_tracking().unwrap();
    assert!(guest.dirty_tracking());
    // The device still reaches guest memory, through an entry with SSADE.
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    let w = walk(&host, UNIT_A, ALIAS_RID, R1.0);
    // The PASID entry's word 0: P, PGTT (bits 8:6) = 010b; SSADE is bit 9.
    let ssade = |w: &Walk| {
        w.entry_words
            .iter()
            .filter_map(|&a| host.mem.read(View::Cpu, a))
            .any(|e| e & 1 == 1 && e >> 6 & 7 == 2 && e >> 9 & 1 == 1)
    };
    assert!(ssade(&w), "PASID entry has SSADE");
    // The device writes two pages: the walker marks their leaves.
    let write = |gpa: u64| {
        let w = walk(&host, UNIT_A, ALIAS_RID, gpa);
        let leaf = *w.table_words.last().unwrap();
        let e = host.mem.read(View::Cpu, leaf).unwrap();
        host.write_u64(PhysAddr(leaf), e | 1 << 9);
    };
    write(R1.0 + 0x3000);
    write(R1.0 + 0x5_0000 + 0x10);
    // Guest memory is mapped with 2 MiB pages: the written leaf reports
    // every 4 KiB page it covers.
    assert_eq!(guest.read_dirty(GuestAddr(R1.0), R1.2, 4096, &mut out).unwrap(), 512);
    let set: Vec<u64> = (0..R1.2 / 4096).filter(|k| out[(k / 64) as usize] >> (k % 64) & 1 == 1).collect();
    assert_eq!(set, (0..512).collect::<Vec<u64>>());
    write(R1.0 + 3 * (1 << 21));
    assert_eq!(guest.read_dirty(GuestAddr(R1.0), R1.2, 1 << 21, &mut out).unwrap(), 1);
    assert_eq!(out[0], 1 << 3);
    // Read and cleared: nothing more.
    assert_eq!(guest.read_dirty(GuestAddr(R1.0), R1.2, 4096, &mut out).unwrap(), 0);
    // Bad arguments.
    assert!(guest.read_dirty(GuestAddr(R1.0 + 1), 4096, 4096, &mut out).is_err());
    assert!(guest.read_dirty(GuestAddr(R1.0), R1.2, 3000, &mut out).is_err());
    assert!(guest.read_dirty(GuestAddr(R1.0), R1.2, 4096, &mut out[..1]).is_err(), "bitmap too small");
    // No new device while tracking.
    assert!(guest.assign(&iommus, 0, NVME).is_err());
    guest.stop_dirty_tracking().unwrap();
    assert!(!guest.dirty_tracking());
    assert!(!ssade(&walk(&host, UNIT_A, ALIAS_RID, R1.0)));
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
}

/// Starting dirty tracking with each of its iommufd fault points failing
/// in turn (HWPT allocations, their fills, the moves): every failure
/// leaves the view as it was (devices on the IOAS's own domains and still
/// mapping guest memory, no object left over, tracking off), and the
/// next start succeeds.
#[test]
fn a_failed_start_of_dirty_tracking_leaves_the_view_as_it_was() {
    let tracking = Config { cap: Config::QEMU.cap, ecap: Config::QEMU.ecap | 1 << 43 | 1 << 45 | 1 << 46 | 1 };
    let options = Options { vtd_mode: Some(vtd::Mode::Scalable), ..Options::default() };
    for n in 1..200 {
        let failures = n - 1;
        let host = host(tracking);
        let iommus = Iommus::bring_up_with(host.clone(), options);
        let mut guest = GuestDma::new(&iommus, 1 << 20).unwrap();
        guest.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
        // Two units: two tracking domains, two moves.
        guest.assign(&iommus, 0, ALIASED).unwrap();
        guest.assign(&iommus, 0, XHCI).unwrap();
        let objects = guest.ictx().object_ids();
        guest.ictx().accounting().faults.arm(Some(n));
        let r = guest.start_dirty_tracking();
        guest.ictx().accounting().faults.arm(None);
        if r.is_ok() {
            assert!(guest.dirty_tracking());
            assert!(failures >= 2, "only {failures} fault point(s) before success");
            return;
        }
        assert!(!guest.dirty_tracking(), "fault point {n}: tracking counts as started");
        assert_eq!(guest.ictx().object_ids(), objects, "fault point {n}: objects left over or lost");
        assert_maps(&host, UNIT_A, ALIAS_RID, R1);
        assert_maps(&host, UNIT_C, 0x00a0, R1);
        guest.start_dirty_tracking().unwrap_or_else(|e| panic!("fault point {n}: the next start fails: {e}"));
    }
    panic!("never succeeded");
}

/// A pass-through claim the unit does not confirm: every requester id of
/// the group is blocked again, the one that failed included (its entry was
/// written before the invalidation failed), and the claim is dropped; a
/// function the host had claimed before stays claimed, blocked.
#[test]
fn a_failed_pass_through_claim_leaves_the_group_blocked() {
    use portcullis::{HostUse, Owner};
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    host.vtd(UNIT_C).state().queue_errors_left = 1;
    assert!(matches!(iommus.claim_for_host(0, XHCI, HostUse::PassThrough), Err(PassthroughError::Unit(..))));
    assert_eq!(iommus.owner_of(0, XHCI), None);
    assert_blocked(&host, UNIT_C, 0x00a0, 0x1234_5000, "a failed pass-through claim");

    iommus.claim_for_host(0, XHCI, HostUse::Blocked).unwrap();
    host.vtd(UNIT_C).state().queue_errors_left = 1;
    assert!(iommus.claim_for_host(0, XHCI, HostUse::PassThrough).is_err());
    assert_eq!(iommus.owner_of(0, XHCI), Some(Owner::Host), "the earlier claim holds");
    assert_blocked(&host, UNIT_C, 0x00a0, 0x1234_5000, "a failed second claim");
    iommus.release_host(0, XHCI).unwrap();
    assert_eq!(iommus.owner_of(0, XHCI), None);
    // A unit that confirms nothing any more: the entry is cleared in
    // memory, but the host keeps the group (no guest is given it).
    host.vtd(UNIT_C).state().queue_error = true;
    assert!(iommus.claim_for_host(0, XHCI, HostUse::PassThrough).is_err());
    host.vtd(UNIT_C).state().queue_error = false;
    assert_eq!(iommus.owner_of(0, XHCI), Some(Owner::Host));
    assert_blocked(&host, UNIT_C, 0x00a0, 0x1234_5000, "a unit that stopped answering");
}

/// The host's claims and the host's own DMA views hold functions apart:
/// `release_host` gives back only a claim, a claim is refused for a
/// function a host view has, and two host views cannot both have one.
#[test]
fn host_claims_and_host_views_do_not_release_each_other() {
    use portcullis::{HostUse, Owner};
    let host = host(Config::QEMU.coherent(true));
    let iommus = Iommus::bring_up(host.clone());
    let mut hv = GuestDma::new_host(&iommus, 1 << 20).unwrap();
    hv.add_memory(GuestAddr(R1.0), PhysAddr(R1.1), R1.2, true).unwrap();
    hv.assign(&iommus, 0, ALIASED).unwrap();
    let f = portcullis::Function { segment: 0, bdf: ALIASED };
    assert_eq!(iommus.release_host(0, ALIASED), Err(PassthroughError::NotAssigned(f)));
    assert_eq!(iommus.claim_for_host(0, ALIASED, HostUse::Blocked), Err(PassthroughError::Owned(f, Owner::Host)));
    let mut other = GuestDma::new_host(&iommus, 1 << 20).unwrap();
    assert_eq!(other.assign(&iommus, 0, ALIASED), Err(PassthroughError::Owned(f, Owner::Host)));
    drop(other);
    assert_eq!(iommus.owner_of(0, ALIASED), Some(Owner::Host));
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    // A claim of a function the view does not have leaves the view's alone.
    iommus.claim_for_host(0, XHCI, HostUse::Blocked).unwrap();
    iommus.release_host(0, XHCI).unwrap();
    assert_maps(&host, UNIT_A, ALIAS_RID, R1);
    drop(hv);
    assert_eq!(iommus.owner_of(0, ALIASED), None);
}
