//! The vendor-generic layer above the unit drivers: what a running IOMMU
//! unit offers ([`IommuUnit`]), the paging domains its driver makes
//! ([`UnitDomain`]), and the one domain and device type every user of a
//! unit goes through ([`Domain`], [`Device`]).
//!
//! ```text
//!   iommufd / passthrough ──► Device (DeviceOps) ──► Domain (IommuDomain)
//!                                     │                    │
//!                                     ▼                    ▼
//!                          Arc<dyn IommuUnit>   Box<dyn UnitDomain>
//!                          (vtd::Shared,         (the driver's page table,
//!                           amdvi::Shared)        format and stage chosen
//!                                                 by the driver)
//! ```
//!
//! What is vendor-neutral lives here once: firmware ranges identity-mapped
//! before an attach (and removed again if it fails), the MSI window kept out
//! of every IOAS, device handles naming (unit, requester id), and a
//! domain's refusal to accept a device of another unit. What differs per
//! vendor (format and stage choice from capabilities, how an attach is
//! written, invalidation commands, fault records, interrupt remapping
//! entries) stays in each driver behind these traits.
//!
//! Locking: a unit's state sits behind its own lock inside the driver's
//! `IommuUnit` implementation; a domain's invalidator takes that lock for
//! each command. Callers hold a domain's lock (iommufd's `DomainRef`) before
//! a unit's, never the other way round.

use crate::{DeviceHandle, DeviceOps, DomainError, IommuDomain, Prot, UnitError, identity_map_then};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

/// The x86 interrupt window `[0xfee0_0000, 0xfeef_ffff]`: DMA writes there
/// are interrupt requests, so no IOVA may be mapped there (Linux reports it
/// as an MSI reserved region).
pub const MSI_WINDOW: IovaRange = IovaRange { start: 0xfee0_0000, last: 0xfeef_ffff };

pub use crate::IovaRange;

/// Which IOMMU architecture a unit implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vendor {
    /// Intel VT-d (a DMAR DRHD).
    IntelVtd,
    /// AMD-Vi (an IVRS IVHD).
    AmdVi,
}

/// A firmware-reserved range a device's DMA must keep reaching one-to-one
/// (VT-d RMRR, AMD-Vi IVMD unity range), or may never use (IVMD exclusion
/// ranges are reported with no permission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareRange {
    /// The requester (device) id it belongs to.
    pub requester_id: u16,
    /// The range.
    pub range: IovaRange,
    /// What the device may do there; [`Prot::NONE`] keeps the range out
    /// of the IOAS without mapping it.
    pub prot: Prot,
}

/// A DMA fault a unit recorded, in vendor-neutral form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    /// Requester (device) id of the DMA.
    pub requester_id: u16,
    /// The address the device used (page-aligned on VT-d).
    pub address: u64,
    /// The access was a write.
    pub write: bool,
    /// The unit's own reason or event code (VT-d fault reason, AMD-Vi
    /// event code).
    pub reason: u8,
}

/// One remapped MSI: the handle to free it with, and the address/data the
/// device (or its virtual MSI capability) must be programmed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The remapping entry (unit-specific index).
    pub handle: u16,
    /// MSI address to program.
    pub address: u64,
    /// MSI data to program.
    pub data: u32,
}

/// How an IOAPIC input pin signals: ISA interrupts are edge-triggered
/// and active high unless the MADT overrides them; PCI INTx and the ACPI
/// SCI are level-triggered and active low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PinMode {
    /// Level-triggered (else edge).
    pub level: bool,
    /// Active low (else active high).
    pub active_low: bool,
}

impl PinMode {
    /// Edge-triggered, active high (an ISA interrupt without override).
    pub const EDGE_HIGH: Self = Self { level: false, active_low: false };
    /// Level-triggered, active low (PCI INTx).
    pub const LEVEL_LOW: Self = Self { level: true, active_low: true };
}

/// One remapped IOAPIC pin: the remapping entry, and the 64-bit
/// redirection table entry to program into the IOAPIC for it (in the form
/// the unit remaps, mask bit clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicRte {
    /// The remapping entry (unit-specific index); freed with
    /// [`IommuUnit::free_msi`] like an MSI's.
    pub handle: u16,
    /// Redirection entry: low 32 bits to register 0x10 + 2 * pin, high 32
    /// bits to the next. For a level-triggered pin, the vector field (bits
    /// 7:0) is also what the IOAPIC's EOI register must be given.
    pub rte: u64,
}

/// One running IOMMU unit, as the generic layer drives it. Implemented by
/// each driver over its own unit (with its own lock inside); methods take
/// `&self` so one unit can be shared by its domains and devices.
pub trait IommuUnit: Send + Sync + fmt::Debug {
    /// Register base (the unit's name in errors and reports).
    fn base(&self) -> u64;
    /// Its architecture.
    fn vendor(&self) -> Vendor;
    /// A new empty paging domain with its own domain id, in the format and
    /// stage this unit translates with (the driver's choice from its
    /// capabilities).
    fn new_domain(self: Arc<Self>) -> Result<Box<dyn UnitDomain>, UnitError>;
    /// Whether domains of this unit can track the pages devices write
    /// (VT-d: scalable mode, second stage and ECAP.SSADS; AMD-Vi:
    /// EFR.HDSup). No, by default.
    fn supports_dirty_tracking(&self) -> bool {
        false
    }
    /// A new empty paging domain that can track dirty pages (its
    /// `IommuDomain::dirty_capable` is true), as [`Self::new_domain`]
    /// otherwise. Units that cannot: `HwError::Unsupported`, the default.
    fn new_dirty_domain(self: Arc<Self>) -> Result<Box<dyn UnitDomain>, UnitError> {
        Err(UnitError { unit: self.base(), cause: crate::HwError::Unsupported("dirty tracking") })
    }
    /// The domain id `requester_id` translates through, `None` when it is
    /// blocked (or in pass-through).
    fn attached_domain(&self, requester_id: u16) -> Option<u16>;
    /// Blocks `requester_id`'s DMA (the state every device starts in),
    /// with its caches invalidated.
    fn block(&self, requester_id: u16) -> Result<(), UnitError>;
    /// Lets `requester_id`'s DMA through untranslated, where the unit can.
    fn pass_through(&self, requester_id: u16) -> Result<(), UnitError>;
    /// Firmware ranges of `requester_id`.
    fn firmware_ranges(&self, requester_id: u16) -> Vec<FirmwareRange>;
    /// Replaces every firmware range of the unit (bring-up, tests).
    fn set_firmware_ranges(&self, ranges: Vec<FirmwareRange>);
    /// Reads new fault records from the hardware and returns them (they
    /// are also kept in the unit's log).
    fn poll_faults(&self) -> Vec<DmaFault>;
    /// The unit's fault log (the latest records polled, oldest first) and
    /// how many times the hardware's recording overflowed.
    fn fault_log(&self) -> (Vec<DmaFault>, u64);
    /// Whether MSIs from devices are remapped (so a device can raise only
    /// the interrupts it is given).
    fn remaps_interrupts(&self) -> bool;
    /// Sizes what the unit keeps for `requester_id`'s interrupts for a
    /// function with `vectors` MSI/MSI-X vectors (called when a function
    /// is assigned, before its routes). AMD-Vi sizes the device's own
    /// remapping table from it; units with one table for every device
    /// (VT-d) have nothing to do.
    fn reserve_interrupts(&self, requester_id: u16, vectors: u16) -> Result<(), UnitError> {
        let _ = (requester_id, vectors);
        Ok(())
    }
    /// Routes an MSI of `requester_id` to `vector` on the CPU with APIC id
    /// `destination`, through an entry that accepts it from that requester
    /// only.
    fn route_msi(&self, requester_id: u16, vector: u8, destination: u32) -> Result<MsiRoute, UnitError>;
    /// Points a route made by [`Self::route_msi`] at another vector and
    /// destination. The device's MSI address and data stay as they were;
    /// once this returns, the old vector never arrives.
    fn retarget_msi(&self, requester_id: u16, handle: u16, vector: u8, destination: u32) -> Result<(), UnitError>;
    /// Frees a route made by [`Self::route_msi`]: the MSI is blocked again.
    fn free_msi(&self, requester_id: u16, handle: u16) -> Result<(), UnitError>;
    /// `IOMMU_GET_HW_INFO` for devices behind this unit: type and bytes.
    fn hw_info(&self) -> (u32, Vec<u8>) {
        (0, Vec::new())
    }
    /// Invalidation completion waits issued so far (benchmarks, tests).
    fn invalidation_waits(&self) -> u64;
    /// Routes the interrupt of an IOAPIC input pin signalling as `pin`,
    /// whose messages reach the unit with `source_id` (the DMAR's IOAPIC
    /// device scope, the IVRS's IOAPIC special entry), to `vector` on the
    /// CPU with APIC id `destination`. Returns the entry and the
    /// redirection entry the IOAPIC must hold; the route is freed with
    /// [`Self::free_msi`]`(source_id, handle)`.
    fn route_ioapic(&self, source_id: u16, pin: PinMode, vector: u8, destination: u32) -> Result<IoapicRte, UnitError> {
        let _ = (source_id, pin, vector, destination);
        Err(UnitError { unit: self.base(), cause: crate::HwError::Unsupported("IOAPIC interrupt remapping") })
    }
    /// Attaches `requester_id` to an x86-64 4-level page table the caller
    /// owns and keeps (for example a hypervisor's nested page table, which
    /// has the same format): the unit walks `root` for the device's DMA
    /// and never writes it except for accessed/dirty bits. Every level must
    /// have U/S set (requests without supervisor privilege). Returns the
    /// domain id the unit caches its translations under, for
    /// [`Self::invalidate_external`] and [`Self::detach_external`]. Only
    /// units that translate with that format can (VT-d scalable mode with
    /// first-stage translation); others refuse with a reason.
    fn attach_external(&self, requester_id: u16, root: u64) -> Result<u16, UnitError> {
        let _ = (requester_id, root);
        Err(UnitError {
            unit: self.base(),
            cause: crate::HwError::Unsupported("this unit does not walk x86-64 4-level page tables"),
        })
    }
    /// Drops what the unit cached of `[start, last]` of a table attached
    /// with [`Self::attach_external`] under domain `did` (after the caller
    /// changed or removed entries there).
    fn invalidate_external(&self, did: u16, start: u64, last: u64) -> Result<(), UnitError> {
        let _ = (did, start, last);
        Err(UnitError { unit: self.base(), cause: crate::HwError::Unsupported("external page tables") })
    }
    /// Blocks `requester_id` again after [`Self::attach_external`] and
    /// drops everything cached under `did` (freed for reuse only once the
    /// unit confirmed that).
    fn detach_external(&self, requester_id: u16, did: u16) -> Result<(), UnitError> {
        let _ = did;
        self.block(requester_id)
    }
    /// How many PASID bits requests of `requester_id` through this unit
    /// may carry ([`DeviceOps::max_pasid_log2`]): PASIDs `1..1 << n` can be
    /// attached with [`UnitDomain::attach_pasid`]. 0, the default, for
    /// units that translate no PASID-tagged requests.
    fn max_pasid_log2(&self, requester_id: u16) -> u32 {
        let _ = requester_id;
        0
    }
    /// Points a route made by [`Self::route_ioapic`] at another vector and
    /// destination; once this returns, the old vector never arrives.
    /// Returns the redirection entry for the route now: where it differs
    /// from the IOAPIC's (VT-d: the vector field follows the entry's, which
    /// the EOI of a level-triggered pin matches), write it again.
    fn retarget_ioapic(
        &self,
        source_id: u16,
        handle: u16,
        pin: PinMode,
        vector: u8,
        destination: u32,
    ) -> Result<IoapicRte, UnitError> {
        let _ = (source_id, handle, pin, vector, destination);
        Err(UnitError { unit: self.base(), cause: crate::HwError::Unsupported("IOAPIC interrupt remapping") })
    }
}

/// Shape of a domain's page table, for reports and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    /// Physical address of the top-level table.
    pub root: u64,
    /// Levels.
    pub levels: u32,
    /// Format name ("VT-d second stage", "x86 first stage", "AMD v1").
    pub format: &'static str,
}

/// A paging domain of one unit, made by [`IommuUnit::new_domain`]. Its
/// `IommuDomain` methods map and unmap (invalidating through the unit);
/// the `attach_device`/`detach_device` of the trait are not used on it:
/// [`Domain`] attaches by requester id through the two methods below.
pub trait UnitDomain: IommuDomain + fmt::Debug {
    /// Its domain id on its unit.
    fn domain_id(&self) -> u16;
    /// Its unit's register base.
    fn unit_base(&self) -> u64;
    /// Points `requester_id` at this domain (context, PASID or device
    /// table entry written and its caches invalidated).
    /// This writes the unit's entry only: [`Domain::attach_requester`]
    /// maps the device's firmware ranges first.
    fn attach_requester(&self, requester_id: u16) -> Result<(), UnitError>;
    /// Blocks `requester_id` again (it must be attached to this domain).
    fn detach_requester(&self, requester_id: u16) -> Result<(), UnitError>;
    /// Points PASID `pasid` (never 0) of `requester_id` at this domain,
    /// replacing the domain it used, if any; the requester id's own
    /// translation and its other PASIDs stay as they were. Units that
    /// cannot: `HwError::Unsupported`, the default.
    fn attach_pasid(&self, requester_id: u16, pasid: u32) -> Result<(), UnitError> {
        let _ = (requester_id, pasid);
        Err(UnitError { unit: self.unit_base(), cause: crate::HwError::Unsupported("requests with PASID") })
    }
    /// Blocks PASID `pasid` of `requester_id` again (it must be attached
    /// to this domain). `HwError::Unsupported` by default.
    fn detach_pasid(&self, requester_id: u16, pasid: u32) -> Result<(), UnitError> {
        let _ = (requester_id, pasid);
        Err(UnitError { unit: self.unit_base(), cause: crate::HwError::Unsupported("requests with PASID") })
    }
    /// Size of the page mapping `iova`, from the walk (`None`: unmapped).
    fn page_size(&self, iova: u64) -> Option<u64>;
    /// Its table.
    fn table_info(&self) -> TableInfo;
}

pub use crate::RequesterRef;

impl RequesterRef {
    /// The handle iommufd knows the device by.
    pub const fn handle(self) -> DeviceHandle {
        DeviceHandle::Requester(self)
    }
    /// The inverse of [`Self::handle`] (`None` for other handles).
    pub const fn from_handle(h: DeviceHandle) -> Option<Self> {
        match h {
            DeviceHandle::Requester(r) => Some(r),
            DeviceHandle::Opaque(_) => None,
        }
    }
}

/// A device behind a unit: what iommufd binds (`DeviceOps`), and what a
/// passthrough layer attaches.
#[derive(Clone)]
pub struct Device {
    unit: Arc<dyn IommuUnit>,
    at: RequesterRef,
    /// PASID bits the function itself supports (its PCI PASID capability's
    /// Max PASID Width); `None` when the creator did not say.
    function_pasid_bits: Option<u32>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device(unit {} @{:#x}, rid {:#06x})", self.at.unit, self.unit.base(), self.at.requester_id)
    }
}

impl Device {
    /// The device `at.requester_id` behind `unit` (number `at.unit`).
    pub fn new(unit: Arc<dyn IommuUnit>, at: RequesterRef) -> Self {
        Self { unit, at, function_pasid_bits: None }
    }
    /// The same device, with the PASID width the function itself supports
    /// (0 for a function without a PASID capability): its
    /// [`DeviceOps::max_pasid_log2`] is then the smaller of that and its
    /// unit's, as Linux reports it.
    pub fn with_function_pasid_bits(mut self, bits: u32) -> Self {
        self.function_pasid_bits = Some(bits);
        self
    }
    /// Its unit.
    pub fn unit(&self) -> &Arc<dyn IommuUnit> {
        &self.unit
    }
    /// Its unit index and requester id.
    pub fn requester(&self) -> RequesterRef {
        self.at
    }
    /// A new empty domain on its unit.
    pub fn new_domain(&self) -> Result<Domain, UnitError> {
        Domain::new(self.unit.clone(), self.at.unit)
    }
    /// A new empty domain on its unit that can track dirty pages
    /// ([`IommuUnit::new_dirty_domain`]).
    pub fn new_dirty_domain(&self) -> Result<Domain, UnitError> {
        Domain::new_dirty(self.unit.clone(), self.at.unit)
    }
}

impl DeviceOps for Device {
    fn handle(&self) -> DeviceHandle {
        self.at.handle()
    }
    fn alloc_domain(&self) -> Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(self.new_domain()?))
    }
    /// The MSI window, and the device's firmware ranges (mapped one-to-one
    /// by the domain on attach, or kept unmapped, so no IOAS may use them).
    fn reserved_regions(&self) -> Vec<IovaRange> {
        let mut r = alloc::vec![MSI_WINDOW];
        r.extend(self.unit.firmware_ranges(self.at.requester_id).into_iter().map(|f| f.range));
        r
    }
    fn hw_info(&self) -> (u32, Vec<u8>) {
        self.unit.hw_info()
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.unit.supports_dirty_tracking()
    }
    /// [`DomainError::NotSupported`] when the unit cannot track.
    fn alloc_dirty_domain(&self) -> Result<Box<dyn IommuDomain>, DomainError> {
        if !self.unit.supports_dirty_tracking() {
            return Err(DomainError::NotSupported);
        }
        Ok(Box::new(self.new_dirty_domain()?))
    }
    /// What the unit takes for this requester id
    /// ([`IommuUnit::max_pasid_log2`]), no more than the function's own
    /// width when its creator gave one
    /// ([`Device::with_function_pasid_bits`]).
    fn max_pasid_log2(&self) -> u32 {
        let unit = self.unit.max_pasid_log2(self.at.requester_id);
        self.function_pasid_bits.map_or(unit, |f| f.min(unit))
    }
}

/// A paging domain on one unit with vendor-neutral attach: devices are
/// named by their [`RequesterRef`] handle, a device of another unit is
/// refused, and the device's firmware ranges are identity-mapped before
/// it translates through the domain (and removed again if the attach
/// fails).
pub struct Domain {
    inner: Box<dyn UnitDomain>,
    unit_index: u16,
    unit: Arc<dyn IommuUnit>,
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Domain(unit {}, {:?})", self.unit_index, self.inner)
    }
}

impl Domain {
    /// A new empty domain on `unit`, number `unit_index` (devices are
    /// named by [`RequesterRef`] handles carrying that number).
    pub fn new(unit: Arc<dyn IommuUnit>, unit_index: u16) -> Result<Self, UnitError> {
        Ok(Domain { inner: unit.clone().new_domain()?, unit_index, unit })
    }
    /// A new empty domain on `unit` that can track dirty pages.
    pub fn new_dirty(unit: Arc<dyn IommuUnit>, unit_index: u16) -> Result<Self, UnitError> {
        Ok(Domain { inner: unit.clone().new_dirty_domain()?, unit_index, unit })
    }
    /// The driver's domain inside.
    pub fn unit_domain(&self) -> &dyn UnitDomain {
        &*self.inner
    }
    /// Its domain id.
    pub fn domain_id(&self) -> u16 {
        self.inner.domain_id()
    }
    /// Its unit.
    pub fn unit(&self) -> &Arc<dyn IommuUnit> {
        &self.unit
    }
    /// Size of the page mapping `iova`, from the walk.
    pub fn page_size(&self, iova: u64) -> Option<u64> {
        self.inner.page_size(iova)
    }
    /// Its table's shape.
    pub fn table_info(&self) -> TableInfo {
        self.inner.table_info()
    }

    fn requester(&self, device: DeviceHandle) -> Result<u16, DomainError> {
        match RequesterRef::from_handle(device) {
            Some(r) if r.unit == self.unit_index => Ok(r.requester_id),
            _ => Err(DomainError::Incompatible),
        }
    }

    /// Points `requester_id` of this domain's unit at the domain, with its
    /// firmware ranges identity-mapped first (removed again if the attach
    /// fails, so the domain is as it was).
    pub fn attach_requester(&mut self, requester_id: u16) -> Result<(), DomainError> {
        let ranges: Vec<(IovaRange, Prot)> = self
            .unit
            .firmware_ranges(requester_id)
            .into_iter()
            .filter(|f| f.prot != Prot::NONE)
            .map(|f| (f.range, f.prot))
            .collect();
        identity_map_then(
            self,
            |s| &mut *s.inner,
            &ranges,
            |s| s.inner.attach_requester(requester_id).map_err(DomainError::from),
        )
    }

    /// Blocks `requester_id` again.
    pub fn detach_requester(&mut self, requester_id: u16) -> Result<(), DomainError> {
        self.inner.detach_requester(requester_id).map_err(DomainError::from)
    }

    /// The requester id of `device` when PASID `pasid` of it may be
    /// attached: [`DomainError::NotSupported`] when its unit takes no
    /// PASIDs for it, [`DomainError::Incompatible`] for PASID 0 (the
    /// requester id's own translation) or one beyond the unit's width.
    fn pasid_requester(&self, device: DeviceHandle, pasid: u32) -> Result<u16, DomainError> {
        let rid = self.requester(device)?;
        let bits = self.unit.max_pasid_log2(rid);
        if bits == 0 {
            return Err(DomainError::NotSupported);
        }
        if pasid == 0 || pasid.checked_shr(bits).unwrap_or(0) != 0 {
            return Err(DomainError::Incompatible);
        }
        Ok(rid)
    }
}

/// A unit's refusal to translate PASIDs is `NotSupported` to the caller,
/// a PASID it cannot take (or one not attached to the domain on detach)
/// `Incompatible`.
fn pasid_error(e: UnitError) -> DomainError {
    match e.cause {
        crate::HwError::Unsupported(_) => DomainError::NotSupported,
        crate::HwError::Invalid(_) => DomainError::Incompatible,
        _ => e.into(),
    }
}

impl IommuDomain for Domain {
    crate::forward_paging!(fn paging, paging_mut);

    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        let rid = self.requester(device)?;
        self.attach_requester(rid)
    }

    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        let rid = self.requester(device)?;
        self.detach_requester(rid)
    }

    /// The unit's PASID entry only: firmware ranges belong to the
    /// requester id's own translation, not to its PASIDs.
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let rid = self.pasid_requester(device, pasid)?;
        self.inner.attach_pasid(rid, pasid).map_err(pasid_error)
    }

    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let rid = self.pasid_requester(device, pasid)?;
        self.inner.detach_pasid(rid, pasid).map_err(pasid_error)
    }
}

impl Domain {
    fn paging(&self) -> &dyn IommuDomain {
        &*self.inner
    }
    fn paging_mut(&mut self) -> &mut dyn IommuDomain {
        &mut *self.inner
    }
}
