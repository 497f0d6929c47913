//! Root and context entries, legacy format (VT-d spec 9.1, 9.3). Each is
//! 128 bits: two `u64`s in a 4 KiB table of 256 entries, indexed by bus
//! (root table) and by device/function (context table).

use core::fmt;

/// A root-table entry: the context table for one bus.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct RootEntry(pub [u64; 2]);

impl RootEntry {
    /// Present, pointing at the context table at `ctp` (4 KiB aligned).
    pub fn new(ctp: u64) -> Self {
        Self([ctp & !0xfff | 1, 0])
    }
    /// Present bit.
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Context table pointer.
    pub fn ctp(self) -> u64 {
        self.0[0] & !0xfff
    }
}

impl fmt::Debug for RootEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.present() { write!(f, "RootEntry(ctp {:#x})", self.ctp()) } else { write!(f, "RootEntry(not present)") }
    }
}

/// Translation type of a legacy context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslationType {
    /// Untranslated requests go through the second-stage table.
    Translate,
    /// Untranslated requests pass through (DMA address = physical).
    PassThrough,
}

/// A context entry: how one device's DMA is translated.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct ContextEntry(pub [u64; 2]);

impl ContextEntry {
    /// Present, translating through the second-stage table at `root` with
    /// `aw` (1 = 39-bit 3-level, 2 = 48-bit 4-level) for domain `did`.
    /// Pass-through needs AW set too (QEMU checks it).
    pub fn new(tt: TranslationType, root: u64, aw: u8, did: u16) -> Self {
        let tt_bits: u64 = match tt {
            TranslationType::Translate => 0,
            TranslationType::PassThrough => 2,
        };
        Self([root & !0xfff | tt_bits << 2 | 1, (aw as u64 & 7) | (did as u64) << 8])
    }
    /// Present bit.
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Second-stage table root.
    pub fn root(self) -> u64 {
        self.0[0] & !0xfff
    }
    /// Domain id.
    pub fn did(self) -> u16 {
        (self.0[1] >> 8) as u16
    }
    /// Address width field.
    pub fn aw(self) -> u8 {
        (self.0[1] & 7) as u8
    }
    /// Translation type.
    pub fn tt(self) -> Option<TranslationType> {
        match (self.0[0] >> 2) & 3 {
            0 => Some(TranslationType::Translate),
            2 => Some(TranslationType::PassThrough),
            _ => None,
        }
    }
}

impl fmt::Debug for ContextEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.present() {
            return write!(f, "ContextEntry(blocked)");
        }
        write!(f, "ContextEntry({:?}, root {:#x}, aw {}, did {})", self.tt(), self.root(), self.aw(), self.did())
    }
}

/// The AW field for a page-table depth (3 or 4 levels).
pub fn aw_for_levels(levels: u32) -> Option<u8> {
    match levels {
        3 => Some(1),
        4 => Some(2),
        5 => Some(3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_follow_the_spec() {
        let r = RootEntry::new(0x1234_5000);
        assert_eq!(r.0, [0x1234_5001, 0]);
        let c = ContextEntry::new(TranslationType::Translate, 0xabc_d000, 2, 7);
        assert_eq!(c.0, [0xabc_d001, 0x702]);
        assert_eq!((c.root(), c.aw(), c.did(), c.tt()), (0xabc_d000, 2, 7, Some(TranslationType::Translate)));
        let p = ContextEntry::new(TranslationType::PassThrough, 0, 1, 1);
        assert_eq!(p.0[0], 0b1001);
        assert!(!ContextEntry::default().present());
    }
}
