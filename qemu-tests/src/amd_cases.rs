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
/// vector the entry names; unrouted, it is blocked again (the routing half
/// on `amd-ir`, where QEMU's unit remaps interrupts).
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
        let direct = (0xfee0_0000 | (apic as u64) << 12, VECTOR as u32);
        ensure!(portcullis_kernel::edu::set_msi(&p.ecam, dev, Some(direct)), "the edu has no MSI capability");
        ensure!(!raise(200), "an unrouted MSI reached the CPU");
        if p.config != "amd-ir" {
            // Without `intremap=on` QEMU's unit drops every MSI of an
            // IV = 1 entry: blocking is all there is to see here.
            return Ok(());
        }
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
