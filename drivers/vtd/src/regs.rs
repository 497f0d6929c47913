//! The VT-d register block (VT-d spec chapter 11) and the seam to it.
//!
//! [`Mmio`] is how the driver touches registers: the kernel implements it
//! over an uncached mapping, host tests over a register-file model
//! (`crate::model`). Accesses are width-correct: 32-bit registers get 32-bit
//! accesses (QEMU aborts on an 8-byte write to FSTS, FECTL, ...).

pub use portcullis_iommu::mmio::{Mmio, Reg32, Reg64};

/// Size of the register block the driver maps.
pub const BLOCK: usize = 0x1000;

/// Version (32).
pub const VER: Reg32 = Reg32::at(0x00, BLOCK);
/// Capability (64).
pub const CAP: Reg64 = Reg64::at(0x08, BLOCK);
/// Extended capability (64).
pub const ECAP: Reg64 = Reg64::at(0x10, BLOCK);
/// Global command (32).
pub const GCMD: Reg32 = Reg32::at(0x18, BLOCK);
/// Global status (32).
pub const GSTS: Reg32 = Reg32::at(0x1c, BLOCK);
/// Root table address (64).
pub const RTADDR: Reg64 = Reg64::at(0x20, BLOCK);
/// Context command (64).
pub const CCMD: Reg64 = Reg64::at(0x28, BLOCK);
/// Fault status (32).
pub const FSTS: Reg32 = Reg32::at(0x34, BLOCK);
/// Fault event control (32).
pub const FECTL: Reg32 = Reg32::at(0x38, BLOCK);
/// Fault event data (32).
pub const FEDATA: Reg32 = Reg32::at(0x3c, BLOCK);
/// Fault event address (32).
pub const FEADDR: Reg32 = Reg32::at(0x40, BLOCK);
/// Fault event upper address (32).
pub const FEUADDR: Reg32 = Reg32::at(0x44, BLOCK);
/// Invalidation queue head (64).
pub const IQH: Reg64 = Reg64::at(0x80, BLOCK);
/// Invalidation queue tail (64).
pub const IQT: Reg64 = Reg64::at(0x88, BLOCK);
/// Invalidation queue address (64).
pub const IQA: Reg64 = Reg64::at(0x90, BLOCK);
/// Invalidation completion status (32).
pub const ICS: Reg32 = Reg32::at(0x9c, BLOCK);
/// Interrupt remapping table address (64): table in bits 63:12, EIME in
/// bit 11 (x2APIC destinations), S in bits 3:0 (2^(S+1) entries).
pub const IRTA: Reg64 = Reg64::at(0xb8, BLOCK);

/// Every fixed register as (offset, width in bytes), in offset order.
pub const LAYOUT: [(usize, usize); 17] = [
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
    (IRTA.offset(), 8),
];

// The fixed registers are in offset order and do not overlap (spec 11.4).
const _: () = portcullis_iommu::mmio::check_layout(&LAYOUT);

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
