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
    }
}
