//! Interrupt remapping table entries (spec §2.2.5): the 32-bit format the
//! unit uses without guest virtual APIC (Control.GAEn clear), and the
//! 128-bit one it uses with GAEn set, which x2APIC destinations need
//! (Control.XTEn: 32-bit APIC ids).
//!
//! With a device's DTE at IntCtl = 10b, a fixed or arbitrated MSI from it
//! is looked up in its own table at the index in the MSI data's bits 10:0;
//! the entry decides vector and destination. Tables are per device, so an
//! entry cannot be used by another requester id.

use core::fmt;
use portcullis_iommu::unit::PinMode;

/// One 32-bit interrupt remapping table entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Irte(pub u32);

impl Irte {
    /// RemapEn, fixed delivery, physical destination mode, no EOI hint:
    /// `vector` to the CPU with (8-bit) APIC id `dest`.
    pub const fn remapped(vector: u8, dest: u8) -> Self {
        Self(1 | (dest as u32) << 8 | (vector as u32) << 16)
    }
    /// RemapEn (bit 0).
    pub const fn enabled(self) -> bool {
        self.0 & 1 != 0
    }
    /// Vector (bits 23:16).
    pub const fn vector(self) -> u8 {
        (self.0 >> 16) as u8
    }
    /// Destination APIC id (bits 15:8).
    pub const fn destination(self) -> u8 {
        (self.0 >> 8) as u8
    }
}

impl fmt::Debug for Irte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enabled() {
            write!(f, "Irte(vector {:#x} to {})", self.vector(), self.destination())
        } else {
            write!(f, "Irte(disabled)")
        }
    }
}

/// One 128-bit interrupt remapping table entry (Control.GAEn set) in
/// remapped form (GuestMode clear): word 0 holds RemapEn (bit 0), IntType
/// (4:2), DM (6), GuestMode (7) and destination bits 23:0 (31:8); word 1
/// the vector (7:0) and destination bits 31:24 (63:56).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct IrteGa(pub [u64; 2]);

impl IrteGa {
    /// RemapEn, fixed delivery, physical destination mode, no EOI hint:
    /// `vector` to the CPU with (32-bit) APIC id `dest`.
    pub const fn remapped(vector: u8, dest: u32) -> Self {
        Self([1 | ((dest & 0x00ff_ffff) as u64) << 8, vector as u64 | ((dest >> 24) as u64) << 56])
    }
    /// RemapEn (bit 0).
    pub const fn enabled(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Vector (bits 71:64).
    pub const fn vector(self) -> u8 {
        self.0[1] as u8
    }
    /// Destination APIC id (bits 31:8 and 127:120).
    pub const fn destination(self) -> u32 {
        ((self.0[0] >> 8) & 0x00ff_ffff) as u32 | ((self.0[1] >> 56) as u32) << 24
    }
}

impl fmt::Debug for IrteGa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enabled() {
            write!(f, "IrteGa(vector {:#x} to {:#x})", self.vector(), self.destination())
        } else {
            write!(f, "IrteGa(disabled)")
        }
    }
}

/// The MSI a device raises to use table entry `index` (< 2048): address
/// 0xFEE0_0000 (the table entry picks the destination), data = index
/// (bits 10:8 then read as fixed delivery for indexes below 256).
pub const fn msi_message(index: u16) -> (u64, u32) {
    (0xfee0_0000, (index & 0x7ff) as u32)
}

/// The redirection entry an IOAPIC pin signalling as `pin` must hold to
/// raise entry `index` of its source's table: fixed delivery (so the
/// message data's bits 10:8 are 0) and the index in the vector field (the
/// data's bits 7:0, which the unit reads as the index); physical
/// destination 0, which the entry overrides; mask clear. `None` for an
/// index above 255, which the vector field cannot carry. The EOI of a
/// level-triggered pin must name this vector field (the IOAPIC's EOI
/// register), not the vector the entry delivers.
pub const fn ioapic_rte(index: u16, pin: PinMode) -> Option<u64> {
    if index > 0xff {
        return None;
    }
    Some((pin.level as u64) << 15 | (pin.active_low as u64) << 13 | index as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        let e = Irte::remapped(0x2b, 3);
        assert_eq!(e.0, 0x002b_0301);
        assert!(e.enabled());
        assert_eq!((e.vector(), e.destination()), (0x2b, 3));
        assert!(!Irte::default().enabled());
        assert_eq!(msi_message(5), (0xfee0_0000, 5));
        assert_eq!(format!("{e:?}"), "Irte(vector 0x2b to 3)");
    }

    #[test]
    fn encoding_128_bit() {
        let e = IrteGa::remapped(0x2b, 0x1234_5678);
        assert_eq!(e.0, [1 | 0x34_5678 << 8, 0x2b | 0x12 << 56]);
        assert!(e.enabled());
        assert_eq!((e.vector(), e.destination()), (0x2b, 0x1234_5678));
        assert_eq!(IrteGa::remapped(0x30, 3).0, [0x301, 0x30], "an 8-bit id in the low destination field");
        assert!(!IrteGa::default().enabled());
        assert_eq!(format!("{e:?}"), "IrteGa(vector 0x2b to 0x12345678)");
    }

    /// The IOAPIC's message carries the vector field in data bits 7:0 and
    /// the delivery mode in 10:8: with fixed delivery the data is the
    /// index, as for an MSI of the same entry.
    #[test]
    fn ioapic_entries_carry_the_index_as_the_msi_data_does() {
        let data = |rte: u64| (rte & 0xff) as u32 | (((rte >> 8) & 7) as u32) << 8;
        for index in [0u16, 5, 63, 255] {
            let rte = ioapic_rte(index, PinMode::EDGE_HIGH).unwrap();
            assert_eq!(data(rte), msi_message(index).1, "index {index}");
            assert_eq!(rte >> 16, 0, "unmasked, destination 0");
        }
        assert_eq!(ioapic_rte(7, PinMode::LEVEL_LOW), Some(1 << 15 | 1 << 13 | 7));
        assert_eq!(ioapic_rte(256, PinMode::EDGE_HIGH), None);
    }
}
