//! PASID attach, replace and detach (Linux 6.15) under every injected
//! failure, under hardware refusals, and from several threads at once.
//!
//! The fault-injection sweep (as `fault_sweep.rs` does for the other
//! operations) runs each PASID operation with its 1st, 2nd, ... fault
//! point failing (object and domain allocation, the attach itself) until
//! it succeeds. After every failure the snapshot must equal the one
//! before: the objects, the pins of every user page and the accounting,
//! every paging domain's translations, every HWPT's references, every
//! device's requester-id and PASID attachments, and which mock domain the
//! mock's PASID table names for each device and PASID. (A separate file
//! from `fault_sweep.rs`, whose world the PASID device would change.)

use iommufd::ctx::{Ictx, ReplaceError, UserData};
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain, MockFaults, MockNestedDomain};
use iommufd::uapi::{
    IOMMU_HWPT_ALLOC_PASID, IOMMU_HWPT_DATA_SELFTEST, IOMMU_TEST_IOTLB_DEFAULT, MOCK_FLAGS_DEVICE_PASID,
};
use portcullis_iommu::DeviceHandle;
use std::sync::Arc;

const USER: u64 = 0x3000_0000;
const USER_PAGES: u64 = 16;
const WINDOW: u64 = 32 * PAGE_SIZE;
/// One page of user memory holding the mock's nested-HWPT data.
const NEST_DATA: u64 = 0x5000_0000;
/// The PASIDs of the world: one attached at the start, one free.
const PASID_ON: u32 = 7;
const PASID_FREE: u32 = 9;

/// A device's id, requester-id HWPT and `(PASID, HWPT)` attachments.
type Attachments = (u32, Option<u32>, Vec<(u32, u32)>);

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    objects: Vec<u32>,
    pins: Vec<u32>,
    accounted: u64,
    /// For every paging HWPT: its id and the translation of every 2 KiB
    /// I/O page of the window.
    domains: Vec<(u32, Vec<Option<u64>>)>,
    /// For every HWPT, paging or nested: its id and references.
    refs: Vec<(u32, u32)>,
    attachments: Vec<Attachments>,
    /// For every device and the world's two PASIDs: the HWPTs whose mock
    /// domain the mock's PASID table names for it.
    pasid_table: Vec<(u32, u32, Vec<u32>)>,
}

/// Whether HWPT `id`'s mock domain (paging or nested) is what the mock's
/// PASID table names for PASID `pasid` of `dev`.
fn domain_has_pasid(ictx: &Ictx, id: u32, dev: DeviceHandle, pasid: u32) -> bool {
    if let Ok(h) = ictx.hwpt(id) {
        let mut d = h.domain.lock();
        return d.as_any_mut().and_then(|a| a.downcast_mut::<MockDomain>()).is_some_and(|m| m.has_pasid(dev, pasid));
    }
    if let Ok(n) = ictx.hwpt_nested(id) {
        let mut d = n.domain.lock();
        return d
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<MockNestedDomain>())
            .is_some_and(|m| m.has_pasid(dev, pasid));
    }
    false
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
    let refs = objects
        .iter()
        .filter_map(|&id| match (ictx.hwpt(id), ictx.hwpt_nested(id)) {
            (Ok(h), _) => Some((id, h.refs())),
            (_, Ok(n)) => Some((id, n.refs())),
            _ => None,
        })
        .collect();
    let devices: Vec<u32> = objects.iter().copied().filter(|&id| ictx.device(id).is_ok()).collect();
    let attachments =
        devices.iter().map(|&d| (d, ictx.attached_hwpt(d).unwrap(), ictx.attached_pasids(d).unwrap())).collect();
    let mut pasid_table = Vec::new();
    for &d in &devices {
        let handle = ictx.device(d).unwrap().handle();
        for pasid in [PASID_ON, PASID_FREE] {
            let on = objects.iter().copied().filter(|&id| domain_has_pasid(ictx, id, handle, pasid)).collect();
            pasid_table.push((d, pasid, on));
        }
    }
    Snapshot {
        objects,
        pins: (0..USER_PAGES).map(|p| mem.pins(USER + p * PAGE_SIZE)).collect(),
        accounted: ictx.pinned_pages(),
        domains,
        refs,
        attachments,
        pasid_table,
    }
}

struct World {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    /// Failure switches of every mock domain.
    faults: Arc<MockFaults>,
    /// An IOAS with a mapping.
    ioas: u32,
    /// A PASID-capable device (that also nests) whose requester id and
    /// PASID [`PASID_ON`] are on `hwpt`, a PASID-compatible HWPT of
    /// `ioas`; `hwpt2` is another one, unused; `parent` a NEST_PARENT
    /// HWPT of `ioas`.
    dev: u32,
    hwpt: u32,
    hwpt2: u32,
    parent: u32,
}

fn world() -> World {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    mem.map(NEST_DATA, PAGE_SIZE, true);
    mem.write_user(NEST_DATA, &IOMMU_TEST_IOTLB_DEFAULT.to_le_bytes()).unwrap();
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let faults = MockFaults::new();
    let ioas = ictx.ioas_alloc().unwrap();
    ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), USER, 4 * PAGE_SIZE, true, true).unwrap();
    // A second area, so that filling a new domain can fail half-way.
    ictx.ioas_map(ioas, Some(MOCK_APERTURE_START + 0x8000), USER + 0x8000, 2 * PAGE_SIZE, true, true).unwrap();
    let dev =
        ictx.bind_nesting_device(Arc::new(MockDevice::with_faults(MOCK_FLAGS_DEVICE_PASID, faults.clone()))).unwrap();
    let hwpt = ictx.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
    let hwpt2 = ictx.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
    let parent = ictx.hwpt_alloc_flags(dev, ioas, false, true).unwrap();
    ictx.attach(dev, hwpt).unwrap();
    ictx.attach_pasid(dev, PASID_ON, hwpt).unwrap();
    World { mem, ictx, faults, ioas, dev, hwpt, hwpt2, parent }
}

/// Runs `op` with fault point 1, 2, ... failing until it succeeds,
/// checking the state after each failure and that the operation then
/// succeeds without injection. Returns how many faults it took.
fn sweep(name: &str, op: &dyn Fn(&World) -> Result<(), Errno>) -> u64 {
    for n in 1..1000 {
        let w = world();
        let before = snapshot(&w.ictx, &w.mem);
        w.ictx.accounting().faults.arm(Some(n));
        let r = op(&w);
        w.ictx.accounting().faults.arm(None);
        match r {
            Ok(()) => return n - 1,
            Err(e) => {
                assert_eq!(
                    snapshot(&w.ictx, &w.mem),
                    before,
                    "{name}: state changed after failure {e} at fault point {n}"
                );
                op(&w).unwrap_or_else(|e| panic!("{name}: fails without injection after fault {n}: {e}"));
            }
        }
    }
    panic!("{name}: never succeeded");
}

type Op = (&'static str, Box<dyn Fn(&World) -> Result<(), Errno>>);

fn operations() -> Vec<Op> {
    vec![
        ("PASID attach", Box::new(|w: &World| w.ictx.attach_pasid(w.dev, PASID_FREE, w.hwpt2).map(|_| ()))),
        (
            "PASID attach through an IOAS (a new automatic HWPT, refused)",
            // Automatic HWPTs never take PASIDs: EINVAL is the answer once
            // nothing else fails; what is swept is the new HWPT's
            // allocation, fill and release.
            Box::new(|w: &World| match w.ictx.attach_pasid(w.dev, PASID_FREE, w.ioas) {
                Err(Errno::EINVAL) => Ok(()),
                Ok(h) => panic!("an automatic HWPT {h} took a PASID"),
                Err(e) => Err(e),
            }),
        ),
        ("PASID replace", Box::new(|w: &World| w.ictx.replace_pasid(w.dev, PASID_ON, w.hwpt2).map(|_| ()))),
        (
            "nested PASID-compatible HWPT alloc and PASID attach",
            Box::new(|w: &World| {
                let data = UserData::new(&*w.mem, IOMMU_HWPT_DATA_SELFTEST, NEST_DATA, 4);
                let n = w.ictx.hwpt_nested_alloc(w.dev, w.parent, IOMMU_HWPT_ALLOC_PASID, 0, &data)?;
                match w.ictx.attach_pasid(w.dev, PASID_FREE, n) {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        w.ictx.destroy(n).expect("the new nested HWPT is free");
                        Err(e)
                    }
                }
            }),
        ),
        (
            "requester-id replace through an IOAS under an attached PASID (refused)",
            // The IOAS's automatic HWPTs cannot sit under a PASID: EINVAL
            // once nothing else fails, the device staying where it was.
            Box::new(|w: &World| match w.ictx.replace(w.dev, w.ioas) {
                Err(ReplaceError::Stayed(Errno::EINVAL)) => Ok(()),
                Ok(h) => panic!("the requester id moved to automatic HWPT {h} under a PASID"),
                Err(e) => Err(e.into()),
            }),
        ),
        (
            "requester-id replace under an attached PASID",
            Box::new(|w: &World| match w.ictx.replace(w.dev, w.hwpt2) {
                Ok(_) | Err(ReplaceError::Moved { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }),
        ),
    ]
}

#[test]
fn every_pasid_error_path_unwinds_fully() {
    let mut report = Vec::new();
    for (name, op) in operations() {
        report.push((name, sweep(name, &*op)));
    }
    for (name, faults) in &report {
        println!("{name}: {faults} failure point(s) swept");
    }
    // All but the last (a move between two existing HWPTs) allocate.
    assert!(report[..report.len() - 1].iter().all(|(_, n)| *n >= 1), "{report:?}");
    assert!(report[1].1 >= 3, "a new automatic HWPT is allocated, filled and released: {report:?}");
}

/// A domain that refuses a PASID attach or detach (a hardware error)
/// leaves everything as it was; an unbind stops at the refused PASID
/// detach with the device still bound and attached, and succeeds once the
/// hardware answers, detaching the PASID first.
#[test]
fn refused_pasid_attach_and_detach_change_nothing() {
    let w = world();
    let handle = w.ictx.device(w.dev).unwrap().handle();
    let before = snapshot(&w.ictx, &w.mem);
    w.faults.refuse_attach(true);
    assert_eq!(w.ictx.attach_pasid(w.dev, PASID_FREE, w.hwpt2), Err(Errno::EIO));
    assert_eq!(snapshot(&w.ictx, &w.mem), before, "refused attach");
    assert_eq!(w.ictx.replace_pasid(w.dev, PASID_ON, w.hwpt2), Err(Errno::EIO));
    assert_eq!(snapshot(&w.ictx, &w.mem), before, "refused replace");
    w.faults.refuse_attach(false);
    w.faults.refuse_detach(true);
    assert_eq!(w.ictx.detach_pasid(w.dev, PASID_ON), Err(Errno::ETIMEDOUT));
    assert_eq!(snapshot(&w.ictx, &w.mem), before, "refused detach");
    assert_eq!(w.ictx.destroy(w.hwpt), Err(Errno::EBUSY), "the PASID still holds its HWPT");
    assert_eq!(w.ictx.unbind_device(w.dev), Err(Errno::ETIMEDOUT));
    assert_eq!(snapshot(&w.ictx, &w.mem), before, "refused unbind");
    w.faults.refuse_detach(false);
    w.ictx.unbind_device(w.dev).unwrap();
    assert_eq!(w.ictx.hwpt(w.hwpt).map(|h| h.refs()), Ok(0));
    assert!(!domain_has_pasid(&w.ictx, w.hwpt, handle, PASID_ON));
    w.ictx.destroy(w.hwpt).unwrap();
    drop(w.ictx);
    assert_eq!(w.mem.pinned_pages(), 0, "closing the context unpins everything");
}

/// A device's requester-id moves and its PASID attaches, replaces and
/// detaches from several threads at once keep Linux's rule: while a PASID
/// is attached the requester id is on a PASID-compatible HWPT, and while
/// the requester id is on an incompatible one no PASID is attached. The
/// references add up afterwards.
#[test]
fn parallel_pasid_and_requester_id_changes_keep_the_compat_rule() {
    let mem = Arc::new(FakeAddressSpace::new());
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(MockDevice::new(MOCK_FLAGS_DEVICE_PASID))).unwrap();
    let a = ictx.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
    let b = ictx.hwpt_alloc_pasid(dev, ioas, false, false, true).unwrap();
    let plain = ictx.hwpt_alloc(dev, ioas).unwrap();
    ictx.attach(dev, a).unwrap();
    let done = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
                match ictx.replace(dev, plain) {
                    Ok(_) => {
                        assert_eq!(ictx.attached_pasids(dev), Ok(vec![]), "a PASID under an incompatible HWPT");
                        ictx.replace(dev, a).unwrap();
                    }
                    Err(e) => assert_eq!(e.errno(), Errno::EINVAL),
                }
            }
        });
        for pasid in [1u32, 2] {
            let (ictx, done) = (&ictx, &done);
            s.spawn(move || {
                for round in 0..300 {
                    let (first, second) = if round % 2 == 0 { (a, b) } else { (b, a) };
                    match ictx.attach_pasid(dev, pasid, first) {
                        Ok(h) => {
                            assert_eq!(h, first);
                            assert_eq!(ictx.attached_hwpt(dev), Ok(Some(a)), "the requester id left for {plain}");
                            assert_eq!(ictx.replace_pasid(dev, pasid, second), Ok(second));
                            ictx.detach_pasid(dev, pasid).unwrap();
                        }
                        // The requester id is on the incompatible HWPT.
                        Err(e) => assert_eq!(e, Errno::EINVAL),
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    assert_eq!(ictx.attached_pasids(dev), Ok(vec![]));
    assert_eq!(ictx.attached_hwpt(dev), Ok(Some(a)));
    let refs = |id| ictx.hwpt(id).unwrap().refs();
    assert_eq!((refs(a), refs(b), refs(plain)), (1, 0, 0));
}
