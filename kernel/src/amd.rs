//! The kernel's side of the AMD-Vi driver: units brought up from the IVRS,
//! AMD v1 paging domains on them, and the devices iommufd binds.
//!
//! Register access and table memory are the VT-d ones ([`KernelMmio`],
//! [`FrameTables`]); the only `unsafe` is there. What differs from VT-d:
//! the device table, command buffer and event log need physically
//! contiguous memory, a device is named by its device id (its requester
//! id, after bridge and IVRS aliasing), and QEMU records no events, so
//! callers detect blocked DMA by its effect on memory.

use crate::iommu::{FrameTables, KernelClock, KernelMmio, MSI_WINDOW, identity_map_then};
use crate::mem::{alloc_frames, free_frames};
use alloc::string::String;
use alloc::sync::Arc;
use io_pgtable::{AmdV1, Invalidator, PagingDomain};
use portcullis_iommu::IommuDomain;
use spin::Mutex;

impl amdvi::ContiguousMemory for FrameTables {
    fn alloc_contiguous(&mut self, pages: usize) -> Option<u64> {
        // Naturally aligned up to 2 MiB: the device table's base needs
        // only 4 KiB, but an aligned run never straddles a large page.
        let align = (pages.next_power_of_two() as u64 * 4096).min(2 << 20);
        alloc_frames(pages, align).ok()
    }
    fn free_contiguous(&mut self, base: u64, pages: usize) {
        let _ = free_frames(base, pages);
    }
}

/// An AMD-Vi unit as the kernel runs it.
pub type AmdUnit = amdvi::Unit<KernelMmio, FrameTables, KernelClock>;

/// A shared unit (domains invalidate through it).
pub type SharedAmdUnit = Arc<Mutex<AmdUnit>>;

/// What the IVRS and PCI say about a unit, for bring-up.
#[derive(Debug, Clone)]
pub struct AmdUnitInfo {
    /// MMIO base.
    pub base: u64,
    /// Ranges to identity-map for the devices they name (IVMD).
    pub unity: alloc::vec::Vec<amdvi::UnityRange>,
    /// Highest device id the unit covers.
    pub last_device_id: u16,
    /// IVHD flags bit 5: the unit's table walks snoop CPU caches.
    pub coherent: bool,
    /// The unit's PCI capability header and Miscellaneous Information
    /// register 0, when read.
    pub pci_capability: Option<(u32, u32)>,
}

/// The ranges the IVRS's IVMD blocks require identity-mapped.
pub fn unity_ranges(ivrs: &acpi_tables::ivrs::Ivrs) -> alloc::vec::Vec<amdvi::UnityRange> {
    ivrs.ivmds()
        .filter_map(|m| amdvi::UnityRange::from_ivmd(m.kind, m.flags, m.device_id, m.aux_data, m.start, m.length))
        .collect()
}

/// Brings up the AMD-Vi unit `info` describes: every device it covers
/// blocked, command buffer and event log running, translation on.
pub fn amd_unit(name: String, info: AmdUnitInfo) -> Result<SharedAmdUnit, String> {
    let mmio = KernelMmio::map(info.base, amdvi::regs::BLOCK).map_err(|e| alloc::format!("{name}: {e}"))?;
    let mut unit = amdvi::Unit::new(name, mmio, FrameTables::new(info.coherent), KernelClock, info.last_device_id);
    unit.set_coherent(info.coherent);
    if let Some((header, misc)) = info.pci_capability {
        unit.set_pci_capability(header, misc);
    }
    unit.set_unity_ranges(info.unity);
    unit.enable().map_err(|e| alloc::format!("{e}"))?;
    Ok(Arc::new(Mutex::new(unit)))
}

/// IOTLB invalidation of one AMD-Vi domain through its unit.
pub struct AmdInvalidator {
    unit: SharedAmdUnit,
    domain_id: u16,
    /// The unit caches not-present entries (PCI capability NpCache): a
    /// map must then be invalidated too.
    np_cache: bool,
    /// The last invalidation error (an invalidator cannot return one).
    pub error: Option<String>,
}

impl core::fmt::Debug for AmdInvalidator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AmdInvalidator(domain {})", self.domain_id)
    }
}

impl Invalidator for AmdInvalidator {
    fn invalidate(&mut self, start: u64, last: u64, _tables_freed: bool) -> Result<(), portcullis_iommu::DomainError> {
        // INVALIDATE_IOMMU_PAGES always drops the page-directory entries
        // the range covers (PDE = 1), freed tables included.
        self.unit.lock().invalidate_range(self.domain_id, start, last).map_err(|e| {
            self.error = Some(alloc::format!("{e}"));
            portcullis_iommu::DomainError::Hardware {
                unit: 0,
                cause: portcullis_iommu::HwError::Timeout { register: "invalidation", waited_ns: 0 },
            }
        })
    }
    fn mapped(&mut self, iova: u64, last: u64) -> Result<(), portcullis_iommu::DomainError> {
        if self.np_cache {
            return self.invalidate(iova, last, false);
        }
        Ok(())
    }
}

/// An AMD v1 paging domain on one unit.
pub struct AmdDomain {
    /// The page table and its invalidator.
    pub domain: PagingDomain<AmdV1, FrameTables, AmdInvalidator>,
    /// Its domain id on the unit.
    pub domain_id: u16,
    unit: SharedAmdUnit,
}

impl core::fmt::Debug for AmdDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AmdDomain(id {}, {:?})", self.domain_id, self.domain.table())
    }
}

impl AmdDomain {
    /// An empty domain for `unit`: as many levels as 48 bits of IOVA need
    /// (within EFR.HATS), 2 MiB and 1 GiB pages.
    pub fn new(unit: &SharedAmdUnit) -> Result<Self, String> {
        let (caps, coherent, id) = {
            let mut u = unit.lock();
            let id = u.alloc_domain_id().map_err(|e| alloc::format!("{e}"))?;
            (u.caps(), !u.flushes(), id)
        };
        let domain = AmdV1::from_caps(caps.efr, 48)
            .ok_or_else(|| String::from("EFR.HATS: the unit has no host translation"))
            .and_then(|format| {
                let inv = AmdInvalidator { unit: unit.clone(), domain_id: id, np_cache: caps.np_cache(), error: None };
                PagingDomain::new(format, FrameTables::new(coherent), inv).map_err(|e| alloc::format!("{e:?}"))
            });
        match domain {
            Ok(domain) => Ok(Self { domain, domain_id: id, unit: unit.clone() }),
            Err(e) => {
                unit.lock().free_domain_id(id);
                Err(e)
            }
        }
    }

    /// Points device `device_id` at this domain.
    pub fn attach(&self, device_id: u16) -> Result<(), String> {
        let t = self.domain.table();
        let levels = io_pgtable::PtFormat::levels(t.format());
        self.unit.lock().attach(device_id, t.root(), levels, self.domain_id).map_err(|e| alloc::format!("{e}"))
    }

    /// Blocks device `device_id` again.
    pub fn detach(&self, device_id: u16) -> Result<(), String> {
        self.unit.lock().detach(device_id).map_err(|e| alloc::format!("{e}"))
    }

    /// Size of the page mapping `iova` (the walk), if mapped.
    pub fn page_size(&self, iova: u64) -> Option<u64> {
        self.domain.table().page_size(iova)
    }

    /// The last invalidation error, if any.
    pub fn invalidator_error(&self) -> Option<String> {
        self.domain.invalidator().error.clone()
    }
}

impl Drop for AmdDomain {
    /// The domain id is reused later: nothing of this domain may stay
    /// cached under it.
    fn drop(&mut self) {
        let mut u = self.unit.lock();
        let _ = u.invalidate_range(self.domain_id, 0, u64::MAX);
        u.free_domain_id(self.domain_id);
    }
}

/// A device behind an AMD-Vi unit, as iommufd binds it.
pub struct AmdDevice {
    unit: SharedAmdUnit,
    unit_index: u16,
    device_id: u16,
}

impl core::fmt::Debug for AmdDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AmdDevice(unit {}, device id {:#x})", self.unit_index, self.device_id)
    }
}

impl AmdDevice {
    /// The device with device id `device_id` behind unit `unit_index`.
    pub fn new(unit: SharedAmdUnit, unit_index: u16, device_id: u16) -> Self {
        Self { unit, unit_index, device_id }
    }
}

/// Device handles of AMD-Vi devices carry this bit, so a handle can never
/// be taken for a VT-d one (both encode unit and requester id).
const AMD_HANDLE: u64 = 1 << 40;

impl iommufd::ctx::DeviceOps for AmdDevice {
    fn handle(&self) -> portcullis_iommu::DeviceHandle {
        portcullis_iommu::DeviceHandle(AMD_HANDLE | (self.unit_index as u64) << 16 | self.device_id as u64)
    }
    fn alloc_domain(
        &self,
    ) -> Result<alloc::boxed::Box<dyn portcullis_iommu::IommuDomain>, portcullis_iommu::DomainError> {
        let inner = AmdDomain::new(&self.unit).map_err(|_| portcullis_iommu::DomainError::NoMemory)?;
        Ok(alloc::boxed::Box::new(AmdIommuDomain { inner, unit_index: self.unit_index }))
    }
    fn reserved_regions(&self) -> alloc::vec::Vec<(u64, u64)> {
        // The interrupt window, and the device's unity ranges (mapped
        // one-to-one by the domain on attach, so the IOAS must not use them).
        let mut r = alloc::vec![MSI_WINDOW];
        r.extend(self.unit.lock().unity_for(self.device_id).into_iter().map(|u| (u.start, u.last)));
        r
    }
}

/// An [`AmdDomain`] behind the `IommuDomain` trait, programming device
/// table entries on attach.
pub struct AmdIommuDomain {
    inner: AmdDomain,
    unit_index: u16,
}

impl core::fmt::Debug for AmdIommuDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AmdIommuDomain(unit {}, {:?})", self.unit_index, self.inner)
    }
}

impl AmdIommuDomain {
    /// The AMD-Vi domain inside.
    pub fn amd(&self) -> &AmdDomain {
        &self.inner
    }
}

impl IommuDomain for AmdIommuDomain {
    portcullis_iommu::forward_paging!(inner.domain);

    fn attach_device(&mut self, device: portcullis_iommu::DeviceHandle) -> Result<(), portcullis_iommu::DomainError> {
        if device.0 & AMD_HANDLE == 0 || (device.0 >> 16) as u16 != self.unit_index {
            return Err(portcullis_iommu::DomainError::Incompatible);
        }
        let id = device.0 as u16;
        // Unity ranges: identity-mapped before the device translates
        // through the domain (firmware's DMA there must keep working).
        let unity: alloc::vec::Vec<_> = self
            .inner
            .unit
            .lock()
            .unity_for(id)
            .into_iter()
            .filter_map(|u| {
                // A range with neither permission stays reserved, unmapped.
                let prot = match (u.read, u.write) {
                    (true, true) => portcullis_iommu::Prot::RW,
                    (false, true) => portcullis_iommu::Prot::WRITE,
                    (true, false) => portcullis_iommu::Prot::READ,
                    (false, false) => return None,
                };
                Some((u.start, u.last, prot))
            })
            .collect();
        identity_map_then(
            self,
            |s| &mut s.inner.domain,
            &unity,
            |s| {
                s.inner.attach(id).map_err(|_| portcullis_iommu::DomainError::Incompatible)?;
                s.inner.domain.attach_device(device)
            },
        )
    }
    fn detach_device(&mut self, device: portcullis_iommu::DeviceHandle) {
        let _ = self.inner.detach(device.0 as u16);
        self.inner.domain.detach_device(device);
    }
}

/// Every AMD-Vi unit of the platform brought up (translation on, every
/// device blocked), with who owns which device.
pub struct AmdSystem {
    /// One entry per IOMMU (the newest IVHD type describing it): the
    /// IVRS's view and the unit or why not.
    pub units: alloc::vec::Vec<(crate::ownership::IvrsUnit, Result<SharedAmdUnit, String>)>,
    /// Device ownership from the IVRS ranges and PCI topology.
    pub owners: alloc::collections::BTreeMap<(u16, crate::pci::Bdf), crate::ownership::Assignment>,
}

impl core::fmt::Debug for AmdSystem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AmdSystem({} units, {} devices)", self.units.len(), self.owners.len())
    }
}

impl AmdSystem {
    /// Brings up every IOMMU of `p`'s IVRS (none without one).
    pub fn bring_up(p: &crate::Platform) -> Option<Self> {
        let Some(Ok(ivrs)) = &p.ivrs else { return None };
        let (scopes, errors) = crate::ownership::ivrs_units(ivrs);
        for e in errors {
            log::error!("IVRS: {e}");
        }
        let owners = crate::ownership::assign_ivrs(&scopes, &p.pci);
        let units = scopes
            .into_iter()
            .map(|s| {
                let info = unit_info(p, ivrs, &s);
                let name = alloc::format!("IVHD @{:#x}", s.base);
                let unit = amd_unit(name, info);
                (s, unit)
            })
            .collect();
        Some(Self { units, owners })
    }
}

/// Bring-up facts for the unit `s` from its IVHD and its PCI function.
pub fn unit_info(p: &crate::Platform, ivrs: &acpi_tables::ivrs::Ivrs, s: &crate::ownership::IvrsUnit) -> AmdUnitInfo {
    use crate::pci::ConfigAccess;
    let ivhd = ivrs.ivhds().filter(|h| h.segment == s.segment && h.base_address == s.base).max_by_key(|h| h.kind);
    let coherent = ivhd.is_some_and(|h| h.flags & (1 << 5) != 0);
    let pci_capability = ivhd.and_then(|h| {
        let bdf = crate::pci::Bdf::from_rid(h.device_id);
        p.pci.iter().find(|d| d.segment == h.segment && d.bdf == bdf)?;
        let off = h.capability_offset;
        Some((p.ecam.read32(h.segment, bdf, off), p.ecam.read32(h.segment, bdf, off + 0x10)))
    });
    // The table covers every id, not just the IVRS ranges: QEMU does not
    // bound a lookup by the table's Size field, so an id beyond a smaller
    // table would read its entry from whatever memory follows (Linux also
    // always uses the full 2 MiB table).
    AmdUnitInfo { base: s.base, unity: unity_ranges(ivrs), last_device_id: 0xffff, coherent, pci_capability }
}
