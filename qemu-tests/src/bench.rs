//! In-guest benchmarks (`cargo xtask bench` boots the test kernel with
//! `bench=1`): the same IOAS map/unmap as the host benchmark, here under
//! QEMU TCG like the Linux peer's (`cargo xtask bench --linux`), so the
//! two sit side by side. Memory is described, never touched (so 1 GiB
//! cases fit a 2 GiB guest): its frames are laid out like Linux's
//! anonymous memory ([`Backing`]: scattered 4 KiB pages, scattered
//! 2 MiB-aligned 2 MiB frames) or as one contiguous GiB, pages are
//! "pinned" by counting, the mock domain stores addresses.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::memsrc::{MemorySource, PAGE_SIZE};
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain};
use portcullis::{Device, Domain, Driver, IommuUnit, Iommus, RequesterRef};
use portcullis_bench::{BackedMemory, Backing};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};
use portcullis_kernel::host::KernelHost;
use portcullis_kernel::println;
use portcullis_kernel::time::uptime_ns;

const BASE: u64 = 0x7f00_0000_0000;
/// Fake physical base (1 GiB-aligned): never accessed.
const PHYS: u64 = 0x100_0000_0000;

struct MockDev;

impl DeviceOps for MockDev {
    fn handle(&self) -> DeviceHandle {
        DeviceHandle::Opaque(1)
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(MockDomain::new()))
    }
}

/// The IOAS cases: (size, backing), each timed `reps` times.
const CASES: [(u64, Backing); 5] = [
    (64 << 20, Backing::Scattered4K),
    (64 << 20, Backing::Scattered2M),
    (1 << 30, Backing::Scattered4K),
    (1 << 30, Backing::Scattered2M),
    (1 << 30, Backing::Contiguous),
];

/// A fresh context over `size` bytes of `backing` memory, with an IOAS
/// that a device from `dev` is attached to.
fn attached(size: u64, backing: Backing, dev: &Arc<dyn DeviceOps>) -> (Arc<BackedMemory>, Ictx, u32) {
    let mem = Arc::new(BackedMemory::new(BASE, PHYS, size, backing));
    let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().expect("ioas");
    let dev = ictx.bind_device(dev.clone()).expect("bind");
    ictx.attach(dev, ioas).expect("attach");
    (mem, ictx, ioas)
}

/// Maps and unmaps `size` bytes of `backing` memory into an IOAS with
/// `dev` attached, `reps` times, each on a fresh context; prints one
/// machine-read `bench-rep:` line per repetition (`cargo xtask bench`
/// turns them into median [min-max] tables beside Linux's figures).
///
/// With `waits` (the unit's count of invalidation or completion waits),
/// also prints, from the first repetition, the page-table memory the map
/// took (frames the kernel's allocator handed out during it) per GiB
/// mapped, and the waits the unmap call made.
fn ioas_bench(
    size: u64,
    backing: Backing,
    dev: Arc<dyn DeviceOps>,
    iova_base: u64,
    dom: &str,
    reps: u32,
    waits: Option<&dyn Fn() -> u64>,
) {
    for rep in 0..reps {
        let (mem, ictx, ioas) = attached(size, backing, &dev);
        let free_before = portcullis_kernel::mem::stats().free_frames;
        let t0 = uptime_ns();
        let iova = ictx.ioas_map(ioas, Some(iova_base), BASE, size, true, true).expect("map");
        let t1 = uptime_ns();
        let tables = free_before.saturating_sub(portcullis_kernel::mem::stats().free_frames) as u64 * PAGE_SIZE;
        let waits_before = waits.map(|w| w());
        let u0 = uptime_ns();
        let n = ictx.ioas_unmap(ioas, iova, size).expect("unmap");
        let t2 = uptime_ns();
        assert_eq!(n, size);
        assert_eq!(mem.pinned_pages(), 0);
        if let (0, Some(w), Some(before)) = (rep, waits, waits_before) {
            println!(
                "bench: qemu {dom}, {} MiB {}: page tables {} KiB per GiB mapped; invalidation waits in the unmap call: {}",
                size >> 20,
                backing.label(),
                tables * (1 << 30) / size / 1024,
                w() - before
            );
        }
        println!(
            "bench-rep: ioas dom={dom} backing={} size_mib={} rep={rep} map_ns={} unmap_ns={}",
            backing.key(),
            size >> 20,
            t1 - t0,
            t2 - u0
        );
    }
}

/// Samples where `reps` maps and unmaps of `size` bytes of `backing` memory
/// spend their time (the kernel's sampling profiler, a sample every 20 us)
/// and prints the most-sampled addresses of each phase as
/// `bench-profile:` lines (`cargo xtask bench --profile` names them).
fn profiled((backing, size): (Backing, u64), dev: Arc<dyn DeviceOps>, iova_base: u64, dom: &str, reps: u32) {
    use alloc::collections::BTreeMap;
    use portcullis_kernel::profile;
    const PERIOD_NS: u32 = 20_000;
    const TOP: usize = 400;
    let (mut map, mut unmap) = (BTreeMap::<u64, u64>::new(), BTreeMap::<u64, u64>::new());
    let (mut lost, mut total, mut elapsed) = (0, [0u64; 2], [0u64; 2]);
    let mut take = |into: &mut BTreeMap<u64, u64>, phase: usize, p: profile::Profile| {
        for (rip, n) in p.by_rip {
            *into.entry(rip).or_default() += n;
        }
        lost += p.lost;
        total[phase] += p.samples;
    };
    for _ in 0..reps {
        let (mem, ictx, ioas) = attached(size, backing, &dev);
        profile::start(PERIOD_NS).expect("profiler");
        let t0 = uptime_ns();
        let iova = ictx.ioas_map(ioas, Some(iova_base), BASE, size, true, true);
        elapsed[0] += uptime_ns() - t0;
        take(&mut map, 0, profile::stop());
        let iova = iova.expect("map");
        profile::start(PERIOD_NS).expect("profiler");
        let t0 = uptime_ns();
        let n = ictx.ioas_unmap(ioas, iova, size);
        elapsed[1] += uptime_ns() - t0;
        take(&mut unmap, 1, profile::stop());
        assert_eq!(n, Ok(size));
        assert_eq!(mem.pinned_pages(), 0);
    }
    println!(
        "bench-profile: dom={dom} backing={} size_mib={} reps={reps} period_ns={PERIOD_NS} samples_map={} samples_unmap={} lost={lost} map_ms={} unmap_ms={}",
        backing.key(),
        size >> 20,
        total[0],
        total[1],
        elapsed[0] / 1_000_000,
        elapsed[1] / 1_000_000
    );
    for (phase, counts) in [("map", map), ("unmap", unmap)] {
        let mut v: Vec<(u64, u64)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (rip, n) in v.into_iter().take(TOP) {
            println!("bench-profile: phase={phase} rip={rip:#x} n={n}");
        }
    }
}

/// Invalidation counters of a unit: (completion waits, commands or
/// invalidations issued).
fn stats(d: &Driver<KernelHost>) -> (u64, u64) {
    match d {
        Driver::Vtd(u) => {
            let s = u.lock().stats;
            (s.waits, s.invalidations)
        }
        Driver::Amd(u) => {
            let s = u.lock().stats;
            (s.waits, s.commands)
        }
    }
}

/// With an IOMMU: the same IOAS map/unmap onto a real (emulated) domain
/// (VT-d second or first stage, AMD v1) and the invalidation waits one
/// map+unmap costs; on VT-d also the domain alone and DMA round trips per
/// second through the translation. The units come up through the
/// passthrough crate, as a hypervisor brings them up.
fn iommu(p: &portcullis_kernel::Platform, reps: u32, profile: Option<(Backing, u64)>) {
    let x2apic = portcullis_kernel::arch::irq::x2apic();
    let iommus = Iommus::bring_up_with(KernelHost::new(p), portcullis::Options { x2apic, ..Default::default() });
    let Some((index, driver)) =
        iommus.units().iter().enumerate().find_map(|(i, u)| u.state.as_ref().ok().map(|d| (i as u16, d.clone())))
    else {
        println!("bench: no IOMMU unit came up: {:?}", iommus.units());
        return;
    };
    let unit = driver.generic();
    let (name, dom, waits_name, commands_name) = match driver {
        Driver::Vtd(_) => ("VT-d", "vtd", "invalidation waits", "invalidations"),
        Driver::Amd(_) => ("AMD-Vi", "amdvi", "completion waits", "commands"),
    };
    // A root-bus edu (QEMU's AMD-Vi sees devices behind bridges under bus 0).
    let edu = p.pci.iter().find_map(|d| portcullis_kernel::edu::Edu::new(&p.ecam, d));
    let rid = edu.as_ref().map_or(0x0010, |e| e.sid);
    let device = RequesterRef { unit: index, requester_id: rid };
    if let Some(case) = profile {
        profiled(case, Arc::new(Device::new(unit.clone(), device)), 1 << 30, dom, reps);
        return;
    }
    for (size, backing) in CASES {
        let before = stats(&driver);
        let count = || stats(&driver).0;
        ioas_bench(size, backing, Arc::new(Device::new(unit.clone(), device)), 1 << 30, dom, reps, Some(&count));
        let after = stats(&driver);
        println!(
            "bench: qemu {name}, {} MiB {}: {waits_name} for those {reps} map+unmap+close: {} ({} {commands_name})",
            size >> 20,
            backing.label(),
            after.0 - before.0,
            after.1 - before.1
        );
    }
    if let Driver::Vtd(_) = driver {
        engine_alone(&unit, index);
        if let Some(edu) = edu {
            dma_round_trips(&edu, Some((&unit, index)));
        }
    }
}

/// The domain's own share of the 4 KiB-backing figure: the same 1 GiB of
/// scattered 4 KiB pages straight into a domain with `map_runs` (1024
/// pieces per call, as iommufd hands them), read back and unmapped.
fn engine_alone(unit: &Arc<dyn IommuUnit>, index: u16) {
    use portcullis_iommu::{IommuDomain, IotlbGather, PhysRun, Prot};
    let mut d = Domain::new(unit.clone(), index).expect("domain");
    const SIZE: u64 = 1 << 30;
    let pages = SIZE / PAGE_SIZE;
    let runs: Vec<PhysRun> = (0..1024).map(|k| PhysRun::new(PHYS + k * 2 * PAGE_SIZE, PAGE_SIZE)).collect();
    let t0 = uptime_ns();
    for c in 0..pages / 1024 {
        let iova = (1 << 30) + c * 1024 * PAGE_SIZE;
        d.map_runs(iova, &runs, Prot::RW).expect("map");
    }
    let t1 = uptime_ns();
    let mut out = [PhysRun::default(); 256];
    let mut iova = 1 << 30;
    while iova < (1 << 30) + SIZE {
        let (_, done) = d.iova_to_phys_runs(iova, (1 << 30) + SIZE - iova, &mut out);
        iova += done;
    }
    let t2 = uptime_ns();
    let mut g = IotlbGather::default();
    d.unmap(1 << 30, SIZE, &mut g);
    d.iotlb_sync(&mut g).expect("IOTLB sync");
    let t3 = uptime_ns();
    println!(
        "bench: qemu VT-d domain alone, 1 GiB of scattered 4 KiB pages: map_runs {} ns/4 KiB, read-back {} ns/4 KiB, unmap+sync {} ns/4 KiB",
        (t1 - t0) / pages,
        (t2 - t1) / pages,
        (t3 - t2) / pages
    );
    // The fixed costs of one call: one contiguous GiB (a single leaf),
    // map, unmap and the IOTLB sync timed apart, after one warm-up.
    let mut times: [Vec<f64>; 3] = Default::default();
    for rep in 0..10 {
        let t0 = uptime_ns();
        d.map(1 << 30, PHYS, SIZE, Prot::RW).expect("map");
        let t1 = uptime_ns();
        let mut g = IotlbGather::default();
        let unmapped = d.unmap(1 << 30, SIZE, &mut g);
        let t2 = uptime_ns();
        d.iotlb_sync(&mut g).expect("IOTLB sync");
        let t3 = uptime_ns();
        assert_eq!(unmapped, SIZE);
        if rep > 0 {
            for (v, t) in times.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                v.push(t as f64 / 1000.0);
            }
        }
    }
    let [map, unmap, sync] = times.map(|mut v| portcullis_bench::Summary::of(&mut v).expect("samples"));
    println!(
        "bench: qemu VT-d domain alone, 1 GiB contiguous (one leaf), us, median [min-max] of 9: map {map}, unmap {unmap}, IOTLB sync {sync}"
    );
}

/// 4 KiB edu DMA round trips (device reads a page, writes it back).
fn dma_round_trips(edu: &portcullis_kernel::edu::Edu, unit: Option<(&Arc<dyn IommuUnit>, u16)>) {
    use portcullis_iommu::{IommuDomain, Prot};
    let frames = portcullis_kernel::mem::alloc_frames(2, 4096).expect("frames");
    let mut dom = None;
    let (src, dst) = match unit {
        Some((u, index)) => {
            let mut d = Domain::new(u.clone(), index).expect("domain");
            d.map(0x10_0000, frames, 4096, Prot::READ).expect("map");
            d.map(0x20_0000, frames + 4096, 4096, Prot::RW).expect("map");
            d.unit_domain().attach_requester(edu.sid).expect("attach");
            dom = Some(d);
            (0x10_0000, 0x20_0000)
        }
        None => (frames, frames + 4096),
    };
    const N: u64 = 20;
    let t0 = uptime_ns();
    for _ in 0..N {
        edu.read_from(src, 4096).expect("dma");
        edu.write_to(dst, 4096).expect("dma");
    }
    let dt = uptime_ns() - t0;
    println!(
        "bench: qemu edu 4 KiB DMA round trips {}: {} per second ({} us each)",
        if unit.is_some() { "through VT-d" } else { "without an IOMMU" },
        N * 1_000_000_000 / dt.max(1),
        dt / N / 1000
    );
    if let Some(d) = dom {
        d.unit_domain().detach_requester(edu.sid).expect("detach");
    }
    let _ = portcullis_kernel::mem::free_frames(frames, 2);
}

/// Runs every in-guest benchmark, each IOAS case `reps` times, and
/// prints `bench:` lines (and `bench-rep:` lines for the IOAS cases).
/// With `profile`, only the sampling profile of that (backing, size).
pub fn run(p: &portcullis_kernel::Platform, reps: u32, profile: Option<(Backing, u64)>) {
    println!("bench: QEMU TCG ({}), TSC {} MHz", p.config, portcullis_kernel::time::tsc_hz() / 1_000_000);
    if p.dmar.is_some() || p.ivrs.is_some() {
        iommu(p, reps, profile);
    } else if let Some(case) = profile {
        profiled(case, Arc::new(MockDev), MOCK_APERTURE_START, "mock", reps);
    } else {
        for (size, backing) in CASES {
            ioas_bench(size, backing, Arc::new(MockDev), MOCK_APERTURE_START, "mock", reps, None);
        }
        if let Some(edu) = p.pci.iter().find_map(|d| portcullis_kernel::edu::Edu::new(&p.ecam, d)) {
            dma_round_trips(&edu, None);
        }
    }
}
