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

use iommufd::ctx::Ictx;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
use iommufd::selftest::mock::MOCK_APERTURE_START;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const USER: u64 = 0x1000_0000;
const USER_PAGES: u64 = 32;
const SLOTS: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Map { ioas: usize, page: u64, n: u64, slot: u64 },
    Unmap { ioas: usize, slot: u64, n: u64 },
    UnmapAll { ioas: usize },
    Copy { src: usize, dst: usize, slot: u64, n: u64, dst_slot: u64 },
    Attach { dev: usize, ioas: usize },
    Detach { dev: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..USER_PAGES, 1..6u64, 0..SLOTS).prop_map(|(ioas, page, n, slot)| Op::Map { ioas, page, n, slot }),
        3 => (0..2usize, 0..SLOTS, 1..10u64).prop_map(|(ioas, slot, n)| Op::Unmap { ioas, slot, n }),
        1 => (0..2usize).prop_map(|ioas| Op::UnmapAll { ioas }),
        2 => (0..2usize, 0..2usize, 0..SLOTS, 1..6u64, 0..SLOTS)
            .prop_map(|(src, dst, slot, n, dst_slot)| Op::Copy { src, dst, slot, n, dst_slot }),
        2 => (0..2usize, 0..2usize).prop_map(|(dev, ioas)| Op::Attach { dev, ioas }),
        1 => (0..2usize).prop_map(|dev| Op::Detach { dev }),
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
    /// Whether an area maps user pages that do not exist (possible while
    /// no domain forces the pages to be pinned: mapping is lazy).
    fn has_bad_pages(&self, ioas: usize) -> bool {
        self.areas[ioas].iter().any(|(s, (l, p, _))| p + (l - s) >= USER_PAGES)
    }
    /// Pins per user page: one per map call whose pages some IOAS with a
    /// device maps.
    fn pins(&self) -> BTreeMap<u64, u32> {
        let mut held: BTreeSet<(u64, u32)> = BTreeSet::new();
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
    ioas: [u32; 2],
    devs: [u32; 2],
}

fn sys() -> Sys {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, USER_PAGES * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = [ictx.ioas_alloc().unwrap(), ictx.ioas_alloc().unwrap()];
    let devs = [
        ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap(),
        ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap(),
    ];
    Sys { mem, ictx, ioas, devs }
}

/// Applies `op` to the model; returns whether it should succeed.
fn step_model(m: &mut Model, op: &Op) -> bool {
    match *op {
        Op::Map { ioas, page, n, slot } => {
            // Pages are only touched when a domain needs them pinned.
            if (page + n > USER_PAGES && m.has_device(ioas)) || !m.overlaps(ioas, slot, slot + n - 1).is_empty() {
                return false;
            }
            m.next_map += 1;
            m.areas[ioas].insert(slot, (slot + n - 1, page, m.next_map));
            true
        }
        Op::Unmap { ioas, slot, n } => {
            let (s, l) = (slot, slot + n - 1);
            let hit = m.overlaps(ioas, s, l);
            if hit.is_empty() || hit.iter().any(|&(a, b)| a < s || b > l) {
                return false;
            }
            for (a, _) in hit {
                m.areas[ioas].remove(&a);
            }
            true
        }
        Op::UnmapAll { ioas } => {
            m.areas[ioas].clear();
            true
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
            if m.has_device(dst) && pieces.iter().any(|(_, len, p, _)| p + len > USER_PAGES) {
                return false;
            }
            for (off, len, p, id) in pieces {
                m.areas[dst].insert(dst_slot + off, (dst_slot + off + len - 1, p, id));
            }
            true
        }
        Op::Attach { dev, ioas } => {
            if m.attached[dev].is_some() || (!m.has_device(ioas) && m.has_bad_pages(ioas)) {
                return false;
            }
            m.attached[dev] = Some(ioas);
            true
        }
        Op::Detach { dev } => {
            m.attached[dev] = None;
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
        Op::Unmap { ioas, slot, n } => s.ictx.ioas_unmap(s.ioas[ioas], iova(slot), page_bytes(n)).is_ok(),
        Op::UnmapAll { ioas } => s.ictx.ioas_unmap(s.ioas[ioas], 0, u64::MAX).is_ok(),
        Op::Copy { src, dst, slot, n, dst_slot } => s
            .ictx
            .ioas_copy(s.ioas[dst], s.ioas[src], iova(slot), Some(iova(dst_slot)), page_bytes(n), true, true)
            .is_ok(),
        Op::Attach { dev, ioas } => s.ictx.attach(s.devs[dev], s.ioas[ioas]).is_ok(),
        Op::Detach { dev } => s.ictx.detach(s.devs[dev]).is_ok(),
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
        let s = sys();
        let mut m = Model::default();
        for (i, op) in ops.iter().enumerate() {
            let want = step_model(&mut m, op);
            let got = step_sys(&s, op);
            prop_assert_eq!(got, want, "step {} {:?}", i, op);
            check(&s, &m)?;
        }
        drop(s.ictx);
        prop_assert_eq!(s.mem.pinned_pages(), 0, "everything unpinned on close");
    }
}
