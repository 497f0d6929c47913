//! Nested HW page tables (a vIOMMU's stage 1): a domain a device's driver
//! builds from the caller's description of its own page table, on top of a
//! paging HWPT allocated with `IOMMU_HWPT_ALLOC_NEST_PARENT` (the stage 2).
//!
//! Invariants: a nested HWPT holds one reference on its parent HWPT from
//! allocation to release, so the parent (and through it the IOAS) outlives
//! it (`IOMMU_DESTROY` of the parent is `EBUSY` meanwhile); the parent's
//! domain stays in its IOAS. A device attached to a nested HWPT has its
//! reserved regions reserved in the parent's IOAS, as for the parent
//! itself, and its DMA goes through the nested domain.
//!
//! Driver data (`IOMMU_HWPT_ALLOC`'s `data_uptr`, `IOMMU_HWPT_INVALIDATE`'s
//! array) stays in the caller's memory: drivers copy one struct at a time
//! through [`UserData`] / [`UserDataArray`], into a buffer of their own
//! struct's size, so no size the caller gives ever sizes an allocation.

use super::{Ictx, Object};
use crate::ctx::fault::{Fault, PageResponse};
use crate::ctx::hw_pagetable::Hwpt;
use crate::errno::{Errno, Result};
use crate::memsrc::MemorySource;
use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, Ordering};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};
use spin::Mutex;

/// Driver data of one `IOMMU_HWPT_ALLOC` (Linux's `iommu_user_data`),
/// still in the caller's memory.
pub struct UserData<'a> {
    source: &'a dyn MemorySource,
    /// `data_type`.
    pub data_type: u32,
    uptr: u64,
    /// `data_len`.
    pub len: u32,
}

impl core::fmt::Debug for UserData<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "UserData(type {:#x}, {} bytes at {:#x})", self.data_type, self.len, self.uptr)
    }
}

impl<'a> UserData<'a> {
    /// `len` bytes of type `data_type` at `uptr` in `source`.
    pub fn new(source: &'a dyn MemorySource, data_type: u32, uptr: u64, len: u32) -> Self {
        Self { source, data_type, uptr, len }
    }

    /// Copies the driver struct of type `data_type` into `dst` (the
    /// driver's struct, `dst.len()` its size): `EINVAL` when the type
    /// differs or the caller's length is below `min_len` or above
    /// `dst.len()`; `EFAULT` when unreadable. Bytes of `dst` past the
    /// caller's length are zeroed (an older, shorter struct).
    pub fn copy_struct(&self, data_type: u32, dst: &mut [u8], min_len: usize) -> Result<()> {
        copy_struct(self.source, self.data_type, self.uptr, self.len, data_type, dst, min_len)
    }
}

/// The request array of one `IOMMU_HWPT_INVALIDATE` (Linux's
/// `iommu_user_data_array`), still in the caller's memory. The driver
/// reads entry `i` with [`Self::copy_entry`] and sets [`Self::entry_num`]
/// to the number of requests it handled.
pub struct UserDataArray<'a> {
    source: &'a dyn MemorySource,
    /// `data_type`.
    pub data_type: u32,
    uptr: u64,
    /// `entry_len`.
    pub entry_len: u32,
    /// In: the number of entries; out: the number handled.
    pub entry_num: u32,
}

impl core::fmt::Debug for UserDataArray<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "UserDataArray(type {:#x}, {} x {} bytes at {:#x})",
            self.data_type, self.entry_num, self.entry_len, self.uptr
        )
    }
}

impl<'a> UserDataArray<'a> {
    /// `entry_num` entries of `entry_len` bytes at `uptr` in `source`.
    pub fn new(source: &'a dyn MemorySource, data_type: u32, uptr: u64, entry_len: u32, entry_num: u32) -> Self {
        Self { source, data_type, uptr, entry_len, entry_num }
    }

    /// Copies entry `index` into `dst` with the rules of
    /// [`UserData::copy_struct`]; `EINVAL` for an index past the array.
    pub fn copy_entry(&self, data_type: u32, index: u32, dst: &mut [u8], min_len: usize) -> Result<()> {
        if index >= self.entry_num {
            return Err(Errno::EINVAL);
        }
        let at = (self.entry_len as u64)
            .checked_mul(index as u64)
            .and_then(|o| self.uptr.checked_add(o))
            .ok_or(Errno::EFAULT)?;
        copy_struct(self.source, self.data_type, at, self.entry_len, data_type, dst, min_len)
    }
}

fn copy_struct(
    source: &dyn MemorySource,
    have_type: u32,
    uptr: u64,
    len: u32,
    want_type: u32,
    dst: &mut [u8],
    min_len: usize,
) -> Result<()> {
    if have_type != want_type {
        return Err(Errno::EINVAL);
    }
    let len = len as usize;
    if len < min_len || len > dst.len() {
        return Err(Errno::EINVAL);
    }
    uptr.checked_add(len as u64).ok_or(Errno::EFAULT)?;
    let (head, tail) = dst.split_at_mut(len);
    source.read_user(uptr, head)?;
    tail.fill(0);
    Ok(())
}

/// A nested (stage-1) domain made by a driver: translation through the
/// caller's own table on top of its parent's domain.
pub trait NestedDomain: Send {
    /// Makes the device's DMA go through this domain.
    fn attach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError>;
    /// Blocks the device's DMA through this domain.
    fn detach_device(&mut self, device: DeviceHandle) -> core::result::Result<(), DomainError>;
    /// Points PASID `pasid` (never 0) of `device` at this domain, as
    /// [`IommuDomain::attach_device_pasid`] does for a paging domain
    /// (Linux 6.15 attaches nested HWPTs to PASIDs too): replacing the
    /// domain the PASID used; on failure the PASID is left as it was.
    /// [`DomainError::NotSupported`] (the default) when the driver cannot.
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        let _ = (device, pasid);
        Err(DomainError::NotSupported)
    }
    /// Blocks PASID `pasid` of `device` again, as
    /// [`IommuDomain::detach_device_pasid`]; on failure the PASID may
    /// still reach the domain.
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> core::result::Result<(), DomainError> {
        let _ = (device, pasid);
        Err(DomainError::NotSupported)
    }
    /// `IOMMU_HWPT_INVALIDATE`: handles the requests of `array` in order,
    /// stopping at the first that fails, and leaves in `array.entry_num`
    /// how many it handled (also when failing).
    fn cache_invalidate_user(&mut self, array: &mut UserDataArray<'_>) -> Result<()> {
        array.entry_num = 0;
        Err(Errno::EOPNOTSUPP)
    }
    /// For drivers' test hooks (the selftest reads the mock's IOTLB).
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        None
    }
}

/// What a device's driver needs to build nested domains (Linux's
/// `domain_alloc_user` with a parent). Bound with
/// [`Ictx::bind_nesting_device`]; a device bound without it answers
/// nested allocations with `EOPNOTSUPP`.
pub trait NestingOps: Send + Sync {
    /// A nested domain on `parent` (a domain this driver made for a
    /// `NEST_PARENT` HWPT) from the caller's `data`. `flags` are the
    /// HWPT_ALLOC flags meant for the driver (`IOMMU_HWPT_ALLOC_PASID`, the
    /// only one since 6.15). Errors are the driver's
    /// errno (a foreign data type is `EOPNOTSUPP`, bad data `EINVAL`,
    /// unreadable data `EFAULT`).
    fn alloc_nested_domain(
        &self,
        parent: &mut dyn IommuDomain,
        flags: u32,
        data: &UserData<'_>,
    ) -> Result<Box<dyn NestedDomain>>;

    /// The domain of an `IOMMU_HWPT_ALLOC_NEST_PARENT` HWPT (tracking
    /// dirty pages when `dirty`; the core has checked the device can), for
    /// drivers whose parents differ from their other paging domains (Linux's
    /// VT-d driver: a second-stage domain, and `EOPNOTSUPP` on a unit that
    /// cannot nest). The driver's [`Self::alloc_nested_domain`] then finds
    /// it as its parent. `None`, the default: the core allocates it as any
    /// paging domain (`DeviceOps::alloc_domain` or `alloc_dirty_domain`).
    fn alloc_nest_parent(&self, dirty: bool) -> Option<Result<Box<dyn IommuDomain>>> {
        let _ = dirty;
        None
    }

    /// Answers a group of page requests `device` reported (PCI PRI's
    /// page group response), with the group's last PASID and index. The
    /// default drops it (a driver whose devices report no page requests).
    fn page_response(&self, device: DeviceHandle, response: &PageResponse) {
        let _ = (device, response);
    }
}

/// A nested HWPT.
pub struct HwptNested {
    /// The parent (stage-2) HWPT's id.
    pub parent_id: u32,
    pub(super) parent: Arc<Hwpt>,
    /// The nested domain.
    pub domain: Mutex<Box<dyn NestedDomain>>,
    /// The fault queue its devices' page requests go to
    /// (`IOMMU_HWPT_FAULT_ID_VALID`); held from allocation to release.
    pub fault: Option<Arc<Fault>>,
    /// Allocated with `IOMMU_HWPT_ALLOC_PASID` (see [`Hwpt::pasid_compat`]).
    pub pasid_compat: bool,
    pub(super) refs: AtomicU32,
}

impl core::fmt::Debug for HwptNested {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HwptNested(parent {})", self.parent_id)
    }
}

impl HwptNested {
    /// References held on it: attached devices and PASIDs.
    pub fn refs(&self) -> u32 {
        self.refs.load(Ordering::SeqCst)
    }
    /// The parent (stage-2) HWPT.
    pub fn parent(&self) -> &Arc<Hwpt> {
        &self.parent
    }
}

impl Ictx {
    /// The nested HWPT `id`.
    pub fn hwpt_nested(&self, id: u32) -> Result<Arc<HwptNested>> {
        match self.get(id)? {
            Object::HwptNested(h) => Ok(h),
            _ => Err(Errno::ENOENT),
        }
    }

    /// `IOMMU_HWPT_ALLOC` on a paging HWPT: a nested HWPT for `dev_id` on
    /// parent `parent_id`, in Linux's order: `flags` other than
    /// `FAULT_ID_VALID` and `ALLOC_PASID` (Linux 6.15) or empty data →
    /// `EOPNOTSUPP`; an automatic parent
    /// or one allocated without `NEST_PARENT` → `EINVAL`; then the
    /// driver's own checks (no nesting support → `EOPNOTSUPP`); last,
    /// with `FAULT_ID_VALID` in `flags`, the fault object `fault_id`
    /// (`ENOENT`), which the new HWPT then holds.
    pub fn hwpt_nested_alloc(
        &self,
        dev_id: u32,
        parent_id: u32,
        flags: u32,
        fault_id: u32,
        data: &UserData<'_>,
    ) -> Result<u32> {
        let dev = self.device(dev_id)?;
        let parent = self.hwpt(parent_id)?;
        use crate::uapi::{IOMMU_HWPT_ALLOC_PASID, IOMMU_HWPT_FAULT_ID_VALID};
        if flags & !(IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID) != 0 || data.len == 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if parent.auto || !parent.nest_parent {
            return Err(Errno::EINVAL);
        }
        let nesting = dev.nesting.clone().ok_or(Errno::EOPNOTSUPP)?;
        self.accounting.faults.point()?;
        let domain = {
            let _iopt = parent.ioas.iopt.lock();
            let mut pd = parent.domain.lock();
            nesting.alloc_nested_domain(&mut **pd, flags & !crate::uapi::IOMMU_HWPT_FAULT_ID_VALID, data)?
        };
        let fault = if flags & crate::uapi::IOMMU_HWPT_FAULT_ID_VALID != 0 {
            // The domain is dropped (undone) when the fault is missing.
            Some(self.fault(fault_id)?)
        } else {
            None
        };
        let hwpt = Arc::new(HwptNested {
            parent_id,
            parent: parent.clone(),
            domain: Mutex::new(domain),
            fault: fault.clone(),
            pasid_compat: flags & IOMMU_HWPT_ALLOC_PASID != 0,
            refs: AtomicU32::new(0),
        });
        // The parent's (and fault's) references are taken before the id
        // is visible.
        parent.refs.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = &fault {
            f.refs.fetch_add(1, Ordering::SeqCst);
        }
        self.insert(Object::HwptNested(hwpt)).inspect_err(|_| {
            parent.refs.fetch_sub(1, Ordering::SeqCst);
            if let Some(f) = &fault {
                f.refs.fetch_sub(1, Ordering::SeqCst);
            }
        })
    }

    /// `IOMMU_HWPT_INVALIDATE` on nested HWPT `hwpt_id`: the driver
    /// handles `array`; `array.entry_num` says how many requests it did.
    pub fn hwpt_invalidate(&self, hwpt_id: u32, array: &mut UserDataArray<'_>) -> Result<()> {
        let hwpt = match self.hwpt_nested(hwpt_id) {
            Ok(h) => h,
            Err(e) => {
                array.entry_num = 0;
                return Err(e);
            }
        };
        hwpt.domain.lock().cache_invalidate_user(array)
    }

    /// Drops a nested HWPT's hold on its parent and fault queue.
    pub(super) fn release_nested(&self, h: &HwptNested) {
        h.parent.refs.fetch_sub(1, Ordering::SeqCst);
        if let Some(f) = &h.fault {
            f.refs.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::tests::ctx;
    use crate::dispatch::ioctl;
    use crate::errno::Errno;
    use crate::memsrc::MemorySource;
    use crate::selftest::cmd::MockDevice;
    use crate::selftest::mock::MOCK_APERTURE_START;
    use crate::uapi::*;
    use alloc::sync::Arc;

    /// User memory of `ctx()`: 16 MiB at 0x4000_0000.
    const MEM: u64 = 0x4000_0000;
    const MEM_END: u64 = MEM + (16 << 20);

    /// A context with an IOAS, a mock device attached to it, a NEST_PARENT
    /// HWPT and a nested HWPT on it: `(ictx, mem, ioas, dev, parent, nested)`.
    fn world() -> (crate::ctx::Ictx, Arc<crate::memsrc::FakeAddressSpace>, u32, u32, u32, u32) {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let dev = c.bind_nesting_device(Arc::new(MockDevice::new(0))).unwrap();
        c.attach(dev, ioas).unwrap();
        let parent = c.hwpt_alloc_flags(dev, ioas, false, true).unwrap();
        mem.write_user(MEM, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
        let data = super::UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        let nested = c.hwpt_nested_alloc(dev, parent, 0, 0, &data).unwrap();
        (c, mem, ioas, dev, parent, nested)
    }

    fn invalidate(c: &crate::ctx::Ictx, hwpt_id: u32, uptr: u64, len: u32, num: u32) -> (Result<(), Errno>, u32) {
        let cmd = IommuHwptInvalidate {
            size: IommuHwptInvalidate::SIZE as u32,
            hwpt_id,
            data_uptr: uptr,
            data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
            entry_len: len,
            entry_num: num,
            ..Default::default()
        };
        let mut buf = cmd.to_bytes();
        let r = ioctl(c, IOMMU_HWPT_INVALIDATE, &mut buf);
        (r, IommuHwptInvalidate::read(&buf).entry_num)
    }

    #[test]
    fn largest_sizes_allocate_nothing() {
        let (c, mem, _ioas, dev, parent, nested) = world();
        // The largest entry length is longer than the driver's struct.
        assert_eq!(invalidate(&c, nested, MEM, u32::MAX, u32::MAX), (Err(Errno::EINVAL), 0));
        // The largest count of valid entries is read one at a time until
        // memory ends: the two zeroed entries before the end are handled.
        mem.write_user(MEM_END - 16, &[0; 16]).unwrap();
        assert_eq!(invalidate(&c, nested, MEM_END - 16, 8, u32::MAX), (Err(Errno::EFAULT), 2));
        // The largest HWPT_ALLOC data length is longer than the mock's.
        let a = IommuHwptAlloc {
            size: IommuHwptAlloc::SIZE as u32,
            dev_id: dev,
            pt_id: parent,
            data_type: IOMMU_HWPT_DATA_SELFTEST,
            data_len: u32::MAX,
            data_uptr: MEM,
            ..Default::default()
        };
        let mut buf = a.to_bytes();
        assert_eq!(ioctl(&c, IOMMU_HWPT_ALLOC, &mut buf), Err(Errno::EINVAL));
    }

    #[test]
    fn early_errors_write_back_zero() {
        let (c, _mem, _ioas, _dev, parent, nested) = world();
        let mut cmd = IommuHwptInvalidate {
            size: IommuHwptInvalidate::SIZE as u32,
            hwpt_id: nested,
            data_uptr: MEM,
            data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
            entry_len: 8,
            entry_num: 5,
            __reserved: 1,
        };
        let mut buf = cmd.to_bytes();
        assert_eq!(ioctl(&c, IOMMU_HWPT_INVALIDATE, &mut buf), Err(Errno::EOPNOTSUPP));
        assert_eq!(IommuHwptInvalidate::read(&buf).entry_num, 0);
        cmd.__reserved = 0;
        cmd.hwpt_id = parent;
        let mut buf = cmd.to_bytes();
        assert_eq!(ioctl(&c, IOMMU_HWPT_INVALIDATE, &mut buf), Err(Errno::ENOENT));
        assert_eq!(IommuHwptInvalidate::read(&buf).entry_num, 0);
    }

    /// A mock device whose driver makes its own parents: refused (as a
    /// unit that cannot nest), or a marked domain its nested allocation
    /// insists on.
    struct OwnParents {
        inner: MockDevice,
        refuse: bool,
    }
    use portcullis_iommu::DomainError;

    /// The parents `OwnParents` makes.
    struct Marked(alloc::boxed::Box<dyn portcullis_iommu::IommuDomain>);
    impl portcullis_iommu::IommuDomain for Marked {
        fn page_sizes(&self) -> u64 {
            self.0.page_sizes()
        }
        fn aperture(&self) -> portcullis_iommu::IovaRange {
            self.0.aperture()
        }
        fn map(&mut self, iova: u64, phys: u64, len: u64, prot: portcullis_iommu::Prot) -> Result<(), DomainError> {
            self.0.map(iova, phys, len, prot)
        }
        fn unmap(&mut self, iova: u64, len: u64, gather: &mut portcullis_iommu::IotlbGather) -> u64 {
            self.0.unmap(iova, len, gather)
        }
        fn iotlb_sync(&mut self, gather: &mut portcullis_iommu::IotlbGather) -> Result<(), DomainError> {
            self.0.iotlb_sync(gather)
        }
        fn iova_to_phys(&self, iova: u64) -> Option<u64> {
            self.0.iova_to_phys(iova)
        }
        fn enforce_cache_coherency(&mut self) -> bool {
            self.0.enforce_cache_coherency()
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
            Some(self)
        }
        fn attach_device(&mut self, d: portcullis_iommu::DeviceHandle) -> Result<(), DomainError> {
            self.0.attach_device(d)
        }
        fn detach_device(&mut self, d: portcullis_iommu::DeviceHandle) -> Result<(), DomainError> {
            self.0.detach_device(d)
        }
    }
    impl portcullis_iommu::DeviceOps for OwnParents {
        fn handle(&self) -> portcullis_iommu::DeviceHandle {
            self.inner.handle()
        }
        fn alloc_domain(
            &self,
        ) -> Result<alloc::boxed::Box<dyn portcullis_iommu::IommuDomain>, portcullis_iommu::DomainError> {
            self.inner.alloc_domain()
        }
    }
    impl super::NestingOps for OwnParents {
        fn alloc_nest_parent(
            &self,
            _dirty: bool,
        ) -> Option<crate::errno::Result<alloc::boxed::Box<dyn portcullis_iommu::IommuDomain>>> {
            use portcullis_iommu::DeviceOps;
            if self.refuse {
                return Some(Err(Errno::EOPNOTSUPP));
            }
            Some(Ok(alloc::boxed::Box::new(Marked(self.inner.alloc_domain().unwrap()))))
        }
        fn alloc_nested_domain(
            &self,
            parent: &mut dyn portcullis_iommu::IommuDomain,
            _flags: u32,
            _data: &super::UserData<'_>,
        ) -> crate::errno::Result<alloc::boxed::Box<dyn super::NestedDomain>> {
            let marked = parent.as_any_mut().and_then(|a| a.downcast_mut::<Marked>()).ok_or(Errno::EINVAL)?;
            crate::selftest::mock::MockNestedDomain::alloc(&mut *marked.0, _data)
        }
    }

    #[test]
    fn a_nesting_driver_makes_its_own_parents() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let no = c.bind_nesting_device(Arc::new(OwnParents { inner: MockDevice::new(0), refuse: true })).unwrap();
        assert_eq!(c.hwpt_alloc_flags(no, ioas, false, true), Err(Errno::EOPNOTSUPP));
        assert!(c.hwpt_alloc_flags(no, ioas, false, false).is_ok(), "other paging HWPTs as before");
        let yes = c.bind_nesting_device(Arc::new(OwnParents { inner: MockDevice::new(0), refuse: false })).unwrap();
        let parent = c.hwpt_alloc_flags(yes, ioas, false, true).unwrap();
        let plain = c.hwpt_alloc_flags(yes, ioas, false, false).unwrap();
        mem.write_user(MEM, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
        let data = super::UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        assert!(c.hwpt_nested_alloc(yes, parent, 0, 0, &data).is_ok());
        // NEST_PARENT is checked by the core before the driver looks.
        assert_eq!(c.hwpt_nested_alloc(yes, plain, 0, 0, &data), Err(Errno::EINVAL));
    }

    #[test]
    fn parent_held_and_dma_through_the_nested_domain() {
        let (c, mem, ioas, dev, parent, nested) = world();
        c.ioas_map(ioas, Some(MOCK_APERTURE_START), MEM, 0x10000, true, true).unwrap();
        c.replace(dev, nested).unwrap();
        assert_eq!(c.attached_hwpt(dev), Ok(Some(nested)));
        assert_eq!(c.destroy(parent), Err(Errno::EBUSY), "a nested HWPT holds its parent");
        assert_eq!(c.destroy(nested), Err(Errno::EBUSY), "a device holds its nested HWPT");
        // The parent's domain stays in the IOAS: it still maps the area.
        let p = c.hwpt(parent).unwrap();
        assert!(p.domain.lock().iova_to_phys(MOCK_APERTURE_START).is_some());
        assert_eq!(c.hwpt(nested).map(|_| ()), Err(Errno::ENOENT), "not a paging HWPT");
        // A nested HWPT is no parent, and the parent must be NEST_PARENT.
        let data = super::UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, MEM, 4);
        assert_eq!(c.hwpt_nested_alloc(dev, nested, 0, 0, &data), Err(Errno::ENOENT));
        // A device without nesting support.
        let plain = c.bind_device(Arc::new(MockDevice::new(0))).unwrap();
        assert_eq!(c.hwpt_nested_alloc(plain, parent, 0, 0, &data), Err(Errno::EOPNOTSUPP));
        // Closing releases everything, nested HWPT and its device first.
        assert!(mem.pinned_pages() > 0);
        drop(c);
        assert_eq!(mem.pinned_pages(), 0);
    }
}
