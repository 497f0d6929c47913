//! A software IOMMU domain for tests, with the properties of Linux's
//! selftest mock domain: 2 KiB I/O pages (half the CPU page, so the
//! sub-page paths are exercised), an aperture of `[1 << 24, (1 << 31) - 1]`,
//! and a record of where each map call started and ended so an unmap that
//! cuts through the middle of one is caught.
//!
//! Every 2 KiB I/O page is one `u64` (address plus flag bits) in 512-entry
//! chunks, the way Linux's mock keeps one xarray value per I/O page, so the
//! benchmarks measure iommufd rather than a slow map.
//!
//! Hardware failures can be injected through [`MockFaults`]: a failing
//! IOTLB invalidation (after which the domain refuses maps with
//! [`DomainError::NeedsRecovery`] until [`IommuDomain::recover`], as a
//! real domain does) and a refused device attach.
//!
//! PASIDs (Linux 6.15's mock `set_dev_pasid`): one table for all mock
//! domains, as the hardware's per-device PASID tables are, says which
//! domain each `(device, PASID)` uses; a domain attach rewrites the
//! entry (a replace needs no detach from the old domain, which the seam
//! never gets told about), a detach clears it when it still names the
//! domain. Every second attach of
//! [`IOMMU_TEST_PASID_RESERVED`](crate::uapi::IOMMU_TEST_PASID_RESERVED)
//! of a device fails with [`DomainError::NoMemory`] (a detach restarts
//! the count), as Linux's mock does to exercise a failed replace.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use portcullis_iommu::{DeviceHandle, DomainError, HwError, IommuDomain, IotlbGather, IovaRange, PhysRun, Prot};

/// The mock's I/O page size.
pub const MOCK_IO_PAGE_SIZE: u64 = 2048;
/// First IOVA the mock translates.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// Last IOVA the mock translates.
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;

const CHUNK: usize = 512;
const PRESENT: u64 = 1 << 4;
/// A device wrote the I/O page since its dirty bit was last cleared.
const DIRTY: u64 = 1 << 5;
/// The entry belongs to a 1 MiB I/O page (`MOCK_FLAGS_DEVICE_HUGE_IOVA`).
const HUGE: u64 = 1 << 6;
/// The mock's huge I/O page: 512 of its 2 KiB pages (Linux's
/// `MOCK_HUGE_PAGE_SIZE`).
pub const MOCK_HUGE_PAGE_SIZE: u64 = 512 * MOCK_IO_PAGE_SIZE;

/// The register base the mock's hardware errors name.
pub const MOCK_UNIT: u64 = 0xfeed_0000;

/// Which mock domain each `(device, PASID)` uses, by [`DomainSerial`],
/// and the devices whose next attach of the reserved PASID fails.
#[derive(Default)]
struct PasidTable {
    entries: BTreeMap<(DeviceHandle, u32), u64>,
    reserved_armed: BTreeSet<DeviceHandle>,
}

static PASID_TABLE: spin::Mutex<PasidTable> =
    spin::Mutex::new(PasidTable { entries: BTreeMap::new(), reserved_armed: BTreeSet::new() });

static NEXT_DOMAIN_SERIAL: AtomicU64 = AtomicU64::new(1);

/// A mock domain's identity in the PASID table, unique for the process.
#[derive(Debug)]
struct DomainSerial(u64);

impl Default for DomainSerial {
    fn default() -> Self {
        Self(NEXT_DOMAIN_SERIAL.fetch_add(1, Ordering::Relaxed))
    }
}

/// Points `(device, pasid)` at domain `serial` (the PASID table write of
/// an attach or replace), with the reserved PASID's alternating failure.
fn pasid_table_attach(serial: u64, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
    let mut t = PASID_TABLE.lock();
    if pasid == crate::uapi::IOMMU_TEST_PASID_RESERVED && !t.reserved_armed.insert(device) {
        t.reserved_armed.remove(&device);
        return Err(DomainError::NoMemory);
    }
    t.entries.insert((device, pasid), serial);
    Ok(())
}

/// Blocks `(device, pasid)` if it still uses domain `serial`.
fn pasid_table_detach(serial: u64, device: DeviceHandle, pasid: u32) {
    let mut t = PASID_TABLE.lock();
    if pasid == crate::uapi::IOMMU_TEST_PASID_RESERVED {
        t.reserved_armed.remove(&device);
    }
    if t.entries.get(&(device, pasid)) == Some(&serial) {
        t.entries.remove(&(device, pasid));
    }
}

/// Whether `(device, pasid)` uses domain `serial`.
fn pasid_table_has(serial: u64, device: DeviceHandle, pasid: u32) -> bool {
    PASID_TABLE.lock().entries.get(&(device, pasid)) == Some(&serial)
}

/// Hardware failure switches for mock domains. A test keeps an `Arc` of
/// them because a domain inside a HWPT is reachable only through the
/// `IommuDomain` trait; every domain made with the same switches (see
/// [`MockDomain::with_faults`], `MockDevice::with_faults`) shares them,
/// and the sync count is over all of them.
#[derive(Debug, Default)]
pub struct MockFaults {
    /// Invalidating syncs since [`Self::fail_sync_at`] (only counted while
    /// armed).
    syncs: AtomicU64,
    /// The sync that fails (1-based); 0 when disarmed.
    fail_sync_at: AtomicU64,
    /// The failure is a timed-out wait (ETIMEDOUT) rather than a queue
    /// error (EIO).
    timeout: AtomicBool,
    /// Attaches are refused while set.
    refuse_attach: AtomicBool,
    /// Detaches fail while set (the unit cannot block the device).
    refuse_detach: AtomicBool,
}

impl MockFaults {
    /// New switches, all off.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes the `n`th invalidating `iotlb_sync` from now (1-based; syncs
    /// of an empty gather do not count) fail; `None` disarms. `timeout`
    /// picks a timed-out wait over an invalidation queue error.
    pub fn fail_sync_at(&self, n: Option<u64>, timeout: bool) {
        self.syncs.store(0, Ordering::SeqCst);
        self.timeout.store(timeout, Ordering::SeqCst);
        self.fail_sync_at.store(n.unwrap_or(0), Ordering::SeqCst);
    }

    /// Invalidating syncs since arming.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Makes `attach_device` fail with a hardware error while `on`.
    pub fn refuse_attach(&self, on: bool) {
        self.refuse_attach.store(on, Ordering::SeqCst);
    }

    /// Makes `detach_device` fail with a hardware error while `on` (the
    /// device stays attached, as when a unit stops answering).
    pub fn refuse_detach(&self, on: bool) {
        self.refuse_detach.store(on, Ordering::SeqCst);
    }

    /// One invalidating sync: its injected failure, if this is the one.
    fn sync(&self) -> Result<(), DomainError> {
        let at = self.fail_sync_at.load(Ordering::SeqCst);
        if at == 0 {
            return Ok(());
        }
        if self.syncs.fetch_add(1, Ordering::SeqCst) + 1 != at {
            return Ok(());
        }
        let cause = if self.timeout.load(Ordering::SeqCst) {
            HwError::Timeout { register: "mock invalidation wait", waited_ns: 1_000_000 }
        } else {
            HwError::QueueError { status: 0x10 }
        };
        Err(DomainError::Hardware { unit: MOCK_UNIT, cause })
    }
}

/// One mapped I/O page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockEntry {
    /// Physical address of the I/O page.
    pub phys: u64,
    /// Permissions.
    pub prot: Prot,
    /// First page of a `map` call.
    pub start: bool,
    /// Last page of a `map` call.
    pub last: bool,
}

/// The mock domain.
#[derive(Debug, Default)]
pub struct MockDomain {
    /// I/O page number / 512 -> entries; see [`MockEntry::encode`].
    chunks: BTreeMap<u64, Box<[u64; CHUNK]>>,
    mapped: usize,
    devices: BTreeSet<DeviceHandle>,
    /// IOTLB syncs issued (one per unmap batch, checked by tests).
    pub syncs: u64,
    /// Map calls so far, and the call number that must fail (fault injection).
    map_calls: u64,
    fail_map_at: Option<u64>,
    /// Set when an unmap did not line up with map boundaries: a caller bug.
    pub misaligned_unmaps: u64,
    coherent: bool,
    aperture: Option<IovaRange>,
    /// Injected hardware failures.
    faults: Arc<MockFaults>,
    /// An invalidation failed: maps are refused until `recover`.
    needs_recovery: bool,
    /// Made with dirty tracking (Linux's mock gets its dirty ops then).
    dirty_ops: bool,
    /// Dirty tracking is on.
    tracking: bool,
    /// Its identity in the mock's PASID table.
    serial: DomainSerial,
    /// Maps 1 MiB I/O pages where IOVA, physical address and length allow
    /// (a device with `MOCK_FLAGS_DEVICE_HUGE_IOVA`, Linux 6.13; in
    /// Debian's 6.12.95 selftest).
    huge_iova: bool,
}

/// [`HUGE`] when I/O page `k` of a map of pages `[first, end)` falls in a
/// 1 MiB page the map covers whole with a 1 MiB aligned physical address
/// (`phys` is page `k`'s); else 0. Both page numbers of a 1 MiB page
/// share their alignment, so its head's physical address is aligned
/// when `phys - (k - head) pages` is.
fn huge_at(k: u64, phys: u64, first: u64, end: u64) -> u64 {
    let head = k / CHUNK as u64 * CHUNK as u64;
    if head < first || head + CHUNK as u64 > end {
        return 0;
    }
    // No underflow: the head is in the map, so at most k - first pages
    // before page k, whose address is the map's start plus that many.
    let head_phys = phys - (k - head) * MOCK_IO_PAGE_SIZE;
    if head_phys.is_multiple_of(MOCK_HUGE_PAGE_SIZE) { HUGE } else { 0 }
}

impl MockEntry {
    /// `phys` is 2 KiB aligned, so the low bits carry the rest.
    fn encode(self) -> u64 {
        self.phys | self.prot.bits() as u64 & 3 | (self.start as u64) << 2 | (self.last as u64) << 3 | PRESENT
    }
    fn decode(v: u64) -> Option<MockEntry> {
        (v & PRESENT != 0).then_some(MockEntry {
            phys: v & !(MOCK_IO_PAGE_SIZE - 1),
            prot: if v & 3 == 3 {
                Prot::RW
            } else if v & 2 != 0 {
                Prot::WRITE
            } else if v & 1 != 0 {
                Prot::READ
            } else {
                Prot::NONE
            },
            start: v & 4 != 0,
            last: v & 8 != 0,
        })
    }
}

impl MockDomain {
    fn get(&self, page: u64) -> Option<MockEntry> {
        let c = self.chunks.get(&(page / CHUNK as u64))?;
        MockEntry::decode(c[(page % CHUNK as u64) as usize])
    }

    /// An empty mock domain.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty mock domain with another aperture (benchmarks of sizes
    /// beyond the Linux mock's 2 GiB).
    pub fn with_aperture(start: u64, last: u64) -> Self {
        Self { aperture: Some(IovaRange::new(start, last)), ..Self::default() }
    }

    /// An empty mock domain whose hardware failures `faults` injects.
    pub fn with_faults(faults: Arc<MockFaults>) -> Self {
        Self { faults, ..Self::default() }
    }

    /// An empty mock domain that can track dirty pages.
    pub fn with_dirty_tracking(faults: Arc<MockFaults>) -> Self {
        Self { faults, dirty_ops: true, ..Self::default() }
    }

    /// This domain with 1 MiB I/O pages as well (see `huge_iova`): as in
    /// Linux's mock, a map uses a 1 MiB page wherever the IOVA and the
    /// physical address are both 1 MiB aligned and 1 MiB of the map is
    /// left, and dirty tracking reads and clears such a page as a whole.
    pub fn with_huge_iova(mut self) -> Self {
        self.huge_iova = true;
        self
    }

    /// Whether dirty tracking is on.
    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// `IOMMU_TEST_OP_DIRTY` for one I/O page: marks the page at `iova`
    /// written, as a device's write would; false when nothing is mapped
    /// there.
    pub fn mark_dirty(&mut self, iova: u64) -> bool {
        let page = iova / MOCK_IO_PAGE_SIZE;
        let Some(c) = self.chunks.get_mut(&(page / CHUNK as u64)) else { return false };
        let slot = &mut c[(page % CHUNK as u64) as usize];
        if *slot & PRESENT == 0 {
            return false;
        }
        *slot |= DIRTY;
        true
    }

    /// Its failure switches.
    pub fn faults(&self) -> &Arc<MockFaults> {
        &self.faults
    }

    /// Makes the `n`th invalidating sync from now fail with an
    /// invalidation queue error; `None` disarms (see
    /// [`MockFaults::fail_sync_at`]).
    pub fn fail_sync_at(&mut self, n: Option<u64>) {
        self.faults.fail_sync_at(n, false);
    }

    /// Whether an invalidation failed and no `recover` succeeded since.
    pub fn needs_recovery(&self) -> bool {
        self.needs_recovery
    }

    /// The entry for the I/O page containing `iova`.
    pub fn entry(&self, iova: u64) -> Option<MockEntry> {
        self.get(iova / MOCK_IO_PAGE_SIZE)
    }

    /// Number of mapped I/O pages.
    pub fn mapped_pages(&self) -> usize {
        self.mapped
    }

    /// All entries, for state comparisons in fault-injection sweeps.
    pub fn snapshot(&self) -> BTreeMap<u64, MockEntry> {
        self.chunks
            .iter()
            .flat_map(|(&ci, c)| {
                c.iter()
                    .enumerate()
                    .filter_map(move |(k, &v)| MockEntry::decode(v).map(|e| (ci * CHUNK as u64 + k as u64, e)))
            })
            .collect()
    }

    /// Makes the `n`th `map` call from now fail (1-based); `None` disables.
    pub fn fail_map_at(&mut self, n: Option<u64>) {
        self.fail_map_at = n.map(|n| self.map_calls + n);
    }

    /// Attached devices.
    pub fn devices(&self) -> impl Iterator<Item = DeviceHandle> + '_ {
        self.devices.iter().copied()
    }

    /// Whether PASID `pasid` of `device` uses this domain.
    pub fn has_pasid(&self, device: DeviceHandle, pasid: u32) -> bool {
        pasid_table_has(self.serial.0, device, pasid)
    }

    fn check(&self, iova: u64, length: u64) -> Result<u64, DomainError> {
        let bad = DomainError::BadRange { iova, length };
        let last = iova.checked_add(length).and_then(|e| e.checked_sub(1)).ok_or(bad)?;
        if length == 0 || !iova.is_multiple_of(MOCK_IO_PAGE_SIZE) || !length.is_multiple_of(MOCK_IO_PAGE_SIZE) {
            return Err(bad);
        }
        let aperture = self.aperture();
        if iova < aperture.start || last > aperture.last {
            return Err(bad);
        }
        Ok(last)
    }
}

impl IommuDomain for MockDomain {
    fn page_sizes(&self) -> u64 {
        if self.huge_iova { MOCK_IO_PAGE_SIZE | MOCK_HUGE_PAGE_SIZE } else { MOCK_IO_PAGE_SIZE }
    }

    fn aperture(&self) -> IovaRange {
        self.aperture.unwrap_or(IovaRange::new(MOCK_APERTURE_START, MOCK_APERTURE_LAST))
    }

    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
        if self.needs_recovery {
            return Err(DomainError::NeedsRecovery);
        }
        self.map_calls += 1;
        if self.fail_map_at == Some(self.map_calls) {
            return Err(DomainError::Injected);
        }
        self.check(iova, length)?;
        if !phys.is_multiple_of(MOCK_IO_PAGE_SIZE) {
            return Err(DomainError::BadRange { iova, length });
        }
        let first = iova / MOCK_IO_PAGE_SIZE;
        let n = length / MOCK_IO_PAGE_SIZE;
        let end = first + n;
        // A chunk at a time: refuse if anything is mapped, then write.
        let (c0, c1) = (first / CHUNK as u64, (end - 1) / CHUNK as u64);
        for (&ci, c) in self.chunks.range(c0..=c1) {
            let lo = (ci * CHUNK as u64).max(first);
            let hi = (ci * CHUNK as u64 + CHUNK as u64).min(end);
            let base = ci * CHUNK as u64;
            if let Some(k) = (lo..hi).find(|&k| c[(k - base) as usize] & PRESENT != 0) {
                return Err(DomainError::AlreadyMapped { iova: k * MOCK_IO_PAGE_SIZE });
            }
        }
        let mut page = first;
        while page < end {
            let ci = page / CHUNK as u64;
            let hi = ((ci + 1) * CHUNK as u64).min(end);
            let c = self.chunks.entry(ci).or_insert_with(|| Box::new([0; CHUNK]));
            for k in page..hi {
                let i = k - first;
                let e = MockEntry { phys: phys + i * MOCK_IO_PAGE_SIZE, prot, start: i == 0, last: i == n - 1 };
                c[(k % CHUNK as u64) as usize] =
                    e.encode() | if self.huge_iova { huge_at(k, e.phys, first, end) } else { 0 };
            }
            page = hi;
        }
        self.mapped += n as usize;
        Ok(())
    }

    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        let Ok(last) = self.check(iova, length) else { return 0 };
        let first = iova / MOCK_IO_PAGE_SIZE;
        let end = first + length / MOCK_IO_PAGE_SIZE;
        let (c0, c1) = (first / CHUNK as u64, (end - 1) / CHUNK as u64);
        let (mut lo, mut hi, mut count) = (None, 0u64, 0u64);
        for (&ci, c) in self.chunks.range_mut(c0..=c1) {
            let base = ci * CHUNK as u64;
            let (a, b) = (base.max(first), (base + CHUNK as u64).min(end));
            for slot in &mut c[(a - base) as usize..(b - base) as usize] {
                if *slot & PRESENT != 0 {
                    lo.get_or_insert(*slot);
                    hi = *slot;
                    count += 1;
                    *slot = 0;
                }
            }
        }
        self.mapped -= count as usize;
        if let Some(lo) = lo {
            let (lo, hi) = (MockEntry::decode(lo).expect("present"), MockEntry::decode(hi).expect("present"));
            if !lo.start || !hi.last {
                self.misaligned_unmaps += 1;
            }
            gather.add(iova, last);
        }
        count * MOCK_IO_PAGE_SIZE
    }

    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        if gather.is_empty() {
            return Ok(());
        }
        *gather = IotlbGather::default();
        self.syncs += 1;
        let r = self.faults.sync();
        self.needs_recovery |= r.is_err();
        r
    }

    /// A recovery is one whole-domain invalidation: it can fail as a sync
    /// does (the injected failure counts it as a sync).
    fn recover(&mut self) -> Result<(), DomainError> {
        if self.needs_recovery {
            self.faults.sync()?;
            self.needs_recovery = false;
        }
        Ok(())
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.entry(iova).map(|e| e.phys + iova % MOCK_IO_PAGE_SIZE)
    }

    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        if max_len == 0 {
            return None;
        }
        let page = iova / MOCK_IO_PAGE_SIZE;
        let off = iova % MOCK_IO_PAGE_SIZE;
        let first = self.get(page)?.phys;
        let mut len = MOCK_IO_PAGE_SIZE - off;
        // Further pages while they continue the run, a chunk at a time.
        let mut p = page + 1;
        'chunks: while len < max_len {
            let Some(c) = self.chunks.get(&(p / CHUNK as u64)) else { break };
            for v in &c[(p % CHUNK as u64) as usize..] {
                if len >= max_len
                    || *v & PRESENT == 0
                    || *v & !(MOCK_IO_PAGE_SIZE - 1) != first + (p - page) * MOCK_IO_PAGE_SIZE
                {
                    break 'chunks;
                }
                len += MOCK_IO_PAGE_SIZE;
                p += 1;
            }
        }
        Some(PhysRun::new(first + off, len.min(max_len)))
    }

    fn enforce_cache_coherency(&mut self) -> bool {
        self.coherent = true;
        true
    }

    fn dirty_capable(&self) -> bool {
        self.dirty_ops
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }

    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        if !self.dirty_ops {
            return Err(DomainError::NotSupported);
        }
        self.tracking = enable;
        Ok(())
    }

    /// Reports the dirty I/O pages of the range, one 2 KiB page at a time,
    /// clearing their bits when asked; refused while tracking is off.
    fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DomainError> {
        if !self.dirty_ops {
            return Err(DomainError::NotSupported);
        }
        if !self.tracking {
            return Err(DomainError::BadRange { iova, length });
        }
        if length == 0 {
            return Ok(());
        }
        let first = iova / MOCK_IO_PAGE_SIZE;
        let last = iova.saturating_add(length - 1) / MOCK_IO_PAGE_SIZE;
        let (c0, c1) = (first / CHUNK as u64, last / CHUNK as u64);
        for (&ci, c) in self.chunks.range_mut(c0..=c1) {
            let base = ci * CHUNK as u64;
            let (a, b) = (base.max(first), (base + CHUNK as u64 - 1).min(last));
            let mut page = a;
            while page <= b {
                let slot = c[(page - base) as usize];
                if slot & (PRESENT | HUGE) == PRESENT | HUGE {
                    // A 1 MiB page: dirty if any of its 2 KiB entries is,
                    // reported from `page` for 1 MiB as Linux's mock does.
                    // Its entries lie in this chunk (both 512 aligned).
                    let head = page / CHUNK as u64 * CHUNK as u64;
                    let block = &mut c[(head - base) as usize..(head - base) as usize + CHUNK];
                    if block.iter().any(|v| v & (PRESENT | DIRTY) == PRESENT | DIRTY) {
                        let at = page * MOCK_IO_PAGE_SIZE;
                        record(at, MOCK_HUGE_PAGE_SIZE);
                        if clear {
                            block.iter_mut().for_each(|v| *v &= !DIRTY);
                            let h = head * MOCK_IO_PAGE_SIZE;
                            gather.add(h, h + MOCK_HUGE_PAGE_SIZE - 1);
                        }
                    }
                    page += CHUNK as u64;
                    continue;
                }
                if slot & (PRESENT | DIRTY) == PRESENT | DIRTY {
                    let at = page * MOCK_IO_PAGE_SIZE;
                    record(at, MOCK_IO_PAGE_SIZE);
                    if clear {
                        c[(page - base) as usize] &= !DIRTY;
                        gather.add(at, at + MOCK_IO_PAGE_SIZE - 1);
                    }
                }
                page += 1;
            }
        }
        Ok(())
    }

    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        if self.faults.refuse_attach.load(Ordering::SeqCst) {
            return Err(DomainError::Hardware { unit: MOCK_UNIT, cause: HwError::QueueError { status: 0x20 } });
        }
        self.devices.insert(device);
        Ok(())
    }

    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        if self.faults.refuse_detach.load(Ordering::SeqCst) {
            return Err(DomainError::Hardware {
                unit: MOCK_UNIT,
                cause: HwError::Timeout { register: "mock context invalidation", waited_ns: 1_000_000 },
            });
        }
        self.devices.remove(&device);
        Ok(())
    }

    /// Points the PASID at this domain; the attach switch of
    /// [`MockFaults`] refuses it as it refuses a device attach.
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        if self.faults.refuse_attach.load(Ordering::SeqCst) {
            return Err(DomainError::Hardware { unit: MOCK_UNIT, cause: HwError::QueueError { status: 0x20 } });
        }
        pasid_table_attach(self.serial.0, device, pasid)
    }

    /// Blocks the PASID; the detach switch of [`MockFaults`] makes it
    /// fail, leaving the PASID on this domain.
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        if self.faults.refuse_detach.load(Ordering::SeqCst) {
            return Err(DomainError::Hardware {
                unit: MOCK_UNIT,
                cause: HwError::Timeout { register: "mock PASID entry invalidation", waited_ns: 1_000_000 },
            });
        }
        pasid_table_detach(self.serial.0, device, pasid);
        Ok(())
    }
}

/// The mock nested domain (the selftest's `IOMMU_HWPT_DATA_SELFTEST`): no
/// stage-1 table, only a pretend IOTLB of
/// [`MOCK_NESTED_DOMAIN_IOTLB_NUM`](crate::uapi::MOCK_NESTED_DOMAIN_IOTLB_NUM)
/// entries, each starting at the allocation's `iotlb` value and cleared
/// by `IOMMU_HWPT_INVALIDATE` requests, which `IOMMU_TEST_OP_MD_CHECK_IOTLB`
/// reads back. Attaching any device, or any PASID, works (but for the
/// reserved PASID's alternating failure, see the module docs).
#[derive(Debug)]
pub struct MockNestedDomain {
    /// The IOTLB entries.
    pub iotlb: [u32; crate::uapi::MOCK_NESTED_DOMAIN_IOTLB_NUM as usize],
    devices: BTreeSet<DeviceHandle>,
    serial: DomainSerial,
}

impl MockNestedDomain {
    /// A nested domain on `parent` from the caller's data: the parent
    /// must be a mock domain (`EINVAL`); the data of type
    /// `IOMMU_HWPT_DATA_SELFTEST` (`EOPNOTSUPP`), exactly one
    /// `struct iommu_hwpt_selftest` long (`EINVAL`) and readable
    /// (`EFAULT`).
    pub fn alloc(
        parent: &mut dyn IommuDomain,
        data: &crate::ctx::UserData<'_>,
    ) -> crate::errno::Result<Box<dyn crate::ctx::NestedDomain>> {
        Self::alloc_with_flags(parent, 0, data)
    }

    /// [`Self::alloc`] with the driver's HWPT_ALLOC `flags`: only
    /// `IOMMU_HWPT_ALLOC_PASID` is known (`EOPNOTSUPP` for others, as Linux
    /// 6.15's mock).
    pub fn alloc_with_flags(
        parent: &mut dyn IommuDomain,
        flags: u32,
        data: &crate::ctx::UserData<'_>,
    ) -> crate::errno::Result<Box<dyn crate::ctx::NestedDomain>> {
        use crate::errno::Errno;
        use crate::uapi::{IOMMU_HWPT_ALLOC_PASID, IOMMU_HWPT_DATA_SELFTEST, IommuHwptSelftest};
        if flags & !IOMMU_HWPT_ALLOC_PASID != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if !parent.as_any_mut().is_some_and(|a| a.is::<MockDomain>()) {
            return Err(Errno::EINVAL);
        }
        if data.data_type != IOMMU_HWPT_DATA_SELFTEST {
            return Err(Errno::EOPNOTSUPP);
        }
        let mut raw = [0u8; IommuHwptSelftest::SIZE];
        data.copy_struct(IOMMU_HWPT_DATA_SELFTEST, &mut raw, IommuHwptSelftest::SIZE)?;
        let cfg = IommuHwptSelftest::read(&raw);
        Ok(Box::new(MockNestedDomain {
            iotlb: [cfg.iotlb; 4],
            devices: BTreeSet::new(),
            serial: DomainSerial::default(),
        }))
    }

    /// Whether PASID `pasid` of `device` uses this domain.
    pub fn has_pasid(&self, device: DeviceHandle, pasid: u32) -> bool {
        pasid_table_has(self.serial.0, device, pasid)
    }
}

impl crate::ctx::NestedDomain for MockNestedDomain {
    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.devices.insert(device);
        Ok(())
    }
    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.devices.remove(&device);
        Ok(())
    }
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        pasid_table_attach(self.serial.0, device, pasid)
    }
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        pasid_table_detach(self.serial.0, device, pasid);
        Ok(())
    }
    fn cache_invalidate_user(&mut self, array: &mut crate::ctx::UserDataArray<'_>) -> crate::errno::Result<()> {
        use crate::errno::Errno;
        use crate::uapi::{
            IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, IOMMU_TEST_INVALIDATE_FLAG_ALL, IommuHwptInvalidateSelftest,
            MOCK_NESTED_DOMAIN_IOTLB_ID_MAX,
        };
        let mut done = 0;
        let r = (|| {
            if array.data_type != IOMMU_HWPT_INVALIDATE_DATA_SELFTEST {
                return Err(Errno::EINVAL);
            }
            for i in 0..array.entry_num {
                let mut raw = [0u8; IommuHwptInvalidateSelftest::SIZE];
                array.copy_entry(
                    IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
                    i,
                    &mut raw,
                    IommuHwptInvalidateSelftest::SIZE,
                )?;
                let inv = IommuHwptInvalidateSelftest::read(&raw);
                if inv.flags & !IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    return Err(Errno::EOPNOTSUPP);
                }
                if inv.iotlb_id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX {
                    return Err(Errno::EINVAL);
                }
                if inv.flags & IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    self.iotlb = [0; 4];
                } else {
                    self.iotlb[inv.iotlb_id as usize] = 0;
                }
                done += 1;
            }
            Ok(())
        })();
        array.entry_num = done;
        r
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        Some(self)
    }
}

/// Any domain made usable through the concurrent path (`*_shared`) by one
/// lock around it: each shared call takes the lock and makes the
/// domain's own call. A mock wrapped in it sends the IOAS through its
/// fills and unloads outside the IOAS lock (reserve, fill, finish; the
/// one-pass unmap excepted), so the tests that drive mocks (the model
/// test, the fault sweeps) cover those interleavings as well as the
/// locked path.
pub struct LockedDomain(spin::Mutex<Box<dyn IommuDomain>>);

impl LockedDomain {
    /// `inner` behind a lock.
    pub fn new(inner: Box<dyn IommuDomain>) -> Self {
        Self(spin::Mutex::new(inner))
    }
}

impl core::fmt::Debug for LockedDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LockedDomain")
    }
}

impl IommuDomain for LockedDomain {
    fn page_sizes(&self) -> u64 {
        self.0.lock().page_sizes()
    }
    fn aperture(&self) -> IovaRange {
        self.0.lock().aperture()
    }
    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
        self.0.get_mut().map(iova, phys, length, prot)
    }
    fn map_runs(&mut self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        self.0.get_mut().map_runs(iova, runs, prot)
    }
    fn unmap(&mut self, iova: u64, length: u64, gather: &mut IotlbGather) -> u64 {
        self.0.get_mut().unmap(iova, length, gather)
    }
    fn supports_shared(&self) -> bool {
        true
    }
    fn map_shared(&self, iova: u64, runs: &[PhysRun], prot: Prot) -> Result<(), DomainError> {
        self.0.lock().map_runs(iova, runs, prot)
    }
    fn unmap_shared(&self, iova: u64, length: u64, gather: &mut IotlbGather) -> Result<u64, DomainError> {
        Ok(self.0.lock().unmap(iova, length, gather))
    }
    /// The one-pass unmap as a read-back and an unmap under one hold of
    /// the lock (what the caller sees is the same: the runs the removed
    /// translations pointed at, joined, in IOVA order).
    fn unmap_shared_collect(
        &self,
        iova: u64,
        length: u64,
        gather: &mut IotlbGather,
        out: &mut alloc::vec::Vec<PhysRun>,
    ) -> Result<u64, DomainError> {
        let mut d = self.0.lock();
        let end = iova.checked_add(length).ok_or(DomainError::BadRange { iova, length })?;
        let granule = d.granule();
        let mut buf = [PhysRun::default(); 64];
        let mut at = iova;
        while at < end {
            let (n, done) = d.iova_to_phys_runs(at, end - at, &mut buf);
            for &run in &buf[..n] {
                crate::memsrc::push_run(out, run);
            }
            // A hole: nothing to collect for its first page.
            at += if done == 0 { granule } else { done };
        }
        Ok(d.unmap(iova, length, gather))
    }
    fn iotlb_sync_shared(&self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        self.0.lock().iotlb_sync(gather)
    }
    fn iotlb_sync(&mut self, gather: &mut IotlbGather) -> Result<(), DomainError> {
        self.0.get_mut().iotlb_sync(gather)
    }
    fn recover(&mut self) -> Result<(), DomainError> {
        self.0.get_mut().recover()
    }
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.0.lock().iova_to_phys(iova)
    }
    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<PhysRun> {
        self.0.lock().iova_to_phys_run(iova, max_len)
    }
    fn iova_to_phys_runs(&self, iova: u64, length: u64, out: &mut [PhysRun]) -> (usize, u64) {
        self.0.lock().iova_to_phys_runs(iova, length, out)
    }
    fn granule(&self) -> u64 {
        self.0.lock().granule()
    }
    fn enforce_cache_coherency(&mut self) -> bool {
        self.0.get_mut().enforce_cache_coherency()
    }
    fn dirty_capable(&self) -> bool {
        self.0.lock().dirty_capable()
    }
    fn set_dirty_tracking(&mut self, enable: bool) -> Result<(), DomainError> {
        self.0.get_mut().set_dirty_tracking(enable)
    }
    fn read_and_clear_dirty(
        &mut self,
        iova: u64,
        length: u64,
        clear: bool,
        gather: &mut IotlbGather,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<(), DomainError> {
        self.0.get_mut().read_and_clear_dirty(iova, length, clear, gather, record)
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn core::any::Any> {
        self.0.get_mut().as_any_mut()
    }
    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.0.get_mut().attach_device(device)
    }
    fn detach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.0.get_mut().detach_device(device)
    }
    fn attach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        self.0.get_mut().attach_device_pasid(device, pasid)
    }
    fn detach_device_pasid(&mut self, device: DeviceHandle, pasid: u32) -> Result<(), DomainError> {
        self.0.get_mut().detach_device_pasid(device, pasid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_iova_pages_are_dirty_as_a_whole() {
        let mut d = MockDomain::with_dirty_tracking(MockFaults::new()).with_huge_iova();
        assert_eq!(d.page_sizes(), MOCK_IO_PAGE_SIZE | MOCK_HUGE_PAGE_SIZE);
        d.set_dirty_tracking(true).unwrap();
        let base = MOCK_APERTURE_START; // 16 MiB: 1 MiB aligned
        // 1 MiB aligned IOVA and phys, 2 MiB long: two 1 MiB pages; then a
        // map whose phys is not aligned: 2 KiB pages only.
        d.map(base, 0x4000_0000, 2 * MOCK_HUGE_PAGE_SIZE, Prot::RW).unwrap();
        d.map(base + 0x40_0000, 0x5000_0800, MOCK_HUGE_PAGE_SIZE, Prot::RW).unwrap();
        assert!(d.mark_dirty(base + 0x1800));
        assert!(d.mark_dirty(base + 0x40_1000));
        let mut g = IotlbGather::default();
        let mut seen = Vec::new();
        d.read_and_clear_dirty(base, 0x80_0000, false, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
        assert_eq!(seen, [(base, MOCK_HUGE_PAGE_SIZE), (base + 0x40_1000, MOCK_IO_PAGE_SIZE)]);
        seen.clear();
        d.read_and_clear_dirty(base, 0x80_0000, true, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
        assert_eq!(seen.len(), 2, "no-clear left them dirty");
        seen.clear();
        d.read_and_clear_dirty(base, 0x80_0000, true, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
        assert!(seen.is_empty(), "cleared as a whole");
        // Without the flag the same map is 2 KiB granular.
        let mut plain = MockDomain::with_dirty_tracking(MockFaults::new());
        plain.set_dirty_tracking(true).unwrap();
        plain.map(base, 0x4000_0000, MOCK_HUGE_PAGE_SIZE, Prot::RW).unwrap();
        assert!(plain.mark_dirty(base + 0x1800));
        plain.read_and_clear_dirty(base, MOCK_HUGE_PAGE_SIZE, true, &mut g, &mut |a, l| seen.push((a, l))).unwrap();
        assert_eq!(seen, [(base + 0x1800, MOCK_IO_PAGE_SIZE)]);
    }

    #[test]
    fn maps_2k_pages_inside_the_aperture_only() {
        let mut d = MockDomain::new();
        let base = MOCK_APERTURE_START;
        d.map(base, 0x10_0000, 0x1800, Prot::RW).unwrap();
        assert_eq!(d.mapped_pages(), 3);
        assert_eq!(d.iova_to_phys(base + 0x1001), Some(0x10_1001));
        assert!(d.entry(base).unwrap().start && d.entry(base + 0x1000).unwrap().last);
        assert_eq!(d.map(base + 0x800, 0, 0x800, Prot::READ), Err(DomainError::AlreadyMapped { iova: base + 0x800 }));
        assert!(d.map(0, 0, 0x800, Prot::READ).is_err());
        assert!(d.map(MOCK_APERTURE_LAST - 0x7ff, 0, 0x1000, Prot::READ).is_err());
        let mut g = IotlbGather::default();
        assert_eq!(d.unmap(base, 0x1800, &mut g), 0x1800);
        assert_eq!(d.misaligned_unmaps, 0);
        d.iotlb_sync(&mut g).unwrap();
        assert_eq!(d.syncs, 1);
        assert_eq!(d.mapped_pages(), 0);
    }

    #[test]
    fn a_failed_sync_refuses_maps_until_recovered() {
        let mut d = MockDomain::new();
        let base = MOCK_APERTURE_START;
        d.map(base, 0x10_0000, 0x1000, Prot::RW).unwrap();
        d.fail_sync_at(Some(2));
        let mut g = IotlbGather::default();
        d.iotlb_sync(&mut g).unwrap(); // an empty gather does not count
        d.unmap(base, 0x800, &mut g);
        d.iotlb_sync(&mut g).unwrap();
        d.unmap(base + 0x800, 0x800, &mut g);
        let e = d.iotlb_sync(&mut g).unwrap_err();
        assert!(matches!(e, DomainError::Hardware { unit: MOCK_UNIT, cause: HwError::QueueError { .. } }), "{e:?}");
        assert!(g.is_empty() && d.needs_recovery());
        assert_eq!(d.map(base, 0x10_0000, 0x800, Prot::RW), Err(DomainError::NeedsRecovery));
        assert_eq!(d.mapped_pages(), 0);
        d.recover().unwrap();
        d.map(base, 0x10_0000, 0x800, Prot::RW).unwrap();
        // Shared switches: a timeout, and a refused attach.
        let f = MockFaults::new();
        let mut d = MockDomain::with_faults(f.clone());
        f.fail_sync_at(Some(1), true);
        d.map(base, 0, 0x800, Prot::READ).unwrap();
        d.unmap(base, 0x800, &mut g);
        let e = d.iotlb_sync(&mut g).unwrap_err();
        assert!(matches!(e, DomainError::Hardware { cause: HwError::Timeout { .. }, .. }), "{e:?}");
        assert_eq!(f.syncs(), 1);
        f.refuse_attach(true);
        assert!(d.attach_device(DeviceHandle::Opaque(1)).is_err());
        f.refuse_attach(false);
        d.attach_device(DeviceHandle::Opaque(1)).unwrap();
    }

    #[test]
    fn injected_map_failure_maps_nothing() {
        let mut d = MockDomain::new();
        d.fail_map_at(Some(1));
        assert_eq!(d.map(MOCK_APERTURE_START, 0, 0x800, Prot::READ), Err(DomainError::Injected));
        assert_eq!(d.mapped_pages(), 0);
        d.map(MOCK_APERTURE_START, 0, 0x800, Prot::READ).unwrap();
    }
}
