//! Test harness for the port of Linux's iommufd selftest.
//!
//! [`Fx`] plays the part of one open `/dev/iommu` in a test process: a fake
//! user address space ([`FakeAddressSpace`]) with the selftest's shared
//! `buffer` mapped at a fixed, huge-page aligned address (and, as in Linux
//! 6.13+, `mfd_buffer`: a memfd of the same size mapped shared), and an
//! [`Ictx`] over it. Each helper builds one uAPI struct, runs it through
//! [`iommufd::dispatch::ioctl`] and decodes what came back, like the
//! selftest's `test_ioctl_*` / `test_cmd_*` helpers: helpers return
//! `Result`, tests `unwrap()` where Linux asserts success and compare with
//! `Err(Errno::X)` where Linux expects an errno.
//!
//! Dropping a fixture does what the selftest's teardown does: close the
//! context, open a fresh one and check that no page of `buffer` is still
//! pinned (here also: no page of the address space at all).

#![allow(dead_code)] // not every fixture uses every helper

use iommufd::Errno;
use iommufd::ctx::Ictx;
use iommufd::dispatch::ioctl;
use iommufd::memsrc::{FakeAddressSpace, MemorySource};
use iommufd::uapi::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

pub type R<T> = Result<T, Errno>;

/// CPU page size of the fake address space.
pub const PAGE_SIZE: u64 = 4096;
/// The mock domain's I/O page: half a CPU page.
pub const MOCK_PAGE_SIZE: u64 = PAGE_SIZE / 2;
/// The transparent huge page size the selftest falls back to.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
/// Size of the shared buffer: 16 pages.
pub const BUFFER_SIZE: u64 = PAGE_SIZE * 16;
/// User address of the shared buffer (huge-page aligned).
pub const BUFFER: u64 = 0x7f55_0000_0000;
/// A page of user memory for arrays the helpers pass by pointer (range
/// lists, hw_info data), away from `BUFFER` so it never disturbs it.
pub const SCRATCH: u64 = 0x7f66_0000_0000;
pub const SCRATCH_SIZE: u64 = PAGE_SIZE * 4;
/// Where `Fx::mmap` hands out fresh address ranges.
const MMAP_BASE: u64 = 0x7e00_0000_0000;
/// User address of `mfd_buffer`: the selftest's memfd of `BUFFER_SIZE`
/// (Linux 6.13+), mapped shared.
pub const MFD_BUFFER: u64 = 0x7f77_0000_0000;

/// `IOMMU_TEST_CMD`'s size.
const TEST_CMD_SIZE: u32 = IommuTestCmd::SIZE as u32;

/// One open iommufd and the memory of the process that opened it.
pub struct Fx {
    pub mem: Arc<FakeAddressSpace>,
    /// The selftest's `mfd`: a memfd of `BUFFER_SIZE`, mapped at
    /// [`MFD_BUFFER`].
    pub mfd: i32,
    ictx: Option<Ictx>,
    next_va: Cell<u64>,
    /// Access "fd" -> access object id (see [`Fx::destroy_access`]).
    access_objects: RefCell<HashMap<u32, u32>>,
}

impl Fx {
    /// Opens a context, with `buffer` and the scratch pages mapped.
    pub fn open() -> Self {
        let mem = Arc::new(FakeAddressSpace::new());
        mem.map(BUFFER, BUFFER_SIZE, true);
        mem.map(SCRATCH, SCRATCH_SIZE, true);
        let mfd = mem.create_memfd(BUFFER_SIZE);
        mem.map_file(MFD_BUFFER, mfd, 0, BUFFER_SIZE);
        let ictx = Ictx::new(mem.clone(), u64::MAX);
        Self { mem, mfd, ictx: Some(ictx), next_va: Cell::new(MMAP_BASE), access_objects: RefCell::new(HashMap::new()) }
    }

    pub fn ictx(&self) -> &Ictx {
        self.ictx.as_ref().expect("context is open")
    }

    /// A raw ioctl on the argument bytes `buf`.
    pub fn ioctl(&self, cmd: u32, buf: &mut [u8]) -> R<()> {
        ioctl(self.ictx(), cmd, buf)
    }

    /// Runs `cmd` on a copy of `arg`; returns the result and the argument
    /// bytes as the call left them.
    pub fn run(&self, cmd: u32, arg: Vec<u8>) -> (R<()>, Vec<u8>) {
        let mut buf = arg;
        let r = self.ioctl(cmd, &mut buf);
        (r, buf)
    }

    // -- user memory ---------------------------------------------------

    /// A fresh, huge-page aligned range of `len` bytes of address space,
    /// not mapped (map parts of it with [`Self::map_va`]).
    pub fn reserve_va(&self, len: u64) -> u64 {
        let va = self.next_va.get();
        let end = (va + len).next_multiple_of(HUGEPAGE_SIZE) + HUGEPAGE_SIZE;
        self.next_va.set(end);
        va
    }

    /// Maps `[va, va + len)` writable.
    pub fn map_va(&self, va: u64, len: u64) {
        self.mem.map(va, len, true);
    }

    /// `mmap(NULL, len)`: a fresh mapping of `len` bytes, huge-page aligned
    /// (the fake address space backs aligned 2 MiB runs contiguously, as a
    /// hugetlb or THP mapping would be).
    pub fn mmap(&self, len: u64) -> u64 {
        let va = self.reserve_va(len);
        self.map_va(va, len);
        va
    }

    /// `memfd_mmap(len, ..., MAP_SHARED, &mfd)`: a new memfd of `len`
    /// bytes mapped shared at a fresh, huge-page aligned address; returns
    /// `(address, descriptor)`.
    pub fn memfd_mmap(&self, len: u64) -> (u64, i32) {
        let fd = self.mem.create_memfd(len);
        let va = self.reserve_va(len);
        self.mem.map_file(va, fd, 0, len);
        (va, fd)
    }

    /// `ftruncate(fd, len)`.
    pub fn ftruncate(&self, fd: i32, len: u64) -> R<()> {
        self.mem.truncate(fd, len)
    }

    /// `close(fd)` of a file descriptor.
    pub fn close(&self, fd: i32) -> R<()> {
        self.mem.close_fd(fd)
    }

    pub fn write_user(&self, uptr: u64, bytes: &[u8]) {
        self.mem.write_user(uptr, bytes).expect("user memory is mapped");
    }

    pub fn read_user(&self, uptr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_user(uptr, &mut v).expect("user memory is mapped");
        v
    }

    pub fn fill_user(&self, uptr: u64, len: u64, byte: u8) {
        self.write_user(uptr, &vec![byte; len as usize]);
    }

    /// Writes `ranges` as an `iommu_iova_range` array at `uptr`.
    pub fn write_ranges(&self, uptr: u64, ranges: &[(u64, u64)]) {
        let mut bytes = Vec::new();
        for &(start, last) in ranges {
            bytes.extend(IommuIovaRange { start, last }.to_bytes());
        }
        self.write_user(uptr, &bytes);
    }

    /// Reads `n` `iommu_iova_range`s at `uptr`.
    pub fn read_ranges(&self, uptr: u64, n: usize) -> Vec<(u64, u64)> {
        let bytes = self.read_user(uptr, n * IommuIovaRange::SIZE);
        bytes.chunks(IommuIovaRange::SIZE).map(IommuIovaRange::read).map(|r| (r.start, r.last)).collect()
    }

    // -- native iommufd ioctls ------------------------------------------

    pub fn destroy(&self, id: u32) -> R<()> {
        self.run(IOMMU_DESTROY, IommuDestroy { size: IommuDestroy::SIZE as u32, id }.to_bytes()).0
    }

    pub fn ioas_alloc(&self) -> R<u32> {
        let c = IommuIoasAlloc { size: IommuIoasAlloc::SIZE as u32, ..Default::default() };
        let (r, out) = self.run(IOMMU_IOAS_ALLOC, c.to_bytes());
        r?;
        let id = IommuIoasAlloc::read(&out).out_ioas_id;
        assert_ne!(id, 0, "IOAS ids are never 0");
        Ok(id)
    }

    /// `_test_ioctl_ioas_map`: `*iova` is the input IOVA when `flags` has
    /// FIXED_IOVA and receives `cmd.iova` after the call either way.
    pub fn ioas_map_raw(&self, ioas_id: u32, uptr: u64, length: u64, iova: &mut u64, flags: u32) -> R<()> {
        let mut c = IommuIoasMap {
            size: IommuIoasMap::SIZE as u32,
            flags,
            ioas_id,
            user_va: uptr,
            length,
            ..Default::default()
        };
        if flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
            c.iova = *iova;
        }
        let (r, out) = self.run(IOMMU_IOAS_MAP, c.to_bytes());
        *iova = IommuIoasMap::read(&out).iova;
        r
    }

    /// `test_ioctl_ioas_map_id`: read/write mapping at an IOVA the kernel picks.
    pub fn ioas_map(&self, ioas_id: u32, uptr: u64, length: u64) -> R<u64> {
        let mut iova = 0;
        self.ioas_map_raw(ioas_id, uptr, length, &mut iova, IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE)?;
        Ok(iova)
    }

    /// `test_ioctl_ioas_map_fixed_id`: read/write mapping at `iova`.
    pub fn ioas_map_fixed(&self, ioas_id: u32, uptr: u64, length: u64, iova: u64) -> R<()> {
        let mut at = iova;
        let flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
        self.ioas_map_raw(ioas_id, uptr, length, &mut at, flags)
    }

    /// `_test_ioctl_ioas_map_file` (Linux 6.13+): `*iova` is the input
    /// IOVA when `flags` has FIXED_IOVA and receives `cmd.iova` after the
    /// call either way.
    pub fn ioas_map_file_raw(
        &self,
        ioas_id: u32,
        mfd: i32,
        start: u64,
        length: u64,
        iova: &mut u64,
        flags: u32,
    ) -> R<()> {
        let mut c = IommuIoasMapFile {
            size: IommuIoasMapFile::SIZE as u32,
            flags,
            ioas_id,
            fd: mfd,
            start,
            length,
            ..Default::default()
        };
        if flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
            c.iova = *iova;
        }
        let (r, out) = self.run(IOMMU_IOAS_MAP_FILE, c.to_bytes());
        *iova = IommuIoasMapFile::read(&out).iova;
        r
    }

    /// `test_ioctl_ioas_map_id_file`: read/write mapping of `[start,
    /// start + length)` of `mfd` at an IOVA the kernel picks.
    pub fn ioas_map_file(&self, ioas_id: u32, mfd: i32, start: u64, length: u64) -> R<u64> {
        let mut iova = 0;
        let flags = IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
        self.ioas_map_file_raw(ioas_id, mfd, start, length, &mut iova, flags)?;
        Ok(iova)
    }

    /// `ioctl(IOMMU_IOAS_CHANGE_PROCESS)` (Linux 6.14+) from the process
    /// that opened the context.
    pub fn change_process(&self) -> R<()> {
        let c = IommuIoasChangeProcess { size: IommuIoasChangeProcess::SIZE as u32, __reserved: 0 };
        self.run(IOMMU_IOAS_CHANGE_PROCESS, c.to_bytes()).0
    }

    /// `_test_ioctl_ioas_unmap`: returns `cmd.length` after the call
    /// (the bytes unmapped on success) next to the result.
    pub fn ioas_unmap_raw(&self, ioas_id: u32, iova: u64, length: u64) -> (R<()>, u64) {
        let c = IommuIoasUnmap { size: IommuIoasUnmap::SIZE as u32, ioas_id, iova, length };
        let (r, out) = self.run(IOMMU_IOAS_UNMAP, c.to_bytes());
        (r, IommuIoasUnmap::read(&out).length)
    }

    pub fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> R<()> {
        self.ioas_unmap_raw(ioas_id, iova, length).0
    }

    /// IOMMU_IOAS_COPY with the given struct (size filled in); returns the
    /// struct as the call left it.
    pub fn ioas_copy(&self, mut c: IommuIoasCopy) -> (R<()>, IommuIoasCopy) {
        c.size = IommuIoasCopy::SIZE as u32;
        let (r, out) = self.run(IOMMU_IOAS_COPY, c.to_bytes());
        (r, IommuIoasCopy::read(&out))
    }

    /// IOMMU_IOAS_ALLOW_IOVAS with the array already in user memory.
    pub fn allow_iovas_at(&self, ioas_id: u32, num_iovas: u32, uptr: u64) -> R<()> {
        let c = IommuIoasAllowIovas {
            size: IommuIoasAllowIovas::SIZE as u32,
            ioas_id,
            num_iovas,
            allowed_iovas: uptr,
            ..Default::default()
        };
        self.run(IOMMU_IOAS_ALLOW_IOVAS, c.to_bytes()).0
    }

    /// IOMMU_IOAS_ALLOW_IOVAS with `ranges` written to the scratch page.
    pub fn allow_iovas(&self, ioas_id: u32, ranges: &[(u64, u64)]) -> R<()> {
        self.write_ranges(SCRATCH, ranges);
        self.allow_iovas_at(ioas_id, ranges.len() as u32, SCRATCH)
    }

    /// IOMMU_IOAS_IOVA_RANGES into the array at `uptr` with room for
    /// `num_iovas`; returns the struct as the call left it.
    pub fn iova_ranges(&self, ioas_id: u32, num_iovas: u32, uptr: u64) -> (R<()>, IommuIoasIovaRanges) {
        let c = IommuIoasIovaRanges {
            size: IommuIoasIovaRanges::SIZE as u32,
            ioas_id,
            num_iovas,
            allowed_iovas: uptr,
            ..Default::default()
        };
        let (r, out) = self.run(IOMMU_IOAS_IOVA_RANGES, c.to_bytes());
        (r, IommuIoasIovaRanges::read(&out))
    }

    /// IOMMU_OPTION; returns the struct as the call left it.
    pub fn option(&self, option_id: u32, op: u16, object_id: u32, val64: u64) -> (R<()>, IommuOption) {
        let c = IommuOption { size: IommuOption::SIZE as u32, option_id, op, object_id, val64, ..Default::default() };
        let (r, out) = self.run(IOMMU_OPTION, c.to_bytes());
        (r, IommuOption::read(&out))
    }

    /// IOMMU_VFIO_IOAS; returns the struct as the call left it.
    pub fn vfio_ioas(&self, op: u16, ioas_id: u32) -> (R<()>, IommuVfioIoas) {
        let c = IommuVfioIoas { size: IommuVfioIoas::SIZE as u32, op, ioas_id, ..Default::default() };
        let (r, out) = self.run(IOMMU_VFIO_IOAS, c.to_bytes());
        (r, IommuVfioIoas::read(&out))
    }

    /// `_test_cmd_hwpt_alloc`.
    #[allow(clippy::too_many_arguments)]
    pub fn hwpt_alloc_raw(
        &self,
        dev_id: u32,
        pt_id: u32,
        fault_id: u32,
        flags: u32,
        data_type: u32,
        data_uptr: u64,
        data_len: u32,
    ) -> R<u32> {
        let c = IommuHwptAlloc {
            size: IommuHwptAlloc::SIZE as u32,
            flags,
            dev_id,
            pt_id,
            data_type,
            data_len,
            data_uptr,
            fault_id,
            ..Default::default()
        };
        let (r, out) = self.run(IOMMU_HWPT_ALLOC, c.to_bytes());
        r?;
        Ok(IommuHwptAlloc::read(&out).out_hwpt_id)
    }

    /// `_test_cmd_hwpt_invalidate`: `entry_num` requests of `entry_len`
    /// bytes at `data_uptr`; returns the result and the `entry_num` the
    /// kernel wrote back (requests handled).
    pub fn hwpt_invalidate(
        &self,
        hwpt_id: u32,
        data_uptr: u64,
        data_type: u32,
        entry_len: u32,
        entry_num: u32,
    ) -> (R<()>, u32) {
        let c = IommuHwptInvalidate {
            size: IommuHwptInvalidate::SIZE as u32,
            hwpt_id,
            data_uptr,
            data_type,
            entry_len,
            entry_num,
            ..Default::default()
        };
        let (r, out) = self.run(IOMMU_HWPT_INVALIDATE, c.to_bytes());
        (r, IommuHwptInvalidate::read(&out).entry_num)
    }

    /// `test_cmd_hwpt_check_iotlb`: entry `iotlb_id` of a mock nested
    /// domain's IOTLB holds `expected`.
    pub fn check_iotlb(&self, hwpt_id: u32, iotlb_id: u32, expected: u32) -> R<()> {
        let p = IommuTestCheckIotlb { id: iotlb_id, iotlb: expected };
        self.test_cmd(IOMMU_TEST_OP_MD_CHECK_IOTLB, hwpt_id, &p.to_bytes()).0
    }

    /// `test_cmd_hwpt_check_iotlb_all`.
    pub fn check_iotlb_all(&self, hwpt_id: u32, expected: u32) -> R<()> {
        (0..MOCK_NESTED_DOMAIN_IOTLB_NUM).try_for_each(|i| self.check_iotlb(hwpt_id, i, expected))
    }

    /// `test_cmd_hwpt_alloc`: a paging HWPT (no driver data).
    pub fn hwpt_alloc(&self, dev_id: u32, pt_id: u32, flags: u32) -> R<u32> {
        self.hwpt_alloc_raw(dev_id, pt_id, 0, flags, IOMMU_HWPT_DATA_NONE, 0, 0)
    }

    /// IOMMU_GET_HW_INFO into `data_len` bytes at `data_uptr`; returns the
    /// struct as the call left it.
    pub fn get_hw_info_raw(&self, dev_id: u32, data_uptr: u64, data_len: u32) -> (R<()>, IommuHwInfo) {
        let c = IommuHwInfo { size: IommuHwInfo::SIZE as u32, dev_id, data_len, data_uptr, ..Default::default() };
        let (r, out) = self.run(IOMMU_GET_HW_INFO, c.to_bytes());
        (r, IommuHwInfo::read(&out))
    }

    /// `_test_cmd_get_hw_info` (6.12 form): on success checks what the
    /// selftest checks — the selftest data type, `data_len` set to the
    /// driver's 8 bytes, a longer user buffer zero-filled past them, and
    /// the `flags` / `test_reg` fields that fit in the user buffer. The
    /// user buffer is filled with 0xa5 first so those checks mean
    /// something. Returns `out_capabilities`.
    pub fn get_hw_info(&self, dev_id: u32, data_uptr: u64, data_len: u32) -> R<u64> {
        if data_uptr != 0 {
            self.fill_user(data_uptr, data_len as u64, 0xa5);
        }
        let (r, out) = self.get_hw_info_raw(dev_id, data_uptr, data_len);
        r?;
        assert_eq!(out.out_data_type, IOMMU_HW_INFO_TYPE_SELFTEST);
        // struct iommu_test_hw_info { __u32 flags; __u32 test_reg; }
        assert_eq!(out.data_len, 8, "data_len is the driver's struct size");
        if data_uptr != 0 {
            let got = self.read_user(data_uptr, data_len as usize);
            if data_len > 8 {
                assert!(got[8..].iter().all(|&b| b == 0), "trailing bytes zeroed");
            }
            if data_len >= 8 {
                assert_eq!(u32::from_le_bytes(got[4..8].try_into().unwrap()), IOMMU_HW_INFO_SELFTEST_REGVAL);
            }
            if data_len >= 4 {
                assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 0, "flags");
            }
        }
        Ok(out.out_capabilities)
    }

    // -- IOMMU_TEST_CMD ----------------------------------------------------

    /// One selftest op with `payload` at the start of the op union; returns
    /// the command as the call left it.
    pub fn test_cmd(&self, op: u32, id: u32, payload: &[u8]) -> (R<()>, IommuTestCmd) {
        let mut c = IommuTestCmd { size: TEST_CMD_SIZE, op, id, ..Default::default() };
        c.payload[..payload.len()].copy_from_slice(payload);
        let (r, out) = self.run(IOMMU_TEST_CMD, c.to_bytes());
        (r, IommuTestCmd::read(&out))
    }

    /// `IOMMU_TEST_OP_ADD_RESERVED`.
    pub fn add_reserved(&self, ioas_id: u32, start: u64, length: u64) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_ADD_RESERVED, ioas_id, &IommuTestAddReserved { start, length }.to_bytes()).0
    }

    /// `_test_cmd_mock_domain`: a mock device attached to `pt_id`;
    /// returns `(stdev_id, hwpt_id, idev_id)`.
    pub fn mock_domain(&self, pt_id: u32) -> R<(u32, u32, u32)> {
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_MOCK_DOMAIN, pt_id, &[]);
        r?;
        assert_ne!(out.id, 0);
        let m = IommuTestMockDomain::read(&out.payload);
        Ok((m.out_stdev_id, m.out_hwpt_id, m.out_idev_id))
    }

    /// `_test_cmd_mock_domain_flags`.
    pub fn mock_domain_flags(&self, pt_id: u32, dev_flags: u32) -> R<(u32, u32, u32)> {
        let p = IommuTestMockDomainFlags { dev_flags, ..Default::default() };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, pt_id, &p.to_bytes());
        r?;
        assert_ne!(out.id, 0);
        let m = IommuTestMockDomainFlags::read(&out.payload);
        Ok((m.out_stdev_id, m.out_hwpt_id, m.out_idev_id))
    }

    /// `_test_ioctl_fault_alloc`: returns `(fault_id, fault_fd)`.
    pub fn fault_alloc(&self) -> R<(u32, u32)> {
        let c = IommuFaultAlloc { size: IommuFaultAlloc::SIZE as u32, ..Default::default() };
        let (r, out) = self.run(IOMMU_FAULT_QUEUE_ALLOC, c.to_bytes());
        r?;
        let c = IommuFaultAlloc::read(&out);
        assert_ne!(c.out_fault_id, 0);
        assert_ne!(c.out_fault_fd, 0);
        Ok((c.out_fault_id, c.out_fault_fd))
    }

    /// `close(fault_fd)`: [`Ictx::fault_fd_close`].
    pub fn close_fault_fd(&self, fault_fd: u32) -> R<()> {
        self.ictx().fault_fd_close(fault_fd)
    }

    /// `_test_cmd_trigger_iopf`: a page request for `dev_id` (PASID 1,
    /// group 2, read/write at 0xdeadbeaf), one record read from the fault
    /// "fd" and answered SUCCESS with its cookie; a read or write that
    /// moves nothing is `EIO`.
    pub fn trigger_iopf(&self, dev_id: u32, fault_fd: u32) -> R<()> {
        let t = IommuTestTriggerIopf {
            dev_id,
            pasid: 1,
            grpid: 2,
            perm: IOMMU_PGFAULT_PERM_READ | IOMMU_PGFAULT_PERM_WRITE,
            addr: 0xdead_beaf,
        };
        self.test_cmd(IOMMU_TEST_OP_TRIGGER_IOPF, 0, &t.to_bytes()).0?;
        let mut rec = [0u8; IommuHwptPgfault::SIZE];
        if self.ictx().fault_fd_read(fault_fd, &mut rec).unwrap_or(0) == 0 {
            return Err(Errno::EIO);
        }
        let fault = IommuHwptPgfault::read(&rec);
        let resp = IommuHwptPageResponse { cookie: fault.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
        if self.ictx().fault_fd_write(fault_fd, &resp.to_bytes()).unwrap_or(0) == 0 {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `_test_cmd_trigger_iopf_pasid` (Linux 6.15): as [`Self::trigger_iopf`]
    /// with the request tagged with `pasid`; also checks that the record
    /// read carries that PASID.
    pub fn trigger_iopf_pasid(&self, dev_id: u32, pasid: u32, fault_fd: u32) -> R<()> {
        let t = IommuTestTriggerIopf {
            dev_id,
            pasid,
            grpid: 2,
            perm: IOMMU_PGFAULT_PERM_READ | IOMMU_PGFAULT_PERM_WRITE,
            addr: 0xdead_beaf,
        };
        self.test_cmd(IOMMU_TEST_OP_TRIGGER_IOPF, 0, &t.to_bytes()).0?;
        let mut rec = [0u8; IommuHwptPgfault::SIZE];
        if self.ictx().fault_fd_read(fault_fd, &mut rec).unwrap_or(0) == 0 {
            return Err(Errno::EIO);
        }
        let fault = IommuHwptPgfault::read(&rec);
        assert_eq!(
            (fault.pasid, fault.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID),
            (pasid, IOMMU_PGFAULT_FLAGS_PASID_VALID)
        );
        let resp = IommuHwptPageResponse { cookie: fault.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
        if self.ictx().fault_fd_write(fault_fd, &resp.to_bytes()).unwrap_or(0) == 0 {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// `_test_cmd_pasid_attach` (Linux 6.15): returns the `pt_id` written
    /// back (the HWPT used).
    pub fn pasid_attach(&self, stdev_id: u32, pasid: u32, pt_id: u32) -> R<u32> {
        let p = IommuTestPasidAttach { pasid, pt_id };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_PASID_ATTACH, stdev_id, &p.to_bytes());
        r?;
        Ok(IommuTestPasidAttach::read(&out.payload).pt_id)
    }

    /// `_test_cmd_pasid_replace` (Linux 6.15).
    pub fn pasid_replace(&self, stdev_id: u32, pasid: u32, pt_id: u32) -> R<u32> {
        let p = IommuTestPasidAttach { pasid, pt_id };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_PASID_REPLACE, stdev_id, &p.to_bytes());
        r?;
        Ok(IommuTestPasidAttach::read(&out.payload).pt_id)
    }

    /// `_test_cmd_pasid_detach` (Linux 6.15).
    pub fn pasid_detach(&self, stdev_id: u32, pasid: u32) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_PASID_DETACH, stdev_id, &IommuTestPasidDetach { pasid }.to_bytes()).0
    }

    /// `test_cmd_pasid_check_hwpt` (Linux 6.15): `Ok` when `pasid` is
    /// attached to `hwpt_id` (0: to nothing).
    pub fn pasid_check_hwpt(&self, stdev_id: u32, pasid: u32, hwpt_id: u32) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_PASID_CHECK_HWPT, stdev_id, &IommuTestPasidCheck { pasid, hwpt_id }.to_bytes()).0
    }

    /// `_test_cmd_mock_domain_replace`: returns the new `pt_id`.
    pub fn mock_domain_replace(&self, stdev_id: u32, pt_id: u32) -> R<u32> {
        let p = IommuTestMockDomainReplace { pt_id };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev_id, &p.to_bytes());
        r?;
        Ok(IommuTestMockDomainReplace::read(&out.payload).pt_id)
    }

    /// `IOMMU_TEST_OP_MD_CHECK_MAP`.
    pub fn check_map(&self, hwpt_id: u32, iova: u64, length: u64, uptr: u64) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_MD_CHECK_MAP, hwpt_id, &IommuTestCheckMap { iova, length, uptr }.to_bytes()).0
    }

    /// `check_refs`.
    pub fn check_refs(&self, uptr: u64, length: u64, refs: u32) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_MD_CHECK_REFS, 0, &IommuTestCheckRefs { length, uptr, refs }.to_bytes()).0
    }

    /// `test_ioctl_set_temp_memory_limit`.
    pub fn set_temp_memory_limit(&self, limit: u32) -> R<()> {
        self.test_cmd(IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT, 0, &IommuTestMemoryLimit { limit }.to_bytes()).0
    }

    /// `test_ioctl_set_default_memory_limit`.
    pub fn set_default_memory_limit(&self) -> R<()> {
        self.set_temp_memory_limit(65536)
    }
}

impl Fx {
    // -- accesses (IOMMU_TEST_OP_*ACCESS*) ----------------------------------

    /// `test_cmd_create_access`: returns the access "fd".
    pub fn create_access(&self, ioas_id: u32, flags: u32) -> R<u32> {
        let before = self.ictx().object_ids();
        let p = IommuTestCreateAccess { flags, ..Default::default() };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_CREATE_ACCESS, ioas_id, &p.to_bytes());
        r?;
        let fd = IommuTestCreateAccess::read(&out.payload).out_access_fd;
        let new: Vec<u32> = self.ictx().object_ids().into_iter().filter(|id| !before.contains(id)).collect();
        assert_eq!(new.len(), 1, "CREATE_ACCESS makes one object");
        self.access_objects.borrow_mut().insert(fd, new[0]);
        Ok(fd)
    }

    /// `test_cmd_destroy_access`: Linux closes the access fd, which
    /// destroys the access. The selftest commands have no "close" for
    /// their access descriptors, so this destroys the access object that
    /// `create_access` saw appear (`Ictx::access_destroy`); the descriptor
    /// itself stays in the selftest's table, unused.
    pub fn destroy_access(&self, access_fd: u32) -> R<()> {
        let id = self.access_objects.borrow_mut().remove(&access_fd).expect("an access this fixture created");
        self.ictx().access_destroy(id)
    }

    /// `IOMMU_TEST_OP_ACCESS_PAGES`: returns `out_access_pages_id`.
    pub fn access_pages(&self, access_id: u32, flags: u32, iova: u64, length: u64, uptr: u64) -> R<u32> {
        let p = IommuTestAccessPages { flags, iova, length, uptr, ..Default::default() };
        let (r, out) = self.test_cmd(IOMMU_TEST_OP_ACCESS_PAGES, access_id, &p.to_bytes());
        r?;
        Ok(IommuTestAccessPages::read(&out.payload).out_access_pages_id)
    }

    /// `test_cmd_destroy_access_pages`.
    pub fn destroy_access_pages(&self, access_id: u32, access_pages_id: u32) -> R<()> {
        let p = IommuTestDestroyAccessPages { access_pages_id };
        self.test_cmd(IOMMU_TEST_OP_DESTROY_ACCESS_PAGES, access_id, &p.to_bytes()).0
    }

    /// `IOMMU_TEST_OP_ACCESS_RW`.
    pub fn access_rw(&self, access_id: u32, iova: u64, length: u64, uptr: u64, flags: u32) -> R<()> {
        let p = IommuTestAccessRw { iova, length, uptr, flags };
        self.test_cmd(IOMMU_TEST_OP_ACCESS_RW, access_id, &p.to_bytes()).0
    }

    /// `test_cmd_access_replace_ioas`.
    pub fn access_replace_ioas(&self, access_id: u32, ioas_id: u32) -> R<()> {
        let p = IommuTestAccessReplaceIoas { ioas_id };
        self.test_cmd(IOMMU_TEST_OP_ACCESS_REPLACE_IOAS, access_id, &p.to_bytes()).0
    }
}

impl Fx {
    // -- VFIO type1 compat (`iommufd::vfio::vfio_ioctl`) ------------------

    /// A VFIO container ioctl with a value argument; returns the ioctl's result.
    pub fn vfio(&self, cmd: u32, arg: u64) -> R<i64> {
        iommufd::vfio::vfio_ioctl(self.ictx(), cmd, arg)
    }

    /// A VFIO container ioctl whose argument is a struct: `arg` is written
    /// at user address `at`, its address passed; returns the result and
    /// the `arg.len()` bytes at `at` after the call.
    pub fn vfio_struct(&self, cmd: u32, at: u64, arg: &[u8]) -> (R<i64>, Vec<u8>) {
        self.write_user(at, arg);
        let r = self.vfio(cmd, at);
        (r, self.read_user(at, arg.len()))
    }
}

/// A small deterministic generator standing in for the selftest's `rand()`.
pub struct Rand(u64);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next_u16(&mut self) -> u16 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as u16
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(2)).flat_map(|_| self.next_u16().to_le_bytes()).take(n).collect()
    }
}

impl Drop for Fx {
    /// `teardown_iommufd`: close, reopen, nothing of `buffer` pinned.
    fn drop(&mut self) {
        drop(self.ictx.take());
        if std::thread::panicking() {
            return;
        }
        let fresh = Ictx::new(self.mem.clone(), u64::MAX);
        let c = IommuTestCmd {
            size: TEST_CMD_SIZE,
            op: IOMMU_TEST_OP_MD_CHECK_REFS,
            payload: {
                let mut p = [0u8; IOMMU_TEST_CMD_UNION_SIZE];
                IommuTestCheckRefs { length: BUFFER_SIZE, uptr: BUFFER, refs: 0 }.write(&mut p);
                p
            },
            ..Default::default()
        };
        let mut buf = c.to_bytes();
        assert_eq!(ioctl(&fresh, IOMMU_TEST_CMD, &mut buf), Ok(()), "buffer still pinned after close");
        assert_eq!(self.mem.pinned_pages(), 0, "pages still pinned after close");
    }
}
