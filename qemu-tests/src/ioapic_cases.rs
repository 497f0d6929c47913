//! The host's IOAPIC with interrupt remapping on: a pin reaches the CPU
//! only through a remapping entry for the IOAPIC's source id (VT-d: the
//! DMAR's IOAPIC scope, QEMU's 0xff00; AMD-Vi: the IVRS special entry,
//! QEMU's 0x00a0), on the vector the entry names.
//!
//! The interrupt is the PIT's: channel 0 as a rate generator pulses ISA
//! IRQ 0, which QEMU's MADT overrides to GSI 2 (edge, active high). QEMU
//! delivers every pulse to the IOAPIC pin as an edge, so a running PIT
//! gives a steady stream to count, started and stopped at will.

use crate::dma_cases::{fail, iommus};
use alloc::format;
use alloc::vec::Vec;
use portcullis::{PassthroughError, PinMode, Vendor};
use portcullis_kernel::arch::ioapic::{IoApic, RTE_MASKED};
use portcullis_kernel::arch::irq;
use portcullis_kernel::ktest::TestResult;
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

/// The vector the route names first, and the one it is retargeted to.
const VECTOR: u8 = 0x2d;
const OTHER: u8 = 0x2e;
/// PIT divisor: about 1 kHz.
const PIT_DIVISOR: u16 = 1193;

/// Interrupts counted on `vector` within `ms` milliseconds, interrupts on.
fn count_for(vector: u8, ms: u64) -> u64 {
    let before = irq::count(vector);
    portcullis_kernel::time::delay(core::time::Duration::from_millis(ms));
    irq::count(vector) - before
}

/// Waits up to `ms` for `n` interrupts on `vector`.
fn arrives(vector: u8, n: u64, ms: u64) -> bool {
    let before = irq::count(vector);
    let deadline = portcullis_kernel::time::Deadline::after(core::time::Duration::from_millis(ms));
    while irq::count(vector) < before + n && !deadline.expired() {
        core::hint::spin_loop();
    }
    irq::count(vector) >= before + n
}

/// With the IOMMUs brought up, the PIT's IOAPIC pin programmed in the
/// classic (compatibility) form does not reach the CPU on AMD-Vi (the
/// IOAPIC's device table entry aborts its interrupts); routed through
/// `Iommus::route_ioapic`, it arrives on the vector the remapping entry
/// names; retargeted, only on the new vector, with the redirection entry
/// left as it was; freed, on neither. A new route reuses the freed entry.
pub fn host_ioapic_interrupts_through_remapping(p: &Platform) -> TestResult {
    match p.config.as_str() {
        "none" => skip!("no IOMMU: nothing remaps the IOAPIC"),
        "amd" => skip!("QEMU's AMD-Vi remaps interrupts only with intremap=on (the amd-ir configuration)"),
        "intel-rb" => skip!("interrupt remapping needs queued invalidation, which intel-rb runs without"),
        _ => {}
    }
    let iommus = iommus(p);
    let Some(vendor) = iommus.units().iter().find(|u| u.state.is_ok()).map(|u| u.vendor) else {
        skip!("no running IOMMU unit")
    };
    let acpi = p.acpi();
    let timer = acpi.isa_irq(0);
    let (ioapic, pin) =
        IoApic::for_gsi(acpi, timer.gsi).ok_or_else(|| fail(format!("no IOAPIC has GSI {}", timer.gsi)))?;
    ensure_eq!((timer.gsi, pin), (2, 2), "the timer's GSI and pin");
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))? as u32;
    let sources = iommus.ioapic_sources();
    let source =
        sources.iter().find(|s| s.id == ioapic.id()).ok_or_else(|| fail(format!("{ioapic:?} not in {sources:?}")))?;
    let expected_sid = match vendor {
        Vendor::IntelVtd => 0xff00,
        Vendor::AmdVi => 0x00a0,
    };
    ensure_eq!(source.source_id, expected_sid, "the IOAPIC's source id");
    let saved = ioapic.rte(pin);
    ensure!(saved & RTE_MASKED != 0, "the timer pin is unmasked already: {:#x}", saved);
    portcullis_kernel::time::pit_periodic(PIT_DIVISOR);
    irq::enable();
    let r = run(p, iommus, &ioapic, pin, PinMode { level: timer.level, active_low: timer.active_low }, apic, vendor);
    irq::disable();
    ioapic.set_rte(pin, saved | RTE_MASKED);
    portcullis_kernel::time::pit_stop();
    // Blocked interrupts may have left fault records: read them so later
    // cases start clean.
    let mut faults = Vec::new();
    for u in iommus.units() {
        if let Ok(d) = &u.state {
            faults.extend(d.generic().poll_faults());
        }
    }
    log::info!("IOAPIC case: faults recorded {faults:x?}");
    r
}

fn run(
    p: &Platform,
    iommus: &portcullis_kernel::host::Iommus,
    ioapic: &IoApic,
    pin: u8,
    mode: PinMode,
    apic: u32,
    vendor: Vendor,
) -> TestResult {
    let err = |e: PassthroughError| fail(format!("{e}"));
    // Classic form (physical destination, fixed, the vector itself), no
    // route yet. The DMAR leaves GSTS.CFIS clear and the IOAPIC's device
    // table entry aborts its interrupts, so neither should arrive; QEMU's
    // VT-d passes the compatibility format whatever CFIS says, and QEMU
    // 10.0's AMD-Vi does not remap IOAPIC messages at all (see
    // drivers/vtd/QEMU.md and ../shared/QEMU-NOTES.md).
    ioapic.set_rte(pin, (apic as u64) << 56 | VECTOR as u64);
    let classic = count_for(VECTOR, 100);
    ioapic.set_masked(pin, true);
    log::info!("{vendor:?}, {}: compatibility-format IOAPIC interrupts in 100 ms: {classic}", p.config);

    let route = iommus.route_ioapic(ioapic.id(), mode, VECTOR, apic).map_err(err)?;
    let rte = route.rte();
    match vendor {
        Vendor::IntelVtd => {
            ensure!(rte >> 48 & 1 == 1 && rte as u8 == VECTOR, "not remappable format: {:#x}", rte)
        }
        Vendor::AmdVi => {
            ensure!(rte as u8 != VECTOR && rte >> 8 == 0, "not an index with fixed delivery: {:#x}", rte);
            if classic > 0 {
                // The remapping is not observable: check the tables, then
                // say why it stops here.
                let r = amd_tables_hold_the_route(iommus, &route, apic);
                iommus.free_ioapic(route.handle).map_err(err)?;
                r?;
                skip!(
                    "QEMU's AMD-Vi passes IOAPIC messages unremapped (10.0 builds the IOAPIC's address space \
                     before its interrupt-remapping region; fixed in 10.1): routing checked in the tables only"
                );
            }
        }
    }
    ioapic.set_rte(pin, rte);
    ensure_eq!(ioapic.rte(pin) & !(1 << 12), rte, "the redirection entry as written");
    let other_before = irq::count(OTHER);
    ensure!(arrives(VECTOR, 3, 2000), "the routed timer interrupt did not arrive on vector {:#x}", VECTOR);
    ensure_eq!(irq::count(OTHER), other_before, "interrupts on the other vector");

    // Retargeted, the IOAPIC unchanged (on VT-d its vector field still
    // names the old vector): only the new vector arrives.
    let moved = iommus.retarget_ioapic(route.handle, OTHER, apic).map_err(err)?;
    let old = irq::count(VECTOR);
    ensure!(arrives(OTHER, 3, 2000), "the retargeted interrupt did not arrive on vector {:#x}", OTHER);
    ensure_eq!(irq::count(VECTOR), old, "the old vector after the retarget");
    let expected = match vendor {
        Vendor::IntelVtd => rte & !0xff | OTHER as u64,
        Vendor::AmdVi => rte,
    };
    ensure_eq!(moved.rte(), expected, "the redirection entry after the retarget (VT-d: the vector field follows)");
    ioapic.set_rte(pin, moved.rte());

    // Freed, the pin still unmasked and pulsing: nothing arrives.
    iommus.free_ioapic(route.handle).map_err(err)?;
    let (a, b) = (irq::count(VECTOR), irq::count(OTHER));
    portcullis_kernel::time::delay(core::time::Duration::from_millis(100));
    ensure_eq!((irq::count(VECTOR) - a, irq::count(OTHER) - b), (0, 0), "interrupts after the free");
    ensure_eq!(iommus.free_ioapic(route.handle), Err(PassthroughError::NoSuchRoute), "a second free");
    ioapic.set_masked(pin, true);

    // Routed again: the freed entry is reused, and the pin works.
    let again = iommus.route_ioapic(ioapic.id(), mode, VECTOR, apic).map_err(err)?;
    ensure_eq!(again.rte(), rte, "the freed entry was not reused");
    ioapic.set_rte(pin, again.rte());
    ensure!(arrives(VECTOR, 3, 2000), "the interrupt did not arrive through the reused entry");
    ioapic.set_masked(pin, true);
    iommus.free_ioapic(again.handle).map_err(err)?;
    Ok(())
}

/// AMD-Vi: the IOAPIC's device table entry remaps through its own table,
/// whose entry at the redirection entry's vector field names `VECTOR` and
/// `apic`.
fn amd_tables_hold_the_route(
    iommus: &portcullis_kernel::host::Iommus,
    route: &portcullis::IoapicRoute,
    apic: u32,
) -> TestResult {
    use portcullis::drivers::amdvi::dte::Interrupts;
    let (source, entry) = iommus.ioapic_route_entry(route.handle).ok_or_else(|| fail("route unknown".into()))?;
    ensure_eq!(entry as u64, route.rte() & 0xff, "the entry the vector field names");
    let Ok(portcullis::Driver::Amd(unit)) = &iommus.units()[source.unit].state else {
        return Err(fail("the IOAPIC's unit is not a running AMD-Vi unit".into()));
    };
    let u = unit.lock();
    let dte = u.dte(source.source_id).ok_or_else(|| fail("no device table entry".into()))?;
    ensure!(
        matches!(dte.interrupts(), Some(Interrupts::Remapped { .. })),
        "the IOAPIC's device table entry does not remap: {:x?}",
        dte
    );
    // 32-bit entries, or 128-bit ones with x2APIC destinations.
    let (enabled, vector, dest) = match (u.irte(source.source_id, entry), u.irte_ga(source.source_id, entry)) {
        (Some(e), _) => (e.enabled(), e.vector(), e.destination() as u32),
        (None, Some(e)) => (e.enabled(), e.vector(), e.destination()),
        (None, None) => return Err(fail("no interrupt table".into())),
    };
    ensure!(enabled, "entry {} not enabled", entry);
    ensure_eq!((vector, dest), (VECTOR, apic), "the remapping entry");
    Ok(())
}
