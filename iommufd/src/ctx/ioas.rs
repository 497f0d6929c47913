//! IOAS operations: allocation, map (of user memory or of a file), unmap,
//! copy, the usable ranges and the allowed ranges (Linux's `ioas.c`), and
//! moving the pinned pages to another process (`IOMMU_IOAS_CHANGE_PROCESS`).
//!
//! An IOAS operation holds only that IOAS's `iopt` mutex (plus, inside
//! it, domain and `Pages` locks in the order of the main module): never
//! the object table, and never two IOAS locks at once (`IOAS_COPY`
//! collects the source's slices, drops its lock, then maps into the
//! destination). An unmap asks accesses to let go with no IOAS lock held.

use super::{Ictx, Object};
use crate::errno::{Errno, Result};
use crate::iopt::{IoPagetable, PagesSlice};
use crate::memsrc::MemorySource;
use crate::pages::Pages;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU32;
use portcullis_iommu::{IovaRange, Prot};
use spin::Mutex;

/// An I/O address space.
pub struct Ioas {
    /// The page table (areas, reservations, domains).
    pub iopt: Mutex<IoPagetable>,
    /// The list of domains and how areas are loaded into them, as a lock
    /// taken before `iopt` (Linux's `domains_rwsem`): map and unmap hold
    /// it for reading while they work on the domains without `iopt`
    /// (see `IoPagetable::reserve_pages`); adding or removing a domain and
    /// the huge-page option take it for writing, so no domain comes or
    /// goes under a fill in progress.
    pub domains_rw: spin::RwLock<()>,
    /// HWPTs made for this IOAS automatically by attach, in creation order.
    pub(super) auto_hwpts: Mutex<Vec<u32>>,
    /// Accesses attached to this IOAS.
    pub(super) accesses: Mutex<Vec<u32>>,
    pub(super) refs: AtomicU32,
}

impl core::fmt::Debug for Ioas {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ioas({:?})", self.iopt.lock())
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

/// Maps `slices` into `ioas` (see `IoPagetable::map_pages`). When every
/// domain of the IOAS maps concurrently, only the reservation of the IOVA
/// and the final marking of the areas take the IOAS lock; pinning and the
/// domain maps run without it, the domain list held for reading, so maps
/// of disjoint ranges (and unmaps) proceed in parallel. Otherwise all of
/// it runs under the lock.
fn map_slices(ioas: &Ioas, slices: &[PagesSlice], length: u64, iova: Option<u64>, prot: Prot) -> Result<u64> {
    let _domains = ioas.domains_rw.read();
    let reserved = {
        let mut iopt = ioas.iopt.lock();
        if !iopt.concurrent() {
            return iopt.map_pages(slices, length, iova, prot);
        }
        iopt.reserve_pages(slices, length, iova, prot)?
    };
    let filled = IoPagetable::fill_reserved(&reserved);
    ioas.iopt.lock().finish_reserved(reserved, filled)
}

/// Unmaps `[iova, iova + length)` (everything when `all`) from `ioas`,
/// outside the IOAS lock when every domain unmaps concurrently, as
/// [`map_slices`] maps.
fn unmap_range(ioas: &Ioas, iova: u64, length: u64, all: bool) -> Result<u64> {
    let _domains = ioas.domains_rw.read();
    let taken = {
        let mut iopt = ioas.iopt.lock();
        if !iopt.concurrent() {
            return if all { iopt.unmap_all() } else { iopt.unmap(iova, length) };
        }
        let (start, last) = if all { (0, u64::MAX) } else { (iova, crate::iopt::last_of(iova, length)?) };
        iopt.begin_unmap(start, last)?
    };
    let unloaded = IoPagetable::unmap_outside(&taken);
    ioas.iopt.lock().end_unmap(taken, unloaded)
}

impl Ictx {
    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<u32> {
        let _creation = self.ioas_creation.lock();
        self.insert(Object::Ioas(Arc::new(Ioas {
            iopt: Mutex::new(IoPagetable::new()),
            domains_rw: spin::RwLock::new(()),
            auto_hwpts: Mutex::new(Vec::new()),
            accesses: Mutex::new(Vec::new()),
            refs: AtomicU32::new(0),
        })))
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
        let (pages, off) = Pages::new(self.source(), self.accounting.clone(), uptr, length, writable)?;
        let slice = crate::iopt::PagesSlice { pages, start_byte: off, length };
        map_slices(&ioas, core::slice::from_ref(&slice), length, iova, prot_of(readable, writable))
    }

    /// `IOMMU_IOAS_MAP_FILE` (Linux 6.13+): maps bytes `[start, start +
    /// length)` of the file descriptor `fd` names in the memory source
    /// (a memfd holding guest RAM); returns the IOVA used. The mapping
    /// holds the file, not the descriptor: closing `fd` later changes
    /// nothing. Checks after the argument checks of the dispatcher, in
    /// Linux's order: the IOAS (`ENOENT`), the descriptor (`EBADF`; a
    /// writable mapping of a descriptor not open for writing is `EPERM`,
    /// the check later kernels make when taking the file), the range
    /// (`EINVAL` when empty, `EOVERFLOW` when its last byte is past
    /// `u64::MAX`), then the map itself. Whether the range lies inside a
    /// file whose pages can be pinned is found when they are pinned
    /// (`EINVAL`): at once when the IOAS has a domain, else at the first
    /// domain attach or access.
    #[allow(clippy::too_many_arguments)] // mirrors the uAPI struct's fields
    pub fn ioas_map_file(
        &self,
        ioas_id: u32,
        iova: Option<u64>,
        fd: i32,
        start: u64,
        length: u64,
        readable: bool,
        writable: bool,
    ) -> Result<u64> {
        let ioas = self.ioas(ioas_id)?;
        let source = self.source();
        let file = source.file_get(fd, writable)?;
        let (pages, off) = Pages::new_file(source, self.accounting.clone(), file, start, length, writable)?;
        let slice = crate::iopt::PagesSlice { pages, start_byte: off, length };
        map_slices(&ioas, core::slice::from_ref(&slice), length, iova, prot_of(readable, writable))
    }

    /// `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.14+) as the dispatcher sees
    /// it: the caller of an ioctl is always the process the context
    /// belongs to, so there is nothing to move, and the call answers what
    /// Linux answers its own process: `EINVAL` if any IOAS maps user
    /// memory (only file mappings can change process), else success with
    /// nothing changed. See [`Self::change_process`] for a real move.
    pub fn ioas_change_process(&self) -> Result<()> {
        self.change_process_inner(None)
    }

    /// Moves the context to another process: `source` becomes its memory
    /// (user addresses and descriptors of later calls) and its pinned
    /// pages are charged against `pin_limit_pages` from now on. Only when
    /// every mapping of every IOAS is a file mapping (`EINVAL` otherwise:
    /// a user-memory mapping belongs to the old address space); `ENOMEM`
    /// when the pages pinned now exceed the new limit. On error nothing
    /// changes. Pages stay pinned and mapped as they are: each file
    /// mapping holds its file in the memory source that opened it, as a
    /// Linux mapping holds the file, not the process. (This is what a
    /// hypervisor's live update needs: the new process takes over the
    /// context with the guest RAM memfds mapped.)
    ///
    /// Locks: the IOAS creation lock, then every IOAS lock in id order
    /// (the one place that holds more than one; the creation lock keeps it
    /// to one thread), as Linux does.
    pub fn change_process(&self, source: Arc<dyn MemorySource>, pin_limit_pages: u64) -> Result<()> {
        self.change_process_inner(Some((source, pin_limit_pages)))
    }

    fn change_process_inner(&self, to: Option<(Arc<dyn MemorySource>, u64)>) -> Result<()> {
        let _creation = self.ioas_creation.lock();
        let all: Vec<Arc<Ioas>> = self
            .objects
            .lock()
            .values()
            .filter_map(|o| if let Object::Ioas(i) = o { Some(i.clone()) } else { None })
            .collect();
        let locked: Vec<_> = all.iter().map(|i| i.iopt.lock()).collect();
        if locked.iter().any(|iopt| iopt.areas().any(|(_, _, area)| !area.pages.origin.is_file())) {
            return Err(Errno::EINVAL);
        }
        if let Some((source, limit)) = to {
            self.accounting.move_to(limit)?;
            *self.source.lock() = source;
        }
        Ok(())
    }

    /// `IOMMU_IOAS_UNMAP`; `(0, u64::MAX)` unmaps everything.
    pub fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64> {
        let ioas = self.ioas(ioas_id)?;
        let all = iova == 0 && length == u64::MAX;
        let last = if all { u64::MAX } else { iova.checked_add(length.max(1) - 1).ok_or(Errno::EOVERFLOW)? };
        // Accesses holding pages in the range are asked to let go (with
        // no IOAS lock held: they unpin through this context), and the
        // unmap tried again. The unmap itself finds them (`EBUSY`), so a
        // range no access holds is looked up once.
        for _ in 0..16 {
            match unmap_range(&ioas, iova, length, all) {
                Err(Errno::EBUSY) => {}
                done => return done,
            }
            let blocker = ioas.iopt.lock().access_blocker(iova, last);
            // Busy for another reason: an area another call is filling
            // or unloading.
            let Some(IovaRange { start: s, last: l }) = blocker else { return Err(Errno::EBUSY) };
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
        map_slices(&dst, &slices, length, dst_iova, prot_of(readable, writable))
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: usable ranges and the IOVA alignment.
    pub fn ioas_iova_ranges(&self, ioas_id: u32) -> Result<(Vec<IovaRange>, u64)> {
        let ioas = self.ioas(ioas_id)?;
        let iopt = ioas.iopt.lock();
        Ok((iopt.iova_ranges(), iopt.iova_alignment()))
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    pub fn ioas_allow_iovas(&self, ioas_id: u32, ranges: &[IovaRange]) -> Result<()> {
        let ioas = self.ioas(ioas_id)?;
        ioas.iopt.lock().set_allowed(ranges)
    }
}

#[cfg(test)]
mod tests {
    use crate::ctx::tests::{MockDev, ctx};
    use crate::errno::Errno;
    use crate::memsrc::{FakeAddressSpace, MemorySource};
    use crate::selftest::mock::MOCK_APERTURE_START;
    use alloc::sync::Arc;

    /// Two areas of 2^63 bytes each cover the whole IOVA space (an IOAS
    /// with no domain pins nothing, so the uAPI can make them): unmapping
    /// everything succeeds and reports the byte count wrapped to 0, as
    /// Linux does, instead of overflowing.
    #[test]
    fn unmapping_all_2_pow_64_bytes_wraps_the_count() {
        let (_mem, c) = ctx();
        let a = c.ioas_alloc().unwrap();
        c.ioas_map(a, Some(0), 0x1000, 1 << 63, true, true).unwrap();
        c.ioas_map(a, Some(1 << 63), 0x1000, 1 << 63, true, true).unwrap();
        assert_eq!(c.ioas_unmap(a, 0, u64::MAX), Ok(0));
        assert_eq!(c.ioas_unmap(a, 0, u64::MAX), Ok(0), "nothing left");
        c.ioas_map(a, Some(0), 0x1000, 1 << 63, true, true).unwrap();
        c.ioas_map(a, Some(1 << 63), 0x1000, 1 << 63, true, true).unwrap();
        assert_eq!(c.ioas_unmap(a, 0, u64::MAX), Ok(0), "again, after the first unmap_all");
    }

    #[test]
    fn file_and_user_mappings_of_one_memfd_share_pins() {
        let (mem, c) = ctx();
        let fd = mem.create_memfd(0x8000);
        mem.map_file(0x5000_0000, fd, 0, 0x8000);
        let a = c.ioas_alloc().unwrap();
        let d = c.bind_device(Arc::new(MockDev(1))).unwrap();
        let h = c.attach(d, a).unwrap();
        assert_eq!(c.ioas_map_file(a, None, 99, 0, 0x1000, true, true), Err(Errno::EBADF));
        assert_eq!(c.ioas_map_file(77, None, fd, 0, 0x1000, true, true), Err(Errno::ENOENT));
        assert_eq!(c.ioas_map_file(a, None, fd, 0, 0x9000, true, true), Err(Errno::EINVAL), "past the end");
        let iova = c.ioas_map_file(a, None, fd, 0x2000, 0x4000, true, true).unwrap();
        // The user mapping of the same file pins the same pages once more.
        let iova_u = c.ioas_map(a, None, 0x5000_3000, 0x2000, true, false).unwrap();
        let hw = c.hwpt(h).unwrap();
        assert_eq!(hw.domain.lock().iova_to_phys(iova + 0x1000), mem.file_phys(fd, 0x3000));
        assert_eq!(hw.domain.lock().iova_to_phys(iova_u), mem.file_phys(fd, 0x3000));
        assert_eq!((mem.pins(0x5000_3000), mem.pins(0x5000_2000), mem.pinned_pages()), (2, 1, 4));
        assert_eq!(c.pinned_pages(), 6, "accounted per mapping, as Linux does");
        // A copy shares the file pages; an access pins them once more.
        let b = c.ioas_alloc().unwrap();
        let iova_b = c.ioas_copy(b, a, iova, None, 0x4000, true, false).unwrap();
        let acc = c.access_create(Arc::new(crate::selftest::cmd::MockAccess::new(true))).unwrap();
        c.access_attach(acc, b).unwrap();
        let phys = c.access_pin_pages(acc, iova_b, 0x1000, false).unwrap();
        assert_eq!(Some(phys[0]), mem.file_phys(fd, 0x2000));
        assert_eq!(mem.pins(0x5000_2000), 1, "each page is pinned once per store");
        c.access_unpin_pages(acc, iova_b, 0x1000).unwrap();
        c.access_destroy(acc).unwrap();
        // Closing the descriptor leaves the mapping working.
        mem.close_fd(fd).unwrap();
        c.ioas_unmap(a, 0, u64::MAX).unwrap();
        assert_eq!((mem.pinned_pages(), mem.live_files()), (0, 1), "B (no domain) pins nothing but holds the file");
        c.ioas_unmap(b, 0, u64::MAX).unwrap();
        assert_eq!((mem.pinned_pages(), c.pinned_pages(), mem.live_files()), (0, 0, 0));
    }

    #[test]
    fn change_process_needs_file_mappings_only() {
        let (mem, c) = ctx();
        let fd = mem.create_memfd(0x4000);
        let a = c.ioas_alloc().unwrap();
        let d = c.bind_device(Arc::new(MockDev(1))).unwrap();
        c.attach(d, a).unwrap();
        assert_eq!(c.ioas_change_process(), Ok(()), "nothing mapped");
        let user = c.ioas_map(a, None, 0x4000_0000, 0x1000, true, true).unwrap();
        let file = c.ioas_map_file(a, None, fd, 0, 0x4000, true, true).unwrap();
        let other = Arc::new(FakeAddressSpace::new());
        assert_eq!(c.ioas_change_process(), Err(Errno::EINVAL));
        assert_eq!(c.change_process(other.clone(), u64::MAX), Err(Errno::EINVAL));
        assert!(Arc::ptr_eq(&c.source(), &(mem.clone() as Arc<dyn MemorySource>)), "unchanged");
        c.ioas_unmap(a, user, 0x1000).unwrap();
        assert_eq!(c.ioas_change_process(), Ok(()));
        // Over the new process's limit: nothing changes.
        assert_eq!(c.change_process(other.clone(), 3), Err(Errno::ENOMEM));
        assert_eq!(c.accounting().limit(), u64::MAX);
        c.change_process(other.clone(), 4).unwrap();
        assert_eq!(c.accounting().limit(), 4);
        assert!(Arc::ptr_eq(&c.source(), &(other.clone() as Arc<dyn MemorySource>)));
        // The old process's descriptors mean nothing now; its memfd stays
        // mapped, and a new domain still finds its pages.
        assert_eq!(c.ioas_map_file(a, None, fd, 0, 0x1000, true, true), Err(Errno::EBADF));
        c.detach(d).unwrap();
        assert_eq!((mem.file_pins(fd, 0x3000), c.pinned_pages()), (0, 0));
        c.attach(d, a).unwrap();
        assert_eq!((mem.file_pins(fd, 0x3000), c.pinned_pages()), (1, 4));
        c.ioas_unmap(a, file, 0x4000).unwrap();
        assert_eq!((mem.pinned_pages(), c.pinned_pages()), (0, 0));
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
}
