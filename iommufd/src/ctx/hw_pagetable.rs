//! Paging HW page tables: a domain from a device's driver, loaded with an
//! IOAS (Linux's `hw_pagetable.c`).
//!
//! Invariants: a HWPT holds one reference on its IOAS, and its domain is
//! in that IOAS's `IoPagetable` under the HWPT's id, from allocation to
//! release; an automatic one is listed in the IOAS's `auto_hwpts`.

use super::{Ictx, Object};
use crate::ctx::device::Device;
use crate::ctx::ioas::Ioas;
use crate::errno::{Errno, Result};
use crate::iopt::DomainRef;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use portcullis_iommu::DomainError;

/// A HW page table of the paging kind: a domain loaded with an IOAS.
pub struct Hwpt {
    /// The IOAS it mirrors.
    pub ioas_id: u32,
    pub(super) ioas: Arc<Ioas>,
    /// The domain.
    pub domain: DomainRef,
    /// Created by attach (destroyed with its last device) or by HWPT_ALLOC.
    pub auto: bool,
    /// The domain enforces cache coherency (snoop) on every mapping.
    pub coherent: bool,
    /// Allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: the domain can
    /// track dirty pages, and only devices that can are attached.
    pub dirty: bool,
    /// Allocated with `IOMMU_HWPT_ALLOC_NEST_PARENT`: nested HWPTs may be
    /// built on it.
    pub nest_parent: bool,
    /// Allocated with `IOMMU_HWPT_ALLOC_PASID`: it may be attached to
    /// PASIDs, and to the requester id of a device with PASIDs attached.
    /// Automatic HWPTs never are.
    pub pasid_compat: bool,
    pub(super) refs: AtomicU32,
}

impl Hwpt {
    /// References held on it: attached devices and PASIDs, nested HWPTs
    /// on it (while any is held, `IOMMU_DESTROY` is `EBUSY`).
    pub fn refs(&self) -> u32 {
        self.refs.load(Ordering::SeqCst)
    }
}

impl core::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Hwpt(ioas {}, auto {})", self.ioas_id, self.auto)
    }
}

impl Ictx {
    /// A new HWPT on `ioas` with a domain from `dev`'s driver; `flags`
    /// are the `IOMMU_HWPT_ALLOC_*` bits it was asked with (validated by
    /// the caller).
    pub(super) fn new_hwpt(
        &self,
        ioas_id: u32,
        ioas: &Arc<Ioas>,
        dev: &Device,
        auto: bool,
        flags: u32,
    ) -> Result<(u32, Arc<Hwpt>)> {
        use crate::uapi::{IOMMU_HWPT_ALLOC_DIRTY_TRACKING, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_ALLOC_PASID};
        let dirty = flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
        let nest_parent = flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0;
        let pasid_compat = flags & IOMMU_HWPT_ALLOC_PASID != 0;
        self.accounting.faults.point()?;
        if dirty && !dev.ops.supports_dirty_tracking() {
            return Err(Errno::EOPNOTSUPP);
        }
        // A nesting driver may make its own parent domains.
        let parent = match (&dev.nesting, nest_parent) {
            (Some(n), true) => n.alloc_nest_parent(dirty),
            _ => None,
        };
        let mut domain = match parent {
            Some(d) => d?,
            None if dirty => dev.ops.alloc_dirty_domain().map_err(|e| match e {
                DomainError::NotSupported => Errno::EOPNOTSUPP,
                _ => Errno::ENOMEM,
            })?,
            None => dev.ops.alloc_domain().map_err(|_| Errno::ENOMEM)?,
        };
        let coherent = domain.enforce_cache_coherency();
        let domain: DomainRef = Arc::new(crate::pages::DomainLock::new(domain));
        let hwpt = Arc::new(Hwpt {
            ioas_id,
            ioas: ioas.clone(),
            domain: domain.clone(),
            auto,
            coherent,
            dirty,
            nest_parent,
            pasid_compat,
            refs: AtomicU32::new(0),
        });
        let id = self.insert(Object::Hwpt(hwpt.clone()))?;
        // The IOAS lock is released before the object table is taken (the
        // documented order): an `if let` on the call would hold it in the
        // block.
        let added = {
            let _domains = ioas.domains_rw.write();
            ioas.iopt.lock().add_domain(id as u64, domain)
        };
        if let Err(e) = added {
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
        self.hwpt_alloc_with(dev_id, ioas_id, false)
    }

    /// `IOMMU_HWPT_ALLOC` on an IOAS, with dirty tracking when `dirty`
    /// (`EOPNOTSUPP` when the device's unit cannot track).
    pub fn hwpt_alloc_with(&self, dev_id: u32, ioas_id: u32, dirty: bool) -> Result<u32> {
        self.hwpt_alloc_flags(dev_id, ioas_id, dirty, false)
    }

    /// `IOMMU_HWPT_ALLOC` on an IOAS with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`
    /// (`dirty`) and `IOMMU_HWPT_ALLOC_NEST_PARENT` (`nest_parent`: the
    /// HWPT can be the parent of nested HWPTs).
    pub fn hwpt_alloc_flags(&self, dev_id: u32, ioas_id: u32, dirty: bool, nest_parent: bool) -> Result<u32> {
        self.hwpt_alloc_pasid(dev_id, ioas_id, dirty, nest_parent, false)
    }

    /// [`Self::hwpt_alloc_flags`], and with `pasid` (`IOMMU_HWPT_ALLOC_PASID`)
    /// a HWPT that PASIDs may be attached to ([`Self::attach_pasid`]). Any
    /// device may allocate one, PASID-capable or not, as in Linux.
    pub fn hwpt_alloc_pasid(
        &self,
        dev_id: u32,
        ioas_id: u32,
        dirty: bool,
        nest_parent: bool,
        pasid: bool,
    ) -> Result<u32> {
        use crate::uapi::{IOMMU_HWPT_ALLOC_DIRTY_TRACKING, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_ALLOC_PASID};
        let dev = self.device(dev_id)?;
        let ioas = self.ioas(ioas_id)?;
        let flag = |on: bool, f: u32| if on { f } else { 0 };
        let flags = flag(dirty, IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
            | flag(nest_parent, IOMMU_HWPT_ALLOC_NEST_PARENT)
            | flag(pasid, IOMMU_HWPT_ALLOC_PASID);
        self.new_hwpt(ioas_id, &ioas, &dev, false, flags).map(|(id, _)| id)
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`: starts or stops dirty tracking of
    /// a HWPT's domain (`EOPNOTSUPP` for a domain that cannot track).
    pub fn hwpt_set_dirty_tracking(&self, hwpt_id: u32, enable: bool) -> Result<()> {
        let hwpt = self.hwpt(hwpt_id)?;
        let _iopt = hwpt.ioas.iopt.lock();
        hwpt.domain.lock().set_dirty_tracking(enable).map_err(crate::iopt::domain_errno)
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`: sets bit `k` of the caller's bitmap
    /// at `data` for every `page_size` piece `[iova + k * page_size, ..)`
    /// of `[iova, iova + length)` that devices wrote since the last read
    /// (bits of clean pieces are left as the caller had them), and clears
    /// the dirty state unless `no_clear`, with one IOTLB invalidation.
    ///
    /// Checks, in Linux's order: the range must not wrap (`EOVERFLOW`)
    /// and must be aligned to the IOAS's IOVA alignment and to
    /// `page_size` (`EINVAL`, as is a zero `page_size`); the domain must
    /// track (`EOPNOTSUPP`); the range must be covered by mappings without
    /// holes (`EINVAL`). The bitmap is written a bounded chunk at a time,
    /// whatever its size.
    pub fn hwpt_get_dirty_bitmap(
        &self,
        hwpt_id: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        data: u64,
        no_clear: bool,
    ) -> Result<()> {
        let hwpt = self.hwpt(hwpt_id)?;
        let iopt = hwpt.ioas.iopt.lock();
        let last = iova.checked_add(length.wrapping_sub(1)).ok_or(Errno::EOVERFLOW)?;
        let align = iopt.iova_alignment();
        let end = last.wrapping_add(1);
        if iova & (align - 1) != 0 || end & (align - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        if page_size == 0 || iova & (page_size - 1) != 0 || end & (page_size - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        let mut domain = hwpt.domain.lock();
        if !domain.dirty_capable() {
            return Err(Errno::EOPNOTSUPP);
        }
        if !iopt.covered(iova, last) {
            return Err(Errno::EINVAL);
        }
        let shift = page_size.trailing_zeros();
        // Index of the last bit: the bitmap has `last_bit + 1` bits.
        let last_bit = (last - iova) >> shift;
        let source = self.source();
        let mut writer = crate::dirty::BitmapWriter::new(&source, data, last_bit + 1);
        let mut gather = portcullis_iommu::IotlbGather::default();
        // A window of the bitmap at a time: the window is proven writable
        // before the dirty bits it reports are cleared (crate::dirty).
        let mut read = Ok(());
        for w in 0..writer.windows() {
            let first = w * crate::dirty::WINDOW_BITS;
            let end_bit = (first + crate::dirty::WINDOW_BITS - 1).min(last_bit);
            // `end_bit < last_bit` keeps `(end_bit + 1) << shift` within
            // `last - iova`: no overflow.
            let from = iova + (first << shift);
            let to = if end_bit == last_bit { last } else { iova + ((end_bit + 1) << shift) - 1 };
            if let Err(e) = writer.open(w) {
                read = Err(e);
                break;
            }
            let Some(len) = (to - from).checked_add(1) else {
                read = Err(Errno::EINVAL);
                break;
            };
            let r = domain.read_and_clear_dirty(from, len, !no_clear, &mut gather, &mut |at, len| {
                writer.set((at - iova) >> shift, (at + (len - 1) - iova) >> shift);
            });
            // What was read is written even when the domain failed part-way.
            let closed = writer.close();
            if let Err(e) = r {
                read = Err(crate::iopt::domain_errno(e));
                break;
            }
            if let Err(e) = closed {
                read = Err(e);
                break;
            }
        }
        // One invalidation for everything cleared, whatever failed.
        let synced = if no_clear { Ok(()) } else { domain.iotlb_sync(&mut gather) };
        read?;
        synced.map_err(crate::iopt::domain_errno)
    }

    /// Drops a HWPT's hold on its IOAS. The domain leaves the IOAS even
    /// when its final invalidation fails (the error is returned, and the
    /// pages it mapped stay pinned).
    pub(super) fn release_hwpt(&self, id: u32, h: &Hwpt) -> Result<()> {
        let r = {
            let _domains = h.ioas.domains_rw.write();
            h.ioas.iopt.lock().remove_domain(id as u64)
        };
        h.ioas.auto_hwpts.lock().retain(|x| *x != id);
        h.ioas.refs.fetch_sub(1, Ordering::SeqCst);
        r
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
}
