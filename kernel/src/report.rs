//! The human-readable platform report that `cargo xtask run` shows.

use crate::Platform;
use crate::println;

/// Prints the whole report to serial.
pub fn print(p: &Platform) {
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
    println!("Command  {:?}", p.boot.cmdline());
    memory(p);
    acpi(p);
    pci(p);
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
        println!(
            "         [{:#014x}-{:#014x}) {:>9} KiB {}",
            r.start,
            r.end(),
            r.size >> 10,
            r.kind.name()
        );
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
            println!(
                "         {} CPU(s), local APIC {:#x}; IOAPICs: {}",
                a.cpus.len(),
                a.local_apic,
                a.ioapics.len()
            );
            for io in &a.ioapics {
                println!(
                    "         IOAPIC id {} at {:#x}, GSI base {}",
                    io.id, io.address, io.gsi_base
                );
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
            d.pcie
                .map(|x| alloc::format!(" (PCIe {})", x.port_type_name()))
                .unwrap_or_default()
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
            println!(
                "             MSI {} vector(s){}",
                m.vectors,
                if m.addr64 { ", 64-bit" } else { "" }
            );
        }
        if let Some(m) = d.msix {
            println!(
                "             MSI-X {} entries, table BAR{}+{:#x}",
                m.table_size, m.table.0, m.table.1
            );
        }
        for w in &d.warnings {
            println!("             warning: {}", w);
        }
    }
}
