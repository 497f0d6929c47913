//! PCI configuration access through the MCFG's memory-mapped (ECAM) windows.
//! Each bus's 1 MiB window is mapped uncached the first time it is touched.

use crate::acpi::McfgRegion;
use crate::pci::{Bdf, ConfigAccess};
use alloc::vec::Vec;
use spin::Mutex;

/// ECAM accessor.
#[derive(Debug)]
pub struct Ecam {
    regions: Vec<McfgRegion>,
    mapped: Mutex<Vec<[u64; 4]>>,
}

impl Ecam {
    /// Accessor over these regions.
    pub fn new(regions: &[McfgRegion]) -> Self {
        Self { regions: regions.to_vec(), mapped: Mutex::new(alloc::vec![[0; 4]; regions.len()]) }
    }

    /// Virtual address of a config dword, mapping its bus on first use.
    fn address(&self, segment: u16, bdf: Bdf, offset: u16) -> Option<*mut u32> {
        if offset >= 4096 || !offset.is_multiple_of(4) || bdf.device >= 32 || bdf.function >= 8 {
            return None;
        }
        let (i, r) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.segment == segment && (r.bus_start..=r.bus_end).contains(&bdf.bus))?;
        let bus_phys = r.base + ((bdf.bus as u64) << 20);
        let mut mapped = self.mapped.lock();
        let word = &mut mapped[i][bdf.bus as usize / 64];
        let bit = 1u64 << (bdf.bus % 64);
        if *word & bit == 0 {
            crate::mem::map_mmio(bus_phys, 1 << 20).ok()?;
            *word |= bit;
        }
        let phys = bus_phys + ((bdf.device as u64) << 15 | (bdf.function as u64) << 12 | offset as u64);
        Some((crate::mem::MMIO_BASE + phys) as *mut u32)
    }
}

impl ConfigAccess for Ecam {
    fn read32(&self, segment: u16, bdf: Bdf, offset: u16) -> u32 {
        match self.address(segment, bdf, offset) {
            // SAFETY: the address lies in this bus's ECAM window, mapped
            // uncached by `address`; config reads have no memory effects.
            Some(p) => unsafe { p.read_volatile() },
            None => u32::MAX,
        }
    }
    fn write32(&self, segment: u16, bdf: Bdf, offset: u16, value: u32) {
        if let Some(p) = self.address(segment, bdf, offset) {
            // SAFETY: as for read32; callers write only registers whose
            // effects they own (BAR sizing, command register, and the
            // passthrough crate quiescing a device it takes back: MSI and
            // MSI-X control, FLR, a bridge's secondary bus reset).
            unsafe { p.write_volatile(value) }
        }
    }
}

impl acpi_tables::scope::ConfigSpace for Ecam {
    fn read_u32(&self, segment: u16, bdf: acpi_tables::scope::Bdf, offset: u16) -> Option<u32> {
        let bdf = Bdf { bus: bdf.bus, device: bdf.device, function: bdf.function };
        self.address(segment, bdf, offset)?;
        let v = self.read32(segment, bdf, offset);
        // A missing function reads all ones, vendor id 0xffff included.
        (self.read32(segment, bdf, 0) & 0xffff != 0xffff).then_some(v)
    }
}
