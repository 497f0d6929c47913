//! In-guest benchmarks (`cargo xtask bench` boots the test kernel with
//! `bench=1`): the same IOAS map/unmap as the host benchmark, here under
//! QEMU TCG like Linux's figures in ../shared/PERFORMANCE.md, so the two
//! sit side by side. Memory is described, never touched: pages are
//! "pinned" by counting, the mock domain stores addresses.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use iommufd::ctx::{DeviceOps, Ictx};
use iommufd::errno::{Errno, Result};
use iommufd::memsrc::{MemorySource, PAGE_SIZE};
use iommufd::selftest::mock::{MOCK_APERTURE_START, MockDomain};
use portcullis_iommu::{DeviceHandle, DomainError, IommuDomain};
use portcullis_kernel::println;
use portcullis_kernel::time::uptime_ns;

const BASE: u64 = 0x7f00_0000_0000;
/// Fake physical base: never accessed.
const PHYS: u64 = 0x100_0000_0000;

struct BenchMemory {
    len: u64,
    stride: u64,
    pins: spin::Mutex<Vec<u32>>,
}

impl MemorySource for BenchMemory {
    fn pin(&self, uptr: u64, out: &mut [u64], _write: bool) -> Result<()> {
        let first = uptr.checked_sub(BASE).ok_or(Errno::EFAULT)? / PAGE_SIZE;
        if (first + out.len() as u64) * PAGE_SIZE > self.len {
            return Err(Errno::EFAULT);
        }
        let mut pins = self.pins.lock();
        for (k, o) in out.iter_mut().enumerate() {
            let page = first as usize + k;
            pins[page] += 1;
            *o = PHYS + page as u64 * self.stride;
        }
        Ok(())
    }
    fn unpin(&self, phys: &[u64], _dirty: bool) {
        let mut pins = self.pins.lock();
        for p in phys {
            pins[((p - PHYS) / self.stride) as usize] -= 1;
        }
    }
    fn read_user(&self, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn write_user(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn read_phys(&self, _: u64, _: &mut [u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
    fn write_phys(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(Errno::EOPNOTSUPP)
    }
}

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
    let mem = Arc::new(BenchMemory {
        len: size,
        stride: if huge { PAGE_SIZE } else { 2 * PAGE_SIZE },
        pins: spin::Mutex::new(alloc::vec![0; (size / PAGE_SIZE) as usize]),
    });
    let ictx = Ictx::new(mem as Arc<dyn MemorySource>, u64::MAX);
    let ioas = ictx.ioas_alloc().expect("ioas");
    let dev = ictx.bind_device(Arc::new(MockDev)).expect("bind");
    ictx.attach(dev, ioas).expect("attach");
    let pages = size / PAGE_SIZE;
    let t0 = uptime_ns();
    let iova = ictx.ioas_map(ioas, Some(MOCK_APERTURE_START), BASE, size, true, true).expect("map");
    let t1 = uptime_ns();
    let n = ictx.ioas_unmap(ioas, iova, size).expect("unmap");
    let t2 = uptime_ns();
    assert_eq!(n, size);
    assert_eq!(ictx.pinned_pages(), 0);
    println!(
        "bench: qemu ioas {} MiB {} backing: map {} ms ({} ns/4 KiB), unmap {} ms ({} ns/4 KiB)",
        size >> 20,
        if huge { "2 MiB" } else { "4 KiB" },
        (t1 - t0) / 1_000_000,
        (t1 - t0) / pages,
        (t2 - t1) / 1_000_000,
        (t2 - t1) / pages,
    );
}

/// Runs every in-guest benchmark and prints `bench:` lines.
pub fn run() {
    println!(
        "bench: QEMU TCG, selftest mock domain (2 KiB I/O pages), TSC {} MHz",
        portcullis_kernel::time::tsc_hz() / 1_000_000
    );
    for huge in [false, true] {
        ioas_map_unmap(1 << 30, huge);
    }
}
