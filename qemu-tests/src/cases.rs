//! The in-guest test cases. Each is a plain function over the booted
//! [`Platform`]; `ensure!`/`ensure_eq!` fail it with a reason and `skip!`
//! marks it as not applying to this configuration.
//!
//! Configuration names (from `config=` on the command line) say what QEMU
//! was started with: `none` (no IOMMU), `intel` (`intel-iommu`), `intel-sm`
//! (`intel-iommu,x-scalable-mode=on,x-pasid-mode=on`), `intel-x2apic`
//! (`intel-iommu,intremap=on,eim=on`, the local APIC in x2APIC mode), `amd`
//! (`amd-iommu,pt=off`), `amd-x2apic` (`...,intremap=on,xtsup=on`, the
//! local APIC in x2APIC mode); every configuration has at least one `edu`
//! device.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::time::Duration;
use portcullis_kernel::ktest::{TestCase, TestResult};
use portcullis_kernel::pci::{BarKind, ConfigAccess};
use portcullis_kernel::{Platform, ensure, ensure_eq, skip};

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        /// Every test case, in run order (numbers are positions here).
        pub static ALL: &[TestCase<Platform>] = &[$(TestCase { name: stringify!($name), func: $name }),*];
    };
}

cases!(
    boot_info_handed_over,
    memory_map_sane,
    frame_allocator_roundtrip,
    heap_allocations,
    direct_map_aliases_the_image,
    mmio_window_maps_device_registers,
    clock_is_monotonic_and_waits_time_out,
    acpi_found,
    local_apic_mode_matches_configuration,
    pci_enumeration_finds_the_q35_chipset,
    edu_found_with_bar0,
    pci_bridge_hierarchy_walked,
    iommu_tables_match_configuration,
    dmar_drhd_scopes_match_pci,
    vtd_registers_match_qemu,
    ivrs_ivhd_covers_edu,
    amd_registers_match_ivhd,
    iommufd_core_runs_in_the_kernel,
    vtd_unit_mode_and_stage_match_configuration,
    vtd_unattached_device_is_blocked,
    vtd_mapped_dma_lands_exactly,
    vtd_unmapped_iova_is_blocked_and_faults,
    vtd_read_only_mapping_blocks_writes,
    vtd_fault_event_interrupt,
    vtd_unmap_then_remap,
    vtd_ownership_matches_pci_and_dmar,
    vtd_bridge_alias_isolated_and_translated,
    vtd_domains_isolate_and_share,
    vtd_large_pages_are_used_and_split,
    vtd_high_iovas_up_to_the_aperture,
    vtd_iommufd_passthrough_dma,
    vtd_rmrr_identity_mapped_and_reserved,
    vtd_iommufd_hw_info_reports_the_unit,
    vtd_interrupt_remapping_routes_and_blocks_msi,
    vtd_x2apic_destinations_route_msi,
    vtd_pasid_attach_leaves_the_rid_translation_alone,
    amd_device_table_entries_match_ownership,
    amd_mapped_dma_lands_exactly,
    amd_unmapped_iova_is_blocked,
    amd_read_only_mapping_blocks_writes,
    amd_unmap_then_remap,
    amd_unattached_device_is_blocked,
    amd_bridge_alias_isolated_and_translated,
    amd_domains_isolate_and_share,
    amd_large_pages_are_used_and_split,
    amd_high_iovas_up_to_the_aperture,
    amd_iommufd_passthrough_dma,
    amd_unity_range_identity_mapped_and_reserved,
    amd_interrupts_blocked_until_routed,
    amd_x2apic_destinations_route_msi,
    guest_dma_api_passes_a_device_through,
    guest_dma_unassign_quiesces_the_device,
    two_guests_and_the_host_share_the_machine,
    isolation_groups_follow_the_topology,
    host_ioapic_interrupts_through_remapping,
);

use crate::amd_cases::*;
use crate::dma_cases::{
    guest_dma_api_passes_a_device_through, guest_dma_unassign_quiesces_the_device,
    isolation_groups_follow_the_topology, two_guests_and_the_host_share_the_machine,
};
use crate::ioapic_cases::host_ioapic_interrupts_through_remapping;
use crate::vtd_cases::*;

const EDU: (u16, u16) = (0x1234, 0x11e8);
const AMD_IOMMU: (u16, u16) = (0x1022, 0x1419);
const QEMU_VTD_BASE: u64 = 0xfed9_0000;
const QEMU_AMDVI_BASE: u64 = 0xfed8_0000;
const QEMU_VTD_CAP: u64 = 0x00d2_008c_222f_0606;
const QEMU_VTD_ECAP: u64 = 0x0000_0000_00f0_0f4a;
/// `x-scalable-mode=on,x-pasid-mode=on`: SMTS, SSTS and PASID (PSS = 0).
const QEMU_VTD_ECAP_SM: u64 = 0x0000_4900_80f0_0f4a;
/// `x-scalable-mode=on,x-flts=on`: SMTS and FSTS, no SSTS, no PT.
const QEMU_VTD_ECAP_FS: u64 = 0x0000_8800_00f0_0f4a;

fn is_intel(p: &Platform) -> bool {
    p.config.starts_with("intel")
}

fn known_config(p: &Platform) -> TestResult {
    match p.config.as_str() {
        "none" | "intel" | "intel-sm" | "intel-fs" | "intel-rb" | "intel-cm" | "intel-x2apic" | "amd" | "amd-ir"
        | "amd-x2apic" => Ok(()),
        other => skip!("unknown configuration {:?}: expectations unknown", other),
    }
}

/// The local APIC runs in x2APIC mode on `intel-x2apic` and `amd-x2apic` (IA32_APIC_BASE
/// EN and EXTD set, the id read from the x2APIC ID MSR is the MADT's) and
/// in xAPIC mode everywhere else; either way a self-IPI through the ICR
/// arrives, twice (so the EOI after the first one reached the APIC).
fn local_apic_mode_matches_configuration(p: &Platform) -> TestResult {
    use portcullis_kernel::arch::irq::{self, ApicMode};
    const VECTOR: u8 = 0x2f;
    known_config(p)?;
    let want = if p.config.ends_with("-x2apic") { ApicMode::X2Apic } else { ApicMode::XApic };
    ensure_eq!(irq::mode(), Some(want), "local APIC mode");
    if want == ApicMode::X2Apic {
        ensure!(irq::cpu_has_x2apic(), "x2APIC mode on a CPU without CPUID x2APIC");
    }
    let base = irq::apic_base_msr();
    ensure_eq!(base & (3 << 10), if want == ApicMode::X2Apic { 3 << 10 } else { 1 << 11 }, "IA32_APIC_BASE EN/EXTD");
    let id = irq::apic_id().ok_or_else(|| fail("no APIC id".into()))?;
    ensure!(p.acpi().cpus.contains(&id), "APIC id {:#x} is not among the MADT's CPUs {:x?}", id, p.acpi().cpus);
    irq::enable();
    let r = (|| -> TestResult {
        for round in 1..=2u64 {
            let before = irq::count(VECTOR);
            irq::self_ipi(VECTOR).map_err(|e| fail(alloc::format!("{e}")))?;
            let deadline = portcullis_kernel::time::uptime_ns() + 100_000_000;
            while irq::count(VECTOR) == before && portcullis_kernel::time::uptime_ns() < deadline {
                core::hint::spin_loop();
            }
            ensure_eq!(irq::count(VECTOR), before + 1, "self-IPIs taken after sending {}", round);
        }
        Ok(())
    })();
    irq::disable();
    r
}

fn boot_info_handed_over(p: &Platform) -> TestResult {
    ensure!(p.boot.error.is_none(), "start info problem: {:?}", p.boot.error);
    ensure!(p.boot.rsdp_paddr.is_some(), "no RSDP in start info");
    ensure!(!p.boot.memory_map().is_empty(), "empty memory map");
    ensure!(p.boot.cmdline_value("config").is_some(), "command line lost: {:?}", p.boot.cmdline());
    Ok(())
}

fn memory_map_sane(p: &Platform) -> TestResult {
    use portcullis_boot::MemoryKind;
    let mut map: Vec<_> = p.boot.memory_map().to_vec();
    map.sort_by_key(|r| r.start);
    for w in map.windows(2) {
        ensure!(w[0].end() <= w[1].start, "memory map ranges overlap: {:x?} and {:x?}", w[0], w[1]);
    }
    let ram: u64 = map.iter().filter(|r| r.kind == MemoryKind::Ram).map(|r| r.size).sum();
    // QEMU runs with -m 1G: a little is taken by firmware.
    ensure!((960 << 20..=1 << 30).contains(&ram), "RAM {} MiB, expected about 1024", ram >> 20);
    let layout = portcullis_boot::layout::image_layout();
    ensure!(
        map.iter().any(|r| r.kind == MemoryKind::Ram && r.start <= layout.image.start && layout.image.end <= r.end()),
        "kernel image {:x?} not inside a RAM range",
        layout.image
    );
    let mut a = layout.image.start;
    while a < layout.image.end {
        ensure!(!portcullis_kernel::mem::frame_is_free(a), "kernel image frame {:#x} is free", a);
        a += 4096;
    }
    for (s, e) in p.boot.handover_ranges() {
        if e > s {
            ensure!(!portcullis_kernel::mem::frame_is_free(s & !0xfff), "start-info frame {:#x} is free", s);
        }
    }
    for a in (0..0x10_0000).step_by(4096) {
        ensure!(!portcullis_kernel::mem::frame_is_free(a), "low-memory frame {:#x} is free", a);
    }
    for r in map.iter().filter(|r| r.kind != MemoryKind::Ram) {
        let mut a = r.start & !0xfff;
        while a < r.end().min(4 << 30) {
            ensure!(!portcullis_kernel::mem::frame_is_free(a), "non-RAM frame {:#x} ({}) is free", a, r.kind.name());
            a += 4096;
        }
    }
    let s = portcullis_kernel::mem::stats();
    ensure!(s.free_frames <= s.managed_frames, "free {} > managed {}", s.free_frames, s.managed_frames);
    ensure!((s.managed_frames as u64) * 4096 <= ram, "manages more than RAM");
    ensure!(
        s.managed_frames as u64 * 4096 > ram - (32 << 20),
        "manages {} frames of {} MiB RAM",
        s.managed_frames,
        ram >> 20
    );
    Ok(())
}

fn frame_allocator_roundtrip(_: &Platform) -> TestResult {
    use portcullis_kernel::mem::{alloc_frames, frame::FrameError, free_frames, phys_to_virt, stats};
    let before = stats().free_frames;
    let one = alloc_frames(1, 4096).map_err(|e| fail(alloc::format!("{e}")))?;
    let big = alloc_frames(512, 2 << 20).map_err(|e| fail(alloc::format!("{e}")))?;
    ensure!(one % 4096 == 0 && big % (2 << 20) == 0, "misaligned frames {:#x} {:#x}", one, big);
    ensure!(one >= 0x10_0000 && big >= 0x10_0000, "low memory handed out");
    ensure!(!(big..big + (2 << 20)).contains(&one), "overlapping allocations");
    ensure_eq!(stats().free_frames, before - 513, "free count after allocating");
    // Frames come back zeroed and are usable through the direct map.
    // SAFETY: both runs were just allocated to this test and are mapped in
    // the direct map; nothing else refers to them.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts_mut(phys_to_virt(one), 4096),
            core::slice::from_raw_parts_mut(phys_to_virt(big), 2 << 20),
        )
    };
    ensure!(a.iter().chain(b.iter()).all(|&x| x == 0), "allocated frames not zeroed");
    a.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
    b.iter_mut().enumerate().for_each(|(i, x)| *x = (i / 4096) as u8 ^ 0x5a);
    ensure!(a.iter().enumerate().all(|(i, &x)| x == i as u8), "pattern in single frame lost");
    ensure!(b.iter().enumerate().all(|(i, &x)| x == (i / 4096) as u8 ^ 0x5a), "pattern in 2 MiB run lost");
    free_frames(one, 1).map_err(|e| fail(alloc::format!("{e}")))?;
    free_frames(big, 512).map_err(|e| fail(alloc::format!("{e}")))?;
    ensure_eq!(stats().free_frames, before, "free count after freeing");
    ensure_eq!(free_frames(one, 1), Err(FrameError::NotAllocated { addr: one }), "double free");
    ensure_eq!(stats().free_frames, before, "free count after a rejected double free");
    Ok(())
}

fn fail(s: alloc::string::String) -> portcullis_kernel::ktest::Outcome {
    portcullis_kernel::ktest::Outcome::Fail(s)
}

fn heap_allocations(_: &Platform) -> TestResult {
    let v: Vec<u64> = (0..(1 << 17)).collect();
    ensure_eq!(v.iter().sum::<u64>(), (1u64 << 17) * ((1 << 17) - 1) / 2, "sum over a 1 MiB vector");
    let boxes: Vec<Box<[u8; 100]>> = (0..1000).map(|i| Box::new([i as u8; 100])).collect();
    ensure!(boxes.iter().enumerate().all(|(i, b)| b.iter().all(|&x| x == i as u8)), "small boxes corrupted");
    drop(boxes);
    let big = alloc::vec![0xa5u8; 8 << 20];
    ensure!(big.iter().all(|&x| x == 0xa5), "8 MiB allocation corrupted");
    Ok(())
}

static MARKER: u64 = 0x506f_7274_6375_6c6c;
static WRITABLE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn direct_map_aliases_the_image(_: &Platform) -> TestResult {
    use core::sync::atomic::Ordering;
    use portcullis_kernel::mem::phys_to_virt;
    // The image runs identity-mapped, so a static's address is its physical address.
    let phys = &MARKER as *const u64 as u64;
    // SAFETY: the direct map covers all RAM, the image included; reading a
    // u64 there aliases an immutable static.
    let seen = unsafe { phys_to_virt(phys).cast::<u64>().read_volatile() };
    ensure_eq!(seen, MARKER, "direct-map read of a static");
    let phys = WRITABLE.as_ptr() as u64;
    // SAFETY: writes through the direct-map alias of an atomic static; the
    // same physical memory, write-back in both mappings.
    unsafe { phys_to_virt(phys).cast::<u64>().write_volatile(0x1234_5678) };
    ensure_eq!(WRITABLE.load(Ordering::SeqCst), 0x1234_5678, "write through the direct map seen at the image address");
    Ok(())
}

fn mmio_window_maps_device_registers(_: &Platform) -> TestResult {
    use portcullis_kernel::mem::map_mmio;
    // The HPET (q35 always has one, at 0xfed00000).
    let a = map_mmio(0xfed0_0000, 0x400).map_err(|e| fail(alloc::format!("{e}")))?;
    let b = map_mmio(0xfed0_0000, 0x400).map_err(|e| fail(alloc::format!("{e}")))?;
    ensure_eq!(a as u64, b as u64, "mapping the same registers twice");
    // SAFETY: the HPET general capabilities register, mapped uncached; reads have no effect.
    let gcap = unsafe { a.cast::<u64>().read_volatile() };
    let vendor = (gcap >> 16) as u16;
    let period_fs = gcap >> 32;
    ensure!(vendor != 0 && vendor != 0xffff, "HPET vendor {:#x}", vendor);
    ensure!(period_fs > 0 && period_fs <= 100_000_000, "HPET period {} fs", period_fs);
    ensure!(map_mmio(u64::MAX - 10, 100).is_err(), "a wrapping range was mapped");
    Ok(())
}

fn clock_is_monotonic_and_waits_time_out(_: &Platform) -> TestResult {
    use portcullis_kernel::time::{poll_until, tsc_hz, uptime_ns};
    let hz = tsc_hz();
    ensure!((100_000_000..=10_000_000_000).contains(&hz), "TSC {} Hz", hz);
    let mut last = uptime_ns();
    for _ in 0..1000 {
        let now = uptime_ns();
        ensure!(now >= last, "clock went back from {} to {}", last, now);
        last = now;
    }
    let t0 = uptime_ns();
    let r = poll_until(Duration::from_millis(5), || None::<()>);
    ensure!(r.is_err(), "a never-true wait succeeded");
    ensure!(uptime_ns() - t0 >= 5_000_000, "timed out before the deadline");
    let mut n = 0;
    ensure_eq!(
        poll_until(Duration::from_secs(1), || {
            n += 1;
            (n == 3).then_some(n)
        }),
        Ok(3),
        "a wait that succeeds"
    );
    Ok(())
}

fn acpi_found(p: &Platform) -> TestResult {
    let a = p.acpi.as_ref().map_err(|e| fail(alloc::format!("ACPI: {e}")))?;
    for sig in ["FACP", "APIC", "MCFG", "HPET"] {
        ensure!(
            a.has_table(sig),
            "no {} table in {:?}",
            sig,
            a.tables.iter().map(|t| t.signature()).collect::<Vec<_>>()
        );
    }
    ensure!(!a.cpus.is_empty(), "MADT lists no CPU");
    ensure_eq!(a.ioapics.len(), 1, "IOAPICs in the MADT");
    ensure_eq!(a.ioapics[0].address, 0xfec0_0000, "IOAPIC address");
    ensure_eq!(a.ioapics[0].gsi_base, 0, "IOAPIC GSI base");
    // QEMU's MADT moves the timer (ISA IRQ 0) to GSI 2, edge, active high.
    ensure_eq!(
        a.isa_irq(0),
        portcullis_kernel::acpi::IsaIrq { gsi: 2, level: false, active_low: false },
        "ISA IRQ 0 override"
    );
    ensure!(a.mcfg.iter().any(|m| m.segment == 0 && m.bus_start == 0 && m.base == 0xb000_0000), "MCFG {:x?}", a.mcfg);
    Ok(())
}

fn pci_enumeration_finds_the_q35_chipset(p: &Platform) -> TestResult {
    let host = p.pci.iter().find(|d| d.bdf.requester_id() == 0);
    ensure!(host.is_some_and(|d| (d.vendor, d.device) == (0x8086, 0x29c0)), "00:00.0 is not the q35 host bridge");
    let lpc = p.pci.iter().find(|d| d.bdf.requester_id() == 0xf8);
    ensure!(lpc.is_some_and(|d| (d.vendor, d.device) == (0x8086, 0x2918)), "00:1f.0 is not the ICH9 LPC bridge");
    let mut rids: Vec<_> = p.pci.iter().map(|d| (d.segment, d.bdf.requester_id())).collect();
    rids.sort_unstable();
    let n = rids.len();
    rids.dedup();
    ensure_eq!(rids.len(), n, "functions listed twice");
    for d in &p.pci {
        ensure!(d.vendor != 0xffff && d.vendor != 0, "bad vendor at {}", d.bdf);
        ensure!(d.warnings.is_empty(), "{}: {:?}", d.bdf, d.warnings);
        // Config space agrees with what enumeration recorded.
        ensure_eq!(p.ecam.read16(d.segment, d.bdf, 2), d.device, "device id of {} read again", d.bdf);
        if let Some(b) = d.bridge {
            ensure!(b.secondary > d.bdf.bus && b.subordinate >= b.secondary, "bridge {} buses {:?}", d.bdf, b);
        }
        if let Some(parent) = d.parent {
            let pb = p.pci.iter().find(|x| x.bdf == parent).and_then(|x| x.bridge);
            ensure!(pb.is_some_and(|b| b.secondary == d.bdf.bus), "{} not on its parent's secondary bus", d.bdf);
        }
    }
    Ok(())
}

fn edu_found_with_bar0(p: &Platform) -> TestResult {
    let edu = p.find_pci(EDU.0, EDU.1).ok_or_else(|| fail("no edu device 1234:11e8".into()))?;
    let bar0 = edu.bars.iter().find(|b| b.index == 0).ok_or_else(|| fail("edu has no BAR0".into()))?;
    ensure_eq!(bar0.kind, BarKind::Mem32, "edu BAR0 kind");
    ensure_eq!(bar0.size, 1 << 20, "edu BAR0 size");
    ensure!(bar0.base != 0 && bar0.base % (1 << 20) == 0, "edu BAR0 base {:#x}", bar0.base);
    ensure!(edu.msi.is_some(), "edu has no MSI capability");
    // Memory decoding on, then the identification register answers.
    let cmd = p.ecam.read32(edu.segment, edu.bdf, 4);
    p.ecam.write32(edu.segment, edu.bdf, 4, (cmd & 0xffff) | 0x2);
    let regs = portcullis_kernel::mem::map_mmio(bar0.base, 0x100).map_err(|e| fail(alloc::format!("{e}")))?;
    // SAFETY: edu's BAR0 registers, mapped uncached; 0x00 is read-only
    // identification, 0x04 the liveness register (reads back the inverse).
    let (id, live) = unsafe {
        regs.cast::<u32>().add(1).write_volatile(0x1234_5678);
        (regs.cast::<u32>().read_volatile(), regs.cast::<u32>().add(1).read_volatile())
    };
    ensure_eq!(id, 0x0100_00ed, "edu identification register");
    ensure_eq!(live, !0x1234_5678u32, "edu liveness register");
    Ok(())
}

fn pci_bridge_hierarchy_walked(p: &Platform) -> TestResult {
    // xtask puts a second edu behind a PCIe root port in every configuration.
    let edus: Vec<_> = p.pci.iter().filter(|d| (d.vendor, d.device) == EDU).collect();
    let Some(behind) = edus.iter().find(|d| d.bdf.bus != 0) else {
        skip!("no edu behind a bridge in this QEMU configuration ({} edu found)", edus.len())
    };
    let parent = behind.parent.ok_or_else(|| fail(alloc::format!("{} has no parent bridge", behind.bdf)))?;
    let port = p.pci.iter().find(|d| d.bdf == parent).ok_or_else(|| fail("parent not enumerated".into()))?;
    ensure_eq!(port.pcie.map(|x| x.port_type), Some(4), "parent {} PCIe port type (root port)", port.bdf);
    let buses = port.bridge.ok_or_else(|| fail("parent has no bus numbers".into()))?;
    ensure_eq!(buses.secondary, behind.bdf.bus, "root port secondary bus");
    ensure!(buses.subordinate >= buses.secondary, "subordinate {:#x} below secondary", buses.subordinate);
    ensure_eq!(behind.bars.first().map(|b| b.size), Some(1 << 20), "BAR0 size of the edu behind the bridge");
    Ok(())
}

fn iommu_tables_match_configuration(p: &Platform) -> TestResult {
    known_config(p)?;
    let a = p.acpi.as_ref().map_err(|e| fail(alloc::format!("ACPI: {e}")))?;
    let (want_dmar, want_ivrs) = match p.config.as_str() {
        "intel" | "intel-sm" | "intel-fs" | "intel-rb" | "intel-cm" | "intel-x2apic" => (true, false),
        "amd" | "amd-ir" | "amd-x2apic" => (false, true),
        _ => (false, false),
    };
    ensure_eq!(a.has_table("DMAR"), want_dmar, "DMAR listed");
    ensure_eq!(a.dmar.is_some(), want_dmar, "DMAR copied");
    ensure_eq!(a.has_table("IVRS"), want_ivrs, "IVRS listed");
    ensure_eq!(a.ivrs.is_some(), want_ivrs, "IVRS copied");
    if let Some(Err(e)) = &p.dmar {
        ensure!(false, "DMAR does not parse: {}", e);
    }
    if let Some(Err(e)) = &p.ivrs {
        ensure!(false, "IVRS does not parse: {}", e);
    }
    ensure_eq!(p.find_pci(AMD_IOMMU.0, AMD_IOMMU.1).is_some(), want_ivrs, "AMD IOMMU PCI function present");
    Ok(())
}

fn dmar_drhd_scopes_match_pci(p: &Platform) -> TestResult {
    if !is_intel(p) {
        skip!("needs an Intel IOMMU configuration");
    }
    let Some(Ok(dmar)) = &p.dmar else { skip!("no parsed DMAR (see iommu_tables_match_configuration)") };
    ensure!(dmar.has_flag(acpi_tables::dmar::FLAG_INTR_REMAP), "DMAR flags {:#x} lack INTR_REMAP", dmar.flags);
    let drhds: Vec<_> = dmar.drhds().collect();
    ensure_eq!(drhds.len(), 1, "DRHD count");
    let u = drhds[0];
    ensure_eq!(u.register_base, QEMU_VTD_BASE, "DRHD register base");
    ensure_eq!(u.segment, 0, "DRHD segment");
    let mut covered = Vec::new();
    for s in &u.scopes {
        let bdf = acpi_tables::scope::resolve(u.segment, s, &p.ecam).map_err(|e| fail(alloc::format!("{e}")))?;
        match s.scope_type {
            acpi_tables::dmar::SCOPE_PCI_ENDPOINT | acpi_tables::dmar::SCOPE_PCI_SUB_HIERARCHY => {
                let found = p.pci.iter().any(|d| d.segment == u.segment && d.bdf.requester_id() == bdf.requester_id());
                ensure!(found, "scope at offset {:#x} names {} which enumeration did not find", s.offset, bdf);
                covered.push(bdf.requester_id());
            }
            acpi_tables::dmar::SCOPE_IOAPIC => {
                let ids: Vec<u8> = p.acpi().ioapics.iter().map(|i| i.id).collect();
                ensure!(ids.contains(&s.enumeration_id), "IOAPIC scope id {} not in MADT {:?}", s.enumeration_id, ids);
            }
            _ => {}
        }
    }
    if !u.include_pci_all() {
        // QEMU lists every root-bus device; each must be covered.
        for d in p.pci.iter().filter(|d| d.bdf.bus == 0) {
            ensure!(
                covered.contains(&d.bdf.requester_id()),
                "{} {:04x}:{:04x} not in any DRHD scope",
                d.bdf,
                d.vendor,
                d.device
            );
        }
    }
    // Devices below a bridge are covered when the bridge has a sub-hierarchy scope.
    let subtrees: Vec<(u8, u8)> = u
        .scopes
        .iter()
        .filter(|s| s.scope_type == acpi_tables::dmar::SCOPE_PCI_SUB_HIERARCHY)
        .filter_map(|s| acpi_tables::scope::resolve(u.segment, s, &p.ecam).ok())
        .filter_map(|b| p.pci.iter().find(|d| d.bdf.requester_id() == b.requester_id()).and_then(|d| d.bridge))
        .map(|b| (b.secondary, b.subordinate))
        .collect();
    for d in p.pci.iter().filter(|d| (d.vendor, d.device) == EDU) {
        let under = subtrees.iter().any(|(lo, hi)| (*lo..=*hi).contains(&d.bdf.bus));
        ensure!(
            u.include_pci_all() || covered.contains(&d.bdf.requester_id()) || under,
            "edu {} not covered by the DRHD",
            d.bdf
        );
    }
    Ok(())
}

fn vtd_registers_match_qemu(p: &Platform) -> TestResult {
    if !is_intel(p) {
        skip!("needs an Intel IOMMU configuration");
    }
    let r = portcullis_kernel::iommu_probe::vtd(QEMU_VTD_BASE).map_err(|e| fail(alloc::format!("{e}")))?;
    ensure_eq!(r.ver, 0x10, "VER (1.0)");
    let ecap = match p.config.as_str() {
        "intel-sm" => QEMU_VTD_ECAP_SM,
        "intel-fs" => QEMU_VTD_ECAP_FS,
        // eim=on adds ECAP.EIM (bit 4).
        "intel-x2apic" => QEMU_VTD_ECAP | 1 << 4,
        _ => QEMU_VTD_ECAP,
    };
    ensure_eq!(r.ecap, ecap, "ECAP");
    // caching-mode=on sets CAP.CM (bit 7) and nothing else.
    // x-flts=on adds CAP.FS1GP (bit 56).
    let cap = match p.config.as_str() {
        "intel-cm" => QEMU_VTD_CAP | 1 << 7,
        "intel-fs" => QEMU_VTD_CAP | 1 << 56,
        _ => QEMU_VTD_CAP,
    };
    ensure_eq!(r.cap, cap, "CAP");
    ensure_eq!(r.gsts, 0, "GSTS (nothing enabled at boot)");
    ensure_eq!(r.fsts, 0, "FSTS (no faults at boot)");
    Ok(())
}

fn amd_unit(p: &Platform) -> Result<&acpi_tables::ivrs::Ivhd, portcullis_kernel::ktest::Outcome> {
    if !p.config.starts_with("amd") {
        skip!("needs the AMD IOMMU configuration");
    }
    let Some(Ok(ivrs)) = &p.ivrs else { skip!("no parsed IVRS (see iommu_tables_match_configuration)") };
    ivrs.ivhds().max_by_key(|h| h.kind).ok_or_else(|| fail("IVRS has no IVHD".into()))
}

fn ivrs_ivhd_covers_edu(p: &Platform) -> TestResult {
    let h = amd_unit(p)?;
    let Some(Ok(ivrs)) = &p.ivrs else { skip!("no IVRS") };
    for b in ivrs.ivhds() {
        ensure_eq!(b.base_address, QEMU_AMDVI_BASE, "IVHD type {:#x} base address", b.kind);
    }
    let iommu = p.find_pci(AMD_IOMMU.0, AMD_IOMMU.1).ok_or_else(|| fail("no 1022:1419 function".into()))?;
    ensure_eq!(h.device_id, iommu.bdf.requester_id(), "IVHD device id vs the IOMMU's PCI function");
    let cap = iommu.capability(0x0f).ok_or_else(|| fail("IOMMU function has no secure-device capability".into()))?;
    ensure_eq!(h.capability_offset, cap as u16, "IVHD capability offset");
    let lo = p.ecam.read32(iommu.segment, iommu.bdf, cap as u16 + 4);
    let hi = p.ecam.read32(iommu.segment, iommu.bdf, cap as u16 + 8);
    ensure_eq!(((hi as u64) << 32 | lo as u64) & !0x3fff, QEMU_AMDVI_BASE, "base address in the PCI capability");
    let ranges = h.device_ranges().map_err(|e| fail(alloc::format!("{e}")))?;
    let edu = p.find_pci(EDU.0, EDU.1).ok_or_else(|| fail("no edu".into()))?;
    ensure!(
        ranges.iter().any(|r| (r.first..=r.last).contains(&edu.bdf.requester_id())),
        "edu {} not covered by IVHD device entries {:x?}",
        edu.bdf,
        ranges
    );
    for d in p.pci.iter().filter(|d| d.bdf != iommu.bdf) {
        ensure!(ranges.iter().any(|r| (r.first..=r.last).contains(&d.bdf.requester_id())), "{} not covered", d.bdf);
    }
    Ok(())
}

fn amd_registers_match_ivhd(p: &Platform) -> TestResult {
    let h = amd_unit(p)?;
    let r = portcullis_kernel::iommu_probe::amd(h.base_address).map_err(|e| fail(alloc::format!("{e}")))?;
    match h.efr {
        Some(efr) => ensure_eq!(r.efr, efr, "EFR register vs the IVHD's EFR image"),
        None => ensure!(r.efr != 0 && r.efr != u64::MAX, "EFR {:#x}", r.efr),
    }
    ensure_eq!(r.control & 1, 0, "IOMMU enabled at boot");
    Ok(())
}

/// Deliberately ends the run through the fatal path, for the host's check
/// of exception and panic reports.
pub fn crash(kind: &str) -> ! {
    log::info!("deliberate crash: {}", kind);
    match kind {
        "pf" => {
            // SAFETY: not safe at all, on purpose: the null page is unmapped,
            // so this read faults and never returns.
            let v = unsafe { core::ptr::read_volatile(core::ptr::without_provenance::<u64>(0x8)) };
            panic!("read of the null page returned {v:#x}");
        }
        // SAFETY: ud2 raises #UD; the handler never returns here.
        "ud" => unsafe { core::arch::asm!("ud2", options(noreturn)) },
        "stack" => {
            #[allow(unconditional_recursion)]
            fn recurse(n: u64) -> u64 {
                let buf = [n; 64];
                core::hint::black_box(&buf);
                recurse(n + 1) + buf[3]
            }
            let r = recurse(0);
            panic!("recursion returned {r}");
        }
        _ => panic!("deliberate panic ({kind})"),
    }
}

/// The iommufd core in the kernel: guest-style memory (a region of real
/// frames), an IOAS with a mock domain, CPU writes through an access land
/// in the right frame, the domain translates to it, unmap unpins.
fn iommufd_core_runs_in_the_kernel(_: &Platform) -> TestResult {
    use alloc::sync::Arc;
    use iommufd::ctx::Ictx;
    use iommufd::memsrc::{MemorySource, RegionMemory};
    use iommufd::selftest::cmd::{MockAccess, MockDevice};
    use iommufd::selftest::mock::MOCK_APERTURE_START;
    use portcullis_kernel::mem::{DirectMap, alloc_frames, free_frames, phys_to_virt};
    const PAGES: usize = 16;
    const GPA: u64 = 0x8000_0000;
    let frames = alloc_frames(PAGES, 4096).map_err(|e| fail(alloc::format!("{e}")))?;
    let mem = Arc::new(RegionMemory::new(DirectMap));
    mem.add_region(GPA, frames, PAGES as u64 * 4096, true).map_err(|e| fail(alloc::format!("{e}")))?;
    let result = (|| -> TestResult {
        let ictx = Ictx::new(mem.clone() as Arc<dyn MemorySource>, 1024);
        let ioas = ictx.ioas_alloc().map_err(|e| fail(alloc::format!("ioas: {e}")))?;
        let dev = ictx.bind_device(Arc::new(MockDevice::new(0))).map_err(|e| fail(alloc::format!("{e}")))?;
        let hwpt = ictx.attach(dev, ioas).map_err(|e| fail(alloc::format!("attach: {e}")))?;
        let iova = ictx
            .ioas_map(ioas, Some(MOCK_APERTURE_START), GPA, PAGES as u64 * 4096, true, true)
            .map_err(|e| fail(alloc::format!("map: {e}")))?;
        ensure_eq!(mem.pinned_pages(), PAGES as u64, "pages pinned by the domain");
        let d = ictx.hwpt(hwpt).map_err(|e| fail(alloc::format!("{e}")))?.domain.clone();
        ensure_eq!(d.lock().iova_to_phys(iova + 5 * 4096 + 7), Some(frames + 5 * 4096 + 7), "domain translation");
        let access = ictx.access_create(Arc::new(MockAccess::new(false))).map_err(|e| fail(alloc::format!("{e}")))?;
        ictx.access_attach(access, ioas).map_err(|e| fail(alloc::format!("{e}")))?;
        let mut msg = *b"through the IOVA";
        ictx.access_rw(access, iova + 3 * 4096 + 100, &mut msg, true).map_err(|e| fail(alloc::format!("rw: {e}")))?;
        // SAFETY: the frames were allocated above for this test and are
        // direct-mapped; reading them races with nothing.
        let landed = unsafe { core::slice::from_raw_parts(phys_to_virt(frames + 3 * 4096 + 100), 16) };
        ensure_eq!(landed, b"through the IOVA", "bytes written through the access");
        ictx.access_destroy(access).map_err(|e| fail(alloc::format!("{e}")))?;
        ensure_eq!(ictx.ioas_unmap(ioas, iova, PAGES as u64 * 4096), Ok(PAGES as u64 * 4096), "unmap");
        ensure_eq!(mem.pinned_pages(), 0, "pins after unmap");
        Ok(())
    })();
    free_frames(frames, PAGES).map_err(|e| fail(alloc::format!("{e}")))?;
    result
}
