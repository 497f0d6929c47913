//! The seam between iommufd and the IOMMU drivers: an I/O page-table
//! *domain* that maps IOVA ranges to physical ranges with permissions.
//!
//! Drivers (VT-d, AMD-Vi, the selftest mock) implement [`IommuDomain`];
//! iommufd only ever talks to this trait, so it never depends on a driver.
//!
//! Conventions, as in the rest of Portcullis:
//! * `last` is inclusive; every `iova + length` is computed with overflow
//!   checks by the caller before it reaches a domain.
//! * Invalidation is explicit: `unmap` collects what it removed in an
//!   [`IotlbGather`] and the caller issues one [`IommuDomain::iotlb_sync`]
//!   for the whole batch, so unmapping many pages costs one invalidation.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

/// What the crate's macros name from `alloc` (so a crate using them needs
/// no `extern crate alloc`).
#[doc(hidden)]
pub mod __private {
    pub use alloc::vec::Vec;
}

pub mod mmio;
#[cfg(feature = "testing")]
pub mod testing;
pub mod unit;

use core::fmt;

/// Access permissions of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Prot(u8);

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot(0);
    /// The device may read.
    pub const READ: Prot = Prot(1);
    /// The device may write.
    pub const WRITE: Prot = Prot(2);
    /// Read and write.
    pub const RW: Prot = Prot(3);
    /// The mapping is cache coherent (snoop forced where the unit can).
    pub const CACHE: Prot = Prot(4);

    /// Raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every permission in `other` is present.
    pub const fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub const fn union(self, other: Prot) -> Prot {
        Prot(self.0 | other.0)
    }
    /// Whether the device may read.
    pub const fn readable(self) -> bool {
        self.0 & 1 != 0
    }
    /// Whether the device may write.
    pub const fn writable(self) -> bool {
        self.0 & 2 != 0
    }
}

impl core::ops::BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        self.union(rhs)
    }
}

/// A physically contiguous run of memory: `len` bytes from `phys`. What
/// domains map in one piece ([`IommuDomain::map_runs`]) and read back
/// ([`IommuDomain::iova_to_phys_runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(C)]
pub struct PhysRun {
    /// Physical address of the first byte.
    pub phys: u64,
    /// Bytes.
    pub len: u64,
}

// Two words, laid out as C would: a slice of runs costs what a slice of
// `(u64, u64)` did.
const _: () = assert!(core::mem::size_of::<PhysRun>() == 16 && core::mem::align_of::<PhysRun>() == 8);

impl PhysRun {
    /// `len` bytes from `phys`.
    #[inline]
    pub const fn new(phys: u64, len: u64) -> Self {
        Self { phys, len }
    }
    /// The physical address just past the run (wrapping at 2^64).
    #[inline]
    pub const fn end(self) -> u64 {
        self.phys.wrapping_add(self.len)
    }
}

/// An inclusive IOVA range `[start, last]`: apertures, reserved and
/// allowed ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(C)]
pub struct IovaRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// `[start, last]`.
    #[inline]
    pub const fn new(start: u64, last: u64) -> Self {
        Self { start, last }
    }
}

/// How a domain knows a device (for iommufd: the device object's handle
/// into the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceHandle {
    /// A PCI function behind an IOMMU unit: the unit and the requester id
    /// its DMA carries.
    Requester(RequesterRef),
    /// A device no unit translates (the selftest mock, benchmarks,
    /// host-side page tables): a number only its domains interpret.
    Opaque(u64),
}

/// Where a device's DMA is translated: which unit (by its index in the
/// platform's list) and the requester id the DMA carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequesterRef {
    /// Index of the unit.
    pub unit: u16,
    /// Requester (device) id, after bridge and firmware aliasing.
    pub requester_id: u16,
}

/// What went wrong in an IOMMU unit's hardware or driver state: the cause
/// a driver error carries, and the cause inside [`DomainError::Hardware`].
/// Plain data (no strings), so it can travel through every layer up to
/// a hypervisor's own error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwError {
    /// The unit did not reach a state in time.
    Timeout {
        /// The register (or memory word) waited on.
        register: &'static str,
        /// How long the driver waited.
        waited_ns: u64,
    },
    /// The unit reported an invalidation queue or command error: VT-d
    /// FSTS.IQE/ICE/ITE; AMD-Vi a command processor that stopped
    /// (Status.CmdBufRun clear) or an ILLEGAL_COMMAND_ERROR /
    /// COMMAND_HARDWARE_ERROR event naming a command of the batch. The
    /// batch's invalidations may not have been done.
    QueueError {
        /// The fault/status register when the error was seen (VT-d FSTS,
        /// AMD-Vi Status).
        status: u32,
    },
    /// No memory for a table, queue or ring.
    NoMemory,
    /// The unit cannot do what was asked.
    Unsupported(&'static str),
    /// All domain ids are in use.
    NoDomainId,
    /// A requester (device) id beyond what the unit's tables cover.
    NoSuchDevice {
        /// The id asked for.
        device_id: u16,
        /// The last id the unit covers.
        last_device_id: u16,
    },
    /// An argument the hardware cannot encode.
    Invalid(&'static str),
    /// The unit is not enabled yet (or was disabled).
    NotEnabled,
    /// A table (interrupt remapping entries, ...) has no free slot.
    TableFull,
    /// The unit finished a register-based invalidation without doing it
    /// (VT-d IOTLB IAIG or CCMD CAIG 00b: a request it found wrong and
    /// ignored), so whatever it cached is still cached.
    Rejected {
        /// The register whose request was ignored.
        register: &'static str,
        /// Its value when the unit was done.
        value: u64,
    },
}

impl fmt::Display for HwError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { register, waited_ns } => {
                write!(f, "timed out after {} us waiting on {register}", waited_ns / 1000)
            }
            Self::QueueError { status } => write!(f, "invalidation queue error, status {status:#x}"),
            Self::NoMemory => write!(f, "out of memory for tables"),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
            Self::NoDomainId => write!(f, "no free domain id"),
            Self::NoSuchDevice { device_id, last_device_id } => {
                write!(f, "device id {device_id:#06x} beyond the unit's tables (last {last_device_id:#06x})")
            }
            Self::Invalid(what) => write!(f, "invalid argument: {what}"),
            Self::NotEnabled => write!(f, "not enabled"),
            Self::TableFull => write!(f, "table full"),
            Self::Rejected { register, value } => {
                write!(f, "invalidation not performed ({register} = {value:#x})")
            }
        }
    }
}

impl core::error::Error for HwError {}

/// A driver error: which unit (by its register base, as the DMAR and IVRS
/// name units) and what went wrong there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitError {
    /// Register base of the unit.
    pub unit: u64,
    /// What the driver saw.
    pub cause: HwError,
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOMMU unit at {:#x}: {}", self.unit, self.cause)
    }
}

impl core::error::Error for UnitError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        Some(&self.cause)
    }
}

impl From<UnitError> for DomainError {
    fn from(e: UnitError) -> Self {
        DomainError::Hardware { unit: e.unit, cause: e.cause }
    }
}

/// Why a domain operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainError {
    /// No memory for page tables.
    NoMemory,
    /// The range is outside the aperture, or not aligned to the smallest
    /// page size.
    BadRange {
        /// First IOVA of the range.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// Part of the range is already mapped.
    AlreadyMapped {
        /// The first IOVA found mapped.
        iova: u64,
    },
    /// The device cannot use this domain (wrong unit, incompatible format).
    Incompatible,
    /// The unit failed (a wait timed out, an invalidation or a table write
    /// was refused): the unit's register base and the driver's cause.
    Hardware {
        /// Register base of the unit.
        unit: u64,
        /// What the driver saw.
        cause: HwError,
    },
    /// An IOTLB invalidation of this domain failed earlier: a device may
    /// still use stale translations, so the domain refuses to map until
    /// [`IommuDomain::recover`] succeeds.
    NeedsRecovery,
    /// The operation is not supported by this domain.
    NotSupported,
    /// Failure injected by a test (fault-injection sweeps).
    Injected,
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemory => write!(f, "out of memory for I/O page tables"),
            Self::BadRange { iova, length } => write!(f, "bad range {iova:#x}+{length:#x} for this domain"),
            Self::AlreadyMapped { iova } => write!(f, "IOVA {iova:#x} is already mapped"),
            Self::Incompatible => write!(f, "device and domain are incompatible"),
            Self::Hardware { unit, cause } => write!(f, "IOMMU unit at {unit:#x}: {cause}"),
            Self::NeedsRecovery => write!(f, "an invalidation failed: the domain needs recovery"),
            Self::NotSupported => write!(f, "not supported by this domain"),
            Self::Injected => write!(f, "injected failure"),
        }
    }
}

impl core::error::Error for DomainError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Hardware { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// IOVA ranges whose IOTLB entries must be invalidated, collected by
/// `unmap` and flushed once by [`IommuDomain::iotlb_sync`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IotlbGather {
    /// Lowest IOVA touched (inclusive), if any.
    pub start: Option<u64>,
    /// Highest IOVA touched (inclusive).
    pub last: u64,
    /// Page-table pages freed by the unmaps (must not be reused before the
    /// sync, since the hardware may still walk them).
    pub freed_tables: usize,
    /// Tables a concurrent unmap ([`IommuDomain::unmap_shared`]) unlinked,
    /// by physical address: [`IommuDomain::iotlb_sync_shared`] frees them
    /// once the invalidation succeeded (each concurrent caller frees only
    /// its own, after its own invalidation).
    pub unlinked: alloc::vec::Vec<u64>,
}

impl IotlbGather {
    /// Adds `[iova, last]` to the range to invalidate.
    pub fn add(&mut self, iova: u64, last: u64) {
        match self.start {
            None => (self.start, self.last) = (Some(iova), last),
            Some(s) => (self.start, self.last) = (Some(s.min(iova)), self.last.max(last)),
        }
    }
    /// Whether nothing needs invalidating.
    pub fn is_empty(&self) -> bool {
        self.start.is_none()
    }
}

/// An I/O page table that devices can be attached to.
///
/// Contract for implementers:
/// * [`map`](Self::map) either maps the whole range or maps nothing (it
///   unwinds what it wrote before returning an error).
/// * [`unmap`](Self::unmap) removes every mapping inside the range and
///   returns the number of bytes that were mapped there; it never fails.
///   Mappings that straddle the range's ends are the caller's problem:
///   iommufd only unmaps ranges it mapped.
/// * Page sizes are powers of two; the smallest is the domain's granule and
///   every `iova`, `phys` and `length` is a multiple of it.
///
/// Wrappers that add attach/detach behaviour around another domain forward
/// the rest with [`forward_paging!`]; a method added here must be added
/// there too, or wrappers silently fall back to its default.
pub trait IommuDomain: Send + Sync {
    /// Bitmap of supported page sizes (bit n set = 2^n bytes).
    fn page_sizes(&self) -> u64;
    /// First and last (inclusive) IOVA the domain can translate.
    fn aperture(&self) -> IovaRange;
    /// Maps `[iova, iova + length)` to `[phys, phys + length)`.
    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError>;
    /// Maps consecutive pieces from `iova`: `runs[k]` goes at `iova` plus
    /// the lengths of the pieces before it. All or nothing, like
    /// [`Self::map`]; one call for a range whose physical pages are
    /// scattered. The default maps piece by piece and, on failure, unmaps
    /// what it mapped (with an IOTLB sync) before returning the error.
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        let mut cur = iova;
        for &PhysRun { phys, len: length } in runs {
            if let Err(e) = self.map(cur, phys, length, prot) {
                if cur != iova {
                    let mut g = IotlbGather::default();
                    self.unmap(iova, cur - iova, &mut g);
                    // A failed sync is the more urgent error: the caller
                    // must not reuse what was mapped.
                    self.iotlb_sync(&mut g)?;
                }
                return Err(e);
            }
            cur = cur.wrapping_add(length);
        }
        Ok(())
    }
    /// Unmaps `[iova, iova + length)`, adding what it removed to `gather`.
    /// Returns the bytes that were mapped.
    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64;
    /// Whether [`Self::map_shared`], [`Self::unmap_shared`] and
    /// [`Self::iotlb_sync_shared`] work: callers may then map and unmap
    /// disjoint ranges from several threads at once through `&self`. No,
    /// by default; callers then serialise on `&mut self`.
    fn supports_shared(&self) -> bool {
        false
    }
    /// [`Self::map_runs`] through `&self`, concurrently with other
    /// `*_shared` calls on disjoint ranges (never with `&mut self` calls:
    /// callers hold a read lock for these and a write lock for the rest).
    /// All or nothing. [`DomainError::NotSupported`] by default.
    fn map_shared(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        let _ = (iova, runs, prot);
        Err(DomainError::NotSupported)
    }
    /// [`Self::unmap`] through `&self`, under the rules of
    /// [`Self::map_shared`]; tables it unlinks travel in `gather` to
    /// [`Self::iotlb_sync_shared`]. [`DomainError::NotSupported`] by
    /// default.
    fn unmap_shared(&self, iova: u64, length: u64, gather: &mut IotlbGather) -> Result<u64, DomainError> {
        let _ = (iova, length, gather);
        Err(DomainError::NotSupported)
    }
    /// [`Self::unmap_shared`], also appending the physical ranges the
    /// removed translations pointed at to `out`, in IOVA order, adjacent
    /// ranges joined: a read-back and an unmap in one pass (iommufd
    /// unpins what was mapped this way). Returns the bytes unmapped, as
    /// [`Self::unmap_shared`] does. [`DomainError::NotSupported`] (the
    /// default) removes nothing: callers then read back first and unmap
    /// after.
    fn unmap_shared_collect(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        out: &mut alloc::vec::Vec<PhysRun>,
    ) -> Result<u64, DomainError> {
        let _ = (iova, length, gather, out);
        Err(DomainError::NotSupported)
    }
    /// [`Self::iotlb_sync`] through `&self`, under the rules of
    /// [`Self::map_shared`]: invalidates `gather` and then frees the
    /// tables it carries. On failure the tables stay allocated for good
    /// and the domain refuses maps until [`Self::recover`].
    /// [`DomainError::NotSupported`] by default.
    fn iotlb_sync_shared(&self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        let _ = gather;
        Err(DomainError::NotSupported)
    }
    /// Invalidates the IOTLB for everything in `gather` and clears it.
    ///
    /// On failure the translations may still be cached: the caller must
    /// keep whatever the unmapped range pointed at (pinned pages) alive, and
    /// the domain refuses further maps ([`DomainError::NeedsRecovery`])
    /// until [`Self::recover`] succeeds. Tables the unmaps freed are kept
    /// until then too.
    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError>;
    /// After a failed invalidation: invalidates everything the domain may
    /// have cached and, when that succeeds, accepts maps again. A domain
    /// that never failed returns `Ok` at once (the default).
    fn recover(&mut self) -> Result<(), DomainError> {
        Ok(())
    }
    /// The physical address `iova` translates to, if mapped.
    fn iova_to_phys(&self, iova: u64) -> Option<u64>;
    /// Makes every mapping cache coherent (snoop control); false if the
    /// hardware cannot.
    fn enforce_cache_coherency(&mut self) -> bool;

    /// Whether the domain can track writes by devices (it was made with
    /// dirty tracking, on a unit that records dirty bits); the default: no.
    fn dirty_capable(&self) -> bool {
        false
    }
    /// Starts or stops recording which pages devices write. Domains that
    /// cannot: [`DomainError::NotSupported`] (the default).
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        let _ = enable;
        Err(DomainError::NotSupported)
    }
    /// Calls `record(iova, len)` for every mapped piece of `[iova, iova +
    /// length)` written since it was last cleared, in ascending IOVA
    /// order; with `clear`, clears those dirty bits, adding what it
    /// cleared to `gather` (the caller syncs once for the whole call).
    /// Refused with [`DomainError::NotSupported`] by domains that cannot
    /// track (the default), and with [`DomainError::BadRange`] while
    /// tracking is off.
    fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DomainError> {
        let _ = (iova, length, clear, gather, record);
        Err(DomainError::NotSupported)
    }

    /// The domain as `Any`, for test tools that drive a concrete domain
    /// behind the trait (the selftest's dirty-marking command); `None`,
    /// the default, for domains that do not offer it.
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        None
    }

    /// Points `device` at this domain.
    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError>;
    /// Detaches `device` (it is blocked afterwards until attached
    /// elsewhere). On failure the device may still reach the domain: the
    /// caller must keep the domain (and what it maps) as it is.
    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError>;

    /// Points PASID `pasid` (never 0: PASID 0 is the requester id's own
    /// translation, [`Self::attach_device`]) of `device` at this domain,
    /// replacing the domain that PASID used, if any, without a window in
    /// which it is blocked where the hardware allows. The device's other
    /// PASIDs and its requester-id translation are left as they were.
    /// [`DomainError::NotSupported`] (the default) when the domain or its
    /// unit cannot translate PASID-tagged requests. On any failure the
    /// PASID is left as it was (on its previous domain, or blocked): the
    /// iommufd core keeps its record of the PASID's domain, and its
    /// reference on it, on that promise. The caller has checked the PASID
    /// against [`DeviceOps::max_pasid_log2`]. A replace is this one call
    /// on the new domain: the old domain is not called, so a domain that
    /// lists the PASIDs using it cannot count on being told when one moves
    /// away (the hardware's PASID entry is what says which domain a PASID
    /// uses).
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let _ = (device, pasid);
        Err(DomainError::NotSupported)
    }
    /// Blocks PASID `pasid` of `device` again (it used this domain). On
    /// failure the PASID may still reach the domain: the caller keeps the
    /// domain as it is, as for [`Self::detach_device`].
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        let _ = (device, pasid);
        Err(DomainError::NotSupported)
    }

    /// The physically contiguous run starting at `iova`: a [`PhysRun`]
    /// `{ phys, len }` with `1 <= len <= max_len` such that
    /// `[iova, iova + len)` translates to `[phys, phys + len)`, or `None`
    /// if `iova` is unmapped (or `max_len` is 0). Callers read a mapped
    /// range back with one call per run instead of one per page.
    ///
    /// The default answers up to the end of the granule page containing
    /// `iova` through [`Self::iova_to_phys`]; domains that know their leaf
    /// sizes return whole leaves (or more).
    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        if max_len == 0 {
            return None;
        }
        let phys = self.iova_to_phys(iova)?;
        let g = self.granule();
        Some(PhysRun::new(phys, (g - (iova & (g - 1))).min(max_len)))
    }

    /// Reads `[iova, iova + length)` back as physically contiguous runs:
    /// fills `out` with the runs of consecutive IOVA pieces from
    /// `iova` and returns `(runs written, bytes covered)`. Stops at the
    /// first unmapped byte, when `out` is full, or after `length` bytes.
    /// Neighbouring runs that continue each other physically are merged.
    ///
    /// The default calls [`Self::iova_to_phys_run`] per run; domains that
    /// can read their leaves in a row answer a whole range in one call.
    fn iova_to_phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        let (mut n, mut done) = (0usize, 0u64);
        while done < length {
            let Some(run) = self.iova_to_phys_run(iova.wrapping_add(done), length - done) else { break };
            if !push_run(out, &mut n, run) {
                break;
            }
            done += run.len;
        }
        (n, done)
    }

    /// The smallest page size (the granule).
    fn granule(&self) -> u64 {
        let sizes = self.page_sizes();
        if sizes == 0 { 4096 } else { 1 << sizes.trailing_zeros() }
    }
}

/// A device as iommufd (or any user of domains) binds it: how to get a
/// domain it can use, what IOVA it must never be given, and what
/// `IOMMU_GET_HW_INFO` reports for it. Drivers implement it beside their
/// domains; iommufd only calls it.
pub trait DeviceOps: Send + Sync {
    /// The handle the IOMMU driver knows the device by.
    fn handle(&self) -> DeviceHandle;
    /// A new, empty paging domain this device can attach to.
    fn alloc_domain(&self) -> Result<alloc::boxed::Box<dyn IommuDomain>, DomainError>;
    /// IOVA ranges the device cannot use (MSI window, RMRRs).
    fn reserved_regions(&self) -> alloc::vec::Vec<IovaRange> {
        alloc::vec::Vec::new()
    }
    /// `IOMMU_GET_HW_INFO`: the driver's data type and bytes.
    fn hw_info(&self) -> (u32, alloc::vec::Vec<u8>) {
        (0, alloc::vec::Vec::new())
    }
    /// Whether the device's unit can track its writes (dirty bits), so it
    /// may use a domain made with [`Self::alloc_dirty_domain`].
    fn supports_dirty_tracking(&self) -> bool {
        false
    }
    /// A new, empty paging domain that can track dirty pages
    /// ([`IommuDomain::dirty_capable`]); [`DomainError::NotSupported`] when
    /// the unit cannot (the default).
    fn alloc_dirty_domain(&self) -> Result<alloc::boxed::Box<dyn IommuDomain>, DomainError> {
        Err(DomainError::NotSupported)
    }
    /// How many PASID bits the device and its unit support together
    /// (`IOMMU_GET_HW_INFO`'s `out_max_pasid_log2`): PASIDs `1..1 << n`
    /// may be attached with [`IommuDomain::attach_device_pasid`]. 0 (the
    /// default) when the device issues no PASID-tagged requests.
    fn max_pasid_log2(&self) -> u32 {
        0
    }
}

/// A monotonic clock for hardware timeouts (both drivers bound every wait
/// on the hardware with it).
pub trait Clock {
    /// Nanoseconds since some fixed point.
    fn now_ns(&self) -> u64;
}

/// Appends `run` to the runs `out[..*n]`, extending the last run when it
/// ends where `run` starts. False (and nothing changed) when `out` is full.
#[inline]
pub fn push_run(out: &mut [PhysRun], n: &mut usize, run: PhysRun) -> bool {
    if *n > 0 {
        let last = &mut out[*n - 1];
        if last.end() == run.phys {
            last.len += run.len;
            return true;
        }
    }
    if *n == out.len() {
        return false;
    }
    out[*n] = run;
    *n += 1;
    true
}

/// The largest page size from `sizes` usable at `iova`/`phys` for at most
/// `length` bytes: both addresses aligned to it and it fits.
pub fn best_page_size(sizes: u64, iova: u64, phys: u64, length: u64) -> Option<u64> {
    let align = (iova | phys).trailing_zeros().min(63);
    let fit = 63 - length.leading_zeros().min(63);
    let usable = sizes & ((2u64 << align.min(fit)).wrapping_sub(1));
    (usable != 0 && length != 0).then(|| 1 << (63 - usable.leading_zeros()))
}

/// Implements every `IommuDomain` method except `attach_device` and
/// `detach_device` by forwarding to an inner domain: either a field path
/// (`forward_paging!(inner.domain);`) or a pair of methods returning
/// `&dyn IommuDomain` and `&mut dyn IommuDomain`
/// (`forward_paging!(fn get, get_mut);`). Use it inside the `impl` block.
#[macro_export]
macro_rules! forward_paging {
    (fn $get:ident, $get_mut:ident) => {
        $crate::forward_paging!(@methods self, self.$get(), self.$get_mut());
    };
    ($($path:ident).+) => {
        $crate::forward_paging!(@methods self, &self.$($path).+, &mut self.$($path).+);
    };
    (@methods $self:ident, $get:expr, $get_mut:expr) => {
        fn page_sizes(&$self) -> u64 {
            $crate::IommuDomain::page_sizes($get)
        }
        fn aperture(&$self) -> $crate::IovaRange {
            $crate::IommuDomain::aperture($get)
        }
        fn map(&mut $self, iova: u64, phys: u64, length: u64, prot: $crate::Prot) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::map($get_mut, iova, phys, length, prot)
        }
        fn map_runs(&mut $self, iova: u64, runs: &[$crate::PhysRun], prot: $crate::Prot) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::map_runs($get_mut, iova, runs, prot)
        }
        fn unmap(&mut $self, iova: u64, length: u64, gather: &mut $crate::IotlbGather) -> u64 {
            $crate::IommuDomain::unmap($get_mut, iova, length, gather)
        }
        fn iotlb_sync(&mut $self, gather: &mut $crate::IotlbGather) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::iotlb_sync($get_mut, gather)
        }
        fn recover(&mut $self) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::recover($get_mut)
        }
        fn supports_shared(&$self) -> bool {
            $crate::IommuDomain::supports_shared($get)
        }
        fn map_shared(&$self, iova: u64, runs: &[$crate::PhysRun], prot: $crate::Prot) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::map_shared($get, iova, runs, prot)
        }
        fn unmap_shared(&$self, iova: u64, length: u64, gather: &mut $crate::IotlbGather) -> Result<u64, $crate::DomainError> {
            $crate::IommuDomain::unmap_shared($get, iova, length, gather)
        }
        fn unmap_shared_collect(
            &$self,
            iova: u64,
            length: u64,
            gather: &mut $crate::IotlbGather,
            out: &mut $crate::__private::Vec<$crate::PhysRun>,
        ) -> Result<u64, $crate::DomainError> {
            $crate::IommuDomain::unmap_shared_collect($get, iova, length, gather, out)
        }
        fn iotlb_sync_shared(&$self, gather: &mut $crate::IotlbGather) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::iotlb_sync_shared($get, gather)
        }
        fn iova_to_phys(&$self, iova: u64) -> Option<u64> {
            $crate::IommuDomain::iova_to_phys($get, iova)
        }
        fn enforce_cache_coherency(&mut $self) -> bool {
            $crate::IommuDomain::enforce_cache_coherency($get_mut)
        }
        fn dirty_capable(&$self) -> bool {
            $crate::IommuDomain::dirty_capable($get)
        }
        fn as_any_mut(&mut $self) -> Option<&mut dyn core::any::Any> {
            $crate::IommuDomain::as_any_mut($get_mut)
        }
        fn set_dirty_tracking(&mut $self, enable: bool) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::set_dirty_tracking($get_mut, enable)
        }
        fn read_and_clear_dirty(
            &mut $self,
            iova: u64,
            length: u64,
            clear: bool,
            gather: &mut $crate::IotlbGather,
            record: &mut dyn FnMut(u64, u64),
        ) -> Result<(), $crate::DomainError> {
            $crate::IommuDomain::read_and_clear_dirty($get_mut, iova, length, clear, gather, record)
        }
        fn iova_to_phys_run(&$self, iova: u64, max_len: u64) -> Option<$crate::PhysRun> {
            $crate::IommuDomain::iova_to_phys_run($get, iova, max_len)
        }
        fn iova_to_phys_runs(&$self, iova: u64, length: u64, out: &mut [$crate::PhysRun]) -> (usize, u64) {
            $crate::IommuDomain::iova_to_phys_runs($get, iova, length, out)
        }
        fn granule(&$self) -> u64 {
            $crate::IommuDomain::granule($get)
        }
    };
}

/// Maps each `(range, prot)` one-to-one in `paging(w)` (whole pages;
/// ranges already identity-mapped are left alone), then runs `then`; if a
/// map or `then` fails, the mappings this call added are removed again, so
/// the domain is as it was. Firmware-reserved ranges (VT-d RMRRs, AMD-Vi
/// unity ranges) go through here before a device is attached.
pub fn identity_map_then<W>(
    w: &mut W,
    paging: fn(&mut W) -> &mut dyn crate::IommuDomain,
    ranges: &[(crate::IovaRange, crate::Prot)],
    then: impl FnOnce(&mut W) -> Result<(), crate::DomainError>,
) -> Result<(), crate::DomainError> {
    let mut added = alloc::vec::Vec::new();
    let mut result = Ok(());
    for &(crate::IovaRange { start: base, last: limit }, prot) in ranges {
        let (start, end) = (base & !0xfff, (limit | 0xfff).wrapping_add(1));
        if end <= start {
            result = Err(crate::DomainError::BadRange { iova: base, length: limit.wrapping_sub(base) });
            break;
        }
        if paging(w).iova_to_phys(start) == Some(start) {
            continue;
        }
        if let Err(e) = paging(w).map(start, start, end - start, prot) {
            result = Err(e);
            break;
        }
        added.push((start, end - start));
    }
    if result.is_ok() {
        result = then(w);
    }
    if result.is_err() && !added.is_empty() {
        let d = paging(w);
        let mut g = crate::IotlbGather::default();
        for (s, len) in added {
            d.unmap(s, len, &mut g);
        }
        // The ranges were never used by the device (the attach failed or
        // never ran); a failed sync still wins, as the maps were live.
        d.iotlb_sync(&mut g)?;
    }
    result
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn page_size_choice() {
        let sizes = (1 << 12) | (1 << 21) | (1 << 30);
        assert_eq!(best_page_size(sizes, 0x20_0000, 0x40_0000, 0x20_0000), Some(0x20_0000));
        assert_eq!(best_page_size(sizes, 0x20_0000, 0x40_1000, 0x20_0000), Some(0x1000));
        assert_eq!(best_page_size(sizes, 0, 0, 1 << 30), Some(1 << 30));
        assert_eq!(best_page_size(sizes, 0, 0, (1 << 30) - 1), Some(0x20_0000));
        assert_eq!(best_page_size(sizes, 0, 0, 0xfff), None);
        assert_eq!(best_page_size(sizes, 0x800, 0, 0x1000), None);
        assert_eq!(best_page_size(1 << 11, 0x800, 0x800, 0x800), Some(0x800));
    }

    #[test]
    fn gather_accumulates() {
        let mut g = IotlbGather::default();
        assert!(g.is_empty());
        g.add(0x5000, 0x5fff);
        g.add(0x1000, 0x1fff);
        g.add(0x9000, 0x9fff);
        assert_eq!((g.start, g.last), (Some(0x1000), 0x9fff));
    }

    /// A domain that records which method ran.
    #[derive(Default)]
    struct Recorder(std::vec::Vec<&'static str>, core::sync::atomic::AtomicU32);

    impl IommuDomain for Recorder {
        fn page_sizes(&self) -> u64 {
            self.1.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            1 << 12
        }
        fn aperture(&self) -> IovaRange {
            self.1.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            IovaRange::new(0, 1 << 20)
        }
        fn map(&mut self, _: u64, _: u64, _: u64, _: Prot) -> Result<(), DomainError> {
            self.0.push("map");
            Ok(())
        }
        fn map_runs(&mut self, _: u64, _: &[PhysRun], _: Prot) -> Result<(), DomainError> {
            self.0.push("map_runs");
            Ok(())
        }
        fn unmap(&mut self, _: u64, len: u64, _: &mut IotlbGather) -> u64 {
            self.0.push("unmap");
            len
        }
        fn iotlb_sync(&mut self, _: &mut IotlbGather) -> Result<(), DomainError> {
            self.0.push("iotlb_sync");
            Ok(())
        }
        fn recover(&mut self) -> Result<(), DomainError> {
            self.0.push("recover");
            Ok(())
        }
        fn iova_to_phys(&self, iova: u64) -> Option<u64> {
            self.1.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            Some(iova)
        }
        fn enforce_cache_coherency(&mut self) -> bool {
            self.0.push("enforce_cache_coherency");
            true
        }
        fn dirty_capable(&self) -> bool {
            self.1.fetch_add(100_000, core::sync::atomic::Ordering::Relaxed);
            true
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
            self.0.push("as_any_mut");
            None
        }
        fn set_dirty_tracking(&mut self, _: bool) -> Result<(), DomainError> {
            self.0.push("set_dirty_tracking");
            Ok(())
        }
        fn read_and_clear_dirty(
            &mut self,
            iova: u64,
            length: u64,
            _: bool,
            _: &mut IotlbGather,
            record: &mut dyn FnMut(u64, u64),
        ) -> Result<(), DomainError> {
            self.0.push("read_and_clear_dirty");
            record(iova, length);
            Ok(())
        }
        fn attach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
        fn detach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
        fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
            self.1.fetch_add(100, core::sync::atomic::Ordering::Relaxed);
            Some(PhysRun::new(iova, max_len))
        }
        fn iova_to_phys_runs(&self, _: u64, length: u64, _: &mut [PhysRun]) -> (usize, u64) {
            self.1.fetch_add(1000, core::sync::atomic::Ordering::Relaxed);
            (0, length)
        }
        fn granule(&self) -> u64 {
            self.1.fetch_add(10_000, core::sync::atomic::Ordering::Relaxed);
            4096
        }
    }

    struct ByField {
        inner: Recorder,
    }
    impl IommuDomain for ByField {
        crate::forward_paging!(inner);
        fn attach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
        fn detach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
    }

    struct ByMethod(Recorder);
    impl ByMethod {
        fn get(&self) -> &dyn IommuDomain {
            &self.0
        }
        fn get_mut(&mut self) -> &mut dyn IommuDomain {
            &mut self.0
        }
    }
    impl IommuDomain for ByMethod {
        crate::forward_paging!(fn get, get_mut);
        fn attach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
        fn detach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
    }

    /// Every method reaches the inner domain's own implementation (not the
    /// trait's default), through both forms of the macro.
    fn exercise(d: &mut dyn IommuDomain) {
        let mut g = IotlbGather::default();
        d.map(0, 0, 4096, Prot::RW).unwrap();
        d.map_runs(0, &[PhysRun::new(0, 4096)], Prot::RW).unwrap();
        d.unmap(0, 4096, &mut g);
        d.iotlb_sync(&mut g).unwrap();
        d.recover().unwrap();
        d.enforce_cache_coherency();
        assert!(d.dirty_capable());
        d.set_dirty_tracking(true).unwrap();
        let mut seen = std::vec::Vec::new();
        d.read_and_clear_dirty(0, 4096, true, &mut g, &mut |i, l| seen.push((i, l))).unwrap();
        assert_eq!(seen, [(0, 4096)]);
        assert!(d.as_any_mut().is_none());
        assert_eq!(d.page_sizes(), 1 << 12);
        assert_eq!(d.aperture(), IovaRange::new(0, 1 << 20));
        assert_eq!(d.iova_to_phys(5), Some(5));
        assert_eq!(d.iova_to_phys_run(0, 77), Some(PhysRun::new(0, 77)));
        assert_eq!(d.iova_to_phys_runs(0, 99, &mut []), (0, 99));
        assert_eq!(d.granule(), 4096);
    }

    #[test]
    fn forwarding_reaches_every_method() {
        let mut a = ByField { inner: Recorder::default() };
        exercise(&mut a);
        let mut b = ByMethod(Recorder::default());
        exercise(&mut b);
        for r in [&a.inner, &b.0] {
            assert_eq!(
                r.0,
                [
                    "map",
                    "map_runs",
                    "unmap",
                    "iotlb_sync",
                    "recover",
                    "enforce_cache_coherency",
                    "set_dirty_tracking",
                    "read_and_clear_dirty",
                    "as_any_mut"
                ]
            );
            assert_eq!(r.1.load(core::sync::atomic::Ordering::Relaxed), 3 + 100 + 1000 + 10_000 + 100_000);
        }
    }

    /// A domain whose map fails at a chosen IOVA.
    #[derive(Default)]
    struct Flaky {
        mapped: std::vec::Vec<(u64, u64)>,
        fail_at: Option<u64>,
    }

    impl IommuDomain for Flaky {
        fn page_sizes(&self) -> u64 {
            1 << 12
        }
        fn aperture(&self) -> IovaRange {
            IovaRange::new(0, u64::MAX)
        }
        fn map(&mut self, iova: u64, phys: u64, len: u64, _: Prot) -> Result<(), DomainError> {
            if self.fail_at == Some(iova) {
                return Err(DomainError::NoMemory);
            }
            assert_eq!(iova, phys);
            self.mapped.push((iova, len));
            Ok(())
        }
        fn unmap(&mut self, iova: u64, len: u64, _: &mut IotlbGather) -> u64 {
            self.mapped.retain(|m| *m != (iova, len));
            len
        }
        fn iotlb_sync(&mut self, _: &mut IotlbGather) -> Result<(), DomainError> {
            Ok(())
        }
        fn iova_to_phys(&self, iova: u64) -> Option<u64> {
            self.mapped.iter().any(|&(s, l)| (s..s + l).contains(&iova)).then_some(iova)
        }
        fn enforce_cache_coherency(&mut self) -> bool {
            false
        }
        fn attach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
        fn detach_device(&mut self, _: DeviceHandle) -> Result<(), DomainError> {
            Ok(())
        }
    }

    fn as_dyn(d: &mut Flaky) -> &mut dyn IommuDomain {
        d
    }

    #[test]
    fn identity_maps_unwind_on_any_failure() {
        let ranges = [
            (IovaRange::new(0x1000, 0x2fff), Prot::RW),
            (IovaRange::new(0x8100, 0x81ff), Prot::READ),
            (IovaRange::new(0x10_0000, 0x10_0fff), Prot::RW),
        ];
        // Success: whole pages, one-to-one, then the attach runs.
        let mut d = Flaky::default();
        identity_map_then(&mut d, as_dyn, &ranges, |_| Ok(())).unwrap();
        assert_eq!(d.mapped, [(0x1000, 0x2000), (0x8000, 0x1000), (0x10_0000, 0x1000)]);
        // A range already mapped one-to-one stays, and is not undone.
        let mut d = Flaky { mapped: std::vec![(0x8000, 0x1000)], fail_at: None };
        let r = identity_map_then(&mut d, as_dyn, &ranges, |_| Err(DomainError::Incompatible));
        assert_eq!(r, Err(DomainError::Incompatible));
        assert_eq!(d.mapped, [(0x8000, 0x1000)], "the attach failed: only what was there before stays");
        // A map failing part-way: the earlier ranges are removed, `then` never runs.
        let mut d = Flaky { mapped: std::vec::Vec::new(), fail_at: Some(0x10_0000) };
        let r = identity_map_then(&mut d, as_dyn, &ranges, |_| panic!("ran after a failed map"));
        assert_eq!(r, Err(DomainError::NoMemory));
        assert!(d.mapped.is_empty());
        // A range that wraps is refused before anything is mapped.
        let mut d = Flaky::default();
        let wraps = [(IovaRange::new(0x1000, 0xfff), Prot::RW), (IovaRange::new(u64::MAX - 5, u64::MAX), Prot::RW)];
        let r = identity_map_then(&mut d, as_dyn, &wraps, |_| Ok(()));
        assert!(matches!(r, Err(DomainError::BadRange { .. })));
        assert!(d.mapped.is_empty());
    }
}
