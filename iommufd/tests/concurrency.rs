//! Concurrency: several threads map, unmap and copy on one IOAS and on
//! different IOAS at once, each checking its own mappings through the
//! attached domains while the others run, and one more adds and removes
//! a second domain of the shared IOAS all the while (loading it reads
//! every area back from the first domain), so the first domain's lock is
//! taken both under `Pages` locks (copies reading addresses back) and
//! under the shared IOAS's lock alone, by different threads at once (the
//! lock order of DESIGN.md, exercised); afterwards every pin is gone. (Lock design: see DESIGN.md and the top
//! of ctx/mod.rs.)

mod common;

use common::{EngineDevice, Gate, engine};
use iommufd::ctx::Ictx;
use iommufd::errno::Errno;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::{MockAccess, MockDevice};
use iommufd::selftest::mock::MOCK_APERTURE_START;
use std::sync::Arc;

const THREADS: u64 = 4;
const ROUNDS: u64 = 200;
const CHUNK: u64 = 16 * PAGE_SIZE;
const USER: u64 = 0x2000_0000;

#[test]
fn parallel_map_unmap_copy_keep_every_invariant() {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, THREADS * CHUNK, true);
    let ictx = Arc::new(Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX));
    let shared = ictx.ioas_alloc().unwrap();
    let other = ictx.ioas_alloc().unwrap();
    for ioas in [shared, other] {
        let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
        ictx.attach(dev, ioas).unwrap();
    }
    let hwpt_of = |ioas: u32| {
        // The automatic HWPT of each IOAS is the only HWPT on it.
        (1..64).find_map(|id| ictx.hwpt(id).ok().filter(|h| h.ioas_id == ioas)).unwrap()
    };
    let (shared_hwpt, other_hwpt) = (hwpt_of(shared), hwpt_of(other));
    let churn_dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let done = std::sync::atomic::AtomicU64::new(0);

    std::thread::scope(|s| {
        // A second domain of the shared IOAS, made (loaded from the first)
        // and destroyed (its holders moved back) until the others finish.
        s.spawn(|| {
            let mut rounds = 0u64;
            while done.load(std::sync::atomic::Ordering::SeqCst) < THREADS || rounds < 10 {
                let h = ictx.hwpt_alloc(churn_dev, shared).unwrap();
                ictx.destroy(h).unwrap();
                rounds += 1;
            }
        });
        for t in 0..THREADS {
            let ictx = ictx.clone();
            let mem = mem.clone();
            let (shared_hwpt, other_hwpt) = (shared_hwpt.clone(), other_hwpt.clone());
            let done = &done;
            s.spawn(move || {
                let uptr = USER + t * CHUNK;
                // Disjoint IOVA windows per thread in both IOAS.
                let iova = MOCK_APERTURE_START + t * 0x100_0000;
                let copy_iova = iova + 0x80_0000;
                for round in 0..ROUNDS {
                    let len = ((round % 16) + 1) * PAGE_SIZE;
                    ictx.ioas_map(shared, Some(iova), uptr, len, true, true).unwrap();
                    let want = mem.phys_of(uptr).unwrap();
                    assert_eq!(shared_hwpt.domain.lock().iova_to_phys(iova), Some(want));
                    // Copy half the threads' mappings into the other IOAS.
                    if t % 2 == 0 {
                        ictx.ioas_copy(other, shared, iova, Some(copy_iova), len, true, false).unwrap();
                        assert_eq!(other_hwpt.domain.lock().iova_to_phys(copy_iova + len - 1), Some(want + len - 1));
                        assert_eq!(ictx.ioas_unmap(other, copy_iova, len), Ok(len));
                    }
                    assert_eq!(ictx.ioas_unmap(shared, iova, len), Ok(len));
                    assert_eq!(shared_hwpt.domain.lock().iova_to_phys(iova), None);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    assert_eq!(mem.pinned_pages(), 0);
    assert_eq!(ictx.pinned_pages(), 0);
    for ioas in [shared, other] {
        assert_eq!(ictx.ioas_unmap(ioas, 0, u64::MAX), Ok(0));
    }
}

/// `Ictx::change_process` holds every IOAS lock at once (in id order,
/// under the IOAS creation lock) while other threads map and unmap memfds,
/// make and destroy IOAS with user mappings, and add and remove domains:
/// no deadlock, every answer is success or `EINVAL` (a user mapping
/// existed at that moment), and afterwards every pin is gone.
#[test]
fn change_process_while_others_map_and_create_ioas() {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, CHUNK, true);
    let mfd = mem.create_memfd(THREADS * CHUNK);
    let ictx = Arc::new(Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX));
    let mut ioas = Vec::new();
    for _ in 0..THREADS {
        let id = ictx.ioas_alloc().unwrap();
        let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
        ictx.attach(dev, id).unwrap();
        ioas.push(id);
    }
    let churn_dev = ictx.bind_device(Arc::new(MockDevice::new(0))).unwrap();
    let done = std::sync::atomic::AtomicU64::new(0);
    let (moved, refused) = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    let running = || done.load(std::sync::atomic::Ordering::SeqCst) < THREADS;

    std::thread::scope(|s| {
        // (At least once, however the threads are scheduled.)
        s.spawn(|| {
            loop {
                match ictx.change_process(mem.clone() as Arc<dyn MemorySource>, u64::MAX) {
                    Ok(()) => moved.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                    Err(e) => {
                        assert_eq!(e, iommufd::errno::Errno::EINVAL);
                        refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    }
                };
                if !running() {
                    break;
                }
            }
        });
        // IOAS appear with a user mapping and go again.
        s.spawn(|| {
            while running() {
                let id = ictx.ioas_alloc().unwrap();
                ictx.ioas_map(id, None, USER, PAGE_SIZE, true, true).unwrap();
                ictx.destroy(id).unwrap();
            }
        });
        // A second domain of IOAS 0 comes and goes (filled from file areas).
        s.spawn(|| {
            while running() {
                let h = ictx.hwpt_alloc(churn_dev, ioas[0]).unwrap();
                ictx.destroy(h).unwrap();
            }
        });
        for t in 0..THREADS {
            let (ictx, mem, done, id) = (ictx.clone(), mem.clone(), &done, ioas[t as usize]);
            s.spawn(move || {
                let hwpt = (1..64).find_map(|h| ictx.hwpt(h).ok().filter(|x| x.ioas_id == id)).unwrap();
                for round in 0..ROUNDS {
                    let len = ((round % 16) + 1) * PAGE_SIZE;
                    let start = t * CHUNK;
                    let iova = ictx.ioas_map_file(id, None, mfd, start, len, true, true).unwrap();
                    assert_eq!(hwpt.domain.lock().iova_to_phys(iova + len - 1), mem.file_phys(mfd, start + len - 1));
                    assert_eq!(ictx.ioas_unmap(id, iova, len), Ok(len));
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let (moved, refused) = (moved.into_inner(), refused.into_inner());
    assert!(moved + refused > 0, "change_process ran");
    println!("change_process: {moved} moved, {refused} refused");
    assert_eq!((mem.pinned_pages(), ictx.pinned_pages()), (0, 0));
}

/// As `parallel_map_unmap_copy_keep_every_invariant`, with domains that
/// map concurrently: maps, copies and unmaps fill and unload their areas
/// outside the IOAS lock, in parallel, while another thread adds and
/// removes a second domain of the shared IOAS (which must wait for the
/// fills in progress and be filled with every area). Each thread checks
/// its translations in every domain; afterwards every pin is gone.
#[test]
fn concurrent_domains_fill_outside_the_ioas_lock() {
    const IOVA: u64 = 1 << 32;
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, THREADS * CHUNK, true);
    let ictx = Arc::new(Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX));
    let shared = ictx.ioas_alloc().unwrap();
    let other = ictx.ioas_alloc().unwrap();
    for (k, ioas) in [shared, other].into_iter().enumerate() {
        let dev = ictx.bind_device(engine(10 + k as u64)).unwrap();
        ictx.attach(dev, ioas).unwrap();
    }
    let hwpt_of = |ioas: u32| (1..64).find_map(|id| ictx.hwpt(id).ok().filter(|h| h.ioas_id == ioas)).unwrap();
    let (shared_hwpt, other_hwpt) = (hwpt_of(shared), hwpt_of(other));
    let churn_dev = ictx.bind_device(engine(20)).unwrap();
    let done = std::sync::atomic::AtomicU64::new(0);
    assert!(ictx.ioas(shared).unwrap().iopt.lock().concurrent(), "the engine domains map concurrently");
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rounds = 0u64;
            while done.load(std::sync::atomic::Ordering::SeqCst) < THREADS || rounds < 10 {
                let h = ictx.hwpt_alloc(churn_dev, shared).unwrap();
                // Loaded with every area filled at that moment, none busy.
                let hw = ictx.hwpt(h).unwrap();
                let areas: Vec<(u64, u64)> = {
                    let ioas = ictx.ioas(shared).unwrap();
                    let iopt = ioas.iopt.lock();
                    iopt.areas().filter(|(_, _, a)| a.filled).map(|(s, l, _)| (s, l)).collect()
                };
                for (s, l) in areas {
                    // The area may be unmapped since: then it is gone from
                    // both domains; else both translate it the same way.
                    let first = shared_hwpt.domain.read().iova_to_phys(s);
                    let second = hw.domain.read().iova_to_phys(s);
                    assert!(first.is_none() || second.is_none() || first == second, "{s:#x}..{l:#x}");
                }
                ictx.destroy(h).unwrap();
                rounds += 1;
            }
        });
        for t in 0..THREADS {
            let ictx = ictx.clone();
            let mem = mem.clone();
            let (shared_hwpt, other_hwpt) = (shared_hwpt.clone(), other_hwpt.clone());
            let done = &done;
            s.spawn(move || {
                let uptr = USER + t * CHUNK;
                let iova = IOVA + t * 0x100_0000;
                let copy_iova = iova + 0x80_0000;
                for round in 0..ROUNDS {
                    let len = ((round % 16) + 1) * PAGE_SIZE;
                    ictx.ioas_map(shared, Some(iova), uptr, len, true, true).unwrap();
                    for p in 0..len / PAGE_SIZE {
                        let want = mem.phys_of(uptr + p * PAGE_SIZE).unwrap();
                        assert_eq!(shared_hwpt.domain.read().iova_to_phys(iova + p * PAGE_SIZE), Some(want));
                    }
                    if t % 2 == 0 {
                        ictx.ioas_copy(other, shared, iova, Some(copy_iova), len, true, false).unwrap();
                        let want = mem.phys_of(uptr + len - PAGE_SIZE).unwrap();
                        assert_eq!(other_hwpt.domain.read().iova_to_phys(copy_iova + len - PAGE_SIZE), Some(want));
                        assert_eq!(ictx.ioas_unmap(other, copy_iova, len), Ok(len));
                    }
                    assert_eq!(ictx.ioas_unmap(shared, iova, len), Ok(len));
                    assert_eq!(shared_hwpt.domain.read().iova_to_phys(iova), None);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    assert_eq!(mem.pinned_pages(), 0);
    assert_eq!(ictx.pinned_pages(), 0);
    for ioas in [shared, other] {
        assert_eq!(ictx.ioas_unmap(ioas, 0, u64::MAX), Ok(0));
    }
}

/// An area being filled outside the lock is reserved (a map of the same
/// IOVA is `EEXIST`) and busy: an unmap or a copy that meets it is
/// `EBUSY`, and so is an access. A map of another range and the unmap of
/// another area go ahead meanwhile. A concurrent fill that fails removes
/// its area and drops every pin, also in the domain it had loaded.
#[test]
fn meeting_an_area_being_filled_is_ebusy() {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, 4 * CHUNK, true);
    let ictx = Arc::new(Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX));
    let ioas = ictx.ioas_alloc().unwrap();
    let gate = Arc::new(Gate::default());
    gate.set(true);
    let plain = ictx.bind_device(engine(30)).unwrap();
    ictx.attach(plain, ioas).unwrap();
    // A second domain (attaching would reuse the first one's HWPT).
    let gated =
        ictx.bind_device(Arc::new(EngineDevice { id: 31, gate: Some(gate.clone()), exclusive: false })).unwrap();
    ictx.hwpt_alloc(gated, ioas).unwrap();
    assert!(ictx.ioas(ioas).unwrap().iopt.lock().concurrent());
    let iova = 1u64 << 32;
    let other = ictx.ioas_alloc().unwrap();
    // Another area, filled before.
    ictx.ioas_map(ioas, Some(iova + 0x100_0000), USER + CHUNK, CHUNK, true, true).unwrap();
    gate.set(false);
    std::thread::scope(|s| {
        let filler = s.spawn(|| ictx.ioas_map(ioas, Some(iova), USER, CHUNK, true, true));
        while gate.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(!filler.is_finished(), "the fill did not wait at the gate: {:?}", filler.join());
            std::thread::yield_now();
        }
        // The area is in the table, being filled.
        assert_eq!(ictx.ioas_map(ioas, Some(iova), USER, CHUNK, true, true), Err(Errno::EEXIST));
        assert_eq!(ictx.ioas_unmap(ioas, iova, CHUNK), Err(Errno::EBUSY));
        assert_eq!(ictx.ioas_unmap(ioas, 0, u64::MAX), Err(Errno::EBUSY));
        assert_eq!(ictx.ioas_copy(other, ioas, iova, None, CHUNK, true, true), Err(Errno::EBUSY));
        let acc = ictx.access_create(Arc::new(MockAccess::new(true))).unwrap();
        ictx.access_attach(acc, ioas).unwrap();
        assert_eq!(ictx.access_pin_pages(acc, iova, PAGE_SIZE, false), Err(Errno::EBUSY));
        ictx.access_destroy(acc).unwrap();
        // The other area unmaps meanwhile (its domain work waits for none).
        assert_eq!(ictx.ioas_unmap(ioas, iova + 0x100_0000, CHUNK), Ok(CHUNK));
        gate.set(true);
        assert_eq!(filler.join().unwrap(), Ok(iova));
    });
    assert_eq!(mem.pinned_pages(), CHUNK / PAGE_SIZE);
    assert_eq!(ictx.ioas_unmap(ioas, iova, CHUNK), Ok(CHUNK));
    assert_eq!(mem.pinned_pages(), 0);
    // A fill whose second domain fails: the first is unloaded again, the
    // area removed, the pins dropped.
    gate.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ictx.ioas_map(ioas, Some(iova), USER, CHUNK, true, true), Err(Errno::ENOMEM));
    assert_eq!((mem.pinned_pages(), ictx.pinned_pages()), (0, 0));
    for hw in (1..64).filter_map(|id| ictx.hwpt(id).ok().filter(|h| h.ioas_id == ioas)) {
        assert_eq!(hw.domain.read().iova_to_phys(iova), None);
    }
    assert_eq!(ictx.ioas_map(ioas, Some(iova), USER, CHUNK, true, true), Ok(iova), "the IOVA is free again");
    assert_eq!(ictx.ioas_unmap(ioas, 0, u64::MAX), Ok(CHUNK));
    assert_eq!((mem.pinned_pages(), ictx.pinned_pages()), (0, 0));
}

/// The fault-injection sweep of `fault_sweep.rs`, over the concurrent
/// path: a map (filling two domains outside the lock), a copy and an
/// unmap run with their 1st, 2nd, ... fault point failing (page store
/// allocation, pin, each domain map) until they succeed; after each
/// failure, the pins of every page, the accounting, the objects and the
/// translation of every page in every domain are as before the call.
#[test]
fn concurrent_fills_survive_every_fault_point() {
    const IOVA: u64 = 1 << 32;
    const PAGES: u64 = 32;
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, PAGES * PAGE_SIZE, true);
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let (a, b) = (ictx.ioas_alloc().unwrap(), ictx.ioas_alloc().unwrap());
    let d1 = ictx.bind_device(engine(40)).unwrap();
    ictx.attach(d1, a).unwrap();
    let d2 = ictx.bind_device(engine(41)).unwrap();
    ictx.hwpt_alloc(d2, a).unwrap();
    let d3 = ictx.bind_device(engine(42)).unwrap();
    ictx.attach(d3, b).unwrap();
    for ioas in [a, b] {
        assert!(ictx.ioas(ioas).unwrap().iopt.lock().concurrent());
    }
    // Something mapped already, next to where the sweep maps.
    ictx.ioas_map(a, Some(IOVA), USER, 8 * PAGE_SIZE, true, true).unwrap();
    let snapshot = || {
        let domains: Vec<Vec<Option<u64>>> = ictx
            .object_ids()
            .iter()
            .filter_map(|&id| ictx.hwpt(id).ok())
            .map(|h| {
                let d = h.domain.read();
                (0..2 * PAGES).map(|k| d.iova_to_phys(IOVA + k * PAGE_SIZE)).collect()
            })
            .collect();
        let pins: Vec<u32> = (0..PAGES).map(|p| mem.pins(USER + p * PAGE_SIZE)).collect();
        (ictx.object_ids(), pins, ictx.pinned_pages(), domains)
    };
    type Op<'a> = (&'a str, Box<dyn Fn() -> Result<u64, Errno> + 'a>, Box<dyn Fn() + 'a>);
    let ops: Vec<Op> = vec![
        (
            "map",
            Box::new(|| {
                ictx.ioas_map(a, Some(IOVA + 16 * PAGE_SIZE), USER + 4 * PAGE_SIZE, 16 * PAGE_SIZE, true, true)
            }),
            Box::new(|| assert_eq!(ictx.ioas_unmap(a, IOVA + 16 * PAGE_SIZE, 16 * PAGE_SIZE), Ok(16 * PAGE_SIZE))),
        ),
        (
            "copy",
            Box::new(|| ictx.ioas_copy(b, a, IOVA, Some(IOVA + 8 * PAGE_SIZE), 8 * PAGE_SIZE, true, false)),
            Box::new(|| assert_eq!(ictx.ioas_unmap(b, IOVA + 8 * PAGE_SIZE, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE))),
        ),
        (
            "unmap",
            Box::new(|| ictx.ioas_unmap(a, IOVA, 8 * PAGE_SIZE)),
            Box::new(|| assert_eq!(ictx.ioas_map(a, Some(IOVA), USER, 8 * PAGE_SIZE, true, true), Ok(IOVA))),
        ),
    ];
    for (name, op, undo) in &ops {
        let before = snapshot();
        let mut n = 1;
        loop {
            ictx.accounting().faults.arm(Some(n));
            let r = op();
            ictx.accounting().faults.arm(None);
            match r {
                Ok(_) => break,
                Err(e) => {
                    assert!(matches!(e, Errno::ENOMEM | Errno::EFAULT | Errno::EIO), "{name} #{n}: {e:?}");
                    assert_eq!(snapshot(), before, "{name} with fault point {n} failing");
                }
            }
            n += 1;
            assert!(n < 64, "{name} never succeeds");
        }
        println!("{name}: {} fault points", n - 1);
        undo();
        assert_eq!(snapshot(), before, "{name} undone");
    }
    assert!(ictx.ioas_unmap(a, 0, u64::MAX).is_ok());
    assert_eq!((mem.pinned_pages(), ictx.pinned_pages()), (0, 0));
}

/// A `Pages` shared by three IOAS (two copies): while one IOAS fills its
/// area (held at the gate, its holder registered busy) and the original
/// mapping is gone, the pages' only users are that fill. If the user now
/// replaces the memory at the address, a third IOAS filling its copy must
/// not take the address from the user's: it gets EBUSY, and once the fill
/// is done it maps the pages that stayed pinned.
#[test]
fn a_pin_during_another_ioas_fill_gets_ebusy_not_the_users_new_page() {
    let mem = Arc::new(FakeAddressSpace::new());
    mem.map(USER, CHUNK, true);
    let ictx = Arc::new(Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX));
    let iova = 1u64 << 32;
    let (a, b, c) = (ictx.ioas_alloc().unwrap(), ictx.ioas_alloc().unwrap(), ictx.ioas_alloc().unwrap());
    let dev_a = ictx.bind_device(engine(50)).unwrap();
    ictx.attach(dev_a, a).unwrap();
    let gate = Arc::new(Gate::default());
    let dev_b =
        ictx.bind_device(Arc::new(EngineDevice { id: 51, gate: Some(gate.clone()), exclusive: false })).unwrap();
    ictx.attach(dev_b, b).unwrap();
    ictx.ioas_map(a, Some(iova), USER, CHUNK, true, true).unwrap();
    let old = mem.phys_of(USER).unwrap();
    // C copies A's mapping (no domain: nothing pinned for it yet).
    ictx.ioas_copy(c, a, iova, Some(iova), CHUNK, true, true).unwrap();
    let dev_c = ictx.bind_device(engine(52)).unwrap();
    std::thread::scope(|s| {
        let filler = s.spawn(|| ictx.ioas_copy(b, a, iova, Some(iova), CHUNK, true, true));
        while gate.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(!filler.is_finished(), "the fill did not wait at the gate: {:?}", filler.join());
            std::thread::yield_now();
        }
        assert_eq!(ictx.ioas_unmap(a, iova, CHUNK), Ok(CHUNK));
        mem.unmap(USER, CHUNK);
        mem.map(USER, CHUNK, true);
        assert_ne!(mem.phys_of(USER), Some(old));
        let early = ictx.attach(dev_c, c);
        // Open before asserting: a failed assertion must not leave the
        // filler waiting at the gate (the scope would wait for it).
        gate.set(true);
        assert_eq!(early, Err(Errno::EBUSY));
        assert_eq!(filler.join().unwrap(), Ok(iova));
    });
    ictx.attach(dev_c, c).unwrap();
    let hw = ictx.hwpt(ictx.attached_hwpt(dev_c).unwrap().unwrap()).unwrap();
    assert_eq!(hw.domain.read().iova_to_phys(iova), Some(old), "the page that stayed pinned");
    assert_eq!(mem.pins(USER), 0, "the user's new page was never pinned");
}
