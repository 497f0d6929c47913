//! The register seam shared by the IOMMU drivers: typed, width-checked
//! register constants and the [`Mmio`] trait through which a driver touches
//! its unit. The kernel implements [`Mmio`] once over an uncached mapping;
//! host tests implement it over register models.
//!
//! A driver declares its fixed registers as [`Reg32`]/[`Reg64`] constants
//! built with `at(offset, block)`, which fails at compile time when the
//! offset is misaligned for the width or outside the block, and checks its
//! whole layout with [`check_layout`] in a `const` item. The typed
//! accessors then make a register readable or writable only at its own
//! width (QEMU aborts on an 8-byte access to a 32-bit VT-d register).

/// A 32-bit register at a fixed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg32(usize);

/// A 64-bit register at a fixed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg64(usize);

impl Reg32 {
    /// The 32-bit register at `offset` of a `block`-byte register block;
    /// panics (at compile time in a `const`) when misaligned or outside.
    pub const fn at(offset: usize, block: usize) -> Self {
        assert!(offset.is_multiple_of(4) && offset + 4 <= block, "misplaced 32-bit register");
        Self(offset)
    }
    /// Offset from the unit's base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

impl Reg64 {
    /// The 64-bit register at `offset` of a `block`-byte register block;
    /// panics (at compile time in a `const`) when misaligned or outside.
    pub const fn at(offset: usize, block: usize) -> Self {
        assert!(offset.is_multiple_of(8) && offset + 8 <= block, "misplaced 64-bit register");
        Self(offset)
    }
    /// Offset from the unit's base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

/// Panics (at compile time in a `const`) unless the `(offset, width)`
/// pairs are in offset order and do not overlap.
pub const fn check_layout(layout: &[(usize, usize)]) {
    let mut i = 1;
    while i < layout.len() {
        assert!(layout[i - 1].0 + layout[i - 1].1 <= layout[i].0, "registers out of order or overlapping");
        i += 1;
    }
}

/// Register access for one unit; offsets are from the unit's base. The raw
/// methods remain for registers whose offsets the hardware reports at run
/// time (VT-d fault recording and IOTLB registers).
pub trait Mmio {
    /// 32-bit read.
    fn read32(&self, offset: usize) -> u32;
    /// 64-bit read.
    fn read64(&self, offset: usize) -> u64;
    /// 32-bit write.
    fn write32(&self, offset: usize, value: u32);
    /// 64-bit write.
    fn write64(&self, offset: usize, value: u64);
    /// Reads a 32-bit register.
    fn get32(&self, r: Reg32) -> u32 {
        self.read32(r.offset())
    }
    /// Reads a 64-bit register.
    fn get64(&self, r: Reg64) -> u64 {
        self.read64(r.offset())
    }
    /// Writes a 32-bit register.
    fn set32(&self, r: Reg32, value: u32) {
        self.write32(r.offset(), value)
    }
    /// Writes a 64-bit register.
    fn set64(&self, r: Reg64, value: u64) {
        self.write64(r.offset(), value)
    }
}
