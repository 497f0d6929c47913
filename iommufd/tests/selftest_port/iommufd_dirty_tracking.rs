//! Fixture `iommufd_dirty_tracking` (Linux 6.12's dirty-tracking cases,
//! from their facts: which commands, which arguments, which answers): an
//! IOAS with a mock device, a buffer mapped at the mock aperture, a HWPT
//! allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`; the mock's pages are
//! marked written with `IOMMU_TEST_OP_DIRTY` and read back with
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` at several bitmap page sizes and bitmap
//! alignments.

use super::harness::*;
use iommufd::Errno;
use iommufd::selftest::mock::MOCK_APERTURE_START;
use iommufd::uapi::*;

const IOVA: u64 = MOCK_APERTURE_START;

struct DirtyFx {
    f: Fx,
    ioas_id: u32,
    idev_id: u32,
    stdev_id: u32,
    hwpt_id: u32,
    buffer: u64,
    size: u64,
    bitmap: u64,
}

impl DirtyFx {
    /// A `size`-byte buffer mapped at `IOVA` through a dirty-tracking HWPT.
    fn setup(size: u64) -> Self {
        let f = Fx::open();
        let ioas_id = f.ioas_alloc().unwrap();
        let buffer = f.mmap(size);
        let (stdev_id, _, idev_id) = f.mock_domain(ioas_id).unwrap();
        let hwpt_id = f.hwpt_alloc(idev_id, ioas_id, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
        assert_eq!(f.mock_domain_replace(stdev_id, hwpt_id), Ok(hwpt_id));
        f.ioas_map_fixed(ioas_id, buffer, size, IOVA).unwrap();
        // Room for a bitmap at 2 KiB granularity, plus slack to misalign it.
        let bitmap = f.mmap(((size / 2048).div_ceil(8) + 64).next_multiple_of(4096));
        DirtyFx { f, ioas_id, idev_id, stdev_id, hwpt_id, buffer, size, bitmap }
    }

    fn set_tracking(&self, hwpt_id: u32, flags: u32) -> R<()> {
        let c = IommuHwptSetDirtyTracking {
            size: IommuHwptSetDirtyTracking::SIZE as u32,
            flags,
            hwpt_id,
            ..Default::default()
        };
        self.f.run(IOMMU_HWPT_SET_DIRTY_TRACKING, c.to_bytes()).0
    }

    #[allow(clippy::too_many_arguments)]
    fn get_bitmap(&self, hwpt_id: u32, iova: u64, length: u64, page_size: u64, data: u64, flags: u32) -> R<()> {
        let c = IommuHwptGetDirtyBitmap {
            size: IommuHwptGetDirtyBitmap::SIZE as u32,
            hwpt_id,
            flags,
            iova,
            length,
            page_size,
            data,
            ..Default::default()
        };
        self.f.run(IOMMU_HWPT_GET_DIRTY_BITMAP, c.to_bytes()).0
    }

    /// `IOMMU_TEST_OP_DIRTY` with the bitmap in user memory at `uptr`.
    fn mark(&self, iova: u64, length: u64, page_size: u64, uptr: u64) -> R<u64> {
        let p = IommuTestDirty { flags: 0, iova, length, page_size, uptr, out_nr_dirty: 0 };
        let (r, out) = self.f.test_cmd(IOMMU_TEST_OP_DIRTY, self.hwpt_id, &p.to_bytes());
        r?;
        Ok(IommuTestDirty::read(&out.payload).out_nr_dirty)
    }

    fn bit(&self, data: u64, k: u64) -> bool {
        self.f.read_user(data + k / 8, 1)[0] >> (k % 8) & 1 != 0
    }
}

/// Every other 2 KiB mock page marked written, then read back at bitmap
/// granularities of 2 KiB and 4 KiB, through aligned and misaligned
/// bitmaps: the bits say exactly which pieces were written, a second read
/// finds them cleared (or, with NO_CLEAR, still there).
fn dirty_pages_read_back(size: u64) {
    let s = DirtyFx::setup(size);
    s.set_tracking(s.hwpt_id, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    let mock_pages = size / 2048;
    for (page_size, offset, flags) in
        [(2048u64, 0u64, 0u32), (4096, 3, 0), (2048, 5, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR), (size, 1, 0)]
    {
        let data = s.bitmap + offset;
        let nbits = size / page_size;
        // Every other mock page written.
        let marks: Vec<u8> = (0..mock_pages.div_ceil(8)).map(|_| 0x55).collect();
        s.f.write_user(s.bitmap, &marks);
        assert_eq!(s.mark(IOVA, size, 2048, s.bitmap), Ok(mock_pages / 2));
        s.f.fill_user(s.bitmap, mock_pages.div_ceil(8) + 64, 0);
        s.get_bitmap(s.hwpt_id, IOVA, size, page_size, data, flags).unwrap();
        for k in 0..nbits {
            // A 2 KiB piece is written when even; a larger one always.
            let want = page_size > 2048 || k % 2 == 0;
            assert_eq!(s.bit(data, k), want, "page size {page_size:#x}, bit {k}");
        }
        assert!(!s.bit(data, nbits), "no bit beyond the range");
        s.f.fill_user(s.bitmap, mock_pages.div_ceil(8) + 64, 0);
        s.get_bitmap(s.hwpt_id, IOVA, size, page_size, data, 0).unwrap();
        for k in 0..nbits {
            let want = flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 && (page_size > 2048 || k % 2 == 0);
            assert_eq!(s.bit(data, k), want, "second read, page size {page_size:#x}, bit {k}");
        }
    }
    // Turned off: the mock refuses to be read (EINVAL), and to be marked.
    s.set_tracking(s.hwpt_id, 0).unwrap();
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA, size, 4096, s.bitmap, 0), Err(Errno::EINVAL));
    assert_eq!(s.mark(IOVA, size, 2048, s.bitmap), Err(Errno::EINVAL));
    let _ = s.buffer;
}

mod size_64k {
    #[test]
    fn dirty_pages_read_back() {
        super::dirty_pages_read_back(64 << 10);
    }
}

mod size_2m {
    #[test]
    fn dirty_pages_read_back() {
        super::dirty_pages_read_back(2 << 20);
    }
}

mod size_8m {
    #[test]
    fn dirty_pages_read_back() {
        super::dirty_pages_read_back(8 << 20);
    }
}

/// `enforce_dirty`: a device whose unit cannot track dirty pages gets no
/// dirty-tracking HWPT (EOPNOTSUPP) and cannot join one (EINVAL).
#[test]
fn enforce_dirty() {
    let s = DirtyFx::setup(64 << 10);
    let (_, _, no_dirty_idev) = s.f.mock_domain_flags(s.ioas_id, MOCK_FLAGS_DEVICE_NO_DIRTY).unwrap();
    assert_eq!(s.f.hwpt_alloc(no_dirty_idev, s.ioas_id, IOMMU_HWPT_ALLOC_DIRTY_TRACKING), Err(Errno::EOPNOTSUPP));
    let ioas2 = s.f.ioas_alloc().unwrap();
    let (stdev, _, _) = s.f.mock_domain_flags(ioas2, MOCK_FLAGS_DEVICE_NO_DIRTY).unwrap();
    assert_eq!(s.f.mock_domain_replace(stdev, s.hwpt_id), Err(Errno::EINVAL));
    // A plain HWPT is fine for it.
    assert!(s.f.hwpt_alloc(no_dirty_idev, s.ioas_id, 0).is_ok());
}

/// `set_dirty_tracking`: on and off; unknown flags EOPNOTSUPP; a HWPT
/// that cannot track EOPNOTSUPP; a bad id ENOENT.
#[test]
fn set_dirty_tracking() {
    let s = DirtyFx::setup(64 << 10);
    s.set_tracking(s.hwpt_id, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    s.set_tracking(s.hwpt_id, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    s.set_tracking(s.hwpt_id, 0).unwrap();
    assert_eq!(s.set_tracking(s.hwpt_id, 2), Err(Errno::EOPNOTSUPP));
    let plain = s.f.hwpt_alloc(s.idev_id, s.ioas_id, 0).unwrap();
    assert_eq!(s.set_tracking(plain, IOMMU_HWPT_DIRTY_TRACKING_ENABLE), Err(Errno::EOPNOTSUPP));
    assert_eq!(s.set_tracking(9999, IOMMU_HWPT_DIRTY_TRACKING_ENABLE), Err(Errno::ENOENT));
}

/// `device_dirty_capability`: GET_HW_INFO reports the capability for a
/// device that can track, not for one that cannot.
#[test]
fn device_dirty_capability() {
    let s = DirtyFx::setup(64 << 10);
    let (r, info) = s.f.get_hw_info_raw(s.idev_id, 0, 0);
    r.unwrap();
    assert_eq!(info.out_capabilities & IOMMU_HW_CAP_DIRTY_TRACKING, IOMMU_HW_CAP_DIRTY_TRACKING);
    let (_, _, no_dirty) = s.f.mock_domain_flags(s.ioas_id, MOCK_FLAGS_DEVICE_NO_DIRTY).unwrap();
    let (r, info) = s.f.get_hw_info_raw(no_dirty, 0, 0);
    r.unwrap();
    assert_eq!(info.out_capabilities & IOMMU_HW_CAP_DIRTY_TRACKING, 0);
}

/// Bad arguments, in Linux's order of checks; none changes anything.
#[test]
fn get_dirty_bitmap_bad_arguments() {
    let s = DirtyFx::setup(64 << 10);
    s.set_tracking(s.hwpt_id, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    let (sz, b) = (s.size, s.bitmap);
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA, sz, 4096, b, 2), Err(Errno::EOPNOTSUPP), "unknown flag");
    let mut c = IommuHwptGetDirtyBitmap {
        size: IommuHwptGetDirtyBitmap::SIZE as u32,
        hwpt_id: s.hwpt_id,
        iova: IOVA,
        length: sz,
        page_size: 4096,
        data: b,
        ..Default::default()
    };
    c.__reserved = 1;
    assert_eq!(s.f.run(IOMMU_HWPT_GET_DIRTY_BITMAP, c.to_bytes()).0, Err(Errno::EOPNOTSUPP), "reserved");
    assert_eq!(s.get_bitmap(9999, IOVA, sz, 4096, b, 0), Err(Errno::ENOENT));
    assert_eq!(s.get_bitmap(s.hwpt_id, u64::MAX - 4095, 8192, 4096, b, 0), Err(Errno::EOVERFLOW));
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA + 1024, sz, 2048, b, 0), Err(Errno::EINVAL), "IOVA alignment");
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA, sz, 0, b, 0), Err(Errno::EINVAL), "page size 0");
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA + 2048, sz - 2048, 4096, b, 0), Err(Errno::EINVAL), "page alignment");
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA, sz + 4096, 4096, b, 0), Err(Errno::EINVAL), "a hole");
    let plain = s.f.hwpt_alloc(s.idev_id, s.ioas_id, 0).unwrap();
    assert_eq!(s.get_bitmap(plain, IOVA, sz, 4096, b, 0), Err(Errno::EOPNOTSUPP), "cannot track");
    // A bitmap the caller's memory does not hold (one dirty bit needs it).
    s.f.write_user(b, &[1]);
    assert_eq!(s.mark(IOVA, 2048, 2048, b), Ok(1));
    assert_eq!(s.get_bitmap(s.hwpt_id, IOVA, sz, 4096, 0x10, 0), Err(Errno::EFAULT));
    // The selftest's own command checks its arguments.
    assert_eq!(s.mark(IOVA, 0, 2048, b), Err(Errno::EINVAL));
    assert_eq!(s.mark(IOVA + 1, 2048, 2048, b), Err(Errno::EINVAL));
    assert_eq!(s.mark(IOVA, 2048, 2048, 0), Err(Errno::EINVAL));
    let _ = s.stdev_id;
}
