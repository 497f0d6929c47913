//! In-guest AMD-Vi tests with the edu device: the common DMA cases
//! (`dma_cases`) on an AMD v1 domain, and what is particular to AMD-Vi
//! (device table entries, ownership from the IVRS). QEMU's AMD-Vi records
//! no events, so blocking is proven by memory alone.

use crate::dma_cases::{self as dma, Backend, UnitBackend, edus, fail};
use alloc::format;
use alloc::sync::Arc;
use portcullis::drivers::amdvi;
use portcullis::{AmdUnit, Driver, Vendor};
use portcullis_kernel::host::KernelHost;
use portcullis_kernel::ktest::{Outcome, TestResult};
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

/// The AMD-Vi unit (brought up once per boot with the others, see
/// `dma_cases::iommus`) as the common cases drive it.
fn amd(p: &Platform) -> Result<UnitBackend, Outcome> {
    if !p.config.starts_with("amd") {
        skip!("needs an AMD IOMMU configuration");
    }
    UnitBackend::first(p, Vendor::AmdVi)
}

/// The same unit as the AMD-Vi driver's own type.
fn unit(b: &UnitBackend) -> Result<Arc<AmdUnit<KernelHost>>, Outcome> {
    match &b.driver {
        Driver::Amd(u) => Ok(u.clone()),
        Driver::Vtd(_) => Err(fail("the first AMD-Vi unit is not an AMD-Vi unit".into())),
    }
}

dma::dma_cases_for!(amd;
    amd_mapped_dma_lands_exactly => mapped_dma_lands_exactly,
    amd_unmapped_iova_is_blocked => unmapped_iova_is_blocked,
    amd_read_only_mapping_blocks_writes => read_only_mapping_blocks_writes,
    amd_unmap_then_remap => unmap_then_remap,
    amd_unattached_device_is_blocked => unattached_device_is_blocked,
    amd_bridge_alias_isolated_and_translated => bridge_alias_isolated_and_translated,
    amd_domains_isolate_and_share => domains_isolate_and_share,
    amd_large_pages_are_used_and_split => large_pages_are_used_and_split,
    amd_high_iovas_up_to_the_aperture => high_iovas_up_to_the_aperture,
    amd_iommufd_passthrough_dma => iommufd_passthrough_dma,
    amd_unity_range_identity_mapped_and_reserved => firmware_ranges_identity_mapped_and_reserved,
);

/// Every edu is covered by the IVRS under the id its DMA carries, and an
/// attach writes exactly the translated entry (V, TV, Mode = levels, the
/// table root, IR/IW, the domain id); a detach puts the blocked entry back.
pub fn amd_device_table_entries_match_ownership(p: &Platform) -> TestResult {
    let b = amd(p)?;
    let u = unit(&b)?;
    let all = edus(p);
    ensure!(all.len() >= 3, "expected three edus, found {}", all.len());
    for e in all.iter().filter(|e| e.sid >> 8 == 0) {
        let id = b.device_id(p, e)?;
        let dte = u.lock().dte(id).ok_or_else(|| fail(format!("no entry for {id:#x}")))?;
        ensure_eq!(dte, amdvi::DeviceTableEntry::blocked(), "entry of unattached device {:#x}", id);
    }
    let e = &all[0];
    let id = b.device_id(p, e)?;
    let d = b.new_domain().map_err(fail)?;
    b.attach(&d, id).map_err(fail)?;
    let r = (|| {
        let t = d.table_info();
        ensure_eq!(t.format, "AMD v1", "table format");
        let want = amdvi::DeviceTableEntry::translated(t.root, t.levels, d.domain_id())
            .ok_or_else(|| fail("no encodable entry".into()))?;
        ensure_eq!(u.lock().dte(id), Some(want), "translated entry");
        ensure_eq!(b.attached(id), Some(d.domain_id()), "attached domain");
        Ok(())
    })();
    b.detach(&d, id).map_err(fail)?;
    ensure_eq!(u.lock().dte(id), Some(amdvi::DeviceTableEntry::blocked()), "entry after detach");
    r
}

/// Interrupts are isolated too: every device entry has IV = 1, so an edu
/// MSI is aborted until its device gets a route; routed, it arrives on the
/// vector the entry names; unrouted, it is blocked again (on every AMD
/// configuration: QEMU 10.0.2 remaps device MSIs through the entry's table
/// with or without `intremap=on`).
pub fn amd_interrupts_blocked_until_routed(p: &Platform) -> TestResult {
    use portcullis_kernel::arch::irq;
    const VECTOR: u8 = 0x2b;
    let b = amd(p)?;
    let u = unit(&b)?;
    let edu = edus(p).into_iter().next().ok_or_else(|| fail("no edu".into()))?;
    let id = b.device_id(p, &edu)?;
    let dev = dma::edu_device(p, &edu)?;
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))?;
    let raise = |wait_ms: u64| dma::raise_and_wait(&edu, VECTOR, wait_ms);
    irq::enable();
    let r = (|| -> TestResult {
        // An ordinary MSI straight at the vector: aborted (IntCtl = 00b).
        let direct = irq::msi_for(VECTOR).map_err(|e| fail(format!("{e}")))?;
        ensure!(portcullis_kernel::edu::set_msi(&p.ecam, dev, Some(direct)), "the edu has no MSI capability");
        ensure!(!raise(200), "an unrouted MSI reached the CPU");
        let index = u.lock().route_interrupt(id, VECTOR, apic).map_err(|e| fail(format!("{e}")))?;
        portcullis_kernel::edu::set_msi(&p.ecam, dev, Some(amdvi::irte::msi_message(index)));
        ensure!(raise(2000), "the routed MSI did not arrive on vector {:#x}", VECTOR);
        u.lock().unroute_interrupt(id, index).map_err(|e| fail(format!("{e}")))?;
        ensure!(!raise(200), "an MSI arrived after its route was removed");
        Ok(())
    })();
    irq::disable();
    portcullis_kernel::edu::set_msi(&p.ecam, dev, None);
    let _ = u.lock().release_interrupts(id);
    r
}

/// x2APIC destinations on AMD-Vi (`amd-x2apic`:
/// `amd-iommu,pt=off,intremap=on,xtsup=on`, the kernel's APIC in x2APIC
/// mode): the unit runs with Control.GAEn and XTEn, routes are 128-bit
/// entries; an edu MSI routed through the passthrough API to the CPU's
/// 32-bit id arrives; retargeted to an id above 255 whose low byte is this
/// CPU's, it no longer arrives (QEMU reads destination bits 31:8 too);
/// retargeted back, it arrives again.
pub fn amd_x2apic_destinations_route_msi(p: &Platform) -> TestResult {
    use portcullis::PassthroughError;
    use portcullis_kernel::arch::irq;
    use portcullis_kernel::host::GuestDma;
    const VECTOR: u8 = 0x2e;
    if p.config != "amd-x2apic" {
        skip!("needs amd-x2apic (amd-iommu,intremap=on,xtsup=on with the local APIC in x2APIC mode)");
    }
    let b = amd(p)?;
    let u = unit(&b)?;
    ensure!(irq::x2apic(), "the local APIC is not in x2APIC mode");
    let caps = u.lock().caps();
    ensure!(caps.x2apic() && caps.guest_apic(), "EFR without XTSup and GASup: {:#x}", caps.efr);
    ensure!(u.lock().x2apic_interrupts(), "the driver did not turn x2APIC destinations on");
    let r = portcullis_kernel::iommu_probe::amd(u.lock().base()).map_err(|e| fail(format!("{e}")))?;
    let want = amdvi::regs::Control::GA_EN | amdvi::regs::Control::XT_EN;
    ensure!(r.control().contains(want), "Control {:#x} lacks GAEn and XTEn", r.control);
    let apic = irq::apic_id().ok_or_else(|| fail("no local APIC".into()))?;
    // Same low byte as this CPU's id: an 8-bit reading would deliver it.
    let wide = apic | 0x1_0000;
    let iommus = dma::iommus(p);
    let edu = edus(p).into_iter().next().ok_or_else(|| fail("no edu".into()))?;
    let id = b.device_id(p, &edu)?;
    let dev = dma::edu_device(p, &edu)?;
    let (seg, bdf) = (dev.segment, dev.bdf);
    let err = |e: PassthroughError| fail(format!("{e}"));
    let mut guest = GuestDma::new(iommus, 16).map_err(err)?;
    guest.assign(iommus, seg, bdf).map_err(err)?;
    let result = (|| -> TestResult {
        let msi = guest.route_msi(seg, bdf, VECTOR, apic).map_err(err)?;
        // The entry index is the MSI data (bits 10:0).
        let index = (msi.data & 0x7ff) as u16;
        let entry = || u.lock().irte_ga(id, index).ok_or_else(|| fail("no 128-bit table entry".into()));
        let e = entry()?;
        ensure!(e.enabled(), "entry {} not enabled", index);
        ensure_eq!((e.vector(), e.destination()), (VECTOR, apic), "128-bit entry vector and destination");
        ensure_eq!(u.lock().irte(id, index), None, "a 32-bit entry with x2APIC destinations");
        dma::x2apic_retarget_round_trip(p, &edu, dev, &mut guest, &msi, (VECTOR, apic, wide), || {
            let e = entry()?;
            ensure_eq!(e.destination(), wide, "destination after retargeting");
            ensure_eq!(e.0[0] >> 8 & 0xff_ffff, (wide & 0xff_ffff) as u64, "destination bits 23:0 in bits 31:8");
            Ok(())
        })?;
        guest.free_msi(msi.handle).map_err(err)?;
        ensure!(!u.lock().irte_ga(id, index).is_some_and(|e| e.enabled()), "the freed entry is still enabled");
        Ok(())
    })();
    let unassigned = guest.unassign(seg, bdf).map(|_| ()).map_err(err);
    result.and(unassigned)
}
