//! Concurrency: several threads map, unmap and copy on one IOAS and on
//! different IOAS at once, each checking its own mappings through the
//! attached domains while the others run, and one more adds and removes
//! a second domain of the shared IOAS all the while (loading it reads
//! every area back from the first domain), so the first domain's lock is
//! taken both under `Pages` locks (copies reading addresses back) and
//! under the shared IOAS's lock alone, by different threads at once (the
//! lock order of DESIGN.md, exercised); afterwards every pin is gone. (Lock design: see DESIGN.md and the top
//! of ctx/mod.rs.)

use iommufd::ctx::Ictx;
use iommufd::memsrc::{FakeAddressSpace, MemorySource, PAGE_SIZE};
use iommufd::selftest::cmd::MockDevice;
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
