//! The VT-d register block (VT-d spec chapter 11) and the seam to it.
//!
//! [`Mmio`] is how the driver touches registers: the kernel implements it
//! over an uncached mapping, host tests over a register-file model
//! (`crate::model`). Accesses are width-correct: 32-bit registers get 32-bit
//! accesses (QEMU aborts on an 8-byte write to FSTS, FECTL, ...).

/// Register access for one unit. Offsets are from the unit's base.
pub trait Mmio {
    /// 32-bit read.
    fn read32(&self, offset: usize) -> u32;
    /// 64-bit read.
    fn read64(&self, offset: usize) -> u64;
    /// 32-bit write.
    fn write32(&self, offset: usize, value: u32);
    /// 64-bit write.
    fn write64(&self, offset: usize, value: u64);
}

/// Version (32).
pub const VER: usize = 0x00;
/// Capability (64).
pub const CAP: usize = 0x08;
/// Extended capability (64).
pub const ECAP: usize = 0x10;
/// Global command (32).
pub const GCMD: usize = 0x18;
/// Global status (32).
pub const GSTS: usize = 0x1c;
/// Root table address (64).
pub const RTADDR: usize = 0x20;
/// Context command (64).
pub const CCMD: usize = 0x28;
/// Fault status (32).
pub const FSTS: usize = 0x34;
/// Fault event control (32).
pub const FECTL: usize = 0x38;
/// Fault event data (32).
pub const FEDATA: usize = 0x3c;
/// Fault event address (32).
pub const FEADDR: usize = 0x40;
/// Fault event upper address (32).
pub const FEUADDR: usize = 0x44;
/// Invalidation queue head (64).
pub const IQH: usize = 0x80;
/// Invalidation queue tail (64).
pub const IQT: usize = 0x88;
/// Invalidation queue address (64).
pub const IQA: usize = 0x90;
/// Invalidation completion status (32).
pub const ICS: usize = 0x9c;

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
