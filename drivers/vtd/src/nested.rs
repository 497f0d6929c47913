//! Nested translation (VT-d spec rev 4.x, 3.8 and 9.6, PGTT = 011b): a
//! device's DMA goes through a first-stage table its user owns (a guest's
//! vIOMMU driver writes it, in guest-physical addresses), then through a
//! second-stage table of the host (the parent domain, which maps guest
//! physical to host physical).
//!
//! * [`StageOne`]: the user's description of its table (what Linux's
//!   `struct iommu_hwpt_vtd_s1` carries), checked against the unit as
//!   Linux checks it when the entry is written (`intel_pasid_setup_nested`);
//! * [`NestedDomain`]: one such table with its own domain id on one unit:
//!   attaches a requester id by writing its PASID-0 entry with PGTT =
//!   nested (through [`crate::scalable::ScalableTables`], with the same
//!   invalidations as every other entry), and drops what the unit cached
//!   of the first stage with PASID-based IOTLB invalidations
//!   ([`NestedDomain::invalidate`]).
//!
//! Invariants: a nested domain's id tags only its own entries, so the IOTLB
//! entries the unit builds from them (combined first- and second-stage
//! translations) are cached under it, never under the parent's id. When the
//! parent's second stage changes, the parent's user must therefore also
//! invalidate under every nested domain id built on it
//! ([`NestedDomain::invalidate_parent_range`], an IOTLB invalidation with
//! the nested id: in scalable mode it covers nested translations whose
//! second stage used the range). The domain id is reused only once the
//! unit confirmed nothing stays cached under it.
//!
//! Devices never use ATS here (context entries keep DTE clear), so no
//! Device-TLB invalidation is needed.

use crate::qi::{Descriptor256, PasidIotlbScope};
use crate::scalable::{FirstStageTable, RID_PASID};
use crate::{Caps, Clock, Shared, Unit};
use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use core::fmt;
use io_pgtable::TableMemory;
use portcullis_iommu::UnitError;
use portcullis_iommu::mmio::Mmio;

/// `IOMMU_VTD_S1_SRE`: supervisor requests are translated.
pub const S1_SRE: u64 = 1 << 0;
/// `IOMMU_VTD_S1_EAFE`: extended accessed flag.
pub const S1_EAFE: u64 = 1 << 1;
/// `IOMMU_VTD_S1_WPE`: write protect (with SRE only).
pub const S1_WPE: u64 = 1 << 2;

/// The first-stage width of 4-level paging, in bits.
pub const ADDR_WIDTH_4LEVEL: u32 = 48;
/// The first-stage width of 5-level paging, in bits.
pub const ADDR_WIDTH_5LEVEL: u32 = 57;

/// A user's first-stage table, as Linux's `struct iommu_hwpt_vtd_s1`
/// describes it (6.8+): flags ([`S1_SRE`], [`S1_EAFE`], [`S1_WPE`]), the
/// table's address (guest physical) and its input width (48 or 57 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageOne {
    /// `flags`.
    pub flags: u64,
    /// `pgtbl_addr`.
    pub pgtbl_addr: u64,
    /// `addr_width`.
    pub addr_width: u32,
}

/// Why nested translation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedError {
    /// The unit cannot nest: nested translation needs scalable mode with
    /// ECAP.NEST, first-stage (ECAP.FSTS) and second-stage (ECAP.SSTS)
    /// translation.
    NotSupported,
    /// `addr_width` is neither 48 (4-level) nor 57 (5-level).
    AddressWidth(u32),
    /// A 57-bit (5-level) first stage on a unit without CAP.FS5LP.
    FiveLevel,
    /// [`S1_SRE`] on a unit without ECAP.SRS.
    SupervisorRequests,
    /// [`S1_EAFE`] on a unit without ECAP.EAFS.
    ExtendedAccessed,
    /// The parent is not a second-stage domain this unit can walk (a
    /// depth outside SAGAW, or its table is not page aligned).
    Parent,
    /// The unit failed (or ran out of domain ids or memory).
    Unit(UnitError),
}

impl From<UnitError> for NestedError {
    fn from(e: UnitError) -> Self {
        Self::Unit(e)
    }
}

impl fmt::Display for NestedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSupported => write!(
                f,
                "nested translation needs scalable mode with ECAP.NEST and first- and second-stage translation"
            ),
            Self::AddressWidth(w) => write!(f, "first-stage address width {w} is neither 48 nor 57"),
            Self::FiveLevel => write!(f, "5-level first-stage paging needs CAP.FS5LP"),
            Self::SupervisorRequests => write!(f, "supervisor requests (SRE) need ECAP.SRS"),
            Self::ExtendedAccessed => write!(f, "the extended accessed flag (EAFE) needs ECAP.EAFS"),
            Self::Parent => write!(f, "the parent is not a second-stage table the unit can walk"),
            Self::Unit(e) => write!(f, "{e}"),
        }
    }
}

impl StageOne {
    /// The first-stage half of the PASID entry, if the unit can walk the
    /// table as described. Checked in Linux's order: the width (48, or 57
    /// with CAP.FS5LP), then SRE against ECAP.SRS, then EAFE against
    /// ECAP.EAFS. As in Linux, flags outside the three are ignored, WPE
    /// without SRE is dropped, and the low 12 bits of `pgtbl_addr` are not
    /// part of the entry's pointer.
    pub fn check(&self, caps: Caps) -> Result<FirstStageTable, NestedError> {
        let levels = match self.addr_width {
            ADDR_WIDTH_4LEVEL => 4,
            ADDR_WIDTH_5LEVEL if caps.first_stage_5level() => 5,
            ADDR_WIDTH_5LEVEL => return Err(NestedError::FiveLevel),
            w => return Err(NestedError::AddressWidth(w)),
        };
        let sre = self.flags & S1_SRE != 0;
        if sre && !caps.supervisor_requests() {
            return Err(NestedError::SupervisorRequests);
        }
        let eafe = self.flags & S1_EAFE != 0;
        if eafe && !caps.extended_accessed() {
            return Err(NestedError::ExtendedAccessed);
        }
        Ok(FirstStageTable { table: self.pgtbl_addr, levels, sre, wpe: sre && self.flags & S1_WPE != 0, eafe })
    }
}

/// The parent's second stage, as a nested entry needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestParent {
    /// The second-stage table (SSPTPTR).
    pub root: u64,
    /// Its levels (3, 4 or 5; AW = levels - 2, which SAGAW must offer).
    pub levels: u32,
    /// Whether the parent tracks dirty pages now: the entry gets SSADE.
    pub dirty_tracking: bool,
}

/// What to drop from the first-stage caches of a nested domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstStageRange {
    /// Everything (Linux's `npages` = `U64_MAX`).
    All,
    /// `npages` 4 KiB pages from `addr` (4 KiB aligned); `leaf_only`: the
    /// paging-structure caches may be kept (only leaves changed).
    Pages {
        /// First byte.
        addr: u64,
        /// Pages.
        npages: u64,
        /// Leaves only (IH).
        leaf_only: bool,
    },
}

/// The one PASID-based IOTLB invalidation for `range` of (`did`, `pasid`)
/// on a unit whose largest address mask is `mamv`: a page-selective one
/// over the smallest naturally aligned block covering the range (more
/// than asked when the range is not such a block), or PASID-selective when
/// that block's mask would exceed `mamv` or the range is everything.
/// `None` for zero pages (nothing to drop).
pub fn first_stage_descriptor(did: u16, pasid: u32, range: FirstStageRange, mamv: u8) -> Option<Descriptor256> {
    let all = Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did, pasid });
    let (addr, npages, leaf_only) = match range {
        FirstStageRange::All => return Some(all),
        FirstStageRange::Pages { npages: 0, .. } => return None,
        FirstStageRange::Pages { addr, npages, leaf_only } => (addr, npages, leaf_only),
    };
    // Past the end of the address space is clamped to it.
    let last = npages.checked_mul(4096).and_then(|len| addr.checked_add(len - 1)).unwrap_or(u64::MAX);
    let (first_page, last_page) = (addr >> 12, last >> 12);
    // The smallest mask under which the first and last page share a block.
    let am = 64 - (first_page ^ last_page).leading_zeros();
    if am > mamv as u32 {
        return Some(all);
    }
    let block = (first_page >> am << am) << 12;
    Some(Descriptor256::pasid_iotlb(PasidIotlbScope::Pages { did, pasid, addr: block, am: am as u8, leaf_only }))
}

impl<M: Mmio, T: TableMemory, C: Clock> Unit<M, T, C> {
    /// Whether the unit can nest: scalable mode, ECAP.NEST, and both
    /// first- and second-stage translation.
    pub fn can_nest(&self) -> bool {
        let c = self.caps();
        self.is_scalable() && c.nested() && c.first_stage() && c.second_stage()
    }

    /// Points `sid` at nested translation: the first stage `fs`, then the
    /// parent's second stage, under domain `did` (a live entry is blocked
    /// and invalidated first).
    pub fn attach_nested(
        &mut self,
        sid: u16,
        fs: FirstStageTable,
        parent: &NestParent,
        did: u16,
    ) -> Result<(), NestedError> {
        if !self.can_nest() {
            return Err(NestedError::NotSupported);
        }
        let aw = crate::entries::aw_for_levels(parent.levels)
            .filter(|aw| self.caps().sagaw() >> aw & 1 != 0)
            .ok_or(NestedError::Parent)?;
        if parent.root & 0xfff != 0 || parent.root == 0 {
            return Err(NestedError::Parent);
        }
        let (root, ssade) = (parent.root, parent.dirty_tracking);
        self.scalable_change(|t| t.set_nested(sid, fs, root, aw, did, ssade), sid)?;
        Ok(())
    }

    /// Drops what the unit cached of the first stage of domain `did` for
    /// requests without PASID (PASID 0), and waits for it.
    pub fn invalidate_first_stage(&mut self, did: u16, range: FirstStageRange) -> Result<(), UnitError> {
        if !self.is_scalable() {
            return Err(self.err_invalid("PASID-based invalidation needs scalable mode"));
        }
        match first_stage_descriptor(did, RID_PASID, range, self.caps().mamv()) {
            Some(d) => self.submit256(&[d]),
            None => Ok(()),
        }
    }
}

/// A nested domain on one unit: the user's first stage ([`StageOne`]),
/// its own domain id, and the requester ids attached to it. Attaching
/// takes the parent's second stage ([`NestParent`]) each time.
pub struct NestedDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    unit: Arc<Shared<M, T, C>>,
    did: u16,
    stage_one: StageOne,
    attached: BTreeSet<u16>,
}

impl<M, T, C> fmt::Debug for NestedDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NestedDomain(did {}, {:x?}, {} attached)", self.did, self.stage_one, self.attached.len())
    }
}

impl<M, T, C> Shared<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Whether the unit can nest ([`Unit::can_nest`]).
    pub fn can_nest(&self) -> bool {
        self.lock().can_nest()
    }

    /// A nested domain for the user's first stage `stage_one`, with a new
    /// domain id. As in Linux, `stage_one` is checked against the unit
    /// when a device is attached, not here; a unit that cannot nest
    /// refuses ([`NestedError::NotSupported`]).
    pub fn new_nested_domain(self: &Arc<Self>, stage_one: StageOne) -> Result<NestedDomain<M, T, C>, NestedError> {
        let mut u = self.lock();
        if !u.can_nest() {
            return Err(NestedError::NotSupported);
        }
        let did = u.alloc_did()?;
        Ok(NestedDomain { unit: self.clone(), did, stage_one, attached: BTreeSet::new() })
    }
}

impl<M, T, C> NestedDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Its domain id.
    pub fn domain_id(&self) -> u16 {
        self.did
    }

    /// The user's first stage.
    pub fn stage_one(&self) -> StageOne {
        self.stage_one
    }

    /// The requester ids attached.
    pub fn attached(&self) -> impl Iterator<Item = u16> + '_ {
        self.attached.iter().copied()
    }

    /// Points `sid` at this domain over `parent`: the first stage is
    /// checked against the unit ([`StageOne::check`]), then the PASID-0
    /// entry is written with PGTT = nested and invalidated as every entry
    /// is. On error the device is as it was (a present entry it had stays)
    /// unless the unit failed.
    pub fn attach_requester(&mut self, sid: u16, parent: &NestParent) -> Result<(), NestedError> {
        let mut u = self.unit.lock();
        let fs = self.stage_one.check(u.caps())?;
        u.attach_nested(sid, fs, parent, self.did)?;
        self.attached.insert(sid);
        Ok(())
    }

    /// Blocks `sid` again (PASID-cache and IOTLB invalidated for the
    /// entry removed). A requester id not attached here is left alone,
    /// as is one attached here once and moved to another domain since
    /// (its entry names that domain now).
    pub fn detach_requester(&mut self, sid: u16) -> Result<(), UnitError> {
        if !self.attached.contains(&sid) {
            return Ok(());
        }
        let mut u = self.unit.lock();
        if u.attached_domain(sid) == Some(self.did) {
            u.detach(sid)?;
        }
        self.attached.remove(&sid);
        Ok(())
    }

    /// Drops what the unit cached of `range` of the first stage (a
    /// PASID-based IOTLB invalidation, waited for).
    pub fn invalidate(&self, range: FirstStageRange) -> Result<(), UnitError> {
        self.unit.lock().invalidate_first_stage(self.did, range)
    }

    /// Drops the nested translations cached under this domain's id whose
    /// second stage used `[start, last]` of the parent (after the parent
    /// unmapped or changed it): IOTLB invalidation with this domain's id.
    pub fn invalidate_parent_range(&self, start: u64, last: u64, leaf_only: bool) -> Result<(), UnitError> {
        self.unit.lock().invalidate_range(self.did, start, last, leaf_only)
    }
}

impl<M, T, C> Drop for NestedDomain<M, T, C>
where
    M: Mmio + Send + 'static,
    T: TableMemory + Clone + Send + Sync + 'static,
    C: Clock + Send + 'static,
{
    /// Devices whose entries still name this domain are blocked (not
    /// those moved to another domain since), then everything cached under
    /// the domain id is dropped (domain-selective IOTLB invalidation); the
    /// id is reused only when all of that succeeded.
    fn drop(&mut self) {
        let mut u = self.unit.lock();
        let mut clean = u.detach_domain(self.did).is_ok();
        clean &= u.invalidate_range(self.did, 0, u64::MAX, false).is_ok();
        if clean {
            u.free_did(self.did);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_one_checks_in_linux_order() {
        let none = Caps { cap: 0, ecap: 0 };
        let all = Caps { cap: 1 << 60, ecap: 1 << 31 | 1 << 34 };
        let s = |flags, addr_width| StageOne { flags, pgtbl_addr: 0x1000_0fff, addr_width };
        assert_eq!(
            s(0, 48).check(none),
            Ok(FirstStageTable { table: 0x1000_0fff, levels: 4, sre: false, wpe: false, eafe: false })
        );
        assert_eq!(s(0, 39).check(all), Err(NestedError::AddressWidth(39)));
        assert_eq!(s(0, 0).check(all), Err(NestedError::AddressWidth(0)));
        // The width comes first.
        assert_eq!(s(S1_SRE | S1_EAFE, 57).check(none), Err(NestedError::FiveLevel));
        assert_eq!(s(0, 57).check(all).unwrap().levels, 5);
        assert_eq!(s(S1_SRE | S1_EAFE, 48).check(none), Err(NestedError::SupervisorRequests));
        assert_eq!(s(S1_EAFE, 48).check(none), Err(NestedError::ExtendedAccessed));
        let f = s(S1_SRE | S1_WPE | S1_EAFE | 1 << 40, 48).check(all).unwrap();
        assert!(f.sre && f.wpe && f.eafe, "unknown flags are ignored, as in Linux");
        assert!(!s(S1_WPE, 48).check(all).unwrap().wpe, "WPE only with SRE");
    }

    #[test]
    fn first_stage_descriptors() {
        let d = |range| first_stage_descriptor(5, 0, range, 18).map(|d| d.0);
        let pages = |addr, npages, leaf_only| FirstStageRange::Pages { addr, npages, leaf_only };
        let psi = |addr: u64, am: u64, ih: u64| Some([0x6 | 3 << 4 | 5 << 16, addr | ih << 6 | am, 0, 0]);
        let all = Some([0x6 | 2 << 4 | 5 << 16, 0, 0, 0]);
        assert_eq!(d(FirstStageRange::All), all);
        assert_eq!(d(pages(0x3000, 0, false)), None);
        assert_eq!(d(pages(0x3000, 1, true)), psi(0x3000, 0, 1));
        assert_eq!(d(pages(0x4000, 4, false)), psi(0x4000, 2, 0));
        // Not a naturally aligned block: the smallest one covering it.
        assert_eq!(d(pages(0x3000, 2, false)), psi(0, 3, 0));
        assert_eq!(d(pages(0x20_0000, 512, false)), psi(0x20_0000, 9, 0));
        // Beyond MAMV, or past the end of the address space: everything.
        assert_eq!(d(pages(0, 1 << 19, false)), all);
        assert_eq!(d(pages(0, 1 << 18, false)), psi(0, 18, 0));
        assert_eq!(d(pages(0xffff_f000, u64::MAX - 1, false)), all);
        assert_eq!(d(pages(!0xfff_u64, 1, false)), psi(!0xfff_u64, 0, 0));
    }
}
