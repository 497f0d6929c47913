//! One page table for the CPU and the device: a guest whose devices walk
//! the hypervisor's own x86-64 4-level table (its AMD nested page table)
//! instead of a table of their own ([`GuestDma::new_sharing_table`]).
//!
//! Both walkers read the same entries, so a change is made once and the
//! IOMMU costs no page-table memory of its own; the hypervisor then
//! invalidates both consumers after each change: the CPU's nested TLB
//! (its VMCB's TLB control) and the IOMMU ([`GuestDma::invalidate_table`]).

use super::{GuestDma, Iommus, PassthroughError};
use crate::Platform;
use crate::error::Function;
use crate::{GuestAddr, PhysAddr};
use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use portcullis_iommu::unit::{IommuUnit, RequesterRef, Vendor};
use portcullis_iommu::{HwError, UnitError};

impl<P: Platform> GuestDma<P> {
    /// A guest whose devices translate through `root`, an x86-64 4-level
    /// page table the hypervisor owns, keeps and maps the guest's memory
    /// in (IOVA = GPA): for example the guest's nested page table. The
    /// crate never writes it; [`Self::add_memory`] is refused (the
    /// hypervisor maps in its table) and after changing or removing
    /// entries the hypervisor calls [`Self::invalidate_table`].
    ///
    /// Every level of the table must have U/S set (the device's requests
    /// come without supervisor privilege, as a nested walk's guest
    /// accesses are user accesses), leaves the R/W the device may use.
    /// Both walkers set accessed and dirty bits in it. On a unit that does
    /// not snoop (VT-d ECAP.C clear) the hypervisor writes each entry it
    /// changes back from the cache ([`Platform::flush_cache`]) before
    /// [`Self::invalidate_table`]. The guest's MSIs are routed as usual
    /// ([`Self::route_msi`]); its fault stream is [`Self::dma_faults`].
    ///
    /// [`Self::assign`] refuses ([`PassthroughError::SharedTable`] naming
    /// the reason) a device whose unit cannot walk that format: AMD-Vi (its
    /// v1 tables have another format), VT-d in legacy mode or without
    /// first-stage translation (its second stage is EPT's format). Where
    /// it can (VT-d scalable mode with ECAP.FSTS), the device is attached
    /// through a PASID entry with PGTT = first stage pointing at `root`.
    /// Separate tables ([`Self::new`]) stay the default.
    pub fn new_sharing_table(iommus: &Iommus<P>, root: PhysAddr) -> Result<Self, PassthroughError> {
        if root.0 & 0xfff != 0 {
            return Err(PassthroughError::SharedTable("the table root is not page aligned"));
        }
        let mut g = Self::new(iommus, 0)?;
        g.table = Some(root.0);
        Ok(g)
    }

    /// The hypervisor's table the devices walk ([`Self::new_sharing_table`]).
    pub fn shared_table(&self) -> Option<PhysAddr> {
        self.table.map(PhysAddr)
    }

    /// After the hypervisor changed or removed entries of the shared table
    /// for `[gpa, gpa + len)`: every unit with a device of this guest drops
    /// what it cached there (VT-d: PASID-based IOTLB invalidation of the
    /// domain, with the paging-structure caches). The CPU's nested TLB is
    /// the hypervisor's to flush.
    pub fn invalidate_table(&self, gpa: GuestAddr, len: u64) -> Result<(), PassthroughError> {
        if self.table.is_none() {
            return Err(PassthroughError::SharedTable("this guest's devices have a table of their own"));
        }
        super::page_range(gpa.0, len)?;
        let mut done = BTreeSet::new();
        for (f, a) in &self.devices {
            if done.insert((a.at.unit, a.id)) {
                a.unit
                    .invalidate_external(a.id as u16, gpa.0, gpa.0 + (len - 1))
                    .map_err(|e| PassthroughError::Unit(*f, e))?;
            }
        }
        Ok(())
    }

    /// Attaches `at` to the shared table at `root`; the unit's domain id.
    pub(super) fn attach_shared(
        &self,
        function: Function,
        unit: &Arc<dyn IommuUnit>,
        at: RequesterRef,
        root: u64,
    ) -> Result<u32, PassthroughError> {
        if unit.vendor() == Vendor::AmdVi {
            let cause = HwError::Unsupported(
                "AMD-Vi v1 page tables have another format than x86-64 4-level tables: the device cannot share the CPU's nested page table",
            );
            return Err(PassthroughError::Unit(function, UnitError { unit: unit.base(), cause }));
        }
        unit.attach_external(at.requester_id, root).map(u32::from).map_err(|e| PassthroughError::Unit(function, e))
    }
}
