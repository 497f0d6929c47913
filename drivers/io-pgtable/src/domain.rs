//! [`PagingDomain`]: a [`PageTable`] behind the `IommuDomain` trait.
//!
//! The page table does the memory side; the two hardware jobs of a domain
//! are delegated:
//! * IOTLB invalidation goes to an [`Invalidator`] (the VT-d driver will
//!   queue page-selective invalidations; hosts use [`RecordingInvalidator`]).
//! * Device attach/detach only records the handle here: pointing a context
//!   or PASID entry at [`PageTable::root`] is the driver's job, done around
//!   this type. The host version therefore never fails an attach.
//!
//! Invariants:
//! * Tables unlinked by unmap (or by a failed map's unwind) are freed only
//!   after the invalidator ran for the ranges that unlinked them: in
//!   `iotlb_sync`, or before a failed `map` returns.
//! * One gather at a time: `iotlb_sync` releases every deferred table, so
//!   callers must not keep two gathers open and sync only one of them
//!   (iommufd never does).

use alloc::vec::Vec;
use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::Relaxed;

use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain, IotlbGather, IovaRange, PhysRun, Prot};

use crate::Error;
use crate::format::PtFormat;
use crate::memory::TableMemory;
use crate::table::{PageTable, PartialUnmap};

/// Invalidates the unit's translation caches for a domain.
pub trait Invalidator {
    /// Invalidates IOTLB entries for `[start, last]`; when `tables_freed`,
    /// also the paging-structure caches (the walker may hold pointers to
    /// tables that are about to be freed).
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError>;

    /// Called after a successful map of `[iova, last]`. Units that cache
    /// non-present entries (VT-d CAP.CM = 1, as QEMU's) need an
    /// invalidation here, and units with a write buffer a flush; others do
    /// nothing, the default.
    fn mapped(&mut self, iova: u64, last: u64) -> Result<(), DomainError> {
        let _ = (iova, last);
        Ok(())
    }

    /// Turns the unit's recording of dirty bits in this domain's leaves on
    /// or off for every device attached to it (VT-d: SSADE in their PASID
    /// entries; AMD-Vi: HAD in their DTEs), with the invalidations that
    /// makes the unit see it. Called by
    /// [`IommuDomain::set_dirty_tracking`] on a dirty-capable domain;
    /// nothing to do by default (host models, a unit that always records).
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        let _ = enable;
        Ok(())
    }

    /// Whether [`Self::invalidate_shared`] and [`Self::mapped_shared`]
    /// work, from several threads at once: the domain's concurrent path
    /// needs it. No, by default.
    fn concurrent(&self) -> bool {
        false
    }

    /// [`Self::invalidate`] through `&self`. `NotSupported` by default.
    fn invalidate_shared(&self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        let _ = (start, last, tables_freed);
        Err(DomainError::NotSupported)
    }

    /// [`Self::mapped`] through `&self`. `NotSupported` by default.
    fn mapped_shared(&self, iova: u64, last: u64) -> Result<(), DomainError> {
        let _ = (iova, last);
        Err(DomainError::NotSupported)
    }
}

/// An [`Invalidator`] that records its calls (host tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecordingInvalidator {
    /// `(start, last, tables_freed)` of each invalidation, in order.
    pub invalidations: Vec<(u64, u64, bool)>,
}

impl Invalidator for RecordingInvalidator {
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        self.invalidations.push((start, last, tables_freed));
        Ok(())
    }
}

/// An [`Invalidator`] that does nothing (benchmarks).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInvalidator;

impl Invalidator for NoInvalidator {
    fn invalidate(&mut self, _start: u64, _last: u64, _tables_freed: bool) -> Result<(), DomainError> {
        Ok(())
    }
    fn concurrent(&self) -> bool {
        true
    }
    fn invalidate_shared(&self, _start: u64, _last: u64, _tables_freed: bool) -> Result<(), DomainError> {
        Ok(())
    }
    fn mapped_shared(&self, _iova: u64, _last: u64) -> Result<(), DomainError> {
        Ok(())
    }
}

impl From<Error> for DomainError {
    fn from(e: Error) -> Self {
        match e {
            Error::BadRange { iova, length } => DomainError::BadRange { iova, length },
            // The IOVA is not part of this error; PagingDomain::map fills it in.
            Error::BadPhys { length, .. } => DomainError::BadRange { iova: 0, length },
            Error::BadProt { .. } => DomainError::NotSupported,
            Error::AlreadyMapped { iova } => DomainError::AlreadyMapped { iova },
            Error::NoMemory { .. } => DomainError::NoMemory,
            Error::NotShared => DomainError::NotSupported,
        }
    }
}

/// A paging domain: page table, invalidator and the attached devices.
#[derive(Debug)]
pub struct PagingDomain<F: PtFormat, M: TableMemory, I: Invalidator> {
    table: PageTable<F, M>,
    invalidator: I,
    devices: Vec<DeviceHandle>,
    /// An invalidation failed: maps are refused until `recover`. Atomic
    /// for the concurrent path.
    needs_recovery: AtomicBool,
    /// Dirty tracking is on (only for a format with a dirty bit).
    tracking: bool,
}

impl<F: PtFormat, M: TableMemory, I: Invalidator> PagingDomain<F, M, I> {
    /// A domain with an empty page table.
    pub fn new(format: F, mem: M, invalidator: I) -> Result<Self, Error> {
        Ok(Self {
            table: PageTable::new(format, mem)?,
            invalidator,
            devices: Vec::new(),
            needs_recovery: AtomicBool::new(false),
            tracking: false,
        })
    }
    /// The page table.
    pub fn table(&self) -> &PageTable<F, M> {
        &self.table
    }
    /// The page table, mutably.
    pub fn table_mut(&mut self) -> &mut PageTable<F, M> {
        &mut self.table
    }
    /// The invalidator.
    pub fn invalidator(&self) -> &I {
        &self.invalidator
    }
    /// The invalidator, mutably.
    pub fn invalidator_mut(&mut self) -> &mut I {
        &mut self.invalidator
    }
    /// Attached devices, in attach order.
    pub fn devices(&self) -> &[DeviceHandle] {
        &self.devices
    }
    /// Whether dirty tracking is on ([`IommuDomain::set_dirty_tracking`]).
    pub fn dirty_tracking(&self) -> bool {
        self.tracking
    }
    /// Whether an invalidation failed and [`IommuDomain::recover`] has not
    /// succeeded since.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery.load(Relaxed)
    }
    /// Runs an invalidation; a failure marks the domain for recovery.
    fn invalidate(&mut self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        let r = self.invalidator.invalidate(start, last, tables_freed);
        if r.is_err() {
            self.needs_recovery.store(true, Relaxed);
        }
        r
    }
    /// [`Self::invalidate`] through `&self` (concurrent path).
    fn invalidate_shared(&self, start: u64, last: u64, tables_freed: bool) -> Result<(), DomainError> {
        let r = self.invalidator.invalidate_shared(start, last, tables_freed);
        if r.is_err() {
            self.needs_recovery.store(true, Relaxed);
        }
        r
    }
}

impl<F, M, I> IommuDomain for PagingDomain<F, M, I>
where
    F: PtFormat + Send + Sync,
    M: TableMemory + Send + Sync,
    I: Invalidator + Send + Sync,
{
    fn page_sizes(&self) -> u64 {
        self.table.page_sizes()
    }

    fn aperture(&self) -> IovaRange {
        self.table.aperture()
    }

    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
        self.map_runs(iova, &[PhysRun::new(phys, length)], prot)
    }

    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        if self.needs_recovery() {
            return Err(DomainError::NeedsRecovery);
        }
        let length = runs.iter().fold(0u64, |a, r| a.saturating_add(r.len));
        match self.table.map_runs(iova, runs, prot) {
            Ok(()) => {
                let last = iova + (length - 1);
                if let Err(e) = self.invalidator.mapped(iova, last) {
                    // The unit may hold the old not-present entries (or
                    // the writes may sit in its write buffer): undo the
                    // map, so it is all or nothing, and keep any freed
                    // table until a recovery invalidates everything.
                    self.needs_recovery.store(true, Relaxed);
                    let mut g = IotlbGather::default();
                    self.table.unmap(iova, length, &mut g);
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                if matches!(e, Error::AlreadyMapped { .. } | Error::NoMemory { .. }) {
                    // The unwind may have removed entries the walker saw
                    // and unlinked tables it may hold.
                    self.invalidate(iova, iova + (length - 1), self.table.deferred_count() > 0)?;
                    self.table.release_deferred();
                }
                Err(match e {
                    Error::BadPhys { .. } => DomainError::BadRange { iova, length },
                    e => e.into(),
                })
            }
        }
    }

    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        self.table.unmap(iova, length, gather)
    }

    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        // Tables a concurrent unmap put in the gather join the deferred
        // list (this sync is exclusive: nobody else's are there).
        let mut unlinked = core::mem::take(&mut gather.unlinked);
        if let Some(start) = gather.start {
            let (last, freed) = (gather.last, gather.freed_tables > 0);
            *gather = IotlbGather::default();
            // On failure the unlinked tables stay deferred: the walker may
            // still hold them.
            if let Err(e) = self.invalidate(start, last, freed) {
                gather.unlinked = unlinked;
                return Err(e);
            }
        }
        if !self.needs_recovery() {
            self.table.release_deferred();
            self.table.free_unlinked(&mut unlinked);
        }
        gather.unlinked = unlinked;
        Ok(())
    }

    fn recover(&mut self) -> Result<(), DomainError> {
        if !self.needs_recovery() {
            return Ok(());
        }
        let IovaRange { start, last } = self.table.aperture();
        self.invalidator.invalidate(start, last, true)?;
        self.needs_recovery.store(false, Relaxed);
        self.table.release_deferred();
        Ok(())
    }

    /// When the table memory and the invalidator both work concurrently
    /// ([`TableMemory::shared`], [`Invalidator::concurrent`]).
    fn supports_shared(&self) -> bool {
        self.table.concurrent() && self.invalidator.concurrent()
    }

    /// The engine's [`PageTable::map_shared`]; as `map_runs` otherwise
    /// (refused while recovery is needed; a failed `mapped` undoes the
    /// map).
    fn map_shared(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        if !self.invalidator.concurrent() {
            return Err(DomainError::NotSupported);
        }
        if self.needs_recovery() {
            return Err(DomainError::NeedsRecovery);
        }
        let mut unlinked = Vec::new();
        match self.table.map_shared(iova, runs, prot, &mut unlinked) {
            Ok(length) => {
                let last = iova + (length - 1);
                if let Err(e) = self.invalidator.mapped_shared(iova, last) {
                    // As in map_runs; the tables the undo unlinks stay
                    // allocated for good (a recovery does not know them).
                    self.needs_recovery.store(true, Relaxed);
                    let mut g = IotlbGather::default();
                    // Undoing this call's own map never splits a page,
                    // so it cannot stop early.
                    let _partial = self.table.unmap_shared(iova, length, &mut g, &mut unlinked);
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                let length = runs.iter().fold(0u64, |a, r| a.saturating_add(r.len));
                if matches!(e, Error::AlreadyMapped { .. } | Error::NoMemory { .. }) {
                    self.invalidate_shared(iova, iova + (length - 1), !unlinked.is_empty())?;
                    self.table.free_unlinked(&mut unlinked);
                }
                Err(match e {
                    Error::BadPhys { .. } => DomainError::BadRange { iova, length },
                    e => e.into(),
                })
            }
        }
    }

    /// The engine's [`PageTable::unmap_shared`]; unlinked tables go into
    /// `gather` for [`Self::iotlb_sync_shared`]. A split that cannot
    /// allocate stops it early, as `unmap` does (the bytes returned say
    /// how far it got).
    fn unmap_shared(&self, iova: u64, length: u64, gather: &mut IotlbGather) -> Result<u64, DomainError> {
        if !self.invalidator.concurrent() {
            return Err(DomainError::NotSupported);
        }
        let mut unlinked = core::mem::take(&mut gather.unlinked);
        let r = self.table.unmap_shared(iova, length, gather, &mut unlinked);
        gather.unlinked = unlinked;
        match r {
            Ok(n) => Ok(n),
            Err(PartialUnmap { error: Error::NotShared, .. }) => Err(DomainError::NotSupported),
            Err(partial) => Ok(partial.unmapped),
        }
    }

    fn unmap_shared_collect(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        out: &mut Vec<PhysRun>,
    ) -> Result<u64, DomainError> {
        if !self.invalidator.concurrent() {
            return Err(DomainError::NotSupported);
        }
        let mut unlinked = core::mem::take(&mut gather.unlinked);
        let r = self.table.unmap_shared_collect(iova, length, gather, &mut unlinked, out);
        gather.unlinked = unlinked;
        match r {
            Ok(n) => Ok(n),
            Err(PartialUnmap { error: Error::NotShared, .. }) => Err(DomainError::NotSupported),
            Err(partial) => Ok(partial.unmapped),
        }
    }

    /// Invalidates `gather` through the invalidator's concurrent path,
    /// then frees the tables it carries.
    fn iotlb_sync_shared(&self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        if !self.invalidator.concurrent() {
            return Err(DomainError::NotSupported);
        }
        if let Some(start) = gather.start {
            let (last, freed) = (gather.last, gather.freed_tables > 0);
            (gather.start, gather.last, gather.freed_tables) = (None, 0, 0);
            // On failure the tables stay in the gather: the walker may
            // still hold them.
            self.invalidate_shared(start, last, freed)?;
        }
        if !self.needs_recovery() {
            self.table.free_unlinked(&mut gather.unlinked);
        }
        Ok(())
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.table.iova_to_phys(iova).map(|(phys, _)| phys)
    }

    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        self.table.phys_run(iova, max_len)
    }

    fn iova_to_phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        self.table.phys_runs(iova, length, out)
    }

    /// Forces snooping on every later mapping when the format can encode it
    /// (VT-d second stage with ECAP.SC). As the hardware cannot fix up what
    /// is already mapped without rewriting it, this refuses (false) while
    /// anything is mapped, unless snooping is already forced.
    fn enforce_cache_coherency(&mut self) -> bool {
        if self.table.force_snoop() {
            return true;
        }
        if !self.table.is_empty() {
            return false;
        }
        self.table.set_force_snoop()
    }

    /// Dirty-capable when its format records writes in leaves
    /// ([`PtFormat::dirty_bit`]): VT-d second stage for SSADE, AMD v1 for
    /// host dirty, x86 first stage with clean leaves.
    fn dirty_capable(&self) -> bool {
        self.table.dirty_capable()
    }

    /// Turns the unit's recording on and off through the invalidator
    /// ([`Invalidator::set_dirty_tracking`]: SSADE in the PASID entries,
    /// HAD in the DTEs of the attached devices). Turning it on then clears
    /// the dirty bits set before (pages written while tracking was off are
    /// not reported) with one invalidation, so every write from then on
    /// marks its leaf again; turning it off stops reads first.
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        if !self.dirty_capable() {
            return Err(DomainError::NotSupported);
        }
        if !enable {
            self.tracking = false;
            return self.invalidator.set_dirty_tracking(false);
        }
        self.invalidator.set_dirty_tracking(true)?;
        if !self.tracking {
            let IovaRange { start, last } = self.table.aperture();
            let mut gather = IotlbGather::default();
            self.table.read_and_clear_dirty(start, last - start + 1, true, &mut gather, &mut |_, _| {})?;
            self.iotlb_sync(&mut gather)?;
        }
        self.tracking = true;
        Ok(())
    }

    /// The engine's walk ([`PageTable::read_and_clear_dirty`]): dirty
    /// leaves in ascending order, cleared leaves added to `gather`.
    fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DomainError> {
        if !self.dirty_capable() {
            return Err(DomainError::NotSupported);
        }
        if !self.tracking {
            return Err(DomainError::BadRange { iova, length });
        }
        self.table.read_and_clear_dirty(iova, length, clear, gather, record).map_err(DomainError::from)
    }

    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        if !self.devices.contains(&device) {
            self.devices.push(device);
        }
        Ok(())
    }

    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.devices.retain(|d| *d != device);
        Ok(())
    }
}
