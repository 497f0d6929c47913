//! One guest's DMA view: its RAM at IOVA = guest physical address in one
//! iommufd IOAS, the devices assigned to it, and their interrupt routes.

use crate::error::{Function, PassthroughError};
use crate::iommus::Iommus;
use crate::platform::{Platform, PlatformPhys};
use crate::quiesce::{self, Reset};
use crate::{Bdf, GuestAddr, PhysAddr};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::memsrc::{MemorySource, RegionMemory};
use portcullis_iommu::unit::{IommuUnit, MsiRoute};

/// A DMA fault of one of the guest's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// The device.
    pub function: Function,
    /// The (guest physical) address it used.
    pub address: u64,
    /// It was a write.
    pub write: bool,
    /// The unit's reason or event code.
    pub reason: u8,
}

/// A routed MSI of one of the guest's devices, as [`GuestDma::route_msi`]
/// hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsiHandle(u32);

/// What [`GuestDma::route_msi`] made: the handle to retarget or free the
/// route with, and the MSI address and data to program into the device
/// (or its virtual MSI capability). Retargeting does not change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    /// The route.
    pub handle: MsiHandle,
    /// MSI address to program.
    pub address: u64,
    /// MSI data to program.
    pub data: u32,
}

/// One routed MSI.
struct Route {
    function: Function,
    unit: Arc<dyn IommuUnit>,
    requester_id: u16,
    handle: u16,
}

impl Route {
    fn free(&self) -> Result<(), PassthroughError> {
        self.unit.free_msi(self.requester_id, self.handle).map_err(|e| PassthroughError::Interrupt(self.function, e))
    }
}

/// One assigned device.
struct Assigned {
    id: u32,
    unit: Arc<dyn IommuUnit>,
    requester_id: u16,
}

/// One guest's DMA view: its memory at IOVA = guest physical address, and
/// the devices assigned to it.
pub struct GuestDma<P: Platform> {
    platform: Arc<P>,
    memory: Arc<RegionMemory<PlatformPhys<P>>>,
    ictx: Ictx,
    ioas: u32,
    devices: BTreeMap<Function, Assigned>,
    routes: BTreeMap<MsiHandle, Route>,
    next_route: u32,
    allow_unsafe_interrupts: bool,
}

impl<P: Platform> Drop for GuestDma<P> {
    /// Every device still assigned is quiesced first, as by
    /// [`GuestDma::unassign`] (errors ignored); the interrupt routes go
    /// here, and the devices are detached (blocked) by the iommufd context
    /// going away. A route whose entry cannot be cleared stays in the
    /// unit's table (the unit has stopped answering).
    fn drop(&mut self) {
        let functions = self.platform.pci_functions();
        for &f in self.devices.keys() {
            let _ = quiesce::quiesce(&*self.platform, &functions, f);
        }
        for r in core::mem::take(&mut self.routes).into_values() {
            let _ = r.free();
        }
    }
}

impl<P: Platform> fmt::Debug for GuestDma<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestDma(IOAS {}, {} device(s), {:?})", self.ioas, self.devices.len(), self.memory)
    }
}

fn page_range(gpa: u64, len: u64) -> Result<(), PassthroughError> {
    if len == 0 || (gpa | len) & 0xfff != 0 || gpa.checked_add(len - 1).is_none() {
        return Err(PassthroughError::BadRange { gpa, len });
    }
    Ok(())
}

impl<P: Platform> GuestDma<P> {
    /// An empty guest view on `iommus`' platform that may pin at most
    /// `pin_limit_pages` pages.
    pub fn new(iommus: &Iommus<P>, pin_limit_pages: u64) -> Result<Self, PassthroughError> {
        let memory = Arc::new(RegionMemory::new(PlatformPhys(iommus.platform().clone())));
        let ictx = Ictx::new(memory.clone() as Arc<dyn MemorySource>, pin_limit_pages);
        let ioas = ictx.ioas_alloc().map_err(|e| PassthroughError::Iommufd("IOAS allocation", e))?;
        Ok(Self {
            platform: iommus.platform().clone(),
            memory,
            ictx,
            ioas,
            devices: BTreeMap::new(),
            routes: BTreeMap::new(),
            next_route: 0,
            allow_unsafe_interrupts: false,
        })
    }

    /// Lets [`Self::assign`] accept devices whose unit does not remap
    /// interrupts (as Linux's `allow_unsafe_interrupts`): such a device can
    /// raise any interrupt on the host.
    pub fn allow_unsafe_interrupts(&mut self, allow: bool) {
        self.allow_unsafe_interrupts = allow;
    }

    /// Maps guest RAM `[gpa, gpa + len)`, backed by host physical
    /// `[hpa, hpa + len)`, at IOVA `gpa` for every assigned device (and
    /// every later one). Page aligned; `writable` lets devices write it.
    pub fn add_memory(
        &mut self,
        gpa: GuestAddr,
        hpa: PhysAddr,
        len: u64,
        writable: bool,
    ) -> Result<(), PassthroughError> {
        page_range(gpa.0, len)?;
        page_range(hpa.0, len)?;
        self.memory
            .add_region(gpa.0, hpa.0, len, writable)
            .map_err(|e| PassthroughError::Iommufd("guest memory", e))?;
        if let Err(e) = self.ictx.ioas_map(self.ioas, Some(gpa.0), gpa.0, len, true, writable) {
            // Nothing was mapped, so nothing pins the region.
            let _ = self.memory.remove_region(gpa.0, len);
            return Err(PassthroughError::Iommufd("IOAS map at the guest physical address", e));
        }
        Ok(())
    }

    /// Unmaps guest RAM added as `[gpa, gpa + len)`: devices can no longer
    /// reach it (one IOTLB invalidation per domain), and its pages are
    /// unpinned. Only whole ranges as added: anything else is refused
    /// (`ENOENT`) and changes nothing. When the invalidation fails the
    /// range is gone from the IOAS but its pages stay pinned (a device may
    /// still reach them) and the region stays registered.
    pub fn remove_memory(&mut self, gpa: GuestAddr, len: u64) -> Result<(), PassthroughError> {
        if !self.memory.has_region(gpa.0, len) {
            return Err(PassthroughError::Iommufd("guest memory", iommufd::Errno::ENOENT));
        }
        self.ictx.ioas_unmap(self.ioas, gpa.0, len).map_err(|e| PassthroughError::Iommufd("IOAS unmap", e))?;
        self.memory.remove_region(gpa.0, len).map_err(|e| PassthroughError::Iommufd("guest memory", e))
    }

    /// DMA faults the IOMMUs' logs hold (the latest per unit, after
    /// polling them) for the functions assigned to this guest now: what a
    /// VMM reports to the guest or logs. QEMU's AMD-Vi records none.
    pub fn dma_faults(&self) -> Vec<GuestFault> {
        let mut out = Vec::new();
        let mut polled: Vec<*const ()> = Vec::new();
        for (&function, a) in &self.devices {
            let key = Arc::as_ptr(&a.unit) as *const ();
            if !polled.contains(&key) {
                a.unit.poll_faults();
                polled.push(key);
            }
            let (log, _) = a.unit.fault_log();
            out.extend(log.iter().filter(|f| f.requester_id == a.requester_id).map(|f| GuestFault {
                function,
                address: f.address,
                write: f.write,
                reason: f.reason,
            }));
        }
        out
    }

    /// Gives the guest the function `segment:bdf`: its DMA is translated
    /// through the guest's memory map from now on. Refused for a function
    /// no IOMMU isolates, and (unless allowed) one whose interrupts the
    /// unit does not remap.
    pub fn assign(&mut self, iommus: &Iommus<P>, segment: u16, bdf: Bdf) -> Result<(), PassthroughError> {
        let function = Function { segment, bdf };
        if self.devices.contains_key(&function) {
            return Err(PassthroughError::AlreadyAssigned(function));
        }
        let device = iommus.device(segment, bdf)?;
        let unit = device.unit().clone();
        if !self.allow_unsafe_interrupts && !unit.remaps_interrupts() {
            return Err(PassthroughError::UnsafeInterrupts(function));
        }
        let requester_id = device.requester().requester_id;
        let ops: Arc<dyn DeviceOps> = Arc::new(device);
        let id = self.ictx.bind_device(ops).map_err(|e| PassthroughError::Iommufd("bind", e))?;
        if let Err(e) = self.ictx.attach(id, self.ioas) {
            // Never attached: unbinding only drops the object.
            let _ = self.ictx.unbind_device(id);
            return Err(PassthroughError::Iommufd("attach", e));
        }
        self.devices.insert(function, Assigned { id, unit, requester_id });
        Ok(())
    }

    /// Takes the function back. It is quiesced first ([`mod@crate::quiesce`]:
    /// bus mastering, MSI and MSI-X off, then a reset where one is
    /// possible), so no DMA or MSI is in flight when its interrupt routes
    /// and its DMA view go; then its DMA and interrupts are blocked again.
    /// Returns the reset it got ([`Reset::NotPossible`]: none could be
    /// done); its configuration space is left for the VMM to restore.
    ///
    /// A function that does not quiesce is taken back all the same and the
    /// call fails with [`PassthroughError::Quiesce`]; one whose route or
    /// detach fails stays assigned, but quiesced.
    pub fn unassign(&mut self, segment: u16, bdf: Bdf) -> Result<Reset, PassthroughError> {
        let function = Function { segment, bdf };
        let id = self.devices.get(&function).ok_or(PassthroughError::NotAssigned(function))?.id;
        let quiet = quiesce::quiesce(&*self.platform, &self.platform.pci_functions(), function)
            .map_err(|e| PassthroughError::Quiesce(function, e));
        // Interrupts first: a route left behind would outlive the device's
        // ownership.
        let mut first_error = None;
        self.routes.retain(|_, r| {
            if r.function != function {
                return true;
            }
            if let Err(e) = r.free() {
                first_error.get_or_insert(e);
                return true;
            }
            false
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        self.ictx.detach(id).map_err(|e| PassthroughError::Iommufd("detach", e))?;
        self.ictx.unbind_device(id).map_err(|e| PassthroughError::Iommufd("unbind", e))?;
        self.devices.remove(&function);
        quiet
    }

    /// Routes one MSI of the assigned function `segment:bdf` to `vector`
    /// on the CPU with APIC id `apic_id`, through an interrupt remapping
    /// entry that accepts it only from this function. A function may have
    /// several routes (one per MSI/MSI-X vector). Returns the route's
    /// handle and the MSI address and data to program into the device.
    /// The route goes away with [`Self::free_msi`] or [`Self::unassign`].
    pub fn route_msi(&mut self, segment: u16, bdf: Bdf, vector: u8, apic_id: u32) -> Result<Msi, PassthroughError> {
        let function = Function { segment, bdf };
        let a = self.devices.get(&function).ok_or(PassthroughError::NotAssigned(function))?;
        let MsiRoute { handle, address, data } =
            a.unit.route_msi(a.requester_id, vector, apic_id).map_err(|e| PassthroughError::Interrupt(function, e))?;
        let id = MsiHandle(self.next_route);
        self.next_route += 1;
        self.routes.insert(id, Route { function, unit: a.unit.clone(), requester_id: a.requester_id, handle });
        Ok(Msi { handle: id, address, data })
    }

    /// Points route `msi` at another vector and CPU. The device keeps its
    /// MSI address and data; once this returns, the old vector never
    /// arrives.
    pub fn retarget_msi(&mut self, msi: MsiHandle, vector: u8, apic_id: u32) -> Result<(), PassthroughError> {
        let r = self.routes.get(&msi).ok_or(PassthroughError::NoSuchRoute)?;
        r.unit
            .retarget_msi(r.requester_id, r.handle, vector, apic_id)
            .map_err(|e| PassthroughError::Interrupt(r.function, e))
    }

    /// Frees route `msi`: the device's MSI through it is blocked again and
    /// its remapping entry can be reused.
    pub fn free_msi(&mut self, msi: MsiHandle) -> Result<(), PassthroughError> {
        let r = self.routes.get(&msi).ok_or(PassthroughError::NoSuchRoute)?;
        r.free()?;
        self.routes.remove(&msi);
        Ok(())
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
