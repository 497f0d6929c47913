//! Page tables a caller owns, walked by the unit as first-stage tables: a
//! hypervisor's nested page table (AMD NPT, the x86-64 4-level format)
//! doubles as a device's DMA table. Only scalable mode with first-stage
//! translation (ECAP.FSTS) can: legacy mode and the scalable second stage
//! walk VT-d second-stage tables (EPT's format).

use crate::{Clock, Shared};
use io_pgtable::TableMemory;
use portcullis_iommu::mmio::Mmio;
use portcullis_iommu::{HwError, UnitError};

impl<M, T, C> Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Attaches `sid` through a scalable-mode PASID entry with PGTT =
    /// first stage at `root`, a 4-level table the caller owns, under a new
    /// domain id (returned). Supervisor requests stay off in the entry, so
    /// every level of the caller's table must carry U/S.
    pub fn attach_external_table(&self, sid: u16, root: u64) -> Result<u16, UnitError> {
        let mut u = self.lock();
        let refuse = |what| Err(UnitError { unit: u.base(), cause: HwError::Unsupported(what) });
        if !u.is_scalable() {
            return refuse(
                "legacy mode walks VT-d second-stage tables (EPT's format), not x86-64 4-level tables: needs scalable mode with first-stage translation",
            );
        }
        if !u.caps().first_stage() {
            return refuse(
                "the unit has no first-stage translation (ECAP.FSTS); its second stage is EPT's format, not x86-64 4-level tables",
            );
        }
        if root & 0xfff != 0 {
            return refuse("the table root is not page aligned");
        }
        let did = u.alloc_did()?;
        u.attach_first_stage(sid, root, 4, did).inspect_err(|_| u.free_did(did))?;
        Ok(did)
    }

    /// PASID-based IOTLB invalidation of `[start, last]` under `did`
    /// (first-stage translations are cached under domain id and PASID),
    /// with the paging-structure caches.
    pub fn invalidate_external_table(&self, did: u16, start: u64, last: u64) -> Result<(), UnitError> {
        self.lock().invalidate_range_pasid(did, start, last, false)
    }

    /// Blocks `sid` again and drops everything cached under `did`; the
    /// domain id is reused only when the unit confirmed that.
    pub fn detach_external_table(&self, sid: u16, did: u16) -> Result<(), UnitError> {
        let mut u = self.lock();
        u.detach(sid)?;
        u.invalidate_range_pasid(did, 0, u64::MAX, false)?;
        u.free_did(did);
        Ok(())
    }
}
