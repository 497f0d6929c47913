//! The iommufd context (one per open `/dev/iommu`, or per VM) and its
//! object table: IOAS, HW page tables, devices and accesses.
//!
//! Objects have 31-bit ids, allocated lowest-free from 1 as Linux does.
//! An object that another object refers to (an IOAS with HWPTs or
//! accesses, a HWPT with attached devices, attached PASIDs or nested HWPTs, a fault with
//! HWPTs or an open descriptor) cannot be destroyed: `EBUSY`.
//! A wrong id, or an id of the wrong type, is `ENOENT`.
//!
//! Lock order (never taken the other way round): a device's `pasids`
//! (held across one attach, replace or detach of its requester id or a
//! PASID) → `objects` →
//! `Ioas::iopt` → `Pages` → a domain's mutex → memory source.
//! `Pages` comes before the domains because a `Pages` reads the addresses
//! of pages already in use back from the domains that map them while it
//! holds its lock; no code holding a domain lock takes a `Pages` lock
//! (DESIGN.md, "Locking", argues why this cannot deadlock). Leaves, held
//! only for their own data: `Pages` holders, accounting, and the small
//! mutexes of the objects (`auto_hwpts`, `accesses`, `attached`, an
//! access's IOAS, the compat IOAS, the selftest state).
//! The object table lock is held only to look objects up, insert or
//! remove them, never across an IOAS operation, so operations on different
//! IOAS run in parallel and operations on one IOAS serialise on its mutex.
//!
//! The context is split by object, as Linux splits iommufd: this module
//! holds the context and its object table (lookups, insertion,
//! `IOMMU_DESTROY`, closing); `ioas` the IOAS operations; `device` device
//! binding, attach, detach and replace; `hw_pagetable` HWPT allocation and
//! release; `nested` nested HWPTs and their invalidation; `fault` fault queues
//! (page requests for user space); `access` the in-kernel accesses. Every public item is
//! re-exported here (`ctx::Ictx`, `ctx::DeviceOps`, `ctx::AccessOps`, ...).

mod access;
mod device;
mod fault;
mod hw_pagetable;
mod ioas;
mod nested;

pub use access::{Access, AccessOps};
pub use device::{Device, DeviceOwner, ReplaceError};
pub use fault::{FAULT_RECORD_SIZE, Fault, MAX_DMA_FAULTS, PageRequest, PageResponse, RESPONSE_RECORD_SIZE};
pub use hw_pagetable::Hwpt;
pub use ioas::Ioas;
pub use nested::{HwptNested, NestedDomain, NestingOps, UserData, UserDataArray};
pub use portcullis_iommu::DeviceOps;

use crate::errno::{Errno, Result};
use crate::memsrc::{MemorySource, PAGE_SIZE};
use crate::pages::{AccountMode, Accounting};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use spin::Mutex;

/// Largest object id (ids are positive 31-bit numbers).
pub const MAX_OBJECT_ID: u32 = i32::MAX as u32;

/// One entry of the object table.
#[derive(Clone, Debug)]
pub enum Object {
    /// An IOAS.
    Ioas(Arc<Ioas>),
    /// A paging HWPT.
    Hwpt(Arc<Hwpt>),
    /// A nested HWPT (on a paging parent).
    HwptNested(Arc<HwptNested>),
    /// A device.
    Device(Arc<Device>),
    /// An access (in-kernel user of an IOAS).
    Access(Arc<Access>),
    /// A fault queue (`IOMMU_FAULT_QUEUE_ALLOC`).
    Fault(Arc<Fault>),
    /// An id taken by an object still being created: not visible to
    /// lookups (`ENOENT`), as Linux's not yet finalized objects.
    Placeholder(Arc<AtomicU32>),
    /// An object that owns a device binding (the selftest's mock device
    /// object; a VFIO device file in Linux): destroying it unbinds the
    /// device.
    DeviceOwner(Arc<DeviceOwner>),
}

impl Object {
    fn refs(&self) -> &AtomicU32 {
        match self {
            Object::Ioas(o) => &o.refs,
            Object::Hwpt(o) => &o.refs,
            Object::HwptNested(o) => &o.refs,
            Object::Device(o) => &o.refs,
            Object::DeviceOwner(o) => &o.refs,
            Object::Access(o) => &o.refs,
            Object::Fault(o) => &o.refs,
            Object::Placeholder(r) => r,
        }
    }
}

/// An iommufd context.
pub struct Ictx {
    /// The memory of the process the context belongs to; replaced by
    /// [`Ictx::change_process`]. A leaf: held only to clone or replace.
    source: Mutex<Arc<dyn MemorySource>>,
    accounting: Arc<Accounting>,
    /// Held by IOAS allocation and by [`Ictx::change_process`] (Linux's
    /// `ioas_creation_lock`): no IOAS appears while the latter holds
    /// every IOAS lock, and only one thread at a time holds more than
    /// one IOAS lock. Taken before the object table and the IOAS locks.
    ioas_creation: Mutex<()>,
    objects: Mutex<BTreeMap<u32, Object>>,
    compat_ioas: Mutex<Option<u32>>,
    /// Open fault-queue "descriptors": descriptor -> fault object id.
    fault_fds: Mutex<BTreeMap<u32, u32>>,
    /// The next "descriptor" number (fault queues, selftest accesses).
    next_fd: AtomicU32,
    /// State of the selftest commands (access "file descriptors").
    #[cfg(feature = "selftest")]
    pub(crate) selftest: Mutex<crate::selftest::cmd::State>,
}

impl core::fmt::Debug for Ictx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ictx({} objects, {} pages pinned)", self.objects.lock().len(), self.accounting.pinned())
    }
}

impl Ictx {
    /// A context over `source`, pinning at most `pin_limit_pages` pages.
    pub fn new(source: Arc<dyn MemorySource>, pin_limit_pages: u64) -> Self {
        Self {
            source: Mutex::new(source),
            accounting: Arc::new(Accounting::new(pin_limit_pages)),
            ioas_creation: Mutex::new(()),
            objects: Mutex::new(BTreeMap::new()),
            compat_ioas: Mutex::new(None),
            fault_fds: Mutex::new(BTreeMap::new()),
            next_fd: AtomicU32::new(3),
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

    /// The memory source: the memory of the process the context belongs
    /// to now (see [`Self::change_process`]).
    pub fn source(&self) -> Arc<dyn MemorySource> {
        self.source.lock().clone()
    }

    /// Number of live objects.
    pub fn object_count(&self) -> usize {
        self.objects.lock().len()
    }

    /// Ids of live objects (for tests).
    pub fn object_ids(&self) -> Vec<u32> {
        self.objects.lock().keys().copied().collect()
    }

    /// A new "descriptor" number: from 3 up (after stdin, stdout and
    /// stderr, as the first files a process opens), never reused.
    pub(crate) fn alloc_fd(&self) -> u32 {
        self.next_fd.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn insert(&self, obj: Object) -> Result<u32> {
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

    pub(super) fn get(&self, id: u32) -> Result<Object> {
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
            Object::HwptNested(h) => self.release_nested(&h),
            Object::Fault(f) => self.release_fault(&f),
            Object::Device(_) | Object::Access(_) | Object::Placeholder(_) => {
                unreachable!("refused above: held by their drivers, or not created yet")
            }
        }
        Ok(())
    }

    /// `IOMMU_OPTION` RLIMIT_MODE set (only while no object exists).
    pub fn set_account_mode(&self, mode: AccountMode) -> Result<()> {
        let objects = self.objects.lock();
        if !objects.is_empty() {
            return Err(Errno::EBUSY);
        }
        self.accounting.set_mode(mode)
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
        // Open fault descriptors close with the context.
        let fds: Vec<u32> = self.fault_fds.lock().keys().copied().collect();
        for fd in fds {
            let _ = self.fault_fd_close(fd);
        }
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
        // Nested HWPTs first (they hold their parent and fault), then
        // paging HWPTs (they hold their IOAS), then IOAS and faults.
        let nested: Vec<u32> =
            self.objects.lock().iter().filter(|(_, o)| matches!(o, Object::HwptNested(_))).map(|(id, _)| *id).collect();
        for id in nested {
            let _ = self.destroy(id);
        }
        let hwpts: Vec<u32> =
            self.objects.lock().iter().filter(|(_, o)| matches!(o, Object::Hwpt(_))).map(|(id, _)| *id).collect();
        for id in hwpts {
            let _ = self.destroy(id);
        }
        let rest: Vec<u32> = self.objects.lock().keys().copied().collect();
        for id in rest {
            let _ = self.destroy(id);
        }
        // A device its unit could not block is still here, with its HWPT
        // and IOAS: it may still reach the domain's tables and the pages
        // they map, so none of it is freed or unpinned (leaked for good).
        let left = core::mem::take(&mut *self.objects.lock());
        if left.values().any(|o| matches!(o, Object::Device(_))) {
            core::mem::forget(left);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::memsrc::FakeAddressSpace;
    use crate::selftest::mock::MockDomain;
    use alloc::boxed::Box;
    use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};

    /// A device whose domains are mock domains.
    pub(crate) struct MockDev(pub(crate) u64);
    impl DeviceOps for MockDev {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle::Opaque(self.0)
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            Ok(Box::new(MockDomain::new()))
        }
    }

    /// A context over 16 MiB of user memory at 0x4000_0000, no pin limit.
    pub(crate) fn ctx() -> (Arc<FakeAddressSpace>, Ictx) {
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
