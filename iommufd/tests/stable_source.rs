//! Memory whose pages stay at their user addresses while pinned (guest
//! RAM a hypervisor owns: `RegionMemory`): an unmap reads no addresses
//! back and drops the pins by user address, through concurrent domains
//! (outside the IOAS lock) and through exclusive ones (under it): each
//! test runs with both.
//! These tests check that the pins end up exactly where the uses say, with
//! pages shared by a copy in another IOAS and by an access, and that a
//! failed invalidation keeps every pin.
#![allow(clippy::single_range_in_vec_init)] // page ranges, one or more

mod common;

use common::{EngineDevice, Gate};
use iommufd::ctx::Ictx;
use iommufd::errno::Errno;
use iommufd::memsrc::{MemorySource, NoPhysAccess, PAGE_SIZE, RegionMemory};
use iommufd::selftest::cmd::MockAccess;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

const USER: u64 = 0x4000_0000;
const PHYS: u64 = 0x1_2345_6000;
const PAGES: u64 = 16;
const IOVA: u64 = 1 << 32;

struct World {
    mem: Arc<RegionMemory<NoPhysAccess>>,
    ictx: Ictx,
    /// Open (maps go ahead); its `fail_sync` fails every domain's syncs.
    gate: Arc<Gate>,
    /// Domains that cannot map concurrently.
    exclusive: bool,
}

impl World {
    fn new(exclusive: bool) -> Self {
        let mem = Arc::new(RegionMemory::new(NoPhysAccess));
        mem.add_region(USER, PHYS, PAGES * PAGE_SIZE, true).unwrap();
        assert!(mem.pins_stay_at_user());
        let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
        let gate = Arc::new(Gate::default());
        gate.set(true);
        World { mem, ictx, gate, exclusive }
    }

    /// A new IOAS with a device (its own engine domain) attached.
    fn ioas(&self, id: u64) -> u32 {
        let ioas = self.ictx.ioas_alloc().unwrap();
        let dev = self.ictx.bind_device(self.device(id)).unwrap();
        self.ictx.attach(dev, ioas).unwrap();
        assert_eq!(self.ictx.ioas(ioas).unwrap().iopt.lock().concurrent(), !self.exclusive);
        ioas
    }

    fn device(&self, id: u64) -> Arc<EngineDevice> {
        Arc::new(EngineDevice { id, gate: Some(self.gate.clone()), exclusive: self.exclusive })
    }

    fn pins(&self) -> Vec<u32> {
        (0..PAGES).map(|p| self.mem.pin_count(USER + p * PAGE_SIZE).unwrap().unwrap()).collect()
    }

    /// What the domain of `ioas` translates `iova` to.
    fn translate(&self, ioas: u32, iova: u64) -> Option<u64> {
        let hw = (1..64).find_map(|id| self.ictx.hwpt(id).ok().filter(|h| h.ioas_id == ioas)).unwrap();
        hw.domain.read().iova_to_phys(iova)
    }
}

/// 1 for each page in one of `ranges` (page index ranges), else 0.
fn expect(ranges: &[std::ops::Range<u64>]) -> Vec<u32> {
    (0..PAGES).map(|p| ranges.iter().any(|r| r.contains(&p)) as u32).collect()
}

#[test]
fn an_unmap_drops_by_user_address_exactly_the_pages_nothing_else_uses() {
    for exclusive in [false, true] {
        let w = World::new(exclusive);
        let (a, b) = (w.ioas(1), w.ioas(2));
        w.ictx.ioas_map(a, Some(IOVA), USER, PAGES * PAGE_SIZE, true, true).unwrap();
        assert_eq!(w.pins(), expect(&[0..PAGES]), "each page pinned once");
        // Pages 4..12 copied into another IOAS (the same pages, a second
        // holder); pages 2..6 copied into an IOAS without domains and pinned
        // there by an access (a use that is not a domain's).
        let copy = IOVA + 0x100_0000;
        w.ictx.ioas_copy(b, a, IOVA + 4 * PAGE_SIZE, Some(copy), 8 * PAGE_SIZE, true, true).unwrap();
        let c = w.ictx.ioas_alloc().unwrap();
        w.ictx.ioas_copy(c, a, IOVA + 2 * PAGE_SIZE, Some(IOVA), 4 * PAGE_SIZE, true, true).unwrap();
        let acc = w.ictx.access_create(Arc::new(MockAccess::new(true))).unwrap();
        w.ictx.access_attach(acc, c).unwrap();
        let got = w.ictx.access_pin_pages(acc, IOVA, 4 * PAGE_SIZE, false).unwrap();
        assert_eq!(got, (2..6).map(|p| PHYS + p * PAGE_SIZE).collect::<Vec<_>>());
        assert_eq!(w.pins(), expect(&[0..PAGES]), "still once each");
        assert_eq!(w.ictx.pinned_pages(), PAGES);

        assert_eq!(w.ictx.ioas_unmap(a, IOVA, PAGES * PAGE_SIZE), Ok(PAGES * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[2..12]), "the copy's and the access's pages stay pinned, the rest go");
        assert_eq!(w.ictx.pinned_pages(), 10);
        assert_eq!(w.translate(a, IOVA), None);
        for k in 0..8 {
            assert_eq!(w.translate(b, copy + k * PAGE_SIZE), Some(PHYS + (4 + k) * PAGE_SIZE));
        }

        // The copy goes: the access still holds 4..6.
        assert_eq!(w.ictx.ioas_unmap(b, copy, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[2..6]));
        w.ictx.access_unpin_pages(acc, IOVA, 4 * PAGE_SIZE).unwrap();
        assert_eq!(w.pins(), expect(&[]));
        assert_eq!(w.ictx.pinned_pages(), 0);
        // The region can go now, as nothing is pinned.
        w.mem.remove_region(USER, PAGES * PAGE_SIZE).unwrap();
    }
}

#[test]
fn pages_pinned_twice_by_two_mappings_lose_one_pin_per_unmap() {
    for exclusive in [false, true] {
        let w = World::new(exclusive);
        let a = w.ioas(1);
        w.ictx.ioas_map(a, Some(IOVA), USER, 8 * PAGE_SIZE, true, true).unwrap();
        // Another IOAS maps pages 0..2 of the same memory on its own (its own
        // pins: counted twice in the source).
        let b = w.ioas(2);
        w.ictx.ioas_map(b, Some(IOVA), USER, 2 * PAGE_SIZE, true, true).unwrap();
        assert_eq!(w.pins()[..3], [2, 2, 1]);
        assert_eq!(w.ictx.ioas_unmap(a, IOVA, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[0..2]));
        assert_eq!(w.ictx.ioas_unmap(b, 0, u64::MAX), Ok(2 * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[]));
    }
}

#[test]
fn a_failed_invalidation_keeps_the_pins_of_a_stable_source() {
    for exclusive in [false, true] {
        let w = World::new(exclusive);
        let (a, b) = (w.ioas(1), w.ioas(2));
        w.ictx.ioas_map(a, Some(IOVA), USER, 8 * PAGE_SIZE, true, true).unwrap();
        w.ictx.ioas_map(a, Some(IOVA + 0x10_0000), USER + 8 * PAGE_SIZE, 8 * PAGE_SIZE, true, true).unwrap();
        // The first area copied into `b`: its pages have a second holder.
        w.ictx.ioas_copy(b, a, IOVA, Some(IOVA), 8 * PAGE_SIZE, true, true).unwrap();
        w.gate.fail_sync.store(true, SeqCst);
        let err = w.ictx.ioas_unmap(a, IOVA, 8 * PAGE_SIZE);
        assert!(err.is_err(), "the failed sync reaches the caller: {err:?}");
        w.gate.fail_sync.store(false, SeqCst);
        // A device may still reach the pages: every pin stays.
        assert_eq!(w.pins(), expect(&[0..PAGES]));
        assert_eq!(w.ictx.pinned_pages(), PAGES);
        // A new domain on `b` loads the copy from the pages' other holder.
        let dev = w.ictx.bind_device(w.device(3)).unwrap();
        let h = w.ictx.hwpt_alloc(dev, b).unwrap();
        assert_eq!(w.ictx.hwpt(h).unwrap().domain.read().iova_to_phys(IOVA + PAGE_SIZE), Some(PHYS + PAGE_SIZE));
        // Unmapping the copy leaves the pages pinned: the failed unmap's use
        // stays for good.
        w.ictx.destroy(h).unwrap();
        assert_eq!(w.ictx.ioas_unmap(b, IOVA, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[0..PAGES]));
        // The second area unmaps normally and drops its pins.
        assert_eq!(w.ictx.ioas_unmap(a, IOVA + 0x10_0000, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE));
        assert_eq!(w.pins(), expect(&[0..8]));
        assert_eq!(w.mem.remove_region(USER, PAGES * PAGE_SIZE), Err(Errno::EBUSY));
    }
}
