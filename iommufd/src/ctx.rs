//! The iommufd context (one per open `/dev/iommu`, or per VM) and its
//! object table: IOAS, HW page tables, devices and accesses.
//!
//! Objects have 31-bit ids, allocated lowest-free from 1 as Linux does.
//! An object that another object refers to (an IOAS with HWPTs or
//! accesses, a HWPT with attached devices) cannot be destroyed: `EBUSY`.
//! A wrong id, or an id of the wrong type, is `ENOENT`.
//!
//! Lock order (never taken the other way round):
//! `objects` → `Ioas::iopt` → a domain's mutex → `Pages` → memory source.
//! The object table lock is held only to look objects up, insert or
//! remove them, never across an IOAS operation, so operations on different
//! IOAS run in parallel and operations on one IOAS serialise on its mutex.

use crate::errno::{Errno, Result};
use crate::iopt::{DomainRef, IoPagetable, Owner};
use crate::memsrc::{MemorySource, PAGE_SIZE};
use crate::pages::{AccountMode, Accounting, Pages};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
pub use portcullis_iommu::DeviceOps;
use portcullis_iommu::{DomainError, Prot};
use spin::Mutex;

/// Largest object id (ids are positive 31-bit numbers).
pub const MAX_OBJECT_ID: u32 = i32::MAX as u32;

/// An in-kernel user of an IOAS (a mediated device, an emulated DMA
/// engine): it pins pages or reads and writes through IOVAs with the CPU.
pub trait AccessOps: Send + Sync {
    /// The IOAS is about to unmap `[iova, iova + length)`: the access must
    /// unpin everything it pinned there (with [`Ictx::access_unpin_pages`])
    /// before returning.
    fn unmap(&self, ictx: &Ictx, access_id: u32, iova: u64, length: u64);
    /// Whether the access pins pages (forces PAGE_SIZE IOVA alignment).
    fn needs_pin_pages(&self) -> bool {
        true
    }
}

/// An access object.
pub struct Access {
    ops: Arc<dyn AccessOps>,
    ioas: Mutex<Option<u32>>,
    refs: AtomicU32,
}

impl core::fmt::Debug for Access {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Access(ioas {:?})", self.ioas.lock())
    }
}

/// An I/O address space.
pub struct Ioas {
    /// The page table (areas, reservations, domains).
    pub iopt: Mutex<IoPagetable>,
    /// HWPTs made for this IOAS automatically by attach, in creation order.
    auto_hwpts: Mutex<Vec<u32>>,
    /// Accesses attached to this IOAS.
    accesses: Mutex<Vec<u32>>,
    refs: AtomicU32,
}

impl core::fmt::Debug for Ioas {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ioas({:?})", self.iopt.lock())
    }
}

/// A HW page table of the paging kind: a domain loaded with an IOAS.
pub struct Hwpt {
    /// The IOAS it mirrors.
    pub ioas_id: u32,
    ioas: Arc<Ioas>,
    /// The domain.
    pub domain: DomainRef,
    /// Created by attach (destroyed with its last device) or by HWPT_ALLOC.
    pub auto: bool,
    /// The domain enforces cache coherency (snoop) on every mapping.
    pub coherent: bool,
    refs: AtomicU32,
}

impl core::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Hwpt(ioas {}, auto {})", self.ioas_id, self.auto)
    }
}

/// A bound device.
pub struct Device {
    ops: Arc<dyn DeviceOps>,
    /// The HWPT it is attached to.
    attached: Mutex<Option<u32>>,
    refs: AtomicU32,
}

impl Device {
    /// The driver's hardware information for `IOMMU_GET_HW_INFO`.
    pub fn hw_info(&self) -> (u32, Vec<u8>) {
        self.ops.hw_info()
    }
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Device({:?}, attached {:?})", self.ops.handle(), self.attached.lock())
    }
}

/// One entry of the object table.
#[derive(Clone, Debug)]
pub enum Object {
    /// An IOAS.
    Ioas(Arc<Ioas>),
    /// A paging HWPT.
    Hwpt(Arc<Hwpt>),
    /// A device.
    Device(Arc<Device>),
    /// An access (in-kernel user of an IOAS).
    Access(Arc<Access>),
    /// An id taken by an object still being created: not visible to
    /// lookups (`ENOENT`), as Linux's not yet finalized objects.
    Placeholder(Arc<AtomicU32>),
    /// An object that owns a device binding (the selftest's mock device
    /// object; a VFIO device file in Linux): destroying it unbinds the
    /// device.
    DeviceOwner(Arc<DeviceOwner>),
}

/// See [`Object::DeviceOwner`].
#[derive(Debug)]
pub struct DeviceOwner {
    /// The bound device's object id (0 until bound).
    pub dev_id: AtomicU32,
    refs: AtomicU32,
}

impl Object {
    fn refs(&self) -> &AtomicU32 {
        match self {
            Object::Ioas(o) => &o.refs,
            Object::Hwpt(o) => &o.refs,
            Object::Device(o) => &o.refs,
            Object::DeviceOwner(o) => &o.refs,
            Object::Access(o) => &o.refs,
            Object::Placeholder(r) => r,
        }
    }
}

/// An iommufd context.
pub struct Ictx {
    source: Arc<dyn MemorySource>,
    accounting: Arc<Accounting>,
    objects: Mutex<BTreeMap<u32, Object>>,
    compat_ioas: Mutex<Option<u32>>,
    /// State of the selftest commands (access "file descriptors").
    #[cfg(feature = "selftest")]
    pub(crate) selftest: Mutex<crate::selftest::cmd::State>,
}

impl core::fmt::Debug for Ictx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ictx({} objects, {} pages pinned)", self.objects.lock().len(), self.accounting.pinned())
    }
}

fn prot_of(readable: bool, writable: bool) -> Prot {
    let mut p = Prot::CACHE;
    if readable {
        p = p | Prot::READ;
    }
    if writable {
        p = p | Prot::WRITE;
    }
    p
}

impl Ictx {
    /// A context over `source`, pinning at most `pin_limit_pages` pages.
    pub fn new(source: Arc<dyn MemorySource>, pin_limit_pages: u64) -> Self {
        Self {
            source,
            accounting: Arc::new(Accounting::new(pin_limit_pages)),
            objects: Mutex::new(BTreeMap::new()),
            compat_ioas: Mutex::new(None),
            #[cfg(feature = "selftest")]
            selftest: Mutex::new(crate::selftest::cmd::State::default()),
        }
    }

    /// The IOAS the VFIO compatibility ioctls use, if set and still alive.
    pub fn compat_ioas(&self) -> Option<u32> {
        let id = (*self.compat_ioas.lock())?;
        self.ioas(id).ok().map(|_| id)
    }

    /// Sets or clears the VFIO compatibility IOAS.
    pub fn set_compat_ioas(&self, id: Option<u32>) {
        *self.compat_ioas.lock() = id;
    }

    /// The pinned-page accounting.
    pub fn accounting(&self) -> &Arc<Accounting> {
        &self.accounting
    }

    /// The memory source.
    pub fn source(&self) -> &Arc<dyn MemorySource> {
        &self.source
    }

    /// Number of live objects.
    pub fn object_count(&self) -> usize {
        self.objects.lock().len()
    }

    /// Ids of live objects (for tests).
    pub fn object_ids(&self) -> Vec<u32> {
        self.objects.lock().keys().copied().collect()
    }

    fn insert(&self, obj: Object) -> Result<u32> {
        self.accounting.faults.point()?;
        let mut objects = self.objects.lock();
        let mut id = 1u32;
        for &k in objects.keys() {
            if k != id {
                break;
            }
            id += 1;
        }
        if id > MAX_OBJECT_ID {
            return Err(Errno::ENOSPC);
        }
        objects.insert(id, obj);
        Ok(id)
    }

    fn get(&self, id: u32) -> Result<Object> {
        match self.objects.lock().get(&id) {
            None | Some(Object::Placeholder(_)) => Err(Errno::ENOENT),
            Some(o) => Ok(o.clone()),
        }
    }

    /// The IOAS `id`.
    pub fn ioas(&self, id: u32) -> Result<Arc<Ioas>> {
        match self.get(id)? {
            Object::Ioas(i) => Ok(i),
            _ => Err(Errno::ENOENT),
        }
    }

    /// The HWPT `id`.
    pub fn hwpt(&self, id: u32) -> Result<Arc<Hwpt>> {
        match self.get(id)? {
            Object::Hwpt(h) => Ok(h),
            _ => Err(Errno::ENOENT),
        }
    }

    /// The device `id`.
    pub fn device(&self, id: u32) -> Result<Arc<Device>> {
        match self.get(id)? {
            Object::Device(d) => Ok(d),
            _ => Err(Errno::ENOENT),
        }
    }

    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<u32> {
        self.insert(Object::Ioas(Arc::new(Ioas {
            iopt: Mutex::new(IoPagetable::new()),
            auto_hwpts: Mutex::new(Vec::new()),
            accesses: Mutex::new(Vec::new()),
            refs: AtomicU32::new(0),
        })))
    }

    /// `IOMMU_DESTROY` of an IOAS or HWPT (devices go through
    /// [`Self::unbind_device`]). `EBUSY` while another object uses it.
    pub fn destroy(&self, id: u32) -> Result<()> {
        let obj = {
            let mut objects = self.objects.lock();
            let obj = objects.get(&id).ok_or(Errno::ENOENT)?;
            if matches!(obj, Object::Placeholder(_)) {
                return Err(Errno::ENOENT);
            }
            // A device is held by whoever bound it (its owner object).
            if matches!(obj, Object::Device(_)) || obj.refs().load(Ordering::SeqCst) != 0 {
                return Err(Errno::EBUSY);
            }
            objects.remove(&id).expect("present")
        };
        match obj {
            Object::DeviceOwner(o) => {
                let dev_id = o.dev_id.load(Ordering::SeqCst);
                if dev_id != 0 {
                    self.unbind_device(dev_id)?;
                }
            }
            // The object is gone either way; a failed invalidation is
            // reported (its pages stay pinned).
            Object::Ioas(ioas) => ioas.iopt.lock().unmap_all().map(|_| ())?,
            Object::Hwpt(h) => self.release_hwpt(id, &h)?,
            Object::Device(_) | Object::Access(_) | Object::Placeholder(_) => {
                unreachable!("refused above: held by their drivers, or not created yet")
            }
        }
        Ok(())
    }

    /// Drops a HWPT's hold on its IOAS. The domain leaves the IOAS even
    /// when its final invalidation fails (the error is returned, and the
    /// pages it mapped stay pinned).
    fn release_hwpt(&self, id: u32, h: &Hwpt) -> Result<()> {
        let r = h.ioas.iopt.lock().remove_domain(id as u64);
        h.ioas.auto_hwpts.lock().retain(|x| *x != id);
        h.ioas.refs.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// `IOMMU_IOAS_MAP`: maps user memory; returns the IOVA used.
    pub fn ioas_map(
        &self,
        ioas_id: u32,
        iova: Option<u64>,
        uptr: u64,
        length: u64,
        readable: bool,
        writable: bool,
    ) -> Result<u64> {
        let ioas = self.ioas(ioas_id)?;
        let (pages, off) = Pages::new(self.source.clone(), self.accounting.clone(), uptr, length, writable)?;
        let slice = crate::iopt::PagesSlice { pages, start_byte: off, length };
        ioas.iopt.lock().map_pages(core::slice::from_ref(&slice), length, iova, prot_of(readable, writable))
    }

    /// `IOMMU_IOAS_UNMAP`; `(0, u64::MAX)` unmaps everything.
    pub fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64> {
        let ioas = self.ioas(ioas_id)?;
        let all = iova == 0 && length == u64::MAX;
        let last = if all { u64::MAX } else { iova.checked_add(length.max(1) - 1).ok_or(Errno::EOVERFLOW)? };
        // Accesses holding pages in the range are asked to let go first
        // (with no IOAS lock held: they unpin through this context).
        for _ in 0..16 {
            let blocker = ioas.iopt.lock().access_blocker(iova, last);
            let Some((s, l)) = blocker else {
                let mut iopt = ioas.iopt.lock();
                return if all { iopt.unmap_all() } else { iopt.unmap(iova, length) };
            };
            let ids = ioas.accesses.lock().clone();
            for id in ids {
                if let Ok(Object::Access(a)) = self.get(id) {
                    a.ops.unmap(self, id, s, l - s + 1);
                }
            }
        }
        // An access that does not unpin when told is a driver bug.
        Err(Errno::EDEADLK)
    }

    fn access(&self, id: u32) -> Result<Arc<Access>> {
        match self.get(id)? {
            Object::Access(a) => Ok(a),
            _ => Err(Errno::ENOENT),
        }
    }

    /// Creates an access (not attached). Its driver holds it: `IOMMU_DESTROY`
    /// answers `EBUSY`; [`Self::access_destroy`] ends it.
    pub fn access_create(&self, ops: Arc<dyn AccessOps>) -> Result<u32> {
        self.insert(Object::Access(Arc::new(Access { ops, ioas: Mutex::new(None), refs: AtomicU32::new(1) })))
    }

    /// Ends an access: detaches it (its driver is told to unpin
    /// everything) and removes it.
    pub fn access_destroy(&self, id: u32) -> Result<()> {
        let a = self.access(id)?;
        self.access_change_ioas(id, &a, None)?;
        self.objects.lock().remove(&id);
        Ok(())
    }

    fn access_change_ioas(&self, id: u32, a: &Access, new: Option<u32>) -> Result<()> {
        let cur = *a.ioas.lock();
        if cur == new {
            return Ok(());
        }
        if let Some(n) = new {
            let ioas = self.ioas(n)?;
            let align = if a.ops.needs_pin_pages() { PAGE_SIZE } else { 1 };
            ioas.iopt.lock().add_access(id, align)?;
            ioas.refs.fetch_add(1, Ordering::SeqCst);
            ioas.accesses.lock().push(id);
        }
        *a.ioas.lock() = new;
        if let Some(c) = cur
            && let Ok(old) = self.ioas(c)
        {
            // The driver drops its pins on the old IOAS (still reachable:
            // unpin finds its areas there).
            *a.ioas.lock() = Some(c);
            a.ops.unmap(self, id, 0, u64::MAX);
            *a.ioas.lock() = new;
            old.iopt.lock().remove_access(id);
            old.accesses.lock().retain(|x| *x != id);
            old.refs.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Attaches a detached access to an IOAS.
    pub fn access_attach(&self, id: u32, ioas_id: u32) -> Result<()> {
        let a = self.access(id)?;
        if a.ioas.lock().is_some() {
            return Err(Errno::EINVAL);
        }
        self.access_change_ioas(id, &a, Some(ioas_id))
    }

    /// Moves an attached access to another IOAS (`ENOENT` if detached).
    pub fn access_replace(&self, id: u32, ioas_id: u32) -> Result<()> {
        let a = self.access(id)?;
        if a.ioas.lock().is_none() {
            return Err(Errno::ENOENT);
        }
        self.access_change_ioas(id, &a, Some(ioas_id))
    }

    fn access_ioas(&self, id: u32) -> Result<(Arc<Access>, Arc<Ioas>)> {
        let a = self.access(id)?;
        let ioas_id = (*a.ioas.lock()).ok_or(Errno::ENOENT)?;
        Ok((a, self.ioas(ioas_id)?))
    }

    /// Pins the pages under `[iova, iova + length)` for access `id`;
    /// returns their physical addresses.
    pub fn access_pin_pages(&self, id: u32, iova: u64, length: u64, write: bool) -> Result<Vec<u64>> {
        let (a, ioas) = self.access_ioas(id)?;
        if !a.ops.needs_pin_pages() {
            return Err(Errno::EINVAL);
        }
        ioas.iopt.lock().access_pin(iova, length, write)
    }

    /// Releases a pin of [`Self::access_pin_pages`] (same range).
    pub fn access_unpin_pages(&self, id: u32, iova: u64, length: u64) -> Result<()> {
        let (_, ioas) = self.access_ioas(id)?;
        ioas.iopt.lock().access_unpin(iova, length)
    }

    /// Reads (`write` false) or writes `data` at `iova` through access `id`.
    pub fn access_rw(&self, id: u32, iova: u64, data: &mut [u8], write: bool) -> Result<()> {
        if data.is_empty() {
            return Err(Errno::EINVAL);
        }
        iova.checked_add(data.len() as u64 - 1).ok_or(Errno::EOVERFLOW)?;
        let (_, ioas) = self.access_ioas(id)?;
        ioas.iopt.lock().access_rw(iova, data, write)
    }

    /// `IOMMU_IOAS_COPY`: maps what `src` maps at `src_iova` into `dst`.
    #[allow(clippy::too_many_arguments)] // mirrors the uAPI struct's fields
    pub fn ioas_copy(
        &self,
        dst_id: u32,
        src_id: u32,
        src_iova: u64,
        dst_iova: Option<u64>,
        length: u64,
        readable: bool,
        writable: bool,
    ) -> Result<u64> {
        let src = self.ioas(src_id)?;
        let slices = src.iopt.lock().get_pages(src_iova, length)?;
        let dst = self.ioas(dst_id)?;
        let mut iopt = dst.iopt.lock();
        iopt.map_pages(&slices, length, dst_iova, prot_of(readable, writable))
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: usable ranges and the IOVA alignment.
    pub fn ioas_iova_ranges(&self, ioas_id: u32) -> Result<(Vec<(u64, u64)>, u64)> {
        let ioas = self.ioas(ioas_id)?;
        let iopt = ioas.iopt.lock();
        Ok((iopt.iova_ranges(), iopt.iova_alignment()))
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    pub fn ioas_allow_iovas(&self, ioas_id: u32, ranges: Vec<(u64, u64)>) -> Result<()> {
        let ioas = self.ioas(ioas_id)?;
        ioas.iopt.lock().set_allowed(ranges)
    }

    /// `IOMMU_OPTION` RLIMIT_MODE set (only while no object exists).
    pub fn set_account_mode(&self, mode: AccountMode) -> Result<()> {
        let objects = self.objects.lock();
        if !objects.is_empty() {
            return Err(Errno::EBUSY);
        }
        self.accounting.set_mode(mode)
    }

    /// Binds a device; returns its object id. It starts detached.
    pub fn bind_device(&self, ops: Arc<dyn DeviceOps>) -> Result<u32> {
        self.insert(Object::Device(Arc::new(Device { ops, attached: Mutex::new(None), refs: AtomicU32::new(0) })))
    }

    /// Takes an id for an owner object and binds `ops` under it (the
    /// selftest's mock device). Returns `(owner_id, device_id)`; the owner
    /// stays invisible until [`Self::finalize_owner`] (or goes with
    /// [`Self::abort_owner`]), as Linux's object under construction.
    pub fn bind_owned_device(&self, ops: Arc<dyn DeviceOps>) -> Result<(u32, u32)> {
        let owner_id = self.insert(Object::Placeholder(Arc::new(AtomicU32::new(0))))?;
        match self.bind_device(ops) {
            Ok(dev_id) => Ok((owner_id, dev_id)),
            Err(e) => {
                self.objects.lock().remove(&owner_id);
                Err(e)
            }
        }
    }

    /// Makes the owner from [`Self::bind_owned_device`] visible; destroying
    /// it from then on unbinds the device.
    pub fn finalize_owner(&self, owner_id: u32, dev_id: u32) {
        let owner = Arc::new(DeviceOwner { dev_id: AtomicU32::new(dev_id), refs: AtomicU32::new(0) });
        self.objects.lock().insert(owner_id, Object::DeviceOwner(owner));
    }

    /// Undoes [`Self::bind_owned_device`].
    pub fn abort_owner(&self, owner_id: u32, dev_id: u32) {
        let _ = self.unbind_device(dev_id);
        self.objects.lock().remove(&owner_id);
    }

    /// The IOAS an access is attached to.
    pub fn access_ioas_id(&self, id: u32) -> Option<u32> {
        self.access(id).ok().and_then(|a| *a.ioas.lock())
    }

    /// The owner object `id`.
    pub fn device_owner(&self, id: u32) -> Result<Arc<DeviceOwner>> {
        match self.get(id)? {
            Object::DeviceOwner(o) => Ok(o),
            _ => Err(Errno::ENOENT),
        }
    }

    /// Unbinds a device (detaching it first).
    pub fn unbind_device(&self, dev_id: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        self.detach(dev_id)?;
        if dev.refs.load(Ordering::SeqCst) != 0 {
            return Err(Errno::EBUSY);
        }
        self.objects.lock().remove(&dev_id);
        Ok(())
    }

    fn new_hwpt(&self, ioas_id: u32, ioas: &Arc<Ioas>, dev: &Device, auto: bool) -> Result<(u32, Arc<Hwpt>)> {
        self.accounting.faults.point()?;
        let mut domain = dev.ops.alloc_domain().map_err(|_| Errno::ENOMEM)?;
        let coherent = domain.enforce_cache_coherency();
        let domain: DomainRef = Arc::new(Mutex::new(domain));
        let hwpt = Arc::new(Hwpt {
            ioas_id,
            ioas: ioas.clone(),
            domain: domain.clone(),
            auto,
            coherent,
            refs: AtomicU32::new(0),
        });
        let id = self.insert(Object::Hwpt(hwpt.clone()))?;
        if let Err(e) = ioas.iopt.lock().add_domain(id as u64, domain) {
            self.objects.lock().remove(&id);
            return Err(e);
        }
        ioas.refs.fetch_add(1, Ordering::SeqCst);
        if auto {
            ioas.auto_hwpts.lock().push(id);
        }
        Ok((id, hwpt))
    }

    /// `IOMMU_HWPT_ALLOC` (paging): a domain for `dev_id` loaded with the IOAS.
    pub fn hwpt_alloc(&self, dev_id: u32, ioas_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        let ioas = self.ioas(ioas_id)?;
        self.new_hwpt(ioas_id, &ioas, &dev, false).map(|(id, _)| id)
    }

    fn reserve_device(&self, dev_id: u32, dev: &Device, ioas: &Ioas) -> Result<()> {
        let mut iopt = ioas.iopt.lock();
        for (s, l) in dev.ops.reserved_regions() {
            if let Err(e) = iopt.reserve(s, l, Owner::Device(dev_id)) {
                iopt.remove_reserved(Owner::Device(dev_id));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Attaches a device to a HWPT, or to an IOAS (reusing a compatible
    /// automatic HWPT or making one). Returns the HWPT id. `EINVAL` if the
    /// device is already attached (use [`Self::replace`]).
    pub fn attach(&self, dev_id: u32, pt_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        if dev.attached.lock().is_some() {
            return Err(Errno::EINVAL);
        }
        self.attach_to(dev_id, &dev, pt_id)
    }

    fn attach_to(&self, dev_id: u32, dev: &Arc<Device>, pt_id: u32) -> Result<u32> {
        let handle = dev.ops.handle();
        let try_hwpt = |hwpt_id: u32, hwpt: &Arc<Hwpt>| -> Result<u32> {
            self.reserve_device(dev_id, dev, &hwpt.ioas)?;
            if let Err(e) = hwpt.domain.lock().attach_device(handle) {
                hwpt.ioas.iopt.lock().remove_reserved(Owner::Device(dev_id));
                return Err(if e == DomainError::Incompatible { Errno::EINVAL } else { Errno::ENOMEM });
            }
            hwpt.refs.fetch_add(1, Ordering::SeqCst);
            *dev.attached.lock() = Some(hwpt_id);
            Ok(hwpt_id)
        };
        match self.get(pt_id)? {
            Object::Hwpt(hwpt) => try_hwpt(pt_id, &hwpt),
            Object::Ioas(ioas) => {
                let autos = ioas.auto_hwpts.lock().clone();
                for id in autos {
                    if let Ok(hwpt) = self.hwpt(id) {
                        match try_hwpt(id, &hwpt) {
                            Ok(id) => return Ok(id),
                            Err(Errno::EINVAL) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                }
                let (id, hwpt) = self.new_hwpt(pt_id, &ioas, dev, true)?;
                match try_hwpt(id, &hwpt) {
                    Ok(id) => Ok(id),
                    Err(e) => {
                        self.objects.lock().remove(&id);
                        // A failed invalidation of the new domain is the
                        // more serious error.
                        self.release_hwpt(id, &hwpt)?;
                        Err(e)
                    }
                }
            }
            // Linux's iommufd_device_change_pt: any other object type.
            Object::Device(_) | Object::DeviceOwner(_) | Object::Access(_) | Object::Placeholder(_) => {
                Err(Errno::EINVAL)
            }
        }
    }

    /// Detaches a device (no-op when detached). An automatic HWPT goes
    /// away with its last device.
    pub fn detach(&self, dev_id: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        let Some(hwpt_id) = dev.attached.lock().take() else { return Ok(()) };
        let hwpt = self.hwpt(hwpt_id)?;
        hwpt.domain.lock().detach_device(dev.ops.handle());
        hwpt.ioas.iopt.lock().remove_reserved(Owner::Device(dev_id));
        if hwpt.refs.fetch_sub(1, Ordering::SeqCst) == 1 && hwpt.auto {
            self.objects.lock().remove(&hwpt_id);
            // The device is detached either way.
            self.release_hwpt(hwpt_id, &hwpt)?;
        }
        Ok(())
    }

    /// Moves an attached device to another HWPT or IOAS. On failure the
    /// device stays where it was.
    pub fn replace(&self, dev_id: u32, pt_id: u32) -> Result<u32> {
        let dev = self.device(dev_id)?;
        let Some(old) = *dev.attached.lock() else { return Err(Errno::EINVAL) };
        if old == pt_id {
            return Ok(old);
        }
        // Keep the old HWPT alive while trying the new one.
        let old_hwpt = self.hwpt(old)?;
        old_hwpt.refs.fetch_add(1, Ordering::SeqCst);
        *dev.attached.lock() = None;
        old_hwpt.domain.lock().detach_device(dev.ops.handle());
        old_hwpt.ioas.iopt.lock().remove_reserved(Owner::Device(dev_id));
        match self.attach_to(dev_id, &dev, pt_id) {
            Ok(new) => {
                // Drop the attach's reference and our keep-alive.
                old_hwpt.refs.fetch_sub(1, Ordering::SeqCst);
                if old_hwpt.refs.fetch_sub(1, Ordering::SeqCst) == 1 && old_hwpt.auto {
                    self.objects.lock().remove(&old);
                    // The device is on the new HWPT either way; the old
                    // domain's failed invalidation is still reported.
                    self.release_hwpt(old, &old_hwpt)?;
                }
                Ok(new)
            }
            Err(e) => {
                // Back to the old HWPT, exactly as before.
                self.reserve_device(dev_id, &dev, &old_hwpt.ioas).expect("old reservations fit again");
                old_hwpt.domain.lock().attach_device(dev.ops.handle()).expect("old domain accepts the device again");
                old_hwpt.refs.fetch_sub(1, Ordering::SeqCst);
                *dev.attached.lock() = Some(old);
                Err(e)
            }
        }
    }

    /// Whether every HWPT of an IOAS enforces cache coherency (VFIO's
    /// `VFIO_DMA_CC_IOMMU`); true when it has none.
    pub fn ioas_hwpts_coherent(&self, ioas_id: u32) -> Result<bool> {
        self.ioas(ioas_id)?;
        let hwpts: Vec<Arc<Hwpt>> = self
            .objects
            .lock()
            .values()
            .filter_map(|o| match o {
                Object::Hwpt(h) if h.ioas_id == ioas_id => Some(h.clone()),
                _ => None,
            })
            .collect();
        Ok(hwpts.iter().all(|h| h.coherent))
    }

    /// The HWPT a device is attached to.
    pub fn attached_hwpt(&self, dev_id: u32) -> Result<Option<u32>> {
        Ok(*self.device(dev_id)?.attached.lock())
    }

    /// Pages pinned now (all IOAS).
    pub fn pinned_pages(&self) -> u64 {
        self.accounting.pinned()
    }

    /// Page size of user memory.
    pub const PAGE_SIZE: u64 = PAGE_SIZE;
}

impl Drop for Ictx {
    /// Closing the context releases everything: devices detach, HWPTs and
    /// IOAS go, every pin is dropped.
    fn drop(&mut self) {
        let owners: Vec<u32> = self
            .objects
            .lock()
            .iter()
            .filter(|(_, o)| matches!(o, Object::DeviceOwner(_)))
            .map(|(id, _)| *id)
            .collect();
        for id in owners {
            let _ = self.destroy(id);
        }
        let accesses: Vec<u32> =
            self.objects.lock().iter().filter(|(_, o)| matches!(o, Object::Access(_))).map(|(id, _)| *id).collect();
        for id in accesses {
            let _ = self.access_destroy(id);
        }
        let devices: Vec<u32> =
            self.objects.lock().iter().filter(|(_, o)| matches!(o, Object::Device(_))).map(|(id, _)| *id).collect();
        for id in devices {
            let _ = self.unbind_device(id);
        }
        // HWPTs first (they hold their IOAS), then IOAS.
        let hwpts: Vec<u32> =
            self.objects.lock().iter().filter(|(_, o)| matches!(o, Object::Hwpt(_))).map(|(id, _)| *id).collect();
        for id in hwpts {
            let _ = self.destroy(id);
        }
        let rest: Vec<u32> = self.objects.lock().keys().copied().collect();
        for id in rest {
            let _ = self.destroy(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memsrc::FakeAddressSpace;
    use crate::selftest::mock::{MOCK_APERTURE_START, MockDomain};
    use alloc::boxed::Box;
    use portcullis_iommu::{DeviceHandle, IommuDomain};

    struct MockDev(u64);
    impl DeviceOps for MockDev {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle(self.0)
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            Ok(Box::new(MockDomain::new()))
        }
    }

    fn ctx() -> (Arc<FakeAddressSpace>, Ictx) {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(0x4000_0000, 16 << 20, true);
        let ictx = Ictx::new(mem.clone(), u64::MAX);
        (mem, ictx)
    }

    #[test]
    fn ids_types_and_busy_objects() {
        let (_, c) = ctx();
        let a = c.ioas_alloc().unwrap();
        let b = c.ioas_alloc().unwrap();
        assert_eq!((a, b), (1, 2));
        c.destroy(a).unwrap();
        assert_eq!(c.ioas_alloc().unwrap(), 1, "lowest free id is reused");
        assert_eq!(c.destroy(99), Err(Errno::ENOENT));
        let d = c.bind_device(Arc::new(MockDev(5))).unwrap();
        assert_eq!(c.ioas(d).map(|_| ()), Err(Errno::ENOENT), "wrong type");
        let h = c.attach(d, b).unwrap();
        assert_eq!(c.destroy(b), Err(Errno::EBUSY), "IOAS with a HWPT");
        assert_eq!(c.destroy(h), Err(Errno::EBUSY), "HWPT with a device");
        c.detach(d).unwrap();
        assert_eq!(c.hwpt(h).map(|_| ()), Err(Errno::ENOENT), "auto HWPT went with its last device");
        c.destroy(b).unwrap();
    }

    #[test]
    fn attach_reuses_domains_and_pins_once() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let iova = c.ioas_map(ioas, Some(MOCK_APERTURE_START), 0x4000_0000, 0x10000, true, true).unwrap();
        assert_eq!(mem.pinned_pages(), 0);
        let d1 = c.bind_device(Arc::new(MockDev(1))).unwrap();
        let d2 = c.bind_device(Arc::new(MockDev(2))).unwrap();
        let h1 = c.attach(d1, ioas).unwrap();
        let h2 = c.attach(d2, ioas).unwrap();
        assert_eq!(h1, h2, "the compatible automatic domain is shared");
        assert_eq!(mem.pinned_pages(), 16);
        let h3 = c.hwpt_alloc(d1, ioas).unwrap();
        c.replace(d1, h3).unwrap();
        assert_eq!(mem.pinned_pages(), 16, "two domains, one pin per page");
        assert_eq!(c.hwpt(h3).unwrap().domain.lock().iova_to_phys(iova), mem.phys_of(0x4000_0000));
        let other = c.ioas_alloc().unwrap();
        c.ioas_copy(other, ioas, iova, None, 0x4000, true, false).unwrap();
        assert_eq!(mem.pinned_pages(), 16);
        c.ioas_unmap(ioas, 0, u64::MAX).unwrap();
        assert_eq!(mem.pinned_pages(), 0, "the copy in a domain-less IOAS pins nothing");
        drop(c);
        assert_eq!(mem.pinned_pages(), 0);
    }

    #[test]
    fn accesses_pin_read_write_and_are_told_to_unpin() {
        use crate::selftest::cmd::MockAccess;
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let iova = c.ioas_map(ioas, None, 0x4000_0000, 0x4000, true, true).unwrap();
        let ro = c.ioas_map(ioas, None, 0x4000_8000, 0x1000, true, false).unwrap();
        let a = c.access_create(Arc::new(MockAccess::default())).unwrap();
        assert_eq!(c.access_pin_pages(a, iova, 0x1000, false), Err(Errno::ENOENT), "not attached yet");
        c.access_attach(a, ioas).unwrap();
        assert_eq!(c.destroy(a), Err(Errno::EBUSY), "the driver holds its access");
        assert_eq!(c.destroy(ioas), Err(Errno::EBUSY), "an access holds the IOAS");
        // CPU writes through the IOVA land in user memory, reads come back.
        let mut data = *b"portcullis";
        c.access_rw(a, iova + 0xffb, &mut data, true).unwrap();
        let mut back = [0u8; 10];
        mem.read_user(0x4000_0ffb, &mut back).unwrap();
        assert_eq!(&back, b"portcullis");
        assert_eq!(c.access_rw(a, ro, &mut data, true), Err(Errno::EPERM));
        assert_eq!(mem.pinned_pages(), 0, "rw pins only for the copy");
        // MockAccess does not pin (needs_pin false): pinning is refused.
        assert_eq!(c.access_pin_pages(a, iova, 0x1000, false), Err(Errno::EINVAL));
        c.access_destroy(a).unwrap();
        c.destroy(ioas).unwrap();
    }

    #[test]
    fn unmap_tells_pinning_accesses_to_let_go() {
        use crate::selftest::cmd::MockAccess;
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let d = c.bind_device(Arc::new(MockDev(3))).unwrap();
        c.attach(d, ioas).unwrap();
        let iova = c.ioas_map(ioas, Some(MOCK_APERTURE_START), 0x4000_0000, 0x4000, true, true).unwrap();
        let ops = Arc::new(MockAccess::new(true));
        let a = c.access_create(ops.clone()).unwrap();
        c.access_attach(a, ioas).unwrap();
        assert_eq!(c.ioas_iova_ranges(ioas).unwrap().1, PAGE_SIZE, "a pinning access forces page alignment");
        let phys = c.access_pin_pages(a, iova + 0x1000, 0x2000, true).unwrap();
        assert_eq!(phys, alloc::vec![mem.phys_of(0x4000_1000).unwrap(), mem.phys_of(0x4000_2000).unwrap()]);
        ops.remember(iova + 0x1000, 0x2000);
        assert_eq!(mem.pins(0x4000_1000), 1, "the domain's pin and the access's share one page pin");
        assert_eq!(c.access_pin_pages(a, iova + 0x800, 0x1000, false), Err(Errno::EINVAL), "not page aligned");
        // The unmap asks the access to unpin, then proceeds.
        assert_eq!(c.ioas_unmap(ioas, iova, 0x4000), Ok(0x4000));
        assert_eq!(mem.pinned_pages(), 0);
        c.access_destroy(a).unwrap();
    }

    #[test]
    fn domains_hold_the_addresses_the_store_keeps_only_what_accesses_need() {
        use crate::selftest::cmd::MockAccess;
        let (mem, c) = ctx();
        let a = c.ioas_alloc().unwrap();
        let b = c.ioas_alloc().unwrap();
        for (ioas, h) in [(a, 1), (b, 2)] {
            let d = c.bind_device(Arc::new(MockDev(h))).unwrap();
            c.attach(d, ioas).unwrap();
        }
        let iova = c.ioas_map(a, Some(MOCK_APERTURE_START), 0x4000_0000, 0x8000, true, true).unwrap();
        let pages = c.ioas(a).unwrap().iopt.lock().area_at(iova).unwrap().2.pages.clone();
        assert_eq!((pages.pinned_pages(), pages.stored_pages()), (8, 0), "all addresses live in the domain");
        // A copy into another IOAS with its own domain reads the addresses
        // back from A's domain: no second pin, nothing stored.
        let iova_b = c.ioas_copy(b, a, iova, None, 0x8000, true, true).unwrap();
        assert_eq!((mem.pinned_pages(), pages.stored_pages()), (8, 0));
        let hb = (1..20).find_map(|id| c.hwpt(id).ok().filter(|h| h.ioas_id == b)).unwrap();
        assert_eq!(hb.domain.lock().iova_to_phys(iova_b + 0x7000), mem.phys_of(0x4000_7000));
        // An access pin stores what it pinned, and only that.
        let acc = c.access_create(Arc::new(MockAccess::new(true))).unwrap();
        c.access_attach(acc, a).unwrap();
        c.access_pin_pages(acc, iova + 0x2000, 0x2000, false).unwrap();
        assert_eq!(pages.stored_pages(), 2);
        c.access_unpin_pages(acc, iova + 0x2000, 0x2000).unwrap();
        assert_eq!(pages.stored_pages(), 0);
        c.access_destroy(acc).unwrap();
        // A's unmap leaves B's area holding the pages; B's then frees them.
        c.ioas_unmap(a, 0, u64::MAX).unwrap();
        assert_eq!(mem.pinned_pages(), 8);
        c.ioas_unmap(b, 0, u64::MAX).unwrap();
        assert_eq!(mem.pinned_pages(), 0);
    }

    struct MsiDev;
    impl DeviceOps for MsiDev {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle(77)
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            Ok(Box::new(MockDomain::new()))
        }
        fn reserved_regions(&self) -> Vec<(u64, u64)> {
            alloc::vec![(0x400_0000, 0x40f_ffff)] // an MSI window
        }
    }

    #[test]
    fn device_reserved_regions_conflict_and_reserve() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let iova = c.ioas_map(ioas, Some(0x400_0000), 0x4000_0000, 0x1000, true, true).unwrap();
        let d = c.bind_device(Arc::new(MsiDev)).unwrap();
        let before = c.object_ids();
        assert_eq!(c.attach(d, ioas), Err(Errno::EADDRINUSE), "a mapping sits in the device's MSI window");
        assert_eq!(c.object_ids(), before, "the failed attach left no HWPT behind");
        assert_eq!(mem.pinned_pages(), 0);
        c.ioas_unmap(ioas, iova, 0x1000).unwrap();
        c.attach(d, ioas).unwrap();
        let (ranges, _) = c.ioas_iova_ranges(ioas).unwrap();
        assert!(ranges.iter().all(|&(s, l)| l < 0x400_0000 || s > 0x40f_ffff), "window reserved: {ranges:x?}");
        assert_eq!(c.ioas_map(ioas, Some(0x400_0000), 0x4000_0000, 0x1000, true, true), Err(Errno::EINVAL));
        c.detach(d).unwrap();
        assert!(c.ioas_iova_ranges(ioas).unwrap().0.iter().any(|&(s, l)| s <= 0x400_0000 && l >= 0x40f_ffff));
    }

    #[test]
    fn closing_the_context_releases_everything() {
        let (mem, c) = ctx();
        let ioas = c.ioas_alloc().unwrap();
        let d = c.bind_device(Arc::new(MockDev(1))).unwrap();
        c.attach(d, ioas).unwrap();
        c.ioas_map(ioas, None, 0x4000_0000, 1 << 20, true, true).unwrap();
        assert_eq!(mem.pinned_pages(), 256);
        drop(c);
        assert_eq!(mem.pinned_pages(), 0);
    }
}
