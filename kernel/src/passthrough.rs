//! Device passthrough for a hypervisor: the embedding API.
//!
//! A VMM that owns the machine brings every IOMMU up once ([`Iommus`]),
//! then gives each guest a [`GuestDma`]: the guest's RAM mapped at
//! IOVA = guest physical address in one iommufd IOAS, and the devices it
//! is given attached to it. A device's DMA then reaches exactly the guest's
//! memory, translated, and nothing else; a device the guest does not own
//! stays blocked.
//!
//! ```text
//! let iommus = Iommus::bring_up(&platform);
//! let mut guest = GuestDma::new(pin_limit_pages);
//! guest.add_memory(0, host_base, 512 << 20, true)?;   // GPA 0.. -> host frames
//! guest.assign(&iommus, 0, Bdf { bus: 0, device: 3, function: 0 })?;
//! // ... the guest programs the device with guest-physical addresses ...
//! guest.unassign(0, bdf)?;                               // blocked again
//! ```
//!
//! Everything below is iommufd's object model (`iommufd::ctx::Ictx`): a
//! VMM that wants more (several IOAS, accesses for emulated devices, the
//! uAPI) uses [`GuestDma::ictx`] directly.

use crate::amd::{AmdDevice, AmdSystem};
use crate::iommu::{UnitMode, VtdDevice, VtdSystem};
use crate::mem::DirectMap;
use crate::pci::Bdf;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::memsrc::{MemorySource, RegionMemory};

/// Why a passthrough request failed. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassthroughError {
    /// No IOMMU unit translates the function: its DMA could reach all of
    /// memory, so it must not be given to a guest.
    NotIsolated(u16, Bdf),
    /// The unit that covers the function did not come up.
    UnitDown(u16, Bdf, String),
    /// The function is already assigned to this guest.
    AlreadyAssigned(u16, Bdf),
    /// The function is not assigned to this guest.
    NotAssigned(u16, Bdf),
    /// The function's unit does not remap interrupts: the device could
    /// raise any interrupt on the host by writing the interrupt window.
    /// [`GuestDma::allow_unsafe_interrupts`] accepts that risk.
    UnsafeInterrupts(u16, Bdf),
    /// Routing an interrupt failed (no remapping, table full, ...).
    Interrupt(u16, Bdf, String),
    /// iommufd refused (the errno it gave, and what was being done).
    Iommufd(&'static str, iommufd::Errno),
}

impl core::fmt::Display for PassthroughError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotIsolated(s, b) => write!(f, "{s:04x}:{b} is behind no IOMMU: its DMA cannot be isolated"),
            Self::UnitDown(s, b, e) => write!(f, "{s:04x}:{b}: its IOMMU unit is not running: {e}"),
            Self::AlreadyAssigned(s, b) => write!(f, "{s:04x}:{b} is already assigned"),
            Self::NotAssigned(s, b) => write!(f, "{s:04x}:{b} is not assigned"),
            Self::UnsafeInterrupts(s, b) => {
                write!(f, "{s:04x}:{b}: its IOMMU does not remap interrupts, so the device could inject any interrupt")
            }
            Self::Interrupt(s, b, e) => write!(f, "{s:04x}:{b}: interrupt routing: {e}"),
            Self::Iommufd(what, e) => write!(f, "{what}: {e:?}"),
        }
    }
}

/// Every IOMMU of the platform, brought up with every device blocked.
pub struct Iommus {
    /// The VT-d units (a DMAR was present).
    pub vtd: Option<VtdSystem>,
    /// The AMD-Vi units (an IVRS was present).
    pub amd: Option<AmdSystem>,
}

impl core::fmt::Debug for Iommus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Iommus({:?}, {:?})", self.vtd, self.amd)
    }
}

impl Iommus {
    /// Brings up every unit the firmware describes, each VT-d unit in the
    /// best mode it offers.
    pub fn bring_up(p: &crate::Platform) -> Self {
        Self::bring_up_in(p, None)
    }

    /// As [`Self::bring_up`], VT-d units in `vtd_mode` when given.
    pub fn bring_up_in(p: &crate::Platform, vtd_mode: Option<UnitMode>) -> Self {
        Self { vtd: VtdSystem::bring_up_in(p, vtd_mode), amd: AmdSystem::bring_up(p) }
    }

    /// The function `segment:bdf` as iommufd binds it: its unit and the
    /// requester (device) id its DMA carries.
    pub fn device(&self, segment: u16, bdf: Bdf) -> Result<Arc<dyn DeviceOps>, PassthroughError> {
        Ok(match self.locate(segment, bdf)? {
            Located::Vtd(u, index, rid) => Arc::new(VtdDevice::new(u, index, rid)),
            Located::Amd(u, index, id) => Arc::new(AmdDevice::new(u, index, id)),
        })
    }

    /// The running unit that translates `segment:bdf`, its index and the
    /// requester (device) id the function's DMA carries.
    fn locate(&self, segment: u16, bdf: Bdf) -> Result<Located, PassthroughError> {
        let down = |e: &String| PassthroughError::UnitDown(segment, bdf, e.clone());
        if let Some(v) = &self.vtd
            && let Some(a) = v.owners.get(&(segment, bdf))
        {
            let u = v.units[a.unit].1.as_ref().map_err(down)?;
            return Ok(Located::Vtd(u.clone(), a.unit as u16, a.requester_id));
        }
        if let Some(m) = &self.amd
            && let Some(a) = m.owners.get(&(segment, bdf))
        {
            let u = m.units[a.unit].1.as_ref().map_err(down)?;
            return Ok(Located::Amd(u.clone(), a.unit as u16, a.requester_id));
        }
        Err(PassthroughError::NotIsolated(segment, bdf))
    }

    /// The VT-d unit and requester id of `segment:bdf`, when a running
    /// VT-d unit translates it.
    fn vtd_unit(&self, segment: u16, bdf: Bdf) -> Option<(crate::iommu::SharedUnit, u16)> {
        match self.locate(segment, bdf) {
            Ok(Located::Vtd(u, _, rid)) => Some((u, rid)),
            _ => None,
        }
    }

    /// The AMD-Vi unit and device id of `segment:bdf`, when a running
    /// AMD-Vi unit translates it.
    fn amd_unit(&self, segment: u16, bdf: Bdf) -> Option<(crate::amd::SharedAmdUnit, u16)> {
        match self.locate(segment, bdf) {
            Ok(Located::Amd(u, _, id)) => Some((u, id)),
            _ => None,
        }
    }

    /// The domain id `segment:bdf` is attached to on its unit (`None`:
    /// blocked, or no running unit translates it).
    pub fn attached_domain(&self, segment: u16, bdf: Bdf) -> Option<u16> {
        match self.locate(segment, bdf).ok()? {
            Located::Vtd(u, _, rid) => u.lock().attached_domain(rid),
            Located::Amd(u, _, id) => u.lock().attached_domain(id),
        }
    }

    /// Whether the function's MSIs are remapped (so it can raise only the
    /// interrupts it is given): VT-d with interrupt remapping on, or
    /// AMD-Vi (whose device table entries always control interrupts).
    pub fn interrupts_isolated(&self, segment: u16, bdf: Bdf) -> bool {
        self.vtd_unit(segment, bdf).is_some_and(|(u, _)| u.lock().interrupt_remapping_on())
            || self.amd_unit(segment, bdf).is_some()
    }
}

/// Where a function's DMA is translated.
enum Located {
    /// A VT-d unit: (unit, unit index, requester id).
    Vtd(crate::iommu::SharedUnit, u16, u16),
    /// An AMD-Vi unit: (unit, unit index, device id).
    Amd(crate::amd::SharedAmdUnit, u16, u16),
}

/// One guest's DMA view: its memory at IOVA = guest physical address, and
/// the devices assigned to it.
pub struct GuestDma {
    memory: Arc<RegionMemory<DirectMap>>,
    ictx: Ictx,
    ioas: u32,
    devices: BTreeMap<(u16, Bdf), u32>,
    /// Interrupt routes made for assigned devices.
    routes: alloc::vec::Vec<(u16, Bdf, Route)>,
    allow_unsafe_interrupts: bool,
}

/// One routed MSI: where its remapping entry lives.
enum Route {
    /// VT-d: an entry of the unit's table.
    Vtd(crate::iommu::SharedUnit, u16),
    /// AMD-Vi: an entry of the device's own table.
    Amd(crate::amd::SharedAmdUnit, u16, u16),
}

impl Route {
    fn remove(self) {
        match self {
            Self::Vtd(unit, index) => {
                let _ = unit.lock().free_irte(index);
            }
            Self::Amd(unit, device_id, index) => {
                let _ = unit.lock().unroute_interrupt(device_id, index);
            }
        }
    }
}

impl Drop for GuestDma {
    fn drop(&mut self) {
        // The devices are detached by the iommufd context going away; the
        // interrupt routes are the guest's too.
        for (_, _, route) in self.routes.drain(..) {
            route.remove();
        }
    }
}

impl core::fmt::Debug for GuestDma {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "GuestDma(IOAS {}, {} device(s), {:?})", self.ioas, self.devices.len(), self.memory)
    }
}

impl GuestDma {
    /// An empty guest view that may pin at most `pin_limit_pages` pages.
    pub fn new(pin_limit_pages: u64) -> Result<Self, PassthroughError> {
        let memory = Arc::new(RegionMemory::new(DirectMap));
        let ictx = Ictx::new(memory.clone() as Arc<dyn MemorySource>, pin_limit_pages);
        let ioas = ictx.ioas_alloc().map_err(|e| PassthroughError::Iommufd("IOAS allocation", e))?;
        Ok(Self {
            memory,
            ictx,
            ioas,
            devices: BTreeMap::new(),
            routes: alloc::vec::Vec::new(),
            allow_unsafe_interrupts: false,
        })
    }

    /// Lets [`Self::assign`] accept devices whose unit does not remap
    /// interrupts (as Linux's `allow_unsafe_interrupts`): such a device
    /// can raise any interrupt on the host.
    pub fn allow_unsafe_interrupts(&mut self, allow: bool) {
        self.allow_unsafe_interrupts = allow;
    }

    /// Maps guest RAM `[gpa, gpa + len)`, backed by host physical
    /// `[hpa, hpa + len)`, at IOVA `gpa` for every assigned device (and
    /// every later one). Page aligned; `writable` lets devices write it.
    pub fn add_memory(&mut self, gpa: u64, hpa: u64, len: u64, writable: bool) -> Result<(), PassthroughError> {
        self.memory.add_region(gpa, hpa, len, writable).map_err(|e| PassthroughError::Iommufd("guest memory", e))?;
        if let Err(e) = self.ictx.ioas_map(self.ioas, Some(gpa), gpa, len, true, writable) {
            let _ = self.memory.remove_region(gpa, len);
            return Err(PassthroughError::Iommufd("IOAS map at the guest physical address", e));
        }
        Ok(())
    }

    /// Unmaps guest RAM added as `[gpa, gpa + len)`: devices can no longer
    /// reach it (one IOTLB invalidation per domain), and its pages are
    /// unpinned.
    /// Only whole ranges as added: anything else is refused (`ENOENT`)
    /// and changes nothing.
    pub fn remove_memory(&mut self, gpa: u64, len: u64) -> Result<(), PassthroughError> {
        if !self.memory.has_region(gpa, len) {
            return Err(PassthroughError::Iommufd("guest memory", iommufd::Errno::ENOENT));
        }
        self.ictx.ioas_unmap(self.ioas, gpa, len).map_err(|e| PassthroughError::Iommufd("IOAS unmap", e))?;
        self.memory.remove_region(gpa, len).map_err(|e| PassthroughError::Iommufd("guest memory", e))
    }

    /// DMA faults the IOMMUs' logs hold (the latest 256 per unit, after
    /// polling them) for the functions assigned to this guest now, as
    /// (segment, function, address, write): what a VMM reports to the guest
    /// or logs. QEMU's AMD-Vi records none.
    pub fn dma_faults(&self, iommus: &Iommus) -> alloc::vec::Vec<(u16, Bdf, u64, bool)> {
        let mut out = alloc::vec::Vec::new();
        for &(segment, bdf) in self.devices.keys() {
            if let Some((unit, rid)) = iommus.vtd_unit(segment, bdf) {
                let mut u = unit.lock();
                u.poll_faults();
                let (log, _) = u.fault_log();
                out.extend(log.iter().filter(|r| r.source_id == rid).map(|r| (segment, bdf, r.address, r.write)));
            } else if let Some((unit, id)) = iommus.amd_unit(segment, bdf) {
                let mut u = unit.lock();
                u.poll_events();
                let (log, _) = u.event_log();
                out.extend(log.iter().filter_map(|e| match *e {
                    amdvi::Event::IoPageFault { device_id, address, flags, .. } if device_id == id => {
                        Some((segment, bdf, address, flags & amdvi::event::flags::RW != 0))
                    }
                    _ => None,
                }));
            }
        }
        out
    }

    /// Gives the guest the function `segment:bdf`: its DMA is translated
    /// through the guest's memory map from now on. Refused for a function
    /// no IOMMU isolates.
    pub fn assign(&mut self, iommus: &Iommus, segment: u16, bdf: Bdf) -> Result<(), PassthroughError> {
        if self.devices.contains_key(&(segment, bdf)) {
            return Err(PassthroughError::AlreadyAssigned(segment, bdf));
        }
        let ops = iommus.device(segment, bdf)?;
        if !self.allow_unsafe_interrupts && !iommus.interrupts_isolated(segment, bdf) {
            return Err(PassthroughError::UnsafeInterrupts(segment, bdf));
        }
        let dev = self.ictx.bind_device(ops).map_err(|e| PassthroughError::Iommufd("bind", e))?;
        if let Err(e) = self.ictx.attach(dev, self.ioas) {
            let _ = self.ictx.unbind_device(dev);
            return Err(PassthroughError::Iommufd("attach", e));
        }
        self.devices.insert((segment, bdf), dev);
        Ok(())
    }

    /// Takes the function back: its DMA and its interrupts are blocked
    /// again.
    pub fn unassign(&mut self, segment: u16, bdf: Bdf) -> Result<(), PassthroughError> {
        let dev = *self.devices.get(&(segment, bdf)).ok_or(PassthroughError::NotAssigned(segment, bdf))?;
        self.ictx.detach(dev).map_err(|e| PassthroughError::Iommufd("detach", e))?;
        self.ictx.unbind_device(dev).map_err(|e| PassthroughError::Iommufd("unbind", e))?;
        self.devices.remove(&(segment, bdf));
        let mut i = 0;
        while i < self.routes.len() {
            if (self.routes[i].0, self.routes[i].1) == (segment, bdf) {
                self.routes.swap_remove(i).2.remove();
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Routes one MSI of the assigned function `segment:bdf` to `vector`
    /// on the CPU with APIC id `apic_id`, through an interrupt remapping
    /// entry that accepts it only from this function. Returns the MSI
    /// address and data to program into the device (or to give its
    /// virtual MSI capability). The route goes away with [`Self::unassign`].
    pub fn route_msi(
        &mut self,
        iommus: &Iommus,
        segment: u16,
        bdf: Bdf,
        vector: u8,
        apic_id: u32,
    ) -> Result<(u64, u32), PassthroughError> {
        if !self.devices.contains_key(&(segment, bdf)) {
            return Err(PassthroughError::NotAssigned(segment, bdf));
        }
        let fail = |e: String| PassthroughError::Interrupt(segment, bdf, e);
        if let Some((unit, id)) = iommus.amd_unit(segment, bdf) {
            let dest =
                u8::try_from(apic_id).map_err(|_| fail("APIC id beyond 8 bits (x2APIC routes: not yet)".into()))?;
            let index = unit.lock().route_interrupt(id, vector, dest).map_err(|e| fail(alloc::format!("{e}")))?;
            self.routes.push((segment, bdf, Route::Amd(unit, id, index)));
            return Ok(amdvi::irte::msi_message(index));
        }
        let (unit, rid) = iommus.vtd_unit(segment, bdf).ok_or_else(|| fail("no unit remaps its interrupts".into()))?;
        let mut u = unit.lock();
        let index = u.alloc_irte().map_err(|e| fail(alloc::format!("{e}")))?;
        let entry = vtd::ir::Irte::remapped(vector, apic_id, false, rid);
        if let Err(e) = u.set_irte(index, entry) {
            let _ = u.free_irte(index);
            return Err(fail(alloc::format!("{e}")));
        }
        drop(u);
        self.routes.push((segment, bdf, Route::Vtd(unit, index)));
        Ok((vtd::ir::msi_address(index), 0))
    }

    /// Guest pages pinned now.
    pub fn pinned_pages(&self) -> u64 {
        self.memory.pinned_pages()
    }

    /// The iommufd context underneath, for what this API does not cover.
    pub fn ictx(&self) -> &Ictx {
        &self.ictx
    }

    /// The IOAS holding the guest's memory map.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }
}
