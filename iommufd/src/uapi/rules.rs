//! The generic rules of an iommufd ioctl: how the argument is found,
//! size-checked and copied in and out, and the order in which each
//! command's handler makes its checks (Linux 6.12).
//!
//! # The generic command path (Linux 6.12 `iommufd_fops_ioctl`)
//!
//! Given `(cmd, buf)` where `buf` is the user memory the argument pointer
//! reaches (its length models where a fault would happen), the kernel does,
//! in this order:
//!
//! 1. `nr = cmd & 0xff`. If `nr < 0x80` or `nr - 0x80` is past the end of
//!    its ioctl table, the command is not an iommufd command at all and is
//!    handed to the VFIO compatibility code (`iommufd_vfio_ioctl`), which
//!    answers the six VFIO ioctls listed under [`vfio`](super::vfio) and otherwise gives
//!    `ENOIOCTLCMD`, which the VFS turns into **ENOTTY**. The table length
//!    is 15 in 6.12 (last entry `FAULT_QUEUE_ALLOC`, 0x8e) without the
//!    selftest; ours serves IOAS_MAP_FILE (0x8f) and IOAS_CHANGE_PROCESS
//!    (0x92) too, so it is 19, with holes at 0x90 and 0x91 (step 3). With
//!    `CONFIG_IOMMUFD_TEST` it is 33 (last entry `IOMMU_TEST_CMD`, 0xa0).
//! 2. Read the first `u32` (`size`) from user memory: fault → **EFAULT**.
//!    This happens *before* the full command is matched, so a command whose
//!    `nr` is in range but which is otherwise unknown reports EFAULT, not
//!    ENOTTY, when the pointer is bad.
//! 3. The table slot's full ioctl number must equal `cmd` (type `;`, no
//!    direction/size bits, a hole in the table never matches) → else
//!    **ENOTTY** (again via `ENOIOCTLCMD`).
//! 4. `size < min_size` → **EINVAL**. `min_size` is the end offset of the
//!    last field the first version of the struct had (`IOCTL_OP`'s
//!    `offsetofend(_struct, _last)`), not the current struct size.
//! 5. `copy_struct_from_user(kernel_buf, struct_size, user, size)`:
//!    * `size < struct_size`: copy `size` bytes, zero the rest;
//!    * `size > struct_size`: the bytes `[struct_size, size)` are checked
//!      first: a fault while scanning → **EFAULT**, any non-zero byte →
//!      **E2BIG**; then `struct_size` bytes are copied;
//!    * a fault during the copy → **EFAULT**.
//! 6. The handler runs (see the per-command table below).
//!
//! Results go back with `iommufd_ucmd_respond`, which copies
//! `min(user size, sizeof(kernel struct))` bytes of the kernel struct to the
//! start of the user buffer; a fault there → **EFAULT** (the object being
//! created is then aborted). See [`give_back`]. Exception: `IOMMU_OPTION`
//! writes back only its `val64` field (bytes 16..24), for both GET and SET.
//!
//! # Per-command validation (Linux 6.12)
//!
//! General convention of the native iommufd commands: an unknown `flags`
//! bit and a non-zero `__reserved` field both give **EOPNOTSUPP** (never
//! EINVAL); a field whose meaning is understood but whose value is wrong
//! gives EINVAL; a missing object gives ENOENT. The VFIO compatibility
//! ioctls use the VFIO convention instead: unknown flags → **EINVAL**.
//!
//! "ioas(x)" below means an IOAS lookup of id `x`: no such object, or not an
//! IOAS → ENOENT. The checks are listed in the order the handler makes them;
//! the first failing one decides the errno.
//!
//! | command (nr) | handler | unknown `flags` | `__reserved` ≠ 0 | order of the other checks |
//! |---|---|---|---|---|
//! | DESTROY (0x80) | `iommufd_destroy` → `iommufd_object_remove` | – (no flags) | – | id not found (or still being created) → ENOENT; object still referenced → EBUSY |
//! | IOAS_ALLOC (0x81) | `iommufd_ioas_alloc_ioctl` | any bit → EOPNOTSUPP (flags must be 0) | – | allocation → ENOMEM; respond fault → EFAULT (IOAS aborted) |
//! | IOAS_ALLOW_IOVAS (0x82) | `iommufd_ioas_allow_iovas` | – | EOPNOTSUPP (first check) | ioas(ioas_id); per range: unreadable → EFAULT, `start >= last` → EINVAL, overlaps an earlier range of the list → EINVAL; then `iopt_set_allow_iova` (EINVAL if current mappings/reservations conflict) |
//! | IOAS_COPY (0x83) | `iommufd_ioas_copy` | bits outside FIXED_IOVA\|WRITEABLE\|READABLE → EOPNOTSUPP (first check) | – (no reserved field) | any of length/src_iova/dst_iova ≥ `ULONG_MAX` → EOVERFLOW; neither WRITEABLE nor READABLE → EINVAL; ioas(src_ioas_id); source range lookup (`iopt_get_pages`, ENOENT if not exactly mapped); ioas(dst_ioas_id); map |
//! | IOAS_IOVA_RANGES (0x84) | `iommufd_ioas_iova_ranges` | – | EOPNOTSUPP (first check) | ioas(ioas_id); each range copied out while `num_iovas` has room (fault → EFAULT); respond (EFAULT); if the array was too small → **EMSGSIZE** *after* the struct (with the needed `num_iovas`) was written back |
//! | IOAS_MAP (0x85) | `iommufd_ioas_map` | bits outside FIXED_IOVA\|WRITEABLE\|READABLE → EOPNOTSUPP | EOPNOTSUPP (same check as flags) | iova or length ≥ `ULONG_MAX` → EOVERFLOW; neither WRITEABLE nor READABLE → EINVAL; ioas(ioas_id); `iopt_map_user_pages` |
//! | IOAS_UNMAP (0x86) | `iommufd_ioas_unmap` | – (no flags) | – (no reserved) | ioas(ioas_id) **first**; `iova == 0 && length == u64::MAX` → unmap everything; otherwise iova or length ≥ `ULONG_MAX` → EOVERFLOW, then `iopt_unmap_iova`; `length` is rewritten with the bytes unmapped and responded |
//! | OPTION (0x87) | `iommufd_option` | – | EOPNOTSUPP (first check) | `option_id` unknown → EOPNOTSUPP. RLIMIT_MODE (`iommufd_option_rlimit_mode`): `object_id != 0` → EOPNOTSUPP; GET ok; SET: no CAP_SYS_RESOURCE → EPERM, context already holds objects → EBUSY, `val64 ∉ {0,1}` → EINVAL; other op → EOPNOTSUPP. HUGE_PAGES (`iommufd_ioas_option`): ioas(object_id) **before** the op is looked at; GET ok; SET `val64 ∉ {0,1}` → EINVAL; other op → EOPNOTSUPP. Only `val64` is written back. |
//! | VFIO_IOAS (0x88) | `iommufd_vfio_ioas` | – | EOPNOTSUPP (first check) | op GET: no compat IOAS → ENODEV, else `ioas_id` responded; SET: ioas(ioas_id); CLEAR: always ok; other op → EOPNOTSUPP |
//! | HWPT_ALLOC (0x89) | `iommufd_hwpt_alloc` | checked **late**, inside `iommufd_hwpt_paging_alloc` (bits outside NEST_PARENT\|DIRTY_TRACKING, and the PASID flag we take as 6.15 does, → EOPNOTSUPP — FAULT_ID_VALID on a paging HWPT is refused in 6.12 and accepted from 6.13 (my reading of the history; verify against the peer); DIRTY_TRACKING without hardware support → EOPNOTSUPP) or `iommufd_hwpt_nested_alloc` (bits other than FAULT_ID_VALID, and PASID as in 6.15, → EOPNOTSUPP) | `__reserved` → EOPNOTSUPP (first check); `__reserved2` is **not** checked | `(data_type == NONE) != (data_len == 0)` → EINVAL; device(dev_id) → ENOENT; pt_id not found → **EINVAL** (not ENOENT); pt is IOAS → paging alloc; pt is a paging HWPT → nested alloc (parent not NEST_PARENT / auto domain → EINVAL); any other object type → EINVAL; FAULT_ID_VALID: fault(fault_id) → ENOENT |
//! | GET_HW_INFO (0x8a) | `iommufd_get_hw_info` | any bit → EOPNOTSUPP (flags must be 0 in 6.12) | EOPNOTSUPP (same check; in the 6.12.y stable kernels only the three bytes after `out_max_pasid_log2`) | device(dev_id) → ENOENT; driver data copied to `data_uptr` (min of both lengths, fault → EFAULT), the rest of a longer user buffer zeroed (fault → EFAULT); `data_len`, `out_data_type`, `out_capabilities`, `out_max_pasid_log2` responded |
//! | HWPT_SET_DIRTY_TRACKING (0x8b) | `iommufd_hwpt_set_dirty_tracking` | bits other than ENABLE → EOPNOTSUPP | **not checked** | paging hwpt(hwpt_id) → ENOENT; domain without dirty ops → EOPNOTSUPP |
//! | HWPT_GET_DIRTY_BITMAP (0x8c) | `iommufd_hwpt_get_dirty_bitmap` | bits other than NO_CLEAR → EOPNOTSUPP | EOPNOTSUPP (same check) | paging hwpt(hwpt_id) → ENOENT; then `iopt_read_and_clear_dirty_data` (range/page-size checks, EINVAL / EOVERFLOW) |
//! | HWPT_INVALIDATE (0x8d) | `iommufd_hwpt_invalidate` | – (no flags) | EOPNOTSUPP (first check) | `entry_num != 0 && (data_uptr == 0 \|\| entry_len == 0)` → EINVAL; nested hwpt(hwpt_id) → ENOENT; driver callback (each entry copied as `iommu_copy_struct_from_user`: type ≠ array type, `entry_len` < driver minimum **or > driver struct** → EINVAL, unreadable → EFAULT; stops at the first failing entry). **Always** responds with `entry_num` = requests handled (0 on early errors), even when failing; a respond fault turns the result into EFAULT |
//! | FAULT_QUEUE_ALLOC (0x8e) | `iommufd_fault_alloc` | any bit → EOPNOTSUPP | – | allocation / fd errors; respond fault → EFAULT |
//! | IOAS_MAP_FILE (0x8f, 6.13) | `iommufd_ioas_map_file` | bits outside FIXED_IOVA\|WRITEABLE\|READABLE → EOPNOTSUPP (first check) | – (no reserved field) | iova or length ≥ `ULONG_MAX` → EOVERFLOW; neither WRITEABLE nor READABLE → EINVAL; ioas(ioas_id); `fd` names no open file → EBADF (a writable map of a file not open for writing → EPERM, the check later kernels add); `length == 0` → EINVAL; `start + length - 1` wraps → EOVERFLOW; `length > u64::MAX - PAGE_SIZE` → EINVAL; then the map as IOAS_MAP (IOVA checks, EEXIST, ...); pinning (now with a domain, else later) a range past the file's end or of a file that is not a memfd → EINVAL |
//! | IOAS_CHANGE_PROCESS (0x92, 6.14) | `iommufd_ioas_change_process` | – (no flags) | EOPNOTSUPP (first check) | any area of any IOAS that maps user memory (not a file) → EINVAL; then the pinned pages are charged to the calling process (over its limit → ENOMEM). Here the caller is always the context's own process: success, nothing moves (`Ictx::change_process` moves a context to another process) |
//! | IOMMU_TEST_CMD (0xa0, selftest) | `iommufd_test` | per op | `__reserved` **not checked** | unknown `op` → EOPNOTSUPP; then the op's own checks |
//!
//! Newer kernels (not 6.12): 6.13 adds IOAS_MAP_FILE (0x8f, served here),
//! VIOMMU_ALLOC (0x90), VDEVICE_ALLOC (0x91), lets paging HWPTs take
//! FAULT_ID_VALID and lets HWPT_INVALIDATE target a vIOMMU; 6.14 adds
//! IOAS_CHANGE_PROCESS (0x92, served here), the HWPT_ALLOC `PASID` flag
//! and `out_max_pasid_log2` in `iommu_hw_info` (carved out of its
//! `__reserved`); 6.15 adds VEVENTQ_ALLOC (0x93); later kernels add
//! HW_QUEUE_ALLOC (0x94) and the GET_HW_INFO `INPUT_TYPE` flag. The
//! numbers not served give ENOTTY, as in 6.12.

use super::{IOCTL_TABLE_LEN, IOMMUFD_CMD_BASE, command_info, ioc_nr};
use crate::errno::Errno;
use alloc::vec;
use alloc::vec::Vec;

/// Whether `cmd`'s nr falls inside the iommufd ioctl table (step 1 of the
/// module docs). If not, Linux sends it to the VFIO compat code instead.
pub fn in_iommufd_range(cmd: u32) -> bool {
    let nr = ioc_nr(cmd);
    nr >= IOMMUFD_CMD_BASE && nr - IOMMUFD_CMD_BASE < IOCTL_TABLE_LEN
}

/// The user-declared size: the first `u32` of the buffer, or `None` if the
/// buffer is too short to hold it (a fault reading it).
pub fn user_size(buf: &[u8]) -> Option<u32> {
    let b: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Linux 6.12's copy-in of an iommufd command, see the module docs for the
/// exact order. On success returns the kernel copy: `struct_size` bytes,
/// the first `min(size, struct_size)` from the user, the rest zero.
///
/// Errors: ENOTTY (not an iommufd command of 6.12; note that VFIO compat
/// numbers also give ENOTTY here — dispatch those with [`vfio`](super::vfio) first),
/// EFAULT (buffer shorter than 4 bytes, or than the bytes that must be
/// read), EINVAL (`size < min_size`), E2BIG (non-zero byte in
/// `[struct_size, size)`).
///
/// Fault model: `buf.len()` is where readable memory ends. The trailing
/// zero check scans from `struct_size` upwards and reports E2BIG on the
/// first non-zero byte it can read, EFAULT if it reaches unreadable memory
/// first (Linux scans in machine words, which only differs when a non-zero
/// byte shares a word with unreadable memory — impossible with page-granular
/// faults).
pub fn take_command(cmd: u32, buf: &[u8]) -> Result<Vec<u8>, Errno> {
    if !in_iommufd_range(cmd) {
        return Err(Errno::ENOTTY);
    }
    let size = user_size(buf).ok_or(Errno::EFAULT)? as usize;
    let op = command_info(cmd).ok_or(Errno::ENOTTY)?;
    if size < op.min_size as usize {
        return Err(Errno::EINVAL);
    }
    copy_struct_from_user(op.struct_size as usize, buf, size)
}

/// Model of Linux's `copy_struct_from_user(dst, ksize, src, usize)` with
/// `src` readable for `user.len()` bytes. Returns the `ksize`-byte kernel
/// copy.
pub fn copy_struct_from_user(ksize: usize, user: &[u8], usize_: usize) -> Result<Vec<u8>, Errno> {
    let copy = usize_.min(ksize);
    if usize_ > ksize {
        let readable_end = usize_.min(user.len());
        if user.get(ksize..readable_end).is_some_and(|t| t.iter().any(|&b| b != 0)) {
            return Err(Errno::E2BIG);
        }
        if user.len() < usize_ {
            return Err(Errno::EFAULT);
        }
    }
    let src = user.get(..copy).ok_or(Errno::EFAULT)?;
    let mut k = vec![0u8; ksize];
    k[..copy].copy_from_slice(src);
    Ok(k)
}

/// Linux's `iommufd_ucmd_respond`: copies `min(user_size, kernel.len())`
/// bytes of the kernel struct to the start of the user buffer. After a
/// successful [`take_command`] on the same buffer this always fits; if it
/// does not, only the bytes that fit are written (use [`give_back_checked`]
/// to get the EFAULT Linux would return).
pub fn give_back(kernel: &[u8], user_size: u32, buf: &mut [u8]) {
    let n = (user_size as usize).min(kernel.len()).min(buf.len());
    buf[..n].copy_from_slice(&kernel[..n]);
}

/// [`give_back`], reporting EFAULT (and writing nothing) when the user
/// buffer is shorter than the bytes to copy.
pub fn give_back_checked(kernel: &[u8], user_size: u32, buf: &mut [u8]) -> Result<(), Errno> {
    let n = (user_size as usize).min(kernel.len());
    let dst = buf.get_mut(..n).ok_or(Errno::EFAULT)?;
    dst.copy_from_slice(&kernel[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::errno::Errno;
    use crate::uapi::vfio::*;
    use crate::uapi::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn user(size: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(&size.to_le_bytes());
        v
    }

    #[test]
    fn take_exact() {
        let mut u =
            IommuIoasMap { size: 40, flags: 6, ioas_id: 1, user_va: 0x5000, length: 0x1000, ..Default::default() }
                .to_bytes();
        let k = take_command(IOMMU_IOAS_MAP, &u).unwrap();
        assert_eq!(k, u);
        let mut km = IommuIoasMap::read(&k);
        km.iova = 0x4000;
        let mut kb = k.clone();
        km.write(&mut kb);
        give_back(&kb, 40, &mut u);
        assert_eq!(IommuIoasMap::read(&u).iova, 0x4000);
    }

    #[test]
    fn take_too_small() {
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(39, 64)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(0, 64)), Err(Errno::EINVAL));
        // HWPT_ALLOC accepts its pre-fault-queue size (24) and zero-fills the rest.
        let mut u = user(24, 24);
        u[8..12].copy_from_slice(&3u32.to_le_bytes());
        let k = take_command(IOMMU_HWPT_ALLOC, &u).unwrap();
        assert_eq!(k.len(), 48);
        let h = IommuHwptAlloc::read(&k);
        assert_eq!((h.size, h.dev_id, h.fault_id, h.data_uptr), (24, 3, 0, 0));
        assert_eq!(take_command(IOMMU_HWPT_ALLOC, &user(23, 64)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_GET_HW_INFO, &user(31, 64)), Err(Errno::EINVAL));
        assert!(take_command(IOMMU_GET_HW_INFO, &user(32, 64)).is_ok());
    }

    #[test]
    fn take_larger_zero_tail() {
        let mut u = user(64, 64);
        u[4..8].copy_from_slice(&9u32.to_le_bytes());
        let k = take_command(IOMMU_DESTROY, &u).unwrap();
        assert_eq!(k.len(), 8);
        assert_eq!(IommuDestroy::read(&k).id, 9);
        // Extra readable memory past `size` is never looked at.
        let mut u = user(8, 100);
        u[50] = 1;
        assert!(take_command(IOMMU_DESTROY, &u).is_ok());
    }

    #[test]
    fn take_larger_nonzero_tail() {
        let mut u = user(48, 48);
        u[47] = 1;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        u[47] = 0;
        u[40] = 0x80;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        u[40] = 0;
        u[39] = 0xff; // inside the struct: fine
        assert!(take_command(IOMMU_IOAS_MAP, &u).is_ok());
    }

    #[test]
    fn take_beyond_buffer() {
        // size larger than the memory: fault.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(40, 39)), Err(Errno::EFAULT));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(4096, 40)), Err(Errno::EFAULT));
        // Non-zero tail byte before the fault point wins (E2BIG).
        let mut u = user(4096, 48);
        u[45] = 1;
        assert_eq!(take_command(IOMMU_IOAS_MAP, &u), Err(Errno::E2BIG));
        // Cannot even read `size`.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &[0u8; 3]), Err(Errno::EFAULT));
        assert_eq!(take_command(IOMMU_IOAS_MAP, &[]), Err(Errno::EFAULT));
        // size check comes before the copy: too small and short → EINVAL.
        assert_eq!(take_command(IOMMU_IOAS_MAP, &user(8, 8)), Err(Errno::EINVAL));
    }

    #[test]
    fn take_unknown() {
        // Outside the table: ENOTTY without touching memory.
        assert_eq!(take_command(0x3b7f, &[]), Err(Errno::ENOTTY));
        assert_eq!(take_command(VFIO_IOMMU_MAP_DMA, &[]), Err(Errno::ENOTTY));
        assert_eq!(take_command(0x3bff, &[]), Err(Errno::ENOTTY));
        // Served 6.13/6.14 commands: their sizes.
        assert_eq!(take_command(IOMMU_IOAS_MAP_FILE, &user(39, 40)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_IOAS_MAP_FILE, &user(40, 40)).map(|k| k.len()), Ok(40));
        assert_eq!(take_command(IOMMU_IOAS_CHANGE_PROCESS, &user(7, 8)), Err(Errno::EINVAL));
        assert_eq!(take_command(IOMMU_IOAS_CHANGE_PROCESS, &user(8, 8)).map(|k| k.len()), Ok(8));
        // Unserved 6.13 commands between them: holes, ENOTTY after the
        // size is read.
        assert!(in_iommufd_range(IOMMU_VIOMMU_ALLOC));
        assert_eq!(take_command(IOMMU_VIOMMU_ALLOC, &[]), Err(Errno::EFAULT));
        assert_eq!(take_command(IOMMU_VIOMMU_ALLOC, &user(24, 40)), Err(Errno::ENOTTY));
        assert_eq!(take_command(IOMMU_VDEVICE_ALLOC, &user(24, 40)), Err(Errno::ENOTTY));
        // Past the table (without the selftest): the VFIO compat code,
        // ENOTTY without reading memory.
        if !cfg!(feature = "selftest") {
            assert!(!in_iommufd_range(IOMMU_VEVENTQ_ALLOC));
            assert_eq!(take_command(IOMMU_VEVENTQ_ALLOC, &[]), Err(Errno::ENOTTY));
        }
        // nr in range but wrong type or direction bits: size is read first.
        assert_eq!(take_command(0x1280, &user(8, 8)), Err(Errno::ENOTTY));
        assert_eq!(take_command(0xc008_3b80, &user(8, 8)), Err(Errno::ENOTTY));
        assert_eq!(take_command(0x1280, &[]), Err(Errno::EFAULT));
        // A hole in the table.
        if cfg!(feature = "selftest") {
            assert!(in_iommufd_range(0x3b95));
            assert_eq!(take_command(0x3b95, &[]), Err(Errno::EFAULT));
            assert_eq!(take_command(0x3b95, &user(8, 8)), Err(Errno::ENOTTY));
            assert!(!in_iommufd_range(0x3ba1));
        } else {
            assert!(!in_iommufd_range(IOMMU_TEST_CMD));
            assert_eq!(take_command(IOMMU_TEST_CMD, &[]), Err(Errno::ENOTTY));
        }
    }

    #[cfg(feature = "selftest")]
    #[test]
    fn take_test_cmd() {
        assert_eq!(take_command(IOMMU_TEST_CMD, &user(67, 72)), Err(Errno::EINVAL));
        let k = take_command(IOMMU_TEST_CMD, &user(68, 68)).unwrap();
        assert_eq!(k.len(), 72);
    }

    #[test]
    fn give_back_min_of_sizes() {
        let kernel = IommuIoasAlloc { size: 12, flags: 0, out_ioas_id: 0x55 }.to_bytes();
        // User declared a larger struct: only 12 bytes written.
        let mut u = vec![0xeeu8; 20];
        give_back(&kernel, 20, &mut u);
        assert_eq!(&u[..12], &kernel[..]);
        assert_eq!(&u[12..], &[0xee; 8]);
        // Checked variant reports a fault.
        let mut small = vec![0u8; 8];
        assert_eq!(give_back_checked(&kernel, 12, &mut small), Err(Errno::EFAULT));
        assert_eq!(give_back_checked(&kernel, 8, &mut small), Ok(()));
    }
}
