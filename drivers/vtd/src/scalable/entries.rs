//! Scalable-mode entry encodings (VT-d spec rev 4.x, chapter 9): the bit
//! layouts of root (9.2), context (9.4), PASID-directory (9.5) and
//! PASID-table (9.6) entries, built and decoded as plain values. Nothing
//! here touches memory; [`super::tables`] places the entries.

use core::fmt;

/// The PASID used for requests without PASID (RID_PASID = 0).
pub const RID_PASID: u32 = 0;

/// PDTS for a one-page PASID directory: `2^(PDTS + 7)` = 512 entries,
/// PASIDs 0..32768 (spec 9.4).
pub const PDTS_ONE_PAGE: u8 = 2;

/// RTADDR.TTM = 01b: scalable-mode root and context tables (spec 11.4.6).
pub const RTADDR_TTM_SCALABLE: u64 = 1 << 10;

const ADDR_MASK: u64 = !0xfff;

fn opt_addr(present: bool, word: u64) -> Option<u64> {
    present.then_some(word & ADDR_MASK)
}

// ---------------------------------------------------------------------------
// Root entry (9.2)
// ---------------------------------------------------------------------------

/// A scalable-mode root entry (spec 9.2): one per bus, 128 bits.
///
/// * bit 0: LP, lower context table present; bits 11:1 reserved;
///   bits 63:12: LCTP, lower context table (devfn 0-127);
/// * bit 64: UP, upper context table present; bits 75:65 reserved;
///   bits 127:76: UCTP, upper context table (devfn 128-255).
///
/// The halves are separate 64-bit words, so each can be made present with
/// one store while the other is live.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct ScalableRootEntry(pub [u64; 2]);

impl ScalableRootEntry {
    /// Which half (0 lower, 1 upper) serves `devfn`.
    pub fn half_for(devfn: u8) -> usize {
        (devfn >> 7) as usize
    }
    /// The word for one half, present, pointing at `ctp` (4 KiB aligned).
    pub fn half_word(ctp: u64) -> u64 {
        ctp & ADDR_MASK | 1
    }
    /// The entry with the lower half present at `ctp`.
    pub fn with_lower(mut self, ctp: u64) -> Self {
        self.0[0] = Self::half_word(ctp);
        self
    }
    /// The entry with the upper half present at `ctp`.
    pub fn with_upper(mut self, ctp: u64) -> Self {
        self.0[1] = Self::half_word(ctp);
        self
    }
    /// Lower context table (devfn 0-127), if present.
    pub fn lower(self) -> Option<u64> {
        opt_addr(self.0[0] & 1 != 0, self.0[0])
    }
    /// Upper context table (devfn 128-255), if present.
    pub fn upper(self) -> Option<u64> {
        opt_addr(self.0[1] & 1 != 0, self.0[1])
    }
    /// The context table serving `devfn`, if present.
    pub fn table_for(self, devfn: u8) -> Option<u64> {
        if Self::half_for(devfn) == 0 { self.lower() } else { self.upper() }
    }
}

impl fmt::Debug for ScalableRootEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SmRootEntry(lower ")?;
        match self.lower() {
            Some(t) => write!(f, "{t:#x}")?,
            None => write!(f, "-")?,
        }
        write!(f, ", upper ")?;
        match self.upper() {
            Some(t) => write!(f, "{t:#x})"),
            None => write!(f, "-)"),
        }
    }
}

// ---------------------------------------------------------------------------
// Context entry (9.4)
// ---------------------------------------------------------------------------

/// A scalable-mode context entry (spec 9.4): 256 bits, 128 per page.
///
/// * bit 0 P; bit 1 FPD (fault processing disable); bit 2 DTE (Device-TLB
///   enable); bit 3 PASIDE (requests with PASID allowed); bit 4 PRE (page
///   requests allowed); bits 8:5 reserved; bits 11:9 PDTS (directory has
///   `2^(PDTS + 7)` entries); bits 63:12 PASIDDIRPTR;
/// * bits 83:64 RID_PASID; bit 84 RID_PRIV; bits 127:85 reserved;
/// * bits 255:128 reserved.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct ScalableContextEntry(pub [u64; 4]);

impl ScalableContextEntry {
    /// Present, pointing at the PASID directory `dir` of `2^(pdts + 7)`
    /// entries; faults reported, no Device-TLB, no requests with PASID,
    /// no page requests, RID_PASID = 0.
    pub fn new(dir: u64, pdts: u8) -> Self {
        Self([dir & ADDR_MASK | ((pdts as u64) & 7) << 9 | 1, 0, 0, 0])
    }
    /// The entry with PASIDE (bit 3) set: requests with a PASID are
    /// translated through the PASID directory too (blocked at the context
    /// entry otherwise).
    pub fn with_paside(mut self) -> Self {
        self.0[0] |= 1 << 3;
        self
    }
    /// Present bit.
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Fault processing disable.
    pub fn fpd(self) -> bool {
        self.0[0] >> 1 & 1 != 0
    }
    /// Device-TLB enable.
    pub fn dte(self) -> bool {
        self.0[0] >> 2 & 1 != 0
    }
    /// PASID enable (requests with PASID).
    pub fn paside(self) -> bool {
        self.0[0] >> 3 & 1 != 0
    }
    /// Page request enable.
    pub fn pre(self) -> bool {
        self.0[0] >> 4 & 1 != 0
    }
    /// PASID directory size field.
    pub fn pdts(self) -> u8 {
        (self.0[0] >> 9 & 7) as u8
    }
    /// Entries in the PASID directory.
    pub fn dir_entries(self) -> u32 {
        1 << (self.pdts() + 7)
    }
    /// PASID directory pointer.
    pub fn pasid_dir(self) -> u64 {
        self.0[0] & ADDR_MASK
    }
    /// RID_PASID: the PASID used for requests without PASID.
    pub fn rid_pasid(self) -> u32 {
        (self.0[1] & 0xf_ffff) as u32
    }
}

impl fmt::Debug for ScalableContextEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.present() {
            return write!(f, "SmContextEntry(not present)");
        }
        write!(
            f,
            "SmContextEntry(dir {:#x}, {} entries, rid_pasid {}",
            self.pasid_dir(),
            self.dir_entries(),
            self.rid_pasid()
        )?;
        for (on, name) in [(self.fpd(), "FPD"), (self.dte(), "DTE"), (self.paside(), "PASIDE"), (self.pre(), "PRE")] {
            if on {
                write!(f, " {name}")?;
            }
        }
        write!(f, ")")
    }
}

// ---------------------------------------------------------------------------
// PASID directory entry (9.5)
// ---------------------------------------------------------------------------

/// A scalable-mode PASID directory entry (spec 9.5): 64 bits, 512 per
/// page; bit 0 P, bit 1 FPD, bits 11:2 reserved, bits 63:12 the PASID
/// table (64 PASIDs).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PasidDirEntry(pub u64);

impl PasidDirEntry {
    /// Present, pointing at the PASID table `table`, faults reported.
    pub fn new(table: u64) -> Self {
        Self(table & ADDR_MASK | 1)
    }
    /// Present bit.
    pub fn present(self) -> bool {
        self.0 & 1 != 0
    }
    /// Fault processing disable.
    pub fn fpd(self) -> bool {
        self.0 >> 1 & 1 != 0
    }
    /// PASID table pointer.
    pub fn table(self) -> u64 {
        self.0 & ADDR_MASK
    }
}

impl fmt::Debug for PasidDirEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.present() {
            write!(f, "PasidDirEntry(table {:#x}{})", self.table(), if self.fpd() { " FPD" } else { "" })
        } else {
            write!(f, "PasidDirEntry(not present)")
        }
    }
}

// ---------------------------------------------------------------------------
// PASID table entry (9.6)
// ---------------------------------------------------------------------------

/// PASID granular translation type (PGTT, bits 8:6 of a PASID-table entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pgtt {
    /// 001b: first-stage translation only.
    FirstStage,
    /// 010b: second-stage translation only.
    SecondStage,
    /// 011b: nested (first stage, then second stage).
    Nested,
    /// 100b: pass-through (no translation).
    PassThrough,
}

impl Pgtt {
    /// The 3-bit field value.
    pub fn bits(self) -> u64 {
        match self {
            Self::FirstStage => 1,
            Self::SecondStage => 2,
            Self::Nested => 3,
            Self::PassThrough => 4,
        }
    }
    /// Decodes the field; `None` for reserved encodings.
    pub fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            1 => Some(Self::FirstStage),
            2 => Some(Self::SecondStage),
            3 => Some(Self::Nested),
            4 => Some(Self::PassThrough),
            _ => None,
        }
    }
}

/// Snoop controls of a PASID-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snoop {
    /// PWSNP (bit 87): page-walk accesses snoop. Only meaningful when
    /// ECAP.SMPWC = 1 (QEMU leaves SMPWC clear).
    pub page_walk: bool,
    /// PGSNP (bit 88): every access through this entry snoops. Reserved
    /// unless ECAP.SC = 1.
    pub page: bool,
}

/// The first-stage half of a nested PASID entry (PGTT 011b): a table the
/// caller (a guest's vIOMMU driver) owns, in guest-physical addresses that
/// the second stage translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FirstStageTable {
    /// FSPTPTR: the first-stage table (bits 11:0 are not part of the
    /// field and are dropped).
    pub table: u64,
    /// Paging levels: 4 (FSPM = 00b) or 5 (FSPM = 01b).
    pub levels: u32,
    /// SRE: requests with supervisor privilege are translated.
    pub sre: bool,
    /// WPE: supervisor writes honour read-only first-stage entries. The
    /// field only matters for supervisor requests: without `sre` it is
    /// left clear.
    pub wpe: bool,
    /// EAFE: the unit sets the extended accessed flag (bit 10) in the
    /// first-stage entries it uses.
    pub eafe: bool,
}

/// A scalable-mode PASID-table entry (spec 9.6): 512 bits, 64 per page.
///
/// Word 0 (bits 63:0): bit 0 P; bit 1 FPD; bits 4:2 AW (second-stage
/// width: 1 = 39-bit 3-level, 2 = 48-bit 4-level, 3 = 57-bit 5-level);
/// bit 5 SSEE (second-stage execute enable); bits 8:6 PGTT; bit 9 SSADE
/// (second-stage accessed/dirty enable); bits 11:10 reserved; bits 63:12
/// SSPTPTR (second-stage table).
///
/// Word 1 (bits 127:64): bits 79:64 DID; bit 87 PWSNP; bit 88 PGSNP;
/// bits 89-127 memory-type controls (CD, EMTE, EMT, PWT, PCD, PAT), zero
/// here.
///
/// Word 2 (bits 191:128): bit 128 SRE (supervisor requests); bits 131:130
/// FSPM (first-stage paging mode: 00b 4-level, 01b 5-level); bit 132 WPE
/// (write protect); bit 133 NXE (execute disable bit honoured); bit 134
/// SMEP; bit 135 EAFE; bits 191:140 FSPTPTR (first-stage table).
///
/// Words 3-7: zero here (fields for nested translation and reserved bits).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PasidEntry(pub [u64; 8]);

impl PasidEntry {
    fn with_common(pgtt: Pgtt, aw: u8, did: u16, snoop: Snoop) -> Self {
        let mut e = Self::default();
        e.0[0] = 1 | ((aw as u64) & 7) << 2 | pgtt.bits() << 6;
        e.0[1] = did as u64 | (snoop.page_walk as u64) << 23 | (snoop.page as u64) << 24;
        e
    }

    /// Present, second stage only (PGTT 010b) through the table at `root`
    /// with address width `aw` (1 = 3-level, 2 = 4-level, 3 = 5-level; it
    /// must be a SAGAW width of the unit), domain `did`. SSEE and SSADE
    /// off; faults reported. `None` when `aw` is not 1-3.
    pub fn second_stage(root: u64, aw: u8, did: u16, snoop: Snoop) -> Option<Self> {
        if !(1..=3).contains(&aw) {
            return None;
        }
        let mut e = Self::with_common(Pgtt::SecondStage, aw, did, snoop);
        e.0[0] |= root & ADDR_MASK;
        Some(e)
    }

    /// Present, first stage only (PGTT 001b) through the x86 page table at
    /// `root` of `levels` (4: FSPM = 00b, 5: FSPM = 01b), domain `did`.
    /// SRE, WPE, NXE, SMEP and EAFE off, so the table's leaves need the U/S
    /// bit and no XD (see [`Self::with_execute_disable`]). AW is set to the
    /// matching width (2 or 3) too: the spec takes the first-stage width
    /// from FSPM, but QEMU 10.0 range-checks first-stage input addresses
    /// against AW, and Linux fills it the same way. `None` when `levels` is
    /// not 4 or 5.
    pub fn first_stage(root: u64, levels: u32, did: u16, snoop: Snoop) -> Option<Self> {
        let fspm = match levels {
            4 => 0,
            5 => 1,
            _ => return None,
        };
        let mut e = Self::with_common(Pgtt::FirstStage, levels as u8 - 2, did, snoop);
        e.0[2] = root & ADDR_MASK | fspm << 2;
        Some(e)
    }

    /// Present, nested (PGTT 011b): requests go through the first-stage
    /// table `fs` (FSPTPTR, FSPM, SRE, WPE, EAFE from it), whose output
    /// addresses then go through the second-stage table at `ss_root` of
    /// width `aw` (SSPTPTR, AW: 1 = 3-level, 2 = 4-level, 3 = 5-level), all
    /// cached under domain `did`. Faults reported; SSEE and SSADE off (see
    /// [`Self::with_ssade`]). `None` when `aw` is not 1-3 or `fs.levels`
    /// not 4 or 5.
    pub fn nested(fs: FirstStageTable, ss_root: u64, aw: u8, did: u16, snoop: Snoop) -> Option<Self> {
        let fspm = match fs.levels {
            4 => 0,
            5 => 1,
            _ => return None,
        };
        if !(1..=3).contains(&aw) {
            return None;
        }
        let mut e = Self::with_common(Pgtt::Nested, aw, did, snoop);
        e.0[0] |= ss_root & ADDR_MASK;
        e.0[2] =
            fs.table & ADDR_MASK | fs.sre as u64 | fspm << 2 | ((fs.sre && fs.wpe) as u64) << 4 | (fs.eafe as u64) << 7;
        Some(e)
    }

    /// Present, pass-through (PGTT 100b) for domain `did`. The spec ignores
    /// AW for pass-through; it is filled with `aw` anyway (as Linux does).
    pub fn pass_through(did: u16, aw: u8) -> Self {
        Self::with_common(Pgtt::PassThrough, aw, did, Snoop::default())
    }

    /// Sets or clears SSADE (bit 9, second-stage accessed/dirty enable,
    /// needs ECAP.SSADS): with it the unit sets A (bit 8) and D (bit 9) in
    /// the second-stage leaves it uses, D on a write.
    pub fn with_ssade(mut self, on: bool) -> Self {
        self.0[0] = self.0[0] & !(1 << 9) | (on as u64) << 9;
        self
    }

    /// Sets NXE (bit 133), needed before first-stage leaves may carry XD
    /// (bit 63 is reserved in them otherwise).
    pub fn with_execute_disable(mut self) -> Self {
        self.0[2] |= 1 << 5;
        self
    }

    /// Present bit.
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Fault processing disable.
    pub fn fpd(self) -> bool {
        self.0[0] >> 1 & 1 != 0
    }
    /// AW field.
    pub fn aw(self) -> u8 {
        (self.0[0] >> 2 & 7) as u8
    }
    /// Second-stage levels implied by AW (AW + 2).
    pub fn ss_levels(self) -> u32 {
        self.aw() as u32 + 2
    }
    /// Second-stage execute enable.
    pub fn ssee(self) -> bool {
        self.0[0] >> 5 & 1 != 0
    }
    /// Translation type, `None` for a reserved encoding.
    pub fn pgtt(self) -> Option<Pgtt> {
        Pgtt::from_bits(self.0[0] >> 6 & 7)
    }
    /// Second-stage accessed/dirty enable.
    pub fn ssade(self) -> bool {
        self.0[0] >> 9 & 1 != 0
    }
    /// Second-stage table pointer.
    pub fn ss_root(self) -> u64 {
        self.0[0] & ADDR_MASK
    }
    /// Domain id.
    pub fn did(self) -> u16 {
        self.0[1] as u16
    }
    /// Snoop controls (PWSNP, PGSNP).
    pub fn snoop(self) -> Snoop {
        Snoop { page_walk: self.0[1] >> 23 & 1 != 0, page: self.0[1] >> 24 & 1 != 0 }
    }
    /// Supervisor request enable.
    pub fn sre(self) -> bool {
        self.0[2] & 1 != 0
    }
    /// Write protect enable.
    pub fn wpe(self) -> bool {
        self.0[2] >> 4 & 1 != 0
    }
    /// No-execute enable.
    pub fn nxe(self) -> bool {
        self.0[2] >> 5 & 1 != 0
    }
    /// Extended accessed flag enable.
    pub fn eafe(self) -> bool {
        self.0[2] >> 7 & 1 != 0
    }
    /// First-stage paging mode field.
    pub fn fspm(self) -> u8 {
        (self.0[2] >> 2 & 3) as u8
    }
    /// First-stage levels (4 or 5; 6 and 7 are reserved encodings).
    pub fn fs_levels(self) -> u32 {
        self.fspm() as u32 + 4
    }
    /// First-stage table pointer.
    pub fn fs_root(self) -> u64 {
        self.0[2] & ADDR_MASK
    }
}

impl fmt::Debug for PasidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.present() {
            return write!(f, "PasidEntry(not present)");
        }
        write!(f, "PasidEntry(did {}, ", self.did())?;
        match self.pgtt() {
            Some(Pgtt::SecondStage) => write!(f, "second stage {:#x} aw {}", self.ss_root(), self.aw())?,
            Some(Pgtt::FirstStage) => write!(f, "first stage {:#x} {}-level", self.fs_root(), self.fs_levels())?,
            Some(Pgtt::Nested) => {
                write!(f, "nested fs {:#x} ss {:#x} aw {}", self.fs_root(), self.ss_root(), self.aw())?
            }
            Some(Pgtt::PassThrough) => write!(f, "pass-through")?,
            None => write!(f, "reserved PGTT {}", self.0[0] >> 6 & 7)?,
        }
        let s = self.snoop();
        for (on, name) in [
            (self.fpd(), "FPD"),
            (s.page_walk, "PWSNP"),
            (s.page, "PGSNP"),
            (self.sre(), "SRE"),
            (self.wpe(), "WPE"),
            (self.nxe(), "NXE"),
            (self.eafe(), "EAFE"),
            (self.ssee(), "SSEE"),
            (self.ssade(), "SSADE"),
        ] {
            if on {
                write!(f, " {name}")?;
            }
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits QEMU reports as reserved in a present scalable-mode context
    /// entry (word 0 bits 8:5, word 1 bits 127:85), with addresses below
    /// the host address width.
    const CTX_RSVD0: u64 = 0x1e0;
    const CTX_RSVD1: u64 = 0xffff_ffff_ffe0_0000;

    #[test]
    fn root_entry_layout() {
        let r = ScalableRootEntry::default().with_lower(0x1234_5000);
        assert_eq!(r.0, [0x1234_5001, 0]);
        let r = r.with_upper(0x6789_a000);
        assert_eq!(r.0, [0x1234_5001, 0x6789_a001]);
        assert_eq!((r.lower(), r.upper()), (Some(0x1234_5000), Some(0x6789_a000)));
        assert_eq!((ScalableRootEntry::half_for(0x7f), ScalableRootEntry::half_for(0x80)), (0, 1));
        assert_eq!(r.table_for(0x00), Some(0x1234_5000));
        assert_eq!(r.table_for(0xff), Some(0x6789_a000));
        assert_eq!(ScalableRootEntry::default().table_for(3), None);
        assert_eq!(
            alloc::format!("{:?}", ScalableRootEntry::default().with_upper(0x2000)),
            "SmRootEntry(lower -, upper 0x2000)"
        );
    }

    #[test]
    fn context_entry_layout() {
        let c = ScalableContextEntry::new(0xabc_d000, PDTS_ONE_PAGE);
        assert_eq!(c.0, [0xabc_d000 | 2 << 9 | 1, 0, 0, 0]);
        assert!(c.present() && !c.fpd() && !c.dte() && !c.paside() && !c.pre());
        assert_eq!((c.pdts(), c.dir_entries(), c.pasid_dir(), c.rid_pasid()), (2, 512, 0xabc_d000, 0));
        assert_eq!(c.0[0] & CTX_RSVD0, 0);
        assert_eq!(c.0[1] & CTX_RSVD1, 0);
        assert_eq!(alloc::format!("{c:?}"), "SmContextEntry(dir 0xabcd000, 512 entries, rid_pasid 0)");
        // Decoding the other flags.
        let all = ScalableContextEntry([0x1f | 0x5000, 7, 0, 0]);
        assert!(all.fpd() && all.dte() && all.paside() && all.pre());
        assert_eq!(all.rid_pasid(), 7);
        assert!(!ScalableContextEntry::default().present());
    }

    #[test]
    fn pasid_dir_entry_layout() {
        let d = PasidDirEntry::new(0x5000);
        assert_eq!(d.0, 0x5001);
        assert!(d.present() && !d.fpd());
        assert_eq!(d.table(), 0x5000);
        assert!(PasidDirEntry(2).fpd() && !PasidDirEntry(2).present());
    }

    #[test]
    fn second_stage_entry_layout() {
        let e = PasidEntry::second_stage(0x7000, 2, 5, Snoop { page_walk: true, page: true }).unwrap();
        // P, AW = 2 at bits 4:2, PGTT = 010b at bits 8:6, SSPTPTR.
        assert_eq!(e.0[0], 0x7000 | 2 << 6 | 2 << 2 | 1);
        // DID at 79:64, PWSNP bit 87, PGSNP bit 88.
        assert_eq!(e.0[1], 5 | 1 << 23 | 1 << 24);
        assert_eq!(e.0[2..], [0; 6]);
        assert_eq!(e.pgtt(), Some(Pgtt::SecondStage));
        assert_eq!((e.ss_root(), e.aw(), e.ss_levels(), e.did()), (0x7000, 2, 4, 5));
        assert_eq!(e.snoop(), Snoop { page_walk: true, page: true });
        assert!(!e.fpd() && !e.ssee() && !e.ssade());
        let plain = PasidEntry::second_stage(0x7000, 1, 5, Snoop::default()).unwrap();
        assert_eq!(plain.0[1], 5);
        assert_eq!(plain.ss_levels(), 3);
        assert_eq!(PasidEntry::second_stage(0x7000, 0, 5, Snoop::default()), None);
        assert_eq!(PasidEntry::second_stage(0x7000, 4, 5, Snoop::default()), None);
        assert_eq!(alloc::format!("{e:?}"), "PasidEntry(did 5, second stage 0x7000 aw 2 PWSNP PGSNP)");
    }

    #[test]
    fn first_stage_entry_layout() {
        let e = PasidEntry::first_stage(0x9000, 4, 3, Snoop::default()).unwrap();
        assert_eq!(e.0[0], 1 | 2 << 2 | 1 << 6);
        assert_eq!(e.0[1], 3);
        // FSPTPTR at 191:140 (word 2 bits 63:12), FSPM = 00b, SRE/WPE off.
        assert_eq!(e.0[2], 0x9000);
        assert_eq!(e.0[3..], [0; 5]);
        assert_eq!((e.pgtt(), e.fs_root(), e.fs_levels(), e.did()), (Some(Pgtt::FirstStage), 0x9000, 4, 3));
        assert!(!e.sre() && !e.wpe() && !e.nxe());
        let five = PasidEntry::first_stage(0x9000, 5, 3, Snoop::default()).unwrap();
        assert_eq!(five.0[2], 0x9000 | 1 << 2);
        assert_eq!((five.fspm(), five.fs_levels(), five.aw()), (1, 5, 3));
        assert_eq!(PasidEntry::first_stage(0x9000, 3, 3, Snoop::default()), None);
        let nx = e.with_execute_disable();
        assert_eq!(nx.0[2], 0x9000 | 1 << 5);
        assert!(nx.nxe());
        assert_eq!(alloc::format!("{nx:?}"), "PasidEntry(did 3, first stage 0x9000 4-level NXE)");
    }

    #[test]
    fn nested_entry_layout() {
        let fs = FirstStageTable { table: 0x1234_5000, levels: 4, sre: false, wpe: false, eafe: false };
        let e = PasidEntry::nested(fs, 0x7000, 2, 9, Snoop::default()).unwrap();
        // P, AW = 2 (bits 4:2), PGTT = 011b (bits 8:6), SSPTPTR (63:12).
        assert_eq!(e.0[0], 1 | 2 << 2 | 3 << 6 | 0x7000);
        assert_eq!(e.0[1], 9);
        // FSPTPTR (191:140), FSPM = 00b, SRE/WPE/EAFE clear.
        assert_eq!(e.0[2], 0x1234_5000);
        assert_eq!(e.0[3..], [0; 5]);
        assert_eq!(e.pgtt(), Some(Pgtt::Nested));
        assert_eq!((e.fs_root(), e.fs_levels(), e.ss_root(), e.ss_levels()), (0x1234_5000, 4, 0x7000, 4));
        assert!(!e.fpd() && !e.ssee() && !e.ssade() && !e.sre() && !e.wpe() && !e.eafe() && !e.nxe());
        // SRE bit 128, FSPM = 01b bits 131:130, WPE bit 132, EAFE bit 135;
        // the low bits of the caller's pointer are dropped.
        let all = FirstStageTable { table: 0x1234_5fff, levels: 5, sre: true, wpe: true, eafe: true };
        let e = PasidEntry::nested(all, 0x7000, 3, 9, Snoop { page_walk: true, page: false }).unwrap();
        assert_eq!(e.0[2], 0x1234_5000 | 1 | 1 << 2 | 1 << 4 | 1 << 7);
        assert_eq!(e.0[1], 9 | 1 << 23);
        assert!(e.sre() && e.wpe() && e.eafe());
        assert_eq!((e.fspm(), e.fs_levels(), e.aw()), (1, 5, 3));
        // WPE only with SRE.
        let wpe = FirstStageTable { sre: false, ..all };
        assert_eq!(PasidEntry::nested(wpe, 0x7000, 2, 1, Snoop::default()).unwrap().0[2] & (1 << 4 | 1), 0);
        assert_eq!(PasidEntry::nested(FirstStageTable { levels: 3, ..fs }, 0x7000, 2, 1, Snoop::default()), None);
        assert_eq!(PasidEntry::nested(fs, 0x7000, 0, 1, Snoop::default()), None);
        assert_eq!(PasidEntry::nested(fs, 0x7000, 4, 1, Snoop::default()), None);
        let s = alloc::format!("{:?}", e.with_ssade(true));
        assert_eq!(s, "PasidEntry(did 9, nested fs 0x12345000 ss 0x7000 aw 3 PWSNP SRE WPE EAFE SSADE)");
    }

    #[test]
    fn pass_through_entry_layout() {
        let e = PasidEntry::pass_through(7, 2);
        assert_eq!(e.0, [1 | 2 << 2 | 4 << 6, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(e.pgtt(), Some(Pgtt::PassThrough));
        assert_eq!(alloc::format!("{e:?}"), "PasidEntry(did 7, pass-through)");
        assert_eq!(alloc::format!("{:?}", PasidEntry::default()), "PasidEntry(not present)");
    }

    #[test]
    fn pgtt_round_trips_and_rejects_reserved() {
        for p in [Pgtt::FirstStage, Pgtt::SecondStage, Pgtt::Nested, Pgtt::PassThrough] {
            assert_eq!(Pgtt::from_bits(p.bits()), Some(p));
        }
        for b in [0, 5, 6, 7] {
            assert_eq!(Pgtt::from_bits(b), None);
        }
        let odd = PasidEntry([1 | 6 << 6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(odd.pgtt(), None);
        assert!(alloc::format!("{odd:?}").contains("reserved PGTT 6"));
    }
}
