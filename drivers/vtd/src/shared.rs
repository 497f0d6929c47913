//! A VT-d unit behind the vendor-generic traits of `portcullis_iommu::unit`:
//! [`Shared`] (one running DRHD, its state under a lock) and [`VtdDomain`]
//! (a page table in the stage the unit translates with, invalidated through
//! the unit).
//!
//! Choices made here from the unit's capabilities, so no caller repeats
//! them: the mode a unit runs in ([`Mode::best`]), the stage and table
//! depth of a new domain ([`Stage::default_for`]), which invalidation a
//! map needs (caching mode: the range; a write buffer: its flush), and
//! whether interrupt remapping is turned on at bring-up.

use crate::ir::{ioapic_rte, msi_address};
use crate::{Caps, Clock, Unit, regs};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::{ContiguousMemory, Invalidator, PagingDomain, PtFormat, TableMemory, VtdSecondStage, X86FirstStage};
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::unit::{
    DmaFault, FirmwareRange, IoapicRte, IommuUnit, MsiRoute, PinMode, TableInfo, UnitDomain, Vendor,
};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain, Prot, RequesterRef, UnitError};
use spin::Mutex;

/// `IOMMU_HW_INFO_TYPE_INTEL_VTD` of Linux's uAPI.
pub const HW_INFO_TYPE_INTEL_VTD: u32 = 1;

/// How a unit is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Legacy root/context tables; queued invalidation when the unit has
    /// it and `queued`, register-based otherwise.
    Legacy {
        /// Use the invalidation queue when ECAP.QI.
        queued: bool,
    },
    /// Scalable-mode root/context/PASID tables with 256-bit queued
    /// invalidation (ECAP.SMTS and ECAP.QI needed).
    Scalable,
}

impl Mode {
    /// Scalable when the unit offers it, legacy with queued invalidation
    /// otherwise.
    pub fn best(caps: Caps) -> Self {
        if caps.scalable() && caps.qi() { Self::Scalable } else { Self::Legacy { queued: true } }
    }
}

/// Which translation a domain's page table feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// VT-d second-stage tables (legacy mode, or a scalable-mode PASID
    /// entry with PGTT = second-stage).
    Second,
    /// x86 first-stage (CPU-format) tables behind a scalable-mode PASID
    /// entry with PGTT = first-stage.
    First,
}

impl Stage {
    /// The stage a new domain gets: second-stage where the unit translates
    /// with it (legacy mode always does), first-stage on a scalable unit
    /// that only has first-stage (QEMU `x-flts=on`).
    pub fn default_for(caps: Caps, scalable: bool) -> Option<Self> {
        if !scalable || caps.second_stage() {
            Some(Self::Second)
        } else if caps.first_stage() {
            Some(Self::First)
        } else {
            None
        }
    }
}

fn fault(r: &crate::FaultRecord) -> DmaFault {
    DmaFault { requester_id: r.source_id, address: r.address, write: r.write, reason: r.reason }
}

/// How [`Shared::bring_up_with`] brings a unit up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BringUp {
    /// The mode (`None`: the best the unit offers, [`Mode::best`]).
    pub mode: Option<Mode>,
    /// Interrupt remapping with x2APIC destinations (IRTA.EIME, 32-bit
    /// APIC ids), for a kernel running its local APICs in x2APIC mode.
    /// Needs ECAP.EIM where the unit remaps interrupts.
    pub x2apic: bool,
}

/// One running VT-d unit, shared by its domains and devices.
pub struct Shared<M: Mmio, T: TableMemory, C: Clock> {
    base: u64,
    unit: Mutex<Unit<M, T, C>>,
}

impl<M: Mmio, T: TableMemory, C: Clock> fmt::Debug for Shared<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VT-d unit @{:#x}", self.base)
    }
}

impl<M, T, C> Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Brings up the unit at register base `base`: translation on in
    /// `mode` (the best it offers when `None`), every device blocked, and
    /// interrupt remapping on with an empty table (xAPIC destinations)
    /// where the unit has it and runs its queue, so no device MSI passes
    /// until routed.
    pub fn bring_up(base: u64, mmio: M, mem: T, clock: C, mode: Option<Mode>) -> Result<Arc<Self>, UnitError>
    where
        T: ContiguousMemory,
    {
        Self::bring_up_with(base, mmio, mem, clock, BringUp { mode, x2apic: false })
    }

    /// As [`Self::bring_up`], with `options`: with `options.x2apic` the
    /// interrupt remapping table takes 32-bit x2APIC destinations
    /// (IRTA.EIME), and a unit that remaps interrupts without extended
    /// interrupt mode (ECAP.EIM) is an error naming it rather than a unit
    /// whose routes could not reach the kernel's CPUs.
    pub fn bring_up_with(base: u64, mmio: M, mem: T, clock: C, options: BringUp) -> Result<Arc<Self>, UnitError>
    where
        T: ContiguousMemory,
    {
        let caps = Caps { cap: mmio.get64(regs::CAP), ecap: mmio.get64(regs::ECAP) };
        let remaps = caps.interrupt_remapping();
        if remaps && options.x2apic && !caps.eim() {
            return Err(UnitError {
                unit: base,
                cause: portcullis_iommu::HwError::Unsupported(
                    "x2APIC destinations need extended interrupt mode (ECAP.EIM)",
                ),
            });
        }
        let mut unit = Unit::new(base, mmio, mem, clock)?;
        match options.mode.unwrap_or(Mode::best(caps)) {
            Mode::Legacy { queued } => unit.enable(queued),
            Mode::Scalable => unit.enable_scalable(),
        }?;
        if remaps && unit.queued() {
            unit.enable_interrupt_remapping_with(options.x2apic)?;
        }
        Ok(Arc::new(Self { base, unit: Mutex::new(unit) }))
    }

    /// The driver's unit, for what the generic traits do not cover
    /// (reports, the fault event interrupt, register-level tests).
    pub fn lock(&self) -> spin::MutexGuard<'_, Unit<M, T, C>> {
        self.unit.lock()
    }

    /// The table entry of an IOAPIC pin's route: as an MSI's (in the
    /// table's destination format, x2APIC or not), with the pin's trigger
    /// mode.
    fn ioapic_entry(
        &self,
        source_id: u16,
        pin: PinMode,
        vector: u8,
        destination: u32,
    ) -> Result<crate::ir::Irte, UnitError> {
        Ok(self.unit.lock().route_entry(vector, destination, source_id)?.with_level(pin.level))
    }

    /// Whether domains of this unit can track dirty pages: a scalable-mode
    /// unit translating with second-stage tables (ECAP.SSTS) that records
    /// second-stage accessed/dirty bits (ECAP.SSADS), turned on per PASID
    /// entry by SSADE.
    pub fn can_track_dirty(&self) -> bool {
        let u = self.unit.lock();
        let caps = u.caps();
        u.is_scalable() && caps.second_stage() && caps.dirty_tracking()
    }

    /// A new empty second-stage domain that can track dirty pages
    /// ([`Self::can_track_dirty`]; refused otherwise): its format reads
    /// and clears D (bit 9) of its leaves, and devices attached while
    /// tracking is on get SSADE in their PASID entry.
    pub fn new_dirty_domain(self: &Arc<Self>) -> Result<VtdDomain<M, T, C>, UnitError> {
        if !self.can_track_dirty() {
            return Err(UnitError {
                unit: self.base,
                cause: portcullis_iommu::HwError::Unsupported(
                    "dirty tracking needs scalable mode, second-stage translation and ECAP.SSADS",
                ),
            });
        }
        self.new_domain_with(Stage::Second, true)
    }

    /// A new empty domain in `stage`.
    pub fn new_domain_in(self: &Arc<Self>, stage: Stage) -> Result<VtdDomain<M, T, C>, UnitError> {
        self.new_domain_with(stage, false)
    }

    fn new_domain_with(self: &Arc<Self>, stage: Stage, dirty: bool) -> Result<VtdDomain<M, T, C>, UnitError> {
        let base = self.base;
        let bad = |what| UnitError { unit: base, cause: portcullis_iommu::HwError::Unsupported(what) };
        let (caps, scalable, mem, did) = {
            let mut u = self.unit.lock();
            let did = u.alloc_did()?;
            (u.caps(), u.is_scalable(), u.memory().clone(), did)
        };
        let inv = UnitInvalidator { unit: self.clone(), did, stage, caching_mode: caps.caching_mode() };
        let paging = match stage {
            Stage::Second if scalable && !caps.second_stage() => {
                Err(bad("the unit has no second-stage translation (ECAP.SSTS)"))
            }
            Stage::Second => VtdSecondStage::from_caps(
                caps.sagaw_widths(),
                caps.mgaw(),
                caps.second_stage_2m(),
                caps.second_stage_1g(),
                caps.snoop_control(),
            )
            .map(|f| f.with_dirty_tracking(dirty))
            .ok_or(bad("no second-stage width the engine supports"))
            .and_then(|f| {
                PagingDomain::new(f, mem, inv)
                    .map_err(|_| UnitError { unit: base, cause: portcullis_iommu::HwError::NoMemory })
            })
            .map(Paging::Second),
            Stage::First if !scalable || !caps.first_stage() => {
                Err(bad("first-stage translation needs a scalable-mode unit with ECAP.FSTS"))
            }
            Stage::First => {
                // Supervisor requests are off in the PASID entry, so every
                // level carries U/S; 4-level paging (48-bit).
                let f = X86FirstStage::four_level().with_user(true).with_1g_pages(caps.first_stage_1g());
                PagingDomain::new(f, mem, inv)
                    .map_err(|_| UnitError { unit: base, cause: portcullis_iommu::HwError::NoMemory })
                    .map(Paging::First)
            }
        };
        match paging {
            Ok(paging) => Ok(VtdDomain { paging, did, unit: self.clone() }),
            Err(e) => {
                self.unit.lock().free_did(did);
                Err(e)
            }
        }
    }
}

impl<M, T, C> IommuUnit for Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn base(&self) -> u64 {
        self.base
    }
    fn vendor(&self) -> Vendor {
        Vendor::IntelVtd
    }
    fn new_domain(self: Arc<Self>) -> Result<Box<dyn UnitDomain>, UnitError> {
        let stage = {
            let u = self.unit.lock();
            Stage::default_for(u.caps(), u.is_scalable())
        }
        .ok_or(UnitError { unit: self.base, cause: portcullis_iommu::HwError::Unsupported("no translation stage") })?;
        Ok(Box::new(self.new_domain_in(stage)?))
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
        let mut u = self.unit.lock();
        let did = u.pass_through_did()?;
        u.pass_through(requester_id, did)
    }
    fn firmware_ranges(&self, requester_id: u16) -> Vec<FirmwareRange> {
        self.unit
            .lock()
            .rmrrs_for(requester_id)
            .into_iter()
            .map(|(start, last)| FirmwareRange {
                requester_id,
                range: portcullis_iommu::IovaRange { start, last },
                prot: Prot::RW,
            })
            .collect()
    }
    fn set_firmware_ranges(&self, ranges: Vec<FirmwareRange>) {
        self.unit.lock().set_rmrrs(ranges.into_iter().map(|f| (f.requester_id, f.range.start, f.range.last)).collect());
    }
    fn poll_faults(&self) -> Vec<DmaFault> {
        self.unit.lock().poll_faults().iter().map(fault).collect()
    }
    fn fault_log(&self) -> (Vec<DmaFault>, u64) {
        let u = self.unit.lock();
        let (log, overflows) = u.fault_log();
        (log.iter().map(fault).collect(), overflows)
    }
    fn remaps_interrupts(&self) -> bool {
        self.unit.lock().interrupt_remapping_on()
    }
    /// The table runs with IRTA.EIME clear (xAPIC destinations): an APIC
    /// id beyond 8 bits cannot be named and is refused, never truncated
    /// (which would deliver the interrupt to another CPU).
    fn route_msi(&self, requester_id: u16, vector: u8, destination: u32) -> Result<MsiRoute, UnitError> {
        let mut u = self.unit.lock();
        // An id the table's format cannot hold is refused, not truncated.
        let entry = u.route_entry(vector, destination, requester_id)?;
        let index = u.install_irte(entry)?;
        Ok(MsiRoute { handle: index, address: msi_address(index), data: 0 })
    }
    fn retarget_msi(&self, requester_id: u16, handle: u16, vector: u8, destination: u32) -> Result<(), UnitError> {
        let mut u = self.unit.lock();
        match u.irte(handle) {
            Some(e) if e.present() && e.sid() == requester_id => {}
            _ => return Err(u.err_invalid("retarget of a route this requester does not hold")),
        }
        let entry = u.route_entry(vector, destination, requester_id)?;
        u.retarget_irte(handle, entry)
    }
    fn free_msi(&self, _requester_id: u16, handle: u16) -> Result<(), UnitError> {
        self.unit.lock().free_irte(handle)
    }
    /// As Linux's VT-d driver: `IOMMU_HW_INFO_TYPE_INTEL_VTD` with the
    /// capability registers (`struct iommu_hw_info_vtd`: flags, reserved,
    /// CAP, ECAP; no errata flags).
    fn hw_info(&self) -> (u32, Vec<u8>) {
        let caps = self.unit.lock().caps();
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&caps.cap.to_le_bytes());
        b.extend_from_slice(&caps.ecap.to_le_bytes());
        (HW_INFO_TYPE_INTEL_VTD, b)
    }
    /// An entry as [`Self::route_msi`] makes it (source id `source_id`,
    /// all 16 bits verified), with the pin's trigger mode, and the
    /// remappable redirection entry naming it.
    fn route_ioapic(&self, source_id: u16, pin: PinMode, vector: u8, destination: u32) -> Result<IoapicRte, UnitError> {
        let entry = self.ioapic_entry(source_id, pin, vector, destination)?;
        let mut u = self.unit.lock();
        let index = u.install_irte(entry)?;
        Ok(IoapicRte { handle: index, rte: ioapic_rte(index, vector, pin) })
    }
    fn retarget_ioapic(
        &self,
        source_id: u16,
        handle: u16,
        pin: PinMode,
        vector: u8,
        destination: u32,
    ) -> Result<IoapicRte, UnitError> {
        let entry = self.ioapic_entry(source_id, pin, vector, destination)?;
        let mut u = self.unit.lock();
        match u.irte(handle) {
            Some(e) if e.present() && e.sid() == source_id => {}
            _ => return Err(u.err_invalid("retarget of a route this source does not hold")),
        }
        u.retarget_irte(handle, entry)?;
        Ok(IoapicRte { handle, rte: ioapic_rte(handle, vector, pin) })
    }
    fn invalidation_waits(&self) -> u64 {
        self.unit.lock().stats.waits
    }
    fn attach_external(&self, requester_id: u16, root: u64) -> Result<u16, UnitError> {
        self.attach_external_table(requester_id, root)
    }
    fn invalidate_external(&self, did: u16, start: u64, last: u64) -> Result<(), UnitError> {
        self.invalidate_external_table(did, start, last)
    }
    fn detach_external(&self, requester_id: u16, did: u16) -> Result<(), UnitError> {
        self.detach_external_table(requester_id, did)
    }
    /// [`Unit::max_pasid_log2`]: the same for every requester id.
    fn max_pasid_log2(&self, _requester_id: u16) -> u32 {
        self.unit.lock().max_pasid_log2()
    }
}

/// IOTLB invalidation of one domain through its unit.
pub struct UnitInvalidator<M: Mmio, T: TableMemory, C: Clock> {
    unit: Arc<Shared<M, T, C>>,
    did: u16,
    stage: Stage,
    caching_mode: bool,
}

impl<M: Mmio, T: TableMemory, C: Clock> fmt::Debug for UnitInvalidator<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitInvalidator(did {}, {:?} stage)", self.did, self.stage)
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> UnitInvalidator<M, T, C> {
    fn range(&self, start: u64, last: u64, leaf_only: bool) -> Result<(), DomainError> {
        let mut u = self.unit.unit.lock();
        // First-stage translations are cached under (DID, PASID): only
        // PASID-based IOTLB invalidation reaches them.
        match self.stage {
            Stage::Second => u.invalidate_range(self.did, start, last, leaf_only),
            Stage::First => u.invalidate_range_pasid(self.did, start, last, leaf_only),
        }
        .map_err(DomainError::from)
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> Invalidator for UnitInvalidator<M, T, C> {
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        self.range(start, last, !tables_freed)
    }
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        self.unit.unit.lock().set_dirty_tracking(self.did, enable).map_err(DomainError::from)
    }
    fn mapped(&mut self, iova: u64, last: u64) -> Result<(), DomainError> {
        self.mapped_shared(iova, last)
    }
    /// Commands go through the unit's lock: callers need no other.
    fn concurrent(&self) -> bool {
        true
    }
    fn invalidate_shared(&self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        self.range(start, last, !tables_freed)
    }
    fn mapped_shared(&self, iova: u64, last: u64) -> Result<(), DomainError> {
        // Caching mode: the unit may have cached the not-present entries.
        if self.caching_mode {
            self.range(iova, last, false)
        } else {
            self.unit.unit.lock().flush_write_buffer().map_err(DomainError::from)
        }
    }
}

/// A domain's page table in the format of its stage.
pub enum Paging<M: Mmio, T: TableMemory, C: Clock> {
    /// VT-d second-stage format.
    Second(PagingDomain<VtdSecondStage, T, UnitInvalidator<M, T, C>>),
    /// x86 first-stage format.
    First(PagingDomain<X86FirstStage, T, UnitInvalidator<M, T, C>>),
}

impl<M: Mmio, T: TableMemory, C: Clock> fmt::Debug for Paging<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Second(_) => write!(f, "Paging(second stage)"),
            Self::First(_) => write!(f, "Paging(first stage)"),
        }
    }
}

/// Evaluates `$e` with `$d` bound to whichever paging domain `$p` holds.
macro_rules! each {
    ($p:expr, $d:ident => $e:expr) => {
        match $p {
            Paging::Second($d) => $e,
            Paging::First($d) => $e,
        }
    };
}

/// A VT-d domain: its page table, domain id and unit.
pub struct VtdDomain<M: Mmio, T: TableMemory, C: Clock> {
    paging: Paging<M, T, C>,
    did: u16,
    unit: Arc<Shared<M, T, C>>,
}

impl<M: Mmio, T: TableMemory, C: Clock> fmt::Debug for VtdDomain<M, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VtdDomain(did {}, {:?} stage, unit @{:#x})", self.did, self.stage(), self.unit.base)
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> VtdDomain<M, T, C> {
    /// Its stage.
    pub fn stage(&self) -> Stage {
        match self.paging {
            Paging::Second(_) => Stage::Second,
            Paging::First(_) => Stage::First,
        }
    }
    /// The page table.
    pub fn paging(&self) -> &Paging<M, T, C> {
        &self.paging
    }
    fn root_levels(&self) -> (u64, u32) {
        each!(&self.paging, d => (d.table().root(), d.table().format().levels()))
    }
}

impl<M, T, C> VtdDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn inner(&self) -> &dyn IommuDomain {
        each!(&self.paging, d => d)
    }
    fn inner_mut(&mut self) -> &mut dyn IommuDomain {
        each!(&mut self.paging, d => d)
    }
}

impl<M, T, C> IommuDomain for VtdDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    portcullis_iommu::forward_paging!(fn inner, inner_mut);
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
    /// [`UnitDomain::attach_pasid`]; a unit that takes no PASIDs (legacy
    /// mode, no ECAP.PASID) is `NotSupported`.
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let r = RequesterRef::from_handle(device).ok_or(DomainError::Incompatible)?;
        self.attach_pasid(r.requester_id, pasid).map_err(pasid_error)
    }
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let r = RequesterRef::from_handle(device).ok_or(DomainError::Incompatible)?;
        self.detach_pasid(r.requester_id, pasid).map_err(pasid_error)
    }
}

fn pasid_error(e: UnitError) -> DomainError {
    match e.cause {
        portcullis_iommu::HwError::Unsupported(_) => DomainError::NotSupported,
        portcullis_iommu::HwError::Invalid(_) => DomainError::Incompatible,
        _ => e.into(),
    }
}

impl<M, T, C> UnitDomain for VtdDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn domain_id(&self) -> u16 {
        self.did
    }
    fn unit_base(&self) -> u64 {
        self.unit.base
    }
    fn attach_requester(&self, requester_id: u16) -> Result<(), UnitError> {
        let (root, levels) = self.root_levels();
        let tracking = each!(&self.paging, d => d.dirty_tracking());
        let mut u = self.unit.unit.lock();
        match self.stage() {
            Stage::Second => u.attach_dirty(requester_id, root, levels, self.did, tracking),
            Stage::First => u.attach_first_stage(requester_id, root, levels, self.did),
        }
    }
    fn detach_requester(&self, requester_id: u16) -> Result<(), UnitError> {
        self.unit.unit.lock().detach(requester_id)
    }
    /// Scalable mode with ECAP.PASID: the PASID's entry in this domain's
    /// stage and domain id ([`Unit::attach_pasid_second_stage`],
    /// [`Unit::attach_pasid_first_stage`]); SSADE follows the domain's
    /// dirty tracking.
    fn attach_pasid(&self, requester_id: u16, pasid: u32) -> Result<(), UnitError> {
        let (root, levels) = self.root_levels();
        let tracking = each!(&self.paging, d => d.dirty_tracking());
        let mut u = self.unit.unit.lock();
        match self.stage() {
            Stage::Second => u.attach_pasid_second_stage(requester_id, pasid, root, levels, self.did, tracking),
            Stage::First => u.attach_pasid_first_stage(requester_id, pasid, root, levels, self.did),
        }
    }
    fn detach_pasid(&self, requester_id: u16, pasid: u32) -> Result<(), UnitError> {
        self.unit.unit.lock().detach_pasid(requester_id, pasid, self.did)
    }
    fn page_size(&self, iova: u64) -> Option<u64> {
        each!(&self.paging, d => d.table().page_size(iova))
    }
    fn table_info(&self) -> TableInfo {
        let (root, levels) = self.root_levels();
        let format = match self.stage() {
            Stage::Second => "VT-d second stage",
            Stage::First => "x86 first stage",
        };
        TableInfo { root, levels, format }
    }
}

impl<M: Mmio, T: TableMemory, C: Clock> Drop for VtdDomain<M, T, C> {
    /// Requesters and PASIDs still attached are blocked first (their
    /// owner dropped the domain without detaching them), then everything
    /// cached under the domain id is dropped. The id is reused, and the
    /// page tables freed, only when the unit confirmed all of that:
    /// otherwise a device may still walk them, so both are kept for good.
    fn drop(&mut self) {
        let mut u = self.unit.unit.lock();
        let detached = u.detach_domain(self.did);
        let clean = detached.and_then(|()| match self.stage() {
            Stage::Second => u.invalidate_range(self.did, 0, u64::MAX, false),
            Stage::First => u.invalidate_range_pasid(self.did, 0, u64::MAX, false),
        });
        if clean.is_ok() {
            u.free_did(self.did);
        } else {
            drop(u);
            each!(&mut self.paging, d => d.table_mut().keep_tables());
        }
    }
}
