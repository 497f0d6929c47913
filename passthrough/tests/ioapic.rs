//! The host's IOAPIC pins routed through interrupt remapping, over the
//! register models: the IOAPICs found in real machines' DMAR and IVRS, the
//! remapping entries written for their source ids, and the redirection
//! entries handed out, checked by turning each redirection entry into the
//! message an IOAPIC sends for it and walking that through the unit.
//!
//! Tables from the corpus (`drivers/acpi-tables/tests/corpus/SOURCES.tsv`):
//! * `dmar-0d29630957f2.dat` (Supermicro X10DAi): IOAPIC 3 under the DRHD
//!   at 0xfbffc000 (80:05.4), IOAPICs 1 (f0:1f.7) and 2 (00:05.4) under the
//!   INCLUDE_PCI_ALL DRHD at 0xf3ffc000;
//! * `ivrs-524ae61a2aa7.dat` (Gigabyte 990XA-UD3): IOAPIC 9 with device id
//!   0x00a0 (the southbridge's, also its SMBus function 00:14.0's) and
//!   IOAPIC 10 with 0x0001.

mod support;

use amdvi::testing::QEMU_EFR;
use portcullis::{
    Bdf, GuestDma, HwError, IoapicError, IoapicSource, Iommus, PassthroughError, PciFunction, PinMode, UnitError,
};
use support::host::ModelHost;
use support::host::pci::{INTEGRATED, bdf, endpoint};
use support::walk::{self, Msi, Remapped};
use support::{amd_invalidated, changed_since, vtd_invalidated};

const DMAR: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/dmar/dmar-0d29630957f2.dat");
const IVRS_990XA: &[u8] = include_bytes!("../../drivers/acpi-tables/tests/corpus/ivrs/ivrs-524ae61a2aa7.dat");

const UNIT_A: u64 = 0xfbff_c000;
const UNIT_B: u64 = 0xf3ff_d000;
const UNIT_C: u64 = 0xf3ff_c000;
const UNIT_990: u64 = 0xfeb2_0000;

/// The message an IOAPIC sends for redirection entry `rte` (unmasked,
/// fixed or remappable alike): address bits 19:4 from entry bits 63:48,
/// bit 2 from bit 11; data: vector, delivery mode (10:8), trigger (15).
fn message(rte: u64) -> (u64, u32) {
    let address = 0xfee0_0000 | ((rte >> 48) & 0xffff) << 4 | ((rte >> 11) & 1) << 2;
    let data = (rte & 0x7ff) as u32 | ((rte >> 15) as u32 & 1) << 15;
    (address, data)
}

fn remapped(host: &ModelHost, base: u64, sid: u16, rte: u64) -> Remapped {
    assert_eq!(rte & 1 << 16, 0, "handed out masked: {rte:#x}");
    let (address, data) = message(rte);
    match walk::msi(host, base, sid, address, data).unwrap() {
        Msi::Remapped(r) => r,
        other => panic!("{sid:#06x} with RTE {rte:#x} on {base:#x}: {other:?}"),
    }
}

fn blocked(host: &ModelHost, base: u64, sid: u16, rte: u64) -> &'static str {
    let (address, data) = message(rte);
    match walk::msi(host, base, sid, address, data).unwrap() {
        Msi::Blocked(why) => why,
        other => panic!("{sid:#06x} with RTE {rte:#x} on {base:#x} not blocked: {other:?}"),
    }
}

fn vtd_host() -> std::sync::Arc<ModelHost> {
    let config = vtd::testing::Config::QEMU;
    ModelHost::builder()
        .vtd_unit(UNIT_A, config)
        .vtd_unit(UNIT_B, config)
        .vtd_unit(UNIT_C, config)
        .functions(vec![endpoint(bdf(0, 0x1b, 0), None, INTEGRATED)])
        .dmar(DMAR)
        .build()
}

#[test]
fn vtd_ioapics_come_from_the_dmar_scopes() {
    let host = vtd_host();
    let iommus = Iommus::bring_up(host.clone());
    let sid = |b: Bdf| b.requester_id();
    assert_eq!(
        iommus.ioapic_sources(),
        [
            IoapicSource { id: 1, unit: 2, source_id: sid(bdf(0xf0, 0x1f, 7)) },
            IoapicSource { id: 2, unit: 2, source_id: sid(bdf(0, 5, 4)) },
            IoapicSource { id: 3, unit: 0, source_id: sid(bdf(0x80, 5, 4)) },
        ]
    );
    let e = iommus.route_ioapic(8, PinMode::EDGE_HIGH, 0x30, 0).unwrap_err();
    assert_eq!(e, PassthroughError::Ioapic(8, IoapicError::NotDescribed));
}

/// An edge pin of IOAPIC 3 (unit A): an entry for 80:05.4 with its
/// vector, destination and edge trigger mode, written before the entry
/// cache was invalidated; the redirection entry in remappable format
/// names it and carries the vector; no other source may use it; other
/// units untouched.
#[test]
fn vtd_edge_pin_routed_retargeted_and_freed() {
    let host = vtd_host();
    let iommus = Iommus::bring_up(host.clone());
    let ioapic3 = bdf(0x80, 5, 4).requester_id();
    for b in [UNIT_A, UNIT_B, UNIT_C] {
        host.vtd(b).take_log();
    }
    let t0 = host.mem.stamp();
    let route = iommus.route_ioapic(3, PinMode::EDGE_HIGH, 0x51, 2).unwrap();
    assert!(host.vtd(UNIT_B).log().is_empty() && host.vtd(UNIT_C).log().is_empty(), "other units touched");
    let rte = route.rte();
    assert_eq!(rte >> 48 & 1, 1, "remappable format: {rte:#x}");
    assert_eq!(rte & 0xffff, 0x51, "edge, active high, fixed, the entry's vector: {rte:#x}");
    let r = remapped(&host, UNIT_A, ioapic3, rte);
    assert_eq!((r.vector, r.destination), (0x51, 2));
    let (source, entry) = iommus.ioapic_route_entry(route.handle).unwrap();
    assert_eq!((source.unit, source.source_id, entry as u32), (0, ioapic3, r.index));
    let irte_lo = host.mem.read(host.unit(UNIT_A).view, r.words[0]).unwrap();
    assert_eq!(irte_lo >> 4 & 1, 0, "edge-triggered entry");
    let changed = changed_since(&host, host.unit(UNIT_A).view, &r.words, t0).unwrap();
    vtd_invalidated(&host.vtd(UNIT_A).log(), changed, "IRTE written", |i| i.covers_interrupt_entry(entry));
    assert_eq!(blocked(&host, UNIT_A, 0x8020, rte), "source id not allowed by the entry");
    // A second pin gets its own entry.
    let second = iommus.route_ioapic(3, PinMode::EDGE_HIGH, 0x52, 2).unwrap();
    assert_ne!(remapped(&host, UNIT_A, ioapic3, second.rte()).index, r.index);

    // Retargeted: the same message now goes to the new vector and CPU;
    // the redirection entry's vector field follows.
    let t1 = host.mem.stamp();
    let moved = iommus.retarget_ioapic(route.handle, 0x55, 1).unwrap();
    assert_eq!(moved.handle, route.handle);
    assert_eq!(moved.rte(), rte & !0xff | 0x55);
    let r2 = remapped(&host, UNIT_A, ioapic3, rte);
    assert_eq!((r2.vector, r2.destination, r2.index), (0x55, 1, r.index));
    let changed = changed_since(&host, host.unit(UNIT_A).view, &r2.words, t1).unwrap();
    vtd_invalidated(&host.vtd(UNIT_A).log(), changed, "IRTE retargeted", |i| i.covers_interrupt_entry(entry));
    // An APIC id the entries cannot hold: refused, nothing changes.
    let e = iommus.retarget_ioapic(route.handle, 0x56, 0x123).unwrap_err();
    assert!(
        matches!(e, PassthroughError::Ioapic(3, IoapicError::Unit(UnitError { cause: HwError::Invalid(_), .. }))),
        "{e:?}"
    );
    assert_eq!(remapped(&host, UNIT_A, ioapic3, rte).vector, 0x55);

    // Freed: blocked; the handle is gone; the entry is reused.
    iommus.free_ioapic(route.handle).unwrap();
    assert_eq!(blocked(&host, UNIT_A, ioapic3, rte), "entry not present");
    assert_eq!(iommus.free_ioapic(route.handle), Err(PassthroughError::NoSuchRoute));
    assert_eq!(iommus.retarget_ioapic(route.handle, 0x51, 2), Err(PassthroughError::NoSuchRoute));
    assert!(iommus.ioapic_route_entry(route.handle).is_none());
    let again = iommus.route_ioapic(3, PinMode::EDGE_HIGH, 0x57, 0).unwrap();
    assert_ne!(again.handle, route.handle);
    assert_eq!(again.rte(), rte & !0xff | 0x57, "the freed entry is reused");
    assert_eq!(remapped(&host, UNIT_A, ioapic3, again.rte()).vector, 0x57);
}

/// A level, active-low pin of IOAPIC 1 (the catch-all unit C): the entry
/// is level-triggered, so the CPU's EOI reaches the IOAPIC, and the
/// redirection entry says level and active low; retargeting keeps the
/// trigger mode.
#[test]
fn vtd_level_pin_keeps_its_trigger_mode() {
    let host = vtd_host();
    let iommus = Iommus::bring_up(host.clone());
    let ioapic1 = bdf(0xf0, 0x1f, 7).requester_id();
    let route = iommus.route_ioapic(1, PinMode::LEVEL_LOW, 0x61, 3).unwrap();
    assert_eq!(route.rte() & 0xffff, 1 << 15 | 1 << 13 | 0x61);
    assert_eq!(route.eoi_vector(), 0x61);
    let r = remapped(&host, UNIT_C, ioapic1, route.rte());
    assert_eq!((r.vector, r.destination), (0x61, 3));
    let level = |r: &Remapped| host.mem.read(host.unit(UNIT_C).view, r.words[0]).unwrap() >> 4 & 1 == 1;
    assert!(level(&r), "level-triggered entry");
    let moved = iommus.retarget_ioapic(route.handle, 0x62, 3).unwrap();
    assert_eq!(moved.eoi_vector(), 0x62);
    let r = remapped(&host, UNIT_C, ioapic1, moved.rte());
    assert_eq!(r.vector, 0x62);
    assert!(level(&r), "level-triggered after the retarget");
    // IOAPIC 2 shares the unit, not the entry's source id.
    assert_eq!(blocked(&host, UNIT_C, bdf(0, 5, 4).requester_id(), moved.rte()), "source id not allowed by the entry");
}

fn amd_host(extra: Vec<PciFunction>) -> std::sync::Arc<ModelHost> {
    let mut functions = vec![endpoint(bdf(0, 0, 0), None, None), endpoint(bdf(0, 0, 2), None, None)];
    functions.extend(extra);
    ModelHost::builder()
        .amd_unit(UNIT_990, QEMU_EFR, true)
        .functions(functions)
        .ivrs(IVRS_990XA)
        .guest_ram(0x2_0000_0000, 1 << 30)
        .build()
}

/// IOAPIC 9 (device id 0x00a0): its device table entry gets its own
/// interrupt table, invalidated; the redirection entry carries the entry's
/// index in its vector field and fixed delivery, and is not changed by a
/// retarget; freed, the message is blocked again; the device id's DMA
/// stays blocked throughout.
#[test]
fn amd_pin_routed_through_the_special_entry_device_id() {
    let host = amd_host(Vec::new());
    let iommus = Iommus::bring_up(host.clone());
    assert_eq!(
        iommus.ioapic_sources(),
        [IoapicSource { id: 9, unit: 0, source_id: 0x00a0 }, IoapicSource { id: 10, unit: 0, source_id: 0x0001 }]
    );
    let (address, data) = message(amdvi::irte::ioapic_rte(0, PinMode::EDGE_HIGH).unwrap());
    assert_eq!(walk::msi(&host, UNIT_990, 0x00a0, address, data).unwrap(), Msi::Blocked("IntCtl: abort"));
    host.amd(UNIT_990).take_log();
    let t0 = host.mem.stamp();
    let route = iommus.route_ioapic(9, PinMode::EDGE_HIGH, 0x41, 1).unwrap();
    let rte = route.rte();
    assert_eq!(rte >> 8, 0, "fixed, physical, edge, active high, destination 0: {rte:#x}");
    let r = remapped(&host, UNIT_990, 0x00a0, rte);
    assert_eq!((r.vector, r.destination, r.index), (0x41, 1, rte as u32 & 0xff));
    let changed = changed_since(&host, host.unit(UNIT_990).view, &r.words, t0).unwrap();
    amd_invalidated(&host.amd(UNIT_990).log(), changed, "interrupt table", |i| i.covers_interrupts(0x00a0));
    // IOAPIC 10 has its own device id, so its own table.
    let other = iommus.route_ioapic(10, PinMode::LEVEL_LOW, 0x42, 1).unwrap();
    assert_eq!(other.rte() & 0xff00, 1 << 15 | 1 << 13);
    assert_eq!(remapped(&host, UNIT_990, 0x0001, other.rte()).vector, 0x42);
    assert_eq!(remapped(&host, UNIT_990, 0x00a0, rte).vector, 0x41);
    let second = iommus.route_ioapic(9, PinMode::EDGE_HIGH, 0x43, 1).unwrap();
    assert_ne!(second.rte(), rte);

    let moved = iommus.retarget_ioapic(route.handle, 0x45, 0).unwrap();
    assert_eq!(moved.rte(), rte, "the redirection entry stays");
    let r2 = remapped(&host, UNIT_990, 0x00a0, rte);
    assert_eq!((r2.vector, r2.destination), (0x45, 0));
    iommus.free_ioapic(route.handle).unwrap();
    assert_eq!(blocked(&host, UNIT_990, 0x00a0, rte), "RemapEn clear");
    assert_eq!(remapped(&host, UNIT_990, 0x00a0, second.rte()).vector, 0x43);
    let w = walk::translate(&host, UNIT_990, 0x00a0, 0x1000).unwrap();
    assert!(w.blocked(), "the IOAPIC's device id DMAs: {:?}", w.outcome);
}

/// 00:14.0 carries the southbridge IOAPIC's device id: while a guest
/// holds it, the IOAPIC cannot be routed (its device could raise the
/// host's vectors through the shared table).
#[test]
fn amd_ioapic_refused_while_a_guest_owns_its_device_id() {
    let smbus = bdf(0, 0x14, 0);
    let host = amd_host(vec![endpoint(smbus, None, None)]);
    let iommus = Iommus::bring_up(host.clone());
    let mut guest = GuestDma::new(&iommus, 1 << 10).unwrap();
    guest.assign(&iommus, 0, smbus).unwrap();
    let e = iommus.route_ioapic(9, PinMode::EDGE_HIGH, 0x41, 0).unwrap_err();
    assert_eq!(e, PassthroughError::Ioapic(9, IoapicError::SourceOwned(guest.owner())));
    guest.unassign(0, smbus).unwrap();
    let route = iommus.route_ioapic(9, PinMode::EDGE_HIGH, 0x41, 0).unwrap();
    // And the other way round: while the host routes the IOAPIC, no
    // guest can be given the function carrying its device id.
    let f = portcullis::Function { segment: 0, bdf: smbus };
    assert_eq!(guest.assign(&iommus, 0, smbus), Err(PassthroughError::Owned(f, portcullis::Owner::Host)));
    iommus.free_ioapic(route.handle).unwrap();
    guest.assign(&iommus, 0, smbus).unwrap();
}
