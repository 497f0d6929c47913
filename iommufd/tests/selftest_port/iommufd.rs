//! Fixture `iommufd`: a bare context, no objects.

use super::harness::*;
use iommufd::Errno;
use iommufd::uapi::*;

fn fx() -> Fx {
    Fx::open()
}

#[test]
fn simple_close() {
    let _f = fx();
}

#[test]
fn cmd_fail() {
    let f = fx();
    // No object has id 0.
    assert_eq!(f.destroy(0), Err(Errno::ENOENT));
    // A NULL argument: nothing readable at the pointer.
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut []), Err(Errno::EFAULT));
    // The nr just below the iommufd range is no ioctl of ours.
    let mut cmd = IommuDestroy { size: IommuDestroy::SIZE as u32, id: 0 }.to_bytes();
    assert_eq!(f.ioctl(io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE - 1), &mut cmd), Err(Errno::ENOTTY));
}

/// For each command: `(ioctl, sizeof(struct), offsetofend(struct, last
/// field of the first version))`, from the 6.12 headers (and 6.13/6.14
/// for the two served newer commands).
const LENGTHS: &[(&str, u32, usize, usize)] = &[
    ("iommu_destroy", IOMMU_DESTROY, 8, 8),
    ("iommu_hw_info", IOMMU_GET_HW_INFO, 40, 32),
    ("iommu_hwpt_alloc", IOMMU_HWPT_ALLOC, 48, 24),
    ("iommu_hwpt_invalidate", IOMMU_HWPT_INVALIDATE, 32, 32),
    ("iommu_ioas_alloc", IOMMU_IOAS_ALLOC, 12, 12),
    ("iommu_ioas_iova_ranges", IOMMU_IOAS_IOVA_RANGES, 32, 32),
    ("iommu_ioas_allow_iovas", IOMMU_IOAS_ALLOW_IOVAS, 24, 24),
    ("iommu_ioas_map", IOMMU_IOAS_MAP, 40, 40),
    ("iommu_ioas_copy", IOMMU_IOAS_COPY, 40, 40),
    ("iommu_ioas_unmap", IOMMU_IOAS_UNMAP, 24, 24),
    ("iommu_option", IOMMU_OPTION, 24, 24),
    ("iommu_vfio_ioas", IOMMU_VFIO_IOAS, 12, 12),
    // Linux 6.13 adds IOAS_MAP_FILE to the list (minimum: up to `iova`),
    // 6.14 IOAS_CHANGE_PROCESS (up to `__reserved`).
    ("iommu_ioas_map_file", IOMMU_IOAS_MAP_FILE, 40, 40),
    ("iommu_ioas_change_process", IOMMU_IOAS_CHANGE_PROCESS, 8, 8),
];

#[test]
fn cmd_length() {
    let f = fx();
    for &(name, cmd, size, min_size) in LENGTHS {
        // The struct, all zero but `size`, followed by one extra byte.
        let mut buf = vec![0u8; size + 1];
        let set_size = |buf: &mut Vec<u8>, s: usize| buf[..4].copy_from_slice(&(s as u32).to_le_bytes());
        buf[size] = 0xff;
        set_size(&mut buf, min_size - 1);
        assert_eq!(f.ioctl(cmd, &mut buf), Err(Errno::EINVAL), "{name}: shorter than the minimum");
        set_size(&mut buf, size + 1);
        assert_eq!(f.ioctl(cmd, &mut buf), Err(Errno::E2BIG), "{name}: non-zero byte past the struct");
        set_size(&mut buf, size);
        let exact = f.ioctl(cmd, &mut buf);
        // The same call with a zero extra byte behaves as the exact size did.
        set_size(&mut buf, size + 1);
        buf[size] = 0;
        assert_eq!(f.ioctl(cmd, &mut buf), exact, "{name}: zero byte past the struct");
    }
}

#[test]
fn cmd_ex_fail() {
    let f = fx();
    // iommu_destroy followed by a u64 "future" field.
    let mut cmd = vec![0u8; 16];
    cmd[..4].copy_from_slice(&16u32.to_le_bytes());
    // Bad id, longer command.
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut cmd), Err(Errno::ENOENT));
    // Non-zero future field.
    cmd[8..16].copy_from_slice(&1u64.to_le_bytes());
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut cmd), Err(Errno::E2BIG));
    // The original size still gets through to the id check.
    cmd[..4].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut cmd), Err(Errno::ENOENT));
    // One byte short.
    cmd[..4].copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(f.ioctl(IOMMU_DESTROY, &mut cmd), Err(Errno::EINVAL));
}

#[test]
fn global_options() {
    let f = fx();
    let (r, c) = f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 1);
    assert_eq!(r, Ok(()));
    assert_eq!(c.val64, 0);

    // Linux needs CAP_SYS_RESOURCE here; the selftest runs as root.
    assert_eq!(f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1).0, Ok(()));
    assert_eq!(f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2).0, Err(Errno::EINVAL));

    let (r, c) = f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 2);
    assert_eq!(r, Ok(()));
    assert_eq!(c.val64, 1);

    assert_eq!(f.option(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 0).0, Ok(()));

    // HUGE_PAGES is per IOAS: object 0 does not exist.
    assert_eq!(f.option(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 0, 0).0, Err(Errno::ENOENT));
    assert_eq!(f.option(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 0, 0).0, Err(Errno::ENOENT));
}

// -- VFIO compatibility ioctls on a bare context ---------------------------

#[test]
fn simple_ioctls() {
    use iommufd::uapi::vfio::*;
    let f = fx();
    assert_eq!(f.vfio(VFIO_GET_API_VERSION, 0), Ok(VFIO_API_VERSION as i64));
    assert_eq!(f.vfio(VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU as u64), Ok(1));
}

#[test]
fn unmap_cmd() {
    use iommufd::uapi::vfio::*;
    let f = fx();
    let mut c = VfioIommuType1DmaUnmap { iova: MOCK_APERTURE_START, size: PAGE_SIZE, ..Default::default() };
    c.argsz = 1;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_UNMAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::EINVAL));
    c.argsz = VfioIommuType1DmaUnmap::SIZE as u32;
    c.flags = 1 << 31;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_UNMAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::EINVAL));
    // No compat IOAS.
    c.flags = 0;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_UNMAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::ENODEV));
}

#[test]
fn map_cmd() {
    use iommufd::uapi::vfio::*;
    let f = fx();
    let mut c =
        VfioIommuType1DmaMap { iova: MOCK_APERTURE_START, size: PAGE_SIZE, vaddr: BUFFER, ..Default::default() };
    c.argsz = 1;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_MAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::EINVAL));
    c.argsz = VfioIommuType1DmaMap::SIZE as u32;
    c.flags = 1 << 31;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_MAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::EINVAL));
    // No compat IOAS.
    c.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_MAP_DMA, SCRATCH, &c.to_bytes()).0, Err(Errno::ENODEV));
}

#[test]
fn info_cmd() {
    use iommufd::uapi::vfio::*;
    let f = fx();
    let mut c = VfioIommuType1Info { argsz: 1, ..Default::default() };
    assert_eq!(f.vfio_struct(VFIO_IOMMU_GET_INFO, SCRATCH, &c.to_bytes()).0, Err(Errno::EINVAL));
    c.argsz = VfioIommuType1Info::SIZE as u32;
    assert_eq!(f.vfio_struct(VFIO_IOMMU_GET_INFO, SCRATCH, &c.to_bytes()).0, Err(Errno::ENODEV));
}

#[test]
fn set_iommu_cmd() {
    use iommufd::uapi::vfio::*;
    let f = fx();
    // No compat IOAS.
    assert_eq!(f.vfio(VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU as u64), Err(Errno::ENODEV));
    assert_eq!(f.vfio(VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU as u64), Err(Errno::ENODEV));
}

#[test]
fn vfio_ioas() {
    let f = fx();
    // No compat IOAS yet.
    assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_GET, 0).0, Err(Errno::ENODEV));
    // Setting a missing IOAS.
    assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_SET, 0).0, Err(Errno::ENOENT));
    let ioas_id = f.ioas_alloc().unwrap();
    assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_SET, ioas_id).0, Ok(()));
    // The selftest reuses the struct: ioas_id stays set on the next calls.
    let (r, c) = f.vfio_ioas(IOMMU_VFIO_IOAS_GET, ioas_id);
    assert_eq!(r, Ok(()));
    assert_eq!(c.ioas_id, ioas_id);
    assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_CLEAR, ioas_id).0, Ok(()));
    assert_eq!(f.vfio_ioas(IOMMU_VFIO_IOAS_GET, ioas_id).0, Err(Errno::ENODEV));
}

/// `MD_CHECK_REFS` of a range reaching the top of the address space is
/// `EINVAL` (Linux's `check_add_overflow(uptr, length)`), not an
/// overflow; one ending a page below is looked at.
#[test]
fn check_refs_at_the_top_of_the_address_space() {
    let f = fx();
    let top = u64::MAX - 4095;
    assert_eq!(f.check_refs(top, 4096, 0), Err(Errno::EINVAL));
    assert_eq!(f.check_refs(top - 4096, 4096, 0), Err(Errno::EFAULT), "unmapped");
}
