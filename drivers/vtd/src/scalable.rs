//! Scalable-mode translation structures (VT-d spec rev 4.x, chapter 9) and
//! [`ScalableTables`], which owns them for one unit.
//!
//! With RTADDR.TTM = 01b a request without PASID from `bus:dev.fn` is
//! translated through four levels of tables, all 4 KiB pages:
//!
//! | structure | spec | entry | per page | indexed by |
//! | --- | --- | --- | --- | --- |
//! | root table | 9.2 | 128 bits: lower + upper context-table pointer | 256 | bus |
//! | context table (lower / upper) | 9.4 | 256 bits | 128 | `devfn & 0x7f` (lower for devfn 0-127, upper for 128-255) |
//! | PASID directory | 9.5 | 64 bits | 512 | `pasid >> 6` |
//! | PASID table | 9.6 | 512 bits | 64 | `pasid & 0x3f` |
//!
//! Requests without PASID use PASID 0 (the RID_PASID field of the context
//! entry is left 0, which is also what rev 4.x hardware without ECAP.RPS
//! assumes). The PASID-table entry decides the translation: first stage
//! only, second stage only, nested or pass-through (PGTT), and tags it with
//! a domain id.
//!
//! # What [`ScalableTables`] guarantees
//!
//! * Entries are built bottom-up: a PASID-table entry is complete before
//!   the directory entry points at its table, the directory before the
//!   context entry points at it, the context table before the root entry
//!   points at it. Within a multi-word entry every other word is written
//!   first and the word holding the present bit last; when an entry is
//!   cleared the present bit goes first.
//! * When the [`TableMemory`] is not coherent, every cache line changed is
//!   flushed once, before anything that points at it becomes present.
//! * No invalidation is issued here: every change returns the
//!   [`Invalidations`] the unit must submit (and wait for) before relying
//!   on it.
//!
//! # Changing a present entry (spec 6.5.3.3, guidance to software)
//!
//! A 512-bit PASID-table entry cannot be replaced atomically, so a live
//! entry is never overwritten: the `set_*` methods refuse with
//! [`TablesError::Busy`]. To move a device to another translation:
//!
//! 1. [`ScalableTables::block`]: clears the present bit (then the rest) and
//!    flushes the line;
//! 2. submit what it returns, then an invalidation wait: PASID-selective
//!    PASID-cache invalidation for (old domain id, PASID 0), then the IOTLB
//!    for the old translation (domain-selective IOTLB invalidation for
//!    second-stage or nested entries, PASID-selective PASID-based IOTLB
//!    invalidation for first-stage or pass-through entries; a Device-TLB
//!    invalidation would follow if ATS were enabled, which it is not here);
//! 3. `set_*` the new entry; its [`Invalidations::caching_mode`] list is
//!    needed only when CAP.CM = 1 (not-present to present needs nothing
//!    otherwise).
//!
//! The context entry of a device stays present and keeps pointing at its
//! PASID directory once made: a blocked device faults on the non-present
//! PASID entry (fault reason "PASID entry not present").

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use io_pgtable::TableMemory;

// `super::qi` rather than `crate::qi`: the host tests include this file
// into their own crate, whose root imports `vtd::qi` under that name.
use super::qi::{ContextScope, Descriptor256, IotlbScope, PasidCacheScope, PasidIotlbScope};

/// The PASID used for requests without PASID (RID_PASID = 0).
pub const RID_PASID: u32 = 0;

/// PDTS for a one-page PASID directory: `2^(PDTS + 7)` = 512 entries,
/// PASIDs 0..32768 (spec 9.4).
pub const PDTS_ONE_PAGE: u8 = 2;

/// RTADDR.TTM = 01b: scalable-mode root and context tables (spec 11.4.6).
pub const RTADDR_TTM_SCALABLE: u64 = 1 << 10;

const ADDR_MASK: u64 = !0xfff;
const CACHE_LINE: u64 = 64;

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

    /// Present, pass-through (PGTT 100b) for domain `did`. The spec ignores
    /// AW for pass-through; it is filled with `aw` anyway (as Linux does).
    pub fn pass_through(did: u16, aw: u8) -> Self {
        Self::with_common(Pgtt::PassThrough, aw, did, Snoop::default())
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

// ---------------------------------------------------------------------------
// Invalidations the unit must issue
// ---------------------------------------------------------------------------

/// One invalidation a table change calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Global context-cache invalidation (a root entry changed).
    ContextCacheGlobal,
    /// Device-selective context-cache invalidation (the domain id in the
    /// descriptor is ignored in scalable mode; 0 is sent).
    ContextCacheDevice { sid: u16 },
    /// PASID-selective PASID-cache invalidation.
    PasidCache { did: u16, pasid: u32 },
    /// Domain-selective IOTLB invalidation: every PASID of the domain
    /// (second-stage, nested and pass-through entries).
    Iotlb { did: u16 },
    /// PASID-selective PASID-based IOTLB invalidation (first-stage and
    /// pass-through entries).
    PasidIotlb { did: u16, pasid: u32 },
}

impl Invalidation {
    /// The 256-bit descriptor for it.
    pub fn descriptor(self) -> Descriptor256 {
        match self {
            Self::ContextCacheGlobal => Descriptor256::context(ContextScope::Global),
            Self::ContextCacheDevice { sid } => Descriptor256::context(ContextScope::Device { did: 0, sid }),
            Self::PasidCache { did, pasid } => Descriptor256::pasid_cache(PasidCacheScope::Pasid { did, pasid }),
            Self::Iotlb { did } => Descriptor256::iotlb(IotlbScope::Domain(did)),
            Self::PasidIotlb { did, pasid } => Descriptor256::pasid_iotlb(PasidIotlbScope::Pasid { did, pasid }),
        }
    }

    /// The IOTLB invalidation that drops what `entry` may have cached.
    fn iotlb_for(entry: PasidEntry, pasid: u32) -> Self {
        match entry.pgtt() {
            Some(Pgtt::FirstStage | Pgtt::PassThrough) => Self::PasidIotlb { did: entry.did(), pasid },
            _ => Self::Iotlb { did: entry.did() },
        }
    }
}

/// What the unit must invalidate after a change, in this order, followed
/// by an invalidation wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "the unit must issue these invalidations"]
pub struct Invalidations {
    /// Needed whatever the unit: a present entry was removed.
    pub required: Vec<Invalidation>,
    /// Needed only when CAP.CM = 1 (caching mode: not-present entries may
    /// be cached). Without caching mode, not-present to present needs no
    /// invalidation.
    pub caching_mode: Vec<Invalidation>,
}

impl Invalidations {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.required.is_empty() && self.caching_mode.is_empty()
    }
    /// The list for a unit with or without caching mode.
    pub fn for_unit(&self, caching_mode: bool) -> Vec<Invalidation> {
        let mut v = self.required.clone();
        if caching_mode {
            v.extend_from_slice(&self.caching_mode);
        }
        v
    }
    /// The 256-bit descriptors for a unit with or without caching mode
    /// (the caller appends the wait).
    pub fn descriptors(&self, caching_mode: bool) -> Vec<Descriptor256> {
        self.for_unit(caching_mode).into_iter().map(Invalidation::descriptor).collect()
    }
}

// ---------------------------------------------------------------------------
// The tables
// ---------------------------------------------------------------------------

/// Why a table change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablesError {
    /// No page for a table.
    NoMemory,
    /// The device's PASID-0 entry is present: [`ScalableTables::block`]
    /// it and issue the invalidations first.
    Busy { sid: u16, current: PasidEntry },
    /// A parameter no entry can encode.
    Invalid(&'static str),
}

impl fmt::Display for TablesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemory => write!(f, "out of memory for scalable-mode tables"),
            Self::Busy { sid, current } => {
                write!(f, "device {sid:#06x} has a present PASID entry ({current:?}); block it first")
            }
            Self::Invalid(what) => write!(f, "invalid argument: {what}"),
        }
    }
}

/// Everything on one device's path, read back from the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEntries {
    /// The root entry of its bus.
    pub root: ScalableRootEntry,
    /// Its context entry.
    pub context: ScalableContextEntry,
    /// The directory entry for PASID 0.
    pub dir: PasidDirEntry,
    /// Its PASID-0 entry.
    pub pasid: PasidEntry,
}

/// The pages of one device.
#[derive(Debug, Clone, Copy)]
struct DevicePages {
    dir: u64,
    table: u64,
}

/// Scalable-mode root, context, PASID-directory and PASID tables of one
/// unit. Point RTADDR at [`Self::rtaddr`].
#[derive(Debug)]
pub struct ScalableTables<T: TableMemory> {
    mem: T,
    root: u64,
    /// Context tables per bus: [lower, upper].
    context: BTreeMap<u8, [Option<u64>; 2]>,
    devices: BTreeMap<u16, DevicePages>,
    snoop: Snoop,
    pass_through_aw: u8,
}

impl<T: TableMemory> ScalableTables<T> {
    /// Allocates the root table; every device is blocked (no context
    /// entry).
    pub fn new(mut mem: T) -> Result<Self, TablesError> {
        let root = mem.alloc_table().ok_or(TablesError::NoMemory)?;
        Ok(Self {
            mem,
            root,
            context: BTreeMap::new(),
            devices: BTreeMap::new(),
            snoop: Snoop::default(),
            pass_through_aw: 2,
        })
    }

    /// Snoop controls for entries made from now on (set PGSNP only with
    /// ECAP.SC, PWSNP only with ECAP.SMPWC).
    pub fn set_snoop(&mut self, snoop: Snoop) {
        self.snoop = snoop;
    }

    /// AW written into pass-through entries (default 2).
    pub fn set_pass_through_aw(&mut self, aw: u8) {
        self.pass_through_aw = aw & 7;
    }

    /// The root table's address.
    pub fn root_table(&self) -> u64 {
        self.root
    }

    /// The RTADDR value: the root table with TTM = 01b (scalable mode).
    pub fn rtaddr(&self) -> u64 {
        self.root | RTADDR_TTM_SCALABLE
    }

    /// The table memory.
    pub fn memory(&self) -> &T {
        &self.mem
    }

    /// The table memory, mutably (domains allocate from the same pool).
    pub fn memory_mut(&mut self) -> &mut T {
        &mut self.mem
    }

    /// The context table serving `bus` and `devfn`, if made.
    pub fn context_table(&self, bus: u8, devfn: u8) -> Option<u64> {
        self.context.get(&bus).and_then(|h| h[ScalableRootEntry::half_for(devfn)])
    }

    /// The PASID directory and PASID-0 table of `sid`, if made.
    pub fn pasid_pages(&self, sid: u16) -> Option<(u64, u64)> {
        self.devices.get(&sid).map(|d| (d.dir, d.table))
    }

    /// Points `sid` at the second-stage table `root` of width `aw` for
    /// domain `did` (PGTT 010b).
    pub fn set_second_stage(&mut self, sid: u16, root: u64, aw: u8, did: u16) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e =
            PasidEntry::second_stage(root, aw, did, self.snoop).ok_or(TablesError::Invalid("AW must be 1, 2 or 3"))?;
        self.install(sid, e)
    }

    /// Points `sid` at the first-stage (x86) table `root` of `levels` (4 or
    /// 5) for domain `did` (PGTT 001b).
    pub fn set_first_stage(
        &mut self,
        sid: u16,
        root: u64,
        levels: u32,
        did: u16,
    ) -> Result<Invalidations, TablesError> {
        check_table(root)?;
        let e = PasidEntry::first_stage(root, levels, did, self.snoop)
            .ok_or(TablesError::Invalid("first-stage levels must be 4 or 5"))?;
        self.install(sid, e)
    }

    /// Lets `sid` DMA untranslated (PGTT 100b, needs ECAP.PT), tagged with
    /// domain `did`.
    pub fn set_pass_through(&mut self, sid: u16, did: u16) -> Result<Invalidations, TablesError> {
        self.install(sid, PasidEntry::pass_through(did, self.pass_through_aw))
    }

    /// Blocks `sid`: clears its PASID-0 entry (present bit first). Returns
    /// the invalidations for the entry it removed (none if it was not
    /// present).
    pub fn block(&mut self, sid: u16) -> Invalidations {
        let Some(dev) = self.devices.get(&sid).copied() else { return Invalidations::default() };
        let table = dev.table;
        let (_, first) = pasid_slot(RID_PASID);
        let old = self.read_pasid(table, first);
        if !old.present() {
            return Invalidations::default();
        }
        self.mem.write(table, first, 0);
        for k in 1..8 {
            self.mem.write(table, first + k, 0);
        }
        self.flush(table, first, 8);
        Invalidations {
            required: alloc::vec![
                Invalidation::PasidCache { did: old.did(), pasid: RID_PASID },
                Invalidation::iotlb_for(old, RID_PASID)
            ],
            caching_mode: Vec::new(),
        }
    }

    /// What the unit sees for `sid`, followed from the root table; `None`
    /// when some level on the way is not present (the PASID entry itself
    /// is returned even when not present).
    pub fn entry(&self, sid: u16) -> Option<DeviceEntries> {
        let bus = (sid >> 8) as usize;
        let devfn = sid as u8;
        let root = ScalableRootEntry([self.mem.read(self.root, bus * 2), self.mem.read(self.root, bus * 2 + 1)]);
        let ctx_table = root.table_for(devfn)?;
        let ci = (devfn & 0x7f) as usize * 4;
        let context = ScalableContextEntry(core::array::from_fn(|k| self.mem.read(ctx_table, ci + k)));
        if !context.present() {
            return None;
        }
        let (dir_index, first) = pasid_slot(RID_PASID);
        let dir = PasidDirEntry(self.mem.read(context.pasid_dir(), dir_index));
        if !dir.present() {
            return None;
        }
        let pasid = self.read_pasid(dir.table(), first);
        Some(DeviceEntries { root, context, dir, pasid })
    }

    fn read_pasid(&self, table: u64, first: usize) -> PasidEntry {
        PasidEntry(core::array::from_fn(|k| self.mem.read(table, first + k)))
    }

    /// Flushes the lines covering `words` entries from `index` of `table`.
    fn flush(&mut self, table: u64, index: usize, words: usize) {
        if self.mem.coherent() {
            return;
        }
        let start = (table + index as u64 * 8) & !(CACHE_LINE - 1);
        let end = table + (index + words) as u64 * 8;
        self.mem.flush(start, end - start);
    }

    fn install(&mut self, sid: u16, entry: PasidEntry) -> Result<Invalidations, TablesError> {
        let bus = (sid >> 8) as u8;
        let devfn = sid as u8;
        let half = ScalableRootEntry::half_for(devfn);

        if let Some(dev) = self.devices.get(&sid) {
            let current = self.read_pasid(dev.table, pasid_slot(RID_PASID).1);
            if current.present() {
                return Err(TablesError::Busy { sid, current });
            }
        }

        // Allocate everything first, so a failure leaves the tables as
        // they were.
        let mut fresh: Vec<u64> = Vec::new();
        let alloc = |mem: &mut T, fresh: &mut Vec<u64>| -> Result<u64, TablesError> {
            match mem.alloc_table() {
                Some(t) => {
                    fresh.push(t);
                    Ok(t)
                }
                None => {
                    for t in fresh.drain(..) {
                        mem.free_table(t);
                    }
                    Err(TablesError::NoMemory)
                }
            }
        };
        let existing_ctx = self.context_table(bus, devfn);
        let ctx_table = match existing_ctx {
            Some(t) => t,
            None => alloc(&mut self.mem, &mut fresh)?,
        };
        let dev = match self.devices.get(&sid) {
            Some(d) => *d,
            None => {
                let dir = alloc(&mut self.mem, &mut fresh)?;
                let table = alloc(&mut self.mem, &mut fresh)?;
                DevicePages { dir, table }
            }
        };
        let new_device = !self.devices.contains_key(&sid);

        // 1. The PASID-table entry: words 7..1, then word 0 with P.
        let (_, first) = pasid_slot(RID_PASID);
        for k in (1..8).rev() {
            self.mem.write(dev.table, first + k, entry.0[k]);
        }
        self.mem.write(dev.table, first, entry.0[0]);
        self.flush(dev.table, first, 8);

        let mut caching_mode = Vec::new();
        if new_device {
            // 2. The directory entry for PASIDs 0-63.
            let (di, _) = pasid_slot(RID_PASID);
            self.mem.write(dev.dir, di, PasidDirEntry::new(dev.table).0);
            self.flush(dev.dir, di, 1);

            // 3. The context entry: words 3..1, then word 0 with P.
            let ctx = ScalableContextEntry::new(dev.dir, PDTS_ONE_PAGE);
            let ci = (devfn & 0x7f) as usize * 4;
            for k in (1..4).rev() {
                self.mem.write(ctx_table, ci + k, ctx.0[k]);
            }
            self.mem.write(ctx_table, ci, ctx.0[0]);
            self.flush(ctx_table, ci, 4);
            self.devices.insert(sid, dev);

            // 4. The root entry's half, one word.
            if existing_ctx.is_none() {
                let ri = bus as usize * 2 + half;
                self.mem.write(self.root, ri, ScalableRootEntry::half_word(ctx_table));
                self.flush(self.root, ri, 1);
                self.context.entry(bus).or_default()[half] = Some(ctx_table);
                caching_mode.push(Invalidation::ContextCacheGlobal);
            } else {
                caching_mode.push(Invalidation::ContextCacheDevice { sid });
            }
        }
        caching_mode.push(Invalidation::PasidCache { did: entry.did(), pasid: RID_PASID });
        caching_mode.push(Invalidation::iotlb_for(entry, RID_PASID));
        Ok(Invalidations { required: Vec::new(), caching_mode })
    }
}

/// Where `pasid` lives: (its PASID-directory index, the index of its first
/// word in the PASID table).
fn pasid_slot(pasid: u32) -> (usize, usize) {
    ((pasid >> 6) as usize, (pasid & 0x3f) as usize * 8)
}

fn check_table(root: u64) -> Result<(), TablesError> {
    if root & 0xfff != 0 || root == 0 {
        return Err(TablesError::Invalid("table root must be a nonzero 4 KiB-aligned address"));
    }
    Ok(())
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

    #[test]
    fn invalidation_descriptors() {
        use super::Descriptor256 as D;
        assert_eq!(Invalidation::ContextCacheGlobal.descriptor(), D([0x11, 0, 0, 0]));
        assert_eq!(Invalidation::ContextCacheDevice { sid: 0x108 }.descriptor(), D([0x31 | 0x108 << 32, 0, 0, 0]));
        assert_eq!(Invalidation::PasidCache { did: 4, pasid: 0 }.descriptor(), D([0x17 | 4 << 16, 0, 0, 0]));
        assert_eq!(Invalidation::Iotlb { did: 4 }.descriptor(), D([0x2 | 0x20 | 0xc0 | 4 << 16, 0, 0, 0]));
        assert_eq!(Invalidation::PasidIotlb { did: 4, pasid: 0 }.descriptor(), D([0x26 | 4 << 16, 0, 0, 0]));
    }
}
