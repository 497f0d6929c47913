//! The VT-d register block (VT-d spec chapter 11) and the seam to it.
//!
//! [`Mmio`] is how the driver touches registers: the kernel implements it
//! over an uncached mapping, host tests over a register-file model
//! (`crate::model`). Accesses are width-correct: 32-bit registers get 32-bit
//! accesses (QEMU aborts on an 8-byte write to FSTS, FECTL, ...).

use bitflags::bitflags;
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

bitflags! {
    /// GCMD (spec 11.4.4) and GSTS (spec 11.4.5) bits: a command in GCMD,
    /// its status in GSTS at the same position. Only the bits the driver
    /// uses are named; values read from the unit keep the others
    /// (`from_bits_retain`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Gcmd: u32 {
        /// TE / TES: translation enable.
        const TE = 1 << 31;
        /// SRTP / RTPS: set root table pointer (one-shot; RTPS sets once
        /// the new root is latched).
        const SRTP = 1 << 30;
        /// WBF / WBFS: write buffer flush (one-shot; WBFS clears when done).
        const WBF = 1 << 27;
        /// QIE / QIES: queued invalidation enable.
        const QIE = 1 << 26;
        /// IRE / IRES: interrupt remapping enable.
        const IRE = 1 << 25;
        /// SIRTP / IRTPS: set interrupt remap table pointer (one-shot).
        const SIRTP = 1 << 24;
        /// CFI / CFIS: compatibility format interrupts pass.
        const CFI = 1 << 23;
    }
}

/// GSTS has GCMD's layout (spec 11.4.5).
pub type Gsts = Gcmd;

impl Gcmd {
    /// The bits that are persistent enables (written back on every GCMD
    /// write, since GCMD acts on the difference from GSTS).
    pub const PERSISTENT: Self = Self::TE.union(Self::QIE).union(Self::IRE).union(Self::CFI);
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
    /// CAIG: the granularity the unit actually invalidated at, when ICC
    /// has cleared; 0 means it did not invalidate at all.
    pub const CAIG: u64 = 3 << 59;
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
    /// IAIG: the granularity the unit actually invalidated at, when IVT
    /// has cleared; 0 means it found the request wrong and ignored it.
    pub const IAIG: u64 = 3 << 57;
    /// Drain reads.
    pub const DR: u64 = 1 << 49;
    /// Drain writes.
    pub const DW: u64 = 1 << 48;
    /// Domain id field.
    pub fn did(did: u16) -> u64 {
        (did as u64) << 32
    }
}

bitflags! {
    /// FSTS bits (spec 11.4.9.1); the FRI field (bits 15:8) is read with
    /// [`Fsts::fri`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Fsts: u32 {
        /// PFO: primary fault overflow (RW1C).
        const PFO = 1 << 0;
        /// PPF: primary pending fault (RO: some fault record has F set).
        const PPF = 1 << 1;
        /// IQE: invalidation queue error (RW1C).
        const IQE = 1 << 4;
        /// ICE: invalidation completion error (RW1C).
        const ICE = 1 << 5;
        /// ITE: invalidation time-out error (RW1C).
        const ITE = 1 << 6;
    }
}

impl Fsts {
    /// The invalidation errors: any of them fails a queued invalidation.
    pub const QUEUE_ERRORS: Self = Self::IQE.union(Self::ICE).union(Self::ITE);
    /// The write-one-to-clear bits.
    pub const W1C: Self = Self::PFO.union(Self::QUEUE_ERRORS);
    /// FRI: index of the first pending fault record (bits 15:8).
    pub const fn fri(self) -> u32 {
        (self.bits() >> 8) & 0xff
    }
}

bitflags! {
    /// FECTL bits (spec 11.4.9.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Fectl: u32 {
        /// IM: interrupt mask.
        const IM = 1 << 31;
        /// IP: interrupt pending, an event occurred while masked (RO).
        const IP = 1 << 30;
    }
}

/// GSTS as read from the unit (every bit kept).
pub fn read_gsts(m: &(impl Mmio + ?Sized)) -> Gsts {
    Gsts::from_bits_retain(m.get32(GSTS))
}

/// FSTS as read from the unit (every bit kept, FRI included).
pub fn read_fsts(m: &(impl Mmio + ?Sized)) -> Fsts {
    Fsts::from_bits_retain(m.get32(FSTS))
}

/// FECTL as read from the unit (every bit kept).
pub fn read_fectl(m: &(impl Mmio + ?Sized)) -> Fectl {
    Fectl::from_bits_retain(m.get32(FECTL))
}

/// ICS: invalidation wait descriptor completed (IWC, RW1C).
pub const ICS_IWC: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_bits_sit_where_the_spec_puts_them() {
        assert_eq!(Gcmd::PERSISTENT.bits(), 0x8680_0000, "TE 31, QIE 26, IRE 25, CFI 23");
        assert_eq!((Gcmd::SRTP | Gcmd::WBF | Gcmd::SIRTP).bits(), 0x4900_0000);
        assert_eq!(Fsts::W1C.bits(), 0x71);
        let f = Fsts::from_bits_retain(0x0000_2a03);
        assert_eq!((f.fri(), f.contains(Fsts::PPF | Fsts::PFO)), (0x2a, true));
        assert_eq!((Fectl::IM | Fectl::IP).bits(), 0xc000_0000);
        // Differences keep bits the driver does not name.
        assert_eq!((Gsts::from_bits_retain(0x8000_0001) - Gsts::TE).bits(), 1);
    }
}
