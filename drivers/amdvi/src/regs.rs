//! The AMD-Vi MMIO register block (spec §3.4) and the seam to it.
//!
//! [`Mmio`] is how the driver touches registers: the kernel implements it
//! over an uncached mapping of the IVHD's base address, host tests over a
//! register model; it is the trait VT-d uses too
//! (`portcullis_iommu::mmio`), so one kernel type serves both. Every
//! register the driver uses is a
//! 64-bit register and gets 64-bit accesses; the typed accessors make
//! another width impossible for the constants below.

use bitflags::bitflags;
pub use portcullis_iommu::mmio::{Mmio, Reg32, Reg64};

/// Size of the register block the driver maps: 16 KiB (the control
/// registers at 0000h-1FFFh and the pointer/status registers from 2000h;
/// performance counters beyond 4000h are not used).
pub const BLOCK: usize = 0x4000;

/// Device Table Base Address (MMIO 0000h): base in bits 51:12, `Size` in
/// bits 8:0 (table size in 4 KiB pages, minus one).
pub const DEV_TABLE_BASE: Reg64 = Reg64::at(0x0000, BLOCK);
/// Command Buffer Base Address (MMIO 0008h): base in bits 51:12, `ComLen`
/// in bits 59:56 (2^ComLen entries of 16 bytes, 8..=15).
pub const CMD_BUF_BASE: Reg64 = Reg64::at(0x0008, BLOCK);
/// Event Log Base Address (MMIO 0010h): base in bits 51:12, `EventLen` in
/// bits 59:56 (2^EventLen entries of 16 bytes, 8..=15).
pub const EVENT_LOG_BASE: Reg64 = Reg64::at(0x0010, BLOCK);
/// IOMMU Control (MMIO 0018h), bits in [`Control`].
pub const CONTROL: Reg64 = Reg64::at(0x0018, BLOCK);
/// Exclusion Range Base (MMIO 0020h): ExEn bit 0, Allow bit 1, base 51:12.
pub const EXCLUSION_BASE: Reg64 = Reg64::at(0x0020, BLOCK);
/// Exclusion Range Limit (MMIO 0028h): limit in bits 51:12 (the low 12
/// bits read as ones).
pub const EXCLUSION_LIMIT: Reg64 = Reg64::at(0x0028, BLOCK);
/// Extended Feature Register (MMIO 0030h, read-only; present when the PCI
/// capability header's EFRSup is set). Decoded by [`crate::caps::Caps`].
pub const EXT_FEATURE: Reg64 = Reg64::at(0x0030, BLOCK);
/// Command Buffer Head Pointer (MMIO 2000h): byte offset in bits 18:4.
pub const CMD_BUF_HEAD: Reg64 = Reg64::at(0x2000, BLOCK);
/// Command Buffer Tail Pointer (MMIO 2008h): byte offset in bits 18:4.
pub const CMD_BUF_TAIL: Reg64 = Reg64::at(0x2008, BLOCK);
/// Event Log Head Pointer (MMIO 2010h): byte offset in bits 18:4.
pub const EVENT_LOG_HEAD: Reg64 = Reg64::at(0x2010, BLOCK);
/// Event Log Tail Pointer (MMIO 2018h): byte offset in bits 18:4.
pub const EVENT_LOG_TAIL: Reg64 = Reg64::at(0x2018, BLOCK);
/// IOMMU Status (MMIO 2020h), bits in [`Status`].
pub const STATUS: Reg64 = Reg64::at(0x2020, BLOCK);

/// Every fixed register as (offset, width in bytes), in offset order.
pub const LAYOUT: [(usize, usize); 12] = [
    (DEV_TABLE_BASE.offset(), 8),
    (CMD_BUF_BASE.offset(), 8),
    (EVENT_LOG_BASE.offset(), 8),
    (CONTROL.offset(), 8),
    (EXCLUSION_BASE.offset(), 8),
    (EXCLUSION_LIMIT.offset(), 8),
    (EXT_FEATURE.offset(), 8),
    (CMD_BUF_HEAD.offset(), 8),
    (CMD_BUF_TAIL.offset(), 8),
    (EVENT_LOG_HEAD.offset(), 8),
    (EVENT_LOG_TAIL.offset(), 8),
    (STATUS.offset(), 8),
];

// The fixed registers are in offset order and do not overlap (spec §3.4).
const _: () = portcullis_iommu::mmio::check_layout(&LAYOUT);

/// Physical address field of the base registers (bits 51:12).
pub const BASE_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Device Table Base Address fields (MMIO 0000h).
pub mod dev_table {
    /// Largest `Size` value: 512 pages (2 MiB, 65536 entries).
    pub const MAX_SIZE: u64 = 0x1ff;
    /// The register value for a table at `base` of `pages` 4 KiB pages.
    pub const fn value(base: u64, pages: u64) -> u64 {
        (base & super::BASE_MASK) | ((pages - 1) & MAX_SIZE)
    }
}

/// Command Buffer / Event Log Base Address length field (bits 59:56).
pub mod log_len {
    /// Shift of ComLen / EventLen.
    pub const SHIFT: u32 = 56;
    /// Smallest legal length: 2^8 = 256 entries (4 KiB).
    pub const MIN: u32 = 8;
    /// The register value for a ring at `base` of `2^len` 16-byte entries.
    pub const fn value(base: u64, len: u32) -> u64 {
        (base & super::BASE_MASK) | ((len as u64 & 0xf) << SHIFT)
    }
}

/// Head/tail pointer registers: the byte offset field (bits 18:4).
pub const POINTER_MASK: u64 = 0x7_fff0;

bitflags! {
    /// IOMMU Control register bits (spec §3.4, MMIO 0018h). Only single-bit
    /// enables are flags; InvTimeOut (bits 7:5) is a field, see
    /// [`Control::INV_TIMEOUT_MASK`]. Values read from the unit keep every
    /// bit (`from_bits_retain`); clear bits with `-`/`remove`, never `!`
    /// (which drops the bits not named here).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Control: u64 {
        /// IommuEn: translation and the other enables take effect.
        const IOMMU_EN = 1 << 0;
        /// HtTunEn: HyperTransport tunnel translation.
        const HT_TUN_EN = 1 << 1;
        /// EventLogEn: event logging.
        const EVENT_LOG_EN = 1 << 2;
        /// EventIntEn: interrupt when an event is logged.
        const EVENT_INT_EN = 1 << 3;
        /// ComWaitIntEn: interrupt on COMPLETION_WAIT with I = 1.
        const COM_WAIT_INT_EN = 1 << 4;
        /// PassPW: response pass posted write.
        const PASS_PW = 1 << 8;
        /// ResPassPW.
        const RES_PASS_PW = 1 << 9;
        /// Coherent: device table fetches snoop processor caches.
        const COHERENT = 1 << 10;
        /// Isoc: isochronous traffic.
        const ISOC = 1 << 11;
        /// CmdBufEn: the command processor fetches commands.
        const CMD_BUF_EN = 1 << 12;
        /// PPRLogEn.
        const PPR_LOG_EN = 1 << 13;
        /// PprIntEn.
        const PPR_INT_EN = 1 << 14;
        /// PPREn.
        const PPR_EN = 1 << 15;
        /// GTEn: guest translation.
        const GT_EN = 1 << 16;
        /// GAEn: guest virtual APIC; also selects the 128-bit interrupt
        /// remapping table entry format.
        const GA_EN = 1 << 17;
        /// XTEn: x2APIC interrupt destinations (32-bit ids in the 128-bit
        /// entries).
        const XT_EN = 1 << 50;
    }
}

impl Control {
    /// InvTimeOut (bits 7:5): device IOTLB invalidation time-out field.
    pub const INV_TIMEOUT_MASK: u64 = 7 << 5;
    /// The enables that make the unit walk tables, run commands or log
    /// events: what bring-up and `disable` turn off first.
    pub const RUNNING: Self = Self::IOMMU_EN.union(Self::CMD_BUF_EN).union(Self::EVENT_LOG_EN);
}

bitflags! {
    /// IOMMU Status register bits (spec §3.4, MMIO 2020h).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Status: u64 {
        /// EventOverflow (RW1C): the event log was full; logging stopped.
        const EVENT_OVERFLOW = 1 << 0;
        /// EventLogInt (RW1C): an event was logged with EventIntEn set.
        const EVENT_LOG_INT = 1 << 1;
        /// ComWaitInt (RW1C): a COMPLETION_WAIT with I = 1 completed.
        const COM_WAIT_INT = 1 << 2;
        /// EventLogRun (RO): the event logger is running.
        const EVENT_LOG_RUN = 1 << 3;
        /// CmdBufRun (RO): the command processor is running.
        const CMD_BUF_RUN = 1 << 4;
        /// PprOverflow (RW1C).
        const PPR_OVERFLOW = 1 << 5;
        /// PprInt (RW1C).
        const PPR_INT = 1 << 6;
        /// PprLogRun (RO).
        const PPR_LOG_RUN = 1 << 7;
    }
}

impl Status {
    /// The write-one-to-clear bits the driver acknowledges.
    pub const W1C: Self = Self::EVENT_OVERFLOW
        .union(Self::EVENT_LOG_INT)
        .union(Self::COM_WAIT_INT)
        .union(Self::PPR_OVERFLOW)
        .union(Self::PPR_INT);
}

/// The Control register as read from the unit (every bit kept).
pub fn read_control(m: &(impl Mmio + ?Sized)) -> Control {
    Control::from_bits_retain(m.get64(CONTROL))
}

/// The Status register as read from the unit (every bit kept).
pub fn read_status(m: &(impl Mmio + ?Sized)) -> Status {
    Status::from_bits_retain(m.get64(STATUS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_spec() {
        let offs: [usize; 12] = LAYOUT.map(|r| r.0);
        assert_eq!(offs, [0x0, 0x8, 0x10, 0x18, 0x20, 0x28, 0x30, 0x2000, 0x2008, 0x2010, 0x2018, 0x2020]);
    }

    #[test]
    fn base_register_values() {
        assert_eq!(dev_table::value(0x1234_5000, 1), 0x1234_5000);
        assert_eq!(dev_table::value(0x20_0000, 512), 0x20_01ff);
        assert_eq!(log_len::value(0x8000, 8), 0x0800_0000_0000_8000);
        assert_eq!(log_len::value(0xf_ffff_ffff_f000, 15), 0x0f0f_ffff_ffff_f000);
    }

    #[test]
    fn control_and_status_bits() {
        assert_eq!((Control::RUNNING | Control::COHERENT).bits(), 0x1405);
        assert_eq!(Status::W1C.bits(), 0x67);
        assert_eq!((Status::EVENT_LOG_RUN | Status::CMD_BUF_RUN | Status::PPR_LOG_RUN).bits(), 0x98);
        assert_eq!(Control::INV_TIMEOUT_MASK, 0xe0);
        // Differences keep bits the driver does not name.
        let firmware = Control::from_bits_retain(1 << 40 | 0x1005);
        assert_eq!((firmware - Control::RUNNING).bits(), 1 << 40);
    }
}
