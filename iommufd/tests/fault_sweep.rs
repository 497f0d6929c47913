//! Fault-injection sweep: every operation is run with its 1st, 2nd, 3rd ...
//! fault point failing (object and page-store allocation, pin, domain
//! allocation, domain map), until it succeeds. After every failure the
//! whole observable state must equal the state before the call: the
//! objects, the pins on every user page, the accounting, and the contents
//! of every domain.

use iommufd::ctx::Ictx;
use iommufd::dispatch::ioctl;
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::MOCK_APERTURE_START;
use iommufd::uapi::{IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IommuIoasMap};
use std::sync::Arc;

const USER: u64 = 0x3000_0000;
const USER_PAGES: u64 = 64;
const WINDOW: u64 = 128 * PAGE_SIZE;

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    objects: Vec<u32>,
    pins: Vec<u32>,
    accounted: u64,
    /// For every HWPT: its id and the translation of every 2 KiB I/O page
    /// of the window.
    domains: Vec<(u32, Vec<Option<u64>>)>,
}

fn snapshot(ictx: &Ictx, mem: &FakeAddressSpace) -> Snapshot {
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
        pins: (0..USER_PAGES).map(|p| mem.pins(USER + p * PAGE_SIZE)).collect(),
        accounted: ictx.pinned_pages(),
        domains,
    }
}

struct World {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    /// IOAS with two devices in two domains, and a mapping.
    a: u32,
    /// IOAS without devices, with a mapping.
    b: u32,
    spare_dev: u32,
    dev_a: u32,
}

fn world() -> World {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let a = ictx.ioas_alloc().unwrap();
    let b = ictx.ioas_alloc().unwrap();
    let dev_a = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    ictx.attach(dev_a, a).unwrap();
    let d2 = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let h2 = ictx.hwpt_alloc(d2, a).unwrap();
    ictx.attach(d2, h2).unwrap();
    ictx.ioas_map(a, Some(MOCK_APERTURE_START), USER, 8 * PAGE_SIZE, true, true).unwrap();
    ictx.ioas_map(b, Some(MOCK_APERTURE_START + 0x10000), USER + 0x8000, 8 * PAGE_SIZE, true, true).unwrap();
    let spare_dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    World { mem, ictx, a, b, spare_dev, dev_a }
}

/// Runs `op` with fault point 1, 2, ... failing until it succeeds,
/// checking the state after each failure. Returns how many faults it took.
fn sweep(name: &str, op: impl Fn(&World) -> Result<(), Errno>) -> u64 {
    for n in 1..1000 {
        let w = world();
        let before = snapshot(&w.ictx, &w.mem);
        w.ictx.accounting().faults.arm(Some(n));
        let r = op(&w);
        w.ictx.accounting().faults.arm(None);
        match r {
            Ok(()) => return n - 1,
            Err(e) => {
                let after = snapshot(&w.ictx, &w.mem);
                assert_eq!(after, before, "{name}: state changed after failure {e} at fault point {n}");
                // And the world still works: the same operation succeeds now.
                op(&w).unwrap_or_else(|e| panic!("{name}: fails without injection after fault {n}: {e}"));
            }
        }
    }
    panic!("{name}: never succeeded");
}

#[test]
fn every_error_path_unwinds_fully() {
    let mut report = Vec::new();
    let page = PAGE_SIZE;
    report.push((
        "map into two domains",
        sweep("map", |w| {
            w.ictx.ioas_map(w.a, Some(MOCK_APERTURE_START + 0x20000), USER + 0x10000, 16 * page, true, true).map(|_| ())
        }),
    ));
    report.push((
        "map with allocated IOVA",
        sweep("map-alloc", |w| w.ictx.ioas_map(w.a, None, USER + 0x10000, 4 * page, true, false).map(|_| ())),
    ));
    report.push((
        "copy into two domains",
        sweep("copy", |w| {
            w.ictx
                .ioas_copy(
                    w.a,
                    w.b,
                    MOCK_APERTURE_START + 0x10000,
                    Some(MOCK_APERTURE_START + 0x40000),
                    8 * page,
                    true,
                    true,
                )
                .map(|_| ())
        }),
    ));
    report.push(("attach (new domain filled)", sweep("attach", |w| w.ictx.attach(w.spare_dev, w.b).map(|_| ()))));
    report.push(("hwpt alloc (fill)", sweep("hwpt_alloc", |w| w.ictx.hwpt_alloc(w.spare_dev, w.a).map(|_| ()))));
    report.push((
        "replace to another IOAS",
        sweep("replace", |w| w.ictx.replace(w.dev_a, w.b).map(|_| ()).map_err(Errno::from)),
    ));
    report.push(("ioas alloc", sweep("ioas_alloc", |w| w.ictx.ioas_alloc().map(|_| ()))));
    report.push(("unmap", sweep("unmap", |w| w.ictx.ioas_unmap(w.a, MOCK_APERTURE_START, 8 * page).map(|_| ()))));
    report.push((
        "IOAS_MAP through the dispatcher",
        sweep("ioctl-map", |w| {
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
    ));
    for (name, faults) in &report {
        println!("{name}: {faults} failure point(s) swept");
    }
    // The sweeps really exercised failures (not just the success path).
    assert!(report.iter().filter(|(_, n)| *n >= 2).count() >= 5, "{report:?}");
}
