//! IOAS map/unmap throughput on the host (`cargo xtask bench`).
//!
//! Maps and unmaps 1 GiB and 16 GiB of memory into an IOAS with the
//! selftest mock domain attached (2 KiB I/O pages, every page stored), then
//! with the VT-d page-table engine, with memory laid out like Linux's
//! anonymous memory ([`Backing`]: scattered 4 KiB pages, or scattered
//! 2 MiB-aligned 2 MiB frames as with transparent huge pages) or as
//! contiguous memory (a case of its own), and prints ns per 4 KiB of IOVA,
//! median [min-max] of several repetitions. Linux's figures were measured
//! under QEMU TCG (`cargo xtask bench` sets them side by side there); the
//! host has no Linux peer.
//!
//! Timing is wall-clock on a shared machine.

use iommufd::ctx::DeviceOps;
use iommufd::ctx::Ictx;
use iommufd::memsrc::PAGE_SIZE;
use iommufd::selftest::described::DescribedMemory;
use iommufd::selftest::mock::MockDomain;
use portcullis_bench::{BackedMemory, Backing, Summary};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};
use std::sync::Arc;

/// User memory at `BASE`, described from physical `PHYS` (1 GiB-aligned,
/// never touched).
const BASE: u64 = 0x7f00_0000_0000;
const PHYS: u64 = 0x10_0000_0000;
use std::time::Instant;

/// A mock device whose domains cover 48 bits of IOVA (Linux's mock
/// aperture is 2 GiB, too small for the 16 GiB runs).
struct WideMockDevice;

impl DeviceOps for WideMockDevice {
    fn handle(&self) -> DeviceHandle {
        DeviceHandle::Opaque(1)
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(MockDomain::with_aperture(0, (1 << 48) - 1)))
    }
}

/// A device whose domains are the real page-table engine (VT-d 4-level
/// second stage on heap tables, no invalidation hardware).
struct EngineDevice;

impl DeviceOps for EngineDevice {
    fn handle(&self) -> DeviceHandle {
        DeviceHandle::Opaque(2)
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        let f = io_pgtable::VtdSecondStage::from_caps([39, 48], 48, true, true, false).expect("format");
        let d = io_pgtable::PagingDomain::new(f, io_pgtable::HeapTables::new(true), io_pgtable::NoInvalidator)
            .map_err(|_| DomainError::NoMemory)?;
        Ok(Box::new(d))
    }
}

const IOVA: u64 = 1 << 40;

/// Repetitions of each case, by size (a 16 GiB case takes seconds).
fn reps(size: u64) -> usize {
    if size > 1 << 30 { 5 } else { 9 }
}

fn run(size: u64, backing: Backing) {
    run_with(size, backing, || Arc::new(WideMockDevice), "mock domain");
}

/// Maps and unmaps `size` bytes of `backing` memory, each repetition on a
/// fresh context with a device from `device`; prints median [min-max].
fn run_with(size: u64, backing: Backing, device: impl Fn() -> Arc<dyn DeviceOps>, what: &str) {
    let pages = size / PAGE_SIZE;
    let (mut map, mut unmap) = (Vec::new(), Vec::new());
    for _ in 0..reps(size) {
        let mem = Arc::new(BackedMemory::new(BASE, PHYS, size, backing));
        let ictx = Ictx::new(mem.clone(), u64::MAX);
        let ioas = ictx.ioas_alloc().unwrap();
        let dev = ictx.bind_device(device()).unwrap();
        ictx.attach(dev, ioas).unwrap();
        let t0 = Instant::now();
        let iova = ictx.ioas_map(ioas, Some(IOVA), BASE, size, true, true).unwrap();
        let t1 = Instant::now();
        assert_eq!(mem.pinned_pages(), pages);
        let t2 = Instant::now();
        let unmapped = ictx.ioas_unmap(ioas, iova, size).unwrap();
        let t3 = Instant::now();
        assert_eq!(unmapped, size);
        assert_eq!(mem.pinned_pages(), 0);
        map.push((t1 - t0).as_nanos() as f64 / pages as f64);
        unmap.push((t3 - t2).as_nanos() as f64 / pages as f64);
    }
    let (map, unmap) = (Summary::of(&mut map).unwrap(), Summary::of(&mut unmap).unwrap());
    println!(
        "  {:>5} GiB {:>15} {:>13}  map {:>17}   unmap {:>17}   ns/4 KiB, median [min-max] of {}",
        size >> 30,
        backing.label(),
        what,
        map,
        unmap,
        map.n
    );
}

/// Two threads mapping (then unmapping) disjoint halves of `size` into one
/// IOAS, 64 MiB per call, against one thread doing all of it: the speedup.
/// The engine's domain here sits on shared heap tables, so the IOAS fills
/// and unloads areas outside its lock through the concurrent path.
fn threads(size: u64, huge: bool) {
    const PIECE: u64 = 64 << 20;
    struct SharedEngineDevice;
    impl DeviceOps for SharedEngineDevice {
        fn handle(&self) -> DeviceHandle {
            DeviceHandle::Opaque(3)
        }
        fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
            let f = io_pgtable::VtdSecondStage::from_caps([39, 48], 48, true, true, false).expect("format");
            let m = io_pgtable::SharedHeapTables::new(true);
            let d =
                io_pgtable::PagingDomain::new(f, m, io_pgtable::NoInvalidator).map_err(|_| DomainError::NoMemory)?;
            Ok(Box::new(d))
        }
    }
    let mem = Arc::new(DescribedMemory::backed(BASE, PHYS, size, huge));
    let ictx = Arc::new(Ictx::new(mem.clone(), u64::MAX));
    let ioas = ictx.ioas_alloc().unwrap();
    let dev = ictx.bind_device(Arc::new(SharedEngineDevice)).unwrap();
    ictx.attach(dev, ioas).unwrap();
    let map = |ictx: &Ictx, from: u64, to: u64| {
        for off in (from..to).step_by(PIECE as usize) {
            ictx.ioas_map(ioas, Some(IOVA + off), BASE + off, PIECE, true, true).unwrap();
        }
    };
    let unmap = |ictx: &Ictx, from: u64, to: u64| {
        for off in (from..to).step_by(PIECE as usize) {
            ictx.ioas_unmap(ioas, IOVA + off, PIECE).unwrap();
        }
    };
    // Map and unmap timed apart, each the median of several runs (the
    // machine is shared: single runs swing widely).
    const RUNS: usize = 9;
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t0 = Instant::now();
        map(&ictx, 0, size);
        let m = t0.elapsed();
        let t1 = Instant::now();
        unmap(&ictx, 0, size);
        one.push((m, t1.elapsed()));
        let barrier = std::sync::Barrier::new(2);
        let times: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|half| {
                    let (ictx, barrier) = (ictx.clone(), &barrier);
                    s.spawn(move || {
                        let (from, to) = (half * size / 2, (half + 1) * size / 2);
                        barrier.wait();
                        let t0 = Instant::now();
                        map(&ictx, from, to);
                        barrier.wait();
                        let m = t0.elapsed();
                        barrier.wait();
                        let t1 = Instant::now();
                        unmap(&ictx, from, to);
                        barrier.wait();
                        (m, t1.elapsed())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        two.push((times[0].0.max(times[1].0), times[0].1.max(times[1].1)));
        assert_eq!(ictx.pinned_pages(), 0);
    }
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (mut m1, mut u1): (Vec<_>, Vec<_>) = one.into_iter().unzip();
    let (mut m2, mut u2): (Vec<_>, Vec<_>) = two.into_iter().unzip();
    let (m1, u1, m2, u2) = (median(&mut m1), median(&mut u1), median(&mut m2), median(&mut u2));
    println!(
        "  {:>5} GiB {:>14}   VT-d engine  64 MiB calls, medians of {RUNS}: map {:.1} / {:.1} ms, unmap {:.1} / {:.1} ms (1 / 2 threads)",
        size >> 30,
        if huge { "2 MiB backing" } else { "4 KiB backing" },
        m1,
        m2,
        u1,
        u2,
    );
    println!("  scaling: 2 threads {:.2}x of 1 thread (map), {:.2}x (unmap)", m1 / m2, u1 / u2);
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    println!("iommufd IOAS map/unmap, selftest mock domain (2 KiB I/O pages), host");
    println!("  Linux 6.12's mock domain under QEMU TCG, measured on another day (not the host): about 1174 / 1298 ns");
    println!("  per 4 KiB (4 KiB pages), 889 / 1004 ns per 4 KiB (2 MiB THP); see ../shared/PERFORMANCE.md");
    for size in [1u64 << 30, 16 << 30] {
        for backing in Backing::ALL {
            run(size, backing);
        }
    }
    for size in [1u64 << 30, 16 << 30] {
        for backing in Backing::ALL {
            run_with(size, backing, || Arc::new(EngineDevice), "VT-d engine");
        }
    }
    // 4 KiB backing only: with 2 MiB backing a 64 MiB call is a few
    // microseconds and the figure would time thread start-up.
    println!("Two threads mapping disjoint ranges of one IOAS (target: >= 1.8x one thread)");
    threads(4 << 30, false);
}
