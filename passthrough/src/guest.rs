//! One guest's DMA view: its RAM at IOVA = guest physical address in one
//! iommufd IOAS, the devices assigned to it, and their interrupt routes.

use crate::error::{Function, PassthroughError};
use crate::iommus::Iommus;
use crate::machine::{FaultBatch, Holder, Machine};
use crate::ownership::{GroupId, Owner};
use crate::platform::{Platform, PlatformPhys};
use crate::quiesce::{self, Reset};
use crate::{Bdf, GuestAddr, PhysAddr};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::memsrc::{MemorySource, RegionMemory};
use portcullis_iommu::unit::{IommuUnit, MsiRoute, RequesterRef};

mod shared_table;

/// A DMA fault of one of the guest's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// The device: the guest's function whose requester id the DMA
    /// carried (for functions sharing an id, the first the guest was
    /// given).
    pub function: Function,
    /// Where the DMA arrived: unit and requester id.
    pub requester: RequesterRef,
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
pub struct MsiHandle(u64);

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

/// One assigned function. Functions of the guest whose DMA carries the
/// same requester id share one iommufd device (`id`; with a shared table,
/// the unit's domain id instead).
struct Assigned {
    id: u32,
    unit: Arc<dyn IommuUnit>,
    at: RequesterRef,
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
    /// The next route's handle number: 64 bits, so it never wraps onto a
    /// live route (a guest reprogramming its MSIs a billion times a second
    /// takes centuries).
    next_route: u64,
    allow_unsafe_interrupts: bool,
    machine: Arc<Machine>,
    owner: Owner,
    /// What this view holds its devices' groups as.
    holder: Holder,
    /// APIC ids the guest's interrupts may be routed to (`None`: any).
    cpus: Option<Vec<u32>>,
    /// The hypervisor's 4-level table devices are attached to instead of
    /// the IOAS ([`GuestDma::new_sharing_table`]).
    table: Option<u64>,
    /// While dirty tracking runs: the HWPTs (one per unit) the devices
    /// were moved to, each tracking.
    dirty_hwpts: Option<Vec<u32>>,
}

impl<P: Platform> Drop for GuestDma<P> {
    /// Every device still assigned is quiesced first, as by
    /// [`GuestDma::unassign`] (errors ignored); then the interrupt routes
    /// go, the devices are detached (blocked) and their groups given back.
    /// A route whose entry cannot be cleared stays in the unit's table, and
    /// a device that cannot be detached keeps its group (the unit has
    /// stopped answering; nobody else may be given what it can still
    /// reach).
    fn drop(&mut self) {
        let functions = self.platform.pci_functions();
        for &f in self.devices.keys() {
            let _ = quiesce::quiesce(&*self.platform, &functions, f);
        }
        for r in core::mem::take(&mut self.routes).into_values() {
            let _ = r.free();
        }
        // Functions sharing an attachment: one iommufd device, or (shared
        // table) one requester id of one unit.
        let mut detached: Vec<u64> = Vec::new();
        let mut failed: Vec<u64> = Vec::new();
        let devices: Vec<(Function, u32, RequesterRef)> = self.devices.iter().map(|(f, a)| (*f, a.id, a.at)).collect();
        for (function, id, at) in devices {
            let key = if self.table.is_some() { (at.unit as u64) << 16 | at.requester_id as u64 } else { id as u64 };
            if failed.contains(&key) {
                continue;
            }
            if !detached.contains(&key) {
                let gone = match self.table {
                    Some(_) => self.devices[&function].unit.detach_external(at.requester_id, id as u16).is_ok(),
                    None => {
                        self.ictx.detach(id).is_ok() && {
                            let _ = self.ictx.unbind_device(id);
                            true
                        }
                    }
                };
                if !gone {
                    failed.push(key);
                    continue;
                }
                detached.push(key);
            }
            self.release(function);
        }
        if let Owner::Guest(id) = self.owner {
            self.machine.drop_guest(id);
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
    /// `pin_limit_pages` pages; a new guest as the machine-wide ownership
    /// knows it.
    pub fn new(iommus: &Iommus<P>, pin_limit_pages: u64) -> Result<Self, PassthroughError> {
        let owner = Owner::Guest(iommus.machine().new_guest());
        Self::with_owner(iommus, pin_limit_pages, owner)
    }

    /// A DMA view for the host's own devices: translated through a domain
    /// the host maps (for example its RAM one-to-one: `add_memory(GuestAddr(x),
    /// PhysAddr(x), ..)`); the functions assigned to it belong to the host.
    /// See also [`Iommus::claim_for_host`] for pass-through.
    pub fn new_host(iommus: &Iommus<P>, pin_limit_pages: u64) -> Result<Self, PassthroughError> {
        Self::with_owner(iommus, pin_limit_pages, Owner::Host)
    }

    fn with_owner(iommus: &Iommus<P>, pin_limit_pages: u64, owner: Owner) -> Result<Self, PassthroughError> {
        let memory = Arc::new(RegionMemory::new(PlatformPhys(iommus.platform().clone())));
        let ictx = Ictx::new(memory.clone() as Arc<dyn MemorySource>, pin_limit_pages);
        let ioas = ictx.ioas_alloc().map_err(|e| PassthroughError::Iommufd("IOAS allocation", e))?;
        let machine = iommus.machine().clone();
        let holder = Holder::View(machine.new_view());
        Ok(Self {
            platform: iommus.platform().clone(),
            memory,
            ictx,
            ioas,
            devices: BTreeMap::new(),
            routes: BTreeMap::new(),
            next_route: 0,
            allow_unsafe_interrupts: false,
            machine,
            owner,
            holder,
            cpus: None,
            table: None,
            dirty_hwpts: None,
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
        if self.table.is_some() {
            return Err(PassthroughError::SharedTable("devices see the hypervisor's table: map there"));
        }
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

    /// The guest's fault stream: DMA faults of its devices not read
    /// before (each is read once, oldest first), and how many were lost
    /// (its queue of [`crate::FAULT_QUEUE`] was full, or a unit's fault
    /// recording overflowed). Faults of other guests' devices never show
    /// up here. QEMU's AMD-Vi records none.
    pub fn dma_faults(&mut self) -> FaultBatch<GuestFault> {
        self.machine.route_faults();
        let batch = self.machine.take_faults(self.owner);
        let faults = batch
            .faults
            .into_iter()
            .map(|r| {
                let requester = RequesterRef { unit: r.unit as u16, requester_id: r.fault.requester_id };
                let function = self
                    .devices
                    .iter()
                    .find(|(_, a)| a.at == requester)
                    .map(|(f, _)| *f)
                    .or_else(|| self.machine.groups.get(r.group).and_then(|g| g.functions.first().copied()))
                    .unwrap_or(Function { segment: 0, bdf: Bdf::from_requester_id(r.fault.requester_id) });
                GuestFault {
                    function,
                    requester,
                    address: r.fault.address,
                    write: r.fault.write,
                    reason: r.fault.reason,
                }
            })
            .collect();
        FaultBatch { faults, lost: batch.lost }
    }

    /// Moves the guest's DMA faults (those [`Self::dma_faults`] would
    /// return) into iommufd fault object `fault_id` of this view's
    /// context ([`Self::ictx`]`.fault_alloc()`), so a VMM reads its
    /// devices' translation faults through the same queue (and the same
    /// `read`/`write` rules) as page requests: each is one record with
    /// `IOMMU_PGFAULT_FLAGS_LAST_PAGE | PORTCULLIS_PGFAULT_FLAGS_UNRECOVERABLE`,
    /// `dev_id` the iommufd device of the function ([`Self::device_id`]),
    /// `perm` READ or WRITE and `addr` the guest physical address used
    /// (see `iommufd::ctx::Ictx::report_dma_fault`).
    ///
    /// Returns what could not be queued: the faults of functions with no
    /// iommufd device (a view sharing the hypervisor's table), or that the
    /// queue refused otherwise, are handed back as [`Self::dma_faults`]
    /// would, and `lost` counts both the
    /// faults lost before (as in [`Self::dma_faults`]) and those the fault
    /// object refused because it was full. An unknown `fault_id` is an
    /// error and takes no fault out of the stream.
    pub fn forward_dma_faults(&mut self, fault_id: u32) -> Result<FaultBatch<GuestFault>, PassthroughError> {
        self.ictx.fault(fault_id).map_err(|e| PassthroughError::Iommufd("fault queue", e))?;
        let batch = self.dma_faults();
        let mut left = FaultBatch { faults: Vec::new(), lost: batch.lost };
        for f in batch.faults {
            let Some(dev_id) = self.device_id(f.function.segment, f.function.bdf) else {
                left.faults.push(f);
                continue;
            };
            match self.ictx.report_dma_fault(fault_id, dev_id, f.address, f.write) {
                Ok(()) => {}
                Err(iommufd::Errno::ENOSPC) => left.lost += 1,
                // Not expected (both objects were just found), but never
                // dropped: handed back.
                Err(_) => left.faults.push(f),
            }
        }
        Ok(left)
    }

    /// The iommufd device id (in [`Self::ictx`]) of assigned function
    /// `segment:bdf`, or `None` when it is not assigned or the view
    /// shares the hypervisor's table (its devices are then not iommufd
    /// devices).
    pub fn device_id(&self, segment: u16, bdf: Bdf) -> Option<u32> {
        if self.table.is_some() {
            return None;
        }
        self.devices.get(&Function { segment, bdf }).map(|a| a.id)
    }

    /// Who this view belongs to (a guest, or the host for
    /// [`Self::new_host`]).
    pub fn owner(&self) -> Owner {
        self.owner
    }

    fn group(&self, function: Function) -> Result<GroupId, PassthroughError> {
        self.machine.groups.of(function).map(|g| g.id).ok_or(PassthroughError::NotIsolated(function))
    }

    /// Drops `function`'s hold of its group.
    fn release(&self, function: Function) {
        if let Some(g) = self.machine.groups.of(function) {
            self.machine.unhold(function, g.id, self.owner, self.holder);
        }
    }

    /// Gives the guest the function `segment:bdf`: its DMA is translated
    /// through the guest's memory map from now on. Refused for a function
    /// no IOMMU isolates, (unless allowed) one whose interrupts the unit
    /// does not remap, and one whose isolation group (the same function,
    /// one behind the same bridge, an ACS-less sibling: the unit cannot
    /// keep their DMA apart) belongs to the host or another guest of the
    /// same [`Iommus`] ([`PassthroughError::Owned`] names it). Giving one
    /// function of a group gives the guest the group: nobody else can be
    /// given its other functions until the guest lets every one go.
    pub fn assign(&mut self, iommus: &Iommus<P>, segment: u16, bdf: Bdf) -> Result<(), PassthroughError> {
        let function = Function { segment, bdf };
        if self.devices.contains_key(&function) {
            return Err(PassthroughError::AlreadyAssigned(function));
        }
        if self.dirty_hwpts.is_some() {
            // Its writes would not be tracked: stop tracking first.
            return Err(PassthroughError::Iommufd("assign while dirty tracking runs", iommufd::Errno::EBUSY));
        }
        let device = iommus.device(segment, bdf)?;
        let unit = device.unit().clone();
        if !self.allow_unsafe_interrupts && !unit.remaps_interrupts() {
            return Err(PassthroughError::UnsafeInterrupts(function));
        }
        let at = device.requester();
        let group = self.group(function)?;
        // The group also carries an IOAPIC's messages the host routes: the
        // host's (a guest's device entry would take the IOAPIC's routes).
        let routed = self
            .machine
            .groups
            .get(group)
            .is_some_and(|g| g.requester_ids.iter().any(|&r| iommus.ioapic_source_routed(g.unit, r)));
        if routed {
            return Err(PassthroughError::Owned(function, Owner::Host));
        }
        self.machine
            .hold(function, group, self.owner, self.holder)
            .map_err(|t| PassthroughError::Owned(function, t.owner))?;
        // The unit's interrupt table for the requester id holds as many
        // entries as the function has vectors (AMD-Vi; VT-d has one table).
        let vectors = quiesce::msi_vectors(&*self.platform, function);
        if let Err(e) = unit.reserve_interrupts(at.requester_id, vectors) {
            self.release(function);
            return Err(PassthroughError::Interrupt(function, e));
        }
        // Another function of this guest carries the same requester id: its
        // DMA already goes through the guest's memory map.
        if let Some(id) = self.devices.values().find(|a| a.at == at).map(|a| a.id) {
            self.devices.insert(function, Assigned { id, unit, at });
            return Ok(());
        }
        if let Some(root) = self.table {
            let id = self.attach_shared(function, &unit, at, root).inspect_err(|_| self.release(function))?;
            self.devices.insert(function, Assigned { id, unit, at });
            return Ok(());
        }
        let ops: Arc<dyn DeviceOps> = Arc::new(device);
        let id = match self.ictx.bind_device(ops) {
            Ok(id) => id,
            Err(e) => {
                self.release(function);
                return Err(PassthroughError::Iommufd("bind", e));
            }
        };
        if let Err(e) = self.ictx.attach(id, self.ioas) {
            // Never attached: unbinding only drops the object.
            let _ = self.ictx.unbind_device(id);
            self.release(function);
            return Err(PassthroughError::Iommufd("attach", e));
        }
        self.devices.insert(function, Assigned { id, unit, at });
        Ok(())
    }

    /// Takes the function back (its DMA is blocked only once no other
    /// function of the guest carries the same requester id, and its group
    /// goes back once none of its functions is the guest's). It is quiesced first ([`mod@crate::quiesce`]:
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
        let id = self.devices.get(&function).map(|a| a.id).ok_or(PassthroughError::NotAssigned(function))?;
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
        // Another function on the same attachment (the same requester id
        // of the same unit, as `assign` shares them): it stays attached.
        // Ids alone do not tell: shared-table ids are per-unit domain ids.
        let at = self.devices[&function].at;
        let shared = self.devices.iter().any(|(f, a)| *f != function && a.at == at);
        if !shared && self.table.is_some() {
            let a = &self.devices[&function];
            a.unit.detach_external(a.at.requester_id, id as u16).map_err(|e| PassthroughError::Unit(function, e))?;
        } else if !shared {
            self.ictx.detach(id).map_err(|e| PassthroughError::Iommufd("detach", e))?;
            self.ictx.unbind_device(id).map_err(|e| PassthroughError::Iommufd("unbind", e))?;
        }
        self.devices.remove(&function);
        self.release(function);
        quiet
    }

    /// Limits the CPUs (by APIC id) this guest's interrupts may be routed
    /// or retargeted to: the ones the VMM runs the guest's vCPUs on. Until
    /// set, any APIC id is accepted. Routes already made are not checked
    /// again.
    pub fn set_cpus(&mut self, apic_ids: &[u32]) {
        self.cpus = Some(apic_ids.to_vec());
    }

    fn check_cpu(&self, function: Function, apic_id: u32) -> Result<(), PassthroughError> {
        match &self.cpus {
            Some(c) if !c.contains(&apic_id) => Err(PassthroughError::ForeignCpu(function, apic_id)),
            _ => Ok(()),
        }
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
        self.check_cpu(function, apic_id)?;
        let MsiRoute { handle, address, data } = a
            .unit
            .route_msi(a.at.requester_id, vector, apic_id)
            .map_err(|e| PassthroughError::Interrupt(function, e))?;
        let id = MsiHandle(self.next_route);
        self.next_route += 1;
        self.routes.insert(id, Route { function, unit: a.unit.clone(), requester_id: a.at.requester_id, handle });
        Ok(Msi { handle: id, address, data })
    }

    /// Points route `msi` at another vector and CPU. The device keeps its
    /// MSI address and data; once this returns, the old vector never
    /// arrives.
    pub fn retarget_msi(&mut self, msi: MsiHandle, vector: u8, apic_id: u32) -> Result<(), PassthroughError> {
        let r = self.routes.get(&msi).ok_or(PassthroughError::NoSuchRoute)?;
        self.check_cpu(r.function, apic_id)?;
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

    /// Starts tracking which guest pages the assigned devices write, for
    /// live migration: every device moves to a domain that records dirty
    /// bits (one per IOMMU unit, made with iommufd's dirty-tracking HWPT
    /// allocation; it maps the same guest memory), and recording starts.
    /// Pages written before this call are not reported.
    ///
    /// Every assigned device's unit must be able to track (VT-d: scalable
    /// mode with second-stage translation and ECAP.SSADS; AMD-Vi:
    /// EFR.HDSup), or nothing changes and the call fails with
    /// [`PassthroughError::Unit`] naming the first function that cannot
    /// (its cause `HwError::Unsupported`). QEMU 10 emulates neither.
    /// Calling it while tracking does nothing. While tracking runs,
    /// [`Self::assign`] is refused (`EBUSY`): a new device's writes would
    /// go unrecorded.
    ///
    /// On any other failure the devices moved so far go back to the IOAS's
    /// own domains and the tracking domains are destroyed: the view is as
    /// it was. Only if a device cannot go back too (a second failure) does
    /// it stay on its tracking domain, which is then kept: tracking counts
    /// as started ([`Self::dirty_tracking`]) so [`Self::read_dirty`] and
    /// [`Self::stop_dirty_tracking`] reach it.
    pub fn start_dirty_tracking(&mut self) -> Result<(), PassthroughError> {
        if self.table.is_some() {
            // The devices walk the hypervisor's table: its dirty bits are
            // the hypervisor's to read (its nested paging sets them too).
            return Err(PassthroughError::SharedTable("dirty tracking of the hypervisor's own table"));
        }
        if self.dirty_hwpts.is_some() {
            return Ok(());
        }
        for (function, a) in &self.devices {
            if !a.unit.supports_dirty_tracking() {
                return Err(PassthroughError::Unit(
                    *function,
                    portcullis_iommu::UnitError {
                        unit: a.unit.base(),
                        cause: portcullis_iommu::HwError::Unsupported(
                            "dirty tracking (VT-d: scalable mode with ECAP.SSADS; AMD-Vi: EFR.HDSup)",
                        ),
                    },
                ));
            }
        }
        // One tracking HWPT per unit; each iommufd device moves once.
        let mut per_unit: Vec<(u64, u32)> = Vec::new();
        let mut moved: Vec<u32> = Vec::new();
        // A device the failed move left attached to nothing.
        let mut blocked: Option<u32> = None;
        let assigned: Vec<(u32, u64)> = self.devices.values().map(|a| (a.id, a.unit.base())).collect();
        let result = (|| {
            for (id, base) in assigned {
                if moved.contains(&id) {
                    continue;
                }
                let hwpt = match per_unit.iter().find(|(b, _)| *b == base) {
                    Some(&(_, h)) => h,
                    None => {
                        let h = self
                            .ictx
                            .hwpt_alloc_with(id, self.ioas, true)
                            .map_err(|e| PassthroughError::Iommufd("dirty-tracking HWPT allocation", e))?;
                        per_unit.push((base, h));
                        self.ictx
                            .hwpt_set_dirty_tracking(h, true)
                            .map_err(|e| PassthroughError::Iommufd("HWPT dirty tracking on", e))?;
                        h
                    }
                };
                match self.ictx.replace(id, hwpt) {
                    // Moved: the old automatic domain's final invalidation
                    // failed, but the device is on the tracking domain.
                    Ok(_) | Err(iommufd::ctx::ReplaceError::Moved { .. }) => {}
                    Err(iommufd::ctx::ReplaceError::Stayed(e)) => {
                        return Err(PassthroughError::Iommufd("replace to the dirty-tracking HWPT", e));
                    }
                    Err(iommufd::ctx::ReplaceError::Blocked { error, .. }) => {
                        blocked = Some(id);
                        return Err(PassthroughError::Iommufd("replace to the dirty-tracking HWPT", error));
                    }
                }
                moved.push(id);
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Back to the IOAS's own domains, and the tracking HWPTs go.
            // A device that cannot go back stays on its tracking HWPT (or,
            // blocked, on nothing): the HWPTs still in use are kept as this
            // view's tracking HWPTs, so `dirty_tracking()` says so and
            // `stop_dirty_tracking` turns their tracking off. Nothing a
            // device may reach is freed either way.
            for id in moved {
                // Stayed: still on its tracking HWPT, which is then kept
                // below (destroy answers EBUSY). Blocked: DMA blocked.
                let _ = self.ictx.replace(id, self.ioas);
            }
            if let Some(id) = blocked {
                // Failing, the device stays blocked: its DMA goes nowhere.
                let _ = self.ictx.attach(id, self.ioas);
            }
            let mut kept = Vec::new();
            for (_, h) in per_unit {
                if self.ictx.destroy(h) == Err(iommufd::Errno::EBUSY) {
                    kept.push(h);
                }
            }
            if !kept.is_empty() {
                self.dirty_hwpts = Some(kept);
            }
            return Err(e);
        }
        self.dirty_hwpts = Some(per_unit.into_iter().map(|(_, h)| h).collect());
        Ok(())
    }

    /// Reads and clears the dirty state of `[gpa, gpa + len)`: bit `k` of
    /// `out` (bit `k % 64` of `out[k / 64]`) is set when a device wrote
    /// into the `page_size` piece at `gpa + k * page_size` since the last
    /// read (or since tracking started), and cleared otherwise; returns the
    /// number of pieces set. A large page a device wrote reports every
    /// piece it covers; unmapped parts read clean. `page_size` is a power
    /// of two of at least 4 KiB, `gpa` and `len` multiples of it, and
    /// `out` must hold a bit per piece ([`PassthroughError::BadRange`]
    /// otherwise). One IOTLB invalidation per unit per call. Needs
    /// [`Self::start_dirty_tracking`] first (`EINVAL` otherwise).
    pub fn read_dirty(
        &mut self,
        gpa: GuestAddr,
        len: u64,
        page_size: u64,
        out: &mut [u64],
    ) -> Result<u64, PassthroughError> {
        let bad = PassthroughError::BadRange { gpa: gpa.0, len };
        if !page_size.is_power_of_two() || page_size < 4096 || len == 0 || (gpa.0 | len) & (page_size - 1) != 0 {
            return Err(bad);
        }
        gpa.0.checked_add(len - 1).ok_or(bad)?;
        let pieces = len / page_size;
        if (out.len() as u64).saturating_mul(64) < pieces {
            return Err(bad);
        }
        let Some(hwpts) = &self.dirty_hwpts else {
            return Err(PassthroughError::Iommufd("read_dirty without dirty tracking", iommufd::Errno::EINVAL));
        };
        out[..pieces.div_ceil(64) as usize].fill(0);
        let shift = page_size.trailing_zeros();
        for &h in hwpts {
            let hwpt = self.ictx.hwpt(h).map_err(|e| PassthroughError::Iommufd("dirty-tracking HWPT", e))?;
            let mut domain = hwpt.domain.lock();
            let mut gather = portcullis_iommu::IotlbGather::default();
            let read = domain.read_and_clear_dirty(gpa.0, len, true, &mut gather, &mut |at, n| {
                for k in (at - gpa.0) >> shift..=(at + (n - 1) - gpa.0) >> shift {
                    out[(k / 64) as usize] |= 1 << (k % 64);
                }
            });
            let synced = domain.iotlb_sync(&mut gather);
            // A hardware failure (the unit stopped answering) as EIO.
            read.and(synced).map_err(|_| PassthroughError::Iommufd("read dirty bits", iommufd::Errno::EIO))?;
        }
        Ok(out[..pieces.div_ceil(64) as usize].iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// Stops dirty tracking: the units stop recording (the devices stay on
    /// the tracking domains, which translate as before). Does nothing when
    /// tracking is off.
    pub fn stop_dirty_tracking(&mut self) -> Result<(), PassthroughError> {
        let Some(hwpts) = self.dirty_hwpts.take() else { return Ok(()) };
        let mut first = Ok(());
        for h in hwpts {
            let r = self.ictx.hwpt_set_dirty_tracking(h, false);
            if first.is_ok() {
                first = r.map_err(|e| PassthroughError::Iommufd("HWPT dirty tracking off", e));
            }
        }
        first
    }

    /// Whether dirty tracking runs ([`Self::start_dirty_tracking`]).
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_hwpts.is_some()
    }
}
