//! Model-based test: random sequences of map / unmap / copy / attach /
//! detach on two IOAS, checked after every step against a reference model
//! that only knows "IOVA page -> user page" per IOAS and "which IOAS have a
//! device attached".
//!
//! After each step the real system must agree with the model on: success
//! or failure of the step, every translation in every attached domain
//! (mapped IOVA -> the user page's physical address, everything else
//! unmapped), and pins: a user page is pinned exactly once if some IOAS
//! with a device maps it, else not at all; accounting equals the pins.
//!
//! The user memory is a memfd mapped at `USER` (a shared mmap): a map
//! step maps its pages by user address or, with `IOMMU_IOAS_MAP_FILE`, by
//! file offset; both pin the same pages, and the model does not tell them
//! apart except for `IOMMU_IOAS_CHANGE_PROCESS`, which succeeds exactly
//! when every area of both IOAS comes from a file map (a copy of one
//! counts as one).
//!
//! One more step arms a failed IOTLB invalidation: the next invalidation
//! of any domain fails. The model knows which step invalidates (an unmap
//! or a last detach that removes mappings from a domain, or the unwinding
//! of a copy or attach that failed half-way); that step fails, the pages
//! it was releasing stay pinned for good (the model adds them to a
//! `leaked` set), and the domain needs recovery: the next map into it
//! first invalidates the whole domain, which fails if armed again (then
//! the map fails and changes nothing) and otherwise lets the map go on.

use iommufd::ctx::DeviceOps;
use iommufd::ctx::Ictx;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::{LockedMockDevice, MockDevice};
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockFaults};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const USER: u64 = 0x1000_0000;
const USER_PAGES: u64 = 32;
const SLOTS: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Map { ioas: usize, page: u64, n: u64, slot: u64 },
    MapFile { ioas: usize, page: u64, n: u64, slot: u64 },
    ChangeProcess,
    Unmap { ioas: usize, slot: u64, n: u64 },
    UnmapAll { ioas: usize },
    Copy { src: usize, dst: usize, slot: u64, n: u64, dst_slot: u64 },
    Attach { dev: usize, ioas: usize },
    Detach { dev: usize },
    FailSync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..USER_PAGES, 1..6u64, 0..SLOTS).prop_map(|(ioas, page, n, slot)| Op::Map { ioas, page, n, slot }),
        3 => (0..2usize, 0..USER_PAGES, 1..6u64, 0..SLOTS)
            .prop_map(|(ioas, page, n, slot)| Op::MapFile { ioas, page, n, slot }),
        1 => Just(Op::ChangeProcess),
        3 => (0..2usize, 0..SLOTS, 1..10u64).prop_map(|(ioas, slot, n)| Op::Unmap { ioas, slot, n }),
        1 => (0..2usize).prop_map(|ioas| Op::UnmapAll { ioas }),
        2 => (0..2usize, 0..2usize, 0..SLOTS, 1..6u64, 0..SLOTS)
            .prop_map(|(src, dst, slot, n, dst_slot)| Op::Copy { src, dst, slot, n, dst_slot }),
        2 => (0..2usize, 0..2usize).prop_map(|(dev, ioas)| Op::Attach { dev, ioas }),
        1 => (0..2usize).prop_map(|dev| Op::Detach { dev }),
        1 => Just(Op::FailSync),
    ]
}

/// The reference: per IOAS, areas as `start slot -> (last slot, first
/// user page, map call)`. Each map call's pages are pinned separately
/// (as in Linux, two maps of one user page pin it twice); copies share
/// their source's.
#[derive(Default, Clone)]
struct Model {
    areas: [BTreeMap<u64, (u64, u64, u32)>; 2],
    attached: [Option<usize>; 2],
    next_map: u32,
    /// The next invalidation fails.
    sync_armed: bool,
    /// The IOAS's domain had an invalidation fail: it refuses maps.
    broken: [bool; 2],
    /// (user page, map call) pins a failed invalidation left for good.
    leaked: BTreeSet<(u64, u32)>,
    /// Map calls that mapped the memfd by offset.
    file_maps: BTreeSet<u32>,
}

impl Model {
    fn overlaps(&self, ioas: usize, s: u64, l: u64) -> Vec<(u64, u64)> {
        self.areas[ioas].iter().filter(|(a, (b, _, _))| **a <= l && s <= *b).map(|(a, (b, _, _))| (*a, *b)).collect()
    }
    fn page_at(&self, ioas: usize, slot: u64) -> Option<u64> {
        self.areas[ioas]
            .range(..=slot)
            .next_back()
            .filter(|(_, (l, _, _))| *l >= slot)
            .map(|(s, (_, p, _))| p + (slot - s))
    }
    fn has_device(&self, ioas: usize) -> bool {
        self.attached.contains(&Some(ioas))
    }
    /// An invalidation happens: whether it fails (and disarms).
    fn sync_fails(&mut self) -> bool {
        core::mem::take(&mut self.sync_armed)
    }
    /// The pins of an area stay for good.
    fn leak(&mut self, s: u64, (l, p, id): (u64, u64, u32)) {
        self.leaked.extend((p..=p + (l - s)).filter(|&q| q < USER_PAGES).map(|q| (q, id)));
    }
    /// Areas removed by an unmap of `ioas`: one invalidation if a domain
    /// held them; if it fails, the unmap fails, the areas are gone anyway
    /// and their pins stay for good.
    fn unmapped(&mut self, ioas: usize, removed: Vec<(u64, (u64, u64, u32))>) -> bool {
        if removed.is_empty() || !self.has_device(ioas) || !self.sync_fails() {
            return true;
        }
        for (s, a) in removed {
            self.leak(s, a);
        }
        self.broken[ioas] = true;
        false
    }
    /// A map into `ioas`'s domain: a domain needing recovery is
    /// invalidated whole first; whether that fails (the map is refused).
    fn recovery_fails(&mut self, ioas: usize) -> bool {
        if !(self.has_device(ioas) && self.broken[ioas]) {
            return false;
        }
        if self.sync_fails() {
            return true;
        }
        self.broken[ioas] = false;
        false
    }
    /// Pins per user page: one per map call whose pages some IOAS with a
    /// device maps, or that a failed invalidation left pinned.
    fn pins(&self) -> BTreeMap<u64, u32> {
        let mut held: BTreeSet<(u64, u32)> = self.leaked.clone();
        for ioas in 0..2 {
            if self.has_device(ioas) {
                for (s, (l, p, id)) in &self.areas[ioas] {
                    held.extend((*p..=p + (l - s)).filter(|&q| q < USER_PAGES).map(|q| (q, *id)));
                }
            }
        }
        let mut out = BTreeMap::new();
        for (page, _) in held {
            *out.entry(page).or_insert(0) += 1;
        }
        out
    }
}

fn iova(slot: u64) -> u64 {
    MOCK_APERTURE_START + slot * PAGE_SIZE
}

struct Sys {
    mem: Arc<FakeAddressSpace>,
    ictx: Ictx,
    faults: Arc<MockFaults>,
    ioas: [u32; 2],
    devs: [u32; 2],
    /// The memfd mapped at `USER`.
    mfd: i32,
}

/// The system with plain mock devices (`concurrent`: behind
/// `LockedDomain`, so every map and unmap takes the concurrent path).
fn sys_with(concurrent: bool) -> Sys {
    let mem = Arc::new(FakeAddressSpace::new());
    let mfd = mem.create_memfd(USER_PAGES * PAGE_SIZE);
    mem.map_file(USER, mfd, 0, USER_PAGES * PAGE_SIZE);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let faults = MockFaults::new();
    let ioas = [ictx.ioas_alloc().unwrap(), ictx.ioas_alloc().unwrap()];
    let dev = |faults: &Arc<MockFaults>| -> Arc<dyn DeviceOps> {
        let mock = MockDevice::with_faults(0, faults.clone());
        if concurrent { Arc::new(LockedMockDevice(mock)) } else { Arc::new(mock) }
    };
    let devs = [ictx.bind_device(dev(&faults)).unwrap(), ictx.bind_device(dev(&faults)).unwrap()];
    Sys { mem, ictx, faults, ioas, devs, mfd }
}

/// Applies `op` to the model; returns whether it should succeed.
fn step_model(m: &mut Model, op: &Op) -> bool {
    match *op {
        Op::Map { ioas, page, n, slot } | Op::MapFile { ioas, page, n, slot } => {
            // Pages are only touched when a domain needs them pinned.
            if (page + n > USER_PAGES && m.has_device(ioas)) || !m.overlaps(ioas, slot, slot + n - 1).is_empty() {
                return false;
            }
            if m.recovery_fails(ioas) {
                return false;
            }
            m.next_map += 1;
            m.areas[ioas].insert(slot, (slot + n - 1, page, m.next_map));
            if matches!(op, Op::MapFile { .. }) {
                m.file_maps.insert(m.next_map);
            }
            true
        }
        Op::ChangeProcess => m.areas.iter().flat_map(|a| a.values()).all(|(_, _, id)| m.file_maps.contains(id)),
        Op::Unmap { ioas, slot, n } => {
            let (s, l) = (slot, slot + n - 1);
            let hit = m.overlaps(ioas, s, l);
            if hit.is_empty() || hit.iter().any(|&(a, b)| a < s || b > l) {
                return false;
            }
            let removed: Vec<(u64, (u64, u64, u32))> =
                hit.iter().map(|(a, _)| (*a, m.areas[ioas].remove(a).unwrap())).collect();
            m.unmapped(ioas, removed)
        }
        Op::UnmapAll { ioas } => {
            let removed: Vec<(u64, (u64, u64, u32))> = core::mem::take(&mut m.areas[ioas]).into_iter().collect();
            m.unmapped(ioas, removed)
        }
        Op::Copy { src, dst, slot, n, dst_slot } => {
            let (s, l) = (slot, slot + n - 1);
            // The source range must be covered without holes.
            let mut pieces = Vec::new();
            let mut cur = s;
            while cur <= l {
                let Some((&a, &(b, p, id))) = m.areas[src].range(..=cur).next_back().filter(|(_, (b, _, _))| *b >= cur)
                else {
                    return false;
                };
                let end = b.min(l);
                pieces.push((cur - s, end - cur + 1, p + (cur - a), id));
                cur = end + 1;
            }
            if !m.overlaps(dst, dst_slot, dst_slot + n - 1).is_empty() {
                return false;
            }
            if m.has_device(dst) {
                // Pieces become areas and are loaded in order; a piece
                // whose pages do not exist fails (its pin, before the
                // domain is touched), and the pieces loaded before it are
                // unloaded again, the last one first: the first of those
                // invalidations may be the armed one. The first piece
                // loaded recovers a domain that needs it.
                let bad = pieces.iter().position(|(_, len, p, _)| p + len > USER_PAGES);
                if bad != Some(0) && m.recovery_fails(dst) {
                    return false;
                }
                if let Some(bad) = bad {
                    if bad > 0 && m.sync_fails() {
                        let (off, len, p, id) = pieces[bad - 1];
                        m.leak(dst_slot + off, (dst_slot + off + len - 1, p, id));
                        m.broken[dst] = true;
                    }
                    return false;
                }
            }
            for (off, len, p, id) in pieces {
                m.areas[dst].insert(dst_slot + off, (dst_slot + off + len - 1, p, id));
            }
            true
        }
        Op::Attach { dev, ioas } => {
            if m.attached[dev].is_some() {
                return false;
            }
            if !m.has_device(ioas) {
                // A new domain loads the areas in IOVA order; at the first
                // with missing pages it is unloaded again (one
                // invalidation, if anything was loaded) and dropped.
                let first_bad = m.areas[ioas].iter().find(|(s, (l, p, _))| p + (l - *s) >= USER_PAGES).map(|(s, _)| *s);
                if let Some(bad) = first_bad {
                    let loaded: Vec<(u64, (u64, u64, u32))> =
                        m.areas[ioas].range(..bad).map(|(s, a)| (*s, *a)).collect();
                    if !loaded.is_empty() && m.sync_fails() {
                        for (s, a) in loaded {
                            m.leak(s, a);
                        }
                    }
                    return false;
                }
                m.broken[ioas] = false;
            }
            m.attached[dev] = Some(ioas);
            true
        }
        Op::Detach { dev } => {
            let Some(ioas) = m.attached[dev].take() else { return true };
            if m.has_device(ioas) || m.areas[ioas].is_empty() || !m.sync_fails() {
                return true;
            }
            // The last device leaves and the domain's invalidation fails:
            // detached anyway, the areas' pins stay for good.
            let areas: Vec<(u64, (u64, u64, u32))> = m.areas[ioas].iter().map(|(s, a)| (*s, *a)).collect();
            for (s, a) in areas {
                m.leak(s, a);
            }
            false
        }
        Op::FailSync => {
            m.sync_armed = true;
            true
        }
    }
}

fn step_sys(s: &Sys, op: &Op) -> bool {
    let page_bytes = |n: u64| n * PAGE_SIZE;
    match *op {
        Op::Map { ioas, page, n, slot } => {
            s.ictx.ioas_map(s.ioas[ioas], Some(iova(slot)), USER + page_bytes(page), page_bytes(n), true, true).is_ok()
        }
        Op::MapFile { ioas, page, n, slot } => s
            .ictx
            .ioas_map_file(s.ioas[ioas], Some(iova(slot)), s.mfd, page_bytes(page), page_bytes(n), true, true)
            .is_ok(),
        Op::ChangeProcess => s.ictx.ioas_change_process().is_ok(),
        Op::Unmap { ioas, slot, n } => s.ictx.ioas_unmap(s.ioas[ioas], iova(slot), page_bytes(n)).is_ok(),
        Op::UnmapAll { ioas } => s.ictx.ioas_unmap(s.ioas[ioas], 0, u64::MAX).is_ok(),
        Op::Copy { src, dst, slot, n, dst_slot } => s
            .ictx
            .ioas_copy(s.ioas[dst], s.ioas[src], iova(slot), Some(iova(dst_slot)), page_bytes(n), true, true)
            .is_ok(),
        Op::Attach { dev, ioas } => s.ictx.attach(s.devs[dev], s.ioas[ioas]).is_ok(),
        Op::Detach { dev } => s.ictx.detach(s.devs[dev]).is_ok(),
        Op::FailSync => {
            s.faults.fail_sync_at(Some(1), false);
            true
        }
    }
}

fn check(s: &Sys, m: &Model) -> Result<(), TestCaseError> {
    for (dev, at) in m.attached.iter().enumerate() {
        let hwpt = s.ictx.attached_hwpt(s.devs[dev]).unwrap();
        prop_assert_eq!(hwpt.is_some(), at.is_some());
        let (Some(ioas), Some(hwpt)) = (at, hwpt) else { continue };
        let domain = s.ictx.hwpt(hwpt).unwrap().domain.clone();
        let d = domain.lock();
        for slot in 0..SLOTS + 12 {
            let want = m.page_at(*ioas, slot).map(|p| s.mem.phys_of(USER + p * PAGE_SIZE).unwrap());
            prop_assert_eq!(d.iova_to_phys(iova(slot) + 0x10), want.map(|p| p + 0x10), "slot {}", slot);
        }
    }
    let pins = m.pins();
    for p in 0..USER_PAGES {
        prop_assert_eq!(s.mem.pins(USER + p * PAGE_SIZE), pins.get(&p).copied().unwrap_or(0), "pins of page {}", p);
    }
    prop_assert_eq!(s.ictx.pinned_pages(), pins.values().map(|&c| c as u64).sum::<u64>(), "accounting");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ioas_operations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(sys_with(false), &ops)?;
    }

    #[test]
    fn ioas_operations_match_the_model_on_the_concurrent_path(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(sys_with(true), &ops)?;
    }
}

/// Runs `ops` on `s` and on the model, checking after every step and
/// after the context closes.
fn run_model(s: Sys, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let want = step_model(&mut m, op);
        let got = step_sys(&s, op);
        prop_assert_eq!(got, want, "step {} {:?}", i, op);
        check(&s, &m)?;
    }
    drop(s.ictx);
    // Closing unbinds the devices in id order, each detaching first;
    // an armed failure hits the first domain that unloads anything.
    step_model(&mut m, &Op::Detach { dev: 0 });
    step_model(&mut m, &Op::Detach { dev: 1 });
    // Everything is unpinned on close but what failed invalidations left.
    for p in 0..USER_PAGES {
        let leaked = m.leaked.iter().filter(|(q, _)| *q == p).count() as u32;
        prop_assert_eq!(s.mem.pins(USER + p * PAGE_SIZE), leaked, "pins of page {} after close", p);
    }
    Ok(())
}
