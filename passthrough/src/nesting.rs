//! Nested HWPTs of iommufd for VT-d devices (`IOMMU_HWPT_DATA_VTD_S1`):
//! the binding between iommufd's nesting traits and the VT-d driver's
//! nested translation ([`vtd::nested`]).
//!
//! It lives here because this crate is the one that sees both sides:
//! iommufd knows nothing of VT-d, and the VT-d driver nothing of iommufd's
//! objects or errnos. The driver offers typed pieces (a nested domain with
//! its own domain id, the first-stage check, the invalidations); this
//! module adds Linux's uAPI rules around them.
//!
//! * [`VtdNestingDevice`]: a VT-d function as iommufd binds it with
//!   [`iommufd::ctx::Ictx::bind_nesting_device`]: the generic device for
//!   everything paging, plus `NestingOps`;
//! * [`VtdParent`]: the domain of an `IOMMU_HWPT_ALLOC_NEST_PARENT` HWPT, a
//!   second-stage domain that also invalidates, when its mappings change,
//!   under the domain ids of the nested domains built on it (the unit caches
//!   their combined translations under those ids), and carries its dirty
//!   tracking into their entries;
//! * [`VtdNested`]: the nested domain iommufd holds; attach writes the
//!   nested PASID entry, `IOMMU_HWPT_INVALIDATE` takes
//!   `IOMMU_HWPT_INVALIDATE_DATA_VTD_S1` entries.
//!
//! Linux's rules followed (6.12, `drivers/iommu/intel/iommu.c`
//! `intel_iommu_domain_alloc_user`, `nested.c`, `pasid.c`):
//! * NEST_PARENT on a unit that cannot nest: `EOPNOTSUPP`;
//! * a nested allocation: a unit that cannot nest or driver flags:
//!   `EOPNOTSUPP` (also `IOMMU_HWPT_ALLOC_PASID`, which Linux 6.15's
//!   driver accepts: a VT-d nested domain at a PASID other than 0 is not
//!   built here, so it is refused at allocation rather than at attach); data of another type: `EOPNOTSUPP`; a parent that is not
//!   this driver's NEST_PARENT domain of this unit: `EINVAL` (Linux's
//!   domains may span units and it refuses another unit's only at attach;
//!   here a domain belongs to one unit); the data
//!   shorter than `struct iommu_hwpt_vtd_s1`: `EINVAL`, unreadable:
//!   `EFAULT`. The stage-1 fields themselves are *not* checked here;
//! * attach checks them (`intel_pasid_setup_nested`): `addr_width` not 48
//!   or 57, 57 without CAP.FS5LP, SRE without ECAP.SRS, EAFE without
//!   ECAP.EAFS: `EINVAL`;
//! * invalidation: another array type: `EINVAL` with nothing handled; per
//!   entry, in order: unreadable or a bad length (`EFAULT` / `EINVAL`),
//!   flags other than `IOMMU_VTD_INV_FLAGS_LEAF` or a nonzero `__reserved`:
//!   `EOPNOTSUPP`; `addr` not 4 KiB aligned, or `npages` = `U64_MAX`
//!   (everything) with a nonzero `addr`: `EINVAL`; `entry_num` says how
//!   many were handled before the one that failed. Where Linux drops a
//!   failed hardware invalidation silently, this reports it (`EIO`, or
//!   `ETIMEDOUT`) and does not count the entry.
//!
//! Lock order: a parent's domain lock (iommufd), then its [`ParentState`]
//! lock, then the unit's lock. A nested domain takes the parent state, then
//! the unit.

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::TableMemory;
use iommufd::ctx::{DeviceOps, NestedDomain, NestingOps, UserData, UserDataArray};
use iommufd::uapi::{
    IOMMU_HWPT_DATA_VTD_S1, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, IOMMU_VTD_INV_FLAGS_LEAF, IommuHwptVtdS1,
    IommuHwptVtdS1Invalidate,
};
use iommufd::{Errno, Result};
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::unit::{Device, Domain, IovaRange};
use portcullis_iommu::{
    Clock, DeviceHandle, DomainError, HwError, IommuDomain, IotlbGather, PhysRun, Prot, RequesterRef, UnitError,
};
use spin::Mutex;
use vtd::nested::{FirstStageRange, NestParent, NestedError, StageOne};

/// What a parent shares with the nested domains built on it.
#[derive(Debug, Default)]
pub struct ParentState {
    /// The domain ids of the nested domains built on the parent.
    nested: BTreeSet<u16>,
    /// Whether the parent tracks dirty pages now (nested entries get
    /// SSADE while it does).
    tracking: bool,
}

/// A VT-d function bound to iommufd with nesting: the generic device for
/// paging HWPTs, and nested HWPTs through its unit.
pub struct VtdNestingDevice<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    device: Device,
    unit: Arc<vtd::Shared<M, T, C>>,
}

impl<M, T, C> fmt::Debug for VtdNestingDevice<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VtdNestingDevice({:?})", self.device)
    }
}

impl<M, T, C> VtdNestingDevice<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Requester `at.requester_id` behind `unit` (number `at.unit`).
    pub fn new(unit: Arc<vtd::Shared<M, T, C>>, at: RequesterRef) -> Self {
        Self { device: Device::new(unit.clone(), at), unit }
    }

    /// The generic device underneath.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl<M, T, C> DeviceOps for VtdNestingDevice<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn handle(&self) -> DeviceHandle {
        self.device.handle()
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        self.device.alloc_domain()
    }
    fn reserved_regions(&self) -> Vec<IovaRange> {
        self.device.reserved_regions()
    }
    fn hw_info(&self) -> (u32, Vec<u8>) {
        self.device.hw_info()
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.device.supports_dirty_tracking()
    }
    fn alloc_dirty_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        self.device.alloc_dirty_domain()
    }
    fn max_pasid_log2(&self) -> u32 {
        self.device.max_pasid_log2()
    }
}

/// The errno of a unit failure.
fn unit_errno(e: UnitError) -> Errno {
    match e.cause {
        HwError::NoMemory => Errno::ENOMEM,
        HwError::NoDomainId => Errno::ENOSPC,
        HwError::Timeout { .. } => Errno::ETIMEDOUT,
        _ => Errno::EIO,
    }
}

impl<M, T, C> NestingOps for VtdNestingDevice<M, T, C>
where
    M: Mmio + Send + Sync + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + Sync + 'static,
{
    /// A second-stage domain of the unit ([`VtdParent`]); `EOPNOTSUPP`
    /// when the unit cannot nest.
    fn alloc_nest_parent(&self, dirty: bool) -> Option<Result<Box<dyn IommuDomain>>> {
        if !self.unit.can_nest() {
            return Some(Err(Errno::EOPNOTSUPP));
        }
        let at = self.device.requester();
        let generic = self.device.unit().clone();
        let domain = if dirty { Domain::new_dirty(generic, at.unit) } else { Domain::new(generic, at.unit) };
        Some(match domain {
            // A nesting unit translates with second-stage tables
            // (ECAP.SSTS), which new domains use.
            Ok(domain) => Ok(Box::new(VtdParent {
                domain,
                unit: self.unit.clone(),
                state: Arc::new(Mutex::new(ParentState::default())),
            })),
            Err(e) => Err(unit_errno(e)),
        })
    }

    fn alloc_nested_domain(
        &self,
        parent: &mut dyn IommuDomain,
        flags: u32,
        data: &UserData<'_>,
    ) -> Result<Box<dyn NestedDomain>> {
        if !self.unit.can_nest() || flags != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if data.data_type != IOMMU_HWPT_DATA_VTD_S1 {
            return Err(Errno::EOPNOTSUPP);
        }
        let parent = parent
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<VtdParent<M, T, C>>())
            .filter(|p| Arc::ptr_eq(&p.unit, &self.unit))
            .ok_or(Errno::EINVAL)?;
        let mut raw = [0u8; IommuHwptVtdS1::SIZE];
        data.copy_struct(IOMMU_HWPT_DATA_VTD_S1, &mut raw, IommuHwptVtdS1::SIZE)?;
        let s1 = IommuHwptVtdS1::read(&raw);
        let stage_one = StageOne { flags: s1.flags, pgtbl_addr: s1.pgtbl_addr, addr_width: s1.addr_width };
        let inner = self.unit.new_nested_domain(stage_one).map_err(|e| match e {
            NestedError::Unit(e) => unit_errno(e),
            _ => Errno::EOPNOTSUPP,
        })?;
        let info = parent.domain.table_info();
        parent.state.lock().nested.insert(inner.domain_id());
        Ok(Box::new(VtdNested {
            inner,
            root: info.root,
            levels: info.levels,
            unit_index: self.device.requester().unit,
            state: parent.state.clone(),
        }))
    }
}

/// The domain of a VT-d `IOMMU_HWPT_ALLOC_NEST_PARENT` HWPT: the generic
/// second-stage domain (devices attach to it as to any), whose changes
/// are also invalidated under the domain ids of the nested domains on it.
pub struct VtdParent<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    domain: Domain,
    unit: Arc<vtd::Shared<M, T, C>>,
    state: Arc<Mutex<ParentState>>,
}

impl<M, T, C> fmt::Debug for VtdParent<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VtdParent({:?}, nested {:?})", self.domain, self.state.lock().nested)
    }
}

impl<M, T, C> VtdParent<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// The generic domain inside.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The domain ids of the nested domains built on it.
    pub fn nested_domain_ids(&self) -> Vec<u16> {
        self.state.lock().nested.iter().copied().collect()
    }

    /// Invalidates `[start, last]` under every nested domain id (IOTLB
    /// invalidation: in scalable mode it drops nested translations whose
    /// second stage used the range). Every id is tried; the first error
    /// is returned.
    fn invalidate_nested(&self, start: u64, last: u64, leaf_only: bool) -> core::result::Result<(), DomainError> {
        let state = self.state.lock();
        let mut first = Ok(());
        for &did in &state.nested {
            if let Err(e) = self.unit.lock().invalidate_range(did, start, last, leaf_only) {
                first = first.and(Err(DomainError::from(e)));
            }
        }
        first
    }
}

impl<M, T, C> IommuDomain for VtdParent<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn page_sizes(&self) -> u64 {
        self.domain.page_sizes()
    }
    fn aperture(&self) -> IovaRange {
        self.domain.aperture()
    }
    /// As the domain's; with caching mode (not-present entries may be
    /// cached) the range is invalidated under the nested ids too. All or
    /// nothing, as the trait asks: when that invalidation fails the range
    /// is unmapped again (and invalidated, as far as the unit answers)
    /// before the error is returned.
    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> core::result::Result<(), DomainError> {
        self.domain.map(iova, phys, length, prot)?;
        self.after_map(iova, length).inspect_err(|_| self.undo_map(iova, length))
    }
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> core::result::Result<(), DomainError> {
        self.domain.map_runs(iova, runs, prot)?;
        let length = runs.iter().fold(0u64, |a, r| a.saturating_add(r.len));
        self.after_map(iova, length).inspect_err(|_| self.undo_map(iova, length))
    }
    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        self.domain.unmap(iova, length, gather)
    }
    /// The domain's invalidation, then the same range under every nested
    /// domain id (both are attempted; the first error is returned).
    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> core::result::Result<(), DomainError> {
        let range = gather.start.map(|s| (s, gather.last, gather.freed_tables == 0));
        let own = self.domain.iotlb_sync(gather);
        let nested = match range {
            Some((start, last, leaf_only)) => self.invalidate_nested(start, last, leaf_only),
            None => Ok(()),
        };
        own.and(nested)
    }
    fn recover(&mut self) -> core::result::Result<(), DomainError> {
        self.domain.recover()?;
        self.invalidate_nested(0, u64::MAX, false)
    }
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.domain.iova_to_phys(iova)
    }
    fn enforce_cache_coherency(&mut self) -> bool {
        self.domain.enforce_cache_coherency()
    }
    fn dirty_capable(&self) -> bool {
        self.domain.dirty_capable()
    }
    /// The domain's own devices, then the entries of every nested domain
    /// on it (SSADE in place, as for second-stage entries).
    fn set_dirty_tracking(&mut self, enable: bool) -> core::result::Result<(), DomainError> {
        let mut state = self.state.lock();
        self.domain.set_dirty_tracking(enable)?;
        state.tracking = enable;
        for &did in &state.nested {
            self.unit.lock().set_dirty_tracking(did, enable)?;
        }
        Ok(())
    }
    fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> core::result::Result<(), DomainError> {
        self.domain.read_and_clear_dirty(iova, length, clear, gather, record)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
    fn attach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError> {
        self.domain.attach_device(device)
    }
    fn detach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError> {
        self.domain.detach_device(device)
    }
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        self.domain.attach_device_pasid(device, pasid)
    }
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        self.domain.detach_device_pasid(device, pasid)
    }
    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        self.domain.iova_to_phys_run(iova, max_len)
    }
    fn iova_to_phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        self.domain.iova_to_phys_runs(iova, length, out)
    }
    fn granule(&self) -> u64 {
        self.domain.granule()
    }
}

impl<M, T, C> VtdParent<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Takes back a map whose invalidation failed. The map's own error
    /// (a hardware one) is what the caller hears: it keeps the pages
    /// pinned, as the unit may hold translations of them whether or not
    /// this invalidation gets through.
    fn undo_map(&mut self, iova: u64, length: u64) {
        let mut gather = IotlbGather::default();
        self.domain.unmap(iova, length, &mut gather);
        let _reported_by_the_map = self.iotlb_sync(&mut gather);
    }

    fn after_map(&self, iova: u64, length: u64) -> core::result::Result<(), DomainError> {
        if length == 0 || !self.unit.lock().caps().caching_mode() {
            return Ok(());
        }
        self.invalidate_nested(iova, iova.saturating_add(length - 1), false)
    }
}

/// A VT-d nested HWPT's domain: the driver's nested domain, and the
/// parent's table it attaches over.
pub struct VtdNested<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    inner: vtd::nested::NestedDomain<M, T, C>,
    root: u64,
    levels: u32,
    unit_index: u16,
    state: Arc<Mutex<ParentState>>,
}

impl<M, T, C> fmt::Debug for VtdNested<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VtdNested({:?} over {:#x})", self.inner, self.root)
    }
}

impl<M, T, C> VtdNested<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// The driver's nested domain.
    pub fn inner(&self) -> &vtd::nested::NestedDomain<M, T, C> {
        &self.inner
    }

    fn requester(&self, device: DeviceHandle) -> core::result::Result<u16, DomainError> {
        match RequesterRef::from_handle(device) {
            Some(r) if r.unit == self.unit_index => Ok(r.requester_id),
            _ => Err(DomainError::Incompatible),
        }
    }

    /// One `struct iommu_hwpt_vtd_s1_invalidate` request, checked and run.
    fn invalidate_one(&self, array: &UserDataArray<'_>, index: u32) -> Result<()> {
        let mut raw = [0u8; IommuHwptVtdS1Invalidate::SIZE];
        array.copy_entry(IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, index, &mut raw, IommuHwptVtdS1Invalidate::SIZE)?;
        let inv = IommuHwptVtdS1Invalidate::read(&raw);
        if inv.flags & !IOMMU_VTD_INV_FLAGS_LEAF != 0 || inv.__reserved != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if inv.addr & 0xfff != 0 || (inv.npages == u64::MAX && inv.addr != 0) {
            return Err(Errno::EINVAL);
        }
        let range = if inv.npages == u64::MAX {
            FirstStageRange::All
        } else {
            FirstStageRange::Pages {
                addr: inv.addr,
                npages: inv.npages,
                leaf_only: inv.flags & IOMMU_VTD_INV_FLAGS_LEAF != 0,
            }
        };
        self.inner.invalidate(range).map_err(unit_errno)
    }
}

impl<M, T, C> NestedDomain for VtdNested<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Writes the nested PASID entry (the stage-1 data checked first, as
    /// Linux checks it then: `EINVAL` through
    /// [`DomainError::Incompatible`]). The parent's state stays locked
    /// meanwhile, so a change of its dirty tracking sees this entry.
    fn attach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError> {
        let sid = self.requester(device)?;
        let state = self.state.lock();
        let parent = NestParent { root: self.root, levels: self.levels, dirty_tracking: state.tracking };
        self.inner.attach_requester(sid, &parent).map_err(|e| match e {
            NestedError::Unit(e) => DomainError::from(e),
            NestedError::NotSupported => DomainError::NotSupported,
            NestedError::AddressWidth(_)
            | NestedError::FiveLevel
            | NestedError::SupervisorRequests
            | NestedError::ExtendedAccessed
            | NestedError::Parent => DomainError::Incompatible,
        })
    }
    fn detach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError> {
        let sid = self.requester(device)?;
        self.inner.detach_requester(sid).map_err(DomainError::from)
    }
    fn cache_invalidate_user(&mut self, array: &mut UserDataArray<'_>) -> Result<()> {
        let mut done = 0;
        let r = if array.data_type != IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 {
            Err(Errno::EINVAL)
        } else {
            (0..array.entry_num).try_for_each(|i| {
                self.invalidate_one(array, i)?;
                done += 1;
                Ok(())
            })
        };
        array.entry_num = done;
        r
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
}

impl<M, T, C> Drop for VtdNested<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// The parent stops invalidating under this domain's id (the driver's
    /// domain then drops what is cached under it and frees it).
    fn drop(&mut self) {
        self.state.lock().nested.remove(&self.inner.domain_id());
    }
}

/// A VT-d function bound to iommufd with nesting, over the platform.
pub type PlatformNestingDevice<P> =
    VtdNestingDevice<<P as crate::Platform>::Mmio, crate::PlatformTables<P>, crate::PlatformClock<P>>;

impl<P: crate::Platform> crate::Iommus<P> {
    /// The VT-d function `segment:bdf` as iommufd binds it with nesting
    /// (`Ictx::bind_nesting_device`): nested HWPTs
    /// (`IOMMU_HWPT_DATA_VTD_S1`) on its unit, where the unit can nest.
    /// An AMD-Vi function is refused (its driver has no nesting).
    pub fn vtd_nesting_device(
        &self,
        segment: u16,
        bdf: crate::Bdf,
    ) -> core::result::Result<PlatformNestingDevice<P>, crate::PassthroughError> {
        let (driver, at) = self.locate(segment, bdf)?;
        match driver {
            crate::Driver::Vtd(unit) => {
                let bits = crate::quiesce::pasid_bits(&**self.platform(), crate::Function { segment, bdf });
                let mut d = VtdNestingDevice::new(unit, at);
                d.device = d.device.with_function_pasid_bits(bits);
                Ok(d)
            }
            crate::Driver::Amd(_) => Err(crate::PassthroughError::Iommufd("nesting on AMD-Vi", Errno::EOPNOTSUPP)),
        }
    }
}
