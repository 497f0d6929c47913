//! Accesses: in-kernel users of an IOAS that pin pages or copy through
//! IOVAs with the CPU (Linux's `iommufd_access_*`).
//!
//! Invariants: an attached access is listed in its IOAS's `accesses`,
//! holds one reference on it and its alignment is registered in its
//! `IoPagetable`; the access driver is told to unpin (`AccessOps::unmap`)
//! with no IOAS lock held.

use super::{Ictx, Object};
use crate::ctx::ioas::Ioas;
use crate::errno::{Errno, Result};
use crate::memsrc::PAGE_SIZE;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use spin::Mutex;

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
    pub(super) ops: Arc<dyn AccessOps>,
    pub(super) ioas: Mutex<Option<u32>>,
    pub(super) refs: AtomicU32,
}

impl core::fmt::Debug for Access {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Access(ioas {:?})", self.ioas.lock())
    }
}

impl Ictx {
    pub(super) fn access(&self, id: u32) -> Result<Arc<Access>> {
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

    pub(super) fn access_change_ioas(&self, id: u32, a: &Access, new: Option<u32>) -> Result<()> {
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

    pub(super) fn access_ioas(&self, id: u32) -> Result<(Arc<Access>, Arc<Ioas>)> {
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

    /// The IOAS an access is attached to.
    pub fn access_ioas_id(&self, id: u32) -> Option<u32> {
        self.access(id).ok().and_then(|a| *a.ioas.lock())
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::tests::{MockDev, ctx};
    use crate::errno::Errno;
    use crate::memsrc::{MemorySource, PAGE_SIZE};
    use crate::selftest::mock::MOCK_APERTURE_START;
    use alloc::sync::Arc;

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
}
