//! In-guest VT-d tests with the edu DMA engine (issue 5): a DMA lands
//! exactly where it is mapped and nowhere else; what is not mapped, not
//! writable, unmapped again or not attached is blocked, changes no byte,
//! and leaves a fault record naming the device and the address.

use crate::dma_cases::{self as dma, Backend, Buffers, CANARY, UnitBackend, X, Y, Z, edu_behind, edus, fail};
use alloc::format;
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis::drivers::vtd;
use portcullis::{Driver, Vendor, VtdUnit};
use portcullis_iommu::{IommuDomain, Prot};
use portcullis_kernel::host::KernelHost;
use portcullis_kernel::ktest::{Outcome, TestResult};
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

/// The VT-d unit covering the edu devices (brought up once per boot with
/// the others, see `dma_cases::iommus`), as the common cases drive it.
fn vtd(p: &Platform) -> Result<UnitBackend, Outcome> {
    if !p.config.starts_with("intel") {
        skip!("needs an Intel IOMMU configuration");
    }
    UnitBackend::first(p, Vendor::IntelVtd)
}

/// The same unit as the VT-d driver's own type.
fn unit(p: &Platform) -> Result<Arc<VtdUnit<KernelHost>>, Outcome> {
    match vtd(p)?.driver {
        Driver::Vtd(u) => Ok(u),
        Driver::Amd(_) => Err(fail("the first VT-d unit is not a VT-d unit".into())),
    }
}

fn faults(u: &VtdUnit<KernelHost>) -> Vec<vtd::FaultRecord> {
    u.lock().poll_faults()
}

dma::dma_cases_for!(vtd;
    vtd_mapped_dma_lands_exactly => mapped_dma_lands_exactly,
    vtd_unmapped_iova_is_blocked_and_faults => unmapped_iova_is_blocked,
    vtd_read_only_mapping_blocks_writes => read_only_mapping_blocks_writes,
    vtd_unmap_then_remap => unmap_then_remap,
    vtd_unattached_device_is_blocked => unattached_device_is_blocked,
    vtd_bridge_alias_isolated_and_translated => bridge_alias_isolated_and_translated,
    vtd_domains_isolate_and_share => domains_isolate_and_share,
    vtd_large_pages_are_used_and_split => large_pages_are_used_and_split,
    vtd_high_iovas_up_to_the_aperture => high_iovas_up_to_the_aperture,
    vtd_iommufd_passthrough_dma => iommufd_passthrough_dma,
    vtd_rmrr_identity_mapped_and_reserved => firmware_ranges_identity_mapped_and_reserved,
);

/// The fault event interrupt (the option beside polling): a blocked DMA
/// raises the MSI on the programmed vector; reading the records re-arms it
/// for the next fault; masked, the unit sets FECTL.IP instead, and reading
/// the records clears that too.
pub fn vtd_fault_event_interrupt(p: &Platform) -> TestResult {
    use portcullis_kernel::arch::irq;
    const VECTOR: u8 = 0x28;
    let b = vtd(p)?;
    let u = &unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    faults(u);
    let bufs = Buffers::new()?;
    let mut d = b.new_domain().map_err(fail)?;
    d.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("{e}")))?;
    b.attach(&d, edu.sid).map_err(fail)?;
    enable_fault_interrupt(u, VECTOR).map_err(fail)?;
    let wait_event = |after: u64| {
        let deadline = portcullis_kernel::time::uptime_ns() + 2_000_000_000;
        while fault_events() == after && portcullis_kernel::time::uptime_ns() < deadline {
            core::hint::spin_loop();
        }
        fault_events()
    };
    irq::enable();
    let r = (|| -> TestResult {
        edu.read_from(X, 4096).map_err(|_| fail("DMA read timed out".into()))?;
        for round in 0..2 {
            let before = fault_events();
            let on_vector = irq::count(VECTOR);
            edu.write_to(Z, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
            let after = wait_event(before);
            ensure!(after > before, "round {round}: no fault event interrupt within 2 s");
            ensure!(irq::count(VECTOR) > on_vector, "round {round}: the interrupt came on another vector");
            let f = faults(u);
            ensure!(
                f.iter().any(|r| r.source_id == edu.sid && r.address == Z && r.write),
                "round {round}: no fault record for the blocked write: {:?}",
                f
            );
        }
        bufs.check_untouched()?;
        ensure!(bufs.page(2).iter().all(|&x| x == CANARY), "page B changed by a blocked DMA");
        // Masked: no interrupt, FECTL.IP set until the records are read.
        disable_fault_interrupt(u);
        let before = fault_events();
        edu.write_to(Z, 4096).map_err(|_| fail("blocked DMA write timed out".into()))?;
        ensure_eq!(u.lock().fault_event_state(), (true, true), "FECTL (IM, IP) after a masked fault");
        ensure_eq!(fault_events(), before, "an interrupt arrived while masked");
        ensure!(!faults(u).is_empty(), "no fault record while masked");
        ensure_eq!(u.lock().fault_event_state(), (true, false), "FECTL (IM, IP) after reading the records");
        Ok(())
    })();
    irq::disable();
    disable_fault_interrupt(u);
    b.detach(&d, edu.sid).map_err(fail)?;
    r
}

/// The unit runs in the mode its configuration offers (scalable when
/// ECAP.SMTS), domains get the stage the unit translates with, and an
/// attach programs exactly the entry that stage needs: a legacy context
/// entry, or a PASID-0 entry with the right PGTT, table root and depth.
pub fn vtd_unit_mode_and_stage_match_configuration(p: &Platform) -> TestResult {
    use vtd::Stage;
    let b = vtd(p)?;
    let u = unit(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    let (want_scalable, want_stage) = match p.config.as_str() {
        "intel-sm" => (true, Stage::Second),
        "intel-fs" => (true, Stage::First),
        _ => (false, Stage::Second),
    };
    ensure_eq!(u.lock().is_scalable(), want_scalable, "unit in scalable mode");
    ensure_eq!(u.lock().queued(), p.config != "intel-rb", "queued invalidation on");
    let d = b.new_domain().map_err(fail)?;
    let t = d.table_info();
    let want_format = match want_stage {
        Stage::Second => "VT-d second stage",
        Stage::First => "x86 first stage",
    };
    ensure_eq!(t.format, want_format, "domain stage");
    b.attach(&d, edu.sid).map_err(fail)?;
    let did = d.domain_id();
    let r = (|| -> TestResult {
        let unit = u.lock();
        ensure_eq!(unit.attached_domain(edu.sid), Some(did), "attached domain id");
        if want_scalable {
            use vtd::scalable::Pgtt;
            let e = unit.scalable_entry(edu.sid).ok_or_else(|| fail("no scalable-mode entries".into()))?;
            ensure!(e.pasid.present(), "PASID-0 entry not present");
            match want_stage {
                Stage::Second => {
                    ensure_eq!(e.pasid.pgtt(), Some(Pgtt::SecondStage), "PGTT");
                    ensure_eq!(e.pasid.ss_root(), t.root, "second-stage table root");
                    ensure_eq!(e.pasid.ss_levels(), t.levels, "second-stage depth");
                }
                Stage::First => {
                    ensure_eq!(e.pasid.pgtt(), Some(Pgtt::FirstStage), "PGTT");
                    ensure_eq!(e.pasid.fs_root(), t.root, "first-stage table root");
                    ensure_eq!(e.pasid.fs_levels(), 4, "first-stage depth");
                    ensure!(!e.pasid.sre(), "supervisor requests enabled");
                }
            }
        } else {
            let c = unit.context_entry(edu.sid);
            ensure!(c.present(), "context entry not present");
            ensure_eq!(c.did(), did, "context entry domain id");
            ensure_eq!(c.root(), t.root, "second-stage table root");
        }
        Ok(())
    })();
    b.detach(&d, edu.sid).map_err(fail)?;
    ensure_eq!(u.lock().attached_domain(edu.sid), None, "attached after detach");
    r
}

/// Every function is translated by the VT-d unit (QEMU's DRHD has
/// INCLUDE_PCI_ALL), under the requester id its DMA carries.
pub fn vtd_ownership_matches_pci_and_dmar(p: &Platform) -> TestResult {
    let b = vtd(p)?;
    let problems = b.iommus.problems();
    ensure!(problems.is_empty(), "firmware table problems: {:?}", problems);
    for d in &p.pci {
        let a = b.iommus.assignment(d.segment, d.bdf);
        ensure!(a.is_some(), "{} {:04x}:{:04x} has no unit", d.bdf, d.vendor, d.device);
    }
    let (_, bridged) = edu_behind(p, 7).ok_or_else(|| fail("no edu behind a PCIe-to-PCI bridge".into()))?;
    let a = b.iommus.assignment(bridged.segment, bridged.bdf).ok_or_else(|| fail("bridged edu unowned".into()))?;
    ensure_eq!(
        a.requester_id,
        (bridged.bdf.bus as u16) << 8,
        "requester id behind the PCIe-to-PCI bridge (secondary bus, 0.0)"
    );
    let (_, rooted) = edu_behind(p, 4).ok_or_else(|| fail("no edu behind a root port".into()))?;
    let a = b.iommus.assignment(rooted.segment, rooted.bdf).ok_or_else(|| fail("rooted edu unowned".into()))?;
    ensure_eq!(a.requester_id, rooted.bdf.requester_id(), "a root port does not alias");
    Ok(())
}

/// `IOMMU_GET_HW_INFO` on a VT-d device reports what Linux's VT-d driver
/// does: type INTEL_VTD and the unit's CAP and ECAP registers.
pub fn vtd_iommufd_hw_info_reports_the_unit(p: &Platform) -> TestResult {
    use iommufd::uapi::{IOMMU_HW_INFO_TYPE_INTEL_VTD, IommuHwInfoVtd};
    let b = vtd(p)?;
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    let id = b.device_id(p, edu)?;
    let (kind, bytes) = b.device_ops(id).hw_info();
    ensure_eq!(kind, IOMMU_HW_INFO_TYPE_INTEL_VTD, "data type");
    ensure_eq!(bytes.len(), IommuHwInfoVtd::SIZE, "data length");
    let info = IommuHwInfoVtd::read(&bytes);
    let caps = unit(p)?.lock().caps();
    ensure_eq!((info.flags, info.cap_reg, info.ecap_reg), (0, caps.cap, caps.ecap), "flags, CAP, ECAP");
    Ok(())
}

/// Interrupt remapping: the edu's MSI, in remappable format, reaches the
/// vector and CPU its table entry names; with the entry removed, or naming
/// another requester id, the MSI is blocked and recorded as a fault.
pub fn vtd_interrupt_remapping_routes_and_blocks_msi(p: &Platform) -> TestResult {
    use portcullis_kernel::arch::irq;
    use vtd::ir::{Irte, msi_address};
    const VECTOR: u8 = 0x29;
    let u = &unit(p)?;
    if !u.lock().caps().interrupt_remapping() {
        skip!("the unit has no interrupt remapping (ECAP.IR)");
    }
    if !u.lock().queued() {
        skip!("interrupt remapping needs queued invalidation (this configuration drives the unit without)");
    }
    let edu = edus(p).into_iter().next().ok_or_else(|| fail("no edu".into()))?;
    let dev = dma::edu_device(p, &edu)?;
    let id = vtd(p)?.device_id(p, &edu)?;
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))?;
    // The kernel turns remapping on at bring-up (with x2APIC destinations
    // when its APIC runs in x2APIC mode); leave it as found.
    let was_on = u.lock().interrupt_remapping_on();
    u.lock().enable_interrupt_remapping_with(irq::x2apic()).map_err(|e| fail(format!("{e}")))?;
    let handle = u.lock().alloc_irte().map_err(|e| fail(format!("{e}")))?;
    faults(u);
    let msi_set = portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi_address(handle), 0)));
    irq::enable();
    let raise = |wait_ms: u64| dma::raise_and_wait(&edu, VECTOR, wait_ms);
    let r = (|| -> TestResult {
        ensure!(msi_set, "the edu has no MSI capability");
        // No entry yet: blocked, and recorded.
        ensure!(!raise(200), "an MSI with no table entry was delivered");
        let f = faults(u);
        ensure!(f.iter().any(|r| r.source_id == id && r.reason == 0x22), "no 'entry not present' fault: {:?}", f);
        // The entry: delivered to VECTOR.
        let entry = u.lock().route_entry(VECTOR, apic, id).map_err(|e| fail(format!("{e}")))?;
        u.lock().set_irte(handle, entry).map_err(|e| fail(format!("{e}")))?;
        ensure!(raise(2000), "the remapped MSI did not arrive on vector {:#x}", VECTOR);
        ensure!(raise(2000), "a second remapped MSI did not arrive");
        ensure!(faults(u).is_empty(), "faults while delivering");
        // An entry for another requester id: source-id verification blocks it.
        u.lock()
            .set_irte(handle, Irte::remapped(VECTOR, apic, irq::x2apic(), id ^ 0x100))
            .map_err(|e| fail(format!("{e}")))?;
        ensure!(!raise(200), "an MSI from the wrong source was delivered");
        let f = faults(u);
        ensure!(f.iter().any(|r| r.source_id == id && r.reason == 0x26), "no source-id fault: {:?}", f);
        // The table has the unit's full 65536 entries (IRTA.S = 15): an
        // entry far above 255, with handle bit 15 in the address, works.
        ensure_eq!(u.lock().interrupt_table_entries(), vtd::ir::MAX_IRTES, "interrupt remapping table entries");
        const HIGH: u16 = 0x8123;
        u.lock().set_irte(HIGH, entry).map_err(|e| fail(format!("{e}")))?;
        portcullis_kernel::edu::set_msi(&p.ecam, dev, Some((msi_address(HIGH), 0)));
        let delivered = raise(2000);
        u.lock().set_irte(HIGH, Irte::default()).map_err(|e| fail(format!("{e}")))?;
        ensure!(delivered, "the MSI through entry {:#x} did not arrive", HIGH);
        ensure!(faults(u).is_empty(), "faults while delivering through entry {:#x}", HIGH);
        Ok(())
    })();
    irq::disable();
    portcullis_kernel::edu::set_msi(&p.ecam, dev, None);
    let _ = u.lock().free_irte(handle);
    if !was_on {
        let _ = u.lock().disable_interrupt_remapping();
    }
    faults(u);
    r
}

/// Fault events taken (interrupts from any unit set up by
/// [`enable_fault_interrupt`]).
static FAULT_EVENTS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn fault_event_handler() {
    // Interrupt context: no locks, no allocation. Whoever waits polls the
    // unit, which reads and clears the records and re-arms the event.
    FAULT_EVENTS.fetch_add(1, core::sync::atomic::Ordering::AcqRel);
}

/// Fault events taken so far.
fn fault_events() -> u64 {
    FAULT_EVENTS.load(core::sync::atomic::Ordering::Acquire)
}

/// Makes `unit` signal recorded faults with an interrupt on `vector` to
/// this CPU (the option beside polling). The handler only counts events;
/// the records are read by polling the unit.
fn enable_fault_interrupt(unit: &VtdUnit<KernelHost>, vector: u8) -> Result<(), alloc::string::String> {
    use portcullis_kernel::arch::irq;
    let (address, data) = irq::msi_for(vector).map_err(|e| format!("{e}"))?;
    if let Err(e) = irq::register(vector, fault_event_handler) {
        // The vector may already be ours (an earlier run); a foreign
        // handler is an error.
        if !irq::handler_is(vector, fault_event_handler) {
            return Err(format!("{e}"));
        }
    }
    unit.lock().enable_fault_event(address, data);
    Ok(())
}

/// Masks `unit`'s fault event interrupt again (polling only).
fn disable_fault_interrupt(unit: &VtdUnit<KernelHost>) {
    unit.lock().mask_fault_event();
}

/// x2APIC destinations (`intel-x2apic`: `intel-iommu,intremap=on,eim=on`,
/// the kernel's APIC in x2APIC mode): the unit's table runs with IRTA.EIME
/// set; an edu MSI routed through the passthrough API to the CPU's 32-bit
/// x2APIC id arrives, its table entry holding the id in bits 63:32;
/// retargeted to an id above 255 whose low byte is this CPU's, it no
/// longer arrives (the unit honours all 32 bits rather than an 8-bit
/// field); retargeted back, it arrives again.
pub fn vtd_x2apic_destinations_route_msi(p: &Platform) -> TestResult {
    use portcullis::PassthroughError;
    use portcullis_kernel::arch::irq;
    use portcullis_kernel::host::GuestDma;
    const VECTOR: u8 = 0x2d;
    if p.config != "intel-x2apic" {
        skip!("needs intel-x2apic (intel-iommu,intremap=on,eim=on with the local APIC in x2APIC mode)");
    }
    let u = &unit(p)?;
    ensure!(irq::x2apic(), "the local APIC is not in x2APIC mode");
    ensure!(u.lock().caps().eim(), "the unit has no ECAP.EIM");
    ensure!(u.lock().x2apic_destinations(), "the driver did not enable x2APIC destinations");
    let regs = portcullis_kernel::iommu_probe::vtd(u.lock().base()).map_err(|e| fail(format!("{e:?}")))?;
    ensure!(regs.irta & (1 << 11) != 0, "IRTA.EIME clear: {:#x}", regs.irta);
    ensure!(regs.gsts & (1 << 25) != 0, "GSTS.IRES clear: {:#x}", regs.gsts);
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))?;
    // Same low byte as this CPU's id: an 8-bit reading would deliver it.
    let wide = apic | 0x1_0000;
    let iommus = dma::iommus(p);
    let edu = edus(p).into_iter().next().ok_or_else(|| fail("no edu".into()))?;
    let dev = dma::edu_device(p, &edu)?;
    let (seg, bdf) = (dev.segment, dev.bdf);
    let err = |e: PassthroughError| fail(format!("{e}"));
    let mut guest = GuestDma::new(iommus, 16).map_err(err)?;
    guest.assign(iommus, seg, bdf).map_err(err)?;
    let r = (|| -> TestResult {
        let msi = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
        // The handle the address carries (bits 19:5, bit 15 in bit 2).
        let index = ((msi.address >> 5) & 0x7fff | ((msi.address >> 2) & 1) << 15) as u16;
        let entry = |u: &VtdUnit<KernelHost>| u.lock().irte(index).ok_or_else(|| fail("no table entry".into()));
        let e = entry(u)?;
        ensure!(e.present(), "entry {} not present", index);
        ensure_eq!(e.0[0] >> 32, apic as u64, "IRTE bits 63:32 (x2APIC destination)");
        ensure_eq!(e.vector(), VECTOR, "IRTE vector");
        dma::x2apic_retarget_round_trip(p, &edu, dev, &mut guest, &msi, (VECTOR, apic, wide), || {
            ensure_eq!(entry(u)?.0[0] >> 32, wide as u64, "IRTE bits 63:32 after retargeting");
            Ok(())
        })?;
        guest.free_msi(msi.handle).map_err(err)?;
        ensure!(!u.lock().irte(index).is_some_and(|e| e.present()), "the freed entry is still present");
        Ok(())
    })();
    let unassigned = guest.unassign(seg, bdf).map(|_| ()).map_err(err);
    faults(u);
    r.and(unassigned)
}

/// A PASID of an edu attached to a second domain (PASID 5 where the unit
/// takes 3 bits or more; QEMU 10.0.2 reports ECAP.PSS = 0, one PASID bit,
/// so PASID 1 there, and PASID 2 is refused): the PASID-table entry read
/// back from table memory is that domain's (present, second stage, its
/// domain id, table root and width) and follows a replace to a third
/// domain and back, the PASID-0 entry is untouched, and
/// the edu's DMA, which carries no PASID, lands where the requester id's
/// domain says and nowhere else (the second domain's pages keep their
/// canaries; no fault). Detached, the PASID's entry is clear again. QEMU's
/// edu issues no PASID-tagged DMA, so the PASID's own translation is
/// checked through its entry only.
pub fn vtd_pasid_attach_leaves_the_rid_translation_alone(p: &Platform) -> TestResult {
    use portcullis_iommu::{DeviceOps, DomainError, RequesterRef};
    let b = vtd(p)?;
    let u = unit(p)?;
    let bits = u.lock().max_pasid_log2();
    if bits == 0 {
        skip!("the unit takes no requests with PASID (legacy mode or no ECAP.PASID)");
    }
    if p.config == "intel-sm" {
        ensure_eq!(bits, 1, "PASID bits of QEMU 10.0.2 with x-pasid-mode=on (PSS = 0)");
    }
    let edus = edus(p);
    let edu = edus.first().ok_or_else(|| fail("no edu".into()))?;
    let id = b.device_id(p, edu)?;
    let dev = portcullis::Device::new(b.unit.clone(), RequesterRef { unit: b.index, requester_id: id });
    ensure_eq!(dev.max_pasid_log2(), bits, "the device's PASID width");
    let pasid: u32 = if bits >= 3 { 5 } else { 1 };
    let rid_bufs = Buffers::new()?;
    let pasid_bufs = Buffers::new()?;
    let mut d0 = b.new_domain().map_err(fail)?;
    let mut d1 = b.new_domain().map_err(fail)?;
    for (d, bufs) in [(&mut d0, &rid_bufs), (&mut d1, &pasid_bufs)] {
        d.map(X, bufs.a(), 4096, Prot::READ).map_err(|e| fail(format!("map X: {e}")))?;
        d.map(Y, bufs.b(), 4096, Prot::RW).map_err(|e| fail(format!("map Y: {e}")))?;
    }
    b.attach(&d0, id).map_err(fail)?;
    let r = (|| -> TestResult {
        let rid_entry = u.lock().pasid_entry(id, 0);
        ensure!(rid_entry.is_some_and(|e| e.present()), "PASID-0 entry after the attach");
        ensure_eq!(
            d1.attach_device_pasid(dev.handle(), 1 << bits),
            Err(DomainError::Incompatible),
            "a PASID beyond the unit's width"
        );
        d1.attach_device_pasid(dev.handle(), pasid).map_err(|e| fail(format!("attach PASID {pasid}: {e}")))?;
        let attached = (|| -> TestResult {
            let table = u.lock().pasid_table(id, pasid).ok_or_else(|| fail("no PASID table".into()))?;
            // The entry's eight words, straight from the table memory the
            // unit walks (decoded here, not by the driver).
            let first = (pasid as usize & 0x3f) * 8;
            let w: Vec<u64> = {
                use io_pgtable::TableMemory;
                let unit = u.lock();
                (0..8).map(|k| unit.memory().read(table, first + k)).collect()
            };
            let t = d1.table_info();
            ensure_eq!(w[0] & 1, 1, "P");
            ensure_eq!(w[0] >> 6 & 7, 2, "PGTT (second stage)");
            ensure_eq!(w[0] >> 2 & 7, t.levels as u64 - 2, "AW");
            ensure_eq!(w[0] & 0x000f_ffff_ffff_f000, t.root, "second-stage table pointer");
            ensure_eq!(w[1] & 0xffff, d1.domain_id() as u64, "domain id");
            ensure!(w[2..].iter().all(|&x| x == 0), "words 2-7 not zero: {:x?}", w);
            let e = u.lock().scalable_entry(id).ok_or_else(|| fail("no scalable-mode entries".into()))?;
            ensure!(e.context.paside(), "context entry without PASIDE");
            ensure_eq!(u.lock().pasid_entry(id, 0), rid_entry, "PASID-0 entry after the PASID attach");
            ensure_eq!(u.lock().attached_domain(id), Some(d0.domain_id()), "the requester id's domain");
            // Replace: the PASID moves to a third domain and back (QEMU runs
            // the PASID-cache and IOTLB invalidations of each old entry).
            let mut d2 = b.new_domain().map_err(fail)?;
            d2.attach_device_pasid(dev.handle(), pasid).map_err(|e| fail(format!("replace: {e}")))?;
            let moved = u.lock().pasid_entry(id, pasid);
            let back = d1.attach_device_pasid(dev.handle(), pasid);
            if back.is_err() {
                // Best effort before `d2` goes away; the error reported is
                // the failed move back.
                let _ = d2.detach_device_pasid(dev.handle(), pasid);
            }
            back.map_err(|e| fail(format!("replace back: {e}")))?;
            ensure!(
                moved.is_some_and(|e| e.present() && e.did() == d2.domain_id() && e.ss_root() == d2.table_info().root),
                "entry after the replace: {:?}",
                moved
            );
            let again = u.lock().pasid_entry(id, pasid);
            ensure!(again.is_some_and(|e| e.did() == d1.domain_id()), "entry after the replace back: {:?}", again);
            ensure_eq!(u.lock().pasid_entry(id, 0), rid_entry, "PASID-0 entry after the replaces");
            // Untagged DMA: through the requester id's domain only.
            edu.read_from(X, 4096).map_err(|_| fail("DMA read from X timed out".into()))?;
            edu.write_to(Y, 4096).map_err(|_| fail("DMA write to Y timed out".into()))?;
            let bad = rid_bufs.page(2).iter().enumerate().position(|(i, &x)| x != Buffers::pattern(i));
            ensure!(bad.is_none(), "the requester id's page B differs from the pattern at {:?}", bad);
            rid_bufs.check_untouched()?;
            ensure!(pasid_bufs.page(2).iter().all(|&x| x == CANARY), "the PASID domain's page B was written");
            pasid_bufs.check_untouched()?;
            let f = b.faults().unwrap_or_default();
            ensure!(f.is_empty(), "unexpected faults: {:?}", f);
            Ok(())
        })();
        let detached = d1.detach_device_pasid(dev.handle(), pasid);
        attached?;
        detached.map_err(|e| fail(format!("detach PASID {pasid}: {e}")))?;
        ensure!(!u.lock().pasid_entry(id, pasid).is_some_and(|e| e.present()), "PASID entry after the detach");
        ensure_eq!(u.lock().pasid_entry(id, 0), rid_entry, "PASID-0 entry after the PASID detach");
        Ok(())
    })();
    b.detach(&d0, id).map_err(fail)?;
    r
}
