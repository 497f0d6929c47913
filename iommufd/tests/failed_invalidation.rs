//! Hardware failures under the object model, on mock domains whose
//! failures a test injects (`MockFaults`): an IOTLB invalidation that
//! fails (the pages it covered stay pinned, the error reaches the caller,
//! the domain refuses maps until recovered) and a domain that refuses a
//! device (a replace that cannot go back leaves the device blocked).

use iommufd::ctx::{Ictx, ReplaceError};
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockFaults};
use std::sync::Arc;

const USER: u64 = 0x5000_0000;
const USER_PAGES: u64 = 32;
const IOVA: u64 = MOCK_APERTURE_START;

struct World {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    faults: Arc<MockFaults>,
    ioas: u32,
    dev: u32,
}

/// An IOAS with one mock device attached (its domains share `faults`).
fn world() -> World {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let faults = MockFaults::new();
    let ioas = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(MockDevice::with_faults(0, faults.clone()))).unwrap();
    ictx.attach(dev, ioas).unwrap();
    World { mem, ictx, faults, ioas, dev }
}

/// Everything a failed operation must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct State {
    objects: Vec<u32>,
    areas: Vec<(u64, u64)>,
    pins: Vec<u32>,
    accounted: u64,
    /// Per HWPT, the translation of every 2 KiB I/O page of the first
    /// 32 pages' worth of IOVA.
    domains: Vec<(u32, Vec<Option<u64>>)>,
}

fn state(w: &World) -> State {
    let objects = w.ictx.object_ids();
    let domains = objects
        .iter()
        .filter_map(|&id| w.ictx.hwpt(id).ok().map(|h| (id, h)))
        .map(|(id, h)| {
            let d = h.domain.lock();
            (id, (0..USER_PAGES * 2).map(|k| d.iova_to_phys(IOVA + k * 2048)).collect())
        })
        .collect();
    State {
        objects,
        areas: w.ictx.ioas(w.ioas).unwrap().iopt.lock().areas().map(|(s, l, _)| (s, l)).collect(),
        pins: (0..USER_PAGES).map(|p| w.mem.pins(USER + p * PAGE_SIZE)).collect(),
        accounted: w.ictx.pinned_pages(),
        domains,
    }
}

fn hwpt_of(w: &World) -> u32 {
    w.ictx.attached_hwpt(w.dev).unwrap().unwrap()
}

#[test]
fn an_unmap_whose_invalidation_fails_keeps_the_pages_pinned() {
    for (timeout, errno) in [(false, Errno::EIO), (true, Errno::ETIMEDOUT)] {
        let w = world();
        w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 4 * PAGE_SIZE, true, true).unwrap();
        w.ictx.ioas_map(w.ioas, Some(IOVA + 0x10000), USER + 0x8000, 2 * PAGE_SIZE, true, true).unwrap();
        assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages()), (6, 6));
        w.faults.fail_sync_at(Some(1), timeout);
        assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA, 4 * PAGE_SIZE), Err(errno));
        // The pages a device may still reach through stale entries stay
        // pinned, in the memory source and in the accounting.
        assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages()), (6, 6));
        assert_eq!(w.mem.pins(USER), 1);
        // The IOAS no longer lists the area, and the domain no longer maps it.
        let ioas = w.ictx.ioas(w.ioas).unwrap();
        assert!(ioas.iopt.lock().area_at(IOVA).is_none());
        assert_eq!(ioas.iopt.lock().areas().count(), 1);
        let hwpt = w.ictx.hwpt(hwpt_of(&w)).unwrap();
        assert_eq!(hwpt.domain.lock().iova_to_phys(IOVA), None);
        assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA, 4 * PAGE_SIZE), Err(Errno::ENOENT));
        // The other area unmaps normally (its sync succeeds) and drops its pins.
        assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA + 0x10000, 2 * PAGE_SIZE), Ok(2 * PAGE_SIZE));
        assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages()), (4, 4));
        // Closing the context cannot release them either.
        let mem = w.mem.clone();
        drop(w);
        assert_eq!(mem.pinned_pages(), 4);
    }
}

#[test]
fn a_map_onto_a_domain_needing_recovery_recovers_it_first_or_changes_nothing() {
    let w = world();
    // A second domain on the IOAS, after the automatic one.
    let d2 = w.ictx.bind_device(Arc::new(MockDevice::with_faults(0, w.faults.clone()))).unwrap();
    let h2 = w.ictx.hwpt_alloc(d2, w.ioas).unwrap();
    w.ictx.attach(d2, h2).unwrap();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 2 * PAGE_SIZE, true, true).unwrap();
    w.ictx.ioas_map(w.ioas, Some(IOVA + 0x8000), USER + 0x8000, 2 * PAGE_SIZE, true, true).unwrap();
    // The unmap syncs the automatic domain, then h2's, which fails.
    w.faults.fail_sync_at(Some(2), false);
    assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA, 2 * PAGE_SIZE), Err(Errno::EIO));
    // The next map recovers h2 first (a whole-domain invalidation); while
    // the unit keeps failing, the recovery fails, the automatic domain is
    // unloaded again and the new pins dropped.
    w.faults.fail_sync_at(Some(1), false);
    let before = state(&w);
    assert_eq!(
        w.ictx.ioas_map(w.ioas, Some(IOVA + 0x20000), USER + 0x10000, 2 * PAGE_SIZE, true, true),
        Err(Errno::EIO)
    );
    assert_eq!(state(&w), before);
    w.faults.fail_sync_at(Some(1), false);
    assert_eq!(w.ictx.ioas_map(w.ioas, None, USER + 0x10000, PAGE_SIZE, true, false), Err(Errno::EIO));
    assert_eq!(state(&w), before);
    // A copy into it (from a domain-less IOAS) is refused the same way.
    let src = w.ictx.ioas_alloc().unwrap();
    let src_iova = w.ictx.ioas_map(src, None, USER + 0x18000, 2 * PAGE_SIZE, true, true).unwrap();
    let before = state(&w);
    w.faults.fail_sync_at(Some(1), false);
    let r = w.ictx.ioas_copy(w.ioas, src, src_iova, Some(IOVA + 0x30000), 2 * PAGE_SIZE, true, true);
    assert_eq!(r, Err(Errno::EIO));
    assert_eq!(state(&w), before);
    // The unit answers again: the next map recovers the domain and maps.
    w.faults.fail_sync_at(None, false);
    w.ictx.ioas_map(w.ioas, Some(IOVA + 0x20000), USER + 0x10000, 2 * PAGE_SIZE, true, true).unwrap();
    assert_eq!(w.ictx.hwpt(h2).unwrap().domain.lock().iova_to_phys(IOVA + 0x20000), w.mem.phys_of(USER + 0x10000));
}

#[test]
fn a_detach_whose_invalidation_fails_still_detaches() {
    let w = world();
    let h = hwpt_of(&w);
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 3 * PAGE_SIZE, true, true).unwrap();
    w.faults.fail_sync_at(Some(1), false);
    // The last device leaves: its automatic HWPT goes, and the domain's
    // final invalidation fails.
    assert_eq!(w.ictx.detach(w.dev), Err(Errno::EIO));
    assert_eq!(w.ictx.attached_hwpt(w.dev), Ok(None));
    assert_eq!(w.ictx.hwpt(h).map(|_| ()), Err(Errno::ENOENT));
    assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages()), (3, 3));
    // The area stays in the IOAS (no domain holds it now).
    assert_eq!(w.ictx.ioas(w.ioas).unwrap().iopt.lock().areas().count(), 1);
    // Attached again, a fresh domain maps the area: the pages still
    // pinned for the failed one are found through the memory source (no
    // domain holds them any more) and are not pinned again.
    w.ictx.attach(w.dev, w.ioas).unwrap();
    let d = w.ictx.hwpt(hwpt_of(&w)).unwrap().domain.clone();
    assert_eq!(d.lock().iova_to_phys(IOVA + 0x2000), w.mem.phys_of(USER + 0x2000));
    assert_eq!((w.mem.pins(USER), w.ictx.pinned_pages()), (1, 3));
    // Unmapped now, the area's pages keep the one pin the failure left.
    assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA, 3 * PAGE_SIZE), Ok(3 * PAGE_SIZE));
    assert_eq!((w.mem.pins(USER), w.ictx.pinned_pages()), (1, 3));
}

#[test]
fn pages_left_pinned_by_a_failed_unmap_are_found_by_a_copy_sharing_them() {
    let w = world();
    // B holds a copy of A's mapping, without a domain yet.
    let b = w.ictx.ioas_alloc().unwrap();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 4 * PAGE_SIZE, true, true).unwrap();
    w.ictx.ioas_copy(b, w.ioas, IOVA, Some(IOVA + 0x40000), 4 * PAGE_SIZE, true, true).unwrap();
    w.faults.fail_sync_at(Some(1), false);
    assert_eq!(w.ictx.ioas_unmap(w.ioas, IOVA, 4 * PAGE_SIZE), Err(Errno::EIO));
    // A device on B: its domain needs the addresses of pages that are in
    // use (the failed unmap's pins) but that no domain maps any more.
    let db = w.ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let hb = w.ictx.attach(db, b).unwrap();
    let d = w.ictx.hwpt(hb).unwrap().domain.clone();
    for p in 0..4 {
        assert_eq!(d.lock().iova_to_phys(IOVA + 0x40000 + p * PAGE_SIZE), w.mem.phys_of(USER + p * PAGE_SIZE));
    }
    assert_eq!((w.mem.pins(USER), w.ictx.pinned_pages()), (1, 4), "one pin per page, shared");
    // B's unmap succeeds; the failed one's pins stay.
    assert_eq!(w.ictx.ioas_unmap(b, 0, u64::MAX), Ok(4 * PAGE_SIZE));
    assert_eq!((w.mem.pinned_pages(), w.ictx.pinned_pages()), (4, 4));
}

#[test]
fn a_replace_that_cannot_go_back_leaves_the_device_blocked() {
    let w = world();
    let old = hwpt_of(&w);
    let other = w.ictx.ioas_alloc().unwrap();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 2 * PAGE_SIZE, true, true).unwrap();
    // A move that fails for an ordinary reason: back where it was.
    assert_eq!(w.ictx.replace(w.dev, 999), Err(ReplaceError::Stayed(Errno::ENOENT)));
    assert_eq!(w.ictx.attached_hwpt(w.dev), Ok(Some(old)));
    // Now the hardware refuses every attach: the new domain refuses the
    // device, and so does the old one when the device goes back.
    let objects = w.ictx.object_ids();
    w.faults.refuse_attach(true);
    let r = w.ictx.replace(w.dev, other);
    assert_eq!(r, Err(ReplaceError::Blocked { error: Errno::EIO, back: Errno::EIO }));
    assert_eq!(Errno::from(r.unwrap_err()), Errno::EIO);
    // Blocked: attached to nothing; the old automatic HWPT went with its
    // last device, the new one was never kept; the old domain's pins went
    // with it (its invalidation succeeded).
    assert_eq!(w.ictx.attached_hwpt(w.dev), Ok(None));
    assert_eq!(w.ictx.hwpt(old).map(|_| ()), Err(Errno::ENOENT));
    assert_eq!(w.ictx.object_ids(), objects.into_iter().filter(|&id| id != old).collect::<Vec<_>>());
    assert_eq!(w.mem.pinned_pages(), 0);
    // The device can be attached again once the hardware takes it.
    w.faults.refuse_attach(false);
    w.ictx.attach(w.dev, w.ioas).unwrap();
    assert_eq!(w.mem.pinned_pages(), 2);
}

#[test]
fn a_blocked_device_keeps_a_shared_old_hwpt_alive_for_the_others() {
    let w = world();
    let old = hwpt_of(&w);
    // A second device shares the automatic HWPT; it has its own switches.
    let d2 = w.ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    assert_eq!(w.ictx.attach(d2, w.ioas), Ok(old));
    let other = w.ictx.ioas_alloc().unwrap();
    // The old HWPT's domain came from the first device (its switches).
    w.faults.refuse_attach(true);
    let r = w.ictx.replace(w.dev, other);
    assert!(matches!(r, Err(ReplaceError::Blocked { .. })), "{r:?}");
    assert_eq!(w.ictx.attached_hwpt(w.dev), Ok(None));
    assert_eq!(w.ictx.attached_hwpt(d2), Ok(Some(old)));
    assert_eq!(w.ictx.destroy(old), Err(Errno::EBUSY), "still held by the second device");
    w.faults.refuse_attach(false);
    w.ictx.detach(d2).unwrap();
    assert_eq!(w.ictx.hwpt(old).map(|_| ()), Err(Errno::ENOENT), "gone with its last device");
}

/// A domain that cannot let a device go (the unit cannot write the blocked
/// entry) keeps it: detach, replace and unbind fail and change nothing,
/// and closing the context frees and unpins nothing the device may still
/// reach.
#[test]
fn a_device_its_domain_cannot_block_keeps_everything_it_reaches() {
    let w = world();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 4 * PAGE_SIZE, true, true).unwrap();
    let other = w.ictx.ioas_alloc().unwrap();
    let before = state(&w);
    w.faults.refuse_detach(true);
    assert_eq!(w.ictx.detach(w.dev), Err(Errno::ETIMEDOUT));
    assert_eq!(state(&w), before, "a refused detach changes nothing");
    assert!(matches!(w.ictx.replace(w.dev, other), Err(ReplaceError::Stayed(Errno::ETIMEDOUT))));
    assert_eq!(state(&w), before, "a replace that cannot detach changes nothing");
    assert_eq!(w.ictx.unbind_device(w.dev), Err(Errno::ETIMEDOUT));
    assert_eq!(state(&w), before, "a refused unbind changes nothing");
    let mem = w.mem.clone();
    drop(w.ictx);
    assert_eq!(mem.pinned_pages(), 4, "closing keeps the pages the unblocked device may reach pinned");
    // The same close with the unit answering again unpins everything.
    let w = world();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 4 * PAGE_SIZE, true, true).unwrap();
    w.faults.refuse_detach(true);
    assert!(w.ictx.detach(w.dev).is_err());
    w.faults.refuse_detach(false);
    let mem = w.mem.clone();
    drop(w.ictx);
    assert_eq!(mem.pinned_pages(), 0);
}

/// Pages whose domain went away with its invalidation failing stay pinned
/// with no domain to read their addresses from. When the user then
/// replaces the memory behind them (munmap and mmap at the same address),
/// a new domain filling the area must map the pinned pages, not whatever
/// the user address names now (which nobody pinned).
#[test]
fn a_new_domain_maps_the_pages_kept_pinned_not_what_the_user_address_names_now() {
    let w = world();
    w.ictx.ioas_map(w.ioas, Some(IOVA), USER, 4 * PAGE_SIZE, true, true).unwrap();
    let old: Vec<u64> = (0..4).map(|k| w.mem.phys_of(USER + k * PAGE_SIZE).unwrap()).collect();
    w.faults.fail_sync_at(Some(1), false);
    assert_eq!(w.ictx.detach(w.dev), Err(Errno::EIO));
    w.faults.fail_sync_at(None, false);
    assert_eq!(w.mem.pins(USER), 1, "kept pinned");
    w.mem.unmap(USER, 4 * PAGE_SIZE);
    w.mem.map(USER, 4 * PAGE_SIZE, true);
    assert_ne!(w.mem.phys_of(USER), Some(old[0]), "the user address names other memory now");
    let d2 = w.ictx.bind_device(Arc::new(MockDevice::with_faults(0, w.faults.clone()))).unwrap();
    w.ictx.attach(d2, w.ioas).unwrap();
    let hwpt = w.ictx.hwpt(w.ictx.attached_hwpt(d2).unwrap().unwrap()).unwrap();
    let mapped: Vec<Option<u64>> = (0..4).map(|k| hwpt.domain.lock().iova_to_phys(IOVA + k * PAGE_SIZE)).collect();
    assert_eq!(mapped, old.iter().map(|&p| Some(p)).collect::<Vec<_>>(), "the pinned pages");
    assert_eq!(w.mem.pins(USER), 0, "the new page at the user address was never pinned");
}
