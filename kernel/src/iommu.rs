//! The kernel's side of the IOMMU drivers: register access over uncached
//! MMIO, page-table memory over frames, the clock, and VT-d domains that
//! iommufd (or a test) can use.
//!
//! This is the only place IOMMU-related `unsafe` lives: volatile register
//! accesses and table reads/writes through the direct map, each on memory
//! this module owns (a mapped register block, frames it allocated).

use crate::mem::{alloc_frames, free_frames, map_mmio, phys_to_virt};
use alloc::string::String;
use alloc::sync::Arc;
use io_pgtable::{Invalidator, PagingDomain, TableMemory, VtdSecondStage, X86FirstStage};
use spin::Mutex;

/// A unit's register block, mapped uncached.
#[derive(Debug, Clone, Copy)]
pub struct KernelMmio {
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer is to device registers mapped for the kernel's whole
// lifetime; register accesses are independent volatile operations.
unsafe impl Send for KernelMmio {}
// SAFETY: as above.
unsafe impl Sync for KernelMmio {}

impl KernelMmio {
    /// Maps `len` bytes of registers at physical `base`.
    pub fn map(base: u64, len: usize) -> Result<Self, crate::mem::paging::MapError> {
        Ok(Self { base: map_mmio(base, len as u64)?, len })
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(offset + core::mem::size_of::<T>() <= self.len, "register offset {offset:#x} outside the block");
        assert!(offset.is_multiple_of(core::mem::size_of::<T>()), "misaligned register access at {offset:#x}");
        // In bounds of the mapping, checked above.
        self.base.wrapping_add(offset).cast()
    }
}

impl vtd::regs::Mmio for KernelMmio {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `at` checked the offset lies in the mapped, aligned block.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }
    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as for read32.
        unsafe { self.at::<u64>(offset).read_volatile() }
    }
    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as for read32; writing an IOMMU register affects DMA only.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }
    fn write64(&self, offset: usize, value: u64) {
        // SAFETY: as for write32.
        unsafe { self.at::<u64>(offset).write_volatile(value) }
    }
}

/// Page-table (and root/context/queue) memory: one frame per table,
/// reached through the direct map.
#[derive(Debug, Clone, Copy)]
pub struct FrameTables {
    coherent: bool,
}

impl FrameTables {
    /// Tables for a walker that does (`coherent`) or does not snoop.
    pub fn new(coherent: bool) -> Self {
        Self { coherent }
    }
}

impl TableMemory for FrameTables {
    fn alloc_table(&mut self) -> Option<u64> {
        alloc_frames(1, 4096).ok()
    }
    fn free_table(&mut self, table: u64) {
        // A table we did not allocate is a driver bug; keep going.
        let _ = free_frames(table, 1);
    }
    fn read(&self, table: u64, index: usize) -> u64 {
        assert!(index < 512);
        // SAFETY: `table` is a frame from alloc_table (RAM, direct-mapped);
        // the hardware may write it (status words), hence volatile.
        unsafe { phys_to_virt(table).cast::<u64>().add(index).read_volatile() }
    }
    fn write(&mut self, table: u64, index: usize, value: u64) {
        assert!(index < 512);
        // SAFETY: as for read; entries are written whole.
        unsafe { phys_to_virt(table).cast::<u64>().add(index).write_volatile(value) }
    }
    fn coherent(&self) -> bool {
        self.coherent
    }
    fn flush(&mut self, phys: u64, len: u64) {
        let start = phys & !63;
        let mut line = start;
        while line < phys + len {
            // SAFETY: clflush of a direct-mapped RAM line has no effect on
            // memory contents; the line lies in a table frame we own.
            unsafe { core::arch::x86_64::_mm_clflush(phys_to_virt(line)) };
            line += 64;
        }
        // SAFETY: a fence orders the flushes before later device-visible
        // writes (the register write that makes the hardware look).
        unsafe { core::arch::x86_64::_mm_mfence() };
    }
}

/// The kernel clock for hardware timeouts.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelClock;

impl vtd::Clock for KernelClock {
    fn now_ns(&self) -> u64 {
        crate::time::uptime_ns()
    }
}

/// A VT-d unit as the kernel runs it.
pub type VtdUnit = vtd::Unit<KernelMmio, FrameTables, KernelClock>;

/// A shared unit (domains invalidate through it).
pub type SharedUnit = Arc<Mutex<VtdUnit>>;

/// How a unit is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitMode {
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

impl UnitMode {
    /// The mode a kernel runs a unit in: scalable when the unit offers it,
    /// legacy with queued invalidation otherwise.
    pub fn best(caps: vtd::Caps) -> Self {
        if caps.scalable() && caps.qi() { Self::Scalable } else { Self::Legacy { queued: true } }
    }
}

/// Brings up the VT-d unit at `base` (translation on, every device
/// blocked) in the best mode it offers (see [`UnitMode::best`]).
pub fn vtd_unit(name: String, base: u64) -> Result<SharedUnit, String> {
    vtd_unit_in(name, base, None)
}

/// As [`vtd_unit`], in `mode` when given.
pub fn vtd_unit_in(name: String, base: u64, mode: Option<UnitMode>) -> Result<SharedUnit, String> {
    let mmio = KernelMmio::map(base, 0x1000).map_err(|e| alloc::format!("{name}: {e}"))?;
    let caps = vtd::Caps {
        cap: vtd::regs::Mmio::get64(&mmio, vtd::regs::CAP),
        ecap: vtd::regs::Mmio::get64(&mmio, vtd::regs::ECAP),
    };
    let mut unit = vtd::Unit::new(name, mmio, FrameTables::new(caps.coherent()), KernelClock)
        .map_err(|e| alloc::format!("{e}"))?;
    match mode.unwrap_or(UnitMode::best(caps)) {
        UnitMode::Legacy { queued } => unit.enable(queued),
        UnitMode::Scalable => unit.enable_scalable(),
    }
    .map_err(|e| alloc::format!("{e}"))?;
    Ok(Arc::new(Mutex::new(unit)))
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
    /// The stage a new domain on a unit gets: second-stage where the unit
    /// translates with it (legacy mode always does), first-stage on a
    /// scalable unit that only has first-stage (QEMU `x-flts=on`).
    pub fn default_for(unit: &VtdUnit) -> Option<Self> {
        let caps = unit.caps();
        if !unit.is_scalable() || caps.second_stage() {
            Some(Self::Second)
        } else if caps.first_stage() {
            Some(Self::First)
        } else {
            None
        }
    }
}

/// IOTLB invalidation of one domain through its unit.
pub struct UnitInvalidator {
    unit: SharedUnit,
    did: u16,
    stage: Stage,
    caching_mode: bool,
    /// The last invalidation error (an invalidator cannot return one).
    pub error: Option<String>,
}

impl core::fmt::Debug for UnitInvalidator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "UnitInvalidator(did {}, {:?} stage)", self.did, self.stage)
    }
}

impl UnitInvalidator {
    fn range(&mut self, start: u64, last: u64, leaf_only: bool) -> Result<(), portcullis_iommu::DomainError> {
        let mut u = self.unit.lock();
        // First-stage translations are cached under (DID, PASID): only
        // PASID-based IOTLB invalidation reaches them.
        let r = match self.stage {
            Stage::Second => u.invalidate_range(self.did, start, last, leaf_only),
            Stage::First => u.invalidate_range_pasid(self.did, start, last, leaf_only),
        };
        r.map_err(|e| {
            self.error = Some(alloc::format!("{e}"));
            portcullis_iommu::DomainError::Hardware {
                unit: 0,
                cause: portcullis_iommu::HwError::Timeout { register: "invalidation", waited_ns: 0 },
            }
        })
    }
}

impl Invalidator for UnitInvalidator {
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), portcullis_iommu::DomainError> {
        self.range(start, last, !tables_freed)
    }
    fn mapped(&mut self, iova: u64, last: u64) -> Result<(), portcullis_iommu::DomainError> {
        // Caching mode: the unit may have cached the not-present entries.
        if self.caching_mode {
            self.range(iova, last, false)
        } else {
            self.unit.lock().flush_write_buffer().map_err(|e| {
                self.error = Some(alloc::format!("{e}"));
                portcullis_iommu::DomainError::Hardware {
                    unit: 0,
                    cause: portcullis_iommu::HwError::Timeout { register: "write buffer", waited_ns: 0 },
                }
            })
        }
    }
}

/// The page table of a [`VtdDomain`], in the format its stage uses.
pub enum VtdPaging {
    /// VT-d second-stage format.
    Second(PagingDomain<VtdSecondStage, FrameTables, UnitInvalidator>),
    /// x86 first-stage format.
    First(PagingDomain<X86FirstStage, FrameTables, UnitInvalidator>),
}

/// Evaluates `$e` with `$d` bound to whichever paging domain `$p` holds.
macro_rules! each {
    ($p:expr, $d:ident => $e:expr) => {
        match $p {
            VtdPaging::Second($d) => $e,
            VtdPaging::First($d) => $e,
        }
    };
}

impl VtdPaging {
    /// Its stage.
    pub fn stage(&self) -> Stage {
        match self {
            Self::Second(_) => Stage::Second,
            Self::First(_) => Stage::First,
        }
    }
    /// Physical address of the top-level table.
    pub fn root(&self) -> u64 {
        each!(self, d => d.table().root())
    }
    /// Levels of the table.
    pub fn levels(&self) -> u32 {
        each!(self, d => io_pgtable::PtFormat::levels(d.table().format()))
    }
    /// Size of the page mapping `iova` (the walk), if mapped.
    pub fn page_size(&self, iova: u64) -> Option<u64> {
        each!(self, d => d.table().page_size(iova))
    }
    /// Translation and permission of `iova`, if mapped.
    pub fn translate(&self, iova: u64) -> Option<(u64, portcullis_iommu::Prot)> {
        each!(self, d => d.table().iova_to_phys(iova))
    }
    /// Bytes of page-table memory in use.
    pub fn table_bytes(&self) -> u64 {
        each!(self, d => d.table().table_bytes())
    }
    /// The last invalidation error, if any.
    pub fn invalidator_error(&self) -> Option<String> {
        each!(self, d => d.invalidator().error.clone())
    }
}

impl core::fmt::Debug for VtdPaging {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        each!(self, d => write!(f, "{:?} stage {:?}", self.stage(), d.table()))
    }
}

impl VtdPaging {
    fn inner(&self) -> &dyn portcullis_iommu::IommuDomain {
        each!(self, d => d)
    }
    fn inner_mut(&mut self) -> &mut dyn portcullis_iommu::IommuDomain {
        each!(self, d => d)
    }
}

impl portcullis_iommu::IommuDomain for VtdPaging {
    portcullis_iommu::forward_paging!(fn inner, inner_mut);
    fn attach_device(&mut self, device: portcullis_iommu::DeviceHandle) -> Result<(), portcullis_iommu::DomainError> {
        each!(self, d => d.attach_device(device))
    }
    fn detach_device(&mut self, device: portcullis_iommu::DeviceHandle) {
        each!(self, d => d.detach_device(device))
    }
}

/// A VT-d domain on one unit: a page table, its domain id, and the unit
/// whose IOTLB caches it.
pub struct VtdDomain {
    /// The page table and its invalidator.
    pub domain: VtdPaging,
    /// Its domain id on the unit.
    pub did: u16,
    unit: SharedUnit,
}

impl core::fmt::Debug for VtdDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VtdDomain(did {}, {:?})", self.did, self.domain)
    }
}

impl VtdDomain {
    /// An empty domain for `unit` in the stage it translates with by
    /// default ([`Stage::default_for`]), using the page sizes and widths
    /// the unit supports.
    pub fn new(unit: &SharedUnit) -> Result<Self, String> {
        let stage = Stage::default_for(&unit.lock()).ok_or_else(|| String::from("unit translates with no stage"))?;
        Self::with_stage(unit, stage)
    }

    /// An empty `stage` domain for `unit`.
    pub fn with_stage(unit: &SharedUnit, stage: Stage) -> Result<Self, String> {
        let (caps, scalable) = {
            let u = unit.lock();
            (u.caps(), u.is_scalable())
        };
        let mem = FrameTables::new(caps.coherent());
        let inv =
            |did| UnitInvalidator { unit: unit.clone(), did, stage, caching_mode: caps.caching_mode(), error: None };
        let did = unit.lock().alloc_did().map_err(|e| alloc::format!("{e}"))?;
        let domain = match stage {
            Stage::Second => {
                if scalable && !caps.second_stage() {
                    Err(String::from("the unit has no second-stage translation (ECAP.SSTS)"))
                } else {
                    let widths = [(1u8, 39u32), (2, 48), (3, 57)]
                        .into_iter()
                        .filter(|(b, _)| caps.sagaw() >> b & 1 != 0)
                        .map(|(_, w)| w);
                    let sllps = caps.sllps();
                    VtdSecondStage::from_caps(widths, caps.mgaw(), sllps & 1 != 0, sllps & 2 != 0, caps.snoop_control())
                        .ok_or_else(|| String::from("no second-stage width this engine supports"))
                        .and_then(|f| PagingDomain::new(f, mem, inv(did)).map_err(|e| alloc::format!("{e:?}")))
                        .map(VtdPaging::Second)
                }
            }
            Stage::First => {
                if !scalable || !caps.first_stage() {
                    Err(String::from("first-stage translation needs a scalable-mode unit with ECAP.FSTS"))
                } else {
                    // Supervisor requests are off in the PASID entry, so
                    // every level carries U/S; 4-level paging (48-bit).
                    let f = X86FirstStage::four_level().with_user(true).with_1g_pages(caps.first_stage_1g());
                    PagingDomain::new(f, mem, inv(did)).map_err(|e| alloc::format!("{e:?}")).map(VtdPaging::First)
                }
            }
        };
        match domain {
            Ok(domain) => Ok(Self { domain, did, unit: unit.clone() }),
            Err(e) => {
                unit.lock().free_did(did);
                Err(e)
            }
        }
    }

    /// Points device `sid` at this domain.
    pub fn attach(&self, sid: u16) -> Result<(), String> {
        let (root, levels) = (self.domain.root(), self.domain.levels());
        let mut u = self.unit.lock();
        match self.domain.stage() {
            Stage::Second => u.attach(sid, root, levels, self.did),
            Stage::First => u.attach_first_stage(sid, root, levels, self.did),
        }
        .map_err(|e| alloc::format!("{e}"))
    }

    /// Blocks device `sid` again.
    pub fn detach(&self, sid: u16) -> Result<(), String> {
        self.unit.lock().detach(sid).map_err(|e| alloc::format!("{e}"))
    }
}

pub(crate) use portcullis_iommu::identity_map_then;

/// A device behind a VT-d unit, as iommufd binds it: domains it gets are
/// VT-d second-stage domains on its unit; attaching programs its context
/// entry (under the requester id its DMA carries).
pub struct VtdDevice {
    unit: SharedUnit,
    unit_index: u16,
    requester_id: u16,
}

impl core::fmt::Debug for VtdDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VtdDevice(unit {}, rid {:#x})", self.unit_index, self.requester_id)
    }
}

impl VtdDevice {
    /// The device with requester id `requester_id` behind unit number
    /// `unit_index`.
    pub fn new(unit: SharedUnit, unit_index: u16, requester_id: u16) -> Self {
        Self { unit, unit_index, requester_id }
    }
}

/// The x86 interrupt window: DMA writes there are interrupt requests, so
/// no IOVA may be mapped there (Linux reports it as an MSI reserved region).
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

impl iommufd::ctx::DeviceOps for VtdDevice {
    fn handle(&self) -> portcullis_iommu::DeviceHandle {
        portcullis_iommu::DeviceHandle((self.unit_index as u64) << 16 | self.requester_id as u64)
    }
    fn alloc_domain(
        &self,
    ) -> Result<alloc::boxed::Box<dyn portcullis_iommu::IommuDomain>, portcullis_iommu::DomainError> {
        let inner = VtdDomain::new(&self.unit).map_err(|_| portcullis_iommu::DomainError::NoMemory)?;
        Ok(alloc::boxed::Box::new(VtdIommuDomain { inner, unit_index: self.unit_index }))
    }
    /// As Linux's VT-d driver: type `IOMMU_HW_INFO_TYPE_INTEL_VTD` with the
    /// unit's capability registers (no errata flags).
    fn hw_info(&self) -> (u32, alloc::vec::Vec<u8>) {
        use iommufd::uapi::{IOMMU_HW_INFO_TYPE_INTEL_VTD, IommuHwInfoVtd};
        let caps = self.unit.lock().caps();
        let info = IommuHwInfoVtd { flags: 0, __reserved: 0, cap_reg: caps.cap, ecap_reg: caps.ecap };
        (IOMMU_HW_INFO_TYPE_INTEL_VTD, info.to_bytes())
    }
    fn reserved_regions(&self) -> alloc::vec::Vec<(u64, u64)> {
        // The MSI window, and the device's RMRRs (mapped one-to-one by the
        // domain on attach, so the IOAS must not use them).
        let mut r = alloc::vec![MSI_WINDOW];
        r.extend(self.unit.lock().rmrrs_for(self.requester_id));
        r
    }
}

/// A [`VtdDomain`] behind the `IommuDomain` trait, programming context
/// entries on attach.
pub struct VtdIommuDomain {
    inner: VtdDomain,
    unit_index: u16,
}

impl core::fmt::Debug for VtdIommuDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VtdIommuDomain(unit {}, {:?})", self.unit_index, self.inner)
    }
}

impl VtdIommuDomain {
    /// The VT-d domain inside.
    pub fn vtd(&self) -> &VtdDomain {
        &self.inner
    }
}

impl portcullis_iommu::IommuDomain for VtdIommuDomain {
    portcullis_iommu::forward_paging!(inner.domain);
    fn attach_device(&mut self, device: portcullis_iommu::DeviceHandle) -> Result<(), portcullis_iommu::DomainError> {
        if (device.0 >> 16) as u16 != self.unit_index {
            return Err(portcullis_iommu::DomainError::Incompatible);
        }
        let sid = device.0 as u16;
        // RMRRs: identity-mapped before the device translates through the
        // domain (an unmapped RMRR would fault firmware's DMA).
        let rmrrs: alloc::vec::Vec<_> = self
            .inner
            .unit
            .lock()
            .rmrrs_for(sid)
            .into_iter()
            .map(|(b, l)| (b, l, portcullis_iommu::Prot::RW))
            .collect();
        identity_map_then(
            self,
            |s| &mut s.inner.domain,
            &rmrrs,
            |s| {
                s.inner.attach(sid).map_err(|_| portcullis_iommu::DomainError::Incompatible)?;
                s.inner.domain.attach_device(device)
            },
        )
    }
    fn detach_device(&mut self, device: portcullis_iommu::DeviceHandle) {
        let _ = self.inner.detach(device.0 as u16);
        self.inner.domain.detach_device(device);
    }
}

impl Drop for VtdDomain {
    /// The domain id is reused later: nothing of this domain may stay in
    /// the IOTLB under it.
    fn drop(&mut self) {
        let mut u = self.unit.lock();
        let _ = match self.domain.stage() {
            Stage::Second => u.invalidate_range(self.did, 0, u64::MAX, false),
            Stage::First => u.invalidate_range_pasid(self.did, 0, u64::MAX, false),
        };
        u.free_did(self.did);
    }
}

/// Every VT-d unit of the platform brought up (translation on, every
/// device blocked), with who owns which device.
pub struct VtdSystem {
    /// One entry per DRHD, in DMAR order: base and the unit or why not.
    pub units: alloc::vec::Vec<(u64, Result<SharedUnit, String>)>,
    /// Device ownership from the DMAR scopes.
    pub owners: alloc::collections::BTreeMap<(u16, crate::pci::Bdf), crate::ownership::Assignment>,
}

impl core::fmt::Debug for VtdSystem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VtdSystem({} units, {} devices)", self.units.len(), self.owners.len())
    }
}

impl VtdSystem {
    /// Brings up every DRHD of `p`'s DMAR (none without one) in the best
    /// mode each offers.
    pub fn bring_up(p: &crate::Platform) -> Option<Self> {
        Self::bring_up_in(p, None)
    }

    /// As [`Self::bring_up`], every unit in `mode` when given.
    pub fn bring_up_in(p: &crate::Platform, mode: Option<UnitMode>) -> Option<Self> {
        let Some(Ok(dmar)) = &p.dmar else { return None };
        let units = dmar
            .drhds()
            .map(|d| {
                let name = alloc::format!("DRHD @{:#x}", d.register_base);
                (d.register_base, vtd_unit_in(name, d.register_base, mode))
            })
            .collect();
        let (scopes, _) = crate::ownership::unit_scopes(dmar, &p.ecam);
        let owners = crate::ownership::assign(&scopes, &p.pci);
        let system = Self { units, owners };
        system.give_rmrrs(dmar, &p.ecam);
        system.remap_interrupts();
        Some(system)
    }

    /// Turns interrupt remapping on wherever the unit can (ECAP.IR with
    /// queued invalidation), with an empty table: until an entry routes it,
    /// every MSI from a device is blocked, so a device cannot raise an
    /// interrupt it was not given. The fault event is not remapped.
    fn remap_interrupts(&self) {
        for (_, unit) in &self.units {
            if let Ok(u) = unit {
                let mut u = u.lock();
                if u.caps().interrupt_remapping()
                    && u.queued()
                    && let Err(e) = u.enable_interrupt_remapping()
                {
                    log::warn!("{e}");
                }
            }
        }
    }

    /// Hands every unit the RMRRs of the devices it translates, under the
    /// requester id their DMA carries (scopes that name no enumerated
    /// function are logged and skipped).
    fn give_rmrrs(&self, dmar: &acpi_tables::dmar::Dmar, ecam: &crate::ecam::Ecam) {
        let mut per_unit: alloc::vec::Vec<alloc::vec::Vec<(u16, u64, u64)>> =
            alloc::vec![alloc::vec::Vec::new(); self.units.len()];
        for r in dmar.rmrrs() {
            for s in &r.scopes {
                match acpi_tables::scope::resolve(r.segment, s, ecam) {
                    Ok(b) => {
                        let bdf = crate::pci::Bdf { bus: b.bus, device: b.device, function: b.function };
                        match self.owners.get(&(r.segment, bdf)) {
                            Some(a) => per_unit[a.unit].push((a.requester_id, r.base, r.limit)),
                            None => log::warn!("RMRR [{:#x}-{:#x}]: {} has no VT-d unit", r.base, r.limit, bdf),
                        }
                    }
                    Err(e) => log::warn!("RMRR [{:#x}-{:#x}]: scope unresolved: {}", r.base, r.limit, e),
                }
            }
        }
        for ((_, unit), rmrrs) in self.units.iter().zip(per_unit) {
            if let Ok(u) = unit {
                u.lock().set_rmrrs(rmrrs);
            }
        }
    }
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
pub fn fault_events() -> u64 {
    FAULT_EVENTS.load(core::sync::atomic::Ordering::Acquire)
}

/// Makes `unit` signal recorded faults with an interrupt on `vector` to
/// this CPU (the option beside polling). The handler only counts events
/// ([`fault_events`]); the records are read by [`vtd::Unit::poll_faults`].
/// Several units may share a vector.
pub fn enable_fault_interrupt(unit: &SharedUnit, vector: u8) -> Result<(), String> {
    use crate::arch::irq;
    let (address, data) = irq::msi_for(vector).map_err(|e| alloc::format!("{e}"))?;
    if let Err(e) = irq::register(vector, fault_event_handler) {
        // The vector may already be ours (another unit); a foreign
        // handler is an error.
        if !irq::handler_is(vector, fault_event_handler) {
            return Err(alloc::format!("{e}"));
        }
    }
    unit.lock().enable_fault_event(address, data);
    Ok(())
}

/// Masks `unit`'s fault event interrupt again (polling only).
pub fn disable_fault_interrupt(unit: &SharedUnit) {
    unit.lock().mask_fault_event();
}
