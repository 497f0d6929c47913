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
use spin::Mutex;

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
    pub(super) refs: AtomicU32,
}

impl core::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Hwpt(ioas {}, auto {})", self.ioas_id, self.auto)
    }
}

impl Ictx {
    pub(super) fn new_hwpt(
        &self,
        ioas_id: u32,
        ioas: &Arc<Ioas>,
        dev: &Device,
        auto: bool,
    ) -> Result<(u32, Arc<Hwpt>)> {
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

    /// Drops a HWPT's hold on its IOAS. The domain leaves the IOAS even
    /// when its final invalidation fails (the error is returned, and the
    /// pages it mapped stay pinned).
    pub(super) fn release_hwpt(&self, id: u32, h: &Hwpt) -> Result<()> {
        let r = h.ioas.iopt.lock().remove_domain(id as u64);
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
