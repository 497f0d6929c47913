//! `bench=1` on the kernel command line (`cargo xtask bench`): what it
//! costs to give a 512 MiB guest its DMA view beside building its nested
//! page table, in time and in page-table memory, with separate tables and
//! with the shared one. Figures only, printed as `bench:` lines; nothing is
//! asserted. Guest memory is never touched, only described.
//!
//! * NPT: the hypervisor's own builder (`npt.rs`) maps 512 MiB of host
//!   frames at GPA 0. With 4 KiB leaves (what the hypervisor runs guests
//!   on: it never merges pages) and, for comparison, 2 MiB leaves.
//! * DMA view: `GuestDma::add_memory` of the same 512 MiB at IOVA = GPA
//!   with an edu already assigned, so the IOMMU domain's table is filled
//!   during the call. The engine picks the largest leaf the unit offers
//!   and the addresses allow: with the frames 2 MiB aligned (GPA and HPA)
//!   that is 2 MiB where the unit has them; with the host frames shifted
//!   by 4 KiB no 2 MiB leaf fits and every leaf is 4 KiB, the same shape
//!   as the 4 KiB NPT. Table memory is the frames the call took from the
//!   allocator during the call (the domain's tables below its root, which
//!   `assign` allocated; the IOAS's own bookkeeping is on the heap).
//! * Shared table: `GuestDma::new_sharing_table` at the NPT's root plus
//!   `assign` (a PASID entry pointing at the NPT): that is the whole DMA
//!   view, and the IOMMU takes no table of its own (the edu's PASID
//!   directory and table already exist from the separate-table runs). Only VT-d with
//!   first-stage translation (`intel-fs`); elsewhere the crate's refusal is
//!   printed.
//!
//! Each figure is the median of [`RUNS`] runs with min and max (QEMU TCG
//! on a shared machine: expect noise).

use crate::npt::{Kind, Npt};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use portcullis::{GuestAddr, PhysAddr, Platform};
use portcullis_kernel::Platform as Machine;
use portcullis_kernel::host::{GuestDma, Iommus, KernelHost};
use portcullis_kernel::pci::PciDevice;
use portcullis_kernel::println;
use portcullis_kernel::time::uptime_ns;

/// Guest RAM in the benchmark.
const SIZE: u64 = 512 << 20;
/// Runs per figure.
const RUNS: usize = 5;
const M2: u64 = 1 << 21;

/// Frames free in the kernel's allocator now.
fn free_frames() -> u64 {
    portcullis_kernel::mem::stats().free_frames as u64
}

/// Median, min and max of `RUNS` timings, and the table bytes of each run.
struct Figure {
    ns: Vec<u64>,
    bytes: Vec<u64>,
}

impl Figure {
    fn new() -> Self {
        Self { ns: Vec::new(), bytes: Vec::new() }
    }

    fn line(&mut self, what: &str) -> String {
        self.ns.sort_unstable();
        self.bytes.sort_unstable();
        let ms = |ns: u64| format!("{}.{:03}", ns / 1_000_000, ns / 1_000 % 1000);
        let kib = |b: u64| b / 1024;
        let (lo, hi) = (self.bytes[0], self.bytes[self.bytes.len() - 1]);
        let mem = if lo == hi { format!("{} KiB", kib(lo)) } else { format!("{}-{} KiB", kib(lo), kib(hi)) };
        format!(
            "{what}: {} ms median (min {}, max {}, {} runs), page tables {mem}",
            ms(self.ns[self.ns.len() / 2]),
            ms(self.ns[0]),
            ms(self.ns[self.ns.len() - 1]),
            self.ns.len()
        )
    }
}

/// Runs the benchmark and prints its `bench:` lines.
pub fn run(p: &Machine) {
    println!(
        "bench: QEMU TCG ({}), TSC {} MHz; 512 MiB guest, {RUNS} runs per figure",
        p.config,
        portcullis_kernel::time::tsc_hz() / 1_000_000
    );
    let host = KernelHost::new(p);
    let options = portcullis::Options { x2apic: portcullis_kernel::arch::irq::x2apic(), ..Default::default() };
    let iommus = Iommus::bring_up_with(host.clone(), options);
    let Some(edu) = p.pci.iter().find(|d| d.vendor == 0x1234 && d.device == 0x11e8 && d.bdf.bus == 0) else {
        println!("bench: no edu on the root bus: nothing to assign");
        return;
    };
    if portcullis_kernel::edu::Edu::new(&p.ecam, edu).is_none() {
        println!("bench: edu {} cannot be enabled", edu.bdf);
        return;
    }
    // The guest's RAM: 512 MiB plus one frame, 2 MiB aligned, so the
    // same frames serve aligned and shifted by 4 KiB.
    let count = (SIZE / 4096 + 1) as usize;
    let Some(PhysAddr(ram)) = host.alloc_frames(count, M2) else {
        println!("bench: no {} MiB of contiguous frames (boot with -m 2G)", SIZE >> 20);
        return;
    };

    npt_figure(&host, ram, false);
    npt_figure(&host, ram, true);
    dma_figure(&host, &iommus, edu, ram, "2 MiB aligned (largest leaf the unit offers)");
    dma_figure(&host, &iommus, edu, ram + 4096, "host frames shifted by 4 KiB (4 KiB leaves only)");
    shared_figure(&host, &iommus, edu, ram);
    host.free_frames(PhysAddr(ram), count);
}

/// The NPT for the 512 MiB, 4 KiB or 2 MiB leaves.
fn npt_figure(host: &KernelHost, ram: u64, large: bool) {
    let mut f = Figure::new();
    for _ in 0..RUNS {
        let t0 = uptime_ns();
        let Ok(mut npt) = Npt::new(host) else { return println!("bench: no frame for the NPT") };
        let built = if large {
            (0..SIZE / M2).try_for_each(|i| npt.map_2m(i * M2, ram + i * M2))
        } else {
            (0..SIZE / 4096).try_for_each(|i| npt.map(i * 4096, ram + i * 4096, Kind::Ram))
        };
        let t1 = uptime_ns();
        if built.is_err() {
            return println!("bench: out of frames building the NPT");
        }
        f.ns.push(t1 - t0);
        f.bytes.push(npt.table_bytes());
    }
    let leaves = if large { "2 MiB leaves" } else { "4 KiB leaves, as the hypervisor runs its guests" };
    println!("bench: {}", f.line(&format!("NPT build, 512 MiB, {leaves}")));
}

/// A new DMA view with `dev` assigned; its interrupts allowed unremapped
/// where the unit cannot remap them (no MSI is ever routed here).
fn view(iommus: &Iommus, dev: &PciDevice, table: Option<u64>) -> Result<GuestDma, String> {
    let mut dma = match table {
        Some(root) => GuestDma::new_sharing_table(iommus, PhysAddr(root)),
        None => GuestDma::new(iommus, SIZE / 4096 + 1),
    }
    .map_err(|e| format!("{e}"))?;
    if !iommus.interrupts_isolated(dev.segment, dev.bdf) {
        dma.allow_unsafe_interrupts(true);
    }
    dma.assign(iommus, dev.segment, dev.bdf).map_err(|e| format!("{e}"))?;
    Ok(dma)
}

/// Separate tables: `add_memory` of the 512 MiB with the device assigned.
fn dma_figure(host: &KernelHost, iommus: &Iommus, dev: &PciDevice, hpa: u64, how: &str) {
    let _ = host;
    let mut f = Figure::new();
    for _ in 0..RUNS {
        let mut dma = match view(iommus, dev, None) {
            Ok(d) => d,
            Err(e) => return println!("bench: DMA view: {e}"),
        };
        let before = free_frames();
        let t0 = uptime_ns();
        let r = dma.add_memory(GuestAddr(0), PhysAddr(hpa), SIZE, true);
        let t1 = uptime_ns();
        let after = free_frames();
        if let Err(e) = r {
            return println!("bench: add_memory: {e}");
        }
        f.ns.push(t1 - t0);
        f.bytes.push(before.saturating_sub(after) * 4096);
        if let Err(e) = dma.remove_memory(GuestAddr(0), SIZE) {
            return println!("bench: remove_memory: {e}");
        }
        if let Err(e) = dma.unassign(dev.segment, dev.bdf) {
            return println!("bench: unassign: {e}");
        }
    }
    println!(
        "bench: {} (plus the domain's 4 KiB root, taken at assign)",
        f.line(&format!("DMA view (GuestDma::add_memory, edu assigned), 512 MiB, {how}"))
    );
}

/// The shared table: the DMA view is the NPT itself; time and memory of
/// `new_sharing_table` + `assign` (the NPT, 4 KiB leaves, built before).
fn shared_figure(host: &KernelHost, iommus: &Iommus, dev: &PciDevice, ram: u64) {
    let Ok(mut npt) = Npt::new(host) else { return println!("bench: no frame for the NPT") };
    if (0..SIZE / 4096).try_for_each(|i| npt.map(i * 4096, ram + i * 4096, Kind::Ram)).is_err() {
        return println!("bench: out of frames building the NPT");
    }
    let mut f = Figure::new();
    for _ in 0..RUNS {
        let before = free_frames();
        let t0 = uptime_ns();
        let r = view(iommus, dev, Some(npt.root));
        let t1 = uptime_ns();
        let after = free_frames();
        let mut dma = match r {
            Ok(d) => d,
            Err(e) => {
                return println!("bench: shared table (DMA view = the NPT): not on this configuration: {e}");
            }
        };
        f.ns.push(t1 - t0);
        f.bytes.push(before.saturating_sub(after) * 4096);
        if let Err(e) = dma.unassign(dev.segment, dev.bdf) {
            return println!("bench: unassign: {e}");
        }
    }
    println!(
        "bench: {} (beside the NPT's own {} KiB)",
        f.line("shared table: DMA view = the NPT (new_sharing_table + assign: one PASID entry), 512 MiB, 4 KiB leaves"),
        npt.table_bytes() / 1024
    );
}
