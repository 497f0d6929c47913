//! Interrupt remapping (VT-d spec chapter 5 and 9.10): the interrupt
//! remapping table entry (IRTE) and the remappable MSI format.
//!
//! With remapping on, a device's MSI no longer names a CPU and vector: its
//! address carries a *handle*, an index into the table, and the entry says
//! where the interrupt goes, and which requester id may use it (source-id
//! verification). An MSI whose entry is absent, or sent by another device,
//! is blocked and recorded as a fault. Interrupts in the old compatibility
//! format are blocked too (GCMD.CFI stays clear).

use core::fmt;
use portcullis_iommu::unit::PinMode;

/// One interrupt remapping table entry, 128 bits.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Irte(pub [u64; 2]);

/// Entries per 4 KiB table page.
pub const IRTES_PER_PAGE: usize = 256;

/// Most entries a table can hold: 2^(IRTA.S + 1) with S at most 15, 65536
/// entries of 16 bytes (1 MiB, 256 contiguous pages). The handle in the
/// remappable MSI address has 16 bits, so all of them can be used.
pub const MAX_IRTES: usize = 1 << 16;

/// IRTA.S for a table of `entries` (a power of two from 2 to
/// [`MAX_IRTES`]): the table holds 2^(S + 1) entries.
pub const fn irta_size(entries: usize) -> u8 {
    (entries.trailing_zeros() - 1) as u8
}

impl Irte {
    /// Present, fixed delivery, edge-triggered, physical destination:
    /// `vector` to the CPU with APIC id `dest` (xAPIC ids in bits 47:40,
    /// x2APIC ids in bits 63:32), accepted only from requester id `sid`
    /// (SVT = 01b, SQ = 00b: all 16 bits compared).
    pub fn remapped(vector: u8, dest: u32, x2apic: bool, sid: u16) -> Self {
        let dst = if x2apic { (dest as u64) << 32 } else { ((dest & 0xff) as u64) << 40 };
        Self([1 | (vector as u64) << 16 | dst, sid as u64 | 1 << 18])
    }
    /// The same entry, level-triggered (TM, bit 4) when `level`: the CPU's
    /// EOI of its vector then reaches the IOAPIC pin that raised it.
    pub fn with_level(self, level: bool) -> Self {
        Self([self.0[0] & !(1 << 4) | (level as u64) << 4, self.0[1]])
    }
    /// Trigger mode (TM, bit 4): level.
    pub fn level(self) -> bool {
        self.0[0] >> 4 & 1 != 0
    }
    /// The entry is present (P).
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Vector (bits 23:16).
    pub fn vector(self) -> u8 {
        (self.0[0] >> 16) as u8
    }
    /// Destination field (bits 63:32).
    pub fn destination(self) -> u32 {
        (self.0[0] >> 32) as u32
    }
    /// Source id to verify (bits 79:64).
    pub fn sid(self) -> u16 {
        self.0[1] as u16
    }
    /// Source validation type (bits 83:82).
    pub fn svt(self) -> u8 {
        ((self.0[1] >> 18) & 3) as u8
    }
}

impl fmt::Debug for Irte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.present() {
            return write!(f, "Irte(not present)");
        }
        write!(
            f,
            "Irte(vector {:#x} to {:#x}, sid {:#06x} svt {})",
            self.vector(),
            self.destination(),
            self.sid(),
            self.svt()
        )
    }
}

/// The MSI address a device must use to raise the interrupt of table
/// entry `handle` (remappable format, spec 5.1.5.2): 0xFEE in bits 31:20,
/// handle bits 14:0 in 19:5, interrupt format (1) in bit 4, no subhandle
/// (SHV = 0, bit 3), handle bit 15 in bit 2. The MSI data is then 0.
pub fn msi_address(handle: u16) -> u64 {
    0xfee0_0000 | ((handle as u64) & 0x7fff) << 5 | 1 << 4 | ((handle as u64) >> 15) << 2
}

/// The redirection entry an IOAPIC pin signalling as `pin` must hold to
/// raise table entry `handle` (remappable format, spec 5.1.5.1): handle
/// bits 14:0 in 63:49, interrupt format (1) in 48, mask (16) clear,
/// trigger mode in 15, polarity in 13, handle bit 15 in 11, bits 10:8
/// zero, and the entry's vector in 7:0 (what the EOI broadcast of a
/// level-triggered pin is matched against). The IOAPIC turns it into a
/// message with the remappable address [`msi_address`] gives and data 0
/// but for the vector and trigger bits, which the unit ignores.
pub fn ioapic_rte(handle: u16, vector: u8, pin: PinMode) -> u64 {
    let handle = handle as u64;
    (handle & 0x7fff) << 49
        | 1 << 48
        | (pin.level as u64) << 15
        | (pin.active_low as u64) << 13
        | (handle >> 15) << 11
        | vector as u64
}

/// The IRTA value for a table at `table` with `2^(s + 1)` entries.
pub fn irta(table: u64, s: u8, x2apic: bool) -> u64 {
    table & !0xfff | (x2apic as u64) << 11 | (s as u64 & 0xf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_and_msi_encodings() {
        let e = Irte::remapped(0x29, 3, false, 0x0008);
        assert_eq!(e.0, [1 | 0x29 << 16 | 3 << 40, 0x0008 | 1 << 18]);
        assert!(e.present());
        assert_eq!((e.vector(), e.sid(), e.svt()), (0x29, 8, 1));
        assert_eq!(Irte::remapped(0x30, 0x1234, true, 0x100).destination(), 0x1234);
        assert!(!Irte::default().present());
        assert_eq!(msi_address(5), 0xfee0_00b0);
        assert_eq!(msi_address(0x8001), 0xfee0_0034);
        assert_eq!(irta(0x12_3000, 7, false), 0x12_3007);
        assert_eq!(irta(0x12_3000, 7, true), 0x12_3807);
        assert_eq!((irta_size(IRTES_PER_PAGE), irta_size(MAX_IRTES)), (7, 15));
        assert_eq!(irta(0x40_0000, irta_size(MAX_IRTES), false), 0x40_000f);
        assert_eq!(format!("{e:?}"), "Irte(vector 0x29 to 0x300, sid 0x0008 svt 1)");
        assert!(!e.level());
        assert_eq!(e.with_level(true).0, [1 | 1 << 4 | 0x29 << 16 | 3 << 40, 0x0008 | 1 << 18]);
        assert!(e.with_level(true).level());
        assert_eq!(e.with_level(true).with_level(false), e);
    }

    /// The IOAPIC copies RTE bits 63:48 into message address bits 19:4
    /// and bit 11 into address bit 2 (how QEMU's IOAPIC and the spec's
    /// figure 5-10 line up): the address is then `msi_address(handle)`.
    #[test]
    fn ioapic_entries_name_the_handle_as_the_msi_address_does() {
        let message = |rte: u64| 0xfee0_0000 | ((rte >> 48) & 0xffff) << 4 | ((rte >> 11) & 1) << 2;
        for handle in [0u16, 1, 5, 0x7fff, 0x8000, 0xffff] {
            let rte = ioapic_rte(handle, 0x31, PinMode::EDGE_HIGH);
            assert_eq!(message(rte), msi_address(handle), "handle {handle:#x}");
            assert_eq!(rte & 0x1_f7ff, 0x31, "unmasked, edge, active high, fixed, vector");
        }
        assert_eq!(ioapic_rte(5, 0x31, PinMode::EDGE_HIGH), 5 << 49 | 1 << 48 | 0x31);
        assert_eq!(
            ioapic_rte(0x8001, 0x40, PinMode::LEVEL_LOW),
            1 << 49 | 1 << 48 | 1 << 15 | 1 << 13 | 1 << 11 | 0x40
        );
    }
}
