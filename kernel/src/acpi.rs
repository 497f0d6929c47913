//! ACPI through the `acpi` crate: the RSDP from the PVH start info, the
//! RSDT/XSDT, the MADT and MCFG, and the raw bytes of the DMAR and IVRS for
//! [`acpi_tables`] to parse.

use alloc::string::String;
use alloc::vec::Vec;

/// One table listed in the RSDT/XSDT.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Signature.
    pub signature: [u8; 4],
    /// Length in bytes.
    pub length: u32,
    /// Revision.
    pub revision: u8,
    /// OEM id.
    pub oem_id: String,
    /// OEM table id.
    pub oem_table_id: String,
}

impl TableInfo {
    /// Signature as text.
    pub fn signature(&self) -> &str {
        core::str::from_utf8(&self.signature).unwrap_or("????")
    }
}

/// An IOAPIC from the MADT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApic {
    /// IOAPIC id.
    pub id: u8,
    /// Register base.
    pub address: u32,
    /// First GSI.
    pub gsi_base: u32,
}

/// A MADT interrupt source override: ISA IRQ `irq` arrives at global
/// system interrupt `gsi`, signalled as `flags` say (MPS INTI flags:
/// polarity in bits 1:0, trigger mode in bits 3:2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaOverride {
    /// ISA IRQ.
    pub irq: u8,
    /// Where it arrives.
    pub gsi: u32,
    /// MPS INTI flags.
    pub flags: u16,
}

/// Where an ISA IRQ arrives and how it signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsaIrq {
    /// Global system interrupt (an IOAPIC's GSI base plus its pin).
    pub gsi: u32,
    /// Level-triggered (else edge).
    pub level: bool,
    /// Active low (else active high).
    pub active_low: bool,
}

impl IsaOverride {
    /// The override as an [`IsaIrq`]: "conforms to the bus" (00) in either
    /// field means the ISA default, edge and active high; the reserved 10
    /// is read the same way.
    pub fn isa_irq(&self) -> IsaIrq {
        IsaIrq { gsi: self.gsi, level: self.flags >> 2 & 3 == 3, active_low: self.flags & 3 == 3 }
    }
}

/// An ECAM region from the MCFG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McfgRegion {
    /// Segment group.
    pub segment: u16,
    /// First bus.
    pub bus_start: u8,
    /// Last bus.
    pub bus_end: u8,
    /// Physical base (of bus 0, as the MCFG defines it).
    pub base: u64,
}

/// What the kernel takes from ACPI.
#[derive(Debug, Clone, Default)]
pub struct AcpiInfo {
    /// RSDP physical address.
    pub rsdp: u64,
    /// ACPI revision (0 = RSDT).
    pub revision: u8,
    /// All tables in the root table.
    pub tables: Vec<TableInfo>,
    /// Local APIC ids of enabled CPUs.
    pub cpus: Vec<u32>,
    /// Local APIC base.
    pub local_apic: u32,
    /// IOAPICs.
    pub ioapics: Vec<IoApic>,
    /// Interrupt source overrides (ISA IRQs not at the GSI of their
    /// number, or not edge and active high).
    pub overrides: Vec<IsaOverride>,
    /// ECAM regions.
    pub mcfg: Vec<McfgRegion>,
    /// The whole DMAR, if present.
    pub dmar: Option<Vec<u8>>,
    /// The whole IVRS, if present.
    pub ivrs: Option<Vec<u8>>,
}

impl AcpiInfo {
    /// Whether a table with this signature is listed.
    pub fn has_table(&self, sig: &str) -> bool {
        self.tables.iter().any(|t| t.signature() == sig)
    }

    /// Where ISA IRQ `irq` arrives: its override, else GSI `irq`, edge,
    /// active high.
    pub fn isa_irq(&self, irq: u8) -> IsaIrq {
        self.overrides
            .iter()
            .find(|o| o.irq == irq)
            .map_or(IsaIrq { gsi: irq as u32, level: false, active_low: false }, IsaOverride::isa_irq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_irqs_follow_their_overrides() {
        let info = AcpiInfo {
            overrides: alloc::vec![
                IsaOverride { irq: 0, gsi: 2, flags: 0 },
                IsaOverride { irq: 9, gsi: 9, flags: 0b1111 },
                IsaOverride { irq: 5, gsi: 21, flags: 0b1101 },
            ],
            ..AcpiInfo::default()
        };
        assert_eq!(info.isa_irq(0), IsaIrq { gsi: 2, level: false, active_low: false });
        assert_eq!(info.isa_irq(4), IsaIrq { gsi: 4, level: false, active_low: false });
        assert_eq!(info.isa_irq(9), IsaIrq { gsi: 9, level: true, active_low: true });
        assert_eq!(info.isa_irq(5), IsaIrq { gsi: 21, level: true, active_low: false });
    }
}

#[cfg(target_os = "none")]
pub use imp::discover;

#[cfg(target_os = "none")]
mod imp {
    use super::*;
    use acpi::madt::{Madt, MadtEntry};
    use acpi::mcfg::Mcfg;
    use acpi::sdt::{SdtHeader, Signature};
    use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
    use alloc::format;
    use core::ptr::NonNull;

    /// Maps ACPI memory through the kernel's write-back window. Mappings are
    /// never torn down (the window is idempotent and tables are small).
    #[derive(Clone, Copy, Debug)]
    struct Handler;

    impl AcpiHandler for Handler {
        unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
            let virt = crate::mem::map_phys(phys as u64, size as u64).expect("mapping ACPI memory");
            // SAFETY: `virt` maps `size` bytes at `phys` readable for the
            // kernel's lifetime; the caller promises a `T` lives there.
            unsafe {
                PhysicalMapping::new(phys, NonNull::new(virt as *mut T).expect("non-null window"), size, size, *self)
            }
        }
        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    /// Just the DMAR's header, to find it and learn its length.
    #[repr(C, packed)]
    struct RawDmar {
        header: SdtHeader,
    }
    /// Just the IVRS's header.
    #[repr(C, packed)]
    struct RawIvrs {
        header: SdtHeader,
    }

    // SAFETY: an SDT header is the first thing in every ACPI table; the
    // signature is the table this type stands for.
    unsafe impl AcpiTable for RawDmar {
        const SIGNATURE: Signature = Signature::DMAR;
        fn header(&self) -> &SdtHeader {
            &self.header
        }
    }
    // SAFETY: as above.
    unsafe impl AcpiTable for RawIvrs {
        const SIGNATURE: Signature = Signature::IVRS;
        fn header(&self) -> &SdtHeader {
            &self.header
        }
    }

    fn copy_table<T: AcpiTable>(tables: &AcpiTables<Handler>) -> Option<Vec<u8>> {
        let m = tables.find_table::<T>().ok()?;
        let len = m.get().header().length as usize;
        if !(36..=1 << 20).contains(&len) {
            log::warn!("{} length {} out of range, ignored", T::SIGNATURE, len);
            return None;
        }
        let p = crate::mem::map_phys(m.physical_start() as u64, len as u64).ok()?;
        // SAFETY: `len` bytes at `p` are mapped (map_phys just did) and hold
        // the table; they are only read.
        Some(unsafe { core::slice::from_raw_parts(p, len) }.to_vec())
    }

    /// Reads ACPI from the RSDP.
    pub fn discover(rsdp: u64) -> Result<AcpiInfo, String> {
        // SAFETY: the address comes from the boot protocol's start info;
        // the crate validates the RSDP's signature and checksum before use.
        let tables = unsafe { AcpiTables::from_rsdp(Handler, rsdp as usize) }
            .map_err(|e| format!("RSDP at {:#x}: {:?}", rsdp, e))?;
        let mut info = AcpiInfo { rsdp, revision: tables.revision(), ..AcpiInfo::default() };
        for h in tables.headers() {
            info.tables.push(TableInfo {
                signature: *h.signature.as_str().as_bytes().first_chunk().unwrap_or(b"????"),
                length: h.length,
                revision: h.revision,
                oem_id: String::from(h.oem_id().trim()),
                oem_table_id: String::from(h.oem_table_id().trim()),
            });
        }
        if let Ok(madt) = tables.find_table::<Madt>() {
            info.local_apic = madt.get().local_apic_address;
            for e in madt.get().entries() {
                match e {
                    MadtEntry::LocalApic(l) if l.flags & 1 != 0 => info.cpus.push(l.apic_id as u32),
                    MadtEntry::LocalX2Apic(l) if l.flags & 1 != 0 => info.cpus.push(l.x2apic_id),
                    MadtEntry::IoApic(i) => info.ioapics.push(IoApic {
                        id: i.io_apic_id,
                        address: i.io_apic_address,
                        gsi_base: i.global_system_interrupt_base,
                    }),
                    MadtEntry::InterruptSourceOverride(o) if o.bus == 0 => {
                        info.overrides.push(IsaOverride { irq: o.irq, gsi: o.global_system_interrupt, flags: o.flags })
                    }
                    _ => {}
                }
            }
        }
        if let Ok(mcfg) = tables.find_table::<Mcfg>() {
            for e in mcfg.entries() {
                info.mcfg.push(McfgRegion {
                    segment: e.pci_segment_group,
                    bus_start: e.bus_number_start,
                    bus_end: e.bus_number_end,
                    base: e.base_address,
                });
            }
        }
        info.dmar = copy_table::<RawDmar>(&tables);
        info.ivrs = copy_table::<RawIvrs>(&tables);
        Ok(info)
    }
}
