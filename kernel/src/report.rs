//! The human-readable platform report that `cargo xtask run` shows.

use crate::Platform;
use crate::println;

/// Prints the whole report to serial; `iommus` is what bring-up made of
/// the units.
pub fn print(p: &Platform, iommus: &crate::host::Iommus) {
    println!("================ Portcullis platform report ================");
    println!(
        "CPU      {} ({}) family {:#x} model {:#x} stepping {}",
        p.cpu.brand(),
        p.cpu.vendor(),
        p.cpu.family,
        p.cpu.model,
        p.cpu.stepping
    );
    println!(
        "         {} physical address bits, 1 GiB pages: {}, TSC {} MHz ({:?})",
        p.cpu.phys_bits,
        yes(p.cpu.page_1g),
        crate::time::tsc_hz() / 1_000_000,
        p.calibration
    );
    {
        use crate::arch::irq;
        let mode = match irq::mode() {
            Some(irq::ApicMode::X2Apic) => "x2APIC mode",
            Some(irq::ApicMode::XApic) => "xAPIC mode",
            None => "not set up",
        };
        let id = irq::apic_id().map_or("?".into(), |i| alloc::format!("{i:#x}"));
        println!("         local APIC: {mode}, id {id} (x2APIC capable: {})", yes(irq::cpu_has_x2apic()));
    }
    println!("Command  {:?}", p.boot.cmdline());
    memory(p);
    acpi(p);
    pci(p);
    firmware_iommus(p);
    drivers(p, iommus);
    println!("=============================================================");
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn memory(p: &Platform) {
    let s = crate::mem::stats();
    println!(
        "Memory   {} MiB RAM; {} frames managed, {} free; heap {} MiB at {:#x}; direct map {} x 4 KiB + {} x 2 MiB",
        s.ram_bytes >> 20,
        s.managed_frames,
        s.free_frames,
        s.heap_bytes >> 20,
        s.heap_phys,
        s.direct_map_pages.0,
        s.direct_map_pages.1
    );
    for r in p.boot.memory_map() {
        println!("         [{:#014x}-{:#014x}) {:>9} KiB {}", r.start, r.end(), r.size >> 10, r.kind.name());
    }
}

fn acpi(p: &Platform) {
    match &p.acpi {
        Err(e) => println!("ACPI     unavailable: {}", e),
        Ok(a) => {
            println!(
                "ACPI     RSDP {:#x}, revision {} ({})",
                a.rsdp,
                a.revision,
                if a.revision == 0 { "RSDT" } else { "XSDT" }
            );
            for t in &a.tables {
                println!(
                    "         {} {:>6} bytes rev {} {} {}",
                    t.signature(),
                    t.length,
                    t.revision,
                    t.oem_id,
                    t.oem_table_id
                );
            }
            println!("         {} CPU(s), local APIC {:#x}; IOAPICs: {}", a.cpus.len(), a.local_apic, a.ioapics.len());
            for io in &a.ioapics {
                println!("         IOAPIC id {} at {:#x}, GSI base {}", io.id, io.address, io.gsi_base);
            }
            for o in &a.overrides {
                println!("         ISA IRQ {} -> GSI {} (flags {:#06x})", o.irq, o.gsi, o.flags);
            }
            for m in &a.mcfg {
                println!(
                    "         ECAM segment {} buses {:02x}-{:02x} at {:#x}",
                    m.segment, m.bus_start, m.bus_end, m.base
                );
            }
        }
    }
}

fn pci(p: &Platform) {
    println!("PCI      {} functions", p.pci.len());
    for d in &p.pci {
        println!(
            "         {:04x}:{} {:04x}:{:04x} class {:02x}{:02x}{:02x} {}{}",
            d.segment,
            d.bdf,
            d.vendor,
            d.device,
            d.class.0,
            d.class.1,
            d.class.2,
            d.class_name(),
            d.pcie.map(|x| alloc::format!(" (PCIe {})", x.port_type_name())).unwrap_or_default()
        );
        if let Some(b) = d.bridge {
            println!(
                "             buses: primary {:02x} secondary {:02x} subordinate {:02x}",
                b.primary, b.secondary, b.subordinate
            );
        }
        for b in &d.bars {
            println!(
                "             BAR{} {:?} {:#x} size {:#x}{}",
                b.index,
                b.kind,
                b.base,
                b.size,
                if b.prefetchable { " prefetchable" } else { "" }
            );
        }
        if let Some(m) = d.msi {
            println!("             MSI {} vector(s){}", m.vectors, if m.addr64 { ", 64-bit" } else { "" });
        }
        if let Some(m) = d.msix {
            println!("             MSI-X {} entries, table BAR{}+{:#x}", m.table_size, m.table.0, m.table.1);
        }
        for w in &d.warnings {
            println!("             warning: {}", w);
        }
    }
}

fn firmware_iommus(p: &Platform) {
    let mut any = false;
    match &p.dmar {
        None => {}
        Some(Err(e)) => println!("DMAR     present but malformed: {}", e),
        Some(Ok(d)) => {
            any = true;
            println!(
                "DMAR     host address width {} bits, flags {:#x}{}{}{}",
                d.dma_address_bits(),
                d.flags,
                if d.has_flag(acpi_tables::dmar::FLAG_INTR_REMAP) { " INTR_REMAP" } else { "" },
                if d.has_flag(acpi_tables::dmar::FLAG_X2APIC_OPT_OUT) { " X2APIC_OPT_OUT" } else { "" },
                if d.has_flag(acpi_tables::dmar::FLAG_DMA_CTRL_PLATFORM_OPT_IN) {
                    " DMA_CTRL_PLATFORM_OPT_IN"
                } else {
                    ""
                }
            );
            for (i, u) in d.drhds().enumerate() {
                println!(
                    "IOMMU {}  Intel VT-d unit at {:#x}, segment {}, {} KiB registers{}",
                    i,
                    u.register_base,
                    u.segment,
                    u.register_set_bytes() >> 10,
                    if u.include_pci_all() { ", INCLUDE_PCI_ALL" } else { "" }
                );
                match crate::iommu_probe::vtd(u.register_base) {
                    Err(e) => println!("         registers unreadable: {}", e),
                    Ok(r) => {
                        let c = r.caps();
                        println!(
                            "         version {}.{}  CAP {:#018x}  ECAP {:#018x}  GSTS {:#x}",
                            r.ver >> 4 & 0xf,
                            r.ver & 0xf,
                            r.cap,
                            r.ecap,
                            r.gsts
                        );
                        let sagaw: alloc::vec::Vec<_> = c.sagaw_widths().map(|b| alloc::format!("{}", b)).collect();
                        println!(
                            "         address widths: guest {} bits (MGAW), page tables for {} bits (SAGAW)",
                            c.mgaw(),
                            sagaw.join("/")
                        );
                        println!(
                            "         page sizes: 4 KiB{}{}; {} domain ids; caching mode {}; write-buffer flush {}",
                            if c.second_stage_2m() { ", 2 MiB" } else { "" },
                            if c.second_stage_1g() { ", 1 GiB" } else { "" },
                            c.domains(),
                            yes(c.caching_mode()),
                            yes(c.rwbf())
                        );
                        println!(
                            "         queued invalidation {}, interrupt remapping {} (x2APIC {}), pass-through {}, coherent walks {}, snoop control {}",
                            yes(c.qi()),
                            yes(c.interrupt_remapping()),
                            yes(c.eim()),
                            yes(c.pass_through()),
                            yes(c.coherent()),
                            yes(c.snoop_control())
                        );
                        println!(
                            "         scalable mode {}, first-stage {}, second-stage {}, nested {}, PASID {}, dirty tracking {}",
                            yes(c.scalable()),
                            yes(c.first_stage()),
                            yes(c.second_stage()),
                            yes(c.nested()),
                            yes(c.pasid()),
                            yes(c.dirty_tracking())
                        );
                        println!(
                            "         fault recording: {} register(s) at +{:#x}, IOTLB registers at +{:#x}, FSTS {:#x}",
                            c.nfr(),
                            c.fro(),
                            c.iro(),
                            r.fsts
                        );
                    }
                }
                for s in &u.scopes {
                    match acpi_tables::scope::resolve(u.segment, s, &p.ecam) {
                        Ok(b) => {
                            let dev = p
                                .pci
                                .iter()
                                .find(|d| d.segment == u.segment && d.bdf.requester_id() == b.requester_id());
                            let what = dev
                                .map(|d| alloc::format!("{:04x}:{:04x} {}", d.vendor, d.device, d.class_name()))
                                .unwrap_or_default();
                            println!(
                                "         covers {} {} (enumeration id {}) {}",
                                s.type_name(),
                                b,
                                s.enumeration_id,
                                what
                            );
                        }
                        Err(e) => println!("         scope {} unresolved: {}", s.type_name(), e),
                    }
                }
                if u.include_pci_all() {
                    println!("         covers every other PCI device on segment {}", u.segment);
                }
            }
            for r in d.rmrrs() {
                println!("RMRR     [{:#x}-{:#x}] segment {}, {} device(s)", r.base, r.limit, r.segment, r.scopes.len());
            }
        }
    }
    match &p.ivrs {
        None => {}
        Some(Err(e)) => println!("IVRS     present but malformed: {}", e),
        Some(Ok(t)) => {
            any = true;
            println!(
                "IVRS     IVinfo {:#x} (virtual address bits {}, physical {})",
                t.iv_info,
                t.iv_info >> 15 & 0x7f,
                t.iv_info >> 8 & 0x7f
            );
            // IVHD types 0x10, 0x11 and 0x40 may all describe one unit; the
            // highest type the kernel understands is the one to use.
            let mut bases: alloc::vec::Vec<u64> = t.ivhds().map(|h| h.base_address).collect();
            bases.sort_unstable();
            bases.dedup();
            let preferred =
                bases.iter().filter_map(|b| t.ivhds().filter(|h| h.base_address == *b).max_by_key(|h| h.kind));
            for (i, h) in preferred.enumerate() {
                let others: alloc::vec::Vec<_> = t
                    .ivhds()
                    .filter(|o| o.base_address == h.base_address && o.kind != h.kind)
                    .map(|o| alloc::format!("{:#x}", o.kind))
                    .collect();
                let b = crate::pci::Bdf::from_requester_id(h.device_id);
                println!(
                    "IOMMU {}  AMD-Vi IVHD type {:#x} at {:#x}, segment {}, PCI function {} capability {:#x}, flags {:#x}",
                    i, h.kind, h.base_address, h.segment, b, h.capability_offset, h.flags
                );
                if !others.is_empty() {
                    println!(
                        "         (IVHD type {:#x} is used; type(s) {} describe the same unit)",
                        h.kind,
                        others.join(", ")
                    );
                }
                match crate::iommu_probe::amd(h.base_address) {
                    Err(e) => println!("         registers unreadable: {}", e),
                    Ok(r) => {
                        let f = r.caps();
                        println!(
                            "         EFR {:#018x}: {} ; host levels {}, guest levels {}, PASID bits {}",
                            r.efr,
                            f.feature_names().join(" "),
                            f.max_levels().map_or_else(
                                || alloc::format!("reserved (HATS {})", f.hats()),
                                |l| alloc::format!("{l}")
                            ),
                            f.guest_levels().map_or_else(
                                || alloc::format!("reserved (GATS {})", f.gats()),
                                |l| alloc::format!("{l}")
                            ),
                            f.pasid_bits().map_or_else(|| "none".into(), |b| alloc::format!("{b}"))
                        );
                        println!(
                            "         control {:#x} (IOMMU {}), status {:#x}",
                            r.control,
                            if r.control().contains(amdvi::regs::Control::IOMMU_EN) { "enabled" } else { "disabled" },
                            r.status
                        );
                    }
                }
                match h.device_ranges() {
                    Err(e) => println!("         device entries malformed: {}", e),
                    Ok(ranges) => {
                        for r in &ranges {
                            let covered: alloc::vec::Vec<_> = p
                                .pci
                                .iter()
                                .filter(|d| {
                                    d.segment == h.segment && (r.first..=r.last).contains(&d.bdf.requester_id())
                                })
                                .map(|d| alloc::format!("{} {:04x}:{:04x}", d.bdf, d.vendor, d.device))
                                .collect();
                            println!(
                                "         devices {}..={} setting {:#x}{}: {}",
                                crate::pci::Bdf::from_requester_id(r.first),
                                crate::pci::Bdf::from_requester_id(r.last),
                                r.data_setting,
                                r.alias
                                    .map(|a| alloc::format!(" alias {}", crate::pci::Bdf::from_requester_id(a)))
                                    .unwrap_or_default(),
                                if covered.is_empty() {
                                    alloc::string::String::from("(none present)")
                                } else {
                                    covered.join(", ")
                                }
                            );
                        }
                    }
                }
            }
        }
    }
    if !any {
        println!("IOMMU    none described by ACPI (no DMAR or IVRS)");
    }
}

fn drivers(p: &Platform, iommus: &crate::host::Iommus) {
    use portcullis::Driver;
    for (i, unit) in iommus.units().iter().enumerate() {
        let what = match unit.vendor {
            portcullis::Vendor::IntelVtd => "VT-d",
            portcullis::Vendor::AmdVi => "AMD-Vi",
        };
        match &unit.state {
            Err(e) => println!("Driver   {} unit {} at {}: not running: {}", what, i, unit.base, e),
            Ok(Driver::Vtd(u)) => {
                let u = u.lock();
                let caps = u.caps();
                println!(
                    "Driver   VT-d unit {} at {}: {}, {} invalidation, translation on, {} domain ids",
                    i,
                    unit.base,
                    if u.is_scalable() {
                        alloc::format!(
                            "scalable mode ({} translation)",
                            match vtd::Stage::default_for(caps, true) {
                                Some(vtd::Stage::First) => "first-stage",
                                Some(vtd::Stage::Second) => "second-stage",
                                None => "no",
                            }
                        )
                    } else if caps.scalable() {
                        "legacy mode (scalable mode available)".into()
                    } else {
                        "legacy mode".into()
                    },
                    if u.queued() && u.is_scalable() {
                        "queued (256-bit)"
                    } else if u.queued() {
                        "queued"
                    } else {
                        "register-based"
                    },
                    caps.domains()
                );
                println!(
                    "         interrupt remapping {}",
                    if u.interrupt_remapping_on() {
                        "on (device MSIs blocked until routed)"
                    } else if caps.interrupt_remapping() {
                        "available but off (needs queued invalidation)"
                    } else {
                        "not supported"
                    }
                );
                owners(p, iommus, i, "requester id", |rid| u.attached_domain(rid));
            }
            Ok(Driver::Amd(u)) => {
                let u = u.lock();
                let caps = u.caps();
                println!(
                    "Driver   AMD-Vi unit {} at {}: translation on, device table for ids 0..={:#06x} ({} page(s)), \
                     command buffer, {} page-table levels at most, invalidate-all {}",
                    i,
                    unit.base,
                    u.last_device_id(),
                    u.dev_table_pages(),
                    caps.max_levels().map_or_else(|| "no".into(), |l| alloc::format!("{l}")),
                    yes(caps.invalidate_all())
                );
                owners(p, iommus, i, "device id", |id| u.attached_domain(id));
            }
        }
    }
    for problem in iommus.problems() {
        println!("Driver   firmware table problem: {:?}", problem);
    }
}

/// The functions unit `unit` translates, with their requester (device) ids
/// and attachment.
fn owners(
    p: &Platform,
    iommus: &crate::host::Iommus,
    unit: usize,
    id_name: &str,
    attached: impl Fn(u16) -> Option<u16>,
) {
    for (f, a) in iommus.assignments().filter(|(_, a)| a.unit == unit) {
        let d = p.pci.iter().find(|d| d.segment == f.segment && d.bdf == f.bdf);
        let group = iommus.group_of(f.segment, f.bdf);
        let owner = iommus.owner_of(f.segment, f.bdf);
        println!(
            "         {} {} {} {:#06x}{}, group {}{}: {}",
            f,
            d.map(|d| alloc::format!("{:04x}:{:04x}", d.vendor, d.device)).unwrap_or_default(),
            id_name,
            a.requester_id,
            a.alias_bridge.map(|b| alloc::format!(" (via bridge {})", b)).unwrap_or_default(),
            group.map_or_else(|| alloc::string::String::from("?"), |g| alloc::format!("{}", g.id.0)),
            owner.map(|o| alloc::format!(", owned by {o}")).unwrap_or_default(),
            match attached(a.requester_id) {
                Some(did) => alloc::format!("attached, domain {did}"),
                None => "blocked (no domain)".into(),
            }
        );
    }
}
