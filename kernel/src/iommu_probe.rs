//! Reading the identification registers of the IOMMUs the ACPI tables name,
//! for the report and the in-guest tests. Read-only: nothing here changes
//! IOMMU state. (The drivers own the units once they exist.)

use crate::iommu_regs::{amd, vtd};
use crate::mem::paging::MapError;

fn read32(base: *const u8, off: usize) -> u32 {
    // SAFETY: callers pass a register block mapped uncached by map_mmio and
    // an offset inside it; a 32-bit read of an IOMMU register has no effect.
    unsafe { base.add(off).cast::<u32>().read_volatile() }
}

fn read64(base: *const u8, off: usize) -> u64 {
    // SAFETY: as for read32; the 64-bit registers read here are 8-aligned.
    unsafe { base.add(off).cast::<u64>().read_volatile() }
}

/// VT-d identification registers of one DRHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdRegs {
    /// VER (major in bits 7:4, minor 3:0).
    pub ver: u32,
    /// CAP.
    pub cap: u64,
    /// ECAP.
    pub ecap: u64,
    /// GSTS.
    pub gsts: u32,
    /// FSTS.
    pub fsts: u32,
}

/// Reads a VT-d unit's registers at `base`.
pub fn vtd(base: u64) -> Result<VtdRegs, MapError> {
    let p = crate::mem::map_mmio(base, 0x1000)?;
    Ok(VtdRegs {
        ver: read32(p, vtd::VER),
        cap: read64(p, vtd::CAP),
        ecap: read64(p, vtd::ECAP),
        gsts: read32(p, vtd::GSTS),
        fsts: read32(p, vtd::FSTS),
    })
}

/// AMD-Vi registers of one IVHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdRegs {
    /// Control register.
    pub control: u64,
    /// Extended feature register.
    pub efr: u64,
    /// Status register.
    pub status: u64,
}

/// Reads an AMD-Vi unit's registers at `base` (the MMIO block is 16 KiB;
/// the status register sits at 0x2020).
pub fn amd(base: u64) -> Result<AmdRegs, MapError> {
    let p = crate::mem::map_mmio(base, 0x4000)?;
    Ok(AmdRegs { control: read64(p, amd::CONTROL), efr: read64(p, amd::EFR), status: read64(p, amd::STATUS) })
}
