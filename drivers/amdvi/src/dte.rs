//! Device table entries (spec §2.2.2): 256 bits per device id, in a table
//! of up to 65536 entries that the unit indexes by requester id.
//!
//! The driver writes three kinds of valid entry (V = 1, TV = 1), never an
//! invalid one: an entry with V = 0 lets the device's DMA pass untranslated
//! (spec Table 7; QEMU does the same), so every device id the unit covers
//! gets at least [`DeviceTableEntry::blocked`] before translation is on.
//!
//! Interrupts: every entry the driver writes has IV = 1. With IntCtl = 00b
//! ([`Interrupts::Blocked`], the default) the device's fixed and
//! arbitrated MSIs are aborted, and with InitPass, EIntPass, NMIPass and
//! Lint0/1Pass clear so are its INIT, ExtInt, NMI and LINT messages: a
//! device can raise no interrupt it was not given. [`Interrupts::Remapped`]
//! (IntCtl = 10b) sends its MSIs through the device's interrupt remapping
//! table (`crate::irte`). (IV = 0 would forward MSIs unchanged, as with the
//! IOMMU off.) SysMgt = 0 and
//! IoCtl = 0 block system-management messages and port I/O, SE = 0 keeps
//! page-fault events, I = 0 keeps device IOTLBs (ATS) off.

use core::fmt;

/// Bits of word 0 (DTE bits 63:0).
pub mod w0 {
    /// V: the entry is valid.
    pub const V: u64 = 1 << 0;
    /// TV: the translation fields (Mode, root, IR, IW) are valid.
    pub const TV: u64 = 1 << 1;
    /// Mode (bits 11:9): page-table levels, 0 = no translation.
    pub const MODE_SHIFT: u32 = 9;
    /// HAD (bits 8:7): host access/dirty update; 11b: the unit sets A and
    /// D in host PTEs (D on a write; needs EFR.HDSup).
    pub const HAD_SHIFT: u32 = 7;
    /// HAD = 11b.
    pub const HAD_DIRTY: u64 = 3 << HAD_SHIFT;
    /// Page-table root pointer (bits 51:12).
    pub const ROOT_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// IR: DMA reads allowed.
    pub const IR: u64 = 1 << 61;
    /// IW: DMA writes allowed.
    pub const IW: u64 = 1 << 62;
}

/// Bits of word 1 (DTE bits 127:64).
pub mod w1 {
    /// DomainID (bits 79:64).
    pub const DOMAIN_MASK: u64 = 0xffff;
    /// I (bit 96): device IOTLB (ATS) enabled.
    pub const IOTLB: u64 = 1 << 32;
    /// SE (bit 97): suppress page-fault events.
    pub const SE: u64 = 1 << 33;
    /// SA (bit 98): suppress all events.
    pub const SA: u64 = 1 << 34;
}

/// Bits of word 2 (DTE bits 191:128).
pub mod w2 {
    /// IV (bit 128): the interrupt remapping fields are valid.
    pub const IV: u64 = 1 << 0;
    /// IntTabLen (bits 132:129): the table holds 2^IntTabLen entries.
    pub const INT_TAB_LEN_SHIFT: u32 = 1;
    /// Interrupt table root pointer (bits 179:134: 64-byte aligned).
    pub const INT_TABLE_MASK: u64 = 0x000f_ffff_ffff_ffc0;
    /// IntCtl (bits 189:188): fixed/arbitrated interrupt handling.
    pub const INT_CTL_SHIFT: u32 = 60;
    /// IntCtl = 10b: remapped through the table.
    pub const INT_CTL_REMAP: u64 = 2 << INT_CTL_SHIFT;
}

/// What an entry does with a device's interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupts {
    /// IV = 1, IntCtl = 00b, no pass bits: every interrupt aborted.
    Blocked,
    /// IV = 1, IntCtl = 10b: MSIs remapped through the `2^len_log2`-entry
    /// table at `table` (64-byte aligned).
    Remapped {
        /// Table address.
        table: u64,
        /// log2 of the number of entries (at most 11).
        len_log2: u8,
    },
}

impl Interrupts {
    /// Word 2 of an entry with these interrupt settings; `None` when the
    /// table is misaligned or too large.
    pub const fn word2(self) -> Option<u64> {
        match self {
            Self::Blocked => Some(w2::IV),
            Self::Remapped { table, len_log2 } => {
                if table & !w2::INT_TABLE_MASK != 0 || len_log2 > 11 {
                    None
                } else {
                    Some(w2::IV | (len_log2 as u64) << w2::INT_TAB_LEN_SHIFT | table | w2::INT_CTL_REMAP)
                }
            }
        }
    }
}

/// Deepest table a DTE can name (Mode 6; 7 is reserved).
pub const MAX_MODE: u32 = 6;

/// What an entry does with a device's DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DteKind {
    /// V = 0: DMA passes untranslated (never written by the driver).
    Invalid,
    /// V = 1, TV = 0: translation fields unset (never written by the driver).
    NoTranslationInfo,
    /// V = 1, TV = 1, Mode = 0, IR = IW = 0: every DMA is refused.
    Blocked,
    /// V = 1, TV = 1, Mode = 0, IR = IW = 1: DMA addresses are physical.
    PassThrough,
    /// V = 1, TV = 1, Mode = `levels`: DMA goes through the table at
    /// `root`, tagged with `domain_id`.
    Translated {
        /// Page-table root (physical).
        root: u64,
        /// Mode: page-table levels.
        levels: u32,
        /// DomainID the IOTLB entries are tagged with.
        domain_id: u16,
    },
    /// Anything else (a valid entry the driver would not write).
    Other,
}

/// One 256-bit device table entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct DeviceTableEntry(pub [u64; 4]);

// Layout: four 64-bit words, 32 bytes (spec §2.2.2.1).
const _: () = assert!(core::mem::size_of::<DeviceTableEntry>() == 32);

impl DeviceTableEntry {
    /// Size of an entry in bytes.
    pub const SIZE: u64 = 32;

    /// Valid, translation valid, Mode 0, no read or write permission: the
    /// device's DMA is blocked, and its interrupts ([`Interrupts::Blocked`]).
    /// Domain id 0.
    pub const fn blocked() -> Self {
        Self([w0::V | w0::TV, 0, w2::IV, 0])
    }

    /// Valid, translation valid, Mode 0, reads and writes allowed: the
    /// device's DMA is untranslated; interrupts blocked. Domain id 0.
    pub const fn pass_through() -> Self {
        Self([w0::V | w0::TV | w0::IR | w0::IW, 0, w2::IV, 0])
    }

    /// The same entry with interrupt settings `interrupts`; `None` when
    /// they cannot be encoded.
    pub const fn with_interrupts(mut self, interrupts: Interrupts) -> Option<Self> {
        match interrupts.word2() {
            Some(w) => {
                self.0[2] = w;
                Some(self)
            }
            None => None,
        }
    }

    /// Translation through the `levels`-level host table at `root`
    /// (4 KiB aligned) in domain `domain_id`. IR and IW are both set: the
    /// page-table entries decide the permissions. `None` when `levels` is
    /// not 1..=6 or `root` is misaligned or beyond 52 bits.
    pub const fn translated(root: u64, levels: u32, domain_id: u16) -> Option<Self> {
        if levels == 0 || levels > MAX_MODE || root & !w0::ROOT_MASK != 0 {
            return None;
        }
        let lo = w0::V | w0::TV | (levels as u64) << w0::MODE_SHIFT | root | w0::IR | w0::IW;
        Some(Self([lo, domain_id as u64, w2::IV, 0]))
    }

    /// The entry with HAD = 11b (host access and dirty updates) when
    /// `on`, 00b otherwise.
    pub const fn with_host_dirty(mut self, on: bool) -> Self {
        self.0[0] = self.0[0] & !w0::HAD_DIRTY | if on { w0::HAD_DIRTY } else { 0 };
        self
    }
    /// Whether HAD = 11b.
    pub const fn host_dirty(self) -> bool {
        self.0[0] & w0::HAD_DIRTY == w0::HAD_DIRTY
    }

    /// V bit.
    pub const fn valid(self) -> bool {
        self.0[0] & w0::V != 0
    }
    /// TV bit.
    pub const fn translation_valid(self) -> bool {
        self.0[0] & w0::TV != 0
    }
    /// Mode field (levels; 0 = untranslated).
    pub const fn mode(self) -> u32 {
        ((self.0[0] >> w0::MODE_SHIFT) & 7) as u32
    }
    /// Page-table root pointer.
    pub const fn root(self) -> u64 {
        self.0[0] & w0::ROOT_MASK
    }
    /// IR bit.
    pub const fn read(self) -> bool {
        self.0[0] & w0::IR != 0
    }
    /// IW bit.
    pub const fn write(self) -> bool {
        self.0[0] & w0::IW != 0
    }
    /// DomainID field.
    pub const fn domain_id(self) -> u16 {
        (self.0[1] & w1::DOMAIN_MASK) as u16
    }
    /// IV bit (interrupt remapping fields valid).
    pub const fn interrupt_remapping(self) -> bool {
        self.0[2] & w2::IV != 0
    }
    /// The interrupt settings, when IV = 1 and they are ones the driver
    /// writes.
    pub const fn interrupts(self) -> Option<Interrupts> {
        let w = self.0[2];
        if w & w2::IV == 0 {
            return None;
        }
        match (w >> w2::INT_CTL_SHIFT) & 3 {
            0 => Some(Interrupts::Blocked),
            2 => Some(Interrupts::Remapped {
                table: w & w2::INT_TABLE_MASK,
                len_log2: ((w >> w2::INT_TAB_LEN_SHIFT) & 0xf) as u8,
            }),
            _ => None,
        }
    }

    /// What the entry does.
    pub const fn kind(self) -> DteKind {
        if !self.valid() {
            return DteKind::Invalid;
        }
        if !self.translation_valid() {
            return DteKind::NoTranslationInfo;
        }
        match (self.mode(), self.read(), self.write()) {
            (0, false, false) => DteKind::Blocked,
            (0, true, true) => DteKind::PassThrough,
            (m @ 1..=MAX_MODE, true, true) => {
                DteKind::Translated { root: self.root(), levels: m, domain_id: self.domain_id() }
            }
            _ => DteKind::Other,
        }
    }

    /// The domain whose IOTLB entries this entry may have produced: its
    /// DomainID when valid (0 for blocked and pass-through entries).
    pub const fn tag(self) -> Option<u16> {
        if self.valid() { Some(self.domain_id()) } else { None }
    }
}

impl fmt::Debug for DeviceTableEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            DteKind::Translated { root, levels, domain_id } => {
                write!(f, "Dte(translated root {root:#x} levels {levels} domain {domain_id})")
            }
            DteKind::Other => write!(f, "Dte({:#x} {:#x} {:#x} {:#x})", self.0[0], self.0[1], self.0[2], self.0[3]),
            k => write!(f, "Dte({k:?})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Word-0 bits QEMU (before its reserved-mask fix) treats as reserved
    /// (an entry with any of them set is an ILLEGAL_DEV_TABLE_ENTRY and the
    /// DMA is refused), word 1's (DomainID bit 8: the unit's domain-id
    /// allocator never hands such ids out) and word 2's; word 3 must be 0.
    const QEMU_RSVD: [u64; 3] = [0x8030_0000_0000_00fc, 0x100, 0x08f0_0000_0000_0000];

    #[test]
    fn encodings() {
        assert_eq!(DeviceTableEntry::blocked().0, [0x3, 0, 1, 0]);
        assert_eq!(DeviceTableEntry::pass_through().0, [0x6000_0000_0000_0003, 0, 1, 0]);
        let t = DeviceTableEntry::translated(0x1234_5000, 4, 7).unwrap();
        assert_eq!(t.0, [0x6000_0000_1234_5803, 7, 1, 0]);
        let r = t.with_interrupts(Interrupts::Remapped { table: 0xabc_d040, len_log2: 6 }).unwrap();
        assert_eq!(r.0[2], 0x2000_0000_0abc_d04d);
        assert_eq!(r.interrupts(), Some(Interrupts::Remapped { table: 0xabc_d040, len_log2: 6 }));
        assert_eq!(t.interrupts(), Some(Interrupts::Blocked));
        assert_eq!(t.with_interrupts(Interrupts::Remapped { table: 0x1020, len_log2: 6 }), None, "misaligned");
        assert_eq!(t.with_interrupts(Interrupts::Remapped { table: 0x1000, len_log2: 12 }), None, "too long");
        assert_eq!(t.kind(), DteKind::Translated { root: 0x1234_5000, levels: 4, domain_id: 7 });
        assert_eq!(DeviceTableEntry::blocked().kind(), DteKind::Blocked);
        assert_eq!(DeviceTableEntry::pass_through().kind(), DteKind::PassThrough);
        assert_eq!(DeviceTableEntry::default().kind(), DteKind::Invalid);
        assert_eq!(DeviceTableEntry::translated(0x1000, 7, 1), None);
        assert_eq!(DeviceTableEntry::translated(0x1000, 0, 1), None);
        assert_eq!(DeviceTableEntry::translated(0x1800, 3, 1), None);
        assert_eq!(DeviceTableEntry::translated(1 << 52, 3, 1), None);
        assert_eq!(format!("{t:?}"), "Dte(translated root 0x12345000 levels 4 domain 7)");
    }

    #[test]
    fn no_reserved_bits_and_interrupts_always_controlled() {
        let top = DeviceTableEntry::translated(0x000f_ffff_ffff_f000, 6, 0xfeff).unwrap();
        let remapped =
            top.with_interrupts(Interrupts::Remapped { table: 0x000f_ffff_ffff_ffc0, len_log2: 11 }).unwrap();
        for e in [DeviceTableEntry::blocked(), DeviceTableEntry::pass_through(), top, remapped] {
            for (w, rsvd) in QEMU_RSVD.iter().enumerate() {
                assert_eq!(e.0[w] & rsvd, 0, "{e:?} word {w}");
            }
            assert_eq!(e.0[3], 0);
            assert!(e.interrupt_remapping(), "IV = 1: interrupts never pass unchecked");
        }
    }
}
