//! In-guest benchmarks (`cargo xtask bench` boots the test kernel with
//! `bench=1`): the same IOAS map/unmap as the host benchmark, here under
//! QEMU TCG like Linux's figures in ../shared/PERFORMANCE.md, so the two
//! sit side by side. Memory is described, never touched: pages are
//! "pinned" by counting, the mock domain stores addresses.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::memsrc::{MemorySource, PAGE_SIZE};
use iommufd::selftest::described::DescribedMemory;
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};
use portcullis_kernel::println;
use portcullis_kernel::time::uptime_ns;

const BASE: u64 = 0x7f00_0000_0000;
/// Fake physical base: never accessed.
const PHYS: u64 = 0x100_0000_0000;

struct MockDev;

impl DeviceOps for MockDev {
    fn handle(&self) -> DeviceHandle {
        DeviceHandle(1)
    }
    fn alloc_domain(&self) -> core::result::Result<Box<dyn IommuDomain>, DomainError> {
        Ok(Box::new(MockDomain::new()))
    }
}

fn ioas_map_unmap(size: u64, huge: bool) {
    ioas_bench(size, huge, Arc::new(MockDev), MOCK_APERTURE_START, "mock domain");
}

/// Best of three runs (the emulator shares a noisy machine).
const RUNS: u64 = 3;

fn ioas_bench(size: u64, huge: bool, dev: Arc<dyn DeviceOps>, iova_base: u64, what: &str) -> (u64, u64) {
    let pages = size / PAGE_SIZE;
    let (mut map, mut unmap) = (u64::MAX, u64::MAX);
    for _ in 0..RUNS {
        let mem = Arc::new(DescribedMemory::backed(BASE, PHYS, size, huge));
        let ictx = Ictx::new(mem as Arc<dyn MemorySource>, u64::MAX);
        let ioas = ictx.ioas_alloc().expect("ioas");
        let dev = ictx.bind_device(dev.clone()).expect("bind");
        ictx.attach(dev, ioas).expect("attach");
        let t0 = uptime_ns();
        let iova = ictx.ioas_map(ioas, Some(iova_base), BASE, size, true, true).expect("map");
        let t1 = uptime_ns();
        let n = ictx.ioas_unmap(ioas, iova, size).expect("unmap");
        let t2 = uptime_ns();
        assert_eq!(n, size);
        assert_eq!(ictx.pinned_pages(), 0);
        map = map.min(t1 - t0);
        unmap = unmap.min(t2 - t1);
    }
    println!(
        "bench: qemu ioas {} MiB {} backing, {}: map {} ms ({} ns/4 KiB), unmap {} ms ({} ns/4 KiB), best of {}",
        size >> 20,
        if huge { "2 MiB" } else { "4 KiB" },
        what,
        map / 1_000_000,
        map / pages,
        unmap / 1_000_000,
        unmap / pages,
        RUNS,
    );
    (map / pages, unmap / pages)
}

/// With a VT-d unit: the same IOAS map/unmap onto a real (emulated) VT-d
/// second-stage domain, the invalidation waits one unmap costs, and DMA
/// round trips per second through the translation.
fn vtd(p: &portcullis_kernel::Platform) {
    use portcullis_kernel::iommu::{VtdDevice, vtd_unit};
    let Some(Ok(dmar)) = &p.dmar else { return };
    let Some(drhd) = dmar.drhds().next() else { return };
    let unit = match vtd_unit(alloc::format!("DRHD @{:#x}", drhd.register_base), drhd.register_base) {
        Ok(u) => u,
        Err(e) => {
            println!("bench: VT-d bring-up failed: {e}");
            return;
        }
    };
    let edu = p.pci.iter().find_map(|d| portcullis_kernel::edu::Edu::new(&p.ecam, d));
    let rid = edu.as_ref().map_or(0x0008, |e| e.sid);
    for huge in [false, true] {
        let before = unit.lock().stats;
        ioas_bench(1 << 30, huge, Arc::new(VtdDevice::new(unit.clone(), 0, rid)), 1 << 30, "VT-d domain");
        let after = unit.lock().stats;
        println!(
            "bench: qemu VT-d invalidation waits for those {RUNS} map+unmap+close: {} ({} invalidations)",
            after.waits - before.waits,
            after.invalidations - before.invalidations
        );
    }
    engine_alone(&unit);
    if let Some(edu) = edu {
        dma_round_trips(&edu, Some(&unit));
    }
}

/// The VT-d domain's own share of the 4 KiB-backing figure: the same 1 GiB
/// of scattered 4 KiB pages straight into a domain with `map_runs` (1024
/// pieces per call, as iommufd hands them), read back and unmapped.
fn engine_alone(unit: &portcullis_kernel::iommu::SharedUnit) {
    use portcullis_iommu::{IommuDomain, IotlbGather, Prot};
    let mut d = portcullis_kernel::iommu::VtdDomain::new(unit).expect("domain");
    const SIZE: u64 = 1 << 30;
    let pages = SIZE / PAGE_SIZE;
    let runs: Vec<(u64, u64)> = (0..1024).map(|k| (PHYS + k * 2 * PAGE_SIZE, PAGE_SIZE)).collect();
    let t0 = uptime_ns();
    for c in 0..pages / 1024 {
        let iova = (1 << 30) + c * 1024 * PAGE_SIZE;
        d.domain.map_runs(iova, &runs, Prot::RW).expect("map");
    }
    let t1 = uptime_ns();
    let mut out = [(0u64, 0u64); 256];
    let mut iova = 1 << 30;
    while iova < (1 << 30) + SIZE {
        let (_, done) = d.domain.iova_to_phys_runs(iova, (1 << 30) + SIZE - iova, &mut out);
        iova += done;
    }
    let t2 = uptime_ns();
    let mut g = IotlbGather::default();
    d.domain.unmap(1 << 30, SIZE, &mut g);
    d.domain.iotlb_sync(&mut g).expect("IOTLB sync");
    let t3 = uptime_ns();
    println!(
        "bench: qemu VT-d domain alone, 1 GiB of scattered 4 KiB pages: map_runs {} ns/4 KiB, read-back {} ns/4 KiB, unmap+sync {} ns/4 KiB",
        (t1 - t0) / pages,
        (t2 - t1) / pages,
        (t3 - t2) / pages
    );
}

/// 4 KiB edu DMA round trips (device reads a page, writes it back).
fn dma_round_trips(edu: &portcullis_kernel::edu::Edu, unit: Option<&portcullis_kernel::iommu::SharedUnit>) {
    use portcullis_iommu::Prot;
    let frames = portcullis_kernel::mem::alloc_frames(2, 4096).expect("frames");
    let mut dom = None;
    let (src, dst) = match unit {
        Some(u) => {
            let mut d = portcullis_kernel::iommu::VtdDomain::new(u).expect("domain");
            d.domain.map(0x10_0000, frames, 4096, Prot::READ).expect("map");
            d.domain.map(0x20_0000, frames + 4096, 4096, Prot::RW).expect("map");
            d.attach(edu.sid).expect("attach");
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
        let _ = d.detach(edu.sid);
    }
    let _ = portcullis_kernel::mem::free_frames(frames, 2);
}

/// With an AMD-Vi unit: the same IOAS map/unmap onto an AMD v1 domain and
/// the invalidation waits it costs.
fn amd(p: &portcullis_kernel::Platform) {
    use portcullis_kernel::amd::{AmdDevice, amd_unit, unit_info};
    let Some(Ok(ivrs)) = &p.ivrs else { return };
    let (units, _) = portcullis_kernel::ownership::ivrs_units(ivrs);
    let Some(scope) = units.first() else { return };
    let unit = match amd_unit(alloc::format!("IVHD @{:#x}", scope.base), unit_info(p, ivrs, scope)) {
        Ok(u) => u,
        Err(e) => {
            println!("bench: AMD-Vi bring-up failed: {e}");
            return;
        }
    };
    // A root-bus device (QEMU's AMD-Vi sees devices behind bridges under bus 0).
    let id = p.pci.iter().find_map(|d| portcullis_kernel::edu::Edu::new(&p.ecam, d)).map_or(0x0010, |e| e.sid);
    for huge in [false, true] {
        let before = unit.lock().stats;
        ioas_bench(1 << 30, huge, Arc::new(AmdDevice::new(unit.clone(), 0, id)), 1 << 30, "AMD-Vi domain");
        let after = unit.lock().stats;
        println!(
            "bench: qemu AMD-Vi completion waits for those {RUNS} map+unmap+close: {} ({} commands)",
            after.waits - before.waits,
            after.commands - before.commands
        );
    }
}

/// Runs every in-guest benchmark and prints `bench:` lines.
pub fn run(p: &portcullis_kernel::Platform) {
    println!("bench: QEMU TCG ({}), TSC {} MHz", p.config, portcullis_kernel::time::tsc_hz() / 1_000_000);
    if p.dmar.is_some() {
        vtd(p);
    } else if p.ivrs.is_some() {
        amd(p);
    } else {
        for huge in [false, true] {
            ioas_map_unmap(1 << 30, huge);
        }
        if let Some(edu) = p.pci.iter().find_map(|d| portcullis_kernel::edu::Edu::new(&p.ecam, d)) {
            dma_round_trips(&edu, None);
        }
    }
}
