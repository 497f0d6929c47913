//! Fault-injection sweep: every operation is run with its 1st, 2nd, 3rd ...
//! fault point failing (object and page-store allocation, pin, domain
//! allocation, domain map), until it succeeds. After every failure the
//! whole observable state must equal the state before the call: the
//! objects, the pins on every user page, the accounting, and the contents
//! of every domain.
//!
//! The same sweep over failed IOTLB invalidations (the mock domains'
//! `MockFaults`): every operation that invalidates is run with its 1st,
//! 2nd, ... invalidation failing, and every operation of the first sweep
//! with each fault point failing *and* the invalidation that unwinds it
//! failing too. A failed invalidation cannot leave the state as it was
//! (the pages it covered must stay pinned), so after one the check is the
//! safety rule instead: nothing is mapped that was not mapped before, no
//! page lost a pin, every page a domain maps is pinned, and the
//! accounting matches the pins.
//!
//! The world has a memfd too, mapped into IOAS `a` and `b` with
//! `IOMMU_IOAS_MAP_FILE`: its pages are in the snapshot (pins, and the
//! holds on the file: a failed map must give its hold back), and the
//! sweeps run file maps and copies of file mappings.

use iommufd::ctx::DeviceOps;
use iommufd::ctx::{Ictx, ReplaceError, UserData};
use iommufd::dispatch::ioctl;
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::{LockedMockDevice, MockDevice};
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain, MockFaults};
use iommufd::uapi::{
    IOMMU_HWPT_DATA_SELFTEST, IOMMU_HWPT_FAULT_ID_VALID, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FILE,
    IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE, IOMMU_IOAS_UNMAP,
    IOMMU_TEST_IOTLB_DEFAULT, IommuIoasMap, IommuIoasMapFile, IommuIoasUnmap,
};
use std::sync::Arc;

const USER: u64 = 0x3000_0000;
const USER_PAGES: u64 = 64;
const WINDOW: u64 = 128 * PAGE_SIZE;
/// One page of user memory holding the mock's nested-HWPT data.
const NEST_DATA: u64 = 0x5000_0000;
/// Pages of the world's memfd.
const MFD_PAGES: u64 = 16;
/// Where IOAS `b` maps the first 4 pages of the memfd.
const B_FILE_IOVA: u64 = MOCK_APERTURE_START + 0x50000;
/// Where IOAS `a` (with its domains) maps pages 4..8 of the memfd.
const A_FILE_IOVA: u64 = MOCK_APERTURE_START + 0x68000;

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    objects: Vec<u32>,
    /// Pins of every user page, then of every page of the memfd.
    pins: Vec<u32>,
    /// Files alive in the memory source (the memfd: 1 while mapped).
    files: usize,
    accounted: u64,
    /// For every HWPT: its id and the translation of every 2 KiB I/O page
    /// of the window.
    domains: Vec<(u32, Vec<Option<u64>>)>,
}

fn snapshot(ictx: &Ictx, mem: &FakeAddressSpace, mfd: i32) -> Snapshot {
    let objects = ictx.object_ids();
    let domains = objects
        .iter()
        .filter_map(|&id| ictx.hwpt(id).ok().map(|h| (id, h)))
        .map(|(id, h)| {
            let d = h.domain.lock();
            (id, (0..WINDOW / 2048).map(|k| d.iova_to_phys(MOCK_APERTURE_START + k * 2048)).collect())
        })
        .collect();
    Snapshot {
        objects,
        pins: (0..USER_PAGES)
            .map(|p| mem.pins(USER + p * PAGE_SIZE))
            .chain((0..MFD_PAGES).map(|p| mem.file_pins(mfd, p * PAGE_SIZE)))
            .collect(),
        files: mem.live_files(),
        accounted: ictx.pinned_pages(),
        domains,
    }
}

struct World {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    /// Failure switches of every mock domain.
    faults: Arc<MockFaults>,
    /// IOAS with two devices in two domains, and a mapping.
    a: u32,
    /// IOAS without devices, with two mappings.
    b: u32,
    spare_dev: u32,
    dev_a: u32,
    /// A HWPT of `a` made with dirty tracking (on), with its own device.
    dirty: u32,
    /// A device whose driver nests, attached to IOAS `c` (its own, with a
    /// mapping, so the other operations' domain counts are unchanged).
    nest_dev: u32,
    /// A NEST_PARENT HWPT of IOAS `c`.
    parent: u32,
    /// A fault queue nobody uses yet, and its descriptor.
    fault: u32,
    fault_fd: u32,
    /// The memfd (pages 0..4 mapped into `b` at `B_FILE_IOVA`, 4..8 into
    /// `a` at `A_FILE_IOVA`).
    mfd: i32,
}

impl World {
    fn snapshot(&self) -> Snapshot {
        snapshot(&self.ictx, &self.mem, self.mfd)
    }
    /// Physical address of page `k` of the snapshot's pin list.
    fn page_phys(&self, k: u64) -> Option<u64> {
        if k < USER_PAGES {
            self.mem.phys_of(USER + k * PAGE_SIZE)
        } else {
            self.mem.file_phys(self.mfd, (k - USER_PAGES) * PAGE_SIZE)
        }
    }
}

thread_local! {
    /// Whether this test's worlds give IOAS `a` and `b` devices on the
    /// concurrent path (`LockedMockDevice`) instead of plain mocks.
    static CONCURRENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn world() -> World {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let faults = MockFaults::new();
    let plain = || Arc::new(MockDevice::with_faults(0, faults.clone()));
    let device = || -> Arc<dyn DeviceOps> {
        if CONCURRENT.get() { Arc::new(LockedMockDevice(MockDevice::with_faults(0, faults.clone()))) } else { plain() }
    };
    let a = ictx.ioas_alloc().unwrap();
    let b = ictx.ioas_alloc().unwrap();
    let dev_a = ictx.bind_device(device()).unwrap();
    ictx.attach(dev_a, a).unwrap();
    let d2 = ictx.bind_device(device()).unwrap();
    let h2 = ictx.hwpt_alloc(d2, a).unwrap();
    ictx.attach(d2, h2).unwrap();
    ictx.ioas_map(a, Some(MOCK_APERTURE_START), USER, 8 * PAGE_SIZE, true, true).unwrap();
    ictx.ioas_map(b, Some(MOCK_APERTURE_START + 0x10000), USER + 0x8000, 8 * PAGE_SIZE, true, true).unwrap();
    // A second area, so that filling a new domain of b can fail half-way.
    ictx.ioas_map(b, Some(MOCK_APERTURE_START + 0x30000), USER + 0x28000, 2 * PAGE_SIZE, true, true).unwrap();
    // One right after the first, so that a copy can take two areas.
    ictx.ioas_map(b, Some(MOCK_APERTURE_START + 0x18000), USER + 0x2a000, 2 * PAGE_SIZE, true, true).unwrap();
    let spare_dev = ictx.bind_device(device()).unwrap();
    let d3 = ictx.bind_device(device()).unwrap();
    let dirty = ictx.hwpt_alloc_with(d3, a, true).unwrap();
    ictx.attach(d3, dirty).unwrap();
    ictx.hwpt_set_dirty_tracking(dirty, true).unwrap();
    mem.map(NEST_DATA, PAGE_SIZE, true);
    mem.write_user(NEST_DATA, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
    let c = ictx.ioas_alloc().unwrap();
    let nest_dev = ictx.bind_nesting_device(plain()).unwrap();
    ictx.attach(nest_dev, c).unwrap();
    ictx.ioas_map(c, Some(MOCK_APERTURE_START), USER + 0x38000, 4 * PAGE_SIZE, true, true).unwrap();
    let parent = ictx.hwpt_alloc_flags(nest_dev, c, false, true).unwrap();
    let (fault, fault_fd) = ictx.fault_alloc().unwrap();
    let mfd = mem.create_memfd(MFD_PAGES * PAGE_SIZE);
    ictx.ioas_map_file(b, Some(B_FILE_IOVA), mfd, 0, 4 * PAGE_SIZE, true, true).unwrap();
    ictx.ioas_map_file(a, Some(A_FILE_IOVA), mfd, 4 * PAGE_SIZE, 4 * PAGE_SIZE, true, true).unwrap();
    World { mem, ictx, faults, a, b, spare_dev, dev_a, dirty, nest_dev, parent, fault, fault_fd, mfd }
}

/// After a call that failed with invalidations failing: nothing mapped
/// that was not, no pin dropped, every page a domain maps pinned, the
/// accounting equal to the pins.
fn check_safe(name: &str, w: &World, before: &Snapshot, after: &Snapshot) {
    for (id, pages) in &after.domains {
        let old = before.domains.iter().find(|(b, _)| b == id).map(|(_, p)| p);
        for (k, t) in pages.iter().enumerate() {
            let Some(phys) = t else { continue };
            assert!(
                old.is_some_and(|o| o[k] == Some(*phys)),
                "{name}: HWPT {id} maps I/O page {k} to {phys:#x}, which it did not before"
            );
            let page = (0..USER_PAGES + MFD_PAGES).find(|&p| w.page_phys(p) == Some(phys & !(PAGE_SIZE - 1)));
            let page = page.unwrap_or_else(|| panic!("{name}: HWPT {id} maps {phys:#x}, not user or memfd memory"));
            assert!(after.pins[page as usize] > 0, "{name}: HWPT {id} maps user page {page}, which is not pinned");
        }
    }
    for (p, (b, a)) in before.pins.iter().zip(&after.pins).enumerate() {
        assert!(a >= b, "{name}: user page {p} lost a pin ({b} -> {a}) although an invalidation failed");
    }
    assert_eq!(after.accounted, after.pins.iter().map(|&c| c as u64).sum::<u64>(), "{name}: accounting");
}

/// Runs `op` with invalidation 1, 2, ... failing until it succeeds; after
/// each failure the call must report EIO and the state be safe. Returns
/// how many invalidations the call makes.
fn sync_sweep(name: &str, op: impl Fn(&World) -> Result<(), Errno>) -> u64 {
    for n in 1..100 {
        let w = world();
        let before = w.snapshot();
        w.faults.fail_sync_at(Some(n), false);
        let r = op(&w);
        w.faults.fail_sync_at(None, false);
        match r {
            Ok(()) => return n - 1,
            Err(e) => {
                assert_eq!(e, Errno::EIO, "{name}: invalidation {n} failed");
                check_safe(name, &w, &before, &w.snapshot());
            }
        }
    }
    panic!("{name}: never succeeded");
}

/// Runs `op` with each of its `points` fault points failing *and* the
/// first invalidation after arming failing (the one that unwinds the
/// failure, if any). A failure that invalidated nothing must leave the
/// state exactly as it was; one whose unwinding invalidation failed must
/// leave it safe. Returns how many failures had a failed invalidation.
fn unwind_sweep(name: &str, op: impl Fn(&World) -> Result<(), Errno>, points: u64) -> u64 {
    let mut stale = 0;
    for n in 1..=points {
        let w = world();
        let before = w.snapshot();
        w.ictx.accounting().faults.arm(Some(n));
        w.faults.fail_sync_at(Some(1), false);
        let r = op(&w);
        w.ictx.accounting().faults.arm(None);
        let synced = w.faults.syncs();
        w.faults.fail_sync_at(None, false);
        let e = r.expect_err("a fault point of the plain sweep fails");
        let after = w.snapshot();
        if synced == 0 {
            assert_eq!(after, before, "{name}: state changed after failure {e} at fault point {n}");
        } else {
            stale += 1;
            // The caller must hear that an invalidation failed (pins kept,
            // the domain to recover), not only the fault that started it.
            assert_eq!(e, Errno::EIO, "{name}: the unwind's failed invalidation at fault point {n} went unreported");
            check_safe(name, &w, &before, &after);
        }
    }
    stale
}

/// Runs `op` with fault point 1, 2, ... failing until it succeeds,
/// checking the state after each failure. Returns how many faults it took.
fn sweep(name: &str, op: impl Fn(&World) -> Result<(), Errno>) -> u64 {
    for n in 1..1000 {
        let w = world();
        let before = w.snapshot();
        w.ictx.accounting().faults.arm(Some(n));
        let r = op(&w);
        w.ictx.accounting().faults.arm(None);
        match r {
            Ok(()) => return n - 1,
            Err(e) => {
                let after = w.snapshot();
                assert_eq!(after, before, "{name}: state changed after failure {e} at fault point {n}");
                // And the world still works: the same operation succeeds now.
                op(&w).unwrap_or_else(|e| panic!("{name}: fails without injection after fault {n}: {e}"));
            }
        }
    }
    panic!("{name}: never succeeded");
}

type Op = (&'static str, Box<dyn Fn(&World) -> Result<(), Errno>>);

/// The operations both sweeps run.
fn operations() -> Vec<Op> {
    let page = PAGE_SIZE;
    vec![
        (
            "map into two domains",
            Box::new(move |w: &World| {
                let iova = Some(MOCK_APERTURE_START + 0x20000);
                w.ictx.ioas_map(w.a, iova, USER + 0x10000, 16 * page, true, true).map(|_| ())
            }),
        ),
        (
            "map with allocated IOVA",
            Box::new(move |w: &World| w.ictx.ioas_map(w.a, None, USER + 0x10000, 4 * page, true, false).map(|_| ())),
        ),
        (
            "copy into two domains",
            Box::new(move |w: &World| {
                let (src, dst) = (MOCK_APERTURE_START + 0x10000, Some(MOCK_APERTURE_START + 0x40000));
                w.ictx.ioas_copy(w.a, w.b, src, dst, 8 * page, true, true).map(|_| ())
            }),
        ),
        (
            "copy two areas into two domains",
            Box::new(move |w: &World| {
                let (src, dst) = (MOCK_APERTURE_START + 0x10000, Some(MOCK_APERTURE_START + 0x90000));
                w.ictx.ioas_copy(w.a, w.b, src, dst, 10 * page, true, true).map(|_| ())
            }),
        ),
        ("attach (new domain filled)", Box::new(|w: &World| w.ictx.attach(w.spare_dev, w.b).map(|_| ()))),
        ("hwpt alloc (fill)", Box::new(|w: &World| w.ictx.hwpt_alloc(w.spare_dev, w.a).map(|_| ()))),
        (
            "hwpt alloc with dirty tracking (fill)",
            Box::new(|w: &World| w.ictx.hwpt_alloc_with(w.spare_dev, w.a, true).map(|_| ())),
        ),
        (
            "replace to another IOAS",
            // Moved: the device is on the new HWPT and only the old one's
            // final invalidation failed; what the sweeps check is the move.
            Box::new(|w: &World| match w.ictx.replace(w.dev_a, w.b) {
                Ok(_) | Err(ReplaceError::Moved { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }),
        ),
        ("ioas alloc", Box::new(|w: &World| w.ictx.ioas_alloc().map(|_| ()))),
        (
            "nested hwpt alloc",
            Box::new(|w: &World| {
                let data = UserData::new(&*w.mem, IOMMU_HWPT_DATA_SELFTEST, NEST_DATA, 4);
                w.ictx.hwpt_nested_alloc(w.nest_dev, w.parent, 0, 0, &data).map(|_| ())
            }),
        ),
        (
            "nested hwpt alloc with a fault queue",
            Box::new(|w: &World| {
                let data = UserData::new(&*w.mem, IOMMU_HWPT_DATA_SELFTEST, NEST_DATA, 4);
                w.ictx.hwpt_nested_alloc(w.nest_dev, w.parent, IOMMU_HWPT_FAULT_ID_VALID, w.fault, &data).map(|_| ())
            }),
        ),
        (
            "nest parent alloc (fill)",
            Box::new(|w: &World| w.ictx.hwpt_alloc_flags(w.spare_dev, w.a, false, true).map(|_| ())),
        ),
        ("fault queue alloc", Box::new(|w: &World| w.ictx.fault_alloc().map(|_| ()))),
        ("unmap", Box::new(move |w: &World| w.ictx.ioas_unmap(w.a, MOCK_APERTURE_START, 8 * page).map(|_| ()))),
        (
            "map a file into two domains",
            Box::new(move |w: &World| {
                let iova = Some(MOCK_APERTURE_START + 0x70000);
                w.ictx.ioas_map_file(w.a, iova, w.mfd, 2 * page, 8 * page, true, true).map(|_| ())
            }),
        ),
        (
            "map a file with allocated IOVA (pages a's file area pins too)",
            Box::new(move |w: &World| w.ictx.ioas_map_file(w.a, None, w.mfd, 0, 6 * page, true, false).map(|_| ())),
        ),
        (
            "copy a file mapping into two domains",
            Box::new(move |w: &World| {
                let dst = Some(MOCK_APERTURE_START + 0x7c000);
                w.ictx.ioas_copy(w.a, w.b, B_FILE_IOVA, dst, 4 * page, true, true).map(|_| ())
            }),
        ),
        (
            "IOAS_MAP_FILE through the dispatcher",
            Box::new(move |w: &World| {
                let c = IommuIoasMapFile {
                    size: IommuIoasMapFile::SIZE as u32,
                    flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
                    ioas_id: w.a,
                    fd: w.mfd,
                    start: 8 * page + 0x800,
                    length: 2 * page,
                    iova: MOCK_APERTURE_START + 0x78800,
                };
                let mut buf = c.to_bytes();
                ioctl(&w.ictx, IOMMU_IOAS_MAP_FILE, &mut buf)
            }),
        ),
        (
            "IOAS_MAP through the dispatcher",
            Box::new(move |w: &World| {
                let c = IommuIoasMap {
                    size: IommuIoasMap::SIZE as u32,
                    flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE,
                    ioas_id: w.a,
                    user_va: USER + 0x20000,
                    length: 4 * page,
                    iova: MOCK_APERTURE_START + 0x60000,
                    ..Default::default()
                };
                let mut buf = c.to_bytes();
                ioctl(&w.ictx, IOMMU_IOAS_MAP, &mut buf)
            }),
        ),
    ]
}

#[test]
fn every_error_path_unwinds_fully() {
    error_paths_unwind_fully();
}

#[test]
fn every_error_path_unwinds_fully_on_the_concurrent_path() {
    CONCURRENT.set(true);
    error_paths_unwind_fully();
}

fn error_paths_unwind_fully() {
    let mut report = Vec::new();
    for (name, op) in operations() {
        report.push((name, sweep(name, op)));
    }
    for (name, faults) in &report {
        println!("{name}: {faults} failure point(s) swept");
    }
    // The sweeps really exercised failures (not just the success path).
    assert!(report.iter().filter(|(_, n)| *n >= 2).count() >= 5, "{report:?}");
}

#[test]
fn every_failed_invalidation_keeps_what_a_device_may_reach_pinned() {
    failed_invalidations_keep_pins();
}

#[test]
fn every_failed_invalidation_keeps_what_a_device_may_reach_pinned_on_the_concurrent_path() {
    CONCURRENT.set(true);
    failed_invalidations_keep_pins();
}

fn failed_invalidations_keep_pins() {
    let page = PAGE_SIZE;
    // Operations that invalidate: each failing invalidation in turn.
    let invalidating: Vec<Op> = vec![
        (
            "unmap from two domains",
            Box::new(move |w: &World| w.ictx.ioas_unmap(w.a, MOCK_APERTURE_START, 8 * page).map(|_| ())),
        ),
        ("unmap everything", Box::new(|w: &World| w.ictx.ioas_unmap(w.a, 0, u64::MAX).map(|_| ()))),
        (
            "unmap a file mapping from two domains",
            Box::new(|w: &World| w.ictx.ioas_unmap(w.a, A_FILE_IOVA, 4 * PAGE_SIZE).map(|_| ())),
        ),
        ("detach the last device of a domain", Box::new(|w: &World| w.ictx.detach(w.dev_a))),
        (
            "read and clear dirty bits",
            Box::new(move |w: &World| {
                let h = w.dirty;
                {
                    let hwpt = w.ictx.hwpt(h)?;
                    let mut d = hwpt.domain.lock();
                    let mock = d.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).expect("a mock domain");
                    for k in 0..4 {
                        mock.mark_dirty(MOCK_APERTURE_START + k * 2 * page);
                    }
                }
                w.ictx.hwpt_get_dirty_bitmap(h, MOCK_APERTURE_START, 8 * page, page, USER + 0x30000, false)
            }),
        ),
        (
            "unmap through the dispatcher",
            Box::new(move |w: &World| {
                let c = IommuIoasUnmap {
                    size: IommuIoasUnmap::SIZE as u32,
                    ioas_id: w.a,
                    iova: MOCK_APERTURE_START,
                    length: 8 * page,
                };
                let mut buf = c.to_bytes();
                ioctl(&w.ictx, IOMMU_IOAS_UNMAP, &mut buf)
            }),
        ),
    ];
    let mut report = Vec::new();
    for (name, op) in invalidating {
        report.push((name, sync_sweep(name, op)));
    }
    // Every operation of the first sweep, with the invalidation that
    // unwinds a failure failing too.
    let mut unwinds = Vec::new();
    for (name, op) in operations() {
        let points = sweep(name, &op);
        unwinds.push((name, unwind_sweep(name, op, points)));
    }
    for (name, n) in &report {
        println!("{name}: {n} invalidation(s) failed in turn");
    }
    for (name, n) in &unwinds {
        println!("{name}: {n} failure(s) whose unwinding invalidation failed");
    }
    assert!(report.iter().all(|(_, n)| *n >= 1), "{report:?}");
    assert_eq!(report[0].1, 3, "one invalidation per domain (three) for the whole unmap");
    assert!(unwinds.iter().filter(|(_, n)| *n >= 1).count() >= 3, "{unwinds:?}");
}

/// The sweep's snapshot cannot see reference counts: after each failed
/// nested allocation the parent and the fault queue must be free of any
/// hold the failure could have leaked (destroyable once their own holders
/// are gone).
#[test]
fn failed_nested_allocs_leave_no_hold_on_parent_or_fault_queue() {
    let mut failures = 0;
    for n in 1..100 {
        let w = world();
        let data = UserData::new(&*w.mem, IOMMU_HWPT_DATA_SELFTEST, NEST_DATA, 4);
        w.ictx.accounting().faults.arm(Some(n));
        let r = w.ictx.hwpt_nested_alloc(w.nest_dev, w.parent, IOMMU_HWPT_FAULT_ID_VALID, w.fault, &data);
        w.ictx.accounting().faults.arm(None);
        if r.is_ok() {
            break;
        }
        failures += 1;
        assert_eq!(w.ictx.destroy(w.parent), Ok(()), "fault point {n}: the parent is still held");
        w.ictx.fault_fd_close(w.fault_fd).unwrap();
        assert_eq!(w.ictx.destroy(w.fault), Ok(()), "fault point {n}: the fault queue is still held");
    }
    assert!(failures >= 2, "the allocation had {failures} fault point(s)");
}
