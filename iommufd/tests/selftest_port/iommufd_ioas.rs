//! Fixture `iommufd_ioas`: one IOAS, with 0, 1 or 2 mock domains attached
//! (variants `no_domain`, `mock_domain`, `two_mock_domain`,
//! `mock_domain_limit`). Each test is a function over the fixture; the
//! modules at the end instantiate it per variant, so a case is named
//! `iommufd_ioas::<variant>::<test>` as in Linux's
//! `iommufd_ioas.<variant>.<test>`.

use super::harness::*;
use iommufd::Errno;
use iommufd::uapi::*;
use std::ops::Deref;

#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub mock_domains: u32,
    /// Temporary memory limit for the PFN batch (0: the default).
    pub memory_limit: u32,
}

pub const NO_DOMAIN: Variant = Variant { mock_domains: 0, memory_limit: 0 };
pub const MOCK_DOMAIN: Variant = Variant { mock_domains: 1, memory_limit: 0 };
pub const TWO_MOCK_DOMAIN: Variant = Variant { mock_domains: 2, memory_limit: 0 };
pub const MOCK_DOMAIN_LIMIT: Variant = Variant { mock_domains: 1, memory_limit: 16 };

pub struct IoasFx {
    f: Fx,
    pub variant: Variant,
    pub ioas_id: u32,
    pub stdev_id: u32,
    pub hwpt_id: u32,
    pub device_id: u32,
    pub base_iova: u64,
}

impl Deref for IoasFx {
    type Target = Fx;
    fn deref(&self) -> &Fx {
        &self.f
    }
}

impl IoasFx {
    pub fn setup(variant: Variant) -> Self {
        let f = Fx::open();
        let ioas_id = f.ioas_alloc().unwrap();
        if variant.memory_limit == 0 {
            f.set_default_memory_limit().unwrap();
        } else {
            f.set_temp_memory_limit(variant.memory_limit).unwrap();
        }
        let mut s = IoasFx { f, variant, ioas_id, stdev_id: 0, hwpt_id: 0, device_id: 0, base_iova: 0 };
        for _ in 0..variant.mock_domains {
            let (stdev, hwpt, dev) = s.mock_domain(ioas_id).unwrap();
            (s.stdev_id, s.hwpt_id, s.device_id) = (stdev, hwpt, dev);
            s.base_iova = MOCK_APERTURE_START;
        }
        s
    }

    /// `test_ioctl_ioas_map` on the fixture's IOAS.
    pub fn map(&self, uptr: u64, length: u64) -> R<u64> {
        self.ioas_map(self.ioas_id, uptr, length)
    }

    /// `test_ioctl_ioas_map_fixed` on the fixture's IOAS.
    pub fn map_fixed(&self, uptr: u64, length: u64, iova: u64) -> R<()> {
        self.ioas_map_fixed(self.ioas_id, uptr, length, iova)
    }

    /// `test_ioctl_ioas_unmap` on the fixture's IOAS.
    pub fn unmap(&self, iova: u64, length: u64) -> R<()> {
        self.ioas_unmap(self.ioas_id, iova, length)
    }
}

impl Drop for IoasFx {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.set_default_memory_limit().unwrap();
        }
    }
}

/// Lowest set bit of `x` (`1 << (ffs(x) - 1)`).
fn low_bit(x: u64) -> u64 {
    x & x.wrapping_neg()
}

fn ioas_auto_destroy(_s: &mut IoasFx) {}

fn ioas_destroy(s: &mut IoasFx) {
    if s.stdev_id != 0 {
        // A HWPT of a device still uses it.
        assert_eq!(s.destroy(s.ioas_id), Err(Errno::EBUSY));
    } else {
        s.destroy(s.ioas_id).unwrap();
    }
}

/// Writes the two `struct iommu_hwpt_invalidate_selftest` requests of the
/// selftest's `inv_reqs[2]` at `at`.
fn write_inv_reqs(s: &IoasFx, at: u64, reqs: [(u32, u32); 2]) {
    for (i, (flags, iotlb_id)) in reqs.into_iter().enumerate() {
        let b = IommuHwptInvalidateSelftest { flags, iotlb_id }.to_bytes();
        s.write_user(at + (i * IommuHwptInvalidateSelftest::SIZE) as u64, &b);
    }
}

fn alloc_hwpt_nested(s: &mut IoasFx) {
    // struct iommu_hwpt_selftest { __u32 iotlb; }
    let data = SCRATCH;
    s.write_user(data, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes());
    let data_len = IommuHwptSelftest::SIZE as u32;
    // inv_reqs[2], zeroed, after the data.
    let reqs = SCRATCH + 64;
    write_inv_reqs(s, reqs, [(0, 0), (0, 0)]);
    let req_len = IommuHwptInvalidateSelftest::SIZE as u32;
    let inv_sel = IOMMU_HWPT_INVALIDATE_DATA_SELFTEST;
    if s.device_id != 0 {
        let sel = IOMMU_HWPT_DATA_SELFTEST;
        // Paging side.
        assert_eq!(s.hwpt_alloc(s.ioas_id, s.device_id, 0), Err(Errno::ENOENT));
        assert_eq!(s.hwpt_alloc(s.device_id, s.device_id, 0), Err(Errno::EINVAL));
        assert_eq!(
            s.hwpt_alloc(s.device_id, s.ioas_id, IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_FAULT_ID_VALID),
            Err(Errno::EOPNOTSUPP)
        );
        let parent = s.hwpt_alloc(s.device_id, s.ioas_id, IOMMU_HWPT_ALLOC_NEST_PARENT).unwrap();
        let parent_not_work = s.hwpt_alloc(s.device_id, s.ioas_id, 0).unwrap();
        // Nested side, negative cases.
        let nested = |pt, flags, ty, uptr, len| s.hwpt_alloc_raw(s.device_id, pt, 0, flags, ty, uptr, len);
        assert_eq!(nested(parent, 0, IOMMU_HWPT_DATA_NONE, data, data_len), Err(Errno::EINVAL));
        assert_eq!(nested(parent, 0, sel + 1, data, data_len), Err(Errno::EOPNOTSUPP));
        assert_eq!(nested(parent, 0, sel, data, data_len - 1), Err(Errno::EINVAL));
        assert_eq!(nested(parent, 0, sel, 0, data_len), Err(Errno::EFAULT));
        assert_eq!(nested(parent, IOMMU_HWPT_ALLOC_NEST_PARENT, sel, data, data_len), Err(Errno::EOPNOTSUPP));
        assert_eq!(nested(parent_not_work, 0, sel, data, data_len), Err(Errno::EINVAL));

        // Two nested HWPTs on one parent, a fault object and a nested
        // HWPT that reports its devices' page requests to it.
        let (fault_id, fault_fd) = s.fault_alloc().unwrap();
        let n0 = nested(parent, 0, sel, data, data_len).unwrap();
        let n1 = nested(parent, 0, sel, data, data_len).unwrap();
        let iopf_alloc = |fault, flags| s.hwpt_alloc_raw(s.device_id, parent, fault, flags, sel, data, data_len);
        assert_eq!(iopf_alloc(u32::MAX, IOMMU_HWPT_FAULT_ID_VALID), Err(Errno::ENOENT));
        assert_eq!(iopf_alloc(fault_id, IOMMU_HWPT_FAULT_ID_VALID | (1 << 31)), Err(Errno::EOPNOTSUPP));
        let iopf_hwpt = iopf_alloc(fault_id, IOMMU_HWPT_FAULT_ID_VALID).unwrap();
        s.check_iotlb_all(n0, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
        s.check_iotlb_all(n1, IOMMU_TEST_IOTLB_DEFAULT).unwrap();

        // No nested HWPT on a nested HWPT; the parent is held.
        assert_eq!(nested(n0, 0, sel, data, data_len), Err(Errno::EINVAL));
        assert_eq!(s.destroy(parent), Err(Errno::EBUSY));

        // Only nested HWPTs take invalidations (6.12: ENOENT).
        assert_eq!(s.hwpt_invalidate(parent, reqs, inv_sel, req_len, 1), (Err(Errno::ENOENT), 0));
        // The data type is checked even for an empty array.
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 0), (Ok(()), 0));
        let inv_bad = IOMMU_HWPT_INVALIDATE_DATA_SELFTEST_INVALID;
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_bad, req_len, 1), (Err(Errno::EINVAL), 0));
        // Entry size sanity.
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len + 1, 1), (Err(Errno::EINVAL), 0));
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, 1, 1), (Err(Errno::EINVAL), 0));
        // An unknown flag.
        write_inv_reqs(s, reqs, [(0xffff_ffff, 0), (0, 0)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 1), (Err(Errno::EOPNOTSUPP), 0));
        // No array, or a zero entry length, for a non-empty array.
        write_inv_reqs(s, reqs, [(0, 0), (0, 0)]);
        assert_eq!(s.hwpt_invalidate(n0, 0, inv_sel, req_len, 1), (Err(Errno::EINVAL), 0));
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, 0, 1), (Err(Errno::EINVAL), 0));
        // An IOTLB id past the last.
        write_inv_reqs(s, reqs, [(0, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1), (0, 0)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 1), (Err(Errno::EINVAL), 0));

        // The first request is handled, the second fails: entry_num says 1.
        let only_first = |s: &IoasFx| {
            s.check_iotlb(n0, 0, 0).unwrap();
            for i in 1..4 {
                s.check_iotlb(n0, i, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
            }
        };
        write_inv_reqs(s, reqs, [(0, 0), (0xffff_ffff, 1)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 2), (Err(Errno::EOPNOTSUPP), 1));
        only_first(s);
        write_inv_reqs(s, reqs, [(0, 0), (0, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX + 1)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 2), (Err(Errno::EINVAL), 1));
        only_first(s);

        // The second entry, then the third and fourth.
        write_inv_reqs(s, reqs, [(0, 1), (0, 0)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 1), (Ok(()), 1));
        s.check_iotlb(n0, 0, 0).unwrap();
        s.check_iotlb(n0, 1, 0).unwrap();
        s.check_iotlb(n0, 2, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
        s.check_iotlb(n0, 3, IOMMU_TEST_IOTLB_DEFAULT).unwrap();
        write_inv_reqs(s, reqs, [(0, 2), (0, 3)]);
        assert_eq!(s.hwpt_invalidate(n0, reqs, inv_sel, req_len, 2), (Ok(()), 2));
        s.check_iotlb_all(n0, 0).unwrap();

        // Everything of the other nested HWPT at once.
        write_inv_reqs(s, reqs, [(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0), (0, 3)]);
        assert_eq!(s.hwpt_invalidate(n1, reqs, inv_sel, req_len, 1), (Ok(()), 1));
        s.check_iotlb_all(n1, 0).unwrap();

        // The device on n0, which is then busy; then moved to n1.
        s.mock_domain_replace(s.stdev_id, n0).unwrap();
        assert_eq!(s.destroy(n0), Err(Errno::EBUSY));
        s.mock_domain_replace(s.stdev_id, n1).unwrap();
        assert_eq!(s.destroy(n1), Err(Errno::EBUSY));
        s.destroy(n0).unwrap();

        // From n1 to the IOPF-capable HWPT (then busy); a page request of
        // the device is read from the fault "fd" and answered.
        s.mock_domain_replace(s.stdev_id, iopf_hwpt).unwrap();
        assert_eq!(s.destroy(iopf_hwpt), Err(Errno::EBUSY));
        s.trigger_iopf(s.device_id, fault_fd).unwrap();

        // Back to the parent, then to the IOAS; everything goes.
        s.mock_domain_replace(s.stdev_id, parent).unwrap();
        s.destroy(n1).unwrap();
        s.destroy(iopf_hwpt).unwrap();
        s.mock_domain_replace(s.stdev_id, s.ioas_id).unwrap();
        s.destroy(parent).unwrap();
        s.destroy(parent_not_work).unwrap();
        s.close_fault_fd(fault_fd).unwrap();
        s.destroy(fault_id).unwrap();
    } else {
        assert_eq!(s.hwpt_alloc(s.device_id, s.ioas_id, 0), Err(Errno::ENOENT));
        for _ in 0..2 {
            let r = s.hwpt_alloc_raw(s.device_id, 0, 0, 0, IOMMU_HWPT_DATA_SELFTEST, data, data_len);
            assert_eq!(r, Err(Errno::ENOENT));
        }
        for _ in 0..2 {
            assert_eq!(s.mock_domain_replace(s.stdev_id, 0), Err(Errno::ENOENT));
        }
    }
}

fn hwpt_attach(s: &mut IoasFx) {
    // A device attached straight to a HWPT.
    if s.stdev_id != 0 {
        s.mock_domain(s.hwpt_id).unwrap();
    } else {
        assert_eq!(s.mock_domain(s.hwpt_id).map(|_| ()), Err(Errno::ENOENT));
    }
}

fn ioas_area_destroy(s: &mut IoasFx) {
    // An area does not change whether the IOAS can be destroyed.
    s.map_fixed(BUFFER, PAGE_SIZE, s.base_iova).unwrap();
    if s.stdev_id != 0 {
        assert_eq!(s.destroy(s.ioas_id), Err(Errno::EBUSY));
    } else {
        s.destroy(s.ioas_id).unwrap();
    }
}

fn ioas_area_auto_destroy(s: &mut IoasFx) {
    // Closing frees an IOAS with many areas.
    for i in 0..10 {
        s.map_fixed(BUFFER, PAGE_SIZE, s.base_iova + i * PAGE_SIZE).unwrap();
    }
}

fn get_hw_info(s: &mut IoasFx) {
    if s.device_id != 0 {
        // No user buffer, exactly the driver's 8 bytes, 16 (trailing
        // bytes must come back zeroed), 4 (only `flags` fits).
        s.get_hw_info(s.device_id, 0, 0).unwrap();
        s.get_hw_info(s.device_id, SCRATCH, 8).unwrap();
        s.get_hw_info(s.device_id, SCRATCH, 16).unwrap();
        s.get_hw_info(s.device_id, SCRATCH, 4).unwrap();
        // A hostile size: the tail is zeroed in place, as far as the
        // caller's memory goes (then EFAULT); it never sizes an
        // allocation. The whole scratch area is zeroed on the way.
        let (r, _) = s.get_hw_info_raw(s.device_id, SCRATCH, u32::MAX);
        assert_eq!(r, Err(Errno::EFAULT));
        // A tail that would wrap the address space.
        let (r, _) = s.get_hw_info_raw(s.device_id, u64::MAX - 7, 64);
        assert_eq!(r, Err(Errno::EFAULT));
        // `out_max_pasid_log2` (the 6.12.y stable selftest, whose
        // `mock_domain` variant adds a PASID-capable mock device in the
        // setup; made here, after the checks above, so the object ids of
        // the other cases stay those of 6.12.0).
        let (r, out) = s.get_hw_info_raw(s.device_id, 0, 0);
        assert_eq!((r, out.out_max_pasid_log2), (Ok(()), 0));
        if s.variant.mock_domains == 1 && s.variant.memory_limit == 0 {
            let (_, _, pasid_dev) = s.mock_domain_flags(s.ioas_id, MOCK_FLAGS_DEVICE_PASID).unwrap();
            let (r, out) = s.get_hw_info_raw(pasid_dev, 0, 0);
            assert_eq!((r, out.out_max_pasid_log2), (Ok(()), MOCK_PASID_WIDTH as u8));
        }
        // Only the three bytes after it are reserved; it is output only.
        let mut c = IommuHwInfo { size: IommuHwInfo::SIZE as u32, dev_id: s.device_id, ..Default::default() };
        c.out_max_pasid_log2 = 0xff;
        assert_eq!(s.run(IOMMU_GET_HW_INFO, c.to_bytes()).0, Ok(()));
        c.__reserved = [0, 0, 1];
        assert_eq!(s.run(IOMMU_GET_HW_INFO, c.to_bytes()).0, Err(Errno::EOPNOTSUPP));
    } else {
        assert_eq!(s.get_hw_info(s.device_id, SCRATCH, 8), Err(Errno::ENOENT));
        assert_eq!(s.get_hw_info(s.device_id, SCRATCH, 16), Err(Errno::ENOENT));
    }
}

fn area(s: &mut IoasFx) {
    // Nothing mapped: nothing to unmap.
    for i in 0..10 {
        assert_eq!(s.unmap(i * PAGE_SIZE, PAGE_SIZE), Err(Errno::ENOENT));
    }
    // Map then unmap page by page.
    for i in 0..10 {
        s.map_fixed(BUFFER, PAGE_SIZE, s.base_iova + i * PAGE_SIZE).unwrap();
    }
    for i in 0..10 {
        s.unmap(s.base_iova + i * PAGE_SIZE, PAGE_SIZE).unwrap();
    }
    // An area cannot be split by unmap.
    s.map_fixed(BUFFER, PAGE_SIZE * 2, s.base_iova + 16 * PAGE_SIZE).unwrap();
    assert_eq!(s.unmap(s.base_iova + 16 * PAGE_SIZE, PAGE_SIZE), Err(Errno::ENOENT));
    assert_eq!(s.unmap(s.base_iova + 17 * PAGE_SIZE, PAGE_SIZE), Err(Errno::ENOENT));
    // Nor mapped over.
    for (len, at) in [(2, 16), (1, 16), (1, 17), (2, 15), (3, 15)] {
        assert_eq!(
            s.map_fixed(BUFFER, PAGE_SIZE * len, s.base_iova + at * PAGE_SIZE),
            Err(Errno::EEXIST),
            "{len} pages at page {at}"
        );
    }
    // Unmap all, also when there is nothing left.
    s.unmap(0, u64::MAX).unwrap();
    s.unmap(0, u64::MAX).unwrap();
}

fn unmap_fully_contained_areas(s: &mut IoasFx) {
    // Room below the first area for the no-domain case.
    s.base_iova += 4 * PAGE_SIZE;
    for i in 0..4 {
        s.map_fixed(BUFFER, 8 * PAGE_SIZE, s.base_iova + i * 16 * PAGE_SIZE).unwrap();
    }
    // Ranges that cut an area.
    assert_eq!(s.unmap(s.base_iova - 4 * PAGE_SIZE, 8 * PAGE_SIZE), Err(Errno::ENOENT));
    assert_eq!(
        s.unmap(s.base_iova + 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE - 4 * PAGE_SIZE, 8 * PAGE_SIZE),
        Err(Errno::ENOENT)
    );
    // A range holding all four areas whole.
    let (r, unmapped) =
        s.ioas_unmap_raw(s.ioas_id, s.base_iova - 4 * PAGE_SIZE, 3 * 16 * PAGE_SIZE + 8 * PAGE_SIZE + 4 * PAGE_SIZE);
    assert_eq!(r, Ok(()));
    assert_eq!(unmapped, 32 * PAGE_SIZE);
}

fn area_auto_iova(s: &mut IoasFx) {
    let (res_start, res_len) = (PAGE_SIZE * 4, PAGE_SIZE * 100);
    let mut iovas = [0u64; 10];

    // One page at a time.
    for iova in iovas.iter_mut() {
        *iova = s.map(BUFFER, PAGE_SIZE).unwrap();
    }
    for iova in iovas {
        s.unmap(iova, PAGE_SIZE).unwrap();
    }

    // The allocated IOVA is aligned to the lowest set bit of the length.
    for (i, iova) in iovas.iter_mut().enumerate() {
        let length = PAGE_SIZE * (i as u64 + 1);
        // Without a domain nothing is pinned, so any address will do.
        let uptr = if s.stdev_id != 0 { BUFFER } else { 1 << 31 };
        *iova = s.map(uptr, length).unwrap();
        assert_eq!(*iova % low_bit(length), 0, "length {length:#x}");
    }
    for (i, iova) in iovas.iter().enumerate() {
        s.unmap(*iova, PAGE_SIZE * (i as u64 + 1)).unwrap();
    }

    // Allocation avoids a reserved range.
    s.add_reserved(s.ioas_id, res_start, res_len).unwrap();
    for (i, iova) in iovas.iter_mut().enumerate() {
        let length = PAGE_SIZE * (i as u64 + 1);
        *iova = s.map(BUFFER, length).unwrap();
        assert_eq!(*iova % low_bit(length), 0);
        assert!(!(*iova > res_start && *iova < res_start + res_len), "{iova:#x} is reserved");
    }
    for (i, iova) in iovas.iter().enumerate() {
        s.unmap(*iova, PAGE_SIZE * (i as u64 + 1)).unwrap();
    }

    // An allowed range may not cover a reserved one.
    assert_eq!(s.allow_iovas(s.ioas_id, &[(PAGE_SIZE, PAGE_SIZE * 600)]), Err(Errno::EADDRINUSE));

    // Allocation stays inside the allowed range.
    let allowed = if s.stdev_id != 0 {
        (MOCK_APERTURE_START + PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE * 600 - 1)
    } else {
        (PAGE_SIZE * 200, PAGE_SIZE * 600 - 1)
    };
    s.allow_iovas(s.ioas_id, &[allowed]).unwrap();
    for (i, iova) in iovas.iter_mut().enumerate() {
        let length = PAGE_SIZE * (i as u64 + 1);
        *iova = s.map(BUFFER, length).unwrap();
        assert_eq!(*iova % low_bit(length), 0);
        assert!(*iova >= allowed.0);
        assert!(*iova <= allowed.1);
        assert!(*iova + length > allowed.0);
        assert!(*iova + length <= allowed.1 + 1);
    }
    for (i, iova) in iovas.iter().enumerate() {
        s.unmap(*iova, PAGE_SIZE * (i as u64 + 1)).unwrap();
    }
}

fn area_allowed(s: &mut IoasFx) {
    // A reservation may not land inside an allowed range.
    let allowed = (s.base_iova, s.base_iova + PAGE_SIZE * 600);
    s.allow_iovas(s.ioas_id, &[allowed]).unwrap();
    let (res_start, res_len) = (allowed.0 + PAGE_SIZE, PAGE_SIZE);
    assert_eq!(s.add_reserved(s.ioas_id, res_start, res_len), Err(Errno::EADDRINUSE));
    // An empty list clears the allowed ranges.
    s.allow_iovas_at(s.ioas_id, 0, SCRATCH).unwrap();

    // An allowed range may not cover a reservation.
    s.add_reserved(s.ioas_id, res_start, res_len).unwrap();
    assert_eq!(s.allow_iovas(s.ioas_id, &[allowed]), Err(Errno::EADDRINUSE));
}

fn copy_area(s: &mut IoasFx) {
    let mut c = IommuIoasCopy {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE,
        dst_ioas_id: s.ioas_id,
        src_ioas_id: s.ioas_id,
        length: PAGE_SIZE,
        ..Default::default()
    };
    s.map_fixed(BUFFER, PAGE_SIZE, s.base_iova).unwrap();

    // Inside one IOAS.
    c.src_iova = s.base_iova;
    c.dst_iova = s.base_iova + PAGE_SIZE;
    assert_eq!(s.ioas_copy(c).0, Ok(()));

    // Into another IOAS.
    c.src_iova = s.base_iova;
    c.dst_iova = 0;
    c.dst_ioas_id = s.ioas_alloc().unwrap();
    assert_eq!(s.ioas_copy(c).0, Ok(()));
}

fn iova_ranges(s: &mut IoasFx) {
    // The range array is the shared buffer.
    let ranges = BUFFER;
    let room = (BUFFER_SIZE / IommuIovaRange::SIZE as u64) as u32;

    // One range.
    let (r, c) = s.iova_ranges(s.ioas_id, room, ranges);
    assert_eq!(r, Ok(()));
    assert_eq!(c.num_iovas, 1);
    let got = s.read_ranges(ranges, 1);
    if s.stdev_id == 0 {
        assert_eq!(got[0], (0, u64::MAX));
        assert_eq!(c.out_iova_alignment, 1);
    } else {
        assert_eq!(got[0], (MOCK_APERTURE_START, MOCK_APERTURE_LAST));
        assert_eq!(c.out_iova_alignment, MOCK_PAGE_SIZE);
    }

    // No room: EMSGSIZE, the needed count, nothing written.
    s.fill_user(ranges, BUFFER_SIZE, 0);
    let (r, c) = s.iova_ranges(s.ioas_id, 0, ranges);
    assert_eq!(r, Err(Errno::EMSGSIZE));
    assert_eq!(c.num_iovas, 1);
    assert_eq!(s.read_ranges(ranges, 1)[0], (0, 0));

    // A reservation splits the space in two (below the aperture with a domain).
    s.add_reserved(s.ioas_id, PAGE_SIZE, PAGE_SIZE).unwrap();
    let (r, c) = s.iova_ranges(s.ioas_id, room, ranges);
    assert_eq!(r, Ok(()));
    if s.stdev_id == 0 {
        assert_eq!(c.num_iovas, 2);
        assert_eq!(s.read_ranges(ranges, 2), vec![(0, PAGE_SIZE - 1), (PAGE_SIZE * 2, u64::MAX)]);
    } else {
        assert_eq!(c.num_iovas, 1);
        assert_eq!(s.read_ranges(ranges, 1)[0], (MOCK_APERTURE_START, MOCK_APERTURE_LAST));
    }

    // Room for one.
    s.fill_user(ranges, BUFFER_SIZE, 0);
    let (r, c) = s.iova_ranges(s.ioas_id, 1, ranges);
    if s.stdev_id == 0 {
        assert_eq!(r, Err(Errno::EMSGSIZE));
        assert_eq!(c.num_iovas, 2);
        assert_eq!(s.read_ranges(ranges, 1)[0], (0, PAGE_SIZE - 1));
    } else {
        assert_eq!(r, Ok(()));
        assert_eq!(c.num_iovas, 1);
        assert_eq!(s.read_ranges(ranges, 1)[0], (MOCK_APERTURE_START, MOCK_APERTURE_LAST));
    }
    assert_eq!(s.read_ranges(ranges, 2)[1], (0, 0));
}

fn ioas_option_huge_pages(s: &mut IoasFx) {
    let opt = |op, val| s.option(IOMMU_OPTION_HUGE_PAGES, op, s.ioas_id, val);
    let (r, c) = opt(IOMMU_OPTION_OP_GET, 3);
    assert_eq!(r, Ok(()));
    assert_eq!(c.val64, 1);
    assert_eq!(opt(IOMMU_OPTION_OP_SET, 0).0, Ok(()));
    let (r, c) = opt(IOMMU_OPTION_OP_GET, 3);
    assert_eq!(r, Ok(()));
    assert_eq!(c.val64, 0);
    assert_eq!(opt(IOMMU_OPTION_OP_SET, 2).0, Err(Errno::EINVAL));
    assert_eq!(opt(IOMMU_OPTION_OP_SET, 1).0, Ok(()));
}

fn ioas_iova_alloc(s: &mut IoasFx) {
    for length in 1..PAGE_SIZE * 2 {
        if s.variant.mock_domains != 0 && length % MOCK_PAGE_SIZE != 0 {
            assert_eq!(s.map(BUFFER, length), Err(Errno::EINVAL), "length {length}");
        } else {
            let iova = s.map(BUFFER, length).unwrap();
            s.unmap(iova, length).unwrap();
        }
    }
}

fn ioas_align_change(s: &mut IoasFx) {
    // HUGE_PAGES = 0 asks for PAGE_SIZE alignment of everything.
    let set = |val| s.option(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, s.ioas_id, val).0;

    // With a domain and a mapping the alignment cannot be raised.
    if s.variant.mock_domains != 0 {
        return;
    }

    // Raising it works while everything is page aligned.
    s.map_fixed(BUFFER, PAGE_SIZE, MOCK_APERTURE_START).unwrap();
    assert_eq!(set(0), Ok(()));

    // A misaligned map is refused then.
    assert_eq!(s.map_fixed(BUFFER + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE), Err(Errno::EINVAL));
    assert_eq!(set(0), Ok(()));

    // Back to no alignment.
    assert_eq!(set(1), Ok(()));

    // A misaligned area blocks raising it.
    s.map_fixed(BUFFER + MOCK_PAGE_SIZE, PAGE_SIZE, MOCK_APERTURE_START + PAGE_SIZE).unwrap();
    assert_eq!(set(0), Err(Errno::EADDRINUSE));

    s.unmap(MOCK_APERTURE_START + PAGE_SIZE, PAGE_SIZE).unwrap();
    s.unmap(MOCK_APERTURE_START, PAGE_SIZE).unwrap();
}

fn copy_sweep(s: &mut IoasFx) {
    let dst_ioas_id = s.ioas_alloc().unwrap();
    let mut c = IommuIoasCopy {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE,
        src_ioas_id: s.ioas_id,
        dst_ioas_id,
        dst_iova: MOCK_APERTURE_START,
        length: MOCK_PAGE_SIZE,
        ..Default::default()
    };
    let last_iova = if s.variant.mock_domains != 0 {
        MOCK_APERTURE_START + BUFFER_SIZE - 1
    } else {
        MOCK_APERTURE_START + BUFFER_SIZE - 2
    };
    s.map_fixed(BUFFER, last_iova - MOCK_APERTURE_START + 1, MOCK_APERTURE_START).unwrap();

    let mut iova = MOCK_APERTURE_START - PAGE_SIZE;
    while iova <= last_iova {
        c.src_iova = iova;
        if iova < MOCK_APERTURE_START || iova + c.length - 1 > last_iova {
            assert_eq!(s.ioas_copy(c).0, Err(Errno::ENOENT), "src {iova:#x}");
        } else {
            assert_eq!(s.ioas_copy(c).0, Ok(()), "src {iova:#x}");
            s.ioas_unmap(dst_ioas_id, c.dst_iova, c.length).unwrap();
        }
        iova += 511;
    }
    s.destroy(dst_ioas_id).unwrap();
}

fn access_domain_destory(s: &mut IoasFx) {
    // Two huge pages, pinned by an access across the boundary of the first.
    let buf_size = 2 * HUGEPAGE_SIZE;
    let buf = s.mmap(buf_size);
    s.map_fixed(buf, buf_size, s.base_iova).unwrap();
    let access = s.create_access(s.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
    let pages = s.access_pages(access, 0, s.base_iova + PAGE_SIZE, PAGE_SIZE, buf + PAGE_SIZE).unwrap();
    // Removing the domain unpins under the access's pins.
    if s.stdev_id != 0 {
        s.destroy(s.stdev_id).unwrap();
    }
    s.destroy_access_pages(access, pages).unwrap();
    s.destroy_access(access).unwrap();
}

fn access_pin(s: &mut IoasFx) {
    let access = s.create_access(s.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
    for npages in 1..BUFFER_SIZE / PAGE_SIZE {
        let length = npages * PAGE_SIZE;
        let pin = || s.access_pages(access, 0, MOCK_APERTURE_START, length, BUFFER);

        // One user.
        s.map_fixed(BUFFER, BUFFER_SIZE, MOCK_APERTURE_START).unwrap();
        let p = pin().unwrap();
        s.destroy_access_pages(access, p).unwrap();

        // Two users of the same pages.
        let first = pin().unwrap();
        let second = pin().unwrap();
        s.destroy_access_pages(access, second).unwrap();
        s.destroy_access_pages(access, first).unwrap();

        // A domain comes and goes while an access holds pages.
        let p = pin().unwrap();
        let (stdev, hwpt, _) = s.mock_domain(s.ioas_id).unwrap();
        s.check_map(hwpt, MOCK_APERTURE_START, BUFFER_SIZE, BUFFER).unwrap();
        s.destroy(stdev).unwrap();
        s.destroy_access_pages(access, p).unwrap();

        s.unmap(MOCK_APERTURE_START, BUFFER_SIZE).unwrap();
    }
    s.destroy_access(access).unwrap();
}

fn access_pin_unmap(s: &mut IoasFx) {
    let access = s.create_access(s.ioas_id, MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES).unwrap();
    s.map_fixed(BUFFER, BUFFER_SIZE, MOCK_APERTURE_START).unwrap();
    let pages = s.access_pages(access, 0, MOCK_APERTURE_START, BUFFER_SIZE, BUFFER).unwrap();
    // The unmap makes the access drop its pages...
    s.unmap(MOCK_APERTURE_START, BUFFER_SIZE).unwrap();
    // ...so they are gone already.
    assert_eq!(s.destroy_access_pages(access, pages), Err(Errno::ENOENT));
}

/// `check_access_rw`: reads and writes through the access around a page
/// boundary at every small length, then one read of the whole buffer.
fn check_access_rw(s: &IoasFx, access: u32, iova: u64, def_flags: u32) {
    let mut rng = Rand::new(iova ^ def_flags as u64);
    s.write_user(BUFFER, &rng.bytes(BUFFER_SIZE as usize));
    // 64 bytes of user memory for the transfers.
    let tmp = SCRATCH;
    let mut at = iova + PAGE_SIZE - 50;
    while at < iova + PAGE_SIZE + 50 {
        for length in 1..64u64 {
            let expect_at = BUFFER + (at - iova);
            s.access_rw(access, at, length, tmp, def_flags).unwrap();
            assert_eq!(
                s.read_user(tmp, length as usize),
                s.read_user(expect_at, length as usize),
                "read at {at:#x}+{length}"
            );

            s.write_user(tmp, &rng.bytes(64));
            s.access_rw(access, at, length, tmp, def_flags | MOCK_ACCESS_RW_WRITE).unwrap();
            assert_eq!(
                s.read_user(expect_at, length as usize),
                s.read_user(tmp, length as usize),
                "write at {at:#x}+{length}"
            );
        }
        at += 1;
    }
    // All of it at once.
    let tmp2 = s.mmap(BUFFER_SIZE);
    s.access_rw(access, iova, BUFFER_SIZE, tmp2, def_flags).unwrap();
    assert_eq!(s.read_user(tmp2, BUFFER_SIZE as usize), s.read_user(BUFFER, BUFFER_SIZE as usize));
}

fn access_rw(s: &mut IoasFx) {
    let access = s.create_access(s.ioas_id, 0).unwrap();
    let iova = s.map(BUFFER, BUFFER_SIZE).unwrap();
    check_access_rw(s, access, iova, 0);
    check_access_rw(s, access, iova, MOCK_ACCESS_RW_SLOW_PATH);
    s.unmap(iova, BUFFER_SIZE).unwrap();
    s.destroy_access(access).unwrap();
}

fn access_rw_unaligned(s: &mut IoasFx) {
    let access = s.create_access(s.ioas_id, 0).unwrap();
    // IOVA off a CPU page by half a page.
    let iova = s.base_iova + MOCK_PAGE_SIZE;
    s.map_fixed(BUFFER, BUFFER_SIZE, iova).unwrap();
    check_access_rw(s, access, iova, 0);
    s.unmap(iova, BUFFER_SIZE).unwrap();
    s.destroy_access(access).unwrap();
}

fn run(variant: Variant, test: fn(&mut IoasFx)) {
    let mut s = IoasFx::setup(variant);
    test(&mut s);
}

/// One `#[test]` per case; `ignore = "..."` marks a case that needs a
/// feature we do not have yet.
macro_rules! case {
    ($name:ident) => {
        #[test]
        fn $name() {
            super::run(V, super::$name)
        }
    };
    ($name:ident, ignore = $why:literal) => {
        #[test]
        #[ignore = $why]
        fn $name() {
            super::run(V, super::$name)
        }
    };
}

macro_rules! common_cases {
    () => {
        case!(ioas_auto_destroy);
        case!(ioas_destroy);
        case!(hwpt_attach);
        case!(ioas_area_destroy);
        case!(ioas_area_auto_destroy);
        case!(get_hw_info);
        case!(area);
        case!(unmap_fully_contained_areas);
        case!(area_auto_iova);
        case!(area_allowed);
        case!(copy_area);
        case!(iova_ranges);
        case!(ioas_option_huge_pages);
        case!(ioas_iova_alloc);
        case!(ioas_align_change);
        case!(copy_sweep);
        case!(access_domain_destory);
        case!(access_pin);
        case!(access_pin_unmap);
        case!(access_rw);
        case!(access_rw_unaligned);
    };
}

mod no_domain {
    const V: super::Variant = super::NO_DOMAIN;
    common_cases!();
    case!(alloc_hwpt_nested);
}

mod mock_domain {
    const V: super::Variant = super::MOCK_DOMAIN;
    common_cases!();
    case!(alloc_hwpt_nested);
}

mod two_mock_domain {
    const V: super::Variant = super::TWO_MOCK_DOMAIN;
    common_cases!();
    case!(alloc_hwpt_nested);
}

mod mock_domain_limit {
    const V: super::Variant = super::MOCK_DOMAIN_LIMIT;
    common_cases!();
    case!(alloc_hwpt_nested);
}
