//! The VT-d register block (VT-d spec chapter 11) and the seam to it.
//!
//! [`Mmio`] is how the driver touches registers: the kernel implements it
//! over an uncached mapping, host tests over a register-file model
//! (`crate::model`). Accesses are width-correct: 32-bit registers get 32-bit
//! accesses (QEMU aborts on an 8-byte write to FSTS, FECTL, ...).

/// A 32-bit register at a fixed offset (4-byte aligned, checked when the
/// constant is built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg32(usize);

/// A 64-bit register at a fixed offset (8-byte aligned, checked when the
/// constant is built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg64(usize);

impl Reg32 {
    const fn at(offset: usize) -> Self {
        assert!(offset.is_multiple_of(4) && offset + 4 <= BLOCK, "misplaced 32-bit register");
        Self(offset)
    }
    /// Offset from the unit's base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

impl Reg64 {
    const fn at(offset: usize) -> Self {
        assert!(offset.is_multiple_of(8) && offset + 8 <= BLOCK, "misplaced 64-bit register");
        Self(offset)
    }
    /// Offset from the unit's base.
    pub const fn offset(self) -> usize {
        self.0
    }
}

/// Size of the register block the driver maps.
pub const BLOCK: usize = 0x1000;

/// Register access for one unit. Offsets are from the unit's base. The
/// driver uses the typed accessors with the [`Reg32`]/[`Reg64`] constants
/// below, so a register can only be accessed with its own width; the raw
/// methods remain for the registers whose offsets the capability registers
/// give (fault recording, IOTLB).
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

/// Version (32).
pub const VER: Reg32 = Reg32::at(0x00);
/// Capability (64).
pub const CAP: Reg64 = Reg64::at(0x08);
/// Extended capability (64).
pub const ECAP: Reg64 = Reg64::at(0x10);
/// Global command (32).
pub const GCMD: Reg32 = Reg32::at(0x18);
/// Global status (32).
pub const GSTS: Reg32 = Reg32::at(0x1c);
/// Root table address (64).
pub const RTADDR: Reg64 = Reg64::at(0x20);
/// Context command (64).
pub const CCMD: Reg64 = Reg64::at(0x28);
/// Fault status (32).
pub const FSTS: Reg32 = Reg32::at(0x34);
/// Fault event control (32).
pub const FECTL: Reg32 = Reg32::at(0x38);
/// Fault event data (32).
pub const FEDATA: Reg32 = Reg32::at(0x3c);
/// Fault event address (32).
pub const FEADDR: Reg32 = Reg32::at(0x40);
/// Fault event upper address (32).
pub const FEUADDR: Reg32 = Reg32::at(0x44);
/// Invalidation queue head (64).
pub const IQH: Reg64 = Reg64::at(0x80);
/// Invalidation queue tail (64).
pub const IQT: Reg64 = Reg64::at(0x88);
/// Invalidation queue address (64).
pub const IQA: Reg64 = Reg64::at(0x90);
/// Invalidation completion status (32).
pub const ICS: Reg32 = Reg32::at(0x9c);

/// Every fixed register as (offset, width in bytes), in offset order.
pub const LAYOUT: [(usize, usize); 16] = [
    (VER.offset(), 4),
    (CAP.offset(), 8),
    (ECAP.offset(), 8),
    (GCMD.offset(), 4),
    (GSTS.offset(), 4),
    (RTADDR.offset(), 8),
    (CCMD.offset(), 8),
    (FSTS.offset(), 4),
    (FECTL.offset(), 4),
    (FEDATA.offset(), 4),
    (FEADDR.offset(), 4),
    (FEUADDR.offset(), 4),
    (IQH.offset(), 8),
    (IQT.offset(), 8),
    (IQA.offset(), 8),
    (ICS.offset(), 4),
];

// The fixed registers are in offset order and do not overlap (spec 11.4).
const _: () = {
    let mut i = 1;
    while i < LAYOUT.len() {
        assert!(LAYOUT[i - 1].0 + LAYOUT[i - 1].1 <= LAYOUT[i].0, "overlapping registers");
        i += 1;
    }
};

/// GCMD/GSTS bits (spec 11.4.4, 11.4.5).
pub mod gcmd {
    /// Translation enable.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer.
    pub const SRTP: u32 = 1 << 30;
    /// Write buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remap table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupts.
    pub const CFI: u32 = 1 << 23;
    /// The bits that are persistent enables (written back on every GCMD
    /// write, since GCMD acts on the difference from GSTS).
    pub const PERSISTENT: u32 = TE | QIE | IRE | CFI;
}

/// RTADDR translation table mode (spec 11.4.6).
pub mod rtaddr {
    /// Legacy root/context tables.
    pub const TTM_LEGACY: u64 = 0 << 10;
    /// Scalable-mode root/context tables.
    pub const TTM_SCALABLE: u64 = 1 << 10;
}

/// CCMD bits (spec 11.4.7).
pub mod ccmd {
    /// Invalidate context cache (set to start, clears when done).
    pub const ICC: u64 = 1 << 63;
    /// Global invalidation.
    pub const GLOBAL: u64 = 1 << 61;
    /// Domain-selective invalidation.
    pub const DOMAIN: u64 = 2 << 61;
    /// Device-selective invalidation.
    pub const DEVICE: u64 = 3 << 61;
}

/// IOTLB invalidate register bits (spec 11.4.8.1).
pub mod iotlb {
    /// Invalidate IOTLB (set to start, clears when done).
    pub const IVT: u64 = 1 << 63;
    /// Global invalidation.
    pub const GLOBAL: u64 = 1 << 60;
    /// Domain-selective invalidation.
    pub const DOMAIN: u64 = 2 << 60;
    /// Page-selective invalidation.
    pub const PAGE: u64 = 3 << 60;
    /// Drain reads.
    pub const DR: u64 = 1 << 49;
    /// Drain writes.
    pub const DW: u64 = 1 << 48;
    /// Domain id field.
    pub fn did(did: u16) -> u64 {
        (did as u64) << 32
    }
}

/// FSTS bits (spec 11.4.9.1).
pub mod fsts {
    /// Primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (RO: some fault record has F set).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// Index of the first pending fault record.
    pub fn fri(fsts: u32) -> u32 {
        (fsts >> 8) & 0xff
    }
}

/// FECTL bits.
pub mod fectl {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending: an event occurred while masked (read-only).
    pub const IP: u32 = 1 << 30;
}

/// ICS: invalidation wait descriptor completed (IWC, RW1C).
pub const ICS_IWC: u32 = 1;
