//! The fault sweep over *user memory*: the commands that read or write
//! the caller's memory a piece at a time (`IOMMU_HWPT_INVALIDATE`'s
//! request array, a fault queue's `read(2)` and `write(2)`,
//! `IOMMU_HWPT_GET_DIRTY_BITMAP`'s bitmap) run with their 1st, 2nd, 3rd
//! ... user-memory access failing (`EFAULT`, as when the caller's page is
//! unmapped under it), until they succeed. After each failure exactly the
//! work the call reports done must have happened, and nothing else:
//!
//! - `HWPT_INVALIDATE`: `entry_num` says how many requests were handled,
//!   and exactly those requests changed the (mock) IOTLB;
//! - a fault queue read: the bytes returned are whole groups, those
//!   groups wait for a response, and every other group is still queued in
//!   its order (none lost, none duplicated);
//! - a fault queue write: the bytes consumed are whole responses, exactly
//!   those groups were answered to the device, the others still wait;
//! - a dirty bitmap read and clear: no dirty bit is lost: a bit cleared in
//!   the domain was written to the caller's bitmap.
//!
//! The allocation fault sweep (`fault_sweep.rs`) covers the operations
//! that allocate; these commands allocate nothing (their sizes are the
//! caller's, so they must not), which the first test checks.

use iommufd::ctx::{Ictx, NestedDomain, NestingOps, PageRequest, PageResponse, UserData};
use iommufd::dispatch::ioctl;
use iommufd::errno::{Errno, Result};
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::pages::FaultPlan;
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain, MockNestedDomain};
use iommufd::uapi::{
    IOMMU_HWPT_DATA_SELFTEST, IOMMU_HWPT_FAULT_ID_VALID, IOMMU_HWPT_INVALIDATE, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
    IOMMU_PGFAULT_FLAGS_LAST_PAGE, IOMMU_TEST_IOTLB_DEFAULT, IOMMUFD_PAGE_RESP_SUCCESS, IommuHwptInvalidate,
    IommuHwptInvalidateSelftest, IommuHwptPageResponse, IommuHwptPgfault,
};
use portcullis_iommu::{DeviceHandle, DeviceOps, DomainError, IommuDomain, PhysRun};
use std::sync::{Arc, Mutex};

const USER: u64 = 0x3000_0000;
const USER_PAGES: u64 = 64;
/// Where the commands' arrays and buffers live.
const ARRAYS: u64 = 0x5000_0000;

/// A memory source whose `n`th user-memory access (read, write or pin)
/// from arming fails with `EFAULT`, as if the page were unmapped just
/// then.
struct Flaky {
    inner: Arc<FakeAddressSpace>,
    /// The core's own fault plan, counting user-memory accesses here.
    plan: FaultPlan,
}

impl Flaky {
    fn access(&self) -> Result<()> {
        self.plan.point().map_err(|_| Errno::EFAULT)
    }
}

impl MemorySource for Flaky {
    fn pin(&self, uptr: u64, out: &mut [u64], write: bool) -> Result<()> {
        self.access()?;
        self.inner.pin(uptr, out, write)
    }
    fn unpin(&self, phys: &[u64], dirty: bool) {
        self.inner.unpin(phys, dirty)
    }
    fn pin_runs(&self, uptr: u64, npages: u64, write: bool, out: &mut Vec<PhysRun>) -> Result<()> {
        self.access()?;
        self.inner.pin_runs(uptr, npages, write, out)
    }
    fn unpin_runs(&self, runs: &[PhysRun], dirty: bool) {
        self.inner.unpin_runs(runs, dirty)
    }
    fn read_user(&self, uptr: u64, buf: &mut [u8]) -> Result<()> {
        self.access()?;
        self.inner.read_user(uptr, buf)
    }
    fn write_user(&self, uptr: u64, buf: &[u8]) -> Result<()> {
        self.access()?;
        self.inner.write_user(uptr, buf)
    }
    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_phys(phys, buf)
    }
    fn write_phys(&self, phys: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_phys(phys, buf)
    }
    fn pin_count(&self, uptr: u64) -> Result<Option<u32>> {
        self.inner.pin_count(uptr)
    }
    fn peek_phys(&self, uptr: u64) -> Result<Option<u64>> {
        self.inner.peek_phys(uptr)
    }
}

/// A nesting mock device that records the page responses it is sent.
struct RecDev {
    inner: MockDevice,
    responses: Mutex<Vec<PageResponse>>,
}

impl DeviceOps for RecDev {
    fn handle(&self) -> DeviceHandle {
        self.inner.handle()
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        self.inner.alloc_domain()
    }
    fn supports_dirty_tracking(&self) -> bool {
        self.inner.supports_dirty_tracking()
    }
    fn alloc_dirty_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        self.inner.alloc_dirty_domain()
    }
}

impl NestingOps for RecDev {
    fn alloc_nested_domain(
        &self,
        parent: &mut dyn IommuDomain,
        flags: u32,
        data: &UserData<'_>,
    ) -> Result<Box<dyn NestedDomain>> {
        self.inner.alloc_nested_domain(parent, flags, data)
    }
    fn page_response(&self, _device: DeviceHandle, response: &PageResponse) {
        self.responses.lock().unwrap().push(*response);
    }
}

struct World {
    src: Arc<Flaky>,
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    rec: Arc<RecDev>,
    /// A nested HWPT (mock IOTLB all `IOMMU_TEST_IOTLB_DEFAULT`) with a
    /// fault queue, `dev` attached to it.
    nested: u32,
    fault_fd: u32,
    /// A paging HWPT with dirty tracking on, of an IOAS with 64 pages
    /// mapped at the mock aperture, its own device attached.
    dirty: u32,
}

/// Groups `dev` reports in every world: group index and requests.
const GROUPS: [(u32, u32); 4] = [(1, 1), (2, 3), (3, 1), (4, 2)];

fn world() -> World {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    mem.map(ARRAYS, 4 * PAGE_SIZE, true);
    let src = Arc::new(Flaky { inner: mem.clone(), plan: FaultPlan::default() });
    let ictx = Ictx::new(src.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().unwrap();
    let rec = Arc::new(RecDev { inner: MockDevice::new(0), responses: Mutex::new(Vec::new()) });
    let dev = ictx.bind_nesting_device(rec.clone()).unwrap();
    ictx.attach(dev, ioas).unwrap();
    ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), USER, USER_PAGES * PAGE_SIZE, true, true).unwrap();
    let parent = ictx.hwpt_alloc_flags(dev, ioas, false, true).unwrap();
    let (fault, fault_fd) = ictx.fault_alloc().unwrap();
    mem.write_user(ARRAYS, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
    let data = UserData::new(&*mem, IOMMU_HWPT_DATA_SELFTEST, ARRAYS, 4);
    let nested = ictx.hwpt_nested_alloc(dev, parent, IOMMU_HWPT_FAULT_ID_VALID, fault, &data).unwrap();
    ictx.replace(dev, nested).unwrap();
    for (grpid, n) in GROUPS {
        for k in 0..n {
            let flags = if k + 1 == n { IOMMU_PGFAULT_FLAGS_LAST_PAGE } else { 0 };
            let req =
                PageRequest { flags, pasid: 0, grpid, perm: 1, addr: 0x10_0000 * grpid as u64 + k as u64 * 0x1000 };
            ictx.report_iopf(dev, req).unwrap();
        }
    }
    let dirty_dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let dirty = ictx.hwpt_alloc_with(dirty_dev, ioas, true).unwrap();
    ictx.attach(dirty_dev, dirty).unwrap();
    ictx.hwpt_set_dirty_tracking(dirty, true).unwrap();
    World { src, mem, ictx, rec, nested, fault_fd, dirty }
}

fn iotlb(w: &World) -> [u32; 4] {
    let h = w.ictx.hwpt_nested(w.nested).unwrap();
    let mut d = h.domain.lock();
    let m = d.as_any_mut().and_then(|a| a.downcast_mut::<MockNestedDomain>()).expect("a mock nested domain");
    m.iotlb
}

/// Runs `op` with user access 1, 2, ... failing until it succeeds; calls
/// `check(world, n, result)` after each run (also the successful one).
/// Returns how many accesses the successful call made.
fn sweep<R: std::fmt::Debug>(name: &str, op: impl Fn(&World) -> R, check: impl Fn(&World, Option<u64>, &R)) -> u64 {
    for n in 1..10_000 {
        let w = world();
        w.src.plan.arm(Some(n));
        let r = op(&w);
        let calls = w.src.plan.calls();
        w.src.plan.arm(None);
        if calls < n {
            check(&w, None, &r);
            return calls;
        }
        check(&w, Some(n), &r);
    }
    panic!("{name}: never succeeded");
}

#[test]
fn hwpt_invalidate_reports_exactly_the_requests_it_handled() {
    const N: u32 = 4;
    let op = |w: &World| {
        // Requests for IOTLB entries 3, 1, 0, 2 in that order.
        for (i, id) in [3u32, 1, 0, 2].into_iter().enumerate() {
            let e = IommuHwptInvalidateSelftest { flags: 0, iotlb_id: id };
            w.mem.write_user(ARRAYS + 0x1000 + i as u64 * 8, &e.to_bytes()).unwrap();
        }
        let cmd = IommuHwptInvalidate {
            size: IommuHwptInvalidate::SIZE as u32,
            hwpt_id: w.nested,
            data_uptr: ARRAYS + 0x1000,
            data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
            entry_len: IommuHwptInvalidateSelftest::SIZE as u32,
            entry_num: N,
            ..Default::default()
        };
        let mut buf = cmd.to_bytes();
        let r = ioctl(&w.ictx, IOMMU_HWPT_INVALIDATE, &mut buf);
        (r, IommuHwptInvalidate::read(&buf).entry_num)
    };
    let calls = sweep("invalidate", op, |w, failed, &(r, done)| {
        let order = [3usize, 1, 0, 2];
        let mut want = [IOMMU_TEST_IOTLB_DEFAULT; 4];
        for &id in &order[..done as usize] {
            want[id] = 0;
        }
        assert_eq!(iotlb(w), want, "failure {failed:?}: exactly the {done} handled requests took effect");
        match failed {
            Some(n) => {
                assert_eq!(r, Err(Errno::EFAULT), "failure {n}");
                assert_eq!(done as u64, n - 1, "failure {n}: the requests before the unreadable one were handled");
            }
            None => assert_eq!((r, done), (Ok(()), N)),
        }
    });
    assert_eq!(calls, N as u64, "one user read per request, whatever the count");
}

/// Reads every record the queue has now, without failures.
fn drain(w: &World) -> Vec<IommuHwptPgfault> {
    let mut buf = vec![0u8; 16 * 40];
    let n = w.ictx.fault_fd_read(w.fault_fd, &mut buf).unwrap();
    buf[..n].chunks(40).map(IommuHwptPgfault::read).collect()
}

#[test]
fn a_failed_fault_read_loses_and_duplicates_no_group() {
    let total: u32 = GROUPS.iter().map(|g| g.1).sum();
    let op = |w: &World| w.ictx.fault_fd_read_user(w.fault_fd, ARRAYS + 0x2000, total as usize * 40);
    let calls = sweep("fault read", op, |w, failed, r| {
        let f = w.ictx.fault(fault_id(w)).unwrap();
        let got: Vec<IommuHwptPgfault> = match r {
            Ok(n) => {
                let mut buf = vec![0u8; *n];
                w.mem.read_user(ARRAYS + 0x2000, &mut buf).unwrap();
                buf.chunks(40).map(IommuHwptPgfault::read).collect()
            }
            Err(e) => {
                assert_eq!((*e, failed.is_some()), (Errno::EFAULT, true));
                Vec::new()
            }
        };
        // Whole groups only, in order, each with its own cookie.
        let read_groups: Vec<u32> = dedup(got.iter().map(|r| r.grpid));
        assert_eq!(read_groups, GROUPS[..read_groups.len()].iter().map(|g| g.0).collect::<Vec<_>>(), "{failed:?}");
        for g in &read_groups {
            let n = GROUPS.iter().find(|x| x.0 == *g).unwrap().1 as usize;
            assert_eq!(got.iter().filter(|r| r.grpid == *g).count(), n, "{failed:?}: group {g} whole");
        }
        assert_eq!(f.awaiting_response(), read_groups.len(), "{failed:?}: the groups read await a response");
        assert_eq!(f.delivered(), GROUPS.len() - read_groups.len(), "{failed:?}: the rest still queued");
        // The rest reads back whole and in order after the failure.
        let rest = drain(w);
        let rest_groups = dedup(rest.iter().map(|r| r.grpid));
        assert_eq!(rest_groups, GROUPS[read_groups.len()..].iter().map(|g| g.0).collect::<Vec<_>>(), "{failed:?}");
        assert!(w.rec.responses.lock().unwrap().is_empty(), "{failed:?}: nothing answered");
    });
    assert_eq!(calls, total as u64, "one user write per record");
}

#[test]
fn a_failed_fault_write_answers_exactly_what_it_consumed() {
    let op = |w: &World| {
        // Read every group (no failures yet: the sweep arms before `op`,
        // so read through the slice API, which touches no user memory).
        let recs = drain(w);
        let mut cookies: Vec<(u32, u32)> = recs.iter().map(|r| (r.grpid, r.cookie)).collect();
        cookies.dedup();
        for (i, &(_, cookie)) in cookies.iter().enumerate() {
            let resp = IommuHwptPageResponse { cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
            w.mem.write_user(ARRAYS + 0x3000 + i as u64 * 8, &resp.to_bytes()).unwrap();
        }
        w.ictx.fault_fd_write_user(w.fault_fd, ARRAYS + 0x3000, cookies.len() * 8)
    };
    let calls = sweep("fault write", op, |w, failed, r| {
        let f = w.ictx.fault(fault_id(w)).unwrap();
        let answered = match r {
            Ok(n) => n / 8,
            Err(e) => {
                assert_eq!((*e, failed), (Errno::EFAULT, Some(1)), "an error only when nothing was consumed");
                0
            }
        };
        if let Some(n) = failed {
            assert_eq!(answered as u64, n - 1, "the responses before the unreadable one");
        }
        let got = w.rec.responses.lock().unwrap().clone();
        let want: Vec<u32> = GROUPS[..answered].iter().map(|g| g.0).collect();
        assert_eq!(got.iter().map(|r| r.grpid).collect::<Vec<_>>(), want, "{failed:?}: exactly those answered");
        assert!(got.iter().all(|r| r.code == IOMMUFD_PAGE_RESP_SUCCESS));
        assert_eq!(f.awaiting_response(), GROUPS.len() - answered, "{failed:?}: the others still wait");
    });
    assert_eq!(calls, GROUPS.len() as u64, "one user read per response");
}

#[test]
fn a_failed_dirty_bitmap_read_loses_no_dirty_bit() {
    // 64 pages of 4 KiB, a bit each: an 8-byte bitmap, one window.
    let dirty_pages = [0u64, 5, 6, 31, 32, 63];
    let want: u64 = dirty_pages.iter().map(|p| 1u64 << p).sum();
    let op = |w: &World| {
        mark_dirty(w, &dirty_pages);
        read_dirty(w, false, ARRAYS + 0x2000)
    };
    let calls = sweep("dirty bitmap", op, |w, failed, r| {
        let reported = bits(w, ARRAYS + 0x2000);
        // What the domain still has, read without a failure.
        read_dirty(w, true, ARRAYS + 0x2800).unwrap();
        let kept = bits(w, ARRAYS + 0x2800);
        assert_eq!(reported | kept, want, "{failed:?}: every dirty bit reported or still set");
        match failed {
            Some(_) => {
                assert_eq!(*r, Err(Errno::EFAULT));
                assert_eq!((reported, kept), (0, want), "{failed:?}: nothing written, nothing cleared");
            }
            None => assert_eq!((*r, reported, kept), (Ok(()), want, 0)),
        }
    });
    assert_eq!(calls, 1, "the bitmap's window is pinned once, then read and written through the pin");
}

fn mark_dirty(w: &World, pages: &[u64]) {
    let h = w.ictx.hwpt(w.dirty).unwrap();
    let mut d = h.domain.lock();
    let mock = d.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).expect("a mock domain");
    for p in pages {
        mock.mark_dirty(MOCK_APERTURE_START + p * PAGE_SIZE);
    }
}

fn read_dirty(w: &World, no_clear: bool, at: u64) -> Result<()> {
    w.ictx.hwpt_get_dirty_bitmap(w.dirty, MOCK_APERTURE_START, USER_PAGES * PAGE_SIZE, PAGE_SIZE, at, no_clear)
}

fn bits(w: &World, at: u64) -> u64 {
    let mut b = [0u8; 8];
    w.mem.read_user(at, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// A bitmap of two windows whose second window is unmapped: the first
/// window's bits are reported and cleared, the second's stay set in the
/// domain (Linux: the same, as it pins the bitmap a chunk at a time).
#[test]
fn a_bitmap_ending_in_unmapped_memory_keeps_the_dirty_bits_it_could_not_report() {
    // 40960 pages of 4 KiB: 40960 bits, more than one window's 32768.
    const PAGES: u64 = 40960;
    const BIG: u64 = 0x1_0000_0000;
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(BIG, PAGES * PAGE_SIZE, true);
    // Exactly one page of bitmap memory: the first window fits, the
    // second does not.
    mem.map(ARRAYS, PAGE_SIZE, true);
    mem.map(ARRAYS + 0x10000, 2 * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let hwpt = ictx.hwpt_alloc_with(dev, ioas, true).unwrap();
    ictx.attach(dev, hwpt).unwrap();
    ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), BIG, PAGES * PAGE_SIZE, true, true).unwrap();
    ictx.hwpt_set_dirty_tracking(hwpt, true).unwrap();
    {
        let h = ictx.hwpt(hwpt).unwrap();
        let mut d = h.domain.lock();
        let mock = d.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).unwrap();
        mock.mark_dirty(MOCK_APERTURE_START);
        mock.mark_dirty(MOCK_APERTURE_START + 40000 * PAGE_SIZE);
    }
    let len = PAGES * PAGE_SIZE;
    let r = ictx.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE_START, len, PAGE_SIZE, ARRAYS, false);
    assert_eq!(r, Err(Errno::EFAULT));
    let mut b = [0u8; 1];
    mem.read_user(ARRAYS, &mut b).unwrap();
    assert_eq!(b[0], 1, "the first window was reported");
    ictx.hwpt_get_dirty_bitmap(hwpt, MOCK_APERTURE_START, len, PAGE_SIZE, ARRAYS + 0x10000, true).unwrap();
    let mut all = vec![0u8; (PAGES / 8) as usize];
    mem.read_user(ARRAYS + 0x10000, &mut all).unwrap();
    let set: Vec<usize> = (0..PAGES as usize).filter(|&k| all[k / 8] & (1 << (k % 8)) != 0).collect();
    assert_eq!(set, vec![40000], "the first window's bit was cleared, the second's kept");
}

fn fault_id(w: &World) -> u32 {
    w.ictx.object_ids().into_iter().find(|&id| w.ictx.fault(id).is_ok()).expect("the fault object")
}

fn dedup(it: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = it.collect();
    v.dedup();
    v
}

#[test]
fn the_user_memory_commands_have_no_allocation_fault_points() {
    // Their sizes are the caller's: nothing they do may allocate, so an
    // armed allocation fault plan is never reached.
    let w = world();
    w.ictx.accounting().faults.arm(Some(1));
    // Results do not matter here (the other tests check them), only that
    // no fault point is passed.
    let _ = w.ictx.fault_fd_read_user(w.fault_fd, ARRAYS + 0x2000, 4 * 40);
    let _ = w.ictx.fault_fd_write_user(w.fault_fd, ARRAYS + 0x3000, 8);
    let _ = w.ictx.hwpt_get_dirty_bitmap(w.dirty, MOCK_APERTURE_START, 8 * PAGE_SIZE, PAGE_SIZE, ARRAYS, false);
    let cmd = IommuHwptInvalidate {
        size: IommuHwptInvalidate::SIZE as u32,
        hwpt_id: w.nested,
        data_uptr: ARRAYS,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len: 8,
        entry_num: 2,
        ..Default::default()
    };
    let _ = ioctl(&w.ictx, IOMMU_HWPT_INVALIDATE, &mut cmd.to_bytes());
    assert_eq!(w.ictx.accounting().faults.calls(), 0, "no fault point passed");
    w.ictx.accounting().faults.arm(None);
}

/// The last page of the address space is a page like any other: reading,
/// writing and pinning it never overflows an address computation, and
/// ranges that would run past it are refused.
#[test]
fn the_last_page_of_the_address_space() {
    const LAST: u64 = u64::MAX - (PAGE_SIZE - 1);
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(LAST, PAGE_SIZE, true);
    mem.write_user(u64::MAX - 7, &[7; 8]).unwrap();
    let mut b = [0u8; 8];
    mem.read_user(u64::MAX - 7, &mut b).unwrap();
    assert_eq!(b, [7; 8]);
    assert_eq!(mem.read_user(u64::MAX - 7, &mut [0u8; 9]), Err(Errno::EFAULT), "runs past the end");
    let mut phys = [0u64; 1];
    mem.pin(LAST, &mut phys, true).unwrap();
    assert_eq!(mem.pins(LAST), 1);
    mem.unpin(&phys, false);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    ictx.attach(dev, ioas).unwrap();
    // Linux refuses a user range whose end address wraps (EOVERFLOW), so
    // the last page itself cannot be mapped; nothing is pinned.
    let r = ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), LAST, PAGE_SIZE, true, true);
    assert_eq!(r, Err(Errno::EOVERFLOW));
    assert_eq!(mem.pins(LAST), 0);
    // The selftest's MD_CHECK_REFS: a range ending at the top wraps its
    // end address, which Linux refuses (EINVAL) rather than walk it.
    let mut cmd = iommufd::uapi::IommuTestCmd {
        size: iommufd::uapi::IommuTestCmd::SIZE as u32,
        op: iommufd::uapi::IOMMU_TEST_OP_MD_CHECK_REFS,
        ..Default::default()
    };
    iommufd::uapi::IommuTestCheckRefs { length: PAGE_SIZE, uptr: LAST, refs: 1 }.write(&mut cmd.payload);
    let mut buf = cmd.to_bytes();
    assert_eq!(ioctl(&ictx, iommufd::uapi::IOMMU_TEST_CMD, &mut buf), Err(Errno::EINVAL));
    // One page below the top: its end is exactly representable.
    mem.map(LAST - PAGE_SIZE, PAGE_SIZE, true);
    ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), LAST - PAGE_SIZE, PAGE_SIZE, true, true).unwrap();
    iommufd::uapi::IommuTestCheckRefs { length: PAGE_SIZE, uptr: LAST - PAGE_SIZE, refs: 1 }.write(&mut cmd.payload);
    let mut buf = cmd.to_bytes();
    assert_eq!(ioctl(&ictx, iommufd::uapi::IOMMU_TEST_CMD, &mut buf), Ok(()));
}
