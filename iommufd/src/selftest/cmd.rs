//! `IOMMU_TEST_CMD`: the selftest operations, on the mock domain.
//!
//! Implemented: ADD_RESERVED, MOCK_DOMAIN, MOCK_DOMAIN_FLAGS,
//! MOCK_DOMAIN_REPLACE, MD_CHECK_MAP, MD_CHECK_REFS, SET_TEMP_MEMORY_LIMIT,
//! CREATE_ACCESS, ACCESS_PAGES, DESTROY_ACCESS_PAGES, ACCESS_RW,
//! ACCESS_REPLACE_IOAS, DIRTY, MD_CHECK_IOTLB (the mock nested domain),
//! TRIGGER_IOPF (a page request into the device's fault queue), and
//! Linux 6.15's PASID_ATTACH, PASID_REPLACE, PASID_DETACH and
//! PASID_CHECK_HWPT (PASID 0 in them means the requester id, as the
//! Linux handlers pass the PASID on to the attach functions, where 0 is
//! `IOMMU_NO_PASID`).
//!
//! Linux hands an access to user space as a file descriptor; here the
//! "descriptors" are numbers from 3 up, never reused, drawn from the
//! context's counter that fault queues also use.

use super::mock::{MOCK_IO_PAGE_SIZE, MockDomain, MockFaults, MockNestedDomain};
use crate::ctx::{DeviceOps, Ictx, NestedDomain, NestingOps, PageRequest, UserData};
use crate::dispatch::{add_test_reserved, respond};
use crate::errno::{Errno, Result};
use crate::memsrc::PAGE_SIZE;
use crate::uapi::*;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};

static NEXT_MOCK_DEVICE: AtomicU64 = AtomicU64::new(1);

/// Selftest state of one context: the access "file descriptors".
#[derive(Debug, Default)]
pub struct State {
    accesses: alloc::collections::BTreeMap<u32, (u32, Arc<MockAccess>)>,
}

/// One `ACCESS_PAGES` pin a mock access holds.
#[derive(Debug, Clone, Copy)]
struct Item {
    id: u32,
    iova: u64,
    length: u64,
}

/// The selftest's access driver: remembers its pins and drops the ones an
/// unmap covers when told.
#[derive(Debug, Default)]
pub struct MockAccess {
    needs_pin: bool,
    items: spin::Mutex<Vec<Item>>,
    next_item: core::sync::atomic::AtomicU32,
}

impl MockAccess {
    /// A mock access; `needs_pin` as `MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES`.
    pub fn new(needs_pin: bool) -> Self {
        Self { needs_pin, ..Self::default() }
    }

    /// Records a pin so a later unmap notification releases it.
    pub fn remember(&self, iova: u64, length: u64) -> u32 {
        let id = self.next_item.fetch_add(1, Ordering::Relaxed);
        self.items.lock().push(Item { id, iova, length });
        id
    }
}

impl crate::ctx::AccessOps for MockAccess {
    fn unmap(&self, ictx: &Ictx, access_id: u32, iova: u64, length: u64) {
        let last = iova.saturating_add(length.max(1) - 1);
        let hit: Vec<Item> = {
            let mut items = self.items.lock();
            let (hit, keep): (Vec<Item>, Vec<Item>) =
                items.iter().partition(|it| it.iova <= last && it.iova.saturating_add(it.length) > iova);
            *items = keep;
            hit
        };
        for it in hit {
            let _ = ictx.access_unpin_pages(access_id, it.iova, it.length);
        }
    }
    fn needs_pin_pages(&self) -> bool {
        self.needs_pin
    }
}

/// The selftest's syzkaller aid: with `MOCK_FLAGS_ACCESS_SYZ`, an IOVA is
/// read as `{ nth_area: u32, offset: u32 }` (little endian) and becomes
/// the IOVA of the IOAS's nth area plus the offset (0 when there is no
/// such area). The flag is cleared either way.
pub fn syz_conv_iova_id(ictx: &Ictx, ioas_id: u32, iova: &mut u64, flags: &mut u32) {
    if *flags & MOCK_FLAGS_ACCESS_SYZ == 0 {
        return;
    }
    *flags &= !MOCK_FLAGS_ACCESS_SYZ;
    if let Ok(ioas) = ictx.ioas(ioas_id) {
        *iova = syz_conv(&ioas.iopt.lock(), *iova);
    }
}

fn syz_conv(iopt: &crate::iopt::IoPagetable, iova: u64) -> u64 {
    let (nth, offset) = (iova as u32, (iova >> 32) as u32);
    iopt.areas().nth(nth as usize).map_or(0, |(start, _, _)| start.wrapping_add(offset as u64))
}

fn access_of(ictx: &Ictx, fd: u32) -> Result<(u32, Arc<MockAccess>)> {
    ictx.selftest.lock().accesses.get(&fd).cloned().ok_or(Errno::EBADFD)
}

/// Closes a selftest access "descriptor" (`out_access_fd` of
/// `CREATE_ACCESS`), as `close(2)` of Linux's access file does: the access
/// is destroyed, dropping every pin it still holds. `EBADF` when `fd`
/// names no open access of this context. For hosts that hand the number
/// out as a real descriptor (the `LD_PRELOAD` interposer).
pub fn close_access_fd(ictx: &Ictx, fd: u32) -> Result<()> {
    let (id, _) = ictx.selftest.lock().accesses.remove(&fd).ok_or(Errno::EBADF)?;
    ictx.access_destroy(id)
}

/// A mock device: gets mock domains, reports the selftest hw_info.
#[derive(Debug)]
pub struct MockDevice {
    handle: DeviceHandle,
    /// MOCK_FLAGS_DEVICE_* bits.
    pub flags: u32,
    /// Failure switches shared by every domain it allocates.
    faults: Arc<MockFaults>,
}

impl MockDevice {
    /// A new mock device with a unique handle.
    pub fn new(flags: u32) -> Self {
        Self::with_faults(flags, MockFaults::new())
    }

    /// A new mock device whose domains take their hardware failures from
    /// `faults` (tests keep the other `Arc`).
    pub fn with_faults(flags: u32, faults: Arc<MockFaults>) -> Self {
        Self { handle: DeviceHandle::Opaque(NEXT_MOCK_DEVICE.fetch_add(1, Ordering::Relaxed)), flags, faults }
    }
}

impl MockDevice {
    /// `d` with 1 MiB I/O pages when the device asks for them.
    fn huge(&self, d: MockDomain) -> MockDomain {
        if self.flags & MOCK_FLAGS_DEVICE_HUGE_IOVA != 0 { d.with_huge_iova() } else { d }
    }
}

impl DeviceOps for MockDevice {
    fn handle(&self) -> DeviceHandle {
        self.handle
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(self.huge(MockDomain::with_faults(self.faults.clone()))))
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.flags & MOCK_FLAGS_DEVICE_NO_DIRTY == 0
    }
    fn alloc_dirty_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        if !self.supports_dirty_tracking() {
            return Err(DomainError::NotSupported);
        }
        Ok(Box::new(self.huge(MockDomain::with_dirty_tracking(self.faults.clone()))))
    }
    /// [`MOCK_PASID_WIDTH`] bits with `MOCK_FLAGS_DEVICE_PASID`, else none.
    fn max_pasid_log2(&self) -> u32 {
        if self.flags & MOCK_FLAGS_DEVICE_PASID != 0 { MOCK_PASID_WIDTH } else { 0 }
    }
    fn hw_info(&self) -> (u32, Vec<u8>) {
        // struct iommu_test_hw_info { __u32 flags; __u32 test_reg; }
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&IOMMU_HW_INFO_SELFTEST_REGVAL.to_le_bytes());
        (IOMMU_HW_INFO_TYPE_SELFTEST, v)
    }
}

/// A [`MockDevice`] whose domains sit behind a
/// [`LockedDomain`](crate::selftest::mock::LockedDomain), so IOAS maps and
/// unmaps into them take the concurrent path (tests of that path with
/// mocks: the model test, the fault sweeps).
#[derive(Debug)]
pub struct LockedMockDevice(pub MockDevice);

impl DeviceOps for LockedMockDevice {
    fn handle(&self) -> DeviceHandle {
        self.0.handle()
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(crate::selftest::mock::LockedDomain::new(self.0.alloc_domain()?)))
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.0.supports_dirty_tracking()
    }
    fn alloc_dirty_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(crate::selftest::mock::LockedDomain::new(self.0.alloc_dirty_domain()?)))
    }
    fn max_pasid_log2(&self) -> u32 {
        self.0.max_pasid_log2()
    }
    fn hw_info(&self) -> (u32, Vec<u8>) {
        self.0.hw_info()
    }
}

impl NestingOps for MockDevice {
    fn alloc_nested_domain(
        &self,
        parent: &mut dyn IommuDomain,
        flags: u32,
        data: &UserData<'_>,
    ) -> Result<Box<dyn NestedDomain>> {
        MockNestedDomain::alloc_with_flags(parent, flags, data)
    }
}

/// Runs one selftest operation.
pub fn test_cmd(ictx: &Ictx, kbuf: &[u8], user_size: u32, buf: &mut [u8]) -> Result<()> {
    let mut c = IommuTestCmd::read(kbuf);
    match c.op {
        IOMMU_TEST_OP_ADD_RESERVED => {
            let a = IommuTestAddReserved::read(&c.payload);
            add_test_reserved(ictx, c.id, a.start, a.length)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN | IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS => {
            let flags = if c.op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS {
                IommuTestMockDomainFlags::read(&c.payload).dev_flags
            } else {
                0
            };
            if flags & !(MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_HUGE_IOVA | MOCK_FLAGS_DEVICE_PASID) != 0 {
                return Err(Errno::EINVAL);
            }
            let (owner, dev) = ictx.bind_owned_nesting_device(Arc::new(MockDevice::new(flags)))?;
            let hwpt = match ictx.attach(dev, c.id) {
                Ok(h) => h,
                Err(e) => {
                    ictx.abort_owner(owner, dev);
                    return Err(e);
                }
            };
            ictx.finalize_owner(owner, dev);
            let out = IommuTestMockDomain { out_stdev_id: owner, out_hwpt_id: hwpt, out_idev_id: dev };
            out.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE => {
            let mut r = IommuTestMockDomainReplace::read(&c.payload);
            let owner = ictx.device_owner(c.id)?;
            let dev = owner.dev_id.load(Ordering::SeqCst);
            r.pt_id = ictx.replace(dev, r.pt_id)?;
            r.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_TEST_OP_DIRTY => {
            // Marks the mock domain's I/O pages written as a device would,
            // from a user bitmap: bit k for `iova + k * page_size`; counts
            // the ones mapped. As in Linux 6.12's mock, the I/O page bit k
            // marks is the one with index `(iova + k * page_size) /
            // page_size` (the mock indexes its 2 KiB I/O pages by that
            // quotient whatever `page_size` is: the same page only when
            // `page_size` is the mock's 2 KiB). The whole bitmap is read
            // (a bounded chunk at a time) before anything is marked, so an
            // unreadable one is EFAULT with nothing changed, as in Linux.
            let mut d = IommuTestDirty::read(&c.payload);
            if d.page_size == 0
                || d.length == 0
                || !d.iova.is_multiple_of(d.page_size)
                || !d.length.is_multiple_of(d.page_size)
                || d.uptr == 0
            {
                return Err(Errno::EINVAL);
            }
            let hwpt = ictx.hwpt(c.id)?;
            let mut domain = hwpt.domain.lock();
            let mock = domain.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).ok_or(Errno::EINVAL)?;
            if !mock.tracking() {
                return Err(Errno::EINVAL);
            }
            let pages = d.length / d.page_size;
            let bytes = pages.div_ceil(8);
            let mut chunk = [0u8; 4096];
            let mut count = 0u64;
            for mark in [false, true] {
                let mut byte = 0u64;
                while byte < bytes {
                    let n = (bytes - byte).min(chunk.len() as u64) as usize;
                    let at = d.uptr.checked_add(byte).ok_or(Errno::EFAULT)?;
                    ictx.source().read_user(at, &mut chunk[..n])?;
                    if mark {
                        for (k, b) in chunk[..n].iter().enumerate() {
                            for bit in 0..8u64 {
                                let page = (byte + k as u64) * 8 + bit;
                                if b >> bit & 1 == 0 || page >= pages {
                                    continue;
                                }
                                let index = d.iova / d.page_size + page;
                                if let Some(io) = index.checked_mul(MOCK_IO_PAGE_SIZE)
                                    && mock.mark_dirty(io)
                                {
                                    count += 1;
                                }
                            }
                        }
                    }
                    byte += n as u64;
                }
            }
            drop(domain);
            d.out_nr_dirty = count;
            d.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf)
        }
        IOMMU_TEST_OP_MD_CHECK_MAP => {
            let m = IommuTestCheckMap::read(&c.payload);
            if !m.iova.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || !m.length.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || !m.uptr.is_multiple_of(MOCK_IO_PAGE_SIZE)
                || m.uptr.checked_add(m.length).is_none()
            {
                return Err(Errno::EINVAL);
            }
            let hwpt = ictx.hwpt(c.id)?;
            let domain = hwpt.domain.lock();
            let (mut iova, mut uptr) = (m.iova, m.uptr);
            for _ in 0..m.length / MOCK_IO_PAGE_SIZE {
                let want = ictx.source().peek_phys(uptr)?.ok_or(Errno::EOPNOTSUPP)?;
                if domain.iova_to_phys(iova) != Some(want) {
                    return Err(Errno::EINVAL);
                }
                // `uptr + length` was checked; an IOVA range that wraps
                // (Linux does not check it) reads unmapped IOVA and fails.
                iova = iova.wrapping_add(MOCK_IO_PAGE_SIZE);
                uptr += MOCK_IO_PAGE_SIZE;
            }
            Ok(())
        }
        IOMMU_TEST_OP_MD_CHECK_IOTLB => {
            // One IOTLB entry of a mock nested domain: ENOENT for anything
            // but a nested HWPT, EINVAL for another driver's domain, an
            // id past the last entry or a different value.
            let t = IommuTestCheckIotlb::read(&c.payload);
            let hwpt = ictx.hwpt_nested(c.id)?;
            let mut domain = hwpt.domain.lock();
            let mock = domain.as_any_mut().and_then(|a| a.downcast_mut::<MockNestedDomain>()).ok_or(Errno::EINVAL)?;
            match mock.iotlb.get(t.id as usize) {
                Some(&v) if t.id <= MOCK_NESTED_DOMAIN_IOTLB_ID_MAX && v == t.iotlb => Ok(()),
                _ => Err(Errno::EINVAL),
            }
        }
        IOMMU_TEST_OP_MD_CHECK_REFS => {
            // Linux 6.12's `iommufd_test_md_check_refs`: alignment, then
            // `uptr + length` must not overflow, all EINVAL.
            let r = IommuTestCheckRefs::read(&c.payload);
            if !r.length.is_multiple_of(PAGE_SIZE)
                || !r.uptr.is_multiple_of(PAGE_SIZE)
                || r.uptr.checked_add(r.length).is_none()
            {
                return Err(Errno::EINVAL);
            }
            for k in 0..r.length / PAGE_SIZE {
                // Below uptr + length, which fits.
                let pins = ictx.source().pin_count(r.uptr + k * PAGE_SIZE)?.ok_or(Errno::EOPNOTSUPP)?;
                if pins != r.refs {
                    return Err(Errno::EIO);
                }
            }
            Ok(())
        }
        IOMMU_TEST_OP_CREATE_ACCESS => {
            let mut ca = IommuTestCreateAccess::read(&c.payload);
            if ca.flags & !MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let ops = Arc::new(MockAccess {
                needs_pin: ca.flags & MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0,
                ..MockAccess::default()
            });
            let id = ictx.access_create(ops.clone())?;
            if let Err(e) = ictx.access_attach(id, c.id) {
                let _ = ictx.access_destroy(id);
                return Err(e);
            }
            let fd = ictx.alloc_fd();
            ictx.selftest.lock().accesses.insert(fd, (id, ops));
            ca.out_access_fd = fd;
            ca.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf).inspect_err(|_| {
                ictx.selftest.lock().accesses.remove(&fd);
                let _ = ictx.access_destroy(id);
            })
        }
        IOMMU_TEST_OP_ACCESS_REPLACE_IOAS => {
            let r = IommuTestAccessReplaceIoas::read(&c.payload);
            let (id, _) = access_of(ictx, c.id)?;
            ictx.access_replace(id, r.ioas_id)
        }
        IOMMU_TEST_OP_ACCESS_PAGES => {
            let mut ap = IommuTestAccessPages::read(&c.payload);
            if ap.length > 16 << 20 {
                return Err(Errno::ENOMEM);
            }
            if ap.flags & !(MOCK_FLAGS_ACCESS_WRITE | MOCK_FLAGS_ACCESS_SYZ) != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let (id, access) = access_of(ictx, c.id)?;
            if !access.needs_pin {
                return Err(Errno::EOPNOTSUPP);
            }
            if ap.flags & MOCK_FLAGS_ACCESS_SYZ != 0 {
                let ioas = ictx.access_ioas_id(id).and_then(|i| ictx.ioas(i).ok());
                ap.iova = ioas.map_or(0, |ioas| syz_conv(&ioas.iopt.lock(), ap.iova));
            }
            let phys = ictx.access_pin_pages(id, ap.iova, ap.length, ap.flags & MOCK_FLAGS_ACCESS_WRITE != 0)?;
            if ap.uptr != 0 {
                // The pinned pages must be the user's pages at uptr.
                let mut u = ap.uptr.wrapping_sub(ap.iova % PAGE_SIZE);
                for p in &phys {
                    let want = match ictx.source().peek_phys(u) {
                        Ok(Some(w)) => w,
                        Ok(None) => {
                            let _ = ictx.access_unpin_pages(id, ap.iova, ap.length);
                            return Err(Errno::EOPNOTSUPP);
                        }
                        Err(e) => {
                            let _ = ictx.access_unpin_pages(id, ap.iova, ap.length);
                            return Err(e);
                        }
                    };
                    if want != *p {
                        let _ = ictx.access_unpin_pages(id, ap.iova, ap.length);
                        return Err(Errno::EBADE);
                    }
                    u = u.wrapping_add(PAGE_SIZE);
                }
            }
            let item = access.next_item.fetch_add(1, Ordering::Relaxed);
            access.items.lock().push(Item { id: item, iova: ap.iova, length: ap.length });
            ap.out_access_pages_id = item;
            ap.write(&mut c.payload);
            respond(&c.to_bytes(), user_size, buf).inspect_err(|_| {
                access.items.lock().retain(|it| it.id != item);
                let _ = ictx.access_unpin_pages(id, ap.iova, ap.length);
            })
        }
        IOMMU_TEST_OP_DESTROY_ACCESS_PAGES => {
            let d = IommuTestDestroyAccessPages::read(&c.payload);
            let (id, access) = access_of(ictx, c.id)?;
            let item = {
                let mut items = access.items.lock();
                let pos = items.iter().position(|it| it.id == d.access_pages_id).ok_or(Errno::ENOENT)?;
                items.remove(pos)
            };
            ictx.access_unpin_pages(id, item.iova, item.length)
        }
        IOMMU_TEST_OP_ACCESS_RW => {
            let rw = IommuTestAccessRw::read(&c.payload);
            if rw.length > 16 << 20 {
                return Err(Errno::ENOMEM);
            }
            if rw.flags & !(MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH | MOCK_FLAGS_ACCESS_SYZ) != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let (id, _) = access_of(ictx, c.id)?;
            let mut tmp = alloc::vec![0u8; rw.length as usize];
            let mut rw = rw;
            let write = rw.flags & MOCK_ACCESS_RW_WRITE != 0;
            if write {
                ictx.source().read_user(rw.uptr, &mut tmp)?;
            }
            if rw.flags & MOCK_FLAGS_ACCESS_SYZ != 0 {
                let ioas = ictx.access_ioas_id(id).and_then(|i| ictx.ioas(i).ok());
                rw.iova = ioas.map_or(0, |ioas| syz_conv(&ioas.iopt.lock(), rw.iova));
            }
            ictx.access_rw(id, rw.iova, &mut tmp, write)?;
            if !write {
                ictx.source().write_user(rw.uptr, &tmp)?;
            }
            Ok(())
        }
        IOMMU_TEST_OP_TRIGGER_IOPF => {
            // The mock reports one page request, always the last of its
            // group, for the device; PASID 0 is "no PASID". A device
            // whose IOPF is off drops it, and the command still succeeds.
            let t = IommuTestTriggerIopf::read(&c.payload);
            ictx.device(t.dev_id)?;
            let mut flags = IOMMU_PGFAULT_FLAGS_LAST_PAGE;
            if t.pasid != 0 {
                flags |= IOMMU_PGFAULT_FLAGS_PASID_VALID;
            }
            let req = PageRequest { flags, pasid: t.pasid, grpid: t.grpid, perm: t.perm, addr: t.addr };
            match ictx.report_iopf(t.dev_id, req) {
                Ok(()) | Err(Errno::ENODEV) => Ok(()),
                Err(e) => Err(e),
            }
        }
        IOMMU_TEST_OP_PASID_ATTACH | IOMMU_TEST_OP_PASID_REPLACE => {
            let mut a = IommuTestPasidAttach::read(&c.payload);
            let dev = ictx.device_owner(c.id)?.dev_id.load(Ordering::SeqCst);
            let attach = c.op == IOMMU_TEST_OP_PASID_ATTACH;
            a.pt_id = match (attach, a.pasid) {
                (true, 0) => ictx.attach(dev, a.pt_id)?,
                (false, 0) => ictx.replace(dev, a.pt_id)?,
                (true, p) => ictx.attach_pasid(dev, p, a.pt_id)?,
                (false, p) => ictx.replace_pasid(dev, p, a.pt_id)?,
            };
            a.write(&mut c.payload);
            let r = respond(&c.to_bytes(), user_size, buf);
            if let Err(e) = r
                && attach
            {
                // The caller never learnt of the attach: undo it. A detach
                // the hardware refuses is the more serious error.
                let undo = if a.pasid == 0 { ictx.detach(dev) } else { ictx.detach_pasid(dev, a.pasid) };
                undo?;
                return Err(e);
            }
            r
        }
        IOMMU_TEST_OP_PASID_DETACH => {
            let d = IommuTestPasidDetach::read(&c.payload);
            let dev = ictx.device_owner(c.id)?.dev_id.load(Ordering::SeqCst);
            if d.pasid == 0 { ictx.detach(dev) } else { ictx.detach_pasid(dev, d.pasid) }
        }
        IOMMU_TEST_OP_PASID_CHECK_HWPT => {
            let k = IommuTestPasidCheck::read(&c.payload);
            let dev = ictx.device_owner(c.id)?.dev_id.load(Ordering::SeqCst);
            let attached =
                if k.pasid == 0 { ictx.attached_hwpt(dev)? } else { ictx.attached_pasid_hwpt(dev, k.pasid)? };
            if k.hwpt_id == 0 {
                return if attached.is_none() { Ok(()) } else { Err(Errno::EINVAL) };
            }
            // Any HWPT, paging or nested; another object is EINVAL.
            if ictx.hwpt(k.hwpt_id).is_err() && ictx.hwpt_nested(k.hwpt_id).is_err() {
                return Err(if ictx.object_ids().contains(&k.hwpt_id) { Errno::EINVAL } else { Errno::ENOENT });
            }
            if attached == Some(k.hwpt_id) { Ok(()) } else { Err(Errno::EINVAL) }
        }
        IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT => {
            // Linux bounds its PFN batch memory with this; our store has no
            // such batch, so the value only has to be accepted.
            let _ = IommuTestMemoryLimit::read(&c.payload);
            Ok(())
        }
        _ => Err(Errno::EOPNOTSUPP),
    }
}
