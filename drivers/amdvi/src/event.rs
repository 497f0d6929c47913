//! Event log entries (spec §2.5): 128 bits each, written by the unit at
//! its tail; software reads from the head and advances it.
//!
//! Layout (as four 32-bit dwords): dword 0 bits 15:0 the device id (bits
//! 19:16 `PASID[19:16]` for some codes), dword 1 bits 31:28 the event code,
//! 27:16 flags, 15:0 the domain id (or `PASID[15:0]`); dwords 2-3 an
//! address.

use core::fmt;

/// ILLEGAL_DEV_TABLE_ENTRY.
pub const ILLEGAL_DEV_TABLE_ENTRY: u8 = 0x1;
/// IO_PAGE_FAULT.
pub const IO_PAGE_FAULT: u8 = 0x2;
/// DEV_TAB_HARDWARE_ERROR.
pub const DEV_TAB_HARDWARE_ERROR: u8 = 0x3;
/// PAGE_TAB_HARDWARE_ERROR.
pub const PAGE_TAB_HARDWARE_ERROR: u8 = 0x4;
/// ILLEGAL_COMMAND_ERROR.
pub const ILLEGAL_COMMAND_ERROR: u8 = 0x5;
/// COMMAND_HARDWARE_ERROR.
pub const COMMAND_HARDWARE_ERROR: u8 = 0x6;
/// IOTLB_INV_TIMEOUT.
pub const IOTLB_INV_TIMEOUT: u8 = 0x7;
/// INVALID_DEVICE_REQUEST.
pub const INVALID_DEVICE_REQUEST: u8 = 0x8;
/// INVALID_PPR_REQUEST.
pub const INVALID_PPR_REQUEST: u8 = 0x9;

/// Flags of IO_PAGE_FAULT and ILLEGAL_DEV_TABLE_ENTRY (the 12-bit field).
pub mod flags {
    /// GN: the address is a guest virtual address (PASID valid).
    pub const GN: u16 = 1 << 0;
    /// NX: an instruction fetch.
    pub const NX: u16 = 1 << 1;
    /// US: a user-mode access.
    pub const US: u16 = 1 << 2;
    /// I: an interrupt request (else a memory access).
    pub const I: u16 = 1 << 3;
    /// PR: the page (or entry) was present.
    pub const PR: u16 = 1 << 4;
    /// RW: a write (else a read).
    pub const RW: u16 = 1 << 5;
    /// PE: a permission violation.
    pub const PE: u16 = 1 << 6;
    /// RZ: reserved bits were not zero.
    pub const RZ: u16 = 1 << 7;
    /// TR: a translation request (else a transaction).
    pub const TR: u16 = 1 << 8;
}

/// One event, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A DMA through a translating entry faulted.
    IoPageFault {
        /// Requester id (bus << 8 | device << 3 | function).
        device_id: u16,
        /// DomainID of the entry (`PASID[15:0]` when GN is set).
        domain_id: u16,
        /// The DMA address.
        address: u64,
        /// [`flags`] bits.
        flags: u16,
    },
    /// The device's table entry has reserved bits set or is inconsistent.
    IllegalDevTableEntry {
        /// Requester id.
        device_id: u16,
        /// The DMA address.
        address: u64,
        /// [`flags`] bits.
        flags: u16,
    },
    /// The unit could not execute a command.
    IllegalCommand {
        /// Physical address of the command.
        address: u64,
    },
    /// Any other code, with its raw words.
    Other {
        /// Event code.
        code: u8,
        /// The entry as written.
        raw: [u64; 2],
    },
}

impl Event {
    /// Decodes an entry; `None` for an entry whose code is 0 (not written
    /// yet: the unit may advance its tail before the entry lands).
    pub fn decode(raw: [u64; 2]) -> Option<Self> {
        let [lo, address] = raw;
        let code = (lo >> 60) as u8;
        let device_id = lo as u16;
        let flags = ((lo >> 48) & 0xfff) as u16;
        let domain_id = (lo >> 32) as u16;
        Some(match code {
            0 => return None,
            IO_PAGE_FAULT => Self::IoPageFault { device_id, domain_id, address, flags },
            ILLEGAL_DEV_TABLE_ENTRY => Self::IllegalDevTableEntry { device_id, address, flags },
            ILLEGAL_COMMAND_ERROR => Self::IllegalCommand { address },
            code => Self::Other { code, raw },
        })
    }

    /// Encodes an event the way the unit writes it (for models and tests).
    pub fn encode(code: u8, device_id: u16, domain_id: u16, flags: u16, address: u64) -> [u64; 2] {
        [(code as u64) << 60 | ((flags & 0xfff) as u64) << 48 | (domain_id as u64) << 32 | device_id as u64, address]
    }

    /// The event code.
    pub fn code(&self) -> u8 {
        match self {
            Self::IoPageFault { .. } => IO_PAGE_FAULT,
            Self::IllegalDevTableEntry { .. } => ILLEGAL_DEV_TABLE_ENTRY,
            Self::IllegalCommand { .. } => ILLEGAL_COMMAND_ERROR,
            Self::Other { code, .. } => *code,
        }
    }

    /// For a fault: whether the access was a write.
    pub fn is_write(&self) -> Option<bool> {
        match self {
            Self::IoPageFault { flags: f, .. } | Self::IllegalDevTableEntry { flags: f, .. } => {
                Some(f & flags::RW != 0)
            }
            _ => None,
        }
    }
}

/// Name of an event code.
pub fn code_name(code: u8) -> &'static str {
    match code {
        ILLEGAL_DEV_TABLE_ENTRY => "ILLEGAL_DEV_TABLE_ENTRY",
        IO_PAGE_FAULT => "IO_PAGE_FAULT",
        DEV_TAB_HARDWARE_ERROR => "DEV_TAB_HARDWARE_ERROR",
        PAGE_TAB_HARDWARE_ERROR => "PAGE_TAB_HARDWARE_ERROR",
        ILLEGAL_COMMAND_ERROR => "ILLEGAL_COMMAND_ERROR",
        COMMAND_HARDWARE_ERROR => "COMMAND_HARDWARE_ERROR",
        IOTLB_INV_TIMEOUT => "IOTLB_INV_TIMEOUT",
        INVALID_DEVICE_REQUEST => "INVALID_DEVICE_REQUEST",
        INVALID_PPR_REQUEST => "INVALID_PPR_REQUEST",
        _ => "unknown event",
    }
}

fn bdf(f: &mut fmt::Formatter<'_>, id: u16) -> fmt::Result {
    write!(f, "{:02x}:{:02x}.{}", id >> 8, (id >> 3) & 0x1f, id & 7)
}

fn flag_list(f: &mut fmt::Formatter<'_>, fl: u16) -> fmt::Result {
    const NAMES: [(u16, &str); 8] = [
        (flags::GN, "GN"),
        (flags::NX, "NX"),
        (flags::US, "US"),
        (flags::I, "I"),
        (flags::PR, "PR"),
        (flags::PE, "PE"),
        (flags::RZ, "RZ"),
        (flags::TR, "TR"),
    ];
    for (b, n) in NAMES {
        if fl & b != 0 {
            write!(f, " {n}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::IoPageFault { device_id, domain_id, address, flags: fl } => {
                write!(f, "IO_PAGE_FAULT: DMA {} from ", if fl & flags::RW != 0 { "write" } else { "read" })?;
                bdf(f, device_id)?;
                write!(f, " domain {domain_id} at {address:#x}")?;
                flag_list(f, fl)
            }
            Self::IllegalDevTableEntry { device_id, address, flags: fl } => {
                write!(f, "ILLEGAL_DEV_TABLE_ENTRY: ")?;
                bdf(f, device_id)?;
                write!(f, " at {address:#x}")?;
                flag_list(f, fl)
            }
            Self::IllegalCommand { address } => write!(f, "ILLEGAL_COMMAND_ERROR: command at {address:#x}"),
            Self::Other { code, raw } => write!(f, "{} ({code:#x}): {:#x} {:#x}", code_name(code), raw[0], raw[1]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_page_fault() {
        let raw = Event::encode(IO_PAGE_FAULT, 0x0018, 3, flags::RW | flags::PE | flags::PR, 0x1234_5000);
        assert_eq!(raw, [0x2070_0003_0000_0018, 0x1234_5000]);
        let e = Event::decode(raw).unwrap();
        assert_eq!(e, Event::IoPageFault { device_id: 0x18, domain_id: 3, address: 0x1234_5000, flags: 0x70 });
        assert_eq!(e.is_write(), Some(true));
        assert_eq!(e.to_string(), "IO_PAGE_FAULT: DMA write from 00:03.0 domain 3 at 0x12345000 PR PE");
    }

    #[test]
    fn other_codes_and_unwritten_entries() {
        assert_eq!(Event::decode([0, 0]), None);
        let e = Event::decode(Event::encode(ILLEGAL_DEV_TABLE_ENTRY, 0x100, 0, flags::I, 0xfee0_0000)).unwrap();
        assert_eq!(e, Event::IllegalDevTableEntry { device_id: 0x100, address: 0xfee0_0000, flags: flags::I });
        assert_eq!(e.to_string(), "ILLEGAL_DEV_TABLE_ENTRY: 01:00.0 at 0xfee00000 I");
        let c = Event::decode(Event::encode(ILLEGAL_COMMAND_ERROR, 0, 0, 0, 0x8010)).unwrap();
        assert_eq!(c, Event::IllegalCommand { address: 0x8010 });
        let o = Event::decode(Event::encode(IOTLB_INV_TIMEOUT, 8, 0, 0, 0)).unwrap();
        assert_eq!(o.code(), IOTLB_INV_TIMEOUT);
        assert!(o.to_string().starts_with("IOTLB_INV_TIMEOUT (0x7)"));
    }
}
