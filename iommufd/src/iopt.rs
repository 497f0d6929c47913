//! The I/O page table of one IOAS: which IOVA ranges map which user pages,
//! and the domains those mappings are loaded into.
//!
//! ```text
//!   IoPagetable
//!   ├── areas     [iova, last] -> Area { pages: Arc<Pages>, start_byte, prot }
//!   ├── allowed   IOVA ranges allocation may use (empty = all)
//!   ├── reserved  IOVA ranges no area may overlap, tagged with an owner
//!   └── domains   every domain attached through a HWPT of this IOAS
//! ```
//!
//! Invariants (checked by the tests after every operation):
//! * areas never overlap each other or a reserved range;
//! * every area is in every domain, or (when there are no domains) in none;
//!   an area in domains holds exactly one use of each of its pages in the
//!   pinned-page store (`Area::filled`), whatever the number of domains;
//! * every area's IOVA, length and page offset are multiples of
//!   `iova_alignment`, the largest granule of the domains (and accesses);
//! * every operation either completes or leaves the table, the domains and
//!   the pins exactly as they were.
//!
//! Deliberate difference from Linux: an unmap whose range cuts through an
//! area fails with `ENOENT` *before* unmapping anything; Linux unmaps the
//! areas it met before the one it cannot cut, then fails.
//!
//! Locking: an `IoPagetable` lives behind its IOAS's mutex. Inside it,
//! domain locks are taken one at a time, and never held while a `Pages`
//! method runs: a `Pages` takes domain locks itself (to read addresses
//! back) while holding its own lock, so the order is IOAS → `Pages` →
//! domain (see the top of `ctx/mod.rs` and DESIGN.md, "Locking"). Every
//! path here pins before it locks a domain and drops its domain guards
//! before it unpins or registers holders.

use crate::errno::{Errno, Result};
use crate::iova::{IntervalMap, IovaSpace, RangeSet, ReservedRanges};
use crate::memsrc::{PAGE_SIZE, push_run};
use crate::pages::{Holder, Pages, PhysRuns, UseKind};
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis_iommu::{DomainError, IommuDomain, IotlbGather, IovaRange, PhysRun, Prot};

/// Most pieces handed to a domain in one `map_runs` call when they must be
/// built (pages split, or large pages off).
const MAP_BATCH: usize = 1024;

/// Most pieces handed to a domain in one `map_runs` call when the pinned
/// runs go as they are: no copy is made, and each call may cost the domain
/// an invalidation wait (units that cache not-present entries: VT-d caching
/// mode, AMD-Vi NpCache), so calls are few and large.
const MAP_BATCH_RUNS: usize = 1 << 16;

/// A domain as the IOAS holds it (shared with its HWPT object).
pub use crate::pages::DomainRef;

/// Who reserved an IOVA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// Outside the aperture of the domain with this key.
    Domain(u64),
    /// A device's reserved regions (MSI window, RMRR), by device object id.
    Device(u32),
    /// The selftest's `IOMMU_TEST_OP_ADD_RESERVED`.
    Test,
}

/// One mapping: IOVA range -> bytes of a [`Pages`].
#[derive(Debug, Clone)]
pub struct Area {
    /// The pages.
    pub pages: Arc<Pages>,
    /// Offset of the area's first byte from the start of page 0 of `pages`.
    pub start_byte: u64,
    /// Permissions.
    pub prot: Prot,
    /// Holds one use of each of its pages for the domains.
    pub filled: bool,
    /// Accesses that pinned pages of this area.
    pub accesses: u32,
    /// Its registration with `pages` as a holder (while filled).
    pub holder: Option<u64>,
    /// Being filled or unmapped outside the IOAS lock (see
    /// [`IoPagetable::reserve_pages`], [`IoPagetable::begin_unmap`]):
    /// every other operation that meets it fails with `EBUSY`.
    pub busy: bool,
}

impl Area {
    fn first_page(&self) -> u64 {
        self.start_byte / PAGE_SIZE
    }
    fn last_page(&self, length: u64) -> u64 {
        (self.start_byte + length - 1) / PAGE_SIZE
    }
}

/// A slice of a [`Pages`] to be mapped (one element of a map or copy).
#[derive(Debug, Clone)]
pub struct PagesSlice {
    /// The pages.
    pub pages: Arc<Pages>,
    /// First byte, from the start of page 0 of `pages`.
    pub start_byte: u64,
    /// Bytes.
    pub length: u64,
}

/// The I/O page table of one IOAS.
pub struct IoPagetable {
    areas: IntervalMap<Area>,
    allowed: RangeSet,
    reserved: ReservedRanges<Owner>,
    domains: Vec<(u64, DomainRef)>,
    iova_alignment: u64,
    disable_large_pages: bool,
    access_alignments: BTreeMap<u32, u64>,
}

impl core::fmt::Debug for IoPagetable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IoPagetable")
            .field("areas", &self.areas.len())
            .field("domains", &self.domains.len())
            .field("iova_alignment", &self.iova_alignment)
            .finish()
    }
}

impl Default for IoPagetable {
    fn default() -> Self {
        Self::new()
    }
}

/// The errno a domain failure reports.
pub(crate) fn domain_errno(e: DomainError) -> Errno {
    match e {
        DomainError::NoMemory | DomainError::Injected => Errno::ENOMEM,
        DomainError::BadRange { .. } => Errno::EINVAL,
        DomainError::AlreadyMapped { .. } => Errno::EEXIST,
        DomainError::Incompatible => Errno::EINVAL,
        DomainError::Hardware { cause: portcullis_iommu::HwError::Timeout { .. }, .. } => Errno::ETIMEDOUT,
        DomainError::Hardware { cause: portcullis_iommu::HwError::NoMemory, .. } => Errno::ENOMEM,
        DomainError::Hardware { .. } | DomainError::NeedsRecovery => Errno::EIO,
        DomainError::NotSupported => Errno::EOPNOTSUPP,
    }
}

/// A failed load of an area into a domain: the errno, and whether the
/// domain may still cache translations to the area's pages (a hardware
/// failure, such as an invalidation that failed while the domain unwound a
/// partial map), in which case those pages must stay pinned because a
/// device may still reach them. A domain that refuses the map outright
/// (out of memory, a bad range, `NeedsRecovery` after an earlier failed
/// invalidation) mapped nothing: not stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LoadError {
    errno: Errno,
    stale: bool,
}

impl From<Errno> for LoadError {
    /// A failure before the domain was touched (a fault point).
    fn from(errno: Errno) -> Self {
        Self { errno, stale: false }
    }
}

impl LoadError {
    /// A map the domain refused: stale only for a hardware failure.
    fn map(e: DomainError) -> Self {
        Self { errno: domain_errno(e), stale: matches!(e, DomainError::Hardware { .. }) }
    }
    /// A failed invalidation: always stale.
    fn sync(e: Errno) -> Self {
        Self { errno: e, stale: true }
    }
}

/// What an area is loaded into: a domain under its lock, or one shared
/// with other threads mapping through its concurrent path.
trait AreaMapper {
    /// Recovers the domain after a failed invalidation, if it needs it.
    fn recover(&mut self) -> core::result::Result<(), DomainError>;
    /// Maps consecutive pieces (all or nothing).
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> core::result::Result<(), LoadError>;
    /// Unmaps `[iova, iova + length)` and syncs.
    fn undo(&mut self, iova: u64, length: u64) -> Result<()>;
}

/// A domain under its (write) lock.
struct Locked<'a>(&'a mut dyn IommuDomain);

impl AreaMapper for Locked<'_> {
    fn recover(&mut self) -> core::result::Result<(), DomainError> {
        self.0.recover()
    }
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> core::result::Result<(), LoadError> {
        self.0.map_runs(iova, runs, prot).map_err(LoadError::map)
    }
    fn undo(&mut self, iova: u64, length: u64) -> Result<()> {
        let mut g = IotlbGather::default();
        self.0.unmap(iova, length, &mut g);
        sync(self.0, &mut g)
    }
}

/// A domain used through its concurrent path, under a read lock taken for
/// each call. A domain that needs recovery (an invalidation failed) is
/// recovered under its write lock, when a map finds it so.
struct SharedMapper<'a>(&'a DomainRef);

impl AreaMapper for SharedMapper<'_> {
    fn recover(&mut self) -> core::result::Result<(), DomainError> {
        Ok(())
    }
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> core::result::Result<(), LoadError> {
        match self.0.read().map_shared(iova, runs, prot) {
            Err(DomainError::NeedsRecovery) => {}
            r => return r.map_err(LoadError::map),
        }
        // Nothing of this call is in the domain yet: a recovery that fails
        // leaves no page of it reachable (as the locked path's recover
        // before mapping).
        self.0.lock().recover().map_err(|e| LoadError { errno: domain_errno(e), stale: false })?;
        self.0.read().map_shared(iova, runs, prot).map_err(LoadError::map)
    }
    fn undo(&mut self, iova: u64, length: u64) -> Result<()> {
        let mut g = IotlbGather::default();
        let d = self.0.read();
        d.unmap_shared(iova, length, &mut g).map_err(domain_errno)?;
        d.iotlb_sync_shared(&mut g).map_err(domain_errno)
    }
}

/// An area to insert: `(start, last, area)`.
type NewArea = (u64, u64, Area);

/// Areas reserved by [`IoPagetable::reserve_pages`] for a fill outside
/// the IOAS lock, with the domains to fill.
#[derive(Debug)]
pub struct Reserved {
    /// Where the map starts.
    pub iova: u64,
    areas: Vec<(u64, u64, Area)>,
    domains: Vec<DomainRef>,
    small: bool,
}

/// Areas taken out of use by [`IoPagetable::begin_unmap`] for an unmap
/// outside the IOAS lock, with the domains to unmap them from.
#[derive(Debug)]
pub struct Unmapping {
    areas: Vec<(u64, u64, Area)>,
    domains: Vec<DomainRef>,
    bytes: u64,
}

/// Syncs `g` on `d`, as an errno.
fn sync(d: &mut dyn IommuDomain, g: &mut IotlbGather) -> Result<()> {
    d.iotlb_sync(g).map_err(domain_errno)
}

/// The last byte of `[iova, iova + length)`: `EINVAL` when empty,
/// `EOVERFLOW` past `u64::MAX`.
pub(crate) fn last_of(iova: u64, length: u64) -> Result<u64> {
    if length == 0 {
        return Err(Errno::EINVAL);
    }
    iova.checked_add(length - 1).ok_or(Errno::EOVERFLOW)
}

impl IoPagetable {
    /// An empty table: no alignment restriction, everything allowed.
    pub fn new() -> Self {
        Self {
            areas: IntervalMap::new(),
            allowed: RangeSet::new(),
            reserved: ReservedRanges::new(),
            domains: Vec::new(),
            iova_alignment: 1,
            disable_large_pages: false,
            access_alignments: BTreeMap::new(),
        }
    }

    /// Required alignment of IOVAs, lengths and page offsets.
    pub fn iova_alignment(&self) -> u64 {
        self.iova_alignment
    }

    /// Whether large pages are disabled (`IOMMU_OPTION_HUGE_PAGES` = 0).
    pub fn large_pages_disabled(&self) -> bool {
        self.disable_large_pages
    }

    /// Areas in IOVA order: `(iova, last, area)`.
    pub fn areas(&self) -> impl Iterator<Item = (u64, u64, &Area)> {
        self.areas.iter()
    }

    /// Page sizes every domain supports (AND of their bitmaps; all ones
    /// without domains).
    pub fn page_size_bitmap(&self) -> u64 {
        self.domains.iter().fold(u64::MAX, |acc, (_, d)| acc & d.read().page_sizes())
    }

    /// Number of domains loaded with this table.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Reserved ranges and their owners.
    pub fn reserved(&self) -> impl Iterator<Item = (IovaRange, Owner)> + '_ {
        self.reserved.iter().map(|(start, last, owner)| (IovaRange { start, last }, owner))
    }

    fn first_area_overlapping(&self, start: u64, last: u64) -> Option<(u64, u64)> {
        self.areas.first_overlapping(start, last).map(|(s, l, _)| (s, l))
    }

    fn areas_overlapping(&self, start: u64, last: u64) -> Vec<(u64, u64)> {
        self.areas.iter_overlapping(start, last).map(|(s, l, _)| (s, l)).collect()
    }

    /// Whether areas cover `[start, last]` without a hole.
    pub fn covered(&self, start: u64, last: u64) -> bool {
        let mut next = start;
        for (s, l, _) in self.areas.iter_overlapping(start, last) {
            if s > next {
                return false;
            }
            if l >= last {
                return true;
            }
            next = l + 1;
        }
        false
    }

    fn reserved_overlap(&self, start: u64, last: u64) -> bool {
        self.reserved.any_overlap(start, last)
    }

    fn area(&self, start: u64) -> (u64, Area) {
        self.areas.get(start).map(|(l, a)| (l, a.clone())).expect("area exists")
    }

    /// Linux's `iopt_check_iova`: alignment, overflow, reserved, existing.
    fn check_iova(&self, iova: u64, length: u64) -> Result<()> {
        if iova & (self.iova_alignment - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        let last = last_of(iova, length)?;
        if self.reserved_overlap(iova, last) {
            return Err(Errno::EINVAL);
        }
        if self.first_area_overlapping(iova, last).is_some() {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    /// IOVA allocation, Linux's `iopt_alloc_iova` (see [`crate::iova`]):
    /// alignment from the length and the user address (so huge pages stay
    /// possible), the user address's page offset kept, lowest fitting hole
    /// inside the allowed ranges.
    fn alloc_iova(&self, uptr: u64, length: u64) -> Result<u64> {
        IovaSpace::new(&self.areas, &self.allowed, &self.reserved).alloc_for_addr(uptr, length, self.iova_alignment)
    }

    /// Maps `slices` (consecutive in IOVA) at `iova`, or at an allocated
    /// IOVA when `iova` is `None`. Returns the IOVA. Loads the new areas
    /// into every domain. All or nothing.
    pub fn map_pages(&mut self, slices: &[PagesSlice], length: u64, iova: Option<u64>, prot: Prot) -> Result<u64> {
        let (iova, new) = self.prepare_areas(slices, length, iova, prot)?;
        let mut loaded: Vec<u64> = Vec::new();
        for (start, last, area) in new {
            self.areas.insert(start, last, area).map_err(|_| Errno::EEXIST)?;
            if let Err(e) = self.fill_area(start) {
                self.areas.remove(start);
                let mut result = Err(e);
                for s in loaded.iter().rev() {
                    if let Err(e) = self.unfill_area(*s) {
                        result = Err(e);
                    }
                    self.areas.remove(*s);
                }
                return result;
            }
            loaded.push(start);
        }
        Ok(iova)
    }

    /// The checks of a map and the areas it would insert: `(iova, areas)`.
    fn prepare_areas(
        &self,
        slices: &[PagesSlice],
        length: u64,
        iova: Option<u64>,
        prot: Prot,
    ) -> Result<(u64, Vec<NewArea>)> {
        if length & (self.iova_alignment - 1) != 0 || length == 0 {
            return Err(Errno::EINVAL);
        }
        let first = slices.first().ok_or(Errno::EINVAL)?;
        let iova = match iova {
            None => self.alloc_iova(first.pages.origin.base().wrapping_add(first.start_byte), length)?,
            Some(iova) => {
                self.check_iova(iova, length)?;
                iova
            }
        };
        // Validate every slice before inserting anything.
        let mut at = iova;
        let mut new: Vec<(u64, u64, Area)> = Vec::with_capacity(slices.len());
        for s in slices {
            if prot.writable() && !s.pages.writable {
                return Err(Errno::EPERM);
            }
            if (s.start_byte % PAGE_SIZE) & (self.iova_alignment - 1) != 0 {
                return Err(Errno::EINVAL);
            }
            let last = last_of(at, s.length)?;
            let end_byte = s.start_byte.checked_add(s.length - 1).ok_or(Errno::EOVERFLOW)?;
            if end_byte / PAGE_SIZE >= s.pages.npages {
                return Err(Errno::EOVERFLOW);
            }
            new.push((
                at,
                last,
                Area {
                    pages: s.pages.clone(),
                    start_byte: s.start_byte,
                    prot,
                    filled: false,
                    accesses: 0,
                    holder: None,
                    busy: false,
                },
            ));
            at = last.wrapping_add(1);
        }
        Ok((iova, new))
    }

    /// Whether map and unmap run their domain work outside the IOAS lock
    /// (Linux's split of `iova_rwsem` and `domains_rwsem`): some domain is
    /// attached and every one maps concurrently
    /// ([`IommuDomain::supports_shared`]). Otherwise they run under the
    /// lock ([`Self::map_pages`], [`Self::unmap`]).
    pub fn concurrent(&self) -> bool {
        !self.domains.is_empty() && self.domains.iter().all(|(_, d)| d.read().supports_shared())
    }

    /// First step of a map outside the lock: the checks of
    /// [`Self::map_pages`], then the areas inserted, marked busy (other
    /// operations meeting them fail with `EBUSY`; their IOVA is taken).
    /// The caller fills them with [`Self::fill_reserved`] without the lock
    /// (but holding the IOAS's domain list for reading, so that no domain
    /// comes or goes meanwhile) and ends with [`Self::finish_reserved`]
    /// under the lock again.
    pub fn reserve_pages(
        &mut self,
        slices: &[PagesSlice],
        length: u64,
        iova: Option<u64>,
        prot: Prot,
    ) -> Result<Reserved> {
        let (iova, mut new) = self.prepare_areas(slices, length, iova, prot)?;
        for k in 0..new.len() {
            let (start, last, ref area) = new[k];
            let area = Area { busy: true, ..area.clone() };
            if self.areas.insert(start, last, area).is_err() {
                for &(s, _, _) in &new[..k] {
                    self.areas.remove(s);
                }
                return Err(Errno::EEXIST);
            }
        }
        for (_, _, a) in &mut new {
            a.busy = true;
        }
        let domains = self.domains.iter().map(|(_, d)| d.clone()).collect();
        Ok(Reserved { iova, areas: new, domains, small: self.disable_large_pages })
    }

    /// Second step of a map outside the lock (no IOAS lock held): pins the
    /// reserved areas' pages and maps them into every domain through the
    /// concurrent path, registering each area as a holder of its pages.
    /// All or nothing: on failure what was mapped is unmapped again and
    /// unpinned (except pages a domain may still cache, as in
    /// `fill_area`). Returns the holder keys, one per area.
    pub fn fill_reserved(r: &Reserved) -> Result<Vec<u64>> {
        let mut keys: Vec<u64> = Vec::with_capacity(r.areas.len());
        for (k, (start, last, area)) in r.areas.iter().enumerate() {
            let (start, last) = (*start, *last);
            let (fp, lp) = (area.first_page(), area.last_page(last - start + 1));
            // Registered busy before the pages are pinned: until the
            // domains map them, a pin from another IOAS that meets them
            // gets EBUSY instead of taking their address from the user's.
            let key = area.pages.register_busy(Self::holder_in(&r.domains[0], start, area, fp, lp));
            let result = area.pages.pin_runs(fp, lp, UseKind::Domain).and_then(|phys| {
                for (j, d) in r.domains.iter().enumerate() {
                    let loaded = Self::map_area_into(&mut SharedMapper(d), start, last, area, &phys, r.small);
                    if let Err(mut e) = loaded {
                        for d in &r.domains[..j] {
                            if let Err(se) = SharedMapper(d).undo(start, last - start + 1)
                                && !e.stale
                            {
                                e = LoadError::sync(se);
                            }
                        }
                        // Stale: a device may still reach the pages; they
                        // stay pinned, their addresses kept.
                        area.pages.release_holder(Some(key), fp, lp, &phys, !e.stale);
                        return Err(e.errno);
                    }
                }
                Ok(())
            });
            if let Err(e) = result {
                area.pages.unregister(key);
                // Unload the areas before this one. A failed invalidation
                // here leaves the area's pins in place (a device may still
                // reach the pages) and is what the caller hears, as in
                // `map_pages`: the fill's own error says less.
                let mut reported = Err(e);
                for ((s, l, a), key) in r.areas[..k].iter().zip(&keys).rev() {
                    if let Err(e) = Self::unload_shared(&r.domains, *s, *l, a, Some(*key)) {
                        reported = Err(e);
                    }
                }
                return reported;
            }
            area.pages.set_busy(Some(key), false);
            keys.push(key);
        }
        Ok(keys)
    }

    /// Last step of a map outside the lock: the areas become filled (with
    /// the holder keys [`Self::fill_reserved`] returned), or are removed
    /// when it failed. Returns the IOVA.
    pub fn finish_reserved(&mut self, r: Reserved, filled: Result<Vec<u64>>) -> Result<u64> {
        match filled {
            Ok(keys) => {
                for ((start, _, _), key) in r.areas.iter().zip(keys) {
                    let a = self.areas.get_mut(*start).expect("a reserved area stays until finished").1;
                    (a.busy, a.filled, a.holder) = (false, true, Some(key));
                }
                Ok(r.iova)
            }
            Err(e) => {
                for (start, _, _) in &r.areas {
                    self.areas.remove(*start);
                }
                Err(e)
            }
        }
    }

    /// Unmaps the filled area `[start, last]` from every domain through
    /// the concurrent path, then lets go of its holder `key` and drops its
    /// pins when every invalidation succeeded (see
    /// [`Pages::release_holder`]). Returns whether they did.
    fn unload_shared(domains: &[DomainRef], start: u64, last: u64, area: &Area, key: Option<u64>) -> Result<()> {
        let (fp, lp) = (area.first_page(), area.last_page(last - start + 1));
        area.pages.set_busy(key, true);
        let mut g = IotlbGather::default();
        let (phys, mut result) = Self::unmap_reading_back(&domains[0], &mut g, start, last, area);
        if let Err(e) = domains[0].read().iotlb_sync_shared(&mut g) {
            result = Err(domain_errno(e));
        }
        for d in &domains[1..] {
            if let Err(e) = SharedMapper(d).undo(start, last - start + 1) {
                result = Err(e);
            }
        }
        Self::release_unloaded(area, key, fp, lp, phys.as_deref(), result.is_ok());
        result
    }

    /// Lets go of an unloaded area's holder `key` and its domain use of
    /// pages `[fp, lp]` (dropping the pins when `unpin`), with the pages'
    /// addresses as [`Self::unmap_reading_back`] found them: `None` when
    /// the pages are unpinned by user address.
    fn release_unloaded(area: &Area, key: Option<u64>, fp: u64, lp: u64, phys: Option<&[PhysRun]>, unpin: bool) {
        match phys {
            Some(phys) => area.pages.release_holder(key, fp, lp, phys, unpin),
            None => area.pages.release_holder_by_user(key, fp, lp, unpin),
        }
    }

    /// Unmaps the filled area `[start, last]` from `domain` through the
    /// concurrent path (into `gather`, not yet synced) and returns the
    /// physical runs of its pages: none when the pages are unpinned by
    /// user address ([`Pages::unpins_by_user`]: nothing to read), else
    /// handed back by the unmap itself when the domain can (one pass over
    /// the tables) and the area is whole pages, else read back before it.
    /// A partial unmap, never expected for a whole area, is `EIO` (the
    /// caller then keeps the pins).
    fn unmap_reading_back(
        domain: &DomainRef,
        gather: &mut IotlbGather,
        start: u64,
        last: u64,
        area: &Area,
    ) -> (Option<PhysRuns>, Result<()>) {
        let length = last - start + 1;
        if area.pages.unpins_by_user() {
            let result = match domain.read().unmap_shared(start, length, gather) {
                Ok(n) if n == length => Ok(()),
                Ok(_) => Err(Errno::EIO),
                Err(e) => Err(domain_errno(e)),
            };
            return (None, result);
        }
        if area.start_byte.is_multiple_of(PAGE_SIZE) && length.is_multiple_of(PAGE_SIZE) {
            // Room for every run up front (a list grown by copies costs
            // more than the unmap's own pass over the tables), sized from
            // the density of the first runs: a run per page for scattered
            // 4 KiB pages (up to 1 GiB's, 4 MiB of runs, reserved, not
            // touched), 512 per GiB of 2 MiB frames.
            let mut phys: PhysRuns = Vec::with_capacity(Self::runs_estimate(domain, start, length));
            match domain.read().unmap_shared_collect(start, length, gather, &mut phys) {
                Err(DomainError::NotSupported) => {}
                Ok(n) if n == length => return (Some(phys), Ok(())),
                Ok(_) => return (Some(phys), Err(Errno::EIO)),
                Err(e) => return (Some(phys), Err(domain_errno(e))),
            }
        }
        let (fp, lp) = (area.first_page(), area.last_page(length));
        let phys = Self::read_back(domain, start, area, fp, lp);
        let result = domain.read().unmap_shared(start, length, gather).map(|_| ()).map_err(domain_errno);
        (Some(phys), result)
    }

    /// How many physical runs `[start, start + length)` of `domain` is
    /// likely to hold, from the first few (an upper bound of a run per
    /// page, at most 2^18).
    fn runs_estimate(domain: &DomainRef, start: u64, length: u64) -> usize {
        const PROBE: usize = 16;
        let pages = (length / PAGE_SIZE).min(1 << 18);
        if pages <= PROBE as u64 {
            return pages as usize;
        }
        let mut probe = [PhysRun::default(); PROBE];
        let (n, done) = domain.read().iova_to_phys_runs(start, length, &mut probe);
        if done == 0 {
            return pages as usize;
        }
        // The probe stops when its buffer is full: `done` bytes in `n` runs.
        let estimate = (n as u64).max(1).saturating_mul(length.div_ceil(done));
        estimate.min(pages) as usize
    }

    /// Maps the area's pages into `domain`: each physically contiguous
    /// run (`phys`: runs from the area's first page) is
    /// one piece, so the domain can use large pages; with large pages
    /// disabled (`small`), one piece per page. Pieces go to the domain up
    /// to [`MAP_BATCH_RUNS`] (as pinned) or [`MAP_BATCH`] (built) per
    /// `map_runs` call. On failure nothing stays mapped.
    fn map_area_into(
        domain: &mut dyn AreaMapper,
        iova: u64,
        last: u64,
        area: &Area,
        phys: &[PhysRun],
        small: bool,
    ) -> core::result::Result<(), LoadError> {
        // A domain whose invalidation failed earlier is recovered (one full
        // invalidation) before it maps anything new; if that fails too,
        // nothing was mapped here.
        domain.recover().map_err(|e| LoadError { errno: domain_errno(e), stale: false })?;
        let end_byte = area.start_byte + (last - iova);
        if !small && area.start_byte.is_multiple_of(PAGE_SIZE) && (end_byte + 1).is_multiple_of(PAGE_SIZE) {
            // Whole pages (the usual case): each run is one piece as it is.
            let mut cur = iova;
            let mut result = Ok(());
            let chunks = phys.len().div_ceil(MAP_BATCH_RUNS);
            for (n, chunk) in phys.chunks(MAP_BATCH_RUNS).enumerate() {
                result = area
                    .pages
                    .fault_point()
                    .map_err(LoadError::from)
                    .and_then(|()| domain.map_runs(cur, chunk, area.prot));
                if result.is_err() {
                    break;
                }
                if n + 1 < chunks {
                    // Only a later chunk needs to know where this one ended.
                    cur = cur.wrapping_add(chunk.iter().map(|r| r.len).sum());
                }
            }
            if result.is_err() && cur != iova {
                domain.undo(iova, cur.wrapping_sub(iova)).map_err(LoadError::sync)?;
            }
            return result;
        }
        let mut page = area.first_page();
        let mut batch: Vec<PhysRun> = Vec::with_capacity(MAP_BATCH.min(if small {
            (last - iova) as usize / PAGE_SIZE as usize + 2
        } else {
            phys.len()
        }));
        // IOVA of batch[0]: everything before it is mapped.
        let mut batch_iova = iova;
        let mut next_iova = iova;
        let flush = |batch: &mut Vec<PhysRun>, batch_iova: &mut u64, next: u64, domain: &mut dyn AreaMapper| {
            if batch.is_empty() {
                return Ok(());
            }
            area.pages.fault_point()?;
            domain.map_runs(*batch_iova, batch, area.prot)?;
            batch.clear();
            *batch_iova = next;
            Ok(())
        };
        let mut result = Ok(());
        for &PhysRun { phys: p, len } in phys {
            let n = len / PAGE_SIZE;
            // The bytes of the area on pages [page, page + n).
            let b0 = (page * PAGE_SIZE).max(area.start_byte);
            let b1 = ((page + n) * PAGE_SIZE - 1).min(end_byte);
            let start = p + (b0 - page * PAGE_SIZE);
            page += n;
            if small {
                let mut b = b0;
                while b <= b1 {
                    let len = (PAGE_SIZE - b % PAGE_SIZE).min(b1 - b + 1);
                    batch.push(PhysRun::new(start + (b - b0), len));
                    next_iova = next_iova.wrapping_add(len);
                    b += len;
                    if batch.len() >= MAP_BATCH {
                        result = flush(&mut batch, &mut batch_iova, next_iova, domain);
                        if result.is_err() {
                            break;
                        }
                    }
                }
            } else {
                batch.push(PhysRun::new(start, b1 - b0 + 1));
                next_iova = next_iova.wrapping_add(b1 - b0 + 1);
                if batch.len() >= MAP_BATCH {
                    result = flush(&mut batch, &mut batch_iova, next_iova, domain);
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = flush(&mut batch, &mut batch_iova, next_iova, domain);
        }
        if result.is_err() && batch_iova != iova {
            domain.undo(iova, batch_iova.wrapping_sub(iova)).map_err(LoadError::sync)?;
        }
        result
    }

    /// The physical addresses of pages `[fp, lp]` of the area at `start`,
    /// as runs, read back from `domain` (which maps the area), up to 256
    /// runs per domain call.
    fn read_back(domain: &DomainRef, start: u64, area: &Area, fp: u64, lp: u64) -> PhysRuns {
        let d = domain.read();
        let mut out: PhysRuns = Vec::new();
        let mut buf = [PhysRun::default(); 256];
        // Area byte b is at IOVA start + (b - start_byte); the range asked
        // for may run past the area's end (within page lp): the domain
        // stops where the mapping does.
        let mut b = (fp * PAGE_SIZE).max(area.start_byte);
        let b_end = (lp + 1) * PAGE_SIZE;
        let mut next_page = fp;
        while next_page <= lp {
            let iova = start + (b - area.start_byte);
            let (n, done) = d.iova_to_phys_runs(iova, b_end - b, &mut buf);
            assert!(done > 0, "a filled area is mapped in every domain");
            if out.capacity() == 0 {
                // Size the list once from the density of the first answer
                // (growing a long list by copies costs more than reading it).
                let estimate = (n as u64).saturating_mul((b_end - b).div_ceil(done)).min(lp - next_page + 1);
                out.reserve(estimate as usize + 1);
            }
            for &run in &buf[..n] {
                let PhysRun { phys, len } = run;
                if (b | len | phys).is_multiple_of(PAGE_SIZE) {
                    // Whole pages (every run of a whole-page area).
                    push_run(&mut out, run);
                    next_page += len / PAGE_SIZE;
                    b += len;
                    continue;
                }
                // Pages holding bytes [b, b + len), from the first not yet
                // reported; page p's address is phys + p * PAGE_SIZE - b.
                let (p0, p1) = ((b / PAGE_SIZE).max(next_page), ((b + len - 1) / PAGE_SIZE).min(lp));
                if p0 <= p1 {
                    let at = phys.wrapping_add(p0 * PAGE_SIZE).wrapping_sub(b);
                    push_run(&mut out, PhysRun::new(at, (p1 - p0 + 1) * PAGE_SIZE));
                    next_page = p1 + 1;
                }
                b += len;
            }
        }
        out
    }

    fn holder(&self, start: u64, area: &Area, fp: u64, lp: u64) -> Holder {
        Self::holder_in(&self.domains[0].1, start, area, fp, lp)
    }

    fn holder_in(domain: &DomainRef, start: u64, area: &Area, fp: u64, lp: u64) -> Holder {
        Holder { first_page: fp, last_page: lp, iova: start, start_byte: area.start_byte, domain: domain.clone() }
    }

    /// Loads the area starting at `start` into every domain (pinning its
    /// pages once). Nothing changes on failure, except when a domain may
    /// still cache translations to the pages (a hardware failure, or a
    /// failed invalidation while unloading the domains already loaded):
    /// the pages then stay pinned and the error says why.
    fn fill_area(&mut self, start: u64) -> Result<()> {
        if self.domains.is_empty() {
            return Ok(());
        }
        let (last, area) = self.areas.get(start).map(|(l, a)| (l, a.clone())).ok_or(Errno::ENOENT)?;
        let (fp, lp) = (area.first_page(), area.last_page(last - start + 1));
        // Busy until the domains map the pages (see `fill_reserved`).
        let key = area.pages.register_busy(self.holder(start, &area, fp, lp));
        let phys = area.pages.pin_runs(fp, lp, UseKind::Domain).inspect_err(|_| area.pages.unregister(key))?;
        for (k, (_, d)) in self.domains.iter().enumerate() {
            let r =
                Self::map_area_into(&mut Locked(&mut **d.lock()), start, last, &area, &phys, self.disable_large_pages);
            if let Err(mut e) = r {
                for (_, d) in &self.domains[..k] {
                    let mut d = d.lock();
                    let mut g = IotlbGather::default();
                    d.unmap(start, last - start + 1, &mut g);
                    if let Err(se) = sync(&mut **d, &mut g)
                        && !e.stale
                    {
                        e = LoadError::sync(se);
                    }
                }
                // Stale: a device may still reach the pages, they stay
                // pinned (their addresses kept).
                area.pages.release_holder(Some(key), fp, lp, &phys, !e.stale);
                return Err(e.errno);
            }
        }
        area.pages.set_busy(Some(key), false);
        let a = self.areas.get_mut(start).expect("area exists").1;
        a.filled = true;
        a.holder = Some(key);
        Ok(())
    }

    /// Removes the area at `start` from every domain and drops its pins.
    /// When an invalidation fails the pins stay (a device may still reach
    /// the pages) and the error is returned; the area is unfilled either
    /// way.
    fn unfill_area(&mut self, start: u64) -> Result<()> {
        let Some((last, area)) = self.areas.get(start).map(|(l, a)| (l, a.clone())) else { return Ok(()) };
        if !area.filled {
            return Ok(());
        }
        let (fp, lp) = (area.first_page(), area.last_page(last - start + 1));
        let phys = Self::read_back(&self.domains[0].1, start, &area, fp, lp);
        // Its domain is about to stop naming the pages.
        area.pages.set_busy(area.holder, true);
        let mut result = Ok(());
        for (_, d) in &self.domains {
            let mut d = d.lock();
            let mut g = IotlbGather::default();
            d.unmap(start, last - start + 1, &mut g);
            if let Err(e) = sync(&mut **d, &mut g) {
                result = Err(e);
            }
        }
        area.pages.release_holder(area.holder, fp, lp, &phys, result.is_ok());
        let a = self.areas.get_mut(start).expect("area exists").1;
        a.filled = false;
        a.holder = None;
        result
    }

    /// Unmaps every area inside `[iova, iova + length)`. The range must not
    /// cut through an area. Returns the bytes unmapped. One IOTLB sync per
    /// domain for the whole call.
    pub fn unmap(&mut self, iova: u64, length: u64) -> Result<u64> {
        let last = last_of(iova, length)?;
        self.unmap_range(iova, last)
    }

    /// Unmaps everything; an empty table is not an error.
    pub fn unmap_all(&mut self) -> Result<u64> {
        match self.unmap_range(0, u64::MAX) {
            Err(Errno::ENOENT) => Ok(0),
            r => r,
        }
    }

    /// The areas an unmap of `[start, last]` removes, after its checks:
    /// none cut (`ENOENT`, also when there is none), none busy or pinned
    /// by an access (`EBUSY`).
    fn unmap_targets(&self, start: u64, last: u64) -> Result<Vec<(u64, u64)>> {
        let hit = self.areas_overlapping(start, last);
        if hit.is_empty() || hit.iter().any(|&(s, l)| s < start || l > last) {
            return Err(Errno::ENOENT);
        }
        if hit.iter().any(|(s, _)| {
            let a = self.area(*s).1;
            a.accesses > 0 || a.busy
        }) {
            return Err(Errno::EBUSY);
        }
        Ok(hit)
    }

    /// First step of an unmap outside the lock (`(0, u64::MAX)`: all;
    /// nothing there is then not an error): the checks of
    /// [`Self::unmap`], then the areas marked busy (their IOVA stays taken
    /// until [`Self::end_unmap`]). The caller unloads them with
    /// [`Self::unmap_outside`], holding the domain list for reading.
    pub fn begin_unmap(&mut self, start: u64, last: u64) -> Result<Unmapping> {
        let hit = match self.unmap_targets(start, last) {
            Err(Errno::ENOENT) if (start, last) == (0, u64::MAX) => Vec::new(),
            r => r?,
        };
        let mut areas = Vec::with_capacity(hit.len());
        let mut bytes = 0u64;
        for (s, l) in hit {
            let a = self.areas.get_mut(s).expect("listed area exists").1;
            a.busy = true;
            areas.push((s, l, a.clone()));
            // Two areas can cover all 2^64 bytes: the count wraps to 0
            // then, as Linux's does.
            bytes = bytes.wrapping_add(l - s + 1);
        }
        let domains = self.domains.iter().map(|(_, d)| d.clone()).collect();
        Ok(Unmapping { areas, domains, bytes })
    }

    /// Second step of an unmap outside the lock (no IOAS lock held):
    /// unmaps the areas from every domain through the concurrent path, one
    /// IOTLB sync per domain, then drops their pins, unless an
    /// invalidation failed (the pins then stay for good, as in
    /// [`Self::unmap`]).
    pub fn unmap_outside(u: &Unmapping) -> Result<()> {
        let mut gathers: Vec<IotlbGather> = u.domains.iter().map(|_| IotlbGather::default()).collect();
        let mut release: Vec<(&Area, u64, u64, Option<PhysRuns>)> = Vec::new();
        let mut result = Ok(());
        for (s, l, area) in &u.areas {
            if !area.filled {
                continue;
            }
            let (fp, lp) = (area.first_page(), area.last_page(l - s + 1));
            // Its domain is about to stop naming the pages.
            area.pages.set_busy(area.holder, true);
            let (phys, first) = Self::unmap_reading_back(&u.domains[0], &mut gathers[0], *s, *l, area);
            if first.is_err() {
                result = first;
            }
            for (d, g) in u.domains.iter().zip(gathers.iter_mut()).skip(1) {
                if let Err(e) = d.read().unmap_shared(*s, l - s + 1, g) {
                    result = Err(domain_errno(e));
                }
            }
            release.push((area, fp, lp, phys));
        }
        for (d, g) in u.domains.iter().zip(gathers.iter_mut()) {
            if let Err(e) = d.read().iotlb_sync_shared(g) {
                result = Err(domain_errno(e));
            }
        }
        for (area, fp, lp, phys) in release {
            Self::release_unloaded(area, area.holder, fp, lp, phys.as_deref(), result.is_ok());
        }
        result
    }

    /// Last step of an unmap outside the lock: the areas leave the table
    /// (also when [`Self::unmap_outside`] failed: they are gone from the
    /// domains' point of view, or their pins are kept). Returns the bytes
    /// unmapped.
    pub fn end_unmap(&mut self, u: Unmapping, unloaded: Result<()>) -> Result<u64> {
        for (s, _, _) in &u.areas {
            self.areas.remove(*s);
        }
        unloaded.map(|()| u.bytes)
    }

    fn unmap_range(&mut self, start: u64, last: u64) -> Result<u64> {
        let hit = self.unmap_targets(start, last)?;
        let mut gathers: Vec<IotlbGather> = self.domains.iter().map(|_| IotlbGather::default()).collect();
        let mut bytes = 0u64;
        // Pins are dropped only after every domain's IOTLB is clean: until
        // then the hardware may still reach the pages.
        let mut release: Vec<(Area, u64, u64, Option<PhysRuns>)> = Vec::new();
        for &(s, l) in &hit {
            let (_, _, area) = self.areas.remove(s).expect("listed area exists");
            if area.filled {
                let (fp, lp) = (area.first_page(), area.last_page(l - s + 1));
                // Pages unpinned by user address need no addresses read.
                let phys =
                    (!area.pages.unpins_by_user()).then(|| Self::read_back(&self.domains[0].1, s, &area, fp, lp));
                area.pages.set_busy(area.holder, true);
                for ((_, d), g) in self.domains.iter().zip(gathers.iter_mut()) {
                    d.lock().unmap(s, l - s + 1, g);
                }
                release.push((area, fp, lp, phys));
            }
            bytes = bytes.wrapping_add(l - s + 1);
        }
        let mut synced = Ok(());
        for ((_, d), g) in self.domains.iter().zip(gathers.iter_mut()) {
            if let Err(e) = sync(&mut **d.lock(), g) {
                synced = Err(e);
            }
        }
        for (area, fp, lp, phys) in release {
            // After a failed sync the areas are gone from the table, but a
            // device may still reach their pages through stale IOTLB
            // entries: the pins stay for good (the unmap reports the
            // failure).
            Self::release_unloaded(&area, area.holder, fp, lp, phys.as_deref(), synced.is_ok());
        }
        synced.map(|()| bytes)
    }

    /// The slices of pages mapped at `[iova, iova + length)`, which must be
    /// covered without holes (for IOAS_COPY). Linux's `iopt_get_pages`.
    pub fn get_pages(&self, iova: u64, length: u64) -> Result<Vec<PagesSlice>> {
        let last = last_of(iova, length)?;
        let mut out = Vec::new();
        let mut cur = iova;
        loop {
            let Some((s, l, area)) = self.areas.get_containing(cur) else { return Err(Errno::ENOENT) };
            if area.busy {
                return Err(Errno::EBUSY);
            }
            let end = l.min(last);
            out.push(PagesSlice {
                pages: area.pages.clone(),
                start_byte: area.start_byte + (cur - s),
                length: end - cur + 1,
            });
            if end == last {
                return Ok(out);
            }
            cur = end + 1;
        }
    }

    /// Reserves `range` for `owner`; fails with `EADDRINUSE` if an area or
    /// an allowed range overlaps it.
    pub fn reserve(&mut self, range: IovaRange, owner: Owner) -> Result<()> {
        let IovaRange { start, last } = range;
        if self.first_area_overlapping(start, last).is_some() || self.allowed.any_overlap(start, last) {
            return Err(Errno::EADDRINUSE);
        }
        self.reserved.add(start, last, owner).map_err(|_| Errno::EINVAL)
    }

    /// Drops every reservation of `owner`.
    pub fn remove_reserved(&mut self, owner: Owner) {
        self.reserved.remove_owner(owner);
    }

    /// Replaces the allowed ranges (Linux's `iopt_set_allow_iova`); fails
    /// with `EADDRINUSE` when one overlaps a reserved range.
    pub fn set_allowed(&mut self, ranges: &[IovaRange]) -> Result<()> {
        if ranges.iter().any(|r| self.reserved_overlap(r.start, r.last)) {
            return Err(Errno::EADDRINUSE);
        }
        let spans: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.last)).collect();
        self.allowed = RangeSet::from_ranges(&spans).map_err(|_| Errno::EINVAL)?;
        Ok(())
    }

    /// The IOVA ranges that are not reserved (what `IOMMU_IOAS_IOVA_RANGES`
    /// reports), in order.
    pub fn iova_ranges(&self) -> Vec<IovaRange> {
        let used: Vec<(u64, u64)> = self.reserved.union().iter().collect();
        let mut out = Vec::new();
        let mut cursor: Option<u64> = Some(0);
        for (s, l) in used {
            let Some(c) = cursor else { break };
            if s > c {
                out.push(IovaRange::new(c, s - 1));
            }
            cursor = if l == u64::MAX { None } else { Some(c.max(l + 1)) };
        }
        if let Some(c) = cursor {
            out.push(IovaRange::new(c, u64::MAX));
        }
        out
    }

    fn check_alignment(&self, align: u64) -> Result<()> {
        let mask = align - 1;
        for (s, l, a) in self.areas.iter() {
            if s & mask != 0 || (l - s + 1) & mask != 0 || (a.start_byte % PAGE_SIZE) & mask != 0 {
                return Err(Errno::EADDRINUSE);
            }
        }
        Ok(())
    }

    fn recalc_alignment(&mut self) -> Result<()> {
        let mut align = if self.disable_large_pages { PAGE_SIZE } else { 1 };
        for (_, d) in &self.domains {
            align = align.max(d.read().granule());
        }
        for a in self.access_alignments.values() {
            align = align.max(*a);
        }
        if align > self.iova_alignment {
            self.check_alignment(align)?;
        }
        self.iova_alignment = align;
        Ok(())
    }

    /// Adds a domain (Linux's `iopt_table_add_domain`): raises the
    /// alignment to its granule, reserves what lies outside its aperture,
    /// and loads every area into it. All or nothing.
    pub fn add_domain(&mut self, key: u64, domain: DomainRef) -> Result<()> {
        if self.domains.iter().any(|(k, _)| *k == key) {
            return Err(Errno::EEXIST);
        }
        let (granule, aperture) = {
            let d = domain.read();
            (d.granule(), d.aperture())
        };
        let new_align = granule.max(self.iova_alignment);
        if new_align > PAGE_SIZE {
            return Err(Errno::EINVAL);
        }
        if new_align != self.iova_alignment {
            self.check_alignment(new_align)?;
        }
        let owner = Owner::Domain(key);
        let reserve = |s: &mut Self, start: u64, last: u64| -> Result<()> {
            s.reserve(IovaRange { start, last }, owner).inspect_err(|_| s.remove_reserved(owner))
        };
        if aperture.start != 0 {
            reserve(self, 0, aperture.start - 1)?;
        }
        if aperture.last != u64::MAX {
            reserve(self, aperture.last + 1, u64::MAX)?;
        }
        // Load every area: pinning first if this is the first domain.
        let first_domain = self.domains.is_empty();
        let starts: Vec<u64> = self.areas.iter().map(|(s, _, _)| s).collect();
        // (area start, first page, last page, addresses, holder key)
        type Loaded = (u64, u64, u64, PhysRuns, Option<u64>);
        let mut done: Vec<Loaded> = Vec::new();
        let mut failure = None;
        for s in &starts {
            let (l, area) = self.area(*s);
            let (fp, lp) = (area.first_page(), area.last_page(l - s + 1));
            // The first domain pins: its holder is registered busy first
            // (see `fill_reserved`).
            let key = first_domain.then(|| area.pages.register_busy(Self::holder_in(&domain, *s, &area, fp, lp)));
            let phys = if first_domain {
                match area.pages.pin_runs(fp, lp, UseKind::Domain) {
                    Ok(runs) => runs,
                    Err(e) => {
                        if let Some(k) = key {
                            area.pages.unregister(k);
                        }
                        failure = Some(e);
                        break;
                    }
                }
            } else {
                Self::read_back(&self.domains[0].1, *s, &area, fp, lp)
            };
            let r =
                Self::map_area_into(&mut Locked(&mut **domain.lock()), *s, l, &area, &phys, self.disable_large_pages);
            if let Err(e) = r {
                if first_domain {
                    area.pages.release_holder(key, fp, lp, &phys, !e.stale);
                }
                failure = Some(e.errno);
                break;
            }
            // Readable at once: a later area over the same pages reads
            // their addresses back from this domain.
            area.pages.set_busy(key, false);
            done.push((*s, fp, lp, phys, key));
        }
        if let Some(e) = failure {
            let mut d = domain.lock();
            let mut g = IotlbGather::default();
            for (s, _, _, _, key) in &done {
                let (l, area) = self.area(*s);
                area.pages.set_busy(*key, true);
                d.unmap(*s, l - s + 1, &mut g);
            }
            let synced = sync(&mut **d, &mut g);
            drop(d);
            for (s, fp, lp, phys, key) in done.iter().rev() {
                // After a failed sync a device may still reach the pages.
                if first_domain {
                    self.area(*s).1.pages.release_holder(*key, *fp, *lp, phys, synced.is_ok());
                }
            }
            self.remove_reserved(owner);
            return Err(synced.err().unwrap_or(e));
        }
        self.iova_alignment = new_align;
        self.domains.push((key, domain));
        for (s, _, _, _, key) in done {
            if key.is_some() {
                let a = self.areas.get_mut(s).expect("area exists").1;
                a.filled = true;
                a.holder = key;
            }
        }
        Ok(())
    }

    /// Removes a domain: unloads every area from it, drops the pins when it
    /// was the last, removes its reservations, recomputes the alignment.
    /// The domain is removed even when its invalidation fails; the pins
    /// it held then stay (a device may still reach the pages through
    /// stale entries) and the error is returned.
    pub fn remove_domain(&mut self, key: u64) -> Result<()> {
        let Some(i) = self.domains.iter().position(|(k, _)| *k == key) else { return Ok(()) };
        let (_, domain) = self.domains.swap_remove(i);
        let last_domain = self.domains.is_empty();
        // Holders naming this domain move to one that stays (before the
        // domain is emptied); with none left, the pins go after the sync.
        let mut release: Vec<(u64, u64, u64, PhysRuns)> = Vec::new();
        let areas: Vec<(u64, u64, Area)> = self.areas.iter().map(|(s, l, a)| (s, l, a.clone())).collect();
        for (s, l, area) in &areas {
            if !area.filled {
                continue;
            }
            let (fp, lp) = (area.first_page(), area.last_page(l - s + 1));
            if last_domain {
                release.push((*s, fp, lp, Self::read_back(&domain, *s, area, fp, lp)));
                area.pages.set_busy(area.holder, true);
            } else if let Some(k) = area.holder {
                area.pages.retarget(k, self.domains[0].1.clone());
            }
        }
        let synced = {
            let mut d = domain.lock();
            let mut g = IotlbGather::default();
            for (s, l, _) in &areas {
                d.unmap(*s, l - s + 1, &mut g);
            }
            sync(&mut **d, &mut g)
        };
        for (s, fp, lp, phys) in release {
            let a = self.areas.get_mut(s).expect("area exists").1;
            let key = a.holder.take();
            a.filled = false;
            a.pages.release_holder(key, fp, lp, &phys, synced.is_ok());
        }
        self.remove_reserved(Owner::Domain(key));
        // Lowering the alignment cannot fail.
        let _ = self.recalc_alignment();
        synced
    }

    /// `IOMMU_OPTION_HUGE_PAGES` = 0: refused (`EINVAL`) once domains hold
    /// mappings.
    pub fn disable_large_pages(&mut self) -> Result<()> {
        if self.disable_large_pages {
            return Ok(());
        }
        if !self.domains.is_empty() && !self.areas.is_empty() {
            return Err(Errno::EINVAL);
        }
        self.disable_large_pages = true;
        if let Err(e) = self.recalc_alignment() {
            self.disable_large_pages = false;
            return Err(e);
        }
        Ok(())
    }

    /// `IOMMU_OPTION_HUGE_PAGES` = 1.
    pub fn enable_large_pages(&mut self) {
        self.disable_large_pages = false;
        let _ = self.recalc_alignment();
    }

    /// Cuts areas so that each IOVA in `iovas` is the last byte of an area
    /// (VFIO type1 partial unmap). Only when huge pages are disabled or no
    /// domain holds the area, as in Linux's `iopt_area_split`.
    pub fn cut(&mut self, iovas: &[u64]) -> Result<()> {
        for &iova in iovas {
            let Some((s, l, _)) = self.areas.get_containing(iova) else { continue };
            if iova == s || iova == l {
                continue;
            }
            let area = self.area(s).1;
            let new_start = iova + 1;
            let align = self.iova_alignment;
            if new_start & (align - 1) != 0 || (area.start_byte + (new_start - s)) & (align - 1) != 0 {
                return Err(Errno::EINVAL);
            }
            if area.busy {
                return Err(Errno::EBUSY);
            }
            if area.accesses > 0 || (area.filled && !self.disable_large_pages) {
                return Err(Errno::EINVAL);
            }
            // Both halves keep the area's pins: one more use per page of the
            // page shared by both halves, if any.
            let lhs = Area { ..area.clone() };
            let rhs = Area { start_byte: area.start_byte + (new_start - s), ..area.clone() };
            let shared_page = lhs.last_page(new_start - s) == rhs.first_page();
            if area.filled && shared_page {
                let p = rhs.first_page();
                area.pages.pin(p, p, UseKind::Domain, None)?;
            }
            let (mut lhs, mut rhs) = (lhs, rhs);
            if area.filled {
                // Each half registers as its own holder, in place of the
                // area's (in one step: a pin in between finds one or the
                // other).
                let halves = [
                    self.holder(s, &lhs, lhs.first_page(), lhs.last_page(new_start - s)),
                    self.holder(new_start, &rhs, rhs.first_page(), rhs.last_page(l - iova)),
                ];
                let [lk, rk] = area.pages.replace_holder(area.holder, halves);
                (lhs.holder, rhs.holder) = (Some(lk), Some(rk));
            }
            self.areas.remove(s);
            self.areas.insert(s, iova, lhs).expect("left half fits where the area was");
            self.areas.insert(new_start, l, rhs).expect("right half fits where the area was");
        }
        Ok(())
    }

    /// Physical address behind `iova` through the pinned pages of its area
    /// (None when unmapped or not pinned).
    pub fn phys_of(&self, iova: u64) -> Option<u64> {
        let (s, _, area) = self.areas.get_containing(iova)?;
        let byte = area.start_byte + (iova - s);
        area.pages.phys(byte / PAGE_SIZE).map(|p| p + byte % PAGE_SIZE)
    }

    /// The area containing `iova`: `(start, last, area)`.
    pub fn area_at(&self, iova: u64) -> Option<(u64, u64, &Area)> {
        self.areas.get_containing(iova)
    }

    /// Mutable access to the area starting at `start` (accesses bookkeeping).
    pub fn area_mut(&mut self, start: u64) -> Option<&mut Area> {
        self.areas.get_mut(start).map(|(_, a)| a)
    }

    /// The pieces of areas covering `[iova, last]` in order, as
    /// `(area start, area last, piece first, piece last)`, and whether they
    /// cover the whole range without a hole.
    /// `EBUSY` when an area in `[iova, last]` is being filled or unmapped
    /// outside the lock (accesses do not touch such areas).
    fn check_not_busy(&self, iova: u64, last: u64) -> Result<()> {
        if self.areas.iter_overlapping(iova, last).any(|(_, _, a)| a.busy) {
            return Err(Errno::EBUSY);
        }
        Ok(())
    }

    fn contiguous(&self, iova: u64, last: u64) -> (Vec<(u64, u64, u64, u64)>, bool) {
        let mut out = Vec::new();
        let mut cur = iova;
        loop {
            let Some((s, l, _)) = self.areas.get_containing(cur) else { return (out, false) };
            let end = l.min(last);
            out.push((s, l, cur, end));
            if end == last {
                return (out, true);
            }
            cur = end + 1;
        }
    }

    /// The first area in `[iova, last]` an access holds pages of, when the
    /// range is otherwise unmappable as a whole: unmap must first ask the
    /// accesses to let go of it.
    pub fn access_blocker(&self, iova: u64, last: u64) -> Option<IovaRange> {
        let hit = self.areas_overlapping(iova, last);
        if hit.iter().any(|&(s, l)| s < iova || l > last) {
            return None;
        }
        hit.into_iter().find(|(s, _)| self.area(*s).1.accesses > 0).map(|(start, last)| IovaRange { start, last })
    }

    /// Pins the pages under `[iova, iova + length)` for an access (Linux's
    /// `iommufd_access_pin_pages`): page-aligned pieces, readable (or
    /// writable when `write`), covered without holes. Returns the physical
    /// address of each page. All or nothing.
    pub fn access_pin(&mut self, iova: u64, length: u64, write: bool) -> Result<Vec<u64>> {
        let last = last_of(iova, length)?;
        self.check_not_busy(iova, last)?;
        let (pieces, complete) = self.contiguous(iova, last);
        for (i, &(s, l, first, _)) in pieces.iter().enumerate() {
            let area = self.area(s).1;
            let start_byte = area.start_byte + (first - s);
            let is_last = complete && i == pieces.len() - 1;
            let end_byte = area.start_byte + (l - s);
            if !start_byte.is_multiple_of(PAGE_SIZE) || (!is_last && end_byte % PAGE_SIZE != PAGE_SIZE - 1) {
                return Err(Errno::EINVAL);
            }
            let ok = if write { area.prot.writable() } else { area.prot.readable() };
            if !ok {
                return Err(Errno::EPERM);
            }
        }
        if !complete {
            return Err(Errno::ENOENT);
        }
        let mut out = Vec::new();
        let mut done: Vec<(u64, u64, u64)> = Vec::new();
        for &(s, _, first, end) in &pieces {
            let area = self.area(s).1;
            let (fp, lp) = ((area.start_byte + (first - s)) / PAGE_SIZE, (area.start_byte + (end - s)) / PAGE_SIZE);
            let mut phys = alloc::vec![0u64; (lp - fp + 1) as usize];
            if let Err(e) = area.pages.pin(fp, lp, UseKind::Other, Some(&mut phys)) {
                for &(ds, dfp, dlp) in &done {
                    self.area(ds).1.pages.unpin(dfp, dlp, UseKind::Other, None);
                    self.areas.get_mut(ds).expect("area exists").1.accesses -= 1;
                }
                return Err(e);
            }
            self.areas.get_mut(s).expect("area exists").1.accesses += 1;
            done.push((s, fp, lp));
            out.extend_from_slice(&phys);
        }
        Ok(out)
    }

    /// Undoes [`Self::access_pin`] for exactly the same range.
    pub fn access_unpin(&mut self, iova: u64, length: u64) -> Result<()> {
        let last = last_of(iova, length)?;
        let (pieces, complete) = self.contiguous(iova, last);
        if !complete || pieces.iter().any(|(s, ..)| self.area(*s).1.accesses == 0) {
            return Err(Errno::EINVAL);
        }
        for (s, _, first, end) in pieces {
            let area = self.area(s).1;
            area.pages.unpin(
                (area.start_byte + (first - s)) / PAGE_SIZE,
                (area.start_byte + (end - s)) / PAGE_SIZE,
                UseKind::Other,
                None,
            );
            self.areas.get_mut(s).expect("area exists").1.accesses -= 1;
        }
        Ok(())
    }

    /// CPU reads (`data` filled) or writes (`data` stored) through the
    /// pages under `[iova, iova + data.len())` (Linux's
    /// `iommufd_access_rw`). Pages not pinned are pinned for the copy only.
    pub fn access_rw(&self, iova: u64, data: &mut [u8], write: bool) -> Result<()> {
        let last = last_of(iova, data.len() as u64)?;
        self.check_not_busy(iova, last)?;
        let (pieces, complete) = self.contiguous(iova, last);
        let mut done = 0usize;
        for (s, _, first, end) in pieces {
            let area = self.area(s).1;
            let ok = if write { area.prot.writable() } else { area.prot.readable() };
            if !ok {
                return Err(Errno::EPERM);
            }
            let (b0, b1) = (area.start_byte + (first - s), area.start_byte + (end - s));
            let (fp, lp) = (b0 / PAGE_SIZE, b1 / PAGE_SIZE);
            let mut phys = alloc::vec![0u64; (lp - fp + 1) as usize];
            area.pages.pin(fp, lp, UseKind::Other, Some(&mut phys))?;
            let mut b = b0;
            let mut r = Ok(());
            while b <= b1 && r.is_ok() {
                let n = (PAGE_SIZE - b % PAGE_SIZE).min(b1 - b + 1) as usize;
                let p = phys[(b / PAGE_SIZE - fp) as usize] + b % PAGE_SIZE;
                let chunk = &mut data[done..done + n];
                r = if write {
                    area.pages.source().write_phys(p, chunk)
                } else {
                    area.pages.source().read_phys(p, chunk)
                };
                done += n;
                b += n as u64;
            }
            area.pages.unpin(fp, lp, UseKind::Other, None);
            r?;
        }
        if complete { Ok(()) } else { Err(Errno::ENOENT) }
    }

    /// Registers an access with its alignment (Linux's `iopt_add_access`).
    pub fn add_access(&mut self, id: u32, align: u64) -> Result<()> {
        self.access_alignments.insert(id, align);
        if let Err(e) = self.recalc_alignment() {
            self.access_alignments.remove(&id);
            return Err(e);
        }
        Ok(())
    }

    /// Unregisters an access.
    pub fn remove_access(&mut self, id: u32) {
        self.access_alignments.remove(&id);
        let _ = self.recalc_alignment();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memsrc::FakeAddressSpace;
    use crate::pages::Accounting;
    use crate::pages::DomainLock;
    use crate::selftest::mock::{MOCK_APERTURE_START, MockDomain};
    use alloc::boxed::Box;

    struct Env {
        mem: Arc<FakeAddressSpace>,
        acct: Arc<Accounting>,
    }

    fn env() -> Env {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(0x1000_0000, 64 << 20, true);
        Env { mem, acct: Arc::new(Accounting::new(u64::MAX)) }
    }

    fn slice(e: &Env, uptr: u64, length: u64) -> Vec<PagesSlice> {
        let (pages, off) = Pages::new(e.mem.clone(), e.acct.clone(), uptr, length, true).unwrap();
        alloc::vec![PagesSlice { pages, start_byte: off, length }]
    }

    fn mock() -> DomainRef {
        Arc::new(DomainLock::new(Box::new(MockDomain::new())))
    }

    #[test]
    fn map_fill_unmap_with_two_domains_pins_once() {
        let e = env();
        let mut t = IoPagetable::new();
        let (d1, d2) = (mock(), mock());
        t.add_domain(1, d1.clone()).unwrap();
        assert_eq!(t.iova_alignment(), 2048);
        let iova = MOCK_APERTURE_START;
        t.map_pages(&slice(&e, 0x1000_0000, 0x4000), 0x4000, Some(iova), Prot::RW).unwrap();
        assert_eq!(e.mem.pinned_pages(), 4);
        t.add_domain(2, d2.clone()).unwrap();
        assert_eq!(e.mem.pinned_pages(), 4);
        assert_eq!(e.mem.pins(0x1000_0000), 1);
        for d in [&d1, &d2] {
            assert_eq!(d.lock().iova_to_phys(iova + 0x1234), e.mem.phys_of(0x1000_1234));
        }
        // Outside the mock's aperture is reserved now.
        assert_eq!(t.map_pages(&slice(&e, 0x1000_8000, 0x1000), 0x1000, Some(0x1000), Prot::READ), Err(Errno::EINVAL));
        assert_eq!(t.unmap(iova, 0x2000), Err(Errno::ENOENT));
        assert_eq!(t.unmap(iova, 0x4000), Ok(0x4000));
        assert_eq!(e.mem.pinned_pages(), 0);
        assert_eq!(e.acct.pinned(), 0);
        assert_eq!(d1.lock().iova_to_phys(iova), None);
    }

    #[test]
    fn allocation_keeps_huge_page_alignment_and_reports_ranges() {
        let e = env();
        let mut t = IoPagetable::new();
        let a = t.map_pages(&slice(&e, 0x1020_0000, 0x20_0000), 0x20_0000, None, Prot::RW).unwrap();
        assert_eq!(a % 0x20_0000, 0);
        assert!(a >= PAGE_SIZE);
        let b = t.map_pages(&slice(&e, 0x1000_0800, 0x800), 0x800, None, Prot::READ).unwrap();
        assert_eq!(b % PAGE_SIZE, 0x800);
        t.reserve(IovaRange::new(0x1_0000_0000, 0x1_ffff_ffff), Owner::Test).unwrap();
        assert_eq!(t.iova_ranges(), [IovaRange::new(0, 0xffff_ffff), IovaRange::new(0x2_0000_0000, u64::MAX)]);
        assert_eq!(t.reserve(IovaRange::new(a, a), Owner::Test), Err(Errno::EADDRINUSE));
        assert_eq!(t.set_allowed(&[IovaRange::new(0x1_8000_0000, 0x1_8000_ffff)]), Err(Errno::EADDRINUSE));
    }

    #[test]
    fn copy_shares_pins_and_domain_failure_unwinds() {
        let e = env();
        let mut src = IoPagetable::new();
        let mut dst = IoPagetable::new();
        let d = mock();
        dst.add_domain(7, d.clone()).unwrap();
        let iova = src.map_pages(&slice(&e, 0x1000_0000, 0x8000), 0x8000, None, Prot::RW).unwrap();
        assert_eq!(e.mem.pinned_pages(), 0, "no domain: nothing pinned yet");
        let pieces = src.get_pages(iova + 0x1000, 0x2000).unwrap();
        let dst_iova = dst.map_pages(&pieces, 0x2000, Some(MOCK_APERTURE_START), Prot::READ).unwrap();
        assert_eq!(dst_iova, MOCK_APERTURE_START);
        assert_eq!(e.mem.pinned_pages(), 2);
        // A second domain whose map fails leaves everything as it was.
        let bad = Arc::new(DomainLock::new(Box::new({
            let mut m = MockDomain::new();
            m.fail_map_at(Some(1));
            m
        }) as Box<dyn IommuDomain>));
        assert_eq!(dst.add_domain(8, bad.clone()), Err(Errno::ENOMEM));
        assert_eq!(dst.domain_count(), 1);
        assert_eq!(e.mem.pinned_pages(), 2);
        assert_eq!(dst.reserved().count(), 2, "only the first domain's aperture reservations");
        dst.remove_domain(7).unwrap();
        assert_eq!(e.mem.pinned_pages(), 0);
        assert_eq!(dst.iova_alignment(), 1);
        assert_eq!(src.get_pages(iova + 0x8000, 1).map(|_| ()), Err(Errno::ENOENT));
    }
}
