//! IOAS operations: allocation, map, unmap, copy, the usable ranges and
//! the allowed ranges (Linux's `ioas.c`).
//!
//! An IOAS operation holds only that IOAS's `iopt` mutex (plus, inside
//! it, domain and `Pages` locks in the order of the main module): never
//! the object table, and never two IOAS locks at once (`IOAS_COPY`
//! collects the source's slices, drops its lock, then maps into the
//! destination). An unmap asks accesses to let go with no IOAS lock held.

use super::{Ictx, Object};
use crate::errno::{Errno, Result};
use crate::iopt::IoPagetable;
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

impl Ictx {
    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<u32> {
        self.insert(Object::Ioas(Arc::new(Ioas {
            iopt: Mutex::new(IoPagetable::new()),
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
            let Some(IovaRange { start: s, last: l }) = blocker else {
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
    use crate::selftest::mock::MOCK_APERTURE_START;
    use alloc::sync::Arc;

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
