//! The Portcullis kernel library: everything a Portcullis kernel binary
//! (the report kernel `portcullis`, the in-guest test kernel) needs to bring
//! a machine up and describe it.
//!
//! `init` runs the bring-up in order: serial and logging, descriptor
//! tables and exception handlers, frame allocator and page tables, heap,
//! clock, ACPI, PCI. It returns a `Platform` with what was found.
//!
//! Hardware-free parts (frame allocator, PCI walk, KTAP formatting) build
//! and run as ordinary host tests; the IOMMU registers decode with the
//! drivers' `Caps` types, host-tested in the driver crates.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod ktest;
pub mod mem;
pub mod pci;
pub mod profile;
pub mod time;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod ecam;
#[cfg(target_os = "none")]
pub mod edu;
#[cfg(target_os = "none")]
pub mod fatal;
#[cfg(target_os = "none")]
pub mod host;
#[cfg(target_os = "none")]
pub mod iommu_probe;
#[cfg(target_os = "none")]
pub mod report;
#[cfg(target_os = "none")]
pub mod serial;

#[cfg(target_os = "none")]
pub use imp::*;

#[cfg(target_os = "none")]
mod imp {
    use crate::acpi::AcpiInfo;
    use crate::arch::CpuInfo;
    use crate::ecam::Ecam;
    use crate::pci::{BusRange, PciDevice};
    use crate::time::Calibration;
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;
    use portcullis_boot::BootInfo;

    /// What bring-up found.
    #[derive(Debug)]
    pub struct Platform {
        /// The boot hand-over.
        pub boot: &'static BootInfo,
        /// `config=` from the command line ("" when absent).
        pub config: String,
        /// The CPU.
        pub cpu: CpuInfo,
        /// How the clock was calibrated.
        pub calibration: Calibration,
        /// ACPI, or why it could not be read.
        pub acpi: Result<AcpiInfo, String>,
        /// Configuration access through the MCFG's ECAM windows.
        pub ecam: Ecam,
        /// Every PCI function found.
        pub pci: Vec<PciDevice>,
        /// The DMAR, parsed (None when the firmware has none).
        pub dmar: Option<Result<acpi_tables::dmar::Dmar, acpi_tables::Error>>,
        /// The IVRS, parsed (None when the firmware has none).
        pub ivrs: Option<Result<acpi_tables::ivrs::Ivrs, acpi_tables::Error>>,
    }

    impl Platform {
        /// ACPI information (empty when ACPI failed).
        pub fn acpi(&self) -> &AcpiInfo {
            static EMPTY: spin::Once<AcpiInfo> = spin::Once::new();
            self.acpi.as_ref().unwrap_or_else(|_| EMPTY.call_once(AcpiInfo::default))
        }

        /// The first PCI function with this vendor:device id.
        pub fn find_pci(&self, vendor: u16, device: u16) -> Option<&PciDevice> {
            self.pci.iter().find(|d| d.vendor == vendor && d.device == device)
        }
    }

    /// Brings the machine up. Panics (which reports and ends the run) only
    /// when the kernel cannot continue: no memory for page tables or heap.
    pub fn init(boot: &'static BootInfo) -> Platform {
        crate::serial::init();
        let level = match boot.cmdline_value("log") {
            Some("trace") => log::LevelFilter::Trace,
            Some("debug") => log::LevelFilter::Debug,
            Some("warn") => log::LevelFilter::Warn,
            Some("error") => log::LevelFilter::Error,
            _ => log::LevelFilter::Info,
        };
        crate::serial::init_logger(level);
        crate::arch::gdt::init();
        crate::arch::idt::init();
        if let Some(e) = boot.error {
            log::error!("PVH start info at {:#x}: {:?}", boot.start_info_paddr, e);
        }
        let calibration = crate::time::calibrate();
        crate::mem::init(boot);
        let cpu = crate::arch::cpu_info();
        let acpi = match boot.rsdp_paddr {
            Some(rsdp) => crate::acpi::discover(rsdp),
            None => Err("the boot loader gave no RSDP".to_string()),
        };
        if let Err(e) = &acpi {
            log::error!("ACPI: {}", e);
        }
        let regions = acpi.as_ref().map(|a| a.mcfg.clone()).unwrap_or_default();
        let ecam = Ecam::new(&regions);
        let ranges: Vec<BusRange> =
            regions.iter().map(|r| BusRange { segment: r.segment, start: r.bus_start, end: r.bus_end }).collect();
        let pci = crate::pci::enumerate(&ecam, &ranges);
        let (dmar, ivrs) = match &acpi {
            Ok(a) => (
                a.dmar.as_deref().map(acpi_tables::dmar::Dmar::parse),
                a.ivrs.as_deref().map(acpi_tables::ivrs::Ivrs::parse),
            ),
            Err(_) => (None, None),
        };
        if let Some(Err(e)) = &dmar {
            log::error!("DMAR does not parse: {}", e);
        }
        if let Some(Err(e)) = &ivrs {
            log::error!("IVRS does not parse: {}", e);
        }
        // The local APIC receives MSIs (IOMMU fault events); interrupts
        // stay disabled until a user enables them.
        let lapic = acpi.as_ref().map(|a| a.local_apic).ok().filter(|&b| b != 0).unwrap_or(0xfee0_0000);
        let x2apic = want_x2apic(boot, dmar.as_ref().and_then(|d| d.as_ref().ok()));
        if let Err(e) = crate::arch::irq::init(lapic as u64, x2apic) {
            log::error!("local APIC at {:#x}: {:?}", lapic, e);
        }
        log::debug!("bring-up done: {} PCI functions", pci.len());
        let config = boot.cmdline_value("config").unwrap_or("").to_string();
        Platform { boot, config, cpu, calibration, acpi, ecam, pci, dmar, ivrs }
    }

    /// Whether to run the local APIC in x2APIC mode: only when the command
    /// line asks (`x2apic=1`) and the DMAR does not opt out
    /// (X2APIC_OPT_OUT). The kernel does not decide from the DMAR alone as
    /// Linux does: QEMU's DMAR says INTR_REMAP without X2APIC_OPT_OUT
    /// whether or not its unit has extended interrupt mode (`eim`), so the
    /// table cannot tell the `intel-x2apic` configuration from `intel`, and
    /// the unit's ECAP.EIM is read only later, by the IOMMU driver. Whoever
    /// boots the kernel (xtask) knows what the machine offers and says so;
    /// the interrupt remapping units are then brought up to match
    /// ([`crate::arch::irq::x2apic`]).
    fn want_x2apic(boot: &BootInfo, dmar: Option<&acpi_tables::dmar::Dmar>) -> bool {
        if !matches!(boot.cmdline_value("x2apic"), Some("1" | "on" | "yes")) {
            return false;
        }
        if dmar.is_some_and(|d| d.has_flag(acpi_tables::dmar::FLAG_X2APIC_OPT_OUT)) {
            log::warn!("x2apic=1 asked, but the DMAR opts out of x2APIC (X2APIC_OPT_OUT): staying in xAPIC mode");
            return false;
        }
        if !crate::arch::irq::cpu_has_x2apic() {
            log::warn!("x2apic=1 asked, but the CPU has no x2APIC (CPUID.1:ECX bit 21): staying in xAPIC mode");
            return false;
        }
        true
    }
}
