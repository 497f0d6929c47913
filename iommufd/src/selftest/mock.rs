//! A software IOMMU domain for tests, with the properties of Linux's
//! selftest mock domain: 2 KiB I/O pages (half the CPU page, so the
//! sub-page paths are exercised), an aperture of `[1 << 24, (1 << 31) - 1]`,
//! and a record of where each map call started and ended so an unmap that
//! cuts through the middle of one is caught.
//!
//! Every 2 KiB I/O page is one `u64` (address plus flag bits) in 512-entry
//! chunks, the way Linux's mock keeps one xarray value per I/O page, so the
//! benchmarks measure iommufd rather than a slow map.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain, IotlbGather, Prot};

/// The mock's I/O page size.
pub const MOCK_IO_PAGE_SIZE: u64 = 2048;
/// First IOVA the mock translates.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// Last IOVA the mock translates.
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;

const CHUNK: usize = 512;
const PRESENT: u64 = 1 << 4;

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
    aperture: Option<(u64, u64)>,
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
        Self { aperture: Some((start, last)), ..Self::default() }
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

    fn check(&self, iova: u64, length: u64) -> Result<u64, DomainError> {
        let bad = DomainError::BadRange { iova, length };
        let last = iova.checked_add(length).and_then(|e| e.checked_sub(1)).ok_or(bad)?;
        if length == 0 || !iova.is_multiple_of(MOCK_IO_PAGE_SIZE) || !length.is_multiple_of(MOCK_IO_PAGE_SIZE) {
            return Err(bad);
        }
        let (start, end) = self.aperture();
        if iova < start || last > end {
            return Err(bad);
        }
        Ok(last)
    }
}

impl IommuDomain for MockDomain {
    fn page_sizes(&self) -> u64 {
        MOCK_IO_PAGE_SIZE
    }

    fn aperture(&self) -> (u64, u64) {
        self.aperture.unwrap_or((MOCK_APERTURE_START, MOCK_APERTURE_LAST))
    }

    fn map(&mut self, iova: u64, phys: u64, length: u64, prot: Prot) -> Result<(), DomainError> {
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
                c[(k % CHUNK as u64) as usize] = e.encode();
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
        if !gather.is_empty() {
            self.syncs += 1;
        }
        *gather = IotlbGather::default();
        Ok(())
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.entry(iova).map(|e| e.phys + iova % MOCK_IO_PAGE_SIZE)
    }

    fn iova_to_phys_run(&self, iova: u64, max_len: u64) -> Option<(u64, u64)> {
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
        Some((first + off, len.min(max_len)))
    }

    fn enforce_cache_coherency(&mut self) -> bool {
        self.coherent = true;
        true
    }

    fn attach_device(&mut self, device: DeviceHandle) -> Result<(), DomainError> {
        self.devices.insert(device);
        Ok(())
    }

    fn detach_device(&mut self, device: DeviceHandle) {
        self.devices.remove(&device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn injected_map_failure_maps_nothing() {
        let mut d = MockDomain::new();
        d.fail_map_at(Some(1));
        assert_eq!(d.map(MOCK_APERTURE_START, 0, 0x800, Prot::READ), Err(DomainError::Injected));
        assert_eq!(d.mapped_pages(), 0);
        d.map(MOCK_APERTURE_START, 0, 0x800, Prot::READ).unwrap();
    }
}
