//! The uAPI entry point: `(ioctl number, argument bytes)` in, Linux's
//! answer out.
//!
//! `buf` is the caller's memory at the ioctl's argument pointer (its length
//! is where readable memory ends, so a too-short buffer behaves like a
//! fault). Pointers *inside* the argument structs (range arrays, user VAs)
//! are resolved through the context's [`MemorySource`](crate::memsrc).
//!
//! The generic size rules are [`uapi::take_command`]; each handler below
//! then makes its checks in the order Linux 6.12 makes them (the table in
//! the `uapi` module docs), so the same input gives the same errno.
//!
//! Dirty tracking (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING`,
//! `IOMMU_HWPT_SET_DIRTY_TRACKING`, `IOMMU_HWPT_GET_DIRTY_BITMAP`), nested
//! HWPTs (`IOMMU_HWPT_ALLOC` on a paging HWPT), `IOMMU_HWPT_INVALIDATE`
//! and fault queues (`IOMMU_FAULT_QUEUE_ALLOC`, nested HWPTs with
//! `IOMMU_HWPT_FAULT_ID_VALID`; the queue's read and write are methods of
//! the context, `ctx::Ictx::fault_fd_read` and friends) are here, and
//! two commands newer than 6.12 with the checks of the first kernel that
//! has them: `IOMMU_IOAS_MAP_FILE` (6.13) and `IOMMU_IOAS_CHANGE_PROCESS`
//! (6.14).

use crate::ctx::{DeviceOps, Ictx, UserData, UserDataArray};
use crate::errno::{Errno, Result};
#[cfg(feature = "selftest")]
use crate::iopt::Owner;
use crate::pages::AccountMode;
use crate::uapi::{self, *};
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis_iommu::IovaRange;

/// Where a selftest mock device comes from (the `selftest` feature's
/// `MOCK_DOMAIN` command): a factory for a device with the given flags.
pub type MockDeviceFactory = dyn Fn(u32) -> Arc<dyn DeviceOps> + Send + Sync;

/// Runs one ioctl against `ictx`. On success the output fields are in
/// `buf`; on failure `buf` holds whatever Linux would have written before
/// failing (usually nothing).
pub fn ioctl(ictx: &Ictx, cmd: u32, buf: &mut [u8]) -> Result<()> {
    let kbuf = uapi::take_command(cmd, buf)?;
    let user_size = uapi::user_size(buf).ok_or(Errno::EFAULT)?;
    match cmd {
        IOMMU_DESTROY => {
            let c = IommuDestroy::read(&kbuf);
            ictx.destroy(c.id)
        }
        IOMMU_IOAS_ALLOC => {
            let mut c = IommuIoasAlloc::read(&kbuf);
            if c.flags != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let id = ictx.ioas_alloc()?;
            c.out_ioas_id = id;
            respond(&c.to_bytes(), user_size, buf).inspect_err(|_| {
                let _ = ictx.destroy(id);
            })
        }
        IOMMU_IOAS_ALLOW_IOVAS => {
            let c = IommuIoasAllowIovas::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            ictx.ioas(c.ioas_id)?;
            let ranges = load_ranges(ictx, c.allowed_iovas, c.num_iovas)?;
            ictx.ioas_allow_iovas(c.ioas_id, &ranges)
        }
        IOMMU_IOAS_COPY => {
            let mut c = IommuIoasCopy::read(&kbuf);
            #[cfg(feature = "selftest")]
            crate::selftest::cmd::syz_conv_iova_id(ictx, c.src_ioas_id, &mut c.src_iova, &mut c.flags);
            check_map_flags(c.flags)?;
            if c.length == u64::MAX || c.src_iova == u64::MAX || c.dst_iova == u64::MAX {
                return Err(Errno::EOVERFLOW);
            }
            check_map_prot(c.flags)?;
            let fixed = c.flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0;
            let iova = ictx.ioas_copy(
                c.dst_ioas_id,
                c.src_ioas_id,
                c.src_iova,
                fixed.then_some(c.dst_iova),
                c.length,
                c.flags & IOMMU_IOAS_MAP_READABLE != 0,
                c.flags & IOMMU_IOAS_MAP_WRITEABLE != 0,
            )?;
            c.dst_iova = iova;
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_IOAS_IOVA_RANGES => {
            let mut c = IommuIoasIovaRanges::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let (ranges, align) = ictx.ioas_iova_ranges(c.ioas_id)?;
            let max = c.num_iovas;
            for (i, r) in ranges.iter().enumerate().take(max as usize) {
                let elm = IommuIovaRange { start: r.start, last: r.last }.to_bytes();
                let at = c.allowed_iovas.checked_add(i as u64 * IommuIovaRange::SIZE as u64).ok_or(Errno::EFAULT)?;
                ictx.source().write_user(at, &elm)?;
            }
            c.num_iovas = ranges.len() as u32;
            c.out_iova_alignment = align;
            respond(&c.to_bytes(), user_size, buf)?;
            if c.num_iovas > max { Err(Errno::EMSGSIZE) } else { Ok(()) }
        }
        IOMMU_IOAS_MAP => {
            let mut c = IommuIoasMap::read(&kbuf);
            // (Linux tests `__reserved` with the flags: the same EOPNOTSUPP.)
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let (fixed, read, write) = map_args(c.flags, c.iova, c.length)?;
            let iova = ictx.ioas_map(c.ioas_id, fixed, c.user_va, c.length, read, write)?;
            c.iova = iova;
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_IOAS_MAP_FILE => {
            // Linux 6.13's `iommufd_ioas_map_file` order; the struct has no
            // reserved field.
            let mut c = IommuIoasMapFile::read(&kbuf);
            let (fixed, read, write) = map_args(c.flags, c.iova, c.length)?;
            let iova = ictx.ioas_map_file(c.ioas_id, fixed, c.fd, c.start, c.length, read, write)?;
            c.iova = iova;
            // A respond fault leaves the mapping in place, as Linux's does.
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_IOAS_CHANGE_PROCESS => {
            // Linux 6.14: `__reserved` first, then the areas. The caller is
            // the context's own process (see `Ictx::ioas_change_process`).
            let c = IommuIoasChangeProcess::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            ictx.ioas_change_process()
        }
        IOMMU_IOAS_UNMAP => {
            let mut c = IommuIoasUnmap::read(&kbuf);
            ictx.ioas(c.ioas_id)?;
            if !(c.iova == 0 && c.length == u64::MAX) && (c.iova == u64::MAX || c.length == u64::MAX) {
                return Err(Errno::EOVERFLOW);
            }
            c.length = ictx.ioas_unmap(c.ioas_id, c.iova, c.length)?;
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_OPTION => {
            let mut c = IommuOption::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            option(ictx, &mut c)?;
            // Only val64 goes back.
            let val = c.val64.to_le_bytes();
            let dst = buf.get_mut(16..24).ok_or(Errno::EFAULT)?;
            dst.copy_from_slice(&val);
            Ok(())
        }
        IOMMU_VFIO_IOAS => {
            let mut c = IommuVfioIoas::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            match c.op {
                IOMMU_VFIO_IOAS_GET => {
                    c.ioas_id = ictx.compat_ioas().ok_or(Errno::ENODEV)?;
                    respond(&c.to_bytes(), user_size, buf)
                }
                IOMMU_VFIO_IOAS_SET => {
                    ictx.ioas(c.ioas_id)?;
                    ictx.set_compat_ioas(Some(c.ioas_id));
                    Ok(())
                }
                IOMMU_VFIO_IOAS_CLEAR => {
                    ictx.set_compat_ioas(None);
                    Ok(())
                }
                _ => Err(Errno::EOPNOTSUPP),
            }
        }
        IOMMU_HWPT_ALLOC => {
            let mut c = IommuHwptAlloc::read(&kbuf);
            if c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            if (c.data_type == IOMMU_HWPT_DATA_NONE) != (c.data_len == 0) {
                return Err(Errno::EINVAL);
            }
            ictx.device(c.dev_id)?;
            let is_ioas = match ictx.ioas(c.pt_id) {
                Ok(_) => true,
                Err(_) if ictx.hwpt(c.pt_id).is_ok() => false,
                Err(_) => return Err(Errno::EINVAL),
            };
            let id = if is_ioas {
                // IOMMU_HWPT_ALLOC_PASID: the uAPI of PASID attach (6.15).
                if c.flags & !(IOMMU_HWPT_ALLOC_PAGING_VALID_FLAGS_6_12 | IOMMU_HWPT_ALLOC_PASID) != 0
                    || c.data_type != IOMMU_HWPT_DATA_NONE
                {
                    return Err(Errno::EOPNOTSUPP);
                }
                let dirty = c.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
                let nest_parent = c.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0;
                let pasid = c.flags & IOMMU_HWPT_ALLOC_PASID != 0;
                ictx.hwpt_alloc_pasid(c.dev_id, c.pt_id, dirty, nest_parent, pasid)?
            } else {
                let source = ictx.source();
                let data = UserData::new(&*source, c.data_type, c.data_uptr, c.data_len);
                ictx.hwpt_nested_alloc(c.dev_id, c.pt_id, c.flags, c.fault_id, &data)?
            };
            c.out_hwpt_id = id;
            respond(&c.to_bytes(), user_size, buf).inspect_err(|_| {
                let _ = ictx.destroy(id);
            })
        }
        IOMMU_GET_HW_INFO => {
            let mut c = IommuHwInfo::read(&kbuf);
            // `out_max_pasid_log2` is output only; the 6.12.y kernels check
            // only the three reserved bytes after it.
            if c.flags != 0 || c.__reserved != [0; 3] {
                return Err(Errno::EOPNOTSUPP);
            }
            let dev = ictx.device(c.dev_id)?;
            let (kind, data) = dev.hw_info();
            let n = (c.data_len as usize).min(data.len());
            if n > 0 {
                ictx.source().write_user(c.data_uptr, &data[..n])?;
            }
            if (c.data_len as usize) > data.len() {
                // Zero the caller's tail in place, a bounded chunk at a
                // time: the size is the caller's and must never size an
                // allocation here.
                zero_user(ictx, c.data_uptr, data.len() as u64, c.data_len as u64)?;
            }
            c.data_len = data.len() as u32;
            c.out_data_type = kind;
            c.out_capabilities = if dev.supports_dirty_tracking() { IOMMU_HW_CAP_DIRTY_TRACKING } else { 0 };
            // A driver's width past a byte is nonsense (PCI PASIDs have 20
            // bits); it saturates rather than wrapping.
            c.out_max_pasid_log2 = u8::try_from(dev.max_pasid_log2()).unwrap_or(u8::MAX);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_HWPT_SET_DIRTY_TRACKING => {
            // Linux does not check `__reserved` here.
            let c = IommuHwptSetDirtyTracking::read(&kbuf);
            if c.flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            ictx.hwpt_set_dirty_tracking(c.hwpt_id, c.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0)
        }
        IOMMU_HWPT_GET_DIRTY_BITMAP => {
            let c = IommuHwptGetDirtyBitmap::read(&kbuf);
            if c.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || c.__reserved != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let no_clear = c.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0;
            ictx.hwpt_get_dirty_bitmap(c.hwpt_id, c.iova, c.length, c.page_size, c.data, no_clear)
        }
        IOMMU_HWPT_INVALIDATE => {
            let mut c = IommuHwptInvalidate::read(&kbuf);
            let r = hwpt_invalidate(ictx, &mut c);
            // The count of requests handled always goes back, also on
            // failure; a fault writing it wins.
            respond(&c.to_bytes(), user_size, buf).map_err(|_| Errno::EFAULT)?;
            r
        }
        IOMMU_FAULT_QUEUE_ALLOC => {
            let mut c = IommuFaultAlloc::read(&kbuf);
            if c.flags != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let (id, fd) = ictx.fault_alloc()?;
            c.out_fault_id = id;
            c.out_fault_fd = fd;
            respond(&c.to_bytes(), user_size, buf).inspect_err(|_| {
                // Linux never installs the descriptor: both go.
                let _ = ictx.fault_fd_close(fd);
                let _ = ictx.destroy(id);
            })
        }
        #[cfg(feature = "selftest")]
        IOMMU_TEST_CMD => crate::selftest::cmd::test_cmd(ictx, &kbuf, user_size, buf),
        // Known to 6.12 but not implemented here yet (see module docs).
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// `IOMMU_HWPT_INVALIDATE` up to the response: leaves in `c.entry_num`
/// how many requests were handled (0 when failing before the driver).
fn hwpt_invalidate(ictx: &Ictx, c: &mut IommuHwptInvalidate) -> Result<()> {
    let num = core::mem::take(&mut c.entry_num);
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if num != 0 && (c.data_uptr == 0 || c.entry_len == 0) {
        return Err(Errno::EINVAL);
    }
    // Entries are read one at a time by the driver, each into its own
    // struct: entry_num * entry_len never sizes anything.
    let source = ictx.source();
    let mut array = UserDataArray::new(&*source, c.data_type, c.data_uptr, c.entry_len, num);
    let r = ictx.hwpt_invalidate(c.hwpt_id, &mut array);
    c.entry_num = array.entry_num;
    r
}

/// Zeroes bytes `[from, to)` of the caller's buffer at `uptr`, a page at a
/// time (chunks end at 4 KiB boundaries of the user address) from one
/// static page of zeroes. `EFAULT` when the range wraps or the memory
/// source refuses a page; the pages before it stay zeroed, as Linux's
/// `clear_user` leaves them.
fn zero_user(ictx: &Ictx, uptr: u64, from: u64, to: u64) -> Result<()> {
    static ZEROES: [u8; 4096] = [0; 4096];
    let mut at = from;
    while at < to {
        let addr = uptr.checked_add(at).ok_or(Errno::EFAULT)?;
        let n = (to - at).min(ZEROES.len() as u64 - addr % ZEROES.len() as u64);
        addr.checked_add(n).ok_or(Errno::EFAULT)?;
        ictx.source().write_user(addr, &ZEROES[..n as usize])?;
        at += n;
    }
    Ok(())
}

/// `iommufd_ucmd_respond`: the output struct, `min(user size, struct size)`
/// bytes of it.
pub(crate) fn respond(kernel: &[u8], user_size: u32, buf: &mut [u8]) -> Result<()> {
    uapi::give_back_checked(kernel, user_size, buf)
}

fn check_map_flags(flags: u32) -> Result<()> {
    if flags & !IOMMU_IOAS_MAP_VALID_FLAGS != 0 { Err(Errno::EOPNOTSUPP) } else { Ok(()) }
}

/// The argument checks `IOMMU_IOAS_MAP` and `IOMMU_IOAS_MAP_FILE` share,
/// in Linux's order: unknown flags (`EOPNOTSUPP`), an IOVA or length of
/// `u64::MAX` (`EOVERFLOW`), neither READABLE nor WRITEABLE (`EINVAL`).
/// Returns the fixed IOVA (if `FIXED_IOVA`), readable, writable.
fn map_args(flags: u32, iova: u64, length: u64) -> Result<(Option<u64>, bool, bool)> {
    check_map_flags(flags)?;
    if iova == u64::MAX || length == u64::MAX {
        return Err(Errno::EOVERFLOW);
    }
    check_map_prot(flags)?;
    Ok((
        (flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(iova),
        flags & IOMMU_IOAS_MAP_READABLE != 0,
        flags & IOMMU_IOAS_MAP_WRITEABLE != 0,
    ))
}

fn check_map_prot(flags: u32) -> Result<()> {
    if flags & (IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE) == 0 { Err(Errno::EINVAL) } else { Ok(()) }
}

/// Reads `num` `iommu_iova_range`s at `uptr`: EFAULT when unreadable,
/// EINVAL when `start >= last` or when one overlaps an earlier one.
fn load_ranges(ictx: &Ictx, uptr: u64, num: u32) -> Result<Vec<IovaRange>> {
    let mut out: Vec<IovaRange> = Vec::new();
    for i in 0..num as u64 {
        let mut b = [0u8; IommuIovaRange::SIZE];
        let at = i.checked_mul(IommuIovaRange::SIZE as u64).and_then(|o| uptr.checked_add(o)).ok_or(Errno::EFAULT)?;
        ictx.source().read_user(at, &mut b)?;
        let r = IommuIovaRange::read(&b);
        if r.start >= r.last {
            return Err(Errno::EINVAL);
        }
        if out.iter().any(|o| o.start <= r.last && r.start <= o.last) {
            return Err(Errno::EINVAL);
        }
        out.push(IovaRange { start: r.start, last: r.last });
    }
    Ok(out)
}

fn option(ictx: &Ictx, c: &mut IommuOption) -> Result<()> {
    if c.option_id == IOMMU_OPTION_RLIMIT_MODE {
        if c.object_id != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        return match c.op {
            IOMMU_OPTION_OP_GET => {
                c.val64 = (ictx.accounting().mode() == AccountMode::Mm) as u64;
                Ok(())
            }
            IOMMU_OPTION_OP_SET => match c.val64 {
                0 => ictx.set_account_mode(AccountMode::User),
                1 => ictx.set_account_mode(AccountMode::Mm),
                _ => {
                    // Linux checks for live objects before the value.
                    if ictx.object_count() != 0 { Err(Errno::EBUSY) } else { Err(Errno::EINVAL) }
                }
            },
            _ => Err(Errno::EOPNOTSUPP),
        };
    }
    // Linux 6.12 rejects an unknown option before looking the object up.
    if c.option_id != IOMMU_OPTION_HUGE_PAGES {
        return Err(Errno::EOPNOTSUPP);
    }
    let ioas = ictx.ioas(c.object_id)?;
    let _domains = ioas.domains_rw.write();
    let mut iopt = ioas.iopt.lock();
    match c.op {
        IOMMU_OPTION_OP_GET => {
            c.val64 = (!iopt.large_pages_disabled()) as u64;
            Ok(())
        }
        IOMMU_OPTION_OP_SET => match c.val64 {
            0 => iopt.disable_large_pages(),
            1 => {
                iopt.enable_large_pages();
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        },
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// Reserves `[start, start + length)` in IOAS `ioas_id` for the selftest.
#[cfg(feature = "selftest")]
/// Linux 6.12 (as shipped, 6.12.95) checks the range before the IOAS.
pub(crate) fn add_test_reserved(ictx: &Ictx, ioas_id: u32, start: u64, length: u64) -> Result<()> {
    if length == 0 {
        return Err(Errno::EINVAL);
    }
    let last = start.checked_add(length - 1).ok_or(Errno::EOVERFLOW)?;
    let ioas = ictx.ioas(ioas_id)?;
    ioas.iopt.lock().reserve(IovaRange { start, last }, Owner::Test)
}
