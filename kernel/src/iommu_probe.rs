//! Reading the identification registers of the IOMMUs the ACPI tables name,
//! for the report and the in-guest tests. Read-only: nothing here changes
//! IOMMU state, and it works whether or not a driver owns the unit. The
//! offsets are the drivers' ([`vtd::regs`], [`amdvi::regs`]), the accesses
//! go through [`KernelMmio`], and the values decode with the drivers'
//! [`vtd::Caps`] and [`amdvi::Caps`].

use crate::host::KernelMmio;
use crate::mem::paging::MapError;
use portcullis::Mmio;

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
    /// IRTA (the interrupt remapping table; EIME in bit 11).
    pub irta: u64,
}

impl VtdRegs {
    /// CAP and ECAP, decoded by the driver.
    pub fn caps(&self) -> vtd::Caps {
        vtd::Caps { cap: self.cap, ecap: self.ecap }
    }
}

/// Reads a VT-d unit's registers at `base`.
pub fn vtd(base: u64) -> Result<VtdRegs, MapError> {
    use vtd::regs::{BLOCK, CAP, ECAP, FSTS, GSTS, IRTA, VER};
    let m = KernelMmio::map(base, BLOCK)?;
    Ok(VtdRegs {
        ver: m.get32(VER),
        cap: m.get64(CAP),
        ecap: m.get64(ECAP),
        gsts: m.get32(GSTS),
        fsts: m.get32(FSTS),
        irta: m.get64(IRTA),
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

impl AmdRegs {
    /// The EFR, decoded by the driver.
    pub fn caps(&self) -> amdvi::Caps {
        amdvi::Caps::from_efr(self.efr)
    }
    /// The control register's flags.
    pub fn control(&self) -> amdvi::regs::Control {
        amdvi::regs::Control::from_bits_retain(self.control)
    }
}

/// Reads an AMD-Vi unit's registers at `base` (the whole 16 KiB block: the
/// status register sits at 0x2020).
pub fn amd(base: u64) -> Result<AmdRegs, MapError> {
    use amdvi::regs::{BLOCK, CONTROL, EXT_FEATURE, STATUS};
    let m = KernelMmio::map(base, BLOCK)?;
    Ok(AmdRegs { control: m.get64(CONTROL), efr: m.get64(EXT_FEATURE), status: m.get64(STATUS) })
}
