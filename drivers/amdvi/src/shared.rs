//! An AMD-Vi unit behind the vendor-generic traits of
//! `portcullis_iommu::unit`: [`Shared`] (one running IOMMU, its state under
//! a lock) and [`AmdDomain`] (an AMD v1 page table invalidated through the
//! unit).
//!
//! Choices made here from the unit's capabilities: the table depth
//! (as many levels as 48 bits of IOVA need, within EFR.HATS), whether a
//! map must be invalidated (PCI capability NpCache: the unit caches
//! not-present entries), and that every device's interrupts are blocked
//! until routed (IV = 1, IntCtl = abort, in every device table entry).

use crate::{Caps, Clock, ContiguousMemory, Event, Unit, UnityRange};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::{AmdV1, Invalidator, PagingDomain, PtFormat};
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::unit::{
    DmaFault, FirmwareRange, IoapicRte, IommuUnit, IovaRange, MsiRoute, PinMode, TableInfo, UnitDomain, Vendor,
};
use portcullis_iommu::{DeviceHandle, DomainError, HwError, IommuDomain, Prot, RequesterRef, UnitError};
use spin::Mutex;

/// An I/O page fault event as a vendor-neutral fault (other events are
/// not DMA faults).
fn fault(e: &Event) -> Option<DmaFault> {
    match *e {
        Event::IoPageFault { device_id, address, flags, .. } => Some(DmaFault {
            requester_id: device_id,
            address,
            write: flags & crate::event::flags::RW != 0,
            reason: e.code(),
        }),
        _ => None,
    }
}

/// What the IVRS and the unit's PCI function say, for bring-up.
#[derive(Debug, Clone, Default)]
pub struct BringUp {
    /// Highest device id the device table must cover.
    pub last_device_id: u16,
    /// IVHD flags bit 5: the unit's table walks snoop CPU caches.
    pub coherent: bool,
    /// The unit's PCI capability header and Miscellaneous Information
    /// register 0, when read.
    pub pci_capability: Option<(u32, u32)>,
    /// Ranges the IVMD blocks require identity-mapped (or kept out).
    pub unity: Vec<UnityRange>,
    /// Interrupt routes name 32-bit x2APIC ids (128-bit entries,
    /// Control.GAEn and XTEn), for a kernel running its local APICs in
    /// x2APIC mode. Needs EFR.XTSup and EFR.GASup.
    pub x2apic: bool,
}

/// One running AMD-Vi unit, shared by its domains and devices.
pub struct Shared<M: Mmio, T: ContiguousMemory, C: Clock> {
    base: u64,
    unit: Mutex<Unit<M, T, C>>,
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> fmt::Debug for Shared<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AMD-Vi unit @{:#x}", self.base)
    }
}

impl<M, T, C> Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: ContiguousMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Brings up the unit at register base `base`: device table (every
    /// device blocked, DMA and interrupts), command buffer and event log
    /// running, translation on; with `info.x2apic`, interrupt routes in
    /// the 128-bit format with 32-bit destinations (a unit without
    /// EFR.XTSup or EFR.GASup is then an error naming it).
    pub fn bring_up(base: u64, mmio: M, mem: T, clock: C, info: BringUp) -> Result<Arc<Self>, UnitError> {
        let mut unit = Unit::new(base, mmio, mem, clock, info.last_device_id);
        unit.set_coherent(info.coherent);
        if let Some((header, misc)) = info.pci_capability {
            unit.set_pci_capability(header, misc);
        }
        unit.set_unity_ranges(info.unity);
        unit.set_x2apic(info.x2apic)?;
        unit.enable()?;
        Ok(Arc::new(Self { base, unit: Mutex::new(unit) }))
    }

    /// The driver's unit, for what the generic traits do not cover.
    pub fn lock(&self) -> spin::MutexGuard<'_, Unit<M, T, C>> {
        self.unit.lock()
    }

    /// Whether domains of this unit can track dirty pages (EFR.HDSup:
    /// the unit sets D in host PTEs for DTEs with HAD = 11b).
    pub fn can_track_dirty(&self) -> bool {
        self.unit.lock().caps().host_dirty()
    }

    /// A new empty AMD v1 domain that can track dirty pages: its format
    /// reads and clears D (bit 6) of its PTEs, and devices attached while
    /// tracking is on get HAD = 11b in their DTE. Refused without
    /// EFR.HDSup.
    pub fn new_dirty_domain(self: &Arc<Self>) -> Result<AmdDomain<M, T, C>, UnitError> {
        if !self.can_track_dirty() {
            return Err(UnitError { unit: self.base, cause: HwError::Unsupported("dirty tracking (EFR.HDSup)") });
        }
        self.new_domain_with(true)
    }

    /// A new empty AMD v1 domain.
    pub fn new_amd_domain(self: &Arc<Self>) -> Result<AmdDomain<M, T, C>, UnitError> {
        self.new_domain_with(false)
    }

    fn new_domain_with(self: &Arc<Self>, dirty: bool) -> Result<AmdDomain<M, T, C>, UnitError> {
        let base = self.base;
        let (caps, mem, id): (Caps, T, u16) = {
            let mut u = self.unit.lock();
            let id = u.alloc_domain_id()?;
            (u.caps(), u.memory().clone(), id)
        };
        let paging = AmdV1::from_caps(caps.efr, 48)
            .map(|f| f.with_dirty_tracking(dirty))
            .ok_or(UnitError { unit: base, cause: HwError::Unsupported("EFR.HATS: no host translation") })
            .and_then(|format| {
                let inv = AmdInvalidator { unit: self.clone(), domain_id: id, np_cache: caps.np_cache() };
                PagingDomain::new(format, mem, inv).map_err(|_| UnitError { unit: base, cause: HwError::NoMemory })
            });
        match paging {
            Ok(paging) => Ok(AmdDomain { paging, domain_id: id, unit: self.clone() }),
            Err(e) => {
                self.unit.lock().free_domain_id(id);
                Err(e)
            }
        }
    }
}

impl<M, T, C> IommuUnit for Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: ContiguousMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn base(&self) -> u64 {
        self.base
    }
    fn vendor(&self) -> Vendor {
        Vendor::AmdVi
    }
    fn new_domain(self: Arc<Self>) -> Result<Box<dyn UnitDomain>, UnitError> {
        Ok(Box::new(self.new_amd_domain()?))
    }
    fn attached_domain(&self, requester_id: u16) -> Option<u16> {
        self.unit.lock().attached_domain(requester_id)
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.can_track_dirty()
    }
    fn new_dirty_domain(self: Arc<Self>) -> Result<Box<dyn UnitDomain>, UnitError> {
        Ok(Box::new(Shared::new_dirty_domain(&self)?))
    }
    fn block(&self, requester_id: u16) -> Result<(), UnitError> {
        self.unit.lock().detach(requester_id)
    }
    fn pass_through(&self, requester_id: u16) -> Result<(), UnitError> {
        self.unit.lock().pass_through(requester_id)
    }
    /// The unity and exclusion ranges of the device; a range with neither
    /// permission is kept out of the IOAS but not mapped.
    fn firmware_ranges(&self, requester_id: u16) -> Vec<FirmwareRange> {
        self.unit
            .lock()
            .unity_for(requester_id)
            .into_iter()
            .map(|u| FirmwareRange {
                requester_id,
                range: IovaRange { start: u.start, last: u.last },
                prot: match (u.read, u.write) {
                    (true, true) => Prot::RW,
                    (false, true) => Prot::WRITE,
                    (true, false) => Prot::READ,
                    (false, false) => Prot::NONE,
                },
            })
            .collect()
    }
    fn set_firmware_ranges(&self, ranges: Vec<FirmwareRange>) {
        self.unit.lock().set_unity_ranges(
            ranges
                .into_iter()
                .map(|f| UnityRange {
                    first_id: f.requester_id,
                    last_id: f.requester_id,
                    start: f.range.start,
                    last: f.range.last,
                    read: f.prot.readable(),
                    write: f.prot.writable(),
                })
                .collect(),
        );
    }
    fn poll_faults(&self) -> Vec<DmaFault> {
        self.unit.lock().poll_events().iter().filter_map(fault).collect()
    }
    fn fault_log(&self) -> (Vec<DmaFault>, u64) {
        let u = self.unit.lock();
        let (log, overflows) = u.event_log();
        (log.iter().filter_map(fault).collect(), overflows)
    }
    /// Always: every device table entry controls the device's interrupts
    /// (blocked until a route exists).
    fn remaps_interrupts(&self) -> bool {
        true
    }
    fn reserve_interrupts(&self, requester_id: u16, vectors: u16) -> Result<(), UnitError> {
        self.unit.lock().reserve_interrupts(requester_id, vectors)
    }
    fn route_msi(&self, requester_id: u16, vector: u8, destination: u32) -> Result<MsiRoute, UnitError> {
        let index = self.unit.lock().route_interrupt(requester_id, vector, destination)?;
        let (address, data) = crate::irte::msi_message(index);
        Ok(MsiRoute { handle: index, address, data })
    }
    fn retarget_msi(&self, requester_id: u16, handle: u16, vector: u8, destination: u32) -> Result<(), UnitError> {
        self.unit.lock().retarget_interrupt(requester_id, handle, vector, destination)
    }
    fn free_msi(&self, requester_id: u16, handle: u16) -> Result<(), UnitError> {
        self.unit.lock().unroute_interrupt(requester_id, handle)
    }
    fn invalidation_waits(&self) -> u64 {
        self.unit.lock().stats.waits
    }
    /// An entry in the table of device id `source_id` (the IVRS's IOAPIC
    /// special entry), made as an MSI's; the redirection entry carries its
    /// index in the vector field. The entries have no trigger mode: the
    /// delivered interrupt keeps the message's.
    fn route_ioapic(&self, source_id: u16, pin: PinMode, vector: u8, destination: u32) -> Result<IoapicRte, UnitError> {
        let r = self.route_msi(source_id, vector, destination)?;
        match crate::irte::ioapic_rte(r.handle, pin) {
            Some(rte) => Ok(IoapicRte { handle: r.handle, rte }),
            None => {
                let _ = self.free_msi(source_id, r.handle);
                Err(UnitError { unit: self.base, cause: HwError::TableFull })
            }
        }
    }
    /// The entry changes; the redirection entry stays as it is.
    fn retarget_ioapic(
        &self,
        source_id: u16,
        handle: u16,
        pin: PinMode,
        vector: u8,
        destination: u32,
    ) -> Result<IoapicRte, UnitError> {
        let rte = crate::irte::ioapic_rte(handle, pin)
            .ok_or(UnitError { unit: self.base, cause: HwError::Invalid("retarget of a route that does not exist") })?;
        self.retarget_msi(source_id, handle, vector, destination)?;
        Ok(IoapicRte { handle, rte })
    }
}

/// IOTLB invalidation of one AMD-Vi domain through its unit.
pub struct AmdInvalidator<M: Mmio, T: ContiguousMemory, C: Clock> {
    unit: Arc<Shared<M, T, C>>,
    domain_id: u16,
    /// The unit caches not-present entries (PCI capability NpCache): a
    /// map must then be invalidated too.
    np_cache: bool,
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> fmt::Debug for AmdInvalidator<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmdInvalidator(domain {})", self.domain_id)
    }
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> Invalidator for AmdInvalidator<M, T, C> {
    fn invalidate(&mut self, start: u64, last: u64, _tables_freed: bool) -> Result<(), DomainError> {
        // INVALIDATE_IOMMU_PAGES always drops the page-directory entries
        // the range covers (PDE = 1), freed tables included.
        self.unit.unit.lock().invalidate_range(self.domain_id, start, last).map_err(DomainError::from)
    }
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        self.unit.unit.lock().set_dirty_tracking(self.domain_id, enable).map_err(DomainError::from)
    }
    fn mapped(&mut self, iova: u64, last: u64) -> Result<(), DomainError> {
        self.mapped_shared(iova, last)
    }
    /// Commands go through the unit's lock: callers need no other.
    fn concurrent(&self) -> bool {
        true
    }
    fn invalidate_shared(&self, start: u64, last: u64, _tables_freed: bool) -> Result<(), DomainError> {
        // As `invalidate`: PDE = 1 covers freed tables.
        self.unit.unit.lock().invalidate_range(self.domain_id, start, last).map_err(DomainError::from)
    }
    fn mapped_shared(&self, iova: u64, last: u64) -> Result<(), DomainError> {
        if self.np_cache { self.invalidate_shared(iova, last, false) } else { Ok(()) }
    }
}

/// An AMD v1 paging domain on one unit.
pub struct AmdDomain<M: Mmio, T: ContiguousMemory, C: Clock> {
    paging: PagingDomain<AmdV1, T, AmdInvalidator<M, T, C>>,
    domain_id: u16,
    unit: Arc<Shared<M, T, C>>,
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> fmt::Debug for AmdDomain<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmdDomain(id {}, unit @{:#x})", self.domain_id, self.unit.base)
    }
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> AmdDomain<M, T, C> {
    /// The page table.
    pub fn paging(&self) -> &PagingDomain<AmdV1, T, AmdInvalidator<M, T, C>> {
        &self.paging
    }
}

impl<M, T, C> IommuDomain for AmdDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: ContiguousMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    portcullis_iommu::forward_paging!(paging);
    /// The unit's entry only (the generic `Domain` maps firmware ranges
    /// first); a device of another unit is not checked here.
    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        let r = RequesterRef::from_handle(device).ok_or(DomainError::Incompatible)?;
        self.attach_requester(r.requester_id).map_err(DomainError::from)
    }
    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        let r = RequesterRef::from_handle(device).ok_or(DomainError::Incompatible)?;
        self.detach_requester(r.requester_id).map_err(DomainError::from)
    }
}

/// PASIDs are not translated: `attach_pasid`/`detach_pasid` keep the
/// trait's `Unsupported` default and the unit reports a PASID width of 0.
/// AMD-Vi translates requests with a PASID through a per-device GCR3 table
/// of guest CR3 roots (device table entry GV, GLX, GCR3 root), which this
/// driver does not build; that is out of scope here.
impl<M, T, C> UnitDomain for AmdDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: ContiguousMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn domain_id(&self) -> u16 {
        self.domain_id
    }
    fn unit_base(&self) -> u64 {
        self.unit.base
    }
    fn attach_requester(&self, requester_id: u16) -> Result<(), UnitError> {
        let t = self.paging.table();
        let (root, levels) = (t.root(), t.format().levels());
        let dirty = self.paging.dirty_tracking();
        self.unit.unit.lock().attach_dirty(requester_id, root, levels, self.domain_id, dirty)
    }
    fn detach_requester(&self, requester_id: u16) -> Result<(), UnitError> {
        self.unit.unit.lock().detach(requester_id)
    }
    fn page_size(&self, iova: u64) -> Option<u64> {
        self.paging.table().page_size(iova)
    }
    fn table_info(&self) -> TableInfo {
        let t = self.paging.table();
        TableInfo { root: t.root(), levels: t.format().levels(), format: "AMD v1" }
    }
}

impl<M: Mmio, T: ContiguousMemory, C: Clock> Drop for AmdDomain<M, T, C> {
    /// Devices still attached are blocked first (their owner dropped the
    /// domain without detaching them), then nothing of this domain may
    /// stay cached under its id. The id is reused, and the page tables
    /// freed, only when the unit confirmed all of that: otherwise a
    /// device may still walk them, so both are kept for good.
    fn drop(&mut self) {
        let mut u = self.unit.unit.lock();
        let clean = u.detach_domain(self.domain_id).and_then(|()| u.invalidate_range(self.domain_id, 0, u64::MAX));
        if clean.is_ok() {
            u.free_domain_id(self.domain_id);
        } else {
            drop(u);
            self.paging.table_mut().keep_tables();
        }
    }
}
